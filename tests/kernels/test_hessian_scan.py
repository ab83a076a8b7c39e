"""The Hessian scan (the seven numbers the checks judge a Hessian by) against its torch
reference, on fresh random matrices: Gram matrices and the ways a matrix fails to be one."""

import pytest
import torch

import epmq_kernels.hessian_scan as hs
from epmq_kernels.hessian_scan import (N_NUMBERS, hessian_numbers, hessian_numbers_reference,
                                       hessian_numbers_triton)
from gpu_compile import Launches, compile_as_launched, ptxas_available, run_compile_script

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gram(gen, d, dtype, dead=()):
    X = torch.randn(2 * d + 3, d, generator=gen, dtype=torch.float64)
    X[:, list(dead)] = 0
    return (X.T @ X).to(DEVICE, dtype)


def probes(gen, d, dtype):
    vdt = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(d, 2, generator=gen, dtype=torch.float64).to(DEVICE, vdt)


def assert_numbers_close(got, want, H, vu):
    """Range, diagonal minimum and dead count exactly; the sums to the rounding of their dtype
    over d terms (the trace of half-precision H: the reference sums in H's dtype)."""
    assert got.dtype == torch.float64 and got.shape == (N_NUMBERS,)
    got, want = got.tolist(), want.tolist()
    assert got[:4] == want[:4]
    eps = torch.finfo(vu.dtype).eps * H.shape[0]
    Hv_u = want[5] * float(vu[:, 1].double().norm())
    assert abs(got[4] - want[4]) <= 4 * eps * max(Hv_u, 1e-30)  # (gap: a difference of sums)
    assert got[5] == pytest.approx(want[5], rel=4 * eps, abs=1e-30)
    trace_eps = max(eps, torch.finfo(H.dtype).eps * H.shape[0])
    assert got[6] == pytest.approx(want[6], rel=4 * trace_eps, abs=1e-30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 17, 130])  # (130: several column steps and programs)
def test_numbers_match_reference(gen, dtype, d):
    H = gram(gen, d, dtype, dead=[d // 2])
    vu = probes(gen, d, dtype)
    assert_numbers_close(hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu), H, vu)


@pytest.mark.parametrize("d", [17, 130])
@pytest.mark.parametrize("sign", [1, -1])
def test_range_of_one_signed_matrices(gen, d, sign):
    """The range is of H's entries only: a Gram matrix of positive features (post-ReLU inputs)
    has no entry below its smallest positive one, and its negative none above its largest; a
    tile's lanes past the last column (d not a multiple of the tile) must not count as zeros."""
    X = torch.rand(2 * d + 3, d, generator=gen, dtype=torch.float64) + 0.1
    H = (sign * (X.T @ X)).to(DEVICE, torch.float32)
    vu = probes(gen, d, torch.float32)
    got, want = hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu)
    assert (want[0] > 0) if sign > 0 else (want[1] < 0)
    assert_numbers_close(got, want, H, vu)


def test_a_float64_diagonal_entry_below_float32s_range_is_not_dead_with_float32_probes(gen):
    """With float32 probes the kernel converted an fp64 H to fp32 on load and counted the diagonal's
    zeros there, where an input whose square underflowed fp32 (1e-50, GELU's far left) is 0: a dead
    entry the reference, which judges the diagonal in H's dtype, does not count. Counted in H's dtype;
    the range and the diagonal's minimum are still those rounded to fp32, as the reference's."""
    d = 17
    H = gram(gen, d, torch.float64, dead=[3, 9])
    H[9, 9] = 1e-50
    vu = probes(gen, d, torch.float32)
    got, want = hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu)
    assert want[3] == 1 and want[2] == 0
    assert_numbers_close(got, want, H, vu)


@pytest.mark.parametrize("defect", ["nan", "nan_on_diagonal", "inf", "-inf", "negative_diagonal",
                                    "asymmetric", "strided", "transposed"])
