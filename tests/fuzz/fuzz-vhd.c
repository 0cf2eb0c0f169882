/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: parse, validate and read a VHD given as bytes.
 * Metadata goes through vhd_meta_load() from memory (both with and without
 * the footer copy fallback); a file that validates is then opened through a
 * memfd with vhd_file_open() and read: bitmaps, sectors, locators, and the
 * stale-data scrub (vhd-util check -z).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tdr/vhd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct mem {
	const uint8_t *p;
	size_t n;
};

static int mem_pread(void *ctx, void *buf, size_t len, uint64_t off)
{
	const struct mem *m = ctx;

	if (off > m->n || len > m->n - off)
		return -EIO;
	memcpy(buf, m->p + off, len);
	return 0;
}

static void walk(const struct vhd_meta *m, const struct mem *mem)
{
	uint8_t map[VHD_SECTOR_SIZE * 8];
	volatile uint64_t sink = 0;

	if (!vhd_meta_dynamic(m))
		return;
	for (uint32_t b = 0; b < m->bat_entries && b < 4096; b++) {
		uint32_t i = 0, spb = m->spb;
		size_t len = (size_t)m->bm_secs * VHD_SECTOR_SIZE;

		if (m->bat[b] == VHD_BAT_UNUSED || len > sizeof(map))
			continue;
		/* validated: every allocated block's bitmap is inside the file */
		if (mem_pread((void *)mem, map, len, vhd_meta_block_off(m, b)))
			__builtin_trap();
		while (i < spb && i < len * 8) {
			bool set;
			uint32_t run = vhd_bitmap_run(map, i, spb - i, &set);

			sink += run + set;
			i += run;
		}
	}
	(void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct mem mem = { data, size };
	struct vhd_src src = { mem_pread, &mem, size, "fuzz.vhd" };
	struct vhd_error err;
	struct vhd_meta m;
	int r;

	r = vhd_meta_load(&m, &src, 0, &err);
	if (r == 0)
		walk(&m, &mem);
	else if (err.code == VHD_OK || !err.msg[0])
		__builtin_trap();	/* every failure names its defect */
	vhd_meta_free(&m);

	r = vhd_meta_load(&m, &src, VHD_LOAD_USE_BACKUP, &err);
	if (r == 0)
		walk(&m, &mem);
	vhd_meta_free(&m);

	/* The file layer on the same bytes. */
	if (size < (1u << 20)) {
		int fd = memfd_create("fuzz-vhd", MFD_CLOEXEC);
		char path[64];
		struct vhd_file *vf;

		if (fd < 0)
			return 0;
		if (write(fd, data, size) == (ssize_t)size) {
			snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
			if (vhd_file_open(&vf, path, VHD_FILE_RDONLY, &err) == 0) {
				uint64_t secs = vf->m.footer.current_size >> VHD_SECTOR_SHIFT;
				char buf[8 * VHD_SECTOR_SIZE];

				for (uint64_t s = 0; s < secs && s < 64 * 8; s += 8)
					(void)vhd_file_read(vf, s, secs - s < 8 ? (uint32_t)(secs - s) : 8, buf);
				if (vf->m.footer.type == VHD_TYPE_DYNAMIC) {
					struct vhd_scrub sc;

					(void)vhd_file_scrub(vf, false, &sc, NULL, NULL, &err);
				}
				vhd_file_close(vf);
			}
		}
		close(fd);
	}
	return 0;
}
