"""Merges against results computed by hand."""

import pytest
import torch
from torch import nn

from epmq import merge
from epmq.merge import _kth_largest

T = torch.tensor


def hand_models():
    """Base and three experts; task vectors chosen to exercise trimming, sign ties and zeros."""
    base = {"w": torch.zeros(6), "v": T([1.0, 1.0]), "ids": T([3, 1, 2])}
    taus = [
        ([3.0, -1.0, 0.5, 2.0, 0.0, -4.0], [0.5, 0.0]),
        ([-3.0, 2.0, 0.4, 2.0, 0.0, 1.0], [0.0, -10.0]),
        ([1.0, -2.0, -0.1, 0.0, 0.0, 5.0], [0.0, 0.0]),
    ]
    experts = [{"w": T(w), "v": T([1.0, 1.0]) + T(v), "ids": T([0, 0, 0])} for w, v in taus]
    return base, experts


def test_task_arithmetic():
    base, experts = hand_models()
    out = merge.task_arithmetic(base, experts, scale=0.3)
    torch.testing.assert_close(out["w"], 0.3 * T([1.0, -1.0, 0.8, 4.0, 0.0, 2.0]))
    torch.testing.assert_close(out["v"], T([1.0, 1.0]) + 0.3 * T([0.5, -10.0]))
    assert torch.equal(out["ids"], base["ids"])  # non-float tensors come from the base


def test_average():
    base, experts = hand_models()
    out = merge.average(experts)
    torch.testing.assert_close(out["w"], T([1.0, -1.0, 0.8, 4.0, 0.0, 2.0]) / 3)
    assert torch.equal(out["ids"], experts[0]["ids"])


def test_ties_tensor_scope_by_hand():
    base, experts = hand_models()
    # k = 3 of 6 per expert in "w": thresholds 2, 2 and 1; entry 1 has trimmed values +2 and -2,
    # which cancel: no elected sign, the entry stays at the base
    out = merge.ties(base, experts, density=0.5, scope="tensor", merge="mean")
    torch.testing.assert_close(out["w"], T([2.0, 0.0, 0.0, 2.0, 0.0, 5.0]))
    # "v": k = 1 of 2; the third expert's task vector is all zeros and adds nothing
    torch.testing.assert_close(out["v"], T([1.5, -9.0]))
    out = merge.ties(base, experts, density=0.5, scope="tensor", merge="sum", scale=0.3)
    torch.testing.assert_close(out["w"], 0.3 * T([4.0, 0.0, 0.0, 4.0, 0.0, 5.0]))


def test_ties_global_scope_by_hand():
    base, experts = hand_models()
    # k = 4 of the 8 float entries per expert, over both tensors: thresholds 1, 2 and 0.1
    out = merge.ties(base, experts, density=0.5, scope="global")
    torch.testing.assert_close(out["w"], T([2.0, -1.5, -0.1, 2.0, 0.0, 5.0]))
    torch.testing.assert_close(out["v"], T([1.0, -9.0]))
    assert torch.equal(out["ids"], base["ids"])


def test_ties_defaults_and_limits():
    base, experts = hand_models()
    # density 1 keeps everything: the disjoint mean of agreeing entries
    out = merge.ties(base, experts, density=1.0, scope="tensor")
    torch.testing.assert_close(out["w"][3], T(2.0))  # +2, +2, 0: zeros are not counted
    torch.testing.assert_close(out["w"][0], T(2.0))  # +3, -3, +1 -> sign +, mean of 3 and 1
    # density 0 keeps nothing: the base
    out = merge.ties(base, experts, density=0.0)
    torch.testing.assert_close(out["w"], base["w"])


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.37, 0.5, 1.0])
def test_kth_largest_matches_sort(gen, density):
    parts = [torch.randn(n, generator=gen).abs() for n in (17, 1, 300)]
    parts[2][::3] = 0.0  # ties at zero
    parts[0][:5] = parts[2][1]  # ties across tensors
    flat = torch.cat(parts)
    k = int(round(density * flat.numel()))
    got = _kth_largest(lambda: parts, flat.numel(), density)
    if k == 0:
        assert got is None
    else:
        assert got == float(torch.sort(flat, descending=True).values[k - 1])


def test_dare():
    base, experts = hand_models()
    full = merge.dare(base, experts, scale=0.3, density=1.0, seed=1)
    torch.testing.assert_close(full["w"], merge.task_arithmetic(base, experts, 0.3)["w"])
    a = merge.dare(base, experts, scale=1.0, density=0.5, seed=7)
    b = merge.dare(base, experts, scale=1.0, density=0.5, seed=7)
    assert torch.equal(a["w"], b["w"])
    # the mask of a tensor depends on its name and the seed only
    alone = merge.dare({"w": base["w"]}, [{"w": e["w"]} for e in experts], scale=1.0, density=0.5, seed=7)
    assert torch.equal(alone["w"], a["w"])


def test_dare_rescales_kept_entries(gen):
    base = {"w": torch.zeros(4000)}
    tau = torch.randn(4000, generator=gen)
    out = merge.dare(base, [{"w": tau}], scale=1.0, density=0.25, seed=3)["w"]
    kept = out != 0
    assert 0.2 < kept.float().mean() < 0.3
    torch.testing.assert_close(out[kept], tau[kept] / 0.25)


def test_modules_are_accepted():
    torch.manual_seed(0)
    base, e1, e2 = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
    out = merge.task_arithmetic(base, [e1, e2], scale=0.5)
    expected = base.weight + 0.5 * (e1.weight + e2.weight - 2 * base.weight)
    torch.testing.assert_close(out["weight"], expected.detach())
    assert out["weight"].dtype == base.weight.dtype


def test_dtype_kept():
    base = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = merge.ties(base, [{"w": torch.full((3,), 2.0, dtype=torch.bfloat16)}], density=1.0)
    assert out["w"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "experts, match",
    [
        ([], "empty"),
        ([{"w": torch.zeros(6), "v": torch.zeros(2)}], "missing tensors \\['ids'\\]"),
        ([{"w": torch.zeros(5), "v": torch.zeros(2), "ids": T([0, 0, 0])}], "tensor 'w': expert 0 has shape \\(5,\\)"),
        ([{"w": torch.full((6,), float("nan")), "v": torch.zeros(2), "ids": T([0, 0, 0])}], "tensor 'w' of expert 0 has non-finite"),
        ([{"w": torch.zeros(6), "v": torch.zeros(2), "ids": T([0, 0, 0]), "x": torch.zeros(1)}], "unexpected tensors \\['x'\\]"),
    ],
)
def test_bad_inputs(experts, match):
    base, _ = hand_models()
    for fn in (merge.task_arithmetic, merge.ties, merge.dare):
        with pytest.raises(ValueError, match=match):
            fn(base, experts)


def test_bad_parameters():
    base, experts = hand_models()
    with pytest.raises(ValueError, match="density"):
        merge.ties(base, experts, density=1.5)
    with pytest.raises(ValueError, match="scope"):
        merge.ties(base, experts, scope="layer")
    with pytest.raises(ValueError, match="merge"):
        merge.ties(base, experts, merge="median")
    with pytest.raises(ValueError, match="non-finite"):
        merge.task_arithmetic({**base, "w": torch.full((6,), float("inf"))}, experts)
    with pytest.raises(TypeError, match="list of state dicts"):
        merge.average(experts[0])
