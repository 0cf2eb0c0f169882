/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the NBD server: a real nbd_server connection over a
 * socketpair, the real event loop, and a real td_disk (the raw "aio" driver
 * on a temporary file).  The test plays the client, byte by byte.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"
#include "check-run.h"

#define MIB (1u << 20)
#define DISK_SIZE (8 * MIB)

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static struct td_disk *disk;
static struct nbd_server *srv;
static char path[64];
static char spec[80];
static int cfd = -1;	/* the client's end */
static int sfd = -1;	/* the server's end (only to peek at it) */

/* ------------------------------------------------------------------ */
/* Plumbing */

static void pump(int iterations)
{
	for (int i = 0; i < iterations; i++)
		tdr_loop_run_once(loop, 1);
}

static uint64_t now_ms(void)
{
	return tdr_now_ns() / 1000000;
}

static void connect_client(void)
{
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(fcntl(sv[1], F_SETFL, O_NONBLOCK), 0);
	sfd = sv[0];
	cfd = sv[1];
	ck_assert_int_eq(nbd_server_add_connection(srv, sv[0]), 0);
}

static void setup_with(unsigned max_inflight)
{
	int fd;

	tdr_log_init("test-nbd", false, TDR_LOG_WARN);
	strcpy(path, "/var/tmp/tdr-test-nbd-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, DISK_SIZE), 0);
	close(fd);
	snprintf(spec, sizeof(spec), "aio:%s", path);
	loop = tdr_loop_new();
	ck_assert_ptr_nonnull(loop);
	io = tdr_io_ctx_new(loop, 64);
	ck_assert_ptr_nonnull(io);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	srv = nbd_server_new(loop);
	ck_assert_ptr_nonnull(srv);
	ck_assert_int_eq(nbd_server_add_export(srv, "", "the test disk", disk, false), 0);
	ck_assert_int_eq(nbd_server_add_export(srv, "ro", NULL, disk, true), 0);
	ck_assert_int_eq(nbd_server_add_export(srv, "ro", NULL, disk, true), -EEXIST);
	if (max_inflight)
		nbd_server_set_max_inflight(srv, max_inflight);
	connect_client();
}

static void setup(void)
{
	setup_with(0);
}

static void setup_small_cap(void)
{
	setup_with(4);
}

static void teardown(void)
{
	uint64_t end = now_ms() + 5000;

	if (cfd >= 0)
		close(cfd);
	cfd = -1;
	/* Connections go away once their requests are done. */
	while (nbd_server_connections(srv) && now_ms() < end)
		pump(1);
	ck_assert_uint_eq(nbd_server_connections(srv), 0);
	nbd_server_free(srv);
	td_disk_close(disk);
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	unlink(path);
}

static void cl_write(const void *buf, size_t len)
{
	const char *p = buf;
	uint64_t end = now_ms() + 10000;

	while (len) {
		ssize_t n = write(cfd, p, len);

		if (n > 0) {
			p += n;
			len -= (size_t)n;
			continue;
		}
		ck_assert_msg(n < 0 && errno == EAGAIN, "client write failed: %s", strerror(errno));
		ck_assert_msg(now_ms() < end, "client write timed out");
		pump(1);
	}
}

/* Reads exactly len bytes; fails the test on EOF or timeout. */
static void cl_read(void *buf, size_t len)
{
	char *p = buf;
	uint64_t end = now_ms() + 10000;

	while (len) {
		ssize_t n = read(cfd, p, len);

		if (n > 0) {
			p += n;
			len -= (size_t)n;
			continue;
		}
		ck_assert_msg(n != 0, "server closed the connection (%zu bytes missing)", len);
		ck_assert_msg(errno == EAGAIN, "client read failed: %s", strerror(errno));
		ck_assert_msg(now_ms() < end, "timed out waiting for %zu bytes", len);
		pump(1);
	}
}

/* Asserts that the server closes the connection (after any pending bytes). */
static void cl_expect_eof(void)
{
	uint64_t end = now_ms() + 5000;
	char junk[4096];

	for (;;) {
		ssize_t n = read(cfd, junk, sizeof(junk));

		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return;
		if (n < 0) {
			ck_assert_int_eq(errno, EAGAIN);
			ck_assert_msg(now_ms() < end, "server did not close the connection");
			pump(1);
		}
	}
}

/* Asserts that nothing arrives for a while. */
static void cl_expect_silence(void)
{
	char c;

	pump(20);
	ck_assert_int_eq(read(cfd, &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
}

/* ------------------------------------------------------------------ */
/* Handshake helpers */

static void hs_greeting(uint32_t client_flags)
{
	unsigned char g[NBD_GREETING_SIZE], f[4];

	cl_read(g, sizeof(g));
	ck_assert_mem_eq(g, "NBDMAGICIHAVEOPT\x00\x03", NBD_GREETING_SIZE);
	nbd_put32(f, client_flags);
	cl_write(f, 4);
}

static void send_opt(uint32_t opt, const void *data, uint32_t len)
{
	unsigned char h[NBD_OPT_HDR_SIZE];

	memcpy(h, "IHAVEOPT", 8);
	nbd_put32(h + 8, opt);
	nbd_put32(h + 12, len);
	cl_write(h, sizeof(h));
	if (len)
		cl_write(data, len);
}

/* Reads one option reply; returns its type, data in buf (len in *len). */
static uint32_t read_opt_reply(uint32_t opt, unsigned char *buf, size_t bufsize, uint32_t *len)
{
	unsigned char h[NBD_OPT_REPLY_HDR_SIZE];
	uint32_t l;

	cl_read(h, sizeof(h));
	ck_assert_uint_eq(nbd_get64(h), NBD_OPT_REPLY_MAGIC);
	ck_assert_uint_eq(nbd_get32(h + 8), opt);
	l = nbd_get32(h + 16);
	ck_assert_uint_le(l, bufsize);
	cl_read(buf, l);
	if (len)
		*len = l;
	return nbd_get32(h + 12);
}

static uint32_t opt_simple(uint32_t opt, const void *data, uint32_t len)
{
	unsigned char buf[8192];

	send_opt(opt, data, len);
	return read_opt_reply(opt, buf, sizeof(buf), NULL);
}

/* Builds INFO/GO data: name + info requests. */
static uint32_t info_data(unsigned char *d, const char *name, const uint16_t *infos, uint16_t n)
{
	uint32_t nl = (uint32_t)strlen(name);

	nbd_put32(d, nl);
	memcpy(d + 4, name, nl);
	nbd_put16(d + 4 + nl, n);
	for (uint16_t i = 0; i < n; i++)
		nbd_put16(d + 6 + nl + 2 * i, infos[i]);
	return 6 + nl + 2 * n;
}

/* Builds META_CONTEXT data: name + queries (NULL-terminated). */
static uint32_t meta_data(unsigned char *d, const char *name, const char *const *q)
{
	uint32_t nl = (uint32_t)strlen(name), pos, n = 0;

	nbd_put32(d, nl);
	memcpy(d + 4, name, nl);
	pos = 8 + nl;
	for (; q && q[n]; n++) {
		uint32_t ql = (uint32_t)strlen(q[n]);

		nbd_put32(d + pos, ql);
		memcpy(d + pos + 4, q[n], ql);
		pos += 4 + ql;
	}
	nbd_put32(d + 4 + nl, n);
	return pos;
}

/* Negotiates from the options phase up to transmission with GO. */
static void go_opts(const char *name, bool structured, bool meta)
{
	unsigned char d[256], buf[256];
	uint32_t len, type;

	if (structured)
		ck_assert_uint_eq(opt_simple(NBD_OPT_STRUCTURED_REPLY, NULL, 0), NBD_REP_ACK);
	if (meta) {
		static const char *const q[] = { "base:allocation", NULL };

		len = meta_data(d, name, q);
		send_opt(NBD_OPT_SET_META_CONTEXT, d, len);
		ck_assert_uint_eq(read_opt_reply(NBD_OPT_SET_META_CONTEXT, buf, sizeof(buf), &len),
				  NBD_REP_META_CONTEXT);
		ck_assert_uint_eq(nbd_get32(buf), NBD_META_ID_BASE_ALLOCATION);
		ck_assert_uint_eq(read_opt_reply(NBD_OPT_SET_META_CONTEXT, buf, sizeof(buf), NULL),
				  NBD_REP_ACK);
	}
	len = info_data(d, name, NULL, 0);
	send_opt(NBD_OPT_GO, d, len);
	while ((type = read_opt_reply(NBD_OPT_GO, buf, sizeof(buf), &len)) == NBD_REP_INFO)
		;
	ck_assert_uint_eq(type, NBD_REP_ACK);
}

static void go(const char *name, bool structured, bool meta)
{
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	go_opts(name, structured, meta);
}

/* ------------------------------------------------------------------ */
/* Transmission helpers */

static void send_req(uint16_t type, uint16_t flags, uint64_t handle, uint64_t off, uint32_t len)
{
	struct nbd_request r = { .type = type, .flags = flags, .handle = handle, .offset = off,
				 .len = len };
	unsigned char b[NBD_REQUEST_SIZE];

	nbd_encode_request(b, &r);
	cl_write(b, sizeof(b));
}

/* Reads a simple reply; returns its error. */
static uint32_t read_simple(uint64_t handle)
{
	unsigned char h[NBD_SIMPLE_REPLY_SIZE];

	cl_read(h, sizeof(h));
	ck_assert_uint_eq(nbd_get32(h), NBD_SIMPLE_REPLY_MAGIC);
	ck_assert_uint_eq(nbd_get64(h + 8), handle);
	return nbd_get32(h + 4);
}

struct chunk {
	uint16_t flags, type;
	uint64_t handle;
	uint32_t len;
	unsigned char *data;	/* malloc'ed payload */
};

static void read_chunk(struct chunk *c)
{
	unsigned char h[NBD_STRUCTURED_HDR_SIZE];

	cl_read(h, sizeof(h));
	ck_assert_uint_eq(nbd_get32(h), NBD_STRUCTURED_REPLY_MAGIC);
	c->flags = nbd_get16(h + 4);
	c->type = nbd_get16(h + 6);
	c->handle = nbd_get64(h + 8);
	c->len = nbd_get32(h + 16);
	c->data = malloc(c->len + 1);
	ck_assert_ptr_nonnull(c->data);
	cl_read(c->data, c->len);
}

/* Reads a structured error chunk and returns the error value. */
static uint32_t read_error_chunk(uint64_t handle)
{
	struct chunk c;
	uint32_t err;

	read_chunk(&c);
	ck_assert_uint_eq(c.handle, handle);
	ck_assert_uint_eq(c.type, NBD_REPLY_TYPE_ERROR);
	ck_assert_uint_eq(c.flags, NBD_REPLY_FLAG_DONE);
	ck_assert_uint_ge(c.len, 6);
	ck_assert_uint_eq(nbd_get16(c.data + 4), c.len - 6);
	err = nbd_get32(c.data);
	free(c.data);
	return err;
}

static void fill(unsigned char *p, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)(seed + i * 7 + (i >> 9));
}

static void write_ok(uint64_t handle, uint64_t off, const void *data, uint32_t len)
{
	send_req(NBD_CMD_WRITE, 0, handle, off, len);
	cl_write(data, len);
	ck_assert_uint_eq(read_simple(handle), 0);
}

/* ------------------------------------------------------------------ */
/* Handshake tests */

START_TEST(test_go_info_block_size)
{
	static const uint16_t infos[] = { NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION,
					  0x7777 };
	unsigned char d[64], buf[256];
	uint32_t len, type;
	bool seen_export = false, seen_bs = false, seen_name = false, seen_desc = false;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	len = info_data(d, "", infos, 4);
	send_opt(NBD_OPT_GO, d, len);
	while ((type = read_opt_reply(NBD_OPT_GO, buf, sizeof(buf), &len)) == NBD_REP_INFO) {
		switch (nbd_get16(buf)) {
		case NBD_INFO_EXPORT:
			ck_assert_uint_eq(len, 12);
			ck_assert_uint_eq(nbd_get64(buf + 2), DISK_SIZE);
			ck_assert_uint_eq(nbd_get16(buf + 10), nbd_export_tx_flags(false, false));
			seen_export = true;
			break;
		case NBD_INFO_BLOCK_SIZE:
			ck_assert_uint_eq(len, 14);
			ck_assert_uint_eq(nbd_get32(buf + 2), 512);
			ck_assert_uint_eq(nbd_get32(buf + 6), 4096);
			ck_assert_uint_eq(nbd_get32(buf + 10), 32 * MIB);
			seen_bs = true;
			break;
		case NBD_INFO_NAME:
			ck_assert_uint_eq(len, 2);	/* the name is "" */
			seen_name = true;
			break;
		case NBD_INFO_DESCRIPTION:
			ck_assert_uint_eq(len, 2 + strlen("the test disk"));
			ck_assert_mem_eq(buf + 2, "the test disk", len - 2);
			seen_desc = true;
			break;
		default:
			ck_abort_msg("unexpected info type %u", nbd_get16(buf));
		}
	}
	ck_assert_uint_eq(type, NBD_REP_ACK);
	ck_assert(seen_export && seen_bs && seen_name && seen_desc);

	/* In transmission now: a read works. */
	send_req(NBD_CMD_READ, 0, 7, 0, 512);
	ck_assert_uint_eq(read_simple(7), 0);
	cl_read(buf, 256);
	cl_read(buf, 256);
}
END_TEST

START_TEST(test_info_stays_in_options)
{
	unsigned char d[64], buf[256];
	uint32_t len, type;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	len = info_data(d, "ro", NULL, 0);
	send_opt(NBD_OPT_INFO, d, len);
	while ((type = read_opt_reply(NBD_OPT_INFO, buf, sizeof(buf), &len)) == NBD_REP_INFO)
		if (nbd_get16(buf) == NBD_INFO_EXPORT)
			ck_assert_uint_eq(nbd_get16(buf + 10), nbd_export_tx_flags(true, false));
	ck_assert_uint_eq(type, NBD_REP_ACK);
	/* still negotiating */
	ck_assert_uint_eq(opt_simple(NBD_OPT_STRUCTURED_REPLY, NULL, 0), NBD_REP_ACK);
	/* unknown export: error, and still negotiating */
	len = info_data(d, "nope", NULL, 0);
	ck_assert_uint_eq(opt_simple(NBD_OPT_GO, d, len), NBD_REP_ERR_UNKNOWN);
	/* option data longer than the option needs */
	len = info_data(d, "", NULL, 0);
	ck_assert_uint_eq(opt_simple(NBD_OPT_GO, d, len + 1), NBD_REP_ERR_INVALID);
	/* name length pointing past the data */
	nbd_put32(d, 1000);
	ck_assert_uint_eq(opt_simple(NBD_OPT_INFO, d, len), NBD_REP_ERR_INVALID);
	ck_assert_uint_eq(opt_simple(NBD_OPT_INFO, d, 3), NBD_REP_ERR_INVALID);
	go_opts("", true, false);
}
END_TEST

START_TEST(test_export_name)
{
	unsigned char buf[134], zero[124] = { 0 };

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_EXPORT_NAME, "ro", 2);
	cl_read(buf, sizeof(buf));	/* 124 zeroes: NO_ZEROES not asked */
	ck_assert_uint_eq(nbd_get64(buf), DISK_SIZE);
	ck_assert_uint_eq(nbd_get16(buf + 8), nbd_export_tx_flags(true, false));
	ck_assert_mem_eq(buf + 10, zero, 124);
	send_req(NBD_CMD_WRITE, 0, 1, 0, 512);
	cl_write(zero, 124);
	cl_write(zero, 124);
	cl_write(zero, 124);
	cl_write(zero, 124);
	cl_write(zero, 16);
	ck_assert_uint_eq(read_simple(1), NBD_EPERM);
}
END_TEST

START_TEST(test_export_name_no_zeroes)
{
	unsigned char buf[10];

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	send_opt(NBD_OPT_EXPORT_NAME, NULL, 0);
	cl_read(buf, sizeof(buf));
	ck_assert_uint_eq(nbd_get64(buf), DISK_SIZE);
	ck_assert_uint_eq(nbd_get16(buf + 8), nbd_export_tx_flags(false, false));
	send_req(NBD_CMD_FLUSH, 0, 2, 0, 0);
	ck_assert_uint_eq(read_simple(2), 0);
}
END_TEST

START_TEST(test_export_name_unknown)
{
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_EXPORT_NAME, "nope", 4);
	cl_expect_eof();
}
END_TEST

