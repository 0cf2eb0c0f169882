/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * STATS: a JSON object per minor in the shape blktap's tapdisk uses
 * ("name", "secs": [read, written], "images": [...]), with our counters
 * added, and a "replica" object when the disk has a replica filter.
 *
 * blktap splits image failures into reads and writes; td_image_stats has
 * one error counter, so "fail" is [errors, 0] and "errors" is the total.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl-int.h"
#include "tdr/log.h"

/* Larger answers mean something is wrong; refuse rather than grow. */
#define CTL_STATS_MAX (1u << 20)

void ctl_json_string(FILE *out, const char *s)
{
	fputc('"', out);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		switch (*p) {
		case '"':
			fputs("\\\"", out);
			break;
		case '\\':
			fputs("\\\\", out);
			break;
		case '\n':
			fputs("\\n", out);
			break;
		case '\t':
			fputs("\\t", out);
			break;
		default:
			if (*p < 0x20 || *p == 0x7f)
				fprintf(out, "\\u%04x", *p);
			else
				fputc(*p, out);
		}
	}
	fputc('"', out);
}

static bool is_number(const char *s)
{
	if (*s == '-')
		s++;
	if (!*s)
		return false;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s))
			return false;
	return true;
}

/* A driver's "key=value" lines as JSON members (after a leading member). */
static void driver_stats(FILE *out, struct td_image *img)
{
	char *buf = NULL, *line, *save = NULL;
	size_t len = 0;
	FILE *f;

	if (!img->drv->stats)
		return;
	f = open_memstream(&buf, &len);
	if (!f)
		return;
	img->drv->stats(img, f);
	fclose(f);
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *eq = strchr(line, '='), *val, *end;

		/* Drivers indent their lines for td_disk_debug(); keys are bare. */
		while (isspace((unsigned char)*line))
			line++;
		if (!eq || eq <= line)
			continue;
		for (end = eq; end > line && isspace((unsigned char)end[-1]); end--)
			;
		*end = '\0';
		for (val = eq + 1; isspace((unsigned char)*val); val++)
			;
		if (!*line)
			continue;
		fputs(", ", out);
		ctl_json_string(out, line);
		fputs(": ", out);
		if (is_number(val))
			fputs(val, out);
		else
			ctl_json_string(out, val);
	}
	free(buf);
}

static void image_json(FILE *out, struct td_image *img)
{
	const struct td_image_stats *s = &img->stats;

	fputs("{\"name\": ", out);
	ctl_json_string(out, img->params ? img->params : "");
	fputs(", \"type\": ", out);
	ctl_json_string(out, img->drv->name);
	fprintf(out,
		", \"size\": %llu, \"hits\": [%llu, %llu], \"fail\": [%llu, 0], \"secs\": [%llu, %llu]"
		", \"flush\": %llu, \"discard\": %llu, \"write_zeroes\": %llu, \"block_status\": %llu"
		", \"forwarded\": %llu, \"errors\": %llu",
		(unsigned long long)img->size_secs, (unsigned long long)s->rd_reqs,
		(unsigned long long)s->wr_reqs, (unsigned long long)s->errors,
		(unsigned long long)s->rd_secs, (unsigned long long)s->wr_secs,
		(unsigned long long)s->flush_reqs, (unsigned long long)s->discard_reqs,
		(unsigned long long)s->zero_reqs, (unsigned long long)s->status_reqs,
		(unsigned long long)s->forwarded, (unsigned long long)s->errors);
	fputs(", \"driver\": {\"type\": ", out);
	ctl_json_string(out, img->drv->name);
	driver_stats(out, img);
	fputs("}}", out);
}

static void replica_json(FILE *out, struct td_image *img)
{
	struct replica_status st;
	const struct replica_stats *s = &st.stats;

	replica_get_status(img, &st);
	fputs(", \"replica\": {\"mode\": ", out);
	ctl_json_string(out, replica_mode_name(st.mode));
	fputs(", \"state\": ", out);
	ctl_json_string(out, replica_state_name(st.state));
	fprintf(out, ", \"error\": %d, \"error_msg\": ", st.error < 0 ? -st.error : st.error);
	ctl_json_string(out, st.error_msg);
	fprintf(out, ", \"progress_done\": %llu, \"progress_total\": %llu",
		(unsigned long long)st.progress_done, (unsigned long long)st.progress_total);
	for (size_t i = 0; i < replica_n_stat_fields; i++)
		fprintf(out, ", \"%s\": %llu", replica_stat_fields[i].name,
			(unsigned long long)replica_stat_value(s, &replica_stat_fields[i]));
	fputc('}', out);
}

