"""Group LSTM: Gao et al., "Efficient Sequence Learning with Group Recurrent Networks", NAACL 2018.

A group recurrent layer splits its input x_t and its hidden state h_t into K groups and runs one small
LSTM per group (equations 4 and 5); a parameter-free representation rearrangement, the channel shuffle of
ShuffleNet (section 2.2, figure 3), between stacked layers and between time steps restores the exchange
between groups. The layer equals an LSTM whose weights are block diagonal with permuted columns
(equation 7); ``GroupLSTM.to_dense`` builds that ``torch.nn.LSTM``.

Semantics (the contract that tests and checkpoints rely on):

* ``channel_shuffle(v, K)`` for v of size N is ``v.view(..., K, N // K).transpose(-1, -2).reshape(..., N)``.
* Group k of a layer sees chunk k of the layer input and chunk k of the recurrent input, and owns chunk k
  of h and c. The gate order inside a group is i, f, g, o, as in nn.LSTM.
* With ``shuffle_time`` the recurrent input at step t is shuffle(h_{t-1}); c is never shuffled. Without it
  the layer is Kuchaiev and Ginsburg's G-LSTM.
* With ``shuffle_layers`` layer l > 0 reads shuffle(output of layer l - 1); the first layer's input is not
  shuffled and the returned output is the plain concatenation of the top layer's groups.
* ``groups=1`` is exactly nn.LSTM.

Two implementations sit side by side: ``group_lstm_reference`` (a loop over groups, written from the
paper's equations) and the batched path of ``GroupLSTM.forward`` (one bmm over the K groups for all time
steps' input projections, one bmm per step for the recurrence). Tests compare them.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .functional import (
    channel_shuffle,
    check_divisible,
    from_group_major,
    shuffle_permutation,
    to_group_major,
)
from .fused_group_lstm import fused_group_lstm_direction, fused_supported
from .products import derived_weight, grouped_linear, linear
from .stack import RecurrentStack, reference_stack
from .steps import cell_pointwise, step_kind

HALF = (torch.float16, torch.bfloat16)


def group_lstm_step(
    gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, groups: int, perm: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """One time step of a group LSTM layer (batched over groups).

    gx: K x B x 4H/K, the input projection plus biases of this step.
    h: B x H, the previous hidden state (plain concatenation of the groups).
    c: K x B x H/K, the previous cell state in group-major layout.
    w_hh: K x 4H/K x H/K, the recurrent weights.
    perm: the shuffle permutation of h (shuffle_time) or None.
    Returns h' (B x H) and c' (K x B x H/K).
    """
    K = groups
    B, H = h.size()
    r = h if perm is None else h.index_select(1, perm)  # B x H, shuffle(h_{t-1})
    r = r.view(B, K, H // K).transpose(0, 1)  # B x H -> K x B x H/K
    gates = gx + grouped_linear(r, w_hh)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K
    h_new, c_new = cell_pointwise(gates, c)  # K x B x H/K each
    h_new = h_new.transpose(0, 1).reshape(B, H)  # K x B x H/K -> B x H
    return h_new, c_new


def group_lstm_direction(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    shuffle_time: bool,
    mask: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one layer in one direction over a whole sequence; shapes as ``group_lstm_direction_autograd``.

    lengths: the B lengths (long) that ``mask`` encodes, when it is ``step_mask(lengths)``, or None: the fused
    path then takes them as they are instead of recovering them from the mask, a check that waits for the GPU.

    Dispatches to the fused autograd Function (hand-written backward through time, the fast path for
    training and inference) when it supports the call, else to the readable batched autograd path: with the
    backend's ``path="reference"``, a mask that is not a right-padding prefix mask, or a shuffle with
    (H/K) % K != 0.

    Mixed precision (float16 / bfloat16 tensors, as fairseq's --fp16 makes them, or autocast, as --amp does)
    keeps the cell state and the gate math in float32 (cuDNN's practice for its half-precision LSTMs). On the
    Triton step (``steps.step_kind``) the fused path runs in the half dtype: its products read float16/bfloat16
    operands and accumulate in float32, the cell state and the saved gate derivatives are float32, and the
    outputs are in the half dtype (autocast: the inputs are cast to autocast's dtype, as for cuDNN's LSTM). On
    the other steps the fused recurrence runs in float32: the inputs are cast up, autocast is off inside, and
    the outputs are cast back to the input's dtype (autocast: left in float32). The casts are autograd
    operations, so gradients return in the parameters' own dtype.
    """
    if backend.fused():
        device = x.device.type
        if x.dtype in HALF or torch.is_autocast_enabled(device):
            half = _half_on_triton(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, mask, recurrent_mask, lengths)
            if half is not None:
                return half
            dtype = x.dtype if x.dtype in HALF else torch.float32
            up = [None if v is None else v.float() for v in (x, h, c, recurrent_mask)]
            weights = _weights_as(torch.float32, w_ih, w_hh, b_ih, b_hh)
            with torch.autocast(device_type=device, enabled=False):
                out, h_n, c_n = group_lstm_direction(*up[:3], *weights, shuffle_time, mask, up[3], lengths)
            return out.to(dtype), h_n.to(dtype), c_n.to(dtype)
        ok, lengths = fused_supported(x, w_hh, shuffle_time, mask, lengths)
        if ok:
            return fused_group_lstm_direction(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask)
    return group_lstm_direction_autograd(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, mask, recurrent_mask)


