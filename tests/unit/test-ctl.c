/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the control socket: the message layout (blktap3's), and the
 * server driven over socketpairs and a temporary socket path with
 * tdr_loop_run_once: PID, LIST, STATS (JSON checked by a small parser),
 * pause/resume holding requests, open/close through hooks, replica requests,
 * and bad clients (truncated, unknown, unterminated, responses as requests).
 */
#include <check.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "tdr/ctl-message.h"
#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/replica.h"
#include "check-run.h"

#define MIB (1u << 20)

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static struct ctl_server *srv;
static struct td_disk *disk;
static char img_path[64], spec[96];
static int cfd = -1;		/* the client end of a socketpair */

/* ------------------------------------------------------------ helpers */

/* Runs the loop until fd has want bytes to read (or the peer closed), for at most 5 s. */
static void pump_until_readable(int fd, size_t want)
{
	for (int i = 0; i < 5000; i++) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int avail = 0;

		if (poll(&p, 1, 0) == 1) {
			if (p.revents & (POLLHUP | POLLERR))
				return;
			if (ioctl(fd, FIONREAD, &avail) == 0 && (size_t)avail >= want)
				return;
			if (avail == 0)
				return;	/* EOF */
		}
		tdr_loop_run_once(loop, 1);
	}
	ck_abort_msg("no answer from the control server within 5 s");
}

static void pump(int n)
{
	while (n-- > 0)
		tdr_loop_run_once(loop, 1);
}

static int new_client(void)
{
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(ctl_server_add_connection(srv, sv[0]), 0);
	return sv[1];
}

static void send_msg(int fd, const struct tdr_ctl_msg *m)
{
	ck_assert_int_eq(tdr_ctl_send(fd, m, 1000), 0);
}

static void recv_msg(int fd, struct tdr_ctl_msg *m)
{
	pump_until_readable(fd, sizeof(*m));
	ck_assert_int_eq(tdr_ctl_recv(fd, m, 1000), 0);
}

static void rpc(int fd, unsigned type, unsigned cookie, struct tdr_ctl_msg *rsp)
{
	struct tdr_ctl_msg m;

	tdr_ctl_msg_init(&m, type, cookie);
	send_msg(fd, &m);
	recv_msg(fd, rsp);
}

/* rpc() of a message carrying params.path (open, resume), no flags. */
static void rpc_path(int fd, unsigned type, unsigned cookie, const char *path,
		     struct tdr_ctl_msg *rsp)
{
	struct tdr_ctl_msg m;

	tdr_ctl_msg_init(&m, type, cookie);
	ck_assert_uint_lt(strlen(path), sizeof(m.u.params.path));
	strcpy(m.u.params.path, path);
	send_msg(fd, &m);
	recv_msg(fd, rsp);
}

static void expect_error(const struct tdr_ctl_msg *rsp, int err, const char *needle)
{
	ck_assert_uint_eq(rsp->type, TAPDISK_MESSAGE_ERROR);
	ck_assert_int_eq(rsp->u.response.error, err);
	ck_assert_msg(strstr(rsp->u.response.message, needle), "message '%s' lacks '%s'",
		      rsp->u.response.message, needle);
}

/* Replica request: DATA text into out (if any), the final RSP into rsp. */
static void replica_rpc(int fd, unsigned minor, const char *line, struct tdr_ctl_msg *rsp,
			char *out, size_t outlen)
{
	struct tdr_ctl_msg m;
	size_t used = 0;

	tdr_ctl_msg_init(&m, TDR_MESSAGE_REPLICA, minor);
	ck_assert_int_eq(tdr_ctl_set_string(m.u.string.text, sizeof(m.u.string.text), line), 0);
	send_msg(fd, &m);
	if (out)
		out[0] = '\0';
	for (;;) {
		recv_msg(fd, rsp);
		if (rsp->type != TDR_MESSAGE_REPLICA_DATA)
			break;
		ck_assert(tdr_ctl_string_ok(rsp->u.string.text, sizeof(rsp->u.string.text)));
		if (out) {
			size_t n = strlen(rsp->u.string.text);

			ck_assert_uint_lt(used + n, outlen);
			memcpy(out + used, rsp->u.string.text, n + 1);
			used += n;
		}
	}
	ck_assert_uint_eq(rsp->type, TDR_MESSAGE_REPLICA_RSP);
}

/* A minimal JSON parser: true if s is exactly one valid JSON value. */
static const char *json_value(const char *s);

static const char *json_ws(const char *s)
{
	while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')
		s++;
	return s;
}

