"""Memory traffic and device reads of one E-PMQ layer outside its products, on the GPU's code
path, counted on the CPU (no GPU needed): what E-PMQ adds to GPTQ besides the products that
its speed goal is about (issue 3).

    python benchmarks/epmq_traffic_cpu.py [--baseline REV] [--d-out 512] [--d-in 2048]
                                          [--experts 8] [--gpu-path [--residual IMPL]]
                                          [--out benchmarks/results/FILE.json]

The torch backend's path with the GPU's precisions: fp32 statistics
(``EPMQStats(dtype=torch.float32)``, each expert's weight and Hessian given whole, as
``quant.epmq`` does), ``R`` and the anchor term by three TF32 products (``tf32x3_mm``), anchor 1.
A ``TorchDispatchMode`` counts, per aten op, the bytes its tensor arguments and results hold (an
upper bound on what it reads and writes), leaving out views, allocations, the products (``mm``,
``addmm``, ``matmul``, ``mv``, ``dot``, ...; since 2026-12-04 not those with at most 8 rows or
columns out, a matrix times a few vectors, bound by their bytes) and the solver (the Triton
kernel on a GPU; here the torch reference's column loop, run uncounted). ``scalar_reads`` counts
the host's reads of device values: ``float(t)``/``bool(t)``/``.item()``, ``nonzero`` (its size)
and ``.tolist()``; on a GPU each one waits for the queue to drain. The residual runs by the
torch backend here (one fp32 product per expert).

``--gpu-path`` runs the GPU's own path, the Triton backend, its kernels in Triton's interpreter:
the residual by the cuBLAS candidate ``--residual`` (``cublas_split``, the default: one bf16
product of operands split side by side by a kernel; ``cublas``: ``bf16x3_mm``), R and the anchor
term by ``bf16x3_mm`` (the floor of the default bf16x3 residual), the Hessians' checks by their
kernel. A Triton launch counts the bytes of the views it reads and of those it writes
(KERNEL_IO; a kernel not listed there: all read); the bf16 products (emulated here) are left out
like the others, with the addition a cuBLAS epilogue does (``bf16x3._bf16_mm_plus``).

Counts are exact and deterministic (one round is enough); ``--baseline REV`` counts git
revision REV too, in the same run. Traffic is in units of the layer's fp32 weight ``|W|``.
"""

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import checkout_revision, run_child, versions_side_by_side, write_json  # noqa: E402

