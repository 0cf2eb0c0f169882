# Check unit tests.  Each subsystem adds its programs below.
UNIT_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
UNIT_LDADD = $(TDR_LIBS) $(CHECK_LIBS)
# Every main() ends in check_run().
EXTRA_DIST += tests/unit/check-run.h tests/unit/soak-model

# Runtime: event loop, I/O backend, request/driver model, raw driver.
check_PROGRAMS += tests/unit/test-loop tests/unit/test-io tests/unit/test-request \
	tests/unit/test-drv-aio tests/unit/test-readahead
TESTS += tests/unit/test-loop tests/unit/test-io tests/unit/test-request \
	tests/unit/test-drv-aio tests/unit/test-readahead
tests_unit_test_loop_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_loop_LDADD = $(UNIT_LDADD)
tests_unit_test_io_SOURCES = tests/unit/test-io.c tests/unit/powercut.c tests/unit/powercut.h
tests_unit_test_io_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_io_LDADD = $(UNIT_LDADD)
tests_unit_test_request_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_request_LDADD = $(UNIT_LDADD)
tests_unit_test_drv_aio_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_drv_aio_LDADD = $(UNIT_LDADD)
tests_unit_test_readahead_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_readahead_LDADD = $(UNIT_LDADD)

# NBD server: pure protocol helpers, and a server driven over a socketpair.
check_PROGRAMS += tests/unit/test-nbd-proto tests/unit/test-nbd
TESTS += tests/unit/test-nbd-proto tests/unit/test-nbd
tests_unit_test_nbd_proto_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
tests_unit_test_nbd_proto_LDADD = $(TDR_LIBS) $(CHECK_LIBS)
tests_unit_test_nbd_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
tests_unit_test_nbd_LDADD = $(TDR_LIBS) $(CHECK_LIBS)

# VHD library and driver.
check_PROGRAMS += tests/unit/test-vhd tests/unit/test-vhd-driver
TESTS += tests/unit/test-vhd tests/unit/test-vhd-driver
tests_unit_test_vhd_SOURCES = tests/unit/test-vhd.c tests/unit/powercut.c tests/unit/powercut.h
tests_unit_test_vhd_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
tests_unit_test_vhd_LDADD = $(TDR_LIBS) $(CHECK_LIBS)
tests_unit_test_vhd_driver_SOURCES = tests/unit/test-vhd-driver.c tests/unit/powercut.c \
	tests/unit/powercut.h
tests_unit_test_vhd_driver_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
tests_unit_test_vhd_driver_LDADD = $(TDR_LIBS) $(CHECK_LIBS)

# The replica driver in secondary mode.
check_PROGRAMS += tests/unit/test-replica-secondary
TESTS += tests/unit/test-replica-secondary
tests_unit_test_replica_secondary_SOURCES = tests/unit/test-replica-secondary.c \
	tests/unit/powercut.c tests/unit/powercut.h
tests_unit_test_replica_secondary_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_replica_secondary_LDADD = $(UNIT_LDADD)

# The replica driver's range lock, against a brute-force model.
check_PROGRAMS += tests/unit/test-replica-util
TESTS += tests/unit/test-replica-util
tests_unit_test_replica_util_CFLAGS = $(UNIT_CFLAGS) -I$(top_srcdir)/tapdisk-replica/replica
tests_unit_test_replica_util_LDADD = $(UNIT_LDADD)

# Control socket: message layout, server over socketpairs and a socket path.
check_PROGRAMS += tests/unit/test-ctl
TESTS += tests/unit/test-ctl
tests_unit_test_ctl_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_ctl_LDADD = $(UNIT_LDADD)

# Replica primary: forwarding, broken links, resync against real and fake peers.
check_PROGRAMS += tests/unit/test-primary
TESTS += tests/unit/test-primary
tests_unit_test_primary_SOURCES = tests/unit/test-primary.c tests/unit/test-primary-peer.c \
	tests/unit/test-primary-peer.h
tests_unit_test_primary_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_primary_LDADD = $(UNIT_LDADD) -lpthread
# The same tests on the link's libnbd client (client=libnbd).
TESTS += tests/unit/test-primary-libnbd.sh
EXTRA_DIST += tests/unit/test-primary-libnbd.sh

# xenstore control protocol, against an in-memory xenstored.
if HAVE_XENSTORE
check_PROGRAMS += tests/unit/test-xs
TESTS += tests/unit/test-xs
tests_unit_test_xs_SOURCES = tests/unit/test-xs.c tests/unit/fake-xenstored.c \
	tests/unit/fake-xenstored.h
tests_unit_test_xs_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_xs_LDADD = $(UNIT_LDADD)
endif
if HAVE_XENSTORE
check_PROGRAMS += tests/unit/fake-xenstored
tests_unit_fake_xenstored_SOURCES = tests/unit/fake-xenstored-main.c tests/unit/fake-xenstored.c
tests_unit_fake_xenstored_CFLAGS = $(UNIT_CFLAGS)
tests_unit_fake_xenstored_LDADD = $(UNIT_LDADD)
endif
