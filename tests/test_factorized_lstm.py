"""F-LSTM (FactorizedLSTM): at full rank exactly nn.LSTM, grouped exactly a GroupLSTM with the product W2 W1,
the batched path against the literal reference W2 (W1 [x; h]), outputs and every gradient."""

import itertools

import pytest
import torch
import torch.nn as nn

from grnn_fairseq.modules import FactorizedLSTM, GroupLSTM, factorized_lstm_reference

T, B = 5, 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def weighted_loss(outputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=gen)).sum() for v in outputs)


def test_full_rank_is_nn_lstm_outputs_and_gradients():
    """Factors whose product is a given nn.LSTM's [W_ih, W_hh]: same outputs, same input gradients, and the
    factors' gradients are the chain rule of the LSTM's weight gradient: dW1 = W2^T dW, dW2 = dW W1^T."""
    torch.manual_seed(0)
    I, H, L = 6, 8, 2
    lstm = nn.LSTM(I, H, num_layers=L, bidirectional=True)
    rank = 2 * H + H  # >= I + H of every layer (the upper layers read 2H): every W = W2 W1 is reachable
    flstm = FactorizedLSTM(I, H, rank, num_layers=L, bidirectional=True)
    with torch.no_grad():
        for layer in range(L):
            for d, sfx in enumerate(["", "_reverse"]):
                w = torch.cat([getattr(lstm, f"weight_ih_l{layer}{sfx}"), getattr(lstm, f"weight_hh_l{layer}{sfx}")], 1)
                w1 = torch.randn(rank, w.size(1))  # full column rank
                w2 = w @ torch.linalg.pinv(w1)  # W2 W1 = W pinv(W1) W1 = W
                w1_ih, w1_hh, w2_p, bias = flstm.layer_weights(layer, d)
                i_l = w.size(1) - H
                w1_ih.copy_(w1[:, :i_l].unsqueeze(0))
                w1_hh.copy_(w1[:, i_l:].unsqueeze(0))
                w2_p.copy_(w2.unsqueeze(0))
                bias.copy_((getattr(lstm, f"bias_ih_l{layer}{sfx}") + getattr(lstm, f"bias_hh_l{layer}{sfx}")).unsqueeze(0))
    x = torch.randn(T, B, I, requires_grad=True)
    h0, c0 = torch.randn(2 * L, B, H, requires_grad=True), torch.randn(2 * L, B, H, requires_grad=True)
    ref = lstm(x, (h0, c0))
    ours = flstm(x, (h0, c0))
    for a, b in zip([ours[0], *ours[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    g_ref = torch.autograd.grad(weighted_loss([ref[0], *ref[1]]), [x, h0, c0, *lstm.parameters()])
    g = torch.autograd.grad(weighted_loss([ours[0], *ours[1]]), [x, h0, c0, *flstm.parameters()])
    for a, b in zip(g[:3], g_ref[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    lstm_grads = dict(zip([n for n, _ in lstm.named_parameters()], g_ref[3:]))
    ours_grads = dict(zip([n for n, _ in flstm.named_parameters()], g[3:]))
    for layer in range(L):
        for d, sfx in enumerate(["", "_reverse"]):
            w1_ih, w1_hh, w2, _ = flstm.layer_weights(layer, d)
            dw = torch.cat([lstm_grads[f"weight_ih_l{layer}{sfx}"], lstm_grads[f"weight_hh_l{layer}{sfx}"]], 1)
            dw1 = w2[0].t() @ dw  # r x (I + H)
            i_l = w1_ih.size(2)
            torch.testing.assert_close(ours_grads[f"weight1_ih_l{layer}{sfx}"][0], dw1[:, :i_l], rtol=0, atol=1e-9)
            torch.testing.assert_close(ours_grads[f"weight1_hh_l{layer}{sfx}"][0], dw1[:, i_l:], rtol=0, atol=1e-9)
            w1 = torch.cat([w1_ih[0], w1_hh[0]], 1)
            torch.testing.assert_close(ours_grads[f"weight2_l{layer}{sfx}"][0], dw @ w1.t(), rtol=0, atol=1e-9)
            torch.testing.assert_close(ours_grads[f"bias_l{layer}{sfx}"][0], lstm_grads[f"bias_ih_l{layer}{sfx}"], rtol=0, atol=1e-10)


CASES = list(itertools.product([1, 2, 4], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("K,bidirectional,shuffle_layers,shuffle_time,padded", CASES)
def test_batched_path_matches_reference_and_group_lstm(K, bidirectional, shuffle_layers, shuffle_time, padded):
    torch.manual_seed(0)
    m = FactorizedLSTM(8, 8, rank=16, num_layers=3, groups=K, bidirectional=bidirectional,
                       shuffle_layers=shuffle_layers, shuffle_time=shuffle_time).eval()  # fmt: skip
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, 8)
    hx = (torch.randn(3 * D, B, 8), torch.randn(3 * D, B, 8))
    lengths = torch.tensor([5, 2, 4]) if padded else None
    group_lstm = m.to_group_lstm()
    assert isinstance(group_lstm, GroupLSTM) and group_lstm.groups == K

    def run(f, module):
        xs = x.clone().requires_grad_(True)
        h0, c0 = (v.clone().requires_grad_(True) for v in hx)
        y, (h, c) = f(module, xs, (h0, c0), lengths)
        grads = torch.autograd.grad(weighted_loss([y, h, c]), [xs, h0, c0, *m.parameters()], allow_unused=True)
        return [y, h, c, *grads]

    fast = run(lambda mod, *a: mod(a[0], a[1], lengths=a[2]), m)
    assert fast[0].shape == (T, B, D * 8)
    for got, want in zip(fast, run(factorized_lstm_reference, m)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    y, (h, c) = group_lstm(x, hx, lengths=lengths)
    for got, want in zip(fast[:3], [y, h, c]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_recurrent_and_between_layer_dropout_match_group_lstm():
    """In training, the same seed draws the same masks: F-LSTM equals its GroupLSTM with dropout on."""
    torch.manual_seed(0)
    m = FactorizedLSTM(8, 8, rank=8, num_layers=2, groups=2, dropout=0.3, recurrent_dropout=0.3, variational=True)
    g = m.to_group_lstm()
    m.train()
    g.train()
    x = torch.randn(T, B, 8)
    torch.manual_seed(5)
    y1, _ = m(x)
    torch.manual_seed(5)
    y2, _ = g(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    torch.manual_seed(6)
    assert not torch.allclose(m(x)[0], y1)  # the masks really are random


def test_gradcheck():
    torch.manual_seed(0)
    m = FactorizedLSTM(4, 4, rank=4, num_layers=2, groups=2, bidirectional=True)
    x = torch.randn(3, 2, 4, requires_grad=True)
    h0, c0 = torch.randn(4, 2, 4, requires_grad=True), torch.randn(4, 2, 4, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    lengths = torch.tensor([3, 2])

    def f(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)), {"lengths": lengths})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *[p.detach().clone().requires_grad_() for p in m.parameters()]))


def test_parameter_count_and_errors():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    I, H, r = 16, 32, 8
    # per layer: W1 r x (I + H), W2 4H x r, b 4H; K groups divide the weights by K
    assert count(FactorizedLSTM(I, H, r)) == r * (I + H) + 4 * H * r + 4 * H
    assert count(FactorizedLSTM(I, H, r, groups=4)) == (r * (I + H) + 4 * H * r) // 4 + 4 * H
    assert count(FactorizedLSTM(I, H, r, bias=False, num_layers=2)) == r * (I + H) + r * (2 * H) + 2 * 4 * H * r
    with pytest.raises(ValueError, match=r"rank \(6\) is not divisible by groups K=4"):
        FactorizedLSTM(8, 8, 6, groups=4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FactorizedLSTM(8, 8, 0)
    with pytest.raises(ValueError, match=r"hidden_size \(10\).*K=4"):
        FactorizedLSTM(8, 10, 8, groups=4)
