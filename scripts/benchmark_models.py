#!/usr/bin/env python
"""Whole-model training speed: fairseq-train words per second of group_rnnsearch_iwslt against fairseq's own
LSTM translation model (lstm_wiseman_iwslt_de_en) on the same data, measured side by side in one run.

    python scripts/benchmark_models.py [DATA_BIN] [--batching batch-size max-tokens] [--updates 120]
        [--rounds 2] [--threads 1] [--json docs/benchmark-models.json]

Every candidate trains --updates updates from scratch (no validation, no checkpoints, Adam) with its default
settings (ours: no --grnn-* flag, so the backend's deterministic defaults). Two ways of batching, each a table: ``--batch-size 32`` (the paper's De-En
minibatch) and ``--max-tokens 4000`` (fairseq's usual batching, batches of about 250 short sentences).
A candidate's speed is the mean train_inner wps after the first --warmup-updates (40: two logging
intervals), which hold one-time costs (allocator warm-up, packing, any kernel measurement). The candidates
run round-robin --rounds times and the median per candidate is reported, so that load from elsewhere hits all
of them alike. Each run's peak resident memory is read from the kernel (``wait4``), and the CPU is recorded.

fairseq's model is given our sizes as far as its flags allow: a bidirectional 2-layer encoder of 256 per
direction and a 2-layer decoder, either 256 wide (lighter than our first decoder layer) or 512 wide (heavier
than our upper decoder layer).

Our models are the named architecture as the paper sizes it (its decoder: additive attention, upper decoder
layer d wide); ``--models`` also takes the translation recipe's (the decoder flags of
scripts/translation_report.py: Luong's attention, a residual upper layer 2d wide), which the README trains:

    python scripts/benchmark_models.py --models "fairseq lstm_wiseman_iwslt_de_en, decoder 256" \
        "fairseq lstm_wiseman_iwslt_de_en, decoder 512" "group_rnnsearch_iwslt, groups 1, translation recipe" \
        "group_rnnsearch_iwslt, groups 2, translation recipe" "group_rnnsearch_iwslt, groups 4, translation recipe"

``--products onednn`` (or ``aten``) passes ``--grnn-products`` to our models instead of their default: on a CPU
where the default rule picks aten's BLAS, it shows the oneDNN path's speed too.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BASE_ENV = dict(os.environ)  # before importing grnn_fairseq, which sizes oneDNN's caches for this process
sys.path.insert(0, ROOT)
from grnn_fairseq.benchmark import processor_name  # noqa: E402
from translation_report import OURS  # noqa: E402  (scripts/: the translation recipe's decoder flags)

FAIRSEQ_SIZES = ["--encoder-bidirectional", "--encoder-layers", "2", "--encoder-hidden-size", "256", "--decoder-layers", "2"]
CANDIDATES = {
    "fairseq lstm_wiseman_iwslt_de_en, decoder 256": ["--arch", "lstm_wiseman_iwslt_de_en", *FAIRSEQ_SIZES,
                                                       "--decoder-hidden-size", "256"],
    "fairseq lstm_wiseman_iwslt_de_en, decoder 512": ["--arch", "lstm_wiseman_iwslt_de_en", *FAIRSEQ_SIZES,
                                                       "--decoder-hidden-size", "512"],
    "group_rnnsearch_iwslt, groups 1": ["--arch", "group_rnnsearch_iwslt", "--encoder-groups", "1", "--decoder-groups", "1"],
    "group_rnnsearch_iwslt, groups 2": ["--arch", "group_rnnsearch_iwslt", "--encoder-groups", "2", "--decoder-groups", "2"],
    "group_rnnsearch_iwslt, groups 4": ["--arch", "group_rnnsearch_iwslt", "--encoder-groups", "4", "--decoder-groups", "4"],
}
DEFAULT_MODELS = list(CANDIDATES)  # fairseq's and the paper's models
for k in (1, 2, 4):  # the translation recipe's models (docs/translation.md), by name only: --models
    CANDIDATES[f"group_rnnsearch_iwslt, groups {k}, translation recipe"] = [
        *CANDIDATES[f"group_rnnsearch_iwslt, groups {k}"], *OURS]
BASELINES = ["fairseq lstm_wiseman_iwslt_de_en, decoder 256", "fairseq lstm_wiseman_iwslt_de_en, decoder 512"]
BATCHING = {"batch-size": ["--batch-size", "32"], "max-tokens": ["--max-tokens", "4000"]}
# what every candidate trains with beside its model flags and batching (scripts/profile_model.py's too)
RECIPE = ["--task", "translation", "--optimizer", "adam", "--lr", "0.001", "--clip-norm", "2.5", "--num-workers",
          "0", "--seed", "1", "--required-batch-size-multiple", "1"]  # fmt: skip
LOG_INTERVAL = 20


def run_measured(cmd, env, interval: float = 0.1):
    """Run ``cmd``; returns (exit code, stdout and stderr, peak resident memory of that process in MiB).

    The peak is the kernel's high-water mark of the process's own memory (VmHWM in /proc/PID/status), read while
    it runs: the exit status's ru_maxrss would also count the pages of this process that fork copied."""
    peak_kib = 0
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak_kib = max([peak_kib] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
            except (OSError, ValueError):
                pass
            time.sleep(interval)
        log.seek(0)
        return proc.returncode, log.read(), peak_kib / 1024


def candidate_env(threads):
    """The environment of one run: this one as started (each run's own grnn_fairseq import sets what it sets) with
    the thread count of --threads."""
    return {**BASE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def candidate_flags(name, products):
    """A candidate's fairseq-train flags; for ours with --products, the --grnn-products flag."""
    flags = list(CANDIDATES[name])
    if products and not name.startswith("fairseq"):
        flags += ["--grnn-products", products]
    return flags


def words_per_second(data, flags, batching, updates, warmup, env):
    cmd = [os.path.join(BIN, "fairseq-train"), data, "--user-dir", os.path.join(ROOT, "grnn_fairseq"), *RECIPE,
           *flags, *BATCHING[batching], "--max-update", str(updates), "--disable-validation", "--no-save",
           "--log-format", "simple", "--log-interval", str(LOG_INTERVAL)]  # fmt: skip
    code, log, peak_mib = run_measured(cmd, env)
    if code != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log[-3000:]}")
    wps, params = speed_from_log(log, warmup)
    return wps, params, peak_mib


def speed_from_log(log: str, warmup: int):
    """(mean words per second of the train_inner lines after ``warmup`` updates, model parameters)."""
    wps = [float(x) for x in re.findall(r"train_inner .*?wps=([\d.]+)", log)][warmup // LOG_INTERVAL :]
    if not wps:
        raise SystemExit(f"no logging interval after the {warmup} warm-up updates: raise --updates")
    params = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
    return sum(wps) / len(wps), params


def baseline_ratios(speeds: Dict[str, float]) -> Dict[str, List[Optional[float]]]:
    """Each candidate's speed against each of fairseq's models (BASELINES); None where that one did not run."""
    return {name: [None if b not in speeds else speed / speeds[b] for b in BASELINES] for name, speed in speeds.items()}


def markdown_table(title: str, columns: List[str], rows) -> str:
    """A table of ``columns`` and then one ratio column per fairseq model; rows: (cells, ratios) each."""
    columns = ["model", *columns] + [f"vs fairseq, {b.split(', ')[-1]}" for b in BASELINES]
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells, ratios in rows:
        lines.append("| " + " | ".join([*cells, *("-" if x is None else f"{x:.2f}x" for x in ratios)]) + " |")
    return "\n".join(lines)


def table(rows, batching):
    """The markdown table of one batching mode."""
    cells = [[r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['wps']:.0f}", f"{r['peak_rss_mib']:.0f} MiB"] for r in rows]
    title = f"{BATCHING[batching][0]} {BATCHING[batching][1]}:"
    return markdown_table(title, ["params", "words/s", "peak RSS"], zip(cells, [r["ratios"] for r in rows]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="data/ding-de-en/data-bin")
    p.add_argument("--batching", nargs="+", choices=list(BATCHING), default=list(BATCHING))
    p.add_argument("--updates", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (default 1)")
    p.add_argument("--warmup-updates", type=int, default=40,
                   help=f"updates left out of the speed (a multiple of {LOG_INTERVAL})")
    p.add_argument("--products", choices=["aten", "onednn"], help="our models' --grnn-products")
    p.add_argument("--models", nargs="+", choices=list(CANDIDATES), default=DEFAULT_MODELS, metavar="MODEL",
                   help="default: fairseq's two and the paper's three; the translation recipe's: by name")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cpu = processor_name(None)
    print(f"CPU: {cpu}, {args.threads} thread(s)", flush=True)
    results = {}
    for batching in args.batching:
        runs = {name: [] for name in args.models}
        params, peak = {}, {name: 0.0 for name in args.models}
        for r in range(args.rounds):
            for name in args.models:
                wps, params[name], mib = words_per_second(args.data, candidate_flags(name, args.products), batching,
                                                          args.updates, args.warmup_updates, candidate_env(args.threads))  # fmt: skip
                runs[name].append(wps)
                peak[name] = max(peak[name], mib)
                print(f"{batching}, round {r + 1}: {name}: {wps:.0f} wps, peak RSS {mib:.0f} MiB", flush=True)
        wps = {name: statistics.median(runs[name]) for name in args.models}
        ratios = baseline_ratios(wps)
        rows = [{"model": name, "params": params[name], "wps": wps[name], "ratios": ratios[name], "runs": runs[name],
                 "peak_rss_mib": peak[name]} for name in args.models]  # fmt: skip
        results[batching] = rows
        print("\n" + table(rows, batching) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "processor": cpu, "batching": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