START_TEST(test_list)
{
	unsigned char buf[256];
	uint32_t len;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_LIST, NULL, 0);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST, buf, sizeof(buf), &len), NBD_REP_SERVER);
	ck_assert_uint_eq(len, 4 + strlen("the test disk"));
	ck_assert_uint_eq(nbd_get32(buf), 0);
	ck_assert_mem_eq(buf + 4, "the test disk", len - 4);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST, buf, sizeof(buf), &len), NBD_REP_SERVER);
	ck_assert_uint_eq(len, 6);
	ck_assert_mem_eq(buf, "\0\0\0\2ro", 6);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST, buf, sizeof(buf), &len), NBD_REP_ACK);
	ck_assert_uint_eq(len, 0);
	/* LIST takes no data */
	ck_assert_uint_eq(opt_simple(NBD_OPT_LIST, "x", 1), NBD_REP_ERR_INVALID);
}
END_TEST

START_TEST(test_abort)
{
	unsigned char buf[16];
	uint32_t len;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_ABORT, "ignored", 7);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_ABORT, buf, sizeof(buf), &len), NBD_REP_ACK);
	ck_assert_uint_eq(len, 0);
	cl_expect_eof();
}
END_TEST

START_TEST(test_unknown_options)
{
	unsigned char buf[64];
	uint32_t len;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	/* unknown option with data: refused, data skipped */
	ck_assert_uint_eq(opt_simple(0x1234, "hello", 5), NBD_REP_ERR_UNSUP);
	ck_assert_uint_eq(opt_simple(NBD_OPT_PEEK_EXPORT, NULL, 0), NBD_REP_ERR_UNSUP);
	ck_assert_uint_eq(opt_simple(11 /* EXTENDED_HEADERS */, NULL, 0), NBD_REP_ERR_UNSUP);
	/* TLS: refused by policy; with data: invalid */
	send_opt(NBD_OPT_STARTTLS, NULL, 0);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_STARTTLS, buf, sizeof(buf), &len),
			  NBD_REP_ERR_POLICY);
	ck_assert_uint_gt(len, 0);	/* carries a message */
	ck_assert_uint_eq(opt_simple(NBD_OPT_STARTTLS, "x", 1), NBD_REP_ERR_INVALID);
	ck_assert_uint_eq(opt_simple(NBD_OPT_STRUCTURED_REPLY, "x", 1), NBD_REP_ERR_INVALID);
	go_opts("", false, false);
}
END_TEST

