# (filled in by the subsystem)

# libFuzzer harnesses (clang).  tests/fuzz/run-fuzz.sh builds and runs them
# without configure (CI: 60 s each); --enable-fuzzing builds them here too.
#   fuzz-vhd         parse, validate and read a VHD given as bytes
#   fuzz-vhd-driver  the VHD driver on such a file, checked against the library
#   fuzz-nbd-server  the NBD server fed a client's byte stream
#   fuzz-nbd-link    the primary's NBD client fed a server's byte stream
#   fuzz-xs-conn     the xenstore client fed xenstored's byte stream
#   fuzz-ctl-server  the control server fed a tap-ctl client's byte stream
#   fuzz-parsers     request lines, spec entries and option values, each against an oracle
# tests/fuzz/make-corpus.py writes the protocol seed corpora.
EXTRA_DIST += tests/fuzz/run-fuzz.sh tests/fuzz/fuzz-vhd.c \
	tests/fuzz/corpus-vhd/dyn-empty.vhd tests/fuzz/corpus-vhd/dyn-4k.vhd \
	tests/fuzz/corpus-vhd/diff-4k.vhd tests/fuzz/corpus-vhd/fixed-64k.vhd \
	tests/fuzz/corpus-vhd/qemu-dyn.vhd tests/fuzz/corpus-vhd/qemu-fixed.vhd \
	tests/fuzz/corpus-vhd/regress-batmap-past-eof.vhd \
	tests/fuzz/fuzz-vhd-driver.c \
	tests/fuzz/fuzz-nbd-server.c tests/fuzz/fuzz-nbd-link.c tests/fuzz/fuzz-xs-conn.c \
	tests/fuzz/fuzz-peer.c tests/fuzz/fuzz-peer.h tests/fuzz/fuzz-table.c \
	tests/fuzz/fuzz-table.h tests/fuzz/fuzz-mem.c tests/fuzz/fuzz-mem.h \
	tests/fuzz/fuzz-ctl-server.c tests/fuzz/make-corpus.py \
	tests/fuzz/corpus-nbd/bad-magic tests/fuzz/corpus-nbd/bad-requests \
	tests/fuzz/corpus-nbd/export-name-ro tests/fuzz/corpus-nbd/go-simple \
	tests/fuzz/corpus-nbd/go-structured tests/fuzz/corpus-nbd/options \
	tests/fuzz/corpus-nbd/pipelined \
	tests/fuzz/corpus-link/bad-cookie tests/fuzz/corpus-link/errors \
	tests/fuzz/corpus-link/export-name tests/fuzz/corpus-link/export-name-zeroes \
	tests/fuzz/corpus-link/ok tests/fuzz/corpus-link/read-only \
	tests/fuzz/corpus-link/small-payload tests/fuzz/corpus-link/structured \
	tests/fuzz/corpus-link/unknown-export tests/fuzz/corpus-link/wrong-size \
	tests/fuzz/corpus-xs/errors tests/fuzz/corpus-xs/event-first \
	tests/fuzz/corpus-xs/oversized tests/fuzz/corpus-xs/partial \
	tests/fuzz/corpus-xs/replies tests/fuzz/corpus-xs/replies-and-events \
	tests/fuzz/corpus-xs/unknown-id \
	tests/fuzz/corpus-ctl/attach-open-close tests/fuzz/corpus-ctl/close-paused \
	tests/fuzz/corpus-ctl/cut tests/fuzz/corpus-ctl/pause-resume \
	tests/fuzz/corpus-ctl/queries tests/fuzz/corpus-ctl/refusals \
	tests/fuzz/corpus-ctl/replica tests/fuzz/corpus-ctl/trailer \
	tests/fuzz/fuzz-parsers.c \
	tests/fuzz/corpus-parsers/log-level tests/fuzz/corpus-parsers/readahead \
	tests/fuzz/corpus-parsers/request-bad tests/fuzz/corpus-parsers/request-resync \
	tests/fuzz/corpus-parsers/request-secondary tests/fuzz/corpus-parsers/request-start \
	tests/fuzz/corpus-parsers/request-stop tests/fuzz/corpus-parsers/spec-bare \
	tests/fuzz/corpus-parsers/spec-primary tests/fuzz/corpus-parsers/spec-secondary \
	tests/fuzz/corpus-parsers/tcp-port tests/fuzz/corpus-parsers/tcp-v4 \
	tests/fuzz/corpus-parsers/tcp-v6
if ENABLE_FUZZING
check_PROGRAMS += tests/fuzz/fuzz-vhd tests/fuzz/fuzz-vhd-driver tests/fuzz/fuzz-nbd-server \
	tests/fuzz/fuzz-nbd-link tests/fuzz/fuzz-ctl-server tests/fuzz/fuzz-parsers
