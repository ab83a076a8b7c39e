"""Tiny random-init models of every supported family, shared by the walker tests, and what a
test needs around them: experts, the merge, calibration inputs, a comparable output.

(Named ``test_*`` so it lives beside the other walker tests; the few tests at the bottom check
that every builder runs and that its family's adapter finds the blocks.)
"""

import functools

import pytest
import torch

import epmq
from epmq.adapters import find_towers
from epmq.benches import tiny as tiny_benches
from epmq.merge import task_arithmetic

TASKS = ["cars", "dtd", "svhn"]
VOCAB = 64
# Decoder-only LMs beyond the Llama family: tiny configs of each (the model class, the config
# class, their own options); they share the Llama family's calling convention.
DECODERS = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=8)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=8, sliding_window=4)),
    # alternating sliding-window and full layers with two rotary tables
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0)),  # fused qkv and gate_up
    "phi": ("PhiForCausalLM", "PhiConfig", dict()),  # parallel attention and MLP
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict()),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict()),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict()),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict()),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(num_key_value_heads=None)),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(num_key_value_heads=None,
                                                         intermediate_size=None)),
}
# Mixture-of-experts decoders: 4 experts, 2 per token (fused 3-D experts in transformers 5).
MOE = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # experts stored transposed, dense routing (every token to every expert, scaled by a router
    # score that is zero where not routed); a dense MLP in layer 0, experts and a shared expert
    # in layer 1; layer 0 with rotary and chunked attention, layer 1 without either
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig",
               dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                    intermediate_size_mlp=64, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
                    attention_chunk_size=4)),
}
# Encoders (text with padded attention masks, or images): (model class, config class, options).
ENCODERS = {
    "bert": ("BertModel", "BertConfig", dict(vocab_size=VOCAB)),
    "roberta": ("RobertaModel", "RobertaConfig", dict(vocab_size=VOCAB)),
    "deberta_v2": ("DebertaV2Model", "DebertaV2Config", dict(vocab_size=VOCAB)),
    "vit": ("ViTModel", "ViTConfig", dict(image_size=16, patch_size=8)),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(image_size=16, patch_size=8)),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", dict(image_size=16, patch_size=8)),
}
ARCHS = [
    "open_clip_vit", "open_clip_clip", "open_clip_coca", "open_clip_timm", "timm_vit", "timm_eva", "hf_clip_vision", "hf_clip", "t5", "mt5", "bart", "gpt2",
    "llama", "qwen2", "mistral", *DECODERS, *MOE, *ENCODERS,
]


# A tiny CoCa in open_clip's model_cfg layout (as its open_clip_config.json holds it).
COCA_CFG = dict(
    embed_dim=32,
    multimodal_cfg=dict(context_length=8, vocab_size=VOCAB, width=32, heads=4, layers=2, mlp_ratio=2.0,
                        attn_pooler_heads=4),
    text_cfg=dict(context_length=8, vocab_size=VOCAB, width=32, heads=4, layers=2, mlp_ratio=2.0, embed_cls=True,
                  output_tokens=True),
    vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16, patch_size=8, mlp_ratio=2.0,
                    attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=5, output_tokens=True),
)


def tiny_timm_vit(**options):
    """timm's ViT (its ``blocks`` a Sequential), hidden 32, 2 blocks, 16x16 images."""
    from timm.models.vision_transformer import VisionTransformer

    options = dict(dict(num_classes=0), **options)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, **options)


def _register_timm_model():
    """``epmq_tiny_vit`` in timm's registry: what an open_clip model names as its image tower."""
    from timm.models import is_model, register_model

    if not is_model("epmq_tiny_vit"):
        def epmq_tiny_vit(pretrained=False, **options):
            model = tiny_timm_vit(**{k: v for k, v in options.items()  # (not the registry's own)
                                     if not k.startswith("pretrained_") and k != "cache_dir"})
            # (timm's builder sets them, naming the architecture; open_clip reads them)
            model.pretrained_cfg = model.default_cfg = {"architecture": "epmq_tiny_vit"}
            return model

        register_model(epmq_tiny_vit)


