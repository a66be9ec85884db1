"""group_lstm_lm: build, Table 1 sizes, incremental decoding, and the fairseq CLI end to end."""

import argparse
import os
import re

import pytest
import torch

import grnn_fairseq
from grnn_fairseq import tables

from conftest import USER_DIR, fairseq_cli, grammar_sentences


def test_checkpoint_safe_globals_registered():
    """Without this fairseq-generate, eval-lm and resume fail on torch >= 2.6 (weights_only loading)."""
    assert argparse.Namespace in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("name,groups,tied,paper,ours,recurrent", tables.table1())
def test_table1_sizes_within_one_percent(name, groups, tied, paper, ours, recurrent):
    assert abs(ours - paper) / paper < 0.01, name
    assert recurrent == pytest.approx(36.02e6 / groups, rel=1e-3)


def build_lm(*flags, vocab=50):
    model = tables.build("group_lstm_lm", ["--task", "language_modeling", *flags], vocab)
    return model.eval()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_incremental_decoding_equals_full_forward(groups):
    torch.manual_seed(0)
    model = build_lm("--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-layers", "3",
                     "--decoder-groups", str(groups))
    tokens = torch.randint(4, 50, (3, 7))
    full = model.get_normalized_probs(model(tokens), log_probs=True)
    state = {}
    for t in range(7):
        step = model.decoder(tokens[:, : t + 1], incremental_state=state)
        assert torch.allclose(model.get_normalized_probs(step, log_probs=True)[:, 0], full[:, t], atol=1e-5)
    # beam reordering: continue a reordered batch and compare with the reordered full pass
    order = torch.tensor([2, 0, 0])
    model.decoder.reorder_incremental_state_scripting(state, order)
    more = torch.randint(4, 50, (3, 1))
    step = model.decoder(torch.cat([tokens[order], more], 1), incremental_state=state)
    full = model.get_normalized_probs(model(torch.cat([tokens[order], more], 1)), log_probs=True)
    assert torch.allclose(model.get_normalized_probs(step, log_probs=True)[:, 0], full[:, -1], atol=1e-5)


def test_invalid_flags_name_the_flag():
    with pytest.raises(ValueError, match="--decoder-groups 3 does not divide --decoder-embed-dim 16"):
        build_lm("--decoder-embed-dim", "16", "--decoder-groups", "3")
    with pytest.raises(ValueError, match="--decoder-out-embed-dim"):
        build_lm("--decoder-embed-dim", "16", "--decoder-out-embed-dim", "8", "--share-decoder-input-output-embed")


def test_architectures_set_their_sizes():
    m = tables.build("group_lstm_lm_ptb", ["--task", "language_modeling"], 100)
    rnn = m.decoder.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.groups, rnn.dropout) == (1500, 1500, 2, 2, 0.65)
    m = tables.build("group_lstm_lm_ptb", ["--task", "language_modeling", "--decoder-groups", "4"], 100)
    assert m.decoder.rnn.groups == 4  # a flag on the command line wins over the architecture's default


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """Preprocess a tiny corpus and train a small group_lstm_lm for a few epochs."""
    tmp = tmp_path_factory.mktemp("lm")
    for split, n, seed in (("train", 600, 1), ("valid", 60, 2), ("test", 60, 3)):
        (tmp / f"{split}.txt").write_text("\n".join(grammar_sentences(n, seed)) + "\n")
    fairseq_cli("fairseq-preprocess", "--only-source", "--trainpref", tmp / "train.txt", "--validpref",
                tmp / "valid.txt", "--testpref", tmp / "test.txt", "--destdir", tmp / "bin", "--workers", "1")
    train_args = [
        tmp / "bin", "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "group_lstm_lm",
        "--decoder-embed-dim", "32", "--decoder-hidden-size", "32", "--decoder-groups", "2", "--dropout", "0.1",
        "--variational-dropout", "--share-decoder-input-output-embed",
        "--tokens-per-sample", "32", "--sample-break-mode", "none", "--batch-size", "4",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.01", "--clip-norm", "1.0",
        "--save-dir", tmp / "ckpt", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "10",
        "--seed", "1", "--num-workers", "0",
    ]
    first = fairseq_cli("fairseq-train", *train_args, "--max-epoch", "4")
    return tmp, train_args, first.stdout + first.stderr


def test_lm_trains_and_eval_lm_reports_perplexity(lm_run):
    tmp, _, log = lm_run
    assert (tmp / "ckpt" / "checkpoint_last.pt").exists()
    valid_ppl = [float(x) for x in re.findall(r"valid on 'valid' subset.*?\| ppl ([\d.]+)", log)]
    assert len(valid_ppl) == 4 and valid_ppl[-1] < valid_ppl[0]
    dict_size = sum(1 for _ in open(tmp / "bin" / "dict.txt")) + 4
    proc = fairseq_cli("fairseq-eval-lm", tmp / "bin", "--user-dir", USER_DIR, "--path", tmp / "ckpt" / "checkpoint_last.pt",
                       "--gen-subset", "test", "--tokens-per-sample", "32", "--batch-size", "8",
                       "--required-batch-size-multiple", "1", "--num-workers", "0")
    out = proc.stdout + proc.stderr
    ppl = float(re.search(r"Perplexity: ([\d.]+)", out).group(1))
    # the grammar allows at most ~5 choices per word; uniform over the vocabulary would be ~dict_size
    assert ppl < 6 < dict_size, out[-2000:]


def test_lm_resumes_from_checkpoint_last(lm_run):
    tmp, train_args, _ = lm_run
    proc = fairseq_cli("fairseq-train", *train_args, "--max-epoch", "5")
    out = proc.stdout + proc.stderr
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch 5", out), out[-3000:]
    assert "end of epoch 5" in out and "end of epoch 1 " not in out


def test_lm_samples_through_hub_interface(lm_run):
    tmp, _, _ = lm_run
    from grnn_fairseq.models.group_lstm_lm import GroupLSTMLanguageModel

    hub = GroupLSTMLanguageModel.from_pretrained(str(tmp / "ckpt"), "checkpoint_last.pt", str(tmp / "bin"))
    text = hub.sample("the cat", beam=1, sampling=True, sampling_topk=3, max_len_b=8, seed=1)
    assert text.startswith("the cat") and len(text.split()) > 2
    best = hub.sample("the cat", beam=3, max_len_b=5)
    assert best.split()[2] in {"sees", "likes", "finds", "calls"}  # the grammar's only verbs
