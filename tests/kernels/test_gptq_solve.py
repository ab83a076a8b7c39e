"""The fused Triton GPTQ solver against the torch reference, over the whole configuration space.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 on small shapes chosen not to
be block multiples; with CUDA the same tests run compiled on the GPU, and the ``cuda``-marked
tests add layer-sized problems. Every comparison is against ``gptq_solve_reference`` on the same
device and the same inputs:

  codes   equal, except a tiny fraction that may differ by one grid step where the order of a
          summation differs (none is expected: the kernel mirrors the reference's arithmetic);
  grid    scales within fp32 rounding, zeros equal but for that same tiny fraction;
  loss    tr((Q - T) H (Q - T)^T) within 1e-4 relative.
"""

import re

import pytest
import torch
import triton
import triton.language as tl

from epmq_kernels import _runtime
from epmq_kernels.gptq_solve import (
    SolveOut,
    _rint,
    _target_minus_update_kernel,
    effective_blocksize,
    gptq_solve,
    gptq_solve_reference,
    gptq_solve_triton,
    solved_loss,
)
from epmq_kernels.grid import find_params
from gpu_compile import Launches, compile_as_launched, ptxas_available, run_compile_script

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D_OUT, D_IN = 37, 96  # neither a multiple of any row tile nor of the blocks below
MAX_CODE_MISMATCH = 2e-3  # fraction of codes allowed one grid step away from the reference


# --------------------------------------------------------------------------- problems


def make_hessian(gen, d_in, n_tokens, *, dead=(), spread=3.0):
    """``X^T X`` of random tokens whose features have scales spread over ``[0.1, 0.1 + spread]``;
    ``dead`` features never fire (zero rows and columns in H)."""
    X = torch.randn(n_tokens, d_in, generator=gen)
    X = (X * (0.1 + spread * torch.rand(d_in, generator=gen))).to(DEVICE, torch.float64)
    X[:, list(dead)] = 0
    return (X.T @ X).cpu()


def damped(H, percdamp=0.01):
    """``H~``, as epmq.quant builds it: dead columns get the live columns' mean diagonal (not
    the reference GPTQ's 1, which makes the damping depend on H's scale), then
    ``percdamp * mean(diag)`` damping (float64)."""
    H = H.double().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = float(diag[~dead].mean())
    diag.add_(percdamp * float(diag.mean()))
    return H


def make_hinv(H, percdamp=0.01, perm=None):
    """Upper Cholesky factor of ``H~^{-1}`` in processing order (``damped``)."""
    H = damped(H, percdamp)
    if perm is not None:
        H = H[perm][:, perm]
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(H_inv, upper=True).float()


def make_problem(gen, d_out=D_OUT, d_in=D_IN, *, n_tokens=256, dead=(), with_R=False, perm=None, spread=3.0):
    """``(W, R, Hinv, H)`` on DEVICE, all in processing order (``perm``: act-order)."""
    W = torch.randn(d_out, d_in, generator=gen)
    R = 0.2 * torch.randn(d_out, d_in, generator=gen) if with_R else None
    H = make_hessian(gen, d_in, n_tokens, dead=dead, spread=spread)
    if perm is not None:
        perm = perm.cpu()
        W = W[:, perm].contiguous()
        R = None if R is None else R[:, perm].contiguous()
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    H = to(H)
    perm = to(perm)
    Hinv = make_hinv(H, perm=perm)
    Hp = H if perm is None else H[perm][:, perm]
    return to(W), to(R), Hinv, Hp


def static_grid(T, bits, sym, group_size, perm=None):
    """Scales/zeros from the original target, groups in stored order, as quant.py builds them."""
    d_out, d_in = T.shape
    gs = d_in if group_size == -1 else group_size
    if perm is not None:  # back to stored order for the groups
        T_stored = torch.empty_like(T)
        T_stored[:, perm] = T
        T = T_stored
    # group by group (a shorter last one where gs does not divide d_in)
    scale, zero = zip(*(find_params(T[:, a : a + gs], bits, sym) for a in range(0, d_in, gs)))
    g_idx = torch.arange(d_in, device=T.device) // gs
    col_group = g_idx if perm is None else g_idx[perm.to(T.device)]
    return dict(scales=torch.stack(scale, 1), zeros=torch.stack(zero, 1), col_group=col_group)


def poisoned_out(d_out, d_in, n_groups):
    """Outputs where every element the kernel should write starts as something it never writes."""
    nan = dict(dtype=torch.float32, device=DEVICE)
    return SolveOut(
        Q=torch.full((d_out, d_in), float("nan"), **nan),
        codes=torch.full((d_out, d_in), -1, dtype=torch.int32, device=DEVICE),
        scales=torch.full((d_out, n_groups), float("nan"), **nan),
        zeros=torch.full((d_out, n_groups), float("nan"), **nan),
    )


def layer_loss(Q, T, H):
    E = (Q - T).double()
    return float(((E @ H.double()) * E).sum())


def assert_solves_match(ref, out, T, H, max_mismatch=MAX_CODE_MISMATCH):
    assert out.codes.dtype == torch.int32 and out.Q.dtype == torch.float32
    assert not torch.isnan(out.Q).any(), "Q has unwritten (NaN) elements"
    assert (out.codes >= 0).all(), "codes has unwritten (-1) elements"
    assert torch.isfinite(out.scales).all() and torch.isfinite(out.zeros).all()
    step = (ref.codes.long() - out.codes.long()).abs()
    frac = float((step > 0).double().mean())
    assert int(step.max()) <= 1, f"codes differ by {int(step.max())} grid steps"
    assert frac <= max_mismatch, f"{frac:.2%} of codes differ from the reference"
    torch.testing.assert_close(out.scales, ref.scales, rtol=2e-6, atol=0)
    zero_step = (out.zeros - ref.zeros).abs()
    assert float(zero_step.max()) <= 1 and float((zero_step > 0).double().mean()) <= max_mismatch
    loss_ref, loss = layer_loss(ref.Q, T, H), layer_loss(out.Q, T, H)
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref) + 1e-12, (loss, loss_ref)
    # Q = T - Err Hinv, so each solve's loss under the damped H~ is its sum of err^2
    H_damped = damped(H)
    for name, s in (("reference", ref), ("kernel", out)):
        assert s.err_sq.shape == ref.err_sq.shape and s.err_sq.shape[0] == T.shape[0]
        assert torch.isfinite(s.err_sq).all(), f"{name}: err_sq has unwritten (NaN) elements"
        exact = layer_loss(s.Q, T, H_damped)
        assert abs(solved_loss(s) - exact) <= 2e-5 * exact + 1e-9, (name, solved_loss(s), exact)


def run_both(W, Hinv, H, **kw):
    """Reference and kernel on the same inputs (the kernel into poisoned buffers); compares
    them and checks that the inputs were left alone."""
    W0 = W.clone()
    R = kw.get("R")
    R0 = None if R is None else R.clone()
    ref = gptq_solve_reference(W, Hinv, **kw)
    gs = kw.get("group_size", -1)
    n_groups = -(-W.shape[1] // gs) if gs > 0 else kw["scales"].shape[1]
    out = gptq_solve_triton(W, Hinv, out=poisoned_out(*W.shape, n_groups), **kw)
    assert torch.equal(W, W0) and (R is None or torch.equal(R, R0)), "the solver changed its inputs"
    T = W if R is None else W + R
    assert_solves_match(ref, out, T, H)
    return ref, out


# --------------------------------------------------------------------------- rounding helper


@triton.jit
def _rint_test_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, _rint(tl.load(x_ptr + offs, mask=ok)), mask=ok)


def test_rint_is_round_half_even(gen):
    ties = torch.arange(-600, 600, dtype=torch.float32) + 0.5
    near = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    special = torch.tensor([0.0, -0.0, 2**21 + 0.5, -(2**21) - 0.5])
    x = torch.cat([ties, near, torch.randn(4000, generator=gen) * 300, special])
    x = x.to(DEVICE)
    y = torch.full_like(x, float("nan"))
    _rint_test_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y, torch.round(x))


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    "bits,sym,with_R",
    [(2, False, False), (3, True, True), (4, False, True), (8, True, False)],
)
def test_per_channel(gen, bits, sym, with_R):
    W, R, Hinv, H = make_problem(gen, with_R=with_R)
    T = W if R is None else W + R
    run_both(W, Hinv, H, bits=bits, sym=sym, R=R, blocksize=32, **static_grid(T, bits, sym, -1))


