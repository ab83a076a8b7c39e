"""Host (CPU) time of one ``w4a16_matmul`` call, measured without a GPU.

    python benchmarks/host_overhead_w4a16.py [--baseline REV] [--calls 20000]

Runs the launcher exactly as on a GPU machine (Triton's interpreter off, kernels compiled by
Triton's NVIDIA backend for sm_90), with a stand-in Triton driver whose kernel launcher does
nothing: what is timed is everything the host does per call up to the launcher's C code
(argument checks, plan and autotune lookups, workspaces, output allocation, Triton's own Python
launch path: binding, specialisation, cache key). Not included, in either version: the C
launcher (argument parsing, ``cuLaunchKernel``, a few microseconds) and the CUDA stream/device
queries (tensors are on the CPU here; the new launcher makes two cheap ones per call).

``--smoke`` times nothing: it runs every path (gemv, splitk, gemm, dqmm, mma; group 128 and per
channel) through its cached plan with a launcher that checks the arguments it is given, which
tests the direct-launch code on a machine without a GPU.

``--baseline REV`` also times the launcher of git revision REV (e.g. ``HEAD``) in the same way,
in its own process, so the two numbers come from one machine and one run. Prints microseconds
per call (median of 5 rounds) and the number of kernel launches per call.

The GPU counterpart is ``bench_w4a16.py``: eager times include host gaps whenever the host takes
longer to launch than the GPU to run, CUDA-graph replays do not.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap

from _common import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent(r'''
    import importlib.util, json, os, statistics, sys, time
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["EPMQ_AUTOTUNE"] = "0"           # nothing is timed: first candidate config
    os.environ.setdefault("EPMQ_CACHE_DIR", os.path.join(os.environ["TMPDIR_CHILD"], "cache"))
    sys.path.insert(0, ROOT)
    import torch, triton
    from triton.backends.compiler import GPUTarget

    LAUNCHES = [0]
    CHECKED = [0]
    SEEN = {}

    def _normal(arg):
        """A launcher argument as the C launcher would read it (tensors: their address)."""
        if isinstance(arg, torch.Tensor):
            return arg.data_ptr()
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return arg
        if type(arg).__module__.startswith("triton"):  # constexpr values (dtypes)
            return str(arg)
        raise TypeError(f"the launcher cannot take a {type(arg).__name__}: {arg!r}")

    class _Launcher:
        """Stands in for Triton's C launcher: launches nothing, but checks what it is given: the
        full argument list of the kernel, each argument of a type the launcher reads, and on
        every launch the same values as on the first one except the activation and output
        addresses (the launcher's arguments after the 9 fixed ones)."""

        def __init__(self, src, metadata):
            self.n_args = len(src.fn.arg_names)
            self.name = src.fn.__name__

        def __call__(self, gx, gy, gz, stream, function, packed, meta, enter, exit_, *args):
            LAUNCHES[0] += 1
            CHECKED[0] += 1
            if CHECKED[0] > 64:
                return  # checked enough; from now on cost nothing, like the real launcher's C
            assert len(args) == self.n_args, (self.name, len(args), self.n_args)
            values = [_normal(a) for a in args]
            # (a dqmm plan launches the chunk kernel once per chunk: told apart by where the
            # chunk lies, its columns' end, first row, rows and first column)
            where = tuple(values[5:9]) if self.name == "_w4a16_dequant_kernel" else ()
            first = SEEN.setdefault((self.name, gx, gy, gz, len(values)) + where, values)
            differ = [i for i, (a, b) in enumerate(zip(first, values)) if a != b]
            assert len(differ) <= 2, (self.name, differ)

    class _Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 0, 0, 1024

        def get_device_properties(self, device):
            return dict(max_shared_mem=232448, multiprocessor_count=132, max_num_regs=65536,
                        warpSize=32, sm_clock_rate=1980000, mem_clock_rate=2619000,
                        mem_bus_width=5120)

    class _Driver:
        utils = _Utils()
        launcher_cls = _Launcher

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

    triton.runtime.driver.set_active(_Driver())
    torch.cuda.is_current_stream_capturing = lambda: False  # no CUDA runtime on this machine

    import epmq_kernels
    from epmq_kernels import _runtime
    if SOURCE:
        spec = importlib.util.spec_from_file_location("epmq_kernels._w4a16_baseline", SOURCE)
        W = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = W
        spec.loader.exec_module(W)
    else:
        from epmq_kernels import w4a16 as W
    _runtime.INTERPRETED = True  # only check_device reads it: CPU tensors pass; W's copy is False
    assert not W.INTERPRETED

    torch.manual_seed(0)
    K, N, G = 4096, 4096, 32
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32)
    scales = torch.rand(G, N, dtype=torch.float16)
    zeros = torch.randint(0, 16, (G, N), dtype=torch.uint8)
    results = {}
    if SMOKE:
        # every path through its cached plan (direct launches), group 128 and per channel,
        # with the checking launcher; the kernels compile for sm_90 on the way
        K, N = 1024, 512
        paths_for = W._paths_for
        for path, M in (("gemv", 1), ("splitk", 16), ("gemm", 300), ("dqmm", 300), ("mma", 1),
                        ("mma", 16), ("wgmma", 300)):
            for group_size in (128, -1):
                G = 1 if group_size == -1 else K // group_size
                q = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32)
                s = torch.rand(G, N, dtype=torch.float16)
                z = torch.randint(0, 16, (G, N), dtype=torch.uint8)
                x = torch.randn(M, K).half()
                W._paths_for = lambda M, path=path: (path,)
                LAUNCHES[0], CHECKED[0] = 0, 0
                SEEN.clear()
                for _ in range(4):
                    y = W.w4a16_matmul(x, q, s, z, group_size, backend="triton")
                    assert y.shape == (M, N)
                entry = W._ENTRIES[(id(q), id(s), id(z), id(None), group_size)]
                assert len(entry.plans) == 1
                plan = next(iter(entry.plans.values()))
                assert plan.path == path
                direct = all(l.compiled is not None for l in plan.launches + (
                    plan.dq[3] if plan.dq else []))
                results[f"{path} g{group_size}" + (f" M{M}" if path == "mma" else "")] = dict(launches_per_call=LAUNCHES[0] / 4,
                                                        direct=direct)
        W._paths_for = paths_for
        SEEN.clear()  # (the launches below are new plans, with new arguments)
        # the autotuner's parallel compilation (AsyncCompileMode), then one launch of each
        entry = W._entry_for(q, s, z, None, -1, K, N, 1)
        for M, paths in ((1, ("gemv", "splitk", "mma")), (300, ("gemm", "dqmm", "wgmma"))):
            x = torch.randn(M, K).half()
            out = torch.empty(M, N, dtype=torch.float16)
            plans = [W._build_plan(entry, p, c, x, out) for p in paths
                     for c in W._candidates(p, M, K, 1, K, False)[:6]]
            W._precompile(plans, x, out, workers=2)
            for plan in plans:
                plan(x, out)
            results[f"precompiled M{M}"] = dict(launches_per_call=1.0, direct=True,
                                                 plans=len(plans))
        print("RESULT " + json.dumps(dict(triton=triton.__version__, results=results)))
        sys.exit(0)
    for M in (1, 16, 1024):
        x = torch.randn(M, K).half()
        CHECKED[0] = 0
        SEEN.clear()
        W.w4a16_matmul(x, qweight, scales, zeros, 128, backend="triton")  # compile, plan
        for _ in range(8):  # checked launches (see _Launcher)
            y = W.w4a16_matmul(x, qweight, scales, zeros, 128, backend="triton")
            assert y.shape == (M, N) and y.dtype == x.dtype
        LAUNCHES[0] = 0
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(CALLS):
                W.w4a16_matmul(x, qweight, scales, zeros, 128, backend="triton")
            rounds.append((time.perf_counter() - started) / CALLS * 1e6)
        empty = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(CALLS):
                torch.empty((M, N), dtype=torch.float16)
            empty.append((time.perf_counter() - started) / CALLS * 1e6)
        results[M] = dict(us_per_call=statistics.median(rounds), rounds_us=rounds,
                          launches_per_call=LAUNCHES[0] / (5 * CALLS),
                          torch_empty_us=statistics.median(empty))
    print("RESULT " + json.dumps(dict(triton=triton.__version__, results=results)))
