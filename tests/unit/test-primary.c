/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the primary mode against real peers (qemu-nbd, nbdkit and
 * its delay/error/pause filters) and an in-process NBD server that
 * misbehaves on demand: forwarding, byte-exact checkpoints, broken links
 * (bounded completion, state, error), bad input, and resync; and a
 * randomized model of all of it (case "model", CK_RUN_CASE=model).
 *
 * Timing is never asserted, only that requests complete before a generous
 * deadline; latencies belong to tests/bench/primary.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "test-primary-peer.h"
#include "tdr/log.h"
#include "tdr/nbd.h"
#include "tdr/vhd.h"
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

	tp_open("");	/* nothing listens on tp_sock: there is no such socket */
	err = tp_op("start", msg, sizeof(msg));
	ck_assert_int_eq(err, -ENOENT);
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
	ck_assert_int_eq(err, -ENOENT);
	ck_assert_msg(strstr(msg, "nosuch"), "%s", msg);
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
	write_check(0, 4 * KIB, 1);
}
END_TEST

/*
 * A start whose connection fails after the request was accepted (here the
 * secondary refuses the export in the handshake) leaves the options as they
 * were, as a start refused at once does: a plain start then uses the spec's
 * export again and replicates.
 */
START_TEST(t_failed_start_keeps_options)
{
	NEED_PEER("qemu-nbd");
	tp_qemu_nbd("secondary");
	tp_open("");
	assert_op_fails("start export=nosuch", -ENOENT, "nosuch");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_NONE);
	replicate_and_compare();	/* a plain start: the spec's export */
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

/* ------------------------------------------------------------ model test */

/*
 * A randomized model of the primary, the counterpart of the secondary's
 * in test-replica-secondary.c: batches of concurrent guest writes,
 * write-zeroes, discards and reads; checkpoints, some begun with a batch
 * in flight and more requests submitted behind them; broken links with
 * writes in flight (the secondary closes the connection, is killed, fails
 * a write; or stop and failover), the guest writing on; crashes of the
 * secondary that lose what it had not flushed; resyncs (some broken in
 * turn, some begun with guest requests in flight) with the guest writing
 * through them.  Every guest read, and the images, are checked byte for
 * byte against an in-memory model.
 *
 * Two secondaries take turns: the fake server, which answers in order (so
 * the test knows which writes a checkpoint covers), and nbdkit with writes
 * slower than its FLUSH, which answers out of order (so a FLUSH sent
 * before the barrier would complete before the writes it must cover).
 *
 * TDR_MODEL_SEED picks another sequence (the default is the one make
 * check runs); TDR_MODEL_VERBOSE=1 prints what each round does.
 */

#define MDISK  (4u * TP_MIB)
#define MSECS  (MDISK / 512u)
#define MCHUNK 128u		/* sectors of the primary's dirty-set chunk (64 KiB) */
#define MDEADLINE_NS (60ull * 1000000000ull)

enum {
	MROUNDS = 400,
	MSEGMENTS = 16,		/* a link break in each sixteenth of the rounds */
	MAX_A = 8,		/* a batch */
	MAX_B = 4,		/* submitted behind a checkpoint */
};

/* busy[]: what the round has in flight over a sector. */
#define BUSY_R 1u	/* a read: nothing may write there */
#define BUSY_W 2u	/* a write: nothing may read there; later writes queue behind it */
#define BUSY_X 4u	/* a FAST_ZERO write-zeroes, which may be refused: nothing else there */

/*
 * How the link breaks: the secondary goes away or fails writes with
 * writes in flight; stop (or failover) with writes in flight; or the
 * fake server fails a checkpoint's FLUSH (sync=both, nothing else in
 * flight), when what it was to cover is still only unflushed.
 */
enum mbreak { MBRK_NONE, MBRK_CLOSE, MBRK_ERROR, MBRK_STOP, MBRK_FLUSH };

/* What submit_op() makes up. */
enum mkind { MK_ANY, MK_WRITE, MK_READ };

enum mpeer { MPEER_FAKE, MPEER_NBDKIT };

/*
 * When a link break comes: at a random round; in the round after a
 * checkpoint begun with writes behind it (which the primary must count as
 * unflushed); or as soon as a resync is done, before any checkpoint (its
 * copies are unflushed too).  The last two always crash the secondary.
 */
enum mstyle { MSTYLE_RANDOM, MSTYLE_AFTER_CKPT, MSTYLE_AFTER_RESYNC };

struct mop {
	struct td_request req;
	bool done;
	int err;
	char *buf;		/* WRITE: the data; READ: where it lands */
	char *want;		/* READ: the model when it was submitted */
	char *old;		/* FAST_ZERO: the model before it, should it be refused */
};

struct mres {
	bool done;
	int err;
	char msg[512];
};

struct mstate {
	unsigned seed, rng;
	int round;
	bool verbose;
	char *model;		/* the local disk: what every guest read must return */
	/*
	 * The model without the writes that a checkpoint in flight may not
	 * cover (late[] and unsure[]): what its FLUSH surely makes durable.
	 */
	char *cmodel;
	char *flushed;		/* the secondary's content at its last good checkpoint... */
	unsigned char *keep;	/* ... but these sectors, which a crash leaves as they are */
	char *img;		/* an image read back */
	unsigned char *busy;	/* BUSY_* of this round's requests */
	/*
	 * Written by a request that a checkpoint begun this round does not
	 * cover (late), or may cover or not (unsure).  The primary counts
	 * the first as unflushed; the second may be durable.
	 */
	unsigned char *late, *unsure;
	unsigned char *skip;	/* sectors a comparison leaves out */
	unsigned char *pending;	/* sync=local: a write's secondary half may still be out */
	bool sync_local;
	bool need_full;		/* a full resync broke: the next one must be full */
	enum mpeer peer;
	pid_t pid;		/* nbdkit's, 0 when it is not running */
	char inject[160];	/* nbdkit fails every request while this file exists */
	int broken_left;	/* rounds to go on without the secondary */
	int resync_for;		/* rounds the current resync has run */
	bool crash_next;	/* the secondary crashes before it comes back */
	bool resync_mid;	/* the next resync begins with guest requests in flight */
	int seg, next_break, style_off, mech_off;
	enum mstyle style;
	bool primed;		/* MSTYLE_AFTER_CKPT: the checkpoint before the break is done */
	bool hold_ckpt;		/* MSTYLE_AFTER_RESYNC: no checkpoint until the break */
	bool race_next;		/* the next close/error break races a checkpoint */
	struct mop ops[MAX_A + MAX_B];
	int nops;
	/* What happened: the test must not pass by doing nothing. */
	int checkpoints, inflight_ckpts, inflight_at_ckpt, racing_ckpts;
	int link_breaks, flush_breaks, stops, crashes, fake_peers, nbdkit_peers;
	int resyncs, full_resyncs, resync_breaks, resync_rounds, inflight_at_resync;
	int refusals, reads, writes, zeroes, zero_refused;
};

