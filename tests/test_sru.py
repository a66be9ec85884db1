"""SRU: the fused recurrence against the autograd loop and the step-by-step reference, outputs and every
gradient; the equations' semantics (highway, gates), padding, groups and shuffles, gradcheck."""

import itertools

import pytest
import torch

from grnn_fairseq.modules import SRU, sru_reference
from grnn_fairseq.modules.sru import LinearRecurrenceFunction, linear_recurrence_autograd

T, B, H = 5, 3, 8
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_case(K, dtype, bidirectional, projection, layers=3, seed=0):
    """A 3-layer SRU; the first layer projects its highway input (W_x) when ``projection``."""
    torch.manual_seed(seed)
    D = 2 if bidirectional else 1
    C = 12 if projection else D * H  # 12 != D*H: the first layer projects
    module = SRU(C, H, num_layers=layers, groups=K, bidirectional=bidirectional).to(dtype).eval()
    assert module.has_projection(0) == projection and not module.has_projection(1)
    with torch.no_grad():  # nonzero biases, so that a swapped or missing bias shows
        for name, p in module.named_parameters():
            if name.startswith("bias"):
                p.uniform_(-1, 1)
    x = torch.randn(T, B, C, dtype=dtype)
    c0 = torch.randn(layers * D, B, H, dtype=dtype)
    return module, x, c0


