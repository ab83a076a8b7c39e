"""The FLAN-T5 GLUE bench on a tiny random T5 (Unigram tokenizer, JSONL data, no hub)."""

import json

import pytest
import torch

from epmq.benches import BenchConfigError, build_bench
from epmq.benches.prompts import GLUE, STSB_GRID
from epmq.benches.t5_glue import T5GlueBench, spearman
from epmq.benches.tiny import write_tiny_t5
from epmq.checkpoint_io import LazyStateDict
from epmq.merge import task_arithmetic

TASKS = ("sst2", "rte", "stsb")
WRITE_TINY = write_tiny_t5  # the ``tiny`` and ``bench`` fixtures (conftest.py)


def _check(acc):
    assert set(acc) == {*TASKS, "avg"}
    assert all(0 <= acc[t] <= 1 for t in ("sst2", "rte")) and -1 <= acc["stsb"] <= 1


def test_structure_and_tied_tensors(bench):
    assert isinstance(bench, T5GlueBench) and bench.task_names == list(TASKS)
    model = bench.model()
    assert type(model).__name__ == "T5ForConditionalGeneration"
    names = set(model.state_dict().keys())
    for state in (bench.base_state, *bench.experts.values()):
        assert isinstance(state, LazyStateDict) and set(state.keys()) == names
    # the checkpoint stores the shared embedding once; its aliases read the same tensor
    expert = bench.experts["rte"]
    assert expert.checkpoint_key("encoder.embed_tokens.weight") == "shared.weight"
    assert torch.equal(expert["decoder.embed_tokens.weight"], expert["shared.weight"])
    merged = task_arithmetic(bench.base_state, list(bench.experts.values()), scale=0.3)
    m = bench.model(merged)
    assert torch.equal(m.shared.weight, merged["shared.weight"])
    assert bench.tasks["stsb"].regression and bench.tasks["rte"].answers == GLUE["rte"]["answers"]


def test_calibration_items(bench):
    for task, items in bench.calibration.items():
        assert len(items) == 2
        for item in items:
            assert set(item) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
            assert item["input_ids"].shape == item["attention_mask"].shape and item["input_ids"].shape[0] == 2
            assert item["decoder_input_ids"].shape == item["decoder_attention_mask"].shape
            assert (item["decoder_input_ids"][:, 0] == 0).all()  # decoder start token
            assert item["input_ids"].shape[1] <= 64  # max_input_tokens
        with torch.no_grad():
            bench.model()(**items[0])  # a valid forward


def test_a_short_answer_beside_a_long_one_calibrates_the_decoder_as_alone(bench):
    """Decoder positions are those of the answer's tokens, whatever the batch: the mask used to
    be the answer's shifted right, so a short answer batched beside a long one also counted the
    position reading its end-of-sequence token, and the statistics changed with batch_size."""
    from epmq.calibration import unpad

    model, cpu = bench.model(), torch.device("cpu")
    answers = [[5, 1], [6, 7, 8, 1]]
    x = torch.tensor([[5, 6, 1], [7, 8, 1]])

    def decoder_rows(targets, rows):
        dec, dec_mask, _, _ = bench._decoder_inputs(model.config, targets, cpu)
        item = {"input_ids": x[rows], "attention_mask": torch.ones_like(x[rows]), "decoder_input_ids": dec,
                "decoder_attention_mask": dec_mask}
        return [r for part in unpad(item, encoder_decoder=True, model=model) for r in part["decoder_input_ids"].tolist()]

    together = decoder_rows(answers, [0, 1])
    alone = decoder_rows(answers[:1], [0]) + decoder_rows(answers[1:], [1])
    assert sorted(together) == sorted(alone) == [[0, 5], [0, 6, 7, 8]]


def test_scoring_picks_the_most_likely_answer(bench):
    model = bench.model()
    ids, labels = bench._encode("sst2", "test")
    cands = bench.tokenizer(bench.tasks["sst2"].candidates)["input_ids"]
    scores = bench._score(model, ids[:2], cands, torch.device("cpu"))
    assert scores.shape == (2, 2)
    # by hand: the log-likelihood of each answer through the full model with labels
    for b in range(2):
        for c, cand in enumerate(cands):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids[b]]), labels=torch.tensor([cand]))
            assert scores[b, c].item() == pytest.approx(-out.loss.item() * len(cand), abs=1e-4)
    grid = bench.tokenizer(bench.tasks["stsb"].candidates)["input_ids"]
    stsb = bench._score(model, ids[:1], grid, torch.device("cpu"))
    assert stsb.shape == (1, len(STSB_GRID))