@pytest.mark.parametrize(
    "group_size,blocksize,bits,sym",
    [
        (16, 32, 4, False),  # groups smaller than the block: several start inside it
        (32, 32, 3, True),  # one group per block
        (48, 32, 2, False),  # larger than the block: the block shrinks to 24, groups span two
        (96, 64, 8, True),  # larger, d_in not a multiple of the requested block
        (96, 32, 4, True),  # one group over three blocks
        (40, 32, 4, False),  # not dividing d_in: a shorter last group, inside the last block
        (80, 32, 3, True),  # not dividing, spanning blocks: the last group spans a partial block
    ],
)
@pytest.mark.parametrize("with_R", [False, True])
def test_dynamic_groups(gen, group_size, blocksize, bits, sym, with_R):
    W, R, Hinv, H = make_problem(gen, with_R=with_R)
    ref, _ = run_both(W, Hinv, H, bits=bits, sym=sym, R=R, group_size=group_size, blocksize=blocksize)
    assert ref.scales.shape == (D_OUT, -(-D_IN // group_size))


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups(gen, act_order):
    H0 = make_hessian(gen, D_IN, 256)
    perm = torch.argsort(H0.diagonal(), descending=True) if act_order else None
    W, R, Hinv, H = make_problem(gen, with_R=True, perm=perm)
    T = W + R
    grid = static_grid(T, 4, False, 32, perm=None if perm is None else perm.to(DEVICE))
    if act_order:
        assert not bool((grid["col_group"].diff() >= 0).all()), "act-order should scramble groups"
    run_both(W, Hinv, H, bits=4, sym=False, R=R, blocksize=32, **grid)


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (8, False)])
def test_every_grid_under_act_order_on_an_ill_conditioned_hessian(gen, bits, sym):
    """Static and dynamic groups of every bit width, symmetric or not, of a size that does not
    divide d_in (96 = 2 x 40 + a last group of 16), under act-order (static groups scrambled in
    processing order), on a Hessian of few tokens whose features' scales span five orders of
    magnitude (a condition number past 1e9 before damping), with dead columns."""
    H0 = make_hessian(gen, D_IN, 256)
    perm = torch.argsort(H0.diagonal(), descending=True)
    W, R, Hinv, H = make_problem(gen, with_R=True, perm=perm, n_tokens=64, dead=(3, 50, 51), spread=1e4)
    grid = static_grid(W + R, bits, sym, 40, perm=perm.to(DEVICE))
    assert grid["scales"].shape == (D_OUT, 3)
    run_both(W, Hinv, H, bits=bits, sym=sym, R=R, blocksize=32, **grid)
    ref, _ = run_both(W, Hinv, H, bits=bits, sym=sym, R=R, group_size=40, blocksize=32)
    assert ref.scales.shape == (D_OUT, 3)


def test_act_order_per_channel_and_dynamic(gen):
    H0 = make_hessian(gen, D_IN, 256)
    perm = torch.argsort(H0.diagonal(), descending=True)
    W, R, Hinv, H = make_problem(gen, perm=perm)
    run_both(W, Hinv, H, bits=3, sym=False, blocksize=32, **static_grid(W, 3, False, -1))
    run_both(W, Hinv, H, bits=3, sym=False, group_size=32, blocksize=64)


@pytest.mark.parametrize("d_out,d_in,blocksize", [(1, 70, 32), (5, 33, 16), (70, 40, 128)])
def test_odd_shapes(gen, d_out, d_in, blocksize):
    W, R, Hinv, H = make_problem(gen, d_out, d_in, with_R=True)
    T = W + R
    run_both(W, Hinv, H, bits=4, sym=False, R=R, blocksize=blocksize, **static_grid(T, 4, False, -1))


def test_reference_does_not_depend_on_the_layout_of_hinv(gen):
    """(As the kernel reads it: a column-major Hinv, torch's upper Cholesky factor, changed CPU
    products' summation order, and codes by a grid step, in some draws.)"""
    for _ in range(40):
        W, _, Hinv, H = make_problem(gen, 4, 40)
        row_major, column_major = Hinv.contiguous(), Hinv.T.contiguous().T
        kw = dict(bits=3, sym=True, group_size=4, blocksize=8)  # (symmetric: ties on the grid)
        a, b = gptq_solve_reference(W, row_major, **kw), gptq_solve_reference(W, column_major, **kw)
        assert torch.equal(a.Q, b.Q) and torch.equal(a.codes, b.codes)


def test_ill_conditioned_with_dead_columns(gen):
    # 8 tokens for 96 features: H has rank 8, only the damping makes it invertible
    W, R, Hinv, H = make_problem(gen, n_tokens=8, dead=(0, 41, 42, 95), with_R=True)
    run_both(W, Hinv, H, bits=4, sym=False, R=R, group_size=32, blocksize=32)
    run_both(W, Hinv, H, bits=2, sym=True, R=R, group_size=48, blocksize=32)


def test_zero_rows_get_the_unit_range(gen):
    W, R, Hinv, H = make_problem(gen)
    W[3] = 0
    ref, out = run_both(W, Hinv, H, bits=4, sym=False, group_size=32, blocksize=32)
    assert torch.equal(out.Q[3], torch.zeros_like(out.Q[3]))


def test_groups_of_subnormal_weights_get_the_unit_range(gen):
    """A group whose range is too small for a normal fp32 scale (below maxq * 2^-126: zeros and
    subnormal weights) is rounded like an all-zero one, on the unit range, to Q = 0. Its scale
    was subnormal: one that underflowed to 0 made every Q NaN, and one rounded to a few bits
    left the zero point outside [0, maxq] (20 at 4 bits over [-20 * 2^-149, 0])."""
    least = 2.0**-149
    rows = torch.tensor([[0.0, least, 0.0], [-least, 0.0, 0.0], [-20 * least, 0.0, 0.0],
                         [1e-38, -1e-38, 0.0]])
    for bits, sym in ((2, False), (4, False), (4, True), (8, False), (8, True)):
        scale, zero = find_params(rows, bits, sym)
        unit_scale, unit_zero = find_params(torch.zeros(4, 3), bits, sym)
        assert torch.equal(scale, unit_scale) and torch.equal(zero, unit_zero)
    scale, zero = find_params(torch.tensor([[0.0, 15 * 2.0**-126]]), 4, False)  # the least normal
    assert scale.tolist() == [2.0**-126] and zero.tolist() == [0.0]
    W, _, Hinv, H = make_problem(gen)
    W[3] = 0
    W[3, 5], W[4, :40] = 1e-44, -20 * least  # (row 4: normal weights after its first 40)
    for bits, sym in ((4, False), (8, True)):
        maxq = 2**bits - 1
        for group_size, blocksize in ((16, 32), (48, 32)):  # found in the tile, in memory
            ref, out = run_both(W, Hinv, H, bits=bits, sym=sym, group_size=group_size,
                                blocksize=blocksize)
            for solve in (ref, out):
                assert torch.isfinite(solve.Q).all() and (solve.scales > 0).all()
                assert (solve.zeros >= 0).all() and (solve.zeros <= maxq).all()
                assert torch.equal(solve.Q[3], torch.zeros_like(solve.Q[3]))
                assert torch.equal(solve.Q[4, :16], torch.zeros(16))
        # a static grid from the same weights (gptq's per-channel and static groups) is valid
        run_both(W, Hinv, H, bits=bits, sym=sym, blocksize=32, **static_grid(W, bits, sym, 16))


def test_find_params_of_rows_with_no_columns_is_the_unit_range():
    """A W with no columns ended in torch's bare 'amin(): Expected reduction dim 1 to have
    non-zero size'. A row with no weight spans [min(w, 0), max(w, 0)] = [0, 0], as an all-zero
    row does: the unit range, one grid a row (none for no rows)."""
    for bits, sym in ((4, False), (4, True), (8, False)):
        scale, zero = find_params(torch.zeros(3, 0, dtype=torch.float16), bits, sym)
        unit_scale, unit_zero = find_params(torch.zeros(3, 1), bits, sym)
        assert torch.equal(scale, unit_scale) and torch.equal(zero, unit_zero)
        assert scale.dtype == zero.dtype == torch.float32
        scale, zero = find_params(torch.zeros(0, 0), bits, sym)
        assert scale.shape == zero.shape == (0,)


def test_find_params_refuses_a_weight_that_is_not_rows_by_columns():
    """find_params of a 1-D W (one row given flat) ended in torch's bare 'Dimension out of
    range', and a 3-D one gave a [rows, cols] 'scale' of its middle axis' ranges, silently."""
    for W in (torch.randn(8), torch.randn(2, 3, 4), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"W must be 2-D \[rows, cols\]"):
            find_params(W, 4, False)


# --------------------------------------------------------------------------- dispatch and checks


def test_dispatcher(gen):
    W, R, Hinv, H = make_problem(gen, 8, 32)
    a = gptq_solve(W, Hinv, bits=4, sym=False, group_size=16, blocksize=16, backend="triton")
    b = gptq_solve(W, Hinv, bits=4, sym=False, group_size=16, blocksize=16, backend="torch")
    assert_solves_match(b, a, W, H)
    with pytest.raises(ValueError, match="backend"):
        gptq_solve(W, Hinv, bits=4, sym=False, group_size=16, backend="cuda")


