"""Compile the W4A16 and E-PMQ statistics kernels for sm_90 on this machine (no GPU needed) and
report what the compiler made of each config: registers per thread, spilled bytes, stack, shared
memory per program, and counts of the SASS instructions that matter (wgmma ``HGMMA`` vs
``HMMA``, 128-bit loads, integer LOP3/SHF/PRMT vs FP32 FFMA/FADD in the unpacking).

    python benchmarks/compile_report.py [--all] [--json out.json]

Without ``--all`` one representative config per kernel variant; with it, every config of
``AUTOTUNE_SPACE`` (and the residual kernel's space). Run it with each Triton version the GPU
machines may have; ``tests/kernels`` compiles the representative set in its tests.

Occupancy on an H100/H200 SM (65536 registers, 227 KB shared memory, 2048 threads): programs per
SM ~ min(65536 / (regs x 32 x warps), 227 KB / shared, 64 / warps); the column ``progs/SM``
shows that bound. ``loop``: the instructions of the kernel's main loop (its longest backward
branch); for the GEMV also per packed word a thread holds, what bounds it where it is limited by
instructions rather than memory (an H200 issues about 33 T lane-instructions a second: 8192 x
8192 codes at 30 a word are about 7.5 us).
"""

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

import torch  # noqa: E402
import triton  # noqa: E402

from gpu_compile import compile_sm90, resource_usage  # noqa: E402
from _common import write_json  # noqa: E402

# The problem every W4A16 config is compiled for: a 4096 x 4096 layer, group 128 (per channel
# where stated). Integer arguments specialise only on ==1 and divisibility by 16, so the SASS is
# that of any multiple-of-16 shape.
K, N = 4096, 4096


