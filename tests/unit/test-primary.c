/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the primary mode against real peers (qemu-nbd, nbdkit and
 * its delay/error/pause filters) and an in-process NBD server that
 * misbehaves on demand: forwarding, byte-exact checkpoints, broken links
 * (bounded completion, state, error), bad input, and resync.
 *
 * Timing is never asserted, only that requests complete before a generous
 * deadline; latencies belong to tests/bench/primary.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "test-primary-peer.h"
#include "tdr/log.h"
#include "tdr/nbd.h"
#include "check-run.h"

#define DISK (16u * TP_MIB)
#define KIB 1024u

static void setup16(void)
{
	tp_setup(DISK, DISK, 0);
}

static void teardown(void)
{
	tp_teardown();
}

/*
 * A missing peer fails the test: Check cannot report a skip, and a test
 * that returns early would be counted as passed.  tools/quickstart installs
 * every peer.
 */
#define NEED_PEER(prog)                                                    \
	ck_assert_msg(tp_have(prog), "%s not installed: run tools/quickstart (it installs the test peers)", prog)

static void assert_op(const char *line)
{
	char msg[512];
	int err = tp_op(line, msg, sizeof(msg));

	ck_assert_msg(err == 0, "'%s' failed: %d %s", line, err, msg);
}

static void assert_op_fails(const char *line, int want, const char *needle)
{
	char msg[512];
	int err = tp_op(line, msg, sizeof(msg));

	ck_assert_msg(err == want, "'%s': expected %d, got %d (%s)", line, want, err, msg);
	ck_assert_msg(strstr(msg, needle), "'%s': message '%s' lacks '%s'", line, msg, needle);
}

/* Writes buf at off and checks that it reads back through the disk. */
static void write_check(uint64_t off, uint64_t len, unsigned seed)
{
	char *buf = tp_pattern(len, seed), *back = tp_pattern(len, seed + 1);

	ck_assert_int_eq(tp_guest_io(TD_OP_WRITE, off, len, buf, 0), 0);
	ck_assert_int_eq(tp_guest_io(TD_OP_READ, off, len, back, 0), 0);
	ck_assert_msg(memcmp(buf, back, len) == 0, "data written at %llu not read back",
		      (unsigned long long)off);
	free(buf);
	free(back);
}

/* A mixed guest workload: sizes, alignments, concurrency, zeroes, discard. */
static void workload(unsigned seed)
{
	uint64_t offs[16];
	char *bufs[16];
	int errs[16];
	char *big = tp_pattern(3 * TP_MIB, seed);

	write_check(0, 4 * KIB, seed + 1);
	write_check(TP_MIB + 512, 64 * KIB, seed + 2);
	ck_assert_int_eq(tp_guest_io(TD_OP_WRITE, 5 * TP_MIB, 3 * TP_MIB, big, 0), 0);
	for (unsigned i = 0; i < 16; i++) {
		offs[i] = (uint64_t)((i * 7919u + seed) % (DISK / (4 * KIB))) * 4 * KIB;
		bufs[i] = tp_pattern(4 * KIB, seed * 100 + i);
	}
	tp_write_many(16, offs, 4 * KIB, bufs, errs);
	for (unsigned i = 0; i < 16; i++) {
		ck_assert_int_eq(errs[i], 0);
		free(bufs[i]);
	}
	ck_assert_int_eq(tp_guest_io(TD_OP_WRITE_ZEROES, 5 * TP_MIB + 4096, 8192, NULL, 0), 0);
	ck_assert_int_eq(tp_guest_io(TD_OP_WRITE_ZEROES, 6 * TP_MIB, 64 * KIB, NULL, TD_REQ_NO_HOLE), 0);
	ck_assert_int_eq(tp_guest_io(TD_OP_DISCARD, 7 * TP_MIB, 128 * KIB, NULL, 0), 0);
	ck_assert_int_eq(tp_guest_io(TD_OP_FLUSH, 0, 0, NULL, 0), 0);
	free(big);
}

/*
 * Whether the link runs on the native client, which sends payloads of
 * 64 KiB and more by reference (zero-copy) unless told zerocopy=off.
 */
static bool native_client(void)
{
	const char *c = getenv("TDR_TEST_CLIENT");

	return !c || !*c || strcmp(c, "native") == 0;
}

/* What workload() sends by reference on the native client: its 64 KiB and 3 MiB writes. */
#define WORKLOAD_SPLICED (64 * KIB + 3 * TP_MIB)