def test_argument_errors(gen):
    W, R, Hinv, H = make_problem(gen, 8, 32)
    with pytest.raises(ValueError, match="Hinv"):
        gptq_solve_triton(W, Hinv[:16, :16], bits=4, sym=False, group_size=16)
    with pytest.raises(ValueError, match="bits"):
        gptq_solve_triton(W, Hinv, bits=5, sym=False, group_size=16)
    with pytest.raises(ValueError, match="static grid"):
        gptq_solve_triton(W, Hinv, bits=4, sym=False)
    with pytest.raises(ValueError, match="out.codes"):
        bad = SolveOut(torch.empty_like(W), torch.empty(8, 32, dtype=torch.int64, device=DEVICE), None, None)
        gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=bad)
    if DEVICE.type == "cpu":
        with pytest.raises((ValueError, RuntimeError)):
            gptq_solve_triton(W.to("meta"), Hinv, bits=4, sym=False, group_size=16)
    for solve in (gptq_solve_triton, gptq_solve_reference):
        for blocksize in (0, -4, 2.5):
            with pytest.raises(ValueError, match="blocksize must be a positive int"):
                solve(W, Hinv, bits=4, sym=False, group_size=16, blocksize=blocksize)
        grid = static_grid(W, 4, False, 16)
        scales, zeros = grid["scales"], grid["zeros"]
        for bad, message in ((dict(scales=scales * 0), "finite and positive"),
                             (dict(scales=scales * float("nan")), "finite and positive"),
                             (dict(zeros=zeros * float("nan")), r"integers in \[0, 15\]"),
                             (dict(zeros=zeros + 0.5), "integers"), (dict(zeros=zeros + 16), "integers")):
            with pytest.raises(ValueError, match=message):
                solve(W, Hinv, bits=4, sym=False, **{**grid, **bad})


def test_a_solve_reads_hinvs_checks_back_at_once(gen, host_reads):
    """Hinv's checks (finite, within fp32, no subnormal or zero diagonal, no nonzeros below it) are
    one read back, the solve's overflow check another: on a GPU each read waits for the queue to
    drain (Hinv's were five). The refusals themselves: test_a_hinv_that_is_not_finite_is_refused_as_such
    and its neighbours."""
    W, R, Hinv, H = make_problem(gen, 8, 32, with_R=True)
    assert host_reads(lambda: gptq_solve_reference(W, Hinv, bits=4, sym=False, group_size=16, R=R)) == 2


def test_inputs_that_require_grad(gen):
    """W (or Hinv) an nn.Parameter, as a layer's weight is: the kernel's first trailing update
    (torch.sub(..., out=)) failed with autograd's 'out=... arguments don't support automatic
    differentiation', naming neither; the reference built an autograd graph of every column's
    update. Both solve them as plain tensors."""
    W, R, Hinv, H = make_problem(gen, 8, 48, with_R=True)
    for R_given in (None, R):
        for grads in ((True, False), (False, True)):
            Wp, Hp = (t.clone().requires_grad_(g) for t, g in zip((W, Hinv), grads))
            kw = dict(bits=4, sym=False, R=R_given, group_size=16, blocksize=16)
            ref, out = gptq_solve_reference(Wp, Hp, **kw), gptq_solve_triton(Wp, Hp, **kw)
            for s in (ref, out):
                assert not s.Q.requires_grad and s.Q.grad_fn is None
            assert_solves_match(ref, out, W if R_given is None else W + R_given, H)


def test_empty_layer(gen):
    W = torch.randn(0, 32, generator=gen).to(DEVICE)
    Hinv = torch.eye(32, device=DEVICE)
    grid = dict(scales=torch.ones(0, 1, device=DEVICE), zeros=torch.zeros(0, 1, device=DEVICE),
                col_group=torch.zeros(32, dtype=torch.long, device=DEVICE))
    ref = gptq_solve_reference(W, Hinv, bits=4, sym=False, **grid)
    out = gptq_solve_triton(W, Hinv, bits=4, sym=False, **grid)
    assert [tuple(t.shape) for t in out[:4]] == [tuple(t.shape) for t in ref[:4]]


def test_first_update_masks_with_64_bit_sizes():
    """The first trailing update of a layer with d_out x (d_in - B) >= 2^31 elements (the
    lm_head of a 256k vocabulary) still writes: its mask bound comes from the host, as int64."""
    d_in, n_cols = 1024 + 32, 1024
    W, R = torch.ones(1, d_in, device=DEVICE), torch.ones(1, d_in, device=DEVICE)
    P = torch.full((1, n_cols), 0.5, device=DEVICE)
    out = torch.zeros(1, d_in, device=DEVICE)
    _target_minus_update_kernel[(1,)](W, R, P, out, 65536 * n_cols * 32, n_cols, 32, d_in, BLOCK=1024)
    assert torch.equal(out[0, 32:], torch.full((n_cols,), 1.5, device=DEVICE))


@pytest.mark.parametrize("group_size", [-1, 8])
def test_a_blocksize_past_the_layer_is_one_block(gen, monkeypatch, group_size):
    """A blocksize past d_in ("one block": 2**26) was refused by the kernel's launcher as too
    large for 32-bit offsets, which the reference solved; and one merely past it sized the
    kernel's tile and errors' workspace by itself (BLOCK_COLS 4096 for 40 columns). Both solve
    as the reference does, with a tile of the layer's width."""
    import epmq_kernels.gptq_solve as solver

    W, R, Hinv, H = make_problem(gen, 8, 40, with_R=True)
    grid = static_grid(W + R, 4, False, -1) if group_size == -1 else dict(group_size=group_size)
    widths, kernel = [], solver._gptq_block_kernel

    class Watched:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                widths.append(kwargs["BLOCK_COLS"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(solver, "_gptq_block_kernel", Watched())
    for blocksize in (2**26, 4096):
        ref, out = run_both(W, Hinv, H, bits=4, sym=False, R=R, blocksize=blocksize, **grid)
        assert torch.equal(ref.codes, out.codes)
    assert set(widths) == {64}


def test_effective_blocksize_is_what_the_kernel_sees():
    # the cases the tests above rely on
    assert effective_blocksize(32, 48) == 24
    assert effective_blocksize(64, 96) == 48
    assert effective_blocksize(32, 16) == 32


# --------------------------------------------------------------------------- end to end


SPECS = [
    dict(bits=4, group_size=32, sym=False, act_order=True, static_groups=False),
    dict(bits=3, group_size=32, sym=True, act_order=True, static_groups=True),
    dict(bits=2, group_size=-1, sym=False, act_order=False, static_groups=False),
    dict(bits=8, group_size=48, sym=False, act_order=False, static_groups=False),
]


def _spec_id(s):
    return "b{bits}g{group_size}s{sym:d}a{act_order:d}st{static_groups:d}".format(**s)


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_gptq_end_to_end(gen, spec):
    from epmq.quant import gptq
    from epmq.spec import QuantSpec

    W = torch.randn(D_OUT, D_IN, generator=gen).to(DEVICE)
    H = make_hessian(gen, D_IN, 64, dead=(7,)).float().to(DEVICE)
    a = gptq(W, H, QuantSpec(**spec), blocksize=32, backend="torch")
    b = gptq(W, H, QuantSpec(**spec), blocksize=32, backend="triton")
    frac = float((a.codes != b.codes).double().mean())
    assert frac <= MAX_CODE_MISMATCH and int((a.codes - b.codes).abs().max()) <= 1
    assert torch.equal(a.g_idx, b.g_idx)
    assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss)


def test_epmq_end_to_end(gen):
    from epmq.quant import epmq
    from epmq.spec import QuantSpec

    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    experts = [(W_m + 0.05 * torch.randn(D_OUT, D_IN, generator=gen)).to(DEVICE) for _ in range(3)]
    hessians = [make_hessian(gen, D_IN, 48).float().to(DEVICE) for _ in range(3)]
    spec = QuantSpec(bits=4, group_size=32, act_order=True)
    W_m = W_m.to(DEVICE)
    a = epmq(W_m, experts, hessians, spec, blocksize=32, backend="torch")
    b = epmq(W_m, experts, hessians, spec, blocksize=32, backend="triton")
    torch.testing.assert_close(b.target, a.target, rtol=1e-4, atol=1e-5)
    frac = float((a.codes != b.codes).double().mean())
    assert frac <= MAX_CODE_MISMATCH and int((a.codes - b.codes).abs().max()) <= 1
    assert torch.equal(a.g_idx, b.g_idx)
    assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss)
    assert abs(a.expert_loss - b.expert_loss) <= 1e-4 * abs(a.expert_loss) + 1e-9


# --------------------------------------------------------------------------- GPU, layer sized


@pytest.mark.cuda
@pytest.mark.parametrize(
    "grid",
    [
        dict(group_size=128),
        dict(group_size=256),  # spans two blocks
        dict(group_size=32, sym=True, bits=3),
        dict(group_size=-1),
        dict(group_size=128, static=True, act_order=True),
    ],
    ids=["g128", "g256", "g32sym3", "channel", "static-actorder"],
)
@pytest.mark.parametrize("with_R", [False, True])
def test_cuda_layer_sized(gen, grid, with_R):
    d_out, d_in = 1024, 2048
    grid = dict(grid)
    bits, sym = grid.pop("bits", 4), grid.pop("sym", False)
    static, act_order = grid.pop("static", False), grid.pop("act_order", False)
    group_size = grid.pop("group_size")
    H0 = make_hessian(gen, d_in, 4096)
    perm = torch.argsort(H0.diagonal(), descending=True) if act_order else None
    W, R, Hinv, H = make_problem(gen, d_out, d_in, n_tokens=4096, with_R=with_R, perm=perm)
    T = W if R is None else W + R
    if group_size == -1 or static:
        kw = static_grid(T, bits, sym, group_size, perm=None if perm is None else perm.to(DEVICE))
    else:
        kw = dict(group_size=group_size)
    run_both(W, Hinv, H, bits=bits, sym=sym, R=R, blocksize=128, **kw)