def _w4a16_args(M, G, dtype, *, dequant=False, scales_dtype=torch.float16):
    q = torch.empty(K // 8, N, dtype=torch.int32)
    s = torch.empty(G, N, dtype=scales_dtype)
    z = torch.empty(G, N, dtype=torch.uint8)
    gi = torch.empty(K, dtype=torch.int32)
    if dequant:
        w = torch.empty(2048, N, dtype=dtype)
        return [q, s, z, gi, w, N, 0, 2048, 0, K // G, 0, N, 1, N, 1, N, 1, N, 1]
    return [torch.empty(M, K, dtype=dtype), q, s, z, gi, torch.empty(M, N, dtype=dtype),
            torch.empty(M * N, dtype=torch.float32), torch.empty(1 << 12, dtype=torch.int32),
            M, N, K, K // G, K // 8, 0, K, 1, N, 1, N, 1, N, 1, N, 1]


def w4a16_cases(full=False):
    """``(name, kernel, args, constexprs, num_warps, num_stages)`` for the report and tests."""
    from epmq_kernels import w4a16 as W

    cases = []

    def dot_case(path, config, M, dtype, per_channel=False, gather=False, split=None, wide=False):
        config = dict(config)
        if path == "splitk":
            config.setdefault("BLOCK_M", 16 if M <= 16 else 64)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        split_k = config["SPLIT_K"] if split is None else split
        G = 1 if per_channel else 32
        cdt = W._compute_dtype(dtype)
        pairs = config.pop("PAIRS") and cdt in (triton.language.float16, triton.language.bfloat16)
        swap = config.pop("SWAP_AB")
        after = config.pop("SCALE_AFTER")
        constexprs = dict(config, SPLIT_K=split_k, GATHER=gather, HAS_G_IDX=gather,
                          ONE_GROUP=per_channel and not gather, PAIRS=pairs, SWAP_AB=swap,
                          SCALE_AFTER=after, CDT=cdt, DOT_PRECISION=W._dot_precision(dtype),
                          WIDE_M=wide, WIDE_ZEROS=False)
        tag = "pairs" if pairs else "plain"
        tag += "+swap" if swap else ""
        tag += "+after" if after else ""
        tag += "+wide" if wide else ""
        name = (f"{path} {str(dtype)[6:]} {'perchan' if per_channel else 'g128'}"
                f"{' gather' if gather else ''} BM{config['BLOCK_M']} BN{config['BLOCK_N']} "
                f"BK{config['BLOCK_K']} SK{split_k} {tag} w{warps} s{stages}")
        cases.append((name, W._w4a16_dot_kernel, _w4a16_args(M, G, dtype), constexprs, warps,
                      stages))

    def gemv_case(config, dtype, per_channel=False, gather=False):
        config = dict(config)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        G = 1 if per_channel else 32
        half2 = bool(config.pop("HALF2", False)) and dtype in W.HALF2_DTYPES and not gather
        constexprs = dict(config, GATHER=gather, HAS_G_IDX=gather,
                          ONE_GROUP=per_channel and not gather, HALF2=half2, ASM=True)
        name = (f"gemv {str(dtype)[6:]} {'perchan' if per_channel else 'g128'}"
                f"{' gather' if gather else ''} BN{config['BLOCK_N']} BK{config['BLOCK_K']} "
                f"SK{config['SPLIT_K']} PF{config['PREFETCH']} w{warps}{' half2' if half2 else ''}")
        cases.append((name, W._w4a16_gemv_kernel, _w4a16_args(1, G, dtype), constexprs, warps,
                      stages))

    def mma_case(config, M, dtype, per_channel=False):
        G = 1 if per_channel else 32
        _, _, constexprs = W._mma_launch_shape(config, M, K, N, G, K // G, dtype)
        constexprs.update(ASM=True, TRIVIAL=True)
        warps = config["num_warps"]
        name = (f"mma {str(dtype)[6:]} {'perchan' if per_channel else 'g128'} "
                f"BM{constexprs['BLOCK_M']} KR{config['KR']} GK{constexprs['GROUP_K']} "
                f"SK{config['SPLIT_K']} w{warps}{' prefetch' if constexprs['PREFETCH'] else ''}")
        args = _w4a16_args(M, G, dtype)
        del args[4]  # (no g_idx: static groups only)
        cases.append((name, W._w4a16_mma_kernel, args, constexprs, warps, 1))

    def wgmma_case(config, M, dtype, per_channel=False, scales_dtype=torch.float16):
        G = 1 if per_channel else 32
        grid, _, constexprs = W._wgmma_launch_shape(config, M, K, N, G, K // G, dtype, scales_dtype)
        constexprs.update(ASM=True, TRIVIAL=True)
        warps = config["num_warps"]
        scaling = ("" if per_channel else " scales:x" if constexprs["HALF2"]
                   else f" scales:{str(scales_dtype)[6:]}")
        name = (f"wgmma {str(dtype)[6:]} {'perchan' if per_channel else 'g128'} "
                f"BN{16 * warps * config['J']} BM{config['BLOCK_M']} KR{config['KR']} "
                f"J{config['J']} S{config['STAGES']} SK{grid[1]} w{warps}{scaling}")
        args = _w4a16_args(M, G, dtype, scales_dtype=scales_dtype)
        del args[4]  # (no g_idx: static groups only)
        cases.append((name, W._w4a16_wgmma_kernel, args, constexprs, warps, 1))

    space = W.AUTOTUNE_SPACE
    if full:
        for c in space["wgmma"]:
            wgmma_case(c, 4096, torch.float16)
            wgmma_case(c, 4096, torch.bfloat16, per_channel=True)
        for c in space["mma"]:
            mma_case(c, 16, torch.float16)
            mma_case(c, 1, torch.float16, per_channel=True)
        for c in space["gemv"]:
            gemv_case(c, torch.float16)
            gemv_case(c, torch.float16, per_channel=True)
        for c in space["splitk"]:
            dot_case("splitk", c, 16, torch.float16)
        for c in space["gemm"]:
            dot_case("gemm", c, 4096, torch.float16)
    else:
        def pick(path, **attrs):
            return next(c for c in space[path] if all(c.get(k) == v for k, v in attrs.items()))

        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=8, PREFETCH=2), torch.float16)
        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=8, PREFETCH=2), torch.float16,
                  per_channel=True)                                    # ONE_GROUP
        gemv_case(pick("gemv", BLOCK_N=128, PREFETCH=1), torch.bfloat16)
        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=4), torch.float32, gather=True)
        gemv_case(pick("gemv", BLOCK_N=128, num_warps=8), torch.float16)
        gemv_case(pick("gemv", BLOCK_K=256), torch.float16, per_channel=True)
        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=8, HALF2=True), torch.float16)
        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=8, HALF2=True), torch.float16,
                  per_channel=True)
        gemv_case(pick("gemv", BLOCK_N=128, HALF2=True), torch.float16)
        gemv_case(pick("gemv", BLOCK_N=64, SPLIT_K=8, HALF2=True), torch.bfloat16)
        gemv_case(pick("gemv", BLOCK_K=256, HALF2=True), torch.bfloat16, per_channel=True)
        dot_case("splitk", pick("splitk", BLOCK_N=128, SPLIT_K=4, SWAP_AB=True,
                                SCALE_AFTER=False), 16, torch.float16)
        dot_case("splitk", pick("splitk", SCALE_AFTER=True), 16, torch.float16)
        dot_case("splitk", pick("splitk", BLOCK_N=64, SWAP_AB=True), 16, torch.bfloat16,
                 per_channel=True)
        dot_case("splitk", pick("splitk", PAIRS=True, SWAP_AB=False, SPLIT_K=4), 64,
                 torch.float16)
        dot_case("splitk", pick("splitk", PAIRS=False, BLOCK_K=128), 16, torch.bfloat16,
                 gather=True)
        dot_case("splitk", pick("splitk", SWAP_AB=True), 16, torch.float32)  # fp32: no pairs
        mma_case(pick("mma", KR=1, SPLIT_K=8, num_warps=4), 16, torch.float16)
        mma_case(pick("mma", KR=1, SPLIT_K=8, num_warps=4), 1, torch.float16)
        mma_case(pick("mma", KR=1, SPLIT_K=8, num_warps=2), 1, torch.float16, per_channel=True)
        mma_case(pick("mma", PREFETCH=True, SPLIT_K=8, num_warps=4), 16, torch.float16)
        mma_case(pick("mma", PREFETCH=True, SPLIT_K=8, num_warps=2), 1, torch.float16)
        mma_case(pick("mma", PREFETCH=True, num_warps=4), 16, torch.bfloat16)
        mma_case(pick("mma", KR=1, num_warps=1), 5, torch.bfloat16, per_channel=True)
        wgmma_case(pick("wgmma", BLOCK_M=128, num_warps=4), 4096, torch.float16)
        wgmma_case(pick("wgmma", BLOCK_M=128, num_warps=8), 4096, torch.bfloat16,
                   scales_dtype=torch.bfloat16)
        wgmma_case(pick("wgmma", BLOCK_M=128, num_warps=4), 4096, torch.bfloat16)
        wgmma_case(pick("wgmma", BLOCK_M=64, KR=2), 256, torch.float16)
        wgmma_case(pick("wgmma", BLOCK_M=64, J=4), 64, torch.float16, per_channel=True)
        wgmma_case(pick("wgmma", BLOCK_M=256), 4096, torch.float16, scales_dtype=torch.float32)
        dot_case("gemm", pick("gemm", BLOCK_M=256, BLOCK_K=64, SWAP_AB=False), 4096,
                 torch.float16)
        dot_case("gemm", pick("gemm", BLOCK_M=128, SWAP_AB=True), 4096, torch.float16,
                 per_channel=True)
        dot_case("gemm", pick("gemm", BLOCK_M=256, SWAP_AB=True), 4096, torch.bfloat16)
        dot_case("gemm", pick("gemm", BLOCK_M=256, BLOCK_K=128), 4096, torch.bfloat16,
                 gather=True)
        dot_case("gemm", pick("gemm", BLOCK_M=128, BLOCK_K=64, SWAP_AB=False), 4096,
                 torch.float16, wide=True)                              # int64 row offsets
    for dtype, gather in ((torch.float16, False), (torch.bfloat16, True), (torch.float32, False)):
        config = W.AUTOTUNE_SPACE["dqmm"][0]
        cases.append((f"dequant {str(dtype)[6:]}{' gather' if gather else ''} "
                      f"BR{config['BLOCK_R']} BN{config['BLOCK_N']}", W._w4a16_dequant_kernel,
                      _w4a16_args(0, 32, dtype, dequant=True),
                      dict(BLOCK_R=config["BLOCK_R"], BLOCK_N=config["BLOCK_N"], GATHER=gather,
                           HAS_G_IDX=gather), config["num_warps"], 1))
    return cases