static unsigned mrand(struct mstate *m)
{
	return (unsigned)rand_r(&m->rng);
}

__attribute__((format(printf, 2, 3)))
static void note(const struct mstate *m, const char *fmt, ...)
{
	va_list ap;

	if (!m->verbose)
		return;
	fprintf(stderr, "model seed %u round %d: ", m->seed, m->round);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static char *model_alloc(size_t len)
{
	char *p = tdr_io_alloc(len);

	ck_assert_ptr_nonnull(p);
	return p;
}

static bool range_has(const unsigned char *map, uint64_t sec, uint32_t secs, unsigned bits)
{
	for (uint64_t s = sec; s < sec + secs; s++)
		if (map[s] & bits)
			return true;
	return false;
}

static void range_or(unsigned char *map, uint64_t sec, uint32_t secs, unsigned bits)
{
	for (uint64_t s = sec; s < sec + secs; s++)
		map[s] |= (unsigned char)bits;
}

static void model_io_done(struct td_request *req, int err, void *arg)
{
	struct mop *x = arg;

	(void)req;
	x->done = true;
	x->err = err;
}

static void mres_done(void *arg, int err, const char *msg)
{
	struct mres *res = arg;

	res->done = true;
	res->err = err;
	snprintf(res->msg, sizeof(res->msg), "%s", msg ? msg : "");
}

/* Starts an operation without waiting for it: requests may follow it in. */
static void mres_begin(struct mstate *m, const char *line, struct mres *res)
{
	struct replica_cmd cmd;
	char msg[256];

	memset(res, 0, sizeof(*res));
	ck_assert_msg(replica_parse(line, &cmd, msg, sizeof(msg)) == 0,
		      "seed %u, round %d: parse '%s': %s", m->seed, m->round, line, msg);
	replica_execute(tp_rimg, &cmd, mres_done, res);
}

/* Runs the loop until res (if any) is done and, if all, every request of the round. */
static void model_run(struct mstate *m, const struct mres *res, bool all)
{
	uint64_t t0 = tdr_now_ns();

	for (;;) {
		bool done = !res || res->done;

		for (int i = 0; all && done && i < m->nops; i++)
			done = m->ops[i].done;
		if (done)
			return;
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < MDEADLINE_NS,
			      "seed %u, round %d: %s never completed", m->seed, m->round,
			      res && !res->done ? "an operation" : "a guest request");
	}
}

static int model_op_msg(struct mstate *m, const char *line, char *msg, size_t msglen)
{
	struct mres res;

	mres_begin(m, line, &res);
	model_run(m, &res, false);
	snprintf(msg, msglen, "%s", res.msg);
	note(m, "%s: %d %s", line, res.err, res.msg);
	return res.err;
}

static void model_op(struct mstate *m, const char *line)
{
	char msg[512];
	int err = model_op_msg(m, line, msg, sizeof(msg));

	ck_assert_msg(err == 0, "seed %u, round %d: '%s' failed: %d %s", m->seed, m->round, line,
		      err, msg);
}

/* A resync refused while the last one winds down (its copies finishing) is tried again. */
static int model_resync_op(struct mstate *m, const char *line, char *msg, size_t msglen)
{
	uint64_t t0 = tdr_now_ns();
	int err;

	while ((err = model_op_msg(m, line, msg, msglen)) == -EBUSY &&
	       strstr(msg, "winding down")) {
		ck_assert_msg(tdr_now_ns() - t0 < MDEADLINE_NS,
			      "seed %u, round %d: the last resync never wound down", m->seed,
			      m->round);
		tp_run_for(5);
	}
	return err;
}

static void model_wait_state(struct mstate *m, enum replica_state s)
{
	uint64_t t0 = tdr_now_ns();

	while (tp_state() != s) {
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < MDEADLINE_NS,
			      "seed %u, round %d: state never became %s (is %s)", m->seed, m->round,
			      replica_state_name(s), replica_state_name(tp_state()));
	}
}

static void read_image(struct mstate *m, const char *path)
{
	int fd = open(path, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, m->img, MDISK, 0), (ssize_t)MDISK);
	close(fd);
}

/*
 * Fails unless the image file at path holds want, but for the sectors
 * skip marks (NULL: none).  what says which image and when.
 */
static void assert_image(struct mstate *m, const char *path, const char *want,
			 const unsigned char *skip, const char *what)
{
	read_image(m, path);
	if (!skip && memcmp(m->img, want, MDISK) == 0)
		return;
	for (uint64_t s = 0; s < MSECS; s++) {
		uint64_t e = s;

		if ((skip && skip[s]) || memcmp(m->img + s * 512, want + s * 512, 512) == 0)
			continue;
		while (e + 1 < MSECS && memcmp(m->img + (e + 1) * 512, want + (e + 1) * 512, 512))
			e++;
		for (uint64_t b = s * 512;; b++)
			if (m->img[b] != want[b])
				ck_abort_msg("seed %u, round %d: %s differs from the model at byte %llu (chunk %llu; sectors %llu-%llu differ)",
					     m->seed, m->round, what, (unsigned long long)b,
					     (unsigned long long)(s / MCHUNK),
					     (unsigned long long)s, (unsigned long long)e);
	}
}

