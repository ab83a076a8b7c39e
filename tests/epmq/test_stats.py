"""Streaming statistics: batch by batch they must equal the statistics of the whole data."""

import copy
import math

import pytest
import torch

from epmq import EPMQStats, HessianStats, LowRankExpert, QuantSpec, quant

D_OUT, D_IN = 24, 32


def batches(gen, n_batches=3, tokens=(5, 7), scale=1.0):
    """Token batches shaped like a layer's inputs: [batch, seq, d_in]."""
    return [scale * torch.randn(tokens[0], tokens[1], D_IN, generator=gen) for _ in range(n_batches)]


def gram(xs):
    X = torch.cat([x.reshape(-1, D_IN) for x in xs]).double()
    return X.T @ X


def _streamed(stats, experts, data):
    """``stats`` with each expert's task streamed batch by batch."""
    for W, xs in zip(experts, data):
        stats.begin_task(W)
        for x in xs:
            stats.add_batch(x)
        stats.end_task()
    return stats


def test_hessian_stats(gen):
    xs = batches(gen)
    stats = HessianStats(D_IN, dtype=torch.float64)
    for x in xs:
        stats.add_batch(x)
    torch.testing.assert_close(stats.H, gram(xs))
    assert stats.n_tokens == 3 * 35


def test_hessian_stats_refuses_what_cannot_hold_H(gen):
    """HessianStats(d_in, dtype=torch.float16) summed X^T X in float16 (past a few thousand
    tokens each x^2 is below the spacing of diag H, and the trace overflows at 65504), and an
    integer dtype truncated every product, both silently; a d_in of -1 or "32" ended in torch's
    bare errors from zeros(), and a misspelt backend was only refused at the first batch."""
    X = torch.randn(4, D_IN, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.int32):
        with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
            HessianStats(D_IN, dtype=dtype).add_batch(X)
    for d_in in (-1, 0, "32", 32.0, True):
        with pytest.raises(ValueError, match=f"d_in must be a positive integer, got {d_in!r}"):
            HessianStats(d_in)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton', got 'Triton'"):
        HessianStats(D_IN, backend="Triton")


def test_hessian_stats_take_numpys_integer_width(gen):
    """Since 28db0c2 HessianStats(np.int64(32)) (a width read from a numpy array or config),
    which torch.zeros had taken, was refused as 'd_in must be a positive integer, got
    np.int64(32)'; taken as the int it is."""
    import numpy as np

    X = torch.randn(5, D_IN, generator=gen)
    stats, want = HessianStats(np.int64(D_IN)), HessianStats(D_IN)
    stats.add_batch(X)
    want.add_batch(X)
    assert torch.equal(stats.H, want.H) and stats.H.shape == (D_IN, D_IN)
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        HessianStats(np.float64(D_IN))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_statistics_keep_no_autograd_graph(gen, backend):
    """Weights given as Parameters and activations hooked from a forward outside no_grad: each
    batch's statistics were taken with autograd on the torch backend, so H, H_k and G kept every
    batch's inputs and their graphs alive (memory growing batch by batch); none kept now."""
    d_out, d_in = 4, 16
    W_m = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen))
    W_k = torch.nn.Parameter(W_m.detach() + 0.1 * torch.randn(d_out, d_in, generator=gen))
    hs = HessianStats(d_in, backend=backend)
    st = EPMQStats(W_m, backend=backend, residual_precision="ieee")
    st.begin_task(W_k)
    for _ in range(2):
        x = (torch.randn(8, d_in, generator=gen) * W_m[0]).detach().requires_grad_()
        hs.add_batch(x * 1.0)
        st.add_batch(x * 1.0, x_expert=x * 1.0)
    st.end_task()
    st.add_task(W_k, torch.eye(d_in))
    for t in (hs.H, *st.finalize()[:3]):
        assert not t.requires_grad and t.grad_fn is None


def test_statistics_of_a_parameter_check_its_values_without_autograds_warning(gen):
    """EPMQStats given a layer's weight as a Parameter checked its values (no NaN or inf) with
    autograd on: torch's "Converting a tensor with requires_grad=True to a scalar may lead to
    unexpected behavior" was printed for each layer; the values are read detached."""
    import warnings

    W_m = torch.nn.Parameter(torch.randn(4, 16, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EPMQStats(W_m, backend="torch")


def test_streaming_equals_whole_statistics(gen):
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) for _ in range(3)]
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 3.0)]

    streamed = _streamed(EPMQStats(W_m, dtype=torch.float64), W_k, data)
    whole = EPMQStats(W_m, dtype=torch.float64)
    for W, xs in zip(W_k, data):
        whole.add_task(W, gram(xs))

    a = [1 / float(torch.trace(gram(xs))) for xs in data]
    assert streamed.task_weights == pytest.approx(a)
    G = sum(a_k * (W - W_m) @ gram(xs) for a_k, W, xs in zip(a, W_k, data))
    for s in (streamed, whole):
        torch.testing.assert_close(s.H_e, sum(a_k * gram(xs) for a_k, xs in zip(a, data)))
        torch.testing.assert_close(s.H_m, sum(gram(xs) for xs in data))
        torch.testing.assert_close(s.G_e, G)
        c = sum(a_k * float((((W - W_m) @ gram(xs)) * (W - W_m)).sum()) for a_k, W, xs in zip(a, W_k, data))
        assert s.c_e == pytest.approx(c)
        assert s.G_m is None


