"""grnn_fairseq.modules.products (and backend's product choice): oneDNN linears against F.linear / bmm, outputs
and every gradient; deferred weight gradients; the measured choice when asked for."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from grnn_fairseq.modules import backend
from grnn_fairseq.modules import products as lin_mod
from grnn_fairseq.modules.products import Linear, grouped_linear, linear


@pytest.fixture
def onednn():
    """oneDNN chosen for every product (the tests must take the oneDNN path)."""
    if not backend.onednn_usable(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN linear")
    with backend.use(products="onednn"):
        yield


def grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y, x.grad, w.grad] + ([] if b is None else [b.grad])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12), (0, 12)])
def test_linear_matches_f_linear(onednn, bias, shape):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(9, 12)
    b = torch.randn(9) if bias else None
    got, want = grads(linear, x, w, b), grads(F.linear, x, w, b)
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.allclose(a, e, atol=1e-5), (a - e).abs().max()


def test_linear_on_strided_input_and_its_path(onednn, monkeypatch):
    """A transposed (non-contiguous) input; float32 CPU takes the oneDNN Function, float64 takes F.linear."""
    calls = []
    monkeypatch.setattr(lin_mod._OneDNNGroupedLinear, "apply", lambda *a: calls.append(1) or lin_mod._grouped_linear_aten(*a))
    x = torch.randn(5, 4, 12).transpose(0, 1)
    w = torch.randn(9, 12)
    linear(x, w)
    linear(x.double(), w.double())
    assert calls == [1]
    monkeypatch.undo()
    assert torch.allclose(linear(x, w), F.linear(x, w), atol=1e-5)


@pytest.mark.parametrize("scoped", [False, True])
def test_benchmark_measures_each_shape_once(onednn, monkeypatch, scoped):
    """benchmark on (products auto): the first call of a shape measures aten against oneDNN (forward and
    backward when training, inside a scope of its own when the caller has one), later calls of the shape (same
    row bucket) reuse the choice; either way the result is F.linear's. Without benchmark nothing is measured."""
    backend.clear_measured()
    monkeypatch.setattr(backend, "MIN_ONEDNN_MACS", 0)  # measure even this tiny product
    x, w, b = torch.randn(30, 12), torch.randn(9, 12), torch.randn(9)
    with backend.use(products="auto", benchmark=True):
        with lin_mod.reuse_packed_weights() if scoped else torch.no_grad():
            got = grads(linear, x, w, b) if scoped else [linear(x, w, b)]
            if scoped:
                assert len(lin_mod._packed.get()) <= 2  # only this call's weights: the measurement had its own scope
            again = grads(linear, x[:17], w, b) if scoped else [linear(x[:17], w, b)]  # 17 rows: the bucket of 32
            assert len(backend.measured()) == 1
            assert torch.allclose(again[0], F.linear(x[:17], w, b), atol=1e-5)
    want = grads(lambda *a: F.linear(*a), x, w, b) if scoped else [F.linear(x, w, b)]
    for g, v in zip(got, want):
        assert torch.allclose(g, v, atol=1e-5)
    (key,) = backend.measured()
    # (kind, groups, rows, In, Out, bias, training, in a scope, layouts, threads)
    assert key[:6] == ("linear", 1, 32, 12, 9, True) and key[6:8] == (scoped, scoped)
    with pytest.raises(ValueError, match="backend products must be one of auto, aten, onednn, got 'fast'"):
        backend.Backend(products="fast")
    monkeypatch.setattr(backend, "MIN_ONEDNN_MACS", 1 << 20)
    with backend.use(products="auto", benchmark=True):
        linear(torch.randn(4, 12), w, b)  # 4 x 12 x 9 multiply-adds: below the threshold, the rule's without measuring
    with backend.use(products="auto", benchmark=False):
        linear(torch.randn(4096, 256), torch.randn(1024, 256))  # large, but nobody asked to measure
    assert len(backend.measured()) == 1
    backend.clear_measured()


