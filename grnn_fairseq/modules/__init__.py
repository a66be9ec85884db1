"""Pure-PyTorch layers of grnn_fairseq (no fairseq import here)."""

from .factorized_lstm import FactorizedLSTM, factorized_lstm_reference
from .group_lstm import (
    GroupLSTM,
    GroupLSTMCell,
    channel_shuffle,
    group_lstm_reference,
    shuffle_permutation,
)
from .recurrent import CELLS, RECURRENT_LAYERS, recurrent_stack
from .sru import SRU, sru_reference

__all__ = [
    "CELLS",
    "FactorizedLSTM",
    "GroupLSTM",
    "GroupLSTMCell",
    "RECURRENT_LAYERS",
    "SRU",
    "channel_shuffle",
    "factorized_lstm_reference",
    "group_lstm_reference",
    "recurrent_stack",
    "shuffle_permutation",
    "sru_reference",
]
