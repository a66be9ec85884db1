#!/usr/bin/env bash
# Train the Group LSTM language model on PTB with the paper's settings (section 4.1): Zaremba et al.'s
# large model (2 layers of 1500, dropout 0.65) with 2 groups, trained by SGD as Zaremba et al.: learning
# rate 1 for 14 epochs, then divided by 1.15 after every epoch, 55 epochs, gradient norm clipped at 10,
# 20 sequences of 35 tokens a batch. fairseq's fixed scheduler with --force-anneal 15 --lr-shrink 1/1.15
# is exactly this schedule (epoch e >= 15 runs at 1.15^-(e-14)). Unlike Zaremba et al., fairseq's
# language_modeling task shuffles the 35-token blocks and does not carry the hidden state across batches.
#
# Usage: bash scripts/train-ptb.sh [extra fairseq-train flags]     (after scripts/prepare-ptb.sh)
# Environment: NUM_GROUPS (2), DATA (data/ptb), SAVE (checkpoints/ptb-gNUM_GROUPS), MAX_EPOCH (55),
#   MAX_UPDATE (0: no limit), SEED (1), EXTRA (more fairseq-train flags)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init train-ptb

NUM_GROUPS="${NUM_GROUPS:-2}"
DATA="${DATA:-data/ptb}"
SAVE="${SAVE:-checkpoints/ptb-g$NUM_GROUPS}"
[[ -s "$DATA/data-bin/dict.txt" ]] || die "no binarized data in $DATA/data-bin: run scripts/prepare-ptb.sh first"
mkdir -p "$SAVE"
log "training group_lstm_lm_ptb, $NUM_GROUPS groups, on $DATA/data-bin -> $SAVE"
# shellcheck disable=SC2086
"$(fairseq_tool fairseq-train)" "$DATA/data-bin" --user-dir "$GRNN_USER_DIR" \
    --task language_modeling --arch group_lstm_lm_ptb --decoder-groups "$NUM_GROUPS" \
    --tokens-per-sample 35 --sample-break-mode none --batch-size 20 --required-batch-size-multiple 1 \
    --optimizer sgd --lr 1.0 --clip-norm 10 --lr-scheduler fixed --force-anneal 15 --lr-shrink 0.8695652 \
    --max-epoch "${MAX_EPOCH:-55}" --max-update "${MAX_UPDATE:-0}" --seed "${SEED:-1}" \
    --save-dir "$SAVE" --no-epoch-checkpoints --log-format simple --log-interval 100 "$@" ${EXTRA:-}
