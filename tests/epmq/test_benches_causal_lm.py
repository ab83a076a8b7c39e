"""The decoder-only text bench (``hf_causal_lm``) on a tiny random Llama (word-level tokenizer,
GLUE-style JSONL data, no hub)."""

import pytest
import torch
import torch.nn.functional as F

from epmq.benches import BenchConfigError, build_bench
from epmq.benches.causal_lm import CausalLMBench
from epmq.benches.prompts import GLUE, STSB_GRID
from epmq.benches.tiny import write_tiny_causal_lm
from epmq.checkpoint_io import LazyStateDict
from epmq.merge import task_arithmetic

TASKS = ("sst2", "rte", "stsb")
WRITE_TINY = write_tiny_causal_lm  # the ``tiny`` and ``bench`` fixtures (conftest.py)


def _check(acc):
    assert set(acc) == {*TASKS, "avg"}
    assert all(0 <= acc[t] <= 1 for t in ("sst2", "rte")) and -1 <= acc["stsb"] <= 1


def test_structure(bench):
    assert isinstance(bench, CausalLMBench) and bench.task_names == list(TASKS)
    model = bench.model()
    assert type(model).__name__ == "LlamaForCausalLM"
    names = set(model.state_dict().keys())
    for state in (bench.base_state, *bench.experts.values()):
        assert isinstance(state, LazyStateDict) and set(state.keys()) == names
    assert bench.tasks["stsb"].regression and bench.tasks["rte"].answers == GLUE["rte"]["answers"]


def test_calibration_items_are_prompts_followed_by_their_answer(bench):
    tok = bench.tokenizer
    for task, items in bench.calibration.items():
        assert len(items) == 2
        ids, labels = bench._encode(task, "calibration")
        for k, item in enumerate(items):
            assert set(item) == {"input_ids", "attention_mask"}
            assert item["input_ids"].shape == item["attention_mask"].shape and item["input_ids"].shape[0] == 2
            for row in range(2):
                n = int(item["attention_mask"][row].sum())
                seq = item["input_ids"][row, :n].tolist()
                prompt = ids[2 * k + row]
                answer = tok(" " + bench.tasks[task].target(labels[2 * k + row]), add_special_tokens=False)["input_ids"]
                assert seq == prompt + answer + [tok.eos_token_id]
        with torch.no_grad():
            bench.model()(**items[0])  # a valid forward


def test_scoring_is_the_answers_log_likelihood_after_the_prompt(bench):
    model = bench.model()
    ids, _ = bench._encode("sst2", "test")
    cands = bench._candidate_ids(bench.tasks["sst2"].candidates)
    assert all(c[-1] == bench.tokenizer.eos_token_id for c in cands)
    scores = bench._score(model, ids[:3], cands, torch.device("cpu"))
    assert scores.shape == (3, 2)
    # by hand, one unpadded sequence at a time
    for b in range(3):
        for c, cand in enumerate(cands):
            seq = torch.tensor([ids[b] + cand])
            with torch.no_grad():
                logp = F.log_softmax(model(seq).logits.float(), -1)[0]
            want = sum(float(logp[len(ids[b]) - 1 + j, t]) for j, t in enumerate(cand))
            assert scores[b, c].item() == pytest.approx(want, abs=1e-4)
    grid = bench._candidate_ids(bench.tasks["stsb"].candidates)
    assert bench._score(model, ids[:1], grid, torch.device("cpu")).shape == (1, len(STSB_GRID))


def test_evaluate_score_and_generate(bench, tiny):
    merged = task_arithmetic(bench.base_state, list(bench.experts.values()), scale=0.3)
    first = bench.evaluate(merged, "test")
    _check(first)
    assert bench.evaluate(bench.model(merged), "test") == first  # deterministic
    _check(bench.expert_accuracies("test"))
    root, config = tiny
    gen = build_bench(dict(config, eval=dict(config["eval"], decoding="generate", max_new_tokens=3)),
                      base_dir=root, progress=False)
    _check(gen.evaluate(gen.base_state, "test"))
    # left padding: a batch's generations are those of each input alone
    model = gen.model()
    ids, _ = gen._encode("rte", "test")
    batch = gen._generate_texts(model, ids[:3], torch.device("cpu"))
    assert batch == [gen._generate_texts(model, [s], torch.device("cpu"))[0] for s in ids[:3]]


def test_errors(tiny):
    root, config = tiny
    t5 = dict(config, model=dict(config["model"], family="hf_t5"))
    with pytest.raises(BenchConfigError, match="'llama' model, not T5"):
        build_bench(t5, base_dir=root, progress=False)