/*
 * TLS on (a pre-shared key file next to the disk): the server's side of
 * STARTTLS that a plain client can see.  A real handshake, byte-exact
 * I/O over it and bad keys are in tests/integration/tls-export.sh.
 */
static void tls_on(enum nbd_tls_mode mode)
{
	char psk[sizeof(path) + 8];
	struct nbd_tls_config cfg = { .mode = mode, .psk_file = psk };
	FILE *f;

	snprintf(psk, sizeof(psk), "%s.psk", path);
	f = fopen(psk, "w");
	ck_assert_ptr_nonnull(f);
	fprintf(f, "alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n");
	fclose(f);
	ck_assert_int_eq(nbd_server_set_tls(srv, &cfg), 0);
	unlink(psk);	/* loaded now, not at the first client */
}

/* require: every option but STARTTLS and ABORT gets TLS_REQD, with a message. */
START_TEST(test_tls_required)
{
	unsigned char buf[256];
	uint32_t len;
	static const uint32_t opts[] = { NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
					 NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT, 0x1234 };

	tls_on(NBD_TLS_REQUIRE);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		send_opt(opts[i], NULL, 0);
		ck_assert_uint_eq(read_opt_reply(opts[i], buf, sizeof(buf), &len), NBD_REP_ERR_TLS_REQD);
		ck_assert_uint_gt(len, 0);
	}
	ck_assert_uint_eq(opt_simple(NBD_OPT_STARTTLS, "x", 1), NBD_REP_ERR_INVALID);
	send_opt(NBD_OPT_ABORT, NULL, 0);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_ABORT, buf, sizeof(buf), &len), NBD_REP_ACK);
	cl_expect_eof();
}
END_TEST

/* require: EXPORT_NAME in the clear has no error reply; the server hangs up. */
START_TEST(test_tls_required_export_name)
{
	tls_on(NBD_TLS_REQUIRE);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_EXPORT_NAME, "", 0);
	cl_expect_eof();
}
END_TEST

/* on: plain clients are served as before. */
START_TEST(test_tls_on_serves_plain)
{
	tls_on(NBD_TLS_ON);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	go_opts("", false, false);
}
END_TEST

