#!/usr/bin/env bash
# Evaluate a Group RNNSearch checkpoint on WMT'14 En-De newstest2014: beam 5 (section 4.2), tokenized
# case-sensitive BLEU (multi-bleu.perl's convention, the paper's metric) and sacreBLEU on the
# detokenized output against the untokenized references.
#
# Usage: bash scripts/eval-wmt14.sh [extra fairseq-generate flags]
# Environment: NUM_GROUPS (2), DATA (data/wmt14-en-de), SAVE (checkpoints/wmt14-en-de-gNUM_GROUPS),
#   CHECKPOINT (SAVE/checkpoint_best.pt), EVAL_BATCH_SIZE (64)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init eval-wmt14

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/wmt14-en-de}"
SAVE="${SAVE:-checkpoints/wmt14-en-de-g$NUM_GROUPS}"
generate_test "$DATA" "$SAVE" en de 5 "$@"
bleu_scores "$DATA" de "$GEN_OUT"
