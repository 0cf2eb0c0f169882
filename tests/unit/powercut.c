/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The power-cut model (powercut.h).  The file is rebuilt incrementally:
 * `base` in memory is the file with the writes that had to survive a cut,
 * and the file on disk equals it between versions.  A version writes only
 * the chosen parts of the undecided writes, then puts the base back over
 * them, so a history of a hundred events over a 100 MiB file costs what
 * was written, not the file's size per version.
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "powercut.h"
#include "tdr/vhd.h"

#define PC_SECTOR 512u
/* Each-alone and all-but-each versions: for every undecided write, or this many picked at random. */
#define PC_EACH_MAX 12
#define PC_RANDOM   4	/* random mixes of whole writes, and as many of sectors */

static void pc_push(struct pc_log *log, const struct pc_io *pio)
{
	if (log->n == log->cap) {
		log->cap = log->cap ? 2 * log->cap : 64;
		log->ios = realloc(log->ios, log->cap * sizeof(*log->ios));
		ck_assert_ptr_nonnull(log->ios);
	}
	log->ios[log->n++] = *pio;
}

static bool pc_overlap(const struct pc_io *a, unsigned file, uint64_t off, size_t len)
{
	return !a->sync && !a->trunc && a->file == file && a->off < off + len && off < a->off + a->len;
}

/* Copies the data of a write, plain or vectored, as the kernel takes it. */
static char *pc_copy_data(const struct iocb *cb, uint64_t *off, size_t *len)
{
	char *data;

	if (cb->aio_lio_opcode == IO_CMD_PWRITE) {
		*off = (uint64_t)cb->u.c.offset;
		*len = cb->u.c.nbytes;
		data = malloc(*len ? *len : 1);
		ck_assert_ptr_nonnull(data);
		memcpy(data, cb->u.c.buf, *len);
		return data;
	}
	/* IO_CMD_PWRITEV */
	const struct iovec *iov = cb->u.v.vec;
	size_t total = 0, at = 0;

	for (long i = 0; i < (long)cb->u.v.nr; i++)
		total += iov[i].iov_len;
	data = malloc(total ? total : 1);
	ck_assert_ptr_nonnull(data);
	for (long i = 0; i < (long)cb->u.v.nr; i++) {
		memcpy(data + at, iov[i].iov_base, iov[i].iov_len);
		at += iov[i].iov_len;
	}
	*off = (uint64_t)cb->u.v.offset;
	*len = total;
	return data;
}

/* The index of fd's file among the logged ones, or log->nfiles. */
static unsigned pc_file_of(const struct pc_log *log, int fd)
{
	struct stat st;
	unsigned f = 0;

	ck_assert_int_eq(fstat(fd, &st), 0);
	while (f < log->nfiles && (st.st_dev != log->files[f].dev || st.st_ino != log->files[f].ino))
		f++;
	return f;
}

static void pc_submit(struct pc_log *log, const struct tdr_iocb *io)
{
	const struct iocb *cb = &io->iocb;
	struct pc_io pio = { .submit = log->events, .done = PC_NEVER, .iocb = io };

	pio.file = pc_file_of(log, (int)cb->aio_fildes);
	if (pio.file == log->nfiles) {
		log->others++;
		return;
	}
	if (cb->aio_lio_opcode == IO_CMD_FDSYNC || cb->aio_lio_opcode == IO_CMD_FSYNC) {
		pio.sync = true;
		pio.full_sync = cb->aio_lio_opcode == IO_CMD_FSYNC;
	} else {
		pio.data = pc_copy_data(cb, &pio.off, &pio.len);
		pio.dsync = (cb->aio_rw_flags & RWF_DSYNC) != 0;
		/*
		 * Two overlapping writes in flight at once may land in either
		 * order: a driver must never issue them, and the model could
		 * not tell which content is right.
		 */
		for (size_t i = 0; i < log->n; i++)
			ck_assert_msg(log->ios[i].done != PC_NEVER ||
				      !pc_overlap(&log->ios[i], pio.file, pio.off, pio.len),
				      "overlapping writes in flight: [%llu, +%zu) and [%llu, +%zu)",
				      (unsigned long long)log->ios[i].off, log->ios[i].len,
				      (unsigned long long)pio.off, pio.len);
	}
	log->events++;
	pc_push(log, &pio);
}

static void pc_done(struct pc_log *log, const struct tdr_iocb *io, ssize_t res)
{
	/* A write failed before it reached the kernel has no entry. */
	for (size_t i = log->n; i-- > 0;) {
		struct pc_io *p = &log->ios[i];

		if (p->iocb == io && p->done == PC_NEVER) {
			p->done = log->events++;
			p->res = res;
			p->iocb = NULL;
			return;
		}
	}
}

