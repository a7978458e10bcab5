"""Canonical Huffman coding of small non-negative integers, and relative index coding.

The last two storage tricks of Deep Compression (Han, Mao & Dally, "Deep Compression",
ICLR 2016): a sparse layer stores the *gaps* between its nonzero weights instead of their
absolute positions (relative index coding, a few bits per entry), and both those gaps and the
cluster indices of `compress.cluster` are far from uniformly distributed, so a Huffman code
stores them in fewer bits than their fixed width (the paper saves 20-30% this way).

Pure numpy/python, no third-party codec. Symbols are integers in 0–65535; arrays are coded
flat (the shape is the caller's to keep).

`encode` writes a self-describing stream (integers little-endian)::

    offset   size        field
    0        4           magic b"JXHF"
    4        1           version (1)
    5        8           n: number of symbols (uint64)
    13       4           A: alphabet size = largest symbol + 1; 0 when n == 0 (uint32)
    17       A           code length of each symbol 0..A-1 (uint8; 0 = symbol absent)
    17+A     8           B: payload bits (uint64)
    25+A     ceil(B/8)   payload: the n codes back to back, most significant bit first,
                         the last byte padded with zero bits
    end-4    4           CRC-32 (``zlib.crc32``) of every byte before it (uint32)

The code is canonical: symbols sorted by (code length, symbol) get consecutive codes, each
shifted left when the length grows, so the length table alone defines it. `decode` checks the
magic, the CRC-32 (which catches every error burst of up to 32 bits, so any changed byte), the
sizes (so any truncation or extension) and that the codes consume exactly B bits; anything
off raises ``ValueError("huffman stream corrupted/truncated: ...")``.

Relative index coding (`relative_positions` / `absolute_positions`), with
``M = 2**index_bits - 1``: walking the flat mask from position -1, each stored entry holds
``d`` in 0..M.

* ``d < M``: a nonzero weight ``d + 1`` positions after the previous entry (``d`` zeros
  skipped);
* ``d == M``: a *filler* (the paper's padding zero): a zero weight stored ``M`` positions
  after the previous entry, used when the gap is too long for one entry.

A gap of ``g`` zeros before a nonzero is thus ``g // M`` fillers and one entry
``g - M * (g // M)``. Fillers are the entries equal to M; the weight array that goes with the
entries stores a zero for each (``weights[diffs != M]`` are the real ones, in position order).
Zeros after the last nonzero are not stored: `absolute_positions` takes the size.
"""
from __future__ import annotations

import heapq
import numbers
import struct
import zlib
from typing import Any

import numpy as np

MAGIC = b"JXHF"
VERSION = 1
MAX_ALPHABET = 1 << 16  # symbols 0..65535
_HEAD = struct.Struct("<4sBQI")  # magic, version, n, A
_BITS = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_MIN_STREAM = _HEAD.size + _BITS.size + _CRC.size
_MAX_LEN = 57  # longest code a 64-bit window read at any bit offset holds (never reached:
#               Huffman needs over 10**11 symbols for a 57-bit code)
_SYMBOL_CHUNK = 1 << 16
_BIT_CHUNK = 1 << 18


# --------------------------------------------------------------------------- the code


