"""Blocks a walk has finished, on disk, so that an interrupted walk goes on from the next one.

Quantizing a large model takes hours (the ANCHORS: 70B in 20 h on 4 GPUs), and a crash,
a preemption or an out-of-memory error in the last block loses all of it. With
``quantize_model(..., resume_dir=DIR)`` every block is written to ``DIR`` when it is done: its
packed layers (``{block}.safetensors``) and its report entries (``{block}.json``, written last,
so a block counts as done only once both are whole). Started again with the same arguments,
the walk loads the blocks ``DIR`` holds instead of solving them and runs the calibration
through them, so every later block sees the inputs it would have seen: the result is
bit-identical to an uninterrupted walk (tested).

Nothing stale is reused silently: ``walk.json`` holds what the result depends on (method,
grid, anchors, solver settings, device type, torch's float arithmetic there where not its
default (TF32, scaled_dot_product_attention's kernels), the hardware (on a CPU torch's thread
count and instruction set, on a GPU its model and SM count), the calibration data's digest, the
blocks' layout, the model's config, attention implementation, buffers and module settings, plain
attributes included, the versions of the code), and each block's record the digest of that
identity (so a lost ``walk.json`` does not let another walk's blocks in: nor does another walk
then claim the directory) and of the weights it was solved from (the merged block and, for
E-PMQ, the experts' tensors it read: their fingerprints taken from the reads the solve made, so
no expert is read twice), chained with the digest of the block before it (a block solved again
from other weights makes every later block's record another's). A resumed walk whose arguments, data or
weights differ raises ``ValueError`` naming the difference. A record carries a checksum: a
damaged one is solved again, with a warning; a read that fails for another reason (too many
open files) raises and keeps the block. One walk at a time holds a directory (``walk.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ._util import changed_keys, read_json, remove_stale_temporaries, save_safetensors, write_atomic, write_json_atomic
from .qlinear import QuantLinear

IDENTITY_FILE = "walk.json"
LOCK_FILE = "walk.lock"
# one run at a time in an output directory of ``epmq run``, ``epmq demo`` and ``pipeline.run`` (``hold_run``)
RUN_LOCK_FILE = ".epmq-run.lock"
FORMAT = 2  # 2: records carry the walk's identity and a checksum


def _crc(t: torch.Tensor) -> int:
    t = t.detach()
    if not t.numel():
        return 0
    return zlib.crc32(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(t: torch.Tensor) -> tuple:
    """What ``tensor_digest`` takes of a tensor: dtype, shape and a CRC-32 of its bytes (a meta
    tensor has none: its dtype and shape)."""
    return str(t.dtype), tuple(t.shape), "meta" if t.is_meta else _crc(t)


_AT_ONCE = 8  # tensors fingerprinted together (in threads), and so held at once


def tensor_digest(named: Iterable, text: str = "") -> str:
    """Digest of ``(name, tensor)`` pairs (or ``(name, fingerprint(tensor))``, computed before):
    names, dtypes, shapes and a CRC-32 of each tensor's bytes, and of ``text``. The pairs are
    consumed a few at a time, so a generator that reads tensors holds a few of them at once; the
    CRCs run in threads (2 GB/s each on the dev machine, where blake2b did 0.6; this guards
    against stale weights, not against an adversary)."""
    h = hashlib.blake2b(text.encode(), digest_size=16)
    named = iter(named)
    with ThreadPoolExecutor(max_workers=min(_AT_ONCE, os.cpu_count() or 1)) as pool:
        while chunk := list(itertools.islice(named, _AT_ONCE)):
            prints = pool.map(lambda t: t if isinstance(t, tuple) else fingerprint(t), (t for _, t in chunk))
            for (name, _), (dtype, shape, crc) in zip(chunk, prints):
                h.update(f"{name}|{dtype}|{shape}|{crc}|".encode())
            del chunk
    return h.hexdigest()


# config entries that name where a model came from, not what it computes
_CONFIG_PROVENANCE = {"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"}


def config_of(model: nn.Module) -> Optional[dict]:
    """A transformers model's configuration as a dict (what it computes with: eps, rope, attention
    implementation), without provenance; None for other models."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        return None
    entries = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_PROVENANCE}
    entries.update(_implementations(config))
    return entries


