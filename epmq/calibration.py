"""Calibration batches from the user's own files: texts for language models, images for
vision towers, audio for speech encoders.

Texts follow GPTQ's recipe (the reference quantizes with 128 random windows of 2048 tokens of C4): each
task's documents are tokenized, joined with the tokenizer's EOS between them, and ``samples``
windows of ``seq_len`` tokens are drawn at random start positions (seeded), then batched as
``{"input_ids", "attention_mask"}`` model inputs for ``epmq.quantize_model``. Texts of more
than ``FULL_TOKENIZATION_CHARS`` (8 Mi) characters in all are not tokenized whole: each window
is tokenized from its own seeded random place (``_windows_of_places``), so that a 1 GB file
costs what its 128 windows do, not minutes and tens of GB; a ``.txt`` file, JSON Lines and
``.parquet`` rows read with ``read_texts(..., stream=True)`` (as ``epmq quantize`` reads them)
are then read where the windows are (``TextFile``, ``JsonLines``, ``ParquetRows``), never held
whole; input/target pairs read with ``read_pairs(..., stream=True)`` are read again only where
``pair_batches`` draws them (``PairLines``, ``ParquetPairs``).

Files: ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON value a line), ``.json``
(a list of such values), ``.parquet`` (one value a row, an object of its columns: the files of
an HF hub dataset; needs pyarrow), or a directory tree of them (sorted by path; suffixes in any
case; hidden files and folders skipped; of a tree whose files name splits, as an HF hub
dataset's snapshot does, the train split: ``_train_split``). All but ``.parquet`` may be compressed: ``.gz``,
``.bz2`` or ``.xz`` after their suffix (the hub's C4 shards, GPTQ's calibration set, are
``.json.gz``). UTF-8, with or without a byte-order mark. A value is a document in one of the
forms TRL's SFTTrainer trains on, so an expert's own fine-tuning files calibrate its task as
they are:

* a string, or ``{"text": ...}``;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``, a conversation, rendered by the
  tokenizer's chat template (the model then sees its role markers and special tokens, as in
  fine-tuning and serving);
* ``{"prompt": ..., "completion": ...}``: two strings, joined, or two lists of messages, the
  conversation they make rendered by the chat template.

Pairs, for encoder-decoders (T5, BART): ``.jsonl`` / ``.json`` objects (``.parquet`` rows)
with ``"input"`` and ``"target"`` texts (or ``"prompt"`` and ``"completion"``); ``samples``
pairs drawn at random (seeded), the inputs given to the encoder and the targets as labels
(teacher forcing: the decoder sees the target shifted right), each cut to ``seq_len`` tokens. A
batch holds only pairs of the same token lengths, so nothing is padded.

Padding: the walker sees the linears' inputs, not the masks, so a padded position would count
as a token and the statistics would depend on the batch size and the padding side. Batches of
the user's own that are padded are split by :func:`unpad` (``quantize_model`` and
``gram_matrices`` call it on every calibration item) into batches of rows of equal real length.

Images: ``samples`` files drawn at random (seeded) from a directory tree (an ImageFolder layout
with class subfolders works as it is) or a list of files, turned upright by their EXIF
orientation (as transformers' ``load_image`` does), converted to RGB (``rgb_image``:
transparency onto white, as transformers does; 16-bit images scaled to 8 bits by 65535, which
transformers clips, in either mode Pillow opens them in, signed 8- and 16-bit TIFFs offset to unsigned;
float images read on [0, 1]) and preprocessed
by the model's own image processor into ``{"pixel_values"}`` batches.

Audio: ``samples`` WAV files drawn at random (seeded) from a directory tree or a list of files,
read as mono float samples at the feature extractor's rate (``read_audio``) and batched by the
model's own feature extractor with the mask of each clip's samples (``audio_batches``); a clip
longer than ``MAX_CLIP_SECONDS`` (30) is cut to a window of it at a seeded place.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import torch

from epmq_kernels.grid import is_integer

from .checks import check_number, check_seed

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
PAIR_SUFFIXES = (".jsonl", ".json", ".parquet")
# a text file may be compressed, as the hub's C4 shards are (c4-train.00000-of-01024.json.gz,
# GPTQ's calibration set): the suffix before these names its kind
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
# the columns of a .parquet file that a text or a pair is read from (the others are not loaded)
COLUMNS = ("text", "messages", "prompt", "completion", "tools", "chat_template_kwargs", "input", "target")


def _check_sizes(samples: int, batch_size: int, seq_len: Optional[int] = None) -> tuple:
    """The sizes as Python ints (numpy's small ones overflowed in the arithmetic on them)."""
    # (2.0 or '2' ended in torch's bare randint() or a '<' TypeError; True drew batches of 1, silently)
    for name, value in (("samples", samples), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if samples < 1 or batch_size < 1 or (seq_len is not None and seq_len < 2):
        rule, got = ("", "") if seq_len is None else (" and seq_len >= 2", f", seq_len={seq_len}")
        raise ValueError(f"samples and batch_size must be >= 1{rule}, got samples={samples}, "
                         f"batch_size={batch_size}{got}")
    return int(samples), int(batch_size), None if seq_len is None else int(seq_len)


# config.json keys that bound a text model's positions (absolute position embeddings)
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


# model types whose position ids start past the padding index (fairseq's make_positions: RoBERTa's
# 514 positions hold 512 tokens), and that index where the model fixes it whatever pad_token_id says
PADDING_OFFSET_POSITIONS = {"roberta": None, "xlm-roberta": None, "xlm-roberta-xl": None, "camembert": None,
                            "data2vec-text": None, "roberta-prelayernorm": None, "ibert": None, "longformer": None,
                            "luke": None, "xmod": None, "markuplm": None, "lilt": None, "layoutlmv3": None,
                            "esm": None, "mpnet": 1}


def _positions_before_the_first(config: dict) -> int:
    """How many of a config's position embeddings no token gets: RoBERTa's first, padding_idx + 1."""
    if config.get("model_type") not in PADDING_OFFSET_POSITIONS:
        return 0
    if config.get("position_embedding_type", "absolute") != "absolute":  # (ESM-2's rotary: no table)
        return 0
    pad = PADDING_OFFSET_POSITIONS[config["model_type"]]
    pad = config.get("pad_token_id", 1) if pad is None else pad
    return pad + 1 if isinstance(pad, int) and pad >= 0 else 0


def _positions_computed(config: Mapping) -> bool:
    """Whether a config's positions are computed from each token's index (rotary angles, ALiBi slopes,
    DeBERTa's clamped relative distances) rather than looked up in a table of its position key's length,
    so that a longer sequence runs: Llama's, GPT-NeoX's, Mistral's, Falcon's, DeBERTa's with
    position_biased_input false. GPT-J's and CodeGen's rotary_dim name a table of sines (n_positions of
    them) their forward indexes, and HF's MPT slices an ALiBi table of max_seq_len: both fail past it."""
    kind = config.get("position_embedding_type")
    if kind is not None:  # (BERT's 'relative_key' indexes a table of distances below max_position_embeddings)
        return kind == "rotary"
    if config.get("position_biased_input") is False or config.get("alibi") is True:
        return True
    # (rope_parameters as transformers 5 writes it; rope_theta / rope_scaling / rotary_emb_base in
    # config.json files transformers 4 wrote)
    return any(config.get(k) is not None for k in ("rope_parameters", "rope_theta", "rope_scaling",
                                                   "rotary_emb_base"))


def position_limit(config: Mapping) -> Optional[tuple]:
    """``(tokens, key)``: the most tokens a model of ``config`` (config.json's content) reads in one sequence,
    and the config key that says so; None where none bounds them. Only a table of positions bounds them:
    GPT-2's fails past it, while a rotary, ALiBi or relative model runs on any length (the key is the length
    it was trained on, or, with rope_scaling, the one before scaling)."""
    # a model with a text_config reads the tokens with its language model: the other towers'
    # positions (a vision tower's, InstructBLIP's Q-Former's) bound inputs that are no tokens
    nested = ([config["text_config"]] if isinstance(config.get("text_config"), Mapping)
              else [v for v in config.values() if isinstance(v, Mapping)])
    # T5's configs (t5-small's, FLAN-T5's: "n_positions": 512) keep a length no table bounds: the
    # positions are relative, log-bucketed past relative_attention_max_distance, any length runs
    limits = [(c[k] - _positions_before_the_first(c), k) for c in [config, *nested] for k in POSITION_LIMITS
              if is_integer(c.get(k)) and c[k] > 0 and not _positions_computed(c)
              and not (k == "n_positions" and "relative_attention_num_buckets" in c)]
    return min(limits) if limits else None


TEXT_FORMS = ("a string, or an object with a 'text' string, 'messages' (a conversation), or 'prompt' "
              "and 'completion' (two strings or two lists of messages)")


def _text_of(value, where: str, tokenizer=None) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        if "messages" in value:
            return _chat(value["messages"], where, tokenizer, value)
        prompt, completion = value.get("prompt"), value.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt + completion
        if isinstance(prompt, list) and isinstance(completion, list):
            return _chat(prompt + completion, where, tokenizer, value)
        if isinstance(value.get("input"), str) and isinstance(value.get("target"), str):
            raise ValueError(f"{where}: input/target pairs calibrate an encoder-decoder (T5, BART); a decoder-only "
                             f"model or an encoder (T5EncoderModel) reads texts: {TEXT_FORMS}")
    raise ValueError(f"{where}: expected {TEXT_FORMS}, got {str(value)[:80]!r}")


def _chat(messages, where: str, tokenizer, record: dict) -> str:
    """A conversation as the text the model was fine-tuned on: the tokenizer's chat template,
    with the record's ``tools`` and ``chat_template_kwargs`` as TRL's SFTTrainer passes them."""
    if not (isinstance(messages, list) and messages):
        raise ValueError(f"{where}: a conversation is a non-empty list of messages, got {str(messages)[:80]!r}")
    for k, m in enumerate(messages):  # (an assistant turn of tool calls may have no content)
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ValueError(f"{where}: message {k} of the conversation has no 'role': {str(m)[:80]!r}")
    options = record.get("chat_template_kwargs") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}: chat_template_kwargs must be an object, got {str(options)[:80]!r}")
    if tokenizer is None:
        raise ValueError(f"{where}: a conversation is rendered by the tokenizer's chat template: "
                         f"read_texts(source, tokenizer=...)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: a conversation, and the model's tokenizer has no chat template (a base "
                         f"model's tokenizer often has none): copy the fine-tuned experts' tokenizer files "
                         f"(tokenizer_config.json, chat_template.jinja) beside the model, or give the "
                         f"texts as 'text'")
    try:
        text = tokenizer.apply_chat_template(messages, tools=record.get("tools"), tokenize=False, **options)
    except Exception as e:  # (jinja raises its own errors: a role the template refuses, ...)
        raise ValueError(f"{where}: the tokenizer's chat template failed on this conversation "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(text, str):
        raise ValueError(f"{where}: the tokenizer's chat template gave {type(text).__name__}, not text")
    return text


def _path(source, what: str) -> Path:
    """``source`` as a path; '' refused: ``Path('')`` is the current directory, whose files were read
    as the calibration, in silence (a YAML ``cars: ''``, an unset variable: ``os.environ.get("CARS", "")``)."""
    if isinstance(source, str) and not source:
        raise ValueError(f"calibration {what}: an empty path ('') given, which reads as the current directory: "
                         f"give the file(s) or directory ('.' for the current one)")
    return Path(source)


def _records(source, suffixes: tuple, what: str, kind_error: str, stream: bool = False,
             tokenizer=None, pairs: bool = False) -> List[tuple]:
    """``(where, value)`` of every record of ``source`` (a file, a directory of such files, or a
    list of either): a ``.txt`` file is one string (``stream``: a ``TextFile``), a ``.jsonl``
    line or an item of a ``.json`` list one JSON value, as is a ``.json`` file of one object
    (``stream``: the texts of JSON Lines and .parquet rows as ``TextRecord`` documents, rendered by
    ``tokenizer``; ``pairs``: their input/target pairs as ``PairRecord`` ones)."""
    if isinstance(source, (list, tuple)):
        return [r for s in source for r in _records(s, suffixes, what, kind_error, stream, tokenizer, pairs)]
    path = _path(source, what)
    if path.is_dir():
        saved = next((p.parent for p in sorted(path.rglob("state.json")) if any(p.parent.glob("*.arrow"))), None)
        if saved is not None:  # (else its dataset_info.json was read as data: "expected a JSON list")
            raise ValueError(f"{saved}: a dataset written by datasets' save_to_disk (.arrow files), which is not "
                             f"read here; write it as files that are: dataset.to_json(\"calibration.jsonl\") or "
                             f"dataset.to_parquet(\"calibration.parquet\") (of a DatasetDict, one split)")
        files = _tree(path, suffixes, compressed=True)
        if not files:
            raise ValueError(f"{path}: no {', '.join(suffixes)} files of {what} in the directory")
        return [r for f in files for r in _records(f, suffixes, what, kind_error, stream, tokenizer, pairs)]
    if not path.is_file():
        raise FileNotFoundError(f"no calibration {what} at {path}")
    suffix = _kind(path)
    if suffix not in suffixes or (suffix == ".parquet" and suffix != path.suffix.lower()):
        shown = "".join(path.suffixes[-2:]) if path.suffix.lower() in COMPRESSIONS else path.suffix
        raise ValueError(f"{path}: {kind_error} ({', '.join(suffixes)}; all but .parquet also "
                         f"{'/'.join(COMPRESSIONS)}-compressed), not {shown!r}")
    if suffix in (".jsonl", ".json") and _blank(path):
        # (an export that wrote nothing: a .json's stopped the run as 'not JSON', a .jsonl's was left out unsaid)
        warnings.warn(f"{path}: empty (no {what} in it): left out")
        return []
    if suffix in (".jsonl", ".json", ".parquet") and stream:  # (read where the windows are: JsonLines)
        lines, rows = (PairLines, ParquetPairs) if pairs else (JsonLines, ParquetRows)
        opened = rows(path, tokenizer) if suffix == ".parquet" else lines(path, tokenizer, strict=suffix == ".jsonl")
        if opened.documents is not None:
            where = str(path)  # (one string for them all: a document is read by its position)
            return [(where, d) for d in opened.documents]
    if suffix == ".parquet":
        return [(f"{path}:row {i}", row) for i, row in enumerate(_parquet_rows(path))]
    if suffix == ".jsonl":
        return _json_lines(_text_lines(path), path)
    if suffix == ".json":  # (JSON Lines under .json: parsed as read, see _streamed_json_lines)
        records = _streamed_json_lines(path)
        if records is not None:
            return records
    if suffix == ".txt" and stream:
        return [(str(path), TextFile(path))]
    text = "".join(_text_lines(path, whole=True))
    if suffix == ".txt":
        return [(str(path), text)]
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise ValueError(f"{path}: not JSON ({e})") from None
        # (JSON Lines under .json: what datasets' Dataset.to_json writes, and reads back)
        return _json_lines(text.split("\n"), path)
    if isinstance(values, dict):
        # (one object is one record: a one-row dataset's to_json writes it on one line, JSON Lines
        # that datasets reads back as that row; an object of columns has no record's fields)
        return [(str(path), values)]
    if not isinstance(values, list):
        raise ValueError(f"{path}: expected a JSON list of {what}")
    return [(f"{path}[{i}]", v) for i, v in enumerate(values)]


def _blank(path: Path) -> bool:
    """Whether the text file ``path`` holds nothing but whitespace (read in pieces up to the first
    other character: a .json of one line is not read whole for it)."""
    pieces = _text_lines(path, chars=1 << 16)
    try:
        return all(not piece.strip() for piece in pieces)
    finally:
        pieces.close()


def _streamed_json_lines(path: Path) -> Optional[List[tuple]]:
    """The records of a ``.json`` file of JSON Lines (what datasets' ``to_json`` writes, and the
    hub's C4 shards ``c4-train.*.json.gz`` that GPTQ calibrates on), each line parsed as it is
    read. Read whole, its text was held, then split into lines beside it, then parsed: about
    three times the text in memory (GBs for a C4 shard's 830 MB), for the same records. None
    where the file is not plainly that (a JSON list, a single value, a line that is not JSON,
    a file that does not read): it is then read whole, with the results and errors of before
    (a single object is one record either way)."""
    records, lines = [], _text_lines(path)
    try:
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                return None  # (a JSON list)
            records.append((f"{path}:{i}", json.loads(line)))
    except ValueError:  # (json.JSONDecodeError, or the file's own: said as the whole read says it)
        return None
    finally:
        lines.close()
    # (two values or more: the whole text parsed as JSON stops at the first line's end, "Extra data")
    return records if len(records) > 1 else None


def _json_lines(lines: Iterable[str], path: Path) -> List[tuple]:
    """``(where, value)`` of each JSON line."""
    return [(f"{path}:{i}", _json(line, f"{path}:{i}")) for i, line in enumerate(lines, 1) if line.strip()]


def _parquet_rows(path: Path) -> List[dict]:
    """The rows of a ``.parquet`` file (an HF hub dataset's files), as dicts of the COLUMNS it has
    (all its columns if none: the error then shows a row)."""
    return list(_parquet_row_stream(path))


def _parquet_row_stream(path: Path):
    """``_parquet_rows``, a row group at a time as they are taken."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    def unreadable(e: Exception) -> ValueError:  # (pyarrow's errors for a damaged or foreign file)
        return _lfs_pointer(path) or ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                                                f"{str(e)[:200]})")

    # a row group at a time: read as one table, the whole column was in Arrow's memory beside the
    # Python strings made of it (twice the text at the peak), and Arrow's pool kept its pages; one
    # thread, as Arrow's threads decode ahead and held about twice the memory on 2 cores
    try:
        try:
            file = pq.ParquetFile(path)
            columns = [c for c in COLUMNS if c in file.schema_arrow.names] or None
        except Exception as e:
            raise unreadable(e) from None
        with file:
            for group in range(file.num_row_groups):
                try:
                    rows = file.read_row_group(group, columns=columns, use_threads=False).to_pylist()
                except Exception as e:
                    raise unreadable(e) from None
                yield from rows
    finally:
        pa.default_memory_pool().release_unused()  # (its freed pages back to the system: held, for the whole run)


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None


def _kind(path: Path) -> str:
    """A file's suffix that names its content (lower case), through a compression suffix:
    ``.jsonl`` for ``x.JSONL.gz``."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in COMPRESSIONS else suffix


# what a Git LFS pointer starts with: a dataset cloned without git-lfs (or before git lfs pull) holds these
# in place of its files
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def _lfs_pointer(path: Path, what: str = "") -> Optional[ValueError]:
    """The error to raise where ``path`` is a Git LFS pointer, not the file it stands for (a .txt one was
    calibrated on as a document, in silence; an image's or a clip's refused as no image or audio); else None."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER)) != _LFS_POINTER:
                return None
    except OSError:
        return None
    return ValueError(f"{what}{': ' * bool(what)}{path}: a Git LFS pointer, not the file it stands for (cloned "
                      f"without git-lfs?): fetch the files (git lfs pull, or hf download for a hub repo)")


def _text_lines(path: Path, whole: bool = False, chars: int = 0):
    """The lines of a UTF-8 text file (a byte-order mark dropped; lines end at "\\n" only: JSON
    strings may hold U+2028 and the like), decompressed if its name says so, read as they are
    taken, so that a large JSON Lines file is never held whole; ``whole``: its text as one;
    ``chars``: its text in pieces of that many characters (they join to the whole text)."""
    pointer = _lfs_pointer(path)
    if pointer is not None:
        raise pointer
    compression = COMPRESSIONS.get(path.suffix.lower())
    module = None if compression is None else importlib.import_module(compression)
    opened = path.open("rb") if module is None else module.open(path, "rb")
    # a damaged or truncated archive: gzip.BadGzipFile (an OSError) or EOFError, and a corrupt
    # deflate stream's zlib.error or any .xz fault's lzma.LZMAError (neither an OSError)
    damaged = (OSError, EOFError, zlib.error) + ((module.LZMAError,) if compression == "lzma" else ())
    # lines end at "\n" only; a whole text's "\r\n" and "\r" become "\n" (universal newlines,
    # as Path.read_text gave a .txt or .json file before: a Windows-saved text tokenizes as typed)
    with opened as raw, io.TextIOWrapper(raw, encoding="utf-8-sig",
                                         newline=None if whole or chars else "\n") as f:
        try:
            if whole:
                yield f.read()
            elif chars:
                yield from iter(lambda: f.read(chars), "")
            else:
                yield from f
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text{'' if compression is None else ' once decompressed'} "
                             f"({e})") from None
        except damaged as e:
            if compression is None:
                raise
            raise ValueError(f"{path}: not a readable {compression} file ({type(e).__name__}: {e})") from None


def _tree(directory: Path, suffixes: tuple, compressed: bool = False) -> List[Path]:
    """``files_under(directory, ...)``; of a tree whose files name splits, the train split's
    (``_train_split``)."""
    return _train_split(directory, files_under(directory, suffixes, compressed))


def files_under(directory: Path, suffixes: tuple, compressed: bool = False) -> List[Path]:
    """The files under ``directory``, at any depth, with one of ``suffixes`` (any case; where
    ``compressed``, also behind a compression suffix: see ``_kind``), sorted, following linked
    folders, skipping hidden files and folders (``.ipynb_checkpoints``, ``.git``); links to nothing
    are refused."""
    kind = _kind if compressed else (lambda p: p.suffix.lower())
    found, walked, dangling = [], set(), []
    # (rglob does not follow symlinked folders: class folders linked in, as ImageFolder layouts are
    # often made, were skipped in silence; each real folder is walked once, a link back up is not)
    for root, folders, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders[:] = []
            continue
        walked.add(real)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [p for name in names if not name.startswith(".")
                  and kind(p := Path(root) / name) in suffixes and p.is_file()]
        # (a git-annex or DVC checkout whose content was not fetched: its links were left out in silence)
        dangling += [p for name in names if not name.startswith(".")
                     and kind(p := Path(root) / name) in suffixes and p.is_symlink() and not p.exists()]
    if dangling:
        shown = ", ".join(map(str, sorted(dangling)[:3])) + ", ..." * (len(dangling) > 3)
        raise ValueError(f"{directory}: {len(dangling)} file(s) under the directory ({shown}) are links to nothing: "
                         f"a git-annex (DataLad) or DVC checkout whose content was not fetched? (git annex get, "
                         f"datalad get, dvc pull), or remove the links")
    return sorted(found)


def _read_and_not(directory: Path, readable: tuple, known: tuple, split: bool = True) -> tuple:
    """The files under ``directory`` (where ``split``, ``_tree``'s: of a tree of splits, the train
    split's) of a format in ``readable``, and those of a format in ``known`` but not ``readable``:
    one tree, so that a split left out is not looked in (a .heic in val/ was refused where train/
    alone is read)."""
    files = (_tree if split else files_under)(directory, tuple(dict.fromkeys(readable + known)))
    return [f for f in files if f.suffix.lower() in readable], [f for f in files if f.suffix.lower() not in readable]


# the words that name a split in a file's or folder's name, as datasets' load_dataset finds an HF
# hub dataset's splits (train-00000-of-00001.parquet, data/validation/, c4-validation.*.json.gz)
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
_SPLIT_OF_WORD = {word: split for split, words in SPLIT_WORDS.items() for word in words}


def _split_of(relative: Path) -> Optional[str]:
    """The split a file's path names, its own name first, then its folders' from the innermost."""
    for part in reversed(relative.parts):
        split = next((_SPLIT_OF_WORD[w] for w in re.split(r"[-._ ]", part.lower()) if w in _SPLIT_OF_WORD), None)
        if split is not None:
            return split
    return None


# datasets' info files of a dataset's repo or save (its features, splits, sizes): metadata, never
# documents (read as such, a snapshot's dataset_infos.json failed as "expected a string, or an
# object with a 'text' string")
DATASET_METADATA = ("dataset_infos.json", "dataset_info.json", "dataset_dict.json")
# a data file named as the hub names a split's shards (train-00000-of-00001.parquet, with a hash
# after them in its parquet conversions: train-00000-of-00001-5c5b9b5c.parquet; C4's
# c4-train.00000-of-01024.json.gz)
_SHARD = re.compile(r"[-._]\d{5}-of-\d{5}(?!\d)")


def _train_split(directory: Path, files: List[Path]) -> List[Path]:
    """``files`` of ``directory``, or of a tree whose files name two splits or more (an HF
    dataset's snapshot: data/train-*.parquet beside validation-* and test-*, with the repo's
    requirements.txt) or a train split as the hub names its shards (train-00000-of-00001.parquet)
    or beside datasets' info files (dataset_infos.json: a snapshot of one split) the train
    split's, with a warning naming the files left out: read whole, the evaluation splits and
    stray files were calibrated on too. Several splits without a
    train split are refused: which to read is the user's choice. A directory given below the
    split's name (data/train/) is read whole. datasets' info files are left out of any, warned."""
    splits = {}
    for f in files:
        splits.setdefault(_split_of(f.relative_to(directory)), []).append(f)
    named = sorted((s for s in splits if s is not None), key=lambda s: (s != "train", s))
    metadata = [f for f in files if f.name.lower() in DATASET_METADATA]
    # (a train split beside datasets' info files, or sharded as the hub shards it, is a snapshot's)
    snapshot = "train" in splits and (metadata or any(_SHARD.search(f.name) for f in splits["train"]))
    if len(named) < 2 and not snapshot:
        # (no split named, or one: a user's documents, 'dev_notes.txt' or 'training_notes.txt'
        # beside 'chapter1.txt', name no snapshot's splits: as given)
        if metadata:
            listed = ", ".join(str(f.relative_to(directory)) for f in metadata)
            warnings.warn(f"{directory}: leaving out {listed}, a dataset's metadata (datasets' info files), "
                          f"not documents")
        return [f for f in files if f not in metadata]
    shown = ", ".join(named)
    if "train" not in splits:
        raise ValueError(f"{directory}: files of the splits {shown} and no train split: give one split's folder "
                         f"or files (as {splits[named[0]][0]}) to calibrate on")
    left = [f for f in files if f not in splits["train"]]
    if left:
        listed = ", ".join(str(f.relative_to(directory)) for f in left[:8]) + (", ..." if len(left) > 8 else "")
        n = len(splits["train"])
        warnings.warn(f"{directory}: files of the split{'s' * (len(named) > 1)} {shown}: calibrating on train "
                      f"({n} file{'s' * (n > 1)}), leaving out the {len(left)} other{'s' * (len(left) > 1)} "
                      f"({listed}); give a split's folder or files to calibrate on it")
    return splits["train"]


# characters a TextFile reads at a time; text it keeps before the place last read (a window's
# start moves up to 64 characters past its place, to a whitespace: the next window's place may
# lie before it)
_READ_CHARS = 1 << 16
_BEHIND = 256


def _file_version(path: Path) -> tuple:
    """What tells a file rewritten since it was opened: its size and modification time."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class TextFile:
    """The document of a ``.txt`` file, read from the file where it is sliced, not held:
    ``text_windows`` draws windows from it (``len``, ``[a:b]``) and ``text()`` reads it whole.
    Read whole, a file's bytes, text and newline-translated copy were in memory at once (three
    times the file) and the text was held while windows that read a few MB of it were drawn.
    Opening it reads it once (its length, its end), as UTF-8 with universal newlines, as the
    whole read does. Slices are read forward from where the last one was (a slice at 0, a
    window running into the document, from the start): in the order of their places,
    ``text_windows``' windows read a compressed file about once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stat = self._version()  # (before the count: a change while it runs is seen too)
        length, self._end, self._tail, spaces = 0, 0, "", ""
        for piece in _text_lines(self.path, chars=_READ_CHARS):
            kept = piece.rstrip()
            if kept:  # (what _ends_with reads: the text's last characters before its trailing whitespace)
                self._tail, spaces = (self._tail + spaces + kept)[-_BEHIND:], piece[len(kept):][-_BEHIND:]
                self._end = length + len(kept)
            else:
                spaces = (spaces + piece)[-_BEHIND:]
            length += len(piece)
        self._length = length
        self._readers = {}  # from the start, and from the last place

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TextFile({str(self.path)!r}, {self._length} characters)"

    def close(self) -> None:
        """Close its file (a later slice opens it again): the file a slice read is kept open for
        the next one."""
        for _, _, pieces in self._readers.values():
            pieces.close()
        self._readers = {}

    def _version(self) -> tuple:
        return _file_version(self.path)

    def _changed(self) -> ValueError:
        return ValueError(f"{self.path}: changed since it was opened ({self._length} characters then): its windows "
                          f"would be drawn from places of the text it held then in the text it holds now")

    def text(self) -> str:
        if self._version() != self._stat:
            raise self._changed()
        return "".join(_text_lines(self.path, whole=True))

    def ends_with(self, suffix: str) -> bool:
        """``text().rstrip().endswith(suffix)``."""
        if len(suffix) <= len(self._tail) or self._end <= len(self._tail):
            return self._tail.endswith(suffix)
        return self[self._end - len(suffix):self._end] == suffix

    def __getitem__(self, item) -> str:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError(f"{self!r} is read by slices [a:b]")
        a, b, _ = item.indices(self._length)
        if b <= a:
            return ""
        head = a == 0
        start, text, pieces = self._readers.get(head) or (0, "", None)
        if pieces is None or a < start:  # (before what is kept: read from the start again)
            if pieces is not None:
                pieces.close()
            if self._version() != self._stat:
                raise self._changed()
            start, text, pieces = 0, "", _text_lines(self.path, chars=_READ_CHARS)
        while True:
            if not head and a - _BEHIND > start:  # (what no later slice reads)
                cut = min(a - _BEHIND - start, len(text))
                start, text = start + cut, text[cut:]
            if start + len(text) >= b:
                break
            piece = next(pieces, "")
            if not piece:
                if start + len(text) != self._length:  # (rewritten in place while it was read)
                    raise self._changed()
                break
            text += piece
        self._readers[head] = (start, text, pieces)
        return text[a - start:b - start]


class JsonLines:
    """The texts of a file of JSON Lines (``.jsonl``, or under ``.json``: datasets' ``to_json``,
    the hub's C4 shards ``c4-train.*.json.gz``), each read from the file where it is used, not
    held: ``documents``, one ``TextRecord`` a record. Held, every record's text was in memory
    while windows that read a few MB of them were drawn (2.4 times the file at the peak).
    Opening it reads it once, each record parsed and rendered (``_text_of``, conversations by
    ``tokenizer``'s chat template) for its length, then let go. A record is read again by
    reading the file on from the last one read (in the order of ``text_windows``' places: about
    once), the last ``_KEPT`` kept. ``strict`` (``.jsonl``): a record that is not JSON or no
    text is refused, by its line; else (``.json``) ``documents`` is None where the file is not
    plainly JSON Lines of texts (a JSON list, a single value, a line that is not JSON), to be
    read whole, with the results and errors of a whole read."""

    _KEPT = 64

    def __init__(self, path: Path, tokenizer=None, *, strict: bool = True):
        self.path, self.tokenizer = Path(path), tokenizer
        self._stat = self._version()  # (before the count: a change while it runs is seen too)
        self.documents, self._reader, self._at, self._kept = [], None, -1, {}
        records = self._records()
        try:
            for position, value in records:
                self.documents.append(self._document(position, value))
        except ValueError:
            if strict:
                raise
            self.documents = None
        finally:
            records.close()
        if not strict and self.documents is not None and len(self.documents) < 2:
            self.documents = None  # (one value: the whole file's, as read whole)

    def _document(self, position: int, value) -> "TextRecord":
        return TextRecord(self, position, len(_text_of(value, self._where(position), self.tokenizer)))

    def _records(self):
        """``(position, value)`` of each record, in the file's order."""
        lines = _text_lines(self.path)
        try:
            for i, line in enumerate(lines, 1):
                if line.strip():
                    yield i, _json(line, self._where(i))
        finally:
            lines.close()

    def _where(self, position: int) -> str:
        return f"{self.path}:{position}"

    def _version(self) -> tuple:
        return _file_version(self.path)

    def _changed(self) -> ValueError:
        return ValueError(f"{self.path}: changed since it was opened ({len(self.documents)} texts then): its windows "
                          f"would be drawn from places of the texts it held then in the texts it holds now")

    def text(self, document: "TextRecord") -> str:
        """The text of ``document`` (one of ``documents``)."""
        text = self._kept.get(document.position)
        if text is not None:
            return text
        if self._reader is None or document.position <= self._at:  # (before what was read: from the start again)
            self.close()
            if self._version() != self._stat:
                raise self._changed()
            self._reader = self._records()
        for self._at, value in self._reader:
            if self._at == document.position:
                text = _text_of(value, self._where(self._at), self.tokenizer)
                if len(text) != len(document):
                    raise self._changed()
                self._kept[document.position] = text
                if len(self._kept) > self._KEPT:
                    del self._kept[next(iter(self._kept))]
                if document is self.documents[-1]:  # (nothing after it: a directory of files read whole
                    self._stop()  # in turn held them all open, up to the system's limit)
                return text
        raise self._changed()

    def _stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._at = None, -1

    def close(self) -> None:
        """Close its file (a later read opens it again) and let go of the texts kept."""
        self._stop()
        self._kept = {}


class ParquetRows(JsonLines):
    """The texts of a ``.parquet`` file's rows (an HF hub dataset's files), read as JSON Lines'
    are (``JsonLines``), a row group at a time: held, the rows were all Python objects (2.3
    times their texts at the peak, beside Arrow's own)."""

    def _records(self):
        rows = _parquet_row_stream(self.path)
        try:
            yield from enumerate(rows)
        finally:
            rows.close()

    def _where(self, position: int) -> str:
        return f"{self.path}:row {position}"


class TextRecord:
    """One record's text of a ``JsonLines`` (or ``ParquetRows``) file, read where it is sliced
    (``len``, ``[a:b]``; ``text()`` whole)."""

    __slots__ = ("file", "position", "_length")

    def __init__(self, file: JsonLines, position: int, length: int):
        self.file, self.position, self._length = file, position, length

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TextRecord({self.file._where(self.position)!r}, {self._length} characters)"

    def text(self) -> str:
        return self.file.text(self)

    def __getitem__(self, item) -> str:
        return self.text()[item]

    def ends_with(self, suffix: str) -> bool:
        """``text().rstrip().endswith(suffix)``."""
        return _ends_with(self.text(), suffix)

    def of_file(self, other) -> bool:
        """Whether ``other`` is a text of this one's file."""
        return isinstance(other, TextRecord) and other.file is self.file

    def close(self) -> None:
        self.file.close()


def read_texts(source: Union[str, Path, Sequence[Union[str, Path]]], tokenizer=None, *,
               stream: bool = False) -> List[Union[str, "TextFile"]]:
    """The documents of a text file, a directory of them, or a list of either; ``tokenizer``
    renders conversations (needed only where there are some). ``stream``: each ``.txt`` file as
    a ``TextFile`` and each JSON Lines record or .parquet row as a ``TextRecord``, read where ``text_windows``
    reads them, not held (``epmq quantize`` reads them so)."""
    texts = [v if isinstance(v, (TextFile, TextRecord)) else _text_of(v, where, tokenizer) for where, v in
             _records(source, TEXT_SUFFIXES, "text", "unknown text file type", stream, tokenizer)]
    # (said by text_windows as the task's 'the texts have no tokens: no documents were given', the files unnamed)
    return _some_of(texts, source, "texts")


# Texts of more characters than this (about 2M tokens) are not tokenized whole: each window is
# tokenized from its own random place (``_windows_of_places``). Tokenizing a 16 MB file whole took
# 10 s and 2.8 GB (transformers keeps each token's string and offsets), a 1 GB file minutes and
# tens of GB, for 128 windows that hold 65k tokens; below it the windows are those of the whole
# token stream, exactly as before.
FULL_TOKENIZATION_CHARS = 1 << 23
_SPACE = re.compile(r"\s")


def _ends_with(text: str, eos_text) -> bool:
    """Whether ``text`` ends with ``eos_text``, trailing whitespace aside (``text.rstrip()``,
    without copying a long text)."""
    if not (isinstance(eos_text, str) and eos_text):
        return False
    if isinstance(text, (TextFile, TextRecord)):
        return text.ends_with(eos_text)
    k = len(text)
    while k and text[k - 1].isspace():
        k -= 1
    return text.endswith(eos_text, 0, k)


def text_windows(texts: Iterable[str], tokenizer, *, samples: int = 128, seq_len: int = 512,
                 batch_size: int = 8, seed: int = 0, what: str = "calibration") -> List[dict]:
    """``samples`` random windows of ``seq_len`` tokens of ``texts`` (joined with EOS), batched.

    When the texts hold fewer than ``seq_len`` tokens, the one window is all of them (with a
    warning); windows overlap when they hold fewer than ``samples * seq_len`` (with a warning).
    Texts of more than ``FULL_TOKENIZATION_CHARS`` characters in all are not tokenized whole:
    see ``_windows_of_places``.
    """
    samples, batch_size, seq_len = _check_sizes(samples, batch_size, seq_len)
    if isinstance(texts, os.PathLike) or isinstance(texts, str) and os.path.exists(texts):
        # (a Path failed as 'not iterable'; a str path was told to give [text], the path's characters)
        raise TypeError(f"texts must be an iterable of documents (a list of str), got the path {str(texts)!r}: "
                        f"give epmq.calibration.read_texts({str(texts)!r})")
    if isinstance(texts, (str, bytes)):  # (iterated, each character was a document, EOS between them)
        raise TypeError(f"texts must be an iterable of documents (a list of str), got one "
                        f"{type(texts).__name__}: give [text]")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if not eos:
        warnings.warn(f"{what}: the tokenizer has no EOS token: the documents are joined without a separator")
    eos_text = getattr(tokenizer, "eos_token", None)
    texts = list(texts)
    for k, text in enumerate(texts):  # (a dataset's row ended in "'dict' object has no attribute 'text'")
        if not isinstance(text, (str, TextFile, TextRecord)):
            raise TypeError(f"texts[{k}] must be a document (a str), got {type(text).__name__} {str(text)[:60]!r}"
                            + (": give its text (row['text']), or read files with epmq.calibration.read_texts, "
                               "which renders records" if isinstance(text, Mapping) else ""))
    given, texts = texts, [t for t in texts if len(t)]  # (an empty document adds nothing: see below)
    g = torch.Generator().manual_seed(check_seed(seed))  # (numpy's integers as ints; past 64 bits named)
    if sum(map(len, texts)) > FULL_TOKENIZATION_CHARS:
        windows, documents = _windows_of_places(texts, tokenizer, eos, eos_text, samples, seq_len, g, what)
        _warn_of_unknown_tokens(windows.tolist(), [_document_name(texts[k], k) for k in documents], tokenizer, eos,
                                what)
        return [{"input_ids": windows[i:i + batch_size], "attention_mask": torch.ones_like(windows[i:i + batch_size])}
                for i in range(0, samples, batch_size)]
    streamed = named = texts
    try:
        texts = [t if isinstance(t, str) else t.text() for t in texts]  # (TextFiles, JsonLines: short enough)
    finally:
        _close(streamed)
    ids: List[int] = []
    content, firsts, of = 0, [], []  # (where each document's tokens start in the stream, and which it is)
    for k, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:  # (an empty document, as a blank line of wikitext's rows: no second EOS in a row)
            continue
        content += len(tokens)
        firsts.append(len(ids))
        of.append(k)
        # a conversation the chat template rendered may end with EOS already: ChatML's (Qwen's,
        # Phi's) ends each turn with its EOS and a newline, "<|im_end|>\n", which a second EOS
        # after it would turn into a sequence the model never saw
        ends = bool(eos) and (tokens[-1:] == eos or _ends_with(text, eos_text))
        ids += tokens + ([] if ends else eos)
    if not content:  # (named: of a task's files, which wrote nothing)
        names = ", ".join(_document_name(t, k) for k, t in enumerate(given[:3])) + ", ..." * (len(given) > 3)
        raise ValueError(f"{what}: the texts have no tokens: "
                         + (f"its {len(given)} document{'s' * (len(given) > 1)} ({names}) "
                            f"{'are' if len(given) > 1 else 'is'} empty or blank" if given
                            else "no documents were given"))
    stream = torch.tensor(ids, dtype=torch.long)
    if len(stream) < seq_len:
        warnings.warn(f"{what}: the texts hold {len(stream)} tokens, fewer than seq_len={seq_len}: "
                      f"calibrating on one window of all of them")
        seq_len, samples = len(stream), 1
    elif len(stream) < samples * seq_len:  # (as _drawn warns of fewer images or pairs than samples)
        warnings.warn(f"{what}: the texts hold {len(stream)} tokens, fewer than samples x seq_len = {samples} x "
                      f"{seq_len}: the {samples} windows overlap, repeating tokens (about "
                      f"{len(stream) / seq_len:.1f} windows' worth of distinct ones)")
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=g)
    windows = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
    documents = [of[int(i)] for i in torch.searchsorted(torch.tensor(firsts), starts, right=True) - 1]
    _warn_of_unknown_tokens(windows.tolist(), [_document_name(named[k], k) for k in documents], tokenizer, eos, what)
    return [{"input_ids": windows[i:i + batch_size],
             "attention_mask": torch.ones_like(windows[i:i + batch_size])}
            for i in range(0, samples, batch_size)]


def _windows_of_places(texts: List[str], tokenizer, eos: list, eos_text, samples: int, seq_len: int,
                       g: torch.Generator, what: str) -> tuple:
    """``[samples, seq_len]`` windows of long texts, each tokenized from its own place, so that
    the cost is that of the windows (about ``samples * seq_len`` tokens), not of the texts; and
    the document each starts in.

    Each window starts at a character drawn uniformly (seeded) from the texts joined in a
    cycle (the last document followed by the first, as by any other), moved to the next
    whitespace within 64 characters; the text from there is tokenized in growing slices, and
    the first token (the rest of a word, or a whitespace) and the last of a slice cut short
    (part of a word) are dropped. A document's end is followed by EOS (unless it ends with
    one) and the next document, as in the whole token stream. The windows are thus runs of the
    stream the whole texts make, up to how a tokenizer would have merged across the cuts."""
    ends = torch.cumsum(torch.tensor([len(t) for t in texts], dtype=torch.long), 0)
    places = torch.randint(0, int(ends[-1]), (samples,), generator=g).tolist()
    windows = [None] * samples
    try:
        _draw_windows(texts, tokenizer, eos, eos_text, seq_len, places, ends, windows, what)
    finally:
        _close(texts)
    documents = torch.searchsorted(ends, torch.tensor(places, dtype=torch.long), right=True).tolist()
    return torch.tensor(windows, dtype=torch.long), documents


# The share of the windows' tokens that are the tokenizer's unknown (or padding) token past which
# they are warned of: texts in a script its vocabulary lacks become windows of <unk> alone
UNKNOWN_TOKENS_SHARE = 0.25


def _document_name(text, k: int) -> str:
    """Where the document ``texts[k]`` is: its file, its record, or its place."""
    if isinstance(text, TextFile):
        return str(text.path)
    return text.file._where(text.position) if isinstance(text, TextRecord) else f"document {k}"


def _warn_of_unknown_tokens(rows: list, names: list, tokenizer, eos: list, what: str, kind: str = "windows") -> None:
    """Warn where more than ``UNKNOWN_TOKENS_SHARE`` of the tokens of ``rows`` (lists of ids: the
    windows, or the pairs' inputs and targets) are the tokenizer's unknown or padding token (not
    its EOS, which separates the documents), naming (``names[n]``: where row ``n`` is drawn from)
    the rows mostly made of them."""
    # (a T5 or word-level tokenizer given Chinese: every window <unk>, one token's statistics, in silence)
    unknown = {getattr(tokenizer, a, None) for a in ("unk_token_id", "pad_token_id")} - {None} - set(eos)
    unknown = {int(t) for t in unknown if is_integer(t)}
    hits = [sum(t in unknown for t in row) for row in rows]
    total = sum(map(len, rows))
    if not unknown or not total or sum(hits) <= UNKNOWN_TOKENS_SHARE * total:
        return
    order = sorted(range(len(rows)), key=lambda n: -hits[n] / max(len(rows[n]), 1))
    mostly = list(dict.fromkeys(names[n] for n in order if hits[n] > len(rows[n]) / 2))
    where = (f", the {kind} mostly of them drawn from {', '.join(mostly[:3])}{', ...' if len(mostly) > 3 else ''}"
             if mostly else "")
    warnings.warn(f"{what}: {sum(hits) / total:.0%} of the {total} tokens of the {kind} are the tokenizer's unknown or "
                  f"padding token{where}: text in a language or script its vocabulary lacks? Their statistics are "
                  f"those of that one token; calibrate on texts the tokenizer reads")


def _close(texts) -> None:
    """Close the files of the streamed documents among ``texts``."""
    for text in texts:
        if isinstance(text, (TextFile, TextRecord)):
            text.close()


def _draw_windows(texts, tokenizer, eos, eos_text, seq_len, places, ends, windows, what) -> None:
    """``windows[n]``: the window from ``places[n]`` (see ``_windows_of_places``)."""
    passed = 0  # (documents before this one no later window starts in: their files are closed)
    # (in the order of their places, each window its own: a TextFile is read forward, about once)
    for n in sorted(range(len(places)), key=places.__getitem__):
        place = places[n]
        i = int(torch.searchsorted(ends, place, right=True))  # (the document holding the character)
        # (a window running past the last document reads the first ones again: opened again then)
        for text in texts[passed:i]:  # (a JSON Lines file read on, in the window's document: kept open)
            if isinstance(text, TextFile) or isinstance(text, TextRecord) and not text.of_file(texts[i]):
                text.close()
        passed = i
        offset = place - (int(ends[i]) - len(texts[i]))
        cut_first = offset > 0
        if cut_first:
            space = _SPACE.search(texts[i][offset:offset + 64])
            offset = offset + space.start() if space else offset
        window: List[int] = []
        for _ in range(2 * len(texts) + 1):  # (a document at most twice: fewer tokens than a window)
            text, need = texts[i], seq_len - len(window)
            span = 4 * (need + 2)
            while True:
                stop = min(offset + span, len(text))
                tokens = tokenizer(text[offset:stop], add_special_tokens=False)["input_ids"]
                cut_last = stop < len(text)
                if not cut_last or len(tokens) - cut_first - cut_last >= need:
                    break
                span *= 2
            tokens = tokens[int(cut_first):len(tokens) - int(cut_last)]
            window += tokens[:need]
            if len(window) == seq_len:
                break
            if eos and (tokens or offset > 0) and not (tokens[-1:] == eos or _ends_with(text, eos_text)):
                window += eos
                if len(window) == seq_len:
                    break
            i, offset, cut_first = (i + 1) % len(texts), 0, False
        else:
            raise ValueError(f"{what}: the texts hold {int(ends[-1])} characters and fewer than seq_len={seq_len} "
                             f"tokens")
        windows[n] = window


# Tensors along the token axis of the encoder (of the model, for a decoder-only one) and of the
# decoder of an encoder-decoder; a decoder-only model's labels are on its token axis.
# Vision-language models' per-token inputs are on it too, [B, L, ...] as the ids: Mllama's
# cross_attention_mask (which image each token attends to), Kosmos-2's image_embeds_position_mask,
# the Qwen-VL family's mm_token_type_ids. Left uncut, a row cut to its real tokens kept them whole:
# Mllama read the first L_real entries (a left-padded row's real tokens took the pad's zeros, their
# cross-attention masked out, in silence), Kosmos-2 failed on the shapes.
# So are text encoders' per-token inputs beside the ids (left whole, the model failed on a padded
# batch with "the size of tensor a (4) must match the size of tensor b (6)", naming none of them):
# LayoutLM's bbox [B, L, 4], Longformer's and LED's global_attention_mask, XLM's langs, ERNIE's
# task_type_ids, RoCBert's shape and pronunciation ids, MarkupLM's xpaths [B, L, depth], and
# ERNIE 4.5 VL's moe_mm_token_type_ids. ESM C's sequence_id (each token's chain, -1 its padding) too:
# it marks the padding where no attention_mask is given (_masks).
_ENCODER_AXIS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                 "cross_attention_mask", "image_embeds_position_mask", "mm_token_type_ids",
                 "bbox", "global_attention_mask", "langs", "task_type_ids", "input_shape_ids",
                 "input_pronunciation_ids", "xpath_tags_seq", "xpath_subs_seq", "moe_mm_token_type_ids",
                 "sequence_id")
# Names that models give inputs of other shapes too, per token only in the rank given: Idefics'
# image_attention_mask [B, L, images] (which images each token attends to; left whole, every padded
# batch failed with "the size of tensor a (4) must match the size of tensor b (6)"), where FLAVA's
# is per patch [B, patches] and Phi-4's per pixel [B, crops, H, W]. Cut where that rank's leading
# dims are the mask's [B, L]; else they go with their row.
# Audio encoders' inputs beside a mask of their samples or frames: Wav2Vec2's (HuBERT's, WavLM's)
# input_values [B, samples], Speech2Text's and Wav2Vec2-BERT's input_features [B, frames, features]
# (left whole, each row ran its padded samples, whose frames every Hessian counted, in silence);
# Whisper's input_features [B, mels, frames] go with their row, its encoder reads them all.
# Only where no text comes beside them: an audio LM's attention_mask is its text's (Qwen2-Audio's
# input_features [B, 128 mels, frames] go with their row, which texts of 128 tokens cut by the mels).
_ENCODER_AXIS_OF_RANK = {"image_attention_mask": 3, "input_values": 2, "input_features": 3}
_AUDIO_INPUTS = ("input_values", "input_features")
# Audio models' per-frame inputs: Wav2Vec2ForPreTraining's (HuBERT's, WavLM's, ...) mask_time_indices
# [B, frames] and sampled_negative_indices [B, frames, negatives]. Beside a mask of the frames they are
# on its axis; beside input_values [B, samples] cut to a row's real samples, each row keeps the
# frames the model makes of those (_frames): left whole, the padded batch's frames met the cut row's
# fewer ones in "The shape of the mask [1, 63] at index 1 does not match ... [1, 39, 32]".
_FRAME_INPUTS = ("mask_time_indices", "sampled_negative_indices")
# Per-frame inputs whose values are frames too: sampled_negative_indices index the batch's frames
# flattened (row b's offset by b * frames, as _sample_negative_indices gives them). Cut with their
# frames alone, a row past the first pointed past its own: 'index 123 is out of bounds ... size 63'.
_FLAT_FRAME_INDICES = ("sampled_negative_indices",)
_DECODER_AXIS = ("decoder_input_ids", "decoder_attention_mask", "decoder_position_ids",
                 "decoder_inputs_embeds", "labels")


def _masks(item: Mapping, encoder_decoder: bool) -> list:
    """``[(keys on the axis, what the mask is, bool mask [B, L])]`` of a model-input dict."""
    sides = []
    mask = item.get("attention_mask")
    chains = item.get("sequence_id")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        sides.append((_ENCODER_AXIS + (() if encoder_decoder else ("labels",)), "attention_mask", mask != 0))
    elif isinstance(chains, torch.Tensor) and chains.dim() == 2 and not chains.is_floating_point():
        # (ESM C: its padding is sequence_id -1, and given that, its forward ignores attention_mask)
        sides.append((_ENCODER_AXIS + (() if encoder_decoder else ("labels",)), "sequence_id", chains >= 0))
    if not encoder_decoder:
        return sides
    mask, labels = item.get("decoder_attention_mask"), item.get("labels")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        sides.append((_DECODER_AXIS, "decoder_attention_mask", mask != 0))
    elif isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 0:
        # (labels of no position have no padding to find: the walk names them as empty)
        # labels padded with -100 (the loss's ignore index) at the end, or at the start (a
        # tokenizer that pads on the left, as DataCollatorForSeq2Seq then does): the decoder
        # positions outside the real labels are padding (their inputs are pad tokens); the model
        # derives the decoder's inputs from the labels cut to their span, its start token first.
        # A row of no real label keeps its first position, the start token, which any forward
        # runs (the row's encoder tokens are real: dropping the row lost them)
        real = labels != -100
        L = labels.shape[1]
        any_real = real.any(1)
        first = torch.where(any_real, real.int().argmax(1), 0)
        last = torch.where(any_real, L - 1 - real.flip(1).int().argmax(1), 0)
        given = [k for k in ("decoder_input_ids", "decoder_inputs_embeds") if item.get(k) is not None]
        if bool((first > 0).any()) and given:
            raise ValueError(f"calibration batch: labels padded on the left (-100 before a row's labels) "
                             f"beside {given[0]} that are not the model's own shift of them: cut apart, those "
                             f"lose the decoder's start token; pad on the right, give decoder_attention_mask, "
                             f"or leave {given[0]} out (the model derives them from the labels)")
        positions = torch.arange(L, device=labels.device)
        sides.append((_DECODER_AXIS, "labels", (positions >= first[:, None]) & (positions <= last[:, None])))
    return sides


def _without_derived_decoder_inputs(item: Mapping, model):
    """``(item, derive)``: ``item`` less its ``decoder_input_ids`` where they are the model's own
    shift of its left-padded labels (``DataCollatorForSeq2Seq`` with a tokenizer that pads on the
    left makes them so), and the model's function that derives them again from the labels once
    these are cut to their span (its start token first); else ``(item, None)``."""
    labels, ids = item.get("labels"), item.get("decoder_input_ids")
    derive = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if not (isinstance(labels, torch.Tensor) and labels.dim() == 2 and isinstance(ids, torch.Tensor)
            and callable(derive) and item.get("decoder_attention_mask") is None
            and bool((labels[:, 0] == -100).any()) and ids.shape == labels.shape):
        return item, None
    try:
        derived = derive(labels=labels.clone())  # (a copy: FSMT's fills the -100 in place)
    except Exception:  # noqa: BLE001 (a model that cannot derive them: the item as it is)
        return item, None
    if isinstance(derived, torch.Tensor) and torch.equal(derived.to(ids.device), ids):
        return {k: v for k, v in item.items() if k != "decoder_input_ids"}, derive
    return item, None


def _span(row: torch.Tensor, what: str, b: int) -> Optional[tuple]:
    (real,) = torch.nonzero(row, as_tuple=True)
    if real.numel() == 0:
        return None
    start, stop = int(real[0]), int(real[-1]) + 1
    if stop - start != real.numel():
        raise ValueError(f"calibration batch: {what} of row {b} has zeros between its ones; padding "
                         f"may only lead or trail a row (the walker counts every position it sees)")
    return start, stop


_MASKING = ("attention_mask", "decoder_attention_mask", "labels")
# Keyword arguments of models and blocks that carry a generation cache: never during calibration
# (RWKV's recurrent ``state``: every block writes its last token into it in place; ``layer_state``:
# FSMT's, whose cross attention then reads the keys and values a first call cached, never calling
# k_proj and v_proj; ``kv_cache``: ChatGLM's; ``cache_params``: Mamba's; ``inference_params``:
# mamba_ssm's).
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "layer_state", "state", "kv_cache",
                "cache_params", "inference_params")


def bound_to_forward(model, item) -> Optional[inspect.BoundArguments]:
    """A positional ``item`` (a tuple or list) bound to ``model``'s forward's parameters; None where
    it is none, or does not bind (the forward's own error, at the call)."""
    if model is None or not isinstance(item, (tuple, list)):
        return None
    try:
        return inspect.signature(model.forward).bind_partial(*item)
    except (TypeError, ValueError):
        return None


def _keywords(model, item):
    """A positional item (``(input_ids, attention_mask)``, as a ``DataLoader`` of a
    ``TensorDataset`` yields it) as keyword arguments of ``model``'s forward where that names a
    mask (or raw audio's ``input_values``) among them, so that its padding is seen; else the item
    as it is."""
    bound = bound_to_forward(model, item)
    if bound is None:
        return item
    # (GPT-2's forward takes its cache second: a TensorDataset's (ids, mask) gave the mask
    # as a cache, and the model failed deep inside with "no attribute 'get_seq_length'")
    # (a required parameter is one of the forward's inputs, whatever its name: a policy's
    # forward(state), PI0's robot state; a generation cache is optional, None by default)
    params = bound.signature.parameters
    cache = next((n for n, (name, value) in enumerate(bound.arguments.items())
                  if name in CACHE_KWARGS and isinstance(value, torch.Tensor)
                  and params[name].default is not inspect.Parameter.empty), None)
    if cache is not None:
        name = list(bound.arguments)[cache]
        raise ValueError(f"the item's element {cache} goes to {type(model).__name__}.forward's {name} (its "
                         f"positional order): give a dict of its inputs, as {{'input_ids': ids, "
                         f"'attention_mask': mask}}")
    # (raw audio too: padded clips without a mask, (input_values,) from a TensorDataset, are warned of
    # by name: _warn_of_unmasked_audio_padding)
    if not any(name in bound.arguments for name in _MASKING + ("input_values",)):
        return item
    kinds = {bound.signature.parameters[name].kind for name in bound.arguments}
    if kinds - {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}:
        return item  # (*args, **kwargs or positional-only bound: no keywords say the same)
    return dict(bound.arguments)


def unpad(item, *, encoder_decoder: bool = False, model=None) -> list:
    """A padded calibration batch as batches without padding: each row cut to its real tokens
    (``attention_mask``; on an encoder-decoder's decoder side ``decoder_attention_mask``, else
    trailing ``-100`` labels), rows of equal lengths batched together, rows with no token
    dropped. An item that is no dict, or has no padding, comes back as it is (``[item]``).

    Left padding is removed too, so the real tokens get positions from 0, as an unpadded
    sequence (and ``generate``) gives them. A padded batch must hold nothing but per-row tensors
    (first dimension the batch) and plain values. ``model``: a positional item that passes a
    mask is taken as its forward's keyword arguments (``_keywords``).
    """
    item = _keywords(model, item)
    if not isinstance(item, Mapping):
        return [item]
    derive = None
    if encoder_decoder:
        item, derive = _without_derived_decoder_inputs(item, model)
    if item.get("attention_mask") is None:
        _warn_of_unmasked_audio_padding(item, model)
    sides = _masks(item, encoder_decoder)
    if all(bool(mask.all()) for _, _, mask in sides):
        values = item.get("input_values")
        if isinstance(values, torch.Tensor) and values.dim() == 2:
            # clips too short for a frame alone in their batch (or of one length): no frame, as a
            # batch of padding no token, which the model's convolutions cannot run (the walk refused
            # the whole calibration on it, where a padded batch left the row out)
            if (framer := _frameless(model, values.shape[1])) is not None:
                warnings.warn(f"calibration batch: input_values of {values.shape[1]} samples make no frame of "
                              f"{type(framer).__name__}, which its convolutions cannot run; left out")
                return []
        return [item]
    B = sides[0][2].shape[0]
    for key, value in item.items():
        if isinstance(value, (list, tuple, dict)) or (
                isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != B)):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"calibration batch with padding: {key!r} ({shape}) is not a tensor with one "
                             f"row per sequence ({B}), so the batch cannot be cut into rows without "
                             f"padding; give batches without padding")
    on_axis = []  # per side: the keys to cut
    frames_of = []  # per-frame keys of cut input_values: cut to the frames of a row's samples
    for keys, what, mask in sides:
        on_axis.append([])
        for key in keys:
            value = item.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and value.shape[:2] == mask.shape:
                on_axis[-1].append(key)
            elif key != "labels":
                raise ValueError(f"calibration batch: {key!r} has shape {tuple(value.shape)}, {what} "
                                 f"{tuple(mask.shape)}")
            # (else labels of a row, a class or a vector: cut by row only)
        if what in ("attention_mask", "sequence_id"):
            text = any(item.get(k) is not None for k in ("input_ids", "inputs_embeds"))
            on_axis[-1] += [key for key, rank in _ENCODER_AXIS_OF_RANK.items()
                            if not (text and key in _AUDIO_INPUTS)
                            and isinstance(item.get(key), torch.Tensor) and item[key].dim() == rank
                            and item[key].shape[:2] == mask.shape]
            per_frame = [key for key in _FRAME_INPUTS if isinstance(item.get(key), torch.Tensor)
                         and item[key].dim() >= 2]
            on_axis[-1] += [key for key in per_frame if item[key].shape[:2] == mask.shape]
            if "input_values" in on_axis[-1]:
                frames_of += [key for key in per_frame if item[key].shape[:2] != mask.shape]
    for key in frames_of:
        samples = item["input_values"].shape[1]
        if _frames(model, samples) != item[key].shape[1]:
            whose = ("unknown: unpad(..., model=)" if model is None
                     else f"{_frames(model, samples)} by {type(model).__name__}")
            raise ValueError(f"calibration batch with padding: {key!r} {tuple(item[key].shape)} is not per frame "
                             f"of input_values {tuple(item['input_values'].shape)} (their frames {whose}), so it "
                             f"cannot be cut with the samples; give batches without padding")
    batches = {}  # real lengths -> rows, in the order met
    for b in range(B):
        spans = [_span(mask[b], what, b) for _, what, mask in sides]
        if None in spans:
            continue
        cut = {key: span for keys, span in zip(on_axis, spans) for key in keys}
        if "input_values" in cut and item["input_values"].dim() == 2:
            # a clip too short for a frame (a truncated file) has no token, as a row of padding:
            # alone, the model's convolutions cannot run it (the padded batch ran it)
            samples = cut["input_values"][1] - cut["input_values"][0]
            if (framer := _frameless(model, samples)) is not None:
                warnings.warn(f"calibration batch: row {b} of input_values: its {samples} samples make no frame of "
                              f"{type(framer).__name__}, which its convolutions cannot run alone; left out")
                continue
        for key in frames_of:
            start, stop = cut["input_values"]
            if start > 0:  # (the padded row's frames are not the real samples' shifted: unaligned)
                raise ValueError(f"calibration batch: input_values of row {b} padded at the start, beside "
                                 f"{key!r} of its frames, which do not line up with its real samples' frames; "
                                 f"pad at the end, as the model's feature extractor does")
            cut[key] = (0, _frames(model, stop - start))
        row = {}
        for key, value in item.items():
            if isinstance(value, torch.Tensor):
                value = value[b:b + 1]
                if key in cut:
                    value = value[:, cut[key][0]:cut[key][1]]
                    if key in _FLAT_FRAME_INDICES:
                        masked = cut.get("mask_time_indices")  # (the frames whose negatives the loss reads)
                        used = None if masked is None else item["mask_time_indices"][b:b + 1, masked[0]:masked[1]]
                        value = _own_frames(value, key, b, b * item[key].shape[1] + cut[key][0], used)
            row[key] = value
        batches.setdefault(tuple(stop - start for start, stop in spans), []).append(row)
    if not batches:
        raise ValueError("calibration batch: every row is padding")
    parts = [{key: torch.cat([r[key] + i * r[key].shape[1] if key in _FLAT_FRAME_INDICES and key in cut else r[key]
                              for i, r in enumerate(rows)]) if isinstance(rows[0][key], torch.Tensor) else rows[0][key]
              for key in rows[0]} for rows in batches.values()]
    if derive is not None:  # (given, not left to the forward: FSMT's shifts the encoder's ids)
        for part in parts:
            part["decoder_input_ids"] = derive(labels=part["labels"].clone())
    return parts


