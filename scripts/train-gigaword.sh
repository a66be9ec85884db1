#!/usr/bin/env bash
# Train Group RNNSearch on Gigaword headline generation with the paper's settings (section 4.3): 2+2
# layers of 512, weights uniform in (-0.05, 0.05), Adadelta (learning rate 1.0, halved when the
# validation loss stops improving), gradient norm clipped at 1.5, 64 pairs a batch.
#
# Usage: bash scripts/train-gigaword.sh [extra fairseq-train flags]     (after scripts/prepare-gigaword.sh)
# Environment: NUM_GROUPS (2), DATA (data/gigaword), SAVE (checkpoints/gigaword-gNUM_GROUPS),
#   MAX_EPOCH (15), MAX_UPDATE, SEED, OPTIMIZER_FLAGS, EXTRA: see train_seq2seq in scripts/lib.sh
# Decoder: DECODER_FLAGS, default "--decoder-residual --decoder-hidden-size 1024": a residual connection
#   around the decoder's upper layer, which learns to use the source far faster than the paper's decoder
#   read literally (docs/translation.md); DECODER_FLAGS="" trains the paper's decoder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init train-gigaword

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/gigaword}"
SAVE="${SAVE:-checkpoints/gigaword-g$NUM_GROUPS}"
DECODER_FLAGS="${DECODER_FLAGS---decoder-residual --decoder-hidden-size 1024}"
MAX_EPOCH="${MAX_EPOCH:-15}"
# shellcheck disable=SC2086
train_seq2seq "$DATA/data-bin" "$SAVE" article title group_rnnsearch_gigaword --batch-size 64 --clip-norm 1.5 $DECODER_FLAGS "$@"
