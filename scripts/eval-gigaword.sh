#!/usr/bin/env bash
# Evaluate a Group RNNSearch checkpoint on the Gigaword test set: beam 10 (section 4.3), ROUGE-1/2/L F1
# (Google's rouge-score package, Porter stemming like ROUGE-1.5.5 -m) against the normalized headlines.
#
# Usage: bash scripts/eval-gigaword.sh [extra fairseq-generate flags]
# Environment: NUM_GROUPS (2), DATA (data/gigaword), SAVE (checkpoints/gigaword-gNUM_GROUPS),
#   CHECKPOINT (SAVE/checkpoint_best.pt), EVAL_BATCH_SIZE (64)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init eval-gigaword

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/gigaword}"
SAVE="${SAVE:-checkpoints/gigaword-g$NUM_GROUPS}"
generate_test "$DATA" "$SAVE" article title 10 "$@"
log "ROUGE F1 (%): $(textprep rouge "$DATA/tok/test.title" "$GEN_OUT.hyp")"
