"""Our merges side by side with FusionBench's on the same checkpoints (CPU; FusionBench is a
peer, installed in its own environment: ``pip install fusion-bench``; nothing of it is imported
by the package or by this script's own process).

    python benchmarks/side_by_side_fusionbench.py --python PY [--out ...json]

``PY`` is an interpreter that can import ``fusion_bench`` (its venv; the default is this
script's own interpreter). A random-init HF ``transformers.CLIPVisionModel`` (hidden 64, MLP
128, 2 layers, 4 heads, 32x32 images in 8x8 patches: FusionBench's CLIP-vision code paths) is
the base; four experts are the base plus task vectors of different sizes, one of them sparse,
all saved with ``save_pretrained``. A small program (``PEER``, below) run by ``PY`` merges them
with FusionBench's own algorithm classes on a ``CLIPVisionModelPool`` whose models are those
directories (``_pretrained_`` the base; loaded by ``CLIPVisionModel.from_pretrained``, nothing
downloaded) and saves each merged state dict as safetensors; ``epmq.merge`` merges the same
safetensors files. Every tensor of the two results is compared. The settings that mean the
same thing in both:

    task_arithmetic   FusionBench ``TaskArithmeticAlgorithm(scaling_factor=s)``; ours
                      ``task_arithmetic(scale=s)``, s = 0.3 (FusionBench's config)
    ties              ``TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                      merge_func="sum")`` (its config): threshold 20 is read as 20 %
                      (``K > 1: K /= 100``) of each task vector's entries over the whole
                      flattened model, kept by magnitude; ours ``ties(scale=0.3, density=0.2,
                      scope="global", merge="sum")``
    ties_mean         the same with ``merge_func="mean"``, scaling 1.0; ours ``merge="mean"``
    tsv               ``TaskSingularVectorMerging(alpha=1, exclude_keys=None)`` (its config);
                      ours ``tsv(scale=1.0)``, rank fraction 1 / number of experts in both
    iso_c             ``ISO_C_Merge(scaling_factor=c, exclude_keys=None)``; ours
                      ``iso_c(scale=c)``, c = 1.0 (FusionBench's config)
    model_stock       ``ModelStock(ignore_keys=[])``: the config's default ignore_keys name
                      open_clip tensors (``model.positional_embedding`` ...) that a HF model
                      does not have, so they ignore nothing here either; ours
                      ``model_stock(per_row=False)``; with all four experts and with the first
                      two (``model_stock_2experts``)
    simple_average    ``SimpleAverageAlgorithm()`` over the experts; ours ``average(experts)``

DARE (and FusionBench's other random merges) draw their masks from torch's global generator,
we from ``(seed, name, expert)``, so they cannot be compared entry by entry; not run here.

What is the same by construction (checked here, not assumed): TSV-Merge and Iso-C treat every
2-D tensor as a matrix, the position embedding ``[patches + 1, hidden]`` included (FusionBench's
``exclude_keys`` is empty by default; its docstring's "or is text_projection" is not in its
code), and every other tensor (biases, norms, the class embedding, the 4-D patch convolution)
takes the mean task vector, scaled. TSV's rank per task is ``int(min(d_out, d_in) / K)`` in
both (for the 17 x 64 position embedding, 4 of 17 per task: FusionBench pads its stacked
singular vectors with a zero column, which does not change the orthogonalised product).
``tensor_kinds`` splits every result into ``2d_linear`` (the encoder's projection matrices),
``2d_embedding`` (the position embedding) and ``non_2d``.

Known differences, stated rather than hidden:

- TIES's trim: FusionBench's ``topk_values_mask`` takes the ``(n - int(0.2 n))``-th smallest
  magnitude of a task vector (n entries) as its threshold and keeps every entry ``>=`` it,
  i.e. ``int(0.2 n) + 1`` entries (more where magnitudes tie with it); we keep ``round(0.2 n)``
  (more where magnitudes tie with the last). One entry more per expert, so a few entries of the
  result differ (``kept_per_expert``). ``ties_count_matched`` runs ours with ``density =
  (int(0.2 n) + 1) / n`` against the same FusionBench result to show that this count is the
  only difference.
- TIES's vote: where the trimmed entries sum to exactly 0 but are not all 0, FusionBench elects
  the sign of the sum of all elected signs, we elect none (the entry stays at the base);
  ``zero_sum_votes`` counts such entries (none with these task vectors).
- Model Stock: FusionBench adds ``EPS = 1e-8`` to the product of the task vectors' norms in the
  cosine and to ``t``'s denominator, absolute values: the cosine of task vectors whose norms
  multiply to ``p`` shrinks by a factor ``1 - 1e-8 / p`` (here the bias and norm-bias task
  vectors have norms of 1e-3 .. 1e-2, so ``p`` ~ 1e-5 and their ``t`` moves by ~1e-3 of
  itself; the matrices' ``p`` ~ 1e-2 .. 1e-1). With more than two experts FusionBench also
  averages the pairwise *angles* (``np.rad2deg(acos)``) and takes the cosine of the mean angle;
  we average the pairwise *cosines* (both are the paper's single angle when the angles are
  equal; the paper's own code handles two models). With two experts only the epsilon remains.
  ``model_stock*_fusionbench_convention``: ``t mean_k W_k + (1 - t) W_0`` with FusionBench's
  ``t`` (mean angle, epsilons), computed in this script in float64, against FusionBench's
  result, to show that these two conventions are the whole difference.
- TSV with fewer rows or columns than experts: FusionBench keeps ``int(min / K) = 0`` singular
  triplets (the matrix keeps its base value), we keep at least one; no such matrix here.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peer_version, summarize, write_experts, write_json  # noqa: E402

from epmq import merge  # noqa: E402

THREADS = 2
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)
# (size relative to the tensor's mean |W|, fraction of entries changed): small, large, sparse,
# medium
EXPERTS = [(0.01, 1.0), (0.05, 1.0), (0.03, 0.3), (0.02, 1.0)]
# every task vector has a component shared by all experts (fine-tuned models of one base share
# directions), so that the cosines between task vectors are ~0.2-0.3, not ~0: Model Stock's
# t = K cos / (1 + (K - 1) cos) is then far from 0 and TIES's votes are not coin flips
SHARED = 0.65
TIES_THRESHOLD = 20  # FusionBench's config value: percent of entries kept

PEER = textwrap.dedent("""
    import importlib, importlib.metadata, json, os, sys, time
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import fusion_bench
    import lightning as L
    from safetensors.torch import save_file
    from fusion_bench.mixins import LightningFabricMixin
    from fusion_bench.modelpool import CLIPVisionModelPool

    spec = json.load(open(sys.argv[1]))
    done = {}
    for name, run in spec["runs"].items():
        module, _, cls = run["algorithm"].rpartition(".")
        algorithm = getattr(importlib.import_module(module), cls)(**run["kwargs"])
        if isinstance(algorithm, LightningFabricMixin):
            algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
        models = {"_pretrained_": spec["base"]}
        models.update({f"expert{k}": spec["experts"][k] for k in run["experts"]})
        pool = CLIPVisionModelPool(models=models)  # loaded from the directories, as from YAML
        started = time.perf_counter()
        with torch.no_grad():
            model = algorithm.run(pool)
        seconds = time.perf_counter() - started
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(spec["root"], f"fusionbench-{name}.safetensors"))
        done[name] = dict(seconds=round(seconds, 3), type=type(model).__name__)
        del algorithm
    json.dump(dict(fusion_bench=importlib.metadata.version("fusion_bench"),
                   torch=torch.__version__, runs=done),
              open(os.path.join(spec["root"], "peer.json"), "w"))
