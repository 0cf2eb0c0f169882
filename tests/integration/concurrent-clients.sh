#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# Four clients at once, each writing its own 8 MiB range (with several
# requests in flight per connection) and reading it back; then the whole
# image is verified byte-exact through the export and in the file.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io nbdcopy cmp truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

M=$((1024 * 1024))
mkraw "$T/disk.img" 40M
tdr_start "aio:$T/disk.img"

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

tdr_stop || fail "daemon exited with status $? on SIGTERM"
same_file "$T/expect.img" "$T/disk.img"
pass
