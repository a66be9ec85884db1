"""group_rnnsearch: incremental decoding, padding invariance, architecture sizes and the fairseq CLI end to end."""

import contextlib
import logging
import random
import re
from argparse import Namespace

import pytest
import torch

from fairseq import checkpoint_utils, options, utils
from fairseq.data import Dictionary
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.translation import TranslationTask

from conftest import USER_DIR, Dispatched, device_waits, fairseq_train_in_process

utils.import_user_module(Namespace(user_dir=USER_DIR))  # what --user-dir does: registers the models

from grnn_fairseq.models import group_rnnsearch  # noqa: E402
from grnn_fairseq.models.group_rnnsearch import (  # noqa: E402
    GroupRNNSearchModel,
    attend,
    attention_mask_bias,
    recurrent_parameter_count,
)
from grnn_fairseq.modules import SRU, FactorizedLSTM, GroupLSTM, GroupLSTMCell, backend  # noqa: E402

VOCAB = 24


def make_dictionary(size=VOCAB):
    d = Dictionary()
    while len(d) < size:
        d.add_symbol(f"w{len(d)}")
    return d


def parse(arch, flags):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, input_args=["unused-data-dir", "--task", "translation", "--arch", arch, "--user-dir", USER_DIR, *flags]
    )


def build(arch, *flags, src_dict=None, tgt_dict=None, device=None):
    """Build through fairseq (parser, --arch defaults, TranslationTask.build_model)."""
    args = parse(arch, flags)
    src_dict = src_dict or make_dictionary()
    task = TranslationTask(args, src_dict, tgt_dict or src_dict)
    with torch.device(device or "cpu"):
        return task.build_model(args)


def tiny(groups, attention="bahdanau", *flags):
    """3 + 3 layers so that the encoder and decoder GroupLSTM stacks shuffle between their own layers."""
    torch.manual_seed(0)
    model = build(
        "group_rnnsearch",
        "--encoder-embed-dim", "8", "--encoder-hidden-size", "8", "--encoder-layers", "3",
        "--decoder-embed-dim", "8", "--decoder-first-layer-hidden-size", "16", "--decoder-hidden-size", "8",
        "--decoder-layers", "3", "--encoder-groups", str(groups), "--decoder-groups", str(groups),
        "--attention-type", attention, *flags,
    )  # fmt: skip
    return model.double().eval()


# the related designs as flags; tiny()'s layers are 8 and 16 wide, so rank 8 divides into 4 groups
DESIGNS = {"lstm": [], "sru": ["--cell", "sru"], "flstm": ["--factorize-rank", "8"]}
# the translation recipe's decoder: residual connections above the first layer (upper layers as wide as it)
RESIDUAL = ["--decoder-residual", "--decoder-hidden-size", "16"]


