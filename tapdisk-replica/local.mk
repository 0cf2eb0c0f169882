# The runtime: event loop, I/O backend, request/driver/image model, drivers.
libtdr_a_SOURCES += \
	tapdisk-replica/log.c \
	tapdisk-replica/loop.c \
	tapdisk-replica/io.c \
	tapdisk-replica/filelock.c \
	tapdisk-replica/readahead.c \
	tapdisk-replica/request.c \
	tapdisk-replica/disk.c \
	tapdisk-replica/spec.c \
	tapdisk-replica/driver-table.c \
	tapdisk-replica/drivers/drv-aio.c \
	include/tdr/log.h include/tdr/list.h include/tdr/loop.h \
	include/tdr/io.h include/tdr/image.h include/tdr/filelock.h \
	include/tdr/readahead.h

sbin_PROGRAMS += tapdisk-replica/tapdisk-replica
tapdisk_replica_tapdisk_replica_SOURCES = tapdisk-replica/main.c
tapdisk_replica_tapdisk_replica_LDADD = $(TDR_LIBS)