def residual_cases(full=False):
    """The E-PMQ residual kernel: every config of RESIDUAL_SPACE (each precision) and the fp64
    one; fp32 G and fp32 weights, d_out = d_in = 4096 (``full`` is the same set: it is small)."""
    from epmq_kernels import expert_residual as R

    d = 4096
    cases = []
    configs = [(torch.float32, p, c) for p in R.RESIDUAL_SPACE for c in R.RESIDUAL_SPACE[p]]
    configs.append((torch.float64, "ieee", R._RESIDUAL_FP64))
    for dtype, precision, (bm, bn, bk, warps, stages) in configs:
        args = [torch.empty(d, d, dtype=dtype), torch.empty(d, d, dtype=torch.float32),
                torch.empty(d, d, dtype=torch.float32), torch.empty(d, d, dtype=dtype),
                torch.empty(1, dtype=dtype), torch.empty(4096, dtype=dtype), d, d]
        constexprs = dict(INPUT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          GROUP_M=8)
        cases.append((f"residual {str(dtype)[6:]} {precision} {bm}x{bn}x{bk} w{warps} s{stages}",
                      R._residual_kernel, args, constexprs, warps, stages))
    return cases


def report(cases):
    rows = []
    for name, kernel, args, constexprs, warps, stages in cases:
        compiled = compile_sm90(kernel, args, constexprs, warps, stages)
        use = resource_usage(compiled)
        regs = max(use["registers"], 1)
        progs = min(65536 // (regs * 32 * warps), (227 * 1024) // max(use["shared"], 1),
                    64 // warps)
        if kernel.__name__ == "_w4a16_gemv_kernel":
            words = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] // 8 / (32 * warps)
        elif kernel.__name__ == "_w4a16_mma":  # (the loop: GROUP_K inputs x 64 columns a warp)
            words = constexprs["GROUP_K"] * 64 // 8 / 32
        elif kernel.__name__ == "_w4a16_wgmma":  # (STAGES steps of 4 KR packed rows x 16 J
            # columns a warp; per step is the better measure: the activations a step stages
            # grow with BLOCK_M, not with the words)
            words = 2 * constexprs["J"] * constexprs["KR"] * constexprs["STAGES"]
        else:
            words = None
        per_word = use["loop"] / words if words else None
        extra = {}
        if kernel.__name__ == "_w4a16_wgmma":
            extra["loop_per_step"] = use["loop"] / constexprs["STAGES"]
            extra["loop_steps"] = constexprs["STAGES"]
        rows.append(dict(name=name, warps=warps, stages=stages, progs_per_sm=progs,
                         loop_per_word=per_word, **extra, **use))
        print(f"{name:64s} regs {use['registers']:4d} spill {use['spill_stores']:4d}/"
              f"{use['spill_loads']:<4d} stack {use['stack']:4d} smem {use['shared']:6d} "
              f"progs/SM {progs:2d} | HGMMA {use['hgmma']:3d} HMMA {use['hmma']:3d} "
              f"LDG.128 {use['ldg128']:3d} LOP3 {use['lop3']:4d} SHF {use['shf']:3d} "
              f"PRMT {use['prmt']:4d} FFMA {use['ffma']:4d} FADD {use['fadd']:3d} "
              f"HFMA2 {use['hfma2']:3d} "
              f"LDS {use['lds']:3d} STS {use['sts']:3d} DFMA {use['dfma']:3d} | loop {use['loop']:4d}"
              + (f" ({per_word:.1f} a packed word)" if per_word else "")
              + (f" ({extra['loop_per_step']:.0f} a step)" if extra else ""), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="every config of the spaces")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--only", choices=["w4a16", "residual"], help="one kernel family")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, W4A16 problem {K} x {N}", flush=True)
    cases = []
    if args.only in (None, "w4a16"):
        cases += w4a16_cases(args.all)
    if args.only in (None, "residual"):
        cases += residual_cases(args.all)
    rows = report(cases)
    if args.json:
        write_json(args.json, dict(triton=triton.__version__, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
