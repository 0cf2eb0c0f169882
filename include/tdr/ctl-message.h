/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The control socket's messages: wire-compatible with the tapdisk control
 * protocol of blktap3 (include/tapdisk-message.h of xapi-project/blktap), so
 * that blktap's own tap-ctl can list, pause, unpause, stat, open and close
 * a tapdisk-replica process.
 *
 * The protocol is a stream of fixed-size structs in host byte order, one
 * struct per message (a UNIX socket never leaves the host).  A client sends
 * one request; the server answers with one response, except:
 *   - LIST: one LIST_RSP per minor with u.list.count counting down to 1,
 *     then a final LIST_RSP with count 0 and minor -1;
 *   - STATS: a STATS_RSP whose u.info.length bytes of JSON follow it;
 *   - TDR_MESSAGE_REPLICA (ours): zero or more TDR_MESSAGE_REPLICA_DATA,
 *     then one TDR_MESSAGE_REPLICA_RSP.
 * A failure is answered with TAPDISK_MESSAGE_ERROR: u.response.error is a
 * positive errno value and u.response.message says why.  The cookie carries
 * the minor (0xffff: none / all) and is echoed in every response.
 *
 * Sockets are found as BLKTAP_CONTROL_DIR "/" BLKTAP_CONTROL_SOCKET "<pid>".
 *
 * The layout below is written from the blktap3 header's description: the
 * same field order, types and sizes (544 bytes per message on LP64), and the
 * same message numbers.  Older blktap releases (before req_timeout and the
 * XENBLKIF messages) used 536-byte messages and a different EXIT number;
 * they are not supported.
 */
#ifndef TDR_CTL_MESSAGE_H
#define TDR_CTL_MESSAGE_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define BLKTAP_CONTROL_DIR    "/var/run/blktap-control"
#define BLKTAP_CONTROL_SOCKET "ctl"

#define TAPDISK_MESSAGE_MAX_PATH_LENGTH 256
#define TAPDISK_MESSAGE_STRING_LENGTH   256
#define TAPDISK_MESSAGE_MAX_MINORS \
	((TAPDISK_MESSAGE_MAX_PATH_LENGTH / sizeof(int)) - 1)
/* blktap's MAX_RING_PAGES (xen_blkif.h): the ring grant array's length. */
#define TDR_CTL_MAX_RING_PAGES 8

/* u.params.flags */
#define TAPDISK_MESSAGE_FLAG_SHARED         0x001
#define TAPDISK_MESSAGE_FLAG_RDONLY         0x002
#define TAPDISK_MESSAGE_FLAG_ADD_CACHE      0x004
#define TAPDISK_MESSAGE_FLAG_VHD_INDEX      0x008
#define TAPDISK_MESSAGE_FLAG_ADD_LOG        0x010	/* a 256-byte log path follows the message */
#define TAPDISK_MESSAGE_FLAG_ADD_LCACHE     0x020
#define TAPDISK_MESSAGE_FLAG_REUSE_PRT      0x040
#define TAPDISK_MESSAGE_FLAG_SECONDARY      0x080
#define TAPDISK_MESSAGE_FLAG_STANDBY        0x100
#define TAPDISK_MESSAGE_FLAG_NO_O_DIRECT    0x200
#define TAPDISK_MESSAGE_FLAG_OPEN_ENCRYPTED 0x400	/* a key length byte and a key follow */

/* u.list.state: blktap's VBD state bits, the ones we report. */
#define TDR_CTL_STATE_CLOSED           0x0002	/* attached, no image open */
#define TDR_CTL_STATE_PAUSE_REQUESTED  0x0010
#define TDR_CTL_STATE_PAUSED           0x0020
#define TDR_CTL_STATE_SHUTDOWN_REQUESTED 0x0040

/* TDR_MESSAGE_REPLICA_DATA chunks carry at most this much text (plus NUL). */
#define TDR_CTL_DATA_CHUNK (TAPDISK_MESSAGE_STRING_LENGTH - 1)
/* The cookie meaning "no minor" / "every minor". */
#define TDR_CTL_COOKIE_NONE 0xffffu

