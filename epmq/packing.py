"""GPTQ bit packing for any of the grid widths 2, 3, 4 and 8, in plain torch.

The packed checkpoint layout reads every column of a code matrix ``Q[K, N]`` as one
little-endian bit stream: the code of row ``k`` occupies stream bits ``[bits*k, bits*(k+1))``,
and the stream is cut into 32-bit words, word ``w`` holding stream bits ``[32w, 32w + 32)``
(bit 0 of the word is the lowest). Words are stored as int32 (two's complement).

* When ``bits`` divides 32 (2, 4, 8) that is row ``k`` at bits ``bits * (k % (32 // bits))`` of
  word ``k // (32 // bits)``: the familiar ``qweight`` layout.
* For 3 bits, 32 rows fill exactly 3 words and rows 10 and 21 straddle a word boundary (their
  low bits end one word, their high bits start the next), as GPTQ's 3-bit packer does.

``pack_rows`` packs along dim 0 (``qweight``: ``[K, N] -> [ceil(K*bits/32), N]``);
``pack_cols`` packs along dim 1 (``qzeros``: ``[G, N] -> [G, ceil(N*bits/32)]``). When the
length is not a whole number of words the stream is padded with zero bits (GPTQ itself needs
``K * bits`` and ``N * bits`` to be multiples of 32; serving engines expect that too).

Int4 also has Triton kernels in ``epmq_kernels.packing``; these functions are the generic
reference and the CPU path, and for 4 bits agree with them bit for bit.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-length * bits // 32)


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _positions(length: int, bits: int, device):
    """Word index and bit offset of each code's lowest bit in the stream."""
    start = torch.arange(length, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[K, N]`` (values in ``0 .. 2**bits - 1``) along K into int32 words
    ``[ceil(K * bits / 32), N]``."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D integer tensor, got {getattr(codes, 'shape', type(codes))}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    K, N = codes.shape
    q = codes.to(torch.int64)  # (first: torch has no min or max of uint16..uint64 tensors)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in 0..{2**bits - 1}, got [{int(q.min())}, {int(q.max())}]")
    word, shift = _positions(K, bits, codes.device)
    words = torch.zeros(packed_length(K, bits), N, dtype=torch.int64, device=codes.device)
    # The codes of one word occupy disjoint bits, so adding them is OR-ing them. A code that
    # crosses into the next word leaves its high bits there (the part shifted past bit 31).
    words.index_add_(0, word, (q << shift[:, None]) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if spill.any():
        words.index_add_(0, word[spill] + 1, q[spill] >> (32 - shift[spill])[:, None])
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words ``[W, N]`` -> int32 codes ``[length, N]``."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.shape[0] != packed_length(length, bits):
        raise ValueError(
            f"{length} codes of {bits} bits take {packed_length(length, bits)} words, "
            f"got {packed.shape[0]}"
        )
    if 32 % bits == 0:
        # whole codes per word: one shift per code position, one mask (int32 throughout; the
        # arithmetic shift's sign bits fall outside the mask)
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed[:, None, :] >> shifts[None, :, None]).bitwise_and_(2**bits - 1)
        return codes.reshape(packed.shape[0] * per, packed.shape[1])[:length]
    words = packed.to(torch.int64) & 0xFFFFFFFF  # undo the sign extension of the int32 view
    word, shift = _positions(length, bits, packed.device)
    # A code that crosses into the next word takes its high bits from there; for the others the
    # next word's bits land at 32 - shift >= bits, above the mask (no branch on the values, so
    # torch.compile traces it)
    following = words[torch.clamp(word + 1, max=words.shape[0] - 1)]
    codes = (words[word] >> shift[:, None]) | (following << (32 - shift)[:, None])
    return (codes & (2**bits - 1)).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[G, N]`` along N (the ``qzeros`` layout): ``[G, ceil(N * bits / 32)]``."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: ``[G, W]`` -> ``[G, length]`` int32 codes."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {getattr(packed, 'shape', type(packed))}")
    return unpack_rows(packed.t(), bits, length).t().contiguous()