def test_linear_module_is_nn_linear(onednn):
    torch.manual_seed(0)
    a = Linear(6, 4)
    torch.manual_seed(0)
    b = nn.Linear(6, 4)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())  # same init too
    x = torch.randn(3, 6)
    assert torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_matches_bmm(onednn, K, bias):
    torch.manual_seed(0)
    xg = torch.randn(8, K, 5).transpose(0, 1)  # K x N x In/K, strided rows as the models pass them
    w = torch.randn(K, 4, 5)
    b = torch.randn(K, 4) if bias else None

    def reference(xg, w, b):
        out = torch.bmm(xg, w.transpose(1, 2))
        return out if b is None else out + b.unsqueeze(1)

    for a, e in zip(grads(grouped_linear, xg, w, b), grads(reference, xg, w, b)):
        assert torch.allclose(a, e, atol=1e-5), (a - e).abs().max()
    with backend.use(products="aten"):  # the bmm variant is the same function
        for a, e in zip(grads(grouped_linear, xg, w, b), grads(reference, xg, w, b)):
            assert torch.allclose(a, e, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3])
def test_transposed_is_the_contiguous_transpose(K):
    """products.transposed (one group through aten's 2D copy): each group's matrix transposed, contiguous, a copy."""
    w = torch.randn(K, 6, 5)
    t = lin_mod.transposed(w)
    assert t.shape == (K, 5, 6) and t.is_contiguous() and t.data_ptr() != w.data_ptr()
    assert all(torch.equal(t[k], w[k].t()) for k in range(K))
    assert torch.equal(lin_mod.transposed(w.transpose(1, 2)), w)  # a transposed view comes back as stored


def test_sigmoid_tanh_matches_torch_tanh():
    """activations.tanh (2 sigmoid(2x) - 1 on CPU): values and gradient against torch.tanh, float32 and float64."""
    from grnn_fairseq.modules.activations import tanh

    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
        x = (torch.randn(1000, dtype=dtype) * 4).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = tanh(x), torch.tanh(x2)
        w = torch.randn(1000, dtype=dtype)
        (y * w).sum().backward()
        (y2 * w).sum().backward()
        assert (y - y2).abs().max() < tol and (x.grad - x2.grad).abs().max() < 4 * tol
    assert tanh(torch.tensor([50.0, -50.0, 0.0])).tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize("b_shape", [(5, 1, 8), (1, 7, 8), (8,), (5, 7, 8)])
def test_add_tanh_is_tanh_of_the_sum(b_shape):
    """activations.add_tanh(a, b) (the sum written into the kept output): the same bits as tanh(a + b), forward
    and both gradients (b's reduced over its broadcast dimensions); float64 against torch.tanh; an addend
    larger than a falls back to tanh(a + b)."""
    from grnn_fairseq.modules.activations import add_tanh, tanh

    for dtype in (torch.float32, torch.float64):
        a = (torch.randn(5, 7, 8, dtype=dtype) * 2).requires_grad_(True)
        b = torch.randn(b_shape, dtype=dtype).requires_grad_(True)
        w = torch.randn(5, 7, 8, dtype=dtype)
        y = add_tanh(a, b)
        da, db = torch.autograd.grad((y * w).sum(), (a, b))
        y2 = tanh(a + b)
        da2, db2 = torch.autograd.grad((y2 * w).sum(), (a, b))
        assert y.shape == y2.shape and da.shape == a.shape and db.shape == b.shape
        assert torch.equal(y, y2) and torch.equal(da, da2) and torch.equal(db, db2)
        if dtype == torch.float64:
            y3 = torch.tanh(a + b)
            da3, db3 = torch.autograd.grad((y3 * w).sum(), (a, b))
            assert all(torch.allclose(u, v, atol=1e-13) for u, v in ((y, y3), (da, da3), (db, db3)))
        (da_only,) = torch.autograd.grad((add_tanh(a, b.detach()) * w).sum(), (a,))  # b without a gradient
        assert torch.equal(da_only, da2)
    small, large = torch.randn(7, 1), torch.randn(7, 8)
    assert torch.equal(add_tanh(small, large), tanh(small + large))


