"""Merging models whose vocabularies differ: epmq.vocabulary and merge_checkpoints(tokenizer_source=...)."""

import json
import warnings

import numpy as np
import pytest
import torch
import transformers
import yaml

from epmq import merge_checkpoints
from epmq.benches.tiny import word_level_tokenizer
from epmq.cli import main
from epmq.vocabulary import Vocabulary, build_vocabulary, check_tokenizer_source, vocabulary_names

WORDS = [f"w{i}" for i in range(24)]


def expert(root, name, added=(), noise=0.05, seed=0, config=transformers.LlamaConfig):
    """A tiny Llama (or another ``config``'s model; untied head) fine-tuned by noise, with ``added``
    tokens: its embeddings and head resized to them, their rows random, as training leaves them."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    tok = word_level_tokenizer(root / name, WORDS, added)
    if added:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g) * p.abs().mean())
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return dict(base=expert(root, "base", noise=0.0),
                chat=expert(root, "chat", [("<|im_start|>", True), ("<|im_end|>", True)], seed=1),
                tool=expert(root, "tool", [("<tool>", False), ("<|im_end|>", True)], seed=2),
                plain=expert(root, "plain", seed=3))


def rows_by_rule(vocabulary, tensors, base):
    """Each model's rows by the rules, token by token (the reference for ``Vocabulary.align``)."""
    keys = list(tensors)
    out = {}
    for k in keys:
        t = torch.zeros(vocabulary.rows, *tensors[k].shape[1:])
        for i in range(vocabulary.size):
            has = [m for m in keys if vocabulary.index[m][i] >= 0]
            row = lambda m: tensors[m][vocabulary.index[m][i]]  # noqa: E731
            if k in has:
                t[i] = row(k)
            elif len(has) == 1:
                t[i] = row(has[0])
            elif base in has:
                t[i] = row(base)
            elif has:
                t[i] = sum(row(m) for m in has) / len(has)
        t[vocabulary.size:] = t[:vocabulary.size].mean(0)
        out[k] = t
    return out


@pytest.mark.parametrize("base", ["b", None])
def test_align_follows_the_rules_token_by_token(base):
    """A token a model has keeps its row; one it lacks takes the only holder's row, else the
    base's, else the holders' mean, else zeros (warned); padding rows are each model's mean."""
    size, rows = 9, 12
    index = {"b": torch.tensor([0, 1, 2, -1, -1, -1, 3, -1, 4]),
             "x": torch.tensor([1, 0, -1, 2, 3, -1, 4, -1, 5]),
             "y": torch.tensor([0, 1, 2, -1, 3, 4, -1, -1, 5])}
    vocabulary = Vocabulary(None, size, rows, index, base)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(int(v.max()) + 2, 3, generator=g) for k, v in index.items()}
    vocabulary.tokenizer = type("T", (), {"get_vocab": lambda self: {f"t{i}": i for i in range(size)}})()
    with pytest.warns(UserWarning, match="1 tokens in no model"):
        aligned = vocabulary.align(tensors)
    expected = rows_by_rule(vocabulary, tensors, base)
    for k in tensors:
        assert aligned[k].shape == (rows, 3)
        assert torch.allclose(aligned[k], expected[k], rtol=0, atol=1e-6), k
    assert torch.equal(aligned["x"][7], torch.zeros(3))


def test_union_vocabulary_of_experts_with_added_tokens(models):
    """The union is the base's tokens, then the experts' added tokens in the models' order, each
    once; every model's index finds each of its tokens at its own id."""
    keys = ["base", "chat", "tool", "plain"]
    tokenizers = {k: transformers.AutoTokenizer.from_pretrained(models[k]) for k in keys}
    rows = {"base": 24, "chat": 26, "tool": 26, "plain": 24}
    vocabulary = build_vocabulary("union", tokenizers, rows, base="base", pad_to_multiple_of=8)
    vocab = vocabulary.tokenizer.get_vocab()
    assert (vocabulary.size, vocabulary.rows) == (27, 32)
    assert [t for t, i in sorted(vocab.items(), key=lambda item: item[1])][24:] == ["<|im_start|>", "<|im_end|>",
                                                                                    "<tool>"]
    for k in keys:
        own = tokenizers[k].get_vocab()
        for token, i in vocab.items():
            assert int(vocabulary.index[k][i]) == own.get(token, -1), (k, token)
    assert tokenizers["base"].get_vocab() == {w: i for i, w in enumerate(WORDS)}  # (the base's own is untouched)
    special = {a.content: a.special for a in vocabulary.tokenizer.added_tokens_decoder.values()}
    assert special["<|im_end|>"] and not special["<tool>"]
    by_base = build_vocabulary("base", tokenizers, rows, base="base")
    assert (by_base.size, by_base.rows) == (24, 24) and int(by_base.index["chat"][5]) == 5


