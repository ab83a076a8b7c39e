"""The built-in model families: open_clip, HF CLIP, HF T5/mT5, HF BART, HF GPT-2, HF decoder-only
LMs, HF encoders."""

from __future__ import annotations

import torch
from torch import nn

from . import Adapter, Part, Transposed, named_blocks
from .attention import LinearCrossAttention, LinearInProjAttention, LinearMultiheadAttention, applies_in_proj_weight


class OpenClipAdapter(Adapter):
    """open_clip ``VisionTransformer``, ``TextTransformer``, full ``CLIP`` (both towers) and
    ``CoCa`` (its towers and captioning decoder): ``ResidualAttentionBlock``s, whose
    ``nn.MultiheadAttention`` is rebuilt on ``nn.Linear`` (``LinearMultiheadAttention``; in the
    cross-attention blocks of CoCa's decoder ``LinearCrossAttention``, its q, k and v
    projections row blocks of ``in_proj_weight``); ``CustomResidualAttentionBlock``s (qk_norm,
    scaled cosine attention, ...), whose open_clip ``Attention`` applies its ``in_proj_weight`` by
    ``F.linear``, on an ``nn.Linear`` as well (``LinearInProjAttention``)."""

    def prepare(self, model, swap):
        renames = {}
        for stack_name, blocks in self.stacks(model):
            for block_name, block in named_blocks(stack_name, blocks):
                name = f"{block_name}.attn"
                if applies_in_proj_weight(block.attn):
                    renames.update(swap_in_proj_attention(name, block.attn, swap))
                    continue
                if not isinstance(block.attn, nn.MultiheadAttention):
                    continue
                if _cross_attention(block):
                    renames.update(swap_cross_attention(name, block.attn, swap))
                else:
                    swap(name, LinearMultiheadAttention(block.attn))
                    renames[f"{name}.in_proj.weight"] = f"{name}.in_proj_weight"
                    renames[f"{name}.in_proj.bias"] = f"{name}.in_proj_bias"
        return renames

    def token_mask(self, model, prefix, item):
        # A text tower pools the end token's features (the largest id, or its EOS id) under a
        # causal mask: the positions after it, the tokenizer's zero padding up to the context
        # length, change nothing the model returns, and are no calibration tokens.
        if prefix != "transformer.resblocks" and not prefix.endswith(".transformer.resblocks"):
            return None
        owner_name = prefix[:-len("transformer.resblocks")].rstrip(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", None))
        if (owner_name.endswith("visual") or pool not in ("argmax", "eos") or getattr(owner, "attn_mask", None) is None
                or getattr(owner, "cls_emb", None) is not None
                or getattr(owner, "output_tokens", False)):  # (it returns every position's features)
            return None
        text = _open_clip_text(item)
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.is_floating_point():
            return None
        if pool == "argmax":
            end = text.argmax(dim=-1)
        else:
            end = (text == getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))).int().argmax(dim=-1)
        return torch.arange(text.shape[1], device=text.device)[None, :] <= end[:, None]


def swap_cross_attention(name: str, mha: nn.MultiheadAttention, swap) -> dict:
    """``mha`` (at ``name``) replaced by a ``LinearCrossAttention``; its checkpoint names."""
    E, renames = mha.embed_dim, {}
    swap(name, LinearCrossAttention(mha))
    for j, projection in enumerate(("q_proj", "k_proj", "v_proj")):
        for kind, fused in (("weight", mha.in_proj_weight), ("bias", mha.in_proj_bias)):
            if fused is not None:
                renames[f"{name}.{projection}.{kind}"] = Part(
                    f"{name}.{projection}.{kind}", f"{name}.in_proj_{kind}", None, (j * E, (j + 1) * E), fused.shape)
    return renames


