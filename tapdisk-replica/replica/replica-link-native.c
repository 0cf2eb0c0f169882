/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The link's own NBD client (client=native, the default).
 *
 * The link only ever writes: WRITE, WRITE_ZEROES and FLUSH, whose replies
 * carry no data.  So the client negotiates no structured replies and reads
 * nothing but 16-byte simple replies, and it can batch where a general
 * client cannot:
 *  - commands queued during a loop turn go out together, headers and
 *    payloads gathered into one sendmsg() (a deferred call sends them once
 *    the turn's events are handled), so the secondary wakes once per batch
 *    instead of once or twice per command;
 *  - replies are read in bulk, as many as one recv() returns;
 *  - the socket is watched for reading always and for writing only while
 *    the kernel refuses bytes, so the watch rarely changes.
 * libnbd (replica-link-libnbd.c) sends each command as it is queued and
 * reads each reply on its own; see docs/benchmarks.md for what that costs.
 *
 * Handshake: fixed newstyle, NBD_OPT_GO for the export with
 * NBD_INFO_BLOCK_SIZE requested; NBD_OPT_EXPORT_NAME if the server does
 * not know NBD_OPT_GO.  No TLS.
 *
 * Commands in flight live in a slot table; a reply's cookie is the slot
 * and the slot's generation, so a reply to a command never made (or one
 * already answered, or not yet sent) is caught and breaks the link.
 *
 * Zero-copy (unless zerocopy=off): a WRITE payload of NAT_ZC_MIN bytes or
 * more is not copied into the socket.  vmsplice() puts references to its
 * pages into a pipe and splice() moves them into the socket, where the
 * secondary's receive copies them out.  The sender's CPU time per byte
 * drops to about half in tests/bench/bench-send, the primary's by a
 * quarter in tests/bench/primary (docs/benchmarks.md).  The
 * header still goes by sendmsg(), and smaller commands are still batched.
 * The price is that the payload's pages are read until the server has
 * received them, not only until send returns; that holds because the
 * link's contract keeps a buffer until its request completes, which for
 * a WRITE is after the server's reply.  When the link is abandoned, the
 * pipe is closed at once, but a payload already in the socket may still
 * be read by a server that wakes later, after the buffer was reused: such
 * a server applies garbage instead of a stale write, to a range that is
 * dirty on the primary anyway (see "Stale writes after a frozen
 * secondary" in docs/benchmarks.md; on a tapdisk-replica secondary the
 * SVM's view is protected by hidden either way).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "replica-link-int.h"
#include "tdr/log.h"
#include "tdr/nbd.h"

#define NAT_IN_SIZE     (64u << 10)	/* receive buffer: 4,096 replies */
#define NAT_BATCH       64u		/* commands per sendmsg() */
/* Longest option reply we accept: it and its 20-byte header fit the buffer. */
#define NAT_MAX_OPT_LEN (NAT_IN_SIZE - 20u)
#define NAT_OLDSTYLE_MAGIC 0x0000420281861253ULL
#define NAT_ZC_MIN      (64u << 10)	/* payloads from this size are spliced */
/*
 * The pipe between vmsplice() and splice().  1 MiB takes a whole 1 MiB
 * WRITE at once; a pipe of the default 64 KiB costs more than the copy
 * (bench-send -p 65536), so we rather copy than splice through one.
 */
#define NAT_ZC_PIPE     (1u << 20)
#define NAT_ZC_PIPE_MIN (256u << 10)

enum nat_phase {
	NAT_CONNECTING,		/* waiting for connect() to finish */
	NAT_GREETING,		/* waiting for NBDMAGIC, IHAVEOPT, flags */
	NAT_OPT_REPLIES,	/* NBD_OPT_GO sent; reading its replies */
	NAT_EXPORT_NAME,	/* NBD_OPT_EXPORT_NAME sent; reading size and flags */
	NAT_READY,
};

struct nat_slot {
	struct link_piece *p;	/* NULL: free */
	uint32_t gen;
	uint32_t next;		/* free list, or send queue */
	bool sent;		/* header and payload fully handed to the kernel */
};

#define NAT_NONE UINT32_MAX

struct nat {
	struct replica_link *l;
	int fd;
	enum nat_phase phase;
	bool no_zeroes;		/* the server omits the 124 zero bytes */

	/* What we still have to send during the handshake. */
	unsigned char *hs_out;
	size_t hs_len, hs_off;

	unsigned char *in;
	size_t in_len;

	struct nat_slot *slots;
	uint32_t nslots, free_head;
	uint32_t sq_head, sq_tail;	/* commands not fully sent, oldest first */
	uint64_t sq_off;		/* bytes of the head command already in the socket */
	bool blocked;			/* the kernel took less than offered: wait for EPOLLOUT */

	/* Zero-copy: the pipe (-1: off) and how much of the head's payload it holds. */
	int zc_pipe[2];
	size_t zc_in_pipe;
	struct tdr_defer flush;

	struct link_export_info info;
	bool have_export;
};

/* ------------------------------------------------------------ slots */

static uint32_t nat_slot_get(struct nat *n)
{
	uint32_t i;

	if (n->free_head == NAT_NONE) {
		uint32_t old = n->nslots, want = old ? old * 2 : 64;
		struct nat_slot *s;

		if (want <= old || !(s = realloc(n->slots, (size_t)want * sizeof(*s))))
			return NAT_NONE;
		n->slots = s;
		for (i = old; i < want; i++)
			s[i] = (struct nat_slot){ .next = i + 1 < want ? i + 1 : NAT_NONE };
		n->nslots = want;
		n->free_head = old;
	}
	i = n->free_head;
	n->free_head = n->slots[i].next;
	n->slots[i].next = NAT_NONE;
	n->slots[i].sent = false;
	return i;
}

static void nat_slot_put(struct nat *n, uint32_t i)
{
	n->slots[i].p = NULL;
	n->slots[i].gen++;
	n->slots[i].next = n->free_head;
	n->free_head = i;
}

static uint64_t nat_cookie(const struct nat *n, uint32_t i)
{
	return (uint64_t)n->slots[i].gen << 32 | i;
}

/* ------------------------------------------------------------ output */

/* Appends len bytes to what the handshake still has to send. */
static bool nat_hs_append(struct nat *n, const void *buf, size_t len)
{
	unsigned char *b = realloc(n->hs_out, n->hs_len + len);

	if (!b) {
		link_fail(n->l, -ENOMEM, "out of memory during the NBD handshake");
		return false;
	}
	memcpy(b + n->hs_len, buf, len);
	n->hs_out = b;
	n->hs_len += len;
	return true;
}

static bool nat_send_option(struct nat *n, uint32_t opt, const void *data, uint32_t len)
{
	unsigned char h[NBD_OPT_HDR_SIZE];

	nbd_put64(h, NBD_IHAVEOPT);
	nbd_put32(h + 8, opt);
	nbd_put32(h + 12, len);
	return nat_hs_append(n, h, sizeof(h)) && nat_hs_append(n, data, len);
}

/* Sends what the handshake has queued; false after link_fail(). */
static bool nat_hs_send(struct nat *n)
{
	while (n->hs_off < n->hs_len) {
		ssize_t r = send(n->fd, n->hs_out + n->hs_off, n->hs_len - n->hs_off, MSG_NOSIGNAL);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return true;
			link_fail(n->l, -errno, "NBD handshake failed: cannot send: %s", strerror(errno));
			return false;
		}
		n->hs_off += (size_t)r;
	}
	free(n->hs_out);
	n->hs_out = NULL;
	n->hs_len = n->hs_off = 0;
	return true;
}