""")


def clip_vision(seed):
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)).eval()


def write_models(root):
    """Base and the experts, saved as HF checkpoints; their paths. Biases start at 0: their
    task vectors take the init scale instead."""
    return write_experts(root, clip_vision, EXPERTS, shared=SHARED,
                         fallback_scale=CLIP.get("initializer_range", 0.02))


def kind(name, t):
    if t.dim() != 2:
        return "non_2d"
    return "2d_embedding" if "embedding" in name else "2d_linear"


def compare(ours, theirs):
    """One row per tensor: the largest difference, relative to the tensor's max |value|."""
    if set(ours) != set(theirs):
        raise SystemExit(f"the results' tensors differ: ours only "
                         f"{sorted(set(ours) - set(theirs))}, FusionBench's only "
                         f"{sorted(set(theirs) - set(ours))}")
    rows = []
    for name, W in ours.items():
        T = theirs[name].float()
        diff = (W.float() - T).abs()
        scale = float(T.abs().max())
        rows.append(dict(tensor=name, kind=kind(name, T), shape=list(T.shape), numel=T.numel(),
                         max_abs_diff=float(diff.max()), max_abs_value=scale,
                         rel_diff=float(diff.max()) / max(scale, 1e-30),
                         entries_differing=int((diff > 1e-5 * scale).sum())))
    return rows