def _warn_of_unmasked_audio_padding(item: Mapping, model) -> None:
    """Warn where raw audio (``input_values [B, samples]``, no text) comes without a mask and its
    rows end (or begin) in runs of one value of different lengths, as a feature extractor that
    returns no mask pads a batch (wav2vec2-base's and its kind's, return_attention_mask=False:
    padding_value, or with do_normalize the constant the row's padding normalizes to). Their
    frames are counted in every statistic: the model's own forward attends them too, and no mask
    says for certain which samples are padding (a clip may end in silence), so they are not cut."""
    values = item.get("input_values")
    if (not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point()
            or values.shape[0] < 2 or values.shape[1] < 2
            or any(item.get(k) is not None for k in ("input_ids", "inputs_embeds"))):
        return
    # a row of one value throughout (a clip of digital silence) is its own run, whatever its
    # length: it says nothing of padding, and beside clips of one length it was warned of as padded
    values = values[(values != values[:, :1]).any(1)]
    if values.shape[0] < 2:
        return
    samples = values.shape[1]
    positions = torch.arange(samples, device=values.device)
    extra = 0
    for rows in (values, values.flip(1)):  # (padded at the end, or at the start)
        # each row's run of its last value: the samples after the last that differs from it
        differs = rows != rows[:, -1:]
        last = torch.where(differs, positions, -1).amax(1)
        runs = samples - 1 - last
        extra = max(extra, int(runs.max() - runs.min()))
    frames_of = _framer(model, samples)
    if frames_of is not None:
        # padding counted is a frame of its own: a few equal samples ending a 16-bit clip (a quiet
        # recording's noise floor) did not pad it, one sample past a frame's edge warned
        padded = extra > 0 and _frames(frames_of, extra) >= 1
    else:
        padded = extra > 1
    if padded:
        warnings.warn("calibration batch: input_values without attention_mask whose rows end in runs of one value "
                      "of different lengths, as a feature extractor pads a batch when it returns no mask: the "
                      "padded samples' frames are counted in every statistic (as the model attends them without "
                      "a mask), and the result depends on the batch; give the mask (feature_extractor(..., "
                      "return_attention_mask=True)), by which each row is cut to its own samples, or one clip a "
                      "batch")


