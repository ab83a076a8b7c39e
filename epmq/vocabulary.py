"""Merging models whose vocabularies differ: experts fine-tuned with added tokens (ChatML's
``<|im_start|>``, a tool-call token) have more embedding rows than their base, or the same
token at another row. Every model's vocabulary-indexed tensors (the input embeddings, an untied
output head) are first laid out by one output tokenizer, row ``i`` for its token ``i``; then
any merge applies unchanged.

``tokenizer_source`` (mergekit's convention, so that its configs give the same tensors):

- ``"base"``: the base's tokenizer (without a base, the first model's);
- ``"union"``: the base's, plus every token of the other models it lacks (their own vocabulary
  first, then their added tokens, each model in order).

A model's row of a token it has is its own. A token a model lacks takes one row for every model
that lacks it: the only model's that has it; else the base's, where the base has it; else the
mean of the models that have it (zeros where none does). Rows past the vocabulary
(``pad_to_multiple_of``) are each model's mean row.

``tokens`` (mergekit's ``tokenizer: {tokens: ...}``) names a token's row where the rules would
not do: ``{"<|im_start|>": {"source": MODEL}}`` takes MODEL's row of it; ``{"source": {"kind":
"model_token", "model": MODEL, "token": "<s>"}}`` (or ``"token_id": 1``) another token's row of
MODEL, in MODEL's own numbering; ``{"source": {"kind": "zero"}}`` zeros. That row stands in for
every model that lacks the token, and with ``"force": true`` for every model. A token listed
that the output tokenizer lacks is added to it. MODEL is one of the sources as given.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch

from epmq_kernels.grid import is_integer

from ._util import check_json_file, read_json_file

SOURCES = ("base", "union")


def check_tokenizer_source(source, pad_to_multiple_of=None) -> Optional[int]:
    """ValueError unless ``source`` is one of ``SOURCES`` (or None, with no padding); the padding
    multiple as a Python int (numpy's would reach config.json and the recipe)."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"tokenizer_source must be one of {', '.join(SOURCES)}, got {source!r} (another "
                         f"model's tokenizer: give that model as the base)")
    if pad_to_multiple_of is not None:
        if source is None:
            raise ValueError("pad_to_multiple_of pads the vocabulary tokenizer_source lays out: give one")
        if not is_integer(pad_to_multiple_of) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        return int(pad_to_multiple_of)
    return None


def check_tokens(tokens) -> None:
    """ValueError unless ``tokens`` is None or a mapping token -> ``{"source": ..., "force": ...}``
    in the form the module docstring gives."""
    if tokens is None:
        return
    if not isinstance(tokens, Mapping):
        raise ValueError(f"tokens must be a mapping token -> {{source: ..., force: ...}}, got {tokens!r}")
    for token, spec in tokens.items():
        where = f"tokens[{token!r}]"
        if not isinstance(token, str) or not isinstance(spec, Mapping):
            raise ValueError(f"{where} must map a token (text) to {{source: ..., force: ...}}, got {spec!r}")
        unknown = sorted(set(spec) - {"source", "force"})
        if unknown:
            raise ValueError(f"{where}: {', '.join(unknown)} is not read (it takes source and force)")
        if not isinstance(spec.get("force", False), bool):
            raise ValueError(f"{where}.force must be true or false, got {spec.get('force')!r}")
        source = spec.get("source")
        if source is None or isinstance(source, str):
            continue
        if not isinstance(source, Mapping) or source.get("kind") not in ("zero", "model_token"):
            raise ValueError(f"{where}.source must be a model, {{kind: zero}} or {{kind: model_token, model: ..., "
                             f"token or token_id: ...}}, got {source!r}")
        if source["kind"] == "model_token":
            if not isinstance(source.get("model"), str) or (("token" in source) == ("token_id" in source)):
                raise ValueError(f"{where}.source: model_token takes a model and one of token, token_id; got "
                                 f"{source!r}")
            if "token_id" in source and (isinstance(source["token_id"], bool) or not isinstance(source["token_id"], int)
                                         or source["token_id"] < 0):
                raise ValueError(f"{where}.source.token_id must be a row number, got {source['token_id']!r}")


