#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Bad secondaries: unreachable, refusing, an export name that does not
# exist, a size mismatch, a server that talks garbage, and one that answers
# a request never made.  Each gives one clear error from tdr-ctl (and
# get-error), the guest's I/O through the primary goes on unharmed, and no
# acknowledged write is lost.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io qemu-nbd truncate
tdr_setup

mkraw "$T/primary.img" 16M
primary_start "unix:$T/none.sock" timeout=1000

# expect_start_error ERRNO REGEX [START ARGS...]: start fails with tdr-ctl's
# exit status ERRNO (the daemon's errno value) and REGEX; the guest is fine.
n=0
expect_start_error() {
	local want=$1 re=$2 out st=0
	shift 2
	n=$((n + 1))
	out=$(pctl start "$@" 2>&1) || st=$?
	assert_eq "exit status (errno) of start $*" "$want" "$st"
	printf '%s\n' "$out" | grep -qE "$re" || fail "start $*: expected /$re/, got: $out"
	[ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] || fail "start $*: not one line: $out"
	assert_eq "state after failed start ($*)" none "$(pstatus state)"
	qio "$PURI" "write -P $n $((n))M 64k" "read -P $n $((n))M 64k"
	log "start $*: $out"
}

# Nothing listens.
expect_start_error 2 "cannot connect.*No such file" "addr=unix:$T/none.sock"
# A TCP port nobody listens on (connection refused).
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
expect_start_error 111 "cannot connect.*refused" "addr=tcp:127.0.0.1:$port"
# A host name: refused before anything (a lookup would block the disk).
expect_start_error 22 "not a numeric" "addr=tcp:secondary.invalid:10809"

mkraw "$T/sec.img" 16M
qemu_nbd_start "$T/q.sock" "$T/sec.img"
expect_start_error 2 "no export named 'nosuch'" "addr=unix:$T/q.sock" export=nosuch
kill -KILL "$PEER_PID"; wait "$PEER_PID" 2>/dev/null || true
wait "$PEER_PID" 2>/dev/null || true

mkraw "$T/small.img" 8M
qemu_nbd_start "$T/small.sock" "$T/small.img"
expect_start_error 22 "8388608 bytes but the local disk has 16777216" "addr=unix:$T/small.sock" export=secondary
kill -KILL "$PEER_PID"; wait "$PEER_PID" 2>/dev/null || true
wait "$PEER_PID" 2>/dev/null || true

ge=$(pctl_ok get-error)
case $ge in EINVAL*"8388608"*) ;; *) fail "get-error after the size mismatch: $ge" ;; esac

# Misbehaving servers: a tiny NBD server in Python.
#   garbage   sends junk instead of the greeting
#   bogus     handshakes, then answers each request with a handle never used
cat >"$T/badserver.py" <<'PYEOF'
import os, socket, struct, sys
mode, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
ls = socket.socket(socket.AF_UNIX)
ls.bind(path)
ls.listen(4)
def rd(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b
while True:
    c, _ = ls.accept()
    try:
        if mode == "garbage":
            c.sendall(os.urandom(64))
            rd(c, 1)
            continue
        c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
        rd(c, 4)
        while True:
            magic, opt, ln = struct.unpack(">QII", rd(c, 16))
            rd(c, ln)
            if opt == 7:  # GO
                info = struct.pack(">HQH", 0, size, 1 | 4 | 64)
                c.sendall(struct.pack(">QIII", 0x3e889045565a9, 7, 3, len(info)) + info)
                c.sendall(struct.pack(">QIII", 0x3e889045565a9, 7, 1, 0))
                break
            c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, 0x80000001, 0))
        while True:
            magic, flags, typ, handle, off, ln = struct.unpack(">IHHQQI", rd(c, 28))
            if typ == 1:
                rd(c, ln)
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle ^ 0x5555))
    except (EOFError, ConnectionError):
        pass
    finally:
        c.close()
PYEOF

"$PY" "$T/badserver.py" garbage "$T/garbage.sock" 16777216 &
TDR_PIDS+=("$!")
wait_connectable "$T/garbage.sock" "$!" /dev/null
expect_start_error 71 "cannot connect.*handshake" "addr=unix:$T/garbage.sock"

"$PY" "$T/badserver.py" bogus "$T/bogus.sock" 16777216 &
TDR_PIDS+=("$!")
wait_connectable "$T/bogus.sock" "$!" /dev/null
# A fresh primary: the one above has tracked writes and would not forward.
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
rm -f "$T/primary.img"
mkraw "$T/primary.img" 16M
primary_start "unix:$T/bogus.sock" timeout=1000
pctl_ok start >/dev/null
assert_eq "bogus replies: state after start" running "$(pstatus state)"
guest_qio "$PURI" "write -P 0x77 10M 64k" flush
assert_eq "bogus replies: state" broken "$(pstatus state)"
ge=$(pctl_ok get-error)
case $ge in "EPROTO "*"a reply to a request never made (cookie 0x5555)"*"link dropped"*) ;; *) fail "bogus replies: get-error says '$ge'" ;; esac
qio "$PURI" "read -P 0x77 10M 64k"
tdr_alive "$PRIMARY_PID"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
pass "bad secondaries give clear errors and never harm the guest"