static const char *json_string(const char *s)
{
	if (*s++ != '"')
		return NULL;
	while (*s && *s != '"') {
		if ((unsigned char)*s < 0x20)
			return NULL;
		if (*s == '\\') {
			s++;
			if (*s == 'u') {
				for (int i = 1; i <= 4; i++)
					if (!isxdigit((unsigned char)s[i]))
						return NULL;
				s += 4;
			} else if (!strchr("\"\\/bfnrt", *s)) {
				return NULL;
			}
		}
		s++;
	}
	return *s == '"' ? s + 1 : NULL;
}

static const char *json_value(const char *s)
{
	s = json_ws(s);
	if (*s == '{' || *s == '[') {
		char close = *s == '{' ? '}' : ']';
		bool obj = *s == '{';

		s = json_ws(s + 1);
		if (*s == close)
			return s + 1;
		for (;;) {
			if (obj) {
				s = json_string(json_ws(s));
				if (!s)
					return NULL;
				s = json_ws(s);
				if (*s++ != ':')
					return NULL;
			}
			s = json_value(s);
			if (!s)
				return NULL;
			s = json_ws(s);
			if (*s == close)
				return s + 1;
			if (*s++ != ',')
				return NULL;
		}
	}
	if (*s == '"')
		return json_string(s);
	if (*s == '-' || isdigit((unsigned char)*s)) {
		if (*s == '-')
			s++;
		if (!isdigit((unsigned char)*s))
			return NULL;
		while (isdigit((unsigned char)*s))
			s++;
		return s;
	}
	if (!strncmp(s, "true", 4) || !strncmp(s, "null", 4))
		return s + 4;
	if (!strncmp(s, "false", 5))
		return s + 5;
	return NULL;
}

static bool json_valid(const char *s)
{
	const char *end = json_value(s);

	return end && *json_ws(end) == '\0';
}

static char *stats_of(int fd, unsigned cookie)
{
	struct tdr_ctl_msg rsp;
	char *buf;

	rpc(fd, TAPDISK_MESSAGE_STATS, cookie, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_STATS_RSP);
	ck_assert_uint_eq(rsp.cookie, cookie);
	ck_assert_uint_gt(rsp.u.info.length, 0);
	ck_assert_uint_lt(rsp.u.info.length, MIB);
	buf = calloc(1, rsp.u.info.length + 1);
	ck_assert_ptr_nonnull(buf);
	pump_until_readable(fd, rsp.u.info.length);
	ck_assert_int_eq(tdr_ctl_recv_raw(fd, buf, rsp.u.info.length, 1000), 0);
	return buf;
}

/* ------------------------------------------------------------ fixture */

