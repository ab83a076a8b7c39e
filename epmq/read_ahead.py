"""Reading the experts' tensors ahead of the walk that needs them: ``ReadAhead``.

E-PMQ reads every expert's weight of a linear once per walk, and a walk of a Llama-8B with 8
experts reads 8 x 16 GB. Read in line, each tensor stops the walk: the file read (from disk
where the page cache does not hold it) and, for a GPU walk, a copy from pageable memory, which
runs at a fraction of a pinned one's speed and blocks the host. A background thread reads the
tensors in the order the walk will take them, into pinned memory when they go to a GPU, so that
the reads overlap the calibration forwards and the solves of the linears before.

One worker, in order: the walk takes tensors in the order it planned them, so a later read is
never wanted before an earlier one. Memory is bounded by ``budget`` bytes of tensors read and
not yet taken (plus the one being read). A tensor the walk wants before the worker began it
is read by the walk itself (and skipped by the worker), so taking never waits on a read that
the budget holds back; a planned tensor the walk turns out not to need (an MoE expert that no
token of a task reached) is dropped, its bytes freed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Iterable

import torch


def _nbytes(value) -> int:
    """The bytes of the tensors in ``value`` (a tensor, or a tuple holding some)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(map(_nbytes, value)) if isinstance(value, tuple) else 0


class _Read:
    """One planned read: ``state`` goes from "planned" to "started" (by the worker) or
    "claimed" (by the walk, before the worker began it: it will not now)."""

    __slots__ = ("state", "future")

    def __init__(self):
        self.state = "planned"
        self.future = None


class ReadAhead:
    """Values of ``read()`` calls made ahead in one background thread (``plan``), taken in the
    same order (``take``)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epmq-read-ahead")
        self._lock = threading.Condition()
        self._held = 0  # bytes read and not yet taken or dropped
        self._planned: dict = {}  # key -> _Read (a key planned again after a take: a new one)
        self._closed = False

    def plan(self, reads: Iterable[tuple[Hashable, Callable[[], object]]]) -> None:
        """Read these ``(key, read)`` in the background, in this order (a key already planned
        keeps its place)."""
        if self.budget <= 0:
            return
        for key, read in reads:
            if key not in self._planned:
                entry = self._planned[key] = _Read()
                entry.future = self._pool.submit(self._run, entry, read)

    def _run(self, entry: _Read, read):
        with self._lock:
            while self._held >= self.budget and not self._closed and entry.state == "planned":
                self._lock.wait()
            if self._closed or entry.state != "planned":
                return None
            entry.state = "started"
        value = read()
        with self._lock:
            self._held += _nbytes(value)
        return value

    def _claim(self, key):
        """The future of ``key``'s planned read, or None where the worker had not begun it (it
        will not now)."""
        entry = self._planned.pop(key)
        with self._lock:
            if entry.state == "started":
                return entry.future
            entry.state = "claimed"
            self._lock.notify_all()
        return None

    def _release(self, value) -> None:
        with self._lock:
            self._held -= _nbytes(value)
            self._lock.notify_all()

    def take(self, key, read: Callable[[], object]):
        """The value of ``key``'s read: the planned one's (its error raised here, where the walk
        would have raised it), else ``read()`` now."""
        if key not in self._planned:
            return read()
        future = self._claim(key)
        if future is None:  # (not begun: read here, as the walk would have without a plan)
            return read()
        value = future.result()
        self._release(value)
        return value

    def drop(self, keys: Iterable[Hashable]) -> None:
        """Forget these planned reads (what was read is freed; errors are not raised)."""
        for key in keys:
            if key in self._planned:
                future = self._claim(key)
                if future is not None:
                    try:
                        self._release(future.result())
                    except Exception:
                        pass

    def close(self) -> None:
        """Stop: planned reads not begun are skipped, the one in progress is waited for."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._planned.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
