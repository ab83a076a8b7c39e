"""calibration.unpad: a padded batch becomes batches of real tokens only, rows of equal lengths
together."""

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from epmq.calibration import _drawn, task_seeds, text_windows, unpad


def padded(lengths, L, side="right", pad=0, gen=None):
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = [torch.randint(1, 100, (n,), generator=gen) for n in lengths]
    for b, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(L - len(row), L)
        ids[b, where], mask[b, where] = row, 1
    return ids, mask, rows


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_cut_to_their_tokens_and_batched_by_length(side, gen):
    ids, mask, rows = padded([3, 5, 3, 0, 5, 1], 6, side, gen=gen)
    extra = torch.randn(6, 2, generator=gen)  # a per-row tensor off the token axis goes with its row
    parts = unpad({"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "extra": extra,
                   "return_dict": True})
    assert [p["input_ids"].shape for p in parts] == [(2, 3), (2, 5), (1, 1)]
    by_row = {0: (0, 0), 2: (0, 1), 1: (1, 0), 4: (1, 1), 5: (2, 0)}  # row 3 is padding only
    for b, (p, r) in by_row.items():
        part = parts[p]
        assert torch.equal(part["input_ids"][r], rows[b])
        assert torch.equal(part["labels"][r], rows[b])
        assert part["attention_mask"][r].eq(1).all()
        assert torch.equal(part["extra"][r], extra[b])
        assert part["return_dict"] is True


def test_encoder_decoder_sides_are_cut_apart(gen):
    ids, mask, rows = padded([2, 4], 4, gen=gen)
    labels, _, targets = padded([3, 1], 5, pad=-100, gen=gen)
    (part_a, part_b) = unpad({"input_ids": ids, "attention_mask": mask, "labels": labels}, encoder_decoder=True)
    assert torch.equal(part_a["input_ids"][0], rows[0]) and torch.equal(part_a["labels"][0], targets[0])
    assert torch.equal(part_b["input_ids"][0], rows[1]) and torch.equal(part_b["labels"][0], targets[1])
    # a decoder mask, when given, decides the decoder side (its inputs shifted already)
    dec, dec_mask, _ = padded([2, 2], 3, gen=gen)
    (part,) = unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec,
                     "decoder_attention_mask": dec_mask}, encoder_decoder=True)
    assert part["input_ids"].shape == (2, 4) and torch.equal(part["decoder_input_ids"], dec[:, :2])
    # a decoder-only model's -100 labels are tokens it reads (a prompt left out of the loss)
    labels = ids.masked_fill(torch.arange(4) < 1, -100)
    (part,) = unpad({"input_ids": ids[:, :2], "attention_mask": mask[:, :2], "labels": labels[:, :2]})
    assert part["labels"].shape == (2, 2)


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_labels_of_a_row_go_with_their_row(gen, encoder_decoder):
    """Sequence classification: a class per row ([B]) or a multi-label vector ([B, C])."""
    ids, mask, rows = padded([3, 5], 6, gen=gen)
    for labels in (torch.tensor([1, 0]), torch.rand(2, 4, generator=gen)):
        parts = unpad({"input_ids": ids, "attention_mask": mask, "labels": labels}, encoder_decoder=encoder_decoder)
        assert [torch.equal(p["input_ids"][0], r) for p, r in zip(parts, rows)] == [True, True]
        assert torch.equal(torch.cat([p["labels"] for p in parts]), labels)


@pytest.mark.parametrize("side", ["right", "left"])
def test_vision_language_per_token_inputs_are_cut_with_the_tokens(side, gen):
    """Mllama's cross_attention_mask [B, L, images, tiles], Kosmos-2's image_embeds_position_mask
    and the Qwen-VL family's mm_token_type_ids [B, L] are per token: each row's are cut to its real
    tokens, as its ids are. (They went with their row whole: Mllama reads the first L_real
    entries, so a left-padded row's real tokens took the pad's zeros and lost their
    cross-attention in silence; Kosmos-2 failed on the shapes.)"""
    ids, mask, rows = padded([5, 3], 5, side, gen=gen)
    per_token = {"cross_attention_mask": mask[:, :, None, None].clone(),
                 "image_embeds_position_mask": (ids % 2) * mask, "mm_token_type_ids": (ids % 3) * mask}
    parts = unpad({"input_ids": ids, "attention_mask": mask, **per_token})
    for b, part in enumerate(parts):
        where = slice(0, len(rows[b])) if side == "right" else slice(5 - len(rows[b]), 5)
        assert torch.equal(part["input_ids"][0], rows[b])
        for key, value in per_token.items():
            assert torch.equal(part[key][0], value[b, where]), key
    assert parts[1]["cross_attention_mask"].eq(1).all()  # (the real tokens' images, not the pad's zeros)


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_encoders_per_token_inputs_are_cut_with_the_tokens(side, gen):
    """LayoutLM's bbox [B, L, 4], Longformer's and LED's global_attention_mask, XLM's langs, ERNIE's
    task_type_ids, RoCBert's shape and pronunciation ids, MarkupLM's xpaths [B, L, depth] and
    ERNIE 4.5 VL's moe_mm_token_type_ids are per token: cut with the ids. (They went with their
    row whole, and the model failed on a padded batch with "the size of tensor a (4) must match
    the size of tensor b (6)", naming no input.)"""
    import transformers

    ids, mask, rows = padded([6, 4], 6, side, gen=gen)
    per_token = {key: torch.randint(0, 9, (2, 6) + tail, generator=gen) for key, tail in (
        ("bbox", (4,)), ("global_attention_mask", ()), ("langs", ()), ("task_type_ids", ()),
        ("input_shape_ids", ()), ("input_pronunciation_ids", ()), ("xpath_tags_seq", (3,)),
        ("xpath_subs_seq", (3,)), ("moe_mm_token_type_ids", ()))}
    parts = unpad({"input_ids": ids, "attention_mask": mask, **per_token})
    for b, part in enumerate(parts):
        where = slice(0, len(rows[b])) if side == "right" else slice(6 - len(rows[b]), 6)
        for key, value in per_token.items():
            assert torch.equal(part[key][0], value[b, where]), key
    torch.manual_seed(0)
    model = transformers.LayoutLMModel(transformers.LayoutLMConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)).eval()
    bbox = torch.randint(0, 500, (2, 6, 4), generator=gen)
    bbox[..., 2:] += bbox[..., :2]
    with torch.no_grad():
        for b, part in enumerate(unpad({"input_ids": ids, "attention_mask": mask, "bbox": bbox}, model=model)):
            where = slice(0, len(rows[b])) if side == "right" else slice(6 - len(rows[b]), 6)
            alone = model(input_ids=ids[b:b + 1, where], bbox=bbox[b:b + 1, where]).last_hidden_state
            assert torch.allclose(model(**part).last_hidden_state, alone, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_attention_mask_is_cut_where_it_is_per_token(side, gen):
    """Idefics' image_attention_mask [B, L, images] (which images each token attends to) is per
    token: cut with the ids (it went with its row whole, and every padded batch failed with "the
    size of tensor a (4) must match the size of tensor b (6)"). The name's other shapes are no
    tokens' and go with their row, also where their second dim happens to be L: FLAVA's per patch
    [B, patches], Phi-4's per pixel [B, crops, H, W]."""
    import transformers

    ids, mask, rows = padded([6, 4], 6, side, gen=gen)
    for other in (torch.randint(0, 2, (2, 6), generator=gen), torch.randint(0, 2, (2, 6, 4, 4), generator=gen)):
        parts = unpad({"input_ids": ids, "attention_mask": mask, "image_attention_mask": other})
        assert [torch.equal(p["image_attention_mask"][0], other[b]) for b, p in enumerate(parts)] == [True, True]
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        cross_layer_interval=1, additional_vocab_size=0, perceiver_config={"use_resampler": False},
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "intermediate_size": 64})).eval()
    pixels = torch.randn(2, 2, 3, 16, 16, generator=gen)
    images = torch.randint(0, 2, (2, 6, 2), generator=gen) * mask[..., None]
    images[..., 0] = mask  # (every real token attends to an image)
    item = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_attention_mask": images}
    with torch.no_grad():
        for b, part in enumerate(unpad(item, model=model)):
            where = slice(0, len(rows[b])) if side == "right" else slice(6 - len(rows[b]), 6)
            assert torch.equal(part["image_attention_mask"][0], images[b, where])
            alone = model(input_ids=ids[b:b + 1, where], pixel_values=pixels[b:b + 1],
                          image_attention_mask=images[b:b + 1, where]).logits
            assert torch.allclose(model(**part).logits, alone, atol=1e-5)


