"""Issue #7, faults: unreadable checkpoints at every entry point, checkpoints of another dictionary, atomic
checkpoint copies, a clean exit while fairseq's prefetch thread works, and a training process killed with SIGKILL
that resumes exactly where it was saved."""

import argparse
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import BIN, REVERSAL_MODEL_FLAGS, ROOT, USER_DIR, fairseq_cli, preprocess_parallel, word_reversal_pairs

from fairseq import checkpoint_utils, options, utils  # noqa: E402

utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))

from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.file_io import PathManager  # noqa: E402

from grnn_fairseq import safeguards, tables  # noqa: E402
from grnn_fairseq.models.group_rnnsearch import GroupRNNSearchModel  # noqa: E402
from grnn_fairseq.safeguards import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def bad_checkpoints(reversal_model, tmp_path_factory):
    """A good checkpoint cut to 60% of its bytes, random bytes, and an empty file."""
    root = tmp_path_factory.mktemp("bad_checkpoints")
    data = reversal_model.best.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) * 6 // 10])
    rng = random.Random(0)
    (root / "garbage.pt").write_bytes(b"garbage:" + bytes(rng.randrange(256) for _ in range(4096)))
    (root / "empty.pt").write_bytes(b"")
    return {name: root / f"{name}.pt" for name in ("truncated", "garbage", "empty")}


REASONS = {
    "truncated": "is a truncated or damaged zip archive",
    "garbage": "is not a PyTorch checkpoint (it starts with the bytes b'garb'",
    "empty": "is empty (0 bytes)",
}


def assert_clear_checkpoint_error(excinfo, path, kind):
    message = str(excinfo.value)
    assert message.startswith(f"checkpoint {path} {REASONS[kind]}"), message
    # no pickle / zip / torch.serialization traceback attached or chained
    assert excinfo.value.__suppress_context__ and excinfo.value.__cause__ is None
    assert excinfo.traceback[-1].path.name == "safeguards.py"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_unreadable_checkpoint_names_the_file(bad_checkpoints, kind):
    path = str(bad_checkpoints[kind])
    with pytest.raises(CheckpointError) as excinfo:
        checkpoint_utils.load_checkpoint_to_cpu(path)
    assert_clear_checkpoint_error(excinfo, path, kind)


def test_good_checkpoints_load_as_before(reversal_model):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(reversal_model.best))
    reference = torch.load(reversal_model.best, map_location="cpu", weights_only=False)
    assert state["model"].keys() == reference["model"].keys()
    assert all(torch.equal(state["model"][k], reference["model"][k]) for k in state["model"])


def test_truncated_legacy_format_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} is truncated or corrupt (legacy pickle")):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert safeguards.unreadable_reason(str(path), pickle.UnpicklingError("Weights only load failed: ...")) is None


def generation_args(data, path, *extra):
    return options.parse_args_and_arch(options.get_generation_parser(), input_args=[
        str(data), "--user-dir", USER_DIR, "--path", str(path), "--cpu", "--batch-size", "8",
        "--required-batch-size-multiple", "1", *extra,
    ])  # fmt: skip


def train_cfg(data, save_dir, *extra):
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        str(data), *REVERSAL_MODEL_FLAGS, "--optimizer", "adam", "--lr", "0.001", "--batch-size", "64",
        "--max-update", "1", "--save-dir", str(save_dir), *extra,
    ])  # fmt: skip
    return convert_namespace_to_omegaconf(args)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_every_entry_point_names_the_unreadable_file(bad_checkpoints, word_reversal, lm_data, tmp_path, kind):
    """fairseq-generate, -interactive, -eval-lm, from_pretrained and fairseq-train --restore-file, in process."""
    from fairseq_cli import eval_lm, generate, interactive, train

    path = bad_checkpoints[kind]
    entry_points = {
        "generate": lambda: generate.main(generation_args(word_reversal.bin, path)),
        "interactive": lambda: interactive.main(
            convert_namespace_to_omegaconf(
                options.parse_args_and_arch(options.get_interactive_generation_parser(), input_args=[
                    str(word_reversal.bin), "--user-dir", USER_DIR, "--path", str(path), "--cpu"])
            )
        ),  # fmt: skip
        "eval_lm": lambda: eval_lm.main(
            convert_namespace_to_omegaconf(
                options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=[
                    str(lm_data), "--user-dir", USER_DIR, "--path", str(path), "--cpu"])
            )
        ),  # fmt: skip
        "from_pretrained": lambda: GroupRNNSearchModel.from_pretrained(
            str(path.parent), checkpoint_file=path.name, data_name_or_path=str(word_reversal.bin)
        ),
        "train --restore-file": lambda: train.main(
            train_cfg(word_reversal.bin, tmp_path / "ckpt", "--restore-file", str(path))
        ),
    }
    for name, run in entry_points.items():
        with pytest.raises(CheckpointError) as excinfo:
            run()
        assert_clear_checkpoint_error(excinfo, path, kind)


