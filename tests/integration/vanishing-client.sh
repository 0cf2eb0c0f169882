#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# Clients that vanish in the middle of things (during the handshake, in a
# request header, in the payload of a large WRITE, with many READ replies
# still to send) do not disturb the daemon or another client that keeps
# writing and verifying data meanwhile.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io nbdinfo cmp truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

M=$((1024 * 1024))
mkraw "$T/disk.img" 64M
tdr_start "aio:$T/disk.img"

# The well-behaved client: 16 rounds of write + read-back on [32M,48M).
worker() {
	local r pat
	for ((r = 0; r < 16; r++)); do
		pat=$(printf '0x%02x' $((0x40 + r)))
		qemu-io -f raw "$URI" -c "write -P $pat 32M 16M" -c "read -P $pat 32M 16M" \
			>"$T/worker.out" 2>&1 || return 1
		if grep -qiE 'verification failed|failed|error' "$T/worker.out"; then
			return 1
		fi
	done
}
worker &
wpid=$!

cat >"$T/vanish.py" <<'PYEOF'
import os, socket, struct, sys, time
from nbdwire import NBDMAGIC, IHAVEOPT, REQ_MAGIC, recv_exact

sock_path, mode = sys.argv[1], sys.argv[2]

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
if mode == "handshake":
    s.recv(4)          # half of the greeting, then gone
    s.close(); sys.exit(0)
hello = recv_exact(s, 18)
assert hello[:16] == NBDMAGIC + IHAVEOPT, hello
sflags = struct.unpack(">H", hello[16:])[0]
cflags = 1 | (2 if sflags & 2 else 0)          # FIXED_NEWSTYLE [| NO_ZEROES]
s.sendall(struct.pack(">I", cflags))
if mode == "option":
    s.sendall(IHAVEOPT + struct.pack(">II", 1, 100) + b"x" * 10)   # short EXPORT_NAME
    s.close(); sys.exit(0)
s.sendall(IHAVEOPT + struct.pack(">II", 1, 0))                     # EXPORT_NAME ""
size, tflags = struct.unpack(">QH", recv_exact(s, 10))
if not cflags & 2:
    recv_exact(s, 124)

def req(typ, handle, off, length):
    return struct.pack(">IHHQQI", REQ_MAGIC, 0, typ, handle, off, length)

if mode == "header":
    s.sendall(req(1, 1, 0, 65536)[:13])
elif mode == "payload":
    # A 4 MiB WRITE at [8M,12M) with only 1.5 MiB of its payload.
    s.sendall(req(1, 2, 8 << 20, 4 << 20))
    s.sendall(b"\xee" * (1536 << 10))
    time.sleep(0.05)
elif mode == "reads":
    # 64 x 1 MiB READs, never read the replies, close with them queued.
    s.sendall(b"".join(req(0, 100 + i, (i % 32) << 20, 1 << 20) for i in range(64)))
    time.sleep(0.05)
elif mode == "reset":
    # Abortive close (RST) with a WRITE half sent.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(req(1, 3, 16 << 20, 1 << 20) + b"\xdd" * 1000)
s.close()
PYEOF

for ((i = 0; i < 8; i++)); do
	for mode in handshake option header payload reads reset; do
		PYTHONPATH=$TESTDIR "$PY" "$T/vanish.py" "$SOCK" "$mode" ||
			fail "vanishing client ($mode) could not even connect / handshake"
		tdr_alive
	done
done

wait "$wpid" || { cat "$T/worker.out" >&2; fail "the well-behaved client failed while others vanished"; }
tdr_alive

# The daemon still serves new clients normally.
assert_eq "export-size after vanishing clients" $((64 * M)) "$(nbdinfo --size "$URI")"
qio "$URI" 'write -P 0x99 0 1M' 'read -P 0x99 0 1M' 'read -P 0x4f 32M 16M'

tdr_stop || fail "daemon exited with status $? on SIGTERM"
# The worker's last round is in the file.
"$PY" - "$T/disk.img" <<'PYEOF' || fail "file content wrong after the test"
import sys
M = 1 << 20
d = open(sys.argv[1], "rb").read()
assert len(d) == 64 * M, len(d)
assert d[:M] == b"\x99" * M, "first MiB"
assert d[32 * M:48 * M] == b"\x4f" * (16 * M), "worker range"
PYEOF
pass
