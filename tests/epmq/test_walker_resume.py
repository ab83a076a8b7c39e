"""An interrupted walk resumes from its ``resume_dir`` (``epmq.resume``): the blocks done are
loaded, not solved, and the result is bit-identical to a walk that was never interrupted; a
directory written by another walk (arguments, data or weights) is refused, by name."""

import copy
import json
import os
import re

import pytest
import torch

import epmq
from epmq import walker
from test_walker_models import VOCAB, Family, output

SPEC = epmq.QuantSpec(bits=4, group_size=16)


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, n):
    """The walk raises as it starts its ``n``-th block (0-based)."""
    quantize_block = walker._Walk._quantize_block
    seen = []

    def fn(self, s, i, block):
        seen.append((s, i))
        if len(seen) == n + 1:
            raise Interrupt
        return quantize_block(self, s, i, block)

    monkeypatch.setattr(walker._Walk, "_quantize_block", fn)


def run(fam, model, method, targets, **kw):
    return epmq.quantize_model(
        model, SPEC, method=method, targets=targets, calibration=fam.calibration,
        experts=fam.experts if method == "epmq" else None, progress=False, **kw)


def _without_time(layers):
    return [{k: v for k, v in layer.items() if k != "seconds"} for layer in layers]


CASES = [
    ("llama", "gptq", "merged_path", 1, None, None),
    ("llama", "epmq", "merged_path", 1, "cpu", None),   # (device: the offloaded walk)
    ("llama", "epmq", "expert_path", 1, None, None),
    ("t5", "epmq", "fp_path", 3, None, None),            # stopped in the decoder: the encoder is loaded
    ("qwen3_moe", "epmq", "merged_path", 1, None, None),
    ("gpt2", "gptq", "fp_path", 1, None, None),
    # AUTO: what T5's first decoder block hands on taken again from the loaded one's output
    ("t5", "epmq", "fp_path", 3, None, epmq.adapters.AUTO),
]


@pytest.mark.parametrize("arch,method,targets,stop,device,adapter", CASES)
def test_resumed_walk_equals_uninterrupted(arch, method, targets, stop, device, adapter, gen, tmp_path,
                                           monkeypatch):
    fam = Family(arch, gen)
    reference = run(fam, fam.merged(), method, targets, adapter=adapter)
    model = fam.merged()
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(Interrupt):
            run(fam, model, method, targets, device=device, resume_dir=tmp_path, adapter=adapter)
    done = sorted(p.stem for p in tmp_path.glob("*.json") if p.name != "walk.json")
    assert len(done) == stop
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())  # rolled back

    solved = []
    solve = walker._Walk._solve_group
    monkeypatch.setattr(walker._Walk, "_solve_group",
                        lambda self, stack, block, t, prefix, *a, **k:
                        solved.append(prefix) or solve(self, stack, block, t, prefix, *a, **k))
    out = run(fam, model, method, targets, device=device, resume_dir=tmp_path, adapter=adapter)
    assert sorted(out.epmq_report.resumed) == done
    assert solved and all(isinstance(p, str) for p in solved) and not set(solved) & set(done)
    ref_state, state = reference.state_dict(), out.state_dict()
    assert ref_state.keys() == state.keys()
    assert [k for k in state if not torch.equal(state[k], ref_state[k])] == []
    assert _without_time(out.epmq_report.layers) == _without_time(reference.epmq_report.layers)
    assert out.epmq_report.unreached == reference.epmq_report.unreached
    with torch.no_grad():  # the loaded layers run like the solved ones
        item = fam.test_item
        y, y_ref = (m(**item) if isinstance(item, dict) else m(item) for m in (out, reference))
    y, y_ref = (v if isinstance(v, torch.Tensor) else v[0] for v in (y, y_ref))
    assert torch.equal(y, y_ref)


def test_a_resumed_rwkv_walk_keeps_the_division_of_the_layers_it_loads(gen, tmp_path, monkeypatch):
    """RWKV (rescale_every > 0) divides block i's output and value weights by 2 ** i for inference: the
    walk packs them undivided, the division their weight_multiplier, which is not in a layer's state dict.
    A block loaded from resume_dir takes it too: the resumed walk computes what an uninterrupted one does."""
    from test_walker_models import _hf, output, wider_input

    def rwkv():
        torch.manual_seed(0)
        return _hf("RwkvForCausalLM", "RwkvConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                   attention_hidden_size=32, intermediate_size=64, context_length=64, rescale_every=1)().eval()

    calibration, item = {"a": [wider_input("ids", gen)]}, wider_input("ids", gen)
    kw = dict(method="gptq", calibration=calibration, backend="torch", progress=False)
    want = output(epmq.quantize_model(rwkv(), SPEC, **kw), item)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)  # (blocks 0 and 1 done, block 1's divided by 2)
        with pytest.raises(Interrupt):
            epmq.quantize_model(rwkv(), SPEC, resume_dir=tmp_path, **kw)
    model = epmq.quantize_model(rwkv(), SPEC, resume_dir=tmp_path, **kw)
    assert sorted(model.epmq_report.resumed) == ["rwkv.blocks.0", "rwkv.blocks.1"]
    assert model.rwkv.blocks[1].attention.output.weight_multiplier == 0.5
    torch.testing.assert_close(output(model, item), want, rtol=0, atol=0)


def _interrupted(fam, tmp_path, monkeypatch, **kw):
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path, **kw)


@pytest.mark.parametrize("change,message", [
    (dict(anchor=0.5), "anchor"),
    (dict(spec=epmq.QuantSpec(bits=3, group_size=16)), "spec"),
    (dict(layers=r"mlp"), "blocks"),
    (dict(calibration="other"), "calibration"),
])
def test_other_arguments_are_refused(change, message, gen, tmp_path, monkeypatch):
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    calibration = fam.calibration
    if change.pop("calibration", None):
        calibration = {t: [x.flip(-1) for x in items] for t, items in calibration.items()}
    spec = change.pop("spec", SPEC)
    with pytest.raises(ValueError, match=f"another walk.*{message}"):
        epmq.quantize_model(fam.merged(), spec, method="epmq", calibration=calibration,
                            experts=fam.experts, resume_dir=tmp_path, progress=False, **change)


@pytest.mark.parametrize("then, now", [("ieee", "bf16"), ("bf16", "none")])
def test_a_walk_resumed_under_another_float32_precision_is_refused(then, now, gen, tmp_path, monkeypatch):
    """The blocks' forward (the inputs every later block is solved from) runs under the precision a
    user set for torch's float32 products (TF32 on a GPU, ``torch.set_float32_matmul_precision``; on
    a CPU, oneDNN's bf16), which the walk's identity did not record: a walk stopped under one and
    resumed under another took the first's blocks beside the second's in silence, the result that
    of neither. It is refused, naming the setting; torch's defaults are recorded as nothing, so a
    directory written before it was recorded resumes."""
    fam = Family("llama", gen)
    matmul = torch.backends.mkldnn.matmul
    with monkeypatch.context() as m:
        m.setattr(matmul, "fp32_precision", then)
        _interrupted(fam, tmp_path, monkeypatch)
    monkeypatch.setattr(matmul, "fp32_precision", now)
    with pytest.raises(ValueError, match="another walk.*precision.*mkldnn.matmul.fp32_precision.*bf16"):
        run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    monkeypatch.setattr(matmul, "fp32_precision", then)
    assert run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path).epmq_report.resumed


def test_the_float32_precision_recorded_is_the_walk_device_s(monkeypatch):
    """On a GPU, TF32 (``torch.set_float32_matmul_precision("high")``, cuDNN's) and reduced-precision
    reductions; on a CPU, oneDNN's; torch's defaults recorded as nothing."""
    assert walker._float_precision(torch.device("cuda")) == walker._float_precision(torch.device("cpu")) == {}
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        assert walker._float_precision(torch.device("cuda")) == {"float32_matmul_precision": "high",
                                                                 "cudnn.allow_tf32": False}
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_walk_resumed_with_another_thread_count_is_refused(gen, tmp_path, monkeypatch):
    """On a CPU, torch's thread count changes the walk's float arithmetic bit for bit (1 and 2
    threads factor one 4096-wide Hessian differently, and GPTQ's scales with it), which the walk's
    identity did not record: a walk stopped under one and resumed under another took the first's
    blocks beside the second's in silence, the model that of neither. It is refused, naming the
    count and how to set it."""
    fam = Family("llama", gen)
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 2)
        _interrupted(fam, tmp_path, monkeypatch)
    assert torch.get_num_threads() == 1  # (the tests' own: conftest)
    with pytest.raises(ValueError, match=r"another walk \(machine\.threads: 2 then, 1 now\).*torch\.set_num_threads"):
        run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path).epmq_report.resumed


