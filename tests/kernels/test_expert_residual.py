"""The statistics kernels against their torch references.

``accumulate_residual``: ``G += a (W_k - W_m) H_k`` and ``tr(D H_k D^T)``; ``accumulate_xxt``:
``H += X^T X``. Both update in place, so every test starts the output from random values (an
element the kernel forgets to update, or updates twice, shows) and compares with the reference
run from the same start. Tolerances are fp32 (or fp64) rounding of a sum over ``d_in`` or ``n``
terms in another order.
"""

import re

import pytest
import torch

from epmq_kernels import _runtime
from epmq_kernels.expert_residual import (
    accumulate_residual,
    accumulate_residual_reference,
    accumulate_residual_triton,
    accumulate_xxt,
    accumulate_xxt_reference,
    accumulate_xxt_triton,
    fold_hessians,
    fold_hessians_reference,
    fold_hessians_triton,
    tf32_round,
)
from gpu_compile import Launches, compile_as_launched, ptxas_available, run_compile_script

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = {torch.float32: 2e-6, torch.float64: 1e-13}


def rand(gen, *shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


def gram(gen, n, d, dtype):
    X = torch.randn(n, d, generator=gen) * (0.1 + 3 * torch.rand(d, generator=gen))
    X = X.to(DEVICE, torch.float64)
    return (X.T @ X).to(dtype)


def assert_update_close(out, ref, start, rel):
    """``out - start`` matches ``ref - start`` relative to the size of the update."""
    upd = (ref - start).abs().max().item()
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * max(upd, 1e-30) + rel * start.abs().max().item(), (err, upd)


# --------------------------------------------------------------------------- residual


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_out,d_in", [(37, 96), (70, 33)])
def test_residual_matches_reference(gen, g_dtype, w_dtype, d_out, d_in):
    G0 = rand(gen, d_out, d_in, dtype=g_dtype, scale=10.0)
    W_m = rand(gen, d_out, d_in, dtype=w_dtype)
    W_k = (W_m.float() + rand(gen, d_out, d_in, scale=0.1)).to(w_dtype)
    H_k = gram(gen, 50, d_in, g_dtype)
    a = 1.0 / float(torch.diagonal(H_k).sum())
    G_ref, G_out = G0.clone(), G0.clone()
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, a)
    c_out = accumulate_residual_triton(G_out, W_k, W_m, H_k, a)
    rel = 50 * EPS[g_dtype] * d_in**0.5
    assert_update_close(G_out, G_ref, G0, rel)
    assert abs(c_out - c_ref) <= rel * abs(c_ref)


def nan_after(t):
    """``t`` copied into the front of a larger buffer whose rest is NaN (a contiguous view): a
    kernel that reads past the operand's end, masked off or not, turns its result into NaN."""
    buf = torch.full((t.numel() + 4096,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[: t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("precision", ["ieee", "bf16x3", "tf32"])
@pytest.mark.parametrize("d_out,d_in", [(70, 33), (5, 17)])
def test_residual_reads_nothing_past_its_operands(gen, precision, d_out, d_in):
    """The last k-tile of ``D @ H_k`` runs past ``d_in`` (33 and 17 are no multiple of a tile):
    its lanes there must be masked on both operands, not only on ``D`` (``0 * NaN`` is NaN,
    and the memory after a Hessian may hold anything: an attention mask's -inf)."""
    G0 = rand(gen, d_out, d_in, scale=10.0)
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.1)
    H_k = gram(gen, 50, d_in, torch.float32)
    G_ref, G_out = G0.clone(), nan_after(G0)
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.5, input_precision=precision)
    c_out = accumulate_residual_triton(G_out, nan_after(W_k), nan_after(W_m), nan_after(H_k), 0.5,
                                       input_precision=precision)
    assert torch.isfinite(G_out).all() and abs(c_out) < float("inf")
    rel = (1e-2 if precision == "tf32" else 50 * EPS[torch.float32]) * d_in**0.5
    assert_update_close(G_out, G_ref, G0, rel)
    assert abs(c_out - c_ref) <= rel * abs(c_ref)


def test_residual_of_identical_weights_is_zero(gen):
    G0 = rand(gen, 20, 40)
    W = rand(gen, 20, 40)
    G = G0.clone()
    c = accumulate_residual_triton(G, W, W.clone(), gram(gen, 30, 40, torch.float32), 0.5)
    assert c == 0.0 and torch.equal(G, G0)


def test_residual_accumulates_over_experts(gen):
    d_out, d_in = 24, 48
    W_m = rand(gen, d_out, d_in)
    G_ref = torch.zeros(d_out, d_in, device=DEVICE)
    G_out = torch.zeros_like(G_ref)
    for _ in range(3):
        W_k, H_k = W_m + rand(gen, d_out, d_in, scale=0.1), gram(gen, 40, d_in, torch.float32)
        accumulate_residual(G_ref, W_k, W_m, H_k, 0.7, backend="torch")
        accumulate_residual(G_out, W_k, W_m, H_k, 0.7, backend="triton")
    assert_update_close(G_out, G_ref, torch.zeros_like(G_ref), 1e-4)


def test_residual_tf32x3_option(gen):
    d_out, d_in = 40, 64
    G0 = torch.zeros(d_out, d_in, device=DEVICE)
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.1)
    H_k = gram(gen, 50, d_in, torch.float32)
    G_ref, G_out = G0.clone(), G0.clone()
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, 1.0)
    c_out = accumulate_residual_triton(G_out, W_k, W_m, H_k, 1.0, input_precision="tf32x3")
    assert_update_close(G_out, G_ref, G0, 1e-4)
    assert abs(c_out - c_ref) <= 1e-4 * abs(c_ref)


def test_tf32_round():
    """To nearest with ties away from zero, 10 stored mantissa bits, any sign or exponent."""
    ulp = 2.0**-10
    x = torch.tensor([1.0, 1 + ulp / 2, 1 + ulp / 4, 1 + 3 * ulp / 4, -(1 + ulp / 2), 3.0 * 2**-30,
                      0.0, -0.0])
    want = torch.tensor([1.0, 1 + ulp, 1.0, 1 + ulp, -(1 + ulp), 3.0 * 2**-30, 0.0, -0.0])
    assert torch.equal(tf32_round(x), want)
    r = torch.randn(10_000) * torch.exp(10 * torch.randn(10_000))
    t = tf32_round(r)
    assert (t.view(torch.int32) & 0x1FFF == 0).all()
    assert ((t - r).abs() <= 2.0**-11 * r.abs()).all()
    assert torch.equal(tf32_round(t), t)


def test_tf32_round_of_values_that_are_not_finite():
    """A NaN stays NaN, as cvt.rna.tf32.f32 leaves it: one whose payload is in the low 13 bits
    alone became inf, one with every payload bit set 0.0 or -0.0 (the carry ran out of its bits),
    so the TF32 emulation of a product of such weights was finite, silently. inf stays inf, and
    what rounds past TF32's largest is inf."""
    nans = torch.tensor([0x7F800001, 0x7F801FFF, 0x7FFFFFFF, -1, 0x7FC00000, -0x400000], dtype=torch.int32)
    assert torch.isnan(nans.view(torch.float32)).all()
    assert torch.isnan(tf32_round(nans.view(torch.float32))).all()
    big = torch.tensor([0x7F7FF000, 0x7F7FEFFF], dtype=torch.int32).view(torch.float32)  # (the midpoint past
    x = torch.cat([torch.tensor([float("inf"), -float("inf")]), big, -big])             # TF32's largest, below)
    lim = torch.tensor([0x7F7FE000], dtype=torch.int32).view(torch.float32).item()
    want = torch.tensor([float("inf"), -float("inf"), float("inf"), lim, -float("inf"), -lim])
    assert torch.equal(tf32_round(x), want)


def tf32_bound(W_k, W_m, H_k):
    """Elementwise bound on a TF32 product's deviation from the exact ``D H_k``: each operand
    rounded by at most 2**-10 of itself (covers rounding to nearest and truncation), products
    exact, fp32 sums."""
    D = (W_k.double() - W_m.double()).abs()
    return (2.0**-9 + 2.0**-20) * (D @ H_k.double().abs())


@pytest.mark.parametrize("d_out,d_in", [(40, 64), (37, 70)])
def test_residual_tf32_option(gen, d_out, d_in):
    """The "tf32" kernel and the TF32-emulating reference both stay within TF32's error bound of
    the exact product (under the interpreter the kernel's product is exact fp32)."""
    G0 = rand(gen, d_out, d_in)
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.1)
    H_k = gram(gen, 50, d_in, torch.float32)
    G_out, G_ref = G0.clone(), G0.clone()
    accumulate_residual_triton(G_out, W_k, W_m, H_k, 0.5, input_precision="tf32")
    accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.5, input_precision="tf32")
    exact = G0.double() + 0.5 * (W_k.double() - W_m.double()) @ H_k.double()
    bound = 0.5 * tf32_bound(W_k, W_m, H_k) + 2 * EPS[torch.float32] * exact.abs()
    assert ((G_out.double() - exact).abs() <= bound).all()
    assert ((G_ref.double() - exact).abs() <= bound).all()
    # the emulation does round: its product is not the exact one
    assert (G_ref.double() - exact).abs().max() > 4 * EPS[torch.float32] * exact.abs().max()


