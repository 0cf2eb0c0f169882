/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * bench-send: what it costs the sender to push 1 MiB payloads into a UNIX
 * stream socket, copied by sendmsg() (what the link does) or handed over
 * by reference with vmsplice() into a pipe and splice() into the socket
 * (the "zero-copy" send docs/benchmarks.md discusses for the primary).
 *
 * A child process reads everything into one buffer, as a secondary's
 * receive does; the parent sends COUNT payloads from 8 page-aligned
 * buffers, one method per round, methods alternating.  Printed per
 * round: wall rate, and CPU seconds of sender and receiver per GiB
 * (CLOCK_PROCESS_CPUTIME_ID in each process).  Then the median of each.
 *
 *   bench-send [-n COUNT] [-r ROUNDS] [-p PIPE_BYTES]
 *              defaults: 4096 payloads, 5 rounds, a pipe of 1 MiB (the link's)
 *
 * Not run by make check.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BS_PAYLOAD (1u << 20)
#define BS_NBUF    8
#define BS_MAXROUND 64

enum bs_method { BS_COPY, BS_SPLICE, BS_NMETHOD };

static const char *const bs_name[BS_NMETHOD] = { "sendmsg (copy)", "vmsplice+splice" };

struct bs_result {
	double mb_s, send_cpu, recv_cpu;	/* MB/s; CPU seconds per GiB */
};

static double bs_clock(clockid_t id)
{
	struct timespec t;

	clock_gettime(id, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The receiver: read until EOF, then report its CPU time on the pipe fd. */
static void bs_receiver(int sock, int report)
{
	char *buf = malloc(BS_PAYLOAD);
	double cpu;
	ssize_t r;

	if (!buf)
		_exit(1);
	while ((r = read(sock, buf, BS_PAYLOAD)) != 0) {
		if (r < 0 && errno != EINTR)
			_exit(1);
	}
	cpu = bs_clock(CLOCK_PROCESS_CPUTIME_ID);
	if (write(report, &cpu, sizeof(cpu)) != (ssize_t)sizeof(cpu))
		_exit(1);
	_exit(0);
}

static int bs_send_copy(int sock, const char *buf)
{
	size_t off = 0;

	while (off < BS_PAYLOAD) {
		ssize_t r = send(sock, buf + off, BS_PAYLOAD - off, MSG_NOSIGNAL);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		off += (size_t)r;
	}
	return 0;
}

/* vmsplice() maps the buffer's pages into the pipe; splice() moves them on. */
static int bs_send_splice(int sock, const int pipefd[2], const char *buf)
{
	size_t off = 0;

	while (off < BS_PAYLOAD) {
		struct iovec iov = { (void *)(buf + off), BS_PAYLOAD - off };
		ssize_t in = vmsplice(pipefd[1], &iov, 1, 0);

		if (in < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (ssize_t left = in; left > 0;) {
			ssize_t out = splice(pipefd[0], NULL, sock, NULL, (size_t)left, SPLICE_F_MOVE);

			if (out < 0) {
				if (errno == EINTR)
					continue;
				return -errno;
			}
			left -= out;
		}
		off += (size_t)in;
	}
	return 0;
}

static int bs_round(enum bs_method m, long count, int pipe_bytes, char *const bufs[BS_NBUF],
		    struct bs_result *res)
{
	int sv[2] = { -1, -1 }, pipefd[2] = { -1, -1 }, report[2] = { -1, -1 };
	int sndbuf = 4 << 20, status, r = 0;
	double t0, c0, recv_cpu = 0, gib = (double)count * BS_PAYLOAD / (1u << 30);
	pid_t pid = -1;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 || pipe(report) < 0 ||
	    pipe(pipefd) < 0) {
		r = -errno;
		goto out;
	}
	/* As the link's socket: a 4 MiB send buffer (nbd_socket_tune). */
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	if (fcntl(pipefd[1], F_SETPIPE_SZ, pipe_bytes) < 0) {	/* root may exceed pipe-max-size */
		r = -errno;
		goto out;
	}
	pid = fork();
	if (pid < 0) {
		r = -errno;
		goto out;
	}
	if (pid == 0) {
		close(sv[0]);
		close(report[0]);
		bs_receiver(sv[1], report[1]);
	}
	close(sv[1]);
	sv[1] = -1;
	close(report[1]);
	report[1] = -1;

	t0 = bs_clock(CLOCK_MONOTONIC);
	c0 = bs_clock(CLOCK_PROCESS_CPUTIME_ID);
	for (long i = 0; i < count && !r; i++) {
		const char *b = bufs[i % BS_NBUF];

		r = m == BS_COPY ? bs_send_copy(sv[0], b) : bs_send_splice(sv[0], pipefd, b);
	}
	shutdown(sv[0], SHUT_WR);
	if (read(report[0], &recv_cpu, sizeof(recv_cpu)) != (ssize_t)sizeof(recv_cpu) && !r)
		r = -EPIPE;
	if (waitpid(pid, &status, 0) == pid && (!WIFEXITED(status) || WEXITSTATUS(status)) && !r)
		r = -EIO;
	pid = -1;
	res->mb_s = (double)count * BS_PAYLOAD / 1e6 / (bs_clock(CLOCK_MONOTONIC) - t0);
	res->send_cpu = (bs_clock(CLOCK_PROCESS_CPUTIME_ID) - c0) / gib;
	res->recv_cpu = recv_cpu / gib;
out:
	if (pid > 0)
		waitpid(pid, &status, 0);
	for (int i = 0; i < 2; i++) {
		if (sv[i] >= 0)
			close(sv[i]);
		if (pipefd[i] >= 0)
			close(pipefd[i]);
		if (report[i] >= 0)
			close(report[i]);
	}
	return r;
}

static int bs_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double bs_median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), bs_cmp);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int main(int argc, char **argv)
{
	static struct bs_result res[BS_NMETHOD][BS_MAXROUND];
	char *bufs[BS_NBUF];
	long count = 4096;
	int rounds = 5, pipe_bytes = 1 << 20, opt;

	while ((opt = getopt(argc, argv, "n:r:p:")) != -1) {
		if (opt == 'n')
			count = atol(optarg);
		else if (opt == 'r')
			rounds = atoi(optarg);
		else if (opt == 'p')
			pipe_bytes = atoi(optarg);
		else
			goto usage;
	}
	if (count < 1 || rounds < 1 || rounds > BS_MAXROUND || pipe_bytes < 4096)
		goto usage;
	for (int i = 0; i < BS_NBUF; i++) {
		bufs[i] = aligned_alloc(4096, BS_PAYLOAD);
		if (!bufs[i]) {
			fprintf(stderr, "bench-send: out of memory\n");
			return 1;
		}
		memset(bufs[i], 'a' + i, BS_PAYLOAD);
	}
	printf("%ld payloads of 1 MiB per round, %d rounds, methods alternating, pipe %d bytes\n",
	       count, rounds, pipe_bytes);
	for (int k = 0; k < rounds; k++) {
		for (int m = 0; m < BS_NMETHOD; m++) {
			struct bs_result *x = &res[m][k];
			int r = bs_round((enum bs_method)m, count, pipe_bytes, bufs, x);

			if (r < 0) {
				fprintf(stderr, "bench-send: %s failed: %s\n", bs_name[m], strerror(-r));
				return 1;
			}
			printf("round %d  %-16s %8.0f MB/s  sender %.3f s/GiB  receiver %.3f s/GiB\n",
			       k + 1, bs_name[m], x->mb_s, x->send_cpu, x->recv_cpu);
		}
	}
	printf("\nmedians:\n");
	double base = 0;
	for (int m = 0; m < BS_NMETHOD; m++) {
		double v[3][BS_MAXROUND];

		for (int k = 0; k < rounds; k++) {
			v[0][k] = res[m][k].mb_s;
			v[1][k] = res[m][k].send_cpu;
			v[2][k] = res[m][k].recv_cpu;
		}
		double mb = bs_median(v[0], rounds), sc = bs_median(v[1], rounds);
		double rc = bs_median(v[2], rounds);

		if (m == BS_COPY)
			base = sc;
		printf("%-16s %8.0f MB/s  sender %.3f s/GiB (%.2fx of copy)  receiver %.3f s/GiB\n",
		       bs_name[m], mb, sc, sc / base, rc);
	}
	return 0;
usage:
	fprintf(stderr,
		"usage: bench-send [-n COUNT] [-r ROUNDS] [-p PIPE_BYTES]   (COUNT >= 1, 1 <= ROUNDS <= %d, PIPE_BYTES >= 4096)\n",
		BS_MAXROUND);
	return 2;
}