static void nat_encode(const struct nat *n, uint32_t i, unsigned char hdr[NBD_REQUEST_SIZE])
{
	const struct link_piece *p = n->slots[i].p;
	struct nbd_request rq = { .handle = nat_cookie(n, i), .offset = p->off };

	switch (p->op) {
	case LOP_WRITE:
		rq.type = NBD_CMD_WRITE;
		rq.len = (uint32_t)p->len;
		break;
	case LOP_ZERO:
		rq.type = NBD_CMD_WRITE_ZEROES;
		rq.len = (uint32_t)p->len;
		rq.flags = p->no_hole ? NBD_CMD_FLAG_NO_HOLE : 0;
		break;
	default:
		rq.type = NBD_CMD_FLUSH;
		rq.offset = 0;
		break;
	}
	nbd_encode_request(hdr, &rq);
}

static uint64_t nat_wire_len(const struct link_piece *p)
{
	return NBD_REQUEST_SIZE + (p->op == LOP_WRITE ? p->len : 0);
}

/* Whether p's payload goes by the pipe. */
static bool nat_zc(const struct nat *n, const struct link_piece *p)
{
	return n->zc_pipe[1] >= 0 && p->op == LOP_WRITE && p->len >= NAT_ZC_MIN;
}

static void nat_zc_off(struct nat *n)
{
	for (int k = 0; k < 2; k++) {
		if (n->zc_pipe[k] >= 0)
			close(n->zc_pipe[k]);
		n->zc_pipe[k] = -1;
	}
	n->zc_in_pipe = 0;
}

