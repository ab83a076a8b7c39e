"""Input checks shared by the solvers, the statistics and the merges."""

import math
import numbers
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from epmq_kernels.grid import is_integer
from epmq_kernels.hessian_scan import N_NUMBERS, hessian_numbers

from ._util import without_autocast


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: one min/max reduction (NaN propagates through it) instead of the
    boolean copy ``torch.isfinite(t).all()`` makes, which is ten times slower on the CPU (57 ms
    against 5 ms for a 4096 x 4096 fp32 weight) and these checks run on every weight, Hessian
    and calibration batch."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = _value_range(t)
    return math.isfinite(lo) and math.isfinite(hi)


def _aminmax(t: torch.Tensor) -> tuple:
    """``torch.aminmax`` of a non-empty floating-point ``t`` (device tensors, NaN propagated)."""
    t = t.detach()  # (its values: a Parameter's read with autograd on warned as it became a float)
    if t.element_size() == 1:  # (float8: no aminmax; every value, NaN and inf kept, fits fp16,
        # but e8m0's powers of two to 2^127 fit fp32 alone: 2^20 was inf, refused as non-finite)
        t = t.to(torch.float32 if t.dtype == torch.float8_e8m0fnu else torch.float16)
    return torch.aminmax(t)


def _value_range(t: torch.Tensor) -> tuple:
    """``(min, max)`` of a non-empty floating-point ``t`` as floats, NaN if it has one: read back
    together (a ``float()`` each was two reads, and on a GPU each waits for the queue to drain;
    E-PMQ takes three a layer, of W, its factor and R)."""
    lo, hi = torch.stack(_aminmax(t)).tolist()
    return lo, hi