/* The process's event loop, which all its disks share: --poll-max-us. */
static void poll_json(FILE *out, const struct tdr_loop *loop)
{
	struct tdr_loop_poll_stats st;

	tdr_loop_get_poll_stats(loop, &st);
	fprintf(out, ", \"poll\": {\"max_ns\": %llu, \"window_ns\": %llu, \"polls\": %llu, \"hits\": %llu}",
		(unsigned long long)st.max_ns, (unsigned long long)st.window_ns,
		(unsigned long long)st.polls, (unsigned long long)st.hits);
}

static void minor_json(FILE *out, struct ctl_minor *m)
{
	struct td_disk *disk = m->disk;
	struct td_image *top = NULL, *img, *rep;
	bool first = true;

	fputs("{\"name\": ", out);
	ctl_json_string(out, m->params && disk ? m->params : "");
	fprintf(out, ", \"minor\": %d, \"state\": %d", m->minor, ctl_minor_state_bits(m));
	if (!disk) {
		fputs(", \"secs\": [0, 0], \"images\": []}", out);
		return;
	}
	/* The hold filter is ours, not part of the disk. */
	top = m->holding ? m->hold.parent : disk->top;
	fprintf(out, ", \"size\": %llu, \"inflight\": %llu, \"held\": %llu, \"secs\": [%llu, %llu]",
		(unsigned long long)disk->size_secs,
		(unsigned long long)(disk->inflight - m->nheld), (unsigned long long)m->nheld,
		(unsigned long long)top->stats.rd_secs, (unsigned long long)top->stats.wr_secs);
	fputs(", \"images\": [", out);
	for (img = top; img; img = img->parent) {
		if (!first)
			fputs(", ", out);
		first = false;
		image_json(out, img);
	}
	fputc(']', out);
	rep = replica_find(disk);
	if (rep)
		replica_json(out, rep);
	poll_json(out, m->srv->loop);
	fputc('}', out);
}

void ctl_do_stats(struct ctl_conn *c)
{
	struct ctl_server *srv = c->srv;
	struct tdr_ctl_msg rsp;
	char *buf = NULL;
	size_t len = 0;
	FILE *out;

	if (c->req.cookie != TDR_CTL_COOKIE_NONE && !ctl_minor_find(srv, c->req.cookie)) {
		ctl_conn_error(c, ENODEV, "no minor %u in this daemon; see tap-ctl list", c->req.cookie);
		return;
	}
	out = open_memstream(&buf, &len);
	if (!out) {
		ctl_conn_error(c, ENOMEM, "out of memory formatting statistics");
		return;
	}
	if (c->req.cookie == TDR_CTL_COOKIE_NONE) {
		struct tdr_list *pos;

		fputc('[', out);
		for (pos = srv->minors.next; pos != &srv->minors; pos = pos->next) {
			if (pos != srv->minors.next)
				fputs(", ", out);
			minor_json(out, tdr_list_entry(pos, struct ctl_minor, entry));
		}
		fputc(']', out);
	} else {
		minor_json(out, ctl_minor_find(srv, c->req.cookie));
	}
	if (fclose(out) != 0 || !buf) {
		free(buf);
		ctl_conn_error(c, ENOMEM, "out of memory formatting statistics");
		return;
	}
	if (len > CTL_STATS_MAX) {
		free(buf);
		ctl_conn_error(c, EFBIG, "statistics too large (%zu bytes)", len);
		return;
	}
	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_STATS_RSP, c->req.cookie);
	rsp.u.info.type = TAPDISK_MESSAGE_STATS_RSP;
	rsp.u.info.cookie = c->req.cookie;
	rsp.u.info.length = len;
	ctl_conn_queue(c, &rsp, buf, len);
	free(buf);
}
