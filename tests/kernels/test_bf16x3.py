"""bf16x3 products as one GEMM of operands split side by side, against the three-product form
(``_runtime.bf16x3_mm``) and float64, on fresh random matrices: the split layouts, every slice
and transpose a product may take, and E-PMQ's triangular and symmetric products through them."""

import numpy as np
import pytest
import torch

from epmq_kernels import _runtime
from epmq_kernels.bf16x3 import Bf16x3Parts, bf16x3_product, split_bf16
from epmq_kernels._runtime import bf16_mm_emulated, bf16_split, bf16x3_mm, split_once

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rand(gen, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)


def three_products(A, B):
    """The three-product form with the same exact bf16 products (on the CPU as on a GPU)."""
    return bf16x3_mm(A, B, mm=bf16_mm_emulated if A.device.type == "cpu" else _runtime._bf16_mm)


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("n_parts,mid", [(3, 1), (3, 2), (2, 0), (2, 1)])
def test_split_layouts_are_torchs_parts(gen, axis, n_parts, mid, monkeypatch):
    """Both layouts, every part count and order, the hi part alone beside, by the kernel and by
    torch's fallback: the bits of ``bf16_split``, with ties, subnormals, large values and NaNs
    among them (0x7FFFFFFF, the GPU's own NaN, whose rounding passes int32; 0x7F800001 and
    0xFF800001, NaNs whose top 16 bits alone would be bf16's +-inf)."""
    X = rand(gen, 19, 45, scale=3.0)
    X[0, :4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1e-40, 3e38])
    X[1, :5] = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001, 0xFF800001 - 2 ** 32],
                            dtype=torch.int32).view(torch.float32)
    hi, rest = bf16_split(X)
    want = [rest if p == mid else hi for p in range(n_parts)]

    def bits(t):  # (every NaN alike: its payload is not a value)
        t = t.float()
        return torch.where(torch.isnan(t), float("nan"), t).view(torch.int32)

    for interpreted in {_runtime.INTERPRETED, False} if DEVICE.type == "cpu" else {False}:
        monkeypatch.setattr(_runtime, "INTERPRETED", interpreted)
        hi_alone = torch.empty(19, 45, dtype=torch.bfloat16, device=DEVICE)
        if axis == "rows":
            F = torch.empty(19, n_parts, 45, dtype=torch.bfloat16, device=DEVICE)
            split_bf16(X, None, F, mid, hi_alone)
            got = [F[:, p] for p in range(n_parts)]
        else:
            F = torch.empty(19, 45, n_parts, dtype=torch.bfloat16, device=DEVICE)
            split_bf16(X, None, F.transpose(1, 2), mid, hi_alone)
            got = [F[:, :, p] for p in range(n_parts)]
        for g, w in zip(got + [hi_alone], want + [hi]):
            assert torch.equal(bits(g), bits(w))
        # fp16's NaNs with payloads 1..7 convert to fp32 NaNs with their payload in the low 16
        # bits: still NaN in both parts
        X16 = torch.tensor([[0x7C01, 0x7C07, -0x3FF]], dtype=torch.int16).view(torch.float16)
        F16 = torch.empty(1, 2, 3, dtype=torch.bfloat16, device=DEVICE)
        split_bf16(X16.to(DEVICE), None, F16, 1)
        assert torch.isnan(F16.float()).all()
    with pytest.raises(ValueError, match="parts must be"):
        split_bf16(X, None, torch.empty(19, 4, 45, dtype=torch.bfloat16, device=DEVICE), 1)
    for Y in (X[:1], X[:, :44]):  # (broadcast by torch, read past its end by the kernel)
        with pytest.raises(ValueError, match="Y must have X's shape"):
            split_bf16(X, Y, F if axis == "rows" else F.transpose(1, 2), mid)
    with pytest.raises(ValueError, match="hi must be"):
        split_bf16(X, None, F.transpose(1, 2) if axis == "cols" else F, mid,
                   torch.empty(45, 19, dtype=torch.bfloat16, device=DEVICE))