/* A pipe big enough to be worth it, or zero-copy stays off. */
static void nat_zc_on(struct nat *n)
{
	if (pipe2(n->zc_pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
		n->zc_pipe[0] = n->zc_pipe[1] = -1;
		TDR_DEBUG("replica link: no pipe for zero-copy sends (%s); copying", strerror(errno));
		return;
	}
	if (fcntl(n->zc_pipe[1], F_SETPIPE_SZ, NAT_ZC_PIPE) < 0 &&
	    fcntl(n->zc_pipe[1], F_SETPIPE_SZ, NAT_ZC_PIPE_MIN) < 0) {
		TDR_DEBUG("replica link: cannot size the zero-copy pipe (%s, see fs.pipe-max-size); copying",
			  strerror(errno));
		nat_zc_off(n);
	}
}

/* The head command is in the socket: the reply may come. */
static void nat_retire_head(struct nat *n)
{
	uint32_t i = n->sq_head;

	n->slots[i].sent = true;
	n->sq_head = n->slots[i].next;
	n->slots[i].next = NAT_NONE;
	if (n->sq_head == NAT_NONE)
		n->sq_tail = NAT_NONE;
	n->sq_off = 0;
}

/* What the nat_send_*() steps return. */
enum nat_step { NAT_STEP_MORE, NAT_STEP_BLOCKED, NAT_STEP_FAILED };

static enum nat_step nat_send_error(struct nat *n, const char *what)
{
	if (errno == EAGAIN || errno == EWOULDBLOCK) {
		n->blocked = true;
		return NAT_STEP_BLOCKED;
	}
	link_fail(n->l, -errno, "connection lost: cannot %s: %s", what, strerror(errno));
	return NAT_STEP_FAILED;
}

/*
 * Copies queued commands into the socket, NAT_BATCH per sendmsg().  The
 * head command may be partly sent (sq_off bytes): its header is encoded
 * again, only the rest goes out.  A batch ends after the header of a
 * command whose payload goes by the pipe.
 */
static enum nat_step nat_send_batch(struct nat *n)
{
	unsigned char hdrs[NAT_BATCH][NBD_REQUEST_SIZE];
	struct iovec iov[2 * NAT_BATCH];
	struct msghdr msg = { .msg_iov = iov };
	size_t niov = 0, k = 0;
	uint64_t skip = n->sq_off, done;
	ssize_t r;

	for (uint32_t i = n->sq_head; i != NAT_NONE && k < NAT_BATCH; i = n->slots[i].next, k++) {
		const struct link_piece *p = n->slots[i].p;

		nat_encode(n, i, hdrs[k]);
		if (skip < NBD_REQUEST_SIZE) {
			iov[niov++] = (struct iovec){ hdrs[k] + skip, NBD_REQUEST_SIZE - skip };
			skip = 0;
		} else {
			skip -= NBD_REQUEST_SIZE;
		}
		if (nat_zc(n, p))
			break;
		if (p->op == LOP_WRITE)
			iov[niov++] = (struct iovec){ (char *)p->buf + skip, p->len - skip };
		skip = 0;
	}
	msg.msg_iovlen = niov;
	do {
		r = sendmsg(n->fd, &msg, MSG_NOSIGNAL);
	} while (r < 0 && errno == EINTR);
	if (r < 0)
		return nat_send_error(n, "send");

	/* Retire what went out completely. */
	done = (uint64_t)r + n->sq_off;
	while (n->sq_head != NAT_NONE) {
		const struct link_piece *p = n->slots[n->sq_head].p;
		uint64_t w = nat_wire_len(p);

		if (nat_zc(n, p) && done >= NBD_REQUEST_SIZE) {
			/* Its header is out, the batch ended there: the payload is next. */
			n->sq_off = NBD_REQUEST_SIZE;
			return NAT_STEP_MORE;
		}
		if (done < w)
			break;
		done -= w;
		nat_retire_head(n);
	}
	n->sq_off = done;
	if (done) {
		/* A short send: the socket buffer is full. */
		n->blocked = true;
		return NAT_STEP_BLOCKED;
	}
	return NAT_STEP_MORE;
}

/* References to the next part of the head's payload into the (empty) pipe. */
static enum nat_step nat_send_fill(struct nat *n)
{
	const struct link_piece *p = n->slots[n->sq_head].p;
	uint64_t pos = n->sq_off - NBD_REQUEST_SIZE;
	struct iovec iov = { (char *)p->buf + pos, p->len - pos };
	ssize_t r;

	do {
		r = vmsplice(n->zc_pipe[1], &iov, 1, SPLICE_F_NONBLOCK);
	} while (r < 0 && errno == EINTR);
	if (r <= 0) {
		/* The pipe is empty, so this is no EAGAIN: memory vmsplice() refuses. */
		TDR_DEBUG("replica link: vmsplice: %s; copying from now on",
			  r < 0 ? strerror(errno) : "took nothing");
		nat_zc_off(n);
	} else {
		n->zc_in_pipe = (size_t)r;
	}
	return NAT_STEP_MORE;
}

/* Moves what the pipe holds into the socket. */
static enum nat_step nat_send_drain(struct nat *n)
{
	ssize_t r;

	do {
		r = splice(n->zc_pipe[0], NULL, n->fd, NULL, n->zc_in_pipe,
			   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	} while (r < 0 && errno == EINTR);
	if (r < 0)
		return nat_send_error(n, "splice into the socket");
	if (r == 0) {
		link_fail(n->l, -EIO, "connection lost: splice into the socket moved nothing");
		return NAT_STEP_FAILED;
	}
	n->zc_in_pipe -= (size_t)r;
	n->sq_off += (uint64_t)r;
	n->l->stats.spliced_bytes += (uint64_t)r;
	if (n->sq_off == nat_wire_len(n->slots[n->sq_head].p))
		nat_retire_head(n);
	if (n->zc_in_pipe) {
		n->blocked = true;
		return NAT_STEP_BLOCKED;
	}
	return NAT_STEP_MORE;
}

/* Sends the queued commands until the queue is empty or the kernel takes no more. */
static void nat_send_queue(struct nat *n)
{
	enum nat_step s = NAT_STEP_MORE;

	n->blocked = false;
	while (s == NAT_STEP_MORE && n->sq_head != NAT_NONE) {
		if (n->zc_in_pipe)
			s = nat_send_drain(n);
		else if (nat_zc(n, n->slots[n->sq_head].p) && n->sq_off >= NBD_REQUEST_SIZE)
			s = nat_send_fill(n);
		else
			s = nat_send_batch(n);
	}
}

static void nat_flush(void *arg)
{
	struct nat *n = arg;

	if (n->phase == NAT_READY && !n->l->fail_err && !n->blocked)
		nat_send_queue(n);
	if (n->blocked || n->l->fail_err) {
		/* The watch must now include EPOLLOUT (or the link must break). */
		tdr_loop_defer(n->l->loop, &n->l->defer);
	}
}

/* ------------------------------------------------------------ input */

static void nat_ready(struct nat *n)
{
	n->phase = NAT_READY;
	link_handshake_done(n->l, &n->info);
}

/* Copies at most max bytes of a server's message into out, printable characters only. */
static void nat_server_text(char *out, size_t outlen, const unsigned char *p, size_t len)
{
	size_t k = 0;

	for (size_t i = 0; i < len && k + 1 < outlen; i++)
		out[k++] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
	out[k] = '\0';
}

/* The greeting: 18 bytes.  Returns bytes consumed, 0 for more, -1 after link_fail(). */
static ssize_t nat_greeting(struct nat *n, const unsigned char *p, size_t len)
{
	uint16_t flags;
	unsigned char cflags[4], go[sizeof(n->l->export_name) + 8];
	uint32_t namelen = (uint32_t)strlen(n->l->export_name);	/* < sizeof: checked at open */

	if (len < 8)
		return 0;
	if (nbd_get64(p) != NBD_MAGIC) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: the peer is not an NBD server (no NBDMAGIC)");
		return -1;
	}
	if (len < NBD_GREETING_SIZE)
		return 0;
	if (nbd_get64(p + 8) == NAT_OLDSTYLE_MAGIC) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: the server speaks the oldstyle protocol, which has no export names; use a newstyle server");
		return -1;
	}
	if (nbd_get64(p + 8) != NBD_IHAVEOPT) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: bad greeting (no IHAVEOPT)");
		return -1;
	}
	flags = nbd_get16(p + 16);
	if (!(flags & NBD_FLAG_FIXED_NEWSTYLE)) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: the server does not support fixed newstyle negotiation");
		return -1;
	}
	n->no_zeroes = flags & NBD_FLAG_NO_ZEROES;
	nbd_put32(cflags, NBD_FLAG_C_FIXED_NEWSTYLE | (n->no_zeroes ? NBD_FLAG_C_NO_ZEROES : 0));
	/* NBD_OPT_GO: name length, name, one information request. */
	nbd_put32(go, namelen);
	memcpy(go + 4, n->l->export_name, namelen);
	nbd_put16(go + 4 + namelen, 1);
	nbd_put16(go + 6 + namelen, NBD_INFO_BLOCK_SIZE);
	if (!nat_hs_append(n, cflags, sizeof(cflags)) ||
	    !nat_send_option(n, NBD_OPT_GO, go, namelen + 8))
		return -1;
	n->phase = NAT_OPT_REPLIES;
	return NBD_GREETING_SIZE;
}

