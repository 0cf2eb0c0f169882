/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * tapdisk-replica: the command-line front end.
 *
 *     tapdisk-replica serve [options] SPEC
 *
 * Every failure ends with exactly one line on stderr,
 * "tapdisk-replica: <problem>; <what to do>", and exit status 2 for usage
 * errors or 1 for runtime failures.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve.h"
#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/readahead.h"
#ifdef HAVE_XENSTORE
#include "tdr/xenstore.h"
#endif

#define PROG "tapdisk-replica"

enum { EXIT_USAGE = 2, EXIT_RUNTIME = 1 };

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " serve [OPTIONS] SPEC\n"
		"       " PROG " daemon [--control PATH] [--nbd-dir DIR]   (see daemon --help)\n"
		"       " PROG " --help | --version\n"
		"\n"
		"Serves the disk image SPEC (e.g. aio:/srv/disk.img) over NBD until\n"
		"SIGTERM or SIGINT, then drains requests in flight, flushes and exits 0.\n"
		"\n"
		"Options of serve (at least one of --socket and --tcp):\n"
		"  -s, --socket PATH        listen on a UNIX socket (mode 0600)\n"
		"  -t, --tcp HOST:PORT      listen on TCP; HOST may be omitted (\":PORT\"\n"
		"                           or \"PORT\") for loopback; [V6ADDR]:PORT for IPv6\n"
		"  -e, --export-name NAME   export name (default \"\"; clients asking for\n"
		"                           \"\" get this export whatever its name)\n"
		"  -r, --read-only          serve read-only\n"
		"      --readahead SIZE     read-ahead for sequential reads of raw images\n"
		"                           (aio), in whole MiB: 8M (default), 32M, 0 (off);\n"
		"                           a bare number is KiB, as in read_ahead_kb\n"
		"      --poll-max-us N      before sleeping, look for requests and completions\n"
		"                           for up to N microseconds (adaptive; 0, the default:\n"
		"                           never); costs CPU time while busy, lowers latency\n"
		"      --tls MODE           off (default), on (offered) or require\n"
		"      --tls-psk FILE       TLS with a pre-shared key file (psktool -u NAME -p FILE)\n"
		"      --tls-certificates DIR\n"
		"                           TLS with X.509: DIR/server-cert.pem, server-key.pem\n"
		"                           and ca-cert.pem\n"
		"      --tls-verify-peer    X.509: clients need a certificate from that CA\n"
		"      --handshake-timeout SECONDS\n"
		"                           close a connection not past its handshake (options,\n"
		"                           TLS) after SECONDS (default 30; 0: never)\n"
		"  -l, --log-level LEVEL    err, warn, info (default) or debug\n"
		"      --syslog             log to syslog instead of stderr\n"
		"  -p, --pid-file PATH      write the process id to PATH once ready\n"
		"  -c, --control PATH       control socket for tap-ctl / tdr-ctl (disk = minor 0);\n"
		"                           a directory gets ctlPID in it, e.g. /var/run/blktap-control\n"
		"      --xs-dir PATH        xenstore control directory (docs/xenstore.md)\n"
		"      --xs-domid N --xs-devid N\n"
		"                           the same, derived from the guest's domain and device\n"
		"                           ids: /local/domain/0/backend/tapdisk-replica/N/N\n"
		"      --xs-path PATH       xenstored's socket or device (default: as libxenstore)\n"
		"  -h, --help               show this help\n"
		"\n"
		"When ready it logs \"" PROG ": serving SPEC (N bytes) on unix:PATH tcp:HOST:PORT\".\n"
		"Requests must be aligned to 512 bytes (the advertised minimum block size).\n");
}

static int usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, PROG ": ");
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	return EXIT_USAGE;
}

/* A decimal number from 0 to max, digits only: 0, or -1. */
static int parse_decimal(const char *s, unsigned long max, unsigned long *out)
{
	char *end;

	errno = 0;
	*out = strtoul(s, &end, 10);
	return *s >= '0' && *s <= '9' && !*end && !errno && *out <= max ? 0 : -1;
}

