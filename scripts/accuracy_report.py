#!/usr/bin/env python
"""Accuracy report, groups vs dense: the paper's claim of comparable accuracy with fewer parameters.

Trains, with the same budget, seed and data:
  * group_rnnsearch_iwslt with groups 1 (dense RNNSearch), 2 and 4 on the Ding De-En data
    (scripts/prepare-ding-de-en.sh), scored with fairseq-generate --beam 5 (sacreBLEU on the test set);
  * group_lstm_lm_brown with groups 1 and 2 on the Brown corpus (scripts/prepare-brown.sh), scored with
    fairseq-eval-lm (test perplexity);
then writes a markdown table (parameters of the recurrent layers and of the whole model, training words
per second, best validation loss, test BLEU or perplexity), the same as JSON, and a PNG of the validation
curves.

    python scripts/accuracy_report.py [--updates-nmt 800] [--updates-lm 800] [--out docs/accuracy]

Every run's log stays in its checkpoint folder (--save-root); a run whose checkpoint_best.pt and log exist
is not trained again (delete the folder to redo it).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "grnn_fairseq")
BIN = os.path.dirname(sys.executable)


def run(cmd, log_path, env=None):
    """Run a command (in ``env``, else this one's environment), teeing its output to ``log_path`` and its
    progress lines to stdout; return the output."""
    print("$", " ".join(map(str, cmd)), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)  # fmt: skip
        out = []
        for line in proc.stdout:
            log.write(line)
            out.append(line)
            if "train_inner" in line or "valid on" in line or "BLEU" in line or "Perplexity" in line:
                print("  " + line.rstrip()[:200], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{''.join(out[-30:])}")
    return "".join(out)


def parse_train_log(log: str):
    """Words per second (mean over logging intervals, the first dropped as warm-up), validation curve."""
    wps = [float(x) for x in re.findall(r"train_inner .*?wps=([\d.]+)", log)]
    curve = [
        (int(n), float(loss))
        for loss, n in re.findall(r"valid on 'valid' subset \| loss ([\d.]+) .*?\| num_updates (\d+)", log)
    ]
    whole = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
    wps = wps[1:] if len(wps) > 1 else wps
    return {"wps": sum(wps) / len(wps), "valid_curve": curve, "best_valid_loss": min(l for _, l in curve), "params": whole}


def recurrent_params(checkpoint: str, data: str) -> int:
    """Parameters of the GroupLSTM / GroupLSTMCell layers of a trained model."""
    from fairseq import checkpoint_utils

    import grnn_fairseq  # noqa: F401
    from grnn_fairseq.models.group_rnnsearch import recurrent_parameter_count

    models, _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": os.path.abspath(data)})
    return recurrent_parameter_count(models[0])


def train(name, data, flags, updates, save_root, validate_every):
    save = os.path.join(save_root, name)
    os.makedirs(save, exist_ok=True)
    log_path = os.path.join(save, "train.log")
    if not (os.path.exists(os.path.join(save, "checkpoint_best.pt")) and os.path.exists(log_path)):
        run(
            [os.path.join(BIN, "fairseq-train"), data, "--user-dir", USER_DIR, *flags,
             "--max-update", updates, "--validate-interval-updates", validate_every,
             "--save-interval-updates", validate_every, "--keep-interval-updates", "1", "--no-epoch-checkpoints",
             "--required-batch-size-multiple", "1", "--save-dir", save, "--log-format", "simple",
             "--log-interval", "25", "--num-workers", "0", "--seed", "1"],
            log_path,
        )
    result = parse_train_log(open(log_path).read())
    result["recurrent_params"] = recurrent_params(os.path.join(save, "checkpoint_best.pt"), data)
    return save, result


def nmt_runs(args):
    rows = []
    for groups in args.groups_nmt:
        name = f"rnnsearch-g{groups}"
        flags = ["--task", "translation", "--arch", "group_rnnsearch_iwslt", "--encoder-groups", groups,
                 "--decoder-groups", groups, "--optimizer", "adam", "--lr", args.lr_nmt, "--clip-norm", "2.5",
                 "--batch-size", "32", "--criterion", "cross_entropy"]
        save, result = train(name, args.nmt_data, flags, args.updates_nmt, args.save_root, args.validate_every)
        out = run(
            [os.path.join(BIN, "fairseq-generate"), args.nmt_data, "--user-dir", USER_DIR,
             "--path", os.path.join(save, "checkpoint_best.pt"), "--gen-subset", "test", "--beam", "5",
             "--batch-size", "64", "--required-batch-size-multiple", "1", "--remove-bpe", "--scoring", "sacrebleu"],
            os.path.join(save, "generate-test.log"),
        )
        result["test_bleu"] = float(re.search(r"BLEU = ([\d.]+)", out).group(1))
        result["test_sentences"] = len(re.findall(r"^H-\d+", out, re.M))
        rows.append({"task": "De-En (Ding)", "model": f"group_rnnsearch_iwslt, groups {groups}", "groups": int(groups), **result})
    return rows


def lm_runs(args):
    rows = []
    for groups in args.groups_lm:
        name = f"brown-lm-g{groups}"
        flags = ["--task", "language_modeling", "--arch", "group_lstm_lm_brown", "--decoder-groups", groups,
                 "--tokens-per-sample", "35", "--sample-break-mode", "none", "--batch-size", "32",
                 "--optimizer", "adam", "--lr", "0.002", "--clip-norm", "0.25"]
        save, result = train(name, args.lm_data, flags, args.updates_lm, args.save_root, args.validate_every)
        out = run(
            [os.path.join(BIN, "fairseq-eval-lm"), args.lm_data, "--user-dir", USER_DIR,
             "--path", os.path.join(save, "checkpoint_best.pt"), "--gen-subset", "test", "--tokens-per-sample", "35",
             "--batch-size", "32", "--required-batch-size-multiple", "1", "--num-workers", "0"],
            os.path.join(save, "eval-test.log"),
        )
        result["test_ppl"] = float(re.search(r"Perplexity: ([\d.]+)", out).group(1))
        rows.append({"task": "LM (Brown)", "model": f"group_lstm_lm_brown, groups {groups}", "groups": int(groups), **result})
    return rows


def write_report(rows, out, args):
    with open(out + ".json", "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=1)
    lines = [
        "| task | model | recurrent params | all params | train wps | best valid loss (base 2) | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = f"BLEU {r['test_bleu']:.2f}" if "test_bleu" in r else f"ppl {r['test_ppl']:.1f}"
        lines.append(
            f"| {r['task']} | {r['model']} | {r['recurrent_params'] / 1e6:.2f}M | {r['params'] / 1e6:.2f}M | "
            f"{r['wps']:.0f} | {r['best_valid_loss']:.3f} | {test} |"
        )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves the root logger at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4))
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        for r in rows:
            if r["task"] == task:
                x, y = zip(*r["valid_curve"])
                ax.plot(x, y, marker="o", label=f"groups {r['groups']} ({r['recurrent_params'] / 1e6:.1f}M rec.)")
        ax.set_title(task)
        ax.set_xlabel("updates")
        ax.set_ylabel("validation loss (base 2)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    print(f"wrote {out}.md, {out}.json, {out}.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nmt-data", default="data/ding-de-en/data-bin")
    p.add_argument("--lm-data", default="data/brown/data-bin")
    p.add_argument("--groups-nmt", nargs="+", default=["1", "2", "4"])
    p.add_argument("--groups-lm", nargs="+", default=["1", "2"])
    p.add_argument("--updates-nmt", default="800")
    p.add_argument("--updates-lm", default="800")
    p.add_argument("--lr-nmt", default="0.002")
    p.add_argument("--validate-every", default="200")
    p.add_argument("--save-root", default="checkpoints/accuracy")
    p.add_argument("--out", default="docs/accuracy")
    p.add_argument("--skip-nmt", action="store_true")
    p.add_argument("--skip-lm", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    start = time.time()
    rows = ([] if args.skip_nmt else nmt_runs(args)) + ([] if args.skip_lm else lm_runs(args))
    write_report(rows, args.out, args)
    print(f"accuracy report took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