/* Waits for a batch of guest writes, which must all succeed, then checkpoints and compares. */
static void finish_and_compare(struct tp_batch *b, unsigned n, char **bufs, int *errs)
{
	tp_batch_finish(b, errs);
	for (unsigned i = 0; i < n; i++) {
		ck_assert_int_eq(errs[i], 0);
		free(bufs[i]);
	}
	assert_op("checkpoint");
	tp_assert_same();
}

static void replicate_and_compare(void)
{
	struct replica_status st;

	assert_op("start");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RUNNING);
	workload(1);
	assert_op("checkpoint");
	tp_assert_same();
	workload(2);
	assert_op("checkpoint");
	tp_assert_same();
	tp_status(&st);
	ck_assert_uint_eq(st.stats.checkpoints, 2);
	ck_assert_uint_gt(st.stats.fwd_reqs, 0);
	ck_assert_uint_eq(st.stats.dirty_bytes, 0);
	ck_assert_int_eq(st.error, 0);
	ck_assert_uint_eq(st.stats.fwd_spliced_bytes, native_client() ? 2 * WORKLOAD_SPLICED : 0);
}

/* ------------------------------------------------------------ peers */

/* The send buffer the kernel gives a UNIX socket that asks for NBD_UNIX_SNDBUF. */
static int expected_unix_sndbuf(void)
{
	FILE *f = fopen("/proc/sys/net/core/wmem_max", "r");
	long max = 0;

	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fscanf(f, "%ld", &max), 1);
	fclose(f);
	/* socket(7): the kernel doubles the value asked for (capped at wmem_max). */
	return 2 * (int)(max < NBD_UNIX_SNDBUF ? max : NBD_UNIX_SNDBUF);
}

/* The send buffer of this process's socket connected to path (-1 if none). */
static int sndbuf_of_socket_to(const char *path)
{
	int found = -1;

	for (int fd = 3; fd < 1024 && found < 0; fd++) {
		struct sockaddr_un peer;
		socklen_t len = sizeof(peer);
		int sz;

		if (getpeername(fd, (struct sockaddr *)&peer, &len) < 0 || peer.sun_family != AF_UNIX ||
		    len <= offsetof(struct sockaddr_un, sun_path) || strcmp(peer.sun_path, path))
			continue;
		len = sizeof(sz);
		ck_assert_int_eq(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, &len), 0);
		found = sz;
	}
	return found;
}

/*
 * The link asks for a send buffer of several 1 MiB WRITEs on a UNIX
 * socket (the kernel's default holds one fifth of one), and still
 * replicates byte for byte.
 */