static void nat_tx_flags(struct nat *n, uint16_t flags)
{
	n->info.read_only = flags & NBD_FLAG_READ_ONLY;
	n->info.can_flush = flags & NBD_FLAG_SEND_FLUSH;
	n->info.can_zero = flags & NBD_FLAG_SEND_WRITE_ZEROES;
}

/* One reply to NBD_OPT_GO: 0 handled, -1 after link_fail(). */
static int nat_opt_reply(struct nat *n, uint32_t type, const unsigned char *d, uint32_t len)
{
	struct replica_link *l = n->l;
	char text[200];

	switch (type) {
	case NBD_REP_INFO:
		if (len < 2)
			break;
		if (nbd_get16(d) == NBD_INFO_EXPORT) {
			if (len != 12)
				break;
			n->info.size = nbd_get64(d + 2);
			nat_tx_flags(n, nbd_get16(d + 10));
			n->have_export = true;
		} else if (nbd_get16(d) == NBD_INFO_BLOCK_SIZE) {
			if (len != 14)
				break;
			n->info.max_payload = nbd_get32(d + 10);
		}
		return 0;	/* other information: not needed */
	case NBD_REP_ACK:
		if (len != 0)
			break;
		if (!n->have_export) {
			link_fail(l, -EPROTO, "NBD handshake failed: the server accepted NBD_OPT_GO without describing the export");
			return -1;
		}
		nat_ready(n);
		return 0;
	case NBD_REP_ERR_UNSUP: {
		/* An old server: the option every newstyle server knows. */
		uint32_t namelen = (uint32_t)strlen(l->export_name);

		if (!nat_send_option(n, NBD_OPT_EXPORT_NAME, l->export_name, namelen))
			return -1;
		n->phase = NAT_EXPORT_NAME;
		return 0;
	}
	default:
		if (!(type & NBD_REP_FLAG_ERROR))
			return 0;	/* a reply type we do not know: skip it */
		nat_server_text(text, sizeof(text), d, len);
		switch (type) {
		case NBD_REP_ERR_UNKNOWN:
			link_fail(l, -ENOENT, "NBD handshake failed: the secondary has no export named '%s'%s%s",
				  l->export_name, text[0] ? ": " : "", text);
			break;
		case NBD_REP_ERR_TLS_REQD:
			link_fail(l, -EACCES, "NBD handshake failed: the secondary requires TLS: add tls=require and its key (tls-psk=FILE) to this spec");
			break;
		case NBD_REP_ERR_POLICY:
			link_fail(l, -EACCES, "NBD handshake failed: the secondary refused export '%s' by policy%s%s",
				  l->export_name, text[0] ? ": " : "", text);
			break;
		default:
			link_fail(l, -EPROTO, "NBD handshake failed: the secondary refused export '%s' (error %#x)%s%s",
				  l->export_name, type, text[0] ? ": " : "", text);
			break;
		}
		return -1;
	}
	link_fail(l, -EPROTO, "NBD handshake failed: malformed reply (type %#x, %u bytes) to NBD_OPT_GO",
		  type, len);
	return -1;
}

