#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# vhd-util on bad input, command by command:
#  1. bad usage and bad option values exit 2 with one line that names the
#     option and its value; nothing is created;
#  2. create refuses to overwrite an existing file (exit 1, the file as it
#     was) and refuses a bad block size (exit 1, no file);
#  3. every command, on each of three damaged files (not a VHD at all; a
#     dynamic header with a bad checksum; a file cut short), exits 1 with
#     a message naming the file, and leaves the file byte for byte as it
#     was; snapshot over such a parent creates no child;
#  4. where blktap's scripts depend on them, blktap's meanings and output:
#     create -S (MiB of metadata) and our -B (block size), query -f
#     ("hidden: N"), read -p's disk type, --debug, check -t and our -T;
#  5. a device is refused as not a file; a damaged footer copy at offset 0
#     is what check says to repair, and repair mends it;
#  6. check -I, -B, -b, -s;
#  7. snapshot -l, -S, -e;
#  8. snapshot -m (a raw parent): without -m a raw parent is refused with
#     the hint; with it, query, check, read through the daemon, coalesce
#     into the raw file, and the raw parent's own refusals.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd md5sum touch dd cmp qemu-io sha256sum realpath
tdr_setup

VU="$TDR_BUILDDIR/tools/vhd-util"
[ -x "$VU" ] || fail "vhd-util not built: $VU"

# run_vu EXPECTED_STATUS ARGS...: runs vhd-util, stderr into $T/err.
run_vu() {
	local want=$1 st=0
	shift
	"$VU" "$@" >"$T/out" 2>"$T/err" || st=$?
	assert_eq "status of vhd-util $*" "$want" "$st"
}

# err_has TEXT: the last run's stderr holds TEXT.
err_has() {
	grep -qF -- "$1" "$T/err" || fail "expected '$1' in vhd-util's message, got: $(cat "$T/err")"
}

# ---- 1. usage and option values
run_vu 2
err_has "usage: vhd-util COMMAND"
run_vu 2 nosuch
err_has "unknown command 'nosuch'"
run_vu 2 create -n "$T/new.vhd"
err_has "vhd-util create: bad usage"
run_vu 2 create -n "$T/new.vhd" -s abc
err_has "vhd-util create: -s 'abc': not a size"
run_vu 2 create -n "$T/new.vhd" -s 8 -B 3x
err_has "-B '3x': not a block size"
run_vu 2 create -n "$T/new.vhd" -s 8 -B 99999999999
err_has "-B '99999999999': not a block size"
run_vu 2 create -n "$T/new.vhd" -s 8 -S 3x
err_has "-S '3x': not a size"
[ ! -e "$T/new.vhd" ] || fail "a refused create left $T/new.vhd"

"$VU" create -n "$T/ok.vhd" -s 8 || fail "vhd-util create failed"
run_vu 2 read -n "$T/ok.vhd" -b abc
err_has "vhd-util read: -b 'abc': not a block number"
run_vu 2 read -n "$T/ok.vhd" -c -1
err_has "-c '-1': not a count"
run_vu 2 read -n "$T/ok.vhd" -r 12x
err_has "-r '12x': not a sector number"
for o in "-b 99" "-m 99" "-d 99" "-t 999999"; do
	# shellcheck disable=SC2086 # the option and its value
	run_vu 1 read -n "$T/ok.vhd" $o
	err_has "$T/ok.vhd: block"
	err_has "past the end (4 blocks)"
done
run_vu 0 read -n "$T/ok.vhd" -b 2 -c 2
assert_eq "read -b 2 -c 2" "block: 2: offset: not allocated
block: 3: offset: not allocated" "$(cat "$T/out")"
log "1: bad usage and bad values exit 2 and name the option; read past the end says so"

