"""Quantizing a causal LM checkpoint from calibration texts: epmq.calibration,
epmq.quantize_checkpoint and ``epmq quantize`` (after ``epmq merge``)."""

import json
import logging
import os
import random
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
import transformers
import yaml

import epmq
from epmq.benches.tiny import WORDS, perturb, word_tokenizer
from epmq.calibration import (image_batches, image_files, pair_batches, position_limit, read_pairs, read_texts,
                              text_windows)
from epmq.cli import main
from epmq.quantize_files import REPORT_FILE


def tiny_llama(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def assert_quantize_model_equals(out, model, spec, batches, output, **kwargs):
    """The checkpoint ``out`` that quantize_checkpoint wrote, loaded, gives exactly the outputs
    of ``model`` quantized in memory by ``quantize_model`` on ``batches``; returns it loaded."""
    epmq.quantize_model(model, spec, calibration=batches, progress=False, **kwargs)
    loaded = epmq.load_quantized(out)
    for items in batches.values():
        with torch.no_grad():
            assert torch.equal(output(loaded(**items[0])), output(model(**items[0])))
    return loaded


def sentences(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " ." for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base, two experts, their Task Arithmetic merge (by ``epmq merge``) and texts per task."""
    root = tmp_path_factory.mktemp("quantize_ckpt")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    word_tokenizer(root / "base")
    noise = torch.Generator().manual_seed(1)
    for k in range(2):
        perturb(base, noise, scale=0.1).save_pretrained(root / f"expert{k}")
    config = root / "merge.yaml"
    config.write_text(yaml.safe_dump(dict(method="task_arithmetic", base=str(root / "base"),
                                          models=[str(root / "expert0"), str(root / "expert1")],
                                          params=dict(scale=0.5))))
    assert main(["merge", str(config), str(root / "merged"), "--quiet"]) == 0
    (root / "a.txt").write_text("\n".join(sentences(1, 40)))
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in sentences(2, 40)))
    return root


def test_read_texts(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("one doc")
    (tmp_path / "d" / "2.jsonl").write_text('"two"\n\n{"text": "three"}\n')
    (tmp_path / "d" / "3.json").write_text('["four", {"text": "five"}]')
    (tmp_path / "d" / "skip.csv").write_text("x")
    assert read_texts(tmp_path / "d") == ["one doc", "two", "three", "four", "five"]
    assert read_texts([tmp_path / "d" / "1.txt", tmp_path / "d" / "3.json"]) == ["one doc", "four", "five"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a string, or an object with a 'text'"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no calibration text"):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="unknown text file type"):
        read_texts(tmp_path / "d" / "skip.csv")


def test_read_texts_as_users_write_them(tmp_path, files):
    """A byte-order mark, U+2028 inside a JSON string, suffixes in capitals, sub-folders and
    hidden folders; errors that name the file and line."""
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / ".ipynb_checkpoints").mkdir()
    (d / "a.txt").write_bytes("\ufeffthe cat".encode("utf-8"))
    (d / "B.TXT").write_text("a dog", encoding="utf-8")
    (d / "sub" / "c.jsonl").write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    (d / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("stale copy")
    assert read_texts(d) == ["a dog", "the cat", "one\u2028two"]  # (sorted by path: B before a)
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog",}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        read_texts(tmp_path / "latin.txt")
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    with pytest.raises(ValueError, match="no tokens"):
        text_windows(["", "", ""], tok, samples=2, seq_len=4)


def test_compressed_text_files_read_as_their_inner_kind(tmp_path):
    """The hub's C4 shards (GPTQ's calibration set) are .json.gz of JSON lines; .bz2 and .xz
    likewise; found in a tree by their inner suffix; a damaged archive or an unknown inner
    kind named."""
    import bz2
    import gzip
    import lzma

    d = tmp_path / "c4"
    d.mkdir()
    # (a shard named so: beside c4-train.*, the others of no split are left out, as a snapshot's)
    with gzip.open(d / "c4.00000-of-01024.json.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"doc {i}", "url": "u"}) + "\n" for i in range(3)))
    (d / "b.TXT.bz2").write_bytes(bz2.compress("\ufeffthe cat".encode("utf-8")))
    (d / "c.jsonl.xz").write_bytes(lzma.compress(b'"a dog"\n'))
    (d / "skip.csv.gz").write_bytes(gzip.compress(b"x"))
    assert read_texts(d) == ["the cat", "a dog", "doc 0", "doc 1", "doc 2"]  # (sorted by path)
    (tmp_path / "pairs.jsonl.xz").write_bytes(lzma.compress(b'{"input": "a", "target": "b"}\n'))
    assert read_pairs(tmp_path / "pairs.jsonl.xz") == [("a", "b")]
    with pytest.raises(ValueError, match=r"skip.csv.gz: unknown text file type .* not '.csv.gz'"):
        read_texts(d / "skip.csv.gz")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'"x"\n' * 100)[:-12])
    with pytest.raises(ValueError, match="cut.jsonl.gz: not a readable gzip file"):
        read_texts(tmp_path / "cut.jsonl.gz")
    (tmp_path / "latin.txt.gz").write_bytes(gzip.compress("caf\xe9".encode("latin-1")))
    with pytest.raises(ValueError, match="latin.txt.gz: not UTF-8"):
        read_texts(tmp_path / "latin.txt.gz")


def test_json_lines_under_json_parsed_as_read(tmp_path):
    """A .json of JSON Lines (datasets' to_json, the hub's C4 shards c4-train.*.json.gz) was
    read whole, split into lines beside the text, then parsed: three times its text in memory.
    Its lines are now parsed as read, to the same records; the other .json forms (a list, a
    single value, a line that is not JSON) read and fail as before. One object, on one line (what
    to_json writes of a one-row dataset, and datasets reads back as that row) or over several, is
    one record (it was refused as "expected a JSON list"); a single value of another kind is not."""
    import gzip
    import tracemalloc

    rows = [json.dumps({"text": " ".join(sentences(i, 200)), "url": f"u{i}"}) + "\n" for i in range(300)]
    (tmp_path / "c4.json").write_text("".join(rows))
    (tmp_path / "c4.jsonl.gz").write_bytes(gzip.compress("".join(rows).encode()))
    size = (tmp_path / "c4.json").stat().st_size
    tracemalloc.start()
    try:
        texts = read_texts(tmp_path / "c4.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert texts == read_texts(tmp_path / "c4.jsonl.gz")
    assert peak < 2 * size, (peak, size)  # (read whole: above 3 x size)
    (tmp_path / "one.json").write_text('{"text": "the cat"}\n')
    assert read_texts(tmp_path / "one.json") == ["the cat"]
    (tmp_path / "pair.json").write_text('{"input": "a", "target": "b"}\n')
    assert read_pairs(tmp_path / "pair.json") == [("a", "b")]
    (tmp_path / "columns.json").write_text('{"text": ["the cat", "a dog"]}\n')  # (pandas' columns: no text)
    with pytest.raises(ValueError, match=r"columns.json: expected a string, or an object with a 'text' string"):
        read_texts(tmp_path / "columns.json")
    (tmp_path / "number.json").write_text('3\n')
    with pytest.raises(ValueError, match="number.json: expected a JSON list"):
        read_texts(tmp_path / "number.json")
    (tmp_path / "bad.json").write_text('\n{"text": "the cat"}\n{"text": "a dog",}\n')
    with pytest.raises(ValueError, match="bad.json:3: not JSON"):
        read_texts(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('[\n"the cat",\n{"text": "a dog"}\n]\n')
    assert read_texts(tmp_path / "list.json") == ["the cat", "a dog"]
    (tmp_path / "pretty.json").write_text('{\n"text": "the cat"\n}\n')
    assert read_texts(tmp_path / "pretty.json") == ["the cat"]


class HashTokenizer:
    """A word a token, any text (the windows' places cut words anywhere)."""
    eos_token_id, eos_token = 0, "<eos>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [0 if w == "<eos>" else 1 + sum(map(ord, w)) % 997 for w in text.split()]}


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_a_large_text_file_is_read_where_its_windows_are(tmp_path, monkeypatch):
    """A .txt document was read whole, its bytes, text and newline-translated copy at once (three
    times the file in memory: 137 MB for a 46 MB file) and the text held while its windows were
    drawn, though past FULL_TOKENIZATION_CHARS the windows read ~4 characters a token of it. Read
    streamed (as epmq quantize reads it), it is counted once and read again where the windows are,
    in the windows' order: the same windows, compressed or not, across the end of a document."""
    import gzip
    import tracemalloc

    from epmq import calibration

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "d\u00e9lta", "\u03b7ta", "<eos>", "zeta", "omega"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(80000)]
    text = "\ufeff" + "\r\n".join(lines) + "\r\nlast <eos>\r\n \r"
    (tmp_path / "big.txt").write_bytes(text.encode())
    (tmp_path / "big.txt.gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    (tmp_path / "small.txt").write_text("omega beta " * 40)
    size = (tmp_path / "big.txt").stat().st_size
    for name in ("big.txt", "big.txt.gz"):
        docs = [tmp_path / name, tmp_path / "small.txt"]
        whole = read_texts(docs)
        assert sum(map(len, whole)) > calibration.FULL_TOKENIZATION_CHARS
        tracemalloc.start()
        try:
            streamed = read_texts(docs, stream=True)
            windows = text_windows(streamed, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < size / 8, (name, peak, size)  # (read whole: above 2 x size)
        expected = text_windows(whole, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))
        assert [len(t) for t in streamed] == [len(t) for t in whole]
    # windows across the documents' ends (into the next one's start, the last into the first's)
    (tmp_path / "docs").mkdir()
    for k in range(6):
        ending = " <eos>" * (k % 2)
        (tmp_path / "docs" / f"{k}.txt").write_text("\r\n".join(lines[k * 40:k * 40 + 10 + 15 * k]) + ending)
    monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", 100)
    windows, expected = (text_windows(read_texts(tmp_path / "docs", stream=stream), HashTokenizer(), samples=200,
                                      seq_len=64, seed=5) for stream in (True, False))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))
    monkeypatch.undo()
    # below the limit the texts are tokenized whole, streamed or not
    small = [tmp_path / "small.txt", tmp_path / "small.txt"]
    (a,), (b,) = (text_windows(read_texts(small, stream=stream), HashTokenizer(), samples=4, seq_len=8)
                  for stream in (True, False))
    assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_a_large_json_lines_file_is_read_where_its_windows_are(tmp_path, monkeypatch):
    """A .jsonl file (or JSON Lines under .json.gz, the hub's C4 shards) had every record parsed and
    its text held while the windows were drawn (a 16 MB file: 40 MB at the peak, traced; 1.6 MB streamed),
    though past FULL_TOKENIZATION_CHARS the windows read ~4 characters a token of it. Read
    streamed (as epmq quantize reads it), each document is counted once and read again where the
    windows are: the same windows, compressed or not, across the ends of documents."""
    import gzip
    import tracemalloc

    from epmq import calibration

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "d\u00e9lta", "\u03b7ta", "<eos>", "zeta", "omega"]
    records = []
    for k in range(8000):  # (of about 1800 characters, C4's mean is 2200)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 600)))
        records.append({"prompt": text[:20], "completion": text[20:]} if k % 3 == 0 else {"text": text, "id": k})
    body = "\n".join(json.dumps(r) for r in records) + "\n\n"
    (tmp_path / "big.jsonl").write_text(body)
    (tmp_path / "c4-train.json.gz").write_bytes(gzip.compress(body.encode(), compresslevel=1))
    size = (tmp_path / "big.jsonl").stat().st_size
    for name in ("big.jsonl", "c4-train.json.gz"):
        whole = read_texts(tmp_path / name)
        assert sum(map(len, whole)) > calibration.FULL_TOKENIZATION_CHARS
        tracemalloc.start()
        try:
            streamed = read_texts(tmp_path / name, stream=True)
            windows = text_windows(streamed, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < size / 4, (name, peak, size)
        expected = text_windows(whole, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))
        assert [len(t) for t in streamed] == [len(t) for t in whole]
    # windows across the documents' ends (into the next one's, the last into the first's), and
    # below the limit the texts tokenized whole
    few = [{"text": " ".join(words[k % 8:]) * (k + 1) + " <eos>" * (k % 2)} for k in range(12)]
    (tmp_path / "few.jsonl").write_text("\n".join(map(json.dumps, few)))
    for limit in (100, calibration.FULL_TOKENIZATION_CHARS):
        monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", limit)
        windows, expected = (text_windows(read_texts(tmp_path / "few.jsonl", stream=stream), HashTokenizer(),
                                          samples=200, seq_len=16, seed=5) for stream in (True, False))
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))
    # rewritten between its count and its windows: refused, not windows of places in other texts
    streamed = read_texts(tmp_path / "few.jsonl", stream=True)
    (tmp_path / "few.jsonl").write_text("\n".join(json.dumps({"text": "other " * 50}) for _ in range(12)))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'few.jsonl'}: changed since it was opened")):
        text_windows(streamed, HashTokenizer(), samples=8, seq_len=8, seed=0)


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_a_large_parquet_file_is_read_where_its_windows_are(tmp_path, monkeypatch):
    """A .parquet file's rows (an HF hub dataset's) were all made Python objects and their texts
    held while the windows were drawn (13 M characters of texts: 30 MB traced at the peak, beside
    Arrow's own; 5 MB streamed), though past FULL_TOKENIZATION_CHARS the windows read ~4 characters a token of them.
    Read streamed (as epmq quantize reads it), each row is counted once, a row group at a time,
    and read again where the windows are: the same windows."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from epmq import calibration

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "d\u00e9lta", "\u03b7ta", "<eos>", "zeta", "omega"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 600))) for _ in range(8000)]
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "train.parquet",
                   row_group_size=500)
    chars = sum(map(len, texts))
    whole = read_texts(tmp_path / "train.parquet")
    assert whole == texts and chars > calibration.FULL_TOKENIZATION_CHARS
    tracemalloc.start()
    try:
        streamed = read_texts(tmp_path / "train.parquet", stream=True)
        windows = text_windows(streamed, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < chars / 2, (peak, chars)  # (read whole: 2.3 x chars)
    expected = text_windows(whole, HashTokenizer(), samples=48, seq_len=64, batch_size=8, seed=5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))
    assert [len(t) for t in streamed] == [len(t) for t in whole]
    # below the limit, the texts tokenized whole
    small = texts[:12]
    pq.write_table(pa.table({"text": small}), tmp_path / "small.parquet", row_group_size=5)
    for limit in (100, calibration.FULL_TOKENIZATION_CHARS):
        monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", limit)
        windows, expected = (text_windows(read_texts(tmp_path / "small.parquet", stream=stream), HashTokenizer(),
                                          samples=200, seq_len=16, seed=5) for stream in (True, False))
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))


def test_a_text_file_changed_after_it_was_counted_is_refused(tmp_path, monkeypatch):
    """A streamed .txt is counted when opened and read again where its windows are: rewritten
    between the two (shorter, longer, or as long), its windows were drawn from places of the old
    length in the new text (a file cut short gave windows of its first words again), silently."""
    import os

    from epmq import calibration

    monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", 100)
    path = tmp_path / "corpus.txt"
    for rewritten in ("word " * 20, "other " * 2000, "wore " * 2000):
        path.write_text("word " * 2000)
        os.utime(path, ns=(1, 1))
        (streamed,) = read_texts(path, stream=True)
        path.write_text(rewritten)
        with pytest.raises(ValueError, match=re.escape(f"{path}: changed since it was opened")):
            text_windows([streamed], HashTokenizer(), samples=8, seq_len=8, seed=0)


def _assert_streamed_windows_hold_few_files(folder, samples):
    """Windows of ``folder``'s documents streamed hold few files open while they are drawn and none
    after, and are the windows of the documents read whole."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts open files in /proc")
    opened = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    streamed, whole = read_texts(folder, stream=True), read_texts(folder)
    before, most = opened(), 0

    class Counting(HashTokenizer):
        def __call__(self, text, add_special_tokens=False):
            nonlocal most
            most = max(most, opened())
            return super().__call__(text)

    windows = text_windows(streamed, Counting(), samples=samples, seq_len=16, seed=3)
    assert opened() == before
    assert most - before < 16, most - before
    expected = text_windows(whole, HashTokenizer(), samples=samples, seq_len=16, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, expected))


@pytest.mark.filterwarnings("ignore:.*windows overlap")
def test_streamed_text_files_are_closed_once_their_windows_are_read(tmp_path, monkeypatch):
    """Each streamed .txt a window read kept its file open (a reader for the next window), up to
    the end of text_windows and after it: a directory of many short documents held one open file
    each (1236 for 1024 windows of 2000 files) and failed on the system's limit of open files
    (256 on macOS, 1024 on most Linux) with "Too many open files". The documents the windows have
    passed are closed, and all of them at the end."""
    from epmq import calibration

    monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", 100)
    for k in range(400):
        (tmp_path / f"{k:04d}.txt").write_text(f"document {k} " + "word " * 30)
    _assert_streamed_windows_hold_few_files(tmp_path, samples=512)


@pytest.mark.filterwarnings("ignore:.*windows overlap")
@pytest.mark.parametrize("limit", [100, None])
def test_streamed_json_lines_files_are_closed_once_read(limit, tmp_path, monkeypatch):
    """A streamed .jsonl file whose texts were all read (below FULL_TOKENIZATION_CHARS, each read
    whole in turn) stayed open to the end of text_windows: a directory of many such files held
    one open file each, as streamed .txt files once did, up to the system's limit of open files.
    A file is closed once its last text is read, or a window has passed it."""
    from epmq import calibration

    if limit is not None:
        monkeypatch.setattr(calibration, "FULL_TOKENIZATION_CHARS", limit)
    for k in range(300):
        (tmp_path / f"{k:04d}.jsonl").write_text("\n".join(json.dumps({"text": f"document {k} {j} " + "word " * 8})
                                                           for j in range(2)))
    _assert_streamed_windows_hold_few_files(tmp_path, samples=256)