START_TEST(t_link_socket_buffer)
{
	NEED_PEER("nbdkit");
	tp_nbdkit(NULL, NULL);
	tp_open("");
	assert_op("start");
	ck_assert_int_eq(sndbuf_of_socket_to(tp_sock), expected_unix_sndbuf());
	write_check(0, 3 * TP_MIB, 7);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

START_TEST(t_qemu_nbd)
{
	NEED_PEER("qemu-nbd");
	tp_qemu_nbd("secondary");
	tp_open("");
	replicate_and_compare();
}
END_TEST

START_TEST(t_nbdkit)
{
	NEED_PEER("nbdkit");
	tp_nbdkit(NULL, NULL);
	tp_open("");
	replicate_and_compare();
}
END_TEST

/*
 * Zero-copy with a secondary that stops reading: the socket fills up in
 * the middle of spliced payloads, the link waits for room and goes on
 * where it stopped.  Every payload byte is spliced exactly once (native
 * client; libnbd copies) and the secondary ends byte-identical.
 */
START_TEST(t_zerocopy_blocked)
{
	enum { N = 14 };	/* MiB: more than the link's socket buffer (at most 8 MiB) */
	uint64_t offs[N];
	char *bufs[N];
	int errs[N];
	struct replica_status st;
	struct tp_batch *b;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open("");
	assert_op("start");
	tp_fake_hold_reads(true);
	for (unsigned i = 0; i < N; i++) {
		offs[i] = (uint64_t)i * TP_MIB + (i % 2) * 4 * KIB;
		bufs[i] = tp_pattern(TP_MIB - 4 * KIB, 40 + i);
	}
	b = tp_batch_write(N, offs, TP_MIB - 4 * KIB, bufs);
	tp_run_for(300);
	tp_status(&st);
	ck_assert_uint_lt(st.stats.fwd_spliced_bytes, (uint64_t)N * (TP_MIB - 4 * KIB));
	if (native_client())
		ck_assert_uint_gt(st.stats.fwd_spliced_bytes, 0);
	else
		ck_assert_uint_eq(st.stats.fwd_spliced_bytes, 0);
	tp_fake_hold_reads(false);
	finish_and_compare(b, N, bufs, errs);
	tp_status(&st);
	ck_assert_int_eq(st.error, 0);
	ck_assert_uint_eq(st.stats.fwd_spliced_bytes,
			  native_client() ? (uint64_t)N * (TP_MIB - 4 * KIB) : 0);
}
END_TEST

/* zerocopy=off: the native client copies every payload; a bad value is refused. */
START_TEST(t_zerocopy_off)
{
	struct replica_status st;
	struct td_disk *d = NULL;
	char bad[512];

	snprintf(bad, sizeof(bad), "replica:mode=primary,addr=unix:%s,zerocopy=maybe|aio:%s",
		 tp_sock, tp_local);
	ck_assert_int_lt(td_disk_open(&d, bad, 0, tp_loop, tp_io), 0);
	ck_assert_msg(strstr(tdr_last_error(), "zerocopy=maybe: expected zerocopy=on or zerocopy=off"),
		      "%s", tdr_last_error());
	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open(",zerocopy=off");
	assert_op("start");
	workload(3);
	assert_op("checkpoint");
	tp_assert_same();
	tp_status(&st);
	ck_assert_uint_gt(st.stats.fwd_bytes, WORKLOAD_SPLICED);
	ck_assert_uint_eq(st.stats.fwd_spliced_bytes, 0);
}
END_TEST

START_TEST(t_fake_sync_local)
{
	struct tp_fake_stats fs;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open(",sync=local");
	replicate_and_compare();
	tp_fake_get_stats(&fs);
	ck_assert_uint_eq(fs.flush_cmds, 2);
	ck_assert_uint_eq(fs.trim_cmds, 0);	/* discards become zeroes on both sides */
}
END_TEST

/*
 * sync=local: the guest's requests (heap, freed at completion) are gone
 * when the secondary's halves fail; the primary must not look at them.
 */
START_TEST(t_sync_local_break)
{
	uint64_t offs[8];
	char *bufs[8];
	int errs[8];
	struct replica_status st;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open(",sync=local,timeout=300");
	assert_op("start");
	tp_fake_set_mode(TP_FAKE_SILENT, 1);
	for (unsigned i = 0; i < 8; i++) {
		offs[i] = (uint64_t)i * TP_MIB;
		bufs[i] = tp_pattern(64 * KIB, 60 + i);
	}
	tp_write_many(8, offs, 64 * KIB, bufs, errs);	/* complete at the local write */
	for (unsigned i = 0; i < 8; i++) {
		ck_assert_int_eq(errs[i], 0);
		free(bufs[i]);
	}
	tp_wait_state(REPLICA_STATE_BROKEN);
	tp_status(&st);
	ck_assert_int_eq(st.error, -ETIMEDOUT);
	ck_assert_uint_eq(st.stats.dirty_bytes, 8 * 64 * KIB);
}
END_TEST

/* The barrier: with slow acknowledgements and sync=local, the checkpoint is what waits. */
START_TEST(t_barrier_slow_acks)
{
	const char *filters[] = { "delay", NULL };
	const char *args[] = { "delay-write=300ms", NULL };
	uint64_t offs[8];
	char *bufs[8];
	int errs[8];

	NEED_PEER("nbdkit");
	tp_nbdkit(filters, args);
	tp_open(",sync=local");
	assert_op("start");
	for (unsigned i = 0; i < 8; i++) {
		offs[i] = (uint64_t)i * TP_MIB + 4096;
		bufs[i] = tp_pattern(64 * KIB, 40 + i);
	}
	tp_write_many(8, offs, 64 * KIB, bufs, errs);
	for (unsigned i = 0; i < 8; i++) {
		ck_assert_int_eq(errs[i], 0);
		free(bufs[i]);
	}
	assert_op("checkpoint");
	/* No loop iteration since: the barrier itself waited for every write. */
	tp_assert_same();
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RUNNING);
}
END_TEST

/* nbdkit's pause filter: 'p' pauses, 'r' resumes, each acknowledged with a byte. */
static void nbdkit_pause_ctl(const char *ctl, char cmd)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	char c;
	int fd;

	tp_sun(&sun, ctl);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
	ck_assert_int_eq(write(fd, &cmd, 1), 1);
	ck_assert_int_eq(read(fd, &c, 1), 1);
	close(fd);
}

