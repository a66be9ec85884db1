"""Linear layers whose float32 CPU products run on oneDNN instead of aten's BLAS where that measures faster.

On an AMD EPYC aten's float32 ``mm`` (MKL) reached about half the speed of oneDNN's linear for the shapes of
these models (measured, one thread: a 170 x 1024 -> 2048 product at 30 against 62 GFLOP/s, the 2550 x 256 ->
4144 output layer at 18 against 28 forward and 26 against 49 for its input gradient); on an Intel Xeon
(Emerald Rapids) the same model trained 35% faster with MKL everywhere. So ``linear`` measures, once per shape
(``onednn_faster``), forward and backward of both on random data and keeps the faster: ``F.linear``, or the
forward product and both gradients on oneDNN. Everywhere else (float64, CUDA, no oneDNN, ``GRNN_MKLDNN=0``,
``GRNN_PRODUCTS=bmm``) it *is* ``F.linear``. ``Linear`` is ``nn.Linear`` using it, with the same parameters and
state dict. The fused GroupLSTM (``fused_group_lstm.py``) chooses its products the same way.

Inside ``reuse_packed_weights()`` (a decoder's loop over target steps) every weight is packed into oneDNN's
blocked layout once, its transpose (for the input gradient) too, and reused by every call of the scope and by
their backward passes: transposing or repacking a weight per call cost more than the product at 32 rows.
(Not across scopes: fairseq's optimizers update ``p.data`` in place, which no version counter sees.)

Inside ``deferred_weight_grads()`` (the same loop, when training) the weight gradients of ``linear`` and
``grouped_linear`` are not computed step by step: each step's backward keeps its input and output gradient,
and one product over the rows of all steps gives each weight's gradient once the loop's backward is done
(``_WeightGate``). Per step that saves a 32-row weight-gradient product, which ran at a fifth of the speed of
the one large product, and the accumulation of a full weight-sized gradient.
"""

