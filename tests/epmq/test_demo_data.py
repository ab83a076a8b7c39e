"""The embedded demo benchmark: data, splits, heads, cache, evaluation (tiny configuration)."""

import itertools
import json

import pytest
import torch

from epmq.demo import data, model, train
from epmq.demo.benchmark import prepare
from epmq.demo.data import TASKS, SplitSizes, build_task_data, load_digits_tensors, make_splits
from epmq.demo.model import ModelConfig
from epmq.demo.train import DemoConfig
from epmq import merge
from epmq.pipeline import MergePlan, choose_scale, merged_state

TINY = DemoConfig(
    model=ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
    splits=SplitSizes(calib=8),
    data_limit=48,
    base_epochs=1,
    base_batch=24,
    expert_epochs=1,
    expert_batch=24,
    calib_batch=4,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("demo_cache"), seed=3, progress=False, config=TINY)


# --------------------------------------------------------------------------- data


def test_splits_deterministic_disjoint_stratified(digits):
    _, labels = digits
    a, b = make_splits(labels, seed=0), make_splits(labels, seed=0)
    for k in ("train", "val", "test"):
        assert torch.equal(a[k], b[k])
    sets = {k: set(v.tolist()) for k, v in a.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(range(data.N_IMAGES))
    for d in range(10):  # every digit in every split, in proportion
        n_d = int((labels == d).sum())
        assert abs(int((labels[a["test"]] == d).sum()) - 0.25 * n_d) <= 1
        assert abs(int((labels[a["val"]] == d).sum()) - 0.15 * n_d) <= 1
    c = make_splits(labels, seed=1)
    assert not torch.equal(a["test"], c["test"])


def test_label_maps_valid():
    assert len(TASKS) == 8 and len({t.name for t in TASKS}) == 8
    for t in TASKS:
        table = t.label_table
        assert table.shape == (10,)
        # onto 0..C-1, C >= 2
        assert sorted(set(table.tolist())) == list(range(t.n_classes)) and t.n_classes >= 2


def test_tasks_differ_and_are_deterministic(digits):
    images, labels = digits
    idx = torch.arange(200)
    out = {t.name: t.apply(images[idx], labels[idx], seed=0) for t in TASKS}
    for t in TASKS:
        x, y = out[t.name]
        assert x.shape == (200, 3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        x2, y2 = t.apply(images[idx], labels[idx], seed=0)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for a, b in itertools.combinations(TASKS, 2):
        xa, ya = out[a.name]
        xb, yb = out[b.name]
        # different inputs, or different labels of the same inputs
        assert not torch.allclose(xa, xb) or not torch.equal(ya, yb), (a.name, b.name)
    # the seed moves the random parts (pixel permutation, noise), not the fixed ones
    for t in TASKS:
        x1, _ = t.apply(images[idx], labels[idx], seed=1)
        random_part = t.transform in ("permute", "noise", "noise_light")
        assert torch.equal(x1, out[t.name][0]) != random_part, t.name


def test_task_data_and_calibration(digits):
    _, labels = digits
    splits = make_splits(labels, seed=0)
    td = build_task_data(TASKS[:3], splits, seed=0, n_calib=16)
    for name, d in td.items():
        assert d.x["train"].shape[0] == len(splits["train"]) == d.y["train"].shape[0]
        assert d.calib.shape == (16, 3, 8, 8)
        # the calibration images are training images of this task
        train = d.x["train"].reshape(len(d.x["train"]), -1)
        for c in d.calib.reshape(16, -1):
            assert (train == c).all(1).any()
    with pytest.raises(ValueError):
        data.get_tasks(["nope"])


# --------------------------------------------------------------------------- model


def test_model_structure_and_heads():
    enc = model.build_encoder(TINY.model, seed=0)
    prefix, blocks = model.find_blocks(enc)
    assert len(blocks) == TINY.model.num_hidden_layers
    names = [n for n, _ in model.block_linears(enc)]
    assert len(names) == 6 * len(blocks) and all(n.startswith(prefix + ".") for n in names)
    x = torch.randn(5, 3, 8, 8)
    f = model.features(enc, x)
    assert f.shape == (5, 16) and torch.allclose(f.norm(dim=-1), torch.ones(5), atol=1e-5)
    labels = torch.tensor([0, 1, 1, 2, 0])
    head = model.class_prototypes(f, labels, 3)
    assert head.shape == (3, 16) and torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError):
        model.class_prototypes(f, labels, 4)  # class 3 has no image
    # same seed, same initialisation
    again = model.build_encoder(TINY.model, seed=0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in enc.state_dict().items())


# --------------------------------------------------------------------------- cache, evaluation


def test_cache_round_trip(tiny_bench, monkeypatch):
    bench = tiny_bench
    assert bench.trained
    cache = bench.cache_dir
    files = {p.name for p in cache.iterdir()}
    assert {"base.safetensors", "heads.safetensors", "splits.safetensors", "meta.json"} <= files
    assert {f"expert.{t.name}.safetensors" for t in TASKS} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["config"] == TINY.to_dict()

    def boom(*a, **k):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(train, "pretrain_base", boom)
    monkeypatch.setattr(train, "finetune_expert", boom)
    again = prepare(cache.parent, seed=3, progress=False, config=TINY)
    assert not again.trained and again.cache_dir == cache
    for a, b in [(bench.base_state, again.base_state), (bench.heads, again.heads)] + [
        (bench.experts[n], again.experts[n]) for n in bench.task_names
    ]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for n in bench.task_names:
        assert torch.equal(bench.data[n].x["test"], again.data[n].x["test"])
    # experts moved away from the base, differently
    keys = [k for k in bench.base_state if bench.base_state[k].is_floating_point()]
    tv = [torch.cat([(bench.experts[n][k] - bench.base_state[k]).flatten() for k in keys]) for n in bench.task_names]
    assert all(v.abs().max() > 0 for v in tv) and not torch.equal(tv[0], tv[1])
    # another seed is another folder
    assert TINY.key(3) != TINY.key(4) and TINY.key(3) == DemoConfig(**{**TINY.__dict__, "threads": 1}).key(3)


def test_a_damaged_cache_file_is_made_again_not_a_traceback(tiny_bench, tmp_path):
    """A cache file cut short (a machine that crashed after an unsynced rename, a copy of the
    cache stopped midway) or a damaged meta.json ended every later demo in a SafetensorError or
    JSONDecodeError traceback; each is made again, with a warning, as it was (training is
    deterministic), and what depends on it with it."""
    import shutil

    bench = tiny_bench
    cache = tmp_path / bench.cache_dir.name
    shutil.copytree(bench.cache_dir, cache)
    expert = cache / f"expert.{bench.task_names[0]}.safetensors"
    expert.write_bytes(expert.read_bytes()[:100])
    (cache / "splits.safetensors").write_bytes(b"")
    (cache / "meta.json").write_text("{")
    with pytest.warns(UserWarning, match="is damaged"):
        again = prepare(tmp_path, seed=3, progress=False, config=TINY)
    assert again.trained and again.cache_dir == cache
    for n in bench.task_names:
        a, b = bench.experts[n], again.experts[n]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cache / "meta.json").read_text())["seed"] == 3