static int cmd_serve(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "tcp", required_argument, NULL, 't' },
		{ "export-name", required_argument, NULL, 'e' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "readahead", required_argument, NULL, 'A' },
		{ "poll-max-us", required_argument, NULL, 'O' },
		{ "tls", required_argument, NULL, 'T' },
		{ "tls-psk", required_argument, NULL, 'K' },
		{ "tls-certificates", required_argument, NULL, 'C' },
		{ "tls-verify-peer", no_argument, NULL, 'Y' },
		{ "handshake-timeout", required_argument, NULL, 'H' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "syslog", no_argument, NULL, 'S' },
		{ "pid-file", required_argument, NULL, 'p' },
		{ "control", required_argument, NULL, 'c' },
		{ "xs-dir", required_argument, NULL, 'X' },
		{ "xs-domid", required_argument, NULL, 'D' },
		{ "xs-devid", required_argument, NULL, 'V' },
		{ "xs-path", required_argument, NULL, 'P' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct tdr_serve_opts o = { .export_name = "" };
	enum tdr_log_level level = TDR_LOG_INFO;
	bool use_syslog = false;
	char host[256], port[8];
	char xs_dir[128];
	long xs_domid = -1, xs_devid = -1;
	int c, ret;

	/* We print our own one-line errors. */
	opterr = 0;
	optind = 1;
	while ((c = getopt_long(argc, argv, ":s:t:e:rl:p:c:h", longopts, NULL)) != -1) {
		switch (c) {
		case 's':
			o.socket_path = optarg;
			break;
		case 't':
			o.tcp = optarg;
			break;
		case 'e':
			o.export_name = optarg;
			break;
		case 'r':
			o.readonly = true;
			break;
		case 'A': {
			size_t window;

			if (tdr_ra_parse_window(optarg, &window) < 0)
				return usage_error(TDR_RA_WINDOW_ERROR, optarg);
			td_set_readahead(window);
			break;
		}
		case 'O':
			if (tdr_loop_parse_poll_us(optarg, &o.poll_max_ns) < 0)
				return usage_error(TDR_LOOP_POLL_ERROR, optarg);
			break;
		case 'T':
			if (nbd_tls_parse_mode(optarg, &o.tls.mode) < 0)
				return usage_error("bad --tls '%s'; use off, on or require", optarg);
			break;
		case 'K':
			o.tls.psk_file = optarg;
			break;
		case 'C':
			o.tls.certificates = optarg;
			break;
		case 'Y':
			o.tls.verify_peer = true;
			break;
		case 'H': {
			unsigned long v;

			if (parse_decimal(optarg, 86400, &v) < 0)
				return usage_error("bad --handshake-timeout '%s'; use seconds from 0 (no limit) to 86400",
						   optarg);
			nbd_set_handshake_timeout((unsigned)v);
			break;
		}
		case 'l':
			if (tdr_log_parse_level(optarg, &level) < 0)
				return usage_error("bad --log-level '%s'; use err, warn, info or debug",
						   optarg);
			break;
		case 'S':
			use_syslog = true;
			break;
		case 'p':
			o.pid_file = optarg;
			break;
		case 'c':
			if (!*optarg)
				return usage_error("%s--control needs a path; e.g. --control /var/run/blktap-control", "");
			o.control_path = optarg;
			break;
		case 'X':
			o.xs_dir = optarg;
			break;
		case 'D':
		case 'V': {
			unsigned long v;

			if (parse_decimal(optarg, 65535, &v) < 0)
				return usage_error(c == 'D' ? "bad --xs-domid '%s'; use a domain id from 0 to 65535"
							    : "bad --xs-devid '%s'; use a device id from 0 to 65535",
						   optarg);
			*(c == 'D' ? &xs_domid : &xs_devid) = (long)v;
			break;
		}
		case 'P':
			o.xs_path = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case ':':
			return usage_error("option %s needs an argument; see " PROG " --help",
					   argv[optind - 1]);
		default:
			return usage_error("unknown option '%s'; see " PROG " --help",
					   argv[optind - 1]);
		}
	}
	if ((xs_domid >= 0) != (xs_devid >= 0))
		return usage_error("%s--xs-domid and --xs-devid go together; give both (or --xs-dir PATH)", "");
	if (xs_domid >= 0 && o.xs_dir)
		return usage_error("%sgive either --xs-dir or --xs-domid/--xs-devid, not both", "");
	if (xs_domid >= 0) {
		snprintf(xs_dir, sizeof(xs_dir), "/local/domain/0/backend/tapdisk-replica/%ld/%ld",
			 xs_domid, xs_devid);
		o.xs_dir = xs_dir;
	}
#ifdef HAVE_XENSTORE
	/* A bad value is a usage error (2), like every other option's. */
	if (o.xs_dir && tdr_xs_check_dir(o.xs_dir) < 0)
		return usage_error("%s", tdr_last_error());
#endif
	if (optind >= argc)
		return usage_error("%sserve needs an image SPEC (e.g. aio:/srv/disk.img); see " PROG
				   " --help", "");
	if (optind + 1 < argc)
		return usage_error("unexpected argument '%s' (serve takes one SPEC); see " PROG
				   " --help", argv[optind + 1]);
	o.spec = argv[optind];
	if (!o.socket_path && !o.tcp)
		return usage_error("%sserve needs somewhere to listen; add --socket PATH or --tcp HOST:PORT",
				   "");
	if (o.socket_path && !*o.socket_path)
		return usage_error("%s--socket needs a path; e.g. --socket /run/tapdisk-replica.sock", "");
	if (o.tls.mode == NBD_TLS_OFF && (o.tls.psk_file || o.tls.certificates || o.tls.verify_peer))
		return usage_error("%s--tls-psk, --tls-certificates and --tls-verify-peer need --tls on or --tls require; add --tls require",
				   "");
	if (o.tls.mode != NBD_TLS_OFF && !o.tls.psk_file == !o.tls.certificates)
		return usage_error("%s--tls needs --tls-psk FILE or --tls-certificates DIR, one of the two",
				   "");
	if (o.tls.verify_peer && !o.tls.certificates)
		return usage_error("%s--tls-verify-peer checks X.509 client certificates; add --tls-certificates DIR",
				   "");
	if (o.tcp && tdr_parse_hostport(o.tcp, host, sizeof(host), port, sizeof(port)) < 0)
		return usage_error("%s", tdr_last_error());

	tdr_log_init(PROG, use_syslog, level);
	ret = tdr_serve(&o);
	if (ret < 0) {
		/* Always stderr, even with --syslog: whoever started us must see
		 * why we did not start. */
		fprintf(stderr, PROG ": %s\n", *tdr_last_error() ? tdr_last_error() : strerror(-ret));
		return EXIT_RUNTIME;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : NULL;

	if (!cmd)
		return usage_error("%sno command given; run " PROG " --help", "");
	if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
		printf(PROG " %s\n", PACKAGE_VERSION);
		return 0;
	}
	if (!strcmp(cmd, "serve"))
		return cmd_serve(argc - 1, argv + 1);
	if (!strcmp(cmd, "daemon"))
		return tdr_daemon_main(argc - 1, argv + 1, PROG);
	return usage_error("unknown command '%s'; run " PROG " --help", cmd);
}
