"""LightRNN (--lightrnn): the 2-component embedding, the factorized softmax, the table and its reallocation,
the criterion, and train + reallocate + eval-lm + resume through the fairseq CLI."""

import itertools
import math
import re
from types import SimpleNamespace

import pytest
import torch

from grnn_fairseq import tables
from grnn_fairseq.modules.lightrnn import (
    LightRNNVocabulary,
    WordTable,
    accumulate_word_costs,
    allocation_cost,
    reallocate,
    table_shape,
)

from conftest import USER_DIR, fairseq_cli, grammar_sentences


def vocabulary(num_words=50, embed_dim=6, hidden_dim=5, num_rows=None, seed=1, tied=False, dtype=torch.float64):
    torch.manual_seed(seed)
    vocab = LightRNNVocabulary(num_words, embed_dim, hidden_dim, num_rows=num_rows, seed=seed,
                               share_input_output_embed=tied)
    return vocab.to(dtype)


def with_empty_row():
    """9 words in a 4 x 3 table, row 2 left empty: empty cells and a row without words."""
    vocab = vocabulary(num_words=9, num_rows=4)
    assert (vocab.table.num_rows, vocab.table.num_cols) == (4, 3)
    vocab.table.assign(torch.tensor([4, 0, 11, 1, 9, 3, 5, 10, 2]), epoch=0)  # cells 6, 7, 8 stay empty
    assert not vocab.table.occupied()[2].any()
    return vocab


def reference_log_prob(vocab, h, word):
    """log P(word | h) written out from the definitions, one word at a time (h: D)."""
    table, softmax = vocab.table, vocab.softmax
    C = table.num_cols
    cells = set(table.word_cell.tolist())
    r, c = divmod(int(table.word_cell[word]), C)
    row_logits = softmax.row_out.weight @ h + softmax.row_out.bias
    rows_with_words = sorted({cell // C for cell in cells})
    log_p_row = row_logits[r] - torch.logsumexp(row_logits[rows_with_words], 0)
    u = torch.tanh(softmax.cond_hidden.weight @ h + softmax.cond_hidden.bias
                   + softmax.cond_row.weight @ vocab.embedding.row.weight[r])
    col_logits = softmax.col_out.weight @ u + softmax.col_out.bias
    cols_in_row = [j for j in range(C) if r * C + j in cells]
    log_p_col = col_logits[c] - torch.logsumexp(col_logits[cols_in_row], 0)
    return log_p_row + log_p_col


# ---- the table -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("words,rows,shape", [(50, None, (8, 7)), (49, None, (7, 7)), (10008, None, (101, 100)),
                                              (1, None, (1, 1)), (50, 5, (5, 10)), (50, 50, (50, 1))])
def test_table_shape_holds_every_word(words, rows, shape):
    assert table_shape(words, rows) == shape
    R, C = shape
    assert R * C >= words > (R - 1) * C  # no row could be dropped


def test_table_shape_rejects_bad_rows():
    with pytest.raises(ValueError, match="rows must be in"):
        table_shape(50, 51)
    with pytest.raises(ValueError, match="rows must be in"):
        table_shape(50, 0)


def test_initial_allocation_is_a_seeded_permutation():
    a, b, c = WordTable(50, seed=1), WordTable(50, seed=1), WordTable(50, seed=2)
    assert torch.equal(a.word_cell, b.word_cell) and not torch.equal(a.word_cell, c.word_cell)
    assert a.word_cell.unique().numel() == 50 and 0 <= a.word_cell.min() and a.word_cell.max() < 56
    assert int(a.occupied().sum()) == 50
    r, col = a.rows(torch.arange(50)), a.cols(torch.arange(50))
    assert torch.equal(r * a.num_cols + col, a.word_cell)
    assert a.occupied()[r, col].all()


def test_assign_rejects_non_permutations():
    table = WordTable(5, num_rows=2)  # 2 x 3
    with pytest.raises(ValueError, match="share a cell"):
        table.assign(torch.tensor([0, 1, 2, 3, 3]), epoch=2)
    with pytest.raises(ValueError, match="cells must be in"):
        table.assign(torch.tensor([0, 1, 2, 3, 6]), epoch=2)
    table.assign(torch.tensor([5, 4, 3, 2, 1]), epoch=2)
    assert table.word_cell.tolist() == [5, 4, 3, 2, 1] and int(table.realloc_epoch) == 2