static void make_image(char *path, size_t len, char *s, size_t slen, const char *prefix)
{
	int fd;

	snprintf(path, len, "/var/tmp/tdr-test-ctl-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, 8 * MIB), 0);
	close(fd);
	snprintf(s, slen, "%saio:%s", prefix, path);
}

static void setup(void)
{
	tdr_log_init("test-ctl", false, TDR_LOG_ERR);
	make_image(img_path, sizeof(img_path), spec, sizeof(spec), "");
	loop = tdr_loop_new();
	ck_assert_ptr_nonnull(loop);
	io = tdr_io_ctx_new(loop, 64);
	ck_assert_ptr_nonnull(io);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	srv = ctl_server_new(loop, NULL);
	ck_assert_ptr_nonnull(srv);
	ck_assert_int_eq(ctl_server_add_minor(srv, 0, disk, spec), 0);
	cfd = new_client();
}

static void teardown(void)
{
	if (cfd >= 0)
		close(cfd);
	cfd = -1;
	ctl_server_free(srv);
	srv = NULL;
	pump(3);
	if (disk)
		td_disk_close(disk);
	disk = NULL;
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	unlink(img_path);
}

/* ------------------------------------------------------------ layout */

START_TEST(test_layout)
{
	struct tdr_ctl_msg m;

	/* blktap3's tapdisk_message_t on LP64. */
	ck_assert_uint_eq(sizeof(struct tdr_ctl_msg), 544);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, cookie), 2);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u), 8);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.params.devnum), 12);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.params.path), 20);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.params.req_timeout), 280);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.params.secondary), 282);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.list.minor), 12);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.list.state), 16);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.list.path), 20);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.response.message), 12);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.info.length), 16);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.image.sector_size), 16);
	ck_assert_uint_eq(offsetof(struct tdr_ctl_msg, u.image.info), 20);
	ck_assert_uint_eq(sizeof(m.u.string.text), 256);
	ck_assert_uint_eq(TAPDISK_MESSAGE_MAX_MINORS, 63);

	/* The numbers tap-ctl sends. */
	ck_assert_int_eq(TAPDISK_MESSAGE_PID, 3);
	ck_assert_int_eq(TAPDISK_MESSAGE_OPEN, 7);
	ck_assert_int_eq(TAPDISK_MESSAGE_PAUSE, 9);
	ck_assert_int_eq(TAPDISK_MESSAGE_RESUME, 11);
	ck_assert_int_eq(TAPDISK_MESSAGE_CLOSE, 13);
	ck_assert_int_eq(TAPDISK_MESSAGE_LIST, 19);
	ck_assert_int_eq(TAPDISK_MESSAGE_STATS, 21);
	ck_assert_int_eq(TAPDISK_MESSAGE_FORCE_SHUTDOWN, 23);
	ck_assert_int_eq(TAPDISK_MESSAGE_DISK_INFO, 28);
	ck_assert_int_eq(TAPDISK_MESSAGE_EXIT, 30);
	ck_assert_int_eq(TAPDISK_MESSAGE_CANCEL_COMMIT_JOB_RSP, 36);
	ck_assert_int_eq(TDR_MESSAGE_REPLICA, 0x1000);
	ck_assert_int_eq(TAPDISK_MESSAGE_FLAG_RDONLY, 0x2);
	ck_assert_int_eq(TAPDISK_MESSAGE_FLAG_ADD_LOG, 0x10);

	/* Encoding: the bytes where blktap reads them. */
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_OPEN, 7);
	m.u.params.flags = TAPDISK_MESSAGE_FLAG_RDONLY;
	ck_assert_int_eq(tdr_ctl_set_string(m.u.params.path, sizeof(m.u.params.path), "aio:/x"), 0);
	{
		const unsigned char *b = (const unsigned char *)&m;
		uint16_t type, cookie;
		uint32_t flags;

		memcpy(&type, b, 2);
		memcpy(&cookie, b + 2, 2);
		memcpy(&flags, b + 8, 4);
		ck_assert_uint_eq(type, 7);
		ck_assert_uint_eq(cookie, 7);
		ck_assert_uint_eq(flags, 2);
		ck_assert_str_eq((const char *)b + 20, "aio:/x");
	}
}
END_TEST

START_TEST(test_helpers)
{
	struct tdr_ctl_msg m;
	char buf[8], big[300];

	ck_assert_str_eq(tdr_ctl_msg_name(TAPDISK_MESSAGE_PAUSE_RSP), "pause response");
	ck_assert_str_eq(tdr_ctl_msg_name(TDR_MESSAGE_REPLICA_DATA), "replica data");
	ck_assert_str_eq(tdr_ctl_msg_name(0), "unknown");
	ck_assert_str_eq(tdr_ctl_msg_name(999), "unknown");
	ck_assert_int_eq(tdr_ctl_set_string(buf, sizeof(buf), "1234567"), 0);
	ck_assert_int_eq(tdr_ctl_set_string(buf, sizeof(buf), "12345678"), -ENAMETOOLONG);
	memset(big, 'x', sizeof(big));
	ck_assert(!tdr_ctl_string_ok(big, sizeof(big)));
	big[299] = '\0';
	ck_assert(tdr_ctl_string_ok(big, sizeof(big)));
	tdr_ctl_msg_error(&m, TAPDISK_MESSAGE_ERROR, 3, -EBUSY, "minor %d busy", 3);
	ck_assert_int_eq(m.u.response.error, EBUSY);
	ck_assert_str_eq(m.u.response.message, "minor 3 busy");
	ck_assert_int_eq(tdr_ctl_socket_path(big, sizeof(big), "/run/x", 42), 0);
	ck_assert_str_eq(big, "/run/x/ctl42");
}
END_TEST

/* ------------------------------------------------------------ basic requests */

