import pytest
import torch

import epmq.checks
from epmq.checks import all_finite, check_hessian, check_weight


@pytest.fixture(autouse=True, params=["torch", "triton"])
def scan_backend(request, monkeypatch):
    """Every check of this module with the Hessian's numbers by torch and by the Triton kernel
    (interpreted here; on a GPU the kernel is the only path)."""
    monkeypatch.setattr(epmq.checks, "_scan_backend", lambda H: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_entry_anywhere(dtype, bad):
    g = torch.Generator().manual_seed(hash((str(dtype), bad)) % 2**31)
    for _ in range(5):
        t = torch.randn(37, 53, generator=g).to(dtype)
        assert all_finite(t)
        i, j = (int(torch.randint(n, (1,), generator=g)) for n in t.shape)
        t[i, j] = bad
        assert not all_finite(t)
        assert not all_finite(t.T)  # non-contiguous view
        assert all_finite(t[:i]) and all_finite(t[i + 1 :])


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.arange(10))  # integers are always finite
    big = torch.full((1000,), 3e38)  # a plain sum would overflow to inf: not a false alarm here
    assert all_finite(big)
    assert all_finite(torch.tensor(-0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_a_weights_finiteness_is_one_read(gen, dtype, host_reads):
    """all_finite and check_weight read the weight's min and max back together: E-PMQ takes three
    a layer (W, its factor, R), and on a GPU each read waits for the queue to drain (two each
    before). The values read are unchanged: non-finite ones still found, fp32's range still held."""
    W = torch.randn(5, 7, generator=gen).to(dtype)
    assert host_reads(lambda: all_finite(W)) == 1
    assert host_reads(lambda: check_weight(W)) == 1
    if dtype != torch.float8_e4m3fn:  # (that one has no inf)
        W[3, 2] = float("inf")
        assert not all_finite(W)
        with pytest.raises(ValueError, match="non-finite"):
            check_weight(W)
    if dtype == torch.float64:
        W[3, 2] = -1e39
        with pytest.raises(ValueError, match="beyond float32's range.*-?1e\\+39"):
            check_weight(W)


def test_checks_name_the_problem():
    W = torch.randn(4, 6)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W_k has non-finite"):
        check_weight(W, "W_k")
    H = torch.eye(6)
    H[0, 5] = float("inf")
    with pytest.raises(ValueError, match="H has non-finite"):
        check_hessian(H, 6)


@pytest.mark.parametrize("d", [6, 300, 1024])
def test_hessian_must_be_symmetric(d):
    g = torch.Generator().manual_seed(d)
    X = torch.randn(3 * d, d, generator=g) * torch.exp(torch.randn(d, generator=g))
    H = X.T @ X  # not bitwise symmetric from BLAS: rounding must pass
    check_hessian(H, d)
    check_hessian(H.bfloat16().float(), d)
    check_hessian(H.double(), d)
    bad = H.clone()
    bad[: d // 2, d // 2 :] *= 1.05  # one off-diagonal block 5% off its mirror image
    with pytest.raises(ValueError, match="H is not symmetric"):
        check_hessian(bad, d)
    with pytest.raises(ValueError, match="H is not symmetric"):
        # noise of 1% of H's size (Frobenius), off the diagonal, not mirrored
        check_hessian(H + torch.randn(d, d, generator=g).fill_diagonal_(0) * 0.01 * float(H.norm()) / d, d)


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e18, 1e30])
def test_the_symmetry_test_is_scale_free(scale):
    """A float32 Gram matrix of any scale passes and a lopsided one fails: |H v|'s square,
    in float32, underflowed to 0 below ~1e-24 x (a symmetric H refused) and overflowed to inf
    above ~1e17 x (any H accepted)."""
    g = torch.Generator().manual_seed(7)
    d = 37
    X = torch.randn(80, d, generator=g) * (0.5 + torch.rand(d, generator=g))
    H = (X.T @ X).double()
    check_hessian((H * scale).float(), d)
    bad = H.clone()
    bad[0, 1:] += 50.0  # row 0 changed, column 0 not
    with pytest.raises(ValueError, match="H is not symmetric"):
        check_hessian((bad * scale).float(), d)


def test_the_symmetry_test_of_a_float32_hessian_near_its_largest():
    """A float32 H of entries near 1e38, whose products with the probes overflow float32: the gap
    u^T H v - v^T H u was inf - inf, NaN, which no bound refuses, so a lopsided H passed (and GPTQ
    read one of its triangles as the whole, silently), or inf on one side alone, and a Gram
    matrix was refused as not symmetric. Such an H is judged by its products in float64."""
    g = torch.Generator().manual_seed(7)
    d = 37
    X = torch.randn(80, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(d, generator=g, dtype=torch.float64))
    H = X.T @ X
    H = H * (1e38 / H.abs().max())
    vu = epmq.checks._probes(H.float())[0]
    assert not torch.isfinite((H.float() @ vu).sum(dim=0)).all()  # (as the float32 check took them)
    check_hessian(H.float(), d)
    bad = H.clone()
    bad[0, 1:] *= -1  # row 0 changed, column 0 not
    with pytest.raises(ValueError, match="H is not symmetric"):
        check_hessian(bad.float(), d)


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-160, 1e160, 1e200, 1e300])
def test_the_symmetry_test_of_a_float64_hessian_is_scale_free(scale):
    """As above in float64, where |H v|'s square, in float64 too, underflowed to 0 below ~1e-154 x
    (a symmetric H refused as 'not symmetric') and overflowed to inf above ~1e154 x (any H
    accepted)."""
    g = torch.Generator().manual_seed(7)
    d = 37
    X = torch.randn(80, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(d, generator=g, dtype=torch.float64))
    H = X.T @ X
    for seed in range(4):  # (other probe orders: the gap of a symmetric H is rounding, of either sign)
        perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
        check_hessian(H[perm][:, perm] * scale, d)
    bad = H.clone()
    bad[0, 1:] += 50.0  # row 0 changed, column 0 not
    with pytest.raises(ValueError, match="H is not symmetric"):
        check_hessian(bad * scale, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hessians_that_are_symmetric_pass(dtype):
    """(Checked in fp32: bf16 products' rounding, 4e-3, rejected a third of these.)"""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        d = 16 * (1 + seed % 8)
        X = torch.randn(4 * d, d, generator=g) * torch.exp(torch.randn(d, generator=g)) / d ** 0.5
        H = (X.T @ X).to(dtype)
        H = torch.triu(H) + torch.triu(H, 1).T  # bitwise symmetric
        check_hessian(H, d)
        noise = torch.randn(d, d, generator=g).fill_diagonal_(0) * 0.01 * float(H.float().norm()) / d
        bad = (H.float() + noise).to(dtype)  # (1% of H's size off the diagonal, not mirrored)
        with pytest.raises(ValueError, match="not symmetric"):
            check_hessian(bad, d)


def test_a_callers_autocast_does_not_refuse_a_symmetric_hessian():
    """The symmetry probes are products: under a caller's autocast (a training script's) they
    ran in bf16, whose rounding (4e-3) refused most fp32 Gram matrices as "not symmetric" where
    no decorated solver turned autocast off first: EPMQStats(W, merged_hessian=H), RegMean's
    grams."""
    from epmq import EPMQStats, merge

    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        d = [24, 64, 128][seed % 3]
        X = torch.randn(3 * d, d, generator=g)
        H = X.T @ X
        W = torch.randn(8, d, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            EPMQStats(W, merged_hessian=H)
            merge.regmean([{"w": W}, {"w": W + 0.1}], {"w": [H, H]})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            traced = check_hessian(H, d)
        assert traced == check_hessian(H, d)  # (the trace too, as without autocast)


def test_a_zero_diagonal_entry_needs_a_zero_row():
    """An input that is always 0 has a zero row and column in X X^T: the solvers drop it as a
    dead column, which is exact only then (before, an indefinite H was solved with a wrong loss)."""
    X = torch.randn(40, 8, dtype=torch.float64)
    X[:, 3] = 0
    H = X.T @ X
    check_hessian(H, 8)
    H[3, 5] = H[5, 3] = 1.0
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=r"H\[3, 3\] is 0 but row 3 is not"):
            check_hessian(H.to(dtype), 8)
    # an input so small its square underflows (GELU far left of 0) leaves a row that is not 0:
    # as semidefinite as fp32 can tell, and solved as dead
    X[:, 3] = -1e-25 * (1 + torch.rand(40, dtype=torch.float64))
    H = (X.T @ X).float()
    assert H[3, 3] == 0 and H[3].abs().max() > 0
    check_hessian(H, 8)
    check_hessian(H.bfloat16(), 8)
    X[:, 3] = 1e-5 * torch.rand(40, dtype=torch.float64)  # (in fp16: squares under 6e-8)
    check_hessian((X.T @ X).half(), 8)


def test_a_layer_of_no_inputs_is_empty():
    from epmq import QuantSpec, quant

    spec = QuantSpec(bits=4, group_size=8)
    for result in (quant.gptq(torch.randn(6, 0), torch.zeros(0, 0), spec),
                   quant.rtn(torch.randn(6, 0), spec, H=torch.zeros(0, 0))):
        assert result.weight.shape == (6, 0) and result.loss == 0


def test_integer_weights_are_refused():
    """An integer weight (codes of a quantized checkpoint) is no weight to solve for."""
    from epmq import QuantSpec, quant

    W = torch.randint(-8, 8, (4, 6), dtype=torch.int32)
    with pytest.raises(ValueError, match="W must be floating point, got torch.int32"):
        check_weight(W)
    with pytest.raises(ValueError, match="must be floating point"):
        quant.rtn(W, QuantSpec(bits=4, group_size=-1))
    with pytest.raises(ValueError, match="must be floating point"):
        quant.gptq(W, torch.eye(6), QuantSpec(bits=4, group_size=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_hessian_returns_the_trace(dtype, scan_backend):
    X = torch.randn(30, 12, dtype=torch.float64)
    H = (X.T @ X).to(dtype)
    if scan_backend == "torch":  # (summed in H's dtype, as the solvers sum it)
        assert check_hessian(H, 12) == float(torch.diagonal(H).sum())
    else:  # (summed in the probes' dtype, fp32 or fp64, in the kernel's order)
        want = float(torch.diagonal(H).double().sum())
        assert check_hessian(H, 12) == pytest.approx(want, rel=1e-6 if dtype != torch.float64 else 1e-14)
    assert check_hessian(torch.zeros(0, 0), 0) == 0.0


def test_all_finite_reads_float8():
    """(No aminmax for float8: upcast, NaN and inf kept.)"""
    from epmq.checks import all_finite

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert all_finite(torch.tensor([1.0, -2.0]).to(dtype))
        assert not all_finite(torch.tensor([float("nan"), 1.0]).to(dtype))
    assert not all_finite(torch.tensor([float("inf")]).to(torch.float8_e5m2))


def test_float8_hessians_and_expert_weights_are_checked_not_crashed_on():
    """(aminmax has no float8 kernel: the checks raised NotImplementedError.)"""
    from epmq.checks import check_experts

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        H = (2 * torch.eye(8)).to(dtype)
        assert check_hessian(H, 8) == 16.0
        with pytest.raises(ValueError, match="negative diagonal"):
            check_hessian((-2 * torch.eye(8)).to(dtype), 8)
        W = torch.ones(4, 8).to(dtype)
        assert check_experts([W], [H], (4, 8), ["e0"]) == [16.0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float8_e8m0_values_past_fp16_are_read_as_they_are(backend):
    """float8_e8m0fnu holds powers of two from 2^-127 to 2^127, read through fp16 as the other
    float8 are: 2^20 became inf, so such a weight or Hessian was refused as 'non-finite values
    (NaN or inf)', and 2^-30 on a diagonal became 0 (a dead column). Read through fp32."""
    from epmq.checks import all_finite
    from epmq_kernels.hessian_scan import hessian_numbers

    e8m0 = torch.float8_e8m0fnu
    assert all_finite(torch.tensor([2.0**20, 2.0**-30]).to(e8m0))
    assert not all_finite(torch.tensor([float("nan"), 1.0]).to(e8m0))
    check_weight(torch.full((4, 8), 2.0**20).to(e8m0), "W")
    H = torch.diag(2.0 ** torch.tensor([20.0, -30.0, 0.0, 3.0])).to(e8m0)
    vu = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got, want = hessian_numbers(H, vu, backend=backend), hessian_numbers(H.float(), vu, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity"])
def test_a_string_nan_or_inf_is_refused_with_a_hint_that_fits(value):
    """YAML reads ``anchors: [nan]`` as the string 'nan' (its NaN is .nan): the error's hint was
    'YAML reads 1e-1 as a string: write 1.0e-1 or 0.1', which no writing of NaN or inf mends."""
    from epmq.checks import check_number

    with pytest.raises(ValueError) as error:
        check_number(value, "quantize.anchors: each anchor", minimum=0.0)
    message = str(error.value)
    assert f"each anchor must be a finite number, got {value!r}" in message
    assert "1e-1" not in message and "NaN and inf" in message
    with pytest.raises(ValueError, match=r"got '1e-1' \(YAML reads 1e-1 as a string: write 1.0e-1 or 0.1\)"):
        check_number("1e-1", "quantize.anchors: each anchor")


def test_a_word_for_a_number_gets_no_hint_about_writing_1e_1():
    """density: high (a word, not a number YAML misread) was refused with the hint 'YAML reads 1e-1 as a
    string: write 1.0e-1 or 0.1', which has nothing to do with it."""
    from epmq.checks import check_number

    with pytest.raises(ValueError) as error:
        check_number("high", "density")
    assert str(error.value) == "density must be a finite number, got 'high'"
