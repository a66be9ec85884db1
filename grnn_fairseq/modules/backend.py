"""Every execution choice of grnn_fairseq's layers, in one place, deterministic by default.

Following ``torch.backends.cudnn``: a fixed rule per device and shape picks each kernel, so the same command on
the same machine computes the same numbers, bit for bit; timing candidates is opt-in (``benchmark``, the
analogue of ``torch.backends.cudnn.benchmark``), on operands laid out as the real call's, each choice logged once.

=====================  =========================  =======  ==============================================
setting                values                     default  chooses
=====================  =========================  =======  ==============================================
``path``               fused, reference           fused    a layer's time loop: the fused autograd Function
                                                           (hand-written backward through time) or the
                                                           readable autograd path (``reference``)
``step``               auto, c, torch, triton     auto     the fused path's per-step kernel; auto: the C
                                                           kernel on float32 CPU tensors when built, Triton
                                                           on CUDA when importable, else PyTorch operations
``products``           auto, aten, onednn         auto     the matrix products' kernels on float32 CPU
                                                           tensors; auto: ``heuristic_onednn`` (oneDNN on
                                                           AMD CPUs for large products, aten's BLAS else)
``benchmark``          on, off                    off      with products auto: time aten against oneDNN
                                                           once per product shape and layout instead
``defer_weight_grads`` on, off                    on       a decoder loop's weight gradients (and the
                                                           attention's keys' and values') as one product
                                                           over all steps after its backward pass
``cuda_graphs``        on, off                    off      on the Triton step: replay a fused call's time
                                                           loop as a CUDA graph, captured the second time
                                                           its shapes occur (``triton_step.LoopGraphs``)
``persistent_loops``   on, off                    off      on the Triton step: run each time loop as one
                                                           kernel launch with a grid barrier between steps
                                                           (``triton_step``; takes precedence over
                                                           ``cuda_graphs``)
=====================  =========================  =======  ==============================================

Besides these, importing ``grnn_fairseq.modules`` bounds oneDNN's kernel caches (``bound_onednn_caches``).

Python: ``with backend.use(products="onednn"): ...`` (a context per thread), or ``backend.set_default(...)``
for the process. fairseq: the ``--grnn-*`` model flags (``models/common.py``), stored in the checkpoint's args;
the models run every forward under their own setting and log the resolved backend once when built.
"""

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..errors import ConfigError

logger = logging.getLogger("grnn_fairseq.backend")

PATHS = ("fused", "reference")
STEPS = ("auto", "c", "torch", "triton")
PRODUCTS = ("auto", "aten", "onednn")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One setting of every execution choice (module docstring). Immutable: derive with ``replace``."""

    path: str = "fused"
    step: str = "auto"
    products: str = "auto"
    benchmark: bool = False
    defer_weight_grads: bool = True
    cuda_graphs: bool = False
    persistent_loops: bool = False

    def __post_init__(self):
        for name, allowed in (("path", PATHS), ("step", STEPS), ("products", PRODUCTS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"backend {name} must be one of {', '.join(allowed)}, got {value!r}")

    def replace(self, **changes) -> "Backend":
        return dataclasses.replace(self, **changes)


_lock = threading.Lock()
_default = Backend()
_current: contextvars.ContextVar[Optional[Backend]] = contextvars.ContextVar("grnn_backend", default=None)


def current() -> Backend:
    """The setting in force: the innermost ``use`` of this thread, else the process default."""
    return _current.get() or _default


def set_default(backend: Backend) -> Backend:
    """Make ``backend`` the process default (threads without a ``use`` of their own); returns the previous one."""
    global _default
    if not isinstance(backend, Backend):
        raise TypeError(f"expected a Backend, got {type(backend).__name__}")
    with _lock:
        previous, _default = _default, backend
    return previous


@contextlib.contextmanager
def use(backend: Optional[Backend] = None, **changes):
    """Run the block under ``backend`` (default: the current setting) with ``changes`` applied, in this thread."""
    token = _current.set((backend or current()).replace(**changes))
    try:
        yield current()
    finally:
        _current.reset(token)


# ----------------------------------------------------------------------------------------------- resolution


def fused() -> bool:
    """Whether layers run their fused path (where it supports the call)."""
    return current().path == "fused"


def cuda_loops() -> str:
    """How the Triton step launches a fused call's time loops: "persistent" (one launch per loop), "graphs"
    (a launch per step, replayed as a CUDA graph) or "steps" (a launch per step)."""
    setting = current()
    return "persistent" if setting.persistent_loops else "graphs" if setting.cuda_graphs else "steps"


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...) or "" where /proc/cpuinfo is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_usable(x: Tensor) -> bool:
    """Whether oneDNN's linear can run a product of this tensor: float32 on CPU, outside autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and not torch.is_autocast_enabled("cpu")
    )


# oneDNN compiles a kernel per product shape and keeps it in two caches of 1024 entries each (oneDNN's primitive
# cache and PyTorch's ideep cache). Under fairseq's --max-tokens batching nearly every batch brings new row counts
# (B sentences, T x B tokens), so both fill up: about 1 GB of kernels for group_rnnsearch_iwslt on an AMD EPYC
# (docs/speed.md). 128 entries hold a training step's shapes with room to spare.
ONEDNN_CACHE_CAPACITY = 128
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches() -> None:
    """Give oneDNN's two kernel caches ``ONEDNN_CACHE_CAPACITY`` entries where the user has not sized them.

    Both read their environment variable when the process runs its first oneDNN primitive, so this runs when
    ``grnn_fairseq.modules`` is imported (``--user-dir`` is imported before any model runs). A variable the user
    set is kept. The capacity bounds memory only: a kernel evicted and compiled again computes the same numbers.
    """
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))