static void pc_journal(void *arg, enum tdr_io_journal_event ev, const struct tdr_iocb *io,
		       ssize_t res)
{
	if (ev == TDR_IO_J_SUBMIT)
		pc_submit(arg, io);
	else
		pc_done(arg, io, res);
}

/* The files' "before" state: what a cut before any event finds. */
static void pc_take_files(struct pc_log *log, const char *const *paths, unsigned n)
{
	memset(log, 0, sizeof(*log));
	ck_assert_uint_le(n, PC_MAX_FILES);
	for (unsigned i = 0; i < n; i++) {
		struct pc_logged_file *lf = &log->files[i];
		struct stat st;
		int fd = open(paths[i], O_RDONLY);

		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(fstat(fd, &st), 0);
		ck_assert_uint_lt(strlen(paths[i]), sizeof(lf->path));
		strcpy(lf->path, paths[i]);
		lf->dev = st.st_dev;
		lf->ino = st.st_ino;
		lf->before_len = (size_t)st.st_size;
		lf->before = malloc(lf->before_len ? lf->before_len : 1);
		ck_assert_ptr_nonnull(lf->before);
		ck_assert_int_eq(pread(fd, lf->before, lf->before_len, 0), (ssize_t)lf->before_len);
		close(fd);
	}
	log->nfiles = n;
}

void pc_start_files(struct pc_log *log, const char *const *paths, unsigned n,
		    struct tdr_io_ctx *io)
{
	pc_take_files(log, paths, n);
	tdr_io_set_journal(io, pc_journal, log);
}

/* A synchronous call: taken and finished in two consecutive events. */
static void pc_sync_journal(void *arg, enum vhd_sync_op op, int fd, const void *buf, size_t len,
			    uint64_t off)
{
	struct pc_log *log = arg;
	struct pc_io pio = { .file = pc_file_of(log, fd) };

	if (pio.file == log->nfiles) {
		log->others++;
		return;
	}
	switch (op) {
	case VHD_SYNC_WRITE:
		pio.off = off;
		pio.len = len;
		pio.data = malloc(len ? len : 1);
		ck_assert_ptr_nonnull(pio.data);
		memcpy(pio.data, buf, len);
		pio.res = (ssize_t)len;
		break;
	case VHD_SYNC_DATASYNC:
	case VHD_SYNC_FSYNC:
		pio.sync = true;
		pio.full_sync = op == VHD_SYNC_FSYNC;
		break;
	case VHD_SYNC_TRUNCATE:
		pio.trunc = true;
		pio.off = off;
		break;
	}
	pio.submit = log->events++;
	pio.done = log->events++;
	pc_push(log, &pio);
}

void pc_start_sync_files(struct pc_log *log, const char *const *paths, unsigned n)
{
	pc_take_files(log, paths, n);
	vhd_sync_set_journal(pc_sync_journal, log);
}

void pc_stop_sync(struct pc_log *log)
{
	(void)log;
	vhd_sync_set_journal(NULL, NULL);
}

void pc_start(struct pc_log *log, const char *path, struct tdr_io_ctx *io)
{
	pc_start_files(log, &path, 1, io);
}

void pc_stop(struct pc_log *log, struct tdr_io_ctx *io)
{
	(void)log;
	tdr_io_set_journal(io, NULL, NULL);
}

void pc_free(struct pc_log *log)
{
	for (size_t i = 0; i < log->n; i++)
		free(log->ios[i].data);
	free(log->ios);
	for (unsigned i = 0; i < log->nfiles; i++)
		free(log->files[i].before);
	memset(log, 0, sizeof(*log));
}

size_t pc_mark(struct pc_log *log)
{
	return log->events++;
}

static bool pc_complete(const struct pc_io *p, size_t at)
{
	return p->done < at && p->res >= 0 && (size_t)p->res == (p->sync ? 0 : p->len);
}

bool pc_durable(const struct pc_log *log, size_t i, size_t at)
{
	const struct pc_io *p = &log->ios[i];

	if (p->sync || !pc_complete(p, at))
		return false;
	if (p->dsync)
		return true;
	for (size_t j = i + 1; j < log->n; j++) {
		const struct pc_io *s = &log->ios[j];

		if (s->sync && (s->full_sync || !p->trunc) && s->file == p->file &&
		    s->submit > p->done && pc_complete(s, at))
			return true;
	}
	return false;
}

