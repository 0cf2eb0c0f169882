#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# VHD interoperability with real software:
#  1. a dynamic VHD made by vhd-util and written through tapdisk-replica's NBD
#     export with random data converts with `qemu-img convert -f vpc` to a
#     raw file byte-identical to the same writes on a raw reference;
#  2. a dynamic VHD made by qemu-img (subformat=dynamic,force_size=on) and
#     written by qemu-io reads back exactly through tapdisk-replica;
#  3. vhdiinfo (libvhdi) reports the right type, size and parent for our
#     dynamic and differencing files;
#  4. vhd-util check passes on all of them and names the defect on a bad one;
#  5. a file that grew past its first footer steps (64 MiB, 128 MiB: the
#     driver moves its footer ahead in steps) converts identically too, and
#     `vhd-util check -z` / `repair -z` find and zero data planted under
#     clear bitmap bits (in a block a coalesce wrote: the driver's and
#     qemu's new blocks of a dynamic disk have every bit set), which qemu
#     would otherwise read as the guest's.
#  6. while tapdisk-replica serves a chain, vhd-util's writers (modify -z,
#     coalesce into the served parent, repair, repair -z) are refused and
#     change no byte; query and check still work; once the daemon is gone
#     the same command succeeds.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-img qemu-io vhdiinfo cmp
tdr_setup

VU="$TDR_BUILDDIR/tools/vhd-util"
[ -x "$VU" ] || fail "vhd-util not built: $VU"

# Random sources for qemu-io's write -s (each write starts at the file's start).
for i in 1 2 3 4 5; do
	head -c $((3 * 1024 * 1024)) /dev/urandom >"$T/rand$i"
done

# Writes: unaligned, crossing 2 MiB blocks, partial sectors of a block, the
# last sector, rewrites of allocated blocks.
writes=(
	"write -s $T/rand1 0 64k"
	"write -s $T/rand2 1536k 1M"
	"write -s $T/rand3 5120 3584"
	"write -s $T/rand4 7M 3M"
	"write -s $T/rand5 $((32 * 1024 * 1024 - 512)) 512"
	"write -s $T/rand1 9M 4k"
	"write -s $T/rand2 7340544 12800"
	"write -P 0x5a 20M 2M"
	"write -z 21M 512k"
)

# ---- 1. ours, written through the export, read by qemu's vpc driver
"$VU" create -n "$T/ours.vhd" -s 32 || fail "vhd-util create failed"
mkraw "$T/ref.raw" 32M
tdr_start "vhd:$T/ours.vhd"
qio "$URI" "${writes[@]}" flush
qio "$T/ref.raw" "${writes[@]}"
# read back through the export as well
qemu-img convert -f raw -O raw "$URI" "$T/export.raw" || fail "qemu-img convert from the export failed"
same_file "$T/export.raw" "$T/ref.raw"
tdr_stop || fail "daemon exited with status $? on SIGTERM"

