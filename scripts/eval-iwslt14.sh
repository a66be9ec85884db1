#!/usr/bin/env bash
# Evaluate a Group RNNSearch checkpoint on the IWSLT14 De-En test set (6750 sentences): beam 5 (section
# 4.2), tokenized BLEU on the lowercased tokenized text (multi-bleu.perl's convention) and sacreBLEU on
# the detokenized output (-lc: the data are lowercased by scripts/prepare-iwslt14.sh).
#
# Usage: bash scripts/eval-iwslt14.sh [extra fairseq-generate flags]
# Environment: NUM_GROUPS (2), DATA (data/iwslt14-de-en), SAVE (checkpoints/iwslt14-de-en-gNUM_GROUPS),
#   CHECKPOINT (SAVE/checkpoint_best.pt), EVAL_BATCH_SIZE (64), LOWERCASE (1, as prepared)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init eval-iwslt14

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/iwslt14-de-en}"
SAVE="${SAVE:-checkpoints/iwslt14-de-en-g$NUM_GROUPS}"
LC_FLAG=()
[[ "${LOWERCASE:-1}" == 1 ]] && LC_FLAG=(-lc)
generate_test "$DATA" "$SAVE" de en 5 "$@"
bleu_scores "$DATA" en "$GEN_OUT" "${LC_FLAG[@]}"
