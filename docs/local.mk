# (filled in by the subsystem)
EXTRA_DIST += docs/architecture.md docs/replica.md docs/vhd.md docs/xenstore.md docs/benchmarks.md

# The tapdisk-replica program (serve command).
dist_man_MANS += docs/man/tapdisk-replica.8

# vhd-util(8)
dist_man_MANS += docs/man/vhd-util.8

# tdr-ctl(8): the control socket CLI.
dist_man_MANS += docs/man/tdr-ctl.8
