#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Writes the seed corpora of the protocol fuzz harnesses, so that the
fuzzers start past the handshakes.  Values from the NBD protocol's proto.md
and Xen's xs_wire.h.

  make-corpus.py server DIR   client byte streams (handshake and
                              transmission) for fuzz-nbd-server.c
  make-corpus.py link DIR     a 2-byte handshake length, then a server's
                              byte stream, for fuzz-nbd-link.c
  make-corpus.py xs DIR       xenstored's replies and watch events to the
                              requests of fuzz-xs-conn.c (ids 1-4)
  make-corpus.py ctl DIR      a tap-ctl client's messages for
                              fuzz-ctl-server.c
  make-corpus.py parsers DIR  a selector byte and a text for
                              fuzz-parsers.c (0 request line, 1 spec
                              entry, 2 --tcp, 3 --readahead, 4 --log-level)
"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
C_FIXED, C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f=C_FIXED | C_NO_ZEROES):
    return struct.pack(">I", f)


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def name(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def go(export="", infos=(), code=OPT_GO):
    return opt(code, name(export) + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(code, export="", queries=("base:allocation",)):
    return opt(code, name(export) + struct.pack(">I", len(queries)) +
               b"".join(name(q) for q in queries))


cookie = 0


def req(cmd, off=0, length=0, fl=0, payload=None):
    global cookie
    cookie += 1
    b = struct.pack(">IHHQQI", REQUEST_MAGIC, fl, cmd, cookie, off, length)
    if cmd == WRITE:
        b += payload if payload is not None else bytes((cookie + i) & 0xff for i in range(length))
    return b


SEEDS = {
    "go-simple": flags() + go() + req(WRITE, 0, 4096) + req(READ, 0, 4096) +
    req(FLUSH) + req(TRIM, 8192, 4096) + req(WRITE_ZEROES, 4096, 512) + req(DISC),
    "go-structured": flags() + opt(OPT_STRUCTURED) + meta(OPT_SET_META) +
    go("", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)) +
    req(WRITE, 512, 1024, FUA) + req(READ, 0, 8192) + req(READ, 0, 4096, DF) +
    req(BLOCK_STATUS, 0, 65536) + req(BLOCK_STATUS, 4096, 8192, REQ_ONE) +
    req(WRITE_ZEROES, 0, 4096, NO_HOLE | FAST_ZERO) + req(CACHE, 0, 4096) + req(DISC),
    "options": flags() + opt(OPT_LIST) + go("ro", (INFO_BLOCK_SIZE,), OPT_INFO) +
    meta(OPT_LIST_META, "", ("base:",)) + opt(99, b"abc") + opt(OPT_STARTTLS) +
    go("missing") + opt(OPT_ABORT),
    "export-name-ro": flags(C_FIXED) + opt(OPT_EXPORT_NAME, b"ro") +
    req(WRITE, 0, 512) + req(READ, 1024, 512) + req(FLUSH) + req(DISC),
    "bad-requests": flags() + go() + req(READ, 100, 512) + req(READ, 1 << 20, 512) +
    req(WRITE, (1 << 20) - 512, 1024) + req(READ, 0, 64 << 20) + req(77, 0, 0) +
    req(BLOCK_STATUS, 0, 4096) + req(TRIM, 0, 0) + req(DISC),
    "pipelined": flags() + opt(OPT_STRUCTURED) + meta(OPT_SET_META) + go() +
    b"".join(req(WRITE, i * 4096, 512) + req(READ, i * 4096 - 512 * (i % 2), 1024)
             for i in range(1, 33)) + req(DISC),
    "bad-magic": flags() + go() + b"\x00" * 28,
}


# ---- the server side, for the link (the client of replica-link-native.c)

OPT_REPLY_MAGIC = 0x0003e889045565a9
SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x67446698, 0x668e33ef
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 6
F_HAS, F_RO, F_FLUSH, F_FUA, F_ZEROES = 1, 2, 4, 8, 64
SIZE = 1 << 20


def greeting(hs_flags=3):
    return b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", hs_flags)


def opt_reply(rtype, data=b"", option=OPT_GO):
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, rtype, len(data)) + data


def info_export(size=SIZE, tflags=F_HAS | F_FLUSH | F_FUA | F_ZEROES):
    return opt_reply(REP_INFO, struct.pack(">HQH", 0, size, tflags))


def info_block_size(maximum=32 << 20):
    return opt_reply(REP_INFO, struct.pack(">HIII", 3, 512, 4096, maximum))