def holds_no_vocabulary(tokenizer, directory) -> bool:
    """Whether ``tokenizer`` holds its special tokens and at most one other: the minimal one
    transformers 5's AutoTokenizer builds, without an error, for a directory with no tokenizer
    files (Qwen2's and GPT-2's lone ``<|endoftext|>``, BERT's and Gemma's five, T5's and mBART's
    with their space piece), which reads every text as nothing or unknown tokens. A ValueError
    naming ``directory`` (where it was loaded from) where it cannot list its vocabulary."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception as e:
        # (a tokenizer that loads is the checkpoint's: taken as none, a merge laid the model's rows
        # out by another model's tokens)
        raise ValueError(f"the tokenizer of {directory} loads but cannot list its vocabulary "
                         f"({type(e).__name__}: {e})") from e
    special = set(tokenizer.all_special_tokens)
    return sum(token not in special for token in vocab) <= 1


# the class a tokenizer saved from its tokenizer.json alone names (transformers 5's; 4's name for it)
SAVED_AS_FILE = ("TokenizersBackend", "PreTrainedTokenizerFast")


def checkpoint_tokenizer(directory):
    """``AutoTokenizer.from_pretrained(directory)``, unless it loads a tokenizer saved as its
    tokenizer.json alone (``SAVED_AS_FILE``) as its config's model type's own class, and that
    class holds another vocabulary or model: transformers 5 does so for Qwen2's, Phi-3's, ...
    (configs whose hub tokenizers it takes to name the wrong class), and its Qwen2Tokenizer adds
    '<|endoftext|>' and reads a word-level tokenizer.json as byte-level BPE: its rows were checked
    and laid out by a token the tokenizer saved has not got, and calibration texts read as none.
    Then the tokenizer saved, with a warning (what AutoTokenizer loads elsewhere differs)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = Path(directory) / "tokenizer_config.json"
    declared = read_json_file(config) if config.is_file() else None
    declared = declared.get("tokenizer_class") if isinstance(declared, dict) else None
    if declared not in SAVED_AS_FILE or type(tokenizer).__name__ in SAVED_AS_FILE:
        return tokenizer
    saved = transformers.PreTrainedTokenizerFast.from_pretrained(directory)

    def model_of(t) -> str:
        return type(getattr(getattr(t, "backend_tokenizer", None), "model", None)).__name__

    differences = []
    if saved.get_vocab() != tokenizer.get_vocab():
        added = sorted(set(tokenizer.get_vocab()) - set(saved.get_vocab()))
        differences.append(f"{len(tokenizer)} tokens for its {len(saved)}{f' (adding {added[:3]})' if added else ''}")
    if model_of(saved) != model_of(tokenizer):
        differences.append(f"a {model_of(tokenizer)} model for its {model_of(saved)}")
    if not differences:
        return tokenizer
    warnings.warn(f"transformers' AutoTokenizer loads the tokenizer of {directory}, saved as {declared}, as "
                  f"{type(tokenizer).__name__}: {', '.join(differences)}; it is read as saved (load it so "
                  f"yourself: PreTrainedTokenizerFast.from_pretrained)")
    return saved


def load_tokenizer(path: Path):
    """The tokenizer saved with a checkpoint (a fast one), or None where it has none."""
    directory = path if path.is_dir() else path.parent
    try:
        tokenizer = checkpoint_tokenizer(directory)
    except json.JSONDecodeError as e:
        # (a tokenizer file empty or cut, an interrupted copy or download, is no model without a
        # tokenizer: taken as one, its rows were laid out by another model's tokens)
        for file in sorted(directory.glob("*.json")):
            try:
                check_json_file(file)
            except ValueError as bad:
                raise ValueError(f"{bad}: the tokenizer of {directory} does not load (copy it again)") from None
            except OSError:
                continue
        raise ValueError(f"the tokenizer of {directory} does not load: {e}") from None
    except Exception:  # (as mergekit: a model without a tokenizer has the base's)
        return None
    # (transformers 5's stand-in where no files are: taken as a tokenizer, the model's rows were
    # laid out as a vocabulary of those few tokens, its updates to every other row lost)
    return None if holds_no_vocabulary(tokenizer, directory) else tokenizer