# ---- 2. create's own refusals
sum=$(md5sum <"$T/ok.vhd")
run_vu 1 create -n "$T/ok.vhd" -s 16
err_has "$T/ok.vhd: cannot create: File exists; remove it first"
assert_eq "existing file after a refused create" "$sum" "$(md5sum <"$T/ok.vhd")"
run_vu 1 create -n "$T/new.vhd" -s 8 -B 3
err_has "bad block size 3 (must be a power of two from 512 bytes to 256 MiB"
[ ! -e "$T/new.vhd" ] || fail "create with a bad block size left $T/new.vhd"
run_vu 1 create -n "$T/new.vhd" -s 8 -S 64 -r
err_has "a fixed disk has no BAT to make room in"
[ ! -e "$T/new.vhd" ] || fail "create -r -S left $T/new.vhd"
log "2: create refuses an existing file, a bad block size, -S for a fixed disk"

# ---- 3. damaged files: every command refuses and writes nothing
head -c 100000 /dev/urandom >"$T/junk.vhd"
cp "$T/ok.vhd" "$T/badsum.vhd"
printf 'X' | dd of="$T/badsum.vhd" bs=1 seek=600 conv=notrunc status=none
cp "$T/ok.vhd" "$T/short.vhd"
truncate -s 2048 "$T/short.vhd"

declare -A defect=(
	[junk]="bad cookie"
	[badsum]="dynamic header has a bad checksum"
	[short]="$T/short.vhd"
)
for f in junk badsum short; do
	F="$T/$f.vhd"
	size=$(stat -c %s "$F")
	sum=$(md5sum <"$F")
	for cmd in "check -n $F" "query -n $F -v" "query -n $F -f" "modify -n $F -z" \
		"coalesce -n $F" "repair -n $F" "repair -n $F -z" "read -n $F -b 0" \
		"read -n $F -p" "snapshot -n $T/child.vhd -p $F"; do
		# shellcheck disable=SC2086 # the words of $cmd are the arguments
		run_vu 1 $cmd
		err_has "$F"
		[ "$f" = short ] || err_has "${defect[$f]}"
		[ "$(wc -l <"$T/err")" -eq 1 ] || fail "vhd-util $cmd: more than one line: $(cat "$T/err")"
		assert_eq "size of $f.vhd after vhd-util $cmd" "$size" "$(stat -c %s "$F")"
		assert_eq "content of $f.vhd after vhd-util $cmd" "$sum" "$(md5sum <"$F")"
		[ ! -e "$T/child.vhd" ] || fail "vhd-util $cmd created $T/child.vhd"
	done
done
log "3: ten commands on three damaged files: exit 1, the file named, not a byte written"

# ---- 4. blktap's option meanings and output, where scripts depend on them
# create -S: MiB the BAT is made for; -B: the block size (ours).
run_vu 0 create -n "$T/grow.vhd" -s 100 -S 4096
run_vu 0 query -n "$T/grow.vhd" -v -S
assert_eq "query -v -S after create -s 100 -S 4096" "100
4096" "$(cat "$T/out")"
run_vu 0 create -n "$T/small.vhd" -s 8 -B 4096
run_vu 0 query -n "$T/small.vhd" -i
grep -qx "block-size: 4096" "$T/out" || fail "create -B 4096: $(cat "$T/out")"
# query -f: the one line blktap prints (XenServer parses its last field).
run_vu 0 query -n "$T/grow.vhd" -f
assert_eq "query -f" "hidden: 0" "$(cat "$T/out")"
# read -p: blktap's words for the type.
run_vu 0 read -n "$T/grow.vhd" -p
grep -qE '^Disk type +: Dynamic hard disk$' "$T/out" || fail "read -p type: $(grep 'Disk type' "$T/out")"
# --debug anywhere after the command, ignored.
run_vu 0 query --debug -v -n "$T/grow.vhd" --debug
assert_eq "query with --debug" 100 "$(cat "$T/out")"
# check -t ignores a parent's timestamp, -T makes it fatal, both: usage.
run_vu 0 snapshot -n "$T/kid.vhd" -p "$T/grow.vhd"
touch -d 2020-01-01 "$T/grow.vhd"
run_vu 0 check -n "$T/kid.vhd"
err_has "was modified since the child was made"
run_vu 0 check -n "$T/kid.vhd" -t
[ ! -s "$T/err" ] || fail "check -t still warns: $(cat "$T/err")"
run_vu 1 check -n "$T/kid.vhd" -T
err_has "[parent-timestamp]"
run_vu 2 check -n "$T/kid.vhd" -t -T
err_has "-t ignores parent timestamps, -T makes them fatal"
log "4: create -S/-B, query -f, read -p, --debug and check -t/-T as blktap's scripts expect"