START_TEST(test_pid)
{
	struct tdr_ctl_msg rsp;

	rpc(cfd, TAPDISK_MESSAGE_PID, 0xffff, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
	ck_assert_uint_eq(rsp.cookie, 0xffff);
	ck_assert_int_eq(rsp.u.tapdisk_pid, getpid());
	/* The connection serves more than one request. */
	rpc(cfd, TAPDISK_MESSAGE_PID, 5, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
	ck_assert_uint_eq(rsp.cookie, 5);
}
END_TEST

START_TEST(test_list)
{
	struct tdr_ctl_msg rsp;
	struct td_disk *d2;
	char p2[64], s2[96];

	make_image(p2, sizeof(p2), s2, sizeof(s2), "");
	ck_assert_int_eq(td_disk_open(&d2, s2, 0, loop, io), 0);
	ck_assert_int_eq(ctl_server_add_minor(srv, 3, d2, s2), 0);
	ck_assert_int_eq(ctl_server_add_minor(srv, 3, d2, s2), -EEXIST);
	ck_assert_int_eq(ctl_server_add_minor(srv, 0xffff, d2, s2), -EINVAL);

	rpc(cfd, TAPDISK_MESSAGE_LIST, 0xffff, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_LIST_RSP);
	ck_assert_int_eq(rsp.u.list.count, 2);
	ck_assert_int_eq(rsp.u.list.minor, 3);
	ck_assert_int_eq(rsp.u.list.state, 0);
	ck_assert_str_eq(rsp.u.list.path, s2);
	recv_msg(cfd, &rsp);
	ck_assert_int_eq(rsp.u.list.count, 1);
	ck_assert_int_eq(rsp.u.list.minor, 0);
	ck_assert_str_eq(rsp.u.list.path, spec);
	recv_msg(cfd, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_LIST_RSP);
	ck_assert_int_eq(rsp.u.list.count, 0);
	ck_assert_int_eq(rsp.u.list.minor, -1);

	ck_assert_int_eq(ctl_server_remove_minor(srv, 3), 0);
	ck_assert_int_eq(ctl_server_remove_minor(srv, 3), -ENOENT);
	td_disk_close(d2);
	unlink(p2);
	rpc(cfd, TAPDISK_MESSAGE_LIST, 0xffff, &rsp);
	ck_assert_int_eq(rsp.u.list.count, 1);
	recv_msg(cfd, &rsp);
	ck_assert_int_eq(rsp.u.list.count, 0);
}
END_TEST

static void io_done(struct td_request *req, int err, void *arg)
{
	*(int *)arg = err ? err : 1;
}

START_TEST(test_stats)
{
	struct td_request req;
	char *json, *buf = tdr_io_alloc(4096);
	int done = 0;
	struct tdr_ctl_msg rsp;

	/* One read, so that the counters are not all zero. */
	td_request_init(&req, TD_OP_READ, 0, 8, buf, io_done, &done);
	td_disk_submit(disk, &req);
	while (!done)
		tdr_loop_run_once(loop, 10);
	ck_assert_int_eq(done, 1);

	json = stats_of(cfd, 0);
	ck_assert_msg(json_valid(json), "invalid JSON: %s", json);
	ck_assert_ptr_nonnull(strstr(json, "\"minor\": 0"));
	ck_assert_ptr_nonnull(strstr(json, "\"secs\": [8, 0]"));
	ck_assert_ptr_nonnull(strstr(json, "\"hits\": [1, 0]"));
	ck_assert_ptr_nonnull(strstr(json, "\"type\": \"aio\""));
	ck_assert_ptr_null(strstr(json, "\"replica\""));
	free(json);

	json = stats_of(cfd, 0xffff);
	ck_assert_msg(json_valid(json), "invalid JSON: %s", json);
	ck_assert_int_eq(json[0], '[');
	free(json);

	rpc(cfd, TAPDISK_MESSAGE_STATS, 9, &rsp);
	expect_error(&rsp, ENODEV, "no minor 9");
	free(buf);
}
END_TEST

/* ------------------------------------------------------------ bad clients */

START_TEST(test_truncated)
{
	char junk[100] = { 3, 0 };
	struct tdr_ctl_msg rsp;
	int fd = new_client();

	ck_assert_uint_eq(ctl_server_connections(srv), 2);
	ck_assert_int_eq(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
	ck_assert_int_eq(shutdown(fd, SHUT_WR), 0);
	recv_msg(fd, &rsp);
	expect_error(&rsp, EPROTO, "truncated message");
	ck_assert_ptr_nonnull(strstr(rsp.u.response.message, "100 of 544"));
	/* Then the server closes that connection, and only that one. */
	pump_until_readable(fd, 1);
	ck_assert_int_eq(read(fd, junk, sizeof(junk)), 0);
	close(fd);
	pump(3);
	ck_assert_uint_eq(ctl_server_connections(srv), 1);
	rpc(cfd, TAPDISK_MESSAGE_PID, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
}
END_TEST

START_TEST(test_vanishing_client)
{
	struct tdr_ctl_msg m;
	int fd = new_client();

	/* Half a message, then gone for good: no answer possible, no crash. */
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_LIST, 0xffff);
	ck_assert_int_eq(write(fd, &m, 10), 10);
	close(fd);
	pump(5);
	ck_assert_uint_eq(ctl_server_connections(srv), 1);
	/* A client that asks and leaves before reading. */
	fd = new_client();
	send_msg(fd, &m);
	close(fd);
	pump(5);
	ck_assert_uint_eq(ctl_server_connections(srv), 1);
}
END_TEST

START_TEST(test_byte_by_byte)
{
	struct tdr_ctl_msg m, rsp;
	const char *p = (const char *)&m;
	int fd2 = new_client();

	/* Two clients interleaving partial messages. */
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_PID, 1);
	for (size_t i = 0; i < sizeof(m); i++) {
		ck_assert_int_eq(write(cfd, p + i, 1), 1);
		ck_assert_int_eq(write(fd2, p + i, 1), 1);
		if (i % 64 == 0)
			pump(1);
	}
	recv_msg(cfd, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
	recv_msg(fd2, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
	close(fd2);
}
END_TEST

START_TEST(test_unknown_and_responses)
{
	struct tdr_ctl_msg rsp;

	rpc(cfd, 0x7777, 0, &rsp);
	expect_error(&rsp, EINVAL, "unknown message type 30583 (0x7777)");
	rpc(cfd, 0, 0, &rsp);
	expect_error(&rsp, EINVAL, "unknown message type 0");
	rpc(cfd, TAPDISK_MESSAGE_PID_RSP, 0, &rsp);
	expect_error(&rsp, EINVAL, "is a response");
	rpc(cfd, TDR_MESSAGE_REPLICA_RSP, 0, &rsp);
	expect_error(&rsp, EINVAL, "is a response");
	/* From 24 on, blktap's responses have odd numbers too. */
	rpc(cfd, TAPDISK_MESSAGE_DISK_INFO_RSP, 0, &rsp);
	expect_error(&rsp, EINVAL, "message type 29 ('disk info response') is a response");
	rpc(cfd, TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP, 0, &rsp);
	expect_error(&rsp, EINVAL, "is a response");
	rpc(cfd, TAPDISK_MESSAGE_COMMIT_RSP, 0, &rsp);
	expect_error(&rsp, EINVAL, "is a response");
	rpc(cfd, TAPDISK_MESSAGE_EXIT, 0, &rsp);
	expect_error(&rsp, EINVAL, "unsupported message 'exit'");
	rpc(cfd, TAPDISK_MESSAGE_XENBLKIF_CONNECT, 0, &rsp);
	expect_error(&rsp, EOPNOTSUPP, "no Xen shared ring");
	/* Still talking. */
	rpc(cfd, TAPDISK_MESSAGE_PID, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
}
END_TEST

START_TEST(test_unterminated)
{
	struct tdr_ctl_msg m, rsp;

	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_OPEN, 1);
	memset(m.u.params.path, 'a', sizeof(m.u.params.path));
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	expect_error(&rsp, EINVAL, "not NUL-terminated within 256 bytes");

	tdr_ctl_msg_init(&m, TDR_MESSAGE_REPLICA, 0);
	memset(m.u.string.text, 'c', sizeof(m.u.string.text));
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	ck_assert_uint_eq(rsp.type, TDR_MESSAGE_REPLICA_RSP);
	ck_assert_int_eq(rsp.u.response.error, EINVAL);
	ck_assert_ptr_nonnull(strstr(rsp.u.response.message, "not NUL-terminated"));
}
END_TEST

START_TEST(test_log_trailer)
{
	struct tdr_ctl_msg m, rsp;
	char trailer[256] = "/var/log/x";

	/* tap-ctl open -C sends a log path after the message: consumed, then refused. */
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_OPEN, 2);
	m.u.params.flags = TAPDISK_MESSAGE_FLAG_ADD_LOG;
	strcpy(m.u.params.path, "aio:/nonexistent");
	send_msg(cfd, &m);
	ck_assert_int_eq(write(cfd, trailer, sizeof(trailer)), (ssize_t)sizeof(trailer));
	recv_msg(cfd, &rsp);
	expect_error(&rsp, EOPNOTSUPP, "log layers");
	/* Framing intact. */
	rpc(cfd, TAPDISK_MESSAGE_PID, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PID_RSP);
}
END_TEST

/* ------------------------------------------------------------ pause, resume */

START_TEST(test_pause_holds)
{
	struct tdr_ctl_msg rsp;
	struct td_request req;
	char *buf = tdr_io_alloc(4096);
	int done = 0;

	rpc(cfd, TAPDISK_MESSAGE_RESUME, 0, &rsp);
	expect_error(&rsp, EINVAL, "not paused");
	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 4, &rsp);
	expect_error(&rsp, ENODEV, "no minor 4");

	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PAUSE_RSP);
	ck_assert(ctl_server_minor_paused(srv, 0));
	/* Paused twice is still paused. */
	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PAUSE_RSP);

	rpc(cfd, TAPDISK_MESSAGE_LIST, 0xffff, &rsp);
	ck_assert_int_eq(rsp.u.list.state, TDR_CTL_STATE_PAUSED);
	recv_msg(cfd, &rsp);

	td_request_init(&req, TD_OP_READ, 0, 8, buf, io_done, &done);
	td_disk_submit(disk, &req);
	pump(20);
	ck_assert_int_eq(done, 0);

	rpc(cfd, TAPDISK_MESSAGE_RESUME, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_RESUME_RSP);
	for (int i = 0; i < 1000 && !done; i++)
		tdr_loop_run_once(loop, 10);
	ck_assert_int_eq(done, 1);
	ck_assert(!ctl_server_minor_paused(srv, 0));
	ck_assert_ptr_eq(disk->top->drv, td_driver_find("aio"));
	free(buf);
}
END_TEST

