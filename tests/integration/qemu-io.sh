#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# qemu-io writes patterns, reads them back, discards, writes zeroes and
# flushes; the file underneath holds exactly what was written.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io truncate cmp
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

M=$((1024 * 1024))
mkraw "$T/disk.img" 32M
tdr_start "aio:$T/disk.img"

# Aligned, unaligned-to-4k and large writes, then a read of each with -P.
qio "$URI" \
	'write -P 0xa5 0 1M' \
	'write -P 0x5a 1M 4k' \
	'write -P 0x11 3584 512' \
	'write -P 0x22 8M 4M' \
	'write -P 0x33 31M 1M' \
	'flush'
qio "$URI" \
	'read -P 0xa5 0 3584' \
	'read -P 0x11 3584 512' \
	'read -P 0xa5 4k 1020k' \
	'read -P 0x5a 1M 4k' \
	'read -P 0x00 1052672 7335936' \
	'read -P 0x22 8M 4M' \
	'read -P 0x33 31M 1M'

# A deliberately wrong pattern must be reported (guards the checks above).
qio_expect_fail "$URI" 'Pattern verification failed' 'read -P 0x77 8M 4k'

# write -z zeroes; discard leaves zeroes or the old data (raw: zeroes
# after a punch, but both are allowed by NBD, so check the neighbours too).
qio "$URI" \
	'write -z 8M 1M' \
	'write -z 10M 512' \
	'discard 31M 1M' \
	'flush'
qio "$URI" \
	'read -P 0x00 8M 1M' \
	'read -P 0x22 9M 1M' \
	'read -P 0x00 10M 512' \
	'read -P 0x22 10486272 2096640' \
	'read -P 0x22 11M 1M'
# FUA writes.
qio "$URI" 'write -f -P 0x44 16M 64k' 'read -P 0x44 16M 64k'

tdr_stop || fail "daemon exited with status $? on SIGTERM"

# Byte-exact check of the file against the model of what was written.
"$PY" - "$T/expect.img" <<PYEOF
import sys
M = $M
b = bytearray(32 * M)
def fill(off, n, v): b[off:off + n] = bytes([v]) * n
fill(0, M, 0xa5); fill(M, 4096, 0x5a); fill(3584, 512, 0x11)
fill(8 * M, 4 * M, 0x22); fill(31 * M, M, 0x33)
fill(8 * M, M, 0); fill(10 * M, 512, 0)
fill(16 * M, 65536, 0x44)
open(sys.argv[1], "wb").write(b)
PYEOF
# The discarded range may hold zeroes or old data: compare around it.
cmp -n $((31 * M)) "$T/disk.img" "$T/expect.img" >"$T/cmp.out" 2>&1 ||
	fail "file differs from what was written: $(cat "$T/cmp.out")"
assert_eq "file size" $((32 * M)) "$(stat -c %s "$T/disk.img")"
tail -c $M "$T/disk.img" | od -An -tx1 -v | tr -s ' \n' '\n' | sort -u | grep -v '^$' >"$T/disc.bytes"
case "$(tr '\n' ' ' <"$T/disc.bytes")" in
"00 " | "33 " | "00 33 " ) ;;
*) fail "discarded range holds unexpected bytes: $(head -c 200 "$T/disc.bytes")" ;;
esac

pass