def left_padded_batch(lengths, pad=1, eos=2, seed=0):
    """B x S source tokens, left padded as fairseq's collater makes them, each ending with eos."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    tokens = torch.full((len(lengths), S), pad, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, S - n :] = torch.randint(4, VOCAB, (n,), generator=g)
        tokens[b, -1] = eos
    return tokens, torch.tensor(lengths)


def log_probs(model, src, lengths, prev):
    logits, attn = model(src, lengths, prev)
    return model.get_normalized_probs((logits, attn), log_probs=True), attn


@pytest.mark.parametrize("design", [*DESIGNS, "residual"])
@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
@pytest.mark.parametrize("groups", [1, 4])
def test_incremental_decoding_equals_full_forward(groups, attention, design):
    model = tiny(groups, attention, *(RESIDUAL if design == "residual" else DESIGNS[design]))
    src, lengths = left_padded_batch([5, 3, 4])
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 5))], 1)  # B x T, starts with eos
    full, full_attn = log_probs(model, src, lengths, prev)
    assert full_attn.shape == (3, 6, 5)  # B x T_tgt x S
    assert torch.all(full_attn[1, :, :2] == 0)  # never attends to padding

    encoder_out = model.encoder(src, lengths)
    state = {}
    for t in range(4):
        logits, attn = model.decoder(prev[:, : t + 1], encoder_out, incremental_state=state)
        step = model.get_normalized_probs((logits, attn), log_probs=True)
        assert step.shape == (3, 1, VOCAB)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-10)
        torch.testing.assert_close(attn[:, 0], full_attn[:, t], rtol=0, atol=1e-10)

    # beam search reorders (and duplicates) hypotheses, then continues: must equal the reordered full pass
    order = torch.tensor([2, 0, 0])
    model.decoder.reorder_incremental_state_scripting(state, order)
    encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
    full, _ = log_probs(model, src[order], lengths[order], prev[order])
    for t in range(4, 6):
        logits, attn = model.decoder(prev[order, : t + 1], encoder_out, incremental_state=state)
        step = model.get_normalized_probs((logits, attn), log_probs=True)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-10)


def onednn_model(groups, tgt_dict):
    """A small group_rnnsearch_iwslt (residual decoder) on oneDNN's products (--grnn-products onednn), in eval
    mode, seeded; skips where this torch has no oneDNN linear."""
    if not backend.onednn_usable(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    return build("group_rnnsearch_iwslt", "--encoder-embed-dim", "16", "--encoder-hidden-size", "16",
                 "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16", "--encoder-groups", str(groups),
                 "--decoder-groups", str(groups), *RESIDUAL[:1], "--decoder-hidden-size", "32",
                 "--grnn-products", "onednn", tgt_dict=tgt_dict).eval()  # fmt: skip


BEAM_SAMPLE = dict(zip(("src_tokens", "src_lengths"), left_padded_batch([5, 3, 4])))


def beam_generator(model, tgt_dict, steps):
    """fairseq's beam search (beam 3) over ``model`` alone, every hypothesis forced to ``steps`` tokens."""
    return SequenceGenerator([model], tgt_dict, beam_size=3, max_len_a=0, max_len_b=steps, min_len=steps)


def best_hypotheses(generator):
    """The best hypothesis' tokens and score per sentence of BEAM_SAMPLE (generate() searches with the
    generator's own models)."""
    with torch.no_grad():
        return [(h[0]["tokens"], h[0]["score"]) for h in generator.generate(None, {"net_input": BEAM_SAMPLE})]


def assert_same_hypotheses(got, want, atol):
    for (tokens, score), (want_tokens, want_score) in zip(got, want):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(score, want_score, rtol=0, atol=atol)


@pytest.mark.parametrize("groups", [1, 2])
def test_beam_search_packs_each_weight_once(groups, onednn_packs, monkeypatch):
    """fairseq's beam search with oneDNN's products (--grnn-products onednn): the decoder packs each weight once
    per batch, in its first step, however many steps follow (the packed weights live in the incremental state),
    and finds the same hypotheses with the same scores as when every step packs its own."""
    tgt_dict = make_dictionary()
    model = onednn_model(groups, tgt_dict)
    packed = onednn_packs

    def search(steps):
        packed.clear()
        return best_hypotheses(beam_generator(model, tgt_dict, steps)), list(packed)

    _, short = search(2)
    kept, long = search(8)
    assert short and sorted(short) == sorted(long)  # the same weights, packed once each
    monkeypatch.setattr(group_rnnsearch, "incremental_packing", lambda *a: contextlib.nullcontext())
    per_step, repacked = search(8)
    assert len(repacked) > len(long)
    assert_same_hypotheses(kept, per_step, atol=1e-5)


