# The VHD library and the "vhd" driver.
libtdr_a_SOURCES += \
	include/tdr/vhd.h \
	tapdisk-replica/vhd/vhd-format.c \
	tapdisk-replica/vhd/vhd-validate.c \
	tapdisk-replica/vhd/vhd-file.c \
	tapdisk-replica/vhd/vhd-ops.c \
	tapdisk-replica/drivers/drv-vhd.c