@pytest.mark.parametrize("source", ["union", "base"])
def test_merging_experts_with_added_tokens(models, tmp_path, source):
    """Task arithmetic of experts with added tokens: every model's embeddings and head laid
    out by the output tokenizer first, so that each merged row is the merge of that token's
    rows; the output carries that tokenizer and vocab_size, and loads and runs."""
    out = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"], models["plain"]], tmp_path / "m",
                            base=models["base"], params=dict(scale=1.0), tokenizer_source=source,
                            pad_to_multiple_of=4 if source == "union" else None, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    states = {k: transformers.AutoModelForCausalLM.from_pretrained(models[k]).state_dict() for k in models}
    toks = {k: transformers.AutoTokenizer.from_pretrained(models[k]).get_vocab() for k in models}
    vocab = tok.get_vocab()
    size = len(vocab)
    rows = -(-size // 4) * 4 if source == "union" else size
    assert size == (27 if source == "union" else 24)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows == merged.config.vocab_size
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        M = merged.state_dict()[name]
        assert M.shape[0] == rows
        for token, i in vocab.items():
            has = [k for k in models if token in toks[k]]
            row = {k: states[k][name][toks[k][token]] for k in has}
            default = (row[has[0]] if len(has) == 1 else row["base"] if "base" in has
                       else sum(row.values()) / len(has))
            of = {k: row.get(k, default) for k in models}
            expected = of["base"] + sum(of[k] - of["base"] for k in ("chat", "tool", "plain"))
            assert torch.allclose(M[i], expected, atol=1e-6), (name, token)
    W = merged.state_dict()["model.layers.0.mlp.up_proj.weight"]
    expected = sum(states[k]["model.layers.0.mlp.up_proj.weight"] for k in ("chat", "tool", "plain")) \
        - 2 * states["base"]["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(W, expected, atol=1e-6)
    ids = tok("w3 w5 <|im_end|>", return_tensors="pt").input_ids if source == "union" else torch.tensor([[3, 5]])
    assert ids.max() < size and torch.isfinite(merged(ids).logits).all()
    recipe = json.loads((out / "epmq_merge.json").read_text())
    assert recipe["tokenizer_source"] == source


def test_laid_out_embeddings_are_let_go_after_their_merge(models, tmp_path, monkeypatch):
    """Every model's laid-out embeddings (and head) are held while that tensor is merged, not
    through the merge of the layers after it: a 70B union merge of three experts held four
    embeddings (GBs) to the end."""
    import gc
    import weakref

    from epmq import checkpoint, vocabulary

    made, seen = [], {}
    align, put = vocabulary.Vocabulary.align, checkpoint.ShardWriter.__setitem__

    def counted(self, tensors, *args, **kwargs):
        out = align(self, tensors, *args, **kwargs)
        made.extend(weakref.ref(t) for t in out.values())
        return out

    def written(self, name, t):
        gc.collect()
        seen[name] = sum(r() is not None for r in made)
        return put(self, name, t)

    monkeypatch.setattr(vocabulary.Vocabulary, "align", counted)
    monkeypatch.setattr(checkpoint.ShardWriter, "__setitem__", written)
    merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m", base=models["base"],
                      tokenizer_source="union", progress=False)
    assert seen["model.embed_tokens.weight"] == 3  # (the base's and both experts', for the merge of it)
    layers = {n: k for n, k in seen.items() if n.startswith("model.layers.")}
    assert layers and not any(layers.values()), layers


def test_different_vocabularies_without_a_source(models, tmp_path):
    """Without tokenizer_source, embeddings of other sizes are refused naming the remedy, and
    tokenizers that give one row different tokens are warned about."""
    with pytest.raises(ValueError, match="24 embedding rows.*26|26 embedding rows.*24"):
        merge_checkpoints("task_arithmetic", [models["chat"], models["plain"]], tmp_path / "m", base=models["base"],
                          progress=False)
    assert not (tmp_path / "m").exists()
    swapped = expert(tmp_path, "swapped", seed=4)
    word_level_tokenizer(swapped, WORDS[:2] + [WORDS[3], WORDS[2]] + WORDS[4:])  # (two ids swapped)
    with pytest.warns(UserWarning, match="may stand for different tokens"):
        merge_checkpoints("task_arithmetic", [swapped, models["plain"]], tmp_path / "w", base=models["base"],
                          progress=False)
    out = merge_checkpoints("task_arithmetic", [swapped, models["plain"]], tmp_path / "u", base=models["base"],
                            params=dict(scale=1.0), tokenizer_source="union", progress=False)
    E = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()["model.embed_tokens.weight"]
    states = {k: transformers.AutoModelForCausalLM.from_pretrained(p).state_dict()["model.embed_tokens.weight"]
              for k, p in (("base", models["base"]), ("s", swapped), ("p", models["plain"]))}
    assert torch.allclose(E[2], states["s"][3] + states["p"][2] - states["base"][2], atol=1e-6)  # (by token)


def test_bad_tokenizer_sources_raise_before_reading(models, tmp_path):
    for kwargs, match in [(dict(tokenizer_source="mine"), "tokenizer_source must be one of"),
                          (dict(pad_to_multiple_of=8), "pad_to_multiple_of pads the vocabulary"),
                          (dict(tokenizer_source="union", pad_to_multiple_of=0), "positive integer")]:
        with pytest.raises(ValueError, match=match):
            merge_checkpoints("task_arithmetic", [models["chat"]], tmp_path / "m", base=models["base"],
                              progress=False, **kwargs)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True))
    # a tied head is laid out where the checkpoint stores it too (a raw state dict), else only the embeddings
    assert vocabulary_names(tied, ["model.embed_tokens.weight", "lm_head.weight"]) == ["model.embed_tokens.weight",
                                                                                       "lm_head.weight"]
    assert vocabulary_names(tied, ["model.embed_tokens.weight"]) == ["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="not a token embedding"):
        vocabulary_names(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=8,
            patch_size=4)), ["embeddings.patch_embedding.weight"])


def test_mergekit_yaml_with_added_tokens_runs(models, tmp_path, capsys):
    """A mergekit config with tokenizer_source: union over experts with added tokens runs as it
    is through ``epmq merge``."""
    config = dict(merge_method="task_arithmetic", base_model=str(models["base"]), dtype="float32",
                  tokenizer={"source": "union", "pad_to_multiple_of": 4},
                  models=[dict(model=str(models[k]), parameters=dict(weight=1.0)) for k in ("chat", "tool")])
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == 27
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 28


def test_e_pmq_of_a_merge_over_added_tokens(models, tmp_path):
    """E-PMQ quantizes a union merge from experts with fewer tokens: its default targets read
    the experts' block weights only; expert-path targets run each expert on the merged model's
    token ids through a map of its rows (quantize_checkpoint builds it from the tokenizers),
    and without one (experts given to quantize_model as they are) are refused naming the
    vocabularies."""
    from epmq import QuantSpec, quantize_checkpoint

    merged = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m",
                               base=models["base"], tokenizer_source="union", progress=False)
    calibration = {}
    for task in ("chat", "tool"):
        (tmp_path / f"{task}.txt").write_text("\n".join("w1 w2 w3 <|im_end|> w4 <tool> w5 <|im_start|>"
                                                        for _ in range(8)))
        calibration[task] = str(tmp_path / f"{task}.txt")
    experts = {t: str(models[t]) for t in ("chat", "tool")}
    kwargs = dict(spec=QuantSpec(bits=4, group_size=8), calibration=calibration, experts=experts, samples=2,
                  seq_len=8, progress=False)
    out = quantize_checkpoint(merged, tmp_path / "q", **kwargs)
    from epmq import load_quantized

    quantized = load_quantized(out)
    ids = transformers.AutoTokenizer.from_pretrained(out)("w1 <tool> w2", return_tensors="pt").input_ids
    assert ids.max() == 26 and torch.isfinite(quantized(ids).logits).all()
    # expert-path targets: each expert runs on the merged model's token ids through its row of each
    # token, the merged model's row where it lacks the token
    out = quantize_checkpoint(merged, tmp_path / "q2", targets="expert_path", **kwargs)
    assert torch.isfinite(load_quantized(out)(ids).logits).all()
    from epmq import quantize_model
    from epmq.experts import OnVocabulary

    # quantize_model maps them too where the model was loaded from a directory with its tokenizer; a
    # model that does not say where it came from cannot, and experts of other rows are refused
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    calibration = {t: [torch.tensor([[1, 2, 3, 26]])] for t in experts}
    quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path", experts=experts,
                   calibration=calibration, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    model.name_or_path = ""  # (the experts' tokenizers disagree among themselves: refused)
    with pytest.raises(ValueError, match=r"experts of \['chat', 'tool'\] number the tokens differently.*OnVocabulary"):
        quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                       experts=experts, calibration=calibration, progress=False)
    chat_alone = {"chat": experts["chat"]}  # (one expert, no tokenizer to map it by: its rows are refused)
    with pytest.raises(ValueError, match="has 26 token embeddings.*the merged model 27.*vocabularies differ"):
        quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                       experts=chat_alone, calibration={"chat": calibration["chat"]}, progress=False)
    with pytest.raises(ValueError, match="row map has 5 rows"):
        quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                       experts={t: OnVocabulary(p, torch.arange(5)) for t, p in experts.items()},
                       calibration=calibration, progress=False)


