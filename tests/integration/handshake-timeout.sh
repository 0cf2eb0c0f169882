#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# --handshake-timeout: a connection that does not reach transmission in
# time is closed (clients that connect and stall, in the clear or in the
# TLS handshake after STARTTLS, once held their slot for good, and 1024
# of them locked every client out); one that reached transmission may
# stay idle as long as it likes.  Bad values are refused.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd truncate psktool
need_pynbd
tdr_setup

truncate -s 8M "$T/disk.img"
psktool -u alice -p "$T/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
tdr_start --handshake-timeout 1 --tls on --tls-psk "$T/keys.psk" "aio:$T/disk.img"

out=$(PYTHONPATH=$TESTDIR "$PY" - "$SOCK" <<'PYEOF' 2>&1
import socket, struct, sys, time, nbd
from nbdwire import OPT_MAGIC, OPT_STARTTLS, REP_ACK, recv_exact, recv_option_reply
path = sys.argv[1]

def stalled(stage):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if stage != 'connect':
        recv_exact(s, 18)
        s.sendall(struct.pack('>I', 3))
    if stage == 'starttls':
        s.sendall(struct.pack('>QII', OPT_MAGIC, OPT_STARTTLS, 0))
        _, rtype, _ = recv_option_reply(s)
        assert rtype == REP_ACK, rtype
    s.settimeout(20)
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        print('%s: still open after 20 s' % stage)
        sys.exit(1)
    s.close()

# In transmission, idle for 3 s, then served.
h = nbd.NBD()
h.connect_unix(path)
for stage in ('connect', 'options', 'starttls'):
    stalled(stage)
time.sleep(3)
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()
print('ok')
PYEOF
) || fail "$out"
assert_eq "stalled handshakes closed, an idle client in transmission served" ok "$out"
[ "$(grep -c "handshake not finished within 1 s" "$DAEMON_ERR")" -eq 3 ] ||
	fail "expected three handshake timeouts in the log: $(cat "$DAEMON_ERR")"
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"

for bad in x -1 86401 ""; do
	st=0
	"$TDR_BIN" serve --socket "$T/r.sock" --handshake-timeout "$bad" "aio:$T/disk.img" \
		</dev/null >/dev/null 2>"$T/r.err" || st=$?
	assert_eq "status for --handshake-timeout '$bad'" 2 "$st"
	grep -q "bad --handshake-timeout" "$T/r.err" || fail "--handshake-timeout '$bad': $(cat "$T/r.err")"
done
pass "handshakes past the limit closed, in the clear and in TLS; transmission unaffected"