/*
 * sync=local runs ahead of the secondary by at most REPLICA_LOCAL_AHEAD_REQS
 * requests: with the secondary paused, exactly that many guest writes
 * complete; the others wait for it, and complete when it answers.  Then the
 * checkpoint makes both images the same.
 */
START_TEST(t_sync_local_ahead_bounded)
{
	const char *filters[] = { "pause", NULL };
	const unsigned n = REPLICA_LOCAL_AHEAD_REQS + 40;
	char ctl[160], arg[200];
	const char *args[] = { arg, NULL };
	uint64_t *offs = calloc(n, sizeof(*offs));
	char **bufs = calloc(n, sizeof(*bufs));
	int *errs = calloc(n, sizeof(*errs));
	struct tp_batch *b;

	NEED_PEER("nbdkit");
	ck_assert_ptr_nonnull(offs);
	ck_assert_ptr_nonnull(bufs);
	ck_assert_ptr_nonnull(errs);
	snprintf(ctl, sizeof(ctl), "%s/pause.sock", tp_dir);
	snprintf(arg, sizeof(arg), "pause-control=%s", ctl);
	tp_nbdkit(filters, args);
	tp_open(",sync=local,timeout=60000");
	assert_op("start");
	nbdkit_pause_ctl(ctl, 'p');
	for (unsigned i = 0; i < n; i++) {
		offs[i] = (uint64_t)i * 8 * KIB;	/* disjoint: no range-lock waits */
		bufs[i] = tp_pattern(4 * KIB, 500 + i);
	}
	b = tp_batch_write(n, offs, 4 * KIB, bufs);
	tp_batch_run_until(b, REPLICA_LOCAL_AHEAD_REQS);
	/* Nothing more may complete while the secondary is paused. */
	tp_run_for(300);
	ck_assert_uint_eq(tp_batch_done(b), REPLICA_LOCAL_AHEAD_REQS);
	nbdkit_pause_ctl(ctl, 'r');
	finish_and_compare(b, n, bufs, errs);
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RUNNING);
	free(offs);
	free(bufs);
	free(errs);
}
END_TEST

/* ------------------------------------------------------------ broken links */

/* After a break: the guest's data is all local and the state/error say why. */
static void assert_broken(int want_err, const char *needle)
{
	struct replica_status st;
	char msg[512];

	tp_status(&st);
	ck_assert_msg(st.state == REPLICA_STATE_BROKEN, "state %s", replica_state_name(st.state));
	ck_assert_msg(st.error == want_err, "error %d (%s), want %d", st.error, st.error_msg,
		      want_err);
	ck_assert_msg(strstr(st.error_msg, needle), "error '%s' lacks '%s'", st.error_msg, needle);
	ck_assert_uint_gt(st.stats.dirty_bytes, 0);
	ck_assert_uint_ge(st.stats.link_errors, 1);
	ck_assert_int_eq(tp_op("get-error", msg, sizeof(msg)), 0);
	ck_assert_msg(strstr(msg, needle), "get-error '%s' lacks '%s'", msg, needle);
	/* The guest goes on, without the secondary. */
	write_check(9 * TP_MIB, 64 * KIB, 77);
	assert_op_fails("checkpoint", -EINVAL, "broken");
}

