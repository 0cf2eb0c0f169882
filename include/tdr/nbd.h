/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The NBD server: serves td_disks as NBD exports (fixed newstyle only) over
 * UNIX and TCP sockets, on the process's event loop.
 *
 * Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
 *
 * What a client gets:
 *   - handshake flags FIXED_NEWSTYLE | NO_ZEROES;
 *   - options GO, INFO, EXPORT_NAME, LIST, ABORT, STRUCTURED_REPLY,
 *     LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation); STARTTLS
 *     when nbd_server_set_tls() turned TLS on (refused with
 *     NBD_REP_ERR_POLICY otherwise); anything else gets NBD_REP_ERR_UNSUP;
 *   - INFO_EXPORT, INFO_BLOCK_SIZE (always sent: min 512, preferred 4096,
 *     max 32 MiB), INFO_NAME and INFO_DESCRIPTION when asked;
 *   - READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and DISC, many
 *     in flight per connection, replies out of order.
 *
 * Every offset and length must be a multiple of 512 bytes (the advertised
 * minimum block size): the disks below work in 512-byte sectors, and the
 * server does no read-modify-write.  Unaligned requests fail with EINVAL.
 * The empty export name "" selects the first export when no export is named
 * "" (proto.md reserves it for the "default" export).
 */
#ifndef TDR_NBD_H
#define TDR_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tdr/image.h"
#include "tdr/loop.h"

/* ------------------------------------------------------------------ */
/* Wire constants (proto.md "Values") */

#define NBD_MAGIC               0x4e42444d41474943ULL	/* "NBDMAGIC" */
#define NBD_IHAVEOPT            0x49484156454F5054ULL	/* "IHAVEOPT" */
#define NBD_OPT_REPLY_MAGIC     0x0003e889045565a9ULL
#define NBD_REQUEST_MAGIC       0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC  0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* Handshake flags (server, 16 bits) */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES      (1u << 1)
/* Client flags (32 bits) */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Transmission flags (16 bits) */
#define NBD_FLAG_HAS_FLAGS         (1u << 0)
#define NBD_FLAG_READ_ONLY         (1u << 1)
#define NBD_FLAG_SEND_FLUSH        (1u << 2)
#define NBD_FLAG_SEND_FUA          (1u << 3)
#define NBD_FLAG_ROTATIONAL        (1u << 4)
#define NBD_FLAG_SEND_TRIM         (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF           (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN    (1u << 8)
#define NBD_FLAG_SEND_RESIZE       (1u << 9)
#define NBD_FLAG_SEND_CACHE        (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO    (1u << 11)

/* Options */
#define NBD_OPT_EXPORT_NAME       1u
#define NBD_OPT_ABORT             2u
#define NBD_OPT_LIST              3u
#define NBD_OPT_PEEK_EXPORT       4u
#define NBD_OPT_STARTTLS          5u
#define NBD_OPT_INFO              6u
#define NBD_OPT_GO                7u
#define NBD_OPT_STRUCTURED_REPLY  8u
#define NBD_OPT_LIST_META_CONTEXT 9u
#define NBD_OPT_SET_META_CONTEXT  10u

/* Option replies */
#define NBD_REP_ACK          1u
#define NBD_REP_SERVER       2u
#define NBD_REP_INFO         3u
#define NBD_REP_META_CONTEXT 4u
#define NBD_REP_FLAG_ERROR   (1u << 31)
#define NBD_REP_ERR_UNSUP           (NBD_REP_FLAG_ERROR + 1)
#define NBD_REP_ERR_POLICY          (NBD_REP_FLAG_ERROR + 2)
#define NBD_REP_ERR_INVALID         (NBD_REP_FLAG_ERROR + 3)
#define NBD_REP_ERR_PLATFORM        (NBD_REP_FLAG_ERROR + 4)
#define NBD_REP_ERR_TLS_REQD        (NBD_REP_FLAG_ERROR + 5)
#define NBD_REP_ERR_UNKNOWN         (NBD_REP_FLAG_ERROR + 6)
#define NBD_REP_ERR_SHUTDOWN        (NBD_REP_FLAG_ERROR + 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR + 8)
#define NBD_REP_ERR_TOO_BIG         (NBD_REP_FLAG_ERROR + 9)

