#!/usr/bin/env bash
# Perplexity of a Group LSTM language model on PTB's validation and test sets with fairseq-eval-lm
# (35-token blocks, as trained; every block kept with --required-batch-size-multiple 1).
#
# Usage: bash scripts/eval-ptb.sh [extra fairseq-eval-lm flags]
# Environment: NUM_GROUPS (2), DATA (data/ptb), SAVE (checkpoints/ptb-gNUM_GROUPS),
#   CHECKPOINT (SAVE/checkpoint_best.pt)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init eval-ptb

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/ptb}"
SAVE="${SAVE:-checkpoints/ptb-g$NUM_GROUPS}"
CHECKPOINT="${CHECKPOINT:-$SAVE/checkpoint_best.pt}"
[[ -f "$CHECKPOINT" ]] || die "no checkpoint $CHECKPOINT: run scripts/train-ptb.sh first (or set CHECKPOINT)"
for split in valid test; do
    "$(fairseq_tool fairseq-eval-lm)" "$DATA/data-bin" --user-dir "$GRNN_USER_DIR" --path "$CHECKPOINT" \
        --gen-subset "$split" --tokens-per-sample 35 --batch-size 20 --required-batch-size-multiple 1 \
        --num-workers 0 "$@" > "$SAVE/eval-$split.log" 2>&1 \
        || { tail -n 20 "$SAVE/eval-$split.log" >&2; die "fairseq-eval-lm failed on $split"; }
    ppl="$(sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p' "$SAVE/eval-$split.log" | tail -n 1)"
    [[ -n "$ppl" ]] || die "no perplexity in $SAVE/eval-$split.log"
    log "$split perplexity: $ppl"
done
