/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Loading and validating a VHD's metadata.  Everything read from the file is
 * checked before it is used; the first defect found is reported with a
 * distinct code and a message naming the file.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/vhd.h"

static const char *const defect_names[VHD_ERR__COUNT] = {
	[VHD_OK] = "ok",
	[VHD_ERR_IO] = "io",
	[VHD_ERR_NOMEM] = "nomem",
	[VHD_ERR_TRUNCATED] = "truncated",
	[VHD_ERR_FOOTER_COOKIE] = "footer-cookie",
	[VHD_ERR_FOOTER_CHECKSUM] = "footer-checksum",
	[VHD_ERR_FOOTER_VERSION] = "footer-version",
	[VHD_ERR_FOOTER_FEATURES] = "footer-features",
	[VHD_ERR_FOOTER_TYPE] = "footer-type",
	[VHD_ERR_FOOTER_SIZE] = "footer-size",
	[VHD_ERR_FOOTER_DATA_OFFSET] = "footer-data-offset",
	[VHD_ERR_FOOTER_SAVED_STATE] = "footer-saved-state",
	[VHD_ERR_BACKUP_FOOTER] = "backup-footer",
	[VHD_ERR_FOOTER_MISMATCH] = "footer-mismatch",
	[VHD_ERR_HEADER_COOKIE] = "header-cookie",
	[VHD_ERR_HEADER_CHECKSUM] = "header-checksum",
	[VHD_ERR_HEADER_VERSION] = "header-version",
	[VHD_ERR_HEADER_DATA_OFFSET] = "header-data-offset",
	[VHD_ERR_BLOCK_SIZE] = "block-size",
	[VHD_ERR_BAT_SIZE] = "bat-size",
	[VHD_ERR_BAT_OFFSET] = "bat-offset",
	[VHD_ERR_BAT_PAST_EOF] = "bat-past-eof",
	[VHD_ERR_BAT_METADATA] = "bat-metadata",
	[VHD_ERR_BAT_OVERLAP] = "bat-overlap",
	[VHD_ERR_LOCATOR] = "locator",
	[VHD_ERR_PARENT_FIELDS] = "parent-fields",
	[VHD_ERR_NO_PARENT] = "no-parent",
	[VHD_ERR_PARENT_MISSING] = "parent-missing",
	[VHD_ERR_PARENT_INVALID] = "parent-invalid",
	[VHD_ERR_PARENT_UUID] = "parent-uuid",
	[VHD_ERR_PARENT_TIMESTAMP] = "parent-timestamp",
	[VHD_ERR_PARENT_LOOP] = "parent-loop",
	[VHD_ERR_PARENT_SIZE] = "parent-size",
	[VHD_ERR_FIXED_SIZE] = "fixed-size",
	[VHD_ERR_STALE_DATA] = "stale-data",
	[VHD_ERR_BUSY] = "in-use",
};

const char *vhd_defect_name(enum vhd_defect d)
{
	if ((unsigned)d >= VHD_ERR__COUNT || !defect_names[d])
		return "unknown";
	return defect_names[d];
}

static int defect_errno(enum vhd_defect d)
{
	switch (d) {
	case VHD_OK:
		return 0;
	case VHD_ERR_IO:
		return -EIO;
	case VHD_ERR_NOMEM:
		return -ENOMEM;
	case VHD_ERR_PARENT_MISSING:
		return -ENOENT;
	case VHD_ERR_BUSY:
		return -EBUSY;
	case VHD_ERR_PARENT_LOOP:
		return -ELOOP;
	case VHD_ERR_PARENT_UUID:
	case VHD_ERR_PARENT_TIMESTAMP:
		return -ESTALE;
	default:
		return -EINVAL;
	}
}

static int vfail(struct vhd_error *err, enum vhd_defect d, const char *fmt, va_list ap)
{
	if (err) {
		err->code = d;
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	}
	return defect_errno(d);
}

int vhd_fail(struct vhd_error *err, enum vhd_defect d, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vfail(err, d, fmt, ap);
	va_end(ap);
	return r;
}

int vhd_src_fd_pread(void *ctx, void *buf, size_t len, uint64_t off)
{
	int fd = (int)(intptr_t)ctx;
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		done += (size_t)n;
	}
	return 0;
}

