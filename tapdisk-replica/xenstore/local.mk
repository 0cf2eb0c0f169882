# The xenstore control interface (docs/xenstore.md).  It speaks the xenstore
# wire protocol itself (xs-conn.c) and only needs libxen-dev's headers.
if HAVE_XENSTORE
libtdr_a_SOURCES += \
	include/tdr/xenstore.h \
	tapdisk-replica/xenstore/xs-conn.h \
	tapdisk-replica/xenstore/xs-conn.c \
	tapdisk-replica/xenstore/xs-ctl.c \
	tapdisk-replica/xenstore/xs-replica.c
endif