bool pc_undecided(const struct pc_log *log, size_t i, size_t at)
{
	const struct pc_io *p = &log->ios[i];

	return !p->sync && p->submit < at && !pc_durable(log, i, at);
}

/* ------------------------------------------------------------ versions */

enum pc_pick { PC_NONE, PC_ALL, PC_ONLY, PC_ALL_BUT, PC_RANDOM_WRITES, PC_RANDOM_SECTORS };

struct pc_version {
	enum pc_pick pick;
	size_t k;		/* PC_ONLY, PC_ALL_BUT: the position among the undecided */
	uint64_t seed;		/* PC_RANDOM_* */
};

static uint64_t pc_rand(uint64_t *s)
{
	/* xorshift64*: reproducible from the seed printed with a failure */
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 2685821657736338717ull;
}

struct pc_file {
	int fd;
	char *base;		/* the file with every write that had to survive */
	size_t base_len;
	size_t base_cap;
};

/* The files being rebuilt. */
struct pc_build {
	struct pc_file f[PC_MAX_FILES];
	bool *in_base;		/* the writes (and truncates) the bases hold */
	bool *cut_short;	/* undecided truncates this version applied */
};

static void pc_base_write(struct pc_file *f, uint64_t off, const char *data, size_t len)
{
	if (off + len > f->base_cap) {
		size_t cap = f->base_cap ? f->base_cap : 4096;

		while (cap < off + len)
			cap *= 2;
		f->base = realloc(f->base, cap);
		ck_assert_ptr_nonnull(f->base);
		memset(f->base + f->base_cap, 0, cap - f->base_cap);
		f->base_cap = cap;
	}
	memcpy(f->base + off, data, len);
	if (off + len > f->base_len)
		f->base_len = off + len;
	ck_assert_int_eq(pwrite(f->fd, data, len, (off_t)off), (ssize_t)len);
}

/*
 * Whether a later write that must survive covers [off, off + len) of
 * write i: then i's data there can't be on disk.  Overlapping writes are
 * never in flight together, so the later one was issued after i
 * completed, and the disk applies them in that order: i's data can't
 * come back over a write that is durable (one written with RWF_DSYNC
 * over an earlier write not yet synced, say).
 */
static bool pc_shadowed(const struct pc_log *log, const struct pc_build *b, size_t i,
			uint64_t off, size_t len, size_t at)
{
	for (size_t j = i + 1; j < log->n; j++)
		if (pc_overlap(&log->ios[j], log->ios[i].file, off, len) &&
		    (b->in_base[j] || pc_durable(log, j, at)))
			return true;
	return false;
}

static void pc_put(struct pc_file *f, bool to_base, uint64_t off, const char *data, size_t len)
{
	if (!len)
		return;
	if (to_base)
		pc_base_write(f, off, data, len);
	else
		ck_assert_int_eq(pwrite(f->fd, data, len, (off_t)off), (ssize_t)len);
}

/*
 * Writes write i's sectors (those take() picks) that no later durable
 * write covers, a run of consecutive ones per system call.
 */
static void pc_write_sectors(const struct pc_log *log, struct pc_build *b, size_t i, size_t at,
			     bool to_base, bool (*take)(void *), void *take_arg)
{
	const struct pc_io *p = &log->ios[i];
	struct pc_file *f = &b->f[p->file];
	bool any = pc_shadowed(log, b, i, p->off, p->len, at);
	size_t run = 0, run_len = 0;

	for (size_t s = 0; s < p->len; s += PC_SECTOR) {
		size_t n = p->len - s < PC_SECTOR ? p->len - s : PC_SECTOR;

		if ((take && !take(take_arg)) ||
		    (any && pc_shadowed(log, b, i, p->off + s, n, at))) {
			pc_put(f, to_base, p->off + run, p->data + run, run_len);
			run = s + n;
			run_len = 0;
			continue;
		}
		run_len += n;
	}
	pc_put(f, to_base, p->off + run, p->data + run, run_len);
}

/*
 * Whether a write after truncate i that the base holds reaches past its
 * length: cutting the file there would lose it, and the model cannot say
 * in which order such a pair reached the disk.  The tools never do that.
 */
static void pc_trunc_check(const struct pc_log *log, const struct pc_build *b, size_t i)
{
	const struct pc_io *t = &log->ios[i];

	for (size_t j = i + 1; j < log->n; j++) {
		const struct pc_io *w = &log->ios[j];

		ck_assert_msg(!(b->in_base[j] && !w->sync && !w->trunc && w->file == t->file &&
				w->off + w->len > t->off),
			      "the model cannot order truncate #%zu with the durable write #%zu after it",
			      i, j);
	}
}

