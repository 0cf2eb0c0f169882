#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Builds the fuzz harnesses with clang (libFuzzer + ASan + UBSan) and runs
# each for SECONDS (default 60) over a copy of its seed corpus.  Fails on
# any crash, hang, leak or sanitizer report.
#   tests/fuzz/run-fuzz.sh [SECONDS] [extra libFuzzer options...]
# FUZZ_HARNESSES="vhd vhd-driver nbd-server nbd-link xs-conn ctl-server parsers" (the default) picks:
#   vhd         parse, validate and read a VHD given as bytes (fuzz-vhd.c)
#   vhd-driver  the VHD driver on such a file, against the library (fuzz-vhd-driver.c)
#   nbd-server  the NBD server fed a client's byte stream (fuzz-nbd-server.c)
#   nbd-link    the primary's NBD client fed a server's bytes (fuzz-nbd-link.c)
#   xs-conn     the xenstore client fed xenstored's bytes (fuzz-xs-conn.c)
#   ctl-server  the control server fed a tap-ctl client's bytes (fuzz-ctl-server.c)
#   parsers     request lines, spec entries and option values, each against an oracle (fuzz-parsers.c)
# TDR_FUZZ_DIR=DIR keeps the builds, corpora and any crash inputs there.
set -euo pipefail

secs=${1:-60}
shift || true
src=$(cd "$(dirname "$0")/../.." && pwd)
out=${TDR_FUZZ_DIR:-$(mktemp -d /tmp/tdr-fuzz.XXXXXX)}
harnesses=${FUZZ_HARNESSES:-vhd vhd-driver nbd-server nbd-link xs-conn ctl-server parsers}
mkdir -p "$out/inc"
: >"$out/inc/config.h"

command -v clang >/dev/null || { echo "run-fuzz: clang not installed (tools/quickstart installs it)" >&2; exit 1; }

cc() {
	clang -std=c11 -g -O1 -D_GNU_SOURCE -I"$src/include" -I"$src/tapdisk-replica" \
		-I"$src/tapdisk-replica/replica" -I"$src/tapdisk-replica/xenstore" -I"$out/inc" \
		-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
		-Wall -Wextra -Werror -Wno-unused-parameter "$@"
}