def fusionbench_convention_model_stock(base, experts, eps=1e-8):
    """Model Stock as FusionBench computes it, for the comparison: ``t`` from the mean pairwise
    *angle*, with ``eps`` added to the cosine's and to ``t``'s denominators."""
    out = {}
    K = len(experts)
    for name, W_0 in base.items():
        taus = [(e[name].double() - W_0.double()).flatten() for e in experts]
        angles = [math.acos(max(-1.0, min(1.0, float(taus[i] @ taus[j]) / (
            math.sqrt(float(taus[i] @ taus[i]) * float(taus[j] @ taus[j])) + eps))))
            for i in range(K) for j in range(i + 1, K)]
        cos = math.cos(sum(angles) / len(angles))
        t = K * cos / ((K - 1) * cos + 1 + eps)
        out[name] = t * torch.stack([e[name].float() for e in experts]).mean(0) + (1 - t) * W_0
    return out


def ties_zero_votes(base, experts, kept):
    """Entries where the trimmed task vectors (each expert's ``kept`` largest |tau| over the
    model) are not all 0 but sum to exactly 0: the only place the two votes differ."""
    names = [n for n in base if base[n].is_floating_point()]
    taus = torch.stack([torch.cat([(e[n].float() - base[n].float()).flatten() for n in names])
                        for e in experts])
    thresholds = taus.abs().sort(dim=1, descending=True).values[:, kept - 1:kept]
    trimmed = torch.where(taus.abs() >= thresholds, taus, 0.0)
    return int(((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/fusionbench-side-by-side.json")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that has fusion_bench installed")
    parser.add_argument("--scale", type=float, default=0.3, help="Task Arithmetic's and TIES's")
    parser.add_argument("--iso-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    version = peer_version("side_by_side_fusionbench", args.python, "fusion_bench", env=env)
    if version is None:
        return 2

    K = len(EXPERTS)
    every = list(range(K))
    method = "fusion_bench.method."
    peer_runs = {
        "task_arithmetic": dict(algorithm=method + "TaskArithmeticAlgorithm", experts=every,
                                kwargs=dict(scaling_factor=args.scale)),
        "ties": dict(algorithm=method + "TiesMergingAlgorithm", experts=every,
                     kwargs=dict(scaling_factor=args.scale, threshold=TIES_THRESHOLD,
                                 remove_keys=[], merge_func="sum")),
        "ties_mean": dict(algorithm=method + "TiesMergingAlgorithm", experts=every,
                          kwargs=dict(scaling_factor=1.0, threshold=TIES_THRESHOLD,
                                      remove_keys=[], merge_func="mean")),
        "tsv": dict(algorithm=method + "TaskSingularVectorMerging", experts=every,
                    kwargs=dict(alpha=1.0, exclude_keys=None)),
        "iso_c": dict(algorithm=method + "ISO_C_Merge", experts=every,
                      kwargs=dict(scaling_factor=args.iso_scale, exclude_keys=None)),
        "model_stock": dict(algorithm=method + "model_stock.ModelStock", experts=every,
                            kwargs=dict(ignore_keys=[])),
        "model_stock_2experts": dict(algorithm=method + "model_stock.ModelStock",
                                     experts=[0, 1], kwargs=dict(ignore_keys=[])),
        "simple_average": dict(algorithm=method + "SimpleAverageAlgorithm", experts=every,
                               kwargs={}),
    }
    results = dict(command="python benchmarks/side_by_side_fusionbench.py " +
                   " ".join(argv if argv is not None else sys.argv[1:]),
                   fusion_bench=version, torch=torch.__version__,
                   model=dict(type="CLIPVisionModel", **CLIP),
                   experts=[dict(size=s, fraction_changed=f) for s, f in EXPERTS],
                   scale=args.scale, iso_scale=args.iso_scale, ties_threshold=TIES_THRESHOLD,
                   differing_means="|ours - theirs| > 1e-5 * max |theirs| of the tensor",
                   methods={})
    with tempfile.TemporaryDirectory() as root:
        base_dir, expert_dirs = write_models(root)
        base = load_file(os.path.join(base_dir, "model.safetensors"))
        experts = [load_file(os.path.join(p, "model.safetensors")) for p in expert_dirs]
        spec = os.path.join(root, "spec.json")
        with open(spec, "w") as f:
            json.dump(dict(root=root, base=base_dir, experts=expert_dirs, runs=peer_runs), f)
        started = time.perf_counter()
        peer = subprocess.run([args.python, "-c", PEER, spec], capture_output=True, text=True,
                              env=env)
        seconds_peer = time.perf_counter() - started
        if peer.returncode:
            print(peer.stdout[-3000:], peer.stderr[-6000:], sep="\n", file=sys.stderr)
            print("side_by_side_fusionbench: the FusionBench program failed", file=sys.stderr)
            return 1
        with open(os.path.join(root, "peer.json")) as f:
            peer_info = json.load(f)
        results.update(fusion_bench=peer_info["fusion_bench"], peer_torch=peer_info["torch"],
                       seconds_peer_process=round(seconds_peer, 3))

        n = sum(t.numel() for t in base.values() if t.is_floating_point())
        kept = int(n * (TIES_THRESHOLD / 100)) + 1  # FusionBench's count (see the docstring)
        zero_votes = ties_zero_votes(base, experts, kept)
        ours = {  # name: (peer run, what ours is, how to make it)
            "task_arithmetic": ("task_arithmetic", f"task_arithmetic(scale={args.scale})",
                                lambda: merge.task_arithmetic(base, experts, scale=args.scale)),
            "ties": ("ties", f"ties(scale={args.scale}, density=0.2, scope='global', merge='sum')",
                     lambda: merge.ties(base, experts, scale=args.scale, density=0.2,
                                        scope="global", merge="sum")),
            "ties_count_matched": (
                "ties",
                f"ties(scale={args.scale}, density={kept}/{n}, scope='global', merge='sum')",
                lambda: merge.ties(base, experts, scale=args.scale, density=kept / n,
                                   scope="global", merge="sum")),
            "ties_mean": ("ties_mean", "ties(scale=1.0, density=0.2, scope='global', merge='mean')",
                          lambda: merge.ties(base, experts, scale=1.0, density=0.2,
                                             scope="global", merge="mean")),
            "tsv": ("tsv", "tsv(scale=1.0)", lambda: merge.tsv(base, experts, scale=1.0)),
            "iso_c": ("iso_c", f"iso_c(scale={args.iso_scale})",
                      lambda: merge.iso_c(base, experts, scale=args.iso_scale)),
            "model_stock": ("model_stock", "model_stock(per_row=False)",
                            lambda: merge.model_stock(base, experts)),
            "model_stock_fusionbench_convention": (
                "model_stock", "not ours: t from the mean pairwise angle, eps 1e-8, computed "
                "in this script (fusionbench_convention_model_stock)",
                lambda: fusionbench_convention_model_stock(base, experts)),
            "model_stock_2experts": ("model_stock_2experts", "model_stock(experts[:2])",
                                     lambda: merge.model_stock(base, experts[:2])),
            "model_stock_2experts_fusionbench_convention": (
                "model_stock_2experts", "not ours: fusionbench_convention_model_stock(experts[:2])",
                lambda: fusionbench_convention_model_stock(base, experts[:2])),
            "simple_average": ("simple_average", "average(experts)",
                               lambda: merge.average(experts)),
        }
        for name, (run, what, make) in ours.items():
            started = time.perf_counter()
            mine = make()
            seconds = time.perf_counter() - started
            theirs = load_file(os.path.join(root, f"fusionbench-{run}.safetensors"))
            rows = compare(mine, theirs)
            by_kind = {k: summarize([r for r in rows if r["kind"] == k])
                       for k in ("2d_linear", "2d_embedding", "non_2d")
                       if any(r["kind"] == k for r in rows)}
            entry = dict(fusionbench=dict(peer_runs[run], **peer_info["runs"][run]), ours=what,
                         **summarize(rows), tensor_kinds=by_kind,
                         seconds_epmq=round(seconds, 3), rows=rows)
            if name.startswith("ties"):
                entry["ties_entries_n"] = n
                entry["kept_per_expert"] = dict(fusionbench=kept, ours=kept if name.endswith(
                    "matched") else int(round(0.2 * n)))
                entry["zero_sum_votes"] = zero_votes
            results["methods"][name] = entry
            summary = {k: v for k, v in entry.items()
                       if k in ("tensors", "entries", "entries_differing", "worst_tensor",
                                "worst_rel_diff")}
            summary["by_kind"] = {k: [v["entries_differing"], f"{v['worst_rel_diff']:.2e}"]
                                  for k, v in by_kind.items()}
            print(name, json.dumps(summary), flush=True)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
