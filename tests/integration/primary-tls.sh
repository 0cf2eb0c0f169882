#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# TLS on the primary's link (client=libnbd).
#   0. bad TLS options: the daemon refuses to start, one line each  The peers are nbdkit with
# --tls=require: over a file, and as a TLS proxy (its nbd plugin) in front of
# tapdisk-replica's own secondary, whose export has no TLS of its own.
#   1. pre-shared key: replication, a checkpoint, byte-exact; link_tls=1
#   2. the same through the proxy into our secondary: the SVM's view matches;
#      and our secondary serving its export over TLS itself (tls= in its
#      spec), which a primary without TLS cannot use
#   3. X.509 over TCP: a CA, a server and a client certificate; a server
#      from another CA or for another address is refused, tls-verify=off
#      connects; certificates over a UNIX socket (unverifiable) are refused
#   4. the wrong key, an unknown user, tls=require against a plain server:
#      start fails with one clear line, the guest's I/O goes on, nothing lost;
#      tls=on against a plain server runs in the clear (link_tls=0)
#   5. the TLS server killed under replication: the link breaks, the guest
#      goes on, a new server with the same key, resync incremental over TLS,
#      byte-exact
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io nbdkit nbdcopy psktool certtool truncate cmp
tdr_setup
VU_BIN="$TDR_BUILDDIR/tools/vhd-util"

# Generous: a TLS handshake under ASan on a loaded machine takes seconds.
TIMEOUT_MS=10000