/* ---------------------------------------------------- model: the peers */

static void peer_start(struct mstate *m, enum mpeer peer)
{
	m->peer = peer;
	if (peer == MPEER_FAKE) {
		tp_fake_start(TP_FAKE_GOOD, 0);
		m->fake_peers++;
	} else {
		/* Errors only while the inject file exists; FLUSH (fua) a no-op. */
		static const char *const filters[] = { "error", "delay", "fua", NULL };
		char errfile[200];
		const char *args[] = { "delay-write=2ms", "delay-zero=2ms", "delay-trim=2ms",
				       "fuamode=discard", "error=EIO", "error-rate=100%", errfile,
				       NULL };

		snprintf(errfile, sizeof(errfile), "error-file=%s", m->inject);
		m->pid = tp_nbdkit(filters, args);
		m->nbdkit_peers++;
	}
	note(m, "secondary: %s", peer == MPEER_FAKE ? "the fake server" : "nbdkit");
}

/*
 * Stops the secondary.  The link is down: the fake server has seen its
 * connection end (it serves one at a time, so nothing of an old one
 * lands after a new one began); nbdkit is killed for the same reason, its
 * writes still in the delay filter die with it.
 */
static void peer_stop(struct mstate *m)
{
	if (m->peer == MPEER_FAKE) {
		tp_fake_stop();
	} else {
		tp_stop(m->pid);
		m->pid = 0;
	}
	unlink(m->inject);
}

static void inject_errors(struct mstate *m)
{
	int fd = open(m->inject, O_CREAT | O_WRONLY, 0600);

	ck_assert_int_ge(fd, 0);
	close(fd);
}

/*
 * Before the batch (or the FLUSH): the fake server answers the next
 * request it reads (one of the batch's, or older) badly; nbdkit fails
 * every write.
 */
static void peer_arm(struct mstate *m, enum mbreak brk)
{
	if (m->peer == MPEER_FAKE)
		tp_fake_set_mode(brk == MBRK_CLOSE ? TP_FAKE_CLOSE : TP_FAKE_ERROR, 1);
	else if (brk == MBRK_ERROR)
		inject_errors(m);
}

/* After the batch: nbdkit dies with it in flight. */
static void peer_fire(struct mstate *m, enum mbreak brk)
{
	if (m->peer == MPEER_NBDKIT && brk == MBRK_CLOSE) {
		tp_stop(m->pid);
		m->pid = 0;
	}
}

/* ----------------------------------------------------- model: requests */

/* A range: mostly small or unaligned, some of 64 KiB and more (spliced), some whole chunks. */
static uint32_t pick_range(struct mstate *m, uint64_t *sec)
{
	unsigned kind = mrand(m) % 7;
	uint32_t secs;

	if (kind < 2)
		secs = 1 + mrand(m) % 8;
	else if (kind < 4)
		secs = 8 + mrand(m) % 120;
	else if (kind < 6)
		secs = 128 + mrand(m) % 385;
	else
		secs = MCHUNK * (1 + mrand(m) % 4);
	*sec = kind < 6 ? mrand(m) % MSECS : (uint64_t)(mrand(m) % (MSECS / MCHUNK)) * MCHUNK;
	if (*sec + secs > MSECS)
		*sec = MSECS - secs;
	return secs;
}

/*
 * Makes up one guest request and submits it, or returns false when it
 * would overlap what it must not: a read and a write in flight over the
 * same sector may return either content.  Writes may overlap writes: the
 * primary applies them in submission order, as the model does.
 *
 * MK_WRITE: a plain WRITE, which the secondary gets at once (a link
 * break needs one).  behind: submitted after a checkpoint began.
 */
