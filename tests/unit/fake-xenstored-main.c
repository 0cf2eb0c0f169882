/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * fake-xenstored SOCKET: the unit tests' in-memory xenstored as a program,
 * so that shell tests can run the daemon and libxenstore clients
 * (XENSTORED_PATH=SOCKET xenstore-write ...) on a machine without Xen.
 * Runs until SIGTERM or SIGINT.  SIGUSR1 forgets every node (a restart
 * with lost state, without closing the socket).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "fake-xenstored.h"
#include "tdr/loop.h"

struct sigctx {
	struct fake_xs *f;
	struct tdr_loop *loop;
	int fd;
};

static void on_sig(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct sigctx *s = arg;
	struct signalfd_siginfo si;

	(void)w;
	(void)events;
	while (read(s->fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGUSR1) {
			fake_xs_stop(s->f, true);
			fake_xs_start(s->f);
		} else {
			tdr_loop_stop(s->loop);
		}
	}
}

int main(int argc, char **argv)
{
	struct sigctx s;
	struct tdr_fd_watch w;
	sigset_t set;

	if (argc != 2) {
		fprintf(stderr, "usage: fake-xenstored SOCKET\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	s.loop = tdr_loop_new();
	s.fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (!s.loop || s.fd < 0) {
		perror("fake-xenstored");
		return 1;
	}
	s.f = fake_xs_new(s.loop, argv[1]);
	if (!s.f) {
		perror(argv[1]);
		return 1;
	}
	tdr_loop_watch_fd(s.loop, &w, s.fd, EPOLLIN, on_sig, &s);
	tdr_loop_run(s.loop);
	tdr_loop_unwatch_fd(&w);
	fake_xs_free(s.f);
	close(s.fd);
	tdr_loop_free(s.loop);
	return 0;
}
