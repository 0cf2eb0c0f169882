#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# shellcheck disable=SC2119
#
# --tcp HOST:PORT on the loopback: nbdinfo and qemu-io over TCP see the same
# export as over the UNIX socket.
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io truncate
[ -x "$PY" ] || skip "$PY not installed"
tdr_setup

# A port that was free a moment ago.
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkraw "$T/disk.img" 8M
tdr_start --tcp "127.0.0.1:$port" "aio:$T/disk.img"
tcp_uri="nbd://127.0.0.1:$port"

assert_eq "export-size over TCP" 8388608 "$(nbdinfo --size "$tcp_uri")"
qio "$tcp_uri" 'write -P 0x7e 1M 1M' flush
qio "$URI" 'read -P 0x7e 1M 1M' 'read -P 0 0 1M'
tdr_stop || fail "daemon exited with status $? on SIGTERM"
pass
