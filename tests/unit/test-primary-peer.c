/* SPDX-License-Identifier: BSD-3-Clause */
/* Test helpers for the primary; see test-primary-peer.h. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test-primary-peer.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"

extern char **environ;
extern const struct td_driver td_drv_replica;

char tp_dir[64];
char tp_local[128];
char tp_sec[128];
char tp_sock[128];

struct tdr_loop *tp_loop;
struct tdr_io_ctx *tp_io;
struct td_disk *tp_disk;
struct td_image *tp_rimg;

#define MAX_PEERS 8
static pid_t peers[MAX_PEERS];
static uint64_t local_size;

/* Generous: these only catch hangs, they never measure. */
#define DEADLINE_NS (60ull * 1000000000ull)

static void fill_file(const char *path, uint64_t size, int random_fill)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	if (random_fill) {
		char *buf = tp_pattern(TP_MIB, (unsigned)random_fill * 7919u);

		for (uint64_t off = 0; off < size; off += TP_MIB)
			ck_assert_int_eq(pwrite(fd, buf, size - off < TP_MIB ? size - off : TP_MIB,
						(off_t)off),
					 (ssize_t)(size - off < TP_MIB ? size - off : TP_MIB));
		free(buf);
	}
	close(fd);
}

void tp_setup(uint64_t lsize, uint64_t sec_size, int sec_fill)
{
	signal(SIGPIPE, SIG_IGN);
	/* /var/tmp: O_DIRECT works there, unlike on a tmpfs /tmp. */
	strcpy(tp_dir, "/var/tmp/tdr-primary-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tp_dir));
	snprintf(tp_local, sizeof(tp_local), "%s/local.img", tp_dir);
	snprintf(tp_sec, sizeof(tp_sec), "%s/sec.img", tp_dir);
	snprintf(tp_sock, sizeof(tp_sock), "%s/sec.sock", tp_dir);
	fill_file(tp_local, lsize, 0);
	fill_file(tp_sec, sec_size, sec_fill);
	local_size = lsize;
	tp_loop = tdr_loop_new();
	ck_assert_ptr_nonnull(tp_loop);
	tp_io = tdr_io_ctx_new(tp_loop, 128);
	ck_assert_ptr_nonnull(tp_io);
	td_driver_register(&td_drv_replica);
	memset(peers, 0, sizeof(peers));
}

void tp_teardown(void)
{
	tp_close();
	tp_fake_stop();
	for (int i = 0; i < MAX_PEERS; i++)
		if (peers[i] > 0)
			tp_stop(peers[i]);
	if (tp_io) {
		/* Let copies the primary orphaned at close finish before the context goes. */
		for (int i = 0; i < 100 && tdr_io_inflight(tp_io); i++)
			tdr_loop_run_once(tp_loop, 10);
		tdr_io_ctx_free(tp_io);
	}
	if (tp_loop)
		tdr_loop_free(tp_loop);
	tp_io = NULL;
	tp_loop = NULL;
	unlink(tp_local);
	unlink(tp_sec);
	unlink(tp_sock);
	{
		char cmd[128];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tp_dir);
		if (system(cmd) != 0)
			fprintf(stderr, "cannot remove %s\n", tp_dir);
	}
}

/* ------------------------------------------------------------ peers */

void tp_sun(struct sockaddr_un *sun, const char *path)
{
	size_t len = strlen(path);

	ck_assert_uint_lt(len, sizeof(sun->sun_path));
	sun->sun_family = AF_UNIX;
	memcpy(sun->sun_path, path, len + 1);
}

bool tp_have(const char *prog)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1", prog);
	return system(cmd) == 0;
}

static void wait_socket(const char *path, pid_t pid)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	uint64_t t0 = tdr_now_ns();

	tp_sun(&sun, path);
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		int status;

		ck_assert_int_ge(fd, 0);
		if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
			close(fd);
			return;
		}
		close(fd);
		if (pid > 0 && waitpid(pid, &status, WNOHANG) == pid)
			ck_abort_msg("peer exited before serving %s (status %d)", path, status);
		ck_assert_msg(tdr_now_ns() - t0 < DEADLINE_NS, "peer never listened on %s", path);
		usleep(10000);
	}
}