def test_expert_path_maps_an_expert_with_the_same_rows_numbered_otherwise(models, tmp_path):
    """An expert with as many rows as the merged model but its added tokens in another order
    runs through its row map (a row count check cannot see it): the same quantized model as
    with the expert numbered as the merged model, from quantize_model and quantize_checkpoint."""
    from epmq import QuantSpec, quantize_model

    merged = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m",
                               base=models["base"], tokenizer_source="union", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(models["chat"])
    tok = word_level_tokenizer(tmp_path / "chat_same", WORDS, [("<|im_start|>", True), ("<|im_end|>", True),
                                                               ("<tool>", False)])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(tmp_path / "chat_same")  # (the merged model's numbering)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][[*range(24), 26, 24, 25]]
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "chat_swapped")  # (<tool> first, then ChatML's two)
    word_level_tokenizer(tmp_path / "chat_swapped", WORDS, [("<tool>", False), ("<|im_start|>", True),
                                                            ("<|im_end|>", True)])
    calibration = {t: [torch.tensor([[1, 2, 24, 25, 26, 3]])] for t in ("chat", "tool")}
    outs = []
    for chat in ("chat_same", "chat_swapped"):
        net = transformers.AutoModelForCausalLM.from_pretrained(merged)
        quantize_model(net, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                       experts={"chat": str(tmp_path / chat), "tool": str(models["tool"])}, calibration=calibration,
                       progress=False)
        outs.append(net(torch.tensor([[1, 24, 25, 26]])).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _numbering_warnings(model, experts, targets="merged_path", said_of="tokens otherwise than") -> list:
    """What E-PMQ over ``experts`` (task -> checkpoint) warns of experts numbering tokens otherwise (of
    ``said_of``)."""
    from epmq import QuantSpec, quantize_model

    calibration = {t: [torch.tensor([[1, 2, 3, 4]])] for t in experts}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets=targets,
                       experts={t: str(p) for t, p in experts.items()}, calibration=calibration, progress=False)
    return [str(w.message) for w in caught if said_of in str(w.message)]


def _swapped(root):
    """An expert whose tokenizer holds the same words as the others, two of them numbered the other way."""
    path = expert(root, "swapped", seed=4)
    word_level_tokenizer(path, [WORDS[0], WORDS[2], WORDS[1], *WORDS[3:]])
    return path


@pytest.mark.parametrize("targets", ["merged_path", "fp_path"])
def test_experts_numbering_the_same_tokens_otherwise_are_warned_of_where_no_row_map_bridges_them(targets, models,
                                                                                                  tmp_path):
    """HF experts of one embedding size whose tokenizers number the same tokens otherwise (merged by position:
    rows of other tokens mixed) were walked in silence on the default targets: only open_clip's tokenizer files
    were compared, and the expert path's row maps read the tokenizers alone. A row under which two experts put
    other tokens, each held by both, is warned of, as the merges warn; tokens each added in fine-tuning
    (a union merge's experts) put no row apart."""
    def unnamed():  # (no tokenizer of its own to compare with: the experts among themselves)
        model = transformers.AutoModelForCausalLM.from_pretrained(models["base"])
        model.name_or_path = ""
        return model

    said = _numbering_warnings(unnamed(), {"a": models["plain"], "b": _swapped(tmp_path)}, targets)
    assert said == [f"the expert of task 'b' ({tmp_path / 'swapped'}) numbers 2 tokens otherwise than the expert of "
                    f"task 'a' ({models['plain']}) (row 1: 'w1' there, 'w2' here; row 2: 'w2' there, 'w1' here): a "
                    f"merge laying their embedding rows out by position (without tokenizer_source) mixed rows of "
                    f"other tokens, and the merged model reads them so; one laying them out by token "
                    f"(tokenizer_source='union') did not"]
    assert not _numbering_warnings(unnamed(), {"chat": models["chat"], "tool": models["tool"]}, targets)


def test_experts_numbering_tokens_otherwise_than_the_models_own_tokenizer_are_warned_of(models, tmp_path):
    """The model's own tokenizer was compared with no expert's on the default targets (a model in memory holds
    none): the one saved where its name_or_path points (from_pretrained's directory) is, so that a lone expert
    numbering the model's tokens otherwise is warned of, naming the model. A model merged by laying the rows out
    by token (tokenizer_source, which its epmq_merge.json records) has nothing said of experts numbering its
    tokens otherwise; the same model saying nothing of where it came from has its experts compared."""
    swapped = _swapped(tmp_path)
    said = _numbering_warnings(transformers.AutoModelForCausalLM.from_pretrained(models["base"]), {"a": swapped})
    assert len(said) == 1 and said[0].startswith(f"the expert of task 'a' ({swapped}) numbers 2 tokens otherwise "
                                                 f"than the model ({models['base']}) (row 1: 'w1' there, 'w2' here;")
    reordered = expert(tmp_path, "reordered", [("<|im_end|>", True), ("<|im_start|>", True)], seed=5)
    experts = {"chat": models["chat"], "reordered": reordered}
    merged = merge_checkpoints("task_arithmetic", list(experts.values()), tmp_path / "m", base=models["base"],
                               tokenizer_source="union", progress=False)
    assert not _numbering_warnings(transformers.AutoModelForCausalLM.from_pretrained(merged), experts)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    model.name_or_path = ""
    assert len(_numbering_warnings(model, experts)) == 1


def test_a_model_named_by_hub_id_is_compared_by_the_tokenizer_in_the_hub_cache(models, tmp_path, monkeypatch):
    """A model whose name_or_path is an HF hub id had no tokenizer to compare the experts' with (only a directory's
    was read): the hub cache's snapshot of it is read (nothing fetched), so a lone expert numbering its tokens
    otherwise is warned of, naming it; where the cache holds none, that its tokenizer is not compared is said
    once, naming the id."""
    import huggingface_hub.constants as hub

    def model():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(models["base"])
        loaded.name_or_path = "org/base"
        return loaded

    swapped = _swapped(tmp_path)
    monkeypatch.chdir(tmp_path)  # (no local path "org/base")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    said = _numbering_warnings(model(), {"a": swapped}, said_of="'org/base'")
    assert len(said) == 1 and "holds no snapshot of: its tokenizer is not compared with the experts'" in said[0]
    in_hub_cache(tmp_path / "hub", {"base": models["base"]}, monkeypatch)
    said = _numbering_warnings(model(), {"a": swapped})
    assert len(said) == 1 and said[0].startswith(f"the expert of task 'a' ({swapped}) numbers 2 tokens otherwise "
                                                 f"than the model ({tmp_path / 'hub' / 'models--org--base'}")


