/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * NBD wire encoding and request validation.  Pure functions: no I/O and no
 * allocation, so they are unit tested and fuzzed on their own.
 */
#include <errno.h>
#include <string.h>

#include "tdr/nbd.h"

void nbd_encode_greeting(unsigned char buf[NBD_GREETING_SIZE], uint16_t hs_flags)
{
	nbd_put64(buf, NBD_MAGIC);
	nbd_put64(buf + 8, NBD_IHAVEOPT);
	nbd_put16(buf + 16, hs_flags);
}

int nbd_decode_opt_hdr(const unsigned char buf[NBD_OPT_HDR_SIZE], struct nbd_opt_hdr *h)
{
	if (nbd_get64(buf) != NBD_IHAVEOPT)
		return -EPROTO;
	h->opt = nbd_get32(buf + 8);
	h->len = nbd_get32(buf + 12);
	return 0;
}

void nbd_encode_opt_reply_hdr(unsigned char buf[NBD_OPT_REPLY_HDR_SIZE], uint32_t opt,
			      uint32_t type, uint32_t len)
{
	nbd_put64(buf, NBD_OPT_REPLY_MAGIC);
	nbd_put32(buf + 8, opt);
	nbd_put32(buf + 12, type);
	nbd_put32(buf + 16, len);
}

int nbd_decode_request(const unsigned char buf[NBD_REQUEST_SIZE], struct nbd_request *r)
{
	if (nbd_get32(buf) != NBD_REQUEST_MAGIC)
		return -EPROTO;
	r->flags = nbd_get16(buf + 4);
	r->type = nbd_get16(buf + 6);
	r->handle = nbd_get64(buf + 8);
	r->offset = nbd_get64(buf + 16);
	r->len = nbd_get32(buf + 24);
	return 0;
}

void nbd_encode_request(unsigned char buf[NBD_REQUEST_SIZE], const struct nbd_request *r)
{
	nbd_put32(buf, NBD_REQUEST_MAGIC);
	nbd_put16(buf + 4, r->flags);
	nbd_put16(buf + 6, r->type);
	nbd_put64(buf + 8, r->handle);
	nbd_put64(buf + 16, r->offset);
	nbd_put32(buf + 24, r->len);
}

void nbd_encode_simple_reply(unsigned char buf[NBD_SIMPLE_REPLY_SIZE], uint32_t error,
			     uint64_t handle)
{
	nbd_put32(buf, NBD_SIMPLE_REPLY_MAGIC);
	nbd_put32(buf + 4, error);
	nbd_put64(buf + 8, handle);
}

void nbd_encode_structured_hdr(unsigned char buf[NBD_STRUCTURED_HDR_SIZE], uint16_t flags,
			       uint16_t type, uint64_t handle, uint32_t len)
{
	nbd_put32(buf, NBD_STRUCTURED_REPLY_MAGIC);
	nbd_put16(buf + 4, flags);
	nbd_put16(buf + 6, type);
	nbd_put64(buf + 8, handle);
	nbd_put32(buf + 16, len);
}

uint32_t nbd_errno_to_nbd(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
	case EACCES:
		return NBD_EPERM;
	case EIO:
		return NBD_EIO;
	case ENOMEM:
		return NBD_ENOMEM;
	case EINVAL:
		return NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return NBD_ENOSPC;
	case EOVERFLOW:
		return NBD_EOVERFLOW;
	case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
	case EOPNOTSUPP:
#endif
		return NBD_ENOTSUP;
	case ESHUTDOWN:
		return NBD_ESHUTDOWN;
	default:
		return NBD_EIO;
	}
}

int nbd_nbd_to_errno(uint32_t v)
{
	switch (v) {
	case 0:
		return 0;
	case NBD_EPERM:
		return -EPERM;
	case NBD_EIO:
		return -EIO;
	case NBD_ENOMEM:
		return -ENOMEM;
	case NBD_EINVAL:
		return -EINVAL;
	case NBD_ENOSPC:
		return -ENOSPC;
	case NBD_EOVERFLOW:
		return -EOVERFLOW;
	case NBD_ENOTSUP:
		return -ENOTSUP;
	case NBD_ESHUTDOWN:
		return -ESHUTDOWN;
	default:
		/* A value outside the protocol's list says only that the request failed. */
		return -EINVAL;
	}
}

const char *nbd_cmd_name(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ: return "READ";
	case NBD_CMD_WRITE: return "WRITE";
	case NBD_CMD_DISC: return "DISC";
	case NBD_CMD_FLUSH: return "FLUSH";
	case NBD_CMD_TRIM: return "TRIM";
	case NBD_CMD_CACHE: return "CACHE";
	case NBD_CMD_WRITE_ZEROES: return "WRITE_ZEROES";
	case NBD_CMD_BLOCK_STATUS: return "BLOCK_STATUS";
	default: return "unknown";
	}
}

const char *nbd_opt_name(uint32_t opt)
{
	switch (opt) {
	case NBD_OPT_EXPORT_NAME: return "EXPORT_NAME";
	case NBD_OPT_ABORT: return "ABORT";
	case NBD_OPT_LIST: return "LIST";
	case NBD_OPT_PEEK_EXPORT: return "PEEK_EXPORT";
	case NBD_OPT_STARTTLS: return "STARTTLS";
	case NBD_OPT_INFO: return "INFO";
	case NBD_OPT_GO: return "GO";
	case NBD_OPT_STRUCTURED_REPLY: return "STRUCTURED_REPLY";
	case NBD_OPT_LIST_META_CONTEXT: return "LIST_META_CONTEXT";
	case NBD_OPT_SET_META_CONTEXT: return "SET_META_CONTEXT";
	default: return "unknown";
	}
}

