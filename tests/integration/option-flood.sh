#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# A client that sends its options in one burst (proto.md allows it) and
# reads the replies slowly: the server stops reading options while 1 MiB
# of replies waits, and must start again once they are taken, although
# the options are already in its buffer and the socket says nothing more.
# It once stalled for good there (about 950 of 1000 NBD_OPT_LIST answered).
# A long export name makes each LIST reply 4 KiB.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

truncate -s 16M "$T/disk.img"
name=$(head -c 4000 /dev/zero | tr '\0' x)
# A port that was free a moment ago.
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tdr_start --tcp "127.0.0.1:$port" --export-name "$name" "aio:$T/disk.img"

for addr in "$SOCK" "127.0.0.1:$port"; do
	out=$(PYTHONPATH=$TESTDIR "$PY" - "$addr" 1000 <<'PYEOF' 2>&1
import socket, struct, sys, time
from nbdwire import OPT_MAGIC, REP_ACK, recv_exact, recv_option_reply
addr, nopts = sys.argv[1], int(sys.argv[2])
if ':' in addr:
    host, port = addr.rsplit(':', 1)
    s = socket.socket(socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
else:
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(addr)
recv_exact(s, 18)
s.sendall(struct.pack('>I', 3))                             # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(struct.pack('>QII', OPT_MAGIC, 3, 0) * nopts)     # NBD_OPT_LIST, all at once
time.sleep(1)
s.settimeout(10)
acks = total = 0
try:
    while acks < nopts:
        _, rtype, data = recv_option_reply(s)
        total += 20 + len(data)
        if rtype == REP_ACK:
            acks += 1
except (socket.timeout, EOFError) as e:
    print('stalled: %d of %d NBD_OPT_LIST answered (%d bytes), then nothing for 10 s: %r'
          % (acks, nopts, total, e))
    sys.exit(1)
print('ok %d %d' % (acks, total))
PYEOF
	) || fail "$addr: $out"
	log "$addr: 1000 options in one burst, replies read slowly: $out"
done
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"
pass "options sent in a burst are all answered, however slowly the replies are read"