def _half_on_triton(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, mask, recurrent_mask, lengths):
    """``group_lstm_direction``'s fused path in float16/bfloat16 on the Triton step (x's dtype, else autocast's),
    or None where that step does not run the call."""
    device = x.device.type
    dtype = x.dtype if x.dtype in HALF else torch.get_autocast_dtype(device)
    if dtype not in HALF or step_kind(x) != "triton":
        return None
    with torch.autocast(device_type=device, enabled=False):
        ok, lengths = fused_supported(x, w_hh, shuffle_time, mask, lengths)
        if not ok:
            return None
        args = [None if v is None else v.to(dtype) for v in (x, h, c, recurrent_mask)]
        weights = _weights_as(dtype, w_ih, w_hh, b_ih, b_hh)
        return fused_group_lstm_direction(*args[:3], *weights, shuffle_time, lengths, args[3])


def _weights_as(dtype: torch.dtype, *weights: Optional[Tensor]) -> List[Optional[Tensor]]:
    """``weights`` in ``dtype``, cast once per ``products.reuse_packed_weights`` scope (the steps of a decoder's
    loop, an incremental decoder's steps): the same tensors at every step, so that what is derived from them
    (gate-scaled, packed) is made once too; outside a scope, cast now."""
    return [None if w is None else derived_weight(w, f"as {dtype}", lambda w=w: w.to(dtype)) for w in weights]