def test_residual_argument_errors(gen):
    G = torch.zeros(8, 16, device=DEVICE)
    W = rand(gen, 8, 16)
    with pytest.raises(ValueError, match="H_k"):
        accumulate_residual_triton(G, W, W, torch.eye(8, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="must match"):
        accumulate_residual_triton(G, W[:, :8], W, torch.eye(16, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        accumulate_residual_triton(G.half(), W, W, torch.eye(16, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="input_precision"):
        accumulate_residual_triton(G, W, W, torch.eye(16, device=DEVICE), 1.0, input_precision="bf16")
    with pytest.raises(ValueError, match="backend"):
        accumulate_residual(G, W, W, torch.eye(16, device=DEVICE), 1.0, backend="numpy")
    for fn in (accumulate_residual_triton, accumulate_residual_reference):
        with pytest.raises(ValueError, match="G must not share memory with W_k"):
            fn(G, G, W, torch.eye(16, device=DEVICE), 1.0)


def test_a_task_weight_that_is_no_finite_number_is_refused(gen):
    """The residual's a and the fold's weights were taken as float(a): NaN or inf made G, H_e
    non-finite silently, and a YAML string ("0.5") or a bool passed as its number; refused by
    both backends, G and H_e left as they were. (A device scalar is taken unread.)"""
    G, H_e = torch.zeros(8, 16, device=DEVICE), torch.zeros(16, 16, device=DEVICE)
    W_k, W_m, H = rand(gen, 8, 16), rand(gen, 8, 16), torch.eye(16, device=DEVICE)
    for bad in (float("nan"), float("inf"), "0.5", True, None):
        for fn in (accumulate_residual_triton, accumulate_residual_reference):
            with pytest.raises(ValueError, match=f"a must be a finite number, got {re.escape(repr(bad))}"):
                fn(G, W_k, W_m, H, bad)
        for fn in (fold_hessians_triton, fold_hessians_reference):
            with pytest.raises(ValueError, match=f"weights\\[1\\] must be a finite number, got {re.escape(repr(bad))}"):
                fn(H_e, None, [H, H], [1.0, bad])
    assert not G.any() and not H_e.any()
    accumulate_residual_reference(G, W_k, W_m, H, torch.tensor(0.5, device=DEVICE))
    fold_hessians_reference(H_e, None, [H], torch.tensor([0.5], device=DEVICE))
    assert bool(G.any()) and bool(H_e.any())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_read_of_another_type_is_refused(gen, backend):
    """read='no' (a truthy string, as from a YAML or CLI) returned the trace as a float, read
    from the device, where a float64 tensor left unread was asked for: read must be a bool
    (numpy's too), G left as it was. (holds of accumulate_residual_on_side, likewise.)"""
    import numpy as np

    from epmq_kernels.expert_residual import accumulate_residual_on_side

    G0, W_k, W_m = rand(gen, 8, 16), rand(gen, 8, 16), rand(gen, 8, 16)
    H = gram(gen, 20, 16, torch.float32).to(DEVICE)
    G = G0.clone()
    for read in ("no", 0, None):
        with pytest.raises(ValueError, match=f"read must be a bool, got {read!r}"):
            accumulate_residual(G, W_k, W_m, H, 0.5, read=read, backend=backend)
    assert torch.equal(G, G0)
    trace = accumulate_residual(G, W_k, W_m, H, 0.5, read=np.False_, backend=backend)
    assert isinstance(trace, torch.Tensor) and trace.dtype == torch.float64
    assert isinstance(accumulate_residual(G, W_k, W_m, H, 0.5, read=np.True_, backend=backend), float)
    with pytest.raises(ValueError, match="holds must be a bool, got 'no'"):
        accumulate_residual_on_side(G, W_k, W_m, H, 0.5, holds="no")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fold_overwrite_of_another_type_is_refused(gen, backend):
    """overwrite='no' (a truthy string, as from a YAML or CLI) dropped the sum H_e held, silently:
    overwrite must be a bool (numpy's too), H_e left as it was."""
    import numpy as np

    H = gram(gen, 20, 16, torch.float32).to(DEVICE)
    H_e = H.clone()
    for overwrite in ("no", 1, None):
        with pytest.raises(ValueError, match=f"overwrite must be a bool, got {overwrite!r}"):
            fold_hessians(H_e, None, [H], [1.0], overwrite=overwrite, backend=backend)
    assert torch.equal(H_e, H)
    fold_hessians(H_e, None, [H], [2.0], overwrite=np.False_, backend=backend)
    torch.testing.assert_close(H_e, 3 * H)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fold_weights_given_as_a_tensor_of_no_real_numbers_are_refused(gen, backend):
    """The weights as a tensor were taken without a look at their dtype: complex ended in torch's bare
    'value cannot be converted to type double without overflow', bool was folded as weights 0 and 1
    (a list's bools are refused), meta ended in 'Tensor.item() cannot be called on meta tensors'."""
    H = gram(gen, 20, 16, torch.float32).to(DEVICE)
    H_e = torch.zeros(16, 16, device=DEVICE)
    for weights in (torch.tensor([0.5, 1j], device=DEVICE), torch.tensor([True, False], device=DEVICE),
                    torch.empty(2, device="meta")):
        with pytest.raises(ValueError, match=f"weights must be real numbers, got a {weights.dtype} tensor"):
            fold_hessians(H_e, None, [H, H], weights, backend=backend)
    assert not H_e.any()
    fold_hessians(H_e, None, [H, H], torch.tensor([1, 2], device=DEVICE), backend=backend)  # (integers are)
    torch.testing.assert_close(H_e, 3 * H)


# --------------------------------------------------------------------------- X^T X


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.float64])
def test_xxt_matches_reference(gen, x_dtype, h_dtype):
    n, d = 70, 100  # neither a multiple of any tile
    X = rand(gen, n, d, dtype=x_dtype)
    H0 = rand(gen, d, d, dtype=h_dtype)  # not symmetric: both halves must be updated exactly once
    H_ref, H_out = H0.clone(), H0.clone()
    accumulate_xxt_reference(H_ref, X)
    accumulate_xxt_triton(H_out, X)
    assert_update_close(H_out, H_ref, H0, 50 * EPS[h_dtype] * n**0.5)
    upd = H_out - H0
    torch.testing.assert_close(upd, upd.T, rtol=0, atol=10 * EPS[h_dtype] * float(upd.abs().max()))


def test_xxt_streams_batches(gen):
    d = 48
    H_ref = torch.zeros(d, d, device=DEVICE)
    H_out = torch.zeros_like(H_ref)
    for n in (5, 1, 33):
        X = rand(gen, n, d, dtype=torch.bfloat16)
        accumulate_xxt(H_ref, X, backend="torch")
        accumulate_xxt(H_out, X, backend="triton")
    assert_update_close(H_out, H_ref, torch.zeros_like(H_ref), 1e-5)


def test_xxt_no_tokens_and_errors(gen):
    H = rand(gen, 16, 16)
    H0 = H.clone()
    accumulate_xxt_triton(H, torch.zeros(0, 16, device=DEVICE))
    assert torch.equal(H, H0)
    with pytest.raises(ValueError, match="X must be"):
        accumulate_xxt_triton(H, rand(gen, 4, 8))
    with pytest.raises(ValueError, match="X must be"):
        accumulate_xxt_triton(H, torch.zeros(4, 16, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="backend"):
        accumulate_xxt(H, rand(gen, 4, 16), backend="numpy")
    for backend in ("torch", "triton"):  # (a 1-D H failed with "tuple index out of range")
        for bad in (rand(gen, 16), rand(gen, 16, 17), rand(gen, 1, 16, 16)):
            with pytest.raises(ValueError, match="H must be a square matrix"):
                accumulate_xxt(bad, rand(gen, 4, 16), backend=backend)


def test_hessian_stats_with_triton_backend(gen):
    from epmq.stats import HessianStats

    d = 40
    a = HessianStats(d, device=DEVICE, backend="torch")
    b = HessianStats(d, device=DEVICE, backend="triton")
    for _ in range(2):
        x = rand(gen, 3, 7, d)
        a.add_batch(x)
        b.add_batch(x)
    assert a.n_tokens == b.n_tokens == 42
    assert_update_close(b.H, a.H, torch.zeros_like(a.H), 1e-5)


def test_interpreter_matches_device():
    assert _runtime.INTERPRETED == (DEVICE.type == "cpu")


# --------------------------------------------------------------------------- GPU, layer sized


@pytest.mark.cuda
def test_cuda_residual_tf32_within_its_bound(gen):
    d_out, d_in = 1024, 2048
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.05)
    H_k = gram(gen, 4096, d_in, torch.float32)
    G_out = torch.zeros(d_out, d_in, device=DEVICE)
    accumulate_residual_triton(G_out, W_k, W_m, H_k, 1.0, input_precision="tf32")
    exact = (W_k.double() - W_m.double()) @ H_k.double()
    bound = tf32_bound(W_k, W_m, H_k) + 1e-5 * exact.abs().max()
    assert ((G_out.double() - exact).abs() <= bound).all()


@pytest.mark.cuda
@pytest.mark.parametrize("impl, precision", [
    (impl, p) for impl in ("autotuned", "cublas") for p in ("ieee", "tf32x3", "bf16x3")]
    + [("cublas_split", "bf16x3")])
def test_cuda_residual_against_fp64(gen, precision, impl):
    """Whichever candidate wins, and the cuBLAS ones (three TF32 products for tf32x3, three bf16
    ones for bf16x3, or one of side-by-side split operands) whatever wins: the GPU's own
    conversions and sums, which the CPU tests can only emulate."""
    import epmq_kernels.expert_residual as er

    d_out, d_in = 1024, 2048
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.05)
    H_k = gram(gen, 4096, d_in, torch.float32)
    G_out = torch.zeros(d_out, d_in, device=DEVICE)
    if impl != "autotuned":
        config = er.CUBLAS if impl == "cublas" else er.SPLIT_CUBLAS
        c_out = float(er._launch_residual(G_out, W_k, W_m, H_k, 1.0, precision, config).double().sum())
    else:
        c_out = accumulate_residual_triton(G_out, W_k, W_m, H_k, 1.0, input_precision=precision)
    G_64 = torch.zeros(d_out, d_in, device=DEVICE, dtype=torch.float64)
    c_64 = accumulate_residual_reference(G_64, W_k, W_m, H_k.double(), 1.0)
    G_32 = torch.zeros(d_out, d_in, device=DEVICE)
    accumulate_residual_reference(G_32, W_k, W_m, H_k, 1.0)
    err_out = (G_out.double() - G_64).abs().max().item()
    err_32 = (G_32.double() - G_64).abs().max().item()
    if precision == "bf16x3":  # about 2**-16 of each term: bounded by the terms' sizes
        terms = (W_k.double() - W_m.double()).abs() @ H_k.double().abs()
        assert err_out <= 2**-14 * terms.max().item() + 8 * err_32, (err_out, err_32)
    else:
        # no worse than torch's own fp32 product (TF32 off) by more than a small factor; tf32x3
        # drops the lo*lo products, about 2**-21 of each term
        factor = 8 if precision == "ieee" else 32
        assert err_out <= factor * err_32 + 1e-7 * G_64.abs().max().item(), (err_out, err_32)
    assert abs(c_out - c_64) <= 1e-4 * abs(c_64)


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_out,d_in", [(37, 96), (70, 33)])
def test_cublas_candidate_matches_reference(gen, g_dtype, d_out, d_in):
    """The library candidate of the residual (torch products, so it runs here too; on the CPU
    TF32 is off, so "ieee" and "tf32x3", whose split is exact, are compared; the TF32 rounding
    itself is emulated in test_tf32x3_product_with_emulated_tf32)."""
    import epmq_kernels.expert_residual as er

    G0 = rand(gen, d_out, d_in, dtype=g_dtype, scale=10.0)
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.1)
    H_k = gram(gen, 50, d_in, g_dtype)
    G_ref, G_out = G0.clone(), G0.clone()
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.3)
    c_out = float(er._launch_residual(G_out, W_k, W_m, H_k, 0.3, "ieee", er.CUBLAS).double().sum())
    assert_update_close(G_out, G_ref, G0, 10 * EPS[g_dtype])
    assert abs(c_out - c_ref) <= 10 * EPS[g_dtype] * abs(c_ref)
    G_x3 = G0.clone()
    c_x3 = float(er._launch_residual(G_x3, W_k, W_m, H_k, 0.3, "tf32x3", er.CUBLAS).double().sum())
    assert_update_close(G_x3, G_ref, G0, 10 * EPS[torch.float32])
    assert abs(c_x3 - c_ref) <= 10 * EPS[torch.float32] * abs(c_ref)
    # bf16x3: on the CPU its bf16 products are emulated exactly, as the reference emulates them
    G_b3, G_b3_ref = G0.clone(), G0.clone()
    c_b3 = float(er._launch_residual(G_b3, W_k, W_m, H_k, 0.3, "bf16x3", er.CUBLAS).double().sum())
    c_b3_ref = accumulate_residual_reference(G_b3_ref, W_k, W_m, H_k, 0.3, input_precision="bf16x3")
    assert_update_close(G_b3, G_b3_ref, G0, 10 * EPS[torch.float32])
    assert abs(c_b3 - c_b3_ref) <= 10 * EPS[torch.float32] * abs(c_b3_ref)
    assert_update_close(G_b3, G_ref, G0, 2**-13)  # and ~2^-16 of the terms from the exact one