def test_quantizes_through_the_walker(bench):
    import epmq
    from epmq.spec import QuantSpec

    model = bench.model(task_arithmetic(bench.base_state, list(bench.experts.values()), scale=0.3))
    epmq.quantize_model(model, QuantSpec(bits=8, group_size=16), method="epmq", calibration=bench.calibration,
                        experts=dict(bench.experts), progress=False)
    assert len(model.epmq_report.layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    _check(bench.evaluate(model, "test"))


def test_a_run_writes_servable_checkpoints(tiny, tmp_path):
    """``epmq run`` on the bench: every quantized checkpoint loads without a model (config.json)
    and comes with the tokenizer, so that it is served as it is."""
    import epmq
    from epmq.pipeline import Plan, run
    from transformers import AutoTokenizer

    root, config = tiny
    bench = build_bench(config, base_dir=root, progress=False)
    plan = Plan(merges=[{"method": "task_arithmetic", "scales": [0.3]}], methods=["epmq"], bits=[4],
                group_size=16, anchors=[0.1], save_checkpoints=True)
    run(bench, plan, tmp_path / "run", progress=False, log=lambda *a: None)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints
    for checkpoint in checkpoints:
        model = epmq.load_quantized(checkpoint)
        tok = AutoTokenizer.from_pretrained(checkpoint)
        ids = tok("the cat sat", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (1, ids["input_ids"].shape[1] + 2)


def test_a_model_whose_config_wraps_its_text_config(tmp_path):
    """Gemma 3 (a causal LM to transformers, its vocabulary in ``text_config``): the bench scores
    it, its chunks sized by the head's width."""
    import transformers

    from epmq.benches.causal_lm import _logit_width
    from epmq.benches.tiny import _start, _text_bench, word_tokenizer

    root, per_split, gen = _start(tmp_path, None, {"train": 12, "validation": 6}, 0)
    tok = word_tokenizer(root / "base")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    assert not hasattr(model.config, "vocab_size") and _logit_width(model) == len(tok)
    bench = build_bench(_text_bench(root, "hf_causal_lm", model, ("sst2",), per_split, gen), base_dir=root,
                        progress=False)
    acc = bench.evaluate(bench.base_state, split="test")
    assert set(acc) == {"sst2", "avg"} and 0 <= acc["sst2"] <= 1


def test_an_fp8_expert_with_its_scales_beside_is_refused_not_cast(tmp_path):
    """A fine-grained FP8 expert (float8 weights divided by the scales in ``weight_scale_inv``)
    was cast to the bench's dtype as it was read and used as the weights, silently; refused by
    name, as ``epmq quantize`` refuses such experts (``CheckpointReader.quantized_with_scales``)."""
    from safetensors.torch import load_file, save_file

    config = write_tiny_causal_lm(tmp_path, ("sst2",))
    file = next((tmp_path / config["tasks"][0]["expert"]).glob("*.safetensors"))
    state = load_file(str(file))
    name = "model.layers.1.self_attn.o_proj.weight"
    scale = state[name].abs().max() / 448
    state[name] = (state[name] / scale).to(torch.float8_e4m3fn)
    state[f"{name}_scale_inv"] = scale.reshape(1, 1).float()
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(BenchConfigError, match=rf"expert of task 'sst2'.*tensor '{name}' is stored as "
                                               rf"torch.float8_e4m3fn with its scales in '{name}_scale_inv'"):
        build_bench(config, base_dir=tmp_path, progress=False)


def test_a_tokenizer_saved_from_its_file_is_read_as_saved(tmp_path):
    """model.tokenizer beside a Qwen2 config.json, saved as TokenizersBackend: transformers 5 loads
    it as Qwen2Tokenizer (byte-level BPE over the word-level file, '<|endoftext|>' added), which
    read the prompts as other tokens; the bench reads it as saved, as epmq merge and quantize do."""
    import shutil

    import transformers

    config = write_tiny_causal_lm(tmp_path, ("sst2",))
    own = build_bench(config, base_dir=tmp_path, progress=False)  # (the base's tokenizer, beside a Llama config)
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / config["model"]["base"] / name, tmp_path / "tok")
    transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "tok")
    with pytest.warns(UserWarning, match="saved as TokenizersBackend, as Qwen2Tokenizer"):
        bench = build_bench(dict(config, model=dict(config["model"], tokenizer="tok")), base_dir=tmp_path,
                            progress=False)
    assert bench.tokenizer.get_vocab() == own.tokenizer.get_vocab()
    assert bench._encode("sst2", "test") == own._encode("sst2", "test")