/* NBD_REP_INFO types */
#define NBD_INFO_EXPORT      0u
#define NBD_INFO_NAME        1u
#define NBD_INFO_DESCRIPTION 2u
#define NBD_INFO_BLOCK_SIZE  3u

/* Commands */
#define NBD_CMD_READ         0u
#define NBD_CMD_WRITE        1u
#define NBD_CMD_DISC         2u
#define NBD_CMD_FLUSH        3u
#define NBD_CMD_TRIM         4u
#define NBD_CMD_CACHE        5u
#define NBD_CMD_WRITE_ZEROES 6u
#define NBD_CMD_BLOCK_STATUS 7u

/* Command flags */
#define NBD_CMD_FLAG_FUA       (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE   (1u << 1)
#define NBD_CMD_FLAG_DF        (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE   (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* Structured replies */
#define NBD_REPLY_FLAG_DONE            (1u << 0)
#define NBD_REPLY_TYPE_NONE            0u
#define NBD_REPLY_TYPE_OFFSET_DATA     1u
#define NBD_REPLY_TYPE_OFFSET_HOLE     2u
#define NBD_REPLY_TYPE_BLOCK_STATUS    5u
#define NBD_REPLY_TYPE_ERROR           ((1u << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET    ((1u << 15) + 2)

/* base:allocation status flags (same values as TD_BS_*) */
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)

/* Error values */
#define NBD_EPERM     1u
#define NBD_EIO       5u
#define NBD_ENOMEM    12u
#define NBD_EINVAL    22u
#define NBD_ENOSPC    28u
#define NBD_EOVERFLOW 75u
#define NBD_ENOTSUP   95u
#define NBD_ESHUTDOWN 108u

/* Message sizes */
#define NBD_GREETING_SIZE        18u	/* NBDMAGIC, IHAVEOPT, handshake flags */
#define NBD_OPT_HDR_SIZE         16u
#define NBD_OPT_REPLY_HDR_SIZE   20u
#define NBD_REQUEST_SIZE         28u
#define NBD_SIMPLE_REPLY_SIZE    16u
#define NBD_STRUCTURED_HDR_SIZE  20u
#define NBD_EXPORT_NAME_ZEROES   124u

/* What this server advertises and enforces. */
#define NBD_MIN_BLOCK_SIZE       512u
#define NBD_PREF_BLOCK_SIZE      4096u
#define NBD_MAX_BLOCK_SIZE       (32u << 20)	/* READ/WRITE payload limit */
#define NBD_MAX_STRING           4096u		/* proto.md string limit */
#define NBD_MAX_OPTION_LEN       (64u << 10)	/* larger: NBD_REP_ERR_TOO_BIG */
#define NBD_MAX_EXTENTS          64u		/* per BLOCK_STATUS reply */
#define NBD_META_BASE_ALLOCATION "base:allocation"
#define NBD_META_ID_BASE_ALLOCATION 1u
#define NBD_DEFAULT_MAX_INFLIGHT 128u		/* requests per connection */

/* ------------------------------------------------------------------ */
/* Pure encode/decode helpers (nbd-proto.c; no I/O, no allocation) */

static inline void nbd_put16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

static inline void nbd_put32(unsigned char *p, uint32_t v)
{
	nbd_put16(p, (uint16_t)(v >> 16));
	nbd_put16(p + 2, (uint16_t)v);
}

static inline void nbd_put64(unsigned char *p, uint64_t v)
{
	nbd_put32(p, (uint32_t)(v >> 32));
	nbd_put32(p + 4, (uint32_t)v);
}

