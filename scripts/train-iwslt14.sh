#!/usr/bin/env bash
# Train Group RNNSearch on IWSLT14 De-En with the paper's settings (section 4.2): 2+2 layers of 256,
# Adadelta (learning rate 1.0, halved when the validation loss stops improving), gradient norm clipped
# at 2.5, 32 sentences a batch, dropout 0.1 (0.5 before the softmax, in the architecture's defaults).
#
# Usage: bash scripts/train-iwslt14.sh [extra fairseq-train flags]     (after scripts/prepare-iwslt14.sh)
# Environment: NUM_GROUPS (2; 1 is the RNNSearch baseline), DATA (data/iwslt14-de-en),
#   SAVE (checkpoints/iwslt14-de-en-gNUM_GROUPS), MAX_EPOCH (50), MAX_UPDATE, SEED, OPTIMIZER_FLAGS, EXTRA:
#   see train_seq2seq in scripts/lib.sh
# Decoder: DECODER_FLAGS, default "--decoder-residual --decoder-hidden-size 512 --init-uniform 0.1
#   --attention-type luong": a residual connection around the decoder's upper layer, which learns to use the
#   source far faster than the paper's decoder read literally, with fairseq's LSTM initialization and Luong's
#   attention (docs/translation.md); DECODER_FLAGS="" trains the paper's decoder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init train-iwslt14

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/iwslt14-de-en}"
SAVE="${SAVE:-checkpoints/iwslt14-de-en-g$NUM_GROUPS}"
DECODER_FLAGS="${DECODER_FLAGS---decoder-residual --decoder-hidden-size 512 --init-uniform 0.1 --attention-type luong}"
MAX_EPOCH="${MAX_EPOCH:-50}"
# shellcheck disable=SC2086
train_seq2seq "$DATA/data-bin" "$SAVE" de en group_rnnsearch_iwslt --batch-size 32 --clip-norm 2.5 $DECODER_FLAGS "$@"
