"""Int4 bit packing: eight 4-bit grid codes in one int32 word, the GPTQ checkpoint layout.

The math
--------
A code matrix ``Q`` of integers in ``0..15`` is stored eight codes to a 32-bit word. Along
the packed axis, code ``i`` goes to word ``i // 8`` at bits ``4 * (i % 8)``:

    word[r] = sum_{j < 8} Q[8 r + j] << 4 j          (mod 2**32, read as a signed int32)
    Q[8 r + j] = (word[r] >> 4 j) & 0xF

Two layouts of the same rule are used by the packed int4 (``gptq``) format:

* ``qweight``: the weight codes ``[K, N]`` packed along K (input features) into ``[K/8, N]``;
  see :func:`pack_int4` / :func:`unpack_int4`.
* ``qzeros``: the zero-point codes ``[G, N]`` packed along N into ``[G, N/8]``;
  see :func:`pack_int4_cols` / :func:`unpack_int4_cols`.

Bit 31 of a word is the top bit of its eighth code, so every word whose last code is ``>= 8``
is negative as an int32. Packing therefore builds the word in 64-bit (torch) or relies on
wrapping 32-bit shifts (Triton), and unpacking masks after the arithmetic right shift, so the
sign extension never leaks into a code. Both are bit exact.

One Triton kernel serves both layouts: it packs (or unpacks) along whichever axis its strides
name. The torch functions beside it are the reference and the CPU path.
"""

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRETED, check_device, on_tensor_device
from .grid import is_flag

CODES_PER_WORD = 8
BITS = 4

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# Tile of the packing kernels: BLOCK_R packed words along the packed axis by BLOCK_C along
# the other one. Packing is a pure memory operation; a 32 x 128 tile keeps 16-byte accesses
# along the contiguous axis of the common layout, with plenty of programs for any real shape.
_BLOCK_R, _BLOCK_C = 32, 128
_BLOCK_R_INTERPRETED, _BLOCK_C_INTERPRETED = 16, 32


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pack_int4_kernel(
    codes_ptr, words_ptr,
    R, C,                                  # R words along the packed axis, C along the other
    stride_code_pack, stride_code_other,   # codes: element (8 r + j, c)
    stride_word_pack, stride_word_other,   # words: element (r, c)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (codes may pass 2^31)
    # (int64 too: along the other axis the stride is a whole row of codes in the qzeros layout,
    # or of a transposed view, and c * stride passes 2^31 as the codes do)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    code_ptrs = (codes_ptr + (offs_r[:, None] * 8) * stride_code_pack
                 + offs_c[None, :] * stride_code_other)
    # (and the step between a word's codes: j * stride in int32 wrapped for codes whose packed
    # axis has a stride past 2^31 / 7, a view of a larger matrix)
    code_step = tl.cast(stride_code_pack, tl.int64)
    word = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    for j in tl.static_range(8):
        code = tl.load(code_ptrs + j * code_step, mask=mask, other=0).to(tl.int32)
        # The shift by 28 wraps into bit 31 in 32-bit arithmetic: the word's sign is the code's
        # top bit, which is what the int32 checkpoint stores.
        word = word | ((code & 0xF) << (4 * j))
    tl.store(words_ptr + offs_r[:, None] * stride_word_pack + offs_c[None, :] * stride_word_other,
             word, mask=mask)


