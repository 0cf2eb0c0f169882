# SPDX-License-Identifier: BSD-3-Clause
# shellcheck shell=bash disable=SC2034
#
# Shared helpers for the integration tests.  Sourced, never run.
#
# Each test is self-contained: tdr_setup makes a private temporary directory
# and installs an EXIT trap that stops every daemon the test started and
# removes the directory.  Exit codes follow automake: 0 pass, 1 fail,
# 77 skip (a peer tool is missing), 99 hard error.
#
# Environment (set by Makefile.am's AM_TESTS_ENVIRONMENT under `make check`;
# defaulted here so a test can also be run by hand from the source tree):
#   TDR_SRCDIR    the source tree
#   TDR_BUILDDIR  the build tree (default: $TDR_SRCDIR/build)
#   TDR_BIN       the daemon (default: $TDR_BUILDDIR/tapdisk-replica/tapdisk-replica)
#   TDR_TIMEOUT   seconds to wait for readiness / exit (default 30)
#   TDR_KEEP      non-empty: keep the temporary directory for inspection

set -euo pipefail

: "${TDR_SRCDIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
: "${TDR_BUILDDIR:=$TDR_SRCDIR/build}"
: "${TDR_BIN:=$TDR_BUILDDIR/tapdisk-replica/tapdisk-replica}"
: "${TDR_TIMEOUT:=30}"
export TDR_SRCDIR TDR_BUILDDIR TDR_BIN

# Debian's interpreter: the one on PATH may be a build without python3-libnbd.
PY=/usr/bin/python3
# This directory: PYTHONPATH for the tests' Python (nbdwire.py).
TESTDIR=$TDR_SRCDIR/tests/integration

TEST_NAME=$(basename "$0" .sh)
T=""			# the test's temporary directory
TDR_NDAEMONS=0
declare -a TDR_PIDS=()

# Set by tdr_start for the daemon it started last.
DAEMON_PID=""
SOCK=""
URI=""
DAEMON_ERR=""

log() { printf '%s: %s\n' "$TEST_NAME" "$*" >&2; }

fail() {
	printf '%s: FAIL: %s\n' "$TEST_NAME" "$*" >&2
	exit 1
}

skip() {
	# In CI the quickstart installed every peer: a missing one is a failure.
	if [ -n "${CI:-}" ]; then
		fail "$* (CI must not skip)"
	fi
	printf '%s: SKIP: %s\n' "$TEST_NAME" "$*" >&2
	exit 77
}

pass() {
	printf '%s: PASS%s\n' "$TEST_NAME" "${1:+: $1}" >&2
	exit 0
}

# need_cmd CMD...: skip the test unless every CMD is available.
need_cmd() {
	local c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || skip "$c not installed (tools/quickstart installs it)"
	done
}

need_pynbd() {
	if ! [ -x "$PY" ] || ! "$PY" -c 'import nbd' 2>/dev/null; then
		skip "python3-libnbd not installed for $PY (tools/quickstart installs it)"
	fi
}

