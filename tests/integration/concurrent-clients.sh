#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# Four clients at once, each writing its own 8 MiB range (with several
# requests in flight per connection) and reading it back; then the whole
# image is verified byte-exact through the export and in the file.  Twice:
# with the event loop as by default, then with adaptive polling
# (--poll-max-us), whose counters tdr-ctl stats must report.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io nbdcopy cmp truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

M=$((1024 * 1024))
CTL="$TDR_BUILDDIR/tools/tdr-ctl"
export TDR_CONTROL_DIR="$T"
[ -x "$CTL" ] || fail "tdr-ctl not built: $CTL"

client() {
	local i=$1 base=$(($1 * 8 * M)) pat off args=()
	pat=$(printf '0x%02x' $((0x10 + i)))
	# 128 x 64 KiB asynchronous writes, interleaved from both ends of the
	# range so requests overlap in time but never in space.
	for ((k = 0; k < 64; k++)); do
		off=$((base + k * 65536))
		args+=(-c "aio_write -P $pat $off 64k")
		off=$((base + (127 - k) * 65536))
		args+=(-c "aio_write -P $pat $off 64k")
	done
	args+=(-c aio_flush -c flush -c "read -P $pat $base 8M")
	qemu-io -f raw "$URI" "${args[@]}" >"$T/client-$i.out" 2>&1 || return 1
	! grep -qiE 'verification failed|failed|error' "$T/client-$i.out"
}

# round OPTION...: one run on a fresh image, the daemon started with OPTIONs.
round() {
mkraw "$T/disk.img" 40M
rm -f "$T/out.img"
tdr_start "$@" "aio:$T/disk.img"

pids=()
for i in 0 1 2 3; do
	client "$i" &
	pids+=($!)
done
# A fifth client reads the untouched tail meanwhile.
qio "$URI" 'read -P 0 32M 8M' 'read -P 0 36M 4M'
failed=0
for i in 0 1 2 3; do
	wait "${pids[$i]}" || { failed=1; log "client $i failed:"; tail -n 5 "$T/client-$i.out" >&2; }
done
[ "$failed" -eq 0 ] || fail "a concurrent client failed"
tdr_alive

"$PY" - "$T/expect.img" <<PYEOF
import sys
M = $M
b = bytearray(40 * M)
for i in range(4):
    b[i * 8 * M:(i + 1) * 8 * M] = bytes([0x10 + i]) * (8 * M)
open(sys.argv[1], "wb").write(b)
PYEOF

nbdcopy "$URI" "$T/out.img" || fail "nbdcopy export -> file failed"
same_file "$T/expect.img" "$T/out.img"
}

round
tdr_stop || fail "daemon exited with status $? on SIGTERM"
same_file "$T/expect.img" "$T/disk.img"

round --poll-max-us 200 --control "$T"
"$CTL" stats -p "$DAEMON_PID" -m 0 >"$T/stats.json" 2>"$T/stats.err" ||
	fail "tdr-ctl stats failed: $(cat "$T/stats.err")"
# The window's size at any moment depends on timing; its bounds do not.
"$PY" - "$T/stats.json" <<'PYEOF' || fail "poll counters: $(cat "$T/stats.json")"
import json, sys
p = json.load(open(sys.argv[1]))["poll"]
assert sorted(p) == ["hits", "max_ns", "polls", "window_ns"], p
assert p["max_ns"] == 200000, p
assert 0 <= p["window_ns"] <= 200000, p
assert 0 <= p["hits"] <= p["polls"], p
PYEOF
tdr_stop || fail "daemon (--poll-max-us 200) exited with status $? on SIGTERM"
same_file "$T/expect.img" "$T/disk.img"
pass