/* STARTTLS is acknowledged; what follows must be a TLS handshake: garbage closes. */
START_TEST(test_tls_handshake_garbage)
{
	unsigned char buf[64];
	uint32_t len;

	tls_on(NBD_TLS_REQUIRE);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_STARTTLS, NULL, 0);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_STARTTLS, buf, sizeof(buf), &len), NBD_REP_ACK);
	ck_assert_uint_eq(len, 0);
	memset(buf, 0x16, sizeof(buf));	/* a record header's type, then nonsense */
	cl_write(buf, sizeof(buf));
	cl_expect_eof();
}
END_TEST

/*
 * Bytes sent after STARTTLS before the server's ACK are not an option to
 * answer in the clear (nor TLS): the server acknowledges STARTTLS, reads
 * nothing more in the clear, and hangs up without another byte.
 */
START_TEST(test_tls_data_after_starttls)
{
	unsigned char buf[64];
	uint64_t end = now_ms() + 5000;
	uint32_t len;
	ssize_t n;

	tls_on(NBD_TLS_ON);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(NBD_OPT_STARTTLS, NULL, 0);
	send_opt(NBD_OPT_LIST, NULL, 0);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_STARTTLS, buf, sizeof(buf), &len), NBD_REP_ACK);
	while ((n = read(cfd, buf, sizeof(buf))) < 0 && errno == EAGAIN) {
		ck_assert_msg(now_ms() < end, "server did not close the connection");
		pump(1);
	}
	ck_assert_msg(n == 0 || (n < 0 && errno == ECONNRESET),
		      "the server sent %zd more bytes after acknowledging STARTTLS", n);
}
END_TEST

/* Bad settings fail at once, one line saying what to do. */
START_TEST(test_tls_bad_config)
{
	struct nbd_tls_config cfg = { .mode = NBD_TLS_REQUIRE };

	tdr_clear_error();
	ck_assert_int_eq(nbd_server_set_tls(srv, &cfg), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "tls-psk=FILE or tls-certificates=DIR"));
	cfg.psk_file = "/nonexistent/keys.psk";
	ck_assert_int_eq(nbd_server_set_tls(srv, &cfg), -ENOENT);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "create it with psktool"));
	cfg.psk_file = NULL;
	cfg.certificates = "/nonexistent";
	ck_assert_int_eq(nbd_server_set_tls(srv, &cfg), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "server-cert.pem"));
	/* Nothing changed: STARTTLS still refused by policy. */
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	ck_assert_uint_eq(opt_simple(NBD_OPT_STARTTLS, NULL, 0), NBD_REP_ERR_POLICY);
}
END_TEST

START_TEST(test_option_too_big)
{
	size_t big = NBD_MAX_OPTION_LEN + 1;
	unsigned char *junk = calloc(1, big);

	ck_assert_ptr_nonnull(junk);
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	ck_assert_uint_eq(opt_simple(NBD_OPT_GO, junk, (uint32_t)big), NBD_REP_ERR_TOO_BIG);
	free(junk);
	/* The stream is still in sync. */
	go_opts("", false, false);
}
END_TEST

START_TEST(test_option_huge_length)
{
	unsigned char h[NBD_OPT_HDR_SIZE];

	/* 4 GiB announced: nothing may be allocated for it; we only send a
	 * little and go away. */
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	memcpy(h, "IHAVEOPT", 8);
	nbd_put32(h + 8, NBD_OPT_LIST_META_CONTEXT);
	nbd_put32(h + 12, 0xffffffffu);
	cl_write(h, sizeof(h));
	cl_write("abcdef", 6);
	cl_expect_silence();
	ck_assert_uint_eq(nbd_server_connections(srv), 1);
}
END_TEST

START_TEST(test_export_name_too_long)
{
	unsigned char h[NBD_OPT_HDR_SIZE];

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	memcpy(h, "IHAVEOPT", 8);
	nbd_put32(h + 8, NBD_OPT_EXPORT_NAME);
	nbd_put32(h + 12, 5000);
	cl_write(h, sizeof(h));
	cl_expect_eof();
}
END_TEST

START_TEST(test_meta_context)
{
	static const char *const q_alloc[] = { "base:allocation", NULL };
	static const char *const q_base[] = { "base:", NULL };
	static const char *const q_other[] = { "x-foo:bar", "base:nope", NULL };
	static const char *const q_bad[] = { "nocolon", NULL };
	static const char *const q_twice[] = { "base:allocation", "base:allocation", NULL };
	unsigned char d[256], buf[256];
	uint32_t len, rlen;

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	/* SET before structured replies */
	len = meta_data(d, "", q_alloc);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, len), NBD_REP_ERR_INVALID);
	ck_assert_uint_eq(opt_simple(NBD_OPT_STRUCTURED_REPLY, NULL, 0), NBD_REP_ACK);

	/* LIST with no query lists everything */
	len = meta_data(d, "", NULL);
	send_opt(NBD_OPT_LIST_META_CONTEXT, d, len);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST_META_CONTEXT, buf, sizeof(buf), &rlen),
			  NBD_REP_META_CONTEXT);
	ck_assert_uint_eq(rlen, 4 + 15);
	ck_assert_uint_eq(nbd_get32(buf), 0);
	ck_assert_mem_eq(buf + 4, "base:allocation", 15);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST_META_CONTEXT, buf, sizeof(buf), NULL),
			  NBD_REP_ACK);
	/* LIST "base:" is a wildcard */
	len = meta_data(d, "", q_base);
	send_opt(NBD_OPT_LIST_META_CONTEXT, d, len);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST_META_CONTEXT, buf, sizeof(buf), &rlen),
			  NBD_REP_META_CONTEXT);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_LIST_META_CONTEXT, buf, sizeof(buf), NULL),
			  NBD_REP_ACK);
	/* SET "base:" selects nothing; unknown namespaces/leaves are ignored */
	len = meta_data(d, "", q_base);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, len), NBD_REP_ACK);
	len = meta_data(d, "", q_other);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, len), NBD_REP_ACK);
	/* a query without a namespace, an unknown export, junk lengths */
	len = meta_data(d, "", q_bad);
	ck_assert_uint_eq(opt_simple(NBD_OPT_LIST_META_CONTEXT, d, len), NBD_REP_ERR_INVALID);
	len = meta_data(d, "nope", q_alloc);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, len), NBD_REP_ERR_UNKNOWN);
	len = meta_data(d, "", q_alloc);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, len - 1), NBD_REP_ERR_INVALID);
	ck_assert_uint_eq(opt_simple(NBD_OPT_SET_META_CONTEXT, d, 3), NBD_REP_ERR_INVALID);
	/* the same context twice: one reply */
	len = meta_data(d, "", q_twice);
	send_opt(NBD_OPT_SET_META_CONTEXT, d, len);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_SET_META_CONTEXT, buf, sizeof(buf), &rlen),
			  NBD_REP_META_CONTEXT);
	ck_assert_uint_eq(nbd_get32(buf), NBD_META_ID_BASE_ALLOCATION);
	ck_assert_uint_eq(read_opt_reply(NBD_OPT_SET_META_CONTEXT, buf, sizeof(buf), NULL),
			  NBD_REP_ACK);
}
END_TEST

