#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# --read-only: the export says so, reads work, and every kind of write is
# refused with EPERM without touching the file.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io cmp
need_pynbd
tdr_setup

mkrandom "$T/disk.img" 8
cp "$T/disk.img" "$T/orig.img"
tdr_start --read-only "aio:$T/disk.img"

assert_eq "is_read_only" true "$(nbdinfo_field "$URI" is_read_only)"
assert_eq "export-size" 8388608 "$(nbdinfo_field "$URI" export-size)"

# Reads give the file's content.
nbdcopy "$URI" "$T/out.img" || fail "nbdcopy from a read-only export failed"
same_file "$T/orig.img" "$T/out.img"

# libnbd refuses writes to a read-only export on the client side unless
# strict mode is relaxed; relax it so the server sees the requests and must
# answer EPERM itself.
"$PY" - "$URI" "$T/orig.img" <<'PYEOF' || fail "the server did not refuse every write with EPERM"
import errno, sys
import nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only() == 1, "is_read_only() != 1"
bad = 0
def expect_eperm(what, fn):
    global bad
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != errno.EPERM:
            print(f"  {what}: expected EPERM, got {e.errno} ({e.string})", file=sys.stderr)
            bad += 1
        return
    print(f"  {what}: succeeded on a read-only export", file=sys.stderr)
    bad += 1
expect_eperm("pwrite", lambda: h.pwrite(b"\xff" * 4096, 0))
expect_eperm("pwrite FUA", lambda: h.pwrite(b"\xff" * 4096, 8192, nbd.CMD_FLAG_FUA))
expect_eperm("zero", lambda: h.zero(65536, 0))
expect_eperm("trim", lambda: h.trim(65536, 1 << 20))
# The connection is still good after the refusals.
if h.pread(4096, 0) != open(sys.argv[2], "rb").read(4096):
    print("  pread after the refusals returned wrong data", file=sys.stderr)
    bad += 1
h.flush()
h.shutdown()
sys.exit(1 if bad else 0)
PYEOF
qio_expect_fail "$URI" 'Operation not permitted|read-only|Permission denied' 'write -P 0xff 0 4k'
tdr_alive

tdr_stop || fail "daemon exited with status $? on SIGTERM"
same_file "$T/orig.img" "$T/disk.img"
pass