# ---- embedding and factorized softmax ---------------------------------------------------------------------


def test_embedding_is_the_sum_of_the_row_and_column_vectors():
    vocab = vocabulary()
    tokens = torch.randint(0, 50, (3, 4))
    x = vocab.embed(tokens)
    assert x.shape == (3, 4, 6)
    rows, cols = vocab.table.rows(tokens), vocab.table.cols(tokens)
    assert torch.equal(x, vocab.embedding.row.weight[rows] + vocab.embedding.col.weight[cols])
    # 2 sqrt(V) vectors, not V: 8 row and 7 column vectors for 50 words
    assert vocab.embedding.row.weight.shape == (8, 6) and vocab.embedding.col.weight.shape == (7, 6)


@pytest.mark.parametrize("make", [vocabulary, with_empty_row, lambda: vocabulary(num_words=49)],
                         ids=["empty-cells", "empty-row", "full-table"])
def test_probabilities_sum_to_one_over_the_vocabulary(make):
    vocab = make()
    h = torch.randn(3, 4, 5, dtype=torch.float64) * 3
    lp = vocab.log_probs(h)
    assert lp.shape == (3, 4, vocab.table.num_words)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_log_probs_follow_the_factorization():
    vocab = with_empty_row()
    h = torch.randn(2, 5, dtype=torch.float64)
    lp = vocab.log_probs(h)  # 2 x V
    for b, w in itertools.product(range(2), range(9)):
        torch.testing.assert_close(lp[b, w], reference_log_prob(vocab, h[b], w), rtol=0, atol=1e-12)


def test_factored_log_probs_and_target_log_probs_match_the_full_distribution():
    vocab = with_empty_row()
    h = torch.randn(3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 9, (3, 4))
    full = vocab.log_probs(h)  # 3 x 4 x V
    torch.testing.assert_close(vocab.target_log_probs(h, target), full.gather(-1, target.unsqueeze(-1)).squeeze(-1),
                               rtol=0, atol=1e-12)
    row_lp, col_lp = vocab.factored_log_probs(h, target)
    assert row_lp.shape == (3, 4, 4) and col_lp.shape == (3, 4, 3)
    assert torch.isneginf(row_lp[..., 2]).all()  # the empty row
    # unmasked (the reallocation costs): every row and column gets mass, each sums to one
    row_all, col_all = vocab.factored_log_probs(h, target, mask_empty=False)
    assert torch.isfinite(row_all).all() and torch.isfinite(col_all).all()
    torch.testing.assert_close(col_all.exp().sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_gradients_reach_every_parameter_and_pass_gradcheck():
    vocab = with_empty_row()
    tokens = torch.tensor([[5, 6, 7], [0, 1, 2]])
    target = torch.tensor([[6, 7, 0], [1, 2, 8]])
    proj = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(vocab.embed(tokens) @ proj)  # 2 x 3 x 5: a one-layer stand-in for the recurrent layers
    vocab.target_log_probs(h, target).sum().backward()
    for name, p in vocab.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(proj.grad).all()
    torch.autograd.gradcheck(lambda x: vocab.log_probs(x), (torch.randn(2, 5, dtype=torch.float64, requires_grad=True),))
    torch.autograd.gradcheck(lambda x: vocab.target_log_probs(x, target[:, :2]),
                             (torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True),))


def test_tied_vectors_are_the_input_vectors():
    vocab = vocabulary(embed_dim=5, hidden_dim=5, tied=True)
    assert vocab.softmax.row_out.weight is vocab.embedding.row.weight
    assert vocab.softmax.col_out.weight is vocab.embedding.col.weight
    untied = vocabulary(embed_dim=5, hidden_dim=5)
    assert tables.count(untied) - tables.count(vocab) == (8 + 7) * 5
    with pytest.raises(ValueError, match="hidden_dim"):
        vocabulary(embed_dim=6, hidden_dim=5, tied=True)


# ---- reallocation ------------------------------------------------------------------------------------------


def random_costs(V, R, C, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 20, (V, 1), generator=g).double()  # some words never seen: cost 0 everywhere
    return counts * torch.rand(V, R, generator=g, dtype=torch.float64), counts * torch.rand(V, C, generator=g, dtype=torch.float64)