def outputs_and_grads(run, module, x, c0, lengths):
    """output, c_n and the gradients of x, c_0 and every parameter of one weighted-sum loss."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    c0 = c0.clone().requires_grad_(True)
    y, c = run(module, x, c0, lengths)
    gen = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for v in (y, c))
    loss.backward()
    return [y, c, x.grad, c0.grad] + [p.grad for p in module.parameters()]


def run_module(module, x, c0, lengths):
    return module(x, c0, lengths=lengths)


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for n, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, f"missing gradient #{n}"
        assert a.shape == b.shape, f"tensor #{n}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert (a - b).abs().max().item() <= tol, f"tensor #{n} differs by {(a - b).abs().max().item():.3g}"


CASES = list(itertools.product([1, 2, 4], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("K,bidirectional,projection,padded", CASES)
def test_fused_matches_autograd_and_reference(fused_mode, dtype, K, bidirectional, projection, padded):
    module, x, c0 = make_case(K, dtype, bidirectional, projection)
    lengths = torch.tensor([5, 2, 4]) if padded else None
    fused_mode(True)
    fused = outputs_and_grads(run_module, module, x, c0, lengths)
    fused_mode(False)
    autograd = outputs_and_grads(run_module, module, x, c0, lengths)
    reference = outputs_and_grads(sru_reference, module, x, c0, lengths)
    D = 2 if bidirectional else 1
    assert fused[0].shape == (T, B, D * H) and fused[1].shape == (3 * D, B, H)
    assert_close(fused, autograd, TOL[dtype])
    assert_close(fused, reference, TOL[dtype])


def test_highway_and_gates_follow_the_equations():
    """r -> 0 gives h = x' (the highway), r -> 1 with f -> 0 gives h = tanh(W x): checks the row order of the
    weights and biases and which input feature each unit's highway reads, without the reference."""
    torch.set_default_dtype(torch.float64)
    try:
        for bidirectional in (False, True):
            D = 2 if bidirectional else 1
            m = SRU(D * H, H, groups=2, bidirectional=bidirectional).eval()
            x = torch.randn(T, B, D * H)
            with torch.no_grad():
                for d in range(D):
                    m.layer_weights(0, d)[1].view(2, 2, H // 2)[:, 1] = -100.0  # b_r: r = 0
            out, _ = m(x)
            torch.testing.assert_close(out, x, rtol=0, atol=1e-12)  # unit j of direction d reads x[d*H + j]
            with torch.no_grad():
                for d in range(D):
                    m.layer_weights(0, d)[1].view(2, 2, H // 2)[:, 0] = -100.0  # b_f: f = 0, so c_t = W x_t
                    m.layer_weights(0, d)[1].view(2, 2, H // 2)[:, 1] = 100.0  # r = 1
            out, _ = m(x)
            w = m.layer_weights(0, 0)[0]  # K x 3H/K x I/K, rows x~, f, r per group
            xg = x.view(T, B, 2, D * H // 2)  # group k reads input chunk k
            expected = torch.cat([torch.tanh(xg[..., k, :] @ w[k, : H // 2].t()) for k in range(2)], -1)
            torch.testing.assert_close(out[..., :H], expected, rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_linear_recurrence_function_gradcheck_and_autograd_loop():
    torch.manual_seed(0)
    a = torch.rand(4, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LinearRecurrenceFunction.apply, (a, b, c0))
    c = LinearRecurrenceFunction.apply(a, b, c0)
    torch.testing.assert_close(c, linear_recurrence_autograd(a, b, c0), rtol=0, atol=1e-14)
    assert torch.allclose(c[1], a[1] * (a[0] * c0 + b[0]) + b[1])
    # strided inputs, as the layer passes them
    a2 = torch.rand(3, 4, 2, dtype=torch.float64).transpose(0, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(LinearRecurrenceFunction.apply, (a2, b, c0))


def test_gradcheck_layer(fused_mode):
    torch.manual_seed(0)
    m = SRU(4, 4, num_layers=2, groups=2, bidirectional=True).double()
    x = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    lengths = torch.tensor([4, 1, 3])

    def f(x, c0, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, c0), {"lengths": lengths})

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, c0, *params))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_alone_equals_inside_padded_batch(fused_mode, bidirectional):
    module, x, c0 = make_case(2, torch.float64, bidirectional, projection=True)
    lengths = torch.tensor([5, 2, 4])
    out, c = module(x, c0, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        out_b, c_b = module(x[:n, b : b + 1], c0[:, b : b + 1])
        torch.testing.assert_close(out[:n, b : b + 1], out_b, rtol=0, atol=1e-12)
        assert out[n:, b].abs().max() == 0 if n < T else True
        torch.testing.assert_close(c[:, b : b + 1], c_b, rtol=0, atol=1e-12)


def test_empty_sequence_keeps_its_initial_state(fused_mode):
    module, x, c0 = make_case(2, torch.float64, True, projection=False)
    lengths = torch.tensor([5, 0, 3])
    results = []
    for enabled in (True, False):
        fused_mode(enabled)
        results.append(outputs_and_grads(run_module, module, x, c0, lengths))
    assert_close(results[0], results[1], 1e-12)
    out, c = results[0][:2]
    assert out[:, 1].abs().max() == 0 and torch.equal(c[:, 1], c0[:, 1])


def test_layer_shuffle_lets_groups_exchange_information():
    torch.manual_seed(0)
    x = torch.randn(T, B, H, requires_grad=True)
    for shuffle, crosses in ((False, False), (True, True)):
        m = SRU(H, H, num_layers=2, groups=2, shuffle_layers=shuffle)
        out, _ = m(x)
        g = torch.autograd.grad(out[..., : H // 2].sum(), x)[0]
        assert g[..., : H // 2].abs().max() > 0
        assert (g[..., H // 2 :].abs().max() > 0) == crosses  # group 0 sees group 1's input only via the shuffle


def test_dropout_and_variational_masks():
    m = SRU(H, H, num_layers=2, groups=2, dropout=0.5, variational=True).train()
    x = torch.randn(7, 3, H)
    zero = m.layer_input(x) == 0
    assert zero.any() and torch.equal(zero, zero[:1].expand_as(zero))  # one mask per sequence
    m.variational = False
    zero = m.layer_input(x) == 0
    assert not torch.equal(zero, zero[:1].expand_as(zero))


def test_parameter_counts_and_errors():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    # 3 blocks (x~, f, r) with the identity highway, 4 with W_x; 2 bias vectors (b_f, b_r) per direction
    assert count(SRU(16, 16)) == 3 * 16 * 16 + 2 * 16
    assert count(SRU(8, 16)) == 4 * 16 * 8 + 2 * 16
    assert count(SRU(8, 16, bidirectional=True, num_layers=2)) == 2 * (4 * 16 * 8 + 32) + 2 * (3 * 16 * 32 + 32)
    for k in (2, 4):
        assert count(SRU(16, 16, groups=k)) == 3 * 16 * 16 // k + 2 * 16
    with pytest.raises(ValueError, match=r"hidden_size \(10\).*K=4"):
        SRU(8, 10, groups=4)
    with pytest.raises(ValueError, match=r"input_size \(6\).*K=4"):
        SRU(6, 8, groups=4)
    with pytest.raises(ValueError, match="expected c_0 of shape"):
        SRU(8, 8)(torch.randn(T, B, 8), torch.zeros(2, B, 8))


def test_residual_connections_match_the_reference(fused_mode):
    """residual=True on SRU: the fused path, the autograd path and the reference agree."""
    torch.manual_seed(0)
    module = SRU(12, H, num_layers=3, groups=2, residual=True).double().eval()
    assert not module.has_residual(0) and module.has_residual(1) and module.has_residual(2)
    x = torch.randn(T, B, 12, dtype=torch.float64)
    c0 = torch.randn(3, B, H, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    fused = outputs_and_grads(run_module, module, x, c0, lengths)
    fused_mode(False)
    assert_close(fused, outputs_and_grads(run_module, module, x, c0, lengths), 1e-10)
    assert_close(fused, outputs_and_grads(sru_reference, module, x, c0, lengths), 1e-10)