def test_text_files_of_windows_line_ends_read_as_typed(tmp_path):
    """A .txt document saved with "\r\n" (or "\r") line ends is read with "\n", compressed or
    not, as it was before compressed files were read; a JSON line's "\r" is no part of it."""
    import gzip

    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\rend\r\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbfline one\r\nline two\r\n"))
    (tmp_path / "c.json").write_bytes(b'["x\\r\\ny",\r\n "z"]\r\n')
    (tmp_path / "d.jsonl").write_bytes('"a\u2028b"\r\n\r\n"c"'.encode())
    assert read_texts(tmp_path / "a.txt") == ["line one\nline two\nend\n"]
    assert read_texts(tmp_path / "b.txt.gz") == ["line one\nline two\n"]
    assert read_texts(tmp_path / "c.json") == ["x\r\ny", "z"]  # (escaped in JSON: kept)
    assert read_texts(tmp_path / "d.jsonl") == ["a\u2028b", "c"]


def test_corrupt_compressed_files_named_not_raised_raw(tmp_path):
    """A corrupt deflate stream raises zlib.error and any .xz fault lzma.LZMAError, neither an
    OSError: they are named as unreadable archives, as a truncated one is, not raw tracebacks."""
    import gzip
    import lzma

    def damaged(data, start):
        data = bytearray(data)
        data[start:start + 20] = bytes(b ^ 0xFF for b in data[start:start + 20])
        return bytes(data)

    (tmp_path / "bad.jsonl.gz").write_bytes(damaged(gzip.compress(b'"x"\n' * 1000), 20))
    (tmp_path / "bad.jsonl.xz").write_bytes(damaged(lzma.compress(b'"x"\n' * 1000), 30))
    (tmp_path / "plain.json.xz").write_bytes(b'["x"]')  # (named .xz, not compressed)
    for name, kind in (("bad.jsonl.gz", "gzip"), ("bad.jsonl.xz", "lzma"), ("plain.json.xz", "lzma")):
        with pytest.raises(ValueError, match=f"{name}: not a readable {kind} file"):
            read_texts(tmp_path / name)


# a chat template of the kind fine-tuned models ship (BOS, role markers, EOS per turn)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                 "{{ raise_exception('no tools here') }}{% endif %}"
                 "{{ m['role'] }} : {{ m['content'] }} {{ eos_token }}{% endfor %}")
# one that reads TRL's tools and a template keyword, and an assistant turn of tool calls
TOOL_TEMPLATE = ("{{ bos_token }}{% if tools %}system : {% for t in tools %}{{ t['name'] }} {% endfor %}{% endif %}"
                 "{% for m in messages %}{{ m['role'] }} : {% if short is defined and short %}short {% endif %}"
                 "{% if m.tool_calls is defined %}{{ m.tool_calls[0]['function']['name'] }} ( ){% else %}"
                 "{{ m['content'] }}{% endif %} {{ eos_token }}{% endfor %}")


def test_texts_in_the_forms_fine_tuning_files_take(files, tmp_path):
    """TRL's dataset formats: text, conversations, prompt/completion strings or conversations;
    conversations rendered by the chat template, as the expert was fine-tuned on them."""
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}]
    records = [{"text": "one"}, {"messages": chat}, {"prompt": "the ", "completion": "cat"},
               {"prompt": chat[:1], "completion": chat[1:]}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    tok.chat_template = CHAT_TEMPLATE
    rendered = "<s>user : the cat </s>assistant : a dog </s>"
    assert read_texts(tmp_path / "sft.jsonl", tokenizer=tok) == ["one", rendered, "the cat", rendered]
    # (streamed, as epmq quantize reads them: rendered the same where the windows read them)
    streamed = read_texts(tmp_path / "sft.jsonl", tokenizer=tok, stream=True)
    assert [t.text() for t in streamed] == ["one", rendered, "the cat", rendered]
    streamed[0].close()
    # BOS and EOS reach the windows as the model's special tokens (the roles are words this
    # tokenizer does not know); a document that ends with EOS gets no second one between it and
    # the next (the model never saw two in fine-tuning)
    (window,) = text_windows([rendered, "the cat"], tok, samples=1, seq_len=14)
    assert tok.convert_ids_to_tokens(window["input_ids"][0].tolist()) == [
        "<s>", "<unk>", ":", "the", "cat", "</s>", "<unk>", ":", "a", "dog", "</s>", "the", "cat", "</s>"]
    # TRL's tools and chat_template_kwargs go to the template; a tool-call turn needs no content
    tools = dict(messages=[{"role": "user", "content": "the cat"},
                           {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "dog"}}]}],
                 tools=[{"name": "cat"}], chat_template_kwargs={"short": True})
    (tmp_path / "tools.json").write_text(json.dumps(tools) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    tok.chat_template = TOOL_TEMPLATE
    for stream in (False, True):  # (JSON Lines under .json, as datasets writes)
        texts = read_texts(tmp_path / "tools.json", tokenizer=tok, stream=stream)
        assert [t if isinstance(t, str) else t.text() for t in texts] == [
            "<s>system : cat user : short the cat </s>assistant : short dog ( ) </s>", "a dog"]
    texts[0].close()
    tok.chat_template = CHAT_TEMPLATE
    (tmp_path / "one.jsonl").write_text(json.dumps({"messages": chat}))
    with pytest.raises(ValueError, match=r"one.jsonl:1: a conversation is rendered by the tokenizer's chat "
                                         r"template: read_texts\(source, tokenizer=...\)"):
        read_texts(tmp_path / "one.jsonl")
    with pytest.raises(ValueError, match="one.jsonl:1: a conversation, and the model's tokenizer has no chat "
                                         "template .* copy the fine-tuned experts' tokenizer files"):
        read_texts(tmp_path / "one.jsonl", tokenizer=transformers.AutoTokenizer.from_pretrained(files / "base"))
    bad = {"roles.jsonl": [{"messages": [{"role": "user", "content": "x"}, {"content": "no role"}]}],
           "pairs.jsonl": [{"input": "the cat", "target": "a dog"}],
           "kwargs.jsonl": [{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}],
           "empty.jsonl": [{"messages": []}],
           "tool.jsonl": [{"messages": [{"role": "tool", "content": "x"}]}],
           "mixed.jsonl": [{"prompt": "the", "completion": chat}],
           "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "x"}]}]}
    for name, rows in bad.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
    match = {"roles.jsonl": "roles.jsonl:1: message 1 of the conversation has no 'role'",
             "pairs.jsonl": "pairs.jsonl:1: input/target pairs calibrate an encoder-decoder",
             "kwargs.jsonl": "kwargs.jsonl:1: chat_template_kwargs must be an object",
             "empty.jsonl": "empty.jsonl:1: a conversation is a non-empty list",
             "tool.jsonl": "tool.jsonl:1: the tokenizer's chat template failed on this conversation .*no tools here",
             "mixed.jsonl": "mixed.jsonl:1: expected a string, or an object with a 'text' string, 'messages'",
             "sharegpt.jsonl": "sharegpt.jsonl:1: expected a string, or an object with a 'text' string"}
    for name, pattern in match.items():
        with pytest.raises(ValueError, match=pattern):
            read_texts(tmp_path / name, tokenizer=tok)


def test_a_chatml_conversation_gets_no_second_eos():
    """ChatML templates (Qwen's, Phi's) end each turn with the EOS and a newline: the rendered
    conversation already ends with EOS, so none is added after it (the stream held
    "<|im_end|> \\n <|im_end|>", which the model never saw)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "\n", "user", "assistant", "the", "cat", "a", "dog", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>",
                                               additional_special_tokens=["<|im_start|>"])
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    turn = ["<|im_start|>", "user", "\n", "the", "cat", "<|im_end|>", "\n",
            "<|im_start|>", "assistant", "\n", "a", "dog", "<|im_end|>", "\n"]
    (window,) = text_windows([rendered, rendered, "the cat"], tok, samples=1, seq_len=31)
    assert tok.convert_ids_to_tokens(window["input_ids"][0].tolist()) == turn + turn + ["the", "cat", "<|im_end|>"]


def test_a_dataset_saved_to_disk_is_named(tmp_path):
    """datasets' save_to_disk writes .arrow files beside dataset_info.json and state.json: the
    error named that JSON as a list that was not one; now it names the folder and what to write."""
    pa = pytest.importorskip("pyarrow")
    saved = tmp_path / "data" / "train"
    saved.mkdir(parents=True)
    table = pa.table({"text": ["the cat", "a dog"]})
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "data" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    for read in (read_texts, epmq.calibration.read_pairs):
        with pytest.raises(ValueError, match=r"train: a dataset written by datasets' save_to_disk .*to_json"):
            read(tmp_path / "data")


def test_parquet_files_of_a_hub_dataset(files, tmp_path, monkeypatch):
    """``.parquet`` (how the HF hub serves datasets): a row is an object of its columns, read in
    any of the text forms (the other columns ignored) or as pairs; errors name file and row."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    chat = [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}],
            [{"role": "user", "content": "a dog"}]]
    pq.write_table(pa.table({"prompt_id": ["x1", "x2"], "messages": chat}), tmp_path / "sft.parquet")
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    tok.chat_template = CHAT_TEMPLATE
    assert read_texts(tmp_path / "sft.parquet", tokenizer=tok) == [
        "<s>user : the cat </s>assistant : a dog </s>", "<s>user : a dog </s>"]
    # (the columns TRL reads beside the conversation come along)
    pq.write_table(pa.table({"messages": chat[1:], "tools": [[{"name": "cat"}]],
                             "chat_template_kwargs": [{"short": True}]}), tmp_path / "tools.parquet")
    tok.chat_template = TOOL_TEMPLATE
    assert read_texts(tmp_path / "tools.parquet", tokenizer=tok) == ["<s>system : cat user : short a dog </s>"]
    tok.chat_template = CHAT_TEMPLATE
    pq.write_table(pa.table({"text": ["one", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match="nulls.parquet:row 1: expected a string, or an object with a 'text'"):
        read_texts(tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"input": ["the cat", "a dog"], "target": ["yes", "no"], "id": [1, 2]}),
                   tmp_path / "pairs.parquet")
    assert epmq.calibration.read_pairs(tmp_path / "pairs.parquet") == [("the cat", "yes"), ("a dog", "no")]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        read_texts(tmp_path / "bad.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"sft.parquet: reading .parquet files needs pyarrow \(pip install pyarrow\)"):
        read_texts(tmp_path / "sft.parquet", tokenizer=tok)


def test_quantize_checkpoint_calibrates_on_conversations(files, tmp_path):
    """A task's fine-tuning conversations as its calibration file: the windows are those of
    the texts the model's chat template makes of them."""
    merged = tmp_path / "merged"
    shutil.copytree(files / "merged", merged)
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(merged)
    rng = random.Random(5)
    talks = [[{"role": "user", "content": s}, {"role": "assistant", "content": rng.choice(WORDS)}]
             for s in sentences(4, 20)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in talks))
    spec = epmq.QuantSpec(bits=4, group_size=16, sym=True)
    out = epmq.quantize_checkpoint(merged, tmp_path / "w4", spec=spec, method="gptq",
                                   calibration={"chat": tmp_path / "chat.jsonl"},
                                   samples=4, seq_len=16, batch_size=2, progress=False)
    texts = [tok.apply_chat_template(m, tokenize=False) for m in talks]
    assert texts[0].startswith("<s>user : ")
    batches = {"chat": text_windows(texts, tok, samples=4, seq_len=16, batch_size=2)}
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="gptq")
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_text_windows(files):
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    texts = sentences(3, 30)
    batches = text_windows(texts, tok, samples=5, seq_len=12, batch_size=2, seed=7)
    assert [b["input_ids"].shape for b in batches] == [(2, 12), (2, 12), (1, 12)]
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = " ".join(map(str, stream))
    for b in batches:  # every window is a run of the joined token stream
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
        for row in b["input_ids"].tolist():
            assert " ".join(map(str, row)) in text
    again = text_windows(texts, tok, samples=5, seq_len=12, batch_size=2, seed=7)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    with pytest.warns(UserWarning, match="fewer than seq_len"):
        short = text_windows(["the cat"], tok, samples=4, seq_len=50)
    assert len(short) == 1 and short[0]["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match="no tokens"):
        text_windows([""], tok)


def test_one_source_given_whole_is_refused(files):
    """text_windows(text, tok) with the text itself (a str, not a list of documents) read each
    character as a document: windows of single letters between EOS tokens ('</s> t </s> h </s>
    e'), silently; pair_batches(("in", "out"), tok) ended in a bare 'too many values to unpack'."""
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    text = " ".join(sentences(3, 30))
    for texts in (text, text.encode()):
        with pytest.raises(TypeError, match=r"texts must be an iterable of documents \(a list of str\), got one "
                                            + type(texts).__name__ + r": give \[text\]"):
            text_windows(texts, tok, samples=2, seq_len=12)
    with pytest.raises(TypeError, match=r"pairs must be a sequence of \(input, target\) pairs, got one pair "
                                        r"\('the cat', 'a dog'\): give \[pair\]"):
        pair_batches(("the cat", "a dog"), tok, samples=2, seq_len=12)
    # (image_batches given the directory: a str's characters drawn as files, "cannot read image /",
    # a Path a bare "'PosixPath' object is not iterable")
    for files in (str(files), files):
        with pytest.raises(TypeError, match=r"files must be a list of image files, got one .*: "
                                            r"give epmq.calibration.image_files\("):
            image_batches(files, None, samples=2)


def test_a_file_given_to_text_windows_is_pointed_to_read_texts(files, tmp_path):
    """text_windows(path, tok) with the documents' file (a Path) ended in a bare "'PosixPath'
    object is not iterable", and as a str was told to 'give [text]', which calibrated on the path's
    own characters; both refused pointing to read_texts, which reads the file."""
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    (tmp_path / "docs.txt").write_text(" ".join(sentences(3, 30)))
    for path in (tmp_path / "docs.txt", str(tmp_path / "docs.txt")):
        with pytest.raises(TypeError, match=r"texts must be an iterable of documents .*got the path .*docs.txt': "
                                            r"give epmq.calibration.read_texts\("):
            text_windows(path, tok, samples=2, seq_len=12)


def test_one_pair_given_as_a_list_is_refused(files):
    """pair_batches(["the cat", "a dog"], tok), one pair as JSON reads it (a list), was refused only
    as a tuple (7a37a90): its texts were drawn as pairs and it ended in the bare 'too many values to
    unpack', and texts of two characters ran as pairs of their letters, silently; an item drawn that
    is no (input, target) pair of texts is refused naming it."""
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    with pytest.raises(TypeError, match=r"pairs must be a sequence of \(input, target\) pairs, got one pair "
                                        r"\('the cat', 'a dog'\): give \[pair\]"):
        pair_batches(["the cat", "a dog"], tok, samples=2, seq_len=12)
    for pairs in (["ab", "cd", "ef"], [("the cat", "a dog"), "ab"], [("the cat", "a dog", "a bird")]):
        with pytest.raises(TypeError, match=r"pairs must hold \(input, target\) pairs of texts, got the item"):
            pair_batches(pairs, tok, samples=3, seq_len=12)
    import numpy as np

    rows = np.array([["the cat", "a dog"], ["a bird", "the fish"]], dtype=object)  # (a DataFrame's .values)
    for pairs in ([["the cat", "a dog"], ("a bird", "the fish")], rows):
        batches = pair_batches(pairs, tok, samples=2, seq_len=12)
        assert sum(len(b["input_ids"]) for b in batches) == 2


def test_each_task_draws_its_own_windows(files):
    """Two tasks calibrated from the same file drew the same windows (one seed for every task):
    their H_k were one sample twice. Each task now has its own seed (task_seeds), from the
    seed and its name; a single task keeps the seed itself."""
    from epmq.quantize_files import calibrated

    tok = transformers.AutoTokenizer.from_pretrained(files / "merged")
    options = dict(samples=4, seq_len=16, batch_size=4)
    _, _, two = calibrated(files / "merged", {"math": files / "a.txt", "code": files / "a.txt"}, seed=3, **options)
    assert not torch.equal(two["math"][0]["input_ids"], two["code"][0]["input_ids"])
    from epmq.calibration import task_seeds

    seeds = task_seeds(3, ["math", "code"])
    assert seeds == task_seeds(3, ["code", "math"]) and seeds["math"] != seeds["code"]
    for task, batches in two.items():  # (what a caller of quantize_model reproduces by hand)
        want = text_windows(read_texts(files / "a.txt"), tok, seed=seeds[task], **options)
        assert torch.equal(batches[0]["input_ids"], want[0]["input_ids"])
    _, _, one = calibrated(files / "merged", {"math": files / "a.txt"}, seed=3, **options)
    assert torch.equal(one["math"][0]["input_ids"],
                       text_windows(read_texts(files / "a.txt"), tok, seed=3, **options)[0]["input_ids"])


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1, 1.5])
def test_a_seed_torch_cannot_take_is_refused_from_python_too(files, tmp_path, seed):
    """quantize_checkpoint and calibrated (epmq.merge_checkpoints' RegMean reads through it)
    with a seed past 64 bits failed at the first draw as "Overflow when unpacking long long";
    the CLI's check, shared, now names it before anything is loaded."""
    from epmq.quantize_files import calibrated

    with pytest.raises(ValueError, match="seed must be an integer"):
        epmq.quantize_checkpoint(files / "merged", tmp_path / "out", spec=epmq.QuantSpec(bits=4),
                                 method="gptq", calibration={"math": files / "a.txt"}, seq_len=16, seed=seed)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="seed must be an integer"):
        calibrated(files / "merged", {"math": files / "a.txt"}, seed=seed)
    # (numpy's integers are integers: taken, as before the check)
    options = dict(samples=2, seq_len=8, batch_size=2)
    _, _, drawn = calibrated(files / "merged", {"math": files / "a.txt"}, seed=np.int64(3), **options)
    _, _, same = calibrated(files / "merged", {"math": files / "a.txt"}, seed=3, **options)
    assert torch.equal(drawn["math"][0]["input_ids"], same["math"][0]["input_ids"])


def test_true_sequential_is_a_flag_before_anything_is_read(tmp_path):
    """quantize_checkpoint(true_sequential="no") ran the walk true sequential (a truthy string),
    silently; np.False_ walked and then lost the walk where the report's JSON was written. The
    CLI's check, made by quantize_model too, is made before the model is read (none here)."""
    with pytest.raises(ValueError, match="true_sequential must be True or False, got 'no'"):
        epmq.quantize_checkpoint(tmp_path / "no-model", tmp_path / "out", spec=epmq.QuantSpec(bits=4),
                                 method="gptq", calibration={"a": tmp_path / "a.txt"}, true_sequential="no")
    assert not (tmp_path / "out").exists()


