"""Compiling the kernels for real GPUs on a machine without one.

A test hands a script to ``run_compile_script``: it runs in a fresh interpreter with Triton's
interpreter off and the checkout importable, so the kernels are compiled by Triton's NVIDIA
backend (ptxas included) for the targets the script names; no GPU is needed.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ptxas_available() -> bool:
    """Whether Triton's NVIDIA backend and its ptxas are installed."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


def run_compile_script(script: str, timeout: float) -> subprocess.CompletedProcess:
    """``script`` run by this Python with TRITON_INTERPRET=0 and the checkout on PYTHONPATH;
    with ``EPMQ_COMPILE_TRITON`` (a directory holding another Triton, e.g. ``pip install
    --no-deps --target /tmp/triton36 triton==3.6.0``, the GPU machines' image) that Triton
    first, so the compile tests check the kernels against the Triton the card will run."""
    other = os.environ.get("EPMQ_COMPILE_TRITON")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(filter(None, [other, ROOT])))
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Helpers for the scripts above (imported inside them: ``from gpu_compile import ...`` with this
# directory on sys.path, Triton's interpreter off). No GPU needed.
# ----------------------------------------------------------------------------------------------
def compile_sm90(fn, args, constexprs, num_warps, num_stages, capability=90, **options):
    """``fn`` (a Triton or a Gluon kernel) compiled by Triton's NVIDIA backend for sm_90 (or
    ``capability``), specialised like a real launch with ``args`` (the non-constexpr arguments
    in order: tensors stand for pointers; integers equal to 1 become constants unless the
    kernel says ``do_not_specialize``) and ``constexprs`` (by name); ``options``: further
    compile options of the launch (``enable_fp_fusion``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton._C.libtriton import native_specialize_impl

    signature, constants, attrs = {}, {}, {}
    values = iter(args)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
            continue
        # (an argument the kernel marks do_not_specialize is not, as in a real launch: an
        # integer 1 stays an integer, not a constexpr)
        specialize = not fn.params[i].do_not_specialize
        kind, spec = native_specialize_impl(CUDABackend, next(values), False, specialize, True)
        if kind == "constexpr":
            signature[name], constants[name] = "constexpr", spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn, signature, constants, attrs),
                          target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))


def resource_usage(compiled) -> dict:
    """Registers, spills, stack and shared memory of a kernel compiled for sm_90, read off the
    compiler (``ptxas -v`` on its PTX; shared memory from Triton's metadata, which is what the
    launch requests), plus counts of the SASS instructions that tell the paths apart."""
    import re
    import tempfile
    from collections import Counter
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    bindir = os.path.dirname(ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True).stdout
    text = log.stdout + log.stderr

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else -1

    ops = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", line)
        if m:
            ops[m.group(1)] += 1
            if m.group(1) in ("LDG", "STG", "LDGSTS"):
                ops[m.group(1) + (m.group(2) or "")] += 1
    loop = loop_body(sass)
    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=int(compiled.metadata.shared),
        hgmma=ops["HGMMA"], hmma=ops["HMMA"], lop3=ops["LOP3"], shf=ops["SHF"], prmt=ops["PRMT"],
        ffma=ops["FFMA"], fadd=ops["FADD"], hfma2=ops["HFMA2"], lds=ops["LDS"] + ops["LDSM"],
        sts=ops["STS"], ldg128=sum(v for k, v in ops.items() if k.startswith("LDG") and "128" in k),
        ldg=ops["LDG"], ldgsts=ops["LDGSTS"], dfma=ops["DFMA"],
        loop=len(loop), loop_shared=sum(1 for op in loop if op.split(".")[0] in ("LDS", "STS", "BAR")),
        loop_bar=sum(1 for op in loop if op.split(".")[0] == "BAR"),
        # ptxas's C7513: wgmma instructions serialized (each waited for before the next) because
        # other instructions define their input registers in a way it cannot order
        wgmma_serialized=int("C7513" in text),
    )


def loop_body(sass: str) -> list:
    """The opcodes of a kernel's main loop: the body of its longest backward branch (what each
    iteration issues; the GEMV's per-tile cost, divided by the words a thread holds, is the
    instructions per packed word that bound it where it is not limited by memory)."""
    import re

    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line)]
    address = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16) for line in lines]
    where = {a: i for i, a in enumerate(address)}
    best = None
    for i, line in enumerate(lines):
        if "BRA" not in line:
            continue
        target = re.findall(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])
        j = where.get(int(target[0], 16)) if target else None
        if j is not None and j < i and (best is None or i - j > best[1] - best[0]):
            best = (j, i)
    if best is None:
        return []
    body = []
    for line in lines[best[0]:best[1] + 1]:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            body.append(m.group(1))
    return body


# ----------------------------------------------------------------------------------------------
# Compiling kernels as their launchers launch them: the launches are recorded on the CPU (under
# Triton's interpreter), then compiled in a subprocess with the specialisations a real launch
# makes of the same arguments (integers equal to 1 made constants, 16-byte divisibility of the
# pointers and of the integers), which hand-written signatures of all-i32 arguments never see.
# ----------------------------------------------------------------------------------------------
class Launches:
    """A kernel whose launches are recorded (the arguments its launcher gives), then run (not
    ``run``: recorded only, as where the launcher is told it runs compiled, its arguments those
    of a GPU's launch, which the interpreter may not take); set in the launcher's module in place
    of the kernel (``monkeypatch.setattr``)."""

    def __init__(self, kernel, run=True):
        self.kernel, self.calls, self.run = kernel, [], run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs) if self.run else None

        return launch


def _literal(v) -> str:
    """Python source for a stand-in of a launch's argument ``v`` that Triton specialises as it
    does ``v``: a tensor of its dtype, 16-byte aligned where ``v`` is (a view one element into
    its storage where not); a Triton dtype by name; anything else as itself."""
    import torch
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        aligned = v.data_ptr() % 16 == 0
        return f"torch.empty(80, dtype={v.dtype})" + ("" if aligned else "[1:]")
    if isinstance(v, tl.dtype):
        return f"triton.language.{v.name}" if hasattr(tl, v.name) else f"triton.language.dtype({v.name!r})"
    return repr(v)


def compile_launch(fn, args, kwargs, capability):
    """``fn`` compiled for ``capability`` as a launch ``fn[grid](*args, **kwargs)`` compiles it:
    positional arguments the kernel declares constexpr taken as its constants, ``num_warps``,
    ``num_stages`` and ``enable_fp_fusion`` as options (the backend's defaults where absent)."""
    constexprs, values = dict(kwargs), []
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in constexprs}
    for param, value in zip(fn.params, args):
        if param.is_constexpr:
            constexprs[param.name] = value
        else:
            values.append(value)
    from triton.backends.nvidia.compiler import CUDAOptions

    warps = options.pop("num_warps", CUDAOptions.num_warps)
    stages = options.pop("num_stages", CUDAOptions.num_stages)
    return compile_sm90(fn, values, constexprs, warps, stages, capability=capability, **options)


def compile_as_launched(module: str, launches, capabilities=(90, 80), constexprs=None) -> str:
    """A script compiling each ``(name, calls)`` of ``launches`` (kernels of ``module``, its
    calls a ``Launches``'s) for each of ``capabilities`` as each call launched it: its tensors'
    dtypes and alignment, its integers, its constants and options; the same launch once.
    ``constexprs``: a kernel's name to the constants to compile in place of those recorded (what
    a launcher sets from the device, e.g. a CUDA-only rounding), or a function of the name and a
    call's ``(args, kwargs)`` giving the call as a GPU would launch it."""
    lines = ["import sys", "sys.path.insert(0, 'tests/kernels')", "import torch, triton, triton.language",
             "from gpu_compile import compile_launch", f"import {module} as m"]
    seen = set()
    for name, calls in launches:
        for args, kwargs in calls:
            if callable(constexprs):
                args, kwargs = constexprs(name, args, kwargs)
            else:
                kwargs = dict(kwargs, **(constexprs or {}).get(name, {}))
            for cap in capabilities:
                line = (f"compile_launch(m.{name}, [{', '.join(map(_literal, args))}], "
                        f"dict({', '.join(f'{k}={_literal(v)}' for k, v in kwargs.items())}), {cap})")
                if line not in seen:
                    seen.add(line)
                    lines.append(f"print({line[:300]!r}, flush=True)")
                    lines.append(line)
    return "\n".join(lines + ["print('compiled')"])
