#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# A network that silently drops packets: primary and secondary in two network
# namespaces of their own, joined by a veth pair (192.0.2.0/24, TEST-NET-1,
# only inside these namespaces), replicating over TCP.  Mid-run an nftables
# rule in the secondary's namespace drops everything to the NBD port: no
# RST, no FIN, the link just goes silent.  The guest's writes still complete
# within the timeout plus a margin; once the rule is gone, an incremental
# resync makes the secondary byte-exact again.  Needs root (skips otherwise).
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/primary-lib.sh
. "$(dirname "$0")/primary-lib.sh"
need_cmd qemu-io qemu-nbd truncate cmp
PATH=$PATH:/usr/sbin:/sbin
need_cmd ip nft
[ "$(id -u)" -eq 0 ] || skip "needs root for network namespaces"
tdr_setup

NS_P="tdrp-$$"
NS_S="tdrs-$$"
# shellcheck disable=SC2317  # called from the EXIT trap
ns_cleanup() {
	ip netns del "$NS_P" 2>/dev/null
	ip netns del "$NS_S" 2>/dev/null
	return 0
}
# Namespaces go before lib.sh's cleanup, which keeps the test's status.
# shellcheck disable=SC2154  # rc is set inside the trap
trap 'rc=$?; ns_cleanup; (exit $rc); _tdr_cleanup' EXIT

ip netns add "$NS_P" || skip "cannot create network namespaces here"
ip netns add "$NS_S" || skip "cannot create network namespaces here"
ip link add "vp$$" netns "$NS_P" type veth peer name "vs$$" netns "$NS_S" ||
	skip "cannot create a veth pair"
ip -n "$NS_P" addr add 192.0.2.1/24 dev "vp$$"
ip -n "$NS_S" addr add 192.0.2.2/24 dev "vs$$"
ip -n "$NS_P" link set "vp$$" up
ip -n "$NS_S" link set "vs$$" up
ip -n "$NS_P" link set lo up
ip -n "$NS_S" link set lo up

TIMEOUT_MS=3000
PORT=10809

mkraw "$T/primary.img" 32M
mkraw "$T/sec.img" 32M
# wait_tcp NS HOST PORT: until something accepts on HOST:PORT inside NS.
wait_tcp() {
	local i=0 limit=$((TDR_TIMEOUT * 20))
	until ip netns exec "$1" "$PY" -c '
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
' "$2" "$3" 2>/dev/null; do
		i=$((i + 1))
		[ "$i" -lt "$limit" ] || fail "nothing listens on $2:$3 in $1"
		sleep 0.05
	done
}

# The secondary: qemu-nbd on TCP inside its namespace (ip netns exec keeps the pid).
ip netns exec "$NS_S" qemu-nbd -f raw -x secondary -b 192.0.2.2 -p "$PORT" --persistent \
	--shared=8 "$T/sec.img" </dev/null >"$T/qemu.out" 2>"$T/qemu.err" &
TDR_PIDS+=("$!")
wait_tcp "$NS_S" 192.0.2.2 "$PORT"
# ... reachable from the primary's namespace.
wait_tcp "$NS_P" 192.0.2.2 "$PORT"

# The primary runs inside its namespace; its UNIX sockets are plain files.
cat >"$T/in-ns-p" <<WRAP
#!/bin/sh
exec ip netns exec "$NS_P" "$TDR_BIN" "\$@"
WRAP
chmod +x "$T/in-ns-p"
REAL_BIN=$TDR_BIN
TDR_BIN="$T/in-ns-p"
primary_start "tcp:192.0.2.2:$PORT" "timeout=$TIMEOUT_MS"
TDR_BIN=$REAL_BIN
pctl_ok start >/dev/null
qio "$PURI" "write -P 0x51 0 2M" flush
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
log "replicating over TCP between namespaces"

# The network goes silent.
ip netns exec "$NS_S" nft add table inet tdrtest
ip netns exec "$NS_S" nft add chain inet tdrtest input '{ type filter hook input priority 0; policy accept; }'
ip netns exec "$NS_S" nft add rule inet tdrtest input tcp dport "$PORT" drop
guest_qio "$PURI" "write -P 0x52 4M 1M" "write -P 0x53 9M 64k"
log "drop rule: guest writes completed in ${LAST_MS} ms"
assert_eq "drop rule: state" broken "$(pstatus state)"
assert_eq "drop rule: error" ETIMEDOUT "$(pstatus error)"
# While the link is down, resync cannot connect: a clear error, nothing changes.
st=0
out=$(pctl resync incremental 2>&1) || st=$?
[ "$st" -ne 0 ] || fail "resync over a dead network succeeded: $out"
case $out in *"cannot connect"*) ;; *) fail "resync error unclear: $out" ;; esac
assert_eq "resync refused: state" broken "$(pstatus state)"
qio "$PURI" "write -P 0x54 20M 64k" "read -P 0x52 4M 1M"

# The network comes back.
ip netns exec "$NS_S" nft delete table inet tdrtest
sleep 1
pctl_ok resync incremental >/dev/null
wait_pstate running
pctl_ok checkpoint >/dev/null
same_as_primary "$T/sec.img"
pass "a silently dropping network never held the guest; resync made the secondary byte-exact"
