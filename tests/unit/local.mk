# Check unit tests.  Each subsystem adds its programs below.
UNIT_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
UNIT_LDADD = $(TDR_LIBS) $(CHECK_LIBS)

# Runtime: event loop, I/O backend, request/driver model, raw driver.
check_PROGRAMS += tests/unit/test-loop tests/unit/test-io tests/unit/test-request \
	tests/unit/test-drv-aio
TESTS += tests/unit/test-loop tests/unit/test-io tests/unit/test-request \
	tests/unit/test-drv-aio
tests_unit_test_loop_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_loop_LDADD = $(UNIT_LDADD)
tests_unit_test_io_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_io_LDADD = $(UNIT_LDADD)
tests_unit_test_request_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_request_LDADD = $(UNIT_LDADD)
tests_unit_test_drv_aio_CFLAGS = $(UNIT_CFLAGS)
tests_unit_test_drv_aio_LDADD = $(UNIT_LDADD)
