#!/usr/bin/env python
"""Related designs report: the designs the paper compares against, at one budget, beside the group LSTM.

Trains every row of LM_ROWS on the Brown corpus (scripts/prepare-brown.sh; group_lstm_lm_brown's sizes, Adam,
the same data, seed and number of updates) and scores it with fairseq-eval-lm (validation and test
perplexity); then every row of NMT_ROWS on the Ding De-En data (scripts/prepare-ding-de-en.sh;
group_rnnsearch_iwslt's sizes) and scores it with fairseq-generate --beam 5 (sacreBLEU on the test set).
Writes a markdown table (recurrent and all parameters, training words per second, validation perplexity or
loss, test perplexity or BLEU) and the same as JSON:

    python scripts/designs_report.py [--updates-lm 1500] [--updates-nmt 1800] [--rows lstm sru ...]
                                     [--skip-nmt] [--out docs/designs-report]

A row is one entry of LM_ROWS or NMT_ROWS: a name, a label and its fairseq-train flags (and its task, when it
needs another one). A row whose flags or task this checkout does not know (a design that another branch adds)
is listed as not available instead of failing the report. Every run's log and checkpoints stay in
--save-root/<task>-<name>-u<updates>; a run whose checkpoint_best.pt and log exist is not trained again, so
scripts/ablation_shuffle.py and this report share their common runs.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_report import BIN, USER_DIR, run, train  # noqa: E402  (same training and log parsing)


@dataclass
class Row:
    name: str  # the run's folder name (with the task and the budget), and --rows' handle
    label: str  # the table's model column
    flags: List[str] = field(default_factory=list)  # fairseq-train flags beyond the task's common ones
    task: str = ""  # fairseq task, when not the table's default


# Brown LM: group_lstm_lm_brown (2 x 256, tied embeddings, dropout 0.3), as examples/brown-lm.sh trains it
LM_TASK = "language_modeling"
LM_COMMON = ["--arch", "group_lstm_lm_brown", "--tokens-per-sample", "35", "--sample-break-mode", "none",
             "--batch-size", "32", "--optimizer", "adam", "--lr", "0.002", "--clip-norm", "0.25"]  # fmt: skip


def lm_group_row(groups: int, rearrangement: bool) -> Row:
    """Group LSTM with K groups, with the paper's rearrangement (shuffles) or without it (G-LSTM)."""
    if groups == 1:
        return Row("lstm", "dense LSTM", ["--decoder-groups", "1"])
    if rearrangement:
        return Row(f"group-k{groups}", f"group LSTM, K={groups} (rearrangement)", ["--decoder-groups", str(groups)])
    return Row(f"glstm-k{groups}", f"G-LSTM, K={groups} (no rearrangement)",
               ["--decoder-groups", str(groups), "--no-shuffle-layers", "--no-shuffle-time"])  # fmt: skip


LM_ROWS = [
    lm_group_row(1, True),
    lm_group_row(2, True),
    lm_group_row(2, False),
    # r = 172: the recurrent parameters of the K = 2 row (+0.4%): per layer r (I + H) + 4H r + 4H
    Row("flstm-r172", "F-LSTM, r=172", ["--decoder-groups", "1", "--factorize-rank", "172"]),
    Row("sru", "SRU", ["--decoder-groups", "1", "--cell", "sru"]),
    Row("lightrnn", "LightRNN", ["--decoder-groups", "1", "--lightrnn", "--criterion", "lightrnn_cross_entropy"],
        task="lightrnn_language_modeling"),  # fmt: skip
]

# Ding De-En: group_rnnsearch_iwslt (embedding and d = 256, 2 + 2 layers), as scripts/accuracy_report.py trains it
NMT_TASK = "translation"
NMT_COMMON = ["--arch", "group_rnnsearch_iwslt", "--optimizer", "adam", "--lr", "0.002", "--clip-norm", "2.5",
              "--batch-size", "32", "--criterion", "cross_entropy"]  # fmt: skip
NMT_ROWS = [
    Row("rnnsearch", "RNNSearch (dense LSTM)", ["--encoder-groups", "1", "--decoder-groups", "1"]),
    Row("group-k2", "group RNNSearch, K=2 (rearrangement)", ["--encoder-groups", "2", "--decoder-groups", "2"]),
    Row("glstm-k2", "G-LSTM RNNSearch, K=2 (no rearrangement)",
        ["--encoder-groups", "2", "--decoder-groups", "2", "--no-shuffle-layers", "--no-shuffle-time"]),
    # r = 256: the recurrent parameters of the K = 2 row (4.66M against 4.60M)
    Row("flstm-r256", "F-LSTM RNNSearch, r=256", ["--encoder-groups", "1", "--decoder-groups", "1", "--factorize-rank", "256"]),
    Row("sru", "SRU RNNSearch", ["--encoder-groups", "1", "--decoder-groups", "1", "--cell", "sru"]),
]  # fmt: skip


