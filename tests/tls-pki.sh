# SPDX-License-Identifier: BSD-3-Clause
# shellcheck shell=bash
#
# TLS material for the integration tests and the benchmarks: a private CA
# and certificates it signs, made with certtool (gnutls-bin).  Sourced,
# never run.  On failure a function says what failed on stderr and returns
# 1, so a caller under `set -e` stops there.

# tls_mkca DIR: a self-signed CA (ca-key.pem, ca-cert.pem) in DIR.
tls_mkca() {
	mkdir -p "$1"
	certtool --generate-privkey >"$1/ca-key.pem" 2>/dev/null ||
		{ echo "tls-pki: certtool cannot make the CA key (apt-get install gnutls-bin)" >&2; return 1; }
	printf 'cn = test CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$1/ca.info"
	certtool --generate-self-signed --load-privkey "$1/ca-key.pem" --template "$1/ca.info" \
		--outfile "$1/ca-cert.pem" >/dev/null 2>&1 ||
		{ echo "tls-pki: certtool cannot sign the CA in $1" >&2; return 1; }
}

# tls_mkcert DIR NAME CA_DIR server|client [TEMPLATE_LINE]: NAME-key.pem and
# NAME-cert.pem in DIR, signed by CA_DIR's CA, and that CA's ca-cert.pem:
# the layout of a --tls-certificates directory (nbdkit, qemu-nbd,
# tapdisk-replica serve).
tls_mkcert() {
	local dir=$1 name=$2 ca=$3 role=$4 extra=${5:-}
	mkdir -p "$dir"
	certtool --generate-privkey >"$dir/$name-key.pem" 2>/dev/null ||
		{ echo "tls-pki: certtool cannot make the key of $name" >&2; return 1; }
	printf 'cn = %s\ntls_www_%s\nencryption_key\nsigning_key\nexpiration_days = 2\n%s\n' \
		"$name" "$role" "$extra" >"$dir/$name.info"
	certtool --generate-certificate --load-privkey "$dir/$name-key.pem" \
		--load-ca-certificate "$ca/ca-cert.pem" --load-ca-privkey "$ca/ca-key.pem" \
		--template "$dir/$name.info" --outfile "$dir/$name-cert.pem" >/dev/null 2>&1 ||
		{ echo "tls-pki: certtool cannot sign the certificate of $name" >&2; return 1; }
	cp "$ca/ca-cert.pem" "$dir/"
}