def brute_force_optimum(row_cost, col_cost, num_cells):
    C = col_cost.size(1)
    return min(allocation_cost(row_cost, col_cost, torch.tensor(p)) for p in itertools.permutations(range(num_cells), row_cost.size(0)))


@pytest.mark.parametrize("exact_max_words", [100, 0], ids=["exact", "sparse"])
@pytest.mark.parametrize("seed", range(3))
def test_reallocation_is_a_permutation_and_never_costs_more(exact_max_words, seed):
    V, R, C = 60, 8, 8
    row_cost, col_cost = random_costs(V, R, C, seed)
    current = WordTable(V, num_rows=R, seed=seed).word_cell
    new = reallocate(row_cost, col_cost, current, exact_max_words=exact_max_words, candidates=3)
    assert new.dtype == torch.long and new.shape == (V,)
    assert new.unique().numel() == V and 0 <= new.min() and new.max() < R * C
    assert allocation_cost(row_cost, col_cost, new) <= allocation_cost(row_cost, col_cost, current) + 1e-9
    exact = allocation_cost(row_cost, col_cost, reallocate(row_cost, col_cost, current, exact_max_words=V))
    assert allocation_cost(row_cost, col_cost, new) >= exact - 1e-9


def test_exact_reallocation_is_the_optimum():
    for seed in range(3):
        row_cost, col_cost = random_costs(5, 2, 3, seed)  # 5 words, 6 cells: 720 allocations
        new = reallocate(row_cost, col_cost, torch.arange(5), exact_max_words=5)
        assert allocation_cost(row_cost, col_cost, new) == pytest.approx(brute_force_optimum(row_cost, col_cost, 6), abs=1e-12)


def test_sparse_reallocation_with_every_candidate_is_exact():
    row_cost, col_cost = random_costs(40, 7, 6, 0)
    current = WordTable(40, num_rows=7, seed=3).word_cell
    exact = reallocate(row_cost, col_cost, current, exact_max_words=40)
    sparse = reallocate(row_cost, col_cost, current, exact_max_words=0, candidates=7)
    assert allocation_cost(row_cost, col_cost, sparse) == pytest.approx(allocation_cost(row_cost, col_cost, exact), abs=1e-9)