# tls_nbdkit_start SOCKET TLS_ARGS... -- PLUGIN ARGS...: nbdkit that requires TLS.
tls_nbdkit_start() {
	local sock=$1
	shift
	local tls=() a
	while [ $# -gt 0 ]; do
		a=$1
		shift
		[ "$a" = -- ] && break
		tls+=("$a")
	done
	peer_start nbdkit "$sock" nbdkit -f -U "$sock" --tls=require "${tls[@]}" "$@"
}

fresh_primary() {
	rm -f "$T/primary.img"
	mkraw "$T/primary.img" 32M
	primary_start "$1" "$2"
}

workload() {
	local seed=$1
	qio "$PURI" "write -P $seed 0 4k" "write -P $((seed + 1)) 1M 3M" \
		"write -P $((seed + 2)) 17k 5k" "write -z 6M 64k" \
		"aio_write -P $((seed + 3)) 8M 64k" "aio_write -P $((seed + 4)) 9M 64k" aio_flush \
		"write -P $((seed + 5)) 31M 1M" flush
}

# start_fails REGEX: start fails with one line matching REGEX; the guest is fine.
n=0
start_fails() {
	local re=$1 out st=0
	n=$((n + 1))
	out=$(pctl start 2>&1) || st=$?
	[ "$st" -ne 0 ] || fail "start succeeded, expected /$re/: $out"
	printf '%s\n' "$out" | grep -qE "$re" || fail "start: expected /$re/, got: $out"
	[ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] || fail "start: not one line: $out"
	assert_eq "state after a failed start" none "$(pstatus state)"
	assert_eq "link_tls after a failed start" 0 "$(pstatus link_tls)"
	qio "$PURI" "write -P $((0x60 + n)) $((n))M 64k" "read -P $((0x60 + n)) $((n))M 64k"
	log "refused as expected: $out"
}

# --- keys and certificates
psktool -u alice -p "$T/keys.psk" >/dev/null 2>&1 || fail "psktool -u alice failed"
psktool -u alice -p "$T/other.psk" >/dev/null 2>&1 || fail "psktool (second key) failed"
grep -q '^alice:[0-9a-f]\{64\}$' "$T/keys.psk" || fail "psktool wrote an unexpected file: $(cat "$T/keys.psk")"
cmp -s "$T/keys.psk" "$T/other.psk" && fail "psktool made the same key twice"

tls_mkca "$T/ca"
tls_mkca "$T/otherca"
tls_mkcert "$T/server" server "$T/ca" server "ip_address = 127.0.0.1"
tls_mkcert "$T/server2" server "$T/ca" server "ip_address = 127.0.0.2"
tls_mkcert "$T/client" client "$T/ca" client
# The stranger's client certificate is fine, but it trusts another CA.
mkdir -p "$T/stranger"
cp "$T/client/client-cert.pem" "$T/client/client-key.pem" "$T/stranger/"
cp "$T/otherca/ca-cert.pem" "$T/stranger/"

# --- 0. options the daemon refuses at once: one line, the problem, what to do
# spec_refused OPTIONS REGEX
spec_refused() {
	local opts=$1 re=$2 st=0
	mkraw "$T/spec.img" 1M
	timeout -k 5 "$TDR_TIMEOUT" "$TDR_BIN" serve --socket "$T/spec.sock" \
		"replica:mode=primary,addr=unix:$T/none.sock,$opts|aio:$T/spec.img" \
		</dev/null >"$T/spec.out" 2>"$T/spec.err" || st=$?
	if [ "$st" -eq 0 ] || [ "$st" -eq 124 ]; then
		fail "'$opts': exit status $st, expected a refusal"
	fi
	[ "$(wc -l <"$T/spec.err")" -eq 1 ] || fail "'$opts': stderr is not one line: $(cat "$T/spec.err")"
	grep -qE "^tapdisk-replica: replica:.*: $re" "$T/spec.err" ||
		fail "'$opts': expected /$re/, got: $(cat "$T/spec.err")"
	grep -q '; .' "$T/spec.err" || fail "'$opts': no advice after '; ': $(cat "$T/spec.err")"
	log "refused at open: $(cat "$T/spec.err")"
}
spec_refused "tls-psk=$T/keys.psk" "tls-psk= given but tls=off; add tls=require"
spec_refused "tls-verify=off" "tls-verify= given but tls=off"
spec_refused "tls=maybe" "tls=maybe: not a TLS mode; use tls=require"
spec_refused "tls=require,tls-psk=$T/missing.psk" "tls-psk=$T/missing.psk: cannot read it: No such file or directory; create it with psktool"
spec_refused "tls=require,tls-certificates=$T/missing" "tls-certificates=$T/missing: cannot open the directory: No such file or directory; give a directory"
spec_refused "tls=require,tls-psk=$T/keys.psk,tls-certificates=$T/client" "tls-psk= and tls-certificates= both given"
spec_refused "tls=require,client=native" "tls=require needs client=libnbd, the native client has no TLS; drop client=native"
spec_refused "tls-fips=on" "unknown option 'tls-fips'; the TLS options are"
spec_refused "tls=require,tls-psk=" "tls-psk= needs a value; leave the option out"

PSK_OPTS="timeout=$TIMEOUT_MS,export=secondary,tls=require,tls-psk=$T/keys.psk,tls-username=alice"

# --- 1. pre-shared key, nbdkit's file plugin
mkraw "$T/sec.img" 32M
tls_nbdkit_start "$T/psk.sock" "--tls-psk=$T/keys.psk" -- file "$T/sec.img"
fresh_primary "unix:$T/psk.sock" "$PSK_OPTS"
pctl_ok start >/dev/null
assert_eq "psk: state" running "$(pstatus state)"
assert_eq "psk: link_tls" 1 "$(pstatus link_tls)"
workload 10
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
workload 40
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
assert_eq "psk: link_errors" 0 "$(pstatus link_errors)"
grep -q "connected to unix:$T/psk.sock export 'secondary' (33554432 bytes, flush, zero, TLS, libnbd client)" "$PERR" ||
	fail "psk: the primary's log does not report a TLS link: $(grep 'connected to' "$PERR")"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
log "psk: byte-exact over TLS"

# --- 2. our own secondary behind nbdkit's TLS proxy
secondary_start tdrsec 32
tls_nbdkit_start "$T/proxy.sock" "--tls-psk=$T/keys.psk" -- nbd "socket=$SEC_SOCK" export=secondary
proxy_pid=$PEER_PID
fresh_primary "unix:$T/proxy.sock" "$PSK_OPTS"
pctl_ok start >/dev/null
assert_eq "proxy: link_tls" 1 "$(pstatus link_tls)"
workload 70
pctl_ok checkpoint >/dev/null
rctl "$SEC_CTL" checkpoint >/dev/null || fail "secondary checkpoint failed"
svm_view_same
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
log "proxy: our secondary byte-exact behind a TLS proxy"

# --- 2b. our own secondary serving its export over TLS itself
rm -f "$T/tlssec-disk.vhd" "$T/tlssec-hidden.vhd" "$T/tlssec-active.vhd"
"$VU_BIN" create -n "$T/tlssec-disk.vhd" -s 32 >/dev/null || fail "vhd-util create"
"$VU_BIN" snapshot -n "$T/tlssec-hidden.vhd" -p "$T/tlssec-disk.vhd" >/dev/null || fail "vhd-util snapshot"
"$VU_BIN" snapshot -n "$T/tlssec-active.vhd" -p "$T/tlssec-hidden.vhd" >/dev/null || fail "vhd-util snapshot"
tdr_start --control "$T/tlssec-ctl.sock" \
	"replica:mode=secondary,addr=unix:$T/tlssec.sock,export=secondary,tls=require,tls-psk=$T/keys.psk|vhd:$T/tlssec-active.vhd"
SEC_PID=$DAEMON_PID
SEC_URI=$URI
SEC_CTL="$T/tlssec-ctl.sock"
rctl "$SEC_CTL" start >/dev/null || fail "secondary start failed"
wait_connectable "$T/tlssec.sock" "$SEC_PID" "$DAEMON_ERR"
# A primary without TLS is turned away, the guest unharmed.
fresh_primary "unix:$T/tlssec.sock" "timeout=$TIMEOUT_MS"
start_fails "start failed: cannot connect to the secondary .*requires TLS: add tls=require"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
fresh_primary "unix:$T/tlssec.sock" "$PSK_OPTS"
pctl_ok start >/dev/null
assert_eq "our TLS secondary: link_tls" 1 "$(pstatus link_tls)"
workload 220
pctl_ok checkpoint >/dev/null
rctl "$SEC_CTL" checkpoint >/dev/null || fail "secondary checkpoint failed"
svm_view_same
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
tdr_stop "$SEC_PID" || fail "secondary exited with status $? on SIGTERM"
log "our secondary's own TLS export: byte-exact; a plain primary refused"

# --- 3. X.509, over TCP: libnbd checks a certificate only against an
# address it connects to by name, so the server's certificate names 127.0.0.1.
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkraw "$T/x509.img" 32M
# x509_nbdkit_start CERT_DIR: nbdkit on 127.0.0.1:$port with X.509; sets x509_pid.
x509_nbdkit_start() {
	local i=0
	nbdkit -f -i 127.0.0.1 -p "$port" --tls=require "--tls-certificates=$1" file "$T/x509.img" \
		</dev/null >"$T/x509.out" 2>"$T/x509.err" &
	x509_pid=$!
	TDR_PIDS+=("$x509_pid")
	until "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' \
		"$port" 2>/dev/null; do
		kill -0 "$x509_pid" 2>/dev/null || fail "nbdkit ($1) exited: $(head -c 2000 "$T/x509.err")"
		i=$((i + 1))
		[ "$i" -lt $((TDR_TIMEOUT * 20)) ] || fail "nbdkit ($1) not listening on port $port"
		sleep 0.05
	done
}
x509_nbdkit_start "$T/server"
fresh_primary "tcp:127.0.0.1:$port" "timeout=$TIMEOUT_MS,tls=require,tls-certificates=$T/client"
pctl_ok start >/dev/null
assert_eq "x509: link_tls" 1 "$(pstatus link_tls)"
workload 100
pctl_ok checkpoint >/dev/null
same_as_primary "$T/x509.img"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"

fresh_primary "tcp:127.0.0.1:$port" "timeout=$TIMEOUT_MS,tls=require,tls-certificates=$T/stranger"
start_fails "^tdr-ctl: .*start failed: .*TLS handshake failed: gnutls_handshake: Error in the certificate verification"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
# A certificate for another name, from the trusted CA.
fresh_primary "tcp:127.0.0.1:$port" "timeout=$TIMEOUT_MS,tls=require,tls-certificates=$T/client"
kill "$x509_pid"; wait "$x509_pid" 2>/dev/null || true
x509_nbdkit_start "$T/server2"
start_fails "^tdr-ctl: .*start failed: .*TLS handshake failed: gnutls_handshake: Error in the certificate verification"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
fresh_primary "tcp:127.0.0.1:$port" "timeout=$TIMEOUT_MS,tls=require,tls-certificates=$T/stranger,tls-verify=off"
pctl_ok start >/dev/null
assert_eq "x509, verify off: link_tls" 1 "$(pstatus link_tls)"
workload 130
pctl_ok checkpoint >/dev/null
same_as_primary "$T/x509.img"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
kill "$x509_pid"; wait "$x509_pid" 2>/dev/null || true
# Over a UNIX socket libnbd would accept any certificate: refused unless asked.
fresh_primary "unix:$T/psk.sock" "timeout=$TIMEOUT_MS,tls=require,tls-certificates=$T/client"
start_fails "^tdr-ctl: .*start refused: TLS with certificates over a UNIX socket: libnbd cannot verify"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
log "x509: trusted CA and name replicate; another CA or name refused; tls-verify=off connects; UNIX socket refused"

# --- 4. refusals: the guest is never harmed
fresh_primary "unix:$T/psk.sock" "timeout=$TIMEOUT_MS,tls=require,tls-psk=$T/other.psk,tls-username=alice"
start_fails "^tdr-ctl: .*start failed: cannot connect to the secondary unix:$T/psk.sock export 'secondary': TLS handshake failed: gnutls_handshake: The TLS connection was non-properly terminated"
case $(pctl_ok get-error) in
E*"TLS handshake failed: gnutls_handshake: "*) ;;
*) fail "wrong key: get-error says '$(pctl get-error)'" ;;
esac
qio "$PURI" "write -P 0x77 20M 1M" flush
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
qemu-io -f raw -r "$T/primary.img" -c "read -P 0x77 20M 1M" >/dev/null ||
	fail "wrong key: a write acknowledged to the guest is not in the local image"

