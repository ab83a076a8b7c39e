import pytest
import torch

from epmq.checks import all_finite, check_hessian, check_weight


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
