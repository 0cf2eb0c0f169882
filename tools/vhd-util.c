/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * vhd-util: create, inspect, check and maintain VHD files, with the
 * subcommand and option names of blktap's vhd-util for what it covers.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/vhd.h"

static const char *cmd = "vhd-util";

static int fail(const struct vhd_error *err, int r)
{
	fprintf(stderr, "vhd-util %s: %s\n", cmd, err->msg[0] ? err->msg : strerror(-r));
	return 1;
}

static int usage_error(const char *usage)
{
	fprintf(stderr, "vhd-util %s: bad usage; options: %s\n", cmd, usage);
	return 2;
}

/* An option's value that does not parse: name it, not just the usage. */
static int value_error(int opt, const char *val, const char *want)
{
	fprintf(stderr, "vhd-util %s: -%c '%s': %s\n", cmd, opt, val, want);
	return 2;
}

/* A decimal number from 0 to max, the whole string; 0 or -1. */
static int parse_num(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v > max)
		return -1;
	*out = v;
	return 0;
}

/* blktap takes megabytes; we also accept K, M, G, T suffixes (binary). */
static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	uint64_t mult = 1ull << 20;
	const char *rest;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -1;
	rest = end;
	if (*rest) {
		const char *units = "BKMGT";
		const char *u = strchr(units, toupper((unsigned char)*rest));

		if (!u)
			return -1;
		mult = 1ull << (10 * (u - units));
		rest++;
		if (*u != 'B' && (!strcasecmp(rest, "iB") || !strcasecmp(rest, "B")))
			rest += strlen(rest);
		if (*rest)
			return -1;
	}
	if (v > UINT64_MAX / mult)
		return -1;
	*out = v * mult;
	return 0;
}

