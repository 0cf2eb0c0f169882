/* SPDX-License-Identifier: BSD-3-Clause */
/* Pure helpers for the control messages (include/tdr/ctl-message.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "tdr/ctl-message.h"

const char *tdr_ctl_msg_name(unsigned type)
{
	static const char *const names[] = {
		[TAPDISK_MESSAGE_ERROR] = "error",
		[TAPDISK_MESSAGE_RUNTIME_ERROR] = "runtime error",
		[TAPDISK_MESSAGE_PID] = "pid",
		[TAPDISK_MESSAGE_PID_RSP] = "pid response",
		[TAPDISK_MESSAGE_ATTACH] = "attach",
		[TAPDISK_MESSAGE_ATTACH_RSP] = "attach response",
		[TAPDISK_MESSAGE_OPEN] = "open",
		[TAPDISK_MESSAGE_OPEN_RSP] = "open response",
		[TAPDISK_MESSAGE_PAUSE] = "pause",
		[TAPDISK_MESSAGE_PAUSE_RSP] = "pause response",
		[TAPDISK_MESSAGE_RESUME] = "resume",
		[TAPDISK_MESSAGE_RESUME_RSP] = "resume response",
		[TAPDISK_MESSAGE_CLOSE] = "close",
		[TAPDISK_MESSAGE_CLOSE_RSP] = "close response",
		[TAPDISK_MESSAGE_DETACH] = "detach",
		[TAPDISK_MESSAGE_DETACH_RSP] = "detach response",
		[TAPDISK_MESSAGE_LIST_MINORS] = "list minors",
		[TAPDISK_MESSAGE_LIST_MINORS_RSP] = "list minors response",
		[TAPDISK_MESSAGE_LIST] = "list",
		[TAPDISK_MESSAGE_LIST_RSP] = "list response",
		[TAPDISK_MESSAGE_STATS] = "stats",
		[TAPDISK_MESSAGE_STATS_RSP] = "stats response",
		[TAPDISK_MESSAGE_FORCE_SHUTDOWN] = "force shutdown",
		[TAPDISK_MESSAGE_XENBLKIF_CONNECT] = "sring connect",
		[TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP] = "sring connect response",
		[TAPDISK_MESSAGE_XENBLKIF_DISCONNECT] = "sring disconnect",
		[TAPDISK_MESSAGE_XENBLKIF_DISCONNECT_RSP] = "sring disconnect response",
		[TAPDISK_MESSAGE_DISK_INFO] = "disk info",
		[TAPDISK_MESSAGE_DISK_INFO_RSP] = "disk info response",
		[TAPDISK_MESSAGE_EXIT] = "exit",
		[TAPDISK_MESSAGE_COMMIT] = "commit",
		[TAPDISK_MESSAGE_COMMIT_RSP] = "commit response",
		[TAPDISK_MESSAGE_QUERY_COMMIT_JOB] = "query commit job",
		[TAPDISK_MESSAGE_QUERY_COMMIT_JOB_RSP] = "query commit job response",
		[TAPDISK_MESSAGE_CANCEL_COMMIT_JOB] = "cancel commit job",
		[TAPDISK_MESSAGE_CANCEL_COMMIT_JOB_RSP] = "cancel commit job response",
	};

	switch (type) {
	case TDR_MESSAGE_REPLICA:
		return "replica";
	case TDR_MESSAGE_REPLICA_RSP:
		return "replica response";
	case TDR_MESSAGE_REPLICA_DATA:
		return "replica data";
	}
	if (type < sizeof(names) / sizeof(names[0]) && names[type])
		return names[type];
	return "unknown";
}

int tdr_ctl_msg_is_response(unsigned type)
{
	switch (type) {
	case TAPDISK_MESSAGE_ERROR:
	case TAPDISK_MESSAGE_RUNTIME_ERROR:
	case TAPDISK_MESSAGE_PID_RSP:
	case TAPDISK_MESSAGE_ATTACH_RSP:
	case TAPDISK_MESSAGE_OPEN_RSP:
	case TAPDISK_MESSAGE_PAUSE_RSP:
	case TAPDISK_MESSAGE_RESUME_RSP:
	case TAPDISK_MESSAGE_CLOSE_RSP:
	case TAPDISK_MESSAGE_DETACH_RSP:
	case TAPDISK_MESSAGE_LIST_MINORS_RSP:
	case TAPDISK_MESSAGE_LIST_RSP:
	case TAPDISK_MESSAGE_STATS_RSP:
	case TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP:
	case TAPDISK_MESSAGE_XENBLKIF_DISCONNECT_RSP:
	case TAPDISK_MESSAGE_DISK_INFO_RSP:
	case TAPDISK_MESSAGE_COMMIT_RSP:
	case TAPDISK_MESSAGE_QUERY_COMMIT_JOB_RSP:
	case TAPDISK_MESSAGE_CANCEL_COMMIT_JOB_RSP:
	case TDR_MESSAGE_REPLICA_RSP:
	case TDR_MESSAGE_REPLICA_DATA:
		return 1;
	}
	return 0;
}

void tdr_ctl_msg_init(struct tdr_ctl_msg *msg, unsigned type, unsigned cookie)
{
	memset(msg, 0, sizeof(*msg));
	msg->type = (uint16_t)type;
	msg->cookie = (uint16_t)cookie;
}

int tdr_ctl_set_string(char *dst, size_t len, const char *src)
{
	size_t n = strlen(src);

	if (n >= len)
		return -ENAMETOOLONG;
	memcpy(dst, src, n + 1);
	return 0;
}

int tdr_ctl_string_ok(const char *s, size_t len)
{
	return memchr(s, '\0', len) != NULL;
}

void tdr_ctl_msg_error(struct tdr_ctl_msg *msg, unsigned type, unsigned cookie, int err,
		       const char *fmt, ...)
{
	va_list ap;

	tdr_ctl_msg_init(msg, type, cookie);
	msg->u.response.error = err < 0 ? -err : err;
	va_start(ap, fmt);
	/* Truncation is fine: the message is for humans. */
	vsnprintf(msg->u.response.message, sizeof(msg->u.response.message), fmt, ap);
	va_end(ap);
}
