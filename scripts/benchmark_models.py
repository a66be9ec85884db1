#!/usr/bin/env python
"""Whole-model training speed: fairseq-train words per second of group_rnnsearch_iwslt against fairseq's own
LSTM translation model (lstm_wiseman_iwslt_de_en) on the same data, measured in one run.

    python scripts/benchmark_models.py [DATA_BIN] [--updates 120] [--rounds 2] [--json docs/benchmark-models.json]

Every candidate trains --updates updates from scratch (no validation, no checkpoints, batch 32 sentences,
Adam); its speed is the mean train_inner wps after the first --warmup-updates (40: two logging intervals),
which hold one-time costs: allocator warm-up, and for ours the measurement of each product shape's faster
kernel (``onednn_faster``, about 3 s in all, spread over the first tens of updates as new batch shapes come). The candidates
run round-robin --rounds times and the median per candidate is reported, so that load from elsewhere hits
all of them alike. fairseq's model is given our sizes as far as its flags allow: a bidirectional 2-layer
encoder of 256 per direction and a 2-layer decoder, either 256 wide (lighter than our first decoder layer)
or 512 wide (heavier than our upper decoder layer), so our model is compared with a lighter and a heavier
fairseq model.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
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
BASELINES = ["fairseq lstm_wiseman_iwslt_de_en, decoder 256", "fairseq lstm_wiseman_iwslt_de_en, decoder 512"]


def words_per_second(data, flags, updates, warmup):
    cmd = [os.path.join(BIN, "fairseq-train"), data, "--user-dir", os.path.join(ROOT, "grnn_fairseq"),
           "--task", "translation", *flags, "--optimizer", "adam", "--lr", "0.001", "--clip-norm", "2.5",
           "--batch-size", "32", "--max-update", str(updates), "--disable-validation", "--no-save",
           "--log-format", "simple", "--log-interval", "20", "--num-workers", "0", "--seed", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return speed_from_log(out.stdout + out.stderr, warmup)


def speed_from_log(log: str, warmup: int):
    """(mean words per second of the train_inner lines after ``warmup`` updates, model parameters)."""
    wps = [float(x) for x in re.findall(r"train_inner .*?wps=([\d.]+)", log)][warmup // 20 :]  # 20: --log-interval
    if not wps:
        raise SystemExit(f"no logging interval after the {warmup} warm-up updates: raise --updates")
    params = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
    return sum(wps) / len(wps), params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="data/ding-de-en/data-bin")
    p.add_argument("--updates", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup-updates", type=int, default=40, help="updates left out of the speed (multiple of 20)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = {name: [] for name in CANDIDATES}
    params = {}
    for r in range(args.rounds):
        for name, flags in CANDIDATES.items():
            wps, params[name] = words_per_second(args.data, flags, args.updates, args.warmup_updates)
            runs[name].append(wps)
            print(f"round {r + 1}: {name}: {wps:.0f} wps", flush=True)
    base = [statistics.median(runs[b]) for b in BASELINES]
    print("\n| model | params | words/s | vs fairseq, decoder 256 | vs fairseq, decoder 512 |\n|---|---|---|---|---|")
    rows = []
    for name in CANDIDATES:
        wps = statistics.median(runs[name])
        ratios = [wps / b for b in base]
        rows.append({"model": name, "params": params[name], "wps": wps, "ratios": ratios, "runs": runs[name]})
        print(f"| {name} | {params[name] / 1e6:.2f}M | {wps:.0f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
