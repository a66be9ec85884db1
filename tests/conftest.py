import os
import random
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)  # in-process tests use tiny tensors; see fairseq_cli() below

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "grnn_fairseq")
BIN = os.path.dirname(sys.executable)


def fairseq_cli(command, *args, check=True, timeout=600):
    """Run a fairseq console script (fairseq-train, ...) from this interpreter's environment."""
    exe = os.path.join(BIN, command)
    if not os.path.exists(exe):
        pytest.skip(f"{command} is not installed beside {sys.executable}")
    proc = subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        # tiny models gain nothing from threads, and OpenMP threads spinning against other processes on a
        # shared 2-core machine once slowed a 2 s training run to 70 s
        env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def fairseq_train_in_process(*args):
    """fairseq-train's entry point in this process (no 4 s of imports): args as on the command line."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    parsed = options.parse_args_and_arch(options.get_training_parser(), input_args=[str(a) for a in args])
    # fairseq keeps the best validation loss in a process-wide attribute; a fresh fairseq-train starts without
    # it (a resumed run restores it from checkpoint_last.pt), else checkpoint_best.pt may never be written
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    train.main(convert_namespace_to_omegaconf(parsed))


def fairseq_eval_lm_in_process(*args):
    """fairseq-eval-lm's entry point in this process; returns its results ({"loss", "perplexity"})."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=[str(a) for a in args])
    return eval_lm.main(convert_namespace_to_omegaconf(parsed))


def grammar_sentences(n, seed):
    """Sentences of a tiny grammar: learnable, so perplexity must fall well below the vocabulary size."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the old man", "my sister", "the teacher"]
    verb = ["sees", "likes", "finds", "calls"]
    obj = ["the ball", "a red car", "the house", "her friend", "N apples"]
    tail = ["today", "again", "at night", "in the park", ""]
    return [" ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}".split()) for _ in range(n)]
