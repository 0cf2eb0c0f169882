#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Slow, failing and frozen links (nbdkit's delay, error and pause filters
# between primary and secondary): guest writes through the primary still
# complete while the secondary does not answer, the link is reported broken
# with the exact errno (ETIMEDOUT, EIO) by status and get-error, and no
# acknowledged write is lost locally.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io nbdkit truncate cmp
tdr_setup

TIMEOUT_MS=1000

# broken_case NAME ERRNO_NAME NBDKIT_ARGS...: the link breaks, the guest does not.
broken_case() {
	local name=$1 want=$2
	shift 2
	rm -f "$T/primary.img"; mkraw "$T/primary.img" 16M
	mkraw "$T/$name.img" 16M
	nbdkit_start "$T/$name.sock" "$T/$name.img" "$@"
	local npid=$PEER_PID
	primary_start "unix:$T/$name.sock" "timeout=$TIMEOUT_MS"
	pctl_ok start >/dev/null
	[ -n "${BEFORE_BREAK:-}" ] && $BEFORE_BREAK
	guest_qio "$PURI" "write -P 0x61 0 64k" "write -P 0x62 1M 1M"
	log "$name: guest writes completed in ${LAST_MS} ms (timeout ${TIMEOUT_MS} ms)"
	assert_eq "$name: state" broken "$(pstatus state)"
	assert_eq "$name: error" "$want" "$(pstatus error)"
	local ge
	ge=$(pctl_ok get-error)
	case $ge in
	"$want "*"link dropped"*) ;;
	*) fail "$name: get-error says '$ge'" ;;
	esac
	[ "$(pstatus dirty_bytes)" -gt 0 ] || fail "$name: nothing tracked for resync"
	# The guest goes on, at local speed, and nothing it saw complete is lost.
	guest_qio "$PURI" "write -P 0x63 2M 64k" flush
	qio "$PURI" "read -P 0x61 0 64k" "read -P 0x62 1M 1M" "read -P 0x63 2M 64k"
	tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
	qio_file() { qemu-io -f raw -r "$T/primary.img" -c "$1" >"$T/qio.out" 2>&1 && ! grep -q 'failed' "$T/qio.out"; }
	qio_file "read -P 0x62 1M 1M" || fail "$name: the local image lost an acknowledged write"
	kill -CONT "$npid" 2>/dev/null || true
	kill -KILL "$npid" 2>/dev/null || true
	wait "$npid" 2>/dev/null || true
}

# Slow: every write takes 10 minutes, far past the timeout and past the
# test: a guest write that waited for the secondary's answer would hang.
broken_case slow ETIMEDOUT --filter=delay delay-write=600

# Failing: every write fails with EIO.
broken_case failing EIO --filter=error error-pwrite=EIO error-pwrite-rate=100%

# Frozen: the pause filter holds every request once paused.
# shellcheck disable=SC2317  # called through $BEFORE_BREAK
pause_it() {
	"$PY" - "$T/pause.ctl" <<'PYEOF' || fail "cannot pause nbdkit"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"p")
s.recv(1)
PYEOF
}
BEFORE_BREAK=pause_it broken_case frozen ETIMEDOUT --filter=pause "pause-control=$T/pause.ctl"
BEFORE_BREAK=""

# Slow but within the timeout: replication goes on, byte-exact.
rm -f "$T/primary.img"; mkraw "$T/primary.img" 16M
mkraw "$T/ok.img" 16M
nbdkit_start "$T/ok.sock" "$T/ok.img" --filter=delay delay-write=100ms
primary_start "unix:$T/ok.sock" "timeout=$TIMEOUT_MS"
pctl_ok start >/dev/null
qio "$PURI" "write -P 0x71 0 1M" "write -P 0x72 5M 64k" flush
pctl_ok checkpoint >/dev/null
assert_eq "delayed: state" running "$(pstatus state)"
same_as_primary "$T/ok.img"
pass "slow, failing and frozen links never held the guest"
