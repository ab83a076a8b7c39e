"""Gluon kernels that also run under Triton's interpreter.

Gluon (``triton.experimental.gluon``) is Triton with explicit layouts: a kernel states which
thread holds which element, so it can load packed weights straight into the registers of a tensor
core's operand (no shared-memory round trip). Triton's interpreter does not run Gluon. But a
Gluon program's *values* do not depend on its layouts: layouts only place elements on threads,
and ``convert_layout`` is the identity on values. So the same kernel source is run on the CPU by
binding ``gl`` to a shim that forwards each operation to ``triton.language`` with the layout
arguments dropped (``mma_v2`` becomes ``tl.dot``). The CPU tests thereby check the kernel's
arithmetic and indexing line for line; what they cannot check (the layouts, and that the
conversions between them move no data) is checked by compiling for sm_80/sm_90, where
``convert_layout(..., assert_trivial=True)`` fails to compile unless the conversion is a
renaming of registers.

A kernel is written as a plain function over the module-level names ``gl`` and ``mma_v2`` and
wrapped with :func:`gluon_kernel`; the functions it calls are wrapped the same way (Gluon ones
compiled, their interpreted copies interpreted).
"""

import types

import triton
import triton.language as tl

from ._runtime import INTERPRETED

def _no_layout(*args, **kwargs):
    return None


class _InterpretedGluon(types.SimpleNamespace):
    """``gl`` under the interpreter: ``triton.language`` with layouts dropped."""

    BlockedLayout = SliceLayout = NVMMADistributedLayout = DotOperandLayout = staticmethod(_no_layout)
    constexpr = tl.constexpr

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        # (tl.full, a builtin: tl.zeros is a jit function, which a nested interpreted call
        # can leave unpatched)
        return tl.full(shape, 0, dtype)

    @staticmethod
    def full(shape, value, dtype, layout=None):
        return tl.full(shape, value, dtype)

    @staticmethod
    def zeros_like(x):
        return tl.full(x.shape, 0, x.dtype)  # (a builtin, as zeros above)

    @staticmethod
    def convert_layout(value, layout, assert_trivial=False):
        return value

    @staticmethod
    def barrier():
        return tl.debug_barrier()

    @staticmethod
    def allocate_shared_memory(element_ty, shape, layout=None, value=None):
        return _InterpretedShared()

    def __getattr__(self, name):
        return getattr(tl, name)


def _interpreted_mma_v2(a, b, acc, input_precision=None):
    return tl.dot(a, b, acc)


class _InterpretedShared:
    """A shared-memory buffer under the interpreter: a tensor per leading index (``index``),
    written by ``store`` and read by ``load`` or by an MMA; ``permute`` is a transposed view."""

    def __init__(self, values=None, key=None, order=None):
        self.values, self.key, self.order = ({} if values is None else values), key, order

    def index(self, i):
        return _InterpretedShared(self.values, int(i.handle.data.item()) if hasattr(i, "handle") else int(i))

    def store(self, value):
        self.values[self.key] = value

    def load(self, layout=None):
        value = self.values[self.key]
        return value if self.order is None else tl.permute(value, self.order)

    def permute(self, order):
        return _InterpretedShared(self.values, self.key, tuple(order))


def _interpreted_warpgroup_mma(a, b, acc, use_acc=True, is_async=False, **kwargs):
    # (B as copied, bf16 activations included; A is already in the interpreter's fp32 stand-in)
    return tl.dot(a, b.load().to(a.dtype), acc)


def _interpreted_warpgroup_mma_wait(num_outstanding=0, deps=None):
    return deps[0] if len(deps) == 1 else tuple(deps)


def _interpreted_fence_async_shared(cluster=False):
    return None


class _InterpretedAsyncCopy:
    """``async_copy`` (Ampere's ``cp.async``) under the interpreter: a load, then a store."""

    @staticmethod
    def async_copy_global_to_shared(smem, pointer, mask=None, **kwargs):
        smem.store(tl.load(pointer) if mask is None else tl.load(pointer, mask=mask, other=0))

    @staticmethod
    def commit_group():
        return None

    @staticmethod
    def wait_group(num_outstanding=0):
        return None


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon import constexpr_function
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, warpgroup_mma, warpgroup_mma_wait)
    HAS_GLUON = True
    if not hasattr(gl, "barrier"):  # Triton 3.6 (the GPU machines' image) names it thread_barrier
        gl.barrier = gl.thread_barrier
except ImportError:  # a Triton without Gluon (before 3.5): the kernels only run interpreted
    # (the shims stand in, so that a kernel's annotations, ``gl.constexpr``, still resolve)
    gluon, gl, mma_v2 = None, _InterpretedGluon(), _interpreted_mma_v2
    fence_async_shared, async_copy = _interpreted_fence_async_shared, _InterpretedAsyncCopy()
    warpgroup_mma, warpgroup_mma_wait = _interpreted_warpgroup_mma, _interpreted_warpgroup_mma_wait
    HAS_GLUON = False

    def constexpr_function(fn):
        return fn


def gluon_kernel(fn):
    """``fn`` compiled by Gluon, or, under TRITON_INTERPRET=1, interpreted with ``gl`` and
    ``mma_v2`` bound to the shims above (a copy of ``fn`` whose globals differ; the source and
    its line numbers are the same, so an interpreter error points at the kernel's own line)."""
    if not INTERPRETED:
        return gluon.jit(fn) if HAS_GLUON else None
    shims = dict(gl=_InterpretedGluon(), mma_v2=_interpreted_mma_v2, tl=tl,
                 fence_async_shared=_interpreted_fence_async_shared,
                 async_copy=_InterpretedAsyncCopy(),
                 warpgroup_mma=_interpreted_warpgroup_mma,
                 warpgroup_mma_wait=_interpreted_warpgroup_mma_wait)
    names = dict(fn.__globals__, **shims)
    copy = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__ = fn.__module__
    interpreted = triton.jit(copy)
    rewrite = interpreted.rewrite

    def rewrite_with_constexprs():
        # The interpreter re-compiles the source with postponed annotations and recognizes
        # "tl.constexpr" among the strings, not "gl.constexpr" (the same object)
        # (the module's names as they are now: helpers defined below this kernel included)
        names.update({k: v for k, v in fn.__globals__.items() if k not in shims})
        rewritten = rewrite()
        rewritten.__annotations__ = {name: "tl.constexpr" if kind == "gl.constexpr" else kind
                                     for name, kind in rewritten.__annotations__.items()}
        return rewritten

    interpreted.rewrite = rewrite_with_constexprs
    return interpreted
