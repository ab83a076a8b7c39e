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

import math

import torch

from epmq_kernels.grid import is_bits, is_integer

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits."""
    bits = _check_bits(bits)
    return -(-length * bits // 32)


def _check_bits(bits) -> int:
    """``bits`` as Python's int (numpy's integers taken, a sweep's values read from arrays), else
    a ValueError."""
    if not is_bits(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


# the dtypes torch.aminmax takes (pack_rows' range check)
_ORDERED_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _period(bits: int) -> tuple:
    """``(codes, words)``: the fewest codes that fill whole words, and those words (32 codes in
    3 words for 3 bits; 32 // bits codes in one word where bits divides 32)."""
    common = math.gcd(bits, 32)
    return 32 // common, bits // common


def _period_positions(bits: int) -> list:
    """Word (within the period) and bit offset of each code's lowest bit in the stream."""
    return [divmod(bits * j, 32) for j in range(_period(bits)[0])]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[K, N]`` (values in ``0 .. 2**bits - 1``) along K into int32 words
    ``[ceil(K * bits / 32), N]``."""
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D integer tensor, got {getattr(codes, 'shape', type(codes))}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    K, N = codes.shape
    # (torch has no min or max of uint16..uint64 or bool tensors: those are checked as int64)
    q = codes if codes.dtype in _ORDERED_DTYPES else codes.to(torch.int64)
    if q.numel() and not q.is_meta:  # (meta codes have no values to check: words of their shape)
        low, high = torch.aminmax(q)
        if int(low) < 0 or int(high) >= 2**bits:
            raise ValueError(f"{bits}-bit codes must lie in 0..{2**bits - 1}, got [{int(low)}, {int(high)}]")
    # In range, the codes fit int32 whatever their dtype. Each code position of a period is one
    # strided slice of rows, OR-ed into its word at its shift (the codes of a word occupy
    # disjoint bits); a code crossing into the next word leaves its high bits there. int32
    # throughout: << wraps into the sign bit, which is the int32 view of the word. (It was an
    # index_add_ of every code in int64, 20 times the unpacking's time.)
    q = q.to(torch.int32)
    n_codes, n_words = _period(bits)
    periods = -(-K // n_codes)
    words = torch.zeros(periods, n_words, N, dtype=torch.int32, device=codes.device)
    for j, (word, shift) in enumerate(_period_positions(bits)):
        part = q[j::n_codes]  # (the last period may lack the positions past K: zero bits)
        rows = part.shape[0]
        words[:rows, word] |= part << shift
        if shift + bits > 32:
            words[:rows, word + 1] |= part >> (32 - shift)
    # (the words past the stream's end hold only the last period's missing codes: zero)
    return words.view(periods * n_words, N)[: packed_length(K, bits)]


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words ``[W, N]`` -> int32 codes ``[length, N]``."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    # (8.0, a width read from JSON, ended in the bare 'slice indices must be integers'; -1 with no
    # words gave no codes)
    if not is_integer(length) or length < 0:
        raise ValueError(f"length must be a count of codes (a non-negative int), got {length!r}")
    length = int(length)
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
    # 3 bits: one period (32 codes in 3 words) at a time, position by position; a code that
    # crosses into the next word takes its high bits from there. (It was two gathers of every
    # code's words in int64: 25 times the 4-bit unpacking's time, on every CPU forward.)
    n_codes, n_words = _period(bits)
    periods = -(-length // n_codes)
    N = packed.shape[1]
    missing = periods * n_words - packed.shape[0]  # (words past the stream's end: zero bits)
    words = packed if not missing else torch.cat([packed, packed.new_zeros(missing, N)])
    words = words.reshape(periods, n_words, N)  # (a view where it can be: unpack_cols passes a transpose)
    codes = []
    for word, shift in _period_positions(bits):
        # (>> is arithmetic on int32: the masks drop the copies of the sign bit)
        if shift + bits > 32:
            low = 32 - shift  # the code's bits in this word
            codes.append((words[:, word] >> shift & (2**low - 1))
                         | (words[:, word + 1] & (2 ** (bits - low) - 1)) << low)
        else:
            codes.append(words[:, word] >> shift & (2**bits - 1))
    # (stacked, not written into slices with out=, which torch.compile cannot trace)
    return torch.stack(codes, dim=1).view(periods * n_codes, N)[:length]


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[G, N]`` along N (the ``qzeros`` layout): ``[G, ceil(N * bits / 32)]``."""
    # (a list or NumPy array ended in "object has no attribute 't'": pack_rows names the codes)
    return pack_rows(codes.t() if isinstance(codes, torch.Tensor) else codes, bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: ``[G, W]`` -> ``[G, length]`` int32 codes."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {getattr(packed, 'shape', type(packed))}")
    return unpack_rows(packed.t(), bits, length).t().contiguous()
