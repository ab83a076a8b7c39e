"""Autotuned launch configurations, remembered on disk per GPU.

Autotuning at load time is the complaint users make most often about Triton inference kernels:
every new process pays for compiling and timing every candidate again. Here the winner for
each (kernel family, GPU, shape bucket) is written to a small JSON file, so a second process on
the same card reads it back and never times again.

Where: ``$EPMQ_CACHE_DIR/autotune/`` if ``EPMQ_CACHE_DIR`` is set, else
``~/.cache/epmq/autotune/``. One file per family, GPU name, Triton version, autotune
space and kernel code, e.g.
``w4a16__nvidia-h100-80gb-hbm3__triton-3.8.0__space-1a2b3c4d__code-5e6f7a8b.json``; changing the
space, upgrading Triton or changing the kernels' source (another epmq version: a config timed
and verified for other code is neither known fastest nor known right) therefore starts a fresh
file instead of reusing configs timed for other code. Inside, ``entries`` maps a shape-bucket key to a config dict.

Writes are atomic (temporary file, then ``os.replace``) and merge with what is on disk under a
lock of the directory (``fcntl``), so processes tuning at the same time keep one another's entries.
``EPMQ_AUTOTUNE=0`` turns timing off: cached configs are still used, misses take the family's
first valid config.
"""

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading

import torch
import triton
import triton.testing

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None


def cache_dir():
    root = os.environ.get("EPMQ_CACHE_DIR")
    if root:
        return os.path.join(os.path.expanduser(root), "autotune")
    return os.path.join(os.path.expanduser("~"), ".cache", "epmq", "autotune")


def autotune_enabled():
    return os.environ.get("EPMQ_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _slug(text):
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def space_id(space):
    """A short, stable hash of an autotune space (a list of config dicts)."""
    text = json.dumps(space, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


_CODE_ID = None


def code_id():
    """A short hash of this package's kernel sources (every ``epmq_kernels/*.py``), read once.

    Read as the package's resources, not as files of its folder: imported from a zip (an egg,
    a zipapp), where Triton still finds the kernels' source, there is no folder to list."""
    global _CODE_ID
    if _CODE_ID is None:
        from importlib.resources import files

        digest = hashlib.sha1()
        for entry in sorted(files(__package__).iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".py"):
                digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
        _CODE_ID = digest.hexdigest()[:8]
    return _CODE_ID


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class DiskCache:
    """Config per shape-bucket key for one kernel family on one GPU, backed by a JSON file."""

    def __init__(self, family, gpu_name, space):
        self.family = family
        self.gpu_name = gpu_name
        self.space = space_id(space)
        self.code = code_id()
        self.path = os.path.join(
            cache_dir(),
            f"{family}__{_slug(gpu_name)}__triton-{triton.__version__}__space-{self.space}__code-{self.code}.json",
        )
        self._entries = None
        self._lock = threading.Lock()

    def _read(self):
        """The file's entries; none from a file that is missing, damaged, of another space or
        GPU, or not of this layout (valid JSON of another shape included)."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if (not isinstance(data, dict) or data.get("space") != self.space or data.get("code") != self.code
                or data.get("gpu") != self.gpu_name or not isinstance(data.get("entries"), dict)):
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def get(self, key):
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries.get(key)

    def put(self, key, config):
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            self._entries[key] = config
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with _directory_lock(os.path.dirname(self.path)):
                    # (under the lock, what other processes wrote is read and kept)
                    merged = self._read()
                    merged.update(self._entries)
                    self._entries = merged
                    self._write(merged)
            except OSError:
                pass  # a read-only home is no reason to fail a matmul; the memory copy stays

    def _write(self, entries):
        data = {
            "family": self.family,
            "gpu": self.gpu_name,
            "triton": triton.__version__,
            "torch": torch.__version__,
            "space": self.space,
            "code": self.code,
            "entries": entries,
        }
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # (mkstemp's 0600 would hide a shared cache from its other users)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            tmp = None
        finally:
            if tmp is not None:  # (a failed write, whatever failed, leaves no temporary)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


@contextlib.contextmanager
def _directory_lock(path):
    """An exclusive lock between processes on the cache directory itself (``fcntl.flock`` of its
    descriptor: no lock file is left beside the caches; where there is no ``fcntl`` or the file
    system has no locks, none: writers may then lose one another's entries, never the file)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # (no locks on this file system, as NFS without its lock daemon: unlocked)
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (and with it the lock)


_caches = {}
# The timings of the latest tuning per (family, key) in this process: [(ms, config), ...], for
# benchmarks that report how the alternatives compared (empty when the key came from disk).
TIMINGS = {}
# Candidates that were timed but gave a wrong result (``tune``'s verify), per (family, key).
REJECTED = {}


def cache_for(family, device, space):
    """The (process-wide) DiskCache of a family on a device, in the current cache directory."""
    name = device_name(device)
    key = (family, name, space_id(space), cache_dir())
    if key not in _caches:
        _caches[key] = DiskCache(family, name, space)
    return _caches[key]


def tune(cache, key, candidates, run, warmup_ms=3, rep_ms=12, prepare=None, verify=None):
    """The config for ``key``: from the cache, else the fastest of ``candidates``.

    ``run(config)`` must launch the whole operation for one config (allocation, zeroing and
    epilogue included, so split-K pays for its extra launches). Candidates that fail to
    compile or launch (e.g. too much shared memory) are skipped. Nothing is timed while a CUDA
    graph is being captured or when ``EPMQ_AUTOTUNE=0``; then a miss takes the first candidate.
    ``prepare(candidates)``, if given, runs once before the timing (e.g. to compile every
    candidate in parallel); its failures are ignored (timing reports them per candidate).
    ``verify(config)``, if given, is asked of the fastest candidate, then of the next, until
    one passes: a config whose result is wrong on this GPU (a miscompile, an option that does
    not hold here) is never kept, however fast.
    """
    if not candidates:  # (else a bare IndexError, of candidates[0] or errors[0], named no kernel)
        raise ValueError(f"{cache.family} {key}: no candidate config to choose from (candidates is empty)")
    hit = cache.get(key)
    if hit is not None and hit in candidates:
        return hit
    if (not autotune_enabled() or len(candidates) == 1
            or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    if prepare is not None:
        try:
            prepare(candidates)
        except Exception:  # noqa: BLE001 (each candidate is tried again, and reported, below)
            pass
    timings, errors = [], []
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(config), warmup=warmup_ms, rep=rep_ms,
                                         return_mode="median")
        except Exception as error:  # noqa: BLE001 (out of resources: not a candidate)
            errors.append(error)
            continue
        timings.append((ms, config))
    if not timings:
        raise RuntimeError(f"no candidate config could run for {cache.family} {key}") from errors[0]
    TIMINGS[(cache.family, key)] = timings
    rejected = REJECTED[(cache.family, key)] = []
    best = None
    for _, config in sorted(timings, key=lambda t: t[0]):
        if verify is None or verify(config):
            best = config
            break
        rejected.append(config)
    if best is None:
        raise RuntimeError(f"every candidate config of {cache.family} {key} failed verification")
    cache.put(key, best)
    return best
