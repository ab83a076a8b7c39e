"""Where one E-PMQ layer's time goes on a CUDA GPU (torch profiler), beside plain GPTQ.

    PYTHONPATH=. python benchmarks/profile_epmq_layer.py [--precision ieee|tf32x3|bf16x3|tf32] [--out F]

4096x4096 ([d_out, d_in]), 8 experts, 4-bit group 128, the default anchor. ``bench_solver.py``
also runs it (the default bf16x3, 4096x14336 first, then 768x3072 and 4096x4096, while its time
limit leaves room), into benchmarks/results/epmq-layer-profile-<card>.txt. Each table's title
gives the profiled call's wall time and the sum of its kernels' times: kernels that ran on two
streams at once (E-PMQ's residual products beside the factorization) add up to more than the
wall time they took.
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from epmq import QuantSpec, quant  # noqa: E402
from epmq_kernels._runtime import ieee_fp32_matmul  # noqa: E402
from epmq_kernels.expert_residual import RESIDUAL_PRECISIONS  # noqa: E402
from _common import write_text  # noqa: E402


def _tables(d_out, d_in, n_experts, precisions, rows, dev):
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    W_m = torch.randn(d_out, d_in, device=dev, generator=g) / 64
    W_k = [W_m + 0.01 * torch.randn(d_out, d_in, device=dev, generator=g) / 64
           for _ in range(n_experts)]
    X = torch.randn(2 * d_in, d_in, device=dev, generator=g)
    H = X.T @ X
    del X
    H_k = [H * (1 + 0.1 * k) for k in range(n_experts)]
    spec = QuantSpec(4, 128)
    runs = [(f"E-PMQ, {n_experts} experts, residual {p}",
             lambda p=p: quant.epmq(W_m, W_k, H_k, spec, residual_precision=p)) for p in precisions]
    runs.append(("GPTQ", lambda: quant.gptq(W_m, H, spec)))
    out = []
    for title, run in runs:
        for _ in range(2):  # compile, autotune, warm the allocator
            run()
        sync()
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            t0 = time.perf_counter()
            run()
            sync()
            wall = time.perf_counter() - t0
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                               row_limit=rows, max_name_column_width=60)
        # the kernels' own rows (as the table's "Self CUDA time total" counts them; the
        # operators' rows repeat their kernels' time): on two streams at once they add up to
        # more than the wall time they took
        busy = sum(e.self_device_time_total for e in averages
                   if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1e3
        where = torch.cuda.get_device_name() if cuda else dev
        out.append(f"== {title}, {d_out}x{d_in}, {where}: wall {1e3 * wall:.1f} ms under the "
                   f"profiler, kernels {busy:.1f} ms\n{table}")
    return out


def profile_tables(shapes=((4096, 4096),), n_experts=8, precisions=("ieee",), rows=18,
                   device="cuda"):
    """The profiler tables (text) of one E-PMQ layer per residual precision and one GPTQ layer,
    for each ``[d_out, d_in]`` of ``shapes`` (``device="cpu"``: the same on the CPU, a check of
    the script)."""
    out = []
    with ieee_fp32_matmul():
        for d_out, d_in in shapes:
            out += _tables(d_out, d_in, n_experts, precisions, rows, device)
            if device == "cuda":
                torch.cuda.empty_cache()  # (the shape's tensors are gone with _tables' frame)
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", action="append", choices=RESIDUAL_PRECISIONS,
                        help="residual precision (repeatable)")
    parser.add_argument("--out", help="write the tables here as well as to stdout")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_epmq_layer: no CUDA device, nothing to profile")
        return 0
    text = profile_tables(precisions=tuple(args.precision or ["ieee"]))
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