def test_split_kernel_is_torchs_bf16_split(gen):
    """The side-by-side split of the one-product bf16x3 candidate writes exactly the parts of
    ``_runtime.bf16_split`` (rounding to nearest, ties to even): at every scale, at ties, on
    bf16 values (remainder 0) and on subnormals, for a difference of two weights and for one
    matrix, in both layouts."""
    import epmq_kernels.bf16x3 as sbs
    from epmq_kernels._runtime import bf16_split

    d_out, d_in = 37, 70
    X = torch.randn(d_out, d_in, generator=gen) * torch.exp(8 * torch.randn(d_out, d_in, generator=gen))
    base = torch.randn(d_out, d_in, generator=gen).bfloat16().float()
    mantissa, exponent = torch.frexp(base[0])  # (|b| = |m| 2^e, m in [0.5, 1): bf16 ulp 2^(e-8))
    X[0] = base[0] + torch.sign(base[0]) * torch.ldexp(torch.ones(d_in), exponent - 9)  # exact ties
    X[1] = base[1]  # bf16 values
    X[2] = torch.randn(d_in, generator=gen) * 1e-39  # subnormal in fp32
    X = X.to(DEVICE)
    Y = rand(gen, d_out, d_in)
    A = torch.empty(d_out, 3 * d_in, dtype=torch.bfloat16, device=DEVICE)
    sbs.split_bf16(X, Y, A.view(d_out, 3, d_in), mid=1)
    hi, mid = bf16_split(X - Y)
    for part, want in enumerate((hi, mid, hi)):
        assert torch.equal(A[:, part * d_in:(part + 1) * d_in].view(torch.int16), want.view(torch.int16))
    B = torch.empty(3 * d_out, d_in, dtype=torch.bfloat16, device=DEVICE)
    sbs.split_bf16(X, None, B.view(3, d_out, d_in).transpose(0, 1), mid=2)
    hi, mid = bf16_split(X)
    for part, want in enumerate((hi, hi, mid)):
        assert torch.equal(B[part * d_out:(part + 1) * d_out].view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_out,d_in", [(37, 96), (70, 33), (64, 513)])
def test_one_product_bf16x3_candidate_matches_reference(gen, w_dtype, d_out, d_in):
    """bf16x3 by one product of side-by-side split operands (``SPLIT_CUBLAS``: on the CPU the
    bf16 product is emulated exactly, as the reference emulates it) is the reference's three
    products up to fp32 sums in another order, G's update and the trace alike."""
    import epmq_kernels.expert_residual as er

    G0 = rand(gen, d_out, d_in, scale=10.0)
    W_m = rand(gen, d_out, d_in).to(w_dtype)
    W_k = (W_m.float() + rand(gen, d_out, d_in, scale=0.1)).to(w_dtype)
    H_k = gram(gen, 50, d_in, torch.float32)
    G_out, G_ref = G0.clone(), G0.clone()
    c_out = float(er._launch_residual(G_out, W_k, W_m, H_k, 0.3, "bf16x3", er.SPLIT_CUBLAS).double().sum())
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.3, input_precision="bf16x3")
    assert_update_close(G_out, G_ref, G0, 10 * EPS[torch.float32])
    assert abs(c_out - c_ref) <= 10 * EPS[torch.float32] * abs(c_ref)


@pytest.mark.parametrize("d_out,d_in", [(37, 96), (64, 513)])
def test_tf32x3_product_with_emulated_tf32(gen, d_out, d_in):
    """Three TF32 products of the split operands are as accurate as an IEEE fp32 product (to a
    small factor), where one TF32 product errs by ~2^-11 of its terms; TF32 emulated by
    truncating both operands (the worse of the conversions) and multiplying exactly in fp64."""
    from epmq_kernels._runtime import tf32_round, tf32_truncate, tf32x3_mm

    def mm_tf32(A, B):
        return (tf32_truncate(A).double() @ tf32_truncate(B).double()).float()

    D = rand(gen, d_out, d_in, scale=0.1)
    H = gram(gen, 50, d_in, torch.float32)
    exact = D.double() @ H.double()
    scale = (D.double().abs() @ H.double().abs())  # the size of each sum's terms
    err = lambda P: float(((P.double() - exact).abs() / scale).max())  # noqa: E731
    e_x3, e_ieee = err(tf32x3_mm(D, H, mm=mm_tf32)), err(D @ H)
    e_one = err(mm_tf32(tf32_round(D), tf32_round(H)))
    assert e_x3 <= 4 * e_ieee + 2**-20, (e_x3, e_ieee)
    assert e_one > 50 * e_x3, (e_one, e_x3)


def test_bf16_split():
    """``hi + mid`` holds x to 2^-16 of itself (two bf16 roundings to nearest), any sign or scale."""
    from epmq_kernels._runtime import bf16_split

    x = torch.randn(10_000) * torch.exp(10 * torch.randn(10_000))
    hi, mid = bf16_split(x)
    assert hi.dtype == mid.dtype == torch.bfloat16
    assert ((hi.float() - x).abs() <= 2.0**-8 * x.abs()).all()
    assert ((hi.float() + mid.float() - x).abs() <= 2.0**-16 * x.abs()).all()
    assert torch.equal(bf16_split(hi.float())[1].float(), torch.zeros_like(x))  # bf16 values: exact


