#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# base:allocation on a sparse raw file: `nbdinfo --map` shows the exact holes
# (hole,zero) and data extents, before and after writes through the export.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io dd truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

M=$((1024 * 1024))
mkraw "$T/disk.img" 16M
# Data at [1M,2M) and [8M,8M+64k), written into the file directly.
head -c $M /dev/urandom | dd of="$T/disk.img" bs=1M seek=1 conv=notrunc status=none
head -c 65536 /dev/urandom | dd of="$T/disk.img" bs=64k seek=128 conv=notrunc status=none
sync "$T/disk.img"
tdr_start "aio:$T/disk.img"

# check_map EXPECTED...: each "offset:length:type"; adjacent extents of the
# same type are merged first (a server may split a run anywhere).
check_map() {
	nbdinfo --map --json "$URI" >"$T/map.json" || fail "nbdinfo --map failed"
	nbdinfo --map "$URI" >"$T/map.txt" || true
	"$PY" - "$T/map.json" "$@" <<'PYEOF' || { cat "$T/map.txt" >&2; fail "block status map differs (nbdinfo --map above)"; }
import json, sys
ext = json.load(open(sys.argv[1]))
merged = []
pos = 0
for e in ext:
    if e["offset"] != pos:
        print(f"  extent at {e['offset']} does not follow the previous one (ends at {pos})", file=sys.stderr)
        sys.exit(1)
    pos += e["length"]
    if merged and merged[-1][2] == e["type"]:
        merged[-1][1] += e["length"]
    else:
        merged.append([e["offset"], e["length"], e["type"]])
want = [list(map(int, a.split(":"))) for a in sys.argv[2:]]
if merged != want:
    print(f"  expected {want}\n  got      {merged}", file=sys.stderr)
    sys.exit(1)
PYEOF
}

# type 3 = hole,zero; 0 = data.
check_map 0:$M:3 $M:$M:0 $((2 * M)):$((6 * M)):3 \
	$((8 * M)):65536:0 $((8 * M + 65536)):$((8 * M - 65536)):3

# A write through the export allocates; a hole stays a hole next to it.
qio "$URI" 'write -P 0x42 12M 128k' flush
check_map 0:$M:3 $M:$M:0 $((2 * M)):$((6 * M)):3 \
	$((8 * M)):65536:0 $((8 * M + 65536)):$((4 * M - 65536)):3 \
	$((12 * M)):131072:0 $((12 * M + 131072)):$((4 * M - 131072)):3

# Reading the map over a sub-range (what qemu-img map does) agrees.
qemu-img map --output=json -f raw "$URI" >"$T/qmap.json" || fail "qemu-img map failed"
"$PY" - "$T/qmap.json" <<'PYEOF' || fail "qemu-img map disagrees"
import json, sys
M = 1 << 20
data = [(e["start"], e["length"]) for e in json.load(open(sys.argv[1])) if e["data"]]
want = [(M, M), (8 * M, 65536), (12 * M, 131072)]
if data != want:
    print(f"  data extents: expected {want}, got {data}", file=sys.stderr)
    sys.exit(1)
PYEOF

tdr_stop || fail "daemon exited with status $? on SIGTERM"
pass