def swap_in_proj_attention(name: str, attention: nn.Module, swap) -> dict:
    """open_clip's ``Attention`` (at ``name``) replaced by a ``LinearInProjAttention``; its
    checkpoint names."""
    swap(name, LinearInProjAttention(attention))
    return {f"{name}.in_proj.{kind}": f"{name}.in_proj_{kind}" for kind in ("weight", "bias")
            if getattr(attention, f"in_proj_{kind}") is not None}


def _cross_attention(block) -> bool:
    """An open_clip ``ResidualAttentionBlock`` built with ``is_cross_attention`` (CoCa's decoder)."""
    return hasattr(block, "ln_1_kv")


def _open_clip_text(item):
    """The token ids of an open_clip calibration item: CLIP's ``(image, text)`` or
    ``{"text": ...}``, or a text tower's own ids (alone, or the one element of a tuple)."""
    if isinstance(item, dict):
        return item.get("text")
    if isinstance(item, (tuple, list)):
        return item[1] if len(item) > 1 else item[0] if item else None
    return item


class T5Adapter(Adapter):
    """HF T5 (``T5Model``, ``T5ForConditionalGeneration``, ``T5EncoderModel``; FLAN-T5 too).

    The stack computes the self-attention position bias in its first block (which owns the
    relative-position embedding) and hands that block's output bias to every later block, the
    decoder likewise for the cross-attention bias; blocks return ``(hidden, bias, cross bias)``.
    """

    OUTPUTS = 3  # (hidden, bias, cross bias)
    CROSS_BIAS = 2

    def passthrough(self, hidden):
        return (hidden,) + (None,) * (self.OUTPUTS - 1)

    def next_kwargs(self, kwargs, output):
        kwargs = dict(kwargs, position_bias=output[1])
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs["encoder_decoder_position_bias"] = output[self.CROSS_BIAS]
        return kwargs


class LongT5Adapter(T5Adapter):
    """HF LongT5 (local and transient-global attention): T5's biases, but its blocks also return
    the attention weights, ``(hidden, bias, weights[, cross bias, cross weights])``."""

    OUTPUTS = 5
    CROSS_BIAS = 3


class SwinAdapter(Adapter):
    """HF Swin / Swin V2: a stack per stage (windowed attention, the stages merged between
    them); a stage unpacks its blocks' ``(hidden, attention weights)``. V2's bias MLP stays in
    full precision."""

    def passthrough(self, hidden):
        return hidden, None

    def linears(self, block):
        # (V2's continuous_position_bias_mlp maps a fixed table of 2-D offsets to the attention bias: a parameter
        # of the attention, 2 inputs wide, not a projection of the hidden states)
        return {name: m for name, m in super().linears(block).items() if "continuous_position_bias_mlp" not in name}


OPEN_CLIP = OpenClipAdapter("open_clip", block_types=("ResidualAttentionBlock", "CustomResidualAttentionBlock"))
CLIP_HF = Adapter("hf-clip", block_types=("CLIPEncoderLayer",))
T5 = T5Adapter("hf-t5", block_types=("T5Block", "MT5Block"))
LONGT5 = LongT5Adapter("hf-longt5", block_types=("LongT5Block",))
SWIN = SwinAdapter("hf-swin", block_types=("SwinLayer", "Swinv2Layer"))
# Decoder-only LMs whose blocks take the hidden states and, as keyword arguments that the walker
# records per block, the attention mask and the rotary (cos, sin): the mask may differ by depth
# (Qwen2, Mistral, Gemma 2/3 alternate full and sliding-window layers; Gemma 3 also the rotary
# table). Each is tested on a tiny random-init model (tests/epmq/test_walker_models.py). Not
# here: mixture-of-experts decoders (moe.py) and GPT-2, whose Conv1D projections GPT2Adapter
# rebuilds.
class DecoderAdapter(Adapter):
    """Decoder-only LMs; ``TUPLE_BLOCKS`` return ``(hidden, attention weights)``, the others the
    hidden states."""

    TUPLE_BLOCKS = ("FalconDecoderLayer", "BloomBlock", "MptBlock", "BambaDecoderLayer", "FalconH1DecoderLayer")
    # Gemma 3n's AltUp maps (the stream-mixing coefficients: correction_coefs 4 -> 4, prediction_coefs 4 -> 16,
    # modality_router hidden -> 4; packed, their codes fill no whole 32-bit word, which no serving engine loads)
    # and its LAuReL low-rank residual stay in full precision, as GPTQModel's Gemma 3n definition leaves them
    # (a loader building only the layers it lists would find packed tensors where it expects weights)
    FULL_PRECISION = {"Gemma3nTextDecoderLayer": ("altup.", "laurel.")}

    def passthrough_of(self, block, hidden):
        return (hidden, None) if type(block).__name__ in self.TUPLE_BLOCKS else hidden

    def linears(self, block):
        kept = self.FULL_PRECISION.get(type(block).__name__, ())
        return {name: m for name, m in super().linears(block).items() if not name.startswith(kept)}