@pytest.mark.parametrize("asymmetric", [False, True])
def test_layers_sharing_inputs_share_hessians(gen, asymmetric):
    """``inputs_of``: a second layer on the same inputs (k beside q) reads the first's H_k, H_e
    and H_m instead of accumulating them, and its own statistics equal those it would have
    accumulated alone, bit for bit."""
    W_q, W_v = (torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    experts = [(W_q + 0.1 * torch.randn(W_q.shape, generator=gen, dtype=torch.float64),
                W_v + 0.1 * torch.randn(W_v.shape, generator=gen, dtype=torch.float64)) for _ in range(2)]
    data = [batches(gen, scale=s) for s in (0.5, 2.0)]
    shifted = [[x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs] for xs in data]

    def stream(layers, which):
        for k, xs in enumerate(data):
            for stats, i in zip(layers, which):
                stats.begin_task(experts[k][i])
            for n, x in enumerate(xs):
                for stats in layers:
                    stats.add_batch(x, x_expert=shifted[k][n] if asymmetric else None)
            for stats in layers:
                stats.end_task()

    q = EPMQStats(W_q, dtype=torch.float64)
    v = EPMQStats(W_v, dtype=torch.float64, inputs_of=q)
    stream([q, v], [0, 1])
    alone = EPMQStats(W_v, dtype=torch.float64)
    stream([alone], [1])
    assert v.H_e is q.H_e and v.H_m is q.H_m
    for a, b in zip(v.finalize(), alone.finalize()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (v.c_e, v.task_weights) == (alone.c_e, alone.task_weights)


def test_sharing_inputs_misuse_is_reported(gen):
    W = torch.randn(D_OUT, D_IN, generator=gen)
    q = EPMQStats(W)
    k = EPMQStats(W, inputs_of=q)
    with pytest.raises(RuntimeError, match="begin the task on the layer whose inputs"):
        k.begin_task(W)
    with pytest.raises(RuntimeError, match="stream them"):
        k.add_task(W, torch.eye(D_IN))
    q.begin_task(W)
    k.begin_task(W)
    q.add_batch(batches(gen)[0])
    k.add_batch(batches(gen)[0])
    k.end_task()
    with pytest.raises(RuntimeError, match="has not folded in every task"):
        k.finalize()
    q.end_task()
    assert k.finalize()[0] is q.H_e
    with pytest.raises(ValueError, match="inputs_of"):
        EPMQStats(W[:, :-1], inputs_of=q)
    with pytest.raises(ValueError, match="merged Hessian"):
        EPMQStats(W, inputs_of=q, merged_hessian=torch.eye(D_IN))
    # (from a review) a task weight of its own would pair the leader's H_e with G_e weighted
    # otherwise: another objective, whose expert term came out negative
    lead = EPMQStats(W)
    v = EPMQStats(W, inputs_of=lead)
    lead.begin_task(W)
    v.begin_task(W, weight=2.0)
    x = batches(gen)[0]
    lead.add_batch(x)
    v.add_batch(x)
    lead.end_task()
    v.end_task()
    with pytest.raises(ValueError, match=r"task weights \[.*2.0\] differ from those of the layer whose inputs"):
        v.finalize()


def test_a_layer_sharing_inputs_must_see_the_same_tokens(gen):
    """(from a review) A layer that shares another's inputs forms its G_k from that layer's H_k:
    ended before a batch that went on there (with its own task weight, which no check of a_k
    catches), or given fewer batches (asymmetric targets, G_k from its own tokens), it paired its
    targets with other inputs and its statistics were silently another objective's."""
    W_q, W_v = (torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    E_v = W_v + 0.1 * torch.randn(W_v.shape, generator=gen, dtype=torch.float64)
    x1, x2 = batches(gen)[:2]
    q = EPMQStats(W_q, dtype=torch.float64)
    v = EPMQStats(W_v, dtype=torch.float64, inputs_of=q)
    q.begin_task(W_q, weight=1.0)
    v.begin_task(E_v, weight=1.0)
    q.add_batch(x1)
    v.add_batch(x1)
    v.end_task()  # (the leader has seen as many tokens as this layer so far)
    q.add_batch(x2)
    q.end_task()
    with pytest.raises(ValueError, match=r"calibration tokens per task .* differ"):
        v.finalize()
    q = EPMQStats(W_q, dtype=torch.float64)
    v = EPMQStats(W_v, dtype=torch.float64, inputs_of=q)
    q.begin_task(W_q)
    v.begin_task(E_v)
    q.add_batch(x1)
    v.add_batch(x1, x_expert=x1 + 0.1)
    q.add_batch(x2)
    q.end_task()
    with pytest.raises(ValueError, match=r"calibration tokens here but .* at the layer whose inputs"):
        v.end_task()


@pytest.mark.parametrize("targets", ["merged", "expert", "fp"])
def test_layers_sharing_inputs_check_and_convert_a_shared_batch_once(gen, monkeypatch, targets):
    """q, k and v given one batch (the walker hands them the same tensors) each checked its
    values for NaN (on a GPU a reduction and a wait for the device) and converted it to the
    statistics' dtype: three checks and copies of one input, three of its targets. The layers
    after the first take the first's checked copy of the same tensor (unchanged since: its
    version), bit for bit what they formed themselves; a tensor written in between is theirs."""
    import epmq.stats

    W = [torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) for _ in range(3)]
    E = [w + 0.1 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in W]
    xs = batches(gen)
    shifted = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    checked = []
    all_finite = epmq.stats.all_finite
    monkeypatch.setattr(epmq.stats, "all_finite", lambda t: checked.append(t) or all_finite(t))

    def stream(copies):
        q = EPMQStats(W[0], dtype=torch.float64)
        layers = [q] + [EPMQStats(w, dtype=torch.float64, inputs_of=q) for w in W[1:]]
        for stats, e in zip(layers, E):
            stats.begin_task(e)
        for x, s in zip(xs, shifted):
            for j, stats in enumerate(layers):
                x_j, s_j = (x.clone(), s.clone()) if copies and j else (x, s)
                x_t = None if targets == "merged" else s_j
                stats.add_batch(x_j, x_expert=x_t, x_anchor=x_t if targets == "fp" else None)
        for stats in layers:
            stats.end_task()
        return layers

    shared = stream(copies=False)
    inputs = 1 if targets == "merged" else 2
    assert len(checked) == inputs * len(xs)
    checked.clear()
    apart = stream(copies=True)
    assert len(checked) == 3 * inputs * len(xs)
    for a, b in zip(shared, apart):
        for u, v in zip(a.finalize(), b.finalize()):
            assert (u is None and v is None) or torch.equal(u, v)
        assert (a.c_e, a.c_m, a.task_weights) == (b.c_e, b.c_m, b.task_weights)
    # (a batch written in place after the first layer took it is read again, and checked)
    q = EPMQStats(W[0], dtype=torch.float64)
    k = EPMQStats(W[1], dtype=torch.float64, inputs_of=q)
    q.begin_task(E[0])
    k.begin_task(E[1])
    x = xs[0].clone()
    q.add_batch(x)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        k.add_batch(x)


def test_a_shallow_copy_keeps_its_own_constant(gen):
    """(From a review) the residuals' constants wait on the device in a list: a copy taken
    before more tasks are folded in keeps the value it had."""
    import copy

    W = torch.randn(D_OUT, D_IN, generator=gen)
    stats = EPMQStats(W, dtype=torch.float32)
    stats.add_task(W + 0.1 * torch.randn(D_OUT, D_IN, generator=gen), torch.eye(D_IN))
    before = copy.copy(stats)
    stats.add_task(W + 0.1 * torch.randn(D_OUT, D_IN, generator=gen), 2 * torch.eye(D_IN))
    assert before.c_e < stats.c_e and before.c_e == copy.copy(before).c_e


def _asymmetric(gen, dtype, *, anchor_noise=0.3, first_weight=1.5):
    """Two tasks streamed with target inputs X~ (x_expert) and anchor inputs X_a (x_anchor)
    beside the quantized path's X; task weights first_weight and first_weight + 1."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=dtype)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen, dtype=dtype) for _ in range(2)]
    X = [batches(gen) for _ in range(2)]
    X_t = [[x + 0.2 * torch.randn(x.shape, generator=gen) for x in xs] for xs in X]
    X_a = [[x + anchor_noise * torch.randn(x.shape, generator=gen) for x in xs] for xs in X]
    stats = EPMQStats(W_m, dtype=torch.float64)
    for k in range(2):
        stats.begin_task(W_k[k], weight=first_weight + k)
        for x, xt, xa in zip(X[k], X_t[k], X_a[k]):
            stats.add_batch(x, x_expert=xt, x_anchor=xa)
        stats.end_task()

    def flat(xs):
        return torch.cat([x.reshape(-1, D_IN) for x in xs]).double()

    return stats, W_m.double(), [W.double() for W in W_k], *[[flat(xs) for xs in Z] for Z in (X, X_t, X_a)]


def test_asymmetric_targets(gen):
    """Expert-path targets: C uses the target inputs X~ against the quantized-path inputs X."""
    stats, W_m, W_k, X, X_t, X_a = _asymmetric(gen, torch.float64)
    G = sum((1.5 + k) * (X_t[k] @ W_k[k].T - X[k] @ W_m.T).T @ X[k] for k in range(2))
    G_m = sum(((X_a[k] - X[k]) @ W_m.T).T @ X[k] for k in range(2))
    torch.testing.assert_close(stats.G_e, G)
    torch.testing.assert_close(stats.G_m, G_m)
    c = sum((1.5 + k) * float((X_t[k] @ W_k[k].T - X[k] @ W_m.T).pow(2).sum()) for k in range(2))
    assert stats.c_e == pytest.approx(c)


def test_asymmetric_targets_in_float32_keep_a_small_residual(gen):
    """W_k X~ - W_m X, for an expert near the merge seeing inputs near the quantized path's (a
    fine-tune's task vector, an early layer), is small against W_m X: formed as the difference of
    the two fp32 products it kept their rounding, ~6e-8 |W_m X|, and G_e was off by 1e-3 of
    itself where the two differ by 1e-4 (the merged path's G_e, from W_k - W_m, by 1e-7). Formed
    from the differences, it is as good as the merged path's."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = W_m + 1e-4 * torch.randn(D_OUT, D_IN, generator=gen)
    xs = batches(gen, scale=10.0)
    xts = [x + 1e-3 * torch.randn(x.shape, generator=gen) for x in xs]
    stats = EPMQStats(W_m, dtype=torch.float32)
    stats.begin_task(W_k, weight=1.0)
    for x, xt in zip(xs, xts):
        stats.add_batch(x, x_expert=xt)
    stats.end_task()
    X, X_t = (torch.cat([x.reshape(-1, D_IN) for x in z]).double() for z in (xs, xts))
    T = X_t @ W_k.double().T - X @ W_m.double().T
    G = T.T @ X
    assert float((stats.G_e.double() - G).norm() / G.norm()) < 1e-5
    assert stats.c_e == pytest.approx(float(T.pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asymmetric_targets_read_the_expert_weight_once_per_task(gen, dtype):
    """Each batch of an asymmetric task formed ``W_k - W_m`` in the statistics' dtype again (at
    4096 x 4096 in float64 as long as the batch's products): formed at the task's first batch, the
    statistics are those of the per-batch formula, bit for bit."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen)
    xs = batches(gen)
    xts = [x + 0.2 * torch.randn(x.shape, generator=gen) for x in xs]
    reads = []  # per batch, the calls that read W_k

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if any(a is W_k for a in args):
                reads[-1].append(func)
            return func(*args, **(kwargs or {}))

    stats = EPMQStats(W_m, dtype=dtype)
    stats.begin_task(W_k, weight=1.0)
    with Reads():
        for x, xt in zip(xs, xts):
            reads.append([])
            stats.add_batch(x, x_expert=xt)
    stats.end_task()
    assert reads[0] and not any(reads[1:]), reads
    W = W_m.to(dtype)
    G, c = torch.zeros_like(W), 0.0
    for x, xt in zip(xs, xts):
        X, X_t = x.reshape(-1, D_IN).to(dtype), xt.reshape(-1, D_IN).to(dtype)
        T = X_t @ (W_k.to(dtype) - W).T + (X_t - X) @ W.T
        G.addmm_(T.T, X)
        c = c + T.pow(2).sum().double()
    assert torch.equal(stats.G_e, G)
    assert stats.c_e == float(c)


def test_statistics_products_are_ieee_fp32_whatever_the_tf32_switch(gen, tf32_products):
    """With TF32 switched on by the caller (set_float32_matmul_precision("high"), common in
    training scripts), the torch backend's X^T X and (W_k - W_m) H_k (which its docstring says
    run with TF32 off), the asymmetric targets' and anchor's products on every backend, and the
    Hessian check's probes ran on a GPU as TF32 (operands cut to 10 mantissa bits: ~5e-4 of each
    product where IEEE fp32 leaves ~1e-7), where the Triton kernels and the solver are IEEE fp32;
    all are now."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen)
    x = torch.randn(9, D_IN, generator=gen)
    HessianStats(D_IN).add_batch(x)
    EPMQStats(W_m).add_task(W_k, gram([x]).float())
    stats = EPMQStats(W_m)
    stats.begin_task(W_k)
    stats.add_batch(x, x_expert=x + 0.1, x_anchor=x - 0.1)
    stats.end_task()
    stats.finalize()
    assert tf32_products == []


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_asymmetric_reported_terms(gen, percdamp):
    """The reported expert and anchor terms are the objective's, straight from the tokens,
    when targets (x_expert) and the anchor (x_anchor) see other inputs than the quantized path."""
    stats, W_m, W_k, X, X_t, X_a = _asymmetric(gen, torch.float32)
    res = quant.epmq_from_stats(stats, QuantSpec(bits=3, group_size=16), anchor=0.7,
                                weight_anchor=0.2, percdamp=percdamp)
    Q = res.weight.double()
    expert = sum((1.5 + k) * float((X[k] @ Q.T - X_t[k] @ W_k[k].T).pow(2).sum()) for k in range(2))
    anchor = sum(float((X[k] @ Q.T - X_a[k] @ W_m.T).pow(2).sum()) for k in range(2))
    total = expert + res.info["lam_effective"] * anchor
    assert res.expert_loss == pytest.approx(expert, rel=1e-6, abs=1e-9 * total)
    assert res.anchor_loss == pytest.approx(res.info["lam_effective"] * anchor, rel=1e-6, abs=1e-9 * total)
    assert res.weight_anchor_loss == pytest.approx(
        res.info["mu_effective"] * float((Q - W_m).pow(2).sum()), rel=1e-6)


def test_a_batch_refused_adds_nothing(gen):
    """add_batch folded x into H_k before it read x_expert and x_anchor: one of another width or
    token count was refused with the batch already counted, so the same batch given again, put
    right, was counted twice (H_m twice its Gram matrix, silently), or refused as "give x_expert
    for every batch of a task or for none". A refused batch now leaves the statistics as they were."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    W_k = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    x, xt, xa = batches(gen, n_batches=3)
    once = EPMQStats(W_m, dtype=torch.float64)
    once.begin_task(W_k)
    once.add_batch(x, x_expert=xt, x_anchor=xa)
    once.end_task()
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.begin_task(W_k)
    for bad, match in ((dict(x_expert=xt[:, :, :-1]), "x_expert of task 0 must have last dimension"),
                       (dict(x_expert=xt[:-1]), "x_expert of task 0 has 28 tokens, the inputs 35"),
                       (dict(x_expert=xt, x_anchor=xa[:-1]), "x_anchor has 28 tokens, the inputs 35")):
        with pytest.raises(ValueError, match=match):
            stats.add_batch(x, **{"x_expert": xt, "x_anchor": xa, **bad})
    stats.add_batch(x, x_expert=xt, x_anchor=xa)
    stats.end_task()
    for a, b in zip(stats.finalize(), once.finalize()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stats.task_tokens == once.task_tokens == [35] and stats.c_e == once.c_e


def test_a_task_weight_is_refused_when_the_task_begins(gen):
    """begin_task(W_k, weight=-2) (or NaN, "1", True) was taken, and refused only at end_task,
    after every batch of the task had been streamed, the task then lost."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    stats = EPMQStats(W_m, dtype=torch.float64)
    for weight, match in ((-2, "must be finite and >= 0, got -2"), (float("nan"), "must be finite and >= 0, got nan"),
                          ("1", "must be a number, got '1'"), (True, "must be a number, got True")):
        with pytest.raises(ValueError, match=f"task weight of task 0 {match}"):
            stats.begin_task(W_m + 0.1, weight=weight)
    stats.begin_task(W_m + 0.1, weight=2.0)  # (none of them left a task open)
    stats.add_batch(batches(gen)[0])
    stats.end_task()
    assert stats.task_weights == [2.0]


def test_fp_path_control_is_asymmetric_gptq(gen):
    """GPTQ with full-precision-path targets: W* = W_m X~ X^T (X X^T)^{-1}."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    X = batches(gen, n_batches=4)
    X_fp = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in X]
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.begin_task(W_m, weight=1.0)
    for x, xf in zip(X, X_fp):
        stats.add_batch(x, x_expert=xf)
    stats.end_task()
    res = quant.epmq_from_stats(stats, QuantSpec(bits=4, group_size=16), anchor=0.0, percdamp=0.0)
    Xq = torch.cat([x.reshape(-1, D_IN) for x in X]).double()
    Xf = torch.cat([x.reshape(-1, D_IN) for x in X_fp]).double()
    W_star = W_m.double() @ Xf.T @ Xq @ torch.linalg.inv(Xq.T @ Xq)
    torch.testing.assert_close(res.target.double(), W_star, rtol=1e-5, atol=1e-5)


def test_explicit_merged_hessian(gen):
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    H_m = gram(batches(gen))
    stats = EPMQStats(W_m, merged_hessian=H_m, dtype=torch.float64)
    stats.add_task(W_m + 0.1, gram(batches(gen)))
    torch.testing.assert_close(stats.H_m, H_m)
    with pytest.raises(ValueError, match="x_anchor needs the merged Hessian"):
        stats.begin_task(W_m)
        stats.add_batch(batches(gen)[0], x_anchor=batches(gen)[0])


def test_misuse_is_reported(gen):
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    stats = EPMQStats(W_m)
    with pytest.raises(RuntimeError, match="begin_task"):
        stats.add_batch(batches(gen)[0])
    with pytest.raises(ValueError, match="no task was added"):
        stats.finalize()
    stats.begin_task(W_m, name="mnist")
    with pytest.raises(ValueError, match="mnist has no calibration data"):
        stats.end_task()
    stats.begin_task(W_m, name="svhn")
    with pytest.raises(ValueError, match="last dimension 32"):
        stats.add_batch(torch.randn(4, 31))
    with pytest.raises(ValueError, match="non-finite"):
        stats.add_batch(torch.full((4, D_IN), float("nan")))
    stats.add_batch(torch.randn(4, D_IN))
    with pytest.raises(ValueError, match="x_expert for every batch"):
        stats.add_batch(torch.randn(4, D_IN), x_expert=torch.randn(4, D_IN))
    with pytest.raises(RuntimeError, match="svhn is still open"):
        stats.finalize()
    with pytest.raises(ValueError, match="has shape"):
        EPMQStats(W_m).begin_task(W_m[:, :-1])


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "bf16x3", "tf32"])
def test_residual_precision_of_the_triton_statistics(gen, precision):
    """EPMQStats(residual_precision=...) reaches the Triton residual kernel (fp32 statistics):
    both products agree with the torch backend to about fp32 rounding, and quant.epmq passes
    the option through."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    H_k = [gram(batches(gen, scale=s)).float() for s in (0.5, 2.0)]
    ref = EPMQStats(W_m, backend="torch")
    got = EPMQStats(W_m, backend="triton", residual_precision=precision)
    assert got.residual_precision == precision
    for W, H in zip(W_k, H_k):
        ref.add_task(W, H)
        got.add_task(W, H)
    scale = ref.G_e.abs().max()
    rel = 1e-5 if precision != "tf32" else 1e-2  # tf32: operands keep 10 mantissa bits
    assert (got.G_e - ref.G_e).abs().max() <= rel * scale
    assert abs(got.c_e - ref.c_e) <= rel * abs(ref.c_e)
    spec = QuantSpec(bits=4, group_size=16, sym=False)
    result = quant.epmq(W_m, W_k, H_k, spec, backend="triton", residual_precision=precision)
    assert torch.isfinite(result.weight).all()


@pytest.mark.parametrize("merged_given", [False, True])
def test_triton_statistics_fold_every_hessian_once(gen, merged_given):
    """On the Triton backend the experts' Hessians are folded FOLD_ARITY at a time (add_tasks)
    or one by one (streamed tasks, and the layers that share their inputs): H_e, H_m and the
    task weights are the torch backend's, for 9 experts (groups of 4, 4 and 1), a merged
    Hessian given (not folded) or not, fp64 Hessians converted to the fp32 statistics."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(9)]
    H_k = [gram(batches(gen, n_batches=1, scale=0.5 + k)) for k in range(9)]  # (fp64)
    weights = [None] * 8 + [0.25]
    merged = gram(batches(gen)).float() if merged_given else None
    ref = EPMQStats(W_m, backend="torch", merged_hessian=merged)
    got = EPMQStats(W_m, backend="triton", merged_hessian=merged)
    ref.add_tasks(W_k, H_k, weights)
    got.add_tasks(W_k, H_k, weights)
    assert got.task_weights == pytest.approx(ref.task_weights, rel=1e-6)
    for name in ("H_e", "H_m", "G_e"):
        want, have = getattr(ref, name), getattr(got, name)
        assert (have - want).abs().max() <= 1e-5 * want.abs().max(), name
    if merged_given:
        assert torch.equal(got.H_m, merged)
    # streamed: a leader folds each task's H_k once, its follower (same inputs) none
    xs = [batches(gen, scale=s) for s in (0.5, 2.0)]
    results = []
    for backend in ("torch", "triton"):
        lead = EPMQStats(W_m, backend=backend)
        follow = EPMQStats(W_m[:5], backend=backend, inputs_of=lead)
        for W, batch in zip(W_k, xs):
            lead.begin_task(W)
            follow.begin_task(W[:5])
            for x in batch:
                lead.add_batch(x)
                follow.add_batch(x)
            lead.end_task()
            follow.end_task()
        results.append((lead.H_e.clone(), lead.H_m.clone(), follow.G_e.clone()))
    for want, have in zip(*results):
        assert (have - want).abs().max() <= 1e-5 * want.abs().max()


def test_hessians_that_need_converting_are_folded_alone(gen, monkeypatch):
    """add_tasks folds up to FOLD_ARITY Hessians a pass, but one that must be converted (an
    fp64 Hessian into fp32 statistics) alone: one converted copy alive at a time."""
    import epmq.stats as stats_module

    sizes = []
    fold = stats_module.fold_hessians
    monkeypatch.setattr(stats_module, "fold_hessians",
                        lambda H_e, H_m, Hs, a_s, **kw: (sizes.append(len(Hs)), fold(H_e, H_m, Hs, a_s, **kw)))
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(9)]
    H_k = [gram(batches(gen, n_batches=1, scale=0.5 + k)) for k in range(9)]
    H_k = [H if k == 5 else H.float() for k, H in enumerate(H_k)]  # (expert 5 in fp64)
    got = EPMQStats(W_m, backend="triton")
    got.add_tasks(W_k, H_k)
    assert sizes == [4, 1, 1, 3]
    ref = EPMQStats(W_m, backend="torch")
    ref.add_tasks(W_k, H_k)
    assert (got.H_e - ref.H_e).abs().max() <= 1e-5 * ref.H_e.abs().max()


def test_begin_task_checks_values_unless_the_caller_has(gen, monkeypatch):
    """An expert weight's values are checked (NaN refused) unless the caller says it checked
    them (the walker's reader does: no second pass and wait); its shape is checked always."""
    import epmq.checks as checks

    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    bad = W_m.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        EPMQStats(W_m).begin_task(bad)
    with pytest.raises(ValueError, match="has shape"):
        EPMQStats(W_m).begin_task(W_m[:, 1:], values_checked=True)
    stats, scans = EPMQStats(W_m), []
    monkeypatch.setattr(checks, "all_finite", lambda t: scans.append(t) or True)
    stats.begin_task(W_m.clone(), values_checked=True)
    assert scans == []


def test_residual_precision_is_checked(gen):
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    with pytest.raises(ValueError, match="residual_precision"):
        EPMQStats(W_m, residual_precision="bf16")
    with pytest.raises(ValueError, match="residual_precision"):
        quant.epmq(W_m, [W_m], [torch.eye(D_IN)], QuantSpec(bits=4, group_size=16, sym=False),
                   residual_precision="fp16")


def test_asymmetric_anchor_constant_is_in_the_expert_term(gen):
    """With an anchor whose inputs differ a little from the quantized path's (x_anchor near x),
    the anchor's constant lam c_m is small against the expert term, which must still be the
    objective's value: L(Q) = sum_k a_k |X_k Q^T - X~_k W_k^T|^2 + lam |X Q^T - X_a W_m^T|^2 +
    mu |Q - W_m|^2, term by term, straight from the tokens."""
    stats, W_m, W_k, X, X_t, X_a = _asymmetric(gen, torch.float32, anchor_noise=0.01, first_weight=1.0)
    res = quant.epmq_from_stats(stats, QuantSpec(bits=3, group_size=16), anchor=0.5, weight_anchor=0.1)
    Q = res.weight.double()
    expert = sum((1.0 + k) * float((X[k] @ Q.T - X_t[k] @ W_k[k].T).pow(2).sum()) for k in range(2))
    anchor = sum(float((X[k] @ Q.T - X_a[k] @ W_m.T).pow(2).sum()) for k in range(2))
    lam, mu = res.info["lam_effective"], res.info["mu_effective"]
    assert lam * anchor < expert  # (the regime where the expert term is not re-measured)
    assert res.expert_loss == pytest.approx(expert, rel=1e-6)
    assert res.anchor_loss == pytest.approx(lam * anchor, rel=1e-6)
    assert res.weight_anchor_loss == pytest.approx(mu * float((Q - W_m).pow(2).sum()), rel=1e-6)


def test_task_weights_must_be_finite_and_non_negative(gen):
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    H = gram(batches(gen))
    for bad in (-0.5, float("nan"), float("inf")):
        stats = EPMQStats(W_m, dtype=torch.float64)
        with pytest.raises(ValueError, match="task weight of t must be finite and >= 0"):
            stats.add_task(W_m + 0.1, H, weight=bad, name="t")
        with pytest.raises(ValueError, match="task weight of t must be finite and >= 0"):  # (not at end_task)
            EPMQStats(W_m, dtype=torch.float64).begin_task(W_m + 0.1, weight=bad, name="t")
    for bad in (True, "2"):  # (float() read them as 1 and 2)
        with pytest.raises(ValueError, match="task weight of t must be a number"):
            EPMQStats(W_m, dtype=torch.float64).add_task(W_m + 0.1, H, weight=bad, name="t")


def test_a_task_whose_trace_overflows_is_an_error(gen):
    """(from a review) A task whose tr(H_k) overflowed the statistics' dtype got the default
    a_k = 1 / inf = 0: dropped silently, and 0 * inf put NaN into H_e (the solve then failed on
    "the Hessian's mean diagonal nan"). float16 statistics, which overflow after a few thousand
    tokens (a_k = 0, then "task_weights all 0"), are refused."""
    W = torch.randn(D_OUT, D_IN, generator=gen)
    stats = EPMQStats(W)
    stats.begin_task(W + 0.1)
    stats.add_batch(batches(gen)[0])
    stats.end_task()
    stats.begin_task(W - 0.1, name="loud")
    stats.add_batch(3e18 * batches(gen)[0])
    with pytest.raises(ValueError, match=r"loud: tr\(H_k\) is inf in the statistics' dtype"):
        stats.end_task()
    assert stats.task_weights == [pytest.approx(1 / float(torch.diagonal(stats.H_m).sum()))]
    assert bool(torch.isfinite(stats.H_e).all())
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
            EPMQStats(W, dtype=dtype)
    # a float16 Hessian given whole, whose trace overflows float16 but not the statistics' dtype
    X = torch.randn(8000, D_IN, generator=gen)
    H = (X.T @ X).half()
    assert not math.isfinite(float(torch.diagonal(H).sum()))
    stats = EPMQStats(W, dtype=torch.float64)
    stats.add_tasks([W + 0.1], [H])
    assert stats.task_weights == [pytest.approx(1 / float(torch.diagonal(H.double()).sum()))]


def test_a_task_whose_inputs_are_all_zero_is_dropped(gen):
    """Tokens that are all zero at this layer add nothing to the objective whatever the task's
    weight (its H_k and G_k are zero): the task is left out, and the statistics are those of the
    other tasks; with no other task, finalize says why."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    W_1 = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    W_2 = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    xs = batches(gen)
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.begin_task(W_1, name="silent")
    stats.add_batch(torch.zeros(4, D_IN))
    stats.end_task()
    stats.begin_task(W_2, name="live")
    for x in xs:
        stats.add_batch(x)
    stats.end_task()
    assert stats.empty_tasks == ["silent"] and stats.task_names == ["live"]
    H = gram(xs)
    a = 1 / float(torch.trace(H))
    H_e, H_m, G_e, _ = stats.finalize()
    torch.testing.assert_close(H_e, a * H)
    torch.testing.assert_close(H_m, H)
    torch.testing.assert_close(G_e, a * (W_2 - W_m) @ H)
    only = EPMQStats(W_m, dtype=torch.float64)
    only.begin_task(W_1, name="silent")
    only.add_batch(torch.zeros(4, D_IN))
    only.end_task()
    with pytest.raises(ValueError, match="no task was added.*inputs all zero: silent"):
        only.finalize()


class _Reads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the scalar reads (``float(t)``, ``bool(t)``, ``.item()``): on a GPU each one waits
    for the queue to drain."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_expert_costs_few_device_reads(gen, dtype):
    """Folding in an expert reads back two scalars at most (its weight's finiteness and its
    Hessian's trace, read with the Hessian's checks); its residual's constant stays on the
    device until c_e is read (each was nine reads, the checks' six included)."""
    def reads(K):
        W_m = torch.randn(6, 10, generator=gen, dtype=dtype)
        stats = EPMQStats(W_m, dtype=torch.float32)
        experts = [(W_m + 0.1 * torch.randn(6, 10, generator=gen, dtype=dtype),
                    (lambda X: X.T @ X)(torch.randn(20, 10, generator=gen, dtype=dtype)))
                   for _ in range(K)]
        with _Reads() as counter:
            for W_k, H_k in experts:
                stats.add_task(W_k, H_k)
        c_e = stats.c_e
        ref = sum(a * float(((W_k - W_m).double() @ H_k.double() * (W_k - W_m).double()).sum())
                  for a, (W_k, H_k) in zip(stats.task_weights, experts))
        assert c_e == pytest.approx(ref, rel=1e-5)
        return counter.n

    per_expert = (reads(5) - reads(1)) / 4
    assert per_expert <= (1 if dtype == torch.float32 else 2), per_expert


def test_add_tasks_checks_every_expert_in_one_read(gen, host_reads):
    """``add_tasks`` (what ``quant.epmq`` calls) folds in the experts exactly as ``add_task`` one
    by one does, with all their checks read back at once: its reads do not grow with the
    number of experts (two per expert before, each waiting for the device's queue)."""
    W_m = torch.randn(6, 10, generator=gen)

    def experts(K):
        return [(W_m + 0.1 * torch.randn(6, 10, generator=gen),
                 (lambda X: X.T @ X)(torch.randn(20, 10, generator=gen))) for _ in range(K)]

    def reads(K):
        pairs = experts(K)
        stats = EPMQStats(W_m, dtype=torch.float32)
        return host_reads(lambda: stats.add_tasks([W for W, _ in pairs], [H for _, H in pairs]))

    reads(1)  # (the Hessian check's probe vectors are made, with one read, once per width: made here
    # whatever ran before; another test's widths may have evicted them from their small cache)
    assert reads(1) == reads(6) == 1
    pairs = experts(3)
    one_by_one, at_once = EPMQStats(W_m, dtype=torch.float64), EPMQStats(W_m, dtype=torch.float64)
    for k, (W_k, H_k) in enumerate(pairs):
        one_by_one.add_task(W_k, H_k, weight=0.5 + k, name=f"t{k}")
    at_once.add_tasks([W for W, _ in pairs], [H for _, H in pairs], [0.5, 1.5, 2.5],
                      ["t0", "t1", "t2"])
    for a, b in zip(one_by_one.finalize(), at_once.finalize()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert one_by_one.task_names == at_once.task_names and one_by_one.c_e == at_once.c_e


def _sequential_error(W_m, weights, hessians, task_weights, names):
    """The first error that checking the experts one by one gives (the public checks, in
    add_task's order), or None."""
    from epmq.checks import check_hessian, check_weight

    stats = EPMQStats(W_m, dtype=torch.float32)
    try:
        for W, H, a, name in zip(weights, hessians, task_weights, names):
            check_weight(W, f"expert weight of {name}")
            if W.shape != W_m.shape:
                raise ValueError(f"expert weight of {name} has shape {tuple(W.shape)}, the merged "
                                 f"weight {tuple(W_m.shape)}")
            stats._task_weight(a, check_hessian(H, W_m.shape[1], f"Hessian of {name}"), name)
    except ValueError as error:
        return str(error)
    return None


BAD = ["weight nan", "weight int", "weight 1-D", "hessian inf", "hessian asymmetric",
       "hessian shape", "weight shape", "task weight", "zero hessian"]


def _spoil(kind, gen, W, H, a):
    if kind == "weight nan":
        W = W.clone()
        W[2, 3] = float("nan")
    elif kind == "weight int":
        W = W.to(torch.int32)
    elif kind == "weight 1-D":
        W = W[0]
    elif kind == "hessian inf":
        H = H.clone()
        H[4, 4] = float("inf")
    elif kind == "hessian asymmetric":
        H = H.clone()
        H[0, 5] += 100.0 * float(H.abs().max())
    elif kind == "hessian shape":
        H = H[:9, :9]
    elif kind == "weight shape":
        W = W[:, :9]
    elif kind == "task weight":
        a = -1.0
    else:
        H = torch.zeros_like(H)
    return W, H, a


@pytest.mark.parametrize("trial", range(12))
def test_add_tasks_errors_as_one_by_one(gen, trial):
    """With one to three bad experts among five (of any kind, at any place), ``add_tasks``
    raises the error that checking them one by one raises first, and folds in nothing."""
    W_m = torch.randn(6, 10, generator=gen)
    weights = [W_m + 0.1 * torch.randn(6, 10, generator=gen) for _ in range(5)]
    hessians = [(lambda X: X.T @ X)(torch.randn(20, 10, generator=gen)) for _ in range(5)]
    task_weights = [0.5] * 5
    names = [f"t{k}" for k in range(5)]
    n_bad = int(torch.randint(1, 4, (1,), generator=gen))
    for k in torch.randperm(5, generator=gen)[:n_bad].tolist():
        kind = BAD[int(torch.randint(len(BAD), (1,), generator=gen))]
        weights[k], hessians[k], task_weights[k] = _spoil(kind, gen, weights[k], hessians[k],
                                                          task_weights[k])
    want = _sequential_error(W_m, weights, hessians, task_weights, names)
    assert want is not None
    stats = EPMQStats(W_m, dtype=torch.float32)
    with pytest.raises(ValueError) as raised:
        stats.add_tasks(weights, hessians, task_weights, names)
    assert str(raised.value) == want
    assert stats.task_weights == [] and not bool(stats.H_e.any())  # nothing folded in


def test_add_tasks_needs_one_of_everything_per_expert(gen):
    W_m = torch.randn(6, 10, generator=gen)
    Ws = [W_m.clone() for _ in range(3)]
    Hs = [torch.eye(10) for _ in range(3)]
    stats = EPMQStats(W_m, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 expert weights but 2 expert Hessians"):
        stats.add_tasks(Ws, Hs[:2])
    with pytest.raises(ValueError, match="3 expert weights but 1 task weights"):
        stats.add_tasks(Ws, Hs, [1.0])
    with pytest.raises(ValueError, match="3 expert weights but 2 names"):
        stats.add_tasks(Ws, Hs, None, ["a", "b"])
    assert stats.task_weights == []


def test_add_tasks_names_an_empty_weight_of_the_wrong_shape_on_any_device():
    """An empty expert weight of the wrong shape on another device than the CPU (meta here, as
    a GPU would be) gets the shape error, not a device mismatch of the checks' numbers."""
    W_m = torch.randn(6, 10)
    stats = EPMQStats(W_m, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expert weight of task 0 has shape \(0, 10\)"):
        stats.add_tasks([torch.empty(0, 10, device="meta")], [torch.eye(10)])


# ----------------------------------------------------------------- the side stream


class _DeferredSideStream:
    """A side stream for the CPU that runs nothing until a stream waits for its event: a read of
    G_e or c_e that does not join reads them before the residual products."""

    def __init__(self):
        self.queue, self.launches = [], []

    def launch(self, launch, uses, *, holds=False):
        trace, event = torch.zeros((), dtype=torch.float64), object()
        self.queue.append((event, launch, trace))
        self.launches.append(holds)
        return trace, event

    def wait_event(self, event):
        for i, (queued, _, _) in enumerate(self.queue):
            if queued is event:
                for _, launch, trace in self.queue[:i + 1]:
                    trace.copy_(launch())
                del self.queue[:i + 1]
                return


@pytest.fixture
def deferred(monkeypatch):
    import epmq_kernels.expert_residual as er

    side = _DeferredSideStream()
    monkeypatch.setattr(er, "side_stream_launch", side.launch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: side)
    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: self.side_stream)
    return side


@pytest.mark.parametrize("path", ["whole", "streamed", "streamed_asymmetric"])
def test_residuals_on_a_side_stream_are_joined_before_every_read(gen, monkeypatch, deferred, path):
    """With residual products that run only when a stream waits for them, E-PMQ gives bit for
    bit what it gives with them run at once: G_e, c_e, finalize, the walker's move to the CPU and
    the solve's G wait for them, and the solve factors H before it waits."""
    from epmq.walker import _on_cpu

    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(3)]
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 2.0)]
    spec = QuantSpec(bits=4, group_size=16)

    def run():
        stats = EPMQStats(W_m, backend="triton", side_stream=True)
        if path == "whole":
            stats.add_tasks(W_k, [gram(xs).float() for xs in data])
        else:
            for k, (W, xs) in enumerate(zip(W_k, data)):
                stats.begin_task(W)
                for x in xs:
                    stats.add_batch(x, x_expert=x + 0.1 if path == "streamed_asymmetric" and k == 1 else None)
                stats.end_task()
        return stats

    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: False)
    ref = run()
    ref_G, ref_c = ref.G_e.clone(), ref.c_e
    expected = quant.epmq_from_stats(ref, spec, backend="triton", anchor=0.5)
    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: True)
    n_side = 3 if path != "streamed_asymmetric" else 2
    # (nothing ran yet, but the first task's product before the second task's G_k was added)
    pending = 3 if path != "streamed_asymmetric" else 1
    for read in ("G_e", "c_e", "finalize", "on_cpu"):
        got = run()
        assert len(deferred.queue) == pending and not torch.equal(got._G_e, ref_G)
        if read == "G_e":
            assert torch.equal(got.G_e, ref_G)
        elif read == "c_e":
            assert got.c_e == ref_c
        elif read == "finalize":
            assert torch.equal(got.finalize()[2], ref_G)
        else:
            moved = _on_cpu(got)
            assert not deferred.queue and torch.equal(moved._G_e, ref_G) and moved.c_e == ref_c
        assert not deferred.queue and torch.equal(got._G_e, ref_G)

    factored_with_pending = []
    factor = quant._factor
    monkeypatch.setattr(quant, "_factor", lambda *a, **k: (factored_with_pending.append(len(deferred.queue)),
                                                           factor(*a, **k))[1])
    got = run()
    result = quant.epmq_from_stats(got, spec, backend="triton", anchor=0.5)
    assert factored_with_pending == [pending]  # (H factored while the products were pending)
    assert torch.equal(result.codes, expected.codes) and torch.equal(result.target, expected.target)
    assert (result.loss, result.expert_loss, result.anchor_loss) == (
        expected.loss, expected.expert_loss, expected.anchor_loss)
    # the statistics' own streamed Hessians are held for the products; the caller's are not
    assert deferred.launches == [path != "whole"] * (5 * n_side)


def test_a_residual_on_the_current_stream_waits_for_the_side_stream(gen, deferred, monkeypatch):
    """(From a review) statistics whose products moved off the side stream mid-way (a graph's
    capture began, the switch was turned off) add the next one after those still pending."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    H_k = [gram(batches(gen)).float() for _ in range(2)]
    ref = EPMQStats(W_m, backend="triton")
    ref.add_tasks(W_k, H_k)
    stats = EPMQStats(W_m, backend="triton", side_stream=True)
    stats.add_task(W_k[0], H_k[0])
    assert len(deferred.queue) == 1
    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: False)
    stats.add_task(W_k[1], H_k[1])
    assert not deferred.queue and torch.equal(stats._G_e, ref.G_e)


def test_quant_epmq_runs_its_residuals_on_the_side_stream_and_joins_on_errors(gen, deferred, monkeypatch):
    """quant.epmq promises its statistics the caller's tensors (side_stream=True) and waits for
    the products before it returns, also when it raises after they were launched (they read the
    caller's tensors, which the caller may then write to)."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    H_k = [gram(batches(gen)) for _ in range(2)]  # (float64, the CPU statistics' own: no copy)
    spec = QuantSpec(bits=4, group_size=16)
    got = quant.epmq(W_m, W_k, H_k, spec, backend="triton")
    assert deferred.launches == [False, False] and not deferred.queue
    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: False)
    ref = quant.epmq(W_m, W_k, H_k, spec, backend="triton")
    assert torch.equal(got.codes, ref.codes) and got.loss == ref.loss
    monkeypatch.setattr(EPMQStats, "_on_side", lambda self: self.side_stream)
    with pytest.raises(ValueError, match="expert term is zero"):
        quant.epmq(W_m, W_k, H_k, spec, backend="triton", task_weights=[0.0, 0.0])
    assert len(deferred.launches) == 4 and not deferred.queue


# ----------------------------------------------------------------- the side stream on a GPU


def _slow_side_stream(monkeypatch, cycles=20_000_000):
    """Every residual product on the side stream starts ``cycles`` GPU clocks late (~10 ms), and
    its trace lands in a tensor filled with NaN on the current stream first: a read of G_e (zero
    until then) or c_e that does not wait for it reads the value before the product."""
    import epmq_kernels.expert_residual as er

    launches = []
    real = er.side_stream_launch

    def slow(launch, uses, **kw):
        launches.append(kw.get("holds", False))
        trace = torch.full((), float("nan"), dtype=torch.float64, device=uses[0].device)

        def late():
            torch.cuda._sleep(cycles)
            return trace.copy_(launch())

        return real(late, list(uses) + [trace], **kw)

    monkeypatch.setattr(er, "side_stream_launch", slow)
    return launches


def _streamed_epmq(gen_cuda, W_m, W_k, spec, *, asymmetric_task=None):
    """E-PMQ from statistics streamed task by task on the GPU (the walker's path)."""
    stats = EPMQStats(W_m, backend="triton", side_stream=True)
    for k, W in enumerate(W_k):
        stats.begin_task(W)
        for _ in range(2):
            x = torch.randn(64, W_m.shape[1], device="cuda", generator=gen_cuda)
            if k == asymmetric_task:
                stats.add_batch(x, x_expert=x + 0.1 * torch.randn(x.shape, device="cuda", generator=gen_cuda))
            else:
                stats.add_batch(x)
        stats.end_task()
    c_e = stats.c_e
    return quant.epmq_from_stats(stats, spec, backend="triton", anchor=0.5), c_e


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["whole", "streamed", "streamed_asymmetric"])
def test_cuda_residuals_on_the_side_stream_are_waited_for(gen, monkeypatch, path):
    """E-PMQ with its residual products on a side stream that runs late gives bit for bit what
    it gives with them on the current stream."""
    import epmq.stats as st
    import epmq_kernels._runtime as rt

    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")  # (first configs: the GPU suite's time is for benchmarks)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    d_out, d_in, K = 256, 384, 4
    W_m = torch.randn(d_out, d_in, generator=gen).cuda()
    W_k = [W_m + 0.05 * torch.randn(d_out, d_in, generator=gen).cuda() for _ in range(K)]
    X = [torch.randn(300, d_in, generator=gen).cuda() for _ in range(K)]
    H_k = [x.T @ x for x in X]
    spec = QuantSpec(bits=4, group_size=128)

    def run():
        if path == "whole":
            return quant.epmq(W_m, W_k, H_k, spec, backend="triton", anchor=0.5), None
        gen_cuda = torch.Generator(device="cuda").manual_seed(seed)
        return _streamed_epmq(gen_cuda, W_m, W_k, spec,
                              asymmetric_task=1 if path == "streamed_asymmetric" else None)

    monkeypatch.setattr(st, "RESIDUALS_ON_SIDE_STREAM", False)
    ref, ref_c_e = run()
    monkeypatch.setattr(st, "RESIDUALS_ON_SIDE_STREAM", True)
    monkeypatch.setattr(rt, "SIDE_HELD_MAX", 2)  # (the streamed tasks' Hessians: the host waits)
    launches = _slow_side_stream(monkeypatch)
    got, got_c_e = run()
    assert len(launches) == (K if path != "streamed_asymmetric" else K - 1)
    # (a caller's own Hessians are not held for the products; the streamed ones are)
    assert all(launches) if path != "whole" else not any(launches)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.target, ref.target)
    assert (got.loss, got.expert_loss, got.anchor_loss) == (ref.loss, ref.expert_loss, ref.anchor_loss)
    assert got_c_e == ref_c_e


