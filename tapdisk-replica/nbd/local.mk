# The NBD server (include/tdr/nbd.h) and the `serve` command.
libtdr_a_SOURCES += \
	tapdisk-replica/nbd/nbd-int.h \
	tapdisk-replica/nbd/nbd-proto.c \
	tapdisk-replica/nbd/nbd-transport.c \
	tapdisk-replica/nbd/nbd-tls.c \
	tapdisk-replica/nbd/nbd-conn.c \
	tapdisk-replica/nbd/nbd-handshake.c \
	tapdisk-replica/nbd/nbd-transmission.c \
	tapdisk-replica/nbd/nbd-server.c \
	include/tdr/nbd.h

# The serve command is part of the tapdisk-replica program (defined in
# tapdisk-replica/local.mk); a later `daemon` command reuses it.
tapdisk_replica_tapdisk_replica_SOURCES += \
	tapdisk-replica/serve.c \
	tapdisk-replica/serve.h