START_TEST(t_sigstop)
{
	pid_t peer;

	NEED_PEER("qemu-nbd");
	peer = tp_qemu_nbd("secondary");
	tp_open(",timeout=500");
	assert_op("start");
	write_check(0, 64 * KIB, 1);
	assert_op("checkpoint");
	tp_kill(peer, SIGSTOP);
	write_check(TP_MIB, 256 * KIB, 2);	/* completes: the link times out */
	assert_broken(-ETIMEDOUT, "did not answer");
	write_check(2 * TP_MIB, 4 * KIB, 3);
	tp_kill(peer, SIGCONT);
	/*
	 * Writes the frozen server had queued may still land when it wakes:
	 * give it time to drop the old connection before the resync (see
	 * docs/benchmarks.md, "stale writes").
	 */
	tp_run_for(500);
	assert_op("resync incremental");
	tp_wait_state(REPLICA_STATE_RUNNING);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

START_TEST(t_kill9)
{
	pid_t peer;
	struct replica_status st;

	NEED_PEER("qemu-nbd");
	peer = tp_qemu_nbd("secondary");
	tp_open(",timeout=2000");
	assert_op("start");
	workload(3);
	tp_stop(peer);
	write_check(3 * TP_MIB, 128 * KIB, 4);
	tp_status(&st);
	ck_assert_int_eq(st.state, REPLICA_STATE_BROKEN);
	ck_assert_int_ne(st.error, 0);
	ck_assert_ptr_nonnull(strstr(st.error_msg, "link dropped"));
	write_check(4 * TP_MIB, 4 * KIB, 5);
	tp_qemu_nbd("secondary");
	assert_op("resync incremental");
	tp_wait_state(REPLICA_STATE_RUNNING);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

START_TEST(t_nbdkit_error)
{
	const char *filters[] = { "error", NULL };
	const char *args[] = { "error-pwrite=EIO", "error-pwrite-rate=100%", NULL };

	NEED_PEER("nbdkit");
	tp_nbdkit(filters, args);
	tp_open("");
	assert_op("start");
	write_check(0, 4 * KIB, 1);
	assert_broken(-EIO, "failed a write");
}
END_TEST

START_TEST(t_nbdkit_slow)
{
	const char *filters[] = { "delay", NULL };
	const char *args[] = { "delay-write=3", NULL };

	NEED_PEER("nbdkit");
	tp_nbdkit(filters, args);
	tp_open(",timeout=300");
	assert_op("start");
	write_check(0, 4 * KIB, 1);
	assert_broken(-ETIMEDOUT, "did not answer");
}
END_TEST

START_TEST(t_nbdkit_pause)
{
	const char *filters[] = { "pause", NULL };
	char ctl[160], arg[200];
	const char *args[] = { arg, NULL };

	NEED_PEER("nbdkit");
	snprintf(ctl, sizeof(ctl), "%s/pause.sock", tp_dir);
	snprintf(arg, sizeof(arg), "pause-control=%s", ctl);
	tp_nbdkit(filters, args);
	tp_open(",timeout=300");
	assert_op("start");
	write_check(0, 4 * KIB, 1);
	nbdkit_pause_ctl(ctl, 'p');
	write_check(TP_MIB, 4 * KIB, 2);
	assert_broken(-ETIMEDOUT, "did not answer");
}
END_TEST

static void fake_break(enum tp_fake_mode mode, int want_err, const char *needle)
{
	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open(",timeout=500");
	assert_op("start");
	write_check(0, 4 * KIB, 1);
	tp_fake_set_mode(mode, 1);
	write_check(TP_MIB, 4 * KIB, 2);
	tp_run_for(50);
	assert_broken(want_err, needle);
}

START_TEST(t_fake_garbage)
{
	fake_break(TP_FAKE_GARBAGE, -EPROTO, "link dropped");
}
END_TEST

START_TEST(t_fake_bogus_handle)
{
	fake_break(TP_FAKE_BOGUS_HANDLE, -EPROTO, "link dropped");
}
END_TEST

START_TEST(t_fake_structured)
{
	fake_break(TP_FAKE_STRUCTURED, -EPROTO, "link dropped");
}
END_TEST

/* An error value from the server becomes the link's errno (unknown values: EINVAL). */
START_TEST(t_fake_error_values)
{
	static const struct {
		uint32_t nbd;
		int err;
	} cases[] = { { 28, -ENOSPC }, { 1, -EPERM }, { 108, -ESHUTDOWN }, { 99, -EINVAL } };

	tp_fake_set_error(cases[_i].nbd);
	fake_break(TP_FAKE_ERROR, cases[_i].err, "failed a write of 4096 bytes at offset 1048576");
}
END_TEST

/* A server from before NBD_OPT_GO (and NO_ZEROES): NBD_OPT_EXPORT_NAME, then as usual. */
START_TEST(t_fake_old_server)
{
	struct tp_fake_stats fs;

	tp_fake_start(TP_FAKE_NO_GO, 0);
	tp_open("");
	replicate_and_compare();
	tp_fake_get_stats(&fs);
	ck_assert_uint_eq(fs.connections, 1);
	ck_assert_uint_gt(fs.write_cmds, 0);
	ck_assert_uint_gt(fs.zero_cmds, 0);
	ck_assert_uint_gt(fs.flush_cmds, 0);
}
END_TEST

/*
 * A server whose answer to NBD_OPT_GO is junk (64 seeds): start fails with
 * an error and a message, nothing is left half-connected, and the disk
 * keeps serving.  Under AddressSanitizer (CI) this also checks the
 * client's parsing of what it cannot trust.
 */
START_TEST(t_fake_junk_handshake)
{
	struct replica_status st;
	char msg[512];
	int err;

	tp_fake_start(TP_FAKE_JUNK_HS, (unsigned)_i);
	tp_open(",timeout=300");
	err = tp_op("start", msg, sizeof(msg));
	ck_assert_msg(err < 0, "seed %d: start succeeded against junk", _i);
	ck_assert_msg(strstr(msg, "cannot connect to the secondary"), "seed %d: '%s'", _i, msg);
	tp_status(&st);
	ck_assert_int_eq(st.state, REPLICA_STATE_NONE);
	write_check(0, 4 * KIB, (unsigned)_i);
}
END_TEST

START_TEST(t_fake_silent)
{
	fake_break(TP_FAKE_SILENT, -ETIMEDOUT, "did not answer");
}
END_TEST

START_TEST(t_fake_close)
{
	fake_break(TP_FAKE_CLOSE, -ECONNRESET, "link dropped");
}
END_TEST

/* ------------------------------------------------------------ bad input */

START_TEST(t_refused)
{
	char msg[512];
	int err;

	tp_open("");	/* nothing listens on tp_sock */
	err = tp_op("start", msg, sizeof(msg));
	ck_assert_int_lt(err, 0);
	ck_assert_msg(strstr(msg, "cannot connect"), "%s", msg);
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
	write_check(0, 4 * KIB, 1);
	ck_assert_int_eq(tp_op("get-error", msg, sizeof(msg)), 0);
	ck_assert_msg(strstr(msg, "cannot connect"), "%s", msg);
}
END_TEST

START_TEST(t_bad_export)
{
	char msg[512];
	int err;

	NEED_PEER("qemu-nbd");
	tp_qemu_nbd("other");
	tp_open(",export=nosuch");
	err = tp_op("start", msg, sizeof(msg));
	ck_assert_int_lt(err, 0);
	ck_assert_msg(strstr(msg, "nosuch"), "%s", msg);
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
	write_check(0, 4 * KIB, 1);
}
END_TEST

START_TEST(t_size_mismatch)
{
	NEED_PEER("qemu-nbd");
	ck_assert_int_eq(truncate(tp_sec, DISK / 2), 0);
	tp_qemu_nbd("secondary");
	tp_open("");
	assert_op_fails("start", -EINVAL, "exactly the primary's size");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
	write_check(0, 4 * KIB, 1);
}
END_TEST

START_TEST(t_bad_addr)
{
	tp_open("");
	assert_op_fails("start addr=tcp:secondary.example:10809", -EINVAL, "numeric");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
}
END_TEST

START_TEST(t_states)
{
	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open("");
	assert_op_fails("checkpoint", -EINVAL, "not started");
	assert_op_fails("stop", -EINVAL, "not started");
	assert_op_fails("failover", -EINVAL, "not started");
	assert_op("start");
	assert_op_fails("start", -EINVAL, "already replicating");
	assert_op("checkpoint");
	assert_op("stop");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_DONE);
	assert_op_fails("stop", -EINVAL, "already stopped");
	assert_op_fails("checkpoint", -EINVAL, "state done");
	write_check(0, 4 * KIB, 1);	/* tracked */
	/* A new start only connects: the secondary must be brought up to date. */
	assert_op("start");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_BROKEN);
	assert_op_fails("checkpoint", -EINVAL, "resync");
	assert_op("resync incremental");
	tp_wait_state(REPLICA_STATE_RUNNING);
	assert_op("checkpoint");
	tp_assert_same();
	assert_op("failover");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_DONE);
}
END_TEST

