"""F-LSTM: Kuchaiev and Ginsburg, "Factorization tricks for LSTM networks" (arXiv:1703.10722, 2017), section
3.1, "matrix factorization by design", optionally with the groups and channel shuffles of Gao et al. (NAACL
2018, equations 4-5 and section 2.2).

An LSTM computes its four gates from [x_t; h_{t-1}] with one 4H x (I + H) matrix W. F-LSTM replaces it by a
product of two smaller matrices, a rank-r bottleneck::

    (i, f, g, o) = W2 W1 [x_t; h_{t-1}] + b        W1: r x (I + H),  W2: 4H x r
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),  h_t = sigmoid(o) * tanh(c_t)   (gates as nn.LSTM)

With K groups every group is an F-LSTM of rank r/K on its chunk of x and of the recurrent input (K must divide
r): W1 and W2 are block diagonal, parameters and FLOPs fall by K, and ``shuffle_time`` / ``shuffle_layers`` act
as in GroupLSTM (group k reads chunk k of shuffle(h_{t-1}) and of the shuffled layer input).

Computation (``factorized_lstm_direction``): W1 = [W1x, W1h] is split by columns. The input part
W2 W1x x_t + b of all time steps is two products over all T*B rows before the loop; per step only the recurrent
part remains, W2 (W1h h_{t-1}): two small products (rH/K + 4Hr/K multiply-adds per group, against 4H^2/K for
an LSTM's recurrent matrix). It runs on autograd (there is no hand-written fused kernel for F-LSTM).
``factorized_lstm_reference`` beside it is a loop over groups computing W2 (W1 [x; h]) literally; tests
compare the two, and ``FactorizedLSTM.to_group_lstm`` (the product W2 W1 folded into a GroupLSTM, with
r = I + H a plain nn.LSTM) with both.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .functional import channel_shuffle, check_divisible, from_group_major, shuffle_permutation, to_group_major
from .group_lstm import GroupLSTM
from .stack import RecurrentStack, reference_stack
from .steps import lstm_cell


def factorized_lstm_direction(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w1_ih: Tensor,
    w1_hh: Tensor,
    w2: Tensor,
    bias: Optional[Tensor],
    shuffle_time: bool,
    mask: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one F-LSTM layer in one direction over a whole sequence.

    x: T x B x I. h, c: B x H. w1_ih: K x r/K x I/K. w1_hh: K x r/K x H/K. w2: K x 4H/K x r/K. bias: K x 4H/K
    or None. mask: T x B x 1 (True inside the sequence) or None; padded steps keep the state, output zeros.
    recurrent_mask: B x H dropout mask on h_{t-1} before the recurrent projection, or None.
    Returns output T x B x H, h_n B x H, c_n B x H.
    """
    T, B, I = x.size()
    K, Rk, Ik = w1_ih.size()
    G4 = w2.size(1)
    H = G4 // 4 * K
    assert Ik * K == I, f"input size {I} does not match weight1_ih {tuple(w1_ih.shape)}"
    # the input part of the gates, W2 W1x x_t + b, for all time steps: two batched products
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    u = torch.bmm(xg, w1_ih.transpose(1, 2))  # K x (T*B) x I/K @ K x I/K x r/K -> K x (T*B) x r/K
    w2_t = w2.transpose(1, 2)  # K x r/K x 4H/K
    if bias is not None:
        gx = torch.baddbmm(bias.unsqueeze(1), u, w2_t)  # K x (T*B) x 4H/K
    else:
        gx = torch.bmm(u, w2_t)  # K x (T*B) x 4H/K
    gx = gx.view(K, T, B, G4)  # K x (T*B) x 4H/K -> K x T x B x 4H/K
    w1_hh_t = w1_hh.transpose(1, 2)  # K x H/K x r/K
    perm = shuffle_permutation(H, K, x.device) if (shuffle_time and K > 1) else None
    c = to_group_major(c, K)  # B x H -> K x B x H/K
    outputs: List[Tensor] = []
    for t in range(T):
        r = h if recurrent_mask is None else h * recurrent_mask
        if perm is not None:
            r = r.index_select(1, perm)  # B x H, shuffle(h_{t-1})
        r = r.view(B, K, H // K).transpose(0, 1)  # B x H -> K x B x H/K
        z = torch.bmm(r, w1_hh_t)  # K x B x H/K @ K x H/K x r/K -> K x B x r/K, the bottleneck
        gates = torch.baddbmm(gx[:, t], z, w2_t)  # K x B x r/K @ K x r/K x 4H/K -> K x B x 4H/K
        h_new, c_new = lstm_cell(gates, c)  # K x B x H/K each
        h_new = from_group_major(h_new)  # K x B x H/K -> B x H
        if mask is not None:
            m = mask[t]  # B x 1
            outputs.append(h_new * m)
            h = torch.where(m, h_new, h)
            c = torch.where(m.unsqueeze(0), c_new, c)
        else:
            outputs.append(h_new)
            h, c = h_new, c_new
    out = torch.stack(outputs, 0) if outputs else x.new_zeros(0, B, H)
    return out, h, from_group_major(c)


class FactorizedLSTM(RecurrentStack):
    r"""A stack of F-LSTM layers (rank-r factorized gate matrices), optionally grouped, with the interface of
    ``torch.nn.LSTM`` (sequence first).

    Args:
        input_size: features of the input x (C). Must be divisible by ``groups``.
        hidden_size: features of the hidden state h (H). Must be divisible by ``groups``.
        rank: r, the width of the bottleneck W1 [x; h] of every layer and direction. Must be divisible by
            ``groups`` (each group has rank r/K). r >= I + H (full rank) can represent any LSTM.
        num_layers, groups, bias, dropout, bidirectional, shuffle_layers, shuffle_time, variational,
        recurrent_dropout, residual: as :class:`GroupLSTM`. ``bias`` is one vector b per layer (nn.LSTM's b_ih + b_hh).

    Inputs: input, (h_0, c_0); lengths -- as :class:`GroupLSTM`:
        input: T x B x C; h_0, c_0: (L*D) x B x H (zeros when omitted); lengths: optional B (right padded).

    Outputs: output, (h_n, c_n)
        output: T x B x (D*H); h_n, c_n: (L*D) x B x H.

    Parameters, for layer l and suffix '' or '_reverse': ``weight1_ih_l{l}`` K x r/K x I_l/K and
    ``weight1_hh_l{l}`` K x r/K x H/K (W1 = [W1x, W1h] per group), ``weight2_l{l}`` K x 4H/K x r/K (rows of
    group k: its gates i, f, g, o), ``bias_l{l}`` K x 4H/K. Initialization: W1 U(-1/sqrt(f), 1/sqrt(f)) with
    f = (I_l + H)/K its input width (nn.Linear's), W2 uniform scaled so that the entries of W2 W1 start with
    nn.LSTM's variance 1/(3H), bias as nn.LSTM.
    """

    PARAMETERS = ("weight1_ih", "weight1_hh", "weight2", "bias")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rank: int,
        num_layers: int = 1,
        groups: int = 1,
        bias: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        shuffle_layers: bool = True,
        shuffle_time: bool = True,
        variational: bool = False,
        recurrent_dropout: float = 0.0,
        residual: bool = False,
    ):
        super().__init__(input_size, hidden_size, num_layers, groups, dropout, bidirectional, shuffle_layers,
                         variational, residual, recurrent_dropout=recurrent_dropout)  # fmt: skip
        if rank < 1:
            raise ConfigError(f"rank must be >= 1, got {rank}")
        check_divisible(rank, groups, "rank")
        self.rank = rank
        self.bias = bias
        self.shuffle_time = shuffle_time
        K, H, R = groups, hidden_size, rank
        for layer in range(num_layers):
            self.register_layer(layer, {
                "weight1_ih": (K, R // K, self.layer_input_size(layer) // K), "weight1_hh": (K, R // K, H // K),
                "weight2": (K, 4 * H // K, R // K), "bias": (K, 4 * H // K) if bias else None,
            })  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        K, H = self.groups, self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                w1_ih, w1_hh, w2, bias = self.layer_weights(layer, direction)
                fan_in = (self.layer_input_size(layer) + H) / K  # W1's input width per group
                bound1 = 1.0 / math.sqrt(fan_in)  # nn.Linear's bound
                torch.nn.init.uniform_(w1_ih, -bound1, bound1)
                torch.nn.init.uniform_(w1_hh, -bound1, bound1)
                # W2 so that every entry of W2 W1 has nn.LSTM's initial variance 1/(3H): (r/K) var(W1) var(W2) =
                # 1/(3H). With both factors at nn.Linear's bound the product starts about 2x smaller, and on the
                # reversal task of tests/test_group_rnnsearch.py a full-rank F-LSTM reached BLEU 27 where nn.LSTM
                # reached 93 after 6 epochs; with this init, 91.
                bound2 = math.sqrt(3.0 * fan_in / (self.rank / K * H))
                torch.nn.init.uniform_(w2, -bound2, bound2)
                if bias is not None:
                    torch.nn.init.uniform_(bias, -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))

    def _repr_settings(self):
        return [("rank", None)] + super()._repr_settings() + [("bias", True), ("shuffle_time", True),
                                                               ("recurrent_dropout", 0.0)]  # fmt: skip

    def run_direction(self, x, state, weights, layer, direction, mask, lengths):
        out, h, c = factorized_lstm_direction(x, *state, *weights, self.shuffle_time, mask, self.recurrent_mask(state[0]))
        return out, (h, c)

    @torch.no_grad()
    def to_group_lstm(self) -> GroupLSTM:
        """A GroupLSTM computing the same function: per group W_ih = W2 W1x, W_hh = W2 W1h, b_ih = b, b_hh = 0.

        Same groups and shuffles; with ``groups=1`` it is nn.LSTM (``GroupLSTM.to_dense``). Between-layer
        dropout settings are copied, so the two match in eval mode (and in training with the same masks).
        """
        p = next(self.parameters())
        dense = GroupLSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            groups=self.groups,
            bias=self.bias,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            shuffle_layers=self.shuffle_layers,
            shuffle_time=self.shuffle_time,
            variational=self.variational,
            recurrent_dropout=self.recurrent_dropout,
            residual=self.residual,
        ).to(device=p.device, dtype=p.dtype)
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                w1_ih, w1_hh, w2, bias = self.layer_weights(layer, direction)
                w_ih, w_hh, b_ih, b_hh = dense.layer_weights(layer, direction)
                torch.bmm(w2, w1_ih, out=w_ih)  # K x 4H/K x r/K @ K x r/K x I/K -> K x 4H/K x I/K
                torch.bmm(w2, w1_hh, out=w_hh)  # K x 4H/K x r/K @ K x r/K x H/K -> K x 4H/K x H/K
                if bias is not None:
                    b_ih.copy_(bias)
                    b_hh.zero_()
        return dense