r=$src/tapdisk-replica
build() {
	case $1 in
	vhd)
		cc "$src/tests/fuzz/fuzz-vhd.c" "$r"/vhd/vhd-format.c "$r"/vhd/vhd-validate.c \
			"$r"/vhd/vhd-file.c "$r"/vhd/vhd-ops.c "$r"/filelock.c \
			-luuid -o "$out/fuzz-vhd" ;;
	vhd-driver)
		# fuzz-table.c is its driver table: "vhd" only.
		cc "$src/tests/fuzz/fuzz-vhd-driver.c" "$src/tests/fuzz/fuzz-table.c" \
			"$r"/drivers/drv-vhd.c "$r"/vhd/vhd-format.c \
			"$r"/vhd/vhd-validate.c "$r"/vhd/vhd-file.c "$r"/vhd/vhd-ops.c "$r"/loop.c \
			"$r"/io.c "$r"/log.c "$r"/request.c "$r"/disk.c "$r"/spec.c "$r"/filelock.c \
			-laio -luuid -o "$out/fuzz-vhd-driver" ;;
	nbd-server)
		# Its own in-memory driver, alone in fuzz-table.c's table.
		cc "$src/tests/fuzz/fuzz-nbd-server.c" "$src/tests/fuzz/fuzz-peer.c" \
			"$src/tests/fuzz/fuzz-table.c" "$src/tests/fuzz/fuzz-mem.c" "$r"/nbd/*.c "$r"/loop.c "$r"/io.c \
			"$r"/log.c "$r"/request.c "$r"/disk.c "$r"/spec.c "$r"/filelock.c \
			-laio -lgnutls -o "$out/fuzz-nbd-server" ;;
	nbd-link)
		cc "$src/tests/fuzz/fuzz-nbd-link.c" "$src/tests/fuzz/fuzz-peer.c" \
			"$r"/replica/replica-link.c \
			"$r"/replica/replica-link-native.c "$r"/replica/replica-link-libnbd.c \
			"$r"/loop.c "$r"/log.c "$r"/nbd/nbd-proto.c "$r"/nbd/nbd-transport.c \
			-lnbd -o "$out/fuzz-nbd-link" ;;
	xs-conn)
		cc "$src/tests/fuzz/fuzz-xs-conn.c" "$src/tests/fuzz/fuzz-peer.c" \
			"$r"/xenstore/xs-conn.c "$r"/loop.c "$r"/log.c \
			-o "$out/fuzz-xs-conn" ;;
	ctl-server)
		# The daemon's library without its main and xenstore front end,
		# the real driver table plus fuzz-mem.c's "mem".
		cc "$src/tests/fuzz/fuzz-ctl-server.c" "$src/tests/fuzz/fuzz-peer.c" \
			"$src/tests/fuzz/fuzz-mem.c" "$r"/control/ctl-server.c \
			"$r"/control/ctl-message.c "$r"/control/ctl-replica.c "$r"/control/ctl-stats.c \
			"$r"/replica/*.c "$r"/nbd/*.c "$r"/vhd/*.c "$r"/drivers/*.c \
			"$r"/log.c "$r"/loop.c "$r"/io.c "$r"/filelock.c "$r"/readahead.c \
			"$r"/request.c "$r"/disk.c "$r"/spec.c "$r"/driver-table.c \
			-laio -luuid -lnbd -lgnutls -lm -o "$out/fuzz-ctl-server" ;;
	parsers)
		# The parsers' files and what they link against; serve.c brings
		# the daemon's front ends (control socket, xenstore).
		cc "$src/tests/fuzz/fuzz-parsers.c" "$r"/serve.c "$r"/control/*.c \
			"$r"/xenstore/*.c "$r"/replica/*.c "$r"/nbd/*.c "$r"/vhd/*.c "$r"/drivers/*.c \
			"$r"/log.c "$r"/loop.c "$r"/io.c "$r"/filelock.c "$r"/readahead.c \
			"$r"/request.c "$r"/disk.c "$r"/spec.c "$r"/driver-table.c \
			-laio -luuid -lnbd -lgnutls -lxenstore -lm -o "$out/fuzz-parsers" ;;
	*)
		echo "run-fuzz: unknown harness '$1' (vhd, vhd-driver, nbd-server, nbd-link, xs-conn, ctl-server, parsers)" >&2
		return 1 ;;
	esac
}

corpus_of() {
	case $1 in
	vhd | vhd-driver) echo corpus-vhd ;;
	nbd-server) echo corpus-nbd ;;
	nbd-link) echo corpus-link ;;
	xs-conn) echo corpus-xs ;;
	ctl-server) echo corpus-ctl ;;
	parsers) echo corpus-parsers ;;
	esac
}

max_len_of() {
	case $1 in
	vhd | vhd-driver) echo 262144 ;;
	nbd-server) echo 16384 ;;
	nbd-link) echo 4096 ;;
	xs-conn) echo 16384 ;;
	ctl-server) echo 16384 ;;
	parsers) echo 4097 ;;
	esac
}

failed=()
for h in $harnesses; do
	echo "run-fuzz: $h: building"
	if ! build "$h"; then
		failed+=("$h (build)")
		continue
	fi
	mkdir -p "$out/corpus-$h"
	cp "$src/tests/fuzz/$(corpus_of "$h")"/* "$out/corpus-$h/"
	echo "run-fuzz: $h: fuzzing for ${secs}s"
	set +e
	(cd "$out" && UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		ASAN_OPTIONS=detect_leaks=1 \
		"./fuzz-$h" -max_total_time="$secs" -max_len="$(max_len_of "$h")" -timeout=20 \
		-rss_limit_mb=2048 -print_final_stats=1 "$@" "corpus-$h" 2>&1 | tail -n 25
	 exit "${PIPESTATUS[0]}")
	status=$?
	set -e
	if [ "$status" -ne 0 ]; then
		echo "run-fuzz: $h: the harness failed (status $status); crash inputs are in $out" >&2
		failed+=("$h")
	else
		echo "run-fuzz: $h: no crash, hang or sanitizer report in ${secs}s"
	fi
done

if [ ${#failed[@]} -ne 0 ]; then
	echo "run-fuzz: FAILED: ${failed[*]} (kept $out)" >&2
	exit 1
fi
echo "run-fuzz: passed: $harnesses"
[ -n "${TDR_FUZZ_DIR:-}" ] || rm -rf "$out"