START_TEST(test_bad_client_flags)
{
	hs_greeting(1u << 5);
	cl_expect_eof();
}
END_TEST

START_TEST(test_bad_option_magic)
{
	unsigned char h[NBD_OPT_HDR_SIZE] = "IHAVEOPX";

	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	cl_write(h, sizeof(h));
	cl_expect_eof();
}
END_TEST

START_TEST(test_half_option_then_close)
{
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE);
	cl_write("IHAVE", 5);
	pump(5);
	close(cfd);
	cfd = -1;
	/* teardown checks that the connection goes away */
}
END_TEST

/* ------------------------------------------------------------------ */
/* Transmission tests */

START_TEST(test_read_write_simple)
{
	size_t len = 64 * 1024;
	unsigned char *w = malloc(len), *r = malloc(len);

	go("", false, false);
	fill(w, len, 3);
	write_ok(10, 4096, w, (uint32_t)len);
	send_req(NBD_CMD_READ, 0, 11, 4096, (uint32_t)len);
	ck_assert_uint_eq(read_simple(11), 0);
	cl_read(r, len);
	ck_assert_mem_eq(r, w, len);
	/* FUA write, zero-length requests */
	send_req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 12, 0, 512);
	cl_write(w, 512);
	ck_assert_uint_eq(read_simple(12), 0);
	send_req(NBD_CMD_READ, 0, 13, 0, 0);
	ck_assert_uint_eq(read_simple(13), 0);
	send_req(NBD_CMD_WRITE, 0, 14, DISK_SIZE, 0);
	ck_assert_uint_eq(read_simple(14), 0);
	cl_expect_silence();
	free(w);
	free(r);
}
END_TEST

/* Request buffers are recycled: a read must return the disk's data, never
 * what an earlier request of a similar size left in its buffer. */
START_TEST(test_recycled_buffers_hold_no_old_data)
{
	size_t len = MIB;
	unsigned char *w = malloc(len), *r = malloc(len), *z = calloc(1, len);

	go("", false, false);
	fill(w, len, 9);
	write_ok(15, 0, w, (uint32_t)len);
	/* Same size class as the write's buffer, over a hole: zeroes. */
	send_req(NBD_CMD_READ, 0, 16, 4 * MIB, (uint32_t)len);
	ck_assert_uint_eq(read_simple(16), 0);
	cl_read(r, len);
	ck_assert_mem_eq(r, z, len);
	send_req(NBD_CMD_READ, 0, 17, 0, (uint32_t)len);
	ck_assert_uint_eq(read_simple(17), 0);
	cl_read(r, len);
	ck_assert_mem_eq(r, w, len);
	/* A shorter read of the same class, after the buffer held w. */
	send_req(NBD_CMD_READ, 0, 18, 6 * MIB + 512, (uint32_t)(len - 4096));
	ck_assert_uint_eq(read_simple(18), 0);
	cl_read(r, len - 4096);
	ck_assert_mem_eq(r, z, len - 4096);
	free(w);
	free(r);
	free(z);
}
END_TEST

START_TEST(test_read_write_structured)
{
	size_t len = 128 * 1024;
	unsigned char *w = malloc(len);
	struct chunk c;

	go("", true, false);
	fill(w, len, 9);
	write_ok(20, DISK_SIZE - len, w, (uint32_t)len);
	send_req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 21, DISK_SIZE - len, (uint32_t)len);
	read_chunk(&c);
	ck_assert_uint_eq(c.handle, 21);
	ck_assert_uint_eq(c.flags, NBD_REPLY_FLAG_DONE);
	ck_assert_uint_eq(c.type, NBD_REPLY_TYPE_OFFSET_DATA);
	ck_assert_uint_eq(c.len, 8 + len);
	ck_assert_uint_eq(nbd_get64(c.data), DISK_SIZE - len);
	ck_assert_mem_eq(c.data + 8, w, len);
	free(c.data);
	/* zero-length read: a NONE chunk */
	send_req(NBD_CMD_READ, 0, 22, 0, 0);
	read_chunk(&c);
	ck_assert_uint_eq(c.type, NBD_REPLY_TYPE_NONE);
	ck_assert_uint_eq(c.flags, NBD_REPLY_FLAG_DONE);
	ck_assert_uint_eq(c.len, 0);
	free(c.data);
	/* errors of reads come as error chunks */
	send_req(NBD_CMD_READ, 0, 23, 100, 512);
	ck_assert_uint_eq(read_error_chunk(23), NBD_EINVAL);
	send_req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 24, 0, NBD_MAX_BLOCK_SIZE + 512);
	ck_assert_uint_eq(read_error_chunk(24), NBD_EOVERFLOW);
	send_req(NBD_CMD_READ, 0, 25, 0, NBD_MAX_BLOCK_SIZE + 512);
	ck_assert_uint_eq(read_error_chunk(25), NBD_EINVAL);
	/* block status without a context */
	send_req(NBD_CMD_BLOCK_STATUS, 0, 26, 0, 512);
	ck_assert_uint_eq(read_error_chunk(26), NBD_EINVAL);
	/* successful non-read commands may use simple replies */
	send_req(NBD_CMD_FLUSH, 0, 27, 0, 0);
	ck_assert_uint_eq(read_simple(27), 0);
	free(w);
}
END_TEST

START_TEST(test_request_errors)
{
	unsigned char buf[4096] = { 0 };

	go("", false, false);
	/* unaligned */
	send_req(NBD_CMD_READ, 0, 30, 100, 512);
	ck_assert_uint_eq(read_simple(30), NBD_EINVAL);
	send_req(NBD_CMD_READ, 0, 31, 0, 100);
	ck_assert_uint_eq(read_simple(31), NBD_EINVAL);
	/* an unaligned write: its payload is skipped, the stream stays in sync */
	send_req(NBD_CMD_WRITE, 0, 32, 0, 100);
	cl_write(buf, 100);
	ck_assert_uint_eq(read_simple(32), NBD_EINVAL);
	/* out of range */
	send_req(NBD_CMD_READ, 0, 33, DISK_SIZE, 512);
	ck_assert_uint_eq(read_simple(33), NBD_EINVAL);
	send_req(NBD_CMD_READ, 0, 34, 0xfffffffffffffe00ull, 512);
	ck_assert_uint_eq(read_simple(34), NBD_EINVAL);
	send_req(NBD_CMD_WRITE, 0, 35, DISK_SIZE - 512, 1024);
	cl_write(buf, 1024);
	ck_assert_uint_eq(read_simple(35), NBD_ENOSPC);
	send_req(NBD_CMD_WRITE_ZEROES, 0, 36, DISK_SIZE, 512);
	ck_assert_uint_eq(read_simple(36), NBD_ENOSPC);
	send_req(NBD_CMD_TRIM, 0, 37, DISK_SIZE, 512);
	ck_assert_uint_eq(read_simple(37), NBD_EINVAL);
	/* unknown command, bad flags, flush with a range, CACHE (not offered) */
	send_req(42, 0, 38, 0, 512);
	ck_assert_uint_eq(read_simple(38), NBD_EINVAL);
	send_req(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 39, 0, 512);
	ck_assert_uint_eq(read_simple(39), NBD_EINVAL);
	send_req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 40, 0, 512);	/* DF without SR */
	ck_assert_uint_eq(read_simple(40), NBD_EINVAL);
	send_req(NBD_CMD_FLUSH, 0, 41, 0, 512);
	ck_assert_uint_eq(read_simple(41), NBD_EINVAL);
	send_req(NBD_CMD_CACHE, 0, 42, 0, 512);
	ck_assert_uint_eq(read_simple(42), NBD_EINVAL);
	/* oversized read: refused without a buffer */
	send_req(NBD_CMD_READ, 0, 43, 0, 0xfffffe00u);
	ck_assert_uint_eq(read_simple(43), NBD_EINVAL);
	/* still alive and correct */
	send_req(NBD_CMD_READ, 0, 44, 0, 4096);
	ck_assert_uint_eq(read_simple(44), 0);
	cl_read(buf, 4096);
	cl_expect_silence();
}
END_TEST

