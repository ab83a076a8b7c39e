"""Small helpers about modules and files, shared across the package."""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn


def without_autocast(fn: Callable) -> Callable:
    """``fn`` run with a caller's autocast turned off (a training or serving script's): the
    statistics and the solves are the math's, in their own dtypes. Under it, fp32 products of
    the statistics were cast to bf16 and their in-place sums failed on the mixed dtypes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


# Bytes of temporaries freed between trims of the heap (``release_freed_memory(freed=)``): what
# may stay resident, at most, for one trim per that many bytes
TRIM_EVERY = 32 << 20
_untrimmed = [0]  # (freed since the last trim)


def release_freed_memory(freed: Optional[int] = None) -> None:
    """Hand the pages of freed memory in the C heap back to the system (glibc's
    ``malloc_trim(0)``; nothing where the C library has none). glibc keeps freed blocks below one
    still in use in its heap: temporaries of many MB freed between the tensors a model keeps
    stayed resident, as if the model were that much larger. ``freed``: the bytes of temporaries
    just freed, the heap trimmed once they add up to ``TRIM_EVERY`` since the last trim: a trim
    scans the whole heap (tens of ms on a GB one), too slow after each of thousands of layers."""
    if freed is not None:
        _untrimmed[0] += freed
        if _untrimmed[0] < TRIM_EVERY:
            return
    _untrimmed[0] = 0
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def storage_key(t: torch.Tensor) -> tuple:
    """What names of one tensor share (a tied head and its embeddings in a state dict): its
    memory and layout."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


# the block lists of transformers' (and mergekit's) layer names: model.layers.{i}, transformer.h.{i},
# encoder.layer.{i}, block.{i} (T5), blocks.{i}, resblocks.{i}
BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block", "resblocks")


def layer_part(parts) -> Optional[int]:
    """Where in ``parts`` (a dotted name, split) its layer's number is: the first number after a
    block list (T5's block.{i}.layer.{j}: j is a sublayer); None where none is, a tensor outside the
    layers (mergekit's architectures name every layer by such a list, all else is read outside them).
    Not merely the first number: in model.vision.0.layers.3 that is the tower's index, and
    model.vision.1.embeddings is no layer's."""
    return next((i for i, part in enumerate(parts) if i and part.isdigit() and parts[i - 1] in BLOCK_LISTS), None)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); the CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def wrapped_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's wrapper (``_orig_mod``) and ``nn.DataParallel``'s or
    ``DistributedDataParallel``'s (``module``), which pass their arguments on: its forward names
    them, its config says what it is, and its ``save_pretrained`` is the one a user calls."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def rescaling_modules(model: nn.Module) -> dict:
    """``{module name: rescale_every}`` of the modules that divide some of their weights for inference
    (transformers' ``RwkvModel`` with ``rescale_every`` > 0 and more blocks than it; see
    ``rescaled_divisors``), whether they hold them divided now (``layers_are_rescaled``) or not."""
    found = {}
    for name, module in model.named_modules():
        every = getattr(getattr(module, "config", None), "rescale_every", 0)
        if (hasattr(module, "layers_are_rescaled") and isinstance(every, int) and every > 0
                and len(getattr(module, "blocks", ())) > every):
            found[name] = every
    return found


@torch.compiler.disable
def _rescale_eagerly(module, args):
    """RWKV's ``_rescale_layers`` run before its forward, outside any compilation: it divides its
    packed layers' weights in place (``weight.div_``, ``weight_multiplier``), which a compiled graph
    took as writes into dequantized copies: the division dropped, logits ~50% off. (A module-level
    function: a model holding the hook still pickles and deep-copies.)"""
    module._rescale_layers()


def rescale_outside_compilation(model: nn.Module) -> None:
    """Have each RWKV module of ``model`` (``rescaling_modules``) rescale its layers before its
    forward, outside torch.compile's graphs (``_rescale_eagerly``); its own call then finds them done."""
    for name in rescaling_modules(model):
        module = model.get_submodule(name)
        if _rescale_eagerly not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_rescale_eagerly)


