/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * TLS for the NBD server, with GnuTLS: the server's credentials
 * (nbd_server_set_tls) and the transport a connection switches to after
 * NBD_OPT_STARTTLS (nbd_tls_wrap).  The protocol code does not change: it
 * moves bytes through struct nbd_transport_ops as before.
 *
 * Non-blocking throughout.  The handshake runs inside recv() until it is
 * done (its messages are small, so its writes never find a full socket in
 * practice; a write that would block fails the handshake instead of
 * spinning).  A record that gnutls_record_send() could not finish must be
 * sent again with no data: sendv() then reports it as written once it is
 * out, which is where the caller's next iovec begins anyway.
 */
#include <ctype.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nbd-int.h"
#include "tdr/log.h"

/*
 * AES-GCM before ChaCha20: with a pre-shared key TLS 1.3 allows only
 * SHA-256 suites, and in GnuTLS's NORMAL order ChaCha20-Poly1305 then
 * comes first, several times slower than AES-128-GCM on CPUs with AES
 * instructions (docs/benchmarks.md, "TLS on the link").  The server's
 * order decides.
 */
#define TLS_PRIORITY_PSK  "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305:+ECDHE-PSK:+DHE-PSK:+PSK:%SERVER_PRECEDENCE"
#define TLS_PRIORITY_X509 "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305:%SERVER_PRECEDENCE"

struct nbd_tls {
	enum nbd_tls_mode mode;
	gnutls_psk_server_credentials_t psk;
	gnutls_certificate_credentials_t x509;
	bool verify_peer;
	gnutls_priority_t priority;
};

struct tls_conn {
	gnutls_session_t session;
	bool handshake_done;
	size_t send_pending;	/* bytes of a record gnutls holds after EAGAIN */
	unsigned id;
};

int nbd_tls_parse_mode(const char *s, enum nbd_tls_mode *out)
{
	static const char *const names[] = {
		[NBD_TLS_OFF] = "off", [NBD_TLS_ON] = "on", [NBD_TLS_REQUIRE] = "require",
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i]) == 0) {
			*out = (enum nbd_tls_mode)i;
			return 0;
		}
	}
	return -EINVAL;
}

/* 0 if line (without its newline) is "NAME:HEXKEY", else a reason. */
static const char *psk_line_defect(const char *line)
{
	const char *colon = strchr(line, ':'), *p;

	if (!colon)
		return "no ':' between the name and the key";
	if (colon == line)
		return "an empty name";
	if (!colon[1])
		return "an empty key";
	for (p = colon + 1; *p; p++)
		if (!isxdigit((unsigned char)*p))
			return "the key is not hexadecimal";
	if ((p - colon - 1) % 2)
		return "the key has an odd number of hex digits";
	return NULL;
}

/*
 * GnuTLS reads the file only when a client connects, so a bad one would
 * let the daemon start and fail every handshake: checked here, where the
 * option is taken.  Lines "NAME:HEXKEY" (psktool's), blank lines and '#'
 * comments; at least one key.
 */
int nbd_tls_check_psk_file(const char *file)
{
	char line[1024];
	unsigned n = 0, keys = 0;
	FILE *f = fopen(file, "re");
	int r = 0;

	if (!f) {
		r = -errno;
		tdr_set_error("tls-psk=%s: cannot read it: %s; create it with psktool -u NAME -p FILE",
			      file, strerror(-r));
		return r;
	}
	while (fgets(line, sizeof(line), f)) {
		size_t len = strlen(line);
		const char *why;

		n++;
		if (len && line[len - 1] != '\n' && !feof(f)) {
			why = "longer than 1023 bytes";
		} else {
			while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
				line[--len] = '\0';
			if (!len || line[0] == '#')
				continue;
			why = psk_line_defect(line);
		}
		if (why) {
			tdr_set_error("tls-psk=%s: line %u: %s; each line is NAME:HEXKEY, as psktool -u NAME -p FILE writes them",
				      file, n, why);
			r = -EINVAL;
			goto out;
		}
		keys++;
	}
	if (ferror(f)) {
		r = -EIO;
		tdr_set_error("tls-psk=%s: cannot read it: %s", file, strerror(EIO));
	} else if (!keys) {
		r = -EINVAL;
		tdr_set_error("tls-psk=%s: no key in it; add one with psktool -u NAME -p %s", file, file);
	}
out:
	fclose(f);
	return r;
}

enum nbd_tls_mode nbd_tls_mode(const struct nbd_tls *tls)
{
	return tls ? tls->mode : NBD_TLS_OFF;
}

