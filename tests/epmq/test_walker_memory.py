"""Experts read from checkpoints are never all in memory: the walk holds one block of one
expert at a time, not K models.

Every tensor that leaves an expert checkpoint goes through ``epmq.checkpoint_io._read_tensor``
(``CheckpointReader.get``); the test wraps it to track, with ``weakref.finalize`` on each
tensor's storage (which outlives the tensor object when the walker moves it into a module with
``param.data = tensor``), how many bytes of expert tensors are alive at any moment, and compares
the peak to the size of one block and of the whole model.
"""

import weakref

import pytest
import torch
import transformers

import epmq
import epmq.checkpoint_io
from test_walker_models import inputs, perturb

K = 3


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture
def tracked(monkeypatch):
    state = {"alive": 0, "peak": 0, "read": 0}
    original = epmq.checkpoint_io._read_tensor

    def read(store, key):
        tensor = original(store, key)
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        state["alive"] += size
        state["read"] += size
        state["peak"] = max(state["peak"], state["alive"])
        weakref.finalize(storage, lambda: state.__setitem__("alive", state["alive"] - size))
        return tensor

    monkeypatch.setattr(epmq.checkpoint_io, "_read_tensor", read)
    return state


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_peak_expert_memory_is_one_block_not_k_models(targets, tracked, gen, tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    tasks = [f"task{k}" for k in range(K)]
    experts = {}
    for task in tasks:
        perturb(base, gen).save_pretrained(tmp_path / task)
        experts[task] = str(tmp_path / task)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    calibration = {t: inputs("llama", 2, gen) for t in tasks}

    model_bytes = _nbytes(model.state_dict().values())
    block = model.model.layers[0]
    block_bytes = _nbytes(block.state_dict().values())
    block_linear_bytes = _nbytes(m.weight for m in block.modules() if isinstance(m, torch.nn.Linear))
    outside_bytes = model_bytes - len(model.model.layers) * block_bytes

    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets=targets,
                        calibration=calibration, experts=experts, backend="torch", progress=False)

    assert tracked["alive"] == 0  # nothing kept after the walk
    if targets == "merged_path":
        # only the linear weights are read, each once, one group of one expert at a time
        assert tracked["read"] == K * len(model.model.layers) * block_linear_bytes
        assert tracked["peak"] <= block_linear_bytes
    else:
        # one expert's own block, plus its non-block tensors while its stream enters the stack
        assert tracked["peak"] <= outside_bytes + block_bytes
    assert tracked["peak"] < model_bytes < K * model_bytes
