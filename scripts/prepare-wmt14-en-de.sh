#!/usr/bin/env bash
# WMT'14 English-German (4.5M sentence pairs: Europarl v7 + Common Crawl + News Commentary v9, the
# data of Jean et al. 2015 that the paper uses, section 4.2), preprocessed like fairseq's
# examples/translation/prepare-wmt14en2de.sh --icml17, with sacremoses instead of Moses' Perl.
#
# Usage: bash scripts/prepare-wmt14-en-de.sh [OUT_DIR]        (default: data/wmt14-en-de)
#
# Steps (each one is skipped when its outputs exist):
#   1. fetch     the five statmt.org archives below -> OUT_DIR/raw/ and extracted there; or
#                WMT14_SRC: a local directory holding the archives, or their extracted files
#                (searched recursively by name: no download at all)
#   2. text      train: the three corpora concatenated; valid: newstest2012 + newstest2013; test:
#                newstest2014 (the <seg> text of the .sgm files) -> OUT_DIR/plain/
#   3. tokenize  Moses punctuation normalization and tokenization with aggressive dash splits (-a),
#                cased; training pairs cleaned like clean-corpus-n.perl (1-250 tokens, ratio 1.5)
#                -> OUT_DIR/tok/
#   4. BPE       joint subword-nmt codes, BPE_MERGES (default 30000: "vocabulary of ... 30K") ->
#                OUT_DIR/bpe/, training pairs over MAX_SUBWORDS (64) dropped; fairseq-preprocess
#                --joined-dictionary -> OUT_DIR/data-bin/
#
# Environment: WMT14_SRC, WMT14_URL_BASE (default http://statmt.org), BPE_MERGES (30000),
#   MAX_SUBWORDS (64); PYTHON, FAIRSEQ_BIN, WORKERS (use many: tokenizing 9M lines takes hours on one)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-wmt14-en-de

OUT="${1:-data/wmt14-en-de}"
BASE="${WMT14_URL_BASE:-http://statmt.org}"
BPE_MERGES="${BPE_MERGES:-30000}"
MAX_SUBWORDS="${MAX_SUBWORDS:-64}"
ARCHIVES=(
    "wmt13/training-parallel-europarl-v7.tgz"
    "wmt13/training-parallel-commoncrawl.tgz"
    "wmt14/training-parallel-nc-v9.tgz"
    "wmt14/dev.tgz"
    "wmt14/test-full.tgz"
)
CORPORA=(europarl-v7.de-en commoncrawl.de-en news-commentary-v9.de-en)
start=$(date +%s)
log "output directory: $OUT"
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------- 1. fetch
if [[ -n "${WMT14_SRC:-}" ]]; then
    [[ -d "$WMT14_SRC" ]] || die "WMT14_SRC=$WMT14_SRC is not a directory"
    RAW="$WMT14_SRC"
    log "step 1/4: using local files in WMT14_SRC=$RAW (no download)"
    for path in "${ARCHIVES[@]}"; do  # archives put there by hand are unpacked next to them
        name="$(basename "$path")"
        if [[ -f "$RAW/$name" ]]; then
            extract "$RAW/$name" "$RAW/${name%.tgz}"
        fi
    done
else
    RAW="$OUT/raw"
    for path in "${ARCHIVES[@]}"; do
        name="$(basename "$path")"
        fetch "$BASE/$path" "$RAW/$name" \
            "Download the WMT'14 archives ($(printf '%s ' "${ARCHIVES[@]}")) from statmt.org by hand into one directory and set WMT14_SRC to it."
        extract "$RAW/$name" "$RAW/${name%.tgz}"
    done
fi

# ----------------------------------------------------------------------------------- 2. text
PLAIN="$OUT/plain"
mkdir -p "$PLAIN"
if done_all "$PLAIN"/{train,valid,test}.{en,de}; then
    log "step 2/4: $PLAIN/{train,valid,test}.{en,de} exist, skipping"
else
    log "step 2/4: collecting train/valid/test text -> $PLAIN"
    for lang in en de; do
        : > "$PLAIN/train.$lang.tmp"
        for corpus in "${CORPORA[@]}"; do
            cat "$(find_file "$RAW" "$corpus.$lang")" >> "$PLAIN/train.$lang.tmp"
        done
        # newstest2012/2013 as plain text when dev.tgz has it, else the <seg> lines of the .sgm
        : > "$PLAIN/valid.$lang.tmp"
        for year in 2012 2013; do
            plain_file="$(find "$RAW" -type f -name "newstest$year.$lang" | head -n 1)"
            if [[ -n "$plain_file" ]]; then
                cat "$plain_file" >> "$PLAIN/valid.$lang.tmp"
            else
                textprep strip-markup --format seg \
                    "$(find_file "$RAW" "newstest$year-src.$lang.sgm" "newstest$year-ref.$lang.sgm")" "$PLAIN/nt$year.$lang"
                cat "$PLAIN/nt$year.$lang" >> "$PLAIN/valid.$lang.tmp"
            fi
        done
        # newstest2014 (test-full): English is the source side, German the reference
        role=src
        [[ "$lang" == de ]] && role=ref
        textprep strip-markup --format seg "$(find_file "$RAW" "newstest2014-deen-$role.$lang.sgm")" "$PLAIN/test.$lang.tmp"
    done
    for split in train valid test; do
        for lang in en de; do
            mv "$PLAIN/$split.$lang.tmp" "$PLAIN/$split.$lang"
        done
    done
fi
for split in train valid test; do
    n_en=$(wc -l < "$PLAIN/$split.en")
    n_de=$(wc -l < "$PLAIN/$split.de")
    [[ "$n_en" == "$n_de" ]] || die "$split: $n_en English but $n_de German lines"
done

# ------------------------------------------------------------------------------- 3. tokenize
TOK="$OUT/tok"
mkdir -p "$TOK"
log "step 3/4: punctuation normalization, Moses tokenization (-a), cleaning -> $TOK"
for lang in en de; do
    tokenize_files "$lang" "--normalize-punct --aggressive-dash-splits" "$PLAIN/train.$lang" "$TOK/train.all.$lang" \
        "$PLAIN/valid.$lang" "$TOK/valid.$lang" "$PLAIN/test.$lang" "$TOK/test.$lang"
done
if done_all "$TOK/train.en" "$TOK/train.de"; then
    log "step 3/4: cleaned $TOK/train.{en,de} exist, skipping"
else
    textprep clean --min-len 1 --max-len 250 --ratio 1.5 \
        "$TOK/train.all.en" "$TOK/train.all.de" "$TOK/train.en.tmp" "$TOK/train.de.tmp"
    mv "$TOK/train.en.tmp" "$TOK/train.en"
    mv "$TOK/train.de.tmp" "$TOK/train.de"
fi

# ------------------------------------------------------------------------------ 4. BPE + bin
log "step 4/4: joint BPE ($BPE_MERGES merges) and fairseq-preprocess --joined-dictionary"
bpe_and_binarize "$OUT" en de "$BPE_MERGES" "$MAX_SUBWORDS" --joined-dictionary

log "statistics:"
corpus_stats "$OUT/bpe" train.en train.de valid.en valid.de test.en test.de
log "done in $(( $(date +%s) - start )) s: $OUT/data-bin"
