"""Merges against results computed by hand."""

import math
import warnings
import zlib

import pytest
import torch
from torch import nn

from epmq import merge
from epmq.merge import _kth_largest
from epmq.merge_checkpoint import METHODS

T = torch.tensor


def hand_models():
    """Base and three experts; task vectors chosen to exercise trimming, sign ties and zeros."""
    base = {"w": torch.zeros(6), "v": T([1.0, 1.0]), "ids": T([3, 1, 2])}
    taus = [
        ([3.0, -1.0, 0.5, 2.0, 0.0, -4.0], [0.5, 0.0]),
        ([-3.0, 2.0, 0.4, 2.0, 0.0, 1.0], [0.0, -10.0]),
        ([1.0, -2.0, -0.1, 0.0, 0.0, 5.0], [0.0, 0.0]),
    ]
    experts = [{"w": T(w), "v": T([1.0, 1.0]) + T(v), "ids": T([0, 0, 0])} for w, v in taus]
    return base, experts


def test_task_arithmetic():
    base, experts = hand_models()
    out = merge.task_arithmetic(base, experts, scale=0.3)
    torch.testing.assert_close(out["w"], 0.3 * T([1.0, -1.0, 0.8, 4.0, 0.0, 2.0]))
    torch.testing.assert_close(out["v"], T([1.0, 1.0]) + 0.3 * T([0.5, -10.0]))
    assert torch.equal(out["ids"], base["ids"])  # non-float tensors come from the base


def test_average():
    base, experts = hand_models()
    out = merge.average(experts)
    torch.testing.assert_close(out["w"], T([1.0, -1.0, 0.8, 4.0, 0.0, 2.0]) / 3)
    assert torch.equal(out["ids"], experts[0]["ids"])


class Counted(dict):
    """A state dict that counts the reads of each tensor (as a lazy checkpoint would make them)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = {}

    def __getitem__(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().__getitem__(name)


@pytest.mark.parametrize("method, kw", [
    ("task_arithmetic", dict(weights=[1.0, 0.5, 2.0])), ("ties", dict(scope="tensor")),
    ("dare", dict(consensus="sign", merge="mean")), ("della", {}), ("breadcrumbs", dict(consensus="sign")),
    ("average", dict(weights=[1.0, 0.5, 2.0])), ("average", {})])
def test_task_vectors_past_the_memory_limit_are_made_one_at_a_time(method, kw, gen, monkeypatch):
    """A tensor whose K task vectors would pass HOLD_BYTES is merged with them made on demand
    (the sign vote's second pass reads each expert again): the same merge, the experts read one
    tensor at a time instead of all K at once."""
    base = {"w": torch.randn(40, 24, generator=gen), "b": torch.randn(24, generator=gen)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    args = (experts,) if method == "average" else (base, experts)
    held = getattr(merge, method)(*args, **kw)
    monkeypatch.setattr(merge, "HOLD_BYTES", 4 * 24 * 3)  # ("b" still held, "w" not)
    counted = [Counted(e) for e in experts]
    streamed = getattr(merge, method)(*((counted,) if method == "average" else (base, counted)), **kw)
    for name in base:
        torch.testing.assert_close(streamed[name], held[name], rtol=1e-6, atol=1e-6)
    sign = method in ("ties", "della") or kw.get("consensus") == "sign"
    assert [c.reads for c in counted] == [{"w": 2 if sign else 1, "b": 1}] * 3


def test_float64_task_vectors_count_their_own_bytes_against_the_memory_limit(gen, monkeypatch):
    """HOLD_BYTES counted 4 bytes an entry whatever the dtype, so a float64 tensor's K task
    vectors were held at twice the limit; they count 8 and are made on demand past it."""
    base = {"w": torch.randn(40, 24, generator=gen, dtype=torch.float64)}
    experts = [{"w": base["w"] + 0.1 * torch.randn(40, 24, generator=gen, dtype=torch.float64)} for _ in range(3)]
    held = merge.ties(base, experts, scope="tensor")
    monkeypatch.setattr(merge, "HOLD_BYTES", 4 * 40 * 24 * 3)  # (float32's would be held, float64's not)
    counted = [Counted(e) for e in experts]
    streamed = merge.ties(base, counted, scope="tensor")
    assert torch.equal(streamed["w"], held["w"])
    assert [c.reads for c in counted] == [{"w": 2}] * 3  # (the sign vote's second pass)


@pytest.mark.parametrize("K", [2, 4])
def test_global_ties_and_model_stock_read_each_input_a_fixed_number_of_times(K, gen):
    """Global TIES found each expert's threshold in two passes of its own over the model, each
    reading the base again: a lazy checkpoint's base was read 2K + 1 times (17 reads of the whole
    model for 8 experts). Model Stock read each expert's tensor twice (its task vector, then
    the mean). Now TIES reads the base and each expert 3 times (two passes for every threshold,
    the merge), whatever K, with the same thresholds; Model Stock reads each tensor once."""
    base = {"w": torch.randn(40, 24, generator=gen), "b": torch.randn(24, generator=gen)}
    experts = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(K)]
    densities = [0.2, 0.0, 0.5, 1.0][:K]  # (one trimmed to nothing: no threshold, no read for it)
    counted_base, counted = Counted(base), [Counted(e) for e in experts]
    thresholds = merge._global_thresholds(counted_base, counted, lambda k: densities[k])
    n = sum(t.numel() for t in base.values())
    assert thresholds == [merge._kth_largest(lambda k=k: [(experts[k][m] - base[m]).abs() for m in base], n,
                                             densities[k]) for k in range(K)]
    assert counted_base.reads == {"w": 3, "b": 3}  # (one for its size: a lazy checkpoint's header says it)
    assert [c.reads for c in counted] == [{} if d == 0 else {"w": 2, "b": 2} for d in densities]
    counted_base, counted = Counted(base), [Counted(e) for e in experts]
    merge.ties(counted_base, counted, density=0.3)
    assert [counted_base.reads, *(c.reads for c in counted)] == [{"w": 4, "b": 4}] + [{"w": 3, "b": 3}] * K
    counted_base, counted = Counted(base), [Counted(e) for e in experts]
    merge.model_stock(counted_base, counted)
    assert [counted_base.reads, *(c.reads for c in counted)] == [{"w": 1, "b": 1}] * (K + 1)


@pytest.mark.parametrize("changed", [("a", "b"), ("b",)])  # (the tensors the kept expert changed)
def test_global_ties_reads_no_expert_whose_rank_rounds_to_0(changed, gen):
    """An expert of density above 0 whose k = round(density * n) rounds to 0 keeps nothing, as at
    density 0, yet the thresholds' two passes read each of its tensors (only density 0 was skipped),
    and a tensor only it changed counted in the other experts' n, halving what they kept. It is not
    read now, its thresholds and merge a density 0's: nothing of it kept, where only it changed the base's."""
    base = {"a": torch.randn(40, 24, generator=gen), "b": torch.randn(40, 24, generator=gen)}
    trimmed = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    kept = {n: t + 0.1 * torch.randn(t.shape, generator=gen) if n in changed else t for n, t in base.items()}
    densities = [1e-4, 0.5]  # (round(1e-4 * 1920) = 0)
    counted_base, counted = Counted(base), [Counted(trimmed), Counted(kept)]
    thresholds = merge._global_thresholds(counted_base, counted, lambda k: densities[k])
    n = sum(base[t].numel() for t in changed)
    assert thresholds == [None, _kth_largest(lambda: [(kept[t] - base[t]).abs() for t in changed], n, 0.5)]
    assert thresholds == merge._global_thresholds(base, [trimmed, kept], lambda k: [0.0, 0.5][k])
    assert [c.reads for c in counted] == [{}, {t: 2 if t in changed else 1 for t in base}]
    out = merge.ties(base, [trimmed, kept], density=densities, progress=False)
    alone = merge.ties(base, [kept], density=0.5, progress=False)
    for name in base:
        assert torch.equal(out[name], alone[name]), name


@pytest.mark.parametrize("unchanged", [False, True])  # (True: a tensor no expert changed, out of the ranked m)
def test_global_ties_refuses_a_density_every_expert_keeps_nothing_at(unchanged, gen):
    """Only a density of exactly 0 was refused: a density whose k = round(density * n) rounds to 0
    for every expert (1e-4 of a 40x24 task vector) kept nothing, and TIES returned the base, said
    nowhere. It is refused now, naming the entries ranked and the smallest density that keeps one:
    before any read where the model's n gives 0, after the first pass where the changed m does."""
    base = {"a": torch.randn(40, 24, generator=gen), "b": torch.randn(40, 24, generator=gen)}
    experts = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) if n == "a" or not unchanged else t
                for n, t in base.items()} for _ in range(2)]
    m = 960 if unchanged else 1920
    # (4e-4: round(0.768) = 1 of the model's 1920, round(0.384) = 0 of the changed 960)
    density = 4e-4 if unchanged else 1e-4
    with pytest.raises(ValueError, match=rf"density={density} keeps round\(density \* {m}\) = 0 of the model's "
                                         rf"{m} .* the smallest density that keeps one is") as caught:
        merge.ties(base, experts, density=density, progress=False)
    smallest = float(str(caught.value).rsplit(" ", 1)[1])
    assert smallest == math.nextafter(0.5 / m, 1)  # (round(0.5) = 0)
    out = merge.ties(base, experts, density=smallest, progress=False)
    assert sum(int(torch.count_nonzero(out[n] - base[n])) for n in base) in (1, 2)  # (each expert's one entry)
    with pytest.raises(ValueError, match="keeps round"):  # (one per expert: all of them 0)
        merge.ties(base, experts, density=[density, density / 2], progress=False)
    merge.ties(base, experts, density=[density, smallest], progress=False)  # (one expert keeping one: a merge)
    # (experts that are the base: m = 0, nothing to keep, their merge the base; 4e-4 ranks 1 of the model's n)
    same = merge.ties(base, [dict(base)] * 2, density=4e-4, progress=False)
    assert all(torch.equal(same[n], base[n]) for n in base)


TRIMS = {  # (a trimming merge at a fraction that keeps nothing of a 40x24 tensor, and some of 1000x100)
    "ties": lambda b, e, f: merge.ties(b, e, density=f, scope="tensor", progress=False),
    "ties mergekit": lambda b, e, f: merge.ties(b, e, density=f, scope="tensor", convention="mergekit",
                                                progress=False),
    "breadcrumbs": lambda b, e, f: merge.breadcrumbs(b, e, density=f, gamma=0.0, progress=False),
    "breadcrumbs mergekit": lambda b, e, f: merge.breadcrumbs(b, e, density=f, gamma=0.0, convention="mergekit",
                                                              progress=False),
    "della": lambda b, e, f: merge.della(b, e, density=f, epsilon=f / 2, progress=False),
    "sce": lambda b, e, f: merge.sce(b, e, select_topk=f, progress=False),
}


@pytest.mark.parametrize("method", TRIMS)
def test_per_tensor_trims_keeping_nothing_are_refused_or_said(method, gen):
    """Only a density (select_topk) of exactly 0 was refused: one whose kept count rounds to 0 in every
    tensor (1e-4 of a 40x24 task vector; DELLA drawing none) kept nothing, and the merge returned the
    base, said nowhere. It is refused now; where only some tensors keep nothing (a large model's tiny
    ones), those merge as the base's and a warning says how many. (mergekit's TIES keeps one entry at
    least: never nothing.)"""
    small = {"w": torch.randn(40, 24, generator=gen)}
    experts = [{"w": small["w"] + 0.1 * torch.randn(40, 24, generator=gen)} for _ in range(2)]
    if method == "ties mergekit":
        out = TRIMS[method](small, experts, 1e-4)
        assert not torch.equal(out["w"], small["w"])
        return
    with pytest.raises(ValueError, match=r"=0\.0001 keeps no entry of any of the 1 tensors the experts changed"):
        TRIMS[method](small, experts, 1e-4)
    # (a tensor every expert left as the base's has nothing to keep: still refused, the merge the base)
    unchanged = dict(small, v=torch.randn(8, generator=gen))
    with pytest.raises(ValueError, match="of any of the 1 tensors"):
        TRIMS[method](unchanged, [dict(e, v=unchanged["v"]) for e in experts], 1e-4)
    big = dict(small, big=torch.randn(1000, 100, generator=gen))
    experts = [dict(e, big=big["big"] + 0.1 * torch.randn(1000, 100, generator=gen)) for e in experts]
    with pytest.warns(UserWarning, match=r"keeps no entry of 1 of the 2 tensors the experts changed.*\['w'\]"):
        out = TRIMS[method](big, experts, 1e-4)
    assert torch.equal(out["w"], big["w"]) and not torch.equal(out["big"], big["big"])
    with warnings.catch_warnings():  # (a fraction that keeps some of every tensor: nothing said)
        warnings.simplefilter("error")
        TRIMS[method](big, experts, 0.1)


def test_dare_keeping_nothing_is_refused(gen):
    """DARE at a density whose draws keep no entry of any tensor returned the base, said nowhere. Its masks
    come from (seed, name, expert), not from ``gen``: at 1e-9 of a 40x24 task vector no draw keeps one."""
    base = {"w": torch.randn(40, 24, generator=gen)}
    experts = [{"w": base["w"] + 0.1 * torch.randn(40, 24, generator=gen)} for _ in range(2)]
    with pytest.raises(ValueError, match=r"density=1e-09 keeps no entry of any of the 1 tensors.*DARE's merge"):
        merge.dare(base, experts, density=1e-9, progress=False)
    assert not torch.equal(merge.dare(base, experts, density=0.1, progress=False)["w"], base["w"])


def test_ties_tensor_scope_by_hand():
    base, experts = hand_models()
    # k = 3 of 6 per expert in "w": thresholds 2, 2 and 1; entry 1 has trimmed values +2 and -2,
    # which cancel: no elected sign, the entry stays at the base
    out = merge.ties(base, experts, density=0.5, scope="tensor", merge="mean")
    torch.testing.assert_close(out["w"], T([2.0, 0.0, 0.0, 2.0, 0.0, 5.0]))
    # "v": k = 1 of 2; the third expert's task vector is all zeros and adds nothing
    torch.testing.assert_close(out["v"], T([1.5, -9.0]))
    out = merge.ties(base, experts, density=0.5, scope="tensor", merge="sum", scale=0.3)
    torch.testing.assert_close(out["w"], 0.3 * T([4.0, 0.0, 0.0, 4.0, 0.0, 5.0]))


def test_ties_global_scope_by_hand():
    base, experts = hand_models()
    # k = 4 of the 8 float entries per expert, over both tensors: thresholds 1, 2 and 0.1
    out = merge.ties(base, experts, density=0.5, scope="global")
    torch.testing.assert_close(out["w"], T([2.0, -1.5, -0.1, 2.0, 0.0, 5.0]))
    torch.testing.assert_close(out["v"], T([1.0, -9.0]))
    assert torch.equal(out["ids"], base["ids"])


def test_global_ties_counts_no_tensor_every_expert_left_as_the_base(gen):
    """A vision-only fine-tune of CLIP: its text tower is the base's in every expert, no part of
    any task vector. Global TIES counted those entries in the n of ``k = round(density * n)``,
    so each expert kept more of its vision tower than ``density`` (0.2 of the whole CLIP, about
    half of it the vision tower's), and the merge changed with a tower no expert trained. Now
    the whole CLIP merges as its vision tower alone, each expert keeping ``density`` of it."""
    from test_walker_models import build

    base = build("hf_clip").state_dict()
    vision = [name for name, t in base.items() if name.startswith(("vision_model.", "visual_projection."))
              and t.is_floating_point()]
    assert 0 < len(vision) < sum(t.is_floating_point() for t in base.values())
    experts = [{name: t + 0.1 * torch.randn(t.shape, generator=gen) if name in vision else t
                for name, t in base.items()} for _ in range(3)]
    whole = merge.ties(base, experts, density=0.2, progress=False)
    alone = merge.ties({n: base[n] for n in vision}, [{n: e[n] for n in vision} for e in experts],
                       density=0.2, progress=False)
    for name in vision:
        assert torch.equal(whole[name], alone[name]), name
    one = merge.ties(base, experts[:1], density=0.2, progress=False)  # (one expert: its trimmed task vector)
    kept = sum(int(torch.count_nonzero(one[n] - base[n])) for n in vision)
    assert kept == round(0.2 * sum(base[n].numel() for n in vision))


@pytest.mark.parametrize("density", [0.2, 0.9])  # (0.9: the k-th largest is a zero of a changed tensor)
def test_global_ties_reads_a_tensor_every_expert_left_as_the_base_once(density, gen):
    """The thresholds' second pass read again every tensor no expert changed (a vision-only fine-tune's
    text tower), whose zeros move no k-th largest: through a lazy checkpoint, its reads for nothing.
    It is read once now (the base's size aside), the thresholds those of the changed tensors alone."""
    base = {name: torch.randn(shape, generator=gen) for name, shape in
            (("text.w", (8, 6)), ("text.b", (6,)), ("vision.w", (8, 6)), ("vision.b", (6,)))}
    vision = ("vision.w", "vision.b")
    experts = [{name: t + 0.1 * torch.randn(t.shape, generator=gen) * (torch.rand(t.shape, generator=gen) < 0.5)
                if name in vision else t for name, t in base.items()} for _ in range(3)]
    counted_base, counted = Counted(base), [Counted(e) for e in experts]
    thresholds = merge._global_thresholds(counted_base, counted, lambda k: density)
    assert thresholds == merge._global_thresholds({n: base[n] for n in vision},
                                                  [{n: e[n] for n in vision} for e in experts], lambda k: density)
    assert (min(thresholds) == 0.0) == (density == 0.9), thresholds
    assert counted_base.reads == {"text.w": 2, "text.b": 2, "vision.w": 3, "vision.b": 3}
    assert [c.reads for c in counted] == [{"text.w": 1, "text.b": 1, "vision.w": 2, "vision.b": 2}] * 3


def test_ties_defaults_and_limits():
    base, experts = hand_models()
    # density 1 keeps everything: the disjoint mean of agreeing entries
    out = merge.ties(base, experts, density=1.0, scope="tensor")
    torch.testing.assert_close(out["w"][3], T(2.0))  # +2, +2, 0: zeros are not counted
    torch.testing.assert_close(out["w"][0], T(2.0))  # +3, -3, +1 -> sign +, mean of 3 and 1
    # density 0 keeps nothing: the base, refused (as DARE's)
    with pytest.raises(ValueError, match="density is 0 for every expert"):
        merge.ties(base, experts, density=0.0)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.37, 0.5, 1.0])
def test_kth_largest_matches_sort(gen, density):
    parts = [torch.randn(n, generator=gen).abs() for n in (17, 1, 300)]
    parts[2][::3] = 0.0  # ties at zero
    parts[0][:5] = parts[2][1]  # ties across tensors
    flat = torch.cat(parts)
    k = int(round(density * flat.numel()))
    got = _kth_largest(lambda: parts, flat.numel(), density)
    if k == 0:
        assert got is None
    else:
        assert got == float(torch.sort(flat, descending=True).values[k - 1])


def test_dare():
    base, experts = hand_models()
    full = merge.dare(base, experts, scale=0.3, density=1.0, seed=1)
    torch.testing.assert_close(full["w"], merge.task_arithmetic(base, experts, 0.3)["w"])
    a = merge.dare(base, experts, scale=1.0, density=0.5, seed=7)
    b = merge.dare(base, experts, scale=1.0, density=0.5, seed=7)
    assert torch.equal(a["w"], b["w"])
    # the mask of a tensor depends on its name and the seed only
    alone = merge.dare({"w": base["w"]}, [{"w": e["w"]} for e in experts], scale=1.0, density=0.5, seed=7)
    assert torch.equal(alone["w"], a["w"])


@pytest.mark.parametrize("method, params", [("dare", {}), ("della", dict(epsilon=0.2))])
def test_masks_of_tensors_whose_crc32_seeds_collide_differ(method, params, gen):
    """A mask's generator is seeded by 64 bits of (seed, name, expert): crc32's 32 bits seeded these
    two of DeepSeek-V3's expert tensors alike at seed 2 (of its ~1e5 tensors, the birthday bound
    pairs about one so), and the two drew one mask."""
    a, b = "model.layers.18.mlp.experts.62.up_proj.weight", "model.layers.33.mlp.experts.165.down_proj.weight"
    assert zlib.crc32(f"2/{a}/0".encode()) == zlib.crc32(f"2/{b}/0".encode())
    tau = torch.randn(8, 64, generator=gen)
    base, expert = {a: torch.zeros(8, 64), b: torch.zeros(8, 64)}, {a: tau, b: tau.clone()}

    def merged(names):
        return getattr(merge, method)({n: base[n] for n in names}, [{n: expert[n] for n in names}], scale=1.0,
                                      density=0.5, seed=2, **params)

    both = merged([a, b])
    assert not torch.equal(both[a] != 0, both[b] != 0)
    # reproducible, and a tensor's mask its own whatever else is merged
    assert all(torch.equal(merged([a, b])[n], both[n]) for n in (a, b))
    assert torch.equal(merged([b])[b], both[b])
    # the same seeds in every process (no salted hash)
    assert merge._generator(7, "w", 1).initial_seed() == 12239738543980185717


