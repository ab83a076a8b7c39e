"""Where Triton kernels run.

Triton decides between compiling for a GPU and interpreting on the CPU when a kernel is
*decorated*, from the TRITON_INTERPRET environment variable. On a machine without CUDA the
kernels can therefore only ever run interpreted, so we set the variable before any kernel
module is imported. On a CUDA machine we leave it as the user set it.
"""

import collections
import contextlib
import functools
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def version(t: torch.Tensor):
    """``t``'s version counter, which every in-place change bumps; None for an inference tensor
    (made under ``torch.inference_mode``), which has none: its in-place changes (possible only
    inside that mode) are not seen by caches keyed on this."""
    return None if t.is_inference() else t._version


def check_same_device(*tensors, names=None):
    """The one device all tensors are on (the torch references' check: any device)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        listing = ", ".join(
            f"{n}={t.device}" for n, t in zip(names or range(len(tensors)), tensors)
        )
        raise ValueError(f"tensors are on different devices: {listing}")
    return devices.pop()


def shares_memory(out, *inputs) -> bool:
    """Whether ``out`` may share memory with one of ``inputs``: the byte ranges they span on one
    device intersect (pointer arithmetic, no pass over the data; conservative for views that
    interleave, such as a tensor's even and odd columns, and exact for disjoint slices of one
    buffer, which a comparison of storages took for one). None and non-tensors among them are
    skipped; an empty tensor spans nothing, nor does a meta one (no data: every pointer is 0)."""

    def span(t):
        start = t.data_ptr()
        return start, start + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))

    if not isinstance(out, torch.Tensor) or out.numel() == 0 or out.is_meta:
        return False
    start, end = span(out)
    return any(isinstance(t, torch.Tensor) and t.numel() and t.device == out.device
               and span(t)[0] < end and start < span(t)[1] for t in inputs)


def check_device(*tensors, names=None):
    """All tensors on one device, and that device one the kernels can run on."""
    device = check_same_device(*tensors, names=names)
    if device.type not in ("cpu", "cuda"):  # (meta tensors have no data: every pointer is 0)
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU ones under TRITON_INTERPRET=1), "
                         f"got {device.type} tensors")
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)"
        )
    return device


def on_tensor_device(launcher):
    """``launcher`` run with its first argument's CUDA device current. Triton launches a kernel
    on the current device, whatever device its tensors are on: a layer on cuda:1 (a model spread
    over GPUs by ``device_map``, or quantized with ``device="cuda:1"``) would otherwise run its
    kernels on cuda:0, where its pointers are not valid."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        # (the first tensor given, by position or by keyword: check_device holds them on one device)
        t = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(t, torch.Tensor) and t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return on_device


def device_values(values, dtype, device) -> torch.Tensor:
    """A 1-D tensor of the Python numbers ``values`` on ``device`` without waiting for it: a
    CUDA copy from pageable memory (``torch.tensor(..., device=)``) synchronizes the stream,
    so the values go through pinned memory, copied asynchronously (the caching host allocator
    keeps the pinned buffer until the copy is done)."""
    host = torch.tensor([float(v) for v in values], dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ------------------------------------------------------------------------- a side stream
#
# Work that the current stream need not wait for until later (E-PMQ's residual products, which
# only the target R reads, while the current stream factors the Hessian) runs on one side
# stream per device, so that the GPU fills the factorization's idle SMs with it. A launch that
# keeps tensors alive which the current stream would otherwise free (a Hessian or an expert's
# weight copied for it) "holds" memory until it is done: at most SIDE_HELD_MAX such launches are
# in flight, the host waiting for the oldest beyond that.
SIDE_HELD_MAX = 8
_SIDE = {}  # (device, owner) -> a side stream
_HELD = {}  # device -> deque of the events of holding launches in flight


def side_stream(device, owner=None) -> torch.cuda.Stream:
    """The side stream of ``device`` (one per ``owner``: work that must not wait behind another
    owner's, e.g. one per current stream), made at first use and kept."""
    key = (device, owner)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device)
    return _SIDE[key]


def side_stream_launch(launch, uses, *, holds: bool = False):
    """``launch()`` enqueued on the side stream of ``uses[0]``'s CUDA device, after all the
    work enqueued on the current stream so far. ``uses``: the tensors it reads or writes that
    were made on the current stream (the allocator keeps their memory from the current stream
    until the side stream is done with them). Returns ``(launch's result, event)``: the
    consumer's stream must ``wait_event(event)`` before reading what ``launch`` wrote."""
    device = uses[0].device
    if device.type != "cuda":
        raise ValueError(f"a side stream is for CUDA tensors, got {device}")
    stream = side_stream(device)
    held = _HELD.setdefault(device, collections.deque())
    while held and held[0].query():
        held.popleft()
    if holds and len(held) >= SIDE_HELD_MAX:
        held.popleft().synchronize()
    stream.wait_stream(torch.cuda.current_stream(device))
    done = torch.cuda.Event()
    try:
        with torch.cuda.stream(stream):
            result = launch()
    finally:  # (a launch that fails part-way may have enqueued work that reads or writes uses)
        done.record(stream)
        for t in uses:
            t.record_stream(stream)
        if holds:
            held.append(done)
    return result, done


