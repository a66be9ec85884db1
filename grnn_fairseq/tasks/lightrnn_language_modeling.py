"""lightrnn_language_modeling: fairseq's language_modeling plus LightRNN's word reallocation between epochs
(Li et al., NeurIPS 2016, the bootstrap of the word allocation table).

At the start of every epoch after the first, with the model's vectors fixed, one forward pass (eval mode,
no dropout) over the training data, or over a seeded random sample of ``--lightrnn-realloc-tokens`` target
tokens of it, sums for every word w its costs l_r(w, i) = -sum log P_r(i) over all rows i and
l_c(w, j) = -sum log P_c(j | its current row) over all columns j (V x R and V x C); the table then takes the
minimum-cost assignment of words to cells (``grnn_fairseq.modules.lightrnn.reallocate``). Everything else
(data, eval-lm, generation) is ``language_modeling``'s.
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from grnn_fairseq.errors import ConfigError
from grnn_fairseq.models.group_lstm_lm import LIGHTRNN_TASK
from grnn_fairseq.modules.lightrnn import accumulate_word_costs, allocation_cost, reallocate

logger = logging.getLogger(__name__)


@dataclass
class LightRNNLanguageModelingConfig(LanguageModelingConfig):
    lightrnn_realloc_tokens: int = field(
        default=0,
        metadata={"help": "target tokens of the training data the reallocation costs are summed over "
                          "(a seeded random sample of sequences); 0: all of them"},
    )
    lightrnn_exact_max_words: int = field(
        default=2048,
        metadata={"help": "vocabularies up to this size get the exact assignment over all V x R*C (word, cell) "
                          "costs; larger ones the exact assignment restricted to --lightrnn-candidates (at "
                          "V = 10k on Brown the full one took 190 s of CPU, the restricted one 10 s)"},
    )
    lightrnn_candidates: int = field(
        default=4,
        metadata={"help": "restricted assignment: each word may take its cell or any cell of its N cheapest "
                          "rows or N cheapest columns"},
    )


@register_task(LIGHTRNN_TASK, dataclass=LightRNNLanguageModelingConfig)
class LightRNNLanguageModelingTask(LanguageModelingTask):
    """Language modelling with a LightRNN model (``--arch group_lstm_lm* --lightrnn``)."""

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        if getattr(getattr(model, "decoder", None), "lightrnn", None) is None:
            raise ConfigError(f"--task {LIGHTRNN_TASK} needs a LightRNN model: --arch group_lstm_lm with --lightrnn")
        return model

    def begin_epoch(self, epoch, model):
        """Reallocate the words at the start of every epoch after the first (once: the epoch is recorded)."""
        super().begin_epoch(epoch, model)
        table = model.decoder.lightrnn.table
        if epoch <= 1 or int(table.realloc_epoch) >= epoch:
            return
        start = time.time()
        row_cost, col_cost, ntokens = self.word_costs(model, self.args.lightrnn_realloc_tokens, self.args.seed + epoch)
        solve_start = time.time()
        cells = reallocate(row_cost, col_cost, table.word_cell, self.args.lightrnn_exact_max_words,
                           self.args.lightrnn_candidates)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(cells, src=0)  # every worker holds rank 0's table, whatever float noise did
        before = allocation_cost(row_cost, col_cost, table.word_cell)
        after = allocation_cost(row_cost, col_cost, cells)
        moved = int((cells != table.word_cell).sum())
        table.assign(cells, epoch)
        logger.info(
            f"lightrnn: reallocated {moved} of {table.num_words} words at the start of epoch {epoch}: "
            f"cost {before / ntokens:.4f} -> {after / ntokens:.4f} nats/token over {ntokens} tokens "
            f"(costs {solve_start - start:.1f}s, assignment {time.time() - solve_start:.1f}s)"
        )

    @torch.no_grad()
    def word_costs(self, model, max_tokens: int = 0, seed: int = 1):
        """V x R row costs, V x C column costs (float64) and the number of target tokens they sum over.

        Over the whole training split, or over a random sample (``seed``) of its sequences holding at least
        ``max_tokens`` tokens when that is > 0. The model runs in eval mode (no dropout).
        """
        vocab = model.decoder.lightrnn
        dataset = self.dataset("train")
        order = np.arange(len(dataset))
        if max_tokens > 0:
            order = np.random.RandomState(seed).permutation(len(dataset))
            cumulative = np.cumsum(dataset.sizes[order])
            order = np.sort(order[: int(np.searchsorted(cumulative, max_tokens)) + 1])
        device = vocab.table.word_cell.device
        table = vocab.table
        row_cost = torch.zeros(table.num_words, table.num_rows, dtype=torch.float64, device=device)
        col_cost = torch.zeros(table.num_words, table.num_cols, dtype=torch.float64, device=device)
        batch_size = self.args.batch_size or 32
        was_training = model.training
        model.eval()
        ntokens = 0
        try:
            for start in range(0, len(order), batch_size):
                sample = dataset.collater([dataset[int(i)] for i in order[start : start + batch_size]])
                sample = utils.apply_to_sample(lambda t: t.to(device), sample)
                features, _ = model(**sample["net_input"])  # B x T x D
                target = sample["target"]  # B x T
                row_lp, col_lp = vocab.factored_log_probs(features, target, mask_empty=False)
                mask = target.ne(self.output_dictionary.pad())
                accumulate_word_costs(row_cost, col_cost, row_lp, col_lp, target, mask)
                ntokens += int(mask.sum())
        finally:
            model.train(was_training)
        return row_cost, col_cost, max(ntokens, 1)