# ---- 5. not a file, and a footer copy that repair rewrites from the end's
run_vu 1 check -n /dev/null
err_has "/dev/null: not a regular file; VHDs are files here"
"$VU" create -n "$T/copy.vhd" -s 8 || fail "vhd-util create failed"
printf '\x77' | dd of="$T/copy.vhd" bs=1 seek=30 conv=notrunc status=none
run_vu 1 check -n "$T/copy.vhd"
err_has "footer copy at offset 0"
err_has "run 'vhd-util repair -n $T/copy.vhd'"
run_vu 0 repair -n "$T/copy.vhd"
run_vu 0 check -n "$T/copy.vhd"
cmp -s <(head -c 512 "$T/copy.vhd") <(tail -c 512 "$T/copy.vhd") ||
	fail "repair left the footer copy unlike the footer"
bad=$(printf '%s/p\351.vhd' "$T")	# Latin-1 e acute: not UTF-8
"$VU" create -n "$bad" -s 8 || fail "vhd-util create of a non-UTF-8 name failed"
run_vu 1 snapshot -n "$T/latin.vhd" -p "$bad"
err_has "is not UTF-8, which a VHD's UTF-16 name needs"
[ ! -e "$T/latin.vhd" ] || fail "a refused snapshot left $T/latin.vhd"
log "5: a device refused by name; check's advice for a bad footer copy works; a non-UTF-8 parent name refused as such"

# ---- 6. check -I, -B, -b, -s (blktap's names; Xen's storage manager runs
#      "check -B" for a fast check, which here is the full one)
"$VU" create -n "$T/p6.vhd" -s 16 || fail "vhd-util create failed"
qemu-io -f vpc -c "write -P 7 0 1M" -c "write -P 8 2M 1M" "$T/p6.vhd" >/dev/null ||
	fail "qemu-io write failed"
"$VU" snapshot -n "$T/c6.vhd" -p "$T/p6.vhd" || fail "vhd-util snapshot failed"
p6=$(realpath "$T/p6.vhd")
run_vu 0 check -n "$T/c6.vhd" -b -s
assert_eq "check -b -s output" "$T/c6.vhd: differencing disk, 16777216 bytes, 0 of 8 blocks of 2097152 bytes allocated (0 bytes), 0 sectors present by the bitmaps
$p6: dynamic disk, 16777216 bytes, 2 of 8 blocks of 2097152 bytes allocated (4194304 bytes), 8192 sectors present by the bitmaps
$T/c6.vhd is valid" "$(cat "$T/out")"
run_vu 0 check -n "$T/c6.vhd" -s
assert_eq "check -s output, first line" "$T/c6.vhd: differencing disk, 16777216 bytes, 0 of 8 blocks of 2097152 bytes allocated (0 bytes)" "$(head -n 1 "$T/out")"
# qemu's vpc driver sets every bit of a block it allocates: 2 x 4096 sectors.
# -B still finds overlapping blocks: block 1 pointed at block 0's place.
cp "$T/p6.vhd" "$T/lap.vhd"
"$PY" - "$T/lap.vhd" <<'PYEOF' || fail "could not point block 1 at block 0"
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(512 + 16)
    bat = struct.unpack(">Q", f.read(8))[0]
    f.seek(bat)
    b0, b1 = struct.unpack(">II", f.read(8))
    assert b0 != 0xFFFFFFFF and b1 != 0xFFFFFFFF, (b0, b1)
    f.seek(bat + 4)
    f.write(struct.pack(">I", b0))
