#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The real-Xen tests, run in dom0 (through hostchroot, see run.sh) against
# the real xenstored.  Every replica operation goes through xenstore writes
# only (xsreq: write request/ID, wait for response/ID); data goes through
# NBD (nbdio, nbdcopy) and is checked byte for byte.
#
# Groups (the share's "groups" file: "all" or a list):
#   secondary  start, primary writes, checkpoint, SVM writes, bad requests,
#              failover with requests arriving during it, the secondary
#              disk verified byte for byte; then a daemon restarted while
#              replicating and a failover from state none
#   primary    start, link failure (writes go on, state broken), resync,
#              both disks identical
#   restart    the daemon restarts: requests written meanwhile executed once,
#              old ids refused
#   freeze     xenstored SIGSTOPped for 10 s under a guest-like workload
#   xsrestart  xenstored killed and restarted under the same workload
#   bench      (with BENCH=N) the control round trip vs bare xenstore
#
# Output: one "PASS name" or "FAIL name: why" line per check, "TIME group
# N s" per group; the exit status is the number of failures (0: all passed).

set -u
S=/run/host0
B=$S/bin
T=/tmp/tdr
TDR=$B/tapdisk-replica
FAILS=0
GROUPS_=$(cat $S/groups 2>/dev/null || echo all)
BENCH_N=$(cat $S/bench 2>/dev/null || echo 0)
mkdir -p $T

finish() {
	# Tells run.sh (in dom0) that we are done, whatever happened.
	echo "exit $FAILS" >/run/tdr-cmd
}
trap finish EXIT

pass() { echo "PASS $1"; }
fail() {
	echo "FAIL $1: $2"
	FAILS=$((FAILS + 1))
}
info() { echo "INFO $*"; }

# check NAME CMD...: PASS if CMD succeeds, else FAIL with its output.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		pass "$name"
	else
		fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
	fi
}

# expect NAME DIR ID LINE PREFIX: the request's response starts with PREFIX.
expect() {
	local name=$1 dir=$2 id=$3 line=$4 want=$5 r
	r=$($B/xsreq call "$dir" "$id" "$line" 20000 2>&1)
	if [[ $r == "$want"* ]]; then
		pass "$name"
	else
		fail "$name" "request $id '$line': response '$r', expected '$want...'"
	fi
}

# wait_key NAME KEY VALUE [MS]
wait_key() {
	local r
	if r=$($B/xsreq wait "$2" "$3" "${4:-20000}"); then
		pass "$1"
	else
		fail "$1" "$r"
	fi
}

xsdo() {
	# Asks run.sh (dom0) to do what the chroot cannot.  Builtins only: a
	# process start costs the emulated dom0 tens of milliseconds, which
	# would show up in the workload's gaps.
	echo "$1" >/run/tdr-cmd
	read -r XSDO_ACK </run/tdr-ack
}

# bsleep SECONDS: sleep without starting a process.
mkfifo $T/sleep.fifo 2>/dev/null
exec 9<>$T/sleep.fifo
bsleep() { read -r -t "$1" -u 9 _ || true; }

want_group() { [ "$GROUPS_" = all ] || [[ " $GROUPS_ " == *" $1 "* ]]; }

# logged FILE WORD: FILE has a line with WORD (builtins only, no process).
logged() {
	local line
	[ -f "$1" ] || return 1
	while IFS= read -r line; do
		[[ $line == *"$2"* ]] && return 0
	done <"$1"
	return 1
}

# start_daemon NAME ARGS...: serve in the background, wait for "serving".
start_daemon() {
	local name=$1 i pid
	shift
	# A previous instance's log would say "serving" before this one does.
	: >$T/$name.log
	${NICE:-} "$TDR" serve --pid-file $T/$name.pid "$@" >>$T/$name.log 2>&1 &
	pid=$!
	eval "PID_$name=$pid"
	for ((i = 0; i < 400; i++)); do
		logged $T/$name.log 'serving ' && return 0
		kill -0 "$pid" 2>/dev/null || break
		bsleep 0.05
	done
	fail "$name-start" "$(tail -n 3 $T/$name.log | tr '\n' ' ')"
	return 1
}

stop_daemon() {
	local pid
	pid=$(eval echo "\${PID_$1:-}")
	[ -n "$pid" ] || return 0
	kill -TERM "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	eval "PID_$1="
}

# mkexpected FILE SIZE_MB OFF:LEN:BYTE...: the image a disk should equal.
mkexpected() {
	python3 - "$@" <<'EOF'
import sys
path, size = sys.argv[1], int(sys.argv[2]) << 20
def num(s):
    m = {'K': 1 << 10, 'M': 1 << 20}
    return int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s, 0)
