#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# nbdcopy round trip: random data file -> export -> file, byte-exact, and the
# image file itself equals the source.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy cmp truncate
tdr_setup

mkrandom "$T/src.bin" 48
mkraw "$T/disk.img" 48M
tdr_start "aio:$T/disk.img"

nbdcopy "$T/src.bin" "$URI" || fail "nbdcopy file -> export failed"
nbdcopy "$URI" "$T/out.bin" || fail "nbdcopy export -> file failed"
same_file "$T/src.bin" "$T/out.bin"

# Again with several connections and requests in flight, and a sparse-aware
# copy of a file with holes.
mkrandom "$T/src2.bin" 16
truncate -s 48M "$T/src2.bin"
nbdcopy --connections=4 --requests=16 "$T/src2.bin" "$URI" || fail "nbdcopy (4 connections) failed"
nbdcopy --connections=4 "$URI" "$T/out2.bin" || fail "nbdcopy export -> file (4 connections) failed"
same_file "$T/src2.bin" "$T/out2.bin"

tdr_stop || fail "daemon exited with status $? on SIGTERM"
same_file "$T/src2.bin" "$T/disk.img"
pass