# assert_eq WHAT EXPECTED ACTUAL
assert_eq() {
	[ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
}

_tdr_cleanup() {
	local rc=$? pid
	set +e
	for pid in "${TDR_PIDS[@]}"; do
		if kill -0 "$pid" 2>/dev/null; then
			kill -KILL "$pid" 2>/dev/null
			wait "$pid" 2>/dev/null
		fi
	done
	# Background helpers (clients) started with & by the test itself.
	local j
	for j in $(jobs -p); do
		kill -KILL "$j" 2>/dev/null
	done
	wait 2>/dev/null
	if [ "$rc" -ne 0 ] && [ -n "$T" ] && [ -d "$T" ]; then
		local f
		for f in "$T"/daemon-*.err; do
			[ -s "$f" ] || continue
			echo "--- $f (last 40 lines) ---" >&2
			tail -n 40 "$f" >&2
		done
	fi
	if [ -n "$T" ] && [ -d "$T" ]; then
		if [ -n "${TDR_KEEP:-}" ]; then
			echo "$TEST_NAME: kept $T" >&2
		else
			chmod -R u+rwx "$T" 2>/dev/null
			rm -rf "$T"
		fi
	fi
	exit "$rc"
}

# tdr_setup: check the daemon exists, make $T, install the cleanup trap.
tdr_setup() {
	[ -x "$TDR_BIN" ] || fail "daemon not built: $TDR_BIN (run make, or set TDR_BIN)"
	# A short directory: UNIX socket paths are limited to 107 bytes.
	T=$(mktemp -d "/tmp/tdr-$TEST_NAME.XXXXXX")
	trap _tdr_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

# tdr_uri SOCKET: the NBD URI of the default ("") export on a UNIX socket.
tdr_uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

# tdr_start [serve options...] SPEC
#   Starts `tapdisk-replica serve --socket <unique> OPTIONS SPEC` in the
#   background and waits until it prints `serving` on stderr and the socket
#   answers.  Sets DAEMON_PID, SOCK, URI, DAEMON_ERR.
tdr_start() {
	TDR_NDAEMONS=$((TDR_NDAEMONS + 1))
	local n=$TDR_NDAEMONS
	SOCK="$T/nbd-$n.sock"
	URI=$(tdr_uri "$SOCK")
	DAEMON_ERR="$T/daemon-$n.err"
	"$TDR_BIN" serve --socket "$SOCK" "$@" </dev/null >"$T/daemon-$n.out" 2>"$DAEMON_ERR" &
	DAEMON_PID=$!
	TDR_PIDS+=("$DAEMON_PID")
	tdr_wait_ready "$DAEMON_PID" "$DAEMON_ERR" "$SOCK"
}

# tdr_wait_ready PID ERRFILE SOCKET
tdr_wait_ready() {
	local pid=$1 err=$2 sock=$3 i=0 limit=$((TDR_TIMEOUT * 20))
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			local st=0
			wait "$pid" || st=$?
			fail "daemon exited (status $st) before it was ready; stderr: $(head -c 2000 "$err")"
		fi
		if grep -q serving "$err" 2>/dev/null && [ -S "$sock" ]; then
			return 0
		fi
		i=$((i + 1))
		[ "$i" -lt "$limit" ] || fail "daemon not ready after ${TDR_TIMEOUT}s (no 'serving' on stderr / no socket $sock)"
		sleep 0.05
	done
}

# tdr_stop [PID]: SIGTERM and wait; prints nothing, returns the exit status.
tdr_stop() {
	local pid=${1:-$DAEMON_PID} st=0 i=0 limit=$((TDR_TIMEOUT * 20))
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do
		i=$((i + 1))
		if [ "$i" -ge "$limit" ]; then
			kill -KILL "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
			fail "daemon $pid did not exit within ${TDR_TIMEOUT}s of SIGTERM"
		fi
		sleep 0.05
	done
	wait "$pid" || st=$?
	return "$st"
}

# tdr_alive [PID]: fail unless the daemon is still running.
tdr_alive() {
	local pid=${1:-$DAEMON_PID}
	kill -0 "$pid" 2>/dev/null || fail "daemon $pid died; stderr: $(tail -c 2000 "$DAEMON_ERR")"
}

# mkraw PATH SIZE: a sparse raw image (SIZE as understood by truncate).
mkraw() { truncate -s "$2" "$1"; }

# mkrandom PATH MIB: a file of random data.
mkrandom() {
	head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$1"
}

# qio URI COMMAND...: run qemu-io with one -c per argument on a raw NBD
# export and fail on any error or pattern mismatch.  qemu-io's exit status
# is not reliable for verification failures on every version, so the output
# is checked as well.  The output is left in $T/qio.out.  QIO_TIMEOUT=SECS
# in the environment: a run that does not end by then fails as held.
qio() {
	local uri=$1 st=0
	shift
	local args=()
	local c
	for c in "$@"; do
		args+=(-c "$c")
	done
	${QIO_TIMEOUT:+timeout "$QIO_TIMEOUT"} qemu-io -f raw "$uri" "${args[@]}" >"$T/qio.out" 2>&1 || st=$?
	if [ -n "${QIO_TIMEOUT:-}" ] && [ "$st" -eq 124 ]; then
		fail "qemu-io ($*) did not finish within ${QIO_TIMEOUT} s: the guest's I/O is held"
	fi
	if [ "$st" -ne 0 ] || grep -qiE 'verification failed|failed|error|Operation not permitted|Input/output' "$T/qio.out"; then
		cat "$T/qio.out" >&2
		fail "qemu-io ($*) failed (status $st)"
	fi
}

# qio_expect_fail URI REGEX COMMAND...: the commands must fail with REGEX in
# the output.
qio_expect_fail() {
	local uri=$1 re=$2
	shift 2
	local args=()
	local c
	for c in "$@"; do
		args+=(-c "$c")
	done
	qemu-io -f raw "$uri" "${args[@]}" >"$T/qio.out" 2>&1 || true
	grep -qE "$re" "$T/qio.out" || {
		cat "$T/qio.out" >&2
		fail "qemu-io ($*): expected output matching '$re'"
	}
}

# nbdinfo_field URI FIELD: one field of the first export of `nbdinfo --json`.
nbdinfo_field() {
	nbdinfo --json "$1" | "$PY" -c '
import json, sys
e = json.load(sys.stdin)["exports"][0]
v = e[sys.argv[1]]
print(json.dumps(v) if isinstance(v, (bool, list)) else v)
' "$2"
}

# same_file A B: byte-exact comparison, fail with the first difference.
same_file() {
	cmp "$1" "$2" >"$T/cmp.out" 2>&1 || fail "$1 and $2 differ: $(cat "$T/cmp.out")"
}

# one_line_error FILE: the file is exactly one line, starting with
# "tapdisk-replica:".  Prints the line.
one_line_error() {
	local f=$1 lines
	lines=$(wc -l <"$f")
	if [ "$lines" -ne 1 ] || [ -n "$(tail -c 1 "$f")" ]; then
		fail "stderr should be exactly one line, got $lines line(s): $(head -c 2000 "$f")"
	fi
	grep -q '^tapdisk-replica: ' "$f" || fail "stderr should start with 'tapdisk-replica: ': $(cat "$f")"
	cat "$f"
}

# secondary_chain SIZE_MIB: $T/{secondary,hidden,active}.vhd made with
# vhd-util, and `serve` of replica:mode=secondary over it with its export on
# $T/export.sock and a control socket.  Sets EXPURI, SVM, VHDUTIL, CTL and
# defines ctl (tdr-ctl replica on minor 0) and state.
#
# With SECONDARY_RAW=1 the secondary disk is a raw (sparse) file,
# $T/secondary.img, and hidden a differencing VHD over it (vhd-util
# snapshot -m); else a dynamic VHD, $T/secondary.vhd.
secondary_chain() {
	VHDUTIL=$TDR_BUILDDIR/tools/vhd-util
	CTL=$TDR_BUILDDIR/tools/tdr-ctl
	if [ -n "${SECONDARY_RAW:-}" ]; then
		truncate -s "${1}M" "$T/secondary.img"
		"$VHDUTIL" snapshot -n "$T/hidden.vhd" -p "$T/secondary.img" -m
	else
		"$VHDUTIL" create -n "$T/secondary.vhd" -s "$1"
		"$VHDUTIL" snapshot -n "$T/hidden.vhd" -p "$T/secondary.vhd"
	fi
	"$VHDUTIL" snapshot -n "$T/active.vhd" -p "$T/hidden.vhd"
	EXPURI=$(tdr_uri "$T/export.sock")
	tdr_start --control "$T/ctl.sock" "replica:mode=secondary,addr=unix:$T/export.sock|vhd:$T/active.vhd"
	SVM=$URI
	ctl() { "$CTL" replica -s "$T/ctl.sock" -m 0 "$@"; }
	state() { ctl status state | sed -n 's/^state=//p'; }
}

# secondary_with_view SIZE_MIB PRIMARY_MIB SVM_FROM_MIB SVM_MIB: a secondary
# chain of SIZE_MIB synced with 0x11 (state none), started, then written:
# 0x22 by the primary over [0, PRIMARY_MIB) (the originals go into hidden)
# and 0x33 by the SVM over [SVM_FROM_MIB, +SVM_MIB) (into active); the SVM's
# view is left in $T/view.raw.
secondary_with_view() {
	secondary_chain "$1"
	qio "$EXPURI" "write -P 0x11 0 ${1}M"
	ctl start
	qio "$EXPURI" "write -P 0x22 0 ${2}M"
	qio "$SVM" "write -P 0x33 ${3}M ${4}M"
	nbdcopy "$SVM" "$T/view.raw"
}

# secondary_is_view: after secondary_chain's daemon stopped, the secondary
# disk, read by qemu-img (which knows nothing of our code), equals
# $T/view.raw byte for byte, and vhd-util check passes on all three files.
# With SECONDARY_RAW=1 the raw secondary disk itself is compared, and must
# have kept its size.
secondary_is_view() {
	local f files="secondary hidden active"
	if [ -n "${SECONDARY_RAW:-}" ]; then
		assert_eq "raw secondary disk's size" "$(stat -c %s "$T/view.raw")" \
			"$(stat -c %s "$T/secondary.img")"
		same_file "$T/view.raw" "$T/secondary.img"
		files="hidden active"
	else
		qemu-img convert -f vpc -O raw "$T/secondary.vhd" "$T/secondary.raw"
		truncate -s "$(stat -c %s "$T/view.raw")" "$T/secondary.raw"
		same_file "$T/view.raw" "$T/secondary.raw"
	fi
	for f in $files; do
		"$VHDUTIL" check -n "$T/$f.vhd" >/dev/null || fail "vhd-util check $f.vhd failed"
	done
}

# TLS test material: tls_mkca and tls_mkcert (needs certtool, from gnutls-bin).
# shellcheck source=tests/tls-pki.sh
. "$TDR_SRCDIR/tests/tls-pki.sh"
