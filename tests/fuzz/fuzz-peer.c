/* SPDX-License-Identifier: BSD-3-Clause */
/* The other end of a fuzzed connection (fuzz-peer.h). */
#include "config.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz-peer.h"

static void peer_update(struct fuzz_peer *p)
{
	uint32_t ev = EPOLLIN;

	if (p->eof) {
		/* Gone: epoll would report the hang-up at every turn. */
		p->sent = p->limit = p->size;
		tdr_loop_unwatch_fd(&p->w);
		return;
	}
	if (p->sent < p->limit)
		ev |= EPOLLOUT;
	if (tdr_loop_update_fd(&p->w, ev) < 0)
		__builtin_trap();
}

static void peer_event(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct fuzz_peer *p = arg;
	unsigned char buf[65536];
	ssize_t n;

	(void)w;
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
		while ((n = read(p->fd, buf, sizeof(buf))) > 0) {
			for (ssize_t i = 0; i < n && p->head_len < FUZZ_PEER_HEAD; i++)
				p->head[p->head_len++] = buf[i];
			p->got += (uint64_t)n;
			if (p->on_data)
				p->on_data(p->on_data_arg, buf, (size_t)n);
		}
		if (n == 0 || (n < 0 && errno != EAGAIN))
			p->eof = true;
	}
	while (!p->eof && p->sent < p->limit) {
		n = send(p->fd, p->data + p->sent, p->limit - p->sent, MSG_NOSIGNAL);
		if (n <= 0) {
			if (n < 0 && errno != EAGAIN)
				p->eof = true;
			break;
		}
		p->sent += (size_t)n;
	}
	if (!p->eof && p->sent == p->size && !p->wr_closed) {
		shutdown(p->fd, SHUT_WR);
		p->wr_closed = true;
	}
	peer_update(p);
}

int fuzz_peer_start(struct fuzz_peer *p, struct tdr_loop *loop, int fd, const uint8_t *data,
		    size_t size, size_t limit)
{
	*p = (struct fuzz_peer){ .fd = fd, .data = data, .size = size,
				 .limit = limit < size ? limit : size };
	return tdr_loop_watch_fd(loop, &p->w, fd, EPOLLIN | EPOLLOUT, peer_event, p);
}

void fuzz_peer_send_all(struct fuzz_peer *p)
{
	p->limit = p->size;
	if (!p->eof)
		peer_event(&p->w, 0, p);
}

void fuzz_peer_stop(struct fuzz_peer *p)
{
	tdr_loop_unwatch_fd(&p->w);
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
}