pid_t tp_spawn(const char *const argv[])
{
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int r;

	unlink(tp_sock);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	if (!getenv("TP_PEER_STDERR"))
		posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	r = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	ck_assert_msg(r == 0, "cannot start %s: %s", argv[0], strerror(r));
	for (int i = 0; i < MAX_PEERS; i++) {
		if (peers[i] <= 0) {
			peers[i] = pid;
			break;
		}
	}
	wait_socket(tp_sock, pid);
	return pid;
}

pid_t tp_qemu_nbd(const char *export_name)
{
	const char *argv[] = { "qemu-nbd", "-f", "raw", "-x", export_name, "-k", tp_sock,
			       "--persistent", "--shared=4", tp_sec, NULL };

	return tp_spawn(argv);
}

pid_t tp_nbdkit(const char *const filters[], const char *const args[])
{
	const char *argv[32];
	char fbuf[8][64];
	int n = 0;

	argv[n++] = "nbdkit";
	argv[n++] = "-f";
	argv[n++] = "-U";
	argv[n++] = tp_sock;
	for (int i = 0; filters && filters[i] && i < 8; i++) {
		snprintf(fbuf[i], sizeof(fbuf[i]), "--filter=%s", filters[i]);
		argv[n++] = fbuf[i];
	}
	argv[n++] = "file";
	argv[n++] = tp_sec;
	for (int i = 0; args && args[i] && n < 30; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	return tp_spawn(argv);
}

void tp_kill(pid_t pid, int sig)
{
	ck_assert_int_eq(kill(pid, sig), 0);
}

void tp_stop(pid_t pid)
{
	if (pid <= 0)
		return;
	kill(pid, SIGCONT);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	for (int i = 0; i < MAX_PEERS; i++)
		if (peers[i] == pid)
			peers[i] = 0;
}

/* ------------------------------------------------------- fake server */

static pthread_t fake_thread;
static bool fake_running;
static int fake_listen = -1;
static int fake_stop_pipe[2] = { -1, -1 };
static pthread_mutex_t fake_mu = PTHREAD_MUTEX_INITIALIZER;
static enum tp_fake_mode fake_mode;
static unsigned fake_nth;
static uint32_t fake_err = 5;
static struct tp_fake_stats fake_stats;
static bool fake_hold;			/* tp_fake_hold_reads() */
static pthread_cond_t fake_hold_cond = PTHREAD_COND_INITIALIZER;

static uint64_t be64(uint64_t v)
{
	return __builtin_bswap64(v);
}

static uint32_t be32(uint32_t v)
{
	return __builtin_bswap32(v);
}

static uint16_t be16(uint16_t v)
{
	return __builtin_bswap16(v);
}

static bool xread(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t r = read(fd, p, len);

		if (r <= 0)
			return false;
		p += r;
		len -= (size_t)r;
	}
	return true;
}

static bool xwrite(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t r = send(fd, p, len, MSG_NOSIGNAL);

		if (r <= 0)
			return false;
		p += r;
		len -= (size_t)r;
	}
	return true;
}

#define NBD_REPLY_MAGIC_OPT 0x3e889045565a9ull
#define IHAVEOPT 0x49484156454F5054ull

static bool opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
	struct __attribute__((packed)) {
		uint64_t magic;
		uint32_t opt, type, len;
	} h = { be64(NBD_REPLY_MAGIC_OPT), be32(opt), be32(type), be32(len) };

	return xwrite(fd, &h, sizeof(h)) && (!len || xwrite(fd, data, len));
}

/*
 * Fixed newstyle handshake; true once in transmission.  old: a server from
 * before NBD_OPT_GO and NBD_FLAG_NO_ZEROES.
 */
/*
 * Junk for TP_FAKE_JUNK_HS: 1 to 300 random bytes, half the time behind a
 * well-formed option reply header (type and length random too), so that
 * the client's checks past the magic get exercised.
 */
static unsigned junk_next(unsigned *st)
{
	*st = *st * 1103515245u + 12345u;
	return (*st >> 16) & 0xff;
}

static void fake_junk(int fd, unsigned seed)
{
	unsigned char junk[320];
	unsigned st = seed * 2654435761u + 1, n, off = 0, hi;

	hi = junk_next(&st) << 8;
	n = 1 + (hi | junk_next(&st)) % 300;
	if (seed & 1) {
		struct __attribute__((packed)) {
			uint64_t magic;
			uint32_t opt, type, len;
		} h = { be64(NBD_REPLY_MAGIC_OPT), be32(7), 0, 0 };

		h.type = be32((seed & 2 ? 0x80000000u : 0) | (junk_next(&st) % 12));
		h.len = be32(seed & 4 ? junk_next(&st) % 32 : (uint32_t)junk_next(&st) << 24);
		memcpy(junk, &h, sizeof(h));
		off = sizeof(h);
	}
	for (unsigned i = off; i < off + n; i++)
		junk[i] = (unsigned char)junk_next(&st);
	(void)xwrite(fd, junk, off + n);
}

