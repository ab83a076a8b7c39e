"""What the benchmark scripts share: their command line, the card and versions a result was
measured on, writing the result and its plot, and their pytest-benchmark mode.

Imported as ``_common`` (``benchmarks/`` is on ``sys.path`` both when a script runs as
``python benchmarks/bench_x.py`` and under pytest).
"""

import json
import math
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def positive_int(text: str) -> int:
    """An argparse type of a count that must be one at least (rounds, repeats: none of them ended, after
    the run's setup, in a bare IndexError of the median of no rounds, or a NameError of no walk)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def int_list(what: str, also=()):
    """An argparse type of ``"1,16"`` -> ``[1, 16]``: positive ints, or one of ``also`` (-1: a
    group size's per channel), said on the command line (else a bare ValueError once the card was
    found, or a ZeroDivisionError after the first measurements)."""
    import argparse

    def parse(text):
        items = []
        for item in filter(None, text.split(",")):
            try:
                value = int(item)
            except ValueError:
                value = 0
            if value < 1 and value not in also:
                raise argparse.ArgumentTypeError(f"{item!r} is not {what}")
            items.append(value)
        return items

    return parse


def int_tuples(form: str):
    """An argparse type of ``"a:b,c:d"`` -> ``[(a, b), (c, d)]``: positive ints, as many to an item
    as ``form`` ("d_out:d_in") names, said on the command line (a shape of one number, or 768x3072,
    ended in a bare ValueError where the shapes were reached: after a run's probes, or its timings
    of other shapes)."""
    import argparse

    size = len(form.split(":"))

    def parse(text):
        items = []
        for item in filter(None, text.split(",")):
            values = item.split(":")
            if len(values) != size or not all(v.strip().isdigit() and int(v) > 0 for v in values):
                raise argparse.ArgumentTypeError(f"{item!r} is not {form} (positive integers)")
            items.append(tuple(int(v) for v in values))
        return items

    return parse


def bit_widths(text: str) -> list:
    """``--bits`` ("4,3,2") as an argparse type: widths QuantSpec takes, said on the command line
    (not by the first quantize, after the demo's minutes of training)."""
    import argparse

    from epmq.spec import SUPPORTED_BITS

    widths = []
    for item in filter(None, text.split(",")):
        if not item.strip().isdigit() or int(item) not in SUPPORTED_BITS:
            raise argparse.ArgumentTypeError(f"{item!r} is not a bit width of {SUPPORTED_BITS}")
        widths.append(int(item))
    if not widths:
        raise argparse.ArgumentTypeError(f"{text!r} names no bit width (of {SUPPORTED_BITS})")
    return widths


def anchor_list(text: str) -> list:
    """``--anchors`` ("0,0.1") as an argparse type: E-PMQ's anchors (lam), finite and >= 0 as
    quantize_model takes them."""
    import argparse

    anchors = []
    for item in text.split(","):
        try:
            anchors.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if not math.isfinite(anchors[-1]) or anchors[-1] < 0:
            raise argparse.ArgumentTypeError(f"{item} is not an anchor (a finite number >= 0)")
    return anchors


def no_cuda(script: str) -> bool:
    """True (and says so) when there is no CUDA device to time on."""
    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device, nothing to time", file=sys.stderr)
    return True


def device_info(device) -> dict:
    """The card ``device`` is and the versions of the software stack, for a result's JSON."""
    import triton

    props = torch.cuda.get_device_properties(device)
    return dict(
        device=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
        sm_count=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
    )


def write_json(path, result: dict) -> None:
    """``result`` to ``path`` (its directory created as needed), atomically: a run killed while
    writing leaves the previous file. It records the commit measured (``revision``), which a
    result's JSON lacked: its README said it, or nothing did."""
    if isinstance(result, dict) and "revision" not in result:
        result = {**result, "revision": checkout_revision()}
    write_text(path, json.dumps(result, indent=1))


def write_text(path, text: str) -> None:
    """``text`` to ``path`` (its directory created as needed, as write_json's), atomically as
    write_json: a run killed while writing (the suite's timeout) leaves the previous file."""
    from epmq._util import write_atomic

    # (write_atomic's temporary names its process: two runs writing one result at once each rename a
    # whole file of their own, where a shared ``<path>.tmp`` let one rename the other's half-written)
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def demo_run(script: str, argv, bench) -> dict:
    """What a result on the demo benchmark was measured with: the command as run (``argv``, or
    the command line's), the demo's seed and its trained models' cache entry (another machine's
    training moves the demo's cells), the machine and torch."""
    return dict(command=" ".join(["python", "benchmarks/" + os.path.basename(script),
                                  *(sys.argv[1:] if argv is None else argv)]),
                seed=bench.seed, cache=bench.cache_dir.name,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads())


def peer_version(script: str, python: str, distribution: str, env=None):
    """The version of ``distribution`` (also the module's name) that the interpreter ``python``
    imports, or None after saying on stderr why the peer cannot run (the caller exits 2)."""
    import subprocess

    try:  # (imported, not only installed: a peer that cannot import would fail every case)
        check = subprocess.run([python, "-c", f"import importlib.metadata as m, {distribution}; "
                                              f"print(m.version({distribution!r}))"],
                               capture_output=True, text=True, env=env)
    except OSError as e:
        print(f"{script}: cannot run --python {python}: {e}", file=sys.stderr)
        return None
    if check.returncode or not check.stdout.strip():
        print(f"{script}: {python} has no {distribution} (pip install {distribution} there): "
              f"{(check.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return check.stdout.strip().splitlines()[-1]


class Terminated(BaseException):
    """SIGTERM (a step of the GPU suite reaching its time limit) raised where the benchmark was,
    so that it still writes its plot and summary of what it measured in the grace time. Not an
    ``Exception``: the autotuner skips a candidate that raises one, and would so swallow the stop
    when it lands there (as ``KeyboardInterrupt``, it passes such handlers)."""


def raise_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


# The decoder-only families the CPU side-by-sides build: (model class, config class, options).
TINY_DECODERS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32)),
    # alternating sliding-window and full layers
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(head_dim=32, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0)),  # fused qkv and gate_up
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_inner=None, bos_token_id=0,  # Conv1D
                                                   eos_token_id=0)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",  # 4 experts, 2 per token
                  dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",  # saved as block_sparse_moe.experts.N.w1
                dict(num_local_experts=4, num_experts_per_tok=2)),
}