with open(path, 'wb') as f:
    f.truncate(size)
    for w in sys.argv[3:]:
        off, ln, b = w.split(':')
        f.seek(num(off))
        f.write(bytes([int(b, 0)]) * num(ln))
EOF
}

# ------------------------------------------------------------------ secondary
# sec_chain CHECK: a fresh 64 MiB chain, active over hidden over sec.vhd.
sec_chain() {
	rm -f $T/sec.vhd $T/hidden.vhd $T/active.vhd
	check "$1" bash -c "$B/vhd-util create -n $T/sec.vhd -s 64 &&
		$B/vhd-util snapshot -n $T/hidden.vhd -p $T/sec.vhd &&
		$B/vhd-util snapshot -n $T/active.vhd -p $T/hidden.vhd"
}

# start_sec: the secondary daemon on that chain, controlled through xenstore.
start_sec() {
	start_daemon sec --socket $T/svm.sock --xs-domid 1 --xs-devid 51712 \
		"replica:mode=secondary,addr=unix:$T/sec.sock|vhd:$T/active.vhd"
}

group_secondary() {
	local D=/local/domain/0/backend/tapdisk-replica/1/51712 perms
	sec_chain sec-vhd-chain
	start_sec || return
	wait_key sec-published $D/state none
	# Dom0 only: every node of the control directory is "n0".
	perms=$(xenstore-ls -p $D 2>&1 | grep -v '(n0)' | head -3)
	if [ -z "$perms" ] && xenstore-ls -p $D | grep -q '(n0)'; then pass sec-perms-dom0-only
	else fail sec-perms-dom0-only "$perms"; fi

	expect sec-bad-secondary-addr $D 1 "start addr=unix:/x" "error EINVAL"
	expect sec-start $D 2 "start" ok
	wait_key sec-running $D/state running
	check sec-primary-writes $B/nbdio $T/sec.sock secondary w:0:64K:0xaa w:1M:4K:0xbb f
	check sec-svm-sees-last-checkpoint $B/nbdio $T/svm.sock "" r:0:64K:0 r:1M:4K:0
	expect sec-checkpoint $D 7 "checkpoint" ok
	wait_key sec-checkpoint-counted $D/stats/checkpoints 1
	check sec-svm-sees-primary-writes $B/nbdio $T/svm.sock "" r:0:64K:0xaa r:1M:4K:0xbb
	check sec-svm-writes $B/nbdio $T/svm.sock "" w:2M:4K:0xcc w:0:4K:0xdd f
	check sec-primary-writes-after $B/nbdio $T/sec.sock secondary w:3M:4K:0xee w:1M:4K:0x55 f
	check sec-svm-view $B/nbdio $T/svm.sock "" r:0:4K:0xdd r:4K:60K:0xaa r:1M:4K:0xbb \
		r:2M:4K:0xcc r:3M:4K:0

	# Bad input: precise errors, nothing changes, the daemon keeps serving.
	expect sec-bad-unknown-word $D 8 "frobnicate" "error EINVAL"
	expect sec-bad-extra-arg $D 9 "checkpoint now" "error EINVAL"
	expect sec-bad-missing-value $D 10 "start mode=" "error EINVAL"
	expect sec-bad-out-of-range $D 11 "start timeout=99999999999" "error EINVAL"
	expect sec-bad-resync-on-secondary $D 12 "resync full" "error ENOTSUP"
	expect sec-bad-duplicate-id $D 9 "checkpoint" "error EALREADY"
	expect sec-bad-id $D abc "checkpoint" "error EINVAL bad request id"
	expect sec-bad-nonprintable $D 13 "$(printf 'check\001point')" "error EINVAL"
	wait_key sec-bad-changed-nothing $D/stats/checkpoints 1 2000
	wait_key sec-bad-still-running $D/state running 2000
	check sec-bad-still-serving $B/nbdio $T/svm.sock "" r:0:4K:0xdd

	# Failover, with requests arriving back to back while it runs.
	xenstore-write $D/request/20 failover $D/request/21 checkpoint $D/request/22 "stop"
	wait_key sec-failover-answered $D/response/20 "ok" 20000
	local r11 r12
	$B/xsreq wait $D/last-id 22 10000 >/dev/null
	r11=$(xenstore-read $D/response/21 2>/dev/null)
	r12=$(xenstore-read $D/response/22 2>/dev/null)
	# Each is refused with the state it met: failover (EBUSY) while the
	# commit runs, done (EINVAL) after it; executed in ID order, so 22
	# never meets an earlier state than 21.
	local fo="the secondary is in state failover" dn="the secondary is in state done"
	case "$r11|$r12" in
	"error EBUSY checkpoint refused: $fo|error EBUSY stop refused: $fo" | \
	"error EBUSY checkpoint refused: $fo|error EINVAL stop refused: $dn" | \
	"error EINVAL checkpoint refused: $dn|error EINVAL stop refused: $dn")
		pass sec-requests-during-failover ;;
	*)	fail sec-requests-during-failover "21: '$r11' 22: '$r12'" ;;
	esac
	wait_key sec-failover-done $D/state done 30000
	local pd pt
	pd=$(xenstore-read $D/progress_done)
	pt=$(xenstore-read $D/progress_total)
	# Something was committed (the SVM's and the primary's writes), all of it.
	if [[ $pt =~ ^[1-9][0-9]*$ ]] && [ "$pd" = "$pt" ]; then pass sec-failover-progress
	else fail sec-failover-progress "'$pd' of '$pt'"; fi
	check sec-after-failover-view $B/nbdio $T/svm.sock "" r:0:4K:0xdd r:4K:60K:0xaa r:1M:4K:0xbb \
		r:2M:4K:0xcc r:3M:4K:0
	stop_daemon sec

	# The secondary disk itself now holds the SVM's view, byte for byte.
	mkexpected $T/sec-expected.img 64 0:64K:0xaa 0:4K:0xdd 1M:4K:0xbb 2M:4K:0xcc
	start_daemon secdisk --socket $T/secdisk.sock "vhd:$T/sec.vhd" || return
	rm -f $T/sec-actual.img
	nbdcopy "nbd+unix:///?socket=$T/secdisk.sock" $T/sec-actual.img
	stop_daemon secdisk
	check sec-disk-byte-exact cmp $T/sec-expected.img $T/sec-actual.img

	# A secondary daemon stopped while it replicates and started again on
	# its chain (state none), then asked through xenstore to fail over: it
	# commits what the bitmaps of active and hidden hold.
	sec_chain sec-restart-chain
	start_sec || return
	wait_key sec-restart-published $D/state none
	expect sec-restart-start $D 30 "start" ok
	check sec-restart-primary-writes $B/nbdio $T/sec.sock secondary w:0:64K:0xaa f
	check sec-restart-svm-writes $B/nbdio $T/svm.sock "" w:1M:4K:0xcc f
	stop_daemon sec
	start_sec || return
	wait_key sec-restart-state-none $D/state none
	expect sec-restart-failover $D 31 "failover" ok
	wait_key sec-restart-failover-done $D/state done 30000
	check sec-restart-view $B/nbdio $T/svm.sock "" r:0:64K:0 r:1M:4K:0xcc r:2M:4K:0
	stop_daemon sec
	mkexpected $T/sec-expected2.img 64 1M:4K:0xcc
	start_daemon secdisk --socket $T/secdisk.sock "vhd:$T/sec.vhd" || return
	rm -f $T/sec-actual2.img
	nbdcopy "nbd+unix:///?socket=$T/secdisk.sock" $T/sec-actual2.img
	stop_daemon secdisk
	check sec-restart-disk-byte-exact cmp $T/sec-expected2.img $T/sec-actual2.img
}

