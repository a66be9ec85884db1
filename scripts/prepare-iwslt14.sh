#!/usr/bin/env bash
# IWSLT 2014 German-English (TED talks), preprocessed like fairseq's examples/translation/prepare-iwslt14.sh
# (the recipe of Wu et al. 2017 that the paper follows, section 4.2), with sacremoses instead of Moses' Perl.
#
# Usage: bash scripts/prepare-iwslt14.sh [OUT_DIR]        (default: data/iwslt14-de-en)
#
# Steps (each one is skipped when its outputs exist):
#   1. fetch     de-en.tgz (IWSLT14_URL) -> OUT_DIR/raw/, extracted to OUT_DIR/raw/de-en/;
#                or IWSLT14_ARCHIVE (a local de-en.tgz), or IWSLT14_SRC (a local directory holding
#                train.tags.de-en.{de,en} and IWSLT14.TED*.de-en.{de,en}.xml: no download at all)
#   2. text      train.tags: metadata lines dropped, <title>/<description> text kept; test .xml files:
#                the <seg> text -> OUT_DIR/plain/
#   3. tokenize  sacremoses (cased), lowercased afterwards (as fairseq's recipe: LOWERCASE=0 keeps case);
#                training pairs cleaned like clean-corpus-n.perl (1-175 tokens, length ratio <= 1.5);
#                valid = every 23rd training line, train = the others; test = dev2010 + tedx.dev2012 +
#                tst2010 + tst2011 + tst2012 -> OUT_DIR/tok/
#   4. BPE       joint subword-nmt codes, BPE_MERGES merges (default 25000: "BPE with vocabulary of
#                25K", section 4.2; fairseq's recipe uses 10000) -> OUT_DIR/bpe/, training pairs over
#                MAX_SUBWORDS (default 64, "the max length of sub-word sentence is 64") dropped;
#                fairseq-preprocess with one dictionary per language (as fairseq's recipe) -> OUT_DIR/data-bin/
#
# Environment: IWSLT14_SRC, IWSLT14_ARCHIVE, IWSLT14_URL (default: fairseq's mirror of the WIT3 archive),
#   LOWERCASE (1), BPE_MERGES (25000), MAX_SUBWORDS (64); PYTHON, FAIRSEQ_BIN, WORKERS: see scripts/lib.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-iwslt14

OUT="${1:-data/iwslt14-de-en}"
IWSLT14_URL="${IWSLT14_URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}"
LOWERCASE="${LOWERCASE:-1}"
BPE_MERGES="${BPE_MERGES:-25000}"
MAX_SUBWORDS="${MAX_SUBWORDS:-64}"
TESTSETS=(IWSLT14.TED.dev2010 IWSLT14.TEDX.dev2012 IWSLT14.TED.tst2010 IWSLT14.TED.tst2011 IWSLT14.TED.tst2012)
start=$(date +%s)
log "output directory: $OUT"
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------- 1. fetch
if [[ -n "${IWSLT14_SRC:-}" ]]; then
    [[ -d "$IWSLT14_SRC" ]] || die "IWSLT14_SRC=$IWSLT14_SRC is not a directory"
    RAW="$IWSLT14_SRC"
    log "step 1/4: using local files in IWSLT14_SRC=$RAW (no download)"
else
    obtain_archive IWSLT14_ARCHIVE "$IWSLT14_URL" "$OUT/raw/de-en.tgz" \
        "Download de-en.tgz (IWSLT 2014 de-en from WIT3) by hand and set IWSLT14_ARCHIVE=/path/to/de-en.tgz, or IWSLT14_SRC to its extracted de-en/ directory."
    extract "$ARCHIVE" "$OUT/raw/extracted"
    RAW="$(dirname "$(find_file "$OUT/raw/extracted" train.tags.de-en.de)")"
fi
for lang in de en; do
    [[ -f "$RAW/train.tags.de-en.$lang" ]] || die "missing $RAW/train.tags.de-en.$lang"
    for t in "${TESTSETS[@]}"; do
        [[ -f "$RAW/$t.de-en.$lang.xml" ]] || die "missing $RAW/$t.de-en.$lang.xml"
    done
done

# ----------------------------------------------------------------------------------- 2. text
PLAIN="$OUT/plain"
mkdir -p "$PLAIN"
for lang in de en; do
    if done_all "$PLAIN/train.tags.$lang" "$PLAIN/test.$lang"; then
        log "step 2/4: $PLAIN/{train.tags,test}.$lang exist, skipping"
        continue
    fi
    log "step 2/4: stripping markup ($lang) -> $PLAIN"
    textprep strip-markup --format tags "$RAW/train.tags.de-en.$lang" "$PLAIN/train.tags.$lang"
    : > "$PLAIN/test.$lang.tmp"
    for t in "${TESTSETS[@]}"; do
        textprep strip-markup --format seg "$RAW/$t.de-en.$lang.xml" "$PLAIN/$t.$lang"
        cat "$PLAIN/$t.$lang" >> "$PLAIN/test.$lang.tmp"
    done
    mv "$PLAIN/test.$lang.tmp" "$PLAIN/test.$lang"
done

# ------------------------------------------------------------------------------- 3. tokenize
TOK="$OUT/tok"
mkdir -p "$TOK"
LC_FLAG=""
[[ "$LOWERCASE" == 1 ]] && LC_FLAG=--lowercase
log "step 3/4: Moses tokenization (lowercase: $LOWERCASE), cleaning, valid/test split -> $TOK"
for lang in de en; do
    tokenize_files "$lang" "$LC_FLAG" "$PLAIN/train.tags.$lang" "$TOK/train.tags.$lang" "$PLAIN/test.$lang" "$TOK/test.$lang"
done
if done_all "$TOK"/{train,valid}.{de,en}; then
    log "step 3/4: $TOK/{train,valid}.{de,en} exist, skipping cleaning and split"
else
    textprep clean --min-len 1 --max-len 175 --ratio 1.5 \
        "$TOK/train.tags.de" "$TOK/train.tags.en" "$TOK/clean.de" "$TOK/clean.en"
    for lang in de en; do
        textprep split-every -n 23 "$TOK/clean.$lang" "$TOK/valid.$lang.tmp" "$TOK/train.$lang.tmp"
    done
    for lang in de en; do
        mv "$TOK/valid.$lang.tmp" "$TOK/valid.$lang"
        mv "$TOK/train.$lang.tmp" "$TOK/train.$lang"
    done
fi

# ------------------------------------------------------------------------------ 4. BPE + bin
log "step 4/4: joint BPE ($BPE_MERGES merges) and fairseq-preprocess"
bpe_and_binarize "$OUT" de en "$BPE_MERGES" "$MAX_SUBWORDS"

log "statistics:"
corpus_stats "$OUT/bpe" train.de train.en valid.de valid.en test.de test.en
log "done in $(( $(date +%s) - start )) s: $OUT/data-bin"