def test_an_expert_tokenizer_that_does_not_load_is_warned_of_on_the_default_targets(models, tmp_path):
    """The numbering check of the default targets (which read no embedding rows) loaded each HF expert's
    tokenizer and let a corrupt tokenizer.json (an interrupted copy) end the walk, which went on before the check:
    it is warned of, naming the file, and the walk goes on; the other experts are still compared."""
    from epmq import QuantSpec, quantize_model

    cut = expert(tmp_path, "cut", seed=6)
    (cut / "tokenizer.json").write_text((cut / "tokenizer.json").read_text()[:40])
    experts = {"a": cut, "b": _swapped(tmp_path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(transformers.AutoModelForCausalLM.from_pretrained(models["base"]),
                       QuantSpec(bits=4, group_size=8), method="epmq", experts={t: str(p) for t, p in experts.items()},
                       calibration={t: [torch.tensor([[1, 2, 3, 4]])] for t in experts}, progress=False)
    said = [str(w.message) for w in caught]
    assert any(str(cut / "tokenizer.json") in m and "not compared" in m for m in said), said
    assert sum("numbers 2 tokens otherwise than the model" in m for m in said) == 1, said


def test_expert_path_reads_each_experts_rows_by_token(models):
    """Where an expert numbers the tokens otherwise, its row map puts its own row under each of
    the merged model's tokens it has and leaves the merged model's row for the others."""
    from epmq.vocabulary import rows_by_token

    tok = {k: transformers.AutoTokenizer.from_pretrained(models[k]) for k in ("chat", "tool", "base")}
    union = build_vocabulary("union", {"base": tok["base"], "chat": tok["chat"], "tool": tok["tool"]},
                             {"base": 24, "chat": 26, "tool": 26}, base="base").tokenizer
    rows = rows_by_token(union, 28, tok["tool"], 26)  # (28 rows: padded)
    assert rows[:24].tolist() == list(range(24))
    assert rows[24:].tolist() == [-1, 25, 24, -1]  # <|im_start|>: none; <|im_end|>: 25; <tool>: 24; padding
    assert rows_by_token(tok["base"], 24, transformers.AutoTokenizer.from_pretrained(models["plain"]), 24) is None


def test_a_tied_head_stored_beside_the_embeddings_is_laid_out_too(models, tmp_path):
    """A raw state dict of a tied model stores lm_head.weight beside the embeddings (transformers
    ties it on loading): both are laid out, else the merge would meet rows of two sizes."""
    paths = {}
    for name in ("base", "chat", "plain"):
        model = transformers.AutoModelForCausalLM.from_pretrained(models[name])
        model.config.tie_word_embeddings = True
        state = model.state_dict()
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        paths[name] = tmp_path / name
        paths[name].mkdir()
        model.config.save_pretrained(paths[name])
        torch.save(state, paths[name] / "pytorch_model.bin")
        transformers.AutoTokenizer.from_pretrained(models[name]).save_pretrained(paths[name])
    out = merge_checkpoints("task_arithmetic", [paths["chat"], paths["plain"]], tmp_path / "m", base=paths["base"],
                            params=dict(scale=1.0), tokenizer_source="union", progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert merged["lm_head.weight"].shape == merged["model.embed_tokens.weight"].shape == (26, 16)


def test_review_defects(models, tmp_path):
    """A partial checkpoint is refused by name as before (not a KeyError from the vocabulary
    check); the error about embedding rows names each model once; a chat template whose special
    tokens the written tokenizer lacks is warned about."""
    state = transformers.AutoModelForCausalLM.from_pretrained(models["plain"]).state_dict()
    del state["model.embed_tokens.weight"]
    (tmp_path / "partial").mkdir()
    torch.save(state, tmp_path / "partial" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing tensors.*embed_tokens"):
        merge_checkpoints("average", [models["plain"], tmp_path / "partial"], tmp_path / "a", progress=False)
    with pytest.raises(ValueError) as e:
        merge_checkpoints("task_arithmetic", [models["chat"]], tmp_path / "b", base=models["base"], progress=False)
    assert str(e.value).startswith("model 0 (") and "model 0 (model 0" not in str(e.value)
    chatml = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.warns(UserWarning, match=r"chat template uses \['<\|im_end\|>', '<\|im_start\|>'\], which the "
                                         r"written tokenizer lacks"):
        merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "c", base=models["base"],
                          tokenizer_source="base", chat_template=chatml, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "d",
                                base=models["base"], tokenizer_source="union", chat_template=chatml, progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == chatml


def test_a_tokenizer_that_cannot_list_its_vocabulary_is_named(models, tmp_path, monkeypatch):
    """A tokenizer that loads but whose get_vocab raises was taken by load_tokenizer's catch-all as
    no tokenizer, so a merge laid the expert's rows out by the base's tokens; quantize's preprocessor
    check raised it bare. Both refuse naming the checkpoint."""
    import re

    from epmq.quantize_files import _preprocessor
    from epmq.vocabulary import load_tokenizer

    cls = type(transformers.AutoTokenizer.from_pretrained(models["plain"]))
    listed = cls.get_vocab

    def get_vocab(self):
        if str(self.name_or_path) == str(models["plain"]):
            raise RuntimeError("no vocabulary")
        return listed(self)

    monkeypatch.setattr(cls, "get_vocab", get_vocab)
    named = re.escape(f"the tokenizer of {models['plain']} loads but cannot list its vocabulary") + \
        r" \(RuntimeError: no vocabulary\)"
    with pytest.raises(ValueError, match=named):
        load_tokenizer(models["plain"])
    with pytest.raises(ValueError, match=named):
        merge_checkpoints("average", [models["chat"], models["plain"]], tmp_path / "out", tokenizer_source="union",
                          progress=False)
    assert not (tmp_path / "out").exists()
    for needed in (True, False):  # (RTN, too: the checkpoint's own tokenizer is not dropped silently)
        with pytest.raises(ValueError, match=named):
            _preprocessor(transformers.AutoTokenizer.from_pretrained, models["plain"], "tokenizer", needed)
    assert load_tokenizer(models["chat"]) is not None


def test_lora_adapters_merged_without_a_base(models, tmp_path):
    """Adapters merged without a base (average) take their base's config and tokenizer for the
    vocabulary, with or without lora_base given."""
    peft = pytest.importorskip("peft")
    adapters = []
    for k in range(2):
        model = transformers.AutoModelForCausalLM.from_pretrained(models["base"])
        lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        lora.save_pretrained(tmp_path / f"a{k}")
        adapters.append(tmp_path / f"a{k}")
    for kwargs in ({}, dict(lora_base=models["base"])):
        out = merge_checkpoints("average", adapters, tmp_path / f"m{len(kwargs)}", tokenizer_source="union",
                                progress=False, **kwargs)
        assert len(transformers.AutoTokenizer.from_pretrained(out)) == 24


def test_what_the_written_tokenizer_loses_is_warned_about(models, tmp_path):
    """Chat experts carry a template and end their turns with <|im_end|>; a union merge without
    chat_template writes the base's tokenizer (no template, no EOS): both are warned about. The
    recipe records the chat template; the tokenizer's config holds no loading options."""
    chatml = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    experts = []
    for name in ("chat", "tool"):
        tok = transformers.AutoTokenizer.from_pretrained(models[name])
        tok.chat_template, tok.eos_token = chatml, "<|im_end|>"
        (tmp_path / name).mkdir()
        transformers.AutoModelForCausalLM.from_pretrained(models[name]).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        experts.append(tmp_path / name)
    with pytest.warns(UserWarning) as caught:
        merge_checkpoints("task_arithmetic", experts, tmp_path / "m", base=models["base"], tokenizer_source="union",
                          progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "the models carry a chat template" in messages and "chat_template='auto'" in messages
    assert "end their texts with '<|im_end|>'" in messages
    with pytest.warns(UserWarning, match="end their texts"):  # (the template is carried; EOS still differs)
        out = merge_checkpoints("task_arithmetic", experts, tmp_path / "a", base=models["base"],
                                tokenizer_source="union", chat_template="auto", progress=False)
    assert json.loads((out / "epmq_merge.json").read_text())["chat_template"] == "auto"
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == chatml
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "is_local" not in config and "local_files_only" not in config


def test_rows_named_token_by_token(models, tmp_path):
    """tokens (mergekit's tokenizer: {tokens: ...}): a model's row of the token stands in for the
    models that lack it (where the rules would average); another token's row of a model, forced
    on every model; zeros; a listed token the tokenizers lack is added. Bad entries are refused."""
    chat, tool, base = (str(models[k]) for k in ("chat", "tool", "base"))
    tokens = {"<|im_end|>": {"source": tool},
              "<|im_start|>": {"source": {"kind": "model_token", "model": base, "token": "w1"}, "force": True},
              "<tool>": {"source": {"kind": "zero"}},
              "<new>": {"source": {"kind": "model_token", "model": chat, "token_id": 25}}}
    out = merge_checkpoints("task_arithmetic", [chat, tool], tmp_path / "m", base=base, params=dict(scale=1.0),
                            tokenizer_source="union", tokens=tokens, progress=False)
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 28 and vocab["<new>"] == 27
    E = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()["model.embed_tokens.weight"]
    rows = {k: transformers.AutoModelForCausalLM.from_pretrained(models[k]).state_dict()["model.embed_tokens.weight"]
            for k in ("base", "chat", "tool")}
    # <|im_end|>: chat 25, tool 25, base lacks it -> base takes tool's row: W = tool + (chat - tool) + 0
    torch.testing.assert_close(E[vocab["<|im_end|>"]], rows["chat"][25], rtol=0, atol=1e-6)
    # <|im_start|>: forced to the base's row of w1 in every model: the merge is that row
    torch.testing.assert_close(E[vocab["<|im_start|>"]], rows["base"][1], rtol=0, atol=1e-6)
    # <tool>: tool has it (24); base and chat take zeros: W = 0 + (0 - 0) + (tool - 0)
    torch.testing.assert_close(E[vocab["<tool>"]], rows["tool"][24], rtol=0, atol=1e-6)
    # <new>: no model has it; each takes chat's row 25 (<|im_end|>)
    torch.testing.assert_close(E[vocab["<new>"]], rows["chat"][25], rtol=0, atol=1e-6)
    for bad, match in [({"<x>": {"source": "elsewhere"}}, "is not the base or one of the models"),
                       ({"<x>": {"source": {"kind": "model_token", "model": chat}}}, "one of token, token_id"),
                       ({"<x>": {"force": True}}, "force needs a source"),
                       ({"<x>": {"source": tool, "weight": 1}}, "weight is not read"),
                       ({"w3": {"source": {"kind": "model_token", "model": chat, "token_id": 99}}}, "past"),
                       ({"<tool>": {"source": chat}}, "has no such token")]:
        with pytest.raises(ValueError, match=match):
            merge_checkpoints("task_arithmetic", [chat, tool], tmp_path / "bad", base=base, tokenizer_source="union",
                              tokens=bad, progress=False)
    with pytest.raises(ValueError, match="tokens names rows of the vocabulary tokenizer_source lays out"):
        merge_checkpoints("task_arithmetic", [chat], tmp_path / "bad", base=base, tokens={"<x>": {}}, progress=False)


def test_epmq_merge_config_with_a_vocabulary(models, tmp_path):
    """epmq's own merge config takes tokenizer_source, pad_to_multiple_of and tokens."""
    config = dict(method="task_arithmetic", base=str(models["base"]), models=[str(models["chat"]), str(models["tool"])],
                  params=dict(scale=1.0), tokenizer_source="union", pad_to_multiple_of=16,
                  tokens={"<tool>": {"source": {"kind": "zero"}, "force": True}})
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert merged["lm_head.weight"].shape[0] == 32 and len(vocab) == 27
    assert torch.equal(merged["model.embed_tokens.weight"][vocab["<tool>"]], torch.zeros(16))
    recipe = json.loads((tmp_path / "out" / "epmq_merge.json").read_text())
    assert (recipe["tokenizer_source"], recipe["pad_to_multiple_of"], recipe["tokens"]) == (
        "union", 16, config["tokens"])


def test_a_lora_adapter_saving_its_resized_embeddings_without_its_head_is_refused_naming_both(models, tmp_path):
    """A LoRA adapter trained with added tokens on embed_tokens (the model's embeddings and untied head resized):
    PEFT saves the resized embeddings, not the head it was not told of, so the expert's head has the base's rows,
    fewer than its tokens. Merged by the union of the tokenizers, its head's rows were read past their end (a bare
    IndexError); without a tokenizer_source, the refusal asked for one. Refused naming the two tensors, either way."""
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(models["base"])
    model.resize_token_embeddings(len(WORDS) + 1, mean_resizing=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]))
    lora.save_pretrained(tmp_path / "adapter")
    word_level_tokenizer(tmp_path / "adapter", WORDS, [("<tool>", False)])
    for source in ("union", None):
        with pytest.raises(ValueError, match=r"model 1 \(\S*adapter\) has 25 embedding rows \(model\.embed_tokens\."
                                             r"weight\) but 24 in lm_head\.weight: its tensors indexed by the "
                                             r"vocabulary disagree"):
            merge_checkpoints("task_arithmetic", [models["tool"], tmp_path / "adapter"], tmp_path / "out",
                              base=models["base"], tokenizer_source=source, progress=False)


def test_a_text_tower_expert_of_another_tokenizer_is_warned_of_a_vision_towers_not(tmp_path):
    """A CLIPModel has no get_input_embeddings of its own, so its tokenizer was compared with no expert's: a
    CLIPTextModel fine-tuned under another tokenizer (each embedding row standing for another token) was merged
    in silence. Its text tower's token embeddings are compared as a model's; a CLIPVisionModel expert, which
    holds none, is not warned of whatever tokenizer files it ships."""
    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
                           ).save_pretrained(tmp_path / "base")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)).save_pretrained(tmp_path / "text")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "vision")
    word_level_tokenizer(tmp_path / "base", WORDS)
    for tower in ("text", "vision"):
        word_level_tokenizer(tmp_path / tower, WORDS[:1] + WORDS[1:][::-1])
    with pytest.warns(UserWarning, match=r"the tokenizer of model 0 \(\S*text\) is not that of the base \('w1': 1 "
                                         r"there, 23 here"):
        merge_checkpoints("task_arithmetic", [tmp_path / "text"], tmp_path / "out_text", base=tmp_path / "base",
                          progress=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        merge_checkpoints("task_arithmetic", [tmp_path / "vision"], tmp_path / "out_vision", base=tmp_path / "base",
                          progress=False)
    assert not [w for w in said if "tokenizer" in str(w.message)], [str(w.message) for w in said]


def union_merge_and_chat_adapter(models, tmp_path, peft):
    """The chat and tool models' Task Arithmetic over their union vocabulary (its directory,
    returned), and a LoRA of the chat model saved as ``tmp_path / "adapter"`` (PEFT writes no
    tokenizer with it)."""
    merged = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m",
                               base=models["base"], tokenizer_source="union", progress=False)
    lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(models["chat"]),
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    return merged