@pytest.mark.parametrize("exact_max_words", [100, 0], ids=["exact", "sparse"])
def test_reallocation_finds_a_planted_allocation(exact_max_words):
    """Costs zero at a planted cell (row and column) and positive elsewhere: both solvers must recover it."""
    V, R, C = 30, 5, 7
    planted = torch.randperm(R * C, generator=torch.Generator().manual_seed(0))[:V]
    row_cost = torch.rand(V, R, dtype=torch.float64) + 0.5
    col_cost = torch.rand(V, C, dtype=torch.float64) + 0.5
    row_cost[torch.arange(V), planted // C] = 0
    col_cost[torch.arange(V), planted % C] = 0
    new = reallocate(row_cost, col_cost, WordTable(V, num_rows=R, seed=5).word_cell, exact_max_words=exact_max_words,
                     candidates=1)
    assert torch.equal(new, planted)


@pytest.mark.parametrize("informative", ["rows", "cols"])
def test_sparse_reallocation_reaches_every_cell_of_the_cheapest_row_or_column(informative):
    """Only rows (or only columns) carry costs: the optimum, 0, needs every cell of each word's best row (column)."""
    V, R, C = 30, 5, 7
    planted = torch.randperm(R * C, generator=torch.Generator().manual_seed(1))[:V]
    row_cost = torch.zeros(V, R, dtype=torch.float64)
    col_cost = torch.zeros(V, C, dtype=torch.float64)
    if informative == "rows":
        row_cost = torch.rand(V, R, dtype=torch.float64) + 0.5
        row_cost[torch.arange(V), planted // C] = 0
    else:
        col_cost = torch.rand(V, C, dtype=torch.float64) + 0.5
        col_cost[torch.arange(V), planted % C] = 0
    new = reallocate(row_cost, col_cost, WordTable(V, num_rows=R, seed=5).word_cell, exact_max_words=0, candidates=1)
    assert new.unique().numel() == V
    assert allocation_cost(row_cost, col_cost, new) == 0


def test_word_costs_sum_each_words_row_and_column_losses():
    vocab = with_empty_row()
    h = torch.randn(2, 6, 5, dtype=torch.float64)
    target = torch.tensor([[0, 1, 0, 3, 8, 8], [0, 5, 1, 1, 0, 4]])
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[1, -1] = False  # padding: word 4 is never counted
    with torch.no_grad():
        row_lp, col_lp = vocab.factored_log_probs(h, target, mask_empty=False)
    row_cost = torch.zeros(9, 4, dtype=torch.float64)
    col_cost = torch.zeros(9, 3, dtype=torch.float64)
    accumulate_word_costs(row_cost, col_cost, row_lp, col_lp, target, mask)
    for w in range(9):
        at = (target == w) & mask
        torch.testing.assert_close(row_cost[w], -row_lp[at].sum(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(col_cost[w], -col_lp[at].sum(0), rtol=0, atol=1e-12)
    assert row_cost[4].abs().sum() == 0 and col_cost[2].abs().sum() == 0
    # the cost of the current allocation is the (unmasked) negative log-likelihood of the counted words
    nll = -(row_lp.gather(-1, vocab.table.rows(target).unsqueeze(-1)) + col_lp.gather(-1, vocab.table.cols(target).unsqueeze(-1)))
    assert allocation_cost(row_cost, col_cost, vocab.table.word_cell) == pytest.approx(float(nll.squeeze(-1)[mask].sum()))


# ---- the model, its flags and the criterion -----------------------------------------------------------------


def build_lightrnn_lm(*flags, vocab=50, task="lightrnn_language_modeling"):
    return tables.build("group_lstm_lm", ["--task", task, "--lightrnn", "--decoder-embed-dim", "16",
                                          "--decoder-hidden-size", "16", *flags], vocab).eval()


def test_lightrnn_lm_incremental_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = build_lightrnn_lm("--decoder-groups", "4", "--decoder-layers", "2")
    tokens = torch.randint(4, 50, (3, 6))
    full = model.get_normalized_probs(model(tokens), log_probs=True)  # B x T x V
    assert full.shape == (3, 6, 50)
    state = {}
    for t in range(6):
        step = model.decoder(tokens[:, : t + 1], incremental_state=state)
        torch.testing.assert_close(model.get_normalized_probs(step, log_probs=True)[:, 0], full[:, t], rtol=0, atol=1e-5)
    probs = model.get_normalized_probs(model(tokens), log_probs=False)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 6), rtol=0, atol=1e-5)


def test_lightrnn_lm_parameters():
    """Brown's vocabulary: only 2 x 101 x 100 vectors instead of 10,008, and no other size changes."""
    flags = ["--task", "lightrnn_language_modeling"]
    light = tables.build("group_lstm_lm_brown", [*flags, "--lightrnn"], 10008, device="meta")
    dense = tables.build("group_lstm_lm_brown", flags, 10008, device="meta")
    rnn = tables.count(dense.decoder.rnn)
    assert tables.count(light.decoder.rnn) == rnn
    E = D = 256  # tied (the architecture's default): row/column output vectors are the input ones
    assert tables.count(dense) == rnn + 10008 * E
    assert tables.count(light) == rnn + (101 + 100) * E + (101 + 100) + (D * D + D) + E * D


def test_lightrnn_flags_fail_clearly():
    with pytest.raises(ValueError, match="--lightrnn cannot be combined with --adaptive-softmax-cutoff"):
        build_lightrnn_lm("--adaptive-softmax-cutoff", "20")
    with pytest.raises(ValueError, match="--lightrnn trains with --task lightrnn_language_modeling"):
        build_lightrnn_lm(task="language_modeling")
    with pytest.raises(ValueError, match="--lightrnn-rows needs --lightrnn"):
        tables.build("group_lstm_lm", ["--task", "language_modeling", "--lightrnn-rows", "4"], 50)
    with pytest.raises(ValueError, match="--decoder-out-embed-dim"):
        build_lightrnn_lm("--share-decoder-input-output-embed", "--decoder-out-embed-dim", "8")
    assert build_lightrnn_lm("--lightrnn-rows", "5").decoder.lightrnn.table.num_cols == 10


def test_task_rejects_a_model_without_lightrnn():
    from fairseq import options

    from grnn_fairseq.tasks.lightrnn_language_modeling import LightRNNLanguageModelingTask

    d = tables.synthetic_dictionary(50)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/dev/null", "--task", "lightrnn_language_modeling", "--arch", "group_lstm_lm"])
    with pytest.raises(ValueError, match="needs a LightRNN model"):
        LightRNNLanguageModelingTask(args, d).build_model(args)


def test_criterion_loss_is_the_negative_log_of_the_normalized_probability():
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    from grnn_fairseq.criterions.lightrnn_cross_entropy import LightRNNCrossEntropyCriterion

    torch.manual_seed(0)
    model = build_lightrnn_lm("--dropout", "0").train()
    d = tables.synthetic_dictionary(50)
    task = SimpleNamespace(target_dictionary=d)
    tokens = torch.randint(4, 50, (2, 7))
    target = torch.randint(4, 50, (2, 7))
    target[1, -2:] = d.pad()
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([7, 5])}, "target": target,
              "ntokens": int(target.ne(d.pad()).sum())}
    lprobs = model.get_normalized_probs(model(tokens), log_probs=True)  # B x T x V
    expected = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[target.ne(d.pad())].sum()
    grads = []
    for criterion in (LightRNNCrossEntropyCriterion(task, sentence_avg=False), CrossEntropyCriterion(task, sentence_avg=False)):
        model.zero_grad()
        loss, sample_size, log = criterion(model, sample)
        assert sample_size == 12 and log["ntokens"] == 12
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- end to end through the CLI ------------------------------------------------------------------------------


