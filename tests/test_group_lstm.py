"""GroupLSTM and GroupLSTMCell against nn.LSTM, to_dense() (equation 7) and the readable reference."""

import itertools
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from grnn_fairseq.modules import GroupLSTM, GroupLSTMCell, channel_shuffle, group_lstm_reference, shuffle_permutation

REGRESSION = os.path.join(os.path.dirname(__file__), "data", "group_lstm_regression.pt")


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in float64; restored afterwards so other test files keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make(groups=2, layers=2, bidirectional=False, shuffle_layers=True, shuffle_time=True, size=8, bias=True):
    torch.manual_seed(0)
    return GroupLSTM(
        size, size, num_layers=layers, groups=groups, bias=bias, bidirectional=bidirectional,
        shuffle_layers=shuffle_layers, shuffle_time=shuffle_time,
    )


def test_channel_shuffle_is_shufflenet_shuffle():
    x = torch.arange(8.0)
    # the paper's figure 3: size 8, 2 groups
    assert channel_shuffle(x, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    v = torch.randn(3, 5, 12)
    for k in (1, 2, 3, 4, 6):
        # torch's channel_shuffle works on dimension 1 of N x C x ...
        expected = F.channel_shuffle(v.reshape(15, 12, 1), k).reshape(3, 5, 12)
        assert torch.equal(channel_shuffle(v, k), expected)
        assert torch.equal(v[..., shuffle_permutation(12, k)], expected)


def test_groups_1_is_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(6, 8, num_layers=2, bidirectional=True)
    ours = GroupLSTM(6, 8, num_layers=2, groups=1, bidirectional=True)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            getattr(ours, name).copy_(p.view_as(getattr(ours, name)))
    x = torch.randn(5, 3, 6, requires_grad=True)
    h0, c0 = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    out, (h, c) = ours(x, (h0, c0))
    assert torch.allclose(out, out_ref) and torch.allclose(h, h_ref) and torch.allclose(c, c_ref)
    g_ref = torch.autograd.grad(out_ref.sum() + h_ref.sum(), [x, *ref.parameters()])
    g = torch.autograd.grad(out.sum() + h.sum(), [x, *ours.parameters()])
    for a, b in zip(g, g_ref):
        assert torch.allclose(a.view_as(b), b)


CONFIGS = list(itertools.product([1, 2, 4], [1, 2, 3], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("groups,layers,bidirectional,shuffle_layers,shuffle_time", CONFIGS)
def test_to_dense_and_reference(groups, layers, bidirectional, shuffle_layers, shuffle_time):
    m = make(groups, layers, bidirectional, shuffle_layers, shuffle_time)
    dense = m.to_dense()
    assert isinstance(dense, nn.LSTM)
    D = 2 if bidirectional else 1
    x = torch.randn(6, 3, 8, requires_grad=True)
    hx = (torch.randn(layers * D, 3, 8), torch.randn(layers * D, 3, 8))
    out, (h, c) = m(x, hx)
    assert out.shape == (6, 3, D * 8) and h.shape == c.shape == (layers * D, 3, 8)
    for other in (dense(x, hx), group_lstm_reference(m, x, hx)):
        out2, (h2, c2) = other
        assert torch.allclose(out, out2) and torch.allclose(h, h2) and torch.allclose(c, c2)
        w = torch.randn_like(out)
        g1 = torch.autograd.grad((out * w).sum() + h.sum(), x, retain_graph=True)[0]
        g2 = torch.autograd.grad((out2 * w).sum() + h2.sum(), x, retain_graph=True)[0]
        assert torch.allclose(g1, g2)


def test_shuffles_change_the_function():
    """Guards against a shuffle silently becoming a no-op."""
    x = torch.randn(5, 2, 8)
    base = make(2, 2)(x)[0]
    assert not torch.allclose(base, make(2, 2, shuffle_time=False)(x)[0])
    assert not torch.allclose(base, make(2, 2, shuffle_layers=False)(x)[0])


def test_without_shuffles_groups_are_independent():
    """G-LSTM: with no shuffle the output of group 0 depends only on input chunk 0."""
    m = make(2, 2, shuffle_layers=False, shuffle_time=False)
    x = torch.randn(5, 2, 8, requires_grad=True)
    out = m(x)[0]
    g = torch.autograd.grad(out[..., :4].sum(), x)[0]
    assert g[..., 4:].abs().max() == 0 and g[..., :4].abs().max() > 0
    m = make(2, 1, shuffle_time=True)
    out = m(x)[0]
    g = torch.autograd.grad(out[-1, :, :4].sum(), x)[0]
    assert g[..., 4:].abs().max() > 0  # the time shuffle lets group 0 see group 1's input


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_sequence_alone_equals_inside_padded_batch(bidirectional, groups):
    m = make(groups, 2, bidirectional)
    lengths = torch.tensor([6, 2, 4])
    x = torch.randn(6, 3, 8)
    out, (h, c) = m(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        out_b, (h_b, c_b) = m(x[:n, b : b + 1])
        assert torch.allclose(out[:n, b : b + 1], out_b)
        assert out[n:, b].abs().max() == 0 if n < 6 else True
        assert torch.allclose(h[:, b : b + 1], h_b) and torch.allclose(c[:, b : b + 1], c_b)
    ref_out, (ref_h, _) = group_lstm_reference(m, x, lengths=lengths)
    assert torch.allclose(out, ref_out) and torch.allclose(h, ref_h)


def test_gradcheck():
    m = GroupLSTM(4, 4, num_layers=2, groups=2, bidirectional=True)
    x = torch.randn(3, 2, 4, requires_grad=True)
    h0 = torch.randn(4, 2, 4, requires_grad=True)
    c0 = torch.randn(4, 2, 4, requires_grad=True)
    params = list(m.parameters())

    def f(x, h0, c0, *ps):
        with torch.no_grad():
            for p, q in zip(params, ps):
                p.copy_(q)
        # run through torch.func so the parameters are inputs of the checked function
        out, (h, c) = torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *[p.detach().clone().requires_grad_() for p in params]))


def test_cell_matches_one_layer():
    torch.manual_seed(1)
    layer = GroupLSTM(8, 12, groups=4)
    cell = GroupLSTMCell(8, 12, groups=4)
    with torch.no_grad():
        cell.weight_ih.copy_(layer.weight_ih_l0)
        cell.weight_hh.copy_(layer.weight_hh_l0)
        cell.bias_ih.copy_(layer.bias_ih_l0)
        cell.bias_hh.copy_(layer.bias_hh_l0)
    x = torch.randn(5, 3, 8)
    out, (h_n, c_n) = layer(x)
    h = c = torch.zeros(3, 12)
    for t in range(5):
        h, c = cell(x[t], (h, c))
        assert torch.allclose(h, out[t])
    assert torch.allclose(h, h_n[0]) and torch.allclose(c, c_n[0])


def test_sizes_not_divisible_raise():
    with pytest.raises(ValueError, match=r"hidden_size \(10\).*K=4"):
        GroupLSTM(8, 10, groups=4)
    with pytest.raises(ValueError, match=r"input_size \(6\).*K=4"):
        GroupLSTM(6, 8, groups=4)
    with pytest.raises(ValueError, match=r"input_size \(9\).*K=2"):
        GroupLSTMCell(9, 8, groups=2)


def test_parameters_fall_by_k():
    dense = sum(p.numel() for p in GroupLSTM(64, 64, 2, groups=1, bias=False).parameters())
    for k in (2, 4, 8):
        assert sum(p.numel() for p in GroupLSTM(64, 64, 2, groups=k, bias=False).parameters()) * k == dense


def test_variational_dropout_masks_are_shared_over_time():
    """With variational dropout, the between-layer mask of a channel is the same at every step."""
    m = GroupLSTM(4, 4, num_layers=2, groups=2, dropout=0.5, variational=True).train()
    x = torch.randn(7, 3, 8)
    dropped = m.layer_input(x)
    zero = dropped == 0
    assert zero.any()
    assert torch.equal(zero, zero[:1].expand_as(zero))  # a dropped channel is dropped at every t
    m.variational = False
    zero = m.layer_input(x) == 0
    assert not torch.equal(zero, zero[:1].expand_as(zero))


def test_frozen_regression():
    """Outputs of a tiny layer saved once: catches silent changes of shuffle order or weight layout."""
    saved = torch.load(REGRESSION, weights_only=True)
    m = GroupLSTM(8, 8, num_layers=2, groups=2, bidirectional=True).double()
    m.load_state_dict(saved["state_dict"])
    out, (h, c) = m(saved["input"])
    assert torch.allclose(out, saved["output"], atol=1e-12)
    assert torch.allclose(h, saved["h_n"], atol=1e-12) and torch.allclose(c, saved["c_n"], atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_residual_connections_match_the_reference(bidirectional, padded):
    """residual=True: every layer as wide as its input adds the input to its output; the batched path equals the
    reference (which adds it the same way), padding stays zero, and to_dense refuses (nn.LSTM has none)."""
    torch.manual_seed(0)
    D = 2 if bidirectional else 1
    m = GroupLSTM(8 * D, 8, num_layers=3, groups=2, bidirectional=bidirectional, residual=True).double()
    assert all(m.has_residual(layer) for layer in range(3))
    x = torch.randn(6, 3, 8 * D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 4]) if padded else None
    out, (h, c) = m(x, lengths=lengths)
    ref, (h_ref, c_ref) = group_lstm_reference(m, x, lengths=lengths)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    w = torch.randn_like(out)
    g1 = torch.autograd.grad((out * w).sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad((ref * w).sum(), x)[0]
    torch.testing.assert_close(g1, g2)
    plain = GroupLSTM(8 * D, 8, num_layers=3, groups=2, bidirectional=bidirectional).double()
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x, lengths=lengths)[0], out)  # the connections change the function
    if padded:
        assert out[2:, 1].abs().max() == 0
    with pytest.raises(ValueError, match="residual"):
        m.to_dense()
    narrow = GroupLSTM(12, 8, num_layers=2, groups=2, residual=True)  # layer 0: 12 -> 8, no connection
    assert not narrow.has_residual(0) and narrow.has_residual(1)