def check_weight(W: torch.Tensor, name: str = "W", values: bool = True) -> None:
    """A clear error unless ``W`` is a 2-D floating-point tensor with (``values``) no NaN or inf."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a 2-D tensor [out, in], got {shape}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {W.dtype}")
    if values:
        _check_not_meta(W, name)
    if values and W.numel():
        lo, hi = _value_range(W)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
        _check_float32_range(lo, hi, name)


# (the solvers work in float32, and a grid's scale spans a row's or group's range, up to twice
# its largest |w|: beyond this it would be inf and the codes NaN)
_WEIGHT_MAX = torch.finfo(torch.float32).max / 2


def _check_float32_range(lo: float, hi: float, name: str) -> None:
    if max(-lo, hi) > _WEIGHT_MAX:
        raise ValueError(f"{name} has values beyond float32's range for a quantization grid (|w| up to "
                         f"{max(-lo, hi):.3g}, at most {_WEIGHT_MAX:.3g}: a row's range must fit float32)")


def _check_not_meta(t: torch.Tensor, name: str) -> None:
    # (a model built or loaded without its weights: its values were first read as torch's bare
    # 'Tensor.item() cannot be called on meta tensors' or 'META device type not an accelerator')
    if t.is_meta and t.numel():  # (an empty one has none to read: its other errors are said)
        raise ValueError(f"{name} is on the meta device (no values): load its weights")


def _check_hessian_shape(H, d_in: int, name: str) -> None:
    if not isinstance(H, torch.Tensor) or H.shape != (d_in, d_in):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"{name} must be [{d_in}, {d_in}] to match the weight's input width, got {shape}")
    if not H.is_floating_point():
        raise ValueError(f"{name} must be floating point (a Gram matrix X X^T), got {H.dtype}")
    _check_not_meta(H, name)


_PROBES = {}  # (d_in, device, dtype) -> the fixed random vectors [v, u] of _hessian_numbers


def _probes(H: torch.Tensor, dtype=None) -> tuple:
    """``([v, u] as [d_in, 2], |u|)`` for ``H``: fixed random vectors (seed 0) in the dtype H's
    products are taken in (half precision in fp32; ``dtype`` if given), made once per width,
    device and dtype (a few of them are kept: each layer width of a model has its own)."""
    d_in, device = H.shape[0], H.device
    if dtype is None:
        dtype = H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32
    key = (d_in, str(device), dtype)
    hit = _PROBES.get(key)
    if hit is None:
        g = torch.Generator(device=device).manual_seed(0)
        u, v = torch.randn(2, d_in, generator=g, device=device).to(dtype)
        if len(_PROBES) >= 16:
            _PROBES.clear()
        hit = _PROBES[key] = (torch.stack([v, u], dim=1), float(torch.linalg.vector_norm(u)))
    return hit


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``backend`` checked, or (None) the default for ``device``: the Triton kernels on a GPU,
    torch elsewhere."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    return backend


def _scan_backend(H: torch.Tensor) -> str:
    """The default backend for ``H`` (a test may run the kernel interpreted)."""
    return resolve_backend(None, H.device)


# (products: under a caller's bf16 autocast, where no solver turned it off first, as in
# EPMQStats(merged_hessian=) and merge.regmean, their rounding refused most fp32 H as not symmetric)
@without_autocast
def _hessian_numbers(H: torch.Tensor) -> torch.Tensor:
    """The numbers :func:`check_hessian` judges ``H`` by, as a float64 device tensor (queued, not
    read): min, max, min of the diagonal, dead diagonal entries, the symmetry gap, ``|H v|`` and
    the trace (``epmq_kernels.hessian_scan``: on a GPU one pass over H and two launches).

    The solvers read one triangle of H (the Cholesky factor, the symmetric objective), so an
    H that is not symmetric would silently be read as another matrix. Checked through two
    products with fixed random vectors, u^T H v against v^T H u (no d_in x d_in temporary):
    for H = S + A, S symmetric, their gap is 2 u^T A v, about 2 |A|_F, and |H v| |u| is about
    |H|_F sqrt(d_in). Flagged from |A|_F ~ 5e-4 |H|_F on; fp32 rounding stays near 1e-7, but
    bf16's (4e-3) would flag exactly symmetric matrices: half precision is read in fp32. As few
    device operations as the numbers allow (E-PMQ checks a Hessian per expert of every layer,
    and on a GPU each operation costs the host microseconds)."""
    vu, _ = _probes(H)
    return hessian_numbers(H, vu, backend=_scan_backend(H))


def _judge_hessian(H: torch.Tensor, numbers, name: str) -> float:
    """A clear error unless ``numbers`` (:func:`_hessian_numbers` of ``H``, read) are a Gram
    matrix's; returns ``tr(H)``."""
    lo, hi, diag_min, n_dead, gap, Hv_norm, trace = numbers
    d_in = H.shape[0]
    u_norm = _probes(H)[1]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    if not (math.isfinite(gap) and math.isfinite(Hv_norm)) and H.dtype != torch.float64:
        # entries near float32's largest: the products overflowed it (the gap inf - inf, which no
        # bound refuses, or inf one side alone, a Gram matrix refused), so they are taken again
        # in float64 (the trace stays H's dtype's sum, as the solvers take it)
        vu, u_norm = _probes(H, torch.float64)
        gap, Hv_norm = hessian_numbers(H, vu).tolist()[4:6]
    if diag_min < 0:
        raise ValueError(f"{name} has negative diagonal entries: not a Gram matrix X X^T")
    # A Gram matrix's zero diagonal entry (an input that is always 0) has a zero row: the
    # solvers take such a column as dead and drop its row and column, which is only exact then.
    # Only nearly so where the entry underflowed (GELU's outputs far left, ~1e-27, square to 0
    # in fp32): X X^T being semidefinite, H_ij^2 <= H_ii H_jj < H_ii tiny there.
    if n_dead:
        diag = torch.diagonal(H)
        dead = (diag == 0).nonzero().flatten()
        tiny = max(torch.finfo(H.dtype).tiny, torch.finfo(torch.float32).tiny)
        bound = 4 * tiny * diag.double().clamp(min=tiny)
        step = max(1, (1 << 22) // d_in)  # (in slabs: a ReLU layer may have thousands of dead inputs)
        for r in range(0, len(dead), step):
            rows = dead[r:r + step]
            bad = (H[rows].double().square() > bound).any(dim=1)
            if bad.any():
                j = int(rows[int(bad.nonzero()[0])])
                raise ValueError(f"{name}[{j}, {j}] is 0 but row {j} is not: not a Gram matrix X X^T")
    if abs(gap) > 1e-3 * Hv_norm * u_norm / d_in ** 0.5:
        raise ValueError(f"{name} is not symmetric: not a Gram matrix X X^T")
    return trace


def check_hessian(H: torch.Tensor, d_in: int, name: str = "H") -> float:
    """A clear error unless ``H`` is a ``[d_in, d_in]`` Gram matrix; returns ``tr(H)`` (summed in
    H's dtype, as ``float(torch.diagonal(H).sum())``, off the GPU; on it by the scan kernel, in
    fp32 or fp64, in its order). Every number the checks need is read back
    in one transfer: on a GPU each read waits for the queue to drain, and E-PMQ checks one
    Hessian per expert of every layer (six reads each made 48 of a layer's 91 with 8 experts)."""
    _check_hessian_shape(H, d_in, name)
    if d_in == 0:
        return 0.0
    return _judge_hessian(H, _hessian_numbers(H).tolist(), name)


def check_experts(weights, hessians, shape, names, then=None) -> list:
    """:func:`check_weight` of every expert weight (of the merged weight's ``shape``) and
    :func:`check_hessian` of every Hessian, with the errors and their order of checking them
    one expert after the other, but all their numbers read back in one transfer instead of two
    per expert (each read on a GPU waits for the queue to drain, so checking as the experts are
    folded in stalls the device between them). ``then(k, trace)``, if given, runs after expert
    k's checks and before expert k + 1's (the caller's own checks, in the same order). Returns
    the traces."""
    d_in = shape[1]
    queued, pending = [], None  # (name, H or None, numbers on the device); the first host error
    for W, H, name in zip(weights, hessians, names):
        what = f"expert weight of {name}"
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point() or (W.is_meta and W.numel()):
            try:
                check_weight(W, what)  # (raises: not a 2-D floating-point tensor, or on meta)
            except ValueError as error:
                pending = error
                break
        lo, hi = _aminmax(W) if W.numel() else (torch.zeros(()), torch.zeros(()))
        w_numbers = torch.stack([lo, hi]).to(torch.float64)
        try:  # (after the weight's values, which check_weight looks at first)
            if W.shape != shape:
                raise ValueError(f"{what} has shape {tuple(W.shape)}, the merged weight {tuple(shape)}")
            _check_hessian_shape(H, d_in, f"Hessian of {name}")
        except ValueError as error:
            queued.append((name, None, torch.cat([w_numbers, torch.zeros(N_NUMBERS, dtype=torch.float64,
                                                                         device=w_numbers.device)])))
            pending = error
            break
        queued.append((name, H, torch.cat([w_numbers.to(H.device), _hessian_numbers(H)])))
    traces = []
    if queued:
        rows = [numbers for _, _, numbers in queued]
        read = (torch.stack(rows) if len({t.device for t in rows}) == 1
                else torch.stack([t.cpu() for t in rows])).tolist()
        for k, (row, (name, H, _)) in enumerate(zip(read, queued)):
            if not (math.isfinite(row[0]) and math.isfinite(row[1])):
                raise ValueError(f"expert weight of {name} has non-finite values (NaN or inf)")
            _check_float32_range(row[0], row[1], f"expert weight of {name}")
            if H is None:
                break  # (its host error is pending)
            traces.append(_judge_hessian(H, row[2:], f"Hessian of {name}") if d_in else 0.0)
            if then is not None:
                then(k, traces[-1])
    if pending is not None:
        raise pending
    return traces


def check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise ValueError(f"{what} has non-finite values (NaN or inf)")


def is_int(value) -> bool:
    """An ``int`` and not a ``bool`` (which Python counts as one: ``True`` is no bit width)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed) -> int:
    """``seed`` if an integer that torch's generators take (64 bits: past them the first draw
    failed as "Overflow when unpacking long long"), else a ValueError."""
    if not is_integer(seed):  # (numpy's integers too)
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not -2 ** 63 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed}")
    return int(seed)


def check_number(value, what: str, minimum: Optional[float] = None) -> float:
    """``value`` as a float, or a ValueError: not a finite number (a bool, a string: YAML reads
    1e-1 as one), or below ``minimum``. numpy's numbers are taken (a sweep's values read from
    arrays: np.float32 and np.int64 are no Python float or int), as the float they are."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        hint = ""
        if isinstance(value, str):
            try:
                read = float(value)
            except ValueError:
                read = None  # (a word, not a number YAML misread: no hint fits)
            # (YAML reads nan and inf as strings too, which no writing of 1e-1 mends)
            hint = ("" if read is None else " (YAML reads 1e-1 as a string: write 1.0e-1 or 0.1)"
                    if math.isfinite(read) else " (NaN and inf are not numbers it can take: give a finite one)")
        raise ValueError(f"{what} must be a finite number, got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_path(value, what: str, hint: str = "") -> None:
    """A TypeError naming ``what`` unless ``value`` is a path (``str`` or ``os.PathLike``): None
    or a number ended in pathlib's bare 'expected str, bytes or os.PathLike object', naming no
    argument (save_quantized's after converting every layer)."""
    if not isinstance(value, (str, os.PathLike)):
        # (what was given, where it says itself in a few characters: not a state dict's tensors)
        shown = f" {value!r}" if value is None or isinstance(value, (bool, int, float, bytes)) else ""
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}{shown}{hint}")


