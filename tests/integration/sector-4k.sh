#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Storage with 4 KiB logical sectors (a loop device with --sector-size
# 4096): direct I/O there refuses 512-byte requests, which NBD clients are
# allowed to send (the server's minimum block size is 512).  The daemon
# notices at open and serves such a device with buffered I/O: 512-byte
# reads and writes at 512-byte offsets work and land byte-exact (they
# once failed with EINVAL).  Needs root and a free loop device.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd losetup cmp
need_pynbd
[ "$(id -u)" -eq 0 ] || skip "needs root for a loop device"
tdr_setup

head -c 16M /dev/urandom >"$T/backing.img"
cp "$T/backing.img" "$T/want.img"
LOOP=$(losetup -f --show --sector-size 4096 "$T/backing.img" 2>"$T/losetup.err") ||
	skip "no loop device with 4 KiB sectors here: $(cat "$T/losetup.err")"
# The daemons first: a device still open is only detached at its last close.
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup_loop() {
	local rc=$? pid
	set +e
	for pid in "${TDR_PIDS[@]}"; do
		kill -KILL "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	done
	losetup -d "$LOOP" 2>/dev/null
	(exit "$rc")
	_tdr_cleanup
}
trap cleanup_loop EXIT
assert_eq "logical sector size of $LOOP" 4096 "$(blockdev --getss "$LOOP")"

tdr_start "aio:$LOOP"
grep -q "needs more than 512-byte alignment" "$DAEMON_ERR" ||
	fail "no word of the fallback: $(cat "$DAEMON_ERR")"
out=$("$PY" - "$URI" "$T/want.img" <<'PYEOF' 2>&1
import os, sys, nbd
uri, want = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
with open(want, 'r+b') as f:
    for off, n in ((512, 512), (0, 512), (4096 + 1024, 1024), (8191 * 512, 512)):
        got = h.pread(n, off)
        f.seek(off)
        if got != f.read(n):
            print('read of %d at %d differs' % (n, off))
            sys.exit(1)
    for i, (off, n) in enumerate(((512, 512), (3 * 512, 1024), (1 << 20, 512))):
        data = bytes([0x41 + i]) * n
        h.pwrite(data, off)
        f.seek(off)
        f.write(data)
h.flush()
h.shutdown()
print('ok')
PYEOF
) || fail "512-byte I/O on 4 KiB sectors: $out"
assert_eq "512-byte I/O" ok "$out"
tdr_stop "$DAEMON_PID" || fail "daemon exited with status $? on SIGTERM"
losetup -d "$LOOP"
cmp "$T/backing.img" "$T/want.img" || fail "the device holds other bytes than written"
pass "4 KiB logical sectors: 512-byte reads and writes served, byte-exact"
