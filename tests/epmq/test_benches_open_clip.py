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


def test_images_are_prepared_as_open_clips_own_transform_for_the_checkpoint(tiny, tmp_path):
    """The checkpoint's ``preprocess_cfg`` (its own mean, std and interpolation, not OpenAI's)
    and open_clip's center crop (torchvision's: an odd margin rounds, 3 rows -> 2 above), pixel
    for pixel as open_clip's evaluation transform prepares them."""
    mean, std = [0.3, 0.5, 0.7], [0.5, 0.4, 0.3]
    bench = _same_pixels_as_open_clip(tiny, tmp_path, {"mean": mean, "std": std, "interpolation": "bilinear"})
    assert (bench.prep.mean, bench.prep.std, bench.prep.interpolation) == (tuple(mean), tuple(std), "bilinear")


def test_a_checkpoint_that_squashes_images_is_evaluated_on_squashed_images(tiny, tmp_path):
    """open_clip's ``resize_mode: squash`` (about a quarter of its pretrained tags: DFN, SigLIP):
    the whole image resized to the model's size, nothing cropped; a mode the bench cannot
    reproduce is refused, not replaced by another."""
    _same_pixels_as_open_clip(tiny, tmp_path / "squash", {"resize_mode": "squash"})
    with pytest.raises(BenchConfigError, match="resize_mode 'longest'"):
        _same_pixels_as_open_clip(tiny, tmp_path / "longest", {"resize_mode": "longest"})


def _same_pixels_as_open_clip(tiny, tmp_path, preprocess_cfg, images=None, shape=(16, 16)):
    """The tiny bench with ``preprocess_cfg`` in its base's open_clip config; checks that the
    bench prepares images (the test split's, or ``images``) pixel for pixel as open_clip's
    evaluation transform for that base."""
    import shutil

    import open_clip
    from PIL import Image

    root, config = tiny
    root = shutil.copytree(root, tmp_path / "copy")
    path = root / "base" / "open_clip_config.json"
    saved = json.loads(path.read_text())
    if list(shape) != [16, 16]:  # (open_clip preprocesses at the model's image size: a base and experts of that size)
        from open_clip.model import CLIP
        from safetensors.torch import save_file

        saved["model_cfg"]["vision_cfg"]["image_size"] = list(shape)
        clip = CLIP(**saved["model_cfg"]).eval()
        state = {k: v.contiguous() for k, v in clip.state_dict().items()}
        save_file(state, str(root / "base" / "open_clip_model.safetensors"))
        save_file({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")},
                  str(root / "experts" / "alpha.safetensors"))
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "experts" / "beta.pt")
    path.write_text(json.dumps(dict(saved, preprocess_cfg=preprocess_cfg)))
    bench = build_bench(config, base_dir=root, progress=False)
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{root / 'base'}")
    if images is None:
        images = [Image.open(f) for f in sorted((root / "data" / "beta" / "test").glob("*/*.png"))[:3]]
        assert all(img.size == (20, 24) for img in images)  # resized to 16 x 19: three rows to crop
    for img in images:
        want = transform(img)[None]
        got = bench.prep.normalize(bench.prep.uint8(img)[None])
        assert got.shape == want.shape == (1, 3, *shape)
        assert torch.allclose(got, want, atol=1e-5)
    return bench


