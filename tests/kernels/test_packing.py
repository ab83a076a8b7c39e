"""Int4 bit packing: both layouts, both backends, bit for bit against a numpy reference."""

import numpy as np
import pytest
import torch
import triton

from epmq_kernels.packing import (
    _pack_int4_kernel,
    _unpack_int4_kernel,
    pack_int4,
    pack_int4_cols,
    unpack_int4,
    unpack_int4_cols,
)

from gpu_compile import Launches, compile_as_launched, ptxas_available, run_compile_script

BACKENDS = ["torch", "triton"]


# ----------------------------------------------------------------------------------------------
# Independent references: numpy, one code and one bit field at a time.
# ----------------------------------------------------------------------------------------------
def numpy_pack_rows(codes):
    """[8 R, C] codes -> [R, C] int32: code 8 r + j at bits 4 j of word r, built unsigned."""
    codes = np.asarray(codes, dtype=np.uint64)
    words = np.zeros((codes.shape[0] // 8, codes.shape[1]), dtype=np.uint64)
    for j in range(8):
        words |= codes[j::8] << np.uint64(4 * j)
    return words.astype(np.uint32).view(np.int32)


def numpy_unpack_rows(words):
    words = np.asarray(words, dtype=np.int32).view(np.uint32).astype(np.uint64)
    codes = np.zeros((words.shape[0] * 8, words.shape[1]), dtype=np.int64)
    for j in range(8):
        codes[j::8] = (words >> np.uint64(4 * j)) & np.uint64(0xF)
    return codes


def random_codes(gen, shape, dtype=torch.int64):
    return torch.randint(0, 16, shape, generator=gen).to(dtype)


def random_words(gen, shape):
    """Any int32 bit pattern, negative ones included."""
    return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Layout, bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_known_words(backend):
    codes = torch.tensor([[j] for j in range(8)] + [[15 - j] for j in range(8)], dtype=torch.int32)
    words = pack_int4(codes, backend=backend)
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[0, 0].item() == 0x76543210
    assert words[1, 0].item() == 0x89ABCDEF - 2**32  # top nibble 8: bit 31 set, negative
    all_fifteen = pack_int4(torch.full((8, 3), 15, dtype=torch.uint8), backend=backend)
    assert (all_fifteen == -1).all()
    cols = pack_int4_cols(codes.t().contiguous(), backend=backend)
    assert cols.shape == (1, 2) and cols[0, 0].item() == 0x76543210


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("K,N", [(64, 40), (8, 72), (128, 3)])
def test_pack_rows_matches_numpy(gen, backend, dtype, K, N):
    codes = random_codes(gen, (K, N), dtype)
    codes[-8:, 0] = 15  # at least one negative word
    words = pack_int4(codes, backend=backend)
    expected = numpy_pack_rows(codes.numpy())
    assert words.dtype == torch.int32 and words.shape == (K // 8, N)
    np.testing.assert_array_equal(words.numpy(), expected)
    assert (words < 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,N", [(3, 72), (1, 8), (4, 40)])
def test_pack_cols_matches_numpy(gen, backend, G, N):
    codes = random_codes(gen, (G, N), torch.uint8)
    packed = pack_int4_cols(codes, backend=backend)
    expected = numpy_pack_rows(codes.numpy().T).T
    assert packed.dtype == torch.int32 and packed.shape == (G, N // 8)
    np.testing.assert_array_equal(packed.numpy(), expected)


def test_pack_matches_pure_python(gen):
    codes = random_codes(gen, (16, 5))
    words = pack_int4(codes, backend="triton")
    for r in range(2):
        for c in range(5):
            word = 0
            for j in range(8):
                word |= int(codes[8 * r + j, c]) << (4 * j)
            if word >= 2**31:
                word -= 2**32
            assert words[r, c].item() == word


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_matches_numpy_on_all_bit_patterns(gen, backend):
    words = random_words(gen, (9, 40))
    words[0, :4] = torch.tensor([-1, -2**31, 0, 2**31 - 1], dtype=torch.int32)
    codes = unpack_int4(words, backend=backend)
    assert codes.dtype == torch.int32 and codes.shape == (72, 40)
    np.testing.assert_array_equal(codes.numpy(), numpy_unpack_rows(words.numpy()))
    cols = unpack_int4_cols(words, backend=backend)
    assert cols.shape == (9, 320)
    np.testing.assert_array_equal(cols.numpy(), numpy_unpack_rows(words.numpy().T).T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trips(gen, backend):
    codes = random_codes(gen, (64, 72), torch.int32)
    assert torch.equal(unpack_int4(pack_int4(codes, backend=backend), backend=backend), codes)
    zeros = random_codes(gen, (4, 40), torch.int32)
    assert torch.equal(
        unpack_int4_cols(pack_int4_cols(zeros, backend=backend), backend=backend), zeros)
    words = random_words(gen, (5, 16))
    assert torch.equal(pack_int4(unpack_int4(words, backend=backend), backend=backend), words)
    assert torch.equal(
        pack_int4_cols(unpack_int4_cols(words, backend=backend), backend=backend), words)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(gen, backend):
    codes = random_codes(gen, (40, 64), torch.uint8)
    view = codes.t()  # [64, 40], not contiguous
    np.testing.assert_array_equal(pack_int4(view, backend=backend).numpy(),
                                  numpy_pack_rows(view.numpy()))
    every_other = random_codes(gen, (4, 80), torch.int32)[:, ::2]  # [4, 40], column stride 2
    np.testing.assert_array_equal(pack_int4_cols(every_other, backend=backend).numpy(),
                                  numpy_pack_rows(every_other.numpy().T).T)


def test_offsets_past_2_31_along_the_other_axis(gen):
    """A code matrix of 2^31 bytes read through its rows (the qzeros layout, or a transposed
    qweight view): the row offsets pass int32 along the axis that is not packed. Only the
    bytes read are touched (the rest of the 2 GiB is never written, so never backed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        storage = torch.empty(2**31 + 64, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError):  # (strict overcommit, or a small GPU)
        pytest.skip("2 GiB of address space not available")
    values = random_codes(gen, (3, 8), torch.uint8)
    zeros = storage.as_strided((3, 8), (2**30, 1))  # rows 2^30 bytes apart
    zeros.copy_(values)
    want = pack_int4_cols(values, backend="torch")
    assert torch.equal(pack_int4_cols(zeros, backend="triton").cpu(), want)
    assert torch.equal(pack_int4(zeros.t(), backend="triton").cpu(), want.t())
    del storage, zeros


def test_offsets_past_2_31_along_the_packed_axis(gen):
    """Codes whose packed axis has a stride past 2^31 / 7 (8 rows 2^31 / 7 bytes apart): the
    step between a word's eight codes, ``j * stride``, wrapped in int32 and read out of
    bounds. Only the bytes read are touched (the rest of the 2 GiB is never backed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stride = 2**31 // 7 + 64
    try:
        storage = torch.empty(7 * stride + 3, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError):  # (strict overcommit, or a small GPU)
        pytest.skip("2 GiB of address space not available")
    values = random_codes(gen, (8, 3), torch.uint8)
    codes = storage.as_strided((8, 3), (stride, 1))
    codes.copy_(values)
    want = pack_int4(values, backend="torch")
    assert torch.equal(pack_int4(codes, backend="triton").cpu(), want)
    assert torch.equal(pack_int4_cols(codes.t(), backend="triton").cpu(), want.t())
    del storage, codes


def test_kernels_write_every_element(gen):
    """Outputs pre-filled with a sentinel: every element must be overwritten."""
    sentinel = 0x5A5A5A5A
    codes = random_codes(gen, (48, 40), torch.int32)
    words = torch.full((6, 40), sentinel, dtype=torch.int32)
    _pack_int4_kernel[(triton.cdiv(6, 4), triton.cdiv(40, 16))](
        codes, words, 6, 40, codes.stride(0), codes.stride(1), words.stride(0), words.stride(1),
        BLOCK_R=4, BLOCK_C=16)
    np.testing.assert_array_equal(words.numpy(), numpy_pack_rows(codes.numpy()))
    unpacked = torch.full((48, 40), sentinel, dtype=torch.int32)
    _unpack_int4_kernel[(triton.cdiv(6, 4), triton.cdiv(40, 16))](
        words, unpacked, 6, 40, words.stride(0), words.stride(1), unpacked.stride(0),
        unpacked.stride(1), BLOCK_R=4, BLOCK_C=16)
    assert torch.equal(unpacked, codes)


def test_unchecked_codes_keep_their_low_bits_on_both_backends(gen):
    """With check_range=False, codes out of 0..15 are not an error; both backends then keep
    their low four bits (they used to disagree: torch let the high bits spill over)."""
    codes = torch.randint(-40, 40, (16, 24), generator=gen)
    words = {b: pack_int4(codes, backend=b, check_range=False) for b in BACKENDS}
    assert torch.equal(words["torch"], words["triton"])
    assert torch.equal(words["torch"], pack_int4(codes & 0xF, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    assert pack_int4(torch.zeros((0, 4), dtype=torch.int32), backend=backend).shape == (0, 4)
    assert unpack_int4(torch.zeros((2, 0), dtype=torch.int32), backend=backend).shape == (16, 0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_codes_on_the_meta_device_pack_to_words_of_their_shape(backend):
    """Codes on the meta device (a layer built without memory, or a shape traced) ended in torch's bare
    'Tensor.item() cannot be called on meta tensors' at the range check: they have no values to check."""
    codes = torch.empty((16, 24), dtype=torch.int32, device="meta")
    for pack, shape in ((pack_int4, (2, 24)), (pack_int4_cols, (16, 3))):
        words = pack(codes, backend=backend)
        assert words.is_meta and words.shape == shape and words.dtype == torch.int32


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_range_check_reads_the_codes_once(gen, backend):
    """check_range is 'one reduction and a host sync': it took min() and max(), two passes over the
    codes and two waits for the device; one aminmax now, the same refusal."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reductions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.min, torch.ops.aten.max, torch.ops.aten.aminmax):
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    codes = random_codes(gen, (16, 24), torch.uint8)
    with Reductions() as reductions:
        words = pack_int4(codes, backend=backend)
    assert reductions.seen == ["aminmax"]
    assert torch.equal(words, pack_int4(codes, backend=backend, check_range=False))
    with pytest.raises(ValueError, match=r"0..15, got values in \[0, 16\]"):
        pack_int4_cols(codes.index_fill(0, torch.tensor([3]), 16), backend=backend)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    ok = torch.zeros((16, 8), dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros((12, 8), dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4_cols(torch.zeros((2, 12), dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((8, 2), 16, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4_cols(torch.full((1, 8), -1, dtype=torch.int8), backend=backend)
    with pytest.raises(ValueError, match="integer"):
        pack_int4(ok.float(), backend=backend)
    with pytest.raises(ValueError, match="integer"):
        pack_int4(ok.bool(), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        pack_int4(ok.flatten(), backend=backend)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(ok.long(), backend=backend)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4_cols(ok.float(), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        pack_int4(ok, backend="cuda")
    with pytest.raises(ValueError, match="torch.Tensor"):
        pack_int4([[0] * 8] * 8, backend=backend)
    # (None, read as the default, skipped the range check: 16 packed as 0)
    for check_range in (None, "no", 0):
        with pytest.raises(ValueError, match=f"check_range must be a bool, got {check_range!r}"):
            pack_int4(torch.full((8, 2), 16, dtype=torch.int32), backend=backend, check_range=check_range)


# ----------------------------------------------------------------------------------------------
# GPU: large shapes, Triton against torch and numpy
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
class TestCUDA:
    @pytest.mark.parametrize("K,N", [(4096, 4096), (11008, 4096), (4096, 4104)])
    def test_large_bit_exact(self, gen, K, N):
        codes = random_codes(gen, (K, N), torch.uint8).cuda()
        words = pack_int4(codes)
        assert words.is_cuda
        assert torch.equal(words, pack_int4(codes, backend="torch"))
        assert torch.equal(unpack_int4(words), codes.int())
        zeros = codes[: K // 128]
        qzeros = pack_int4_cols(zeros)
        assert torch.equal(qzeros, pack_int4_cols(zeros, backend="torch"))
        assert torch.equal(unpack_int4_cols(qzeros), zeros.int())

    def test_matches_numpy(self, gen):
        codes = random_codes(gen, (256, 72), torch.int32)
        words = pack_int4(codes.cuda()).cpu()
        np.testing.assert_array_equal(words.numpy(), numpy_pack_rows(codes.numpy()))


# ----------------------------------------------------------------------------------------------
# output layouts and argument checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_contiguous(gen, backend):
    """Both layouts come back contiguous from both backends (checkpoint writers such as
    safetensors refuse non-contiguous tensors), whatever the input's layout."""
    codes = random_codes(gen, (16, 40), torch.int32)
    for packed in (pack_int4(codes, backend=backend), pack_int4_cols(codes, backend=backend),
                   pack_int4_cols(codes.t().contiguous().t(), backend=backend)):
        assert packed.is_contiguous()
    words = random_words(gen, (4, 16))
    for unpacked in (unpack_int4(words, backend=backend), unpack_int4_cols(words, backend=backend),
                     unpack_int4_cols(words.t().contiguous().t(), backend=backend)):
        assert unpacked.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_words_must_be_2d(backend):
    for words in (torch.zeros(8, dtype=torch.int32), torch.zeros(2, 2, 8, dtype=torch.int32)):
        for unpack in (unpack_int4, unpack_int4_cols):
            with pytest.raises(ValueError, match="2-D"):
                unpack(words, backend=backend)


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_as_launched(gen, monkeypatch):
    """The compile test of w4a16 packs one 1024 x 4096 matrix of int32 codes; a launch
    specialises its integers (one word or one column, strides of 1: constants) and the 16-byte
    divisibility of its pointers and sizes, and reads codes of every dtype. The launches both
    layouts make of odd shapes, every codes dtype and strided, unaligned views, compiled for
    sm_90 and sm_80 as launched (with the compiled tiles)."""
    import epmq_kernels.packing as P

    pack, unpack = Launches(P._pack_int4_kernel), Launches(P._unpack_int4_kernel)
    monkeypatch.setattr(P, "_pack_int4_kernel", pack)
    monkeypatch.setattr(P, "_unpack_int4_kernel", unpack)
    cases = [((8, 1), dtype) for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)]
    cases += [((136, 37), torch.int32), ((1, 8), torch.uint8), ((5, 136), torch.int64)]
    for shape, dtype in cases:
        for along_cols in (False, True):
            if shape[along_cols] % 8:
                continue
            codes = random_codes(gen, shape, dtype)
            pack_fn, unpack_fn = (pack_int4_cols, unpack_int4_cols) if along_cols else (pack_int4, unpack_int4)
            words = pack_fn(codes, backend="triton")
            assert torch.equal(unpack_fn(words, backend="triton"), codes.to(torch.int32))
    wide = random_codes(gen, (17, 137), torch.int32)  # (a transposed view, one element in: unaligned)
    codes = wide[1:, 1:].t()
    assert torch.equal(unpack_int4(pack_int4(codes, backend="triton"), backend="triton"), codes)
    tiles = dict(BLOCK_R=P._BLOCK_R, BLOCK_C=P._BLOCK_C)
    proc = run_compile_script(compile_as_launched("epmq_kernels.packing", [
        ("_pack_int4_kernel", pack.calls), ("_unpack_int4_kernel", unpack.calls)],
        constexprs=dict(_pack_int4_kernel=tiles, _unpack_int4_kernel=tiles)), timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]
