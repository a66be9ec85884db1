"""The frame every recurrent stack shares (GroupLSTM, FactorizedLSTM, SRU): constructor checks, parameter
naming, the initial state, between-layer dropout and shuffle, the loop over layers and directions, and
``extra_repr``. A subclass names its parameters and runs one layer in one direction (``run_direction``)."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ConfigError
from .dropout import dropout, dropout_mask
from .functional import channel_shuffle, check_divisible, reverse_padded, step_mask


def check_stack(input_size: int, hidden_size: int, groups: int, num_layers: int, **rates: float) -> None:
    """The constructor checks every recurrent stack shares: K divides both sizes, at least one layer, and every
    dropout rate (keyword: its argument's name) in [0, 1); errors name the argument."""
    check_divisible(input_size, groups, "input_size")
    check_divisible(hidden_size, groups, "hidden_size")
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    for name, p in rates.items():
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {p}")


class RecurrentStack(nn.Module):
    """A stack of ``num_layers`` recurrent layers, sequence first (T x B x C in, T x B x D*H out).

    Subclasses set ``PARAMETERS`` (the names of one layer-direction's parameters, registered as
    ``{name}_l{layer}{suffix}``, suffix '' or '_reverse'), ``STATES`` (("h", "c") for an LSTM, whose state is a
    pair as nn.LSTM's; ("c",) for SRU, a single tensor as nn.GRU's) and ``run_direction``; ``reset_parameters``
    initializes. Layer l > 0 reads its input after dropout (one mask per sequence with ``variational``) and,
    with ``shuffle_layers``, the channel shuffle. With ``residual``, a layer whose output is as wide as its input
    adds its input to its output (Wu et al. 2016, GNMT's residual connections; padded steps stay zero).
    """

    PARAMETERS: Sequence[str] = ()
    STATES: Sequence[str] = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, groups: int, dropout: float,
                 bidirectional: bool, shuffle_layers: bool, variational: bool, residual: bool = False,
                 **rates: float):  # fmt: skip
        super().__init__()
        check_stack(input_size, hidden_size, groups, num_layers, dropout=dropout, **rates)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.groups = groups
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.shuffle_layers = shuffle_layers
        self.variational = variational
        self.residual = residual
        self.recurrent_dropout = rates.get("recurrent_dropout", 0.0)

    def has_residual(self, layer: int) -> bool:
        """Whether layer ``layer`` adds its input to its output (``residual`` and equal widths)."""
        return self.residual and self.layer_input_size(layer) == self.hidden_size * self.num_directions

    # ------------------------------------------------------------------------------------------ parameters

    def suffixes(self) -> List[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.num_directions

    def register_layer(self, layer: int, shapes: Dict[str, Optional[Tuple[int, ...]]]) -> None:
        """Register one layer's parameters for every direction; a shape of None registers no parameter (an
        absent bias), which ``layer_weights`` returns as None."""
        for suffix in self.suffixes():
            for name in self.PARAMETERS:
                shape = shapes[name]
                full = f"{name}_l{layer}{suffix}"
                self.register_parameter(full, None if shape is None else nn.Parameter(torch.empty(*shape)))

    def layer_weights(self, layer: int, direction: int) -> Tuple[Optional[Tensor], ...]:
        """The parameters of one layer and direction, in ``PARAMETERS`` order (None where absent)."""
        suffix = self.suffixes()[direction]
        return tuple(getattr(self, f"{name}_l{layer}{suffix}") for name in self.PARAMETERS)

    def extra_repr(self) -> str:
        """nn.LSTM's style: the sizes, then every setting that differs from its default."""
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in self._repr_settings():
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value}"
        return s

    def _repr_settings(self) -> List[Tuple[str, object]]:
        """(attribute, default) pairs that ``extra_repr`` shows when set; subclasses add theirs."""
        return [("num_layers", None), ("groups", None), ("dropout", 0.0), ("bidirectional", False),
                ("shuffle_layers", True), ("variational", False), ("residual", False)]  # fmt: skip

    # -------------------------------------------------------------------------------------------- forward

    def init_state(self, input: Tensor, hx) -> Tuple[Tensor, ...]:
        """The initial states as a tuple in ``STATES`` order, each (L*D) x B x H (zeros for hx None)."""
        expected = (self.num_layers * self.num_directions, input.size(1), self.hidden_size)
        if hx is None:
            zeros = input.new_zeros(expected)
            return (zeros,) * len(self.STATES)
        states = (hx,) if len(self.STATES) == 1 else tuple(hx)
        if any(tuple(s.shape) != expected for s in states):
            names = " and ".join(f"{n}_0" for n in self.STATES)
            raise ValueError(f"expected {names} of shape {expected}, got {' and '.join(str(tuple(s.shape)) for s in states)}")
        return states

    def layer_input(self, x: Tensor) -> Tensor:
        """What a layer above the first reads: dropout, then the shuffle (both act per channel, so they commute)."""
        if self.training and self.dropout > 0:
            if self.variational:
                x = x * dropout_mask(x[0], self.dropout).unsqueeze(0)  # B x C mask, broadcast over T
            else:
                x = dropout(x, self.dropout, training=True)
        if self.shuffle_layers and self.groups > 1:
            x = channel_shuffle(x, self.groups)  # T x B x D*H, K groups
        return x

    def recurrent_mask(self, h0: Tensor) -> Optional[Tensor]:
        """The dropout mask of h_{t-1} of one layer and direction when training with ``recurrent_dropout``: B x H,
        one per sequence (Gal and Ghahramani); else None."""
        if self.training and self.recurrent_dropout > 0:
            return dropout_mask(h0, self.recurrent_dropout)
        return None

    def run_direction(self, x: Tensor, state: Tuple[Tensor, ...], weights: Tuple[Optional[Tensor], ...], layer: int,
                      direction: int, mask: Optional[Tensor],
                      lengths: Optional[Tensor]) -> Tuple[Tensor, Tuple[Tensor, ...]]:  # fmt: skip
        """One layer in one direction over the whole sequence: x T x B x I_l (reversed already for the reverse
        direction), state: B x H tensors in ``STATES`` order, weights: ``layer_weights(layer, direction)``,
        mask T x B x 1 or None, lengths: the B lengths (long, on x's device) that mask encodes (``step_mask``), or
        None. Returns (output T x B x H, final states)."""
        raise NotImplementedError

    def forward(self, input: Tensor, hx=None, lengths: Optional[Tensor] = None):
        T, B, C = input.size()
        if C != self.input_size:
            raise ValueError(f"{type(self).__name__} expected input of size {self.input_size}, got {C}")
        states0 = self.init_state(input, hx)
        if lengths is not None:
            lengths = lengths.to(device=input.device, dtype=torch.long)  # B
        mask = step_mask(lengths, T, input.device)
        x = input
        finals: List[List[Tensor]] = [[] for _ in self.STATES]
        for layer in range(self.num_layers):
            layer_in = x
            if layer > 0:
                x = self.layer_input(x)
            outputs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                xd = x if direction == 0 else reverse_padded(x, lengths)
                weights = self.layer_weights(layer, direction)
                state = tuple(s[idx] for s in states0)
                out, final = self.run_direction(xd, state, weights, layer, direction, mask, lengths)
                outputs.append(out if direction == 0 else reverse_padded(out, lengths))
                for f, s in zip(finals, final):
                    f.append(s)
            x = outputs[0] if self.num_directions == 1 else torch.cat(outputs, dim=-1)  # T x B x D*H
            if self.has_residual(layer):
                x = x + (layer_in if mask is None else layer_in * mask)  # T x B x D*H
        final_states = tuple(torch.stack(f, 0) for f in finals)  # each (L*D) x B x H
        return x, (final_states[0] if len(self.STATES) == 1 else final_states)


def reference_stack(module: RecurrentStack, input: Tensor, hx, lengths: Optional[Tensor], cell, reference):
    """The frame of the step-by-step references (GroupLSTM's and F-LSTM's): a padded batch runs every sequence
    alone on its own length (``reference`` on each), else layer by layer (the channel shuffle between layers when
    ``module.shuffle_layers``, the residual connection when ``module.has_residual``), direction by direction, ``h, c = cell(x_t, h, c, *weights)`` per step with
    ``module.layer_weights(layer, direction)``. Returns (output T x B x D*H, (h_n, c_n))."""
    import torch.nn.functional as F

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
        layer_in = x
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
        if module.has_residual(layer):
            x = x + layer_in
    return x, (torch.stack(h_n, 0), torch.stack(c_n, 0))