static uint64_t pad512(uint64_t v)
{
	return (v + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int src_read(const struct vhd_src *src, void *buf, size_t len, uint64_t off,
		    const char *what, struct vhd_error *err)
{
	int r;

	if (off > src->size || len > src->size - off)
		return vhd_fail(err, VHD_ERR_TRUNCATED,
				"%s: truncated: the %s at offset %llu (%zu bytes) lies past the end of the file (%llu bytes)",
				src->name, what, (unsigned long long)off, len,
				(unsigned long long)src->size);
	r = src->pread(src->ctx, buf, len, off);
	if (r < 0)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot read the %s at offset %llu: %s",
				src->name, what, (unsigned long long)off, strerror(-r));
	return 0;
}

/*
 * Early XenServer tools ("tap", versions 0.1 and 1.1) set blktap's hidden
 * byte without sealing the footer again; blktap accepts such a footer when
 * its checksum is right with the byte cleared, and so do we, or those
 * users' old snapshot chains would not open.
 */
static bool legacy_hidden_checksum(const struct vhd_footer *f)
{
	struct vhd_footer shown = *f;

	if (!f->hidden || memcmp(f->creator_app, "tap", 3) ||
	    (f->creator_version != 0x00000001u && f->creator_version != 0x00010001u))
		return false;
	shown.hidden = 0;
	return vhd_footer_checksum(&shown) == f->checksum;
}

/* Checks one footer; returns VHD_OK or the defect, with a message in why. */
static enum vhd_defect footer_defect(const struct vhd_footer *f, char *why, size_t len)
{
	uint32_t sum;

	if (memcmp(f->cookie, VHD_COOKIE, 8)) {
		snprintf(why, len, "bad cookie (not \"conectix\"): not a VHD, or the footer is damaged");
		return VHD_ERR_FOOTER_COOKIE;
	}
	sum = vhd_footer_checksum(f);
	if (sum != f->checksum && !legacy_hidden_checksum(f)) {
		snprintf(why, len, "bad checksum: stored 0x%08x, computed 0x%08x", f->checksum, sum);
		return VHD_ERR_FOOTER_CHECKSUM;
	}
	if ((f->version >> 16) != 1) {
		snprintf(why, len, "unsupported file format version 0x%08x (expected 0x00010000)",
			 f->version);
		return VHD_ERR_FOOTER_VERSION;
	}
	if (!(f->features & VHD_FEATURE_RESERVED) ||
	    (f->features & ~(VHD_FEATURE_RESERVED | VHD_FEATURE_TEMPORARY))) {
		snprintf(why, len, "bad features 0x%08x (the reserved bit 0x2 must be set, no unknown bits)",
			 f->features);
		return VHD_ERR_FOOTER_FEATURES;
	}
	if (f->type != VHD_TYPE_FIXED && f->type != VHD_TYPE_DYNAMIC && f->type != VHD_TYPE_DIFF) {
		snprintf(why, len, "unsupported disk type %u (expected 2 fixed, 3 dynamic or 4 differencing)",
			 f->type);
		return VHD_ERR_FOOTER_TYPE;
	}
	if (f->current_size % VHD_SECTOR_SIZE || f->current_size > (1ull << 48)) {
		snprintf(why, len, "bad current size %llu (must be a multiple of 512 and below 256 TiB)",
			 (unsigned long long)f->current_size);
		return VHD_ERR_FOOTER_SIZE;
	}
	if (f->saved_state > 1) {
		snprintf(why, len, "bad saved state %u (must be 0 or 1)", f->saved_state);
		return VHD_ERR_FOOTER_SAVED_STATE;
	}
	return VHD_OK;
}

static enum vhd_defect footer_place_defect(const struct vhd_footer *f, uint64_t size, char *why,
					   size_t len)
{
	if (f->type == VHD_TYPE_FIXED)
		return VHD_OK;
	if (f->data_offset % VHD_SECTOR_SIZE || f->data_offset < VHD_FOOTER_SIZE ||
	    f->data_offset > size || size - f->data_offset < VHD_HEADER_SIZE + VHD_FOOTER_SIZE) {
		snprintf(why, len, "bad data offset %llu: the dynamic header must lie between the footer copy and the footer",
			 (unsigned long long)f->data_offset);
		return VHD_ERR_FOOTER_DATA_OFFSET;
	}
	return VHD_OK;
}

static void meta_free_locators(struct vhd_meta *m)
{
	for (int i = 0; i < VHD_MAX_LOCATORS; i++) {
		free(m->loc_path[i]);
		m->loc_path[i] = NULL;
	}
}

void vhd_meta_free(struct vhd_meta *m)
{
	vhd_big_free(m->bat, m->bat_alloc);
	m->bat = NULL;
	m->bat_alloc = 0;
	meta_free_locators(m);
}

/* A locator's reserved space in bytes: sectors per the spec, bytes as written
 * by Windows and blktap; a value below 512 can only be sectors. */
static uint64_t locator_space(const struct vhd_locator *l)
{
	if (l->data_space < VHD_SECTOR_SIZE)
		return (uint64_t)l->data_space * VHD_SECTOR_SIZE;
	return l->data_space;
}

/* Turns a Windows path into a POSIX one: '\' -> '/', drops "C:". */
static void windows_to_posix(char *p)
{
	char *s;

	if (((p[0] >= 'A' && p[0] <= 'Z') || (p[0] >= 'a' && p[0] <= 'z')) && p[1] == ':')
		memmove(p, p + 2, strlen(p + 2) + 1);
	for (s = p; *s; s++)
		if (*s == '\\')
			*s = '/';
}

struct region {
	uint64_t off, len;
	const char *what;
};

static int load_locators(struct vhd_meta *m, const struct vhd_src *src, struct region *reg,
			 int *nreg, struct vhd_error *err)
{
	const struct vhd_header *h = &m->header;
	uint64_t end = m->file_size - VHD_FOOTER_SIZE;
	int i, j, r;

	for (i = 0; i < VHD_MAX_LOCATORS; i++) {
		const struct vhd_locator *l = &h->loc[i];
		uint64_t space;
		uint8_t *raw;
		char *path;

		switch (l->code) {
		case VHD_PLAT_NONE:
			continue;
		case VHD_PLAT_WI2R:
		case VHD_PLAT_WI2K:
		case VHD_PLAT_W2RU:
		case VHD_PLAT_W2KU:
		case VHD_PLAT_MAC:
		case VHD_PLAT_MACX:
			break;
		default:
			return vhd_fail(err, VHD_ERR_LOCATOR,
					"%s: parent locator %d has unknown platform code 0x%08x",
					src->name, i, l->code);
		}
		space = locator_space(l);
		if (!l->data_len || l->data_len > space || l->data_len > VHD_LOCATOR_MAX)
			return vhd_fail(err, VHD_ERR_LOCATOR,
					"%s: parent locator %d (%s) has bad length %u (space %llu bytes, at most %u)",
					src->name, i, vhd_plat_name(l->code), l->data_len,
					(unsigned long long)space, VHD_LOCATOR_MAX);
		if (l->data_offset < VHD_FOOTER_SIZE || l->data_offset > end ||
		    space > end - l->data_offset)
			return vhd_fail(err, VHD_ERR_LOCATOR,
					"%s: parent locator %d (%s) at offset %llu (%llu bytes) lies outside the file's metadata area",
					src->name, i, vhd_plat_name(l->code),
					(unsigned long long)l->data_offset,
					(unsigned long long)space);
		for (j = 0; j < *nreg; j++)
			if (overlaps(l->data_offset, space, reg[j].off, reg[j].len))
				return vhd_fail(err, VHD_ERR_LOCATOR,
						"%s: parent locator %d (%s) at offset %llu overlaps the %s",
						src->name, i, vhd_plat_name(l->code),
						(unsigned long long)l->data_offset, reg[j].what);
		reg[*nreg].off = l->data_offset;
		reg[*nreg].len = space;
		reg[*nreg].what = "parent locators";
		(*nreg)++;
		if (l->data_offset + space > m->meta_end)
			m->meta_end = l->data_offset + space;

		if (l->code != VHD_PLAT_MACX && l->code != VHD_PLAT_W2KU && l->code != VHD_PLAT_W2RU)
			continue;
		raw = malloc(l->data_len);
		path = malloc((size_t)l->data_len * 2 + 1);
		if (!raw || !path) {
			free(raw);
			free(path);
			return vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", src->name);
		}
		r = src_read(src, raw, l->data_len, l->data_offset, "parent locator", err);
		if (r < 0) {
			free(raw);
			free(path);
			return r;
		}
		if (l->code == VHD_PLAT_MACX) {
			memcpy(path, raw, l->data_len);
			path[l->data_len] = '\0';
			if (strlen(path) != l->data_len && strlen(path) + 1 != l->data_len)
				r = -1;
			else if (strncmp(path, "file://", 7))
				r = -1;
			else
				memmove(path, path + 7, strlen(path + 7) + 1);
		} else {
			r = vhd_utf16_decode(raw, l->data_len, false, path, (size_t)l->data_len * 2 + 1)
				< 0 ? -1 : 0;
			if (!r)
				windows_to_posix(path);
		}
		free(raw);
		if (r < 0 || !path[0]) {
			free(path);
			return vhd_fail(err, VHD_ERR_LOCATOR,
					"%s: parent locator %d (%s) does not hold a valid %s",
					src->name, i, vhd_plat_name(l->code),
					l->code == VHD_PLAT_MACX ? "file:// URL in UTF-8" : "UTF-16 path");
		}
		m->loc_path[i] = path;
	}
	return 0;
}

/* blktap ("tap" creator, version >= 1.1) may keep a "batmap" right after the BAT. */
/*
 * A header we do not recognise is ignored.  One whose map runs past the end
 * of the file is refused: ignored, it would become valid once the driver
 * grew the file, and the blocks placed meanwhile would lie inside it
 * (found by fuzz-vhd-driver).
 */
static int find_batmap(struct vhd_meta *m, const struct vhd_src *src, uint64_t bat_end,
		       struct vhd_error *err)
{
	uint8_t b[VHD_SECTOR_SIZE];
	uint64_t off, secs;

	if (memcmp(m->footer.creator_app, "tap", 3) || m->footer.creator_version < 0x00010001)
		return 0;
	if (bat_end > src->size || src->size - bat_end < VHD_SECTOR_SIZE)
		return 0;
	if (src->pread(src->ctx, b, sizeof(b), bat_end) || memcmp(b, "tdbatmap", 8))
		return 0;
	off = ((uint64_t)b[8] << 56) | ((uint64_t)b[9] << 48) | ((uint64_t)b[10] << 40) |
	      ((uint64_t)b[11] << 32) | ((uint64_t)b[12] << 24) | ((uint64_t)b[13] << 16) |
	      ((uint64_t)b[14] << 8) | b[15];
	secs = ((uint64_t)b[16] << 24) | ((uint64_t)b[17] << 16) | ((uint64_t)b[18] << 8) | b[19];
	if (off < bat_end + VHD_SECTOR_SIZE || off % VHD_SECTOR_SIZE || secs > (1u << 20))
		return 0;
	if (off > src->size || secs * VHD_SECTOR_SIZE > src->size - off)
		return vhd_fail(err, VHD_ERR_TRUNCATED,
				"%s: the batmap header at offset %llu describes a map that ends at offset %llu, past the end of the file (%llu bytes)",
				src->name, (unsigned long long)bat_end,
				(unsigned long long)(off + secs * VHD_SECTOR_SIZE),
				(unsigned long long)src->size);
	m->batmap_off = bat_end;
	m->batmap_len = off + secs * VHD_SECTOR_SIZE - bat_end;
	return 0;
}

struct blk_ext {
	uint64_t start, end;
	uint32_t block;
};

static int cmp_ext(const void *a, const void *b)
{
	const struct blk_ext *x = a, *y = b;

	return x->start < y->start ? -1 : x->start > y->start;
}

static int check_bat(struct vhd_meta *m, const struct vhd_src *src, const struct region *reg,
		     int nreg, uint64_t limit, struct vhd_error *err)
{
	uint64_t bs = m->header.block_size, bm = (uint64_t)m->bm_secs * VHD_SECTOR_SIZE;
	struct blk_ext *ext;
	uint32_t b, n = 0;
	int i, r = 0;

	ext = malloc(sizeof(*ext) * (m->bat_entries ? m->bat_entries : 1));
	if (!ext)
		return vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", src->name);
	m->data_end = m->meta_end;
	for (b = 0; b < m->bat_entries; b++) {
		uint64_t start, need;

		if (m->bat[b] == VHD_BAT_UNUSED)
			continue;
		start = (uint64_t)m->bat[b] << VHD_SECTOR_SHIFT;
		/* A last, partial block only needs the part inside the disk. */
		need = bs;
		if ((uint64_t)b * bs < m->footer.current_size &&
		    m->footer.current_size - (uint64_t)b * bs < bs)
			need = pad512(m->footer.current_size - (uint64_t)b * bs);
		need += bm;
		if (start > limit || need > limit - start) {
			r = vhd_fail(err, VHD_ERR_BAT_PAST_EOF,
				     "%s: BAT entry %u points at offset %llu, past the end of the data area (%llu); the file is truncated or the BAT is damaged",
				     src->name, b, (unsigned long long)start, (unsigned long long)limit);
			goto out;
		}
		for (i = 0; i < nreg; i++)
			if (overlaps(start, need, reg[i].off, reg[i].len)) {
				r = vhd_fail(err, VHD_ERR_BAT_METADATA,
					     "%s: BAT entry %u points at offset %llu, inside the %s",
					     src->name, b, (unsigned long long)start, reg[i].what);
				goto out;
			}
		ext[n].start = start;
		ext[n].end = start + need;
		ext[n].block = b;
		n++;
		if (start + bm + bs > m->data_end)
			m->data_end = start + bm + bs;
	}
	qsort(ext, n, sizeof(*ext), cmp_ext);
	for (b = 1; b < n; b++)
		if (ext[b].start < ext[b - 1].end) {
			r = vhd_fail(err, VHD_ERR_BAT_OVERLAP,
				     "%s: blocks %u and %u overlap (offsets %llu and %llu)", src->name,
				     ext[b - 1].block, ext[b].block,
				     (unsigned long long)ext[b - 1].start,
				     (unsigned long long)ext[b].start);
			goto out;
		}
	m->allocated = n;
out:
	free(ext);
	return r;
}

static int load_dynamic(struct vhd_meta *m, const struct vhd_src *src, unsigned flags,
			struct vhd_error *err)
{
	struct vhd_header *h = &m->header;
	struct region reg[4 + VHD_MAX_LOCATORS];
	uint8_t buf[VHD_HEADER_SIZE];
	uint64_t bat_bytes, limit, blocks;
	int nreg = 0, r;
	uint32_t sum;

	r = src_read(src, buf, sizeof(buf), m->footer.data_offset, "dynamic header", err);
	if (r < 0)
		return r;
	vhd_header_decode(h, buf);
	if (memcmp(h->cookie, VHD_HEADER_COOKIE, 8))
		return vhd_fail(err, VHD_ERR_HEADER_COOKIE,
				"%s: dynamic header at offset %llu has a bad cookie (not \"cxsparse\")",
				src->name, (unsigned long long)m->footer.data_offset);
	sum = vhd_header_checksum(h);
	if (sum != h->checksum)
		return vhd_fail(err, VHD_ERR_HEADER_CHECKSUM,
				"%s: dynamic header has a bad checksum: stored 0x%08x, computed 0x%08x",
				src->name, h->checksum, sum);
	if (h->version != VHD_HEADER_VERSION)
		return vhd_fail(err, VHD_ERR_HEADER_VERSION,
				"%s: dynamic header has unsupported version 0x%08x (expected 0x00010000)",
				src->name, h->version);
	if (h->data_offset != VHD_DATA_OFFSET_NONE)
		return vhd_fail(err, VHD_ERR_HEADER_DATA_OFFSET,
				"%s: dynamic header's data offset is 0x%llx (must be 0xFFFFFFFFFFFFFFFF)",
				src->name, (unsigned long long)h->data_offset);
	if (h->block_size < VHD_BLOCK_SIZE_MIN || h->block_size > VHD_BLOCK_SIZE_MAX ||
	    (h->block_size & (h->block_size - 1)))
		return vhd_fail(err, VHD_ERR_BLOCK_SIZE,
				"%s: bad block size %u (must be a power of two from 512 bytes to 256 MiB)",
				src->name, h->block_size);
	m->spb = h->block_size >> VHD_SECTOR_SHIFT;
	m->bm_secs = vhd_bitmap_secs(h->block_size);
	/*
	 * In 64 bits: a large size in small blocks needs more than 2^32
	 * entries, and a count cut to 32 bits would pass with a tiny BAT
	 * that every read past it overruns.
	 */
	blocks = (m->footer.current_size + h->block_size - 1) / h->block_size;
	if (h->max_bat_entries < blocks)
		return vhd_fail(err, VHD_ERR_BAT_SIZE,
				"%s: the BAT has %u entries, too few for %llu bytes in blocks of %u (%llu needed)",
				src->name, h->max_bat_entries,
				(unsigned long long)m->footer.current_size, h->block_size,
				(unsigned long long)blocks);
	m->blocks = (uint32_t)blocks;

	/* Metadata regions a block or locator must stay out of. */
	reg[nreg++] = (struct region){ 0, VHD_FOOTER_SIZE, "footer copy" };
	reg[nreg++] = (struct region){ m->footer.data_offset, VHD_HEADER_SIZE, "dynamic header" };
	bat_bytes = pad512((uint64_t)h->max_bat_entries * 4);
	if (h->table_offset % VHD_SECTOR_SIZE || h->table_offset > m->file_size ||
	    bat_bytes > m->file_size - VHD_FOOTER_SIZE ||
	    h->table_offset > m->file_size - VHD_FOOTER_SIZE - bat_bytes)
		return vhd_fail(err, VHD_ERR_BAT_OFFSET,
				"%s: the BAT at offset %llu (%llu bytes) is unaligned or runs past the end of the file (%llu bytes)",
				src->name, (unsigned long long)h->table_offset,
				(unsigned long long)bat_bytes, (unsigned long long)m->file_size);
	for (int i = 0; i < nreg; i++)
		if (overlaps(h->table_offset, bat_bytes, reg[i].off, reg[i].len))
			return vhd_fail(err, VHD_ERR_BAT_OFFSET,
					"%s: the BAT at offset %llu overlaps the %s", src->name,
					(unsigned long long)h->table_offset, reg[i].what);
	reg[nreg++] = (struct region){ h->table_offset, bat_bytes, "BAT" };
	m->meta_end = m->footer.data_offset + VHD_HEADER_SIZE;
	if (h->table_offset + bat_bytes > m->meta_end)
		m->meta_end = h->table_offset + bat_bytes;

	r = find_batmap(m, src, h->table_offset + bat_bytes, err);
	if (r < 0)
		return r;
	if (m->batmap_len) {
		reg[nreg++] = (struct region){ m->batmap_off, m->batmap_len, "batmap" };
		if (m->batmap_off + m->batmap_len > m->meta_end)
			m->meta_end = m->batmap_off + m->batmap_len;
	}

	if (m->footer.type != VHD_TYPE_DIFF) {
		bool locs = false;

		for (int i = 0; i < VHD_MAX_LOCATORS; i++)
			if (h->loc[i].code != VHD_PLAT_NONE)
				locs = true;
		if (!vhd_all_zero(h->parent_uuid, 16) || h->parent_timestamp ||
		    !vhd_all_zero(h->parent_name, sizeof(h->parent_name)) || locs)
			return vhd_fail(err, VHD_ERR_PARENT_FIELDS,
					"%s: a %s disk has parent fields set (UUID, timestamp, name or locators)",
					src->name, vhd_type_name(m->footer.type));
	} else {
		if (vhd_utf16_decode(h->parent_name, sizeof(h->parent_name), true, m->parent_name,
				     sizeof(m->parent_name)) < 0)
			return vhd_fail(err, VHD_ERR_NO_PARENT,
					"%s: the parent's unicode name is not valid UTF-16", src->name);
		r = load_locators(m, src, reg, &nreg, err);
		if (r < 0)
			return r;
		if (!m->parent_name[0] && !m->loc_path[0] && !m->loc_path[1] && !m->loc_path[2] &&
		    !m->loc_path[3] && !m->loc_path[4] && !m->loc_path[5] && !m->loc_path[6] &&
		    !m->loc_path[7])
			return vhd_fail(err, VHD_ERR_NO_PARENT,
					"%s: differencing disk without a parent name or locator; it cannot be used",
					src->name);
	}

	/* Read and decoded in place: one buffer, its pages mapped up front. */
	m->bat = vhd_big_alloc(bat_bytes);
	if (!m->bat)
		return vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory for a BAT of %u entries",
				src->name, h->max_bat_entries);
	m->bat_alloc = bat_bytes;
	r = src_read(src, m->bat, bat_bytes, h->table_offset, "BAT", err);
	if (r < 0)
		return r;
	vhd_bat_decode(m->bat, m->bat, h->max_bat_entries);
	m->bat_entries = h->max_bat_entries;

	/* With the footer lost, blocks may run up to the end of the file. */
	limit = m->used_backup ? m->file_size : m->file_size - VHD_FOOTER_SIZE;
	r = check_bat(m, src, reg, nreg, limit, err);
	(void)flags;
	return r;
}

