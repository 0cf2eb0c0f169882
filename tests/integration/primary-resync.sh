#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Resync, counted on the wire (nbdkit's log filter in front of the secondary):
#  1. after an outage, an incremental resync sends exactly the dirty ranges
#     and the secondary ends byte-identical;
#  2. a full resync of a sparse image sends its data and zeroes its holes
#     without payload (the secondary starts full of junk);
#  progress is reported and ends at its total.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io nbdkit truncate cmp dd
tdr_setup

# --- 1. incremental
mkraw "$T/primary.img" 64M
mkraw "$T/sec.img" 64M
nbdkit_start "$T/sec.sock" "$T/sec.img" --filter=log "logfile=$T/log1"
npid=$PEER_PID
primary_start "unix:$T/sec.sock" timeout=1000
pctl_ok start >/dev/null
qio "$PURI" "write -P 0x41 0 8M" "write -P 0x42 32M 1M" flush
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
kill -KILL "$npid"
wait "$npid" 2>/dev/null || true
# The outage: 4k in chunk 1, 64k straddling chunks 32-33, 1 MiB = 16 chunks.
qio "$PURI" "write -P 0x43 64k 4k" "write -P 0x44 2080k 64k" "write -P 0x45 40M 1M" flush
assert_eq "outage: state" broken "$(pstatus state)"
dirty=$(pstatus dirty_bytes)
assert_eq "dirty bytes" $(((1 + 2 + 16) * 65536)) "$dirty"
nbdkit_start "$T/sec.sock" "$T/sec.img" --filter=log "logfile=$T/log2"
pctl_ok resync incremental >/dev/null
wait_pstate running
pctl_ok checkpoint >/dev/null
assert_eq "incremental: bytes written on the wire" "$dirty" "$(nbdkit_log_bytes "$T/log2" Write)"
assert_eq "incremental: progress_total" "$dirty" "$(pstatus progress_total)"
assert_eq "incremental: progress_done" "$dirty" "$(pstatus progress_done)"
assert_eq "incremental: dirty after" 0 "$(pstatus dirty_bytes)"
same_as_primary "$T/sec.img"
log "incremental: $dirty bytes on the wire, byte-identical"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
kill -KILL "$PEER_PID"
wait "$PEER_PID" 2>/dev/null || true

# --- 2. full, sparse: 3 MiB + 64 KiB of data in 256 MiB; the secondary holds junk
rm -f "$T/primary.img" "$T/sec.img"
mkraw "$T/primary.img" 256M
dd if=/dev/urandom of="$T/primary.img" bs=1M count=1 conv=notrunc status=none
dd if=/dev/urandom of="$T/primary.img" bs=64k count=1 seek=160 conv=notrunc status=none
dd if=/dev/urandom of="$T/primary.img" bs=1M count=2 seek=200 conv=notrunc status=none
head -c 256M /dev/urandom >"$T/sec.img"
nbdkit_start "$T/sec.sock" "$T/sec.img" --filter=log "logfile=$T/log3"
primary_start "unix:$T/sec.sock"
pctl_ok start >/dev/null
pctl_ok resync full >/dev/null
wait_pstate running
pctl_ok checkpoint >/dev/null
data=$((3 * 1048576 + 65536))
assert_eq "full: bytes written" "$data" "$(nbdkit_log_bytes "$T/log3" Write)"
assert_eq "full: bytes zeroed" $((256 * 1048576 - data)) "$(nbdkit_log_bytes "$T/log3" Zero)"
assert_eq "full: progress" $((256 * 1048576)) "$(pstatus progress_done)"
same_as_primary "$T/sec.img"
pass "incremental resync sent only the dirty ranges; full resync skipped the holes"