def test_beam_search_follows_weights_updated_in_place():
    """Two beam searches with the same generator, the weights changed in place between them (as fairseq's
    optimizers change p.data, which no version counter sees): the second finds the hypotheses of a model that
    was built with the changed weights (no packed weight outlives its search)."""
    tgt_dict = make_dictionary()
    model = onednn_model(2, tgt_dict)
    generator = beam_generator(model, tgt_dict, 6)
    before = best_hypotheses(generator)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-1.5)  # in place: the same tensors, other values
    after = best_hypotheses(generator)
    fresh = onednn_model(2, tgt_dict)
    fresh.load_state_dict(model.state_dict())
    want = best_hypotheses(beam_generator(fresh, tgt_dict, 6))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(before, after))
    assert_same_hypotheses(after, want, atol=1e-6)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_attention_is_the_papers_formula(attention):
    """Scores, padding mask and context of one decoder step, against the formulas written out per source
    position: luong s^T W h_j, bahdanau v^T tanh(W_q s + b + W_k h_j); alpha = softmax over the real tokens."""
    decoder = tiny(1, attention).decoder
    att = decoder.attention
    B, S, C, Q = 3, 5, 16, decoder.first_layer_hidden_size
    g = torch.Generator().manual_seed(0)
    query, values = torch.randn(B, Q, generator=g, dtype=torch.double), torch.randn(B, S, C, generator=g, dtype=torch.double)
    padding = torch.zeros(S, B, dtype=torch.bool)
    padding[:2, 1] = True  # sentence 1 is left padded by 2
    bias = attention_mask_bias(padding, values.dtype)
    context, weights = attend(att.scores(query, att.project_keys(values), bias), values)

    expected = torch.empty(B, S, dtype=torch.double)
    for b in range(B):
        for j in range(S):
            if attention == "luong":
                expected[b, j] = query[b] @ att.key_proj.weight @ values[b, j]
            else:
                hidden = att.query_proj.weight @ query[b] + att.query_proj.bias + att.key_proj.weight @ values[b, j]
                expected[b, j] = att.v.weight[0] @ torch.tanh(hidden)
    expected = expected.masked_fill(padding.t(), float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)  # the softmax is taken in float32
    assert torch.all(weights[1, :2] == 0)
    torch.testing.assert_close(context, torch.einsum("bs,bsc->bc", weights, values), rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 4])
def test_split_first_layer_is_the_cell(groups):
    """With one group the decoder computes the first layer's gates split (embeddings for all steps at once,
    [a_{t-1}; s_{t-1}] per step): outputs and every gradient equal those of GroupLSTMCell on [e_t; a_{t-1}]."""
    model = tiny(groups)
    src, lengths = left_padded_batch([5, 3, 4])
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 5))], 1)
    results = []
    for split in (True, False):
        model.decoder.split_first_layer = split
        model.zero_grad()
        lp, _ = log_probs(model, src, lengths, prev)
        (lp * torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype).view_as(lp)).sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.decoder.split_first_layer = True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=0, atol=1e-12, msg=name)


def training_step_waits(model):
    """What the forward and backward of a padded batch read back to the host (``device_waits``)."""
    src, lengths = left_padded_batch([5, 3, 4])
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 5))], 1)
    with device_waits() as waits:
        lp, _ = log_probs(model, src, lengths, prev)
        lp.sum().backward()
    return waits


@pytest.mark.parametrize("design", [*DESIGNS, "residual"])
def test_a_training_step_never_waits_for_the_device(fused_mode, design):
    """Forward and backward of a padded batch in training mode read no tensor back to the host: on a GPU each
    such read waits for every queued kernel, and the host stops queueing the next ones."""
    fused_mode(True)
    model = tiny(4, "luong", *(RESIDUAL if design == "residual" else DESIGNS[design])).train()
    waits = training_step_waits(model)
    assert waits == [], waits


def test_backward_fills_no_zero_weight_gradient():
    """One-group weights are taken apart by squeeze and split (the split first layer, aten's LSTM at K = 1),
    whose gradients are views and one concatenation: the model's backward runs no select_backward or
    slice_backward to the shape of a weight (each a zero-filled weight-sized gradient and a copy, then a sum)."""
    model = tiny(1)
    src, lengths = left_padded_batch([5, 3, 4])
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 5))], 1)
    lp, _ = log_probs(model, src, lengths, prev)
    with Dispatched(keep_args=("select_backward", "slice_backward")) as ops:
        lp.sum().backward()
    # the shapes that select_backward and slice_backward filled with zeros: args (grad, input_sizes, dim, ...)
    filled = [tuple(args[1]) for calls in ops.args.values() for args in calls]
    weights = {tuple(w.shape[i:]) for w in model.parameters() for i in (0, 1) if w.dim() > 1}
    assert model.decoder.first_layer.weight_ih.grad is not None
    assert not weights & set(filled), (weights & set(filled), filled)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
