"""Models with more than one tower (vision-language models, encoder-decoders of two families):
the walk, what it leaves behind, and their checkpoints."""

import pytest
import torch
import transformers

import epmq

SPEC_4 = epmq.QuantSpec(bits=4, group_size=16)


def tiny_llava(seed=0):
    """LLaVA: a CLIP vision tower, a projector and a Llama language model."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=299,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval()


def llava_inputs(n, gen):
    out = []
    for _ in range(n):
        ids = torch.randint(0, 290, (1, 12), generator=gen)
        ids[0, 1:5] = 299  # the image's 4 patches, (16 / 8)^2
        out.append(dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=gen)))
    return out


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_hidden_states_after_a_walk_that_was_the_models_first_forward(method, gen):
    """transformers 5 hooks the modules whose outputs output_hidden_states collects on a model's
    first forward, once: a walk that is that forward (blocks replaced by stand-ins) must not
    leave the model without them (hidden_states came back empty; LLaVA, which takes its image
    features from them, failed)."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    vision = transformers.CLIPVisionModel(config).eval()
    pixels = [torch.randn(1, 3, 16, 16, generator=gen) for _ in range(2)]

    class Features(torch.nn.Module):  # a caller that takes a hidden layer, as LLaVA does
        def __init__(self, tower):
            super().__init__()
            self.tower = tower

        def forward(self, pixel_values):
            return self.tower(pixel_values, output_hidden_states=True).hidden_states[-2]

    experts = {"a": {k: v + 0.01 * torch.randn_like(v) for k, v in Features(vision).state_dict().items()}}
    epmq.quantize_model(Features(vision), SPEC_4, method=method, calibration={"a": pixels},
                        experts=experts if method == "epmq" else None, progress=False)
    with torch.no_grad():
        assert len(vision(pixels[0], output_hidden_states=True).hidden_states) == config.num_hidden_layers + 1

    model = tiny_llava()
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration={"a": llava_inputs(2, gen)}, progress=False,
                        adapter=epmq.adapters.CLIP_HF)
    with torch.no_grad():
        assert torch.isfinite(model(**llava_inputs(1, gen)[0]).logits).all()
