#!/usr/bin/env python3
"""Writes the seed corpora of husk-vmm's fuzz targets (vmm/fuzz/corpus/<target>/).

Each seed is what a Linux guest really puts on the wire (vsock packets as virtio_vsock_hdr,
virtio-blk requests, virtio-net frames, FUSE requests as fuse_kernel.h lays them out), framed
in the input format of the entry points in vmm/src/fuzzing.rs. Run from anywhere:
`python3 vmm/fuzz/seeds.py`. Seeds are deterministic, so re-running changes nothing.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

GUEST_CID, HOST_CID = 3, 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def vsock_hdr(src_port, dst_port, op, length=0, flags=0, buf_alloc=262144, fwd_cnt=0,
              src_cid=GUEST_CID, dst_cid=HOST_CID, type_=1):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, type_, op,
                       flags, buf_alloc, fwd_cnt)


# ---- structured virtqueue input: mode byte (chain count), then per chain:
# queue selector, descriptor count - 1, and per descriptor flags (bit 0 = device-writable),
# u16 length, and the bytes of device-readable descriptors.

def desc(data=None, write_len=0, flags=0):
    if data is not None:
        return struct.pack("<BH", flags & ~1, len(data)) + bytes(data)
    return struct.pack("<BH", flags | 1, write_len)


def chain(queue, *descs):
    return bytes([queue, len(descs) - 1]) + b"".join(descs)


def queues(*chains, prefix=b""):
    return prefix + bytes([len(chains)]) + b"".join(chains)


def vsock_seeds():
    t = "virtio_vsock"
    rxbuf = chain(0, desc(write_len=44 + 4096))
    req = vsock_hdr(1025, 1024, OP_REQUEST)
    write(t, "request_to_service", queues(chain(1, desc(req)), rxbuf))
    write(t, "request_refused", queues(chain(1, desc(vsock_hdr(1025, 99, OP_REQUEST))), rxbuf))
    rw = vsock_hdr(1025, 1024, OP_RW, length=5)
    write(t, "request_then_data_split",
          queues(chain(1, desc(req)), chain(1, desc(rw), desc(b"hello")), rxbuf, rxbuf))
    write(t, "request_then_data_one_desc", queues(chain(1, desc(req)), chain(1, desc(rw + b"hello")), rxbuf))
    write(t, "credit_request", queues(chain(1, desc(req)),
                                      chain(1, desc(vsock_hdr(1025, 1024, OP_CREDIT_REQUEST))), rxbuf, rxbuf))
    write(t, "shutdown_both", queues(chain(1, desc(req)),
                                     chain(1, desc(vsock_hdr(1025, 1024, OP_SHUTDOWN, flags=3))), rxbuf, rxbuf))
    write(t, "rst_unknown", queues(chain(1, desc(vsock_hdr(1025, 7, OP_RST)))))
    write(t, "rw_unknown_conn", queues(chain(1, desc(vsock_hdr(1025, 7, OP_RW, length=3) + b"abc")), rxbuf))
    write(t, "spoofed_cid", queues(chain(1, desc(vsock_hdr(1025, 1024, OP_REQUEST, src_cid=9))), rxbuf))
    write(t, "seqpacket", queues(chain(1, desc(vsock_hdr(1025, 1024, OP_REQUEST, type_=2))), rxbuf))
    write(t, "len_beyond_chain", queues(chain(1, desc(vsock_hdr(1025, 1024, OP_RW, length=65536))), rxbuf))
    write(t, "short_header", queues(chain(1, desc(req[:20]))))
    write(t, "writable_tx", queues(chain(1, desc(req), desc(write_len=64)), rxbuf))
    write(t, "rx_too_small", queues(chain(1, desc(req)), chain(0, desc(write_len=10))))
    write(t, "rx_readable", queues(chain(1, desc(req)), chain(0, desc(b"\0" * 64))))
    write(t, "rx_split", queues(chain(1, desc(req)), chain(0, desc(write_len=20), desc(write_len=24), desc(write_len=100))))
    write(t, "event_queue", queues(chain(2, desc(write_len=8)), chain(1, desc(req)), rxbuf))
    big = vsock_hdr(1025, 1024, OP_RW, length=60000)
    write(t, "big_payload", queues(chain(1, desc(req)), chain(1, desc(big), desc(bytes(range(256)) * 234 + b"x" * 96)), rxbuf))
    write(t, "out_of_range_desc", queues(chain(1, struct.pack("<BH", 0x04, 44)), rxbuf))
    write(t, "looping_chain", queues(chain(1, desc(req, flags=0x10)), rxbuf))
    many = [chain(1, desc(vsock_hdr(2000 + i, 1024, OP_REQUEST))) for i in range(6)]
    write(t, "many_requests", queues(*many, *[rxbuf] * 6))
    # raw mode: the ring pages as a driver leaves them, written byte for byte
    ring = bytearray(3 * 0x1000)
    struct.pack_into("<QIHH", ring, 0x1000, 0x10000, 44, 0, 0)
    struct.pack_into("<HHH", ring, 0x1100, 0, 1, 0)
    struct.pack_into("<QIHH", ring, 0, 0x11000, 4140, 2, 0)
    struct.pack_into("<HHH", ring, 0x100, 0, 1, 0)
    write(t, "raw_rings", bytes([0x80]) + bytes(ring) + req)


BLK_IN, BLK_OUT, BLK_FLUSH, BLK_GET_ID = 0, 1, 4, 8


def blk_hdr(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_seeds():
    t = "virtio_blk"
    rw = b"\x00"
    ro = b"\x01"
    status = desc(write_len=1)
    write(t, "read_sector0", queues(chain(0, desc(blk_hdr(BLK_IN, 0)), desc(write_len=512), status), prefix=rw))
    write(t, "read_4k_split", queues(chain(0, desc(blk_hdr(BLK_IN, 8)), desc(write_len=2048), desc(write_len=2048), status), prefix=rw))
    write(t, "write_sector", queues(chain(0, desc(blk_hdr(BLK_OUT, 1)), desc(b"\xab" * 512), status), prefix=rw))
    write(t, "write_read_only", queues(chain(0, desc(blk_hdr(BLK_OUT, 1)), desc(b"\xab" * 512), status), prefix=ro))
    write(t, "write_past_end", queues(chain(0, desc(blk_hdr(BLK_OUT, 127)), desc(b"\xab" * 1024), status), prefix=rw))
    write(t, "read_sector_overflow", queues(chain(0, desc(blk_hdr(BLK_IN, 0xffffffffffffffff)), desc(write_len=512), status), prefix=rw))
    write(t, "unaligned_len", queues(chain(0, desc(blk_hdr(BLK_IN, 0)), desc(write_len=100), status), prefix=rw))
    write(t, "flush", queues(chain(0, desc(blk_hdr(BLK_FLUSH, 0)), status), prefix=rw))
    write(t, "get_id", queues(chain(0, desc(blk_hdr(BLK_GET_ID, 0)), desc(write_len=20), status), prefix=rw))
    write(t, "get_id_short", queues(chain(0, desc(blk_hdr(BLK_GET_ID, 0)), desc(write_len=3), status), prefix=rw))
    write(t, "unknown_type", queues(chain(0, desc(blk_hdr(77, 0)), status), prefix=rw))
    write(t, "no_status", queues(chain(0, desc(blk_hdr(BLK_IN, 0))), prefix=rw))
    write(t, "short_header", queues(chain(0, desc(blk_hdr(BLK_IN, 0)[:8]), status), prefix=rw))
    write(t, "header_split", queues(chain(0, desc(blk_hdr(BLK_IN, 0)[:5]), desc(blk_hdr(BLK_IN, 0)[5:]), desc(write_len=512), status), prefix=rw))
    write(t, "in_with_out_data", queues(chain(0, desc(blk_hdr(BLK_IN, 0)), desc(b"x" * 512), status), prefix=rw))
    write(t, "several", queues(
        chain(0, desc(blk_hdr(BLK_OUT, 2)), desc(b"\x11" * 1024), status),
        chain(0, desc(blk_hdr(BLK_IN, 2)), desc(write_len=1024), status),
        chain(0, desc(blk_hdr(BLK_FLUSH, 0)), status), prefix=rw))
    write(t, "looping", queues(chain(0, desc(blk_hdr(BLK_IN, 0), flags=0x10), status), prefix=rw))
    ring = bytearray(0x1000)
    struct.pack_into("<QIHH", ring, 0, 0x10000, 16, 1, 1)
    struct.pack_into("<QIHH", ring, 16, 0x10100, 512, 3, 2)
    struct.pack_into("<QIHH", ring, 32, 0x10400, 1, 2, 0)
    struct.pack_into("<HHH", ring, 0x100, 0, 1, 0)
    write(t, "raw_rings", rw + bytes([0x80]) + bytes(ring) + blk_hdr(BLK_IN, 0))


def eth_frame(payload):
    return b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00" + payload


def net_seeds():
    t = "virtio_net"
    nethdr = b"\0" * 12
    ip = bytes.fromhex("450000540000400040010000c0a80001c0a80002") + b"ping" * 16
    frame = eth_frame(ip)

    def frames(*fs):
        return bytes([len(fs)]) + b"".join(struct.pack("<H", len(f)) + f for f in fs)

    rxbuf = chain(0, desc(write_len=12 + 1514))
    write(t, "tx_one", frames() + queues(chain(1, desc(nethdr + frame))))
    write(t, "tx_split_hdr", frames() + queues(chain(1, desc(nethdr), desc(frame))))
    write(t, "tx_header_only", frames() + queues(chain(1, desc(nethdr))))
    write(t, "tx_writable", frames() + queues(chain(1, desc(nethdr + frame), desc(write_len=10))))
    write(t, "rx_one", frames(frame) + queues(rxbuf))
    write(t, "rx_small_buffer", frames(frame) + queues(chain(0, desc(write_len=40))))
    write(t, "rx_split_buffer", frames(frame) + queues(chain(0, desc(write_len=12), desc(write_len=60), desc(write_len=1500))))
    write(t, "rx_no_buffer", frames(frame, frame) + queues())
    write(t, "rx_readable_buffer", frames(frame) + queues(chain(0, desc(b"\0" * 100))))
    write(t, "rx_jumbo", frames(eth_frame(b"j" * 9000)) + queues(chain(0, desc(write_len=9100))))
    write(t, "both", frames(frame, frame, frame) + queues(chain(1, desc(nethdr + frame)), rxbuf, rxbuf))
    write(t, "tx_loop", frames() + queues(chain(1, desc(nethdr + frame, flags=0x10))))


# ---- FUSE (fuse_kernel.h 7.31)
OPS = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8, MKDIR=9,
           UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15, WRITE=16, STATFS=17,
           RELEASE=18, FSYNC=20, FLUSH=25, INIT=26, OPENDIR=27, READDIR=28, RELEASEDIR=29,
           FSYNCDIR=30, CREATE=35, INTERRUPT=36, DESTROY=38, BATCH_FORGET=42, READDIRPLUS=44,
           RENAME2=45)


class Fuse:
    def __init__(self):
        self.unique = 0

    def req(self, op, node, body=b""):
        self.unique += 2
        return struct.pack("<IIQQIIIHH", 40 + len(body), OPS[op], self.unique, node, 0, 0, 1, 0, 0) + body


def cstr(s):
    return s.encode() + b"\0"


def fuse_session(f):
    """A guest mounting the share and using it: (request, reply room) pairs. Node ids are what
    a fresh share hands out: root 1, then 2, 3, ... in lookup order; file handles from 1."""
    R = []
    R.append(f.req("INIT", 0, struct.pack("<IIII", 7, 38, 131072, 0x7fffffff) + b"\0" * 48))
    R.append(f.req("GETATTR", 1, struct.pack("<IIQ", 0, 0, 0)))
    R.append(f.req("LOOKUP", 1, cstr("f")))                                 # node 2
    R.append(f.req("OPEN", 2, struct.pack("<II", os.O_RDWR, 0)))           # fh 1
    R.append(f.req("READ", 2, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0x8000, 0)))
    R.append(f.req("WRITE", 2, struct.pack("<QQIIQII", 1, 3, 5, 0, 0, 0, 0) + b"world"))
    R.append(f.req("FLUSH", 2, struct.pack("<QIIQ", 1, 0, 0, 0)))
    R.append(f.req("FSYNC", 2, struct.pack("<QII", 1, 1, 0)))
    R.append(f.req("RELEASE", 2, struct.pack("<QIIQ", 1, 0, 0, 0)))
    R.append(f.req("OPENDIR", 1, struct.pack("<II", os.O_RDONLY, 0)))      # fh 2
    R.append(f.req("READDIRPLUS", 1, struct.pack("<QQIIQII", 2, 0, 4096, 0, 0, 0, 0)))
    R.append(f.req("READDIR", 1, struct.pack("<QQIIQII", 2, 0, 4096, 0, 0, 0, 0)))
    R.append(f.req("RELEASEDIR", 1, struct.pack("<QIIQ", 2, 0, 0, 0)))
    R.append(f.req("MKDIR", 1, struct.pack("<II", 0o755, 0o22) + cstr("newdir")))   # node 3
    R.append(f.req("CREATE", 3, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0o22, 0) + cstr("new")))  # node 4, fh 3
    R.append(f.req("SETATTR", 4, struct.pack("<IIQQQQQQIIIIIIII", 1 << 3, 0, 3, 100, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0)))
    R.append(f.req("SYMLINK", 1, cstr("lnk") + cstr("newdir/new")))       # node 5
    R.append(f.req("READLINK", 5))
    R.append(f.req("LINK", 1, struct.pack("<Q", 2) + cstr("hard")))
    R.append(f.req("RENAME", 1, struct.pack("<Q", 3) + cstr("hard") + cstr("moved")))
    R.append(f.req("RENAME2", 1, struct.pack("<QII", 1, 1, 0) + cstr("lnk") + cstr("f")))
    R.append(f.req("STATFS", 1))
    R.append(f.req("UNLINK", 3, cstr("moved")))
    R.append(f.req("FORGET", 4, struct.pack("<Q", 1)))
    R.append(f.req("BATCH_FORGET", 0, struct.pack("<II", 2, 0) + struct.pack("<QQ", 2, 1) + struct.pack("<QQ", 5, 1)))
    R.append(f.req("RMDIR", 1, cstr("newdir")))
    R.append(f.req("INTERRUPT", 0, struct.pack("<Q", 4)))
    R.append(f.req("DESTROY", 0))
    return R


def fuse_stream(reqs, room=0x1000):
    # fuse_server input: u16 room/4, then the request (its header length delimits it)
    return b"".join(struct.pack("<H", room // 4) + r for r in reqs)


def fuse_seeds():
    t = "fuse_server"
    session = fuse_session(Fuse())
    write(t, "session", fuse_stream(session))
    for i, r in enumerate(session):
        op = [k for k, v in OPS.items() if v == struct.unpack_from("<I", r, 4)[0]][0]
        write(t, f"op_{i:02}_{op.lower()}", fuse_stream(session[:3] + [r]))
    f = Fuse()
    write(t, "escape_dotdot", fuse_stream([f.req("LOOKUP", 1, cstr("..")), f.req("LOOKUP", 1, cstr("out")),
                                           f.req("OPEN", 2, struct.pack("<II", os.O_RDWR, 0))]))
    write(t, "escape_symlink_parent", fuse_stream([f.req("LOOKUP", 1, cstr("parent")),
                                                   f.req("MKDIR", 2, struct.pack("<II", 0o755, 0) + cstr("x"))]))
    write(t, "slash_in_name", fuse_stream([f.req("LOOKUP", 1, cstr("d/g")), f.req("CREATE", 1, struct.pack("<IIII", 0o102, 0o644, 0, 0) + cstr("../escaped"))]))
    write(t, "fifo_open", fuse_stream([f.req("MKNOD", 1, struct.pack("<IIII", 0o10644, 0, 0, 0) + cstr("fifo")),
                                       f.req("OPEN", 2, struct.pack("<II", os.O_RDONLY, 0))]))
    write(t, "short_header", fuse_stream([f.req("GETATTR", 1)[:20]]))
    write(t, "length_lies", fuse_stream([struct.pack("<IIQQIIIHH", 4000, 3, 9, 1, 0, 0, 0, 0, 0)]))
    write(t, "unterminated_name", fuse_stream([f.req("LOOKUP", 1, b"abc")]))
    write(t, "tiny_room", fuse_stream([f.req("READDIRPLUS", 1, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0))], room=8))
    write(t, "unknown_op", fuse_stream([struct.pack("<IIQQIIIHH", 40, 9999, 1, 1, 0, 0, 0, 0, 0)]))
    write(t, "write_size_lies", fuse_stream(session[:4] + [f.req("WRITE", 2, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0) + b"ab")]))
    write(t, "huge_offset_write", fuse_stream(session[:4] + [f.req("WRITE", 2, struct.pack("<QQIIQII", 1, 1 << 62, 2, 0, 0, 0, 0) + b"ab")]))

    # the same requests through the device's virtqueues: hiprio queue 0, request queue 1
    t = "virtio_fs"
    f = Fuse()
    sess = fuse_session(f)
    for i in range(0, len(sess), 6):
        chains = [chain(1, desc(r), desc(write_len=4096)) for r in sess[i:i + 6]]
        write(t, f"session_{i // 6}", queues(*chains))
    write(t, "forget_hiprio", queues(chain(0, desc(f.req("FORGET", 1, struct.pack("<Q", 1))))))
    rd = f.req("READ", 2, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0x8000, 0))
    write(t, "zero_copy_read", queues(chain(1, desc(sess[2])), chain(1, desc(sess[3]), desc(write_len=32)),
                                      chain(1, desc(rd), desc(write_len=16), desc(write_len=4096))))
    wr = f.req("WRITE", 2, struct.pack("<QQIIQII", 1, 0, 6, 0, 0, 0, 0))
    wr = struct.pack("<I", len(wr) + 6) + wr[4:]
    write(t, "zero_copy_write", queues(chain(1, desc(sess[2])), chain(1, desc(sess[3]), desc(write_len=32)),
                                       chain(1, desc(wr), desc(b"split!"), desc(write_len=24))))
    write(t, "no_reply_room", queues(chain(1, desc(sess[1]))))


# ---- vsock muxer ops (vmm/src/fuzzing.rs vsock_muxer)
def mux_pkt(h, payload=b"", flood=0):
    # op 0: flood byte, header selector 2 (explicit ports), then fields
    src_cid, dst_cid, sp, dp, _len, typ, op, flags, ba, fc = struct.unpack("<QQIIIHHIII", h)
    odd = 0
    if src_cid != GUEST_CID:
        odd |= 1
    if dst_cid != HOST_CID:
        odd |= 2
    if typ != 1:
        odd |= 4
    return (bytes([0, flood, 2]) + struct.pack("<II", sp, dp) + bytes([odd, op, flags])
            + struct.pack("<II", ba, fc) + struct.pack("<H", len(payload)) + payload)


def mux_seen_pkt(op, idx=0, payload=b"", ba=262144, fc=0, flags=0):
    # selector 0: aim at the (idx)th host-initiated connection the guest has seen
    return (bytes([0, 0, (idx << 2) | 0]) + bytes([0, op, flags]) + struct.pack("<II", ba, fc)
            + struct.pack("<H", len(payload)) + payload)


def mux_connect(line):
    return bytes([2, len(line)]) + line


def mux_recv(k=8, room=4096):
    return bytes([6, k]) + struct.pack("<H", room)


def mux_host_write(i, data):
    return bytes([3, i]) + struct.pack("<H", len(data)) + data


def mux_service(port_off=0):
    return bytes([5, port_off])


def mux_seeds():
    t = "vsock_muxer"
    write(t, "host_connect_accept_data",
          mux_connect(b"CONNECT 52\n") + bytes([8]) + mux_recv() + mux_seen_pkt(OP_RESPONSE)
          + bytes([7]) + mux_host_write(0, b"ping") + bytes([8]) + mux_recv()
          + mux_seen_pkt(OP_RW, payload=b"pong") + bytes([7]) + mux_seen_pkt(OP_SHUTDOWN, flags=3) + mux_recv())
    write(t, "host_connect_refused", mux_connect(b"CONNECT 52\n") + bytes([8]) + mux_recv() + mux_seen_pkt(OP_RST))
    write(t, "host_connect_early_data", mux_connect(b"CONNECT 1024\nearly") + bytes([8]) + mux_recv()
          + mux_seen_pkt(OP_RESPONSE, ba=4) + mux_recv() + mux_seen_pkt(OP_CREDIT_UPDATE, ba=4, fc=4) + mux_recv())
    write(t, "host_half_close", mux_connect(b"CONNECT 60\n") + bytes([8]) + mux_recv() + mux_seen_pkt(OP_RESPONSE)
          + bytes([4, 0, 2]) + bytes([8]) + mux_recv() + mux_seen_pkt(OP_SHUTDOWN, flags=2) + mux_recv())
    write(t, "host_vanishes", mux_connect(b"CONNECT 61\n") + bytes([8]) + mux_recv() + mux_seen_pkt(OP_RESPONSE)
          + bytes([4, 0, 0]) + bytes([8]) + mux_recv() + mux_seen_pkt(OP_RST))
    for i, line in enumerate([b"CONNECT x\n", b"HELLO 5\n", b"A" * 40, b"CONNECT 4294967296\n",
                              b"CONNECT 5", b"CONNECT  7 \n", b"\n", b"CONNECT -1\n", b"CONNECT 0x10\n"]):
        write(t, f"connect_line_{i}", mux_connect(line) + bytes([8, 8]) + mux_recv())
    write(t, "guest_connect_refused", mux_pkt(vsock_hdr(1025, 99, OP_REQUEST)) + mux_recv())
    write(t, "guest_connect_service", mux_service(0) + mux_pkt(vsock_hdr(1025, 1024, OP_REQUEST)) + mux_recv()
          + mux_service(0) + mux_pkt(vsock_hdr(1025, 1024, OP_RW, 5), b"hello")
          + mux_host_write(0, b"back") + bytes([8]) + mux_recv()
          + mux_pkt(vsock_hdr(1025, 1024, OP_REQUEST)) + mux_recv())
    write(t, "guest_overruns_credit", mux_service(1) + mux_pkt(vsock_hdr(1025, 1025, OP_REQUEST))
          + b"".join(mux_pkt(vsock_hdr(1025, 1025, OP_RW, 4000), b"z" * 4000) for _ in range(70)) + mux_recv())
    write(t, "spoofed_and_bad_type", mux_pkt(vsock_hdr(1, 2, OP_RW, src_cid=7), b"x")
          + mux_pkt(vsock_hdr(1, 2, OP_RW, type_=2), b"x") + mux_pkt(vsock_hdr(1, 2, OP_RST)) + mux_recv())
    write(t, "unknown_op", mux_service(0) + mux_pkt(vsock_hdr(1025, 1024, OP_REQUEST)) + mux_pkt(vsock_hdr(1025, 1024, 8)) + mux_recv())
    write(t, "credit_request", mux_service(0) + mux_pkt(vsock_hdr(1025, 1024, OP_REQUEST))
          + mux_pkt(vsock_hdr(1025, 1024, OP_CREDIT_REQUEST)) + mux_recv())
    write(t, "zero_room", mux_connect(b"CONNECT 5\nabc") + bytes([8]) + mux_recv(room=0) + mux_seen_pkt(OP_RESPONSE) + mux_recv(room=0))
    write(t, "rst_flood_small", mux_pkt(vsock_hdr(1, 2, OP_RW), flood=0x81) + mux_recv(15, 0))


if __name__ == "__main__":
    vsock_seeds()
    blk_seeds()
    net_seeds()
    fuse_seeds()
    mux_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print(t, len(os.listdir(os.path.join(CORPUS, t))))
