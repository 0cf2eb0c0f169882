/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The plain (unencrypted) transport.  Connections only move bytes through
 * struct nbd_transport_ops, so a TLS transport can replace this one after an
 * NBD_OPT_STARTTLS without touching the protocol code.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nbd-int.h"

static ssize_t plain_recv(struct nbd_transport *t, void *buf, size_t len)
{
	ssize_t n;

	do
		n = read(t->fd, buf, len);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	return n;
}

static ssize_t plain_sendv(struct nbd_transport *t, const struct iovec *iov, int iovcnt)
{
	struct msghdr msg = {
		.msg_iov = (struct iovec *)iov,
		.msg_iovlen = (size_t)iovcnt,
	};
	ssize_t n;

	/* MSG_NOSIGNAL: a vanished client must not kill us with SIGPIPE. */
	do
		n = sendmsg(t->fd, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == ENOTSOCK) {
		/* A pipe or similar (tests): same thing without the flag. */
		do
			n = writev(t->fd, iov, iovcnt);
		while (n < 0 && errno == EINTR);
	}
	if (n < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	return n;
}

static void plain_close(struct nbd_transport *t)
{
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
}

static const struct nbd_transport_ops plain_ops = {
	.name = "plain",
	.recv = plain_recv,
	.sendv = plain_sendv,
	.pending = NULL,
	.close = plain_close,
};

void nbd_transport_plain_init(struct nbd_transport *t, int fd)
{
	t->ops = &plain_ops;
	t->fd = fd;
	t->priv = NULL;
}

void nbd_socket_tune(int fd, bool tcp)
{
	int one = 1, sz = NBD_UNIX_SNDBUF;

	if (tcp)
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	else
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
}