def _check_symbols(symbols: Any) -> np.ndarray:
    """``symbols`` flat as int64, each in 0..MAX_ALPHABET-1, else a one-line ValueError."""
    s = np.asarray(symbols)
    if s.size == 0:
        return np.zeros(0, np.int64)
    if s.dtype.kind not in "iu":
        raise ValueError(f"invalid symbols dtype={s.dtype}; valid: integers in "
                         f"0–{MAX_ALPHABET - 1}")
    lo, hi = s.min(), s.max()
    if lo < 0 or hi >= MAX_ALPHABET:
        bad = lo if lo < 0 else hi
        raise ValueError(f"invalid symbol {int(bad)}; valid: integers in 0–{MAX_ALPHABET - 1}")
    return s.reshape(-1).astype(np.int64)


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol from its count (0 for an absent symbol; a lone
    symbol gets 1 bit). Ties merge the earlier-created node first, so this is deterministic."""
    lengths = np.zeros(counts.size, np.int64)
    present = np.flatnonzero(counts)
    m = present.size
    if m <= 1:
        lengths[present] = 1
        return lengths
    heap = [(int(counts[s]), i) for i, s in enumerate(present)]  # (weight, node); leaves 0..m-1
    heapq.heapify(heap)
    parent = [0] * (2 * m - 1)
    node = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * m - 1)  # a parent is created after its children: fill from the root
    for i in range(2 * m - 3, -1, -1):
        depth[i] = depth[parent[i]] + 1
    lengths[present] = depth[:m]
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint64) of each symbol with a nonzero length."""
    codes = np.zeros(lengths.size, np.uint64)
    present = np.flatnonzero(lengths)
    code, prev = -1, 0
    for sym in present[np.lexsort((present, lengths[present]))].tolist():
        length = int(lengths[sym])
        code = (code + 1) << (length - prev)
        codes[sym] = code
        prev = length
    return codes