def test_evaluate_and_calibration(tiny_bench):
    bench = tiny_bench
    acc = bench.evaluate(bench.base_state, split="val")
    assert list(acc) == bench.task_names + ["avg"]
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["avg"] == pytest.approx(sum(acc[n] for n in bench.task_names) / 8)
    assert bench.evaluate(bench.base, split="val") == acc  # module or state dict, same answer
    one = bench.evaluate(bench.experts["digit"], split="test", tasks=["digit"])
    assert set(one) == {"digit", "avg"}
    with pytest.raises(ValueError):
        bench.evaluate(bench.base_state, split="nope")
    cal = bench.calibration
    assert list(cal) == bench.task_names
    for n, batches in cal.items():
        assert sum(len(b) for b in batches) == 8 and all(b.shape[1:] == (3, 8, 8) for b in batches)
        bench.base(pixel_values=batches[0])  # a batch is a model input


def test_merges_choose_on_validation(tiny_bench):
    bench = tiny_bench
    plan = MergePlan("task_arithmetic", scales=[0.0, 0.3])
    scale, state, scores = choose_scale(bench, plan)
    assert scale in (0.0, 0.3) and set(scores) == {"0.0", "0.3"}
    assert scores[str(scale)] == max(scores.values())
    assert scores[str(scale)] == bench.evaluate(state, split="val")["avg"]
    assert state.keys() == bench.base_state.keys()
    s0 = merged_state(bench, plan, 0.0)
    assert all(torch.equal(s0[k], bench.base_state[k]) for k in s0)
    scale, state, _ = choose_scale(bench, MergePlan("ties", scales=[0.5], params={"density": 0.2}))
    assert scale == 0.5 and state.keys() == bench.base_state.keys()
    with pytest.raises(ValueError, match="unknown merge method"):
        MergePlan("nope")