@pytest.mark.cuda
def test_cuda_tf32_setting_does_not_leak(gen):
    W, R, Hinv, H = make_problem(gen, 256, 512)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=128)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_interpreter_matches_device():
    # the CPU tests only mean something if the kernels really ran interpreted there
    assert _runtime.INTERPRETED == (DEVICE.type == "cpu")


# --------------------------------------------------------------------------- the compiled path

# Compiles the kernels for real GPUs (sm_90 and sm_80) in a subprocess without the interpreter:
# on a machine without CUDA, this is what shows that the compiled path builds, and that the
# exactness the CPU tests rely on survives compilation: IEEE division only, no fused
# multiply-add in the solver, the rounding constant still there.
_COMPILE_SOLVER = r"""
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import epmq_kernels.gptq_solve as gs

ptr = dict(W="*fp32", R="*fp32", Hinv="*fp32", Q="*fp32", codes="*i32", Err="*fp32",
           ErrSq="*fp32", scales="*fp32", zeros="*fp32", col_group="*i32")
rcp = float(torch.tensor(1 / 15, dtype=torch.float32))
variants = [  # (DYNAMIC, GROUP_SPANS, SYM, HAS_R, BLOCK_ROWS, BLOCK_COLS, num_warps, capability)
    (True, False, False, True, 4, 128, 1, 90),
    (True, True, True, False, 8, 64, 1, 90),
    (True, True, False, True, 4, 128, 1, 90),
    (False, False, False, True, 2, 128, 1, 90),
    (True, False, False, False, 8, 128, 4, 80),
]
for dynamic, spans, sym, has_r, rows, cols, warps, cap in variants:
    const = dict(HAS_R=has_r, DYNAMIC=dynamic, GROUP_SPANS=spans, SYM=sym, MAXQ=15.0,
                 SCALE_BY_RCP=True, MAXQ_RCP=rcp, BLOCK_ROWS=rows, BLOCK_COLS=cols)
    sig = {n: "constexpr" if n in const else ptr.get(n, "i32") for n in gs._gptq_block_kernel.arg_names}
    k = triton.compile(ASTSource(gs._gptq_block_kernel, sig, constexprs=const),
                       target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=warps, enable_fp_fusion=False))
    ptx = k.asm["ptx"]
    assert "div.rn.f32" in ptx, "no IEEE division"
    assert not re.search(r"div\.(full|approx)", ptx), "approximate division in the solver"
    assert not re.search(r"\bfma\.", ptx), "fused multiply-add in the solver"
    assert "0f4B400000" in ptx and "0fCB400000" in ptx, "the rounding trick was folded away"
for total in ("i32", "i64"):  # (Triton passes n_total as int64 from 2^31 on)
    sig = dict(W="*fp32", R="*fp32", P="*fp32", out="*fp32", n_total=total, n_cols="i32",
               col0="i32", d_in="i32", BLOCK="constexpr")
    triton.compile(ASTSource(gs._target_minus_update_kernel, sig, constexprs=dict(BLOCK=1024)),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print("compiled")
"""


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_solver_compiles_for_gpus():
    proc = run_compile_script(_COMPILE_SOLVER, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# (d_out, d_in, grid, bits, sym, with R, block_rows, blocksize): odd widths (one column, a block
# of one column at the end, 131 and 300 over blocks of 128), groups of 1, 32, 131 (spanning
# blocks), static and per channel, one row and eight a program, with R and without
_AS_LAUNCHED = [
    (1, 1, "channel", 4, False, True, 1, 128),
    (3, 17, 1, 2, True, False, 1, 128),
    (3, 17, "channel", 8, True, True, 2, 16),
    (9, 131, 32, 4, False, True, 8, 128),
    (9, 131, 131, 2, True, False, 1, 128),
    (9, 300, 131, 8, False, True, 8, 128),
    (5, 300, "static", 4, False, True, 8, 128),
    (5, 131, "static", 2, True, False, 1, 128),
    (1, 17, "channel", 8, False, True, 1, 16),
    (9, 300, "channel", 2, True, True, 8, 128),
]


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_solver_compiles_as_launched(gen, monkeypatch):
    """The compile test above hands the kernel all-i32 signatures; a launch specialises its
    integers (one column, one row, a single group or block: constants) and the 16-byte
    divisibility of its pointers and sizes. The launches the solver really makes of odd shapes,
    every grid, 2, 4 and 8 bits, R and 1 to 8 rows a program, compiled for sm_90 and sm_80 as
    launched (one warp and the fp32 reciprocal's scale, as on a GPU)."""
    import epmq_kernels.gptq_solve as gs

    block, update = Launches(gs._gptq_block_kernel), Launches(gs._target_minus_update_kernel)
    monkeypatch.setattr(gs, "_gptq_block_kernel", block)
    monkeypatch.setattr(gs, "_target_minus_update_kernel", update)
    for d_out, d_in, grid, bits, sym, with_R, rows, blocksize in _AS_LAUNCHED:
        W, R, Hinv, H = make_problem(gen, d_out, d_in, n_tokens=64, with_R=with_R)
        kw = dict(bits=bits, sym=sym, R=R, blocksize=blocksize)
        if grid in ("static", "channel"):
            kw.update(static_grid(W if R is None else W + R, bits, sym, 32 if grid == "static" else -1))
        else:
            kw.update(group_size=grid)
        ref = gptq_solve_reference(W, Hinv, **kw)
        out = gptq_solve_triton(W, Hinv, block_rows=rows, num_warps=1, **kw)
        assert torch.equal(out.codes, ref.codes), (d_out, d_in, grid)
    assert block.calls and update.calls
    script = compile_as_launched("epmq_kernels.gptq_solve",
                                 [("_gptq_block_kernel", block.calls), ("_target_minus_update_kernel", update.calls)],
                                 constexprs=dict(_gptq_block_kernel=dict(SCALE_BY_RCP=True)))
    proc = run_compile_script(script, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------- grid details


def assert_first_group_zeros(W, Hinv, H, bits, want):
    """Both solvers give rows 0 and 1 the zero points ``want`` in their first asymmetric group,
    one found in the tile (16 columns) and one found in memory (48, larger than the block)."""
    for group_size in (16, 48):
        for solve in run_both(W, Hinv, H, bits=bits, sym=False, group_size=group_size, blocksize=32):
            assert solve.zeros[:2, 0].tolist() == want

def test_asymmetric_grids_span_zero_for_one_signed_groups(gen):
    """An asymmetric grid spans [min(w, 0), max(w, 0)]: a group of only positive (only negative)
    weights gets zero point 0 (maxq), in find_params and in both solvers, for groups found in
    the tile and for groups found in memory (larger than the block). Random weights almost
    never give such a group, so the rule is pinned here."""
    W, _, Hinv, H = make_problem(gen)
    W[0] = W[0].abs() + 0.5
    W[1] = -W[1].abs() - 0.5
    scale, zero = find_params(W[:2, :16], 4, False)
    assert zero.tolist() == [0.0, 15.0]
    assert torch.equal(scale, torch.stack([W[0, :16].max(), -W[1, :16].min()]) / 15)
    assert_first_group_zeros(W, Hinv, H, 4, [0.0, 15.0])


def test_zero_point_ties_round_half_to_even(gen):
    """The zero point ``round(-min / scale)`` rounds half to even (torch.round, the kernel's
    _rint), not half away from zero: 2 bits over [-1, 5] and [-5, 1] (scale 2) give 0.5 -> 0
    and 2.5 -> 2, in find_params and in both solvers' first group."""
    scale, zero = find_params(torch.tensor([[-1.0, 5.0, 0.5], [-5.0, 1.0, -0.5]]), 2, False)
    assert scale.tolist() == [2.0, 2.0] and zero.tolist() == [0.0, 2.0]
    W, _, Hinv, H = make_problem(gen, 4, 64)
    W[:, :48] = W[:, :48].clamp(-0.9, 0.9)  # (the first group of either size)
    W[0, 3], W[0, 9] = -1.0, 5.0
    W[1, 3], W[1, 9] = -5.0, 1.0
    assert_first_group_zeros(W, Hinv, H, 2, [0.0, 2.0])


def test_group_params_of_a_shorter_last_group(gen):
    """find_group_params: each group's grid is find_params of its own columns; the shorter last
    group (group size not dividing d_in) is padded with zeros, which move no grid."""
    from epmq_kernels.grid import find_group_params

    W = torch.randn(6, 40, generator=gen)
    W[0] = W[0].abs() + 0.5  # one-signed rows: padding with anything but 0 would show
    W[1] = -W[1].abs() - 0.5
    for bits, sym in ((4, False), (3, True)):
        scales, zeros = find_group_params(W, 16, bits, sym)
        assert scales.shape == zeros.shape == (6, 3)
        for g, a in enumerate(range(0, 40, 16)):
            s, z = find_params(W[:, a : a + 16], bits, sym)
            assert torch.equal(scales[:, g], s) and torch.equal(zeros[:, g], z)


def test_groups_never_straddle_a_block(gen):
    """A group size below the block that does not divide it (groups of 32, blocks of 48) shrinks
    the block to a multiple of it, so that every group starts with every earlier column's error
    applied: the solve is the one with blocks of 32, on both backends."""
    assert effective_blocksize(48, 32) == 32 and effective_blocksize(100, 16) == 96
    W, _, Hinv, H = make_problem(gen, 8, 96)
    for solve in (gptq_solve_reference, gptq_solve_triton):
        a = solve(W, Hinv, bits=4, sym=False, group_size=32, blocksize=48)
        b = solve(W, Hinv, bits=4, sym=False, group_size=32, blocksize=32)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.Q, b.Q)
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("group_size,blocksize,n_blocks", [(17, 16, 12), (37, 16, 8)])
def test_group_sizes_with_no_divisor_that_fits_the_block_keep_real_blocks(gen, group_size, blocksize, n_blocks):
    """A group size over the block with no divisor but 1 up to it (131 or 257 with blocks of
    128; 17 or 37 with 16 here) ran in blocks of one column: a launch and a trailing product per
    column. Each group is cut into ceil(group_size / blocksize) blocks of near-equal width
    (17: 9 + 8; 37: 13 + 13 + 11; the last, shorter group in the same widths), so every group
    still starts a block; both backends agree, and the solve is the column loop's (blocks of
    one) to the rounding of the trailing products."""
    assert effective_blocksize(128, 131) == 66 and effective_blocksize(128, 257) == 86
    W, R, Hinv, H = make_problem(gen, with_R=True)
    T = W + R
    kw = dict(bits=4, sym=False, R=R, group_size=group_size)
    ref, out = run_both(W, Hinv, H, blocksize=blocksize, **kw)
    assert ref.err_sq.shape == out.err_sq.shape == (D_OUT, n_blocks)  # one column a block
    col = gptq_solve_reference(W, Hinv, blocksize=1, **kw)
    step = (col.codes - ref.codes).abs()
    assert int(step.max()) <= 1 and float((step > 0).double().mean()) <= MAX_CODE_MISMATCH
    torch.testing.assert_close(ref.scales, col.scales, rtol=1e-5, atol=0)
    loss_col = layer_loss(col.Q, T, H)
    assert abs(layer_loss(ref.Q, T, H) - loss_col) <= 1e-4 * loss_col


def test_static_zero_points_may_be_maxq(gen):
    """A static grid's zero points may be any integer in [0, maxq], maxq included (the zero
    point of a group whose weights are all negative)."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    W = -W.abs() - 0.1
    grid = static_grid(W, 4, False, 16)
    assert (grid["zeros"] == 15).all()
    run_both(W, Hinv, H, bits=4, sym=False, blocksize=16, **grid)


def test_more_argument_errors(gen):
    """Clear errors, before any kernel runs, for arguments the first checks above leave out."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    grid = static_grid(W, 4, False, 16)
    for solve in (gptq_solve_triton, gptq_solve_reference):
        for bad in (2, -1):  # one past either end of the two groups
            col_group = grid["col_group"].clone()
            col_group[5] = bad
            with pytest.raises(ValueError, match="col_group out of range"):
                solve(W, Hinv, bits=4, sym=False, **{**grid, "col_group": col_group})
        with pytest.raises(ValueError, match="R must have W's shape"):
            solve(W, Hinv, bits=4, sym=False, R=W[:, :16], group_size=16)
        with pytest.raises(ValueError, match="R must have W's shape"):
            solve(W, Hinv, bits=4, sym=False, R=W[:1], group_size=16)  # (would broadcast)
        for group_size in (True, 16.0):
            with pytest.raises(ValueError, match="group_size must be an int"):
                solve(W, Hinv, bits=4, sym=False, group_size=group_size)
        with pytest.raises(ValueError, match="group_size must be positive, or -1 or 0 for a static grid, got -2"):
            solve(W, Hinv, bits=4, sym=False, **{**grid, "group_size": -2})
    for block_rows in (3, 6, 0):
        with pytest.raises(ValueError, match="block_rows must be a power of two"):
            gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, block_rows=block_rows)
    n = dict(dtype=torch.float32, device=DEVICE)
    for shape in ((8, 3), (8, 1), (4, 2)):  # dynamic groups of 16 over 32 columns: [8, 2]
        bad = SolveOut(torch.empty(8, 32, **n), torch.empty(8, 32, dtype=torch.int32, device=DEVICE),
                       torch.empty(shape, **n), torch.empty(shape, **n))
        with pytest.raises(ValueError, match="out.scales"):
            gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=bad)
    # out on another device than W: the kernel wrote through its pointers (a GPU's illegal
    # address, or another GPU's memory overwritten; here "Cannot copy out of meta tensor")
    for where in range(4):
        parts = [torch.empty(8, 32, **n), torch.empty(8, 32, dtype=torch.int32, device=DEVICE),
                 torch.empty(8, 2, **n), torch.empty(8, 2, **n)]
        parts[where] = parts[where].to("meta")
        name = ("out.Q", "out.codes", "out.scales", "out.zeros")[where]
        with pytest.raises(ValueError, match=f"different devices: .*{name}=meta"):
            gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=SolveOut(*parts))