enum tdr_ctl_msg_type {
	TAPDISK_MESSAGE_ERROR = 1,
	TAPDISK_MESSAGE_RUNTIME_ERROR = 2,
	TAPDISK_MESSAGE_PID = 3,
	TAPDISK_MESSAGE_PID_RSP = 4,
	TAPDISK_MESSAGE_ATTACH = 5,
	TAPDISK_MESSAGE_ATTACH_RSP = 6,
	TAPDISK_MESSAGE_OPEN = 7,
	TAPDISK_MESSAGE_OPEN_RSP = 8,
	TAPDISK_MESSAGE_PAUSE = 9,
	TAPDISK_MESSAGE_PAUSE_RSP = 10,
	TAPDISK_MESSAGE_RESUME = 11,
	TAPDISK_MESSAGE_RESUME_RSP = 12,
	TAPDISK_MESSAGE_CLOSE = 13,
	TAPDISK_MESSAGE_CLOSE_RSP = 14,
	TAPDISK_MESSAGE_DETACH = 15,
	TAPDISK_MESSAGE_DETACH_RSP = 16,
	TAPDISK_MESSAGE_LIST_MINORS = 17,
	TAPDISK_MESSAGE_LIST_MINORS_RSP = 18,
	TAPDISK_MESSAGE_LIST = 19,
	TAPDISK_MESSAGE_LIST_RSP = 20,
	TAPDISK_MESSAGE_STATS = 21,
	TAPDISK_MESSAGE_STATS_RSP = 22,
	TAPDISK_MESSAGE_FORCE_SHUTDOWN = 23,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT = 24,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP = 25,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT = 26,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT_RSP = 27,
	TAPDISK_MESSAGE_DISK_INFO = 28,
	TAPDISK_MESSAGE_DISK_INFO_RSP = 29,
	TAPDISK_MESSAGE_EXIT = 30,
	TAPDISK_MESSAGE_COMMIT = 31,
	TAPDISK_MESSAGE_COMMIT_RSP = 32,
	TAPDISK_MESSAGE_QUERY_COMMIT_JOB = 33,
	TAPDISK_MESSAGE_QUERY_COMMIT_JOB_RSP = 34,
	TAPDISK_MESSAGE_CANCEL_COMMIT_JOB = 35,
	TAPDISK_MESSAGE_CANCEL_COMMIT_JOB_RSP = 36,

	/*
	 * Ours, far above blktap's range so that a future blktap message
	 * cannot collide with them.  REPLICA: cookie = minor, u.string.text =
	 * a request line (include/tdr/replica.h).  Answered by zero or more
	 * REPLICA_DATA (u.string.text: a chunk of output, NUL-terminated; the
	 * client concatenates them) and one REPLICA_RSP (u.response).
	 */
	TDR_MESSAGE_REPLICA = 0x1000,
	TDR_MESSAGE_REPLICA_RSP = 0x1001,
	TDR_MESSAGE_REPLICA_DATA = 0x1002,
};

struct tdr_ctl_params {
	uint32_t flags;				/* TAPDISK_MESSAGE_FLAG_* */
	uint32_t devnum;			/* the minor */
	uint32_t domid;
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];	/* "type:/path", NUL-terminated */
	uint32_t prt_devnum;
	uint16_t req_timeout;			/* seconds; 0: default */
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
};

struct tdr_ctl_image {
	uint64_t sectors;
	uint32_t sector_size;
	uint32_t info;				/* TDR_CTL_INFO_* */
};

/* tdr_ctl_image.info: the Xen blkif VDISK_* bits. */
#define TDR_CTL_INFO_CDROM     0x1
#define TDR_CTL_INFO_REMOVABLE 0x2
#define TDR_CTL_INFO_READONLY  0x4

struct tdr_ctl_string {
	char text[TAPDISK_MESSAGE_STRING_LENGTH];
};

struct tdr_ctl_response {
	int error;				/* positive errno value, 0: success */
	char message[TAPDISK_MESSAGE_STRING_LENGTH];
};

struct tdr_ctl_minors {
	int count;
	int list[TAPDISK_MESSAGE_MAX_MINORS];
};

struct tdr_ctl_list {
	int count;
	int minor;
	int state;				/* TDR_CTL_STATE_* bits */
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
};

struct tdr_ctl_stat {
	uint16_t type;
	uint16_t cookie;
	size_t length;				/* bytes of JSON after the message */
};

/* Only here for the union's layout: we refuse XENBLKIF_* messages. */
struct tdr_ctl_blkif {
	uint32_t domid;
	uint32_t devid;
	uint32_t gref[TDR_CTL_MAX_RING_PAGES];
	uint32_t order;
	uint32_t proto;
	char pool_name[TAPDISK_MESSAGE_STRING_LENGTH];
	uint32_t port;
	uint32_t poll_duration;
	uint32_t poll_idle_threshold;
};

/*
 * Declared by blktap for RESUME, but its tapdisk and tap-ctl both use
 * u.params for RESUME; so do we.
 */