@pytest.mark.parametrize("d_out,d_in", [(37, 96), (64, 513)])
def test_bf16x3_product_between_tf32_and_ieee(gen, d_out, d_in):
    """Three bf16 products of split operands err by about 2^-16 of their terms: well under one
    TF32 product (2^-11), above IEEE fp32; bf16 products emulated exactly (in fp64)."""
    from epmq_kernels._runtime import bf16x3_mm, tf32_round

    def mm_bf16(A, B):
        return (A.double() @ B.double()).float()

    D = rand(gen, d_out, d_in, scale=0.1)
    H = gram(gen, 50, d_in, torch.float32)
    exact = D.double() @ H.double()
    scale = (D.double().abs() @ H.double().abs())
    err = lambda P: float(((P.double() - exact).abs() / scale).max())  # noqa: E731
    e_b3, e_ieee = err(bf16x3_mm(D, H, mm=mm_bf16)), err(D @ H)
    e_tf32 = err(tf32_round(D).double() @ tf32_round(H).double())
    assert e_b3 <= 2**-14, e_b3
    assert e_tf32 > 10 * e_b3, (e_tf32, e_b3)
    assert e_b3 > e_ieee, (e_b3, e_ieee)  # (the emulation is not by chance IEEE)
    # the reference's emulation is this product
    G = torch.zeros(d_out, d_in, device=DEVICE)
    accumulate_residual_reference(G, D, torch.zeros_like(D), H, 1.0, input_precision="bf16x3")
    assert float(((G.double() - exact).abs() / scale).max()) <= 2**-14


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "bf16x3", "tf32"])
@pytest.mark.parametrize("pick", ["first", "last", "most accurate fused"])
def test_residual_autotune_offers_every_candidate_at_least_as_accurate(gen, precision, pick,
                                                                        monkeypatch):
    """What the autotuner is offered for a precision: the fused configs and cuBLAS of it and of
    every more accurate precision (its own first: the pick when timing is off), and that the
    winner is launched as it was timed, at its own precision (the timing itself needs a GPU:
    the tuner is replaced by one that picks by rule, and the launch is recorded)."""
    import epmq_kernels.autotune_cache as ac
    import epmq_kernels.expert_residual as er

    offered, launched = [], []

    def tuner(cache, key, candidates, run):
        offered.extend(candidates)
        if pick == "first":
            return candidates[0]
        if pick == "last":
            return candidates[-1]
        return next(c for c in candidates if c["precision"] == "ieee" and "impl" not in c)

    monkeypatch.setattr(er._runtime, "INTERPRETED", False)
    monkeypatch.setattr(er, "check_device", lambda *tensors, names=None: DEVICE)
    monkeypatch.setattr(er, "_RESIDUAL_CHOSEN", {})
    monkeypatch.setattr(ac, "tune", tuner)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(er, "_launch_residual",
                        lambda G, W_k, W_m, H_k, a, p, config: launched.append((p, config))
                        or torch.zeros(1, dtype=torch.float64))
    G = torch.zeros(8, 16, device=DEVICE)
    W = rand(gen, 8, 16)
    accumulate_residual_triton(G, W, W, torch.eye(16, device=DEVICE), 1.0, input_precision=precision)

    allowed = {"ieee": ["ieee"], "tf32x3": ["tf32x3", "ieee"], "bf16x3": ["bf16x3", "tf32x3", "ieee"],
               "tf32": ["tf32", "bf16x3", "tf32x3", "ieee"]}
    expected = [("fused", p, tuple(c)) for p in allowed[precision] for c in er.RESIDUAL_SPACE[p]]
    expected += [("cublas", p, None) for p in allowed[precision]]
    expected += [("cublas_split", "bf16x3", None)] if "bf16x3" in allowed[precision] else []
    got = [(c["impl"], c["precision"], None) if "impl" in c else
           ("fused", c["precision"], (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"],
                                      c["num_stages"])) for c in offered]
    assert got == expected
    want = {"first": (precision, er.RESIDUAL_SPACE[precision][0]),
            "last": ("bf16x3", er.SPLIT_CUBLAS) if precision in ("bf16x3", "tf32")
            else ("ieee", er.CUBLAS),
            "most accurate fused": ("ieee", er.RESIDUAL_SPACE["ieee"][0])}[pick]
    assert launched == [want]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "bf16x3", "tf32"])
def test_cuda_residual_autotunes_on_a_scratch_g(gen, precision, tmp_path, monkeypatch):
    """The first call for a shape times every config of RESIDUAL_SPACE on a scratch G: the
    caller's G is accumulated exactly once, and the winner is cached on disk."""
    import epmq_kernels.expert_residual as er

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
    monkeypatch.setattr(er, "_RESIDUAL_CHOSEN", {})
    d_out, d_in = 512, 768
    W_m = rand(gen, d_out, d_in)
    W_k = W_m + rand(gen, d_out, d_in, scale=0.05)
    H_k = gram(gen, 2048, d_in, torch.float32)
    G0 = rand(gen, d_out, d_in)
    G_out, G_ref = G0.clone(), G0.clone()
    c_out = accumulate_residual_triton(G_out, W_k, W_m, H_k, 0.5, input_precision=precision)
    c_ref = accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.5, input_precision=precision)
    rel = 1e-2 if precision == "tf32" else 1e-4  # tf32: the two may round operands differently
    assert_update_close(G_out, G_ref, G0, rel)
    assert abs(c_out - c_ref) <= rel * abs(c_ref)
    files = list((tmp_path / "autotune").glob("residual__*.json"))
    assert len(files) == 1 and f"{precision}|{d_out}x{d_in}" in files[0].read_text()


@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_cuda_xxt_layer_sized(gen, x_dtype):
    n, d = 8192, 4096
    X = rand(gen, n, d, dtype=x_dtype)
    H_out = torch.zeros(d, d, device=DEVICE)
    accumulate_xxt_triton(H_out, X)
    H_64 = X.double().T @ X.double()
    err = (H_out.double() - H_64).abs().max().item()
    assert err <= 1e-4 * H_64.abs().max().item()
    # off-diagonal tiles are written with their transposes, so H is symmetric to the last bit
    # there; inside diagonal tiles the MMA's internal order might differ between (i, j) and (j, i)
    torch.testing.assert_close(H_out, H_out.T, rtol=0, atol=1e-6 * H_64.abs().max().item())


# --------------------------------------------------------------------------- the compiled path

# Compiles the statistics kernels in every configuration the launchers use, for sm_90 and
# sm_80, in a subprocess without the interpreter: on a machine without CUDA this shows that the
# compiled path builds. The IEEE fp32 residual must not touch the tensor cores (TF32).
_COMPILE_STATS = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import epmq_kernels.bf16x3 as sbs
import epmq_kernels.expert_residual as er

TY = {torch.float32: "fp32", torch.float64: "fp64"}
for cap in (90, 80):
    configs = [((torch.float32, p), c) for p in er.RESIDUAL_SPACE for c in er.RESIDUAL_SPACE[p]]
    configs += [((torch.float64, "ieee"), er._RESIDUAL_FP64),
                ((torch.float32, "ieee"), er._RESIDUAL_INTERPRETED)]
    for (dtype, precision), (bm, bn, bk, warps, stages) in configs:
        const = dict(INPUT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        t = TY[dtype]
        sig = {n: "constexpr" if n in const else (f"*{t}" if n in ("G", "a_ptr", "partial", "H_k")
               else "*fp32" if n in ("W_k", "W_m") else "i32") for n in er._residual_kernel.arg_names}
        k = triton.compile(ASTSource(er._residual_kernel, sig, constexprs=const),
                           target=GPUTarget("cuda", cap, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        ptx = k.asm["ptx"]
        if dtype == torch.float32 and precision == "ieee":
            assert "mma" not in ptx and "fma.rn.f32" in ptx, "IEEE fp32 residual uses the tensor cores"
    for x, h, key, dot in (("bf16", "fp32", "16bit", tl.bfloat16),
                           ("fp16", "fp32", "16bit", tl.float16),
                           ("fp32", "fp32", torch.float32, tl.float32),
                           ("fp64", "fp64", torch.float64, tl.float64)):
        block, bk, warps, stages = er._XXT_CONFIG[key]
        const = dict(DOT_DTYPE=dot, INPUT_PRECISION="ieee", BLOCK=block, BLOCK_K=bk)
        sig = {n: "constexpr" if n in const else dict(H=f"*{h}", X=f"*{x}").get(n, "i32")
               for n in er._xxt_kernel.arg_names}
        triton.compile(ASTSource(er._xxt_kernel, sig, constexprs=const),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps, num_stages=stages))
    br, bc, warps = sbs.SPLIT_TILE
    for x, has_y, mid, n_parts, has_hi in (("fp32", True, 1, 3, False), ("bf16", True, 1, 3, False),
                                           ("fp32", False, 2, 3, False), ("fp32", False, 0, 2, True)):
        const = dict(HAS_Y=has_y, MID=mid, N_PARTS=n_parts, HAS_HI=has_hi, BLOCK_R=br, BLOCK_C=bc)
        sig = {n: "constexpr" if n in const else dict(X=f"*{x}", Y=f"*{x}", OUT="*i16", HI="*i16").get(n, "i32")
               for n in sbs._split_kernel.arg_names}
        triton.compile(ASTSource(sbs._split_kernel, sig, constexprs=const),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps))
    for w in ("fp32", "bf16"):
        const = dict(BLOCK_R=br, BLOCK_C=bc)
        sig = {n: "constexpr" if n in const else (f"*{w}" if n in ("W_k", "W_m") else "*fp32"
               if n in ("G", "P", "a_ptr", "partial") else "i32") for n in er._add_product_kernel.arg_names}
        triton.compile(ASTSource(er._add_product_kernel, sig, constexprs=const),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps))
    BLOCK, warps = er._FOLD_BLOCK
    for e, h, n_in, has_m in (("fp32", "fp32", 4, True), ("fp32", "fp64", 3, False),
                              ("fp64", "fp32", 1, True), ("fp32", "bf16", 2, True)):
        const = dict(N_IN=n_in, HAS_M=has_m, READ_E=has_m, BLOCK=BLOCK)
        sig = {n: "constexpr" if n in const else (f"*{e}" if n in ("H_e", "H_m", "a_ptr")
               else f"*{h}" if n.startswith("H") else "i64") for n in er._fold_kernel.arg_names}
        triton.compile(ASTSource(er._fold_kernel, sig, constexprs=const),
                       target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps))
