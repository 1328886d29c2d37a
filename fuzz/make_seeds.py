#!/usr/bin/env python3
"""Writes well-formed server conversations for the `replies` fuzz target into DIR (default
fuzz/corpus/replies), so the fuzzer starts past the handshake instead of guessing magic numbers.

Each seed answers exactly what fuzz_targets/replies.rs asks, in its order, as a server would:
one setting byte, then the greeting, option replies and command replies (cookies count from 1).
"""

import os
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT, REP_ERR_UNSUP = 1, 3, 4, (1 << 31) | 1
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES = 1, 4, 64
DONE = 1
NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR = 0, 1, 2, 5, (1 << 15) | 1
SIZE = 1 << 20


def option_reply(option, kind, data=b""):
    return struct.pack(">QIII", REP_MAGIC, option, kind, len(data)) + data


def chunk(flags, kind, cookie, payload=b""):
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, cookie, len(payload)) + payload


def data(cookie, offset, length, flags=DONE):
    return chunk(flags, OFFSET_DATA, cookie, struct.pack(">Q", offset) + bytes([0xAB]) * length)


def hole(cookie, offset, length, flags=DONE):
    return chunk(flags, OFFSET_HOLE, cookie, struct.pack(">QI", offset, length))


def simple(cookie, error=0, payload=b""):
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie) + payload


def handshake(structured, context, max_block):
    out = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    out += option_reply(OPT_STRUCTURED_REPLY, REP_ACK if structured else REP_ERR_UNSUP)
    if context:
        name = b"base:allocation"
        out += option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", 1) + name)
        out += option_reply(OPT_SET_META_CONTEXT, REP_ACK)
    flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES
    out += option_reply(OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, SIZE, flags))
    out += option_reply(OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, max_block))
    return out + option_reply(OPT_GO, REP_ACK)


def structured_conversation():
    """Eight in flight, 4 KiB maximum block; replies out of order, split, with holes and errors."""
    out = bytes([1 | (7 << 2)]) + handshake(True, True, 4096)
    # read_at(0, 8192): cookies 1 and 2.
    out += data(2, 4096, 4096) + data(1, 0, 2048, flags=0) + hole(1, 2048, 2048)
    # read_vectored_at(0, [1000, 0, 5000]): cookies 3 (0+1000), 4 (1000+4096), 5 (5096+904).
    out += hole(5, 5096, 904) + data(3, 0, 1000) + data(4, 1000, 4096)
    # block_status(0, 1 MiB): cookie 6, two extents.
    descriptors = struct.pack(">III", 1, 65536, 0) + struct.pack(">II", SIZE - 65536, 3)
    out += chunk(0, BLOCK_STATUS, 6, descriptors) + chunk(DONE, NONE, 6)
    # write_at(0, 4096): cookie 7; write_zeroes(0, 8192): cookie 8, refused; flush: cookie 9.
    out += simple(7)
    out += chunk(DONE, ERROR, 8, struct.pack(">IH", 28, 4) + b"full")
    return out + chunk(DONE, NONE, 9)


def simple_conversation():
    """Structured replies refused: simple replies carrying data, one at a time."""
    out = bytes([0]) + handshake(False, False, 1 << 25)
    out += simple(1, payload=bytes(8192))
    out += simple(2, payload=bytes(1000)) + simple(3, payload=bytes(5000))
    return out + simple(4) + simple(5) + simple(6)


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "replies")
    os.makedirs(target, exist_ok=True)
    for name, seed in [("structured", structured_conversation()), ("simple", simple_conversation())]:
        with open(os.path.join(target, "seed-" + name), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    main()
