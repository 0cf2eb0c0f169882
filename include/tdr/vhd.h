/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * VHD images (Microsoft Virtual Hard Disk Image Format Specification, v1.0).
 *
 * Three layers:
 *   - format:   on-disk structures, big-endian encode/decode, checksums,
 *               geometry, timestamps, UTF-16 names, sector bitmaps;
 *   - validate: vhd_meta_load() reads and checks every piece of metadata of
 *               one file through a read callback (a file, or a memory buffer
 *               for the fuzzer) and names the first defect;
 *   - file:     synchronous open/create/snapshot/read/write/check and the
 *               maintenance operations (make-empty, coalesce, repair) used by
 *               vhd-util and the tests.
 * The asynchronous tapdisk driver "vhd" (drivers/drv-vhd.c) shares the first
 * two layers and adds the online make-empty and commit at the bottom.
 *
 * Layout of a dynamic or differencing file as we write it:
 *     0        footer copy (512)
 *     512      dynamic header (1024)
 *     1536     BAT (max_bat_entries * 4, padded to 512)
 *     ...      parent locators (differencing only)
 *     blocks   [sector bitmap, padded to 512][block_size bytes of data],
 *              placed so that the data starts on a 4 KiB boundary
 *     EOF-512  footer
 * Every offset in the BAT is in 512-byte sectors.  A set bitmap bit means the
 * sector is in this file; a clear one means "ask the parent" (differencing)
 * or "zero" (dynamic).  Bit order is MSB first: sector 0 is 0x80 of byte 0.
 */
#ifndef TDR_VHD_H
#define TDR_VHD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#define VHD_SECTOR_SIZE 512u
#define VHD_PAGE_SIZE 4096ull	/* file system block: direct I/O stays aligned to it */
#define VHD_SECTOR_SHIFT 9
#define VHD_FOOTER_SIZE 512u
#define VHD_HEADER_SIZE 1024u

#define VHD_COOKIE "conectix"
#define VHD_HEADER_COOKIE "cxsparse"
#define VHD_FILE_VERSION 0x00010000u
#define VHD_HEADER_VERSION 0x00010000u

#define VHD_FEATURE_TEMPORARY 0x00000001u
#define VHD_FEATURE_RESERVED  0x00000002u	/* must always be set */

#define VHD_TYPE_NONE    0u
#define VHD_TYPE_FIXED   2u
#define VHD_TYPE_DYNAMIC 3u
#define VHD_TYPE_DIFF    4u

#define VHD_OS_WINDOWS 0x5769326Bu	/* "Wi2k" */
#define VHD_OS_MAC     0x4D616320u	/* "Mac " */

/* Parent locator platform codes. */
#define VHD_PLAT_NONE 0x00000000u
#define VHD_PLAT_WI2R 0x57693272u	/* deprecated */
#define VHD_PLAT_WI2K 0x5769326Bu	/* deprecated */
#define VHD_PLAT_W2RU 0x57327275u	/* Windows relative path, UTF-16LE */
#define VHD_PLAT_W2KU 0x57326B75u	/* Windows absolute path, UTF-16LE */
#define VHD_PLAT_MAC  0x4D616320u	/* Mac OS alias blob */
#define VHD_PLAT_MACX 0x4D616358u	/* file:// URL, UTF-8 */

#define VHD_MAX_LOCATORS 8
#define VHD_BAT_UNUSED 0xFFFFFFFFu
#define VHD_BLOCK_SIZE_DEFAULT (2u << 20)
#define VHD_BLOCK_SIZE_MIN 512u
#define VHD_BLOCK_SIZE_MAX (256u << 20)
/* BAT entries are 32-bit sector numbers: the file must stay below 2 TiB. */
#define VHD_MAX_DISK_SIZE (2040ull << 30)
#define VHD_DATA_OFFSET_NONE 0xFFFFFFFFFFFFFFFFull
/* Seconds between the Unix epoch and the VHD one (2000-01-01 00:00:00 UTC). */
#define VHD_EPOCH_UNIX 946684800
/* Longest parent locator we accept (bytes). */
#define VHD_LOCATOR_MAX 8192u
/*
 * Our creator: blktap's "tap\0" at version 1.1 (big-endian bitmaps, batmap
 * optional), so that qemu's vpc driver takes the size from current_size (it
 * uses the CHS geometry for unknown creators) and blktap finds no batmap.
 */
