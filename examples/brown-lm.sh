#!/usr/bin/env bash
# The main job: train group_lstm_lm (2 groups) on the Brown corpus on this CPU within a bounded budget,
# with fairseq's progress output, then report validation and test perplexity with fairseq-eval-lm.
#
# Usage: bash examples/brown-lm.sh
# Environment (all optional):
#   NUM_GROUPS   groups K of every LSTM layer (default 2; 1 is the dense LSTM baseline)
#   MAX_UPDATE   training updates (default 1500, about 1.7 epochs; the whole script, data preparation included,
#                took 6 min 48 s on 2 cores of an Intel Xeon, 2026-11-30)
#   DATA         data folder (default data/brown), SAVE checkpoint folder (default checkpoints/brown-lm-gK)
#   EXTRA        more fairseq-train flags, e.g. EXTRA="--variational-dropout --no-shuffle-time"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NUM_GROUPS="${NUM_GROUPS:-2}"
MAX_UPDATE="${MAX_UPDATE:-1500}"
DATA="${DATA:-data/brown}"
SAVE="${SAVE:-checkpoints/brown-lm-g$NUM_GROUPS}"
EXTRA="${EXTRA:-}"

echo "[brown-lm] 1/3 data: $DATA"
bash scripts/prepare-brown.sh "$DATA"

echo "[brown-lm] 2/3 training group_lstm_lm_brown, groups $NUM_GROUPS, $MAX_UPDATE updates -> $SAVE"
# shellcheck disable=SC2086
fairseq-train "$DATA/data-bin" \
    --user-dir grnn_fairseq --task language_modeling --arch group_lstm_lm_brown \
    --decoder-groups "$NUM_GROUPS" \
    --tokens-per-sample 35 --sample-break-mode none --batch-size 32 --required-batch-size-multiple 1 \
    --optimizer adam --lr 0.002 --clip-norm 0.25 --lr-scheduler reduce_lr_on_plateau --lr-shrink 0.5 \
    --max-update "$MAX_UPDATE" --validate-interval-updates 500 --save-interval-updates 500 \
    --keep-interval-updates 1 --no-epoch-checkpoints \
    --save-dir "$SAVE" --log-format simple --log-interval 50 --num-workers 0 --seed 1 $EXTRA

echo "[brown-lm] 3/3 perplexity of $SAVE/checkpoint_best.pt"
for split in valid test; do
    ppl=$(fairseq-eval-lm "$DATA/data-bin" --user-dir grnn_fairseq --path "$SAVE/checkpoint_best.pt" \
        --gen-subset "$split" --tokens-per-sample 35 --batch-size 32 --required-batch-size-multiple 1 \
        --num-workers 0 2>&1 | tee "$SAVE/eval-$split.log" | sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p')
    echo "[brown-lm] $split perplexity: $ppl"
done