@pytest.mark.cuda
def test_cuda_statistics_read_after_the_side_stream(gen, monkeypatch):
    """G_e, c_e, finalize() and the walker's move to the CPU (its out-of-memory fallback) all
    wait for the residual products still on the side stream; statistics made without
    side_stream=True never use it."""
    import epmq.stats as st
    from epmq.walker import _on_cpu

    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")
    monkeypatch.setattr(st, "RESIDUALS_ON_SIDE_STREAM", True)
    W_m = torch.randn(128, 256, generator=gen).cuda()
    W_k = [W_m + 0.1 * torch.randn(128, 256, generator=gen).cuda() for _ in range(3)]
    H_k = [(lambda x: x.T @ x)(torch.randn(400, 256, generator=gen).cuda()) for _ in range(3)]
    launches = _slow_side_stream(monkeypatch)
    ref = EPMQStats(W_m, backend="triton")  # (side_stream=False: the current stream)
    ref.add_tasks(W_k, H_k)
    G_ref, c_ref = ref.G_e.clone(), ref.c_e
    assert not launches
    for read in ("c_e", "G_e", "finalize", "on_cpu"):
        stats = EPMQStats(W_m, backend="triton", side_stream=True)
        stats.add_tasks(W_k, H_k)
        assert stats._side_done is not None
        if read == "G_e":
            assert torch.equal(stats.G_e, G_ref)
        elif read == "c_e":
            assert stats.c_e == c_ref
        elif read == "finalize":
            assert torch.equal(stats.finalize()[2], G_ref)
        else:
            moved = _on_cpu(stats)
            assert torch.equal(moved.G_e, G_ref.cpu()) and moved.c_e == c_ref
    assert len(launches) == 12


