#!/usr/bin/env bash
# A small real German-English corpus from the Ding dictionary (Frank Richter, TU Chemnitz, GPL-2+):
# the example sentences of its entries, deduplicated, split so that no German and no English sentence
# occurs in two splits, Moses-tokenized, joint BPE, binarized for fairseq.
#
# Usage: bash scripts/prepare-ding-de-en.sh [OUT_DIR]        (default: data/ding-de-en)
#
# Steps (each one is skipped when its outputs exist):
#   1. fetch     the dictionary file: $DING_FILE, else /usr/share/trans/de-en (Debian package
#                trans-de-en, installed), else `apt-get download trans-de-en` + `dpkg-deb -x` into
#                OUT_DIR/raw (no root needed, nothing installed), else $DING_URL (upstream, gzipped)
#   2. select    textprep.py ding -> OUT_DIR/plain/{train,valid,test}.{de,en} and stats.json
#                Ding lines are `de | de2 | ... :: en | en2 | ...`, sub-entries aligned one to one.
#                Per sub-entry: {..} [..] (..) annotations removed, first of the `;` alternatives.
#                A pair is kept when both sides have >= 4 words, end in . ! or ?, do not start
#                lowercase, and have no `/` alternatives, ellipsis or jdm./etw./sb./sth. placeholders.
#                PHRASES=1 keeps every pair of >= 2 words instead (dictionary phrases too);
#                PHRASES=train keeps valid and test sentences and adds the phrases to training only.
#                Pairs sharing a German or an English side (case-insensitive) stay in one split.
#   3. tokenize  sacremoses, cased (the paper scores case-sensitive BLEU) -> OUT_DIR/tok/
#   4. BPE       joint subword-nmt codes learned on train -> OUT_DIR/bpe/ (training pairs over
#                MAX_SUBWORDS subwords dropped), then fairseq-preprocess --joined-dictionary
#                -> OUT_DIR/data-bin/
#
# Environment:
#   DING_FILE     local Ding de-en dictionary file (plain or .gz): skips every download
#   DING_DEB      local trans-de-en .deb file
#   DING_URL      upstream copy (default https://ftp.tu-chemnitz.de/pub/Local/urz/ding/de-en/de-en.txt.gz)
#   PHRASES       1: keep phrases too (about 88k pairs instead of about 16k); train: sentences for valid
#                 and test, training sentences plus every phrase pair sharing no side with them; default 0
#   BPE_MERGES    joint BPE merges (default 4000 for sentences, 8000 with PHRASES=1). 4000: on the
#                 ~14k training sentences (~110k words a side) 8000 merges leave a third of the
#                 subword types seen fewer than 10 times, 4000 fewer than 5% (Sennrich and Zhang
#                 2019: small corpora want small BPE vocabularies), at 13% longer sequences.
#   MAX_SUBWORDS  drop training pairs longer than this (default 64, the paper's limit)
#   VALID_SIZE, TEST_SIZE  sentence pairs (default 1000 each); SEED split seed (default 1)
#   PYTHON, FAIRSEQ_BIN, WORKERS: see scripts/lib.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-ding-de-en

OUT="${1:-data/ding-de-en}"
PHRASES="${PHRASES:-0}"
if [[ "$PHRASES" == 1 ]]; then
    BPE_MERGES="${BPE_MERGES:-8000}"
    PHRASE_FLAG=(--phrases)
elif [[ "$PHRASES" == train ]]; then
    BPE_MERGES="${BPE_MERGES:-8000}"
    PHRASE_FLAG=(--train-phrases)
else
    BPE_MERGES="${BPE_MERGES:-4000}"
    PHRASE_FLAG=()
fi
MAX_SUBWORDS="${MAX_SUBWORDS:-64}"
VALID_SIZE="${VALID_SIZE:-1000}"
TEST_SIZE="${TEST_SIZE:-1000}"
SEED="${SEED:-1}"
DING_URL="${DING_URL:-https://ftp.tu-chemnitz.de/pub/Local/urz/ding/de-en/de-en.txt.gz}"
start=$(date +%s)
log "output directory: $OUT (phrases: $PHRASES, BPE merges: $BPE_MERGES)"
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------- 1. fetch
RAW="$OUT/raw"
HINT="Install the Debian package trans-de-en, or set DING_FILE to a copy of its /usr/share/trans/de-en (or DING_DEB to trans-de-en_*.deb)."
if [[ -n "${DING_FILE:-}" ]]; then
    [[ -f "$DING_FILE" ]] || die "DING_FILE=$DING_FILE does not exist"
    DICT="$DING_FILE"
    log "step 1/4: using DING_FILE=$DICT (no download)"