def test_an_output_inside_a_calibration_directory_is_refused(files, tmp_path):
    """An output written inside a task's calibration directory was taken: its config.json and
    tokenizer files (and OUT.resume's records while it ran) were then that directory's documents,
    so the same command again, or the resume of an interrupted run, failed on them ('.../q/config.json:
    expected a string, or an object with a 'text' string'); refused before anything is read."""
    data = tmp_path / "data"
    (data / "math").mkdir(parents=True)
    shutil.copy(files / "a.txt", data / "math" / "a.txt")
    for out in (data / "q", data / "math" / "q", data / "math"):
        # (the directory itself, the user's, is refused by the output's own check, which comes first)
        match = (f"{re.escape(str(out))} exists and is not an epmq checkpoint" if out == data / "math" else
                 f"the output {re.escape(str(out))} is inside the calibration directory {re.escape(str(data))} "
                 f"of task 'math'")
        with pytest.raises(ValueError, match=match):
            epmq.quantize_checkpoint(files / "merged", out, spec=epmq.QuantSpec(bits=4, group_size=16),
                                     method="gptq", calibration={"math": [files / "b.jsonl", data]},
                                     samples=2, seq_len=16, progress=False)
        assert not (data / "q").exists() and not (data / "q.resume").exists()


def test_an_output_inside_an_image_folder_is_taken(tmp_path):
    """The refusal of an output inside a calibration directory is for the files of the checkpoint
    that directory's reader takes (config.json, tokenizer files as texts): an image folder's reader
    takes none of them, and a vision model's output in it (images/, out images/q) was refused all the
    same; it is written, and the same command again calibrates on the same images."""
    _clip_vision(0).save_pretrained(tmp_path / "merged")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(tmp_path / "merged")
    _write_images(tmp_path / "images" / "cars", 3, seed=0)
    calibration = {"cars": tmp_path / "images"}
    files = image_files(tmp_path / "images")
    for _ in range(2):
        out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "images" / "q", method="gptq",
                                       spec=epmq.QuantSpec(bits=4, group_size=-1), calibration=calibration,
                                       samples=2, batch_size=2, progress=False)
        assert (out / "preprocessor_config.json").is_file() and image_files(tmp_path / "images") == files


@pytest.mark.parametrize("device", [None, "cpu"])
def test_quantize_checkpoint_equals_quantize_model(files, tmp_path, device):
    """(device="cpu": the blocks visit the CPU from CPU memory, the path --device cuda takes.)"""
    root = files
    spec = epmq.QuantSpec(bits=4, group_size=16, sym=True)
    calibration = {"a": root / "a.txt", "b": root / "b.jsonl"}
    experts = {"a": root / "expert0", "b": root / "expert1"}
    out = epmq.quantize_checkpoint(root / "merged", tmp_path / "w4", spec=spec, method="epmq",
                                   calibration=calibration, experts=experts, anchor=0.1,
                                   samples=6, seq_len=16, batch_size=4, device=device, progress=False)
    # the same by hand: the merged model, the same windows, quantize_model
    tok = transformers.AutoTokenizer.from_pretrained(root / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "merged")
    seeds = epmq.calibration.task_seeds(0, calibration)  # (each task its own draw)
    batches = {t: text_windows(epmq.calibration.read_texts(p), tok, samples=6, seq_len=16, batch_size=4,
                               seed=seeds[t])
               for t, p in calibration.items()}
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="epmq",
                                 experts=experts, anchor=0.1)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is True
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "epmq" and len(report["layers"]) == 14
    assert transformers.AutoTokenizer.from_pretrained(out)("the cat").input_ids


def test_cli_gptq_and_errors(files, tmp_path, capsys, monkeypatch):
    root = files
    config = tmp_path / "q.yaml"
    base = dict(model=str(root / "merged"), method="gptq", calibration={"a": str(root / "a.txt")},
                bits=3, group_size=-1, samples=4, seq_len=16, batch_size=2)
    config.write_text(yaml.safe_dump(dict(base, layers="mlp", percdamp=0.1, true_sequential=False)))
    assert main(["quantize", str(config), str(tmp_path / "mlp"), "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # (--quiet: transformers' bars too)
    import huggingface_hub.utils as hub
    from transformers.utils import logging
    assert logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()  # (restored)
    hub.disable_progress_bars()  # a user's own choice for the hub stays as it was
    try:
        assert main(["quantize", str(config), str(tmp_path / "mlp"), "--quiet"]) == 0
        assert logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
    finally:
        hub.enable_progress_bars()
    report = json.loads((tmp_path / "mlp" / REPORT_FILE).read_text())
    assert report["layers"] and all(".mlp." in layer["name"] for layer in report["layers"])
    assert report["true_sequential"] is False
    config.write_text(yaml.safe_dump(base))
    assert main(["quantize", str(config), str(tmp_path / "w3"), "--quiet"]) == 0
    assert "quantized" in capsys.readouterr().out
    qc = json.loads((tmp_path / "w3" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 3 and qc["group_size"] == -1
    with torch.no_grad():
        logits = epmq.load_quantized(tmp_path / "w3")(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert torch.isfinite(logits).all()
    rtn = {k: v for k, v in base.items() if k not in ("calibration", "samples", "seq_len", "batch_size")}
    # no calibration, so no windows: the default seq_len (512) is no longer than anything
    config.write_text(yaml.safe_dump(dict(rtn, method="rtn", bits=4, group_size=16)))
    assert main(["quantize", str(config), str(tmp_path / "rtn"), "--quiet"]) == 0
    assert not (tmp_path / "rtn.resume").exists()
    assert not list(tmp_path.glob(".*epmq-lock"))  # (OUT's lock, RTN's too, let go with its file)
    for method in ("rtn", "gptq"):  # into the current directory, "." (its resume directory beside it)
        here = tmp_path / f"here_{method}"
        here.mkdir()
        monkeypatch.chdir(here)
        config.write_text(yaml.safe_dump(dict(base, method=method) if method == "gptq" else dict(rtn, method="rtn")))
        assert main(["quantize", str(config), ".", "--quiet"]) == 0
        assert (here / "config.json").is_file() and not (tmp_path / f"here_{method}.resume").exists()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    by_epmq = dict(method="epmq", experts={"a": str(root / "expert0")})
    cases = [
        (dict(method="epmq"), "tasks without an expert \\['a'\\]"),
        (dict(experts={"a": str(root / "expert0")}), "method gptq does not read experts"),
        (dict(calibration={"a": str(root / "missing.txt")}), "no calibration file or directory at 1 path.*missing.txt"),
        (dict(bits=5), "bits"),
        (dict(calibraton={}), "unknown keys \\['calibraton'\\]"),
        (dict(model=str(root / "nowhere")), "no checkpoint directory"),
        (dict(model=str(root / "a.txt")), "a.txt is a file, not a checkpoint directory"),  # (it exists)
        (dict(samples="1e2"), "samples must be an integer, got '1e2'"),
        (dict(seed="abc"), "seed must be an integer"),
        (dict(seed=2 ** 64), "seed must be an integer from -2\\*\\*63 to 2\\*\\*64 - 1, got 18446744073709551616"),
        (dict(calibration=str(root / "a.txt")), "calibration must map each task to its file.*\n\n  calibration:\n    a: "),
        (dict(calibration={"a": None}), "calibration must map each task to file"),
        # (one checkpoint per task: a list was accepted, then a TypeError traceback after loading)
        (dict(by_epmq, experts={"a": [str(root / "expert0")]}), "experts must map each task to a checkpoint path"),
        (dict(percdamp="0.1"), "percdamp must be a finite number.*YAML"),
        (dict(by_epmq, anchor=float("nan")), "anchor must be a finite number"),
        (dict(by_epmq, lora_base=3), "lora_base must be a path"),
        (dict(checkpoint_format="gptq3"), "checkpoint_format must be"),  # (before the walk, not after)
        (dict(max_shard_size="5XB"), "max_shard_size"),
        (dict(layers="(["), "is not a regular expression"),
        (dict(by_epmq, anchor=-1.0), "anchor"),
        (dict(by_epmq, lora_base="ckpt/base"), "no expert is an adapter"),
        (dict(true_sequential="no"), "true_sequential must be true or false"),
        (dict(layers=["mlp"]), "layers must be a regular expression"),
        (dict(by_epmq, residual_precision="fp8"), "residual_precision must be one of"),
        # what the method does not read (a config switched from epmq keeping its anchor)
        (dict(anchor=1.0, weight_anchor=0.1), "method gptq does not read anchor, weight_anchor: remove them"),
        (dict(method="rtn"), "method rtn does not read batch_size, calibration, samples, seq_len: remove them"),
    ]
    for change, match in cases:
        config.write_text(yaml.safe_dump({**base, **change}))
        assert main(["quantize", str(config), str(tmp_path / "x"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.resume").exists()
        assert not (tmp_path / ".x.epmq-lock").exists()


def test_an_expert_that_cannot_be_read_is_named_before_the_model_loads(files, tmp_path, monkeypatch):
    """An expert directory holding no weights (or a path that is no checkpoint, a folder mistyped)
    was found once the merged model had loaded (minutes at 70B), when the walk opened it; it is
    named before, and before the calibration files are read and tokenized (it was after)."""
    import huggingface_hub.constants as hub

    import epmq.quantize_files as quantize_files

    root = files
    (tmp_path / "empty").mkdir()
    (tmp_path / "typo").mkdir()  # (typo/expert1: an org/name in form, a folder here: said as mistyped)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    loaded, calibrated = [], quantize_files.calibrated
    from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(cls) or from_pretrained(cls, *a, **k)))
    monkeypatch.setattr(quantize_files, "calibrated",
                        lambda *a, **k: loaded.append("calibration") or calibrated(*a, **k))
    for bad, error in ((tmp_path / "empty", "the expert of task 'b'.*no weights in"),
                       (root / "a.txt", "the expert of task 'b'.*unknown checkpoint file type"),
                       ("typo/expert1", "the expert of task 'b': no folder .*typo holds no 'expert1'")):
        with pytest.raises((ValueError, OSError), match=error):
            epmq.quantize_checkpoint(root / "merged", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=16),
                                     method="epmq", calibration={"a": str(root / "a.txt"), "b": str(root / "a.txt")},
                                     experts={"a": str(root / "expert0"), "b": str(bad)}, samples=2, seq_len=16,
                                     batch_size=2, progress=False)
        assert loaded == [], f"the model loaded before the expert of task 'b' ({bad}) was read"
        assert not (tmp_path / "out").exists()


def _quantize_stopped_in_block(at, argv, monkeypatch):
    """The exit status of ``main(argv)`` (an ``epmq quantize``) stopped by ^C as it reaches block ``at``."""
    from epmq import walker

    quantize_block = walker._Walk._quantize_block

    def interrupted(self, s, i, block):
        if i >= at:
            raise KeyboardInterrupt
        return quantize_block(self, s, i, block)

    with monkeypatch.context() as m:
        m.setattr(walker._Walk, "_quantize_block", interrupted)
        return main(argv)


def test_cli_resumes_an_interrupted_quantization(files, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second block: the first is kept in OUT.resume, the same command loads it
    and writes the checkpoint an uninterrupted run writes (OUT.resume then removed); --fresh
    and other settings start over or are refused."""
    root = files
    config = tmp_path / "q.yaml"
    base = dict(model=str(root / "merged"), method="epmq", calibration={"a": str(root / "a.txt")},
                experts={"a": str(root / "expert0")}, bits=4, group_size=16, samples=4, seq_len=16,
                batch_size=2)
    config.write_text(yaml.safe_dump(base))
    assert main(["quantize", str(config), str(tmp_path / "ref"), "--quiet"]) == 0
    out, partial = tmp_path / "w4", tmp_path / "w4.resume"
    assert _quantize_stopped_in_block(1, ["quantize", str(config), str(out), "--quiet"], monkeypatch) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not out.exists() and (partial / "model.layers.0.json").is_file()
    # (stopped in its first block: nothing kept, nothing to resume)
    assert _quantize_stopped_in_block(0, ["quantize", str(config), str(tmp_path / "other"), "--quiet"],
                                      monkeypatch) == 130
    assert "nothing was kept to resume from: a rerun starts over" in capsys.readouterr().err

    config.write_text(yaml.safe_dump({**base, "anchor": 0.5}))
    assert main(["quantize", str(config), str(out), "--quiet"]) == 2
    assert re.search(r"another walk \(anchor: 1.0 then, 0.5 now\).*--fresh", capsys.readouterr().err)
    config.write_text(yaml.safe_dump(base))
    assert main(["quantize", str(config), str(out), "--quiet"]) == 0
    assert "(1 blocks loaded from the interrupted run)" in capsys.readouterr().out
    assert not partial.exists()
    ref, got = (epmq.checkpoint_io.CheckpointReader(d) for d in (tmp_path / "ref", out))
    assert sorted(ref.keys()) == sorted(got.keys())
    assert all(torch.equal(ref.get(k), got.get(k)) for k in ref.keys())
    assert json.loads((out / REPORT_FILE).read_text())["resumed"] == ["model.layers.0"]

    partial.write_text("mine")  # not a directory (a file of the user's): refused, --fresh too, and kept
    for fresh in ([], ["--fresh"]):
        assert main(["quantize", str(config), str(out), "--quiet", *fresh]) == 2
        assert f"resume_dir {partial} exists and is not a directory" in capsys.readouterr().err
    assert partial.read_text() == "mine"
    partial.unlink()
    partial.mkdir()
    (partial / "walk.json").write_text("{}")  # a stale directory: --fresh discards it
    assert main(["quantize", str(config), str(tmp_path / "w4"), "--quiet", "--fresh"]) == 0
    assert json.loads((out / REPORT_FILE).read_text())["resumed"] == [] and not partial.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_cli_removes_a_linked_resume_directory_s_blocks_once_done(files, tmp_path, capsys, monkeypatch):
    """OUT.resume a link to another disk (fast scratch beside an output on a network disk): the
    clean-up after the checkpoint was written (shutil.rmtree, which refuses a link) failed without
    a word, so every block (a whole quantized model) stayed there, and the next command into OUT
    with other settings was refused as another walk's. The walk's files are removed from it, and
    then the link; a file of the user's there is kept."""
    config = tmp_path / "q.yaml"
    base = dict(model=str(files / "merged"), method="gptq", calibration={"a": str(files / "a.txt")},
                bits=4, group_size=16, samples=4, seq_len=16, batch_size=2)
    config.write_text(yaml.safe_dump(base))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.json").write_text("{}")
    out, partial = tmp_path / "w4", tmp_path / "w4.resume"
    partial.symlink_to(scratch)
    assert _quantize_stopped_in_block(1, ["quantize", str(config), str(out), "--quiet"], monkeypatch) == 130
    assert (scratch / "model.layers.0.json").is_file()
    assert main(["quantize", str(config), str(out), "--quiet"]) == 0
    assert "(1 blocks loaded from the interrupted run)" in capsys.readouterr().out
    assert not os.path.lexists(partial)
    assert sorted(p.name for p in scratch.iterdir()) == ["notes.json"]
    config.write_text(yaml.safe_dump({**base, "bits": 3}))  # (another walk: nothing left to refuse it)
    assert main(["quantize", str(config), str(out), "--quiet"]) == 0


def test_cli_says_the_blocks_a_failed_quantization_kept(files, tmp_path, capsys, monkeypatch):
    """A disk that filled up in the second block (or any error past the first) ended in the bare
    OSError, naming a file in OUT.resume, with nothing said of the block kept there (Ctrl-C's
    message says the same command resumes): a user freeing space might delete hours of blocks.
    The error says how many blocks are kept and that a rerun with the same settings resumes; a
    refused resume_dir, or a walk that kept none, says nothing of it."""
    import errno

    from epmq import resume

    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(files / "merged"), method="gptq",
                                          calibration={"a": str(files / "a.txt")}, bits=4, group_size=16,
                                          samples=4, seq_len=16, batch_size=2)))
    out, partial = tmp_path / "w4", tmp_path / "w4.resume"
    save = resume.save_safetensors

    def full(tensors, path, metadata=None):
        if "layers.1" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(tensors, path, metadata)

    with monkeypatch.context() as m:
        m.setattr(resume, "save_safetensors", full)
        assert main(["quantize", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert f"1 block done is kept in {partial}: a rerun with the same settings (without --fresh) resumes" in err, err
    with monkeypatch.context() as m:  # (no block kept: nothing said)
        m.setattr(resume, "save_safetensors", lambda *a, **k: full({}, "layers.1"))
        assert main(["quantize", str(config), str(tmp_path / "other"), "--quiet"]) == 2
    assert "kept in" not in capsys.readouterr().err
    config.write_text(config.read_text().replace("bits: 4", "bits: 3"))  # (refused: its own remedy)
    assert main(["quantize", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another walk" in err and "kept in" not in err


def test_cli_resumes_every_block_when_the_save_was_refused_for_its_format(files, tmp_path, capsys):
    """checkpoint_format: gptq refused at the save (a zero point of 0, which v1 cannot hold) after every block
    was solved: the error said a rerun "with the same settings" resumes, and with the same checkpoint_format it
    is refused again. The checkpoint's settings are said to be free to change, and changed they resume."""
    model = transformers.AutoModelForCausalLM.from_pretrained(files / "merged")
    with torch.no_grad():  # a row of weights all >= 0: its min-max zero point is 0
        model.model.layers[1].mlp.up_proj.weight[0].abs_()
    shutil.copytree(files / "merged", tmp_path / "merged")
    model.save_pretrained(tmp_path / "merged")
    config = tmp_path / "q.yaml"
    base = dict(model=str(tmp_path / "merged"), method="gptq", calibration={"a": str(files / "a.txt")}, bits=4,
                group_size=16, samples=4, seq_len=16, batch_size=2)
    config.write_text(yaml.safe_dump(dict(base, checkpoint_format="gptq")))
    out = tmp_path / "w4"
    assert main(["quantize", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj has zero points equal to 0" in err and "gptq_v2" in err
    assert "2 blocks done are kept" in err and "(checkpoint_format and max_shard_size may change)" in err, err
    config.write_text(yaml.safe_dump(dict(base, checkpoint_format="gptq_v2", max_shard_size="1MB")))
    assert main(["quantize", str(config), str(out), "--quiet"]) == 0
    assert "(2 blocks loaded from the interrupted run)" in capsys.readouterr().out
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"


def test_cli_says_the_blocks_kept_when_the_device_runs_out_of_memory(files, tmp_path, capsys, monkeypatch):
    """A GPU out of memory in a late block (torch.OutOfMemoryError, a RuntimeError) ended in a
    traceback with nothing said of the blocks kept in OUT.resume, which a disk that filled up
    says: it is said as that is, the blocks kept named; another error keeps its traceback, with
    the blocks kept said beneath it."""
    from epmq import walker

    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(files / "merged"), method="gptq",
                                          calibration={"a": str(files / "a.txt")}, bits=4, group_size=16,
                                          samples=4, seq_len=16, batch_size=2)))
    out, partial = tmp_path / "w4", tmp_path / "w4.resume"
    solve = walker._Walk._solve

    def failing(error):
        def solve_or_fail(self, linear, stats, name, factors=None):
            if ".layers.1." in name:
                raise error
            return solve(self, linear, stats, name, factors)
        return solve_or_fail

    with monkeypatch.context() as m:
        m.setattr(walker._Walk, "_solve", failing(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
        assert main(["quantize", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "OutOfMemoryError: CUDA out of memory" in err, err
    assert f"1 block done is kept in {partial}: a rerun with the same settings (without --fresh) resumes" in err, err
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="a bug") as raised:
        m.setattr(walker._Walk, "_solve", failing(RuntimeError("a bug")))
        main(["quantize", str(config), str(out), "--quiet"])
    assert any(f"1 block done is kept in {partial}" in note for note in raised.value.__notes__)
    assert main(["quantize", str(config), str(out), "--quiet"]) == 0  # (resumed)
    assert "(1 blocks loaded from the interrupted run)" in capsys.readouterr().out



def test_epmq_quantize_shows_the_checkpoint_s_write_unless_quiet(files, tmp_path, capsys):
    """After the walk's bar, the checkpoint's write (minutes for a large model) had none: it has
    one, and --quiet silences it with the others."""
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(files / "merged"), method="rtn", bits=4, group_size=16)))
    assert main(["quantize", str(config), str(tmp_path / "w4")]) == 0
    assert "save w4: 100%" in capsys.readouterr().err
    assert main(["quantize", str(config), str(tmp_path / "w4q"), "--quiet"]) == 0
    assert "save w4q" not in capsys.readouterr().err


@pytest.mark.parametrize("error, message, said", [
    (torch.OutOfMemoryError, "CUDA out of memory", "OutOfMemoryError: CUDA out of memory"),
    # (the CPU's, epmq quantize's default device: a plain RuntimeError, which ended in a traceback)
    (RuntimeError, "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes.",
     "RuntimeError: DefaultCPUAllocator: can't allocate memory"),
    (ValueError, "a check of the block's own", "a check of the block's own")])
def test_cli_says_which_block_and_item_a_failed_quantization_ran(error, message, said, files, tmp_path, capsys,
                                                                 monkeypatch):
    """The walk notes an error a block raises with the block, the calibration item and the pass;
    ``epmq quantize`` printed a ValueError or an out-of-memory error as its message alone, the note
    dropped: it is printed beneath the message, before the blocks kept."""
    import functools

    from transformers.models.llama import modeling_llama

    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(files / "merged"), method="gptq",
                                          calibration={"a": str(files / "a.txt")}, bits=4, group_size=16,
                                          samples=4, seq_len=16, batch_size=2)))
    forward = modeling_llama.LlamaDecoderLayer.forward

    @functools.wraps(forward)  # (its signature: the walker binds the arguments by it)
    def failing(self, *args, **kwargs):
        if self.self_attn.layer_idx == 1:
            raise error(message)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", failing)
    assert main(["quantize", str(config), str(tmp_path / "w4"), "--quiet"]) == 2
    err = capsys.readouterr().err
    # (and out of memory, what the walk held there: _memory_note)
    held = r"\(out of memory on cpu in block 'model\.layers\.1', the walk holding there .*\)\n" \
        if error is not ValueError else ""
    assert re.search(rf"error: {said}.*\n\(while the walk ran block 'model\.layers\.1' on calibration\['a'\] "
                     rf"item 0: the probe of which linears it calls\)\n{held}1 block done is kept", err), err


# --------------------------------------------------------------------------- vision towers


def _clip_vision(seed):
    torch.manual_seed(seed)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8))


def _write_images(directory, n, seed, size=20):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        sub = directory / f"class{i % 2}"  # an ImageFolder layout
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(size, size + 4, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"{i}.png")


def test_images_converted_as_the_image_processor_converts_them(tmp_path):
    """Transparency onto white, as the checkpoint's own processor does (dropping the alpha made
    it black); 16-bit images scaled to 8 bits (PIL's convert clips them: nearly all white)."""
    import numpy as np
    from PIL import Image

    _clip_vision(0).save_pretrained(tmp_path / "m")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:15, 5:15] = (255, 0, 0, 255)  # a red square on a transparent background
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    ours = image_batches([tmp_path / "rgba.png"], processor, samples=1)[0]["pixel_values"]
    with Image.open(tmp_path / "rgba.png") as image:
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs)
    ramp = np.linspace(0, 65535, 20 * 20).reshape(20, 20).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "g8.png")
    g16, g8 = (image_batches([tmp_path / f], processor, samples=1)[0]["pixel_values"] for f in ("g16.png", "g8.png"))
    torch.testing.assert_close(g16, g8, atol=0.02, rtol=0)
    Image.MAX_IMAGE_PIXELS, limit = 100, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(ValueError, match="cannot read image .*g8.png"):
            image_batches([tmp_path / "g8.png"], processor, samples=1)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_float_images_are_read_on_one_scale_and_refused_off_it(tmp_path):
    """A float ('F') image, of no fixed range, was scaled by its own maximum where that passed 1: of one
    dataset's images, a value 0.5 read 128 in one whose brightest pixel was 1 and 85 in one whose was 1.5, and a
    dark image on Pillow's 0..255 scale (values to 100) came out white. Float images are read on [0, 1] (0
    black, 1 white), the scale of float image data, whatever the image's own maximum; one with values off
    it (past half an 8-bit step) or not finite is refused, naming the file and its range."""
    from PIL import Image

    class Pixels:  # (a processor handing back the RGB images it is given)
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(i).copy()) for i in images])}

    def write(name, values):
        Image.fromarray(np.asarray(values, dtype=np.float32).reshape(1, -1)).save(tmp_path / name)
        return tmp_path / name

    def read(f):
        return image_batches([f], Pixels(), samples=1)[0]["pixel_values"][0, 0, :, 0].tolist()

    assert read(write("dim.tiff", [0.0, 0.25, 0.5])) == [0, 64, 128]
    assert read(write("full.tiff", [0.0, 0.5, 1.0, 1.001])) == [0, 128, 255, 255]  # (1.001: within half a step)
    for name, values, got in (("over.tiff", [0.0, 0.5, 1.5], r"\[0, 1\.5\]"),
                              ("bytes.tiff", [0.0, 50.0, 100.0], r"\[0, 100\]"),
                              ("negative.tiff", [-0.5, 0.5], r"\[-0\.5, 0\.5\]"),
                              ("nan.tiff", [0.0, float("nan")], "not a finite number")):
        with pytest.raises(ValueError, match=f"image .*{name}: .*{got}"):
            read(write(name, values))


