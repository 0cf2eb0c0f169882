/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Test helpers for the primary: real peers (qemu-nbd, nbdkit) as child
 * processes, an in-process NBD server that can misbehave and counts what
 * it receives, and a primary disk driven through td_disk and
 * replica_execute on the real loop.  Included by test-primary*.c only.
 */
#ifndef TEST_PRIMARY_PEER_H
#define TEST_PRIMARY_PEER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "tdr/image.h"
#include "tdr/replica.h"

#define TP_MIB (1u << 20)

/* Per-test paths, under a fresh directory. */
extern char tp_dir[64];
extern char tp_local[128];	/* the primary's local raw image */
extern char tp_sec[128];	/* the secondary's raw image */
extern char tp_sock[128];	/* the secondary's NBD socket */

extern struct tdr_loop *tp_loop;
extern struct tdr_io_ctx *tp_io;
extern struct td_disk *tp_disk;
extern struct td_image *tp_rimg;

/* Makes the directory and both images (size bytes; sec_fill: 0 zeroes, 1 random). */
void tp_setup(uint64_t local_size, uint64_t sec_size, int sec_fill);
/* Closes the disk, stops peers, removes the directory. */
void tp_teardown(void);

/* Peers.  argv is NULL-terminated; the socket is tp_sock.  Waits until it answers. */
pid_t tp_spawn(const char *const argv[]);
pid_t tp_qemu_nbd(const char *export_name);
/* nbdkit -f -U tp_sock [--filter=F]... file tp_sec [args...]; filters and args NULL-terminated. */
pid_t tp_nbdkit(const char *const filters[], const char *const args[]);
void tp_kill(pid_t pid, int sig);
/* SIGKILL and reap. */
void tp_stop(pid_t pid);
bool tp_have(const char *prog);
struct sockaddr_un;
/* Fills a UNIX socket address (fails the test if path is too long). */
void tp_sun(struct sockaddr_un *sun, const char *path);

/* The fake server (a thread).  Misbehaviours: */
enum tp_fake_mode {
	TP_FAKE_GOOD = 0,
	TP_FAKE_GARBAGE,	/* answers the Nth request with garbage */
	TP_FAKE_BOGUS_HANDLE,	/* answers the Nth request with a handle never issued */
	TP_FAKE_SILENT,		/* never answers from the Nth request on */
	TP_FAKE_CLOSE,		/* closes the connection at the Nth request */
	TP_FAKE_STRUCTURED,	/* answers the Nth request with a structured reply (not negotiated) */
	TP_FAKE_ERROR,		/* fails the Nth request with NBD error value nth_err */
	TP_FAKE_NO_GO,		/* an old server: no NBD_OPT_GO, no NO_ZEROES; otherwise good */
	TP_FAKE_JUNK_HS,	/* answers the first option with junk from seed nth, then closes */
};

struct tp_fake_stats {
	uint64_t write_cmds, write_bytes;
	uint64_t zero_cmds, zero_bytes;
	uint64_t trim_cmds, flush_cmds;
	uint64_t connections;
};

/* Serves tp_sec (export name "secondary", size of the file) on tp_sock. */
void tp_fake_start(enum tp_fake_mode mode, unsigned nth);
void tp_fake_set_mode(enum tp_fake_mode mode, unsigned nth);
/* The NBD error value TP_FAKE_ERROR answers with (default 5, EIO). */
void tp_fake_set_error(uint32_t nbd_err);
void tp_fake_get_stats(struct tp_fake_stats *st);
void tp_fake_reset_stats(void);
/* While held, the server reads no further request (the one it is reading completes). */
void tp_fake_hold_reads(bool hold);
void tp_fake_stop(void);

/* The primary. */
void tp_open(const char *extra_opts);	/* "" or ",timeout=500" ... */
void tp_close(void);
/* Runs a request line; returns err, copies the message into msg (may be NULL). */
int tp_op(const char *line, char *msg, size_t msglen);
/* An operation's outcome, filled in when it completes. */
struct tp_op_result {
	bool done;
	int err;
	char msg[512];
};
/* Starts line on tp_rimg and returns at once; res is filled in later. */
void tp_op_begin(const char *line, struct tp_op_result *res);
void tp_status(struct replica_status *st);
enum replica_state tp_state(void);
/* Runs the loop until the state is s (fails after a generous deadline). */
void tp_wait_state(enum replica_state s);
/* Runs the loop for ms milliseconds. */
void tp_run_for(unsigned ms);

/* Guest I/O through the disk: returns the request's error. */
int tp_guest_io(enum td_op op, uint64_t off, uint64_t len, void *buf, unsigned flags);
/* Many writes at once: n requests of len bytes at offs[i], data from bufs[i]. */
void tp_write_many(unsigned n, const uint64_t *offs, uint64_t len, char *const *bufs, int *errs);
/* The same in steps: submit, count completions, run the loop until want
 * completed (fails after the deadline), wait for all and free. */
struct tp_batch;
struct tp_batch *tp_batch_write(unsigned n, const uint64_t *offs, uint64_t len, char *const *bufs);
unsigned tp_batch_done(const struct tp_batch *b);
void tp_batch_run_until(struct tp_batch *b, unsigned want);
void tp_batch_finish(struct tp_batch *b, int *errs);
/* A buffer of len bytes filled from seed. */
char *tp_pattern(uint64_t len, unsigned seed);

/* Byte-exact comparison of the two images; fails the test with the first difference. */
void tp_assert_same(void);
bool tp_files_equal(const char *a, const char *b, uint64_t *first_diff);

#endif
