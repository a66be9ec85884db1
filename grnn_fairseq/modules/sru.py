"""SRU: Lei, Zhang and Artzi, "Training RNNs as Fast as CNNs" (arXiv:1709.02755, 2017), with the grouped
input projections and the between-layer channel shuffle of Gao et al. (NAACL 2018).

One layer and direction, for t = 1..T (the SRU recurrence with g = tanh, as in its reference code)::

    x~_t = W x_t
    f_t  = sigmoid(W_f x_t + b_f)
    r_t  = sigmoid(W_r x_t + b_r)
    c_t  = f_t * c_{t-1} + (1 - f_t) * x~_t
    h_t  = r_t * tanh(c_t) + (1 - r_t) * x'_t        x'_t = x_t (highway), or W_x x_t when the sizes differ

No matrix reads c_{t-1} or h_{t-1}: every product (W, W_f, W_r, W_x) runs over all time steps at once, and what
is left sequential is the elementwise linear recurrence ``c_t = a_t * c_{t-1} + b_t`` with a_t = f_t and
b_t = (1 - f_t) * x~_t. ``linear_recurrence`` computes it: on the fast path a ``torch.autograd.Function``
whose forward and hand-written backward through time hold one fused multiply-add per step (the backward
recurrence is the same scan run in reverse); the backend's ``path="reference"`` (as for GroupLSTM) selects a
plain autograd loop. Nothing is compiled.

Semantics (what tests rely on):

* Groups: W, W_f, W_r (and W_x) are block diagonal. Group k reads chunk k of the layer input and owns chunk
  k of c and h. Parameters ``weight_l{l}`` K x nH/K x I/K, rows of group k in the order x~, f, r (, x'),
  n = 3 or 4; ``bias_l{l}`` K x 2H/K, b_f then b_r of group k. ``groups=1`` is the ungrouped SRU.
* Highway: x'_t = x_t when the layer input has D*H features (direction d pairs unit j with input feature
  d*H + j); otherwise x'_t = W_x x_t, a fourth block of rows, as the SRU reference code does (k = 4).
* ``shuffle_layers``: layer l > 0 reads shuffle(output of layer l - 1), as GroupLSTM. There is no
  between-time-step shuffle: SRU has no h-to-h matrix, so nothing to rearrange (GroupLSTM's ``shuffle_time``
  has no counterpart here).
* Padding (``lengths``): padded steps keep c (a_t = 1, b_t = 0) and output zeros; the reverse direction
  starts at each sequence's last token; c_n is the state after each sequence's own last token.

``sru_reference`` beside it is a step-by-step loop over groups written from the equations above.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend
from .functional import channel_shuffle
from .stack import RecurrentStack


class LinearRecurrenceFunction(torch.autograd.Function):
    """``c_t = a_t * c_{t-1} + b_t`` for t = 0..T-1, elementwise, with a hand-written backward through time.

    Inputs: a, b T x S... (time first, any trailing shape, may be strided), c0 S... . Output: c T x S...
    (c[t] is c_t). Backward: with g_t = dL/dc_t (direct plus through c_{t+1}), g_t = dc_t + a_{t+1} * g_{t+1}
    (the same scan, reversed), db_t = g_t, da_t = g_t * c_{t-1}, dc0 = a_0 * g_0. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, c0: Tensor) -> Tensor:
        T = a.size(0)
        c = b.new_empty(b.shape)  # T x S...
        prev = c0
        for t in range(T):
            prev = torch.addcmul(b[t], a[t], prev, out=c[t])  # c_t = b_t + a_t * c_{t-1}
        ctx.save_for_backward(a, c0, c)
        return c

    @staticmethod
    @once_differentiable
    def backward(ctx, dc: Tensor):
        a, c0, c = ctx.saved_tensors
        T = a.size(0)
        g = torch.empty_like(c)  # g[t] = dL/dc_t, everything that flows into c_t
        if T == 0:
            return torch.zeros_like(a), torch.zeros_like(c), torch.zeros_like(c0)
        g[T - 1].copy_(dc[T - 1])
        for t in range(T - 2, -1, -1):
            torch.addcmul(dc[t], a[t + 1], g[t + 1], out=g[t])  # g_t = dc_t + a_{t+1} * g_{t+1}
        need_a, need_b, need_c0 = ctx.needs_input_grad
        da = None
        if need_a:
            da = torch.empty_like(g)
            torch.mul(g[1:], c[:-1], out=da[1:])  # da_t = g_t * c_{t-1}, all steps in one op
            torch.mul(g[0], c0, out=da[0])
        dc0 = g[0] * a[0] if need_c0 else None
        return da, g if need_b else None, dc0


