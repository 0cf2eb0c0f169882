#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The control socket and tdr-ctl: `tapdisk-replica serve --control` and
# `tapdisk-replica daemon`, every tdr-ctl subcommand with its exact output
# and exit status, pause holding NBD requests, and `replica ... status` on a
# disk with a replica filter.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy cmp
tdr_setup

CTL="$TDR_BUILDDIR/tools/tdr-ctl"
[ -x "$CTL" ] || fail "tdr-ctl not built: $CTL"
export TDR_CONTROL_DIR="$T"

# run_ctl EXPECTED-STATUS ARGS...: runs tdr-ctl, output in $OUT, stderr in $ERR.
run_ctl() {
	local want=$1 st=0
	shift
	"$CTL" "$@" >"$T/ctl.out" 2>"$T/ctl.err" || st=$?
	OUT=$(cat "$T/ctl.out")
	ERR=$(cat "$T/ctl.err")
	[ "$st" -eq "$want" ] || fail "tdr-ctl $*: exit status $st, expected $want; stdout '$OUT' stderr '$ERR'"
	if [ "$want" -ne 0 ]; then
		[ "$(wc -l <"$T/ctl.err")" -eq 1 ] || fail "tdr-ctl $*: stderr should be one line: '$ERR'"
	fi
}

mkrandom "$T/disk.img" 4
tdr_start --control "$T" "aio:$T/disk.img"
P=$DAEMON_PID
S="$T/ctl$P"
[ -S "$S" ] || fail "no control socket $S"
assert_eq "socket mode" 600 "$(stat -c %a "$S")"
grep -q "control socket $S (minor 0)" "$DAEMON_ERR" || fail "no control socket line in the log"
ROW="pid=$P minor=0 state=0 args=aio:$T/disk.img"

# list, with every filter.
run_ctl 0 list
assert_eq "list" "$ROW" "$OUT"
run_ctl 0 list -p "$P"
assert_eq "list -p" "$ROW" "$OUT"
run_ctl 0 list -m 0 -t aio -f "$T/disk.img"
assert_eq "list -m -t -f" "$ROW" "$OUT"
run_ctl 0 list -s "$S"
assert_eq "list -s" "$ROW" "$OUT"
run_ctl 0 list -t vhd
assert_eq "list -t vhd" "" "$OUT"
run_ctl 0 list -m 1
assert_eq "list -m 1" "" "$OUT"

# stats: one JSON object.
run_ctl 0 stats -p "$P" -m 0
"$PY" -c '
import json, sys
s = json.loads(sys.argv[1])
assert s["name"] == sys.argv[2], s["name"]
assert s["minor"] == 0 and s["state"] == 0
assert s["size"] == 8192, s["size"]
assert s["images"][0]["type"] == "aio"
assert "replica" not in s
assert s["poll"] == {"max_ns": 0, "window_ns": 0, "polls": 0, "hits": 0}, s["poll"]
d = s["images"][0]["driver"]
ra = ["readahead_" + k for k in ("streams", "hits", "misses", "deep", "chunks", "unused",
                                 "invalidated", "reading", "memory")]
assert sorted(d) == sorted(["type", "short_io_retries"] + ra), sorted(d)
assert all(d[k] == 0 for k in ra), d
' "$OUT" "aio:$T/disk.img" || fail "stats JSON: $OUT"
run_ctl 19 stats -p "$P" -m 5
assert_eq "stats -m 5" "tdr-ctl: stats of minor 5: no minor 5 in this daemon; see tap-ctl list" "$ERR"

# pause holds NBD requests until unpause.
run_ctl 0 pause -p "$P" -m 0
assert_eq "pause output" "" "$OUT"
run_ctl 0 list -p "$P"
assert_eq "list paused" "pid=$P minor=0 state=0x20 args=aio:$T/disk.img" "$OUT"
nbdcopy "$URI" "$T/copy.img" &
COPY=$!
sleep 1
kill -0 "$COPY" 2>/dev/null || fail "a read went through while the disk was paused"
run_ctl 0 stats -s "$S" -m 0
"$PY" -c 'import json, sys; s = json.loads(sys.argv[1]); assert s["held"] >= 1, s' "$OUT" ||
	fail "no held request in the stats of a paused disk: $OUT"
run_ctl 0 unpause -p "$P" -m 0
assert_eq "unpause output" "" "$OUT"
wait "$COPY" || fail "nbdcopy failed after unpause"
same_file "$T/disk.img" "$T/copy.img"
run_ctl 22 unpause -p "$P" -m 0
assert_eq "unpause twice" "tdr-ctl: unpause of minor 0: minor 0 is not paused" "$ERR"
run_ctl 0 pause -p "$P" -m 0
run_ctl 95 unpause -p "$P" -m 0 -a "aio:$T/other.img"
assert_eq "unpause -a other" "tdr-ctl: unpause of minor 0: resume with another image (aio:$T/other.img instead of aio:$T/disk.img) is not supported; close the minor and open the new image" "$ERR"
run_ctl 0 unpause -p "$P" -m 0 -a "aio:$T/disk.img"