@pytest.mark.parametrize("method, params", [
    ("dare", {"density": 0.5, "consensus": "sign"}), ("breadcrumbs", {"density": 0.8}),
    ("della", {}), ("sce", {"select_topk": 0.5}), ("tsv", {}), ("iso_c", {}), ("model_stock", {}),
    ("multislerp", {}), ("karcher", {}), ("average", {}), ("regmean", {"alpha": 0.9}),
])
def test_every_merge_runs_in_the_pipeline(tiny_bench, method, params):
    bench = tiny_bench
    experts = [bench.experts[t] for t in bench.task_names]
    plan = MergePlan(method, params=params)
    state = merged_state(bench, plan, 0.3)
    fn = getattr(merge, method)
    if method in ("average", "karcher"):
        want = fn(experts)
    elif method == "regmean":
        from epmq.stats import gram_matrices

        grams = [gram_matrices(bench.model(e), bench.calibration[t]) for t, e in zip(bench.task_names, experts)]
        want = fn(experts, {n: [g[n] for g in grams] for n in grams[0]}, **params)
    elif method in ("model_stock", "sce", "multislerp"):
        want = fn(bench.base_state, experts, **params)
    else:
        want = fn(bench.base_state, experts, scale=0.3, **params)
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)
    assert 0 <= bench.evaluate(state, split="val")["avg"] <= 1
    if method in ("model_stock", "average", "regmean"):
        with pytest.raises(ValueError, match="has no scale"):
            MergePlan(method, scales=[0.2, 0.4])


def test_equal_validation_averages_go_to_the_first_scale(monkeypatch):
    """(1/10 + 7/10) / 2 is 0.39999999999999997, (4/10 + 4/10) / 2 is 0.4: both are 8 of 20."""
    from epmq import pipeline

    class Bench:
        task_names = ["a", "b"]
        val = {0.3: (1 / 10, 7 / 10), 0.5: (4 / 10, 4 / 10)}

        def evaluate(self, state, split="test"):
            a, b = self.val[state["scale"]]
            return {"a": a, "b": b, "avg": (a + b) / 2}

    monkeypatch.setattr(pipeline, "merged_state", lambda bench, plan, scale: {"scale": scale})
    scale, _, _ = choose_scale(Bench(), MergePlan("task_arithmetic", scales=[0.3, 0.5]))
    assert scale == 0.3



def test_accuracy_is_the_share_of_images_whose_best_head_row_is_their_label(tiny_bench, gen):
    """Counted by hand through the frozen heads, per task and split, whatever the batch size."""
    bench = tiny_bench
    state = bench.experts[bench.task_names[int(torch.randint(0, 8, (1,), generator=gen))]]
    encoder = bench.model(state)
    batch = int(torch.randint(3, 11, (1,), generator=gen))
    for split in ("val", "test"):
        got = bench.evaluate(state, split, batch_size=batch)
        for n in bench.task_names:
            td = bench.data[n]
            with torch.no_grad():
                pred = model.logits(encoder, bench.heads[n], td.x[split], bench.config.logit_scale).argmax(-1)
            assert got[n] == (pred == td.y[split]).sum().item() / len(td.y[split]), (split, n)
        assert got["avg"] == pytest.approx(sum(got[n] for n in bench.task_names) / len(bench.task_names))


def test_expert_accuracies_put_each_expert_on_its_own_task(tiny_bench):
    bench = tiny_bench
    for split in ("val", "test"):
        got = bench.expert_accuracies(split)
        assert list(got) == bench.task_names + ["avg"]
        for n in bench.task_names:
            assert got[n] == bench.evaluate(bench.experts[n], split, tasks=[n])[n], (split, n)
        assert got["avg"] == pytest.approx(sum(got[n] for n in bench.task_names) / len(bench.task_names))


