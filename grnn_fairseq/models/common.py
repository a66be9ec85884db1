"""What group_lstm_lm and group_rnnsearch share: the backend flags, the packed weights of incremental decoding,
the checks of group counts and cells, and dropout with the cheaper CPU mask."""

import contextlib
import functools
import logging

import torch
from fairseq.modules import FairseqDropout
from torch import Tensor

from grnn_fairseq.errors import ConfigError
from grnn_fairseq.modules import CELLS, backend
from grnn_fairseq.modules.dropout import dropout, dropout_mask
from grnn_fairseq.modules.products import reuse_packed_weights

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- backend flags


def add_backend_args(parser) -> None:
    """The ``--grnn-*`` flags: every execution choice of ``grnn_fairseq.modules.backend``, stored with the model's
    args in its checkpoints."""
    # fmt: off
    parser.add_argument('--grnn-path', choices=backend.PATHS,
                        help='recurrent layers: fused (hand-written backward through time, default) or reference '
                             '(the readable autograd path)')
    parser.add_argument('--grnn-step', choices=backend.STEPS,
                        help='step kernel of the fused path: auto (default: the C kernel for float32 CPU tensors, '
                             'Triton on CUDA), c, torch (PyTorch operations) or triton')
    parser.add_argument('--grnn-products', choices=backend.PRODUCTS,
                        help="matrix products of float32 CPU tensors: auto (default: a fixed rule per CPU and "
                             "shape), aten (aten's BLAS) or onednn")
    parser.add_argument('--grnn-benchmark', action='store_true',
                        help='with --grnn-products auto: time aten against oneDNN once per product shape and use '
                             'the faster (results may then differ between runs and machines)')
    parser.add_argument('--grnn-no-defer-weight-grads', action='store_true',
                        help="compute a decoder loop's weight gradients (and its attention's keys' and "
                             "values') step by step instead of once after it")
    parser.add_argument('--grnn-cuda-graphs', action='store_true',
                        help="on the Triton step (CUDA): replay each recurrent layer's time loop as a CUDA graph, "
                             "captured the second time its shapes occur")
    parser.add_argument('--grnn-persistent-loops', action='store_true',
                        help="on the Triton step (CUDA): run each recurrent layer's time loop as one kernel launch "
                             "with a grid barrier between steps (before --grnn-cuda-graphs)")
    # fmt: on


def backend_defaults(args) -> None:
    """The ``--grnn-*`` defaults, for the architectures (and checkpoints made before the flags existed)."""
    default = backend.Backend()
    args.grnn_path = getattr(args, "grnn_path", None) or default.path
    args.grnn_step = getattr(args, "grnn_step", None) or default.step
    args.grnn_products = getattr(args, "grnn_products", None) or default.products
    args.grnn_benchmark = getattr(args, "grnn_benchmark", False)
    args.grnn_no_defer_weight_grads = getattr(args, "grnn_no_defer_weight_grads", False)
    args.grnn_cuda_graphs = getattr(args, "grnn_cuda_graphs", False)
    args.grnn_persistent_loops = getattr(args, "grnn_persistent_loops", False)


def backend_from_args(args) -> backend.Backend:
    """The model's backend from its flags, logged once (the setting and what it resolves to on this machine)."""
    setting = backend.Backend(path=args.grnn_path, step=args.grnn_step, products=args.grnn_products,
                              benchmark=args.grnn_benchmark,
                              defer_weight_grads=not args.grnn_no_defer_weight_grads,
                              cuda_graphs=args.grnn_cuda_graphs,
                              persistent_loops=args.grnn_persistent_loops)  # fmt: skip
    logger.info(f"grnn_fairseq backend: {backend.describe(setting)}")
    return setting


def under_backend(method):
    """Run a module's method under its ``backend_setting`` (set by build_model; the current setting when None)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with backend.use(getattr(self, "backend_setting", None)):
            return method(self, *args, **kwargs)

    return run


def incremental_packing(decoder, incremental_state):
    """The scope of one forward call of ``decoder`` (a FairseqIncrementalDecoder): while it decodes incrementally
    without gradients (fairseq's beam search and sampling: the steps of one batch, whose weights do not change),
    a ``reuse_packed_weights`` scope whose store of oneDNN's packed weights lives in the incremental state, so
    that every step reuses the first step's; else no scope (training calls pack their own)."""
    if incremental_state is None or torch.is_grad_enabled():
        return contextlib.nullcontext()
    store = decoder.get_incremental_state(incremental_state, "packed_weights")
    if store is None:
        store = {}
        decoder.set_incremental_state(incremental_state, "packed_weights", store)
    return reuse_packed_weights(store)


# ------------------------------------------------------------------------------------------------- checks


def flag_value(args, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def check_groups(args, groups_flag: str, size_flags) -> None:
    """Fail at build time, naming the flags, when a group count is not >= 1 or does not divide a layer size.
    size_flags: flag names, or (description, size) pairs for sizes made of several flags."""
    groups = flag_value(args, groups_flag)
    if groups < 1:
        raise ConfigError(f"{groups_flag} must be >= 1, got {groups}")
    for entry in size_flags:
        name, size = entry if isinstance(entry, tuple) else (entry, flag_value(args, entry))
        if size % groups != 0:
            raise ConfigError(f"{groups_flag} {groups} does not divide {name} {size}")


def check_cell(args, groups_flags) -> None:
    """Validate --cell and --factorize-rank (after the architecture's defaults); errors name the flags."""
    if args.cell not in CELLS:
        raise ConfigError(f"--cell must be one of {', '.join(CELLS)}, got {args.cell!r}")
    rank = args.factorize_rank
    if rank < 0:
        raise ConfigError(f"--factorize-rank must be >= 0 (0: no factorization), got {rank}")
    if rank and args.cell != "lstm":
        raise ConfigError(f"--factorize-rank factorizes an LSTM's gate matrix; it cannot be used with --cell {args.cell}")
    for flag in groups_flags:
        groups = flag_value(args, flag)
        if rank and rank % groups != 0:
            raise ConfigError(f"--factorize-rank {rank} is not divisible by {flag} {groups} (every group gets rank R/K)")


def check_rates(args, flags) -> None:
    """Every dropout flag in [0, 1)."""
    for flag in flags:
        value = flag_value(args, flag)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")


# ------------------------------------------------------------------------------------------------ dropout


class Dropout(FairseqDropout):
    """``FairseqDropout`` (same arguments and switches) drawing its CPU masks by ``modules.dropout.dropout``,
    a third of ``F.dropout``'s cost there."""

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        if self.p > 0 and (self.training or self.apply_during_inference):
            return dropout(x, self.p, training=True)
        return x


def sequence_dropout(x: Tensor, p: float, training: bool, variational: bool) -> Tensor:
    """Dropout on B x T x C; with ``variational`` one mask per sequence, shared by all T steps."""
    if not training or p == 0:
        return x
    if not variational:
        return dropout(x, p, training=True)
    return x * dropout_mask(x[:, :1], p)  # B x 1 x C mask