import contextlib
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_MKLDNN = (
    os.environ.get("GRNN_MKLDNN", "1") != "0"
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def set_mkldnn(enabled: bool) -> bool:
    """Run float32 CPU linears on oneDNN (else F.linear); returns the previous setting."""
    global _MKLDNN
    previous, _MKLDNN = _MKLDNN, bool(enabled) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return previous


def use_mkldnn(x: Tensor) -> bool:
    """Whether oneDNN's linear serves this float32 CPU tensor (autocast keeps aten's dispatch)."""
    return _MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


# Which kernel runs a product: "auto" measures both once per shape (the row count rounded up to a power of two,
# the thread count; a few milliseconds per shape, at its first use) and keeps the faster; "bmm" (aten's BLAS:
# mm/bmm) or "onednn" fix the choice, e.g. for runs that must be bitwise reproducible across machines.
PRODUCTS = os.environ.get("GRNN_PRODUCTS", "auto")
_CHOICE: Dict[tuple, bool] = {}


def _time_best(fn: Callable[[], object], rounds: int = 3, give_up: float = float("inf")) -> float:
    """Best of ``rounds`` timed runs after a warm-up; inf at once if the warm-up took over ``give_up`` seconds
    (some oneDNN layouts fall back to a reference kernel 100x slower: no need to time those three times)."""
    t0 = time.perf_counter()
    fn()  # warm-up (oneDNN primitive creation, packing, page faults)
    if time.perf_counter() - t0 > give_up:
        return float("inf")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bucket(n: int) -> int:
    """n rounded up to a power of two: the row counts of one measured shape."""
    return 1 << max(n - 1, 0).bit_length()


# Products of fewer multiply-adds than this are not measured (aten's runs them): too small for the choice to
# matter, and a fixed choice keeps the tests' tiny models bitwise reproducible from run to run.
MEASURE_MIN_MACS = 1 << 20


def onednn_faster(x: Tensor, key: tuple, make_case: Callable, macs: int) -> bool:
    """Whether the oneDNN variant of a product should run for float32 CPU input ``x``. key: the product and its
    shape (row counts bucketed); make_case(generator): random operands of that shape, returning two closures
    (aten's variant, oneDNN's) that each run the product (and its backward, where training); macs: the
    product's multiply-adds."""
    if not use_mkldnn(x):
        return False
    if PRODUCTS in ("bmm", "onednn"):
        return PRODUCTS == "onednn"
    if PRODUCTS != "auto":
        raise ValueError(f"GRNN_PRODUCTS={PRODUCTS!r}: expected auto, bmm or onednn")
    if macs < MEASURE_MIN_MACS:
        return False
    key = key + (torch.get_num_threads(),)
    if key not in _CHOICE:
        global _SCOPE
        outer, _SCOPE = _SCOPE, ({} if _SCOPE is not None else None)  # a scope of its own, as the caller's
        try:
            run_aten, run_onednn = make_case(torch.Generator().manual_seed(0))
            aten = _time_best(run_aten)
            _CHOICE[key] = _time_best(run_onednn, give_up=10 * aten + 0.01) < aten
        finally:
            _SCOPE = outer
    return _CHOICE[key]


def _training(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layout(t: Optional[Tensor]) -> Optional[str]:
    """How an operand is stored, as far as a kernel choice depends on it: "c" contiguous, "t" its last two
    dimensions transposed (a ``.t()`` view), "s" anything else (strided rows, a column slice)."""
    if t is None:
        return None
    if t.is_contiguous():
        return "c"
    return "t" if t.dim() >= 2 and t.transpose(-1, -2).is_contiguous() else "s"


def random_operand(shape: Tuple[int, ...], kind: Optional[str], gen: torch.Generator) -> Optional[Tensor]:
    """A random tensor of ``shape`` stored as ``layout`` says ("s": rows twice as far apart as contiguous)."""
    if kind is None:
        return None
    if kind == "c":
        return torch.randn(*shape, generator=gen)
    if kind == "t":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., : shape[-1]]


def _measure_case(run: Callable, operands, train: bool, gen: torch.Generator):
    """Closures (aten, oneDNN) running ``run(variant, *operands)`` forward and, when training, backward, on random
    operands laid out as the real ones: ``operands`` holds (shape, ``layout``) pairs or None (no operand)."""
    ops = [None if o is None else random_operand(o[0], o[1], gen).requires_grad_(train) for o in operands]
    with torch.no_grad():
        dy = torch.randn(run(False, *ops).shape, generator=gen)  # a dense output gradient (sum()'s has stride 0)

    def closure(onednn: bool):
        def go():
            if not train:
                with torch.no_grad():
                    return run(onednn, *ops)
            run(onednn, *ops).backward(dy)
            for t in ops:
                if t is not None:
                    t.grad = None
        return go

    return closure(False), closure(True)


def dense_2d(t: Tensor) -> bool:
    """Whether a matrix is stored densely, row-major or column-major (a transposed view): the weight layouts
    oneDNN's inner product runs on its optimized kernels. Any other layout (a column slice such as
    ``w[:, :E]``, a stride-0 expanded gradient) sends it to its reference kernel, ``ref:any``, 10-100x slower."""
    return t.is_contiguous() or t.t().is_contiguous()


def onednn_mm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T + bias`` by oneDNN, no autograd. x: N x In (PyTorch hands oneDNN a contiguous copy of
    strided rows), weight: Out x In, copied first unless ``dense_2d`` (never the reference kernel)."""
    if not dense_2d(weight):
        weight = weight.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_SCOPE: Optional[Dict[Tuple, Tuple[Tensor, Tensor]]] = None  # (id of the base, offset, shape, transposed) -> ...


@contextlib.contextmanager
def reuse_packed_weights():
    """Pack each weight once for all the linears of this scope (weights must not change inside it)."""
    global _SCOPE
    outer = _SCOPE
    if outer is None:
        _SCOPE = {}
    try:
        yield
    finally:
        if outer is None:
            _SCOPE = None


def packed_weight(weight: Tensor, transposed: bool, rows: int) -> Tensor:
    """``weight`` (Out x In) or its transpose, as ``onednn_mm`` takes it: packed once per ``reuse_packed_weights``
    scope, else the plain weight (oneDNN packs it on the fly) or a transposed copy."""
    w = weight.detach()
    if _SCOPE is None:
        return w.t().contiguous() if transposed else w
    base = weight if weight._base is None else weight._base  # a group's slice shares its parameter's entry
    key = (id(base), weight.storage_offset(), tuple(weight.shape), transposed)
    entry = _SCOPE.get(key)
    if entry is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if transposed else w, rows)
        entry = _SCOPE[key] = (base, packed)  # holding base keeps its id unique while the scope lives
    return entry[1]


def weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """``dy^T @ x`` (the weight gradient of ``x @ W^T``) by oneDNN as ``(x^T @ dy)^T``, which read its strided
    operands 1.3-2x faster than MKL's mm here. dy: N x Out, x: N x In -> Out x In (a transposed view)."""
    return onednn_mm(x.t(), dy.t()).t()  # In x N @ N x Out -> In x Out -> Out x In


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on oneDNN: forward ``y = x W^T + b``, backward ``dx = dy W`` and ``dW = dy^T x`` as oneDNN linears."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        In, Out = x.size(-1), weight.size(0)
        x2 = x.reshape(-1, In)  # ... x In -> N x In, N x Out below
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        # the input gradient's weight, packed now while a reuse scope may be open (backward runs after it closed)
        ctx.weight_t = packed_weight(weight, True, x2.size(0)) if _SCOPE is not None and ctx.needs_input_grad[0] else None
        return onednn_mm(x2, packed_weight(weight, False, x2.size(0)), bias).view(*x.shape[:-1], Out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.size(0)).contiguous()  # ... x Out -> N x Out (sum()'s gradient has stride 0)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = ctx.weight_t if ctx.weight_t is not None else packed_weight(weight, True, dy2.size(0))  # In x Out
            dx = onednn_mm(dy2, wt).view(ctx.x_shape)  # N x Out @ Out x In -> ... x In
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy2, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


_DEFER: Optional[Dict[int, "_DeferredWeight"]] = None  # id(weight) -> its entry
_DEFER_ENABLED = os.environ.get("GRNN_DEFER", "1") != "0"


def set_deferred(enabled: bool) -> bool:
    """Let ``deferred_weight_grads`` defer (else it is a no-op); returns the previous setting."""
    global _DEFER_ENABLED
    previous, _DEFER_ENABLED = _DEFER_ENABLED, bool(enabled)
    return previous


@contextlib.contextmanager
def deferred_weight_grads():
    """Compute the weight gradients of this scope's ``linear``/``grouped_linear`` calls once, over all their rows,
    after the backward pass through the scope (a loop applying the same weights at every step). Weights are
    told apart by identity: pass the same tensor at every step (a parameter, or a view or product of
    parameters made once before the loop). A no-op with ``GRNN_DEFER=0`` or ``set_deferred(False)``."""
    global _DEFER
    outer = _DEFER
    if outer is None and _DEFER_ENABLED:
        _DEFER = {}
    try:
        yield
    finally:
        if outer is None:
            _DEFER = None


class _WeightGate(torch.autograd.Function):
    """Passes a weight into a deferred scope; its backward, which autograd runs after every step's backward
    (they all consume its output), turns the rows the steps kept into the weight's gradient: per group
    ``sum_t dy_t^T x_t`` as one product over the concatenated rows. The steps themselves return no gradient
    for the weight, so the incoming one is zero."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: List) -> Tensor:
        ctx.rows, ctx.weight_shape = rows, weight.shape
        return weight.view(-1, *weight.shape[-2:])  # K x Out x In (1 x Out x In for a linear's Out x In)

    @staticmethod
    @once_differentiable
    def backward(ctx, _zero: Tensor):
        rows, ctx.rows[:] = list(ctx.rows), []  # emptied: a retained graph's next backward starts afresh
        if not rows:
            return None, None
        xs = torch.cat([x for x, _ in rows], dim=1)  # K x (sum of N) x In
        dys = torch.cat([dy for _, dy in rows], dim=1)  # K x (sum of N) x Out
        if xs.size(0) == 1:  # Out x N @ N x In -> 1 x Out x In
            dw = torch.mm(dys[0].t(), xs[0]).unsqueeze(0)
        else:
            dw = torch.bmm(dys.transpose(1, 2), xs)  # K x Out x N @ K x N x In -> K x Out x In
        return dw.view(ctx.weight_shape), None


class _DeferredGroupedLinear(torch.autograd.Function):
    """One step's ``out[k] = xg[k] W[k]^T + b[k]`` (aten's mm/bmm) whose weight gradient is left to the
    weight's ``_WeightGate``: backward keeps (xg, dout) for it and returns the input and bias gradients only.
    xg: K x N x In, weight: the gate's output, K x Out x In, bias: K x Out or None, deferred: the weight's
    ``_DeferredWeight``, whose ``weight_t`` (K x In x Out, contiguous) the forward product reads: at 32 rows
    ``x @ W^T`` on W's own layout ran 1.1-2.3x slower than on a transposed copy made once per scope."""

    @staticmethod
    def forward(ctx, xg: Tensor, weight: Tensor, bias: Optional[Tensor], deferred: "_DeferredWeight") -> Tensor:
        ctx.save_for_backward(xg, weight)
        ctx.rows, ctx.has_bias = deferred.rows, bias is not None
        return _grouped_linear(False, xg, deferred.weight_t.transpose(1, 2), bias)  # reads weight_t contiguously

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        xg, weight = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.needs_input_grad[1]:
            ctx.rows.append((xg, dout))
        dxg = db = None
        if ctx.needs_input_grad[0]:
            if xg.size(0) == 1:
                dxg = torch.mm(dout[0], weight[0]).unsqueeze(0)  # N x Out @ Out x In -> 1 x N x In
            else:
                dxg = torch.bmm(dout, weight)  # K x N x Out @ K x Out x In -> K x N x In
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum(1)  # K x Out
        return dxg, None, db, None