def test_split_refuses_a_mid_past_the_parts_and_parts_it_cannot_write(gen):
    """A ``mid`` past the parts wrote hi into each (no remainder anywhere), on both paths; parts on
    another device than X ended in the interpreter's 'Cannot copy out of meta tensor' (on a GPU,
    writes at X's device's addresses); parts in X's own memory were written by programs while
    others still read X, a wrong split without a word (512 columns: several column tiles). Each
    is refused by name, nothing written."""
    X = rand(gen, 4, 512)
    parts = torch.zeros(4, 3, 512, dtype=torch.bfloat16, device=DEVICE)
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match=f"mid must be the index of one of the 3 parts, got {bad!r}"):
            split_bf16(X, None, parts, bad)
    assert not parts.any()
    hi, rest = bf16_split(X)
    split_bf16(X, None, parts, np.int64(2))  # (numpy's integers are integers)
    assert torch.equal(parts[:, 2], rest) and torch.equal(parts[:, 0], hi)
    with pytest.raises(ValueError, match="different devices: X=.*, parts=meta"):
        split_bf16(X, None, torch.empty(4, 3, 512, dtype=torch.bfloat16, device="meta"), 1)
    for name, args in (("parts", (X, None, X.view(torch.bfloat16).view(4, 2, 512), 1)),
                       ("parts", (X[:, :256], X[:, 256:], X.view(torch.bfloat16)[:, :512].view(4, 2, 256), 1)),
                       ("hi", (X, None, parts, 1, X.view(torch.bfloat16)[:, :512]))):
        before = X.clone()
        with pytest.raises(ValueError, match=f"{name} must not share memory with X or Y"):
            split_bf16(*args)
        assert torch.equal(X, before)


def test_split_refuses_operands_by_name_saying_what_was_given(gen):
    """A 1-D X ended in Python's 'not enough values to unpack', None parts in "no attribute 'dim'", a NumPy Y
    in 'tensors are on different devices: X=cpu, Y=cpu, parts=cpu' (the wrong fault), and a wrong hi in
    'hi must be ...' without what it was; each refused by name, with its type or shape, dtype and strides."""
    X = rand(gen, 4, 8)
    parts = torch.empty(4, 2, 8, dtype=torch.bfloat16, device=DEVICE)
    for match, args in ((r"X must be a matrix \[rows, cols\], got \(8,\)", (X[0], None, parts, 1)),
                        ("X must be a torch.Tensor, got ndarray", (X.cpu().numpy(), None, parts, 1)),
                        ("Y must be a torch.Tensor, got ndarray", (X, X.cpu().numpy(), parts, 1)),
                        ("parts must be a torch.Tensor, got NoneType", (X, None, None, 1)),
                        ("hi must be a torch.Tensor, got list", (X, None, parts, 1, [[0.0] * 8] * 4)),
                        (r"hi must be .*, got \(8, 4\) torch.bfloat16 of strides \(4, 1\)$",
                         (X, None, parts, 1, torch.empty(8, 4, dtype=torch.bfloat16, device=DEVICE))),
                        (r"hi must be .*, got \(4, 8\) torch.float32 of strides \(8, 1\)$",
                         (X, None, parts, 1, torch.empty(4, 8, device=DEVICE)))):
        with pytest.raises(ValueError, match=match):
            split_bf16(*args)


def test_split_keeps_no_autograd_graph(gen, monkeypatch):
    """X and Y that require a gradient (an expert's weight Parameter): torch's fallback wrote their
    autograd graph into the parts (requires_grad, a grad_fn, and so the products of side_by_side),
    where the kernel writes the bits alone; neither path keeps one, the parts those of the values."""
    X, Y = rand(gen, 6, 40).requires_grad_(), rand(gen, 6, 40).requires_grad_()
    hi_want, mid_want = bf16_split(X.detach() - Y.detach())
    for interpreted in {_runtime.INTERPRETED, False} if DEVICE.type == "cpu" else {False}:
        monkeypatch.setattr(_runtime, "INTERPRETED", interpreted)
        parts = torch.empty(6, 2, 40, dtype=torch.bfloat16, device=DEVICE)
        hi = torch.empty(6, 40, dtype=torch.bfloat16, device=DEVICE)
        split_bf16(X, Y, parts, 1, hi)
        for name, t in (("parts", parts), ("hi", hi)):
            assert not t.requires_grad and t.grad_fn is None, (interpreted, name)
        assert torch.equal(parts[:, 0], hi_want) and torch.equal(parts[:, 1], mid_want) and torch.equal(hi, hi_want)
        product = bf16x3_product(Bf16x3Parts(X), Bf16x3Parts(X.T))
        assert not product.requires_grad, interpreted


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_products_of_slices_and_transposes(gen, a_t, b_t):
    """Every orientation of both operands, on slices that start and end anywhere: the value of
    the three-product form to fp32 rounding (one accumulation instead of three sums), and of
    float64 to bf16x3's 2^-16 class."""
    M, K, N = 13, 70, 21
    A_full = rand(gen, K + 9, M + 5) if a_t else rand(gen, M + 5, K + 9)
    B_full = rand(gen, N + 4, K + 7) if b_t else rand(gen, K + 7, N + 4)
    A_parts, B_parts = Bf16x3Parts(A_full), Bf16x3Parts(B_full)
    A = A_full[3:3 + K, 2:2 + M].T if a_t else A_full[2:2 + M, 3:3 + K]
    Ap = A_parts[3:3 + K, 2:2 + M].T if a_t else A_parts[2:2 + M, 3:3 + K]
    B = B_full[1:1 + N, 5:5 + K].T if b_t else B_full[5:5 + K, 1:1 + N]
    Bp = B_parts[1:1 + N, 5:5 + K].T if b_t else B_parts[5:5 + K, 1:1 + N]
    assert Ap.shape == tuple(A.shape) and Bp.shape == tuple(B.shape)
    got = bf16x3_product(Ap, Bp)
    want = three_products(A, B)
    scale = float((A.double().abs() @ B.double().abs()).max())
    assert float((got - want).abs().max()) <= 1e-6 * scale
    assert float((got.double() - A.double() @ B.double()).abs().max()) <= 2e-5 * scale
    # a transposed view given whole is read as the matrix it is
    assert torch.equal(bf16x3_product(Bf16x3Parts(A), Bf16x3Parts(B.T.contiguous().T)), got)
    with pytest.raises(ValueError, match="do not chain"):
        bf16x3_product(Ap, Ap)


