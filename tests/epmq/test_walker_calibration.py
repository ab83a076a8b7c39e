"""The statistics count what the calibration data holds: real tokens (padded batches are cut by
``calibration.unpad``), every call of a linear, a branch any task takes, and nothing from a task
whose inputs at a layer are all zero."""

import contextlib
import copy
import types
import warnings

import pytest
import torch
import transformers
from torch import nn

import epmq
from epmq import walker
from epmq.stats import gram_matrices
from test_walker_errors import Net, Residual
from test_walker_models import Stack, build, hooked_inputs

SPEC = epmq.QuantSpec(bits=4, group_size=16)


def solved_statistics(monkeypatch):
    """``{layer: H}`` (GPTQ) or ``{layer: (H_e, H_m, G_e, task names)}`` (E-PMQ), as solved."""
    seen = {}
    solve = walker._Walk._solve

    def spy(self, linear, stats, name, factors=None):
        if isinstance(stats, epmq.HessianStats):
            seen[name] = stats.H.clone()
        else:
            seen[name] = tuple(t.clone() for t in stats.finalize()[:3]) + (list(stats.task_names),)
        return solve(self, linear, stats, name, factors)

    monkeypatch.setattr(walker._Walk, "_solve", spy)
    return seen


def padded(rows, side, pad):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        where = slice(0, len(r)) if side == "right" else slice(L - len(r), L)
        ids[b, where], mask[b, where] = r, 1
    return ids, mask


def test_padding_is_no_token_in_a_decoder(gen, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()  # (pad id 0's embedding is not zero)
    rows = [torch.randint(1, 64, (n,), generator=gen) for n in (5, 8, 3, 8)]
    singles = [{"input_ids": r[None], "attention_mask": torch.ones(1, len(r), dtype=torch.long)} for r in rows]
    runs = {}
    for label, items in [("single", singles), *[(side, [dict(zip(("input_ids", "attention_mask"),
                                                                 padded(rows, side, 0)))])
                                                for side in ("right", "left")]]:
        seen = solved_statistics(monkeypatch)
        model = epmq.quantize_model(copy.deepcopy(base), SPEC, method="gptq", calibration={"t": items},
                                    backend="torch", progress=False)
        runs[label] = seen, {e["name"]: e["n_tokens"] for e in model.epmq_report.layers}
    (H_1, n_1) = runs["single"]
    for side in ("right", "left"):
        H, n = runs[side]
        assert n == n_1 and set(n.values()) == {24}
        for name in H_1:
            torch.testing.assert_close(H[name], H_1[name], rtol=1e-12, atol=1e-12, msg=name)
    # RegMean's statistics too
    name = "model.layers.0.self_attn.q_proj.weight"
    grams = [gram_matrices(base, items, names=[name])[name]
             for items in (singles, [dict(zip(("input_ids", "attention_mask"), padded(rows, "right", 0)))])]
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grams[0], H_1["model.layers.0.self_attn.q_proj"], rtol=1e-12, atol=1e-12)


def test_gram_matrices_of_a_model_that_draws_in_eval_mode_are_the_walks(gen, monkeypatch):
    """ViTMAE shuffles and masks its patches by a random draw in eval mode too: RegMean's Gram pass
    runs each batch under the seed the walker gives that item of the task, so its Gram matrices
    do not depend on the caller's random state (which they drew from, and changed), and are the
    GPTQ statistics of the walk of that task's items."""
    torch.manual_seed(0)
    model = transformers.ViTMAEModel(transformers.ViTMAEConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=4, mask_ratio=0.5)).eval()
    items = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)} for _ in range(2)]
    name = "layers.0.attention.q_proj"
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        runs.append(gram_matrices(model, items, names=[f"{name}.weight"])[f"{name}.weight"])
        assert torch.equal(torch.get_rng_state(), state)  # (the caller's draws are its own)
    assert torch.equal(runs[0], runs[1])
    G = gram_matrices(model, items, names=[f"{name}.weight"], task="a")[f"{name}.weight"]
    seen = solved_statistics(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, layers=name, backend="torch",
                        progress=False)
    torch.testing.assert_close(G, seen[name], rtol=1e-12, atol=1e-12)


def test_padding_is_no_token_in_an_encoder_decoder(gen, monkeypatch):
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config).eval()
    inputs = [torch.randint(1, 64, (n,), generator=gen) for n in (6, 3, 6)]
    targets = [torch.randint(1, 64, (n,), generator=gen) for n in (2, 4, 4)]
    singles = [{"input_ids": x[None], "attention_mask": torch.ones(1, len(x), dtype=torch.long), "labels": y[None]}
               for x, y in zip(inputs, targets)]
    ids, mask = padded(inputs, "right", 0)
    labels, _ = padded(targets, "right", -100)
    runs = []
    for items in (singles, [{"input_ids": ids, "attention_mask": mask, "labels": labels}]):
        seen = solved_statistics(monkeypatch)
        epmq.quantize_model(copy.deepcopy(base), SPEC, method="gptq", calibration={"t": items}, backend="torch",
                            progress=False)
        runs.append(seen)
    assert "decoder.block.1.layer.1.EncDecAttention.k" in runs[0]  # (reads the encoder's output)
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-12, atol=1e-12, msg=name)


def block_inputs(model, name, items):
    xs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: xs.append(args[0].double()))
    with torch.no_grad():
        for x in items:
            model(x)
    handle.remove()
    return torch.cat(xs)


class Twice(nn.Module):
    """``a`` called twice, the second time on what its first call made."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        y = x + self.a(x)
        return y + self.a(torch.tanh(y))


@pytest.mark.parametrize("method, targets", [("gptq", "merged_path"), ("epmq", "merged_path"),
                                             ("gptq", "fp_path")])
def test_a_linear_called_twice_counts_both_calls(method, targets, gen, monkeypatch):
    torch.manual_seed(0)
    net = Net(Twice)
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    X = block_inputs(net, "layers.0.a", items)  # (block 0's inputs are the model's: the walk's too)
    assert X.shape == (16, 16)
    expert = copy.deepcopy(net.state_dict())
    seen = solved_statistics(monkeypatch)
    epmq.quantize_model(net, SPEC, method=method, targets=targets, calibration={"t": items},
                        experts={"t": expert} if method == "epmq" else None, backend="torch", progress=False,
                        adapter=epmq.Adapter("twice", block_types=(Twice,)))
    H = seen["layers.0.a"]
    H = H if torch.is_tensor(H) else H[1]  # (E-PMQ: the merged Hessian)
    torch.testing.assert_close(H, X.T @ X, rtol=1e-12, atol=1e-12)


class Branch(nn.Module):
    """``b`` runs only on inputs of positive mean."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        y = x + self.a(x)
        return y + self.b(y) if bool(x.mean() > 0) else y