print("compiled")
"""


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_statistics_kernels_compile_for_gpus():
    proc = run_compile_script(_COMPILE_STATS, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- Hessian fold


@pytest.mark.parametrize("e_dtype,h_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                             (torch.float32, torch.bfloat16), (torch.float32, torch.float64)])
@pytest.mark.parametrize("n_hessians", [1, 3, 4, 9])
@pytest.mark.parametrize("with_merged", [True, False])
def test_fold_matches_reference(gen, e_dtype, h_dtype, n_hessians, with_merged):
    """Every Hessian is folded in once, with its own weight, in groups of FOLD_ARITY and a
    shorter last one; a transposed (non-contiguous) Hessian is read as the matrix it is."""
    d = 37  # (37^2 elements: not a multiple of the kernel's block)
    hessians = [gram(gen, 50, d, torch.float64).to(h_dtype) for _ in range(n_hessians)]
    hessians[-1] = (hessians[-1] + rand(gen, d, d, dtype=torch.float64).to(h_dtype)).T
    weights = (torch.rand(n_hessians, generator=gen) + 0.1).tolist()
    H_e, H_m = rand(gen, d, d, dtype=e_dtype), rand(gen, d, d, dtype=e_dtype) if with_merged else None
    want_e, want_m = H_e.clone(), None if H_m is None else H_m.clone()
    fold_hessians_reference(want_e, want_m, hessians, weights)
    got_e, got_m = H_e.clone(), None if H_m is None else H_m.clone()
    fold_hessians_triton(got_e, got_m, hessians, weights)
    # (one rounding per Hessian and sum, whether or not the product and the sum are fused)
    assert_update_close(got_e, want_e, H_e, n_hessians * EPS[e_dtype])
    if H_m is not None:
        assert_update_close(got_m, want_m, H_m, n_hessians * EPS[e_dtype])
    before_e, before_m = H_e.clone(), None if H_m is None else H_m.clone()
    assert fold_hessians(H_e, H_m, [], [], backend="triton") is None  # (nothing to fold: unchanged)
    assert torch.equal(H_e, before_e) and (H_m is None or torch.equal(H_m, before_m))
    # overwriting: H_e's old values (NaN here) are not read, whatever the number of passes
    want = torch.zeros_like(H_e)
    fold_hessians_reference(want, None, hessians, weights)
    got = torch.full_like(H_e, float("nan"))
    fold_hessians(got, None, hessians, weights, backend="triton", overwrite=True)
    assert_update_close(got, want, torch.zeros_like(H_e), n_hessians * EPS[e_dtype])
    ref = torch.full_like(H_e, float("nan"))
    fold_hessians(ref, None, hessians, weights, backend="torch", overwrite=True)
    assert torch.equal(ref, want)
    ones = [1.0] + weights[1:]  # (a first weight of 1: the reference copies the first Hessian)
    want = torch.zeros_like(H_e)
    fold_hessians_reference(want, None, hessians, ones)
    for backend in ("torch", "triton"):
        got = torch.full_like(H_e, float("nan"))
        fold_hessians(got, None, hessians, ones, backend=backend, overwrite=True)
        assert_update_close(got, want, torch.zeros_like(H_e), n_hessians * EPS[e_dtype])
        if backend == "torch":
            assert torch.equal(got, want)


def test_fold_argument_errors(gen):
    H_e = torch.zeros(8, 8, device=DEVICE)
    H = rand(gen, 8, 8)
    with pytest.raises(ValueError, match="2 Hessians but 1 weights"):
        fold_hessians_triton(H_e, None, [H, H], [1.0])
    with pytest.raises(ValueError, match=r"Hessian 1 is \(8, 9\)"):
        fold_hessians_triton(H_e, None, [H, rand(gen, 8, 9)], [1.0, 1.0])
    with pytest.raises(ValueError, match="H_m must be"):
        fold_hessians_triton(H_e, torch.zeros(8, 8, dtype=torch.float64, device=DEVICE), [H], [1.0])
    with pytest.raises(ValueError, match="H_e must be contiguous"):
        fold_hessians_triton(torch.zeros(8, 16, device=DEVICE)[:, :8], None, [H], [1.0])
    with pytest.raises(ValueError, match="different devices.*Hessian 0=meta"):
        fold_hessians_triton(H_e, None, [torch.zeros(8, 8, device="meta")], [1.0])
    with pytest.raises(ValueError, match="backend"):
        fold_hessians(H_e, None, [H], [1.0], backend="cuda")
    with pytest.raises(ValueError, match="H_m must be None"):
        fold_hessians_triton(H_e, H_e.clone(), [H], [1.0], overwrite=True)
    empty = torch.full((8, 8), float("nan"), device=DEVICE)
    fold_hessians_triton(empty, None, [], [], overwrite=True)  # (no Hessian: the zero sum)
    assert torch.equal(empty, torch.zeros_like(empty))
    half = torch.ones(8, 8, dtype=torch.float16, device=DEVICE)  # (refused before it is zeroed)
    with pytest.raises(ValueError, match="float32 or float64"):
        fold_hessians_triton(half, None, [], [], overwrite=True)
    assert bool((half == 1).all())


_COMPILE_SPLIT_AT_ONE_INPUT = r"""
import sys
sys.path.insert(0, "tests/kernels")
import torch
from gpu_compile import compile_sm90
import epmq_kernels.bf16x3 as sbs

BR, BC, warps = sbs.SPLIT_TILE
for d_in in (1, 7):  # (d_in = 1: its strides of 1 would be constants, were they specialised)
    X = torch.empty(5, d_in)
    hi = torch.empty(5, d_in, dtype=torch.int16)
    for bits in (torch.empty(5, 3, d_in, dtype=torch.int16),  # (parts after each other, and
                 torch.empty(5, d_in, 2, dtype=torch.int16).transpose(1, 2)):  # interleaved)
        args = [X, X, bits, hi, 5, d_in, X.stride(0), X.stride(0), bits.stride(0), bits.stride(1),
                bits.stride(2), hi.stride(0)]
        const = dict(N_PARTS=bits.shape[1], MID=1, HAS_Y=True, HAS_HI=bits.shape[1] == 2,
                     BLOCK_R=BR, BLOCK_C=BC)
        compile_sm90(sbs._split_kernel, args, const, warps, 1)
print("compiled")
"""


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_split_kernel_compiles_for_one_input():
    """A layer of one input (d_in = 1) launches the split kernel with strides of 1, which a
    real launch would make constants: the kernel must compile so specialised too."""
    proc = run_compile_script(_COMPILE_SPLIT_AT_ONE_INPUT, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_fp64_sums_of_16_bit_operands_compile_for_gpus(gen, monkeypatch):
    """An fp64 H of bf16, fp16 or float8 activations (a bf16 model's, into HessianStats of
    dtype float64) and an fp64 G of bf16 or fp16 expert weights or Hessian were launched with
    the 16-bit tiles converted to fp64 inside the product, which sm_90 does not compile (Triton's
    MMAv2 operand lowering asserts: 'PassManager::run failed'): compiled as launched."""
    import epmq_kernels.expert_residual as er

    xxt, residual = Launches(er._xxt_kernel), Launches(er._residual_kernel)
    monkeypatch.setattr(er, "_xxt_kernel", xxt)
    monkeypatch.setattr(er, "_residual_kernel", residual)
    for x_dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        X = rand(gen, 5, 40).to(x_dtype)
        H = accumulate_xxt_triton(torch.zeros(40, 40, dtype=torch.float64, device=DEVICE), X)
        torch.testing.assert_close(H, accumulate_xxt_reference(torch.zeros_like(H), X), rtol=1e-12, atol=1e-12)
    for w_dtype, h_dtype in ((torch.bfloat16, torch.float64), (torch.float16, torch.float64),
                             (torch.float64, torch.bfloat16)):
        G = torch.zeros(24, 40, dtype=torch.float64, device=DEVICE)
        W_k, W_m, H_k = rand(gen, 24, 40).to(w_dtype), rand(gen, 24, 40).to(w_dtype), rand(gen, 40, 40)
        accumulate_residual_triton(G, W_k, W_m, H_k.to(h_dtype), 0.5)
        G_ref = torch.zeros_like(G)
        accumulate_residual_reference(G_ref, W_k, W_m, H_k.to(h_dtype), 0.5)
        torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)
    assert len(xxt.calls) == 3 and len(residual.calls) == 3
    proc = run_compile_script(compile_as_launched("epmq_kernels.expert_residual", [("_xxt_kernel", xxt.calls),
                                                  ("_residual_kernel", residual.calls)]), timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]


def _xxt_as_on_a_gpu(name, args, kwargs):
    # (interpreted, bf16 tiles enter the product as fp32: the interpreter's tl.dot mishandles
    # bf16; a GPU's launch takes them as bf16)
    import triton.language as tl

    if name == "_xxt_kernel" and args[1].dtype == torch.bfloat16:
        kwargs = dict(kwargs, DOT_DTYPE=tl.bfloat16)
    return args, kwargs


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_fold_and_xxt_kernels_compile_as_launched(gen, monkeypatch):
    """The compile test above hands _fold_kernel its size as i64 and _xxt_kernel all-i32 sizes;
    a launch passes n as i32 below 2^31 and specialises integers of 1 (one input, one token, a
    1 x 1 Hessian: n, d and the strides constants) and the 16-byte divisibility of its pointers
    and sizes. The launches fold_hessians_triton (1 to 5 Hessians of every dtype, with H_m and
    without, overwritten or not) and accumulate_xxt_triton (1, 17 and 40 inputs, every
    activation dtype, fp32 and fp64 H) make, compiled for sm_90 and sm_80 as launched."""
    import epmq_kernels.expert_residual as er

    fold, xxt = Launches(er._fold_kernel), Launches(er._xxt_kernel)
    monkeypatch.setattr(er, "_fold_kernel", fold)
    monkeypatch.setattr(er, "_xxt_kernel", xxt)
    for d, e_dtype, h_dtypes, with_m, overwrite in (
            (1, torch.float32, [torch.float32], True, False),
            (1, torch.float64, [torch.bfloat16, torch.float64], False, True),
            (17, torch.float32, [torch.float16, torch.float8_e4m3fn, torch.float64], False, True),
            (40, torch.float32, [torch.float32] * 5, False, False),
            (40, torch.float64, [torch.float32, torch.bfloat16, torch.float16, torch.float64], True, False)):
        hessians = [rand(gen, d, d).to(dt) for dt in h_dtypes]
        weights = [0.5 + k for k in range(len(hessians))]
        H_e, H_m = rand(gen, d, d).to(e_dtype), rand(gen, d, d).to(e_dtype) if with_m else None
        want_e, want_m = H_e.clone(), None if H_m is None else H_m.clone()
        fold_hessians_reference(want_e, want_m, hessians, weights, overwrite=overwrite)
        fold_hessians_triton(H_e, H_m, hessians, weights, overwrite=overwrite)
        # (fp32 sums of up to five weighted terms: within a few ulps of their scale, not of 1e-6)
        assert_update_close(H_e, want_e, torch.zeros_like(want_e), 1e-6)
    for n, d in ((1, 1), (5, 17), (3, 40)):
        for h_dtype in (torch.float32, torch.float64):
            for x_dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                if h_dtype == torch.float32 and x_dtype == torch.float64:
                    continue
                X = rand(gen, n, d).to(x_dtype)
                H = accumulate_xxt_triton(torch.zeros(d, d, dtype=h_dtype, device=DEVICE), X)
                torch.testing.assert_close(H, accumulate_xxt_reference(torch.zeros_like(H), X),
                                           rtol=1e-5, atol=1e-5)
    proc = run_compile_script(compile_as_launched("epmq_kernels.expert_residual", [
        ("_fold_kernel", fold.calls), ("_xxt_kernel", xxt.calls)], constexprs=_xxt_as_on_a_gpu), timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------- aliasing, strides, devices


def test_residual_refuses_g_sharing_memory_with_any_input(gen):
    """G is written in place while the product reads W_k, W_m and H_k: sharing memory with any
    of them is refused (a clear error, not a silently wrong G), by both backends."""
    d = 16
    G = torch.zeros(d, d, device=DEVICE)
    W = rand(gen, d, d)
    H = gram(gen, 20, d, torch.float32)
    for fn in (accumulate_residual_triton, accumulate_residual_reference):
        for name, args in (("W_k", (G, W, H)), ("W_m", (W, G, H)), ("H_k", (W, W.clone(), G))):
            with pytest.raises(ValueError, match=f"G must not share memory with {name}"):
                fn(G, *args, 1.0)
        with pytest.raises(ValueError, match="G must not share memory with W_m"):
            fn(G, W, G.view(-1).view(d, d), H, 1.0)  # (another view of G's storage)


def test_fold_refuses_outputs_sharing_memory_with_what_it_reads(gen):
    """H_e and H_m are written while the Hessians (and H_e, into H_m) are read: the kernel read
    a Hessian that was H_e before the pass wrote it (the reference after), and stored H_m over
    H_e, a silently different fold; refused by both backends, as the residual's G is."""
    d = 8
    H_e, H_m, H = (gram(gen, 20, d, torch.float32) for _ in range(3))
    for fn in (fold_hessians_triton, fold_hessians_reference):
        for match, args in (("H_e must not share memory with Hessian 1", (H_e, None, [H, H_e])),
                            ("H_m must not share memory with H_e", (H_e, H_e.view(-1).view(d, d), [H])),
                            ("H_m must not share memory with Hessian 0", (H_e, H_m, [H_m]))):
            before = [t.clone() for t in (H_e, H_m, H)]
            with pytest.raises(ValueError, match=match):
                fn(*args, [1.0] * len(args[2]))
            assert all(torch.equal(t, b) for t, b in zip((H_e, H_m, H), before))
        fn(H_e, H_m, [H, H], [1.0, 2.0])  # (one Hessian twice: read only)