static bool fake_handshake(int fd, uint64_t size, bool old)
{
	struct __attribute__((packed)) {
		uint64_t magic, ihaveopt;
		uint16_t flags;
	} hello = { be64(0x4e42444d41474943ull), be64(IHAVEOPT), be16(old ? 1 : 1 | 2) };
	uint32_t cflags;

	if (!xwrite(fd, &hello, sizeof(hello)) || !xread(fd, &cflags, 4))
		return false;
	for (;;) {
		struct __attribute__((packed)) {
			uint64_t magic;
			uint32_t opt, len;
		} oh;
		char data[4096];
		uint32_t len;

		if (!xread(fd, &oh, sizeof(oh)) || be64(oh.magic) != IHAVEOPT)
			return false;
		len = be32(oh.len);
		if (len > sizeof(data) || !xread(fd, data, len))
			return false;
		pthread_mutex_lock(&fake_mu);
		if (fake_mode == TP_FAKE_JUNK_HS) {
			unsigned seed = fake_nth;

			pthread_mutex_unlock(&fake_mu);
			fake_junk(fd, seed);
			return false;
		}
		pthread_mutex_unlock(&fake_mu);
		switch (be32(oh.opt) == 7 && old ? 0 : be32(oh.opt)) {
		case 1: {	/* NBD_OPT_EXPORT_NAME: size, flags, 124 zeroes */
			struct __attribute__((packed)) {
				uint64_t size;
				uint16_t flags;
				char zeroes[124];
			} ans = { be64(size), be16(1 | 4 | 32 | 64), { 0 } };

			if (len != strlen("secondary") || memcmp(data, "secondary", len) != 0)
				return false;
			return xwrite(fd, &ans, old ? sizeof(ans) : sizeof(ans) - 124);
		}
		case 7: {	/* NBD_OPT_GO */
			uint32_t nl;
			struct __attribute__((packed)) {
				uint16_t type;
				uint64_t size;
				uint16_t flags;
			} info = { be16(0), be64(size), be16(1 | 4 | 32 | 64) };

			memcpy(&nl, data, 4);
			nl = be32(nl);
			if (nl != strlen("secondary") || memcmp(data + 4, "secondary", nl) != 0) {
				if (!opt_reply(fd, 7, 0x80000006u, NULL, 0))
					return false;
				continue;
			}
			return opt_reply(fd, 7, 3, &info, sizeof(info)) && opt_reply(fd, 7, 1, NULL, 0);
		}
		case 2:		/* NBD_OPT_ABORT */
			return false;
		default:	/* structured replies, meta contexts, ...: simple replies only */
			if (!opt_reply(fd, be32(oh.opt), 0x80000001u, NULL, 0))
				return false;
			break;
		}
	}
}

