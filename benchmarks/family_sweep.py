"""Which of transformers' architectures the walker quantizes: every model type of one of its
auto mappings (``--task``: causal LMs, masked LMs, sequence-to-sequence LMs, image classifiers),
built from its default config shrunk to a tiny one (hidden 32, 4 heads, 4 experts, images of
32 pixels, ... wherever the config has the attribute; one layer of each kind its per-layer lists
name, at least two; a few types' own knobs in ``OVERRIDES``; where that config does not validate,
the default's attributes set in place), run once, then quantized by GPTQ (4 bits, groups of 16)
on one batch: padded token ids (and decoder ids), or two images.

    python benchmarks/family_sweep.py [--task causal-lm] [--only TYPE ...] [--timeout 120] [--out FILE.json]

Each model type runs in its own process (a default config too large for memory, or a slow one,
costs only its own row). A row says where it stopped: ``config`` / ``build`` / ``forward`` (the
generic tiny config does not fit the architecture: not the walker's doing), ``quantize`` (the
walker's error, named), ``timeout``, or ``ok`` with the adapter that walked it (``auto``: no
adapter lists it, ``epmq.adapters.AUTO`` found its blocks) and the number of packed linears.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_json  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8, n_embd=32, n_layer=2, n_head=4,
            d_model=32, n_layers=2, n_heads=4, num_layers=2, num_heads=4, moe_intermediate_size=16, num_experts=4,
            num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4, ffn_hidden_size=64, pad_token_id=0,
            bos_token_id=0, eos_token_id=1, d_ff=64, ffn_dim=64, n_positions=64,
            # encoder-decoder
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64,
            # partial rotary, multi-head latent attention (head_dim = qk_rope_head_dim there)
            rotary_dim=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
            # linear attention / state-space mixers
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_head_dim=8, mamba_head_dim=8, mamba_n_heads=8, mamba_d_state=8, ssm_state_size=8, state_size=8,
            mamba_n_groups=1, n_groups=1, time_step_rank=4, mamba_dt_rank=4, lru_width=32, attention_head_dim=8,
            conv_kernel=4, mamba_d_head=8, n_mamba_heads=8, mamba_headdim=8, attention_hidden_size=32, kv_channels=8,
            adapter_rank=8, embedding_dim=32, num_blocks=2, context_length=64, linear_num_heads=4,
            num_experts_per_token=2,
            # hybrids: attention (and experts) on the second of two layers, a shared expert, one expert group
            attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, n_group=1,
            topk_group=1, num_expert_group=1, first_k_dense_replace=1, num_dense_layers=1,
            num_nextn_predict_layers=0, num_kv_shared_layers=0, n_shared_experts=1,
            first_dense_intermediate_size=64, shared_intermediate_size=16,
            )
# image classifiers: besides TINY (their sub-configs' too)
IMAGE_TINY = dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, hidden_sizes=[16, 32], depths=[1, 1],
                  num_heads=[2, 4], window_size=4)
# where the shrunk default still does not build (zamba ties its shared attention across its hybrid layers)
# (None: leave it to the config to derive)
_ZAMBA = dict(attention_hidden_size=64, attention_head_dim=16, kv_channels=16)  # attention on [hidden, embeddings]
OVERRIDES = {
    "zamba": dict(_ZAMBA, num_hidden_layers=6, layers_block_type=None, layer_types=None),
    "zamba2": dict(_ZAMBA, hybrid_layer_ids=[1]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "bamba": dict(attn_layer_indices=[1]),
    "falcon_h1": dict(mamba_d_ssm=64),
    "gemma3n_text": dict(vocab_size_per_layer_input=64, hidden_size_per_layer_input=8),
    "gemma3n": dict(vocab_size_per_layer_input=64, hidden_size_per_layer_input=8),
    "xlstm": dict(qk_dim_factor=1.0, hidden_size=64, embedding_dim=64),  # (its head widths round up to 64)
    "mamba2": dict(num_heads=8),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "dory": dict(n_input_layers=1, n_recurrent_layers=1, n_output_layers=1, num_hidden_layers=3, layer_types=None),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 8],
                     attention_head_size=8, feed_forward_size=64),
    "xmod": dict(is_decoder=True),
    "blt": dict(hidden_size_global=32, encoder_cross_output_size=32, encoder_hash_byte_group_vocab=64),
    # (its default config has no rope parameters, which its attention reads per layer type)
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    "hrm_text": dict(num_layers_per_stack=1, H_cycles=1, L_cycles=1, L_bp_cycles=[1]),
    # (transformers 5.25's DBRX reads rope_theta and a clip_qkv its defaults lack)
    "dbrx": dict(attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    "qwen4_exp": dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                      indexer_compress_ratio=2, hc_lowrank=8, ple_embed_dim=32, ngram_vocab_size_base=64,
                      split_ngram_parts=4, make_ngram_vocab_size_divisible_by=8, shared_expert_intermediate_size=16),
}
OVERRIDES["qwen4_exp_text"] = OVERRIDES["qwen4_exp"]
# (dots3-note's sliding-window layers: head_dim = nope + rope)
OVERRIDES["dots3_note_text"] = dict(head_dim=8, index_head_dim=8, index_topk=4)
# (its vision and audio adapters map their towers' width to the text model's)
OVERRIDES["dots3_note"] = dict(OVERRIDES["dots3_note_text"], adapter_in_dim=32, adapter_out_dim=32,
                                 adapter_input_size=32)
# keyword arguments of the forward (BLT's cache asks its composite config for num_hidden_layers)
BATCH = {"blt": dict(use_cache=False)}
# a per-layer list has one entry per layer: kept at the first layer of each distinct combination
PER_LAYER = ("layer_types", "mlp_layer_types", "layers_block_type", "activation_sparsity_pattern", "block_types",
             "swiglu_limits", "expert_swiglu_limit_list", "share_expert_swiglu_limit_list")


def shrink(d: dict, tiny: dict = TINY) -> dict:
    """A config dict (sub-configs' too) with ``tiny``'s values where it has the keys (None: the
    config's default), and the per-layer lists cut to the first layer of each kind (at least two
    layers)."""
    d = dict(d)
    n = d.get("num_hidden_layers")
    lists = [k for k in PER_LAYER if isinstance(d.get(k), list) and n and len(d[k]) == n]
    for key, value in tiny.items():
        if key in d:
            if value is None:
                d.pop(key)
            else:
                d[key] = value
    if d.get("q_lora_rank") is not None:
        d["q_lora_rank"] = 16
    if "kv_lora_rank" in d:  # latent attention: as many key-value heads as heads
        if "head_dim" in d:
            d["head_dim"] = d["qk_rope_head_dim"]
        if "num_key_value_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]
    if lists:
        seen, keep = set(), []
        for i in range(n):
            combo = tuple(str(d[k][i]) for k in lists)
            if combo not in seen:
                seen.add(combo)
                keep.append(i)
        if len(keep) < 2:
            keep = sorted(set(keep) | {min(n - 1, 1)})
        for k in lists:
            d[k] = [d[k][i] for i in keep]
        d["num_hidden_layers"] = len(keep)
        if isinstance(d.get("per_layer_config"), dict):  # (Gemma 4: {"05": {...}}, by layer index)
            d["per_layer_config"] = {
                str(new).zfill(len(key)): shrink(d["per_layer_config"][key], tiny)
                for new, old in enumerate(keep) for key in d["per_layer_config"] if int(key) == old}
    for key, value in d.items():
        if isinstance(value, dict) and ("model_type" in value or "hidden_size" in value):
            d[key] = shrink(value, tiny)
    return d


def tiny_config(model_type, tiny: dict = TINY):
    """``model_type``'s default config, shrunk (``shrink``, then ``OVERRIDES``) and built again."""
    from transformers import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    d = shrink(default.to_dict(), tiny)
    for k in ("transformers_version", "architectures", "model_type"):
        d.pop(k, None)
    for key, value in OVERRIDES.get(model_type, {}).items():
        for sub in [d] + [v for v in d.values() if isinstance(v, dict) and key in v]:
            if value is None:
                sub.pop(key, None)
            else:
                sub[key] = value
    try:
        return type(default)(**d)
    except Exception:  # (a config that validates what this shrinking breaks: the generic way)
        for key, value in tiny.items():
            if hasattr(default, key) and value is not None:
                try:
                    setattr(default, key, value)
                except Exception:  # (read-only properties)
                    pass
        if isinstance(getattr(default, "layer_types", None), list):
            default.layer_types = default.layer_types[:2]
        return default


# --task: transformers' auto mapping of the model classes, and the default output file
TASKS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "family_sweep_cpu.json"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "family_sweep_masked_lm_cpu.json"),
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "family_sweep_seq2seq_cpu.json"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "family_sweep_image_cpu.json"),
}