static inline uint16_t nbd_get16(const unsigned char *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t nbd_get32(const unsigned char *p)
{
	return ((uint32_t)nbd_get16(p) << 16) | nbd_get16(p + 2);
}

static inline uint64_t nbd_get64(const unsigned char *p)
{
	return ((uint64_t)nbd_get32(p) << 32) | nbd_get32(p + 4);
}

struct nbd_opt_hdr {
	uint32_t opt;
	uint32_t len;
};

struct nbd_request {
	uint16_t flags;
	uint16_t type;
	uint64_t handle;
	uint64_t offset;
	uint32_t len;
};

/* The server's first message: NBDMAGIC, IHAVEOPT, handshake flags. */
void nbd_encode_greeting(unsigned char buf[NBD_GREETING_SIZE], uint16_t hs_flags);
/* 0, or -EPROTO when the magic is not IHAVEOPT. */
int nbd_decode_opt_hdr(const unsigned char buf[NBD_OPT_HDR_SIZE], struct nbd_opt_hdr *h);
void nbd_encode_opt_reply_hdr(unsigned char buf[NBD_OPT_REPLY_HDR_SIZE], uint32_t opt,
			      uint32_t type, uint32_t len);
/* 0, or -EPROTO when the magic is not NBD_REQUEST_MAGIC. */
int nbd_decode_request(const unsigned char buf[NBD_REQUEST_SIZE], struct nbd_request *r);
void nbd_encode_request(unsigned char buf[NBD_REQUEST_SIZE], const struct nbd_request *r);
void nbd_encode_simple_reply(unsigned char buf[NBD_SIMPLE_REPLY_SIZE], uint32_t error,
			     uint64_t handle);
void nbd_encode_structured_hdr(unsigned char buf[NBD_STRUCTURED_HDR_SIZE], uint16_t flags,
			       uint16_t type, uint64_t handle, uint32_t len);

/* Maps a negative (or positive) errno to an NBD error value (EIO if unknown). */
uint32_t nbd_errno_to_nbd(int err);
/* Maps an NBD error value from a server to -errno (0 for 0; unknown values: -EINVAL). */
int nbd_nbd_to_errno(uint32_t v);

/*
 * Socket options for an NBD connection of either side, server or client.
 * TCP: Nagle off (proto.md; requests and replies are small and batched by
 * their sender).  UNIX: a send buffer of NBD_UNIX_SNDBUF, for the kernel's
 * default (net.core.wmem_default, 208 KiB) makes a 1 MiB READ reply or
 * WRITE command go out in five sendmsg() calls and as many EPOLLOUT
 * wakeups; the kernel caps it at net.core.wmem_max.  The send buffer is
 * left alone on TCP, where setting it would turn off autotuning.
 * Best effort: a socket that refuses the options still works.
 */
#define NBD_UNIX_SNDBUF (4 << 20)
void nbd_socket_tune(int fd, bool tcp);
const char *nbd_cmd_name(uint16_t type);
const char *nbd_opt_name(uint32_t opt);

/* The transmission flags of an export. */
uint16_t nbd_export_tx_flags(bool readonly, bool structured);

/*
 * Parsed NBD_OPT_INFO / NBD_OPT_GO data.  name points into the option data
 * (not NUL-terminated); infos points at ninfos big-endian 16-bit values.
 */
struct nbd_info_req {
	const char *name;
	uint32_t namelen;
	uint16_t ninfos;
	const unsigned char *infos;
};
/* 0, or -EINVAL when the data is not exactly name + count + requests. */
int nbd_parse_info_req(const unsigned char *data, uint32_t len, struct nbd_info_req *out);

/*
 * Parses NBD_OPT_LIST/SET_META_CONTEXT data: export name, then queries.
 * Calls query(q, qlen, arg) for each query; stops at its first non-zero
 * return and returns that.  -EINVAL when a length runs past the data, a
 * string is longer than NBD_MAX_STRING, or bytes are left over.
 * The export name is returned in *name and *namelen; *nqueries gets the count.
 */
int nbd_parse_meta_req(const unsigned char *data, uint32_t len, const char **name,
		       uint32_t *namelen, uint32_t *nqueries,
		       int (*query)(const char *q, uint32_t qlen, void *arg), void *arg);

/*
 * Checks a transmission request against what the export allows.  Returns 0,
 * or the NBD error value to reply with (NBD_EINVAL, NBD_EPERM, NBD_ENOSPC,
 * NBD_EOVERFLOW); *why gets a short human-readable reason.
 */
struct nbd_req_limits {
	uint64_t size;		/* export size in bytes */
	bool readonly;
	bool structured;	/* structured replies negotiated */
	bool meta;		/* base:allocation selected */
};
uint32_t nbd_check_request(const struct nbd_request *r, const struct nbd_req_limits *lim,
			   const char **why);

/* ------------------------------------------------------------------ */
/* The server */

struct nbd_server;

/* Returns a server on loop, or NULL (out of memory). */
struct nbd_server *nbd_server_new(struct tdr_loop *loop);

/*
 * Adds disk as an export named name (may be "", at most NBD_MAX_STRING
 * bytes).  description may be NULL.  The disk must outlive the server.
 * Returns 0 or -errno (-EEXIST for a duplicate name) with tdr_set_error().
 */
int nbd_server_add_export(struct nbd_server *srv, const char *name, const char *description,
			  struct td_disk *disk, bool readonly);

/*
 * Listens on a UNIX socket at path, mode 0600.  A live socket at path is
 * "in use" (-EADDRINUSE); a stale one (nobody accepting) is replaced; any
 * other file there is left alone (-EEXIST).  The file is removed again by
 * nbd_server_shutdown()/nbd_server_free().  0 or -errno with tdr_set_error().
 */
int nbd_server_listen_unix(struct nbd_server *srv, const char *path);

/*
 * Listens on TCP: host NULL or "" means loopback; port may be "0" for an
 * ephemeral port (see nbd_server_describe()).  0 or -errno with
 * tdr_set_error().
 */
int nbd_server_listen_tcp(struct nbd_server *srv, const char *host, const char *port);

/*
 * Serves an already connected socket (e.g. one end of a socketpair).  The
 * server owns fd from now on, also on failure.  0 or -errno.
 */
int nbd_server_add_connection(struct nbd_server *srv, int fd);

/*
 * TLS (NBD_OPT_STARTTLS, GnuTLS).  off: STARTTLS refused; on: offered,
 * plain connections still served; require: every option but STARTTLS
 * and ABORT is refused with NBD_REP_ERR_TLS_REQD until TLS is on.  One
 * of psk_file (psktool's "username:hexkey" lines) and certificates (a
 * directory with server-cert.pem, server-key.pem and, to check clients,
 * ca-cert.pem) is needed; verify_peer asks every client for a
 * certificate signed by that CA.
 */
enum nbd_tls_mode {
	NBD_TLS_OFF = 0,
	NBD_TLS_ON,
	NBD_TLS_REQUIRE,
};

/* "off", "on" or "require" into *out; -EINVAL for anything else. */
int nbd_tls_parse_mode(const char *s, enum nbd_tls_mode *out);

/*
 * A pre-shared key file this process can read: 0, or -errno with
 * tdr_set_error() naming the file and how to make one.  The export and
 * the replica's link both check it when their options are read, so a
 * wrong path shows at start, not at the first connection.
 */
int nbd_tls_check_psk_file(const char *file);

struct nbd_tls_config {
	enum nbd_tls_mode mode;
	const char *psk_file;
	const char *certificates;
	bool verify_peer;
};

/*
 * Loads the keys now (a missing or bad file fails here, not at the first
 * client) and applies to connections accepted from now on.  0 or -errno
 * with tdr_set_error().
 */
int nbd_server_set_tls(struct nbd_server *srv, const struct nbd_tls_config *cfg);

/* Caps the requests in flight per connection (default 128); for tests. */
void nbd_server_set_max_inflight(struct nbd_server *srv, unsigned max);
/*
 * How long a connection may take from its accept to transmission (client
 * flags, options, a TLS handshake): past it the connection is closed, so
 * that clients that never finish cannot hold every slot.  Process-wide;
 * 0: no limit.  Default NBD_HANDSHAKE_TIMEOUT_DEFAULT seconds.
 */
#define NBD_HANDSHAKE_TIMEOUT_DEFAULT 30
void nbd_set_handshake_timeout(unsigned seconds);

/* Writes "unix:PATH tcp:HOST:PORT ..." (the bound addresses) into buf. */
void nbd_server_describe(struct nbd_server *srv, char *buf, size_t len);

/* Number of open connections. */
unsigned nbd_server_connections(const struct nbd_server *srv);

/*
 * Stops accepting, stops reading requests, lets the requests in flight
 * finish and their replies go out (for at most a few seconds), closes every
 * connection, then calls done(arg) from the loop.  The exports' disks are
 * not flushed or closed: that is the caller's job, in done.
 */
void nbd_server_shutdown(struct nbd_server *srv, void (*done)(void *arg), void *arg);

/*
 * Frees the server.  Connections still open are closed at once; if their
 * requests are still in flight, the memory they use stays until they
 * complete, so call it after shutdown's done for a clean exit.
 */
void nbd_server_free(struct nbd_server *srv);

#endif