def test_numbers_of_matrices_that_are_not_gram(gen, defect, monkeypatch):
    """What the checks look for, wherever it is (a random entry), and matrices read through
    strides; the last programs' shares reduced in several steps (a small finishing block)."""
    monkeypatch.setattr(hs, "_FINISH_BLOCK", 2)
    d = 45
    H = gram(gen, d, torch.float32)
    i, j = (int(v) for v in torch.randint(0, d, (2,), generator=gen))
    if defect == "nan":
        H[i, j] = float("nan")
    elif defect == "nan_on_diagonal":
        H[i, i] = float("nan")
    elif defect in ("inf", "-inf"):
        H[i, j] = float(defect)
    elif defect == "negative_diagonal":
        H[i, i] = -1.0
    elif defect == "asymmetric":
        H += 0.01 * float(H.norm()) / d * torch.randn(d, d, generator=gen).to(DEVICE)
    elif defect == "strided":
        H = torch.cat([H, H[:, :7]], dim=1)[:, :d]  # (rows d + 7 apart)
    else:
        H = H.T.contiguous().T  # (unit stride down the columns)
    vu = probes(gen, d, torch.float32)
    got, want = hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu)
    if defect.startswith("nan"):
        assert torch.isnan(got[:2]).all() and torch.isnan(want[:2]).all()
    elif defect in ("inf", "-inf"):
        assert got[:2].tolist() == want[:2].tolist() and not torch.isfinite(got[:2]).all()
    else:
        assert_numbers_close(got, want, H, vu)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_the_norm_of_a_float64_hessian_of_any_scale(gen, scale, monkeypatch):
    """|H v| of a float64 H far from 1: its squares, in float64, were 0 (1e-200 X X^T, which the
    checks then refused as not symmetric) or inf; the programs' shares reduced in several steps."""
    monkeypatch.setattr(hs, "_FINISH_BLOCK", 2)
    d = 45
    H = gram(gen, d, torch.float64)
    vu = probes(gen, d, torch.float64)
    unscaled = float(torch.linalg.vector_norm(H.double() @ vu[:, 0].double()))
    for numbers in (hessian_numbers_triton(H * scale, vu), hessian_numbers_reference(H * scale, vu)):
        assert float(numbers[5]) / scale == pytest.approx(unscaled, rel=1e-12)


def test_the_norm_of_a_float32_hessian_near_its_largest(monkeypatch):
    """|H v| of a float32 H whose entries lie near 1e37: a program's share of it (16 rows of
    |(H v)_i| up to 1.1e38) was stored in fp32, inf, where the reference's is 5.6e38 (float64),
    so the symmetry gap, inf, was held against an infinite bound and a lopsided H passed the checks
    by the kernel while the reference's refused it."""
    import epmq.checks

    monkeypatch.setattr(hs, "_FINISH_BLOCK", 2)
    d = 32
    vu = epmq.checks._probes(torch.zeros(d, d, device=DEVICE))[0]
    v, u = vu[:, 0].double(), vu[:, 1].double()
    # c w w^T with w orthogonal to u (u^T H v and v^T H u are A's alone), A lopsided
    w = torch.ones(d, dtype=torch.float64, device=DEVICE)
    w -= (w @ u) / (u @ u) * u
    c = 1e38 / float((w @ v).abs() * w.abs().max())
    gen = torch.Generator().manual_seed(0)
    A = 1e36 * torch.randn(d, d, generator=gen, dtype=torch.float64).to(DEVICE)
    H = (c * torch.outer(w, w) + A).float()
    want = hessian_numbers_reference(H, vu)
    assert 3.4e38 < float(want[5]) < float("inf")
    assert float(hessian_numbers_triton(H, vu)[5]) == pytest.approx(float(want[5]), rel=1e-6)
    for backend in ("torch", "triton"):
        monkeypatch.setattr(epmq.checks, "_scan_backend", lambda H: backend)
        with pytest.raises(ValueError, match="H is not symmetric"):
            epmq.checks.check_hessian(H, d)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("vdt", [torch.float32, torch.float64])
def test_numbers_of_float8_hessians(gen, dtype, vdt):
    """A float8 H (which the reference reads through fp16, every value, NaN and inf kept) was
    loaded as float8 by the kernel: compiled, float8_e4m3fn failed on sm_80 ('fp8e4nv not
    supported in this architecture') and float8 to fp64 in the MLIR pipeline; interpreted, fp64
    probes failed on a bare 'ufunc right_shift' and a NaN entry was read as 480, so the NaN went
    unseen."""
    d = 17
    H = gram(gen, d, torch.float32, dead=[3]).to(dtype)
    vu = torch.randn(d, 2, generator=gen, dtype=torch.float64).to(DEVICE, vdt)
    assert_numbers_close(hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu),
                         H.to(torch.float16), vu)
    H[2, 5] = float("nan")
    got = hessian_numbers_triton(H, vu).tolist()
    assert got[0] != got[0] and got[1] != got[1], got