START_TEST(test_oversized_write_skipped)
{
	size_t len = NBD_MAX_BLOCK_SIZE + 4096;
	unsigned char *junk = calloc(1, len);
	unsigned char w[512], r[512];

	go("", false, false);
	send_req(NBD_CMD_WRITE, 0, 50, 0, (uint32_t)len);
	cl_write(junk, len);
	ck_assert_uint_eq(read_simple(50), NBD_EINVAL);
	free(junk);
	fill(w, sizeof(w), 5);
	write_ok(51, 0, w, sizeof(w));
	send_req(NBD_CMD_READ, 0, 52, 0, 512);
	ck_assert_uint_eq(read_simple(52), 0);
	cl_read(r, sizeof(r));
	ck_assert_mem_eq(r, w, sizeof(w));
}
END_TEST

START_TEST(test_read_only)
{
	unsigned char buf[1024] = { 0 };

	go("ro", false, false);
	send_req(NBD_CMD_WRITE, 0, 60, 0, 1024);
	cl_write(buf, 1024);
	ck_assert_uint_eq(read_simple(60), NBD_EPERM);
	send_req(NBD_CMD_TRIM, 0, 61, 0, 512);
	ck_assert_uint_eq(read_simple(61), NBD_EPERM);
	send_req(NBD_CMD_WRITE_ZEROES, 0, 62, 0, 512);
	ck_assert_uint_eq(read_simple(62), NBD_EPERM);
	send_req(NBD_CMD_FLUSH, 0, 63, 0, 0);
	ck_assert_uint_eq(read_simple(63), 0);
	send_req(NBD_CMD_READ, 0, 64, 0, 1024);
	ck_assert_uint_eq(read_simple(64), 0);
	cl_read(buf, 1024);
}
END_TEST

START_TEST(test_zero_trim_flush)
{
	size_t len = 256 * 1024;
	unsigned char *w = malloc(len), *r = malloc(len), *z = calloc(1, len);

	go("", false, false);
	fill(w, len, 1);
	write_ok(70, 0, w, (uint32_t)len);
	send_req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA, 71, 0, 64 * 1024);
	ck_assert_uint_eq(read_simple(71), 0);
	send_req(NBD_CMD_WRITE_ZEROES, 0, 72, 128 * 1024, 64 * 1024);
	ck_assert_uint_eq(read_simple(72), 0);
	send_req(NBD_CMD_TRIM, 0, 73, 192 * 1024, 64 * 1024);
	ck_assert_uint_eq(read_simple(73), 0);
	send_req(NBD_CMD_FLUSH, 0, 74, 0, 0);
	ck_assert_uint_eq(read_simple(74), 0);
	send_req(NBD_CMD_READ, 0, 75, 0, (uint32_t)len);
	ck_assert_uint_eq(read_simple(75), 0);
	cl_read(r, len);
	ck_assert_mem_eq(r, z, 64 * 1024);
	ck_assert_mem_eq(r + 64 * 1024, w + 64 * 1024, 64 * 1024);
	ck_assert_mem_eq(r + 128 * 1024, z, 64 * 1024);
	/* FAST_ZERO either succeeds or fails with exactly ENOTSUP */
	send_req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 76, 0, 4096);
	{
		uint32_t e = read_simple(76);

		ck_assert(e == 0 || e == NBD_ENOTSUP);
	}
	free(w);
	free(r);
	free(z);
}
END_TEST

START_TEST(test_block_status)
{
	unsigned char w[64 * 1024];
	struct chunk c;
	uint64_t sum = 0;
	uint32_t n;

	go("", true, true);
	fill(w, sizeof(w), 2);
	write_ok(80, 0, w, sizeof(w));
	send_req(NBD_CMD_BLOCK_STATUS, 0, 81, 0, DISK_SIZE);
	read_chunk(&c);
	ck_assert_uint_eq(c.handle, 81);
	ck_assert_uint_eq(c.type, NBD_REPLY_TYPE_BLOCK_STATUS);
	ck_assert_uint_eq(c.flags, NBD_REPLY_FLAG_DONE);
	ck_assert_uint_ge(c.len, 12);
	ck_assert_uint_eq((c.len - 4) % 8, 0);
	ck_assert_uint_eq(nbd_get32(c.data), NBD_META_ID_BASE_ALLOCATION);
	n = (c.len - 4) / 8;
	ck_assert_uint_le(n, NBD_MAX_EXTENTS);
	/* The data we wrote is data; the rest of a sparse file is a hole. */
	ck_assert_uint_ge(nbd_get32(c.data + 4), sizeof(w));
	ck_assert_uint_eq(nbd_get32(c.data + 8) & NBD_STATE_HOLE, 0);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t l = nbd_get32(c.data + 4 + 8 * i);

		ck_assert_uint_gt(l, 0);
		ck_assert_uint_eq(l % 512, 0);
		if (i)	/* merged: neighbours differ */
			ck_assert_uint_ne(nbd_get32(c.data + 8 + 8 * i),
					  nbd_get32(c.data + 8 * i));
		sum += l;
	}
	ck_assert_uint_le(sum, DISK_SIZE);
	free(c.data);

	/* REQ_ONE: exactly one extent, within the request */
	send_req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 82, 4096, 8192);
	read_chunk(&c);
	ck_assert_uint_eq(c.type, NBD_REPLY_TYPE_BLOCK_STATUS);
	ck_assert_uint_eq(c.len, 12);
	ck_assert_uint_eq(nbd_get32(c.data + 4), 8192);
	ck_assert_uint_eq(nbd_get32(c.data + 8) & NBD_STATE_HOLE, 0);
	free(c.data);

	/* out of range, zero length */
	send_req(NBD_CMD_BLOCK_STATUS, 0, 83, DISK_SIZE, 512);
	ck_assert_uint_eq(read_error_chunk(83), NBD_EINVAL);
	send_req(NBD_CMD_BLOCK_STATUS, 0, 84, 0, 0);
	ck_assert_uint_eq(read_error_chunk(84), NBD_EINVAL);
}
END_TEST

