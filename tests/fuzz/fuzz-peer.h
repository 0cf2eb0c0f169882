/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The other end of a fuzzed connection, shared by the protocol harnesses:
 * sends the input (up to a limit, then all of it), closes for writing once
 * everything is out, reads and drops what the code under test sends
 * (keeping its first bytes, and showing all of them to on_data if set),
 * and stops watching once that side is gone.
 * Sends never raise SIGPIPE.
 */
#ifndef TDR_FUZZ_PEER_H
#define TDR_FUZZ_PEER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tdr/loop.h"

#define FUZZ_PEER_HEAD 32

struct fuzz_peer {
	struct tdr_fd_watch w;
	int fd;
	const uint8_t *data;
	size_t size, sent, limit;	/* sends data[sent..limit) now */
	unsigned char head[FUZZ_PEER_HEAD];	/* the first bytes received */
	size_t head_len;
	uint64_t got;			/* bytes received */
	bool eof;			/* the other side closed (or the socket failed) */
	bool wr_closed;
	/* Optional (set after fuzz_peer_start()): sees every byte received. */
	void (*on_data)(void *arg, const unsigned char *buf, size_t n);
	void *on_data_arg;
};

/* Starts serving fd (non-blocking; the peer owns it from now on); 0 or -errno. */
int fuzz_peer_start(struct fuzz_peer *p, struct tdr_loop *loop, int fd, const uint8_t *data,
		    size_t size, size_t limit);
/* Lifts the limit: the rest of the input goes out. */
void fuzz_peer_send_all(struct fuzz_peer *p);
/* Stops watching and closes the socket. */
void fuzz_peer_stop(struct fuzz_peer *p);

#endif