def test_numbers_argument_errors(gen):
    H = gram(gen, 8, torch.float32)
    with pytest.raises(ValueError, match="square"):
        hessian_numbers_triton(H[:, :7], probes(gen, 8, torch.float32))
    with pytest.raises(ValueError, match="floating point"):
        hessian_numbers_triton(H.int(), probes(gen, 8, torch.float32))
    with pytest.raises(ValueError, match=r"vu must be \[8, 2\]"):
        hessian_numbers_triton(H, probes(gen, 8, torch.float32)[:, :1])
    with pytest.raises(ValueError, match="vu must be"):
        hessian_numbers_triton(H, probes(gen, 8, torch.float32).half())
    with pytest.raises(ValueError, match="different devices.*vu=meta"):
        hessian_numbers_triton(H, torch.zeros(8, 2, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        hessian_numbers(H, probes(gen, 8, torch.float32), backend="cuda")
    empty = hessian_numbers(torch.zeros(0, 0, device=DEVICE), torch.zeros(0, 2, device=DEVICE),
                            backend="triton")
    assert empty.shape == (N_NUMBERS,)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import epmq_kernels.hessian_scan as hs

import torch

for cap in (90, 80):
    for h, v in (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64"), ("fp64", "fp32")):
        BR, BC, warps = hs._SCAN_TILE[torch.float64 if v == "fp64" else torch.float32]
        sig = dict(H=f"*{h}", vu=f"*{v}", partial=f"*{v}", d="i32", stride_h="i32",
                   N_PARTIAL="constexpr", NARROWS="constexpr", BLOCK_R="constexpr", BLOCK_C="constexpr")
        narrows = (h, v) == ("fp64", "fp32")
        triton.compile(ASTSource(hs._scan_kernel, sig, constexprs=dict(N_PARTIAL=hs._N_PARTIAL, NARROWS=narrows,
                                                                       BLOCK_R=BR, BLOCK_C=BC)),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps))
        sig = dict(partial=f"*{v}", numbers="*fp64", n_programs="i32", N_PARTIAL="constexpr",
                   BLOCK="constexpr")
        triton.compile(ASTSource(hs._finish_kernel, sig, constexprs=dict(N_PARTIAL=hs._N_PARTIAL,
                                                                         BLOCK=hs._FINISH_BLOCK)),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=4))
print("compiled")
"""


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_scan_kernels_compile_for_gpus():
    proc = run_compile_script(_COMPILE, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_scan_kernels_compile_as_launched(gen, monkeypatch):
    """The compile test above hands the kernels all-i32 signatures; a launch specialises its
    integers (d = 1, a row stride of 1, one program: constants) and the 16-byte divisibility of
    its pointers and sizes. The launches hessian_numbers_triton makes of one input, 16, 17 and
    130, of every H dtype (float8 read through fp16), fp32 and fp64 probes, and of H a view of a
    larger matrix (its rows strided, its start not 16-byte aligned), compiled for sm_90 and
    sm_80 as launched."""
    scan, finish = Launches(hs._scan_kernel), Launches(hs._finish_kernel)
    monkeypatch.setattr(hs, "_scan_kernel", scan)
    monkeypatch.setattr(hs, "_finish_kernel", finish)
    cases = [(d, dtype, vdt) for d in (1, 16, 17, 130) for dtype, vdt in (
        (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32))]
    cases += [(17, torch.float16, torch.float32), (16, torch.float8_e4m3fn, torch.float64),
              (1, torch.float16, torch.float64)]
    for d, dtype, vdt in cases:
        H, vu = gram(gen, d, dtype), torch.randn(d, 2, generator=gen, dtype=torch.float64).to(DEVICE, vdt)
        assert_numbers_close(hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu),
                             H.to(torch.float16) if dtype.itemsize == 1 else H, vu)
    for d in (1, 17):  # (H[1:, 1:] of a [d + 1, d + 1] matrix: rows of stride d + 1, 4 bytes in)
        H = gram(gen, d + 1, torch.float32)[1:, 1:]
        vu = torch.randn(d, 2, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
        assert_numbers_close(hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu), H, vu)
    proc = run_compile_script(compile_as_launched("epmq_kernels.hessian_scan", [("_scan_kernel", scan.calls),
                                                                                ("_finish_kernel", finish.calls)]),
                              timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_numbers_of_a_layer_sized_hessian(gen):
    """On a GPU, at 4096 inputs (256 programs and more: the finishing loop), fp32 and bf16; a
    NaN anywhere makes the range NaN there too (the GPU's min and max ignore NaN: the kernel
    flags it apart, which the interpreter's NaN-propagating min cannot test)."""
    for dtype in (torch.float32, torch.bfloat16):
        H = gram(gen, 4100, dtype, dead=[5])
        vu = probes(gen, 4100, dtype)
        assert_numbers_close(hessian_numbers_triton(H, vu), hessian_numbers_reference(H, vu), H, vu)
        for i, j in ((17, 2000), (4099, 4099), (0, 0)):
            bad = H.clone()
            bad[i, j] = float("nan")
            assert torch.isnan(hessian_numbers_triton(bad, vu)[:2]).all()


@pytest.mark.parametrize("d", [1, 17, 45, 130])
def test_a_nan_on_the_diagonal_gives_the_references_diagonal_numbers(gen, d, monkeypatch):
    """A NaN on the diagonal made the kernel's minimum of the diagonal the minimum of the
    others (or inf: the NaN alone in its program), where the reference's is NaN; the trace NaN
    in both, the dead count of the zeros beside it."""
    monkeypatch.setattr(hs, "_FINISH_BLOCK", 2)
    H = gram(gen, d, torch.float32, dead=[0] if d > 1 else [])
    i = int(torch.randint(0, d, (1,), generator=gen))
    H[i, i] = float("nan")
    vu = probes(gen, d, torch.float32)
    got, want = hessian_numbers_triton(H, vu).tolist(), hessian_numbers_reference(H, vu).tolist()
    assert want[2] != want[2] and want[6] != want[6]
    assert got[2] != got[2], got
    assert got[6] != got[6] and got[3] == want[3], got


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_operands_that_are_no_tensor_are_refused_by_name(backend):
    """H as a NumPy array or a list ended in Python's bare "'numpy.ndarray' object has no
    attribute 'dim'", and vu as a NumPy array of the right shape and dtype in 'vu must be [5, 2]
    float32 or float64, got (5, 2) float64'; refused, naming the argument and its type."""
    H = torch.eye(5, dtype=torch.float64, device=DEVICE)
    vu = torch.zeros(5, 2, dtype=torch.float64, device=DEVICE)
    for bad in (H.cpu().numpy(), H.tolist()):
        with pytest.raises(ValueError, match=f"H must be a torch.Tensor, got {type(bad).__name__}"):
            hessian_numbers(bad, vu, backend=backend)
    with pytest.raises(ValueError, match="vu must be a torch.Tensor, got ndarray"):
        hessian_numbers(H, vu.cpu().numpy(), backend=backend)


@pytest.mark.parametrize("requires_grad", [("H",), ("vu",), ("H", "vu")])
def test_numbers_keep_no_autograd_graph(gen, requires_grad):
    """A Hessian or probes that require a gradient (a Parameter's Gram matrix): the reference's
    numbers carried an autograd graph (requires_grad, a grad_fn keeping H alive), the kernels' none;
    neither keeps one, and the numbers are those of the detached operands."""
    H, vu = gram(gen, 9, torch.float32), probes(gen, 9, torch.float32)
    want = hessian_numbers_reference(H, vu)
    operands = {name: t.clone().requires_grad_(name in requires_grad) for name, t in (("H", H), ("vu", vu))}
    for backend in ("torch", "triton"):
        got = hessian_numbers(operands["H"], operands["vu"], backend=backend)
        assert not got.requires_grad and got.grad_fn is None, backend
        assert_numbers_close(got, want, H, vu)
