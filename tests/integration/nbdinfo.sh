#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# nbdinfo sees the export as specified: fixed newstyle with structured
# replies, the exact size, every write capability, base:allocation, a 512-byte
# minimum block size; and --export-name picks the name clients must ask for.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

mkraw "$T/disk.img" 64M
tdr_start "aio:$T/disk.img"

nbdinfo --json "$URI" >"$T/info.json" || fail "nbdinfo --json $URI failed"
"$PY" - "$T/info.json" <<'PYEOF' || fail "nbdinfo --json output differs from the expected values"
import json, sys
info = json.load(open(sys.argv[1]))
e = info["exports"][0]
want = {
    ("protocol",): "newstyle-fixed",
    ("structured",): True,
    ("export-name",): "",
    ("export-size",): 64 * 1024 * 1024,
    ("is_read_only",): False,
    ("can_flush",): True,
    ("can_fua",): True,
    ("can_trim",): True,
    ("can_zero",): True,
    ("can_multi_conn",): True,
    ("block_size_minimum",): 512,
}
bad = 0
for (k,), v in want.items():
    got = info.get(k, e.get(k, "<missing>")) if k in ("protocol", "structured") else e.get(k, "<missing>")
    if got != v:
        print(f"  {k}: expected {v!r}, got {got!r}", file=sys.stderr)
        bad += 1
ctx = e.get("contexts", [])
if "base:allocation" not in ctx:
    print(f"  contexts: expected base:allocation in {ctx!r}", file=sys.stderr)
    bad += 1
pref = e.get("block_size_preferred")
maxi = e.get("block_size_maximum")
if pref is not None and (pref < 512 or pref & (pref - 1)):
    print(f"  block_size_preferred: {pref!r} is not a power of two >= 512", file=sys.stderr)
    bad += 1
if maxi is not None and pref is not None and maxi < pref:
    print(f"  block_size_maximum {maxi!r} < preferred {pref!r}", file=sys.stderr)
    bad += 1
sys.exit(1 if bad else 0)
PYEOF

# Plain (non-JSON) output states the size too.
nbdinfo --size "$URI" >"$T/size" || fail "nbdinfo --size failed"
assert_eq "nbdinfo --size" 67108864 "$(cat "$T/size")"
tdr_stop || fail "daemon exited with status $? on SIGTERM"

# A named export: reachable under its name, refused under another.
mkraw "$T/named.img" 3M
tdr_start --export-name disk0 "aio:$T/named.img"
assert_eq "size of export disk0" 3145728 \
	"$(nbdinfo --size "nbd+unix:///disk0?socket=$SOCK")"
if nbdinfo --size "nbd+unix:///other?socket=$SOCK" >/dev/null 2>&1; then
	fail "export 'other' should not exist when serving 'disk0'"
fi
tdr_alive
tdr_stop || fail "daemon exited with status $? on SIGTERM"

pass