/* Truncate i on the file (and the base: to_base). */
static void pc_truncate(const struct pc_log *log, struct pc_build *b, size_t i, bool to_base)
{
	const struct pc_io *t = &log->ios[i];
	struct pc_file *f = &b->f[t->file];

	pc_trunc_check(log, b, i);
	ck_assert_int_eq(ftruncate(f->fd, (off_t)t->off), 0);
	if (!to_base)
		return;
	if (t->off < f->base_len) {
		memset(f->base + t->off, 0, f->base_len - t->off);
	} else if (t->off > f->base_cap) {
		f->base = realloc(f->base, t->off);
		ck_assert_ptr_nonnull(f->base);
		memset(f->base + f->base_cap, 0, t->off - f->base_cap);
		f->base_cap = t->off;
	}
	f->base_len = t->off;
}

/* Brings base (and the file) to the cut: the writes newly made durable, in submission order. */
static size_t pc_advance(const struct pc_log *log, struct pc_build *b, size_t at)
{
	size_t durable = 0;

	for (size_t i = 0; i < log->n; i++) {
		if (!pc_durable(log, i, at))
			continue;
		durable++;
		if (b->in_base[i])
			continue;
		if (log->ios[i].trunc)
			pc_truncate(log, b, i, true);
		else
			pc_write_sectors(log, b, i, at, true, NULL, NULL);
		b->in_base[i] = true;
	}
	return durable;
}

static bool pc_coin(void *rng)
{
	return pc_rand(rng) & 1;
}

/* Writes the version's parts of the undecided writes und[0..m), in submission order. */
static void pc_apply(const struct pc_log *log, struct pc_build *b, const size_t *und, size_t m,
		     const struct pc_version *v, size_t at)
{
	uint64_t rng = v->seed * 0x9E3779B97F4A7C15ull + 1;

	for (size_t k = 0; k < m; k++) {
		bool take;

		switch (v->pick) {
		case PC_ALL:
		case PC_RANDOM_SECTORS:
			take = true;
			break;
		case PC_ONLY:
			take = k == v->k;
			break;
		case PC_ALL_BUT:
			take = k != v->k;
			break;
		case PC_RANDOM_WRITES:
			take = pc_coin(&rng);
			break;
		default:
			take = false;
			break;
		}
		if (take && log->ios[und[k]].trunc) {
			/* A truncate is whole or not at all. */
			pc_truncate(log, b, und[k], false);
			b->cut_short[k] = true;
		} else if (take) {
			pc_write_sectors(log, b, und[k], at, false,
					 v->pick == PC_RANDOM_SECTORS ? pc_coin : NULL, &rng);
		}
	}
}

/* Puts the bases back over the undecided writes' ranges, and the files' lengths. */
static void pc_undo(const struct pc_log *log, struct pc_build *b, const size_t *und, size_t m)
{
	for (size_t k = 0; k < m; k++) {
		const struct pc_io *p = &log->ios[und[k]];
		struct pc_file *f = &b->f[p->file];
		size_t len = p->len;

		if (p->trunc) {
			/* What it cut off comes back from the base. */
			if (!b->cut_short[k])
				continue;
			b->cut_short[k] = false;
			len = f->base_len;
		}
		if (p->off >= f->base_len)
			continue;
		size_t n = f->base_len - p->off < len ? f->base_len - p->off : len;

		ck_assert_int_eq(pwrite(f->fd, f->base + p->off, n, (off_t)p->off), (ssize_t)n);
	}
	for (unsigned i = 0; i < log->nfiles; i++)
		ck_assert_int_eq(ftruncate(b->f[i].fd, (off_t)b->f[i].base_len), 0);
}

static void pc_describe(char *buf, size_t len, const struct pc_log *log, const size_t *und,
			const struct pc_version *v)
{
	switch (v->pick) {
	case PC_NONE:
		snprintf(buf, len, "none of the undecided writes");
		break;
	case PC_ALL:
		snprintf(buf, len, "all of the undecided writes");
		break;
	case PC_ONLY:
	case PC_ALL_BUT: {
		const struct pc_io *p = &log->ios[und[v->k]];

		const char *name = strrchr(log->files[p->file].path, '/');

		if (p->trunc)
			snprintf(buf, len, "%s journal entry #%zu (truncate to %llu of %s)",
				 v->pick == PC_ONLY ? "only" : "all but", und[v->k],
				 (unsigned long long)p->off, name ? name + 1 : log->files[p->file].path);
		else
			snprintf(buf, len, "%s journal entry #%zu (%zu bytes at %llu of %s)",
				 v->pick == PC_ONLY ? "only" : "all but", und[v->k], p->len,
				 (unsigned long long)p->off, name ? name + 1 : log->files[p->file].path);
		break;
	}
	case PC_RANDOM_WRITES:
		snprintf(buf, len, "a random mix of whole writes (seed %llu)",
			 (unsigned long long)v->seed);
		break;
	case PC_RANDOM_SECTORS:
		snprintf(buf, len, "a random mix of sectors (seed %llu)",
			 (unsigned long long)v->seed);
		break;
	}
}

