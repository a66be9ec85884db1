#!/usr/bin/env bash
# German -> English with Group RNNSearch on this CPU: prepare the Ding dictionary's example sentences
# (scripts/prepare-ding-de-en.sh), train group_rnnsearch_iwslt within a bounded budget, score the test
# set with sacreBLEU, show sample translations, then translate a sentence of your own.
#
# Usage: bash examples/translate-de-en.sh ["Ein deutscher Satz."]
# Environment (all optional):
#   SENTENCE     the sentence to translate at the end (or the first argument); when neither is given
#                and stdin is a terminal, one is read from it, else a default sentence is used
#   NUM_GROUPS   groups of every LSTM layer (default 2; 1 is the RNNSearch baseline)
#   MAX_UPDATE   training updates (default 3000, ~7 epochs of the 14k training sentences, batches of 32)
#   OPTIMIZER_FLAGS  default "--optimizer adam --lr 0.002": the paper's Adadelta (scripts/train-iwslt14.sh)
#                learns too slowly for this budget
#   SCHEDULER_FLAGS  default "--lr-scheduler fixed"; CRITERION_FLAGS default "--criterion
#                label_smoothed_cross_entropy --label-smoothing 0.1"
#   MODEL_FLAGS  default "--decoder-residual --decoder-hidden-size 512 --init-uniform 0.1 --attention-type
#                luong": a residual connection from the attention layer's output around the decoder's upper
#                layer (GNMT), which needs that layer as wide as the first (2d); without it the upper layer is
#                the only path from the attention to the output and the model learns to use its source far more
#                slowly; with it, fairseq's LSTM initialization U(-0.1, 0.1) and Luong's attention
#                (docs/translation.md)
# With these defaults the recipe is scripts/translation_report.py's (its "groups 2" row; NUM_GROUPS the others).
#   DATA         data folder (default data/ding-de-en), SAVE checkpoints (default checkpoints/ding-de-en-gK)
#   EXTRA        more fairseq-train flags
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
grnn_init translate-de-en

SENTENCE="${1:-${SENTENCE:-}}"
export NUM_GROUPS="${NUM_GROUPS:-2}"
export MAX_UPDATE="${MAX_UPDATE:-3000}"
export OPTIMIZER_FLAGS="${OPTIMIZER_FLAGS:---optimizer adam --lr 0.002}"
export SCHEDULER_FLAGS="${SCHEDULER_FLAGS:---lr-scheduler fixed}"
export CRITERION_FLAGS="${CRITERION_FLAGS:---criterion label_smoothed_cross_entropy --label-smoothing 0.1}"
MODEL_FLAGS="${MODEL_FLAGS:---decoder-residual --decoder-hidden-size 512 --init-uniform 0.1 --attention-type luong}"
export MAX_EPOCH="${MAX_EPOCH:-100}"  # the budget is MAX_UPDATE
DATA="${DATA:-data/ding-de-en}"
SAVE="${SAVE:-checkpoints/ding-de-en-g$NUM_GROUPS}"
start=$(date +%s)

log "1/4 data: $DATA"
bash scripts/prepare-ding-de-en.sh "$DATA"

log "2/4 training group_rnnsearch_iwslt, $NUM_GROUPS groups, $MAX_UPDATE updates -> $SAVE"
# shellcheck disable=SC2086
train_seq2seq "$DATA/data-bin" "$SAVE" de en group_rnnsearch_iwslt --batch-size 32 --clip-norm 2.5 \
    --dropout 0.1 --log-interval 50 --num-workers 0 $MODEL_FLAGS
log "training took $(( $(date +%s) - start )) s so far"

log "3/4 test set: beam 5, BPE removed"
generate_test "$DATA" "$SAVE" de en 5
bleu_scores "$DATA" en "$GEN_OUT"
log "sample translations (tokenized):"
show_samples "$GEN_OUT" 5

if [[ -z "$SENTENCE" && -t 0 ]]; then
    read -r -p "[translate-de-en] Ein deutscher Satz (leer: Beispielsatz): " SENTENCE || true
fi
SENTENCE="${SENTENCE:-Ich habe heute leider keine Zeit, weil ich arbeiten muss.}"
log "4/4 fairseq-interactive: $SENTENCE"
# the same Moses tokenization and BPE codes as the training data; BPE removed and detokenized after
translation="$(echo "$SENTENCE" \
    | textprep tokenize --lang de - - 2>/dev/null \
    | textprep bpe --codes "$DATA/bpe/code" --apply=-:- 2>/dev/null \
    | "$(fairseq_tool fairseq-interactive)" "$DATA/data-bin" --user-dir "$GRNN_USER_DIR" \
        --path "$SAVE/checkpoint_best.pt" --source-lang de --target-lang en --beam 5 --remove-bpe 2>/dev/null \
    | sed -n 's/^H-0\t[^\t]*\t//p' \
    | textprep detokenize --lang en - -)"
log "translation: $translation"
log "done in $(( $(date +%s) - start )) s"
