#!/usr/bin/env python
"""Translation report: group_rnnsearch against fairseq's own LSTM on the Ding De-En data, one recipe for all.

Trains every model of MODELS with the same recipe, seed, data and budget (--updates), decodes the test set with
beam 5 (checkpoint_best.pt, BPE removed), and writes a table of recurrent and total parameters, training words
per second, validation loss after every epoch, tokenized BLEU (multi-bleu's convention: the paper's metric) and
detokenized sacreBLEU with paired bootstrap resampling against the first model (``sacrebleu --paired-bs``: the
mean and 95% confidence interval of each system, and the p-value of its difference to the baseline).

    python scripts/translation_report.py [DATA] [--models NAME ...] [--updates 3000] [--out docs/translation]

DATA is scripts/prepare-ding-de-en.sh's output folder (default data/ding-de-en: data-bin/, tok/, plain/).
The recipe (RECIPE): Adam, lr 0.002, gradient clipping 2.5, batches of 32 sentences, dropout 0.1, label-smoothed
cross-entropy 0.1, one thread. Every run's log and checkpoint stay in --save-root/NAME; a run whose log and
checkpoint_best.pt exist is not trained again (delete the folder to redo it).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from accuracy_report import BIN, ROOT, USER_DIR, run  # the same commands, logs and output

RECIPE = ["--task", "translation", "--source-lang", "de", "--target-lang", "en", "--optimizer", "adam", "--lr",
          "0.002", "--clip-norm", "2.5", "--batch-size", "32", "--dropout", "0.1", "--criterion",
          "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-epoch", "100", "--seed", "1",
          "--no-epoch-checkpoints", "--no-last-checkpoints", "--log-format", "simple", "--log-interval", "50",
          "--num-workers", "0", "--required-batch-size-multiple", "1", "--cpu"]  # fmt: skip
# the translation recipe's model flags (docs/translation.md): the residual decoder, fairseq's LSTM initialization
# and Luong's attention
OURS = ["--decoder-residual", "--decoder-hidden-size", "512", "--init-uniform", "0.1", "--attention-type", "luong"]
MODELS = {
    "fairseq lstm_wiseman_iwslt_de_en": ["--arch", "lstm_wiseman_iwslt_de_en"],
    "group_rnnsearch_iwslt, groups 2, the paper's decoder": ["--arch", "group_rnnsearch_iwslt"],
    "group_rnnsearch_iwslt, groups 1": ["--arch", "group_rnnsearch_iwslt", "--encoder-groups", "1",
                                        "--decoder-groups", "1", *OURS],
    "group_rnnsearch_iwslt, groups 2": ["--arch", "group_rnnsearch_iwslt", *OURS],
    "group_rnnsearch_iwslt, groups 4": ["--arch", "group_rnnsearch_iwslt", "--encoder-groups", "4",
                                        "--decoder-groups", "4", *OURS],
    "G-LSTM, groups 2": ["--arch", "group_rnnsearch_iwslt", "--no-shuffle-layers", "--no-shuffle-time", *OURS],
}  # fmt: skip


def folder_name(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def parse_train_log(log: str):
    """Words per second (the epochs' means), validation loss per epoch, parameters."""
    wps = [float(x) for x in re.findall(r"\| train \| epoch \d+ \|.*?\| wps ([\d.]+)", log)]
    valid = [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)]
    params = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
    return {"wps": sum(wps) / len(wps), "valid_loss_per_epoch": valid, "params": params}


def train(model, data, updates, save_root, threads):
    save = os.path.join(save_root, folder_name(model))
    os.makedirs(save, exist_ok=True)
    log_path = os.path.join(save, "train.log")
    checkpoint = os.path.join(save, "checkpoint_best.pt")
    if not (os.path.exists(checkpoint) and os.path.exists(log_path)):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        run([os.path.join(BIN, "fairseq-train"), os.path.join(data, "data-bin"), "--user-dir", USER_DIR,
             *MODELS[model], *RECIPE, "--max-update", updates, "--save-dir", save], log_path, env)  # fmt: skip
    return save, parse_train_log(open(log_path).read())


def load(checkpoint: str, data_bin: str):
    """The trained model (eval mode) and its task."""
    from fairseq import checkpoint_utils

    import grnn_fairseq  # noqa: F401  (registers our models)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": os.path.abspath(data_bin)})  # fmt: skip
    return models[0].eval(), task


def recurrent_params(model) -> int:
    """Parameters of the recurrent layers (the paper's count): ours, and fairseq's nn.LSTM / nn.LSTMCell."""
    import torch.nn as nn

    from grnn_fairseq.models.group_rnnsearch import recurrent_parameter_count

    return recurrent_parameter_count(model, also=(nn.LSTM, nn.LSTMCell))


def source_use(model, task):
    """How much the model uses its source, on the valid set with teacher forcing: the loss (bits per target token)
    with the true sources, the loss with every batch's targets rotated by one sentence (each target with another
    sentence's source: what a model that ignores its source does not notice; sources keep their order, which
    fairseq's LSTM needs), and the mean over target tokens of the largest attention weight (None for models that
    return no attention)."""
    import torch

    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=64).next_epoch_itr(shuffle=False)
    totals = {"loss": 0.0, "loss_other_source": 0.0, "peak": 0.0}
    tokens, has_attention = 0, True
    with torch.no_grad():
        for sample in itr:
            net = sample["net_input"]
            for key, shift in (("loss", 0), ("loss_other_source", 1)):
                target = sample["target"].roll(shift, 0)  # B x T
                keep = target.ne(task.target_dictionary.pad())
                logits, extra = model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"].roll(shift, 0))
                lprobs = model.get_normalized_probs((logits, extra), log_probs=True)  # B x T x V
                totals[key] -= lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum().item()
                if key == "loss":
                    attn = extra["attn"][0] if isinstance(extra, dict) else extra  # B x T x S
                    if attn is None:
                        has_attention = False
                    else:
                        totals["peak"] += attn.float().max(-1).values[keep].sum().item()
            tokens += keep.sum().item()
    bits = 1 / (tokens * 0.6931471805599453)
    return {"valid_bits": totals["loss"] * bits, "valid_bits_other_source": totals["loss_other_source"] * bits,
            "attention_peak": totals["peak"] / tokens if has_attention else None}  # fmt: skip