def test_the_machine_recorded_is_the_walk_device_s(monkeypatch):
    """On a CPU torch's threads and ATen's instruction set; on a GPU its model and SM count."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H100 PCIe", multi_processor_count=114))
    assert walker._machine(torch.device("cuda")) == {"gpu": "NVIDIA H100 PCIe", "sms": 114}
    assert walker._machine(torch.device("cpu")) == {"threads": torch.get_num_threads(),
                                                    "capability": torch.backends.cpu.get_cpu_capability()}


@pytest.mark.parametrize("then, message", [
    ({"gpu": "NVIDIA H100 80GB HBM3", "sms": 132}, r"machine\.gpu: 'NVIDIA H100 80GB HBM3' then, 'NVIDIA H100 PCIe' "
                                                   r"now; machine\.sms: 132 then, 114 now\).*on another model"),
    (None, r"machine: None then, .*did not record the hardware"),
])
def test_blocks_done_on_another_gpu_or_unrecorded_hardware_are_refused(then, message, tmp_path):
    from epmq.resume import BlockLog

    identity = {"method": "gptq"}
    log = BlockLog(tmp_path, identity if then is None else dict(identity, machine=then))
    log.save("layers.0", "digest", {})
    log.close()
    with pytest.raises(ValueError, match=f"another walk \\({message}"):
        BlockLog(tmp_path, dict(identity, machine={"gpu": "NVIDIA H100 PCIe", "sms": 114}))


@pytest.fixture
def sdp_flags():
    """torch's scaled_dot_product_attention settings, restored after the test (they are global)."""
    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
              cuda.cudnn_sdp_enabled(), cuda.fp16_bf16_reduction_math_sdp_allowed())
    yield cuda
    for set_, value in zip((cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_math_sdp,
                            cuda.enable_cudnn_sdp, cuda.allow_fp16_bf16_reduction_math_sdp), before):
        set_(value)


def test_a_walk_resumed_under_other_attention_kernels_is_refused(gen, tmp_path, monkeypatch, sdp_flags):
    """Which kernels scaled_dot_product_attention may choose (torch.backends.cuda.enable_flash_sdp and
    the others; on a CPU flash and math too) and whether its math kernel reduces fp16/bf16 in their
    precision change the blocks' attention outputs, every later block's inputs; the walk's identity
    left them out, so a walk stopped under one and resumed under another took the first's blocks in
    silence. They are recorded as TF32 is, torch's defaults as nothing."""
    fam = Family("llama", gen)
    sdp_flags.enable_flash_sdp(False)
    _interrupted(fam, tmp_path, monkeypatch)
    sdp_flags.enable_flash_sdp(True)
    with pytest.raises(ValueError, match="another walk.*precision.*sdp.flash: False then, torch's default now"):
        run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)


def test_the_attention_kernels_recorded_are_the_walk_device_s(sdp_flags):
    assert walker._float_precision(torch.device("cuda")) == walker._float_precision(torch.device("cpu")) == {}
    sdp_flags.enable_flash_sdp(False)
    sdp_flags.enable_mem_efficient_sdp(False)
    sdp_flags.enable_cudnn_sdp(False)
    sdp_flags.allow_fp16_bf16_reduction_math_sdp(True)
    assert walker._float_precision(torch.device("cuda")) == {
        "sdp.flash": False, "sdp.mem_efficient": False, "sdp.cudnn": False, "sdp.fp16_bf16_reduction_math": True}
    # (a CPU has flash and math kernels only)
    assert walker._float_precision(torch.device("cpu")) == {"sdp.flash": False, "sdp.fp16_bf16_reduction_math": True}


def test_a_directory_of_other_statistics_rules_is_refused(gen, tmp_path, monkeypatch):
    """The package version does not move with each commit: what the statistics count is named."""
    fam = Family("llama", gen)
    with monkeypatch.context() as m:
        m.setattr(walker, "STATISTICS_RULES", "padding counted")
        _interrupted(fam, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="another walk.*statistics"):
        epmq.quantize_model(fam.merged(), SPEC, method="epmq", calibration=fam.calibration,
                            experts=fam.experts, resume_dir=tmp_path, progress=False)


@pytest.mark.parametrize("patch", ["versions", "statistics"])
def test_a_directory_of_other_code_says_so(patch, gen, tmp_path, monkeypatch):
    """A directory an interrupted walk wrote before torch (or transformers, epmq) was upgraded, or
    before epmq changed what its statistics count, was refused with 'resume with the same
    arguments', which the caller gave; the error says the code differs and what to do."""
    fam = Family("llama", gen)
    with monkeypatch.context() as m:
        if patch == "versions":
            versions = walker._versions()
            m.setattr(walker, "_versions", lambda: dict(versions, torch="2.0.0"))
        else:
            m.setattr(walker, "STATISTICS_RULES", "padding counted")
        _interrupted(fam, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=f"another walk .*{patch}.*other code") as refused:
        epmq.quantize_model(fam.merged(), SPEC, method="epmq", calibration=fam.calibration,
                            experts=fam.experts, resume_dir=tmp_path, progress=False)
    assert "same arguments" not in str(refused.value) and "use an empty directory" in str(refused.value)


@pytest.mark.parametrize("which", ["merged", "expert"])
def test_other_weights_are_refused(which, gen, tmp_path, monkeypatch):
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    model, experts = fam.merged(), dict(fam.experts)
    name = "model.layers.0.mlp.down_proj.weight"
    if which == "merged":
        with torch.no_grad():
            model.get_parameter(name).mul_(1.01)
    else:
        task = next(iter(experts))
        experts[task] = {k: v * 1.01 if k == name else v for k, v in experts[task].state_dict().items()}
    with pytest.raises(ValueError, match="model.layers.0 was quantized from other weights"):
        epmq.quantize_model(model, SPEC, method="epmq", calibration=fam.calibration,
                            experts=experts, resume_dir=tmp_path, progress=False)