/* Option replies: header plus data.  Bytes consumed, 0 for more, -1 after link_fail(). */
static ssize_t nat_opt_replies(struct nat *n, const unsigned char *p, size_t len)
{
	uint32_t opt, type, dlen;

	if (len < NBD_OPT_REPLY_HDR_SIZE)
		return 0;
	opt = nbd_get32(p + 8);
	type = nbd_get32(p + 12);
	dlen = nbd_get32(p + 16);
	if (nbd_get64(p) != NBD_OPT_REPLY_MAGIC || opt != NBD_OPT_GO) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: bad option reply (magic %#" PRIx64 ", option %u)",
			  nbd_get64(p), opt);
		return -1;
	}
	if (dlen > NAT_MAX_OPT_LEN) {
		link_fail(n->l, -EPROTO, "NBD handshake failed: option reply of %u bytes (at most %u)",
			  dlen, NAT_MAX_OPT_LEN);
		return -1;
	}
	if (len < NBD_OPT_REPLY_HDR_SIZE + (size_t)dlen)
		return 0;
	if (nat_opt_reply(n, type, p + NBD_OPT_REPLY_HDR_SIZE, dlen) < 0)
		return -1;
	return NBD_OPT_REPLY_HDR_SIZE + dlen;
}

/* The answer to NBD_OPT_EXPORT_NAME: size, flags, maybe 124 zeroes. */
static ssize_t nat_export_name(struct nat *n, const unsigned char *p, size_t len)
{
	size_t need = 10 + (n->no_zeroes ? 0 : NBD_EXPORT_NAME_ZEROES);

	if (len < need)
		return 0;
	n->info.size = nbd_get64(p);
	nat_tx_flags(n, nbd_get16(p + 8));
	nat_ready(n);
	return (ssize_t)need;
}

