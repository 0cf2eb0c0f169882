# SPDX-License-Identifier: BSD-3-Clause
# shellcheck shell=bash
#
# Shared helpers for the benchmark scripts.  Sourced, never run.
#
# A script sets BENCH (its name, for messages) and W (its scratch
# directory) and keeps the server it started in SERVER_PID.

: "${BENCH:=$(basename "$0")}"
SERVER_PID=${SERVER_PID:-}

die() {
	printf '%s: %s\n' "$BENCH" "$*" >&2
	exit 1
}

# need_commands HINT CMD...: stop, naming the first CMD not on PATH and
# what to do about it.
need_commands() {
	local hint=$1 c
	shift
	for c; do
		command -v "$c" >/dev/null 2>&1 || die "$c not found; $hint"
	done
}

# wait_nbd_server NAME PID SOCKET URI LOG: wait up to 20 s until the server
# PID answers on URI; stop with the tail of LOG if it exits first or never
# answers.
wait_nbd_server() {
	local name=$1 pid=$2 sock=$3 uri=$4 log=$5 i
	for ((i = 0; i < 400; i++)); do
		kill -0 "$pid" 2>/dev/null || die "$name exited before it was ready: $(tail -n 5 "$log")"
		if [ -S "$sock" ] && nbdinfo --size "$uri" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.05
	done
	die "$name not ready after 20 s: $(tail -n 5 "$log")"
}

# stop_server: SIGTERM the server in SERVER_PID, if any, and reap it.
stop_server() {
	[ -n "$SERVER_PID" ] || return 0
	kill -TERM "$SERVER_PID" 2>/dev/null || true
	wait "$SERVER_PID" 2>/dev/null || true
	SERVER_PID=""
}

# make_pki DIR: a CA, and a server and a client certificate signed by it,
# in DIR/server and DIR/client (the --tls-certificates layout); kept if
# already there.
make_pki() {
	local d=$1
	[ -s "$d/client/client-cert.pem" ] && return 0
	tls_mkca "$d" || die "cannot make a CA in $d"
	tls_mkcert "$d/server" server "$d" server || die "cannot make the server certificate"
	tls_mkcert "$d/client" client "$d" client || die "cannot make the client certificate"
}

# shellcheck source=tests/tls-pki.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tls-pki.sh"
