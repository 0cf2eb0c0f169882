#!/bin/bash
# Adapted from the shared xen-testbed (shared/xen-testbed/build-initramfs.sh);
# tests/xen carries its own copy so that the project does not depend on shared/.
# Build a tiny dom0 initramfs: busybox-static + real Xen userspace (xenstored,
# xenstore-* clients, xl, xen-init-dom0, xenconsoled) + Xen kernel modules.
# Usage: build-initramfs.sh <kernel-extract-dir> <init-script> <out.cpio.gz>
set -euo pipefail
KDIR=${1:?kernel dir}
INIT=${2:?init script}
OUT=${3:?output cpio.gz}
ROOT=$(mktemp -d "$(dirname "$OUT")/rootfs.XXXX")
trap 'rm -rf "$ROOT"' EXIT

KVER=$(ls "$KDIR/lib/modules" | head -1)
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,usr/bin,usr/sbin,lib/modules/$KVER}
mkdir -p "$ROOT"/var/{lib/xen,lib/xenstored,log/xen} "$ROOT"/etc/xen
ln -s ../run "$ROOT/var/run"   # /run is a tmpfs at boot; xen tools use /var/run/xen*

# busybox (static); applet links are created at boot by `busybox --install -s`
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

# copy a dynamically linked binary plus its shared libs (resolved by ldd)
copy_bin() {
  local src=$1 dst=$2
  mkdir -p "$ROOT/$(dirname "$dst")"
  cp -L "$src" "$ROOT/$dst"
  ldd "$src" | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$ROOT$lib" ] && continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
  done
}
XB=/usr/lib/xen-4.17/bin
# (only what the tapdisk-replica tests need: xenstored and its helpers; the
# tests themselves run host binaries through hostchroot)
for b in xenstored oxenstored xl xen-init-dom0 xenstore-control; do
  [ -e "$XB/$b" ] && copy_bin "$XB/$b" "/usr/lib/xen-4.17/bin/$b"
done
copy_bin /usr/bin/xenstore /usr/bin/xenstore
# glibc dlopen()s libgcc_s for pthread_cancel (xenstore-watch, libxenstore threads)
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$ROOT/lib/x86_64-linux-gnu/"
mkdir -p "$ROOT/var/lock"
for c in read write rm ls list exists chmod watch; do ln -sf xenstore "$ROOT/usr/bin/xenstore-$c"; done
for b in xl xenstored xen-init-dom0 xenconsoled xenstore-control; do ln -sf ../lib/xen-4.17/bin/$b "$ROOT/usr/sbin/$b"; done
# ld.so search path: Debian multiarch libs live in /lib/x86_64-linux-gnu already
cp /etc/xen/xl.conf "$ROOT/etc/xen/" 2>/dev/null || true
cp /etc/xen/oxenstored.conf "$ROOT/etc/xen/" 2>/dev/null || true
cp -a /etc/xen/scripts "$ROOT/etc/xen/" 2>/dev/null || true

# kernel modules needed by the Xen toolstack (built as =m in Debian's config)
M="$KDIR/lib/modules/$KVER/kernel"
# (order matters: /init insmods them in the order listed in /lib/modules/order)
MODS="drivers/xen/xen-privcmd.ko drivers/xen/xenfs/xenfs.ko drivers/xen/xen-evtchn.ko
 drivers/xen/xen-gntdev.ko drivers/xen/xen-gntalloc.ko drivers/block/loop.ko
 drivers/block/xen-blkback/xen-blkback.ko
 drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko
 drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko
 net/9p/9pnet.ko net/9p/9pnet_virtio.ko fs/netfs/netfs.ko fs/fscache/fscache.ko fs/9p/9p.ko"
: > "$ROOT/lib/modules/order"
for m in $MODS; do
  cp "$M/$m" "$ROOT/lib/modules/$KVER/"
  basename "$m" .ko >> "$ROOT/lib/modules/order"
done

# extra payload (test programs etc.) can be dropped into $EXTRA_DIR
if [ -n "${EXTRA_DIR:-}" ] && [ -d "$EXTRA_DIR" ]; then cp -a "$EXTRA_DIR"/. "$ROOT/"; fi

install -m 755 "$INIT" "$ROOT/init"
HERE=$(cd "$(dirname "$0")" && pwd)
[ -f "$HERE/hostchroot" ] && install -D -m 755 "$HERE/hostchroot" "$ROOT/usr/local/bin/hostchroot"
# gzip -1 is best: with COMPRESS=none the (bigger) image made Xen's dom0 build ~0.45 s/MB slower
if [ "${COMPRESS:-gzip}" = none ]; then
  (cd "$ROOT" && find . | busybox cpio -o -H newc 2>/dev/null) > "$OUT"
else
  (cd "$ROOT" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$OUT"
fi
ls -la "$OUT"
