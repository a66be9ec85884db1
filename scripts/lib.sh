# shellcheck shell=bash
# Shell functions shared by scripts/prepare-*.sh, train-*.sh, eval-*.sh and examples/translate-de-en.sh.
# Source it (after `set -euo pipefail`) and call grnn_init NAME first:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"; grnn_init prepare-foo
#
# Text processing itself lives in scripts/textprep.py (one Python module, one subcommand per step);
# these functions only find the tools, fetch and unpack archives, skip finished steps and run fairseq.
#
# Environment read here (all optional):
#   PYTHON       Python interpreter with fairseq, sacremoses, subword-nmt (default: python, else python3)
#   FAIRSEQ_BIN  directory holding fairseq-preprocess, fairseq-train, ... (default: beside $PYTHON,
#                else PATH)
#   WORKERS      processes for tokenization, BPE and fairseq-preprocess (default 2)

GRNN_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GRNN_REPO="$(dirname "$GRNN_SCRIPTS")"
GRNN_USER_DIR="$GRNN_REPO/grnn_fairseq"

grnn_init() {
    GRNN_TAG="$1"
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON="$(command -v python || command -v python3 || true)"
    fi
    if [[ -z "$PYTHON" ]] || ! command -v "$PYTHON" >/dev/null 2>&1; then
        die "no Python interpreter found; set PYTHON to the project's virtual environment's python"
    fi
    WORKERS="${WORKERS:-2}"
}

log() { echo "[$GRNN_TAG] $*"; }
die() { echo "[$GRNN_TAG] ERROR: $*" >&2; exit 1; }

textprep() { "$PYTHON" "$GRNN_SCRIPTS/textprep.py" "$@"; }

# fairseq_tool NAME: path of a fairseq console script (FAIRSEQ_BIN, then beside $PYTHON, then PATH).
fairseq_tool() {
    local name="$1" dir
    for dir in "${FAIRSEQ_BIN:-}" "$(dirname "$(command -v "$PYTHON")")"; do
        if [[ -n "$dir" && -x "$dir/$name" ]]; then
            echo "$dir/$name"
            return
        fi
    done
    command -v "$name" 2>/dev/null \
        || die "$name not found; activate the virtual environment, or set FAIRSEQ_BIN or PYTHON"
}

# done_all FILE...: true when every file exists and is non-empty (the skip test of every step).
done_all() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || return 1
    done
}

# ------------------------------------------------------------------------------------- download

# fetch URL DEST HINT: download URL to DEST unless DEST exists; on failure stop with HINT, which
# says how to provide the file by hand.
fetch() {
    local url="$1" dest="$2" hint="$3"
    if [[ -s "$dest" ]]; then
        log "already downloaded: $dest"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    log "downloading $url -> $dest"
    local ok=0
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 2 --connect-timeout 20 -o "$dest.part" "$url" && ok=1
    elif command -v wget >/dev/null 2>&1; then
        wget -q --tries=2 --timeout=20 -O "$dest.part" "$url" && ok=1
    else
        die "neither curl nor wget is installed, so $url cannot be downloaded. $hint"
    fi
    if (( ! ok )); then
        rm -f "$dest.part"
        die "could not download $url (no network, or the server is unreachable). $hint"
    fi
    mv "$dest.part" "$dest"
}

# extract ARCHIVE DIR: unpack a .tgz/.tar.gz/.tar/.zip archive into DIR (skipped when DIR exists).
extract() {
    local archive="$1" dir="$2"
    if [[ -d "$dir" ]]; then
        log "already extracted: $dir"
        return
    fi
    log "extracting $archive -> $dir"
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    case "$archive" in
        *.zip) "$PYTHON" -m zipfile -e "$archive" "$dir.tmp" ;;
        *) tar -xf "$archive" -C "$dir.tmp" ;;
    esac || { rm -rf "$dir.tmp"; die "$archive is not a readable archive (an interrupted download, or an HTML error page?); delete it and retry"; }
    mv "$dir.tmp" "$dir"
}

# obtain_archive VAR URL DEST HINT: the archive named by the environment variable VAR when set
# (it must exist), else URL downloaded to DEST. Sets ARCHIVE for the caller.
# shellcheck disable=SC2034
obtain_archive() {
    local var="$1" url="$2" dest="$3" hint="$4"
    if [[ -n "${!var:-}" ]]; then
        [[ -f "${!var}" ]] || die "$var=${!var} does not exist"
        log "using local archive $var=${!var} (no download)"
        ARCHIVE="${!var}"
    else
        fetch "$url" "$dest" "$hint"
        ARCHIVE="$dest"
    fi
}