def reply(cookie, err=0, magic=SIMPLE_MAGIC):
    return struct.pack(">IIQ", magic, err, cookie)


def link_seed(hs, rest=b""):
    return struct.pack(">H", len(hs)) + hs + rest


GO_OK = greeting() + info_export() + info_block_size() + opt_reply(REP_ACK)

LINK_SEEDS = {
    "ok": link_seed(GO_OK, reply(2) + reply(0) + reply(3) + reply(1)),
    "errors": link_seed(GO_OK, reply(0) + reply(1, 5) + reply(2) + reply(3, 28)),
    "export-name": link_seed(greeting() + opt_reply(REP_ERR_UNSUP) +
                             struct.pack(">QH", SIZE, F_HAS | F_FLUSH | F_ZEROES),
                             reply(0) + reply(1) + reply(2) + reply(3)),
    "export-name-zeroes": link_seed(greeting(1) + opt_reply(REP_ERR_UNSUP) +
                                    struct.pack(">QH", SIZE, F_HAS | F_FLUSH) + b"\0" * 124,
                                    reply(0) + reply(1) + reply(2)),
    "wrong-size": link_seed(greeting() + info_export(2 * SIZE) + opt_reply(REP_ACK)),
    "unknown-export": link_seed(greeting() + opt_reply(REP_ERR_UNKNOWN, b"no such export")),
    "small-payload": link_seed(greeting() + info_export() + info_block_size(16384) +
                               opt_reply(REP_ACK),
                               b"".join(reply(i) for i in (0, 1, 2, 3, 4, 5, 6))),
    "bad-cookie": link_seed(GO_OK, reply(0) + reply(7)),
    "structured": link_seed(GO_OK, reply(0, 0, STRUCTURED_MAGIC)),
    "read-only": link_seed(greeting() + info_export(SIZE, F_HAS | F_RO) + opt_reply(REP_ACK)),
}


# ---- xenstored, for the daemon's xenstore client (xs-conn.c)

XS_DIRECTORY, XS_READ, XS_WATCH, XS_WRITE, XS_WATCH_EVENT, XS_ERROR = 1, 2, 4, 11, 15, 16


def xs_msg(mtype, req_id, payload, tx_id=0):
    # struct xsd_sockmsg: four native-endian (little on x86) 32-bit fields
    return struct.pack("<IIII", mtype, req_id, tx_id, len(payload)) + payload


XS_OK = (xs_msg(XS_READ, 1, b"contents") + xs_msg(XS_WRITE, 2, b"OK\0") +
         xs_msg(XS_DIRECTORY, 3, b"a\0b\0d\0") + xs_msg(XS_WATCH, 4, b"OK\0"))

XS_SEEDS = {
    "replies": XS_OK,
    "replies-and-events": XS_OK + xs_msg(XS_WATCH_EVENT, 0, b"/fuzz/d\0token\0") +
    xs_msg(XS_WATCH_EVENT, 0, b"/fuzz/d/x\0token\0"),
    "errors": xs_msg(XS_ERROR, 1, b"ENOENT\0") + xs_msg(XS_ERROR, 2, b"EACCES\0") +
    xs_msg(XS_ERROR, 3, b"EINVAL\0") + xs_msg(XS_ERROR, 4, b"E2BIG\0"),
    "event-first": xs_msg(XS_WATCH_EVENT, 0, b"/fuzz/d\0token\0") + XS_OK,
    "unknown-id": xs_msg(XS_READ, 9, b"x") + XS_OK,
    "oversized": xs_msg(XS_READ, 1, b"") [:12] + struct.pack("<I", 5000),
    "partial": XS_OK[:30],
}

# Control messages (include/tdr/ctl-message.h): 544 bytes in host order
# (little-endian here), type and cookie, then the union at offset 8.
CTL_SIZE = 544
(CTL_ERROR, CTL_PID, CTL_ATTACH, CTL_OPEN, CTL_PAUSE, CTL_RESUME, CTL_CLOSE,
 CTL_DETACH, CTL_LIST_MINORS, CTL_LIST, CTL_STATS, CTL_FORCE_SHUTDOWN,
 CTL_XENBLKIF_CONNECT, CTL_DISK_INFO, CTL_EXIT, CTL_COMMIT) = (
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 24, 28, 30, 31)
CTL_REPLICA = 0x1000
FLAG_RDONLY, FLAG_ADD_LOG = 0x2, 0x10
NONE = 0xFFFF