# An open_clip CLIP whose image tower is a timm model (as ViT-*-SigLIP*, EVA02-*, PE-Core-*).
TIMM_CLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(timm_model_name="epmq_tiny_vit", timm_model_pretrained=False, timm_pool="avg",
                    timm_proj="linear", image_size=16),
    text_cfg=dict(context_length=8, vocab_size=VOCAB, width=32, heads=4, layers=2, mlp_ratio=2.0),
)


def build(arch: str, seed: int = 0):
    """A tiny model of family ``arch`` (hidden 32, 2 blocks per stack), in eval mode."""
    torch.manual_seed(seed)
    if arch == "open_clip_vit":
        from open_clip.transformer import VisionTransformer

        model = VisionTransformer(
            image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16
        )
    elif arch == "open_clip_clip":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(
            embed_dim=16,
            vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, image_size=16, patch_size=8, mlp_ratio=2.0),
            text_cfg=CLIPTextCfg(context_length=8, vocab_size=VOCAB, width=32, heads=4, layers=2, mlp_ratio=2.0),
        )
    elif arch == "open_clip_coca":  # its captioning decoder calls self- and cross-attention blocks of two lists in turn
        from open_clip.coca_model import CoCa

        model = CoCa(**COCA_CFG)
        with torch.no_grad():  # (open_clip leaves the decoder's projection uninitialised: torch.empty)
            model.text_decoder.text_projection.normal_(std=32**-0.5)
    elif arch == "open_clip_timm":
        from open_clip.model import CLIP

        _register_timm_model()
        model = CLIP(**TIMM_CLIP_CFG)
    elif arch == "timm_vit":
        model = tiny_timm_vit()
    elif arch == "timm_eva":  # EVA-02's block: rotary table as a keyword, SwiGLU, a q/v bias beside qkv
        from timm.models.eva import Eva

        model = Eva(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0, mlp_ratio=2.0,
                    use_rot_pos_emb=True, swiglu_mlp=True, ref_feat_shape=(2, 2))
    elif arch in ("hf_clip_vision", "hf_clip"):
        from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=16, patch_size=8)
        if arch == "hf_clip_vision":
            model = CLIPVisionModel(CLIPVisionConfig(**vision))
        else:
            text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif arch in ("t5", "mt5"):
        import transformers

        prefix = "T5" if arch == "t5" else "MT5"
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(getattr(transformers, f"{prefix}Config")(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
        ))
    elif arch == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        model = BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        ))
    elif arch == "gpt2":  # Conv1D projections
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                           bos_token_id=0, eos_token_id=0))
    elif arch in ("llama", "qwen2", "mistral"):
        import transformers

        common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
        if arch == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        elif arch == "qwen2":  # one full and one sliding-window layer: the masks differ by depth
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                **common, use_sliding_window=True, sliding_window=4, max_window_layers=1))
        else:
            model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=4))
    elif arch in DECODERS or arch in MOE or arch in ENCODERS:
        import transformers

        model_class, config_class, options = {**DECODERS, **MOE, **ENCODERS}[arch]
        config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        if arch not in ENCODERS:
            config.update(vocab_size=VOCAB, num_key_value_heads=2)
        config.update(options)
        config = {k: v for k, v in config.items() if v is not None}  # (options a family lacks)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    else:
        raise ValueError(arch)
    return model.eval()