START_TEST(test_many_in_flight)
{
	enum { N = 100 };
	unsigned char buf[4096];
	bool seen[N] = { false };

	go("", false, false);
	for (int i = 0; i < N; i++)
		send_req(NBD_CMD_READ, 0, 1000 + i, (uint64_t)i * 4096, 4096);
	for (int i = 0; i < N; i++) {
		unsigned char h[NBD_SIMPLE_REPLY_SIZE];
		uint64_t handle;

		cl_read(h, sizeof(h));
		ck_assert_uint_eq(nbd_get32(h), NBD_SIMPLE_REPLY_MAGIC);
		ck_assert_uint_eq(nbd_get32(h + 4), 0);
		handle = nbd_get64(h + 8);
		ck_assert(handle >= 1000 && handle < 1000 + N);
		ck_assert(!seen[handle - 1000]);
		seen[handle - 1000] = true;
		cl_read(buf, sizeof(buf));
	}
}
END_TEST

START_TEST(test_backpressure)
{
	/* More request headers than the 64 KiB input buffer holds, with a
	 * cap of 4 in flight and a client that does not read replies: the
	 * server must stop reading, then serve everything once the client
	 * reads again. */
	enum { N = 6000 };
	unsigned char *reqs = malloc((size_t)N * NBD_REQUEST_SIZE);
	unsigned char buf[512];
	size_t sent = 0, total = (size_t)N * NBD_REQUEST_SIZE;
	bool *seen = calloc(N, sizeof(bool));
	int unread = 0, i;

	go("", false, false);
	for (i = 0; i < N; i++) {
		struct nbd_request r = { .type = NBD_CMD_READ, .handle = (uint64_t)i,
					 .offset = (uint64_t)(i % 64) * 512, .len = 512 };

		nbd_encode_request(reqs + (size_t)i * NBD_REQUEST_SIZE, &r);
	}
	for (i = 0; i < 2000 && sent < total; i++) {
		ssize_t n = write(cfd, reqs + sent, total - sent);

		if (n > 0)
			sent += (size_t)n;
		pump(1);
	}
	pump(50);
	ck_assert_int_eq(ioctl(sfd, FIONREAD, &unread), 0);
	ck_assert_msg(unread > 0 || sent < total, "server kept reading past its cap");
	ck_assert_uint_eq(nbd_server_connections(srv), 1);

	for (i = 0; i < N; i++) {
		while (sent < total) {
			ssize_t n = write(cfd, reqs + sent, total - sent);

			if (n <= 0)
				break;
			sent += (size_t)n;
		}
		unsigned char h[NBD_SIMPLE_REPLY_SIZE];
		uint64_t handle;

		cl_read(h, sizeof(h));
		ck_assert_uint_eq(nbd_get32(h), NBD_SIMPLE_REPLY_MAGIC);
		ck_assert_uint_eq(nbd_get32(h + 4), 0);
		handle = nbd_get64(h + 8);
		ck_assert_uint_lt(handle, N);
		ck_assert(!seen[handle]);
		seen[handle] = true;
		cl_read(buf, sizeof(buf));
	}
	ck_assert_uint_eq(sent, total);
	free(seen);
	free(reqs);
}
END_TEST

START_TEST(test_disc)
{
	unsigned char w[4096];

	go("", false, false);
	fill(w, sizeof(w), 4);
	send_req(NBD_CMD_WRITE, 0, 90, 0, sizeof(w));
	cl_write(w, sizeof(w));
	send_req(NBD_CMD_DISC, 0, 91, 0, 0);
	/* the write is answered, then the connection closes */
	ck_assert_uint_eq(read_simple(90), 0);
	cl_expect_eof();
}
END_TEST

START_TEST(test_bad_request_magic)
{
	unsigned char b[NBD_REQUEST_SIZE] = { 0x12, 0x34 };

	go("", false, false);
	cl_write(b, sizeof(b));
	cl_expect_eof();
}
END_TEST

START_TEST(test_half_request_then_close)
{
	unsigned char b[NBD_REQUEST_SIZE];
	struct nbd_request r = { .type = NBD_CMD_READ, .handle = 1, .len = 512 };

	go("", false, false);
	nbd_encode_request(b, &r);
	cl_write(b, 14);
	pump(5);
	close(cfd);
	cfd = -1;
}
END_TEST

START_TEST(test_vanish_mid_requests)
{
	unsigned char w[65536] = { 0 };

	go("", true, false);
	for (int i = 0; i < 32; i++)
		send_req(NBD_CMD_READ, 0, (uint64_t)i, 0, 65536);
	send_req(NBD_CMD_WRITE, 0, 99, 0, 65536);
	cl_write(w, 1000);	/* half a payload */
	pump(1);
	close(cfd);
	cfd = -1;
	/* teardown waits for the connection to go; ASan checks for leaks */
}
END_TEST

START_TEST(test_two_connections)
{
	unsigned char w[4096], r[4096];
	int first = cfd, first_srv = sfd;

	go("", false, false);
	connect_client();
	go("", true, false);
	fill(w, sizeof(w), 8);
	write_ok(1, 8192, w, sizeof(w));	/* on the second */
	{
		int second = cfd;

		cfd = first;
		send_req(NBD_CMD_READ, 0, 2, 8192, sizeof(r));
		ck_assert_uint_eq(read_simple(2), 0);
		cl_read(r, sizeof(r));
		ck_assert_mem_eq(r, w, sizeof(w));
		close(second);
	}
	(void)first_srv;
	ck_assert_uint_ge(nbd_server_connections(srv), 1);
}
END_TEST

static bool shut_done;

static void on_shutdown(void *arg)
{
	shut_done = true;
}

START_TEST(test_shutdown)
{
	unsigned char buf[4096];
	uint64_t end = now_ms() + 5000;

	go("", false, false);
	send_req(NBD_CMD_READ, 0, 5, 0, sizeof(buf));
	pump(1);
	shut_done = false;
	nbd_server_shutdown(srv, on_shutdown, NULL);
	/* the request in flight is answered, then the connection closes */
	ck_assert_uint_eq(read_simple(5), 0);
	cl_read(buf, sizeof(buf));
	cl_expect_eof();
	while (!shut_done && now_ms() < end)
		pump(1);
	ck_assert(shut_done);
	ck_assert_uint_eq(nbd_server_connections(srv), 0);
	{
		int sv[2];

		ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
		ck_assert_int_eq(nbd_server_add_connection(srv, sv[0]), -ESHUTDOWN);
		close(sv[1]);
	}
}
END_TEST

/*
 * A client still negotiating at shutdown (proto.md): its options are
 * answered NBD_REP_ERR_SHUTDOWN, its NBD_OPT_ABORT is acknowledged, then
 * the connection closes and the shutdown completes.
 */