START_TEST(test_pause_waits_for_inflight)
{
	struct tdr_ctl_msg m, rsp;
	struct td_request req;
	char *buf = tdr_io_alloc(MIB);
	int done = 0;

	td_request_init(&req, TD_OP_WRITE, 0, MIB / 512, buf, io_done, &done);
	memset(buf, 0x5a, MIB);
	td_disk_submit(disk, &req);
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_PAUSE, 0);
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PAUSE_RSP);
	/* PAUSE_RSP means nothing is in flight any more. */
	ck_assert_int_eq(done, 1);
	ck_assert_uint_eq(disk->inflight, 0);
	rpc(cfd, TAPDISK_MESSAGE_RESUME, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_RESUME_RSP);
	free(buf);
}
END_TEST

/* ------------------------------------------------------------ open, close */

static int hook_opens;

static int hook_open(void *arg, int minor, const char *s, unsigned flags, struct td_disk **d,
		     char *msg, size_t msglen)
{
	int err;

	hook_opens++;
	err = td_disk_open(d, s, flags | TD_OPEN_QUIET, loop, io);
	if (err < 0)
		snprintf(msg, msglen, "%s", tdr_last_error());
	return err;
}

static void hook_close(void *arg, int minor, struct td_disk *d, ctl_done_fn done, void *done_arg)
{
	td_disk_close(d);
	if (d == disk)
		disk = NULL;
	done(done_arg, 0, "");
}

