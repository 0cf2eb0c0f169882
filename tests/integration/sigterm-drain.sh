#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# SIGTERM drains: the daemon exits 0, every write it acknowledged is in the
# file (even with no FLUSH from the client), with a client idle, and with a
# client that has many writes in flight when the signal arrives; clients
# still negotiating are answered NBD_REP_ERR_SHUTDOWN.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io cmp truncate
need_pynbd
tdr_setup


# 1. Writes without a flush, client still connected and idle at SIGTERM.
mkraw "$T/a.img" 16M
tdr_start "aio:$T/a.img"
"$PY" - "$URI" "$T/hold.ready" <<'PYEOF' &
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x5c" * (4 << 20), 1 << 20)
open(sys.argv[2], "w").close()
# Stay connected until the server goes away.
try:
    for _ in range(600):
        h.pread(512, 0)
        time.sleep(0.1)
except nbd.Error:
    pass
PYEOF
holder=$!
for ((i = 0; i < TDR_TIMEOUT * 20; i++)); do
	[ -e "$T/hold.ready" ] && break
	sleep 0.05
done
[ -e "$T/hold.ready" ] || fail "client did not write"
st=0
tdr_stop || st=$?
assert_eq "exit status on SIGTERM with an idle client" 0 "$st"
wait "$holder" || true
"$PY" - "$T/a.img" <<'PYEOF' || fail "acknowledged writes missing from the file after SIGTERM"
import sys
M = 1 << 20
d = open(sys.argv[1], "rb").read()
assert len(d) == 16 * M
assert d[:M] == bytes(M)
assert d[M:5 * M] == b"\x5c" * (4 * M)
assert d[5 * M:] == bytes(11 * M)
PYEOF

# 2. SIGTERM while 128 x 256 KiB writes are in flight: each one the server
#    acknowledged must be in the file; the daemon exits 0.
mkraw "$T/b.img" 32M
tdr_start "aio:$T/b.img"
"$PY" - "$URI" "$DAEMON_PID" "$T/acked" <<'PYEOF' || fail "in-flight client failed"
import os, signal, sys, nbd
uri, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
K = 256 << 10
cookies = {}
for i in range(128):
    buf = nbd.Buffer.from_bytearray(bytearray([1 + i % 250]) * K)
    cookies[i] = h.aio_pwrite(buf, i * K)
acked, lost, killed = [], [], False
pending = dict(cookies)
while pending:
    for i, c in list(pending.items()):
        try:
            if h.aio_command_completed(c):
                acked.append(i)
                del pending[i]
        except nbd.Error:
            lost.append(i)           # failed or connection lost: unknown
            del pending[i]
    # SIGTERM once the server is busy: some writes done, most still queued.
    if not killed and len(acked) >= 8:
        os.kill(pid, signal.SIGTERM)
        killed = True
    if not pending:
        break
    try:
        if h.aio_is_dead() or h.aio_is_closed():
            break
        h.poll(1000)
    except nbd.Error:
        break
if not killed:
    os.kill(pid, signal.SIGTERM)
open(out, "w").write(" ".join(map(str, sorted(acked))))
print(f"acknowledged {len(acked)}, failed {len(lost)}, unanswered {len(pending)}", file=sys.stderr)
PYEOF
st=0
tdr_stop || st=$?
assert_eq "exit status on SIGTERM with writes in flight" 0 "$st"
nacked=$(wc -w <"$T/acked")
log "acknowledged before shutdown: $nacked of 128 writes"
[ "$nacked" -ge 8 ] || fail "only $nacked writes acknowledged (expected at least the 8 before SIGTERM)"
"$PY" - "$T/b.img" "$T/acked" <<'PYEOF' || fail "an acknowledged write is missing from the file"
import sys
K = 256 << 10
d = open(sys.argv[1], "rb").read()
assert len(d) == 32 << 20, len(d)
acked = [int(x) for x in open(sys.argv[2]).read().split()]
bad = [i for i in acked if d[i * K:(i + 1) * K] != bytes([1 + i % 250]) * K]
if bad:
    print(f"  acknowledged but not in the file: {bad[:10]}", file=sys.stderr)
    sys.exit(1)
PYEOF

# 3. SIGTERM with clients still negotiating (proto.md: the server SHOULD
#    error further options with NBD_REP_ERR_SHUTDOWN; the client MUST then
#    disconnect): one in option haggling gets the error for its next option
#    and an acknowledged NBD_OPT_ABORT; one that had only the greeting gets
#    the same after its flags; one that sends nothing more is closed.  The
#    daemon exits 0.
truncate -s 8M "$T/c.img"
tdr_start "aio:$T/c.img"
out=$(PYTHONPATH=$TESTDIR "$PY" - "$SOCK" "$DAEMON_PID" "$DAEMON_ERR" <<'PYEOF' 2>&1
import os, signal, socket, struct, sys, time
from nbdwire import (OPT_MAGIC, OPT_STRUCTURED_REPLY, OPT_ABORT, OPT_GO, OPT_LIST,
                     REP_ACK, REP_ERR_SHUTDOWN, recv_exact, recv_option_reply)
path, pid, err = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def conn(flags=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    recv_exact(s, 18)
    if flags:
        s.sendall(struct.pack('>I', 3))
    return s

def option(s, opt, data=b''):
    s.sendall(struct.pack('>QII', OPT_MAGIC, opt, len(data)) + data)
    ropt, rtype, payload = recv_option_reply(s)
    assert ropt == opt, (ropt, opt)
    return rtype, payload

def eof(s, who):
    try:
        assert s.recv(1) == b'', who + ': data instead of EOF'
    except socket.timeout:
        sys.exit(who + ': still open 30 s after the shutdown')

haggling = conn()
assert option(haggling, OPT_STRUCTURED_REPLY)[0] == REP_ACK
greeted = conn(flags=False)
idle = conn()
assert option(idle, OPT_STRUCTURED_REPLY)[0] == REP_ACK
os.kill(pid, signal.SIGTERM)
for _ in range(600):
    if 'stopping: no new connections' in open(err).read():
        break
    time.sleep(0.05)
else:
    sys.exit('no shutdown message in the log')

rtype, msg = option(haggling, OPT_LIST)
assert rtype == REP_ERR_SHUTDOWN, 'LIST after SIGTERM: reply type %#x' % rtype
assert b'shutting down' in msg, msg
rtype, _ = option(haggling, OPT_ABORT)
assert rtype == REP_ACK, 'ABORT after SIGTERM: reply type %#x' % rtype
eof(haggling, 'the aborted client')

greeted.sendall(struct.pack('>I', 3))
go = struct.pack('>I', 0) + struct.pack('>H', 0)
rtype, _ = option(greeted, OPT_GO, go)
assert rtype == REP_ERR_SHUTDOWN, 'GO after SIGTERM: reply type %#x' % rtype
greeted.close()

eof(idle, 'the idle negotiating client')
print('ok')
PYEOF
) || fail "clients negotiating at SIGTERM: $out"
assert_eq "clients negotiating at SIGTERM told of the shutdown" ok "$out"
st=0
tdr_stop || st=$?
assert_eq "exit status on SIGTERM with clients negotiating" 0 "$st"
grep -q "still negotiating at the end of the shutdown grace period" "$DAEMON_ERR" ||
	fail "the idle negotiating client's close is not in the log: $(tail -c 2000 "$DAEMON_ERR")"

pass