def in_hub_cache(cache, repositories: dict, monkeypatch) -> None:
    """``{name: directory}`` as the snapshots (at main) of ``org/<name>`` in an HF hub cache at
    ``cache``, read from there offline."""
    import shutil

    import huggingface_hub.constants as hub

    commit = "0" * 40
    for name, path in repositories.items():
        repo = cache / f"models--org--{name}"
        shutil.copytree(path, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def test_expert_path_maps_a_lora_adapter_by_its_bases_tokenizer(models, tmp_path):
    """A LoRA adapter saved without a tokenizer (PEFT's save_pretrained writes none) is mapped by
    the tokenizer of the base it names."""
    peft = pytest.importorskip("peft")
    from epmq import QuantSpec, quantize_model
    from epmq.experts import OnVocabulary, on_model_vocabulary

    merged = union_merge_and_chat_adapter(models, tmp_path, peft)
    assert not list((tmp_path / "adapter").glob("tokenizer*"))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    from epmq.lora import open_expert

    mapped = on_model_vocabulary(model, {"chat": open_expert(str(tmp_path / "adapter"))})
    assert isinstance(mapped["chat"], OnVocabulary) and mapped["chat"].rows[24:27].tolist() == [24, 25, -1]
    quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                   experts={"chat": str(tmp_path / "adapter")}, calibration={"chat": [torch.tensor([[1, 24, 26]])]},
                   progress=False)