HF_DECODERS = DecoderAdapter("hf-decoder", block_types=(
    "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
    "GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer", "PhiDecoderLayer",
    "Phi3DecoderLayer", "Olmo2DecoderLayer", "GraniteDecoderLayer", "CohereDecoderLayer",
    "StableLmDecoderLayer", "GPTNeoXLayer", "FalconDecoderLayer",
    # and those with the same calling convention (tests/epmq/test_walker_archs.py, WIDER)
    "OlmoDecoderLayer", "Starcoder2DecoderLayer", "Cohere2DecoderLayer", "GPTJBlock",
    "GPTBigCodeBlock", "OPTDecoderLayer", "BloomBlock", "MptBlock",
    # Qwen2-VL's language model (its rotary tables are the multimodal ones: kwargs all the same)
    "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer",
    # more of the same convention (WIDER): SmolLM3, Ministral, Ministral 3, OLMo 3, GLM, GLM-4,
    # EXAONE 4, Helium, Apertus, Arcee, Seed-OSS, ERNIE 4.5, Nemotron, Persimmon, VaultGemma,
    # Diff-Llama, Hunyuan dense, CWM, nanochat, Jais 2
    "SmolLM3DecoderLayer", "MinistralDecoderLayer", "Ministral3DecoderLayer", "Olmo3DecoderLayer",
    "GlmDecoderLayer", "Glm4DecoderLayer", "Exaone4DecoderLayer", "HeliumDecoderLayer", "ApertusDecoderLayer",
    "ArceeDecoderLayer", "SeedOssDecoderLayer", "Ernie4_5DecoderLayer", "NemotronDecoderLayer",
    "PersimmonDecoderLayer", "VaultGemmaDecoderLayer", "DiffLlamaDecoderLayer", "HunYuanDenseV1DecoderLayer",
    "CwmDecoderLayer", "NanoChatDecoderLayer", "Jais2DecoderLayer",
    # hybrids whose convolution or state-space layers hold their projections in nn.Linear (their
    # convolution kernels and SSM parameters stay in full precision): LFM2, Falcon-H1, Bamba
    "Lfm2DecoderLayer", "FalconH1DecoderLayer", "BambaDecoderLayer",
    # Qwen3-VL's language model: image features added to the hidden states after its first
    # layers (DeepStack), so each layer's input is taken from the model (the walker's replay)
    "Qwen3VLTextDecoderLayer",
    # HyperCLOVAX (HyperCLOVAX-Vision's language model, beside its Qwen2.5-VL vision tower, which a
    # default walk took alone: AUTO, which walks the model alone, is no default beside another adapter)
    "HyperCLOVAXDecoderLayer",
    # Granite 4 Vision's Granite language model (its projectors' features added to the image tokens'
    # hidden states before some layers, DeepStack as Qwen3-VL's), beside its CLIP tower and Q-Formers,
    # which a default walk took alone
    "Granite4VisionTextDecoderLayer",
    # Emu3's language model, over text and image tokens (AUTO, which a default walk was, took its VQ-VAE's
    # attention lists too, and its decoder's, run only to draw generated images, no forward reaches)
    "Emu3DecoderLayer",
    # Gemma 3n's language model: hidden states of 4 AltUp streams ([4, batch, tokens, width]), a per-layer input
    # (positional), the last layers attending to the keys and values of earlier ones (shared_kv_states, which
    # those layers' own runs in the walk fill); beside its audio tower, which AUTO, a default walk, took too and
    # then refused, text calibration never reaching it
    "Gemma3nTextDecoderLayer",
))
# timm's vision transformers (ViT, DeiT, SigLIP, EVA-02, ...): alone, or the image tower (``trunk``)
# of an open_clip model built on timm (ViT-*-SigLIP*, EVA02-*, PE-Core-*). EVA's blocks take the
# rotary table as a keyword argument. Qualified names: ``Block`` alone is too common a name.
class TimmAdapter(Adapter):
    """timm's vision transformers. EVA's attention with a q/v bias adds it in ``F.linear`` on
    ``qkv.weight``, never calling the layer (no walk would see its inputs, and a packed one would be
    dequantized whole at each read): it is switched to timm's own
    equivalent form, ``qkv(x) + bias`` (``qkv_bias_separate``), which calls the linear."""

    def prepare(self, model, swap):
        separate_qv_bias(self, model)
        return {}

    def linears(self, block):
        # (the relative-position ViTs' rel_pos.mlp maps a fixed table of 2-D offsets to the attention bias, as Swin
        # V2's continuous_position_bias_mlp does: 2 inputs wide, a width no serving engine's packing takes)
        return {name: m for name, m in super().linears(block).items() if ".rel_pos.mlp." not in f".{name}"}