static bool submit_op(struct mstate *m, enum mkind want, bool behind)
{
	struct mop *x = &m->ops[m->nops];
	unsigned kind = want == MK_WRITE ? 0 : want == MK_READ ? 19 : mrand(m) % 20;
	enum td_op op = TD_OP_READ;
	unsigned flags = 0, conflict, mark;
	uint64_t sec;
	uint32_t secs = pick_range(m, &sec);
	size_t off, len;

	/*
	 * The write a break needs is sent at once, before the checkpoint
	 * that races the break.  At sync=local, one over a write whose
	 * secondary half may still be out would wait for the range lock and
	 * go after the checkpoint's FLUSH, which could then rightly succeed
	 * (seed 5023 did, one run in four): place it elsewhere.
	 */
	for (int t = 0; want == MK_WRITE && m->sync_local && t < 64 &&
			range_has(m->pending, sec, secs, 1); t++)
		secs = pick_range(m, &sec);
	off = (size_t)sec * 512;
	len = (size_t)secs * 512;

	if (kind < 10) {
		op = TD_OP_WRITE;
	} else if (kind < 12) {
		static const unsigned zflags[] = { 0, TD_REQ_NO_HOLE, TD_REQ_FAST_ZERO,
						   TD_REQ_FAST_ZERO | TD_REQ_NO_HOLE };

		op = TD_OP_WRITE_ZEROES;
		flags = zflags[mrand(m) % 4];
	} else if (kind < 13) {
		op = TD_OP_DISCARD;	/* zeroes on both sides (the local image can) */
	}
	if (op == TD_OP_READ) {
		conflict = BUSY_W | BUSY_X;
		mark = BUSY_R;
	} else if (flags & TD_REQ_FAST_ZERO) {
		conflict = BUSY_R | BUSY_W | BUSY_X;
		mark = BUSY_X;
	} else {
		conflict = BUSY_R | BUSY_X;
		mark = BUSY_W;
	}
	if (range_has(m->busy, sec, secs, conflict))
		return false;
	memset(x, 0, sizeof(*x));
	if (op != TD_OP_READ) {
		/*
		 * What a checkpoint begun after this write covers: the writes
		 * sent to the secondary before it began.  Not one behind it,
		 * nor one the range lock holds behind an overlapping write of
		 * the batch (sent once that one is done).  With answers in
		 * order these are sent after every covered write, so the FLUSH
		 * goes while they are in flight or before they are sent, and
		 * the primary must count them as unflushed.  Unsure: a
		 * FAST_ZERO (sent when its local half is done, which may be at
		 * once), at sync=local a write over one whose secondary half
		 * may still be out (and hold the lock), and with answers out
		 * of order any write the FLUSH does not wait for.
		 */
		bool late = behind || range_has(m->busy, sec, secs, BUSY_W);

		if (late && m->peer == MPEER_FAKE)
			range_or(m->late, sec, secs, 1);
		else if (late || (flags & TD_REQ_FAST_ZERO) ||
			 (m->sync_local && range_has(m->pending, sec, secs, 1)))
			range_or(m->unsure, sec, secs, 1);
		if (m->sync_local)
			range_or(m->pending, sec, secs, 1);
	}
	range_or(m->busy, sec, secs, mark);
	if (op == TD_OP_READ) {
		x->buf = model_alloc(len);
		x->want = malloc(len);
		ck_assert_ptr_nonnull(x->want);
		memcpy(x->want, m->model + off, len);
		m->reads++;
	} else if (op == TD_OP_WRITE) {
		x->buf = tp_pattern(len, mrand(m));
		memcpy(m->model + off, x->buf, len);
		if (!range_has(m->late, sec, secs, 1) && !range_has(m->unsure, sec, secs, 1))
			memcpy(m->cmodel + off, x->buf, len);
		m->writes++;
	} else {
		if (flags & TD_REQ_FAST_ZERO) {
			x->old = malloc(len);
			ck_assert_ptr_nonnull(x->old);
			memcpy(x->old, m->model + off, len);
		}
		memset(m->model + off, 0, len);
		if (!range_has(m->late, sec, secs, 1) && !range_has(m->unsure, sec, secs, 1))
			memset(m->cmodel + off, 0, len);
		m->zeroes++;
	}
	td_request_init(&x->req, op, sec, secs, x->buf, model_io_done, x);
	x->req.flags = flags;
	m->nops++;
	note(m, "  %s%s %llu+%u%s", behind ? "behind the checkpoint: " : "",
	     op == TD_OP_READ ? "read" : op == TD_OP_WRITE ? "write" :
	     op == TD_OP_DISCARD ? "discard" : "zero",
	     (unsigned long long)sec, secs, flags & TD_REQ_FAST_ZERO ? " fast" : "");
	td_disk_submit(tp_disk, &x->req);
	return true;
}

static int ops_in_flight(const struct mstate *m)
{
	int n = 0;

	for (int i = 0; i < m->nops; i++)
		n += !m->ops[i].done;
	return n;
}

/* Every guest request succeeds, broken link or not, and every read returns the model. */
static void finish_ops(struct mstate *m)
{
	for (int i = 0; i < m->nops; i++) {
		struct mop *x = &m->ops[i];
		size_t off = (size_t)x->req.sec * 512, len = (size_t)x->req.secs * 512;

		if (x->old && (x->err == -ENOTSUP || x->err == -EOPNOTSUPP)) {
			/* Not cheap here: a FAST_ZERO may say so, and then nothing changed. */
			memcpy(m->model + off, x->old, len);
			m->zero_refused++;
		} else {
			ck_assert_msg(x->err == 0,
				      "seed %u, round %d: guest request %d (op %d, %u sectors at %llu) failed: %d",
				      m->seed, m->round, i, (int)x->req.op, x->req.secs,
				      (unsigned long long)x->req.sec, x->err);
		}
		if (x->want)
			ck_assert_msg(memcmp(x->buf, x->want, len) == 0,
				      "seed %u, round %d: guest read of %u sectors at %llu differs from the model",
				      m->seed, m->round, x->req.secs,
				      (unsigned long long)x->req.sec);
		free(x->buf);
		free(x->want);
		free(x->old);
	}
	m->nops = 0;
	/* The late writes are done: the next checkpoint covers them. */
	for (uint64_t s = 0; s < MSECS; s++)
		if (m->late[s] || m->unsure[s])
			memcpy(m->cmodel + s * 512, m->model + s * 512, 512);
	memset(m->late, 0, MSECS);
	memset(m->unsure, 0, MSECS);
	memset(m->busy, 0, MSECS);
	/* sync=both: a completed write is on the secondary, nothing of it is still out. */
	if (!m->sync_local)
		memset(m->pending, 0, MSECS);
}

/* ----------------------------------------------- model: the operations */

/* A checkpoint succeeded: what it covered is durable on the secondary. */
static void checkpoint_done(struct mstate *m)
{
	memcpy(m->flushed, m->cmodel, MDISK);
	memcpy(m->keep, m->unsure, MSECS);
	/* sync=local: what it did not cover may still be on its way. */
	for (uint64_t s = 0; s < MSECS; s++)
		m->pending[s] = m->late[s] | m->unsure[s];
	m->checkpoints++;
}

/*
 * The secondary's host went down: its disk keeps only what the last
 * successful checkpoint flushed (the worst a crash may do), and what it
 * may have flushed stays as it is.  The primary counted everything sent
 * since as unflushed, and must send it again.
 */
static void crash_secondary(struct mstate *m)
{
	int fd;

	read_image(m, tp_sec);
	for (uint64_t s = 0; s < MSECS; s++)
		if (!m->keep[s])
			memcpy(m->img + s * 512, m->flushed + s * 512, 512);
	fd = open(tp_sec, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, m->img, MDISK, 0), (ssize_t)MDISK);
	close(fd);
	m->crashes++;
}

/*
 * A secondary comes back: after a crash, or as another process (mostly
 * of the other kind), or the same one well again; after stop, start
 * connects.
 */
