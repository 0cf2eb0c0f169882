#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# A secondary daemon killed (SIGKILL) while it replicates, then the primary
# lost: the operator starts the daemon again on the same chain and asks for
# a failover.  The new process never saw which chunks active and hidden
# held, so the failover commits every chunk of their allocated blocks,
# with the SVM writing meanwhile, and then serves the secondary disk.  The
# secondary disk, read by qemu-img, must be what the SVM saw: the primary's
# writes since the start hidden, the SVM's before the kill and during the
# commit present.  The same path after a failover cut short by a close is
# tested by the unit test failover_resumes_after_interrupted_close.
. "$(dirname "$0")/lib.sh"

need_cmd qemu-io qemu-img nbdcopy
tdr_setup

# The primary's writes land in the secondary disk, their originals in
# hidden; the SVM's go to active.  A SIGKILL then: no drain, no flush.
secondary_with_view 256 96 64 64
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true

tdr_start --control "$T/ctl.sock" "replica:mode=secondary,addr=unix:$T/export.sock|vhd:$T/active.vhd"
SVM=$URI
assert_eq "state after the restart" none "$(state)"
qio_expect_fail "$SVM" 'read failed' 'read 0 4k'

# The failover, and an SVM write while it commits (128 MiB of blocks).
ctl failover
qio "$SVM" 'write -P 0x44 60M 8M'
head -c $((8 << 20)) /dev/zero | tr '\0' '\104' |
	dd of="$T/view.raw" bs=1M seek=60 conv=notrunc status=none
i=0
while [ "$(state)" = failover ]; do
	i=$((i + 1))
	[ "$i" -lt $((TDR_TIMEOUT * 20)) ] || fail "failover still running after ${TDR_TIMEOUT}s"
	sleep 0.05
done
assert_eq "state after the failover" done "$(state)"
assert_eq "get-error after the failover" none "$(ctl get-error)"
nbdcopy "$SVM" "$T/after.raw"
same_file "$T/view.raw" "$T/after.raw"

st=0
tdr_stop "$DAEMON_PID" || st=$?
assert_eq "exit status" 0 "$st"
secondary_is_view
pass "SIGKILL while replicating${SECONDARY_RAW:+ (raw secondary disk)}, restart, failover: secondary disk == SVM view"
