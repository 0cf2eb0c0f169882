/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libaio backend.  Requests are queued in software and submitted in one
 * io_submit() per loop iteration from a prepare hook; the kernel signals
 * completions on an eventfd watched by the loop.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/io.h"
#include "tdr/log.h"

#define IO_BATCH 64

struct tdr_io_ctx {
	struct tdr_loop *loop;
	io_context_t aio;
	unsigned depth;
	unsigned in_kernel;
	int efd;
	struct tdr_fd_watch efd_watch;
	struct tdr_prepare prepare;

	/* FIFO of requests not yet handed to the kernel. */
	struct tdr_iocb *q_head, *q_tail;
	unsigned queued;

	/* Requests failed before submission, completed from a deferred call. */
	struct tdr_iocb *failed_head, *failed_tail;
	struct tdr_defer failed_defer;

	enum tdr_io_fault_mode fault_mode;
	uint64_t fault_after;
	bool fault_one_file;	/* only writes to the file fault_dev/fault_ino */
	dev_t fault_dev;
	ino_t fault_ino;
	uint64_t writes_issued;
	uint64_t writes_done;

	tdr_io_journal_fn journal;	/* power-cut tests only */
	void *journal_arg;
};

static void io_enqueue(struct tdr_iocb **head, struct tdr_iocb **tail, struct tdr_iocb *io)
{
	io->next = NULL;
	if (*tail)
		(*tail)->next = io;
	else
		*head = io;
	*tail = io;
}

static bool io_is_write(const struct tdr_iocb *io)
{
	switch (io->iocb.aio_lio_opcode) {
	case IO_CMD_PWRITE:
	case IO_CMD_PWRITEV:
	case IO_CMD_FDSYNC:
	case IO_CMD_FSYNC:
		return true;
	default:
		return false;
	}
}

static void io_complete(struct tdr_io_ctx *ctx, struct tdr_iocb *io, ssize_t res)
{
	if (res >= 0 && io_is_write(io))
		ctx->writes_done++;
	if (ctx->journal && io_is_write(io))
		ctx->journal(ctx->journal_arg, TDR_IO_J_DONE, io, res);
	io->cb(io, res, io->arg);
}

static void io_run_failed(void *arg)
{
	struct tdr_io_ctx *ctx = arg;
	struct tdr_iocb *io = ctx->failed_head;

	ctx->failed_head = ctx->failed_tail = NULL;
	while (io) {
		struct tdr_iocb *next = io->next;

		io_complete(ctx, io, -EIO);
		io = next;
	}
}

void tdr_io_flush_queue(struct tdr_io_ctx *ctx)
{
	struct iocb *batch[IO_BATCH];

	while (ctx->q_head && ctx->in_kernel < ctx->depth) {
		unsigned room = ctx->depth - ctx->in_kernel, n = 0;
		struct tdr_iocb *io = ctx->q_head;

		if (room > IO_BATCH)
			room = IO_BATCH;
		for (; io && n < room; io = io->next)
			batch[n++] = &io->iocb;

		int r = io_submit(ctx->aio, (long)n, batch);

		if (r == -EAGAIN || r == 0)
			return;	/* kernel ring full: retry after completions */
		if (r < 0) {
			/* The first request is bad (e.g. EBADF); fail it alone. */
			io = ctx->q_head;
			ctx->q_head = io->next;
			if (!ctx->q_head)
				ctx->q_tail = NULL;
			ctx->queued--;
			io_complete(ctx, io, r);
			continue;
		}
		for (int i = 0; i < r; i++) {
			io = ctx->q_head;
			ctx->q_head = io->next;
			if (ctx->journal && io_is_write(io))
				ctx->journal(ctx->journal_arg, TDR_IO_J_SUBMIT, io, 0);
		}
		if (!ctx->q_head)
			ctx->q_tail = NULL;
		ctx->queued -= (unsigned)r;
		ctx->in_kernel += (unsigned)r;
	}
}

static void io_prepare(void *arg)
{
	tdr_io_flush_queue(arg);
}