@pytest.mark.parametrize("change", ["config", "module", "outside", "buffer", "attention", "scaling", "rotary"])
def test_another_configuration_of_the_same_weights_is_refused(change, gen, tmp_path, monkeypatch):
    """Same tensors, other computation: the config (rope_theta), a module's attribute outside
    any config (an RMSNorm's eps, in a block or outside the blocks), a non-persistent buffer (the
    rotary inv_freq), the attention implementation (which the config's to_dict leaves out)."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    model = fam.merged()
    if change == "config":
        model.config.rope_theta = 500.0
    elif change == "module":
        model.model.layers[0].input_layernorm.variance_epsilon = 0.1
    elif change == "outside":
        model.model.norm.variance_epsilon = 0.1
    elif change == "buffer":
        model.model.rotary_emb.inv_freq.mul_(0.5)
    elif change == "scaling":  # (plain attributes, which neither repr nor the config show)
        model.model.layers[0].self_attn.scaling *= 2
    elif change == "rotary":
        model.model.rotary_emb.attention_scaling = 0.5
    else:
        model.set_attn_implementation("eager" if model.config._attn_implementation != "eager" else "sdpa")
    # (of the config, the entry that differs: its whole repr was cut at 120 characters)
    match = {"config": r"config\.rope_theta: None then, 500.0 now", "module": "modules:", "outside": "modules:",
             "buffer": "buffers:", "attention": "_attn_implementation", "scaling": "modules:",
             "rotary": "modules:"}[change]
    with pytest.raises(ValueError, match=f"another walk.*{match}"):
        epmq.quantize_model(model, SPEC, method="epmq", calibration=fam.calibration,
                            experts=fam.experts, resume_dir=tmp_path, progress=False)


@pytest.mark.parametrize("change,message", [
    ("embeddings", r"outside: the model's tensors outside the blocks \(embeddings, final norm, head\)"),
    ("dtype", r"outside: the model's tensors outside the blocks .*in values or dtype"),
    ("data", r"calibration: the calibration data"),
])
def test_a_digest_that_differs_is_said_as_what_it_is_of(change, message, gen, tmp_path, monkeypatch):
    """A model whose embeddings changed (merged again into its directory) or loaded in another
    dtype, or other calibration data, was refused naming two hashes ('outside: 'e2712...' then,
    '757b3...' now'); what differs is said."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    model, calibration = fam.merged(), fam.calibration
    if change == "embeddings":
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(1.01)
    elif change == "dtype":
        model.to(torch.bfloat16)
    else:
        calibration = {t: [x.flip(-1) for x in items] for t, items in calibration.items()}
    with pytest.raises(ValueError, match=f"another walk.*{message}") as refused:
        epmq.quantize_model(model, SPEC, method="epmq", calibration=calibration, experts=fam.experts,
                            resume_dir=tmp_path, progress=False)
    assert not re.search(r"[0-9a-f]{32}", str(refused.value)), str(refused.value)


def test_a_block_after_one_solved_again_from_other_weights_is_not_reused(gen, tmp_path):
    """Its inputs changed: every block's digest takes the one before it (block 1 was loaded,
    stale, when block 0's record was removed to solve it again from changed weights)."""
    fam = Family("llama", gen)
    run(fam, fam.merged(), "gptq", "merged_path", resume_dir=tmp_path)
    model = fam.merged()
    with torch.no_grad():
        model.get_parameter("model.layers.0.mlp.down_proj.weight").mul_(1.5)
    for path in tmp_path.glob("model.layers.0.*"):
        path.unlink()
    with pytest.raises(ValueError, match="model.layers.1 was quantized from other weights"):
        run(fam, model, "gptq", "merged_path", resume_dir=tmp_path)


def test_arguments_equal_in_value_are_one_walk(gen, tmp_path, monkeypatch):
    """anchor=1 (YAML's ``anchor: 1``) resumes a walk of the default anchor=1.0; a model loaded
    from another path (a hub id, then its local copy) is the same model."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    model = fam.merged()
    model.name_or_path = "/elsewhere/llama"
    out = run(fam, model, "epmq", "merged_path", resume_dir=tmp_path, anchor=1, percdamp=0.01)
    assert out.epmq_report.resumed == ["model.layers.0"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "record", "digit", "layout"])
def test_a_damaged_block_is_solved_again(damage, gen, tmp_path, monkeypatch):
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    tensors, record = tmp_path / "model.layers.0.safetensors", tmp_path / "model.layers.0.json"
    if damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[-10] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(b"")
    elif damage == "missing":
        tensors.unlink()
    elif damage == "record":
        record.write_text('{"dig')
    else:  # whole JSON, but not what was written: a loss's digit, a layer's group size
        content = json.loads(record.read_text())
        if damage == "digit":
            content["entries"][0]["loss"] *= 1.5
        else:
            next(iter(content["layers"].values()))["group_size"] = 8
        record.write_text(json.dumps(content))
    with pytest.warns(UserWarning, match="block model.layers.0 is damaged"):
        out = run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert out.epmq_report.resumed == []
    reference = run(fam, fam.merged(), "epmq", "merged_path")
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), reference.state_dict().values()))


def test_a_directory_with_no_block_done_takes_the_new_arguments(gen, tmp_path, monkeypatch):
    """(A walk that failed before its first block was done, e.g. on a layer the solver refused,
    must not lock the directory to its arguments.)"""
    fam = Family("llama", gen)

    def refused(*args, **kwargs):
        raise ValueError("refused")

    with monkeypatch.context() as patch:
        patch.setattr(epmq.quant, "gptq", refused)
        with pytest.raises(ValueError, match="refused"):
            epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=64), method="gptq",
                                calibration=fam.calibration, resume_dir=tmp_path, progress=False)
    stale = tmp_path / ".model.layers.0.safetensors.tmp-999999999"  # a killed walk's
    stale.write_bytes(b"partial")
    run(fam, fam.merged(), "gptq", "merged_path", resume_dir=tmp_path)
    assert not stale.exists()


def test_a_block_half_written_is_solved_again(gen, tmp_path, monkeypatch):
    """Only a block whose record (written last) is whole counts as done."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    record = tmp_path / "model.layers.0.json"
    json.loads(record.read_text())
    record.unlink()  # as if the walk stopped between the tensors and the record
    out = run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert out.epmq_report.resumed == []
    reference = run(fam, fam.merged(), "epmq", "merged_path")
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), reference.state_dict().values()))