def _tied_base_bench(root):
    """A tiny causal-LM bench whose base ties its head to its embeddings, with an untied expert
    (its own trained head, task sst2) and a tied one (task rte); its config and directories."""
    import transformers

    from epmq.benches.tiny import _start, _text_bench, perturb, word_tokenizer

    root, per_split, gen = _start(root, None, {"train": 12, "validation": 6}, 0)
    tok = word_tokenizer(root / "base")

    def llama(tie):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()

    base = llama(True)
    config = _text_bench(root, "hf_causal_lm", base, ("sst2", "rte"), per_split, gen)
    untied = llama(False)
    untied.load_state_dict(base.state_dict())  # (its head starts as the base's embeddings)
    untied = perturb(untied, gen)  # (the head trained apart)
    untied.save_pretrained(root / "experts" / "sst2")
    return config, root


def test_an_untied_experts_own_head_is_read_over_a_tied_base(tmp_path):
    """The template ties the head to the embeddings (the base's), and ``open_state`` looked an
    expert's head up under the embeddings' name first: an untied expert's trained head was never
    read, so its row of the accuracy table and every merge used its embeddings as its head. Each
    expert now has its own head (a tied one's is its embeddings), the bench's model is untied as
    ``epmq merge`` unties its output, and a merge there is the model ``epmq merge`` writes."""
    import transformers

    from epmq import merge_checkpoints

    config, root = _tied_base_bench(tmp_path)
    bench = build_bench(config, base_dir=root, progress=False)
    assert bench.experts["sst2"].checkpoint_key("lm_head.weight") == "lm_head.weight"
    assert bench.experts["rte"].checkpoint_key("lm_head.weight") == "model.embed_tokens.weight"
    ids = torch.tensor([[1, 5, 9, 12, 7]])

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    for task in ("sst2", "rte"):  # each expert as from_pretrained builds it
        own = transformers.AutoModelForCausalLM.from_pretrained(root / "experts" / task)
        assert torch.equal(logits(bench.model(bench.experts[task])), logits(own)), task
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    assert torch.equal(logits(bench.model()), logits(base))
    assert not bench.model().config.tie_word_embeddings
    merged = task_arithmetic(bench.base_state, [bench.experts[t] for t in bench.task_names], scale=0.5)
    out = merge_checkpoints("task_arithmetic", [root / "experts" / t for t in bench.task_names], tmp_path / "merged",
                            base=root / "base", params={"scale": 0.5}, progress=False)
    written = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(bench.model(merged)), logits(written), atol=1e-6)


def test_a_random_merge_of_tied_checkpoints_draws_one_mask_for_the_tied_tensor(tmp_path):
    """Every model tied: the bench's lazy states list the head and the embeddings as two names of
    one checkpoint tensor. DARE drew a mask for each, so the merged state held two values of one
    tensor and the model took whichever load_into copied last; the tensor is merged once."""
    import shutil

    from epmq.merge import dare

    config, root = _tied_base_bench(tmp_path)
    shutil.rmtree(root / "experts" / "sst2")
    shutil.copytree(root / "experts" / "rte", root / "experts" / "sst2")  # (tied, as the base)
    bench = build_bench(config, base_dir=root, progress=False)
    merged = dare(bench.base_state, [bench.experts[t] for t in bench.task_names], density=0.5, seed=1)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    model = bench.model(merged)
    assert torch.equal(model.model.embed_tokens.weight, merged["model.embed_tokens.weight"])


def test_a_random_merge_of_tied_checkpoints_saved_with_both_names_draws_one_mask(tmp_path):
    """Tied checkpoints saved by ``torch.save(model.state_dict())`` (a ``pytorch_model.bin``)
    store the head beside the embeddings, one tensor under two keys. Read each under its own
    key, the bench's states did not hold them as one tensor: DARE drew a mask for each and the
    tied model kept the head's, where ``epmq merge`` (which ties what the base stores equal)
    draws one. A name stored as an equal copy of the tensor it is tied to is read as that one."""
    import shutil

    import transformers
    from safetensors.torch import load_file

    from epmq import merge_checkpoints
    from epmq.merge import dare

    config, root = _tied_base_bench(tmp_path)
    shutil.rmtree(root / "experts" / "sst2")
    shutil.copytree(root / "experts" / "rte", root / "experts" / "sst2")
    for d in (root / "base", root / "experts" / "sst2", root / "experts" / "rte"):
        model = transformers.AutoModelForCausalLM.from_pretrained(d)
        (d / "model.safetensors").unlink()
        torch.save(model.state_dict(), d / "pytorch_model.bin")  # (both names stored)
    bench = build_bench(config, base_dir=root, progress=False)
    merged = dare(bench.base_state, [bench.experts[t] for t in bench.task_names], density=0.5, seed=1)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    out = merge_checkpoints("dare", [root / "experts" / t for t in bench.task_names], tmp_path / "merged",
                            base=root / "base", params={"density": 0.5, "seed": 1}, progress=False)
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(bench.model(merged).model.embed_tokens.weight, written["model.embed_tokens.weight"])