@pytest.mark.parametrize("order", [("neg", "pos"), ("pos", "neg")])
def test_a_branch_one_task_takes_is_quantized_whatever_the_task_order(order, gen):
    torch.manual_seed(0)
    data = {"neg": [torch.randn(4, 16, generator=gen) - 3], "pos": [torch.randn(4, 16, generator=gen) + 3]}
    model = epmq.quantize_model(Net(Branch), SPEC, method="gptq", calibration={t: data[t] for t in order},
                                backend="torch", progress=False, adapter=epmq.Adapter("branch", block_types=(Branch,)))
    assert isinstance(model.layers[0].b, epmq.QuantLinear)
    assert not model.epmq_report.skipped
    tokens = {e["name"]: e["n_tokens"] for e in model.epmq_report.layers}
    assert tokens["layers.0.a"] == 8 and tokens["layers.0.b"] == 4


class Gated(nn.Module):
    """``b`` reads ``relu(x)``: all zero for inputs that are all negative."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.a(x) + self.b(torch.relu(x))


def test_a_task_whose_inputs_are_zero_at_a_layer_is_left_out_of_it(gen, monkeypatch):
    torch.manual_seed(0)
    net = Net(Gated)
    experts = {t: {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}
               for t in ("neg", "pos")}
    data = {"neg": [-torch.rand(4, 16, generator=gen) - 0.1], "pos": [torch.randn(4, 16, generator=gen)]}
    adapter = epmq.Adapter("gated", block_types=(Gated,))
    seen = solved_statistics(monkeypatch)
    model = epmq.quantize_model(copy.deepcopy(net), SPEC, method="epmq", calibration=data, experts=experts,
                                backend="torch", progress=False, adapter=adapter)
    entry = next(e for e in model.epmq_report.layers if e["name"] == "layers.0.b")
    assert entry["tasks_with_zero_inputs"] == ["task 'neg' at layers.0.b"]
    assert seen["layers.0.b"][3] == ["task 'pos' at layers.0.b"]
    # the layer is E-PMQ of the other task alone
    X = block_inputs(net, "layers.0.b", data["pos"])
    H_e, H_m = seen["layers.0.b"][:2]
    torch.testing.assert_close(H_m, X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H_e, X.T @ X / torch.trace(X.T @ X), rtol=1e-12, atol=1e-12)
    # every task's inputs zero there: rounded to nearest, as a layer no token reaches
    model = epmq.quantize_model(copy.deepcopy(net), SPEC, method="epmq", calibration={"neg": data["neg"]},
                                experts={"neg": experts["neg"]}, backend="torch", progress=False, adapter=adapter)
    assert "layers.0.b" in model.epmq_report.unreached
    rtn = epmq.quant.rtn(net.layers[0].b.weight.detach(), SPEC)
    assert torch.equal(model.layers[0].b.codes().t().to(rtn.codes.dtype), rtn.codes)


@pytest.mark.parametrize("targets", ["merged_path", "fp_path"])
def test_open_clip_text_padding_is_no_token(gen, monkeypatch, targets):
    """open_clip pads texts with zeros after the end token, with no mask: under its causal mask
    and end-token pooling those positions change nothing, and the text tower's statistics leave
    them out (the vision tower keeps every position)."""
    from test_walker_models import build

    model = build("open_clip_clip")
    text = torch.zeros(3, 8, dtype=torch.long)
    for b, n in enumerate((3, 8, 5)):
        text[b, :n - 1] = torch.randint(1, 60, (n - 1,), generator=gen)
        text[b, n - 1] = 63  # the end token: the largest id
    items = [{"image": torch.randn(3, 3, 16, 16, generator=gen), "text": text}]
    real = torch.arange(8)[None, :] < torch.tensor([3, 8, 5])[:, None]
    # (block 0's attention reads what no quantized layer changed: its query, q/k/v's input)
    X_text = block_inputs_of(model, "transformer.resblocks.0.attn", items).reshape(3, 8, -1)[real]
    X_image = block_inputs_of(model, "visual.transformer.resblocks.0.attn", items)
    seen = solved_statistics(monkeypatch)
    quantized = epmq.quantize_model(model, SPEC, method="gptq", targets=targets, calibration={"t": items},
                                    backend="torch", progress=False)
    H = {name: (v if torch.is_tensor(v) else v[1]) for name, v in seen.items()}
    torch.testing.assert_close(H["transformer.resblocks.0.attn.in_proj"], X_text.T @ X_text, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(H["visual.transformer.resblocks.0.attn.in_proj"], X_image.T @ X_image, rtol=1e-12,
                               atol=1e-10)
    # RegMean's statistics count the same tokens (of every linear of the unquantized model)
    names = ["transformer.resblocks.1.mlp.c_fc.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight"]
    grams = gram_matrices(build("open_clip_clip"), items, names=names)
    X = block_inputs_of(build("open_clip_clip"), "transformer.resblocks.1.mlp.c_fc", items).reshape(3, 8, -1)[real]
    torch.testing.assert_close(grams[names[0]], X.T @ X, rtol=1e-12, atol=1e-10)
    X = block_inputs_of(build("open_clip_clip"), "visual.transformer.resblocks.1.mlp.c_fc", items)
    torch.testing.assert_close(grams[names[1]], X.T @ X, rtol=1e-12, atol=1e-10)
    tokens = {e["name"]: e["n_tokens"] for e in quantized.epmq_report.layers}
    assert tokens["transformer.resblocks.1.attn.in_proj"] == 3 + 8 + 5
    assert tokens["visual.transformer.resblocks.1.mlp.c_fc"] == 3 * 5  # (4 patches and the class token)


@pytest.mark.parametrize("pooler", ["mean_pooler", "cls_pooler"])
def test_open_clip_hf_text_tower_padding_is_no_token(pooler, gen, monkeypatch, tmp_path):
    """open_clip's HF text towers (the XLM-R and RoBERTa CLIPs) get their texts padded to the
    context length with the pad id and no attention_mask: the tower masks them itself. Under the
    mean and CLS poolers those positions change nothing, and the statistics leave them out, as
    the README says of padded calibration; they were counted (most of a 77-token context)."""
    from open_clip.model import CustomTextCLIP

    transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, pad_token_id=1)).save_pretrained(tmp_path / "xlmr")
    torch.manual_seed(0)
    model = CustomTextCLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=8, image_size=16,
                                                         patch_size=8, mlp_ratio=2.0),
                           text_cfg=dict(hf_model_name=str(tmp_path / "xlmr"), hf_tokenizer_name=str(tmp_path / "xlmr"),
                                         hf_proj_type="linear", hf_pooler_type=pooler, hf_model_pretrained=False,
                                         context_length=8)).eval()
    text = torch.ones(3, 8, dtype=torch.long)  # (1: the pad id)
    for b, n in enumerate((3, 8, 5)):
        text[b, :n] = torch.randint(2, 64, (n,), generator=gen)
    items = [{"image": torch.randn(3, 3, 16, 16, generator=gen), "text": text}]
    real = text != 1
    name = "text.transformer.encoder.layer.0.attention.self.query"
    X = block_inputs_of(model, name, items).reshape(3, 8, -1)[real]
    seen = solved_statistics(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": items}, layers=lambda n: n == name,
                        backend="torch", progress=False)
    torch.testing.assert_close(seen[name], X.T @ X, rtol=1e-12, atol=1e-10)
    assert model.epmq_report.layers[0]["n_tokens"] == int(real.sum())


def test_open_clip_hf_text_tower_alone_padding_is_no_token(gen, monkeypatch, tmp_path):
    """An open_clip HF text tower (``HFTextEncoder``) quantized alone, as its texts' model: its
    pad-id positions are no tokens either (only the towers inside a CLIP were masked: the
    tower itself, the model, was never looked at, and every pad was counted)."""
    from open_clip.hf_model import HFTextEncoder

    transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, pad_token_id=1)).save_pretrained(tmp_path / "xlmr")
    torch.manual_seed(0)
    tower = HFTextEncoder(str(tmp_path / "xlmr"), output_dim=16, proj_type="linear", pooler_type="mean_pooler",
                          pretrained=False).eval()
    text = torch.ones(3, 8, dtype=torch.long)  # (1: the pad id)
    for b, n in enumerate((3, 8, 5)):
        text[b, :n] = torch.randint(2, 64, (n,), generator=gen)
    real = text != 1
    name = "transformer.encoder.layer.0.attention.self.query"
    hand = []
    handle = tower.get_submodule(name).register_forward_pre_hook(lambda m, args: hand.append(args[0].double()))
    with torch.no_grad():
        tower(text)
    handle.remove()
    X = hand[0][real]
    seen = solved_statistics(monkeypatch)
    epmq.quantize_model(tower, SPEC, method="gptq", calibration={"t": [text]}, layers=lambda n: n == name,
                        backend="torch", progress=False)
    torch.testing.assert_close(seen[name], X.T @ X, rtol=1e-12, atol=1e-10)
    assert tower.epmq_report.layers[0]["n_tokens"] == int(real.sum())


def block_inputs_of(model, name, items):
    """The inputs of module ``name`` (float64, tokens x features) in the unquantized model."""
    return torch.cat(hooked_inputs(model, name, items))


def test_open_clip_token_mask_only_where_padding_changes_nothing():
    from open_clip.transformer import TextTransformer, Transformer

    from epmq.adapters import OPEN_CLIP

    text = torch.tensor([[5, 63, 0, 0], [7, 8, 9, 63]])
    tower = TextTransformer(context_length=4, vocab_size=64, width=32, heads=4, layers=1, output_dim=8)
    assert OPEN_CLIP.token_mask(tower, "transformer.resblocks", text).tolist() == [[True, True, False, False],
                                                                                    [True] * 4]
    tower.output_tokens = True  # (it returns every position's features)
    assert OPEN_CLIP.token_mask(tower, "transformer.resblocks", text) is None

    class Holder(nn.Module):  # (a stack whose name only ends in "transformer.resblocks")
        def __init__(self):
            super().__init__()
            self.img_transformer = Transformer(width=32, layers=1, heads=4)

    assert OPEN_CLIP.token_mask(Holder(), "img_transformer.resblocks", text) is None


def test_open_clip_token_mask_ends_at_the_eos_id_or_not_at_all_with_a_cls_token():
    """``pool_type="eos"``: the tokens up to the first EOS id, not
    the largest id; a tower that appends a CLS embedding (its hidden states are one longer than
    the ids) has no mask."""
    from open_clip.transformer import TextTransformer

    from epmq.adapters import OPEN_CLIP

    text = torch.tensor([[5, 9, 63, 0, 0], [7, 8, 60, 61, 9]])
    eos = TextTransformer(context_length=5, vocab_size=64, width=32, heads=4, layers=1, output_dim=8,
                          pool_type="eos", eos_id=9)
    assert OPEN_CLIP.token_mask(eos, "transformer.resblocks", text).tolist() == [
        [True, True, False, False, False], [True] * 5]
    cls = TextTransformer(context_length=5, vocab_size=64, width=32, heads=4, layers=1, output_dim=8,
                          embed_cls=True, pool_type="argmax")
    assert OPEN_CLIP.token_mask(cls, "transformer.resblocks", text) is None


def _padded_llama():
    """A one-block Llama and a batch of two sequences, the second padded: 9 real tokens."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return model, ids, mask