def rescaled_divisors(model: nn.Module) -> dict:
    """``{weight name: divisor}`` of the weights RWKV (transformers' ``RwkvModel``, ``rescale_every``
    > 0) holds divided for inference (``layers_are_rescaled``): block i's ``attention.output`` and
    ``feed_forward.value`` by ``2 ** (i // rescale_every)``, as its ``_rescale_layers`` divides them."""
    divisors = {}
    for prefix, every in rescaling_modules(model).items():
        module = model.get_submodule(prefix)
        if module.layers_are_rescaled is not True:
            continue
        for i in range(every, len(module.blocks)):  # (the first rescale_every blocks: divided by 1)
            for rel in ("attention.output.weight", "feed_forward.value.weight"):
                divisors[f"{prefix}.blocks.{i}.{rel}".lstrip(".")] = 2 ** (i // every)
    return divisors


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter; float32 if it has none."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def read_json(path: Path, *, strict: bool = False):
    """The JSON value in ``path``, or None when it is missing or not JSON (a file written by an
    interrupted run). ``strict``: only a missing file counts as missing; other read errors (too
    many open files, an unreachable disk), which say nothing of the file, raise."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # (UnicodeDecodeError and JSONDecodeError included)
        return None
    except OSError:
        if strict:
            raise
        return None


def read_json_file(path: Path):
    """The JSON value in ``path``, a file that exists; a ValueError naming it where it is not
    JSON (a config whose checks would be skipped if it were taken as missing)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_json_file(path: Path) -> None:
    """A ValueError naming ``path`` where it is empty or not JSON (an interrupted copy or download)."""
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    read_json_file(path)


def changed_keys(before: dict, after: dict) -> list:
    """The keys whose values differ between two mappings (present in only one included)."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's counts as alive)."""
    if os.name == "nt":  # (there os.kill(pid, 0) would send CTRL_C_EVENT)
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
        code = ctypes.c_ulong()
        try:
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# the temporaries this process made: one of its pid that it did not make is a killed process's (a
# container restarted after a preemption runs the same command under the same pid)
_OWN_TEMPORARIES = set()


def own_temporary(path: Path) -> Path:
    """``path``, a temporary this process makes, kept from ``remove_stale_temporaries``."""
    _OWN_TEMPORARIES.add(os.path.abspath(path))
    return path


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete the temporaries ``.<name>.tmp-<pid>[-...]`` (files or directories) that a killed
    write to ``parent/name`` left behind; those of live processes are kept. ``name`` may be a
    glob pattern."""
    for path in Path(parent).glob(f".{name}.tmp-*"):
        pid = path.name.rpartition(".tmp-")[2].partition("-")[0]
        if not pid.isdigit():
            continue
        if (os.path.abspath(path) not in _OWN_TEMPORARIES if int(pid) == os.getpid()
                else not process_alive(int(pid))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def temporary_beside(path: Path, unique: bool = False) -> Path:
    """The temporary ``.<name>.tmp-<pid>`` beside ``path``, which ``remove_stale_temporaries``
    removes once its process is gone; ``unique``: with a random part too (several at once)."""
    suffix = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    return own_temporary(path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}"))


def write_atomic(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary beside ``path``, synced to disk, then renamed over it, the
    rename synced: ``path`` always holds the old file or the whole new one (a write stopped by
    Ctrl-C, a kill, a full disk or a power loss leaves no truncated file under its name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    tmp = temporary_beside(path)
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename is an entry of the directory, which is synced too: else a power loss may leave the old
    # file under the name (or none), the new one synced but unnamed
    if os.name != "nt":  # (where a directory cannot be opened to be synced)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that ``path`` always holds either the old or the new file."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str)))


def umask() -> int:
    """The process's umask (read by setting it, and set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path, metadata=None) -> None:
    """``safetensors.torch.save_file``, its I/O failures (a disk that fills up, a file system that
    turns read-only) raised as the ``OSError`` they are: safetensors reports them as its own
    ``SafetensorError``, which every caller that handles a disk's errors (the CLI's one-line
    message, a write's clean-up) missed, ending ``epmq merge``, ``quantize``, ``run`` and
    ``demo`` in a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        # "Error while serializing: I/O error: <strerror> (os error <errno>)" (safetensors >= 0.6);
        # before 0.6 the Rust error's Debug form, 'IoError(Os { code: <errno>, kind: <kind>,
        # message: "<strerror>" })', which 0.4 and 0.5 (transformers 4's) still print
        io = re.search(r"I/O error: (?P<strerror>.*) \(os error (?P<errno>\d+)\)", str(e)) or re.search(
            r'Os \{ code: (?P<errno>\d+), kind: \w+, message: "(?P<strerror>.*)" \}', str(e))
        if io is None:
            raise
        raise OSError(int(io.group("errno")), io.group("strerror"), str(path)) from e


@contextmanager
def loading_bars(enabled: bool):
    """transformers' own progress bars (loading weights, downloading) on or off: ``progress=False``
    and ``--quiet`` silence them too. Restored afterwards."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    # (each switch on its own: transformers' enable turns the hub's bars on too)
    was, hub_was = logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
        (hub.enable_progress_bars if hub_was else hub.disable_progress_bars)()