tests_fuzz_fuzz_vhd_SOURCES = tests/fuzz/fuzz-vhd.c \
	tapdisk-replica/vhd/vhd-format.c tapdisk-replica/vhd/vhd-validate.c \
	tapdisk-replica/vhd/vhd-file.c tapdisk-replica/vhd/vhd-ops.c \
	tapdisk-replica/filelock.c
tests_fuzz_fuzz_vhd_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_LDADD = $(UUID_LIBS)
# fuzz-table.c replaces the driver table ("vhd" only): no libtdr.a.
tests_fuzz_fuzz_vhd_driver_SOURCES = tests/fuzz/fuzz-vhd-driver.c tests/fuzz/fuzz-table.c \
	tapdisk-replica/drivers/drv-vhd.c tapdisk-replica/vhd/vhd-format.c \
	tapdisk-replica/vhd/vhd-validate.c tapdisk-replica/vhd/vhd-file.c \
	tapdisk-replica/vhd/vhd-ops.c tapdisk-replica/loop.c tapdisk-replica/io.c \
	tapdisk-replica/log.c tapdisk-replica/request.c tapdisk-replica/disk.c \
	tapdisk-replica/spec.c tapdisk-replica/filelock.c
tests_fuzz_fuzz_vhd_driver_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_driver_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_driver_LDADD = $(LIBAIO) $(UUID_LIBS)
# Its own in-memory driver, alone in fuzz-table.c's table: no libtdr.a.
tests_fuzz_fuzz_nbd_server_SOURCES = tests/fuzz/fuzz-nbd-server.c tests/fuzz/fuzz-peer.c \
	tests/fuzz/fuzz-table.c tests/fuzz/fuzz-mem.c \
	tapdisk-replica/nbd/nbd-conn.c tapdisk-replica/nbd/nbd-handshake.c \
	tapdisk-replica/nbd/nbd-proto.c tapdisk-replica/nbd/nbd-server.c \
	tapdisk-replica/nbd/nbd-transmission.c tapdisk-replica/nbd/nbd-transport.c \
	tapdisk-replica/loop.c tapdisk-replica/io.c tapdisk-replica/log.c \
	tapdisk-replica/request.c tapdisk-replica/disk.c tapdisk-replica/spec.c \
	tapdisk-replica/filelock.c
tests_fuzz_fuzz_nbd_server_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_nbd_server_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_nbd_server_LDADD = $(LIBAIO)
# The daemon's library (real driver table) plus fuzz-mem.c's "mem" driver.
tests_fuzz_fuzz_ctl_server_SOURCES = tests/fuzz/fuzz-ctl-server.c tests/fuzz/fuzz-peer.c \
	tests/fuzz/fuzz-mem.c
tests_fuzz_fuzz_ctl_server_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_ctl_server_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_ctl_server_LDADD = $(TDR_LIBS)
# The daemon's library: the parsers and what they link against.
tests_fuzz_fuzz_parsers_SOURCES = tests/fuzz/fuzz-parsers.c
tests_fuzz_fuzz_parsers_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_parsers_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_parsers_LDADD = $(TDR_LIBS)
tests_fuzz_fuzz_nbd_link_SOURCES = tests/fuzz/fuzz-nbd-link.c tests/fuzz/fuzz-peer.c \
	tapdisk-replica/replica/replica-link.c tapdisk-replica/replica/replica-link-native.c \
	tapdisk-replica/replica/replica-link-libnbd.c \
	tapdisk-replica/loop.c tapdisk-replica/log.c \
	tapdisk-replica/nbd/nbd-proto.c tapdisk-replica/nbd/nbd-transport.c
tests_fuzz_fuzz_nbd_link_CFLAGS = $(AM_CFLAGS) $(LIBNBD_CFLAGS) -I$(srcdir)/tapdisk-replica/replica -fsanitize=fuzzer
tests_fuzz_fuzz_nbd_link_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_nbd_link_LDADD = $(LIBNBD_LIBS)
if HAVE_XENSTORE
check_PROGRAMS += tests/fuzz/fuzz-xs-conn
tests_fuzz_fuzz_xs_conn_SOURCES = tests/fuzz/fuzz-xs-conn.c tests/fuzz/fuzz-peer.c \
	tapdisk-replica/xenstore/xs-conn.c tapdisk-replica/loop.c tapdisk-replica/log.c
tests_fuzz_fuzz_xs_conn_CFLAGS = $(AM_CFLAGS) -I$(srcdir)/tapdisk-replica/xenstore -fsanitize=fuzzer
tests_fuzz_fuzz_xs_conn_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
endif
endif
