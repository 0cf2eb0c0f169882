# SPDX-License-Identifier: BSD-3-Clause
"""NBD wire constants and receive helpers for the integration tests'
raw-socket clients (proto.md of the NetworkBlockDevice project).

The tests run their Python from a here-document with PYTHONPATH set to
this directory: `PYTHONPATH=$TESTDIR "$PY" - ARGS <<'PYEOF'`.
"""

import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_MAGIC = 0x49484156454F5054        # IHAVEOPT as a number
REQ_MAGIC = 0x25609513

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_REPLY_MAGIC = 0x3E889045565A9
REP_ACK = 1
REP_ERR_POLICY = 0x80000000 + 2
REP_ERR_SHUTDOWN = 0x80000000 + 7


def recv_exact(s, n):
    """Exactly n bytes from socket s; EOFError if the peer closes first."""
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("the server closed the connection")
        b += c
    return b


def recv_option_reply(s):
    """One option reply from socket s: (option, reply type, payload).
    AssertionError if it does not start with the option reply magic."""
    magic, opt, rtype, ln = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == OPT_REPLY_MAGIC, "bad option reply magic %#x" % magic
    return opt, rtype, recv_exact(s, ln)
