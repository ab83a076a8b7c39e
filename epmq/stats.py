"""Calibration statistics, accumulated batch by batch.

``HessianStats``: GPTQ's ``H = sum X^T X`` (rows of ``X`` are tokens).

``EPMQStats``: everything E-PMQ needs of one layer, task by task, whatever the number of
experts K. Persistent buffers:

    H_e = sum_k a_k H_k            [in, in]
    H_m = sum_k H_k                [in, in]   (or the merged Hessian the caller gives)
    G_e = sum_k a_k T_k X_k^T      [out, in]  (T_k = W_k X~_k - W_m X_k: the target residual)

plus one scratch ``H_k`` for the task being streamed, because the default ``a_k = 1 / tr(H_k)``
is known only once the task's last batch is in. When targets use the same inputs as the model
being quantized (the merged path), ``T_k X_k^T = (W_k - W_m) H_k`` is formed once at the end of
the task from the scratch, streaming the expert's weight once. Asymmetric targets (``x_expert``:
the expert path, or the full-precision merged path) add a scratch ``G_k [out, in]`` and, while
the task is open, ``W_k - W_m [out, in]``; an asymmetric anchor (``x_anchor``) adds
``G_m [out, in]``. The scalars ``c_e`` and ``c_m`` are the constants of the expert and anchor
terms, kept so that their values can be reported.

Layers that read the same inputs (q/k/v, gate/up) have the same Hessians:
``EPMQStats(W, inputs_of=other)`` reads ``other``'s ``H_k``, ``H_e`` and ``H_m`` instead of
accumulating them again, and keeps only its own ``G_e`` (and scratch ``G_k``, ``G_m``).

Experts given as ``LowRankExpert(W_0, U, V)`` (``W_k = W_0 + U V``, a LoRA), all of one ``W_0``,
cost one residual product between them: ``(W_0 - W_m) H_e``, owed until the statistics are read
(it needs every task's ``H_k`` in ``H_e``), plus ``a_k U_k (V_k H_k)`` per task.

With ``side_stream=True`` on a GPU (the Triton backend), the residual products
``(W_k - W_m) H_k`` run on a side stream (RESIDUALS_ON_SIDE_STREAM): nothing but ``G_e`` and
``c_e`` reads them, so the current stream goes on with the next task's calibration and, once
every task is in, with the factorization of ``H`` (by its FLOPs mostly idle GPU) while they
run. ``G_e``, ``c_e`` and ``finalize`` make the reading stream wait for them (``join``).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional

import torch

from epmq_kernels._runtime import ieee_fp32_matmul, ieee_mm, version
from epmq_kernels.expert_residual import (
    DEFAULT_RESIDUAL_PRECISION,
    FOLD_ARITY,
    accumulate_residual,
    accumulate_residual_on_side,
    accumulate_xxt,
    check_residual_precision,
    fold_hessians,
)
from epmq_kernels.grid import is_flag, is_integer

from ._util import without_autocast
from .checks import all_finite, check_experts, check_hessian, check_weight

# E-PMQ's residual products on the side stream (see the module's docstring); EPMQ_SIDE_STREAM=0
# keeps them on the current stream (benchmarks/bench_solver.py times both).
RESIDUALS_ON_SIDE_STREAM = os.environ.get("EPMQ_SIDE_STREAM", "1") != "0"


def _tokens(x: torch.Tensor, d_in: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape[-1] != d_in:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must have last dimension {d_in}, got {shape}")
    # (integer or bool inputs, token ids for activations, were summed as numbers and a complex
    # one's imaginary part dropped, silently: the statistics are of real activations)
    if not x.is_floating_point():
        raise ValueError(f"{what} must be real floating point (activations), got {x.dtype}")
    X = x.reshape(-1, d_in)
    if not all_finite(X):
        raise ValueError(f"{what} has non-finite values (NaN or inf)")
    return X


class HessianStats:
    """Running ``H = sum X^T X`` of a layer's inputs."""

    def __init__(self, d_in: int, *, device=None, dtype=torch.float32, backend: str = "torch"):
        if not is_integer(d_in) or d_in <= 0:  # (numpy's too)
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        d_in = int(d_in)
        if dtype not in (torch.float32, torch.float64):
            # (float16 lost each x^2 below diag H's spacing and overflowed at 65504; integers
            # truncated every product: as EPMQStats's accumulators)
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (H's accumulator), got {dtype}")
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        self.H = torch.zeros(d_in, d_in, device=device, dtype=dtype)
        self.n_tokens = 0
        self.backend = backend

    @torch.no_grad()  # (statistics of values: no autograd graph of each batch kept alive)
    @without_autocast
    def add_batch(self, x: torch.Tensor, what: str = "calibration input") -> None:
        """``what``: the input's name in errors (the walker names the task and the layer)."""
        X = _tokens(x, self.H.shape[0], what)
        accumulate_xxt(self.H, X.to(self.H.device), backend=self.backend)
        self.n_tokens += X.shape[0]


def _runs(n: int, size: int, alone) -> list:
    """``0 .. n-1`` cut into runs of consecutive indices, at most ``size`` long, each index
    ``k`` with ``alone[k]`` in a run of its own."""
    runs = []
    for k in range(n):
        if runs and len(runs[-1]) < size and not alone[k] and not alone[runs[-1][-1]]:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are one tensor, or equal ones (two adapters' reads of one base weight)."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device))))


class LowRankExpert:
    """An expert that is the base weight plus a low-rank update, ``W_k = W_0 + U V`` (a LoRA:
    ``U = s B``, ``V = A``), given to E-PMQ in that form instead of as the dense ``W_k``.

    ``W_0 [out, in]``, ``U [out, r]``, ``V [r, in]``: floating point, any dtypes and devices
    (the update is formed in the statistics' dtype; ``dense()`` forms ``W_k`` in fp32). Where
    every expert of a layer is such an update of one ``W_0``, E-PMQ's residual
    ``sum_k a_k (W_k - W_m) H_k`` is taken as

        (W_0 - W_m) H_e  +  sum_k a_k U_k (V_k H_k)          (H_e = sum_k a_k H_k)

    one product of the weight's size instead of one per expert, plus products of the ranks'
    size; the same sum, exactly, in exact arithmetic (``EPMQStats``). The statistics keep ``W_0``
    until they are read (the product waits for ``H_e``): do not write to it before."""

    def __init__(self, W_0: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
        check_weight(W_0, "W_0 of a low-rank expert", values=False)
        check_weight(U, "U of a low-rank expert", values=False)
        check_weight(V, "V of a low-rank expert", values=False)
        if U.shape[0] != W_0.shape[0] or V.shape[1] != W_0.shape[1] or U.shape[1] != V.shape[0]:
            raise ValueError(f"a low-rank expert W_0 + U V needs U [out, r] and V [r, in] for W_0 "
                             f"{tuple(W_0.shape)}, got U {tuple(U.shape)} and V {tuple(V.shape)}")
        self.W_0, self.U, self.V = W_0, U, V

    @property
    def shape(self):
        return self.W_0.shape

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``W_0 + U V`` in ``dtype`` (on ``device``, default ``W_0``'s)."""
        device = self.W_0.device if device is None else device
        W = self.W_0.to(device=device, dtype=dtype, copy=True)
        with ieee_fp32_matmul():  # (whatever the caller set: TF32 is ~5e-4 off U V, what E-PMQ's residual is of)
            return W.addmm_(self.U.to(device=device, dtype=dtype), self.V.to(device=device, dtype=dtype))

    def check_values(self, name: str, parts=("W_0", "U", "V")) -> None:
        """A clear error where one of ``parts`` has a NaN or inf."""
        for part in parts:
            if not all_finite(getattr(self, part)):
                raise ValueError(f"{part} of the low-rank expert {name} has non-finite values (NaN or inf)")

    def __repr__(self):
        return f"LowRankExpert({tuple(self.W_0.shape)}, rank {self.rank})"


class _Task:
    def __init__(self, W_expert, weight, name, H, lead=None):
        self.W = W_expert
        self.weight = weight
        self.name = name
        self.H = H
        self.lead = lead  # the task open at the layer whose inputs (H_k) these are, if any
        self.G = None  # scratch for asymmetric targets
        # W_k - W_m in the statistics' dtype, for asymmetric targets: formed at the task's first
        # batch, not at each (at 4096 x 4096 in float64 it cost as much as the batch's products)
        self.D = None
        self.c = 0.0
        self.n_tokens = 0
        # the batch's inputs, checked and converted: [(tensor, its version, converted)], for the
        # layers that share them (``left`` of them still to take it)
        self.shared = None
        self.left = 0


class EPMQStats:
    """E-PMQ statistics of one layer with merged weight ``W_merged[out, in]``.

    ``residual_precision``: the least accurate fp32 product allowed for the Triton residual
    kernel (``backend="triton"``, fp32 statistics): ``"bf16x3"`` (the default: three bf16
    tensor-core products of split operands, ~2^-16 of each term, whose effect on E-PMQ's codes
    and objective is within IEEE fp32's own), ``"tf32x3"`` (three TF32 products, IEEE fp32's
    accuracy class), ``"ieee"`` (CUDA-core FMA only) or ``"tf32"`` (one TF32 product: operands
    keep 10 mantissa bits; ``benchmarks/residual_precision_study.py`` measures each one's effect
    on E-PMQ). The autotuner
    times every implementation of that precision or a more accurate one and keeps the fastest
    (``epmq_kernels.expert_residual.AT_LEAST``), so the default is never slower than "ieee";
    ``benchmarks/bench_solver.py`` times all four. Unless "ieee", E-PMQ's other large fp32
    products (``R = G H~^{-1}``, the anchor term) run as the fastest product on the GPU at
    least as accurate as the residual's, never below bf16x3 (``epmq.quant._fp32_floor``;
    ``epmq_kernels._runtime.fp32_mm``, timed once per GPU). The torch backend
    and fp64 statistics always multiply in their own precision.

    ``side_stream``: on a GPU with the Triton backend, run the residual products on a side
    stream (see the module's docstring; off where RESIDUALS_ON_SIDE_STREAM is). They read the
    expert weights, Hessians and ``W_merged`` the caller gives after the call that gave them has
    returned: the caller promises not to write to those tensors until the statistics are read
    (``G_e``, ``c_e``, ``finalize``, ``quant.epmq_from_stats``), as ``quant.epmq`` and the model
    walker do. Off (the default), the products run on the current stream, in its order.
    """

    def __init__(
        self,
        W_merged: torch.Tensor,
        *,
        merged_hessian: Optional[torch.Tensor] = None,
        dtype=torch.float32,
        backend: str = "torch",
        residual_precision: str = DEFAULT_RESIDUAL_PRECISION,
        inputs_of: Optional["EPMQStats"] = None,
        side_stream: bool = False,
    ):
        check_residual_precision(residual_precision, "residual_precision")
        check_weight(W_merged, "W_merged")
        if dtype not in (torch.float32, torch.float64):
            # (float16's range: a task's tr(H_k) past 65504, a few thousand tokens, overflowed)
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (the statistics' "
                             f"accumulators), got {dtype}")
        # (as HessianStats: a misspelt backend was taken until the first batch or fold, a task
        # half begun; side_stream='no' from a YAML is truthy)
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        if not is_flag(side_stream):
            raise ValueError(f"side_stream must be True or False, got {side_stream!r}")
        if inputs_of is not None and not isinstance(inputs_of, EPMQStats):
            raise TypeError(f"inputs_of must be the EPMQStats of the layer whose inputs this one shares, "
                            f"got {type(inputs_of).__name__}")
        self.W_merged = W_merged
        d_out, d_in = W_merged.shape
        kw = dict(device=W_merged.device, dtype=dtype)
        self.dtype = dtype
        self.backend = backend
        self.residual_precision = residual_precision
        self.inputs_of = inputs_of
        if inputs_of is not None:
            # the Hessians are the other layer's: it accumulates them, this layer only reads them
            if inputs_of.inputs_of is not None:
                inputs_of = self.inputs_of = inputs_of.inputs_of
            if merged_hessian is not None:
                raise ValueError("a layer that shares another's inputs shares its merged Hessian: "
                                 "give merged_hessian to that layer")
            theirs = (inputs_of.W_merged.shape[1], inputs_of.H_e.device, inputs_of.dtype)
            if theirs != (d_in, W_merged.device, dtype):
                raise ValueError(
                    f"inputs_of: that layer's statistics are (d_in, device, dtype) = {theirs}, "
                    f"this one's {(d_in, W_merged.device, dtype)}"
                )
            self.H_e, self.H_m, self.own_H_m = inputs_of.H_e, inputs_of.H_m, inputs_of.own_H_m
            inputs_of._sharers += 1
        else:
            self.H_e = torch.zeros(d_in, d_in, **kw)
            self.own_H_m = merged_hessian is None
            if merged_hessian is None:
                self.H_m = torch.zeros(d_in, d_in, **kw)
            else:
                check_hessian(merged_hessian, d_in, "merged_hessian")
                self.H_m = merged_hessian.to(**kw)
        self._G_e = torch.zeros(d_out, d_in, **kw)
        self._sharers = 0  # layers whose inputs_of these statistics are
        self.side_stream = bool(side_stream)
        self._side_done = None  # (device, event) of the last residual product on the side stream
        self.G_m = None
        self._c_e = 0.0
        self._c_e_unread = []  # (a_k, tr(D_k H_k D_k^T) as a device scalar), read at c_e
        self._c_m = 0.0  # (a device scalar once a batch has added to it, read at c_m)
        self.task_weights: list[float] = []
        self.task_names: list[str] = []
        self.empty_tasks: list[str] = []  # streamed tasks whose inputs here were all zero
        # tokens of each streamed task ended here: a layer that shares another's inputs must have
        # seen the same ones (its G_k is formed from that layer's H_k, see end_task and finalize)
        self.task_tokens: list[int] = []
        self._task: Optional[_Task] = None
        self._W_m_cast = None  # W_merged in dtype, for asymmetric targets and anchors (_W_m)
        # Low-rank experts (LowRankExpert) of one W_0: that W_0 while every task so far is one;
        # the product (W_0 - W_m) H_k of those folded in is owed, as one (W_0 - W_m) H_e, until
        # the statistics are read (_take_owed)
        self._base: Optional[torch.Tensor] = None
        # (tasks whose residual was taken as W_0 + U V, reported; while _base is set, those whose
        # product is owed: no such task comes once it is taken)
        self.low_rank_tasks = 0
        self._dense_only = False  # a task of another kind came: every later one is taken dense
        self._H_e_on_side = False  # the side stream may still read H_e (the owed product)

    def __copy__(self):
        """A shallow copy: it shares these statistics' tensors (``H_e``, ``G_e``), as any shallow
        copy does, and keeps its own constant ``c_e``. A product owed (low-rank experts) is taken
        first: taken later by the copy, it would read an ``H_e`` these statistics go on folding
        tasks into (and every later task is taken dense)."""
        self._take_owed()
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    @property
    def G_e(self) -> torch.Tensor:
        """``sum_k a_k (W_k - W_m) H_k`` (plus the asymmetric targets' terms) so far. (Read before
        ``finalize``, it takes the low-rank experts' owed product, and the later tasks, the open
        one too, are taken dense: see ``_take_owed``.)"""
        self._take_owed()
        self.join()
        return self._G_e

    @G_e.setter
    def G_e(self, value):
        self._take_owed()
        self.join()
        self._G_e = value

    def join(self):
        """Make the current stream wait for this layer's residual products on the side stream
        (``side_stream``): every read of ``G_e`` or ``c_e`` comes after it (``G_e``, ``c_e`` and
        ``finalize`` call it, on whichever stream reads). A wait on the device, not the host. (Not
        inside a CUDA graph's capture for statistics accumulated outside it: a captured stream
        cannot wait for an event recorded outside the capture.)"""
        if self._side_done is not None:  # (the device is the event's: G_e may have been moved)
            device, event = self._side_done
            torch.cuda.current_stream(device).wait_event(event)

    @property
    def c_e(self) -> float:
        """The expert term's constant ``sum_k a_k tr(T_k T_k^T)`` (EPMQ_MATH.md)."""
        self._take_owed()
        if self._c_e_unread:
            # (the traces, made on the side stream, read after the join; float() waits for the
            # host, so they are freed only once that read is done)
            self.join()
            # (on G_e's device: a copy moved to the CPU adds its own products' traces there)
            device = self._G_e.device
            self._c_e += float(torch.stack([a * trace.to(device) for a, trace in self._c_e_unread]).sum())
            self._c_e_unread = []
        return self._c_e

    @property
    def c_m(self) -> float:
        """The asymmetric anchor's constant ``tr(T_m T_m^T)`` (EPMQ_MATH.md)."""
        return float(self._c_m)

    @property
    def _tasks_done(self) -> int:
        return len(self.task_weights) + len(self.empty_tasks)

    # ----------------------------------------------------------------- checks

    def _check_expert(self, W_expert, name, values=True):
        if not isinstance(W_expert, LowRankExpert):  # (its parts' shapes checked when made)
            check_weight(W_expert, f"expert weight of {name}", values=values)
        elif values:
            W_expert.check_values(name)
        if W_expert.shape != self.W_merged.shape:
            raise ValueError(
                f"expert weight of {name} has shape {tuple(W_expert.shape)}, "
                f"the merged weight {tuple(self.W_merged.shape)}"
            )

    def _task_weight(self, weight, trace, name):
        if trace <= 0:
            raise ValueError(f"{name} has no calibration data (tr(H_k) = 0)")
        if weight is None:
            return 1.0 / trace
        return self._given_weight(weight, name)

    @staticmethod
    def _given_weight(weight, name) -> float:
        if isinstance(weight, (bool, str)):  # (float() takes both: True as 1, "2" as 2)
            raise ValueError(f"task weight of {name} must be a number, got {weight!r}")
        weight = float(weight)
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"task weight of {name} must be finite and >= 0, got {weight}")
        return weight

    # ----------------------------------------------------------------- whole statistics

    @without_autocast
    @torch.no_grad()
    def add_task(self, W_expert, H_expert, weight: Optional[float] = None, name: Optional[str] = None):
        """Fold in task k from its complete ``H_k`` (merged-path targets)."""
        self.add_tasks([W_expert], [H_expert], None if weight is None else [weight],
                       None if name is None else [name])

    @torch.no_grad()
    @without_autocast
    def add_tasks(self, expert_weights, expert_hessians, weights=None, names=None):
        """Fold in several tasks from their complete ``H_k``, as :meth:`add_task` one by one
        would (the same errors, in the same order), with every expert's checks read back in one
        transfer and nothing folded in until all of them pass (on a GPU each read waits for the
        device's queue: two per expert left it idle while the host checked and launched the
        next one)."""
        if self.inputs_of is not None:
            raise RuntimeError("add_task() gives a task's whole Hessian; statistics that share "
                               "another layer's inputs stream them (begin_task / add_batch)")
        if self._task is not None:
            raise RuntimeError(f"task {self._task.name} is still open: call end_task() first")
        expert_weights, expert_hessians = list(expert_weights), list(expert_hessians)
        K = len(expert_weights)
        weights = [None] * K if weights is None else list(weights)
        names = [None] * K if names is None else list(names)
        for what, given in (("expert Hessians", expert_hessians), ("task weights", weights),
                            ("names", names)):
            if len(given) != K:
                raise ValueError(f"{K} expert weights but {len(given)} {what}")
        first = len(self.task_weights)
        names = [n or f"task {first + k}" for k, n in enumerate(names)]
        # (each task weight checked right after its expert, as add_task would, before any fold;
        # a low-rank expert's W_0 where a weight goes, its factors right after)
        def then(k, trace):
            if isinstance(expert_weights[k], LowRankExpert):
                expert_weights[k].check_values(names[k], ("U", "V"))
            self._task_weight(weights[k], trace, names[k])

        traces = check_experts([W.W_0 if isinstance(W, LowRankExpert) else W for W in expert_weights],
                               expert_hessians, self.W_merged.shape, names, then=then)
        low_rank = self._low_rank_route(expert_weights)
        # Up to FOLD_ARITY experts at a time: their Hessians in one pass over H_e and H_m, then
        # their residuals. A Hessian that must be converted (another device or dtype) is folded
        # alone: one converted copy alive at a time (d_in^2 each: 0.8 GB in fp32 at 14336), or,
        # with residuals on the side stream, at most _runtime.SIDE_HELD_MAX waiting for theirs.
        def copied(H):
            return H.device != self.H_e.device or H.dtype != self.dtype

        for group in _runs(K, FOLD_ARITY, alone=[copied(H) for H in expert_hessians]):
            H_ks, a_s = [], []
            for j in group:
                H_k = expert_hessians[j].to(device=self.H_e.device, dtype=self.dtype)
                # (the trace as read, unless the conversion changed the dtype it is summed in)
                trace = traces[j] if H_k.dtype == expert_hessians[j].dtype else None
                H_ks.append(H_k)
                a_s.append(self._weight_of(H_k, weights[j], names[j], trace))
            self._fold_hessians(H_ks, a_s)
            for j, H_k, a in zip(group, H_ks, a_s):
                W = expert_weights[j]
                if isinstance(W, LowRankExpert) and not low_rank:
                    W = W.dense(self._G_e.device, self.dtype)  # (one at a time)
                self._fold(W, H_k, None, 0.0, a, names[j], holds=H_k is not expert_hessians[j])
            del H_ks

    def _weight_of(self, H_k, weight, name, trace=None):
        """``a_k`` of a task (``trace``: ``tr(H_k)`` where the caller has read it already)."""
        if trace is None:
            trace = float(torch.diagonal(H_k).sum())
        if not math.isfinite(trace):
            # (else a_k = 1 / inf = 0: the task silently dropped, and 0 * inf a NaN in H_e; here,
            # not in _task_weight: add_tasks checks weights early on traces of the Hessians as
            # given, which may be float16, whose traces are taken again once converted)
            raise ValueError(f"{name}: tr(H_k) is {trace} in the statistics' dtype {self.dtype}: its "
                             f"inputs' squares overflowed it; accumulate in torch.float64 or scale them")
        return self._task_weight(weight, trace, name)

    def _fold_hessians(self, H_ks, a_s):
        if self._H_e_on_side:  # (tasks added after finalize: not over the owed product's read)
            self.join()
            self._H_e_on_side = False
        if self.inputs_of is None:  # (else the layer whose inputs these are adds H_k)
            fold_hessians(self.H_e, self.H_m if self.own_H_m else None, H_ks, a_s,
                          backend=self.backend)

    def _on_side(self) -> bool:
        if not (self.side_stream and RESIDUALS_ON_SIDE_STREAM and self.backend == "triton"
                and self._G_e.is_cuda):
            return False
        with torch.cuda.device(self._G_e.device):
            return not torch.cuda.is_current_stream_capturing()

    def _low_rank_route(self, experts) -> bool:
        """Whether the next tasks, of the expert weights ``experts``, take the low-rank route:
        each a ``LowRankExpert`` of the ``W_0`` of every task before them (then ``H_e`` will hold
        exactly the tasks whose ``(W_0 - W_m) H_k`` the owed product stands for). Where not, the
        owed product is taken now, and every later task is taken dense."""
        if not experts:
            return False
        if not self._dense_only and all(isinstance(e, LowRankExpert) for e in experts):
            base = self._base if self._base is not None else (
                experts[0].W_0 if self._tasks_done == 0 else None)
            if base is not None and all(_same_tensor(e.W_0, base) for e in experts):
                self._base = base
                return True
        self._take_owed()  # (before the next tasks' Hessians go into H_e, which it reads)
        self._dense_only = True
        return False

    @without_autocast  # (run by the reads G_e, c_e and copy too: a caller's autocast made it bf16)
    def _take_owed(self, side: bool = False):
        """Take the low-rank experts' owed product ``(W_0 - W_m) H_e`` (see LowRankExpert) into
        ``G_e``, and ``tr((W_0 - W_m) H_e (W_0 - W_m)^T)`` into ``c_e``; from then on every task
        is taken dense, the open one too. ``H_e`` must hold exactly the tasks folded in here:
        with another layer's inputs, that layer must have ended as many tasks. ``side``: on the
        side stream where the residuals run there (finalize: no task writes H_e again)."""
        if self._base is None:
            return
        leader = self.inputs_of
        if self.low_rank_tasks and leader is not None and leader._tasks_done != self._tasks_done:
            raise RuntimeError(
                f"this layer's statistics read, or a task of another kind begun, where it has ended "
                f"{self._tasks_done} tasks and the layer whose inputs (H_e) it shares {leader._tasks_done}: "
                f"do it where both have ended the same tasks, or give the low-rank experts dense "
                f"(LowRankExpert.dense())")
        base = self._base
        W_0 = base.to(device=self._G_e.device)
        # (nothing to take where none is folded yet, or where the merge left the base as it was,
        # W_m = W_0: a layer no adapter updates)
        if self.low_rank_tasks and not _same_tensor(W_0, self.W_merged):
            self.join()  # (G_e: after any product already on the side stream)
            args = (self._G_e, W_0, self.W_merged, self.H_e, 1.0)
            # (on the side stream only for an H_e of its own: the layer whose inputs it shares
            # would not know to wait for it before folding another task in)
            if side and leader is None and self._on_side():
                trace, event = accumulate_residual_on_side(
                    *args, input_precision=self.residual_precision, holds=W_0 is not base)
                self._side_done, self._H_e_on_side = (self._G_e.device, event), True
            else:
                trace = accumulate_residual(*args, backend=self.backend,
                                            input_precision=self.residual_precision, read=False)
            self._c_e_unread = self._c_e_unread + [(1.0, trace)]
        # (owed until taken: a product that ran out of memory is owed by the CPU copy the walker
        # retries on)
        self._base, self._dense_only = None, True
        task = self._task
        if task is not None and isinstance(task.W, LowRankExpert):
            task.W = task.W.dense(self._G_e.device, self.dtype)

    def _fold_low_rank(self, expert, H_k, a):
        """Task k's share for ``W_k = W_0 + U V``: ``a U (V H_k)`` now; ``a (W_0 - W_m) H_k`` is in
        the owed product. Of ``tr(D H_k D^T)`` (``D = P + U V``, ``P = W_0 - W_m``) the terms
        ``2 <U^T P, V H_k> + <U^T U, V H_k V^T>``; ``tr(P H_k P^T)`` is the owed product's. The
        products in IEEE arithmetic of the statistics' dtype (they are of the ranks' size)."""
        device, dtype = self._G_e.device, self.dtype
        U, V = expert.U.to(device=device, dtype=dtype), expert.V.to(device=device, dtype=dtype)
        C = ieee_mm(V, H_k)  # [r, in]
        P = expert.W_0.to(device=device, dtype=dtype) - self.W_merged.to(dtype)
        trace = (2 * (ieee_mm(U.T, P) * C).sum(dtype=torch.float64)
                 + (ieee_mm(U.T, U) * ieee_mm(C, V.T)).sum(dtype=torch.float64))
        del P
        self.join()  # (G_e: after any product already on the side stream)
        with ieee_fp32_matmul():  # (whatever the caller set for TF32)
            self._G_e.addmm_(U, C, alpha=a)
        self._c_e_unread = self._c_e_unread + [(a, trace)]
        self.low_rank_tasks += 1

    def _fold(self, W_expert, H_k, G_k, c_k, a, name, *, holds=True):
        """Task k's share of the targets, with weight ``a`` (its Hessian is folded in already).
        ``holds``: ``H_k`` is dropped by the caller afterwards (not the caller's own tensor)."""
        if G_k is None and isinstance(W_expert, LowRankExpert):
            self._fold_low_rank(W_expert, H_k, a)
        elif G_k is None:
            W_k = W_expert.to(device=self._G_e.device)
            args = (self._G_e, W_k, self.W_merged, H_k, a)
            if self._on_side():
                trace, event = accumulate_residual_on_side(
                    *args, input_precision=self.residual_precision, holds=holds or W_k is not W_expert)
                self._side_done = (self._G_e.device, event)
            else:
                self.join()  # (G_e: after any product already on the side stream)
                trace = accumulate_residual(*args, backend=self.backend,
                                            input_precision=self.residual_precision, read=False)
            # (tr(D H_k D^T) stays on the device until c_e is read: no wait per expert)
            # (a new list, not an append: a shallow copy of these statistics keeps its own terms)
            self._c_e_unread = self._c_e_unread + [(a, trace)]
        else:
            self.join()  # (G_e: after the residuals still on the side stream)
            self._G_e.add_(G_k, alpha=a)
            self._c_e += a * c_k
        self.task_weights.append(a)
        self.task_names.append(name)

    # ----------------------------------------------------------------- streaming

    @without_autocast
    @torch.no_grad()
    def begin_task(self, W_expert, weight: Optional[float] = None, name: Optional[str] = None, *,
                   values_checked: bool = False):
        """Open task k with its expert's weight. ``values_checked``: the caller has checked the
        weight's values already (the model walker's expert reader does), so only its shape is
        (on a GPU each check of values is a pass over the weight and a wait for the device)."""
        if self._task is not None:
            raise RuntimeError(f"task {self._task.name} is still open: call end_task() first")
        name = name or f"task {self._tasks_done}"
        low_rank = isinstance(W_expert, LowRankExpert)
        self._check_expert(W_expert, name, values=not values_checked)
        if weight is not None:  # (now, not at end_task: after every batch of the task was streamed)
            self._given_weight(weight, name)
        leader = self.inputs_of
        if leader is not None and (leader._task is None or leader._tasks_done != self._tasks_done):
            raise RuntimeError(f"{name}: begin the task on the layer whose inputs these are "
                               f"first (its Hessian H_k is this layer's)")
        # (after the check above: a product owed is taken with H_e holding the earlier tasks)
        if self._low_rank_route([W_expert]):
            W = W_expert
        else:
            W = W_expert.dense(self._G_e.device, self.dtype) if low_rank else W_expert.to(self._G_e.device)
        if leader is None:
            d_in = self.W_merged.shape[1]
            H_k = torch.zeros(d_in, d_in, device=self._G_e.device, dtype=self.dtype)
        else:
            H_k = leader._task.H
        self._task = _Task(W, weight, name, H_k, lead=None if leader is None else leader._task)

    @torch.no_grad()  # (statistics of values: no autograd graph of each batch kept alive)
    @without_autocast
    def add_batch(self, x, x_expert=None, x_anchor=None):
        """One batch of the open task's inputs ``x`` at this layer, in the model being quantized.

        ``x_expert``: the inputs the target sees instead (the expert's own input on the expert
        path, the full-precision merged model's on the fp path): targets ``W_k x_expert``.
        ``x_anchor``: the inputs for the anchor's target ``W_m x_anchor`` (default ``x``).
        """
        task = self._task
        if task is None:
            raise RuntimeError("add_batch() outside a task: call begin_task() first")
        d_in = self.W_merged.shape[1]
        X = self._taken(x, lambda: _tokens(x, d_in, f"calibration input of {task.name}").to(self.H_e.device,
                                                                                           self.dtype))
        if task.n_tokens and (x_expert is None) != (task.G is None):
            raise ValueError(f"{task.name}: give x_expert for every batch of a task or for none")
        # (every input is checked before any statistic takes the batch: a refused call adds
        # nothing, so the same batch given again, put right, is counted once)
        if x_expert is not None:
            X_t = self._taken(x_expert, lambda: self._target_tokens(x_expert, X, f"x_expert of {task.name}"))
            if X_t.shape != X.shape:  # (taken from the leading layer, given other inputs here)
                raise ValueError(f"x_expert of {task.name} has {X_t.shape[0]} tokens, the inputs {X.shape[0]}")
        if x_anchor is not None:
            if not self.own_H_m:
                raise ValueError("x_anchor needs the merged Hessian accumulated here, not given")
            if self.G_m is None and (self.task_weights or task.n_tokens):
                raise ValueError("give x_anchor for every batch of every task or for none")
            # (the fp path's anchor sees the targets' own inputs: one W_m (X~ - X) serves both)
            X_a = X_t if x_anchor is x_expert else self._target_tokens(x_anchor, X, "x_anchor")
        elif self.G_m is not None:
            raise ValueError("give x_anchor for every batch of every task or for none")
        # Layers on the same inputs (q, k, v) are given the same tensors: each checked them (on a
        # GPU a reduction and a wait for the device) and converted them, once per layer. Those
        # after the first take its copies, held until the last of them has.
        if self.inputs_of is None and self._sharers:
            given = [(x, X), (x_expert, None if x_expert is None else X_t)]
            task.shared = [(t, version(t), converted) for t, converted in given if t is not None]
            task.left = self._sharers
        elif task.lead is not None and task.lead.shared is not None:
            task.lead.left -= 1
            if task.lead.left <= 0:
                task.lead.shared = None
        if self.inputs_of is None:
            accumulate_xxt(task.H, X, backend=self.backend)
        task.n_tokens += X.shape[0]
        if x_expert is not None or x_anchor is not None:  # (the merged path needs no W_m here)
            W_m = self._W_m()
        with ieee_fp32_matmul():  # (whatever the caller set for TF32, as every product of the statistics)
            T_m = None if x_anchor is None else (X_a - X) @ W_m.T
            if x_expert is not None:
                if isinstance(task.W, LowRankExpert):
                    # (asymmetric targets need the dense W_k, and the owed product must not count
                    # this task's H_k: taken now, H_e without it; the task goes on dense)
                    self._take_owed()
                # T = W_k x~ - W_m x as (W_k - W_m) x~ + W_m (x~ - x): both small where the expert is
                # near the merge and x~ near x, which the difference of the two products rounded away
                # (fp32: its error ~6e-8 |W_m x|, 1e-3 of G_e where they differ by 1e-4)
                T = T_m if x_anchor is x_expert else (X_t - X) @ W_m.T
                if task.W is not self.W_merged:  # (the merge as its own target, GPTQ's fp-path control:
                    # W_k - W_m is zero, and so is its product)
                    if task.D is None:
                        task.D = task.W.to(self.dtype) - W_m
                    T = X_t @ task.D.T + T
                if task.G is None:
                    task.G = torch.zeros_like(self._G_e)
                task.G.addmm_(T.T, X)
                # (summed on the device, read with the task's trace at end_task: no wait per batch)
                task.c = task.c + T.pow(2).sum().double()
            if x_anchor is not None:
                if self.G_m is None:
                    self.G_m = torch.zeros_like(self._G_e)
                self.G_m.addmm_(T_m.T, X)
                self._c_m = self._c_m + T_m.pow(2).sum().double()  # (read at c_m; a new tensor: a
                # shallow copy of these statistics keeps its own)

    def _W_m(self):
        """``W_merged`` in the statistics' dtype, converted once."""
        if self._W_m_cast is None:
            self._W_m_cast = self.W_merged.to(self.dtype)
        return self._W_m_cast

    def _taken(self, t, convert):
        """``convert()`` of the input ``t``, or the copy the layer whose inputs these are took of
        the same tensor in this batch (checked; unchanged since, by its version)."""
        lead = self._task.lead
        seen = version(t) if isinstance(t, torch.Tensor) else None
        if lead is not None and lead.shared is not None and seen is not None:
            for source, then, converted in lead.shared:
                if source is t and then == seen:
                    return converted
        return convert()

    def _target_tokens(self, x_t, X, what):
        X_t = _tokens(x_t, X.shape[1], what).to(self.H_e.device)
        if X_t.shape != X.shape:
            raise ValueError(f"{what} has {X_t.shape[0]} tokens, the inputs {X.shape[0]}")
        return X_t.to(self.dtype)

    @torch.no_grad()
    @without_autocast
    def end_task(self):
        task = self._task
        if task is None:
            raise RuntimeError("end_task() without begin_task()")
        self._task = None
        task.shared = None  # (the last batch's copies, had a sharing layer not taken them)
        task.D = None  # (a layer sharing these inputs holds this task, as its lead, until it ends its own)
        if task.n_tokens == 0:
            raise ValueError(f"{task.name} has no calibration data (no batch was added)")
        if task.lead is not None and task.lead.n_tokens != task.n_tokens:
            # G_k = (W_k - W_m) H_k (or a_k = 1 / tr(H_k)) is formed now from the other layer's
            # H_k: with other tokens there, it pairs this layer's targets with other inputs and
            # the objective is silently another one
            raise ValueError(f"{task.name}: {task.n_tokens} calibration tokens here but "
                             f"{task.lead.n_tokens} at the layer whose inputs these are (its H_k is "
                             f"this layer's): give both the same batches, and end the task here "
                             f"after the last one")
        self.task_tokens = self.task_tokens + [task.n_tokens]  # (a shallow copy keeps its own)
        # (one read for both uses: a Gram matrix's diagonal is >= 0, so it is all zero exactly
        # where its sum is 0; each read waits for the device's queue, once per task and layer)
        trace = torch.diagonal(task.H).sum()
        if isinstance(task.c, torch.Tensor):  # (the asymmetric targets' constant: in the same read)
            trace, task.c = torch.stack([trace.double(), task.c]).tolist()
        else:
            trace = float(trace)
        if trace == 0:
            # Tokens that were all zero at this layer (a norm's zero weight, a gated branch): the
            # task's H_k and its G_k = T_k X_k^T are zero, so whatever its weight it adds nothing
            # to the objective, and a_k = 1 / tr(H_k) is undefined. Dropped, as a task that sent
            # no token is; a layer left with no task is the caller's to round (the walker: RTN).
            self.empty_tasks.append(task.name)
            return
        a = self._weight_of(task.H, task.weight, task.name, trace)
        self._fold_hessians([task.H], [a])
        self._fold(task.W, task.H, task.G, task.c, a, task.name)

    # ----------------------------------------------------------------- result

    @torch.no_grad()
    @without_autocast
    def finalize(self, join: bool = True):
        """``(H_e, H_m, G_e, G_m)`` once every task is in. ``join=False``: ``G_e`` may still be
        written by the side stream; the caller calls :meth:`join` before it reads it (E-PMQ
        factors ``H`` meanwhile)."""
        if self._task is not None:
            raise RuntimeError(f"task {self._task.name} is still open: call end_task() first")
        if not self.task_weights:
            empty = f" (inputs all zero: {', '.join(self.empty_tasks)})" if self.empty_tasks else ""
            raise ValueError("no task was added: E-PMQ needs at least one expert with calibration data"
                             + empty)
        leader = self.inputs_of
        if leader is not None and (leader._task is not None
                                   or leader._tasks_done != self._tasks_done):
            raise RuntimeError("the layer whose inputs these are has not folded in every task: "
                               "call its end_task() first")
        if leader is not None and self.task_tokens != leader.task_tokens:
            # (a batch added there after this layer ended the task: its H_k, in H_e, is not the
            # one this layer's G_e was formed with)
            raise ValueError(f"calibration tokens per task {self.task_tokens} differ from those of "
                             f"the layer whose inputs these are ({leader.task_tokens}), whose H_k this "
                             f"layer's G_e is formed with: give both the same batches")
        if leader is not None and self.task_weights != leader.task_weights:
            # (H_e is the leader's, weighted by its a_k; G_e and c_e by these: another objective)
            raise ValueError(f"task weights {self.task_weights} differ from those of the layer whose "
                             f"inputs these are ({leader.task_weights}), whose H_e this layer shares: give "
                             f"both the same weight= (or none)")
        self._take_owed(side=True)  # (every task is in: nothing writes H_e again)
        return self.H_e, self.H_m, self.G_e if join else self._G_e, self.G_m


@torch.no_grad()
def gram_matrices(model, batches, *, names=None, dtype=torch.float64, task: str = "",
                  each_expert: bool = False, experts=True) -> dict:
    """``{weight name: X^T X}`` of the inputs of ``model``'s ``nn.Linear`` layers and GPT-2's
    ``Conv1D`` ones (whose weight is stored ``[in, out]``: ``epmq.merge.regmean`` finds them
    when given the experts as modules, else takes their names as ``transposed=``), those whose
    weight name is in ``names`` (default all), over ``batches`` (model inputs, passed as
    ``quantize_model``'s calibration items are; padded ones split by ``calibration.unpad``), in
    ``dtype`` on the CPU: RegMean's statistics when ``model`` is an expert and ``batches`` its
    own task's data. A layer whose weight is tied to another tensor (an output head that is
    also the input embedding) is left out: merged as an embedding, it is averaged.

    Each batch's pass runs under the seed the model walker gives item ``n`` of ``task`` (the
    caller's random state kept): a model that draws random numbers in eval mode (ViTMAE shuffles
    its patches) has the same Gram matrices on every call, those of the walk's draws for that task.

    Linears that read the very same tensors in the first batch (q/k/v, gate/up) have one Gram
    matrix, made and accumulated once (the same object in the result), as the model walker shares
    their Hessians; a batch in which they stop doing so raises.

    A mixture of experts' fused experts (transformers 5's ``experts.gate_up_proj [E, 2I, H]``
    and ``down_proj``, 3-D parameters no ``nn.Linear`` holds) are called, for the passes, as the
    walker rebuilds them, one ``nn.Linear`` per expert taking the tokens routed to it: each fused
    parameter's entry stacks its experts' Gram matrices, ``[E, in, in]`` (an expert no token
    reached: zeros), those of the inputs each expert's projections see in the model's forward.
    A module of the blocks that applies a 2-D weight of its own by ``F.linear`` (their routers,
    ``mlp.gate.weight [E, H]``) has the Gram matrix of that call's inputs.
    ``each_expert``: each expert's projections have theirs too, ``[in, in]``, under the names
    checkpoints saved one matrix per expert give them (``experts.{e}.gate_proj.weight``).
    ``experts=False``: fused experts are left as they are, with no Gram matrix (where one per
    expert would not fit in memory); a mapping ``{fused parameter: range of its experts}``: those
    parameters' alone, of the experts in their ranges, stacked ``[len(range), in, in]`` (the others
    left as they are: where all would not fit, a few at a time, ``merge_checkpoint``'s passes)."""
    from torch import nn

    from .adapters import named_blocks
    from .adapters.moe import rebuild_experts
    from .adapters.attention import call_projections, hands_weights_to_torch
    from .checkpoint_io import parameter_aliases
    from .calibration import token_rows, unpad
    from .walker import _call, _check_labels_read, _encoder_decoder, _item_seed, keep_call_hooks

    if isinstance(names, str):  # (read by substrings: '0.weight' took '10.weight' too)
        raise TypeError("names must be a collection of weight names, not one string")
    if names is not None:  # (one left out in silence: RegMean averaged that layer)
        names = set(names)
        unknown = sorted(names - {n for n, _ in model.named_parameters(remove_duplicate=False)})
        if unknown:
            raise ValueError(f"names {unknown[:3]}{' ...' if len(unknown) > 3 else ''} are no parameter of "
                             f"{type(model).__name__} (no linear layer's weight: a module's name without "
                             f"'.weight', or a typo?)")
    chosen = dict(experts) if isinstance(experts, Mapping) else None  # fused parameter -> its experts here
    for fused, ranged in (chosen or {}).items():
        if not isinstance(ranged, range) or ranged.step != 1:
            raise ValueError(f"experts[{fused!r}] must be a range of consecutive experts, got {ranged!r}")
    if chosen and set(chosen) - rebuilt_experts(model):
        raise ValueError(f"experts= names {sorted(set(chosen) - rebuilt_experts(model))[:3]}, no fused expert "
                         f"parameter of {type(model).__name__} that the passes call one linear per expert")
    # (DBRX's w1 and v1 read the experts' tokens, one stack: of other ranges, it held both's experts,
    # w1's entry and v1's indexed by neither's range)
    # (a range past the experts gave the stack of those it holds, its first not its range's first)
    ranged, count = {}, {}
    for adapter, _ in (stacks_of(model) if chosen else []):
        for part in rebuild_experts(adapter, model, lambda name, new: None, _known_call_only(adapter)).values():
            if part.fused in chosen and str(part).endswith(".weight") and _expert_of(part) is not None:
                ranged.setdefault(_reads(part), {})[part.fused] = chosen[part.fused]
                count[part.fused] = max(count.get(part.fused, 0), _expert_of(part) + 1)
    for fused, n in count.items():
        if not 0 <= chosen[fused].start < chosen[fused].stop <= n:
            raise ValueError(f"experts[{fused!r}] must be a range within its {n} experts (0 to {n - 1}), "
                             f"got {chosen[fused]!r}")
    for by_fused in ranged.values():
        if len(set(by_fused.values())) > 1:
            raise ValueError(f"experts= gives {' and '.join(f'{n} {r!r}' for n, r in by_fused.items())}: they read "
                             f"the same tokens and share one stack of Gram matrices, so take one range of experts")
    device = next(model.parameters()).device
    stats, hooks = {}, []
    reads, keep = {}, []  # this batch: name -> (id, version) of each input; the inputs, alive
    owner = {}  # name -> the name whose statistics it shares (decided after the first batch)
    # the first batch: a linear's matrix is made at its first call unless it reads what one read before
    # it (q/k/v, gate/up), whose matrix it follows while its reads are the first part of that one's,
    # its inputs kept (each linear's made at once, a 7B Llama's held 57 GB of float64 until the
    # call ended where the shared ones are 44 GB)
    d_ins, first_reader, following, held = {}, {}, {}, {}  # held: name -> (input, its version, mask)
    towers = stacks_of(model)
    stacks = [(adapter, prefix) for adapter, tower in towers for prefix, _ in tower]
    # the positions of a stack's hidden states that are tokens, as the walk counts them (open_clip
    # text towers: up to the end token), for the current batch
    masks = {}

    def add(name, x, mask):
        stats[name].add_batch(token_rows(x.detach(), mask).to("cpu", dtype), what=f"calibration input of {name}")

    def make(name):
        """``name``'s own matrix, of the inputs it read while following another's."""
        stats[name] = HessianStats(d_ins[name], device="cpu", dtype=dtype)
        for x, read_as, mask in held.pop(name, []):
            if version(x) != read_as:
                raise RuntimeError(f"{name} read the same tensor as {following[name]} in the first calibration "
                                   f"batch, which the model changed in place before {name}'s reads parted from "
                                   f"{following[name]}'s: its Gram matrix cannot be taken from that tensor")
            add(name, x, mask)
        following.pop(name, None)

    def unread():
        """Zeros for the linears no batch called yet (the first batch reached none of them)."""
        for name in stats:
            if stats[name] is None:
                stats[name] = HessianStats(d_ins[name], device="cpu", dtype=dtype)

    def hook(name):
        def fn(module, args):
            x = args[0]
            keep.append(x)
            read = (id(x), version(x))
            reads.setdefault(name, []).append(read)
            mask = next((m for prefix, m in masks.items() if name.startswith(prefix + ".")), None)
            if stats[name] is None:  # (the first batch)
                leader = following.get(name, first_reader.get(read) if len(reads[name]) == 1 else None)
                if leader is not None and reads[leader][:len(reads[name])] == reads[name]:
                    following[name] = leader
                    held.setdefault(name, []).append((x, read[1], mask))
                    return
                make(name)
                if len(reads[name]) == 1:
                    first_reader.setdefault(read, name)
            if owner.get(name, name) == name:
                add(name, x, mask)

        return fn

    tied = {name for names in parameter_aliases(model) if len(names) > 1 for name in names}
    # fused experts as one linear per expert (views of the fused parameters), put back after the
    # passes
    swapped = []

    def swap(name, new):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        keep_call_hooks(old, new)
        swapped.append((parent, attr, old, new))
        setattr(parent, attr, new.train(old.training))

    rebuilt = set()
    for adapter, _ in (towers if experts else []):
        rebuilt.update(rebuild_experts(adapter, model, swap, _known_call_only(adapter)).values())
    # name -> the expert (of its fused parameter) whose projection it is: one expert's rows of a 3-D
    # parameter, or one expert's block of rows of DBRX's [E * I, H] ones (w2's read transposed)
    expert_of = {str(part): _expert_of(part) for part in rebuilt
                 if str(part).endswith(".weight") and part.fused not in tied and (names is None or part.fused in names)
                 and (chosen is None or part.fused in chosen)}
    expert_parts = {n: part for part in rebuilt if expert_of.get(n := str(part)) is not None
                    and (chosen is None or expert_of[n] in chosen[part.fused])}
    # an expert's gate and up projections (its parts of one fused parameter) read its tokens, one
    # tensor: shared from the start, as the first batch cannot tell it of an expert it routes nothing
    # to, and one matrix made (each of theirs took a gate_up_proj's matrices twice, past the budget)
    leaders = {}
    # and the experts' matrices of what they read (a fused parameter; DBRX's w1 and v1 one) are views
    # of one stack [experts, in, in] from the start (stacked after the passes, each parameter's were
    # twice its size at once)
    in_stack, stack_of = {}, {}  # what the experts' projections read -> its experts, in order; its stack
    for n, part in expert_parts.items():
        in_stack.setdefault(_reads(part), set()).add(expert_of[n])
    in_stack = {key: sorted(experts_in) for key, experts_in in in_stack.items()}
    for module_name, module in model.named_modules():
        weight = f"{module_name}.weight" if module_name else "weight"
        conv1d = type(module).__name__ == "Conv1D"
        if ((isinstance(module, nn.Linear) or conv1d) and weight not in tied and weight not in rebuilt
                and (names is None or weight in names) or weight in expert_parts):
            d_in = module.weight.shape[0] if conv1d else module.in_features
            key = _reads(expert_parts[weight]) if weight in expert_parts else None
            if key is not None:  # (in the modules' order: gate leads)
                leader = leaders.setdefault((key, expert_of[weight]), weight)
                if leader != weight:
                    owner[weight] = leader
            d_ins[weight] = d_in
            if weight in owner:
                stats[weight] = stats[owner[weight]]
            elif key is None:
                stats[weight] = None  # (made in the first batch, or after it where not called)
            else:
                stats[weight] = HessianStats(d_in, device="cpu", dtype=dtype)
                if key not in stack_of:
                    stack_of[key] = torch.zeros(len(in_stack[key]), d_in, d_in, dtype=dtype)
                stats[weight].H = stack_of[key][in_stack[key].index(expert_of[weight])]
            hooks.append(module.register_forward_pre_hook(hook(weight)))
    # modules of the blocks that apply a 2-D weight of their own by F.linear, no nn.Linear
    # (transformers 5's MoE routers, Qwen3MoeTopKRouter's weight [E, H]): the inputs of that call
    applied, routers = {}, set()  # id(weight) -> its HessianStats; their names
    for _, tower in towers:
        for prefix, blocks in tower:
            for block_name, block in named_blocks(prefix, blocks):  # (an OrderedDict's names: not their index)
                for rel, module in block.named_modules():
                    w, weight = module._parameters.get("weight"), f"{block_name}.{rel + '.' if rel else ''}weight"
                    if (isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()
                            and not isinstance(module, (nn.Linear, nn.Embedding)) and type(module).__name__ != "Conv1D"
                            and weight not in stats and weight not in tied and (names is None or weight in names)):
                        stats[weight] = applied[id(w)] = HessianStats(w.shape[1], device="cpu", dtype=dtype)
                        routers.add(weight)
                        hooks.append(module.register_forward_pre_hook(lambda m, args: capture.__enter__() and None))
                        hooks.append(module.register_forward_hook(
                            lambda m, args, out: (capture.__exit__(None, None, None), casts.clear()) and None,
                            always_call=True))
    # a copy of such a weight made in the module's forward (DeepSeek-V3's router applies
    # self.weight.type(torch.float32): a copy in a bf16 model) -> its weight's statistics; the
    # copies kept alive until the forward ends, so no other tensor takes their ids
    casts = {}
    cast_methods = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.double,
                    torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.contiguous}

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is nn.functional.linear:
                x, w = (list(args) + [kwargs.get("input"), kwargs.get("weight")][len(args):])[:2]
                stats_of = applied.get(id(w)) or casts.get(id(w), (None,))[0]
                if stats_of is not None:
                    stats_of.add_batch(x.detach().reshape(-1, x.shape[-1]).to("cpu", dtype),
                                       what="calibration input of a router")
            out = func(*args, **kwargs)
            if func in cast_methods and args and isinstance(out, torch.Tensor) and out is not args[0]:
                stats_of = applied.get(id(args[0])) or casts.get(id(args[0]), (None,))[0]
                if stats_of is not None and out.shape == args[0].shape:
                    casts[id(out)] = (stats_of, out)
            return out

    capture = Capture()
    if not stats:
        raise ValueError(f"{type(model).__name__} has no linear layer (untied nn.Linear or Conv1D)"
                         f"{' among the names given' if names else ''}")
    was_training = model.training
    model.eval()
    # (WavLM's attention hands its projections' weights to torch, never calling them: their Gram
    # matrices came back zero, and RegMean averaged them; it calls them for the passes)
    handing = [m for m in model.modules() if hands_weights_to_torch(m)]
    try:
        for attention in handing:
            call_projections(attention)

        def parts():
            for b, item in enumerate(batches):
                _check_labels_read(model, item, f"batches[{b}]")
                yield from unpad(item, encoder_decoder=_encoder_decoder(model), model=model)

        for n, item in enumerate(parts()):
            reads.clear()
            keep.clear()
            masks.clear()
            for adapter, prefix in stacks:
                mask = adapter.token_mask(model, prefix, item)
                if mask is not None:
                    masks[prefix] = mask
            _call(model, item, device, _item_seed(task, n))
            if n == 0:
                first = {}
                for name in stats:
                    if name in reads and name not in owner:
                        first.setdefault(tuple(reads[name]), []).append(name)
                for alike in first.values():  # (one made already where any made theirs)
                    leader = next((name for name in alike if stats[name] is not None), alike[0])
                    if stats[leader] is None:
                        make(leader)
                    for name in alike:
                        if name != leader:
                            owner[name] = leader
                            if stats[name] is None:
                                stats[name] = stats[leader]
                held.clear()
                unread()
            for name, leader in owner.items():
                if reads.get(name) != reads.get(leader):
                    raise RuntimeError(f"{name} read the same tensors as {leader} in the first "
                                       f"calibration batch but not in batch {n}: its Gram matrix "
                                       f"was shared with {leader}'s")
    finally:
        for h in hooks:
            h.remove()
        for attention in handing:
            vars(attention).pop("torch_multi_head_self_attention", None)
        for parent, attr, old, new in reversed(swapped):
            setattr(parent, attr, old.train(new.training))
        model.train(was_training)
        keep.clear()
        held.clear()
    if not any(s is not None and s.n_tokens for s in stats.values()) and len(expert_parts) < len(stats):
        # (experts alone, named: none routed a token is zeros, as any expert no token reached)
        raise ValueError("no calibration batch reached the model's linear layers")
    unread()
    # (a module that never applied its weight by F.linear has none: averaged)
    grams = {n: stats[owner.get(n, n)].H for n in stats if n not in routers or stats[n].n_tokens}
    for n, part in expert_parts.items():  # (each expert's matrix a view of its parameter's stack)
        del grams[n]
        if grams.setdefault(part.fused, stack_of[_reads(part)]) is not stack_of[_reads(part)]:
            raise RuntimeError(f"the projections of the experts of {part.fused} read other inputs: one Gram "
                               f"matrix per expert does not hold them")
    stats.clear()
    if each_expert:  # (views of the stack, one per expert: its projections share it)
        views = {(key, e): stack_of[key][i] for key, experts_in in in_stack.items() for i, e in enumerate(experts_in)}
        grams.update({n: views[_reads(part), expert_of[n]] for n, part in expert_parts.items()})
    return grams


def _expert_of(part):
    """The expert whose projection the fused-experts ``Part`` is (``epmq.adapters.moe``'s):
    its index in a 3-D parameter, or of a 2-D ``[E * I, H]`` one (DBRX's), its block of ``I``
    rows (``cols`` where read transposed); None for any other slice (rows reordered)."""
    if part.order is not None:
        return None
    if part.index is not None:
        return part.index if part.cols is None else None
    block = part.cols if part.transposed else part.rows
    other = part.rows if part.transposed else part.cols
    if len(part.fused_shape) != 2 or block is None or other is not None:
        return None
    width = block[1] - block[0]
    return block[0] // width if width > 0 and block[0] % width == 0 and part.fused_shape[0] % width == 0 else None


def _reads(part):
    """What an expert's projection ``part`` reads, alike for the projections reading one tensor:
    its fused parameter (gate and up of gate_up_proj), or of DBRX's, its module and whether it is
    read transposed (w1 and v1 read the expert's tokens, w2 their product)."""
    return part.fused if part.index is not None else (part.fused.rpartition(".")[0], part.transposed)


def rebuilt_experts(model) -> set:
    """The fused expert parameters of ``model`` that ``gram_matrices`` gives Gram matrices, one per
    expert (those it calls as one linear per expert: ``epmq.adapters.moe.rebuild_experts``)."""
    from .adapters.moe import rebuild_experts

    return {part.fused for adapter, _ in stacks_of(model)
            for part in rebuild_experts(adapter, model, lambda name, new: None,
                                        _known_call_only(adapter)).values()
            if str(part).endswith(".weight") and _expert_of(part) is not None}


def _known_call_only(adapter) -> bool:
    """``rebuild_experts``' ``known_call_only`` for ``adapter``'s blocks, as its walk rebuilds
    them: the MoE adapters' experts of any call their rebuilt linears compute, AUTO's (a
    ``MoEAdapter`` too) and the others' of transformers' usual call alone; one called otherwise
    (by keywords of its own) would meet the linears' (hidden_states, top_k_index, top_k_weights)."""
    from .adapters.auto import AutoAdapter
    from .adapters.moe import MoEAdapter

    return not isinstance(adapter, MoEAdapter) or isinstance(adapter, AutoAdapter)


def stacks_of(model) -> list:
    """``find_towers(model)``, or [] where no adapter knows its blocks."""
    from .adapters import find_towers

    try:
        return find_towers(model)
    except ValueError:  # (blocks no adapter knows)
        return []
