#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# TLS on the NBD server (serve --tls): NBD_OPT_STARTTLS with GnuTLS.
#   1. --tls require with a pre-shared key: libnbd (nbdinfo, nbdcopy,
#      64 MiB each way, byte-exact) and qemu's own TLS client (qemu-io)
#      read and write; a plain client is refused with TLS required; the
#      wrong key and an unknown user fail, and the server goes on serving
#   2. --tls on: plain and TLS clients both served; STARTTLS forgets the
#      options negotiated in the clear (an injected structured-reply
#      request), and is refused to a client that is not fixed newstyle
#   3. X.509 with --tls-verify-peer: a client with a certificate from the
#      CA is served; one without a certificate, or from another CA, is not
#   4. bad options: one line each, nothing served
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo nbdcopy qemu-io psktool certtool truncate cmp timeout
need_pynbd
tdr_setup

psktool -u alice -p "$T/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
psktool -u alice -p "$T/other.psk" >/dev/null 2>&1 || fail "psktool failed"
mkdir -p "$T/qemu-psk" "$T/qemu-other"
cp "$T/keys.psk" "$T/qemu-psk/keys.psk"
cp "$T/other.psk" "$T/qemu-other/keys.psk"

psk_uri() { printf 'nbds+unix://alice@/?socket=%s&tls-psk-file=%s' "$1" "${2:-$T/keys.psk}"; }
qemu_tls() {
	local sock=$1 dir=$2
	shift 2
	qemu-io --object "tls-creds-psk,id=tls0,endpoint=client,dir=$dir,username=alice" \
		--image-opts "driver=nbd,server.type=unix,server.path=$sock,tls-creds=tls0" "$@"
}

# --- 1. --tls require, pre-shared key
mkraw "$T/disk.img" 64M
head -c 64M /dev/urandom >"$T/src.img"
tdr_start --tls require --tls-psk "$T/keys.psk" "aio:$T/disk.img"
S=$SOCK
assert_eq "size over TLS" 67108864 "$(nbdinfo --size "$(psk_uri "$S")")"
nbdinfo --json "$(psk_uri "$S")" | grep -q '"TLS": true' || fail "nbdinfo does not report TLS"
nbdcopy "$T/src.img" "$(psk_uri "$S")" || fail "nbdcopy into the TLS export failed"
cmp "$T/src.img" "$T/disk.img" || fail "64 MiB written over TLS differ"
nbdcopy "$(psk_uri "$S")" "$T/back.img" || fail "nbdcopy out of the TLS export failed"
cmp "$T/src.img" "$T/back.img" || fail "64 MiB read over TLS differ"
out=$(qemu_tls "$S" "$T/qemu-psk" -c "write -P 0x5a 3M 192k" -c "read -P 0x5a 3M 192k" 2>&1) ||
	fail "qemu-io over TLS failed: $out"
cmp -s <(head -c $((3 * 1048576 + 196608)) "$T/disk.img" | tail -c 196608) \
	<(head -c 196608 /dev/zero | tr '\0' '\132') || fail "qemu-io's write over TLS is not in the file"
log "require: libnbd and qemu clients byte-exact over TLS"

out=$(nbdinfo --size "nbd+unix:///?socket=$S" 2>&1) && fail "a plain client was served: $out"
grep -q "requires TLS\|TLS encryption first\|not supported" <<<"$out" || fail "plain client: unexpected error: $out"
out=$(timeout 20 nbdinfo --size "$(psk_uri "$S" "$T/other.psk")" 2>&1) && fail "the wrong key was accepted: $out"
out=$(timeout 20 nbdinfo --size "nbds+unix://bob@/?socket=$S&tls-psk-file=$T/keys.psk" 2>&1) &&
	fail "an unknown user was accepted: $out"
out=$(qemu_tls "$S" "$T/qemu-other" -c "read 0 4k" 2>&1) && fail "qemu-io with the wrong key was served: $out"
assert_eq "still serving after refusals" 67108864 "$(nbdinfo --size "$(psk_uri "$S")")"
grep -q "TLS handshake failed" "$DAEMON_ERR" || fail "the failed handshakes were not logged: $(tail -5 "$DAEMON_ERR")"
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"
log "require: plain client, wrong key, unknown user refused; the server went on"

# --- 2. --tls on: both kinds of client
tdr_start --tls on --tls-psk "$T/keys.psk" "aio:$T/disk.img"
assert_eq "plain client, --tls on" 67108864 "$(nbdinfo --size "nbd+unix:///?socket=$SOCK")"
nbdinfo --json "$(psk_uri "$SOCK")" | grep -q '"TLS": true' || fail "--tls on: no TLS for a TLS client"