# ---------------------------------------------------------------------------- low-rank experts


def _low_rank_experts(gen, n, rank=3, W_0=None, dtype=torch.float64):
    """``n`` experts ``W_0 + U V`` of one base and a merge of them (task arithmetic, 0.6)."""
    W_0 = torch.randn(D_OUT, D_IN, generator=gen, dtype=dtype) if W_0 is None else W_0
    experts = [LowRankExpert(W_0, 0.2 * torch.randn(D_OUT, rank, generator=gen, dtype=dtype),
                             torch.randn(rank, D_IN, generator=gen, dtype=dtype)) for _ in range(n)]
    W_m = W_0 + 0.6 * sum(e.U @ e.V for e in experts)
    return W_0, experts, W_m


def _count_dense_products(monkeypatch):
    import epmq.stats

    calls = []
    accumulate = epmq.stats.accumulate_residual
    monkeypatch.setattr(epmq.stats, "accumulate_residual",
                        lambda *a, **k: (calls.append(a[1].shape), accumulate(*a, **k))[1])
    return calls


def _fill(stats, experts, data, path):
    if path == "whole":
        stats.add_tasks(experts, [gram(xs) for xs in data])
        return
    for expert, xs in zip(experts, data):
        stats.begin_task(expert)
        for x in xs:
            stats.add_batch(x)
        stats.end_task()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["whole", "streamed"])