def _copy(tokenizer):
    """An independent copy of ``tokenizer`` (tokens added to it leave the original as it is)."""
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return transformers.AutoTokenizer.from_pretrained(scratch)


@dataclass
class Vocabulary:
    """The output ``tokenizer``, its ``size`` (tokens) and ``rows`` (``size`` padded), and for
    each model (by key) ``index``: its row of each output token, -1 where it lacks the token.
    ``base``: the key whose row a token shared by some models takes (None: their mean)."""

    tokenizer: object
    size: int
    rows: int
    index: dict
    base: Optional[Hashable] = None
    names: tuple = field(default=())
    # token id -> ("zero",) | ("row", key, row in that model's tensors), and the ids forced
    chosen: dict = field(default_factory=dict)
    forced: frozenset = field(default_factory=frozenset)
    # names among ``names`` indexed by the vocabulary along dimension 1 (BART's [1, vocab]
    # final_logits_bias): laid out as their transposes
    columns: tuple = field(default=())

    def align(self, tensors: Mapping[Hashable, torch.Tensor], name: str = "tensor") -> dict:
        """Each model's ``tensors`` (vocabulary along dimension 0) laid out by the output
        vocabulary: ``rows`` rows each, in the dtype all of them promote to."""
        keys = list(tensors)
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"{name}: no vocabulary index for {missing}")
        for k in keys:
            if tensors[k].shape[1:] != tensors[keys[0]].shape[1:]:
                raise ValueError(f"tensor {name!r}: rows of shape {tuple(tensors[k].shape[1:])} in {k}, "
                                 f"{tuple(tensors[keys[0]].shape[1:])} in {keys[0]}")
        dtype = tensors[keys[0]].dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        like = tensors[keys[0]]
        row_shape = like.shape[1:]
        index = {k: self.index[k].to(like.device) for k in keys}
        has = torch.stack([index[k] >= 0 for k in keys])  # [models, size]
        count = has.sum(0)
        # the row every model lacking a token takes (computed only for tokens some model lacks,
        # and by the rules only for those no ``tokens`` entry names)
        by_rule = count < len(keys)
        if self.chosen:
            by_rule[list(self.chosen)] = False
        lacking = by_rule.nonzero().flatten()
        default = torch.zeros((len(lacking), *row_shape), dtype=dtype, device=like.device)
        if len(lacking):
            total = torch.zeros_like(default)
            for j, k in enumerate(keys):  # (in model order: mergekit's sum)
                present = has[j, lacking]
                total[present] += tensors[k][index[k][lacking[present]]].to(dtype)
            n = count[lacking]
            averaged = n > 1
            if self.base is not None and self.base in tensors:
                from_base = has[keys.index(self.base), lacking] & (n > 1)
                averaged &= ~from_base
                default[from_base] = tensors[self.base][index[self.base][lacking[from_base]]].to(dtype)
            single = n == 1
            default[single] = total[single]
            default[averaged] = total[averaged] / n[averaged].view(-1, *([1] * len(row_shape))).to(dtype)
            absent = lacking[n == 0]
            if len(absent):
                ids = set(absent.tolist())
                words = [t for t, i in self.tokenizer.get_vocab().items() if i in ids][:3]
                warnings.warn(f"{name}: {len(absent)} tokens in no model (e.g. {words}) get zero rows")
        out = {}
        for j, k in enumerate(keys):
            t = torch.empty((self.rows, *row_shape), dtype=dtype, device=like.device)
            mine = has[j]
            t[: self.size][mine] = tensors[k][index[k][mine]].to(dtype)
            theirs = ~has[j, lacking]
            t[lacking[theirs]] = default[theirs]
            out[k] = t
        for i, how in self.chosen.items():
            if how[0] == "row" and how[1] not in tensors:
                raise ValueError(f"{name}: token {i}'s row comes from {how[1]}, which is not among the models")
            row = torch.zeros(row_shape, dtype=dtype, device=like.device) if how[0] == "zero" else \
                tensors[how[1]][how[2]].to(dtype)
            for j, k in enumerate(keys):
                if i in self.forced or not has[j, i]:
                    out[k][i] = row
        for k in keys:
            if self.rows > self.size:
                out[k][self.size:] = out[k][: self.size].mean(0)
        return out