def test_expert_path_maps_experts_and_a_model_named_by_hub_id(models, tmp_path, monkeypatch):
    """Experts and a merged model named by HF hub id (read from the hub's cache, offline) are
    mapped by the tokenizers of their snapshots."""
    from epmq import QuantSpec, quantize_model
    from epmq.experts import OnVocabulary, on_model_vocabulary

    merged = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m",
                               base=models["base"], tokenizer_source="union", progress=False)
    in_hub_cache(tmp_path / "hub", {"merged": merged, "chat": models["chat"], "tool": models["tool"]}, monkeypatch)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    model.name_or_path = "org/merged"
    mapped = on_model_vocabulary(model, {"chat": "org/chat", "tool": "org/tool"})
    assert all(isinstance(mapped[t], OnVocabulary) for t in ("chat", "tool"))
    assert mapped["tool"].rows[24:27].tolist() == [-1, 25, 24]
    quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                   experts={"chat": "org/chat", "tool": "org/tool"},
                   calibration={t: [torch.tensor([[1, 24, 25, 26]])] for t in ("chat", "tool")}, progress=False)


def test_expert_path_maps_a_lora_adapter_named_by_hub_id_by_its_bases_tokenizer(models, tmp_path, monkeypatch):
    """A LoRA adapter named by hub id (no tokenizer in its repository) is mapped by the tokenizer
    of the base its config names, as an adapter directory is."""
    import json

    peft = pytest.importorskip("peft")
    from epmq import QuantSpec, quantize_model
    from epmq.experts import OnVocabulary, on_model_vocabulary

    merged = union_merge_and_chat_adapter(models, tmp_path, peft)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/chat"}))
    in_hub_cache(tmp_path / "hub", {"chat": models["chat"], "adapter": tmp_path / "adapter"}, monkeypatch)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    mapped = on_model_vocabulary(model, {"chat": "org/adapter"})
    assert isinstance(mapped["chat"], OnVocabulary) and mapped["chat"].rows[24:27].tolist() == [24, 25, -1]
    quantize_model(model, QuantSpec(bits=4, group_size=8), method="epmq", targets="expert_path",
                   experts={"chat": "org/adapter"}, calibration={"chat": [torch.tensor([[1, 24, 26]])]},
                   progress=False)


def test_expert_path_maps_a_lora_adapter_by_the_revision_of_its_base_it_records(models, tmp_path, monkeypatch):
    """An adapter whose config records the hub revision of its base (PEFT's ``revision``) is the
    expert on that revision's weights, and is mapped by that revision's tokenizer, not main's
    (here main has moved on to another tokenizer: its rows were taken for the adapter's)."""
    import json
    import shutil

    import huggingface_hub.constants as hub

    peft = pytest.importorskip("peft")
    from epmq.experts import OnVocabulary, on_model_vocabulary

    merged = union_merge_and_chat_adapter(models, tmp_path, peft)
    old, new = "1" * 40, "2" * 40
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/chat",
                                  "revision": old}))
    repo = tmp_path / "hub" / "models--org--chat"
    shutil.copytree(models["chat"], repo / "snapshots" / old)
    shutil.copytree(models["tool"], repo / "snapshots" / new)  # (main since: another tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    mapped = on_model_vocabulary(model, {"chat": str(tmp_path / "adapter")})
    assert isinstance(mapped["chat"], OnVocabulary) and mapped["chat"].rows[24:27].tolist() == [24, 25, -1]


def test_bart_final_logits_bias_is_laid_out_by_token(tmp_path):
    """BART keeps a [1, vocab] final_logits_bias beside its embeddings (resize_token_embeddings
    resizes both): laid out by token along its columns as the embeddings' rows are (a shape
    mismatch before), each merged entry the merge of that token's entries."""

    def bart(name, added=(), seed=0, noise=0.05):
        torch.manual_seed(0)
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=len(WORDS), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2))
        tok = word_level_tokenizer(tmp_path / name, WORDS, added)
        if added:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.final_logits_bias.normal_(generator=g)
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g) * p.abs().mean())
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    paths = dict(base=bart("base", noise=0.0), chat=bart("chat", [("<|im_start|>", True), ("<|im_end|>", True)], 1),
                 plain=bart("plain", seed=2))
    out = merge_checkpoints("task_arithmetic", [paths["chat"], paths["plain"]], tmp_path / "m", base=paths["base"],
                            params=dict(scale=1.0), tokenizer_source="union", progress=False)
    merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    bias = {k: transformers.AutoModelForSeq2SeqLM.from_pretrained(p).final_logits_bias[0] for k, p in paths.items()}
    toks = {k: transformers.AutoTokenizer.from_pretrained(p).get_vocab() for k, p in paths.items()}
    assert merged.final_logits_bias.shape == (1, len(vocab)) == (1, 26)
    for token, i in vocab.items():
        has = [k for k in paths if token in toks[k]]
        value = {k: bias[k][toks[k][token]] for k in has}
        default = value[has[0]] if len(has) == 1 else value["base"]
        of = {k: value.get(k, default) for k in paths}
        expected = of["base"] + (of["chat"] - of["base"]) + (of["plain"] - of["base"])
        assert torch.allclose(merged.final_logits_bias[0, i], expected, atol=1e-6), token