@triton.jit
def _unpack_int4_kernel(
    words_ptr, codes_ptr,
    R, C,
    stride_word_pack, stride_word_other,
    stride_code_pack, stride_code_other,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (codes may pass 2^31)
    # (int64 too: along the other axis the stride is a whole row of codes in the qzeros layout,
    # or of a transposed view, and c * stride passes 2^31 as the codes do)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    word_ptrs = words_ptr + offs_r[:, None] * stride_word_pack + offs_c[None, :] * stride_word_other
    word = tl.load(word_ptrs, mask=mask, other=0)
    code_ptrs = (codes_ptr + (offs_r[:, None] * 8) * stride_code_pack
                 + offs_c[None, :] * stride_code_other)
    code_step = tl.cast(stride_code_pack, tl.int64)  # (as in _pack_int4_kernel)
    for j in tl.static_range(8):
        # >> is arithmetic on int32: the mask drops the copies of the sign bit.
        tl.store(code_ptrs + j * code_step, (word >> (4 * j)) & 0xF, mask=mask)


# ----------------------------------------------------------------------------------------------
# Torch reference (and the CPU path)
# ----------------------------------------------------------------------------------------------
def _shifts(device):
    return torch.arange(0, 32, BITS, dtype=torch.int64, device=device)


def _pack_rows_torch(codes):
    """[8 R, C] codes -> [R, C] int32 words, packed along dim 0."""
    rows, cols = codes.shape
    # (& 0xF as the kernel does: unchecked codes out of range keep their low bits only)
    nibbles = (codes.to(torch.int64) & 0xF).reshape(rows // CODES_PER_WORD, CODES_PER_WORD, cols)
    word = (nibbles << _shifts(codes.device)[None, :, None]).sum(dim=1)  # < 2**32, exact
    word = torch.where(word >= 2**31, word - 2**32, word)                # two's complement
    return word.to(torch.int32)


def _unpack_rows_torch(words):
    """[R, C] int32 words -> [8 R, C] int32 codes, unpacked along dim 0."""
    rows, cols = words.shape
    codes = (words.to(torch.int64)[:, None, :] >> _shifts(words.device)[None, :, None]) & 0xF
    return codes.reshape(rows * CODES_PER_WORD, cols).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _use_triton(tensor, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return tensor.is_cuda and not INTERPRETED
    return backend == "triton"


def _check_codes(codes, axis, check_range):
    # (check_range=None, read as "the default", skipped the check: codes past 15 packed as their low
    # bits, silently)
    if not is_flag(check_range):
        raise ValueError(f"check_range must be a bool, got {check_range!r}")
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"codes must be an integer tensor (uint8..int64), got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    length = codes.shape[axis]
    if length % CODES_PER_WORD:
        name = "K (dim 0)" if axis == 0 else "N (dim 1)"
        raise ValueError(f"{name} = {length} of codes is not a multiple of {CODES_PER_WORD}")
    if check_range and codes.numel() and not codes.is_meta:  # (meta codes have no values to check)
        # (one pass and one wait, as the docstrings promise: min() and max() read the codes twice and
        # waited for the device twice)
        lo, hi = torch.stack(torch.aminmax(codes)).tolist()
        if lo < 0 or hi > 15:
            raise ValueError(f"int4 codes must lie in 0..15, got values in [{lo}, {hi}]")


def _check_words(words):
    if not isinstance(words, torch.Tensor):
        raise ValueError(f"packed words must be a torch.Tensor, got {type(words).__name__}")
    if words.dtype != torch.int32:
        raise ValueError(f"packed int4 words must be int32, got {words.dtype}")
    if words.dim() != 2:
        raise ValueError(f"packed words must be 2-D, got shape {tuple(words.shape)}")


def _along(rows_fn, tensor, axis):
    """A torch ``_*_rows_torch`` function (it works along dim 0) applied along ``axis``."""
    return rows_fn(tensor) if axis == 0 else rows_fn(tensor.t()).t().contiguous()


def _launch(kernel, src, dst, words, axis):
    """``kernel`` (either packing kernel) from ``src`` into ``dst``, packing along ``axis``;
    ``words`` (one of the two) sets the grid, a tile of words per program."""
    other = 1 - axis
    R, C = words.shape[axis], words.shape[other]
    if words.numel():
        block_r, block_c = ((_BLOCK_R_INTERPRETED, _BLOCK_C_INTERPRETED) if INTERPRETED
                            else (_BLOCK_R, _BLOCK_C))
        grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
        kernel[grid](
            src, dst, R, C,
            src.stride(axis), src.stride(other), dst.stride(axis), dst.stride(other),
            BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return dst


@on_tensor_device
def _pack(codes, axis, backend, check_range):
    _check_codes(codes, axis, check_range)
    if not _use_triton(codes, backend):
        return _along(_pack_rows_torch, codes, axis)
    check_device(codes, names=["codes"])
    shape = list(codes.shape)
    shape[axis] //= CODES_PER_WORD
    words = torch.empty(shape, dtype=torch.int32, device=codes.device)
    return _launch(_pack_int4_kernel, codes, words, words, axis)


@on_tensor_device
def _unpack(words, axis, backend):
    _check_words(words)
    if not _use_triton(words, backend):
        return _along(_unpack_rows_torch, words, axis)
    check_device(words, names=["packed"])
    shape = list(words.shape)
    shape[axis] *= CODES_PER_WORD
    codes = torch.empty(shape, dtype=torch.int32, device=words.device)
    return _launch(_unpack_int4_kernel, words, codes, words, axis)


def pack_int4(codes, *, backend="auto", check_range=True):
    """Pack int4 codes ``[K, N]`` (values 0..15; uint8, int8, int16, int32 or int64) along K
    into the GPTQ ``qweight`` layout: int32 ``[K // 8, N]``, code of row k at bits
    ``4 * (k % 8)`` of row ``k // 8``.

    ``backend``: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or
    ``"torch"``. ``check_range`` verifies 0 <= codes <= 15 (one reduction and a host sync).
    """
    return _pack(codes, 0, backend, check_range)


def unpack_int4(qweight, *, backend="auto"):
    """Inverse of :func:`pack_int4`: int32 ``[K // 8, N]`` -> int32 codes ``[K, N]``."""
    return _unpack(qweight, 0, backend)


def pack_int4_cols(codes, *, backend="auto", check_range=True):
    """Pack int4 codes ``[G, N]`` along N into the GPTQ ``qzeros`` layout: int32
    ``[G, N // 8]``, code of column n at bits ``4 * (n % 8)`` of column ``n // 8``."""
    return _pack(codes, 1, backend, check_range)


def unpack_int4_cols(qzeros, *, backend="auto"):
    """Inverse of :func:`pack_int4_cols`: int32 ``[G, N // 8]`` -> int32 codes ``[G, N]``."""
    return _unpack(qzeros, 1, backend)