"$VU" check -n "$T/ours.vhd" >/dev/null || fail "vhd-util check failed on our file"
qemu-img convert -f vpc -O raw "$T/ours.vhd" "$T/ours.raw" || fail "qemu-img convert -f vpc failed"
same_file "$T/ours.raw" "$T/ref.raw"
vsize=$(qemu-img info -f vpc --output=json "$T/ours.vhd" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
assert_eq "qemu-img virtual size of our VHD" 33554432 "$vsize"
log "1: our dynamic VHD written through NBD converts identically with qemu-img"

# ---- 2. qemu's, written by qemu-io, read through tapdisk-replica
qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$T/qemu.vhd" 32M
args=()
for w in "${writes[@]}"; do args+=(-c "$w"); done
qemu-io -f vpc "$T/qemu.vhd" "${args[@]}" >"$T/qio2.out" 2>&1 || fail "qemu-io on qemu.vhd: $(cat "$T/qio2.out")"
"$VU" check -n "$T/qemu.vhd" >/dev/null || fail "vhd-util check failed on qemu's file"
tdr_start --read-only "vhd:$T/qemu.vhd"
qemu-img convert -f raw -O raw "$URI" "$T/qemu-export.raw" || fail "reading qemu.vhd through the export failed"
same_file "$T/qemu-export.raw" "$T/ref.raw"
tdr_stop || fail "daemon exited with status $? on SIGTERM"
log "2: qemu's dynamic VHD reads back exactly through tapdisk-replica"

# ---- 3. vhdiinfo on ours: dynamic, then differencing with parent
vhdiinfo "$T/ours.vhd" >"$T/vi1.out" 2>&1 || fail "vhdiinfo failed: $(cat "$T/vi1.out")"
grep -qE 'Disk type[[:space:]]*: Dynamic' "$T/vi1.out" || fail "vhdiinfo type: $(cat "$T/vi1.out")"
grep -q '(33554432 bytes)' "$T/vi1.out" || fail "vhdiinfo size: $(cat "$T/vi1.out")"
"$VU" snapshot -n "$T/child.vhd" -p "$T/ours.vhd" || fail "vhd-util snapshot failed"
vhdiinfo "$T/child.vhd" >"$T/vi2.out" 2>&1 || fail "vhdiinfo failed: $(cat "$T/vi2.out")"
grep -qE 'Disk type[[:space:]]*: Differential' "$T/vi2.out" || fail "vhdiinfo type: $(cat "$T/vi2.out")"
grep -q '(33554432 bytes)' "$T/vi2.out" || fail "vhdiinfo size: $(cat "$T/vi2.out")"
grep -qE 'Parent filename[[:space:]]*: ours.vhd' "$T/vi2.out" || fail "vhdiinfo parent: $(cat "$T/vi2.out")"
puuid=$("$VU" query -n "$T/ours.vhd" -i | sed -n 's/^uuid: //p')
grep -qiE "Parent identifier[[:space:]]*: $puuid" "$T/vi2.out" || fail "vhdiinfo parent UUID: $(cat "$T/vi2.out")"
assert_eq "vhd-util query -p" "$(realpath "$T/ours.vhd")" "$("$VU" query -n "$T/child.vhd" -p)"
assert_eq "vhd-util query -v" 32 "$("$VU" query -n "$T/child.vhd" -v)"

# the child written through the export: parent untouched, view = parent + writes
cp "$T/ref.raw" "$T/ref2.raw"
before=$(md5sum <"$T/ours.vhd")
tdr_start "vhd:$T/child.vhd"
qio "$URI" "write -s $T/rand3 3M 1M" "write -P 0x11 100k 1k" flush
qio "$T/ref2.raw" "write -s $T/rand3 3M 1M" "write -P 0x11 100k 1k"
qemu-img convert -f raw -O raw "$URI" "$T/child-export.raw"
same_file "$T/child-export.raw" "$T/ref2.raw"
tdr_stop || fail "daemon exited with status $? on SIGTERM"
assert_eq "parent unchanged by writes to the child" "$before" "$(md5sum <"$T/ours.vhd")"
"$VU" check -n "$T/child.vhd" >/dev/null || fail "vhd-util check failed on the child"
vhdiinfo "$T/child.vhd" >/dev/null 2>&1 || fail "vhdiinfo failed on the written child"
# coalesce keeps the content; make-empty returns to the parent's
"$VU" coalesce -n "$T/child.vhd" || fail "vhd-util coalesce failed"
qemu-img convert -f vpc -O raw "$T/ours.vhd" "$T/coalesced.raw"
same_file "$T/coalesced.raw" "$T/ref2.raw"
"$VU" modify -n "$T/child.vhd" -z || fail "vhd-util modify -z failed"
assert_eq "child size after modify -z" 4096 "$("$VU" query -n "$T/child.vhd" -s)"
log "3: vhdiinfo agrees on type, size and parent; coalesce and modify -z work"

# ---- 4. a defect is named, with a non-zero exit
cp "$T/ours.vhd" "$T/bad.vhd"
printf 'X' | dd of="$T/bad.vhd" bs=1 seek=600 conv=notrunc status=none
st=0
"$VU" check -n "$T/bad.vhd" >"$T/bad.out" 2>&1 || st=$?
assert_eq "vhd-util check status for a corrupted header" 1 "$st"
grep -q "$T/bad.vhd: dynamic header has a bad checksum" "$T/bad.out" || fail "check message: $(cat "$T/bad.out")"
st=0
"$TDR_BIN" serve --socket "$T/bad.sock" "vhd:$T/bad.vhd" >"$T/bad-serve.out" 2>&1 || st=$?
assert_eq "serve's status for a corrupted VHD" 1 "$st"
grep -q "bad checksum" "$T/bad-serve.out" || fail "serve message: $(cat "$T/bad-serve.out")"
log "4: a bad header is named by check and refused by serve"

# ---- 5. footer steps, and data under clear bits
"$VU" create -n "$T/big.vhd" -s 256 || fail "vhd-util create failed"
mkraw "$T/big-ref.raw" 256M
bw=()
for ((b = 0; b < 100; b++)); do bw+=("write -P $((b + 1)) $((b * 2097152 + 4096)) 4k"); done
tdr_start "vhd:$T/big.vhd"
qio "$URI" "${bw[@]}" flush
tdr_stop || fail "daemon exited with status $? on SIGTERM"
qio "$T/big-ref.raw" "${bw[@]}"
[ "$(stat -c %s "$T/big.vhd")" -gt $((192 * 1048576)) ] || fail "big.vhd did not grow past 192 MiB"
qemu-img convert -f vpc -O raw "$T/big.vhd" "$T/big.raw" || fail "qemu-img convert -f vpc failed"
same_file "$T/big.raw" "$T/big-ref.raw"
"$VU" check -n "$T/big.vhd" -z >"$T/z0.out" 2>&1 || fail "check -z on a clean file: $(cat "$T/z0.out")"
# The driver's new blocks of a dynamic disk go down with every bit set (the
# rest of the block reads as zeroes anyway): block 3, where only sectors 8-15
# were written, says sector 100 is present.
"$VU" read -n "$T/big.vhd" -i $((3 * 4096 + 100)) >"$T/i.out" 2>&1 || fail "vhd-util read -i: $(cat "$T/i.out")"
grep -qx "block 3: sec: 100: 1" "$T/i.out" || fail "bit of block 3, sector 100: $(cat "$T/i.out")"
# qemu's vpc driver does the same (block 101, written by qemu-io on the
# file itself) ...
qemu-io -f vpc "$T/big.vhd" -c "write -P 102 $((101 * 2097152 + 4096)) 4k" >"$T/qv.out" 2>&1 ||
	fail "qemu-io -f vpc write: $(cat "$T/qv.out")"
qio "$T/big-ref.raw" "write -P 102 $((101 * 2097152 + 4096)) 4k"
"$VU" read -n "$T/big.vhd" -i $((101 * 4096 + 100)) >"$T/i.out" 2>&1 || fail "vhd-util read -i: $(cat "$T/i.out")"
grep -qx "block 101: sec: 100: 1" "$T/i.out" || fail "bit of block 101, sector 100: $(cat "$T/i.out")"
# ... but a coalesce sets only the bits its child has: block 100, written
# into a differencing child (sectors 8-15) and coalesced, keeps sector
# 100's bit clear.
"$VU" snapshot -n "$T/bigc.vhd" -p "$T/big.vhd" || fail "vhd-util snapshot failed"
tdr_start "vhd:$T/bigc.vhd"
qio "$URI" "write -P 101 $((100 * 2097152 + 4096)) 4k" flush
tdr_stop || fail "daemon exited with status $? on SIGTERM"
"$VU" coalesce -n "$T/bigc.vhd" >"$T/co.out" 2>&1 || fail "coalesce: $(cat "$T/co.out")"
qio "$T/big-ref.raw" "write -P 101 $((100 * 2097152 + 4096)) 4k"
"$VU" read -n "$T/big.vhd" -i $((100 * 4096 + 100)) >"$T/i.out" 2>&1 || fail "vhd-util read -i: $(cat "$T/i.out")"
grep -qx "block 100: sec: 100: 0" "$T/i.out" || fail "bit of block 100, sector 100: $(cat "$T/i.out")"
"$VU" check -n "$T/big.vhd" -z >"$T/z0.out" 2>&1 || fail "check -z after the coalesce: $(cat "$T/z0.out")"
# plant 8 bytes in block 100, sector 100: its bit is clear
"$VU" read -n "$T/big.vhd" -t $((100 * 4096 + 100)) >"$T/t.out" 2>&1 || fail "vhd-util read -t: $(cat "$T/t.out")"
off=$(sed -n 's/.*file offset: //p' "$T/t.out")
[ -n "$off" ] || fail "vhd-util read -t gave no file offset: $(cat "$T/t.out")"
printf 'stale!!!' | dd of="$T/big.vhd" bs=1 seek="$off" conv=notrunc status=none
"$VU" check -n "$T/big.vhd" >/dev/null || fail "check without -z must still pass (the file is valid)"
st=0
"$VU" check -n "$T/big.vhd" -z >"$T/z1.out" 2>&1 || st=$?
assert_eq "check -z exit status with stale data" 1 "$st"
grep -qF "$T/big.vhd: 1 sector in 1 of 102 allocated blocks holds data under clear bitmap bits (first: block 100, sector 100)" "$T/z1.out" ||
	fail "check -z message: $(cat "$T/z1.out")"
grep -qF "[stale-data]" "$T/z1.out" || fail "check -z defect name: $(cat "$T/z1.out")"
qemu-img convert -f vpc -O raw "$T/big.vhd" "$T/big.raw"
st=0
cmp -s "$T/big.raw" "$T/big-ref.raw" || st=$?
assert_eq "cmp status of qemu-img's view with planted data (1: differs)" 1 "$st"
"$VU" repair -n "$T/big.vhd" -z >"$T/z2.out" 2>&1 || fail "repair -z: $(cat "$T/z2.out")"
grep -qF "zeroed 1 sector under clear bitmap bits in 1 of 102 allocated blocks" "$T/z2.out" ||
	fail "repair -z message: $(cat "$T/z2.out")"
"$VU" check -n "$T/big.vhd" -z >/dev/null || fail "check -z after repair -z"
qemu-img convert -f vpc -O raw "$T/big.vhd" "$T/big.raw"
same_file "$T/big.raw" "$T/big-ref.raw"
log "5: a 256 MiB file past three footer steps converts identically; check -z / repair -z"

# ---- 6. files a daemon serves are locked against vhd-util's writers
"$VU" snapshot -n "$T/lk.vhd" -p "$T/ours.vhd" || fail "vhd-util snapshot failed"
tdr_start "vhd:$T/lk.vhd"
qio "$URI" "write -P 0x33 0 64k" flush
sum_child=$(md5sum <"$T/lk.vhd")
sum_parent=$(md5sum <"$T/ours.vhd")
for c in "modify -z" "coalesce" "repair" "repair -z"; do
	st=0
	# shellcheck disable=SC2086 # c holds the subcommand and its options
	"$VU" $c -n "$T/lk.vhd" >"$T/lk.out" 2>&1 || st=$?
	assert_eq "exit status of vhd-util $c on a served file" 1 "$st"
	who=$T/lk.vhd
	[ "$c" = coalesce ] && who=$(realpath "$T/ours.vhd")
	grep -qF "$who: in use" "$T/lk.out" || fail "vhd-util $c message: $(cat "$T/lk.out")"
	grep -qF "close that disk first ('tdr-ctl list' shows each daemon's disks)" "$T/lk.out" ||
		fail "vhd-util $c hint: $(cat "$T/lk.out")"
done
assert_eq "served child unchanged by refused writers" "$sum_child" "$(md5sum <"$T/lk.vhd")"
assert_eq "served parent unchanged by refused writers" "$sum_parent" "$(md5sum <"$T/ours.vhd")"
assert_eq "vhd-util query -v on a served file" 32 "$("$VU" query -n "$T/lk.vhd" -v)"
"$VU" check -n "$T/lk.vhd" >/dev/null || fail "vhd-util check on a served file"
tdr_stop || fail "daemon exited with status $? on SIGTERM"
"$VU" modify -n "$T/lk.vhd" -z || fail "vhd-util modify -z after the daemon stopped"
assert_eq "child size after modify -z" 4096 "$("$VU" query -n "$T/lk.vhd" -s)"
log "6: vhd-util's writers are refused on a served chain and change nothing; readers work"
pass
