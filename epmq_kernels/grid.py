"""The min-max integer grid of GPTQ, in torch: the reference every kernel rounds against.

A row ``w`` of a group is stored as codes ``q = clamp(round(w / scale) + zero, 0, maxq)`` and
read back as ``(q - zero) * scale``. Asymmetric grids span ``[min(w, 0), max(w, 0)]``: the range
always contains 0, so ``zero`` is an integer in ``[0, maxq]`` and packs into ``bits`` bits like
the codes. Symmetric grids span ``[-a, a]`` with ``a = max|w|`` and ``zero = 2**(bits-1)``.
A row that is all zeros (or has no columns) gets the range ``[-1, 1]`` so that its scale is
finite and positive; so does one whose range is too small for a normal fp32 scale (below
``maxq * 2**-126``, 3.5e-38 at 2 bits to 3e-36 at 8: zeros and subnormal or near-subnormal
weights): they round to 0 there.
Rounding is half-to-even (``torch.round``), which the kernels reproduce.
"""

import numbers

import torch

TINY = 2.0**-126  # the least normal float32: smaller scales are subnormal (or 0)


def is_integer(value) -> bool:
    """An integer: Python's or numpy's (``np.int64(4)``, a sweep's value read from an array), not a
    bool, float or str. Bit widths, sizes, counts and seeds are checked by it."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


is_bits = is_integer  # (a bit width is an integer as any other; its name at its callers)


def is_flag(value) -> bool:
    """``True`` or ``False``, numpy's ``np.True_`` too (arrays' values): not a truthy ``'no'`` or an int."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def find_params(W: torch.Tensor, bits: int, sym: bool):
    """Per-row ``(scale, zero)`` of the grid covering the rows of ``W[rows, cols]``.

    Both are float32 ``[rows]``; ``zero`` holds integers.
    """
    # (bits=0 made every scale inf, 3.5 a grid of 10.3 levels, True one of 1 bit; sym='no' is
    # truthy: all silently. float32 counts the codes exactly to 2**24: 16 bits are the most)
    if not is_bits(bits) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int from 1 to 16, got {bits!r}")
    if not is_flag(sym):
        raise ValueError(f"sym must be a bool, got {sym!r}")
    # (a 1-D W ended in torch's bare 'Dimension out of range'; a 3-D one gave grids of its
    # middle axis, silently)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    bits, sym = int(bits), bool(sym)
    maxq = 2**bits - 1
    W = W.float()
    if W.shape[1] == 0:
        # (a row with no weight spans [min(w, 0), max(w, 0)] = [0, 0], an all-zero row's range,
        # where amin and amax of no value ended in torch's bare error)
        W = W.new_zeros(W.shape[0], 1)
    xmin = W.amin(dim=1).clamp(max=0)
    xmax = W.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    # A range too small for a normal fp32 scale (all zeros, or zeros and weights below
    # maxq * 2**-126) is empty: the unit range, on which its weights round to 0. (A subnormal
    # scale is rounded to few bits: the range it covers may miss the weights, and the zero
    # point fall outside [0, maxq]; one that underflows to 0 makes every weight NaN.)
    empty = (xmax - xmin) / maxq < TINY
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_group_params(W: torch.Tensor, group_size: int, bits: int, sym: bool):
    """``find_params`` of every group of ``group_size`` columns of ``W [rows, d_in]``: float32
    ``[rows, G]``, ``G = ceil(d_in / group_size)``; where the size does not divide ``d_in`` the
    last group is shorter (as in the GPTQ reference). It is padded with zeros, which move no
    grid: every grid spans 0."""
    rows, d_in = W.shape
    G = -(-d_in // group_size)
    padded = torch.nn.functional.pad(W.float(), (0, G * group_size - d_in))
    scale, zero = find_params(padded.reshape(rows * G, group_size), bits, sym)
    return scale.reshape(rows, G), zero.reshape(rows, G)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """Integer codes (as float32) of ``w`` on the grid; broadcasting as the caller arranges."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    return (q - zero) * scale
