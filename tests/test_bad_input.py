"""Issue #7, bad input: each case stops with a message naming the flag or the file and line, or is handled the
way fairseq handles it for its own models, before any training time is spent."""

import argparse
import logging
import os
import re
import subprocess
import sys

import pytest

from conftest import INTERACTIVE_INPUT, REVERSAL_MODEL_FLAGS, ROOT, USER_DIR, load_textprep

from fairseq import options, utils  # noqa: E402

utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))

from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

textprep = load_textprep()
LM_MODEL_FLAGS = ["--user-dir", USER_DIR, "--arch", "group_lstm_lm", "--decoder-embed-dim", "16",
                  "--decoder-hidden-size", "16", "--cpu", "--num-workers", "0"]  # fmt: skip
LM_FLAGS = [*LM_MODEL_FLAGS, "--task", "language_modeling", "--tokens-per-sample", "16"]


def train(data, save_dir, *flags, max_update=1):
    """fairseq-train in process (the CLI path after argument parsing)."""
    from fairseq_cli import train as fairseq_train

    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        str(data), *flags, "--optimizer", "adam", "--lr", "0.001", "--batch-size", "16",
        "--required-batch-size-multiple", "1", "--max-update", str(max_update), "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--log-format", "simple",
    ])  # fmt: skip
    fairseq_train.main(convert_namespace_to_omegaconf(args))