static void peer_back(struct mstate *m)
{
	if (m->crash_next || m->peer == MPEER_NBDKIT || mrand(m) % 2) {
		bool other = mrand(m) % 3;

		note(m, "%s", m->crash_next ? "the secondary crashed" : "a new secondary");
		peer_stop(m);
		if (m->crash_next)
			crash_secondary(m);
		peer_start(m, (m->peer == MPEER_FAKE) == other ? MPEER_NBDKIT : MPEER_FAKE);
	} else {
		note(m, "the secondary is well again");
		tp_fake_set_mode(TP_FAKE_GOOD, 0);
	}
	m->crash_next = false;
	if (tp_state() == REPLICA_STATE_DONE) {
		/* After stop: start only connects (and may change sync=); still broken. */
		unsigned s = mrand(m) % 3;

		model_op(m, s == 0 ? "start" : s == 1 ? "start sync=both" : "start sync=local");
		if (s)
			m->sync_local = s == 2;
		ck_assert_msg(tp_state() == REPLICA_STATE_BROKEN,
			      "seed %u, round %d: start after stop: state %s", m->seed, m->round,
			      replica_state_name(tp_state()));
	}
}

/*
 * Resyncs, some breaking in turn at their first request; final: none
 * breaks.  mid: guest requests are in flight, which a full resync's scan
 * may see as holes.
 */
static void model_resync(struct mstate *m, bool final, bool mid)
{
	struct replica_status st;
	char msg[512];
	int err;

	for (;;) {
		bool full = m->need_full || mrand(m) % (mid ? 2 : 5) == 0;
		const char *line = full ? "resync full" :
				   mrand(m) % 2 ? "resync" : "resync incremental";
		bool brk;

		if (m->need_full) {
			err = model_resync_op(m, "resync incremental", msg, sizeof(msg));
			ck_assert_msg(err == -EINVAL && strstr(msg, "resync full"),
				      "seed %u, round %d: resync incremental after a broken full one: %d %s",
				      m->seed, m->round, err, msg);
			m->refusals++;
		}
		tp_status(&st);
		/* Only a resync with something to send can break. */
		brk = !final && mrand(m) % 4 == 0 && (full || st.stats.dirty_bytes > 0);
		if (brk)
			peer_arm(m, m->peer == MPEER_FAKE && mrand(m) % 2 ? MBRK_CLOSE :
										     MBRK_ERROR);
		err = model_resync_op(m, line, msg, sizeof(msg));
		ck_assert_msg(err == 0, "seed %u, round %d: '%s' failed: %d %s", m->seed, m->round,
			      line, err, msg);
		m->resyncs++;
		m->full_resyncs += full;
		if (!brk)
			break;
		model_wait_state(m, REPLICA_STATE_BROKEN);
		note(m, "the resync broke");
		m->link_breaks++;
		m->resync_breaks++;
		m->need_full = full;
		memset(m->pending, 0, MSECS);
		if (m->peer == MPEER_FAKE) {
			tp_fake_set_mode(TP_FAKE_GOOD, 0);
		} else {
			peer_stop(m);
			peer_start(m, MPEER_NBDKIT);
		}
	}
	/* This one does not break: it finishes. */
	m->need_full = false;
	m->resync_for = 0;
}

/* A checkpoint in a state that cannot take one is refused. */
static void assert_refused(struct mstate *m, enum replica_state s)
{
	char msg[512];
	int err = model_op_msg(m, "checkpoint", msg, sizeof(msg));
	int want = s == REPLICA_STATE_RESYNC ? -EBUSY : -EINVAL;
	const char *needle = s == REPLICA_STATE_RESYNC ? "resync in progress" :
			     s == REPLICA_STATE_DONE ? "state done" : "broken";

	ck_assert_msg(err == want && strstr(msg, needle),
		      "seed %u, round %d: checkpoint in state %s: %d '%s', want %d and '%s'",
		      m->seed, m->round, replica_state_name(s), err, msg, want, needle);
	m->refusals++;
}

static void plan_break(struct mstate *m)
{
	int seg_len = MROUNDS / MSEGMENTS;

	m->style = (enum mstyle)((m->seg + m->style_off) % 3);
	m->primed = false;
	m->hold_ckpt = m->style == MSTYLE_AFTER_RESYNC && m->seg < MSEGMENTS;
	if (m->style == MSTYLE_AFTER_RESYNC)
		m->next_break = m->round + 1;	/* the first round running again */
	else
		m->next_break = m->seg * seg_len + 2 + (int)(mrand(m) % (unsigned)(seg_len / 2));
	if (m->next_break <= m->round)
		m->next_break = m->round + 1;
}

/* ------------------------------------------------------ model: a round */