@contextlib.contextmanager
def fp32_matmul(tf32: bool):
    """torch's fp32 matrix products inside run on the TF32 tensor cores if and only if ``tf32``,
    whatever the caller set globally."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def ieee_fp32_matmul():
    """Full fp32 products (TF32 off): the solver and the IEEE residual promise them."""
    return fp32_matmul(False)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32 (10 stored mantissa bits), to nearest with ties away from zero
    (``cvt.rna.tf32.f32``), returned as fp32."""
    x = x.float()
    rounded = ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    # a NaN stays NaN (a TF32 one), as the conversion leaves it: the carry took one whose payload
    # lies in the low 13 bits to inf, one with all its payload bits set to 0.0
    return rounded.masked_fill_(torch.isnan(x), float("nan"))


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` cut to TF32 (the low 13 mantissa bits dropped): what a tensor core may read of
    an fp32 operand, the worse of the two conversions; the emulations of a TF32 product use it."""
    x = x.float()
    cut = (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    # a NaN stays NaN, as in tf32_round: one whose payload lies in the low 13 bits alone lost it (inf)
    return cut.masked_fill_(torch.isnan(x), float("nan"))


def _tf32_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    with fp32_matmul(True):
        return torch.mm(A, B)


def _product_of_parts(A_parts, B_parts, mm) -> torch.Tensor:
    """``A_lo B_hi + A_hi B_lo + A_hi B_hi`` from split operands ``(x_hi, x_lo)``: the small terms
    first, so that the large one is added to their fp32 sum."""
    (A_hi, A_lo), (B_hi, B_lo) = A_parts, B_parts
    P = mm(A_lo, B_hi)
    P += mm(A_hi, B_lo)
    P += mm(A_hi, B_hi)
    return P


def _three_products(A, B, split, mm) -> torch.Tensor:
    """``A @ B`` as three products of the parts ``(x_hi, x_lo) = split(x)``."""
    return _product_of_parts(split(A), split(B), mm)


def split_once(mm):
    """``(parts, product)`` for many products by ``mm`` on slices of the same operands:
    ``product(parts(A)[i][slice], parts(B)[j][slice])`` is ``mm`` of the slices. A three-product
    form with ``split`` and ``of_parts`` (``tf32x3_mm``, the fast product ``fp32_mm`` may pick)
    splits each operand once, where splitting each slice would split the wide ones several times
    over (the triangular and symmetric products of E-PMQ slice one operand into 8 column blocks
    of every width: 4.5 times its size); any other ``mm`` takes its operands as they are. A part
    is sliced as its operand would be. ``bf16x3_mm``'s parts are written side by side, so that
    each of its products is one bf16 GEMM (``bf16x3.side_by_side``)."""
    if mm is bf16x3_mm:
        from .bf16x3 import side_by_side  # (here: that module imports this one)

        return side_by_side()
    split = getattr(mm, "split", None)
    if split is None:
        return (lambda X: (X,)), (lambda A_parts, B_parts: mm(A_parts[0], B_parts[0]))
    return split, mm.of_parts


def _tf32_split(x: torch.Tensor):
    hi = tf32_round(x)
    return hi, x - hi


def tf32x3_mm(A: torch.Tensor, B: torch.Tensor, mm=_tf32_mm) -> torch.Tensor:
    """``A @ B`` (fp32) as ``A_hi B_hi + A_hi B_lo + A_lo B_hi``, each by ``mm`` (a TF32 tensor-core
    product by default; the tests pass an emulation of one), where ``x = x_hi + x_lo`` with
    ``x_hi = tf32_round(x)`` and the remainder ``x_lo`` exact (at most 14 significant bits).
    The hi parts are TF32 values, converted exactly; the lo parts are 2^-11 of the operands, so
    whatever their conversion drops, and the lo*lo term, is about 2^-21 of each term: IEEE fp32's
    accuracy class for three TF32 products (TF32's peak rate is 7-8x IEEE fp32's on the A100
    and H100; the speed on a given card is for the benchmarks to show)."""
    return _three_products(A, B, _tf32_split, mm)


tf32x3_mm.split = _tf32_split
tf32x3_mm.of_parts = lambda A_parts, B_parts: _product_of_parts(A_parts, B_parts, _tf32_mm)


def bf16_mm_emulated(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor-core product emulated: the bf16 values multiplied in fp32 (their products
    are exact there), summed in fp32; a tensor core's result up to the order of the sums."""
    return A.float() @ B.float()


def _bf16_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """bf16 ``A @ B`` accumulated and returned in fp32: cuBLAS on CUDA, else emulated."""
    if A.is_cuda:
        try:
            return torch.mm(A, B, out_dtype=torch.float32)
        except TypeError:  # a torch without mm's out_dtype: the emulation is as accurate
            pass
    return bf16_mm_emulated(A, B)


def bf16_split(x: torch.Tensor):
    """fp32 ``x`` as ``(hi, mid)``, two bf16 tensors with ``x ~ hi + mid``: ``hi`` is ``x``
    rounded to bf16 and ``mid`` the remainder rounded again, so ``hi + mid`` holds 16 of fp32's
    24 significant bits (error at most 2^-16 of ``x``)."""
    hi = x.bfloat16()
    return hi, (x - hi).bfloat16()  # (fp32 - bf16 is fp32: no fp32 copy of hi is stored)


def bf16x3_mm(A: torch.Tensor, B: torch.Tensor, mm=_bf16_mm) -> torch.Tensor:
    """``A @ B`` (fp32) as ``A_mid B_hi + A_hi B_mid + A_hi B_hi`` (``bf16_split``), each a bf16
    tensor-core product by ``mm``, the way Triton's ``input_precision="bf16x3"`` splits: the
    dropped ``mid*mid`` term and the splits' remainders are about 2^-16 of each term, between one
    TF32 product (2^-11) and IEEE fp32 (2^-24). bf16's tensor-core rate is twice TF32's on the
    A100, H100 and B200, so this runs at two thirds of one TF32 product's rate and twice
    tf32x3's."""
    return _three_products(A.float(), B.float(), bf16_split, mm)


def ieee_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` with TF32 off."""
    with fp32_matmul(False):
        return torch.mm(A, B)


# The fp32 products fp32_mm chooses from, and for each floor (the least accurate product allowed)
# those at least as accurate: IEEE (2^-24 of each term), tf32x3 (~2^-21), bf16x3 (~2^-16).
FP32_PRODUCTS = {"ieee": ieee_mm, "tf32x3": tf32x3_mm, "bf16x3": bf16x3_mm}
FP32_AT_LEAST = {"ieee": ("ieee",), "tf32x3": ("ieee", "tf32x3"),
                 "bf16x3": ("ieee", "tf32x3", "bf16x3")}
# The product chosen per (GPU, floor) by fp32_mm.
_FP32_MM = {}
FP32_MM_PROBE = 2048  # the square product the candidates are timed on


def fp32_mm(device: torch.device, floor: str = "ieee"):
    """The product for large fp32 matrices on ``device``: the fastest on this GPU of those at least
    as accurate as ``floor`` ("ieee", "tf32x3" or "bf16x3"; FP32_AT_LEAST), ``ieee_mm`` off CUDA.

    Three TF32 or bf16 products pay where the tensor-core rate is several times the fp32 rate
    (TF32 7-8x, bf16 15x on the A100 and H100) and lose where it is not (consumer and L4/A10-class
    cards), so the candidates are timed once per GPU and floor on a FP32_MM_PROBE-sized product
    and the winner is kept on disk like the kernels' configs (``EPMQ_AUTOTUNE=0``: IEEE unless
    already timed).
    """
    if floor not in FP32_AT_LEAST:
        raise ValueError(f"floor must be one of {tuple(FP32_AT_LEAST)}, got {floor!r}")
    if floor == "ieee" or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return ieee_mm  # (no TF32 or bf16 tensor cores before compute capability 8.0)
    device = torch.device("cuda", device.index if device.index is not None
                          else torch.cuda.current_device())
    chosen = _FP32_MM.get((device, floor))
    if chosen is None:
        from . import autotune_cache

        n = FP32_MM_PROBE
        operands = []

        def run(config):
            if not operands:
                gen = torch.Generator(device=device).manual_seed(0)
                operands.extend(torch.randn(n, n, device=device, generator=gen) for _ in range(2))
            parts, product = split_once(FP32_PRODUCTS[config["mm"]])  # (the form E-PMQ runs)
            product(*(parts(X) for X in operands))

        # (the form each is timed in is part of the space: winners timed otherwise are not kept)
        cache = autotune_cache.cache_for("fp32_mm", device, [sorted(FP32_PRODUCTS), n, "split_once"])
        with torch.cuda.device(device):  # (the timing's events are on the current device)
            config = autotune_cache.tune(cache, f"{floor}|{n}x{n}x{n}",
                                         [{"mm": p} for p in FP32_AT_LEAST[floor]], run)
        chosen = _FP32_MM.setdefault((device, floor), FP32_PRODUCTS[config["mm"]])
    return chosen
