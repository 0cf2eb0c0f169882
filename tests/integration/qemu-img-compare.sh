#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# After writes through the export, `qemu-img compare` finds the export and a
# local copy written the same way identical, and a change makes them differ.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-img qemu-io truncate
tdr_setup

mkraw "$T/disk.img" 16M
mkraw "$T/ref.img" 16M
tdr_start "aio:$T/disk.img"

cmds=('write -P 0x61 0 64k' 'write -P 0x62 1M 1M' 'write -P 0x63 15M 512' \
	'write -z 1536k 4k' 'write -P 0x64 7M 3M')
qio "$URI" "${cmds[@]}" flush
# The same writes on a local reference file.
qio "$T/ref.img" "${cmds[@]}"

qemu-img compare -f raw -F raw "$URI" "$T/ref.img" >"$T/cmp.out" 2>&1 ||
	{ cat "$T/cmp.out" >&2; fail "qemu-img compare: export differs from the reference"; }

# The comparison must be able to fail: change one byte range on the export.
qio "$URI" 'write -P 0x65 12M 512'
st=0
qemu-img compare -f raw -F raw "$URI" "$T/ref.img" >"$T/cmp.out" 2>&1 || st=$?
assert_eq "qemu-img compare status after a change" 1 "$st"
grep -q 'Content mismatch at offset 12582912' "$T/cmp.out" ||
	fail "qemu-img compare reported: $(cat "$T/cmp.out")"

tdr_stop || fail "daemon exited with status $? on SIGTERM"
qemu-io -f raw "$T/ref.img" -c 'write -P 0x65 12M 512' >/dev/null
cmp "$T/disk.img" "$T/ref.img" || fail "image file differs from the reference"
pass