void nbd_tls_free(struct nbd_tls *tls)
{
	if (!tls)
		return;
	if (tls->priority)
		gnutls_priority_deinit(tls->priority);
	if (tls->psk)
		gnutls_psk_free_server_credentials(tls->psk);
	if (tls->x509)
		gnutls_certificate_free_credentials(tls->x509);
	free(tls);
}

/* dir/name into buf; false if it does not fit. */
static bool tls_path(char *buf, size_t len, const char *dir, const char *name)
{
	int n = snprintf(buf, len, "%s/%s", dir, name);

	return n > 0 && (size_t)n < len;
}

static int tls_load_x509(struct nbd_tls *tls, const char *dir)
{
	char cert[4096], key[4096], ca[4096];
	struct stat st;
	int r;

	if (!tls_path(cert, sizeof(cert), dir, "server-cert.pem") ||
	    !tls_path(key, sizeof(key), dir, "server-key.pem") ||
	    !tls_path(ca, sizeof(ca), dir, "ca-cert.pem")) {
		tdr_set_error("tls-certificates=%s: path too long", dir);
		return -ENAMETOOLONG;
	}
	if (gnutls_certificate_allocate_credentials(&tls->x509) < 0)
		return -ENOMEM;
	r = gnutls_certificate_set_x509_key_file(tls->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (r < 0) {
		tdr_set_error("tls-certificates=%s: cannot load server-cert.pem and server-key.pem: %s; the directory holds the server's certificate and key (and ca-cert.pem to check clients)",
			      dir, gnutls_strerror(r));
		return -EINVAL;
	}
	if (stat(ca, &st) == 0) {
		r = gnutls_certificate_set_x509_trust_file(tls->x509, ca, GNUTLS_X509_FMT_PEM);
		if (r < 0) {
			tdr_set_error("tls-certificates=%s: cannot load ca-cert.pem: %s", dir,
				      gnutls_strerror(r));
			return -EINVAL;
		}
	} else if (tls->verify_peer) {
		tdr_set_error("tls-certificates=%s: no ca-cert.pem to check clients' certificates against; add it or drop tls-verify-peer",
			      dir);
		return -ENOENT;
	}
	return 0;
}

int nbd_tls_new(struct nbd_tls **out, const struct nbd_tls_config *cfg)
{
	struct nbd_tls *tls;
	const char *err_pos = NULL;
	int r;

	*out = NULL;
	if (cfg->mode == NBD_TLS_OFF)
		return 0;
	if ((cfg->psk_file && *cfg->psk_file) == (cfg->certificates && *cfg->certificates)) {
		tdr_set_error("TLS needs a pre-shared key file or a certificate directory, one of the two; give tls-psk=FILE or tls-certificates=DIR");
		return -EINVAL;
	}
	tls = calloc(1, sizeof(*tls));
	if (!tls)
		return -ENOMEM;
	tls->mode = cfg->mode;
	tls->verify_peer = cfg->verify_peer;
	if (cfg->psk_file && *cfg->psk_file) {
		r = nbd_tls_check_psk_file(cfg->psk_file);
		if (r < 0)
			goto fail;
		r = -ENOMEM;
		if (gnutls_psk_allocate_server_credentials(&tls->psk) < 0)
			goto fail;
		r = gnutls_psk_set_server_credentials_file(tls->psk, cfg->psk_file);
		if (r < 0) {
			tdr_set_error("tls-psk=%s: %s", cfg->psk_file, gnutls_strerror(r));
			r = -EINVAL;
			goto fail;
		}
		r = gnutls_priority_init(&tls->priority, TLS_PRIORITY_PSK, &err_pos);
	} else {
		r = tls_load_x509(tls, cfg->certificates);
		if (r < 0)
			goto fail;
		r = gnutls_priority_init(&tls->priority, TLS_PRIORITY_X509, &err_pos);
	}
	if (r < 0) {
		tdr_set_error("TLS priority string refused by GnuTLS at '%s': %s",
			      err_pos ? err_pos : "?", gnutls_strerror(r));
		r = -EINVAL;
		goto fail;
	}
	*out = tls;
	return 0;
fail:
	nbd_tls_free(tls);
	return r;
}

/* ------------------------------------------------------------ transport */

static int tls_errno(int r)
{
	switch (r) {
	case GNUTLS_E_AGAIN:
	case GNUTLS_E_INTERRUPTED:
		return -EAGAIN;
	case GNUTLS_E_MEMORY_ERROR:
		return -ENOMEM;
	default:
		return -EPROTO;
	}
}

static ssize_t tls_recv(struct nbd_transport *t, void *buf, size_t len)
{
	struct tls_conn *tc = t->priv;
	ssize_t n;

	if (!tc->handshake_done) {
		int r = gnutls_handshake(tc->session);

		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
			if (gnutls_record_get_direction(tc->session) == 1) {
				/* It wants to write into a full socket: see the top. */
				TDR_WARN("nbd: connection %u: TLS handshake blocked writing; closing",
					 tc->id);
				return -EPROTO;
			}
			return -EAGAIN;
		}
		if (r < 0) {
			TDR_WARN("nbd: connection %u: TLS handshake failed: %s", tc->id,
				 gnutls_strerror(r));
			return -EPROTO;
		}
		tc->handshake_done = true;
		TDR_DEBUG("nbd: connection %u: TLS on", tc->id);
	}
	n = gnutls_record_recv(tc->session, buf, len);
	if (n >= 0)
		return n;
	if (n == GNUTLS_E_PREMATURE_TERMINATION)
		return 0;	/* the client closed without a TLS goodbye */
	return tls_errno((int)n);
}