def factorized_lstm_reference(
    module: FactorizedLSTM,
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """A plain F-LSTM forward: per step and group, gates = W2 (W1 [x; h]) + b, written from the equations.

    Independent of the batched path (no precomputed input part, no bmm), so tests can compare the two.
    Dropout is not applied (use it with the module in eval mode). Padded batches run every sequence alone.
    """
    K = module.groups

    def cell(x_t, h, c, w1_ih, w1_hh, w2, bias):
        r = channel_shuffle(h, K) if module.shuffle_time else h
        xs, rs, cs = x_t.chunk(K, -1), r.chunk(K, -1), c.chunk(K, -1)
        new_h, new_c = [], []
        for k in range(K):  # group k: an F-LSTM of rank r/K
            w1 = torch.cat([w1_ih[k], w1_hh[k]], dim=1)  # W1 = [W1x, W1h]: r/K x (I/K + H/K)
            gates = F.linear(F.linear(torch.cat([xs[k], rs[k]], -1), w1), w2[k])  # W2 (W1 [x; h])
            if bias is not None:
                gates = gates + bias[k]
            hk, ck = lstm_cell(gates, cs[k])
            new_h.append(hk)
            new_c.append(ck)
        return torch.cat(new_h, -1), torch.cat(new_c, -1)

    return reference_stack(module, input, hx, lengths, cell, factorized_lstm_reference)
