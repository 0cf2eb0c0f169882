/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the pure NBD encode/decode and validation helpers. */
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tdr/nbd.h"
#include "check-run.h"

START_TEST(test_endian)
{
	unsigned char b[8];

	nbd_put16(b, 0x1234);
	ck_assert_int_eq(b[0], 0x12);
	ck_assert_int_eq(b[1], 0x34);
	ck_assert_uint_eq(nbd_get16(b), 0x1234);
	nbd_put32(b, 0xdeadbeef);
	ck_assert_int_eq(b[0], 0xde);
	ck_assert_int_eq(b[3], 0xef);
	ck_assert_uint_eq(nbd_get32(b), 0xdeadbeef);
	nbd_put64(b, 0x0102030405060708ull);
	ck_assert_int_eq(b[0], 1);
	ck_assert_int_eq(b[7], 8);
	ck_assert_uint_eq(nbd_get64(b), 0x0102030405060708ull);
}
END_TEST

START_TEST(test_greeting)
{
	static const unsigned char want[NBD_GREETING_SIZE] = {
		'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',
		'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0x00, 0x03,
	};
	unsigned char g[NBD_GREETING_SIZE];

	nbd_encode_greeting(g, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	ck_assert_mem_eq(g, want, sizeof(want));
}
END_TEST

START_TEST(test_opt_hdr)
{
	unsigned char b[NBD_OPT_HDR_SIZE];
	struct nbd_opt_hdr h;

	memcpy(b, "IHAVEOPT", 8);
	nbd_put32(b + 8, NBD_OPT_GO);
	nbd_put32(b + 12, 0xffffffffu);
	ck_assert_int_eq(nbd_decode_opt_hdr(b, &h), 0);
	ck_assert_uint_eq(h.opt, NBD_OPT_GO);
	ck_assert_uint_eq(h.len, 0xffffffffu);
	b[0] = 'X';
	ck_assert_int_eq(nbd_decode_opt_hdr(b, &h), -EPROTO);
}
END_TEST

START_TEST(test_opt_reply_hdr)
{
	static const unsigned char want[NBD_OPT_REPLY_HDR_SIZE] = {
		0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
		0, 0, 0, 7,
		0x80, 0, 0, 1,
		0, 0, 0, 5,
	};
	unsigned char b[NBD_OPT_REPLY_HDR_SIZE];

	nbd_encode_opt_reply_hdr(b, NBD_OPT_GO, NBD_REP_ERR_UNSUP, 5);
	ck_assert_mem_eq(b, want, sizeof(want));
}
END_TEST

START_TEST(test_request_roundtrip)
{
	struct nbd_request r = {
		.flags = NBD_CMD_FLAG_FUA, .type = NBD_CMD_WRITE,
		.handle = 0x1122334455667788ull, .offset = 1ull << 40, .len = 4096,
	}, d;
	unsigned char b[NBD_REQUEST_SIZE];

	nbd_encode_request(b, &r);
	ck_assert_uint_eq(nbd_get32(b), 0x25609513u);
	ck_assert_int_eq(nbd_decode_request(b, &d), 0);
	ck_assert_uint_eq(d.flags, r.flags);
	ck_assert_uint_eq(d.type, r.type);
	ck_assert_uint_eq(d.handle, r.handle);
	ck_assert_uint_eq(d.offset, r.offset);
	ck_assert_uint_eq(d.len, r.len);
	b[3] ^= 1;
	ck_assert_int_eq(nbd_decode_request(b, &d), -EPROTO);
}
END_TEST

START_TEST(test_replies)
{
	static const unsigned char simple[NBD_SIMPLE_REPLY_SIZE] = {
		0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8,
	};
	static const unsigned char structured[NBD_STRUCTURED_HDR_SIZE] = {
		0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 6,
	};
	unsigned char b[NBD_STRUCTURED_HDR_SIZE];

	nbd_encode_simple_reply(b, NBD_EINVAL, 0x0102030405060708ull);
	ck_assert_mem_eq(b, simple, sizeof(simple));
	nbd_encode_structured_hdr(b, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
				  0x0102030405060708ull, 6);
	ck_assert_mem_eq(b, structured, sizeof(structured));
}
END_TEST

START_TEST(test_errno_map)
{
	ck_assert_uint_eq(nbd_errno_to_nbd(0), 0);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EPERM), 1);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EROFS), 1);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EIO), 5);
	ck_assert_uint_eq(nbd_errno_to_nbd(-ENOMEM), 12);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EINVAL), 22);
	ck_assert_uint_eq(nbd_errno_to_nbd(-ENOSPC), 28);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EDQUOT), 28);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EFBIG), 28);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EOVERFLOW), 75);
	ck_assert_uint_eq(nbd_errno_to_nbd(-ENOTSUP), 95);
	ck_assert_uint_eq(nbd_errno_to_nbd(-EOPNOTSUPP), 95);
	ck_assert_uint_eq(nbd_errno_to_nbd(-ESHUTDOWN), 108);
	ck_assert_uint_eq(nbd_errno_to_nbd(-ENOENT), 5);
	ck_assert_uint_eq(nbd_errno_to_nbd(EINVAL), 22);

	/* And back, for what a server answers; every listed value survives the round trip. */
	static const int listed[] = { EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
				      ESHUTDOWN };
	for (size_t i = 0; i < sizeof(listed) / sizeof(listed[0]); i++)
		ck_assert_int_eq(nbd_nbd_to_errno(nbd_errno_to_nbd(-listed[i])), -listed[i]);
	ck_assert_int_eq(nbd_nbd_to_errno(0), 0);
	ck_assert_int_eq(nbd_nbd_to_errno(2), -EINVAL);		/* ENOENT: not in the list */
	ck_assert_int_eq(nbd_nbd_to_errno(0xffffffffu), -EINVAL);
}
END_TEST