def test_fairseq_train_stops_on_a_truncated_checkpoint_last(bad_checkpoints, word_reversal, tmp_path):
    """What the user sees: the last line of fairseq-train's output names the file, without a traceback."""
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes(bad_checkpoints["truncated"].read_bytes())
    proc = fairseq_cli(
        "fairseq-train", word_reversal.bin, *REVERSAL_MODEL_FLAGS, "--optimizer", "adam", "--lr", "0.001",
        "--batch-size", "64", "--max-update", "1", "--save-dir", save, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fairseq-train: error: checkpoint {save}/checkpoint_last.pt is a truncated")
    assert "Traceback" not in proc.stderr  # one line, as argparse reports a bad flag


def test_checkpoint_copies_are_atomic(tmp_path):
    """fairseq-train copies each new checkpoint to checkpoint_last.pt; a copy cut short keeps the old file."""
    assert getattr(PathManager.copy, "grnn_checked", False)
    src, dst = tmp_path / "checkpoint_1_10.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def killed_midway(src_path, dst_path, overwrite=False):
        with open(dst_path, "wb") as f:
            f.write(b"ne")
        raise KeyboardInterrupt  # stands for the process dying in the middle of the copy

    with pytest.raises(KeyboardInterrupt):
        safeguards._atomic_pt_copy(killed_midway)(str(src), str(dst), True)
    assert dst.read_bytes() == b"old"

    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes() and not (tmp_path / "checkpoint_last.pt.tmp").exists()


# --- exiting while fairseq's data prefetch thread works -----------------------------------------------------

# fairseq-train's data prefetch thread, busy in torch's C++ code as the interpreter finalizes
EXIT_WHILE_PREFETCHING = """
import time

import torch

import grnn_fairseq  # noqa: F401  (installs the exit handler)
from fairseq.data.iterators import BufferedIterator

class Batches:
    def __len__(self):
        return 1000

    def __iter__(self):
        ids = torch.ones(20_000_000, dtype=torch.int32)
        for _ in range(1000):
            yield ids.long()  # C++ with the GIL released, tens of ms: where the exit finds the thread

batches = BufferedIterator(100, Batches())
next(batches)
time.sleep(0.01)
print("exiting")
"""


def test_exit_while_the_prefetch_thread_collates(tmp_path):
    """A process that imported the plugin exits cleanly while fairseq's BufferedIterator thread is inside a torch
    op (without the plugin's exit handler CPython 3.11 aborts it: "terminate called without an active
    exception", exit code 134, as fairseq-train did after "done training" in 7 of 24 runs, two at a time on a
    2-core machine)."""
    script = tmp_path / "exit_while_prefetching.py"
    script.write_text(EXIT_WHILE_PREFETCHING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == "exiting\n", (proc.returncode, proc.stderr[-2000:])


# --- a checkpoint loaded with another dictionary -----------------------------------------------------------


@pytest.fixture(scope="module")
def other_dictionary_data(word_reversal, tmp_path_factory):
    """The same task without BPE and with eight more words: a joined dictionary of another size."""
    root = tmp_path_factory.mktemp("other_dictionary")
    extra = "pink cyan grey brown gold silver navy teal".split()
    pairs = word_reversal_pairs(60, seed=5) + [(w, w) for w in extra]
    for split in ("train", "valid", "test"):
        (root / f"{split}.src").write_text("\n".join(s for s, _ in pairs) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(t for _, t in pairs) + "\n")
    preprocess_parallel([root / "train", root / "valid", root / "test"], root / "bin")
    return root / "bin"


def dictionary_size(bin_dir, lang):
    from fairseq.data import Dictionary

    return len(Dictionary.load(str(bin_dir / f"dict.{lang}.txt")))


def test_checkpoint_with_another_dictionary_says_so(reversal_model, other_dictionary_data, tmp_path):
    from fairseq_cli import generate, train

    trained, now = dictionary_size(reversal_model.data.bin, "src"), dictionary_size(other_dictionary_data, "src")
    assert trained != now
    expected = (
        f"dictionary size mismatch: the checkpoint was trained with a source dictionary of {trained} symbols "
        f"(encoder.embed_tokens.weight is {trained} x 32), but the source dictionary loaded now "
        f"(dict.<source-lang>.txt of the data directory) has {now}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        generate.main(generation_args(other_dictionary_data, reversal_model.best))
    with pytest.raises(ValueError, match=re.escape(expected)):
        GroupRNNSearchModel.from_pretrained(str(reversal_model.save_dir), checkpoint_file="checkpoint_best.pt",
                                            data_name_or_path=str(other_dictionary_data))
    # fairseq-train wraps every loading error in its own "please ensure that the architectures match"; ours is
    # the exception it was raised from, printed above it
    with pytest.raises(Exception, match="Cannot load model parameters from checkpoint") as excinfo:
        train.main(train_cfg(other_dictionary_data, tmp_path / "ckpt", "--restore-file", str(reversal_model.best)))
    assert expected in str(excinfo.value.__context__)


def test_language_model_with_another_dictionary_says_so():
    lm = tables.build("group_lstm_lm", ["--task", "language_modeling", "--decoder-embed-dim", "16",
                                        "--decoder-hidden-size", "16"], 40)  # fmt: skip
    other = tables.build("group_lstm_lm", ["--task", "language_modeling", "--decoder-embed-dim", "16",
                                           "--decoder-hidden-size", "16"], 48)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("language model dictionary of 48 symbols")) as excinfo:
        lm.load_state_dict(other.state_dict())
    assert "(dict.txt of the data directory) has 40" in str(excinfo.value)
    lm.load_state_dict(tables.build("group_lstm_lm", ["--task", "language_modeling", "--decoder-embed-dim", "16",
                                                      "--decoder-hidden-size", "16"], 40).state_dict())  # fmt: skip


# --- SIGKILL in the middle of training, then the same command again ------------------------------------------


def kill_resume_command(data, save_dir):
    """19 updates an epoch (1200 pairs, 64 a batch); a checkpoint every 10 updates, 45 in all; dropout on."""
    return [
        os.path.join(BIN, "fairseq-train"), str(data), *REVERSAL_MODEL_FLAGS, "--dropout", "0.2",
        "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "30",
        "--warmup-init-lr", "1e-4", "--batch-size", "64", "--max-update", "45", "--save-interval-updates", "10",
        "--no-epoch-checkpoints", "--log-interval", "5", "--seed", "1", "--save-dir", str(save_dir),
    ]  # fmt: skip


def train_inner_lines(log):
    """{update: (loss, lr, gnorm)} of fairseq's train_inner log lines: the fields that must match exactly."""
    pattern = r"loss=(?P<loss>[\d.]+), .*?num_updates=(?P<u>\d+), lr=(?P<lr>[\d.e-]+), gnorm=(?P<gnorm>[\d.]+)"
    return {int(m.group("u")): (m.group("loss"), m.group("lr"), m.group("gnorm")) for m in re.finditer(pattern, log)}


def test_sigkill_mid_run_resumes_from_the_last_saved_update(word_reversal, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    reference = subprocess.run(kill_resume_command(word_reversal.bin, tmp_path / "reference"), env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]

    save, log_path = tmp_path / "killed", tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(kill_resume_command(word_reversal.bin, save), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 300
        # fairseq logs "Saved checkpoint" once checkpoint_1_10.pt is written and copied to checkpoint_last.pt
        while proc.poll() is None and time.time() < deadline:
            if re.search(r"Saved checkpoint \S+ \(epoch 1 @ 10 updates", log_path.read_text()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL, log_path.read_text()[-3000:]
    killed_log = log_path.read_text()
    assert "done training" not in killed_log
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    k = saved["optimizer_history"][-1]["num_updates"]
    assert 10 <= k < 45  # the last checkpoint written before the kill: 10, unless the kill came late
    epoch = saved["extra_state"]["train_iterator"]["epoch"]
    ref_at_k = tmp_path / "reference" / f"checkpoint_{epoch}_{k}.pt"  # absent only for an end-of-epoch save
    if ref_at_k.exists():
        ref_at_k = torch.load(ref_at_k, map_location="cpu", weights_only=False)
        assert all(torch.equal(ref_at_k["model"][n], saved["model"][n]) for n in saved["model"])
        assert saved["extra_state"]["train_iterator"] == ref_at_k["extra_state"]["train_iterator"]

    resumed = subprocess.run(kill_resume_command(word_reversal.bin, save), env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_log = resumed.stdout + resumed.stderr
    assert re.search(rf"Loaded checkpoint \S+/checkpoint_last\.pt \(epoch {epoch} @ {k} updates\)", resumed_log)
    # every logged update after the resume point: the same loss, learning rate and gradient norm as without the kill
    ref_lines, resumed_lines = train_inner_lines(reference.stdout + reference.stderr), train_inner_lines(resumed_log)
    assert min(resumed_lines) == (k // 5 + 1) * 5 and resumed_lines == {u: v for u, v in ref_lines.items() if u > k}

    # the end state is bit for bit the uninterrupted run's: weights, Adam moments and step, lr scheduler, data position
    ref = torch.load(tmp_path / "reference" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    end = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(ref["model"][n], end["model"][n]) for n in ref["model"])
    ref_opt, end_opt = ref["last_optimizer_state"], end["last_optimizer_state"]
    for i, state in ref_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(state[name]), torch.as_tensor(end_opt["state"][i][name])), name
    assert ref_opt["param_groups"] == end_opt["param_groups"]  # learning rate included
    assert ref["optimizer_history"][-1] == end["optimizer_history"][-1]  # num_updates 45, lr scheduler state
    assert ref["extra_state"]["train_iterator"] == end["extra_state"]["train_iterator"]
