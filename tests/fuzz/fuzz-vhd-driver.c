/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the VHD *driver* (drivers/drv-vhd.c, asynchronous,
 * on the event loop) on a file given as bytes, checked against the VHD
 * library, which fuzz-vhd.c fuzzes on its own.
 *
 * The input is written to a memfd.  Then:
 *   1. vhd_file_check() (what vhd-util check runs) judges it;
 *   2. the driver opens it ("vhd:/proc/self/fd/N"); a file that check
 *      passed must open;
 *   3. the driver's reads of three ranges (the start, the middle, the end
 *      of the disk) must equal the library's reads of them;
 *   4. the driver writes a pattern over each range, reads it back, flushes
 *      and closes; the file must still pass check and the library must
 *      read the pattern back.
 * Steps 3 and 4 are for files that check passed.  A file that check
 * refuses but the driver opens anyway is only read (its reads must not
 * crash), never written: nothing would say what it should hold.
 *
 * FUZZ_VERBOSE=1 in the environment reports each valid input's ranges.
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-vhd.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/vhd.h"
#include "fuzz-table.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define RANGE_SECS 16u

extern const struct td_driver td_drv_vhd;

struct waiter {
	bool done;
	int err;
};

static void req_done(struct td_request *req, int err, void *arg)
{
	struct waiter *w = arg;

	(void)req;
	w->done = true;
	w->err = err;
}

static int run_req(struct tdr_loop *loop, struct td_disk *disk, enum td_op op, uint64_t sec,
		   uint32_t secs, char *buf)
{
	struct td_request req;
	struct waiter w = { false, 0 };
	uint64_t deadline = tdr_now_ns() + 10000000000ull;

	td_request_init(&req, op, sec, secs, buf, req_done, &w);
	td_disk_submit(disk, &req);
	while (!w.done) {
		if (tdr_loop_run_once(loop, 100) < 0 || tdr_now_ns() > deadline)
			__builtin_trap();
	}
	return w.err;
}

/* Closes once the driver's own work (footer, BAT syncs) is done too. */
static void close_disk(struct tdr_loop *loop, struct td_disk *disk)
{
	uint64_t deadline = tdr_now_ns() + 10000000000ull;

	while (td_disk_busy(disk, NULL)) {
		if (tdr_loop_run_once(loop, 100) < 0 || tdr_now_ns() > deadline)
			__builtin_trap();
	}
	td_disk_close(disk);
}

/* The library's view of [sec, sec + secs). */
static int lib_read(const char *path, uint64_t sec, uint32_t secs, char *buf)
{
	struct vhd_error err;
	struct vhd_file *vf;
	int r = vhd_file_open(&vf, path, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err);

	if (r < 0)
		return r;
	r = vhd_file_read(vf, sec, secs, buf);
	vhd_file_close(vf);
	return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct tdr_loop *loop;
	static struct tdr_io_ctx *io;
	static char *drv, *lib, *pat;
	struct vhd_error err;
	struct td_disk *disk = NULL;
	uint64_t secs, at[3];
	char path[64], spec[80];
	bool valid;
	int fd;

	if (size > (1u << 20))
		return 0;
	if (!loop) {
		tdr_log_init("fuzz-vhd-driver", false, TDR_LOG_ERR);
		fuzz_driver = &td_drv_vhd;	/* no aio or replica linked in */
		loop = tdr_loop_new();
		io = loop ? tdr_io_ctx_new(loop, 64) : NULL;
		drv = tdr_io_alloc(RANGE_SECS * TD_SECTOR_SIZE);
		lib = malloc(RANGE_SECS * TD_SECTOR_SIZE);
		pat = tdr_io_alloc(RANGE_SECS * TD_SECTOR_SIZE);
		if (!io || !drv || !lib || !pat)
			__builtin_trap();
	}
	fd = memfd_create("fuzz-vhd-driver", MFD_CLOEXEC);
	if (fd < 0)
		return 0;
	if (write(fd, data, size) != (ssize_t)size)
		goto out;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	snprintf(spec, sizeof(spec), "vhd:%s", path);

	valid = vhd_file_check(path, VHD_FILE_CHAIN, &err) == 0;
	if (td_disk_open(&disk, spec, TD_OPEN_QUIET, loop, io) < 0) {
		if (valid)
			__builtin_trap();	/* check passed it: the driver must open it */
		goto out;
	}
	if (!valid) {
		/* Opened although check refused it: read only, never write. */
		for (uint64_t s = 0; s < disk->size_secs && s < 64; s += RANGE_SECS)
			(void)run_req(loop, disk, TD_OP_READ, s, RANGE_SECS, drv);
		goto close;
	}

	secs = disk->size_secs;
	if (secs < RANGE_SECS)
		goto close;
	at[0] = 0;
	at[1] = secs / 2 / RANGE_SECS * RANGE_SECS;
	at[2] = secs - RANGE_SECS;
	for (int i = 0; i < 3; i++) {
		if (run_req(loop, disk, TD_OP_READ, at[i], RANGE_SECS, drv) < 0 ||
		    lib_read(path, at[i], RANGE_SECS, lib) < 0 ||
		    memcmp(drv, lib, RANGE_SECS * TD_SECTOR_SIZE))
			__builtin_trap();	/* the driver and the library disagree */
	}
	for (int i = 0; i < 3; i++) {
		memset(pat, 0x41 + i, RANGE_SECS * TD_SECTOR_SIZE);
		memcpy(pat, &at[i], sizeof(at[i]));
		if (run_req(loop, disk, TD_OP_WRITE, at[i], RANGE_SECS, pat) < 0 ||
		    run_req(loop, disk, TD_OP_READ, at[i], RANGE_SECS, drv) < 0 ||
		    memcmp(drv, pat, RANGE_SECS * TD_SECTOR_SIZE))
			__builtin_trap();	/* a write that does not read back */
	}
	if (run_req(loop, disk, TD_OP_FLUSH, 0, 0, NULL) < 0)
		__builtin_trap();
	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "valid, %llu sectors: read, written and read back at %llu, %llu, %llu\n",
			(unsigned long long)secs, (unsigned long long)at[0],
			(unsigned long long)at[1], (unsigned long long)at[2]);
	close_disk(loop, disk);
	disk = NULL;
	if (vhd_file_check(path, VHD_FILE_CHAIN, &err) != 0)
		__builtin_trap();	/* the driver's writes broke a valid file */
	for (int i = 0; i < 3; i++) {
		memset(pat, 0x41 + i, RANGE_SECS * TD_SECTOR_SIZE);
		memcpy(pat, &at[i], sizeof(at[i]));
		/* The end range overlaps the middle one only on tiny disks: last writer wins. */
		if (i < 2 && at[i] + RANGE_SECS > at[2])
			continue;
		if (i == 0 && at[0] + RANGE_SECS > at[1])
			continue;
		if (lib_read(path, at[i], RANGE_SECS, lib) < 0 ||
		    memcmp(lib, pat, RANGE_SECS * TD_SECTOR_SIZE))
			__builtin_trap();	/* not on disk after flush and close */
	}
close:
	if (disk)
		close_disk(loop, disk);
out:
	close(fd);
	return 0;
}