def separate_qv_bias(adapter: Adapter, model: nn.Module) -> None:
    """timm's EVA attention with a q/v bias in ``adapter``'s blocks switched to ``qkv(x) + bias``."""
    for _, module in adapter.block_modules(model):
        if (getattr(module, "q_bias", None) is not None and getattr(module, "qkv", None) is not None
                and hasattr(module, "qkv_bias_separate")):
            module.qkv_bias_separate = True


TIMM = TimmAdapter("timm", block_types=tuple(
    f"timm.models.vision_transformer.{name}"
    for name in ("Block", "ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock", "DiffParallelScalingBlock"))
    + ("timm.models.eva.EvaBlock", "timm.models.eva.EvaBlockPostNorm",
       # FastViT's attention stages (FastVLM's tower, MobileCLIP's image towers): blocks on [B, C, H, W]
       # feature maps whose attention's qkv and proj are its linears (its MLP, 1 x 1 convolutions, and
       # the RepMixer stages before them stay in full precision)
       "timm.models.fastvit.AttentionBlock",
       # ConvNeXt's stages (open_clip's convnext_* image towers): blocks on [B, C, H, W] feature maps whose
       # MLP's fc1 and fc2 are its linears, on channels last (the depthwise convolution stays in full
       # precision; conv_mlp's 1 x 1 convolutions hold no linear)
       "timm.models.convnext.ConvNeXtBlock",
       # Swin's stages (open_clip's swin_base_patch4_window7_224): windowed attention blocks on [B, H, W, C]
       # patch grids (the patch merging that opens a stage stays in full precision)
       "timm.models.swin_transformer.SwinTransformerBlock",
       # the relative-position ViTs (vit_relpos_*, vit_srelpos_*), their bias MLPs in full precision (linears)
       "timm.models.vision_transformer_relpos.RelPosBlock",
       "timm.models.vision_transformer_relpos.ResPostRelPosBlock"))