elif [[ -f /usr/share/trans/de-en ]]; then
    DICT=/usr/share/trans/de-en
    log "step 1/4: using the installed $DICT"
elif [[ -f "$RAW/usr/share/trans/de-en" ]]; then
    DICT="$RAW/usr/share/trans/de-en"
    log "step 1/4: dictionary already unpacked: $DICT"
elif [[ -f "$RAW/de-en.txt.gz" ]]; then
    DICT="$RAW/de-en.txt.gz"
    log "step 1/4: dictionary already downloaded: $DICT"
else
    mkdir -p "$RAW"
    deb="${DING_DEB:-}"
    if [[ -n "$deb" ]]; then
        [[ -f "$deb" ]] || die "DING_DEB=$deb does not exist"
    elif command -v apt-get >/dev/null 2>&1; then
        log "step 1/4: apt-get download trans-de-en (into $RAW; nothing is installed)"
        if (cd "$RAW" && apt-get download trans-de-en >/dev/null 2>&1); then
            deb="$(find "$RAW" -maxdepth 1 -name 'trans-de-en_*.deb' | sort | head -n 1)"
        else
            log "apt-get download failed (run apt-get update first?); trying $DING_URL"
        fi
    fi
    if [[ -n "$deb" ]]; then
        command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is needed to unpack $deb. $HINT"
        dpkg-deb -x "$deb" "$RAW"
        DICT="$RAW/usr/share/trans/de-en"
        [[ -f "$DICT" ]] || die "$deb holds no usr/share/trans/de-en"
    else
        fetch "$DING_URL" "$RAW/de-en.txt.gz" "$HINT"
        DICT="$RAW/de-en.txt.gz"
    fi
fi
log "dictionary: $DICT"

# --------------------------------------------------------------------------------- 2. select
PLAIN="$OUT/plain"
if done_all "$PLAIN"/{train,valid,test}.{de,en}; then
    log "step 2/4: $PLAIN/{train,valid,test}.{de,en} exist, skipping selection"
else
    log "step 2/4: selecting sentence pairs -> $PLAIN (valid $VALID_SIZE, test $TEST_SIZE, seed $SEED)"
    rm -rf "$PLAIN.tmp"
    textprep ding "${PHRASE_FLAG[@]}" --valid-size "$VALID_SIZE" --test-size "$TEST_SIZE" \
        --seed "$SEED" "$DICT" "$PLAIN.tmp"
    rm -rf "$PLAIN"
    mv "$PLAIN.tmp" "$PLAIN"
fi

# ------------------------------------------------------------------------------- 3. tokenize
log "step 3/4: Moses tokenization -> $OUT/tok"
mkdir -p "$OUT/tok"
for lang in de en; do
    tokenize_files "$lang" "" "$PLAIN/train.$lang" "$OUT/tok/train.$lang" \
        "$PLAIN/valid.$lang" "$OUT/tok/valid.$lang" "$PLAIN/test.$lang" "$OUT/tok/test.$lang"
done

# ------------------------------------------------------------------------------ 4. BPE + bin
log "step 4/4: joint BPE ($BPE_MERGES merges) and fairseq-preprocess --joined-dictionary"
bpe_and_binarize "$OUT" de en "$BPE_MERGES" "$MAX_SUBWORDS" --joined-dictionary

log "statistics (selection: $PLAIN/stats.json):"
corpus_stats "$OUT/bpe" train.de train.en valid.de valid.en test.de test.en
log "dictionary: $(grep -vc '^madeupword' "$OUT/data-bin/dict.de.txt") joint subword types (+ 4 fairseq specials)"
log "done in $(( $(date +%s) - start )) s: $OUT/data-bin"