def test_low_rank_experts_cost_one_dense_product_and_equal_dense_ones(gen, monkeypatch, backend, path):
    """Experts W_0 + U V of one W_0: the residual is (W_0 - W_m) H_e + sum a_k U_k (V_k H_k), one
    product of the weight's size for all of them, and the statistics (G_e, c_e) are those of
    the dense experts."""
    _, experts, W_m = _low_rank_experts(gen, 4)
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 2.0, 3.0)]
    calls = _count_dense_products(monkeypatch)
    low = EPMQStats(W_m, dtype=torch.float64, backend=backend)
    _fill(low, experts, data, path)
    assert calls == []  # (owed until the statistics are read)
    G_low, c_low = low.G_e, low.c_e
    assert len(calls) == 1
    dense = EPMQStats(W_m, dtype=torch.float64, backend=backend)
    _fill(dense, [e.dense(dtype=torch.float64) for e in experts], data, path)
    assert len(calls) == 5
    torch.testing.assert_close(G_low, dense.G_e, rtol=1e-12, atol=1e-12 * float(dense.G_e.abs().max()))
    assert c_low == pytest.approx(dense.c_e, rel=1e-12)
    assert low.task_weights == dense.task_weights and torch.equal(low.H_e, dense.H_e)
    assert (low.low_rank_tasks, dense.low_rank_tasks) == (4, 0)


