"""group_lstm_lm: an LSTM language model on GroupLSTM (Gao et al., NAACL 2018, section 4.1 and Table 1).

embedding -> dropout -> GroupLSTM stack -> dropout -> (projection) -> softmax over the vocabulary.
The related designs of the paper's comparisons replace the stack: ``--no-shuffle-layers --no-shuffle-time``
(G-LSTM), ``--factorize-rank r`` (F-LSTM, FactorizedLSTM) and ``--cell sru`` (SRU).
Runs with ``--task language_modeling`` and everything fairseq offers for it: fairseq-eval-lm for
perplexity, fairseq-generate / hub ``sample`` for sampling (incremental decoding), adaptive softmax.

``--lightrnn`` replaces the embedding and the softmax by LightRNN's 2-component shared embedding (Li et
al., NeurIPS 2016; ``grnn_fairseq/modules/lightrnn.py``), trained with ``--task
lightrnn_language_modeling`` (which reallocates the words between epochs) and, cheapest, ``--criterion
lightrnn_cross_entropy``; ``get_normalized_probs`` still returns log-probabilities over the whole
vocabulary, so fairseq-eval-lm, sampling and ``cross_entropy`` work unchanged.
"""

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.modules import AdaptiveSoftmax
from fairseq.tasks.translation import TranslationTask
from torch import Tensor

from grnn_fairseq.errors import ConfigError
from grnn_fairseq.models.common import (
    add_backend_args,
    backend_defaults,
    backend_from_args,
    check_cell,
    check_groups,
    incremental_packing,
    sequence_dropout,
    under_backend,
)
from grnn_fairseq.modules import CELLS, recurrent_stack
from grnn_fairseq.modules.lightrnn import LightRNNVocabulary
from grnn_fairseq.modules.products import Linear, linear
from grnn_fairseq.safeguards import check_dictionary_sizes

DEFAULT_MAX_TARGET_POSITIONS = 100000
LIGHTRNN_TASK = "lightrnn_language_modeling"  # registered in grnn_fairseq/tasks