START_TEST(test_tx_flags)
{
	ck_assert_uint_eq(nbd_export_tx_flags(false, false),
			  NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
			  NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
			  NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_CAN_MULTI_CONN);
	ck_assert_uint_eq(nbd_export_tx_flags(false, true) & NBD_FLAG_SEND_DF, NBD_FLAG_SEND_DF);
	ck_assert_uint_eq(nbd_export_tx_flags(true, false),
			  NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH |
			  NBD_FLAG_CAN_MULTI_CONN);
}
END_TEST

START_TEST(test_info_req)
{
	unsigned char d[32];
	struct nbd_info_req ir;

	nbd_put32(d, 3);
	memcpy(d + 4, "abc", 3);
	nbd_put16(d + 7, 2);
	nbd_put16(d + 9, NBD_INFO_BLOCK_SIZE);
	nbd_put16(d + 11, NBD_INFO_NAME);
	ck_assert_int_eq(nbd_parse_info_req(d, 13, &ir), 0);
	ck_assert_uint_eq(ir.namelen, 3);
	ck_assert_mem_eq(ir.name, "abc", 3);
	ck_assert_uint_eq(ir.ninfos, 2);
	ck_assert_uint_eq(nbd_get16(ir.infos + 2), NBD_INFO_NAME);
	/* trailing byte, short, name too long for the data */
	ck_assert_int_eq(nbd_parse_info_req(d, 14, &ir), -EINVAL);
	ck_assert_int_eq(nbd_parse_info_req(d, 12, &ir), -EINVAL);
	ck_assert_int_eq(nbd_parse_info_req(d, 5, &ir), -EINVAL);
	nbd_put32(d, 0xfffffff0u);
	ck_assert_int_eq(nbd_parse_info_req(d, 13, &ir), -EINVAL);
	/* empty name, no requests */
	nbd_put32(d, 0);
	nbd_put16(d + 4, 0);
	ck_assert_int_eq(nbd_parse_info_req(d, 6, &ir), 0);
	ck_assert_uint_eq(ir.namelen, 0);
}
END_TEST

static int count_q(const char *q, uint32_t len, void *arg)
{
	int *n = arg;

	(*n)++;
	return (len == 3 && !memcmp(q, "bad", 3)) ? -EBADMSG : 0;
}

START_TEST(test_meta_req)
{
	unsigned char d[64];
	const char *name;
	uint32_t namelen, nq;
	int n = 0;

	nbd_put32(d, 1);
	d[4] = 'x';
	nbd_put32(d + 5, 2);
	nbd_put32(d + 9, 5);
	memcpy(d + 13, "base:", 5);
	nbd_put32(d + 18, 0);
	ck_assert_int_eq(nbd_parse_meta_req(d, 22, &name, &namelen, &nq, count_q, &n), 0);
	ck_assert_int_eq(n, 2);
	ck_assert_uint_eq(nq, 2);
	ck_assert_uint_eq(namelen, 1);
	ck_assert_int_eq(name[0], 'x');
	/* trailing data, truncated query, absurd query count */
	ck_assert_int_eq(nbd_parse_meta_req(d, 23, &name, &namelen, &nq, NULL, NULL), -EINVAL);
	ck_assert_int_eq(nbd_parse_meta_req(d, 20, &name, &namelen, &nq, NULL, NULL), -EINVAL);
	nbd_put32(d + 5, 0x40000000u);
	ck_assert_int_eq(nbd_parse_meta_req(d, 22, &name, &namelen, &nq, NULL, NULL), -EINVAL);
	/* the callback's error is passed on */
	nbd_put32(d + 5, 1);
	nbd_put32(d + 9, 3);
	memcpy(d + 13, "bad", 3);
	n = 0;
	ck_assert_int_eq(nbd_parse_meta_req(d, 16, &name, &namelen, &nq, count_q, &n), -EBADMSG);
	/* too short for name length + count */
	ck_assert_int_eq(nbd_parse_meta_req(d, 7, &name, &namelen, &nq, NULL, NULL), -EINVAL);
}
END_TEST