@pytest.mark.parametrize("method, params", [("dare", dict(density=0.5)), ("della", dict(density=0.5, epsilon=0.2))])
def test_random_masks_of_modules_are_those_of_their_checkpoints(method, params, tmp_path):
    """A transformers module whose tensors save_pretrained renames (ViT in transformers 5:
    ``layers.0.attention.q_proj`` saved as ``encoder.layer.0.attention.attention.query``) draws
    the masks ``epmq merge`` draws from its checkpoint: the same models, the same seed, the same
    merge either way (the module's names drew other masks)."""
    import transformers

    from epmq import merge_checkpoints
    from epmq.checkpoint_io import renamed, saved_key_renaming

    torch.manual_seed(0)
    base = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                        intermediate_size=64, image_size=16, patch_size=8))
    assert any(a != b for a, b in renamed(list(base.state_dict()), saved_key_renaming(base)).items())
    base.save_pretrained(tmp_path / "base")
    noise, experts = torch.Generator().manual_seed(1), []
    for k in range(2):
        expert = transformers.ViTModel(base.config)
        expert.load_state_dict({n: t + 0.1 * torch.randn(t.shape, generator=noise) for n, t in base.state_dict().items()})
        expert.save_pretrained(tmp_path / f"e{k}")
        experts.append(expert)
    want = getattr(merge, method)(base, experts, seed=3, **params)
    out = merge_checkpoints(method, [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out", base=tmp_path / "base",
                            params=dict(params, seed=3), progress=False)
    got = transformers.ViTModel.from_pretrained(out).state_dict()
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


def _moe_models():
    """Tiny transformers models whose save_pretrained splits or fuses tensors (transformers 5:
    Mixtral's and Qwen3-MoE's experts held fused [E, 2I, H], saved one matrix per expert; DINOv2's
    SwiGLU gate and up projections held apart, saved as one ``weights_in``) and a dense Llama."""
    import transformers

    attention = dict(num_hidden_layers=1, num_attention_heads=4)
    return {
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_key_value_heads=2, num_local_experts=2,
            **attention)),
        "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, head_dim=8, **attention)),
        "dinov2_swiglu": lambda: transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=32, image_size=16, patch_size=8, use_swiglu_ffn=True, mlp_ratio=2, **attention)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_key_value_heads=2, **attention)),
    }


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    """{family: (base, [expert, expert], directory with base/, e0/, e1/ saved)}."""
    made = {}
    for family, build in _moe_models().items():
        root = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        base = build()
        base.save_pretrained(root / "base")
        noise, experts = torch.Generator().manual_seed(1), []
        for k in range(2):
            expert = build()
            expert.load_state_dict({n: t + 0.1 * torch.randn(t.shape, generator=noise)
                                    for n, t in base.state_dict().items()})
            expert.save_pretrained(root / f"e{k}")
            experts.append(expert)
        made[family] = base, experts, root
    return made


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "dinov2_swiglu", "llama"])
@pytest.mark.parametrize("method, params", [
    ("tsv", {}), ("iso_c", {}), ("ties", dict(scope="tensor")), ("model_stock", dict(per_row=True)),
    ("breadcrumbs", {}), ("della", dict(seed=3)), ("sce", dict(select_topk=0.5)), ("multislerp", {}),
])
def test_modules_merge_as_their_checkpoints(saved_moe, family, method, params, tmp_path):
    """The tensors save_pretrained fuses or splits are merged as it saves them: TSV's and Iso-C's
    SVDs of each expert's matrix (a fused [E, 2I, H] is not 2-D: it took the plain mean task
    vector), TIES' and Breadcrumbs' ranks, Model Stock's cosines, DELLA's rows and masks, SCE's
    selection over each saved matrix, not over all experts fused; the same models merged as
    modules and from their checkpoints give the same weights, in the module's layout."""
    from epmq import merge_checkpoints

    base, experts, root = saved_moe[family]
    want = getattr(merge, method)(base, experts, **params)
    type(base)(base.config).load_state_dict(want)  # (the module's layout, loadable)
    out = merge_checkpoints(method, [root / "e0", root / "e1"], tmp_path / "out", base=root / "base",
                            params=params, progress=False)
    got = type(base).from_pretrained(out).state_dict()
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


def test_saved_layout_of_fused_experts(saved_moe):
    """Mixtral's fused experts map to the matrices its checkpoint holds; a dense Llama has none."""
    from epmq.checkpoint_io import saved_layout

    assert saved_layout(saved_moe["llama"][0]) is None
    base = saved_moe["mixtral"][0]
    layout = saved_layout(base)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    (pieces,) = [layout.pieces(layout.group(name))]
    fused = base.state_dict()[name]  # [E, 2I, H]: expert e's w1 (gate) then w3 (up)
    for saved, shape, [(source, where, at)] in pieces:
        e, w = int(saved.split(".experts.")[1].split(".")[0]), saved.split(".")[-2]
        half = fused.shape[1] // 2
        assert source == name and shape == (half, fused.shape[2])
        assert torch.equal(fused.reshape(-1)[at].view(shape), fused[e, :half] if w == "w1" else fused[e, half:])


class _LargestCPUTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes one CPU tensor made inside it holds (views counted by their storage)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def test_saved_layout_of_fused_experts_holds_no_index_of_their_entries():
    """Mixtral's fused experts (every MoE whose save_pretrained chunks and unbinds them) are
    mapped to their saved matrices without an index of their entries: one was made of every
    entry of the group (gate_up_proj [E, 2I, H]) with its copies, 8 bytes an entry at its peak,
    12.9 GB for each layer of Mixtral-8x22B, where the pieces are ranges of the fused tensor."""
    import transformers

    from epmq.checkpoint_io import saved_layout

    with torch.device("meta"):  # (shapes alone: no weight is read)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=64, hidden_size=256, intermediate_size=512, num_key_value_heads=2, num_local_experts=8,
            num_hidden_layers=1, num_attention_heads=4))
    layout = saved_layout(model)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with _LargestCPUTensor() as largest:
        pieces = layout.pieces(layout.group(name))
    assert largest.bytes < 8 * 512 * 256  # (not one piece's index, let alone the group's)
    half = 512 * 256
    assert {saved: (shape, sources) for saved, shape, sources in pieces} == {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight":
            ((512, 256), [(name, slice(None), slice((2 * e + j) * half, (2 * e + j + 1) * half))])
        for e in range(8) for j, w in enumerate(("w1", "w3"))}


def test_fused_experts_of_modules_are_merged_without_a_float32_copy_of_the_group():
    """A module's fused experts (gate_up_proj [E, 2I, H], merged as the matrices save_pretrained
    writes) were put back into one float32 tensor of the whole group, then cast to the stored
    dtype: twice a bf16 model's experts of a layer at once (6.4 GB for a Qwen3-235B layer's
    gate_up_proj). Each saved matrix's result is cast as it is put back: no tensor larger than
    the stored one, and the same values as the whole tensor merged in float32 and cast."""
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_key_value_heads=2, num_experts=64, num_experts_per_tok=2, head_dim=8,
                                         num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    base, *experts = (transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16) for _ in range(3))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    stored_bytes = base.state_dict()[name].numel() * 2  # (bf16)
    with _LargestCPUTensor() as largest:
        got = merge.task_arithmetic(base, experts, scale=0.3)
    assert got[name].dtype == torch.bfloat16
    assert largest.bytes <= stored_bytes, (largest.bytes, stored_bytes)
    # (plain state dicts carry no layout: merged whole, in float32, then cast)
    want = merge.task_arithmetic(dict(base.state_dict()), [dict(e.state_dict()) for e in experts], scale=0.3)
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


@pytest.mark.parametrize("family", ["mixtral", "dinov2_swiglu"])
def test_a_slerp_schedule_reads_the_names_the_checkpoint_merge_reads(saved_moe, family, tmp_path):
    """SLERP's ``t`` as a function of the tensor's name (a mergekit filter: the first whose
    name part the tensor's name holds) read the fused experts under their saved names but the
    other tensors under the module's (Mixtral's router ``model.layers.0.mlp.gate.weight``,
    saved as ``...block_sparse_moe.gate.weight``): one schedule, two namings in one model, and
    the module merge differed from its checkpoints' merge. Every tensor is named as saved."""
    from epmq import merge_checkpoints

    _, (a, b), root = saved_moe[family]
    seen = []

    def t(name):  # (a filter on the saved names; the module's own differ in the renamed parts)
        seen.append(name)
        return 0.2 if any(part in name for part in ("block_sparse_moe", "encoder.layer.")) else 0.8

    want = merge.slerp(a, b, t=t)
    module_names = set(seen)
    seen.clear()
    out = merge_checkpoints("slerp", [root / "e0", root / "e1"], tmp_path / "out", params={"t": t}, progress=False)
    assert module_names == set(seen)
    got = type(a).from_pretrained(out).state_dict()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


def test_unmappable_saved_layout_warns(saved_moe, monkeypatch):
    """Where the saved tensors are not the module's entries each once (a converter that pads or
    dequantizes), the module's tensors are merged as it holds them, said with a warning."""
    from epmq import checkpoint_io

    base, experts, _ = saved_moe["mixtral"]
    monkeypatch.setattr(checkpoint_io.SavedLayout, "pieces", lambda self, names: None)
    with pytest.warns(UserWarning, match="cannot map"):
        merged = merge.tsv(base, experts)
    type(base)(base.config).load_state_dict(merged)


def test_dare_rescales_kept_entries(gen):
    base = {"w": torch.zeros(4000)}
    tau = torch.randn(4000, generator=gen)
    out = merge.dare(base, [{"w": tau}], scale=1.0, density=0.25, seed=3)["w"]
    kept = out != 0
    assert 0.2 < kept.float().mean() < 0.3
    torch.testing.assert_close(out[kept], tau[kept] / 0.25)


def test_modules_are_accepted():
    torch.manual_seed(0)
    base, e1, e2 = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
    out = merge.task_arithmetic(base, [e1, e2], scale=0.5)
    expected = base.weight + 0.5 * (e1.weight + e2.weight - 2 * base.weight)
    torch.testing.assert_close(out["weight"], expected.detach())
    assert out["weight"].dtype == base.weight.dtype


def test_dtype_kept():
    base = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = merge.ties(base, [{"w": torch.full((3,), 2.0, dtype=torch.bfloat16)}], density=1.0)
    assert out["w"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "experts, match",
    [
        ([], "empty"),
        ([{"w": torch.zeros(6), "v": torch.zeros(2)}], "missing tensors \\['ids'\\]"),
        ([{"w": torch.zeros(5), "v": torch.zeros(2), "ids": T([0, 0, 0])}], "tensor 'w': expert 0 has shape \\(5,\\)"),
        ([{"w": torch.full((6,), float("nan")), "v": torch.zeros(2), "ids": T([0, 0, 0])}], "tensor 'w' of expert 0 has non-finite"),
        ([{"w": torch.zeros(6), "v": torch.zeros(2), "ids": T([0, 0, 0]), "x": torch.zeros(1)}], "unexpected tensors \\['x'\\]"),
    ],
)
def test_bad_inputs(experts, match):
    base, _ = hand_models()
    for fn in (merge.task_arithmetic, merge.ties, merge.dare):
        with pytest.raises(ValueError, match=match):
            fn(base, experts)