@pytest.mark.parametrize("form", ["dict", "tuple", "list"])
def test_a_padded_batch_given_positionally_counts_real_tokens(form):
    """``(input_ids, attention_mask)`` as a DataLoader of a TensorDataset yields it: its padding
    is seen (bound to the forward's names), as in the dict form."""
    model, ids, mask = _padded_llama()
    item = {"dict": {"input_ids": ids, "attention_mask": mask}, "tuple": (ids, mask), "list": [ids, mask]}[form]
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [item]}, backend="torch", progress=False)
    assert {layer["n_tokens"] for layer in model.epmq_report.layers} == {9}


def test_a_positional_item_that_puts_a_tensor_in_a_cache_argument_is_named():
    """GPT-2's forward takes its cache second (``cache``; ``past_key_values`` in earlier
    transformers): a TensorDataset's ``(ids, mask)`` gave it the mask as a cache, and the walk
    failed deep inside ("'Tensor' object has no attribute 'get_seq_length'"). The element and
    the argument it lands on are named."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"calibration\['t'\]: the item's element 1 goes to GPT2LMHeadModel"
                                         r"\.forward's (cache|past_key_values) .*'attention_mask': mask"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [(ids, mask)]}, backend="torch",
                            progress=False)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [{"input_ids": ids, "attention_mask": mask}]},
                        backend="torch", progress=False)
    assert {layer["n_tokens"] for layer in model.epmq_report.layers} == {7}


def test_a_positional_item_for_a_required_input_named_state_is_taken():
    """A forward whose input is named ``state`` (a policy's ``forward(state)``; transformers'
    PI0 takes its robot state so) is no cache: a TensorDataset's ``[x]`` was refused as one
    ("goes to Policy.forward's state ... give a dict ... 'input_ids'"). A cache is optional; a
    required parameter is one of the forward's inputs."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, h):
            return h + torch.relu(self.fc(h))

    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.blocks = nn.Linear(8, 32), nn.ModuleList([Block(), Block()])

        def forward(self, state):
            h = self.inp(state)
            for block in self.blocks:
                h = block(h)
            return h

    torch.manual_seed(0)
    model = Policy().eval()
    x = torch.randn(2, 5, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": list(loader)},
                        adapter=epmq.Adapter("policy", Block), backend="torch", progress=False)
    assert {layer["n_tokens"] for layer in model.epmq_report.layers} == {10}


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_a_wrapped_model_sees_the_padding_of_its_batches(wrap):
    """torch.compile's and DataParallel's wrappers take ``*args, **kwargs``: a positional
    ``(input_ids, attention_mask)`` was not bound to the model's names, so its padding entered
    the statistics; and DataParallel has no config, so an encoder-decoder's padded labels were
    not cut (the decoder's statistics took the -100 positions). Read through the wrapper."""
    def wrapped(model):
        return torch.compile(model, backend="eager") if wrap == "compile" else nn.DataParallel(model)

    model, ids, mask = _padded_llama()
    model = wrapped(model)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [(ids, mask)]}, backend="torch",
                        progress=False)
    assert {layer["n_tokens"] for layer in model.epmq_report.layers} == {9}

    t5 = wrapped(build("t5"))
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    epmq.quantize_model(t5, SPEC, method="gptq", calibration={"t": [{"input_ids": ids, "attention_mask": mask,
                                                                     "labels": labels}]},
                        backend="torch", progress=False)
    tokens = {layer["name"].split(".", 1)[1]: layer["n_tokens"] for layer in t5.epmq_report.layers}
    assert tokens["decoder.block.0.layer.0.SelfAttention.q"] == 6
    assert tokens["encoder.block.0.layer.0.SelfAttention.q"] == 9