def _odd_images():
    """Landscape, portrait, smaller than the crop, greyscale, RGBA with transparent pixels, palette."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (25, 29, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 128, 255], (25, 29))
    return [Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (41, 19, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (27, 31), dtype=np.uint8)), Image.fromarray(rgba),
            Image.fromarray(rng.integers(0, 256, (26, 33, 3), dtype=np.uint8)).quantize(16)]


@pytest.mark.parametrize("preprocess_cfg", [
    {"size": [32, 24]},  # shortest, not square: open_clip's ResizeKeepRatio (bicubic even if bilinear is asked)
    {"size": [24, 32], "interpolation": "bilinear"},
    {"size": [32, 24], "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": 16, "interpolation": "random"},  # (open_clip: bicubic at evaluation)
    {"size": 16, "fill_color": 255},  # (used by resize_mode longest only)
])
def test_non_square_sizes_and_odd_images_are_prepared_as_open_clip_prepares_them(tiny, tmp_path, preprocess_cfg):
    """Every image kind (a palette image is resized in its own mode, as open_clip resizes it,
    and converted to RGB after), non-square sizes in both modes, pixel for pixel."""
    size = preprocess_cfg["size"]
    shape = tuple(size) if isinstance(size, list) else (size, size)
    _same_pixels_as_open_clip(tiny, tmp_path, preprocess_cfg, images=_odd_images(), shape=shape)


def test_fill_color_of_resize_mode_longest_is_refused_with_it(tiny, tmp_path):
    with pytest.raises(BenchConfigError, match="resize_mode 'longest'"):
        _same_pixels_as_open_clip(tiny, tmp_path, {"resize_mode": "longest", "fill_color": 255})


def test_a_coca_base(tmp_path):
    """A CoCa base: its image tower (attention-pooled, returning its tokens too) is the model
    merged and quantized, its text tower (with a class token) gives the heads; the quantized
    tower is served from its checkpoint as it was evaluated."""
    config = write_tiny_open_clip(tmp_path / "coca", coca=True)
    bench = build_bench(config, base_dir=tmp_path / "coca", progress=False)
    model = bench.model(task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3))
    assert model.attn_pool is not None and model.output_tokens
    assert {t: tuple(h.shape) for t, h in bench.heads.items()} == {t: (3, 32) for t in TASKS}
    _quantize_and_serve(bench, model, tmp_path)
    assert len(model.epmq_report.layers) == 8  # in_proj, out_proj, c_fc, c_proj of 2 blocks


def _quantize_and_serve(bench, model, tmp_path):
    """E-PMQ through the walker, saved with the bench's extras, loaded from its directory alone:
    the same logits."""
    import epmq
    from epmq.spec import QuantSpec

    epmq.quantize_model(model, QuantSpec(bits=4, group_size=16), method="epmq", calibration=bench.calibration,
                        experts={t: bench.experts[t] for t in TASKS}, progress=False)
    epmq.save_quantized(model, tmp_path / "w4", extras=bench.save_extras)
    loaded = epmq.load_quantized(tmp_path / "w4")
    pixels = bench.calibration[TASKS[0]][0]
    torch.testing.assert_close(bench.logits(loaded, TASKS[0], pixels), bench.logits(model, TASKS[0], pixels),
                               rtol=0, atol=0)


def test_a_base_whose_image_tower_is_timm(tmp_path):
    """An open_clip base built on a timm image tower (as ViT-*-SigLIP*, EVA02-*): the tower is
    merged and quantized through the timm adapter, and served from its checkpoint, built from
    the open_clip config saved beside it."""
    from test_walker_models import TIMM_CLIP_CFG, _register_timm_model

    _register_timm_model()
    config = write_tiny_open_clip(tmp_path / "timm", vision_cfg=TIMM_CLIP_CFG["vision_cfg"])
    bench = build_bench(config, base_dir=tmp_path / "timm", progress=False)
    model = bench.model(task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3))
    assert type(model).__name__ == "TimmModel"
    _quantize_and_serve(bench, model, tmp_path)
    assert model.epmq_report.adapter == "timm" and len(model.epmq_report.layers) == 8


def test_class_names_are_read_as_the_models_tokenizer_reads_them(tmp_path):
    """open_clip's HFTokenizer over a tokenizer that keeps case (XLM-R, RoBERTa CLIPs) reads "Cat"
    and "cat" as two prompts: the task's classnames were refused as repeats (the rule of CLIP's own
    tokenizers, which lowercase), every model alike. Names the model's tokenizer reads alike
    (CLIP's, which lowercases) are refused when the bench is built, naming them."""
    import copy

    from test_benches_clip import save_cased_letters_tokenizer

    root = tmp_path / "bench"
    config = write_tiny_open_clip(root, TASKS, classes=3)
    named = copy.deepcopy(config)
    named["tasks"][0]["classnames"] = ["Cat", "cat", "dog"]
    with pytest.raises(BenchConfigError, match=r"task 'alpha'.*read alike.*\['Cat', 'cat'\]"):
        build_bench(named, base_dir=root, progress=False)  # (the tiny bench's CLIP tokenizer lowercases)
    save_cased_letters_tokenizer(root / "cased")
    named["model"]["tokenizer"] = "cased"
    bench = build_bench(named, base_dir=root, progress=False)
    assert bench.data["alpha"].classnames == ["Cat", "cat", "dog"]
    heads = bench.heads["alpha"]
    assert not torch.allclose(heads[0], heads[1])