# -------------------------------------------------------------------- primary
group_primary() {
	local D=/tdr/primary
	rm -f $T/p.img $T/s.img
	truncate -s 64M $T/p.img $T/s.img
	start_daemon psec --socket $T/p-sec.sock --export-name secondary "aio:$T/s.img" || return
	start_daemon pri --socket $T/pvm.sock --xs-dir $D \
		"replica:mode=primary,addr=unix:$T/p-sec.sock,timeout=1000|aio:$T/p.img" || return
	wait_key pri-published $D/state none
	expect pri-bad-addr $D 1 "start mode=primary addr=smoke:signals" "error EINVAL"
	expect pri-start $D 2 "start mode=primary addr=unix:$T/p-sec.sock" ok
	wait_key pri-running $D/state running
	check pri-writes $B/nbdio $T/pvm.sock "" w:0:64K:0x11 w:5M:8K:0x12 f
	expect pri-checkpoint $D 3 "checkpoint" ok
	check pri-on-secondary $B/nbdio $T/p-sec.sock secondary r:0:64K:0x11 r:5M:8K:0x12

	# Link failure: the secondary vanishes; guest writes go on.
	kill -KILL "$PID_psec"; wait "$PID_psec" 2>/dev/null; PID_psec=
	check pri-writes-without-link $B/nbdio $T/pvm.sock "" w:1M:64K:0x22 w:6M:4K:0x23 f
	wait_key pri-broken $D/state broken 10000
	local dirty i
	# Statistics are published every second.
	for ((i = 0; i < 30; i++)); do
		dirty=$(xenstore-read $D/stats/dirty_bytes)
		[ "${dirty:-0}" -gt 0 ] && break
		sleep 0.1
	done
	[ "${dirty:-0}" -gt 0 ] && pass pri-dirty-tracked || fail pri-dirty-tracked "dirty_bytes=$dirty"
	check pri-still-serving $B/nbdio $T/pvm.sock "" r:1M:64K:0x22

	# The secondary comes back: resync.
	start_daemon psec --socket $T/p-sec.sock --export-name secondary "aio:$T/s.img" || return
	expect pri-start-again $D 4 "start" ok
	expect pri-resync $D 5 "resync incremental" ok
	wait_key pri-resynced $D/state running 30000
	check pri-writes-after $B/nbdio $T/pvm.sock "" w:2M:4K:0x33 f
	expect pri-checkpoint-after $D 6 "checkpoint" ok
	stop_daemon pri
	stop_daemon psec
	check pri-disks-identical cmp $T/p.img $T/s.img
}

