# Benchmarks: never run by make check, but built by it so they keep compiling.
# Run them by hand; figures and commands live in docs/benchmarks.md.
check_PROGRAMS += tests/bench/bench-secondary tests/bench/bench-send tests/bench/bench-buffers
tests_bench_bench_secondary_LDADD = $(TDR_LIBS)
tests_bench_bench_buffers_LDADD = $(TDR_LIBS)
EXTRA_DIST += tests/bench/lib.sh tests/bench/nbd-export tests/bench/primary tests/bench/control tests/bench/vhd tests/bench/ext4-first-touch \
	tests/bench/vhd-open \
	tests/bench/vhd-first-touch-ab tests/bench/vhd-make-empty-ab \
	tests/bench/vhd-read-ab