''')


def run_child(source, calls, tmp, smoke=False):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT, TMPDIR_CHILD=tmp)
    script = (f"ROOT = {ROOT!r}\nSOURCE = {source!r}\nCALLS = {calls}\nSMOKE = {smoke}\n"
              + _CHILD)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision whose launcher to time as well")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--smoke", action="store_true",
                        help="no timing: run every path through its cached plan with a launcher "
                             "that checks its arguments (a test of the direct launches)")
    args = parser.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            res = run_child("", 1, tmp, smoke=True)
            for name, r in res["results"].items():
                print(f"smoke {name}: {r['launches_per_call']:.1f} launches/call, direct "
                      f"launches: {r['direct']}")
            print("SMOKE " + json.dumps(res))
            return 0
        if args.baseline:
            source = os.path.join(tmp, "w4a16_baseline.py")
            text = subprocess.run(["git", "show", f"{args.baseline}:epmq_kernels/w4a16.py"],
                                  cwd=ROOT, capture_output=True, text=True, check=True).stdout
            with open(source, "w") as f:
                f.write(text)
            out["baseline"] = run_child(source, args.calls, tmp)
        out["current"] = run_child("", args.calls, tmp)
    for name, res in out.items():
        for M, r in res["results"].items():
            print(f"{name:9s} triton {res['triton']}  M={M:>5}: {r['us_per_call']:7.2f} us/call, "
                  f"{r['launches_per_call']:.2f} launches/call "
                  f"(torch.empty alone {r['torch_empty_us']:.2f} us)")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