def test_a_lower_factor_or_the_whole_inverse_is_refused(gen):
    """Hinv is the upper Cholesky factor of H^{-1}, and the solver reads its upper triangle alone:
    torch.linalg.cholesky's default, the lower factor, ran as a diagonal Hinv (every column rounded
    with no error fed forward: silently not GPTQ), and H^{-1} itself as another matrix; refused."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(damped(H))).float().to(DEVICE)
    for bad in (torch.linalg.cholesky(H_inv.double()).float(), H_inv):
        for solve in (gptq_solve_triton, gptq_solve_reference):
            with pytest.raises(ValueError, match=r"Hinv must be the upper Cholesky factor of H\^\{-1\}"):
                solve(W, bad, bits=4, sym=False, group_size=16)
    diagonal = torch.diag(Hinv.diagonal())  # (uncorrelated inputs: both factors are diagonal)
    ref = gptq_solve_reference(W, diagonal, bits=4, sym=False, group_size=16)
    assert torch.equal(gptq_solve_triton(W, diagonal, bits=4, sym=False, group_size=16).codes, ref.codes)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_hinv_that_is_not_finite_is_refused_as_such(gen, solve):
    """A NaN below Hinv's diagonal was refused as a lower factor's "nonzeros below its diagonal",
    and one on or above it, or an inf, solved to NaN weights, silently: refused as not finite,
    saying which, wherever it lies (fp16 and float8 factors are read as the solvers read them)."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    i, j = sorted(torch.randperm(32, generator=gen)[:2].tolist())
    for (row, col), value, what in (((j, 0), float("nan"), "NaN"), ((j, i), float("nan"), "NaN"),
                                    ((i, i), float("nan"), "NaN"),
                                    ((i, j), float("nan"), "NaN"), ((i, j), float("inf"), "inf"),
                                    ((j, j), float("-inf"), "inf")):
        for dtype in (torch.float32, torch.float16):
            bad = Hinv.to(dtype, copy=True)
            bad[row, col] = value
            with pytest.raises(ValueError, match=f"Hinv must be finite, it has {what}"):
                solve(W, bad, bits=4, sym=False, group_size=16)
    want = solve(W, Hinv.to(torch.float8_e4m3fn), bits=4, sym=False, group_size=16)
    assert torch.isfinite(want.Q).all()


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_an_fp64_hinv_past_fp32s_range_is_refused_naming_the_value(gen, solve):
    """Both solvers read Hinv in fp32: an fp64 factor holding 1e39, finite, passed the finiteness
    check and was solved as inf, to NaN weights, silently; refused, naming the value, wherever it lies."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    i, j = sorted(torch.randperm(32, generator=gen)[:2].tolist())
    for (row, col), value in (((i, j), 1e39), ((j, j), -1e39), ((i, i), 5e38)):
        bad = Hinv.double()
        bad[row, col] = value
        with pytest.raises(ValueError, match=re.escape(f"Hinv holds {value:g}, past float32's range")):
            solve(W, bad, bits=4, sym=False, group_size=16)
    # (fp32's largest, and the fp64 values that round to it, are finite as read)
    edge = Hinv.double()
    edge[j, j] = torch.finfo(torch.float32).max * (1 + 2.0**-25)
    assert torch.isfinite(edge.float()).all()
    assert torch.isfinite(solve(W, edge, bits=4, sym=False, group_size=16).Q).all()


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_fp64_static_scales_past_fp32s_range_are_refused_naming_the_value(gen, solve):
    """Both solvers read a static grid's scales in fp32: an fp64 scale of 1e-50, positive, passed the
    check and was read as 0, every weight of its group solved to 0 with finite errors, silently; one of
    1e39 was read as inf and refused as an overflow blamed on Hinv. Refused, naming the value as given
    and as read."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    grid = static_grid(W, 4, False, 16)
    row, group = int(torch.randint(8, (1,), generator=gen)), int(torch.randint(2, (1,), generator=gen))
    for value, read in ((1e-50, "0"), (1e39, "inf"), (-1e-50, "-0")):
        scales = grid["scales"].double()
        scales[row, group] = value
        with pytest.raises(ValueError, match=re.escape(f"scales must be finite and positive in float32, as the "
                                                       f"solvers read them, got {value:g} ({read} in float32)")):
            solve(W, Hinv, bits=4, sym=False, **{**grid, "scales": scales})
    # (fp32's least normal, given in fp64, is a scale as read)
    scales = grid["scales"].double()
    scales[row, group] = torch.finfo(torch.float32).tiny
    assert torch.isfinite(solve(W, Hinv, bits=4, sym=False, **{**grid, "scales": scales}).Q).all()
    # (a subnormal one, given in fp32 or fp64, solved every weight of its group to ~0 as 1e-50 did, on a GPU the
    # kernel's division flushing it to 0 itself; the dynamic grids never make one: grid.TINY)
    for dtype, said in ((torch.float32, "9.99995e-41"), (torch.float64, "1e-40 (9.99995e-41 in float32)")):
        scales = grid["scales"].to(dtype)
        scales[row, group] = 1e-40
        with pytest.raises(ValueError, match=re.escape(f"as the solvers read them, got {said}: below float32's "
                                                       f"normal range (1.18e-38)")):
            solve(W, Hinv, bits=4, sym=False, **{**grid, "scales": scales})
    # (a value fp32 holds only to its rounding, -0.1, is said once: "-0.1 (-0.1 in float32)" told of no change)
    scales = grid["scales"].double()
    scales[row, group] = -0.1
    with pytest.raises(ValueError, match=r"as the solvers read them, got -0\.1$"):
        solve(W, Hinv, bits=4, sym=False, **{**grid, "scales": scales})


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's arithmetic is torch's on the CPU")
def test_interpreted_solve_is_bit_identical_to_the_reference(gen):
    """Interpreted, the kernel's arithmetic is the reference's operation for operation
    (``scale = (max - min) / maxq`` divides as torch on the CPU does, IEEE divisions, no fused
    multiply-add): grids, codes and Q agree bit for bit, not within a tolerance."""
    W, R, Hinv, H = make_problem(gen, 16, 64, with_R=True)
    for bits, sym, group_size in ((4, False, 16), (3, True, 8), (8, False, 32)):
        kw = dict(bits=bits, sym=sym, R=R, group_size=group_size, blocksize=32)
        ref, out = gptq_solve_reference(W, Hinv, **kw), gptq_solve_triton(W, Hinv, **kw)
        assert torch.equal(out.scales, ref.scales) and torch.equal(out.zeros, ref.zeros)
        assert torch.equal(out.codes, ref.codes) and torch.equal(out.Q, ref.Q)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_target_that_is_not_finite_is_refused_naming_it(gen, solve):
    """A NaN target solved to NaN weights and was returned as such; refused now, naming the operand
    and its first such column, the last column's too (whose error feeds nothing: on a static grid a
    clamp that dropped NaN would leave a finite Q there, the error NaN)."""
    d_out, d_in = 8, 32
    W, R, Hinv, H = make_problem(gen, d_out, d_in, with_R=True)
    grid = static_grid(W, 4, False, 16)
    nan, inf, fp32_max = float("nan"), float("inf"), torch.finfo(torch.float32).max
    for where, (row, col), value, said in (("W", (0, 3), nan, "W has NaN at column 3"),
                                           ("W", (d_out - 1, d_in - 1), nan, f"W has NaN at column {d_in - 1}"),
                                           ("R", (2, 5), inf, "R has inf at column 5"),
                                           ("W R", (2, 5), fp32_max, r"W \+ R has inf at column 5"),
                                           ("W", (1, 7), 1e39, "W has inf at column 7")):
        operands = dict(W=W.double(), R=R.clone())  # (an fp64 W: its 1e39 is inf as the solvers read it)
        for name in where.split():
            operands[name][row, col] = value
        for kw in (grid, dict(group_size=16)):
            with pytest.raises(ValueError, match=rf"^{said} \(processing order; in float32"):
                solve(operands["W"], Hinv, R=operands["R"], bits=4, sym=False, blocksize=16, **kw)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_solve_that_overflows_is_refused_naming_its_first_column(gen, solve):
    """A finite Hinv can still overflow the solve: fp32's largest above the diagonal, times a
    column's error, was inf in the update and the weights after it NaN, silently (the kernel's
    dynamic grid finite), or on a static grid clamped to finite weights, the errors inf. Refused,
    naming the first column of weights that is not finite, or the block whose errors overflowed."""
    d_out, d_in = 8, 32
    W, _, Hinv, H = make_problem(gen, d_out, d_in)
    grid = static_grid(W, 4, False, 16)
    fp32_max = torch.finfo(torch.float32).max
    i, k = sorted(torch.randperm(d_in, generator=gen)[:2].tolist())
    bad = Hinv.clone()
    bad[i, k] = fp32_max
    bad[i, i] *= 2.0**-40  # (column i's error then far past 1, for every grid: its update overflows)
    for kw in (grid, dict(group_size=16), dict(group_size=4)):
        with pytest.raises(ValueError, match=r"^the solve overflowed float32: its (weights are first (NaN|inf) at "
                                             r"column|errors are inf in columns \d+ to) (\d+) \(processing "
                                             r"order\), from a finite W and Hinv") as e:
            solve(W, bad, bits=4, sym=False, blocksize=16, **kw)
        # (no column up to i: they were solved before its error overflowed)
        assert int(re.search(r"(\d+) \(processing order\)", str(e.value))[1]) > i
    # the last two columns, a static grid: column d_in - 1 is inf, clamped to a finite Q; its error inf
    far, edge = W.clone(), Hinv.clone()
    far[:, d_in - 2] = 100.0  # (off the grid, which clamps it: an error far above 1)
    edge[d_in - 2, d_in - 1] = fp32_max
    with pytest.raises(ValueError, match=rf"its errors are inf in columns 16 to {d_in - 1} \(processing order\)"):
        solve(far, edge, bits=4, sym=False, blocksize=16, **grid)
    # errors past 1.8e19 square to inf in err_sq, with finite weights: returned (epmq.quant measures that loss)
    out = solve(W * 1e20, Hinv, bits=4, sym=False, blocksize=16, group_size=16)
    assert torch.isfinite(out.Q).all() and not torch.isfinite(out.err_sq).all()


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_zero_on_the_diagonal_of_hinv_is_refused_naming_its_column(gen, solve):
    """GPTQ divides each column's error by Hinv[j, j]: a zero there (no factor of an invertible
    H^{-1} has one) made the errors inf, the reference's scales NaN and the kernel's inf, silently;
    refused, naming the first such column in processing order and how many more there are."""
    d_out, d_in = 5, 37  # (no multiple of a block)
    W, _, Hinv, H = make_problem(gen, d_out, d_in)
    grid = static_grid(W, 4, False, 16)
    j = int(torch.randint(1, d_in - 1, (1,), generator=gen))
    for columns, said in (([j], f"column {j} "), ([0], "column 0 "), ([d_in - 1], f"column {d_in - 1} "),
                          ([j, d_in - 1, 0], "column 0 (processing order), and 2 more")):
        bad = Hinv.clone()
        bad[columns, columns] = 0.0  # (-0.0 too: it is 0)
        bad[columns[0], columns[0]] = -0.0
        for kw in (dict(group_size=16, blocksize=16), dict(grid, blocksize=8)):
            with pytest.raises(ValueError, match=rf"Hinv has a zero on its diagonal at {re.escape(said)}"):
                solve(W, bad, bits=4, sym=False, **kw)
    # ... and an fp64 factor's 1e-50, which is 0 in fp32, as the solvers read it (solved to NaN weights)
    tiny = Hinv.double()
    tiny[j, j] = 1e-50
    with pytest.raises(ValueError, match=rf"Hinv has a zero on its diagonal at column {j} \(processing order\) "
                                         rf"\(in float32, as the solvers read it\)"):
        solve(W, tiny, bits=4, sym=False, group_size=16)
    # a negative diagonal (a row of the factor negated: the same H^{-1}) is taken, as the reference takes it
    flipped = Hinv.clone()
    flipped[j] = -flipped[j]
    got, want = solve(W, flipped, bits=4, sym=False, group_size=16), solve(W, Hinv, bits=4, sym=False, group_size=16)
    assert torch.equal(got.codes, want.codes)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_subnormal_on_the_diagonal_of_hinv_is_refused_naming_its_column(gen, solve):
    """A subnormal Hinv[j, j] in fp32 (1e-40) passed the zero check, and dividing column j's error by
    it overflowed to inf: NaN weights, silently. No factor of an H~ in fp32's range has one
    (Hinv[j, j]^2 >= 1 / H~[j, j]): refused, naming the first such column and how many more."""
    d_out, d_in = 5, 37
    W, _, Hinv, H = make_problem(gen, d_out, d_in)
    j = int(torch.randint(1, d_in - 1, (1,), generator=gen))
    smallest = float(torch.finfo(torch.float32).smallest_normal)
    for factor, columns, value, said in ((Hinv.clone(), [j], 1e-40, f"column {j} (processing order), below"),
                                         (Hinv.clone(), [d_in - 1, j], -1e-40, f"column {j} (processing order), and 1"),
                                         (Hinv.double(), [j], smallest * (1 - 2.0**-20), f"column {j} "),
                                         (Hinv.clone(), [0], 1e-45, "column 0 ")):
        factor[columns, columns] = value
        read = float(torch.tensor(value).float())  # (as the solvers read it)
        with pytest.raises(ValueError, match=rf"Hinv has {re.escape(f'{read:g}')} on its diagonal at "
                                             rf"{re.escape(said)}.*float32's normal range"):
            solve(W, factor, bits=4, sym=False, group_size=16, blocksize=16)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_complex_operands_are_refused_by_name(gen, solve):
    """A complex W, R or Hinv was solved as its real part, silently (torch's warning at most, none
    from the kernel): refused, naming the tensor."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    R = 0.01 * torch.randn(W.shape, generator=gen).to(W.device)
    for name in ("W", "R", "Hinv"):
        args = dict(W=W, R=R, Hinv=Hinv)
        args[name] = args[name].to(torch.complex64)
        with pytest.raises(ValueError, match=f"{name} must be real, got torch.complex64"):
            solve(args["W"], args["Hinv"], R=args["R"], bits=4, sym=False, group_size=16)
    grid = static_grid(W, 4, False, 16)
    for name in ("scales", "zeros"):
        with pytest.raises(ValueError, match=f"{name} must be real, got torch.complex64"):
            solve(W, Hinv, bits=4, sym=False, **dict(grid, **{name: grid[name].to(torch.complex64)}))


def test_launch_overrides_from_a_sweep_are_taken_or_refused_by_name(gen):
    """block_rows and num_warps (the benchmarks' sweep of the launch): NumPy's 4 (a sweep read
    from an array) ended in the interpreter's bare "cannot convert 4 of type <class
    'numpy.int64'> to tensor", 4.0 in "unsupported operand type(s) for &", and num_warps=0 ran
    the default warps silently (3 failed only compiled, in Triton's assertion); NumPy's integers are taken as
    Python's, the rest refused by name."""
    np = pytest.importorskip("numpy")
    W, _, Hinv, H = make_problem(gen, 8, 32)
    kw = dict(bits=4, sym=False, group_size=16)
    want = gptq_solve_triton(W, Hinv, block_rows=4, num_warps=1, **kw)
    got = gptq_solve_triton(W, Hinv, block_rows=np.int64(4), num_warps=np.int32(1), **kw)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.Q, want.Q)
    for block_rows in (4.0, "4", True):
        with pytest.raises(ValueError, match=f"block_rows must be a power of two, got {block_rows!r}"):
            gptq_solve_triton(W, Hinv, block_rows=block_rows, **kw)
    for num_warps in (0, 3, 2.0):
        with pytest.raises(ValueError, match=f"num_warps must be a power of two, got {num_warps!r}"):
            gptq_solve_triton(W, Hinv, num_warps=num_warps, **kw)


def test_an_out_of_another_kind_or_with_half_a_grid_is_refused(gen):
    """out= as a plain tuple (Q, codes, scales, zeros) ended in Python's bare "'tuple' object has
    no attribute 'Q'", and a SolveOut with out.scales but no out.zeros (dynamic groups) in
    "'NoneType' object has no attribute 'shape'"; both refused, saying what out must hold."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    n = dict(dtype=torch.float32, device=DEVICE)
    Q, codes = torch.empty(8, 32, **n), torch.empty(8, 32, dtype=torch.int32, device=DEVICE)
    grid = torch.empty(8, 2, **n)
    with pytest.raises(ValueError, match="out must be a SolveOut .*got tuple"):
        gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=(Q, codes, grid, grid.clone()))
    for scales, zeros in ((grid, None), (None, grid)):
        with pytest.raises(ValueError, match=r"out.scales/out.zeros must be contiguous float32 \[8, 2\].*got None"):
            gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=SolveOut(Q, codes, scales, zeros))


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_static_grid_half_given_or_out_of_range_is_refused_saying_what_was_given(gen, solve):
    """A static grid's errors said neither which of scales, zeros and col_group was missing (or given to
    dynamic groups) nor which group_size asked for it, nor the col_group values or the zero point found
    out of range; each now does, so that the call can be fixed from the message alone."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    grid = static_grid(W, 4, False, 16)
    with pytest.raises(ValueError, match=r"a static grid \(group_size = 0\) needs scales, zeros and col_group, "
                                         r"col_group is None$"):
        solve(W, Hinv, bits=4, sym=False, group_size=0, scales=grid["scales"], zeros=grid["zeros"])
    with pytest.raises(ValueError, match=r"\(group_size = -1\) needs .*, zeros, col_group are None$"):
        solve(W, Hinv, bits=4, sym=False, scales=grid["scales"])
    with pytest.raises(ValueError, match=r"dynamic groups \(group_size = 16 > 0\) take no static grid, got "
                                         r"zeros, col_group: pass group_size=-1"):
        solve(W, Hinv, bits=4, sym=False, group_size=16, zeros=grid["zeros"], col_group=grid["col_group"])
    col_group = grid["col_group"].clone()
    col_group[5] = 7
    with pytest.raises(ValueError, match=r"col_group out of range \[0, 2\) .*got values in \[0, 7\]$"):
        solve(W, Hinv, bits=4, sym=False, **{**grid, "col_group": col_group})
    zeros = grid["zeros"].clone()
    zeros[3, 1] = 2.5
    with pytest.raises(ValueError, match=r"zeros must be integers in \[0, 15\] for 4 bits, got 2.5$"):
        solve(W, Hinv, bits=4, sym=False, **{**grid, "zeros": zeros})