def test_batches_without_padding_come_back_as_they_are(gen):
    item = {"input_ids": torch.randint(0, 9, (2, 3), generator=gen), "attention_mask": torch.ones(2, 3)}
    assert unpad(item)[0] is item
    tensor = torch.randn(2, 3)
    assert unpad(tensor)[0] is tensor and unpad((tensor,))[0][0] is tensor


def test_what_cannot_be_cut_is_refused(gen):
    ids, mask, _ = padded([2, 4], 4, gen=gen)
    with pytest.raises(ValueError, match=r"attention_mask of row 0 has zeros between its ones"):
        unpad({"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])})
    with pytest.raises(ValueError, match=r"'pixel_values' \(\(3, 3, 8, 8\)\) is not a tensor with one row"):
        unpad({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"'position_ids' has shape \(2, 3\), attention_mask \(2, 4\)"):
        unpad({"input_ids": ids, "attention_mask": mask, "position_ids": ids[:, :3]})
    with pytest.raises(ValueError, match="every row is padding"):
        unpad({"input_ids": ids, "attention_mask": torch.zeros_like(mask)})


# --------------------------------------------------------------------------- seeds of the draws


class WordTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + int(w) for w in text.split()]}


def test_text_windows_follow_the_seed():
    texts = [" ".join(str(i % 50) for i in range(k, k + 300)) for k in range(3)]

    def draw(seed):
        windows = text_windows(texts, WordTokenizer(), samples=6, seq_len=8, batch_size=2, seed=seed)
        return torch.cat([b["input_ids"] for b in windows])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_drawn_items_follow_the_seed():
    items = list(range(100))
    assert _drawn(items, 10, 4, 1, "x") == _drawn(items, 10, 4, 1, "x")
    assert _drawn(items, 10, 4, 1, "x") != _drawn(items, 10, 4, 2, "x")


def test_tasks_whose_names_collide_in_crc32_draw_apart_and_the_others_as_before(gen):
    """A task's seed was the CRC-32 of "{seed}/{task}": linear, it gave "plumless" and "buckeroo"
    one seed at every seed, so two such tasks reading the same files drew one sample. They now
    draw their own; tasks that collide with none keep the CRC-32 seed their runs drew with."""
    seed = int(torch.randint(0, 2 ** 31, (), generator=gen))
    assert zlib.crc32(f"{seed}/plumless".encode()) == zlib.crc32(f"{seed}/buckeroo".encode())
    seeds = task_seeds(seed, ["plumless", "math", "buckeroo"])
    assert seeds == task_seeds(seed, ["buckeroo", "plumless", "math"])  # (still not the order's)
    assert len(set(seeds.values())) == 3 and seeds["math"] == zlib.crc32(f"{seed}/math".encode())
    items = list(range(1000))
    assert _drawn(items, 8, 8, seeds["plumless"], "x") != _drawn(items, 8, 8, seeds["buckeroo"], "x")
    apart = ("plumless", "math")
    assert task_seeds(seed, apart) == {t: zlib.crc32(f"{seed}/{t}".encode()) for t in apart}
    assert task_seeds(seed, ["plumless"]) == {"plumless": seed}


def test_a_draws_seed_is_checked_as_the_quantizers_and_merges_check_it():
    """text_windows and the image and pair draws took numpy's integers to torch's generator,
    which refused them ('an integer is required'), and a seed past 64 bits ended there as
    'Overflow when unpacking long long'; numpy's integers are ints, the others refused by name."""
    import numpy as np

    texts = [" ".join(str(i % 50) for i in range(300))]

    def draw(seed):
        windows = text_windows(texts, WordTokenizer(), samples=6, seq_len=8, batch_size=2, seed=seed)
        return torch.cat([b["input_ids"] for b in windows])

    assert torch.equal(draw(np.int64(3)), draw(3))
    assert _drawn(range(100), 10, 4, np.int64(3), "x") == _drawn(range(100), 10, 4, 3, "x")
    for seed in (2 ** 64, 3.0):
        with pytest.raises(ValueError, match="seed must be an integer"):
            draw(seed)
        with pytest.raises(ValueError, match="seed must be an integer"):
            _drawn(range(100), 10, 4, seed, "x")


def test_sizes_of_numpy_draw_as_python_ints_do():
    """Numpy's integers for the sizes were checked but kept: a seq_len of np.int8 (a sweep's
    array of small widths) overflowed in numpy's arithmetic ('Python integer 301 out of bounds
    for int8'); they draw as the same Python ints."""
    import numpy as np

    texts = [" ".join(str(i % 50) for i in range(3000))]

    def draw(samples, seq_len, batch_size):
        windows = text_windows(texts, WordTokenizer(), samples=samples, seq_len=seq_len, batch_size=batch_size, seed=0)
        return [b["input_ids"] for b in windows]

    ours, theirs = draw(np.int8(3), np.int8(120), np.int8(2)), draw(3, 120, 2)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert _drawn(range(100), np.int8(10), np.int8(4), 1, "x") == _drawn(range(100), 10, 4, 1, "x")


def test_texts_of_fewer_tokens_than_the_windows_ask_are_warned_of():
    """A 20-token file for 8 windows of 16 tokens: the windows repeat the same tokens (the
    statistics of about one window), as fewer images or pairs than samples are warned of."""
    import warnings

    with pytest.warns(UserWarning, match=r"20 tokens, fewer than samples x seq_len = 8 x 16: the 8 windows overlap"):
        text_windows([" ".join(["3"] * 19)], WordTokenizer(), samples=8, seq_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_windows([" ".join(["3"] * 199)], WordTokenizer(), samples=8, seq_len=16)


def test_empty_documents_add_no_separator():
    """Rows of empty text (wikitext's blank lines, a third of its rows, written by to_json) added
    an EOS each: runs of EOS the model never reads; they add nothing."""
    (window,) = text_windows(["4 5", "", "", "6", ""], WordTokenizer(), samples=1, seq_len=5)
    assert window["input_ids"].tolist() == [[5, 6, 0, 7, 0]]


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_long_texts_are_tokenized_only_where_the_windows_are(monkeypatch):
    """Past FULL_TOKENIZATION_CHARS the texts are not tokenized whole (a 1 GB file took minutes
    and tens of GB for 128 windows): each window is tokenized from its own seeded place, and is
    still a run of the stream the whole texts make (documents joined with EOS, the last followed
    by the first); texts below the limit keep the windows of the whole stream."""
    import epmq.calibration as calibration

    class Counting(WordTokenizer):
        chars = 0

        def __call__(self, text, add_special_tokens=False):
            Counting.chars += len(text)
            return super().__call__(text)

    def joined(docs):  # the whole stream twice (the texts are a cycle), as text
        stream = []
        for doc in docs:
            tokens = [1 + int(w) for w in doc.split()]
            stream += tokens + ([] if tokens[-1:] == [0] else [0])  # ("-1" is EOS, 0)
        return " " + " ".join(map(str, stream + stream)) + " "

    def draw(docs, seed, samples=24):
        return torch.cat([b["input_ids"] for b in text_windows(docs, Counting(), samples=samples, seq_len=40,
                                                                batch_size=4, seed=seed)])

    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(str(int(w)) for w in torch.randint(0, 50, (n,), generator=g))  # noqa: E731
    long = [words(30000), words(3), words(5000), words(12)]
    short = [words(300), words(3), "\n" + words(7) + " -1\n", words(50), words(12) + " -1", words(25), "7", words(60)]
    below = [draw(docs, 3) for docs in (long, short)]
    monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", 100)
    Counting.chars = 0
    windows = draw(long, 3)
    assert Counting.chars < sum(map(len, long)) / 4  # (the windows' places, not the texts)
    assert windows.shape == (24, 40)
    for docs, samples in ((long, 24), (short, 300)):  # (windows across documents and the cycle's end)
        cyclic = joined(docs)
        assert all(" " + " ".join(map(str, row)) + " " in cyclic for row in draw(docs, 3, samples).tolist())
    assert torch.equal(draw(long, 3), windows) and not torch.equal(draw(long, 4), windows)
    monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", sum(map(len, long)))
    assert [torch.equal(draw(docs, 3), w) for docs, w in zip((long, short), below)] == [True, True]


def test_windows_need_two_tokens():
    with pytest.raises(ValueError, match="seq_len >= 2"):
        text_windows(["1 2 3"], WordTokenizer(), samples=1, seq_len=1)


def test_a_row_of_no_real_label_keeps_its_encoder_tokens():
    """An encoder-decoder row whose labels are all -100: its encoder tokens are real (a forward
    runs them), so the row stays, its decoder cut to the start position."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    parts = unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "labels": torch.tensor([[3, 4, -100], [-100, -100, -100]])}, encoder_decoder=True)
    assert sum(int(p["attention_mask"].sum()) for p in parts) == 8
    assert sorted(p["labels"].shape[1] for p in parts) == [1, 2]


def test_encoder_decoder_labels_padded_on_the_left(gen):
    """A tokenizer that pads on the left makes DataCollatorForSeq2Seq pad the labels there too:
    the leading -100 are padding (the decoder would read pad tokens after its start token),
    cut as the trailing ones are; beside decoder_input_ids, which cutting would rob of their
    start token, refused."""
    ids, mask, rows = padded([2, 4], 4, side="left", gen=gen)
    labels, _, targets = padded([3, 1], 5, side="left", pad=-100, gen=gen)
    (part_a, part_b) = unpad({"input_ids": ids, "attention_mask": mask, "labels": labels}, encoder_decoder=True)
    assert torch.equal(part_a["input_ids"][0], rows[0]) and torch.equal(part_a["labels"][0], targets[0])
    assert torch.equal(part_b["input_ids"][0], rows[1]) and torch.equal(part_b["labels"][0], targets[1])
    with pytest.raises(ValueError, match="padded on the left .* decoder_input_ids"):
        unpad({"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": labels.clamp(min=0)},
              encoder_decoder=True)


def test_decoder_inputs_the_model_derives_from_left_padded_labels_are_derived_again(gen):
    """DataCollatorForSeq2Seq(model=...) with a left-padding tokenizer gives decoder_input_ids,
    the model's own shift of the padded labels: derived again from the labels cut to their span
    (its start token first), the caller's labels left as they were; other decoder inputs are
    refused above."""
    import transformers

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0))
    ids, mask, rows = padded([2, 4], 4, side="left", gen=gen)
    labels, _, targets = padded([3, 1], 3, side="left", pad=-100, gen=gen)
    labels, targets = torch.where(labels < 0, labels, labels % 30), [t % 30 for t in targets]
    item = {"input_ids": ids % 30, "attention_mask": mask, "labels": labels,
            "decoder_input_ids": t5.prepare_decoder_input_ids_from_labels(labels=labels)}
    before = labels.clone()
    parts = unpad(item, encoder_decoder=True, model=t5)
    assert torch.equal(item["labels"], before)
    assert sorted(tuple(p["labels"][0].tolist()) for p in parts) == sorted(tuple(t.tolist()) for t in targets)
    for p in parts:  # (T5's start token is 0)
        start = torch.zeros(1, 1, dtype=torch.long)
        assert torch.equal(p["decoder_input_ids"], torch.cat([start, p["labels"][:, :-1]], 1))


def test_a_document_that_ends_with_eos_gets_no_second_one():
    """A conversation the chat template rendered may end with EOS (ChatML's "<|im_end|>\\n"):
    the stream the windows are cut from has one EOS there, not two in a row; one that ends with
    the EOS text and trailing whitespace counts too."""

    class Named(WordTokenizer):
        eos_token = "-1"

        def __call__(self, text, add_special_tokens=False):  # (a newline is a token of its own: 99)
            return super().__call__(text.replace("\n", " 98 "))

    (window,) = text_windows(["4 -1", "5"], WordTokenizer(), samples=1, seq_len=4)
    assert window["input_ids"].tolist() == [[5, 0, 6, 0]]
    (window,) = text_windows(["4 -1\n", "5"], Named(), samples=1, seq_len=5)
    assert window["input_ids"].tolist() == [[5, 0, 99, 6, 0]]


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_every_window_of_the_stream_may_be_drawn():
    """The windows start anywhere in the stream, its last window included (``randint``'s bound
    is exclusive: one short, the stream's last token was never calibrated on)."""
    windows = text_windows(["1 2 3 4"], WordTokenizer(), samples=64, seq_len=4, batch_size=64)
    starts = {row[0] for row in windows[0]["input_ids"].tolist()}
    assert starts == {2, 3}  # (the stream is 2 3 4 5 0: windows from its first or its second token)


def test_drawn_items_are_samples_in_batches():
    """``samples`` items, all different, in batches of ``batch_size``; all of them where fewer."""
    batches = _drawn(range(100), 10, 4, 0, "x")
    assert [len(b) for b in batches] == [4, 4, 2]
    assert len({i for b in batches for i in b}) == 10
    with pytest.warns(UserWarning, match="fewer than samples"):
        assert sorted(i for b in _drawn(range(5), 10, 4, 0, "x") for i in b) == list(range(5))


def test_parquet_texts_are_read_a_row_group_at_a_time(tmp_path):
    """A ``.parquet`` file's rows are turned into texts a row group at a time: read as one table,
    the whole text column was in Arrow's memory beside the Python strings made of it (a hub
    dataset's 280M characters peaked at 840 MB), and Arrow's pool kept those pages after (530 MB
    of them, for the rest of the run)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    texts = [f"document {i} " + "word " * 2000 for i in range(400)]
    pq.write_table(pa.table({"text": texts, "url": [f"u{i}" for i in range(400)]}), tmp_path / "c.parquet",
                   row_group_size=20)
    # (Arrow's peak in a process of its own: its pool's high-water mark is the process's)
    script = ("import sys, pyarrow as pa; from epmq.calibration import read_texts; "
              "texts = read_texts(sys.argv[1]); print(len(texts), sum(map(len, texts)), "
              "pa.default_memory_pool().max_memory())")
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.parquet")], capture_output=True, text=True,
                          env=env, check=True)
    rows, chars, peak = map(int, done.stdout.split())
    assert (rows, chars) == (len(texts), sum(map(len, texts)))
    assert 0 < peak < chars / 4, (peak, chars)


def test_read_audio_scales_mixes_and_resamples_as_pipelines_load_audio(tmp_path):
    """WAV files as transformers' pipelines load them (librosa): PCM integers scaled to [-1, 1)
    (8-bit unsigned, centred on 128), channels averaged to mono, and resampled to the feature
    extractor's rate; an empty or damaged file is refused naming it."""
    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((800, 2)) * 3000).astype(np.int16)
    wavfile.write(tmp_path / "stereo.wav", 16000, stereo)
    np.testing.assert_allclose(read_audio(tmp_path / "stereo.wav", 16000), stereo.astype(np.float64).mean(1) / 32768,
                               rtol=1e-6)
    wavfile.write(tmp_path / "u8.wav", 16000, np.array([0, 128, 255], dtype=np.uint8))
    np.testing.assert_allclose(read_audio(tmp_path / "u8.wav", 16000), [-1.0, 0.0, 127 / 128])
    tone = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000 * 0.25).astype(np.float32)  # (a 110 Hz tone at 8 kHz)
    wavfile.write(tmp_path / "8k.wav", 8000, tone)
    up = read_audio(tmp_path / "8k.wav", 16000)
    assert up.dtype == np.float32 and len(up) == 16000
    np.testing.assert_allclose(up[4000:12000:2], tone[2000:6000], atol=1e-3)  # (the same tone, twice the samples)
    (tmp_path / "cut.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.raises(ValueError, match="cannot read audio .*cut.wav"):
        read_audio(tmp_path / "cut.wav", 16000)
    wavfile.write(tmp_path / "empty.wav", 16000, np.zeros(0, dtype=np.int16))
    with pytest.raises(ValueError, match="empty.wav holds no samples"):
        read_audio(tmp_path / "empty.wav", 16000)


def test_a_long_recording_is_cut_before_it_is_converted_and_resampled(tmp_path, monkeypatch):
    """A recording past max_seconds was read whole, turned to float32, mixed to mono and resampled
    before its window was cut: 10 minutes at 44.1 kHz stereo (106 MB on disk) took 583 MB above
    the start at the peak for its 30 s, an hour's 3.5 GB. The window is cut from the file's own
    samples (192 MB); it is the recording's 30 s, at the feature extractor's rate."""
    import numpy as np
    import scipy.signal
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    rate, fed = 8000, []
    tone = np.sin(2 * np.pi * 110 * np.arange(40 * rate) / rate)  # (a 110 Hz tone: any window looks the same)
    wavfile.write(tmp_path / "long.wav", rate, (np.stack([tone, tone], 1) * 16000).astype(np.int16))
    resample = scipy.signal.resample_poly
    monkeypatch.setattr(scipy.signal, "resample_poly", lambda x, *a, **kw: fed.append(len(x)) or resample(x, *a, **kw))
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False)
    values = audio_batches([tmp_path / "long.wav"], extractor, samples=1, max_seconds=30)[0]["input_values"][0]
    assert values.shape == (30 * 16000,)
    assert fed and max(fed) <= 30 * rate + 1, fed  # (the window's samples, not the recording's 40 s)
    # (a window of the tone, at 16 kHz: one period is 16000 / 110 samples, and its amplitude is the tone's)
    assert abs(float(values[1000:-1000].abs().max()) - 16000 / 32768) < 1e-2


def test_audio_files_of_a_hub_datasets_parquet_snapshot_are_named(tmp_path):
    """An HF hub audio dataset's snapshot keeps its clips inside .parquet files (an audio column of
    encoded bytes): given as a task's directory it was refused as holding 'no audio files (.wav)',
    which said nothing of the files it does hold; they are named, with what to do."""
    from epmq.calibration import audio_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"no audio files \(\.wav[^)]*\) under the directory; it holds 1 \.parquet "
                                         r"file.*train-00000-of-00001.parquet.*write its clips out as \.wav"):
        audio_files(tmp_path)


@pytest.mark.parametrize("max_seconds", [float("nan"), float("inf"), -1.0, 0, 1e-9, "30", True, 1e15, 1.7e308])
def test_audio_batches_refuses_a_max_seconds_that_is_no_length(tmp_path, max_seconds):
    """max_seconds was not checked: NaN and inf ended in int()'s bare 'cannot convert float NaN to
    integer', a string ('30' from a YAML or a command line) was repeated by the rate into a number
    past int()'s digits, and 0, a negative or a length under one sample cut every clip to one
    sample, silently. Refused, naming max_seconds. So is one of more samples than an int64 holds:
    1.7e308 s ended in int()'s bare 'cannot convert float infinity to integer', and 1e15 s (1.6e19
    samples) was taken, but the model's frames of it overflowed torch's int64, so a clip too short
    for one frame was no longer left out."""
    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    wavfile.write(tmp_path / "a.wav", 16000, (np.ones(1600) * 1000).astype(np.int16))
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False)
    with pytest.raises(ValueError, match="max_seconds must be"):
        audio_batches([tmp_path / "a.wav"], extractor, samples=1, max_seconds=max_seconds)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_read_audio_refuses_a_float_wav_holding_samples_that_are_no_number(tmp_path, bad):
    """A float WAV (a DAW's or a model's export) holding NaN or inf samples was read as they were,
    so every Hessian of a batch with it was NaN, silently; refused naming the file."""
    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    wavfile.write(tmp_path / "clip.wav", 16000, np.array([0.1, bad, -0.2, 0.0], dtype=np.float32))
    with pytest.raises(ValueError, match=r"audio .*clip\.wav holds 1 sample that is not a finite number"):
        read_audio(tmp_path / "clip.wav", 16000)
    wavfile.write(tmp_path / "fine.wav", 16000, np.array([0.1, 0.3, -0.2, 0.0], dtype=np.float32))
    np.testing.assert_allclose(read_audio(tmp_path / "fine.wav", 16000), [0.1, 0.3, -0.2, 0.0])


