#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The replication demo (tools/replication-demo, what `tools/quickstart demo`
# runs) as a test, shortened to three checkpoints: fio through the primary,
# checkpoints, SVM writes, the SVM's view against the PVM's disk after the
# last checkpoint, PVM and SVM writes after it, the primary killed,
# failover, and its own byte-exact check of secondary.vhd (read by
# qemu-img) against the SVM's view.  The disk is 256 MiB so that
# the VHD files grow past their first footer steps.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io qemu-img nbdcopy fio cmp
tdr_setup

st=0
SIZE_MIB=256 ROUNDS=3 INTERVAL=1 bash "$TDR_SRCDIR/tools/replication-demo" "$TDR_BUILDDIR" "$T/demo" \
	>"$T/demo.out" 2>&1 || st=$?
[ "$st" -eq 0 ] || fail "the demo exited with $st: $(tail -n 20 "$T/demo.out")"
grep -q '^replication demo: OK$' "$T/demo.out" || fail "no OK line: $(tail -n 5 "$T/demo.out")"
grep -q 'after the last checkpoint: SVM view == PVM disk, byte-exact, 256 MiB' "$T/demo.out" ||
	fail "no checkpoint comparison line: $(tail -n 12 "$T/demo.out")"
grep -q 'secondary.vhd (read by qemu-img) == SVM view: byte-exact, 256 MiB' "$T/demo.out" ||
	fail "no byte-exact line: $(tail -n 12 "$T/demo.out")"
committed=$(sed -n 's/^    failover: \([0-9]*\) bytes committed.*/\1/p' "$T/demo.out")
# The ranges written after the last checkpoint: by the PVM 4 MiB (their
# checkpoint content, in hidden), by the SVM 1 MiB inside them and 64 KiB
# elsewhere (in active).
assert_eq "bytes committed at failover" $((4 * 1048576 + 65536)) "$committed"
pass "three checkpoints, failover, secondary.vhd == SVM view"