@pytest.mark.parametrize("first_groups", [1, 2])
@pytest.mark.parametrize("groups", [1, 4])
def test_deferred_weight_gradients_equal_per_step_ones(groups, first_groups, attention):
    """The decoder loop computes its weights' gradients, and those of the attention's keys and values, once over
    all steps (deferred_weight_grads): every parameter's gradient equals the one of the per-step computation
    (--grnn-no-defer-weight-grads); the keys' and values' gradients are one product each, after the loop."""
    model = tiny(groups, attention, "--decoder-first-layer-groups", str(first_groups))
    src, lengths = left_padded_batch([5, 3, 4])
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 5))], 1)
    grads = []
    for defer in (True, False):
        model.decoder.backend_setting = model.decoder.backend_setting.replace(defer_weight_grads=defer)
        model.zero_grad()
        lp, _ = log_probs(model, src, lengths, prev)
        with Dispatched(keep_args=("bmm", "baddbmm")) as ops:
            (lp * torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype).view_as(lp)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        # products as large as the values (3 x 5 x 16) or luong's keys (3 x 16 x 5, transposed): per step their
        # gradients' outer products, or, deferred, one product per matrix after the loop
        outs = [(a.size(0), a.size(1), b.size(2)) for name in ("bmm", "baddbmm") for *_, a, b in ops.args[name]]
        matrices = 2 if attention == "luong" else 1
        assert sum(o in ((3, 5, 16), (3, 16, 5)) for o in outs) == (matrices if defer else 6 * matrices), outs
    assert grads[0].keys() == grads[1].keys() and any("first_layer" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("groups", [1, 4])
def test_source_padding_does_not_change_the_output(groups, design):
    model = tiny(groups, "bahdanau", *DESIGNS[design])
    src, lengths = left_padded_batch([6, 3, 4], seed=1)
    prev = torch.cat([torch.full((3, 1), 2), torch.randint(4, VOCAB, (3, 4))], 1)
    batch, batch_attn = log_probs(model, src, lengths, prev)
    right_padded = utils.convert_padding_direction(src, 1, left_to_right=True)
    batch_right, _ = log_probs(model, right_padded, lengths, prev)
    for b in range(3):
        alone = src[b : b + 1, src.size(1) - int(lengths[b]) :]  # 1 x n, no padding
        out, attn = log_probs(model, alone, lengths[b : b + 1], prev[b : b + 1])
        torch.testing.assert_close(batch[b : b + 1], out, rtol=0, atol=1e-10)
        torch.testing.assert_close(batch_right[b : b + 1], out, rtol=0, atol=1e-10)
        # attention columns line up with the (left-padded) src_tokens, as --print-alignment expects
        torch.testing.assert_close(batch_attn[b : b + 1, :, src.size(1) - int(lengths[b]) :], attn, rtol=0, atol=1e-10)


def test_named_architectures_build_with_their_sizes():
    def check(m, embed, d, enc_layers, first, dec_hidden, dec_layers, groups):
        enc, dec = m.encoder, m.decoder
        assert enc.embed_tokens.embedding_dim == embed and dec.embed_tokens.embedding_dim == embed
        bi = enc.bidirectional
        assert (bi.input_size, bi.hidden_size, bi.bidirectional, bi.groups) == (embed, d, True, groups)
        up = enc.upper
        assert (up.input_size, up.hidden_size, up.num_layers, up.groups) == (2 * d, 2 * d, enc_layers - 1, groups)
        cell = dec.first_layer
        assert (cell.input_size, cell.hidden_size, cell.groups) == (embed + first, first, 1)  # footnote 2
        up = dec.upper
        assert (up.input_size, up.hidden_size, up.num_layers, up.groups) == (first, dec_hidden, dec_layers - 1, groups)
        assert dec.dropout_module.p == 0.1 and dec.dropout_out_module.p == 0.5

    check(build("group_rnnsearch_iwslt", device="meta"), 256, 256, 2, 512, 256, 2, groups=2)
    check(build("group_rnnsearch_wmt", device="meta"), 512, 1024, 4, 2048, 1024, 4, groups=2)
    check(build("group_rnnsearch_gigaword", device="meta"), 512, 512, 2, 1024, 512, 2, groups=2)
    check(build("group_rnnsearch", device="meta"), 256, 256, 2, 512, 256, 2, groups=1)  # dense baseline

    # the README's Table 2 figure at K = 2: LSTM(I, H) has 4H(I + H) weights / K plus 8H biases
    def lstm(i, h, k):
        return 4 * h * (i + h) // k + 8 * h

    iwslt = build("group_rnnsearch_iwslt", device="meta")
    expected = 2 * lstm(256, 256, 2) + lstm(512, 512, 2) + lstm(768, 512, 1) + lstm(512, 256, 2)
    assert recurrent_parameter_count(iwslt) == expected == 4_601_856

    # Gigaword: every parameter U(-0.05, 0.05), padding rows zero
    giga = build("group_rnnsearch_gigaword", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
                 "--encoder-hidden-size", "32", "--decoder-first-layer-hidden-size", "64",
                 "--decoder-hidden-size", "32")  # fmt: skip
    for name, p in giga.named_parameters():
        assert p.abs().max() <= 0.05, name
        assert p.abs().max() > 0.04, name  # really drawn from the whole interval, not a module default
    assert torch.all(giga.encoder.embed_tokens.weight[1] == 0)


def test_tied_embeddings():
    m = build("group_rnnsearch", "--share-all-embeddings", "--decoder-out-embed-dim", "256", device="meta")
    assert m.encoder.embed_tokens is m.decoder.embed_tokens
    assert m.decoder.output_projection.weight is m.decoder.embed_tokens.weight
    m = build("group_rnnsearch", "--share-decoder-input-output-embed", "--decoder-out-embed-dim", "256", device="meta")
    assert m.decoder.output_projection.weight is m.decoder.embed_tokens.weight
    assert m.encoder.embed_tokens is not m.decoder.embed_tokens


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--encoder-groups", "3"], "--encoder-groups 3 does not divide --encoder-embed-dim 256"),
        (["--encoder-embed-dim", "255", "--encoder-groups", "5", "--encoder-hidden-size", "256"],
         "--encoder-groups 5 does not divide --encoder-hidden-size 256"),
        (["--decoder-groups", "3"], "--decoder-groups 3 does not divide --decoder-first-layer-hidden-size 512"),
        (["--decoder-first-layer-groups", "3"], "--decoder-first-layer-groups 3 does not divide"),
        (["--share-decoder-input-output-embed", "--decoder-out-embed-dim", "128"],
         "--share-decoder-input-output-embed requires --decoder-out-embed-dim"),
        (["--share-all-embeddings", "--decoder-embed-dim", "128", "--decoder-out-embed-dim", "128"],
         "--share-all-embeddings requires --encoder-embed-dim"),
        (["--decoder-layers", "0"], "--decoder-layers must be >= 1"),
        (["--init-uniform", "-1"], "--init-uniform must be >= 0"),
        (["--encoder-groups", "2", "--factorize-rank", "3"], "--factorize-rank 3 is not divisible by --encoder-groups 2"),
        (["--decoder-groups", "4", "--factorize-rank", "6"], "--factorize-rank 6 is not divisible by --decoder-groups 4"),
        (["--cell", "sru", "--factorize-rank", "8"], "cannot be used with --cell sru"),
    ],
)  # fmt: skip
def test_invalid_flags_raise_value_error_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build("group_rnnsearch", *flags, device="meta")