def test_resume_dir_checks(gen, tmp_path):
    fam = Family("llama", gen)
    with pytest.raises(ValueError, match="resume_dir is for the GPTQ and E-PMQ walks"):
        epmq.quantize_model(fam.merged(), SPEC, method="rtn", resume_dir=tmp_path, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        run(fam, fam.merged(), "gptq", "merged_path", resume_dir=tmp_path / "file")


def test_a_checkpoint_given_as_the_resume_directory_is_refused(gen, tmp_path):
    """A checkpoint directory given as resume_dir (the output's, or the model's) took the blocks beside its
    weights: model.layers.0.safetensors and the rest, which loaders reading every .safetensors of a directory
    (vLLM's, without an index) read as the checkpoint's, and which stayed there after the walk. Refused before
    anything is written; a directory of the walk's own blocks, damaged ones included, is not, nor one of a
    user's weights without a config (no loader reads it as a model)."""
    from epmq.resume import hold

    fam = Family("llama", gen)
    fam.merged().save_pretrained(tmp_path / "model")
    quantized = epmq.quantize_model(fam.merged(), SPEC, method="rtn", progress=False)
    epmq.save_quantized(quantized, tmp_path / "w4")
    for checkpoint in (tmp_path / "model", tmp_path / "w4"):
        before = sorted(os.listdir(checkpoint))
        with pytest.raises(ValueError, match=rf"resume_dir {re.escape(str(checkpoint))} is a checkpoint "
                                             r"\(config\.json, .*model\.safetensors\)"):
            run(fam, fam.merged(), "gptq", "merged_path", resume_dir=checkpoint)
        with pytest.raises(ValueError, match="is a checkpoint"), hold(checkpoint, fresh=True):
            pass
        assert sorted(os.listdir(checkpoint)) == before
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    epmq._util.save_safetensors({"w": torch.zeros(2)}, blocks / "users.safetensors")
    first = run(fam, fam.merged(), "gptq", "merged_path", resume_dir=blocks)
    (blocks / "model.layers.1.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="block model.layers.1 is damaged"):
        again = run(fam, fam.merged(), "gptq", "merged_path", resume_dir=blocks)
    assert again.epmq_report.resumed == ["model.layers.0"]
    torch.testing.assert_close(output(again, fam.test_item), output(first, fam.test_item), rtol=0, atol=0)


def test_blocks_of_another_walk_are_refused_without_walk_json(gen, tmp_path, monkeypatch):
    """walk.json lost (deleted, or damaged by a full disk): each block's record still says which
    walk wrote it; the same walk resumes, another is refused, and does not claim the directory
    (it wrote its own walk.json, and the walk the blocks are of was then refused)."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    (tmp_path / "walk.json").unlink()
    with pytest.raises(ValueError, match="written by a walk with other arguments"):
        epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=3, group_size=16), method="epmq",
                            calibration=fam.calibration, experts=fam.experts, resume_dir=tmp_path,
                            progress=False)
    assert not (tmp_path / "walk.json").exists()
    out = run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert out.epmq_report.resumed == ["model.layers.0"]


def test_one_walk_at_a_time_in_a_directory(gen, tmp_path):
    from epmq.resume import BlockLog

    first = BlockLog(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match="in use by another walk"):
        BlockLog(tmp_path, {"a": 2})
    first.close()
    BlockLog(tmp_path, {"a": 2}).close()


@pytest.mark.parametrize("error", ["OSError", "FileNotFoundError"])
def test_a_read_error_that_is_not_damage_keeps_the_block(gen, tmp_path, monkeypatch, error):
    """Too many open files, no memory: the walk stops with the error, and the block it could not
    read stays on disk for the next try (safetensors reports a file it cannot open, whatever the
    reason, as FileNotFoundError: the file is there, so that is no damage)."""
    import errno

    import safetensors.torch

    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)

    def busy(*args, **kwargs):
        if error == "OSError":
            raise OSError(errno.EMFILE, "Too many open files")
        raise FileNotFoundError("No such file or directory: Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "load_file", busy)
        with pytest.raises(OSError, match="Too many open files"):
            run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert (tmp_path / "model.layers.0.safetensors").is_file()
    out = run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert out.epmq_report.resumed == ["model.layers.0"]


def test_buffers_a_forward_changed_are_restored_when_a_walk_fails(gen, tmp_path, monkeypatch):
    """Dynamic RoPE rescales inv_freq in the forward when a sequence passes the trained length;
    a failed walk puts the buffer back, so the same call resumes (its identity unchanged)."""
    fam = Family("llama", gen)
    model = fam.merged()
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone()

    def rescale(module, args):
        module.inv_freq = module.inv_freq * 0.5  # a new tensor, as a reassignment makes
        module.max_seq_len_cached = 999  # (transformers' dynamic_frequency_update sets these too)
        module.seen_longer = True

    handle = rotary.register_forward_pre_hook(rescale)
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            run(fam, model, "epmq", "merged_path", resume_dir=tmp_path)
    handle.remove()
    assert torch.equal(rotary.inv_freq, before)
    assert rotary.max_seq_len_cached != 999 and not hasattr(rotary, "seen_longer")
    out = run(fam, model, "epmq", "merged_path", resume_dir=tmp_path)
    assert out.epmq_report.resumed == ["model.layers.0"]


def test_an_expert_block_is_read_once_by_a_walk_that_logs_it(gen, tmp_path, monkeypatch):
    """The resume log's digest takes the fingerprints of the experts' reads the solve made: with
    resume_dir, each expert tensor is read as often as without."""
    from epmq.experts import ExpertWeights

    counts = {}
    fetch = ExpertWeights.fetch  # (every read of a tensor, by the walk or its read-ahead)

    def counted(self, name, index=None):
        counts[name] = counts.get(name, 0) + 1
        return fetch(self, name, index)

    monkeypatch.setattr(ExpertWeights, "fetch", counted)
    fam = Family("llama", gen)
    run(fam, fam.merged(), "epmq", "merged_path")
    without, counts = counts, {}
    run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    assert counts == without


def test_an_expert_tensor_read_again_on_the_expert_path_is_fingerprinted_once(gen, tmp_path, monkeypatch):
    """The expert path reads an expert's block again for each group of its linears: the resume
    log's digest takes the fingerprint of the first read (a CRC over the tensor's bytes), not of each."""
    reads, prints, reading = [], [], []
    read_expert, fingerprint = walker._Walk._read_expert, walker.fingerprint

    def read(self, task, name, *args, **kwargs):
        reads.append((task, name))
        reading.append(name)
        try:
            return read_expert(self, task, name, *args, **kwargs)
        finally:
            reading.pop()

    def printed(t):
        if reading:  # (not the merged block's own tensors)
            prints.append(reads[-1])
        return fingerprint(t)

    monkeypatch.setattr(walker._Walk, "_read_expert", read)
    monkeypatch.setattr(walker, "fingerprint", printed)
    fam = Family("llama", gen)
    reference = run(fam, fam.merged(), "epmq", "expert_path").state_dict()
    reads.clear(), prints.clear()
    out = run(fam, fam.merged(), "epmq", "expert_path", resume_dir=tmp_path)
    assert len(reads) > len(set(reads))  # (read again: what the test is about)
    assert sorted(prints) == sorted(set(reads))
    assert out.state_dict().keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in out.state_dict().items())


def test_expert_reads_read_ahead_are_fingerprinted_by_the_read_ahead(gen, tmp_path, monkeypatch):
    """On the merged path the read-ahead reads the experts' weights in the background, and their
    CRCs for the resume log are taken there, not by the walk; the log is the one a walk without
    read-ahead writes (every read fingerprinted by the walk), so either resumes the other's."""
    import threading

    threads = []
    fingerprint = walker.fingerprint

    def printed(t):
        threads.append(threading.current_thread().name)
        return fingerprint(t)

    monkeypatch.setattr(walker, "fingerprint", printed)
    fam = Family("llama", gen)
    run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path / "ahead")
    assert any(name.startswith("epmq-read-ahead") for name in threads)
    monkeypatch.setattr(walker, "EXPERT_READ_AHEAD_BYTES", 0)
    threads.clear()
    run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path / "not")
    assert not any(name.startswith("epmq-read-ahead") for name in threads)
    monkeypatch.setattr(walker, "EXPERT_READ_AHEAD_BYTES", 1 << 30)
    out = run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path / "not")
    assert len(out.epmq_report.resumed) == len(fam.merged().model.layers)


def test_a_model_made_under_inference_mode_is_rolled_back(gen, tmp_path, monkeypatch):
    """Its buffers are inference tensors, which cannot be written outside that mode: a failed
    walk still puts them back and raises its own error."""
    fam = Family("llama", gen)
    with torch.inference_mode():
        model = fam.merged()
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            run(fam, model, "epmq", "merged_path", resume_dir=tmp_path)


def test_the_attention_of_a_sub_config_is_in_the_identity(gen):
    """A CLIP's towers may run different attention implementations (set per sub-config)."""
    from epmq.resume import config_of

    model = Family("hf_clip", gen).merged()
    before = config_of(model)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager", "": "sdpa"})
    after = config_of(model)
    assert before != after and after["vision_config._attn_implementation"] == "eager"


def test_damaged_identity_files_and_meta_buffers(gen, tmp_path):
    """walk.json that is JSON but not a record is as good as missing; a meta buffer (never used
    by the forward) has a fingerprint without values."""
    from epmq.resume import fingerprint

    fam = Family("llama", gen)
    tmp_path.joinpath("walk.json").write_text("[1]")
    run(fam, fam.merged(), "gptq", "merged_path", resume_dir=tmp_path / "x")
    (tmp_path / "x" / "walk.json").write_text('"x"')
    out = run(fam, fam.merged(), "gptq", "merged_path", resume_dir=tmp_path / "x")
    assert len(out.epmq_report.resumed) == 2
    assert fingerprint(torch.empty(3, 4, device="meta")) == ("torch.float32", (3, 4), "meta")


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_epmq_quantize_refuses_a_resume_directory_another_process_holds(gen, tmp_path, capsys):
    """Another run holds OUT.resume: this one stops with that said (not with a --fresh hint), and
    --fresh does not empty the directory under the other run."""
    import subprocess
    import sys

    import yaml

    from epmq.cli import main
    from epmq.benches.tiny import word_tokenizer

    fam = Family("llama", gen)
    fam.merged().save_pretrained(tmp_path / "model")
    word_tokenizer(tmp_path / "model")
    (tmp_path / "a.txt").write_text("the cat sat on the mat .\n" * 20)
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(tmp_path / "model"), method="gptq", bits=4, group_size=16,
                                          calibration={"a": str(tmp_path / "a.txt")}, samples=2, seq_len=8)))
    held = tmp_path / "out.resume"
    held.mkdir()
    (held / "model.layers.0.json").write_text("{}")  # the other run's
    other = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(held / "walk.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        for fresh in ([], ["--fresh"]):
            assert main(["quantize", str(config), str(tmp_path / "out"), "--quiet", *fresh]) == 2
            err = capsys.readouterr().err
            assert "in use by another walk" in err and "--fresh" not in err
            assert (held / "model.layers.0.json").is_file() and not (tmp_path / "out").exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_epmq_quantize_is_refused_a_held_resume_directory_before_it_loads_the_model(gen, tmp_path, monkeypatch):
    """A second epmq quantize into one OUT was refused only once it had read its calibration and loaded
    the model (minutes and a model's memory at 70B), where OUT.resume was taken; it is taken first, and
    a run stopped before its first block (here: the model cannot load) leaves no OUT.resume behind."""
    import subprocess
    import sys

    import transformers

    from epmq.benches.tiny import word_tokenizer
    from epmq.quantize_files import quantize_checkpoint

    fam = Family("llama", gen)
    fam.merged().save_pretrained(tmp_path / "model")
    word_tokenizer(tmp_path / "model")
    (tmp_path / "a.txt").write_text("the cat sat on the mat .\n" * 20)
    loads = []
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    held = tmp_path / "out.resume"
    held.mkdir()
    other = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.readline()"), str(held / "walk.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kwargs = dict(spec=epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                  calibration={"a": str(tmp_path / "a.txt")}, samples=2, seq_len=8, progress=False)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="in use by another walk"):
            quantize_checkpoint(str(tmp_path / "model"), tmp_path / "out", **kwargs)
        assert not loads
    finally:
        other.communicate("\n")

    def cannot_load(cls, *args, **kwargs):
        raise OSError("the disk is gone")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(cannot_load))
    with pytest.raises(OSError, match="the disk is gone"):
        quantize_checkpoint(str(tmp_path / "model"), tmp_path / "other", **kwargs)
    assert not (tmp_path / "other.resume").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("change,message", [
    (dict(weight_anchor=0.5), "weight_anchor"),
    (dict(percdamp=0.05), "percdamp"),
    (dict(true_sequential=False), "true_sequential"),
    (dict(blocksize=8), "blocksize"),
])
def test_other_solver_options_are_refused(change, message, gen, tmp_path, monkeypatch):
    """Each of these changes the layers a walk solves: a walk resumed with another value would
    mix two walks' blocks."""
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=f"another walk.*{message}"):
        epmq.quantize_model(fam.merged(), SPEC, method="epmq", calibration=fam.calibration,
                            experts=fam.experts, resume_dir=tmp_path, progress=False, **change)