# open is for `daemon`; attach and detach of an empty minor.
run_ctl 95 open -p "$P" -m 1 -a "aio:$T/disk.img"
assert_eq "open on serve" "tdr-ctl: open of minor 1: this daemon serves a fixed disk (tapdisk-replica serve); start tapdisk-replica daemon to open disks" "$ERR"
run_ctl 0 attach -p "$P" -m 4
run_ctl 0 list -p "$P"
assert_eq "list attached" "$ROW
pid=$P minor=4 state=0x2" "$OUT"
run_ctl 17 attach -p "$P" -m 4
assert_eq "attach twice" "tdr-ctl: attach of minor 4: minor 4 is already attached" "$ERR"
run_ctl 0 detach -p "$P" -m 4
run_ctl 16 detach -p "$P" -m 0
assert_eq "detach busy" "tdr-ctl: detach of minor 0: minor 0 has an image open (aio:$T/disk.img); close it first" "$ERR"

# replica requests on a disk without a replica filter.
run_ctl 95 replica -p "$P" -m 0 status
assert_eq "replica without filter" "tdr-ctl: replica status on minor 0: minor 0 (aio:$T/disk.img) has no replica filter; open it with a spec like replica:mode=secondary|aio:/path" "$ERR"

# Usage errors and absent daemons.
run_ctl 64 pause -m 0
assert_eq "no -p" "tdr-ctl: which daemon? give -p PID (or -s SOCKET); see tdr-ctl --help" "$ERR"
run_ctl 64 pause -p "$P"
assert_eq "no -m" "tdr-ctl: which disk? give -m MINOR; see tdr-ctl --help" "$ERR"
run_ctl 64 pause -p abc -m 0
assert_eq "bad -p" "tdr-ctl: bad -p PID 'abc': expected a number from 1 to 2147483647; see tdr-ctl --help" "$ERR"
run_ctl 64 frobnicate
assert_eq "bad command" "tdr-ctl: unknown command 'frobnicate'; see tdr-ctl --help" "$ERR"
run_ctl 64 replica -p "$P" -m 0
run_ctl 69 pause -p 999999 -m 0
assert_eq "no daemon" "tdr-ctl: cannot connect to process 999999 ($T/ctl999999): No such file or directory; is it running? see tdr-ctl list" "$ERR"

# A second daemon on the same socket is refused; the first keeps serving.
st=0
"$TDR_BIN" serve --socket "$T/other.sock" --control "$S" "aio:$T/disk.img" 2>"$T/second.err" || st=$?
assert_eq "second daemon status" 1 "$st"
line=$(one_line_error "$T/second.err")
assert_eq "second daemon" "tapdisk-replica: control socket $S is in use by a running daemon; stop it or choose another --control path" "$line"
tdr_alive

# close stops `serve` cleanly: flushed, sockets gone, exit 0.
run_ctl 0 close -p "$P" -m 0
st=0
for _ in $(seq 100); do kill -0 "$P" 2>/dev/null || break; sleep 0.05; done
wait "$P" || st=$?
assert_eq "serve exit status after close" 0 "$st"
[ ! -e "$S" ] || fail "control socket $S left behind"
grep -q "stopped; aio:$T/disk.img flushed and closed" "$DAEMON_ERR" || fail "no clean stop after close"

# `daemon`: disks come and go over the control socket.
NBD="$T/nbd"
"$TDR_BIN" daemon --nbd-dir "$NBD" </dev/null >"$T/daemon-d.out" 2>"$T/daemon-d.err" &
D=$!
TDR_PIDS+=("$D")
DAEMON_ERR="$T/daemon-d.err"
tdr_wait_ready "$D" "$T/daemon-d.err" "$T/ctl$D"
mkrandom "$T/r.img" 2
run_ctl 0 open -p "$D" -m 3 -a "aio:$T/disk.img" -R
run_ctl 0 open -p "$D" -m 1 -a "replica:mode=primary|aio:$T/r.img"
run_ctl 64 open -p "$D" -m 2
# ENOENT from the daemon: 2, not the usage error's 64 just above
run_ctl 2 open -p "$D" -m 2 -a "aio:$T/nonexistent.img"
assert_eq "open missing file" "tdr-ctl: open of minor 2: $T/nonexistent.img: no such file; create it first (e.g. truncate -s 1G $T/nonexistent.img)" "$ERR"
run_ctl 114 open -p "$D" -m 3 -a "aio:$T/disk.img"
run_ctl 0 list -p "$D"
assert_eq "daemon list" "pid=$D minor=1 state=0 args=replica:mode=primary|aio:$T/r.img
pid=$D minor=3 state=0 args=aio:$T/disk.img" "$OUT"
nbdcopy "nbd+unix:///?socket=$NBD/nbd$D.3" "$T/copy3.img" || fail "nbdcopy from minor 3"
same_file "$T/disk.img" "$T/copy3.img"

