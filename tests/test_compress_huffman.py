"""Tests for jaxaccel.compress.huffman: round trips, optimality, prefix-freeness, corruption,
relative index coding."""
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxaccel.compress import huffman

SETTINGS = settings(max_examples=60, deadline=None)
HEADER = 4 + 1 + 8 + 4  # magic, version, n, alphabet size
TRAILER = 8 + 4  # payload bits before the payload, CRC-32 after it


@st.composite
def symbol_arrays(draw):
    """Random symbol arrays: empty, one symbol repeated, uniform, or skewed (geometric)."""
    kind = draw(st.sampled_from(["list", "single", "skewed", "wide"]))
    n = draw(st.integers(0, 300))
    if kind == "list":
        return np.array(draw(st.lists(st.integers(0, 20), max_size=60)), np.int64)
    if kind == "single":
        return np.full(n, draw(st.integers(0, 65535)), np.int32)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if kind == "skewed":
        return np.minimum(rng.geometric(draw(st.floats(0.05, 0.95)), n) - 1, 255).astype(np.uint8)
    return rng.integers(0, 65536, n).astype(np.uint16)


def entropy_bits(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@SETTINGS
@given(symbol_arrays())
def test_round_trip_is_exact(symbols):
    stream = huffman.encode(symbols)
    out = huffman.decode(stream)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, symbols.ravel())
    alphabet = int(symbols.max()) + 1 if symbols.size else 0
    bits = huffman.coded_bits(symbols)
    assert len(stream) == HEADER + alphabet + TRAILER + -(-bits // 8)
    assert struct.unpack_from("<Q", stream, HEADER + alphabet)[0] == bits


def test_round_trip_2d_list_bytearray_and_large():
    assert huffman.decode(bytearray(huffman.encode([[1, 2], [2, 2]]))).tolist() == [1, 2, 2, 2]
    rng = np.random.default_rng(0)
    big = np.minimum(rng.geometric(0.3, 300_000) - 1, 255)  # spans several decode chunks
    np.testing.assert_array_equal(huffman.decode(huffman.encode(big)), big)


def test_empty_and_single_symbol():
    assert huffman.build_code([]) == {}
    assert huffman.coded_bits([]) == 0
    assert huffman.decode(huffman.encode([])).shape == (0,)
    assert huffman.decode(huffman.encode(np.zeros(0, np.int32))).dtype == np.int32
    assert huffman.build_code([7, 7, 7]) == {7: (0, 1)}
    assert huffman.coded_bits(np.full(13, 7)) == 13
    np.testing.assert_array_equal(huffman.decode(huffman.encode([7] * 13)), [7] * 13)


def test_known_code():
    # counts 0:1, 1:1, 2:2, 3:4 -> lengths 3, 3, 2, 1; canonical by (length, symbol)
    code = huffman.build_code([0, 1, 2, 2, 3, 3, 3, 3])
    assert code == {3: (0b0, 1), 2: (0b10, 2), 0: (0b110, 3), 1: (0b111, 3)}


def test_average_length_within_entropy_plus_one():
    rng = np.random.default_rng(1)
    for p in (0.1, 0.3, 0.6, 0.9):
        symbols = np.minimum(rng.geometric(p, 20_000) - 1, 31)
        avg = huffman.coded_bits(symbols) / symbols.size
        h = entropy_bits(symbols)
        assert h <= avg <= h + 1
        assert avg < 5  # better than the 5-bit fixed width
    # a dyadic distribution is coded at exactly its entropy
    dyadic = np.repeat([0, 1, 2, 3], [8, 4, 2, 2])
    assert huffman.coded_bits(dyadic) == entropy_bits(dyadic) * dyadic.size == 28


@SETTINGS
@given(symbol_arrays())
def test_code_is_canonical_and_prefix_free(symbols):
    code = huffman.build_code(symbols)
    assert set(code) == set(np.unique(symbols).tolist())
    words = [format(c, f"0{n}b") for c, n in code.values()]
    assert all(len(w) == n for w, (_, n) in zip(words, code.values()))
    for i, a in enumerate(words):
        for b in words[i + 1:]:
            assert not a.startswith(b) and not b.startswith(a)
    if len(code) > 1:  # complete: Kraft sum exactly 1
        assert sum(2.0 ** -n for _, n in code.values()) == 1.0
    # canonical: in (length, symbol) order the codes, left-aligned, strictly increase
    order = sorted(code, key=lambda s: (code[s][1], s))
    longest = max((n for _, n in code.values()), default=0)
    aligned = [code[s][0] << (longest - code[s][1]) for s in order]
    assert aligned == sorted(set(aligned))


def _flipped(stream, pos, xor):
    b = bytearray(stream)
    b[pos] ^= xor
    return bytes(b)


def test_every_flipped_byte_and_truncation_raises():
    symbols = np.array([0, 1, 1, 2, 2, 2, 2, 5, 0, 0, 3, 1, 2, 2, 4] * 5)
    stream = huffman.encode(symbols)
    for pos in range(len(stream)):
        for xor in (0x01, 0x80, 0xFF):
            with pytest.raises(ValueError, match="corrupted/truncated"):
                huffman.decode(_flipped(stream, pos, xor))
    for cut in range(len(stream)):
        with pytest.raises(ValueError, match="corrupted/truncated"):
            huffman.decode(stream[:cut])
    with pytest.raises(ValueError, match="corrupted/truncated"):
        huffman.decode(stream + b"\x00")


@SETTINGS
@given(symbol_arrays(), st.data())
def test_random_damage_raises(symbols, data):
    stream = huffman.encode(symbols)
    pos = data.draw(st.integers(0, len(stream) - 1))
    xor = data.draw(st.integers(1, 255))
    with pytest.raises(ValueError, match="corrupted/truncated"):
        huffman.decode(_flipped(stream, pos, xor))
    with pytest.raises(ValueError, match="corrupted/truncated"):
        huffman.decode(stream[:data.draw(st.integers(0, len(stream) - 1))])


def _resealed(body):
    return body + struct.pack("<I", zlib.crc32(body))


def test_well_sealed_but_inconsistent_streams_raise():
    """Streams with a valid CRC-32 but a header that does not fit the payload."""
    stream = huffman.encode([0, 1, 1, 2])  # lengths 2, 1, 2: 6 payload bits
    body = bytearray(stream[:-4])
    alphabet = 3
    cases = []
    b = bytearray(body)
    b[4] = 2  # unknown version
    cases.append(b)
    b = bytearray(body)
    struct.pack_into("<Q", b, 5, 5)  # one symbol too many
    cases.append(b)
    b = bytearray(body)
    struct.pack_into("<Q", b, 5, 3)  # one too few: bits left over
    cases.append(b)
    b = bytearray(body)
    b[HEADER + 1] = 2  # lengths 2, 2, 2: not a complete prefix code
    cases.append(b)
    b = bytearray(body)
    struct.pack_into("<Q", b, HEADER + alphabet, 7)  # payload bits
    cases.append(b)
    b = bytearray(body)
    b[-1] |= 0x01  # a padding bit set
    cases.append(b)
    for case in cases:
        with pytest.raises(ValueError, match="corrupted/truncated"):
            huffman.decode(_resealed(bytes(case)))
    assert huffman.decode(_resealed(bytes(body))).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("bad, match", [([-1, 2], "symbol -1"), ([65536], "symbol 65536"),
                                        ([0.5, 1.0], "dtype=float64")])
def test_bad_symbols(bad, match):
    for fn in (huffman.encode, huffman.build_code, huffman.coded_bits):
        with pytest.raises(ValueError, match=rf"{match}.*0–65535"):
            fn(bad)


def test_decode_rejects_non_bytes():
    with pytest.raises(TypeError):
        huffman.decode("JXHF")


# --------------------------------------------------------------------------- relative indices


@SETTINGS
@given(st.lists(st.booleans(), max_size=400), st.integers(1, 10), st.floats(0.0, 1.0))
def test_relative_index_round_trip(bits, index_bits, density):
    mask = np.array(bits, bool)
    if density < 0.3:  # sparse masks, so long gaps
        mask &= np.random.default_rng(len(bits)).random(mask.size) < density
    diffs = huffman.relative_positions(mask, index_bits=index_bits)
    top = 2 ** index_bits - 1
    assert diffs.dtype == np.int32 and np.all((diffs >= 0) & (diffs <= top))
    assert np.count_nonzero(diffs != top) == np.count_nonzero(mask)
    back = huffman.absolute_positions(diffs, mask.size, index_bits=index_bits)
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_array_equal(huffman.decode(huffman.encode(diffs)), diffs)


def test_relative_index_long_gaps_use_fillers():
    mask = np.zeros(1001, bool)
    mask[[0, 1000]] = True
    diffs = huffman.relative_positions(mask)  # 999 zeros between: 3 fillers of 255, then 234
    np.testing.assert_array_equal(diffs, [0, 255, 255, 255, 234])
    np.testing.assert_array_equal(huffman.absolute_positions(diffs, 1001), mask)
    # the paper's 3-bit example shape: gaps of exactly M, M + 1, 2M zeros
    mask = np.zeros(40, bool)
    mask[[7, 15, 30]] = True  # 7, 7 and 14 zeros before them; M = 7
    diffs = huffman.relative_positions(mask, index_bits=3)
    np.testing.assert_array_equal(diffs, [7, 0, 7, 0, 7, 7, 0])
    np.testing.assert_array_equal(huffman.absolute_positions(diffs, 40, index_bits=3), mask)
    mask = np.zeros(10_000, bool)
    mask[9_999] = True
    diffs = huffman.relative_positions(mask, index_bits=1)  # every zero is a filler
    assert diffs.tolist() == [1] * 9_999 + [0]
    np.testing.assert_array_equal(huffman.absolute_positions(diffs, 10_000, index_bits=1), mask)


def test_relative_index_empty_and_all_false():
    assert huffman.relative_positions(np.zeros(0, bool)).size == 0
    assert huffman.relative_positions(np.zeros(500, bool)).size == 0  # trailing zeros not stored
    assert not huffman.absolute_positions([], 500).any()
    assert huffman.absolute_positions(np.zeros(0, np.int32), 0).shape == (0,)


def test_relative_index_errors():
    with pytest.raises(ValueError, match="index_bits=0.*1–16"):
        huffman.relative_positions(np.ones(3, bool), index_bits=0)
    with pytest.raises(ValueError, match="index_bits=17"):
        huffman.absolute_positions([0], 3, index_bits=17)
    with pytest.raises(ValueError, match="mask_flat.*shape=\\(2, 2\\)"):
        huffman.relative_positions(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="mask_flat.*dtype=int64"):
        huffman.relative_positions(np.ones(3, np.int64))
    with pytest.raises(ValueError, match="entry 8.*0–7"):
        huffman.absolute_positions([0, 8], 20, index_bits=3)
    with pytest.raises(ValueError, match="entry -1"):
        huffman.absolute_positions([-1], 20)
    with pytest.raises(ValueError, match="position 5.*size=5"):
        huffman.absolute_positions([0, 4], 5)
    with pytest.raises(ValueError, match="size=-1"):
        huffman.absolute_positions([0], -1)