static uint32_t check(uint16_t type, uint16_t flags, uint64_t off, uint32_t len, bool ro,
		      bool sr, bool meta)
{
	struct nbd_request r = { .type = type, .flags = flags, .offset = off, .len = len };
	struct nbd_req_limits lim = { .size = 1 << 20, .readonly = ro, .structured = sr, .meta = meta };
	const char *why = NULL;
	uint32_t e = nbd_check_request(&r, &lim, &why);

	if (e)
		ck_assert_ptr_nonnull(why);
	return e;
}

START_TEST(test_check_request)
{
	const uint64_t size = 1 << 20;

	ck_assert_uint_eq(check(NBD_CMD_READ, 0, 0, 4096, false, false, false), 0);
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, size - 512, 512, false, false, false), 0);
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, 100, 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, 0, 100, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, size, 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, ~0ull - 511, 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_WRITE, 0, size, 512, false, false, false), NBD_ENOSPC);
	ck_assert_uint_eq(check(NBD_CMD_WRITE_ZEROES, 0, 0, size + 512, false, false, false),
			  NBD_ENOSPC);
	ck_assert_uint_eq(check(NBD_CMD_TRIM, 0, 0, size + 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_WRITE, 0, 0, 512, true, false, false), NBD_EPERM);
	ck_assert_uint_eq(check(NBD_CMD_TRIM, 0, 0, 512, true, false, false), NBD_EPERM);
	ck_assert_uint_eq(check(NBD_CMD_WRITE_ZEROES, 0, 0, 512, true, false, false), NBD_EPERM);
	ck_assert_uint_eq(check(NBD_CMD_FLUSH, 0, 0, 0, true, false, false), 0);
	ck_assert_uint_eq(check(NBD_CMD_FLUSH, 0, 0, 512, false, false, false), NBD_EINVAL);
	/* oversized: EINVAL, or EOVERFLOW for an unfragmentable read */
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, 0, NBD_MAX_BLOCK_SIZE + 512, false, false, false),
			  NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, NBD_MAX_BLOCK_SIZE + 512, false,
				true, false), NBD_EOVERFLOW);
	ck_assert_uint_eq(check(NBD_CMD_WRITE, 0, 0, NBD_MAX_BLOCK_SIZE + 512, false, false, false),
			  NBD_EINVAL);
	/* flags */
	ck_assert_uint_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, false, false, false),
			  NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, false, true, false), 0);
	ck_assert_uint_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512, false, false, false),
			  NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO |
				NBD_CMD_FLAG_FUA, 0, 512, false, false, false), 0);
	ck_assert_uint_eq(check(NBD_CMD_WRITE, 1u << 15, 0, 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 512, false, false, false), 0);
	/* unknown commands, CACHE included (not advertised) */
	ck_assert_uint_eq(check(42, 0, 0, 512, false, false, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_CACHE, 0, 0, 512, false, false, false), NBD_EINVAL);
	/* block status */
	ck_assert_uint_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 512, false, true, false), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 512, false, false, true), NBD_EINVAL);
	ck_assert_uint_eq(check(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 512, false, true,
				true), 0);
	ck_assert_uint_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 0, false, true, true), NBD_EINVAL);
	/* zero-length I/O is accepted */
	ck_assert_uint_eq(check(NBD_CMD_READ, 0, size, 0, false, false, false), 0);
}
END_TEST

/* nbd_socket_tune: a large send buffer on UNIX sockets, Nagle off on TCP. */
START_TEST(test_socket_tune)
{
	int sv[2], fd, before, after, nodelay = 0;
	socklen_t len = sizeof(int);
	long max = 0;
	FILE *f = fopen("/proc/sys/net/core/wmem_max", "r");

	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fscanf(f, "%ld", &max), 1);
	fclose(f);

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	nbd_socket_tune(sv[0], false);
	ck_assert_int_eq(getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &after, &len), 0);
	/* socket(7): the kernel doubles what is asked, capped at wmem_max. */
	ck_assert_int_eq(after, 2 * (int)(max < NBD_UNIX_SNDBUF ? max : NBD_UNIX_SNDBUF));
	close(sv[0]);
	close(sv[1]);

	fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &before, &len), 0);
	nbd_socket_tune(fd, true);
	ck_assert_int_eq(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &len), 0);
	ck_assert_int_eq(nodelay, 1);
	/* Left to the kernel's autotuning. */
	ck_assert_int_eq(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &after, &len), 0);
	ck_assert_int_eq(after, before);
	close(fd);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("nbd-proto");
	TCase *tc = tcase_create("proto");

	tcase_add_test(tc, test_endian);
	tcase_add_test(tc, test_greeting);
	tcase_add_test(tc, test_opt_hdr);
	tcase_add_test(tc, test_opt_reply_hdr);
	tcase_add_test(tc, test_request_roundtrip);
	tcase_add_test(tc, test_replies);
	tcase_add_test(tc, test_errno_map);
	tcase_add_test(tc, test_tx_flags);
	tcase_add_test(tc, test_info_req);
	tcase_add_test(tc, test_meta_req);
	tcase_add_test(tc, test_check_request);
	tcase_add_test(tc, test_socket_tune);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return check_run(suite(), CHECK_RUN_FORK);
}