def onednn_cache_capacities() -> str:
    """The capacities in force, as "primitive cache 128, ideep cache 128" (oneDNN's default where unset)."""
    primitive, ideep = (os.environ.get(name, "1024") for name in ONEDNN_CACHE_VARIABLES)
    return f"primitive cache {primitive}, ideep cache {ideep}"


# Products of fewer multiply-adds run on aten's BLAS under every rule: too small for the kernel to matter.
MIN_ONEDNN_MACS = 1 << 20
# Under the fixed rule, a grouped product (K > 1, one oneDNN call per group) needs this many per group.
MIN_ONEDNN_GROUP_MACS = 1 << 22


def heuristic_onednn(kind: str, macs: int, K: int = 1, Hk: int = 0) -> bool:
    """The fixed rule of ``products="auto"``: whether oneDNN runs a product of ``macs`` multiply-adds.

    The rule follows the measurements of docs/speed.md: on AMD CPUs aten's float32 BLAS (MKL) runs these models'
    large products at about half oneDNN's speed, and oneDNN's per-step recurrent products on weights packed once
    win from H/K = 128 with up to 8 groups; a decoder step's grouped products ("grouped_linear", one oneDNN call
    per group against one bmm) from about 2^22 multiply-adds per group; on Intel CPUs aten's BLAS is as fast or
    faster for most shapes. kind: "step" (the fused path's per-step recurrent products, K groups of H/K = Hk),
    "grouped_linear" (K groups) or any other product (the fused path's input projections and weight gradients
    over all time steps, which pass K = 1: their per-group products are large).
    """
    if macs < MIN_ONEDNN_MACS or cpu_vendor() != "AuthenticAMD":
        return False
    if kind == "step":
        return Hk >= 128 and K <= 8
    return K == 1 or macs // K >= MIN_ONEDNN_GROUP_MACS


_measured: Dict[tuple, bool] = {}


def _time_best(fn: Callable[[], object], rounds: int = 3, give_up: float = float("inf")) -> float:
    """Best of ``rounds`` timed runs after a warm-up; inf at once if the warm-up took over ``give_up`` seconds."""
    t0 = time.perf_counter()
    fn()  # warm-up: primitive creation, packing, page faults
    if time.perf_counter() - t0 > give_up:
        return float("inf")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def use_onednn(x: Tensor, kind: str, key: tuple, make_case: Callable, macs: int, K: int = 1, Hk: int = 0) -> bool:
    """Whether oneDNN (else aten's BLAS) runs a product of float32 CPU input ``x``.

    kind, K, Hk: for ``heuristic_onednn``. key: the product's shape and its operands' layouts (with row counts
    rounded as the caller measures them). make_case(generator): random operands of that shape and layout,
    returning two closures (aten's variant, oneDNN's), each running the product (and its backward, when
    training); called only when ``benchmark`` is on.
    """
    if not onednn_usable(x):
        return False
    setting = current()
    if setting.products != "auto":
        return setting.products == "onednn"
    if not setting.benchmark or macs < MIN_ONEDNN_MACS:
        return heuristic_onednn(kind, macs, K, Hk)
    key = (kind,) + key + (torch.get_num_threads(),)
    with _lock:
        if key in _measured:
            return _measured[key]
    with use(benchmark=False, products="auto"):  # the measured closures pick their variant explicitly
        run_aten, run_onednn = make_case(torch.Generator().manual_seed(0))
        aten = _time_best(run_aten)
        onednn = _time_best(run_onednn, give_up=10 * aten + 0.01)  # a reference kernel is not timed thrice
    choice = onednn < aten
    with _lock:
        if key not in _measured:
            _measured[key] = choice
            logger.info(f"measured {key}: aten {aten * 1e3:.3f} ms, oneDNN {onednn * 1e3:.3f} ms -> "
                        f"{'oneDNN' if choice else 'aten'}")  # fmt: skip
    return choice


def measured() -> Dict[tuple, bool]:
    """A copy of the choices ``benchmark`` has measured so far (key -> oneDNN or not)."""
    with _lock:
        return dict(_measured)


def clear_measured() -> None:
    with _lock:
        _measured.clear()


def describe(setting: Optional[Backend] = None) -> str:
    """One line: the setting and what it resolves to on this machine's CPU (for the log and checkpoints)."""
    from . import steps  # noqa: F401  (imports the step kernels' availability)

    s = setting or current()
    if s.step == "auto":
        step = "auto (" + ("C kernel" if steps.c_kernel_available() else "PyTorch ops") + " on float32 CPU, "
        step += ("Triton" if steps.triton_available() else "PyTorch ops") + " on CUDA)"
    else:
        step = s.step
    if s.products == "auto" and s.benchmark:
        products = "auto (measured per shape)"
    elif s.products == "auto":
        products = "auto (" + ("oneDNN for large products, AMD CPU" if cpu_vendor() == "AuthenticAMD"
                               else "aten BLAS") + ")"  # fmt: skip
    else:
        products = s.products
    return (f"path={s.path} step={step} products={products} benchmark={'on' if s.benchmark else 'off'} "
            f"defer_weight_grads={'on' if s.defer_weight_grads else 'off'} "
            f"cuda_graphs={'on' if s.cuda_graphs else 'off'} "
            f"persistent_loops={'on' if s.persistent_loops else 'off'} "
            f"onednn_caches=({onednn_cache_capacities()})")  # fmt: skip
