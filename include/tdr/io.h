/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The asynchronous I/O backend: libaio with completions signalled on an
 * eventfd watched by the event loop.
 *
 * Requests are queued and submitted in one io_submit() per loop iteration
 * (a prepare hook), so a burst of guest requests costs one system call.  When
 * the kernel ring is full, the rest wait in a software queue.  The callback
 * receives the byte count or a negative errno; short transfers are reported
 * as they are (the caller decides whether a short read at EOF is zeroes).
 *
 * Fault injection (for crash-safety tests): after N successful writes
 * (pwrite, pwritev, fdsync count), the next one either fails with -EIO or
 * the process is killed with SIGKILL.  Set with tdr_io_set_fault() or the
 * environment variable TDR_FAULT_WRITES="N:fail" / "N:kill".
 */
#ifndef TDR_IO_H
#define TDR_IO_H

#include <libaio.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "tdr/loop.h"

struct tdr_io_ctx;
struct tdr_iocb;

typedef void (*tdr_io_cb)(struct tdr_iocb *io, ssize_t res, void *arg);

/* Embedded in the caller's per-request structure. */
struct tdr_iocb {
	struct iocb iocb;
	struct tdr_iocb *next;
	tdr_io_cb cb;
	void *arg;
	bool orphan;	/* set by tdr_io_orphan */
};

enum tdr_io_fault_mode {
	TDR_FAULT_NONE = 0,
	TDR_FAULT_FAIL,	/* the (N+1)th write completes with -EIO, and every later one too */
	TDR_FAULT_KILL,	/* the process dies with SIGKILL instead of submitting it */
};

/* The alignment every O_DIRECT buffer, offset and length must have. */
#define TDR_IO_ALIGN 4096

struct tdr_io_ctx *tdr_io_ctx_new(struct tdr_loop *loop, unsigned depth);
void tdr_io_ctx_free(struct tdr_io_ctx *ctx);

/*
 * Opens path with O_DIRECT, falling back to buffered I/O when the filesystem
 * refuses O_DIRECT (tmpfs).  *direct tells which one was used.  Returns the fd
 * or -errno.
 */
int tdr_io_open(const char *path, int flags, mode_t mode, bool *direct);

void tdr_io_pread(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, void *buf,
		  size_t len, uint64_t off, tdr_io_cb cb, void *arg);
void tdr_io_pwrite(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, const void *buf,
		   size_t len, uint64_t off, tdr_io_cb cb, void *arg);
/* Like tdr_io_pwrite, but durable when it completes (RWF_DSYNC: a file's FUA). */
void tdr_io_pwrite_dsync(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, const void *buf,
			 size_t len, uint64_t off, tdr_io_cb cb, void *arg);
void tdr_io_preadv(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd,
		   const struct iovec *iov, int iovcnt, uint64_t off, tdr_io_cb cb, void *arg);
void tdr_io_pwritev(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd,
		    const struct iovec *iov, int iovcnt, uint64_t off, tdr_io_cb cb, void *arg);
/* Durability barrier for everything written to fd before (IOCB_CMD_FDSYNC). */
void tdr_io_fdsync(struct tdr_io_ctx *ctx, struct tdr_iocb *io, int fd, tdr_io_cb cb, void *arg);

/*
 * The owner of a request still in flight goes away (an image closed while
 * its background sync runs): the request keeps its memory, mem (the block
 * the tdr_iocb is embedded in), and frees it when it completes instead of
 * calling back; if the context is freed first, tdr_io_ctx_free frees it.
 */
void tdr_io_orphan(struct tdr_iocb *io, void *mem);

/* Submits the queued batch now (normally done before each loop wait). */
void tdr_io_flush_queue(struct tdr_io_ctx *ctx);

/* Number of requests queued or in the kernel. */
unsigned tdr_io_inflight(const struct tdr_io_ctx *ctx);

void tdr_io_set_fault(struct tdr_io_ctx *ctx, enum tdr_io_fault_mode mode, uint64_t after_writes);
/*
 * After tdr_io_set_fault: only writes to the file at path count and fault
 * (to fail one image of a chain).  0 or -errno.
 */