@pytest.mark.parametrize("K", [1, 3])
def test_deferred_weight_grads_match_per_step(K):
    """A loop that applies the same weights at every step (input feeding, like the decoder's): inside
    deferred_weight_grads() every gradient equals the per-step one, also when the graph is retained and
    backward runs twice, when a weight is used outside the scope too, and when the scope is switched off."""
    torch.manual_seed(0)
    w = torch.randn(K, 6, 4, dtype=torch.float64, requires_grad=True)  # grouped: K x Out/K x In/K
    b = torch.randn(K, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4 * K, 6 * K, dtype=torch.float64, requires_grad=True)  # a linear's Out x In
    x = torch.randn(5, 2, 4 * K, dtype=torch.float64, requires_grad=True)

    def run(defer, twice=False):
        params = [x, w, b, v]
        ctx = lin_mod.deferred_weight_grads() if defer else contextlib.nullcontext()
        h, outs = torch.zeros(2, 4 * K, dtype=torch.float64), []
        u = torch.cat([v[:, : 2 * K], v[:, : 2 * K]], dim=1)[:, : 4 * K] * 0.5  # 4K x 4K, not a leaf
        with ctx:
            for t in range(5):
                z = grouped_linear((x[t] + h).view(2, K, 4).transpose(0, 1), w, b)  # K x 2 x 6
                h = torch.tanh(linear(z.transpose(0, 1).reshape(2, 6 * K), v))  # 2 x 4K
                h = h + linear(h, u)  # a weight made from parameters once before the loop
                outs.append(h)
        loss = (torch.stack(outs) ** 2).sum() + linear(x[0], v.t()).sum()  # v outside the scope as well
        if twice:
            first = torch.autograd.grad(loss, params, retain_graph=True)
            second = torch.autograd.grad(loss, params)
            assert all(torch.equal(a, c) for a, c in zip(first, second))
            return first
        return torch.autograd.grad(loss, params)

    want = run(False)
    for got in (run(True), run(True, twice=True)):
        for g, e in zip(got, want):
            assert torch.allclose(g, e, atol=1e-12), (g - e).abs().max()
    with backend.use(defer_weight_grads=False), lin_mod.deferred_weight_grads():
        assert lin_mod._deferred_scope.get() is None


