#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# Bad input: the daemon refuses with a non-zero exit status (2 for usage
# errors, 1 for problems found at run time) and exactly one line on stderr,
# `tapdisk-replica: <problem>; <what to do>` (so no readiness line either).
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
[ -x "$PY" ] || skip "$PY not installed"
need_cmd nbdinfo truncate timeout setpriv
tdr_setup

nfail=0
# refuse NAME WANT_STATUS ARGS...: WANT_STATUS is 1 or 2.  $AS: a command
# prefix to run the daemon under (empty: as is).
AS=()
refuse() {
	local name=$1 want=$2 st=0
	shift 2
	timeout -k 5 "$TDR_TIMEOUT" "${AS[@]}" "$TDR_BIN" "$@" </dev/null >"$T/out" 2>"$T/err" || st=$?
	local why=""
	if [ "$st" -eq 124 ] || [ "$st" -eq 137 ]; then
		why="still running after ${TDR_TIMEOUT}s (should have refused)"
	elif [ "$st" -eq 0 ]; then
		why="exit status 0"
	elif [ "$st" -ne "$want" ]; then
		why="exit status $st, expected $want"
	elif [ "$(wc -l <"$T/err")" -ne 1 ] || [ -n "$(tail -c 1 "$T/err")" ]; then
		why="stderr is not exactly one line"
	elif ! grep -q '^tapdisk-replica: .' "$T/err"; then
		why="stderr does not start with 'tapdisk-replica: '"
	elif ! grep -q '; .' "$T/err"; then
		why="stderr does not say what to do ('<problem>; <what to do>')"
	fi
	if [ -n "$why" ]; then
		log "case '$name': $why; stderr: $(head -c 1000 "$T/err")"
		nfail=$((nfail + 1))
	else
		log "case '$name': ok (status $st): $(cat "$T/err")"
	fi
}

mkraw "$T/disk.img" 8M
: >"$T/empty.img"
mkdir "$T/dir"
S="$T/s.sock"

# Images.
refuse "unknown image type" 1 serve --socket "$S" "qcow9:$T/disk.img"
refuse "no image type" 1 serve --socket "$S" "$T/disk.img"
refuse "missing file" 1 serve --socket "$S" "aio:$T/missing.img"
refuse "directory as image" 1 serve --socket "$S" "aio:$T/dir"
refuse "zero-sized image" 1 serve --socket "$S" "aio:$T/empty.img"
cp "$T/disk.img" "$T/noperm.img"
chmod 000 "$T/noperm.img"
# Root reads a mode-000 file anyway: run it without the capabilities that
# override file permissions, so that the case runs as root too.
[ "$(id -u)" -ne 0 ] || AS=(setpriv --inh-caps '-dac_override,-dac_read_search'
	--ambient-caps '-dac_override,-dac_read_search' --bounding-set '-dac_override,-dac_read_search' --)
refuse "unreadable file" 1 serve --socket "$S" "aio:$T/noperm.img"
grep -q "noperm.img" "$T/err" || { log "case 'unreadable file': the message does not name the file"; nfail=$((nfail + 1)); }
AS=()
[ ! -e "$S" ] || fail "a refused daemon left its socket $S behind"

# Options.
refuse "no arguments" 2
refuse "unknown command" 2 frobnicate
refuse "no SPEC" 2 serve --socket "$S"
refuse "unknown option" 2 serve --socket "$S" --bogus "aio:$T/disk.img"
refuse "bad log level" 2 serve --socket "$S" --log-level loud "aio:$T/disk.img"
refuse "read-ahead not in whole MiB" 2 serve --socket "$S" --readahead 3K "aio:$T/disk.img"
refuse "read-ahead too large" 2 serve --socket "$S" --readahead 1G "aio:$T/disk.img"
refuse "read-ahead not a size" 2 serve --socket "$S" --readahead lots "aio:$T/disk.img"
refuse "daemon: negative read-ahead" 2 daemon --readahead -8M
refuse "poll window too long" 2 serve --socket "$S" --poll-max-us 10001 "aio:$T/disk.img"
refuse "poll window with a unit" 2 serve --socket "$S" --poll-max-us 200us "aio:$T/disk.img"
refuse "daemon: negative poll window" 2 daemon --poll-max-us -1
refuse "option without its value" 2 serve "aio:$T/disk.img" --socket
refuse "bad --tcp" 2 serve --tcp nonsense "aio:$T/disk.img"
refuse "bad --tcp port" 2 serve --tcp 127.0.0.1:99999 "aio:$T/disk.img"
refuse "two SPECs" 2 serve --socket "$S" "aio:$T/disk.img" "aio:$T/disk.img"
refuse "socket in a missing directory" 1 serve --socket "$T/nodir/s.sock" "aio:$T/disk.img"

# Socket path in use: a second daemon on the same socket is refused, and
# the first one keeps serving on it.
tdr_start "aio:$T/disk.img"
refuse "socket path in use" 1 serve --socket "$SOCK" "aio:$T/disk.img"
tdr_alive
assert_eq "first daemon still answers on its socket" 8388608 "$(nbdinfo --size "$URI")"
tdr_stop || fail "first daemon exited with status $? on SIGTERM"

# Port in use: something else listens on it.
"$PY" - "$T/port" <<'PYEOF' &
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
PYEOF
listener=$!
for ((i = 0; i < 200; i++)); do [ -s "$T/port" ] && break; sleep 0.05; done
[ -s "$T/port" ] || fail "could not start the port holder"
refuse "TCP port in use" 1 serve --tcp "127.0.0.1:$(cat "$T/port")" "aio:$T/disk.img"
kill "$listener" 2>/dev/null || true

[ "$nfail" -eq 0 ] || fail "$nfail bad-input case(s) not refused as specified"
pass