@pytest.mark.parametrize("rate", [0, -16000])
def test_audio_batches_refuses_a_feature_extractor_rate_that_is_no_rate(tmp_path, rate):
    """A feature extractor whose sampling_rate is 0 (a preprocessor_config.json written wrong) ended
    in Python's bare 'ZeroDivisionError: division by zero', and a negative one was refused as a
    max_seconds 'at least one sample at -16000 Hz (-6.25e-05 s)', the max_seconds given being fine;
    refused naming the extractor's sampling_rate."""
    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    wavfile.write(tmp_path / "a.wav", 16000, (np.ones(1600) * 1000).astype(np.int16))
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False)
    extractor.sampling_rate = rate
    with pytest.raises(ValueError, match=rf"Wav2Vec2FeatureExtractor's sampling_rate must be a positive number of "
                                         rf"samples a second, got {rate}"):
        audio_batches([tmp_path / "a.wav"], extractor, samples=1)


def test_audio_batches_reads_a_whole_float_rate_as_its_integer(tmp_path):
    """A feature extractor whose sampling_rate is a float (16000.0: a preprocessor_config.json written by a
    tool that writes numbers so) was refused as 'the feature extractor ... names no sampling_rate to read the
    audio at', where it names one; read at 16000 as 16000 is, a rate that is no whole number refused naming it."""
    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    wavfile.write(tmp_path / "a.wav", 8000, (np.sin(np.arange(800) / 5) * 1000).astype(np.int16))
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False)
    (want,) = audio_batches([tmp_path / "a.wav"], extractor, samples=1)
    extractor.sampling_rate = 16000.0
    (got,) = audio_batches([tmp_path / "a.wav"], extractor, samples=1)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    extractor.sampling_rate = 16000.5
    with pytest.raises(ValueError, match=r"Wav2Vec2FeatureExtractor's sampling_rate must be a whole number of "
                                         r"samples a second, got 16000\.5"):
        audio_batches([tmp_path / "a.wav"], extractor, samples=1)


