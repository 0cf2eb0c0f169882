#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The replica driver in secondary mode, end to end with real clients: a VHD
# chain made by vhd-util, the daemon serving the SVM's view and the secondary
# disk's export, qemu-io as the primary and as the SVM, tdr-ctl for the
# operations, and byte-exact checks of the SVM's view, of each layer and of
# the secondary disk after failover (read back with qemu-img, which knows
# nothing of our code).
. "$(dirname "$0")/lib.sh"

need_cmd qemu-io qemu-img nbdcopy
tdr_setup

secondary_chain 32

# Before start: SVM I/O fails, the primary's writes fill the secondary disk.
qio_expect_fail "$SVM" 'Input/output error' 'read 0 4k'
qio "$EXPURI" 'write -P 0x11 0 8M'
assert_eq "state before start" none "$(state)"
ctl start
assert_eq "state after start" running "$(state)"
qio "$SVM" 'read -P 0x11 0 8M'

# A primary write: the SVM keeps the checkpoint's content.
qio "$EXPURI" 'write -P 0x22 1M 1M'
qio "$SVM" 'read -P 0x11 1M 1M'
qio "$EXPURI" 'read -P 0x22 1M 1M'

# An SVM write, then read.
qio "$SVM" 'write -P 0x33 3M 512k' 'read -P 0x33 3M 512k'
qio "$EXPURI" 'read -P 0x11 3M 512k'

# Checkpoint: the primary's data, not the SVM's.
ctl checkpoint
qio "$SVM" 'read -P 0x22 1M 1M' 'read -P 0x11 3M 512k'
ctl status | grep -qx 'checkpoints=1' || fail "status does not count the checkpoint: $(ctl status)"

# Writes on both sides since the checkpoint, then failover.
qio "$SVM" 'write -P 0x44 2M 1M'
qio "$EXPURI" 'write -P 0x55 0 64k' 'write -P 0x66 2M 4k'
nbdcopy "$SVM" "$T/view.raw"
ctl failover
i=0
while [ "$(state)" = failover ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
assert_eq "state after failover" done "$(state)"
qio_expect_fail "$EXPURI" 'Operation not permitted' 'write -P 0x77 0 4k'
ctl get-error | grep -qx 'none' || fail "get-error after a clean failover: $(ctl get-error)"

# Operations after done are refused precisely, with the errno as exit status.
st=0; ctl checkpoint 2>"$T/ck.err" || st=$?
assert_eq "checkpoint after done: exit status (EINVAL)" 22 "$st"
grep -q 'state done' "$T/ck.err" || fail "checkpoint after done: $(cat "$T/ck.err")"

tdr_stop "$DAEMON_PID"
# The secondary disk, read by qemu, is exactly what the SVM saw.
secondary_is_view
pass "secondary flow${SECONDARY_RAW:+ over a raw secondary disk}: sync, start, copy-before-write, checkpoint, failover; secondary disk == SVM view"
