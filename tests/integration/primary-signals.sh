#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The secondary is frozen (SIGSTOP) or killed (SIGKILL) under a guest
# workload: the guest's writes through the primary complete within the
# link timeout plus a margin, the primary reports the broken link, and
# after the secondary is back an incremental resync and a checkpoint make
# it byte-exact again.  Peers: tapdisk-replica's own secondary and qemu-nbd.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io qemu-nbd nbdcopy truncate cmp
tdr_setup

# Short enough to keep the test quick, long enough for a sanitizer build on a
# loaded machine to answer after it wakes (1 s was seen to time out there).
TIMEOUT_MS=3000

checkpoint_both() {
	pctl_ok checkpoint >/dev/null
	rctl "$SEC_CTL" checkpoint >/dev/null || fail "secondary checkpoint failed"
}

# --- our secondary, frozen
rm -f "$T/primary.img"
mkraw "$T/primary.img" 32M
secondary_start sec 32
primary_start "unix:$SEC_SOCK" "timeout=$TIMEOUT_MS"
pctl_ok start >/dev/null
qio "$PURI" "write -P 0x11 0 1M" flush
checkpoint_both
svm_view_same
kill -STOP "$SEC_PID"
guest_qio "$PURI" "write -P 0x12 4M 1M" "write -P 0x13 8M 64k"
log "SIGSTOP: guest writes completed in ${LAST_MS} ms"
assert_eq "SIGSTOP: state" broken "$(pstatus state)"
assert_eq "SIGSTOP: error" ETIMEDOUT "$(pstatus error)"
qio "$PURI" "write -P 0x14 12M 64k" "read -P 0x12 4M 1M"
kill -CONT "$SEC_PID"
# Requests the frozen secondary had queued are applied when it wakes; let it
# drop the old connection before resyncing over them.
sleep 1
pctl_ok resync incremental >/dev/null
wait_pstate running
checkpoint_both
svm_view_same
log "SIGSTOP: byte-exact after resync"

# --- our secondary, killed and restarted on the same disks
kill -KILL "$SEC_PID"
wait "$SEC_PID" 2>/dev/null || true
guest_qio "$PURI" "write -P 0x21 16M 2M" "write -P 0x22 20M 4k"
log "SIGKILL: guest writes completed in ${LAST_MS} ms"
assert_eq "SIGKILL: state" broken "$(pstatus state)"
ge=$(pctl_ok get-error)
case $ge in *"link dropped"*) ;; *) fail "SIGKILL: get-error says '$ge'" ;; esac
secondary_start sec 32
pctl_ok resync incremental >/dev/null
wait_pstate running
checkpoint_both
svm_view_same
log "SIGKILL: byte-exact after restart and resync"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"

# --- qemu-nbd, killed and restarted
rm -f "$T/primary.img"
mkraw "$T/primary.img" 32M
mkraw "$T/q.img" 32M
qemu_nbd_start "$T/q.sock" "$T/q.img"
qpid=$PEER_PID
primary_start "unix:$T/q.sock" "timeout=$TIMEOUT_MS"
pctl_ok start >/dev/null
qio "$PURI" "write -P 0x31 0 3M" flush
pctl_ok checkpoint >/dev/null
kill -KILL "$qpid"
wait "$qpid" 2>/dev/null || true
guest_qio "$PURI" "write -P 0x32 1M 1M" "write -P 0x33 30M 64k"
assert_eq "qemu-nbd SIGKILL: state" broken "$(pstatus state)"
qemu_nbd_start "$T/q.sock" "$T/q.img"
pctl_ok resync >/dev/null
wait_pstate running
pctl_ok checkpoint >/dev/null
same_as_primary "$T/q.img"
pass "frozen and killed secondaries never held the guest; resync made them byte-exact"