# --- flags ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,flags,message",
    [
        ("nmt", ["--encoder-groups", "3"], "--encoder-groups 3 does not divide --encoder-embed-dim 32"),
        ("nmt", ["--decoder-groups", "5"], "--decoder-groups 5 does not divide --decoder-first-layer-hidden-size 64"),
        ("lm", ["--decoder-groups", "3"], "--decoder-groups 3 does not divide --decoder-embed-dim 16"),
        ("nmt", ["--share-decoder-input-output-embed", "--decoder-out-embed-dim", "16"],
         "--share-decoder-input-output-embed requires --decoder-out-embed-dim (16) to equal --decoder-embed-dim (32)"),
    ],
)  # fmt: skip
def test_invalid_flags_stop_fairseq_train_before_training(word_reversal, lm_data, tmp_path, model, flags, message):
    data, base = (word_reversal.bin, REVERSAL_MODEL_FLAGS) if model == "nmt" else (lm_data, LM_FLAGS)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(data, tmp_path / "ckpt", *base, *flags)
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize(
    "tool,model,flags,message",
    [
        ("fairseq-train", "nmt", ["--encoder-groups", "3"], "--encoder-groups 3 does not divide --encoder-embed-dim 32"),
        ("fairseq-train", "lm", ["--decoder-groups", "3", "--factorize-rank", "8"],
         "--decoder-groups 3 does not divide --decoder-embed-dim 16"),
        ("fairseq-eval-lm", "lm", ["--path", "{empty}"], "checkpoint {empty} is empty"),
    ],
)  # fmt: skip
def test_command_line_errors_are_one_line(word_reversal, lm_data, tmp_path, tool, model, flags, message):
    """A bad flag or an unreadable checkpoint at a fairseq command line: one line naming it, no traceback,
    a non-zero exit status."""
    from conftest import fairseq_cli

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    flags = [f.format(empty=empty) for f in flags]
    data, base = (word_reversal.bin, REVERSAL_MODEL_FLAGS) if model == "nmt" else (lm_data, LM_FLAGS)
    if tool == "fairseq-train":
        base = [*base, "--optimizer", "adam", "--lr", "0.001", "--batch-size", "16", "--max-update", "1",
                "--save-dir", str(tmp_path / "ckpt")]  # fmt: skip
    else:
        base = ["--user-dir", USER_DIR, "--cpu", "--task", "language_modeling", "--tokens-per-sample", "16"]
    proc = fairseq_cli(tool, data, *base, *flags, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: " + message.format(empty=empty))


def test_unknown_attention_type_names_the_flag_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(options.get_training_parser(),
                                    ["unused", *REVERSAL_MODEL_FLAGS, "--attention-type", "dot"])  # fmt: skip
    assert "argument --attention-type: invalid choice: 'dot' (choose from 'bahdanau', 'luong')" in capsys.readouterr().err


def test_architecture_of_the_other_task_names_both_flags(word_reversal, lm_data, tmp_path):
    nmt_flags = [f for f in REVERSAL_MODEL_FLAGS if f not in ("--task", "translation")]
    with pytest.raises(ValueError, match=re.escape(
            "--arch group_rnnsearch_iwslt is an encoder-decoder model: it needs --task translation")):
        train(lm_data, tmp_path / "a", *nmt_flags, "--task", "language_modeling", "--tokens-per-sample", "16")
    with pytest.raises(ValueError, match=re.escape(
            "--arch group_lstm_lm is a language model: it needs --task language_modeling")):
        train(word_reversal.bin, tmp_path / "b", *LM_MODEL_FLAGS, "--task", "translation")


# --- sentences longer than --max-source-positions: fairseq's own rules, applied to our models ------------------


def test_long_training_sentences_are_skipped_and_long_valid_sentences_stop_training(word_reversal, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    # up to 5 words, "green" 4 subwords: many sources exceed 8 positions
    with pytest.raises(Exception, match=re.escape("since max_positions=(8, 1024), skip this example with "
                                                  "--skip-invalid-size-inputs-valid-test")):
        train(word_reversal.bin, tmp_path / "a", *REVERSAL_MODEL_FLAGS, "--max-source-positions", "8")
    assert re.search(r"samples have invalid sizes and will be skipped, max_positions=\(8, 1024\)", caplog.text)
    caplog.clear()
    train(word_reversal.bin, tmp_path / "b", *REVERSAL_MODEL_FLAGS, "--max-source-positions", "8",
          "--skip-invalid-size-inputs-valid-test")
    assert (tmp_path / "b" / "checkpoint_last.pt").exists()


def test_long_test_sentences_stop_generation_unless_skipped(reversal_model, tmp_path):
    from fairseq_cli import generate

    def generate_with(*flags):
        args = options.parse_args_and_arch(options.get_generation_parser(), input_args=[
            str(reversal_model.data.bin), "--user-dir", USER_DIR, "--path", str(reversal_model.best), "--cpu",
            "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-source-positions", "8",
            "--results-path", str(tmp_path), *flags,
        ])  # fmt: skip
        generate.main(args)
        return (tmp_path / "generate-test.txt").read_text()

    with pytest.raises(Exception, match=re.escape("skip this example with --skip-invalid-size-inputs-valid-test")):
        generate_with()
    out = generate_with("--skip-invalid-size-inputs-valid-test")
    kept = re.findall(r"^S-\d+\t(.*)$", out, re.M)
    assert 0 < len(kept) < 20 and all(len(s.split()) + 1 <= 8 for s in kept)


# --- typed input: what fairseq-interactive does with an empty line and unknown characters ----------------------


def test_interactive_empty_line_and_unknown_characters(interactive_run):
    out = interactive_run.stdout
    assert INTERACTIVE_INPUT.splitlines()[1] == ""
    # an empty line is translated as a source of only </s>, as for fairseq's own models; the score is finite
    assert re.search(r"^S-1\t$", out, re.M) and re.search(r"^D-1\t-?\d+\.\d+(e-?\d+)?\t", out, re.M), out
    # "zebra" is not in the vocabulary: BPE splits it into characters, and fairseq shows those it maps to <unk>
    assert re.search(r"^S-2\tred .*<unk>", out, re.M), out


# --- raw text before fairseq-preprocess: scripts/textprep.py check, run by scripts/lib.sh ----------------------


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def run_check(*argv):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "textprep.py"), "check", *map(str, argv)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc.returncode, proc.stderr


def test_check_names_file_and_line_of_each_problem(tmp_path):
    src = write(tmp_path / "train.de", "ein Satz\n\ndrei W\xf6rter hier\nzu lang " + "x " * 30 + "\n")
    tgt = write(tmp_path / "train.en", "a sentence\ntwo\nthree words here\ntoo long\n")
    code, err = run_check("--parallel", "--max-positions", "20", src, tgt)
    assert code == 1
    assert f"error: {src}:2: empty line (its pair: {tgt}:2)" in err
    assert f"error: {src}:4: 32 tokens + </s> = 33 positions > --max-positions 20" in err
    assert "--skip-invalid-size-inputs-valid-test" in err  # what fairseq does with such lines, said once
    assert "1 error(s)" not in err and "2 error(s)" in err
    # LM text: blank lines separate paragraphs (wikitext), so they are only warnings there
    code, err = run_check("--allow-empty", src)
    assert code == 0 and f"warning: {src}:2: empty line" in err


def test_check_catches_what_fairseq_preprocess_binarizes_wrongly(tmp_path):
    src = write(tmp_path / "a.src", b"one\ntwo \xff bytes\nthree\rfour\n", "wb")
    tgt = write(tmp_path / "a.tgt", "one\ntwo\n")
    code, err = run_check("--parallel", src, tgt)
    assert code == 1
    assert f"error: {src}:2: not valid UTF-8 (byte 0xff at byte 5)" in err
    assert f"error: {src}:3: carriage return (\\r) inside the line" in err
    assert f"error: {src}:3: no pair: {src} has 3 lines but its parallel file {tgt} has 2" in err


def test_check_warns_about_tokens_outside_the_vocabulary(tmp_path, word_reversal):
    text = write(tmp_path / "test.src", "red blue\nred zebra blue\n")
    code, err = run_check("--dict", word_reversal.bin / "dict.src.txt", text)
    assert code == 0  # fairseq maps them to <unk>: a warning, not an error
    assert f"warning: {text}:2: 'zebra' is not in the vocabulary" in err
    assert f"{text}: 1 of 5 tokens (20.00%, 1 distinct) are outside the vocabulary and become <unk>" in err
    assert "'red'" not in err and "'blue'" not in err  # in the dictionary
    train, valid = write(tmp_path / "train.txt", "red blue\n"), write(tmp_path / "valid.txt", "blue pink\n")
    code, err = run_check("--vocab-from-first", train, valid)
    assert code == 0 and f"warning: {valid}:1: 'pink' is not in the vocabulary" in err


def binarize_with_lib_sh(tmp_path, flags, env=None):
    """scripts/lib.sh's binarize with a stub fairseq-preprocess that records that it ran."""
    stub = tmp_path / "stubbin" / "fairseq-preprocess"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nwhile (( $# )); do [[ "$1" == --destdir ]] && dest="$2"; shift; done\n'
                    'mkdir -p "$dest" && echo stub > "$dest/preprocess.log"\n')  # fmt: skip
    stub.chmod(0o755)
    script = (f'set -euo pipefail; source {ROOT}/scripts/lib.sh; grnn_init test; '
              f'binarize {tmp_path}/bin {tmp_path}/train {tmp_path}/valid {tmp_path}/test {flags}')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env={
        **os.environ, "PYTHON": sys.executable, "FAIRSEQ_BIN": str(stub.parent), "WORKERS": "1", **(env or {})})


def test_data_scripts_check_text_before_binarizing(tmp_path):
    for split in ("train", "valid", "test"):
        write(tmp_path / f"{split}.de", "ein Satz\nnoch einer\n")
        write(tmp_path / f"{split}.en", "a sentence\nanother one\n")
    write(tmp_path / "valid.en", "a sentence\n\n")
    proc = binarize_with_lib_sh(tmp_path, "--source-lang de --target-lang en --joined-dictionary")
    assert proc.returncode != 0 and not (tmp_path / "bin").exists()
    assert f"error: {tmp_path}/valid.en:2: empty line (its pair: {tmp_path}/valid.de:2)" in proc.stderr
    assert "fix the lines named above before binarizing (DATA_CHECK=warn binarizes anyway)" in proc.stderr

    proc = binarize_with_lib_sh(tmp_path, "--source-lang de --target-lang en --joined-dictionary",
                                env={"DATA_CHECK": "warn"})  # fmt: skip
    assert proc.returncode == 0 and (tmp_path / "bin" / "preprocess.log").exists(), proc.stderr


def test_data_scripts_allow_blank_lines_in_language_model_text(tmp_path):
    write(tmp_path / "train", "the cat sat\n\nthe dog ran\n")
    write(tmp_path / "valid", "the cat ran\n")
    write(tmp_path / "test", "the emu sat\n")
    proc = binarize_with_lib_sh(tmp_path, "--only-source")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {tmp_path}/train:2: empty line" in proc.stderr
    assert f"warning: {tmp_path}/test:1: 'emu' is not in the vocabulary" in proc.stderr
