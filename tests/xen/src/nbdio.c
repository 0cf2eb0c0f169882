/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * nbdio: data through an NBD export (libnbd), for the real-Xen tests.
 *
 *   nbdio SOCKET EXPORT OP...
 *     w:OFF:LEN:BYTE   write LEN bytes of BYTE at OFF
 *     r:OFF:LEN:BYTE   read and check that every byte is BYTE
 *     f                flush
 *   nbdio SOCKET EXPORT load SECONDS SIZE_MB [COUNT_FILE]
 *     a guest-like workload: 4 KiB writes, each read back and checked, at
 *     pseudo-random places of the first SIZE_MB; prints the number of
 *     operations and the longest gap between two completions (what a
 *     guest would see as its disk stalling).  Exit 1 on any I/O error.
 *     With COUNT_FILE, the number of operations completed so far is
 *     rewritten there after each one, so that a test can count what
 *     completed during an outage it causes.
 *
 * OFF and LEN take a K or M suffix; BYTE is a number (0x.. for hex).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static uint64_t num(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);

	if (*end == 'K' || *end == 'k')
		v <<= 10;
	else if (*end == 'M' || *end == 'm')
		v <<= 20;
	return v;
}

static int load(struct nbd_handle *h, double secs, uint64_t size, int count_fd)
{
	char wbuf[4096], rbuf[4096];
	uint64_t x = 88172645463325252ull, ops = 0, slow = 0;
	double start = now_ms(), last = 0, gap, max_gap = 0, max_at = 0;
	/* The long gaps, with their time, to tell stalls from scheduling noise. */
	double gaps[16], gaps_at[16];
	unsigned ngaps = 0, i;

	while (now_ms() - start < secs * 1000) {
		uint64_t off;
		int i;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		off = (x % (size / 4096)) * 4096;
		for (i = 0; i < 4096; i++)
			wbuf[i] = (char)(x >> (i % 8 * 8));
		if (nbd_pwrite(h, wbuf, sizeof(wbuf), off, 0) < 0 ||
		    nbd_pread(h, rbuf, sizeof(rbuf), off, 0) < 0) {
			fprintf(stderr, "nbdio load: I/O error at %" PRIu64 ": %s\n", off,
				nbd_get_error());
			return 1;
		}
		if (memcmp(wbuf, rbuf, sizeof(wbuf)) != 0) {
			fprintf(stderr, "nbdio load: data mismatch at %" PRIu64 "\n", off);
			return 1;
		}
		/* Timed from the first completion: connecting is not a stall. */
		gap = last ? now_ms() - last : 0;
		if (gap > max_gap) {
			max_gap = gap;
			max_at = now_ms() - start;
		}
		if (gap > 50) {
			slow++;
			if (ngaps < 16) {
				gaps[ngaps] = gap;
				gaps_at[ngaps++] = (now_ms() - start) / 1000;
			}
		}
		last = now_ms();
		ops += 2;
		if (count_fd >= 0) {
			char c[32];
			int n = snprintf(c, sizeof(c), "%20" PRIu64 "\n", ops);

			if (pwrite(count_fd, c, (size_t)n, 0) != n) {
				perror("nbdio load: count file");
				return 1;
			}
		}
	}
	printf("LOAD ops=%" PRIu64 " seconds=%.1f max_gap_ms=%.1f at_s=%.2f gaps_over_50ms=%" PRIu64,
	       ops, (now_ms() - start) / 1000, max_gap, max_at / 1000, slow);
	for (i = 0; i < ngaps; i++)
		printf("%s%.0fms@%.2fs", i ? "," : " long=", gaps[i], gaps_at[i]);
	printf("\n");
	return 0;
}

int main(int argc, char **argv)
{
	struct nbd_handle *h;
	int i, ret = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: nbdio SOCKET EXPORT OP... | nbdio SOCKET EXPORT load SECONDS SIZE_MB\n");
		return 2;
	}
	h = nbd_create();
	if (!h || nbd_set_export_name(h, argv[2]) < 0 || nbd_connect_unix(h, argv[1]) < 0) {
		fprintf(stderr, "nbdio: %s\n", nbd_get_error());
		return 1;
	}
	if (strcmp(argv[3], "load") == 0 && argc >= 6) {
		int fd = -1;

		if (argc >= 7) {
			fd = open(argv[6], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
			if (fd < 0) {
				perror(argv[6]);
				ret = 1;
				goto out;
			}
		}
		ret = load(h, atof(argv[4]), num(argv[5]) << 20, fd);
		if (fd >= 0)
			close(fd);
		goto out;
	}
	for (i = 3; i < argc && !ret; i++) {
		char op = argv[i][0], *p = argv[i] + 2, *q;
		uint64_t off, len;
		unsigned byte;
		char *buf;

		if (op == 'f') {
			if (nbd_flush(h, 0) < 0)
				ret = 1;
			continue;
		}
		off = num(p);
		q = strchr(p, ':');
		len = q ? num(q + 1) : 0;
		q = q ? strchr(q + 1, ':') : NULL;
		byte = q ? (unsigned)strtoul(q + 1, NULL, 0) : 0;
		buf = malloc(len ? len : 1);
		if (!buf || !len || (op != 'w' && op != 'r')) {
			fprintf(stderr, "nbdio: bad operation '%s'\n", argv[i]);
			free(buf);
			ret = 2;
			break;
		}
		if (op == 'w') {
			memset(buf, (int)byte, len);
			if (nbd_pwrite(h, buf, len, off, 0) < 0) {
				fprintf(stderr, "nbdio: write %s: %s\n", argv[i], nbd_get_error());
				ret = 1;
			}
		} else {
			if (nbd_pread(h, buf, len, off, 0) < 0) {
				fprintf(stderr, "nbdio: read %s: %s\n", argv[i], nbd_get_error());
				ret = 1;
			} else {
				for (uint64_t k = 0; k < len; k++) {
					if ((unsigned char)buf[k] != byte) {
						fprintf(stderr, "nbdio: %s: byte %" PRIu64 " is 0x%02x\n",
							argv[i], off + k, (unsigned char)buf[k]);
						ret = 1;
						break;
					}
				}
			}
		}
		free(buf);
	}
out:
	nbd_shutdown(h, 0);
	nbd_close(h);
	return ret;
}