@pytest.mark.parametrize("order", ["dense_between", "other_base", "equal_base", "dense_first"])
def test_low_rank_route_left_where_a_task_is_of_another_kind(gen, monkeypatch, order):
    """A dense expert, or one of another W_0, among low-rank ones: the owed product is taken
    while H_e holds exactly the earlier tasks, and every later task is taken dense; an equal W_0
    that is another tensor (two adapters' reads of one base) keeps the route."""
    W_0, experts, W_m = _low_rank_experts(gen, 4)
    if order == "dense_between":
        experts[2] = experts[2].dense(dtype=torch.float64)
    elif order == "dense_first":
        experts[0] = experts[0].dense(dtype=torch.float64)
    elif order == "other_base":
        other = W_0 + 0.01 * torch.randn(W_0.shape, generator=gen, dtype=torch.float64)
        experts[1] = LowRankExpert(other, experts[1].U, experts[1].V)
    else:
        experts[3] = LowRankExpert(W_0.clone(), experts[3].U, experts[3].V)
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 2.0, 3.0)]
    dense_experts = [e.dense(dtype=torch.float64) if isinstance(e, LowRankExpert) else e for e in experts]
    for path in ("whole", "streamed"):
        calls = _count_dense_products(monkeypatch)
        low = EPMQStats(W_m, dtype=torch.float64)
        _fill(low, experts, data, path)
        G, c = low.G_e, low.c_e
        expected_calls = {"dense_between": 1 + 2 if path == "streamed" else 4, "other_base": 1 + 3,
                          "equal_base": 1, "dense_first": 4}[order]
        assert len(calls) == expected_calls, (path, calls)
        dense = EPMQStats(W_m, dtype=torch.float64)
        _fill(dense, dense_experts, data, path)
        torch.testing.assert_close(G, dense.G_e, rtol=1e-12, atol=1e-12 * float(dense.G_e.abs().max()))
        assert c == pytest.approx(dense.c_e, rel=1e-12)
        monkeypatch.undo()


def test_low_rank_experts_on_layers_sharing_inputs(gen):
    """A layer that reads another's Hessians takes the owed product with that layer's H_e, and
    an asymmetric task (x_expert) leaves the route before that layer folds its H_k."""
    W_0q, experts_q, W_q = _low_rank_experts(gen, 3)
    W_0v, experts_v, W_v = _low_rank_experts(gen, 3)
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 2.0)]
    shifted = [x + 0.1 for x in data[1]]

    def stream(layers, experts, asymmetric):
        for k, xs in enumerate(data):
            for stats, own in zip(layers, experts):
                stats.begin_task(own[k])
            for n, x in enumerate(xs):
                for stats in layers:
                    stats.add_batch(x, x_expert=shifted[n] if asymmetric and k == 1 else None)
            for stats in layers:
                stats.end_task()

    for asymmetric in (False, True):
        q = EPMQStats(W_q, dtype=torch.float64)
        v = EPMQStats(W_v, dtype=torch.float64, inputs_of=q)
        stream([q, v], [experts_q, experts_v], asymmetric)
        alone = EPMQStats(W_v, dtype=torch.float64)
        stream([alone], [[e.dense(dtype=torch.float64) for e in experts_v]], asymmetric)
        got, want = v.finalize(), alone.finalize()
        torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12 * float(want[2].abs().max()))
        assert v.c_e == pytest.approx(alone.c_e, rel=1e-12)


def test_low_rank_owed_product_runs_on_the_side_stream_at_finalize(gen, deferred):
    """Once every task is in, the owed product joins the side stream's queue (the current
    stream factors H meanwhile), and E-PMQ's result is that of the dense experts."""
    _, experts, W_m = _low_rank_experts(gen, 3, dtype=torch.float32)
    hessians = [gram(batches(gen)).float() for _ in range(3)]
    spec = QuantSpec(bits=4, group_size=16)
    stats = EPMQStats(W_m, backend="triton", side_stream=True)
    stats.add_tasks(experts, hessians)
    assert not deferred.queue
    stats.finalize(join=False)
    assert len(deferred.queue) == 1
    got = quant.epmq_from_stats(stats, spec, backend="triton", anchor=0.5)
    assert not deferred.queue
    dense = EPMQStats(W_m, backend="triton")
    dense.add_tasks([e.dense() for e in experts], hessians)
    want = quant.epmq_from_stats(dense, spec, backend="triton", anchor=0.5)
    assert (got.codes == want.codes).float().mean() > 0.99
    torch.testing.assert_close(got.target, want.target, rtol=1e-4, atol=1e-5)
    assert got.expert_loss == pytest.approx(want.expert_loss, rel=1e-3)


def test_quant_epmq_takes_low_rank_experts(gen):
    _, experts, W_m = _low_rank_experts(gen, 3)
    hessians = [gram(batches(gen, scale=s)) for s in (0.5, 1.0, 2.0)]
    spec = QuantSpec(bits=3, group_size=16)
    got = quant.epmq(W_m, experts, hessians, spec, anchor=0.3)
    want = quant.epmq(W_m, [e.dense(dtype=torch.float64) for e in experts], hessians, spec, anchor=0.3)
    torch.testing.assert_close(got.target, want.target, rtol=1e-10, atol=1e-10)
    assert (got.codes == want.codes).float().mean() > 0.99
    assert (got.loss, got.expert_loss, got.anchor_loss) == pytest.approx(
        (want.loss, want.expert_loss, want.anchor_loss), rel=1e-9)


def test_low_rank_expert_errors(gen):
    W_0, experts, W_m = _low_rank_experts(gen, 2)
    U, V = experts[0].U, experts[0].V
    with pytest.raises(ValueError, match=r"U \[out, r\] and V \[r, in\]"):
        LowRankExpert(W_0, U, V[:-1])
    with pytest.raises(ValueError, match="U of a low-rank expert must be a 2-D"):
        LowRankExpert(W_0, U[0], V)
    H = gram(batches(gen))
    with pytest.raises(ValueError, match="expert weight of mnist has shape"):
        EPMQStats(W_m[:, :-1]).add_tasks([experts[0]], [H[:-1, :-1]], names=["mnist"])
    spoiled = LowRankExpert(W_0, U.clone(), V)
    spoiled.U[1, 0] = float("nan")
    for add in (lambda s: s.add_tasks([spoiled], [H], names=["svhn"]),
                lambda s: s.begin_task(spoiled, name="svhn")):
        with pytest.raises(ValueError, match="U of the low-rank expert svhn has non-finite"):
            add(EPMQStats(W_m, dtype=torch.float64))
    # on a layer sharing inputs, the owed product is taken only where both layers have ended the
    # same tasks (H_e then holds exactly this layer's): asymmetric targets after the other layer
    # ended the task, or a read between the two ends, are refused
    for misuse in ("x_expert", "read"):
        q = EPMQStats(W_m, dtype=torch.float64)
        v = EPMQStats(W_m, dtype=torch.float64, inputs_of=q)
        x = batches(gen)[0]
        for k in range(2):
            q.begin_task(experts[k])
            v.begin_task(experts[k])
            q.add_batch(x)
            if k == 0 or misuse == "read":
                v.add_batch(x)
            if k == 0:
                v.end_task()
                q.end_task()
        if misuse == "x_expert":
            q.end_task()
            with pytest.raises(RuntimeError, match="where both have ended the same tasks"):
                v.add_batch(x, x_expert=x)
        else:
            v.end_task()
            with pytest.raises(RuntimeError, match="where both have ended the same tasks"):
                v.c_e


def test_a_refused_begin_task_takes_no_owed_product(gen):
    """(From a review) a follower's begin_task of a dense expert that is refused (its leader has
    not begun the task) leaves the owed product owed: taken later, H_e is right."""
    _, experts_q, W_q = _low_rank_experts(gen, 2)
    _, experts_v, W_v = _low_rank_experts(gen, 2)
    data = [batches(gen, scale=s) for s in (0.5, 2.0)]
    dense_v = [e.dense(dtype=torch.float64) for e in experts_v]
    results = []
    for first in (dense_v[0], experts_v[0]):
        q = EPMQStats(W_q, dtype=torch.float64)
        v = EPMQStats(W_v, dtype=torch.float64, inputs_of=q)
        for k, xs in enumerate(data):
            q_expert, v_expert = experts_q[k], first if k == 0 else dense_v[1]
            if k == 1:
                with pytest.raises(RuntimeError, match="begin the task on the layer"):
                    v.begin_task(v_expert)
            q.begin_task(q_expert)
            v.begin_task(v_expert)
            for x in xs:
                q.add_batch(x)
                v.add_batch(x)
            q.end_task()
            v.end_task()
        results.append((v.finalize()[2], v.c_e))
    (G_dense, c_dense), (G, c) = results
    torch.testing.assert_close(G, G_dense, rtol=1e-12, atol=1e-12 * float(G_dense.abs().max()))
    assert c == pytest.approx(c_dense, rel=1e-12)


def test_a_shallow_copy_of_low_rank_statistics_keeps_what_it_had(gen):
    """(From a second review) a copy takes the owed product when it is made: the original's
    next task (into the H_e they share) changes neither the copy's constant nor, for a dense
    task, what the copy's G_e held of the tasks before it."""
    import copy

    _, experts, W_m = _low_rank_experts(gen, 3)
    hessians = [gram(batches(gen, scale=s)) for s in (0.5, 1.0, 2.0)]
    dense2, dense3 = EPMQStats(W_m, dtype=torch.float64), EPMQStats(W_m, dtype=torch.float64)
    dense2.add_tasks([e.dense(dtype=torch.float64) for e in experts[:2]], hessians[:2])
    dense3.add_tasks([e.dense(dtype=torch.float64) for e in experts], hessians)
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.add_tasks(experts[:2], hessians[:2])
    before = copy.copy(stats)
    stats.add_tasks(experts[2:], hessians[2:])
    assert before.c_e == pytest.approx(dense2.c_e, rel=1e-12)
    assert stats.c_e == pytest.approx(dense3.c_e, rel=1e-12)
    torch.testing.assert_close(stats.G_e, dense3.G_e, rtol=1e-12, atol=1e-12 * float(dense3.G_e.abs().max()))