def classes(task: str) -> dict:
    """``{model type: class name}`` of ``task``'s mapping."""
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, TASKS[task][0])


def run_one(model_type: str, task: str = "causal-lm") -> dict:
    """Build ``model_type`` tiny, run it once, quantize it: the row (the stage it reached)."""
    import warnings

    import torch
    import transformers

    import epmq

    row = {"stage": "config"}
    try:
        config = tiny_config(model_type, dict(TINY, **IMAGE_TINY) if task == "image-classification" else TINY)
        name = classes(task)[model_type]
        cls = getattr(transformers, name if isinstance(name, str) else name[0])
        if not isinstance(config, cls.config_class):  # a multimodal config, whose causal LM is its text model
            subs = [v for v in vars(config).values() if isinstance(v, cls.config_class)]
            config = subs[0] if len(subs) == 1 else config.get_text_config()
        if task == "masked-lm":  # (OVERRIDES make Reformer and X-MOD causal)
            config.is_decoder = False
        row["stage"] = "build"
        torch.manual_seed(0)
        model = cls(config).eval()
        if hasattr(model, "set_default_language"):  # (X-MOD: which language's adapters run)
            model.set_default_language(config.languages[0])
        # (MusicGen: a row of ids per codebook, which calibration cannot cut by the mask: no padding)
        codebooks = getattr(config, "num_codebooks", 1)
        if task == "image-classification":
            size = getattr(config, "image_size", 32)
            size = size[0] if isinstance(size, (list, tuple)) else size
            batch = {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size)}
        else:
            batch = {"input_ids": torch.randint(3, 64, (2 * codebooks, 8)),
                     "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2] if codebooks == 1
                                                    else [[1] * 8] * 2)}
            if task == "seq2seq":
                batch["decoder_input_ids"] = torch.randint(3, 64, (2, 5))
        batch.update(BATCH.get(model_type, {}))
        row["stage"] = "forward"
        with torch.no_grad():
            model(**batch)
        row["stage"] = "quantize"
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                                calibration={"a": [batch]}, backend="torch", progress=False)
        row.update(stage="ok", adapter=model.epmq_report.adapter, linears=len(model.epmq_report.layers),
                   skipped=len(model.epmq_report.skipped), routers=len(model.epmq_report.routers),
                   warnings=[str(w.message)[:200] for w in said if "epmq" in str(w.filename)])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="causal-lm", help="which models (default: causal-lm)")
    parser.add_argument("--only", nargs="*", help="model types (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", help="default: benchmarks/results/family_sweep_cpu.json for causal LMs, "
                                      "family_sweep_<task>_cpu.json for the others (.only.json with --only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one model type, in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.task)))
        return
    import transformers

    from tqdm.auto import tqdm

    # (before any child: a type misspelt, or of another task, was run and recorded as an
    # architecture whose tiny config does not fit, "KeyError: 'lama'")
    unknown = [t for t in args.only or [] if t not in classes(args.task)]
    if unknown:
        parser.error(f"--only: {', '.join(map(repr, unknown))} is no model type of --task {args.task} "
                     f"(transformers' {TASKS[args.task][0]})")
    rows = {}
    for model_type in tqdm(args.only or list(classes(args.task)), unit="model"):
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--task", args.task, "--child", model_type],
                                  capture_output=True, text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines else {"stage": "crash", "error": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"stage": "timeout"}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[model_type] = row
    stages = {}
    for row in rows.values():
        key = row["stage"]
        if key == "ok":
            key = "ok (auto)" if row["adapter"] == "auto" else "ok (built-in adapter)"
        stages[key] = stages.get(key, 0) + 1
    summary = {"task": args.task, "transformers": transformers.__version__, "model_types": len(rows),
               "stages": stages, "only": args.only, "command": " ".join(["python", *sys.argv])}
    print(json.dumps(summary, indent=1))
    out = args.out or os.path.join("benchmarks", "results", TASKS[args.task][1])
    if args.only and not args.out:  # (a quick check of a few types left the committed sweep of all as theirs)
        out = out[:-len(".json")] + ".only.json"
    write_json(out, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
