# (filled in by the subsystem)

# vhd-util: create, query, check and maintain VHD files.
sbin_PROGRAMS += tools/vhd-util
tools_vhd_util_SOURCES = tools/vhd-util.c
tools_vhd_util_LDADD = $(TDR_LIBS)

# tdr-ctl: the control socket's command-line tool (tap-ctl's commands + replica).
sbin_PROGRAMS += tools/tdr-ctl
tools_tdr_ctl_SOURCES = tools/tdr-ctl.c
tools_tdr_ctl_LDADD = $(TDR_LIBS)