def ctl(mtype, cookie=NONE, body=b""):
    m = struct.pack("<HHI", mtype, cookie, 0) + body
    return m + bytes(CTL_SIZE - len(m))


def params(path, fl=0, minor=0):
    p = path.encode()
    return struct.pack("<III", fl, minor, 0) + p + bytes(256 - len(p))


def rep(minor, line):
    return ctl(CTL_REPLICA, minor, line.encode() + b"\0")


PRIMARY = "replica:mode=primary,addr=unix:/nonexistent/x.sock"
CTL_SEEDS = {
    "queries": ctl(CTL_PID) + ctl(CTL_LIST) + ctl(CTL_STATS, 0) + ctl(CTL_STATS, 1) +
    ctl(CTL_STATS) + ctl(CTL_DISK_INFO, 0) + ctl(CTL_DISK_INFO, 7),
    "pause-resume": ctl(CTL_PAUSE, 0) + ctl(CTL_LIST) + ctl(CTL_RESUME, 0, params("")) +
    ctl(CTL_PAUSE, 1) + ctl(CTL_PAUSE, 1) + ctl(CTL_RESUME, 1, params("")),
    "attach-open-close": ctl(CTL_ATTACH, 2) + ctl(CTL_OPEN, 2, params("mem:", minor=2)) +
    ctl(CTL_LIST) + ctl(CTL_CLOSE, 2) + ctl(CTL_DETACH, 2) +
    ctl(CTL_ATTACH, 3) + ctl(CTL_OPEN, 3, params(PRIMARY + "|mem:", FLAG_RDONLY, 3)) +
    rep(3, "status") + ctl(CTL_FORCE_SHUTDOWN, 3),
    "close-paused": ctl(CTL_PAUSE, 0) + ctl(CTL_CLOSE, 0) + ctl(CTL_LIST) +
    ctl(CTL_ATTACH, 0) + ctl(CTL_OPEN, 0, params("mem:")),
    "replica": rep(1, "status") + rep(1, "get-error") + rep(1, "start") + rep(1, "status") +
    rep(1, "checkpoint") + rep(1, "resync full") + rep(1, "stop") + rep(1, "failover") +
    rep(1, "start mode=primary addr=unix:/nonexistent/y.sock") + rep(0, "status") +
    rep(1, "bogus words here") + rep(NONE, "status"),
    "refusals": ctl(999) + ctl(CTL_ERROR) + ctl(CTL_XENBLKIF_CONNECT, 0) + ctl(CTL_EXIT) +
    ctl(CTL_LIST_MINORS) + ctl(CTL_COMMIT, 0) + ctl(CTL_OPEN, 5, params("aio:/etc/passwd")) +
    ctl(CTL_OPEN, 0, params("mem:")) + ctl(CTL_ATTACH, 0),
    "trailer": ctl(CTL_ATTACH, 4) + ctl(CTL_OPEN, 4, params("mem:", FLAG_ADD_LOG, 4)) +
    b"/var/log/x".ljust(256, b"\0") + ctl(CTL_LIST),
    "cut": ctl(CTL_LIST) + ctl(CTL_PAUSE, 0)[:100],
}

PARSER_SEEDS = {
    "request-start": b"\x00start mode=primary addr=tcp:10.0.0.2:10809 export=sec timeout=5000 sync=local",
    "request-secondary": b"\x00start mode=secondary",
    "request-stop": b"\x00stop failover",
    "request-resync": b"\x00resync full",
    "request-bad": b"\x00checkpoint now please",
    "spec-primary": b"\x01replica:mode=primary,addr=unix:/run/sec.sock,export=d0,timeout=5000,sync=both",
    "spec-secondary": b"\x01replica:mode=secondary,cbw=64K,scratch=off",
    "spec-bare": b"\x01vhd:/srv/a,b=,,c=d=e",
    "tcp-v4": b"\x02192.168.0.1:10809",
    "tcp-v6": b"\x02[fe80::1%eth0]:10809",
    "tcp-port": b"\x0210809",
    "readahead": b"\x038M",
    "log-level": b"\x04debug",
}


def main():
    kinds = {"server": SEEDS, "link": LINK_SEEDS, "xs": XS_SEEDS, "ctl": CTL_SEEDS,
             "parsers": PARSER_SEEDS}
    if len(sys.argv) != 3 or sys.argv[1] not in kinds:
        sys.exit("usage: make-corpus.py server|link|xs|ctl|parsers DIR")
    seeds = kinds[sys.argv[1]]
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for n, data in seeds.items():
        with open(os.path.join(out, n), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