def test_calibration_batches_are_the_tasks_calibration_images(tiny_bench):
    bench = tiny_bench
    for n, batches in bench.calibration.items():
        td = bench.data[n]
        assert all(len(b) <= bench.config.calib_batch for b in batches)
        assert torch.equal(torch.cat(batches), td.calib)
        train = td.x["train"].reshape(len(td.x["train"]), -1)
        assert all((train == c).all(1).any() for c in td.calib.reshape(len(td.calib), -1))


def test_label_maps_follow_the_task_table():
    """The documented label of every digit for every task (pairs, residues, closed loops)."""
    loops = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 2, 9: 1}
    rule = {"digit": lambda d: d, "inv_pairs": lambda d: d // 2, "rot_mod3": lambda d: d % 3,
            "perm_digit": lambda d: d, "noise_mod5": lambda d: d % 5, "red_digit": lambda d: d,
            "flip_loops": loops.__getitem__, "quad_digit": lambda d: d}
    classes = {"digit": 10, "inv_pairs": 5, "rot_mod3": 3, "perm_digit": 10, "noise_mod5": 5, "red_digit": 10,
               "flip_loops": 3, "quad_digit": 10}
    images, digits = load_digits_tensors()
    for t in TASKS:
        assert t.label_table.tolist() == [rule[t.name](d) for d in range(10)], t.name
        assert t.n_classes == classes[t.name], t.name
        _, y = t.apply(images[:50], digits[:50], seed=0)
        assert y.tolist() == [rule[t.name](int(d)) for d in digits[:50]], t.name


def test_task_images_are_the_documented_transforms_scaled_to_plus_minus_one(gen):
    images, digits = load_digits_tensors()
    idx = torch.randint(0, data.N_IMAGES, (6,), generator=gen)
    g, d = images[idx], digits[idx]  # grey [N, 8, 8] in [0, 1]
    by_name = {t.name: t.apply(g, d, seed=0)[0] for t in TASKS}

    def rgb(r, gr, b):
        return torch.stack([r, gr, b], 1) * 2 - 1

    ccw = torch.stack([torch.stack([g[:, j, 7 - i] for j in range(8)], -1) for i in range(8)], 1)
    mirrored = g.flip(-1)
    rolled = torch.roll(g, shifts=(4, 4), dims=(1, 2))
    want = {
        "digit": rgb(g, g, g),
        "inv_pairs": rgb(1 - g, 1 - g, 1 - g),
        "rot_mod3": rgb(ccw, ccw, ccw),  # counter-clockwise: the top-right pixel goes to the top left
        "red_digit": rgb(g, 0.6 * (1 - g), torch.zeros_like(g)),
        "flip_loops": rgb(mirrored, mirrored, 0.7 * (1 - mirrored)),
        "quad_digit": rgb(0.2 * rolled, 0.4 * rolled, rolled),
    }
    for name, x in want.items():
        assert torch.allclose(by_name[name], x, atol=1e-6), name
    # the noisy task stays near its grey digit, clipped to the range
    noisy = by_name["noise_mod5"]
    assert noisy.min() >= -1 and noisy.max() <= 1 and 0.1 < (noisy - rgb(g, g, g)).std() < 1.0


def test_a_random_transform_is_drawn_from_the_seed_and_the_tasks_name():
    images, digits = load_digits_tensors()
    x, d = images[:20], digits[:20]
    a = data.Task("a", "permute", "digit", "").apply(x, d, seed=0)[0]
    b = data.Task("b", "permute", "digit", "").apply(x, d, seed=0)[0]
    assert not torch.equal(a, b)
    assert torch.equal(a, data.Task("a", "permute", "digit", "").apply(x, d, seed=0)[0])


def test_each_task_draws_its_own_calibration_images(digits):
    _, labels = digits
    train = make_splits(labels, seed=0)["train"]
    drawn = [data.calibration_indices(train, t, seed=0, n=16) for t in TASKS[:3]]
    assert all(set(c.tolist()) <= set(train.tolist()) and len(set(c.tolist())) == 16 for c in drawn)
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


def test_heads_are_centered_normalized_class_means(gen):
    feats = torch.nn.functional.normalize(torch.randn(30, 6, generator=gen), dim=-1)
    labels = torch.arange(30) % 3
    means = torch.stack([feats[labels == c].sum(0) / (labels == c).sum() for c in range(3)])
    centered = means - means.sum(0) / 3
    want = centered / centered.norm(dim=-1, keepdim=True)
    assert torch.allclose(model.class_prototypes(feats, labels, 3), want, atol=1e-6)