# replica requests on a replica filter.
run_ctl 0 replica -p "$D" -m 1 status
echo "$OUT" | grep -qx "mode=primary" || fail "status: no mode=primary in '$OUT'"
echo "$OUT" | grep -qx "link_errors=0" || fail "status: no link_errors in '$OUT'"
run_ctl 0 replica -s "$T/ctl$D" -m 1 status state mode
assert_eq "status KEYS" "mode=primary
state=none" "$OUT"
# A misspelt key is an error, not an empty value.
run_ctl 22 replica -p "$D" -m 1 status state stat
assert_eq "status with a bad key" "tdr-ctl: replica status on minor 1: no key 'stat'; tdr-ctl replica status alone lists them" "$ERR"
run_ctl 0 replica -p "$D" -m 1 get-error
assert_eq "get-error" "none" "$OUT"
run_ctl 22 replica -p "$D" -m 1 chekpoint
assert_eq "bad request" "tdr-ctl: replica chekpoint on minor 1: unknown request 'chekpoint'; expected one of start, checkpoint, stop, failover, resync, get-error, status" "$ERR"
run_ctl 0 replica -p "$D" -m 1 status state
assert_eq "state unchanged" "state=none" "$OUT"
run_ctl 0 stats -p "$D" -m 1
"$PY" -c '
import json, sys
s = json.loads(sys.argv[1])
assert s["replica"]["mode"] == "primary" and s["replica"]["state"] == "none", s
assert [i["type"] for i in s["images"]] == ["replica", "aio"], s["images"]
' "$OUT" || fail "replica stats: $OUT"

# -t on replica: a secondary that takes the connection and never answers
# keeps start waiting (for the link's own 60 s); tdr-ctl gives up after 1 s
# with 75 (EX_TEMPFAIL), the start going on in the daemon.
"$PY" -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
open(sys.argv[2], "w").close()
time.sleep(120)
' "$T/never.sock" "$T/never.ready" &
never=$!
for ((i = 0; i < TDR_TIMEOUT * 20; i++)); do
	[ -e "$T/never.ready" ] && break
	sleep 0.05
done
[ -e "$T/never.ready" ] || fail "the silent secondary did not start"
run_ctl 75 replica -p "$D" -m 1 -t 1 start addr=unix:$T/never.sock timeout=60000
case "$ERR" in
"tdr-ctl: replica start on minor 1: no answer from "*" within 1 s; a request it took goes on: see tdr-ctl list") ;;
*) fail "replica -t: unexpected message '$ERR'" ;;
esac
kill "$never"
wait "$never" 2>/dev/null || true
gone=0
for ((i = 0; i < TDR_TIMEOUT * 20; i++)); do
	if "$CTL" replica -p "$D" -m 1 get-error 2>/dev/null | grep -q "cannot connect to the secondary unix:$T/never.sock"; then
		gone=1
		break
	fi
	sleep 0.05
done
[ "$gone" = 1 ] || fail "the start that tdr-ctl gave up on did not fail when the secondary went away"
run_ctl 0 replica -p "$D" -m 1 status state
assert_eq "state after the silent secondary went away" "state=none" "$OUT"

run_ctl 0 close -p "$D" -m 3 -f
run_ctl 0 list -p "$D"
assert_eq "list after close" "pid=$D minor=1 state=0 args=replica:mode=primary|aio:$T/r.img" "$OUT"
[ ! -e "$NBD/nbd$D.3" ] || fail "export socket of a closed minor left behind"
tdr_stop "$D" || fail "daemon exited with status $? on SIGTERM"
[ ! -e "$T/ctl$D" ] || fail "daemon control socket left behind"
grep -q "stopped; every disk flushed and closed" "$T/daemon-d.err" || fail "daemon did not stop cleanly"

# The default control place is a directory (tap-ctl's): made if missing,
# the socket ctlPID inside it, found by tdr-ctl through the same variable.
TDR_CONTROL_DIR="$T/newctl" "$TDR_BIN" daemon --nbd-dir "$NBD" </dev/null >"$T/daemon-e.out" 2>"$T/daemon-e.err" &
E=$!
TDR_PIDS+=("$E")
tdr_wait_ready "$E" "$T/daemon-e.err" "$T/newctl/ctl$E"
assert_eq "made control directory's mode" 700 "$(stat -c %a "$T/newctl")"
OLD_CONTROL_DIR=$TDR_CONTROL_DIR
export TDR_CONTROL_DIR="$T/newctl"
run_ctl 0 list -p "$E"
assert_eq "list in the made directory" "pid=$E" "$OUT"
export TDR_CONTROL_DIR=$OLD_CONTROL_DIR
tdr_stop "$E" || fail "daemon exited with status $? on SIGTERM"
# Something else at the default place (a socket of an older daemon, a file):
# refused, not bound over.
: >"$T/notdir"
st=0
TDR_CONTROL_DIR="$T/notdir" timeout 30 "$TDR_BIN" daemon --nbd-dir "$NBD" </dev/null >/dev/null 2>"$T/notdir.err" || st=$?
assert_eq "daemon on a control place that is a file" 1 "$st"
grep -q "control directory $T/notdir: not a directory" "$T/notdir.err" ||
	fail "no clear refusal of a control place that is a file: $(cat "$T/notdir.err")"
[ -f "$T/notdir" ] || fail "the file at the control place was replaced"
pass