def test_a_followers_owed_product_is_not_left_on_the_side_stream(gen, deferred):
    """(From a second review) a layer that shares another's H_e takes its owed product on the
    current stream: a task the other layer folds in afterwards cannot overwrite what it reads."""
    _, experts_q, W_q = _low_rank_experts(gen, 3, dtype=torch.float32)
    _, experts_v, W_v = _low_rank_experts(gen, 3, dtype=torch.float32)
    data = [batches(gen, scale=s) for s in (0.5, 1.0, 2.0)]

    def task(layers, experts, k):
        for stats, own in zip(layers, experts):
            stats.begin_task(own[k])
        for x in data[k]:
            for stats in layers:
                stats.add_batch(x)
        for stats in layers:
            stats.end_task()

    results = []
    for given in ([e.dense() for e in experts_v], experts_v):
        q = EPMQStats(W_q, backend="triton", side_stream=True)
        v = EPMQStats(W_v, backend="triton", side_stream=True, inputs_of=q)
        task([q, v], [experts_q, given], 0)
        task([q, v], [experts_q, given], 1)
        v.finalize(join=False)
        task([q, v], [experts_q, given], 2)
        results.append((v.G_e.clone(), v.c_e))
    (G_dense, c_dense), (G, c) = results
    torch.testing.assert_close(G, G_dense, rtol=1e-4, atol=1e-5 * float(G_dense.abs().max()))
    assert c == pytest.approx(c_dense, rel=1e-4)


@pytest.mark.parametrize("how", ["copy", "on_cpu"])
def test_reading_a_shallow_copy_of_low_rank_statistics_leaves_them_as_they_were(gen, how):
    """(From a review) while a product is owed, a shallow copy (the walker's move to the CPU)
    and the original each have it, once, in a G_e of their own."""
    import copy

    from epmq.walker import _on_cpu

    _, experts, W_m = _low_rank_experts(gen, 3)
    hessians = [gram(batches(gen, scale=s)) for s in (0.5, 1.0, 2.0)]
    dense = EPMQStats(W_m, dtype=torch.float64)
    dense.add_tasks([e.dense(dtype=torch.float64) for e in experts], hessians)
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.add_tasks(experts, hessians)
    other = copy.copy(stats) if how == "copy" else _on_cpu(stats)
    tolerance = dict(rtol=1e-12, atol=1e-12 * float(dense.G_e.abs().max()))
    torch.testing.assert_close(other.G_e, dense.G_e, **tolerance)
    torch.testing.assert_close(stats.G_e, dense.G_e, **tolerance)
    assert other.c_e == pytest.approx(dense.c_e, rel=1e-12) and stats.c_e == pytest.approx(dense.c_e, rel=1e-12)


def test_low_rank_statistics_read_during_a_task_are_the_sums_so_far(gen):
    """(From a review) G_e and c_e read while a low-rank task is open hold the owed product of
    the tasks before it; the open task goes on dense."""
    _, experts, W_m = _low_rank_experts(gen, 2)
    data = [batches(gen) for _ in experts]
    got = []
    for given in ([e.dense(dtype=torch.float64) for e in experts], experts):
        stats = EPMQStats(W_m, dtype=torch.float64)
        stats.begin_task(given[0])
        for x in data[0]:
            stats.add_batch(x)
        stats.end_task()
        stats.begin_task(given[1])
        stats.add_batch(data[1][0])
        now = (stats.G_e.clone(), stats.c_e)
        for x in data[1][1:]:
            stats.add_batch(x)
        stats.end_task()
        got.append(now + (stats.G_e, stats.c_e))
    for dense_value, low_value in zip(got[0], got[1]):
        if isinstance(dense_value, torch.Tensor):
            torch.testing.assert_close(low_value, dense_value, rtol=1e-12,
                                       atol=1e-12 * float(dense_value.abs().max()))
        else:
            assert low_value == pytest.approx(dense_value, rel=1e-12)


def test_a_layer_the_merge_left_as_the_base_takes_no_product(gen, monkeypatch):
    """Experts of rank 0 (an adapter that does not update this layer) over W_m = W_0: G_e = 0
    with no product of the weight's size; the constant too."""
    W_0 = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    experts = [LowRankExpert(W_0, W_0.new_zeros(D_OUT, 0), W_0.new_zeros(0, D_IN)) for _ in range(3)]
    calls = _count_dense_products(monkeypatch)
    stats = EPMQStats(W_0.clone(), dtype=torch.float64)
    stats.add_tasks(experts, [gram(batches(gen)) for _ in experts])
    assert torch.equal(stats.G_e, torch.zeros_like(stats.G_e)) and stats.c_e == 0.0
    assert calls == [] and stats.low_rank_tasks == 3


def test_asymmetric_low_rank_tasks_take_no_product_of_an_empty_hessian(gen, monkeypatch):
    """(From a review) every task asymmetric (the walker's fp path): a low-rank task leaves the
    route at its first batch with nothing owed, and no product of the weight's size is taken,
    as for dense experts; add_tasks of nothing keeps the route."""
    _, experts, W_m = _low_rank_experts(gen, 2)
    calls = _count_dense_products(monkeypatch)
    stats = EPMQStats(W_m, dtype=torch.float64)
    for expert in experts:
        stats.begin_task(expert)
        for x in batches(gen):
            stats.add_batch(x, x_expert=1.1 * x)
        stats.end_task()
    stats.finalize()
    assert calls == []
    stats = EPMQStats(W_m, dtype=torch.float64)
    stats.add_tasks([], [])
    stats.add_tasks(experts, [gram(batches(gen)) for _ in experts])
    stats.G_e
    assert len(calls) == 1


@pytest.mark.cuda
def test_cuda_low_rank_experts_with_the_owed_product_on_a_late_side_stream(gen, monkeypatch):
    """On the GPU, LoRA-shaped experts given as W_0 + U V: one product of the weight's size,
    taken at finalize on a side stream that runs late, and E-PMQ's result that of the same
    experts dense (fp32 statistics: codes at rounding ties may differ)."""
    import epmq.stats as st

    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")  # (first configs: the GPU suite's time is for benchmarks)
    monkeypatch.setattr(st, "RESIDUALS_ON_SIDE_STREAM", True)
    d_out, d_in, K, rank = 256, 384, 4, 8
    W_0 = torch.randn(d_out, d_in, generator=gen).cuda() / d_in**0.5
    experts = [LowRankExpert(W_0, 0.02 * torch.randn(d_out, rank, generator=gen).cuda(),
                             torch.randn(rank, d_in, generator=gen).cuda() / d_in**0.5) for _ in range(K)]
    W_m = W_0 + 0.3 * sum(e.U @ e.V for e in experts)
    H_k = [(lambda x: x.T @ x)(torch.randn(500, d_in, generator=gen).cuda()) for _ in range(K)]
    spec = QuantSpec(bits=4, group_size=128)
    want = quant.epmq(W_m, [e.dense() for e in experts], H_k, spec, backend="triton", anchor=0.5)
    launches = _slow_side_stream(monkeypatch)
    got = quant.epmq(W_m, experts, H_k, spec, backend="triton", anchor=0.5)
    assert launches == [False]  # (one product, of the caller's W_0: not held)
    assert got.info["low_rank_tasks"] == K
    assert (got.codes == want.codes).float().mean() > 0.99
    torch.testing.assert_close(got.target, want.target, rtol=1e-3, atol=1e-3 * float(want.target.abs().max()))
    assert got.expert_loss == pytest.approx(want.expert_loss, rel=1e-3)