def test_bad_parameters():
    base, experts = hand_models()
    with pytest.raises(ValueError, match="density"):
        merge.ties(base, experts, density=1.5)
    with pytest.raises(ValueError, match="scope"):
        merge.ties(base, experts, scope="layer")
    with pytest.raises(ValueError, match="merge"):
        merge.ties(base, experts, merge="median")
    with pytest.raises(ValueError, match="non-finite"):
        merge.task_arithmetic({**base, "w": torch.full((6,), float("inf"))}, experts)
    with pytest.raises(TypeError, match="list of state dicts"):
        merge.average(experts[0])
    nan = float("nan")
    for call, match in [
        (lambda: merge.dare(base, experts, merge="mean", weights=[1.0, -1.0, 0.0]), "sum to 0"),
        (lambda: merge.task_arithmetic(base, experts, weights=[nan, 1.0, 1.0]), "each weight must be a finite"),
        (lambda: merge.average(experts, weights=[nan, 1.0, 1.0]), "each weight must be a finite"),
        (lambda: merge.average(experts, weights=[1.0, -1.0, 0.0]), "sum to 0"),
        (lambda: merge.task_arithmetic(base, experts, weights=[1.0, 1.0]), "one number per expert"),
        (lambda: merge.task_arithmetic(base, experts, scale=float("inf")), "scale must be a finite"),
        (lambda: merge.task_arithmetic(base, experts, scale="0.3"), "scale must be a finite"),
        (lambda: merge.ties(base, experts, density="0.2"), "density must be a finite"),
        (lambda: merge.dare(base, experts, seed="1"), "seed must be an int"),
        (lambda: merge.della(base, experts, seed=2 ** 64), "seed must be an integer from"),
        (lambda: merge.slerp(experts[0], experts[1], t=[0.0, 1.0]), "t .* must be a finite"),
        (lambda: merge.task_arithmetic(base, [experts[0], {**experts[1], "w": experts[1]["w"].to(torch.int8)},
                                              experts[2]]), "expert 1 is torch.int8"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    # (numpy's integers are seeds as the quantizers' are: the same masks as the int's)
    import numpy as np

    for method in (merge.dare, merge.della):
        same = method(base, experts, seed=np.int64(3)), method(base, experts, seed=3)
        assert all(torch.equal(same[0][k], same[1][k]) for k in same[1])


def test_regmean_checks_its_gram_matrices():
    experts = [{"lin.weight": torch.randn(2, 3), "lin.bias": torch.zeros(2)} for _ in range(2)]
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="grams or transposed name tensors the experts do not have: \\['lin'\\]"):
        merge.regmean(experts, {"lin": [eye, eye]})
    with pytest.raises(ValueError, match="not symmetric|negative diagonal"):
        merge.regmean(experts, {"lin.weight": [torch.randn(3, 3) + 5 * torch.triu(torch.ones(3, 3)), eye]})
    with pytest.raises(ValueError, match="negative diagonal"):
        merge.regmean(experts, {"lin.weight": [-eye, eye]})



# --------------------------------------------------------------------------- DARE-TIES, Breadcrumbs, DELLA


def _dare_survivors(base, experts, name, density, seed):
    """DARE's rescaled survivors of each expert's task vector, masks drawn as documented."""
    out = []
    for k, e in enumerate(experts):
        keep = torch.rand(base[name].shape, generator=merge._generator(seed, name, k)) < density
        out.append(torch.where(keep, e[name] - base[name], 0.0) / density)
    return torch.stack(out)


def test_dare_with_sign_consensus(gen):
    base = {"w": torch.randn(3, 50, generator=gen)}
    experts = [{"w": base["w"] + torch.randn(3, 50, generator=gen)} for _ in range(3)]
    # density 1 drops nothing: DARE-TIES is TIES keeping every entry
    for how in ("sum", "mean"):
        got = merge.dare(base, experts, scale=0.5, density=1.0, consensus="sign", merge=how)
        want = merge.ties(base, experts, scale=0.5, density=1.0, scope="tensor", merge=how)
        torch.testing.assert_close(got["w"], want["w"])
    # a real drop: the sign vote runs on the rescaled survivors of DARE's own masks
    T_ = _dare_survivors(base, experts, "w", 0.4, seed=4)
    sign = torch.sign(T_.sum(0))
    agree = (torch.sign(T_) == sign) & (T_ != 0)
    voted = torch.where(agree, T_, 0.0).sum(0)
    got = merge.dare(base, experts, scale=0.7, density=0.4, seed=4, consensus="sign")
    torch.testing.assert_close(got["w"], base["w"] + 0.7 * voted)
    got = merge.dare(base, experts, scale=0.7, density=0.4, seed=4, consensus="sign", merge="mean")
    torch.testing.assert_close(got["w"], base["w"] + 0.7 * voted / agree.sum(0).clamp(min=1))
    plain = merge.dare(base, experts, scale=0.7, density=0.4, seed=4)
    torch.testing.assert_close(plain["w"], base["w"] + 0.7 * T_.sum(0))
    assert (agree.sum(0) < 3).any()  # the vote did drop disagreeing survivors


def test_breadcrumbs_by_hand():
    base = {"w": torch.zeros(10)}
    tau = T([10.0, -9.0, 1.0, -2.0, 3.0, 0.5, -4.0, 5.0, 0.1, 6.0])
    # gamma 0.1 drops the largest (10), density 0.5 keeps the next five: 9, 6, 5, 4, 3
    out = merge.breadcrumbs(base, [{"w": tau}], scale=1.0, density=0.5, gamma=0.1)["w"]
    torch.testing.assert_close(out, T([0.0, -9.0, 0, 0, 3.0, 0, -4.0, 5.0, 0, 6.0]))
    # gamma 0: TIES's magnitude trim, without the vote (one expert: no vote to lose)
    out = merge.breadcrumbs(base, [{"w": tau}], scale=1.0, density=0.3, gamma=0.0)["w"]
    torch.testing.assert_close(out, merge.ties(base, [{"w": tau}], density=0.3, scope="tensor")["w"])
    # gamma + density > 1: fewer outliers go (density 0.95 keeps 10 of 10 rounded: none go)
    out = merge.breadcrumbs(base, [{"w": tau}], scale=1.0, density=0.95, gamma=0.2)["w"]
    torch.testing.assert_close(out, tau)
    # a tie with a kept boundary entry is kept: 5 = 5 at the lower boundary
    tied = tau.clone()
    tied[2] = 3.0
    out = merge.breadcrumbs(base, [{"w": tied}], scale=1.0, density=0.5, gamma=0.1)["w"]
    assert out[2] == 3.0 and out[4] == 3.0 and out[0] == 0.0


def test_mergekit_convention_by_hand():
    """``convention="mergekit"`` (what epmq.mergekit_config runs): entry counts truncated (TIES
    at least 1), ties at a boundary broken by sort order, + elected where the votes cancel, and
    Model Stock's t unclamped."""
    base = {"w": torch.zeros(10)}
    tau = T([10.0, -9.0, 1.0, -2.0, 3.0, 0.5, -4.0, 5.0, 0.1, 6.0])
    # density 0.35 of 10: 3 kept (round gives 4: 10, 9, 6, 5)
    out = merge.ties(base, [{"w": tau}], density=0.35, scope="tensor", convention="mergekit")["w"]
    torch.testing.assert_close(out, T([10.0, -9.0, 0, 0, 0, 0, 0, 0, 0, 6.0]))
    out = merge.ties(base, [{"w": tau}], density=0.01, scope="tensor", convention="mergekit")["w"]
    assert int((out != 0).sum()) == 1 and out[0] == 10.0  # (at least one)
    # Breadcrumbs: gamma 0.15 drops floor(1.5) = 1 outlier (round: 2), density 0.45 keeps 4
    out = merge.breadcrumbs(base, [{"w": tau}], scale=1.0, density=0.45, gamma=0.15, convention="mergekit")["w"]
    torch.testing.assert_close(out, T([0.0, -9.0, 0, 0, 0, 0, -4.0, 5.0, 0, 6.0]))
    # TIES's vote: +2 and -2 cancel; mergekit elects +, epmq none
    cancel = [{"w": T([2.0, 1.0])}, {"w": T([-2.0, 1.0])}]
    zero = {"w": torch.zeros(2)}
    ours = merge.ties(zero, cancel, density=1.0, scope="tensor")["w"]
    theirs = merge.ties(zero, cancel, density=1.0, scope="tensor", convention="mergekit")["w"]
    torch.testing.assert_close(ours, T([0.0, 1.0]))
    torch.testing.assert_close(theirs, T([2.0, 1.0]))
    # Model Stock: task vectors at cos -0.8 (two experts): t = 2 cos / (1 + cos) = -8, clamped to -1
    W0 = {"w": torch.zeros(2)}
    apart = [{"w": T([1.0, 0.0])}, {"w": T([-0.8, 0.6])}]
    mean = T([0.1, 0.3])
    torch.testing.assert_close(merge.model_stock(W0, apart)["w"], -1.0 * mean)
    torch.testing.assert_close(merge.model_stock(W0, apart, convention="mergekit")["w"], -8.0 * mean)
    # a density per expert: each trimmed by its own (here the second expert keeps everything)
    two = [{"w": tau}, {"w": T([1.0] * 10)}]
    for convention in ("epmq", "mergekit"):
        each = merge.breadcrumbs(base, two, scale=1.0, density=[0.45, 1.0], gamma=[0.15, 0.0], convention=convention)
        alone = merge.breadcrumbs(base, two[:1], scale=1.0, density=0.45, gamma=0.15, convention=convention)
        torch.testing.assert_close(each["w"], alone["w"] + 1.0)
        each = merge.ties(base, two, scale=1.0, density=[0.35, 1.0], scope="tensor", merge="sum",
                          convention=convention)["w"]
        alone = merge.ties(base, two[:1], scale=1.0, density=0.35, scope="tensor", merge="sum",
                           convention=convention)["w"]
        torch.testing.assert_close(each, torch.where(alone > 0, alone + 1.0, torch.where(alone < 0, alone, 1.0)))
    glob = merge.ties(base, two, density=[0.35, 1.0], scope="global", merge="sum")["w"]
    torch.testing.assert_close(glob, merge.ties(base, two, density=[0.35, 1.0], scope="tensor", merge="sum")["w"])
    with pytest.raises(ValueError, match="density has 3 values for 2 experts"):
        merge.ties(base, two, density=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="convention='mergekit' trims each tensor: scope='tensor'"):
        merge.ties(base, [{"w": tau}], density=0.5, convention="mergekit")
    with pytest.raises(ValueError, match="convention"):
        merge.model_stock(W0, apart, convention="peer")


def test_dare_rescalings_and_a_density_per_expert(gen):
    """DARE's kept entries scaled by 1 / density (the paper), to keep each tensor's L1 norm
    (mergekit's), or not at all; a density per expert; density 1 keeps the task vector."""
    base = {"w": torch.zeros(400)}
    tau = torch.randn(400, generator=gen)
    experts = [{"w": tau}, {"w": 2 * tau}]
    out = {r: merge.dare(base, experts[:1], scale=1.0, density=0.5, rescale=r)["w"] for r in ("density", "l1", None)}
    kept = out[None] != 0
    assert 120 < int(kept.sum()) < 280 and torch.equal(out[None][kept], tau[kept])
    torch.testing.assert_close(out["density"], 2 * out[None])
    torch.testing.assert_close(out["l1"].abs().sum(), tau.abs().sum())
    torch.testing.assert_close(out["l1"], out[None] * tau.abs().sum() / out[None].abs().sum())
    each = merge.dare(base, experts, scale=1.0, density=[0.5, 1.0], rescale=None)["w"]
    torch.testing.assert_close(each, out[None] + 2 * tau)
    with pytest.raises(ValueError, match="rescale must be one of"):
        merge.dare(base, experts, rescale="l2")


def test_breadcrumbs_sign_consensus_and_scale():
    base, experts = hand_models()
    out = merge.breadcrumbs(base, experts, scale=0.5, density=1.0, gamma=0.0, consensus="sign")
    want = merge.ties(base, experts, scale=0.5, density=1.0, scope="tensor", merge="sum")
    torch.testing.assert_close(out["w"], want["w"])
    out = merge.breadcrumbs(base, experts, scale=0.3, density=1.0, gamma=0.0)
    torch.testing.assert_close(out["w"], merge.task_arithmetic(base, experts, 0.3)["w"])


def test_della_keep_probabilities_follow_magnitude_rank(gen):
    n = 2001
    # two rows with magnitudes increasing (row 0) and decreasing (row 1) along the row
    mags = torch.linspace(1.0, 2.0, n)
    tau = torch.stack([mags, -mags.flip(0)])
    base = {"w": torch.zeros(2, n)}
    density, epsilon = 0.5, 0.3
    out = merge.della(base, [{"w": tau}], scale=1.0, density=density, epsilon=epsilon, seed=2)["w"]
    rank = torch.arange(n, dtype=torch.float32)
    p = density + epsilon * (2 * rank / (n - 1) - 1)
    p = torch.stack([p, p.flip(0)])
    kept = out != 0
    # a kept entry is divided by its own keep probability
    torch.testing.assert_close(out[kept], (tau / p)[kept])
    # the smallest fifth of each row survives at ~0.26, the largest at ~0.74
    low = torch.cat([kept[0, : n // 5], kept[1, -(n // 5):]]).float().mean()
    high = torch.cat([kept[0, -(n // 5):], kept[1, : n // 5]]).float().mean()
    assert 0.2 < low < 0.32 and 0.68 < high < 0.8
    # reproducible, and a mask depends only on (seed, name, expert)
    again = merge.della(base, [{"w": tau}], scale=1.0, density=density, epsilon=epsilon, seed=2)
    assert torch.equal(again["w"], out)


def test_della_is_unbiased_and_votes(gen):
    base = {"w": torch.zeros(1, 20000)}
    tau = torch.randn(1, 20000, generator=gen)
    out = merge.della(base, [{"w": tau}], scale=1.0, density=0.4, epsilon=0.2, seed=9)["w"]
    # E[out] = tau entrywise, so the sum of out * sign(tau) estimates |tau|_1 (to ~2%)
    assert abs(float((out * tau.sign()).sum() / tau.abs().sum()) - 1) < 0.03
    # epsilon 0, consensus None, merge sum: DARE with density's drop rate
    lin = merge.della(base, [{"w": tau}], scale=1.0, density=0.4, epsilon=0.0, consensus=None,
                      merge="sum", seed=9)["w"]
    kept = lin != 0
    torch.testing.assert_close(lin[kept], tau[kept] / 0.4)
    # consensus over experts: entries of the minority sign are not merged
    experts = [{"w": tau}, {"w": tau}, {"w": -tau}]
    voted = merge.della(base, experts, scale=1.0, density=0.99, epsilon=0.0, seed=1)["w"]
    agree_fraction = float(((voted * tau) >= 0).float().mean())
    assert agree_fraction > 0.99


def test_della_in_mergekits_convention(gen):
    """mergekit's DELLA: kept entries scaled to the tensor's L1 norm (rescale="l1"), density and
    epsilon per expert, density 1 keeping everything whatever epsilon, its sign vote."""
    base = {"w": torch.zeros(3, 4000), "b": torch.zeros(4000)}
    taus = [{name: torch.randn(t.shape, generator=gen) for name, t in base.items()} for _ in range(2)]
    for name in base:
        alone = merge.della(base, taus[:1], scale=1.0, density=0.5, epsilon=0.2, consensus=None,
                            merge="sum", rescale="l1", seed=3)[name]
        tau = taus[0][name]
        kept = alone != 0
        ratio = alone[kept] / tau[kept]  # one factor for the whole tensor
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
        torch.testing.assert_close(alone.abs().sum(), tau.abs().sum())
        assert 0.45 < float(kept.float().mean()) < 0.55
    # per expert (disjoint rows, as MagPrune ranks within a row): epsilon 0 keeps at density's
    # rate whatever the rank, 0.3 keeps the row's larger half at ~0.65
    tau = torch.randn(2, 20000, generator=gen)
    own = [{"w": tau * torch.tensor([[1.0], [0.0]])}, {"w": tau * torch.tensor([[0.0], [1.0]])}]
    out = merge.della({"w": torch.zeros(2, 20000)}, own, scale=1.0, density=[0.5, 0.5], epsilon=[0.0, 0.3],
                      consensus=None, merge="sum", rescale=None, seed=4)["w"]
    big = tau.abs() > tau.abs().median(dim=1, keepdim=True).values
    rates = [float((out[r] != 0)[big[r]].float().mean()) for r in range(2)]
    assert abs(rates[0] - 0.5) < 0.02 and abs(rates[1] - 0.65) < 0.02, rates
    # density 1: nothing drawn, whatever epsilon: TIES's vote and disjoint mean untrimmed
    full = merge.della(base, taus, scale=0.7, density=1.0, epsilon=0.15, convention="mergekit")
    ties = merge.ties(base, taus, scale=0.7, density=1.0, scope="tensor", merge="mean", convention="mergekit")
    assert all(torch.equal(full[name], ties[name]) for name in base)
    with pytest.raises(ValueError, match="epsilon=0.3 for expert 1"):
        merge.della(base, taus, density=0.8, epsilon=[0.1, 0.3])
    with pytest.raises(ValueError, match="rescale"):
        merge.della(base, taus, rescale="l2")


def test_della_mergekit_ranks_along_dimension_1_and_its_limits():
    """From a review: mergekit ranks a convolution's entries along dimension 1 (each kernel
    position's input channels), refuses density + epsilon = 1, and drops a task vector at
    density 0; its weighted mean divides by 1 where the agreeing weights sum to 0."""
    tau = torch.arange(1.0, 25.0).reshape(2, 3, 4)  # magnitudes grow along every dimension
    base = {"w": torch.zeros_like(tau)}
    real_rand = torch.rand
    try:  # every draw 0: every entry kept, divided by its keep probability
        torch.rand = lambda *a, **k: torch.zeros(a[0], dtype=k.get("dtype"))
        out = merge.della(base, [{"w": tau}], density=0.5, epsilon=0.3, rescale="probability",
                          consensus=None, merge="sum", convention="mergekit")["w"]
        own = merge.della(base, [{"w": tau}], density=0.5, epsilon=0.3, rescale="probability",
                          consensus=None, merge="sum")["w"]
    finally:
        torch.rand = real_rand
    p = (tau / out)
    torch.testing.assert_close(p, torch.tensor([0.2, 0.5, 0.8])[None, :, None].expand(2, 3, 4))
    # epmq's own: ranks over each output row's 12 entries, as before mergekit's convention existed
    torch.testing.assert_close(tau / own, (0.2 + 0.6 * torch.arange(12.0) / 11).expand(2, 12).reshape(2, 3, 4))
    with pytest.raises(ValueError, match=r"density \+ epsilon < 1 \(as mergekit\)"):
        merge.della(base, [{"w": tau}], density=0.7, epsilon=0.3, convention="mergekit")
    merge.della(base, [{"w": tau}], density=0.7, epsilon=0.3)  # (epmq's own: keep probability 1)
    dropped = merge.della(base, [{"w": tau}, {"w": 2 * tau}], density=[0.0, 1.0], convention="mergekit")
    torch.testing.assert_close(dropped["w"], 2 * tau)  # (the disjoint mean of the one kept)
    # weights 1 and -1 on opposite task vectors: both agree everywhere, with weights summing to 0
    t = torch.tensor([[1.0, 2.0, -1.0]])
    taus = [{"w": t}, {"w": -t}]
    for fn in (lambda **kw: merge.ties({"w": torch.zeros(1, 3)}, taus, density=1.0, scope="tensor", **kw),
               lambda **kw: merge.della({"w": torch.zeros(1, 3)}, taus, density=1.0, **kw)):
        mk = fn(weights=[1.0, -1.0], merge="mean", convention="mergekit")["w"]
        torch.testing.assert_close(mk, 2 * t)  # (mergekit's: the agreeing entries' sum)
        assert torch.equal(fn(weights=[1.0, -1.0], merge="mean")["w"], torch.zeros(1, 3))


def test_sce_by_its_definition(gen):
    """SCE on hand-checkable task vectors: the selection by variance, the weights by mean square
    of what was selected, the sign's erasure, the weighted mean of the agreeing entries."""
    base = {"w": torch.zeros(2, 3), "n": torch.zeros(4)}
    taus = [{"w": torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 1.0]]), "n": torch.tensor([1.0, 1.0, 1.0, 1.0])},
            {"w": torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]]), "n": torch.tensor([1.0, 1.0, 1.0, 1.0])}]
    out = merge.sce(base, taus)
    # no selection: energies 15.25/6 and 10.25/6, weights 15.25/25.5 and 10.25/25.5
    w = torch.tensor([15.25, 10.25]) / 25.5
    t = torch.stack([x["w"] for x in taus])
    agree = t.sign() == torch.where(t.sum(0) >= 0, 1.0, -1.0)
    want = (t * w[:, None, None] * agree).sum(0) / (w[:, None, None] * agree).sum(0).clamp(min=1e-6)
    torch.testing.assert_close(out["w"], want)
    assert out["w"][0, 1] == 2.0 and out["w"][0, 2] == 3.0  # (the sum 0 elects +; -2 and -1 erased)
    torch.testing.assert_close(out["n"], torch.ones(4))  # (equal experts: their common vector)
    # selection: the entries of largest variance only, int(0.7 * 3) = 2 of the 3 with nonzero
    # variance (4, 4 and 0.25)
    selected = merge.sce(base, taus, select_topk=0.7)["w"]
    assert int((t.var(dim=0, unbiased=False) != 0).sum()) == 3
    kept = (selected != 0)
    assert kept.sum() == 2 and bool(kept[0, 1]) and bool(kept[0, 2])
    assert torch.equal(merge.sce(base, taus, select_topk=0.7)["n"], torch.zeros(4))  # (no variance)
    with pytest.raises(ValueError, match="select_topk"):
        merge.sce(base, taus, select_topk=1.5)
    # made one task vector at a time, mergekit's steps on the K stacked (float64; odd shape, an expert equal
    # to the base, entries every expert changed alike: no variance)
    W_0 = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    alike = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    experts = [W_0 + torch.where(torch.rand(5, 7, generator=gen) < 0.3, alike,
                                 torch.randn(5, 7, dtype=torch.float64, generator=gen)) for _ in range(3)] + [W_0]
    for select_topk in (1.0, 0.6):
        t = torch.stack([W - W_0 for W in experts])
        if select_topk < 1:
            variance = t.var(dim=0, unbiased=False)
            selected = torch.zeros(35, dtype=torch.float64)
            selected[variance.view(-1).topk(int(torch.count_nonzero(variance) * select_topk)).indices] = 1
            t = t * selected.view(5, 7)
        agree = t.sign() == torch.where(t.sum(0) >= 0, 1.0, -1.0)
        energy = t.square().mean(dim=(1, 2))
        w = (energy / energy.sum())[:, None, None] * agree
        want = W_0 + (t * w).sum(0) / w.sum(0).clamp(min=1e-6)
        got = merge.sce({"w": W_0}, [{"w": W} for W in experts], select_topk=select_topk)["w"]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs the base"):
        merge.sce(None, taus)


def test_sce_selection_of_one_expert_is_refused(gen):
    """SCE selects the entries whose task vectors vary most across the experts: one expert's
    vary nowhere, nothing was selected, and the merge returned the base, said nowhere. Without
    selection one expert is its own merge."""
    W_0 = torch.randn(4, 5, generator=gen)
    expert = {"w": W_0 + torch.randn(4, 5, generator=gen)}
    with pytest.raises(ValueError, match=r"select_topk < 1 .* two experts or more, got 1"):
        merge.sce({"w": W_0}, [expert], select_topk=0.5)
    torch.testing.assert_close(merge.sce({"w": W_0}, [expert])["w"], expert["w"])


def test_nuslerp_by_its_geometry(gen):
    """NuSLERP: t = w_1 / (w_0 + w_1); on the great circle between the two (unnormalized)
    vectors, so orthogonal vectors of one length keep it; linear where they are parallel; of
    task vectors with a base; per row (last dimension) or per column (row_wise)."""
    e = torch.eye(4)
    a, b = {"w": 2 * e[0:1]}, {"w": 2 * e[1:2]}
    half = merge.nuslerp(None, [a, b])["w"]  # (weights 1 and 1: t = 0.5)
    torch.testing.assert_close(half, 2 ** 0.5 * (e[0:1] + e[1:2]))
    assert float(half.norm()) == pytest.approx(2.0)
    torch.testing.assert_close(merge.nuslerp(None, [a, b], weights=[0.0, 2.0])["w"], b["w"])
    assert torch.equal(merge.nuslerp(None, [a, b], weights=None)["w"], half)  # (as the other merges: equal)
    parallel = merge.nuslerp(None, [a, {"w": 6 * e[0:1]}], weights=[1.0, 3.0])["w"]
    torch.testing.assert_close(parallel, 5 * e[0:1])  # (linear: 0.25 * 2 + 0.75 * 6)
    base = {"w": torch.full((1, 4), 7.0)}
    shifted = merge.nuslerp(base, [{"w": a["w"] + 7}, {"w": b["w"] + 7}])["w"]
    torch.testing.assert_close(shifted, 7 + half)
    # rows: each row on its own circle; columns with row_wise
    A, B = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    rows = merge.nuslerp(None, [{"w": A}, {"w": B}], flatten=False)["w"]
    cols = merge.nuslerp(None, [{"w": A}, {"w": B}], flatten=False, row_wise=True)["w"]
    for r in range(3):
        torch.testing.assert_close(rows[r], merge.nuslerp(None, [{"w": A[r]}, {"w": B[r]}])["w"])
    for c in range(5):
        torch.testing.assert_close(cols[:, c], merge.nuslerp(None, [{"w": A[:, c]}, {"w": B[:, c]}])["w"])
    with pytest.raises(ValueError, match="two experts"):
        merge.nuslerp(None, [a, b, a])


def test_nuslerp_and_nearswap_refuse_parameters_out_of_their_range():
    """NuSLERP's weights summing to 0 took t = 0.5 (mergekit's fallback: weights 1 and -1 gave
    the midpoint), a negative one put t past [0, 1] (on the arc beyond an expert, a model that is
    neither); NearSwap's t = 0 returned the base. Each is an error naming the parameter."""
    e = torch.eye(4)
    a, b = {"w": 2 * e[0:1]}, {"w": 2 * e[1:2]}
    for weights in ([1.0, -1.0], [0.0, 0.0], [1e-7, 0.0]):
        with pytest.raises(ValueError, match=r"nuslerp's weights .* sum to .*: t = w_1 / \(w_0 \+ w_1\)"):
            merge.nuslerp(None, [a, b], weights=weights)
    for weights in ([-0.5, 1.5], [2.0, -1.0]):
        with pytest.raises(ValueError, match=r"nuslerp's weights must be >= 0 .* in \[0, 1\]"):
            merge.nuslerp({"w": torch.zeros(1, 4)}, [a, b], weights=weights)
    torch.testing.assert_close(merge.nuslerp(None, [a, b], weights=[3.0, 0.0])["w"], a["w"])
    for t in (0.0, -1e-3):
        with pytest.raises(ValueError, match=r"nearswap's t must be > 0"):
            merge.nearswap({"w": torch.zeros(4)}, [{"w": torch.ones(4)}], t=t)


def test_multislerp_by_its_geometry():
    """Multi-SLERP: the midpoint of two orthogonal vectors of one length on their circle;
    vectors of one direction give it with the weighted mean length; one expert as it is;
    opposite vectors that balance: two averaged linearly, more refused."""
    e = torch.eye(3)
    a, b, c = ({"w": 2 * e[i]} for i in range(3))
    torch.testing.assert_close(merge.multislerp(None, [a, b])["w"], 2 ** 0.5 * (e[0] + e[1]))
    same = merge.multislerp(None, [{"w": e[0]}, {"w": 3 * e[0]}], weights=[1.0, 3.0])["w"]
    torch.testing.assert_close(same, 2.5 * e[0])  # (lengths 1 and 3, weights 1/4 and 3/4)
    base = {"w": torch.full((3,), 5.0)}
    torch.testing.assert_close(merge.multislerp(base, [{"w": a["w"] + 5}, {"w": b["w"] + 5}])["w"],
                               5 + 2 ** 0.5 * (e[0] + e[1]))
    assert torch.equal(merge.multislerp(base, [a])["w"], a["w"])
    three = merge.multislerp(None, [a, b, c])["w"]  # (symmetric: along the diagonal, length 2)
    torch.testing.assert_close(three, 2 * torch.ones(3) / 3 ** 0.5)
    torch.testing.assert_close(merge.multislerp(None, [a, {"w": -a["w"]}])["w"], torch.zeros(3))
    with pytest.raises(ValueError, match="weighted mean of the experts' directions is 0 at 'w'"):
        merge.multislerp(None, [a, {"w": -a["w"]}, {"w": e[1]}], weights=[1.0, 1.0, 0.0])
    # a tensor no expert changed keeps the base (mergekit 0.1.5 raises there)
    assert torch.equal(merge.multislerp(base, [base, base, base])["w"], base["w"])


def test_multislerp_with_eps_0_of_an_expert_equal_to_the_base(gen):
    """Multi-SLERP with eps=0 of task vectors one of which is 0 (an expert equal to the base, a frozen
    layer) divided it by its norm 0, and of a tensor no expert changed divided their mean by its norm
    0: the tensor NaN, refused as 'not finite ... its values pass the dtype's range'; a zero vector
    has no direction (its unit vector 0, as at eps > 0), and a tensor no expert changed keeps the base."""
    base = {"w": torch.randn(3, 4, generator=gen)}
    experts = [{"w": base["w"] + torch.randn(3, 4, generator=gen)} for _ in range(2)] + [{"w": base["w"].clone()}]
    torch.testing.assert_close(merge.multislerp(base, experts, eps=0.0)["w"], merge.multislerp(base, experts)["w"])
    assert torch.equal(merge.multislerp(base, [base, base, base], eps=0.0)["w"], base["w"])


def test_multislerp_is_mergekits_steps_on_the_stacked_vectors(gen):
    """Multi-SLERP made from the norms and the weighted sum of the unit vectors, one task vector at a
    time, is mergekit's steps on all K stacked (the tangent step from the mean included), in float64:
    odd shapes, an expert equal to the base, weights."""
    base = {"w": torch.randn(5, 3, 2, dtype=torch.float64, generator=gen),
            "b": torch.randn(7, dtype=torch.float64, generator=gen)}
    experts = [{n: W + torch.randn(W.shape, dtype=W.dtype, generator=gen) for n, W in base.items()} for _ in range(3)]
    experts.append({n: W.clone() for n, W in base.items()})
    weights = [1.0, 0.5, 2.0, 1.5]
    got = merge.multislerp(base, experts, weights=weights)
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for n, W_0 in base.items():
        flat = torch.stack([e[n] - W_0 for e in experts]).reshape(len(experts), -1)
        norms = flat.norm(dim=1, keepdim=True)
        unit = flat / (norms + 1e-8)
        mean = (unit * w.view(-1, 1)).sum(0)
        mean = mean / mean.norm()
        g = ((unit - (unit @ mean).view(-1, 1) * mean) * w.view(-1, 1)).sum(0)
        g_norm = g.norm() + 1e-8
        want = (mean * torch.cos(g_norm) + g * torch.sin(g_norm) / g_norm) * (norms.squeeze(1) * w).sum()
        torch.testing.assert_close(got[n], W_0 + want.view(W_0.shape), rtol=1e-12, atol=1e-12)


def test_karcher_by_its_geometry():
    """Karcher mean: two orthogonal vectors of one length meet at their midpoint on the circle;
    three symmetric ones on the diagonal; a zero model has no direction but counts in the
    length; equal models give themselves."""
    e = torch.eye(3)
    a, b, c = ({"w": 2 * e[i]} for i in range(3))
    torch.testing.assert_close(merge.karcher([a, b])["w"], 2 ** 0.5 * (e[0] + e[1]))
    torch.testing.assert_close(merge.karcher([a, b, c], max_iter=50, tol=1e-9)["w"], 2 * torch.ones(3) / 3 ** 0.5)
    torch.testing.assert_close(merge.karcher([a, {"w": torch.zeros(3)}])["w"], e[0])  # (length (2 + 0) / 2)
    torch.testing.assert_close(merge.karcher([a, a, a])["w"], a["w"])
    assert torch.equal(merge.karcher([a])["w"], a["w"])
    with pytest.raises(ValueError, match="max_iter"):
        merge.karcher([a, b], max_iter=2.5)


def test_karcher_with_tol_0_of_a_model_on_the_mean(gen):
    """Karcher with tol=0 (no step skipped) of two equal models, or of a model and a zero one, divided
    its tangent by its length 0 (and that of a unit vector on the mean, theta / sin theta, was 0 / 0):
    the tensor NaN, refused as 'not finite ... its values pass the dtype's range'; a unit on the mean
    has no tangent, and a step of none ends the walk."""
    a, b = ({"w": torch.randn(3, 4, generator=gen)} for _ in range(2))
    torch.testing.assert_close(merge.karcher([a, a], tol=0.0)["w"], a["w"])
    torch.testing.assert_close(merge.karcher([a, {"w": torch.zeros(3, 4)}], tol=0.0)["w"], a["w"] / 2)
    on_the_mean = merge.karcher([a, {"w": a["w"] * (1 + 2 ** -20)}, {"w": 2 * a["w"]}], tol=0.0)["w"]
    torch.testing.assert_close(on_the_mean, a["w"] * (4 + 2 ** -20) / 3)  # (theta 0 at the first step)
    torch.testing.assert_close(merge.karcher([a, b], tol=0.0, max_iter=50)["w"],
                               merge.karcher([a, b], tol=1e-12, max_iter=50)["w"])


def test_nearswap_by_its_definition():
    """NearSwap: entries within t of the expert's take its value, the others move by t toward it."""
    base = {"w": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    expert = {"w": torch.tensor([0.0005, -0.002, 0.01, 1.0])}
    out = merge.nearswap(base, [expert], t=0.001)["w"]
    torch.testing.assert_close(out, torch.tensor([0.0005, -0.001, 0.001, 1.0]))
    with pytest.raises(ValueError, match="one expert, got 2"):
        merge.nearswap(base, [expert, expert])


def test_nearswap_of_an_expert_equal_to_the_base_is_the_base(gen):
    """Entries the expert left at the base's stay the base's bit for bit whatever t: below t =
    1e-6 their weight is under 1, and w W_1 + (1 - w) W_0 (mergekit's arithmetic) rounded them
    off by an ulp."""
    W_0 = torch.randn(8, 6, generator=gen)
    for t in (1e-7, 3e-7, 1e-3):
        assert torch.equal(merge.nearswap({"w": W_0}, [{"w": W_0.clone()}], t=t)["w"], W_0)


def test_ram_keeps_lone_changes_whole_and_averages_shared_ones():
    """RAM: an entry one expert changed takes that change whole, one several changed takes their
    mean, one none changed (|tau| <= epsilon) keeps the base; RAM+ scales each expert's lone
    changes by 1 + r min(alpha, shared / lone), counted per tensor."""
    base = {"w": torch.zeros(2, 3)}
    e1 = {"w": torch.tensor([[1.0, 2.0, 0.0], [4.0, 1e-6, 0.0]])}
    e2 = {"w": torch.tensor([[0.0, 4.0, 3.0], [2.0, 0.0, 0.0]])}
    e3 = {"w": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])}
    out = merge.ram(base, [e1, e2, e3])["w"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 5.0]]), rtol=0, atol=0)
    # e1 changed 3 entries, 2 of them shared (rho 2), e2 3 with 2 shared (rho 2), e3 1 lone (rho 0)
    r, alpha = 0.5, 0.4
    plus = merge.ram_plus(base, [e1, e2, e3], r=r, alpha=alpha)["w"]
    up = 1 + r * alpha
    torch.testing.assert_close(plus, torch.tensor([[1.0 * up, 3.0, 3.0 * up], [3.0, 0.0, 5.0]]))
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 7, generator=g)
    experts = [{"w": W0 + torch.randn(5, 7, generator=g) * (torch.rand(5, 7, generator=g) < 0.4)} for _ in range(3)]
    taus = torch.stack([e["w"] - W0 for e in experts])
    changed = taus.abs() > 1e-5
    c = changed.sum(0)
    by_hand = W0 + torch.where(c > 0, (taus * changed).sum(0) / c.clamp(min=1), 0.0)
    torch.testing.assert_close(merge.ram({"w": W0}, experts)["w"], by_hand)
    torch.testing.assert_close(merge.ram_plus({"w": W0}, experts, r=0.0)["w"], by_hand)
    with pytest.raises(ValueError, match="needs the base"):
        merge.ram(None, experts)