def test_a_processor_that_returns_no_tensors_is_refused_by_name(tmp_path):
    """An image processor that gives its pixel values as a list of arrays (one that ignores return_tensors='pt',
    or images of other sizes it cannot stack) made every calibration batch {}: its values were dropped as no
    tensors, in silence, and the walk ran the model on no input; refused naming the processor and what it gave."""
    from PIL import Image

    class Listed:
        def __call__(self, images, return_tensors):
            return {"pixel_values": [np.asarray(i) for i in images]}

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"calibration: the image processor Listed gave no tensors \(pixel_values: "
                                         r"list\)"):
        image_batches([tmp_path / "a.png"], Listed(), samples=1)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone's JPEG is stored sideways with an EXIF orientation: calibrated upright, as
    transformers' load_image (pipelines) reads it, not sideways."""
    import numpy as np
    from PIL import Image
    from transformers.image_utils import load_image

    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # white left half: turned, the top half or the bottom half
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    ours = image_batches([tmp_path / "photo.jpg"], processor, samples=1)[0]["pixel_values"]
    theirs = processor(images=[load_image(str(tmp_path / "photo.jpg"))], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs)


def test_clip_vision_tower_from_image_folders(tmp_path):
    _clip_vision(0).save_pretrained(tmp_path / "merged")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(tmp_path / "merged")
    experts, noise = {}, torch.Generator().manual_seed(1)
    for k, task in enumerate(("cars", "dtd")):
        perturb(_clip_vision(0), noise, scale=0.1).save_pretrained(tmp_path / task)
        experts[task] = tmp_path / task
        _write_images(tmp_path / "images" / task, 7, seed=k)
    calibration = {t: tmp_path / "images" / t for t in experts}
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4", spec=spec, method="epmq",
                                   calibration=calibration, experts=experts, anchor=0.1,
                                   samples=5, batch_size=2, progress=False)
    # by hand: the same five images of each task, the model's own processor, quantize_model
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "merged")
    seeds = epmq.calibration.task_seeds(0, calibration)  # (each task its own draw)
    batches = {t: image_batches(image_files(p), processor, samples=5, batch_size=2, seed=seeds[t])
               for t, p in calibration.items()}
    assert [b["pixel_values"].shape for b in batches["cars"]] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "merged")
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.pooler_output, method="epmq",
                                 experts=experts, anchor=0.1)
    assert (out / "preprocessor_config.json").is_file()
    with pytest.warns(UserWarning, match="fewer than samples"):
        image_batches(image_files(calibration["cars"]), processor, samples=50)
    with pytest.raises(ValueError, match="no image files"):
        image_files(tmp_path / "merged")


def assert_refused(source, tmp_path, match, **kwargs):
    """``quantize_checkpoint`` of the checkpoint ``source`` stops with ``match`` before it reads
    any calibration (the calibration given is a directory of nothing, beside the output)."""
    (tmp_path / "nothing").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match):
        epmq.quantize_checkpoint(source, tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                 method="gptq", calibration={"a": tmp_path / "nothing"}, progress=False, **kwargs)


def _tiny_clip(directory=None):
    """A two-tower CLIPModel of one layer a tower; saved to ``directory`` with an image processor of
    its 16-pixel images where one is given."""
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8), projection_dim=16))
    if directory is not None:
        clip.save_pretrained(directory)
        transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                        ).save_pretrained(directory)
    return clip


def test_two_tower_models_and_their_vision_tower(tmp_path):
    clip = _tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    assert_refused(tmp_path / "clip", tmp_path, "takes both texts and images: quantize its vision tower")
    assert_refused(tmp_path / "clip", tmp_path, "tower must be 'vision'", tower="text")
    transformers.CLIPVisionModel(clip.config.vision_config).save_pretrained(tmp_path / "vision")
    assert_refused(tmp_path / "vision", tmp_path, "CLIPVisionModel is not a two-tower model: leave tower: out",
                   tower="vision")
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    # the vision tower of the two-tower checkpoint, calibrated on images
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(tmp_path / "clip")
    _write_images(tmp_path / "images", 4, seed=3)
    out = epmq.quantize_checkpoint(tmp_path / "clip", tmp_path / "out", spec=spec, method="gptq",
                                   calibration={"a": tmp_path / "images"}, tower="vision",
                                   samples=4, batch_size=2, progress=False)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "clip")
    batches = {"a": image_batches(image_files(tmp_path / "images"), processor, samples=4, batch_size=2)}
    model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip")
    loaded = assert_quantize_model_equals(out, model, spec, batches, lambda o: o.pooler_output,
                                          method="gptq")
    assert type(loaded).__name__ == "CLIPVisionModel"


def test_a_checkpoint_lacking_a_weight_of_its_model_is_refused(tmp_path):
    """A checkpoint without one of the model's tensors (a file edited by hand; a merge of open_clip's
    LAION file written under transformers' config, every tensor under open_clip's names): from_pretrained
    initialised it at random, said only in transformers' load report (beside the text tower's keys a
    vision tower does not load), and the walk quantized the noise into a checkpoint. Refused naming it."""
    from safetensors.torch import load_file, save_file

    _tiny_clip(tmp_path / "clip")
    tensors = load_file(tmp_path / "clip" / "model.safetensors")
    del tensors["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(tensors, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    _write_images(tmp_path / "images", 2, seed=3)
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError, match=r"clip holds no 'encoder\.layers\.0\.mlp\.fc1\.weight' of "
                                             r"CLIPVisionModel: from_pretrained would leave it random"):
            epmq.quantize_checkpoint(tmp_path / "clip", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                     method=method, tower="vision", progress=False,
                                     **({} if method == "rtn" else
                                        dict(calibration={"a": tmp_path / "images"}, samples=2, batch_size=2)))
        assert not (tmp_path / "out").exists()


class _Reported(logging.Handler):
    """The messages transformers logs while installed (its handler writes to the stderr of its import,
    which pytest's capture fixtures do not see)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def test_a_vision_tower_load_reports_no_tensor_of_the_other_tower(tmp_path):
    """tower: vision loads the vision tower's class from the two-tower checkpoint, and transformers' load report
    listed every tensor it leaves out on purpose (the text tower's, both projections, the logit scale) as
    UNEXPECTED, 'not ok if you expect identical arch', even under --quiet. They are not reported; a tensor
    missing, or one inside the tower the model has no place for, still is (and the former refused)."""
    from safetensors.torch import load_file, save_file

    _tiny_clip(tmp_path / "clip")

    def quantize():
        return epmq.quantize_checkpoint(tmp_path / "clip", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                        method="rtn", tower="vision", progress=False)

    with _Reported() as reported:
        quantize()
    assert not any("LOAD REPORT" in m for m in reported.messages), reported.messages
    # (the class's own patterns are left as they were: a load of its own reports the text tower as before)
    assert "_keys_to_ignore_on_load_unexpected" not in vars(transformers.CLIPVisionModel)
    with _Reported() as reported:
        transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip")
    assert "text_model.final_layer_norm.weight" in "".join(reported.messages)

    tensors = load_file(tmp_path / "clip" / "model.safetensors")
    del tensors["vision_model.encoder.layers.0.mlp.fc1.weight"]
    tensors["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(64, 32)  # (a layer the config has not)
    save_file(tensors, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "out")
    with _Reported() as reported, pytest.raises(
            ValueError, match=r"clip holds no 'encoder\.layers\.0\.mlp\.fc1\.weight' of CLIPVisionModel"):
        quantize()
    # (transformers 5 names a tensor of the tower by its name in the tower; 4 by the checkpoint's)
    rows = {(key.strip().removeprefix("vision_model."), status.strip())
            for key, status, *_ in (line.split("|") for m in reported.messages for line in m.splitlines()
                                    if "|" in line)}
    assert {("encoder.layers.0.mlp.fc1.weight", "MISSING"), ("encoder.layers.1.mlp.fc1.weight", "UNEXPECTED")
            } <= rows, rows
    assert not any(key.startswith(("text_", "logit_", "visual_")) for key, _ in rows), rows


def test_a_vision_tower_load_leaves_another_threads_load_of_the_class_as_it_is(tmp_path, monkeypatch):
    """tower: vision's load set the two-tower checkpoint's other tensors as the vision class's patterns of
    keys to ignore for the load's duration: a load of that class in another thread meanwhile (a server
    loading models side by side) built its model with them, and its report said nothing of tensors it left
    unloaded. Two loads at once, the vision tower's held inside from_pretrained while the other runs whole:
    the other sees the text tower's tensors as unexpected, the class is left as it was, and the vision
    tower's model is the class's own."""
    import threading

    from epmq.quantize_files import _load_unreporting, _two_tower_keys

    _tiny_clip(tmp_path / "clip")
    cls = transformers.CLIPVisionModel
    inside, other_done = threading.Event(), threading.Event()
    adjust = transformers.PreTrainedModel._adjust_missing_and_unexpected_keys

    def held(self, loading_info):  # (the vision tower's load waits here, its model built, until the other's ends)
        if threading.current_thread().name == "tower":
            inside.set()
            assert other_done.wait(60)
        return adjust(self, loading_info)

    monkeypatch.setattr(transformers.PreTrainedModel, "_adjust_missing_and_unexpected_keys", held)
    loaded = {}
    tower = threading.Thread(name="tower", target=lambda: loaded.update(tower=_load_unreporting(
        cls, tmp_path / "clip", _two_tower_keys(tmp_path / "clip"))))
    tower.start()
    assert inside.wait(60)
    try:
        _, loaded["other"] = cls.from_pretrained(tmp_path / "clip", output_loading_info=True)
    finally:
        other_done.set()
        tower.join(60)
    assert "text_model.final_layer_norm.weight" in loaded["other"]["unexpected_keys"]
    net, loading = loaded["tower"]
    assert not loading["unexpected_keys"] and type(net) is cls
    assert "_keys_to_ignore_on_load_unexpected" not in vars(cls)


def test_siglip2_vision_tower_gets_its_patches_mask_and_grid(tmp_path):
    """SigLIP 2's (NaFlex) processor gives each image's patches with their mask and grid, which
    its vision tower's forward requires: the calibration batches keep them (pixel_values alone
    stopped every run with "missing 2 required positional arguments"), and the checkpoint equals
    quantize_model's on the same batches, images of two sizes padded to one patch count."""
    from PIL import Image

    torch.manual_seed(0)
    siglip2 = transformers.Siglip2Model(transformers.Siglip2Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, num_patches=16)))
    siglip2.save_pretrained(tmp_path / "siglip2")
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path / "siglip2")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "images").mkdir()
    for i, (h, w) in enumerate([(20, 24), (30, 14), (16, 40), (24, 24)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "siglip2", tmp_path / "out", spec=spec, method="gptq",
                                   calibration={"a": tmp_path / "images"}, tower="vision",
                                   samples=4, batch_size=2, progress=False)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "siglip2")
    batches = {"a": image_batches(image_files(tmp_path / "images"), processor, samples=4, batch_size=2)}
    assert set(batches["a"][0]) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert any(not bool(b["pixel_attention_mask"].all()) for b in batches["a"])  # (padded patches)
    model = transformers.Siglip2VisionModel.from_pretrained(tmp_path / "siglip2")
    loaded = assert_quantize_model_equals(out, model, spec, batches, lambda o: o.pooler_output, method="gptq")
    assert type(loaded).__name__ == "Siglip2VisionModel"


