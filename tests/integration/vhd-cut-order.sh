#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The order of the system calls that cut a VHD file to a new end, seen
# with strace, for the three places that do it (vhd_file_end_at):
#  1. vhd-util modify -z (offline make-empty) of a file with blocks;
#  2. vhd-util repair of a file whose footer at the end is damaged;
#  3. the daemon's trim at a clean close, after the driver moved its
#     footer ahead of the blocks.
# Each time, the last ftruncate(fd, L) must follow a 512-byte pwrite of a
# footer ("conectix") at L - 512 and then an fdatasync of the same fd,
# and an fsync of that fd must follow it: the footer is durable before
# the file is cut, so a power cut never leaves a file that ends without
# one.  The file must then be L bytes long and pass vhd-util check.
# (The crash tests cut the process, which cannot see this order.)
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd strace qemu-io
tdr_setup

VU="$TDR_BUILDDIR/tools/vhd-util"
[ -x "$VU" ] || fail "vhd-util not built: $VU"
# LeakSanitizer cannot stop a traced process's threads: no leak check
# under strace (the ASan build's other tests still check for leaks).
# shellcheck disable=SC2054 # the commas are strace's
TRACE=(env "ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
	strace -f -qq -e trace=pwrite64,fdatasync,ftruncate,fsync)

# check_order LOG FILE WHAT: the checks above on strace's LOG.
check_order() {
	local log=$1 file=$2 what=$3 len
	len=$("$PY" - "$log" 2>&1 <<'PY'
import re, sys
# strace -f: "PID call(args) = ret"
pat = re.compile(r'^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((\d+)(?:, (.*))?\)\s+=\s+(-?\d+)')
calls = []
for line in open(sys.argv[1]):
    m = pat.match(line)
    if m:
        calls.append((m.group(2), int(m.group(3)), m.group(4) or "", int(m.group(5))))
cuts = [i for i, c in enumerate(calls) if c[0] == "ftruncate"]
if not cuts:
    sys.exit("no ftruncate in the trace")
i = cuts[-1]
name, fd, args, ret = calls[i]
if ret != 0:
    sys.exit(f"ftruncate returned {ret}")
length = int(args)
after = [c for c in calls[i + 1:] if c[1] == fd]
if not after or after[0][0] != "fsync" or after[0][3] != 0:
    sys.exit(f"after ftruncate({fd}, {length}) the next call on fd {fd} is not a good fsync: {after[:1]}")
before = [c for c in calls[:i] if c[1] == fd]
if not before or before[-1][0] != "fdatasync" or before[-1][3] != 0:
    sys.exit(f"before ftruncate({fd}, {length}) the last call on fd {fd} is not a good fdatasync: {before[-1:]}")
w = [c for c in before if c[0] == "pwrite64"]
if not w:
    sys.exit(f"no pwrite64 on fd {fd} before the ftruncate")
wargs = w[-1][2]
m = re.match(r'^"(.*)"(?:\.\.\.)?, (\d+), (\d+)$', wargs)
if not m or not m.group(1).startswith("conectix") or int(m.group(2)) != 512 or \
        int(m.group(3)) != length - 512 or w[-1][3] != 512:
    sys.exit(f"the last pwrite64 before the ftruncate is not the footer at {length - 512}: {w[-1]}")
print(length)
PY
) || fail "$what: $len"
	[ -n "$len" ] || fail "$what: no length from the trace"
	assert_eq "$what: file length" "$len" "$(stat -c %s "$file")"
	"$VU" check -n "$file" >/dev/null || fail "$what: vhd-util check fails after the cut"
}

# fill FILE: 6 MiB in three 2 MiB blocks through the daemon.
fill() {
	tdr_start "vhd:$1"
	qio "$URI" "write -P 0x21 0 2M" "write -P 0x22 8M 2M" "write -P 0x23 20M 2M" flush
	tdr_stop || fail "daemon exited with status $? on SIGTERM"
}

# ---- 1. offline make-empty
"$VU" create -n "$T/mz.vhd" -s 64 || fail "vhd-util create failed"
fill "$T/mz.vhd"
"${TRACE[@]}" -o "$T/mz.trace" "$VU" modify -n "$T/mz.vhd" -z || fail "vhd-util modify -z failed"
check_order "$T/mz.trace" "$T/mz.vhd" "modify -z"
assert_eq "blocks after modify -z" 0 \
	"$("$VU" query -n "$T/mz.vhd" -i | awk -F': ' '$1 == "allocated-blocks" { print $2 }')"
log "1: modify -z writes the footer, fdatasync, ftruncate, fsync"

# ---- 2. repair of a damaged footer
"$VU" create -n "$T/rp.vhd" -s 64 || fail "vhd-util create failed"
fill "$T/rp.vhd"
size=$(stat -c %s "$T/rp.vhd")
head -c 512 /dev/urandom | dd of="$T/rp.vhd" bs=512 seek=$((size / 512 - 1)) conv=notrunc status=none
st=0
"$VU" check -n "$T/rp.vhd" >/dev/null 2>&1 || st=$?
assert_eq "check status of the damaged file" 1 "$st"
"${TRACE[@]}" -o "$T/rp.trace" "$VU" repair -n "$T/rp.vhd" || fail "vhd-util repair failed"
check_order "$T/rp.trace" "$T/rp.vhd" "repair"
log "2: repair writes the footer, fdatasync, ftruncate, fsync"

# ---- 3. the daemon's trim at a clean close
"$VU" create -n "$T/tr.vhd" -s 64 || fail "vhd-util create failed"
"${TRACE[@]}" -o "$T/tr.trace" "$TDR_BIN" serve --socket "$T/tr.sock" "vhd:$T/tr.vhd" 2>"$T/tr.err" &
tracer=$!
for _ in $(seq 200); do [ -S "$T/tr.sock" ] && break; sleep 0.05; done
[ -S "$T/tr.sock" ] || fail "the traced daemon did not start: $(cat "$T/tr.err")"
qio "$(tdr_uri "$T/tr.sock")" "write -P 0x31 0 2M" "write -P 0x32 30M 2M" flush
# The daemon only, not strace: a tracer that gets the signal detaches.
daemon=$(pgrep -P "$tracer") || fail "no daemon under strace (pid $tracer)"
kill -TERM "$daemon" || fail "cannot signal the traced daemon"
st=0
wait "$tracer" || st=$?
assert_eq "traced daemon's exit status" 0 "$st"
check_order "$T/tr.trace" "$T/tr.vhd" "trim at close"
log "3: the daemon's trim at close writes the footer, fdatasync, ftruncate, fsync"

pass
