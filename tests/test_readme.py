"""The README's "Using it" examples run as written, on a tiny HF CLIP vision model whose experts
are written to the checkpoint paths the example names."""

import re
from pathlib import Path

import torch
import transformers

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_example() -> str:
    """The python blocks of the "Using it" section (merging, then quantizing), in order."""
    text = README.read_text()
    section = text[text.index("## Using it"):]
    section = section[:section.index("\n## ", 1)]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def tiny_clip(seed):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.CLIPVisionModel(config).eval()


def test_usage_example_runs(tmp_path, monkeypatch, gen):
    monkeypatch.chdir(tmp_path)
    base = tiny_clip(0)
    experts = []
    for task in ("cars", "dtd"):
        expert = tiny_clip(0)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen) * p.abs().mean())
        expert.save_pretrained(f"ckpt/clip-{task}")
        experts.append(expert.state_dict())
    batches = lambda: [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]  # noqa: E731
    namespace = dict(base_sd=base.state_dict(), expert_sd_1=experts[0], expert_sd_2=experts[1],
                     model=tiny_clip(1), cars_batches=batches(), dtd_batches=batches())
    quantized = namespace["model"]
    exec(compile(usage_example(), str(README), "exec"), namespace)

    loaded = namespace["model"]
    assert loaded is not quantized and type(loaded) is transformers.CLIPVisionModel
    assert Path("report.json").is_file() and Path("out/clip-w4/model.safetensors").is_file()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state,
                                   quantized(pixel_values=x).last_hidden_state)