#define VHD_CREATOR_APP "tap\0"
#define VHD_CREATOR_VERSION 0x00010001u

/* ------------------------------------------------------------------ */
/* On-disk structures, decoded to host order. */

struct vhd_footer {
	char cookie[8];
	uint32_t features;
	uint32_t version;
	uint64_t data_offset;
	uint32_t timestamp;
	char creator_app[4];
	uint32_t creator_version;
	uint32_t creator_os;
	uint64_t original_size;
	uint64_t current_size;
	uint16_t cylinders;
	uint8_t heads;
	uint8_t spt;
	uint32_t type;
	uint32_t checksum;
	uint8_t uuid[16];
	uint8_t saved_state;
	uint8_t hidden;		/* blktap's byte 85; 0 elsewhere */
	uint8_t reserved[426];
};

struct vhd_locator {
	uint32_t code;
	uint32_t data_space;	/* sectors per the spec; bytes as Windows and blktap write it */
	uint32_t data_len;	/* bytes */
	uint32_t reserved;
	uint64_t data_offset;	/* bytes from the start of the file */
};

struct vhd_header {
	char cookie[8];
	uint64_t data_offset;
	uint64_t table_offset;
	uint32_t version;
	uint32_t max_bat_entries;
	uint32_t block_size;
	uint32_t checksum;
	uint8_t parent_uuid[16];
	uint32_t parent_timestamp;
	uint32_t reserved1;
	uint8_t parent_name[512];	/* UTF-16BE, NUL-padded */
	struct vhd_locator loc[VHD_MAX_LOCATORS];
	uint8_t reserved2[256];
};

/* ------------------------------------------------------------------ */
/* Format (vhd-format.c) */

void vhd_footer_decode(struct vhd_footer *f, const void *buf512);
void vhd_footer_encode(const struct vhd_footer *f, void *buf512);
void vhd_header_decode(struct vhd_header *h, const void *buf1024);
void vhd_header_encode(const struct vhd_header *h, void *buf1024);
/* One's complement of the byte sum of the encoding, checksum field excluded. */
uint32_t vhd_footer_checksum(const struct vhd_footer *f);
uint32_t vhd_header_checksum(const struct vhd_header *h);
uint32_t vhd_checksum_bytes(const void *buf, size_t len, size_t csum_off);
/* Set the checksum field from the other fields. */
void vhd_footer_seal(struct vhd_footer *f);
void vhd_header_seal(struct vhd_header *h);

/* BAT entries: n big-endian u32 <-> host order (bat may be buf: in place). */
void vhd_bat_decode(uint32_t *bat, const void *buf, uint32_t n);
void vhd_bat_encode(const uint32_t *bat, void *buf, uint32_t n);

/* CHS geometry of the spec's appendix for a disk of size bytes. */
void vhd_geometry(uint64_t size, uint16_t *cyl, uint8_t *heads, uint8_t *spt);

uint32_t vhd_time_from_unix(int64_t t);
int64_t vhd_time_to_unix(uint32_t t);
uint32_t vhd_time_now(void);
/* "2024-01-31 12:00:00 UTC" */
void vhd_time_format(uint32_t t, char *out, size_t len);

/* UTF-8 <-> UTF-16 (BE or LE).  encode: bytes written or -1 if it does not
 * fit or is not UTF-8; decode: stops at a NUL code unit; -1 on bad input. */
ssize_t vhd_utf16_encode(const char *utf8, void *out, size_t outlen, bool big_endian);
ssize_t vhd_utf16_decode(const void *in, size_t inlen, bool big_endian, char *out, size_t outlen);

const char *vhd_type_name(uint32_t type);
const char *vhd_plat_name(uint32_t code);
void vhd_uuid_format(const uint8_t uuid[16], char out[37]);

/* Fills a footer for a new disk: cookie, features, version, timestamp,
 * our creator, sizes, geometry, type, fresh UUID (and the checksum). */