@pytest.mark.parametrize("d_out,d", [(40, 1000), (16, 2304)])
def test_epmq_triangular_and_symmetric_products(d_out, d, monkeypatch):
    """R's triangular products and the symmetric objective through ``split_once(bf16x3_mm)``
    (one GEMM a block): each operand's layouts made once, the three-product form's values to
    fp32 rounding, float64's to bf16x3's class."""
    from epmq.quant import _block_edges, _objective, _times_upper

    g = torch.Generator().manual_seed(d_out + d)
    A = torch.randn(d_out, d, generator=g).to(DEVICE)
    U = (torch.randn(d, d, generator=g).triu() / d ** 0.5).to(DEVICE)
    import epmq_kernels.bf16x3 as sbs

    splits = []
    split = sbs.split_bf16
    monkeypatch.setattr(sbs, "split_bf16", lambda X, *a: (splits.append(X.numel()), split(X, *a)))
    for transposed in (False, True):
        exact = A.double() @ (U.double().T if transposed else U.double())
        splits.clear()
        got = _times_upper(A, U, transposed=transposed, mm=bf16x3_mm)
        # (A split once whole, each block of U once: n blocks cover (n + 1) / 2n of U)
        n = len(_block_edges(d)) - 1
        assert splits.count(A.numel()) == 1 and sum(splits) - A.numel() <= (n + 1) / (2 * n) * U.numel() + 8 * d
        scale = float((A.double().abs() @ (U.double().abs().T if transposed else U.double().abs())).max())
        assert float((got.double() - exact).abs().max()) <= 2e-5 * scale
        old = _times_upper(A, U, transposed=transposed, mm=three_products)
        assert float((got - old).abs().max()) <= 1e-6 * scale
    X = torch.randn(d, 2 * d, generator=g).to(DEVICE)
    H = X @ X.T
    exact = float(((A.double() @ H.double()) * A.double()).sum())
    assert _objective(A, H, bf16x3_mm) == pytest.approx(exact, rel=1e-4)
    parts, _ = split_once(bf16x3_mm)
    (P,) = parts(A)
    assert isinstance(P, Bf16x3Parts)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_products_through_cublas(gen):
    """On a GPU (cuBLAS's bf16 GEMM and its epilogue's add): every orientation at a layer-like
    width with slices at odd offsets, against the three-product form and float64."""
    M, K, N = 257, 3001, 515
    for a_t in (False, True):
        for b_t in (False, True):
            A_full = rand(gen, K + 9, M + 5) if a_t else rand(gen, M + 5, K + 9)
            B_full = rand(gen, N + 4, K + 7) if b_t else rand(gen, K + 7, N + 4)
            A = A_full[3:3 + K, 2:2 + M].T if a_t else A_full[2:2 + M, 3:3 + K]
            B = B_full[1:1 + N, 5:5 + K].T if b_t else B_full[5:5 + K, 1:1 + N]
            Ap = Bf16x3Parts(A_full)[3:3 + K, 2:2 + M].T if a_t else Bf16x3Parts(A_full)[2:2 + M, 3:3 + K]
            Bp = Bf16x3Parts(B_full)[1:1 + N, 5:5 + K].T if b_t else Bf16x3Parts(B_full)[5:5 + K, 1:1 + N]
            got = bf16x3_product(Ap, Bp)
            scale = float((A.double().abs() @ B.double().abs()).max())
            assert float((got - bf16x3_mm(A, B)).abs().max()) <= 1e-6 * scale
            assert float((got.double() - A.double() @ B.double()).abs().max()) <= 2e-5 * scale
