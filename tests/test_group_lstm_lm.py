"""group_lstm_lm: build, Table 1 sizes, incremental decoding, and the fairseq CLI end to end."""

import argparse
import os
import re

import pytest
import torch

import grnn_fairseq
from grnn_fairseq import tables

from conftest import USER_DIR, fairseq_cli, fairseq_eval_lm_in_process, fairseq_train_in_process, grammar_sentences


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


DESIGNS = {"lstm": [], "sru": ["--cell", "sru"], "flstm": ["--factorize-rank", "8"]}


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_incremental_decoding_equals_full_forward(groups, design):
    torch.manual_seed(0)
    model = build_lm("--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-layers", "3",
                     "--decoder-groups", str(groups), *DESIGNS[design])
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


def test_incremental_decoding_packs_each_weight_once(onednn_packs):
    """Without gradients (sampling, beam search) and with oneDNN's products, the decoder packs each weight in its
    first incremental step only (the packed weights live in the incremental state) and decodes as the full pass."""
    torch.manual_seed(0)
    model = build_lm("--decoder-embed-dim", "16", "--decoder-hidden-size", "32", "--decoder-layers", "2",
                     "--decoder-groups", "2", "--grnn-products", "onednn")  # fmt: skip
    tokens = torch.randint(4, 50, (3, 6))
    packed = onednn_packs
    with torch.no_grad():
        full = model.get_normalized_probs(model(tokens), log_probs=True)
        counts = []
        for steps in (2, 6):
            packed.clear()
            state = {}
            for t in range(steps):
                step = model.decoder(tokens[:, : t + 1], incremental_state=state)
                step = model.get_normalized_probs(step, log_probs=True)
                torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
            counts.append(sorted(packed))
    assert counts[0] and counts[0] == counts[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_incremental_decoding_keeps_a_bounded_store(dtype):
    """The store of packed and derived weights in an incremental decode's state holds as many entries after 6
    steps as after 2: with bfloat16 weights too, whose float32 casts are made once per decode, not per step."""
    torch.manual_seed(0)
    model = build_lm("--decoder-embed-dim", "16", "--decoder-hidden-size", "32", "--decoder-layers", "2",
                     "--decoder-groups", "2").to(dtype)  # fmt: skip
    tokens = torch.randint(4, 50, (3, 6))
    sizes = []
    with torch.no_grad():
        for steps in (2, 6):
            state = {}
            for t in range(steps):
                out, _ = model.decoder(tokens[:, : t + 1], incremental_state=state)
                assert out.dtype == dtype and torch.isfinite(out).all()
            sizes.append(len(model.decoder.get_incremental_state(state, "packed_weights")))
    assert sizes[0] > 0 and sizes[0] == sizes[1]


def test_invalid_flags_name_the_flag():
    with pytest.raises(ValueError, match="--decoder-groups 3 does not divide --decoder-embed-dim 16"):
        build_lm("--decoder-embed-dim", "16", "--decoder-groups", "3")
    with pytest.raises(ValueError, match="--decoder-out-embed-dim"):
        build_lm("--decoder-embed-dim", "16", "--decoder-out-embed-dim", "8", "--share-decoder-input-output-embed")
    with pytest.raises(ValueError, match="--factorize-rank 6 is not divisible by --decoder-groups 4"):
        build_lm("--decoder-embed-dim", "16", "--decoder-groups", "4", "--factorize-rank", "6")
    with pytest.raises(ValueError, match="--factorize-rank .* cannot be used with --cell sru"):
        build_lm("--decoder-embed-dim", "16", "--cell", "sru", "--factorize-rank", "8")
    with pytest.raises(ValueError, match="--factorize-rank must be >= 0"):
        build_lm("--decoder-embed-dim", "16", "--factorize-rank", "-2")


def test_unknown_cell_names_the_flag(capsys):
    with pytest.raises(SystemExit):  # the command line: argparse's choices
        build_lm("--cell", "gru")
    assert "argument --cell: invalid choice: 'gru'" in capsys.readouterr().err
    from grnn_fairseq.models.group_lstm_lm import check_cell

    args = argparse.Namespace(cell="gru", factorize_rank=0, decoder_groups=1)  # programmatic use
    with pytest.raises(ValueError, match="--cell must be one of lstm, sru, got 'gru'"):
        check_cell(args, ["--decoder-groups"])


def test_designs_build_the_right_layers():
    from grnn_fairseq.models.group_rnnsearch import recurrent_parameter_count
    from grnn_fairseq.modules import SRU, FactorizedLSTM, GroupLSTM

    flags = ["--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-layers", "2"]
    rnn = build_lm(*flags, "--no-shuffle-layers", "--no-shuffle-time").decoder.rnn  # G-LSTM
    assert type(rnn) is GroupLSTM and not rnn.shuffle_layers and not rnn.shuffle_time
    model = build_lm(*flags, "--factorize-rank", "8", "--variational-dropout", "--dropout", "0.2")
    rnn = model.decoder.rnn
    assert type(rnn) is FactorizedLSTM and (rnn.rank, rnn.groups, rnn.recurrent_dropout) == (8, 2, 0.2)
    # per layer W1 8 x (16 + 16) and W2 64 x 8, halved by the 2 groups, plus the 64 biases
    assert recurrent_parameter_count(model) == 2 * ((8 * 32 + 64 * 8) // 2 + 64)
    model = build_lm(*flags, "--cell", "sru", "--variational-dropout")
    rnn = model.decoder.rnn
    assert type(rnn) is SRU and rnn.variational and rnn.groups == 2
    assert recurrent_parameter_count(model) == 2 * (3 * 16 * 16 // 2 + 2 * 16)


def test_architectures_set_their_sizes():
    m = tables.build("group_lstm_lm_ptb", ["--task", "language_modeling"], 100)
    rnn = m.decoder.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.groups, rnn.dropout) == (1500, 1500, 2, 2, 0.65)
    m = tables.build("group_lstm_lm_ptb", ["--task", "language_modeling", "--decoder-groups", "4"], 100)
    assert m.decoder.rnn.groups == 4  # a flag on the command line wins over the architecture's default


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """A tiny grammar corpus, preprocessed into tmp/bin."""
    tmp = tmp_path_factory.mktemp("lm")
    for split, n, seed in (("train", 600, 1), ("valid", 60, 2), ("test", 60, 3)):
        (tmp / f"{split}.txt").write_text("\n".join(grammar_sentences(n, seed)) + "\n")
    fairseq_cli("fairseq-preprocess", "--only-source", "--trainpref", tmp / "train.txt", "--validpref",
                tmp / "valid.txt", "--testpref", tmp / "test.txt", "--destdir", tmp / "bin", "--workers", "1")
    return tmp


@pytest.fixture(scope="module")
def lm_run(lm_data):
    """Train a small group_lstm_lm on the tiny corpus for a few epochs."""
    tmp = lm_data
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
    ppl, out = eval_lm_perplexity(tmp / "bin", tmp / "ckpt" / "checkpoint_last.pt")
    # the grammar allows at most ~5 choices per word; uniform over the vocabulary would be ~dict_size
    assert ppl < 6 < dict_size, out[-2000:]


def eval_lm_perplexity(data, checkpoint):
    """fairseq-eval-lm's test perplexity of a checkpoint, and its output."""
    proc = fairseq_cli("fairseq-eval-lm", data, "--user-dir", USER_DIR, "--path", checkpoint,
                       "--gen-subset", "test", "--tokens-per-sample", "32", "--batch-size", "8",
                       "--required-batch-size-multiple", "1", "--num-workers", "0")
    out = proc.stdout + proc.stderr
    return float(re.search(r"Perplexity: ([\d.]+)", out).group(1)), out


@pytest.mark.parametrize("design", ["sru", "flstm", "glstm"])
def test_designs_train_and_eval_lm_through_the_cli(lm_data, design):
    """Each related design as a fairseq-train flag, then fairseq-eval-lm on the checkpoint (both entry points
    in this process, with --user-dir): it must learn the grammar (perplexity far below the vocabulary size)
    and load back with its own layer type."""
    tmp = lm_data
    flags = {"sru": ["--cell", "sru"], "flstm": ["--factorize-rank", "16"],
             "glstm": ["--no-shuffle-layers", "--no-shuffle-time"]}[design]  # fmt: skip
    save = tmp / f"ckpt-{design}"
    fairseq_train_in_process(
        tmp / "bin", "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "group_lstm_lm",
        "--decoder-embed-dim", "32", "--decoder-hidden-size", "32", "--decoder-groups", "2", "--dropout", "0.1",
        "--share-decoder-input-output-embed", *flags,
        "--tokens-per-sample", "32", "--sample-break-mode", "none", "--batch-size", "4",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.03", "--clip-norm", "1.0",
        "--save-dir", save, "--no-epoch-checkpoints", "--max-epoch", "2", "--disable-validation",
        "--log-format", "simple", "--seed", "1", "--num-workers", "0",
    )  # fmt: skip
    names = set(torch.load(save / "checkpoint_last.pt", weights_only=False)["model"])
    layer = {"sru": "decoder.rnn.weight_l1", "flstm": "decoder.rnn.weight2_l1", "glstm": "decoder.rnn.weight_hh_l1"}
    assert layer[design] in names
    results = fairseq_eval_lm_in_process(
        tmp / "bin", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt", "--gen-subset", "test",
        "--tokens-per-sample", "32", "--batch-size", "8", "--required-batch-size-multiple", "1", "--num-workers", "0",
    )  # fmt: skip
    dict_size = sum(1 for _ in open(tmp / "bin" / "dict.txt")) + 4
    # measured 2.5-3.3 here after these 2 epochs; the untrained models score about the vocabulary size
    assert float(results["perplexity"]) < 5 < dict_size / 4


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