START_TEST(test_open_close)
{
	struct ctl_hooks hooks = { .open = hook_open, .close = hook_close };
	struct tdr_ctl_msg m, rsp;
	char p2[64], s2[96];

	/* Without hooks: precise refusals. */
	rpc_path(cfd, TAPDISK_MESSAGE_OPEN, 1, "aio:/x", &rsp);
	expect_error(&rsp, EOPNOTSUPP, "tapdisk-replica daemon");
	rpc(cfd, TAPDISK_MESSAGE_CLOSE, 0, &rsp);
	expect_error(&rsp, EOPNOTSUPP, "cannot close minor 0");

	ctl_server_set_hooks(srv, &hooks);
	make_image(p2, sizeof(p2), s2, sizeof(s2), "");
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_OPEN, 1);
	m.u.params.flags = TAPDISK_MESSAGE_FLAG_RDONLY;
	strcpy(m.u.params.path, s2);
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_OPEN_RSP);
	ck_assert_uint_eq(rsp.u.image.sectors, 8 * MIB / 512);
	ck_assert_uint_eq(rsp.u.image.sector_size, 512);
	ck_assert_uint_eq(rsp.u.image.info, TDR_CTL_INFO_READONLY);
	/* Again: already open. */
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	expect_error(&rsp, EALREADY, "already has an image open");
	/* Unsupported flags are named. */
	tdr_ctl_msg_init(&m, TAPDISK_MESSAGE_OPEN, 2);
	m.u.params.flags = TAPDISK_MESSAGE_FLAG_SECONDARY;
	strcpy(m.u.params.path, s2);
	send_msg(cfd, &m);
	recv_msg(cfd, &rsp);
	expect_error(&rsp, EOPNOTSUPP, "secondary images");
	/* A failing open leaves no minor behind. */
	rpc_path(cfd, TAPDISK_MESSAGE_OPEN, 2, "nosuchtype:/x", &rsp);
	expect_error(&rsp, EINVAL, "unknown image type 'nosuchtype'");
	rpc(cfd, TAPDISK_MESSAGE_DISK_INFO, 2, &rsp);
	expect_error(&rsp, ENODEV, "no minor 2");
	rpc(cfd, TAPDISK_MESSAGE_DISK_INFO, 1, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_DISK_INFO_RSP);
	ck_assert_uint_eq(rsp.u.image.sectors, 8 * MIB / 512);

	rpc(cfd, TAPDISK_MESSAGE_DETACH, 1, &rsp);
	expect_error(&rsp, EBUSY, "close it first");
	rpc(cfd, TAPDISK_MESSAGE_CLOSE, 1, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_CLOSE_RSP);
	rpc(cfd, TAPDISK_MESSAGE_FORCE_SHUTDOWN, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_CLOSE_RSP);
	ck_assert_ptr_null(disk);
	rpc(cfd, TAPDISK_MESSAGE_LIST, 0xffff, &rsp);
	ck_assert_int_eq(rsp.u.list.count, 0);
	rpc(cfd, TAPDISK_MESSAGE_CLOSE, 1, &rsp);
	expect_error(&rsp, ENODEV, "no minor 1");

	/* attach / detach of an empty minor. */
	rpc(cfd, TAPDISK_MESSAGE_ATTACH, 5, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_ATTACH_RSP);
	rpc(cfd, TAPDISK_MESSAGE_ATTACH, 5, &rsp);
	expect_error(&rsp, EEXIST, "already attached");
	rpc(cfd, TAPDISK_MESSAGE_LIST, 0xffff, &rsp);
	ck_assert_int_eq(rsp.u.list.minor, 5);
	ck_assert_int_eq(rsp.u.list.state, TDR_CTL_STATE_CLOSED);
	ck_assert_str_eq(rsp.u.list.path, "");
	recv_msg(cfd, &rsp);
	/*
	 * A failed open of the attached minor leaves no image name behind:
	 * a resume naming the image that never opened is not taken for it.
	 */
	rpc_path(cfd, TAPDISK_MESSAGE_OPEN, 5, "nosuchtype:/x", &rsp);
	expect_error(&rsp, EINVAL, "unknown image type 'nosuchtype'");
	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 5, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PAUSE_RSP);
	rpc_path(cfd, TAPDISK_MESSAGE_RESUME, 5, "nosuchtype:/x", &rsp);
	expect_error(&rsp, EOPNOTSUPP, "instead of none");
	rpc(cfd, TAPDISK_MESSAGE_RESUME, 5, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_RESUME_RSP);
	rpc(cfd, TAPDISK_MESSAGE_DETACH, 5, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_DETACH_RSP);
	unlink(p2);
}
END_TEST