def test_answers_of_different_lengths_score_only_their_own_tokens(bench, gen):
    """A short answer is padded beside a long one: its padding must not add log-likelihood."""
    model = bench.model()
    ids, _ = bench._encode("rte", "test")
    vocab = model.config.vocab_size
    cands = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (1, 4, 7)]
    scores = bench._score(model, ids[:2], cands, torch.device("cpu"))
    for b in range(2):
        for c, cand in enumerate(cands):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids[b]]), labels=torch.tensor([cand]))
            assert scores[b, c].item() == pytest.approx(-out.loss.item() * len(cand), abs=1e-4)

def test_evaluate_score_and_generate(bench, tiny):
    merged = task_arithmetic(bench.base_state, list(bench.experts.values()), scale=0.3)
    for state in (bench.base_state, bench.experts["sst2"], merged):
        _check(bench.evaluate(state, "val"))
    first = bench.evaluate(merged, "test")
    _check(first)
    assert bench.evaluate(bench.model(merged), "test") == first  # deterministic
    experts = bench.expert_accuracies("test")
    _check(experts)
    root, config = tiny
    gen = build_bench(dict(config, eval=dict(config["eval"], decoding="generate", max_new_tokens=4)),
                      base_dir=root, progress=False)
    _check(gen.evaluate(gen.base_state, "test"))


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's value with ties
    assert spearman([2, 2, 2], [1, 2, 3]) == 0.0


def test_errors(tiny, tmp_path):
    root, config = tiny
    bad = dict(config, tasks=[{"name": "wnli", "expert": "experts/rte"}])
    with pytest.raises(BenchConfigError, match="not a GLUE task this bench knows"):
        build_bench(bad, base_dir=root, progress=False)
    bad = dict(config, tasks=[{"name": "rte", "expert": "experts/rte", "data": {"splits": {"test": "test"}}}])
    with pytest.raises(BenchConfigError, match="missing data split 'test'"):
        build_bench(bad, base_dir=root, progress=False)
    bad = dict(config, tasks=[{"name": "rte", "expert": "experts/rte", "template": "Is {text} true?"}])
    with pytest.raises(BenchConfigError, match=r"lack field\(s\) \['text'\]"):
        build_bench(bad, base_dir=root, progress=False)
    # a custom task: own template and answers over GLUE-style JSONL
    d = tmp_path / "data" / "mine"
    d.mkdir(parents=True)
    for split, n in (("train", 8), ("validation", 4)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": "the cat sat", "label": i % 2}) + "\n"
                                                  for i in range(n)))
    custom = dict(config, tasks=[{"name": "mine", "expert": str(root / "experts" / "sst2"),
                                  "template": "Say: {sentence}", "answers": ["no", "yes"], "data": {"root": str(d)}}])
    b = build_bench(custom, base_dir=root, progress=False)
    assert 0 <= b.evaluate(b.base_state, "test")["mine"] <= 1
    # hidden labels (GLUE's test split) are refused with an explanation
    (d / "validation.jsonl").write_text(json.dumps({"sentence": "x", "label": -1}) + "\n")
    b = build_bench(custom, base_dir=root, progress=False)
    with pytest.raises(BenchConfigError, match="hides its labels"):
        b.evaluate(b.base_state, "test")


def test_glue_from_hf_datasets(tiny, monkeypatch):
    """GLUE through the ``datasets`` API (faked here: rows as dicts with GLUE's field names)."""
    import sys
    import types

    root, config = tiny
    calls = []

    class _Dataset:
        def __init__(self, rows):
            self.rows, self.column_names = rows, list(rows[0])

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return dict(self.rows[i])

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split))
        n = {"train": 10, "validation_matched": 4}.get(split)
        if n is None:
            raise ValueError(f'Unknown split "{split}".')
        return _Dataset([{"premise": "the cat sat", "hypothesis": "a cat", "label": i % 3, "idx": i} for i in range(n)])

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    glue = dict(config, data={"val_size": 0.2, "calibration": {"samples": 2, "batch_size": 2}},
                tasks=[{"name": "mnli", "expert": "experts/rte"}])
    bench = build_bench(glue, base_dir=root, progress=False)
    assert calls == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_matched")]
    acc = bench.evaluate(bench.base_state, "test")
    assert 0 <= acc["mnli"] <= 1 and len(bench.data["mnli"].splits["test"]) == 4
    assert bench.calibration["mnli"][0]["input_ids"].shape[0] == 2