def build_vocabulary(source: str, tokenizers: Mapping[Hashable, object], rows: Mapping[Hashable, int], *,
                     base: Optional[Hashable] = None, pad_to_multiple_of: Optional[int] = None,
                     names: Sequence[str] = (), columns: Sequence[str] = (),
                     tokens: Optional[Mapping[str, Mapping]] = None,
                     key_of: Callable[[str], Hashable] = lambda model: model) -> Vocabulary:
    """The output vocabulary of ``source`` ("base" or "union") over the models' ``tokenizers``
    (key -> tokenizer or None: it has the reference's), the reference first (the base, else the
    first model); ``rows``: each model's embedding rows (tokens at or past them are padding
    ids its embeddings have no row for, and are left out). ``base``: the base's key, if any.
    ``tokens``: rows named token by token (module docstring), their models found by ``key_of``."""
    pad_to_multiple_of = check_tokenizer_source(source, pad_to_multiple_of)
    check_tokens(tokens)
    keys = list(tokenizers)
    reference = tokenizers[keys[0]]
    if reference is None:
        raise ValueError(f"tokenizer_source {source!r}: the {'base' if base is not None else 'first model'} has no "
                         f"tokenizer to lay the vocabulary out by")
    vocabs = {k: (tokenizers[k] or reference).get_vocab() for k in keys}
    past = sorted(t for t, i in vocabs[keys[0]].items() if i >= rows[keys[0]])
    if past:
        raise ValueError(f"the tokenizer of the {'base' if base is not None else 'first model'} has {len(past)} tokens "
                         f"past its {rows[keys[0]]} embedding rows (e.g. {past[:3]}): they have no embedding to merge; "
                         f"resize its embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)), "
                         f"then save_pretrained) or give it a tokenizer without them")
    if source == "base":
        tokenizer = _copy(reference) if tokens and set(tokens) - set(vocabs[keys[0]]) else reference
    else:
        tokenizer = _copy(reference)
        known = set(vocabs[keys[0]])
        # the reference's added tokens come first (as mergekit: the first definition of a token wins)
        own = {a.content: a for i, a in reference.added_tokens_decoder.items() if i < rows[keys[0]]}
        regular, added, conflicting = [], {}, []
        for k in keys[1:]:
            tok = tokenizers[k]
            if tok is None:
                continue
            decoder = {i: a for i, a in tok.added_tokens_decoder.items() if i < rows[k]}
            contents = {a.content for a in decoder.values()}
            for token, i in sorted(vocabs[k].items(), key=lambda item: item[1]):
                if i < rows[k] and token not in known and token not in contents:
                    known.add(token)
                    regular.append(token)
            for i in sorted(decoder):
                first = own.get(decoder[i].content) or added.get(decoder[i].content)
                if first is not None and first != decoder[i] and decoder[i].content not in conflicting:
                    conflicting.append(decoder[i].content)  # (special / normalized / strip flags differ)
                added.setdefault(decoder[i].content, decoder[i])
        if conflicting:
            warnings.warn(f"tokens added with different settings in different models (e.g. "
                          f"{[own.get(t) or added[t] for t in conflicting[:3]]}): each takes its first definition")
        regular = [t for t in regular if t not in added]
        if regular:
            tokenizer.add_tokens(regular)
        # an added token the reference has only in its model vocabulary is added too (at the id it has
        # there): else the written tokenizer splits it as ordinary text, never reaching its row
        new = [a for content, a in added.items() if content not in own]
        for a in new:  # (one at a time, in order: each gets the next id)
            tokenizer.add_tokens(a)
    for token in tokens or {}:  # (as mergekit: a token named there is in the output)
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens(token)
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    if max(vocab.values()) >= size:
        raise ValueError(f"the output tokenizer's ids run to {max(vocab.values())} for {size} tokens: ids with no "
                         f"token cannot be laid out")
    padded = size if not pad_to_multiple_of else -(-size // pad_to_multiple_of) * pad_to_multiple_of
    index = {k: _row_index(vocab, size, vocabs[k], rows[k]) for k in keys}
    chosen, forced = {}, set()
    for token, spec in (tokens or {}).items():
        i = vocab[token]
        if spec.get("force", False):
            forced.add(i)
        how = spec.get("source")
        if how is None:
            if i in forced:  # (forced with no source: the rules' row, as for a token some model lacks)
                raise ValueError(f"tokens[{token!r}]: force needs a source (the row every model takes)")
            continue
        if isinstance(how, str) or how["kind"] == "model_token":
            model = how if isinstance(how, str) else how["model"]
            key = key_of(model)
            if key not in index:
                raise ValueError(f"tokens[{token!r}]: {model!r} is not one of the models merged")
            if isinstance(how, str):
                row = int(index[key][i])
                if row < 0:
                    raise ValueError(f"tokens[{token!r}]: {model!r} has no such token to take the row of")
            elif "token_id" in how:
                row = how["token_id"]
            else:
                row = vocabs[key].get(how["token"], -1)
                if row < 0:
                    raise ValueError(f"tokens[{token!r}]: {model!r} has no token {how['token']!r}")
            if row >= rows[key]:
                raise ValueError(f"tokens[{token!r}]: row {row} is past {model!r}'s {rows[key]} embedding rows")
            chosen[i] = ("row", key, row)
        else:
            chosen[i] = ("zero",)
    return Vocabulary(tokenizer, size, padded, index, base, tuple(names), chosen, frozenset(forced),
                      tuple(n for n in columns if n in names))


def rows_by_token(into, into_rows: int, source, source_rows: int) -> Optional[torch.Tensor]:
    """Row of each of ``into``'s tokens (a tokenizer of ``into_rows`` embedding rows) in a model
    whose tokenizer is ``source`` (``source_rows`` rows): -1 where it lacks the token (and for
    rows past ``into``'s vocabulary); None where the two number every token alike."""
    mine = {t: i for t, i in source.get_vocab().items() if i < source_rows}
    theirs = {t: i for t, i in into.get_vocab().items() if i < into_rows}
    if mine == theirs and into_rows == source_rows:
        return None
    return _row_index(theirs, into_rows, mine, source_rows)


def rows_apart(mine: Mapping[str, int], theirs: Mapping[str, int]) -> list:
    """``(row, my token, their token)`` of each row under which two vocabularies (token -> row) put other
    tokens, each held by both: the same tokens numbered otherwise, whose rows a merge by position mixes.
    Tokens one holds alone (added in fine-tuning) put no row apart, wherever they are."""
    shared = mine.keys() & theirs.keys()
    their_token = {i: t for t, i in theirs.items() if t in shared}
    return sorted((i, t, their_token[i]) for t, i in mine.items() if t in shared and their_token.get(i, t) != t)


def _row_index(into: Mapping[str, int], into_rows: int, source: Mapping[str, int], source_rows: int) -> torch.Tensor:
    """For each of ``into_rows`` rows, the row of the token ``into`` puts there in a model whose
    vocabulary is ``source`` of ``source_rows`` rows; -1 where it has no row for it."""
    rows = torch.full((into_rows,), -1, dtype=torch.long)
    for token, i in into.items():
        j = source.get(token)
        if i < into_rows and j is not None and j < source_rows:
            rows[i] = j
    return rows


def vocabulary_names(skeleton, names: Sequence[str]) -> list:
    """The tensors among ``names`` indexed by the vocabulary along dimension 0: the input
    embeddings' weight, and the output head's weight and bias where they are not tied to
    them, found on ``skeleton`` (the model's modules, ``lora.model_skeleton``)."""
    if skeleton is None:
        raise ValueError("tokenizer_source: the reference model could not be built from its config.json, so the "
                         "tensors indexed by the vocabulary cannot be told apart")
    # every name of each parameter: a checkpoint may store a tied weight under any of them (T5's
    # shared / encoder / decoder embeddings, an lm_head transformers ties though the file holds
    # its own), and each of those tensors is indexed by the vocabulary
    params = {}
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(n)
    found = []
    inputs, outputs = _module(skeleton, "get_input_embeddings"), _module(skeleton, "get_output_embeddings")
    if not isinstance(inputs, torch.nn.Embedding):  # (a vision tower's patch embedding is no vocabulary)
        raise ValueError(f"tokenizer_source: the model's input embeddings are not a token embedding "
                         f"({type(inputs).__name__}): it has no vocabulary to lay out")
    for module in (inputs, outputs):
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            for n in params.get(id(p), []) if p is not None else []:
                if n in names and n not in found:
                    found.append(n)
    if not found:
        raise ValueError(f"tokenizer_source: none of the checkpoint's tensors is the model's input embeddings "
                         f"({params.get(id(inputs.weight))})")
    return found


def text_tower_embeddings(skeleton, names: Sequence[str]) -> Optional[str]:
    """The name among ``names`` of the token embeddings of ``skeleton``'s text tower, where the model gives
    none of its own (a CLIPModel's, SigLIP's: ``get_input_embeddings`` is not theirs): the one embedding of
    its text config's vocab_size rows that is no position's; None where there is not exactly one."""
    vocab_size = getattr(getattr(getattr(skeleton, "config", None), "text_config", None), "vocab_size", None)
    if not isinstance(vocab_size, int):
        return None
    found = [f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Embedding)
             and m.num_embeddings == vocab_size and "position" not in n and f"{n}.weight" in names]
    return found[0] if len(found) == 1 else None


