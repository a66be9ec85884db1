#!/usr/bin/env bash
# Train Group RNNSearch on WMT'14 En-De with the paper's settings (section 4.2): 4+4 layers, embeddings
# 512, hidden 1024, Adadelta (learning rate 1.0, halved when the validation loss stops improving),
# gradient norm clipped at 2.5, 128 sentences a batch.
#
# Usage: bash scripts/train-wmt14.sh [extra fairseq-train flags]     (after scripts/prepare-wmt14-en-de.sh)
# Environment: NUM_GROUPS (2), DATA (data/wmt14-en-de), SAVE (checkpoints/wmt14-en-de-gNUM_GROUPS),
#   MAX_EPOCH (15), MAX_UPDATE, SEED, OPTIMIZER_FLAGS, EXTRA: see train_seq2seq in scripts/lib.sh
# Decoder: DECODER_FLAGS, default "": the paper's decoder. "--decoder-residual --decoder-hidden-size 2048"
#   adds the residual connection of the other recipes (docs/translation.md), with upper decoder layers
#   twice the paper's width here (about twice the decoder's recurrent parameters; not measured).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init train-wmt14

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/wmt14-en-de}"
SAVE="${SAVE:-checkpoints/wmt14-en-de-g$NUM_GROUPS}"
DECODER_FLAGS="${DECODER_FLAGS-}"
MAX_EPOCH="${MAX_EPOCH:-15}"
# shellcheck disable=SC2086
train_seq2seq "$DATA/data-bin" "$SAVE" en de group_rnnsearch_wmt --batch-size 128 --clip-norm 2.5 $DECODER_FLAGS "$@"
