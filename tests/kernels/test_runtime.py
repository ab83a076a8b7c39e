"""epmq_kernels._runtime: the choice of the fp32 product for E-PMQ's large products."""

import contextlib

import pytest
import torch

import epmq_kernels._runtime as rt


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a given capability whose timing is replaced by a rule; records what the
    tuner was offered (nothing runs on a GPU: the tuner never calls ``run``)."""
    import epmq_kernels.autotune_cache as ac

    state = {"capability": (9, 0), "winner": "tf32x3", "offered": []}

    def tune(cache, key, candidates, run):
        state["offered"].append((cache.family, key, candidates))
        return {"mm": state["winner"]}

    monkeypatch.setattr(rt, "_FP32_MM", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake gpu")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(ac, "tune", tune)
    return state


@pytest.mark.parametrize("floor, winner", [("tf32x3", "ieee"), ("tf32x3", "tf32x3"),
                                           ("bf16x3", "bf16x3"), ("bf16x3", "tf32x3")])
def test_fp32_mm_takes_the_fastest_product_at_least_as_accurate_once_per_gpu(fake_gpu, floor,
                                                                            winner):
    fake_gpu["winner"] = winner
    gpu = torch.device("cuda", 0)
    expected = rt.FP32_PRODUCTS[winner]
    assert rt.fp32_mm(gpu, floor) is expected
    assert rt.fp32_mm(gpu, floor) is expected
    assert len(fake_gpu["offered"]) == 1  # timed once, then remembered
    family, key, candidates = fake_gpu["offered"][0]
    offered = {"tf32x3": ["ieee", "tf32x3"], "bf16x3": ["ieee", "tf32x3", "bf16x3"]}[floor]
    assert family == "fp32_mm" and key.startswith(floor + "|")
    assert candidates == [{"mm": p} for p in offered]
    assert rt.fp32_mm(torch.device("cuda", 1), floor) is expected
    assert len(fake_gpu["offered"]) == 2  # another GPU is timed on its own
    other = "bf16x3" if floor == "tf32x3" else "tf32x3"
    rt.fp32_mm(gpu, other)
    assert len(fake_gpu["offered"]) == 3  # and so is another floor


def test_fp32_mm_is_ieee_without_tensor_cores_or_unasked(fake_gpu):
    fake_gpu["capability"] = (7, 5)  # no TF32 or bf16 tensor cores: nothing to time
    assert rt.fp32_mm(torch.device("cuda", 0), "bf16x3") is rt.ieee_mm
    fake_gpu["capability"] = (9, 0)
    assert rt.fp32_mm(torch.device("cuda", 0), "ieee") is rt.ieee_mm
    assert rt.fp32_mm(torch.device("cpu"), "bf16x3") is rt.ieee_mm
    assert fake_gpu["offered"] == []
    with pytest.raises(ValueError, match="floor must be one of"):
        rt.fp32_mm(torch.device("cpu"), "tf32")


@pytest.mark.cuda
def test_cuda_fp32_mm_candidates_are_accurate():
    """The products the choice is between, with this GPU's own conversions: tf32x3 in IEEE fp32's
    accuracy class, bf16x3 within 2^-16 of each term; the choice is one of those allowed."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    A = torch.randn(512, 700, device="cuda", generator=gen)
    B = torch.randn(700, 300, device="cuda", generator=gen)
    exact = A.double() @ B.double()
    scale = A.double().abs() @ B.double().abs()
    err = lambda P: float(((P.double() - exact).abs() / scale).max())  # noqa: E731
    assert err(rt.tf32x3_mm(A, B)) <= 4 * err(rt.ieee_mm(A, B)) + 2**-20
    assert err(rt.bf16x3_mm(A, B)) <= 2**-17  # (1.3e-6 emulated on the CPU)
    assert rt.fp32_mm(A.device, "tf32x3") in (rt.ieee_mm, rt.tf32x3_mm)
    assert rt.fp32_mm(A.device, "bf16x3") in (rt.ieee_mm, rt.tf32x3_mm, rt.bf16x3_mm)