def test_read_audio_refuses_a_rate_to_read_at_that_is_no_rate(tmp_path):
    """read_audio's sampling_rate of 0 or a negative one ended in scipy's bare 'up and down must be >= 1', a
    string in numpy's "ufunc 'floor_divide' not supported", and 22050.5 was read at a rate of its own making in
    silence; refused naming it, a whole float (16000.0) read as its integer."""
    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    wavfile.write(tmp_path / "a.wav", 8000, (np.sin(np.arange(800) / 5) * 1000).astype(np.int16))
    np.testing.assert_array_equal(read_audio(tmp_path / "a.wav", 16000.0), read_audio(tmp_path / "a.wav", 16000))
    for rate in (0, -16000, "16000", 22050.5, float("nan"), True):
        with pytest.raises(ValueError, match=rf"sampling_rate must be a positive whole number of samples a second, "
                                             rf"got {re.escape(repr(rate))}"):
            read_audio(tmp_path / "a.wav", rate)


def test_read_audio_refuses_a_wav_whose_header_says_a_rate_of_zero(tmp_path):
    """A WAV whose header says 0 samples a second (a damaged header) ended in scipy's bare
    'up and down must be >= 1' from resampling it, naming no file; refused naming the file."""
    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    wavfile.write(tmp_path / "zero.wav", 0, (np.ones(100) * 1000).astype(np.int16))
    with pytest.raises(ValueError, match=r"cannot read audio .*zero\.wav: its header says 0 samples a second"):
        read_audio(tmp_path / "zero.wav", 16000)


class _SoundFile:
    """A stand-in of soundfile (not installed here) reading the WAV bytes a test writes under a
    .flac name, as soundfile reads a FLAC: info's samplerate and frames, read's float32 samples of
    [start, stop) scaled to [-1, 1), mono as one dimension. ``read`` records the frames it gives."""

    def __init__(self):
        self.read_frames = []

    def info(self, path):
        from types import SimpleNamespace

        from scipy.io import wavfile

        rate, samples = wavfile.read(path)
        return SimpleNamespace(samplerate=rate, frames=len(samples), channels=1 if samples.ndim == 1 else 2)

    def read(self, path, start=0, stop=None, dtype="float64", always_2d=False):
        import numpy as np
        from scipy.io import wavfile

        rate, samples = wavfile.read(path)
        samples = samples[start:stop]
        self.read_frames.append(len(samples))
        return (samples / np.float32(32768)).astype(dtype), rate


def test_flac_and_other_formats_are_read_with_soundfile_where_it_is_installed(tmp_path, monkeypatch):
    """Only .wav was read: a folder of FLAC clips was refused, and one of WAV and FLAC clips gave
    its WAV alone, the FLAC left out in silence. With soundfile installed its formats are read
    (scaled, mixed, resampled and cut as WAV is: only the window's frames are read); without it,
    they are refused naming the file and the package, and formats it cannot read naming the file."""
    import sys

    import numpy as np
    import torch
    from scipy.io import wavfile

    from epmq.calibration import audio_files, read_audio

    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((8000, 2)) * 3000).astype(np.int16)
    (tmp_path / "d").mkdir()
    wavfile.write(tmp_path / "d" / "a.wav", 8000, stereo)
    wavfile.write(tmp_path / "d" / "b.flac", 8000, stereo)  # (WAV bytes, which the stand-in reads)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # (not installed: import soundfile raises ImportError)
    with pytest.raises(ValueError, match=r"b\.flac.*soundfile.*pip install soundfile"):
        audio_files(tmp_path / "d")
    with pytest.raises(ValueError, match=r"b\.flac.*soundfile.*pip install soundfile"):
        audio_files(tmp_path / "d" / "b.flac")
    with pytest.raises(ValueError, match=r"cannot read audio .*b\.flac.*pip install soundfile"):
        read_audio(tmp_path / "d" / "b.flac", 16000)
    soundfile = _SoundFile()
    monkeypatch.setitem(sys.modules, "soundfile", soundfile)
    assert audio_files(tmp_path / "d") == [tmp_path / "d" / "a.wav", tmp_path / "d" / "b.flac"]
    np.testing.assert_array_equal(read_audio(tmp_path / "d" / "b.flac", 16000),
                                  read_audio(tmp_path / "d" / "a.wav", 16000))
    windows = [read_audio(tmp_path / "d" / name, 16000, longest=4000, generator=torch.Generator().manual_seed(3))
               for name in ("a.wav", "b.flac")]
    np.testing.assert_array_equal(*windows)
    assert len(windows[0]) == 4000 and soundfile.read_frames[-1] == 2000  # (the window's 0.25 s at 8 kHz)
    (tmp_path / "d" / "c.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A ")
    with pytest.raises(ValueError, match=r"c\.m4a.*convert them to \.wav"):
        audio_files(tmp_path / "d")