@pytest.mark.parametrize("caller", ["outside", "inside"])
def test_calibration_tensors_made_under_inference_mode(caller):
    """``inputs_embeds`` (or a plain model's input) made under ``torch.inference_mode``, as
    data prepared for inference often is: the first block gets it as it is, and the walk, which
    reads version counters to see in-place writes, failed with "the model cannot run it
    (Inference tensors do not track version counter)". The result is that of the same values
    made outside the mode, whether or not quantize_model itself is called in it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    state = transformers.LlamaForCausalLM(config).state_dict()
    g = torch.Generator().manual_seed(1)
    embeds, x = torch.randn(2, 6, 32, generator=g), torch.randn(2, 4, 16, generator=g)
    with torch.inference_mode():
        made = embeds.clone(), x.clone()
    results = []
    for e, t in ((embeds, x), made):
        model = transformers.LlamaForCausalLM(config).eval()
        model.load_state_dict(state)
        torch.manual_seed(2)
        net = Net(Residual)
        with torch.inference_mode() if caller == "inside" and e is made[0] else contextlib.nullcontext():
            epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [{"inputs_embeds": e}]},
                                backend="torch", progress=False)
            epmq.quantize_model(net, SPEC, method="gptq", calibration={"t": [t]}, backend="torch", progress=False,
                                adapter=epmq.Adapter("residual", block_types=(Residual,)))
        results.append({**model.state_dict(), **{f"net.{k}": v for k, v in net.state_dict().items()}})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_model_made_under_inference_mode_passing_a_buffer_to_its_blocks():
    """A model built under ``torch.inference_mode`` (its buffers inference tensors) that hands a
    buffer to each block as a keyword argument: the walk's record of the blocks' arguments read
    its version counter (``_versions_of`` ignored the reader it was given, which gives None for
    these) and failed as "the model cannot run it". The result is that of the model built
    outside the mode."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x, scale=None):
            return x + self.fc2(torch.relu(self.fc1(x * scale)))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

        def forward(self, x):
            for block in self.layers:
                x = block(x, scale=self.scale)
            return x

    calibration = {"t": [torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))]}
    states = []
    for mode in (contextlib.nullcontext(), torch.inference_mode()):
        with mode:
            torch.manual_seed(0)
            model = Scaled().eval()
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False,
                            adapter=epmq.Adapter("scaled", block_types=(Block,)))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_an_expert_called_on_no_token_leaves_the_task_out():
    """A hand-written MoE block that calls every expert, on an empty input where the router
    sent it no token of a task: E-PMQ leaves that task out of the expert, as when it is not
    called (it opened the task on the empty input, then found it had no data)."""
    D = 16

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(D, 2)
            self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])

        def forward(self, x):
            flat = x.reshape(-1, D)
            choice = self.router(flat).argmax(-1)
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                idx = (choice == e).nonzero()[:, 0]
                out[idx] = expert(flat[idx])  # (called even on no row)
            return x + out.reshape(x.shape)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x

    torch.manual_seed(0)
    net = Stack().eval()
    with torch.no_grad():
        router = net.layers[0].router
        router.weight.zero_()
        router.bias.zero_()
        router.weight[0], router.weight[1] = 1.0, -1.0
    calibration = {"pos": [torch.rand(1, 4, D) + 0.1], "neg": [-torch.rand(1, 4, D) - 0.1]}
    epmq.quantize_model(net, SPEC, method="epmq", calibration=calibration,
                        adapter=epmq.Adapter("toy", block_types=(Block,)),
                        experts={t: copy.deepcopy(net.state_dict()) for t in calibration}, backend="torch",
                        progress=False)
    tokens = {layer["name"]: layer["n_tokens"] for layer in net.epmq_report.layers}
    assert tokens["layers.0.experts.0"] == 4 and tokens["layers.0.experts.1"] == 4


