#!/usr/bin/env python
"""Whole-model decoding speed: fairseq's beam search (``SequenceGenerator``, what fairseq-generate and
fairseq-interactive run) over the De-En test sentences, group_rnnsearch_iwslt against fairseq's own LSTM model,
measured side by side in one run.

    python scripts/benchmark_generate.py [DATA_BIN] [--batch-size 32 1] [--sentences 256 32] [--beam 5]
        [--length 25] [--rounds 3] [--threads 1] [--models NAME ...] [--json FILE]

The candidates are scripts/benchmark_models.py's (the same sizes and flags), built with seed 1 and not trained:
every hypothesis is forced to --length target tokens (``min_len`` = ``max_len``, fairseq's own length limits),
so every model decodes the same number of steps for the same batches, whatever its weights. Per --batch-size
(one table each), the first --sentences test sentences in fairseq's batches of that many sentences
(fairseq-generate's batching, sorted by length) are decoded once to warm up, then --rounds times round-robin
over the candidates; a candidate's time is the median of its rounds. Printed: target tokens per second (EOS
included, as fairseq-generate counts them), and the ratio to each fairseq model.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark_models import BASELINES, CANDIDATES, RECIPE, baseline_ratios, markdown_table  # noqa: E402
from grnn_fairseq.benchmark import processor_name  # noqa: E402

DEFAULT_MODELS = BASELINES + [f"group_rnnsearch_iwslt, groups {k}, translation recipe" for k in (1, 4)]


def build(data: str, flags, args):
    """The model (eval mode), its task (the test set loaded) and its generator."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.sequence_generator import SequenceGenerator

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        parser, [data, "--user-dir", os.path.join(ROOT, "grnn_fairseq"), *RECIPE, *flags]))  # fmt: skip
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("test")
    model = task.build_model(cfg.model).eval()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=args.beam, max_len_a=0,
                                  max_len_b=args.length, min_len=args.length)  # fmt: skip
    return model, task, generator


def test_batches(task, batch_size: int, sentences: int):
    """fairseq's batches of ``batch_size`` test sentences, until ``sentences`` are covered."""
    itr = task.get_batch_iterator(dataset=task.dataset("test"), max_sentences=batch_size, seed=1,
                                  required_batch_size_multiple=1, disable_iterator_cache=True)  # a new batching
    itr = itr.next_epoch_itr(shuffle=False)
    batches, covered = [], 0
    for sample in itr:
        if covered >= sentences:
            break
        batches.append(sample)
        covered += sample["nsentences"]
    return batches


def decode(model, task, generator, batches):
    """Seconds to decode every batch, and the target tokens of the best hypotheses."""
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for sample in batches:
            for hypos in task.inference_step(generator, [model], sample):
                tokens += hypos[0]["tokens"].numel()
    return time.perf_counter() - t0, tokens


def table(rows, batch_size):
    return markdown_table(f"--batch-size {batch_size}:", ["params", "tokens/s"],
                          [([r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_second']:.0f}"], r["ratios"])
                           for r in rows])  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="data/ding-de-en/data-bin")
    p.add_argument("--batch-size", type=int, nargs="+", default=[32, 1],
                   help="sentences per batch, one table each (default 32: fairseq-generate; 1: a sentence at a "
                        "time, as fairseq-interactive and the hub's translate)")
    p.add_argument("--sentences", type=int, nargs="+", default=[256, 32],
                   help="test sentences decoded per round, one per --batch-size (default 256, 32)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--length", type=int, default=25, help="target tokens of every hypothesis (EOS excluded)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--models", nargs="+", choices=list(CANDIDATES), default=DEFAULT_MODELS, metavar="MODEL",
                   help="default: fairseq's two and the translation recipe's groups 1 and 4")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if len(args.sentences) != len(args.batch_size):
        p.error(f"--sentences needs one count per --batch-size ({len(args.batch_size)}), got {len(args.sentences)}")
    torch.set_num_threads(args.threads)
    cpu = processor_name(None)
    print(f"CPU: {cpu}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    setups = {name: build(args.data, CANDIDATES[name], args) for name in args.models}
    params = {name: sum(p.numel() for p in setups[name][0].parameters()) for name in args.models}
    results = {}
    for batch_size, sentences in zip(args.batch_size, args.sentences):
        batches = {name: test_batches(setups[name][1], batch_size, sentences) for name in args.models}
        times, tokens = {name: [] for name in args.models}, {}
        for name in args.models:  # warm-up: allocator, oneDNN's primitives
            decode(*setups[name], batches[name])
        for r in range(args.rounds):
            for name in args.models:
                seconds, tokens[name] = decode(*setups[name], batches[name])
                times[name].append(seconds)
                print(f"--batch-size {batch_size}, round {r + 1}: {name}: {seconds:.2f} s, "
                      f"{tokens[name] / seconds:.0f} tokens/s", flush=True)  # fmt: skip
        seconds = {name: statistics.median(times[name]) for name in args.models}
        speeds = {name: tokens[name] / seconds[name] for name in args.models}
        ratios = baseline_ratios(speeds)
        rows = [{"model": name, "params": params[name], "tokens": tokens[name], "seconds": seconds[name],
                 "runs": times[name], "tokens_per_second": speeds[name], "ratios": ratios[name]}
                for name in args.models]  # fmt: skip
        results[str(batch_size)] = rows
        print("\n" + table(rows, batch_size) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "processor": cpu, "torch": torch.__version__, "batch_size": results}, f,
                      indent=1)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