@pytest.mark.parametrize("K", [1, 3])
def test_deferred_step_products_follow_the_backend(onednn, K, monkeypatch):
    """Inside deferred_weight_grads() a step's products run on the backend's choice: with oneDNN, on the weight
    packed once and its packed transpose (forward and input gradient, K calls each per step), the weight
    gradients one aten product after the loop; outputs and every gradient as aten's and as per-step ones."""
    torch.manual_seed(0)
    w = torch.randn(K, 24, 16, requires_grad=True)  # K x Out/K x In/K
    b = torch.randn(K, 24, requires_grad=True)
    v = torch.randn(16 * K, 24 * K, requires_grad=True)  # a linear's Out x In
    x = torch.randn(4, 5, 16 * K, requires_grad=True)
    calls = []
    real = lin_mod.onednn_mm
    monkeypatch.setattr(lin_mod, "onednn_mm", lambda *a: calls.append(a[1].shape) or real(*a))

    def run(products, defer):
        ctx = lin_mod.deferred_weight_grads() if defer else contextlib.nullcontext()
        h, outs = torch.zeros(5, 16 * K), []
        with backend.use(products=products, defer_weight_grads=defer), lin_mod.reuse_packed_weights(), ctx:
            for t in range(4):
                z = grouped_linear((x[t] + h).view(5, K, 16).transpose(0, 1), w, b)  # K x 5 x 24
                h = torch.tanh(linear(z.transpose(0, 1).reshape(5, 24 * K), v))  # 5 x 16K
                outs.append(h)
            y = torch.stack(outs)
        return [y] + list(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x, w, b, v]))

    want = run("aten", False)
    assert not calls
    got = run("onednn", True)
    assert len(calls) == 2 * 4 * (K + 1)  # per step: K groups and the linear, forward and input gradient
    assert run("aten", True) and len(calls) == 2 * 4 * (K + 1)  # aten's deferred loop calls no oneDNN
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_matvec_vecmat_in_a_deferred_loop_match_per_step():
    """An attention-like loop: per step scores = matvec(keys, q_t, mask) and context = vecmat(softmax, values)
    over matrices shared by all steps. The values and the scores match bmm written out, and inside
    deferred_weight_grads() every gradient (query, keys, values, one of them also used outside the scope)
    equals the per-step one, also when the graph is retained and backward runs twice; no gate for a matrix
    without a gradient or under no_grad."""
    torch.manual_seed(0)
    B, S, D, C, T = 3, 5, 4, 6, 4
    keys = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, S, C, dtype=torch.float64, requires_grad=True)
    q0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(B, S, dtype=torch.float64)
    mask[1, :2] = float("-inf")  # padding
    proj = torch.randn(C, D, dtype=torch.float64)
    params = [keys, values, q0]

    def run(defer, twice=False):
        ctx = lin_mod.deferred_weight_grads() if defer else contextlib.nullcontext()
        q, outs = q0, []
        with backend.use(defer_weight_grads=defer), ctx:
            for t in range(T):
                scores = lin_mod.matvec(keys, q, mask)  # B x S
                context = lin_mod.vecmat(scores.softmax(1), values)  # B x C
                q = torch.tanh(context @ proj + q)  # input feeding: step t + 1 reads step t
                outs.append(q)
        y = torch.stack(outs)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + values.sum() ** 2
        if twice:
            first = torch.autograd.grad(loss, params, retain_graph=True)
            second = torch.autograd.grad(loss, params)
            assert all(torch.equal(a, c) for a, c in zip(first, second))
            return [y, *first]
        return [y, *torch.autograd.grad(loss, params)]

    want = run(False)
    for got in (run(True), run(True, twice=True)):
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    scores = lin_mod.matvec(keys, q0, mask)
    torch.testing.assert_close(scores, torch.einsum("bsd,bd->bs", keys, q0) + mask, rtol=0, atol=1e-14)
    w = torch.randn(B, S, dtype=torch.float64)
    torch.testing.assert_close(lin_mod.vecmat(w, values), torch.einsum("bs,bsc->bc", w, values), rtol=0, atol=1e-14)
    with lin_mod.deferred_weight_grads():
        assert lin_mod._shared(keys, q0) is lin_mod._shared(keys, q0) is not lin_mod._shared(values, q0)
        assert lin_mod._shared(keys.detach(), q0) is None
        with torch.no_grad():
            assert lin_mod._shared(keys, q0) is None


def test_deferred_scope_defers_weights_that_want_grad_one_gate_each():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 4)
    with lin_mod.deferred_weight_grads():
        assert lin_mod._deferred(x, w) is lin_mod._deferred(x, w)  # one gate per weight and scope
        assert lin_mod._deferred(x, w.detach()) is None  # no grad wanted
        w2 = w[:, 1:] * 2  # made once before a loop, e.g. a concatenation of parameter slices: deferred too
        assert lin_mod._deferred(x, w2) is lin_mod._deferred(x, w2) is not lin_mod._deferred(x, w)
        with torch.no_grad():
            assert lin_mod._deferred(x, w) is None  # inference
            y = linear(x, w)
        assert not y.requires_grad
    assert lin_mod._deferred_scope.get() is None
