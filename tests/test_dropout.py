"""grnn_fairseq.modules.dropout: the cheaper CPU dropout keeps 1 - p of the elements, scales them by
1/(1-p), passes the same mask to the gradient, is reproducible under a seed, and is F.dropout elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from grnn_fairseq.modules.dropout import dropout, dropout_mask, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.65])
def test_keep_fraction_and_independence(p):
    torch.manual_seed(0)
    m = keep_mask((400, 1000), p)
    n = m.numel()
    assert m.dtype == torch.bool and m.shape == (400, 1000)
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(m.float().mean().item() - (1 - p)) < 5 * sd
    # the four elements of one 64-bit draw (and neighbours in general) are independent: no position is biased
    by_position = m.view(-1, 4).float().mean(0)
    assert ((by_position - (1 - p)).abs() < 5 * (p * (1 - p) / (n / 4)) ** 0.5).all(), by_position
    pairs = (m.view(-1)[:-1] & m.view(-1)[1:]).float().mean().item()  # P(both kept) = (1-p)^2
    assert abs(pairs - (1 - p) ** 2) < 5 * sd


def test_odd_sizes_and_empty():
    for shape in [(1,), (3,), (5, 7), (0, 4)]:
        assert keep_mask(shape, 0.3).shape == shape


def test_output_and_gradient_share_the_mask():
    torch.manual_seed(1)
    x = torch.randn(37, 11, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.allclose(x.grad, torch.where(kept, dy / 0.7, torch.zeros_like(dy)))
    assert 0.6 < kept.double().mean().item() < 0.8


def test_seeded_runs_repeat_and_masks_differ_between_calls():
    x = torch.ones(64, 64)
    torch.manual_seed(5)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.5), a) and torch.equal(dropout(x, 0.5), b)
    assert not torch.equal(a, b)


def test_identity_and_fallbacks():
    x = torch.randn(8, 8)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # F.dropout's p = 1
    ints = torch.arange(10)
    with pytest.raises(RuntimeError):  # integer tensors go to F.dropout, which refuses them as it always did
        F.dropout(ints, 0.5)
    with pytest.raises(RuntimeError):
        dropout(ints, 0.5)


def test_dropout_mask_values():
    torch.manual_seed(2)
    like = torch.empty(300, 200, dtype=torch.float64)
    m = dropout_mask(like, 0.25)
    assert m.dtype == torch.float64 and m.shape == like.shape
    assert set(torch.unique(m).tolist()) == {0.0, 1 / 0.75}
    assert abs((m != 0).double().mean().item() - 0.75) < 0.01