int vhd_meta_load(struct vhd_meta *m, const struct vhd_src *src, unsigned flags,
		  struct vhd_error *err)
{
	uint8_t prim[VHD_FOOTER_SIZE], back[VHD_FOOTER_SIZE];
	struct vhd_footer bf;
	enum vhd_defect d, bd = VHD_ERR_TRUNCATED;
	char why[256], bwhy[256];
	int r;

	memset(m, 0, sizeof(*m));
	vhd_error_clear(err);
	m->file_size = src->size;
	if (src->size < VHD_FOOTER_SIZE)
		return vhd_fail(err, VHD_ERR_TRUNCATED,
				"%s: truncated: %llu bytes is shorter than a VHD footer (512 bytes)",
				src->name, (unsigned long long)src->size);

	r = src_read(src, prim, sizeof(prim), src->size - VHD_FOOTER_SIZE, "footer", err);
	if (r < 0)
		return r;
	vhd_footer_decode(&m->footer, prim);
	m->footer_off = src->size - VHD_FOOTER_SIZE;
	d = footer_defect(&m->footer, why, sizeof(why));
	if (d == VHD_OK)
		d = footer_place_defect(&m->footer, src->size, why, sizeof(why));

	/* Dynamic disks keep a copy at offset 0; fixed ones have data there. */
	if (src->size >= 2 * VHD_FOOTER_SIZE) {
		r = src_read(src, back, sizeof(back), 0, "footer copy", err);
		if (r < 0)
			return r;
		vhd_footer_decode(&bf, back);
		bd = footer_defect(&bf, bwhy, sizeof(bwhy));
		if (bd == VHD_OK && bf.type == VHD_TYPE_FIXED) {
			bd = VHD_ERR_FOOTER_TYPE;
			snprintf(bwhy, sizeof(bwhy), "a fixed disk has no footer copy");
		}
		if (bd == VHD_OK)
			bd = footer_place_defect(&bf, src->size, bwhy, sizeof(bwhy));
	}