def vocabulary_columns(skeleton, names: Sequence[str]) -> list:
    """The persistent buffers among ``names`` indexed by the vocabulary along dimension 1: of
    shape [1, vocabulary] (BART's, mBART's, Marian's and Pegasus' ``final_logits_bias``, which
    ``resize_token_embeddings`` resizes with the embeddings)."""
    inputs = _module(skeleton, "get_input_embeddings") if skeleton is not None else None
    if not isinstance(inputs, torch.nn.Embedding):
        return []
    persistent = skeleton.state_dict(keep_vars=True).keys()  # (a checkpoint holds these buffers)
    return [n for n, b in skeleton.named_buffers() if n in persistent and n in names
            and tuple(b.shape) == (1, inputs.num_embeddings)]


def _module(skeleton, getter: str):
    """``skeleton.get_input_embeddings()`` (or another getter), None where the model has none
    (transformers raises NotImplementedError for a CLIPModel's)."""
    try:
        return getattr(skeleton, getter)()
    except (AttributeError, NotImplementedError):
        return None


class Aligner:
    """Hands out the models' vocabulary-indexed tensors laid out by ``vocabulary``: the first
    request for a name aligns every model's tensor of it at once (a lacking token's row needs
    the others'); ``states``: key -> the model's state dict (read lazily)."""

    def __init__(self, vocabulary: Vocabulary, states: Mapping[Hashable, Mapping],
                 read: Callable[[Mapping, str], torch.Tensor] = lambda state, name: state[name]):
        self.vocabulary, self.states, self.read = vocabulary, dict(states), read
        self.names = set(vocabulary.names)
        self._name, self._aligned = None, {}

    def get(self, key: Hashable, name: str) -> torch.Tensor:
        if name != self._name:
            self._aligned = {}  # (one name at a time: the merges go name by name)
            if name in self.vocabulary.columns:
                aligned = self.vocabulary.align({k: self.read(s, name).T for k, s in self.states.items()}, name)
                self._aligned = {k: t.T.contiguous() for k, t in aligned.items()}
            else:
                self._aligned = self.vocabulary.align({k: self.read(s, name) for k, s in self.states.items()}, name)
            self._name = name
        return self._aligned[key]

    def let_go(self) -> None:
        """Drop the tensors laid out for the last name: a merge that has gone on to another
        tensor reads them no more (held to the end, a union merge of a 70B's three experts kept
        four embeddings, GBs, through every layer's merge)."""
        self._name, self._aligned = None, {}