_CHILD = textwrap.dedent(r'''
    import collections, json
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    import epmq.quant as quant
    import epmq_kernels._runtime as rt
    from epmq import QuantSpec
    from epmq.stats import EPMQStats

    VIEWS = {"select", "slice", "diagonal", "permute", "view", "alias", "unsqueeze", "t",
             "transpose", "expand", "as_strided", "squeeze", "detach", "_unsafe_view", "reshape"}
    PRODUCTS = {"mm", "addmm", "matmul", "bmm", "mv", "addmv", "dot", "vdot"}
    ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}  # (no bytes)
    # reads of device values by the host: .item()/float()/bool(), a nonzero's data-dependent
    # size, and .tolist() (not an aten op: counted by wrapping it)
    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
    tolist_calls = [0]
    tolist = torch.Tensor.tolist

    def counted_tolist(self, *args, **kwargs):
        tolist_calls[0] += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.calls, self.reads = collections.Counter(), collections.Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.reads += func in READS
            # (a product with at most 8 columns or rows out, a matrix times a few vectors, is
            # bound by its bytes like the elementwise ops: counted as they are)
            thin = (name in PRODUCTS and isinstance(out, torch.Tensor)
                    and (out.dim() < 2 or min(out.shape[-2:]) <= 8))
            if name in VIEWS or (name in PRODUCTS and not thin) or name in ALLOCATIONS:
                return out
            tensors = [t for t in list(args) + (list(out) if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls[name] += 1
            return out

    if GPU_PATH:
        import epmq_kernels.expert_residual as er
        import triton.runtime.interpreter as interpreter

        # what each kernel reads and writes, by argument name (others: every tensor read)
        def fold_io(kw):
            n_in = kw["N_IN"]
            reads = [f"H{k}" for k in range(n_in)] + ["a_ptr"] + ["H_e"] * kw["READ_E"] \
                + ["H_m"] * kw["HAS_M"]
            return reads, ["H_e"] + ["H_m"] * kw["HAS_M"]

        KERNEL_IO = {
            "_fold_kernel": fold_io,
            "_split_kernel": lambda kw: (["X"] + ["Y"] * kw["HAS_Y"], ["OUT"]),
            "_add_product_kernel": lambda kw: (["G", "P", "W_k", "W_m", "a_ptr"], ["G", "partial"]),
        }
        launch = interpreter.InterpretedFunction.run

        def counted_launch(self, *args, grid, warmup, **kwargs):
            named = dict(zip(self.arg_names, args), **kwargs)
            tensors = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
            io = KERNEL_IO.get(self.fn.__name__)
            reads, writes = io(named) if io else (list(tensors), [])
            nbytes = 0
            for names in (reads, writes):  # (each view of a buffer once per direction: its bytes)
                views = {(tensors[n].data_ptr(), tensors[n].shape, tensors[n].stride()):
                         tensors[n].numel() * tensors[n].element_size() for n in names}
                nbytes += sum(views.values())
            if active:
                active[0].bytes[self.fn.__name__] += nbytes
                active[0].calls[self.fn.__name__] += 1
            with _disable_current_modes():  # (the interpreter's own copies are not the GPU's)
                return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = counted_launch
        emulated = rt.bf16_mm_emulated

        def uncounted_bf16_mm(A, B):  # (the GPU's bf16 tensor-core product, emulated)
            with _disable_current_modes():
                return emulated(A, B)

        rt.bf16_mm_emulated = uncounted_bf16_mm
        try:  # (C + A @ B: on the GPU cuBLAS's epilogue adds C, here a counted addition would)
            import epmq_kernels.bf16x3 as sbs

            plus = sbs._bf16_mm_plus

            def uncounted_plus(C, A, B):
                with _disable_current_modes():
                    return plus(C, A, B)

            sbs._bf16_mm_plus = uncounted_plus
        except (ImportError, AttributeError):  # (revisions before it)
            pass
        impl = getattr(er, "SPLIT_CUBLAS" if RESIDUAL == "cublas_split" else "CUBLAS", er.CUBLAS)
        er._residual_config = lambda G, W_k, W_m, H_k, precision: ("bf16x3", impl)
        import epmq.checks as checks

        checks._scan_backend = lambda H: "triton"  # (the Hessian checks' kernel, as on a GPU)
    active = []
    g = torch.Generator().manual_seed(0)
    W_m = torch.randn(D_OUT, D_IN, generator=g)
    experts = []
    for _ in range(EXPERTS):
        X = torch.randn(2 * D_IN, D_IN, generator=g) * torch.exp(0.7 * torch.randn(D_IN, generator=g))
        experts.append((W_m + 0.05 * torch.randn(D_OUT, D_IN, generator=g), X.T @ X))
    # (the H200's pick for R and the anchor term: tf32x3 for an IEEE floor, bf16x3 for its own)
    quant.fp32_mm = lambda device, floor: rt.bf16x3_mm if GPU_PATH else rt.tf32x3_mm
    backend = "triton" if GPU_PATH else "torch"
    solve = quant.gptq_solve

    def uncounted_solve(*args, **kwargs):
        kwargs["backend"] = "torch"  # (the same codes as the Triton solver's, faster interpreted)
        with _disable_current_modes():
            return solve(*args, **kwargs)

    quant.gptq_solve = uncounted_solve
    with Count() as count:
        active.append(count)
        stats = EPMQStats(W_m, dtype=torch.float32, backend=backend)
        if hasattr(stats, "add_tasks"):  # (quant.epmq's way; revisions before it: one by one)
            stats.add_tasks([W_k for W_k, _ in experts], [H_k for _, H_k in experts])
        else:
            for W_k, H_k in experts:
                stats.add_task(W_k, H_k)
        quant.epmq_from_stats(stats, QuantSpec(4, 128), backend=backend, anchor=1.0)
        active.clear()
    unit = D_OUT * D_IN * 4
    top = {name: dict(calls=count.calls[name], traffic_W=round(b / unit, 1))
           for name, b in count.bytes.most_common(10)}
    print("RESULT " + json.dumps(dict(traffic_W=round(sum(count.bytes.values()) / unit, 1),
                                      ops=sum(count.calls.values()), scalar_reads=count.reads + tolist_calls[0],
                                      top=top)))
''')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision to count as well, in the same run")
    parser.add_argument("--d-out", type=int, default=512)
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--gpu-path", action="store_true",
                        help="the Triton backend's path, its kernels interpreted and counted")
    parser.add_argument("--residual", choices=("cublas_split", "cublas"), default="cublas_split",
                        help="with --gpu-path: the residual's cuBLAS candidate")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.gpu_path:
        os.environ["TRITON_INTERPRET"] = "1"  # (the children import the kernels under it)

    runs = versions_side_by_side(args.baseline, 1, lambda src: run_child(
        _CHILD, src, D_OUT=args.d_out, D_IN=args.d_in, EXPERTS=args.experts, GPU_PATH=args.gpu_path,
        RESIDUAL=args.residual))
    result = {name: rs[0] for name, rs in runs.items()}
    print(f"\n{'':34s}" + "".join(f"{name:>20s}" for name in result))
    for label, key in (("traffic outside products (|W|)", "traffic_W"), ("ops", "ops"),
                       ("scalar reads", "scalar_reads")):
        print(f"{label:34s}" + "".join(f"{r[key]:20}" for r in result.values()))
    if args.out:
        write_json(args.out, dict(d_out=args.d_out, d_in=args.d_in, experts=args.experts,
                                  path=f"gpu ({args.residual} residual)" if args.gpu_path else "torch",
                                  current_revision=checkout_revision(), **result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