	if (d != VHD_OK) {
		if (bd == VHD_OK && (flags & VHD_LOAD_USE_BACKUP)) {
			m->footer = bf;
			m->used_backup = true;
			m->footer_off = 0;
		} else if (bd == VHD_OK) {
			return vhd_fail(err, d,
					"%s: footer at the end of the file: %s; the copy at offset 0 is valid: run 'vhd-util repair -n %s'",
					src->name, why, src->name);
		} else {
			return vhd_fail(err, d, "%s: footer: %s", src->name, why);
		}
	}

	if (m->footer.type == VHD_TYPE_FIXED) {
		if (m->footer.current_size != src->size - VHD_FOOTER_SIZE)
			return vhd_fail(err, VHD_ERR_FIXED_SIZE,
					"%s: fixed disk of %llu bytes, but the file holds %llu bytes before its footer",
					src->name, (unsigned long long)m->footer.current_size,
					(unsigned long long)(src->size - VHD_FOOTER_SIZE));
		return 0;
	}

	if (!m->used_backup && !(flags & VHD_LOAD_IGNORE_BACKUP)) {
		if (bd != VHD_OK)
			return vhd_fail(err, VHD_ERR_BACKUP_FOOTER,
					"%s: footer copy at offset 0: %s; run 'vhd-util repair -n %s'",
					src->name, src->size < 2 * VHD_FOOTER_SIZE ? "missing" : bwhy,
					src->name);
		if (memcmp(prim, back, sizeof(prim)))
			return vhd_fail(err, VHD_ERR_FOOTER_MISMATCH,
					"%s: the footer copy at offset 0 differs from the footer at the end of the file",
					src->name);
	}
	return load_dynamic(m, src, flags, err);
}