static int do_create(int argc, char **argv)
{
	const char *usage = "-n NAME -s SIZE (MiB, or with a K/M/G/T suffix) [-S MAX_SIZE (metadata for growth to it)] [-r (fixed)] [-B BLOCK_SIZE]";
	const char *name = NULL;
	uint64_t size = 0, max_size = 0, bs = 0;
	bool have_size = false, fixed = false;
	struct vhd_error err = { 0 };
	int c, r;

	while ((c = getopt(argc, argv, "n:s:rbS:B:h")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 's':
			if (parse_size(optarg, &size) < 0)
				return value_error(c, optarg, "not a size (MiB, or a number with a K, M, G or T suffix)");
			have_size = true;
			break;
		case 'r':
			fixed = true;
			break;
		case 'b':
			break;	/* blktap: "file is fixed size"; files grow as needed here */
		case 'S':
			/* blktap: the size in MiB the BAT is made for (resize later) */
			if (parse_size(optarg, &max_size) < 0)
				return value_error(c, optarg, "not a size (MiB, or a number with a K, M, G or T suffix)");
			break;
		case 'B':
			/* ours (blktap has 2 MiB only): a plain number is bytes */
			if (parse_num(optarg, UINT32_MAX, &bs) < 0 &&
			    (parse_size(optarg, &bs) < 0 || bs > UINT32_MAX))
				return value_error(c, optarg, "not a block size (bytes, or a number with a K or M suffix, below 4 GiB)");
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || !have_size || optind != argc)
		return usage_error(usage);
	/* Round up to whole sectors like blktap's MiB sizes always are. */
	size = (size + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	r = vhd_file_create_max(name, size, max_size, fixed ? VHD_TYPE_FIXED : VHD_TYPE_DYNAMIC,
				(uint32_t)bs, &err);
	return r < 0 ? fail(&err, r) : 0;
}

/* The number of files in name's chain (name itself and its ancestors). */
static int chain_depth(const char *name, int *depth, struct vhd_error *err)
{
	struct vhd_file *chain, *cur;
	int r;

	r = vhd_file_open(&chain, name, VHD_FILE_RDONLY | VHD_FILE_CHAIN, err);
	if (r < 0)
		return r;
	*depth = 0;
	for (cur = chain; cur; cur = cur->parent)
		(*depth)++;
	vhd_file_close(chain);
	return 0;
}

/*
 * A parent that is no VHD (no footer, or a block device, which VHDs never
 * are here) may be a raw image given without -m: say so on the same line.
 */
static int snapshot_fail(const struct vhd_error *err, int r, bool raw, const char *parent)
{
	struct stat st;

	if (!raw && (err->code == VHD_ERR_FOOTER_COOKIE ||
		     (stat(parent, &st) == 0 && S_ISBLK(st.st_mode)))) {
		fprintf(stderr, "vhd-util snapshot: %s; if %s is a raw image (a plain file or block device holding the disk), add -m\n",
			err->msg, parent);
		return 1;
	}
	return fail(err, r);
}

static int do_snapshot(int argc, char **argv)
{
	const char *usage = "-n CHILD -p PARENT [-m parent is raw] [-l depth limit] [-S max size MiB] [-e]";
	const char *name = NULL, *parent = NULL;
	struct vhd_error err = { 0 };
	uint64_t limit = 0, max_size = 0;
	bool raw = false;
	int c, r, depth;

	while ((c = getopt(argc, argv, "n:p:l:S:bemh")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'p':
			parent = optarg;
			break;
		case 'l':
			if (parse_num(optarg, INT_MAX, &limit) < 0)
				return value_error(c, optarg, "not a chain depth (a whole number; 0: no limit)");
			break;
		case 'S':
			if (parse_size(optarg, &max_size) < 0)
				return value_error(c, optarg, "not a size (MiB, or a number with a K, M, G or T suffix)");
			break;
		case 'b':
			break;
		case 'e':
			/*
			 * blktap: link to the given parent even if it is an
			 * empty differencing disk.  That is what we always do:
			 * skipping an empty hidden.vhd would make active.vhd a
			 * child of the secondary disk and break the replica.
			 */
			break;
		case 'm':
			raw = true;
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || !parent || optind != argc)
		return usage_error(usage);
	if (limit) {
		/* A raw parent is a chain of one: itself. */
		depth = 1;
		r = raw ? 0 : chain_depth(parent, &depth, &err);
		if (r < 0)
			return snapshot_fail(&err, r, raw, parent);
		if ((uint64_t)depth + 1 > limit) {
			fprintf(stderr, "vhd-util snapshot: %s is a chain of %d; a child would make it %d, over the limit of %" PRIu64 " (-l); coalesce the chain first\n",
				parent, depth, depth + 1, limit);
			return 1;
		}
	}
	if (raw)
		r = vhd_file_snapshot_raw(name, parent, max_size, &err);
	else
		r = vhd_file_snapshot_max(name, parent, max_size, &err);
	return r < 0 ? snapshot_fail(&err, r, raw, parent) : 0;
}

static int do_query(int argc, char **argv)
{
	const char *usage = "-n NAME [-v virtual size MiB] [-s physical size bytes] [-p parent] [-f hidden field] [-d chain depth] [-S max size MiB] [-i fields as key: value]";
	const char *name = NULL;
	bool v = false, s = false, p = false, f = false, d = false, S = false, info = false;
	struct vhd_error err = { 0 };
	struct vhd_file *vf;
	int c, r, ret = 0;

	while ((c = getopt(argc, argv, "n:vspfdSih")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'v':
			v = true;
			break;
		case 's':
			s = true;
			break;
		case 'p':
			p = true;
			break;
		case 'f':
			f = true;
			break;
		case 'd':
			d = true;
			break;
		case 'S':
			S = true;
			break;
		case 'i':
			info = true;
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || optind != argc)
		return usage_error(usage);
	r = vhd_file_open(&vf, name, VHD_FILE_RDONLY, &err);
	if (r < 0)
		return fail(&err, r);
	if (v)
		printf("%" PRIu64 "\n", vf->m.footer.current_size >> 20);
	if (s)
		printf("%" PRIu64 "\n", vhd_file_phys_size(vf));
	if (p) {
		char path[PATH_MAX];

		if (vf->m.footer.type != VHD_TYPE_DIFF) {
			printf("%s has no parent\n", name);
		} else if (vhd_resolve_parent(&vf->m, name, path, sizeof(path), &err) < 0) {
			ret = fail(&err, -ENOENT);
		} else {
			printf("%s\n", path);
		}
	}
	/* blktap prints this one line; XenServer's storage manager parses it. */
	if (f)
		printf("hidden: %u\n", vf->m.footer.hidden);
	if (info) {
		char uuid[37], ts[40];

		vhd_uuid_format(vf->m.footer.uuid, uuid);
		vhd_time_format(vf->m.footer.timestamp, ts, sizeof(ts));
		if (!f)
			printf("hidden: %u\n", vf->m.footer.hidden);
		printf("type: %s\n", vhd_type_name(vf->m.footer.type));
		printf("uuid: %s\n", uuid);
		printf("virtual-size: %" PRIu64 "\n", vf->m.footer.current_size);
		printf("timestamp: %s\n", ts);
		if (vhd_meta_dynamic(&vf->m)) {
			printf("block-size: %u\n", vf->m.header.block_size);
			printf("allocated-blocks: %u\n", vf->m.allocated);
		}
		if (vf->m.footer.type == VHD_TYPE_DIFF) {
			vhd_uuid_format(vf->m.header.parent_uuid, uuid);
			printf("parent-uuid: %s\n", uuid);
			printf("parent-name: %s\n", vf->m.parent_name);
			printf("parent-raw: %s\n", vhd_meta_parent_raw(&vf->m) ? "yes" : "no");
		}
	}
	if (d) {
		int depth;

		r = chain_depth(name, &depth, &err);
		if (r < 0)
			ret = fail(&err, r);
		else
			printf("chain depth: %d\n", depth);
	}
	if (S && vhd_meta_dynamic(&vf->m))
		printf("%" PRIu64 "\n",
		       ((uint64_t)vf->m.header.max_bat_entries * vf->m.header.block_size) >> 20);
	vhd_file_close(vf);
	return ret;
}

/* vhd-util check -z: data under clear bits of a dynamic disk is a defect. */
static int check_stale(struct vhd_file *vf, const char *name)
{
	struct vhd_error err = { 0 };
	struct vhd_scrub sc;
	int r;

	if (vf->m.footer.type != VHD_TYPE_DYNAMIC)
		return 0;	/* nothing to look for: see vhd_file_scrub */
	r = vhd_file_scrub(vf, false, &sc, NULL, NULL, &err);
	if (r < 0)
		return fail(&err, r);
	if (sc.stale_sectors) {
		fprintf(stderr,
			"vhd-util check: %s: %" PRIu64 " sector%s in %" PRIu64 " of %" PRIu64
			" allocated blocks hold%s data under clear bitmap bits (first: block %u, sector %u); "
			"tapdisk-replica reads them as zeroes, but readers that ignore the bitmap (qemu) "
			"see the data; zero them with: vhd-util repair -n %s -z [%s]\n",
			name, sc.stale_sectors, sc.stale_sectors == 1 ? "" : "s", sc.stale_blocks, sc.blocks,
			sc.stale_sectors == 1 ? "s" : "", sc.first_block, sc.first_sector, name,
			vhd_defect_name(VHD_ERR_STALE_DATA));
		return 1;
	}
	return 0;
}

/*
 * vhd-util check -b / -s: reads every bitmap of every file of the chain (an
 * unreadable one is a defect) and, with stats, prints each file's
 * allocation.  1 after a defect, else 0.
 */
static int check_chain_blocks(struct vhd_file *vf, bool bitmaps, bool stats)
{
	for (struct vhd_file *f = vf; f; f = f->parent) {
		const struct vhd_meta *m = &f->m;
		uint64_t present = 0;
		uint8_t *map;
		uint32_t b;
		int r;

		if (!vhd_meta_dynamic(m)) {
			if (stats)
				printf("%s: %s%s, %" PRIu64 " bytes, all present\n", f->path,
				       f->raw ? "raw image" : vhd_type_name(m->footer.type),
				       f->raw ? "" : " disk", m->footer.current_size);
			continue;
		}
		map = bitmaps ? malloc((size_t)m->bm_secs * VHD_SECTOR_SIZE) : NULL;
		if (bitmaps && !map) {
			fprintf(stderr, "vhd-util check: out of memory\n");
			return 1;
		}
		for (b = 0; bitmaps && b < m->bat_entries; b++) {
			if (m->bat[b] == VHD_BAT_UNUSED)
				continue;
			r = vhd_file_read_bitmap(f, b, map);
			if (r < 0) {
				fprintf(stderr, "vhd-util check: %s: cannot read the bitmap of block %u at offset %" PRIu64
					": %s; the storage under the file may be failing [%s]\n",
					f->path, b, vhd_meta_block_off(m, b), strerror(-r),
					vhd_defect_name(VHD_ERR_IO));
				free(map);
				return 1;
			}
			/*
			 * Only the sectors inside the disk: a last, partial
			 * block's bits past its end say nothing (qemu sets them
			 * all), nor do those of a block past it (a BAT made for
			 * growth, vhd-util create -S).
			 */
			uint64_t first = (uint64_t)b * m->spb, total = m->footer.current_size >> VHD_SECTOR_SHIFT;
			uint32_t n = first >= total ? 0 :
				     total - first < m->spb ? (uint32_t)(total - first) : m->spb;

			for (uint32_t i = 0; i < n; i++)
				present += vhd_bitmap_test(map, i);
		}
		free(map);
		if (!stats)
			continue;
		printf("%s: %s disk, %" PRIu64 " bytes, %u of %u blocks of %u bytes allocated (%" PRIu64 " bytes)",
		       f->path, vhd_type_name(m->footer.type), m->footer.current_size, m->allocated,
		       m->bat_entries, m->header.block_size, (uint64_t)m->allocated * m->header.block_size);
		if (bitmaps)
			printf(", %" PRIu64 " sectors present by the bitmaps", present);
		printf("\n");
	}
	return 0;
}

static int do_check(int argc, char **argv)
{
	const char *usage = "-n NAME [-p check parents] [-i ignore a bad primary footer] "
			    "[-I ignore parent UUIDs] [-t ignore parent timestamps] "
			    "[-T strict parent timestamps] [-B accepted; BAT overlaps are always checked] "
			    "[-b read every bitmap] [-s print allocation stats] "
			    "[-z look for data under clear bitmap bits]";
	const char *name = NULL;
	unsigned flags = 0;
	bool stale = false, quiet_time = false, bitmaps = false, stats = false;
	struct vhd_error err = { 0 };
	struct vhd_file *vf;
	int c, r;

	while ((c = getopt(argc, argv, "n:iIptTBbshz")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'i':
			flags |= VHD_FILE_USE_BACKUP;
			break;
		case 'I':
			flags |= VHD_FILE_IGNORE_PARENT_UUID;
			break;
		case 'B':
			/* blktap: skip the overlap check to go faster.  Ours is
			 * a sort of the BAT in memory: it always runs. */
			break;
		case 'b':
			bitmaps = true;
			break;
		case 's':
			stats = true;
			break;
		case 'p':
			flags |= VHD_FILE_CHAIN;
			break;
		case 't':
			/* blktap: ignore timestamps (here: no warning either) */
			quiet_time = true;
			break;
		case 'T':
			flags |= VHD_FILE_STRICT_TIME;
			break;
		case 'z':
			stale = true;
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || optind != argc)
		return usage_error(usage);
	if (quiet_time && (flags & VHD_FILE_STRICT_TIME)) {
		fprintf(stderr, "vhd-util check: -t ignores parent timestamps, -T makes them fatal: give one\n");
		return 2;
	}
	/*
	 * Opening validates (vhd_file_check is this open and a close).  A
	 * differencing disk is only usable with its parent: check it too.
	 */
	r = vhd_file_open(&vf, name, flags | VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err);
	if (r < 0) {
		fprintf(stderr, "vhd-util check: %s [%s]\n", err.msg, vhd_defect_name(err.code));
		return 1;
	}
	if (err.code != VHD_OK && !(quiet_time && err.code == VHD_ERR_PARENT_TIMESTAMP))
		fprintf(stderr, "vhd-util check: warning: %s\n", err.msg);
	r = stale ? check_stale(vf, name) : 0;
	if (!r && (bitmaps || stats))
		r = check_chain_blocks(vf, bitmaps, stats);
	vhd_file_close(vf);
	if (r)
		return r;
	printf("%s is valid\n", name);
	return 0;
}

static void print_progress(void *arg, uint64_t done, uint64_t total)
{
	(void)arg;
	printf("\r%6.2f%%", total ? 100.0 * (double)done / (double)total : 100.0);
	fflush(stdout);
}

static int do_coalesce(int argc, char **argv)
{
	const char *usage = "-n CHILD [-p progress]";
	const char *name = NULL;
	bool progress = false;
	struct vhd_error err = { 0 };
	int c, r;

	while ((c = getopt(argc, argv, "n:psh")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'p':
			progress = true;
			break;
		case 's':
			break;	/* blktap: sparse writes; we always write only present sectors */
		default:
			return usage_error(usage);
		}
	}
	if (!name || optind != argc)
		return usage_error(usage);
	r = vhd_file_coalesce(name, progress ? print_progress : NULL, NULL, &err);
	if (progress)
		printf("\n");
	return r < 0 ? fail(&err, r) : 0;
}

static int do_modify(int argc, char **argv)
{
	const char *usage = "-n NAME -z (drop all data)";
	const char *name = NULL;
	bool zero = false;
	struct vhd_error err = { 0 };
	struct vhd_file *vf;
	int c, r;

	while ((c = getopt(argc, argv, "n:zh")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'z':
			zero = true;
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || !zero || optind != argc)
		return usage_error(usage);
	r = vhd_file_open(&vf, name, 0, &err);
	if (r < 0)
		return fail(&err, r);
	r = vhd_file_make_empty(vf, &err);
	vhd_file_close(vf);
	return r < 0 ? fail(&err, r) : 0;
}

/* vhd-util repair -z: zero the data under clear bits of a dynamic disk. */
static int repair_stale(const char *name)
{
	struct vhd_error err = { 0 };
	struct vhd_scrub sc;
	struct vhd_file *vf;
	int r;

	r = vhd_file_open(&vf, name, 0, &err);
	if (r < 0)
		return fail(&err, r);
	r = vhd_file_scrub(vf, true, &sc, isatty(STDOUT_FILENO) ? print_progress : NULL, NULL,
			   &err);
	vhd_file_close(vf);
	if (isatty(STDOUT_FILENO))
		printf("\n");
	if (r < 0)
		return fail(&err, r);
	printf("%s: zeroed %" PRIu64 " sector%s under clear bitmap bits in %" PRIu64 " of %" PRIu64
	       " allocated blocks\n", name, sc.stale_sectors, sc.stale_sectors == 1 ? "" : "s",
	       sc.stale_blocks, sc.blocks);
	return 0;
}

static int do_repair(int argc, char **argv)
{
	const char *usage = "-n NAME [-z zero data under clear bitmap bits (dynamic disks; only while no tapdisk has the file open)]";
	const char *name = NULL;
	bool stale = false;
	struct vhd_error err = { 0 };
	int c, r;

	while ((c = getopt(argc, argv, "n:zh")) != -1) {
		if (c == 'n')
			name = optarg;
		else if (c == 'z')
			stale = true;
		else
			return usage_error(usage);
	}
	if (!name || optind != argc)
		return usage_error(usage);
	if (stale)
		return repair_stale(name);
	r = vhd_file_repair(name, &err);
	return r < 0 ? fail(&err, r) : 0;
}

#define HEX(x) (hex ? "0x%" PRIx64 : "%" PRIu64), (uint64_t)(x)

static void print_headers(const struct vhd_file *vf, bool hex)
{
	const struct vhd_footer *f = &vf->m.footer;
	char uuid[37], ts[40], app[5];

	vhd_uuid_format(f->uuid, uuid);
	vhd_time_format(f->timestamp, ts, sizeof(ts));
	memcpy(app, f->creator_app, 4);
	app[4] = '\0';
	printf("VHD Footer Summary:\n-------------------\n");
	printf("Cookie              : %.8s\n", f->cookie);
	printf("Features            : (0x%08x)\n", f->features);
	printf("File format version : Major: %u, Minor: %u\n", f->version >> 16, f->version & 0xFFFF);
	printf("Data offset         : ");
	printf(HEX(f->data_offset));
	printf("\nTimestamp           : %s\n", ts);
	printf("Creator Application : '%s'\n", app);
	printf("Creator version     : Major: %u, Minor: %u\n", f->creator_version >> 16,
	       f->creator_version & 0xFFFF);
	printf("Creator OS          : %s\n", f->creator_os == VHD_OS_WINDOWS ? "Windows" :
	       f->creator_os == VHD_OS_MAC ? "Macintosh" : "Unknown!");
	printf("Original disk size  : %" PRIu64 " MB (%" PRIu64 " Bytes)\n", f->original_size >> 20,
	       f->original_size);
	printf("Current disk size   : %" PRIu64 " MB (%" PRIu64 " Bytes)\n", f->current_size >> 20,
	       f->current_size);
	printf("Geometry            : Cyl: %u, Hds: %u, Sctrs: %u\n", f->cylinders, f->heads, f->spt);
	/* blktap's words: scripts match "Disk type *: (\S+) hard disk". */
	printf("Disk type           : %s hard disk\n",
	       f->type == VHD_TYPE_FIXED ? "Fixed" : f->type == VHD_TYPE_DYNAMIC ? "Dynamic" :
	       f->type == VHD_TYPE_DIFF ? "Differencing" : "Unknown");
	printf("Checksum            : 0x%x|0x%x (%s)\n", f->checksum, vhd_footer_checksum(f),
	       f->checksum == vhd_footer_checksum(f) ? "Good!" : "Bad!");
	printf("UUID                : %s\n", uuid);
	printf("Saved state         : %s\n", f->saved_state ? "Yes" : "No");
	printf("Hidden              : %u\n\n", f->hidden);
	if (!vhd_meta_dynamic(&vf->m))
		return;
	const struct vhd_header *h = &vf->m.header;

	printf("VHD Header Summary:\n-------------------\n");
	printf("Cookie              : %.8s\n", h->cookie);
	printf("Table offset        : ");
	printf(HEX(h->table_offset));
	printf("\nHeader version      : 0x%08x\n", h->version);
	printf("Max BAT size        : %u\n", h->max_bat_entries);
	printf("Block size          : %u (%u MB)\n", h->block_size, h->block_size >> 20);
	printf("Parent name         : %s\n", vf->m.parent_name);
	vhd_uuid_format(h->parent_uuid, uuid);
	printf("Parent UUID         : %s%s\n", uuid,
	       vhd_meta_parent_raw(&vf->m) ? " (raw parent)" : "");
	vhd_time_format(h->parent_timestamp, ts, sizeof(ts));
	printf("Parent timestamp    : %s\n", ts);
	printf("Checksum            : 0x%x|0x%x (%s)\n\n", h->checksum, vhd_header_checksum(h),
	       h->checksum == vhd_header_checksum(h) ? "Good!" : "Bad!");
	if (f->type != VHD_TYPE_DIFF)
		return;
	printf("VHD Parent Locators:\n--------------------\n");
	for (int i = 0; i < VHD_MAX_LOCATORS; i++) {
		const struct vhd_locator *l = &h->loc[i];

		if (l->code == VHD_PLAT_NONE)
			continue;
		printf("locator:            : %d\n", i);
		printf("       code         : %s\n", vhd_plat_name(l->code));
		printf("       data_space   : %u\n", l->data_space);
		printf("       data_length  : %u\n", l->data_len);
		printf("       data_offset  : ");
		printf(HEX(l->data_offset));
		printf("\n       decoded name : %s\n\n", vf->m.loc_path[i] ? vf->m.loc_path[i] : "");
	}
}

static void past_bat(const struct vhd_file *vf, const char *name, uint64_t b)
{
	if (!vhd_meta_dynamic(&vf->m))
		fprintf(stderr, "vhd-util read: %s: a fixed disk has no blocks or bitmaps\n", name);
	else
		fprintf(stderr, "vhd-util read: %s: block %" PRIu64 " past the end (%u blocks)\n",
			name, b, b >= vf->m.bat_entries ? vf->m.bat_entries : vf->m.blocks);
}

static int do_read(int argc, char **argv)
{
	const char *usage = "-n NAME [-p headers] [-b BLK bat] [-m BLK bitmap] [-i SEC test bit] [-t SEC translate] [-d BLK data] [-r SEC read] [-c COUNT] [-x hex]";
	const char *name = NULL;
	bool headers = false, hex = false;
	int64_t bat = -1, bitmap = -1, tbit = -1, tsec = -1, data = -1, rsec = -1;
	uint64_t count = 1, v;
	struct vhd_error err = { 0 };
	struct vhd_file *vf;
	uint8_t *map = NULL;
	char *buf = NULL;
	int c, r = 0;

	while ((c = getopt(argc, argv, "n:pb:m:i:t:d:r:c:xh")) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 'p':
			headers = true;
			break;
		case 'b':
		case 'm':
		case 'd':
			if (parse_num(optarg, INT64_MAX, &v) < 0)
				return value_error(c, optarg, "not a block number");
			*(c == 'b' ? &bat : c == 'm' ? &bitmap : &data) = (int64_t)v;
			break;
		case 'i':
		case 't':
		case 'r':
			if (parse_num(optarg, INT64_MAX, &v) < 0)
				return value_error(c, optarg, "not a sector number");
			*(c == 'i' ? &tbit : c == 't' ? &tsec : &rsec) = (int64_t)v;
			break;
		case 'c':
			if (parse_num(optarg, UINT64_MAX, &count) < 0)
				return value_error(c, optarg, "not a count");
			break;
		case 'x':
			hex = true;
			break;
		default:
			return usage_error(usage);
		}
	}
	if (!name || optind != argc)
		return usage_error(usage);
	r = vhd_file_open(&vf, name, VHD_FILE_RDONLY | (rsec >= 0 ? VHD_FILE_CHAIN : 0), &err);
	if (r < 0)
		return fail(&err, r);
	if (headers)
		print_headers(vf, hex);
	if ((bat >= 0 || bitmap >= 0 || tbit >= 0 || tsec >= 0 || data >= 0) && !vhd_meta_dynamic(&vf->m)) {
		fprintf(stderr, "vhd-util read: %s: a fixed disk has no BAT or bitmaps\n", name);
		r = 1;
		goto out;
	}
	if (vhd_meta_dynamic(&vf->m)) {
		map = malloc((size_t)vf->m.bm_secs * VHD_SECTOR_SIZE);
		buf = malloc(vf->m.header.block_size);
		if (!map || !buf) {
			fprintf(stderr, "vhd-util read: %s: out of memory\n", name);
			r = 1;
			goto out;
		}
	}
	for (uint64_t i = 0; bat >= 0 && i < count; i++) {
		uint64_t b = (uint64_t)bat + i;

		if (b >= vf->m.bat_entries) {
			past_bat(vf, name, b);
			r = 1;
			goto out;
		}
		printf("block: ");
		printf(HEX(b));
		if (vf->m.bat[b] == VHD_BAT_UNUSED) {
			printf(": offset: not allocated\n");
		} else {
			printf(": offset: ");
			printf(HEX((uint64_t)vf->m.bat[b] << VHD_SECTOR_SHIFT));
			printf("\n");
		}
	}
	for (uint64_t i = 0; bitmap >= 0 && i < count; i++) {
		uint64_t b = (uint64_t)bitmap + i;

		if (b >= vf->m.bat_entries) {
			past_bat(vf, name, b);
			r = 1;
			goto out;
		}
		if (vhd_file_read_bitmap(vf, (uint32_t)b, map) == -ENOENT) {
			printf("block %" PRIu64 " not allocated\n", b);
			continue;
		}
		if (fwrite(map, (size_t)vf->m.bm_secs * VHD_SECTOR_SIZE, 1, stdout) != 1) {
			fprintf(stderr, "vhd-util read: cannot write to standard output: %s\n",
				strerror(errno));
			r = 1;
			goto out;
		}
	}
	for (uint64_t i = 0; tbit >= 0 && i < count; i++) {
		uint64_t sec = (uint64_t)tbit + i;
		bool present;

		if (vhd_file_sector_present(vf, sec, &present) < 0) {
			fprintf(stderr, "vhd-util read: %s: sector %" PRIu64 " past the end\n", name, sec);
			r = 1;
			goto out;
		}
		printf("block %" PRIu64 ": sec: %" PRIu64 ": %d\n", sec / vf->m.spb, sec % vf->m.spb,
		       present);
	}
	for (uint64_t i = 0; tsec >= 0 && i < count; i++) {
		uint64_t sec = (uint64_t)tsec + i, b = vf->m.spb ? sec / vf->m.spb : 0;

		if (!vf->m.spb || b >= vf->m.bat_entries) {
			past_bat(vf, name, b);
			r = 1;
			goto out;
		}
		printf("logical sector %" PRIu64 ": block number: %" PRIu64 ", sector offset: %" PRIu64
		       ", file offset: ", sec, b, sec % vf->m.spb);
		if (vf->m.bat[b] == VHD_BAT_UNUSED)
			printf("not allocated\n");
		else
			printf("%" PRIu64 "\n", ((uint64_t)vf->m.bat[b] + vf->m.bm_secs + sec % vf->m.spb)
			       << VHD_SECTOR_SHIFT);
	}
	for (uint64_t i = 0; data >= 0 && i < count; i++) {
		uint64_t b = (uint64_t)data + i;

		if (b >= vf->m.blocks) {
			past_bat(vf, name, b);
			r = 1;
			goto out;
		}
		if (vf->m.bat[b] == VHD_BAT_UNUSED) {
			printf("block %" PRIu64 " not allocated\n", b);
			continue;
		}
		if (vhd_src_fd_pread((void *)(intptr_t)vf->fd, buf, vf->m.header.block_size,
				     ((uint64_t)vf->m.bat[b] + vf->m.bm_secs) << VHD_SECTOR_SHIFT) < 0) {
			fprintf(stderr, "vhd-util read: %s: cannot read block %" PRIu64 "\n", name, b);
			r = 1;
			goto out;
		}
		if (fwrite(buf, vf->m.header.block_size, 1, stdout) != 1) {
			fprintf(stderr, "vhd-util read: cannot write to standard output: %s\n",
				strerror(errno));
			r = 1;
			goto out;
		}
	}
	if (rsec >= 0) {
		char *sb = malloc(VHD_SECTOR_SIZE);

		for (uint64_t i = 0; sb && i < count; i++) {
			if (vhd_file_read(vf, (uint64_t)rsec + i, 1, sb) < 0 ||
			    fwrite(sb, VHD_SECTOR_SIZE, 1, stdout) != 1) {
				fprintf(stderr, "vhd-util read: %s: cannot read sector %" PRIu64 "\n", name,
					(uint64_t)rsec + i);
				r = 1;
				break;
			}
		}
		free(sb);
	}
out:
	free(map);
	free(buf);
	vhd_file_close(vf);
	return r;
}

static const struct {
	const char *name;
	int (*fn)(int, char **);
	const char *help;
} cmds[] = {
	{ "create", do_create, "create a dynamic (or, with -r, fixed) VHD" },
	{ "snapshot", do_snapshot, "create a differencing VHD over a parent" },
	{ "query", do_query, "print the virtual size, physical size, parent, fields" },
	{ "check", do_check, "validate a VHD (and its parents)" },
	{ "coalesce", do_coalesce, "write a child's data into its parent" },
	{ "modify", do_modify, "-z: drop all data of a dynamic or differencing VHD" },
	{ "read", do_read, "print headers, BAT entries, bitmaps or data" },
	{ "repair", do_repair, "restore the footer from its copy at offset 0; -z: zero data under clear bits" },
};

static void usage(FILE *out)
{
	fprintf(out, "usage: vhd-util COMMAND [OPTIONS]\ncommands:\n");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		fprintf(out, "  %-9s %s\n", cmds[i].name, cmds[i].help);
	fprintf(out, "'vhd-util COMMAND -h' lists a command's options; see vhd-util(8).\n");
}

/*
 * blktap's vhd-util takes --debug anywhere after the command (XenServer's
 * storage manager passes it to nearly every call) and uses it to log to
 * syslog; our messages go to stderr anyway, so it is dropped here.
 */
static void drop_debug(int *argc, char **argv)
{
	int j = 2;

	for (int i = 2; i < *argc; i++)
		if (strcmp(argv[i], "--debug"))
			argv[j++] = argv[i];
	argv[j] = NULL;
	*argc = j;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		if (strcmp(argv[1], cmds[i].name))
			continue;
		cmd = cmds[i].name;
		optind = 1;
		drop_debug(&argc, argv);
		return cmds[i].fn(argc - 1, argv + 1);
	}
	fprintf(stderr, "vhd-util: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