/* One simple reply.  Bytes consumed, 0 for more, -1 after link_fail(). */
static ssize_t nat_reply(struct nat *n, const unsigned char *p, size_t len)
{
	uint32_t magic, i;
	uint64_t cookie;
	struct link_piece *piece;
	int err;

	if (len < 4)
		return 0;
	/* A bad magic is reported as soon as it arrives, not when 16 bytes have. */
	magic = nbd_get32(p);
	if (magic != NBD_SIMPLE_REPLY_MAGIC) {
		if (magic == NBD_STRUCTURED_REPLY_MAGIC)
			link_fail(n->l, -EPROTO, "the secondary broke the protocol: a structured reply, which was not negotiated");
		else
			link_fail(n->l, -EPROTO, "the secondary broke the protocol: reply magic %#x", magic);
		return -1;
	}
	if (len < NBD_SIMPLE_REPLY_SIZE)
		return 0;
	err = nbd_nbd_to_errno(nbd_get32(p + 4));
	cookie = nbd_get64(p + 8);
	i = (uint32_t)cookie;
	if (i >= n->nslots || !n->slots[i].p || n->slots[i].gen != (uint32_t)(cookie >> 32) ||
	    !n->slots[i].sent) {
		link_fail(n->l, -EPROTO, "the secondary broke the protocol: a reply to a request never made (cookie %#" PRIx64 ")",
			  cookie);
		return -1;
	}
	piece = n->slots[i].p;
	nat_slot_put(n, i);
	link_piece_done(piece, -err);
	free(piece);
	return NBD_SIMPLE_REPLY_SIZE;
}

/* Parses what the buffer holds; false after link_fail(). */
static bool nat_parse(struct nat *n)
{
	size_t off = 0;
	bool ok = true;

	while (off < n->in_len && !n->l->fail_err) {
		const unsigned char *p = n->in + off;
		size_t len = n->in_len - off;
		ssize_t used;

		switch (n->phase) {
		case NAT_GREETING:
			used = nat_greeting(n, p, len);
			break;
		case NAT_OPT_REPLIES:
			used = nat_opt_replies(n, p, len);
			break;
		case NAT_EXPORT_NAME:
			used = nat_export_name(n, p, len);
			break;
		case NAT_READY:
			used = nat_reply(n, p, len);
			break;
		default:
			used = -1;
			link_fail(n->l, -EPROTO, "the secondary sent data before the connection was up");
			break;
		}
		if (used < 0) {
			ok = false;
			break;
		}
		if (used == 0)
			break;
		off += (size_t)used;
	}
	memmove(n->in, n->in + off, n->in_len - off);
	n->in_len -= off;
	return ok && !n->l->fail_err;
}