# STARTTLS drops what was negotiated in the clear (proto.md): a man in the
# middle injects NBD_OPT_STRUCTURED_REPLY before the client's STARTTLS and
# relays the rest; the client, which asked for simple replies, must get
# them.  And a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE gets no
# TLS.  (Before the fix, the injected option survived: "server sent
# unexpected structured reply".)
out=$(PYTHONPATH=$TESTDIR "$PY" - "$SOCK" "$T/mitm.sock" "$T/keys.psk" "$T/disk.img" <<'PYEOF' 2>&1
import socket, struct, sys, threading, nbd
from nbdwire import (OPT_MAGIC, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_POLICY,
                     recv_exact as recvn, recv_option_reply)
server, proxy_path, psk, image = sys.argv[1:5]
def relay(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def mitm(lsock):
    c, _ = lsock.accept()
    s = socket.socket(socket.AF_UNIX)
    s.connect(server)
    c.sendall(recvn(s, 18))                  # greeting
    s.sendall(recvn(c, 4))                   # client flags
    hdr = recvn(c, 16)
    magic, opt, ln = struct.unpack('>QII', hdr)
    data = recvn(c, ln)
    if opt != OPT_STARTTLS:
        print('client sent option %d, not STARTTLS' % opt)
        sys.exit(1)
    s.sendall(struct.pack('>QII', OPT_MAGIC, OPT_STRUCTURED_REPLY, 0))
    _, rtype, _ = recv_option_reply(s)
    if rtype != REP_ACK:
        print('the injected option was not acknowledged: %d' % rtype)
        sys.exit(1)
    s.sendall(hdr + data)
    threading.Thread(target=relay, args=(s, c), daemon=True).start()
    relay(c, s)
l = socket.socket(socket.AF_UNIX)
l.bind(proxy_path)
l.listen(1)
threading.Thread(target=mitm, args=(l,), daemon=True).start()
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(psk)
h.set_tls_username('alice')
h.set_request_structured_replies(False)
h.connect_unix(proxy_path)
assert h.get_tls_negotiated()
assert not h.get_structured_replies_negotiated()
got = h.pread(65536, 0)
with open(image, 'rb') as f:
    want = f.read(65536)
if got != want:
    print('read through the injected session differs from the file')
    sys.exit(1)
h.shutdown()

# Not fixed newstyle: client flags 0, then STARTTLS -> NBD_REP_ERR_POLICY.
s = socket.socket(socket.AF_UNIX)
s.connect(server)
recvn(s, 18)
s.sendall(struct.pack('>I', 0))
s.sendall(struct.pack('>QII', OPT_MAGIC, OPT_STARTTLS, 0))
opt, rtype, _ = recv_option_reply(s)
if (opt, rtype) != (OPT_STARTTLS, REP_ERR_POLICY):
    print('STARTTLS from a client without FIXED_NEWSTYLE: reply %#x, not NBD_REP_ERR_POLICY' % rtype)
    sys.exit(1)
print('ok')
PYEOF
) || fail "STARTTLS and state negotiated in the clear: $out"
assert_eq "STARTTLS checks" ok "$(tail -1 <<<"$out")"
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"
log "on: plain and TLS clients served; STARTTLS forgets what came before it"

# --- 3. X.509, client certificates required
tls_mkca "$T/ca"
tls_mkca "$T/otherca"
tls_mkcert "$T/server" server "$T/ca" server
tls_mkcert "$T/client" client "$T/ca" client
tls_mkcert "$T/stranger" client "$T/otherca" client
mkdir -p "$T/nocert"
cp "$T/ca/ca-cert.pem" "$T/nocert/"
# libnbd checks the server's name only on TCP; over the socket, the chain.
x509_uri() { printf 'nbds+unix:///?socket=%s&tls-certificates=%s' "$1" "$2"; }
tdr_start --tls require --tls-certificates "$T/server" --tls-verify-peer "aio:$T/disk.img"
assert_eq "x509 client" 67108864 "$(nbdinfo --size "$(x509_uri "$SOCK" "$T/client")")"
out=$(timeout 20 nbdinfo --size "$(x509_uri "$SOCK" "$T/nocert")" 2>&1) && fail "a client without a certificate was served: $out"
out=$(timeout 20 nbdinfo --size "$(x509_uri "$SOCK" "$T/stranger")" 2>&1) && fail "a client from another CA was served: $out"
assert_eq "x509 client after refusals" 67108864 "$(nbdinfo --size "$(x509_uri "$SOCK" "$T/client")")"
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"
log "x509: a client certificate from the CA is needed"

# --- 4. options refused
# refused WANT ARGS...: the daemon refuses to start with one line matching WANT
refused() {
	local want=$1 st=0
	shift
	timeout -k 5 "$TDR_TIMEOUT" "$TDR_BIN" serve --socket "$T/r.sock" "$@" "aio:$T/disk.img" \
		</dev/null >"$T/r.out" 2>"$T/r.err" || st=$?
	if [ "$st" -eq 0 ] || [ "$st" -eq 124 ]; then
		fail "serve $* started (status $st)"
	fi
	[ "$(wc -l <"$T/r.err")" -eq 1 ] || fail "serve $*: not one line: $(cat "$T/r.err")"
	grep -qE -e "$want" "$T/r.err" || fail "serve $*: expected /$want/, got: $(cat "$T/r.err")"
	log "refused: $(cat "$T/r.err")"
}
refused "need --tls on or --tls require" --tls-psk "$T/keys.psk"
refused "--tls needs --tls-psk FILE or --tls-certificates DIR" --tls require
refused "bad --tls 'maybe'" --tls maybe
refused "tls-psk=$T/nope.psk: cannot read it" --tls require --tls-psk "$T/nope.psk"
# A bad key file is refused at start, not at each client's handshake.
printf 'alice:this-is-not-hex\n' >"$T/bad.psk"
refused "tls-psk=$T/bad.psk: line 1: the key is not hexadecimal" --tls require --tls-psk "$T/bad.psk"
printf '# keys\n\nalice:abc\n' >"$T/odd.psk"
refused "tls-psk=$T/odd.psk: line 3: the key has an odd number of hex digits" --tls require --tls-psk "$T/odd.psk"
printf '# no keys\n' >"$T/empty.psk"
refused "tls-psk=$T/empty.psk: no key in it" --tls require --tls-psk "$T/empty.psk"
refused "cannot load server-cert.pem and server-key.pem" --tls require --tls-certificates "$T/nocert"
refused "--tls-verify-peer checks X.509 client certificates" --tls require --tls-psk "$T/keys.psk" --tls-verify-peer
pass "TLS export: PSK and X.509, libnbd and qemu clients, byte-exact; refusals clean"