def test_an_out_q_or_codes_of_another_shape_dtype_or_layout_is_refused_saying_which(gen):
    """out.Q and out.codes unlike W were refused as 'must be a contiguous float32 tensor of W's shape'
    alone: neither W's shape nor what was given nor which of shape, dtype and layout was off (and
    None in 'object has no attribute shape'); the error says all three."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    n = dict(dtype=torch.float32, device=DEVICE)
    Q, codes = torch.empty(8, 32, **n), torch.empty(8, 32, dtype=torch.int32, device=DEVICE)
    bad_Q = {r"\(8, 32\) torch.float64": Q.double(), r"\(32, 8\) torch.float32": Q.T.contiguous(),
             r"a tensor of strides \(1, 8\), not contiguous": torch.empty(32, 8, **n).T, "None": None}
    for got, bad in bad_Q.items():
        with pytest.raises(ValueError, match=r"out.Q must be a contiguous torch.float32 tensor \[8, 32\] "
                                             rf"\(W's shape\), got {got}$"):
            gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=SolveOut(bad, codes, None, None))
    with pytest.raises(ValueError, match=r"out.codes must be a contiguous torch.int32 tensor \[8, 32\] "
                                         r"\(W's shape\), got \(8, 32\) torch.int64$"):
        gptq_solve_triton(W, Hinv, bits=4, sym=False, group_size=16, out=SolveOut(Q, codes.long(), None, None))


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_operands_on_another_device_are_refused_by_name(gen, solve):
    """An operand on another device than W ended the reference in torch's 'Tensor on device meta
    is not on the expected device cpu!' (naming no argument; the kernel's launcher named them),
    and a static grid's scales, zeros or col_group there both backends in 'Tensor.item() cannot
    be called on meta tensors'; both refuse naming each operand's device."""
    W, R, Hinv, H = make_problem(gen, 8, 32, with_R=True)
    grid = static_grid(W, 4, False, 16)
    args = dict(W=W, Hinv=Hinv, R=R, **grid)
    for name in args:
        given = dict(args, **{name: args[name].to("meta")})
        with pytest.raises(ValueError, match=f"tensors are on different devices: .*{name}=meta"):
            solve(given.pop("W"), given.pop("Hinv"), bits=4, sym=False, group_size=-1, **given)
    with pytest.raises(ValueError, match="tensors are on different devices: W=.*, Hinv=.*, R=meta$"):
        solve(W, Hinv, R=R.to("meta"), bits=4, sym=False, group_size=16)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_operands_that_are_no_tensor_are_refused_by_name(gen, solve):
    """A NumPy array or a list for W, Hinv, R, scales, zeros or col_group ended in Python's bare
    "'numpy.ndarray' object has no attribute 'is_complex'" (col_group's: 'shape'); refused,
    naming the argument and what it is."""
    W, R, Hinv, H = make_problem(gen, 8, 32, with_R=True)
    grid = static_grid(W, 4, False, 16)
    args = dict(W=W, Hinv=Hinv, R=R, **grid)
    for name in args:
        for bad in (args[name].cpu().numpy(), args[name].tolist()):
            given = dict(args, **{name: bad})
            with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor, got {type(bad).__name__}"):
                solve(given.pop("W"), given.pop("Hinv"), bits=4, sym=False, group_size=-1, **given)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_a_col_group_of_no_integer_dtype_is_refused(gen, solve):
    """A float col_group (group indices read as a float array) was taken: 0.5 or 1.7 truncated to
    groups 0 and 1 by both backends (int() and the kernel's int32 load), a bool one read as
    groups 0 and 1, silently; refused, naming its dtype."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    grid = static_grid(W, 4, False, 16)
    for col_group in (grid["col_group"] + 0.5, grid["col_group"].float(), grid["col_group"] > 0):
        with pytest.raises(ValueError, match=f"col_group must be an integer tensor .*got {col_group.dtype}"):
            solve(W, Hinv, bits=4, sym=False, **dict(grid, col_group=col_group))
    for dtype in (torch.int32, torch.int16, torch.uint8):  # (any integers are taken)
        solve(W, Hinv, bits=4, sym=False, **dict(grid, col_group=grid["col_group"].to(dtype)))


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_bool_operands_are_refused_by_name(gen, solve):
    """A bool tensor (a mask given for a grid or a weight) was taken as numbers 0 and 1: bool scales
    solved on a grid of step 1, bool W or R as weights 0 and 1, silently; bool zeros ended in
    torch's bare '"round_vml_cpu" not implemented for 'Bool''. Refused, naming the argument."""
    W, R, Hinv, H = make_problem(gen, 8, 32, with_R=True)
    grid = static_grid(W + R, 4, False, 16)
    args = dict(W=W, Hinv=Hinv, R=R, **grid)
    for name in ("W", "Hinv", "R", "scales", "zeros"):
        given = dict(args, **{name: args[name] > 0})
        with pytest.raises(ValueError, match=f"{name} must be numbers, got a torch.bool tensor"):
            solve(given.pop("W"), given.pop("Hinv"), bits=4, sym=False, **given)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_sym_and_bits_of_another_type_are_refused_by_name(gen, solve):
    """sym='no' (a truthy string, as from a YAML or CLI) ran symmetric, and bits=4.0 passed as 4,
    silently: sym must be a bool and bits an int (a bool is not taken as bits)."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    for sym in ("no", 0, None):
        with pytest.raises(ValueError, match=f"sym must be a bool, got {sym!r}"):
            solve(W, Hinv, bits=4, sym=sym, group_size=16)
    for bits in (4.0, True, "4"):
        with pytest.raises(ValueError, match=f"bits must be an int .*got {bits!r}"):
            solve(W, Hinv, bits=bits, sym=False, group_size=16)


def test_find_params_refuses_a_bit_width_that_makes_no_grid():
    """bits=0 made maxq 0 and every scale inf (codes 0, weights NaN), bits=3.5 a grid of 10.3
    levels, bits=True one of 1 bit, and sym='no' a symmetric grid, all silently: refused by name."""
    from epmq_kernels.grid import find_group_params
    W = torch.randn(4, 16)
    for bits in (0, -1, 3.5, 4.0, True, 17):
        with pytest.raises(ValueError, match=f"bits must be an int from 1 to 16, got {bits!r}"):
            find_params(W, bits, False)
        with pytest.raises(ValueError, match="bits must be an int"):
            find_group_params(W, 8, bits, False)
    with pytest.raises(ValueError, match="sym must be a bool, got 'no'"):
        find_params(W, 4, "no")


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_numpys_bools_and_integers_are_taken_as_sym_and_bits(gen, solve):
    """np.True_ and np.int64(4) (a sweep's values drawn from numpy arrays) ran as True and 4
    until sym and bits were checked (1195d87, 0690597), then were refused as 'sym must be a bool'
    and 'bits must be an int': the codes and grid of Python's True and 4, by the solver and
    find_params alike."""
    import numpy as np

    W, _, Hinv, H = make_problem(gen, 8, 32)
    for sym in (True, False):
        want = solve(W, Hinv, bits=4, sym=sym, group_size=16)
        got = solve(W, Hinv, bits=np.int64(4), sym=np.bool_(sym), group_size=16)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert all(torch.equal(a, b) for a, b in zip(find_params(W, np.int32(3), np.bool_(sym)),
                                                      find_params(W, 3, sym)))


def test_a_factor_with_other_values_below_its_diagonal_is_told_to_take_its_upper_triangle(gen):
    """scipy.linalg.cho_factor(H_inv) returns the upper factor with H_inv's own entries left below
    the diagonal: the solver reads the upper triangle alone, so it would run right, but that
    matrix cannot be told from H^{-1} itself, and the refusal said only 'a lower factor, or H^{-1}
    itself'. It says to take the upper triangle (torch.triu), which then solves as the factor."""
    W, _, Hinv, H = make_problem(gen, 8, 32)
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(damped(H))).float().to(DEVICE)
    cho_factor = Hinv + torch.tril(H_inv, -1)  # (as scipy's cho_factor(H_inv, lower=False) leaves it)
    for solve in (gptq_solve_triton, gptq_solve_reference):
        with pytest.raises(ValueError, match=r"cho_factor.*torch\.triu"):
            solve(W, cho_factor, bits=4, sym=False, group_size=16)
        got = solve(W, torch.triu(cho_factor), bits=4, sym=False, group_size=16)
        assert torch.equal(got.codes, solve(W, Hinv, bits=4, sym=False, group_size=16).codes)


@pytest.mark.parametrize("solve", [gptq_solve_triton, gptq_solve_reference])
def test_numpys_integers_are_taken_as_group_size_and_blocksize(gen, solve):
    """57de0a5 took numpy's bits and sym (a sweep's values read from arrays), but group_size and
    blocksize of the same sweep were refused as 'group_size must be an int ..., got np.int64(16)';
    taken as Python's, the same codes (a float or bool still refused)."""
    import numpy as np

    W, _, Hinv, H = make_problem(gen, 8, 32)
    want = solve(W, Hinv, bits=4, sym=False, group_size=16, blocksize=8)
    got = solve(W, Hinv, bits=4, sym=False, group_size=np.int64(16), blocksize=np.int32(8))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    for bad in (dict(group_size=16.0), dict(group_size=np.float64(16)), dict(blocksize=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            solve(W, Hinv, bits=4, sym=False, **dict(dict(group_size=16), **bad))


def test_an_out_sharing_memory_with_what_the_solver_reads_is_refused_naming_both(gen):
    """The kernel writes out.Q and out.codes while later programs and columns still read Hinv's
    rows, the static grid and the other outputs: out=SolveOut(Hinv, ...) of a square layer wrote
    Q over Hinv's upper rows before the next programs read them, a wrong solve without a word.
    Each such out is refused naming both tensors (their byte ranges, no pass over the data);
    disjoint slices of one buffer are taken."""
    d = 16
    W, R, Hinv, H = make_problem(gen, d, d, with_R=True)
    Hinv = Hinv.contiguous()
    grid = static_grid(W + R, 4, False, 8)
    n = dict(dtype=torch.float32, device=DEVICE)
    kw = dict(bits=4, sym=False, R=R, blocksize=8, block_rows=4)

    def codes_buffer():
        return torch.empty(d, d, dtype=torch.int32, device=DEVICE)

    with pytest.raises(ValueError, match="out.Q shares memory with Hinv"):
        gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(Hinv, codes_buffer(), None, None), **kw)
    with pytest.raises(ValueError, match="out.codes shares memory with Hinv"):
        gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(torch.empty(d, d, **n), Hinv.view(torch.int32),
                                                                None, None), **kw)
    # a static grid read from the last rows of the buffer Q is written into
    static = dict(col_group=grid["col_group"], **kw)
    Q = torch.empty(d, d, **n)
    scales, zeros = Q.view(-1)[-4 * d :].view(2, d, 2)
    with pytest.raises(ValueError, match="out.Q shares memory with scales"):
        gptq_solve_triton(W, Hinv, scales=scales.copy_(grid["scales"]), zeros=zeros.copy_(grid["zeros"]),
                          out=SolveOut(Q, codes_buffer(), None, None), **static)
    with pytest.raises(ValueError, match="out.codes shares memory with out.Q"):
        Q = torch.empty(d, d, **n)
        gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(Q, Q.view(torch.int32), None, None), **kw)
    with pytest.raises(ValueError, match="out.scales shares memory with W"):
        scales, zeros = W.view(-1)[: 4 * d].view(2, d, 2)
        gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(torch.empty(d, d, **n), codes_buffer(), scales, zeros),
                          **kw)

    # in place at W's or R's own address: solved right, but a failure there was blamed on their overwritten
    # values ('R has NaN at column 2') instead of raised as SolveOverflow, so refused, the error saying why;
    # one overlapping by a row is not R itself, and is refused as any other
    for name, t in (("W", W), ("R", R)):
        with pytest.raises(ValueError, match=rf"out.Q shares memory with {name}, .*\(it is {name} itself: the "
                                             rf"solve in place would be right.*instead of raising SolveOverflow\)"):
            gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(t, codes_buffer(), None, None), **kw)
    arena = torch.empty(2 * d - 1, d, **n)
    with pytest.raises(ValueError, match=r"out.Q shares memory with R, [^(]*: give an out"):
        gptq_solve_triton(W, Hinv, group_size=8, out=SolveOut(arena[d - 1:], codes_buffer(), None, None),
                          **dict(kw, R=arena[:d].copy_(R)))

    # disjoint slices of one buffer share no memory: taken
    ref = gptq_solve_reference(W, Hinv, bits=4, sym=False, R=R, blocksize=8, **grid)
    arena = torch.empty(d * d + 4 * d, **n)
    Q, (scales, zeros) = arena[: d * d].view(d, d), arena[d * d :].view(2, d, 2)
    out = gptq_solve_triton(W, Hinv, scales=scales.copy_(grid["scales"]), zeros=zeros.copy_(grid["zeros"]),
                            out=SolveOut(Q, codes_buffer(), None, None), **static)
    assert torch.equal(out.Q, ref.Q) and torch.equal(out.codes, ref.codes)