class _DeferredWeight:
    """A weight inside a ``deferred_weight_grads`` scope: the gate's output (K x Out x In), the rows its steps
    keep for the gradient, and a transposed copy for the forward products (K x In x Out)."""

    def __init__(self, weight: Tensor):
        self.weight = weight  # held: keeps id(weight) unique while the scope lives
        self.rows: List = []
        self.gated = _WeightGate.apply(weight, self.rows)
        self.weight_t = self.gated.detach().transpose(1, 2).contiguous()


def _deferred(x: Tensor, weight: Tensor) -> Optional[_DeferredWeight]:
    """The weight's ``_DeferredWeight`` when this call defers its gradient, else None."""
    if _DEFER is None or not weight.requires_grad or not torch.is_grad_enabled():
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    entry = _DEFER.get(id(weight))
    if entry is None:
        entry = _DEFER[id(weight)] = _DeferredWeight(weight)
    return entry


def _linear(onednn: bool, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _OneDNNLinear.apply(x, weight, bias) if onednn else F.linear(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for float32 CPU tensors where that measured faster for the shape.
    x: ... x In, weight: Out x In."""
    deferred = _deferred(x, weight) if x.numel() > 0 else None
    if deferred is not None:
        x2 = x.reshape(1, -1, x.size(-1))  # ... x In -> 1 x N x In
        b = None if bias is None else bias.unsqueeze(0)
        out = _DeferredGroupedLinear.apply(x2, deferred.gated, b, deferred)  # 1 x N x Out
        return out.view(*x.shape[:-1], weight.size(0))
    # a weight oneDNN would run on its reference kernel goes to aten's BLAS, which reads any strides
    if x.numel() > 0 and weight.dtype == torch.float32 and use_mkldnn(x) and dense_2d(weight):
        Out, In = weight.shape
        N, train = bucket(x.numel() // In), _training(x, weight, bias)
        x_kind = "c" if x.is_contiguous() else "s"
        operands = [((N, In), x_kind), ((Out, In), layout(weight)), None if bias is None else ((Out,), "c")]
        key = ("linear", N, In, Out, bias is not None, train, _SCOPE is not None, x_kind, layout(weight))

        def case(gen):
            return _measure_case(_linear, operands, train, gen)

        return _linear(onednn_faster(x, key, case, N * In * Out), x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose float32 CPU products run on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _stack(parts):
    """K tensors -> one with a leading K dimension (a view for K = 1)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Every group's linear on oneDNN, in one autograd node: forward ``out[k] = xg[k] W[k]^T + b[k]``, backward
    ``dxg[k] = dout[k] W[k]`` and ``dW[k] = dout[k]^T xg[k]`` (one node, so no per-group stacking of gradients)."""

    @staticmethod
    def forward(ctx, xg: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        K, N, _ = xg.size()
        ctx.save_for_backward(xg, weight)
        ctx.has_bias = bias is not None
        ws = weight.unbind(0)  # K x (Out/K x In/K)
        ctx.weights_t = [packed_weight(w, True, N) for w in ws] if _SCOPE is not None and ctx.needs_input_grad[0] else None
        bs = [None] * K if bias is None else bias.unbind(0)
        return _stack([onednn_mm(xg[k], packed_weight(ws[k], False, N), bs[k]) for k in range(K)])  # K x N x Out/K

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        xg, weight = ctx.saved_tensors
        K, N, _ = xg.size()
        dout = dout.contiguous()  # an expanded (stride-0) gradient would be a strided oneDNN operand
        dxg = dw = db = None
        if ctx.needs_input_grad[0]:
            wts = ctx.weights_t or [packed_weight(w, True, N) for w in weight.unbind(0)]  # K x (In/K x Out/K)
            dxg = _stack([onednn_mm(dout[k], wts[k]) for k in range(K)])  # K x N x Out/K @ Out/K x In/K
        if ctx.needs_input_grad[1]:
            dw = _stack([weight_grad(dout[k], xg[k]) for k in range(K)])  # K x Out/K x In/K
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum(1)  # K x Out/K
        return dxg, dw, db


def grouped_linear(xg: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Every group's own linear map, batched: ``out[k] = xg[k] @ weight[k]^T + bias[k]``.

    xg: K x N x In/K (rows may be strided), weight: K x Out/K x In/K, bias: K x Out/K or None.
    Returns K x N x Out/K. oneDNN per group on float32 CPU tensors where that measured faster for the shape,
    else one (b)addbmm (mm for K = 1).
    """
    deferred = _deferred(xg, weight) if xg.numel() > 0 else None
    if deferred is not None:
        return _DeferredGroupedLinear.apply(xg, deferred.gated, bias, deferred)
    if xg.numel() > 0 and weight.dtype == torch.float32 and use_mkldnn(xg) and layout(weight) != "s":
        K, N, In = xg.shape
        Out, N, train = weight.size(1), bucket(N), _training(xg, weight, bias)
        operands = [((K, N, In), layout(xg)), ((K, Out, In), layout(weight)), None if bias is None else ((K, Out), "c")]
        key = ("grouped_linear", K, N, In, Out, bias is not None, train, _SCOPE is not None, layout(xg), layout(weight))

        def case(gen):
            return _measure_case(_grouped_linear, operands, train, gen)

        return _grouped_linear(onednn_faster(xg, key, case, K * N * In * Out), xg, weight, bias)
    return _grouped_linear(False, xg, weight, bias)


def _grouped_linear(onednn: bool, xg: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if onednn:
        return _OneDNNGroupedLinear.apply(xg, weight, bias)
    if xg.size(0) == 1:  # one group: mm, whose backward runs 1.5-2x faster than bmm's at 32 rows
        return F.linear(xg[0], weight[0], None if bias is None else bias[0]).unsqueeze(0)  # 1 x N x Out
    if bias is None:
        return torch.bmm(xg, weight.transpose(1, 2))  # K x N x In/K @ K x In/K x Out/K -> K x N x Out/K
    return torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))