def test_a_forward_taking_more_positional_arguments_keeps_them_positional():
    """A forward with ``*args`` after the mask: the item stays positional (no keywords say the
    same), as before binding existed."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.lin = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None, *extra):
            h = self.emb(input_ids)
            for e in extra:
                h = h + e
            return self.lin(h)

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 16, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert list(gram_matrices(Net(), [(ids, mask, torch.randn(2, 5, 8))])) == ["lin.weight"]


def test_a_linear_called_more_often_than_the_probe_saw_is_warned_of():
    """A block whose calls depend on its data (a linear applied once, or twice where the input's
    mean is positive): the walk probes each task's first item, and its passes stop after the
    calls seen there, so a later item's extra call is missed. Said, naming the linear."""
    import warnings

    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            y = self.a(x)
            return x + (self.a(y) if bool(x.mean() > 0) else y)

    torch.manual_seed(0)
    items = [-torch.ones(2, 16) + 0.1 * torch.randn(2, 16), torch.ones(2, 16) + 0.1 * torch.randn(2, 16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.quantize_model(Stack(Block()).eval(), epmq.QuantSpec(bits=8, group_size=-1), method="gptq",
                            calibration={"t": items}, backend="torch", progress=False)
    said = [str(w.message) for w in caught if "more than on the items the walk probed" in str(w.message)]
    assert len(said) == 1 and "layers.0.a was called 2 times on item 1 of task 't'" in said[0]


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_a_linear_first_called_on_a_later_item_is_named_with_that_item(gen, method):
    """The walk learns a block's linears from each task's item 0: one called only on a later item
    (a branch on its data) was left in full precision, reported as never called on the calibration.
    Said now, naming the linear and the item that called it; the layers the probe saw are solved."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)

        def forward(self, x):
            y = self.a(x)
            return x + (self.b(y) if bool(x.mean() > 0) else y)

    items = [-torch.ones(2, 16) + 0.1 * torch.randn(2, 16, generator=gen),
             torch.ones(2, 16) + 0.1 * torch.randn(2, 16, generator=gen)]
    net = Stack(Block()).eval()
    experts = {"t": {k: v + 0.01 for k, v in net.state_dict().items()}} if method == "epmq" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.quantize_model(net, epmq.QuantSpec(bits=8, group_size=-1), method=method, calibration={"t": items},
                            experts=experts, backend="torch", progress=False)
    said = [str(w.message) for w in caught if "not when the walk probed the block" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("layers.0.b (item 1 of task 't')")
    assert net.epmq_report.skipped == ["layers.0.b"] and type(net.layers[0].b) is nn.Linear
    assert [layer["name"] for layer in net.epmq_report.layers] == ["layers.0.a"]


@pytest.mark.parametrize("kind", ["xpu", "mps"])
def test_an_items_passes_draw_alike_on_any_accelerator(monkeypatch, kind):
    """Every pass of one calibration item runs under its seed, on the model's device too: only CUDA's
    generator was seeded, so a model on an XPU or Apple's MPS that draws in eval mode (ViTMAE) drew
    other numbers in each pass (its streams paired rows of other patches). Here the accelerator's
    generator is a CPU one standing in for it; the caller's state of it is kept."""
    accelerator = torch.Generator().manual_seed(123)
    module = getattr(torch, kind)
    monkeypatch.setattr(module, "get_rng_state", lambda device=kind: accelerator.get_state())
    monkeypatch.setattr(module, "set_rng_state", lambda state, device=kind: accelerator.set_state(state))
    monkeypatch.setattr(module, "manual_seed", lambda seed: accelerator.manual_seed(seed) and None)
    if hasattr(module, "device"):
        monkeypatch.setattr(module, "device", lambda device: contextlib.nullcontext())

    class Draws(nn.Module):
        def forward(self):
            return torch.rand(4, generator=accelerator)

    state = accelerator.get_state()
    device = torch.device(kind, 0)
    draws = [walker._call(Draws(), {}, device, walker._item_seed("a", 0)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(accelerator.get_state(), state)


def test_an_items_passes_draw_alike_on_every_device_of_a_spread_model(monkeypatch):
    """A model spread over several accelerators (device_map over two GPUs, a block offloaded to
    one) draws on each from that device's generator: only the first parameter's device was seeded,
    so the other's draws differed in each pass of one item. Here two XPUs' generators are CPU ones
    standing in for them, the parameters' devices faked; the caller's states of both are kept."""
    generators = {i: torch.Generator().manual_seed(100 + i) for i in (0, 1)}
    current = [0]

    def index(device):
        return current[0] if device is None else torch.device(device).index

    monkeypatch.setattr(torch.xpu, "get_rng_state", lambda device=None: generators[index(device)].get_state())
    monkeypatch.setattr(torch.xpu, "set_rng_state",
                        lambda state, device=None: generators[index(device)].set_state(state))
    monkeypatch.setattr(torch.xpu, "manual_seed", lambda seed: generators[current[0]].manual_seed(seed) and None)

    @contextlib.contextmanager
    def on(device):
        saved, current[0] = current[0], torch.device(device).index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.xpu, "device", on)

    class Spread(nn.Module):
        def parameters(self, recurse=True):
            return iter([types.SimpleNamespace(device=torch.device("xpu", i)) for i in (0, 1)])

        def buffers(self, recurse=True):
            return iter([])

        def forward(self):
            return torch.cat([torch.rand(4, generator=generators[i]) for i in (0, 1)])

    states = [g.get_state() for g in generators.values()]
    draws = [walker._call(Spread(), {}, torch.device("xpu", 0), walker._item_seed("a", 0)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators.values(), states))


def test_an_item_on_a_device_torch_has_no_module_for_runs_seeded_on_the_cpu():
    """A device whose generator torch does not know (XLA, HPU without their module registered) is
    not forked: the pass runs under the CPU's seed, as before, rather than failing."""

    class Draws(nn.Module):
        def forward(self):
            return torch.rand(4)

    device = torch.device("xla", 0)
    draws = [walker._call(Draws(), {}, device, walker._item_seed("a", 0)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def _grams_of_padded_and_single(model, singles, batch, name):
    """The Gram matrix of ``name`` (RegMean's statistics, the walk's Hessian) over the items one by
    one, and over them as one padded batch."""
    return [gram_matrices(model, items, names=[name])[name] for items in (singles, [batch])]


def test_padding_of_a_protein_lm_given_by_its_sequence_id_is_no_token(gen):
    """ESM C takes its chains' padding as sequence_id -1 (its forward then ignores attention_mask):
    a batch of it with no attention_mask had its pad tokens counted in every Hessian, silently, and
    with one its sequence_id went uncut beside the cut tokens."""
    config = transformers.EsmcConfig(vocab_size=33, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.EsmcForMaskedLM(config).eval()
    rows = [torch.randint(4, 30, (n,), generator=gen) for n in (5, 8, 3)]
    singles = [{"input_ids": r[None]} for r in rows]
    ids, mask = padded(rows, "right", 1)
    chains = torch.where(mask.bool(), 0, -1)
    name = "esmc.layers.0.mlp.down_proj.weight"
    for batch in ({"input_ids": ids, "sequence_id": chains},
                  {"input_ids": ids, "attention_mask": mask, "sequence_id": chains}):
        single, batched = _grams_of_padded_and_single(model, singles, batch, name)
        torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


def tiny_wav2vec2_large(**more):
    """A tiny Wav2Vec2 config of the large encoders' kind (do_stable_layer_norm: blocks named
    Wav2Vec2EncoderLayerStableLayerNorm), its convolutions making 3 frames of 640 samples."""
    return transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=12, **more)


def test_padded_audio_samples_are_no_tokens(gen):
    """A padded batch of raw audio (Wav2Vec2's input_values [B, samples] beside an attention_mask
    of the samples) had its mask cut and its samples not: each row ran its padded samples, whose
    frames were counted in every Hessian of the encoder, silently. Cut as tokens are."""
    config = tiny_wav2vec2_large()
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(config).eval()
    waves = [torch.randn(n, generator=gen) for n in (400, 640, 520)]  # (each its own batch once cut)
    singles = [{"input_values": w[None], "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in waves]
    values = torch.zeros(len(waves), 640)
    mask = torch.zeros(len(waves), 640, dtype=torch.long)
    for b, w in enumerate(waves):
        values[b, :len(w)], mask[b, :len(w)] = w, 1
    name = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    single, batched = _grams_of_padded_and_single(model, singles, {"input_values": values, "attention_mask": mask},
                                                  name)
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_audio_padded_without_a_mask_is_warned_of(gen, normalize):
    """The feature extractors of wav2vec2-base and its kind (return_attention_mask=False) pad a
    batch of clips with no mask: padding_value, or with do_normalize the constant it normalizes
    to. Nothing marked them, so the padded samples' frames were counted in every statistic, in
    silence, the result depending on the batch. They cannot be told from samples for certain (the
    model's own forward attends them too): warned, with how to give the mask that cuts them."""
    import warnings

    from epmq.calibration import unpad

    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(tiny_wav2vec2_large()).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize)
    waves = [torch.randn(n, generator=gen).numpy() for n in (400, 640, 520)]
    batch = dict(extractor(waves, sampling_rate=16000, padding=True, return_tensors="pt"))
    assert set(batch) == {"input_values"}
    with pytest.warns(UserWarning, match=r"input_values without attention_mask.*end in runs of one value.*"
                                         r"counted in every statistic.*return_attention_mask=True"):
        assert unpad(batch, model=model) == [batch]
    with pytest.warns(UserWarning, match="input_values without attention_mask"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [batch]}, backend="torch",
                            progress=False)
    with warnings.catch_warnings():  # (clips of one length, one clip, or the mask: nothing to say)
        warnings.simplefilter("error")
        assert len(unpad(dict(extractor([w[:400] for w in waves], sampling_rate=16000, return_tensors="pt")),
                         model=model)) == 1
        assert len(unpad(dict(extractor(waves[:1], sampling_rate=16000, return_tensors="pt")), model=model)) == 1
        masked = extractor(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
        assert sorted(p["input_values"].shape[1] for p in unpad(dict(masked), model=model)) == [400, 520, 640]


def test_an_audio_lms_features_are_not_cut_by_its_texts_mask(gen):
    """In an audio LM's batch (Qwen2-Audio's, Granite Speech's) attention_mask is the text's; its
    input_features ([B, mels, frames] or [B, frames, features]) went with their row, until the
    audio encoders' cut (8904e7d) took them as cut by any attention_mask of their leading shape:
    texts padded to as many tokens as the features have mels (Qwen2-Audio's 128) or frames had
    the audio cut to each text's length. Beside the text's ids they go with their row."""
    from epmq.calibration import unpad

    ids = torch.randint(5, 50, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    features = torch.randn(2, 16, 30, generator=gen)  # (16 mels of 30 frames, or 16 frames of 30 features)
    parts = unpad({"input_ids": ids, "attention_mask": mask, "input_features": features})
    assert sorted(p["input_ids"].shape[1] for p in parts) == [11, 16]
    for p in parts:
        assert p["input_features"].shape[1:] == (16, 30)
    # (an audio encoder's own mask still cuts them: Speech2Text's frames)
    parts = unpad({"attention_mask": mask, "input_features": features})
    assert sorted(p["input_features"].shape[1] for p in parts) == [11, 16]


def test_padded_audio_cuts_its_per_frame_inputs_with_its_samples(gen):
    """Wav2Vec2ForPreTraining takes mask_time_indices [B, frames] (which frames it masks) beside
    input_values [B, samples]: a padded batch had its samples cut and its frames not, and the
    walk ended in a shape error. Each row's frames are cut with its samples (the model's frames
    of its real samples), as the row alone gives them."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    config = tiny_wav2vec2_large(proj_codevector_dim=16, codevector_dim=16, num_codevectors_per_group=8,
                                 num_codevector_groups=2, mask_time_length=2)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForPreTraining(config).eval()
    lengths = (400, 640, 520)
    frames = [int(model._get_feat_extract_output_lengths(n)) for n in lengths]
    waves = [torch.randn(n, generator=gen) for n in lengths]
    masked = torch.from_numpy(_compute_mask_indices((len(lengths), max(frames)), 0.3, 2, min_masks=1))
    for b, f in enumerate(frames):
        masked[b, f:] = False
    values = torch.zeros(len(waves), max(lengths))
    mask = torch.zeros(len(waves), max(lengths), dtype=torch.long)
    for b, w in enumerate(waves):
        values[b, :len(w)], mask[b, :len(w)] = w, 1
    singles = [{"input_values": w[None], "attention_mask": torch.ones(1, len(w), dtype=torch.long),
                "mask_time_indices": masked[b:b + 1, :frames[b]]} for b, w in enumerate(waves)]
    batch = {"input_values": values, "attention_mask": mask, "mask_time_indices": masked}
    name = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"
    single, batched = _grams_of_padded_and_single(model, singles, batch, name)
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)
    from epmq.calibration import unpad

    with pytest.raises(ValueError, match=r"'mask_time_indices' \(3, 63\) is not per frame of input_values "
                                         r"\(3, 640\) \(their frames unknown"):
        unpad(batch)
    with pytest.raises(ValueError, match="input_values of row 0 padded at the start, beside 'mask_time_indices'"):
        unpad(dict(batch, attention_mask=mask.flip(1)), model=model)


def test_padded_audio_cuts_its_sampled_negatives_as_indices_of_the_rows_frames(gen):
    """Wav2Vec2ForPreTraining's sampled_negative_indices [B, frames, negatives] are indices into the
    batch's frames flattened (row b's offset by b * frames, as _sample_negative_indices gives them):
    cut with the frames but not offset, row 1's pointed past its own frames and gram_matrices ended in
    torch's 'index 123 is out of bounds for dimension 0 with size 63'. Each row's are its own frames'
    indices again, offset by its place among the rows of its length; negatives drawn from padded
    frames are refused by name."""
    import numpy as np
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from epmq.calibration import unpad

    config = tiny_wav2vec2_large(proj_codevector_dim=16, codevector_dim=16, num_codevectors_per_group=8,
                                 num_codevector_groups=2, mask_time_length=2, num_negatives=3)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForPreTraining(config).eval()
    lengths = (400, 640, 520, 400)  # (rows 0 and 3 batched together once cut)
    frames = [int(model._get_feat_extract_output_lengths(n)) for n in lengths]
    L = max(frames)
    waves = [torch.randn(n, generator=gen) for n in lengths]
    np.random.seed(0)
    real = np.arange(L)[None, :] < np.array(frames)[:, None]
    masked = _compute_mask_indices((len(lengths), L), 0.3, 2, min_masks=1) & real
    negatives = torch.from_numpy(_sample_negative_indices((len(lengths), L), 3, mask_time_indices=real)).long()
    values = torch.zeros(len(waves), max(lengths))
    mask = torch.zeros(len(waves), max(lengths), dtype=torch.long)
    for b, w in enumerate(waves):
        values[b, :len(w)], mask[b, :len(w)] = w, 1
    own = [negatives[b:b + 1, :frames[b]] - b * L for b in range(len(waves))]  # (each row's own frames')
    singles = [{"input_values": torch.stack([waves[b] for b in rows]),
                "attention_mask": torch.ones(len(rows), lengths[rows[0]], dtype=torch.long),
                "mask_time_indices": torch.from_numpy(masked[rows, :frames[rows[0]]]),
                "sampled_negative_indices": torch.cat([own[b] + i * frames[b] for i, b in enumerate(rows)])}
               for rows in ([0, 3], [1], [2])]  # (the rows as they were given unpadded)
    batch = {"input_values": values, "attention_mask": mask, "mask_time_indices": torch.from_numpy(masked),
             "sampled_negative_indices": negatives}
    parts = unpad(batch, model=model)
    assert [p["input_values"].shape[0] for p in parts] == [2, 1, 1]
    for part, single in zip(parts, singles):
        torch.testing.assert_close(part["sampled_negative_indices"], single["sampled_negative_indices"])
    name = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"
    single, batched = _grams_of_padded_and_single(model, singles, batch, name)
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)
    anywhere = torch.from_numpy(_sample_negative_indices((len(lengths), L), 3, mask_time_indices=masked | ~real))
    with pytest.raises(ValueError, match=r"'sampled_negative_indices' of row \d+ points to padded frames"):
        unpad(dict(batch, sampled_negative_indices=anywhere.long()), model=model)


def test_padded_audio_features_cut_their_per_frame_inputs_with_their_mask(gen):
    """Wav2Vec2-BERT's mask_time_indices [B, frames] beside input_features [B, frames, dims] and a
    mask of the frames: the features were cut and the frames not ('The shape of the mask [1, 9] at
    index 1 does not match the shape of the indexed tensor [1, 5, 32]'); on the mask's axis, cut."""
    config = transformers.Wav2Vec2BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        feature_projection_input_dim=16, output_hidden_size=32, vocab_size=12, conv_depthwise_kernel_size=3,
        position_embeddings_type=None)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertModel(config).eval()
    lengths = (5, 9, 7)
    features = torch.zeros(len(lengths), max(lengths), 16)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    masked = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for b, n in enumerate(lengths):
        features[b, :n], mask[b, :n], masked[b, 1] = torch.randn(n, 16, generator=gen), 1, True
    singles = [{"input_features": features[b:b + 1, :n], "attention_mask": mask[b:b + 1, :n],
                "mask_time_indices": masked[b:b + 1, :n]} for b, n in enumerate(lengths)]
    batch = {"input_features": features, "attention_mask": mask, "mask_time_indices": masked}
    name = "encoder.layers.0.ffn1.intermediate_dense.weight"
    single, batched = _grams_of_padded_and_single(model, singles, batch, name)
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


def test_audio_whose_rows_end_in_a_few_equal_samples_is_not_warned_of_as_padded(gen):
    """16-bit clips of one length (crops, no padding) often end in two or three equal samples (a
    quiet recording's noise floor of a few steps). The no-mask padding warning took any such
    difference for padding: with wav2vec2's convolutions at a length one sample past a frame's
    edge (16400), one equal sample more in one row warned, and where the model's frames are its
    encoder's (a SpeechEncoderDecoderModel) two more did, at any length. Padding is warned of
    where the run one row has past the others makes a frame of its own; a feature extractor's
    padding still is."""
    import warnings

    from epmq.calibration import unpad

    conv = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8,) * 7,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    wav2vec2 = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conv)).eval()
    decoder = transformers.BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, is_decoder=True, add_cross_attention=True)
    speech = transformers.SpeechEncoderDecoderModel(
        encoder=wav2vec2, decoder=transformers.BertLMHeadModel(decoder)).eval()

    def clips(n, equal):
        values = torch.round(torch.randn(2, n, generator=gen) * 8) / 32768
        values[0, n - 1 - equal:] = values[0, n - 1 - equal]  # (its last sample and `equal` more alike)
        values[1, -1] = values[1, -2] + 1 / 32768
        return {"input_values": values}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(unpad(clips(16400, 1), model=wav2vec2)) == 1
        assert len(unpad({**clips(16000, 2), "decoder_input_ids": torch.ones(2, 3, dtype=torch.long)},
                         model=speech, encoder_decoder=True)) == 1
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=False)
    waves = [torch.randn(n, generator=gen).numpy() for n in (16000, 12000)]
    batch = dict(extractor(waves, sampling_rate=16000, padding=True, return_tensors="pt"))
    for model, more in ((wav2vec2, {}), (speech, {"decoder_input_ids": torch.ones(2, 3, dtype=torch.long)})):
        with pytest.warns(UserWarning, match="input_values without attention_mask"):
            unpad({**batch, **more}, model=model, encoder_decoder=bool(more))


def test_audio_with_a_clip_of_digital_silence_is_not_warned_of_as_padded(gen):
    """A batch of clips of one length (no padding) holding a clip of digital silence (all zeros: a
    muted channel, a silent stretch cut from a recording) was warned of as padded without a mask:
    its run of one value, the whole clip, was taken for padding. A row of one value throughout
    says nothing of padding; the other rows still do (a padded clip beside it is warned of)."""
    import warnings

    from epmq.calibration import unpad

    conv = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8,) * 7,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conv)).eval()
    for normalize in (False, True):
        extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize)
        silent, loud = torch.zeros(16000).numpy(), torch.randn(16000, generator=gen).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batch = dict(extractor([silent, loud], sampling_rate=16000, return_tensors="pt"))
            assert unpad(batch, model=model) == [batch]
        batch = dict(extractor([silent, loud, loud[:12000]], sampling_rate=16000, padding=True, return_tensors="pt"))
        with pytest.warns(UserWarning, match="input_values without attention_mask"):
            unpad(batch, model=model)


def test_audio_padded_without_a_mask_given_positionally_is_warned_of(gen):
    """A batch of padded clips given positionally, as a DataLoader of a TensorDataset of the
    feature extractor's input_values yields it ((values,)), had no word of its padding: the item
    was read by its forward's names only where it passed a mask. input_values are read by name
    too, so the padding is warned of as in a dict."""
    from epmq.calibration import unpad

    conv = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8,) * 7,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conv)).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=False)
    waves = [torch.randn(n, generator=gen).numpy() for n in (16000, 12000)]
    values = extractor(waves, sampling_rate=16000, padding=True, return_tensors="pt")["input_values"]
    for item in ((values,), [values]):
        with pytest.warns(UserWarning, match="input_values without attention_mask"):
            (part,) = unpad(item, model=model)
        assert torch.equal(part["input_values"], values)


def test_padded_audio_drops_a_clip_too_short_to_make_a_frame(gen):
    """A padded batch (with its mask) that the model runs, holding a clip too short for a frame (300
    samples, 19 ms: a truncated file), was cut into that clip alone, which the convolutions cannot
    run: the walk refused the batch ('the model cannot run it (RuntimeError: ... Kernel size can't
    be greater than actual input size)'). Such a row has no frame, as a row of padding has no
    token: dropped, with a warning naming it; the other rows are the batch's statistics."""
    from epmq.calibration import unpad

    conv = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8,) * 7,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conv)).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    waves = [torch.randn(n, generator=gen).numpy() for n in (16000, 300, 12000)]
    batch = dict(extractor(waves, sampling_rate=16000, padding=True, return_tensors="pt"))
    with pytest.warns(UserWarning, match=r"row 1 of input_values: its 300 samples make no frame of Wav2Vec2Model"):
        parts = unpad(batch, model=model)
    assert sorted(p["input_values"].shape[1] for p in parts) == [12000, 16000]
    rest = dict(extractor([waves[0], waves[2]], sampling_rate=16000, padding=True, return_tensors="pt"))
    name = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    with pytest.warns(UserWarning, match="make no frame"):
        dropped, kept = _grams_of_padded_and_single(model, [rest], batch, name)
    torch.testing.assert_close(dropped, kept, rtol=1e-10, atol=1e-10)



def test_a_batch_of_clips_too_short_to_make_a_frame_is_left_out(gen):
    """A clip too short for a frame (300 samples, a truncated file) was left out of a padded batch,
    but alone in its batch (batch_size=1, the last batch of a draw, clips of one length) the walk
    refused the whole calibration on it ('the model cannot run it (RuntimeError: ... Kernel size
    can't be greater than actual input size)'), as the draw fell. Such a batch has no frame, as a
    batch of padding no token: left out with a warning, the quantized model the one of the others."""
    conv = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, conv_dim=(8,) * 7,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conv)).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    waves = [torch.randn(n, generator=gen).numpy() for n in (16000, 12000, 300, 300)]
    batch = lambda *rows: dict(extractor([waves[i] for i in rows], sampling_rate=16000, padding=True,  # noqa: E731
                                         return_tensors="pt"))
    spec, out = epmq.QuantSpec(bits=4, group_size=-1), {}
    for name, batches in (("others", [batch(0, 1)]), ("with", [batch(0, 1), batch(2)]),
                          ("both", [batch(0, 1), batch(2, 3)])):
        quantized = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epmq.quantize_model(quantized, spec, method="gptq", calibration={"a": batches}, progress=False)
        assert (name == "others") != any("300 samples make no frame of Wav2Vec2Model" in str(w.message)
                                         for w in caught), name
        out[name] = quantized.state_dict()
    for name in ("with", "both"):
        assert all(torch.equal(out[name][n], out["others"][n]) for n in out["others"]), name


@pytest.mark.parametrize("targets", ["merged_path", "fp_path"])
def test_open_clip_text_tokens_are_found_once_per_item(gen, monkeypatch, targets):
    """The text tower's token mask was copied to the device and applied as a boolean index at
    every call of a linear that leads its input, in every pass over every block (on a GPU each a
    wait for the device to count the tokens): found once per item and stream, the rows taken by
    their indices, the statistics bit for bit the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from test_walker_models import build

    text = torch.zeros(3, 8, dtype=torch.long)
    for b, n in enumerate((3, 8, 5)):
        text[b, :n - 1] = torch.randint(1, 60, (n - 1,), generator=gen)
        text[b, n - 1] = 63  # the end token: the largest id
    items = [{"image": torch.randn(3, 3, 16, 16, generator=gen), "text": text},
             {"image": torch.randn(3, 3, 16, 16, generator=gen), "text": text.flip(0)}]
    real = [torch.arange(8)[None, :] < torch.tensor(n)[:, None] for n in ([3, 8, 5], [5, 8, 3])]
    selections = []

    class Selections(TorchDispatchMode):  # (boolean selections by a [3, 8] mask: the tokens counted)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.nonzero.default or func is torch.ops.aten.index.Tensor:
                masks = args[:1] if func is torch.ops.aten.nonzero.default else args[1]
                if any(m is not None and m.dtype == torch.bool and m.shape == (3, 8) for m in masks):
                    selections.append(func)
            return func(*args, **(kwargs or {}))

    model = build("open_clip_clip")
    X_text = torch.cat([block_inputs_of(model, "transformer.resblocks.0.attn", [item]).reshape(3, 8, -1)[r]
                        for item, r in zip(items, real)])
    seen = solved_statistics(monkeypatch)
    with Selections():
        epmq.quantize_model(model, SPEC, method="gptq", targets=targets, calibration={"t": items},
                            backend="torch", progress=False)
    streams = 1 if targets == "merged_path" else 2
    assert len(selections) == streams * len(items)
    H = seen["transformer.resblocks.0.attn.in_proj"]
    H = H if torch.is_tensor(H) else H[1]
    torch.testing.assert_close(H, X_text.T @ X_text, rtol=1e-12, atol=1e-10)