def test_invalid_flags_without_the_parser():
    args = parse("group_rnnsearch", [])
    args.attention_type = "dot"  # argparse's choices stop this on the command line, not programmatic use
    task = TranslationTask(args, make_dictionary(), make_dictionary())
    with pytest.raises(ValueError, match="--attention-type"):
        GroupRNNSearchModel.build_model(args, task)
    args = parse("group_rnnsearch", ["--share-all-embeddings"])
    task = TranslationTask(args, make_dictionary(), make_dictionary(VOCAB + 4))
    with pytest.raises(ValueError, match="--share-all-embeddings requires a joined dictionary"):
        GroupRNNSearchModel.build_model(args, task)
    args = parse("group_rnnsearch", [])
    args.cell = "gru"
    with pytest.raises(ValueError, match="--cell must be one of lstm, sru, got 'gru'"):
        GroupRNNSearchModel.build_model(args, TranslationTask(args, make_dictionary(), make_dictionary()))


def test_unknown_cell_on_the_command_line_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse("group_rnnsearch", ["--cell", "gru"])
    assert "argument --cell: invalid choice: 'gru'" in capsys.readouterr().err


def test_designs_replace_the_encoder_and_upper_decoder_layers_only():
    """--cell sru / --factorize-rank: the encoder layers and the decoder layers above the first change, the
    attention layer stays an LSTM cell; the parameter count follows the layers' formulas."""
    sizes = ["--encoder-groups", "2", "--decoder-groups", "2"]
    m = build("group_rnnsearch", *sizes, "--cell", "sru", device="meta")
    enc, dec = m.encoder, m.decoder
    assert isinstance(enc.bidirectional, SRU) and enc.bidirectional.bidirectional
    assert enc.bidirectional.has_projection(0)  # 256 inputs, 2 x 256 outputs: W_x
    assert isinstance(enc.upper, SRU) and not enc.upper.has_projection(0)  # 512 -> 512: the identity highway
    assert isinstance(dec.upper, SRU) and dec.upper.has_projection(0)  # 512 attentional vector -> 256
    assert type(dec.first_layer) is GroupLSTMCell
    # SRU(I, H): 3 or 4 blocks of H x I / K and 2H biases per direction; the first decoder layer an LSTMCell
    expected = 2 * (4 * 256 * 256 // 2 + 512) + (3 * 512 * 512 // 2 + 1024) + (4 * 256 * 512 // 2 + 512)
    expected += 4 * 512 * (768 + 512) + 8 * 512
    assert recurrent_parameter_count(m) == expected

    m = build("group_rnnsearch", *sizes, "--factorize-rank", "64", device="meta")
    enc, dec = m.encoder, m.decoder
    assert all(isinstance(x, FactorizedLSTM) and x.rank == 64 for x in (enc.bidirectional, enc.upper, dec.upper))
    assert type(dec.first_layer) is GroupLSTMCell

    def flstm(i, h, r, k):  # W1 r x (I + H), W2 4H x r, divided by K; one bias of 4H
        return (r * (i + h) + 4 * h * r) // k + 4 * h

    expected = 2 * flstm(256, 256, 64, 2) + flstm(512, 512, 64, 2) + flstm(512, 256, 64, 2)
    assert recurrent_parameter_count(m) == expected + 4 * 512 * (768 + 512) + 8 * 512


@pytest.mark.parametrize("design", DESIGNS)
def test_recurrent_parameter_count_covers_exactly_the_recurrent_layers(design):
    m = tiny(2, "bahdanau", *DESIGNS[design])
    layers = (GroupLSTM, GroupLSTMCell, FactorizedLSTM, SRU)
    recurrent = {id(p) for mod in m.modules() if isinstance(mod, layers) for p in mod.parameters()}
    assert recurrent_parameter_count(m) == sum(p.numel() for p in m.parameters() if id(p) in recurrent)
    assert recurrent_parameter_count(m.decoder.attention) == 0


# --- end to end through fairseq's command line entry points, in process --------------------------------------


def write_reversal_task(root, seed=0):
    """Learn to reverse sequences of 3-8 letters: 2000 train, 100 valid, 50 test pairs."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    for split, n in (("train", 2000), ("valid", 100), ("test", 50)):
        src, tgt = [], []
        for _ in range(n):
            seq = [rng.choice(letters) for _ in range(rng.randint(3, 8))]
            src.append(" ".join(seq))
            tgt.append(" ".join(reversed(seq)))
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")


def run_train(data, save_dir, max_epoch, *flags):
    """group_rnnsearch_iwslt at toy sizes. One encoder layer: on this task a second (unidirectional, 2d)
    encoder layer delays learning by tens of epochs, as it does for fairseq's own lstm arch; the two decoder
    layers keep the grouped upper decoder stack in the incremental beam search below."""
    fairseq_train_in_process(
        data, "--task", "translation", "--arch", "group_rnnsearch_iwslt", "--user-dir", USER_DIR,
            "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-hidden-size", "32",
            "--decoder-first-layer-hidden-size", "64", "--decoder-hidden-size", "32",
            "--encoder-layers", "1", "--decoder-layers", "2", "--encoder-groups", "2", "--decoder-groups", "2",
            "--dropout", "0", "--decoder-dropout-out", "0.1", "--optimizer", "adam", "--lr", "5e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50", "--warmup-init-lr", "1e-4",
            "--clip-norm", "1.0", "--batch-size", "64",
            "--criterion", "cross_entropy", "--max-epoch", str(max_epoch), "--save-dir", str(save_dir),
            "--no-epoch-checkpoints", "--cpu", "--seed", "1", "--num-workers", "0", "--log-format", "simple",
            "--no-progress-bar", "--required-batch-size-multiple", "1", *flags,
    )  # fmt: skip


def preprocess_reversal_task(tmp_path):
    """The reversal task written and binarized with fairseq-preprocess's entry point; returns data-bin."""
    from fairseq_cli import preprocess

    raw, data = tmp_path / "raw", tmp_path / "data-bin"
    raw.mkdir()
    write_reversal_task(raw)
    parser = options.get_preprocessing_parser()
    preprocess.main(
        parser.parse_args(
            ["--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(raw / "train"),
             "--validpref", str(raw / "valid"), "--testpref", str(raw / "test"), "--destdir", str(data),
             "--joined-dictionary", "--workers", "1"]
        )
    )  # fmt: skip
    return data


def generate_test_set(data, checkpoint, results_path):
    """fairseq-generate --beam 5 on the test split; returns its output and tokenized BLEU4."""
    from fairseq_cli import generate

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        input_args=[
            str(data), "--user-dir", USER_DIR, "--path", str(checkpoint), "--gen-subset",
            "test", "--beam", "5", "--batch-size", "16", "--required-batch-size-multiple", "1", "--cpu",
            "--print-alignment", "--results-path", str(results_path),
        ],
    )  # fmt: skip
    generate.main(args)
    out = (results_path / "generate-test.txt").read_text()
    return out, float(re.search(r"BLEU4 = ([\d.]+)", out).group(1))


