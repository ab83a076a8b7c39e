"""The ``epmq`` command line."""

import argparse
import sys


def _demo(args) -> int:
    import torch

    from . import quant
    from .spec import QuantSpec

    g = torch.Generator().manual_seed(args.seed)
    d_out, d_in, n, K = 256, 512, 2048, 4
    W_0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    experts = [W_0 + 0.02 * torch.randn(d_out, d_in, generator=g) for _ in range(K)]
    W_m = W_0 + 0.3 * sum(W - W_0 for W in experts)
    H = [(lambda X: X.T @ X)(torch.randn(n, d_in, generator=g) * torch.rand(d_in, generator=g)) for _ in range(K)]
    print(f"one {d_out}x{d_in} layer, {K} experts, task arithmetic (scale 0.3)")
    print(f"{'bits':>4} {'GPTQ expert loss':>18} {'E-PMQ expert loss':>18}")
    for bits in (4, 3, 2):
        spec = QuantSpec(bits=bits, group_size=128)
        r_g = quant.gptq(W_m, sum(H), spec)
        r_e = quant.epmq(W_m, experts, H, spec)
        a = r_e.info["task_weights"]
        loss_g = sum(a_k * float((((r_g.weight - W_k) @ H_k) * (r_g.weight - W_k)).sum()) for a_k, W_k, H_k in zip(a, experts, H))
        print(f"{bits:>4} {loss_g:>18.5f} {r_e.expert_loss:>18.5f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="epmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in example")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