def list_of(check, what: str):
    """An argparse type of comma-separated items (returned as a list of them), each of which
    ``check(item)`` takes: one it refuses (a ValueError or KeyError) said on the command line,
    naming it (a misspelt architecture ended in a bare KeyError after every case of the ones
    before it)."""
    import argparse

    def parse(text):
        items = text.split(",")
        for item in items:
            try:
                check(item)
            except (ValueError, KeyError) as e:
                why = f": {e}" if isinstance(e, ValueError) and str(e) else ""
                raise argparse.ArgumentTypeError(f"{item!r} is not {what}{why}") from None
        return items

    return parse


def tiny_decoder(seed, *, vocab_size, hidden_size, intermediate_size, arch="llama", layers=2):
    """A random-init decoder-only LM of ``layers`` layers (HF transformers; a Llama unless
    ``arch`` names another of TINY_DECODERS) in eval mode, for the CPU side-by-sides."""
    import transformers

    model_class, config_class, options = TINY_DECODERS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, **options)
    return getattr(transformers, model_class)(config).eval()


def attention_heads(hidden: int, head_width: int, group: int) -> tuple:
    """``(heads, key-value heads)`` of a random-init model ``hidden`` wide: one head per
    ``head_width`` (one at least: a model narrower than a head, a quick check of a script, had
    none) and one key-value head per ``group`` heads, made to divide the heads (1152 wide in
    heads of 128 is 9 heads, not 2's multiple)."""
    heads = max(1, hidden // head_width)
    return heads, math.gcd(heads, max(1, heads // group))


def write_experts(root, make_model, experts, *, shared=0.0, fallback_scale=0.02):
    """A base ``make_model(0)`` and experts saved as HF checkpoints under ``root``; returns the
    base's path and the experts'. Expert k is the base plus a task vector of relative size
    ``experts[k][0]`` (of each tensor's mean |value|; ``fallback_scale`` for all-zero tensors,
    such as biases at init) on a random ``experts[k][1]`` fraction of its entries; ``shared``
    mixes in one random direction per tensor common to every expert (so that task vectors are
    not orthogonal)."""
    base = make_model(0)
    base.save_pretrained(os.path.join(root, "base"))
    state = base.state_dict()
    g = torch.Generator().manual_seed(1)
    common = {n: torch.randn(t.shape, generator=g) for n, t in state.items()} if shared else None
    paths = []
    for k, (size, keep) in enumerate(experts):
        expert = make_model(0)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                ref = float(state[name].abs().mean()) or fallback_scale
                direction = torch.randn(p.shape, generator=g)
                if common is not None:
                    direction = shared * common[name] + direction
                tau = size * ref * direction
                tau *= (torch.rand(p.shape, generator=g) < keep).to(tau.dtype)
                p.add_(tau)
        path = os.path.join(root, f"expert{k}")
        expert.save_pretrained(path)
        paths.append(path)
    return os.path.join(root, "base"), paths


def summarize(rows) -> dict:
    """Totals of a side-by-side's per-tensor rows (``tensor``, ``numel``, ``entries_differing``,
    ``max_abs_diff``, ``max_abs_value``) and its worst tensor, by difference relative to the
    tensor's largest |value|."""
    def rel(r):
        return r["max_abs_diff"] / max(r["max_abs_value"], 1e-30)

    worst = max(rows, key=rel)
    return dict(tensors=len(rows), entries=sum(r["numel"] for r in rows),
                entries_differing=sum(r["entries_differing"] for r in rows),
                worst_tensor=worst["tensor"], worst_rel_diff=rel(worst))


# A child process that imports the package from SRC (a revision's sources, or this checkout)
# ahead of any editable install of another one, and this module as ``_common`` (a revision's
# sources hold the package alone); the code that follows prints "RESULT {json}".
CHILD_PRELUDE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, SRC)
sys.path.append(BENCHMARKS)
import epmq
assert epmq.__file__.startswith(SRC), epmq.__file__
"""


def revision_sources(rev, directory) -> tuple:
    """``(label, path)``: the package of git revision ``rev`` of this checkout, extracted under
    ``directory`` (``git archive``), for timing it beside the current tree in one run."""
    import subprocess

    short = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], capture_output=True,
                           text=True, check=True).stdout.strip()
    src = os.path.join(directory, short)
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", short, "epmq", "epmq_kernels"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    return f"baseline {short}", src


def run_child(body: str, src: str, **constants) -> dict:
    """Run ``body`` (after CHILD_PRELUDE, with ``SRC`` and ``constants`` defined) in a fresh
    interpreter; its ``RESULT`` line, parsed."""
    import subprocess

    constants = dict(SRC=src, BENCHMARKS=os.path.dirname(os.path.abspath(__file__)), **constants)
    head = "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    proc = subprocess.run([sys.executable, "-c", head + CHILD_PRELUDE + body], capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the child for {src} failed:\n{proc.stderr[-3000:]}")


def versions_side_by_side(baseline, rounds, measure) -> dict:
    """``{label: [result per round]}`` of ``measure(src)`` for this checkout ("current") and, with
    ``baseline``, that git revision, alternating: each round runs both, the order swapped every
    round so that a slow spell of the machine or a first-run effect does not favour either."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        versions = [("current", ROOT)]
        if baseline:
            versions.insert(0, revision_sources(baseline, tmp))
        runs = {label: [] for label, _ in versions}
        for r in range(rounds):
            for label, src in (versions if r % 2 == 0 else versions[::-1]):
                runs[label].append(measure(src))
                print(f"round {r + 1}: {label}: {json.dumps(runs[label][-1])}", flush=True)
    return runs


def median_of(results):
    """Elementwise median of nested dicts of numbers (other values: the first one's)."""
    import statistics

    first = results[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in results]) for k in first}
    if isinstance(first, (int, float)):
        return statistics.median(results)
    return first