def test_flac_written_by_the_real_soundfile_reads_as_the_same_samples_in_wav(tmp_path):
    """The stand-in above reads WAV bytes; this writes a lossless FLAC with soundfile itself (the
    test extra installs it) and reads it back as the WAV of the same samples reads: scaled,
    mixed to mono, resampled, and its window cut at the same place."""
    soundfile = pytest.importorskip("soundfile")
    import numpy as np
    import torch
    from scipy.io import wavfile

    from epmq.calibration import audio_files, read_audio

    stereo = (np.random.default_rng(1).standard_normal((22050, 2)) * 3000).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", 22050, stereo)
    soundfile.write(tmp_path / "b.flac", stereo, 22050, subtype="PCM_16")
    assert audio_files(tmp_path) == [tmp_path / "a.wav", tmp_path / "b.flac"]
    wav, flac = (read_audio(tmp_path / name, 16000) for name in ("a.wav", "b.flac"))
    assert flac.dtype == np.float32 and flac.shape == wav.shape == (16000,)
    np.testing.assert_allclose(flac, wav, atol=1e-6)
    windows = [read_audio(tmp_path / name, 16000, longest=4000, generator=torch.Generator().manual_seed(5))
               for name in ("a.wav", "b.flac")]
    np.testing.assert_allclose(*windows, atol=1e-6)


