"""Layer solver timings: GPTQ and E-PMQ (8 experts) on one layer.

    python -m pytest benchmarks/bench_layer_solvers.py --benchmark-json=out.json
    python benchmarks/bench_layer_solvers.py --benchmark-json=out.json   # the same (pytest's options)

Runs on CUDA when there is a GPU, else on the CPU; ``EPMQ_BENCH_BACKEND`` picks the solver
backend ("torch" by default: the reference loop the kernels are measured against).
Shapes are ``[d_out, d_in]``: 768x3072 is a ViT-B MLP down projection, 4096x4096 a 7B-class
attention projection. E-PMQ's time includes folding in the 8 experts' statistics.
"""

import os

import pytest
import torch

from epmq import QuantSpec, quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = os.environ.get("EPMQ_BENCH_BACKEND", "torch")
SHAPES = [(768, 3072), (4096, 4096)]
N_EXPERTS = 8
SPEC = QuantSpec(bits=4, group_size=128)


def layer(d_out, d_in, seed=0):
    """A merged weight, 8 experts around it and their task Hessians (random, full rank)."""
    g = torch.Generator().manual_seed(seed)
    W_m = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    W_k = [W_m + 0.01 * torch.randn(d_out, d_in, generator=g) / d_in**0.5 for _ in range(N_EXPERTS)]
    X = torch.randn(2 * d_in, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g))
    H = X.T @ X
    # each task sees the features at its own scales: D_k H D_k stays a Gram matrix
    D = [torch.exp(0.3 * torch.randn(d_in, generator=g)) for _ in range(N_EXPERTS)]
    H_k = [d[:, None] * H * d[None, :] for d in D]
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return move(W_m), [move(W) for W in W_k], move(H), [move(h) for h in H_k]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def problem(request):
    return layer(*request.param)


def test_gptq(benchmark, problem):
    W_m, _, H, _ = problem

    def run():
        quant.gptq(W_m, H, SPEC, backend=BACKEND)
        sync()

    benchmark.extra_info.update(device=DEVICE, backend=BACKEND, d_out=W_m.shape[0], d_in=W_m.shape[1])
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_epmq_8_experts(benchmark, problem):
    W_m, W_k, _, H_k = problem

    def run():
        quant.epmq(W_m, W_k, H_k, SPEC, backend=BACKEND)
        sync()

    benchmark.extra_info.update(device=DEVICE, backend=BACKEND, d_out=W_m.shape[0], d_in=W_m.shape[1], experts=N_EXPERTS)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    # its timings are pytest-benchmark's tests: run as a script, the module defined them and
    # ended with status 0, having timed nothing
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
