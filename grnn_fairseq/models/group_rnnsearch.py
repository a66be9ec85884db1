"""Group RNNSearch: Gao et al., "Efficient Sequence Learning with Group Recurrent Networks", NAACL 2018, §4.2.

RNNSearch (Bahdanau et al., 2015) with its LSTM layers replaced by group LSTM layers (equations 4 and 5)
and channel shuffles between layers and time steps (§2.2):

* Encoder: embedding, a bidirectional GroupLSTM layer of width d per direction, then ``encoder_layers - 1``
  unidirectional GroupLSTM layers of width 2d (footnote 3), all with ``--encoder-groups`` K. The encoder
  states h_1..h_S (S x B x 2d) are the attention keys and values.
* Decoder, first layer (footnote 2: an ordinary LSTM by default, ``--decoder-first-layer-groups 1``), with
  Luong-style input feeding::

      s_t = LSTMCell([E y_{t-1}; a_{t-1}], s_{t-1})
      alpha_t = softmax_j score(s_t, h_j)        bahdanau: v^T tanh(W_q s_t + W_k h_j);  luong: s_t^T W h_j
      c_t = sum_j alpha_tj h_j
      a_t = tanh(W_o [s_t; c_t])                 the attentional vector, fed back at step t + 1

  ``s_0 = tanh(W_init mean_j h_j)`` (mean over the real source tokens, as Bahdanau's s_0 but over both
  directions), its cell state, a_0 and the upper layers' states start at zero.
* Decoder, upper layers: a ``decoder_layers - 1`` GroupLSTM stack with ``--decoder-groups`` reads the a_t
  sequence. It does not feed back into the attention, so training runs it over all time steps at once.
* Output: dropout ``--decoder-dropout-out`` (0.5 in the paper) and a projection to the vocabulary, optionally
  through ``--decoder-out-embed-dim`` and tied with the decoder input embedding.

Sizes (see README, "Parameter counts"): the paper gives "hidden size d for all LSTM layers" plus footnote 3.
Its Table 2-4 parameter counts are reproduced within 10% only when the first decoder layer is as wide as the
encoder states (2d, ``--decoder-first-layer-hidden-size``) and the grouped decoder layers are d wide
(``--decoder-hidden-size``); the named architectures use that reading.

``--encoder-groups 1 --decoder-groups 1`` is the dense RNNSearch baseline in the same code.

Related designs (README, "Related designs"): ``--no-shuffle-layers --no-shuffle-time`` is G-LSTM;
``--factorize-rank r`` makes the encoder layers and the decoder layers above the first F-LSTMs
(FactorizedLSTM); ``--cell sru`` makes them SRUs. The first decoder layer stays an LSTM cell in both cases:
it carries the attention and the input feeding, and footnote 2 keeps it an ordinary LSTM too.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)
from fairseq.tasks.language_modeling import LanguageModelingTask

from grnn_fairseq.errors import ConfigError
from grnn_fairseq.models.common import (
    Dropout,
    add_backend_args,
    backend_defaults,
    backend_from_args,
    check_cell,
    check_groups,
    check_rates,
    incremental_packing,
    under_backend,
)
from grnn_fairseq.modules import CELLS, RECURRENT_LAYERS, GroupLSTMCell, channel_shuffle, recurrent_stack
from grnn_fairseq.modules.activations import add_tanh, tanh
from grnn_fairseq.modules.products import Linear, deferred_weight_grads, matvec, reuse_packed_weights, vecmat
from grnn_fairseq.safeguards import check_dictionary_sizes

DEFAULT_MAX_POSITIONS = 1024  # the translation task's own default for --max-source/target-positions
ATTENTION_TYPES = ("bahdanau", "luong")


class EncoderOut(NamedTuple):
    encoder_out: Tensor  # S x B x 2d, in the source's own padding layout (zeros at padding)
    encoder_padding_mask: Tensor  # S x B, True at padding


def roll_rows(x: Tensor, shift: Tensor, time_dim: int) -> Tensor:
    """Rotate every sequence of ``x`` by its own ``shift`` along ``time_dim``: ``out[t] = x[(t + shift) % S]``.

    ``x``: B x S (time_dim 1) or S x B x C (time_dim 0); ``shift``: B. With shift = number of leading pads
    this turns a left-padded batch into a right-padded one, and ``-shift`` turns it back.
    """
    S = x.size(time_dim)
    t = torch.arange(S, device=x.device)
    if time_dim == 1:
        index = (t.unsqueeze(0) + shift.unsqueeze(1)) % S  # B x S
        return x.gather(1, index)
    index = (t.unsqueeze(1) + shift.unsqueeze(0)) % S  # S x B
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


class GroupRNNSearchEncoder(FairseqEncoder):
    """Bidirectional GroupLSTM layer (d per direction) + (num_layers - 1) GroupLSTM layers of width 2d
    (FactorizedLSTM with ``factorize_rank`` > 0, SRU with ``cell="sru"``).

    Sources may be left padded (fairseq's default) or right padded; the recurrence runs on a right-padded
    copy with explicit lengths, so padding never changes a sentence's encoding, and the outputs are
    returned in the input's layout so that attention columns line up with ``src_tokens``
    (``--print-alignment``).
    """

    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        groups: int,
        dropout: float,
        shuffle_layers: bool,
        shuffle_time: bool,
        max_source_positions: int,
        cell: str = "lstm",
        factorize_rank: int = 0,
    ):
        super().__init__(dictionary)
        self.embed_tokens = embed_tokens
        self.padding_idx = embed_tokens.padding_idx
        self.groups = groups
        self.shuffle_layers = shuffle_layers
        self.max_source_positions = max_source_positions
        self.output_units = 2 * hidden_size
        self.dropout_module = Dropout(dropout, module_name=self.__class__.__name__)
        self.bidirectional = recurrent_stack(
            cell,
            embed_tokens.embedding_dim,
            hidden_size,
            groups=groups,
            bidirectional=True,
            shuffle_time=shuffle_time,
            factorize_rank=factorize_rank,
        )
        # footnote 3: the layers above the bidirectional one are 2d wide
        self.upper = (
            recurrent_stack(
                cell,
                2 * hidden_size,
                2 * hidden_size,
                num_layers=num_layers - 1,
                groups=groups,
                dropout=dropout,
                shuffle_layers=shuffle_layers,
                shuffle_time=shuffle_time,
                factorize_rank=factorize_rank,
            )
            if num_layers > 1
            else None
        )

    @under_backend
    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> EncoderOut:
        """src_tokens: B x S, left or right padded. src_lengths is recomputed from the padding."""
        B, S = src_tokens.size()
        not_pad = src_tokens.ne(self.padding_idx)  # B x S
        lengths = not_pad.sum(1)  # B
        leading_pads = not_pad.long().cumsum(1).eq(0).sum(1)  # B, 0 for right-padded rows
        tokens = roll_rows(src_tokens, leading_pads, time_dim=1)  # B x S, right padded

        x = self.dropout_module(self.embed_tokens(tokens))  # B x S x E
        x = x.transpose(0, 1)  # B x S x E -> S x B x E
        x, _ = self.bidirectional(x, lengths=lengths)  # S x B x 2d
        if self.upper is not None:
            x = self.dropout_module(x)
            if self.shuffle_layers:
                x = channel_shuffle(x, self.groups)  # S x B x 2d, K groups
            x, _ = self.upper(x, lengths=lengths)  # S x B x 2d
        x = self.dropout_module(x)
        x = roll_rows(x, -leading_pads, time_dim=0)  # back to the input's padding layout
        assert x.shape == (S, B, self.output_units)
        return EncoderOut(encoder_out=x, encoder_padding_mask=not_pad.logical_not().t())  # mask: S x B

    def reorder_encoder_out(self, encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
        return EncoderOut(
            encoder_out=encoder_out.encoder_out.index_select(1, new_order),
            encoder_padding_mask=encoder_out.encoder_padding_mask.index_select(1, new_order),
        )

    def max_positions(self) -> int:
        return self.max_source_positions


class BahdanauAttention(nn.Module):
    """Additive attention, score(q, k) = v^T tanh(W_q q + W_k k) (Bahdanau et al., 2015, eq. 6)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()
        self.key_proj = Linear(key_dim, attention_dim, bias=False)
        self.query_proj = Linear(query_dim, attention_dim, bias=True)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a dot product per key: nothing for oneDNN to gain

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys B x S x C -> B x S x A; computed once per sentence and cached while decoding."""
        return self.key_proj(keys)

    def scores(self, query: Tensor, projected_keys: Tensor, mask_bias: Tensor) -> Tensor:
        """query B x Q, projected keys B x S x A, mask_bias B x S (0 or -inf) -> masked scores B x S."""
        hidden = add_tanh(projected_keys, self.query_proj(query).unsqueeze(1))  # B x S x A (B x 1 x A query)
        return self.v(hidden).squeeze(2) + mask_bias  # B x S x 1 -> B x S


class LuongAttention(nn.Module):
    """Multiplicative ("general") attention, score(q, k) = q^T W k (Luong et al., 2015, eq. 8)."""

    def __init__(self, query_dim: int, key_dim: int):
        super().__init__()
        self.key_proj = Linear(key_dim, query_dim, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys B x S x C -> W k, B x S x Q."""
        return self.key_proj(keys)

    def scores(self, query: Tensor, projected_keys: Tensor, mask_bias: Tensor) -> Tensor:
        """query B x Q, projected keys B x S x Q, mask_bias B x S (0 or -inf) -> masked scores B x S: one
        batched product with the mask as its addend, where a product, a sum and masking take three kernels."""
        return matvec(projected_keys, query, mask_bias)


def attention_mask_bias(padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """padding_mask S x B (True at padding) -> B x S of 0 and -inf, added to the scores before the softmax."""
    mask = padding_mask.t()  # S x B -> B x S
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attend(scores: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the source (in float32) and weighted sum. scores B x S (masked), values B x S x C.

    Returns the context B x C and the weights B x S.
    """
    weights = F.softmax(scores.float(), dim=1).type_as(values)  # B x S
    return vecmat(weights, values), weights


class GroupRNNSearchDecoder(FairseqIncrementalDecoder):
    """Attention LSTM layer with input feeding + a GroupLSTM stack over the attentional vectors (FactorizedLSTM
    with ``factorize_rank`` > 0, SRU with ``cell="sru"``; the attention layer stays an LSTM cell).

    Returns logits B x T x V and the attention weights B x T x S.

    Incremental decoding caches one dict of tensors: ``first_h``, ``first_c``, ``input_feed`` (B x H1),
    ``upper_h`` (LSTM cells only), ``upper_c`` ((L-1) x B x H), ``projected_keys`` (B x S x A) and ``values``
    (the encoder states batch first, B x S x C).
    """

    # the first layer's gates split: the embeddings' share for all steps at once (GroupLSTMCell.input_steps; the
    # same function as ``first_layer(cat([emb_t, feed]))``, which tests compare by switching it off)
    split_first_layer = True

    # batch dimension of every cached tensor, for reorder_incremental_state
    _BATCH_DIM = {"first_h": 0, "first_c": 0, "input_feed": 0, "upper_h": 1, "upper_c": 1, "projected_keys": 0,
                  "values": 0}

    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        encoder_output_units: int,
        first_layer_hidden_size: int,
        first_layer_groups: int,
        hidden_size: int,
        num_layers: int,
        groups: int,
        attention_type: str,
        dropout: float,
        dropout_out: float,
        out_embed_dim: int,
        share_input_output_embed: bool,
        shuffle_layers: bool,
        shuffle_time: bool,
        max_target_positions: int,
        cell: str = "lstm",
        factorize_rank: int = 0,
        residual: bool = False,
    ):
        super().__init__(dictionary)
        E, H1 = embed_tokens.embedding_dim, first_layer_hidden_size
        self.cell = cell
        self.embed_tokens = embed_tokens
        self.first_layer_hidden_size = H1
        self.hidden_size = hidden_size
        self.num_upper_layers = num_layers - 1
        self.max_target_positions = max_target_positions
        self.dropout_module = Dropout(dropout, module_name=self.__class__.__name__)
        self.dropout_out_module = Dropout(dropout_out, module_name=self.__class__.__name__)

        self.init_proj = Linear(encoder_output_units, H1)  # s_0 = tanh(W_init mean_j h_j)
        self.first_layer = GroupLSTMCell(E + H1, H1, groups=first_layer_groups, shuffle_time=shuffle_time)
        if attention_type == "bahdanau":
            self.attention = BahdanauAttention(H1, encoder_output_units, H1)
        else:
            self.attention = LuongAttention(H1, encoder_output_units)
        self.attention_out = Linear(H1 + encoder_output_units, H1, bias=False)  # a_t = tanh(W_o [s_t; c_t])
        self.upper = (
            recurrent_stack(
                cell,
                H1,
                hidden_size,
                num_layers=num_layers - 1,
                groups=groups,
                dropout=dropout,
                shuffle_layers=shuffle_layers,
                shuffle_time=shuffle_time,
                factorize_rank=factorize_rank,
                residual=residual,
            )
            if num_layers > 1
            else None
        )
        top = hidden_size if num_layers > 1 else H1
        self.out_proj = Linear(top, out_embed_dim) if out_embed_dim != top else None
        if share_input_output_embed:
            self.output_projection = Linear(E, len(dictionary), bias=False)
            self.output_projection.weight = embed_tokens.weight
        else:
            self.output_projection = Linear(out_embed_dim, len(dictionary), bias=False)

    @under_backend
    def forward(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[EncoderOut] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        **unused,
    ) -> Tuple[Tensor, Tensor]:
        with incremental_packing(self, incremental_state):
            x, attn = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
            return self.output_layer(x), attn

    def initial_state(self, encoder_out: EncoderOut) -> Dict[str, Tensor]:
        """The decoder state before the first target token, and the keys projected once per sentence."""
        enc, pad = encoder_out.encoder_out, encoder_out.encoder_padding_mask  # S x B x C, S x B
        S, B, C = enc.size()
        keep = pad.logical_not().unsqueeze(-1).type_as(enc)  # S x B x 1
        mean = (enc * keep).sum(0) / keep.sum(0)  # B x C, mean over the real source tokens
        zeros = enc.new_zeros(B, self.first_layer_hidden_size)
        upper_zeros = enc.new_zeros(self.num_upper_layers, B, self.hidden_size)  # L-1 x B x H (0 x B x H if none)
        values = enc.transpose(0, 1).contiguous()  # S x B x C -> B x S x C: what attend() sums, batch first
        state = {
            "first_h": tanh(self.init_proj(mean)),  # B x H1
            "first_c": zeros,  # B x H1
            "input_feed": zeros,  # B x H1, a_0
            "upper_c": upper_zeros,
            "projected_keys": self.attention.project_keys(values),  # B x S x A
            "values": values,
        }
        if self.cell == "lstm":  # an SRU's state is c alone
            state["upper_h"] = upper_zeros
        return state

    @under_backend
    def extract_features(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[EncoderOut],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Top-layer features B x T x C_out and attention weights B x T x S."""
        assert encoder_out is not None, "GroupRNNSearchDecoder attends over the encoder: encoder_out is required"
        state = self.get_cached_state(incremental_state)
        if state is None:
            state = self.initial_state(encoder_out)
        else:
            prev_output_tokens = prev_output_tokens[:, -1:]  # incremental step: only the newest token
        B, T = prev_output_tokens.size()
        pad = encoder_out.encoder_padding_mask  # S x B

        emb = self.dropout_module(self.embed_tokens(prev_output_tokens))  # B x T x E
        emb = emb.transpose(0, 1)  # B x T x E -> T x B x E
        h, c, feed = state["first_h"], state["first_c"], state["input_feed"]
        keys, values = state["projected_keys"], state["values"]
        mask_bias = attention_mask_bias(pad, keys.dtype)  # B x S
        outputs: List[Tensor] = []
        attn: List[Tensor] = []
        # the first layer's input at step t is [E y_{t-1}; a_{t-1}]: the embeddings are known before the loop
        first_layer = self.first_layer.input_steps(emb, split=self.split_first_layer)  # T x B x E
        # the loop applies the same weights T times: pack them once, and compute their gradients once
        with reuse_packed_weights(), deferred_weight_grads():
            for t in range(T):
                h, c = first_layer(t, feed, (h, c))  # B x H1
                context, weights = attend(self.attention.scores(h, keys, mask_bias), values)  # B x C, B x S
                feed = tanh(self.attention_out(torch.cat([h, context], dim=1)))  # a_t: B x H1
                outputs.append(feed)
                attn.append(weights)
        x = torch.stack(outputs, 0)  # T x B x H1
        upper = {name: state[name] for name in ("upper_h", "upper_c") if name in state}
        if self.upper is not None:
            x = self.dropout_module(x)
            if self.cell == "sru":
                x, upper["upper_c"] = self.upper(x, upper["upper_c"])  # T x B x H
            else:
                x, (upper["upper_h"], upper["upper_c"]) = self.upper(x, (upper["upper_h"], upper["upper_c"]))

        if incremental_state is not None:
            new_state = {
                "first_h": h,
                "first_c": c,
                "input_feed": feed,
                **upper,
                "projected_keys": keys,
                "values": values,
            }
            self.set_incremental_state(incremental_state, "cached_state", new_state)

        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.out_proj is not None:
            x = self.out_proj(x)
        x = self.dropout_out_module(x)
        attn_weights = torch.stack(attn, 1)  # T x (B x S) -> B x T x S
        return x, attn_weights

    def output_layer(self, features: Tensor) -> Tensor:
        """B x T x C_out -> B x T x V."""
        return self.output_projection(features)

    def get_cached_state(
        self, incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]]
    ) -> Optional[Dict[str, Tensor]]:
        if incremental_state is None:
            return None
        return self.get_incremental_state(incremental_state, "cached_state")

    def reorder_incremental_state(
        self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor
    ) -> None:
        state = self.get_cached_state(incremental_state)
        if state is None:
            return
        reordered = {name: v.index_select(self._BATCH_DIM[name], new_order) for name, v in state.items()}
        self.set_incremental_state(incremental_state, "cached_state", reordered)

    def max_positions(self) -> int:
        return self.max_target_positions


def recurrent_parameter_count(module: nn.Module, also: Tuple[type, ...] = ()) -> int:
    """Parameters of every GroupLSTM / GroupLSTMCell / FactorizedLSTM / SRU (weights and biases), and of the
    layer types in ``also`` (e.g. nn.LSTM, nn.LSTMCell for fairseq's own models): the paper's "recurrent layers".

    Embeddings, attention (W_q, W_k, v or W; W_o), the decoder init projection and the output layers are
    not counted.
    """
    layers = RECURRENT_LAYERS + tuple(also)
    return sum(p.numel() for m in module.modules() if isinstance(m, layers) for p in m.parameters())


def check_args(args, task) -> None:
    """Raise a ValueError naming the flags of an invalid combination (call after base_architecture)."""

    if isinstance(task, LanguageModelingTask):
        raise ConfigError(
            f"--arch {args.arch} is an encoder-decoder model: it needs --task translation (parallel data), "
            f"not --task language_modeling (use --arch group_lstm_lm for a language model)"
        )
    if args.attention_type not in ATTENTION_TYPES:
        raise ConfigError(f"--attention-type must be one of {', '.join(ATTENTION_TYPES)}, got {args.attention_type!r}")
    for flag, value in (("--encoder-layers", args.encoder_layers), ("--decoder-layers", args.decoder_layers)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    check_rates(args, ["--dropout", "--decoder-dropout-out"])
    if args.init_uniform < 0:
        raise ConfigError(f"--init-uniform must be >= 0 (0 keeps the module initializations), got {args.init_uniform}")

    check_groups(args, "--encoder-groups", ["--encoder-embed-dim", "--encoder-hidden-size"])
    H1, E = args.decoder_first_layer_hidden_size, args.decoder_embed_dim
    check_groups(args, "--decoder-first-layer-groups", ["--decoder-first-layer-hidden-size",
                                                        ("--decoder-embed-dim + --decoder-first-layer-hidden-size", E + H1)])  # fmt: skip
    if args.decoder_layers > 1:
        check_groups(args, "--decoder-groups", ["--decoder-first-layer-hidden-size", "--decoder-hidden-size"])
    if args.decoder_residual and args.decoder_layers > 1 and args.decoder_hidden_size != H1:
        raise ConfigError(
            f"--decoder-residual adds the attentional vector a_t ({H1} wide: --decoder-first-layer-hidden-size) to "
            f"the output of the layer above it: needs --decoder-hidden-size {H1}, got {args.decoder_hidden_size}"
        )
    check_cell(args, ["--encoder-groups"] + (["--decoder-groups"] if args.decoder_layers > 1 else []))

    if args.share_all_embeddings:
        if task.source_dictionary != task.target_dictionary:
            raise ConfigError("--share-all-embeddings requires a joined dictionary (fairseq-preprocess --joined-dictionary)")
        if args.encoder_embed_dim != args.decoder_embed_dim:
            raise ConfigError(
                f"--share-all-embeddings requires --encoder-embed-dim ({args.encoder_embed_dim}) "
                f"to equal --decoder-embed-dim ({args.decoder_embed_dim})"
            )
    if (args.share_decoder_input_output_embed or args.share_all_embeddings) and (
        args.decoder_out_embed_dim != args.decoder_embed_dim
    ):
        raise ConfigError(
            f"--share-decoder-input-output-embed requires --decoder-out-embed-dim ({args.decoder_out_embed_dim}) "
            f"to equal --decoder-embed-dim ({args.decoder_embed_dim})"
        )


@register_model("group_rnnsearch")
class GroupRNNSearchModel(FairseqEncoderDecoderModel):
    """Group RNNSearch (Gao et al., 2018, §4.2): RNNSearch with group LSTM layers."""

    @staticmethod
    def add_args(parser):
        # fmt: off
        parser.add_argument('--encoder-embed-dim', type=int, metavar='N', help='encoder embedding dimension')
        parser.add_argument('--encoder-hidden-size', type=int, metavar='N',
                            help='d: width of each direction of the bidirectional first encoder layer; '
                                 'the encoder layers above it are 2d wide (footnote 3)')
        parser.add_argument('--encoder-layers', type=int, metavar='N',
                            help='encoder layers, the bidirectional one included')
        parser.add_argument('--encoder-groups', type=int, metavar='K', help='groups of every encoder layer')
        parser.add_argument('--decoder-embed-dim', type=int, metavar='N', help='decoder embedding dimension')
        parser.add_argument('--decoder-first-layer-hidden-size', type=int, metavar='N',
                            help='width of the first (attention) decoder layer, its attentional vector and '
                                 'input feed; default 2 x --encoder-hidden-size, the width of the encoder states')
        parser.add_argument('--decoder-first-layer-groups', type=int, metavar='K',
                            help='groups of the first decoder layer (1: an ordinary LSTM, footnote 2)')
        parser.add_argument('--decoder-hidden-size', type=int, metavar='N',
                            help='width of the decoder layers above the first')
        parser.add_argument('--decoder-layers', type=int, metavar='N',
                            help='decoder layers, the attention layer included')
        parser.add_argument('--decoder-groups', type=int, metavar='K',
                            help='groups of the decoder layers above the first')
        parser.add_argument('--decoder-out-embed-dim', type=int, metavar='N',
                            help='projection of the top decoder layer before the vocabulary projection '
                                 '(none when equal to the top layer width)')
        parser.add_argument('--attention-type', choices=ATTENTION_TYPES,
                            help='bahdanau: v^T tanh(W_q q + W_k k); luong: q^T W k')
        parser.add_argument('--dropout', type=float, metavar='D',
                            help='dropout on embeddings, between layers and on the encoder output')
        parser.add_argument('--decoder-residual', action='store_true',
                            help='residual connections in the decoder stack above the first layer (GNMT): each '
                                 'layer adds its input to its output, the first the attentional vector a_t; '
                                 'needs --decoder-hidden-size equal to --decoder-first-layer-hidden-size')
        parser.add_argument('--decoder-dropout-out', type=float, metavar='D',
                            help='dropout before the vocabulary projection')
        parser.add_argument('--share-decoder-input-output-embed', action='store_true',
                            help='tie the decoder input embedding and the vocabulary projection')
        parser.add_argument('--share-all-embeddings', action='store_true',
                            help='share encoder, decoder and output embeddings (joined dictionary)')
        parser.add_argument('--no-shuffle-layers', action='store_true',
                            help='no channel shuffle between stacked group layers')
        parser.add_argument('--no-shuffle-time', action='store_true',
                            help='no channel shuffle of h_{t-1} between time steps')
        parser.add_argument('--cell', choices=CELLS,
                            help='recurrent unit of the encoder layers and the decoder layers above the first: '
                                 'lstm (default) or sru (Lei et al. 2017; --no-shuffle-time does not apply to '
                                 'SRU layers); the first (attention) decoder layer stays an LSTM cell')
        parser.add_argument('--factorize-rank', type=int, metavar='R',
                            help='F-LSTM (Kuchaiev and Ginsburg 2017): the encoder layers and the decoder layers '
                                 'above the first compute their gates as W2 W1 [x; h], a rank-R bottleneck, R/K '
                                 'per group (--encoder-groups and --decoder-groups must divide R); 0 (default): '
                                 'the full matrix; not the first (attention) decoder layer; --cell lstm only')
        parser.add_argument('--init-uniform', type=float, metavar='A',
                            help='>0: initialize every parameter U(-A, A); 0: module defaults')
        parser.add_argument('--max-source-positions', type=int, metavar='N', help='longest source sentence')
        parser.add_argument('--max-target-positions', type=int, metavar='N', help='longest target sentence')
        # fmt: on
        add_backend_args(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        check_args(args, task)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        encoder_embed = nn.Embedding(len(src_dict), args.encoder_embed_dim, padding_idx=src_dict.pad())
        if args.share_all_embeddings:
            decoder_embed = encoder_embed
        else:
            decoder_embed = nn.Embedding(len(tgt_dict), args.decoder_embed_dim, padding_idx=tgt_dict.pad())
        shuffle_layers, shuffle_time = not args.no_shuffle_layers, not args.no_shuffle_time
        encoder = GroupRNNSearchEncoder(
            src_dict,
            encoder_embed,
            hidden_size=args.encoder_hidden_size,
            num_layers=args.encoder_layers,
            groups=args.encoder_groups,
            dropout=args.dropout,
            shuffle_layers=shuffle_layers,
            shuffle_time=shuffle_time,
            max_source_positions=args.max_source_positions,
            cell=args.cell,
            factorize_rank=args.factorize_rank,
        )
        decoder = GroupRNNSearchDecoder(
            tgt_dict,
            decoder_embed,
            encoder_output_units=encoder.output_units,
            first_layer_hidden_size=args.decoder_first_layer_hidden_size,
            first_layer_groups=args.decoder_first_layer_groups,
            hidden_size=args.decoder_hidden_size,
            num_layers=args.decoder_layers,
            groups=args.decoder_groups,
            attention_type=args.attention_type,
            dropout=args.dropout,
            dropout_out=args.decoder_dropout_out,
            out_embed_dim=args.decoder_out_embed_dim,
            share_input_output_embed=args.share_decoder_input_output_embed or args.share_all_embeddings,
            shuffle_layers=shuffle_layers,
            shuffle_time=shuffle_time,
            max_target_positions=args.max_target_positions,
            cell=args.cell,
            factorize_rank=args.factorize_rank,
            residual=args.decoder_residual,
        )
        encoder.backend_setting = decoder.backend_setting = backend_from_args(args)
        model = cls(encoder, decoder)
        if args.init_uniform > 0:
            model.init_uniform_(args.init_uniform)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's loading, after a check that names the dictionary when the vocabulary sizes differ."""
        check_dictionary_sizes(
            state_dict,
            {
                "encoder.embed_tokens.weight": ("source", "dict.<source-lang>.txt", len(self.encoder.dictionary)),
                "decoder.embed_tokens.weight": ("target", "dict.<target-lang>.txt", len(self.decoder.dictionary)),
            },
        )
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @torch.no_grad()
    def init_uniform_(self, a: float) -> None:
        """Every parameter U(-a, a) (the paper's Gigaword setting, a = 0.05); padding embeddings stay zero."""
        for p in self.parameters():
            nn.init.uniform_(p, -a, a)
        for embed in (self.encoder.embed_tokens, self.decoder.embed_tokens):
            embed.weight[embed.padding_idx].zero_()


@register_model_architecture("group_rnnsearch", "group_rnnsearch")
def base_architecture(args):
    """The paper's IWSLT sizes with one group everywhere: the dense RNNSearch baseline."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_hidden_size = getattr(args, "encoder_hidden_size", 256)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_groups = getattr(args, "encoder_groups", 1)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    # the first decoder layer is as wide as the encoder states it attends over (see the module docstring)
    args.decoder_first_layer_hidden_size = getattr(
        args, "decoder_first_layer_hidden_size", 2 * args.encoder_hidden_size
    )
    args.decoder_first_layer_groups = getattr(args, "decoder_first_layer_groups", 1)  # footnote 2
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", args.encoder_hidden_size)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_groups = getattr(args, "decoder_groups", 1)
    top = args.decoder_hidden_size if args.decoder_layers > 1 else args.decoder_first_layer_hidden_size
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", top)  # no extra projection by default
    args.attention_type = getattr(args, "attention_type", "bahdanau")
    args.dropout = getattr(args, "dropout", 0.1)  # §4.2: "rate 0.1 for all layers except ..."
    args.decoder_dropout_out = getattr(args, "decoder_dropout_out", 0.5)  # "... the layer before softmax with 0.5"
    args.decoder_residual = getattr(args, "decoder_residual", False)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", False)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", False)
    args.no_shuffle_layers = getattr(args, "no_shuffle_layers", False)
    args.no_shuffle_time = getattr(args, "no_shuffle_time", False)
    args.init_uniform = getattr(args, "init_uniform", 0.0)
    args.cell = getattr(args, "cell", "lstm")
    args.factorize_rank = getattr(args, "factorize_rank", 0)
    args.max_source_positions = getattr(args, "max_source_positions", DEFAULT_MAX_POSITIONS)
    args.max_target_positions = getattr(args, "max_target_positions", DEFAULT_MAX_POSITIONS)
    backend_defaults(args)


def paper_sizes(args, embed: int, hidden: int, layers: int) -> None:
    """The sizes of one of the paper's settings, K = 2 in every grouped layer (flags given win)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", embed)
    args.encoder_hidden_size = getattr(args, "encoder_hidden_size", hidden)
    args.encoder_layers = getattr(args, "encoder_layers", layers)
    args.encoder_groups = getattr(args, "encoder_groups", 2)
    args.decoder_layers = getattr(args, "decoder_layers", layers)
    args.decoder_groups = getattr(args, "decoder_groups", 2)
    base_architecture(args)


@register_model_architecture("group_rnnsearch", "group_rnnsearch_iwslt")
def group_rnnsearch_iwslt(args):
    """IWSLT'14 De-En (§4.2, Table 2): 2 + 2 layers, embedding and d = 256, K = 2."""
    paper_sizes(args, embed=256, hidden=256, layers=2)


@register_model_architecture("group_rnnsearch", "group_rnnsearch_wmt")
def group_rnnsearch_wmt(args):
    """WMT'14 En-De (§4.2, Table 3): 4 + 4 layers, embedding 512, d = 1024, K = 2."""
    paper_sizes(args, embed=512, hidden=1024, layers=4)


@register_model_architecture("group_rnnsearch", "group_rnnsearch_gigaword")
def group_rnnsearch_gigaword(args):
    """Gigaword summarization (§4.3, Table 4): 2 + 2 layers, embedding and d = 512, K = 2, U(-0.05, 0.05) init."""
    args.init_uniform = getattr(args, "init_uniform", 0.05)  # §4.3: "uniformly sampled between (-0.05, 0.05)"
    paper_sizes(args, embed=512, hidden=512, layers=2)
