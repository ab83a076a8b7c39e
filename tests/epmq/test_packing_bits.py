"""GPTQ bit packing for 2, 3, 4 and 8 bits, checked against a bit stream built with Python
integers (an independent model of the layout), and against the int4 Triton/torch packer."""

import pytest
import torch

from epmq.packing import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


def column_stream(codes_column, bits):
    """The column as one little-endian integer: code k at bits [bits*k, bits*(k+1))."""
    return sum(int(c) << (bits * k) for k, c in enumerate(codes_column))


def words_stream(words_column):
    return sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words_column))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("K", [64, 96, 10])
def test_rows_are_one_little_endian_bit_stream(bits, K, gen):
    codes = torch.randint(0, 2**bits, (K, 5), generator=gen)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_length(K, bits), 5)
    for n in range(5):
        assert words_stream(packed[:, n]) == column_stream(codes[:, n], bits)
    assert torch.equal(unpack_rows(packed, bits, K), codes.int())


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_power_of_two_widths_are_the_qweight_layout(bits, gen):
    per_word = 32 // bits
    codes = torch.randint(0, 2**bits, (4 * per_word, 3), generator=gen)
    packed = pack_rows(codes, bits).to(torch.int64) & 0xFFFFFFFF
    for k in range(codes.shape[0]):
        got = (packed[k // per_word] >> (bits * (k % per_word))) & (2**bits - 1)
        assert torch.equal(got, codes[k])


def test_three_bits_pack_32_rows_into_3_words_across_boundaries():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10], codes[21] = 0b101, 0b110  # the two rows that straddle words
    words = [int(w) & 0xFFFFFFFF for w in pack_rows(codes, 3)[:, 0]]
    assert len(words) == 3
    # row 10: bits 30..32 -> low two bits at 30, 31 of word 0, high bit at bit 0 of word 1
    assert words[0] == 0b01 << 30 and words[1] & 1 == 1
    # row 21: bits 63..65 -> low bit at 31 of word 1, high two bits at 0, 1 of word 2
    assert words[1] >> 31 == 0 and words[2] == 0b11


@pytest.mark.parametrize("bits", BITS)
def test_columns_are_rows_of_the_transpose(bits, gen):
    zeros = torch.randint(0, 2**bits, (3, 64), generator=gen)
    packed = pack_cols(zeros, bits)
    assert packed.shape == (3, packed_length(64, bits))
    assert torch.equal(packed, pack_rows(zeros.t(), bits).t())
    assert torch.equal(unpack_cols(packed, bits, 64), zeros.int())


def test_int4_agrees_bit_for_bit_with_the_kernel_packer(gen):
    kernels = pytest.importorskip("epmq_kernels.packing")
    codes = torch.randint(0, 16, (128, 48), generator=gen)
    assert torch.equal(pack_rows(codes, 4), kernels.pack_int4(codes, backend="torch"))
    assert torch.equal(pack_cols(codes, 4), kernels.pack_int4_cols(codes, backend="torch"))
    assert torch.equal(unpack_rows(kernels.pack_int4(codes), 4, 128), kernels.unpack_int4(pack_rows(codes, 4)))


def test_bad_input():
    with pytest.raises(ValueError, match="must lie in 0..15"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_rows(torch.zeros(8, 2), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_rows(torch.zeros(8, 2, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="take 3 words"):
        unpack_rows(torch.zeros(2, 1, dtype=torch.int32), 3, 32)
    for bits in (4.0, True):
        with pytest.raises(ValueError, match="bits must be one of"):
            pack_rows(torch.zeros(8, 2, dtype=torch.int32), bits)
    with pytest.raises(ValueError, match="must lie in 0..15"):
        pack_rows(torch.full((8, 2), 16).to(torch.uint16), 4)


@pytest.mark.parametrize("bits", BITS)
def test_numpy_integer_bits_pack_as_the_int(bits, gen):
    """A width read from a numpy array (np.int64(4)) is the width it is, as grid.is_bits takes it."""
    import numpy as np

    codes = torch.randint(0, 2**bits, (40, 3), generator=gen)
    for width in (np.int64(bits), np.int32(bits), np.uint8(bits)):
        packed = pack_rows(codes, width)
        assert torch.equal(packed, pack_rows(codes, bits))
        assert packed_length(40, width) == packed_length(40, bits) and type(packed_length(40, width)) is int
        assert torch.equal(unpack_rows(packed, width, 40), codes.int())
        assert torch.equal(unpack_cols(pack_cols(codes.t(), width), width, 40), codes.t().int())
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_rows(codes, np.int64(5))
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_rows(codes, np.float64(bits))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16])
def test_codes_of_every_integer_dtype(dtype, gen):
    codes = torch.randint(0, 16, (24, 5), generator=gen)
    assert torch.equal(pack_rows(codes.to(dtype), 4), pack_rows(codes, 4))


@pytest.mark.parametrize("bits", BITS)
def test_every_length_round_trips_through_the_stream(bits, gen):
    """Packing works a period (the codes that fill whole words) at a time: every length, a
    last period cut short included, and words whose high bit is set (negative int32)."""
    for K in [*range(0, 66), 95, 97]:
        codes = torch.randint(0, 2**bits, (K, 3), generator=gen)
        codes[::7] = 2**bits - 1  # (ones in the top bits of words, straddling ones too)
        for given in (codes, codes.t().contiguous().t(), codes.to(torch.uint8)):
            packed = pack_rows(given, bits)
            assert packed.shape == (packed_length(K, bits), 3) and packed.is_contiguous()
            for n in range(3):
                assert words_stream(packed[:, n]) == column_stream(codes[:, n], bits)
            assert torch.equal(unpack_rows(packed, bits, K), codes.int())
            assert torch.equal(unpack_rows(packed.t().contiguous().t(), bits, K), codes.int())
    # unpacking reads only the stream's bits: any word values, the sign bit's copies masked off
    words = torch.full((packed_length(40, bits), 2), -1, dtype=torch.int32)
    assert torch.equal(unpack_rows(words, bits, 40), torch.full((40, 2), 2**bits - 1, dtype=torch.int32))


def test_a_length_that_is_no_count_is_refused():
    """unpack_rows / unpack_cols with a length of 8.0 (a width read from a JSON config as a
    float) or '8' ended in Python's bare 'slice indices must be integers' or "bad operand type
    for unary -: 'str'", and -1 with no words returned no codes; refused, naming the length.
    NumPy's integers are counts."""
    import numpy as np

    words = pack_rows(torch.ones(8, 3, dtype=torch.int32), 4)
    for length in (8.0, "8", -1, None, True):
        for unpack, packed in ((unpack_rows, words), (unpack_cols, words.t())):
            with pytest.raises(ValueError, match=f"length must be a count of codes .*got {length!r}"):
                unpack(packed if length != -1 else packed[:0], 4, length)
    assert torch.equal(unpack_rows(words, 4, np.int64(8)), torch.ones(8, 3, dtype=torch.int32))


def test_pack_cols_of_no_tensor_is_refused_as_pack_rows_refuses_it():
    """pack_cols of a list or a NumPy array (zero points read from a JSON or an .npz) ended in
    Python's bare "'list' object has no attribute 't'", where pack_rows names the codes."""
    import numpy as np

    for codes in ([[1, 2, 3, 4, 5, 6, 7, 8]], np.ones((1, 8), dtype=np.int32)):
        with pytest.raises(ValueError, match="codes must be a 2-D integer tensor"):
            pack_cols(codes, 4)
        with pytest.raises(ValueError, match="codes must be a 2-D integer tensor"):
            pack_rows(codes, 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_on_the_meta_device_pack_to_words_of_their_shape(bits):
    """Codes on the meta device (a layer built without memory, init_empty_weights, or a shape traced) ended
    in torch's bare 'Tensor.item() cannot be called on meta tensors' at the range check: they have no values
    to check, and pack (and unpack) to meta words of the shape real codes would."""
    K, N = 70, 24
    meta = torch.empty(K, N, dtype=torch.int32, device="meta")
    real = torch.zeros(K, N, dtype=torch.int32)
    for pack, codes, want in ((pack_rows, meta, pack_rows(real, bits)), (pack_cols, meta, pack_cols(real, bits))):
        words = pack(codes, bits)
        assert words.is_meta and words.shape == want.shape and words.dtype == torch.int32
    assert unpack_rows(pack_rows(meta, bits), bits, K).shape == (K, N)
    assert unpack_cols(pack_cols(meta, bits), bits, N).shape == (K, N)
