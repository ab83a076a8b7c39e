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
    ("della", {}), ("tsv", {}), ("iso_c", {}), ("model_stock", {}), ("average", {}),
    ("regmean", {"alpha": 0.9}),
])
def test_every_merge_runs_in_the_pipeline(tiny_bench, method, params):
    bench = tiny_bench
    experts = [bench.experts[t] for t in bench.task_names]
    plan = MergePlan(method, params=params)
    state = merged_state(bench, plan, 0.3)
    fn = getattr(merge, method)
    if method == "average":
        want = fn(experts)
    elif method == "regmean":
        from epmq.stats import gram_matrices

        grams = [gram_matrices(bench.model(e), bench.calibration[t]) for t, e in zip(bench.task_names, experts)]
        want = fn(experts, {n: [g[n] for g in grams] for n in grams[0]}, **params)
    elif method == "model_stock":
        want = fn(bench.base_state, experts)
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

