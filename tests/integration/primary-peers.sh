#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The primary replicates into qemu-nbd, nbdkit and tapdisk-replica's own
# secondary: a guest workload through the primary's NBD export, a checkpoint,
# and the secondary's disk is byte-exact with the primary's.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io qemu-nbd nbdkit nbdcopy truncate cmp
tdr_setup

workload() {
	local seed=$1
	qio "$PURI" "write -P $((seed)) 0 4k" "write -P $((seed + 1)) 1M 3M" \
		"write -P $((seed + 2)) 17k 5k" "write -z 2M 64k" "discard 4M 128k" \
		"aio_write -P $((seed + 3)) 8M 64k" "aio_write -P $((seed + 4)) 9M 64k" aio_flush \
		"write -P $((seed + 5)) 31M 1M" flush
}

# One peer: a fresh primary image, the workload twice, a checkpoint after each.
check_peer() {
	local name=$1 file=$2
	rm -f "$T/primary.img"; mkraw "$T/primary.img" 32M
	primary_start "unix:$T/$name.sock"
	pctl_ok start >/dev/null
	assert_eq "$name: state after start" running "$(pstatus state)"
	workload 10
	pctl_ok checkpoint >/dev/null
	if [ -n "$file" ]; then
		same_as_primary "$file"
	else
		rctl "$SEC_CTL" checkpoint >/dev/null || fail "secondary checkpoint failed"
		svm_view_same
	fi
	workload 40
	pctl_ok checkpoint >/dev/null
	if [ -n "$file" ]; then
		same_as_primary "$file"
	else
		rctl "$SEC_CTL" checkpoint >/dev/null || fail "secondary checkpoint failed"
		svm_view_same
	fi
	assert_eq "$name: checkpoints" 2 "$(pstatus checkpoints)"
	assert_eq "$name: dirty bytes" 0 "$(pstatus dirty_bytes)"
	tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
	log "$name: byte-exact after checkpoints"
}

mkraw "$T/qemu.img" 32M
qemu_nbd_start "$T/qemu.sock" "$T/qemu.img"
check_peer qemu "$T/qemu.img"

mkraw "$T/nbdkit.img" 32M
nbdkit_start "$T/nbdkit.sock" "$T/nbdkit.img"
check_peer nbdkit "$T/nbdkit.img"

secondary_start tdrsec 32
check_peer tdrsec ""
pass "qemu-nbd, nbdkit and tapdisk-replica's secondary byte-exact"
