#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Runs in dom0 (busybox sh, cwd /mnt/host) from tests/xen/run.  The tests
# themselves (tests.sh) run in the host's root, read-only over 9p, through
# hostchroot: the host's bash, libraries, libxenstore, libnbd and our
# binaries, with dom0's /dev, /proc and /run (so the real xenstored's
# socket).  This share is /run/host0 there.
#
# What the chroot cannot do - restart dom0's own xenstored - it asks us
# through a FIFO: "kill-xsd", "start-xsd", "exit".
up() { cut -d' ' -f1 /proc/uptime; }
XSD_PID=$(cat /run/xen/xenstored.pid 2>/dev/null)
echo "INFO dom0 $(uname -r), xenstored pid $XSD_PID, uptime $(up) s"
mkfifo /run/tdr-cmd /run/tdr-ack
hostchroot /bin/bash /run/host0/tests.sh &
TP=$!
# Read-write, so that opening never blocks and EOF never ends the loop.
exec 3<>/run/tdr-cmd
mkfifo /run/tdr-sleep /run/tdr-sleep2
exec 4<>/run/tdr-sleep
# If the tests die without saying "exit", say it for them.  The command
# loop reads without a timeout: a read that times out in the middle of a
# line (bash reads a FIFO byte by byte) would split a command in two, and
# "start-xsd" arriving just as a 2 s timeout expired did exactly that.
(
	exec 5<>/run/tdr-sleep2
	while kill -0 $TP 2>/dev/null; do read -t 2 _ <&5; done
	echo "exit 98" >&3
) &
WATCHER=$!
RC=""
while [ -z "$RC" ]; do
	read -r cmd <&3 || continue
	case $cmd in
	kill-xsd)
		kill -KILL "$(cat /run/xen/xenstored.pid)"
		rm -f /run/xenstored/socket /run/xenstored/socket_ro
		echo killed >/run/tdr-ack ;;
	start-xsd)
		xenstored --pid-file /run/xen/xenstored.pid
		# Polled without starting processes: each costs the emulated
		# dom0 tens of milliseconds of CPU, which the workload would see.
		i=0; while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do read -t 0.05 _ <&4; i=$((i+1)); done
		echo "started $(cat /run/xen/xenstored.pid)" >/run/tdr-ack ;;
	exit*)
		RC=${cmd#exit } ;;
	*)
		echo "unknown" >/run/tdr-ack ;;
	esac
done
kill $WATCHER 2>/dev/null
wait $TP 2>/dev/null
echo "INFO payload finished at uptime $(up) s with status $RC"
exit "$RC"
