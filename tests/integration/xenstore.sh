#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The daemon's xenstore control directory (--xs-dir) driven by the real
# libxenstore clients (xenstore-write/-read/-ls) against the unit tests'
# in-memory xenstored (no Xen needed): requests and responses, bad input,
# permissions, a disk without a replica, daemon restart with a request
# queued meanwhile, xenstored losing its contents.  tests/xen/run does the
# same and more on real Xen.
. "$(dirname "$0")/lib.sh"

need_cmd xenstore-write
need_cmd xenstore-read
need_cmd xenstore-ls
FAKE=$TDR_BUILDDIR/tests/unit/fake-xenstored
[ -x "$FAKE" ] || skip "$FAKE not built (configure found no libxenstore?)"
tdr_setup

"$FAKE" "$T/xs.sock" 2>"$T/fake.err" &
FAKE_PID=$!
TDR_PIDS+=("$FAKE_PID")
for _ in $(seq 100); do [ -S "$T/xs.sock" ] && break; sleep 0.05; done
export XENSTORED_PATH=$T/xs.sock

# get KEY: its value, or nothing.
get() { xenstore-read "$1" 2>/dev/null || true; }

# waitkey KEY VALUE: until KEY reads VALUE (10 s).
waitkey() {
	local i
	for ((i = 0; i < 200; i++)); do
		[ "$(get "$1")" = "$2" ] && return 0
		sleep 0.05
	done
	fail "$1 is '$(get "$1")', expected '$2'"
}

# call DIR ID LINE PREFIX: the response to the request starts with PREFIX.
call() {
	local r i
	xenstore-rm "$1/response/$2" 2>/dev/null || true
	xenstore-write "$1/request/$2" "$3"
	for ((i = 0; i < 200; i++)); do
		r=$(get "$1/response/$2")
		[ -n "$r" ] && break
		sleep 0.05
	done
	[[ $r == "$4"* ]] || fail "request $2 '$3': response '$r', expected '$4...'"
	log "request $2 '$3' -> $r"
}

D=/tdr/it
mkraw "$T/d.img" 16M
SPEC="replica:mode=primary,addr=unix:$T/nowhere.sock|aio:$T/d.img"
tdr_start --xs-dir $D --xs-path "$T/xs.sock" "$SPEC"
waitkey $D/state none
waitkey $D/mode primary
[ "$(get $D/stats/checkpoints)" = 0 ] || sleep 1.2
assert_eq stats/checkpoints 0 "$(get $D/stats/checkpoints)"
other=$(xenstore-ls -p $D | grep -v '(n0)' || true)
[ -z "$other" ] || fail "keys not dom0-only: $other"

call $D 1 status ok
call $D 2 get-error "ok none"
call $D 3 frobnicate "error EINVAL"
call $D 4 "checkpoint now" "error EINVAL"
call $D 5 "start timeout=99999999999" "error EINVAL"
call $D 6 "resync sideways" "error EINVAL"
call $D 1 status "error EALREADY"
call $D abc status "error EINVAL bad request id"
call $D 7 "checkpoint" "error EINVAL"	# a primary that never started
waitkey $D/last-id 7
waitkey $D/state none
tdr_alive "$DAEMON_PID" || fail "the daemon died on bad input"

# Back to back: all answered, in order.
xenstore-write $D/request/8 status $D/request/9 get-error $D/request/10 status
waitkey $D/response/10 ok
assert_eq "response 8" ok "$(get $D/response/8)"
assert_eq "response 9" "ok none" "$(get $D/response/9)"

# Daemon restart: a request written meanwhile is executed once.
tdr_stop "$DAEMON_PID"
xenstore-write $D/request/11 status
tdr_start --xs-dir $D --xs-path "$T/xs.sock" "$SPEC"
waitkey $D/response/11 ok
waitkey $D/last-id 11
call $D 10 status "error EALREADY"

# xenstored forgets everything: the daemon republishes and serves again.
kill -USR1 "$FAKE_PID"
waitkey $D/state none
call $D 12 status ok
call $D 11 status "error EALREADY"

# A disk without a replica filter.
mkraw "$T/plain.img" 1M
tdr_start --xs-dir /tdr/plain --xs-path "$T/xs.sock" "aio:$T/plain.img"
call /tdr/plain 1 checkpoint "error ENODEV"

# Bad options.
# Usage errors: exit status 2 and one line naming the problem.
st=0
"$TDR_BIN" serve --socket "$T/x.sock" --xs-dir relative "aio:$T/plain.img" 2>"$T/err" || st=$?
assert_eq "exit status for a relative --xs-dir" 2 "$st"
grep -q "xenstore directory 'relative': expected an absolute path" "$T/err" ||
	fail "no precise error for a relative --xs-dir: $(cat "$T/err")"
st=0
"$TDR_BIN" serve --socket "$T/x.sock" --xs-domid 5 "aio:$T/plain.img" 2>"$T/err" || st=$?
assert_eq "exit status for --xs-domid alone" 2 "$st"
grep -q "go together" "$T/err" || fail "no precise error for --xs-domid alone: $(cat "$T/err")"
pass