@pytest.mark.cuda
def test_quantize_checkpoint_on_the_gpu(files, tmp_path):
    """The same command with the model on the GPU (Triton statistics and solver): a checkpoint
    as good as the CPU's, by the per-layer loss it reports."""
    root = files
    kwargs = dict(spec=epmq.QuantSpec(bits=4, group_size=16, sym=True), method="epmq",
                  calibration={"a": root / "a.txt", "b": root / "b.jsonl"},
                  experts={"a": root / "expert0", "b": root / "expert1"}, anchor=0.1,
                  samples=6, seq_len=16, batch_size=4, progress=False)
    cpu = epmq.quantize_checkpoint(root / "merged", tmp_path / "cpu", **kwargs)
    gpu = epmq.quantize_checkpoint(root / "merged", tmp_path / "gpu", device="cuda", **kwargs)
    loss = {d: sum(layer["loss"] for layer in json.loads((d / REPORT_FILE).read_text())["layers"])
            for d in (cpu, gpu)}
    assert loss[gpu] <= 1.05 * loss[cpu]
    model = epmq.load_quantized(gpu, device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]], device="cuda")).logits).all()


# --------------------------------------------------------------------------- encoder-decoders


def test_t5_from_input_target_pairs(tmp_path):
    from epmq.benches.tiny import t5_tokenizer
    from epmq.calibration import pair_batches, read_pairs

    tok = t5_tokenizer(tmp_path / "merged")
    config = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    merged = transformers.T5ForConditionalGeneration(config)
    merged.save_pretrained(tmp_path / "merged")
    experts, calibration, noise = {}, {}, torch.Generator().manual_seed(1)
    for k, task in enumerate(("sst2", "rte")):
        perturb(merged, noise, scale=0.1).save_pretrained(tmp_path / task)
        experts[task] = tmp_path / task
        # (the second task's file in TRL's prompt/completion form)
        keys = ("input", "target") if k == 0 else ("prompt", "completion")
        pairs = [dict(zip(keys, (s, "positive" if i % 2 else "negative"))) for i, s in enumerate(sentences(k, 9))]
        calibration[task] = tmp_path / f"{task}.jsonl"
        calibration[task].write_text("\n".join(json.dumps(p) for p in pairs))
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4", spec=spec, method="epmq",
                                   calibration=calibration, experts=experts, anchor=0.1,
                                   samples=6, seq_len=24, batch_size=4, progress=False)
    seeds = epmq.calibration.task_seeds(0, calibration)  # (each task its own draw)
    batches = {t: pair_batches(read_pairs(p), tok, samples=6, seq_len=24, batch_size=4, seed=seeds[t])
               for t, p in calibration.items()}
    first = batches["sst2"][0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    # nothing padded: a batch holds pairs of the same token lengths, and the statistics are
    # those of batch size 1 (padding used to be counted as tokens)
    assert sum(b["labels"].shape[0] for b in batches["sst2"]) == 6
    assert all(bool((b["labels"] >= 0).all()) and bool(b["attention_mask"].all()) for b in batches["sst2"])
    single = pair_batches(read_pairs(calibration["sst2"]), tok, samples=6, seq_len=24, batch_size=1,
                          seed=seeds["sst2"])
    positions = {bs: [sum(b[k].numel() for b in got) for k in ("input_ids", "labels")]
                 for bs, got in ((4, batches["sst2"]), (1, single))}
    assert positions[4] == positions[1]  # (padded, batches of 4 held more positions)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="epmq",
                                 experts=experts, anchor=0.1)
    report = json.loads((out / REPORT_FILE).read_text())
    assert any(".decoder." in layer["name"] or layer["name"].startswith("decoder.") for layer in report["layers"])
    (tmp_path / "bad.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with 'input' and 'target'"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ValueError, match="input/target pairs"):
        read_pairs(tmp_path / "plain.txt")


def test_an_output_directory_of_the_user_is_refused_before_the_walk(files, tmp_path, capsys, monkeypatch):
    """Not after hours of quantizing: at once, and with nothing left behind."""
    import epmq.quantize_files

    root = files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(root / "merged"), method="gptq", bits=4, group_size=16,
                                          calibration={"a": str(root / "a.txt")}, samples=2, seq_len=8)))
    monkeypatch.setattr(epmq.quantize_files, "quantize_model", lambda *a, **k: pytest.fail("the walk ran"))
    assert main(["quantize", str(config), str(tmp_path / "mine"), "--quiet"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "mine.resume").exists()


def test_a_misspelt_target_path_or_residual_precision_is_refused_before_the_model_is_read(files, tmp_path, capsys,
                                                                                         monkeypatch):
    """Not after the model is loaded and every task's files tokenized (minutes for a large model):
    at once, as a misspelt checkpoint_format is."""
    import epmq.quantize_files

    root = files
    monkeypatch.setattr(epmq.quantize_files, "calibrated", lambda *a, **k: pytest.fail("the calibration was read"))
    config = tmp_path / "q.yaml"
    base = dict(model=str(root / "merged"), method="epmq", bits=4, group_size=16, experts={"a": str(root / "expert0")},
                calibration={"a": str(root / "a.txt")}, samples=2, seq_len=8)
    for change, match in [(dict(targets="expert-path"), "targets must be one of .*got 'expert-path'"),
                          (dict(targets="expert_path", method="gptq", experts=None),
                           "targets='expert_path' needs experts: use method='epmq'"),
                          (dict(residual_precision="bf16"), "residual_precision must be one of .*got 'bf16'")]:
        config.write_text(yaml.safe_dump({k: v for k, v in {**base, **change}.items() if v is not None}))
        assert main(["quantize", str(config), str(tmp_path / "x"), "--quiet"]) == 2
        assert re.search(match, capsys.readouterr().err)
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.resume").exists()
    with pytest.raises(ValueError, match="targets must be one of"):
        epmq.quantize_checkpoint(root / "merged", tmp_path / "x", spec=epmq.QuantSpec(), method="gptq",
                                 calibration={"a": root / "a.txt"}, targets="fp-path")


def test_layers_anchors_and_damping_that_cannot_run_are_refused_before_the_model_is_read(files, tmp_path, capsys,
                                                                                       monkeypatch):
    """epmq quantize's layers: "(" (a regular expression that does not compile), and
    quantize_checkpoint's anchor=-1, weight_anchor=nan or percdamp=-1 (which epmq quantize checks
    itself), were refused by quantize_model, once the model was loaded and every task's files
    tokenized (minutes for a large model); at once, naming the argument."""
    import epmq.quantize_files

    monkeypatch.setattr(epmq.quantize_files, "calibrated", lambda *a, **k: pytest.fail("the calibration was read"))
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(files / "merged"), method="gptq", bits=4, group_size=16,
                                          calibration={"a": str(files / "a.txt")}, samples=2, seq_len=8,
                                          layers="(")))
    assert main(["quantize", str(config), str(tmp_path / "x"), "--quiet"]) == 2
    assert "layers='(' is not a regular expression" in capsys.readouterr().err
    for change, match in [(dict(layers="mlp|("), "layers='mlp\\|\\(' is not a regular expression"),
                          (dict(anchor=-1), "anchor must be >= 0, got -1"),
                          (dict(weight_anchor=float("nan")), "weight_anchor must be a finite number, got nan"),
                          (dict(percdamp=-1, method="gptq", experts=None), "percdamp must be >= 0, got -1")]:
        options = {**dict(method="epmq", experts={"a": files / "expert0"}), **change}
        with pytest.raises(ValueError, match=match):
            epmq.quantize_checkpoint(files / "merged", tmp_path / "x", spec=epmq.QuantSpec(4, 16),
                                     calibration={"a": files / "a.txt"}, seq_len=8, progress=False, **options)
    assert list(tmp_path.iterdir()) == [config]


def test_a_vision_language_model_is_sent_to_its_language_model(tmp_path):
    """epmq quantize calibrates on texts or on images; a VLM takes both, and has no vision-tower
    class for tower: vision: both errors say what does quantize it."""
    from test_walker_towers import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "llava")
    assert_refused(tmp_path / "llava", tmp_path, "tower: language quantizes its language model, calibrated on texts")
    assert_refused(tmp_path / "llava", tmp_path, "LlavaForConditionalGeneration is a vision-language model: "
                   "tower: language quantizes its language model", tower="vision")


def test_mllamas_language_model_alone_is_refused_by_name(tmp_path):
    """On text alone Mllama skips its cross-attention layers, and the walk calls every block in
    turn: tower: language failed every run with 'block 2 is called where block 1 is next'. Named
    up front, with what does quantize it (only the config is read)."""
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1, 3], pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=16, patch_size=8, max_num_tiles=1, vision_output_dim=96,
                  intermediate_layers_indices=[0, 1], supported_aspect_ratios=[[1, 1]])
    config = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=299)
    config.architectures = ["MllamaForConditionalGeneration"]
    config.save_pretrained(tmp_path / "mllama")
    assert_refused(tmp_path / "mllama", tmp_path, "MllamaForConditionalGeneration's language model skips its "
                   "cross-attention layers on text alone.*epmq.quantize_model on \\(image, text\\) samples",
                   tower="language")


def test_mllamas_language_model_saved_alone_is_refused_by_name(tmp_path):
    """transformers' AutoModelForCausalLM of a Llama 3.2 Vision checkpoint is its language model
    alone (MllamaForCausalLM, its cross-attention layers kept), which save_pretrained writes as
    such: epmq quantize of it loaded the model and its calibration texts, and failed in the walk
    ('block 2 is called where block 1 is next'). Named up front, as tower: language is."""
    config = transformers.MllamaTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           cross_attention_layers=[1, 3], pad_token_id=0)
    config.architectures = ["MllamaForCausalLM"]
    config.save_pretrained(tmp_path / "text")
    assert_refused(tmp_path / "text", tmp_path, "MllamaForCausalLM skips its cross-attention layers on text alone"
                   ".*epmq.quantize_model on \\(image, text\\) samples")


def test_rtn_of_mllamas_language_model_is_not_refused(tmp_path):
    """RTN walks no block (it reads no calibration): Mllama's language model, saved alone or as
    tower: language of the whole model, is quantized by it as before the walk's refusal of them."""
    text = transformers.MllamaTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         cross_attention_layers=[1, 3], pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=16, patch_size=8, max_num_tiles=1, vision_output_dim=96,
                  intermediate_layers_indices=[0, 1], supported_aspect_ratios=[[1, 1]])
    torch.manual_seed(0)
    transformers.MllamaForCausalLM(text).save_pretrained(tmp_path / "text")
    transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        text_config=text.to_dict(), vision_config=vision, image_token_index=299)).save_pretrained(tmp_path / "mllama")
    spec = epmq.QuantSpec(bits=4, group_size=16)
    for source, tower in ((tmp_path / "text", None), (tmp_path / "mllama", "language")):
        out = tmp_path / f"out-{source.name}"
        epmq.quantize_checkpoint(source, out, spec=spec, method="rtn", tower=tower, progress=False)
        layers = [r["name"] for r in json.loads((out / REPORT_FILE).read_text())["layers"]]
        assert any(".cross_attn." in name for name in layers) and any(".self_attn." in name for name in layers)


def test_tower_language_of_a_language_model_no_adapter_lists(tmp_path):
    """tower: language of Aria, whose vision tower an adapter walks (HF_ENCODERS) and whose MoE
    language model none lists: the default walk left the language model to no adapter, and the run
    was refused as 'no layer of AriaForConditionalGeneration is selected for quantization
    (layers=<function _within.<locals>.<lambda> at 0x...>)'; AUTO walks it, fused experts rebuilt,
    the same as quantize_model with AUTO on the language model's layers, and it loads back."""
    from test_walker_towers import aria_inputs, tiny_aria

    tiny_aria().save_pretrained(tmp_path / "aria")
    spec = epmq.QuantSpec(bits=4, group_size=16)
    out = epmq.quantize_checkpoint(tmp_path / "aria", tmp_path / "w4", spec=spec, method="rtn", tower="language",
                                   progress=False)
    layers = [r["name"] for r in json.loads((out / REPORT_FILE).read_text())["layers"]]
    assert layers and all(name.startswith("model.language_model.layers.") for name in layers)
    assert any(".mlp.experts.3.down_proj" in name for name in layers)
    model = tiny_aria()
    epmq.quantize_model(model, spec, method="rtn", adapter=epmq.adapters.AUTO, progress=False,
                        layers="^model.language_model.")
    item = aria_inputs(1, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        torch.testing.assert_close(epmq.load_quantized(out)(**item).logits, model(**item).logits)


def test_tower_language_does_not_warn_of_a_tower_it_leaves_out(tmp_path):
    """tower: language of Gemma 3n, whose audio tower no adapter knows: the run warned 'no adapter knows the
    blocks at model.audio_tower.conformer ... to quantize them too, walk them with epmq.adapters.AUTO', though
    the user had asked for the language model alone. Left out by layers=, as tower: language leaves it, it is
    not named; the default walk, which would take it, still names it."""
    from test_walker_towers import tiny_gemma3n

    tiny_gemma3n().save_pretrained(tmp_path / "gemma3n")
    spec = epmq.QuantSpec(bits=4, group_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = epmq.quantize_checkpoint(tmp_path / "gemma3n", tmp_path / "w4", spec=spec, method="rtn",
                                       tower="language", progress=False)
    assert not [w for w in caught if "no adapter knows" in str(w.message)]
    layers = [r["name"] for r in json.loads((out / REPORT_FILE).read_text())["layers"]]
    assert layers and all(name.startswith("model.language_model.") for name in layers)
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at model\.audio_tower\.conformer"):
        epmq.quantize_model(tiny_gemma3n(), spec, method="rtn", progress=False, layers="audio_tower|language_model")


def test_the_language_model_of_a_vision_language_model(files, tmp_path):
    """tower: language: a VLM's language model quantized from text files, the vision tower and
    projector left in full precision, the processor (tokenizer and image processor) saved beside
    it; the same as quantize_model with the language model's layers on the same windows."""
    from test_walker_towers import llava_inputs, tiny_llava

    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>")
    tiny_llava().save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    spec = epmq.QuantSpec(bits=4, group_size=16, sym=True)
    for layers in (None, "mlp"):
        out = epmq.quantize_checkpoint(tmp_path / "llava", tmp_path / f"w4-{layers}", spec=spec, method="gptq",
                                       calibration={"a": files / "a.txt"}, tower="language", layers=layers,
                                       samples=4, seq_len=16, batch_size=2, progress=False)
        model = tiny_llava()
        batches = {"a": text_windows(read_texts(files / "a.txt"), tok, samples=4, seq_len=16, batch_size=2)}
        expected = "model.language_model." + ("" if layers is None else ".*mlp")
        loaded = assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="gptq",
                                              layers=f"^{expected}")
        quantized = {n for n, m in loaded.named_modules() if isinstance(m, epmq.QuantLinear)}
        assert len(quantized) == (14 if layers is None else 6)
        assert all(re.match(expected, n) for n in quantized)
        full = [n for n, m in loaded.named_modules() if type(m) is torch.nn.Linear]
        assert sum("vision_tower" in n for n in full) == 12 and sum("projector" in n for n in full) == 2
        with torch.no_grad():  # (images still run through the full-precision tower)
            item = llava_inputs(1, torch.Generator().manual_seed(0))[0]
            torch.testing.assert_close(loaded(**item).logits, model(**item).logits)
        assert type(transformers.AutoProcessor.from_pretrained(out)).__name__ == "LlavaProcessor"
    assert_refused(files / "merged", tmp_path, "tower: language is for a vision-language model .* "
                   "LlamaForCausalLM is not one", tower="language")
    with pytest.raises(ValueError, match="tower must be 'vision' .* or 'language'"):
        epmq.quantize_checkpoint(files / "merged", tmp_path / "x", spec=spec, method="gptq",
                                 calibration={"a": files / "a.txt"}, tower="text")


def test_a_device_to_quantize_on_that_is_not_there_is_refused_before_the_model_is_read(files, tmp_path,
                                                                                       monkeypatch):
    """quantize_checkpoint(device="gpu") (or "cuda" with none, "meta") was refused only by
    quantize_model, after the whole model had been loaded and its calibration read (minutes for a
    large one), where load_quantized and merge_checkpoints refuse it up front (c09cbd8); refused
    before anything is read, naming the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def read(*args, **kwargs):
        raise AssertionError("the model was read before its device was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", read)
    for device, match in (("gpu", "device must name a torch device"), ("cuda", "torch sees no CUDA device"),
                          ("meta", "device='meta' holds no values")):
        with pytest.raises(ValueError, match=match):
            epmq.quantize_checkpoint(files / "merged", tmp_path / "out", spec=epmq.QuantSpec(bits=4), method="gptq",
                                     calibration={"math": files / "a.txt"}, seq_len=16, device=device,
                                     progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_model_directory_without_config_json_is_named(files, tmp_path):
    """An empty directory, bare weights, an open_clip checkpoint: no config.json to build a
    transformers model from, said so (it was 'AutoModelForCausalLM: its forward takes neither
    input_ids nor pixel_values')."""
    import shutil

    (tmp_path / "empty").mkdir()
    (tmp_path / "bare").mkdir()
    shutil.copy(next((files / "merged").glob("*.safetensors")), tmp_path / "bare")
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "open_clip_config.json").write_text("{}")
    for name in ("empty", "bare"):
        assert_refused(tmp_path / name, tmp_path, f"{tmp_path / name} has no config.json, which epmq "
                                                  f"builds the \\(transformers\\) model from$")
    assert_refused(tmp_path / "open_clip", tmp_path, "no config.json.*open_clip model is quantized from Python")


def test_inputs_that_cannot_be_quantized_are_named(files, tmp_path, capsys):
    """A quantized model, a model without a tokenizer (RTN, which reads no text, goes on without
    it), an output under a file: clear errors before any work, not transformers' tracebacks."""
    base = dict(model=str(files / "merged"), method="rtn", bits=4, group_size=16)
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(base))
    assert main(["quantize", str(config), str(tmp_path / "w4"), "--quiet"]) == 0
    config.write_text(yaml.safe_dump(dict(base, model=str(tmp_path / "w4"))))
    assert main(["quantize", str(config), str(tmp_path / "again"), "--quiet"]) == 2
    assert "w4 is a quantized checkpoint" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("a file")
    config.write_text(yaml.safe_dump(base))
    assert main(["quantize", str(config), str(tmp_path / "a.txt" / "w4"), "--quiet"]) == 2
    assert "a.txt is a file, not a directory" in capsys.readouterr().err
    gptq = dict(base, model=str(files / "expert0"), method="gptq", calibration={"a": str(files / "a.txt")},
                samples=2, seq_len=16)
    config.write_text(yaml.safe_dump(gptq))  # (expert0: saved without a tokenizer)
    assert main(["quantize", str(config), str(tmp_path / "x"), "--quiet"]) == 2
    assert "expert0 has no tokenizer that loads" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    config.write_text(yaml.safe_dump(dict(base, model=str(files / "expert0"))))
    with pytest.warns(UserWarning, match="the checkpoint is written without one"):
        assert main(["quantize", str(config), str(tmp_path / "rtn"), "--quiet"]) == 0
    assert (tmp_path / "rtn" / "quantize_config.json").is_file()


