"""The GPU suite stays one call under 8 minutes of device time, names scripts that exist, and
its scripts run (their checks, or the same code on the CPU) before a card runs them."""

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _imported(folder, *names):
    """The modules ``names`` imported from ``ROOT / folder`` (on sys.path only meanwhile)."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / folder))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(ROOT / folder))


# the suite's preamble before its steps (device query, versions, installs): 311 s of a run on an
# H200 whose steps took 276 s (2026-12-04), then with a Python start for each check; one since
PREAMBLE_S = 311 - 276


def test_gpu_suite_steps_fit_in_eight_minutes():
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    steps = re.findall(r"^step (\S+) (\d+) (.*)$", text, re.M)
    assert [name for name, _, _ in steps][:1] == ["cuda-tests"]
    # every step may run to its limit and then 10 s more (timeout's grace, which the benchmarks
    # use to write their JSON), after the preamble as measured: 8 minutes (it had 25 s, 35 taken)
    assert sum(int(seconds) + 10 for _, seconds, _ in steps) + PREAMBLE_S <= 8 * 60
    for _, _, command in steps:
        for script in re.findall(r"benchmarks/\S+\.py", command):
            assert (ROOT / script).is_file(), script


def test_gpu_suite_preamble_starts_python_once():
    """The card, the versions, transformers' and the optional modules' checks were a Python start
    each, torch imported anew (most of the preamble's measured 35 s): one start runs them all, the
    suite's other Pythons only where a module is missing (pip, its check after the install)."""
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    preamble = text[:re.search(r"^step ", text, re.M).start()]
    depth, unconditional = 0, []
    for line in preamble.splitlines():
        code = line.split("#", 1)[0].strip()
        if '"$PYTHON"' in code and depth == 0:
            unconditional.append(code)
        depth += code.startswith("if ") and not code.endswith("fi")
        depth -= code == "fi"
    assert unconditional == ['PREAMBLE="$("$PYTHON" benchmarks/_suite_preamble.py)"'], unconditional


def test_gpu_suite_preamble_is_read_back_by_the_shell(monkeypatch, capsys):
    """What the preamble prints is evaluated by bash: a card or revision with quotes and spaces,
    and the lines of the stack, come back as they were."""
    import subprocess

    suite_preamble, = _imported("benchmarks", "_suite_preamble")
    found = dict(CARD="NVIDIA H200 'x' $HOME", STACK="python 3\nwarning: transformers 5.17.0 ...", MISSING="xdist")
    monkeypatch.setattr(suite_preamble, "preamble", lambda: found)
    assert suite_preamble.main() == 0
    printed = capsys.readouterr().out
    shell = subprocess.run(["bash", "-c", 'eval "$0"; printf "%s|%s|%s" "$CARD" "$STACK" "$MISSING"', printed],
                           capture_output=True, text=True, check=True)
    assert shell.stdout == "|".join(found.values())


@pytest.mark.parametrize("version, warned", [("5.17.0", True), ("5.25.0", False), ("5.26.1", False)])
def test_gpu_suite_warns_of_a_transformers_older_than_the_tests(version, warned, monkeypatch):
    """The GPU image's transformers (5.17) is older than the one setup.py requires and the tests
    were written against: the suite printed its version alone, and the CUDA tests of families it
    lacks failed for no reason the log gave. It warns, naming both."""
    import transformers

    suite_preamble, = _imported("benchmarks", "_suite_preamble")
    floor = suite_preamble.transformers_floor()
    assert re.search(rf'"transformers>={re.escape(floor)}"', (ROOT / "setup.py").read_text())
    monkeypatch.setattr(transformers, "__version__", version)
    line = suite_preamble.transformers_line()
    assert line.startswith(f"transformers {version}")
    assert ("warning" in line and f"older than {floor}" in line) == warned, line


def test_gpu_suite_steps_pass_options_their_scripts_take(tmp_path, monkeypatch):
    """Each benchmark step's command line as the suite gives it (an option renamed in a script
    but not in the suite ends that step in argparse's usage message on the card, its minutes
    spent on nothing): parsed by the script's own ``main``, which then finds no CUDA device."""
    import shlex

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text().replace("\\\n", " ")
    scripts = 0
    for _, _, command in re.findall(r"^step (\S+) (\d+) (.*)$", text, re.M):
        argv = shlex.split(command.replace('"$RESULTS"', str(tmp_path)).replace("$SLUG", "card"))
        if argv[1].startswith("benchmarks/"):
            script, = _imported("benchmarks", Path(argv[1]).stem)
            assert script.main(argv[2:]) == 0, command
            scripts += 1
    assert scripts >= 4


def test_benchmarks_write_what_they_measured_when_their_time_is_up():
    """The suite's timeout sends SIGTERM first: the benchmarks turn it into an exception where
    they are, then write their plot and summary of what they measured in the grace time."""
    import os
    import signal

    common, = _imported("benchmarks", "_common")
    previous = signal.getsignal(signal.SIGTERM)
    common.raise_on_sigterm()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # (delivered at the next bytecode boundary)
            pass
        raise AssertionError("SIGTERM did not raise")
    except Exception:
        raise AssertionError("SIGTERM raised an Exception, which handlers that skip a failing "
                             "autotune candidate swallow") from None
    except common.Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    for script in ("bench_w4a16.py", "bench_solver.py"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "raise_on_sigterm()" in text and "except Terminated" in text


def test_results_name_the_commit_also_on_a_copy_without_git_history(tmp_path, monkeypatch):
    """The benchmarks' JSON named the card or machine but not the commit (written by hand in the
    results' README, after the run, or nowhere), and a GPU machine runs a copy of the checkout
    without ``.git``, where the CPU benchmarks recorded an empty ``current_revision``: every
    result records ``revision``, there the caller's ``$EPMQ_REVISION``, and a run nobody named
    says so."""
    common, = _imported("benchmarks", "_common")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    monkeypatch.delenv("EPMQ_REVISION", raising=False)
    assert common.checkout_revision() == "unknown (not a git checkout; set EPMQ_REVISION)"
    monkeypatch.setenv("EPMQ_REVISION", "3dee622")
    assert common.checkout_revision() == "3dee622 (EPMQ_REVISION)"
    common.write_json(tmp_path / "r.json", dict(device="test card"))
    assert json.loads((tmp_path / "r.json").read_text())["revision"] == "3dee622 (EPMQ_REVISION)"


def test_gemv_probe_checks_and_compiles():
    """The suite's GEMV probe (benchmarks/gemv_roofline.py): its probes agree with torch under
    the interpreter (``--check``), and all four compile for sm_90, the HALF2 one with its
    inline PTX (it had kept the HALF2 sums' old arguments and failed at its first launch)."""
    import os
    import subprocess
    import sys


    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "benchmarks/gemv_roofline.py", "--check"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every probe agrees with torch" in result.stdout
    gpu_compile, = _imported("tests/kernels", "gpu_compile")
    if not gpu_compile.ptxas_available():
        pytest.skip("ptxas not available")
    script = (
        "import sys, torch\n"
        "sys.path[:0] = ['benchmarks', 'tests/kernels']\n"
        "from gpu_compile import compile_sm90\n"
        "import gemv_roofline as G\n"
        "q, out = torch.empty(512, 4096, dtype=torch.int32), torch.empty(4096)\n"
        "for unpack, tiled in ((0, False), (1, False), (2, False), (0, True)):\n"
        "    compile_sm90(G._probe_kernel, [q, out, 512, 4096, 64, 4096, 0],\n"
        "                 dict(BLOCK_N=64, BLOCK_R=16, UNPACK=unpack, ASM=True, TILED=tiled), 4, 1)\n"
        "    print('probe', unpack, tiled, 'ok')\n")
    result = gpu_compile.run_compile_script(script, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == 4


def test_layer_profile_runs_on_the_cpu():
    """bench_solver's layer profile (benchmarks/profile_epmq_layer.py) on the CPU: one table per
    run, titled with its wall time and its kernels' total."""
    profile, = _imported("benchmarks", "profile_epmq_layer")
    text = profile.profile_tables(shapes=((16, 256),), n_experts=2, precisions=("bf16x3",), rows=5,
                          device="cpu")
    titles = [line for line in text.splitlines() if line.startswith("== ")]
    assert len(titles) == 2 and "E-PMQ, 2 experts, residual bf16x3, 16x256" in titles[0]
    title = re.compile(r"wall \d+\.\d ms under the profiler, kernels 0\.0 ms$")
    assert all(title.search(t) for t in titles)


def test_solver_and_walker_benchmarks_run_on_the_cpu(tmp_path, monkeypatch):
    """The suite's solver benchmark (one tiny layer, every row kind: the fused solver, GPTQ,
    E-PMQ per residual precision and with its products on the current stream, the residual
    products alone) and its whole-walk benchmark (a one-block Llama, GPTQ and E-PMQ) run end to
    end on the CPU, the Triton kernels in the interpreter: a script the card would fail to run
    is found here first."""


    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    bench_solver, bench_walker, common = _imported("benchmarks", "bench_solver", "bench_walker", "_common")
    rows = bench_solver.bench_shape(16, 64, torch.device("cpu"), float("inf"), lambda row: None,
                                    True)
    kinds = [(r["kind"], r.get("residual_precision"), r.get("side_stream", True)) for r in rows]
    assert {("solve", None, True), ("gptq", None, True), ("residual", None, True)} <= set(kinds)
    assert {p for k, p, _ in kinds if k == "epmq_vs_gptq"} == set(bench_solver.RESIDUAL_PRECISIONS)
    assert all(r["same_as_side_stream"] for r in rows if r.get("side_stream") is False)
    lora, = [r for r in rows if r["kind"] == "epmq_lora_vs_gptq"]
    assert lora["rank"] == bench_solver.LORA_RANK and lora["codes_equal_vs_dense"] > 0.95
    assert bench_walker.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128",
                              "--layers", "1", "--tasks", "2", "--samples", "1", "--tokens", "16",
                              "--lora-if-under", "1e9", "--in-line-reads-if-under", "1e9",
                              "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "walker-cpu.json").read_text())
    assert not result["partial"] and {(r["method"], r["attempt"]) for r in result["rows"]} >= {
        ("gptq", "timed"), ("epmq", "timed"), ("epmq_in_line_reads", "timed"), ("epmq_lora", "timed")}
    assert result["epmq_lora_over_gptq"] > 0 and result["read_ahead_speedup"] > 0
    assert result["revision"] == common.checkout_revision()
    assert all(r["expert_read_s"] >= 0 for r in result["rows"] if r["method"].startswith("epmq"))


def test_w4a16_benchmark_rows_on_the_cpu(tmp_path, monkeypatch):
    """The suite's W4A16 benchmark's rows, summary and plot from the CPU (its timers and CUDA
    graphs stood in by one timed call; the products by the CPU path): every batch path, both
    groupings, fp16 and bf16 activations, act-order weights sorted and gathered."""
    import time


    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")

    def once_ms(fn, warmup=0, rep=0):
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3

    monkeypatch.setattr(bench_w4a16, "median_ms", once_ms)
    monkeypatch.setattr(bench_w4a16, "graph_ms",
                        lambda calls, M, **kw: once_ms(bench_w4a16.rotating(calls)))
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    rows, failures = bench_w4a16.bench_matmul(cpu, gen, [(128, 96)], [1, 4, 300], [32, -1], 100.0,
                                              1 << 20)
    rows, failures = bench_w4a16.bench_matmul(cpu, gen, [(128, 96)], [1], [32], 100.0, 1 << 20,
                                              dtype=torch.bfloat16, rows=rows, failures=failures)
    for act_order in ("sorted", "gather"):
        rows, failures = bench_w4a16.bench_matmul(cpu, gen, [(128, 96)], [1], [32], 100.0, 1 << 20,
                                                  rows=rows, failures=failures, act_order=act_order)
    assert failures == 0 and len(rows) == 9 and all(r["ok"] for r in rows)
    # (the bandwidth's bytes are the tensors the product reads and writes, act-order's g_idx too)
    assert [r["bytes"] for r in rows] == [r["bytes_actual"] for r in rows]
    assert [(r["act_order"], r["gather"]) for r in rows[-2:]] == [("sorted", False), ("gather", True)]
    assert {r["path"] for r in rows} >= {"gemv", "splitk"}
    assert all(isinstance(r["tuned_us"], list) for r in rows)
    json.dumps(rows)  # (what the benchmark writes)
    bench_w4a16.summary(rows)
    bench_w4a16.plot(rows, str(tmp_path / "w4a16.png"), "cpu")
    assert (tmp_path / "w4a16.png").stat().st_size > 0


def test_w4a16_plot_of_a_run_stopped_before_its_first_row(tmp_path):
    """Stopped at its time limit during the first case (its autotuning), the benchmark had no
    row to plot: ``subplots(1, 0)`` raised, and the run ended in a traceback instead of its
    summary and exit status 124."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    bf16_only = [dict(K=64, N=64, M=1, group_size=32, activation_dtype="bfloat16", speedup=1.0)]
    for rows in ([], bf16_only):
        bench_w4a16.plot(rows, str(tmp_path / "w4a16.png"), "cpu")
        assert (tmp_path / "w4a16.png").stat().st_size > 0


def test_solver_plot_draws_a_skipped_eager_baseline_as_missing_not_zero(tmp_path, monkeypatch):
    """Past ``--budget-s`` (the suite passes 60 s) the whole-layer row has no eager time and no
    speedup: the plot drew it as a 0.0 bar, a fused layer infinitely slower than eager."""
    import math

    bench_solver, = _imported("benchmarks", "bench_solver")
    figures = []
    monkeypatch.setattr(bench_solver, "save_figure", lambda fig, path, title: figures.append(fig))
    rows = [dict(kind="solve", shape="16x64", speedup=20.0), dict(kind="gptq", shape="16x64", speedup=8.0),
            dict(kind="solve", shape="32x64", speedup=30.0),
            dict(kind="gptq", shape="32x64", skipped_torch="time budget")]
    bench_solver.plot(rows, str(tmp_path / "solver.png"), "cpu")
    ax1 = figures[0].axes[0]
    heights = [bar.get_height() for bar in ax1.patches]
    assert heights[:2] == [20.0, 30.0] and heights[2] == 8.0 and math.isnan(heights[3])
    assert any("not timed" in t.get_text() for t in ax1.texts)


def _merge_rows(values):
    """Rows of merge_methods_demo's JSON at one bit width (4): fp32, GPTQ, E-PMQ test accuracy."""
    return [dict(merge=f"M{i}", fp32_test=fp32, experts_test=93.6,
                 quantized={"w4": {"gptq": {"test": gptq}, "epmq": {"test": epmq}}})
            for i, (fp32, gptq, epmq) in enumerate(values)]


def _recorded(figures):
    """A ``Figure.savefig`` that keeps the figure in ``figures`` and writes an empty file (the
    plot's temporary, which save_figure renames)."""
    def savefig(fig, fname, *args, **kwargs):
        figures.append(fig)
        open(fname, "wb").close()
    return savefig


def test_merge_methods_plot_shows_accuracies_below_thirty(tmp_path, monkeypatch):
    """The plot's axis started at 30%: a quantized row below it (2-bit GPTQ, ~14%) had no bar
    at all, as if it had not run."""
    import matplotlib.figure

    demo, = _imported("benchmarks", "merge_methods_demo")
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _recorded(figures))
    demo.plot(_merge_rows([(71.6, 14.0, 41.0), (72.5, 75.0, 77.0)]), [4], str(tmp_path / "m.png"))
    (ax,) = figures[0].axes
    assert ax.get_ylim()[0] <= 14.0 - 2
    demo.plot(_merge_rows([(71.6, 60.0, 70.0)]), [4], str(tmp_path / "m.png"))
    assert figures[1].axes[0].get_ylim()[0] == 30  # (the committed plot's axis where every value is above it)


def test_merge_methods_plot_legend_leaves_the_experts_line_visible(tmp_path, monkeypatch):
    """The legend, placed inside the axes, covered the experts' dashed line (93.6%, near the
    top) across its width, and stayed inside the saved figure."""
    import matplotlib.figure

    demo, = _imported("benchmarks", "merge_methods_demo")
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _recorded(figures))
    demo.plot(_merge_rows([(71.6, 71.9, 77.5), (72.5, 72.3, 76.8), (77.5, 75.6, 77.0)]), [4, 3][:1],
              str(tmp_path / "m.png"))
    fig = figures[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # (closed once saved: drawn again on a canvas of its own)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    box = ax.get_window_extent(renderer)
    line_y = ax.transData.transform((0, 93.6))[1]
    over_the_line = legend.y0 <= line_y <= legend.y1 and legend.x0 < box.x1 and legend.x1 > box.x0
    assert not over_the_line
    assert 0 <= legend.x0 and legend.x1 <= fig.bbox.width


def test_a_benchmark_plot_stopped_while_written_leaves_the_previous_one(tmp_path, monkeypatch):
    """The benchmarks wrote their JSON atomically but their PNG in place: killed while plotting
    (the suite's timeout, 10 s after SIGTERM), the previous run's plot was left truncated."""
    import matplotlib.figure

    common, = _imported("benchmarks", "_common")
    path = tmp_path / "w4a16.png"
    fig, _ = common.pyplot().subplots()
    common.save_figure(fig, str(path), "before")
    before = path.read_bytes()

    def killed(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed)
    fig, _ = common.pyplot().subplots()
    with pytest.raises(KeyboardInterrupt):
        common.save_figure(fig, str(path), "after")
    assert path.read_bytes() == before


def test_a_result_written_while_another_run_writes_it_keeps_their_temporaries_apart(tmp_path):
    """write_json, write_text and save_figure wrote every run's temporary as ``<path>.tmp``: a second run
    writing the same result (two suites into one results folder) truncated the first's half-written
    temporary, which the first then renamed into place whole-looking but the second's or cut short."""
    common, = _imported("benchmarks", "_common")
    for name, write in [("r.json", lambda p: common.write_json(p, dict(a=1))),
                        ("r.txt", lambda p: common.write_text(p, "whole")),
                        ("r.png", lambda p: common.save_figure(common.pyplot().subplots()[0], p, "t"))]:
        path = tmp_path / name
        theirs = tmp_path / f"{name}.tmp"
        theirs.write_text("another run's, half-written")
        write(str(path))
        assert theirs.read_text() == "another run's, half-written"
        assert path.exists() and path.stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["a"] == 1
    assert (tmp_path / "r.txt").read_text() == "whole"


def test_w4a16_plot_marks_a_wrong_result(tmp_path, monkeypatch):
    """A case whose product failed its check was drawn as every other: a fast, wrong kernel
    read as a speedup in the PNG."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    figures = []
    monkeypatch.setattr(bench_w4a16, "save_figure", lambda fig, path, title: figures.append(fig))
    rows = [dict(K=64, N=64, M=m, group_size=32, speedup=1.2, speedup_graph=1.3, ok=m != 4)
            for m in (1, 4, 16)]
    bench_w4a16.plot(rows, str(tmp_path / "w4a16.png"), "cpu")
    (ax,) = figures[0].axes
    assert "wrong result" in [t.get_text() for t in ax.get_legend().get_texts()]
    figures.clear()
    bench_w4a16.plot([dict(r, ok=True) for r in rows], str(tmp_path / "w4a16.png"), "cpu")
    assert "wrong result" not in [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]


@pytest.mark.parametrize("group_size", [32, -1])
def test_w4a16_plot_draws_the_limit_of_its_own_format(tmp_path, monkeypatch, group_size):
    """The dashed limit was Marlin's 3.87x (its format has no zero points); the benchmark's
    weights store an fp16 scale and a uint8 zero per group and column: its limit at M = 1 is
    the fp16 weight's bytes over those."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    K, N = 256, 64
    weights = bench_w4a16.make_weights(K, N, group_size, "cpu", torch.Generator().manual_seed(0))
    stored = sum(t.nbytes for t in weights)
    assert bench_w4a16.ideal_speedup(K, group_size) == pytest.approx(2 * K * N / stored)
    figures = []
    monkeypatch.setattr(bench_w4a16, "save_figure", lambda fig, path, title: figures.append(fig))
    bench_w4a16.plot([dict(K=K, N=N, M=1, group_size=group_size, speedup=2.0)], str(tmp_path / "p.png"), "cpu")
    dashed = [line for line in figures[0].axes[0].get_lines() if line.get_linestyle() == "--"
              and line.get_label().startswith("bytes' limit")]
    assert [line.get_ydata()[0] for line in dashed] == [pytest.approx(2 * K * N / stored)]


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("M", [1, 3])
def test_w4a16_bandwidth_counts_the_bytes_its_weights_hold(group_size, M):
    """The bandwidth (and its fraction of the copy bandwidth, the M = 1 target) counted each
    group's zero point as 2 bytes where the benchmark's weights hold it in a uint8: the GB/s
    overstated by K N / g bytes (1.5% at group 128, K = N = 4096)."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    K, N = 256, 64
    stored = sum(t.nbytes for t in bench_w4a16.make_weights(K, N, group_size, "cpu",
                                                             torch.Generator().manual_seed(0)))
    x_and_y = torch.empty(M, K, dtype=torch.float16).nbytes + torch.empty(M, N, dtype=torch.float16).nbytes
    assert bench_w4a16.int4_bytes(M, K, N, group_size) == stored + x_and_y
    if group_size != -1:
        g_idx = torch.empty(K, dtype=torch.int32)
        assert bench_w4a16.int4_bytes(M, K, N, group_size, act_order=True) == stored + g_idx.nbytes + x_and_y


def test_w4a16_replots_a_committed_run_without_a_gpu(tmp_path):
    """A committed run's figure is drawn again from its JSON after a change to the plot (the
    card that measured it is rarely at hand)."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    run = tmp_path / "w4a16-card.json"
    run.write_text(json.dumps(dict(device="card", rows=[dict(K=64, N=64, M=m, group_size=32, speedup=1.5)
                                                         for m in (1, 4)])))
    assert bench_w4a16.main(["--replot", str(run)]) == 0
    assert (tmp_path / "w4a16-card.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # (neither a run's output nor a JSON to draw)
        bench_w4a16.main([])


def test_w4a16_plot_into_a_folder_not_yet_made(tmp_path):
    """``bench_w4a16.py --out results/h100.json --plot figures/h100.png`` (a folder not yet made)
    ended, after every case was timed, in a bare FileNotFoundError where the JSON makes its folder;
    save_figure makes it too (drawn here from a run's JSON, as --replot does)."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    run = tmp_path / "w4a16-card.json"
    run.write_text(json.dumps(dict(device="card", rows=[dict(K=64, N=64, M=m, group_size=32, speedup=1.5)
                                                         for m in (1, 4)])))
    figure = tmp_path / "figures" / "h100.png"
    assert bench_w4a16.main(["--replot", str(run), "--plot", str(figure)]) == 0
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("stopped_in", ["copy_bandwidth", "bench_packing"])
def test_w4a16_benchmark_stopped_before_its_rows_writes_what_it_has(tmp_path, monkeypatch, stopped_in):
    """The suite's timeout (SIGTERM) during the copy-bandwidth or packing measurements, which
    run before the matmul rows, killed the run before it had caught the signal: no JSON, no
    plot, no summary. It writes them (no row, partial) and exits 124, as stopped later."""
    import os
    import signal
    from types import SimpleNamespace

    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    real_generator = torch.Generator
    monkeypatch.setattr(bench_w4a16, "no_cuda", lambda script: False)
    monkeypatch.setattr(bench_w4a16, "device_info", lambda device: dict(device="cpu"))
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1 << 20))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "cpu")
    monkeypatch.setattr(bench_w4a16, "copy_bandwidth", lambda device: 100.0)
    monkeypatch.setattr(bench_w4a16, "bench_packing", lambda device, gen: [])

    def timed_out(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # (delivered at the next bytecode boundary)
            pass
        raise AssertionError("SIGTERM did not raise")

    monkeypatch.setattr(bench_w4a16, stopped_in, timed_out)

    def uncaught(signum, frame):
        raise RuntimeError("SIGTERM reached the benchmark before it caught it: the run is killed")

    previous = signal.signal(signal.SIGTERM, uncaught)
    try:
        rc = bench_w4a16.main(["--out", str(tmp_path / "w4a16.json")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 124
    result = json.loads((tmp_path / "w4a16.json").read_text())
    assert result["partial"] is True and result["rows"] == [] and result["failures"] == 0
    assert (tmp_path / "w4a16.png").stat().st_size > 0


def test_gemv_probe_stopped_before_its_first_shape_leaves_this_runs_json(tmp_path, monkeypatch):
    """The GEMV probe wrote its JSON only once a shape was done: killed at the suite's limit
    (30 s) before that, it left none, or the previous run's, read as this one's. It writes a
    partial one (no row) before it measures anything."""
    from types import SimpleNamespace

    gemv_roofline, common, bench_w4a16 = _imported("benchmarks", "gemv_roofline", "_common", "bench_w4a16")
    real_generator = torch.Generator
    monkeypatch.setattr(common, "no_cuda", lambda script: False)
    monkeypatch.setattr(common, "device_info", lambda device: dict(device="cpu"))
    monkeypatch.setattr(gemv_roofline, "run_check", lambda device: None)
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1 << 20))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "cpu")

    class Killed(BaseException):
        """(SIGKILL, 10 s after the SIGTERM this script does not catch)"""

    def killed(device):
        raise Killed

    monkeypatch.setattr(bench_w4a16, "copy_bandwidth", killed)
    (tmp_path / "gemv-roofline-cpu.json").write_text(json.dumps(dict(device="cpu", rows=[{"K": 1}], partial=False)))
    with pytest.raises(Killed):
        gemv_roofline.main(["--out", str(tmp_path)])
    result = json.loads((tmp_path / "gemv-roofline-cpu.json").read_text())
    assert result["partial"] is True and result["rows"] == []


def test_walker_times_runs_a_model_narrower_than_one_head(tmp_path):
    """``walker_times.py --hidden 64`` (a quick check of the script, as bench_walker's CPU run
    takes hidden 64) gave its Llama ``hidden // 128 = 0`` attention heads: the child ended in
    transformers' bare 'integer division or modulo by zero' and the run in 'the child ... failed'."""
    walker_times, = _imported("benchmarks", "walker_times")
    out = tmp_path / "walker-times.json"
    assert walker_times.main(["--hidden", "64", "--intermediate", "128", "--layers", "1", "--tokens", "16",
                              "--samples", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same_model"] and set(result["current"]["walk_s"]) == {"gptq", "epmq"}


def test_gpu_suite_log_is_whole_when_the_suite_returns(tmp_path):
    """The suite's log is written by a ``tee`` in a process substitution, which bash does not wait
    for: when tee lagged (a busy host), the caller collecting the results found the log cut short
    or not yet there. A tee slowed by a second stands in for the busy host; every Python the
    suite starts is a stub that succeeds, so only the suite's own plumbing runs."""
    import os
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # (the preamble answers in shell assignments, as benchmarks/_suite_preamble.py does)
    (bin_dir / "python-stub").write_text('#!/bin/sh\ncase "$*" in *_suite_preamble*) echo "CARD=\'Stub Card\'"; '
                                         'echo STACK=stub; echo MISSING= ;; *) echo stub "$@" ;; esac\n')
    (bin_dir / "tee").write_text(f"#!/bin/sh\nsleep 1\nexec {shutil.which('tee')} \"$@\"\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
           "PYTHON": str(bin_dir / "python-stub")}
    # to a file, as a caller that does not wait for every writer of a pipe to close it sees it
    with open(tmp_path / "stdout.txt", "w") as stdout:
        rc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, cwd=tmp_path,
                            stdout=stdout, stderr=subprocess.STDOUT, timeout=60).returncode
    logs = list(out.glob("gpu-suite-*.log"))
    assert len(logs) == 1, (rc, (tmp_path / "stdout.txt").read_text())
    assert "== all steps passed" in logs[0].read_text()


def test_gpu_suite_without_a_card_refuses_instead_of_passing(tmp_path):
    """On a machine whose torch sees no CUDA device (a CPU build, a hidden GPU) every CUDA test
    skipped and every benchmark said it had nothing to time, and the suite ended "all steps
    passed" with status 0: a GPU session's one call spent on a run that measured nothing, reported
    as a success. It stops before its steps, saying why, in its log too. Its Python is a stub that
    answers the preamble's card query as torch without CUDA does, so only the suite's own plumbing runs."""
    import os
    import subprocess

    stub = tmp_path / "python-stub"
    stub.write_text('#!/bin/sh\ncase "$*" in *_suite_preamble*) echo CARD=no-cuda; echo STACK=stub; echo MISSING= ;; '
                    '*) echo stub "$@" ;; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], cwd=tmp_path,
                            env={**os.environ, "OUT": str(out), "PYTHON": str(stub)},
                            capture_output=True, text=True, timeout=60)
    log = (out / "gpu-suite-no-cuda.log").read_text()
    assert result.returncode != 0, log
    assert "torch sees no CUDA device" in log
    assert "== cuda-tests" not in log and "all steps passed" not in log


@pytest.mark.parametrize("hidden", [32, 448])
def test_cli_end_to_end_builds_a_model_that_runs_at_any_width(tmp_path, hidden):
    """``cli_end_to_end.py --hidden 32`` gave its Llama ``hidden // 64 = 0`` attention heads
    (transformers' bare 'integer division or modulo by zero'), and ``--hidden 448`` 7 heads with
    ``448 // 192 = 2`` key-value heads, which the first forward refused as torch's bare 'Number of
    heads in key and value must divide the number of heads in query'."""
    import transformers

    cli_end_to_end, = _imported("benchmarks", "cli_end_to_end")
    cli_end_to_end.write_inputs(tmp_path, 1, hidden)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        logits = base(input_ids=torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 32000) and torch.isfinite(logits).all()


def _lora_cpu_base(epmq_lora_cpu, monkeypatch, hidden):
    """The base model ``epmq_lora_cpu.measure_walks`` builds at width ``hidden`` (stopped there)."""
    built = []

    class Built(Exception):
        pass

    def record(base, directory, tasks, rank):
        built.append(base)
        raise Built

    monkeypatch.setattr(epmq_lora_cpu, "adapters_and_merge", record)
    with pytest.raises(Built):
        epmq_lora_cpu.measure_walks(hidden, 64, 1, n_experts=1, rank=2, repeats=1)
    return built[0]


def test_epmq_lora_cpu_walks_a_llama_whose_heads_are_odd(monkeypatch):
    """``epmq_lora_cpu.py --walk 576:...`` gave its Llama 9 attention heads and ``576 // 256 = 2``
    key-value heads, and the walk ended in torch's bare 'Number of heads in key and value must
    divide the number of heads in query' (the model it builds is run here, not walked)."""
    epmq_lora_cpu, = _imported("benchmarks", "epmq_lora_cpu")
    built = [_lora_cpu_base(epmq_lora_cpu, monkeypatch, 576)]
    with torch.no_grad():
        logits = built[0](input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()


def test_solver_layer_profile_stopped_while_written_leaves_the_previous_one(tmp_path, monkeypatch):
    """bench_solver wrote its JSON and plot atomically but its layer profile
    (epmq-layer-profile-<card>.txt) in place: killed while writing it (the suite's timeout), the
    previous run's profile was left cut short. The run here is the CPU's, its rows stood in."""
    bench_solver, profile = _imported("benchmarks", "bench_solver", "profile_epmq_layer")
    for name, value in dict(no_cuda=lambda script: False, raise_on_sigterm=lambda: None, plot=lambda *a: None,
                            device_info=lambda device: dict(device="test card"),
                            bench_shape=lambda *a, **k: []).items():
        monkeypatch.setattr(bench_solver, name, value)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test Card")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(profile, "profile_tables", lambda shapes, **kw: f"== E-PMQ {shapes[0]}\n" + "row\n" * 50)
    path = tmp_path / "epmq-layer-profile-test-card.txt"
    argv = ["--out", str(tmp_path), "--shapes", "16:64", "--no-sweep", "--profile-if-under", "1e9"]
    assert bench_solver.main(argv) == 0
    before = path.read_text()
    assert before.count("== E-PMQ") == 3
    assert_a_kill_while_written_leaves(path, before, "== E-PMQ (4096, ", lambda: bench_solver.main(argv), monkeypatch)


def test_merge_methods_plot_stopped_while_written_leaves_the_previous_one(tmp_path, monkeypatch):
    """merge_methods_demo.py wrote its JSON atomically but its PNG in place (fig.savefig on the
    path, not _common.save_figure): stopped while plotting (Ctrl-C at the end of a 4-minute run),
    the previous run's plot, committed under benchmarks/results, was left truncated."""
    import matplotlib.figure

    demo, = _imported("benchmarks", "merge_methods_demo")
    path = tmp_path / "merge-methods-demo-cpu.png"
    demo.plot(_merge_rows([(71.6, 71.9, 77.5)]), [4], str(path))
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def killed(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.plot(_merge_rows([(72.5, 72.3, 76.8)]), [4], str(path))
    assert path.read_bytes() == before


class _DemoBench:
    """``epmq.demo.prepare()``'s bench as the demo's benchmark scripts read it, its models stood
    in (the demo trains its own for minutes), each evaluation a number of its own."""
    task_names = ["a", "b"]
    seed = 0
    cache_dir = Path("/cache/demo/0123abcd")
    calibration = {}

    def __init__(self):
        self.experts = {t: {} for t in self.task_names}
        self.evaluations = 0

    def model(self, merged):
        return torch.nn.Linear(2, 2)

    def evaluate(self, model, split):
        self.evaluations += 1
        return {"avg": self.evaluations / 1000, **{t: self.evaluations / 1000 for t in self.task_names}}

    def expert_accuracies(self, split):
        return {"avg": 0.9}


def _stood_in_demo(monkeypatch, script):
    module, = _imported("benchmarks", script)
    bench = _DemoBench()
    monkeypatch.setattr(module, "prepare", lambda: bench)
    monkeypatch.setattr(module, "choose_scale", lambda bench, mp: (mp.scales[0], {}, {mp.scales[0]: 0.5}))
    monkeypatch.setattr(module, "quantize_model", lambda *a, **k: None)
    return module


def test_demo_epmq_fp_path_json_records_the_command_it_ran(tmp_path, monkeypatch):
    """The JSON said ``python benchmarks/demo_epmq_fp_path.py`` whatever was run: a ``--bits 2``
    run's rows were recorded as the default 4, 3 and 2 bits' command; and no seed, trained
    models' cache entry or machine (a fresh cache moves the demo's cells, README says)."""
    demo_fp_path = _stood_in_demo(monkeypatch, "demo_epmq_fp_path")
    out = tmp_path / "fp-path.json"
    assert demo_fp_path.main(["--bits", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == f"python benchmarks/demo_epmq_fp_path.py --bits 2 --out {out}"
    assert {r["bits"] for r in result["rows"]} == {2}
    assert result["seed"] == 0 and result["cache"] == "0123abcd"
    assert result["torch"] == torch.__version__ and "cores" in result["machine"]


def test_merge_methods_demo_json_records_seed_cache_and_machine(tmp_path, monkeypatch):
    """merge_methods_demo's JSON named the command alone (with a trailing space where it had no
    arguments): not the demo's seed, its trained models' cache entry (a fresh cache moves the
    demo's cells, README says) or the machine the table was measured on."""
    demo = _stood_in_demo(monkeypatch, "merge_methods_demo")
    out = tmp_path / "merges.json"
    assert demo.main(["--merges", "TIES", "--bits", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == f"python benchmarks/merge_methods_demo.py --merges TIES --bits 4 --out {out}"
    assert [r["merge"] for r in result["rows"]] == ["TIES"]
    assert result["seed"] == 0 and result["cache"] == "0123abcd"
    assert result["torch"] == torch.__version__ and "cores" in result["machine"]
    assert (tmp_path / "merges.png").read_bytes().startswith(b"\x89PNG")


def test_merge_methods_demo_refuses_a_merge_label_it_has_not(tmp_path, monkeypatch, capsys):
    """``--merges TSV,Iso-C`` (the label is TSV-M) ran Iso-C alone and wrote its JSON as if that
    were what was asked; ``--merges TSV`` alone ran no merge, after the demo's training, and ended
    in a bare IndexError at the plot. Refused before any work, naming the label and the labels."""
    demo = _stood_in_demo(monkeypatch, "merge_methods_demo")
    monkeypatch.setattr(demo, "prepare", lambda: pytest.fail("prepared the demo for a label it has not"))
    out = tmp_path / "merges.json"
    for merges in ("TSV,Iso-C", "TSV"):
        with pytest.raises(SystemExit):
            demo.main(["--merges", merges, "--out", str(out)])
        error = capsys.readouterr().err
        assert "'TSV'" in error and "TSV-M" in error and "Iso-C" in error
    assert not out.exists()


@pytest.mark.parametrize("script, option, value, said", [
    (script, option, value, said)
    for script in ("merge_methods_demo", "demo_epmq_fp_path", "residual_precision_study")
    for option, value, said in [("--bits", "4,x", "'x'"), ("--bits", "9", "9"), ("--bits", "0", "0"),
                                ("--bits", ",", "no bit width"), ("--anchors", "0.1,a", "'a'"),
                                ("--anchors", "-1", "-1"), ("--anchors", "nan", "nan")]
    if (script, option) != ("demo_epmq_fp_path", "--anchors")])  # (it takes the demo's anchors)
def test_demo_benchmarks_refuse_bits_and_anchors_they_cannot_run(script, option, value, said, monkeypatch, capsys):
    """``--bits 4,x`` or ``--anchors 0.1,a`` ended in a bare 'ValueError: invalid literal for int()'
    (could not convert string to float), and ``--bits 9`` or ``--anchors -1`` in quantize_model's
    refusal after the demo's minutes of training and the first merge's scale chosen; refused on
    the command line, naming the option and the value."""
    module = _stood_in_demo(monkeypatch, script) if script != "residual_precision_study" else \
        _imported("benchmarks", script)[0]
    if script != "residual_precision_study":
        monkeypatch.setattr(module, "prepare", lambda: pytest.fail("prepared the demo for arguments it refuses"))
    else:
        monkeypatch.setattr(module, "study", lambda *a: pytest.fail("studied arguments it refuses"))
    with pytest.raises(SystemExit) as stop:
        module.main([f"{option}={value}", "--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error and said in error, error


@pytest.mark.parametrize("script, argv, option, said", [
    (script, [f"--shapes={shapes}"] + extra, "--shapes", said)
    for script, extra in [("bench_solver", []), ("bench_w4a16", ["--out", "/nonexistent/w.json"]),
                          ("gemv_roofline", []), ("side_by_side_gptq", ["--reference-dir", "/nonexistent"]),
                          ("residual_precision_study", []), ("epmq_lora_cpu", [])]
    for shapes, said in [("768x3072", "'768x3072'"), ("768", "'768'"), ("768:3072:5", "'768:3072:5'"),
                         ("0:768", "'0:768'")]
] + [("epmq_lora_cpu", ["--shapes=", "--walk=576:64"], "--walk", "'576:64'")])
def test_benchmarks_refuse_shapes_they_cannot_take(script, argv, option, said, monkeypatch, capsys):
    """``--shapes 768x3072`` ended in a bare 'invalid literal for int()', ``--shapes 768`` in 'not
    enough values to unpack' (where a GPU benchmark got to them: after its probes' check), and
    epmq_lora_cpu's ``--walk 576:64`` so after every layer shape was timed (minutes); refused on
    the command line, naming the option and the value."""
    module, = _imported("benchmarks", script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if script == "epmq_lora_cpu":
        monkeypatch.setattr(module, "measure", lambda *a: pytest.fail("timed shapes before the arguments' check"))
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error and said in error, error


@pytest.mark.parametrize("script, option", [("walker_times", "--rounds"), ("walker_times", "--repeats"),
                                            ("cpu_layer_times", "--rounds"), ("epmq_lora_cpu", "--repeats"),
                                            ("expert_read_ahead", "--rounds")])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_benchmarks_refuse_no_rounds_or_repeats(script, option, value, monkeypatch, capsys):
    """``--rounds 0`` ended, after its setup, in a bare 'IndexError: list index out of range' (the
    median of no rounds), walker_times' ``--repeats 0`` in 'the child ... failed' over "NameError: name
    'model' is not defined", epmq_lora_cpu's in "'NoneType' object has no attribute 'codes'"; refused
    on the command line, naming the option."""
    import sys

    module, = _imported("benchmarks", script)
    for slow in ("versions_side_by_side", "measure", "build"):
        if hasattr(module, slow):
            monkeypatch.setattr(module, slow, lambda *a, **k: pytest.fail("ran before the arguments' check"))
    argv = [f"{option}={value}", "--out", "/nonexistent/never-written.json"]
    monkeypatch.setattr(sys, "argv", [script] + argv)
    with pytest.raises(SystemExit) as stop:
        module.main() if script == "expert_read_ahead" else module.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: {value} is not a positive integer" in error, error


@pytest.mark.parametrize("option, value, said", [("--batches", "1,x", "'x'"), ("--batches", "0", "'0'"),
                                                ("--groups", "128,0", "'0'"), ("--groups", "-2", "'-2'"),
                                                ("--groups", "12 8", "'12 8'")])
def test_w4a16_benchmark_refuses_batches_and_groups_it_cannot_run(option, value, said, monkeypatch, capsys):
    """``--batches 1,x`` or ``--groups 128,0`` ended in a bare 'invalid literal for int()' once the card
    was found, or a ZeroDivisionError in the first case's bytes after the copy bandwidth and packing
    were measured; refused on the command line, naming the option and the value."""
    bench_w4a16, = _imported("benchmarks", "bench_w4a16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench_w4a16.main(["--out", "/nonexistent/w.json", f"{option}={value}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error and said in error, error
    assert bench_w4a16.main(["--out", "/nonexistent/w.json", "--batches", "1,16", "--groups", "128,-1"]) == 0


@pytest.mark.parametrize("script, option, value, said", [
    (script, "--archs", "llama,lama", "'lama'")
    for script in ("load_peer_checkpoint", "peer_reads_ours", "serve_with_gptqmodel")
] + [(script, "--cases", value, f"'{value}'")
     for script in ("load_peer_checkpoint", "peer_reads_ours", "serve_with_gptqmodel") for value in ("4x", "5")])
def test_peer_benchmarks_refuse_architectures_and_cases_they_have_not(script, option, value, said, monkeypatch,
                                                                     capsys):
    """``--archs llama,lama`` ran every llama case (GPTQModel's quantizing, loading, a subprocess
    each) and then ended in a bare KeyError: 'lama'; ``--cases 4x`` in a bare 'invalid literal for
    int()', ``--cases 5`` in QuantSpec's refusal or a row of GPTQModel's, after the cases before it.
    Refused on the command line, naming the option and the value."""
    module, = _imported("benchmarks", script)
    monkeypatch.setattr(module, "peer_version", lambda *a, **k: "stood in")
    for slow in ("tiny_model", "merged_family"):
        monkeypatch.setattr(module, slow, lambda *a, **k: pytest.fail("ran before the arguments' check"),
                            raising=False)
    with pytest.raises(SystemExit) as stop:
        module.main(["--python", "python", f"{option}={value}", "--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error and said in error, error


def test_layer_profile_refuses_a_residual_precision_it_has_not(monkeypatch, capsys):
    """``profile_epmq_layer.py --precision bf16`` (bf16x3 is the name) ended, on a card, in the
    solver's ValueError traceback once the first shape's statistics were formed; refused on the
    command line, naming the option and the precisions there are."""
    profile, = _imported("benchmarks", "profile_epmq_layer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile, "profile_tables", lambda **kwargs: pytest.fail("profiled a precision it has not"))
    with pytest.raises(SystemExit) as stop:
        profile.main(["--precision", "ieee", "--precision", "bf16"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "argument --precision" in error and "'bf16'" in error and "bf16x3" in error, error


def test_layer_profile_into_a_folder_not_yet_made(tmp_path, monkeypatch):
    """``profile_epmq_layer.py --out runs/h100/profile.txt`` (a folder not yet made) ended, after
    the whole profile on the card, in a bare FileNotFoundError, its tables on stdout alone, where
    the benchmarks' JSON (write_json) makes its folder; write_text makes it too."""
    profile, = _imported("benchmarks", "profile_epmq_layer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile, "profile_tables", lambda **kwargs: "== E-PMQ stood in\n")
    out = tmp_path / "runs" / "h100" / "profile.txt"
    assert profile.main(["--out", str(out)]) == 0
    assert out.read_text() == "== E-PMQ stood in\n"


def test_residual_precision_table_stopped_while_written_leaves_the_previous_one(tmp_path, monkeypatch):
    """residual_precision_study.py wrote its JSON atomically but its table
    (residual-precision-cpu.md, which README cites) in place: stopped while writing it, the
    previous run's table was left cut short."""
    study, = _imported("benchmarks", "residual_precision_study")
    out = tmp_path / "residual-precision-cpu.json"
    argv = ["--shapes", "8:64", "--bits", "4", "--anchors", "0", "--group-size", "32", "--out", str(out)]
    assert study.main(argv) == 0
    table = tmp_path / "residual-precision-cpu.md"
    before = table.read_text()
    assert "| 8x64 | 4 |" in before
    assert_a_kill_while_written_leaves(table, before, "`python benchm", lambda: study.main(argv), monkeypatch)


def test_family_sweep_refuses_a_model_type_its_task_has_not(tmp_path, monkeypatch, capsys):
    """``family_sweep.py --only llama lama`` ran 'lama' in a child of its own (42 s on 2 cores)
    and recorded it as an architecture whose tiny config does not fit ('config' stage,
    "KeyError: 'lama'"), counted in the summary with the real ones; ``--task masked-lm --only
    llama`` (a causal LM) the same. Refused before any child, naming the type and the task."""
    family_sweep, = _imported("benchmarks", "family_sweep")
    monkeypatch.setattr(family_sweep.subprocess, "run", lambda *a, **k: pytest.fail("ran a child"))
    out = tmp_path / "sweep.json"
    for args in (["--only", "llama", "lama"], ["--task", "masked-lm", "--only", "llama"]):
        monkeypatch.setattr("sys.argv", ["family_sweep.py", *args, "--out", str(out)])
        with pytest.raises(SystemExit):
            family_sweep.main()
        error = capsys.readouterr().err
        assert repr(args[-1]) in error and ("causal-lm" if "lama" in args else "masked-lm") in error
    assert not out.exists()


def test_family_sweep_of_a_few_types_leaves_the_committed_sweep_of_all(tmp_path, monkeypatch):
    """``family_sweep.py --only llama`` with the default --out overwrote the committed sweep of every
    model type (benchmarks/results/family_sweep_cpu.json) with one row, its summary read as a whole
    sweep's and recording neither the types asked for nor the command. Written beside it
    (family_sweep_cpu.only.json), the types and the command recorded."""
    import types

    family_sweep, = _imported("benchmarks", "family_sweep")
    row = types.SimpleNamespace(stdout='{"stage": "ok", "adapter": "auto"}\n', stderr="")
    monkeypatch.setattr(family_sweep.subprocess, "run", lambda *a, **k: row)
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "family_sweep_cpu.json").write_text("the committed sweep")
    monkeypatch.setattr("sys.argv", ["family_sweep.py", "--only", "llama"])
    family_sweep.main()
    assert (results / "family_sweep_cpu.json").read_text() == "the committed sweep"
    summary = json.loads((results / "family_sweep_cpu.only.json").read_text())["summary"]
    assert summary["only"] == ["llama"] and summary["command"].endswith("family_sweep.py --only llama")


def test_cpu_int4_serving_needs_an_out_and_shows_its_walk(tmp_path, monkeypatch, capsys):
    """``cpu_int4_serving.py`` without --out wrote over the committed results
    (benchmarks/results/cpu-int4-serving-cpu.json), and its GPTQ walk of a 125M Llama (minutes on
    2 cores) ran without a progress bar: --out is required, the walk shows its blocks. The layer,
    its timings and the model stand in here, the walk stopped where it would begin."""
    import transformers

    class Walked(Exception):
        pass

    def walk(model, spec, **kwargs):
        raise Walked(kwargs["progress"])

    serving, = _imported("benchmarks", "cpu_int4_serving")
    monkeypatch.setattr(serving, "ms", lambda fn, repeats: 1.0)
    monkeypatch.setattr(serving.epmq.quant, "rtn", lambda W, spec: None)
    monkeypatch.setattr(serving.epmq.QuantLinear, "from_result", lambda result, bias: torch.nn.Linear(1, 1))
    monkeypatch.setattr(transformers, "LlamaForCausalLM", lambda config: torch.nn.Linear(1, 1))
    monkeypatch.setattr(serving.epmq, "quantize_model", walk)
    with pytest.raises(SystemExit) as stop:
        serving.main([])
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(Walked) as walked:
        serving.main(["--out", str(tmp_path / "serving.json")])
    assert walked.value.args == (True,)


def test_layer_solver_benchmark_runs_as_a_script(tmp_path):
    """``python benchmarks/bench_layer_solvers.py`` (pytest-benchmark's tests only) defined its tests
    and ended with status 0, having timed nothing: run as a script, it runs them under pytest, its
    arguments pytest's (collected only here)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layer_solvers.py"), "--collect-only",
                           "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench_layer_solvers.py::test_gptq[4096x4096]" in done.stdout, done.stdout


def test_bench_walker_builds_a_llama_whose_heads_are_odd():
    """``bench_walker.py --hidden 1152`` (Gemma 3 1B's width) gave its Llama 9 attention heads
    and ``9 // 4 = 2`` key-value heads, and the walk's first block ended in torch's bare 'Number
    of heads in key and value must divide the number of heads in query'."""
    import argparse

    bench_walker, = _imported("benchmarks", "bench_walker")
    args = argparse.Namespace(hidden=1152, intermediate=64, layers=1, tasks=1, tokens=8, samples=1)
    model, experts, calibration = bench_walker.build(args, "cpu")
    with torch.no_grad():
        logits = model(input_ids=calibration["task0"][0]).logits
    assert torch.isfinite(logits).all()


def test_walker_times_runs_a_llama_whose_heads_are_odd(tmp_path):
    """``walker_times.py --hidden 1152``: 9 heads and ``9 // 4 = 2`` key-value heads, and the
    child ended in 'the block ... cannot run on its input' over torch's bare 'Number of heads
    in key and value must divide ...', the run in 'the child ... failed'."""
    walker_times, = _imported("benchmarks", "walker_times")
    out = tmp_path / "walker-times.json"
    assert walker_times.main(["--hidden", "1152", "--intermediate", "64", "--layers", "1", "--tokens", "8",
                              "--samples", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["same_model"]


def assert_a_kill_while_written_leaves(path, before, partial, run, monkeypatch):
    """``run()`` stopped (^C) as it has written ``partial`` to a file opened at ``path`` (or a temporary
    beside it named after it) leaves ``path`` holding ``before``."""
    import builtins

    real_open = builtins.open

    def killed(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).startswith((str(path), str(path.parent / f".{path.name}.tmp"))):
            f.write(partial)
            f.close()
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr(builtins, "open", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(builtins, "open", real_open)
    assert path.read_text() == before


@pytest.mark.parametrize("script", ["compile_report", "host_overhead_w4a16", "profile_epmq_layer"])
def test_kernel_reports_stopped_while_written_leave_the_previous_one(script, tmp_path, monkeypatch):
    """compile_report's and host_overhead_w4a16's --json and profile_epmq_layer's --out were written in
    place: stopped while writing (a timeout, ^C), the previous report was left cut short. Their
    measurements (compiles, timed children, a CUDA profile) stand in as fixed rows here."""
    module, = _imported("benchmarks", script)
    path = tmp_path / "report"
    if script == "compile_report":
        monkeypatch.setattr(module, "w4a16_cases", lambda full: [])
        monkeypatch.setattr(module, "residual_cases", lambda full: [])
        monkeypatch.setattr(module, "report", lambda cases: [{"kernel": "stood in"}])
        argv = ["--json", str(path)]
    elif script == "host_overhead_w4a16":
        monkeypatch.setattr(module, "run_child", lambda source, calls, tmp, smoke=False: {
            "triton": "stood in", "results": {}})
        argv = ["--json", str(path)]
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(module, "profile_tables", lambda **kwargs: "== E-PMQ stood in\n")
        argv = ["--out", str(path)]
    assert module.main(argv) == 0
    before = path.read_text()
    assert "stood in" in before
    assert_a_kill_while_written_leaves(path, before, "{\n \"tri", lambda: module.main(argv), monkeypatch)


def test_benchmark_models_take_their_heads_from_one_rule(tmp_path, monkeypatch):
    """bench_walker, walker_times, cli_end_to_end and epmq_lora_cpu each wrote their own head rule
    (three of them mended one by one for widths whose heads a rule got wrong): their models' heads
    are _common.attention_heads', one head at least and key-value heads that divide them."""
    import argparse

    common, = _imported("benchmarks", "_common")
    assert common.attention_heads(32, 64, 3) == (1, 1)
    assert common.attention_heads(1152, 128, 4) == (9, 1)
    assert common.attention_heads(4096, 128, 4) == (32, 8)  # bench_walker's default model
    assert common.attention_heads(768, 64, 3) == (12, 4)  # cli_end_to_end's
    bench_walker, cli_end_to_end, epmq_lora_cpu = _imported(
        "benchmarks", "bench_walker", "cli_end_to_end", "epmq_lora_cpu")
    asked = []

    def one_rule(hidden, head_width, group):
        asked.append(hidden)
        return 2, 1

    for module in (bench_walker, cli_end_to_end, epmq_lora_cpu):
        monkeypatch.setattr(module, "attention_heads", one_rule)
    args = argparse.Namespace(hidden=64, intermediate=64, layers=1, tasks=1, tokens=8, samples=1)
    model, _, _ = bench_walker.build(args, "cpu")
    cli_end_to_end.write_inputs(tmp_path, 1, 48)
    built = [_lora_cpu_base(epmq_lora_cpu, monkeypatch, 40)]
    configs = [model.config, json.loads((tmp_path / "base" / "config.json").read_text()), built[0].config]
    assert asked == [64, 48, 40]
    for config in configs:
        config = config if isinstance(config, dict) else config.to_dict()
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)


def test_a_benchmark_child_imports_common():
    """walker_times' child (run by _common.run_child from this checkout or a revision's sources)
    had not benchmarks/ on its path, so it wrote its own head rule where it could not import
    _common's; the child imports _common, and still the package from its sources."""
    common, = _imported("benchmarks", "_common")
    body = ("import json\nfrom _common import attention_heads\n"
            "print('RESULT ' + json.dumps(attention_heads(1152, 128, 4)))\n")
    assert common.run_child(body, str(ROOT)) == [9, 1]