static void nat_read(struct nat *n)
{
	for (int round = 0; round < 4; round++) {
		size_t room = NAT_IN_SIZE - n->in_len;
		ssize_t r = recv(n->fd, n->in + n->in_len, room, 0);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			link_fail(n->l, -errno, "%s: %s",
				  n->phase == NAT_READY ? "connection lost" : "NBD handshake failed",
				  strerror(errno));
			return;
		}
		if (r == 0) {
			link_fail(n->l, -ECONNRESET, "%s: the secondary closed the connection",
				  n->phase == NAT_READY ? "connection lost" : "NBD handshake failed");
			return;
		}
		n->in_len += (size_t)r;
		if (!nat_parse(n))
			return;
		if ((size_t)r < room)
			return;		/* drained */
	}
}

/* ------------------------------------------------------------ ops */

static int nat_open(struct replica_link *l, const struct sockaddr *sa, socklen_t salen,
		    char *msg, size_t msglen)
{
	struct nat *n = calloc(1, sizeof(*n));

	if (!n || !(n->in = malloc(NAT_IN_SIZE))) {
		free(n);
		snprintf(msg, msglen, "out of memory");
		return -ENOMEM;
	}
	n->l = l;
	n->fd = -1;
	n->zc_pipe[0] = n->zc_pipe[1] = -1;
	n->free_head = n->sq_head = n->sq_tail = NAT_NONE;
	tdr_defer_init(&n->flush, nat_flush, n);
	l->client = n;
	n->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (n->fd < 0) {
		int err = -errno;

		snprintf(msg, msglen, "cannot create a socket: %s", strerror(errno));
		return err;
	}
	/* We batch ourselves: Nagle would only delay the last command of a
	 * batch.  On UNIX sockets, room for several 1 MiB WRITEs. */
	nbd_socket_tune(n->fd, sa->sa_family != AF_UNIX);
	if (!l->no_zerocopy)
		nat_zc_on(n);
	n->phase = NAT_GREETING;
	if (connect(n->fd, sa, salen) < 0) {
		if (errno != EINPROGRESS) {
			link_fail(l, -errno, "cannot connect: %s", strerror(errno));
			return 0;
		}
		n->phase = NAT_CONNECTING;
	}
	link_watch_fd(l, n->fd);
	return 0;
}

static uint32_t nat_events(struct replica_link *l)
{
	struct nat *n = l->client;

	if (!n || n->fd < 0)
		return 0;
	if (n->phase == NAT_CONNECTING)
		return EPOLLOUT;
	return EPOLLIN | (n->hs_len || n->blocked ? EPOLLOUT : 0);
}

static void nat_on_fd(struct replica_link *l, uint32_t events)
{
	struct nat *n = l->client;

	if (n->phase == NAT_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);

		if (getsockopt(n->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
			err = errno;
		if (err) {
			link_fail(l, -err, "cannot connect: %s", strerror(err));
			return;
		}
		n->phase = NAT_GREETING;
		return;
	}
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
		nat_read(n);
	if (l->fail_err)
		return;
	if (n->hs_len && !nat_hs_send(n))
		return;
	/* Room again in the socket: what nat_flush() could not send. */
	if (n->phase == NAT_READY && n->blocked && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
		nat_send_queue(n);
}

static bool nat_queue(struct replica_link *l, struct link_piece *p)
{
	struct nat *n = l->client;
	uint32_t i = nat_slot_get(n);

	if (i == NAT_NONE) {
		link_fail(l, -ENOMEM, "out of memory queuing a %s", link_op_name(p->op));
		free(p);
		return false;
	}
	n->slots[i].p = p;
	if (n->sq_tail == NAT_NONE)
		n->sq_head = i;
	else
		n->slots[n->sq_tail].next = i;
	n->sq_tail = i;
	if (!n->blocked)
		tdr_loop_defer(l->loop, &n->flush);
	return true;
}

static void nat_close(struct replica_link *l)
{
	struct nat *n = l->client;

	if (!n)
		return;
	tdr_loop_cancel_defer(l->loop, &n->flush);
	if (n->fd >= 0)
		close(n->fd);
	nat_zc_off(n);
	for (uint32_t i = 0; i < n->nslots; i++)
		free(n->slots[i].p);
	free(n->slots);
	free(n->hs_out);
	free(n->in);
	free(n);
	l->client = NULL;
}

const struct link_ops link_native_ops = {
	.name = "native",
	.open = nat_open,
	.on_fd = nat_on_fd,
	.events = nat_events,
	.queue = nat_queue,
	.close = nat_close,
};