def test_union_warns_of_a_token_added_with_different_settings(tmp_path):
    """One token added as special by one expert and as ordinary text by another: the union
    takes the first definition, and says so (mergekit warns too) rather than silently."""
    base = word_level_tokenizer(tmp_path / "b", WORDS)
    a = word_level_tokenizer(tmp_path / "a", WORDS, [("<x>", True)])
    b = word_level_tokenizer(tmp_path / "c", WORDS, [("<x>", False)])
    with pytest.warns(UserWarning, match="different settings.*<x>"):
        vocabulary = build_vocabulary("union", {"base": base, 0: a, 1: b}, {"base": 24, 0: 25, 1: 25}, base="base")
    special = {t.content: t.special for t in vocabulary.tokenizer.added_tokens_decoder.values()}
    assert special["<x>"] is True


def test_union_keeps_an_added_token_the_base_has_as_ordinary_vocabulary(tmp_path):
    """An expert's added token that the base has only in its model vocabulary (split apart by
    its pre-tokenizer): the written tokenizer encodes it to its one row, as the expert did."""
    words = WORDS[:3] + ["<y>"] + WORDS[4:]
    base = word_level_tokenizer(tmp_path / "b", words)
    chat = word_level_tokenizer(tmp_path / "c", WORDS, [("<y>", True)])
    assert base.encode("<y>", add_special_tokens=False) != [3]  # (the base splits it)
    vocabulary = build_vocabulary("union", {"base": base, 0: chat}, {"base": 24, 0: 25}, base="base")
    vocab = vocabulary.tokenizer.get_vocab()
    assert vocabulary.tokenizer.encode("w1 <y>", add_special_tokens=False) == [1, vocab["<y>"]] == [1, 3]
    assert int(vocabulary.index[0][3]) == 24 and vocabulary.size == 25


