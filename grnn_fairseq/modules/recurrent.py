"""One switch for the recurrent stacks the models build: GroupLSTM, FactorizedLSTM (F-LSTM) or SRU.

Both models call ``recurrent_stack`` for every stack of recurrent layers, so ``--cell`` and
``--factorize-rank`` mean the same thing everywhere. The LSTM stacks take and return (h, c) states
(nn.LSTM's interface), SRU takes and returns c only (nn.GRU's interface).
"""

from torch import nn

from ..errors import ConfigError
from .factorized_lstm import FactorizedLSTM
from .group_lstm import GroupLSTM, GroupLSTMCell
from .sru import SRU

CELLS = ("lstm", "sru")

# every module whose parameters are "recurrent layers" in the paper's tables
RECURRENT_LAYERS = (GroupLSTM, GroupLSTMCell, FactorizedLSTM, SRU)


def recurrent_stack(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    groups: int = 1,
    dropout: float = 0.0,
    bidirectional: bool = False,
    shuffle_layers: bool = True,
    shuffle_time: bool = True,
    variational: bool = False,
    recurrent_dropout: float = 0.0,
    factorize_rank: int = 0,
    residual: bool = False,
) -> nn.Module:
    """A stack of ``num_layers`` recurrent layers of one kind, sequence first (T x B x C in, T x B x D*H out).

    cell "lstm": a GroupLSTM, or with ``factorize_rank`` r > 0 a FactorizedLSTM of rank r (r/K per group).
    cell "sru": an SRU; ``shuffle_time`` does not apply to it (no h-to-h matrix: nothing to rearrange between
    steps), and ``factorize_rank`` and ``recurrent_dropout`` are errors (they name an LSTM's W_hh).
    Every other argument as :class:`GroupLSTM`.
    """
    if cell not in CELLS:
        raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if factorize_rank < 0:
        raise ConfigError(f"factorize_rank must be >= 0, got {factorize_rank}")
    common = dict(num_layers=num_layers, groups=groups, dropout=dropout, bidirectional=bidirectional,
                  shuffle_layers=shuffle_layers, variational=variational, residual=residual)  # fmt: skip
    if cell == "sru":
        if factorize_rank:
            raise ConfigError("factorize_rank applies to LSTM cells only, not to SRU")
        if recurrent_dropout:
            raise ConfigError("recurrent_dropout drops h_{t-1} before W_hh; SRU has no W_hh")
        return SRU(input_size, hidden_size, **common)
    if factorize_rank:
        return FactorizedLSTM(input_size, hidden_size, factorize_rank, shuffle_time=shuffle_time,
                              recurrent_dropout=recurrent_dropout, **common)  # fmt: skip
    return GroupLSTM(input_size, hidden_size, shuffle_time=shuffle_time, recurrent_dropout=recurrent_dropout, **common)