def _implementations(config, prefix: str = "") -> dict:
    """The attention and experts implementations of a config and its sub-configs (a CLIP's text
    and vision towers may differ), which ``to_dict`` leaves out."""
    found = {f"{prefix}{k}": getattr(config, k, None) for k in ("_attn_implementation", "_experts_implementation")}
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if hasattr(sub, "to_dict"):
            found.update(_implementations(sub, f"{prefix}{name}."))
    return found


def data_digest(item) -> str:
    """Digest of calibration data by its content: nested mappings, sequences, sets, tensors, arrays,
    plain values, and other objects by their fields (a dataclass's, or their attributes). One that
    has none and whose repr is only its type and address is refused."""
    inside = set()  # (ids of the objects being visited: an attribute pointing back up is not followed)

    def visit(x, h):
        if isinstance(x, torch.Tensor):
            h.update(tensor_digest([("", x)]).encode())
        elif isinstance(x, np.ndarray):  # (by its values: its repr leaves out all but the ends of one past 1000)
            if x.dtype == object:
                h.update(f"ndarray{x.shape}".encode())
                visit(x.reshape(-1).tolist(), h)
            else:
                h.update(f"ndarray|{x.dtype.str}|{x.shape}|".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k, v in x.items():
                h.update(repr(k).encode())
                visit(v, h)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v, h)
            h.update(b"]")
        elif isinstance(x, (set, frozenset)):  # (its repr's order is its strings' hashes': another in each process)
            h.update(f"set{sorted(digest(v) for v in x)}".encode())
        elif isinstance(x, (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, np.generic)):
            h.update(repr(x).encode())
        elif id(x) in inside:
            h.update(b"<cycle>")
        else:
            # (by repr, a dataclass's tensors were cut to their ends by '...', two datasets one digest, and an
            # object without a repr of its own gave its address: another digest in each process)
            slots = [k for c in type(x).__mro__ for k in getattr(c, "__slots__", ()) if hasattr(x, k)]
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
            elif hasattr(x, "__dict__") or slots:
                fields = {**getattr(x, "__dict__", {}), **{k: getattr(x, k) for k in slots}}
            elif type(x).__repr__ is object.__repr__:
                raise TypeError(f"calibration data holds a {type(x).__module__}.{type(x).__qualname__}, whose "
                                f"content cannot be digested for resume_dir (it has no fields, and its repr is its "
                                f"address): give tensors, arrays or plain values")
            else:
                fields = repr(x)
            h.update(f"{type(x).__module__}.{type(x).__qualname__}".encode())
            inside.add(id(x))
            try:
                visit(fields, h)
            finally:
                inside.discard(id(x))

    def digest(x) -> str:
        h = hashlib.blake2b(digest_size=16)
        visit(x, h)
        return h.hexdigest()

    return digest(item)