def linear_recurrence_autograd(a: Tensor, b: Tensor, c0: Tensor) -> Tensor:
    """The same recurrence as ``LinearRecurrenceFunction``, one autograd op per step (the readable path)."""
    out: List[Tensor] = []
    c = c0
    for t in range(a.size(0)):
        c = a[t] * c + b[t]
        out.append(c)
    return torch.stack(out, 0) if out else b.new_empty(b.shape)


def linear_recurrence(a: Tensor, b: Tensor, c0: Tensor) -> Tensor:
    """``c_t = a_t * c_{t-1} + b_t``: the fused Function, or the autograd loop on the reference path."""
    if backend.fused():
        return LinearRecurrenceFunction.apply(a, b, c0)
    return linear_recurrence_autograd(a, b, c0)


def sru_direction(
    x: Tensor,
    c0: Tensor,
    weight: Tensor,
    bias: Tensor,
    highway: Optional[Tensor],
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One SRU layer in one direction over a whole sequence.

    x: T x B x I. c0: B x H. weight: K x nH/K x I/K (n = 3, or 4 with the W_x block). bias: K x 2H/K.
    highway: T x B x H, the x'_t of the identity highway (n = 3), or None (n = 4: x'_t = W_x x_t).
    mask: T x B x 1 (True inside the sequence) or None.
    Returns output T x B x H (zeros at padding) and c_n B x H.
    """
    T, B, I = x.size()
    K, nHk, Ik = weight.size()
    Hk = bias.size(1) // 2
    n = nHk // Hk
    H = Hk * K
    assert Ik * K == I and n in (3, 4), f"input {I} / weight {tuple(weight.shape)} / bias {tuple(bias.shape)}"
    assert (n == 3) == (highway is not None), "the identity highway goes with 3 weight blocks, W_x with 4"
    # every product of the layer, all time steps at once: one bmm over the K groups
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    u = torch.bmm(xg, weight.transpose(1, 2))  # K x (T*B) x I/K @ K x I/K x nH/K -> K x (T*B) x nH/K
    u = u.view(K, T, B, n, Hk).permute(1, 2, 0, 3, 4)  # K x (T*B) x nH/K -> T x B x K x n x H/K
    bf, br = bias.view(K, 2, Hk).unbind(1)  # K x H/K each
    x_tilde = u[..., 0, :]  # T x B x K x H/K
    f = torch.sigmoid(u[..., 1, :] + bf)
    r = torch.sigmoid(u[..., 2, :] + br)
    if highway is None:
        x_high = u[..., 3, :]  # W_x x_t
    else:
        x_high = highway.view(T, B, K, Hk)  # T x B x H -> T x B x K x H/K
    a, b = f, (1 - f) * x_tilde
    if mask is not None:
        m = mask.unsqueeze(-1)  # T x B x 1 -> T x B x 1 x 1
        a = torch.where(m, a, torch.ones_like(a))  # padded steps keep c: a = 1, b = 0
        b = b * m
    c = linear_recurrence(a, b, c0.view(B, K, Hk))  # T x B x K x H/K
    h = r * torch.tanh(c) + (1 - r) * x_high
    h = h.reshape(T, B, H)  # T x B x K x H/K -> T x B x H
    if mask is not None:
        h = h * mask
    c_n = c[T - 1].reshape(B, H) if T > 0 else c0
    return h, c_n


class SRU(RecurrentStack):
    r"""A stack of (group) SRU layers, sequence first, with the interface of ``torch.nn.GRU``: its state is c.

    Args:
        input_size: features of the input x (C). Must be divisible by ``groups``.
        hidden_size: features of c and h per direction (H). Must be divisible by ``groups``.
        num_layers: stacked layers (L).
        groups: K, the number of groups of every layer's projections. 1 is the SRU of Lei et al.
        dropout: dropout on the outputs of every layer but the last.
        bidirectional: D = 2 when True; both directions read the same layer input.
        shuffle_layers: channel shuffle of the input of every layer but the first.
        variational: one between-layer dropout mask per sequence, shared by all time steps.
        residual: a layer whose output is as wide as its input adds its input to its output (GNMT).

    Inputs: input, c_0; lengths
        input: T x B x C.
        c_0: (L*D) x B x H, zeros when omitted.
        lengths: optional B, right-padded sequence lengths (padding changes nothing, as GroupLSTM).

    Outputs: output, c_n
        output: T x B x (D*H), the top layer's h_t.
        c_n: (L*D) x B x H, the final c of every layer and direction, ordered as nn.GRU's h_n.

    Layer l has an identity highway when its input has D*H features (every layer above the first does),
    else the extra W_x block. Initialization as the SRU reference code: weights U(-sqrt(3/fan_in),
    sqrt(3/fan_in)) with fan_in = I_l/K the input width of a group, biases 0.
    """

    PARAMETERS = ("weight", "bias")
    STATES = ("c",)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        groups: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        shuffle_layers: bool = True,
        variational: bool = False,
        residual: bool = False,
    ):
        super().__init__(input_size, hidden_size, num_layers, groups, dropout, bidirectional, shuffle_layers,
                         variational, residual)  # fmt: skip
        K, H = groups, hidden_size
        for layer in range(num_layers):
            n = 4 if self.has_projection(layer) else 3
            self.register_layer(layer, {"weight": (K, n * H // K, self.layer_input_size(layer) // K),
                                        "bias": (K, 2 * H // K)})  # fmt: skip
        self.reset_parameters()

    def has_projection(self, layer: int) -> bool:
        """Whether layer ``layer`` projects its highway input (W_x) instead of passing x_t through."""
        return self.layer_input_size(layer) != self.hidden_size * self.num_directions

    def reset_parameters(self) -> None:
        for layer in range(self.num_layers):
            bound = math.sqrt(3.0 * self.groups / self.layer_input_size(layer))  # U(-sqrt(3/fan_in), ...)
            for direction in range(self.num_directions):
                weight, bias = self.layer_weights(layer, direction)
                nn.init.uniform_(weight, -bound, bound)
                nn.init.zeros_(bias)

    def run_direction(self, x, state, weights, layer, direction, mask, lengths):
        (c0,) = state
        H = self.hidden_size
        highway = None if self.has_projection(layer) else x[..., direction * H : (direction + 1) * H]
        out, c = sru_direction(x, c0, *weights, highway, mask)
        return out, (c,)


def sru_reference(
    module: SRU, input: Tensor, hx: Optional[Tensor] = None, lengths: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """A plain, step-by-step SRU forward with a Python loop over groups, written from the equations above.

    Independent of the batched path (no bmm, no linear_recurrence), so tests can compare the two. Dropout is
    not applied (use the module in eval mode). Padded batches run every sequence alone on its own length.
    """
    T, B, _ = input.size()
    K, H, D = module.groups, module.hidden_size, module.num_directions
    (c0,) = module.init_state(input, hx)
    if lengths is not None:
        outs, cs = [], []
        for b in range(B):
            n = int(lengths[b])
            o, c = sru_reference(module, input[:n, b : b + 1], c0[:, b : b + 1])
            outs.append(F.pad(o, (0, 0, 0, 0, 0, T - n)))
            cs.append(c)
        return torch.cat(outs, 1), torch.cat(cs, 1)

    x = input
    c_n = []
    for layer in range(module.num_layers):
        layer_in = x
        if layer > 0 and module.shuffle_layers:
            x = channel_shuffle(x, K)
        projection = module.has_projection(layer)
        outputs = []
        for direction in range(D):
            weight, bias = module.layer_weights(layer, direction)
            c = c0[layer * D + direction]
            steps = range(T) if direction == 0 else range(T - 1, -1, -1)
            out = [None] * T
            for t in steps:
                xs, cs = x[t].chunk(K, -1), c.chunk(K, -1)
                h_groups, c_groups = [], []
                for k in range(K):  # group k: its own small SRU
                    rows = weight[k].chunk(4 if projection else 3, 0)  # x~, f, r (, x') rows, each H/K x I/K
                    b_f, b_r = bias[k].chunk(2)
                    x_tilde = F.linear(xs[k], rows[0])
                    f = torch.sigmoid(F.linear(xs[k], rows[1]) + b_f)
                    r = torch.sigmoid(F.linear(xs[k], rows[2]) + b_r)
                    ck = f * cs[k] + (1 - f) * x_tilde
                    if projection:
                        x_high = F.linear(xs[k], rows[3])
                    else:  # unit u of group k in direction d pairs with input feature d*H + k*H/K + u
                        x_high = x[t][..., direction * H : (direction + 1) * H].chunk(K, -1)[k]
                    c_groups.append(ck)
                    h_groups.append(r * torch.tanh(ck) + (1 - r) * x_high)
                c = torch.cat(c_groups, -1)
                out[t] = torch.cat(h_groups, -1)
            outputs.append(torch.stack(out, 0))
            c_n.append(c)
        x = torch.cat(outputs, -1)
        if module.has_residual(layer):
            x = x + layer_in
    return x, torch.stack(c_n, 0)