PYEOF
run_vu 0 check -n "$T/p6.vhd" -B
run_vu 1 check -n "$T/lap.vhd" -B
err_has "[bat-overlap]"
# A replaced parent: a defect, or with -I a warning; the files stay unchanged.
rm "$T/p6.vhd"
"$VU" create -n "$T/p6.vhd" -s 16 || fail "vhd-util create failed"
sum_before=$(cat "$T/c6.vhd" "$T/p6.vhd" | sha256sum)
run_vu 1 check -n "$T/c6.vhd"
err_has "parent UUID mismatch"
err_has "[parent-uuid]"
run_vu 0 check -n "$T/c6.vhd" -I
err_has "vhd-util check: warning: $T/c6.vhd: parent UUID mismatch"
assert_eq "check -I output" "$T/c6.vhd is valid" "$(cat "$T/out")"
assert_eq "files after check -I" "$sum_before" "$(cat "$T/c6.vhd" "$T/p6.vhd" | sha256sum)"
# Deeper: the UUID warning outranks a grandparent's timestamp warning.
"$VU" create -n "$T/a7.vhd" -s 16 || fail "vhd-util create failed"
"$VU" snapshot -n "$T/b7.vhd" -p "$T/a7.vhd" || fail "vhd-util snapshot failed"
"$VU" snapshot -n "$T/c7.vhd" -p "$T/b7.vhd" || fail "vhd-util snapshot failed"
rm "$T/b7.vhd"
"$VU" snapshot -n "$T/b7.vhd" -p "$T/a7.vhd" || fail "vhd-util snapshot failed"
touch -d 2020-01-01 "$T/a7.vhd"
run_vu 0 check -n "$T/c7.vhd" -I -t
err_has "vhd-util check: warning: $T/c7.vhd: parent UUID mismatch"
log "6: check -b/-s print each file's allocation, -B still finds overlaps, -I makes a replaced parent a warning"

# ---- 7. snapshot -l (chain depth limit), -S (MiB the BAT is made for),
#      -e (link to the given parent even when empty: always done here)
"$VU" create -n "$T/a8.vhd" -s 16 || fail "vhd-util create failed"
run_vu 0 snapshot -n "$T/b8.vhd" -p "$T/a8.vhd" -l 2
run_vu 1 snapshot -n "$T/c8.vhd" -p "$T/b8.vhd" -l 2
err_has "vhd-util snapshot: $T/b8.vhd is a chain of 2; a child would make it 3, over the limit of 2 (-l)"
[ ! -e "$T/c8.vhd" ] || fail "a snapshot over the depth limit left $T/c8.vhd"
run_vu 2 snapshot -n "$T/c8.vhd" -p "$T/b8.vhd" -l x
err_has "-l 'x': not a chain depth"
run_vu 0 snapshot -n "$T/c8.vhd" -p "$T/b8.vhd" -l 3 -S 1024 -e
run_vu 0 query -n "$T/c8.vhd" -v -S -p -d
assert_eq "query after snapshot -S 1024 -e over an empty parent" "16
$T/b8.vhd
chain depth: 3
1024" "$(cat "$T/out")"
run_vu 0 check -n "$T/c8.vhd"
run_vu 1 snapshot -n "$T/d8.vhd" -p "$T/c8.vhd" -S 3000000
err_has "more than a VHD can hold (2040 GiB)"
[ ! -e "$T/d8.vhd" ] || fail "a refused snapshot -S left $T/d8.vhd"
log "7: snapshot -l refuses a chain over the limit, -S sizes the BAT, -e keeps an empty parent"