uint16_t nbd_export_tx_flags(bool readonly, bool structured)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;

	/* proto.md: SEND_DF only once structured replies are negotiated. */
	if (structured)
		f |= NBD_FLAG_SEND_DF;
	if (readonly)
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
		     NBD_FLAG_SEND_FAST_ZERO;
	return f;
}

int nbd_parse_info_req(const unsigned char *data, uint32_t len, struct nbd_info_req *out)
{
	uint32_t namelen;
	uint16_t n;

	if (len < 6)
		return -EINVAL;
	namelen = nbd_get32(data);
	if (namelen > len - 6 || namelen > NBD_MAX_STRING)
		return -EINVAL;
	n = nbd_get16(data + 4 + namelen);
	/* Exactly name + count + requests: trailing bytes are a client bug. */
	if ((uint64_t)len != 6ull + namelen + 2ull * n)
		return -EINVAL;
	out->name = (const char *)data + 4;
	out->namelen = namelen;
	out->ninfos = n;
	out->infos = data + 6 + namelen;
	return 0;
}

int nbd_parse_meta_req(const unsigned char *data, uint32_t len, const char **name,
		       uint32_t *namelen, uint32_t *nqueries,
		       int (*query)(const char *q, uint32_t qlen, void *arg), void *arg)
{
	uint32_t pos, n, i;

	if (len < 8)
		return -EINVAL;
	*namelen = nbd_get32(data);
	if (*namelen > len - 8 || *namelen > NBD_MAX_STRING)
		return -EINVAL;
	*name = (const char *)data + 4;
	pos = 4 + *namelen;
	n = nbd_get32(data + pos);
	pos += 4;
	/* Each query takes at least its 4-byte length: bound n before looping. */
	if (n > (len - pos) / 4)
		return -EINVAL;
	*nqueries = n;
	for (i = 0; i < n; i++) {
		uint32_t qlen;
		int ret;

		if (len - pos < 4)
			return -EINVAL;
		qlen = nbd_get32(data + pos);
		pos += 4;
		if (qlen > len - pos || qlen > NBD_MAX_STRING)
			return -EINVAL;
		if (query) {
			ret = query((const char *)data + pos, qlen, arg);
			if (ret)
				return ret;
		}
		pos += qlen;
	}
	if (pos != len)
		return -EINVAL;
	return 0;
}

uint32_t nbd_check_request(const struct nbd_request *r, const struct nbd_req_limits *lim,
			   const char **why)
{
	uint16_t allowed;
	bool writes = false;
	const char *dummy;

	if (!why)
		why = &dummy;
	*why = NULL;

	/* FUA is accepted (and ignored where meaningless) on every command,
	 * as proto.md requires once SEND_FUA is advertised. */
	switch (r->type) {
	case NBD_CMD_READ:
		allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
		break;
	case NBD_CMD_WRITE:
	case NBD_CMD_TRIM:
		allowed = NBD_CMD_FLAG_FUA;
		writes = true;
		break;
	case NBD_CMD_WRITE_ZEROES:
		allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
		writes = true;
		break;
	case NBD_CMD_FLUSH:
	case NBD_CMD_DISC:
		allowed = NBD_CMD_FLAG_FUA;
		break;
	case NBD_CMD_BLOCK_STATUS:
		allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
		break;
	default:
		*why = "unknown command";
		return NBD_EINVAL;
	}
	if (r->flags & ~allowed) {
		*why = "command flag not valid for this command";
		return NBD_EINVAL;
	}
	if ((r->flags & NBD_CMD_FLAG_DF) && !lim->structured) {
		*why = "DF flag needs structured replies";
		return NBD_EINVAL;
	}
	if (writes && lim->readonly) {
		*why = "export is read-only";
		return NBD_EPERM;
	}
	if (r->type == NBD_CMD_FLUSH || r->type == NBD_CMD_DISC) {
		if (r->offset || r->len) {
			*why = "offset and length must be zero";
			return NBD_EINVAL;
		}
		return 0;
	}
	if ((r->offset | r->len) & (NBD_MIN_BLOCK_SIZE - 1)) {
		*why = "offset and length must be multiples of 512";
		return NBD_EINVAL;
	}
	if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->len > NBD_MAX_BLOCK_SIZE) {
		*why = "length exceeds the maximum block size (32 MiB)";
		/* proto.md allows EOVERFLOW only for reads that may not be
		 * fragmented. */
		if (r->type == NBD_CMD_READ && (r->flags & NBD_CMD_FLAG_DF))
			return NBD_EOVERFLOW;
		return NBD_EINVAL;
	}
	if (r->offset > lim->size || r->len > lim->size - r->offset) {
		*why = "request extends beyond the end of the export";
		if (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES)
			return NBD_ENOSPC;
		return NBD_EINVAL;
	}
	if (r->type == NBD_CMD_BLOCK_STATUS) {
		if (!lim->structured || !lim->meta) {
			*why = "no metadata context negotiated";
			return NBD_EINVAL;
		}
		if (r->len == 0) {
			*why = "zero-length block status";
			return NBD_EINVAL;
		}
	}
	return 0;
}