static void io_reap(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct tdr_io_ctx *ctx = arg;
	struct io_event evs[IO_BATCH];
	struct timespec zero = { 0, 0 };
	uint64_t cnt;

	if (read(ctx->efd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
		TDR_WARN("aio eventfd read failed: %s", strerror(errno));

	for (;;) {
		int n = io_getevents(ctx->aio, 0, IO_BATCH, evs, &zero);

		if (n <= 0) {
			if (n < 0 && n != -EINTR)
				TDR_ERR("io_getevents failed: %s", strerror(-n));
			break;
		}
		ctx->in_kernel -= (unsigned)n;
		for (int i = 0; i < n; i++) {
			struct tdr_iocb *io = evs[i].data;

			io_complete(ctx, io, (ssize_t)(long)evs[i].res);
		}
		if (n < IO_BATCH)
			break;
	}
	/* Completions made room: submit what waited, without waiting a loop turn. */
	if (ctx->q_head)
		tdr_io_flush_queue(ctx);
}

static void io_parse_fault_env(struct tdr_io_ctx *ctx)
{
	const char *env = getenv("TDR_FAULT_WRITES");
	char *end;
	unsigned long long n;

	if (!env || !*env)
		return;
	errno = 0;
	n = strtoull(env, &end, 10);
	if (errno || end == env || (*end != ':' && *end != '\0')) {
		TDR_WARN("ignoring TDR_FAULT_WRITES=%s: expected N:fail or N:kill", env);
		return;
	}
	if (*end == '\0' || strcmp(end, ":fail") == 0)
		tdr_io_set_fault(ctx, TDR_FAULT_FAIL, n);
	else if (strcmp(end, ":kill") == 0)
		tdr_io_set_fault(ctx, TDR_FAULT_KILL, n);
	else
		TDR_WARN("ignoring TDR_FAULT_WRITES=%s: expected N:fail or N:kill", env);
}

struct tdr_io_ctx *tdr_io_ctx_new(struct tdr_loop *loop, unsigned depth)
{
	struct tdr_io_ctx *ctx = calloc(1, sizeof(*ctx));
	int r;

	if (!ctx) {
		errno = ENOMEM;
		return NULL;
	}
	ctx->loop = loop;
	ctx->depth = depth ? depth : 256;
	ctx->efd = -1;
	r = io_setup((int)ctx->depth, &ctx->aio);
	if (r < 0) {
		tdr_set_error("io_setup(%u) failed: %s; raise /proc/sys/fs/aio-max-nr",
			      ctx->depth, strerror(-r));
		free(ctx);
		errno = -r;
		return NULL;
	}
	ctx->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (ctx->efd < 0) {
		r = -errno;
		goto fail;
	}
	r = tdr_loop_watch_fd(loop, &ctx->efd_watch, ctx->efd, EPOLLIN, io_reap, ctx);
	if (r < 0)
		goto fail;
	tdr_loop_add_prepare(loop, &ctx->prepare, io_prepare, ctx);
	tdr_defer_init(&ctx->failed_defer, io_run_failed, ctx);
	io_parse_fault_env(ctx);
	return ctx;

fail:
	tdr_set_error("aio backend setup failed: %s", strerror(-r));
	if (ctx->efd >= 0)
		close(ctx->efd);
	io_destroy(ctx->aio);
	free(ctx);
	errno = -r;
	return NULL;
}

static void io_orphan_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	free(arg);
}

void tdr_io_orphan(struct tdr_iocb *io, void *mem)
{
	io->cb = io_orphan_done;
	io->arg = mem;
	io->orphan = true;
}

/* At teardown, requests that never reached the kernel: only orphans are freed. */
static void io_free_orphans(struct tdr_iocb *io)
{
	while (io) {
		struct tdr_iocb *next = io->next;

		if (io->orphan)
			io->cb(io, -ECANCELED, io->arg);
		io = next;
	}
}

void tdr_io_ctx_free(struct tdr_io_ctx *ctx)
{
	if (!ctx)
		return;
	/*
	 * Wait for requests in the kernel: their buffers belong to the callers.
	 * Owners still alive are not called back (they are being torn down
	 * too); orphans have no owner and are freed here.
	 */
	while (ctx->in_kernel) {
		struct io_event evs[IO_BATCH];
		int n = io_getevents(ctx->aio, 1, IO_BATCH, evs, NULL);

		if (n < 0 && n != -EINTR)
			break;
		if (n <= 0)
			continue;
		ctx->in_kernel -= (unsigned)n;
		for (int i = 0; i < n; i++) {
			struct tdr_iocb *io = evs[i].data;

			if (io->orphan)
				io->cb(io, (ssize_t)(long)evs[i].res, io->arg);
		}
	}
	io_free_orphans(ctx->q_head);
	io_free_orphans(ctx->failed_head);
	tdr_loop_cancel_defer(ctx->loop, &ctx->failed_defer);
	tdr_loop_remove_prepare(ctx->loop, &ctx->prepare);
	tdr_loop_unwatch_fd(&ctx->efd_watch);
	close(ctx->efd);
	io_destroy(ctx->aio);
	free(ctx);
}

/*
 * Whether direct I/O on fd takes 512-byte offsets and lengths, which is
 * what NBD clients are told (the minimum block size) and what the drivers
 * write (a VHD's BAT sectors).  Storage with 4 KiB logical sectors (4Kn,
 * or a file system on it) refuses them with EINVAL; a 512-byte read at
 * offset 512, from a page-aligned buffer, tells.  At open only: blocking.
 */
static bool io_direct_takes_512(int fd)
{
	void *buf = NULL;
	bool ok = true;

	if (posix_memalign(&buf, 4096, 512) != 0)
		return true;	/* cannot tell: as before */
	if (pread(fd, buf, 512, 512) < 0 && errno == EINVAL)
		ok = false;
	free(buf);
	return ok;
}

int tdr_io_open(const char *path, int flags, mode_t mode, bool *direct)
{
	int fd = open(path, flags | O_DIRECT | O_CLOEXEC, mode);

	if (fd >= 0 && !io_direct_takes_512(fd)) {
		TDR_WARN("%s: direct I/O here needs more than 512-byte alignment (4 KiB logical sectors); using buffered I/O, which serves 512-byte requests but blocks the event loop while the kernel copies",
			 path);
		close(fd);
		fd = -1;
		errno = EINVAL;
	}
	if (fd >= 0) {
		if (direct)
			*direct = true;
		return fd;
	}
	if (errno != EINVAL)
		return -errno;
	/* tmpfs and some FUSE filesystems refuse O_DIRECT: go buffered. */
	fd = open(path, flags | O_CLOEXEC, mode);
	if (fd < 0)
		return -errno;
	if (direct)
		*direct = false;
	return fd;
}

static bool io_fault_applies(const struct tdr_io_ctx *ctx, const struct tdr_iocb *io)
{
	struct stat st;

	if (!ctx->fault_one_file)
		return true;
	return fstat((int)io->iocb.aio_fildes, &st) == 0 && st.st_dev == ctx->fault_dev &&
	       st.st_ino == ctx->fault_ino;
}

static void io_queue(struct tdr_io_ctx *ctx, struct tdr_iocb *io, tdr_io_cb cb, void *arg)
{
	io->cb = cb;
	io->arg = arg;
	io->orphan = false;
	io->iocb.data = io;
	io_set_eventfd(&io->iocb, ctx->efd);

	if (ctx->fault_mode != TDR_FAULT_NONE && io_is_write(io) && io_fault_applies(ctx, io)) {
		if (ctx->writes_issued >= ctx->fault_after) {
			if (ctx->fault_mode == TDR_FAULT_KILL) {
				/* Everything issued before this write reaches the kernel. */
				tdr_io_flush_queue(ctx);
				kill(getpid(), SIGKILL);
			}
			io_enqueue(&ctx->failed_head, &ctx->failed_tail, io);
			tdr_loop_defer(ctx->loop, &ctx->failed_defer);
			return;
		}
		ctx->writes_issued++;
	}
	io_enqueue(&ctx->q_head, &ctx->q_tail, io);
	ctx->queued++;
}

void tdr_io_pread(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, void *buf,
		  size_t len, uint64_t off, tdr_io_cb cb, void *arg)
{
	io_prep_pread(&io->iocb, fd, buf, len, (long long)off);
	io_queue(ctx, io, cb, arg);
}

void tdr_io_pwrite(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, const void *buf,
		   size_t len, uint64_t off, tdr_io_cb cb, void *arg)
{
	io_prep_pwrite(&io->iocb, fd, (void *)buf, len, (long long)off);
	io_queue(ctx, io, cb, arg);
}

void tdr_io_pwrite_dsync(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, const void *buf,
			 size_t len, uint64_t off, tdr_io_cb cb, void *arg)
{
	io_prep_pwrite(&io->iocb, fd, (void *)buf, len, (long long)off);
	io->iocb.aio_rw_flags = RWF_DSYNC;
	io_queue(ctx, io, cb, arg);
}

void tdr_io_preadv(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd,
		   const struct iovec *iov, int iovcnt, uint64_t off, tdr_io_cb cb, void *arg)
{
	io_prep_preadv(&io->iocb, fd, iov, iovcnt, (long long)off);
	io_queue(ctx, io, cb, arg);
}

void tdr_io_pwritev(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd,
		    const struct iovec *iov, int iovcnt, uint64_t off, tdr_io_cb cb, void *arg)
{
	io_prep_pwritev(&io->iocb, fd, iov, iovcnt, (long long)off);
	io_queue(ctx, io, cb, arg);
}

void tdr_io_fdsync(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, tdr_io_cb cb, void *arg)
{
	io_prep_fdsync(&io->iocb, fd);
	io_queue(ctx, io, cb, arg);
}

unsigned tdr_io_inflight(const struct tdr_io_ctx *ctx)
{
	return ctx->queued + ctx->in_kernel;
}

void tdr_io_set_fault(struct tdr_io_ctx *ctx, enum tdr_io_fault_mode mode, uint64_t after_writes)
{
	ctx->fault_mode = mode;
	ctx->fault_after = after_writes;
	ctx->writes_issued = 0;
	ctx->fault_one_file = false;
}

int tdr_io_set_fault_file(struct tdr_io_ctx *ctx, const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return -errno;
	ctx->fault_one_file = true;
	ctx->fault_dev = st.st_dev;
	ctx->fault_ino = st.st_ino;
	return 0;
}

void tdr_io_set_journal(struct tdr_io_ctx *ctx, tdr_io_journal_fn fn, void *arg)
{
	ctx->journal = fn;
	ctx->journal_arg = arg;
}

uint64_t tdr_io_writes_done(const struct tdr_io_ctx *ctx)
{
	return ctx->writes_done;
}

void *tdr_io_alloc(size_t len)
{
	void *p = NULL;

	if (posix_memalign(&p, TDR_IO_ALIGN, len ? len : TDR_IO_ALIGN))
		return NULL;
	return p;
}

/* ------------------------------------------------------------ buffer pool */

/*
 * Buffers from 256 KiB up are backed by transparent huge pages where the
 * kernel has them.  An O_DIRECT transfer from 4 KiB pages is a page to
 * pin and a scatter-gather segment per 4 KiB (a 1 MiB one is more
 * segments than the virtio disk takes in one request, 254 here, so the
 * block layer splits it); from a huge page it is one segment.  Measured
 * on this project's VM (ext4 on virtio; tests/bench/bench-buffers,
 * docs/benchmarks.md), QD 32, pool against malloc: 1 MiB reads 4.8x and
 * writes 2.6x, 256 KiB 3.8x.  Smaller classes gained too (64 KiB 2.9x,
 * 16 KiB 2.0x), but huge pages for them made the failover's last phase
 * hold the SVM's writes 25-32 ms instead of 5-10: a pool miss maps a new
 * region, and its first touch, inside io_submit(), may compact memory
 * for a huge page.  Classes below 2 MiB are carved out of one 2 MiB-
 * aligned region (the rest of it goes to the idle list); larger ones are
 * mapped alone, 2 MiB aligned.  Every such buffer is its own munmap()able
 * range, so none depends on another.  Under AddressSanitizer the pool
 * keeps to malloc, whose red zones and leak checks are worth more there
 * than the speed.
 */
#define BUFPOOL_HUGE      ((size_t)2 << 20)
#define BUFPOOL_THP_SHIFT 18	/* 256 KiB */

#if defined(__SANITIZE_ADDRESS__)
#define BUFPOOL_NO_THP 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BUFPOOL_NO_THP 1
#endif
#endif

static bool bufpool_thp(unsigned shift)
{
#ifdef BUFPOOL_NO_THP
	(void)shift;
	return false;
#else
	return shift >= BUFPOOL_THP_SHIFT;
#endif
}

/* len bytes (a multiple of 2 MiB) at a 2 MiB boundary, huge pages asked for. */
static void *bufpool_map(size_t len)
{
	size_t span = len + BUFPOOL_HUGE, head;
	char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	head = (BUFPOOL_HUGE - (uintptr_t)p % BUFPOOL_HUGE) % BUFPOOL_HUGE;
	if (head)
		munmap(p, head);
	if (span - head > len)
		munmap(p + head + len, span - head - len);
	/* Not fatal: without huge pages the buffer is merely slower. */
	madvise(p + head, len, MADV_HUGEPAGE);
	return p + head;
}

/* Frees a buffer of the class of shift, however it was allocated. */
static void bufpool_free_class(void *buf, unsigned shift)
{
	if (bufpool_thp(shift))
		munmap(buf, (size_t)1 << shift);
	else
		free(buf);
}

void tdr_bufpool_init(struct tdr_bufpool *pool, size_t max_idle)
{
	memset(pool, 0, sizeof(*pool));
	pool->max_idle = max_idle;
}

void tdr_bufpool_fini(struct tdr_bufpool *pool)
{
	for (unsigned i = 0; i < TDR_BUFPOOL_CLASSES; i++) {
		while (pool->idle[i]) {
			void *buf = pool->idle[i];

			pool->idle[i] = *(void **)buf;
			bufpool_free_class(buf, i + TDR_BUFPOOL_MIN_SHIFT);
		}
	}
	pool->idle_bytes = 0;
}

/* The size class of len: buffers of that class hold 1 << (shift) bytes. */
static unsigned bufpool_shift(size_t len)
{
	unsigned shift = TDR_BUFPOOL_MIN_SHIFT;

	while (shift < TDR_BUFPOOL_MAX_SHIFT && ((size_t)1 << shift) < len)
		shift++;
	return shift;
}

size_t tdr_bufpool_size(size_t len)
{
	return len > TDR_BUFPOOL_MAX_CLASS ? len : (size_t)1 << bufpool_shift(len);
}

bool tdr_bufpool_huge(size_t len)
{
	return len <= TDR_BUFPOOL_MAX_CLASS && bufpool_thp(bufpool_shift(len));
}

void tdr_bufpool_release(void *buf, size_t len)
{
	if (!buf)
		return;
	if (len > TDR_BUFPOOL_MAX_CLASS)
		free(buf);
	else
		bufpool_free_class(buf, bufpool_shift(len));
}

/* Keeps buf (of the class of shift) idle if the bound allows; else frees it. */
static void bufpool_keep(struct tdr_bufpool *pool, void *buf, unsigned shift)
{
	size_t size = (size_t)1 << shift;

	if (pool->idle_bytes + size > pool->max_idle) {
		bufpool_free_class(buf, shift);
		return;
	}
	*(void **)buf = pool->idle[shift - TDR_BUFPOOL_MIN_SHIFT];
	pool->idle[shift - TDR_BUFPOOL_MIN_SHIFT] = buf;
	pool->idle_bytes += size;
}

/* A new buffer of the class of shift (and, for huge-page classes, its siblings idle). */
static void *bufpool_alloc(struct tdr_bufpool *pool, unsigned shift)
{
	size_t size = (size_t)1 << shift;
	char *p;

	if (!bufpool_thp(shift))
		return tdr_io_alloc(size);
	p = bufpool_map(size < BUFPOOL_HUGE ? BUFPOOL_HUGE : size);
	if (!p)
		return NULL;
	for (size_t off = size; off < BUFPOOL_HUGE; off += size)
		bufpool_keep(pool, p + off, shift);
	return p;
}

void *tdr_bufpool_get(struct tdr_bufpool *pool, size_t len)
{
	unsigned shift;
	void *buf;

	if (len > TDR_BUFPOOL_MAX_CLASS)
		return tdr_io_alloc(len);
	shift = bufpool_shift(len);
	buf = pool->idle[shift - TDR_BUFPOOL_MIN_SHIFT];
	if (buf) {
		pool->idle[shift - TDR_BUFPOOL_MIN_SHIFT] = *(void **)buf;
		pool->idle_bytes -= (size_t)1 << shift;
		pool->hits++;
		return buf;
	}
	pool->misses++;
	/* The whole class size, so that any len of the class may reuse it. */
	return bufpool_alloc(pool, shift);
}

void tdr_bufpool_put(struct tdr_bufpool *pool, void *buf, size_t len)
{
	if (!buf)
		return;
	if (len > TDR_BUFPOOL_MAX_CLASS) {
		free(buf);
		return;
	}
	bufpool_keep(pool, buf, bufpool_shift(len));
}