def inputs(arch: str, n: int, gen: torch.Generator) -> list:
    """``n`` calibration items (batches of 2) for ``arch``."""

    def image():
        return torch.randn(2, 3, 16, 16, generator=gen)

    def ids(length=8):
        return torch.randint(0, VOCAB, (2, length), generator=gen)

    def open_clip_text():  # its text tower pools the largest id (the end token): last, so every
        # position is a token (positions after it are padding, which the walk leaves out)
        text = ids().clamp(max=VOCAB - 2)
        text[:, -1] = VOCAB - 1
        return text

    make = {
        "open_clip_vit": lambda: image(),
        "open_clip_clip": lambda: {"image": image(), "text": open_clip_text()},
        "open_clip_coca": lambda: {"image": image(), "text": open_clip_text()},
        "open_clip_timm": lambda: {"image": image(), "text": open_clip_text()},
        "timm_vit": lambda: image(),
        "timm_eva": lambda: image(),
        "hf_clip_vision": lambda: {"pixel_values": image()},
        "hf_clip": lambda: {"pixel_values": image(), "input_ids": ids()},
        "t5": lambda: {"input_ids": ids(), "decoder_input_ids": ids(5)},
        "mt5": lambda: {"input_ids": ids(), "decoder_input_ids": ids(5)},
        # padded encoder input: the mask reaches the encoder's blocks and the decoder's cross attention
        "bart": lambda: {"input_ids": ids(), "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2]),
                         "decoder_input_ids": ids(5)},
        "gpt2": lambda: ids(),
        "llama": lambda: ids(),
        "qwen2": lambda: ids(),
        "mistral": lambda: ids(),
        **{name: lambda: ids() for name in (*DECODERS, *MOE)},
        **{name: lambda: {"pixel_values": image()} for name in ("vit", "dinov2", "siglip")},
        # the second sequence padded: the mask reaches every block
        **{name: lambda: {"input_ids": ids(), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
           for name in ("bert", "roberta", "deberta_v2")},
    }[arch]
    return [make() for _ in range(n)]


def output(model, item) -> torch.Tensor:
    """One tensor that depends on every quantized layer of the model."""
    with torch.no_grad():
        out = model(**item) if isinstance(item, dict) else model(item)
    if isinstance(out, torch.Tensor):
        return out
    if type(out) is dict:  # open_clip CoCa (HF outputs are dicts too): both towers' features (and the decoder's logits)
        return torch.cat([out["image_features"], out["text_features"], out["logits"].flatten(1)], dim=-1)
    if isinstance(out, tuple):  # open_clip CLIP: (image features, text features, logit scale)
        return torch.cat([out[0], out[1]], dim=-1)
    if getattr(out, "image_embeds", None) is not None:  # HF CLIPModel: both towers' embeddings
        return torch.cat([out.image_embeds, out.text_embeds], dim=-1)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise TypeError(type(out))


# An "expert": the base plus independent noise of 2% of each tensor's spread (the benches' is 5%).
perturb = functools.partial(tiny_benches.perturb, scale=0.02)


class Stack(torch.nn.Module):
    """A model of ``blocks`` under ``layers``, called in turn (the smallest model the walker
    finds a stack of blocks in)."""

    def __init__(self, *blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


class Family:
    """Base, experts, merged state and calibration of one architecture."""

    def __init__(self, arch, gen, n_samples=2, tasks=TASKS):
        self.arch, self.gen, self.tasks = arch, gen, list(tasks)
        self.base = build(arch)
        self.experts = {t: perturb(self.base, gen) for t in self.tasks}
        self.merged_state = task_arithmetic(self.base, list(self.experts.values()), scale=0.3)
        self.calibration = {t: inputs(arch, n_samples, gen) for t in self.tasks}
        self.test_item = inputs(arch, 1, gen)[0]

    def merged(self, seed=1):
        """A fresh model holding the merged weights."""
        model = build(self.arch, seed=seed)
        model.load_state_dict(self.merged_state)
        return model

    def fresh(self, seed=2):
        return build(self.arch, seed=seed)


def rel_err(y, ref):
    return float((y - ref).norm() / ref.norm())


def hooked_inputs(model, target, items) -> list:
    """Every input of the layer ``target`` in plain forwards of ``model`` on ``items`` (dicts of
    model inputs), as float64 rows."""
    hand = []
    handle = model.get_submodule(target).register_forward_pre_hook(
        lambda m, args: hand.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for item in items:
            model(**item)
    handle.remove()
    return hand


def walked_inputs(monkeypatch) -> list:
    """The list that every batch the walk's Hessian statistics take in is appended to (float64)."""
    from epmq.stats import HessianStats

    seen, add_batch = [], HessianStats.add_batch
    monkeypatch.setattr(HessianStats, "add_batch",
                        lambda self, x, **kw: seen.append(x.double()) or add_batch(self, x, **kw))
    return seen


def assert_same_statistics(seen, hand):
    """The Gram matrices of two lists of input rows agree (summation order aside)."""
    H_hand, H_walk = sum(x.T @ x for x in hand), sum(x.T @ x for x in seen)
    torch.testing.assert_close(H_walk, H_hand, rtol=1e-5, atol=1e-6 * float(H_hand.abs().max()))


# --------------------------------------------------------------------------- builder checks


@pytest.mark.parametrize("arch", ARCHS)
def test_builder_runs_and_adapter_finds_blocks(arch, gen):
    model = build(arch)
    y = output(model, inputs(arch, 1, gen)[0])
    assert torch.isfinite(y).all()
    stacks = [stack for _, tower in find_towers(model) for stack in tower]
    expected = {"open_clip_clip": 2, "open_clip_coca": 4, "open_clip_timm": 2, "hf_clip": 2, "t5": 2, "mt5": 2, "bart": 2}.get(arch, 1)
    assert len(stacks) == expected and all(len(blocks) == 2 for _, blocks in stacks)


def test_epmq_namespace_exports():
    for name in ("quantize_model", "QuantLinear", "save_quantized", "load_quantized", "register_adapter", "Adapter"):
        assert hasattr(epmq, name) and name in epmq.__all__


# --------------------------------------------------------------------------- more families

def _classes(model_class, config_class):
    """The two transformers classes, or a skip where the installed transformers predates them."""
    import pytest
    import transformers

    missing = [c for c in (model_class, config_class) if not hasattr(transformers, c)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {missing[0]}")
    return getattr(transformers, model_class), getattr(transformers, config_class)


def _decoder(model_class, config_class, **options):
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.update(options)

    def build():
        model, config_type = _classes(model_class, config_class)
        return model(config_type(**{k: v for k, v in config.items() if v is not None}))

    return build


def _hf(model_class, config_class, **config):
    def build():
        model, config_type = _classes(model_class, config_class)
        return model(config_type(**config))

    return build


_ENCDEC = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
_MOE = dict(num_experts_per_tok=2)
# DeepSeek-style routing (GLM-4.5, dots.llm1): routed and shared experts, the first layer dense
_DEEPSEEK_ROUTING = dict(n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=1, topk_group=1, **_MOE)
_DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                 v_head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                 first_k_dense_replace=1, n_group=1, topk_group=1, **_MOE)

_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
# multi-head latent attention (as many key-value heads as heads; head_dim is the rotary part)
_LATENT = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
               v_head_dim=8, head_dim=4)
# Zamba's attention reads [hidden, embeddings]: twice the width
_ZAMBA = dict(attention_hidden_size=64, attention_head_dim=16, num_key_value_heads=4)

# Families that share a built-in adapter's calling convention, each checked end to end once
# (tests/epmq/test_walker_archs.py): name -> (builder, kind of calibration input).
WIDER = {
    "olmo": (_decoder("OlmoForCausalLM", "OlmoConfig"), "ids"),
    "starcoder2": (_decoder("Starcoder2ForCausalLM", "Starcoder2Config"), "ids"),
    "cohere2": (_decoder("Cohere2ForCausalLM", "Cohere2Config", sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"]), "ids"),
    "gptj": (_hf("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                 n_positions=64), "ids"),
    "gpt_bigcode": (_hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_embd=32, n_layer=2,
                        n_head=4, n_positions=64, multi_query=True), "ids"),
    "opt": (_hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1), "ids"),
    "bloom": (_hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "ids"),
    "mpt": (_hf("MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                max_seq_len=64), "ids"),
    **{name.lower(): (_decoder(f"{name}ForCausalLM", f"{name}Config", pad_token_id=0, bos_token_id=0,
                               eos_token_id=1, **options), "ids")
       for name, options in {
           "SmolLM3": {}, "Ministral": dict(head_dim=8), "Ministral3": {}, "Olmo3": {}, "Glm": {}, "Glm4": {},
           "Exaone4": {}, "Helium": dict(head_dim=8), "Apertus": {}, "Arcee": {}, "SeedOss": {}, "Ernie4_5": {},
           "Nemotron": {}, "Persimmon": {}, "VaultGemma": dict(head_dim=8), "DiffLlama": {},
           "HunYuanDenseV1": dict(head_dim=8), "Cwm": {}, "NanoChat": {}, "Jais2": {},
           # hybrids: a short-convolution layer and an attention layer; Falcon-H1's parallel Mamba 2
           "Lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=64, block_auto_adjust_ff_dim=False),
           "FalconH1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
                            head_dim=8),
           "Bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                         mamba_d_state=8)}.items()},
    **{name.lower(): (_decoder(f"{name}ForCausalLM", f"{name}Config", pad_token_id=0, bos_token_id=0,
                               eos_token_id=1, **options), "ids")
       for name, options in {
           "Glm4Moe": dict(_DEEPSEEK_ROUTING, head_dim=8), "Dots1": dict(_DEEPSEEK_ROUTING, head_dim=8),
           "Ernie4_5_Moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                                moe_layer_start_index=1),
           "MiniMax": dict(num_local_experts=4, head_dim=8, **_MOE),
           "HunYuanMoEV1": dict(num_experts=4, moe_topk=2, moe_intermediate_size=16, head_dim=8),
           "FlexOlmo": dict(num_experts=4, **_MOE), "Cohere2Moe": dict(num_experts=4, **_MOE),
           "ExaoneMoe": dict(num_experts=4, **_MOE),
           "GraniteMoeShared": dict(num_local_experts=4, shared_intermediate_size=16, **_MOE),
           # hybrids: a gated DeltaNet layer and an attention layer; a Mamba 2 layer and an attention layer
           "Qwen3Next": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, head_dim=8,
                             layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, **_MOE),
           "GraniteMoeHybrid": dict(num_local_experts=4, layer_types=["mamba", "attention"], mamba_d_state=8,
                                    mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_conv=4, **_MOE),
           # experts transposed, gate and up interleaved, with biases; a clamped SwiGLU
           "GptOss": dict(num_local_experts=4, head_dim=8, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], **_MOE)}.items()},
    "qwen2_moe": (_decoder("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_experts=4, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, **_MOE), "ids"),
    "olmoe": (_decoder("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, **_MOE), "ids"),
    "phimoe": (_decoder("PhimoeForCausalLM", "PhimoeConfig", num_local_experts=4, **_MOE), "ids"),
    "granitemoe": (_decoder("GraniteMoeForCausalLM", "GraniteMoeConfig", num_local_experts=4, **_MOE), "ids"),
    "deepseek_v2": (_decoder("DeepseekV2ForCausalLM", "DeepseekV2Config", **_DEEPSEEK), "ids"),
    "deepseek_v3": (_decoder("DeepseekV3ForCausalLM", "DeepseekV3Config", **_DEEPSEEK), "ids"),
    # Llama 4 as Scout and Maverick route: one expert per token (MoE in layer 1 only), every
    # layer with chunked attention, padded
    "llama4": (_decoder("Llama4ForCausalLM", "Llama4TextConfig", head_dim=8, intermediate_size=16,
                        intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1, moe_layers=[1],
                        attention_chunk_size=4), "ids"),
    "jamba": (_decoder("JambaForCausalLM", "JambaConfig", num_experts=4, attn_layer_period=2, attn_layer_offset=1,
                       expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2,
                       mamba_dt_rank=4, use_mamba_kernels=False, **_MOE), "ids"),
    # Gemma 3n: hidden states of 4 AltUp streams, a per-layer input each layer, the last 2 layers attending to
    # the keys and values of the first 2
    "gemma3n": (_decoder("Gemma3nForCausalLM", "Gemma3nTextConfig", num_hidden_layers=4, head_dim=8, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
                         activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]), "ids"),
    # DeBERTa-v2 xlarge's layout: a convolution of the embeddings mixed into the first layer's
    # output, between the layers
    "deberta_v2_conv": (_hf("DebertaV2Model", "DebertaV2Config", vocab_size=VOCAB, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, conv_kernel_size=3),
                        "masked_ids"),
    "xlm_roberta": (_hf("XLMRobertaModel", "XLMRobertaConfig", vocab_size=VOCAB, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), "masked_ids"),
    "electra": (_hf("ElectraModel", "ElectraConfig", vocab_size=VOCAB, hidden_size=32, embedding_size=16,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), "masked_ids"),
    "modernbert": (_hf("ModernBertModel", "ModernBertConfig", vocab_size=VOCAB, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                       global_attn_every_n_layers=2, local_attention=4), "masked_ids"),
    "deit": (_hf("DeiTModel", "DeiTConfig", image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4), "image"),
    "beit": (_hf("BeitModel", "BeitConfig", image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, use_relative_position_bias=True), "image"),
    "siglip2": (_hf("Siglip2VisionModel", "Siglip2VisionConfig", hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, patch_size=8, num_patches=16), "patches"),
    "longt5": (_hf("LongT5ForConditionalGeneration", "LongT5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                   num_layers=2, num_heads=4, decoder_start_token_id=0, local_radius=4,
                   encoder_attention_type="local"), "pairs"),
    "longt5_tglobal": (_hf("LongT5ForConditionalGeneration", "LongT5Config", vocab_size=VOCAB, d_model=32, d_kv=8,
                           d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, local_radius=4,
                           global_block_size=4, encoder_attention_type="transient-global"), "pairs"),
    "swin": (_hf("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                 num_heads=[2, 4], window_size=4), "image32"),
    "swinv2": (_hf("Swinv2Model", "Swinv2Config", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                   num_heads=[2, 4], window_size=4), "image32"),
    "mbart": (_hf("MBartForConditionalGeneration", "MBartConfig", **_ENCDEC, pad_token_id=1, bos_token_id=0,
                  eos_token_id=2, decoder_start_token_id=2), "pairs"),
    "pegasus": (_hf("PegasusForConditionalGeneration", "PegasusConfig", **_ENCDEC, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0), "pairs"),
    # walked by epmq.adapters.AUTO: no adapter lists them (state-space, RNN and BitNet layers, a
    # biomedical GPT, MoE with transposed fused experts), and AriaText, whose layers MOE_DECODERS now lists
    **{name.lower(): (_decoder(f"{name}ForCausalLM", f"{name}Config", pad_token_id=0, bos_token_id=0,
                               eos_token_id=1, **options), "ids")
       for name, options in {
           "BioGpt": {}, "BitNet": {}, "Doge": dict(keep_window_size=4),
           "AriaText": dict(moe_num_experts=4, moe_topk=2, head_dim=8),
           "Afmoe": dict(num_experts=4, moe_intermediate_size=16, num_dense_layers=1, head_dim=8, **_MOE),
           "Mamba": dict(state_size=4, expand=2), "FalconMamba": dict(state_size=4, expand=2),
           "Mamba2": dict(state_size=8, expand=2, num_heads=8, head_dim=8, n_groups=1)}.items()},
    # hybrids of attention with linear attention or state-space layers (one layer of each kind),
    # latent-attention families, an interleaved-rotary GPT: all walked by AUTO
    **{name.lower(): (_decoder(f"{name}ForCausalLM", config, pad_token_id=0, bos_token_id=0, eos_token_id=1,
                               **options), "ids")
       for name, config, options in [
           ("Qwen3_5", "Qwen3_5TextConfig", dict(_LINEAR_ATTENTION, head_dim=8)),
           ("Qwen3_5Moe", "Qwen3_5MoeTextConfig", dict(_LINEAR_ATTENTION, head_dim=8, num_experts=4,
                                                        moe_intermediate_size=16, **_MOE)),
           ("OlmoHybrid", "OlmoHybridConfig", _LINEAR_ATTENTION),
           ("KimiLinear", "KimiLinearConfig", dict(_LATENT, q_lora_rank=None, num_hidden_layers=3, num_experts=4,
                                                    num_experts_per_token=2, linear_head_dim=8, linear_num_heads=4,
                                                    mlp_layer_types=["dense", "sparse", "sparse"],
                                                    layer_types=["linear_attention", "linear_attention",
                                                                 "full_attention"])),
           ("NemotronH", "NemotronHConfig", dict(head_dim=8, ssm_state_size=8, mamba_head_dim=8, n_groups=1,
                                                  n_routed_experts=4, moe_intermediate_size=16,
                                                  num_hidden_layers=None)),
           ("Zamba2", "Zamba2Config", dict(_ZAMBA, layers_block_type=["linear_attention", "hybrid"],
                                            hybrid_layer_ids=[1], mamba_d_state=8, mamba_headdim=8,
                                            adapter_rank=8)),
           ("Lfm2Moe", "Lfm2MoeConfig", dict(num_experts=4, moe_intermediate_size=16, num_dense_layers=1,
                                              layer_types=["conv", "full_attention"], **_MOE)),
           ("MiniCPM3", "MiniCPM3Config", _LATENT),
           ("Glm4MoeLite", "Glm4MoeLiteConfig", dict(_LATENT, n_routed_experts=4, moe_intermediate_size=16,
                                                      mlp_layer_types=["dense", "sparse"], **_MOE)),
           ("DeepseekV32", "DeepseekV32Config", dict(_DEEPSEEK, head_dim=4, mlp_layer_types=["dense", "sparse"])),
           # fused experts with a gate of their own (a per-layer SwiGLU limit; a clamped SwiGLU)
           ("BailingHybrid", "BailingHybridConfig", dict(
               _LATENT, q_lora_rank=None, num_hidden_layers=3, num_experts=4, moe_intermediate_size=16,
               num_experts_per_token=2, num_expert_group=1, topk_group=1, first_k_dense_replace=1,
               num_nextn_predict_layers=0, linear_head_dim=8, linear_num_heads=4,
               layer_types=["linear_attention", "linear_attention", "full_attention"],
               mlp_layer_types=["dense", "sparse", "sparse"], expert_swiglu_limit_list=[0, 0.5, 0.5],
               share_expert_swiglu_limit_list=[0, 0, 0])),
           ("HYV4", "HYV4Config", dict(_LATENT, n_routed_experts=4, moe_intermediate_size=16, swiglu_limit=0.5,
                                        mlp_layer_types=["dense", "sparse"], **_MOE)),
           # Gemma 4 as 26B-A4B: a dense MLP and experts side by side in each layer, its router a
           # plain linear (kept in full precision); per-layer inputs as E2B's
           ("Gemma4", "Gemma4TextConfig", dict(head_dim=8, global_head_dim=8, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"],
                                                enable_moe_block=True, num_experts=4, top_k_experts=2,
                                                moe_intermediate_size=16, hidden_size_per_layer_input=8,
                                                vocab_size_per_layer_input=VOCAB)),
           ("LongcatFlash", "LongcatFlashConfig", dict(_LATENT, num_hidden_layers=None, num_layers=2,
                                                        intermediate_size=None, ffn_hidden_size=64,
                                                        moe_intermediate_size=None, n_routed_experts=4)),
       ]},
    # Zamba: one attention block whose weights every hybrid layer ties (packed once, shared)
    "zamba": (_decoder("ZambaForCausalLM", "ZambaConfig", **_ZAMBA, num_hidden_layers=6, n_mamba_heads=2,
                       mamba_d_state=8, mamba_dt_rank=4, attn_layer_period=2, attn_layer_offset=1,
                       pad_token_id=0, bos_token_id=0, eos_token_id=1), "ids"),
    # JetMoE: experts of attention and MLP as one [E, out, in] weight called on tokens sorted by expert
    "jetmoe": (_decoder("JetMoeForCausalLM", "JetMoeConfig", kv_channels=8, num_local_experts=4, pad_token_id=0,
                        bos_token_id=0, eos_token_id=1), "ids"),
    # DBRX: experts as three [E * I, H] matrices, the down projection transposed
    "dbrx": (_hf("DbrxForCausalLM", "DbrxConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2,
                 max_seq_len=64, attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2)), "ids"),
    # Ergo: experts without a gate, stored transposed, each normed by a weight of its own
    "ergo": (_decoder("ErgoForCausalLM", "ErgoConfig", intermediate_size=None, head_dim=8,
                      first_dense_intermediate_size=64, moe_intermediate_size=16, shared_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, sliding_window=4, pad_token_id=0, bos_token_id=0,
                      eos_token_id=1, layer_types=["sliding_attention", "full_attention"],
                      mlp_layer_types=["dense", "sparse"]), "ids"),
    "codegen": (_hf("CodeGenForCausalLM", "CodeGenConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                    rotary_dim=4, n_positions=64, bos_token_id=0, eos_token_id=1), "ids"),
    "rwkv": (_hf("RwkvForCausalLM", "RwkvConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 attention_hidden_size=32, intermediate_size=64, context_length=64), "ids"),
    # Reformer: reversible blocks, which take and return (attention output, hidden states) as a
    # named tuple; local and LSH attention (hashing seeded)
    "reformer": (_hf("ReformerModelWithLMHead", "ReformerConfig", vocab_size=VOCAB, hidden_size=32,
                     attention_head_size=8, num_attention_heads=4, feed_forward_size=64,
                     attn_layers=["local", "lsh"], axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 8],
                     is_decoder=True, hash_seed=0, pad_token_id=0, eos_token_id=1), "ids"),
    # ALBERT: one layer, called once per layer of the model (solved on every call's inputs)
    "albert": (_hf("AlbertForMaskedLM", "AlbertConfig", vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                   num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
               "ids"),
    "ctrl": (_hf("CTRLLMHeadModel", "CTRLConfig", vocab_size=VOCAB, n_embd=32, dff=64, n_layer=2, n_head=4,
                 n_positions=64), "ids"),
    # encoder-decoders AUTO walks: Marian, M2M-100 (NLLB dense), UMT5 (a position bias in every
    # block), Switch Transformers and NLLB-MoE (experts in a ModuleDict, every other block)
    "marian": (_hf("MarianMTModel", "MarianConfig", **_ENCDEC, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0), "pairs"),
    "m2m_100": (_hf("M2M100ForConditionalGeneration", "M2M100Config", **_ENCDEC, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2, decoder_start_token_id=2), "pairs"),
    "umt5": (_hf("UMT5ForConditionalGeneration", "UMT5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                 num_layers=2, num_heads=4, decoder_start_token_id=0), "pairs"),
    "switch_transformers": (_hf("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
                                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2,
                                decoder_start_token_id=0), "pairs"),
    "nllb_moe": (_hf("NllbMoeForConditionalGeneration", "NllbMoeConfig", **_ENCDEC, num_experts=4,
                     encoder_sparse_step=2, decoder_sparse_step=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2), "pairs"),
    "whisper": (_hf("WhisperForConditionalGeneration", "WhisperConfig", **{k: v for k, v in _ENCDEC.items()
                                                                           if k != "max_position_embeddings"},
                    num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None,
                    begin_suppress_tokens=None), "audio"),
}


def wider_input(kind: str, gen: torch.Generator):
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    return {"ids": lambda: {"input_ids": ids, "attention_mask": mask},
            "masked_ids": lambda: {"input_ids": ids, "attention_mask": mask},
            "image": lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)},
            "image32": lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
            "pairs": lambda: {"input_ids": ids, "attention_mask": mask,
                              "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)},
            # 16 patches of 8 x 8 x 3 per image; the second image's last 4 are padding
            "patches": lambda: {"pixel_values": torch.randn(2, 16, 192, generator=gen),
                                "pixel_attention_mask": torch.tensor([[1] * 16, [1] * 12 + [0] * 4]),
                                "spatial_shapes": torch.tensor([[4, 4], [4, 4]])},
            "audio": lambda: {"input_features": torch.randn(2, 8, 32, generator=gen),
                              "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)},
            }[kind]()