static void model_round(struct mstate *m)
{
	enum mbreak brk = MBRK_NONE;
	struct mres ck = { .done = true };
	bool ckpt = false, prime = false, prime_reads, resync_mid = false;
	enum replica_state st = tp_state();

	if ((st == REPLICA_STATE_BROKEN || st == REPLICA_STATE_DONE) && m->broken_left-- <= 0) {
		peer_back(m);
		resync_mid = m->resync_mid;
		m->resync_mid = !m->resync_mid;
		if (!resync_mid)
			model_resync(m, false, false);
		st = tp_state();
	}
	if (st == REPLICA_STATE_RESYNC) {
		m->resync_rounds++;
		/* Guest requests race the copies for a few rounds; then it may finish. */
		if (++m->resync_for > 3) {
			model_wait_state(m, REPLICA_STATE_RUNNING);
			st = REPLICA_STATE_RUNNING;
		}
	}
	if (st == REPLICA_STATE_RUNNING && m->round >= m->next_break && m->seg < MSEGMENTS) {
		if (m->style == MSTYLE_AFTER_CKPT && !m->primed) {
			ckpt = prime = m->primed = true;
		} else {
			static const enum mbreak mechs[] = { MBRK_CLOSE, MBRK_FLUSH, MBRK_ERROR,
							     MBRK_STOP };

			brk = mechs[(m->seg + m->mech_off) % 4];
			/* A failed FLUSH needs the fake server (nbdkit's never fail), sync=both. */
			if (brk == MBRK_FLUSH && (m->peer != MPEER_FAKE || m->sync_local))
				brk = MBRK_CLOSE;
			m->crash_next = m->style != MSTYLE_RANDOM || mrand(m) % 2;
			m->seg++;
			plan_break(m);
		}
	} else if (st == REPLICA_STATE_RUNNING && !m->hold_ckpt && mrand(m) % 5 == 0) {
		ckpt = true;
	}
	note(m, "state %s%s%s%s", replica_state_name(st),
	     brk == MBRK_CLOSE ? ", the secondary goes away" :
	     brk == MBRK_ERROR ? ", the secondary fails writes" :
	     brk == MBRK_STOP ? ", stop with writes in flight" :
	     brk == MBRK_FLUSH ? ", the secondary fails a FLUSH" : "",
	     m->crash_next ? " (and crashes)" : "", ckpt ? ", checkpoint in flight" : "");

	/* Armed first, so that the next request the fake server reads is one of these. */
	if (brk == MBRK_CLOSE || brk == MBRK_ERROR)
		peer_arm(m, brk);
	/*
	 * A break needs a write to the secondary.  Half the checkpoints before
	 * a break have no write to wait for: their FLUSH goes at once, and
	 * the writes behind it are sent after it.
	 */
	prime_reads = prime && mrand(m) % 2;
	for (unsigned i = 0, n = 1 + mrand(m) % MAX_A; i < n; i++)
		submit_op(m, brk != MBRK_NONE && i == 0 ? MK_WRITE : prime_reads ? MK_READ : MK_ANY,
			  false);

	if (resync_mid) {
		m->inflight_at_resync += ops_in_flight(m);
		model_resync(m, false, true);
	}
	if (brk == MBRK_STOP) {
		static const char *const words[] = { "stop", "stop failover", "failover" };

		ck_assert_int_gt(ops_in_flight(m), 0);
		model_op(m, words[mrand(m) % 3]);
		ck_assert_int_eq(tp_state(), REPLICA_STATE_DONE);
		m->stops++;
	} else if ((brk == MBRK_CLOSE || brk == MBRK_ERROR) && m->race_next) {
		/* A checkpoint whose barrier waits for a write the link never answers. */
		ckpt = true;
	}
	if (brk == MBRK_CLOSE || brk == MBRK_ERROR)
		m->race_next = !m->race_next;
	if (ckpt) {
		int inflight = ops_in_flight(m);
		unsigned nb = prime ? 1 + mrand(m) % MAX_B : mrand(m) % (MAX_B + 1);

		mres_begin(m, "checkpoint", &ck);
		/* Before a break: writes whose chunks the primary must count as unflushed. */
		for (unsigned i = 0; i < nb; i++)
			submit_op(m, prime ? MK_WRITE : MK_ANY, true);
		peer_fire(m, brk);
		model_run(m, &ck, false);
		note(m, "checkpoint with %d of %d requests in flight: %d %s", inflight, m->nops,
		     ck.err, ck.msg);
		if (brk != MBRK_NONE) {
			ck_assert_msg(ck.err < 0,
				      "seed %u, round %d: a checkpoint succeeded while the link broke",
				      m->seed, m->round);
			m->racing_ckpts++;
		} else {
			ck_assert_msg(ck.err == 0,
				      "seed %u, round %d: checkpoint with requests in flight failed: %d %s",
				      m->seed, m->round, ck.err, ck.msg);
			/* Every write sent before it is on the secondary; the others may be. */
			for (uint64_t s = 0; s < MSECS; s++)
				m->skip[s] = m->late[s] | m->unsure[s];
			assert_image(m, tp_sec, m->model, m->skip,
				     "the secondary after a checkpoint in flight");
			checkpoint_done(m);
			m->inflight_ckpts++;
			m->inflight_at_ckpt += inflight;
		}
	} else {
		peer_fire(m, brk);
	}
	model_run(m, NULL, true);
	finish_ops(m);

	if (brk == MBRK_FLUSH) {
		struct mres fl;

		/* Nothing is in flight (sync=both): the FLUSH is the next request. */
		peer_arm(m, mrand(m) % 2 ? MBRK_CLOSE : MBRK_ERROR);
		mres_begin(m, "checkpoint", &fl);
		model_run(m, &fl, false);
		note(m, "checkpoint: %d %s", fl.err, fl.msg);
		ck_assert_msg(fl.err < 0,
			      "seed %u, round %d: a checkpoint succeeded with its FLUSH failed",
			      m->seed, m->round);
		m->flush_breaks++;
	}
	if (brk == MBRK_CLOSE || brk == MBRK_ERROR || brk == MBRK_FLUSH) {
		struct replica_status rs;

		model_wait_state(m, REPLICA_STATE_BROKEN);
		tp_status(&rs);
		ck_assert_msg(rs.error < 0 && strstr(rs.error_msg, "link dropped"),
			      "seed %u, round %d: broken link: error %d '%s'", m->seed, m->round,
			      rs.error, rs.error_msg);
		m->link_breaks++;
	}
	if (brk != MBRK_NONE) {
		struct replica_status rs;

		/* What was in flight, and what was not flushed (a write at least), goes again. */
		tp_status(&rs);
		ck_assert_msg(rs.stats.dirty_bytes > 0,
			      "seed %u, round %d: a break left nothing dirty (writes were in flight or unflushed)",
			      m->seed, m->round);
		memset(m->pending, 0, MSECS);	/* the link is gone: nothing of it is out */
		m->broken_left = (int)(mrand(m) % 5);
	}

	st = tp_state();
	assert_image(m, tp_local, m->model, NULL, "the local image");
	if (st == REPLICA_STATE_RUNNING && !m->sync_local)
		assert_image(m, tp_sec, m->model, NULL, "the secondary (sync=both, running)");
	if (st == REPLICA_STATE_RUNNING && brk == MBRK_NONE && !prime && !m->hold_ckpt &&
	    mrand(m) % 6 == 0) {
		model_op(m, "checkpoint");
		assert_image(m, tp_sec, m->model, NULL, "the secondary after a checkpoint");
		checkpoint_done(m);
	} else if (st != REPLICA_STATE_RUNNING && mrand(m) % 4 == 0) {
		assert_refused(m, st);
	}
}