class EncoderAdapter(Adapter):
    """HF encoders. SAM's ViT is taken beside other towers (DeepSeek-VL hybrid's high-resolution
    tower), not in SAM's own model, which AUTO walks whole: its mask decoder's two-way blocks (the
    prompt tokens and the image's, two streams) no adapter lists, and a default walk taking the ViT
    here would leave them in full precision. M2M-100's encoder likewise: taken as a text tower
    (NLLB-CLIP's), not beside its own decoder, which AUTO walks with it. ``TUPLE_BLOCKS`` return
    ``(hidden, ...)``, whose encoder takes ``[0]`` of what a stand-in returns."""

    TUPLE_BLOCKS = ("Llama4VisionEncoderLayer",)

    def passthrough_of(self, block, hidden):
        return (hidden,) if type(block).__name__ in self.TUPLE_BLOCKS else hidden

    def stacks(self, model):
        stacks = super().stacks(model)
        for whole, taken in (("SamTwoWayAttentionBlock", "SamVisionLayer"),
                             ("M2M100DecoderLayer", "M2M100EncoderLayer")):
            if any(type(m).__name__ == whole for m in model.modules()):
                stacks = [(name, blocks) for name, blocks in stacks if type(blocks[0]).__name__ != taken]
        return stacks


# Encoders whose layers take the hidden states and the attention mask (text) or nothing else
# (images): BERT-style text encoders (GLUE experts) and ViT-style image encoders.
HF_ENCODERS = EncoderAdapter("hf-encoder", block_types=(
    "BertLayer", "RobertaLayer", "ViTLayer", "Dinov2Layer", "SiglipEncoderLayer",
    "XLMRobertaLayer", "ElectraLayer", "ModernBertEncoderLayer", "DeiTLayer", "BeitLayer",
    "Siglip2EncoderLayer",
    # Qwen2-VL's vision tower: the patches of every image in one [tokens, width] sequence, with
    # their boundaries (cu_seqlens) and rotary tables as kwargs
    "Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock",
    # EXAONE 4.5's vision tower: Qwen2.5-VL's windowed blocks, its attention's q, k and v in one qkv
    # of fewer key/value heads
    "Exaone4_5_VisionBlock",
    # the vision towers of Idefics3, SmolVLM, InternVL and Mistral 3 (Pixtral)
    # (tests/epmq/test_walker_towers.py)
    "Idefics3EncoderLayer", "SmolVLMEncoderLayer", "InternVLVisionLayer", "PixtralAttentionLayer",
    "Qwen3VLVisionBlock",
    # BLIP-2's and InstructBLIP's vision towers and Q-Formers (the query tokens' layers, which take the
    # vision tower's output as encoder_hidden_states, every cross_attention_frequency-th with a
    # cross-attention), Idefics2's vision tower and perceiver resampler (latents attending to the
    # tower's output, its context)
    "Blip2EncoderLayer", "Blip2QFormerLayer", "InstructBlipEncoderLayer", "InstructBlipQFormerLayer",
    "Idefics2EncoderLayer", "Idefics2PerceiverLayer",
    # InstructBLIP-Video's (InstructBLIP's, on each frame), Janus's SigLIP and Qianfan-OCR's InternViT
    "InstructBlipVideoEncoderLayer", "InstructBlipVideoQFormerLayer", "JanusVisionEncoderLayer",
    "QianfanOCRVisionLayer",
    # GOT-OCR 2's (and PP-Chart2Table's) SAM-style ViT, LLaVA-OneVision-1.5's Qwen2-VL-style tower,
    # Ovis 2's visual tokenizer's ViT
    "GotOcr2VisionLayer", "LlavaOnevision15VisionBlock", "Ovis2VisionEncoderLayer",
    # packed patches of every image in one sequence with their boundaries (cu_seqlens) and rotary
    # tables, as Qwen2-VL's: VideoLLaMA 3's, Ovis 2.5's and Kimi K2.5's towers
    "VideoLlama3VisionEncoderLayer", "Ovis2_5VisionEncoderLayer", "Kimi_K25VisionEncoderLayer",
    # Florence-2's DaViT stages: a list of blocks per stage, on [B, C, H, W] feature maps (a
    # convolution between stages), each block a windowed spatial and a channel attention
    "Florence2VisionBlock",
    # SAM's ViT (DeepSeek-VL hybrid's high-resolution tower): blocks on [B, H, W, C] patch grids, most
    # attending within windows; their relative position tables stay in full precision
    "SamVisionLayer",
    # LeViT's stages: residual layers, and in the first stages a subsampling attention after them
    # (a block of the stage's list that maps its hidden states to the next stage's fewer, wider
    # ones; AUTO, which takes *Layer and *Block lists, left those stages in full precision)
    "LevitResidualLayer", "LevitAttentionSubsample",
    # Fun-ASR-Nano's SAN-M audio encoder (its first layer on the stacked frames, no residual; the FSMN's
    # depthwise convolution stays in full precision) and its projector's adaptor layers, the same class
    "FunAsrNanoEncoderLayer",
    # Qwen3-ASR's Whisper-style audio encoder: the frames of every window in one [tokens, width]
    # sequence with their boundaries (cu_seqlens), as Qwen2-VL's patches
    "Qwen3ASRAudioEncoderLayer",
    # GLM-ASR's Whisper-style audio encoder, its attention rotary (its tables a kwarg, as Qwen2-VL's)
    "GlmAsrEncoderLayer",
    # Omnilingual ASR's wav2vec 2-style encoder (pre-norm layers on the waveform's convolutional frames)
    "OmniASREncoderLayer",
    # Llama 4's vision encoder (2-D rotary tables as a kwarg; its layers return a 1-tuple), beside its MoE
    # language model, which a default walk took alone
    "Llama4VisionEncoderLayer",
    # Wav2Vec2's encoder (base and large: do_stable_layer_norm), alone or beside a SpeechEncoderDecoder's
    # decoder, which a default walk took alone (AUTO walked the encoder only where no adapter knew a block)
    "Wav2Vec2EncoderLayer", "Wav2Vec2EncoderLayerStableLayerNorm",
    # and the encoders of its convention (the hidden states and the mask; base and large) a SpeechEncoderDecoder
    # holds as well, whose default walk took the decoder alone: HuBERT, UniSpeech, UniSpeech-SAT, Data2Vec-Audio,
    # SEW (its layers between the squeezing and the upsampling) and SEW-D (its relative positions a kwarg)
    "HubertEncoderLayer", "HubertEncoderLayerStableLayerNorm", "UniSpeechEncoderLayer",
    "UniSpeechEncoderLayerStableLayerNorm", "UniSpeechSatEncoderLayer", "UniSpeechSatEncoderLayerStableLayerNorm",
    "Data2VecAudioEncoderLayer", "SEWEncoderLayer", "SEWDLayer",
    # Wav2Vec2-Conformer's and Wav2Vec2-BERT's Conformer layers (their relative or rotary position tables a kwarg,
    # the same at every depth; the convolution module's depthwise convolution stays in full precision), and
    # Wav2Vec2-BERT's adapter layers after them (each pooling the frames by its stride, as LeViT's subsampling)
    "Wav2Vec2ConformerEncoderLayer", "Wav2Vec2BertEncoderLayer", "Wav2Vec2BertAdapterLayer",
    # NLLB's (M2M-100's) encoder as open_clip's NLLB-CLIP text tower, beside its image tower, which a default
    # walk took alone
    "M2M100EncoderLayer",
))