/* ------------------------------------------------------------------ */
/* Parents */

static int try_candidate(const char *path, char *out, size_t outlen)
{
	char real[PATH_MAX];

	if (access(path, F_OK) != 0)
		return -1;
	if (!realpath(path, real) || strlen(real) >= outlen)
		return -1;
	strcpy(out, real);
	return 0;
}

int vhd_resolve_parent(const struct vhd_meta *m, const char *child_path, char *out,
		       size_t outlen, struct vhd_error *err)
{
	const char *cand[3 * VHD_MAX_LOCATORS + 1];
	bool relative[3 * VHD_MAX_LOCATORS + 1];
	char dir[PATH_MAX], real[PATH_MAX], tried[512], buf[2 * PATH_MAX];
	const char *slash, *base;
	int n = 0, i, pass;
	size_t tlen = 0;

	if (m->footer.type != VHD_TYPE_DIFF)
		return vhd_fail(err, VHD_ERR_NO_PARENT, "%s: a %s disk has no parent", child_path,
				vhd_type_name(m->footer.type));

	/*
	 * Pass 0: the relative locators (W2ru, a relative MacX or W2ku) and
	 * a relative parent name; 1: the absolute ones.  Relative first, as
	 * blktap resolves them: a chain copied or moved as a directory finds
	 * its own parent, not the one at the path it was made at (whose UUID
	 * a copy shares, so that no later check would stop a coalesce from
	 * writing into the other chain's parent).
	 */
	for (pass = 0; pass < 2; pass++) {
		for (i = 0; i < VHD_MAX_LOCATORS; i++) {
			const char *p = m->loc_path[i];
			uint32_t code = m->header.loc[i].code;

			if (!p || (p[0] == '/') != (pass == 1))
				continue;
			if (code == VHD_PLAT_W2RU || code == VHD_PLAT_W2KU || code == VHD_PLAT_MACX) {
				cand[n] = p;
				relative[n++] = pass == 0;
			}
		}
		if (m->parent_name[0] && (m->parent_name[0] == '/') == (pass == 1)) {
			cand[n] = m->parent_name;
			relative[n++] = pass == 0;
		}
	}
	if (!n)
		return vhd_fail(err, VHD_ERR_NO_PARENT,
				"%s: differencing disk without a parent name or locator", child_path);

	/*
	 * Relative to where the child really is: through a symbolic link to
	 * it, the link's directory is not the chain's.
	 */
	base = realpath(child_path, real) ? real : child_path;
	slash = strrchr(base, '/');
	if (slash) {
		size_t len = (size_t)(slash - base);

		if (len >= sizeof(dir))
			len = sizeof(dir) - 1;
		memcpy(dir, base, len ? len : 1);
		dir[len ? len : 1] = '\0';
	} else {
		strcpy(dir, ".");
	}

	tried[0] = '\0';
	for (i = 0; i < n; i++) {
		if (relative[i])
			snprintf(buf, sizeof(buf), "%s/%s", dir, cand[i]);
		else
			snprintf(buf, sizeof(buf), "%s", cand[i]);
		if (try_candidate(buf, out, outlen) == 0)
			return 0;
		if (tlen < sizeof(tried) - 1)
			tlen += (size_t)snprintf(tried + tlen, sizeof(tried) - tlen, "%s%s",
						 tlen ? ", " : "", buf);
	}
	return vhd_fail(err, VHD_ERR_PARENT_MISSING,
			"%s: parent not found (tried %s); restore the parent or fix its locators",
			child_path, tried);
}

