"""Pure-PyTorch layers of grnn_fairseq (no fairseq import here)."""

from .group_lstm import (
    GroupLSTM,
    GroupLSTMCell,
    channel_shuffle,
    group_lstm_reference,
    shuffle_permutation,
)

__all__ = ["GroupLSTM", "GroupLSTMCell", "channel_shuffle", "group_lstm_reference", "shuffle_permutation"]