def test_kernels_refuse_tensors_without_data():
    """Meta tensors (a model built on meta, not yet loaded) get a clear error from every kernel,
    not torch's 'Cannot copy out of meta tensor' nor an aliasing error (all their pointers are 0)."""
    from epmq_kernels.expert_residual import accumulate_residual_triton, accumulate_xxt_triton
    from epmq_kernels.gptq_solve import gptq_solve_triton
    from epmq_kernels.packing import pack_int4
    from epmq_kernels.w4a16 import w4a16_matmul

    m = dict(device="meta")
    calls = [
        lambda: gptq_solve_triton(torch.randn(8, 32, **m), torch.eye(32, **m), bits=4, sym=False, group_size=16),
        lambda: pack_int4(torch.zeros(16, 8, dtype=torch.int32, **m), backend="triton", check_range=False),
        lambda: accumulate_xxt_triton(torch.zeros(16, 16, **m), torch.randn(4, 16, **m)),
        lambda: accumulate_residual_triton(torch.zeros(8, 16, **m), torch.randn(8, 16, **m),
                                           torch.randn(8, 16, **m), torch.eye(16, **m), 1.0),
        lambda: w4a16_matmul(torch.randn(3, 64, **m).half(), torch.zeros(8, 40, dtype=torch.int32, **m),
                             torch.ones(2, 40, **m).half(), torch.zeros(2, 40, dtype=torch.uint8, **m), 32,
                             backend="triton"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors.*got meta tensors"):
            call()


def test_device_values_are_the_numbers_given():
    t = rt.device_values([0.25, 1 / 3, 7], torch.float64, "cpu")
    assert t.dtype == torch.float64 and t.tolist() == [0.25, 1 / 3, 7.0]
    assert rt.device_values([1 / 3], torch.float32, torch.device("cpu")).item() == pytest.approx(1 / 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_values_and_the_fold_do_not_wait_for_the_device():
    """A task weight copied to the GPU from pageable memory synchronizes the stream; through
    pinned memory it does not (torch's sync debug mode raises on a synchronizing call)."""
    from epmq_kernels.expert_residual import fold_hessians_triton

    H_e = torch.zeros(64, 64, device="cuda")
    H = torch.randn(64, 64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = rt.device_values([0.5, 2.0], torch.float32, "cuda")
        fold_hessians_triton(H_e, None, [H, H], [0.5, 2.0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.tolist() == [0.5, 2.0]
    torch.testing.assert_close(H_e, 2.5 * H)


class _FakeTensor:
    def __init__(self, device):
        self.device, self.recorded = device, []

    def record_stream(self, stream):
        self.recorded.append(stream)


@pytest.fixture
def fake_streams(monkeypatch):
    """CUDA streams and events as records of what was asked of them (no GPU): an event is done
    only once the host waited for it."""
    log = []

    class Stream:
        def __init__(self, device):
            self.device = device

        def wait_stream(self, other):
            log.append(("wait_stream", other))

    class Event:
        def __init__(self):
            self.done = False

        def record(self, stream):
            log.append(("record", self))

        def query(self):
            return self.done

        def synchronize(self):
            log.append(("host waits", self))
            self.done = True

    current = object()
    monkeypatch.setattr(rt, "_SIDE", {})
    monkeypatch.setattr(rt, "_HELD", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return log, current


def test_side_stream_launch_orders_holds_and_bounds(fake_streams, monkeypatch):
    """Each launch waits for the current stream's work so far, marks its tensors as used by the
    side stream and records its event (also when it fails part-way); beyond SIDE_HELD_MAX
    launches that hold memory the host waits for the oldest, and launches that hold nothing
    never wait."""
    log, current = fake_streams
    monkeypatch.setattr(rt, "SIDE_HELD_MAX", 2)
    gpu = torch.device("cuda", 0)
    t = _FakeTensor(gpu)
    out, first = rt.side_stream_launch(lambda: "result", [t], holds=True)
    assert out == "result" and log == [("wait_stream", current), ("record", first)]
    assert len(t.recorded) == 1
    _, second = rt.side_stream_launch(lambda: None, [t], holds=True)
    for _ in range(3):
        rt.side_stream_launch(lambda: None, [t])  # (holds nothing: no wait)
    assert not any(entry[0] == "host waits" for entry in log)
    _, third = rt.side_stream_launch(lambda: None, [t], holds=True)
    assert ("host waits", first) in log and ("host waits", second) not in log
    log.clear()

    def fails():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        rt.side_stream_launch(fails, [t], holds=True)
    assert [e[0] for e in log] == ["host waits", "wait_stream", "record"]  # (second: the oldest)
    assert len(t.recorded) == 7
    with pytest.raises(ValueError, match="CUDA"):
        rt.side_stream_launch(lambda: None, [torch.zeros(1)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_launch_runs_after_the_current_streams_work():
    """A side-stream launch sees what the current stream wrote before it, however late that
    work runs, and its consumer sees its result after waiting for its event."""
    x = torch.zeros(1, device="cuda")
    torch.cuda._sleep(50_000_000)  # (~25 ms: the side stream would run first if it did not wait)
    x.fill_(1.0)
    out, done = rt.side_stream_launch(lambda: x * 2, [x])
    torch.cuda.current_stream().wait_event(done)
    assert out.item() == 2.0


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it is on cuda:1 (what :func:`rt.on_tensor_device` reads)."""

    is_cuda = True
    device = torch.device("cuda", 1)

    def get_device(self):
        return 1


def test_launchers_run_with_their_tensors_device_current(monkeypatch):
    """Triton launches on the current device: a launcher given tensors on another GPU makes
    theirs current for the call, and leaves things as they are otherwise."""
    log = []

    @contextlib.contextmanager
    def device(d):
        log.append(("current", torch.device(d)))
        yield
        log.append("restored")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    launcher = rt.on_tensor_device(lambda t, k=0: log.append(("launch", k)) or "result")
    assert launcher(torch.zeros(2).as_subclass(_OnCuda1), k=3) == "result"
    assert log == [("current", torch.device("cuda", 1)), ("launch", 3), "restored"]
    log.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launcher(torch.zeros(2).as_subclass(_OnCuda1))
    launcher(torch.zeros(2))
    assert log == [("launch", 0), ("launch", 0)]


def test_launchers_take_their_tensors_by_keyword_too(monkeypatch):
    """The public launchers take their tensors by keyword as well (``accumulate_xxt_triton(H=H,
    X=X)``): the device guard finds them there (it read ``args[0]``: an IndexError)."""
    from epmq_kernels import accumulate_xxt_triton

    H, X = torch.zeros(8, 8), torch.randn(4, 8)
    accumulate_xxt_triton(H=H, X=X)
    torch.testing.assert_close(H, X.T @ X)
    log = []

    @contextlib.contextmanager
    def device(d):
        log.append(("current", torch.device(d)))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    launcher = rt.on_tensor_device(lambda t, k=0: log.append(("launch", k)))
    launcher(t=torch.zeros(2).as_subclass(_OnCuda1), k=3)
    assert log == [("current", torch.device("cuda", 1)), ("launch", 3)]


def test_every_public_int4_entry_that_launches_makes_its_tensors_device_current(monkeypatch):
    """w4a16_plan (autotuning) and w4a16_dequantize (the dqmm chunk kernel) launch kernels as
    w4a16_matmul does: given weights on cuda:1 while cuda:0 is current, each makes cuda:1
    current before anything else (here a stand-in device switch that stops the call)."""
    from epmq_kernels import w4a16 as W

    class Switched(Exception):
        pass

    def device(d):
        raise Switched(str(d))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    on_1 = torch.zeros(4, 8, dtype=torch.int32).as_subclass(_OnCuda1)
    scales, zeros = torch.ones(1, 8, dtype=torch.float16), torch.zeros(1, 8, dtype=torch.uint8)
    x = torch.zeros(1, 32, dtype=torch.float16).as_subclass(_OnCuda1)
    with pytest.raises(Switched, match="cuda:1"):
        W.w4a16_dequantize(on_1, scales, zeros, -1)
    with pytest.raises(Switched, match="cuda:1"):
        W.w4a16_plan(x, on_1, scales, zeros, -1)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_kernels_run_on_a_gpu_that_is_not_current(gen):
    """Every kernel family on cuda:1 while cuda:0 is current gives what it gives on the CPU
    (a model spread over two GPUs; the int4 product twice: its first call plans, the second
    reuses the plan)."""
    from epmq_kernels import (accumulate_residual, gptq_solve_reference, gptq_solve_triton,
                              pack_int4, w4a16_matmul)

    gpu = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    K, N, d_out = 256, 192, 96
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(K // 128, N, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (K // 128, N), generator=gen).to(torch.uint8)
    x = torch.randn(5, K, generator=gen).half()
    qweight = pack_int4(codes.to(gpu))
    assert torch.equal(qweight.cpu(), pack_int4(codes))
    expected = w4a16_matmul(x, pack_int4(codes), scales, zeros, 128, backend="torch").float()
    for _ in range(2):
        y = w4a16_matmul(x.to(gpu), qweight, scales.to(gpu), zeros.to(gpu), 128)
        torch.testing.assert_close(y.cpu().float(), expected, rtol=2e-3, atol=2e-3)

    X = torch.randn(K, 4 * K, generator=gen)
    H = X @ X.T / X.shape[1] + 0.01 * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W, W_m = torch.randn(d_out, K, generator=gen), torch.randn(d_out, K, generator=gen)
    on_cpu = gptq_solve_reference(W, Hinv, bits=4, sym=False, group_size=128)
    on_gpu = gptq_solve_triton(W.to(gpu), Hinv.to(gpu), bits=4, sym=False, group_size=128)
    assert (on_gpu.codes.cpu() - on_cpu.codes).abs().max() <= 1
    G_cpu, G_gpu = torch.zeros(d_out, K), torch.zeros(d_out, K, device=gpu)
    accumulate_residual(G_cpu, W, W_m, H, 0.5)
    accumulate_residual(G_gpu, W.to(gpu), W_m.to(gpu), H.to(gpu), 0.5, backend="triton")
    torch.testing.assert_close(G_gpu.cpu(), G_cpu, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize(gpu)
