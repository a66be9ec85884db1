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
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .group_lstm import (
    GroupLSTM,
    channel_shuffle,
    check_divisible,
    check_stack,
    reference_stack,
    from_group_major,
    reverse_padded,
    shuffle_permutation,
    step_mask,
    to_group_major,
)


def lstm_cell_update(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """nn.LSTM's cell on pre-activations. gates: ... x 4H' (i, f, g, o), c: ... x H'. Returns (h', c')."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


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
        h_new, c_new = lstm_cell_update(gates, c)  # K x B x H/K each
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


class FactorizedLSTM(nn.Module):
    r"""A stack of F-LSTM layers (rank-r factorized gate matrices), optionally grouped, with the interface of
    ``torch.nn.LSTM`` (sequence first).

    Args:
        input_size: features of the input x (C). Must be divisible by ``groups``.
        hidden_size: features of the hidden state h (H). Must be divisible by ``groups``.
        rank: r, the width of the bottleneck W1 [x; h] of every layer and direction. Must be divisible by
            ``groups`` (each group has rank r/K). r >= I + H (full rank) can represent any LSTM.
        num_layers, groups, bias, dropout, bidirectional, shuffle_layers, shuffle_time, variational,
        recurrent_dropout: as :class:`GroupLSTM`. ``bias`` is one vector b per layer (nn.LSTM's b_ih + b_hh).

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
    ):
        super().__init__()
        check_stack(input_size, hidden_size, groups, num_layers, dropout=dropout, recurrent_dropout=recurrent_dropout)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        check_divisible(rank, groups, "rank")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rank = rank
        self.num_layers = num_layers
        self.groups = groups
        self.bias = bias
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.shuffle_layers = shuffle_layers
        self.shuffle_time = shuffle_time
        self.variational = variational
        self.recurrent_dropout = recurrent_dropout
        K, H, R = groups, hidden_size, rank
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes():
                self.register_parameter(f"weight1_ih_l{layer}{suffix}", nn.Parameter(torch.empty(K, R // K, layer_input // K)))
                self.register_parameter(f"weight1_hh_l{layer}{suffix}", nn.Parameter(torch.empty(K, R // K, H // K)))
                self.register_parameter(f"weight2_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K, R // K)))
                if bias:
                    self.register_parameter(f"bias_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K)))
        self.reset_parameters()

    def _suffixes(self) -> List[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    def reset_parameters(self) -> None:
        K, H = self.groups, self.hidden_size
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else H * self.num_directions
            for direction in range(self.num_directions):
                w1_ih, w1_hh, w2, bias = self.layer_weights(layer, direction)
                fan_in = (layer_input + H) / K  # W1's input width per group
                bound1 = 1.0 / math.sqrt(fan_in)  # nn.Linear's bound
                nn.init.uniform_(w1_ih, -bound1, bound1)
                nn.init.uniform_(w1_hh, -bound1, bound1)
                # W2 so that every entry of W2 W1 has nn.LSTM's initial variance 1/(3H): (r/K) var(W1) var(W2) =
                # 1/(3H). With both factors at nn.Linear's bound the product starts about 2x smaller, and on the
                # reversal task of tests/test_group_rnnsearch.py a full-rank F-LSTM reached BLEU 27 where nn.LSTM
                # reached 93 after 6 epochs; with this init, 91.
                bound2 = math.sqrt(3.0 * fan_in / (self.rank / K * H))
                nn.init.uniform_(w2, -bound2, bound2)
                if bias is not None:
                    nn.init.uniform_(bias, -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))

    def layer_weights(self, layer: int, direction: int) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(weight1_ih, weight1_hh, weight2, bias) of one layer and direction (bias None without bias)."""
        suffix = self._suffixes()[direction]
        return (
            getattr(self, f"weight1_ih_l{layer}{suffix}"),
            getattr(self, f"weight1_hh_l{layer}{suffix}"),
            getattr(self, f"weight2_l{layer}{suffix}"),
            getattr(self, f"bias_l{layer}{suffix}") if self.bias else None,
        )

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, rank={self.rank}, num_layers={self.num_layers}, groups={self.groups}"
        if not self.bias:
            s += ", bias=False"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if not self.shuffle_layers:
            s += ", shuffle_layers=False"
        if not self.shuffle_time:
            s += ", shuffle_time=False"
        if self.variational:
            s += ", variational=True"
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        return s

    # the state handling and between-layer dropout/shuffle are GroupLSTM's, on the same attributes
    init_state = GroupLSTM.init_state
    _dropout_mask = GroupLSTM._dropout_mask
    layer_input = GroupLSTM.layer_input

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        T, B, C = input.size()
        if C != self.input_size:
            raise ValueError(f"FactorizedLSTM expected input of size {self.input_size}, got {C}")
        h0, c0 = self.init_state(input, hx)
        mask = step_mask(lengths, T, input.device)
        x = input
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0:
                x = self.layer_input(x, layer)
            outputs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                rmask = None
                if self.training and self.recurrent_dropout > 0:
                    rmask = self._dropout_mask(h0[idx], self.recurrent_dropout)
                xd = x if direction == 0 else reverse_padded(x, lengths)
                out, h, c = factorized_lstm_direction(
                    xd, h0[idx], c0[idx], *self.layer_weights(layer, direction), self.shuffle_time, mask, rmask
                )
                outputs.append(out if direction == 0 else reverse_padded(out, lengths))
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if self.num_directions == 1 else torch.cat(outputs, dim=-1)  # T x B x D*H
        return x, (torch.stack(h_n, 0), torch.stack(c_n, 0))

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
            hk, ck = lstm_cell_update(gates, cs[k])
            new_h.append(hk)
            new_c.append(ck)
        return torch.cat(new_h, -1), torch.cat(new_c, -1)

    return reference_stack(module, input, hx, lengths, cell, factorized_lstm_reference)
