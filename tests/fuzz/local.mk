# (filled in by the subsystem)

# VHD: parse, validate and read a VHD given as bytes (libFuzzer, clang).
# tests/fuzz/run-fuzz.sh builds and runs it without configure (CI: 60 s).
EXTRA_DIST += tests/fuzz/run-fuzz.sh tests/fuzz/fuzz-vhd.c \
	tests/fuzz/corpus-vhd/dyn-empty.vhd tests/fuzz/corpus-vhd/dyn-4k.vhd \
	tests/fuzz/corpus-vhd/diff-4k.vhd tests/fuzz/corpus-vhd/fixed-64k.vhd \
	tests/fuzz/corpus-vhd/qemu-dyn.vhd tests/fuzz/corpus-vhd/qemu-fixed.vhd
if ENABLE_FUZZING
check_PROGRAMS += tests/fuzz/fuzz-vhd
tests_fuzz_fuzz_vhd_SOURCES = tests/fuzz/fuzz-vhd.c \
	tapdisk-replica/vhd/vhd-format.c tapdisk-replica/vhd/vhd-validate.c \
	tapdisk-replica/vhd/vhd-file.c tapdisk-replica/vhd/vhd-ops.c \
	tapdisk-replica/filelock.c
tests_fuzz_fuzz_vhd_CFLAGS = $(AM_CFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_LDFLAGS = $(AM_LDFLAGS) -fsanitize=fuzzer
tests_fuzz_fuzz_vhd_LDADD = $(UUID_LIBS)
endif