static void fake_serve(int fd, int file)
{
	enum tp_fake_mode mode;
	unsigned nreq = 0;
	char *buf = malloc(32u << 20);
	struct stat st;

	pthread_mutex_lock(&fake_mu);
	mode = fake_mode;
	pthread_mutex_unlock(&fake_mu);
	if (!buf || fstat(file, &st) < 0 ||
	    !fake_handshake(fd, (uint64_t)st.st_size, mode == TP_FAKE_NO_GO))
		goto out;
	for (;;) {
		struct __attribute__((packed)) {
			uint32_t magic;
			uint16_t flags, type;
			uint64_t handle, off;
			uint32_t len;
		} rq;
		struct __attribute__((packed)) {
			uint32_t magic, error;
			uint64_t handle;
		} rp;
		unsigned nth;
		uint32_t len, err = 0;
		uint64_t off;

		pthread_mutex_lock(&fake_mu);
		while (fake_hold)
			pthread_cond_wait(&fake_hold_cond, &fake_mu);
		pthread_mutex_unlock(&fake_mu);
		if (!xread(fd, &rq, sizeof(rq)) || be32(rq.magic) != 0x25609513u)
			goto out;
		len = be32(rq.len);
		off = be64(rq.off);
		nreq++;
		pthread_mutex_lock(&fake_mu);
		mode = fake_mode;
		nth = fake_nth;
		pthread_mutex_unlock(&fake_mu);
		switch (be16(rq.type)) {
		case 1:		/* WRITE */
			if (len > (32u << 20) || !xread(fd, buf, len))
				goto out;
			if (pwrite(file, buf, len, (off_t)off) != (ssize_t)len)
				err = 5;
			pthread_mutex_lock(&fake_mu);
			fake_stats.write_cmds++;
			fake_stats.write_bytes += len;
			pthread_mutex_unlock(&fake_mu);
			break;
		case 2:		/* DISC */
			goto out;
		case 3:		/* FLUSH: the tests read the file, so no fdatasync (slow on a busy disk) */
			pthread_mutex_lock(&fake_mu);
			fake_stats.flush_cmds++;
			pthread_mutex_unlock(&fake_mu);
			break;
		case 4:		/* TRIM */
		case 6:		/* WRITE_ZEROES */
			if (fallocate(file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, len) < 0)
				err = 5;
			pthread_mutex_lock(&fake_mu);
			if (be16(rq.type) == 6) {
				fake_stats.zero_cmds++;
				fake_stats.zero_bytes += len;
			} else {
				fake_stats.trim_cmds++;
			}
			pthread_mutex_unlock(&fake_mu);
			break;
		default:
			err = 22;
			break;
		}
		rp.magic = be32(0x67446698u);
		rp.error = be32(err);
		rp.handle = rq.handle;
		if (mode != TP_FAKE_GOOD && mode != TP_FAKE_NO_GO && nreq >= nth) {
			if (mode == TP_FAKE_STRUCTURED) {
				/* Magic, flags DONE, type NONE, the right handle, length 0. */
				struct __attribute__((packed)) {
					uint32_t magic;
					uint16_t flags, type;
					uint64_t handle;
					uint32_t len;
				} sr = { be32(0x668e33efu), be16(1), be16(0), rq.handle, 0 };

				if (!xwrite(fd, &sr, sizeof(sr)))
					goto out;
				continue;
			} else if (mode == TP_FAKE_ERROR) {
				pthread_mutex_lock(&fake_mu);
				rp.error = be32(fake_err);
				pthread_mutex_unlock(&fake_mu);
			} else if (mode == TP_FAKE_GARBAGE) {
				memset(&rp, 0xa5, sizeof(rp));
			} else if (mode == TP_FAKE_BOGUS_HANDLE) {
				rp.handle = be64(0xdeadbeefcafeull);
			} else if (mode == TP_FAKE_SILENT) {
				continue;
			} else {
				goto out;
			}
		}
		if (!xwrite(fd, &rp, sizeof(rp)))
			goto out;
	}
out:
	free(buf);
}

static void *fake_main(void *arg)
{
	(void)arg;
	for (;;) {
		fd_set rfds;
		int fd, file, maxfd;

		FD_ZERO(&rfds);
		FD_SET(fake_listen, &rfds);
		FD_SET(fake_stop_pipe[0], &rfds);
		maxfd = fake_listen > fake_stop_pipe[0] ? fake_listen : fake_stop_pipe[0];
		if (select(maxfd + 1, &rfds, NULL, NULL, NULL) < 0)
			continue;
		if (FD_ISSET(fake_stop_pipe[0], &rfds))
			break;
		fd = accept(fake_listen, NULL, NULL);
		if (fd < 0)
			continue;
		pthread_mutex_lock(&fake_mu);
		fake_stats.connections++;
		pthread_mutex_unlock(&fake_mu);
		file = open(tp_sec, O_RDWR);
		if (file >= 0) {
			fake_serve(fd, file);
			close(file);
		}
		close(fd);
	}
	return NULL;
}

void tp_fake_start(enum tp_fake_mode mode, unsigned nth)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };

	tp_fake_set_mode(mode, nth);
	tp_fake_reset_stats();
	unlink(tp_sock);
	tp_sun(&sun, tp_sock);
	fake_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fake_listen, 0);
	ck_assert_int_eq(bind(fake_listen, (struct sockaddr *)&sun, sizeof(sun)), 0);
	ck_assert_int_eq(listen(fake_listen, 8), 0);
	ck_assert_int_eq(pipe(fake_stop_pipe), 0);
	ck_assert_int_eq(pthread_create(&fake_thread, NULL, fake_main, NULL), 0);
	fake_running = true;
}