def test_quantizes_through_the_walker(bench):
    import epmq
    from epmq.spec import QuantSpec

    model = bench.model(task_arithmetic(bench.base_state, list(bench.experts.values()), scale=0.3))
    epmq.quantize_model(model, QuantSpec(bits=8, group_size=16), method="epmq", calibration=bench.calibration,
                        experts=dict(bench.experts), progress=False)
    assert len(model.epmq_report.layers) == 2 * 7 + 2 * 11  # encoder: 4 attn + 3 ffn; decoder: + 4 cross-attn
    _check(bench.evaluate(model, "test"))


def test_long_inputs_lose_their_fields_not_the_instruction(bench):
    """Truncated to max_input_tokens, a prompt keeps its instruction (the end of the template)
    and shortens the example's own fields, the longest first."""
    task = bench.tasks["rte"]
    long, short = " ".join(["the cat sat on the mat"] * 20), "it rains"
    example = {"sentence1": long, "sentence2": short, "label": 0}
    bare = len(bench.tokenizer(task.prompt({"sentence1": "", "sentence2": ""}))["input_ids"])
    limit = bare + 10
    text = task.fitted_prompt(example, bench.tokenizer, limit)
    assert len(bench.tokenizer(text)["input_ids"]) <= limit
    assert text.endswith(task.template.rsplit("}", 1)[1]) and short in text
    assert task.fitted_prompt({**example, "sentence1": "a cat"}, bench.tokenizer, limit) == task.prompt(
        {**example, "sentence1": "a cat"})


@pytest.fixture(scope="module")
def roomy(tiny):
    """The tiny bench with room for whole prompts (at 64 tokens the tiny tokenizer spells the
    STS-B instruction out letter by letter and every example's prompt is the same)."""
    root, config = tiny
    bench = build_bench(dict(config, data=dict(config["data"], max_input_tokens=512)), base_dir=root, progress=False)
    for task in TASKS:
        ids = bench._encode(task, "test")[0]
        assert len({tuple(s) for s in ids}) == len(ids), task
    return bench


def _fixed_answers(bench, task, split, gen):
    """For each example of ``task``'s ``split``: the index of the answer a stub model gives
    (its label or another one, at random), keyed by the example's prompt ids."""
    ids, labels = bench._encode(task, split)
    n = len(bench.tasks[task].candidates)
    right = torch.rand(len(ids), generator=gen) < 0.5
    return {tuple(s): (int(y) if ok else (int(y) + 1) % n) for s, y, ok in zip(ids, labels, right.tolist())}, ids


def test_score_accuracy_counts_the_examples_whose_best_answer_is_their_label(roomy, monkeypatch, gen):
    bench = roomy
    for draw in range(4):
        answer, ids = _fixed_answers(bench, "sst2", "test", gen)

        def score(model, inputs, cand_ids, device):
            out = torch.zeros(len(inputs), len(cand_ids), dtype=torch.float64)
            for b, s in enumerate(inputs):
                out[b, answer[tuple(s)]] = 1.0
            return out - 5.0  # log-likelihoods are negative

        monkeypatch.setattr(bench, "_score", score)
        labels = bench._encode("sst2", "test")[1]
        want = sum(answer[tuple(s)] == int(y) for s, y in zip(ids, labels)) / len(ids)
        assert bench.evaluate(bench.base_state, "test", tasks=["sst2"])["sst2"] == pytest.approx(want)


