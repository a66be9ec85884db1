#!/usr/bin/env bash
# The GPU checks of the Triton step in one run, sized for a fresh H100/H200 machine (under 9 minutes):
#
#   1. the CUDA parity tests: pytest -m cuda on the test files that hold them, but the persistent loops'
#   2. the persistent loops' CUDA tests (--grnn-persistent-loops), apart under a short timeout: a grid barrier
#      that never opens hangs; the stages below leave the persistent loops out unless these passed
#   3. python -m grnn_fairseq.benchmark --device cuda: Triton eager, with its loop graphs (--grnn-cuda-graphs)
#      and with the persistent loops, the whole call captured as a CUDA graph, the PyTorch-ops step, cuDNN's
#      nn.LSTM and FlashRNN (when its wheel is here) over the default grid, CUDA events, JSON and PNG; the
#      issue's target configuration (hidden 1024, bfloat16, T 35, B 64) and its float32 twin first, FlashRNN
#      there only (FlashRNN 1.0.8's bfloat16 backward does not compile under Triton 3.6: forward only), the
#      configurations the time budget leaves out listed in the JSON
#   4. UPDATES (200) updates of fairseq-train --bf16 on Ding De-En with scripts/benchmark_models.py's recipe
#      (Adam, --max-tokens 4000): fairseq's lstm_wiseman_iwslt_de_en (its sizes, decoder 512),
#      group_rnnsearch_iwslt with 4 groups and the translation recipe's decoder flags (OURS of
#      scripts/translation_report.py), and the same with --grnn-persistent-loops, words per second, one run
#      each (fairseq 0.12 reads --bf16 as --tpu; the plugin keeps it on the GPU where there is no torch_xla:
#      grnn_fairseq/safeguards.py). fairseq needs numpy < 2: where the machine's compiled packages refuse
#      numpy 1, its numpy 2 runs with numpy.compat.long put back.
#   5. in the time the stages above leave, scripts/profile_model.py on groups 4 (with the persistent loops when
#      their tests passed) and fairseq's LSTM as trained in 4 (10 updates each, --bf16): the host's time in the
#      update's forward, backward and optimizer, its waits for the GPU, kernels and launch calls per update, the
#      GPU's busy time against the wall time, the top kernels
#
# What it writes lands in $OUT (default ./gpu-check-out), 11 files: gpu-check.log (all output), pytest-cuda.xml,
# pytest-cuda-persistent.xml, bench-cuda.json, bench-cuda.png, train-lstm.log, train-group4.log,
# train-group4-persistent.log, profile-group4.txt, profile-lstm.txt, summary.json; a short summary is printed
# last. Every stage runs whatever the stages before it gave; the exit status is 1 if any of them failed.
#
# Usage:
#   bash scripts/gpu-check.sh --prepare   with internet, once: the Python 3.12 x86-64 wheels the GPU machine
#                                         lacks into WHEELS (ve-fairseq, numpy<2 for fairseq, hydra-core,
#                                         omegaconf, antlr4, bitarray, flashrnn; 38 MB), and a check of DATA
#   bash scripts/gpu-check.sh             on the GPU machine (the device tool: carry .whl and
#                                         data/ding-de-en/data-bin, timeout_s 600)
#
# On the GPU machine (python3 3.12 with CUDA torch and triton, no internet) the tests and the benchmark run in
# its own environment with this checkout on PYTHONPATH (FlashRNN's wheel added for the benchmark), fairseq-train
# with the other wheels in front (fairseq needs numpy < 2). Without a CUDA GPU it says so and runs nothing.
#
# Time: every stage's timeout fits in BUDGET seconds from the start: the tests up to 110 s, the persistent
# loops' up to 60 s, the benchmark up to 170 s (no configuration started in its last 90 s, since the first
# ones compile Triton's kernels; its JSON and PNG are written after every configuration), each training run up
# to 80 s; then each profile up to 30 s in what is left (none started with less than 20 s).
#
# Environment: PYTHON (python3), OUT, DATA (data/ding-de-en/data-bin), WHEELS (.whl), BUDGET (520),
#   BENCH_REPEATS (10), UPDATES (200), STAGES (tests benchmark train profile: the stages to run)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu-check-out}"
DATA="${DATA:-data/ding-de-en/data-bin}"
WHEELS="${WHEELS:-.whl}"
BUDGET="${BUDGET:-520}"
BENCH_REPEATS="${BENCH_REPEATS:-10}"
UPDATES="${UPDATES:-200}"
STAGES="${STAGES:-tests benchmark train profile}"
SITE=/tmp/gpu-check-site  # fairseq and its needs, for the training runs
NUMPY1=/tmp/gpu-check-numpy1  # numpy < 2 for fairseq 0.12 (numpy.compat)
SHIM=/tmp/gpu-check-shim  # else: the machine's numpy with numpy.compat.long put back (sitecustomize.py)
FLASH=/tmp/gpu-check-flash  # FlashRNN, for the benchmark
STAGE_NAMES=(tests persistent benchmark train-lstm train-group4 train-group4-persistent profile-group4
             profile-lstm)  # the summary's, exit's

log() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }
die() { echo "[gpu-check] ERROR: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ --prepare
prepare() {
    local platforms=() p spec name
    mkdir -p "$WHEELS"
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    for spec in ve-fairseq==0.12.3 numpy==1.26.4 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3 \
                flashrnn==1.0.8; do
        name="${spec%%==*}"
        if compgen -G "$WHEELS/${name//-/_}-*.whl" >/dev/null; then
            log "have $spec"
            continue
        fi
        log "downloading $spec (Python 3.12, x86-64)"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$WHEELS" "$spec"
    done
    if ! compgen -G "$WHEELS/antlr4_python3_runtime-*.whl" >/dev/null; then
        log "building antlr4-python3-runtime==4.9.3 (hydra-core's parser; PyPI has its source only)"
        "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
    fi
    log "wheels: $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
    if [[ -f "$DATA/dict.de.txt" ]]; then
        log "data: $DATA ($(du -sh "$DATA" | cut -f1))"
    else
        log "no $DATA: run bash scripts/prepare-ding-de-en.sh first"
    fi
    log "ready: run bash scripts/gpu-check.sh on the GPU machine with $WHEELS and $DATA beside this checkout"
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit 0
fi
[[ $# -eq 0 ]] || die "unknown argument $1 (usage: bash scripts/gpu-check.sh [--prepare])"

# ------------------------------------------------------------------------------------------- on the GPU
command -v "$PYTHON" >/dev/null || die "no $PYTHON: set PYTHON to an interpreter with torch"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    seen="$("$PYTHON" -c 'import torch; print("torch", torch.__version__, "sees none")' 2>&1 | tail -n 1)"
    echo "[gpu-check] no CUDA GPU here ($seen): these checks need one; run this script on a GPU machine" \
         "(the device tool). Nothing was run." >&2
    exit 1
fi
mkdir -p "$OUT"
start=$(date +%s)
deadline=$(( start + BUDGET ))
declare -A RC SECONDS_OF

limit() {  # limit CAP RESERVE: seconds for the next stage, at most CAP, leaving RESERVE for the stages after it
    local left=$(( deadline - $(date +%s) - $2 ))
    (( left < 10 )) && left=10
    echo $(( $1 < left ? $1 : left ))
}

stage() {  # stage NAME COMMAND...: run it, record its exit status and seconds; never stops the script
    local name="$1" t0 rc=0
    shift
    t0=$(date +%s)
    log "== $name: $*"
    "$@" || rc=$?
    RC[$name]=$rc
    SECONDS_OF[$name]=$(( $(date +%s) - t0 ))
    log "== $name: exit $rc in ${SECONDS_OF[$name]} s"
}

install_wheels() {
    local w fairseq_wheels=()
    rm -rf "$SITE" "$FLASH" "$NUMPY1"
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        log "no wheels in $WHEELS (bash scripts/gpu-check.sh --prepare): no FlashRNN rows, and fairseq-train" \
            "runs only if the machine has fairseq"
        return 0
    fi
    for w in "$WHEELS"/*.whl; do
        case "$(basename "$w")" in
            flashrnn-*) "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                            --target "$FLASH" "$w" ;;
            numpy-*) "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                         --target "$NUMPY1" "$w" ;;
            *) fairseq_wheels+=("$w") ;;
        esac
    done
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "${fairseq_wheels[@]}"
    log "installed: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
}

fairseq_path() {  # the PYTHONPATH under which fairseq-train and the plugin import, into FAIRSEQ_PATH
    local check="import fairseq_cli.train, numpy; import grnn_fairseq.models; print('fairseq imports, numpy', numpy.__version__)"
    FAIRSEQ_PATH="$NUMPY1:$SITE:$BASE_PATH"
    env PYTHONPATH="$FAIRSEQ_PATH" "$PYTHON" -c "$check" 2>&1 | tail -n 3 && return 0
    # The machine's compiled packages (scipy, scikit-learn) may need numpy 2: keep its numpy and give back the
    # one name fairseq 0.12's translation data reads from numpy 1 (numpy.compat.long).
    log "fairseq does not import with numpy < 2; trying the machine's numpy with numpy.compat.long"
    mkdir -p "$SHIM"
    printf '%s\n' "import types, numpy" "if not hasattr(numpy, 'compat'):" \
        "    numpy.compat = types.SimpleNamespace(long=numpy.int64)" > "$SHIM/sitecustomize.py"
    FAIRSEQ_PATH="$SHIM:$SITE:$BASE_PATH"
    env PYTHONPATH="$FAIRSEQ_PATH" "$PYTHON" -c "$check" 2>&1 | tail -n 3
}

train() {  # train NAME RESERVE ARCH-FLAGS...: one fairseq-train run, its log in $OUT/train-NAME.log
    local name="$1" reserve="$2"
    shift 2
    env PYTHONPATH="$FAIRSEQ_PATH" timeout "$(limit 80 "$reserve")" "$PYTHON" -m fairseq_cli.train \
        "$DATA" --user-dir "$ROOT/grnn_fairseq" "${RECIPE[@]}" --bf16 --max-update "$UPDATES" \
        --disable-validation --no-save --log-format simple --log-interval 20 "$@" > "$OUT/train-$name.log" 2>&1 \
        || { tail -n 25 "$OUT/train-$name.log"; return 1; }
    grep -E "num. shared model params|train_inner" "$OUT/train-$name.log" | tail -n 3
}

profile() {  # profile NAME RESERVE ARCH-FLAGS...: scripts/profile_model.py on the training runs' recipe
    local name="$1" reserve="$2"
    shift 2
    (( deadline - $(date +%s) - reserve >= 20 )) || { log "too little time left: no profile of $name"; return 0; }
    env PYTHONPATH="$FAIRSEQ_PATH" timeout "$(limit 30 "$reserve")" "$PYTHON" "$ROOT/scripts/profile_model.py" \
        "$DATA" --updates 10 --warmup 10 --rows 30 -- --bf16 "$@" > "$OUT/profile-$name.txt" 2>&1 \
        || { tail -n 25 "$OUT/profile-$name.txt"; return 1; }
    grep -E "words/s under|^per update|^host ms per update" "$OUT/profile-$name.txt"
}

summarize() {  # the targets read from the benchmark's JSON and the training logs, into summary.json
    local stages="" name
    for name in "${STAGE_NAMES[@]}"; do
        stages+="\"$name\": {\"exit\": \"${RC[$name]:-not run}\", \"seconds\": ${SECONDS_OF[$name]:-0}}, "
    done
    "$PYTHON" - "$OUT" "{${stages%, }}" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, re, statistics, sys

out, stages, seconds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
summary = {"stages": stages, "seconds": seconds}
try:
    with open(os.path.join(out, "bench-cuda.json")) as f:
        bench = json.load(f)

    def config_rows(dtype):  # hidden 1024, T 35, B 64 in dtype: {K (None: cuDNN): {path: row}}
        by_k = {}
        for r in bench["rows"]:
            if (r["hidden"], r["dtype"], r["seq_len"], r["batch"]) == (1024, dtype, 35, 64):
                by_k.setdefault(r["K"], {})[r["path"]] = r
        return by_k

    ms = {K: {p: r["fwd_bwd_ms"] for p, r in paths.items()} for K, paths in config_rows("bfloat16").items()}
    cudnn = ms.get(None, {}).get("cudnn")
    targets = {1: 0.7, 2: 1.3, 4: 2.0}  # forward + backward speed over cuDNN's
    groups = []
    for K in sorted(k for k in ms if k is not None):
        t = ms[K]
        flash, ours = t.get("flashrnn"), t.get("triton")
        groups.append({"K": K, "fwd_bwd_ms": t, "x_cudnn": {p: cudnn / v if cudnn and v else None for p, v in t.items()},
                       "target_x_cudnn": targets.get(K), "triton_x_flashrnn": flash / ours if flash and ours else None})
    summary["target_config"] = {"hidden": 1024, "dtype": "bfloat16", "seq_len": 35, "batch": 64, "cudnn_ms": cudnn,
                                "groups": groups, "not_timed": bench["config"]["skipped"] + bench["config"]["pending"]}
    flash = []  # FlashRNN (G-LSTM) at the same width, in the target configuration and its float32 twin
    for dtype in ("bfloat16", "float32"):
        for K, paths in sorted((k, v) for k, v in config_rows(dtype).items() if "flashrnn" in v):
            times = {mode: {p: r[f"{mode}_ms"] for p, r in paths.items()} for mode in ("fwd", "fwd_bwd")}
            flash.append({"dtype": dtype, "K": K, "units_per_head": 1024 // K, "ms": times,
                          "flashrnn_error": paths["flashrnn"].get("error")})
    summary["flashrnn"] = flash
except (OSError, ValueError, KeyError) as e:
    summary["target_config"] = f"no benchmark result: {e!r}"
wps = {}
for name in ("lstm", "group4", "group4-persistent"):
    try:
        with open(os.path.join(out, f"train-{name}.log")) as f:  # mean wps after the first 40 updates
            values = [float(v) for v in re.findall(r"train_inner .*?wps=([\d.]+)", f.read())][2:]
        wps[name] = statistics.mean(values) if values else None
    except OSError:
        wps[name] = None
summary["words_per_second"] = wps
profiles = {}
for name in ("group4", "lstm"):  # the profiles' per-update lines
    try:
        with open(os.path.join(out, f"profile-{name}.txt")) as f:
            profiles[name] = [l.strip() for l in f if "words/s under" in l or l.startswith(("per update", "host ms"))]
    except OSError:
        profiles[name] = None
summary["profile"] = profiles
for name in ("group4", "group4-persistent"):  # target 1.5
    summary[f"{name}_x_lstm"] = wps[name] / wps["lstm"] if wps[name] and wps["lstm"] else None
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)

x = lambda v: "-" if v is None else f"{v:.2f}x"
print(f"\n==== gpu-check summary ({seconds} s) ====")
for name, s in stages.items():
    print(f"{name:<14} exit {s['exit']:<8} {s['seconds']:>4} s")
tc = summary["target_config"]
if isinstance(tc, dict):
    print(f"hidden 1024, bfloat16, T 35, B 64, forward+backward: cuDNN {tc['cudnn_ms']} ms; speed over cuDNN:")
    for g in tc["groups"]:
        r = g["x_cudnn"]
        print(f"  K={g['K']:<3} triton {x(r.get('triton'))}  loop-graphs {x(r.get('loop-graphs'))}  persistent "
              f"{x(r.get('persistent'))} (target {g['target_x_cudnn'] or '-'})  whole-call graph "
              f"{x(r.get('triton-graph'))}  torch-ops {x(r.get('torch-ops'))}  flashrnn {x(r.get('flashrnn'))}")
else:
    print(tc)
for f in summary.get("flashrnn", []):  # our speed over FlashRNN's where it ran (target: at least 1.0x)
    def over(mode, path, ms=f["ms"]):
        flash, ours = ms[mode].get("flashrnn"), ms[mode].get(path)
        return x(flash / ours if flash and ours else None)

    speeds = [f"{m} triton {over(m, 'triton')} persistent {over(m, 'persistent')}" for m in ("fwd", "fwd_bwd")]
    print(f"FlashRNN, hidden 1024, {f['dtype']}, K={f['K']} ({f['units_per_head']} per head), ours over FlashRNN: "
          + ", ".join(speeds) + (f"; FlashRNN: {f['flashrnn_error']}" if f["flashrnn_error"] else ""))
print(f"fairseq-train --bf16 words/s: lstm_wiseman_iwslt_de_en {wps['lstm']}, group_rnnsearch_iwslt groups 4 "
      f"{wps['group4']}: {x(summary['group4_x_lstm'])}, with --grnn-persistent-loops {wps['group4-persistent']}: "
      f"{x(summary['group4-persistent_x_lstm'])} (target 1.50x)")
for name, lines in profiles.items():
    print(f"profile {name}: {' | '.join(lines) if lines else '-'}")
EOF
}

checks() {
    local bench_s failed=0 name cuda_tests persistent=() bench_persistent=()
    log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?')"
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
          'CUDA', torch.version.cuda, '| triton', triton.__version__)" || log "triton is not importable here"
    install_wheels || log "installing the wheels failed: FlashRNN and fairseq-train may be missing"
    BASE_PATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

    for name in "${STAGE_NAMES[@]}"; do
        RC[$name]=skipped  # until its stage runs
    done
    mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
    if [[ " $STAGES " == *" tests "* ]]; then
        stage tests env PYTHONPATH="$BASE_PATH" timeout "$(limit 110 400)" "$PYTHON" -m pytest -q -m cuda \
            -k "not persistent" -p no:cacheprovider --junitxml "$OUT/pytest-cuda.xml" "${cuda_tests[@]}"
        stage persistent env PYTHONPATH="$BASE_PATH" timeout "$(limit 60 340)" "$PYTHON" -m pytest -q -m cuda \
            -k persistent -p no:cacheprovider --junitxml "$OUT/pytest-cuda-persistent.xml" "${cuda_tests[@]}"
    fi
    if [[ "${RC[persistent]}" == 0 ]]; then
        persistent=(--grnn-persistent-loops)
        bench_persistent=(--persistent)
    else
        log "the persistent loops' tests did not pass here (exit ${RC[persistent]}): the benchmark and training" \
            "leave them out"
    fi

    bench_s=$(limit 170 240)
    if [[ " $STAGES " == *" benchmark "* ]]; then
        stage benchmark env PYTHONPATH="$BASE_PATH:$FLASH" PYTHONUNBUFFERED=1 timeout "$bench_s" "$PYTHON" \
            -m grnn_fairseq.benchmark --device cuda --repeats "$BENCH_REPEATS" --warmup 3 --flashrnn target \
            ${bench_persistent[@]+"${bench_persistent[@]}"} \
            --max-minutes "$(awk -v s="$bench_s" 'BEGIN { printf "%.2f", (s - 90) / 60 }')" \
            --json "$OUT/bench-cuda.json" --png "$OUT/bench-cuda.png"
    fi

    if [[ " $STAGES " =~ " "(train|profile)" " && -f "$DATA/dict.de.txt" ]]; then
        fairseq_path || log "fairseq does not import here: the training runs will fail"
        # a line each: scripts/benchmark_models.py's recipe and max-tokens batching (what profile_model.py trains
        # with) and its fairseq baseline of decoder 512; the translation recipe's model flags (docs/translation.md)
        { read -ra RECIPE; read -ra LSTM; read -ra OURS; } < <("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1])
from benchmark_models import BATCHING, CANDIDATES, RECIPE
from translation_report import OURS
lstm = CANDIDATES["fairseq lstm_wiseman_iwslt_de_en, decoder 512"]
for flags in (RECIPE + BATCHING["max-tokens"], lstm, OURS): print(" ".join(flags))' "$ROOT/scripts")
        [[ ${#RECIPE[@]} -gt 0 ]] || log "scripts/benchmark_models.py's recipe could not be read: the runs will fail"
        GROUP4=(--arch group_rnnsearch_iwslt --encoder-groups 4 --decoder-groups 4 "${OURS[@]}")
        if [[ " $STAGES " == *" train "* ]]; then
            stage train-lstm train lstm 160 "${LSTM[@]}"
            stage train-group4 train group4 80 "${GROUP4[@]}"
            if [[ ${#persistent[@]} -gt 0 ]]; then
                stage train-group4-persistent train group4-persistent 0 "${GROUP4[@]}" "${persistent[@]}"
            fi
        fi
        if [[ " $STAGES " == *" profile "* ]]; then  # in the time the stages above left
            stage profile-group4 profile group4 20 "${GROUP4[@]}" ${persistent[@]+"${persistent[@]}"}
            stage profile-lstm profile lstm 0 "${LSTM[@]}"
        fi
    elif [[ " $STAGES " =~ " "(train|profile)" " ]]; then
        log "no $DATA (bash scripts/prepare-ding-de-en.sh, then carry it): the training runs and profiles are" \
            "skipped"
    fi

    summarize || log "the summary failed"
    for name in "${STAGE_NAMES[@]}"; do
        [[ "${RC[$name]:-}" == 0 || "${RC[$name]:-}" == skipped ]] || failed=1
    done
    return $failed
}

checks 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
