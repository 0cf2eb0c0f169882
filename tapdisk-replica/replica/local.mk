# The replica filter driver: common part, modes, helpers.
libtdr_a_SOURCES += \
	include/tdr/replica.h \
	tapdisk-replica/replica/replica-int.h \
	tapdisk-replica/replica/replica.c \
	tapdisk-replica/replica/replica-util.c \
	tapdisk-replica/replica/replica-secondary.c
libtdr_a_SOURCES += tapdisk-replica/replica/replica-primary.c tapdisk-replica/replica/replica-link.c \
	tapdisk-replica/replica/replica-link.h tapdisk-replica/replica/replica-link-int.h \
	tapdisk-replica/replica/replica-link-native.c tapdisk-replica/replica/replica-link-libnbd.c