def _arena(*tensors, overlap=0):
    """Copies of ``tensors`` laid out one after another in one buffer, each starting ``overlap``
    elements before the one before it ends, as views of it (copied in order: where two overlap,
    the later one's values are there)."""
    buf = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    views, at = [], 0
    for t in tensors:
        at = max(at - overlap, 0)
        views.append(buf[at:at + t.numel()].view(t.shape).copy_(t))
        at += t.numel()
    return views


def test_disjoint_slices_of_one_buffer_are_taken_and_overlapping_ones_refused(gen):
    """The checks compared storages, so an output and its inputs laid out in one buffer (an arena
    of a layer's statistics) were refused though no element is both read and written; they are
    compared by the byte ranges they span: disjoint slices are taken by both backends and give
    what separate tensors give, and slices overlapping by one row are still refused, naming both,
    the output left as it was."""
    d_out, d_in = 6, 16
    G0, W_k, W_m = (rand(gen, d_out, d_in) for _ in range(3))
    H_k, H_0, H_e0, H_m0 = (gram(gen, 20, d_in, torch.float32) for _ in range(4))
    X = rand(gen, 9, d_in)
    for backend in ("torch", "triton"):
        G, want = _arena(G0, W_k, W_m, H_k), G0.clone()
        assert accumulate_residual(*G, 0.5, backend=backend) == \
            accumulate_residual(want, W_k, W_m, H_k, 0.5, backend=backend)
        assert torch.equal(G[0], want)
        for k, name in enumerate(("W_k", "W_m", "H_k")):
            G, shared = _arena(G0, (W_k, W_m, H_k)[k], overlap=d_in)
            operands = [W_k, W_m, H_k]
            operands[k], before = shared, G.clone()
            with pytest.raises(ValueError, match=f"G must not share memory with {name}"):
                accumulate_residual(G, *operands, 0.5, backend=backend)
            assert torch.equal(G, before)

        (H, X_in), want = _arena(H_e0, X), H_e0.clone()
        accumulate_xxt(H, X_in, backend=backend)
        assert torch.equal(H, accumulate_xxt(want, X, backend=backend))
        H, X_in = _arena(H_e0, X, overlap=d_in)
        before = H.clone()
        with pytest.raises(ValueError, match="H must not share memory with X"):
            accumulate_xxt(H, X_in, backend=backend)
        assert torch.equal(H, before)

        (H_e, H_m, *hessians), want_e, want_m = _arena(H_e0, H_m0, H_k, H_0), H_e0.clone(), H_m0.clone()
        fold_hessians(H_e, H_m, hessians, [0.5, 2.0], backend=backend)
        fold_hessians(want_e, want_m, [H_k, H_0], [0.5, 2.0], backend=backend)
        assert torch.equal(H_e, want_e) and torch.equal(H_m, want_m)
        H_e, H_m = _arena(H_e0, H_m0, overlap=1)
        with pytest.raises(ValueError, match="H_m must not share memory with H_e"):
            fold_hessians(H_e, H_m, [H_k], [1.0], backend=backend)
        H_e, H = _arena(H_e0, H_k, overlap=1)
        before = H_e.clone()
        with pytest.raises(ValueError, match="H_e must not share memory with Hessian 1"):
            fold_hessians(H_e, None, [H_0, H], [1.0, 1.0], backend=backend)
        assert torch.equal(H_e, before)
    # meta tensors have no data (every pointer 0), so share none: the references take them, for shapes
    meta = [torch.zeros(*shape, device="meta") for shape in ((d_out, d_in), (d_out, d_in), (d_out, d_in), (d_in, d_in))]
    assert accumulate_residual_reference(*meta, 0.5, read=False).device.type == "meta"
    assert accumulate_xxt_reference(meta[3], meta[0]) is meta[3]
    fold_hessians_reference(meta[3], None, [meta[3].clone()], [1.0])


def test_statistics_keep_no_autograd_graph(gen):
    """Inputs that require a gradient (a layer's weight Parameter, activations hooked from a
    forward outside no_grad): the torch references folded them into G and H with their autograd
    graphs, so each accumulation kept its inputs (a whole forward's activations per batch) alive
    and the statistics required a gradient, where the kernels keep nothing; both keep nothing."""
    d_out, d_in = 5, 24
    W_k = rand(gen, d_out, d_in).requires_grad_()
    W_m = rand(gen, d_out, d_in)
    X = rand(gen, 9, d_in).requires_grad_()
    H_k = gram(gen, 20, d_in, torch.float32).requires_grad_()
    outs = {}
    for backend in ("torch", "triton"):
        G, H, H_e = (torch.zeros(*shape, device=DEVICE) for shape in ((d_out, d_in), (d_in, d_in), (d_in, d_in)))
        accumulate_residual(G, W_k, W_m, H_k, 0.5, backend=backend)
        accumulate_xxt(H, X, backend=backend)
        fold_hessians(H_e, None, [H_k], [0.5], backend=backend)
        for name, t in (("G", G), ("H", H), ("H_e", H_e)):
            assert not t.requires_grad and t.grad_fn is None, (backend, name)
        outs[backend] = (G, H, H_e)
    for a, b in zip(*outs.values()):
        # (H_k's entries reach hundreds: fp32 sums agree to their scale, not to 1e-5 absolute)
        assert_update_close(a, b, torch.zeros_like(b), 1e-5)


@pytest.mark.parametrize("config", [("ieee", "cublas"), ("tf32x3", "cublas"), ("bf16x3", "cublas"),
                                    ("bf16x3", "cublas_split")])
def test_residual_by_cublas_keeps_no_autograd_graph(gen, monkeypatch, config):
    """The GPU's autotuner may pick a cuBLAS candidate over the kernel: its tf32x3 and bf16x3 products (torch's)
    of a W_k or H_k that requires a gradient made G require one, with a grad_fn keeping the inputs alive, and
    the trace too, where the kernel keeps nothing (the CPU tests ran the kernel alone). Each keeps none."""
    import epmq_kernels.expert_residual as er

    precision, impl = config
    monkeypatch.setattr(er, "_residual_config", lambda *args: (precision, (impl,)))
    d_out, d_in = 5, 24
    W_k, W_m = rand(gen, d_out, d_in).requires_grad_(), rand(gen, d_out, d_in)
    H_k = gram(gen, 20, d_in, torch.float32).requires_grad_()
    G, want = torch.zeros(d_out, d_in, device=DEVICE), torch.zeros(d_out, d_in, device=DEVICE)
    trace = accumulate_residual_triton(G, W_k, W_m, H_k, 0.5, read=False)
    assert not G.requires_grad and G.grad_fn is None and not trace.requires_grad
    accumulate_residual_reference(want, W_k, W_m, H_k, 0.5)
    assert_update_close(G, want, torch.zeros_like(want), 1e-4)


def test_xxt_refuses_activations_sharing_memory_with_h(gen):
    """H is written tile by tile while X is read: X in H's memory (rows of H, another view of
    its storage) was read by the kernel after other programs had written H, a silently other
    H (off by thousands here) where the reference gave X^T X; refused by both backends, as the
    residual's G and the fold's outputs are."""
    d = 40
    H = gram(gen, 20, d, torch.float32)
    before = H.clone()
    for fn in (accumulate_xxt_triton, accumulate_xxt_reference):
        for X in (H, H[:5], H.view(-1)[3 * d:8 * d].view(5, d)):
            with pytest.raises(ValueError, match="H must not share memory with X"):
                fn(H, X)
        assert torch.equal(H, before)
    fn(H, H[:5].clone())  # (a copy: read only)