# -------------------------------------------------------------------- restart
group_restart() {
	local D=/tdr/restart
	rm -f $T/r.img
	truncate -s 16M $T/r.img
	start_daemon rst --socket $T/r.sock --xs-dir $D \
		"replica:mode=primary,addr=unix:$T/nowhere.sock|aio:$T/r.img" || return
	expect rst-first $D 1 "status" ok
	expect rst-second $D 2 "get-error" ok
	stop_daemon rst
	# Written while no daemon runs: executed once by the next one.
	xenstore-write $D/request/3 "status" $D/request/4 "frobnicate"
	start_daemon rst --socket $T/r.sock --xs-dir $D \
		"replica:mode=primary,addr=unix:$T/nowhere.sock|aio:$T/r.img" || return
	wait_key rst-pending-executed $D/response/3 ok
	wait_key rst-pending-refused $D/last-id 4
	expect rst-old-id-refused $D 2 "status" "error EALREADY"
	expect rst-new-id $D 5 "status" ok
	stop_daemon rst
}

# load_under NAME SECONDS ACTION...: the guest-like workload while ACTION
# runs. The property checked is behavioural, by counting, not timing: guest
# I/O completes while xenstored is unavailable. ACTION causes the outage
# and sets OUTAGE_OPS to the operations the workload completed during it
# (read from the workload's count file); a daemon that waited on xenstored
# would complete none. ACTION "nothing": the baseline,
# reported for comparison only.
load_under() {
	local name=$1 secs=$2 out
	shift 2
	LOAD_COUNT=$T/load-$name.count
	rm -f "$LOAD_COUNT"
	OUTAGE_OPS=
	nice -n -10 $B/nbdio $T/l.sock "" load "$secs" 16 "$LOAD_COUNT" >$T/load-$name.out 2>&1 &
	local lp=$!
	bsleep 1
	"$@"
	wait $lp
	local st=$?
	out=$(cat $T/load-$name.out)
	info "$name: $out"
	if [ $st -ne 0 ] || ! grep -q '^LOAD ops=' <<<"$out"; then
		fail "$name-io-completes" "status $st, $out"
	elif [ -z "$OUTAGE_OPS" ]; then
		pass "$name-io-completes (for comparison)"
	elif [ "$OUTAGE_OPS" -gt 0 ]; then
		pass "$name-io-not-held-by-xenstored ($OUTAGE_OPS operations completed during the outage)"
	else
		fail "$name-io-not-held-by-xenstored" "no operation completed during the outage: $out"
	fi
}

# load_ops: the operations the running workload has completed so far.
load_ops() {
	local n
	n=$(tr -dc 0-9 <"$LOAD_COUNT" 2>/dev/null)
	echo "${n:-0}"
}

# The count starts 3 s into each outage, past the daemon's 1 s statistics
# period: a daemon that blocked at its next xenstore write would have done
# that write by then, and complete nothing after it.
freeze_xsd() {
	local pid c0
	read -r pid </run/xen/xenstored.pid
	kill -STOP "$pid"
	info "xenstored ($pid) stopped"
	bsleep 3
	c0=$(load_ops)
	bsleep 7
	OUTAGE_OPS=$(($(load_ops) - c0))
	kill -CONT "$pid"
	info "xenstored ($pid) continued"
}