class BlockLog:
    """The resume directory of one walk (see the module docstring). Held by one walk at a time
    (a lock on ``walk.lock``, let go by ``close`` or when the process ends)."""

    def __init__(self, directory, identity: dict, left_out: Iterable = ()):
        # (left_out: the linears of the blocks the walk leaves in full precision whatever the
        # calibration, whose weight the blocks' code reads without a call: Mamba's dt_proj)
        self.directory = Path(directory)
        _refuse_a_checkpoint(self.directory)
        self._lock = _lock(self.directory)
        try:
            self._open(identity, set(left_out))
        except BaseException:
            self.close()
            raise

    def _open(self, identity: dict, left_out: set) -> None:
        remove_stale_temporaries(self.directory, "*")  # (a killed walk's half-written files)
        identity = json.loads(json.dumps(dict(identity, format=FORMAT), default=str))
        # every record carries this: blocks of another walk are refused even where walk.json,
        # which names what differs, is lost
        self.identity = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()
        path = self.directory / IDENTITY_FILE
        saved = read_json(path, strict=True)
        saved = saved if isinstance(saved, dict) else None  # (damaged: JSON, but not a record)
        changed = [] if saved is None else changed_keys(saved, identity)
        done = records(self.directory)
        if changed and done:
            then, now = (_linears(d.get("blocks")) for d in (saved, identity))
            details = "; ".join(_walked(then, now) if k == "blocks" and then is not None and now is not None else
                                _differs(k, saved.get(k), identity.get(k)) for k in changed)
            remedy = "resume with the same arguments, model and calibration data, or use an empty directory"
            if set(changed) <= _CODE:
                remedy = ("it was written by other code (the versions of torch, triton, transformers, open_clip "
                          "or epmq, or what epmq's statistics count), whose blocks this one cannot take: resume "
                          "with that code, or use an empty directory")
            if changed == ["precision"]:
                remedy = ("the blocks done were computed under other settings of torch's float arithmetic (TF32, "
                          "reduced-precision reductions: torch.set_float32_matmul_precision, torch.backends; "
                          "scaled_dot_product_attention's kernels: torch.backends.cuda.enable_flash_sdp and the "
                          "others): "
                          "resume under those, or use an empty directory")
            if changed == ["machine"]:
                remedy = ("the blocks done were computed on other hardware, whose float arithmetic differs bit for "
                          "bit: on a CPU, with another number of torch's threads (torch.set_num_threads, epmq's "
                          "--threads, OMP_NUM_THREADS), which changes the order of its reductions, or another "
                          "instruction set; on a GPU, on another model (machine.model.*: those of the hardware the "
                          "model lies on, where its blocks visited another device by quantize_model's device=, as "
                          "the model's code outside the blocks, which computes their inputs, ran there; "
                          "machine.cuda:1.* and the like: another device a device_map spread the model over): resume "
                          "with those, or use an empty directory")
                if "machine" not in saved:
                    remedy = ("it was written by an epmq that did not record the hardware its blocks were computed "
                              "on (torch's CPU threads, the GPU model), on which they depend bit for bit: resume "
                              "with that epmq, or use an empty directory")
            if "blocks" in changed and then is not None and now is not None and now < then and then - now <= left_out:
                remedy = ("this epmq leaves those linears in full precision, their weight read without a call by "
                          "the blocks' code (as Mamba's dt_proj: self.dt_proj.weight @ x), where the epmq that "
                          "wrote the directory walked them: its blocks cannot be reused, use an empty directory")
            raise ValueError(f"resume_dir {self.directory} holds blocks of another walk ({details}): {remedy}")
        if changed or (saved is None and (not done or self.identity in _identities(done))):
            # (no block done yet, nothing to protect; or walk.json lost, and a block says it is
            # this walk's: another walk, refused block by block, must not claim the directory)
            write_json_atomic(path, identity)

    def close(self) -> None:
        """Let go of the directory (another walk may take it, unless this process holds it
        otherwise: ``hold``)."""
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    def _paths(self, prefix: str):
        return self.directory / f"{prefix}.safetensors", self.directory / f"{prefix}.json"

    def has(self, prefix: str) -> bool:
        """Whether block ``prefix`` has a record (whole or not): ``load`` then needs its digest."""
        return self._paths(prefix)[1].is_file()

    def load(self, prefix: str, digest: str, device) -> Optional[dict]:
        """The record of block ``prefix`` (its layers as ``QuantLinear`` on ``device`` under
        ``"layers"``), or None if it is not done or its files are damaged (then with a warning:
        it is solved again); ValueError if it was solved from other weights or by another walk.
        A file that cannot be read for another reason than damage (too many open files, no
        memory) raises: the block is kept."""
        tensors_path, record_path = self._paths(prefix)
        record = read_json(record_path, strict=True)
        if record is None:
            return None if not record_path.exists() else self._damaged(prefix, f"{record_path.name} is not JSON")
        body = {k: v for k, v in record.items() if k != "check"} if isinstance(record, dict) else None
        if body is None or record.get("check") != _check(body):
            return self._damaged(prefix, f"{record_path.name} is not a whole record")
        if record.get("identity") != self.identity:
            raise ValueError(
                f"resume_dir {self.directory}: block {prefix} was written by a walk with other "
                f"arguments: resume with the same arguments, or use an empty directory"
            )
        if record["digest"] != digest:
            raise ValueError(
                f"resume_dir {self.directory}: block {prefix} was quantized from other weights "
                f"(the model's or an expert's block, or its configuration, differs): resume with "
                f"the same model and experts, or use an empty directory"
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not tensors_path.is_file():
            return self._damaged(prefix, f"{tensors_path.name} is missing")
        try:  # (safetensors reports any failure to open a file, too many open files included, as
            # FileNotFoundError: that one is raised, the file being there)
            tensors = load_file(str(tensors_path))
        except SafetensorError as e:  # (truncated, not safetensors)
            return self._damaged(prefix, f"{tensors_path.name} cannot be read ({type(e).__name__}: {e})")
        if tensor_digest(sorted(tensors.items())) != record.get("tensors"):
            return self._damaged(prefix, f"{tensors_path.name} does not hold what was written")
        layers = {}
        for rel, meta in record["layers"].items():
            layer = QuantLinear(meta["in_features"], meta["out_features"], bits=meta["bits"],
                                group_size=meta["group_size"], bias=meta["bias"],
                                dtype=getattr(torch, meta["dtype"]))
            layer.load_state_dict({k.removeprefix(f"{rel}."): v for k, v in tensors.items()
                                   if k.startswith(f"{rel}.")})
            # (not in its state dict: RWKV's division of the layers the walk packed)
            layer.weight_multiplier = meta.get("weight_multiplier", layer.weight_multiplier)
            layers[rel] = layer.to(device)
        return dict(record, layers=layers)

    def _damaged(self, prefix: str, why: str) -> None:
        warnings.warn(f"resume_dir {self.directory}: block {prefix} is damaged ({why}): solving it again")
        for path in self._paths(prefix):
            path.unlink(missing_ok=True)
        return None

    def save(self, prefix: str, digest: str, layers: Mapping[str, nn.Module], **report) -> None:
        """Write block ``prefix``: its packed ``layers`` (relative name -> ``QuantLinear``) and
        ``report`` (lists of the walk report's entries for this block). The tensors are on disk
        (fsynced) before the record that makes the block count as done is written."""
        tensors_path, record_path = self._paths(prefix)
        tensors = {f"{rel}.{k}": v.detach().cpu().contiguous()
                   for rel, layer in layers.items() for k, v in layer.state_dict().items()}
        write_atomic(tensors_path, lambda tmp: save_safetensors(tensors, tmp, metadata=_BLOCK_MARK))
        meta = {rel: dict(in_features=layer.in_features, out_features=layer.out_features,
                          bits=layer.bits, group_size=layer.group_size, bias=layer.bias is not None,
                          dtype=str(layer.weight.dtype).removeprefix("torch."),
                          **({"weight_multiplier": layer.weight_multiplier} if layer.weight_multiplier != 1 else {}))
                for rel, layer in layers.items()}
        body = json.loads(json.dumps(dict(report, digest=digest, identity=self.identity, layers=meta,
                                          tensors=tensor_digest(sorted(tensors.items()))), default=str))
        write_json_atomic(record_path, dict(body, check=_check(body)))


# the identity entries that the code sets, not the walk's arguments, data or model
_CODE = {"versions", "statistics", "format", "share_input_statistics"}


# the identity entries that are digests, and what of: two hashes say nothing to the user
_DIGESTS = {
    "outside": "the model's tensors outside the blocks (embeddings, final norm, head), in values or dtype",
    "buffers": "the model's buffers (a rotary embedding's inv_freq), in values or dtype",
    "modules": "the modules' settings (a norm's eps, an attention's scaling) or structure",
    "calibration": "the calibration data (its texts or images, samples, lengths, seed or batches)",
    "experts_outside": "the experts' tensors outside the blocks (embeddings, final norm, head)",
}


def _differs(key: str, then, now, limit: int = 4) -> str:
    """What differs in identity entry ``key``: of a mapping (a config, the versions), its entries
    that differ; of a digest, what it is of (of each expert's: the tasks whose differ)."""
    if key in _DIGESTS:
        tasks = changed_keys(then, now) if isinstance(then, dict) and isinstance(now, dict) else []
        which = f" (tasks {', '.join(map(repr, tasks[:limit]))}{', ...' if len(tasks) > limit else ''})"
        return f"{key}: {_DIGESTS[key]} differ{which if tasks else ''}"
    if key == "precision":  # (torch's defaults are recorded as nothing)
        then, now = then or {}, now or {}
    if isinstance(then, dict) and isinstance(now, dict):
        keys = changed_keys(then, now)
        more = f" ({len(keys)} in all)" if len(keys) > limit else ""
        missing = "torch's default" if key == "precision" else "None"
        said = (f"{key}.{k}: {_short(then[k]) if k in then else missing} then, "
                f"{_short(now[k]) if k in now else missing} now" for k in keys[:limit])
        return "; ".join(said) + more
    return f"{key}: {_short(then)} then, {_short(now)} now"


def _linears(blocks) -> Optional[set]:
    """The full names of the linears in a walk identity's ``blocks`` (``[[prefix, [[rel, ...] a
    block]], ...]``, a block's list by its child name where the stack names its blocks otherwise than
    by index: ``{"encoder_layer_0": [rel, ...], ...}``); None where it is not that."""
    try:
        return {f"{prefix}.{key}.{rel}" for prefix, chosen in blocks
                for key, rels in (chosen.items() if isinstance(chosen, dict) else enumerate(chosen)) for rel in rels}
    except (TypeError, ValueError):
        return None


def _walked(then: set, now: set, limit: int = 3) -> str:
    """Which linears a walk's blocks held then and not now, and now and not then."""
    said = []
    for names, when in ((then - now, "then, not now"), (now - then, "now, not then")):
        if names:
            names = sorted(names)
            more = f" ({len(names)} in all)" if len(names) > limit else ""
            said.append(f"linears walked {when}: {', '.join(names[:limit])}{more}")
    return "blocks: " + ("; ".join(said) or "the same linears in another layout")


def records(directory: Path) -> list:
    """The block records in a resume directory (whole or not). A user's JSON file there is none: counted as
    a block done, it kept a first walk from writing walk.json (a walk with other arguments was then refused
    without the difference named) and was said to be a block kept."""
    return [p for p in Path(directory).glob("*.json") if p.name != IDENTITY_FILE and _is_record(p)]


def _is_record(path: Path) -> bool:
    """Whether ``path`` is a block's record: beside its block's tensors (a damaged record too), or, those
    lost, holding a record's fields."""
    if path.with_suffix(".safetensors").is_file():
        return True
    body = read_json(path)
    return isinstance(body, dict) and {"identity", "check"} <= body.keys()


def remove(directory) -> None:
    """Delete the resume directory of a walk whose result is saved. It is not ours to empty whole
    (a scratch disk mounted there, a link to one, a user's notes), as ``hold(fresh=True)`` does
    not: the files walks write are deleted (block records and their tensors, ``walk.json``,
    ``walk.lock``, killed writes' temporaries), then a link, or the directory if nothing is left."""
    directory = Path(directory)
    with contextlib.suppress(OSError):  # (a directory the user's files are left in stays)
        _remove_walk_files(directory)
        (directory / LOCK_FILE).unlink(missing_ok=True)
        directory.unlink() if directory.is_symlink() else directory.rmdir()


def _remove_walk_files(directory: Path) -> None:
    """The files walks write in ``directory`` (block records and their tensors, ``walk.json``,
    killed writes' temporaries), not its lock nor a file of the user's."""
    remove_stale_temporaries(directory, "*")
    for record in records(directory):
        body = read_json(record)
        if isinstance(body, dict) and {"identity", "check"} <= body.keys():
            record.with_suffix(".safetensors").unlink(missing_ok=True)
            record.unlink()
    # (a walk killed between a block's tensors and its record left them without one: marked ours)
    for tensors in directory.glob("*.safetensors"):
        if _walk_tensors(tensors):
            tensors.unlink()
    (directory / IDENTITY_FILE).unlink(missing_ok=True)


# the metadata a block's tensors are written with: what tells a walk's file from a user's, record or not
_BLOCK_MARK = {"epmq": "resume block"}


def _walk_tensors(path: Path) -> bool:
    """Whether ``path`` holds a walk's block tensors (by their metadata; a file not safetensors: no)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}) == _BLOCK_MARK
    except Exception:  # (not safetensors, truncated, unreadable: none of ours to delete)
        return False


def _refuse_a_checkpoint(directory: Path) -> None:
    """A ValueError where ``directory`` is a model's checkpoint (a config beside weights files no walk
    wrote) given as the resume directory. The blocks written beside its weights (``{block}.safetensors``,
    there until the job that saves the result removes them) are read as part of it by loaders that take
    every ``.safetensors`` of a directory without an index (vLLM's), and make ``save_quantized`` refuse
    to replace it. (A user's other files, weights among them, may share a resume directory: no loader
    reads a directory without a config as a model.)"""
    from .checkpoint import CONFIG_FILE, HF_CONFIG_FILE, OPEN_CLIP_CONFIG_FILE, WEIGHT_SUFFIXES  # (it imports this)

    configs = [name for name in (HF_CONFIG_FILE, CONFIG_FILE, OPEN_CLIP_CONFIG_FILE) if (directory / name).is_file()]
    if not configs:
        return
    # (a block's tensors are the walk's by their metadata, or, damaged, by their record beside them)
    weights = sorted(p.name for p in directory.iterdir()
                     if p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".") and p.is_file()
                     and not (p.suffix == ".safetensors" and (_walk_tensors(p) or p.with_suffix(".json").is_file())))
    if weights:
        raise ValueError(f"resume_dir {directory} is a checkpoint ({', '.join(configs + weights[:3])}), whose "
                         f"loaders would read the blocks written beside its weights as part of them: give the walk "
                         f"a directory of its own")


def _identities(paths) -> set:
    """The walk identities the block records at ``paths`` carry (damaged ones: none)."""
    found = set()
    for path in paths:
        record = read_json(path)
        if isinstance(record, dict) and isinstance(record.get("identity"), str):
            found.add(record["identity"])
    return found


def _check(body: dict) -> str:
    """A checksum of a record's content (a damaged digit is caught, not trusted)."""
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=8).hexdigest()