def _own_frames(value: torch.Tensor, key: str, b: int, first: int, used: Optional[torch.Tensor]) -> torch.Tensor:
    """Row ``b``'s ``value`` of ``key`` (indices of the padded batch's frames flattened, its own
    from ``first``, cut to its real frames) as indices of its own frames; those the model's loss
    reads (at the frames ``used`` marks, mask_time_indices; all without it) must point into them."""
    value = value - first
    outside = (value < 0) | (value >= value.shape[1])
    read = outside if used is None else outside & used.to(torch.bool).reshape(*used.shape, *[1] * (value.dim() - 2))
    if bool(read.any()):
        raise ValueError(f"calibration batch with padding: {key!r} of row {b} points to padded frames (or "
                         f"another row's), which its real samples do not make; draw the negatives among each "
                         f"row's real frames (_sample_negative_indices(..., mask_time_indices=the frames' mask))")
    return value.masked_fill(outside, 0)  # (unused there: in range, as the row alone has them)


def _framer(model, samples: int):
    """The module whose frames ``_frames`` gives for ``samples`` samples: the model, or its audio
    encoder (a SpeechEncoderDecoderModel's are its Wav2Vec2's); None where none says."""
    return next((m for m in ([model] + list(model.modules()) if isinstance(model, torch.nn.Module) else [model])
                 if _frames(m, samples) is not None), None)