/*
 * The checks a VHD and a raw parent share: not larger than the child, and
 * its modification time against the child's parent timestamp.  uuid_warned:
 * a UUID mismatch was let through (-I), whose warning a timestamp one must
 * not replace.
 */
static int check_parent_size_time(const struct vhd_meta *child, const char *child_path,
				  uint64_t parent_size, const char *parent_path,
				  int64_t parent_mtime, unsigned flags, bool uuid_warned,
				  struct vhd_error *err)
{
	uint32_t ts;

	if (parent_size > child->footer.current_size)
		return vhd_fail(err, VHD_ERR_PARENT_SIZE,
				"%s: parent %s (%llu bytes) is larger than the child (%llu bytes)",
				child_path, parent_path, (unsigned long long)parent_size,
				(unsigned long long)child->footer.current_size);
	ts = vhd_time_from_unix(parent_mtime);
	/* A replaced parent's timestamp differs too: keep the UUID warning. */
	if (child->header.parent_timestamp != ts && (!uuid_warned || (flags & VHD_PARENT_STRICT_TIME))) {
		char a[40], b[40];
		int r;

		vhd_time_format(child->header.parent_timestamp, a, sizeof(a));
		vhd_time_format(ts, b, sizeof(b));
		r = vhd_fail(err, VHD_ERR_PARENT_TIMESTAMP,
			     "%s: parent %s was modified since the child was made (parent timestamp %s, file modified %s)",
			     child_path, parent_path, a, b);
		if (flags & VHD_PARENT_STRICT_TIME)
			return r;
	}
	return 0;
}