def checkout_revision() -> str:
    """The checked-out commit, marked when the tracked files differ from it. A GPU machine runs a
    copy of the working tree without its git history: there the caller names the commit in
    ``$EPMQ_REVISION``, and a result says when nobody did (it had recorded an empty revision)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:  # (no git installed)
        head = ""
    if not head:
        given = os.environ.get("EPMQ_REVISION", "").strip()
        return f"{given} (EPMQ_REVISION)" if given else "unknown (not a git checkout; set EPMQ_REVISION)"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" (uncommitted changes)" if dirty else "")


def pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (no display needed); ImportError without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, title: str) -> None:
    """``fig`` under ``title`` to the PNG ``path``, atomically as write_json (the suite's
    timeout kills a benchmark 10 s after its SIGTERM, while it plots: the PNG written in place
    was left truncated over the previous run's), and closed."""
    fig.suptitle(title)
    fig.tight_layout()
    from epmq._util import write_atomic

    try:
        # (the format: the temporary's name does not say it)
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        pyplot().close(fig)


def pytest_marks() -> list:
    """The ``pytestmark`` of a benchmark module in pytest mode: skipped without
    pytest-benchmark (the whole module) or without CUDA (every test)."""
    import pytest

    pytest.importorskip("pytest_benchmark")
    return [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