static ssize_t tls_sendv(struct nbd_transport *t, const struct iovec *iov, int iovcnt)
{
	struct tls_conn *tc = t->priv;
	size_t total = 0;
	ssize_t n;

	if (!tc->handshake_done)
		return -EAGAIN;	/* nothing goes out before the handshake */
	if (tc->send_pending) {
		n = gnutls_record_send(tc->session, NULL, 0);
		if (n < 0)
			return tls_errno((int)n);
		/* The bytes of the call that was cut short. */
		total = n > 0 ? (size_t)n : tc->send_pending;
		tc->send_pending = 0;
		/* Skip what that was: the caller's iovec starts with it. */
		size_t skip = total;

		while (iovcnt && skip >= iov->iov_len) {
			skip -= iov->iov_len;
			iov++;
			iovcnt--;
		}
		if (iovcnt && skip) {
			/* Partly through an element: finish it next time. */
			return (ssize_t)total;
		}
	}
	for (int i = 0; i < iovcnt; i++) {
		size_t off = 0;

		while (off < iov[i].iov_len) {
			/* At most one record (gnutls_record_get_max_size) per call. */
			n = gnutls_record_send(tc->session, (const char *)iov[i].iov_base + off,
					       iov[i].iov_len - off);
			if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
				size_t rec = iov[i].iov_len - off;
				size_t max = gnutls_record_get_max_size(tc->session);

				tc->send_pending = rec < max ? rec : max;
				return total ? (ssize_t)total : -EAGAIN;
			}
			if (n < 0)
				return total ? (ssize_t)total : tls_errno((int)n);
			off += (size_t)n;
			total += (size_t)n;
		}
	}
	return (ssize_t)total;
}

static bool tls_pending(struct nbd_transport *t)
{
	struct tls_conn *tc = t->priv;

	return tc->handshake_done && gnutls_record_check_pending(tc->session) > 0;
}

static void tls_close(struct nbd_transport *t)
{
	struct tls_conn *tc = t->priv;

	if (tc) {
		/* A goodbye if the socket takes it at once; never waits. */
		if (tc->handshake_done)
			(void)gnutls_bye(tc->session, GNUTLS_SHUT_WR);
		gnutls_deinit(tc->session);
		free(tc);
		t->priv = NULL;
	}
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
}

static const struct nbd_transport_ops tls_ops = {
	.name = "tls",
	.recv = tls_recv,
	.sendv = tls_sendv,
	.pending = tls_pending,
	.close = tls_close,
};

int nbd_tls_wrap(struct nbd_transport *t, const struct nbd_tls *tls, unsigned id)
{
	struct tls_conn *tc = calloc(1, sizeof(*tc));
	int r;

	if (!tc)
		return -ENOMEM;
	tc->id = id;
	r = gnutls_init(&tc->session, GNUTLS_SERVER | GNUTLS_NONBLOCK);
	if (r < 0) {
		free(tc);
		return -ENOMEM;
	}
	r = gnutls_priority_set(tc->session, tls->priority);
	if (r >= 0 && tls->psk)
		r = gnutls_credentials_set(tc->session, GNUTLS_CRD_PSK, tls->psk);
	if (r >= 0 && tls->x509) {
		r = gnutls_credentials_set(tc->session, GNUTLS_CRD_CERTIFICATE, tls->x509);
		if (r >= 0 && tls->verify_peer) {
			gnutls_certificate_server_set_request(tc->session, GNUTLS_CERT_REQUIRE);
			gnutls_session_set_verify_cert(tc->session, NULL, 0);
		}
	}
	if (r < 0) {
		TDR_WARN("nbd: connection %u: cannot set up TLS: %s", id, gnutls_strerror(r));
		gnutls_deinit(tc->session);
		free(tc);
		return -EPROTO;
	}
	gnutls_transport_set_int(tc->session, t->fd);
	t->ops = &tls_ops;
	t->priv = tc;
	return 0;
}