def available(row: Row, task: str, common: List[str]) -> bool:
    """Whether this checkout's fairseq-train accepts the row's task and flags (parsed, nothing run)."""
    from fairseq import options

    argv = ["unused-data", "--user-dir", USER_DIR, "--task", row.task or task, *common, *row.flags]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
        except SystemExit:
            return False
    return True


def lm_run(row: Row, data: str, updates: str, save_root: str, validate_every: str) -> dict:
    """Train one LM row (or reuse its run), then fairseq-eval-lm on the valid and test splits."""
    task = row.task or LM_TASK
    save, result = train(f"lm-{row.name}-u{updates}", data, ["--task", task, *LM_COMMON, *row.flags], updates,
                         save_root, validate_every)  # fmt: skip
    for split in ("valid", "test"):
        out = run(
            [os.path.join(BIN, "fairseq-eval-lm"), data, "--user-dir", USER_DIR, "--task", task,
             "--path", os.path.join(save, "checkpoint_best.pt"), "--gen-subset", split, "--tokens-per-sample", "35",
             "--batch-size", "32", "--required-batch-size-multiple", "1", "--num-workers", "0"],
            os.path.join(save, f"eval-{split}.log"),
        )  # fmt: skip
        result[f"{split}_ppl"] = float(re.search(r"Perplexity: ([\d.]+)", out).group(1))
    return {"task": "LM (Brown)", "name": row.name, "model": row.label, "flags": row.flags, **result}


def nmt_run(row: Row, data: str, updates: str, save_root: str, validate_every: str) -> dict:
    """Train one translation row (or reuse its run), then fairseq-generate --beam 5 with sacreBLEU on test."""
    task = row.task or NMT_TASK
    save, result = train(f"nmt-{row.name}-u{updates}", data, ["--task", task, *NMT_COMMON, *row.flags], updates,
                         save_root, validate_every)  # fmt: skip
    out = run(
        [os.path.join(BIN, "fairseq-generate"), data, "--user-dir", USER_DIR, "--task", task,
         "--path", os.path.join(save, "checkpoint_best.pt"), "--gen-subset", "test", "--beam", "5",
         "--batch-size", "64", "--required-batch-size-multiple", "1", "--remove-bpe", "--scoring", "sacrebleu"],
        os.path.join(save, "generate-test.log"),
    )  # fmt: skip
    result["test_bleu"] = float(re.search(r"BLEU = ([\d.]+)", out).group(1))
    result["test_sentences"] = len(re.findall(r"^H-\d+", out, re.M))
    return {"task": "De-En (Ding)", "name": row.name, "model": row.label, "flags": row.flags, **result}


def table(rows: List[dict]) -> List[str]:
    lines = [
        "| task | model | recurrent params | all params | train wps | valid | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"| {r['task']} | {r['model']} | | | | not available in this checkout | |")
            continue
        if "test_bleu" in r:
            valid, test = f"loss {r['best_valid_loss']:.3f} (base 2)", f"BLEU {r['test_bleu']:.2f}"
        else:
            valid, test = f"ppl {r['valid_ppl']:.1f}", f"ppl {r['test_ppl']:.1f}"
        lines.append(
            f"| {r['task']} | {r['model']} | {r['recurrent_params'] / 1e6:.2f}M | {r['params'] / 1e6:.2f}M | "
            f"{r['wps']:.0f} | {valid} | {test} |"
        )
    return lines


def run_rows(rows, task, common, runner, data, updates, args) -> List[dict]:
    results = []
    for row in rows:
        if args.rows and row.name not in args.rows:
            continue
        label = "LM (Brown)" if task == LM_TASK else "De-En (Ding)"
        if not available(row, task, common):
            print(f"[designs] {label} {row.name}: this checkout does not know its task or flags {row.flags}; skipped")
            results.append({"task": label, "name": row.name, "model": row.label, "flags": row.flags, "unavailable": True})
            continue
        results.append(runner(row, data, updates, args.save_root, args.validate_every))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-data", default="data/brown/data-bin")
    p.add_argument("--nmt-data", default="data/ding-de-en/data-bin")
    p.add_argument("--updates-lm", default="1500", help="updates per LM row (examples/brown-lm.sh's budget)")
    p.add_argument("--updates-nmt", default="1800", help="updates per translation row (examples/translate-de-en.sh's)")
    p.add_argument("--validate-every", default="500")
    p.add_argument("--rows", nargs="+", help="only the rows with these names (default: all)")
    p.add_argument("--save-root", default="checkpoints/designs")
    p.add_argument("--out", default="docs/designs-report")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-nmt", action="store_true")
    args = p.parse_args(argv)
    start = time.time()
    rows = []
    if not args.skip_lm:
        rows += run_rows(LM_ROWS, LM_TASK, LM_COMMON, lm_run, args.lm_data, args.updates_lm, args)
    if not args.skip_nmt:
        rows += run_rows(NMT_ROWS, NMT_TASK, NMT_COMMON, nmt_run, args.nmt_data, args.updates_nmt, args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=1)
    lines = table(rows)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}.md and {args.out}.json; the report took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