@register_model("group_lstm_lm")
class GroupLSTMLanguageModel(FairseqLanguageModel):
    """A language model whose recurrent layers are group LSTMs (``--decoder-groups K``)."""

    @staticmethod
    def add_args(parser):
        # fmt: off
        parser.add_argument('--dropout', type=float, metavar='D',
                            help='dropout between LSTM layers (and default of the two below)')
        parser.add_argument('--decoder-embed-dim', type=int, metavar='N', help='word embedding size')
        parser.add_argument('--decoder-hidden-size', type=int, metavar='N', help='LSTM hidden size H')
        parser.add_argument('--decoder-layers', type=int, metavar='N', help='number of LSTM layers')
        parser.add_argument('--decoder-groups', type=int, metavar='K',
                            help='groups K of every GroupLSTM layer (1 = dense LSTM)')
        parser.add_argument('--decoder-out-embed-dim', type=int, metavar='N',
                            help='size of the output projection (a linear layer from H is added if it differs)')
        parser.add_argument('--decoder-dropout-in', type=float, metavar='D',
                            help='dropout on the embeddings (default: --dropout)')
        parser.add_argument('--decoder-dropout-out', type=float, metavar='D',
                            help='dropout before the softmax (default: --dropout)')
        parser.add_argument('--share-decoder-input-output-embed', action='store_true',
                            help='tie input and output embeddings (Press and Wolf 2017)')
        parser.add_argument('--no-shuffle-layers', action='store_true',
                            help='no representation rearrangement between layers')
        parser.add_argument('--no-shuffle-time', action='store_true',
                            help='no representation rearrangement between time steps')
        parser.add_argument('--variational-dropout', action='store_true',
                            help='Gal and Ghahramani dropout: one mask per sequence on inputs, outputs, '
                                 'between layers and on the recurrent state (rate --dropout there; '
                                 'no recurrent state dropout with --cell sru, which has no W_hh)')
        parser.add_argument('--cell', choices=CELLS,
                            help='recurrent unit of every decoder layer: lstm (default) or sru (Lei et al. 2017: '
                                 'grouped input projections, shuffle between layers; --no-shuffle-time '
                                 'does not apply, SRU has no h-to-h matrix)')
        parser.add_argument('--factorize-rank', type=int, metavar='R',
                            help='F-LSTM (Kuchaiev and Ginsburg 2017): every decoder LSTM layer computes its gates '
                                 'as W2 W1 [x; h] with a rank-R bottleneck, R/K per group (K must divide R); '
                                 '0 (default): the full matrix; --cell lstm only')
        parser.add_argument('--adaptive-softmax-cutoff', metavar='EXPR',
                            help='comma separated adaptive softmax cutoffs; use with --criterion adaptive_loss')
        parser.add_argument('--max-target-positions', type=int, metavar='N',
                            help='longest sequence the model accepts')
        parser.add_argument('--lightrnn', action='store_true',
                            help='LightRNN (Li et al. 2016): words share row and column vectors of a table, '
                                 'factorized row-then-column softmax; train with --task ' + LIGHTRNN_TASK)
        parser.add_argument('--lightrnn-rows', type=int, metavar='R',
                            help='rows R of the LightRNN table (default ceil(sqrt(V)); columns ceil(V / R))')
        # fmt: on
        add_backend_args(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        if isinstance(task, TranslationTask):
            raise ConfigError(
                f"--arch {args.arch} is a language model: it needs --task language_modeling (monolingual data, "
                f"fairseq-preprocess --only-source), not --task translation (use --arch group_rnnsearch there)"
            )
        check_groups(args, "--decoder-groups", ["--decoder-embed-dim", "--decoder-hidden-size"])
        check_cell(args, ["--decoder-groups"])
        if args.share_decoder_input_output_embed:
            if args.adaptive_softmax_cutoff is not None:
                raise ConfigError("--share-decoder-input-output-embed cannot be combined with --adaptive-softmax-cutoff")
            if args.decoder_out_embed_dim != args.decoder_embed_dim:
                raise ConfigError(
                    f"--share-decoder-input-output-embed needs --decoder-out-embed-dim "
                    f"({args.decoder_out_embed_dim}) == --decoder-embed-dim ({args.decoder_embed_dim})"
                )
        if args.lightrnn:
            if args.adaptive_softmax_cutoff is not None:
                raise ConfigError("--lightrnn cannot be combined with --adaptive-softmax-cutoff (both replace the softmax)")
            if getattr(args, "task", LIGHTRNN_TASK) != LIGHTRNN_TASK:
                # eval-lm and the hub build from the checkpoint's args, whose task is the training one
                raise ConfigError(
                    f"--lightrnn trains with --task {LIGHTRNN_TASK} (it reallocates the words between epochs), "
                    f"got --task {args.task}"
                )
        elif args.lightrnn_rows is not None:
            raise ConfigError("--lightrnn-rows needs --lightrnn")
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        cutoff = None
        if args.adaptive_softmax_cutoff is not None:
            cutoff = utils.eval_str_list(args.adaptive_softmax_cutoff, type=int)
        decoder = GroupLSTMLMDecoder(
            task.target_dictionary,
            embed_dim=args.decoder_embed_dim,
            hidden_size=args.decoder_hidden_size,
            num_layers=args.decoder_layers,
            groups=args.decoder_groups,
            out_embed_dim=args.decoder_out_embed_dim,
            dropout=args.dropout,
            dropout_in=args.decoder_dropout_in,
            dropout_out=args.decoder_dropout_out,
            share_input_output_embed=args.share_decoder_input_output_embed,
            shuffle_layers=not args.no_shuffle_layers,
            shuffle_time=not args.no_shuffle_time,
            variational_dropout=args.variational_dropout,
            adaptive_softmax_cutoff=cutoff,
            max_target_positions=args.max_target_positions,
            lightrnn=args.lightrnn,
            lightrnn_rows=args.lightrnn_rows,
            lightrnn_seed=getattr(args, "seed", 1),
            cell=args.cell,
            factorize_rank=args.factorize_rank,
        )
        decoder.backend_setting = backend_from_args(args)
        return cls(decoder)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's loading, after a check that names the dictionary when the vocabulary sizes differ."""
        rows = len(self.decoder.dictionary)
        check_dictionary_sizes(state_dict, {"decoder.embed_tokens.weight": ("language model", "dict.txt", rows)})
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


class GroupLSTMLMDecoder(FairseqIncrementalDecoder):
    """Embedding, recurrent stack (GroupLSTM, FactorizedLSTM or SRU) and output layer of
    :class:`GroupLSTMLanguageModel`.

    With ``lightrnn`` the embedding and the output layer are one ``LightRNNVocabulary`` (``self.lightrnn``;
    ``embed_tokens``, ``fc_out`` and ``adaptive_softmax`` are None): ``forward`` returns the features
    (B x T x out_embed_dim) and ``get_normalized_probs`` the log-probabilities over the vocabulary.
    Incremental state: ``cached_state`` = {"h": (L x B x H), "c": (L x B x H)}; {"c"} only for ``cell="sru"``.
    """

    def __init__(
        self,
        dictionary,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        groups: int,
        out_embed_dim: int,
        dropout: float,
        dropout_in: float,
        dropout_out: float,
        share_input_output_embed: bool,
        shuffle_layers: bool,
        shuffle_time: bool,
        variational_dropout: bool,
        adaptive_softmax_cutoff=None,
        max_target_positions: int = DEFAULT_MAX_TARGET_POSITIONS,
        lightrnn: bool = False,
        lightrnn_rows: Optional[int] = None,
        lightrnn_seed: int = 1,
        cell: str = "lstm",
        factorize_rank: int = 0,
    ):
        super().__init__(dictionary)
        self.cell = cell
        self.dropout_in = dropout_in
        self.dropout_out = dropout_out
        self.variational_dropout = variational_dropout
        self.share_input_output_embed = share_input_output_embed
        self.max_target_positions = max_target_positions
        num_embeddings = len(dictionary)
        self.lightrnn = None
        self.embed_tokens = None
        if lightrnn:
            self.lightrnn = LightRNNVocabulary(
                num_embeddings, embed_dim, out_embed_dim, num_rows=lightrnn_rows, seed=lightrnn_seed,
                share_input_output_embed=share_input_output_embed,
            )
        else:
            self.embed_tokens = nn.Embedding(num_embeddings, embed_dim, padding_idx=dictionary.pad())
            nn.init.uniform_(self.embed_tokens.weight, -0.1, 0.1)
            nn.init.zeros_(self.embed_tokens.weight[dictionary.pad()])
        self.rnn = recurrent_stack(
            cell,
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            groups=groups,
            dropout=dropout,
            shuffle_layers=shuffle_layers,
            shuffle_time=shuffle_time,
            variational=variational_dropout,
            recurrent_dropout=dropout if variational_dropout and cell == "lstm" else 0.0,
            factorize_rank=factorize_rank,
        )
        # H -> out_embed_dim only where the sizes differ (e.g. tied embeddings smaller than H)
        self.project_out = Linear(hidden_size, out_embed_dim) if hidden_size != out_embed_dim else None
        self.adaptive_softmax = None
        self.fc_out = None
        if adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(num_embeddings, out_embed_dim, adaptive_softmax_cutoff, dropout=dropout_out)
        elif not share_input_output_embed and not lightrnn:
            self.fc_out = Linear(out_embed_dim, num_embeddings)

    @under_backend
    def forward(
        self,
        prev_output_tokens: Tensor,
        encoder_out=None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        **kwargs,
    ):
        with incremental_packing(self, incremental_state):
            x = self.extract_features(prev_output_tokens, incremental_state)
            return self.output_layer(x), None

    @under_backend
    def extract_features(self, prev_output_tokens: Tensor, incremental_state=None) -> Tensor:
        hx = None
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            cached = self.get_incremental_state(incremental_state, "cached_state")
            if cached is not None:
                hx = cached["c"] if self.cell == "sru" else (cached["h"], cached["c"])
        if self.lightrnn is not None:
            x = self.lightrnn.embed(prev_output_tokens)  # B x T x E
        else:
            x = self.embed_tokens(prev_output_tokens)  # B x T x E
        x = sequence_dropout(x, self.dropout_in, self.training, self.variational_dropout)
        x = x.transpose(0, 1)  # B x T x E -> T x B x E
        x, state = self.rnn(x, hx)  # T x B x H; state: (h, c) or, for SRU, c; each L x B x H
        if incremental_state is not None:
            cached = {"c": state} if self.cell == "sru" else {"h": state[0], "c": state[1]}
            self.set_incremental_state(incremental_state, "cached_state", cached)
        x = x.transpose(0, 1)  # T x B x H -> B x T x H
        x = sequence_dropout(x, self.dropout_out, self.training, self.variational_dropout)
        if self.project_out is not None:
            x = self.project_out(x)  # B x T x H -> B x T x out_embed_dim
        return x

    def output_layer(self, x: Tensor) -> Tensor:
        if self.adaptive_softmax is not None or self.lightrnn is not None:  # get_normalized_probs applies it
            return x
        if self.share_input_output_embed:
            return linear(x, self.embed_tokens.weight)
        return self.fc_out(x)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        """B x T x V (log-)probabilities; with LightRNN from the features, exactly normalized over V."""
        if self.lightrnn is None:
            return super().get_normalized_probs(net_output, log_probs, sample)
        lprobs = self.lightrnn.log_probs(net_output[0])  # B x T x D -> B x T x V
        return lprobs if log_probs else lprobs.exp()

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        cached = self.get_incremental_state(incremental_state, "cached_state")
        if cached is None:
            return
        # L x B x H: the batch is dimension 1
        reordered = {k: v.index_select(1, new_order) for k, v in cached.items()}
        self.set_incremental_state(incremental_state, "cached_state", reordered)

    def max_positions(self):
        return self.max_target_positions


@register_model_architecture("group_lstm_lm", "group_lstm_lm")
def base_architecture(args):
    args.dropout = getattr(args, "dropout", 0.1)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 512)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", args.decoder_embed_dim)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_groups = getattr(args, "decoder_groups", 2)
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", args.decoder_embed_dim)
    args.decoder_dropout_in = getattr(args, "decoder_dropout_in", args.dropout)
    args.decoder_dropout_out = getattr(args, "decoder_dropout_out", args.dropout)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", False)
    args.no_shuffle_layers = getattr(args, "no_shuffle_layers", False)
    args.no_shuffle_time = getattr(args, "no_shuffle_time", False)
    args.variational_dropout = getattr(args, "variational_dropout", False)
    args.cell = getattr(args, "cell", "lstm")
    args.factorize_rank = getattr(args, "factorize_rank", 0)
    args.adaptive_softmax_cutoff = getattr(args, "adaptive_softmax_cutoff", None)
    # --max-target-positions: none here; build_model takes --tokens-per-sample. (A None here would also reach
    # --task translation's config, which refuses it before build_model can say that the task is wrong.)
    args.lightrnn = getattr(args, "lightrnn", False)
    args.lightrnn_rows = getattr(args, "lightrnn_rows", None)
    backend_defaults(args)


@register_model_architecture("group_lstm_lm", "group_lstm_lm_ptb")
def group_lstm_lm_ptb(args):
    """The paper's PTB setting (section 4.1): Zaremba et al.'s large model with 2 groups."""
    args.dropout = getattr(args, "dropout", 0.65)  # Zaremba et al. large PTB setting
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 1500)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", 1500)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_groups = getattr(args, "decoder_groups", 2)  # "PTB is a relatively simple dataset"
    base_architecture(args)


@register_model_architecture("group_lstm_lm", "group_lstm_lm_brown")
def group_lstm_lm_brown(args):
    """A CPU-sized model for the Brown corpus main job (scripts/prepare-brown.sh): 2 x 256, 2 groups, tied."""
    args.dropout = getattr(args, "dropout", 0.3)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 256)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", 256)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_groups = getattr(args, "decoder_groups", 2)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)
    base_architecture(args)