def test_a_moe_model_whose_experts_transformers_saves_one_matrix_each_is_read(tmp_path):
    """transformers 5 holds a Mixtral's experts fused (``mlp.experts.gate_up_proj [E, 2I, H]``) and
    saves them one matrix per expert (``block_sparse_moe.experts.N.w1.weight``): the bench refused
    every MoE base and expert so saved ('lacks 4 of the model's ... tensors, e.g.
    [...experts.gate_up_proj', ...]: is it a checkpoint of this architecture?'), the docstring's
    "and their MoE variants" included. The fused tensors are made of the saved ones as
    from_pretrained makes them: each state equals the model it was saved from, exactly."""
    import transformers

    from epmq.benches.tiny import _start, _text_bench, perturb, word_tokenizer

    root, per_split, gen = _start(tmp_path, None, {"train": 12, "validation": 6}, 0)
    tok = word_tokenizer(root / "base")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    config = _text_bench(root, "hf_causal_lm", model, ("sst2",), per_split, gen)
    expert = perturb(model, torch.Generator().manual_seed(1))
    expert.save_pretrained(root / "experts" / "sst2")  # (one whose tensors are known here)
    bench = build_bench(config, base_dir=root, progress=False)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert fused in bench.base_state
    for state, want in ((bench.base_state, model), (bench.experts["sst2"], expert)):
        assert set(state) == set(want.state_dict())
        for name, t in want.state_dict().items():
            assert state.shape_of(name) == tuple(t.shape) and torch.equal(state[name], t), name
    merged = task_arithmetic(bench.base_state, [bench.experts["sst2"]], scale=1.0)
    torch.testing.assert_close(merged[fused], expert.state_dict()[fused])
    import epmq
    from epmq.spec import QuantSpec

    quantized = bench.model(merged)
    epmq.quantize_model(quantized, QuantSpec(bits=8, group_size=16), method="epmq", calibration=bench.calibration,
                        experts=dict(bench.experts), progress=False)
    assert any(".experts." in layer["name"] for layer in quantized.epmq_report.layers)
    acc = bench.evaluate(quantized, "test")
    assert set(acc) == {"sst2", "avg"}


def test_the_logit_width_of_a_config_with_a_text_encoders_and_a_decoders_is_the_decoders():
    """MusicGen's config holds a text encoder's (T5's) and a decoder's, its heads a list (no
    out_features): asked for its text config unqualified, transformers refused it as ambiguous."""
    import transformers

    from epmq.benches.causal_lm import _logit_width

    config = transformers.MusicgenConfig(
        text_encoder=dict(model_type="t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
        audio_encoder=dict(model_type="encodec", target_bandwidths=[1.5], num_filters=4, hidden_size=8,
                           codebook_size=16, upsampling_ratios=[2, 2], num_residual_layers=1),
        decoder=dict(model_type="musicgen_decoder", vocab_size=16, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, ffn_dim=32, num_codebooks=2, max_position_embeddings=64))
    assert _logit_width(transformers.MusicgenForConditionalGeneration(config)) == 16


def test_a_base_without_tokenizer_files_is_refused(tmp_path):
    """transformers 5 builds a Qwen2 (GPT-2, BERT, T5, ...) checkpoint without tokenizer files a
    tokenizer of its special tokens alone, no error: the bench read every prompt and answer as
    that and evaluated on it. Refused, naming the directory."""
    import transformers

    from epmq.benches.tiny import _start, _text_bench, word_tokenizer

    root, per_split, gen = _start(tmp_path, None, {"train": 12, "validation": 6}, 0)
    tok = word_tokenizer(root / "base")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    config = _text_bench(root, "hf_causal_lm", model, ("sst2",), per_split, gen)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "base" / f).unlink()
    with pytest.raises(BenchConfigError, match=f"cannot load the tokenizer from {root / 'base'}: it holds no "
                                               f"tokenizer files"):
        build_bench(config, base_dir=root, progress=False)