restart_xsd() {
	local c0
	xsdo kill-xsd
	info "xenstored: $XSDO_ACK"
	bsleep 3
	c0=$(load_ops)
	bsleep 2
	OUTAGE_OPS=$(($(load_ops) - c0))
	xsdo start-xsd
	info "xenstored: $XSDO_ACK"
}

nothing() { bsleep 3; }

start_load_daemon() {
	local D=$1
	rm -f $T/l.img
	truncate -s 16M $T/l.img
	NICE="nice -n -10" start_daemon load --socket $T/l.sock --xs-dir $D \
		"replica:mode=primary,addr=unix:$T/nowhere.sock|aio:$T/l.img"
}

group_freeze() {
	local D=/tdr/freeze
	start_load_daemon $D || return
	expect frz-before $D 1 "status" ok
	# The same workload undisturbed, for comparison.
	load_under baseline 5 nothing
	load_under frz 14 freeze_xsd
	# Served afterwards, over the same connection.
	expect frz-after $D 2 "get-error" ok
	expect frz-after-2 $D 3 "status" ok
	stop_daemon load
}

group_xsrestart() {
	local D=/tdr/xsrestart
	start_load_daemon $D || return
	expect xsr-before $D 1 "status" ok
	load_under xsr 10 restart_xsd
	# The daemon reconnected, set up its directory again and republished.
	wait_key xsr-republished $D/state none 10000
	local perms
	perms=$(xenstore-ls -p $D 2>&1 | grep -v '(n0)' | head -3)
	[ -z "$perms" ] && pass xsr-perms-again || fail xsr-perms-again "$perms"
	expect xsr-after $D 2 "status" ok
	expect xsr-old-id $D 1 "status" "error EALREADY"
	stop_daemon load
}

group_bench() {
	local D=/local/domain/0/backend/tapdisk-replica/3/768 out
	[ "$BENCH_N" -gt 0 ] || return 0
	rm -f $T/b*.vhd
	$B/vhd-util create -n $T/bs.vhd -s 64 && $B/vhd-util snapshot -n $T/bh.vhd -p $T/bs.vhd &&
		$B/vhd-util snapshot -n $T/ba.vhd -p $T/bh.vhd
	start_daemon bench --socket $T/b.sock --xs-domid 3 --xs-devid 768 \
		"replica:mode=secondary,addr=unix:$T/bsec.sock|vhd:$T/ba.vhd" || return
	expect bench-start $D 1 "start" ok
	# A request the replica answers at once (the protocol alone), then
	# checkpoints (the protocol plus the secondary's checkpoint).
	out=$($B/xsreq bench $D 100 "$BENCH_N" status 2>&1)
	echo "$out"
	[[ $out == BENCH* ]] && pass bench-status || fail bench-status "$out"
	out=$($B/xsreq bench $D 100000 "$BENCH_N" checkpoint 2>&1)
	echo "$out"
	[[ $out == BENCH* ]] && pass bench-checkpoint || fail bench-checkpoint "$out"
	# The floor: a minimal libxenstore responder in place of the daemon.
	$B/xsreq echo /tdr/echo "$BENCH_N" &
	local ep=$!
	bsleep 0.5
	out=$($B/xsreq bench /tdr/echo 1 "$BENCH_N" status 2>&1)
	echo "${out/BENCH control status/BENCH minimal-responder status}"
	wait $ep
	[[ $out == BENCH* ]] && pass bench-echo || fail bench-echo "$out"
	local n tot
	n=$(xenstore-read $D/stats/checkpoints)
	tot=$(xenstore-read $D/stats/ckpt_total_ns)
	echo "BENCH secondary checkpoint execution itself (stats): $n checkpoints, mean $(awk -v t="$tot" -v n="$n" 'BEGIN { printf "%.3f", n ? t / n / 1e6 : 0 }') ms"
	stop_daemon bench
}

T_ALL=$SECONDS
for g in secondary primary restart freeze xsrestart bench; do
	want_group $g || continue
	t0=$SECONDS
	info "group $g"
	f0=$FAILS
	group_$g
	echo "TIME group $g $((SECONDS - t0)) s"
	if [ $FAILS -ne $f0 ]; then
		for l in $T/*.log; do
			echo "INFO ---- $l (last 15 lines)"
			tail -n 15 "$l" | sed 's/^/INFO   /'
		done
	fi
	rm -f $T/*.log
done
echo "TIME all groups $((SECONDS - T_ALL)) s, $FAILS failure(s)"