def test_a_model_without_tokenizer_files_is_not_given_transformers_placeholder(files, tmp_path, capsys):
    """transformers 5 builds a Qwen2 (GPT-2, BERT, T5, ...) checkpoint without tokenizer files a
    tokenizer of its special tokens alone, no error: GPTQ said the calibration documents were
    'empty or blank', and RTN wrote that one-token tokenizer beside the checkpoint in silence."""
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "qwen")
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(tmp_path / "qwen"), method="gptq", bits=4, group_size=16,
                                          calibration={"a": str(files / "a.txt")}, samples=2, seq_len=16)))
    assert main(["quantize", str(config), str(tmp_path / "gptq"), "--quiet"]) == 2
    assert "qwen has no tokenizer that loads (no tokenizer files" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(dict(model=str(tmp_path / "qwen"), method="rtn", bits=4, group_size=16)))
    with pytest.warns(UserWarning, match="no tokenizer files.*the checkpoint is written without one"):
        assert main(["quantize", str(config), str(tmp_path / "rtn"), "--quiet"]) == 0
    assert not {"tokenizer.json", "tokenizer_config.json"} & {f.name for f in (tmp_path / "rtn").iterdir()}


def test_pairs_of_one_input_length_and_other_target_lengths_are_batched_apart(tmp_path):
    """A batch holds pairs of the same input *and* target lengths: targets of other lengths under
    inputs of one length go to other batches, every pair once, nothing padded."""
    from epmq.benches.tiny import t5_tokenizer
    from epmq.calibration import pair_batches

    tok = t5_tokenizer(tmp_path / "tok")
    rng = random.Random(3)
    pairs = [(" ".join(rng.choice(WORDS) for _ in range(4)), " ".join(rng.choice(WORDS) for _ in range(1 + i % 3)))
             for i in range(9)]
    batches = pair_batches(pairs, tok, samples=9, seq_len=24, batch_size=8)
    want = sorted((tuple(tok(x)["input_ids"]), tuple(tok(text_target=y)["input_ids"])) for x, y in pairs)
    assert len({len(x) for x, _ in want}) == 1 and len({len(y) for _, y in want}) == 3
    got = sorted((tuple(b["input_ids"][r].tolist()), tuple(b["labels"][r].tolist()))
                 for b in batches for r in range(b["input_ids"].shape[0]))
    assert got == want
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert len(batches) == 3


def test_a_large_pairs_file_is_read_where_its_pairs_are_drawn(tmp_path, monkeypatch):
    """An encoder-decoder's .jsonl of input/target pairs (or JSON Lines under .json.gz, or .parquet
    rows) had every pair parsed and held while epmq quantize drew its `samples` of them (this 7.5 MB
    file of 8000 pairs: 12.6 MB traced at the peak for 128 pairs drawn; 1.4 MB streamed). Read streamed
    (as epmq quantize reads it),
    each pair is counted once and the drawn ones read again, in file order, each file once: the
    same batches, the files closed, a file rewritten in between refused."""
    import gzip
    import os
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from epmq import calibration
    from epmq.benches.tiny import t5_tokenizer
    from epmq.quantize_files import calibrated

    tok = t5_tokenizer(tmp_path / "t5")
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "t5")
    rng = random.Random(0)
    records = []
    for k in range(8000):
        x = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 300)))
        y = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        records.append({"prompt": x, "completion": y} if k % 3 == 0 else {"input": x, "target": y, "id": k})
    body = "\n".join(json.dumps(r) for r in records) + "\n\n"
    (tmp_path / "big.jsonl").write_text(body)
    (tmp_path / "train.json.gz").write_bytes(gzip.compress(body.encode(), compresslevel=1))
    pq.write_table(pa.table({"input": [r.get("input", r.get("prompt")) for r in records],
                             "target": [r.get("target", r.get("completion")) for r in records]}),
                   tmp_path / "train.parquet", row_group_size=500)
    size = (tmp_path / "big.jsonl").stat().st_size
    options = dict(samples=128, seq_len=32, batch_size=8, seed=5)
    for name in ("big.jsonl", "train.json.gz", "train.parquet"):
        whole = read_pairs(tmp_path / name)
        tracemalloc.start()
        try:
            streamed = read_pairs(tmp_path / name, stream=True)
            batches = pair_batches(streamed, tok, **options)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < size / 3, (name, peak, size)  # (read whole: 1.5 x size and more)
        expected = pair_batches(whole, tok, **options)
        assert len(batches) == len(expected) and all(
            b.keys() == e.keys() and all(torch.equal(b[k], e[k]) for k in b) for b, e in zip(batches, expected))
        assert len(streamed) == len(whole) and tuple(streamed[7]) == whole[7]
    # epmq quantize reads them so
    tracemalloc.start()
    try:
        _, _, batches = calibrated(tmp_path / "t5", {"t": tmp_path / "big.jsonl"}, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 3, peak
    assert all(torch.equal(b["labels"], e["labels"]) for b, e in zip(batches["t"], expected))
    # the pairs drawn are read in one pass through the file, not one a pair
    opened, text_lines = [], calibration._text_lines
    monkeypatch.setattr(calibration, "_text_lines",
                        lambda path, *a, **k: opened.append(path) or text_lines(path, *a, **k))
    streamed = read_pairs(tmp_path / "big.jsonl", stream=True)
    opened.clear()
    pair_batches(streamed, tok, **options)
    assert opened == [tmp_path / "big.jsonl"]
    monkeypatch.undo()
    # a directory of many files: none left open
    (tmp_path / "many").mkdir()
    for k in range(300):
        (tmp_path / "many" / f"{k:04d}.jsonl").write_text("\n".join(json.dumps(r) for r in records[2 * k:2 * k + 2]))
    if os.path.isdir("/proc/self/fd"):
        before = len(os.listdir("/proc/self/fd"))
        streamed = read_pairs(tmp_path / "many", stream=True)
        batches = pair_batches(streamed, tok, **options)
        assert len(os.listdir("/proc/self/fd")) == before
        expected = pair_batches(read_pairs(tmp_path / "many"), tok, **options)
        assert all(torch.equal(b["input_ids"], e["input_ids"]) for b, e in zip(batches, expected))
    # rewritten between its count and the draw: refused, not other pairs at the places counted
    path = tmp_path / "many" / "0000.jsonl"
    streamed = read_pairs(path, stream=True)
    path.write_text(json.dumps({"input": "other", "target": "pair"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: changed since it was opened")):
        pair_batches(streamed, tok, samples=2, seq_len=8)


def test_pairs_longer_than_seq_len_are_cut_with_a_warning(tmp_path):
    """seq_len cut a pair's input and target to its tokens in silence (the help and README said
    it only of a language model's windows): the model calibrated on the start of each document."""
    from epmq.benches.tiny import t5_tokenizer
    from epmq.calibration import pair_batches

    tok = t5_tokenizer(tmp_path / "tok")
    pairs = [("cat " * 12, "dog"), ("cat", "dog")]
    longest = len(tok(pairs[0][0])["input_ids"])
    with pytest.warns(UserWarning, match=rf"1 of the 2 pairs drawn have an input or target longer than seq_len=8 "
                                         rf"tokens, cut to it \(the longest: {longest}\)"):
        batches = pair_batches(pairs, tok, samples=2, seq_len=8)
    assert max(b["input_ids"].shape[1] for b in batches) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair_batches(pairs, tok, samples=2, seq_len=longest)


def test_a_pair_of_no_target_tokens_is_named(tmp_path):
    """A tokenizer that adds no end-of-sequence token makes an empty target no tokens at all:
    labels of no position crashed the walk with argmax's IndexError, naming neither the pair nor
    the labels. pair_batches names the pair; the walk names labels given so from Python."""
    from epmq.benches.tiny import word_level_tokenizer
    from epmq.calibration import pair_batches

    tok = word_level_tokenizer(tmp_path / "tok", ["<unk>", "<pad>", "the", "cat", "yes"])
    assert tok(text_target="")["input_ids"] == []
    with pytest.raises(ValueError, match="the pair 'the cat' -> '': its target is no tokens"):
        pair_batches([("the cat", "yes"), ("the cat", "")], tok, samples=2, seq_len=8)
    with pytest.raises(ValueError, match="the pair '' -> 'yes': its input is no tokens"):
        pair_batches([("", "yes")], tok, samples=1, seq_len=8)
    config = transformers.T5Config(vocab_size=8, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=1, pad_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    item = {"input_ids": torch.tensor([[2, 3]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "labels": torch.zeros(1, 0, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"calibration\['t'\] item 0: labels \(1, 0\) is empty"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=-1), method="gptq",
                            calibration={"t": [item]}, progress=False)


def test_a_config_without_architectures_builds_its_model_types_lm(tmp_path):
    """A config.json with no architectures (written by config.save_pretrained) was documented to
    build a causal LM, but the auto class has no forward to read the inputs from: every such
    checkpoint, a Llama's or a T5's, was refused as taking "neither input_ids nor pixel_values".
    An encoder-decoder builds its seq2seq LM; a type of neither kind is named."""
    from epmq.quantize_files import _model_class

    for config, want in ((transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                                   num_hidden_layers=1, num_attention_heads=2),
                          (transformers.LlamaForCausalLM, False)),
                         (transformers.T5Config(vocab_size=16, d_model=8, d_kv=2, d_ff=16, num_layers=1,
                                                num_heads=4), (transformers.T5ForConditionalGeneration, True)),
                         (transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=16), None)):
        directory = tmp_path / config.model_type
        config.save_pretrained(directory)
        assert "architectures" not in json.loads((directory / "config.json").read_text()) or \
            not json.loads((directory / "config.json").read_text())["architectures"]
        if want is None:
            with pytest.raises(ValueError, match="config.json names no architectures, and its model_type 'vit' "
                                                 "has no AutoModelForCausalLM class"):
                _model_class(directory, None)
        else:
            assert _model_class(directory, None) == want


def test_an_encoder_decoder_without_decoder_start_token_id_is_named(tmp_path):
    """(transformers 5's T5Config() has none, and the model's _shift_right failed on it with a
    bare AttributeError in the middle of the walk.)"""
    from epmq.benches.tiny import t5_tokenizer

    t5_tokenizer(tmp_path / "m")
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4)).save_pretrained(tmp_path / "m")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a b", "target": "c"}) + "\n")
    with pytest.raises(ValueError, match="config.json has no decoder_start_token_id"):
        epmq.quantize_checkpoint(tmp_path / "m", tmp_path / "w4", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                 method="gptq", calibration={"t": tmp_path / "pairs.jsonl"}, samples=1,
                                 progress=False)


@pytest.mark.parametrize("family", ["mbart", "bart"])
def test_an_encoder_decoder_whose_shift_needs_no_decoder_start_token_id_in_its_file_is_taken(tmp_path, family):
    """mBART's decoder inputs start with each row's last token (its config's null is no defect),
    and BART's config class supplies 2 where config.json has none: both calibrated as before,
    not refused for what config.json lacks."""
    from epmq.benches.tiny import t5_tokenizer

    t5_tokenizer(tmp_path / "m")
    size = dict(vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "mbart":
        transformers.MBartForConditionalGeneration(transformers.MBartConfig(**size)).save_pretrained(tmp_path / "m")
    else:
        transformers.BartForConditionalGeneration(transformers.BartConfig(**size)).save_pretrained(tmp_path / "m")
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        config.pop("decoder_start_token_id")
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert json.loads((tmp_path / "m" / "config.json").read_text()).get("decoder_start_token_id") is None
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a b", "target": "c"}) + "\n")
    epmq.quantize_checkpoint(tmp_path / "m", tmp_path / "w4", spec=epmq.QuantSpec(bits=4, group_size=-1),
                             method="gptq", calibration={"t": tmp_path / "pairs.jsonl"}, samples=1, seq_len=32,
                             progress=False)
    assert (tmp_path / "w4" / "config.json").is_file()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_an_encoder_decoder_without_labels_is_refused_before_the_walk(tmp_path, family, monkeypatch):
    """T5Model and BartModel (no language-model head) take no labels: the pairs' targets, given as
    labels, were dropped by their forward's **kwargs. T5Model's decoder then had no input (refused
    mid-walk, its encoder quantized, as "You must specify exactly one of input_ids or inputs_embeds");
    BartModel's ran on the inputs shifted, its decoder calibrated on them with nothing said. Refused
    before the model is read, naming what to do; the model with the head still calibrates."""
    import epmq.quantize_files
    from epmq.benches.tiny import t5_tokenizer

    t5_tokenizer(tmp_path / "m")
    if family == "t5":
        config = transformers.T5Config(vocab_size=128, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4,
                                       decoder_start_token_id=0)
        bare, headed = transformers.T5Model, transformers.T5ForConditionalGeneration
    else:
        config = transformers.BartConfig(vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=2)
        bare, headed = transformers.BartModel, transformers.BartForConditionalGeneration
    bare(config).save_pretrained(tmp_path / "m")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a b c", "target": "c"}) + "\n")
    kwargs = dict(spec=epmq.QuantSpec(bits=4, group_size=-1), method="gptq",
                  calibration={"t": tmp_path / "pairs.jsonl"}, samples=1, seq_len=32, progress=False)
    read = epmq.quantize_files._load_unreporting
    monkeypatch.setattr(epmq.quantize_files, "_load_unreporting", lambda *a, **k: pytest.fail("the model was read"))
    with pytest.raises(ValueError, match=rf"{bare.__name__}'s forward takes no labels, so the pairs' targets would "
                                         r"not reach its decoder.*epmq.quantize_model on input_ids and "
                                         r"decoder_input_ids"):
        epmq.quantize_checkpoint(tmp_path / "m", tmp_path / "w4", **kwargs)
    assert not (tmp_path / "w4").exists()
    monkeypatch.setattr(epmq.quantize_files, "_load_unreporting", read)
    headed(config).save_pretrained(tmp_path / "m")
    epmq.quantize_checkpoint(tmp_path / "m", tmp_path / "w4", **kwargs)
    assert (tmp_path / "w4" / "config.json").is_file()


def test_a_t5_encoder_saved_with_is_encoder_decoder_reads_texts(tmp_path):
    """transformers 4 saved T5EncoderModel with its T5 config's "is_encoder_decoder": true (FLUX's
    and SD3's T5-XXL text encoders): the encoder was taken for an encoder-decoder, its texts
    refused as "an encoder-decoder calibrates on input/target pairs", and pairs' targets went
    nowhere. The class decides: an encoder alone reads texts."""
    from epmq.benches.tiny import t5_tokenizer

    directory = tmp_path / "text_encoder"
    tok = t5_tokenizer(directory)
    torch.manual_seed(0)
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="gated-gelu")).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, is_encoder_decoder=True)))
    (tmp_path / "prompts.txt").write_text("the cat sat on the mat " * 8)
    out = epmq.quantize_checkpoint(directory, tmp_path / "w4", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                   method="gptq", calibration={"prompts": tmp_path / "prompts.txt"}, samples=2,
                                   seq_len=8, progress=False)
    assert type(epmq.load_quantized(out)).__name__ == "T5EncoderModel"


def test_seq_len_may_equal_the_models_positions(tmp_path):
    """Windows of exactly as many tokens as GPT-2's table of positions fit the model; one more does not."""
    from epmq.quantize_files import _check_positions

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    _check_positions(tmp_path, 64)
    with pytest.raises(ValueError, match="seq_len=65 is longer than the model's 64 positions"):
        _check_positions(tmp_path, 65)


def test_seq_len_is_bounded_by_robertas_positions_past_its_padding_index(tmp_path):
    """RoBERTa (XLM-R, CamemBERT, MPNet, ...) numbers its positions from pad_token_id + 1, so of
    its max_position_embeddings (514) 512 are a window's: windows of 513 or 514 tokens passed the
    check and every item was refused with 'the model cannot run it (RuntimeError: index 514 is out
    of bounds for dimension 1 with size 514)', the length never named; refused as longer than the
    model's positions, and a window of the positions left runs."""
    from epmq.quantize_files import _check_positions

    for model_type, pad, usable in (("roberta", 1, 512), ("xlm-roberta", 1, 512), ("camembert", 1, 512),
                                    ("mpnet", 0, 512), ("roberta", 0, 513)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "max_position_embeddings": 514,
                                                          "pad_token_id": pad}))
        _check_positions(tmp_path, usable)
        with pytest.raises(ValueError, match=f"seq_len={usable + 1} is longer than the model's {usable} positions"):
            _check_positions(tmp_path, usable + 1)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "esm", "max_position_embeddings": 514,
                                                      "pad_token_id": 1, "position_embedding_type": "rotary"}))
    _check_positions(tmp_path, 514)  # (ESM-2's rotary positions: no table)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=18, pad_token_id=1)).save_pretrained(tmp_path / "roberta")
    word_tokenizer(tmp_path / "roberta")
    (tmp_path / "a.txt").write_text("\n".join(sentences(1, 20)))
    spec = epmq.QuantSpec(bits=4, group_size=16)
    with pytest.raises(ValueError, match="seq_len=17 is longer than the model's 16 positions"):
        epmq.quantize_checkpoint(tmp_path / "roberta", tmp_path / "out", spec=spec, method="gptq",
                                 calibration={"a": tmp_path / "a.txt"}, samples=2, seq_len=17, progress=False)
    epmq.quantize_checkpoint(tmp_path / "roberta", tmp_path / "out", spec=spec, method="gptq",
                             calibration={"a": tmp_path / "a.txt"}, samples=2, seq_len=16, progress=False)