def group_lstm_direction_autograd(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    shuffle_time: bool,
    mask: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one layer in one direction over a whole sequence (batched path).

    x: T x B x I. h, c: B x H. w_ih: K x 4H/K x I/K. w_hh: K x 4H/K x H/K. b_*: K x 4H/K or None.
    mask: T x B x 1 (True inside the sequence) or None; padded steps keep the state and output zeros.
    recurrent_mask: B x H dropout mask applied to h_{t-1} before the recurrent projection, or None.
    Returns output T x B x H, h_n B x H, c_n B x H.
    """
    T, B, I = x.size()
    K, G4, Ik = w_ih.size()
    H = G4 // 4 * K
    assert Ik * K == I, f"input size {I} does not match weight_ih {tuple(w_ih.shape)}"
    # input projections of all time steps in one batched multiply
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    if b_ih is not None:
        bias = (b_ih + b_hh).unsqueeze(1)  # K x 1 x 4H/K
        gx = torch.baddbmm(bias, xg, w_ih.transpose(1, 2))  # K x (T*B) x 4H/K
    else:
        gx = torch.bmm(xg, w_ih.transpose(1, 2))  # K x (T*B) x 4H/K
    gx = gx.view(K, T, B, G4)  # K x (T*B) x 4H/K -> K x T x B x 4H/K
    perm = shuffle_permutation(H, K, x.device) if (shuffle_time and K > 1) else None
    c = to_group_major(c, K)  # B x H -> K x B x H/K
    outputs: List[Tensor] = []
    for t in range(T):
        h_in = h if recurrent_mask is None else h * recurrent_mask
        h_new, c_new = group_lstm_step(gx[:, t], h_in, c, w_hh, K, perm)
        if mask is not None:
            m = mask[t]  # B x 1
            outputs.append(h_new * m)
            h = torch.where(m, h_new, h)
            c = torch.where(m.unsqueeze(0), c_new, c)
        else:
            outputs.append(h_new)
            h, c = h_new, c_new
    return torch.stack(outputs, 0), h, from_group_major(c)


class GroupLSTM(RecurrentStack):
    r"""A stack of group LSTM layers with the interface of ``torch.nn.LSTM`` (sequence first).

    Args:
        input_size: features of the input x (C). Must be divisible by ``groups``.
        hidden_size: features of the hidden state h (H). Must be divisible by ``groups``.
        num_layers: stacked layers (L).
        groups: K, the number of groups of every layer. 1 is nn.LSTM.
        bias: use b_ih and b_hh, as nn.LSTM.
        dropout: dropout on the outputs of every layer but the last, as nn.LSTM.
        bidirectional: D = 2 when True. Each direction of a layer is grouped the same way.
        shuffle_layers: channel shuffle of the input of every layer but the first.
        shuffle_time: channel shuffle of h_{t-1} before the recurrent projection.
        variational: draw one dropout mask per sequence for the between-layer dropout and reuse it at
            every time step (Gal and Ghahramani 2016) instead of a fresh mask per step.
        recurrent_dropout: dropout on h_{t-1} before the recurrent projection, one mask per sequence,
            layer and direction (Gal and Ghahramani's dropout of the recurrent connections).
        residual: a layer whose output (D*H) is as wide as its input adds its input to its output (Wu et al.
            2016, GNMT's residual connections between stacked layers); not in nn.LSTM, so no ``to_dense``.

    Inputs: input, (h_0, c_0); lengths
        input: T x B x C.
        h_0, c_0: (L*D) x B x H, zeros when omitted.
        lengths: optional B, the length of every sequence (right padded). Padded steps leave the state
            unchanged and give zero outputs, the reverse direction starts at each sequence's last token,
            and h_n, c_n are the states after each sequence's own last token (pack_padded_sequence's
            semantics without packing).

    Outputs: output, (h_n, c_n)
        output: T x B x (D*H), the top layer's h_t for every t.
        h_n, c_n: (L*D) x B x H, the final states of every layer and direction, ordered as nn.LSTM's.

    Parameters, for layer l and suffix '' or '_reverse': ``weight_ih_l{l}`` K x 4H/K x I_l/K,
    ``weight_hh_l{l}`` K x 4H/K x H/K, ``bias_ih_l{l}`` and ``bias_hh_l{l}`` K x 4H/K; the rows of group k
    are its gates i, f, g, o. Initialized U(-1/sqrt(H), 1/sqrt(H)) as nn.LSTM.
    """

    PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
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
        self.bias = bias
        self.shuffle_time = shuffle_time
        K, H = groups, hidden_size
        for layer in range(num_layers):
            gates = (K, 4 * H // K)
            self.register_layer(layer, {
                "weight_ih": (*gates, self.layer_input_size(layer) // K), "weight_hh": (*gates, H // K),
                "bias_ih": gates if bias else None, "bias_hh": gates if bias else None,
            })  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's init, so groups=1 starts as nn.LSTM does
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def _repr_settings(self):
        return super()._repr_settings() + [("bias", True), ("shuffle_time", True), ("recurrent_dropout", 0.0)]

    def run_direction(self, x, state, weights, layer, direction, mask, lengths):
        rmask = self.recurrent_mask(state[0])
        out, h, c = group_lstm_direction(x, *state, *weights, self.shuffle_time, mask, rmask, lengths)
        return out, (h, c)

    @torch.no_grad()
    def to_dense(self) -> nn.LSTM:
        """An nn.LSTM computing the same function: equation 7 with every shuffle folded into the weights.

        Group k's rows of gate q (i, f, g, o) land in rows q*H + k*H/K ... of the dense matrix; its columns
        land where the shuffle took its inputs from. Between-layer dropout is copied; variational and
        recurrent dropout have no nn.LSTM equivalent, so the two match in eval mode only.
        """
        if any(self.has_residual(layer) for layer in range(self.num_layers)):
            raise ValueError("to_dense: nn.LSTM has no residual connections between layers (residual=True)")
        p = next(self.parameters())
        dense = nn.LSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
        ).to(device=p.device, dtype=p.dtype)
        H, K = self.hidden_size, self.groups
        time_perm = shuffle_permutation(H, K, p.device) if self.shuffle_time else None
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * self.num_directions
            in_perm = shuffle_permutation(in_size, K, p.device) if (layer > 0 and self.shuffle_layers) else None
            for direction, suffix in enumerate(self.suffixes()):
                w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer, direction)
                getattr(dense, f"weight_ih_l{layer}{suffix}").copy_(block_diagonal_gates(w_ih, in_perm))
                getattr(dense, f"weight_hh_l{layer}{suffix}").copy_(block_diagonal_gates(w_hh, time_perm))
                if self.bias:
                    getattr(dense, f"bias_ih_l{layer}{suffix}").copy_(dense_gate_bias(b_ih))
                    getattr(dense, f"bias_hh_l{layer}{suffix}").copy_(dense_gate_bias(b_hh))
        return dense


def block_diagonal_gates(w: Tensor, in_perm: Optional[Tensor] = None) -> Tensor:
    """Group weights K x 4H/K x I/K -> the dense 4H x I matrix of equation 7.

    Row q*H + k*H/K + u is gate q of unit u of group k (nn.LSTM's gate-major order). A group reads the
    shuffled input s = x[in_perm], so block column j multiplies x[in_perm[j]].
    """
    K, G4, Ik = w.size()
    Hk, I = G4 // 4, Ik * K
    H = Hk * K
    dense = w.new_zeros(4 * H, I)
    for k in range(K):
        for q in range(4):
            dense[q * H + k * Hk : q * H + (k + 1) * Hk, k * Ik : (k + 1) * Ik] = w[k, q * Hk : (q + 1) * Hk]
    if in_perm is None:
        return dense
    out = torch.zeros_like(dense)
    out[:, in_perm] = dense
    return out


def dense_gate_bias(b: Tensor) -> Tensor:
    """Group biases K x 4H/K -> nn.LSTM's 4H: ``K x 4 x H/K -> 4 x K x H/K -> 4H``."""
    K, G4 = b.size()
    return b.view(K, 4, G4 // 4).transpose(0, 1).reshape(4 * G4 // 4 * K)


class GroupLSTMCell(nn.Module):
    r"""One step of a group LSTM layer, with the interface of ``torch.nn.LSTMCell``.

    Same semantics as one layer of :class:`GroupLSTM`: group k reads chunk k of the input and chunk k
    of shuffle(h) (``shuffle_time``), and owns chunk k of h and c.

    Inputs: input B x C; hx = (h, c), each B x H (zeros when omitted).
    Outputs: (h', c'), each B x H.
    Parameters: ``weight_ih`` K x 4H/K x C/K, ``weight_hh`` K x 4H/K x H/K, ``bias_ih``, ``bias_hh`` K x 4H/K.
    """

    def __init__(self, input_size: int, hidden_size: int, groups: int = 1, bias: bool = True, shuffle_time: bool = True):
        super().__init__()
        check_divisible(input_size, groups, "input_size")
        check_divisible(hidden_size, groups, "hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.groups = groups
        self.bias = bias
        self.shuffle_time = shuffle_time
        K, H = groups, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(K, 4 * H // K, input_size // K))
        self.weight_hh = nn.Parameter(torch.empty(K, 4 * H // K, H // K))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(K, 4 * H // K))
            self.bias_hh = nn.Parameter(torch.empty(K, 4 * H // K))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        stdv = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, groups={self.groups}, bias={self.bias}, "
            f"shuffle_time={self.shuffle_time}"
        )

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        B, C = input.size()
        K, H = self.groups, self.hidden_size
        if hx is None:
            zeros = input.new_zeros(B, H)
            hx = (zeros, zeros)
        h, c = hx
        xg = input.view(B, K, C // K).transpose(0, 1)  # B x C -> K x B x C/K
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh  # K x 4H/K
        gx = grouped_linear(xg, self.weight_ih, bias)  # K x B x C/K @ K x C/K x 4H/K -> K x B x 4H/K
        perm = shuffle_permutation(H, K, input.device) if (self.shuffle_time and K > 1) else None
        h_new, c_new = group_lstm_step(gx, h, to_group_major(c, K), self.weight_hh, K, perm)
        return h_new, from_group_major(c_new)

    def input_steps(self, head: Tensor, split: bool = True) -> "CellSteps":
        """The cell at every step of a sequence whose input at step t is ``[head[t]; tail_t]``: ``head`` (T x B x E)
        is known before the loop, ``tail_t`` is made by it (a decoder's input feeding). Returns ``steps`` with
        ``steps(t, tail_t, (h, c)) == self(cat([head[t], tail_t]), (h, c))``. With one group, several steps and
        ``split``, the head's share of the gates is one product for all steps and ``[tail_t; h]`` one product per
        step, which is the same function in fewer, larger products. Make it before a ``deferred_weight_grads``
        loop: its weights are made once."""
        return CellSteps(self, head, split)


class CellSteps:
    """``GroupLSTMCell.input_steps``: the cell over a loop whose inputs start with a known ``head``."""

    def __init__(self, cell: GroupLSTMCell, head: Tensor, split: bool):
        T, B, E = head.shape
        self.cell, self.head = cell, head
        self.split = split and cell.groups == 1 and T > 1
        if self.split:
            # 1 x 4H x C -> 4H x C, 1 x 4H x H -> 4H x H (squeeze and split: their gradients are views and one
            # concatenation, where indexing and slicing would fill a zero weight-sized gradient per use)
            w_ih, w_hh = cell.weight_ih.squeeze(0), cell.weight_hh.squeeze(0)
            w_head, w_tail = w_ih.split([E, w_ih.size(1) - E], dim=1)  # 4H x E, 4H x (C - E)
            bias = None if cell.bias_ih is None else (cell.bias_ih + cell.bias_hh).squeeze(0)  # 1 x 4H -> 4H
            # a contiguous copy: a column slice of w_ih is a strided weight (oneDNN's reference kernel)
            # T x B x E -> T x B x 4H -> T x (B x 4H): one autograd node for all steps (indexing step t would
            # give each step's backward a zero-filled gradient of all T steps)
            self.gates_head = linear(head, w_head.contiguous(), bias).unbind(0)
            self.w_step = torch.cat([w_tail, w_hh], dim=1)  # 4H x (C - E + H): [tail_t; h_{t-1}]

    def __call__(self, t: int, tail: Tensor, hx: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        if not self.split:
            return self.cell(torch.cat([self.head[t], tail], dim=1), hx)  # B x C
        h, c = hx
        gates = self.gates_head[t] + linear(torch.cat([tail, h], dim=1), self.w_step)  # B x 4H
        h, c = cell_pointwise(gates.unsqueeze(0), c.unsqueeze(0))  # 1 x B x H each
        return h.squeeze(0), c.squeeze(0)  # views both ways (indexing's backward would fill a zero 1 x B x H)


def group_lstm_reference(
    module: GroupLSTM, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """A plain, readable GroupLSTM forward: equations 4 and 5 with a Python loop over groups.

    Written from the paper and the semantics above, independently of the batched path, so that tests can
    compare the two. Dropout is not applied (use it with the module in eval mode). Padded sequences are
    handled by running every sequence alone on its own length.
    """
    K = module.groups

    def cell(x_t, h, c, w_ih, w_hh, b_ih, b_hh):
        r = channel_shuffle(h, K) if module.shuffle_time else h
        xs, rs, cs = x_t.chunk(K, -1), r.chunk(K, -1), c.chunk(K, -1)
        new_h, new_c = [], []
        for k in range(K):  # group k: its own small LSTM
            gates = F.linear(xs[k], w_ih[k]) + F.linear(rs[k], w_hh[k])
            if b_ih is not None:
                gates = gates + b_ih[k] + b_hh[k]
            i, f, g, o = gates.chunk(4, -1)
            ck = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
            new_c.append(ck)
            new_h.append(torch.sigmoid(o) * torch.tanh(ck))
        return torch.cat(new_h, -1), torch.cat(new_c, -1)  # equation 5: concatenate the groups

    return reference_stack(module, input, hx, lengths, cell, group_lstm_reference)