def test_cli_preprocess_train_generate_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    save_dir = tmp_path / "checkpoints"
    data = preprocess_reversal_task(tmp_path)

    run_train(data, save_dir, max_epoch=EPOCHS)

    # checkpoint_best.pt: Adam at this learning rate has occasional one-epoch loss spikes on this toy task
    out, bleu = generate_test_set(data, save_dir / "checkpoint_best.pt", tmp_path / "gen")
    hypotheses = [line for line in out.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 50
    assert sum(line.startswith("A-") for line in out.splitlines()) == 50
    assert bleu >= 90, out[-2000:]

    # resume: a larger --max-epoch continues from checkpoint_last.pt instead of starting over
    caplog.clear()
    run_train(data, save_dir, max_epoch=EPOCHS + 1)
    # fairseq reports the epoch the loaded iterator resumes at; 2000 pairs / 64 per batch = 32 updates an epoch
    loaded = re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch (\d+) @ (\d+) updates\)", caplog.text)
    assert loaded and (int(loaded.group(1)), int(loaded.group(2))) == (EPOCHS + 1, EPOCHS * 32)
    assert f"begin training epoch {EPOCHS + 1}" in caplog.text and "begin training epoch 1\n" not in caplog.text
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == (EPOCHS + 1) * 32  # one more epoch, not a restart


EPOCHS = 15


@pytest.mark.parametrize("design", ["sru", "flstm", "glstm"])
def test_designs_train_and_generate_through_the_cli(tmp_path, design):
    """Each related design trained on the reversal task through fairseq-train's entry point, then
    fairseq-generate --beam 5: it must learn to reverse (an untrained model scores BLEU ~0)."""
    flags = {"sru": ["--cell", "sru"], "flstm": ["--factorize-rank", "32"],
             "glstm": ["--no-shuffle-layers", "--no-shuffle-time"]}[design]  # fmt: skip
    data = preprocess_reversal_task(tmp_path)
    run_train(data, tmp_path / "checkpoints", DESIGN_EPOCHS, *flags)
    out, bleu = generate_test_set(data, tmp_path / "checkpoints" / "checkpoint_best.pt", tmp_path / "gen")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 50
    assert bleu >= 80, out[-2000:]  # measured 95.3 (sru), 94.5 (flstm), 97.7 (glstm) after these 8 epochs


DESIGN_EPOCHS = 8