def _counts_and_lengths(symbols: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _check_symbols(symbols)
    counts = np.bincount(s) if s.size else np.zeros(0, np.int64)
    return s, counts, _code_lengths(counts)


def build_code(symbols: Any) -> dict[int, tuple[int, int]]:
    """The canonical Huffman code of ``symbols`` (an array of integers in 0–65535), built from
    their counts: ``{symbol: (code, length)}`` for each distinct symbol, the code read as a
    ``length``-bit number. A single distinct symbol gets the 1-bit code 0; no symbols, ``{}``."""
    _, _, lengths = _counts_and_lengths(symbols)
    codes = _canonical_codes(lengths)
    return {int(s): (int(codes[s]), int(lengths[s])) for s in np.flatnonzero(lengths)}


def coded_bits(symbols: Any) -> int:
    """Payload bits of ``symbols`` under their own Huffman code, for size reports. The stream
    of `encode` is ``29 + A + ceil(bits / 8)`` bytes (A = largest symbol + 1; 0 if empty)."""
    _, counts, lengths = _counts_and_lengths(symbols)
    return int((counts * lengths).sum())


# --------------------------------------------------------------------------- the stream


def _pack(s: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """The codes of ``s`` back to back, most significant bit first, zero-padded to bytes."""
    out = []
    carry = np.zeros(0, np.uint8)
    for a in range(0, s.size, _SYMBOL_CHUNK):
        sym = s[a:a + _SYMBOL_CHUNK]
        ln, cd = lengths[sym], codes[sym]
        owner = np.repeat(np.arange(sym.size), ln)
        within = np.arange(owner.size) - (np.cumsum(ln) - ln)[owner]
        shift = (ln[owner] - 1 - within).astype(np.uint64)
        bits = np.concatenate([carry, ((cd[owner] >> shift) & np.uint64(1)).astype(np.uint8)])
        cut = bits.size - bits.size % 8
        out.append(np.packbits(bits[:cut]).tobytes())
        carry = bits[cut:]
    out.append(np.packbits(carry).tobytes())
    return b"".join(out)


def encode(symbols: Any) -> bytes:
    """``symbols`` (integers in 0–65535, any shape, coded flat) as a self-describing
    Huffman stream (format in the module docstring)."""
    s, counts, lengths = _counts_and_lengths(symbols)
    if lengths.size and lengths.max() > _MAX_LEN:
        raise ValueError(f"a code of {lengths.max()} bits; valid: at most {_MAX_LEN}")
    payload = _pack(s, _canonical_codes(lengths), lengths)
    bits = int((counts * lengths).sum())
    body = b"".join([_HEAD.pack(MAGIC, VERSION, s.size, lengths.size),
                     lengths.astype(np.uint8).tobytes(), _BITS.pack(bits), payload])
    return body + _CRC.pack(zlib.crc32(body))


def _corrupt(reason: str) -> ValueError:
    return ValueError(f"huffman stream corrupted/truncated: {reason}")


class _Decoder:
    """Canonical decoding tables from a code-length table; rejects lengths that do not form
    the complete prefix code a Huffman code is (or the 1-bit code of a lone symbol)."""

    def __init__(self, lengths: np.ndarray):
        present = np.flatnonzero(lengths)
        if present.size == 0:
            raise _corrupt("no symbol has a code")
        ln = lengths[present]
        order = np.lexsort((present, ln))
        self.symbols = present[order].astype(np.int32)
        self.max_len = top = int(ln.max())
        if top > _MAX_LEN:
            raise _corrupt(f"a code of {top} bits")
        count = np.bincount(ln, minlength=top + 1).tolist()
        kraft = sum(count[n] << (top - n) for n in range(1, top + 1))
        if (present.size == 1 and top != 1) or (present.size > 1 and kraft != 1 << top):
            raise _corrupt("the code lengths are not a complete prefix code")
        first, offset, limit = [0] * (top + 1), [0] * (top + 1), []
        code = off = 0
        for n in range(1, top + 1):
            first[n], offset[n] = code, off
            limit.append((code + count[n]) << (top - n))  # left-aligned end of length n
            code, off = (code + count[n]) << 1, off + count[n]
        self.first = np.array(first, np.int64)
        self.offset = np.array(offset, np.int64)
        self.limit = np.array(limit, np.uint64)

    def windows(self, data: np.ndarray, a: int, e: int) -> np.ndarray:
        """The max_len bits starting at each bit position a..e-1 of ``data`` (zero-padded
        by at least 8 bytes), as uint64."""
        pos = np.arange(a, e, dtype=np.int64)
        b0, b1 = a >> 3, ((e - 1) >> 3) + 1
        word = np.zeros(b1 - b0, np.uint64)
        for k in range(8):
            word |= data[b0 + k:b1 + k].astype(np.uint64) << np.uint64(56 - 8 * k)
        aligned = word[(pos >> 3) - b0] << (pos & 7).astype(np.uint64)
        return aligned >> np.uint64(64 - self.max_len)

    def decode(self, payload: bytes, bits: int, n: int) -> np.ndarray:
        out = np.empty(n, np.int32)
        data = np.frombuffer(payload + bytes(8), np.uint8)
        done = p = 0
        for a in range(0, bits, _BIT_CHUNK):
            e = min(a + _BIT_CHUNK, bits)
            w = self.windows(data, a, e)
            ln = np.searchsorted(self.limit, w, side="right") + 1  # max_len + 1: no code
            step, starts = ln.tolist(), []
            while p < e:  # the codes starting in this chunk, one after the other
                starts.append(p)
                p += step[p - a]
            if done + len(starts) > n:
                raise _corrupt(f"more than the {n} symbols the header gives")
            at = np.array(starts, np.int64) - a
            ln = ln[at]
            if (ln > self.max_len).any():
                raise _corrupt("a bit pattern that is no code")
            value = (w[at] >> (self.max_len - ln).astype(np.uint64)).astype(np.int64)
            out[done:done + at.size] = self.symbols[self.offset[ln] + value - self.first[ln]]
            done += at.size
        if done != n or p != bits:
            raise _corrupt(f"{done} symbols in {p} bits; the header gives {n} in {bits}")
        return out


def decode(stream: bytes | bytearray | memoryview) -> np.ndarray:
    """The symbols of an `encode` stream, as a flat int32 array. Raises
    ``ValueError("huffman stream corrupted/truncated: ...")`` when the magic, version,
    checksum, sizes or codes are not exactly those `encode` writes."""
    if not isinstance(stream, (bytes, bytearray, memoryview)):
        raise TypeError(f"stream must be bytes, got {type(stream).__name__}")
    buf = bytes(stream)
    if len(buf) < _MIN_STREAM:
        raise _corrupt(f"{len(buf)} bytes, less than the {_MIN_STREAM} of an empty stream")
    if buf[:4] != MAGIC:
        raise _corrupt(f"magic {buf[:4]!r}, expected {MAGIC!r}")
    body = buf[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack(buf[-_CRC.size:])[0]:
        raise _corrupt("CRC-32 mismatch")
    _, version, n, alphabet = _HEAD.unpack_from(buf)
    if version != VERSION:
        raise _corrupt(f"version {version}, expected {VERSION}")
    start = _HEAD.size + alphabet  # payload bit count
    if alphabet > MAX_ALPHABET or start + _BITS.size > len(body):
        raise _corrupt(f"a code-length table of {alphabet} entries")
    lengths = np.frombuffer(body, np.uint8, alphabet, _HEAD.size).astype(np.int64)
    (bits,) = _BITS.unpack_from(body, start)
    payload = body[start + _BITS.size:]
    if len(payload) != -(-bits // 8):
        raise _corrupt(f"{len(payload)} payload bytes for {bits} bits")
    if n == 0:
        if alphabet or bits:
            raise _corrupt("a code table or payload for zero symbols")
        return np.zeros(0, np.int32)
    if bits % 8 and payload[-1] & ((1 << (8 - bits % 8)) - 1):
        raise _corrupt("nonzero padding bits")
    if not n <= bits <= n * _MAX_LEN:
        raise _corrupt(f"{n} symbols in {bits} bits")
    return _Decoder(lengths).decode(payload, bits, n)


# --------------------------------------------------------------------------- relative indices


def _check_index_bits(index_bits: Any) -> int:
    ok = isinstance(index_bits, numbers.Integral) and not isinstance(index_bits, (bool, np.bool_))
    if not ok or not 1 <= index_bits <= 16:
        raise ValueError(f"invalid index_bits={index_bits!r}; valid: an int in 1–16")
    return int(index_bits)


def relative_positions(mask_flat: np.ndarray, *, index_bits: int = 8) -> np.ndarray:
    """Relative index coding of the True positions of a flat bool mask: int32 entries in
    0..2**index_bits-1, one per nonzero plus the fillers long gaps need (the convention is in
    the module docstring). An all-False or empty mask gives no entries."""
    top = (1 << _check_index_bits(index_bits)) - 1
    m = np.asarray(mask_flat)
    if m.dtype != np.bool_ or m.ndim != 1:
        raise ValueError(f"invalid mask_flat (dtype={m.dtype}, shape={m.shape}); "
                         "valid: a 1-D bool array")
    pos = np.flatnonzero(m)
    gaps = np.diff(pos, prepend=-1) - 1  # zeros before each nonzero
    fillers = gaps // top
    out = np.full(pos.size + int(fillers.sum()), top, np.int32)
    out[np.cumsum(fillers) + np.arange(pos.size)] = gaps - fillers * top
    return out


def absolute_positions(diffs: np.ndarray, size: int, *, index_bits: int = 8) -> np.ndarray:
    """The flat bool mask of length ``size`` that `relative_positions` coded as ``diffs``
    (True at the nonzero positions; ``np.flatnonzero`` of it gives them). Raises ValueError
    for an entry outside 0..2**index_bits-1 or one past ``size``."""
    top = (1 << _check_index_bits(index_bits)) - 1
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 0:
        raise ValueError(f"invalid size={size!r}; valid: an int >= 0")
    d = np.asarray(diffs)
    mask = np.zeros(int(size), bool)
    if d.size == 0:
        return mask
    if d.dtype.kind not in "iu" or d.ndim != 1:
        raise ValueError(f"invalid diffs (dtype={d.dtype}, shape={d.shape}); "
                         "valid: a 1-D integer array")
    if d.min() < 0 or d.max() > top:
        bad = d.min() if d.min() < 0 else d.max()
        raise ValueError(f"invalid entry {int(bad)}; valid: 0–{top} for index_bits={index_bits}")
    d = d.astype(np.int64)
    filler = d == top
    pos = np.cumsum(np.where(filler, top, d + 1)) - 1
    if pos[-1] >= size:
        raise ValueError(f"the entries reach position {int(pos[-1])}; valid: below size={size}")
    mask[pos[~filler]] = True
    return mask