def test_an_expert_of_other_embeddings_is_refused_on_the_expert_path(gen, tmp_path, monkeypatch):
    """On the expert path each expert's own embeddings make its stream's inputs: an expert whose
    tensors outside the blocks changed is another walk, though no block tensor did."""
    fam = Family("llama", gen)
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            run(fam, fam.merged(), "epmq", "expert_path", resume_dir=tmp_path)
    experts = dict(fam.experts)
    task = next(iter(experts))
    name = "model.embed_tokens.weight"
    experts[task] = {k: v * 1.01 if k == name else v for k, v in experts[task].state_dict().items()}
    with pytest.raises(ValueError, match="another walk.*experts_outside"):
        epmq.quantize_model(fam.merged(), SPEC, method="epmq", targets="expert_path",
                            calibration=fam.calibration, experts=experts, resume_dir=tmp_path,
                            progress=False)


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_a_closed_block_log_lets_other_processes_take_the_directory(tmp_path):
    """``close`` lets go of ``walk.lock`` (the file is closed, its flock gone): another process
    may then walk the directory; a lock kept open would hold it until this process ends."""
    import fcntl

    from epmq import resume

    log = resume.BlockLog(tmp_path, {"a": 1})
    log.close()
    assert str(tmp_path.resolve()) not in resume._HELD
    with open(tmp_path / resume.LOCK_FILE, "a+") as other:  # (another open file: as another process)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with resume.hold(tmp_path):
        pass
    with open(tmp_path / resume.LOCK_FILE, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_block_s_tensors_are_on_disk_before_its_record(tmp_path, monkeypatch):
    """The module docstring's order: the tensors file is fsynced, then moved into place, and only
    then is the record written that makes the block count as done (a power cut in between must
    not leave a record whose tensors were never flushed)."""
    from epmq import resume

    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                       if os.path.exists(f"/proc/self/fd/{fd}") else fd))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        return replace(src, dst)

    log = resume.BlockLog(tmp_path, {"a": 1})
    layer = epmq.QuantLinear(32, 8, bits=4, group_size=16)
    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    try:
        log.save("block.0", "digest", {"proj": layer}, entries=[])
    finally:
        log.close()
    names = events
    tensors_at = names.index(("replace", "block.0.safetensors"))
    record_at = names.index(("replace", "block.0.json"))
    assert tensors_at < record_at
    synced = [i for i, (kind, what) in enumerate(names[:tensors_at]) if kind == "fsync"]
    assert synced, f"the tensors were moved into place unflushed: {names}"
    if os.path.exists("/proc/self/fd"):
        assert any(str(names[i][1]).startswith(".block.0.safetensors.tmp") for i in synced), names


def _walk_files(directory):
    """A walk's files in ``directory`` (a block's record and tensors, walk.json), and two of the user's."""
    from epmq import resume

    body = {"identity": "i", "digest": "d", "layers": {}, "tensors": "t"}
    (directory / "model.layers.0.json").write_text(json.dumps(dict(body, check=resume._check(body))))
    (directory / "model.layers.0.safetensors").write_bytes(b"x")
    (directory / "walk.json").write_text("{}")
    (directory / "notes.txt").write_text("mine")
    (directory / "sub").mkdir()
    (directory / "sub" / "f").write_text("mine")


def test_hold_fresh_empties_the_walk_but_keeps_its_lock_and_the_user_s_files(tmp_path):
    """``hold(fresh=True)`` (``epmq quantize --fresh``, ``resume=False``) discards the blocks an
    earlier walk left: nothing of them is resumed. It deleted every file and folder in OUT.resume,
    a user's too (a scratch disk mounted there, notes kept with the blocks); only the walk's go, as
    where OUT.resume is a link."""
    from epmq import resume

    _walk_files(tmp_path)
    with resume.hold(tmp_path, fresh=True) as held:
        assert sorted(p.name for p in held.iterdir()) == sorted([resume.LOCK_FILE, "notes.txt", "sub"])
    assert (tmp_path / "sub" / "f").read_text() == "mine"
    (tmp_path / "model.layers.0.json").write_text("{}")
    with resume.hold(tmp_path):  # (not fresh: kept)
        assert (tmp_path / "model.layers.0.json").is_file()


def test_a_block_s_tensors_left_without_their_record_are_removed_with_the_walk(tmp_path):
    """A walk killed between a block's tensors and its record left ``{block}.safetensors`` with no
    record: clean-up (``remove``, ``--fresh``) could not tell it from a user's file and kept it, and
    OUT.resume stayed behind a finished quantize; the walk marks its tensors' files as its own."""
    from epmq import resume

    for clean_up in ("remove", "fresh"):
        walk = tmp_path / clean_up
        walk.mkdir()
        log = resume.BlockLog(walk, {"a": 1})
        log.save("model.layers.0", "digest", {"proj": epmq.QuantLinear(32, 8, bits=4, group_size=16)}, entries=[])
        log.close()
        (walk / "model.layers.0.json").unlink()  # (killed before the record)
        epmq._util.save_safetensors({"w": torch.zeros(2)}, walk / "users.safetensors")
        if clean_up == "remove":
            with resume.hold(walk):
                resume.remove(walk)
        else:
            with resume.hold(walk, fresh=True):
                pass
        left = sorted(p.name for p in walk.iterdir() if p.name != resume.LOCK_FILE)
        assert left == ["users.safetensors"]


def test_a_user_s_json_file_in_the_resume_directory_is_no_block(gen, tmp_path, monkeypatch):
    """Every *.json but walk.json was a block's record: a user's notes.json beside the blocks kept the first walk
    from writing walk.json (it took the file for a block of another walk), so a walk with other arguments was
    refused without the difference named, and epmq quantize said the file was a block kept."""
    from epmq.cli import _blocks_kept
    from epmq.resume import records

    fam = Family("llama", gen)
    (tmp_path / "notes.json").write_text('{"run": "a scratch disk"}')
    _interrupted(fam, tmp_path, monkeypatch)
    assert [p.name for p in records(tmp_path)] == ["model.layers.0.json"]
    with pytest.raises(ValueError, match=r"holds blocks of another walk \(spec\.bits: 4 then, 3 now\)"):
        epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=3, group_size=16), method="epmq",
                            calibration=fam.calibration, experts=fam.experts, resume_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "notes.json").read_text()) == {"run": "a scratch disk"}
    out = tmp_path / "w4"
    (tmp_path / "w4.resume").mkdir()
    (tmp_path / "w4.resume" / "notes.json").write_text("{}")
    assert _blocks_kept(out, "a disk full") == ""


