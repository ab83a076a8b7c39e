"""The open_clip bench on a tiny random CLIP (local-dir layout, HF tokenizer, two expert layouts)."""

import json

import pytest
import torch
import torch.nn.functional as F

from epmq.benches import BenchConfigError, build_bench
from epmq.benches.open_clip_bench import OpenClipBench
from epmq.benches.tiny import write_tiny_open_clip
from epmq.checkpoint_io import LazyStateDict
from epmq.merge import task_arithmetic

TASKS = ("alpha", "beta")
WRITE_TINY = write_tiny_open_clip  # the ``tiny`` and ``bench`` fixtures (conftest.py)


def test_structure_and_lazy_experts(bench, tiny):
    from open_clip.transformer import VisionTransformer

    root, _ = tiny
    assert isinstance(bench, OpenClipBench) and bench.task_names == list(TASKS)
    model = bench.model()
    assert isinstance(model, VisionTransformer)
    names = set(model.state_dict().keys())
    assert set(bench.base_state.keys()) == names
    # alpha: a bare visual-tower safetensors file; beta: a whole-CLIP training pickle (module.visual.*)
    alpha, beta = bench.experts["alpha"], bench.experts["beta"]
    assert isinstance(alpha, LazyStateDict) and set(alpha.keys()) == names == set(beta.keys())
    name = "transformer.resblocks.0.attn.in_proj_weight"
    assert alpha.checkpoint_key(name) == name
    assert beta.checkpoint_key(name) == "module.visual." + name
    saved = torch.load(root / "experts" / "beta.pt", weights_only=True)["state_dict"]
    assert torch.equal(beta["proj"], saved["module.visual.proj"])
    assert not torch.equal(beta["proj"], bench.base_state["proj"])


def test_heads_calibration_and_evaluation(bench, tiny):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    root, _ = tiny
    heads = bench.heads
    assert {t: tuple(h.shape) for t, h in heads.items()} == {t: (3, 16) for t in TASKS}
    # by hand with open_clip: encode_text of the templates, averaged per class
    clip = open_clip.create_model(f"local-dir:{root / 'base'}").eval()
    tok = HFTokenizer(str(root / "tokenizer"), context_length=clip.context_length)
    with torch.no_grad():
        emb = F.normalize(clip.encode_text(tok([t.format("class c") for t in bench.templates("beta")])), dim=-1)
    assert torch.allclose(heads["beta"][2], F.normalize(emb.mean(0), dim=-1), atol=1e-5)

    for items in bench.calibration.values():
        assert len(items) == 2 and all(x.shape == (2, 3, 16, 16) for x in items)
    merged = task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3)
    for state in (bench.base_state, bench.experts["beta"], merged):
        for split in ("val", "test"):
            acc = bench.evaluate(state, split)
            assert set(acc) == {*TASKS, "avg"} and all(0 <= v <= 1 for v in acc.values())
    experts = bench.expert_accuracies("val")
    assert set(experts) == {*TASKS, "avg"} and all(0 <= v <= 1 for v in experts.values())


def test_quantizes_through_the_walker(bench, tmp_path):
    import epmq
    from epmq.spec import QuantSpec

    model = bench.model(task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3))
    experts = {t: bench.experts[t] for t in TASKS}
    epmq.quantize_model(model, QuantSpec(bits=8, group_size=16), method="epmq", calibration=bench.calibration,
                        experts=experts, progress=False)
    acc = bench.evaluate(model, "test")
    assert all(0 <= v <= 1 for v in acc.values())
    # served as it is: its open_clip config beside it builds the vision tower (it needed a model)
    out = tmp_path / "w8"
    epmq.save_quantized(model, out, extras=bench.save_extras)
    loaded = epmq.load_quantized(out)
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.preprocess_cfg == json.loads(json.dumps(bench._serving_config["preprocess_cfg"]))
    assert bench.evaluate(loaded, "test") == acc


def test_identity_fingerprints_the_base_files(bench, tiny):
    """(open_clip's ``local-dir:`` schema hid the base from the fingerprint)"""
    root, config = tiny
    assert bench.identity["model"]["base_files"]
    schema = dict(config, model=dict(config["model"], base=f"local-dir:{config['model']['base']}"))
    assert build_bench(schema, base_dir=root, progress=False).identity["model"]["base_files"] == \
        bench.identity["model"]["base_files"]


def test_errors(tiny):
    root, config = tiny
    bad = dict(config, model=dict(config["model"], base="no/such/dir/here"))
    with pytest.raises(BenchConfigError, match="no such directory"):
        build_bench(bad, base_dir=root, progress=False)
    bad = dict(config, model=dict(config["model"], base="NoSuchModel-B-99"))
    with pytest.raises(BenchConfigError, match="open_clip cannot create"):
        build_bench(bad, base_dir=root, progress=False)
    bad = dict(config, tasks=[dict(config["tasks"][0], expert="experts/missing.safetensors")])
    with pytest.raises(BenchConfigError, match="no such file or directory"):
        build_bench(bad, base_dir=root, progress=False)


def test_heads_do_not_depend_on_the_model_dtype(bench, tiny):
    """The frozen zero-shot heads are computed in fp32, as the HF CLIP bench computes them;
    only the vision tower takes the model dtype."""
    root, config = tiny
    half = build_bench(dict(config, model=dict(config["model"], dtype="bfloat16")), base_dir=root, progress=False)
    assert all(torch.equal(half.heads[t], bench.heads[t]) for t in TASKS)
    assert {p.dtype for p in half.model(half.base_state).parameters()} == {torch.bfloat16}