class WavLMAdapter(EncoderAdapter):
    """HF WavLM's encoder (base and large): its first layer computes the relative position bias (its
    attention alone holds the buckets' table) and every layer returns ``(hidden, bias)``, the next
    taking that bias (a later layer called without it has no table to compute one from)."""

    def passthrough_of(self, block, hidden):
        return hidden, None

    def next_kwargs(self, kwargs, output):
        return dict(kwargs, position_bias=output[1])


# WavLM's encoder, alone or beside a SpeechEncoderDecoder's decoder, which a default walk took alone (AUTO
# walked it only where no adapter knew a block); its attention is made to call its projections (prepare_towers)
WAVLM = WavLMAdapter("hf-wavlm", block_types=("WavLMEncoderLayer", "WavLMEncoderLayerStableLayerNorm"))
# Granite Speech's and Granite Speech Plus's Conformer blocks (their convolution module's 1 x 1 and depthwise
# convolutions stay in full precision; the CTC self-conditioning added to the middle block's output is
# replayed between blocks). A family of their own: Plus's encoder hands its projector's Q-Former (HF_ENCODERS)
# inner blocks' outputs beside its last (cat_hidden_layers), which the walk replaying the Conformer's last
# output to a later stack of its family would not give it; another family's quantized blocks run instead.
CONFORMERS = EncoderAdapter("hf-conformer", block_types=(
    "GraniteSpeechConformerBlock", "GraniteSpeechPlusConformerBlock",
    # Granite Speech 5's (its CTC model's), the first blocks pooling the frames by 2 (AUTO refused blocks that
    # change their input's shape), the CTC self-conditioning after the middle block replayed as Granite Speech's
    "GraniteSpeech5EncoderBlock", "GraniteSpeech5EncoderSubsamplingBlock",
))