@pytest.mark.parametrize("config, bound", [
    ({"model_type": "llama", "max_position_embeddings": 64,  # (as transformers 5 writes it)
      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, None),
    ({"model_type": "llama", "max_position_embeddings": 64, "rope_theta": 10000.0, "rope_scaling": None}, None),
    ({"model_type": "llama", "max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 4.0}}, None),
    ({"model_type": "gpt_neox", "max_position_embeddings": 64, "rotary_emb_base": 10000, "rotary_pct": 0.25}, None),
    ({"model_type": "falcon", "max_position_embeddings": 64, "alibi": True}, None),
    ({"model_type": "deberta-v2", "max_position_embeddings": 64, "position_biased_input": False,
      "relative_attention": True, "position_buckets": 32}, None),
    ({"model_type": "esm", "max_position_embeddings": 64, "position_embedding_type": "rotary"}, None),
    # tables: GPT-J's and CodeGen's sines, HF MPT's ALiBi biases, ESM's and BERT's embeddings
    ({"model_type": "gptj", "n_positions": 64, "rotary_dim": 8}, (64, "n_positions")),
    ({"model_type": "codegen", "n_positions": 64, "n_ctx": 64, "rotary_dim": 8}, (64, "n_ctx")),
    ({"model_type": "mpt", "max_seq_len": 64, "attn_config": {"alibi": True}}, (64, "max_seq_len")),
    ({"model_type": "esm", "max_position_embeddings": 64, "position_embedding_type": "absolute",
      "rope_theta": 10000.0, "pad_token_id": 1}, (62, "max_position_embeddings")),
    ({"model_type": "bert", "max_position_embeddings": 64, "position_embedding_type": "relative_key"},
     (64, "max_position_embeddings")),
    ({"model_type": "deberta-v2", "max_position_embeddings": 64, "position_biased_input": True},
     (64, "max_position_embeddings")),
], ids=["llama", "llama-4", "llama-rope-scaling", "gpt-neox-4", "falcon-alibi", "deberta-v2", "esm-rotary",
        "gptj", "codegen", "mpt", "esm", "bert-relative-key", "deberta-v2-absolute"])
def test_only_a_table_of_positions_bounds_them(config, bound):
    """Every position key bounded the windows as GPT-2's table does, so a model whose positions are computed
    from each token's index (rotary angles, ALiBi slopes, DeBERTa's relative buckets), which runs on longer
    sequences, had them refused: Llama's, GPT-NeoX's, Falcon's, DeBERTa-v2's with position_biased_input
    false. Config files transformers 4 wrote (rope_theta, rotary_emb_base) as well as 5's. A table of the
    key's length still bounds them, rotary sines precomputed to it (GPT-J's) too."""
    assert position_limit(config) == bound


def test_deberta_v2s_relative_positions_calibrate_past_max_position_embeddings(tmp_path):
    """DeBERTa-v2 with position_biased_input false (DeBERTa-v3's configs) has no table of positions: windows
    longer than max_position_embeddings were refused ('longer than the model's 16 positions') where it runs."""
    torch.manual_seed(0)
    transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, position_biased_input=False,
        pos_att_type=["p2c", "c2p"])).save_pretrained(tmp_path / "deberta")
    word_tokenizer(tmp_path / "deberta")
    (tmp_path / "a.txt").write_text("\n".join(sentences(1, 40)))
    out = epmq.quantize_checkpoint(tmp_path / "deberta", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=16),
                                   method="gptq", calibration={"a": tmp_path / "a.txt"}, samples=2, seq_len=40,
                                   progress=False)
    assert any(isinstance(m, epmq.QuantLinear) for m in epmq.load_quantized(out).modules())


def test_t5s_n_positions_bounds_no_calibration_length(tmp_path):
    """T5 and FLAN-T5's hub configs say "n_positions": 512, which the model never reads (its
    positions are relative buckets): longer input/target pairs were refused as longer than the
    model's positions. BART's table of max_position_embeddings still bounds its pairs."""
    from epmq.quantize_files import _check_positions

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "t5", "n_positions": 512, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "is_encoder_decoder": True}))
    _check_positions(tmp_path, 2048)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "max_position_embeddings": 1024}))
    with pytest.raises(ValueError, match="seq_len=1025 is longer than the model's 1024 positions"):
        _check_positions(tmp_path, 1025)


def test_seq_len_is_bounded_by_the_language_models_positions_not_another_towers(tmp_path):
    """A vision-language model's language model (``tower: language``) calibrates on windows
    bounded by its text config's positions; the vision tower's or Q-Former's own (InstructBLIP's
    512, Florence-2's 50) bound other inputs. They refused any longer window, naming the wrong
    limit."""
    from epmq.quantize_files import _check_positions

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "instructblip", "text_config": {"max_position_embeddings": 2048},
        "qformer_config": {"max_position_embeddings": 512}, "vision_config": {"max_position_embeddings": 50}}))
    _check_positions(tmp_path, 2048)
    with pytest.raises(ValueError, match="seq_len=2049 is longer than the model's 2048 positions"):
        _check_positions(tmp_path, 2049)


def test_tokens_the_model_has_no_embedding_row_for_are_named(files, tmp_path):
    """A tokenizer with tokens added after the model's embeddings were sized (a chat expert's
    tokenizer copied beside the merge) gives ids past the embedding rows: the error names the
    token, the sizes and the remedy, where it was the embedding's IndexError (on a GPU a
    device-side assert)."""
    model = tmp_path / "model"
    shutil.copytree(files / "merged", model)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    rows = transformers.AutoConfig.from_pretrained(model).vocab_size
    tok.add_tokens([f"<pad{i}>" for i in range(rows - len(tok))])  # (the rows the model has)
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    tok.save_pretrained(model)
    (tmp_path / "chat.txt").write_text(" ".join(["<|im_start|> user"] * 40))
    with pytest.raises(ValueError, match=re.escape(f"calibration['chat']: token '<|im_start|>' (id {rows}) has no "
                                                   f"row in the model's {rows} embedding rows")):
        epmq.quantize_checkpoint(model, tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=32),
                                 method="gptq", calibration={"chat": tmp_path / "chat.txt"}, samples=2,
                                 seq_len=8, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.resume").exists()


def test_target_tokens_the_model_has_no_embedding_row_for_are_named(tmp_path):
    """An encoder-decoder's targets are token ids of its embeddings too (the decoder reads them):
    a token added to the tokenizer only in a target failed as the walk's bare "index out of range
    in self", where the same token in an input was named."""
    from epmq.benches.tiny import t5_tokenizer

    tok = t5_tokenizer(tmp_path / "t5")
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "t5")
    rows = len(tok)
    tok.add_tokens(["<tool>"])
    tok.save_pretrained(tmp_path / "t5")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "the cat", "target": "yes <tool>"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"calibration['tools']: token '<tool>' (id {rows}) has no "
                                                   f"row in the model's {rows} embedding rows")):
        epmq.quantize_checkpoint(tmp_path / "t5", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                 method="gptq", calibration={"tools": tmp_path / "pairs.jsonl"}, samples=1,
                                 seq_len=8, progress=False)


def test_files_a_config_cannot_describe_are_refused_by_name(files, tmp_path, capsys):
    """An expert of another architecture (a Qwen2 with q/k/v biases, of the Llama's names and
    shapes), a config.json that is not JSON, paths YAML reads as dates, a dtype that is a list:
    each refused naming the file or the key (an expert of another model_type was accepted, and
    its biases dropped from its targets)."""
    torch.manual_seed(3)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    qwen.save_pretrained(tmp_path / "qwen")
    calibration = {"a": str(files / "a.txt"), "b": str(files / "b.jsonl")}
    with pytest.raises(ValueError, match=r"expert of task 'a' .*'qwen2' checkpoint, the model a 'llama' one"):
        epmq.quantize_checkpoint(files / "merged", tmp_path / "out", spec=epmq.QuantSpec(), method="epmq",
                                 calibration=calibration,
                                 experts={"a": tmp_path / "qwen", "b": files / "expert1"}, samples=4, seq_len=16,
                                 progress=False)
    # the same expert by hub id (read from the hub's cache): checked as on disk (it was not)
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--org--qwen" / "snapshots" / ("0" * 40)
    shutil.copytree(tmp_path / "qwen", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
        m.setattr(hub, "HF_HUB_OFFLINE", True)
        with pytest.raises(ValueError, match=r"expert of task 'a' .*'qwen2' checkpoint, the model a 'llama' one"):
            epmq.quantize_checkpoint(files / "merged", tmp_path / "out", spec=epmq.QuantSpec(), method="epmq",
                                     calibration=calibration, experts={"a": "org/qwen", "b": files / "expert1"},
                                     samples=4, seq_len=16, progress=False)
    shutil.copytree(files / "merged", tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON"):
        epmq.quantize_checkpoint(tmp_path / "broken", tmp_path / "out", spec=epmq.QuantSpec(), method="gptq",
                                 calibration=calibration,
                                 samples=4, seq_len=16, progress=False)
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"method: task_arithmetic\nbase: {tmp_path / 'broken'}\nmodels: [{files / 'expert0'}]\n")
    assert main(["merge", str(merge), str(tmp_path / "merged"), "--quiet"]) == 2
    assert "broken/config.json is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    for command, text, message in (
            ("merge", "method: task_arithmetic\nbase: 2024-12-05\nmodels: [a]\n",
             "base must be a path.*date: quote it"),
            ("quantize", "model: 2024-12-05\nmethod: rtn\n", "model must be a path.*date: quote it"),
            ("quantize", f"model: {files / 'merged'}\nmethod: rtn\ndtype: [bfloat16]\n", "dtype must be one of")):
        (tmp_path / "c.yaml").write_text(text)
        assert main([command, str(tmp_path / "c.yaml"), str(tmp_path / "o"), "--quiet"]) == 2
        assert re.search(message, capsys.readouterr().err)


def test_a_folder_holding_the_same_tokenizer_is_written_into_without_a_false_warning(files, tmp_path):
    """The model's own tokenizer saved into the output first: the write makes the same files, so
    nothing was "changed" by the user; "kept your changed tokenizer.json" was warned all the same."""
    import shutil
    import warnings

    root, spec = files, epmq.QuantSpec(bits=4, group_size=16)
    first = epmq.quantize_checkpoint(root / "merged", tmp_path / "first", spec=spec, method="rtn", progress=False)
    out = tmp_path / "w4"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(first / name, out / name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.quantize_checkpoint(root / "merged", out, spec=spec, method="rtn", progress=False)
    assert not [str(r.message) for r in record if "kept your changed" in str(r.message)]
    assert (out / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_e_pmq_experts_without_calibration_files_are_named():
    """One expert per calibration task, both ways: an expert of no task is refused, not ignored."""
    from epmq.quantize_files import check_quantize

    with pytest.raises(ValueError, match=r"experts without files \['b'\]"):
        check_quantize("epmq", {"a": "a.txt"}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match=r"tasks without an expert \['b'\]"):
        check_quantize("epmq", {"a": "a.txt", "b": "b.txt"}, {"a": "x"})
    check_quantize("epmq", {"a": "a.txt"}, {"a": "x"})
    with pytest.raises(ValueError, match="method 'gptq' takes no experts"):  # (not ignored: E-PMQ was meant)
        check_quantize("gptq", {"a": "a.txt"}, {"a": "x"})


def test_a_dataset_snapshot_calibrates_on_its_train_split(tmp_path):
    """An HF hub dataset's snapshot holds its splits side by side (data/train-*.parquet,
    validation-*, test-*, or train/, test/ folders) with the repo's own files (requirements.txt):
    read whole, every split and the stray .txt went into calibration, in silence. Where files
    name a split, the train split is read, the others left out with a warning naming them; with
    no train split among several, refused naming them and how to pick one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snap = tmp_path / "snapshot"
    (snap / "data").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pq.write_table(pa.table({"text": [f"{split} 0", f"{split} 1"]}),
                       snap / "data" / f"{split}-00000-of-00001.parquet")
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    (snap / "requirements.txt").write_text("datasets\n")
    (snap / ".gitattributes").write_text("*.parquet filter=lfs\n")
    with pytest.warns(UserWarning, match=r"snapshot: files of the splits train, test, validation: calibrating on "
                                         r"train \(1 file\).*test-00000-of-00001.parquet.*requirements.txt"):
        assert read_texts(snap) == ["train 0", "train 1"]
    pairs = tmp_path / "pairs"
    for split in ("train", "dev"):
        (pairs / split).mkdir(parents=True)
        (pairs / split / "a.jsonl").write_text(json.dumps({"input": split, "target": "t"}) + "\n")
    with pytest.warns(UserWarning, match="calibrating on train"):
        assert read_pairs(pairs) == [("train", "t")]
    shutil.rmtree(pairs / "train")
    (pairs / "test").mkdir()
    (pairs / "test" / "a.jsonl").write_text(json.dumps({"input": "test", "target": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs: files of the splits test, validation and no train split: give "
                                         r"one split's folder or files"):
        read_pairs(pairs)
    images = tmp_path / "images"
    for split in ("train", "val"):
        (images / split / "cat").mkdir(parents=True)
        (images / split / "cat" / "x.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="calibrating on train"):
        assert image_files(images) == [images / "train" / "cat" / "x.png"]
    assert read_texts(snap / "data" / "test-00000-of-00001.parquet") == ["test 0", "test 1"]  # (a file: as given)
    assert image_files(images / "val") == [images / "val" / "cat" / "x.png"]  # (a split's folder: all of it)
    docs = tmp_path / "docs"  # (one word of one split among a user's documents: no snapshot, read whole)
    docs.mkdir()
    (docs / "chapter1.txt").write_text("one")
    (docs / "dev_notes.txt").write_text("two")
    (docs / "training_notes.txt").write_text("three")  # (one of each: train and validation)
    with pytest.warns(UserWarning, match="calibrating on train"):
        assert read_texts(docs) == ["three"]
    (docs / "dev_notes.txt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(read_texts(docs)) == ["one", "three"]


def test_a_snapshot_of_one_split_leaves_its_metadata_and_stray_files_out(tmp_path):
    """An HF hub dataset of a train split alone (data/train-00000-of-00001.parquet) beside its
    dataset_infos.json, its card and the repo's LICENSE.txt named one split, so it was read as a
    user's documents, whole: the info file failed the read ('dataset_infos.json: expected a
    string, or an object with a 'text' string'), and without it the license was calibrated on,
    in silence. datasets' info files are metadata, never documents; a split named as the hub
    names its shards makes a snapshot of that split, read with the others left out, warned."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snap = tmp_path / "snapshot"
    (snap / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["train 0", "train 1"]}), snap / "data" / "train-00000-of-00001.parquet")
    (snap / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {"train": {"num_examples": 2}}}}))
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    (snap / "LICENSE.txt").write_text("MIT License\n")
    with pytest.warns(UserWarning, match=r"snapshot: files of the split train: calibrating on train \(1 file\), "
                                         r"leaving out the 2 others \(LICENSE.txt, dataset_infos.json\)"):
        assert read_texts(snap) == ["train 0", "train 1"]
    with pytest.warns(UserWarning, match="calibrating on train"):
        assert [t.text() for t in read_texts(snap, stream=True)] == ["train 0", "train 1"]
    # (the hub's parquet conversions name shards with a hash after them, C4 with a dot before)
    for shard in ("train-00000-of-00001-5c5b9b5c6c6b1a2e.parquet", "c4-train.00000-of-01024.parquet"):
        (snap / "dataset_infos.json").unlink(missing_ok=True)
        next((snap / "data").iterdir()).rename(snap / "data" / shard)
        with pytest.warns(UserWarning, match=r"calibrating on train \(1 file\), leaving out the 1 other "
                                             r"\(LICENSE.txt\)"):
            assert read_texts(snap) == ["train 0", "train 1"]
    old = tmp_path / "older"  # (an older repo: its split's file unsharded, the info file says it is one)
    old.mkdir()
    (old / "train.jsonl").write_text(json.dumps({"text": "train 0"}) + "\n")
    (old / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {"train": {"num_examples": 1}}}}))
    (old / "LICENSE.txt").write_text("MIT License\n")
    with pytest.warns(UserWarning, match=r"files of the split train: calibrating on train \(1 file\), leaving out "
                                         r"the 2 others \(LICENSE.txt, dataset_infos.json\)"):
        assert read_texts(old) == ["train 0"]
    docs = tmp_path / "docs"  # (a user's documents beside an info file: read, the info file left out)
    docs.mkdir()
    (docs / "chapter1.txt").write_text("one")
    (docs / "notes.txt").write_text("two")
    (docs / "dataset_info.json").write_text(json.dumps({"description": "my notes"}))
    with pytest.warns(UserWarning, match=r"docs: leaving out dataset_info.json, a dataset's metadata"):
        assert sorted(read_texts(docs)) == ["one", "two"]
    (docs / "dataset_info.json").unlink()
    (docs / "training_notes.txt").write_text("three")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(read_texts(docs)) == ["one", "three", "two"]


