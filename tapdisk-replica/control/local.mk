# The control socket (blktap3-compatible tapdisk control protocol plus the
# replica messages), its client helpers, and the `daemon` command.
libtdr_a_SOURCES += \
	include/tdr/ctl-message.h \
	include/tdr/ctl-server.h \
	tapdisk-replica/control/ctl-int.h \
	tapdisk-replica/control/ctl-message.c \
	tapdisk-replica/control/ctl-client.c \
	tapdisk-replica/control/ctl-server.c \
	tapdisk-replica/control/ctl-stats.c \
	tapdisk-replica/control/ctl-replica.c \
	tapdisk-replica/control/ctl-daemon.c
