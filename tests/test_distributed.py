"""Issue #7, distributed training: scripts/train-distributed.sh runs fairseq's own data-parallel engine in two CPU
processes (gloo, legacy_ddp); one process with --update-freq 2 sees the same batches in the same updates, so both
runs must compute the same model.

Tolerance: the per-update training losses printed by fairseq (3 decimals) must be equal, and every parameter
within 1e-6 after the last update. (On the AMD EPYC, 2026-11-23: identical bits. Gradients are summed in
float32 in another order than --update-freq sums them, which may differ in the last bit on other machines.)
"""

import argparse
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REVERSAL_MODEL_FLAGS, ROOT, USER_DIR

from fairseq import options, utils  # noqa: E402

utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))

from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

TRAINING = ["--optimizer", "adam", "--lr", "0.005", "--max-update", "4", "--log-interval", "1", "--seed", "3",
            "--disable-validation", "--no-epoch-checkpoints", "--log-format", "simple", "--dropout", "0"]  # fmt: skip
MODELS = {
    "group_rnnsearch": [*REVERSAL_MODEL_FLAGS, "--decoder-dropout-out", "0", "--batch-size", "16"],
    "group_lstm_lm": ["--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "group_lstm_lm",
                      "--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-groups", "2",
                      "--tokens-per-sample", "16", "--sample-break-mode", "none", "--batch-size", "2",
                      "--required-batch-size-multiple", "1", "--num-workers", "0"],
}  # fmt: skip


def losses(log):
    """{update: loss} of fairseq's train_inner lines."""
    return {int(u): loss for loss, u in re.findall(r"train_inner\b.*? loss=([\d.]+), .*?num_updates=(\d+)", log)}


@pytest.mark.parametrize("model", MODELS)
def test_two_cpu_processes_match_one_process_with_the_same_total_batch(model, word_reversal, lm_data, tmp_path, caplog):
    data = word_reversal.bin if model == "group_rnnsearch" else lm_data
    flags = [*MODELS[model], *TRAINING]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "DEVICE": "cpu"}
    dist = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train-distributed.sh"), "2", str(data), *flags,
                           "--save-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    dist_log = dist.stdout + dist.stderr
    assert dist.returncode == 0, dist_log[-4000:]
    assert "[train-distributed] 2 processes on node 0 of 1 (cpu), world size 2" in dist_log
    assert re.search(r"distributed init \(rank 0\): tcp://127\.0\.0\.1:\d+", dist_log)
    assert (tmp_path / "two" / "distributed-logs" / "rank1.log").exists()

    # the reference: one process, two batches an update, in process (saves a second fairseq import)
    from fairseq_cli import train

    caplog.set_level(logging.INFO)
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        str(data), *flags, "--cpu", "--update-freq", "2", "--save-dir", str(tmp_path / "one")])  # fmt: skip
    train.main(convert_namespace_to_omegaconf(args))
    one = losses(caplog.text)
    two = losses(dist_log)
    assert sorted(two) == [1, 2, 3, 4] and two == one, (two, one)

    a = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 4
    difference = max((a["model"][n] - b["model"][n]).abs().max().item() for n in b["model"])
    assert difference <= 1e-6
    assert two[4] < two[1]  # it trained: the comparison is not between two models that stood still


def test_a_failing_rank_stops_the_others(word_reversal, tmp_path):
    """Rank 1 cannot start (its log file is a directory): the script stops rank 0, which would otherwise wait for
    rank 1 in torch.distributed's rendezvous for half an hour."""
    (tmp_path / "logs" / "rank1.log").mkdir(parents=True)
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DEVICE": "cpu",
           "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    start = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train-distributed.sh"), "2", str(word_reversal.bin),
                           *MODELS["group_rnnsearch"], *TRAINING, "--save-dir", str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "rank 1 exited with status 1; stopped the other processes" in proc.stderr
    assert time.time() - start < 60 and not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