struct tdr_ctl_resume {
	uint32_t flags;
	char new_params[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
};

struct tdr_ctl_query {
	uint64_t current_progress;
	uint64_t total_progress;
	char status[TAPDISK_MESSAGE_STRING_LENGTH];
};

struct tdr_ctl_msg {
	uint16_t type;				/* enum tdr_ctl_msg_type */
	uint16_t cookie;			/* the minor */
	union {
		pid_t tapdisk_pid;
		struct tdr_ctl_image image;
		struct tdr_ctl_params params;
		struct tdr_ctl_string string;
		struct tdr_ctl_minors minors;
		struct tdr_ctl_response response;
		struct tdr_ctl_list list;
		struct tdr_ctl_stat info;
		struct tdr_ctl_blkif blkif;
		struct tdr_ctl_resume resume;
		struct tdr_ctl_query query;
	} u;
};

#define TDR_CTL_MSG_SIZE sizeof(struct tdr_ctl_msg)

/*
 * The layout blktap3 has on the ABI dom0 runs on (x86-64, aarch64: LP64).
 * Any difference here would make us unreadable to tap-ctl.
 */
#if defined(__LP64__)
static_assert(sizeof(struct tdr_ctl_params) == 532, "params layout");
static_assert(offsetof(struct tdr_ctl_params, path) == 12, "params.path offset");
static_assert(offsetof(struct tdr_ctl_params, prt_devnum) == 268, "params.prt_devnum offset");
static_assert(offsetof(struct tdr_ctl_params, req_timeout) == 272, "params.req_timeout offset");
static_assert(offsetof(struct tdr_ctl_params, secondary) == 274, "params.secondary offset");
static_assert(sizeof(struct tdr_ctl_image) == 16, "image layout");
static_assert(sizeof(struct tdr_ctl_response) == 260, "response layout");
static_assert(sizeof(struct tdr_ctl_minors) == 256, "minors layout");
static_assert(sizeof(struct tdr_ctl_list) == 268, "list layout");
static_assert(offsetof(struct tdr_ctl_list, path) == 12, "list.path offset");
static_assert(sizeof(struct tdr_ctl_stat) == 16, "stat layout");
static_assert(offsetof(struct tdr_ctl_stat, length) == 8, "stat.length offset");
static_assert(sizeof(struct tdr_ctl_blkif) == 316, "blkif layout");
static_assert(sizeof(struct tdr_ctl_resume) == 516, "resume layout");
static_assert(sizeof(struct tdr_ctl_query) == 272, "query layout");
static_assert(offsetof(struct tdr_ctl_msg, u) == 8, "message union offset");
static_assert(sizeof(struct tdr_ctl_msg) == 544, "message size");
#endif

/* ------------------------------------------------------------------ */
/* Helpers (ctl-message.c; pure) */

/* A short name for logs and errors, e.g. "pause response"; "unknown" if none. */
const char *tdr_ctl_msg_name(unsigned type);
/*
 * Whether type is one a server sends (a *_RSP, ERROR, RUNTIME_ERROR or a
 * replica reply).  Not a parity rule: from XENBLKIF_CONNECT (24) on,
 * blktap's numbering has responses at odd numbers too (DISK_INFO_RSP is 29).
 */
int tdr_ctl_msg_is_response(unsigned type);
/* Zeroes msg and sets type and cookie. */
void tdr_ctl_msg_init(struct tdr_ctl_msg *msg, unsigned type, unsigned cookie);
/* Copies src into a fixed field of len bytes: 0, or -ENAMETOOLONG if it does not fit with its NUL. */
int tdr_ctl_set_string(char *dst, size_t len, const char *src);
/* Whether a fixed field of len bytes holds a NUL (so it is a valid C string). */
int tdr_ctl_string_ok(const char *s, size_t len);
/* Fills an ERROR (or any response) with errno value err (either sign) and a message. */
void tdr_ctl_msg_error(struct tdr_ctl_msg *msg, unsigned type, unsigned cookie, int err,
		       const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* ------------------------------------------------------------------ */
/* Blocking client helpers (ctl-client.c), for tdr-ctl and tests: never used in the daemon. */

/* The control directory: $TDR_CONTROL_DIR, or BLKTAP_CONTROL_DIR. */
const char *tdr_ctl_dir(void);
/* Writes "<dir>/ctl<pid>" into buf; -ENAMETOOLONG if it does not fit. */
int tdr_ctl_socket_path(char *buf, size_t len, const char *dir, long pid);
/* Connects to the socket at path: fd or -errno. */
int tdr_ctl_connect(const char *path);
/* Sends one message: 0 or -errno.  timeout_ms < 0: no limit. */
int tdr_ctl_send(int fd, const struct tdr_ctl_msg *msg, int timeout_ms);
/* Reads exactly len bytes: 0, -EPIPE on EOF before the end, -ETIMEDOUT or -errno. */
int tdr_ctl_recv_raw(int fd, void *buf, size_t len, int timeout_ms);
/* Reads one message: as tdr_ctl_recv_raw. */
int tdr_ctl_recv(int fd, struct tdr_ctl_msg *msg, int timeout_ms);

#endif