REALLOC = re.compile(r"lightrnn: reallocated (\d+) of (\d+) words at the start of epoch (\d+): "
                     r"cost ([\d.]+) -> ([\d.]+) nats/token over (\d+) tokens")


@pytest.fixture(scope="module")
def lightrnn_run(tmp_path_factory):
    """Preprocess a tiny corpus, train a LightRNN group_lstm_lm for 3 epochs (2 reallocations)."""
    tmp = tmp_path_factory.mktemp("lightrnn")
    for split, n, seed in (("train", 600, 1), ("valid", 60, 2), ("test", 60, 3)):
        (tmp / f"{split}.txt").write_text("\n".join(grammar_sentences(n, seed)) + "\n")
    fairseq_cli("fairseq-preprocess", "--only-source", "--trainpref", tmp / "train.txt", "--validpref",
                tmp / "valid.txt", "--testpref", tmp / "test.txt", "--destdir", tmp / "bin", "--workers", "1")
    train_args = [
        tmp / "bin", "--user-dir", USER_DIR, "--task", "lightrnn_language_modeling", "--arch", "group_lstm_lm",
        "--lightrnn", "--criterion", "lightrnn_cross_entropy",
        "--decoder-embed-dim", "32", "--decoder-hidden-size", "32", "--decoder-groups", "2", "--dropout", "0.1",
        "--share-decoder-input-output-embed",
        "--tokens-per-sample", "32", "--sample-break-mode", "none", "--batch-size", "4",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.01", "--clip-norm", "1.0",
        "--save-dir", tmp / "ckpt", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "10",
        "--seed", "1", "--num-workers", "0",
    ]
    first = fairseq_cli("fairseq-train", *train_args, "--max-epoch", "3")
    state = torch.load(tmp / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    return tmp, train_args, first.stdout + first.stderr, state


def load_task_and_model(tmp):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp / "ckpt" / "checkpoint_last.pt")], arg_overrides={"data": str(tmp / "bin")})
    task.load_dataset("train")
    return task, models[0].eval()


def test_lightrnn_trains_and_reallocates_between_epochs(lightrnn_run):
    tmp, _, log, state = lightrnn_run
    reallocations = REALLOC.findall(log)
    assert [int(r[2]) for r in reallocations] == [2, 3], log[-3000:]
    num_words = sum(1 for _ in open(tmp / "bin" / "dict.txt")) + 4
    for moved, words, _, before, after, ntokens in reallocations:
        assert int(words) == num_words and int(moved) > 0
        assert float(after) <= float(before)
        assert int(ntokens) > 4000  # the whole training split
    valid_ppl = [float(x) for x in re.findall(r"valid on 'valid' subset.*?\| ppl ([\d.]+)", log)]
    assert len(valid_ppl) == 3 and valid_ppl[-1] < valid_ppl[0]
    # the checkpoint holds the reallocated table, not the seeded initial one
    cells = state["decoder.lightrnn.table.word_cell"]
    assert int(state["decoder.lightrnn.table.realloc_epoch"]) == 3
    assert cells.unique().numel() == num_words and not torch.equal(cells, WordTable(num_words, seed=1).word_cell)