def test_a_state_dict_is_loaded_into_the_bench_model(tiny_bench):
    bench = tiny_bench
    name = bench.task_names[1]
    got = bench.model(bench.experts[name]).state_dict()
    assert all(torch.equal(got[k], v) for k, v in bench.experts[name].items())
    assert any(not torch.equal(got[k], bench.base_state[k]) for k in got)


def test_heads_and_experts_learn_from_training_images_only(digits):
    """Validation and test images poisoned with NaN: a head or expert that read them is NaN."""
    images, labels = digits
    splits = {k: v[:24] for k, v in make_splits(labels, seed=0).items()}
    (td,) = build_task_data(TASKS[1:2], splits, seed=0, n_calib=4).values()
    for s in ("val", "test"):
        td.x[s] = torch.full_like(td.x[s], float("nan"))
    base = model.build_encoder(TINY.model, seed=0).state_dict()
    heads = train.make_heads(TINY, base, {td.task.name: td})
    assert torch.isfinite(heads[td.task.name]).all()
    expert = train.finetune_expert(TINY, base, heads[td.task.name], td, seed=0, progress=False)
    assert all(torch.isfinite(v).all() for v in expert.values() if v.is_floating_point())
    assert any(not torch.equal(expert[k], base[k]) for k in base)


def test_pretraining_sees_only_training_images(digits):
    images, labels = digits
    splits = make_splits(labels, seed=0)
    x, y = data.pretraining_images(splits)
    assert torch.equal(x, images[splits["train"]]) and torch.equal(y, labels[splits["train"]])
    x, _ = data.pretraining_images(splits, limit=10)
    assert torch.equal(x, images[splits["train"][:10]])


def test_a_new_base_retrains_the_heads_and_experts_of_the_cache(tmp_path, monkeypatch):
    config = DemoConfig(**{**TINY.__dict__, "tasks": ("digit", "inv_pairs")})
    first = prepare(tmp_path, seed=0, progress=False, config=config)
    (first.cache_dir / "base.safetensors").unlink()
    calls = []
    real_heads, real_expert = train.make_heads, train.finetune_expert
    monkeypatch.setattr(train, "make_heads", lambda *a, **k: calls.append("heads") or real_heads(*a, **k))
    monkeypatch.setattr(train, "finetune_expert", lambda *a, **k: calls.append("expert") or real_expert(*a, **k))
    again = prepare(tmp_path, seed=0, progress=False, config=config)
    assert again.trained and calls == ["heads", "expert", "expert"]


def test_the_thread_count_is_not_part_of_the_cache_key():
    assert DemoConfig(**{**TINY.__dict__, "threads": 3}).key(0) == TINY.key(0)
    assert DemoConfig(**{**TINY.__dict__, "expert_epochs": 2}).key(0) != TINY.key(0)


def test_the_demo_plan_covers_the_documented_grid():
    from epmq.demo.plan import ANCHORS, default_plan

    full, quick = default_plan(), default_plan(quick=True)
    assert [m.method for m in full.merges] == ["task_arithmetic", "ties"]
    assert [m.method for m in quick.merges] == ["task_arithmetic"]
    assert full.methods == quick.methods == ["rtn", "gptq", "epmq"]
    assert full.bits == [8, 4, 3, 2] and quick.bits == [4, 2]
    assert full.anchors == list(ANCHORS) and 0.0 in full.anchors and quick.anchors == [1.0]
    assert full.group_size == quick.group_size == -1


def test_the_pooled_output_is_the_class_token_after_the_final_layer_norm(gen):
    """Features (and so heads and accuracies) come from CLIP's pooled output: the class token
    through the encoder's final layer norm, not the raw class token."""
    enc = model.build_encoder(TINY.model, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    (norm,) = [m for name, m in enc.named_modules() if name.endswith("post_layernorm")]
    with torch.no_grad():
        norm.weight.copy_(1 + torch.rand(norm.weight.shape, generator=gen))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))
        x = torch.randn(4, 3, 8, 8, generator=gen)
        token = enc(pixel_values=x).last_hidden_state[:, 0]
        want = norm(token)
        assert torch.allclose(model.pooled(enc, x), want, atol=1e-5)
        assert torch.allclose(model.features(enc, x), want / want.norm(dim=-1, keepdim=True), atol=1e-5)


