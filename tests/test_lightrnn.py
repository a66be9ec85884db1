"""LightRNN: the 2-component embedding, the factorized softmax, the table and its reallocation."""

import itertools

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