@pytest.mark.parametrize("size", [dict(samples=2.0), dict(seq_len=8.5), dict(batch_size=True), dict(samples="2")])
def test_sizes_that_are_no_integers_are_refused_from_python_too(files, tmp_path, size):
    """quantize_checkpoint (and text_windows, pair_batches, image_batches) given samples=2.0 or
    seq_len=8.5 ended in torch's bare 'randint() received an invalid combination of arguments',
    samples='2' in "'<' not supported between instances of 'str' and 'int'", and batch_size=True
    ran as batches of 1, silently (the CLI's check_reading refused them all); refused naming the
    argument, before the model is loaded."""
    name, value = next(iter(size.items()))
    match = rf"{name} must be an integer, got {re.escape(repr(value))}"
    options = dict(dict(samples=2, seq_len=8, batch_size=2), **size)
    with pytest.raises(ValueError, match=match):
        epmq.quantize_checkpoint(files / "merged", tmp_path / "out", spec=epmq.QuantSpec(bits=4), method="gptq",
                                 calibration={"math": files / "a.txt"}, **options)
    assert not (tmp_path / "out").exists()
    tok = transformers.AutoTokenizer.from_pretrained(files / "base")
    with pytest.raises(ValueError, match=match):
        text_windows(sentences(3, 30), tok, **options)
    with pytest.raises(ValueError, match=match):
        pair_batches([("the cat", "a dog")] * 4, tok, **options)
    if name != "seq_len":
        with pytest.raises(ValueError, match=match):
            image_batches([tmp_path / "a.png"], None, **{k: v for k, v in options.items() if k != "seq_len"})


@pytest.mark.parametrize("name, content, said", [("tokenizer.json", "", "is empty"),
                                                 ("tokenizer_config.json", "{", "is not valid JSON")])
def test_a_tokenizer_file_cut_short_is_named(files, tmp_path, name, content, said):
    """A 0-byte or cut tokenizer file (an interrupted copy or download) was refused as 'merged
    has no tokenizer that loads (JSONDecodeError: Expecting value: line 1 column 1 (char 0))',
    naming the directory and not which of its files; the file is named."""
    model = tmp_path / "model"
    shutil.copytree(files / "merged", model)
    (model / name).write_text(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(model))} has no tokenizer that loads "
                                         rf"\({re.escape(str(model / name))} {said}"):
        epmq.quantize_checkpoint(model, tmp_path / "out", spec=epmq.QuantSpec(bits=4), method="gptq",
                                 calibration={"math": files / "a.txt"}, samples=2, seq_len=8, batch_size=2)


def _tiny_wav2vec2_ctc(seed):
    torch.manual_seed(seed)
    return transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        vocab_size=12)).eval()


def _write_clips(directory, lengths, rate, seed):
    """16-bit PCM WAV files (a stereo one among them) of the given lengths in samples."""
    from scipy.io import wavfile

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        shape = (n, 2) if i == 1 else (n,)
        wavfile.write(directory / f"clip{i}.wav", rate, (rng.standard_normal(shape) * 3000).astype(np.int16))


def test_audio_model_from_wav_folders(tmp_path, monkeypatch):
    """epmq quantize of an audio model (Wav2Vec2ForCTC, whose forward takes input_values) was
    refused as taking 'neither input_ids nor pixel_values', RTN (which reads no data) too; its
    tasks' WAV files are read (mono, resampled to the feature extractor's rate) and batched by its
    own feature extractor with their mask, the same as quantize_model on those batches."""
    from epmq.calibration import audio_batches, audio_files

    _tiny_wav2vec2_ctc(0).save_pretrained(tmp_path / "merged")
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    extractor.save_pretrained(tmp_path / "merged")
    letters = "<pad> <s> </s> <unk> | a b c d e f g".split()  # (the CTC head's 12)
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(letters)}))
    transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")).save_pretrained(tmp_path / "merged")
    experts, noise = {}, torch.Generator().manual_seed(1)
    for k, task in enumerate(("asr", "kws")):
        perturb(_tiny_wav2vec2_ctc(0), noise, scale=0.1).save_pretrained(tmp_path / task)
        experts[task] = tmp_path / task
        _write_clips(tmp_path / "audio" / task, (1600, 2400, 1200, 2000, 1600), 8000 if k else 16000, seed=k)
    calibration = {t: tmp_path / "audio" / t for t in experts}
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4", spec=spec, method="epmq",
                                   calibration=calibration, experts=experts, anchor=0.1,
                                   samples=4, batch_size=2, progress=False)
    seeds = epmq.calibration.task_seeds(0, calibration)
    batches = {t: audio_batches(audio_files(p), extractor, samples=4, batch_size=2, seed=seeds[t])
               for t, p in calibration.items()}
    first = batches["asr"][0]
    assert set(first) == {"input_values", "attention_mask"} and first["input_values"].shape[0] == 2
    # (the 8 kHz task resampled to 16 kHz: twice its samples)
    assert max(int(b["attention_mask"].sum(1).max()) for b in batches["kws"]) in (4000, 4800)
    model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "merged")
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="epmq",
                                 experts=experts, anchor=0.1)
    # (served with its processor: the feature extractor and the CTC model's tokenizer)
    assert type(transformers.AutoProcessor.from_pretrained(out)).__name__ == "Wav2Vec2Processor"
    rtn = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "rtn", spec=spec, method="rtn", progress=False)
    assert type(transformers.AutoProcessor.from_pretrained(rtn)).__name__ == "Wav2Vec2Processor"
    (tmp_path / "flac").mkdir()
    (tmp_path / "flac" / "a.flac").write_bytes(b"fLaC")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # (soundfile not installed)
    with pytest.raises(ValueError, match=r"a\.flac, \.\.\.\) are of a format epmq does not read.*pip install "):
        audio_files(tmp_path / "flac")


def test_whisper_audio_classifier_from_wav_folders_and_its_seq2seq_refused(tmp_path):
    """Whisper's encoder (WhisperForAudioClassification, input_features padded to its window by its
    own feature extractor) is calibrated from WAV files as quantize_model is on those batches; the
    encoder-decoder, whose decoder reads transcripts the files do not hold, is refused by name for
    GPTQ and quantized by RTN without a tokenizer made up for it (transformers 5's processor of a
    directory without one is an empty tokenizer)."""
    from epmq.calibration import audio_batches, audio_files

    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=20, max_target_positions=16,
        vocab_size=50, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        classifier_proj_size=8)
    extractor = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=400)  # (40 frames)
    torch.manual_seed(0)
    for name, cls in (("cls", transformers.WhisperForAudioClassification),
                      ("seq2seq", transformers.WhisperForConditionalGeneration)):
        cls(config).save_pretrained(tmp_path / name)
        extractor.save_pretrained(tmp_path / name)
    _write_clips(tmp_path / "audio", (8000, 12000, 20000), 16000, seed=0)
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "cls", tmp_path / "w4", spec=spec, method="gptq",
                                   calibration={"a": tmp_path / "audio"}, samples=3, batch_size=2, progress=False)
    batches = {"a": audio_batches(audio_files(tmp_path / "audio"), extractor, samples=3, batch_size=2)}
    assert batches["a"][0]["input_features"].shape == (2, 16, 40)
    model = transformers.WhisperForAudioClassification.from_pretrained(tmp_path / "cls")
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="gptq")
    assert_refused(tmp_path / "seq2seq", tmp_path, "WhisperForConditionalGeneration is an encoder-decoder whose "
                                                   "decoder reads transcripts")
    rtn = epmq.quantize_checkpoint(tmp_path / "seq2seq", tmp_path / "rtn", spec=spec, method="rtn", progress=False)
    assert (rtn / "preprocessor_config.json").is_file() and not (rtn / "tokenizer.json").exists()


def test_rtn_of_an_audio_encoder_decoder_takes_the_calibration_it_does_not_read(tmp_path):
    """RTN of Whisper's encoder-decoder given the calibration of a sweep's other methods (the same
    dict for rtn, gptq and epmq) was refused as an encoder-decoder whose decoder reads transcripts,
    its remedy 'or with method: rtn', the method given; RTN reads no data: the checkpoint is the one
    written without calibration. GPTQ is still refused so."""
    from safetensors.torch import load_file

    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=20, max_target_positions=16,
        vocab_size=50, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(tmp_path / "seq2seq")
    transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=400).save_pretrained(
        tmp_path / "seq2seq")
    _write_clips(tmp_path / "audio", (8000, 12000), 16000, seed=0)
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    given = epmq.quantize_checkpoint(tmp_path / "seq2seq", tmp_path / "given", spec=spec, method="rtn",
                                     calibration={"a": tmp_path / "audio"}, samples=2, batch_size=2, progress=False)
    bare = epmq.quantize_checkpoint(tmp_path / "seq2seq", tmp_path / "bare", spec=spec, method="rtn", progress=False)
    got, want = (load_file(next(p.glob("*.safetensors"))) for p in (given, bare))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert_refused(tmp_path / "seq2seq", tmp_path, "WhisperForConditionalGeneration is an encoder-decoder whose "
                                                   "decoder reads transcripts")


def test_long_audio_is_cut_to_a_window_of_its_own(tmp_path):
    """A long recording (an audiobook chapter, a meeting) was run whole: an hour at 16 kHz makes
    wav2vec2 180,000 frames, whose attention alone needs terabytes, where images are resized and
    texts cut to seq_len. A clip past max_seconds (30 s, Whisper's window) is cut to a window of
    that length at a seeded place in it, the same for the same seed; shorter ones are whole."""
    from scipy.io import wavfile

    from epmq.calibration import audio_batches

    rate = 8000
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=rate, do_normalize=False)
    samples = (np.random.default_rng(0).standard_normal(40 * rate) * 3000).astype(np.int16)
    wavfile.write(tmp_path / "long.wav", rate, samples)
    wavfile.write(tmp_path / "short.wav", rate, samples[:rate])
    values = [audio_batches([tmp_path / "long.wav"], extractor, samples=1, seed=seed)[0]["input_values"][0]
              for seed in (0, 0, 1)]
    assert values[0].shape == (30 * rate,)
    whole = torch.from_numpy(samples.astype(np.float32) / 32768)
    assert any(torch.equal(values[0], whole[start:start + 30 * rate])
               for start in torch.nonzero(whole[:10 * rate + 1] == values[0][0]).flatten().tolist())
    assert torch.equal(values[0], values[1]) and not torch.equal(values[0], values[2])
    short = audio_batches([tmp_path / "short.wav"], extractor, samples=1, max_seconds=0.5)[0]["input_values"]
    assert short.shape == (1, rate // 2)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_clip_too_short_for_a_frame_is_named_by_its_file(tmp_path, batch_size):
    """A clip too short for one frame of the model's convolutions (15 samples: a truncated file)
    drawn alone, or beside clips of its own length (no padding, so unpad has no mask to cut by),
    ended the run in 'calibration['a'] item N: the model cannot run it (RuntimeError: ...
    Kernel size can't be greater than actual input size)', which names no file. It is left out
    with a warning naming the file, as unpad leaves out such a row of a padded batch; a task whose
    every clip is such is refused, naming its files."""
    _tiny_wav2vec2_ctc(0).save_pretrained(tmp_path / "merged")
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "merged")
    _write_clips(tmp_path / "audio", (1600, 15, 15, 2400), 16000, seed=0)
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    with pytest.warns(UserWarning, match=r"calibration\['a'\]: audio .*clip1\.wav: its 15 samples make no frame "
                                         r"of Wav2Vec2ForCTC.*left out"):
        out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4", spec=spec, method="gptq",
                                       calibration={"a": tmp_path / "audio"}, samples=4, batch_size=batch_size,
                                       progress=False)
    assert (out / "config.json").is_file()
    _write_clips(tmp_path / "short", (15, 12), 16000, seed=0)
    with pytest.warns(UserWarning, match="make no frame"), pytest.raises(
            ValueError, match=r"calibration\['a'\]: every audio file drawn is too short for one frame of "
                              r"Wav2Vec2ForCTC.*clip0\.wav.*clip1\.wav"):
        epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4s", spec=spec, method="gptq",
                                 calibration={"a": tmp_path / "short"}, samples=2, batch_size=batch_size,
                                 progress=False)


def test_audio_model_quantized_in_another_dtype_gets_its_clips_in_it(tmp_path):
    """With dtype: bfloat16 (or float16) the feature extractor's float32 input_values met the
    model's bf16 convolutions and every item was refused: 'the model cannot run it (RuntimeError:
    expected scalar type Float but found BFloat16)'. The batches' floating tensors are given in the
    model's dtype, as transformers' audio pipelines give them."""
    from epmq.calibration import audio_batches, audio_files

    _tiny_wav2vec2_ctc(0).save_pretrained(tmp_path / "merged")
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    extractor.save_pretrained(tmp_path / "merged")
    _write_clips(tmp_path / "audio", (1600, 2400, 1200), 16000, seed=0)
    spec = epmq.QuantSpec(bits=4, group_size=-1)
    out = epmq.quantize_checkpoint(tmp_path / "merged", tmp_path / "w4", spec=spec, method="gptq",
                                   calibration={"a": tmp_path / "audio"}, samples=3, batch_size=2,
                                   dtype="bfloat16", progress=False)
    batches = {"a": [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
                     for b in audio_batches(audio_files(tmp_path / "audio"), extractor, samples=3, batch_size=2)]}
    model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    assert_quantize_model_equals(out, model, spec, batches, lambda o: o.logits, method="gptq")


def test_dark_16_bit_images_stay_dark_whatever_mode_they_open_in(tmp_path):
    """A 32-bit greyscale image ('I': a 16-bit PNG converted, as loaders do, or a TIFF of 32-bit integers) was
    scaled by its own maximum, so a dark one came out bright (a ramp to 6553 of 65535 read as one to 255);
    16-bit data is scaled by 65535 in every mode it comes in (the 'I;16' a 16-bit PNG opens as, or 'I'), as
    its 8-bit counterpart reads, and 'I' data past 16 bits by int32's range. An 'La' image (luminance and
    premultiplied alpha: Pillow converts it to nothing but 'LA') was refused as 'conversion from La to L not
    supported'; it is composited onto white as its 'LA' is."""
    from PIL import Image

    from epmq.calibration import rgb_image

    class Pixels:  # (a processor handing back the RGB images it is given)
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(i).copy()) for i in images])}

    dark = np.linspace(0, 6553, 20 * 20).reshape(20, 20)
    Image.fromarray(dark.astype(np.uint16)).save(tmp_path / "dark16.png")
    Image.fromarray(dark.astype(np.int32)).save(tmp_path / "dark32.tiff")
    Image.fromarray((dark / 257).round().astype(np.uint8)).save(tmp_path / "dark8.png")
    with Image.open(tmp_path / "dark16.png") as image:
        assert image.mode == "I;16"
        converted = rgb_image(image.convert("I"))
    want = image_batches([tmp_path / "dark8.png"], Pixels(), samples=1)[0]["pixel_values"]
    assert int(want.max()) == 25
    for f in ("dark16.png", "dark32.tiff"):
        got = image_batches([tmp_path / f], Pixels(), samples=1)[0]["pixel_values"]
        assert (got.int() - want.int()).abs().max() <= 1, f
    assert (torch.from_numpy(np.asarray(converted)).int() - want[0].int()).abs().max() <= 1
    wide = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(rgb_image(wide))[0, :, 0].tolist() == [0, 128, 255]
    la = Image.new("LA", (4, 4), (100, 128)).convert("La")
    assert la.mode == "La"
    assert np.array_equal(np.asarray(rgb_image(la)), np.asarray(rgb_image(la.convert("LA"))))


def test_an_expert_of_another_rope_is_warned_of_once(files, tmp_path, monkeypatch):
    """quantize_checkpoint compares the experts' configs with the model's config.json before the
    model loads, and quantize_model compares them with the model's config again: an expert of
    another RoPE (a long-context fine-tune's rope_theta) was warned of twice, in two wordings where
    the expert was given by hub id or a config written by transformers 4 (its path, the model's
    RoPE as the file and as transformers read it). It is warned of once; another head count is still
    refused before the model loads."""
    root = files
    shutil.copytree(root / "expert1", tmp_path / "long")
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    (tmp_path / "long" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        epmq.quantize_checkpoint(root / "merged", tmp_path / "out", spec=epmq.QuantSpec(bits=4, group_size=16),
                                 method="epmq", calibration={"a": str(root / "a.txt"), "b": str(root / "a.txt")},
                                 experts={"a": str(root / "expert0"), "b": str(tmp_path / "long")}, samples=2,
                                 seq_len=16, batch_size=2, progress=False)
    said = [str(n.message) for n in notes if "computes its positions" in str(n.message)]
    assert len(said) == 1 and re.search(r"the expert of task 'b' \(\S*long\) computes its positions with .*"
                                        r"'rope_theta': 500000.0.*, the model with .*'rope_theta': 10000.0", said[0])
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=4)  # (the same shapes)
    (tmp_path / "long" / "config.json").write_text(json.dumps(config))
    loaded = []
    from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(cls) or from_pretrained(cls, *a, **k)))
    with pytest.raises(ValueError, match=r"the expert of task 'b' \(\S*long\) reads its weights as \{'head_dim': 4"):
        epmq.quantize_checkpoint(root / "merged", tmp_path / "out2", spec=epmq.QuantSpec(bits=4, group_size=16),
                                 method="epmq", calibration={"a": str(root / "a.txt"), "b": str(root / "a.txt")},
                                 experts={"a": str(root / "expert0"), "b": str(tmp_path / "long")}, samples=2,
                                 seq_len=16, batch_size=2, progress=False)
    assert loaded == []


def test_every_missing_calibration_path_is_named_before_any_task_is_read(files, tmp_path, capsys, monkeypatch):
    """A typo in the last task's path was refused only once the earlier tasks' files were read and
    tokenized (minutes on large corpora), and a second typo only on the next run; every missing
    path is named at once, by its task, before anything is read."""
    import epmq.quantize_files

    root = files
    monkeypatch.setattr(epmq.quantize_files, "calibrated", lambda *a, **k: pytest.fail("the calibration was read"))
    calibration = {"a": str(root / "a.txt"), "b": [str(root / "b.jsonl"), str(root / "b2.jsonl")],
                   "c": str(root / "c_texts")}
    with pytest.raises(ValueError) as raised:
        epmq.quantize_checkpoint(root / "merged", tmp_path / "x", spec=epmq.QuantSpec(), method="gptq",
                                 calibration=calibration, samples=2, seq_len=8, progress=False)
    message = str(raised.value)
    assert "b2.jsonl" in message and "c_texts" in message and "'b'" in message and "'c'" in message, message
    assert "a.txt" not in message and "b.jsonl" not in message, message
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.resume").exists()
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(root / "merged"), method="gptq", calibration=calibration,
                                          samples=2, seq_len=8)))
    assert main(["quantize", str(config), str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "b2.jsonl" in err and "c_texts" in err, err