# ---- 8. snapshot -m: a differencing child over a raw image
head -c $((6 << 20)) /dev/urandom >"$T/base.img"
cp "$T/base.img" "$T/base.orig"
run_vu 1 snapshot -n "$T/r1.vhd" -p "$T/base.img"
err_has "vhd-util snapshot: $T/base.img: footer: bad cookie"
err_has "if $T/base.img is a raw image (a plain file or block device holding the disk), add -m"
[ ! -e "$T/r1.vhd" ] || fail "a refused snapshot left $T/r1.vhd"
run_vu 0 snapshot -n "$T/r1.vhd" -p "$T/base.img" -m -l 2
run_vu 1 snapshot -n "$T/r2.vhd" -p "$T/r1.vhd" -l 2
err_has "$T/r1.vhd is a chain of 2; a child would make it 3"
run_vu 0 query -n "$T/r1.vhd" -v -p -d -i
grep -qx 6 "$T/out" || fail "query -v of a raw parent's child: $(cat "$T/out")"
grep -qx "$T/base.img" "$T/out" || fail "query -p: $(cat "$T/out")"
grep -qx "chain depth: 2" "$T/out" || fail "query -d: $(cat "$T/out")"
grep -qx "parent-uuid: 00000000-0000-0000-0000-000000000000" "$T/out" || fail "query -i: $(cat "$T/out")"
grep -qx "parent-raw: yes" "$T/out" || fail "query -i: $(cat "$T/out")"
run_vu 0 check -n "$T/r1.vhd" -s
grep -qF "$T/base.img: raw image, 6291456 bytes, all present" "$T/out" ||
	fail "check -s of a raw parent: $(cat "$T/out")"
# The daemon reads the raw bytes through the child (the whole disk, byte
# for byte), and writes into the child only.
tdr_start "vhd:$T/r1.vhd"
nbdcopy "$URI" "$T/served.img"
same_file "$T/base.orig" "$T/served.img"
qemu-io -f raw -c 'write -P 0xa5 1536k 1m' -c 'write -P 0x5a 6143k 1k' "$URI" >/dev/null ||
	fail "qemu-io write through the raw parent's child failed"
cp "$T/base.orig" "$T/want.img"
head -c $((1 << 20)) /dev/zero | tr '\0' '\245' | dd of="$T/want.img" bs=1k seek=1536 conv=notrunc status=none
head -c 1024 /dev/zero | tr '\0' '\132' | dd of="$T/want.img" bs=1k seek=6143 conv=notrunc status=none
nbdcopy "$URI" "$T/served.img"
same_file "$T/want.img" "$T/served.img"
tdr_stop "$DAEMON_PID"
cmp "$T/base.img" "$T/base.orig" || fail "a write through the child reached the raw parent"
run_vu 0 coalesce -n "$T/r1.vhd"
cmp "$T/base.img" "$T/want.img" || fail "coalesce into the raw parent: not the child's view"
assert_eq "raw parent's size after coalesce" $((6 << 20)) "$(stat -c %s "$T/base.img")"
# A raw parent cut to an odd size, grown past the child, or gone.
head -c 1000 /dev/zero >"$T/odd.img"
run_vu 1 snapshot -n "$T/r3.vhd" -p "$T/odd.img" -m
err_has "$T/odd.img: raw image of 1000 bytes; it must be a non-zero whole number of 512-byte sectors"
[ ! -e "$T/r3.vhd" ] || fail "a refused snapshot -m left $T/r3.vhd"
truncate -s $((7 << 20)) "$T/base.img"
run_vu 1 check -n "$T/r1.vhd"
err_has "is larger than the child (6291456 bytes) [parent-size]"
rm "$T/base.img"
run_vu 1 check -n "$T/r1.vhd"
err_has "[parent-missing]"
# A VHD put where the raw parent was, or given to -m: refused, by vhd-util
# and by the daemon, never read as disk data.
"$VU" create -n "$T/base.img" -s 6 || fail "vhd-util create failed"
run_vu 1 check -n "$T/r1.vhd"
err_has "$T/base.img: a VHD (it holds a valid VHD footer), not a raw image;"
err_has "[parent-uuid]"
st=0
"$TDR_BIN" serve --socket "$T/never.sock" "vhd:$T/r1.vhd" </dev/null >/dev/null 2>"$T/serve.err" || st=$?
[ "$st" -ne 0 ] || fail "the daemon served a raw parent's child over a VHD"
one_line_error "$T/serve.err" | grep -qF "$T/base.img: a VHD (it holds a valid VHD footer), not a raw image" ||
	fail "daemon's refusal: $(cat "$T/serve.err")"
