#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Builds the VHD fuzz harness with clang (libFuzzer + ASan + UBSan) and runs
# it for SECONDS (default 60) over a copy of the seed corpus.  Fails on any
# crash or sanitizer report.
#   tests/fuzz/run-fuzz.sh [SECONDS] [extra libFuzzer options...]
set -euo pipefail

secs=${1:-60}
shift || true
src=$(cd "$(dirname "$0")/../.." && pwd)
out=${TDR_FUZZ_DIR:-$(mktemp -d /tmp/tdr-fuzz-vhd.XXXXXX)}
mkdir -p "$out/corpus" "$out/inc"
: >"$out/inc/config.h"

command -v clang >/dev/null || { echo "run-fuzz: clang not installed (tools/quickstart installs it)" >&2; exit 1; }

clang -std=c11 -g -O1 -D_GNU_SOURCE -I"$src/include" -I"$out/inc" \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	-Wall -Wextra -Werror -Wno-unused-parameter \
	"$src/tests/fuzz/fuzz-vhd.c" \
	"$src"/tapdisk-replica/vhd/vhd-format.c \
	"$src"/tapdisk-replica/vhd/vhd-validate.c \
	"$src"/tapdisk-replica/vhd/vhd-file.c \
	"$src"/tapdisk-replica/vhd/vhd-ops.c \
	"$src"/tapdisk-replica/filelock.c \
	-luuid -o "$out/fuzz-vhd"

cp "$src"/tests/fuzz/corpus-vhd/* "$out/corpus/"
cd "$out"
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
ASAN_OPTIONS=detect_leaks=1 \
	./fuzz-vhd -max_total_time="$secs" -max_len=262144 -timeout=10 -rss_limit_mb=2048 \
	-print_final_stats=1 "$@" corpus 2>&1 | tail -n 25
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
	echo "run-fuzz: the harness failed (status $status); crash inputs are in $out" >&2
	exit 1
fi
echo "run-fuzz: no crash, no sanitizer report in ${secs}s"
[ -n "${TDR_FUZZ_DIR:-}" ] || rm -rf "$out"