void tp_fake_set_error(uint32_t nbd_err)
{
	pthread_mutex_lock(&fake_mu);
	fake_err = nbd_err;
	pthread_mutex_unlock(&fake_mu);
}

void tp_fake_set_mode(enum tp_fake_mode mode, unsigned nth)
{
	pthread_mutex_lock(&fake_mu);
	fake_mode = mode;
	fake_nth = nth;
	pthread_mutex_unlock(&fake_mu);
}

void tp_fake_get_stats(struct tp_fake_stats *st)
{
	pthread_mutex_lock(&fake_mu);
	*st = fake_stats;
	pthread_mutex_unlock(&fake_mu);
}

void tp_fake_hold_reads(bool hold)
{
	pthread_mutex_lock(&fake_mu);
	fake_hold = hold;
	pthread_cond_broadcast(&fake_hold_cond);
	pthread_mutex_unlock(&fake_mu);
}

void tp_fake_reset_stats(void)
{
	pthread_mutex_lock(&fake_mu);
	memset(&fake_stats, 0, sizeof(fake_stats));
	pthread_mutex_unlock(&fake_mu);
}

/*
 * Stops the server.  A connection being served ends when the primary
 * closes it (the primary is closed first in teardown).
 */
void tp_fake_stop(void)
{
	tp_fake_set_error(5);
	tp_fake_hold_reads(false);
	if (!fake_running)
		return;
	if (write(fake_stop_pipe[1], "x", 1) != 1)
		fprintf(stderr, "fake server: cannot signal stop\n");
	pthread_join(fake_thread, NULL);
	close(fake_listen);
	close(fake_stop_pipe[0]);
	close(fake_stop_pipe[1]);
	fake_listen = fake_stop_pipe[0] = fake_stop_pipe[1] = -1;
	fake_running = false;
}

/* ----------------------------------------------------------- primary */

/*
 * TDR_TEST_CLIENT=libnbd runs every test on the libnbd client (the suite
 * runs the program twice, see tests/unit/local.mk).
 */
void tp_open(const char *extra_opts)
{
	const char *client = getenv("TDR_TEST_CLIENT");
	char spec[512];
	int r;

	snprintf(spec, sizeof(spec), "replica:mode=primary,addr=unix:%s%s%s%s|aio:%s", tp_sock,
		 extra_opts ? extra_opts : "", client && *client ? ",client=" : "",
		 client && *client ? client : "", tp_local);
	r = td_disk_open(&tp_disk, spec, 0, tp_loop, tp_io);
	ck_assert_msg(r == 0, "td_disk_open(%s): %d %s", spec, r, tdr_last_error());
	tp_rimg = replica_find(tp_disk);
	ck_assert_ptr_nonnull(tp_rimg);
}

void tp_close(void)
{
	if (!tp_disk)
		return;
	td_disk_close(tp_disk);
	tp_disk = NULL;
	tp_rimg = NULL;
}

static void op_cb(void *arg, int err, const char *msg)
{
	struct tp_op_result *res = arg;

	res->done = true;
	res->err = err;
	snprintf(res->msg, sizeof(res->msg), "%s", msg ? msg : "");
}

void tp_op_begin(const char *line, struct tp_op_result *res)
{
	struct replica_cmd cmd;
	char m[256];

	*res = (struct tp_op_result){ 0 };
	ck_assert_msg(replica_parse(line, &cmd, m, sizeof(m)) == 0, "parse '%s': %s", line, m);
	replica_execute(tp_rimg, &cmd, op_cb, res);
}

int tp_op(const char *line, char *msg, size_t msglen)
{
	struct tp_op_result res;
	uint64_t t0 = tdr_now_ns();

	tp_op_begin(line, &res);
	while (!res.done) {
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < DEADLINE_NS, "operation '%s' never completed", line);
	}
	if (msg)
		snprintf(msg, msglen, "%s", res.msg);
	return res.err;
}

void tp_status(struct replica_status *st)
{
	replica_get_status(tp_rimg, st);
}

enum replica_state tp_state(void)
{
	struct replica_status st;

	tp_status(&st);
	return st.state;
}

void tp_wait_state(enum replica_state s)
{
	uint64_t t0 = tdr_now_ns();

	while (tp_state() != s) {
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < DEADLINE_NS, "state never became %s (is %s)",
			      replica_state_name(s), replica_state_name(tp_state()));
	}
}

void tp_run_for(unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000u;

	while (tdr_now_ns() < end)
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 10), 0);
}

