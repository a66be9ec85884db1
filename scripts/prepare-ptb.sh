#!/usr/bin/env bash
# Penn Treebank as preprocessed by Mikolov et al. (2010) (929k/73k/82k words, 10k vocabulary, the
# paper's section 4.1 data), binarized for fairseq's language_modeling task.
#
# Usage: bash scripts/prepare-ptb.sh [OUT_DIR]        (default: data/ptb)
#
# Steps (each one is skipped when its outputs exist):
#   1. fetch     simple-examples.tgz (PTB_URL) -> OUT_DIR/raw/, or PTB_ARCHIVE (a local copy), or
#                PTB_SRC (a local directory holding ptb.{train,valid,test}.txt: no download at all)
#   2. text      ptb.{train,valid,test}.txt -> OUT_DIR/text/{train,valid,test}.txt (unchanged: the
#                text is already lowercased, numbers are N, rare words <unk>)
#   3. binarize  fairseq-preprocess --only-source -> OUT_DIR/data-bin/ (fairseq maps <unk> to its own)
#
# Environment: PTB_SRC, PTB_ARCHIVE, PTB_URL (default Mikolov's page); PYTHON, FAIRSEQ_BIN, WORKERS
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-ptb

OUT="${1:-data/ptb}"
PTB_URL="${PTB_URL:-http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz}"
log "output directory: $OUT"
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------- 1. fetch
TEXT="$OUT/text"
if done_all "$TEXT"/{train,valid,test}.txt; then
    log "step 1/3: $TEXT/{train,valid,test}.txt exist, skipping fetch"
else
    if [[ -n "${PTB_SRC:-}" ]]; then
        [[ -d "$PTB_SRC" ]] || die "PTB_SRC=$PTB_SRC is not a directory"
        RAW="$PTB_SRC"
        log "step 1/3: using local files in PTB_SRC=$RAW (no download)"
    else
        obtain_archive PTB_ARCHIVE "$PTB_URL" "$OUT/raw/simple-examples.tgz" \
            "Download simple-examples.tgz by hand and set PTB_ARCHIVE=/path/to/simple-examples.tgz, or PTB_SRC to a directory holding ptb.{train,valid,test}.txt."
        extract "$ARCHIVE" "$OUT/raw/extracted"
        RAW="$OUT/raw/extracted"
    fi
    # ------------------------------------------------------------------------------ 2. text
    log "step 2/3: copying ptb.{train,valid,test}.txt -> $TEXT"
    mkdir -p "$TEXT"
    for split in train valid test; do
        cp "$(find_file "$RAW" "ptb.$split.txt")" "$TEXT/$split.txt.tmp"
    done
    for split in train valid test; do
        mv "$TEXT/$split.txt.tmp" "$TEXT/$split.txt"
    done
fi
corpus_stats "$TEXT" train.txt valid.txt test.txt

# ------------------------------------------------------------------------------ 3. binarize
log "step 3/3: fairseq-preprocess --only-source"
binarize "$OUT/data-bin" "$TEXT/train.txt" "$TEXT/valid.txt" "$TEXT/test.txt" --only-source
log "done: $OUT/data-bin, $(grep -vc '^madeupword' "$OUT/data-bin/dict.txt") words in dict.txt (+ fairseq's <unk>)"