def test_clips_a_feature_extractor_pads_to_its_window_are_warned_of_when_mostly_padding(tmp_path):
    """Whisper's feature extractor pads every clip to its 30 s (padding='max_length', which its
    encoder requires), and its features have no mask to cut them by: a draw of 1 s clips (speech
    commands) was calibrated on 97% padding, in silence. Warned, with the share, where the clips
    drawn hold less than half of the window they are padded to; clips near it are not."""
    import warnings

    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    rng = np.random.default_rng(0)
    for name, seconds in (("short.wav", 1), ("long.wav", 25)):
        wavfile.write(tmp_path / name, 16000, (rng.standard_normal(seconds * 16000) * 3000).astype(np.int16))
    extractor = transformers.WhisperFeatureExtractor()
    with pytest.warns(UserWarning, match=r"calibration: the 1 clip drawn holds 1 s of audio, which "
                                         r"WhisperFeatureExtractor pads each to its 30 s: 97% of the frames "
                                         r"calibrated on are padding"):
        batches = audio_batches([tmp_path / "short.wav"], extractor, samples=1)
    assert batches[0]["input_features"].shape == (1, 80, 3000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio_batches([tmp_path / "long.wav"], extractor, samples=1)


def test_clips_an_ast_extractor_pads_to_its_frames_are_warned_of_when_mostly_padding(tmp_path):
    """AST's feature extractor pads (or cuts) every clip's filter bank to its max_length frames,
    a frame every 10 ms (1024: 10.24 s), with no mask, as Whisper's pads to its 30 s, but only
    Whisper's was warned of: 1 s clips calibrated on 90% padding, in silence. Its window is read
    from the extractor's max_length and rate (a tiny one here: 100 frames, 1 s at 16 kHz)."""
    import warnings

    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    rng = np.random.default_rng(0)
    for name, seconds in (("short.wav", 0.2), ("long.wav", 3)):
        wavfile.write(tmp_path / name, 16000, (rng.standard_normal(int(seconds * 16000)) * 3000).astype(np.int16))
    extractor = transformers.ASTFeatureExtractor(max_length=100, num_mel_bins=16)
    with pytest.warns(UserWarning, match=r"calibration: the 1 clip drawn holds 0.2 s of audio, which "
                                         r"ASTFeatureExtractor pads each to its 1 s: 80% of the frames "
                                         r"calibrated on are padding"):
        batches = audio_batches([tmp_path / "short.wav"], extractor, samples=1)
    assert batches[0]["input_values"].shape == (1, 100, 16) and "attention_mask" not in batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio_batches([tmp_path / "long.wav"], extractor, samples=1)


def test_a_long_wav_is_not_read_whole_for_its_window(tmp_path):
    """read_audio read a WAV file whole (scipy) before cutting its window: an hour's recording at
    44.1 kHz stereo took its 635 MB in memory for 30 s of it. The file is mapped and only the
    window's samples are read (a 24-bit file, which scipy cannot map, is still read whole), the
    same window as before."""
    import tracemalloc

    import numpy as np
    import scipy.signal  # noqa: F401 (imported by read_audio: not counted in its peak)
    import torch
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    samples = (np.random.default_rng(0).standard_normal((16000 * 60, 2)) * 3000).astype(np.int16)  # (3.8 MB)
    wavfile.write(tmp_path / "long.wav", 16000, samples)
    tracemalloc.start()
    try:
        window = read_audio(tmp_path / "long.wav", 16000, longest=16000, generator=torch.Generator().manual_seed(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < samples.nbytes / 8, (peak, samples.nbytes)
    start = int(torch.randint(len(samples) - 16000 + 1, (1,), generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(window, samples[start:start + 16000].astype(np.float64).mean(1) / 32768, rtol=1e-6)


def test_read_audio_names_the_file_of_a_truncated_wav(tmp_path):
    """A WAV cut short (a copy interrupted: its header says more samples than the file holds) was
    read with scipy's bare 'Reached EOF prematurely; finished at ... bytes, expected ... bytes from
    header', naming no file, among a draw of 128; the warning names the file and what was read."""
    import warnings

    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    wavfile.write(tmp_path / "whole.wav", 16000, (np.ones(1600) * 1000).astype(np.int16))
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:44 + 2 * 800])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_audio(tmp_path / "cut.wav", 16000)
    assert len(samples) == 800
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "cut.wav" in messages[0] and "cut short" in messages[0] and "the 800 samples it holds" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_audio(tmp_path / "whole.wav", 16000)) == 1600


def test_read_audio_warns_of_a_float_wav_far_past_full_scale(tmp_path):
    """A float WAV holding its PCM integers as floats (int16 samples cast to float32 and written:
    a peak of 30000 where full scale is 1) was read as it was, in silence, so Whisper's log-mel
    features and every Hessian of its clips were those of audio 90 dB too loud; it is read as
    pipelines read it, with a warning naming the file, its peak and the scale expected. A float
    WAV a little past full scale (a resampler's overshoot) is read in silence."""
    import warnings

    import numpy as np
    from scipy.io import wavfile

    from epmq.calibration import read_audio

    loud = (np.sin(np.arange(1600) / 5.0) * 30000).astype(np.float32)
    wavfile.write(tmp_path / "loud.wav", 16000, loud)
    with pytest.warns(UserWarning, match=r"audio .*loud\.wav: its float samples reach 3\d{4}(\.\d+)?, .*\[-1, 1\]"):
        samples = read_audio(tmp_path / "loud.wav", 16000)
    np.testing.assert_array_equal(samples, loud)
    wavfile.write(tmp_path / "over.wav", 16000, np.array([0.5, 1.05, -1.02, 0.0], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(read_audio(tmp_path / "over.wav", 16000), [0.5, 1.05, -1.02, 0.0])


def test_calibration_trees_follow_symlinked_folders(tmp_path):
    """A calibration folder whose class folders are symlinks (ln -s /data/imagenet/n01440764
    calib/, as ImageFolder layouts are often made) had them skipped: pathlib's rglob does not
    follow them, so a tree of symlinked folders alone was refused as holding 'no image files',
    and one beside a real folder was calibrated on the real one's images alone, in silence. They
    are followed, as torchvision's ImageFolder follows them, each folder read once (a link back
    to a folder above is not walked again), the files named by their path under the folder."""
    import numpy as np
    from PIL import Image

    from epmq.calibration import image_files, read_texts

    store = tmp_path / "store"
    for name in ("cats", "dogs"):
        (store / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(store / name / f"{name}1.png")
    tree = tmp_path / "calib"
    (tree / "birds").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tree / "birds" / "birds1.png")
    (tree / "cats").symlink_to(store / "cats", target_is_directory=True)
    (tree / "birds" / "up").symlink_to(tree, target_is_directory=True)  # (a cycle)
    assert image_files(tree) == [tree / "birds" / "birds1.png", tree / "cats" / "cats1.png"]
    links = tmp_path / "links"
    links.mkdir()
    (links / "dogs").symlink_to(store / "dogs", target_is_directory=True)
    assert image_files(links) == [links / "dogs" / "dogs1.png"]
    texts = tmp_path / "texts"
    (store / "docs").mkdir()
    (store / "docs" / "a.txt").write_text("one doc")
    texts.mkdir()
    (texts / "docs").symlink_to(store / "docs", target_is_directory=True)
    assert read_texts(texts) == ["one doc"]


@pytest.mark.parametrize("whole", [True, False])
def test_windows_of_tokens_the_tokenizer_does_not_know_are_warned_of_by_their_file(tmp_path, monkeypatch, whole):
    """Texts the tokenizer has no tokens for (another language or script than its vocabulary's: a word-level or
    T5 tokenizer on Chinese) became windows of <unk> alone, one token's statistics calibrated on in silence; the
    share of such tokens is warned of, naming the files the windows of them are drawn from. Windows of known
    words are not warned of."""
    import warnings

    import epmq.calibration as calibration
    from epmq.benches.tiny import WORDS, word_tokenizer
    from epmq.calibration import read_texts

    tokenizer = word_tokenizer(tmp_path / "tok")
    if not whole:  # (the texts tokenized only where the windows are)
        monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", 100)
    g = torch.Generator().manual_seed(0)
    english = " ".join(WORDS[int(i)] for i in torch.randint(0, 20, (3000,), generator=g))
    (tmp_path / "en.txt").write_text(english, encoding="utf-8")
    (tmp_path / "zh.txt").write_text(" ".join(["猫坐在垫子上", "电影很好看"] * 1500), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_windows(read_texts(tmp_path / "en.txt", stream=True), tokenizer, samples=8, seq_len=32)
    for files, share in (([tmp_path / "zh.txt"], "100%"), ([tmp_path / "en.txt", tmp_path / "zh.txt"], None)):
        with pytest.warns(UserWarning, match=r"calibration: (\d+)% of the 256 tokens of the windows are the "
                                             r"tokenizer's unknown or padding token.*zh\.txt") as said:
            text_windows(read_texts(files, stream=True), tokenizer, samples=8, seq_len=32)
        (w,) = [w for w in said if "unknown" in str(w.message)]
        assert "en.txt" not in str(w.message)
        assert share is None or f" {share} of" in str(w.message)


def test_documents_that_are_no_text_are_refused_by_their_place():
    """A document that is no str (a dataset's row, {"text": ...}, as a user's own loop gives them; None; bytes;
    a list of words) ended in "'dict' object has no attribute 'text'" or "object of type 'NoneType' has no
    len()", naming neither the document nor what a document must be; refused by its place and type."""
    for texts, got in ((["4 5", {"text": "6 7"}], r"texts\[1\] must be a document \(a str\), got dict .*read_texts"),
                       (["4 5", None], r"texts\[1\] must be a document \(a str\), got NoneType"),
                       ([b"4 5"], r"texts\[0\] must be a document \(a str\), got bytes"),
                       ((t for t in [["4", "5"]]), r"texts\[0\] must be a document \(a str\), got list")):
        with pytest.raises(TypeError, match=got):
            text_windows(texts, WordTokenizer(), samples=1, seq_len=2)


def test_pairs_of_tokens_the_tokenizer_does_not_know_are_warned_of_by_their_record(tmp_path):
    """As texts' windows: input/target pairs the tokenizer has no tokens for (T5's vocabulary given Chinese)
    were <unk> alone, calibrated on in silence; warned of with their share, naming the records."""
    import json
    import warnings

    from epmq.benches.tiny import word_tokenizer
    from epmq.calibration import pair_batches, read_pairs

    tokenizer = word_tokenizer(tmp_path / "tok")
    lines = [{"input": "the cat sat on the mat", "target": "a dog ran"}] * 6
    (tmp_path / "en.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    (tmp_path / "zh.jsonl").write_text(json.dumps({"input": "猫 坐 在 垫子 上", "target": "狗 跑"}), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair_batches(read_pairs(tmp_path / "en.jsonl", stream=True), tokenizer, samples=6, seq_len=16)
        pair_batches(read_pairs([tmp_path / "en.jsonl", tmp_path / "zh.jsonl"], stream=True), tokenizer, samples=7,
                     seq_len=16)  # (one pair of seven: a sixth of the tokens)
    with pytest.warns(UserWarning, match=r"100% of the 7 tokens of the pairs are the tokenizer's unknown or padding "
                                         r"token, the pairs mostly of them drawn from .*zh\.jsonl:1"):
        pair_batches(read_pairs(tmp_path / "zh.jsonl", stream=True), tokenizer, samples=1, seq_len=16)
    with pytest.warns(UserWarning, match=r"100% of the 3 tokens .* drawn from the pair '猫 坐' -> '狗'"):
        pair_batches([("猫 坐", "狗")], tokenizer, samples=1, seq_len=16)


@pytest.mark.parametrize("framed", [True, False])
def test_an_empty_wav_is_left_out_by_its_file_as_a_clip_too_short_for_a_frame(tmp_path, framed):
    """A WAV of no samples (a recording that failed) stopped the whole calibration ('holds no samples')
    where a clip of 1 sample, as unusable, was left out with a warning (README: one too short for a frame
    of the model left out, warned by its file). Both are left out, named, the rest calibrated on as read
    alone; a draw of nothing but such files is refused naming them."""
    import numpy as np
    import transformers
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(1600) * 3000).astype(np.int16)
    wavfile.write(tmp_path / "empty.wav", 16000, np.zeros(0, dtype=np.int16))
    wavfile.write(tmp_path / "one.wav", 16000, clip[:1])
    wavfile.write(tmp_path / "clip.wav", 16000, clip)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2))
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    files = [tmp_path / "empty.wav", tmp_path / "clip.wav"] + [tmp_path / "one.wav"] * framed
    with pytest.warns(UserWarning) as said:
        (batch,) = audio_batches(files, extractor, samples=3, batch_size=3, model=model if framed else None)
    left_out = sorted(Path(f).name for w in said for f in files if f"audio {f}:" in str(w.message)
                      and "left out" in str(w.message))
    assert left_out == sorted(f.name for f in files if f.name != "clip.wav")
    values = clip.astype(np.float64) / 32768
    want = (values - values.mean()) / np.sqrt(values.var() + 1e-7)  # (the extractor's zero-mean, unit-variance)
    np.testing.assert_allclose(batch["input_values"].numpy(), want[None], atol=1e-5)
    with pytest.warns(UserWarning, match="left out"), pytest.raises(ValueError, match=r"every audio file drawn .*"
                                                                                      r"empty\.wav"):
        audio_batches([tmp_path / "empty.wav"] + [tmp_path / "one.wav"] * framed, extractor, samples=2,
                      model=model if framed else None)


def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """A calibration source given as '' (a YAML "cars: ''", an unset variable: os.environ.get("CARS", ""))
    is Path('.'), and the images, clips or texts under the current directory (a project's plots,
    requirements.txt, tokenizer.json) were read as the task's calibration, in silence. Refused, naming it;
    epmq quantize's check names the task, before anything is read. ('.' is the current directory, as asked.)"""
    from PIL import Image

    from epmq.calibration import audio_files, image_files, read_pairs, read_texts
    from epmq.quantize_files import check_quantize

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "plot.png")
    (tmp_path / "clip.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("a b c", encoding="utf-8")
    (tmp_path / "pairs.jsonl").write_text('{"input": "a", "target": "b"}\n', encoding="utf-8")
    for read in (image_files, audio_files, read_texts, read_pairs):
        for empty in ("", [""]):
            with pytest.raises(ValueError, match="an empty path"):
                read(empty)
    assert image_files(".") == [Path("plot.png")]
    for given in ({"dtd": "dtd", "cars": ""}, {"cars": ["dtd", ""]}):
        with pytest.raises(ValueError, match=r"calibration\['cars'\] holds an empty path"):
            check_quantize("gptq", given, None)


def test_netpbm_and_jfif_images_are_read_as_torchvisions_image_folder_reads_them(tmp_path):
    """A task's folder of .pgm or .ppm images (a greyscale face or satellite set, as torchvision's ImageFolder and
    Pillow read them) was refused as holding 'no image files', and beside .png ones they were left out in silence;
    so were JPEGs named .jfif or .jpe (a browser's saves). They are read, converted to RGB as any other image."""
    import numpy as np
    import transformers
    from PIL import Image

    from epmq.calibration import image_batches, image_files

    rng = np.random.default_rng(0)
    grey, colour = rng.integers(0, 256, (12, 10), dtype=np.uint8), rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "face.pgm")
    Image.fromarray(colour).save(tmp_path / "field.ppm")
    Image.fromarray(colour).save(tmp_path / "photo.jfif", format="JPEG")
    Image.fromarray(colour).save(tmp_path / "photo2.JPE", format="JPEG")
    Image.fromarray(colour).save(tmp_path / "plain.png")
    assert [f.name for f in image_files(tmp_path)] == ["face.pgm", "field.ppm", "photo.jfif", "photo2.JPE",
                                                       "plain.png"]
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    for name, pixels in (("face.pgm", np.stack([grey] * 3, -1)), ("field.ppm", colour)):
        (batch,) = image_batches([tmp_path / name], processor, samples=1)
        want = processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(batch["pixel_values"], want)


def test_signed_16_bit_tiffs_keep_their_negatives(tmp_path, gen):
    """Pillow opens a TIFF of signed 16-bit samples (a CT slice's, a sensor's) as 32-bit 'I' holding its
    negatives, which the 16-bit scale cut to 0: every negative value one black, -32768 as 0 alike. Read
    on the format's range, offset as ImageJ reads it (-32768 black, 32767 white), by the benches' folders
    as by calibration; negative 'I' data of no such file, whose range is not known, is refused by name."""
    import numpy as np
    from PIL import Image, TiffImagePlugin

    from epmq.benches.data import FolderImages
    from epmq.calibration import image_batches, rgb_image

    class Pixels:  # (a processor handing back the RGB images it is given)
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(i).copy()) for i in images])}

    signed = np.array([[-32768, -1000, 0, 32767]], dtype=np.int16)
    signed = np.concatenate([signed, torch.randint(-32768, 32768, (3, 4), generator=gen).numpy().astype(np.int16)])
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[339] = 2  # (SampleFormat: signed integers)
    (tmp_path / "a").mkdir()
    Image.fromarray(signed.view(np.uint16)).save(tmp_path / "a" / "slice.tiff", tiffinfo=tags)
    with Image.open(tmp_path / "a" / "slice.tiff") as image:
        assert image.mode == "I" and np.array_equal(np.asarray(image), signed)  # (what Pillow gives)
    want = np.floor((signed.astype(np.float64) + 32768) / 65535 * 255 + 0.5).astype(np.uint8)
    (batch,) = image_batches([tmp_path / "a" / "slice.tiff"], Pixels(), samples=1)
    assert np.array_equal(batch["pixel_values"][0, ..., 0].numpy(), want)
    assert want[0].tolist() == [0, 124, 128, 255]
    image, _ = FolderImages(tmp_path, ["a"], "test")[0]
    assert np.array_equal(np.asarray(rgb_image(image))[..., 0], want)

    Image.fromarray(signed.astype(np.int32)).save(tmp_path / "wide.tiff")  # (signed 32-bit: its range not 16 bits')
    with pytest.raises(ValueError, match=r"wide\.tiff: an integer \(I\) image holds negative values \(down to "
                                         r"-32768\), where integer images are read as unsigned"):
        image_batches([tmp_path / "wide.tiff"], Pixels(), samples=1)


