#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# SIGTERM to a secondary right after `failover`: the daemon must stop the
# commit, wait for its copies in flight (closing under them would let the
# kernel write into freed memory), flush, and exit 0; nothing is lost.  If
# the failover was interrupted (the usual case here: 192 MiB to commit),
# get-error's offline recipe (vhd-util coalesce of active, then of hidden)
# must make the secondary disk the SVM's view; if it finished first, the
# secondary disk must already be that view.  The interruption itself is
# tested deterministically by the unit test close_during_failover.
. "$(dirname "$0")/lib.sh"

need_cmd qemu-io qemu-img nbdcopy
tdr_setup

# 128 MiB from the primary (each first copied into hidden), 64 MiB by the SVM.
secondary_with_view 256 128 128 64

ctl failover
st=0
tdr_stop "$DAEMON_PID" || st=$?
assert_eq "exit status after SIGTERM during failover" 0 "$st"
grep -q 'closed with' "$DAEMON_ERR" && fail "an image closed with I/O in flight: $(grep 'closed with' "$DAEMON_ERR")"
if grep -q 'failover interrupted by a close' "$DAEMON_ERR"; then
	outcome="interrupted"
	recipe=$(sed -n 's/.*commit offline with \(vhd-util coalesce .*\)$/\1/p' "$DAEMON_ERR")
	[ -n "$recipe" ] || fail "the interruption's message gives no recipe: $(grep interrupted "$DAEMON_ERR")"
	"$VHDUTIL" coalesce -n "$T/active.vhd"
	"$VHDUTIL" coalesce -n "$T/hidden.vhd"
else
	grep -q 'failover done' "$DAEMON_ERR" || fail "failover neither done nor interrupted: $(tail -5 "$DAEMON_ERR")"
	outcome="finished before the signal"
fi
secondary_is_view
pass "SIGTERM during failover ($outcome): clean exit, secondary disk == SVM view"