void vhd_footer_init(struct vhd_footer *f, uint32_t type, uint64_t size);
/* Fills a dynamic header with an empty parent (and the checksum). */
void vhd_header_init(struct vhd_header *h, uint64_t table_offset, uint32_t max_bat_entries,
		     uint32_t block_size);

static inline bool vhd_bitmap_test(const uint8_t *map, uint32_t bit)
{
	return (map[bit >> 3] >> (7 - (bit & 7))) & 1;
}

static inline void vhd_bitmap_set(uint8_t *map, uint32_t bit)
{
	map[bit >> 3] |= (uint8_t)(0x80u >> (bit & 7));
}

static inline void vhd_bitmap_clear(uint8_t *map, uint32_t bit)
{
	map[bit >> 3] &= (uint8_t)~(0x80u >> (bit & 7));
}

/* Sets or clears bits [first, first + n). */
void vhd_bitmap_set_range(uint8_t *map, uint32_t first, uint32_t n);
/* Length of the run of equal bits starting at first, at most max. */
uint32_t vhd_bitmap_run(const uint8_t *map, uint32_t first, uint32_t max, bool *set);
/* Whether all len bytes at p are zero. */
bool vhd_all_zero(const void *p, size_t len);

/*
 * Zeroed memory for a large table (a BAT: 2 MiB for 1 TiB), its pages
 * mapped at once, on a huge page from 2 MiB up where the kernel has one:
 * reading a 2 MiB BAT into fresh small pages, faulted in one by one, took
 * 8 ms in this project's VM; into a populated huge page, 0.3 ms.  Free
 * with vhd_big_free and the same len.  NULL on failure.
 */
void *vhd_big_alloc(size_t len);
void vhd_big_free(void *p, size_t len);

/* Sectors of bitmap in front of each block. */
static inline uint32_t vhd_bitmap_secs(uint32_t block_size)
{
	uint32_t bytes = ((block_size >> VHD_SECTOR_SHIFT) + 7) / 8;

	return (bytes + VHD_SECTOR_SIZE - 1) / VHD_SECTOR_SIZE;
}

/*
 * The first offset at or after from (bytes) where a block can start so that
 * its data, after bm_secs sectors of bitmap, is 4 KiB aligned (for O_DIRECT).
 */
static inline uint64_t vhd_block_place(uint64_t from, uint32_t bm_secs)
{
	uint64_t sec = (from + VHD_SECTOR_SIZE - 1) >> VHD_SECTOR_SHIFT;

	while ((sec + bm_secs) % 8)
		sec++;
	return sec << VHD_SECTOR_SHIFT;
}

/* Encodes the 512-byte BAT sector idx from bat (entries past n read 0xFF). */
void vhd_bat_sector(const uint32_t *bat, uint32_t n, uint32_t idx, void *out512);

/* ------------------------------------------------------------------ */
/* Validation (vhd-validate.c) */

/* Every defect check can find; each has a distinct name and test. */
enum vhd_defect {
	VHD_OK = 0,
	VHD_ERR_IO,			/* reading the file failed */
	VHD_ERR_NOMEM,
	VHD_ERR_TRUNCATED,		/* shorter than its metadata says */
	VHD_ERR_FOOTER_COOKIE,
	VHD_ERR_FOOTER_CHECKSUM,
	VHD_ERR_FOOTER_VERSION,
	VHD_ERR_FOOTER_FEATURES,
	VHD_ERR_FOOTER_TYPE,
	VHD_ERR_FOOTER_SIZE,		/* current size zero, unaligned or huge */
	VHD_ERR_FOOTER_DATA_OFFSET,
	VHD_ERR_FOOTER_SAVED_STATE,
	VHD_ERR_BACKUP_FOOTER,		/* copy at offset 0 invalid */
	VHD_ERR_FOOTER_MISMATCH,	/* copy at offset 0 differs from the footer */
	VHD_ERR_HEADER_COOKIE,
	VHD_ERR_HEADER_CHECKSUM,
	VHD_ERR_HEADER_VERSION,
	VHD_ERR_HEADER_DATA_OFFSET,
	VHD_ERR_BLOCK_SIZE,
	VHD_ERR_BAT_SIZE,		/* too few BAT entries for the size */
	VHD_ERR_BAT_OFFSET,		/* BAT misplaced: unaligned, in other metadata, past EOF */
	VHD_ERR_BAT_PAST_EOF,		/* a block runs into the footer or past EOF */
	VHD_ERR_BAT_METADATA,		/* a block overlaps the headers, BAT or locators */
	VHD_ERR_BAT_OVERLAP,		/* two blocks overlap */
	VHD_ERR_LOCATOR,		/* bad code, place or encoding */
	VHD_ERR_PARENT_FIELDS,		/* parent fields set on a non-differencing disk */
	VHD_ERR_NO_PARENT,		/* differencing disk without a usable parent name */
	VHD_ERR_PARENT_MISSING,		/* no candidate parent file exists */
	VHD_ERR_PARENT_INVALID,		/* the parent file itself fails validation */
	VHD_ERR_PARENT_UUID,
	VHD_ERR_PARENT_TIMESTAMP,
	VHD_ERR_PARENT_LOOP,
	VHD_ERR_PARENT_SIZE,		/* parent larger than the child */
	VHD_ERR_FIXED_SIZE,		/* fixed disk: file size is not size + 512 */
	VHD_ERR_STALE_DATA,		/* dynamic disk: data under clear bitmap bits */
	VHD_ERR_BUSY,			/* locked by another process (tdr/filelock.h) */
	VHD_ERR__COUNT
};

