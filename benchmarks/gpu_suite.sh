#!/usr/bin/env bash
# GPU suite: CUDA tests, then the benchmarks, each step under a time limit (395 s in all, 445 s
# with each timeout's 10 s grace to kill, which the benchmarks use to write their JSON), after a
# preamble of 35 s at most (measured with a Python start for each of its checks: the steps took
# 276 s, the whole run 311 s on an H200, 2026-12-04; those checks are one Python start now, not yet
# timed): under 8 minutes on one H100 even when every step runs to its limit. Results go to
# ${OUT:-benchmarks/results}, named after the card, the log too.
#
#     bash benchmarks/gpu_suite.sh
#     EPMQ_REVISION=<commit> bash benchmarks/gpu_suite.sh   # a copy of the checkout without .git
#
# To add a benchmark, append one `step NAME SECONDS COMMAND...` line in the steps section.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# the card, the stack, the commit measured (without .git: $EPMQ_REVISION) and the modules the
# steps need, in one Python start (sets CARD, STACK and MISSING; a Python each took most of the
# preamble's 35 s)
PREAMBLE="$("$PYTHON" benchmarks/_suite_preamble.py)"
eval "$PREAMBLE"
SLUG="$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
# everything printed also goes to a log beside the results (the caller may see only the tail)
exec > >(tee "$RESULTS/gpu-suite-$SLUG.log") 2>&1
# bash does not wait for a process substitution: without this the log's last lines may still be
# in tee when the caller collects $RESULTS
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
nvidia-smi -L || true
echo "$STACK"
# Without a card every CUDA test skips and every benchmark says it has nothing to time: a run
# that measured nothing must not end as "all steps passed" (a torch without CUDA, a hidden GPU)
if [ "$CARD" = "no-cuda" ]; then
    echo "== gpu_suite.sh: torch sees no CUDA device (torch.cuda.is_available() is False): nothing to test or time"
    exit 1
fi

# Dependencies the card's image may lack (open_clip_torch, which the walker's tests build
# models with): wheels carried in .whl/ (see benchmarks/README.md) are installed beside it.
if [[ " $MISSING " == *" open_clip "* ]]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/epmq-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/epmq-site"
    fi
    "$PYTHON" -c 'import open_clip' 2>/dev/null \
        || echo "warning: open_clip is missing: its CUDA tests fail (carry its wheels in .whl/)"
fi

# The package: importable from the checkout already (PYTHONPATH); install it if pip can.
if [[ " $MISSING " == *" epmq_kernels "* ]]; then
    "$PYTHON" -m pip install -e . --no-deps -q || echo "warning: pip install failed, using PYTHONPATH"
fi

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run under a timeout, record failure, keep going
    local name="$1" seconds="$2"
    shift 2
    echo "== $name (limit ${seconds}s)"
    local started=$SECONDS rc=0
    timeout --kill-after=10 "$seconds" "$@" || rc=$?
    echo "== $name: rc=$rc in $((SECONDS - started))s"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name (rc=$rc)"); fi
}

# ---- steps (append new lines here) -----------------------------------------------------------
# Triton compiles on the CPU, which held the serial run to 111 s on one H200 host and past 150
# s on another (2026-12-04): where pytest-xdist is installed the tests run in 6 processes (the
# card's host has 16 cores), test by test since 2026-12-05 (a file to each before: the W4A16
# file's 60 CUDA tests, half of them, all in one process; every test keeps its state in its own
# fixtures, autotune caches in its own directory; module-level fixtures are built per process):
# 73 s on an H200, 2026-12-04, every step of the suite done in 311 s; 115 s since the HALF2
# GEMV, one-product bf16x3 residual and bf16x3 R tests (about 20-30 s more, not yet timed); 120
# since the fold, Hessian-scan, bf16x3-product and two-stream dqmm tests (2026-12-04, untimed);
# since then the side-stream tests (tests/epmq/test_stats.py, untuned: EPMQ_AUTOTUNE=0) and one
# bf16 HALF2 model-size case (2026-12-05, untimed), and the Gluon mma path's (its 24 configs
# twice, compiled in parallel, and 4 model-size cases of 3 batches; 2026-12-05, untimed), and
# the Gluon wgmma path's on Hopper (its 6 configs twice, 4 model-size cases of 3 batches;
# untimed), and one small E-PMQ of low-rank experts, untuned (2026-12-05, untimed): if
# the step hits its limit, its log's --durations list says which tests to trim
XDIST=()
if [[ " $MISSING " != *" xdist "* ]]; then XDIST=(-n 6 --dist load); fi
step cuda-tests 120 "$PYTHON" -m pytest -q tests -m cuda --durations=15 ${XDIST[@]+"${XDIST[@]}"}  # (the slowest: to size this limit)
step bench-w4a16 95 "$PYTHON" benchmarks/bench_w4a16.py --out "$RESULTS/w4a16-$SLUG.json" --plot "$RESULTS/w4a16-$SLUG.png"
# where the batch-1 GEMV loses its bandwidth: probes of its tiling that only stream the words, or
# also unpack them, beside it (after bench-w4a16, whose autotuning of M = 1 it reuses; ~22 s by
# a reviewer's estimate)
step gemv-roofline 30 "$PYTHON" benchmarks/gemv_roofline.py --out "$RESULTS"
# GPTQ / E-PMQ solver: fused vs eager on 768x3072, 4096x4096, 4096x14336 ([d_out, d_in]) and
# E-PMQ (8 experts) vs GPTQ; eager baselines stop after 60 s; writes solver-<card>.json/.png;
# then the layer profile, a shape at a time (4096x14336 first, a few seconds each) while the
# bench has taken under 58 s of its own clock (52 s on 2026-12-04, 61 s with its 4096x4096
# profile, the step 67 s: about 15 s of start-up and plot beside it; since then more rows; 10 s
# less of profile than before 2026-12-08, the preamble's measured 35 s in the 8 minutes)
step bench-solver 75 "$PYTHON" benchmarks/bench_solver.py --out "$RESULTS" --budget-s 60 --profile-if-under 58
# A whole walk: a 1-block Llama-8B-shaped model in CPU memory, blocks quantized on the GPU, GPTQ
# and E-PMQ (8 experts), GPTQ with the model on the GPU; writes walker-<card>.json after each walk
# (warm-ups included; "partial" until the last); with time left, where E-PMQ's host time goes
# (a cProfile of one more walk, in the JSON: its walk spent 1-1.7 s more than GPTQ's off the solvers;
# the threshold counts from after its ~6 s of start-up, and the profiled walk takes ~1.4x a timed
# one, ~5 s: 58 s leaves the step's 75 s with room; at 52 it would not have run, the walks and
# the model's build took 52.4 s on 2026-12-04)
# then, if the run is under 54 s (not on 2026-12-04's timings: it waits for faster walks), the
# timed E-PMQ walk again with the experts read in line (read_ahead_speedup, ~3 s);
# then, if the run is under 60 s, an E-PMQ walk on 8 LoRA adapters as experts (about 6 s with
# writing them, 4 s of it on this machine's 2 cores: the low-rank route's walk ratio,
# epmq_lora_over_gptq; after the walks and the profile of 2026-12-04, 57.4 s, it ends near 64
# s of the bench's clock, 70 of the step's)
step bench-walker 75 "$PYTHON" benchmarks/bench_walker.py --layers 1 --out "$RESULTS" --profile-host-if-under 58 \
    --in-line-reads-if-under 54 --lora-if-under 60
# -----------------------------------------------------------------------------------------------

if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "== FAILED: ${FAILED[*]}"
    exit 1
fi
echo "== all steps passed on $CARD"