/* ------------------------------------------------------------ resync */

/* After an outage, an incremental resync sends the dirty chunks and nothing else. */
START_TEST(t_resync_incremental_bytes)
{
	struct tp_fake_stats fs;
	struct replica_status st;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open(",timeout=300");
	assert_op("start");
	workload(5);
	assert_op("checkpoint");
	tp_assert_same();
	/* Acknowledged but not flushed: a crashed secondary may have lost it. */
	write_check(12 * TP_MIB, 4 * KIB, 9);		/* chunk 192 */
	tp_fake_set_mode(TP_FAKE_SILENT, 1);
	write_check(0, 4 * KIB, 10);			/* chunk 0; breaks the link */
	tp_status(&st);
	ck_assert_int_eq(st.state, REPLICA_STATE_BROKEN);
	tp_fake_set_mode(TP_FAKE_GOOD, 0);
	write_check(TP_MIB + 4 * KIB, 4 * KIB, 11);	/* chunk 16 */
	write_check(3 * TP_MIB, 4 * KIB, 12);		/* chunk 48 */
	write_check(5 * TP_MIB + 32 * KIB, 128 * KIB, 13);	/* chunks 80-82 */
	tp_status(&st);
	ck_assert_uint_eq(st.stats.dirty_bytes, 7 * 64 * KIB);
	tp_run_for(100);	/* the fake server sees the old connection end */
	tp_fake_reset_stats();
	assert_op("resync");
	tp_wait_state(REPLICA_STATE_RUNNING);
	tp_fake_get_stats(&fs);
	ck_assert_uint_eq(fs.write_bytes, 7 * 64 * KIB);
	ck_assert_uint_eq(fs.zero_bytes, 0);
	tp_status(&st);
	ck_assert_uint_eq(st.stats.dirty_bytes, 0);
	ck_assert_uint_eq(st.progress_done, st.progress_total);
	ck_assert_uint_eq(st.progress_total, 7 * 64 * KIB);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

static void write_file(const char *path, uint64_t off, uint64_t len, unsigned seed)
{
	char *buf = tp_pattern(len, seed);
	int fd = open(path, O_WRONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
	free(buf);
}

static void setup_sparse(void)
{
	/* A 64 MiB sparse local disk with 3 MiB + 64 KiB of data; a secondary full of junk. */
	tp_setup(64 * TP_MIB, 64 * TP_MIB, 1);
	write_file(tp_local, 0, TP_MIB, 1);
	write_file(tp_local, 10 * TP_MIB, 64 * KIB, 2);
	write_file(tp_local, 40 * TP_MIB, 2 * TP_MIB, 3);
}

START_TEST(t_resync_full_sparse)
{
	struct tp_fake_stats fs;
	struct replica_status st;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open("");
	assert_op("start");
	assert_op("resync full");
	tp_wait_state(REPLICA_STATE_RUNNING);
	tp_fake_get_stats(&fs);
	/* The data, and holes zeroed without payload. */
	ck_assert_uint_eq(fs.write_bytes, 3 * TP_MIB + 64 * KIB);
	ck_assert_uint_eq(fs.zero_bytes, 64 * TP_MIB - (3 * TP_MIB + 64 * KIB));
	tp_status(&st);
	ck_assert_uint_eq(st.progress_done, 64ull * TP_MIB);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

/* Guest writes race with a full resync; the result is still byte-exact. */
START_TEST(t_resync_full_with_writes)
{
	unsigned round = 0;

	NEED_PEER("qemu-nbd");
	write_file(tp_local, 0, DISK, 9);
	tp_qemu_nbd("secondary");
	tp_open("");
	assert_op("start");
	assert_op("resync full");
	while (tp_state() == REPLICA_STATE_RESYNC && round < 64) {
		uint64_t offs[8];
		char *bufs[8];
		int errs[8];

		for (unsigned i = 0; i < 8; i++) {
			offs[i] = (uint64_t)((round * 8 + i) * 2654435761u % (DISK / (4 * KIB))) * 4 * KIB;
			bufs[i] = tp_pattern(4 * KIB, 1000 + round * 8 + i);
		}
		tp_write_many(8, offs, 4 * KIB, bufs, errs);
		for (unsigned i = 0; i < 8; i++) {
			ck_assert_int_eq(errs[i], 0);
			free(bufs[i]);
		}
		round++;
	}
	tp_wait_state(REPLICA_STATE_RUNNING);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

/* A resync whose link breaks leaves the primary broken and able to resync again. */
START_TEST(t_resync_broken)
{
	char msg[512];

	tp_fake_start(TP_FAKE_GOOD, 0);
	write_file(tp_local, 0, DISK, 4);
	tp_open(",timeout=1000");
	assert_op("start");
	tp_fake_set_mode(TP_FAKE_SILENT, 3);
	assert_op("resync full");
	tp_wait_state(REPLICA_STATE_BROKEN);
	tp_run_for(100);
	tp_fake_set_mode(TP_FAKE_GOOD, 0);
	ck_assert_int_eq(tp_op("resync incremental", msg, sizeof(msg)), -EINVAL);
	ck_assert_msg(strstr(msg, "resync full"), "%s", msg);
	assert_op("resync full");
	tp_wait_state(REPLICA_STATE_RUNNING);
	assert_op("checkpoint");
	tp_assert_same();
}
END_TEST

static int quiesced;

static void on_quiesced(struct td_disk *disk, void *arg)
{
	quiesced++;
}

/*
 * Closing during a resync: the resync stops, and the close waits for its
 * reads of the local image (which would otherwise land in a closed image's
 * freed state: AddressSanitizer, in CI, sees that).
 */
START_TEST(t_close_during_resync)
{
	struct td_quiesce q = { 0 };
	struct tp_fake_stats fs;
	struct td_image *who;
	uint64_t sent;
	char msg[512];

	tp_fake_start(TP_FAKE_GOOD, 0);
	write_file(tp_local, 0, DISK, 6);
	tp_open("");
	assert_op("start");
	assert_op("resync full");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RESYNC);
	/* The resync's own reads are in flight; no guest request is. */
	ck_assert_uint_eq(tp_disk->inflight, 0);
	ck_assert_uint_gt(td_disk_busy(tp_disk, &who), 0);
	ck_assert_ptr_eq(who, tp_rimg);

	quiesced = 0;
	td_disk_quiesce(tp_disk, &q, on_quiesced, NULL);
	for (int i = 0; i < 10000 && !quiesced; i++)
		tdr_loop_run_once(tp_loop, 100);
	ck_assert_int_eq(quiesced, 1);
	ck_assert_uint_eq(td_disk_busy(tp_disk, NULL), 0);
	/* Stopped, not finished; and nothing new starts. */
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RESYNC);
	tp_fake_get_stats(&fs);
	sent = fs.write_bytes + fs.zero_bytes;
	ck_assert_uint_lt(sent, DISK);
	tp_run_for(100);
	tp_fake_get_stats(&fs);
	ck_assert_uint_eq(fs.write_bytes + fs.zero_bytes, sent);
	ck_assert_int_eq(tp_op("checkpoint", msg, sizeof(msg)), -ESHUTDOWN);
	ck_assert_msg(strstr(msg, "closing"), "%s", msg);
	tp_close();
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("primary");
	TCase *tc;

#define ADD(name, setupfn, fn)                                         \
	tc = tcase_create(name);                                       \
	tcase_add_checked_fixture(tc, setupfn, teardown);              \
	tcase_set_timeout(tc, 120);                                    \
	tcase_add_test(tc, fn);                                        \
	suite_add_tcase(s, tc)

	ADD("qemu-nbd", setup16, t_qemu_nbd);
	ADD("nbdkit", setup16, t_nbdkit);
	ADD("fake-sync-local", setup16, t_fake_sync_local);
	ADD("barrier-slow-acks", setup16, t_barrier_slow_acks);
	ADD("sync-local-ahead-bounded", setup16, t_sync_local_ahead_bounded);
	ADD("sync-local-break", setup16, t_sync_local_break);
	ADD("sigstop", setup16, t_sigstop);
	ADD("kill9", setup16, t_kill9);
	ADD("nbdkit-error", setup16, t_nbdkit_error);
	ADD("nbdkit-slow", setup16, t_nbdkit_slow);
	ADD("nbdkit-pause", setup16, t_nbdkit_pause);
	ADD("fake-garbage", setup16, t_fake_garbage);
	ADD("fake-bogus-handle", setup16, t_fake_bogus_handle);
	ADD("fake-structured", setup16, t_fake_structured);
	ADD("fake-old-server", setup16, t_fake_old_server);
	ADD("fake-silent", setup16, t_fake_silent);
	tc = tcase_create("fake-junk-handshake");
	tcase_add_checked_fixture(tc, setup16, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_loop_test(tc, t_fake_junk_handshake, 0, 64);
	suite_add_tcase(s, tc);
	tc = tcase_create("fake-error-values");
	tcase_add_checked_fixture(tc, setup16, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_loop_test(tc, t_fake_error_values, 0, 4);
	suite_add_tcase(s, tc);
	ADD("fake-close", setup16, t_fake_close);
	ADD("refused", setup16, t_refused);
	ADD("link-socket-buffer", setup16, t_link_socket_buffer);
	ADD("bad-export", setup16, t_bad_export);
	ADD("size-mismatch", setup16, t_size_mismatch);
	ADD("bad-addr", setup16, t_bad_addr);
	ADD("zerocopy-blocked", setup16, t_zerocopy_blocked);
	ADD("zerocopy-off", setup16, t_zerocopy_off);
	ADD("states", setup16, t_states);
	ADD("resync-incremental-bytes", setup16, t_resync_incremental_bytes);
	ADD("resync-full-sparse", setup_sparse, t_resync_full_sparse);
	ADD("resync-full-with-writes", setup16, t_resync_full_with_writes);
	ADD("resync-broken", setup16, t_resync_broken);
	ADD("close-during-resync", setup16, t_close_during_resync);
#undef ADD
	return s;
}

int main(void)
{
	tdr_log_init("test-primary", false, TDR_LOG_WARN);
	return check_run(suite(), CHECK_RUN_FORK);
}