def test_signed_8_bit_tiffs_keep_their_order(tmp_path, gen):
    """Pillow opens a TIFF of signed 8-bit samples as 'L' of their bytes: -1 read as 255 (white), -128 as 128,
    above 127 (white before it): the image's dark half drawn brighter than its bright half. Offset to
    unsigned as the 16-bit ones are: -128 black, 127 white."""
    import numpy as np
    from PIL import Image, TiffImagePlugin

    from epmq.calibration import rgb_image, upright

    signed = np.concatenate([np.array([[-128, -1, 0, 127]], dtype=np.int8),
                             torch.randint(-128, 128, (3, 4), generator=gen).numpy().astype(np.int8)])
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[339] = 2  # (SampleFormat: signed integers)
    Image.fromarray(signed.view(np.uint8)).save(tmp_path / "signed.tiff", tiffinfo=tags)
    Image.fromarray(signed.view(np.uint8)).save(tmp_path / "bytes.tiff")  # (the same bytes, unsigned)
    with Image.open(tmp_path / "signed.tiff") as image:
        assert image.mode == "L"  # (what Pillow gives: the bytes)
        got = np.asarray(rgb_image(upright(image)))[..., 0]
    assert np.array_equal(got, (signed.astype(np.int16) + 128).astype(np.uint8))
    assert got[0].tolist() == [0, 127, 128, 255]
    with Image.open(tmp_path / "bytes.tiff") as image:
        assert np.array_equal(np.asarray(rgb_image(upright(image)))[..., 0], signed.view(np.uint8))


def test_image_files_of_formats_not_read_are_named_not_left_out_in_silence(tmp_path):
    """A phone's photos exported as .heic (or .heif, .jxl) beside .jpg ones were left out in silence, the
    calibration the .jpg ones' alone (audio's other formats are named); named, with what to do. .avif, which
    Pillow reads where built with libavif, is read there."""
    import numpy as np
    from PIL import Image, features

    from epmq.calibration import image_files

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "trip").mkdir()
    (tmp_path / "trip" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(ValueError, match=r"1 image file\(s\) under the directory \(.*IMG_0001\.HEIC, \.\.\.\) are "
                                         r"of a format epmq does not read beside its 1 it reads.*convert them"):
        image_files(tmp_path)
    (tmp_path / "trip" / "IMG_0001.HEIC").unlink()
    if features.check("avif"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "trip" / "a.avif")
        assert [f.name for f in image_files(tmp_path)] == ["plain.png", "a.avif"]


@pytest.mark.parametrize("kind, read, unread", [("image", "a.png", "IMG_0001.HEIC"), ("audio", "a.wav", "clip.m4a")])
def test_files_of_formats_not_read_are_refused_only_in_the_split_read(tmp_path, kind, read, unread):
    """A dataset's tree read for its train split (val/ beside it left out, with a warning) was refused for a
    .heic (an .m4a) in val/, which it never reads: the formats not read were looked for in the whole tree.
    They are refused where they would be read, in train/."""
    from epmq import calibration

    files = getattr(calibration, f"{kind}_files")
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / read).write_bytes(b"")  # (listed, not read)
    (tmp_path / "val" / "cat" / unread).write_bytes(b"")
    with pytest.warns(UserWarning, match=rf"calibrating on train \(1 file\), leaving out the 1 other "
                                         rf"\(val/cat/{re.escape(unread)}\)"):
        assert files(tmp_path) == [tmp_path / "train" / "cat" / read]
    (tmp_path / "train" / "cat" / f"b{Path(unread).suffix}").write_bytes(b"")
    refused = (rf"1 {kind} file\(s\) under the directory \(.*train/cat/b{re.escape(Path(unread).suffix)}, \.\.\.\) "
               rf"are of a format epmq does not read beside its 1 it reads")
    with pytest.warns(UserWarning, match="leaving out"), pytest.raises(ValueError, match=refused):
        files(tmp_path)


def test_image_files_of_a_hub_datasets_parquet_snapshot_are_named(tmp_path):
    """An HF hub image dataset's snapshot (cifar10's plain_text/train-*.parquet, FusionBench's tasks) keeps its
    images inside .parquet files: given as a task's directory it was refused as holding 'no image files', which
    said nothing of the files it holds, where audio's snapshot is named; named, with what to do."""
    from epmq.calibration import image_files

    (tmp_path / "plain_text").mkdir()
    (tmp_path / "plain_text" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"no image files \(\.png[^)]*\) under the directory; it holds 1 \.parquet "
                                         r"file.*train-00000-of-00001.parquet.*write its images out"):
        image_files(tmp_path)


def _wav_data_chunk(path):
    """The bytes of a WAV file's data chunk."""
    import struct

    raw, at = Path(path).read_bytes(), 12
    while at < len(raw):
        tag, size = raw[at:at + 4], struct.unpack("<I", raw[at + 4:at + 8])[0]
        if tag == b"data":
            return raw[at + 8:at + 8 + size]
        at += 8 + size + size % 2
    raise AssertionError(f"{path}: no data chunk")