struct io_result {
	bool done;
	int err;
};

static void io_cb(struct td_request *req, int err, void *arg)
{
	struct io_result *res = arg;

	(void)req;
	res->done = true;
	res->err = err;
}

int tp_guest_io(enum td_op op, uint64_t off, uint64_t len, void *buf, unsigned flags)
{
	struct td_request req;
	struct io_result res = { 0 };
	uint64_t t0 = tdr_now_ns();

	td_request_init(&req, op, off / 512, (uint32_t)(len / 512), buf, io_cb, &res);
	req.flags = flags;
	td_disk_submit(tp_disk, &req);
	while (!res.done) {
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < DEADLINE_NS, "guest request never completed");
	}
	return res.err;
}

struct tp_batch {
	unsigned n;
	struct td_request *reqs;
	struct io_result *res;
};

struct tp_batch *tp_batch_write(unsigned n, const uint64_t *offs, uint64_t len, char *const *bufs)
{
	struct tp_batch *b = calloc(1, sizeof(*b));

	ck_assert_ptr_nonnull(b);
	b->n = n;
	b->reqs = calloc(n, sizeof(*b->reqs));
	b->res = calloc(n, sizeof(*b->res));
	ck_assert_ptr_nonnull(b->reqs);
	ck_assert_ptr_nonnull(b->res);
	for (unsigned i = 0; i < n; i++) {
		td_request_init(&b->reqs[i], TD_OP_WRITE, offs[i] / 512, (uint32_t)(len / 512),
				bufs[i], io_cb, &b->res[i]);
		td_disk_submit(tp_disk, &b->reqs[i]);
	}
	return b;
}

unsigned tp_batch_done(const struct tp_batch *b)
{
	unsigned done = 0;

	for (unsigned i = 0; i < b->n; i++)
		done += b->res[i].done;
	return done;
}

void tp_batch_run_until(struct tp_batch *b, unsigned want)
{
	uint64_t t0 = tdr_now_ns();

	while (tp_batch_done(b) < want) {
		ck_assert_int_ge(tdr_loop_run_once(tp_loop, 100), 0);
		ck_assert_msg(tdr_now_ns() - t0 < DEADLINE_NS,
			      "only %u of %u guest writes completed (waited for %u)", tp_batch_done(b),
			      b->n, want);
	}
}

void tp_batch_finish(struct tp_batch *b, int *errs)
{
	tp_batch_run_until(b, b->n);
	for (unsigned i = 0; i < b->n; i++)
		if (errs)
			errs[i] = b->res[i].err;
	free(b->reqs);
	free(b->res);
	free(b);
}

void tp_write_many(unsigned n, const uint64_t *offs, uint64_t len, char *const *bufs, int *errs)
{
	tp_batch_finish(tp_batch_write(n, offs, len, bufs), errs);
}

char *tp_pattern(uint64_t len, unsigned seed)
{
	char *buf = tdr_io_alloc(len);
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

	ck_assert_ptr_nonnull(buf);
	for (uint64_t i = 0; i < len; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, len - i < 8 ? len - i : 8);
	}
	return buf;
}

bool tp_files_equal(const char *a, const char *b, uint64_t *first_diff)
{
	int fa = open(a, O_RDONLY), fb = open(b, O_RDONLY);
	char *ba = malloc(TP_MIB), *bb = malloc(TP_MIB);
	bool same = true;
	uint64_t off = 0;

	ck_assert_int_ge(fa, 0);
	ck_assert_int_ge(fb, 0);
	for (;;) {
		ssize_t ra = pread(fa, ba, TP_MIB, (off_t)off), rb = pread(fb, bb, TP_MIB, (off_t)off);

		if (ra != rb) {
			same = false;
			*first_diff = off;
			break;
		}
		if (ra <= 0)
			break;
		if (memcmp(ba, bb, (size_t)ra)) {
			for (ssize_t i = 0; i < ra; i++) {
				if (ba[i] != bb[i]) {
					*first_diff = off + (uint64_t)i;
					break;
				}
			}
			same = false;
			break;
		}
		off += (uint64_t)ra;
	}
	free(ba);
	free(bb);
	close(fa);
	close(fb);
	return same;
}

void tp_assert_same(void)
{
	uint64_t diff = 0;

	ck_assert_msg(tp_files_equal(tp_local, tp_sec, &diff),
		      "local and secondary images differ at byte %llu", (unsigned long long)diff);
}