def test_xxt_refuses_an_output_without_unit_stride(gen):
    """The kernel writes H with unit stride along its rows: any other layout is refused (a
    transposed view, every other column), not silently written in the wrong places."""
    for H in (torch.zeros(16, 16, device=DEVICE).t(), torch.zeros(16, 32, device=DEVICE)[:, ::2]):
        assert H.stride(1) != 1
        with pytest.raises(ValueError, match="unit stride"):
            accumulate_xxt_triton(H, rand(gen, 4, 16))



def test_a_sum_of_another_layout_is_refused_with_its_strides(gen):
    """A sum updated in place that the kernels cannot write (a transposed or sliced view) was refused as
    'must have unit stride along its last dimension' or 'must be contiguous' alone, with nothing of the
    layout given; the error names the strides and shape, so that the view at fault can be found."""
    d_out, d_in = 4, 8
    W_k, W_m, H_k = rand(gen, d_out, d_in), rand(gen, d_out, d_in), gram(gen, 20, d_in, torch.float32)
    with pytest.raises(ValueError, match=r"H must have unit stride .*, got strides \(1, 8\) for \(8, 8\)"):
        accumulate_xxt_triton(torch.zeros(d_in, d_in, device=DEVICE).t(), rand(gen, 3, d_in))
    with pytest.raises(ValueError, match=r"G must be contiguous .*, got strides \(16, 1\) for \(4, 8\)$"):
        accumulate_residual_triton(torch.zeros(d_out, 2 * d_in, device=DEVICE)[:, :d_in], W_k, W_m, H_k, 0.5)
    H_e, sliced = torch.zeros(d_in, d_in, device=DEVICE), torch.zeros(d_in, 2 * d_in, device=DEVICE)[:, :d_in]
    for H_e, H_m, name in ((sliced, None, "H_e"), (H_e, sliced, "H_m")):
        with pytest.raises(ValueError, match=rf"{name} must be contiguous .*, got strides \(16, 1\) for \(8, 8\)$"):
            fold_hessians_triton(H_e, H_m, [H_k], [1.0])


def test_xxt_refuses_an_output_whose_rows_share_memory(gen):
    """An expanded H (stride 0 between rows: every row one row) has unit stride along its rows, so
    it passed the layout check and the kernel added every tile into the same d elements, silently,
    where the reference's in-place add refuses it; refused, and nothing written."""
    d = 16
    row = torch.zeros(1, d, device=DEVICE)
    H = row.expand(d, d)
    assert H.stride(1) == 1
    with pytest.raises(ValueError, match=r"H's rows share memory \(strides \(0, 1\)"):
        accumulate_xxt_triton(H, rand(gen, 4, d))
    assert not bool(row.any())
    with pytest.raises(RuntimeError, match="single memory location"):
        accumulate_xxt_reference(H, rand(gen, 4, d))

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_xxt_of_strided_activations(gen, x_dtype):
    """Token rows read through a transposed view (column stride != 1) or every other feature."""
    n, d = 37, 40
    for X in (rand(gen, d, n, dtype=x_dtype).T, rand(gen, n, 2 * d, dtype=x_dtype)[:, ::2]):
        assert X.stride(1) != 1
        H0 = rand(gen, d, d)
        H_ref, H_out = H0.clone(), H0.clone()
        accumulate_xxt_reference(H_ref, X)
        accumulate_xxt_triton(H_out, X)
        assert_update_close(H_out, H_ref, H0, 50 * EPS[torch.float32] * n**0.5)


def test_tf32_truncate():
    """The low 13 mantissa bits dropped (toward zero), any sign; TF32 values are kept."""
    from epmq_kernels._runtime import tf32_truncate

    ulp = 2.0**-10
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 4, -(1 + 3 * ulp / 4), 1 + ulp + 2.0**-23, 3.0])
    want = torch.tensor([1.0, 1.0, -1.0, 1 + ulp, 3.0])
    assert torch.equal(tf32_truncate(x), want)
    r = torch.randn(10_000) * torch.exp(10 * torch.randn(10_000))
    t = tf32_truncate(r)
    assert (t.view(torch.int32) & 0x1FFF == 0).all() and (t.abs() <= r.abs()).all()
    assert ((t - r).abs() < 2.0**-10 * r.abs()).all()


def test_tf32_truncate_keeps_nan_and_inf():
    """A NaN stays NaN, as tf32_round keeps it (082cecb): one whose payload lies in the low 13 bits
    alone lost it and became inf, so a truncated NaN operand gave an emulated product of inf."""
    from epmq_kernels._runtime import tf32_truncate

    nans = torch.tensor([0x7F800001, 0x7F801FFF, -0x7FE001, 0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32)
    assert torch.isnan(nans.view(torch.float32)).all()
    assert torch.isnan(tf32_truncate(nans.view(torch.float32))).all()
    inf = torch.tensor([float("inf"), -float("inf")])
    assert torch.equal(tf32_truncate(inf), inf)


def test_fp32_matmul_restores_the_tf32_switch():
    """The solver's and the residual's product settings never leak into the caller's (also
    after an exception)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for outer in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = outer
            with _runtime.ieee_fp32_matmul():
                assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is outer
            with pytest.raises(KeyError):
                with _runtime.fp32_matmul(not outer):
                    assert torch.backends.cuda.matmul.allow_tf32 is (not outer)
                    raise KeyError
            assert torch.backends.cuda.matmul.allow_tf32 is outer
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_kernels_refuse_tensors_on_two_devices(gen):
    """Operands on different devices are a clear ValueError naming them, before any launch."""
    from epmq_kernels.gptq_solve import gptq_solve_triton

    meta = torch.device("meta")
    H = torch.zeros(16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="different devices.*X=meta"):
        accumulate_xxt_triton(H, torch.zeros(4, 16, device=meta))
    G, W = torch.zeros(8, 16, device=DEVICE), rand(gen, 8, 16)
    with pytest.raises(ValueError, match="different devices.*H_k=meta"):
        accumulate_residual_triton(G, W, W.clone(), torch.zeros(16, 16, device=meta), 1.0)
    with pytest.raises(ValueError, match="different devices.*Hinv=meta"):
        gptq_solve_triton(W, torch.zeros(16, 16, device=meta), bits=4, sym=False, group_size=8)


def test_references_refuse_tensors_on_two_devices(gen):
    """The torch references ended in torch's 'Tensor on device cpu is not on the expected device
    meta!' (or a fold's H_m update in its bare error), naming no operand: refused as the kernels
    refuse them, the sums left as they were."""
    meta = torch.device("meta")
    d_out, d_in = 5, 12
    G, W = torch.zeros(d_out, d_in, device=DEVICE), rand(gen, d_out, d_in)
    H = gram(gen, 20, d_in, torch.float32).to(DEVICE)
    H_e, H_m = torch.zeros(d_in, d_in, device=DEVICE), torch.zeros(d_in, d_in, device=DEVICE)
    for name in ("W_k", "W_m", "H_k"):
        args = dict(W_k=W, W_m=W.clone(), H_k=H)
        args[name] = args[name].to(meta)
        with pytest.raises(ValueError, match=f"different devices.*{name}=meta"):
            accumulate_residual_reference(G, **args, a=1.0)
    with pytest.raises(ValueError, match="different devices.*X=meta"):
        accumulate_xxt_reference(H_e, torch.zeros(4, d_in, device=meta))
    with pytest.raises(ValueError, match="different devices.*Hessian 1=meta"):
        fold_hessians_reference(H_e, H_m, [H, H.to(meta)], [1.0, 1.0])
    with pytest.raises(ValueError, match="different devices.*H_m=meta"):
        fold_hessians_reference(H_e, H_m.to(meta), [H], [1.0])
    assert not G.any() and not H_e.any() and not H_m.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_operands_are_refused_by_name(gen, backend, dtype):
    """A complex weight, Hessian or activation ended the kernels in a bare KeyError ('complex64',
    the name of a dtype table's missing entry), and the torch reference dropped its imaginary
    part with no more than torch's warning: the statistics are real, a complex operand is refused."""
    d_out, d_in = 8, 16
    W, H = rand(gen, d_out, d_in), gram(gen, 20, d_in, torch.float32).to(DEVICE)
    for name in ("W_k", "W_m", "H_k"):
        args = dict(W_k=W, W_m=W.clone(), H_k=H)
        args[name] = args[name].to(dtype)
        with pytest.raises(ValueError, match=f"{name} must be real, got torch.{str(dtype)[6:]}"):
            accumulate_residual(torch.zeros(d_out, d_in, device=DEVICE), **args, a=1.0, backend=backend)
    with pytest.raises(ValueError, match=f"Hessian 1 must be real, got torch.{str(dtype)[6:]}"):
        fold_hessians(torch.zeros(d_in, d_in, device=DEVICE), None, [H, H.to(dtype)], [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match=f"X must be real, got torch.{str(dtype)[6:]}"):
        accumulate_xxt(torch.zeros(d_in, d_in, device=DEVICE), rand(gen, 5, d_in).to(dtype), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64])
def test_the_references_outputs_must_be_floating_point(gen, dtype):
    """G, H_e, H_m and H are sums the torch reference updates in place: an integer one ended in
    'For integral input tensors, argument alpha must not be a floating point number', a bool or
    float8 one in a bare NotImplementedError or a promotion error (the kernels refused them by name)."""
    d_out, d_in = 8, 16
    W, H = rand(gen, d_out, d_in), gram(gen, 20, d_in, torch.float32).to(DEVICE)
    out = torch.zeros(d_out, d_in, device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match=f"G must be floating point.*got torch.{str(dtype)[6:]}"):
        accumulate_residual(out, W, W.clone(), H, 1.0, backend="torch")
    square = torch.zeros(d_in, d_in, device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match=f"H_e must be floating point.*got torch.{str(dtype)[6:]}"):
        fold_hessians(square, None, [H], [0.5], backend="torch")
    with pytest.raises(ValueError, match=f"H must be floating point.*got torch.{str(dtype)[6:]}"):
        accumulate_xxt(square, rand(gen, 5, d_in), backend="torch")


def test_float8_hessians_are_folded_by_both_backends(gen):
    """The fold kernel reads a float8 Hessian (converted in registers); the torch reference ended in
    'Promotion for Float8 Types is not supported'. It reads one as the kernel does."""
    d = 16
    hessians = [gram(gen, 20, d, torch.float32).to(DEVICE).div(20).to(torch.float8_e4m3fn) for _ in range(2)]
    got = {}
    for backend in ("torch", "triton"):
        H_e, H_m = torch.zeros(d, d, device=DEVICE), torch.zeros(d, d, device=DEVICE)
        fold_hessians(H_e, H_m, hessians, [0.5, 0.25], backend=backend)
        got[backend] = H_e, H_m
    want = 0.5 * hessians[0].float() + 0.25 * hessians[1].float()
    torch.testing.assert_close(got["torch"][0], want)
    torch.testing.assert_close(got["triton"][0], want)
    torch.testing.assert_close(got["torch"][1], hessians[0].float() + hessians[1].float())


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_operands_are_read_through_fp16_as_the_references_read_them(gen, fp8):
    """As the Hessian check's kernel (f666523), the residual and the fold loaded float8 operands
    as float8: e4m3 does not compile for sm_80, and the interpreter read a NaN as a number (the
    residual's G came out finite where the reference's had the NaN; the fold gave 240 for a NaN
    entry times 0.5), while the fold's reference failed on torch's bare 'Promotion for Float8
    Types is not supported'. Read through fp16, NaN included: the two backends agree."""
    d_out, d_in = 8, 32
    W_k = torch.randn(d_out, d_in, generator=gen, device=DEVICE).to(fp8)
    W_m = torch.randn(d_out, d_in, generator=gen, device=DEVICE)
    H_k = torch.randn(d_in, d_in, generator=gen, device=DEVICE).to(fp8)
    H_k[1, 2] = float("nan")
    start = torch.randn(d_out, d_in, generator=gen, device=DEVICE)
    G_ref, G_tri = start.clone(), start.clone()
    accumulate_residual_reference(G_ref, W_k, W_m, H_k, 0.5)
    accumulate_residual_triton(G_tri, W_k, W_m, H_k, 0.5)
    assert torch.equal(G_ref.isnan(), G_tri.isnan()) and G_ref.isnan().any()
    ok = ~G_ref.isnan()
    torch.testing.assert_close(G_tri[ok], G_ref[ok], rtol=1e-5, atol=1e-5)
    hessians = [H_k, torch.randn(d_in, d_in, generator=gen, device=DEVICE).to(fp8)]
    start = torch.randn(d_in, d_in, generator=gen, device=DEVICE)
    outs = []
    for fold in (fold_hessians_reference, fold_hessians_triton):
        H_e, H_m = start.clone(), start.clone()
        fold(H_e, H_m, hessians, [0.5, 2.0])
        outs.append((H_e, H_m))
    for ref, tri in zip(*outs):
        assert ref[1, 2].isnan() and tri[1, 2].isnan()
        torch.testing.assert_close(tri, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_float8_e8m0_operands_are_read_exactly_by_both_backends(gen):
    """float8_e8m0fnu holds powers of two from 2^-127 to 2^127, which fp16 does not: read through
    fp16 as the other float8 are, 2^20 became inf and 2^-30 zero in the kernels' operands, so the
    residual's G and the fold's H_e were inf or NaN (or lost a term) where the references, which
    convert it to G's precision, were finite. Read through fp32: both backends agree."""
    d_out, d_in = 8, 16
    e8m0 = torch.float8_e8m0fnu
    powers = 2.0 ** torch.randint(-30, 21, (d_in, d_in), generator=gen).float()
    powers[0, 0], powers[1, 1] = 2.0**20, 2.0**-30
    H_k = powers.to(DEVICE).to(e8m0)
    W_k = (2.0 ** torch.randint(-30, 21, (d_out, d_in), generator=gen).float()).to(DEVICE).to(e8m0)
    W_m = torch.zeros(d_out, d_in, device=DEVICE)
    G_ref, G_tri = torch.zeros(d_out, d_in, device=DEVICE), torch.zeros(d_out, d_in, device=DEVICE)
    accumulate_residual_reference(G_ref, W_k, W_m, H_k, 1e-12)
    accumulate_residual_triton(G_tri, W_k, W_m, H_k, 1e-12)
    assert bool(torch.isfinite(G_ref).all())
    torch.testing.assert_close(G_tri, G_ref, rtol=1e-5, atol=0)
    outs = []
    for fold in (fold_hessians_reference, fold_hessians_triton):
        H_e, H_m = torch.zeros(d_in, d_in, device=DEVICE), torch.zeros(d_in, d_in, device=DEVICE)
        fold(H_e, H_m, [H_k], [0.5])
        outs.append((H_e, H_m))
    for ref, tri in zip(*outs):
        assert torch.equal(ref, H_k.float()) or torch.equal(ref, 0.5 * H_k.float())
        assert torch.equal(tri, ref)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu])
