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
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .dropout import dropout, dropout_mask
from .fused_group_lstm import fused_group_lstm_direction, fused_supported, lstm_cell_pointwise
from .linear import grouped_linear


def check_divisible(size: int, groups: int, what: str) -> None:
    """Raise a ValueError that names the size and K when K does not divide it."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if size % groups != 0:
        raise ValueError(
            f"{what} ({size}) is not divisible by groups K={groups}; "
            f"choose a number of groups that divides every layer size"
        )


def check_stack(input_size: int, hidden_size: int, groups: int, num_layers: int, **rates: float) -> None:
    """The constructor checks every recurrent stack shares: K divides both sizes, at least one layer, and every
    dropout rate (keyword: its argument's name) in [0, 1); errors name the argument."""
    check_divisible(input_size, groups, "input_size")
    check_divisible(hidden_size, groups, "hidden_size")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    for name, p in rates.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """The representation rearrangement of section 2.2 on the last dimension.

    ``... x N -> ... x K x N/K -> ... x N/K x K -> ... x N``.
    """
    N = x.size(-1)
    if groups == 1:
        return x
    return x.view(*x.shape[:-1], groups, N // groups).transpose(-1, -2).reshape(x.shape)


def shuffle_permutation(size: int, groups: int, device=None) -> Tensor:
    """Index ``perm`` with ``channel_shuffle(v, groups) == v[..., perm]``."""
    return channel_shuffle(torch.arange(size, device=device), groups)


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of ``x`` (T x B x C) inside its own length; padding stays in place.

    Without lengths this is ``x.flip(0)``. The map is its own inverse.
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.size(0), x.size(1)
    t = torch.arange(T, device=x.device).unsqueeze(1)  # T x 1
    lengths = lengths.to(x.device).unsqueeze(0)  # 1 x B
    index = torch.where(t < lengths, lengths - 1 - t, t)  # T x B
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def step_mask(lengths: Optional[Tensor], T: int, device) -> Optional[Tensor]:
    """T x B x 1 boolean mask, True where step t is inside sequence b; None when there is no padding."""
    if lengths is None:
        return None
    return (torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)).unsqueeze(-1)


def group_lstm_step(
    gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, groups: int, perm: Optional[Tensor], fused: bool = False
) -> Tuple[Tensor, Tensor]:
    """One time step of a group LSTM layer (batched over groups).

    gx: K x B x 4H/K, the input projection plus biases of this step.
    h: B x H, the previous hidden state (plain concatenation of the groups).
    c: K x B x H/K, the previous cell state in group-major layout.
    w_hh: K x 4H/K x H/K, the recurrent weights.
    perm: the shuffle permutation of h (shuffle_time) or None.
    fused: the gate math as one C-kernel pass where it applies (``lstm_cell_pointwise``).
    Returns h' (B x H) and c' (K x B x H/K).
    """
    K = groups
    B, H = h.size()
    r = h if perm is None else h.index_select(1, perm)  # B x H, shuffle(h_{t-1})
    r = r.view(B, K, H // K).transpose(0, 1)  # B x H -> K x B x H/K
    gates = gx + grouped_linear(r, w_hh)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K
    h_new, c_new = lstm_cell_pointwise(gates, c, fused)  # K x B x H/K each
    h_new = h_new.transpose(0, 1).reshape(B, H)  # K x B x H/K -> B x H
    return h_new, c_new


def to_group_major(v: Tensor, groups: int) -> Tensor:
    """``B x H -> K x B x H/K``."""
    B, H = v.size()
    return v.view(B, groups, H // groups).transpose(0, 1).contiguous()


def from_group_major(v: Tensor) -> Tensor:
    """``K x B x H/K -> B x H``."""
    K, B, Hk = v.size()
    return v.transpose(0, 1).reshape(B, K * Hk)


_FUSED = os.environ.get("GRNN_FUSED", "1") != "0"  # GRNN_FUSED=0 selects the autograd path everywhere


def set_fused(enabled: bool) -> bool:
    """Use the fused path (``fused_group_lstm.py``) where it applies; returns the previous setting."""
    global _FUSED
    previous, _FUSED = _FUSED, bool(enabled)
    return previous


def fused_enabled() -> bool:
    """The setting of ``set_fused`` (GRNN_FUSED); the SRU layer's dispatch follows it too."""
    return _FUSED


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one layer in one direction over a whole sequence; shapes as ``group_lstm_direction_autograd``.

    Dispatches to the fused autograd Function (hand-written backward through time, the fast path for
    training and inference) when it supports the call, else to the readable batched autograd path: with
    ``set_fused(False)`` or GRNN_FUSED=0, a mask that is not a right-padding prefix mask, or a shuffle with
    (H/K) % K != 0.

    Mixed precision (float16 / bfloat16 tensors, as fairseq's --fp16 makes them, or autocast, as --amp does)
    runs the fused recurrence in float32 (cuDNN's practice for its half-precision LSTMs: the cell state and the
    gate math in float32): the inputs are cast up, autocast is off inside, and the outputs are cast back to the
    input's dtype (autocast: left in float32). The casts are autograd operations, so gradients return in the
    parameters' own dtype.
    """
    if _FUSED:
        device = x.device.type
        if x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device):
            dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
            up = [None if v is None else v.float() for v in (x, h, c, w_ih, w_hh, b_ih, b_hh, recurrent_mask)]
            with torch.autocast(device_type=device, enabled=False):
                out, h_n, c_n = group_lstm_direction(*up[:7], shuffle_time, mask, up[7])
            return out.to(dtype), h_n.to(dtype), c_n.to(dtype)
        ok, lengths = fused_supported(x, w_hh, shuffle_time, mask)
        if ok:
            return fused_group_lstm_direction(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask)
    return group_lstm_direction_autograd(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, mask, recurrent_mask)


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


class GroupLSTM(nn.Module):
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
    ):
        super().__init__()
        check_stack(input_size, hidden_size, groups, num_layers, dropout=dropout, recurrent_dropout=recurrent_dropout)
        self.input_size = input_size
        self.hidden_size = hidden_size
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

        K, H = groups, hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes():
                self.register_parameter(
                    f"weight_ih_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K, layer_input // K))
                )
                self.register_parameter(
                    f"weight_hh_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K, H // K))
                )
                if bias:
                    self.register_parameter(f"bias_ih_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K)))
                    self.register_parameter(f"bias_hh_l{layer}{suffix}", nn.Parameter(torch.empty(K, 4 * H // K)))
        self.reset_parameters()

    def _suffixes(self):
        return ["", "_reverse"] if self.bidirectional else [""]

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's init, so groups=1 starts as nn.LSTM does
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def layer_weights(self, layer: int, direction: int) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction (biases None without bias)."""
        suffix = self._suffixes()[direction]
        w_ih = getattr(self, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, getattr(self, f"bias_ih_l{layer}{suffix}"), getattr(self, f"bias_hh_l{layer}{suffix}")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, groups={self.groups}"
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

    def init_state(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        B = input.size(1)
        if hx is None:
            zeros = input.new_zeros(self.num_layers * self.num_directions, B, self.hidden_size)
            return zeros, zeros
        h0, c0 = hx
        expected = (self.num_layers * self.num_directions, B, self.hidden_size)
        if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
            raise ValueError(f"expected h_0 and c_0 of shape {expected}, got {tuple(h0.shape)} and {tuple(c0.shape)}")
        return h0, c0

    def _dropout_mask(self, like: Tensor, p: float) -> Tensor:
        """A B x C inverted-dropout mask (one per sequence)."""
        return dropout_mask(like, p)

    def layer_input(self, x: Tensor, layer: int) -> Tensor:
        """What layer ``layer`` > 0 reads: dropout, then the shuffle (both act per channel, so they commute)."""
        if self.training and self.dropout > 0:
            if self.variational:
                x = x * self._dropout_mask(x[0], self.dropout).unsqueeze(0)  # B x C mask, broadcast over T
            else:
                x = dropout(x, self.dropout, training=True)
        if self.shuffle_layers and self.groups > 1:
            x = channel_shuffle(x, self.groups)  # T x B x D*H, K groups
        return x

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        T, B, C = input.size()
        if C != self.input_size:
            raise ValueError(f"GroupLSTM expected input of size {self.input_size}, got {C}")
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
                w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer, direction)
                rmask = None
                if self.training and self.recurrent_dropout > 0:
                    rmask = self._dropout_mask(h0[idx], self.recurrent_dropout)
                xd = x if direction == 0 else reverse_padded(x, lengths)
                out, h, c = group_lstm_direction(
                    xd, h0[idx], c0[idx], w_ih, w_hh, b_ih, b_hh, self.shuffle_time, mask, rmask
                )
                outputs.append(out if direction == 0 else reverse_padded(out, lengths))
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if self.num_directions == 1 else torch.cat(outputs, dim=-1)  # T x B x D*H
        return x, (torch.stack(h_n, 0), torch.stack(c_n, 0))

    @torch.no_grad()
    def to_dense(self) -> nn.LSTM:
        """An nn.LSTM computing the same function: equation 7 with every shuffle folded into the weights.

        Group k's rows of gate q (i, f, g, o) land in rows q*H + k*H/K ... of the dense matrix; its columns
        land where the shuffle took its inputs from. Between-layer dropout is copied; variational and
        recurrent dropout have no nn.LSTM equivalent, so the two match in eval mode only.
        """
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
            for direction, suffix in enumerate(self._suffixes()):
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
        h_new, c_new = group_lstm_step(gx, h, to_group_major(c, K), self.weight_hh, K, perm, fused=_FUSED)
        return h_new, from_group_major(c_new)


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


def reference_stack(module: nn.Module, input: Tensor, hx, lengths: Optional[Tensor], cell, reference):
    """The frame the step-by-step references share (GroupLSTM's and F-LSTM's): a padded batch runs every
    sequence alone on its own length (``reference`` on each), else layer by layer (the channel shuffle between
    layers when ``module.shuffle_layers``), direction by direction, ``h, c = cell(x_t, h, c, *weights)`` per
    step with ``module.layer_weights(layer, direction)``. Returns (output T x B x D*H, (h_n, c_n))."""
    T, B, _ = input.size()
    K, D = module.groups, module.num_directions
    h0, c0 = module.init_state(input, hx)
    if lengths is not None:
        outs, hs, cs = [], [], []
        for b in range(B):
            n = int(lengths[b])
            o, (h, c) = reference(module, input[:n, b : b + 1], (h0[:, b : b + 1], c0[:, b : b + 1]))
            outs.append(F.pad(o, (0, 0, 0, 0, 0, T - n)))  # n x 1 x D*H -> T x 1 x D*H
            hs.append(h)
            cs.append(c)
        return torch.cat(outs, 1), (torch.cat(hs, 1), torch.cat(cs, 1))

    x = input
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        if layer > 0 and module.shuffle_layers:
            x = channel_shuffle(x, K)
        outputs = []
        for direction in range(D):
            idx = layer * D + direction
            weights = module.layer_weights(layer, direction)
            h, c = h0[idx], c0[idx]
            steps = range(T) if direction == 0 else range(T - 1, -1, -1)
            out = [None] * T
            for t in steps:
                h, c = cell(x[t], h, c, *weights)
                out[t] = h
            outputs.append(torch.stack(out, 0))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outputs, -1)
    return x, (torch.stack(h_n, 0), torch.stack(c_n, 0))