START_TEST(t_model)
{
	struct mstate *m = calloc(1, sizeof(*m));
	struct replica_status st;
	const char *v = getenv("TDR_MODEL_VERBOSE");

	NEED_PEER("nbdkit");
	ck_assert_ptr_nonnull(m);
	m->seed = m->rng = model_seed();
	m->verbose = v && *v && strcmp(v, "0");
	snprintf(m->inject, sizeof(m->inject), "%s/inject", tp_dir);
	m->model = model_alloc(MDISK);
	m->cmodel = model_alloc(MDISK);
	m->flushed = model_alloc(MDISK);
	m->img = model_alloc(MDISK);
	m->keep = calloc(MSECS, 1);
	m->busy = calloc(MSECS, 1);
	m->late = calloc(MSECS, 1);
	m->unsure = calloc(MSECS, 1);
	m->skip = calloc(MSECS, 1);
	m->pending = calloc(MSECS, 1);
	ck_assert(m->keep && m->busy && m->late && m->unsure && m->skip && m->pending);

	/* Data and holes on the local disk; the secondary is junk until the initial resync full. */
	for (int i = 0; i < 6; i++) {
		uint64_t sec;
		uint32_t secs = pick_range(m, &sec);

		write_file(tp_local, sec * 512, (uint64_t)secs * 512, mrand(m));
	}
	read_image(m, tp_local);
	memcpy(m->model, m->img, MDISK);
	memcpy(m->cmodel, m->img, MDISK);
	peer_start(m, mrand(m) % 2 ? MPEER_NBDKIT : MPEER_FAKE);
	tp_open(",timeout=30000");
	ck_assert(tp_rimg->parent->info_discard);	/* so a discard zeroes both sides */
	m->sync_local = mrand(m) % 2;
	model_op(m, m->sync_local ? "start sync=local" : "start sync=both");
	model_op(m, "resync full");
	model_wait_state(m, REPLICA_STATE_RUNNING);
	model_op(m, "checkpoint");
	assert_image(m, tp_sec, m->model, NULL, "the secondary after the initial resync");
	checkpoint_done(m);
	m->resyncs++;
	m->full_resyncs++;
	m->style_off = (int)(mrand(m) % 3);
	m->mech_off = (int)(mrand(m) % 4);
	m->race_next = mrand(m) % 2;
	m->resync_mid = mrand(m) % 2;
	plan_break(m);

	for (m->round = 0; m->round < MROUNDS; m->round++)
		model_round(m);

	/* The end: a secondary back, a last resync and checkpoint, everything the same. */
	if (tp_state() == REPLICA_STATE_BROKEN || tp_state() == REPLICA_STATE_DONE)
		peer_back(m);
	if (tp_state() != REPLICA_STATE_RESYNC)
		model_resync(m, true, false);
	model_wait_state(m, REPLICA_STATE_RUNNING);
	model_op(m, "checkpoint");
	checkpoint_done(m);
	assert_image(m, tp_local, m->model, NULL, "the local image at the end");
	assert_image(m, tp_sec, m->model, NULL, "the secondary at the end");
	tp_assert_same();
	tp_status(&st);
	ck_assert_int_eq(st.state, REPLICA_STATE_RUNNING);
	ck_assert_int_eq(st.error, 0);
	ck_assert_uint_eq(st.stats.dirty_bytes, 0);
	ck_assert_uint_eq(st.stats.checkpoints, (uint64_t)m->checkpoints);
	ck_assert_uint_eq(st.stats.link_errors, (uint64_t)m->link_breaks);

	note(m, "checkpoints %d (in flight %d with %d requests in flight; %d racing a break)",
	     m->checkpoints, m->inflight_ckpts, m->inflight_at_ckpt, m->racing_ckpts);
	note(m, "link breaks %d (%d at a FLUSH), stops %d, crashes %d, peers %d fake + %d nbdkit",
	     m->link_breaks, m->flush_breaks, m->stops, m->crashes, m->fake_peers, m->nbdkit_peers);
	note(m, "resyncs %d (full %d, broken %d, %d requests in flight at their start, %d rounds during them)",
	     m->resyncs, m->full_resyncs, m->resync_breaks, m->inflight_at_resync,
	     m->resync_rounds);
	note(m, "refusals %d, reads %d, writes %d, zeroes %d (%d refused)", m->refusals, m->reads,
	     m->writes, m->zeroes, m->zero_refused);
	/* Floors well below what any seed does (see TDR_MODEL_VERBOSE). */
	ck_assert_int_ge(m->checkpoints, 30);
	ck_assert_int_ge(m->inflight_ckpts, 10);
	ck_assert_int_gt(m->inflight_at_ckpt, 0);
	ck_assert_int_ge(m->racing_ckpts, 1);
	ck_assert_int_ge(m->link_breaks + m->stops, MSEGMENTS);
	ck_assert_int_ge(m->crashes, 3);
	ck_assert_int_ge(m->fake_peers, 1);
	ck_assert_int_ge(m->nbdkit_peers, 1);
	ck_assert_int_ge(m->resyncs, MSEGMENTS + 2);
	ck_assert_int_gt(m->inflight_at_resync, 0);
	ck_assert_int_ge(m->reads, 200);
	ck_assert_int_ge(m->writes, 300);
	ck_assert_int_ge(m->zeroes, 50);

	free(m->model);
	free(m->cmodel);
	free(m->flushed);
	free(m->img);
	free(m->keep);
	free(m->busy);
	free(m->late);
	free(m->unsure);
	free(m->skip);
	free(m->pending);
	free(m);
}
END_TEST