_HELD = {}  # locked directory -> {"file": its lock file, "holders": in this process, "walk": one walks it}
# (its lock file, what the directory is to the user, who uses it) of a resume directory, of a run's
_WALK = (LOCK_FILE, "resume_dir", "walk")
_RUN = (RUN_LOCK_FILE, "output directory", "epmq run")


def _in_use(directory, kind=_WALK, lock: Optional[Path] = None) -> ValueError:
    file, what, user = kind
    lock = Path(directory) / file if lock is None else lock
    try:  # (the holder writes its process id there once it holds it)
        pid = lock.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):  # (Windows: a locked file cannot be read)
        pid = ""
    holder = f"process {pid}" if pid.isdigit() else "it"
    return ValueError(f"{what} {directory} is in use by another {user} ({holder} holds {file}): "
                      f"wait for it to end, or use another directory")


def _flock(handle, refused, what: str, user: str) -> None:
    """An exclusive lock on the open file ``handle`` (on Windows its first byte); the ValueError
    ``refused()`` where another holds it. A file system without locks only warns (``what``, the
    file's holder to the user, and ``user``, who is not refused then)."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)  # (its first byte, whatever the holder's process id made the file's end)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):  # (held: Windows' EACCES)
            handle.close()
            raise refused() from None
        # a file system without locks (NFS without its lock daemon: ENOLCK; FUSE: EOPNOTSUPP) holds
        # none, and was said to be in use, for good: unlocked, as it was before the lock
        warnings.warn(f"{what}: {Path(handle.name).name} cannot be locked ({e.strerror or e}): another "
                      f"{user} into it at the same time is not refused", stacklevel=3)


# opens of a lock file before it is refused: each retry follows a holder letting go (racing
# ones a few at most); a file system whose fstat and stat never agree would retry for ever
_LOCK_TRIES = 20


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _open_locked(lock: Path, refused, what: str, user: str):
    """``lock`` opened and locked (``_flock``; ``refused``, ``what`` and ``user`` as there), its
    folder made where need be. A holder letting go removes the file, with the folder made for it
    where nothing else is there: a handle opened before that locks a removed file in vain (another
    would take the file at the path, both held), and an open after the folder went fails."""
    for _ in range(_LOCK_TRIES):
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(lock, "a+", encoding="utf-8")
        except FileNotFoundError:  # (its folder removed since it was made)
            continue
        _flock(handle, refused, what, user)
        if os.name == "nt" or _same_file(handle, lock):
            return handle
        handle.close()
    raise ValueError(f"{what}: its lock file {lock} was replaced each time it was opened ({_LOCK_TRIES} times): "
                     f"the file system does not keep a file's identity (os.fstat and os.stat disagree), so no "
                     f"{user} into it can be held alone; use another disk")


def _lock(directory: Path, walk: bool = True, kind=_WALK) -> str:
    """An exclusive lock on ``directory`` (created if need be) for this process, and in it for
    one walk at a time (``walk``; ``hold`` takes it around a walk without walking it);
    ValueError if it is in use. ``kind``: that of a resume directory, or of a run's (``_RUN``).
    Returns the key ``_unlock`` takes. The lock goes with its process (a killed one holds nothing)."""
    file, what, _ = kind
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {directory} exists and is not a directory")
    if directory.is_symlink() and not directory.exists():  # (a scratch disk not mounted: not made here)
        raise ValueError(f"{what} {directory} is a link to {os.readlink(directory)}, which does not exist: "
                         f"mount or make it, or remove the link")
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    held = _HELD.get(key)
    if held is None:
        # (a run's holder letting go of a folder it made removes its lock file and the folder: hold_run)
        handle = _open_locked(directory / file, lambda: _in_use(directory, kind), f"{what} {directory}", kind[2])
        _name_holder(handle)
        held = _HELD[key] = {"file": handle, "holders": 0, "walk": False}
    elif walk and held["walk"]:
        raise _in_use(directory, kind)
    held["holders"] += 1
    held["walk"] = held["walk"] or walk
    return key


def _name_holder(handle) -> None:
    with contextlib.suppress(OSError):  # (only to name the holder: a dead one's is written over)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()


def _unlock(key: str, walk: bool = True) -> None:
    held = _HELD[key]
    held["holders"] -= 1
    held["walk"] = held["walk"] and not walk
    if not held["holders"]:
        removed = held.get("removed")
        if removed is not None and os.name != "nt":  # (removed while held: no other holds it meanwhile)
            removed.unlink(missing_ok=True)
        held["file"].close()
        if removed is not None and os.name == "nt":  # (an open file cannot be removed there)
            with contextlib.suppress(OSError):
                removed.unlink(missing_ok=True)
        del _HELD[key]


def _output_directory(directory) -> Path:
    """Where a checkpoint written to ``directory`` goes (a link's target), as ``check_output`` says."""
    directory = Path(os.path.abspath(directory))
    return directory.resolve() if directory.is_symlink() else directory


def output_lock_file(directory) -> Path:
    """The lock file ``hold_output`` takes for the checkpoint directory ``directory``: beside it
    (the directory itself is replaced by the write), beside a link's target (where it is written)."""
    directory = _output_directory(directory)
    return directory.with_name(f".{directory.name}.epmq-lock")


@contextlib.contextmanager
def hold_output(directory, *, job: bool = True):
    """Hold the checkpoint directory ``directory`` for one write at a time: an ``epmq merge`` or
    ``epmq quantize`` (``merge_checkpoints``, ``quantize_checkpoint``: ``job``) from its start, a
    save (``atomic_directory``; not ``job``: within this process's job, if any) while it writes.
    Another process's is refused naming the process and the lock file (``output_lock_file``), which
    is removed when let go. Two writes into one directory each replaced the other's checkpoint, and
    one's copy of the files a user keeps beside it ended in FileNotFoundError where the other had
    just replaced the directory."""
    directory, lock = _output_directory(directory), output_lock_file(directory)
    kind = (str(lock), "output directory", "epmq merge or quantize")  # (the file named whole: beside it)
    key = str(lock)
    held = _HELD.get(key)
    # (the folders made for the lock file, deepest first: removed with it where left empty, as by a
    # command refused before it wrote anything, which left OUT's folders behind)
    made = []
    if held is None:
        made = list(itertools.takewhile(lambda folder: not folder.exists(), (lock.parent, *lock.parent.parents)))
        handle = _open_locked(lock, lambda: _in_use(directory, kind, lock), f"output directory {directory}",
                              kind[2])
        _name_holder(handle)
        held = _HELD[key] = {"file": handle, "holders": 0, "walk": False, "removed": lock}
    elif job and held["walk"]:
        raise _in_use(directory, kind, lock)
    held["holders"] += 1
    held["walk"] = held["walk"] or job
    try:
        yield
    finally:
        _unlock(key, walk=job)
        for folder in made if key not in _HELD else ():
            with contextlib.suppress(OSError):  # (not empty: OUT was written there, or another's files)
                folder.rmdir()


@contextlib.contextmanager
def hold_run(directory, *, run: bool = True):
    """Hold ``directory``, the output directory of a run (``pipeline.run``, ``epmq run``, ``epmq
    demo``), for one run at a time: another process's, or another in this process (``run``; False:
    around a run without running it, as the command line holds it from its start), is refused
    naming the process. Two runs in one directory each wrote results.json over the other's, and
    one's clean-up of its unchosen anchors took checkpoints away from the other."""
    directory = Path(directory)
    # (the folders made for the hold, deepest first: removed again where the run wrote nothing, as a
    # run refused at its config or a missing expert left an empty OUT holding only its lock file)
    made = list(itertools.takewhile(lambda folder: not folder.exists(), (directory, *directory.parents)))
    key = _lock(directory, walk=run, kind=_RUN)
    try:
        yield
    finally:
        held = _HELD[key]
        # (a folder removed under the run, by hand: its own error said, and the hold let go)
        with contextlib.suppress(OSError):
            if made and held["holders"] == 1 and os.listdir(directory) == [RUN_LOCK_FILE]:
                held["removed"] = directory / RUN_LOCK_FILE  # (unlinked while still held: no other takes it between)
        _unlock(key, walk=run)
        for folder in made if key not in _HELD else ():
            with contextlib.suppress(OSError):  # (not empty: the run wrote there, or another's files)
                folder.rmdir()


@contextlib.contextmanager
def hold(directory, *, fresh: bool = False):
    """Hold the resume directory ``directory`` for a whole job (walk, save, clean-up), so that no
    other process takes it in between; ``fresh``: remove the walks' files first (under the lock), as
    ``remove`` removes them, a user's kept. A link (the blocks put on a scratch disk) is kept:
    unlinked, the new walk went to the output's disk, the earlier one's blocks left on the scratch
    disk for good."""
    directory = Path(directory)
    if fresh and directory.is_symlink() and not directory.exists():
        directory.unlink()  # (a link to none: not a directory to go on in; a file is the user's, refused by _lock)
    _refuse_a_checkpoint(directory)
    key = _lock(directory, walk=False)
    try:
        if fresh:
            _remove_walk_files(directory)
        yield directory
    finally:
        _unlock(key, walk=False)


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
