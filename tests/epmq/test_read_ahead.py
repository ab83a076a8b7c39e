"""epmq.read_ahead: reads in a background thread, taken in order, memory bounded, never a
deadlock where the walk wants a read the budget holds back or skips one it planned."""

import threading
import time

import pytest
import torch

from epmq.read_ahead import ReadAhead


class Reads:
    """Reads of 4-byte tensors that record the thread they ran on and the bytes held at once."""

    def __init__(self, ahead=None):
        self.ahead = ahead
        self.threads = {}
        self.most_held = 0
        self.lock = threading.Lock()

    def __call__(self, key):
        def read():
            self.threads[key] = threading.current_thread().name
            if self.ahead is not None:
                with self.lock:
                    self.most_held = max(self.most_held, self.ahead._held)
            time.sleep(0.002)
            return torch.full((1,), float(key), dtype=torch.float32)
        return read


def _eventually(condition, timeout=30.0):
    """Wait for the worker (a loaded machine may start it late); no timing is asserted."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the read-ahead worker did not get there"
        time.sleep(0.005)


def test_values_in_order_from_the_worker():
    with ReadAhead(1 << 20) as ahead:
        reads = Reads(ahead)
        ahead.plan((k, reads(k)) for k in range(6))
        _eventually(lambda: len(reads.threads) == 6)
        got = [ahead.take(k, reads(k)).item() for k in range(6)]
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(name.startswith("epmq-read-ahead") for name in reads.threads.values())
    assert ahead._held == 0


def test_budget_bounds_what_is_held():
    with ReadAhead(8) as ahead:  # two 4-byte tensors
        reads = Reads(ahead)
        ahead.plan((k, reads(k)) for k in range(10))
        time.sleep(0.1)
        assert ahead._held <= 8  # the worker waits for a take
        got = [ahead.take(k, reads(k)).item() for k in range(10)]
    assert got == [float(k) for k in range(10)]
    assert reads.most_held <= 8


def test_out_of_order_take_reads_in_line_without_waiting():
    with ReadAhead(4) as ahead:  # one tensor: the worker holds key 0 and waits
        reads = Reads(ahead)
        ahead.plan((k, reads(k)) for k in range(3))
        time.sleep(0.05)
        assert ahead.take(2, reads(2)).item() == 2.0  # not begun: read here
        assert reads.threads[2] == threading.current_thread().name
        assert ahead.take(0, reads(0)).item() == 0.0
        assert ahead.take(1, reads(1)).item() == 1.0
    assert ahead._held == 0


def test_dropped_reads_free_their_bytes():
    # a planned read the walk does not take (an MoE expert no token reached) must not hold the
    # budget: the reads after it still run in the background
    with ReadAhead(4) as ahead:
        reads = Reads(ahead)
        ahead.plan((k, reads(k)) for k in range(4))
        time.sleep(0.05)
        ahead.drop([0, 1])
        _eventually(lambda: 2 in reads.threads)
        assert ahead.take(2, reads(2)).item() == 2.0
        assert ahead.take(3, reads(3)).item() == 3.0
    assert reads.threads[2].startswith("epmq-read-ahead")
    assert 1 not in reads.threads or reads.threads[1].startswith("epmq-read-ahead")
    assert ahead._held == 0


def test_a_read_error_is_raised_by_its_take():
    def bad():
        raise ValueError("tensor 'w' has non-finite values")

    with ReadAhead(1 << 20) as ahead:
        ahead.plan([("ok", lambda: torch.ones(1)), ("bad", bad), ("after", lambda: torch.zeros(1))])
        _eventually(lambda: ahead._planned["bad"].state == "started")
        assert ahead.take("ok", lambda: torch.ones(1)).item() == 1.0
        with pytest.raises(ValueError, match="non-finite"):
            ahead.take("bad", bad)
        assert ahead.take("after", lambda: torch.zeros(1)).item() == 0.0
        ahead.plan([("dropped", bad)])
        time.sleep(0.05)
        ahead.drop(["dropped"])  # (not raised: the walk never wanted it)


def test_unplanned_and_zero_budget_read_in_line():
    with ReadAhead(0) as ahead:
        reads = Reads()
        ahead.plan([(0, reads(0))])  # a budget of 0 plans nothing
        assert ahead.take(0, reads(0)).item() == 0.0
        assert ahead.take(5, reads(5)).item() == 5.0
    assert set(reads.threads.values()) == {threading.current_thread().name}


def test_budget_counts_the_tensors_of_a_tuple():
    with ReadAhead(8) as ahead:
        ahead.plan((k, lambda: (torch.zeros(2), True)) for k in range(4))
        started = lambda: sum(e.state == "started" for e in ahead._planned.values())  # noqa: E731
        _eventually(lambda: ahead._held == 8 and started() == 1)  # (the worker waits)
        assert [ahead.take(k, lambda: (torch.zeros(2), True))[1] for k in range(4)] == [True] * 4


def test_close_skips_what_was_not_begun():
    ahead = ReadAhead(4)
    reads = Reads(ahead)
    ahead.plan((k, reads(k)) for k in range(5))
    time.sleep(0.05)
    ahead.close()  # the worker waits on the budget after key 0: it must stop, not hang
    assert set(reads.threads) <= {0, 1}


def test_a_key_planned_again_after_a_take_is_read_again():
    with ReadAhead(1 << 20) as ahead:
        reads = Reads(ahead)
        ahead.plan([("k", reads(1))])
        assert ahead.take("k", reads(1)).item() == 1.0
        ahead.plan([("k", reads(2))])
        assert ahead.take("k", reads(2)).item() == 2.0


def test_a_key_planned_again_before_the_worker_reached_it():
    """A key planned, taken in line (the worker held up), planned and taken again: each planned
    read is its own, so the worker skips both and holds no bytes for them; a third plan of the
    key is read in the background."""
    gate = threading.Event()
    with ReadAhead(8) as ahead:
        ahead.plan([("blocker", lambda: (gate.wait(), torch.zeros(1))[1])])
        for _ in range(2):
            ahead.plan([("k", lambda: torch.zeros(2))])
            assert ahead.take("k", lambda: torch.ones(2)).sum() == 2  # (read here)
        gate.set()
        ahead.take("blocker", lambda: torch.zeros(1))
        reads = Reads(ahead)
        ahead.plan([("k", reads(3))])
        _eventually(lambda: 3 in reads.threads)
        assert ahead.take("k", lambda: torch.ones(1)).item() == 3.0
        assert reads.threads[3].startswith("epmq-read-ahead") and ahead._held == 0