# find_file DIR NAME...: the first file under DIR (recursively) called one of NAMEs; dies if none.
find_file() {
    local dir="$1" name found
    shift
    for name in "$@"; do
        found="$(find -L "$dir" -type f -name "$name" 2>/dev/null | sort | head -n 1)"
        if [[ -n "$found" ]]; then
            echo "$found"
            return
        fi
    done
    die "none of [$*] found under $dir"
}

# ---------------------------------------------------------------------------------- processing

# tokenize_files LANG FLAGS IN OUT [IN OUT ...]: Moses-tokenize files in one Python process (sacremoses
# takes half a second to import); FLAGS is a string of textprep tokenize flags, e.g. "--lowercase" or "".
# Files whose OUT exists are skipped.
tokenize_files() {
    local lang="$1" flags="$2" pending=() outs=() out
    shift 2
    while (( $# )); do
        if done_all "$2"; then
            log "tokenized already: $2"
        else
            pending+=("$1" "$2.tmp")
            outs+=("$2")
        fi
        shift 2
    done
    (( ${#outs[@]} )) || return 0
    # shellcheck disable=SC2086
    textprep tokenize --lang "$lang" --workers "$WORKERS" $flags "${pending[@]}"
    for out in "${outs[@]}"; do
        mv "$out.tmp" "$out"
    done
}

# bpe_and_binarize DIR SRC TGT MERGES MAX_SUBWORDS DICT_FLAGS...
#   DIR/tok/{train,valid,test}.{SRC,TGT} (tokenized) -> joint BPE codes DIR/bpe/code learned on
#   train (both languages), DIR/bpe/{train,valid,test}.{SRC,TGT}, training pairs longer than
#   MAX_SUBWORDS subwords dropped (valid/test are kept whole), then fairseq-preprocess into
#   DIR/data-bin with the remaining arguments (e.g. --joined-dictionary). Each part is skipped
#   when its outputs exist.
bpe_and_binarize() {
    local dir="$1" src="$2" tgt="$3" merges="$4" max_len="$5"
    shift 5
    local tok="$dir/tok" bpe="$dir/bpe" bin="$dir/data-bin" split lang
    mkdir -p "$bpe"
    if done_all "$bpe/code"; then
        log "BPE codes exist: $bpe/code"
    else
        log "learning $merges joint BPE merges on $tok/train.{$src,$tgt}"
        textprep bpe --codes "$bpe/code.tmp" --merges "$merges" --learn "$tok/train.$src" "$tok/train.$tgt"
        mv "$bpe/code.tmp" "$bpe/code"
    fi
    local pending=() outs=() out
    for split in train valid test; do
        for lang in "$src" "$tgt"; do
            out="$bpe/$split.$lang"
            [[ "$split" == train ]] && out="$bpe/train.all.$lang"
            if done_all "$out"; then
                log "BPE applied already: $out"
            else
                pending+=("$tok/$split.$lang:$out.tmp")
                outs+=("$out")
            fi
        done
    done
    if (( ${#outs[@]} )); then
        textprep bpe --codes "$bpe/code" --workers "$WORKERS" --apply "${pending[@]}"
        for out in "${outs[@]}"; do
            mv "$out.tmp" "$out"
        done
    fi
    if done_all "$bpe/train.$src" "$bpe/train.$tgt"; then
        log "length-filtered training data exists: $bpe/train.{$src,$tgt}"
    else
        log "dropping training pairs longer than $max_len subwords"
        textprep clean --min-len 1 --max-len "$max_len" --ratio 0 \
            "$bpe/train.all.$src" "$bpe/train.all.$tgt" "$bpe/train.$src.tmp" "$bpe/train.$tgt.tmp"
        mv "$bpe/train.$src.tmp" "$bpe/train.$src"
        mv "$bpe/train.$tgt.tmp" "$bpe/train.$tgt"
    fi
    binarize "$bin" "$bpe/train" "$bpe/valid" "$bpe/test" --source-lang "$src" --target-lang "$tgt" "$@"
}

# check_text_files TRAIN_PREFIX VALID_PREFIX TEST_PREFIX FAIRSEQ_PREPROCESS_FLAGS...: run `textprep check` on
# the files fairseq-preprocess is about to read, and stop, each bad FILE:LINE named, on what fairseq would
# binarize or train on wrongly without a word: invalid UTF-8, a \r inside a line, parallel files of different
# lengths, empty lines (allowed in language-model text, where they separate paragraphs), parallel lines longer
# than MAX_POSITIONS - 1 tokens (default 1024, fairseq's --max-source-positions). Tokens of valid/test that
# never occur in train (they become <unk>) are warnings. DATA_CHECK=warn reports all this and goes on.
check_text_files() {
    local train="$1" valid="$2" test="$3" src="" tgt="" joined=() flags=() files=() prefix
    shift 3
    while (( $# )); do
        case "$1" in
            --source-lang) src="${2:-}"; shift ;;
            --target-lang) tgt="${2:-}"; shift ;;
            --joined-dictionary) joined=(--joined) ;;
        esac
        (( $# )) && shift
    done
    if [[ -n "$tgt" ]]; then
        for prefix in "$train" "$valid" "$test"; do
            files+=("$prefix.$src" "$prefix.$tgt")
        done
        flags=(--parallel --max-positions "${MAX_POSITIONS:-1024}")
    else
        for prefix in "$train" "$valid" "$test"; do
            files+=("$prefix${src:+.$src}")
        done
        flags=(--allow-empty)
    fi
    log "checking ${files[*]}"
    if ! textprep check "${flags[@]}" --vocab-from-first "${joined[@]}" "${files[@]}"; then
        [[ "${DATA_CHECK:-error}" == warn ]] \
            || die "fix the lines named above before binarizing (DATA_CHECK=warn binarizes anyway)"
        log "DATA_CHECK=warn: binarizing despite the problems above"
    fi
}

# binarize BIN_DIR TRAIN_PREFIX VALID_PREFIX TEST_PREFIX FAIRSEQ_PREPROCESS_FLAGS...: check the text files
# (check_text_files), then fairseq-preprocess into BIN_DIR (skipped when BIN_DIR/preprocess.log exists, which
# fairseq writes last).
binarize() {
    local bin="$1" train="$2" valid="$3" test="$4"
    shift 4
    if done_all "$bin/preprocess.log"; then
        log "binarized already: $bin"
        return
    fi
    check_text_files "$train" "$valid" "$test" "$@"
    local preprocess
    preprocess="$(fairseq_tool fairseq-preprocess)"
    log "binarizing $train, $valid, $test -> $bin"
    rm -rf "$bin.tmp"
    "$preprocess" --trainpref "$train" --validpref "$valid" --testpref "$test" \
        --destdir "$bin.tmp" --workers "$WORKERS" "$@"
    rm -rf "$bin"
    mv "$bin.tmp" "$bin"
}

# corpus_stats DIR FILE...: line and token counts of text files, one line each.
corpus_stats() {
    local dir="$1" f
    shift
    for f in "$@"; do
        [[ -f "$dir/$f" ]] && printf '  %-28s %9d lines %11d tokens\n' "$f" \
            "$(wc -l < "$dir/$f")" "$(wc -w < "$dir/$f")"
    done
    return 0
}

# ------------------------------------------------------------------------------- train / eval

# train_seq2seq DATA_BIN SAVE_DIR SRC TGT ARCH [fairseq-train flags...]
# group_rnnsearch with the paper's training recipe (section 4.2): Adadelta, learning rate 1.0,
# halved when the validation loss does not improve. The caller passes batch size and clipping.
# Environment: NUM_GROUPS (2), MAX_EPOCH (50), MAX_UPDATE (0: no limit), SEED (1),
#   OPTIMIZER_FLAGS (replaces the Adadelta flags), SCHEDULER_FLAGS (replaces the halving on plateaus),
#   CRITERION_FLAGS (default --criterion cross_entropy), EXTRA (more fairseq-train flags, word-split).
train_seq2seq() {
    local bin="$1" save="$2" src="$3" tgt="$4" arch="$5"
    shift 5
    local groups="${NUM_GROUPS:-2}"
    [[ -s "$bin/dict.$src.txt" ]] || die "no binarized data in $bin: run the matching scripts/prepare-*.sh first"
    # rho 0.95, eps 1e-6: Zeiler (2012)'s values (fairseq's default rho is 0.9)
    local optimizer="${OPTIMIZER_FLAGS:---optimizer adadelta --lr 1.0 --adadelta-rho 0.95 --adadelta-eps 1e-6}"
    local criterion="${CRITERION_FLAGS:---criterion cross_entropy}"
    local scheduler="${SCHEDULER_FLAGS:---lr-scheduler reduce_lr_on_plateau --lr-shrink 0.5 --stop-min-lr 1e-5}"
    local train
    train="$(fairseq_tool fairseq-train)"
    mkdir -p "$save"
    log "training $arch, $groups groups, on $bin -> $save"
    # shellcheck disable=SC2086
    "$train" "$bin" --user-dir "$GRNN_USER_DIR" --task translation --source-lang "$src" --target-lang "$tgt" \
        --arch "$arch" --encoder-groups "$groups" --decoder-groups "$groups" \
        $optimizer $scheduler $criterion --required-batch-size-multiple 1 \
        --max-epoch "${MAX_EPOCH:-50}" --max-update "${MAX_UPDATE:-0}" --seed "${SEED:-1}" \
        --save-dir "$save" --no-epoch-checkpoints --log-format simple --log-interval 100 \
        "$@" ${EXTRA:-}
}

# generate_test DATA SAVE_DIR SRC TGT BEAM [fairseq-generate flags...]
# Decode DATA/data-bin's test split with SAVE_DIR/checkpoint_best.pt (or $CHECKPOINT), BPE removed,
# every sentence kept (--required-batch-size-multiple 1), then write OUT.{hyp,src,ref} in sentence
# order, OUT=SAVE_DIR/test-beamBEAM. Sets GEN_OUT=OUT.
generate_test() {
    local data="$1" save="$2" src="$3" tgt="$4" beam="$5"
    shift 5
    local ckpt="${CHECKPOINT:-$save/checkpoint_best.pt}"
    [[ -f "$ckpt" ]] || die "no checkpoint $ckpt: train first (or set CHECKPOINT)"
    local generate
    generate="$(fairseq_tool fairseq-generate)"
    GEN_OUT="$save/test-beam$beam"
    log "decoding $data/data-bin test with $ckpt, beam $beam -> $GEN_OUT.log"
    "$generate" "$data/data-bin" --user-dir "$GRNN_USER_DIR" --task translation \
        --source-lang "$src" --target-lang "$tgt" --path "$ckpt" --gen-subset test \
        --beam "$beam" --remove-bpe --batch-size "${EVAL_BATCH_SIZE:-64}" --required-batch-size-multiple 1 \
        --num-workers 0 "$@" > "$GEN_OUT.log" 2>&1 \
        || { tail -n 20 "$GEN_OUT.log" >&2; die "fairseq-generate failed (log: $GEN_OUT.log)"; }
    textprep gen-extract "$GEN_OUT.log" "$GEN_OUT" --expect "$(wc -l < "$data/tok/test.$tgt")"
}

# bleu_scores DATA TGT OUT [sacrebleu flags for the detokenized score, e.g. -lc]
# Prints tokenized case-sensitive BLEU of OUT.hyp against DATA/tok/test.TGT (multi-bleu.perl's
# convention, the paper's metric: sacreBLEU with --tokenize none on tokenized text) and sacreBLEU of
# the detokenized OUT.hyp against the untokenized references DATA/plain/test.TGT.
bleu_scores() {
    local data="$1" tgt="$2" out="$3"
    shift 3
    local tok_bleu sacre
    tok_bleu="$("$PYTHON" -m sacrebleu "$data/tok/test.$tgt" -i "$out.hyp" --tokenize none --force -b -w 2)"
    textprep detokenize --lang "$tgt" "$out.hyp" "$out.detok"
    sacre="$("$PYTHON" -m sacrebleu "$data/plain/test.$tgt" -i "$out.detok" -w 2 -f text "$@")"
    log "tokenized BLEU (multi-bleu convention): $tok_bleu"
    log "sacreBLEU (detokenized): $sacre"
}

# show_samples OUT N: the first N test sentences as source / reference / hypothesis.
show_samples() {
    local out="$1" n="$2" i
    for (( i = 1; i <= n; i++ )); do
        [[ -n "$(sed -n "${i}p" "$out.src")" ]] || break
        echo "  source:     $(sed -n "${i}p" "$out.src")"
        echo "  reference:  $(sed -n "${i}p" "$out.ref")"
        echo "  hypothesis: $(sed -n "${i}p" "$out.hyp")"
        echo
    done
}
