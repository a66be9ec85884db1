"""Pure-PyTorch layers of grnn_fairseq (no fairseq import here)."""

from . import backend
from .factorized_lstm import FactorizedLSTM, factorized_lstm_reference
from .functional import channel_shuffle, shuffle_permutation
from .group_lstm import GroupLSTM, GroupLSTMCell, group_lstm_reference
from .recurrent import CELLS, RECURRENT_LAYERS, recurrent_stack
from .sru import SRU, sru_reference

backend.bound_onednn_caches()  # before the process's first oneDNN primitive: see its docstring

__all__ = [
    "CELLS",
    "FactorizedLSTM",
    "GroupLSTM",
    "GroupLSTMCell",
    "RECURRENT_LAYERS",
    "SRU",
    "backend",
    "channel_shuffle",
    "factorized_lstm_reference",
    "group_lstm_reference",
    "recurrent_stack",
    "shuffle_permutation",
    "sru_reference",
]