int tdr_io_set_fault_file(struct tdr_io_ctx *ctx, const char *path);
/* Successful writes counted so far (for tests). */
uint64_t tdr_io_writes_done(const struct tdr_io_ctx *ctx);

/*
 * A journal of what the kernel takes, for power-cut tests
 * (tests/unit/powercut.c): fn is called with TDR_IO_J_SUBMIT for every
 * write, vectored write and sync as io_submit() accepts it, when its
 * buffers hold exactly what the disk will get, and with TDR_IO_J_DONE and
 * the result as it completes (also for a write that failed before
 * reaching the kernel, which had no SUBMIT).  A disk with a volatile
 * write cache may lose any write not yet made durable by a later sync,
 * and the journal holds what is needed to build every such file.
 * fn NULL turns it off; it costs one test per request when off.
 */
enum tdr_io_journal_event {
	TDR_IO_J_SUBMIT,
	TDR_IO_J_DONE,
};
typedef void (*tdr_io_journal_fn)(void *arg, enum tdr_io_journal_event ev,
				  const struct tdr_iocb *io, ssize_t res);
void tdr_io_set_journal(struct tdr_io_ctx *ctx, tdr_io_journal_fn fn, void *arg);

/* Allocates len bytes aligned for O_DIRECT; NULL on failure. */
void *tdr_io_alloc(size_t len);

/*
 * A cache of O_DIRECT buffers for callers that need one per request (the
 * NBD server's READ and WRITE data).  malloc serves buffers of a MiB or so
 * with a fresh mmap() and returns them with munmap() on free, so without a
 * cache every large request pays two system calls, a page fault per page
 * as the data is copied in, and a TLB flush: more than the copy itself in
 * a VM, where page faults and TLB flushes trap to the hypervisor.
 *
 * Buffers are kept in power-of-two size classes from TDR_IO_ALIGN up to
 * TDR_BUFPOOL_MAX_CLASS bytes (larger ones are not cached), most recently
 * freed first, while the idle ones total at most max_idle bytes.  From
 * 256 KiB up they are backed by transparent huge pages (io.c says why);
 * a miss in a class below 2 MiB maps a 2 MiB region and keeps the rest of
 * it idle.  The structure is embedded in its owner; it is not thread-safe
 * (one loop).
 */
#define TDR_BUFPOOL_MIN_SHIFT 12	/* TDR_IO_ALIGN */
#define TDR_BUFPOOL_MAX_SHIFT 25	/* 32 MiB: NBD's largest request */
#define TDR_BUFPOOL_MAX_CLASS ((size_t)1 << TDR_BUFPOOL_MAX_SHIFT)
#define TDR_BUFPOOL_CLASSES (TDR_BUFPOOL_MAX_SHIFT - TDR_BUFPOOL_MIN_SHIFT + 1)

struct tdr_bufpool {
	void *idle[TDR_BUFPOOL_CLASSES];	/* free lists, linked through the buffers */
	size_t idle_bytes;
	size_t max_idle;
	uint64_t hits, misses;			/* gets served from / not from the cache */
};

void tdr_bufpool_init(struct tdr_bufpool *pool, size_t max_idle);
/* Frees every idle buffer; buffers still out must be freed with tdr_bufpool_release(). */
void tdr_bufpool_fini(struct tdr_bufpool *pool);
/* Frees buf, got with tdr_bufpool_get(..., len), whose pool is gone; NULL is a no-op. */
void tdr_bufpool_release(void *buf, size_t len);
/* At least len bytes aligned for O_DIRECT, contents undefined; NULL on failure. */
void *tdr_bufpool_get(struct tdr_bufpool *pool, size_t len);
/* Returns buf, got with tdr_bufpool_get(pool, len) for the same len; NULL is a no-op. */
void tdr_bufpool_put(struct tdr_bufpool *pool, void *buf, size_t len);
/* The memory a buffer of len bytes really takes (its size class). */
size_t tdr_bufpool_size(size_t len);
/*
 * Whether buffers of len bytes come from 2 MiB-aligned regions backed by
 * transparent huge pages (from 256 KiB up to TDR_BUFPOOL_MAX_CLASS;
 * never under AddressSanitizer).
 */
bool tdr_bufpool_huge(size_t len);

#endif
