# SPDX-License-Identifier: BSD-3-Clause
# shellcheck shell=bash disable=SC2034,SC2153
#
# Helpers for the primary's integration tests (tests/integration/primary-*.sh).
# Sourced after lib.sh and tdr_setup.  A primary is
#     tapdisk-replica serve --socket $T/nbd-N.sock --control $PCTL \
#         'replica:mode=primary,addr=ADDR,...|aio:$T/primary.img'
# driven with `tdr-ctl replica -s $PCTL -m 0 OP`; its secondary is
# qemu-nbd, nbdkit (with filters) or tapdisk-replica's own secondary.

CTL_BIN="$TDR_BUILDDIR/tools/tdr-ctl"
VHD_UTIL="$TDR_BUILDDIR/tools/vhd-util"
[ -x "$CTL_BIN" ] || fail "tdr-ctl not built: $CTL_BIN"

PEER_PID=""
PRIMARY_PID=""
PURI=""
PCTL=""

now_ms() { date +%s%3N; }

# wait_connectable SOCKET PID ERRFILE: until SOCKET accepts connections.
wait_connectable() {
	local sock=$1 pid=$2 err=$3 i=0 limit=$((TDR_TIMEOUT * 20))
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			fail "peer $pid exited before listening on $sock: $(head -c 2000 "$err")"
		fi
		if [ -S "$sock" ] && "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
' "$sock" 2>/dev/null; then
			return 0
		fi
		i=$((i + 1))
		[ "$i" -lt "$limit" ] || fail "nothing listens on $sock after ${TDR_TIMEOUT}s"
		sleep 0.05
	done
}

# peer_start NAME SOCKET CMD...: a peer in the background (killed at exit).
peer_start() {
	local name=$1 sock=$2
	shift 2
	rm -f "$sock"
	"$@" </dev/null >"$T/$name.out" 2>"$T/$name.err" &
	PEER_PID=$!
	TDR_PIDS+=("$PEER_PID")
	wait_connectable "$sock" "$PEER_PID" "$T/$name.err"
}

# qemu_nbd_start SOCKET IMAGE: export "secondary", reconnectable.
qemu_nbd_start() {
	peer_start qemu-nbd "$1" qemu-nbd -f raw -x secondary -k "$1" --persistent --shared=8 "$2"
}

# nbdkit_start SOCKET IMAGE [--filter=F ...] [KEY=VALUE ...]
nbdkit_start() {
	local sock=$1 img=$2
	shift 2
	local filters=() params=() a
	for a in "$@"; do
		case $a in
		--filter=*) filters+=("$a") ;;
		*) params+=("$a") ;;
		esac
	done
	peer_start nbdkit "$sock" nbdkit -f -U "$sock" "${filters[@]}" file "$img" "${params[@]}"
}

# secondary_start NAME SIZE_MIB: tapdisk-replica's own secondary, in state
# running.  Sets SEC_SOCK (its export for the primary), SEC_CTL, SEC_URI (the
# SVM's view), SEC_PID.
secondary_start() {
	local name=$1 size=$2
	[ -x "$VHD_UTIL" ] || fail "vhd-util not built: $VHD_UTIL"
	if [ ! -e "$T/$name-disk.vhd" ]; then
		"$VHD_UTIL" create -n "$T/$name-disk.vhd" -s "$size" >/dev/null || fail "vhd-util create"
		"$VHD_UTIL" snapshot -n "$T/$name-hidden.vhd" -p "$T/$name-disk.vhd" >/dev/null || fail "vhd-util snapshot"
		"$VHD_UTIL" snapshot -n "$T/$name-active.vhd" -p "$T/$name-hidden.vhd" >/dev/null || fail "vhd-util snapshot"
	fi
	SEC_SOCK="$T/$name.sock"
	SEC_CTL="$T/$name-ctl.sock"
	rm -f "$SEC_SOCK" "$SEC_CTL"
	tdr_start --control "$SEC_CTL" \
		"replica:mode=secondary,addr=unix:$SEC_SOCK,export=secondary|vhd:$T/$name-active.vhd"
	SEC_PID=$DAEMON_PID
	SEC_URI=$URI
	rctl "$SEC_CTL" start >/dev/null || fail "secondary start failed"
	wait_connectable "$SEC_SOCK" "$SEC_PID" "$DAEMON_ERR"
}

# rctl CONTROL_SOCKET OP...: one replica operation; prints the reply.
rctl() {
	local sock=$1
	shift
	"$CTL_BIN" replica -s "$sock" -m 0 "$@"
}

# primary_start ADDR [OPTIONS]: the primary over $T/primary.img (made by the
# caller), with its control socket $PCTL.  Sets PRIMARY_PID, PURI, PERR.
primary_start() {
	local addr=$1 opts=${2:-}
	PCTL="$T/pctl.sock"
	rm -f "$PCTL"
	tdr_start --control "$PCTL" "replica:mode=primary,addr=$addr${opts:+,$opts}|aio:$T/primary.img"
	PRIMARY_PID=$DAEMON_PID
	PURI=$URI
	PERR=$DAEMON_ERR
}

pctl() { rctl "$PCTL" "$@"; }

# pctl_ok OP...: the operation must succeed.
pctl_ok() {
	local out st=0
	out=$(pctl "$@" 2>&1) || st=$?
	[ "$st" -eq 0 ] || fail "tdr-ctl replica $* failed ($st): $out"
	printf '%s\n' "$out"
}

# pstatus KEY: one key of the primary's status.
pstatus() { pctl status | sed -n "s/^$1=//p"; }

# wait_pstate STATE: until the primary is in STATE.
wait_pstate() {
	local want=$1 i=0 limit=$((TDR_TIMEOUT * 20)) st
	while :; do
		st=$(pstatus state)
		[ "$st" = "$want" ] && return 0
		i=$((i + 1))
		[ "$i" -lt "$limit" ] || fail "primary state is '$st', not '$want', after ${TDR_TIMEOUT}s ($(pctl get-error 2>&1))"
		sleep 0.05
	done
}

# guest_qio URI COMMAND...: qemu-io as the guest while the secondary is
# frozen, silent, failing or dead.  What is checked is behaviour: the I/O
# completes while the secondary still does not answer (a primary that held
# the guest until the secondary recovered would hang here; GUEST_HANG_S only
# keeps such a build from stalling the suite), and the callers check the
# state and errno the primary reports.  The time it took is logged
# ($LAST_MS), never asserted: tests do not assert timings.
guest_qio() {
	local t0
	t0=$(now_ms)
	QIO_TIMEOUT=${GUEST_HANG_S:-120} qio "$@"
	LAST_MS=$(($(now_ms) - t0))
}

# same_as_primary FILE: byte-exact against the primary's image.
same_as_primary() { same_file "$T/primary.img" "$1"; }

# svm_view_same: the secondary's SVM view (after checkpoints) equals the primary.
svm_view_same() {
	rm -f "$T/svm-view.img"
	nbdcopy "$SEC_URI" "$T/svm-view.img" || fail "nbdcopy of the SVM view failed"
	same_as_primary "$T/svm-view.img"
}

# nbdkit_log_bytes LOG VERB: bytes of all VERB (Write, Zero) requests in an nbdkit log.
nbdkit_log_bytes() {
	"$PY" - "$1" "$2" <<'EOF'
import re, sys
total = 0
for line in open(sys.argv[1]):
    m = re.search(r' %s id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)' % sys.argv[2], line)
    if m:
        total += int(m.group(1), 16)
print(total)
EOF
}