def test_float8_activations_are_taken_by_both_backends(gen, fp8):
    """The torch reference took float8 activations X (converted to H's precision) and the Triton
    launcher refused them ('X must be bf16, fp16, fp32 or fp64'), so HessianStats' backend decided
    whether a float8 model's statistics ran; both take them, read exactly (e8m0's powers of two
    included), and agree."""
    d, n = 24, 9
    if fp8 == torch.float8_e8m0fnu:
        X = 2.0 ** torch.randint(-20, 21, (n, d), generator=gen).float()
    else:
        X = torch.randn(n, d, generator=gen)
    X = X.to(DEVICE).to(fp8)
    for h_dtype in (torch.float32, torch.float64):
        H_ref, H_tri = torch.zeros(d, d, device=DEVICE, dtype=h_dtype), torch.zeros(d, d, device=DEVICE, dtype=h_dtype)
        accumulate_xxt(H_ref, X, backend="torch")
        accumulate_xxt(H_tri, X, backend="triton")
        want = X.double().T @ X.double()
        assert bool(torch.isfinite(H_ref).all())
        torch.testing.assert_close(H_ref.double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(H_tri, H_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_activations_are_refused_by_both_backends(gen, dtype):
    """Integer or bool X (token ids given for activations) was summed as numbers by the torch
    reference, silently, and refused by the Triton launcher; refused by both, naming X."""
    X = torch.randint(0, 2, (5, 16), generator=gen).to(DEVICE).to(dtype)
    for backend in ("torch", "triton"):
        H = torch.zeros(16, 16, device=DEVICE)
        with pytest.raises(ValueError, match=f"X must be floating point.*got torch.{str(dtype)[6:]}"):
            accumulate_xxt(H, X, backend=backend)
        assert not H.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_operands_that_are_no_tensor_are_refused_by_name(backend):
    """A NumPy array (or a list) for an operand of accumulate_residual, accumulate_xxt or
    fold_hessians ended in Python's bare "'numpy.ndarray' object has no attribute 'is_complex'"
    (or 'is_floating_point'); refused, naming the operand and its type."""
    np = pytest.importorskip("numpy")
    f64 = dict(dtype=torch.float64, device=DEVICE)
    G, W, H = torch.zeros(4, 6, **f64), torch.ones(4, 6, **f64), torch.eye(6, **f64)
    operands = dict(G=G, W_k=W, W_m=W, H_k=H)
    for name in operands:
        for bad in (operands[name].cpu().numpy(), operands[name].tolist()):
            args = dict(operands, **{name: bad})
            with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor, got {type(bad).__name__}"):
                accumulate_residual(*args.values(), 0.5, backend=backend)
    for name, H_, X in (("H", H.cpu().numpy(), W), ("X", H.clone(), np.ones((4, 6)))):
        with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor, got ndarray"):
            accumulate_xxt(H_, X, backend=backend)
    with pytest.raises(ValueError, match="Hessian 0 must be a torch.Tensor, got ndarray"):
        fold_hessians(H.clone(), None, [np.eye(6)], [1.0], backend=backend, overwrite=True)
    # (one weight or one Hessian for the lists of them ended in "object of type 'float' has no len()" or "len() of
    # a 0-d tensor", one 2-D Hessian's rows read as Hessians: 'Hessian 0 is (6,), H_e (6, 6)')
    for hessians, weights, bad in (([H], 0.5, "weights must be a sequence .*got float"),
                                   ([H], torch.tensor(0.5), r"weights must be a sequence .*got a 0-d tensor"),
                                   ([H], (a for a in [0.5]), "weights must be a sequence .*got generator"),
                                   (H, [1.0] * 6, r"hessians must be a sequence .*got one \(6, 6\) tensor")):
        H_e = H.clone()
        with pytest.raises(ValueError, match=bad):
            fold_hessians(H_e, None, hessians, weights, backend=backend)
        assert torch.equal(H_e, H)
    # (a weight that is a tensor of two values ended in torch's bare 'only one element tensors can be converted to
    # Python scalars', a complex one had its imaginary part dropped)
    for bad, said in ((torch.tensor([0.5, 0.25]), r"of 2 values"), (torch.tensor(0.5 + 1j), "complex")):
        G_ = G.clone()
        with pytest.raises(ValueError, match=rf"a must be a finite number.*{said}"):
            accumulate_residual(G_, W, W * 0, H, bad, backend=backend)
        assert not G_.any()
        H_e = H.clone()
        with pytest.raises(ValueError, match=rf"weights\[1\] must be a finite number.*{said}"):
            fold_hessians(H_e, None, [H, H], [0.5, bad], backend=backend)
        assert torch.equal(H_e, H)
    # (H_m: an ndarray was refused as 'H_m must be (6, 6) torch.float64 like H_e, got (6, 6) float64', a list
    # ended in "'list' object has no attribute 'shape'")
    for bad in (H.cpu().numpy(), H.tolist()):
        H_e = H.clone()
        with pytest.raises(ValueError, match=f"H_m must be a torch.Tensor, got {type(bad).__name__}"):
            fold_hessians(H_e, bad, [H], [1.0], backend=backend)
        assert torch.equal(H_e, H)