def test_files_from_leaves_no_other_models_chat_template_beside_the_vocabulary(models, tmp_path):
    """files_from names a model whose files are copied, but the written tokenizer is the
    vocabulary's (the base's): the ChatML template of files_from's model, spelling tokens that
    tokenizer lacks, is not left beside it; the base's own templates are written with it."""
    import shutil

    chatml = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    chat, base = tmp_path / "chat", tmp_path / "base"
    shutil.copytree(models["chat"], chat)
    shutil.copytree(models["base"], base)
    (chat / "chat_template.jinja").write_text(chatml)
    with pytest.warns(UserWarning, match="written tokenizer \\(the base's\\) none"):
        out = merge_checkpoints("task_arithmetic", [chat, models["plain"]], tmp_path / "m", base=models["base"],
                                tokenizer_source="base", files_from=chat, progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template is None
    (base / "chat_template.jinja").write_text("{{ messages[0].content }}")
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool.jinja").write_text("{{ tools }}")
    out = merge_checkpoints("task_arithmetic", [chat, models["plain"]], tmp_path / "m2", base=base,
                            tokenizer_source="union", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == {"default": "{{ messages[0].content }}",
                                                                          "tool": "{{ tools }}"}


def test_a_token_given_its_row_is_not_warned_of_as_in_no_model():
    """A token in no model that ``tokens`` gives a row (a new token taking another's) is laid out
    by that entry, not by the rules: no "in no model ... get zero rows" warning for it."""
    import warnings

    index = {"x": torch.tensor([0, -1]), "y": torch.tensor([0, -1])}
    vocabulary = Vocabulary(None, 2, 2, index, chosen={1: ("row", "x", 0)})
    vocabulary.tokenizer = type("T", (), {"get_vocab": lambda self: {"a": 0, "new": 1}})()
    tensors = {"x": torch.tensor([[1.0, 2.0]]), "y": torch.tensor([[3.0, 4.0]])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vocabulary.align(tensors)
    assert out["x"][1].tolist() == out["y"][1].tolist() == [1.0, 2.0]


def test_a_reference_token_one_past_its_rows_is_refused():
    """A tokenizer with one token more than the reference's embedding rows (the first id past
    them) is refused, as any past them."""
    tok = type("T", (), {"get_vocab": lambda self: {"a": 0, "b": 1, "c": 2}})()
    with pytest.raises(ValueError, match="1 tokens past its 2 embedding rows"):
        build_vocabulary("base", {"b": tok}, {"b": 2})
    assert build_vocabulary("base", {"b": tok}, {"b": 3}).size == 3


def _stub_tokenizer(vocab):
    return type("T", (), {"get_vocab": lambda self: dict(vocab)})()


def test_a_row_named_at_a_model_s_row_count_is_refused():
    """``token_id`` equal to the model's embedding rows is past them (rows 0..rows-1): refused by
    name, not an IndexError in the middle of the merge."""
    tok = _stub_tokenizer({"a": 0, "b": 1})
    spec = {"source": {"kind": "model_token", "model": "b", "token_id": 2}}
    with pytest.raises(ValueError, match=r"row 2 is past 'b''s 2 embedding rows"):
        build_vocabulary("base", {"b": tok}, {"b": 2}, tokens={"a": spec})
    spec["source"]["token_id"] = 1
    assert build_vocabulary("base", {"b": tok}, {"b": 2}, tokens={"a": spec}).chosen == {0: ("row", "b", 1)}


def test_pad_to_multiple_of_pads_only_up_to_the_next_multiple():
    tok = _stub_tokenizer({"a": 0, "b": 1, "c": 2, "d": 3})
    assert [build_vocabulary("base", {"b": tok}, {"b": 4}, pad_to_multiple_of=m).rows for m in (1, 2, 3, 4, 8)] == \
        [4, 4, 6, 4, 8]


def test_a_source_token_past_its_model_s_rows_has_no_row():
    """A model's tokenizer may number tokens past its embedding rows (padding ids it has no row
    for): such a token maps to no row (-1), not to a row the tensor lacks."""
    from epmq.vocabulary import rows_by_token

    into = _stub_tokenizer({"a": 0, "b": 1, "c": 2})
    source = _stub_tokenizer({"c": 0, "a": 1, "b": 2})
    assert rows_by_token(into, 3, source, 2).tolist() == [1, -1, 0]
    assert rows_by_token(into, 3, into, 3) is None
    assert rows_by_token(into, 3, into, 2).tolist() == [0, 1, -1]
    two = _stub_tokenizer({"a": 0, "b": 1})  # (the same tokens; a padding row more in ``into``)
    assert rows_by_token(two, 3, two, 2).tolist() == [0, 1, -1]
    vocabulary = build_vocabulary("base", {"b": into, "x": source}, {"b": 3, "x": 2})
    assert vocabulary.index["x"].tolist() == [1, -1, 0]


def test_ids_with_no_token_are_refused():
    tok = _stub_tokenizer({"a": 0, "b": 2})  # (no token at id 1)
    with pytest.raises(ValueError, match="ids run to 2 for 2 tokens"):
        build_vocabulary("base", {"b": tok}, {"b": 3})


@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "model": {"vocab": {"w0": '])
def test_an_expert_whose_tokenizer_file_is_cut_is_named(models, tmp_path, content):
    """An expert whose tokenizer.json is 0 bytes or cut (an interrupted copy or download) was
    taken as one without a tokenizer (load_tokenizer's None: the base's tokens), so its rows were
    laid out by another model's tokens, or its own checked against none; refused naming the file."""
    import shutil

    from epmq.vocabulary import load_tokenizer

    plain = tmp_path / "plain"
    shutil.copytree(models["plain"], plain)
    (plain / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"{plain / 'tokenizer.json'} is (empty|not valid JSON)"):
        load_tokenizer(plain)
    with pytest.raises(ValueError, match=f"{plain / 'tokenizer.json'} is (empty|not valid JSON)"):
        merge_checkpoints("average", [models["chat"], plain], tmp_path / "out", tokenizer_source="union",
                          progress=False)
    assert not (tmp_path / "out").exists()
    (plain / "tokenizer.json").unlink()  # (no tokenizer at all: the base's, as mergekit takes it)
    (plain / "tokenizer_config.json").unlink()
    assert load_tokenizer(plain) is None


def test_pad_to_multiple_of_of_numpy_is_taken(models, tmp_path):
    """A padding multiple from a sweep's array (np.int64) was refused as 'must be a positive
    integer', though numpy's integers are taken for every other size; it pads as 4 does and the
    config and recipe say Python ints."""
    out = merge_checkpoints("task_arithmetic", [models["chat"], models["tool"]], tmp_path / "m", base=models["base"],
                            params=dict(scale=1.0), tokenizer_source="union", pad_to_multiple_of=np.int64(4),
                            progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 28
    recipe = [json.loads(f.read_text()) for f in out.glob("*.json") if "pad_to_multiple_of" in f.read_text()]
    assert recipe and all(r.get("pad_to_multiple_of", 4) == 4 for r in recipe)
    with pytest.raises(ValueError, match="positive integer"):
        check_tokenizer_source("union", np.float64(4.0))


def test_a_model_without_tokenizer_files_has_the_bases_tokens(tmp_path):
    """transformers 5 builds a Qwen2 (GPT-2, BERT, T5, ...) checkpoint without tokenizer files a
    tokenizer of its special tokens alone, no error: taken as that model's, a union merge added
    its '<|endoftext|>' to the output and laid the model out as lacking every other token, its
    updates to those rows dropped. It has the base's tokens, as mergekit takes it."""
    import shutil

    from epmq.vocabulary import load_tokenizer

    words = WORDS + ["<|endoftext|>"]  # (Qwen2's tokenizer class adds it where a tokenizer lacks it)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    for name in ("base", "a", "b"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p) * p.abs().mean())
        model.save_pretrained(tmp_path / name)
        word_level_tokenizer(tmp_path / name, words, [("<|im_end|>", True)] if name == "b" else [])
    shutil.copytree(tmp_path / "a", tmp_path / "bare")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bare" / f).unlink()
    assert load_tokenizer(tmp_path / "bare") is None
    merged = {a: merge_checkpoints("task_arithmetic", [tmp_path / a, tmp_path / "b"], tmp_path / f"m-{a}",
                                   base=tmp_path / "base", tokenizer_source="union", progress=False)
              for a in ("a", "bare")}
    vocab = {a: transformers.AutoTokenizer.from_pretrained(m).get_vocab() for a, m in merged.items()}
    assert vocab["bare"] == vocab["a"]
    weights = {a: transformers.Qwen2ForCausalLM.from_pretrained(m).state_dict() for a, m in merged.items()}
    assert all(torch.equal(weights["bare"][k], weights["a"][k]) for k in weights["a"])


def test_a_tokenizer_saved_from_its_file_is_read_as_saved_not_as_transformers_reloads_it(tmp_path):
    """transformers 5 loads a Qwen2 checkpoint's tokenizer saved as TokenizersBackend (a
    tokenizers-library tokenizer, no EOS) as Qwen2Tokenizer, which adds '<|endoftext|>' and reads
    the word-level tokenizer.json as byte-level BPE: a union merge was refused for that token 'past
    the base's embedding rows', which the saved tokenizer has not got, and calibration texts read
    as almost no tokens, then that token 'has no row'. Both read the tokenizer as saved, warned of."""
    from epmq import QuantSpec, quantize_checkpoint

    qwen = dict(config=transformers.Qwen2Config)
    base, chat, tool = (expert(tmp_path, "base", noise=0.0, **qwen),
                        expert(tmp_path, "chat", [("<|im_start|>", True), ("<|im_end|>", True)], seed=1, **qwen),
                        expert(tmp_path, "tool", [("<tool>", False), ("<|im_end|>", True)], seed=2, **qwen))
    assert "<|endoftext|>" in transformers.AutoTokenizer.from_pretrained(base).get_vocab()  # (what it reloads)
    with pytest.warns(UserWarning, match=r"loads the tokenizer of .*base, saved as TokenizersBackend, as "
                                         r"Qwen2Tokenizer: 25 tokens for its 24 \(adding \['<\|endoftext\|>'\]\)"):
        merged = merge_checkpoints("task_arithmetic", [chat, tool], tmp_path / "m", base=base,
                                   tokenizer_source="union", progress=False)
    vocab = transformers.PreTrainedTokenizerFast.from_pretrained(merged).get_vocab()
    assert sorted(vocab, key=vocab.get)[len(WORDS):] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == len(WORDS) + 3
    (tmp_path / "t.txt").write_text("\n".join(" ".join(WORDS) for _ in range(4)))
    with pytest.warns(UserWarning, match="as Qwen2Tokenizer"):
        out = quantize_checkpoint(base, tmp_path / "q", spec=QuantSpec(bits=4, group_size=8), method="gptq",
                                  calibration={"t": str(tmp_path / "t.txt")}, samples=2, seq_len=8, progress=False)
    assert transformers.PreTrainedTokenizerFast.from_pretrained(out).get_vocab() == {w: i for i, w in enumerate(WORDS)}
    # a chat template set on the output's tokenizer: the tokenizer written is the one saved
    with pytest.warns(UserWarning, match="as Qwen2Tokenizer"):
        templated = merge_checkpoints("task_arithmetic", [expert(tmp_path, "plain", seed=3, **qwen)], tmp_path / "t",
                                      base=base, chat_template="{{ messages[0]['content'] }}", progress=False)
    assert transformers.PreTrainedTokenizerFast.from_pretrained(templated).get_vocab() == {
        w: i for i, w in enumerate(WORDS)}


def test_a_tokenizer_read_as_saved_is_warned_of_by_what_differs(tmp_path):
    """A byte-level BPE tokenizer saved as TokenizersBackend beside a Qwen2 config: transformers 5's
    Qwen2Tokenizer keeps its BPE model and adds '<|endoftext|>'; the warning names that token alone
    (it said 'a BPE model for its BPE' too), and the tokenizer saved is the one read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from epmq.vocabulary import checkpoint_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path)
    transformers.Qwen2Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as said:
        tokenizer = checkpoint_tokenizer(tmp_path)
    message = str(said[0].message)
    assert "as Qwen2Tokenizer: " in message and "(adding ['<|endoftext|>']); it is read as saved" in message
    assert "model for its" not in message and tokenizer.get_vocab() == bpe.get_vocab()
