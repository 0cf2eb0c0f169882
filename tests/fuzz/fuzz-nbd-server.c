/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the NBD server fed a client's byte stream.
 *
 * The input is everything a client sends, handshake and transmission
 * alike, written into one end of a socketpair whose other end the server
 * serves (nbd_server_add_connection()), then closed for writing.  The
 * server's replies are read and thrown away as they come.  The export is a
 * 1 MiB disk in memory, served by fuzz-mem.c's driver (some requests fail,
 * some complete at once, most from the loop, out of order), plus a
 * read-only export "ro" of the same disk.  A third of the inputs meet TLS
 * offered (a pre-shared key) and a third TLS required: their bytes after
 * an NBD_OPT_STARTTLS go to GnuTLS's handshake (nbd-tls.c).
 *
 * Besides what the sanitizers catch, the harness traps when:
 *   - the server's first bytes are not the fixed-newstyle greeting;
 *   - the connection is still open 5 s (of loop time) after the input
 *     ended (a state that waits forever for a client that is gone);
 *   - a request is still in flight in the disk after the connection closed;
 *   - the shutdown does not complete.
 *
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-nbd
 * (tests/fuzz/make-corpus.py writes it).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"
#include "fuzz-mem.h"
#include "fuzz-peer.h"
#include "fuzz-table.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void on_shutdown(void *arg)
{
	*(bool *)arg = true;
}

/* The pre-shared key file of the TLS inputs, made once, removed at exit. */
static char psk[] = "/tmp/fuzz-nbd-server-psk-XXXXXX";

static void remove_psk(void)
{
	unlink(psk);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct tdr_loop *loop;
	static struct tdr_io_ctx *io;
	struct fuzz_peer c;
	struct nbd_server *srv;
	struct td_disk *disk;
	unsigned char want[NBD_GREETING_SIZE];
	uint64_t deadline;
	bool done = false;
	int sv[2];

	struct nbd_tls_config tls = { .psk_file = psk };

	if (!loop) {
		int fd = mkstemp(psk);
		static const char key[] =
			"fuzz:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";

		if (fd < 0 || write(fd, key, sizeof(key) - 1) != (ssize_t)(sizeof(key) - 1))
			__builtin_trap();
		close(fd);
		atexit(remove_psk);
		tdr_log_init("fuzz-nbd-server", false, TDR_LOG_ERR);
		fuzz_driver = &fuzz_mem_driver;	/* the only driver linked in */
		loop = tdr_loop_new();
		io = loop ? tdr_io_ctx_new(loop, 64) : NULL;
		if (!io)
			__builtin_trap();
	}
	if (td_disk_open(&disk, "mem:", 0, loop, io) < 0)
		__builtin_trap();
	srv = nbd_server_new(loop);
	if (!srv || nbd_server_add_export(srv, "", "fuzz", disk, false) < 0 ||
	    nbd_server_add_export(srv, "ro", NULL, disk, true) < 0)
		__builtin_trap();
	/* Inputs of odd length meet a cap of 4 requests in flight (reading stops at it). */
	if (size % 2)
		nbd_server_set_max_inflight(srv, 4);
	tls.mode = size % 3 == 1 ? NBD_TLS_ON : size % 3 == 2 ? NBD_TLS_REQUIRE : NBD_TLS_OFF;
	if (nbd_server_set_tls(srv, &tls) < 0)
		__builtin_trap();
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		__builtin_trap();
	if (nbd_server_add_connection(srv, sv[0]) < 0 ||
	    fuzz_peer_start(&c, loop, sv[1], data, size, size) < 0)
		__builtin_trap();

	/* The input is sent; the connection must go away within 5 s after it. */
	deadline = 0;
	while (nbd_server_connections(srv) || !c.eof) {
		if (c.sent == c.size && !deadline)
			deadline = tdr_now_ns() + 5000000000ull;
		if (deadline && tdr_now_ns() > deadline)
			__builtin_trap();
		if (tdr_loop_run_once(loop, 100) < 0)
			__builtin_trap();
	}
	/* The greeting came first (nothing else is ever sent before it). */
	nbd_encode_greeting(want, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	if (c.head_len < NBD_GREETING_SIZE || memcmp(c.head, want, sizeof(want)))
		__builtin_trap();
	/* Requests of a closed connection finish; nothing stays in the disk. */
	deadline = tdr_now_ns() + 5000000000ull;
	while (disk->inflight) {
		if (tdr_now_ns() > deadline || tdr_loop_run_once(loop, 100) < 0)
			__builtin_trap();
	}
	nbd_server_shutdown(srv, on_shutdown, &done);
	deadline = tdr_now_ns() + 5000000000ull;
	while (!done) {
		if (tdr_now_ns() > deadline || tdr_loop_run_once(loop, 100) < 0)
			__builtin_trap();
	}
	fuzz_peer_stop(&c);
	nbd_server_free(srv);
	td_disk_close(disk);
	return 0;
}