class DebertaV2Adapter(Adapter):
    """DeBERTa-v2: its encoder unpacks each layer's output into (hidden states, attention)."""

    def passthrough(self, hidden):
        return hidden, None


DEBERTA_V2 = DebertaV2Adapter("hf-deberta-v2", block_types=("DebertaV2Layer",))
# BART: an encoder stack, then a decoder stack whose layers take the encoder's output and mask
# (recorded per block like any keyword argument, after the encoder is quantized).
BART = Adapter("hf-bart", block_types=(
    "BartEncoderLayer", "BartDecoderLayer", "MBartEncoderLayer", "MBartDecoderLayer",
    "PegasusEncoderLayer", "PegasusDecoderLayer", "WhisperEncoderLayer", "WhisperDecoderLayer",
    # T5Gemma 2's text encoder and decoder (beside its SigLIP tower, which a default walk took alone):
    # the decoder's merged attention applies its k_proj and v_proj to its own hidden states and to the
    # encoder's output, both calls in their statistics
    "T5Gemma2EncoderLayer", "T5Gemma2DecoderLayer",
    # Whisper-style audio encoders beside a language model (which a default walk took alone):
    # Qwen2-Audio's, Voxtral's and MOSS-Transcribe-Diarize's, Audio Flamingo 3's (Music Flamingo's too)
    "Qwen2AudioEncoderLayer", "VoxtralEncoderLayer", "MossTranscribeDiarizeAudioLayer", "AudioFlamingo3EncoderLayer",
))


class GPT2Adapter(Adapter):
    """HF GPT-2: its blocks' projections are ``Conv1D`` (``y = x W + b`` with ``W [in, out]``),
    rebuilt as ``nn.Linear`` with the transposed weight; checkpoints keep the ``Conv1D`` layout."""

    def prepare(self, model, swap):
        return swap_conv1d(self, model, swap)


def swap_conv1d(adapter: Adapter, model: nn.Module, swap) -> dict:
    """transformers' ``Conv1D``s inside ``adapter``'s blocks rebuilt as ``nn.Linear``."""
    renames = {}
    for name, module in list(adapter.block_modules(model)):
        if type(module).__name__ == "Conv1D":
            swap(name, _linear_of_conv1d(module))
            renames[f"{name}.weight"] = Transposed(f"{name}.weight")
    return renames


def _linear_of_conv1d(conv) -> nn.Linear:
    d_in, d_out = conv.weight.shape
    linear = nn.Linear(d_in, d_out, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear.train(conv.training)


GPT2 = GPT2Adapter("hf-gpt2", block_types=("GPT2Block",))