def decode(save, data):
    """Beam 5 on the test set; writes save/test.hyp (tokenized, BPE removed, in corpus order) and test.detok."""
    out = run([os.path.join(BIN, "fairseq-generate"), os.path.join(data, "data-bin"), "--user-dir", USER_DIR,
               "--source-lang", "de", "--target-lang", "en", "--path", os.path.join(save, "checkpoint_best.pt"),
               "--gen-subset", "test", "--beam", "5", "--remove-bpe", "--batch-size", "64",
               "--required-batch-size-multiple", "1", "--num-workers", "0", "--cpu"],
              os.path.join(save, "generate-test.log"))  # fmt: skip
    hyps = {}
    for line in out.splitlines():
        if line.startswith("H-"):
            index, _, text = line.split("\t")
            hyps[int(index[2:])] = text
    n = sum(1 for _ in open(os.path.join(data, "tok", "test.en")))
    if sorted(hyps) != list(range(n)):
        raise SystemExit(f"{save}: {len(hyps)} hypotheses for {n} test sentences")
    with open(os.path.join(save, "test.hyp"), "w") as f:
        f.write("".join(hyps[i] + "\n" for i in range(n)))
    textprep = [sys.executable, os.path.join(ROOT, "scripts", "textprep.py")]
    subprocess.run([*textprep, "detokenize", "--lang", "en", os.path.join(save, "test.hyp"),
                    os.path.join(save, "test.detok")], check=True)  # fmt: skip


def tokenized_bleu(save, data) -> float:
    out = subprocess.run([sys.executable, "-m", "sacrebleu", os.path.join(data, "tok", "test.en"), "-i",
                          os.path.join(save, "test.hyp"), "--tokenize", "none", "--force", "-b", "-w", "2"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip())


def paired_bootstrap(saves, data, samples=1000):
    """``sacrebleu --paired-bs`` of the detokenized outputs, the first system the baseline: per system (BLEU, mean,
    95% CI half-width, p-value of the difference to the baseline, None for the baseline), and the command."""
    cmd = [sys.executable, "-m", "sacrebleu", os.path.join(data, "plain", "test.en"), "-i",
           *[os.path.join(s, "test.detok") for s in saves], "--paired-bs", "--paired-bs-n", str(samples),
           "-m", "bleu"]  # fmt: skip
    systems = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    scores = [(s["BLEU"]["score"], s["BLEU"]["mean"], s["BLEU"]["ci"], s["BLEU"]["p_value"]) for s in systems]
    return " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c for c in cmd[3:]), scores


def write_report(rows, bootstrap_text, out, args):
    with open(out + ".json", "w") as f:
        json.dump({"args": vars(args), "recipe": RECIPE, "rows": rows, "paired_bootstrap": bootstrap_text}, f, indent=1)
    lines = [
        "| model | recurrent params | all params | train words/s | valid loss (label-smoothed, base 2), every "
        "epoch | valid NLL: own / other sources (bits) | attention peak | tokenized BLEU | sacreBLEU (95% CI) | "
        "p vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        valid = " ".join(f"{v:.2f}" for v in r["valid_loss_per_epoch"])
        p = "baseline" if r["p"] is None else f"{r['p']:.4f}"
        peak = "-" if r["attention_peak"] is None else f"{r['attention_peak']:.2f}"
        lines.append(f"| {r['model']} | {r['recurrent_params'] / 1e6:.2f}M | {r['params'] / 1e6:.2f}M | "
                     f"{r['wps']:.0f} | {valid} | {r['valid_bits']:.2f} / {r['valid_bits_other_source']:.2f} | "
                     f"{peak} | {r['tokenized_bleu']:.2f} | {r['bleu']:.2f} ({r['bleu_mean']:.2f} ± "
                     f"{r['bleu_ci']:.2f}) | {p} |")  # fmt: skip
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + f"\n\nsacreBLEU and its paired bootstrap test: `sacrebleu {bootstrap_text}`\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="data/ding-de-en")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
                   help="the first is the baseline of the paired test")
    p.add_argument("--updates", default="3000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument("--save-root", default="checkpoints/translation")
    p.add_argument("--out", default="docs/translation")
    args = p.parse_args(argv)
    start = time.time()
    rows, saves = [], []
    for model in args.models:
        save, result = train(model, args.data, args.updates, args.save_root, args.threads)
        if not os.path.exists(os.path.join(save, "test.detok")):
            decode(save, args.data)
        net, task = load(os.path.join(save, "checkpoint_best.pt"), os.path.join(args.data, "data-bin"))
        result["recurrent_params"] = recurrent_params(net)
        result["tokenized_bleu"] = tokenized_bleu(save, args.data)
        result.update(source_use(net, task))
        rows.append({"model": model, **result})
        saves.append(save)
    text, scores = paired_bootstrap(saves, args.data, args.bootstrap_samples)
    for r, (bleu, mean, ci, pval) in zip(rows, scores):
        r.update(bleu=bleu, bleu_mean=mean, bleu_ci=ci, p=pval)
    write_report(rows, text, args.out, args)
    print(f"translation report took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
