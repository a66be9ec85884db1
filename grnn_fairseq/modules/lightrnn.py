"""LightRNN's 2-component shared embedding: Li, Qin, Yang, Hu and Liu, "LightRNN: Memory and
Computation-Efficient Recurrent Neural Networks", NeurIPS 2016.

Every word w of the vocabulary (V words) sits at one cell (r(w), c(w)) of an R x C table, R*C >= V. Rows
own vectors, columns own vectors; words own none. What this file implements (E: word vector size, D: size
of the features h_t the recurrent layers put out):

* input (``TwoComponentEmbedding``): x_w = x^r_{r(w)} + x^c_{c(w)}, two E-vectors from R + C shared ones.
* output (``FactorizedSoftmax``), P(w | h) = P_r(r(w) | h) * P_c(c(w) | h, r(w)) with

      P_r(i | h)    = softmax_i(Y^r h + b^r)              over the rows holding a word,
      u_i           = tanh(W_h h + W_r x^r_i + b_u)       the column state for row i,
      P_c(j | h, i) = softmax_j(Y^c u_i + b^c)            over the occupied cells of row i.

  Empty cells have probability zero and rows without a word get none, so the V word probabilities sum to
  one exactly and perplexities compare with a full softmax. u_i is the paper's column-step equation
  h^c = f(W x^r + U h^r + b): the paper runs the RNN a second step on the row vector x^r of the word; we
  apply that step once on top of the recurrent features and do not feed it back into the recurrence.
* the table (``WordTable``) and its reallocation (``reallocate``): with the vectors fixed, each word w
  gets the costs l_r(w, i) = -sum_t log P_r(i | h_t) and l_c(w, j) = -sum_t log P_c(j | h_t, r(w)) summed
  over its occurrences t (``accumulate_word_costs``), and words move to the cells of the minimum-cost
  assignment of words to cells, cost l_r(w, i) + l_c(w, j) for cell (i, j). Vectors stay with their
  rows and columns.

Only torch is imported here; scipy only inside ``reallocate``.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError


def table_shape(num_words: int, num_rows: Optional[int] = None) -> Tuple[int, int]:
    """(R, C) of the smallest table with ``num_rows`` rows (default ceil(sqrt(V))) holding every word."""
    if num_words < 1:
        raise ConfigError(f"a LightRNN table needs at least one word, got {num_words}")
    rows = math.isqrt(num_words - 1) + 1 if num_rows is None else num_rows  # ceil(sqrt(V))
    if not 1 <= rows <= num_words:
        raise ConfigError(f"the number of table rows must be in [1, {num_words}] (the vocabulary size), got {rows}")
    return rows, -(-num_words // rows)


class WordTable(nn.Module):
    """Which cell of the R x C table each word sits in: the buffer ``word_cell`` (V), cell = row * C + col.

    The initial allocation is a seeded random one (the paper's cold start). ``realloc_epoch`` (a 0-d
    buffer) is the last epoch whose start reallocated the table, 0 for never: resuming a run mid-epoch
    must not reallocate a second time. Both buffers are saved in checkpoints.
    """

    def __init__(self, num_words: int, num_rows: Optional[int] = None, seed: int = 1):
        super().__init__()
        self.num_words = num_words
        self.num_rows, self.num_cols = table_shape(num_words, num_rows)
        generator = torch.Generator().manual_seed(seed)
        cells = torch.randperm(self.num_rows * self.num_cols, generator=generator, device="cpu")[:num_words]
        self.register_buffer("word_cell", cells)
        self.register_buffer("realloc_epoch", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_words={self.num_words}, rows={self.num_rows}, cols={self.num_cols}"

    def rows(self, tokens: Tensor) -> Tensor:
        """Row of each word id, same shape as ``tokens``."""
        return self.word_cell[tokens] // self.num_cols

    def cols(self, tokens: Tensor) -> Tensor:
        """Column of each word id, same shape as ``tokens``."""
        return self.word_cell[tokens] % self.num_cols

    def occupied(self) -> Tensor:
        """R x C boolean, True where a word sits."""
        R, C = self.num_rows, self.num_cols
        cells = torch.zeros(R * C, dtype=torch.bool, device=self.word_cell.device)
        return cells.index_fill_(0, self.word_cell, True).view(R, C)  # R*C -> R x C

    @torch.no_grad()
    def assign(self, word_cell: Tensor, epoch: int) -> None:
        """Move the words to ``word_cell`` (V distinct cells) in place, and record ``epoch``."""
        check_allocation(word_cell, self.num_words, self.num_rows * self.num_cols)
        self.word_cell.copy_(word_cell)
        self.realloc_epoch.fill_(epoch)


def check_allocation(word_cell: Tensor, num_words: int, num_cells: int) -> None:
    """Raise ValueError unless ``word_cell`` gives ``num_words`` words distinct cells in [0, num_cells)."""
    if word_cell.shape != (num_words,):
        raise ValueError(f"an allocation needs one cell per word: shape {tuple(word_cell.shape)}, V={num_words}")
    if word_cell.numel() and (word_cell.min() < 0 or word_cell.max() >= num_cells):
        raise ValueError(f"cells must be in [0, {num_cells})")
    if torch.unique(word_cell).numel() != num_words:
        raise ValueError("two words share a cell")


class TwoComponentEmbedding(nn.Module):
    """x_w = x^r_{r(w)} + x^c_{c(w)}: R row vectors and C column vectors of size E stand for R*C words."""

    def __init__(self, num_rows: int, num_cols: int, embed_dim: int):
        super().__init__()
        self.row = nn.Embedding(num_rows, embed_dim)
        self.col = nn.Embedding(num_cols, embed_dim)
        nn.init.uniform_(self.row.weight, -0.1, 0.1)
        nn.init.uniform_(self.col.weight, -0.1, 0.1)

    def forward(self, rows: Tensor, cols: Tensor) -> Tensor:
        """rows, cols: ... (long, same shape) -> ... x E."""
        return self.row(rows) + self.col(cols)


class FactorizedSoftmax(nn.Module):
    """P(w | h) = P_r(r(w) | h) * P_c(c(w) | h, r(w)), the column conditioned on the row's input vector.

    input_dim D: size of the features h. row_dim E: size of the row vectors x^r the columns are
    conditioned on (the input embedding's, passed to ``forward``).
    """

    def __init__(self, input_dim: int, row_dim: int, num_rows: int, num_cols: int):
        super().__init__()
        self.row_out = nn.Linear(input_dim, num_rows)  # Y^r, b^r
        self.col_out = nn.Linear(input_dim, num_cols)  # Y^c, b^c
        self.cond_hidden = nn.Linear(input_dim, input_dim)  # W_h, b_u
        self.cond_row = nn.Linear(row_dim, input_dim, bias=False)  # W_r

    def forward(
        self, h: Tensor, row_vectors: Tensor, occupied: Optional[Tensor] = None, rows: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Row and column log-probabilities (float32 or wider).

        h: ... x D, the features.
        row_vectors: R x E, the input row vectors x^r.
        occupied: R x C boolean (``WordTable.occupied``): empty cells and empty rows get probability zero.
            None normalizes over every row and column (the reallocation costs: what a word would pay in a
            cell that is empty now).
        rows: ... (long) or None. Given: the row each position's column is conditioned on (the target's).
        Returns row_lp: ... x R, and col_lp: ... x C (log P_c(j | h, rows)) when ``rows`` is given,
        else ... x R x C (log P_c(j | h, i) for every row i). Rows without a word are not masked in
        col_lp (their row probability is zero already), so col_lp stays finite there.
        """
        wide = torch.promote_types(h.dtype, torch.float32)  # fp16/bf16 -> float32, float64 stays
        row_logits = self.row_out(h).to(wide)  # ... x R
        context = self.cond_row(row_vectors)  # R x E -> R x D
        hidden = self.cond_hidden(h)  # ... x D
        if rows is None:
            u = torch.tanh(hidden.unsqueeze(-2) + context)  # ... x 1 x D + R x D -> ... x R x D
        else:
            u = torch.tanh(hidden + context[rows])  # ... x D
        col_logits = self.col_out(u).to(wide)  # ... x R x C, or ... x C
        if occupied is not None:
            nonempty_row = occupied.any(1)  # R
            row_logits = row_logits.masked_fill(~nonempty_row, float("-inf"))
            empty_cell = ~occupied & nonempty_row.unsqueeze(1)  # R x C
            col_logits = col_logits.masked_fill(empty_cell if rows is None else empty_cell[rows], float("-inf"))
        return F.log_softmax(row_logits, dim=-1), F.log_softmax(col_logits, dim=-1)


class LightRNNVocabulary(nn.Module):
    """The whole 2-component vocabulary of a language model: the table, input vectors, factorized softmax.

    num_words V; embed_dim E (input vectors); hidden_dim D (features fed to the softmax); num_rows R
    (default ceil(sqrt(V))); seed: of the initial allocation; share_input_output_embed: the output row and
    column vectors Y^r, Y^c are the input ones (needs D == E).
    """

    def __init__(
        self,
        num_words: int,
        embed_dim: int,
        hidden_dim: int,
        num_rows: Optional[int] = None,
        seed: int = 1,
        share_input_output_embed: bool = False,
    ):
        super().__init__()
        self.table = WordTable(num_words, num_rows, seed=seed)
        R, C = self.table.num_rows, self.table.num_cols
        self.embedding = TwoComponentEmbedding(R, C, embed_dim)
        self.softmax = FactorizedSoftmax(hidden_dim, embed_dim, R, C)
        if share_input_output_embed:
            if hidden_dim != embed_dim:
                raise ConfigError(f"tied LightRNN vectors need hidden_dim ({hidden_dim}) == embed_dim ({embed_dim})")
            self.softmax.row_out.weight = self.embedding.row.weight  # R x E
            self.softmax.col_out.weight = self.embedding.col.weight  # C x E

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens: ... (word ids) -> ... x E."""
        return self.embedding(self.table.rows(tokens), self.table.cols(tokens))

    def log_probs(self, h: Tensor) -> Tensor:
        """log P(w | h) for every word: ... x D -> ... x V (sums to one over the V words)."""
        row_lp, col_lp = self.softmax(h, self.embedding.row.weight, self.table.occupied())  # ... x R, ... x R x C
        cell_lp = row_lp.unsqueeze(-1) + col_lp  # ... x R x C, -inf at empty cells
        cell_lp = cell_lp.flatten(-2)  # ... x R x C -> ... x R*C
        return cell_lp.index_select(-1, self.table.word_cell)  # ... x R*C -> ... x V

    def factored_log_probs(self, h: Tensor, target: Tensor, mask_empty: bool = True) -> Tuple[Tensor, Tensor]:
        """Row log-probs (... x R) and the column log-probs in the target's row (... x C).

        h: ... x D; target: ... (word ids). ``mask_empty=False`` normalizes over all cells (see
        ``FactorizedSoftmax.forward``).
        """
        occupied = self.table.occupied() if mask_empty else None
        return self.softmax(h, self.embedding.row.weight, occupied, rows=self.table.rows(target))

    def target_log_probs(self, h: Tensor, target: Tensor) -> Tensor:
        """log P(target | h), ... x D and ... -> ...: ``log_probs(h)`` at the target, without the V-sized work."""
        row_lp, col_lp = self.factored_log_probs(h, target)  # ... x R, ... x C
        row = self.table.rows(target).unsqueeze(-1)  # ... x 1
        col = self.table.cols(target).unsqueeze(-1)  # ... x 1
        return (row_lp.gather(-1, row) + col_lp.gather(-1, col)).squeeze(-1)


@torch.no_grad()
def accumulate_word_costs(
    row_cost: Tensor, col_cost: Tensor, row_lp: Tensor, col_lp: Tensor, target: Tensor, mask: Tensor
) -> None:
    """Add -log P_r and -log P_c of every position to its target word's costs, in place.

    row_cost: V x R and col_cost: V x C accumulators; row_lp: ... x R; col_lp: ... x C (the target's row,
    ``LightRNNVocabulary.factored_log_probs(..., mask_empty=False)``); target: ... word ids; mask: ...
    boolean, the positions that count (not padding).
    """
    words = target[mask]  # N
    row_cost.index_add_(0, words, -row_lp[mask].to(row_cost.dtype))  # ... x R -> N x R
    col_cost.index_add_(0, words, -col_lp[mask].to(col_cost.dtype))  # ... x C -> N x C


def allocation_cost(row_cost: Tensor, col_cost: Tensor, word_cell: Tensor) -> float:
    """sum_w l_r(w, r(w)) + l_c(w, c(w)) of the allocation ``word_cell`` (V x R, V x C costs)."""
    C = col_cost.size(1)
    words = torch.arange(word_cell.numel(), device=word_cell.device)
    word_cell = word_cell.to(row_cost.device)
    return float(row_cost[words, word_cell // C].sum() + col_cost[words, word_cell % C].sum())


def reallocate(
    row_cost: Tensor, col_cost: Tensor, word_cell: Tensor, exact_max_words: int = 2048, candidates: int = 4
) -> Tensor:
    """The allocation (V cells) minimizing sum_w l_r(w, r(w)) + l_c(w, c(w)), each cell holding one word.

    row_cost: V x R, col_cost: V x C, word_cell: V (the current allocation). Returns a LongTensor V on the
    device of ``word_cell``.

    V <= ``exact_max_words``: the exact minimum-cost assignment of the V words to the R*C cells (scipy's
    linear_sum_assignment on the dense V x R*C cost). Larger V: the exact minimum-cost assignment on a
    sparse graph in which each word may take its current cell, any cell of its ``candidates`` cheapest
    rows and any cell of its ``candidates`` cheapest columns (scipy's min_weight_full_bipartite_matching;
    (R + C) * candidates edges a word). The current allocation is always feasible, so the cost never
    rises; the result is a permutation of the words into distinct cells either way.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    V, R = row_cost.shape
    C = col_cost.size(1)
    if col_cost.size(0) != V or word_cell.shape != (V,):
        raise ValueError(f"costs V x R, V x C and the allocation V disagree: {row_cost.shape}, {col_cost.shape}, {word_cell.shape}")
    rc = row_cost.detach().double().cpu().numpy()  # V x R
    cc = col_cost.detach().double().cpu().numpy()  # V x C
    current = word_cell.cpu().numpy()
    if V <= exact_max_words:
        cost = (rc[:, :, None] + cc[:, None, :]).reshape(V, R * C)  # V x R x C -> V x R*C
        words, cells = linear_sum_assignment(cost)
    else:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import min_weight_full_bipartite_matching

        k_r, k_c = min(candidates, R), min(candidates, C)
        best_rows = np.argpartition(rc, k_r - 1, axis=1)[:, :k_r]  # V x k_r
        best_cols = np.argpartition(cc, k_c - 1, axis=1)[:, :k_c]  # V x k_c
        in_rows = (best_rows[:, :, None] * C + np.arange(C)).reshape(V, k_r * C)  # V x k_r x C -> V x k_r*C
        in_cols = (np.arange(R)[:, None] * C + best_cols[:, None, :]).reshape(V, R * k_c)  # V x R x k_c -> V x R*k_c
        cand = np.concatenate([in_rows, in_cols, current[:, None]], axis=1)  # + the current cell
        key = np.unique(np.repeat(np.arange(V), cand.shape[1]) * (R * C) + cand.ravel())  # distinct (word, cell)
        w, cell = key // (R * C), key % (R * C)
        # + 1: every edge weighs more than 0, so no edge is read as missing; every word takes exactly one edge
        weight = rc[w, cell // C] + cc[w, cell % C] + 1.0
        graph = csr_matrix((weight, (w, cell)), shape=(V, R * C))
        words, cells = min_weight_full_bipartite_matching(graph)
    assert (words == np.arange(V)).all()
    return torch.as_tensor(np.asarray(cells, dtype=np.int64), device=word_cell.device)