run_vu 1 snapshot -n "$T/r4.vhd" -p "$T/base.img" -m
err_has "a child of a VHD is made without -m"
[ ! -e "$T/r4.vhd" ] || fail "a refused snapshot -m left $T/r4.vhd"
# A raw image where a VHD parent was: its footer is missing, so it is invalid.
"$VU" create -n "$T/vp.vhd" -s 6 || fail "vhd-util create failed"
run_vu 0 snapshot -n "$T/vc.vhd" -p "$T/vp.vhd"
cp "$T/base.orig" "$T/vp.vhd"
run_vu 1 check -n "$T/vc.vhd"
err_has "[parent-invalid]"
log "8: snapshot -m: a raw parent's child is checked, served, coalesced into the raw file; a VHD is never taken for a raw parent"

# ---- 8b. a block device as raw parent (a loop device; root only): the
#      locators keep the path given (a symbolic link here, as /dev/vg/lv
#      is), the daemon serves it with aio, coalesce writes into it.
loopdev=""
if [ "$(id -u)" = 0 ] && command -v losetup >/dev/null; then
	cp "$T/base.orig" "$T/loop.img"
	loopdev=$(losetup --find --show "$T/loop.img" 2>"$T/losetup.err") || loopdev=""
fi
if [ -n "$loopdev" ]; then
	trap 'losetup -d "$loopdev" 2>/dev/null; _tdr_cleanup' EXIT
	ln -s "$loopdev" "$T/lv"
	run_vu 1 snapshot -n "$T/b1.vhd" -p "$T/lv"
	err_has "if $T/lv is a raw image (a plain file or block device holding the disk), add -m"
	run_vu 0 snapshot -n "$T/b1.vhd" -p "$T/lv" -m
	run_vu 0 query -n "$T/b1.vhd" -v -p -i
	grep -qx 6 "$T/out" || fail "query -v of a block device's child: $(cat "$T/out")"
	grep -qx "$loopdev" "$T/out" || fail "query -p: $(cat "$T/out")"
	grep -qx "parent-name: $T/lv" "$T/out" || fail "parent name of a block device: $(cat "$T/out")"
	run_vu 0 read -n "$T/b1.vhd" -p
	assert_eq "locators naming the link, not $loopdev" 2 "$(grep -c "decoded name : $T/lv\$" "$T/out")"
	! grep -q "W2ru" "$T/out" || fail "a relative locator for a block device: $(cat "$T/out")"
	tdr_start "vhd:$T/b1.vhd"
	nbdcopy "$URI" "$T/served.img"
	same_file "$T/base.orig" "$T/served.img"
	qemu-io -f raw -c 'write -P 0xa5 1536k 1m' -c 'write -P 0x5a 6143k 1k' "$URI" >/dev/null ||
		fail "qemu-io write through the block device's child failed"
	tdr_stop "$DAEMON_PID"
	run_vu 0 coalesce -n "$T/b1.vhd"
	losetup -d "$loopdev"
	trap _tdr_cleanup EXIT
	same_file "$T/want.img" "$T/loop.img"
	log "8b: snapshot -m over a block device ($loopdev through a link): served, coalesced into it"
else
	log "8b: NOT RUN: no loop device here (not root, no losetup, or: $(cat "$T/losetup.err" 2>/dev/null))"
fi

pass "vhd-util: bad usage, damaged files, blktap option meanings, repair of a footer copy"