fresh_primary "unix:$T/psk.sock" "timeout=$TIMEOUT_MS,tls=require,tls-psk=$T/keys.psk,tls-username=bob"
start_fails "TLS handshake failed: .*keys.psk: username bob was not found in PSK file"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"

mkraw "$T/plain.img" 32M
nbdkit_start "$T/plain.sock" "$T/plain.img"
plain_pid=$PEER_PID
fresh_primary "unix:$T/plain.sock" "$PSK_OPTS"
start_fails "server refused TLS"
assert_eq "plain server, tls=require: error" ENOTSUP "$(pstatus error)"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
fresh_primary "unix:$T/plain.sock" "timeout=$TIMEOUT_MS,tls=on,tls-psk=$T/keys.psk,tls-username=alice"
pctl_ok start >/dev/null
assert_eq "plain server, tls=on: state" running "$(pstatus state)"
assert_eq "plain server, tls=on: link_tls" 0 "$(pstatus link_tls)"
workload 160
pctl_ok checkpoint >/dev/null
same_as_primary "$T/plain.img"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
kill "$plain_pid"; wait "$plain_pid" 2>/dev/null || true
log "refusals: one line each, the guest unharmed; tls=on falls back to plain NBD"

# --- 5. the TLS server killed under replication, then resync over TLS
psk_pid=$(pgrep -f "nbdkit -f -U $T/psk.sock") || fail "the PSK server is gone"
fresh_primary "unix:$T/psk.sock" "$PSK_OPTS"
pctl_ok start >/dev/null
workload 190
pctl_ok checkpoint >/dev/null
kill -KILL "$psk_pid"; wait "$psk_pid" 2>/dev/null || true
guest_qio "$PURI" "write -P 0x51 4M 1M" "write -P 0x52 30M 64k"
assert_eq "killed: state" broken "$(pstatus state)"
assert_eq "killed: link_tls" 0 "$(pstatus link_tls)"
tls_nbdkit_start "$T/psk.sock" "--tls-psk=$T/keys.psk" -- file "$T/sec.img"
pctl_ok resync incremental >/dev/null
wait_pstate running
assert_eq "after resync: link_tls" 1 "$(pstatus link_tls)"
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
tdr_stop "$PRIMARY_PID" || fail "primary exited with status $? on SIGTERM"
pass "TLS links (PSK, X.509, a proxy before our secondary) byte-exact; bad keys refused cleanly"