def test_a_low_rank_expert_beyond_float32_is_a_clear_error():
    """Finite factors whose W_0 + U V overflows float32 (the statistics, in float64 on the
    CPU, hold it; R, in float32, does not): a clear error, as the same expert dense gets, not
    NaN weights."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(40, 24, generator=g)
    W_0 = torch.randn(5, 24, generator=g)
    expert = LowRankExpert(W_0, torch.randn(5, 2, generator=g) * 1e25,
                                torch.randn(2, 24, generator=g) * 1e25)
    spec = QuantSpec(bits=4, group_size=8)
    with pytest.raises(ValueError, match="non-finite"):
        quant.epmq(W_0, [expert], [X.T @ X], spec)
    with pytest.raises(ValueError, match="non-finite"):
        quant.epmq(W_0, [expert.dense()], [X.T @ X], spec)


def test_a_callers_autocast_changes_no_statistic_and_no_solve(gen):
    """The statistics and the solves are the math's, in their own dtypes: run under a caller's
    autocast (a training or serving script's), the fp32 expert targets' products were cast to
    bf16, and accumulating them into the fp32 statistics failed on the mixed dtypes."""
    spec = QuantSpec(bits=4, group_size=8)
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    low_rank = LowRankExpert(W_m, 0.1 * torch.randn(D_OUT, 4, generator=gen), torch.randn(4, D_IN, generator=gen))
    data = [batches(gen) for _ in range(3)]
    shifted = [[x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs] for xs in data]

    def run():
        stats, H = EPMQStats(W_m, dtype=torch.float32), HessianStats(D_IN)
        for W, xs, ts in zip(W_k + [low_rank], data, shifted):
            stats.begin_task(W)
            for x, t in zip(xs, ts):
                stats.add_batch(x, x_expert=t, x_anchor=t)
                H.add_batch(x)
            stats.end_task()
        return (stats, H.H, quant.epmq_from_stats(stats, spec, anchor=0.1), quant.gptq(W_m, H.H, spec),
                quant.rtn(W_m, spec, H=H.H), quant.epmq(W_m, W_k, [H.H, H.H], spec, anchor=0.1))

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run()
    assert torch.equal(plain[0].G_e, cast[0].G_e) and plain[0].c_e == cast[0].c_e
    assert torch.equal(plain[1], cast[1])
    for a, b in zip(plain[2:], cast[2:]):
        assert torch.equal(a.codes, b.codes) and a.loss == b.loss


def test_reading_low_rank_statistics_under_autocast_changes_nothing(gen):
    """Low-rank experts owe one product, (W_0 - W_m) H_e, until the statistics are read: read as
    ``G_e`` or ``c_e`` (or copied) under a caller's autocast, it ran in bf16 and G_e differed."""
    import copy

    W_0 = torch.randn(D_OUT, D_IN, generator=gen)
    W_m = W_0 + 0.05 * torch.randn(D_OUT, D_IN, generator=gen)
    experts = [LowRankExpert(W_0, 0.1 * torch.randn(D_OUT, 4, generator=gen), torch.randn(4, D_IN, generator=gen))
               for _ in range(2)]
    data = [batches(gen) for _ in experts]

    def stats():
        return _streamed(EPMQStats(W_m, dtype=torch.float32), experts, data)

    plain = stats()
    for read in (lambda s: s.G_e, lambda s: s.c_e, copy.copy):
        cast = stats()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            read(cast)
        assert torch.equal(plain.G_e, cast.G_e) and plain.c_e == cast.c_e


def test_epmq_stats_refuses_a_misspelt_backend_or_a_side_stream_that_is_no_bool(gen):
    """EPMQStats(W, backend='Triton') was taken until the first batch (after begin_task: a
    streamed task half begun) or the first fold, as HessianStats' was before 28db0c2;
    side_stream='no' (a YAML's quoted no) was truthy: the residuals ran on a side stream; and
    inputs_of given the other layer's weight ended in "'Tensor' object has no attribute
    'inputs_of'". Each refused when built, naming the argument."""
    W = torch.randn(D_OUT, D_IN, generator=gen)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton', got 'Triton'"):
        EPMQStats(W, backend="Triton")
    with pytest.raises(ValueError, match="side_stream must be True or False, got 'no'"):
        EPMQStats(W, side_stream="no")
    with pytest.raises(TypeError, match="inputs_of must be the EPMQStats of the layer .* got Tensor"):
        EPMQStats(W, inputs_of=W)
    import numpy as np

    assert EPMQStats(W, side_stream=np.False_).side_stream is False


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_inputs_that_are_no_real_floats_are_refused_by_name(gen, dtype):
    """EPMQStats.add_batch converted integer or bool inputs (token ids given for activations) to
    its dtype and summed them, silently, and dropped a complex input's imaginary part with no
    more than torch's warning, where HessianStats refused them (as accumulate_xxt's X); the
    inputs, x_expert and x_anchor alike, are refused naming the task, the batch adding nothing."""
    W = torch.randn(D_OUT, D_IN, generator=gen)
    x = torch.randn(5, D_IN, generator=gen)
    bad = (x > 0).to(dtype) if dtype == torch.bool else (x * 3).to(dtype)
    stats = EPMQStats(W)
    stats.begin_task(W + 0.1, name="math")
    for args in ((bad,), (x, bad), (x, None, bad)):
        with pytest.raises(ValueError, match=rf"(calibration input of math|x_expert of math|x_anchor) must be "
                                             rf"real floating point .*got {dtype}"):
            stats.add_batch(*args)
    assert stats._task.n_tokens == 0 and not stats._task.H.any()
    with pytest.raises(ValueError, match=rf"calibration input must be real floating point .*got {dtype}"):
        HessianStats(D_IN).add_batch(bad)


@pytest.mark.parametrize("anchor", [0.0, 0.5])
def test_task_weights_overflowing_float32_statistics_are_named(gen, anchor):
    """Task weights whose a_k H_k passes float32's largest (2^120 on a Hessian of trace 1e4: the
    GPU's statistics, which quant.epmq uses there too) made H_e inf, and E-PMQ was refused as
    'weight_anchor 0 (times tr(H_e) / d_in = inf) weighs its term past 1e+300' (or 'anchor ...'),
    naming an anchor of 0 or one of 0.5; refused naming the task weights and the statistics'
    dtype."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    stats = EPMQStats(W_m, dtype=torch.float32)
    x = torch.randn(40, D_IN, generator=gen)
    stats.add_tasks([W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)],
                    [gram([x]).float()] * 2, [2.0**120, 1.0])
    with pytest.raises(ValueError, match=r"^the statistics' H_e = sum_k a_k H_k overflowed torch.float32 .*"
                                         r"task weights \[1.33e\+36, 1\]"):
        quant.epmq_from_stats(stats, QuantSpec(bits=4, group_size=16), anchor=anchor)


def test_low_rank_experts_made_dense_are_ieee_fp32_whatever_the_tf32_switch(gen, tf32_products):
    """A LoRA expert taken dense (beside a dense expert, or with asymmetric targets) was formed
    as W_0 + U V by one fp32 product that ran as TF32 on a GPU with the caller's switch on: ~5e-4
    of the update U V, the very part E-PMQ's residual is made of; it runs with TF32 off."""
    W_0 = torch.randn(D_OUT, D_IN, generator=gen)
    lora = LowRankExpert(W_0, torch.randn(D_OUT, 4, generator=gen), torch.randn(4, D_IN, generator=gen))
    lora.dense()
    stats = EPMQStats(W_0 + 0.01, dtype=torch.float32)
    stats.add_tasks([W_0 + 0.1, lora], [torch.eye(D_IN), 2 * torch.eye(D_IN)])
    assert tf32_products == []


@pytest.mark.parametrize("shift", [-149, -140])
def test_task_weights_flushing_float32_statistics_are_named(gen, shift):
    """Task weights so small that a_k H_k falls to float32's subnormals (2^-140 on a Hessian of
    trace 1e4; 2^-149, float32's least) were folded into EPMQStats(dtype=torch.float32) used
    directly, in silence, and E-PMQ solved the flushed statistics (codes moved from those of the
    same weights scaled by a power of two, which quant.epmq itself makes); refused naming the
    task weights and the statistics' dtype. One such weight beside weights of 1 is below their
    rounding anyway: solved."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    x = 10 * torch.randn(40, D_IN, generator=gen)
    experts = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    stats = EPMQStats(W_m, dtype=torch.float32)
    stats.add_tasks(experts, [gram([x]).float()] * 2, [2.0**shift] * 2)
    with pytest.raises(ValueError, match=r"^the statistics' H_e = sum_k a_k H_k is below torch.float32's normal "
                                         rf"range .*task weights \[{2.0**shift:.3g}, {2.0**shift:.3g}\]"):
        quant.epmq_from_stats(stats, QuantSpec(bits=4, group_size=16))
    streamed = EPMQStats(W_m, dtype=torch.float32)  # (streamed: begin_task, add_batch, end_task)
    for W_k in experts:
        streamed.begin_task(W_k, weight=2.0**shift)
        streamed.add_batch(x)
        streamed.end_task()
    with pytest.raises(ValueError, match=r"^the statistics' H_e = sum_k a_k H_k is below torch.float32's normal"):
        quant.epmq_from_stats(streamed, QuantSpec(bits=4, group_size=16))
    stats = EPMQStats(W_m, dtype=torch.float32)
    stats.add_tasks(experts, [gram([x]).float()] * 2, [2.0**shift, 1.0])
    quant.epmq_from_stats(stats, QuantSpec(bits=4, group_size=16))


class _Products(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products (mm, addmm, bmm) run inside it."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
                torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp_path_anchor_shares_the_targets_product(gen, dtype):
    """fp-path targets hand the same inputs as x_expert and x_anchor (the full-precision merged
    path's): W_m (X~ - X), the anchor's T_m, is the second half of the target's T as well, and
    was formed twice per batch and layer (5 products of tokens x d_in x d_out where 4 do). Formed
    once, the statistics are bit for bit those of the two products."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen)
    xs = batches(gen)
    xts = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    stats = EPMQStats(W_m, dtype=dtype)
    stats.begin_task(W_k, weight=1.0)
    with _Products() as products:
        for x, xt in zip(xs, xts):
            stats.add_batch(x, x_expert=xt, x_anchor=xt)
    stats.end_task()
    assert products.n == 4 * len(xs) + len(xs)  # (4 of the targets and anchor, X^T X)
    G, G_m, c, c_m = (torch.zeros(D_OUT, D_IN, dtype=dtype), torch.zeros(D_OUT, D_IN, dtype=dtype), 0.0, 0.0)
    W, Wm = W_k.to(dtype), W_m.to(dtype)
    for x, xt in zip(xs, xts):  # (the products as they were formed, twice)
        X, X_t = x.reshape(-1, D_IN).to(dtype), xt.reshape(-1, D_IN).to(dtype)
        T = X_t @ (W - Wm).T + (X_t - X) @ Wm.T
        G.addmm_(T.T, X)
        c += float(T.pow(2).sum())
        T_m = (X_t - X) @ Wm.T
        G_m.addmm_(T_m.T, X)
        c_m += float(T_m.pow(2).sum())
    a = stats.task_weights[0]
    assert torch.equal(stats.G_e, torch.zeros_like(G).add_(G, alpha=a)) and stats.c_e == a * c
    assert torch.equal(stats.G_m, G_m) and stats.c_m == c_m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_weight_as_its_own_target_takes_no_product_of_zero(gen, dtype):
    """GPTQ's fp-path control is E-PMQ of one task whose expert is the merged weight itself (the
    walker's method='gptq', targets='fp_path'): W_k - W_m is zero, and X~ (W_k - W_m)^T was a
    product of zeros per batch and layer, one of three; the statistics are bit for bit those of
    the three products."""
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    xs = batches(gen)
    xts = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    stats = EPMQStats(W_m, dtype=dtype)
    stats.begin_task(stats.W_merged, weight=1.0)
    with _Products() as products:
        for x, xt in zip(xs, xts):
            stats.add_batch(x, x_expert=xt)
    stats.end_task()
    assert products.n == 2 * len(xs) + len(xs)  # (T and its G, X^T X)
    G, c, Wm = torch.zeros(D_OUT, D_IN, dtype=dtype), 0.0, W_m.to(dtype)
    for x, xt in zip(xs, xts):
        X, X_t = x.reshape(-1, D_IN).to(dtype), xt.reshape(-1, D_IN).to(dtype)
        T = X_t @ (Wm - Wm).T + (X_t - X) @ Wm.T
        G.addmm_(T.T, X)
        c += float(T.pow(2).sum())
    assert torch.equal(stats.G_e, torch.zeros_like(G).add_(G, alpha=1.0)) and stats.c_e == c


def test_asymmetric_batches_read_nothing_back(gen):
    """Expert-path and fp-path targets (x_expert, x_anchor) read each batch's sum of squared
    targets back as a float, per batch and layer (two reads a batch on the fp path, after the
    products), each waiting on a GPU for the device's queue to drain in the walk's innermost loop;
    they stay on the device until the task ends (read with its trace) and c_m until it is read, the
    same floats. A batch reads what its inputs' checks read, nothing more."""
    from epmq.checks import all_finite

    with _Reads() as check:
        all_finite(torch.ones(3))
    W_m = torch.randn(D_OUT, D_IN, generator=gen)
    W_k = [W_m + 0.1 * torch.randn(D_OUT, D_IN, generator=gen) for _ in range(2)]
    data = [batches(gen, n_batches=4) for _ in range(2)]
    shifted = [[x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs] for xs in data]
    stats = EPMQStats(W_m, dtype=torch.float32)
    c, c_m, per_task = 0.0, 0.0, []
    for W, xs, ts in zip(W_k, data, shifted):
        stats.begin_task(W)
        with _Reads() as counter:
            for x, t in zip(xs, ts):
                stats.add_batch(x, x_expert=t, x_anchor=t)
        assert counter.n == 2 * check.n * len(xs)  # (x's and x_expert's checks of values)
        with _Reads() as counter:
            stats.end_task()
        assert counter.n <= 1  # (the trace's read, as the merged path's)
        c_k = 0.0
        for x, t in zip(xs, ts):  # (the floats as they were read and summed, batch by batch)
            X, X_t, Wd = x.reshape(-1, D_IN), t.reshape(-1, D_IN), W - W_m
            T_m = (X_t - X) @ W_m.T
            c_k += float((X_t @ Wd.T + T_m).pow(2).sum())
            c_m += float(T_m.pow(2).sum())
        per_task.append(c_k)
    for a, c_k in zip(stats.task_weights, per_task):
        c += a * c_k
    assert stats.c_e == c and stats.c_m == c_m
    copied = copy.copy(stats)  # (a copy keeps its own c_m, as it kept the float)
    stats.begin_task(W_k[0])
    stats.add_batch(data[0][0], x_expert=shifted[0][0], x_anchor=shifted[0][0])
    assert copied.c_m == c_m < stats.c_m
