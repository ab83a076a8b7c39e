"""Our merges side by side with mergekit's on the same checkpoints (CPU; mergekit is a peer,
installed separately: ``pip install mergekit``; nothing of it is imported by the package).

    python benchmarks/side_by_side_mergekit.py [--out benchmarks/results/mergekit-side-by-side.json]

A random-init Llama (HF transformers) is the base; three experts are the base plus task vectors
of different sizes and sparsity, all saved as safetensors checkpoints. mergekit merges them from
those directories (``mergekit-yaml`` configs, run in-process through its Python entry point);
``epmq.merge`` merges the same checkpoints read lazily (``epmq.checkpoint_io``). Every tensor of
the two results is compared. The settings that mean the same thing in both:

    task_arithmetic   mergekit ``task_arithmetic``, weight 1 each, ``lambda`` = our ``scale``
    ties              mergekit ``ties``, weight 1, density d, normalize true (the disjoint
                      mean), ``lambda`` = scale; ours ``scope="tensor", merge="mean"``
    breadcrumbs       mergekit ``breadcrumbs``, weight 1, density d, gamma g, ``lambda`` =
                      scale; ours ``breadcrumbs(density=d, gamma=g)``
    breadcrumbs_ties  mergekit ``breadcrumbs_ties`` (normalize false: the agreeing entries'
                      sum); ours ``breadcrumbs(..., consensus="sign", merge="sum")``
    model_stock       mergekit ``model_stock``, ``filter_wise`` false and true; ours
                      ``model_stock(per_row=False / True)``
    slerp             mergekit ``slerp`` (0.1.5 interpolates each tensor whole) from the base
                      to expert 1 (expert 0 is so close to the base that every tensor takes
                      the linear branch, where per-tensor and per-row SLERP agree), ``t`` = 0.3;
                      ours ``slerp(base, expert 1, t)``
    linear            mergekit ``linear``, weights 1, 2, 3 (normalized); ours
                      ``average(experts, weights=[1, 2, 3])``
    *_weighted        task_arithmetic and ties with per-model weights 1, 0.5, 2 (mergekit's
                      ``weight``; ours ``weights=[1, 0.5, 2]``), the TIES mean weighted

Each config is also written as a YAML file and run as it is by ``epmq merge`` (mergekit's
configs are translated by ``epmq.mergekit_config``): ``epmq_merge_of_the_yaml`` compares that
checkpoint with mergekit's.

Experts with added tokens (``added_tokens_side_by_side``): three experts, two resized for
ChatML's and a tool token, merged with ``tokenizer_source`` (union, padded or not; base; linear
without a base) by mergekit and by ``epmq merge`` of the same YAML, compared token by token.

RAM and RAM+ (mergekit's ``ramplus_tl``, r 0.5, alpha 0.4) merge three sparse experts;
Arcee Fusion fuses expert 1 into the base.

DARE and DELLA draw random masks (mergekit from torch's global generator, we from ``(seed,
name, expert)``), so their tensors cannot be compared entry by entry; DARE-TIES, DELLA and
DELLA-linear run at density 1 (no masks drawn), which compares the rest, and ``magprune``
compares DELLA's masks in distribution: keep rates by magnitude rank over many draws, and the
mean rescaled tensor.

Known differences, stated rather than hidden (in TIES's and Breadcrumbs' trims):

- mergekit keeps ``max(1, floor(d n))`` entries of a tensor of n entries (Breadcrumbs: drops
  ``floor(g n)`` outliers), we keep ``round(d n)`` (drop ``round(g n)``). The model's shapes
  make ``d n`` and ``g n`` integers at the defaults; other ``--density`` / ``--gamma`` values
  show the difference in ``entries_differing``.
- where magnitudes tie exactly at a trim boundary, we keep every tied entry (an order-free
  rule); mergekit keeps the first of them in ``argsort`` / ``sort`` order. Ties are not rare:
  an expert's task vector ``W_k - W_0`` of fp32 weights lies on the grid of ``W_0``'s rounding
  steps. ``kth_ties`` counts the (tensor, expert) pairs where one occurs at TIES's boundary.
- TIES's vote: where the trimmed entries sum to exactly 0, mergekit elects +, we elect no sign
  (the entry stays at the base).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import summarize, tiny_decoder, write_experts, write_json  # noqa: E402

from epmq import merge  # noqa: E402
from epmq.benches.tiny import word_level_tokenizer  # noqa: E402
from epmq.cli import main as cli_main  # noqa: E402
from epmq.checkpoint_io import CheckpointReader, LazyStateDict  # noqa: E402


def open_checkpoint(path):
    """A checkpoint directory as a lazy state dict under its own names."""
    reader = CheckpointReader(path, path)
    return LazyStateDict(reader, {key: key for key in reader.keys()})


def tiny_llama(seed):
    # every tensor's size times the default density 0.2 is an integer (see the docstring)
    return tiny_decoder(seed, vocab_size=100, hidden_size=80, intermediate_size=160)


def write_models(root):
    """Base and three experts (dense small, dense large, sparse), saved as HF checkpoints."""
    return write_experts(root, tiny_llama, [(0.01, 1.0), (0.05, 1.0), (0.03, 0.3)])


def run_mergekit(config, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(config), out_path=out,
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True))
    return time.perf_counter() - started


def compare(ours, theirs_dir):
    theirs = open_checkpoint(theirs_dir)
    rows = []
    for name, W in ours.items():
        T = theirs[name].float()
        diff = (W.float() - T).abs()
        rows.append(dict(tensor=name, numel=W.numel(), max_abs_diff=float(diff.max()),
                         max_abs_value=float(T.abs().max()),
                         entries_differing=int((diff > 1e-6 * T.abs().max()).sum())))
    return rows


def kth_ties(base, experts, density):
    """(tensor, expert) pairs whose k-th and (k+1)-th largest |tau| are equal and nonzero (a
    tie among zeros changes nothing), k = round(d n)."""
    count = 0
    for name in base:
        if not base[name].is_floating_point():
            continue
        for expert in experts:
            m = (expert[name] - base[name]).abs().flatten().sort(descending=True).values
            k = int(round(density * m.numel()))
            count += int(0 < k < m.numel() and bool(m[k - 1] == m[k]) and bool(m[k] > 0))
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/mergekit-side-by-side.json")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--breadcrumbs-density", type=float, default=0.9)
    # 0.0125: g n is an integer for every tensor of the tiny Llama (80-entry norms included)
    parser.add_argument("--gamma", type=float, default=0.0125)
    parser.add_argument("--t", type=float, default=0.3)
    args = parser.parse_args(argv)
    try:
        import mergekit  # noqa: F401
    except ImportError:
        print("side_by_side_mergekit: mergekit is not installed (pip install mergekit)",
              file=sys.stderr)
        return 2
    from importlib.metadata import version

    results = dict(mergekit=version("mergekit"), torch=torch.__version__, scale=args.scale,
                   density=args.density, breadcrumbs_density=args.breadcrumbs_density,
                   gamma=args.gamma, t=args.t, methods={})
    with tempfile.TemporaryDirectory() as root:
        base_dir, expert_dirs = write_models(root)
        for path in [base_dir] + expert_dirs:  # (one vocabulary, filling the embeddings' rows)
            word_level_tokenizer(path, [f"t{i}" for i in range(100)])
        base = open_checkpoint(base_dir)
        experts = [open_checkpoint(p) for p in expert_dirs]
        runs = {
            "task_arithmetic": (
                dict(merge_method="task_arithmetic", base_model=base_dir, dtype="float32",
                     parameters=dict(**{"lambda": args.scale}),
                     models=[dict(model=p, parameters=dict(weight=1.0)) for p in expert_dirs]),
                lambda: merge.task_arithmetic(base, experts, scale=args.scale)),
            "ties": (
                dict(merge_method="ties", base_model=base_dir, dtype="float32",
                     parameters=dict(normalize=True, **{"lambda": args.scale}),
                     models=[dict(model=p, parameters=dict(weight=1.0, density=args.density))
                             for p in expert_dirs]),
                lambda: merge.ties(base, experts, scale=args.scale, density=args.density,
                                   scope="tensor", merge="mean")),
        }
        # per-model weights: mergekit's `weight` multiplies each task vector before the vote
        weights = [1.0, 0.5, 2.0]
        runs["task_arithmetic_weighted"] = (
            dict(merge_method="task_arithmetic", base_model=base_dir, dtype="float32",
                 parameters=dict(**{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=w)) for p, w in zip(expert_dirs, weights)]),
            lambda: merge.task_arithmetic(base, experts, scale=args.scale, weights=weights))
        runs["ties_weighted"] = (
            dict(merge_method="ties", base_model=base_dir, dtype="float32",
                 parameters=dict(normalize=True, **{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=w, density=args.density))
                         for p, w in zip(expert_dirs, weights)]),
            lambda: merge.ties(base, experts, scale=args.scale, density=args.density, scope="tensor",
                               merge="mean", weights=weights))
        # normalize against its method's default, the base listed among the models (as mergekit
        # configs often do)
        runs["ties_sum"] = (
            dict(merge_method="ties", base_model=base_dir, dtype="float32",
                 parameters=dict(normalize=False, **{"lambda": args.scale}),
                 models=[dict(model=base_dir)] + [dict(model=p, parameters=dict(weight=1.0, density=args.density))
                                                  for p in expert_dirs]),
            lambda: merge.ties(base, experts, scale=args.scale, density=args.density, scope="tensor",
                               merge="sum"))
        runs["task_arithmetic_normalized"] = (
            dict(merge_method="task_arithmetic", base_model=base_dir, dtype="float32",
                 parameters=dict(normalize=True, **{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=w)) for p, w in zip(expert_dirs, weights)]),
            lambda: merge.task_arithmetic(base, experts, scale=args.scale,
                                          weights=[w / sum(weights) for w in weights]))
        crumbs = [dict(model=p, parameters=dict(weight=1.0, density=args.breadcrumbs_density,
                                                gamma=args.gamma)) for p in expert_dirs]
        for method, consensus in (("breadcrumbs", None), ("breadcrumbs_ties", "sign")):
            runs[method] = (
                dict(merge_method=method, base_model=base_dir, dtype="float32",
                     parameters=dict(**{"lambda": args.scale}), models=crumbs),
                lambda consensus=consensus: merge.breadcrumbs(
                    base, experts, scale=args.scale, density=args.breadcrumbs_density,
                    gamma=args.gamma, consensus=consensus, merge="sum"))
        runs["breadcrumbs_ties_normalized"] = (
            dict(merge_method="breadcrumbs_ties", base_model=base_dir, dtype="float32",
                 parameters=dict(normalize=True, **{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(c["parameters"], weight=w))
                         for c, p, w in zip(crumbs, expert_dirs, weights)]),
            lambda: merge.breadcrumbs(base, experts, scale=args.scale, density=args.breadcrumbs_density,
                                      gamma=args.gamma, consensus="sign", merge="mean", weights=weights))
        # from a review: per-model parameters given for all at the top, linear with the base listed,
        # Breadcrumbs at the default gamma (0.01 of an 80-entry norm: mergekit truncates 0.8 to 0)
        runs["ties_top_level_density"] = (
            dict(merge_method="ties", base_model=base_dir, dtype="float32",
                 parameters=dict(weight=1.0, density=args.density, **{"lambda": args.scale}),
                 models=[dict(model=p) for p in expert_dirs]),
            lambda: merge.ties(base, experts, scale=args.scale, density=args.density, scope="tensor",
                               merge="mean", convention="mergekit"))
        densities = [0.2, 0.5, 0.3]
        runs["ties_per_model_density"] = (
            dict(merge_method="ties", base_model=base_dir, dtype="float32",
                 parameters=dict(**{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=1.0, density=d))
                         for p, d in zip(expert_dirs, densities)]),
            lambda: merge.ties(base, experts, scale=args.scale, density=densities, scope="tensor", merge="mean",
                               convention="mergekit"))
        # DARE draws random masks (mergekit from torch's global generator): at density 1 none are
        # drawn, which checks the rest (weights, the vote, normalize) entry for entry
        runs["dare_ties_density_1"] = (
            dict(merge_method="dare_ties", base_model=base_dir, dtype="float32",
                 parameters=dict(normalize=True, **{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=w, density=1.0)) for p, w in zip(expert_dirs, weights)]),
            lambda: merge.dare(base, experts, scale=args.scale, density=1.0, consensus="sign", merge="mean",
                               weights=weights, rescale="l1", convention="mergekit"))
        for method, vote in (("della", True), ("della_linear", False)):
            runs[f"{method}_density_1"] = (
                dict(merge_method=method, base_model=base_dir, dtype="float32",
                     parameters=dict(**{"lambda": args.scale}),
                     models=[dict(model=p, parameters=dict(weight=w, density=1.0))
                             for p, w in zip(expert_dirs, weights)]),
                lambda vote=vote: merge.della(
                    base, experts, scale=args.scale, density=1.0, consensus="sign" if vote else None,
                    merge="mean" if vote else "sum", rescale="l1", convention="mergekit",
                    weights=weights))
        # tokenizer_source: base, which mergekit runs through its vocabulary realignment (here the
        # identity: every model has the base's 100 tokens for its 100 embedding rows)
        runs["ties_tokenizer_source_base"] = (
            dict(merge_method="ties", base_model=base_dir, dtype="float32", tokenizer_source="base",
                 parameters=dict(normalize=True, **{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=1.0, density=args.density)) for p in expert_dirs]),
            lambda: merge.ties(base, experts, scale=args.scale, density=args.density, scope="tensor", merge="mean",
                               convention="mergekit"))
        for topk in (1.0, 0.3):
            runs[f"sce_select_topk_{topk}"] = (
                dict(merge_method="sce", base_model=base_dir, dtype="float32", parameters=dict(select_topk=topk),
                     models=[dict(model=p) for p in expert_dirs]),
                lambda topk=topk: merge.sce(base, experts, select_topk=topk))
        # NuSLERP: two experts (weights 1 and 3: t = 0.75), of their task vectors or of the models,
        # each tensor whole, by rows, or by columns
        pair, nu_weights = expert_dirs[1:], [1.0, 3.0]
        for with_base, row_wise, flatten in ((True, False, True), (True, False, False), (False, True, False)):
            vectors = "flat" if flatten else "cols" if row_wise else "rows"
            runs[f"nuslerp_{'base' if with_base else 'no_base'}_{vectors}"] = (
                dict(merge_method="nuslerp", dtype="float32", **(dict(base_model=base_dir) if with_base else {}),
                     parameters=dict(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten),
                     models=[dict(model=p, parameters=dict(weight=w)) for p, w in zip(pair, nu_weights)]),
                lambda with_base=with_base, row_wise=row_wise, flatten=flatten: merge.nuslerp(
                    base if with_base else None, experts[1:], weights=nu_weights, row_wise=row_wise,
                    flatten=flatten))
        # Multi-SLERP of three experts (weights 1, 0.5, 2), of their task vectors and of the models
        for with_base in (True, False):
            runs[f"multislerp_{'base' if with_base else 'no_base'}"] = (
                dict(merge_method="multislerp", dtype="float32", **(dict(base_model=base_dir) if with_base else {}),
                     models=[dict(model=p, parameters=dict(weight=w)) for p, w in zip(expert_dirs, weights)]),
                lambda with_base=with_base: merge.multislerp(base if with_base else None, experts, weights=weights))
        # Karcher mean of every model (the base among them: first, or added by mergekit)
        runs["karcher_base_listed"] = (
            dict(merge_method="karcher", base_model=base_dir, dtype="float32",
                 models=[dict(model=base_dir)] + [dict(model=p) for p in expert_dirs]),
            lambda: merge.karcher([base] + experts))
        runs["karcher"] = (
            dict(merge_method="karcher", dtype="float32", parameters=dict(max_iter=20, tol=1e-6),
                 models=[dict(model=p) for p in expert_dirs]),
            lambda: merge.karcher(experts, max_iter=20, tol=1e-6))
        runs["nearswap"] = (
            dict(merge_method="nearswap", base_model=base_dir, dtype="float32", parameters=dict(t=0.001),
                 models=[dict(model=base_dir), dict(model=expert_dirs[1])]),
            lambda: merge.nearswap(base, experts[1:2], t=0.001))
        # RAM / RAM+ on sparse experts (30% of each tensor's entries changed: entries one expert
        # changed alone, shared ones and untouched ones all occur); Arcee Fusion of one expert
        sparse_base_dir, sparse_dirs = write_experts(os.path.join(root, "sparse"), tiny_llama,
                                                     [(0.03, 0.3), (0.05, 0.3), (0.02, 0.3)])
        sparse_base, sparse = open_checkpoint(sparse_base_dir), [open_checkpoint(p) for p in sparse_dirs]
        runs["ram"] = (
            dict(merge_method="ram", base_model=sparse_base_dir, dtype="float32",
                 models=[dict(model=p) for p in sparse_dirs]),
            lambda: merge.ram(sparse_base, sparse))
        runs["ramplus_tl"] = (
            dict(merge_method="ramplus_tl", base_model=sparse_base_dir, dtype="float32",
                 parameters=dict(r=0.5, alpha=0.4), models=[dict(model=p) for p in sparse_dirs]),
            lambda: merge.ram_plus(sparse_base, sparse, r=0.5, alpha=0.4))
        runs["arcee_fusion"] = (
            dict(merge_method="arcee_fusion", base_model=base_dir, dtype="float32",
                 models=[dict(model=base_dir), dict(model=expert_dirs[1])]),
            lambda: merge.arcee_fusion(base, experts[1:2]))
        runs["linear_base_listed"] = (
            dict(merge_method="linear", base_model=base_dir, dtype="float32",
                 models=[dict(model=base_dir, parameters=dict(weight=2.0))]
                 + [dict(model=p, parameters=dict(weight=1.0)) for p in expert_dirs]),
            lambda: merge.average([base] + experts, weights=[2.0, 1.0, 1.0, 1.0]))
        runs["breadcrumbs_default_gamma"] = (
            dict(merge_method="breadcrumbs", base_model=base_dir, dtype="float32",
                 parameters=dict(**{"lambda": args.scale}),
                 models=[dict(model=p, parameters=dict(weight=1.0, density=0.7)) for p in expert_dirs]),
            lambda: merge.breadcrumbs(base, experts, scale=args.scale, density=0.7, gamma=0.01,
                                      convention="mergekit"))
        for per_row in (False, True):
            runs[f"model_stock{'_filter_wise' if per_row else ''}"] = (
                dict(merge_method="model_stock", base_model=base_dir, dtype="float32",
                     parameters=dict(filter_wise=per_row),
                     models=[dict(model=p) for p in expert_dirs]),
                lambda per_row=per_row: merge.model_stock(base, experts, per_row=per_row))
        runs["slerp"] = (
            dict(merge_method="slerp", base_model=base_dir, dtype="float32",
                 parameters=dict(t=args.t),
                 models=[dict(model=base_dir), dict(model=expert_dirs[1])]),
            lambda: merge.slerp(base, experts[1], t=args.t))
        runs["linear"] = (
            dict(merge_method="linear", dtype="float32",
                 models=[dict(model=p, parameters=dict(weight=float(k + 1)))
                         for k, p in enumerate(expert_dirs)]),
            lambda: merge.average(experts, weights=[1.0, 2.0, 3.0]))
        # mergekit's best-known config: SLERP of whole models given as one slice, t a gradient
        # over the layers per filter (5 layers, so the gradient is read between its points)
        base5_dir, (other5_dir,) = write_experts(os.path.join(root, "five"), lambda seed: tiny_decoder(
            seed, vocab_size=100, hidden_size=80, intermediate_size=160, layers=5), [(0.05, 1.0)])
        base5, other5 = open_checkpoint(base5_dir), open_checkpoint(other5_dir)
        attention, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]

        def t_by_hand(name):  # (mergekit's documented reading: layer i of 5 at i / 4 of the list)
            layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
            x = 0.0 if layer is None else layer / 4
            values = attention if "self_attn" in name else mlp if "mlp" in name else [0.5]
            at = x * (len(values) - 1)
            i = min(int(at), len(values) - 1)
            j = min(i + 1, len(values) - 1)
            return (1 - (at - i)) * values[i] + (at - i) * values[j]

        runs["slerp_gradient"] = (
            dict(merge_method="slerp", base_model=base5_dir, dtype="float32",
                 slices=[dict(sources=[dict(model=base5_dir, layer_range=[0, 5]),
                                       dict(model=other5_dir, layer_range=[0, 5])])],
                 parameters=dict(t=[dict(filter="self_attn", value=attention), dict(filter="mlp", value=mlp),
                                    dict(value=0.5)])),
            lambda: merge.slerp(base5, other5, t=t_by_hand))
        for method, (config, ours_fn) in runs.items():
            out = os.path.join(root, f"mergekit-{method}")
            seconds_theirs = run_mergekit(config, out)
            started = time.perf_counter()
            ours = ours_fn()
            seconds_ours = time.perf_counter() - started
            rows = compare(ours, out)
            # the same YAML file, run as it is by `epmq merge` (epmq.mergekit_config)
            config_file = os.path.join(root, f"{method}.yaml")
            with open(config_file, "w") as f:
                yaml.safe_dump(config, f)
            assert cli_main(["merge", config_file, os.path.join(root, f"epmq-{method}"), "--quiet"]) == 0
            from_yaml = summarize(compare(open_checkpoint(os.path.join(root, f"epmq-{method}")), out))
            results["methods"][method] = dict(
                mergekit_config=yaml.safe_dump(config).replace(root, "<tmp>"), **summarize(rows),
                seconds_mergekit=round(seconds_theirs, 3), seconds_epmq=round(seconds_ours, 3),
                epmq_merge_of_the_yaml={k: v for k, v in from_yaml.items() if k != "worst_tensor"},
                rows=rows)
            if method.startswith("ties"):
                results["methods"][method]["kth_ties"] = kth_ties(base, experts, args.density)
            summary = {k: v for k, v in results["methods"][method].items()
                       if k not in ("rows", "mergekit_config")}
            print(method, json.dumps(summary))
        results["added_tokens"] = added_tokens_side_by_side(os.path.join(root, "added"))
    results["magprune"] = magprune_side_by_side()
    print("magprune", json.dumps(results["magprune"]))
    write_json(args.out, results)
    return 0


def added_tokens_side_by_side(root):
    """Experts with added tokens (ChatML's two, a tool token: embeddings and head resized, the new
    rows trained) merged with ``tokenizer_source`` by mergekit and by ``epmq merge`` of the same
    YAML. mergekit numbers the union's added tokens in the order of a Python set of its models
    (it changes from run to run), so the vocabulary-indexed tensors are compared token by token."""
    import transformers

    words = [f"t{i}" for i in range(100)]

    def write(name, added, seed):
        model = tiny_llama(0)
        path = os.path.join(root, name)
        tok = word_level_tokenizer(path, words, added)
        if added:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((0.05 if seed else 0.0) * torch.randn(p.shape, generator=g) * p.abs().mean())
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path

    base = write("base", [], 0)
    experts = [write("chat", [("<|im_start|>", True), ("<|im_end|>", True)], 1),
               write("tool", [("<tool>", False), ("<|im_end|>", True)], 2), write("plain", [], 3)]
    models = [dict(model=p, parameters=dict(weight=1.0)) for p in experts]
    configs = {
        "task_arithmetic_union_pad_8": dict(merge_method="task_arithmetic", base_model=base, dtype="float32",
                                            models=models, tokenizer=dict(source="union", pad_to_multiple_of=8)),
        "task_arithmetic_base": dict(merge_method="task_arithmetic", base_model=base, dtype="float32",
                                     models=models, tokenizer_source="base"),
        "ties_union": dict(merge_method="ties", base_model=base, dtype="float32", tokenizer_source="union",
                           parameters=dict(normalize=True),
                           models=[dict(model=p, parameters=dict(weight=1.0, density=0.5)) for p in experts]),
        "linear_union_no_base": dict(merge_method="linear", dtype="float32", tokenizer_source="union",
                                     models=[dict(model=p, parameters=dict(weight=1.0)) for p in experts[:2]]),
        # rows named token by token: a holder's row where the rule would average, another token's
        # row forced on every model, zeros, and a token no model has
        "task_arithmetic_union_tokens": dict(
            merge_method="task_arithmetic", base_model=base, dtype="float32", models=models,
            tokenizer=dict(source="union", tokens={
                "<|im_end|>": dict(source=experts[1]),
                "<|im_start|>": dict(source=dict(kind="model_token", model=base, token="t1"), force=True),
                "<tool>": dict(source=dict(kind="zero")),
                "<new>": dict(source=dict(kind="model_token", model=experts[0], token_id=101))})),
    }
    results = {}
    for name, config in configs.items():
        theirs_dir, ours_dir = os.path.join(root, f"mergekit-{name}"), os.path.join(root, f"epmq-{name}")
        run_mergekit(config, theirs_dir)
        config_file = os.path.join(root, f"{name}.yaml")
        with open(config_file, "w") as f:
            yaml.safe_dump(config, f)
        assert cli_main(["merge", config_file, ours_dir, "--quiet"]) == 0
        theirs_vocab = transformers.AutoTokenizer.from_pretrained(theirs_dir).get_vocab()
        ours_vocab = transformers.AutoTokenizer.from_pretrained(ours_dir).get_vocab()
        # our row i is mergekit's row of our token i (padding rows keep their place)
        order = [theirs_vocab[t] for t, _ in sorted(ours_vocab.items(), key=lambda item: item[1])]
        theirs, ours = open_checkpoint(theirs_dir), open_checkpoint(ours_dir)
        rows = []
        for tensor in theirs:
            T, W = theirs[tensor].float(), ours[tensor].float()
            if tensor in ("model.embed_tokens.weight", "lm_head.weight"):
                T = torch.cat([T[order], T[len(order):]])
            diff = (W - T).abs()
            rows.append(dict(tensor=tensor, shape=list(W.shape), max_abs_diff=float(diff.max()),
                             entries_differing=int((diff > 0).sum())))
        results[name] = dict(
            mergekit_config=yaml.safe_dump(config).replace(root, "<tmp>"),
            same_tokens=set(theirs_vocab) == set(ours_vocab), tokens=len(ours_vocab),
            rows=[r["shape"][0] for r in rows if r["tensor"] == "lm_head.weight"][0],
            max_abs_diff=max(r["max_abs_diff"] for r in rows),
            entries_differing=sum(r["entries_differing"] for r in rows),
            differing=[r for r in rows if r["entries_differing"]])
        print("added tokens", name, json.dumps({k: v for k, v in results[name].items() if k != "mergekit_config"}))
    return results


def magprune_side_by_side(draws=400, rows=4, n=1000, density=0.5, epsilon=0.2):
    """DELLA's MagPrune, mergekit's and ours, on one task vector, ``draws`` times each: how often
    each entry is kept, by tenth of its magnitude rank in its row, and the mean of the rescaled
    tensor (L1 rescaling, mergekit's default) against the task vector: the same distribution,
    since the masks themselves cannot match."""
    from mergekit.sparsify import RescaleNorm, della_magprune

    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(rows, n, generator=gen) * torch.exp(torch.randn(rows, n, generator=gen))
    decile = (tau.abs().argsort(dim=1).argsort(dim=1) * 10 // n).reshape(-1)
    base = {"w": torch.zeros(rows, n)}
    torch.manual_seed(0)  # (mergekit draws from torch's global generator)
    theirs = [della_magprune(tau, density, epsilon, RescaleNorm.l1) for _ in range(draws)]
    ours = [merge.della(base, [{"w": tau}], scale=1.0, density=density, epsilon=epsilon, consensus=None,
                        merge="sum", rescale="l1", seed=s)["w"] for s in range(draws)]

    def by_decile(samples):
        kept = torch.stack([(t != 0).reshape(-1).float() for t in samples]).mean(0)
        return [round(float(kept[decile == d].mean()), 4) for d in range(10)]

    mean_theirs, mean_ours = torch.stack(theirs).mean(0), torch.stack(ours).mean(0)
    return dict(draws=draws, shape=[rows, n], density=density, epsilon=epsilon,
                keep_rate_by_rank_decile_mergekit=by_decile(theirs), keep_rate_by_rank_decile_epmq=by_decile(ours),
                expected_by_definition=[round(density - epsilon + 2 * epsilon * (d + 0.5) / 10, 4) for d in range(10)],
                mean_vs_tau_rel_err_mergekit=float((mean_theirs - tau).norm() / tau.norm()),
                mean_vs_tau_rel_err_epmq=float((mean_ours - tau).norm() / tau.norm()),
                means_rel_diff=float((mean_theirs - mean_ours).norm() / tau.norm()))


if __name__ == "__main__":
    sys.exit(main())