/* The versions of one cut: none, all, each alone and all but each, random mixes. */
static size_t pc_versions(struct pc_version *vs, size_t m, size_t at)
{
	size_t n = 0;
	uint64_t rng = at * 7919 + 17;

	vs[n++] = (struct pc_version){ PC_NONE, 0, 0 };
	if (m == 0)
		return n;
	vs[n++] = (struct pc_version){ PC_ALL, 0, 0 };
	if (m > 1) {
		for (size_t i = 0; i < PC_EACH_MAX && i < m; i++) {
			size_t k = m <= PC_EACH_MAX ? i : (size_t)(pc_rand(&rng) % m);

			vs[n++] = (struct pc_version){ PC_ONLY, k, 0 };
			vs[n++] = (struct pc_version){ PC_ALL_BUT, k, 0 };
		}
		for (unsigned i = 0; i < PC_RANDOM; i++)
			vs[n++] = (struct pc_version){ PC_RANDOM_WRITES, 0, at * 100 + i };
	}
	for (unsigned i = 0; i < PC_RANDOM; i++)
		vs[n++] = (struct pc_version){ PC_RANDOM_SECTORS, 0, at * 100 + 50 + i };
	return n;
}

/* Writes the file as it was before the run, sparse where it was zero. */
static void pc_file_init(struct pc_file *f, const struct pc_logged_file *lf)
{
	f->fd = open(lf->path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_ge(f->fd, 0);
	f->base_cap = f->base_len = lf->before_len;
	f->base = malloc(f->base_cap ? f->base_cap : 1);
	ck_assert_ptr_nonnull(f->base);
	memcpy(f->base, lf->before, lf->before_len);
	for (size_t off = 0; off < lf->before_len; off += 4096) {
		size_t n = lf->before_len - off < 4096 ? lf->before_len - off : 4096;
		bool zero = true;

		for (size_t i = 0; i < n && zero; i++)
			zero = lf->before[off + i] == 0;
		if (!zero)
			ck_assert_int_eq(pwrite(f->fd, lf->before + off, n, (off_t)off), (ssize_t)n);
	}
	ck_assert_int_eq(ftruncate(f->fd, (off_t)f->base_len), 0);
}

size_t pc_for_each_cut(const struct pc_log *log, pc_check_fn check, void *arg)
{
	struct pc_version vs[2 + 2 * PC_EACH_MAX + 2 * PC_RANDOM];
	struct pc_build b = { .in_base = calloc(log->n + 1, sizeof(bool)),
			      .cut_short = calloc(log->n + 1, sizeof(bool)) };
	size_t *und = calloc(log->n + 1, sizeof(*und)), checked = 0;
	char how[160];

	ck_assert_ptr_nonnull(und);
	ck_assert_ptr_nonnull(b.in_base);
	ck_assert_ptr_nonnull(b.cut_short);
	for (unsigned i = 0; i < log->nfiles; i++)
		pc_file_init(&b.f[i], &log->files[i]);

	for (size_t at = 0; at <= log->events; at++) {
		struct pc_cut cut = { .at = at, .how = how };
		size_t m = 0, nv;

		cut.durable = pc_advance(log, &b, at);
		for (size_t i = 0; i < log->n; i++)
			if (pc_undecided(log, i, at))
				und[m++] = i;
		cut.undecided = m;
		nv = pc_versions(vs, m, at);
		for (size_t v = 0; v < nv; v++) {
			pc_describe(how, sizeof(how), log, und, &vs[v]);
			pc_apply(log, &b, und, m, &vs[v], at);
			check(arg, &cut);
			pc_undo(log, &b, und, m);
			checked++;
		}
	}
	for (unsigned i = 0; i < log->nfiles; i++) {
		close(b.f[i].fd);
		free(b.f[i].base);
	}
	free(b.in_base);
	free(b.cut_short);
	free(und);
	return checked;
}