/* ------------------------------------------------------------ replica */

START_TEST(test_replica_no_filter)
{
	struct tdr_ctl_msg rsp;

	replica_rpc(cfd, 0, "status", &rsp, NULL, 0);
	ck_assert_int_eq(rsp.u.response.error, EOPNOTSUPP);
	ck_assert_ptr_nonnull(strstr(rsp.u.response.message, "has no replica filter"));
	replica_rpc(cfd, 9, "status", &rsp, NULL, 0);
	ck_assert_int_eq(rsp.u.response.error, ENODEV);
	ck_assert_ptr_nonnull(strstr(rsp.u.response.message, "no minor 9"));
}
END_TEST

START_TEST(test_replica_requests)
{
	struct tdr_ctl_msg rsp;
	struct td_disk *d2;
	char p2[64], s2[160], out[4096];

	make_image(p2, sizeof(p2), s2, sizeof(s2), "replica:mode=primary|");
	ck_assert_int_eq(td_disk_open(&d2, s2, 0, loop, io), 0);
	ck_assert_int_eq(ctl_server_add_minor(srv, 7, d2, s2), 0);

	replica_rpc(cfd, 7, "status", &rsp, out, sizeof(out));
	ck_assert_int_eq(rsp.u.response.error, 0);
	ck_assert_ptr_nonnull(strstr(out, "mode=primary\n"));
	ck_assert_ptr_nonnull(strstr(out, "state=none\n"));
	ck_assert_ptr_nonnull(strstr(out, "link_errors=0\n"));
	/* The status is longer than one chunk: it came in pieces. */
	ck_assert_uint_gt(strlen(out), TDR_CTL_DATA_CHUNK);

	/* Bad words: refused with the parser's reason, nothing changed. */
	replica_rpc(cfd, 7, "chekpoint", &rsp, out, sizeof(out));
	ck_assert_int_eq(rsp.u.response.error, EINVAL);
	ck_assert_ptr_nonnull(strstr(rsp.u.response.message, "unknown request 'chekpoint'"));
	ck_assert_str_eq(out, "");
	replica_rpc(cfd, 7, "resync sideways", &rsp, NULL, 0);
	ck_assert_int_eq(rsp.u.response.error, EINVAL);
	replica_rpc(cfd, 7, "status", &rsp, out, sizeof(out));
	ck_assert_ptr_nonnull(strstr(out, "state=none\n"));

	replica_rpc(cfd, 7, "get-error", &rsp, out, sizeof(out));
	ck_assert_int_eq(rsp.u.response.error, 0);
	ck_assert_str_eq(rsp.u.response.message, "none");

	{
		char *json = stats_of(cfd, 7);

		ck_assert_msg(json_valid(json), "invalid JSON: %s", json);
		ck_assert_ptr_nonnull(strstr(json, "\"replica\": {\"mode\": \"primary\", \"state\": \"none\""));
		free(json);
	}

	ck_assert_int_eq(ctl_server_remove_minor(srv, 7), 0);
	td_disk_close(d2);
	unlink(p2);
}
END_TEST