struct vhd_error {
	enum vhd_defect code;
	char msg[640];		/* "<file>: <defect>[; <what to do>]" */
};

/* err (may be NULL) to VHD_OK with no message, as each call that fills it starts. */
static inline void vhd_error_clear(struct vhd_error *err)
{
	if (err) {
		err->code = VHD_OK;
		err->msg[0] = '\0';
	}
}

/* Short stable name of a defect ("footer-checksum", ...). */
const char *vhd_defect_name(enum vhd_defect d);
/* Records a defect in err (if non-NULL); returns the matching -errno. */
int vhd_fail(struct vhd_error *err, enum vhd_defect d, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Where metadata is read from: a file or, in the fuzzer, memory. */
struct vhd_src {
	/* 0 on a full read, -errno otherwise (short read: -EIO). */
	int (*pread)(void *ctx, void *buf, size_t len, uint64_t off);
	void *ctx;
	uint64_t size;		/* file size in bytes */
	const char *name;	/* for messages */
};

struct vhd_meta {
	struct vhd_footer footer;	/* the footer in use */
	struct vhd_header header;	/* dynamic and differencing only */
	bool used_backup;		/* footer came from offset 0 */
	uint64_t file_size;
	uint64_t footer_off;		/* where the footer in use lives */

	/* dynamic and differencing only: */
	uint32_t *bat;			/* max_bat_entries, host order */
	size_t bat_alloc;		/* bytes of bat (vhd_big_alloc) */
	uint32_t bat_entries;
	uint32_t blocks;		/* ceil(current_size / block_size) */
	uint32_t spb;			/* sectors per block */
	uint32_t bm_secs;		/* bitmap sectors per block */
	uint32_t allocated;		/* allocated blocks */
	uint64_t meta_end;		/* first byte after every piece of metadata */
	uint64_t data_end;		/* end of the last block (>= meta_end) */
	uint64_t batmap_off, batmap_len;	/* blktap's batmap, if any (bytes) */

	char parent_name[1024];		/* decoded unicode name, UTF-8 */
	char *loc_path[VHD_MAX_LOCATORS];	/* decoded MacX/W2ku/W2ru, or NULL */
};

/* vhd_meta_load flags */
#define VHD_LOAD_USE_BACKUP  (1u << 0)	/* a bad footer at EOF: use the copy at 0 */
#define VHD_LOAD_IGNORE_BACKUP (1u << 1)	/* a valid footer at EOF: skip the copy at 0 */

/*
 * Reads and validates the footer, its copy, the dynamic header, the BAT and
 * the parent locators.  0, or -errno with err describing the first defect.
 * m must be freed with vhd_meta_free() either way.
 */
int vhd_meta_load(struct vhd_meta *m, const struct vhd_src *src, unsigned flags,
		  struct vhd_error *err);
void vhd_meta_free(struct vhd_meta *m);

static inline bool vhd_meta_dynamic(const struct vhd_meta *m)
{
	return m->footer.type == VHD_TYPE_DYNAMIC || m->footer.type == VHD_TYPE_DIFF;
}

/*
 * A differencing disk over a raw parent (a plain file or block device
 * holding the virtual disk's bytes, no VHD metadata): blktap marks it with
 * a nil parent UUID (vhd-util snapshot -m), and so do we.  The parent is
 * found through the locators as for a VHD parent.
 */
static inline bool vhd_meta_parent_raw(const struct vhd_meta *m)
{
	static const uint8_t nil[16];

	return m->footer.type == VHD_TYPE_DIFF && memcmp(m->header.parent_uuid, nil, 16) == 0;
}

/* Byte offset of block b's bitmap / of its data. */
static inline uint64_t vhd_meta_block_off(const struct vhd_meta *m, uint32_t b)
{
	return (uint64_t)m->bat[b] << VHD_SECTOR_SHIFT;
}

/* A source reading from an fd with pread (ctx = (void *)(intptr_t)fd). */
int vhd_src_fd_pread(void *ctx, void *buf, size_t len, uint64_t off);

/*
 * Finds the parent file of a differencing disk: the W2ku or MacX absolute
 * path, else W2ru (or a relative MacX) relative to the child's directory,
 * else the unicode name relative to the child's directory.  The first that
 * exists wins; out gets its absolute path.
 */
int vhd_resolve_parent(const struct vhd_meta *m, const char *child_path, char *out,
		       size_t outlen, struct vhd_error *err);

/* vhd_check_parent flags */
#define VHD_PARENT_STRICT_TIME (1u << 0)	/* a timestamp mismatch is an error */
#define VHD_PARENT_IGNORE_UUID (1u << 1)	/* a UUID mismatch is only a warning */

/*
 * Checks that parent is the disk child was made over: the UUID must match
 * and the parent must not be smaller.  The timestamp (the parent's
 * modification time when the child was made, per the spec) is compared with
 * parent_mtime; like blktap we only warn about a mismatch unless
 * VHD_PARENT_STRICT_TIME, because committing into the parent legitimately
 * changes it.  Returns 0 (err->code may then hold VHD_ERR_PARENT_TIMESTAMP, or
 * with VHD_PARENT_IGNORE_UUID VHD_ERR_PARENT_UUID, as a warning) or -errno.
 */
int vhd_check_parent(const struct vhd_meta *child, const char *child_path,
		     const struct vhd_meta *parent, const char *parent_path, int64_t parent_mtime,
		     unsigned flags, struct vhd_error *err);
/*
 * The same for a raw parent (vhd_meta_parent_raw) of parent_size bytes:
 * there is no UUID to compare, so only the size and the timestamp.
 */
int vhd_check_raw_parent(const struct vhd_meta *child, const char *child_path,
			 uint64_t parent_size, const char *parent_path, int64_t parent_mtime,
			 unsigned flags, struct vhd_error *err);
/*
 * Checks that fd (path) can be a raw parent and gives its size: a regular
 * file's length or a block device's size, a whole number of sectors, not
 * zero and not over VHD_MAX_DISK_SIZE (what a VHD child over it can
 * describe); and no VHD: a valid VHD footer at its end or start is
 * refused with VHD_ERR_PARENT_UUID.  0 or -errno with err naming path and
 * the defect.
 */
int vhd_raw_probe(int fd, const char *path, uint64_t *size, struct vhd_error *err);

/* ------------------------------------------------------------------ */
/* Synchronous files (vhd-file.c, vhd-ops.c) */

struct vhd_file {
	char *path;
	int fd;
	bool rdonly;
	struct vhd_meta m;
	uint64_t next_free;	/* bytes: where the next block's bitmap goes */
	struct vhd_file *parent;	/* opened with VHD_FILE_CHAIN */
	/*
	 * A raw parent (vhd_meta_parent_raw of its child): no VHD metadata.
	 * m is zero but for footer.type (VHD_TYPE_NONE), footer.current_size
	 * and file_size (its size), so reads and writes go straight to the
	 * file, as for a fixed disk.
	 */
	bool raw;
};

/* vhd_file_open flags */
#define VHD_FILE_RDONLY      (1u << 0)
#define VHD_FILE_USE_BACKUP  (1u << 1)	/* see VHD_LOAD_USE_BACKUP; forces read-only use */
#define VHD_FILE_CHAIN       (1u << 2)	/* also open and validate every parent */
#define VHD_FILE_STRICT_TIME (1u << 3)	/* see VHD_PARENT_STRICT_TIME */
/*
 * Take no lock (tdr/filelock.h) on this file: the caller already holds the
 * exclusive one through another descriptor (vhd_file_repair).  Parents
 * are still locked.
 */
#define VHD_FILE_NO_LOCK     (1u << 4)
/* See VHD_LOAD_IGNORE_BACKUP; forces read-only use (vhd_file_repair). */
#define VHD_FILE_IGNORE_BACKUP (1u << 5)
/*
 * See VHD_PARENT_IGNORE_UUID, for every parent of the chain (vhd-util check
 * -I, after an administrator replaced a parent on purpose); forces
 * read-only use: a chain that fails its UUID check is never written.
 */
#define VHD_FILE_IGNORE_PARENT_UUID (1u << 6)

int vhd_file_open(struct vhd_file **out, const char *path, unsigned flags,
		  struct vhd_error *err);
/*
 * Opens path as a raw image (a file or block device): read-only with
 * VHD_FILE_RDONLY, else read-write; locked as vhd_file_open locks.
 */
int vhd_file_open_raw(struct vhd_file **out, const char *path, unsigned flags,
		      struct vhd_error *err);
/*
 * vhd_check_parent or vhd_check_raw_parent, as parent is a VHD or raw:
 * whether parent (which need not be child->parent) is the image child was
 * made over.
 */
int vhd_file_check_parent(const struct vhd_file *child, const struct vhd_file *parent,
			  int64_t parent_mtime, unsigned flags, struct vhd_error *err);
/* Closes vf and its parents. */
void vhd_file_close(struct vhd_file *vf);

/* type: VHD_TYPE_FIXED or VHD_TYPE_DYNAMIC; block_size 0: the default. */
int vhd_file_create(const char *path, uint64_t size, uint32_t type, uint32_t block_size,
		    struct vhd_error *err);
/*
 * The same, with a BAT large enough for max_size bytes (blktap's
 * "metadata preallocation", so that the disk can later grow up to it
 * without moving data); max_size at most size: just size.  Dynamic only.
 */
int vhd_file_create_max(const char *path, uint64_t size, uint64_t max_size, uint32_t type,
			uint32_t block_size, struct vhd_error *err);
/*
 * Creates a differencing disk over parent (a VHD) with the parent's size
 * and block size, the parent's UUID, its mtime as parent timestamp, its
 * name, and MacX (absolute), W2ku (absolute) and W2ru (relative) locators.
 */
int vhd_file_snapshot(const char *path, const char *parent, struct vhd_error *err);
/* The same, with a BAT large enough for max_size bytes (as create_max). */
int vhd_file_snapshot_max(const char *path, const char *parent, uint64_t max_size,
			  struct vhd_error *err);
/*
 * A differencing disk over a raw parent (blktap's vhd-util snapshot -m):
 * the parent's size (a whole number of sectors), the default block size,
 * a nil parent UUID, the parent's mtime as parent timestamp, its name and
 * the same three locators.  max_size as in vhd_file_snapshot_max.
 */
int vhd_file_snapshot_raw(const char *path, const char *parent, uint64_t max_size,
			  struct vhd_error *err);

/* Reads through the chain: a clear bit goes to the parent, or reads zeroes. */
int vhd_file_read(struct vhd_file *vf, uint64_t sec, uint32_t secs, void *buf);
/* Writes into vf only, allocating blocks in the crash-safe order. */
int vhd_file_write(struct vhd_file *vf, uint64_t sec, uint32_t secs, const void *buf);
/* Whether sector sec has its bit set in vf (not its parents). */
int vhd_file_sector_present(struct vhd_file *vf, uint64_t sec, bool *present);
/* Reads block b's bitmap (bm_secs * 512 bytes into map); -ENOENT if unallocated. */
int vhd_file_read_bitmap(struct vhd_file *vf, uint32_t b, uint8_t *map);
/* pwrite() of all len bytes (retrying short writes and EINTR); 0 or -errno. */
int vhd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
/*
 * fdatasync(), fsync() and ftruncate() for the synchronous library: the
 * same results and errno, and each one that succeeds is reported to the
 * journal below.
 */
int vhd_fdatasync(int fd);
int vhd_fsync(int fd);
int vhd_ftruncate(int fd, uint64_t len);

/*
 * A journal of the synchronous library's writes, syncs and truncates
 * (vhd-util's path), for the power-cut tests (tests/unit/powercut.c), as
 * tdr_io_set_journal is for the daemon's asynchronous I/O.  Each call
 * that succeeded is reported once it returned: a write with its data
 * (each pwrite() of vhd_pwrite_all), a sync, a truncate with the new
 * length in off.  Process-wide, for tests only; fn NULL turns it off.
 */
enum vhd_sync_op {
	VHD_SYNC_WRITE,
	VHD_SYNC_DATASYNC,
	VHD_SYNC_FSYNC,
	VHD_SYNC_TRUNCATE,
};
typedef void (*vhd_sync_journal_fn)(void *arg, enum vhd_sync_op op, int fd, const void *buf,
				    size_t len, uint64_t off);
void vhd_sync_set_journal(vhd_sync_journal_fn fn, void *arg);
/*
 * Makes the file end with the footer fb at offset end (a multiple of 512):
 * the footer written there and made durable, then the length cut to
 * end + 512 and made durable.  Until the cut is durable the file's old
 * last 512 bytes, a valid footer, stay where readers look; after it, the
 * new one, already on disk.  0 or -errno.
 */
int vhd_file_end_at(int fd, const uint8_t fb[VHD_FOOTER_SIZE], uint64_t end);
/* Bytes the file occupies (its size). */
uint64_t vhd_file_phys_size(const struct vhd_file *vf);

/* Validates path and, with VHD_FILE_CHAIN, its whole chain. */
int vhd_file_check(const char *path, unsigned flags, struct vhd_error *err);

/* Drops every block: BAT entries cleared and durable, file truncated to the
 * metadata, footer rewritten.  Cost proportional to the allocated blocks. */
int vhd_file_make_empty(struct vhd_file *vf, struct vhd_error *err);

typedef void (*vhd_progress_fn)(void *arg, uint64_t done, uint64_t total);
/*
 * Writes every sector present in child into its parent (a VHD opened
 * read-write), then flushes the parent.  The virtual content of the child is
 * unchanged.  progress (may be NULL) is called after each block.
 */
int vhd_file_coalesce(const char *child, vhd_progress_fn progress, void *arg,
		      struct vhd_error *err);
/* Zeroes blktap's batmap (if m has one) through a buffered fd, so that it
 * never claims a dropped block is full. */
int vhd_meta_clear_batmap(int fd, const struct vhd_meta *m);
/* What vhd_file_scrub found (and zeroed, if asked). */
struct vhd_scrub {
	uint64_t blocks;		/* allocated blocks looked at */
	uint64_t stale_blocks;		/* of them, with data under a clear bit */
	uint64_t stale_sectors;		/* non-zero sectors under clear bits */
	uint32_t first_block, first_sector;	/* the first one found */
};

/*
 * Dynamic disks only: looks for non-zero data under clear bitmap bits, which
 * we read as zeroes but readers that ignore a dynamic disk's bitmap (qemu's
 * vpc driver) return as the guest's data.  Builds before November 2026 left
 * old footers there.  With fix (vf opened read-write), writes zeroes over
 * each such sector (never into holes) and syncs.  progress (may be NULL)
 * gets blocks done / allocated.  Returns 0 (results in *out) or -errno.
 */
int vhd_file_scrub(struct vhd_file *vf, bool fix, struct vhd_scrub *out,
		   vhd_progress_fn progress, void *arg, struct vhd_error *err);
/* Rewrites a bad footer at EOF from the valid copy at offset 0. */
int vhd_file_repair(const char *path, struct vhd_error *err);
/*
 * Locks fd (tdr/filelock.h): shared for a reader, exclusive for a writer.
 * Returns 0, or -EBUSY with VHD_ERR_BUSY and a message naming path and what
 * to do, or another negative errno.
 */
int vhd_lock_fd(int fd, bool writer, const char *path, struct vhd_error *err);

/* ------------------------------------------------------------------ */
/* The tapdisk driver "vhd" (drivers/drv-vhd.c) */

struct td_image;
struct td_driver;

extern const struct td_driver td_drv_vhd;

/*
 * Online make-empty for the replica driver: drops all data of a dynamic or
 * differencing image in time proportional to its allocated blocks: the BAT
 * sectors that change are written, and done runs (once, from the loop,
 * with 0 or -errno) as soon as they are.  The file keeps its length and
 * footer; later allocations reuse its space from the start of the data area
 * (no ftruncate on the event loop).  The cleared BAT is synced in the
 * background, and an allocation that would overwrite reused space waits for
 * that sync, so a crash never leaves an old BAT entry pointing at new data.
 * The caller guarantees no request is in flight on img.
 */
void vhd_image_make_empty(struct td_image *img, void (*done)(void *arg, int err), void *arg);

/*
 * Scratch mode, for images whose content does not have to survive a crash
 * of the host: the replica's active and hidden while it replicates (they
 * are emptied at every checkpoint, and a secondary whose host crashed is
 * rebuilt from the primary).  An allocation then writes its BAT entry,
 * and a differencing disk its bitmap, as soon as the data and bitmap
 * writes before it have completed, without the fdatasync that orders them
 * on stable storage.  Writes keep their order of completion, so a crash
 * of the process still leaves a valid file; a crash of the host may not.
 * FLUSH requests still sync.  Turning it off does not make earlier writes
 * durable: flush the image after.  0, or -EINVAL (with tdr_set_error) if
 * img is not a dynamic or differencing VHD.
 */
int vhd_image_set_scratch(struct td_image *img, bool on);

/*
 * Ordered mode: every allocation syncs its data and bitmap before its BAT
 * entry, even a dynamic disk's new block in never-written space, which
 * otherwise writes the three together (safe: it reads as zeroes until
 * they land; docs/vhd.md).  The syncs spread the file system's write-back
 * over the allocations, so that a later flush has little left to do: the
 * replica's secondary disk runs in this mode while replicating, where a
 * checkpoint must not queue behind the write-back of everything the
 * primary allocated since the last one.  0, or -ENOTSUP (no error set)
 * if img is not a dynamic or differencing VHD.
 */
int vhd_image_set_ordered(struct td_image *img, bool on);

/*
 * Calls fn(arg, sec, secs) for every block allocated in img, a dynamic or
 * differencing VHD, in order: its first sector and its length (clipped at
 * the end of the disk).  From the BAT in memory: no I/O, no wait.  A block
 * whose allocation is in flight counts as allocated.  0, the first non-zero
 * return of fn, or -EINVAL (with tdr_set_error) for any other image.
 */
int vhd_image_for_each_block(struct td_image *img,
			     int (*fn)(void *arg, uint64_t sec, uint64_t secs), void *arg);

/*
 * Calls fn(arg, sec, secs) for every run of sectors present in img itself:
 * in a differencing VHD, the runs of set bits of its block bitmaps (read
 * from the file, a few blocks at a time); in a dynamic one, every allocated
 * block as a whole, as for_each_block.  Within a block the runs come in
 * order; blocks may come in any order.  done(arg, err) runs once, from the
 * loop, with 0, fn's first non-zero return, or -errno (-EINVAL, with
 * tdr_set_error, for an image that is not such a VHD; that one is called
 * at once).  The caller keeps writes to img away meanwhile.
 */
void vhd_image_for_each_run(struct td_image *img,
			    int (*fn)(void *arg, uint64_t sec, uint64_t secs),
			    void (*done)(void *arg, int err), void *arg);

/*
 * Online commit: copies every sector present in child (per its bitmaps)
 * into child->parent with td_queue_request(), then flushes the parent.
 * progress (may be NULL) is called with blocks done / blocks allocated.  The
 * caller keeps writes to child away meanwhile (reads are fine).
 */
void vhd_image_commit(struct td_image *child,
		      void (*progress)(void *arg, uint64_t done, uint64_t total),
		      void (*done)(void *arg, int err), void *arg);

#endif