def check_calibration_paths(calibration: Mapping[str, object]) -> None:
    """A ValueError naming every path of ``calibration`` (whose -> a path or a list of them:
    quantize's tasks, RegMean's models) that is no file or directory, before any is read: each
    one's files are read in turn, so a typo in the last one's path was refused once those before
    it were read and tokenized (minutes on large corpora), and a second typo only on the next run."""
    missing = [f"{p} ({whose}{', a link to nothing' if Path(p).is_symlink() else ''})"
               for whose, sources in calibration.items()
               for p in (sources if isinstance(sources, (list, tuple)) else [sources]) if not os.path.exists(p)]
    if missing:
        raise ValueError(f"no calibration file or directory at {len(missing)} path(s): {'; '.join(missing)}")


def check_outside_calibration(out, calibration: Mapping[str, object], *, resumed: bool = False) -> None:
    """A ValueError where ``out`` is inside (or is) a calibration directory of ``calibration``
    (whose -> a path or a list of them: quantize's tasks, RegMean's models): the checkpoint's files
    (and, ``resumed``, its resume records while it runs) would be that directory's documents in
    the next run, which then fails on them (the resume of an interrupted run too)."""
    where = Path(os.path.realpath(out))
    records = ", and its resume records while it runs," if resumed else ""
    for whose, sources in calibration.items():
        for source in sources if isinstance(sources, (list, tuple)) else [sources]:
            folder = Path(os.path.realpath(source))
            if folder.is_dir() and (where == folder or folder in where.parents):
                raise ValueError(f"the output {out} is inside the calibration directory {source} of {whose}: "
                                 f"its files{records} would be read as calibration documents of {whose} by the "
                                 f"next run{' (a resumed one too)' if resumed else ''}; write it elsewhere")


def device_argument(device) -> Optional[torch.device]:
    """A ``device=`` argument as a ``torch.device`` (None stays None), or a clear error: not a
    device, CUDA where torch sees none (or a GPU past those it sees), another backend torch cannot
    use here (mps, xpu), or meta (which holds no values to compute with)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device (e.g. 'cuda', 'cuda:1'), got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # (an ordinal past the GPUs failed where the device was first used: a checkpoint's read
        # was blamed for torch's 'invalid device ordinal')
        count = torch.cuda.device_count()
        raise ValueError(f"device={str(device)!r}, but torch sees {count} CUDA device{'s' * (count != 1)} here "
                         f"({', '.join(f'cuda:{i}' for i in range(count))})")
    if device.type == "meta":
        raise ValueError("device='meta' holds no values to compute with: name a real device")
    if device.type not in ("cpu", "cuda"):
        # (mps or xpu where torch has none failed where the device was first used: a checkpoint's
        # read was blamed for torch's 'not linked with support for mps devices')
        try:
            torch.empty(0, device=device)
        except Exception as e:
            raise ValueError(f"device={str(device)!r}, but torch cannot use it here ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return device