def test_ram_plus_with_epsilon_0_merges_an_expert_that_left_a_tensor_unchanged(gen):
    """RAM+ with epsilon=0 (every nonzero change counted) of an expert that left a tensor as the base
    (a frozen layer) divided its no shared by its no lone changes, 0/0, and the NaN scale of its (no)
    lone changes made the tensor NaN: refused as 'not finite ... its values pass the dtype's range'.
    An expert with no lone change has none to scale: the merge is RAM+ of the others' changes."""
    W_0 = torch.randn(3, 4, generator=gen)
    changed = [{"w": W_0 + torch.randn(3, 4, generator=gen)} for _ in range(2)]
    changed[1]["w"][0] = W_0[0]  # (expert 0's changes there lone, scaled)
    out = merge.ram_plus({"w": W_0}, [*changed, {"w": W_0.clone()}], r=0.5, alpha=0.4, epsilon=0.0)["w"]
    torch.testing.assert_close(out, merge.ram_plus({"w": W_0}, changed, r=0.5, alpha=0.4, epsilon=0.0)["w"])
    taus = [e["w"] - W_0 for e in changed]
    want = W_0 + (taus[0] + taus[1]) / 2
    want[0] = W_0[0] + (1 + 0.5 * 0.4) * taus[0][0]  # (rho_0 = 8 shared / 4 lone, clamped to alpha)
    torch.testing.assert_close(out, want)


def test_arcee_fusion_keeps_the_outlying_changes():
    """Arcee Fusion: the expert's change is kept where |tau| KL(row) passes median + 1.5 IQR
    of those importances, dropped elsewhere."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(8, 16, generator=g)
    tau = 0.01 * torch.randn(8, 16, generator=g)
    tau[2, 5], tau[6, 1] = 3.0, -2.0  # (two outlying changes)
    out = merge.arcee_fusion({"w": W0}, [{"w": W0 + tau}])["w"]
    p, q = torch.softmax(W0 + tau, -1) + 1e-8, torch.softmax(W0, -1) + 1e-8
    importance = tau.abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = importance.flatten().sort().values
    q1, med, q3 = s[int(0.25 * 127)], s[int(0.5 * 127)], s[int(0.75 * 127)]
    keep = importance >= med + 1.5 * (q3 - q1)
    assert keep[2, 5] and keep[6, 1] and not keep[[0, 1, 3, 4, 5, 7]].any()  # (the other rows barely moved)
    torch.testing.assert_close(out, torch.where(keep, W0 + tau, W0))
    with pytest.raises(ValueError, match="one expert"):
        merge.arcee_fusion({"w": W0}, [{"w": W0}, {"w": W0}])


# --------------------------------------------------------------------------- TSV, Iso-C


def _orthogonal_task_vectors(gen, d_out=12, d_in=10):
    """Rank-3 task vectors on disjoint row and column blocks (orthogonal singular subspaces),
    their rank TSV's share, 10 // 3."""
    taus = []
    for k in range(3):
        tau = torch.zeros(d_out, d_in)
        tau[4 * k: 4 * k + 4, 3 * k: 3 * k + 3] = torch.randn(4, 3, generator=gen)
        taus.append(tau)
    return taus


def test_tsv_identities(gen):
    W_0 = torch.randn(12, 10, generator=gen)
    b_0 = torch.randn(12, generator=gen)
    taus = _orthogonal_task_vectors(gen)
    biases = [torch.randn(12, generator=gen) for _ in taus]
    base = {"w": W_0, "b": b_0}
    experts = [{"w": W_0 + t, "b": b_0 + b} for t, b in zip(taus, biases)]
    # orthogonal subspaces, each task's rank its share (3 of 10): nothing interferes and
    # TSV-Merge is Task Arithmetic on the matrices; vectors take the mean task vector
    out = merge.tsv(base, experts, scale=0.8)
    torch.testing.assert_close(out["w"], W_0 + 0.8 * sum(taus), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], b_0 + 0.8 * sum(biases) / 3)
    # one expert and the whole rank: its own task vector
    tau = torch.randn(12, 10, generator=gen)
    out = merge.tsv({"w": W_0}, [{"w": W_0 + tau}], scale=1.0)
    torch.testing.assert_close(out["w"], W_0 + tau, atol=1e-5, rtol=1e-5)
    # overlapping subspaces: the merged update has orthonormal singular vectors built from the
    # stacked ones, so its singular values are exactly the kept ones
    taus = [torch.randn(12, 10, generator=gen) for _ in range(2)]
    out = merge.tsv({"w": W_0}, [{"w": W_0 + t} for t in taus], scale=1.0)["w"]
    kept = torch.cat([torch.linalg.svdvals(t)[:5] for t in taus]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(out - W_0), kept, atol=1e-4, rtol=1e-4)