def _quick_training(monkeypatch, seeds):
    """The demo's training replaced by instant stand-ins: the base is a seeded initialisation,
    an expert is the base; ``seeds`` records each expert's training seed by task."""
    def pretrain(config, images, digits, seed, progress=True):
        return model.build_encoder(config.model, seed=seed).state_dict()

    def finetune(config, base_state, head, td, seed, progress=True):
        seeds[td.task.name] = seed
        return {k: v.clone() for k, v in base_state.items()}

    monkeypatch.setattr(train, "pretrain_base", pretrain)
    monkeypatch.setattr(train, "finetune_expert", finetune)


def test_each_expert_trains_from_its_own_seed(tmp_path, monkeypatch, gen):
    """Experts of one run do not share a seed (the same batch order and draws for every task)."""
    config = DemoConfig(**{**TINY.__dict__, "tasks": ("digit", "inv_pairs", "rot_mod3")})
    seed = int(torch.randint(0, 100, (1,), generator=gen))
    seeds = {}
    _quick_training(monkeypatch, seeds)
    prepare(tmp_path, seed=seed, progress=False, config=config)
    assert list(seeds) == list(config.tasks)
    assert len(set(seeds.values())) == len(config.tasks)


def test_an_expert_trained_again_alone_is_recorded_in_the_meta_file(tmp_path, monkeypatch):
    """A cache missing one expert file (deleted, or never written): that expert alone is trained,
    the run says it trained, and meta.json is rewritten with its training time."""
    config = DemoConfig(**{**TINY.__dict__, "tasks": ("digit", "inv_pairs")})
    seeds = {}
    _quick_training(monkeypatch, seeds)
    first = prepare(tmp_path, seed=0, progress=False, config=config)
    meta_path = first.cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert first.trained and set(meta["seconds"]) == {"base", "expert.digit", "expert.inv_pairs"}
    (first.cache_dir / "expert.inv_pairs.safetensors").unlink()
    del meta["seconds"]["expert.inv_pairs"]  # (a meta.json left as it was would lack it)
    meta_path.write_text(json.dumps(meta))
    seeds.clear()
    again = prepare(tmp_path, seed=0, progress=False, config=config)
    assert again.trained and list(seeds) == ["inv_pairs"]
    meta = json.loads(meta_path.read_text())
    assert set(meta["seconds"]) == {"base", "expert.digit", "expert.inv_pairs"}
    assert meta["train_seconds"] == pytest.approx(sum(meta["seconds"].values()))


def test_cache_files_take_the_umasks_mode(tmp_path):
    """mkstemp's 0600 became every cache file's mode: a cache shared through EPMQ_CACHE_DIR was
    unreadable to its other users (the autotune cache and checkpoints take the umask's)."""
    import os

    previous = os.umask(0o022)
    try:
        train.save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
        train.save_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(previous)
    for name in ("t.safetensors", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_a_killed_cache_writes_temporary_is_removed_by_the_next(tmp_path):
    """A demo killed while it saved a trained expert left its temporary file for good."""
    from epmq._util import process_alive

    dead = 2 ** 22 + 12345
    assert not process_alive(dead)
    for name in ("t.safetensors", "m.json"):
        left = tmp_path / f".{name}.tmp-{dead}"
        left.write_bytes(b"half")
        (train.save_tensors(tmp_path / name, {"w": torch.ones(2)}) if name.endswith("safetensors")
         else train.save_json(tmp_path / name, {"a": 1}))
        assert not left.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "t.safetensors"]


def test_sampling_error_is_the_binomial_interval_of_the_task_average():
    """95% half-width of the unweighted mean of per-task accuracies: z sqrt(sum p(1-p)/n) / T."""
    from epmq.demo import sampling_error

    # two tasks at 50% over 100 images each: 1.96 * sqrt(2 * 0.25 / 100) / 2
    assert sampling_error({"a": 0.5, "b": 0.5, "avg": 0.5}, {"a": 100, "b": 100}) == pytest.approx(0.0692965, rel=1e-5)
    # a task every model gets right adds nothing; the interval is over the tasks counted
    assert sampling_error({"a": 0.5, "b": 1.0}, {"a": 100, "b": 400}) == pytest.approx(1.96 * 0.05 / 2)
    with pytest.raises(ValueError, match="test images"):
        sampling_error({"a": 0.5}, {"a": 0})