def test_removing_a_resume_directory_keeps_the_user_s_files(tmp_path):
    """Once the checkpoint was written (``remove``), or the command stopped before its first block
    (``_drop_if_no_block``), OUT.resume was deleted whole (shutil.rmtree), a user's files in it too;
    the walk's files are removed, and the directory where nothing else is left in it."""
    from epmq import resume
    from epmq.quantize_files import _drop_if_no_block

    walk = tmp_path / "out.resume"
    walk.mkdir()
    _walk_files(walk)
    with resume.hold(walk):
        resume.remove(walk)
    assert sorted(p.name for p in walk.iterdir()) == ["notes.txt", "sub"]
    (walk / "walk.json").write_text("{}")
    with resume.hold(walk):
        _drop_if_no_block(walk)
    assert sorted(p.name for p in walk.iterdir()) == ["notes.txt", "sub"]
    (walk / "notes.txt").unlink()
    (walk / "sub" / "f").unlink()
    (walk / "sub").rmdir()
    walk.rmdir()
    for clean_up in (resume.remove, _drop_if_no_block):  # (nothing of the user's: the directory goes)
        walk.mkdir()
        _walk_files(walk)
        for mine in ("notes.txt", "sub/f", "sub"):
            (walk / mine).unlink() if mine != "sub" else (walk / mine).rmdir()
        if clean_up is _drop_if_no_block:
            for block in walk.glob("model.layers.0.*"):
                block.unlink()
        with resume.hold(walk):
            clean_up(walk)
        assert not walk.exists()


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_hold_fresh_of_a_link_empties_the_walk_where_it_points_and_keeps_the_link(tmp_path):
    """OUT.resume made a link to a scratch disk (as ``remove`` takes it): ``epmq quantize --fresh``
    removed the link and walked into a new directory on the output's disk, the earlier walk's blocks
    (a whole model's, at worst) left on the scratch disk for good. Its walk's files are removed there,
    the link and the user's files kept."""
    from epmq import resume

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    body = {"identity": "i", "digest": "d", "layers": {}, "tensors": "t"}
    (scratch / "model.layers.0.json").write_text(json.dumps(dict(body, check=resume._check(body))))
    (scratch / "model.layers.0.safetensors").write_bytes(b"x")
    (scratch / "walk.json").write_text("{}")
    (scratch / "notes.txt").write_text("mine")
    link = tmp_path / "out.resume"
    link.symlink_to(scratch)
    with resume.hold(link, fresh=True) as held:
        assert link.is_symlink() and held == link
        assert sorted(p.name for p in scratch.iterdir()) == sorted(["notes.txt", resume.LOCK_FILE])
    dangling = tmp_path / "gone.resume"  # (a link to a scratch disk since emptied: a directory of its own)
    dangling.symlink_to(tmp_path / "nowhere")
    with resume.hold(dangling, fresh=True):
        assert dangling.is_dir() and not dangling.is_symlink()