START_TEST(test_shutdown_during_handshake)
{
	unsigned char g[NBD_GREETING_SIZE], f[4], d[64];
	uint32_t len;

	shut_done = false;
	cl_read(g, sizeof(g));
	nbd_server_shutdown(srv, on_shutdown, NULL);
	pump(2);
	ck_assert(!shut_done);
	nbd_put32(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	cl_write(f, sizeof(f));
	len = info_data(d, "", NULL, 0);
	ck_assert_uint_eq(opt_simple(NBD_OPT_GO, d, len), NBD_REP_ERR_SHUTDOWN);
	ck_assert_uint_eq(opt_simple(NBD_OPT_LIST, NULL, 0), NBD_REP_ERR_SHUTDOWN);
	ck_assert_uint_eq(opt_simple(NBD_OPT_ABORT, NULL, 0), NBD_REP_ACK);
	cl_expect_eof();
	pump(2);
	ck_assert(shut_done);
}
END_TEST

/* One that cannot be told (NBD_OPT_EXPORT_NAME has no error reply) is hung up on. */
START_TEST(test_shutdown_export_name)
{
	shut_done = false;
	hs_greeting(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	pump(2);
	nbd_server_shutdown(srv, on_shutdown, NULL);
	send_opt(NBD_OPT_EXPORT_NAME, NULL, 0);
	cl_expect_eof();
	pump(2);
	ck_assert(shut_done);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Listeners */

static int unix_connect(const char *p)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	strcpy(sa.sun_path, p);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

START_TEST(test_listen_unix)
{
	char sock[96], desc[256];
	struct nbd_server *other;
	struct stat st;
	int fd;

	snprintf(sock, sizeof(sock), "%s.sock", path);
	ck_assert_int_eq(nbd_server_listen_unix(srv, sock), 0);
	ck_assert_int_eq(stat(sock, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	nbd_server_describe(srv, desc, sizeof(desc));
	ck_assert_ptr_nonnull(strstr(desc, "unix:"));

	/* a live socket is in use */
	other = nbd_server_new(loop);
	tdr_clear_error();
	ck_assert_int_eq(nbd_server_listen_unix(other, sock), -EADDRINUSE);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "address in use"));

	/* a real client through the socket */
	fd = unix_connect(sock);
	ck_assert_int_ge(fd, 0);
	close(cfd);
	cfd = fd;
	ck_assert_int_eq(fcntl(cfd, F_SETFL, O_NONBLOCK), 0);
	go("", false, false);
	send_req(NBD_CMD_FLUSH, 0, 1, 0, 0);
	ck_assert_uint_eq(read_simple(1), 0);

	/* freeing the server removes the file; a stale one is replaced */
	nbd_server_free(other);
	ck_assert_int_eq(stat(sock, &st), 0);
	{
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		char stale[80];

		snprintf(stale, sizeof(stale), "%s.stale", path);
		strcpy(sa.sun_path, stale);
		ck_assert_int_eq(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
		close(s);	/* bound, never listened: stale */
		other = nbd_server_new(loop);
		ck_assert_int_eq(nbd_server_listen_unix(other, stale), 0);
		nbd_server_free(other);
		ck_assert_int_eq(stat(stale, &st), -1);
	}
	/* not a socket: left alone */
	other = nbd_server_new(loop);
	ck_assert_int_eq(nbd_server_listen_unix(other, path), -EEXIST);
	ck_assert_int_eq(stat(path, &st), 0);
	nbd_server_free(other);
}
END_TEST

START_TEST(test_listen_tcp)
{
	char desc[256];
	struct nbd_server *other;
	const char *p;

	ck_assert_int_eq(nbd_server_listen_tcp(srv, "127.0.0.1", "0"), 0);
	nbd_server_describe(srv, desc, sizeof(desc));
	p = strstr(desc, "tcp:127.0.0.1:");
	ck_assert_ptr_nonnull(p);
	p += strlen("tcp:127.0.0.1:");
	ck_assert_int_gt(atoi(p), 0);
	other = nbd_server_new(loop);
	ck_assert_int_eq(nbd_server_listen_tcp(other, "127.0.0.1", p), -EADDRINUSE);
	ck_assert_int_eq(nbd_server_listen_tcp(other, "no.such.host.invalid", "1"), -EINVAL);
	nbd_server_free(other);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("nbd");
	TCase *hs = tcase_create("handshake");
	TCase *tx = tcase_create("transmission");
	TCase *bp = tcase_create("backpressure");
	TCase *ls = tcase_create("listeners");

	tcase_add_checked_fixture(hs, setup, teardown);
	tcase_set_timeout(hs, 60);
	tcase_add_test(hs, test_go_info_block_size);
	tcase_add_test(hs, test_info_stays_in_options);
	tcase_add_test(hs, test_export_name);
	tcase_add_test(hs, test_export_name_no_zeroes);
	tcase_add_test(hs, test_export_name_unknown);
	tcase_add_test(hs, test_list);
	tcase_add_test(hs, test_abort);
	tcase_add_test(hs, test_unknown_options);
	tcase_add_test(hs, test_tls_required);
	tcase_add_test(hs, test_tls_required_export_name);
	tcase_add_test(hs, test_tls_on_serves_plain);
	tcase_add_test(hs, test_tls_handshake_garbage);
	tcase_add_test(hs, test_tls_data_after_starttls);
	tcase_add_test(hs, test_tls_bad_config);
	tcase_add_test(hs, test_option_too_big);
	tcase_add_test(hs, test_option_huge_length);
	tcase_add_test(hs, test_export_name_too_long);
	tcase_add_test(hs, test_meta_context);
	tcase_add_test(hs, test_bad_client_flags);
	tcase_add_test(hs, test_bad_option_magic);
	tcase_add_test(hs, test_half_option_then_close);
	suite_add_tcase(s, hs);

	tcase_add_checked_fixture(tx, setup, teardown);
	tcase_set_timeout(tx, 60);
	tcase_add_test(tx, test_read_write_simple);
	tcase_add_test(tx, test_recycled_buffers_hold_no_old_data);
	tcase_add_test(tx, test_read_write_structured);
	tcase_add_test(tx, test_request_errors);
	tcase_add_test(tx, test_oversized_write_skipped);
	tcase_add_test(tx, test_read_only);
	tcase_add_test(tx, test_zero_trim_flush);
	tcase_add_test(tx, test_block_status);
	tcase_add_test(tx, test_many_in_flight);
	tcase_add_test(tx, test_disc);
	tcase_add_test(tx, test_bad_request_magic);
	tcase_add_test(tx, test_half_request_then_close);
	tcase_add_test(tx, test_vanish_mid_requests);
	tcase_add_test(tx, test_two_connections);
	tcase_add_test(tx, test_shutdown);
	tcase_add_test(tx, test_shutdown_during_handshake);
	tcase_add_test(tx, test_shutdown_export_name);
	suite_add_tcase(s, tx);

	tcase_add_checked_fixture(bp, setup_small_cap, teardown);
	tcase_set_timeout(bp, 120);
	tcase_add_test(bp, test_backpressure);
	suite_add_tcase(s, bp);

	tcase_add_checked_fixture(ls, setup, teardown);
	tcase_set_timeout(ls, 60);
	tcase_add_test(ls, test_listen_unix);
	tcase_add_test(ls, test_listen_tcp);
	suite_add_tcase(s, ls);
	return s;
}

int main(void)
{
	return check_run(suite(), CHECK_RUN_FORK);
}