/*
 * The disk closes (SIGTERM) while a start still waits for the secondary's
 * handshake: the start is answered ESHUTDOWN.  It was never answered, and
 * the control socket's record of it leaked.
 */
START_TEST(t_close_answers_pending_start)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct tp_op_result o;
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	/* A secondary that takes the connection and never says a word. */
	ck_assert_int_ge(lfd, 0);
	ck_assert_uint_lt(strlen(tp_sock), sizeof(sa.sun_path));
	memcpy(sa.sun_path, tp_sock, strlen(tp_sock) + 1);
	ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(lfd, 4), 0);
	tp_open(",timeout=60000");
	tp_op_begin("start", &o);
	tp_run_for(100);
	ck_assert(!o.done);
	tp_close();
	ck_assert(o.done);
	ck_assert_int_eq(o.err, -ESHUTDOWN);
	ck_assert_msg(strstr(o.msg, "closed before the operation completed"), "%s", o.msg);
	close(lfd);
}
END_TEST

/*
 * start mode=secondary on a primary whose image is no active/hidden/
 * secondary chain fails, and the disk stays the primary it was: it once
 * became a secondary with no state, which the next write (or the flush of
 * a SIGTERM) crashed on.  Arguments a secondary refuses are refused before
 * the switch, not after it.
 */
START_TEST(t_failed_switch_keeps_primary)
{
	struct replica_status st;

	tp_fake_start(TP_FAKE_GOOD, 0);
	tp_open("");
	assert_op_fails("start mode=secondary timeout=100", -EINVAL, "a secondary takes no addr");
	replica_get_status(tp_rimg, &st);
	ck_assert_int_eq(st.mode, REPLICA_MODE_PRIMARY);
	write_check(0, 64 * KIB, 21);
	assert_op_fails("start mode=secondary", -EINVAL, "still a primary");
	replica_get_status(tp_rimg, &st);
	ck_assert_int_eq(st.mode, REPLICA_MODE_PRIMARY);
	ck_assert_int_eq(st.state, REPLICA_STATE_NONE);
	write_check(TP_MIB, 64 * KIB, 22);
	ck_assert_int_eq(tp_guest_io(TD_OP_FLUSH, 0, 0, NULL, 0), 0);
	/*
	 * The same primary, with its tracking: the writes before start are
	 * known to be missing on the secondary (a primary set up anew would
	 * have forgotten them and called itself running).
	 */
	{
		char msg[512];

		ck_assert_int_eq(tp_op("start", msg, sizeof(msg)), 0);
		ck_assert_msg(strstr(msg, "run resync incremental"), "%s", msg);
	}
	ck_assert_int_eq(tp_state(), REPLICA_STATE_BROKEN);
	assert_op("resync incremental");
	tp_wait_state(REPLICA_STATE_RUNNING);
	write_check(2 * TP_MIB, 64 * KIB, 23);
}
END_TEST

/*
 * stop while a full resync's block-status query is out: on a VHD it
 * completes later (a bitmap read), with the link gone.  It once read the
 * closed link's capabilities through a NULL pointer and killed the daemon.
 */
START_TEST(t_stop_during_resync_scan)
{
	char vhd[160], base[160], spec[512];
	struct vhd_error verr;
	struct td_disk *d;
	char *buf = tp_pattern(64 * KIB, 3);
	int r;

	snprintf(vhd, sizeof(vhd), "%s/local.vhd", tp_dir);
	snprintf(base, sizeof(base), "%s/base.vhd", tp_dir);
	ck_assert_int_eq(vhd_file_create(base, DISK, VHD_TYPE_DYNAMIC, 0, &verr), 0);
	ck_assert_int_eq(vhd_file_snapshot(vhd, base, &verr), 0);
	/* Data at 1 MiB: block 0 allocated, its first sectors not in the bitmap. */
	snprintf(spec, sizeof(spec), "vhd:%s", vhd);
	r = td_disk_open(&d, spec, 0, tp_loop, tp_io);
	ck_assert_msg(r == 0, "%s", tdr_last_error());
	tp_disk = d;
	ck_assert_int_eq(tp_guest_io(TD_OP_WRITE, TP_MIB, 64 * KIB, buf, 0), 0);
	td_disk_close(d);
	tp_disk = NULL;

	tp_fake_start(TP_FAKE_GOOD, 0);
	snprintf(spec, sizeof(spec), "replica:mode=primary,addr=unix:%s|vhd:%s", tp_sock, vhd);
	r = td_disk_open(&tp_disk, spec, 0, tp_loop, tp_io);
	ck_assert_msg(r == 0, "%s", tdr_last_error());
	tp_rimg = replica_find(tp_disk);
	assert_op("start");
	assert_op("resync full");
	ck_assert_int_eq(tp_state(), REPLICA_STATE_RESYNC);
	/* The scan's query is out: the disk is busy with it. */
	ck_assert_uint_gt(td_disk_busy(tp_disk, NULL), 0);
	assert_op("stop");
	tp_run_for(200);
	ck_assert_int_eq(tp_state(), REPLICA_STATE_DONE);
	free(buf);
}
END_TEST

static void setup_model(void)
{
	tp_setup(MDISK, MDISK, 1);
}

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
	ADD("failed-start-keeps-options", setup16, t_failed_start_keeps_options);
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
	ADD("stop-during-resync-scan", setup16, t_stop_during_resync_scan);
	ADD("failed-switch-keeps-primary", setup16, t_failed_switch_keeps_primary);
	ADD("close-answers-pending-start", setup16, t_close_answers_pending_start);
	/* Its own case, so that CK_RUN_CASE=model runs it alone. */
	ADD("model", setup_model, t_model);
#undef ADD
	return s;
}

int main(void)
{
	tdr_log_init("test-primary", false, TDR_LOG_WARN);
	return check_run(suite(), CHECK_RUN_FORK);
}