def test_score_regression_is_the_spearman_of_the_best_grid_scores(roomy, monkeypatch, gen):
    bench = roomy
    ids, labels = bench._encode("stsb", "test")
    pick = {tuple(s): int(torch.randint(0, len(STSB_GRID), (1,), generator=gen)) for s in ids}

    def score(model, inputs, cand_ids, device):
        out = torch.full((len(inputs), len(cand_ids)), -9.0, dtype=torch.float64)
        for b, s in enumerate(inputs):
            out[b, pick[tuple(s)]] = -1.0
        return out

    monkeypatch.setattr(bench, "_score", score)
    want = spearman([STSB_GRID[pick[tuple(s)]] for s in ids], [float(v) for v in labels])
    assert bench.evaluate(bench.base_state, "test", tasks=["stsb"])["stsb"] == pytest.approx(want)


def test_generated_answers_count_only_when_they_are_the_gold_answer(roomy, monkeypatch, gen):
    """An output that is no answer is wrong whatever the label; an STS-B output that is not a
    number reads as 2.5."""
    bench = roomy
    bench.config.eval.decoding = "generate"
    try:
        ids, labels = bench._encode("sst2", "test")
        answers = bench.tasks["sst2"].answers
        texts = {}
        for s, y in zip(ids, labels):
            kind = int(torch.randint(0, 3, (1,), generator=gen))
            texts[tuple(s)] = [answers[int(y)], answers[1 - int(y)], "maybe"][kind]
        texts[tuple(ids[0])] = "maybe"
        monkeypatch.setattr(bench, "_generate_texts", lambda model, inputs, device: [texts[tuple(s)] for s in inputs])
        want = sum(texts[tuple(s)] == answers[int(y)] for s, y in zip(ids, labels)) / len(ids)
        assert bench.evaluate(bench.base_state, "test", tasks=["sst2"])["sst2"] == pytest.approx(want)

        ids, labels = bench._encode("stsb", "test")
        said = {tuple(s): f"{float(torch.rand(1, generator=gen)) * 5:.1f}" for s in ids}
        for s in ids[:2]:
            said[tuple(s)] = "no idea"
        said[tuple(ids[2])], said[tuple(ids[3])] = "0.5", "4.5"  # (scores on both sides of 2.5)
        said[tuple(ids[4])] = "nan"  # (float() reads it, but it is no number either)
        monkeypatch.setattr(bench, "_generate_texts", lambda model, inputs, device: [said[tuple(s)] for s in inputs])
        read = [2.5 if said[tuple(s)] in ("no idea", "nan") else float(said[tuple(s)]) for s in ids]
        want = spearman(read, [float(v) for v in labels])
        assert bench.evaluate(bench.base_state, "test", tasks=["stsb"])["stsb"] == pytest.approx(want)
    finally:
        bench.config.eval.decoding = "score"