def test_tsv_leaves_out_the_arbitrary_singular_vectors_of_zero_singular_values(gen):
    """The singular vectors of a zero singular value (all of an expert equal to the base's, the
    rank a low-rank task vector lacks) are any orthonormal completion the SVD picks: stacked with
    the others', the orthogonalisation turned the others' directions by them (the merge of one
    task vector and a zero one was not that task vector's top triplets, and varied by device).
    They are left out: an expert equal to the base adds nothing, low-rank ones on orthogonal
    subspaces merge as Task Arithmetic, and every expert equal to the base gives the base."""
    W_0 = torch.randn(12, 10, generator=gen)
    tau = torch.randn(12, 10, generator=gen)
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    out = merge.tsv({"w": W_0}, [{"w": W_0 + tau}, {"w": W_0.clone()}])["w"]  # (each its 5 triplets)
    torch.testing.assert_close(out, W_0 + (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5, rtol=1e-5)
    # rank 2 each of a share of 3: no singular vectors of 0 mixed in
    low = []
    for t in _orthogonal_task_vectors(gen):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        low.append((u[:, :2] * s[:2]) @ vh[:2])
    out = merge.tsv({"w": W_0}, [{"w": W_0 + t} for t in low])["w"]
    torch.testing.assert_close(out, W_0 + sum(low), atol=1e-5, rtol=1e-5)
    assert torch.equal(merge.tsv({"w": W_0}, [{"w": W_0.clone()}] * 3)["w"], W_0)


def test_iso_c_flattens_the_spectrum(gen):
    W_0 = torch.randn(16, 12, generator=gen)
    taus = [torch.randn(16, 12, generator=gen) * s for s in (1.0, 0.1, 3.0)]
    out = merge.iso_c({"w": W_0, "b": torch.zeros(3)},
                      [{"w": W_0 + t, "b": torch.full((3,), float(k))} for k, t in enumerate(taus)],
                      scale=0.5)
    S = torch.linalg.svdvals(sum(taus))
    delta = out["w"] - W_0
    torch.testing.assert_close(torch.linalg.svdvals(delta), torch.full((12,), 0.5 * float(S.mean())),
                               atol=1e-4, rtol=1e-4)
    # same singular subspaces as the sum: delta = c U V^T, so delta^T sum = c V S V^T is symmetric
    G = delta.T @ sum(taus)
    torch.testing.assert_close(G, G.T, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out["b"], torch.full((3,), 0.5))


def test_iso_c_of_a_low_rank_sum_stays_in_its_span(gen):
    """Iso-C gives every singular direction of the summed task vectors the mean singular value:
    past the sum's numerical rank (LoRA experts', rank 2 here) the directions are whatever
    orthonormal completion the SVD picks, and took that value too, a full-rank update of
    arbitrary directions (varying by device). They are left out: the update is the mean singular
    value times the sum's own singular vectors."""
    W_0 = torch.randn(12, 10, generator=gen)
    loras = [torch.randn(12, 1, generator=gen) @ torch.randn(1, 10, generator=gen) for _ in range(2)]
    out = merge.iso_c({"w": W_0}, [{"w": W_0 + t} for t in loras], scale=0.5)["w"]
    U, S, Vh = torch.linalg.svd(sum(loras))
    torch.testing.assert_close(out, W_0 + 0.5 * S.mean() * U[:, :2] @ Vh[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_a_callers_autocast_changes_no_merge(gen, method):
    """The merges compute in float32 (float64 for float64 tensors): under a caller's autocast (a
    training script's) TSV-Merge's and Iso-C's products ran in bf16, and the merged weights
    differed by ~1e-3, silently."""
    W_0 = torch.randn(16, 12, generator=gen)
    base = {"w": W_0}
    experts = [{"w": W_0 + 0.1 * torch.randn(16, 12, generator=gen)} for _ in range(3)]
    plain = getattr(merge, method)(base, experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = getattr(merge, method)(base, experts)
    assert torch.equal(plain["w"], cast["w"])


@pytest.mark.parametrize("method, kw", [
    ("multislerp", {"weights": [1.0, 0.5, 2.0]}), ("dare", {"density": 0.5}), ("della", {}), ("ties", {}),
    ("ties", {"scope": "tensor"}), ("breadcrumbs", {}), ("arcee_fusion", {}),
])
def test_torchs_default_device_changes_no_merge(gen, method, kw):
    """Under torch.set_default_device("cuda") (a script's), tensors made without a device went to
    it: multislerp's weights beside the vectors, DARE's and DELLA's draws from a CPU generator, the
    TIES and Breadcrumbs counts of magnitudes, arcee_fusion's quartiles, and the merge failed
    (multislerp of CUDA experts did without it: merge_checkpoints(device="cuda")). The meta
    device stands for a GPU here: made there, they fail as beside a CUDA tensor."""
    W_0 = torch.randn(16, 12, generator=gen)
    base = {"w": W_0, "b": torch.randn(12, generator=gen)}
    experts = [{n: W + 0.1 * torch.randn(W.shape, generator=gen) for n, W in base.items()}
               for _ in range(1 if method == "arcee_fusion" else 3)]
    plain = getattr(merge, method)(base, experts, **kw)
    with torch.device("meta"):
        elsewhere = getattr(merge, method)(base, experts, **kw)
    assert all(torch.equal(plain[n], elsewhere[n]) for n in base)


# --------------------------------------------------------------------------- Model Stock, SLERP, weights


def test_model_stock_by_hand(gen):
    W_0 = torch.randn(4, 6, generator=gen)
    tau = torch.randn(4, 6, generator=gen)
    # identical task vectors: cos 1, t = 1, the experts' mean
    out = merge.model_stock({"w": W_0}, [{"w": W_0 + tau}, {"w": W_0 + tau}])["w"]
    torch.testing.assert_close(out, W_0 + tau)
    # orthogonal task vectors: cos 0, t = 0, the base
    a, b = torch.zeros(4, 6), torch.zeros(4, 6)
    a[0], b[1] = 1.0, 2.0
    out = merge.model_stock({"w": W_0}, [{"w": W_0 + a}, {"w": W_0 + b}])["w"]
    torch.testing.assert_close(out, W_0)
    # three experts, general case: t = 3 c / (1 + 2 c), c the mean pairwise cosine
    taus = [tau + 0.5 * torch.randn(4, 6, generator=gen) for _ in range(3)]
    cos = [torch.nn.functional.cosine_similarity(taus[i].flatten(), taus[j].flatten(), dim=0)
           for i, j in ((0, 1), (0, 2), (1, 2))]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    out = merge.model_stock({"w": W_0}, [{"w": W_0 + x} for x in taus])["w"]
    torch.testing.assert_close(out, W_0 + t * sum(taus) / 3)
    # per row: each output row gets its own t
    rows = merge.model_stock({"w": W_0}, [{"w": W_0 + x} for x in taus], per_row=True)["w"]
    for r in range(4):
        one = merge.model_stock({"w": W_0[r]}, [{"w": W_0[r] + x[r]} for x in taus])["w"]
        torch.testing.assert_close(rows[r], one)


def _model_stock_pairwise(W_0, W_k, per_row=False):
    """Model Stock from its definition, every pair's cosine (0 where either task vector is 0)."""
    K = len(W_k)
    taus = [(W - W_0).reshape(W_0.shape[0], -1) if per_row else (W - W_0).reshape(1, -1) for W in W_k]
    norms = [tau.norm(dim=1) for tau in taus]
    cos = torch.stack([torch.where(norms[i] * norms[j] > 0, (taus[i] * taus[j]).sum(1) / (norms[i] * norms[j]), 0.0)
                       for i in range(K) for j in range(i + 1, K)]).mean(0)
    denominator = 1 + (K - 1) * cos
    t = torch.where(denominator > 0, K * cos / denominator.clamp(min=1e-30), 0.0).clamp(-1, 1)
    t = t.reshape(-1, *([1] * (W_0.dim() - 1))) if per_row else t.reshape(())
    return t * sum(W_k) / K + (1 - t) * W_0


@pytest.mark.parametrize("K", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_stock_agrees_with_every_pairs_cosine(K, dtype, gen):
    """Model Stock's mean cosine, found in one pass over the experts (each read once, the sums of the
    task vectors and of their directions kept), is the mean of every pair's to rounding: task vectors
    near each other, apart, zero (a tensor an expert left as it was; rows of one per_row)."""
    W_0 = torch.randn(12, 20, generator=gen, dtype=dtype)
    shared = torch.randn(12, 20, generator=gen, dtype=dtype)
    for spread in (0.1, 1.0, 10.0):
        taus = [shared + spread * torch.randn(12, 20, generator=gen, dtype=dtype) for _ in range(K)]
        taus[0] = torch.zeros_like(W_0)  # (an expert that did not change the tensor)
        taus[-1][3:5] = 0  # (rows it did not change)
        W_k = [W_0 + tau for tau in taus]
        for per_row in (False, True):
            got = merge.model_stock({"w": W_0}, [{"w": W} for W in W_k], per_row=per_row)["w"]
            assert got.dtype == dtype
            want = _model_stock_pairwise(W_0, W_k, per_row)
            torch.testing.assert_close(got, want)  # (the dtype's own tolerances)
    # two scalars of opposite signs: unit vectors summing to 0, t 0/0, the base kept
    got = merge.model_stock({"w": T([1.0], dtype=dtype)}, [{"w": T([1.5], dtype=dtype)}, {"w": T([0.25], dtype=dtype)}])
    assert torch.equal(got["w"], T([1.0], dtype=dtype))


def _cpu_peak_bytes(fn, tmp_path):
    """The CPU allocator's most bytes allocated while ``fn`` ran, past those held when it began (the profiler's)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = [e["args"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
              if e.get("name") == "[memory]"]
    return max(e["Total Allocated"] for e in events) - (events[0]["Total Allocated"] - events[0]["Bytes"])


@pytest.mark.parametrize("per_row", [False, True])
def test_model_stock_holds_the_same_memory_whatever_the_number_of_experts(per_row, gen, tmp_path):
    """Model Stock held the K task vectors of a tensor at once for their pairs' cosines, so its peak
    grew with K (8 experts: 4.5 times the tensor more than 2), where the README says the task-vector
    merges' stops growing with K; the mean cosine is made from the sums of the task vectors'
    directions in one pass, a few tensors held whatever K (the allocator's peak, from the profiler)."""
    W_0 = torch.randn(256, 256, generator=gen)
    experts = [{"w": W_0 + 0.1 * torch.randn(256, 256, generator=gen)} for _ in range(8)]
    peaks = {K: _cpu_peak_bytes(lambda K=K: merge.model_stock({"w": W_0}, experts[:K], per_row=per_row), tmp_path)
             for K in (2, 8)}
    tensor = W_0.numel() * 4
    assert peaks[8] <= peaks[2] + tensor / 4, {K: p / tensor for K, p in peaks.items()}


# the merges whose memory past HOLD_BYTES the README says is flat in K: all of them
_FLAT_IN_K = {
    "task_arithmetic": lambda W_0, e: merge.task_arithmetic({"w": W_0}, e),
    "ties": lambda W_0, e: merge.ties({"w": W_0}, e, scope="tensor"),
    "dare": lambda W_0, e: merge.dare({"w": W_0}, e, consensus="sign"),
    "breadcrumbs": lambda W_0, e: merge.breadcrumbs({"w": W_0}, e),
    "della": lambda W_0, e: merge.della({"w": W_0}, e),
    "tsv": lambda W_0, e: merge.tsv({"w": W_0}, e),
    "iso_c": lambda W_0, e: merge.iso_c({"w": W_0}, e),
    "model_stock": lambda W_0, e: merge.model_stock({"w": W_0}, e),
    "average": lambda W_0, e: merge.average(e),
    "ram": lambda W_0, e: merge.ram({"w": W_0}, e, epsilon=0.1),
    "ram_plus": lambda W_0, e: merge.ram_plus({"w": W_0}, e, epsilon=0.1),
    "multislerp": lambda W_0, e: merge.multislerp({"w": W_0}, e),
    "sce": lambda W_0, e: merge.sce({"w": W_0}, e, select_topk=0.5),
    "karcher": lambda W_0, e: merge.karcher(e),
    'convention="mergekit"': lambda W_0, e: merge.model_stock({"w": W_0}, e, convention="mergekit"),
}


@pytest.mark.parametrize("method", _FLAT_IN_K)
def test_the_readme_names_the_merges_whose_memory_grows_with_the_number_of_experts(method, gen, tmp_path,
                                                                                  monkeypatch):
    """The README said the task-vector merges' memory stops growing with K past HOLD_BYTES, but the
    merges following mergekit step for step held the K task vectors of a tensor at once; every merge's
    peak stays flat in K (the allocator's, from the profiler), the same merge as held below HOLD_BYTES,
    and the README says none grows. At 8 experts then 2 (times the tensor): RAM and RAM+ held 47.5 and
    16 where two passes, the count of experts changing each entry then each expert's share, hold 9.75
    with either; Multi-SLERP 34 and 11, its steps taking the norms and the weighted sum of the unit
    vectors alone, 5; SCE 29 and 9.5, passes of one task vector at a time (their sum and Welford's
    variance, each one's mean square, the weighted sums), 8.25; Karcher 12 and 6, each step reading the
    models anew, 5; mergekit's Model Stock 10 and 4, each pair's task vectors made anew, 4."""
    import pathlib

    W_0 = torch.randn(256, 256, generator=gen)
    experts = [{"w": W_0 + 0.1 * torch.randn(256, 256, generator=gen)} for _ in range(8)]
    call = _FLAT_IN_K[method]
    held = call(W_0, experts)["w"]
    monkeypatch.setattr(merge, "HOLD_BYTES", 0)  # (past the limit: the task vectors made on demand)
    torch.testing.assert_close(call(W_0, experts)["w"], held, rtol=0, atol=0)
    peaks = {K: _cpu_peak_bytes(lambda K=K: call(W_0, experts[:K]), tmp_path) for K in (2, 8)}
    tensor = W_0.numel() * 4
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = next(p for p in readme.split("\n\n") if "HOLD_BYTES" in p)
    assert peaks[8] <= peaks[2] + tensor / 2, {K: p / tensor for K, p in peaks.items()}
    assert "so its memory grows with K" not in paragraph and "so theirs grows with K" not in paragraph


def test_slerp(gen):
    a = {"w": T([[1.0, 0.0], [0.0, 2.0]]), "ids": T([1, 2])}
    b = {"w": T([[0.0, 1.0], [0.0, -2.0]]), "ids": T([3, 4])}
    torch.testing.assert_close(merge.slerp(a, b, t=0.0)["w"], a["w"])
    torch.testing.assert_close(merge.slerp(a, b, t=1.0)["w"], b["w"])
    assert torch.equal(merge.slerp(a, b)["ids"], a["ids"])
    # per row: row 0 is a quarter circle (unit vectors at 90 degrees), row 1 is antiparallel
    # (|cos| = 1 > dot_threshold: linear)
    out = merge.slerp(a, b, t=0.5, per_row=True)["w"]
    torch.testing.assert_close(out[0], T([2 ** -0.5, 2 ** -0.5]))
    torch.testing.assert_close(out[1], T([0.0, 0.0]))
    # whole tensor: the norm stays on the circle for equal norms
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    y = y * x.norm() / y.norm()
    for t in (0.2, 0.5, 0.9):
        torch.testing.assert_close(merge.slerp({"w": x}, {"w": y}, t=t)["w"].norm(), x.norm())
    # a schedule over names
    out = merge.slerp({"p": x, "q": x}, {"p": y, "q": y}, t=lambda name: 0.0 if name == "p" else 1.0)
    torch.testing.assert_close(out["p"], x)
    torch.testing.assert_close(out["q"], y)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "breadcrumbs", "della", "average"])
def test_weights_are_checked_before_any_tensor_is_written(method):
    """Per-expert weights of the wrong length (or a zero sum to divide by) were refused at the first
    float tensor, after the tensors before it were written to out (a shard writer's), and never
    for a model of no float tensor; refused before any."""
    base, experts = hand_models()
    first = {"ids": base["ids"], **base}  # (not floating point: merged first)
    for weights, match in (([1.0, 2.0], "one number per expert"), ([1.0, -1.0, 0.0], "sum to 0")):
        if match == "sum to 0" and method != "average":
            continue  # (a sum divides only the mean)
        written = {}
        with pytest.raises(ValueError, match=match):
            if method == "average":
                merge.average(experts, weights=weights, out=written)
            else:
                getattr(merge, method)(first, experts, weights=weights, out=written)
        assert written == {}
    with pytest.raises(ValueError, match="one number per expert"):
        merge.task_arithmetic({"ids": base["ids"]}, [{"ids": e["ids"]} for e in experts], weights=[1.0])


def test_weighted_average():
    base, experts = hand_models()
    out = merge.average(experts, weights=[1.0, 0.0, 3.0])
    torch.testing.assert_close(out["w"], (experts[0]["w"] + 3 * experts[2]["w"]) / 4)
    with pytest.raises(ValueError, match="one number per expert"):
        merge.average(experts, weights=[1.0, 2.0])


def test_bad_parameters_of_the_newer_merges():
    base, experts = hand_models()
    with pytest.raises(ValueError, match="consensus"):
        merge.dare(base, experts, consensus="majority")
    with pytest.raises(ValueError, match="gamma"):
        merge.breadcrumbs(base, experts, gamma=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        merge.della(base, experts, density=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="rank_fraction"):
        merge.tsv(base, experts, rank_fraction=0.0)
    written = {}  # (refused before any tensor is merged: "ids", not floating point, came first)
    with pytest.raises(ValueError, match="at least two experts"):
        merge.model_stock({"ids": base["ids"], **base}, experts[:1], out=written)
    assert written == {}
    for fn in (merge.breadcrumbs, merge.della, merge.tsv, merge.iso_c, merge.model_stock):
        with pytest.raises(ValueError, match="needs the base"):
            fn(None, experts)
    with pytest.raises(ValueError, match="shape"):
        merge.slerp({"w": torch.zeros(3)}, {"w": torch.zeros(4)})


# --------------------------------------------------------------------------- RegMean


def test_regmean_is_the_least_squares_fit_of_every_experts_outputs(gen):
    d_out, d_in = 5, 7
    X = [torch.randn(n, d_in, generator=gen, dtype=torch.float64) for n in (30, 12, 20)]
    X[1][:, 2] *= 10  # tasks weigh input features differently
    W_k = [torch.randn(d_out, d_in, generator=gen) for _ in X]
    b_k = [torch.randn(d_out, generator=gen) for _ in X]
    experts = [{"fc.weight": W, "fc.bias": b} for W, b in zip(W_k, b_k)]
    grams = {"fc.weight": [x.T @ x for x in X]}
    out = merge.regmean(experts, grams, alpha=1.0)
    # min_W sum_k |X_k W^T - X_k W_k^T|^2, solved as one stacked least-squares problem
    A = torch.cat(X)
    Y = torch.cat([x @ W.double().T for x, W in zip(X, W_k)])
    want = torch.linalg.lstsq(A, Y).solution.T
    torch.testing.assert_close(out["fc.weight"].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["fc.bias"], torch.stack(b_k).mean(0))  # not a linear weight
    # alpha = 0: each input feature's column is the experts' average weighted by its energy
    out = merge.regmean(experts, grams, alpha=0.0)["fc.weight"].double()
    g = torch.stack([torch.diagonal(G) for G in grams["fc.weight"]])  # [K, in]
    want = sum(W.double() * g[k] for k, W in enumerate(W_k)) / g.sum(0)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    # one expert: itself
    one = merge.regmean(experts[:1], {"fc.weight": grams["fc.weight"][:1]}, alpha=0.9)
    torch.testing.assert_close(one["fc.weight"], W_k[0], atol=1e-5, rtol=1e-5)


def test_regmean_keeps_a_feature_no_task_reaches_at_the_average(gen):
    X = [torch.randn(20, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    for x in X:
        x[:, 3] = 0.0
    W_k = [torch.randn(3, 4, generator=gen) for _ in X]
    out = merge.regmean([{"w": W} for W in W_k], {"w": [x.T @ x for x in X]}, alpha=1.0)["w"]
    torch.testing.assert_close(out[:, 3], (W_k[0][:, 3] + W_k[1][:, 3]) / 2)
    assert torch.isfinite(out).all()


def test_regmean_bad_grams(gen):
    experts = [{"w": torch.randn(3, 4, generator=gen)} for _ in range(2)]
    G = torch.eye(4)
    with pytest.raises(ValueError, match="expected 2 Gram matrices"):
        merge.regmean(experts, {"w": [G]})
    with pytest.raises(ValueError, match="shape \\(3, 3\\), expected \\(4, 4\\)"):
        merge.regmean(experts, {"w": [G, torch.eye(3)]})
    with pytest.raises(ValueError, match="non-finite"):
        merge.regmean(experts, {"w": [G, torch.full((4, 4), float("nan"))]})
    with pytest.raises(ValueError, match="alpha"):
        merge.regmean(experts, {"w": [G, G]}, alpha=2.0)
    # symmetric, non-negative diagonal, yet no X^T X: the solve would leave the experts' span
    bad = torch.tensor([[1.0, 3.0, 0, 0], [3.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    with pytest.raises(ValueError, match="not positive semidefinite"):
        merge.regmean(experts, {"w": [bad, bad]})
    # a sum of rank-deficient grams (fewer samples than inputs) is fine
    X = [torch.randn(2, 4, generator=gen) for _ in range(2)]
    merged = merge.regmean(experts, {"w": [x.T @ x for x in X]})
    assert torch.isfinite(merged["w"]).all()


def test_regmean_grams_of_no_linear_weight_or_no_tensors_are_named(gen):
    """Grams given for a bias, or as numpy arrays or None, ended in 'expected 2 Gram matrices (one per
    expert) of a 2-D weight, got 2' (two given) or in Python's bare AttributeError ('numpy.ndarray'
    object has no attribute 'dim') and TypeError; each is refused naming the entry and what it is."""
    experts = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(3, generator=gen)} for _ in range(2)]
    G = torch.eye(4)
    with pytest.raises(ValueError, match=r"grams\['b'\]: b has shape \(3,\), no linear layer's weight \[out, in\] "
                                         r"\(nor fused experts' \[E, out, in\]\).*leave it out of grams"):
        merge.regmean(experts, {"b": [torch.eye(3), torch.eye(3)]})
    with pytest.raises(ValueError, match=r"grams\['w'\]\[1\] is a ndarray, not a tensor"):
        merge.regmean(experts, {"w": [G, G.numpy()]})
    with pytest.raises(ValueError, match=r"grams\['w'\]\[0\] is a NoneType, not a tensor"):
        merge.regmean(experts, {"w": [None, G]})
    with pytest.raises(ValueError, match=r"grams\['w'\] is a NoneType: give one Gram matrix per expert"):
        merge.regmean(experts, {"w": None})
    # (a fused weight's count still said as a count)
    fused = [{"e": torch.randn(2, 3, 4, generator=gen)} for _ in range(2)]
    with pytest.raises(ValueError, match=r"grams\['e'\]: expected 2 Gram matrices \(one per expert\), got 3$"):
        merge.regmean(fused, {"e": [torch.eye(4).expand(2, 4, 4)] * 3})


def test_regmean_of_fused_experts_holds_one_merged_copy(gen, tmp_path):
    """The merge of a fused weight solved each expert in float64 into a list and stacked it, two
    float64 copies of the weight at once (gpt-oss-120b's gate_up_proj: 34 GB for a 4 GB bf16
    weight); each expert is written into the merged weight as it is solved. The CPU allocator's
    peak over the merge, from the profiler, against the float64 weight's size (its conversion to the
    experts' float32 after: half of it more)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    E, d_out, d_in = 32, 128, 64
    experts = [{"m.experts.down_proj": torch.randn(E, d_out, d_in, generator=gen)} for _ in range(2)]
    grams = {"m.experts.down_proj": [torch.eye(d_in, dtype=torch.float64).repeat(E, 1, 1) * (k + 1)
                                     for k in range(2)]}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        merged = merge.regmean(experts, grams)["m.experts.down_proj"]
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    allocated = [e["args"]["Total Allocated"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
                 if e.get("name") == "[memory]"]
    size = E * d_out * d_in * 8
    assert (max(allocated) - allocated[0]) / size < 1.75
    # (G_k = k I: the weighted average, (1 W_0 + 2 W_1) / 3)
    torch.testing.assert_close(merged, (experts[0]["m.experts.down_proj"] + 2 * experts[1]["m.experts.down_proj"]) / 3)


def test_regmean_names_a_fused_weights_bad_gram_matrix_as_grams_is_indexed(gen):
    """A fused weight's bad Gram matrix of one expert was named grams['...down_proj[2]'][1], a key
    grams has not; it is named grams['...down_proj'][1][2], the entry to look at."""
    experts = [{"m.experts.down_proj": torch.randn(3, 5, 4, generator=gen)} for _ in range(2)]
    grams = [torch.eye(4).repeat(3, 1, 1) for _ in range(2)]
    grams[1][2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^grams\['m\.experts\.down_proj'\]\[1\]\[2\] has non-finite values"):
        merge.regmean(experts, {"m.experts.down_proj": grams})
    grams[1] = torch.eye(5).repeat(3, 1, 1)
    with pytest.raises(ValueError, match=r"^grams\['m\.experts\.down_proj'\]\[1\]\[0\] has shape \(5, 5\), "
                                         r"expected \(4, 4\)"):
        merge.regmean(experts, {"m.experts.down_proj": grams})
    indefinite = torch.tensor([[1.0, 3.0, 0, 0], [3.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    grams = [torch.stack([torch.eye(4), indefinite, torch.eye(4)]) for _ in range(2)]
    with pytest.raises(ValueError, match=r"^grams\['m\.experts\.down_proj'\] of expert 1: their sum is not "
                                         r"positive semidefinite"):
        merge.regmean(experts, {"m.experts.down_proj": grams})


def test_gram_matrices_by_hand(gen):
    from epmq.stats import gram_matrices

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(5, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)]
    grams = gram_matrices(model, batches)
    X0 = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    X2 = torch.relu(model[0](X0.float())).double()
    torch.testing.assert_close(grams["0.weight"], X0.T @ X0)
    torch.testing.assert_close(grams["2.weight"], X2.T @ X2, atol=1e-5, rtol=1e-5)
    assert set(gram_matrices(model, batches, names={"2.weight"})) == {"2.weight"}
    with pytest.raises(ValueError, match="no linear layer"):
        gram_matrices(model, batches, names={"nope"})
    with pytest.raises(ValueError, match="no calibration batch"):
        gram_matrices(model, [])


def test_gram_matrices_of_names_the_model_does_not_have_are_refused(gen):
    """names= holding a name of no parameter (a module's name without '.weight', a typo) beside real
    ones left that layer out in silence, and RegMean averaged it; one string was read by substrings
    ('0.weight' took '10.weight' too). Both are refused, naming what is wrong."""
    from epmq.stats import gram_matrices

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(11)])
    batches = [torch.randn(5, 4, generator=gen)]
    with pytest.raises(ValueError, match=r"names \['2'\] are no parameter of Sequential \(no linear layer's weight"):
        gram_matrices(model, batches, names={"0.weight", "2"})
    with pytest.raises(TypeError, match="names must be a collection of weight names, not one string"):
        gram_matrices(model, batches, names="0.weight")
    assert set(gram_matrices(model, batches, names=["10.weight"])) == {"10.weight"}


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_gram_matrices_refuse_labels_an_encoder_decoder_without_a_head_drops(gen, family, headless_encoder_decoder):
    """T5Model and BartModel take no labels: their forward's **kwargs dropped them, T5Model's pass failed
    ("You must specify exactly one of input_ids or inputs_embeds"), BartModel's decoder Gram matrices were
    those of the inputs shifted, RegMean's statistics with nothing said. Refused naming decoder_input_ids,
    which run, as epmq.quantize_model and merge_checkpoint refuse them."""
    from epmq.stats import gram_matrices

    ids = torch.randint(3, 32, (1, 6), generator=gen)
    model = headless_encoder_decoder(family)
    with pytest.raises(ValueError, match=rf"batches\[1\]: {type(model).__name__}'s forward takes no labels, so its "
                                         r"decoder would not read them: give decoder_input_ids"):
        gram_matrices(model, [dict(input_ids=ids, decoder_input_ids=ids[:, :3]), dict(input_ids=ids, labels=ids)])
    assert not any(m._forward_pre_hooks for m in model.modules())
    grams = gram_matrices(model, [dict(input_ids=ids, decoder_input_ids=ids[:, :3])])
    decoder = [name for name in grams if name.startswith("decoder.")]
    assert decoder and all(grams[name].abs().sum() > 0 for name in decoder)


class _Routed(nn.Module):
    """A block whose router applies its weight [E, H] by F.linear (transformers 5's), no nn.Linear."""

    def __init__(self, width=8, experts=3):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.randn(experts, width) / width ** 0.5)
        self.router.forward = lambda x: nn.functional.linear(x, self.router.weight)

    def forward(self, x):
        return x + self.fc(x) * self.router(x).softmax(-1)[..., :1]


def routed_stack(named: bool) -> nn.Module:
    """Two ``_Routed`` blocks (a stack the walker finds) and a head; ``named``: the blocks named by an
    OrderedDict (``blocks.first``, ``blocks.second``: torchvision's ViT's encoder_layer_0 ...)."""
    import collections

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            blocks = [_Routed(), _Routed()]
            self.blocks = (nn.Sequential(collections.OrderedDict(first=blocks[0], second=blocks[1])) if named
                           else nn.Sequential(*blocks))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.blocks(x))

    return Stack()


def test_gram_matrices_of_routers_in_blocks_an_ordered_dict_named_are_under_their_names(gen):
    """A router's Gram matrix (of the inputs of its F.linear) was named by its block's position,
    blocks.0.router.weight, where an OrderedDict named its block (blocks.first): a tensor the model has
    not, which regmean refused ('tensors the experts do not have'), merge_checkpoints averaged in silence,
    and names= could not select. Each is under its weight's name, the matrix of the same blocks numbered."""
    from epmq.stats import gram_matrices

    named = routed_stack(named=True)
    numbered = routed_stack(named=False)
    numbered.load_state_dict({k.replace(".first.", ".0.").replace(".second.", ".1."): v
                              for k, v in named.state_dict().items()})
    batches = [torch.randn(2, 5, 8, generator=gen)]
    grams = gram_matrices(named, batches)
    weights = {n for n, p in named.named_parameters() if p.dim() == 2}
    assert set(grams) == weights
    for name, G in gram_matrices(numbered, batches).items():
        torch.testing.assert_close(grams[name.replace(".0.", ".first.").replace(".1.", ".second.")], G,
                                   rtol=0, atol=0)
    assert set(gram_matrices(named, batches, names={"blocks.second.router.weight"})) == {
        "blocks.second.router.weight"}


def test_gram_matrices_of_linears_on_one_input_are_taken_once(gen, monkeypatch):
    """q, k and v read one tensor: one Gram matrix for the three (the same values as each alone,
    the same object), accumulated once per batch, the first too; o reads another."""
    from epmq import stats as stats_mod

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            return self.o(self.q(x) * self.k(x) + self.v(x))

    torch.manual_seed(0)
    model = Attention()
    batches = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    calls = []
    add_batch = stats_mod.HessianStats.add_batch
    monkeypatch.setattr(stats_mod.HessianStats, "add_batch",
                        lambda self, x, **kw: calls.append(1) or add_batch(self, x, **kw))
    grams = stats_mod.gram_matrices(model, batches)
    assert len(calls) == 3 * 2  # q (for k, v) and o
    X = torch.cat(batches).double()
    Y = (model.q(torch.cat(batches)) * model.k(torch.cat(batches)) + model.v(torch.cat(batches))).double()
    for name in ("q.weight", "k.weight", "v.weight"):
        torch.testing.assert_close(grams[name], X.T @ X)
    assert grams["k.weight"] is grams["q.weight"] is grams["v.weight"]
    torch.testing.assert_close(grams["o.weight"], Y.T @ Y, atol=1e-5, rtol=1e-5)


def test_gram_matrices_of_linears_on_one_input_share_one_matrix_from_the_start(tmp_path):
    """q/k/v and gate/up read one tensor and share one Gram matrix, but each had its own allocated
    until the call ended, the sharing decided after the first batch: a 7B Llama's peaked near 57 GB
    of float64 matrices, not its 44 GB. The CPU allocator's peak, from the profiler, is that of the
    matrices returned (one per distinct tensor), not of one per linear."""
    import json

    import transformers
    from torch.profiler import ProfilerActivity, profile

    from epmq.stats import gram_matrices

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grams = gram_matrices(model, batches)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = [e["args"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
              if e.get("name") == "[memory]"]
    peak = max(e["Total Allocated"] for e in events) - (events[0]["Total Allocated"] - events[0]["Bytes"])
    held = sum(G.numel() * 8 for G in {id(G): G for G in grams.values()}.values())
    one_each = sum(G.numel() * 8 for G in grams.values())
    layer = "model.layers.1."
    assert grams[layer + "self_attn.q_proj.weight"] is grams[layer + "self_attn.v_proj.weight"]
    assert grams[layer + "mlp.gate_proj.weight"] is grams[layer + "mlp.up_proj.weight"]
    assert one_each > 1.3 * held
    assert peak < 1.1 * held, (peak / held, one_each / held)

def test_gram_matrices_of_linears_whose_reads_of_one_input_part_in_the_first_batch(gen):
    """b, c and d follow a's matrix while their reads are the first of a's; a reads the tensor again
    (b's and d's then one of their own), and c reads another (its own, from the tensor it read first
    and the other): each has the Gram matrix of its own calls, the linears of the same reads one."""
    from epmq.stats import gram_matrices

    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            return self.a(x) + self.b(x) + self.d(x) + self.c(x) + self.a(x) + self.c(2 * x)

    batches = [torch.randn(5, 4, generator=gen) for _ in range(2)]
    grams = gram_matrices(Repeat(), batches)
    X = torch.cat(batches).double()
    for name, times in (("a", 2), ("b", 1), ("c", 5), ("d", 1)):
        torch.testing.assert_close(grams[f"{name}.weight"], times * X.T @ X)
    assert grams["d.weight"] is grams["b.weight"] and grams["c.weight"] is not grams["a.weight"]


def test_gram_matrices_when_linears_stop_sharing_their_input(gen):
    from epmq.stats import gram_matrices

    class Toggle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else 2 * x)

    batches = [torch.randn(5, 4, generator=gen) for _ in range(2)]
    with pytest.raises(RuntimeError, match="b.weight read the same tensors as a.weight .* not in batch 1"):
        gram_matrices(Toggle(), batches)


def test_gram_matrices_of_wavlms_attention_projections_are_their_inputs(gen):
    """WavLM's attention hands its q, k, v and out projections' weights to torch's
    F.multi_head_attention_forward rather than calling them: gram_matrices saw them never called,
    and their Gram matrices came back zero, in silence, so RegMean averaged the attentions of
    WavLM experts. They are called during the passes (the model left as it was): q, k and v's is
    the Gram matrix of the attention's input, out's of the heads' outputs it projects."""
    import copy

    import transformers

    from epmq.adapters.attention import call_projections
    from epmq.stats import gram_matrices

    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        vocab_size=12, num_buckets=16, max_bucket_distance=32)
    torch.manual_seed(0)
    model = transformers.WavLMModel(config).eval()
    batches = [{"input_values": torch.randn(2, 640, generator=gen)}]
    attention = model.encoder.layers[0].attention
    seen = {}
    handles = [attention.register_forward_pre_hook(lambda m, args, kwargs: seen.update(h=args[0]), with_kwargs=True)]
    rebuilt = copy.deepcopy(model)
    call_projections(rebuilt.encoder.layers[0].attention)
    handles.append(rebuilt.encoder.layers[0].attention.out_proj.register_forward_pre_hook(
        lambda m, args: seen.update(context=args[0])))
    with torch.no_grad():
        rebuilt(**batches[0])
    grams = gram_matrices(model, batches)
    for h in handles:
        h.remove()
    X = seen["h"].reshape(-1, 32).double()
    prefix = "encoder.layers.0.attention."
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(grams[f"{prefix}{name}.weight"], X.T @ X)
    Y = seen["context"].reshape(-1, 32).double()
    torch.testing.assert_close(grams[f"{prefix}out_proj.weight"], Y.T @ Y, rtol=1e-5, atol=1e-5)
    assert "torch_multi_head_self_attention" not in vars(attention)  # (the model as it was)


def test_weights_scale_each_task_vector_and_its_vote(gen):
    base = {"w": torch.randn(4, 30, generator=gen)}
    taus = [torch.randn(4, 30, generator=gen) for _ in range(3)]
    experts = [{"w": base["w"] + t} for t in taus]
    w = [1.0, 0.5, 2.0]
    out = merge.task_arithmetic(base, experts, scale=0.4, weights=w)["w"]
    torch.testing.assert_close(out, base["w"] + 0.4 * sum(a * t for a, t in zip(w, taus)))
    # TIES at density 1: the vote on the weighted sum, the weighted disjoint mean
    T_ = torch.stack([a * t for a, t in zip(w, taus)])
    sign = torch.sign(T_.sum(0))
    agree = (torch.sign(T_) == sign) & (T_ != 0)
    kept = torch.where(agree, T_, 0.0).sum(0)
    weight_in = (agree * torch.tensor(w)[:, None, None]).sum(0)
    got = merge.ties(base, experts, scale=1.0, density=1.0, scope="tensor", merge="mean", weights=w)["w"]
    torch.testing.assert_close(got, base["w"] + torch.where(weight_in > 0, kept / weight_in, 0.0))
    got = merge.ties(base, experts, scale=1.0, density=1.0, scope="tensor", merge="sum", weights=w)["w"]
    torch.testing.assert_close(got, base["w"] + kept)
    # weights of 1 are no weights
    assert torch.equal(merge.ties(base, experts, density=0.5, weights=[1, 1, 1])["w"],
                       merge.ties(base, experts, density=0.5)["w"])
    with pytest.raises(ValueError, match="one number per expert"):
        merge.dare(base, experts, weights=[1.0, 2.0])


# --------------------------------------------------------------------------- edges


def test_parameters_as_inputs_keep_no_graph(gen):
    """dict(model.named_parameters()) is a mapping of tensors too: the result holds no autograd
    graph (it kept ~20x the result alive)."""
    models = [nn.Linear(8, 4) for _ in range(3)]
    base, experts = dict(models[0].named_parameters()), [dict(m.named_parameters()) for m in models[1:]]
    for merged in (merge.ties(base, experts, density=0.5), merge.average(experts),
                   merge.model_stock(base, experts), merge.tsv(base, experts)):
        assert not any(t.requires_grad or t.grad_fn is not None for t in merged.values())


def test_slerp_of_parallel_tensors_at_any_threshold(gen):
    a = {"w": torch.randn(4, 6, generator=gen)}
    for threshold in (0.9995, 1.0, 1.5):
        torch.testing.assert_close(merge.slerp(a, a, 0.5, dot_threshold=threshold)["w"], a["w"])
    # (below 0 every |cos theta| passes it: each tensor interpolated linearly, no slerp at all)
    with pytest.raises(ValueError, match="dot_threshold must be >= 0, got -0.5"):
        merge.slerp(a, {"w": torch.randn(4, 6, generator=gen)}, 0.5, dot_threshold=-0.5)


def test_model_stock_does_not_depend_on_the_task_vectors_size(gen):
    base = {"w": torch.zeros(4, 6)}  # (so that tiny task vectors are exact)
    taus = [torch.randn(4, 6, generator=gen) for _ in range(2)]
    ts = []
    for size in (1.0, 1e-7):
        merged = merge.model_stock(base, [{"w": base["w"] + size * tau} for tau in taus])
        mean = torch.stack([size * tau for tau in taus]).mean(0)
        ts.append(float(((merged["w"] - base["w"]) * mean).sum() / (mean * mean).sum()))  # t
    assert ts[0] == pytest.approx(ts[1], rel=1e-3)


def test_what_the_result_dtype_cannot_hold_is_refused(gen):
    base = {"w": torch.tensor([60000.0, 1.0], dtype=torch.float16)}
    experts = [{"w": torch.tensor([64000.0, 1.5], dtype=torch.float16)} for _ in range(2)]
    with pytest.raises(ValueError, match="'w' is not finite in torch.float16"):
        merge.task_arithmetic(base, experts, scale=1.0)


def test_weights_given_by_a_generator_and_entries_that_are_not_tensors(gen):
    base = {"a": torch.zeros(3), "b": torch.zeros(2)}
    experts = [{"a": torch.ones(3), "b": torch.ones(2)}, {"a": 2 * torch.ones(3), "b": 2 * torch.ones(2)}]
    merged = merge.task_arithmetic(base, experts, scale=1.0, weights=(w for w in (1.0, 0.5)))
    assert torch.equal(merged["b"], torch.full((2,), 2.0))  # (the second tensor had its weights too)
    assert torch.equal(merge.average(experts, weights=iter([1.0, 3.0]))["b"], torch.full((2,), 1.75))
    with pytest.raises(ValueError, match="entry 'x' of base is a dict, not a tensor"):
        merge.task_arithmetic(dict(base, x={}), [dict(e, x={}) for e in experts])
    with pytest.raises(ValueError, match="'a' of base is on the meta device"):
        merge.task_arithmetic({k: v.to("meta") for k, v in base.items()}, experts)
    # (global TIES ranks the task vectors before any tensor is merged: a meta base failed there
    # as torch's "Tensor on device meta is not on the expected device cpu!")
    for wrong, match in (({k: v.to("meta") for k, v in base.items()}, "'a' of base is on the meta device"),
                         (dict(base, x={}), "entry 'x' of base is a dict, not a tensor")):
        with pytest.raises(ValueError, match=match):
            merge.ties(wrong, [dict(e, x={}) if "x" in wrong else e for e in experts])


def test_regmean_of_gpt2_conv1d_layers(gen):
    """GPT-2's Conv1D linears (weight [in, out]) get RegMean's closed form, as nn.Linear ones
    do (they were averaged, silently); the head tied to the embedding is averaged with it."""
    import transformers

    from epmq.stats import gram_matrices

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    experts, grams = [], []
    for k in range(2):
        torch.manual_seed(k)
        model = transformers.GPT2LMHeadModel(config).eval()
        experts.append(model)
        grams.append(gram_matrices(model, [{"input_ids": torch.randint(0, 50, (2, 8), generator=gen)}]))
    conv1d = {f"{n}.weight" for n, m in experts[0].named_modules() if type(m).__name__ == "Conv1D"}
    assert set(grams[0]) == conv1d  # (lm_head: tied to wte, left out)
    by_name = {n: [g[n] for g in grams] for n in grams[0]}
    merged = merge.regmean(experts, by_name, alpha=0.7)
    for name in conv1d:  # the closed form in float64 on the [in, out] layout
        G = [0.7 * g + 0.3 * torch.diag(torch.diagonal(g)) for g in by_name[name]]
        W = [e.state_dict()[name].double() for e in experts]
        G_sum = sum(G) + 1e-8 * float(torch.diagonal(sum(G)).mean()) * torch.eye(G[0].shape[0], dtype=torch.float64)
        B = sum(g @ w for g, w in zip(G, W)) + 1e-8 * float(torch.diagonal(sum(G)).mean()) * sum(W) / 2
        torch.testing.assert_close(merged[name].double(), torch.linalg.solve(G_sum, B), rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    # state dicts name their [in, out] weights; a non-square one left out is named in the error
    states = [e.state_dict() for e in experts]
    again = merge.regmean(states, by_name, alpha=0.7, transposed=conv1d)
    assert all(torch.equal(again[n], merged[n]) for n in merged)
    with pytest.raises(ValueError, match=r"c_attn.weight'\]\[0\] has shape \(16, 16\), expected \(48, 48\); "
                                         r"a weight stored \[in, out\]"):
        merge.regmean(states, {n: g for n, g in by_name.items() if not n.endswith("attn.c_proj.weight")}, alpha=0.7)
    with pytest.raises(ValueError, match=r"grams\['lm_head.weight'\]: the tensor is tied to 'transformer.wte.weight'"):
        merge.regmean(states, {"lm_head.weight": [torch.eye(16)] * 2})
    # a square one fits its grams either way round: state dicts must say which they are
    square = {n: g for n, g in by_name.items() if n.endswith("attn.c_proj.weight")}
    with pytest.raises(ValueError, match=r"square weights of GPT-2's Conv1D names \(\['transformer.h.0.attn.c_proj"
                                         r".weight'\].*transposed=epmq.merge.conv1d_weights\(model\)"):
        merge.regmean(states, square, alpha=0.7)
    told = merge.regmean(states, square, alpha=0.7, transposed=conv1d)
    assert all(torch.equal(told[n], merged[n]) for n in square)
    linear = merge.regmean(states, square, alpha=0.7, transposed=())  # (as GPT-BigCode's nn.Linear)
    assert all(torch.equal(linear[n], merge.regmean(experts, square, alpha=0.7, transposed=())[n]) for n in square)


def test_float64_tensors_are_merged_in_float64(gen):
    base = {"w": torch.randn(8, 8, generator=gen, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)}
    same = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    for merged in (merge.task_arithmetic(base, same), merge.ties(base, same), merge.tsv(base, same),
                   merge.model_stock(base, same), merge.average(same), merge.iso_c(base, same)):
        assert all(torch.equal(merged[k], base[k]) for k in base)  # (7e-8 off in float32)
    tiny = merge.task_arithmetic(base, [{k: v + 1e-9 for k, v in base.items()}], scale=1.0)
    torch.testing.assert_close(tiny["b"] - 1, torch.full((4,), 1e-9, dtype=torch.float64), rtol=1e-6, atol=0)
    # TIES ranks float64 magnitudes by their float32 values, as its thresholds are: density kept
    experts = [{k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
               for _ in range(2)]
    kept = merge.ties(base, experts[:1], density=0.25, scope="tensor")
    assert int((kept["w"] != base["w"]).sum()) == 16


def test_slerp_of_tiny_zero_and_one_dimensional_rows(gen):
    a = {"w": 5e-9 * torch.randn(3, 4, generator=gen), "b": torch.randn(6, generator=gen)}
    b = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(6, generator=gen)}
    for per_row in (False, True):  # (a floor on the norms gave 1.26 a)
        torch.testing.assert_close(merge.slerp(a, a, 0.3, per_row=per_row)["w"], a["w"])
        zero = {"w": torch.zeros(3, 4), "b": torch.zeros(6)}
        torch.testing.assert_close(merge.slerp(zero, b, 0.5, per_row=per_row)["w"], 0.5 * b["w"])  # (not 0.71 b)
    # per row, a vector's entries are rows of one (mergekit): interpolated linearly
    torch.testing.assert_close(merge.slerp(a, b, 0.3, per_row=True)["b"], 0.7 * a["b"] + 0.3 * b["b"])


def test_model_stock_stays_near_the_base_for_task_vectors_pointing_apart(gen):
    base = {"w": torch.randn(4, 6, generator=gen)}
    tau = torch.randn(4, 6, generator=gen)
    for noise in (0.0, 0.01, 0.1):  # mean cosine about -1: t was -4e4 at cos = -0.99995
        experts = [{"w": base["w"] + tau}, {"w": base["w"] - tau + noise * torch.randn(4, 6, generator=gen)}]
        mean_tau = (experts[0]["w"] + experts[1]["w"]) / 2 - base["w"]
        moved = (merge.model_stock(base, experts)["w"] - base["w"]).norm()
        assert moved <= mean_tau.norm() * (1 + 1e-5) + 1e-6  # (t clamped to [-1, 1])
    experts = [{"w": base["w"] + tau}, {"w": base["w"] + tau}]  # cos = 1: t = 1
    torch.testing.assert_close(merge.model_stock(base, experts)["w"], base["w"] + tau)


def test_tensors_of_no_elements(gen):
    base = {"w": torch.randn(0, 4), "v": torch.randn(3, 4, generator=gen)}
    experts = [{k: v + 0.1 for k, v in base.items()} for _ in range(2)]
    for merged in (merge.della(base, experts), merge.model_stock(base, experts, per_row=True),
                   merge.slerp(*experts, per_row=True), merge.ties(base, experts), merge.tsv(base, experts)):
        assert merged["w"].shape == (0, 4)


def test_weighted_mean_without_a_vote_divides_by_the_weights(gen):
    """``merge="mean"`` without a sign vote is the weighted mean of the (thinned) task vectors,
    ``sum_k w_k tau_k / sum_k w_k``, and their plain mean without weights; DARE at density 1 thins
    nothing."""
    base = {"w": torch.randn(3, 20, generator=gen)}
    taus = [torch.randn(3, 20, generator=gen) for _ in range(3)]
    experts = [{"w": base["w"] + t} for t in taus]
    w = [2.0, 0.5, 0.25]
    got = merge.dare(base, experts, scale=0.6, density=1.0, merge="mean", weights=w)["w"]
    torch.testing.assert_close(got, base["w"] + 0.6 * sum(a * t for a, t in zip(w, taus)) / sum(w))
    got = merge.dare(base, experts, scale=0.6, density=1.0, merge="mean")["w"]
    torch.testing.assert_close(got, base["w"] + 0.6 * sum(taus) / 3)


def test_slerp_of_nearly_opposite_tensors_is_linear(gen):
    """|cos theta| > dot_threshold, nearly opposite as well as nearly parallel: no great circle
    (sin theta ~ 0), linear interpolation."""
    x = torch.randn(4, 6, generator=gen)
    y = -x + 1e-3 * x.norm() / 24**0.5 * torch.randn(4, 6, generator=gen)
    cos = float((x * y).sum() / (x.norm() * y.norm()))
    assert -1 < cos < -0.9995
    for t in (0.25, 0.5, 0.8):
        torch.testing.assert_close(merge.slerp({"w": x}, {"w": y}, t=t)["w"], (1 - t) * x + t * y)
    # per row: each row on its own
    rows = merge.slerp({"w": x}, {"w": y}, t=0.3, per_row=True)["w"]
    torch.testing.assert_close(rows, 0.7 * x + 0.3 * y)


def test_weighted_average_weighs_every_expert(gen):
    """``sum_k w_k W_k / sum_k w_k`` with the first expert's weight too (not 1)."""
    experts = [{"w": torch.randn(3, 5, generator=gen)} for _ in range(3)]
    w = [3.0, 1.0, 0.5]
    out = merge.average(experts, weights=w)["w"]
    torch.testing.assert_close(out, sum(a * e["w"] for a, e in zip(w, experts)) / sum(w))


@pytest.mark.parametrize("w", [[0.3, 0.3, 0.3], [0.1] * 6, [1 / 3, 2.5, 0.1, 0.7, 0.2]])
def test_weighted_average_rounds_as_mergekit(w, gen):
    """mergekit's linear (its batched kernel, whose rounding the recorded side-by-side matches): each
    w_k W_k added by addcmul_, divided by the weights' sum in float32, bit for bit; the weights
    summed in float64 divided by another number (0.9 for 0.3 x 3, 0.90000004 in float32)."""
    experts = [{"w": torch.randn(33, 7, generator=gen)} for _ in w]
    weights = torch.tensor(w)
    want = torch.zeros(33, 7)
    for e, w_k in zip(experts, weights):
        want.addcmul_(e["w"], w_k)
    assert torch.equal(merge.average(experts, weights=w)["w"], want.div_(weights.sum()))


def test_weights_whose_float32_sum_is_0_or_inf_are_refused():
    """A float64 sum passed 1 and -0.99999999, which sum to 0 in float32: the merge returned 0 for
    copies of a model of 1s (its weighted mean); 1e39 is inf in float32 (refused as a dtype's range)."""
    ones = {"w": torch.ones(3)}
    for weights, total in (([1.0, -0.99999999], "0.0"), ([1e39, 1.0], "inf")):
        with pytest.raises(ValueError, match=f"sum to {total} in torch.float32"):
            merge.average([ones, ones], weights=weights)
    # (float64 models average in float64, where those weights sum to 1e-08)
    ones = {"w": torch.ones(3, dtype=torch.float64)}
    torch.testing.assert_close(merge.average([ones, ones], weights=[1.0, -0.99999999])["w"], ones["w"])


def tied_llama(noise, seed):
    """A tiny Llama whose head is its embeddings, every weight moved by ``noise`` (``seed``)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    model.config.architectures = ["LlamaForCausalLM"]  # (as from_pretrained's saves name it)
    return model


@pytest.mark.parametrize("method,params", [("dare", dict(density=0.5)), ("della", {}),
                                           ("ties", dict(density=0.3, scope="global")), ("ties", dict(density=0.3))])
def test_a_tied_tensor_is_merged_once(method, params):
    """A module with a tied head lists one tensor under two names: merged once, both names get
    it (DARE and DELLA drew a mask per name, so the two differed; global TIES counted the
    tensor twice in its threshold), as the merge of the state dict holding it once."""
    base, experts = tied_llama(0.0, 0), [tied_llama(0.05, k + 1) for k in range(2)]
    head, embeddings = "lm_head.weight", "model.embed_tokens.weight"
    merged = getattr(merge, method)(base, experts, **params)
    assert torch.equal(merged[head], merged[embeddings])
    once = [{k: v for k, v in m.state_dict().items() if k != head} for m in (base, *experts)]
    single = getattr(merge, method)(once[0], once[1:], **params)
    assert all(torch.equal(single[k], merged[k]) for k in single)


def test_model_stock_filter_wise_in_mergekits_convention_on_tensors_of_more_dimensions():
    """mergekit's filter_wise Model Stock takes the cosines along a tensor's last dimension (a
    convolution's, fused MoE experts'); epmq's own convention, per output channel whole."""
    g = torch.Generator().manual_seed(0)
    W_0 = torch.randn(4, 3, 2, 2, generator=g)
    W_k = [W_0 + 0.1 * torch.randn(W_0.shape, generator=g) for _ in range(3)]
    got = merge.model_stock({"w": W_0}, [{"w": W} for W in W_k], per_row=True, convention="mergekit")["w"]
    rows0, rows = W_0.reshape(-1, 2), [W.reshape(-1, 2) for W in W_k]
    taus = [r - rows0 for r in rows]
    cos = torch.stack([(taus[i] * taus[j]).sum(1) / (taus[i].norm(dim=1) * taus[j].norm(dim=1))
                       for i in range(3) for j in range(i + 1, 3)]).mean(0)[:, None]
    t = 3 * cos / (1 + 2 * cos)
    want = (t * sum(rows) / 3 + (1 - t) * rows0).reshape(W_0.shape)
    torch.testing.assert_close(got, want)


def test_more_merges_on_empty_tensors_and_generators():
    empty = {"w": torch.zeros(0, 4)}
    assert merge.arcee_fusion(empty, [empty])["w"].shape == (0, 4)
    base, experts = {"w": torch.ones(6)}, [{"w": torch.full((6,), 2.0)}, {"w": torch.full((6,), 3.0)}]
    for method in ("dare", "della", "breadcrumbs", "multislerp"):
        fn = getattr(merge, method)
        torch.testing.assert_close(fn(base, (e for e in experts))["w"], fn(base, experts)["w"])
        with pytest.raises(TypeError, match="experts must be a list"):
            fn(base, nn.Linear(2, 2))


def test_names_of_one_tensor_merge_once_only_where_every_input_ties_them():
    """An expert holding the tied pair as two tensors (an untied fine-tune that changed its
    head) has both merged; and an ``out`` that only takes items gets the shared result."""
    base = tied_llama(0.0, 0)
    expert = {k: v.clone() for k, v in base.state_dict().items()}
    expert["lm_head.weight"] += 1.0
    out = merge.task_arithmetic(base, [expert], scale=1.0)
    torch.testing.assert_close(out["lm_head.weight"], expert["lm_head.weight"])
    torch.testing.assert_close(out["model.embed_tokens.weight"], base.model.embed_tokens.weight)

    class Sink:  # (as ShardWriter: items in, nothing out)
        def __init__(self):
            self.items = {}

        def __setitem__(self, name, t):
            self.items[name] = t

    sink = Sink()
    merge.task_arithmetic(base, [tied_llama(0.05, 1)], out=sink)
    assert torch.equal(sink.items["lm_head.weight"], sink.items["model.embed_tokens.weight"])


def test_names_of_one_tensor_in_every_input_stay_one_whatever_else_unties():
    """A three-way tie one expert unties for one name: the other two are still one tensor in
    every input, merged once (DARE's masks alike); an integer buffer of two names is copied."""
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    base = {"A": w, "B": w, "C": w}

    def expert(seed, untie_A):
        t = w + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
        return {"A": t.clone() + 0.5 if untie_A else t, "B": t, "C": t}

    out = merge.dare(base, [expert(1, True), expert(2, False)], density=0.5, scale=1.0)
    assert torch.equal(out["B"], out["C"]) and not torch.equal(out["A"], out["B"])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            index = torch.arange(4)
            self.a.register_buffer("index", index)
            self.b.register_buffer("index", index)

    assert torch.equal(merge.task_arithmetic(Net(), [Net()], scale=1.0)["b.index"], torch.arange(4))


def test_a_tied_base_module_with_experts_of_their_own_heads_is_warned_of():
    """A tied base module, experts with trained heads (untied): the merged state gives the head
    and the embeddings their own merges, as a merge of untied models; loaded into the tied base
    (as the README's load_state_dict), the embeddings took the head's values, silently."""
    import warnings

    base = tied_llama(0.0, 0)
    untied = []
    for k in range(2):
        expert = tied_llama(0.05, k + 1)
        expert.config.tie_word_embeddings = False
        expert.lm_head.weight = torch.nn.Parameter(expert.lm_head.weight.detach().clone() + 0.1)
        untied.append(expert)
    with pytest.warns(UserWarning, match=r"'lm_head.weight' and 'model.embed_tokens.weight' as one tensor"):
        merged = merge.task_arithmetic(base, untied, scale=0.5)
    states = [{n: t.detach().clone() for n, t in m.state_dict().items()} for m in (base, *untied)]
    want = merge.task_arithmetic(states[0], states[1:], scale=0.5)  # (the base untied: no warning)
    assert all(torch.equal(merged[n], want[n]) for n in want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge.task_arithmetic(base, [tied_llama(0.05, 3)], scale=0.5)  # (tied experts: one tensor, merged once)


def test_an_untied_expert_of_a_tied_base_read_from_files_names_the_tie():
    """A tied base's file leaves its head out, an untied expert's holds it: the refusal of the
    state dicts said only "unexpected tensors ['lm_head.weight']", not that the tie is why."""
    base = {n: t for n, t in tied_llama(0.0, 0).state_dict().items() if n != "lm_head.weight"}
    expert = {n: t.detach().clone() for n, t in tied_llama(0.05, 1).state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected tensors \['lm_head.weight'\]; if the base ties them .* "
                                         r"give it as its module"):
        merge.task_arithmetic(base, [expert])
    merged = merge.task_arithmetic(dict(base, **{"lm_head.weight": base["model.embed_tokens.weight"]}), [expert])
    assert set(merged) == set(expert)


def test_a_merge_of_one_model_returns_tensors_of_its_own(gen):
    """multislerp of one expert and karcher of one model returned the model's own float32 tensors
    (the merge's tensors were the input's storage, where every other merge makes new ones): an
    in-place change of the merged state changed the expert silently."""
    expert = {"w": torch.randn(4, 3, generator=gen), "ids": torch.arange(3)}
    kept = {k: v.clone() for k, v in expert.items()}
    for merged in (merge.multislerp(None, [expert]), merge.multislerp({k: v + 1 for k, v in expert.items()}, [expert]),
                   merge.karcher([expert])):
        assert torch.equal(merged["w"], kept["w"])
        merged["w"].add_(1.0)
        merged["ids"].add_(1)
        assert torch.equal(expert["w"], kept["w"]) and torch.equal(expert["ids"], kept["ids"])


def test_karcher_refuses_one_model_given_for_the_list():
    """karcher iterated whatever it was given: one nn.Sequential was merged as a list of its own
    layers (a state dict of 'weight' and 'bias', silently), one state dict as a list of its names
    ("expert 0 must be a state dict ..., got str"). Refused as every other merge refuses it."""
    layers = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    for one in (layers, layers.state_dict()):
        with pytest.raises(TypeError, match="experts must be a list"):
            merge.karcher(one)
    merged = merge.karcher(m for m in (layers, layers))  # (a generator of models is a list)
    assert set(merged) == set(layers.state_dict())


def test_fused_experts_a_state_holds_transposed_are_refused_saying_so():
    """An expert's fused experts held transposed (``gate_up_proj [E, H, 2I]``, as transformers 4
    saved Qwen3-VL-MoE's) were refused naming the two shapes alone; the error says the dims are
    swapped and how to give the expert in the base's layout."""
    base = {"mlp.experts.gate_up_proj": torch.zeros(4, 16, 32)}
    expert = {"mlp.experts.gate_up_proj": torch.zeros(4, 32, 16)}
    with pytest.raises(ValueError, match=r"has shape \(4, 32, 16\), expected \(4, 16, 32\); its dims 1 and 2 "
                                         r"swapped: fused experts saved transposed.*re-save it with transformers 5"):
        merge.task_arithmetic(base, [expert])


def test_numpys_numbers_are_taken_as_pythons():
    """A sweep's values read from numpy arrays: np.float64 (a float) was taken, but np.float32 and
    numpy's integers were refused ('density must be a finite number, got np.float32(0.5)',
    'max_iter must be an int >= 0, got np.int64(3)'); each merges as the Python number does."""
    import numpy as np

    base, experts = hand_models()
    base = {k: v for k, v in base.items() if k != "ids"}
    experts = [{k: v for k, v in e.items() if k != "ids"} for e in experts]
    f32 = np.float32
    calls = [
        (merge.task_arithmetic, dict(scale=f32(0.25), weights=[f32(0.5), np.int64(1), f32(2)])),
        (merge.dare, dict(scale=f32(0.5), density=f32(0.5), seed=3)),
        (merge.ties, dict(density=f32(0.5), scale=np.int32(1))),
        (merge.breadcrumbs, dict(density=f32(0.75), gamma=f32(0.125))),
        (merge.della, dict(density=f32(0.625), epsilon=f32(0.125))),
        (merge.tsv, dict(rank_fraction=f32(0.5))),
        (merge.nearswap, dict(t=f32(0.5))),
        (merge.ram_plus, dict(r=f32(0.25), alpha=f32(0.5))),
    ]
    for method, params in calls:
        python = {k: [float(x) if isinstance(x, np.floating) else int(x) for x in v] if isinstance(v, list)
                  else float(v) if isinstance(v, np.floating) else int(v) for k, v in params.items()}
        experts_of = experts[:1] if method is merge.nearswap else experts
        got, want = method(base, experts_of, **params), method(base, experts_of, **python)
        assert all(torch.equal(got[k], want[k]) for k in want), method.__name__
    got, want = merge.slerp(experts[0], experts[1], t=f32(0.25)), merge.slerp(experts[0], experts[1], t=0.25)
    assert all(torch.equal(got[k], want[k]) for k in want)
    got, want = merge.karcher(experts, max_iter=np.int64(3), tol=f32(0)), merge.karcher(experts, max_iter=3, tol=0.0)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _routed_moe(family, seed):
    """A tiny mixture of experts of two layers, 4 experts of which each token takes 2."""
    import transformers

    torch.manual_seed(seed)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **shape)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        moe_intermediate_size=16, num_experts=4, head_dim=8, **shape)).eval()


def _token_batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 7), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gram_matrices_of_fused_experts_are_each_experts_routed_inputs(family):
    """transformers 5 holds a mixture's experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    outside any nn.Linear: each fused parameter's Gram matrices are its experts', [E, in, in], each
    X_e^T X_e of the tokens routed to expert e, exactly what that expert's linear sees in the
    forward of the model rebuilt one linear per expert."""
    import copy

    from epmq.adapters.moe import MOE_DECODERS, rebuild_experts
    from epmq.stats import HessianStats, gram_matrices

    model, batches = _routed_moe(family, 0), _token_batches(1)
    rebuilt = copy.deepcopy(model)
    rebuild_experts(MOE_DECODERS, rebuilt,
                    lambda name, new: setattr(rebuilt.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2],
                                              new))
    want, hooks = {}, []
    for i, layer in enumerate(rebuilt.model.layers):
        for e in range(4):
            *first, down = layer.mlp.experts[e].projections()
            for param, linear in (("gate_up_proj", first[0]), ("down_proj", down)):
                stats = want[f"model.layers.{i}.mlp.experts.{param}", e] = HessianStats(linear.in_features,
                                                                                          dtype=torch.float64)
                hooks.append(linear.register_forward_pre_hook(lambda m, args, s=stats: s.add_batch(args[0].double())))
    with torch.no_grad():
        for batch in batches:
            rebuilt(**batch)
    grams = gram_matrices(model, batches)
    assert not any(".experts.0." in n for n in grams)  # (the model's own names: the fused parameters')
    for (name, e), stats in want.items():
        assert grams[name].shape == (4, *stats.H.shape)
        assert torch.equal(grams[name][e], stats.H), (name, e)
    assert sum(s.n_tokens for (n, _), s in want.items() if n.endswith("0.mlp.experts.down_proj")) == 2 * 2 * 7 * 3
    # the model is left as it was: its fused experts, which compute what they did
    assert type(model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert "gate_up_proj" in dict(model.model.layers[0].mlp.experts.named_parameters())


def test_gram_matrices_of_a_range_of_experts_are_those_of_the_whole_stack():
    """experts={fused parameter: range} (merge_checkpoints' passes where every expert's would not fit
    in memory): the stack of those experts' Gram matrices, each the one the whole stack holds, the
    per-expert names of those experts alone, the other fused parameters left out and the linears'
    as before; a range that is not consecutive experts, or a name no fused parameter's, is refused."""
    from epmq.stats import gram_matrices

    model, batches = _routed_moe("qwen3_moe", 0), _token_batches(1)
    whole = gram_matrices(model, batches, each_expert=True)
    name = "model.layers.1.mlp.experts.down_proj"
    part = gram_matrices(model, batches, each_expert=True, experts={name: range(1, 3)})
    assert part[name].shape == (2, 16, 16)
    assert torch.equal(part[name], whole[name][1:3])
    experts = {n for n in part if ".experts." in n and n != name}
    assert experts == {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (1, 2)}
    assert all(torch.equal(part[n], whole[n]) for n in experts)
    linears = {n for n in whole if ".experts." not in n}
    assert linears <= set(part) and all(torch.equal(part[n], whole[n]) for n in linears)
    with pytest.raises(ValueError, match="must be a range of consecutive experts, got range\\(0, 4, 2\\)"):
        gram_matrices(model, batches, experts={name: range(0, 4, 2)})
    with pytest.raises(ValueError, match="experts= names \\['model.layers.1.mlp.experts'\\], no fused expert"):
        gram_matrices(model, batches, experts={"model.layers.1.mlp.experts": range(0, 2)})


def test_gram_matrices_of_a_range_past_the_experts_are_refused():
    """experts={fused parameter: range} reaching past the parameter's experts (range(2, 10) of 4, range(-2, 2))
    came back as the stack of the experts it holds, [2, in, in] where the range says 8 and 4, its first
    matrix expert 0's where range(-2, 2) says -2, in silence; refused naming the parameter, the range and
    its number of experts."""
    import re

    from epmq.stats import gram_matrices

    model, batches = _routed_moe("qwen3_moe", 0), _token_batches(1)
    name = "model.layers.1.mlp.experts.down_proj"
    for outside in (range(2, 10), range(-2, 2), range(1, 1)):
        with pytest.raises(ValueError, match=re.escape(f"experts[{name!r}] must be a range within its 4 experts "
                                                       f"(0 to 3), got {outside!r}")):
            gram_matrices(model, batches, experts={name: outside})

def test_gram_matrices_of_fused_experts_are_stacked_without_a_second_copy(tmp_path):
    """A fused parameter's Gram matrices, one per expert, took twice their size at once: an expert's
    gate and up projections (one gate_up_proj) each had a matrix made, one never written, and after the
    passes they were stacked by torch.stack of them all (merge_checkpoints' pass of a DeepSeek-V3
    gate_up_proj's experts within EXPERT_GRAM_BYTES: twice the budget). Each expert's matrix is a
    view of its parameter's stack from the start. The CPU allocator's peak, from the profiler."""
    import json

    import transformers
    from torch.profiler import ProfilerActivity, profile

    from epmq.stats import gram_matrices

    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=8)).eval()
    name = "model.layers.0.mlp.experts.gate_up_proj"  # (16 experts x 256^2 x 8 bytes: 8 MiB)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grams = gram_matrices(model, [{"input_ids": torch.randint(0, 64, (4, 32))}], names={name})
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    allocated = [e["args"]["Total Allocated"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
                 if e.get("name") == "[memory]"]
    stack = grams[name].numel() * 8
    assert grams[name].shape == (16, 256, 256)
    assert max(allocated) - allocated[0] < 1.5 * stack, (max(allocated) - allocated[0]) / stack


def _regmean_by_hand(W_k, G_k, alpha=0.9):
    """RegMean's closed form for one [out, in] weight, as its paper writes it (float64)."""
    G_k = [alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G)) for G in G_k]
    G_sum = sum(G_k)
    ridge = 1e-8 * float(torch.diagonal(G_sum).mean()) or 1.0
    mean = sum(W.double() for W in W_k) / len(W_k)
    A = G_sum + ridge * torch.eye(G_sum.shape[0], dtype=torch.float64)
    B = sum(G @ W.double().T for W, G in zip(W_k, G_k)) + ridge * mean.T
    return torch.linalg.solve(A, B).T


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_regmean_merges_fused_experts_each_by_its_own_gram_matrices(family):
    """Each expert of a fused parameter is merged by RegMean on its own experts' Gram matrices
    (not averaged): W_e = (sum_k W_k,e G_k,e)(sum_k G_k,e)^-1."""
    from epmq.stats import gram_matrices

    models = [_routed_moe(family, k) for k in range(2)]
    grams = [gram_matrices(m, _token_batches(10 + k)) for k, m in enumerate(models)]
    merged = merge.regmean([m.state_dict() for m in models], {n: [g[n] for g in grams] for n in grams[0]})
    for param in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.mlp.experts.{param}"
        W_k = [m.state_dict()[name] for m in models]
        for e in range(4):
            want = _regmean_by_hand([W[e] for W in W_k], [g[name][e] for g in grams])
            torch.testing.assert_close(merged[name][e].double(), want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged[name], (W_k[0] + W_k[1]) / 2, atol=1e-4)


def test_regmean_of_an_expert_no_token_reached_is_the_average_and_said():
    """An expert the router gives no calibration token in any model has zero Gram matrices:
    merged by the plain average, with a warning naming it."""
    from epmq.stats import gram_matrices

    models = [_routed_moe("qwen3_moe", k) for k in range(2)]
    for m in models:
        router = m.model.layers[0].mlp.gate

        def never_3(hidden_states, router=router):  # (Qwen3-MoE's router, expert 3 left out)
            logits = nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
            logits[:, 3] = float("-inf")
            top, index = torch.topk(logits.float().softmax(-1), router.top_k, dim=-1)
            return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index

        router.forward = never_3
    grams = [gram_matrices(m, _token_batches(20 + k)) for k, m in enumerate(models)]
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not any(g[name][3].any() for g in grams) and all(g[name][2].any() for g in grams)
    with pytest.warns(UserWarning, match=r"regmean: experts \[3\] of model\.layers\.0\.mlp\.experts\.gate_up_proj "
                                         r"were routed no calibration token.*plain average"):
        merged = merge.regmean([m.state_dict() for m in models], {n: [g[n] for g in grams] for n in grams[0]})
    W_k = [m.state_dict()[name] for m in models]
    torch.testing.assert_close(merged[name][3], (W_k[0][3] + W_k[1][3]) / 2)
    assert not torch.allclose(merged[name][0], (W_k[0][0] + W_k[1][0]) / 2, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gram_matrices_of_moe_routers_are_of_their_inputs(family):
    """transformers 5's routers (Qwen3MoeTopKRouter, MixtralTopKRouter) hold their weight [E, H]
    outside any nn.Linear and apply it by F.linear: their Gram matrix is that of the block's hidden
    states they route (all tokens), exactly in the first layer, and RegMean merges them by it."""
    from epmq.stats import HessianStats, gram_matrices

    models = [_routed_moe(family, k) for k in range(2)]
    want, hooks = {}, []
    for i, layer in enumerate(models[0].model.layers):
        stats = want[f"model.layers.{i}.mlp.gate.weight"] = HessianStats(32, dtype=torch.float64)
        hooks.append(layer.mlp.gate.register_forward_pre_hook(
            lambda m, args, s=stats: s.add_batch(args[0].reshape(-1, 32).double())))
    with torch.no_grad():
        for batch in _token_batches(10):
            models[0](**batch)
    for h in hooks:
        h.remove()
    grams = [gram_matrices(m, _token_batches(10 + k)) for k, m in enumerate(models)]
    for name, stats in want.items():
        assert stats.n_tokens == 3 * 2 * 7
        if name.startswith("model.layers.0."):
            assert torch.equal(grams[0][name], stats.H), name
        else:  # (the passes run fused experts one linear each: later layers' inputs differ by float rounding,
            # by how much depends on the CPU and its thread count)
            torch.testing.assert_close(grams[0][name], stats.H, rtol=1e-6, atol=1e-5, msg=name)
    merged = merge.regmean([m.state_dict() for m in models], {n: [g[n] for g in grams] for n in grams[0]})
    name = "model.layers.1.mlp.gate.weight"
    W_k = [m.state_dict()[name] for m in models]
    torch.testing.assert_close(merged[name].double(), _regmean_by_hand(W_k, [g[name] for g in grams]),
                               atol=1e-5, rtol=1e-4)


def _tiny_gpt_oss(seed, intermediate_size):
    """A one-layer gpt-oss of 4 experts whose weights are drawn (its experts start at zero)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_regmean_merges_experts_stored_transposed_each_by_its_own_gram_matrices():
    """gpt-oss holds each expert transposed (gate_up_proj [E, H, 2I], gate and up interleaved
    columns; down_proj [E, I, H]), here square per expert: merged as [in, out], whether the experts
    are given as modules or as state dicts with transposed=conv1d_weights(model)."""
    from epmq.stats import gram_matrices

    models = [_tiny_gpt_oss(k, intermediate_size=16) for k in range(2)]
    grams = [gram_matrices(m, _token_batches(30 + k, n=6)) for k, m in enumerate(models)]
    by_name = {n: [g[n] for g in grams] for n in grams[0]}
    transposed = merge.conv1d_weights(models[0])
    assert transposed == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an expert the few tokens may leave unrouted)
        merged = [merge.regmean(models, by_name),
                  merge.regmean([m.state_dict() for m in models], by_name, transposed=transposed)]
    for name in sorted(transposed):
        W_k = [m.state_dict()[name] for m in models]
        for e in range(4):
            if any(g[e].any() for g in by_name[name]):
                want = _regmean_by_hand([W[e].T for W in W_k], [g[e] for g in by_name[name]]).T
                for got in merged:
                    torch.testing.assert_close(got[name][e].double(), want, atol=1e-5, rtol=1e-4)


def test_gram_matrices_of_an_experts_gate_and_up_are_taken_once(monkeypatch):
    """An expert's gate and up projections read its tokens, one tensor: one Gram matrix for both,
    accumulated once, also for an expert the first batch routed no token to (they were two,
    each accumulated: twice the memory and the work of a mixture's largest matrices)."""
    from epmq import stats as stats_mod

    model = _routed_moe("qwen3_moe", 0)
    batches = [{"input_ids": torch.tensor([[5]])}, *_token_batches(40)]  # (one token: 2 experts of 4)
    calls = []
    add_batch = stats_mod.HessianStats.add_batch
    monkeypatch.setattr(stats_mod.HessianStats, "add_batch",
                        lambda self, x, what="": calls.append(what) or add_batch(self, x, what))
    grams = stats_mod.gram_matrices(model, batches)
    assert any(".experts.3.gate_proj" in c for c in calls) and any(".experts.3.down_proj" in c for c in calls)
    assert not [c for c in calls if ".up_proj" in c]
    assert all(grams[f"model.layers.{i}.mlp.experts.gate_up_proj"].any(dim=(1, 2)).all() for i in range(2))


def _never_routes_to_3(model):
    """``model``'s first router (Qwen3-MoE's) never gives expert 3 a token."""
    router = model.model.layers[0].mlp.gate

    def never_3(hidden_states, router=router):
        logits = nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, 3] = float("-inf")
        top, index = torch.topk(logits.float().softmax(-1), router.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index

    router.forward = never_3


def test_regmean_of_an_expert_one_model_routes_no_token_to_says_so():
    """An expert one model's router gives no calibration token while another's does has a zero Gram
    matrix in that model: RegMean gives that model's expert no say (the merge is the others'), which
    was done in silence; a warning names the model, the expert and what was done."""
    from epmq.stats import gram_matrices

    models = [_routed_moe("qwen3_moe", k) for k in range(2)]
    _never_routes_to_3(models[1])
    grams = [gram_matrices(m, _token_batches(20 + k)) for k, m in enumerate(models)]
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert grams[0][name][3].any() and not grams[1][name][3].any()
    with pytest.warns(UserWarning, match=r"regmean: .*no calibration input in one model .*model 1's expert 3 of "
                                         r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*other models' alone"):
        merged = merge.regmean([m.state_dict() for m in models], {n: [g[n] for g in grams] for n in grams[0]})
    W_k = [m.state_dict()[name] for m in models]
    want = _regmean_by_hand([W[3] for W in W_k], [g[name][3] for g in grams])
    torch.testing.assert_close(merged[name][3].double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged[name][3], W_k[0][3], atol=1e-4, rtol=1e-3)  # (model 0's expert)


def test_gram_matrices_of_a_router_that_casts_its_weight_are_of_its_inputs():
    """DeepSeek-V3's router (GLM-4.5's, dots.llm1's, ...) applies its weight cast to float32,
    F.linear(x.float(), self.weight.type(torch.float32)): of a bf16 model the weight F.linear saw was a
    copy, so the router had no Gram matrix and RegMean averaged it, in silence; it has the Gram
    matrix of the hidden states it routes, as in float32."""
    import transformers

    from epmq.stats import HessianStats, gram_matrices

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8)
    model = transformers.DeepseekV3ForCausalLM(config).eval().to(torch.bfloat16)
    name, router = "model.layers.1.mlp.gate.weight", model.model.layers[1].mlp.gate
    want = HessianStats(32, dtype=torch.float64)
    hook = router.register_forward_pre_hook(lambda m, args: want.add_batch(args[0].reshape(-1, 32).double()))
    with torch.no_grad():
        for batch in _token_batches(50):
            model(**batch)
    hook.remove()
    grams = gram_matrices(model, _token_batches(50))
    assert name in grams and want.n_tokens == 3 * 2 * 7
    assert torch.equal(grams[name], want.H)


def _dbrx(seed):
    """A tiny DBRX of two blocks, 4 experts of which each token takes 2: its experts held as three
    [E * I, H] matrices (mlp.w1, mlp.v1; mlp.w2 each expert's down projection transposed)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.DbrxForCausalLM(transformers.DbrxConfig(
        vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))).eval()


def test_gram_matrices_of_dbrxs_w1_and_v1_take_one_range_of_experts():
    """DBRX's w1 and v1 read the experts' tokens and share one stack of Gram matrices: given other
    ranges of experts (experts={w1: range(0, 2), v1: range(2, 4)}), both came back as one stack of
    all four experts, w1's entry [4, in, in] and v1's expert 0 that of expert 2's rows in silence;
    refused, naming both parameters and their ranges. The same range is that of the whole stack."""
    from epmq.stats import gram_matrices

    model, batches = _dbrx(0), _token_batches(1)
    w1, v1 = "transformer.blocks.1.ffn.experts.mlp.w1", "transformer.blocks.1.ffn.experts.mlp.v1"
    with pytest.raises(ValueError, match=r"experts= gives .*mlp\.w1 range\(0, 2\) and .*mlp\.v1 range\(2, 4\): they "
                                         r"read the same tokens and share one stack of Gram matrices"):
        gram_matrices(model, batches, experts={w1: range(0, 2), v1: range(2, 4)})
    whole = gram_matrices(model, batches)
    part = gram_matrices(model, batches, experts={w1: range(2, 4), v1: range(2, 4)})
    assert part[w1] is part[v1] and torch.equal(part[w1], whole[w1][2:4])

def test_regmean_merges_dbrxs_experts_each_by_its_own_gram_matrices():
    """DBRX holds its experts as rows of three [E * I, H] matrices, outside any nn.Linear: they had
    no Gram matrix and RegMean averaged them (warned by merge_checkpoints); each now has its
    experts' Gram matrices [E, in, in] of the tokens routed to each, and each expert's rows are
    merged by RegMean on them (w2's as [in, out]), as modules and as state dicts."""
    import copy

    from epmq.adapters import AUTO
    from epmq.adapters.moe import rebuild_experts
    from epmq.stats import HessianStats, gram_matrices

    models, batches = [_dbrx(k) for k in range(2)], [_token_batches(60 + k) for k in range(2)]
    rebuilt = copy.deepcopy(models[0])
    rebuild_experts(AUTO, rebuilt, lambda name, new: setattr(rebuilt.get_submodule(name.rpartition(".")[0]),
                                                             name.rpartition(".")[2], new))
    want, hooks = {}, []
    for e in range(4):
        w1, _, w2 = rebuilt.transformer.blocks[1].ffn.experts[e].projections()
        for param, linear in (("w1", w1), ("w2", w2)):
            stats = want[param, e] = HessianStats(linear.in_features, dtype=torch.float64)
            hooks.append(linear.register_forward_pre_hook(lambda m, args, s=stats: s.add_batch(args[0].double())))
    with torch.no_grad():
        for batch in batches[0]:
            rebuilt(**batch)
    grams = [gram_matrices(m, b) for m, b in zip(models, batches)]
    prefix = "transformer.blocks.1.ffn.experts.mlp"
    for (param, e), stats in want.items():
        assert grams[0][f"{prefix}.{param}"].shape == (4, *stats.H.shape)
        assert torch.equal(grams[0][f"{prefix}.{param}"][e], stats.H), (param, e)
    assert torch.equal(grams[0][f"{prefix}.v1"], grams[0][f"{prefix}.w1"])
    by_name = {n: [g[n] for g in grams] for n in grams[0]}
    transposed = merge.conv1d_weights(models[0])
    assert {f"{prefix}.w2", "transformer.blocks.0.ffn.experts.mlp.w2"} <= transposed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an expert the few tokens may leave unrouted)
        merged = [merge.regmean(models, by_name),
                  merge.regmean([m.state_dict() for m in models], by_name, transposed=transposed)]
    for param in ("w1", "v1", "w2"):
        name = f"{prefix}.{param}"
        W_k = [m.state_dict()[name].view(4, 16, 32) for m in models]
        for e in range(4):
            if any(g[e].any() for g in by_name[name]):
                flip = (lambda W: W.T) if param == "w2" else (lambda W: W)
                want_e = flip(_regmean_by_hand([flip(W[e]) for W in W_k], [g[e] for g in by_name[name]]))
                for got in merged:
                    assert got[name].shape == (64, 32)
                    torch.testing.assert_close(got[name].view(4, 16, 32)[e].double(), want_e, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged[0][name], (W_k[0] + W_k[1]).view(64, 32) / 2, atol=1e-4)


def test_regmean_of_square_fused_experts_in_state_dicts_is_read_by_their_gate_up_proj():
    """gpt-oss holds each expert transposed, and its down_proj is square per expert ([E, I, H] with
    I == H: 2880 both): given as state dicts with transposed= naming the gate_up_proj alone (as the
    refusal of its shape says), its down_proj was merged as [out, in], the transpose of each expert's
    fit, in silence (Qwen3-MoE's experts.down_proj, of the same name, is [out, in]); without
    transposed= the layout is read from the gate_up_proj's shape beside it, and a transposed= naming
    one of a module's fused experts alone is refused."""
    from epmq.stats import gram_matrices

    models = [_tiny_gpt_oss(k, intermediate_size=32) for k in range(2)]
    grams = [gram_matrices(m, _token_batches(70 + k, n=6)) for k, m in enumerate(models)]
    by_name = {n: [g[n] for g in grams] for n in grams[0]}
    states = [m.state_dict() for m in models]
    with pytest.raises(ValueError, match=r"transposed= names model\.layers\.0\.mlp\.experts\.gate_up_proj but not "
                                         r"model\.layers\.0\.mlp\.experts\.down_proj"):
        merge.regmean(states, by_name, transposed={"model.layers.0.mlp.experts.gate_up_proj"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = merge.regmean(models, by_name)
        for got in (merge.regmean(states, by_name), merge.regmean(states, by_name,
                                                                  transposed=merge.conv1d_weights(models[0]))):
            for name in ("model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"):
                torch.testing.assert_close(got[name], want[name])
    # (Qwen3-MoE's, [out, in], square per expert here: read so)
    models = [_routed_moe("qwen3_moe", k) for k in range(2)]
    assert models[0].model.layers[0].mlp.experts.gate_up_proj.shape[1:] == (32, 32)
    grams = [gram_matrices(m, _token_batches(10 + k)) for k, m in enumerate(models)]
    by_name = {n: [g[n] for g in grams] for n in grams[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = merge.regmean([m.state_dict() for m in models], by_name), merge.regmean(models, by_name)
    assert all(torch.equal(got[n], want[n]) for n in want)


class _KeywordExperts(nn.Module):
    """Fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) of a family no adapter
    lists, whose forward is the usual one under other names, called by its block by keyword."""

    def __init__(self, gen, E=3, H=8, inner=6):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * inner, H, generator=gen) / 3)
        self.down_proj = nn.Parameter(torch.randn(E, H, inner, generator=gen) / 3)
        self.act_fn = nn.SiLU()

    def forward(self, x, expert_ids, weights):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            token, slot = torch.where(expert_ids == e)
            gate, up = (x[token] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (self.act_fn(gate) * up) @ self.down_proj[e].T
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


class _RoutedLayer(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 3, bias=False)
        self.experts = _KeywordExperts(gen)

    def forward(self, h):
        h = h + self.proj(h)
        weights, expert_ids = self.router(h).softmax(-1).topk(2, dim=-1)
        return h + self.experts(x=h, expert_ids=expert_ids, weights=weights)


class _RoutedNet(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.layers = nn.ModuleList([_RoutedLayer(gen) for _ in range(2)])

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return h


def test_gram_matrices_leave_fused_experts_auto_leaves_fused(gen):
    """AUTO (a family no adapter lists) rebuilds only fused experts of transformers' usual call,
    and leaves others fused; gram_matrices rebuilt AUTO's of any call that one test passed, so
    experts of the usual call under other names, called by keyword, met the rebuilt linears'
    (hidden_states, top_k_index, top_k_weights) and RegMean's statistics ended in 'got an
    unexpected keyword argument'. They are left fused, as the walk leaves them: no Gram matrix of
    their own (RegMean averages them, warned), the other linears' as before."""
    from epmq.adapters import AUTO, find_towers
    from epmq.stats import gram_matrices, rebuilt_experts

    model = _RoutedNet(gen).eval()
    assert [a for a, _ in find_towers(model)] == [AUTO]
    batches = [torch.randn(5, 8, generator=gen) for _ in range(2)]
    want = model(batches[0])
    grams = gram_matrices(model, batches)
    assert not rebuilt_experts(model)
    assert not any("experts" in name for name in grams)
    assert {"layers.0.proj.weight", "layers.1.router.weight"} <= set(grams)
    X = torch.cat(batches).double()
    torch.testing.assert_close(grams["layers.0.proj.weight"], X.T @ X)
    torch.testing.assert_close(model(batches[0]), want)  # (put back as it was)


def test_per_expert_values_given_as_arrays_are_taken_as_lists():
    """Per-expert densities given as a numpy array or a torch tensor (a sweep's row) were refused as
    'density must be a finite number, got array([0.5, 0.75, 0.25])', and weights as a tensor as
    'each weight must be a finite number, got tensor(0.5000)'; each merges as the list of its values
    does, with the same checks of their count and values."""
    import numpy as np

    base, experts = hand_models()
    base = {k: v for k, v in base.items() if k != "ids"}
    experts = [{k: v for k, v in e.items() if k != "ids"} for e in experts]
    listed = [0.5, 0.75, 0.25]
    for array in (np.array(listed), np.array(listed, dtype=np.float32), torch.tensor(listed)):
        for method, params in [(merge.ties, dict(density=array, weights=array)),
                               (merge.dare, dict(density=array, seed=3)),
                               (merge.breadcrumbs, dict(density=array, gamma=array / 8)),
                               (merge.della, dict(density=array, epsilon=array / 4)),
                               (merge.task_arithmetic, dict(weights=array))]:
            python = {k: [float(x) for x in v.tolist()] for k, v in params.items() if k != "seed"}
            got, want = method(base, experts, **params), method(base, experts, **{**params, **python})
            assert all(torch.equal(got[k], want[k]) for k in want), (method.__name__, type(array))
        got, want = merge.average(experts, weights=array), merge.average(experts, weights=listed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="density has 2 values for 3 experts"):
        merge.ties(base, experts, density=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"density must be a finite number, got nan"):
        merge.ties(base, experts, density=torch.tensor([0.5, float("nan"), 0.5]))
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 2.0"):
        merge.dare(base, experts, density=np.array([0.5, 2.0, 0.5]))
    with pytest.raises(ValueError, match=r"each weight must be a finite number, got inf"):
        merge.task_arithmetic(base, experts, weights=torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match=r"weights must give one number per expert \(3\)"):
        merge.task_arithmetic(base, experts, weights=np.array([1.0, 1.0]))


def test_fused_experts_in_plain_state_dicts_are_warned_of(gen):
    """A transformers 5 MoE's state dicts (its experts fused, mlp.experts.gate_up_proj [E, 2I, H])
    given as plain dicts were merged by TSV-Merge and Iso-C with the mean task vector (no SVD: not
    a matrix) and by Model Stock, TIES per tensor, Breadcrumbs, DELLA, SCE and DARE's L1 rescaling
    with their statistics over all E experts at once, in silence, where the modules (and a
    checkpoint of one matrix per expert) are merged expert by expert. The dicts alone do not say
    which layout save_pretrained writes (Qwen3-VL-MoE's checkpoints hold them fused too): merged as
    before, with a warning naming the tensor and the way to merge them expert by expert."""
    def models():
        base = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 8, 6, generator=gen),
                "model.layers.0.mlp.experts.down_proj": torch.randn(4, 6, 4, generator=gen),
                "conv.weight": torch.randn(3, 2, 2, 2, generator=gen), "w": torch.randn(5, 6, generator=gen)}
        return base, [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(3)]

    base, experts = models()
    for method, params in [(merge.tsv, {}), (merge.iso_c, {}), (merge.model_stock, {}),
                           (merge.ties, dict(scope="tensor")), (merge.breadcrumbs, {}), (merge.della, {}),
                           (merge.sce, dict(select_topk=0.5)), (merge.dare, dict(rescale="l1"))]:
        with pytest.warns(UserWarning, match=r"'model.layers.0.mlp.experts.gate_up_proj'.* a MoE layer's experts "
                                             r"fused .*give the models as modules"):
            got = method(base, experts, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = method(base, experts, **params)
        assert all(torch.equal(got[n], want[n]) for n in want)  # (merged as before)
    with warnings.catch_warnings():  # (elementwise merges, global ranks, other 3-D tensors: nothing to say)
        warnings.simplefilter("error")
        for method, params in [(merge.task_arithmetic, {}), (merge.ties, {}), (merge.dare, dict(seed=1))]:
            method(base, experts, **params)
        plain = {n: t for n, t in base.items() if ".experts." not in n}
        merge.tsv(plain, [{n: e[n] for n in plain} for e in experts])


def test_fused_experts_in_plain_state_dicts_are_warned_of_by_the_spherical_and_mergekit_merges(gen):
    """The same state dicts of fused experts given to SLERP (its angle), NuSLERP (flattened or row-wise),
    Multi-SLERP and Karcher (their norms and directions), Arcee Fusion (its importances' quartiles) and
    RAM+ (each expert's overlap counted) took those over all E experts at once, in silence, where the
    modules are merged expert by expert; warned of as the other merges' are, merged as before."""
    base = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 8, 6, generator=gen),
            "model.layers.0.mlp.experts.down_proj": torch.randn(4, 6, 4, generator=gen),
            "w": torch.randn(5, 6, generator=gen)}
    experts = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(3)]
    for method, args, params in [
            (merge.slerp, experts[:2], {}), (merge.slerp, experts[:2], dict(per_row=True)),
            (merge.nuslerp, (base, experts[:2]), {}), (merge.nuslerp, (None, experts[:2]), dict(row_wise=True,
                                                                                                  flatten=False)),
            (merge.multislerp, (base, experts), {}), (merge.karcher, (experts,), {}),
            (merge.arcee_fusion, (base, experts[:1]), {}), (merge.ram_plus, (base, experts), {})]:
        with pytest.warns(UserWarning, match=r"'model.layers.0.mlp.experts.gate_up_proj'.* a MoE layer's experts "
                                             r"fused .*give the models as modules"):
            got = method(*args, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = method(*args, **params)
        assert all(torch.equal(got[n], want[n]) for n in want), method  # (merged as before)
    with warnings.catch_warnings():  # (rows along the last dimension, entries alone: those of each expert's matrix)
        warnings.simplefilter("error")
        merge.nuslerp(base, experts[:2], flatten=False)
        merge.ram(base, experts)
        merge.ram_plus(base, experts, r=0)
        merge.nearswap(base, experts[:1])


def test_a_density_of_0_for_every_expert_is_refused_not_merged_into_the_base():
    """TIES, Breadcrumbs, DELLA (mergekit's convention) and SCE at density (select_topk) 0 dropped
    every task vector: the merge returned the base, said nowhere (DARE refused it). One expert's 0
    among others' (mergekit's per-model density) still leaves that expert out."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g)}
    experts = [{"w": base["w"] + torch.randn(8, 8, generator=g)} for _ in range(2)]
    for call, what in [
        (lambda: merge.ties(base, experts, density=0.0), "density"),
        (lambda: merge.ties(base, experts, density=[0.0, 0.0], scope="tensor", convention="mergekit"), "density"),
        (lambda: merge.breadcrumbs(base, experts, density=0.0), "density"),
        (lambda: merge.della(base, experts, density=0.0, epsilon=0.0, convention="mergekit"), "density"),
        (lambda: merge.sce(base, experts, select_topk=0.0), "select_topk"),
    ]:
        with pytest.raises(ValueError, match=f"{what} is 0 for every expert: .* the base"):
            call()
    one_left_out = merge.ties(base, experts, density=[0.0, 0.5])
    assert not torch.equal(one_left_out["w"], base["w"])


@pytest.mark.parametrize("t", [-0.5, 1.5])
def test_slerp_refuses_a_t_outside_0_to_1(t):
    """SLERP interpolates from a (t = 0) to b (t = 1), as its docstring says; t = 1.5 ran the arc
    on past b (sin((1 - t) theta) < 0) into a model that is neither, without a word."""
    g = torch.Generator().manual_seed(0)
    a, b = {"w": torch.randn(4, 4, generator=g)}, {"w": torch.randn(4, 4, generator=g)}
    with pytest.raises(ValueError, match=rf"t \(at w\) must be in \[0, 1\].*got {t}"):
        merge.slerp(a, b, t=t)
    with pytest.raises(ValueError, match=r"t \(at w\) must be in \[0, 1\]"):
        merge.slerp(a, b, t=lambda name: t)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_merge_in_memory_shows_its_tensors_unless_told_not_to(method, gen, capsys):
    """A merge of state dicts held in memory (TSV's and Iso-C's SVD per tensor, minutes on a 7B
    model) said nothing until it returned: a bar of its tensors; silent with progress=False."""
    base = {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    n_experts = 1 if method in ("nearswap", "arcee_fusion") else 2
    experts = [{name: t + 0.1 * torch.randn(t.shape, generator=gen) for name, t in base.items()}
               for _ in range(n_experts)]
    inputs = {"slerp": experts, "average": [experts], "karcher": [experts],
              "regmean": [experts, {"w": [torch.eye(4)] * n_experts}]}.get(method, [base, experts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (regmean's bias without grams: averaged, and said so)
        merged = getattr(merge, method)(*inputs)
        err = capsys.readouterr().err
        assert f"merge {method}: 100%" in err and "2/2" in err, err
        torch.testing.assert_close(getattr(merge, method)(*inputs, progress=False), merged)
    assert capsys.readouterr().err == ""


def test_ties_global_thresholds_pass_shows_its_progress(gen, capsys, monkeypatch):
    """TIES' global trim reads every expert's tensors twice (the top-k over the whole model)
    before the merge's first tensor, minutes on a large model with no bar: a bar of both passes'
    tensors; silent with progress=False."""
    from tqdm.auto import tqdm

    base = {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(4, generator=gen),
            "c": torch.randn(3, generator=gen)}
    experts = [{name: t + 0.1 * torch.randn(t.shape, generator=gen) for name, t in base.items()} for _ in range(2)]
    closed, close = set(), tqdm.close  # (the tensors read of how many, as each bar ends)
    monkeypatch.setattr(tqdm, "close", lambda self: closed.add((getattr(self, "desc", None), self.n, self.total))
                        or close(self))
    merged = merge.ties(base, experts, density=0.5)
    err = capsys.readouterr().err
    assert "ties: global thresholds" in err and "merge ties: 100%" in err, err
    assert ("ties: global thresholds", 6, 6) in closed, closed
    torch.testing.assert_close(merge.ties(base, experts, density=0.5, progress=False), merged)
    assert capsys.readouterr().err == ""