def _frameless(model, samples: int):
    """The module of ``model`` whose convolutions make no frame of ``samples`` samples (a clip too
    short for them, which they cannot run alone); None where it makes one, or none says."""
    framer = _framer(model, samples)
    return framer if framer is not None and _frames(framer, samples) < 1 else None


def _frames(model, samples: int) -> Optional[int]:
    """The frames an audio model's feature extractor makes of ``samples`` samples (its adapter's
    pooling aside: per-frame inputs are read before it); None where the model does not say."""
    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if not callable(lengths):
        return None
    try:
        options = {"add_adapter": False} if "add_adapter" in inspect.signature(lengths).parameters else {}
        return int(lengths(torch.tensor(samples), **options))
    except Exception:  # noqa: BLE001 (a model's own function that fails: it does not say)
        return None


def token_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` as rows (tokens x features), only the positions ``mask`` (bool ``[B, L]``, from
    ``Adapter.token_mask``) marks where it fits ``x``'s leading shape: all of them otherwise."""
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def keyed_seeds(keys: Iterable[str]) -> dict:
    """``{key: seed}``: each key's CRC-32 (the seed runs have drawn with), but for keys whose CRC-32
    another of ``keys`` shares: CRC-32 is linear, so two names of one length whose bits differ by a
    pattern it maps to zero (``"plumless"``, ``"buckeroo"``) collide after any common prefix and
    suffix, the run's seed included: at every seed their tasks drew one sample. Those take 64 bits
    of BLAKE2b of the key instead, the top one set: no such seed is any key's CRC-32 (below 2**32).
    A key's seed depends on the others only through that collision, not on their order."""
    crcs = {key: zlib.crc32(key.encode()) for key in dict.fromkeys(keys)}  # (a key given twice is one key)
    counts = collections.Counter(crcs.values())
    return {key: crc if counts[crc] == 1 else
            int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1 << 63
            for key, crc in crcs.items()}


def task_seeds(seed: int, tasks: Iterable[str]) -> dict:
    """``{task: seed of its draw}``: of one task, ``seed`` itself (a single-task run
    draws as it did); of several, each task's own, the ``keyed_seeds`` seed of ``"{seed}/{task}"``
    (as ``epmq run``'s benches derive theirs). With one seed for all, two tasks calibrated from
    the same files drew the same windows, images or pairs: their statistics were copies of one
    sample, not independent ones. A task's seed depends on its name, not on the order of the tasks."""
    tasks = list(tasks)
    if len(tasks) == 1:
        return {tasks[0]: seed}
    seeds = keyed_seeds(f"{seed}/{task}" for task in tasks)
    return {task: seeds[f"{seed}/{task}"] for task in tasks}


def _drawn(items, samples: int, batch_size: int, seed: int, what: str) -> List[list]:
    """``samples`` of ``items`` drawn at random without replacement (all of them, with a
    warning, if fewer), in batches of ``batch_size``."""
    items = list(items)
    if not items:
        raise ValueError(f"{what}: none given")
    if len(items) < samples:
        warnings.warn(f"{what}: {len(items)}, fewer than samples={samples}: using all of them")
    g = torch.Generator().manual_seed(check_seed(seed))  # (numpy's integers as ints; past 64 bits named)
    chosen = [items[i] for i in torch.randperm(len(items), generator=g)[:samples].tolist()]
    return [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]


# (Pillow's formats image datasets come in: torchvision's ImageFolder reads .ppm and .pgm, a browser saves
# JPEGs as .jfif; left out, a folder of them was refused as holding no images)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm")


# photo formats Pillow reads only with a plugin (pillow-heif) or a build with their library (AVIF's): read where
# it does, else named, not left out in silence (a phone's .heic photos beside its .jpg ones)
_PLUGIN_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl")


def _readable_image_suffixes() -> tuple:
    from PIL import Image

    opened = Image.registered_extensions()  # (the plugins registered: pillow-heif's register_heif_opener too)
    return IMAGE_SUFFIXES + tuple(s for s in _PLUGIN_IMAGE_SUFFIXES if Image.OPEN.get(opened.get(s)))


def image_tree(directory: Path, split: bool = True) -> List[Path]:
    """The image files under ``directory`` that Pillow reads here (sorted; where ``split``, of a tree
    of splits the train split's, as ``_tree`` takes it); one of a format it reads only with a plugin
    it lacks (HEIC without pillow-heif) is refused by name."""
    files, others = _read_and_not(directory, _readable_image_suffixes(), _PLUGIN_IMAGE_SUFFIXES, split)
    if others:
        raise ValueError(f"{directory}: {len(others)} image file(s) under the directory ({others[0]}, ...) are of a "
                         f"format epmq does not read" + (f" beside its {len(files)} it reads" if files else "")
                         + f": Pillow reads {others[0].suffix.lower()} only with a plugin (pillow-heif: HEIC, "
                         f"HEIF) or a build with its library (AVIF, JPEG XL); install it, or convert them to .png "
                         f"or .jpg")
    return files


def image_files(source: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """The image files of a directory tree (sorted), a file, or a list of either; one of a format
    Pillow does not read here (HEIC without pillow-heif) is refused by name."""
    if isinstance(source, (list, tuple)):
        return [f for s in source for f in image_files(s)]
    path = _path(source, "images")
    readable = _readable_image_suffixes()
    if path.is_dir():
        files = image_tree(path)
        if not files:
            # (an HF hub image dataset's snapshot: its images are encoded bytes in a column of its parquet files)
            tables = _tree(path, (".parquet", ".arrow"))
            raise ValueError(f"{path}: no image files ({', '.join(readable)}) under the directory"
                             + (f"; it holds {len(tables)} {tables[0].suffix} file(s) ({tables[0]}, ...), an HF hub "
                                f"dataset's, whose image column epmq does not decode: write its images out as .png "
                                f"(datasets' Image feature gives PIL images: image.save) and give their folder"
                                if tables else ""))
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no calibration images at {path}")
    if path.suffix.lower() not in readable:
        raise ValueError(f"{path}: not an image file epmq reads ({', '.join(readable)})")
    return [path]


def image_batches(files: Sequence[Path], processor, *, samples: int = 128, batch_size: int = 8,
                  seed: int = 0, what: str = "calibration") -> List[dict]:
    """``samples`` of ``files`` drawn at random (all of them, with a warning, if fewer),
    preprocessed by ``processor`` (e.g. ``AutoImageProcessor``) into batches of what it returns:
    ``pixel_values``, and the inputs that go with them (SigLIP 2's ``pixel_attention_mask`` and
    ``spatial_shapes``, Pixtral's ``image_sizes``)."""
    from PIL import Image

    samples, batch_size, _ = _check_sizes(samples, batch_size)
    if isinstance(files, (str, Path)):  # (a str's characters were drawn as files: "cannot read image /")
        raise TypeError(f"files must be a list of image files, got one {type(files).__name__} {str(files)!r}: "
                        f"give epmq.calibration.image_files({str(files)!r})")
    batches = []
    for chunk in _drawn(files, samples, batch_size, seed, f"{what}: images"):
        images = []
        for f in chunk:
            try:
                with Image.open(f) as image:
                    images.append(rgb_image(upright(image)))
            except (OSError, Image.DecompressionBombError) as e:
                raise (_lfs_pointer(f, what) or ValueError(f"{what}: cannot read image {f}: {e}")) from e
            except ValueError as e:  # (rgb_image's: values off a float image's scale)
                raise ValueError(f"{what}: image {f}: {e}") from e
        # (every tensor the processor returns, as a pipeline passes them: pixel_values alone left
        # SigLIP 2's vision tower, whose forward requires its patches' mask and grid, unable to run)
        try:
            out = processor(images=images, return_tensors="pt")
        except (ValueError, RuntimeError, IndexError) as e:
            # (its words name no image: Qwen2-VL's 'absolute aspect ratio must be smaller than 200' of one
            # strip among a task's files; each is tried alone to name the one it cannot take)
            for f, image in zip(chunk, images):
                try:
                    processor(images=[image], return_tensors="pt")
                except (ValueError, RuntimeError, IndexError) as alone:
                    raise ValueError(f"{what}: the image processor {type(processor).__name__} cannot take image "
                                     f"{f}: {alone}") from alone
            raise ValueError(f"{what}: the image processor {type(processor).__name__} cannot take the images "
                             f"{', '.join(map(str, chunk[:3]))}{', ...' if len(chunk) > 3 else ''} together: "
                             f"{e}") from e
        batches.append(_tensors_of(out, processor, "image processor", what))
    return batches


def _tensors_of(out: Mapping, preprocessor, kind: str, what: str) -> dict:
    """The tensors of a preprocessor's output ``out``: a batch's inputs; refused where there are none
    (a list of arrays, given back by one that does not stack its images or clips, was dropped: every
    batch {}, the model run on no input)."""
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        given = ", ".join(f"{k}: {type(v).__name__}" for k, v in out.items()) or "nothing"
        raise ValueError(f"{what}: the {kind} {type(preprocessor).__name__} gave no tensors ({given}) for "
                         f"return_tensors='pt': give one that returns the model's inputs as torch tensors")
    return tensors


AUDIO_SUFFIXES = (".wav",)
# the longest calibration clip, in seconds (Whisper's window): a longer one is cut to a window of it
MAX_CLIP_SECONDS = 30.0
# the step of Kaldi's filter bank (torchaudio's fbank default), at which an extractor that names no
# hop_length frames its clips: AST's, whose max_length counts these frames
KALDI_FRAME_SHIFT_MS = 10
# a float clip's largest |sample| past which it is warned of: full scale is 1, a resampler's overshoot
# passes it a little, integer samples written as floats (int16's up to 32767) by far
FLOAT_AUDIO_PEAK = 2.0
# audio read with soundfile (libsndfile) where it is installed (the extra "epmq[audio]"); WAV is read with scipy
SOUNDFILE_SUFFIXES = (".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc")
# audio files neither reads: named, not skipped in silence
_OTHER_AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES + (".m4a", ".aac", ".wma")


def _soundfile():
    """The soundfile module, or None where it is not installed (or its libsndfile is missing)."""
    try:
        import soundfile
    except (ImportError, OSError):
        return None
    return soundfile


def _unreadable_audio(files: List[Path]) -> str:
    """What to do of audio ``files`` that neither scipy nor an installed soundfile reads."""
    if any(f.suffix.lower() in SOUNDFILE_SUFFIXES for f in files):
        return (f"epmq reads {', '.join(SOUNDFILE_SUFFIXES)} with soundfile, which is not installed: "
                f"pip install soundfile, or convert them to .wav (ffmpeg -i clip.flac clip.wav)")
    return (f"convert them to .wav (ffmpeg -i clip{files[0].suffix} clip.wav): epmq reads WAV with scipy, "
            f"{', '.join(SOUNDFILE_SUFFIXES)} with soundfile")


def audio_files(source: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """The audio files of a directory tree (sorted; an HF hub dataset snapshot's train split, as
    ``_tree`` takes it), a file, or a list of either: WAV, and soundfile's formats (FLAC, OGG,
    MP3, AIFF) where it is installed; a file of another audio format is refused by name."""
    if isinstance(source, (list, tuple)):
        return [f for s in source for f in audio_files(s)]
    path = _path(source, "audio")
    readable = AUDIO_SUFFIXES + (SOUNDFILE_SUFFIXES if _soundfile() is not None else ())
    if path.is_dir():
        # (beside WAV files they were left out in silence, the calibration the WAV files' alone)
        files, others = _read_and_not(path, readable, _OTHER_AUDIO_SUFFIXES)
        if others:
            raise ValueError(f"{path}: {len(others)} audio file(s) under the directory ({others[0]}, ...) are of a "
                             f"format epmq does not read"
                             + (f" beside its {len(files)} it reads" if files else "")
                             + f": {_unreadable_audio(others)}")
        if not files:
            # (an HF hub audio dataset's snapshot: its clips are encoded bytes in a column of its parquet files)
            tables = _tree(path, (".parquet", ".arrow"))
            raise ValueError(f"{path}: no audio files ({', '.join(readable)}) under the directory"
                             + (f"; it holds {len(tables)} {tables[0].suffix} file(s) ({tables[0]}, ...), an HF hub "
                                f"dataset's, whose audio column epmq does not decode: write its clips out as .wav "
                                f"(datasets' Audio feature, soundfile) and give their folder" if tables else ""))
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no calibration audio at {path}")
    if path.suffix.lower() not in readable:
        raise ValueError(f"{path}: not an audio file epmq reads ({', '.join(readable)})"
                         + (f": {_unreadable_audio([path])}" if path.suffix.lower() in _OTHER_AUDIO_SUFFIXES else ""))
    return [path]


def read_audio(path: Union[str, Path], sampling_rate: int, what: str = "calibration",
               longest: Optional[int] = None, generator: Optional[torch.Generator] = None, empty: bool = False):
    """The samples of the audio file ``path`` (WAV, read with scipy; FLAC, OGG, MP3, AIFF with
    soundfile) as a float32 numpy array at ``sampling_rate``: PCM integers scaled to [-1, 1),
    channels averaged to mono (as librosa and transformers' pipelines load audio), resampled
    (polyphase, scipy) where the file's rate is another. ``longest``: a recording past that many
    samples gives a window of them, at a place ``generator`` draws. A file of no samples is
    refused, or, with ``empty``, gives none (a draw leaves it out, as a clip too short for a frame)."""
    import numpy as np
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    # (0 ended in scipy's bare 'up and down must be >= 1', 22050.5 was read at a rate of its own making)
    if isinstance(sampling_rate, float) and math.isfinite(sampling_rate) and sampling_rate.is_integer():
        sampling_rate = int(sampling_rate)
    if not is_integer(sampling_rate) or sampling_rate < 1:
        raise ValueError(f"{what}: sampling_rate must be a positive whole number of samples a second, got "
                         f"{sampling_rate!r}")
    soundfile = None
    if Path(path).suffix.lower() in SOUNDFILE_SUFFIXES:
        soundfile = _soundfile()
        if soundfile is None:
            raise ValueError(f"{what}: cannot read audio {path}: {_unreadable_audio([Path(path)])}")
    # (soundfile's LibsndfileError is a RuntimeError)
    errors = (OSError, ValueError, EOFError, struct.error, RuntimeError)
    try:
        if soundfile is None:
            try:
                try:  # (mapped: read whole, an hour at 44.1 kHz stereo took 635 MB for a 30 s window)
                    rate, samples = wavfile.read(path, mmap=True)
                except (ValueError, OSError):  # (24-bit samples, which scipy cannot map, a filesystem that maps
                    # none, or a damaged file: its own error)
                    # (scipy warns of a file cut short, 'Reached EOF prematurely ...', naming none of a draw's files)
                    with warnings.catch_warnings(record=True) as said:
                        warnings.simplefilter("always", wavfile.WavFileWarning)
                        rate, samples = wavfile.read(path)
                    for w in said:
                        if not issubclass(w.category, wavfile.WavFileWarning):
                            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                        elif "EOF" in str(w.message):
                            warnings.warn(f"{what}: audio {path} is cut short ({w.message}): read as the "
                                          f"{len(samples)} samples it holds")
                        else:
                            warnings.warn(f"{what}: audio {path}: {w.message}")
            except ValueError as e:
                # (a WAV of an encoding scipy does not decode, telephone speech's mu-law or A-law, ADPCM, was
                # refused as scipy's 'Unknown wave file format': soundfile reads it where installed)
                if not str(e).startswith("Unknown wave file format"):
                    raise
                soundfile = _soundfile()
                if soundfile is None:
                    raise ValueError(f"{e}: pip install soundfile, which reads it, or convert it to PCM (ffmpeg -i "
                                     f"{Path(path).name} -c:a pcm_s16le pcm.wav)") from e
        if soundfile is None:
            length = len(samples)
        else:  # (its frames, read where the window is)
            info = soundfile.info(str(path))
            rate, length = info.samplerate, info.frames
    except errors as e:  # (a cut header: struct.error)
        raise (_lfs_pointer(path, what) or ValueError(f"{what}: cannot read audio {path}: {e}")) from e
    if rate < 1:  # (a damaged header: resampling it ended in scipy's bare 'up and down must be >= 1')
        raise ValueError(f"{what}: cannot read audio {path}: its header says {rate} samples a second")
    own = None if longest is None else -(-longest * int(rate) // int(sampling_rate))  # (in the file's samples)
    start, stop = 0, length
    if own is not None and length > own:
        # cut from the file's own samples: converted, mixed and resampled whole, 10 minutes at 44.1 kHz
        # stereo (106 MB) took 583 MB at the peak for its 30 s (3.5 GB an hour's), cut first 192 MB
        start = int(torch.randint(length - own + 1, (1,), generator=generator))
        stop = start + own
    if soundfile is None:
        samples = samples[start:stop]
    else:
        try:  # (float32 scaled to [-1, 1) by soundfile, as the WAV integers below)
            samples, _ = soundfile.read(str(path), start=start, stop=stop, dtype="float32", always_2d=False)
        except errors as e:
            raise ValueError(f"{what}: cannot read audio {path}: {e}") from e
    if samples.dtype == np.uint8:  # (8-bit WAV is unsigned, centred on 128)
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):  # (24-bit is read as int32, left-justified)
        samples = samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
    else:  # (a float WAV's NaN or inf made every Hessian of its batch NaN, silently)
        samples = np.array(samples, dtype=np.float32)  # (a copy of the window, not of the mapped file's class)
        bad = samples.size - int(np.count_nonzero(np.isfinite(samples)))
        if bad:
            raise ValueError(f"{what}: audio {path} holds {bad} sample{'s' * (bad > 1)} that "
                             f"{'are' if bad > 1 else 'is'} not a finite number (NaN or inf)")
        peak = float(np.abs(samples).max()) if samples.size else 0.0
        if peak > FLOAT_AUDIO_PEAK:  # (PCM integers written as floats: read so, Whisper's log-mel ~90 dB too loud)
            warnings.warn(f"{what}: audio {path}: its float samples reach {peak:g}, where full scale is 1 (float "
                          f"audio is read as it is, expected in [-1, 1]): integer samples written as floats? "
                          f"divide them by 32768 (16-bit) or write them as integers")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        if empty:
            return samples.astype(np.float32)
        raise ValueError(f"{what}: audio {path} holds no samples")
    if rate != sampling_rate:
        step = np.gcd(int(rate), int(sampling_rate))
        samples = resample_poly(samples, sampling_rate // step, rate // step).astype(np.float32)
    return samples if own is None else samples[:longest]


def audio_batches(files: Sequence[Path], extractor, *, samples: int = 128, batch_size: int = 8,
                  seed: int = 0, what: str = "calibration", max_seconds: float = MAX_CLIP_SECONDS,
                  model=None) -> List[dict]:
    """``samples`` of ``files`` drawn at random (all of them, with a warning, if fewer), read at
    the rate of ``extractor`` (e.g. ``AutoFeatureExtractor``'s, or a processor's) and turned by it
    into batches of what it returns: ``input_values`` (Wav2Vec2, HuBERT, WavLM) or ``input_features``
    (Whisper, Wav2Vec2-BERT), with the mask of the clips' samples or frames where it gives one, by
    which ``unpad`` cuts each clip to its own (a batch of clips of other lengths is padded). A clip
    longer than ``max_seconds`` is cut to a window of that length at a seeded place in it.
    ``model`` (or what says its frames: ``_get_feat_extract_output_lengths``): a clip too short
    for one frame of it, which its convolutions cannot run alone, is left out with a warning."""
    samples, batch_size, _ = _check_sizes(samples, batch_size)
    if isinstance(files, (str, Path)):
        raise TypeError(f"files must be a list of audio files, got one {type(files).__name__} {str(files)!r}: "
                        f"give epmq.calibration.audio_files({str(files)!r})")
    extractor = getattr(extractor, "feature_extractor", extractor)  # (a processor's: Wav2Vec2Processor)
    rate = getattr(extractor, "sampling_rate", None)
    if isinstance(rate, float) and math.isfinite(rate):  # (16000.0 was refused as naming no rate)
        if not rate.is_integer():
            raise ValueError(f"{what}: the feature extractor {type(extractor).__name__}'s sampling_rate must be a "
                             f"whole number of samples a second, got {rate!r}")
        rate = int(rate)
    if not is_integer(rate):
        raise ValueError(f"{what}: the feature extractor {type(extractor).__name__} names no sampling_rate to read "
                         f"the audio at")
    if rate < 1:  # (0 ended in a bare ZeroDivisionError, a negative one was blamed on max_seconds)
        raise ValueError(f"{what}: the feature extractor {type(extractor).__name__}'s sampling_rate must be a "
                         f"positive number of samples a second, got {rate}")
    options, window = {}, None
    if "attention_mask" in getattr(extractor, "model_input_names", ()):
        # (wav2vec2-base's extractor returns none by default: its padding would be counted, see unpad)
        options["return_attention_mask"] = True
    call = inspect.signature(extractor.__call__).parameters
    if "padding" in call and call["padding"].default is False:
        # (clips of other lengths in one batch: padded to the longest, the mask marks it; Whisper's
        # pads to its 30 s by default, which its encoder requires)
        options["padding"] = True
    elif "padding" in call and call["padding"].default == "max_length" and not options:
        # (Whisper's: every clip padded to its 30 s, which its encoder requires, with no mask to cut them by)
        window = getattr(extractor, "n_samples", None)
        window = window if is_integer(window) and window > 0 else None
    elif "padding" not in call and is_integer(getattr(extractor, "max_length", None)) and extractor.max_length > 0:
        # (AST's: every clip's filter bank padded or cut to its max_length frames, 10.24 s, by itself)
        hop = getattr(extractor, "hop_length", None)
        hop = hop if is_integer(hop) and hop > 0 else max(1, rate * KALDI_FRAME_SHIFT_MS // 1000)
        window = extractor.max_length * hop
    # (a long recording run whole, an hour of it, made wav2vec2 180,000 frames: its attention's
    # memory is their square; images are resized, texts cut to seq_len)
    # (NaN ended in int()'s bare error, '30' was repeated by the rate, and 0 or a negative cut every
    # clip to one sample, silently)
    longest = check_number(max_seconds, f"{what}: max_seconds", 0) * rate
    if longest < 1:
        raise ValueError(f"{what}: max_seconds must be at least one sample at {rate} Hz "
                         f"({1 / rate:g} s), got {max_seconds!r}")
    # (1.7e308 s made int() an infinity, and past int64's samples the model's frames overflowed
    # torch, so a clip too short for one frame was no longer left out)
    if longest >= 2 ** 63:
        raise ValueError(f"{what}: max_seconds must be at most {(2 ** 63 - 1) / rate:g} s (int64's samples at "
                         f"{rate} Hz), got {max_seconds!r}")
    longest = int(longest)
    g = torch.Generator().manual_seed(check_seed(seed))
    framer = None if model is None else _framer(model, longest)
    batches, frameless, held = [], [], []
    for chunk in _drawn(files, samples, batch_size, seed, f"{what}: audio files"):
        # (an empty file, a recording that failed, stopped the whole calibration where one of a sample,
        # as unusable, was left out: both are, by their file)
        clips = [read_audio(f, rate, what, longest, g, empty=True) for f in chunk]
        short = {i for i, c in enumerate(clips) if not len(c)}
        for i in sorted(short):
            warnings.warn(f"{what}: audio {chunk[i]}: it holds no samples; left out")
        if framer is not None:
            # (a truncated file alone, or beside clips of its length: a batch without padding, which
            # unpad cannot cut, and the walk refused it as an item the model cannot run, naming no file)
            for i, c in enumerate(clips):
                if i not in short and (n := _frames(framer, len(c))) is not None and n < 1:
                    short.add(i)
                    warnings.warn(f"{what}: audio {chunk[i]}: its {len(c)} samples make no frame of "
                                  f"{type(framer).__name__}, which its convolutions cannot run alone; left out")
        frameless += [chunk[i] for i in sorted(short)]
        clips = [c for i, c in enumerate(clips) if i not in short]
        if not clips:
            continue
        out = extractor(clips, sampling_rate=rate, return_tensors="pt", **options)
        batches.append(_tensors_of(out, extractor, "feature extractor", what))
        if "attention_mask" in out:  # (then unpad cuts each clip to its own frames: no padding counts)
            window = None
        held += [min(len(c), window or 0) for c in clips]
    if window and sum(held) < len(held) * window / 2:
        # (a draw of 1 s clips was calibrated on 97% padding, in silence: no mask cuts it)
        n, share = len(held), 1 - sum(held) / (len(held) * window)
        warnings.warn(f"{what}: the {n} clip{'s' * (n > 1)} drawn hold{'s' * (n == 1)} {sum(held) / rate:g} s of "
                      f"audio, which {type(extractor).__name__} pads each to its {window / rate:g} s: {share:.0%} of "
                      f"the frames calibrated on are padding; give clips near {window / rate:g} s (short ones joined)")
    if not batches and frameless:
        raise ValueError(f"{what}: every audio file drawn "
                         + ("holds no samples" if framer is None else f"is too short for one frame of "
                                                                      f"{type(framer).__name__}")
                         + f": {', '.join(map(str, frameless))}")
    return batches


def upright(image):
    """A file's ``image`` turned upright, as the camera's EXIF orientation says (a phone's photos
    are stored sideways): transformers' ``load_image``, which pipelines read files with, turns
    them so. For every image read from a file, the benches' as calibration's. An image whose
    EXIF cannot be read (a PNG's damaged eXIf chunk: Pillow raises SyntaxError or struct.error,
    which stopped a whole bench or calibration) is taken as stored, with a warning, as Pillow
    itself reads a JPEG's. Always a new image, read in full: the file can be closed. A TIFF of
    signed 8- or 16-bit samples comes back as unsigned ones, offset by 128 or 32768 (as ImageJ
    reads one): the most negative black, the most positive white."""
    import struct

    from PIL import Image, ImageOps

    image.load()  # (a damaged image is an error of its own: OSError, as before)
    # (Pillow opens a signed 16-bit one as 32-bit 'I' holding the negatives, which rgb_image's 16-bit scale
    # cut to black, and a signed 8-bit one as 'L' of its bytes, -1 as 255: white; what says it is signed, the
    # TIFF's tags, the turned copy does not keep)
    signed = image.mode in ("L", "I") and _tiff_format(image) == {"L": (2, 8), "I": (2, 16)}[image.mode]
    try:
        turned = ImageOps.exif_transpose(image)
    except (SyntaxError, struct.error) as e:
        # (its file named, as Pillow keeps it: of a folder's thousands, the warning named none)
        name = getattr(image, "filename", None)
        whose = f"{name}'s" if isinstance(name, (str, os.PathLike)) and str(name) else "an image's"
        warnings.warn(f"{whose} EXIF cannot be read ({e}): taken as stored, not turned by its orientation")
        turned = image.copy()
    if signed:
        import numpy as np

        if turned.mode == "L":
            return Image.fromarray((np.asarray(turned).view(np.int8).astype(np.int16) + 128).astype(np.uint8))
        return Image.fromarray((np.asarray(turned, dtype=np.int32) + 32768).astype(np.uint16))
    return turned


def _tiff_format(image) -> Optional[tuple]:
    """``(SampleFormat, BitsPerSample)`` of a TIFF's first sample (1: unsigned, 2: signed, 3:
    float), None for an image of another format."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    return tuple(v[0] if isinstance(v, tuple) else v for v in (tags.get(339, 1), tags.get(258, 1)))


def rgb_image(image):
    """``image`` in RGB: transparency composited onto white, not dropped (as transformers'
    ``convert_rgb``); 16- and 32-bit greyscale scaled to 8 bits by their format's range (PIL's
    ``convert``, which transformers' processors use, clips it at 255: a 16-bit image all but
    white): 16-bit data by 65535, whether it opens as ``I;16`` (a 16-bit PNG) or as 32-bit ``I``
    (converted, as loaders do, or a TIFF of 32-bit integers holding 16-bit data), ``I`` data past
    16 bits by int32's largest, negative ``I`` data refused (a signed 16-bit TIFF is offset to
    unsigned by ``upright``); float (``F``) images on [0, 1] (0 black, 1 white), the
    scale of float image data, one with values off it (past half an 8-bit step) or not finite refused.
    ``La`` (premultiplied alpha) as its ``LA``."""
    from PIL import Image
    import numpy as np

    if image.mode == "La":  # (premultiplied alpha, which Pillow converts to nothing but LA)
        image = image.convert("LA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            # (scaled by its own maximum past 1, two images of one dataset were read on two scales: 0.5 as
            # 128 in one, 85 in another whose brightest value was 1.5; a 0..255 one came out white)
            top = 1.0
            if not np.isfinite(values).all():
                raise ValueError("a float (F) image holds values that are not a finite number (NaN or inf)")
            low, high = float(values.min()), float(values.max())
            if low < -0.5 / 255 or high > 1 + 0.5 / 255:
                raise ValueError(f"a float (F) image holds values in [{low:g}, {high:g}], where float images are "
                                 f"read on [0, 1] (0 black, 1 white): scale it to [0, 1], or write it as 8- or "
                                 f"16-bit integers")
        else:  # (a dark image stays dark: scaled by its own maximum, it came out bright)
            if float(values.min(initial=0)) < 0:  # (cut to black, its negatives were lost in silence)
                raise ValueError(f"an integer (I) image holds negative values (down to {values.min():g}), where "
                                 f"integer images are read as unsigned (0 black): write it as unsigned 8- or "
                                 f"16-bit integers, or as a TIFF of signed 8- or 16-bit ones")
            top = 65535.0 if image.mode.startswith("I;16") or float(values.max()) <= 65535 else 2.0**31 - 1
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    # (transformers' rule: an alpha band, or a transparent colour or palette index of any mode, a
    # greyscale or RGB PNG's tRNS chunk included; the benches' ImagePrep does not look at info)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


PAIR_KEYS = (("input", "target"), ("prompt", "completion"))


def read_pairs(source: Union[str, Path, Sequence[Union[str, Path]]], *,
               stream: bool = False) -> List[Union[tuple, "PairRecord"]]:
    """``(input, target)`` texts of ``.jsonl`` / ``.json`` files (objects with both fields, or
    ``prompt`` and ``completion``) or ``.parquet`` rows, a directory of them, or a list of either.
    ``stream``: each JSON Lines record or .parquet row as a ``PairRecord``, checked, then read again
    where ``pair_batches`` draws it, not held (``epmq quantize`` reads them so)."""
    pairs = [v if isinstance(v, PairRecord) else _pair_of(v, where) for where, v in
             _records(source, PAIR_SUFFIXES, "input/target pairs", "an encoder-decoder calibrates on input/target "
                      "pairs: a file of objects with 'input' and 'target' texts", stream, pairs=True)]
    # (said by pair_batches as the task's 'input/target pairs: none given', the files unnamed)
    return _some_of(pairs, source, "input/target pairs")


def _some_of(records: list, source, what: str) -> list:
    """``records`` read from ``source``, or a ValueError naming its files where there are none."""
    if not records:
        sources = source if isinstance(source, (list, tuple)) else [source]
        shown = ", ".join(map(str, sources[:3])) + (", ..." if len(sources) > 3 else "")
        raise ValueError(f"no {what} in {shown}: its files hold none" if sources else f"no {what}: no files given")
    return records


def _pair_of(v, where: str) -> tuple:
    """The ``(input, target)`` texts of the record ``v``."""
    pair = next(((v[a], v[b]) for a, b in PAIR_KEYS if isinstance(v, dict)
                 and isinstance(v.get(a), str) and isinstance(v.get(b), str)), None)
    if pair is None:
        raise ValueError(f"{where}: expected an object with 'input' and 'target' strings (or 'prompt' "
                         f"and 'completion'), got {str(v)[:80]!r}")
    return pair


class PairLines(JsonLines):
    """The input/target pairs of a file of JSON Lines, read as ``JsonLines`` reads texts:
    ``documents``, one ``PairRecord`` a pair. Held, every pair was in memory while
    ``pair_batches`` drew ``samples`` of them (1.3 times the file, 2.2 at the peak). Opening it
    reads it once, each record checked to be a pair, then let go; the drawn pairs are read again
    in one pass through the file (``read``)."""

    def _document(self, position: int, value) -> "PairRecord":
        _pair_of(value, self._where(position))
        return PairRecord(self, position)

    def _changed(self) -> ValueError:
        return ValueError(f"{self.path}: changed since it was opened ({len(self.documents)} pairs then): its pairs "
                          f"would be drawn from places of the pairs it held then in the pairs it holds now")

    def read(self, positions: Iterable[int]) -> dict:
        """``{position: (input, target)}`` of the records at ``positions``, in one pass through the
        file (up to the last of them), which is closed after it."""
        wanted, found = set(positions), {}
        if self._version() != self._stat:
            raise self._changed()
        records = self._records()
        try:
            for position, value in records:
                if position in wanted:
                    found[position] = _pair_of(value, self._where(position))
                    if len(found) == len(wanted):
                        return found
        finally:
            records.close()
        raise self._changed()  # (a record counted is no longer there)


class ParquetPairs(PairLines, ParquetRows):
    """The input/target pairs of a ``.parquet`` file's rows, read as ``PairLines`` reads JSON Lines'."""


class PairRecord:
    """One input/target pair of a ``PairLines`` (or ``ParquetPairs``) file, read where it is used:
    ``[0]`` its input, ``[1]`` its target, each a pass through the file up to it (``pair_batches``
    reads those it draws together: ``_read_drawn``)."""

    __slots__ = ("file", "position")

    def __init__(self, file: PairLines, position: int):
        self.file, self.position = file, position

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"PairRecord({self.file._where(self.position)!r})"

    def __getitem__(self, item) -> str:
        return self.file.read([self.position])[self.position][item]


def _read_drawn(chosen: list) -> list:
    """``chosen`` with its streamed pairs (``PairRecord``) read, each file's in one pass through it
    (read one by one, each pair was a pass through its file up to it)."""
    positions = {}
    for p in chosen:
        if isinstance(p, PairRecord):
            positions.setdefault(p.file, []).append(p.position)
    read = {file: file.read(at) for file, at in positions.items()}
    return [read[p.file][p.position] if isinstance(p, PairRecord) else p for p in chosen]


def _is_pair(p) -> bool:
    """Whether ``p`` is an (input, target) pair of texts: a tuple, a list (as JSON reads one), or a
    row of a numpy array (``df[["input", "target"]].values``); not a text, which also has a length."""
    try:
        return not isinstance(p, (str, bytes, Mapping)) and len(p) == 2 and all(isinstance(p[i], str) for i in (0, 1))
    except (TypeError, KeyError, IndexError):
        return False


def pair_batches(pairs: Sequence[tuple], tokenizer, *, samples: int = 128, seq_len: int = 512,
                 batch_size: int = 8, seed: int = 0, what: str = "calibration") -> List[dict]:
    """``samples`` of ``pairs`` drawn at random (all of them, with a warning, if fewer) as
    ``{"input_ids", "attention_mask", "labels"}`` batches of at most ``batch_size`` pairs of the
    same token lengths (nothing padded: see the module docstring)."""
    samples, batch_size, seq_len = _check_sizes(samples, batch_size, seq_len)
    if isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        # (its two texts, drawn as pairs, ended in "too many values to unpack"; a list, as JSON reads a pair)
        raise TypeError(f"pairs must be a sequence of (input, target) pairs, got one pair "
                        f"({pairs[0][:40]!r}, {pairs[1][:40]!r}): give [pair]")
    (chosen,) = _drawn(pairs, samples, samples, seed, f"{what}: input/target pairs")
    names = [p.file._where(p.position) if isinstance(p, PairRecord) else None for p in chosen]
    chosen = _read_drawn(chosen)
    for p in chosen:
        # (a text of two characters ran as the pair of its letters, silently; others as a bare unpacking error)
        if not _is_pair(p):
            raise TypeError(f"pairs must hold (input, target) pairs of texts, got the item {type(p).__name__} "
                            f"{str(p)[:80]!r}")
    inputs = tokenizer([p[0] for p in chosen])["input_ids"]
    targets = tokenizer(text_target=[p[1] for p in chosen])["input_ids"]
    cut = sum(len(x) > seq_len or len(y) > seq_len for x, y in zip(inputs, targets))
    if cut:  # (a pair is the model's whole input, unlike a window of a stream: what is cut is not calibrated on)
        warnings.warn(f"{what}: {cut} of the {len(chosen)} pairs drawn have an input or target longer than "
                      f"seq_len={seq_len} tokens, cut to it (the longest: {max(map(len, inputs + targets))}); "
                      f"raise seq_len to calibrate on them whole")
        inputs = tokenizer([p[0] for p in chosen], max_length=seq_len, truncation=True)["input_ids"]
        targets = tokenizer(text_target=[p[1] for p in chosen], max_length=seq_len, truncation=True)["input_ids"]
    by_lengths = {}  # (input length, target length) -> pairs, in the order drawn
    for (source, target), x, y in zip(chosen, inputs, targets):
        if not (x and y):  # (a tokenizer that adds no end-of-sequence token: an empty text is none)
            side = "input" if not x else "target"
            raise ValueError(f"{what}: the pair {source[:40]!r} -> {target[:40]!r}: its {side} is no tokens (the "
                             f"tokenizer adds no end-of-sequence token), nothing for the model to read; drop the pair")
        by_lengths.setdefault((len(x), len(y)), []).append((x, y))
    eos = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
    _warn_of_unknown_tokens([x + y for x, y in zip(inputs, targets)],
                            [n or f"the pair {p[0][:40]!r} -> {p[1][:40]!r}" for n, p in zip(names, chosen)],
                            tokenizer, eos, what, "pairs")
    batches = []
    for group in by_lengths.values():
        for i in range(0, len(group), batch_size):
            x = torch.tensor([p[0] for p in group[i:i + batch_size]], dtype=torch.long)
            y = torch.tensor([p[1] for p in group[i:i + batch_size]], dtype=torch.long)
            batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    return batches