int vhd_check_parent(const struct vhd_meta *child, const char *child_path,
		     const struct vhd_meta *parent, const char *parent_path, int64_t parent_mtime,
		     unsigned flags, struct vhd_error *err)
{
	char want[37], have[37];
	bool uuid_warned = false;

	vhd_error_clear(err);
	if (vhd_meta_parent_raw(child))
		return vhd_fail(err, VHD_ERR_PARENT_UUID,
				"%s: made over a raw parent (nil parent UUID), but %s is a VHD; the parent was replaced, do not use this chain",
				child_path, parent_path);
	if (memcmp(child->header.parent_uuid, parent->footer.uuid, 16)) {
		int r;

		vhd_uuid_format(child->header.parent_uuid, want);
		vhd_uuid_format(parent->footer.uuid, have);
		r = vhd_fail(err, VHD_ERR_PARENT_UUID,
			     "%s: parent UUID mismatch: it was made over %s but %s is %s; the parent was replaced, do not use this chain",
			     child_path, want, parent_path, have);
		if (!(flags & VHD_PARENT_IGNORE_UUID))
			return r;
		uuid_warned = true;
	}
	return check_parent_size_time(child, child_path, parent->footer.current_size, parent_path,
				      parent_mtime, flags, uuid_warned, err);
}

int vhd_check_raw_parent(const struct vhd_meta *child, const char *child_path,
			 uint64_t parent_size, const char *parent_path, int64_t parent_mtime,
			 unsigned flags, struct vhd_error *err)
{
	vhd_error_clear(err);
	if (!vhd_meta_parent_raw(child))
		return vhd_fail(err, VHD_ERR_PARENT_UUID,
				"%s: made over a VHD parent, but %s is a raw image; the parent was replaced, do not use this chain",
				child_path, parent_path);
	return check_parent_size_time(child, child_path, parent_size, parent_path, parent_mtime,
				      flags, false, err);
}