/* ------------------------------------------------------------ the socket */

START_TEST(test_socket_path)
{
	char dir[] = "/tmp/tdr-test-ctl-XXXXXX", path[128], sub[128];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ctl_server *s1, *s2;
	struct tdr_ctl_msg rsp;
	struct stat st;
	int fd;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/sub/ctl.sock", dir);
	s1 = ctl_server_new(loop, path);
	ck_assert_ptr_nonnull(s1);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_uint_eq(st.st_mode & 0777, 0600);

	/* In use: refused with one line. */
	tdr_clear_error();
	s2 = ctl_server_new(loop, path);
	ck_assert_ptr_null(s2);
	ck_assert_int_eq(errno, EADDRINUSE);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "in use by a running daemon"));

	/* A client over the real socket. */
	fd = tdr_ctl_connect(path);
	ck_assert_int_ge(fd, 0);
	pump(2);
	rpc(fd, TAPDISK_MESSAGE_PID, 0, &rsp);
	ck_assert_int_eq(rsp.u.tapdisk_pid, getpid());
	close(fd);
	ctl_server_free(s1);
	ck_assert_int_ne(stat(path, &st), 0);

	/* A stale socket (nobody listening) is replaced. */
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	strcpy(sa.sun_path, path);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(fd);
	s1 = ctl_server_new(loop, path);
	ck_assert_ptr_nonnull(s1);
	ctl_server_free(s1);

	/* Another kind of file is left alone. */
	fd = open(path, O_CREAT | O_WRONLY, 0600);
	close(fd);
	ck_assert_ptr_null(ctl_server_new(loop, path));
	ck_assert_int_eq(errno, EEXIST);
	unlink(path);

	/* A directory: the socket is ctl<pid> in it. */
	snprintf(sub, sizeof(sub), "%s/sub", dir);
	s1 = ctl_server_new(loop, sub);
	ck_assert_ptr_nonnull(s1);
	snprintf(path, sizeof(path), "%s/sub/ctl%ld", dir, (long)getpid());
	ck_assert_str_eq(ctl_server_path(s1), path);
	ctl_server_free(s1);
	rmdir(sub);
	rmdir(dir);
}
END_TEST

START_TEST(test_shutdown_releases)
{
	struct tdr_ctl_msg rsp;
	struct td_request req;
	char *buf = tdr_io_alloc(4096);
	int done = 0;

	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 0, &rsp);
	ck_assert_uint_eq(rsp.type, TAPDISK_MESSAGE_PAUSE_RSP);
	td_request_init(&req, TD_OP_READ, 0, 8, buf, io_done, &done);
	td_disk_submit(disk, &req);
	pump(5);
	ck_assert_int_eq(done, 0);
	ctl_server_shutdown(srv);
	for (int i = 0; i < 1000 && !done; i++)
		tdr_loop_run_once(loop, 10);
	ck_assert_int_eq(done, 1);
	rpc(cfd, TAPDISK_MESSAGE_PAUSE, 0, &rsp);
	expect_error(&rsp, ESHUTDOWN, "shutting down");
	free(buf);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("ctl");
	TCase *tc = tcase_create("core");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_layout);
	tcase_add_test(tc, test_helpers);
	tcase_add_test(tc, test_pid);
	tcase_add_test(tc, test_list);
	tcase_add_test(tc, test_stats);
	tcase_add_test(tc, test_truncated);
	tcase_add_test(tc, test_vanishing_client);
	tcase_add_test(tc, test_byte_by_byte);
	tcase_add_test(tc, test_unknown_and_responses);
	tcase_add_test(tc, test_unterminated);
	tcase_add_test(tc, test_log_trailer);
	tcase_add_test(tc, test_pause_holds);
	tcase_add_test(tc, test_pause_waits_for_inflight);
	tcase_add_test(tc, test_open_close);
	tcase_add_test(tc, test_replica_no_filter);
	tcase_add_test(tc, test_replica_requests);
	tcase_add_test(tc, test_socket_path);
	tcase_add_test(tc, test_shutdown_releases);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
