#!/usr/bin/env bash
# Gigaword headline generation as preprocessed by Rush et al. (2015) (the paper's section 4.3 data:
# 3.8M training article-headline pairs, 190k validation, the 2k test set), binarized for fairseq.
#
# Usage: bash scripts/prepare-gigaword.sh [OUT_DIR]        (default: data/gigaword)
#
# Input: the release of harvardnlp/sent-summary ("sumdata": train/train.{article,title}.txt,
# train/valid.{article,title}.filter.txt, Giga/input.txt + Giga/task1_ref0.txt), or UniLM's copy of it
# (org_data/{train,dev,test}.{src,tgt}.txt); files are found by name, gzipped or not.
#
# Steps (each one is skipped when its outputs exist):
#   1. fetch     GIGAWORD_URL -> OUT_DIR/raw/ and extracted, or GIGAWORD_ARCHIVE (a local .tar.gz or .zip),
#                or GIGAWORD_SRC (a local directory holding the files: no download at all)
#   2. text      Rush et al.'s normalization, re-applied so that either copy ends up the same: lowercase,
#                every digit -> '#', the release's UNK -> fairseq's <unk>; train/valid pairs with an
#                empty side dropped, test kept whole -> OUT_DIR/tok/{train,valid,test}.{article,title}
#   3. binarize  fairseq-preprocess, separate 30k source and target vocabularies (--nwordssrc/--nwordstgt
#                30000, fairseq's specials included; section 4.3: "vocabulary consisting of 30K words")
#                -> OUT_DIR/data-bin/
#
# Environment: GIGAWORD_SRC, GIGAWORD_ARCHIVE, GIGAWORD_URL (default: the Google Drive copy used by
#   UniLM and the Hugging Face loader; Drive may answer large downloads with a web page instead, then
#   download it in a browser and set GIGAWORD_ARCHIVE), VOCAB (30000); PYTHON, FAIRSEQ_BIN, WORKERS
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-gigaword

OUT="${1:-data/gigaword}"
GIGAWORD_URL="${GIGAWORD_URL:-https://drive.google.com/uc?export=download&id=1USoQ8lJgN8kAWnUnRrupMGrPMLlDVqlV}"
VOCAB="${VOCAB:-30000}"
log "output directory: $OUT"
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------- 1. fetch
TOK="$OUT/tok"
if done_all "$TOK"/{train,valid,test}.{article,title}; then
    log "step 1/3: $TOK/{train,valid,test}.{article,title} exist, skipping fetch and normalization"
else
    if [[ -n "${GIGAWORD_SRC:-}" ]]; then
        [[ -d "$GIGAWORD_SRC" ]] || die "GIGAWORD_SRC=$GIGAWORD_SRC is not a directory"
        RAW="$GIGAWORD_SRC"
        log "step 1/3: using local files in GIGAWORD_SRC=$RAW (no download)"
    else
        obtain_archive GIGAWORD_ARCHIVE "$GIGAWORD_URL" "$OUT/raw/gigaword.zip" \
            "Download Rush et al.'s Gigaword release (https://github.com/harvardnlp/sent-summary) by hand and set GIGAWORD_ARCHIVE to the archive, or GIGAWORD_SRC to its extracted directory."
        extract "$ARCHIVE" "$OUT/raw/extracted"
        RAW="$OUT/raw/extracted"
    fi

    # ------------------------------------------------------------------------------ 2. text
    log "step 2/3: normalizing (lowercase, digits -> #, UNK -> <unk>) -> $TOK"
    mkdir -p "$TOK"
    declare -A FILES=(
        [train.article]="train.article.txt train.src.txt"
        [train.title]="train.title.txt train.tgt.txt"
        [valid.article]="valid.article.filter.txt dev.src.txt"
        [valid.title]="valid.title.filter.txt dev.tgt.txt"
        [test.article]="input.txt test.src.txt"
        [test.title]="task1_ref0.txt test.tgt.txt"
    )
    for key in "${!FILES[@]}"; do
        names=()
        for name in ${FILES[$key]}; do
            names+=("$name" "$name.gz")
        done
        textprep gigaword "$(find_file "$RAW" "${names[@]}")" "$TOK/$key.all"
    done
    for split in train valid; do
        textprep clean --min-len 1 --max-len 100000 --ratio 0 \
            "$TOK/$split.article.all" "$TOK/$split.title.all" "$TOK/$split.article.tmp" "$TOK/$split.title.tmp"
    done
    mv "$TOK/test.article.all" "$TOK/test.article.tmp"
    mv "$TOK/test.title.all" "$TOK/test.title.tmp"
    for split in train valid test; do
        mv "$TOK/$split.article.tmp" "$TOK/$split.article"
        mv "$TOK/$split.title.tmp" "$TOK/$split.title"
    done
    rm -f "$TOK"/*.all
fi
corpus_stats "$TOK" train.article train.title valid.article valid.title test.article test.title

# ------------------------------------------------------------------------------ 3. binarize
log "step 3/3: fairseq-preprocess, $VOCAB-word source and target vocabularies"
binarize "$OUT/data-bin" "$TOK/train" "$TOK/valid" "$TOK/test" \
    --source-lang article --target-lang title --nwordssrc "$VOCAB" --nwordstgt "$VOCAB"
log "done: $OUT/data-bin"