def test_hold_fresh_refuses_a_file_of_the_user_s_under_the_resume_directory_s_name(tmp_path):
    """``epmq quantize --fresh`` with a file named OUT.resume (the user's, not a walk's directory)
    deleted it; it is refused naming it, as without ``fresh``, and kept. A link to a file too."""
    from epmq import resume

    mine = tmp_path / "out.resume"
    mine.write_text("mine")
    link = tmp_path / "link.resume"
    link.symlink_to(mine)
    for path in (mine, link):
        with pytest.raises(ValueError, match=f"resume_dir {re.escape(str(path))} exists and is not a directory"):
            with resume.hold(path, fresh=True):
                pass
    assert mine.read_text() == "mine" and link.is_symlink()


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_a_resume_directory_linked_to_nothing_is_refused_naming_the_link(tmp_path):
    """OUT.resume (or quantize_model's resume_dir) a link to a scratch disk not mounted: the walk
    ended in a bare 'FileExistsError: [Errno 17] File exists'; refused naming the link and where it
    points (``--fresh`` replaces it with a directory, as before)."""
    from epmq import resume

    link = tmp_path / "out.resume"
    link.symlink_to(tmp_path / "scratch" / "blocks")
    pattern = f"resume_dir {re.escape(str(link))} is a link to {re.escape(str(tmp_path / 'scratch' / 'blocks'))}"
    with pytest.raises(ValueError, match=pattern + ", which does not exist"):
        with resume.hold(link):
            pass
    assert link.is_symlink()


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_hold_output_is_one_write_at_a_time_and_leaves_no_lock(tmp_path):
    """``hold_output``: one job (a merge or quantize) at a time in a checkpoint directory, a save
    within it taken; another open of the lock file (as another process) is refused while it is held.
    Let go, the lock file is gone, and a handle opened before that locks a removed file in vain: the
    next hold is not refused by it. A link's target is held, whichever name is given."""
    import fcntl

    from epmq import resume

    out = tmp_path / "out"
    lock = resume.output_lock_file(out)
    assert lock == tmp_path / ".out.epmq-lock"
    with resume.hold_output(out):
        with resume.hold_output(out, job=False):  # (the save within the job)
            pass
        with pytest.raises(ValueError, match=f"output directory {out} is in use by another epmq merge or quantize "
                                             f"\\(process {os.getpid()} holds {lock}\\)"):
            with resume.hold_output(out):
                pass
        stale = open(lock, "a+")  # (another process's open, just before the holder lets go)
        with pytest.raises(BlockingIOError):
            fcntl.flock(stale.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock.exists() and not out.exists() and str(lock) not in resume._HELD
    try:
        fcntl.flock(stale.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the removed file's lock)
        with resume.hold_output(out):
            assert lock.exists()
    finally:
        stale.close()
    assert not lock.exists()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with resume.hold_output(tmp_path / "link"):
        with pytest.raises(ValueError, match="is in use"), resume.hold_output(tmp_path / "target"):
            pass
    assert not resume.output_lock_file(tmp_path / "target").exists()


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_hold_output_on_a_file_system_whose_opens_are_never_the_file_there_is_refused(tmp_path, monkeypatch):
    """``hold_output`` opened its lock file again until the open was the file at its path (a holder
    letting go removes it), with no end: on a file system where fstat and stat never agree (inode
    numbers that change between calls) epmq merge and quantize hung at their start. A few tries, then
    refused naming the lock file."""
    from epmq import resume

    opens = []

    def never(handle, path):
        opens.append(path)
        if len(opens) > 10_000:  # (the loop without end: failed, not hung)
            raise AssertionError("hold_output retries without end")
        return False

    monkeypatch.setattr(resume, "_same_file", never)
    out = tmp_path / "out"
    lock = resume.output_lock_file(out)
    with pytest.raises(ValueError, match=f"output directory {out}: its lock file {lock} was replaced .* times"):
        with resume.hold_output(out):
            pass
    assert len(opens) == resume._LOCK_TRIES and str(lock) not in resume._HELD and not out.exists()


def test_digests_depend_on_names_and_keys():
    """What a resumed walk compares: tensors of the same values under other names (an expert's
    q_proj and k_proj swapped), and calibration data under other keys, are other inputs."""
    from epmq.resume import data_digest, tensor_digest

    x, y = torch.arange(4.0), torch.arange(4.0) + 1
    assert tensor_digest([("a", x), ("b", y)]) != tensor_digest([("b", x), ("a", y)])
    assert tensor_digest([("a", x)]) == tensor_digest([("a", x.clone())])
    ids = torch.arange(6).view(2, 3)
    assert data_digest([{"input_ids": ids}]) != data_digest([{"labels": ids}])
    assert data_digest([{"input_ids": ids}]) == data_digest([{"input_ids": ids.clone()}])


def test_calibration_arrays_are_digested_whole():
    """Calibration items of numpy arrays (a model whose forward takes them: torch.as_tensor(x))
    were digested by their repr, which numpy cuts to its first and last values past 1000: data
    differing in between was the same calibration, and a resume_dir of the other data resumed,
    its blocks mixed into the walk without a word."""
    import numpy as np

    from epmq.resume import data_digest

    a = np.random.default_rng(0).standard_normal((4, 64, 16)).astype(np.float32)
    b = a.copy()
    b[2, 30, 5] += 3.0
    assert data_digest([a]) != data_digest([b])
    assert data_digest([a]) != data_digest([a.astype(np.float64)])
    assert data_digest([a]) != data_digest([a.reshape(4, 16, 64)])
    assert data_digest([a]) == data_digest([a.copy()]) == data_digest([np.asfortranarray(a)])
    assert data_digest([np.array(["x", 1], dtype=object)]) != data_digest([np.array(["y", 1], dtype=object)])


def test_calibration_data_is_digested_by_content_not_repr(gen):
    """data_digest digested values it did not know by repr: a dataclass's tensors, cut by '...' to their
    ends, gave two datasets one digest (a resume_dir of the other data resumed), while an object without
    a repr of its own (its address) or a set (its order) gave one dataset another digest in each process
    (a resumed walk refused as of other data). Objects are digested by their fields, sets by their values;
    one with neither fields nor a repr of its own is refused by name."""
    import dataclasses

    from epmq.resume import data_digest

    @dataclasses.dataclass
    class Batch:
        pixels: torch.Tensor

    class Options:  # (a model's keyword argument of its own kind)
        def __init__(self, scale):
            self.scale = scale

    a = torch.randn(4, 1000, generator=gen)
    b = a.clone()
    b[2, 500] += 1.0
    assert data_digest([Batch(a)]) != data_digest([Batch(b)])
    assert data_digest([Batch(a)]) == data_digest([Batch(a.clone())])
    assert data_digest([{"x": a, "options": Options(2.0)}]) == data_digest([{"x": a, "options": Options(2.0)}])
    assert data_digest([{"x": a, "options": Options(2.0)}]) != data_digest([{"x": a, "options": Options(3.0)}])
    assert repr({9, 1}) != repr({1, 9})  # (one set, two orders: as another hash seed orders strings)
    assert data_digest([{9, 1}]) == data_digest([{1, 9}]) != data_digest([{1, 8}])
    with pytest.raises(TypeError, match=r"calibration data holds a torch\._C\.Generator, whose content cannot be "
                                        r"digested for resume_dir"):
        data_digest([{"x": a, "generator": torch.Generator()}])


def test_a_damaged_block_s_files_are_removed(tmp_path):
    """A damaged block is deleted when found, so that it no longer counts as done: a walk
    stopped before solving it again leaves a directory of no block (``records``), which
    another walk's arguments may then take, and ``epmq quantize`` drops."""
    from epmq import resume

    log = resume.BlockLog(tmp_path, {"a": 1})
    try:
        log.save("block.0", "digest", {"proj": epmq.QuantLinear(32, 8, bits=4, group_size=16)}, entries=[])
        record = tmp_path / "block.0.json"
        record.write_text(record.read_text().replace('"digest"', '"digesT"'))
        with pytest.warns(UserWarning, match="damaged"):
            assert log.load("block.0", "digest", "cpu") is None
        assert resume.records(tmp_path) == [] and not (tmp_path / "block.0.safetensors").exists()
    finally:
        log.close()


class DtMixer(torch.nn.Module):
    """``out(dt.weight @ up(x))``: Mamba's mixer multiplies by ``dt_proj.weight`` so."""

    def __init__(self):
        super().__init__()
        self.up, self.dt, self.out = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        return self.out((self.dt.weight @ self.up(x).T).T)


class DtNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([DtMixer(), DtMixer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_directory_of_a_walk_that_walked_linears_read_without_a_call_is_refused_clearly(tmp_path, monkeypatch):
    """A resume directory of an epmq before linears whose weight the blocks' code reads without a
    call (Mamba's dt_proj) were left out of the walk lists them among its blocks' linears: refused,
    naming those linears and why, and saying to use an empty directory (not 'the same arguments',
    which the caller gave); an empty one walks as before."""
    torch.manual_seed(0)
    model = DtNet().eval()
    kw = dict(method="gptq", calibration={"a": [torch.randn(4, 16)]}, progress=False,
              adapter=epmq.Adapter("mixers", block_types=(DtMixer,)))
    with monkeypatch.context() as m:
        m.setattr(walker, "_take_weights_read", lambda stacks: [])  # (the walk of the epmq before)
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            epmq.quantize_model(DtNet().eval(), SPEC, resume_dir=tmp_path, **kw)
    with pytest.raises(ValueError) as refused:
        epmq.quantize_model(model, SPEC, resume_dir=tmp_path, **kw)
    message = str(refused.value)
    assert "layers.0.dt, layers.1.dt" in message and "read without a call" in message
    assert "use an empty directory" in message and "same arguments" not in message
    with pytest.warns(UserWarning, match="stay in full precision"):
        epmq.quantize_model(model, SPEC, resume_dir=tmp_path / "empty", **kw)
    assert sorted(model.epmq_report.skipped) == ["layers.0.dt", "layers.1.dt"]


def test_blocks_of_the_same_linears_in_another_order_are_not_said_to_be_left_out(tmp_path):
    """Blocks that list the same linears in another order are another walk's, said so, and the
    linears a walk leaves out (read without a call) are not named as what differs."""
    from epmq import resume

    log = resume.BlockLog(tmp_path, {"blocks": [["layers", [["up", "out"]]]]})
    log.save("layers.0", "d", {}, entries=[], skipped=[], unreached=[])
    log.close()
    with pytest.raises(ValueError, match="the same linears in another layout.*same arguments") as refused:
        resume.BlockLog(tmp_path, {"blocks": [["layers", [["out", "up"]]]]}, left_out=["layers.0.dt"])
    assert "without a call" not in str(refused.value)


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_a_file_system_without_locks_is_not_taken_for_a_directory_in_use(tmp_path, monkeypatch):
    """flock fails on a file system that has no locks (NFS without its lock daemon: ENOLCK; some FUSE
    mounts: EOPNOTSUPP), where no other process holds anything: every epmq quantize (GPTQ, E-PMQ) and
    run was refused as 'in use by another walk', however often run again. It goes on unlocked, with a
    warning naming the file; a lock held (EWOULDBLOCK) is refused as before."""
    import errno
    import fcntl

    from epmq import resume

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=f"{resume.LOCK_FILE} cannot be locked.*No locks available"):
        with resume.hold(tmp_path / "walk"):
            pass
    with pytest.warns(UserWarning, match=f"{resume.RUN_LOCK_FILE} cannot be locked"):
        with resume.hold_run(tmp_path / "run"):
            pass
    assert not resume._HELD

    def held(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(ValueError, match="in use by another walk"):
        with resume.hold(tmp_path / "walk"):
            pass


def _identity_with_blocks_on_a_gpu(monkeypatch):
    """The walk's identity as if its blocks visited a GPU, the model on the CPU (the walk itself
    runs offloaded to the CPU: ``device="cpu"``)."""
    identity = walker._Walk._identity

    def on_a_gpu(self):
        device, self.device = self.device, torch.device("cuda")
        try:
            return identity(self)
        finally:
            self.device = device

    monkeypatch.setattr(walker._Walk, "_identity", on_a_gpu)


def test_a_walk_with_blocks_on_a_gpu_resumed_with_another_thread_count_is_refused(gen, tmp_path, monkeypatch):
    """With the model on the CPU and its blocks visiting a GPU (``device=``), the model's code outside
    the blocks (its embeddings, the stack's work between blocks) runs on the CPU and computes every
    block's inputs, which the CPU's thread count changes bit for bit; the walk's identity recorded
    the GPU's hardware only, and a walk resumed under another thread count took the first's blocks
    in silence. The CPU's is recorded beside the GPU's, a resume on another refused naming it."""
    from types import SimpleNamespace

    _identity_with_blocks_on_a_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H100 PCIe", multi_processor_count=114))
    fam = Family("llama", gen)
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 2)
        _interrupted(fam, tmp_path, monkeypatch, device="cpu")
    assert json.loads((tmp_path / "walk.json").read_text())["machine"]["sms"] == 114
    with pytest.raises(ValueError, match=r"another walk \(machine\.model\.threads: 2 then, 1 now\).*machine\.model"):
        run(fam, fam.merged(), "epmq", "merged_path", device="cpu", resume_dir=tmp_path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert run(fam, fam.merged(), "epmq", "merged_path", device="cpu", resume_dir=tmp_path).epmq_report.resumed


def test_the_model_s_machine_is_recorded_where_it_is_not_the_blocks_(monkeypatch):
    """Beside the blocks' GPU, the CPU the model lies on, as ``model.*``; nothing more where they
    are one (the model on the device its blocks visit, or on a GPU of the same model)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H100 PCIe", multi_processor_count=114))
    cpu, gpu = walker._machine(torch.device("cpu")), walker._machine(torch.device("cuda"))
    assert walker._blocks_and_model(walker._machine, torch.device("cuda"), torch.device("cpu")) == dict(
        gpu, **{"model.threads": cpu["threads"], "model.capability": cpu["capability"]})
    assert walker._blocks_and_model(walker._machine, torch.device("cpu"), torch.device("cpu")) == cpu
    assert walker._blocks_and_model(walker._machine, torch.device("cuda:1"), torch.device("cuda:0")) == gpu


def test_a_walk_over_several_gpus_resumed_with_one_of_them_another_model_is_refused(gen, tmp_path, monkeypatch):
    """A model spread by a device_map (its embeddings on the CPU, its blocks over two GPUs) is walked
    where its first parameter lies, and the walk's identity recorded that device's hardware alone: a
    walk resumed with its second GPU another model took the first's blocks in silence. Every device
    the model lies on is recorded, by its name where it differs from the blocks' (emulated: the
    identity of a CPU walk as if the model lay on two GPUs too)."""
    from types import SimpleNamespace

    gpus = {0: "NVIDIA H100 PCIe", 1: "NVIDIA H100 PCIe"}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=gpus[device.index], multi_processor_count=114))
    identity = walker._Walk._identity

    def spread(self):
        devices = self.seeded_devices
        self.seeded_devices = [*devices, *(torch.device("cuda", i) for i in gpus)]
        try:
            return identity(self)
        finally:
            self.seeded_devices = devices

    monkeypatch.setattr(walker._Walk, "_identity", spread)
    fam = Family("llama", gen)
    _interrupted(fam, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "walk.json").read_text())["machine"]["cuda:1.gpu"] == "NVIDIA H100 PCIe"
    gpus[1] = "NVIDIA A100-SXM4-80GB"
    with pytest.raises(ValueError, match=r"another walk \(machine\.cuda:1\.gpu: 'NVIDIA H100 PCIe' then, "
                                         r"'NVIDIA A100-SXM4-80GB' now\).*device_map"):
        run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path)
    gpus[1] = "NVIDIA H100 PCIe"
    assert run(fam, fam.merged(), "epmq", "merged_path", resume_dir=tmp_path).epmq_report.resumed


@pytest.mark.parametrize("backend, set_to, recorded", [
    ("cuda", "tf32", {"float32_matmul_precision": "high"}),
    ("mkldnn", "bf16", {}),  # (oneDNN's: the CPU's, not the GPU's)
])
def test_the_gpu_s_float32_precision_is_read_when_set_by_the_per_backend_api(backend, set_to, recorded, monkeypatch):
    """Once a backend's float32 precision was set by torch's per-backend API (TF32 as torch's docs
    now advise it, ``torch.backends.cuda.matmul.fp32_precision = "tf32"``; or oneDNN's bf16 for the
    model's part on the CPU), ``torch.get_float32_matmul_precision`` raises, and the identity of a
    walk whose blocks visit a GPU raised with it (RuntimeError: "mix of the legacy and new APIs").
    The GPU's TF32 is read from CUDA's backend, recorded as before."""
    monkeypatch.setattr(getattr(torch.backends, backend).matmul, "fp32_precision", set_to)
    assert walker._float_precision(torch.device("cuda")) == recorded


def test_a_walk_with_blocks_on_a_gpu_resumed_under_another_cpu_float32_precision_is_refused(gen, tmp_path,
                                                                                            monkeypatch):
    """With the model on the CPU and its blocks visiting a GPU, the model's code outside the blocks
    runs under the CPU's float32 settings (oneDNN's bf16), which the walk's identity did not record
    (the GPU's only): a walk resumed under others took the first's blocks in silence. They are
    recorded as ``model.*``, a resume under others refused naming the setting."""
    _identity_with_blocks_on_a_gpu(monkeypatch)
    monkeypatch.setattr(walker, "_machine", lambda device: {})  # (no GPU's to read here)
    fam = Family("llama", gen)
    matmul = torch.backends.mkldnn.matmul
    with monkeypatch.context() as m:
        m.setattr(matmul, "fp32_precision", "bf16")
        _interrupted(fam, tmp_path, monkeypatch, device="cpu")
    monkeypatch.setattr(matmul, "fp32_precision", "ieee")
    with pytest.raises(ValueError, match=r"another walk \(precision\.model\.mkldnn\.matmul\.fp32_precision: 'bf16' "
                                         r"then, torch's default now\)"):
        run(fam, fam.merged(), "epmq", "merged_path", device="cpu", resume_dir=tmp_path)
    monkeypatch.setattr(matmul, "fp32_precision", "bf16")
    assert run(fam, fam.merged(), "epmq", "merged_path", device="cpu", resume_dir=tmp_path).epmq_report.resumed


def test_a_walk_of_blocks_named_by_an_ordered_dict_resumes_and_names_them_when_refused(gen, tmp_path):
    """Blocks of an nn.Sequential built from an OrderedDict (torchvision's ViT's encoder.layers.
    encoder_layer_0, ...) are written to resume_dir by their names and loaded back by the same call;
    another walk's directory is refused naming the linears walked then by the model's names, where it
    said encoder.layers.0.*, which the model has not."""
    from test_walker_archs import _torchvision_vit

    calibration = {"a": [torch.randn(2, 3, 32, 32, generator=gen)]}
    options = dict(method="gptq", calibration=calibration, resume_dir=tmp_path, progress=False)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    model = _torchvision_vit()
    walked = epmq.quantize_model(copy.deepcopy(model), SPEC, **options)
    assert {p.name for p in tmp_path.glob("*.safetensors")} == {
        "encoder.layers.encoder_layer_0.safetensors", "encoder.layers.encoder_layer_1.safetensors"}
    resumed = epmq.quantize_model(copy.deepcopy(model), SPEC, **options)  # (every block loaded)
    assert torch.equal(resumed(images), walked(images))
    with pytest.raises(ValueError, match=r"linears walked then, not now: encoder\.layers\.encoder_layer_0\."
                                         r"self_attention\.k_proj"):
        epmq.quantize_model(copy.deepcopy(model), SPEC, **dict(options, layers="mlp"))


def test_a_run_whose_new_output_folder_was_removed_under_it_ends_in_its_own_error(tmp_path):
    """hold_run removes the output folder it made where the run wrote nothing, looking into it as the
    run ends: a folder removed under the run (by hand) ended it in that look's FileNotFoundError, not
    in the run's own error."""
    import shutil

    from epmq import resume

    with pytest.raises(RuntimeError, match="the run's own"):
        with resume.hold_run(tmp_path / "made" / "out"):
            shutil.rmtree(tmp_path / "made")
            raise RuntimeError("the run's own")
    assert not resume._HELD


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_a_run_hold_opened_as_another_lets_its_new_folder_go_holds_the_lock_file_there(tmp_path, monkeypatch):
    """hold_run removes the lock file of a folder it made where the run wrote nothing: another
    process's hold that opened the file just before (its lock taken once the file was let go) held
    the removed file, and a third, opening the file made at the path, ran beside it in the same
    folder. It opens the file there again, and the third is refused."""
    import fcntl

    from epmq import resume

    out = tmp_path / "out"
    lock = out / resume.RUN_LOCK_FILE
    with resume.hold_run(out):
        stale = open(lock, "a+")  # (the other process's open, just before the holder lets go)
    assert not out.exists()
    opens = iter([stale])
    monkeypatch.setattr(resume, "open", lambda *a, **k: next(opens, None) or open(*a, **k), raising=False)
    try:
        with resume.hold_run(out):
            with open(lock, "a+") as third, pytest.raises(BlockingIOError):
                fcntl.flock(third.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        stale.close()
    assert not out.exists() and not resume._HELD


def test_a_run_hold_whose_folder_goes_with_another_holders_let_go_makes_it_again(tmp_path, monkeypatch):
    """A hold of a folder another hold made and removes as it lets go (its run wrote nothing),
    taken between that folder's look and the open of its lock file, ended in FileNotFoundError: it
    makes the folder again and holds it."""
    from epmq import resume

    out = tmp_path / "out"
    out.mkdir()
    gone = []

    def open_after_the_other_let_go(path, *args, **kwargs):
        if not gone:  # (the other hold's rmdir, just before this open)
            out.rmdir()
            gone.append(out)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(resume, "open", open_after_the_other_let_go, raising=False)
    with resume.hold_run(out):
        assert (out / resume.RUN_LOCK_FILE).exists()
    assert out.exists() and not resume._HELD  # (there before this hold looked: kept)