def test_a_mu_law_wav_is_read_with_soundfile_and_named_without_it(tmp_path, monkeypatch):
    """A WAV of G.711 mu-law or A-law samples (telephone speech) or ADPCM was refused with scipy's
    'Unknown wave file format: MULAW. Supported formats: PCM, IEEE_FLOAT', though soundfile, installed
    (epmq[audio]) for FLAC and the rest, reads it; read with it, as the 16-bit PCM its codes stand for,
    and, without soundfile, refused naming the file and what to do."""
    soundfile = pytest.importorskip("soundfile")
    import numpy as np

    from epmq.calibration import audio_batches, read_audio

    tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(4000) / 8000)
    soundfile.write(tmp_path / "call.wav", tone, 8000, subtype="ULAW")
    codes = ~np.frombuffer(_wav_data_chunk(tmp_path / "call.wav"), dtype=np.uint8)  # (G.711: stored inverted)
    exponent, mantissa = (codes >> 4) & 7, (codes & 15).astype(np.int32)
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    want = np.where(codes & 0x80, -magnitude, magnitude) / 32768
    np.testing.assert_allclose(read_audio(tmp_path / "call.wav", 8000), want, atol=1e-7)
    assert np.abs(want - tone).max() < 0.02  # (the tone itself, to mu-law's steps)
    soundfile.write(tmp_path / "alaw.wav", tone, 8000, subtype="ALAW")
    np.testing.assert_allclose(read_audio(tmp_path / "alaw.wav", 16000)[::2], tone, atol=0.03)  # (resampled)
    (batch,) = audio_batches([tmp_path / "call.wav"], _raw_extractor(8000), samples=1)
    np.testing.assert_allclose(batch["input_values"][0].numpy(), want, atol=1e-7)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # (soundfile not installed)
    with pytest.raises(ValueError, match=r"cannot read audio .*call\.wav: Unknown wave file format: MULAW.*"
                                         r"pip install soundfile.*or convert it to PCM"):
        read_audio(tmp_path / "call.wav", 8000)


def _raw_extractor(rate):
    import transformers

    return transformers.Wav2Vec2FeatureExtractor(sampling_rate=rate, do_normalize=False)


def test_texts_of_no_tokens_are_refused_naming_their_documents(tmp_path):
    """A task whose files are empty or blank (an export that wrote nothing, a JSON Lines file of empty
    texts) was refused as "calibration['math']: the texts have no tokens", naming none of them; the
    documents are named, by file or record."""
    from epmq.calibration import read_texts

    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n\n ", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"calibration\['math'\]: the texts have no tokens: its 2 documents "
                                         r"\(.*blank\.txt, .*empty\.txt\) are empty or blank"):
        text_windows(read_texts([tmp_path / "blank.txt", tmp_path / "empty.txt"], stream=True), WordTokenizer(),
                     samples=1, seq_len=2, what="calibration['math']")
    with pytest.raises(ValueError, match=r"its 2 documents \(.*rows\.jsonl:1, .*rows\.jsonl:2\) are empty"):
        text_windows(read_texts(tmp_path / "rows.jsonl", stream=True), WordTokenizer(), samples=1, seq_len=2)
    with pytest.raises(ValueError, match=r"the texts have no tokens: no documents were given"):
        text_windows([], WordTokenizer(), samples=1, seq_len=2)


def test_git_lfs_pointers_are_refused_as_such_not_read_as_the_files(tmp_path):
    """A dataset cloned without git-lfs (or before git lfs pull) holds pointers in place of its files: a .txt
    pointer was calibrated on as a document ('version https://git-lfs.github.com/spec/v1 oid sha256:...'), in
    silence, and an image's or a clip's was refused as 'cannot identify image file' or scipy's 'File format
    b'vers' not understood'. Each is refused naming the file as a pointer, with the remedy."""
    from epmq.calibration import audio_batches, image_batches, read_texts

    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daa"
               "a5e2ca24d17e2393\nsize 12345\n")
    for name in ("notes.txt", "rows.jsonl", "table.parquet", "photo.png", "clip.wav"):
        (tmp_path / name).write_text(pointer, encoding="utf-8")
    (tmp_path / "real.txt").write_text("4 5 6 7", encoding="utf-8")
    for name in ("notes.txt", "rows.jsonl", "table.parquet"):
        with pytest.raises(ValueError, match=rf"{name}: a Git LFS pointer, not the file.*git lfs pull, or hf download"):
            text_windows(read_texts([tmp_path / "real.txt", tmp_path / name], stream=True), WordTokenizer(),
                         samples=1, seq_len=2)
    with pytest.raises(ValueError, match=r"^calibration: .*photo\.png: a Git LFS pointer, not the file.*git lfs pull"):
        image_batches([tmp_path / "photo.png"], None, samples=1)
    with pytest.raises(ValueError, match=r"^calibration: .*clip\.wav: a Git LFS pointer, not the file.*git lfs pull"):
        audio_batches([tmp_path / "clip.wav"], _raw_extractor(16000), samples=1)


def test_links_to_nothing_in_a_tasks_folder_are_named_not_left_out(tmp_path):
    """A git-annex (DataLad) or DVC checkout whose content was not fetched holds links to nothing: they
    were left out in silence (a task's calibration of the few clips fetched), and a folder of nothing
    else was refused as holding 'no image files', though ls lists them. They are named, with the remedy."""
    import os

    from PIL import Image

    from epmq.calibration import audio_files, image_files, read_texts

    Image.new("RGB", (4, 4)).save(tmp_path / "fetched.png")
    for name in ("missing.png", "missing.wav", "missing.txt"):
        os.symlink(tmp_path / ".git" / "annex" / "objects" / name, tmp_path / name)
    for read, name in ((image_files, "missing.png"), (audio_files, "missing.wav"), (read_texts, "missing.txt")):
        with pytest.raises(ValueError, match=rf"1 file\(s\) under the directory \(.*{name}\) are links to nothing: "
                                             r".*git annex get"):
            read(tmp_path)


def test_an_image_the_image_processor_fails_on_is_named_by_its_file(tmp_path):
    """Qwen2-VL's processor refuses an image of aspect ratio past 200 (a panorama strip, a scanned
    receipt): image_batches ended in its bare 'absolute aspect ratio must be smaller than 200',
    naming none of the task's files; the error names the image's file, the processor's words kept."""
    import transformers
    from PIL import Image

    from epmq.calibration import image_batches

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "square.png")
    Image.new("RGB", (1000, 3), (10, 20, 30)).save(tmp_path / "strip.png")
    processor = transformers.Qwen2VLImageProcessor()
    with pytest.raises(ValueError, match=r"cars: the image processor Qwen2VLImageProcessor cannot take image "
                                         r".*strip\.png: absolute aspect ratio must be smaller than 200"):
        image_batches([tmp_path / "square.png", tmp_path / "strip.png"], processor, samples=2, batch_size=2,
                      what="cars")


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_json_file_among_a_tasks_files_is_left_out_by_name_as_an_empty_jsonl_is(tmp_path, stream):
    """An empty (0-byte) .json among a task's files (an export that wrote nothing) stopped the run as
    'not JSON (Expecting value: line 1 column 1 (char 0))', where an empty .jsonl was left out; each is left
    out with a warning naming it, the other files read."""
    import warnings

    from epmq.calibration import read_pairs, read_texts

    texts, pairs = tmp_path / "texts", tmp_path / "pairs"
    for folder in (texts, pairs):
        folder.mkdir()
        (folder / "empty.json").write_bytes(b"")
        (folder / "blank.jsonl").write_text("\n \n", encoding="utf-8")
    (texts / "rows.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n', encoding="utf-8")
    (pairs / "rows.jsonl").write_text('{"input": "a b", "target": "c"}\n', encoding="utf-8")
    for read, folder, want in ((read_texts, texts, ["a b c", "d e f"]), (read_pairs, pairs, [("a b", "c")])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = read(folder, stream=stream)
        assert [tuple(p) if read is read_pairs else (p if isinstance(p, str) else p.text()) for p in got] == want
        said = [str(w.message) for w in caught]
        for name in ("empty.json", "blank.jsonl"):
            assert any(f"{folder / name}: empty" in message and "left out" in message for message in said), said


@pytest.mark.parametrize("stream", [False, True])
def test_a_pairs_file_of_no_pairs_is_named(tmp_path, stream):
    """A task's pairs file that is empty (an export that wrote nothing) was refused by pair_batches as
    "calibration['math']: input/target pairs: none given", naming the task but not the file it read."""
    from epmq.calibration import read_pairs

    (tmp_path / "pairs.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no input/target pairs in .*pairs\.jsonl"):
        read_pairs(tmp_path / "pairs.jsonl", stream=stream)


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_file_of_no_documents_is_named(tmp_path, stream):
    """A task's .jsonl that holds no records (an export that wrote nothing) was refused by text_windows
    as "calibration['math']: the texts have no tokens: no documents were given", naming no file read."""
    from epmq.calibration import read_texts

    (tmp_path / "rows.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no texts in .*rows\.jsonl: its files hold none"):
        read_texts(tmp_path / "rows.jsonl", stream=stream)