def test_labels_targets_caps_and_answers_follow_the_config(tiny, tmp_path):
    root, config = tiny
    d = tmp_path / "sst2"
    d.mkdir()
    rows = [{"sentence": "the cat sat", "label": i % 2} for i in range(12)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    task = {"name": "sst2", "expert": "experts/sst2", "answers": ["bad", "good"], "data": {"root": str(d)}}
    capped = dict(config, tasks=[task], eval=dict(config["eval"], max_samples={"val": 2, "test": 3}))
    bench = build_bench(capped, base_dir=root, progress=False)
    assert bench.tasks["sst2"].answers == ["bad", "good"]  # the task's answers replace GLUE's
    assert [bench.tasks["sst2"].target(y) for y in (0, 1)] == ["bad", "good"]
    assert len(bench.data["sst2"].splits["val"]) == 2 and len(bench.data["sst2"].splits["test"]) == 3
    # a label past the last answer is refused
    (d / "validation.jsonl").write_text(json.dumps({"sentence": "x", "label": 2}) + "\n")
    bench = build_bench(dict(config, tasks=[task]), base_dir=root, progress=False)
    with pytest.raises(BenchConfigError, match="expected a label in 0..1"):
        bench.evaluate(bench.base_state, "test")
    # every task reads its own expert
    assert [t["expert"] for t in config["tasks"]] == [f"experts/{t}" for t in TASKS]


@pytest.mark.parametrize("task_name, label, expected", [
    ("sst2", "positive", "a label in 0..1"),  # (the answer word as the label: int()'s bare ValueError)
    ("sst2", 1.5, "a label in 0..1"),  # (read as class 1)
    ("sst2", None, "a label in 0..1"),
    ("stsb", float("nan"), "a score >= 0"),  # (scored, its rank taken)
])
def test_a_label_that_is_no_class_index_or_score_is_refused_by_name(tiny, tmp_path, task_name, label, expected):
    root, config = tiny
    d = tmp_path / task_name
    d.mkdir()
    fields = {"sentence": "the cat sat"} if task_name == "sst2" else {"sentence1": "a cat", "sentence2": "a dog"}
    (d / "train.jsonl").write_text("".join(json.dumps(dict(fields, label=i % 2)) + "\n" for i in range(8)))
    (d / "validation.jsonl").write_text(json.dumps(dict(fields, label=0)) + "\n"
                                        + json.dumps(dict(fields, label=label)) + "\n")
    task = {"name": task_name, "expert": f"experts/{task_name}", "data": {"root": str(d)}}
    bench = build_bench(dict(config, tasks=[task]), base_dir=root, progress=False)
    with pytest.raises(BenchConfigError, match=rf"task '{task_name}': the test split has label "
                                               rf"{label!r}, expected {expected}".replace(".", r"\.")):
        bench.evaluate(bench.base_state, "test")


def test_a_tasks_regression_setting_comes_from_the_config(tiny, tmp_path):
    """``regression: true`` makes a task of the user's own a score task (targets and candidates
    the STS-B grid's texts, scored by Spearman); ``regression: false`` makes a GLUE regression
    task a classification one with the task's answers."""
    root, config = tiny
    own = {"name": "similarity", "expert": "experts/stsb", "regression": True,
           "template": "how alike: {sentence1} and {sentence2}", "data": {"root": str(root / "data" / "stsb")}}
    bench = build_bench(dict(config, tasks=[own]), base_dir=root, progress=False)
    task = bench.tasks["similarity"]
    assert task.regression and task.answers is None
    assert task.target(3.14) == "3.1" and task.candidates == [f"{v:.1f}" for v in STSB_GRID]
    assert -1 <= bench.evaluate(bench.base_state, "test")["similarity"] <= 1

    d = tmp_path / "stsb"
    d.mkdir()
    rows = [{"sentence1": "the cat sat", "sentence2": "a dog ran", "label": i % 2} for i in range(12)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    binary = {"name": "stsb", "expert": "experts/stsb", "regression": False, "answers": ["different", "same"],
              "data": {"root": str(d)}}
    bench = build_bench(dict(config, tasks=[binary]), base_dir=root, progress=False)
    task = bench.tasks["stsb"]
    assert not task.regression and task.candidates == ["different", "same"]
    assert [task.target(y) for y in (0, 1)] == ["different", "same"]
    assert 0 <= bench.evaluate(bench.base_state, "test")["stsb"] <= 1


def test_a_silent_bench_loads_its_model_without_transformers_bar(tiny, capsys):
    root, config = tiny
    capsys.readouterr()
    build_bench(config, base_dir=root, progress=False)
    assert capsys.readouterr().err == ""


def test_the_tiny_t5_tokenizer_numbers_every_id(tmp_path):
    """(A piece listed twice left id 47 to no token: a vocabulary union refused the tokenizer.)"""
    from epmq.benches.tiny import t5_tokenizer

    vocab = t5_tokenizer(tmp_path).get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_an_experts_own_head_over_a_t5_that_cannot_untie_is_refused(tmp_path):
    """An expert that stores its own ``lm_head`` (FLAN-T5's head, trained apart) over a T5 base
    whose head is its embeddings: its head was read as the embeddings, silently. transformers 5
    ties every T5's head whatever tie_word_embeddings says, so the bench cannot untie its model
    (as ``epmq merge`` cannot): refused by name."""
    from safetensors.torch import load_file, save_file

    config = write_tiny_t5(tmp_path, ("sst2",))
    file = next((tmp_path / config["tasks"][0]["expert"]).glob("*.safetensors"))
    state = load_file(str(file))
    state["lm_head.weight"] = state["shared.weight"] + 0.1
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(BenchConfigError, match=r"expert of task 'sst2' holds its own 'lm_head.weight', which the "
                                               r"base ties to 'shared.weight'.*cannot keep them apart"):
        build_bench(config, base_dir=tmp_path, progress=False)