def test_lightrnn_eval_lm_matches_the_training_loss(lightrnn_run):
    """fairseq-eval-lm (full-vocabulary log-probs, cross_entropy semantics) reports the criterion's valid loss."""
    tmp, _, log, _ = lightrnn_run
    last_valid = float(re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)[-1])
    out = {}
    for split in ("valid", "test"):
        proc = fairseq_cli("fairseq-eval-lm", tmp / "bin", "--user-dir", USER_DIR, "--path", tmp / "ckpt" / "checkpoint_last.pt",
                           "--gen-subset", split, "--tokens-per-sample", "32", "--batch-size", "8",
                           "--required-batch-size-multiple", "1", "--num-workers", "0")
        text = proc.stdout + proc.stderr
        loss, ppl = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text).groups()
        out[split] = float(loss), float(ppl)
    assert out["valid"][0] == pytest.approx(last_valid, abs=6e-4)  # the training log rounds to 3 decimals
    dict_size = sum(1 for _ in open(tmp / "bin" / "dict.txt")) + 4
    assert math.isfinite(out["test"][1]) and out["test"][1] < 6 < dict_size  # the grammar's ~5 choices per word


def test_lightrnn_resume_keeps_the_table(lightrnn_run):
    tmp, train_args, _, state = lightrnn_run
    task, model = load_task_and_model(tmp)
    assert torch.equal(model.decoder.lightrnn.table.word_cell, state["decoder.lightrnn.table.word_cell"])
    row_cost, col_cost, ntokens = task.word_costs(model)
    saved_cost = allocation_cost(row_cost, col_cost, state["decoder.lightrnn.table.word_cell"]) / ntokens
    initial_cost = allocation_cost(row_cost, col_cost, WordTable(len(task.target_dictionary), seed=1).word_cell) / ntokens

    proc = fairseq_cli("fairseq-train", *train_args, "--max-epoch", "4")
    out = proc.stdout + proc.stderr
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch 4 @", out), out[-3000:]  # the next epoch
    reallocations = REALLOC.findall(out)
    assert [int(r[2]) for r in reallocations] == [4]  # once, and not again for the epochs done before
    # the resumed run reallocated from the saved table (its cost), not from a fresh seeded one
    assert float(reallocations[0][3]) == pytest.approx(saved_cost, abs=1e-4)
    assert abs(initial_cost - saved_cost) > 0.01
    new_state = torch.load(tmp / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    moved = int((new_state["decoder.lightrnn.table.word_cell"] != state["decoder.lightrnn.table.word_cell"]).sum())
    assert int(reallocations[0][0]) == moved and int(new_state["decoder.lightrnn.table.realloc_epoch"]) == 4


def test_lightrnn_bounded_cost_sample(lightrnn_run):
    tmp, _, _, _ = lightrnn_run
    task, model = load_task_and_model(tmp)
    _, _, all_tokens = task.word_costs(model)
    row_cost, _, some = task.word_costs(model, max_tokens=500, seed=3)
    assert 500 <= some < 500 + 32 < all_tokens  # whole sequences of 32 tokens, just past the bound
    assert row_cost.sum() > 0


def test_lightrnn_samples_through_hub_interface(lightrnn_run):
    tmp, _, _, _ = lightrnn_run
    from grnn_fairseq.models.group_lstm_lm import GroupLSTMLanguageModel

    hub = GroupLSTMLanguageModel.from_pretrained(str(tmp / "ckpt"), "checkpoint_last.pt", str(tmp / "bin"))
    text = hub.sample("the cat", beam=1, sampling=True, sampling_topk=3, max_len_b=8, seed=1)
    assert text.startswith("the cat") and len(text.split()) > 2
    best = hub.sample("the cat", beam=3, max_len_b=5)
    assert best.split()[2] in {"sees", "likes", "finds", "calls"}  # the grammar's only verbs
