"""The matrix products of grnn_fairseq, for the models' linears and the fused group LSTM alike.

Every float32 CPU product runs on aten's BLAS (``F.linear``, ``mm``, ``bmm``) or on oneDNN's linear, as
``backend.use_onednn`` decides (a fixed rule by default, a measurement when asked). Elsewhere (float64, CUDA,
autocast, no oneDNN) the products *are* aten's. oneDNN only ever receives operands it runs on its optimized
kernels: weights stored row- or column-major (``dense_2d``), contiguous gradients; a weight of any other
layout runs on aten, which reads any strides.

* ``linear`` / ``Linear``: ``F.linear`` / ``nn.Linear`` (same parameters and state dict).
* ``grouped_linear``: every group's own linear map, batched (the group LSTM's products).
* ``reuse_packed_weights()``: inside a decoder's loop over target steps, oneDNN's weights are packed into its
  blocked layout once (their transposes for the input gradient too) and reused by every call of the scope; an
  incremental decoder's steps share one store of them (``models/common.py``: ``incremental_packing``).
* ``deferred_weight_grads()``: inside the same loop, when training, the weight gradients of ``linear`` and
  ``grouped_linear``, and the gradients of the matrices ``matvec`` and ``vecmat`` read at every step (an
  attention's keys and values), are one product over the rows of all steps after the loop's backward pass,
  instead of a small product per step.
* ``matvec`` / ``vecmat``: per batch row a matrix-vector product (an attention's scores and context).
* For the fused group LSTM (``fused_group_lstm.py``): ``input_projections`` (all time steps at once),
  ``grouped_weight_grad`` (over all rows) and ``StepProducts`` (the per-step recurrent products).
"""

import contextlib
import contextvars
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend

# --------------------------------------------------------------------------------------- operand layouts


def dense_2d(t: Tensor) -> bool:
    """Whether a matrix is stored densely, row-major or column-major (a transposed view): the weight layouts
    oneDNN's inner product runs on its optimized kernels. Any other layout (a column slice such as
    ``w[:, :E]``, a stride-0 expanded gradient) sends it to its reference kernel, ``ref:any``, many times slower."""
    return t.is_contiguous() or t.t().is_contiguous()


def layout(t: Optional[Tensor]) -> Optional[str]:
    """How an operand is stored, as far as a kernel choice depends on it: "c" contiguous, "t" its last two
    dimensions transposed (a ``.t()`` view), "s" anything else (strided rows, a column slice)."""
    if t is None:
        return None
    if t.is_contiguous():
        return "c"
    return "t" if t.dim() >= 2 and t.transpose(-1, -2).is_contiguous() else "s"


def transposed(weight: Tensor) -> Tensor:
    """K x A x B -> its contiguous K x B x A. One group goes through aten's 2D transposing copy, which is tiled
    where its batched (3D) copy is not (docs/speed.md: 1.5-4.5x faster for one-group weights of 1-8 MB)."""
    if weight.size(0) == 1:
        return weight[0].t().contiguous().unsqueeze(0)  # 1 x A x B -> A x B -> B x A -> 1 x B x A
    return weight.transpose(1, 2).contiguous()  # K x A x B -> K x B x A


def random_operand(shape: Tuple[int, ...], kind: Optional[str], gen: torch.Generator) -> Optional[Tensor]:
    """A random tensor of ``shape`` stored as ``layout`` says ("s": rows twice as far apart as contiguous)."""
    if kind is None:
        return None
    if kind == "c":
        return torch.randn(*shape, generator=gen)
    if kind == "t":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., : shape[-1]]


def bucket(n: int) -> int:
    """n rounded up to a power of two: the row counts of one measured shape."""
    return 1 << max(n - 1, 0).bit_length()


def _measure_case(run: Callable, operands, train: bool, gen: torch.Generator):
    """Closures (aten, oneDNN) running ``run(onednn, *operands)`` forward and, when training, backward, on random
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


def _training(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------ oneDNN calls


def onednn_mm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T + bias`` by oneDNN, no autograd. x: N x In (PyTorch hands oneDNN a contiguous copy of
    strided rows), weight: Out x In, copied first unless ``dense_2d`` (never the reference kernel)."""
    if not dense_2d(weight):
        weight = weight.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """``dy^T @ x`` (the weight gradient of ``x @ W^T``) by oneDNN as ``(x^T @ dy)^T``, so that both operands are
    read as stored. dy: N x Out (dense), x: N x In -> Out x In (a transposed view)."""
    return onednn_mm(x.t(), dy.t()).t()  # In x N @ N x Out -> In x Out -> Out x In


# the packed weights of the innermost reuse_packed_weights() scope: (id of the base, offset, shape, transposed) ->
# (base, packed); None outside a scope
_packed: contextvars.ContextVar[Optional[Dict[Tuple, Tuple[Tensor, Tensor]]]] = contextvars.ContextVar(
    "grnn_packed_weights", default=None
)


@contextlib.contextmanager
def reuse_packed_weights(store: Optional[Dict] = None):
    """Pack each weight once for all the linears of this scope (weights must not change inside it; not across
    scopes: fairseq's optimizers update ``p.data`` in place, which no version counter sees). store: a dict that
    holds the packed weights beyond the scope, for the next scope given it (an incremental decoder's state: the
    steps of one beam search, whose weights do not change); default a new one. An inner scope is the outer's."""
    token = _packed.set({} if store is None else store) if _packed.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _packed.reset(token)


def reusing_packed_weights() -> bool:
    """Whether a ``reuse_packed_weights`` scope is open."""
    return _packed.get() is not None


def packed_weight(weight: Tensor, transposed: bool, rows: int) -> Tensor:
    """``weight`` (Out x In) or its transpose, as ``onednn_mm`` takes it: packed once per ``reuse_packed_weights``
    scope, else the plain weight (oneDNN packs it on the fly) or a transposed copy."""
    w = weight.detach()
    scope = _packed.get()
    if scope is None:
        return w.t().contiguous() if transposed else w
    base = weight if weight._base is None else weight._base  # a group's slice shares its parameter's entry
    key = (id(base), weight.storage_offset(), tuple(weight.shape), transposed)
    return _once_in(scope, key, base, lambda: pack(w, transposed, rows))


def packed_for_steps(weight: Tensor, transposed: bool, rows: int) -> Tensor:
    """``weight`` packed for the products of a loop's steps: from the open ``reuse_packed_weights`` scope (packed
    once there), else packed now."""
    return packed_weight(weight, transposed, rows) if reusing_packed_weights() else pack(weight, transposed, rows)


def derived_weight(weight: Tensor, name: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, a tensor computed from ``weight`` alone (``name`` tells the derivations apart), made once per
    ``reuse_packed_weights`` scope, so that the same tensor, and so its packed form, serves every call of the
    scope; outside a scope, made now."""
    scope = _packed.get()
    return make() if scope is None else _once_in(scope, (id(weight), name), weight, make)


def _once_in(scope: Dict, key: Tuple, keep: Tensor, make: Callable[[], Tensor]) -> Tensor:
    """``scope[key]``'s tensor, made by ``make()`` at the first call; the entry holds ``keep``, the tensor whose id
    is in ``key``, so that no other tensor takes that id while the scope lives."""
    entry = scope.get(key)
    if entry is None:
        entry = scope[key] = (keep, make())
    return entry[1]


def pack(weight: Tensor, transposed: bool, rows: int) -> Tensor:
    """``weight`` (Out x In) or its transpose in oneDNN's blocked layout for products of about ``rows`` rows. The
    transpose is packed from a contiguous copy (packing the transposed view itself took 1.8-3x as long as copy
    and pack: AMD EPYC, 512 x 1024 and 2048 x 1024, docs/speed.md)."""
    w = weight.detach()
    dense = w.t().contiguous() if transposed else w.contiguous()  # (In x Out or Out x In), row-major
    return torch.ops.mkldnn._reorder_linear_weight(dense, rows)


def _stack(parts: List[Tensor]) -> Tensor:
    """K tensors -> one with a leading K dimension (a view for K = 1)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _onednn_groups(xg: Tensor, weights: List[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """Per group k ``onednn_mm(xg[k], weights[k], bias[k])``. xg: K x N x In/K, weights: K as ``onednn_mm`` takes
    them (Out/K x In/K, plain or packed), bias: K x Out/K or None -> K x N x Out/K."""
    bs = [None] * len(weights) if bias is None else bias.unbind(0)
    return _stack([onednn_mm(xg[k], w, bs[k]) for k, w in enumerate(weights)])


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Every group's linear on oneDNN, in one autograd node: forward ``out[k] = xg[k] W[k]^T + b[k]``, backward
    ``dxg[k] = dout[k] W[k]`` and ``dW[k] = dout[k]^T xg[k]``. A plain linear is one group."""

    @staticmethod
    def forward(ctx, xg: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        N = xg.size(1)
        ctx.save_for_backward(xg, weight)
        ctx.has_bias = bias is not None
        ws = weight.unbind(0)  # K x (Out/K x In/K)
        # the input gradient's weights, packed now while a reuse scope may be open (backward runs after it closed)
        scoped = _packed.get() is not None and ctx.needs_input_grad[0]
        ctx.weights_t = [packed_weight(w, True, N) for w in ws] if scoped else None
        return _onednn_groups(xg, [packed_weight(w, False, N) for w in ws], bias)  # K x N x Out/K

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        xg, weight = ctx.saved_tensors
        K, N, _ = xg.size()
        dout = dout.contiguous()  # an expanded (stride-0) gradient would be a strided oneDNN operand
        dxg = dw = db = None
        if ctx.needs_input_grad[0]:
            wts = ctx.weights_t or [packed_weight(w, True, N) for w in weight.unbind(0)]  # K x (In/K x Out/K)
            dxg = _onednn_groups(dout, wts)  # K x (N x Out/K @ Out/K x In/K) -> K x N x In/K
        if ctx.needs_input_grad[1]:
            dw = _stack([weight_grad(dout[k], xg[k]) for k in range(K)])  # K x Out/K x In/K
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum(1)  # K x Out/K
        return dxg, dw, db


# ------------------------------------------------------------------------------- deferred weight gradients

# id(weight) -> _DeferredWeight, ("shared", id(matrix)) -> _Shared
_deferred_scope: contextvars.ContextVar[Optional[Dict[object, object]]] = contextvars.ContextVar(
    "grnn_deferred_weights", default=None
)


@contextlib.contextmanager
def deferred_weight_grads():
    """Compute the weight gradients of this scope's ``linear``/``grouped_linear`` calls once, over all their rows,
    after the backward pass through the scope (a loop applying the same weights at every step). Weights are
    told apart by identity: pass the same tensor at every step (a parameter, or a view or product of
    parameters made once before the loop). A no-op when the backend's ``defer_weight_grads`` is off."""
    token = None
    if _deferred_scope.get() is None and backend.current().defer_weight_grads:
        token = _deferred_scope.set({})
    try:
        yield
    finally:
        if token is not None:
            _deferred_scope.reset(token)


class _Gate(torch.autograd.Function):
    """Passes a tensor that every step of a deferred scope reads (a weight; an attention's keys or values) into
    the scope as the view ``shape``; its backward, which autograd runs after every step's backward (they all
    consume its output), turns what the steps kept (``rows``) into the tensor's gradient by ``combine(rows)``,
    one product over all steps. The steps themselves return no gradient for the tensor, so the incoming one is
    zero."""

    @staticmethod
    def forward(ctx, tensor: Tensor, rows: List, combine: Callable[[List], Tensor], shape: Tuple[int, ...]) -> Tensor:
        ctx.rows, ctx.combine, ctx.shape = rows, combine, tensor.shape
        return tensor.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, _zero: Tensor):
        rows, ctx.rows[:] = list(ctx.rows), []  # emptied: a retained graph's next backward starts afresh
        if not rows:
            return None, None, None, None
        return ctx.combine(rows).view(ctx.shape), None, None, None


def _weight_grad_of_rows(rows: List) -> Tensor:
    """A weight's gradient from its steps' (x, dy): per group ``sum_t dy_t^T x_t`` over the concatenated rows."""
    xs = torch.cat([x for x, _ in rows], dim=1)  # K x (sum of N) x In
    dys = torch.cat([dy for _, dy in rows], dim=1)  # K x (sum of N) x Out
    if xs.size(0) == 1:  # Out x N @ N x In -> 1 x Out x In
        return torch.mm(dys[0].t(), xs[0]).unsqueeze(0)
    return torch.bmm(dys.transpose(1, 2), xs)  # K x Out x N @ K x N x In -> K x Out x In


class _DeferredGroupedLinear(torch.autograd.Function):
    """One step's ``out[k] = xg[k] W[k]^T + b[k]`` whose weight gradient is left to the weight's ``_Gate``:
    backward keeps (xg, dout) for it and returns the input and bias gradients only. xg: K x N x In, weight: the
    gate's output, K x Out x In, bias: K x Out or None, deferred: the weight's ``_DeferredWeight``, which holds
    the weight as the step's products read it: packed for oneDNN (forward, and its transpose for the input
    gradient), or for aten a transposed copy (K x In x Out, contiguous): at a decoder step's few rows
    ``x @ W^T`` is faster on it than on W's own layout."""

    @staticmethod
    def forward(ctx, xg: Tensor, weight: Tensor, bias: Optional[Tensor], deferred: "_DeferredWeight") -> Tensor:
        ctx.save_for_backward(xg, weight)
        ctx.deferred, ctx.has_bias = deferred, bias is not None
        if deferred.onednn:  # K x (N x In/K @ In/K x Out/K) -> K x N x Out/K
            return _onednn_groups(xg, deferred.packed, bias)
        return _grouped_linear_aten(xg, deferred.weight_t.transpose(1, 2), bias)  # reads weight_t contiguously

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        xg, weight = ctx.saved_tensors
        deferred = ctx.deferred
        dout = dout.contiguous()
        if ctx.needs_input_grad[1]:
            deferred.rows.append((xg, dout))
        dxg = db = None
        if ctx.needs_input_grad[0]:
            if deferred.onednn:  # K x (N x Out/K @ Out/K x In/K) -> K x N x In/K
                dxg = _onednn_groups(dout, deferred.packed_t)
            elif xg.size(0) == 1:
                dxg = torch.mm(dout[0], weight[0]).unsqueeze(0)  # N x Out @ Out x In -> 1 x N x In
            else:
                dxg = torch.bmm(dout, weight)  # K x N x Out @ K x Out x In -> K x N x In
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum(1)  # K x Out
        return dxg, None, db, None


class _DeferredWeight:
    """A weight inside a ``deferred_weight_grads`` scope: the gate's output (K x Out x In), the rows its steps
    keep for the gradient, and the weight as the steps' products read it, made once at first use: oneDNN's
    packed weights when ``onednn`` (the backend's choice for the scope's first call, of N rows), else a
    transposed copy for aten. The weight does not change while the scope's graph lives (autograd checks it)."""

    def __init__(self, weight: Tensor, onednn: bool, rows: int):
        self.weight = weight  # held: keeps id(weight) unique while the scope lives
        self.onednn, self.n = onednn, rows
        self.rows: List = []
        # K x Out x In (1 x Out x In for a linear's Out x In)
        self.gated = _Gate.apply(weight, self.rows, _weight_grad_of_rows, (-1, *weight.shape[-2:]))

    @functools.cached_property
    def weight_t(self) -> Tensor:
        return transposed(self.gated.detach())  # K x Out x In -> K x In x Out

    @functools.cached_property
    def packed(self) -> List[Tensor]:
        """Per group the weight (Out/K x In/K) packed for oneDNN: the forward products."""
        return [pack(w, False, self.n) for w in self.gated.detach().unbind(0)]

    @functools.cached_property
    def packed_t(self) -> List[Tensor]:
        """Per group its transpose (In/K x Out/K) packed for oneDNN: the input gradients."""
        return [pack(w, True, self.n) for w in self.gated.detach().unbind(0)]


def _deferring_scope(x: Tensor, tensor: Tensor) -> Optional[Dict[object, object]]:
    """The deferred scope when a call on input x defers the gradient of ``tensor`` (a weight, a shared matrix):
    inside a scope, training, the tensor wanting a gradient, x not empty, no autocast; else None."""
    scope = _deferred_scope.get()
    if scope is None or x.numel() == 0 or not tensor.requires_grad or not torch.is_grad_enabled():
        return None
    return None if torch.is_autocast_enabled(x.device.type) else scope


def _deferred(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, kind: str = "grouped_linear"
              ) -> Optional[_DeferredWeight]:  # fmt: skip
    """The weight's ``_DeferredWeight`` when this call defers its gradient, else None. x: K x N x In, weight:
    K x Out x In (or Out x In), bias: K x Out or None: the first call's, from which the products' kernel is
    chosen as for a call outside the scope (``_choose_grouped``)."""
    scope = _deferring_scope(x, weight)
    if scope is None:
        return None
    entry = scope.get(id(weight))
    if entry is None:
        w3 = weight.view(-1, *weight.shape[-2:])  # K x Out x In (1 x Out x In for a linear's Out x In)
        onednn = x.dim() == 3 and _choose_grouped(x, w3, bias, kind)
        entry = scope[id(weight)] = _DeferredWeight(weight, onednn, x.size(-2))
    return entry


# ------------------------------------------------------------------------------------ linear, grouped_linear


def _grouped_linear_aten(xg: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``xg[k] @ weight[k]^T + bias[k]`` on aten: mm for one group (at a decoder step's few rows its backward is
    faster than bmm's), else one (b)addbmm. xg: K x N x In, weight: K x Out x In, bias: K x Out or None -> K x N x Out."""
    if xg.size(0) == 1:
        # squeeze, not indexing: its gradient is a view, where indexing's fills a zero weight-sized one
        out = F.linear(xg.squeeze(0), weight.squeeze(0), None if bias is None else bias.squeeze(0))  # N x Out
        return out.unsqueeze(0)  # 1 x N x Out
    if bias is None:
        return torch.bmm(xg, weight.transpose(1, 2))  # K x N x In @ K x In x Out -> K x N x Out
    return torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))


def _grouped_linear(onednn: bool, xg: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _OneDNNGroupedLinear.apply(xg, weight, bias) if onednn else _grouped_linear_aten(xg, weight, bias)


def _choose_grouped(xg: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str) -> bool:
    """Whether oneDNN runs ``grouped_linear(xg, weight, bias)`` (``backend.use_onednn``, keyed by the shape, the
    row count rounded up to a power of two, and the operands' layouts). A weight oneDNN would run on its
    reference kernel never goes there."""
    if weight.dtype != torch.float32 or layout(weight) == "s" or not backend.onednn_usable(xg):
        return False
    K, N, In = xg.shape
    Out, n, train = weight.size(1), bucket(N), _training(xg, weight, bias)
    operands = [((K, n, In), layout(xg)), ((K, Out, In), layout(weight)), None if bias is None else ((K, Out), "c")]
    key = (K, n, In, Out, bias is not None, train, _packed.get() is not None, layout(xg), layout(weight))

    def case(gen):
        return _measure_case(_grouped_linear, operands, train, gen)

    return backend.use_onednn(xg, kind, key, case, K * N * In * Out, K=K)


def grouped_linear(xg: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Every group's own linear map, batched: ``out[k] = xg[k] @ weight[k]^T + bias[k]``.

    xg: K x N x In/K (rows may be strided), weight: K x Out/K x In/K, bias: K x Out/K or None.
    Returns K x N x Out/K.
    """
    if xg.numel() == 0:
        return _grouped_linear_aten(xg, weight, bias)
    deferred = _deferred(xg, weight, bias)
    if deferred is not None:
        return _DeferredGroupedLinear.apply(xg, deferred.gated, bias, deferred)
    return _grouped_linear(_choose_grouped(xg, weight, bias, "grouped_linear"), xg, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``grouped_linear`` as one group. x: ... x In, weight: Out x In."""
    if x.numel() == 0 or x.dim() < 2:
        return F.linear(x, weight, bias)
    x2 = x.reshape(1, -1, x.size(-1))  # ... x In -> 1 x N x In
    w, b = weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0)  # 1 x Out x In, 1 x Out
    deferred = _deferred(x2, weight, b, "linear")
    if deferred is not None:
        out = _DeferredGroupedLinear.apply(x2, deferred.gated, b, deferred)
    elif _choose_grouped(x2, w, b, "linear"):
        out = _OneDNNGroupedLinear.apply(x2, w, b)
    else:
        return F.linear(x, weight, bias)
    return out.view(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose products follow the backend (``linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# ------------------------------------------------------------ products with a matrix shared by a loop's steps


def matvec(matrix: Tensor, vec: Tensor, addend: Optional[Tensor] = None) -> Tensor:
    """Per batch row ``matrix[b] @ vec[b] + addend[b]``: matrix B x S x D, vec B x D, addend B x S or None ->
    B x S (an attention's scores over S keys). Computed as ``vec^T matrix^T`` (B x 1 x D @ B x D x S), which
    aten's CPU BLAS ran 12x faster than B x S x D @ B x D x 1 (B = 90, S = 36, D = 512, one thread, AMD EPYC).
    Inside a ``deferred_weight_grads`` scope the matrix's gradient is one product over all steps (``_Shared``)."""
    shared = _shared(matrix, vec)
    if shared is not None:
        return _SharedMatrixStep.apply(vec, shared.gated, addend, shared, False)
    return _matvec(matrix, vec, addend)


def _matvec(matrix: Tensor, vec: Tensor, addend: Optional[Tensor]) -> Tensor:
    mt, v = matrix.transpose(1, 2), vec.unsqueeze(1)  # B x S x D -> B x D x S, B x D -> B x 1 x D
    out = torch.bmm(v, mt) if addend is None else torch.baddbmm(addend.unsqueeze(1), v, mt)  # B x 1 x S
    return out.squeeze(1)  # B x 1 x S -> B x S


def vecmat(vec: Tensor, matrix: Tensor) -> Tensor:
    """Per batch row ``vec[b]^T @ matrix[b]``: vec B x S, matrix B x S x D -> B x D (an attention's context: the
    values weighted). Inside a ``deferred_weight_grads`` scope the matrix's gradient is one product over all
    steps (``_Shared``)."""
    shared = _shared(matrix, vec)
    if shared is not None:
        return _SharedMatrixStep.apply(vec, shared.gated, None, shared, True)
    return _vecmat(vec, matrix)


def _vecmat(vec: Tensor, matrix: Tensor) -> Tensor:
    return torch.bmm(vec.unsqueeze(1), matrix).squeeze(1)  # B x 1 x S @ B x S x D -> B x 1 x D -> B x D


def _matrix_grad_of_rows(rows: List) -> Tensor:
    """A shared matrix's gradient from its steps' factors (B x S, B x D): ``sum_t left_t right_t^T`` per batch
    row as one product, where per step the outer product and its accumulation wrote two B x S x D tensors."""
    left = torch.stack([a for a, _ in rows], dim=2)  # T x (B x S) -> B x S x T
    right = torch.stack([b for _, b in rows], dim=1)  # T x (B x D) -> B x T x D
    return torch.bmm(left, right)  # B x S x T @ B x T x D -> B x S x D


class _SharedMatrixStep(torch.autograd.Function):
    """One step's ``matvec`` (``transposed`` False) or ``vecmat`` (True) whose matrix gradient, the outer product
    of a B x S and a B x D factor, is left to the matrix's gate; the vector's gradient is the other product."""

    @staticmethod
    def forward(ctx, vec: Tensor, matrix: Tensor, addend: Optional[Tensor], shared: "_Shared", transposed: bool):
        ctx.save_for_backward(vec, matrix)
        ctx.shared, ctx.transposed, ctx.has_addend = shared, transposed, addend is not None
        return _vecmat(vec, matrix) if transposed else _matvec(matrix, vec, addend)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        vec, matrix = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ctx.shared.rows.append((vec, dy) if ctx.transposed else (dy, vec))  # (B x S, B x D)
        dvec = None
        if ctx.needs_input_grad[0]:
            dvec = _matvec(matrix, dy, None) if ctx.transposed else _vecmat(dy, matrix)
        daddend = dy if ctx.has_addend and ctx.needs_input_grad[2] else None
        return dvec, None, daddend, None, None


class _Shared:
    """A matrix inside a ``deferred_weight_grads`` scope: the gate's output and the factors its steps keep."""

    def __init__(self, matrix: Tensor):
        self.matrix = matrix  # held: keeps id(matrix) unique while the scope lives
        self.rows: List = []
        self.gated = _Gate.apply(matrix, self.rows, _matrix_grad_of_rows, matrix.shape)


def _shared(matrix: Tensor, vec: Tensor) -> Optional[_Shared]:
    """The matrix's ``_Shared`` when this call defers its gradient (``_deferring_scope``), else None."""
    scope = _deferring_scope(vec, matrix)
    if scope is None:
        return None
    key = ("shared", id(matrix))
    if key not in scope:
        scope[key] = _Shared(matrix)
    return scope[key]


# ---------------------------------------------------------------------- the fused group LSTM's products


def input_projections(xg: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None,
                      xbuf: Optional[Tensor] = None) -> List[Tensor]:
    """Per group k: ``xg[k] @ w[k]^T + b[k]``, all time steps at once. xg: K x N x In (rows may be strided),
    w: K x Out x In, b: K x Out or None. Returns K tensors N x Out (a list, never stacked: the copy would cost
    more than oneDNN gains). out (K x N x Out) and xbuf (K x N x In): reused buffers for aten's variant; a fresh
    output over glibc's 32 MB mmap threshold is page-faulted anew on every call, and MKL's bmm reads strided rows
    slower than one contiguous copy (docs/speed.md)."""
    K, N, In = xg.shape
    Out = w.size(1)
    xg_kind = "c" if xg.is_contiguous() else "s"

    def case(gen):
        n = bucket(N)
        xs, ws = random_operand((K, n, In), xg_kind, gen), torch.randn(K, Out, In, generator=gen)
        bs = None if b is None else torch.randn(K, Out, generator=gen)
        o, xb = torch.empty(K, n, Out), torch.empty(K, n, In)
        return lambda: _input_projections_aten(xs, ws, bs, o, xb), lambda: _input_projections_onednn(xs, ws, bs)

    key = (K, bucket(N), In, Out, b is not None, xg_kind)
    if backend.use_onednn(xg, "input_projections", key, case, K * N * In * Out):
        return _input_projections_onednn(xg, w, b)
    return _input_projections_aten(xg, w, b, out, xbuf)


def _input_projections_onednn(xg: Tensor, w: Tensor, b: Optional[Tensor]) -> List[Tensor]:
    N = xg.size(1)  # the weights packed once per reuse_packed_weights scope (an incremental decoder's steps)
    return [onednn_mm(xg[k], packed_weight(w[k], False, N), None if b is None else b[k]) for k in range(xg.size(0))]


def _input_projections_aten(xg: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None,
                            xbuf: Optional[Tensor] = None) -> List[Tensor]:
    if out is None:
        return list(_grouped_linear_aten(xg, w, b).unbind(0))  # K x N x Out -> K x (N x Out)
    if xbuf is not None and not xg.is_contiguous():
        xg = xbuf.copy_(xg)  # K x N x In, contiguous
    if b is None:
        torch.bmm(xg, w.transpose(1, 2), out=out)  # K x N x In @ K x In x Out -> K x N x Out
    else:
        out.copy_(b.unsqueeze(1)).baddbmm_(xg, w.transpose(1, 2))  # K x 1 x Out + K x N x In @ K x In x Out
    return list(out.unbind(0))  # K x N x Out -> K x (N x Out)


def grouped_weight_grad(dg: Tensor, xg: Tensor) -> Tensor:
    """Per group k: ``dg[k]^T @ xg[k]``, the weight gradient over all rows. dg: K x N x Out (contiguous),
    xg: K x N x In -> K x Out x In. One bmm, or one oneDNN product per group, ``(xg[k]^T @ dg[k])^T``, whose
    row-major operand xg^T is made by one transposing copy of all groups at once (a copy per group of strided
    rows cost 4x more)."""
    K, N, In = xg.shape
    Out = dg.size(2)
    # the layer input arrives as K x N x In views of N x (K*In) rows, the recurrent inputs contiguous
    rows_of_one_matrix = xg.transpose(0, 1).is_contiguous()

    def case(gen):  # random operands laid out as the real ones
        n = bucket(N)
        dgs = torch.randn(K, n, Out, generator=gen)
        if rows_of_one_matrix:
            xs = torch.randn(n, K, In, generator=gen).transpose(0, 1)  # n x K x In -> K x n x In
        else:
            xs = torch.randn(K, n, In, generator=gen)
        return lambda: _grouped_weight_grad_aten(dgs, xs), lambda: _grouped_weight_grad_onednn(dgs, xs)

    key = (K, bucket(N), In, Out, rows_of_one_matrix)
    if backend.use_onednn(xg, "weight_grad", key, case, K * N * In * Out):
        return _grouped_weight_grad_onednn(dg, xg)
    return _grouped_weight_grad_aten(dg, xg)


def _grouped_weight_grad_aten(dg: Tensor, xg: Tensor) -> Tensor:
    return torch.bmm(dg.transpose(1, 2), xg)  # K x Out x N @ K x N x In -> K x Out x In


def _grouped_weight_grad_onednn(dg: Tensor, xg: Tensor) -> Tensor:
    K, N, In = xg.shape
    if xg.transpose(0, 1).is_contiguous():  # the groups' columns of one N x (K*In) matrix, as a layer input is
        xT = xg.transpose(0, 1).reshape(N, K * In).t().contiguous().view(K, In, N)  # N x K*In -> K x In x N
    else:
        xT = xg.transpose(1, 2).contiguous()  # K x N x In -> K x In x N
    # K x (In x N @ N x Out -> In x Out -> Out x In)
    return torch.stack([onednn_mm(xT[k], dg[k].t()).t() for k in range(K)])


class StepProducts:
    """The per-step recurrent products of one fused call, weights prepared once: forward ``z = r @ W_hh^T``
    (plus the step's input projections), backward ``dr = dg @ W_hh``; either one bmm over the groups, or one
    oneDNN linear per group on weights packed once into oneDNN's blocked layout (repacking a weight on every
    step cost as much as a fifth of the product).

    x: the layer input (decides the kernels). w_hh: K x 4H/K x H/K, the forward weight (g rows doubled for the
    sigmoid trick), or None in the backward pass; w_hh_grad: the unscaled K x 4H/K x H/K weight of the backward
    product, or None in the forward pass. B: the batch (oneDNN's hint for its layout). onednn: fixes the
    kernel (the benchmark's measurement cases), else ``backend.use_onednn`` decides.
    """

    def __init__(self, x: Tensor, w_hh: Optional[Tensor], w_hh_grad: Optional[Tensor], B: int,
                 onednn: Optional[bool] = None):  # fmt: skip
        K, G4, Hk = (w_hh if w_hh is not None else w_hh_grad).size()
        self.K = K
        self.onednn = self._choose(x, K, B, Hk) if onednn is None else onednn
        self.w = self.w_t = self.w_grad = None
        if self.onednn:  # packed once per call, or per reuse_packed_weights scope (an incremental decoder's steps)
            if w_hh is not None:
                self.w = [packed_for_steps(w, False, B) for w in w_hh.unbind(0)]  # K x (4H/K x H/K), oneDNN layout
            if w_hh_grad is not None:  # dr = dg @ W_hh = linear(dg, W_hh^T): K x (H/K x 4H/K), oneDNN layout
                self.w_grad = [packed_for_steps(w, True, B) for w in w_hh_grad.unbind(0)]
        else:
            if w_hh is not None:  # K x 4H/K x H/K -> K x H/K x 4H/K, once per call or reuse_packed_weights scope
                self.w_t = derived_weight(w_hh, "transposed", lambda: transposed(w_hh))
            self.w_grad = w_hh_grad  # K x 4H/K x H/K

    @staticmethod
    def _choose(x: Tensor, K: int, B: int, Hk: int) -> bool:
        n = bucket(B)

        def case(gen):
            r = torch.randn(K, n, Hk, generator=gen)  # K x B x H/K
            dg = torch.randn(K, n, 4 * Hk, generator=gen)  # K x B x 4H/K
            w = torch.randn(K, 4 * Hk, Hk, generator=gen)  # K x 4H/K x H/K
            gs, out_g, out_r = list(dg.unbind(0)), torch.empty_like(dg), torch.empty_like(r)
            runs = []
            for onednn in (False, True):
                p = StepProducts(r, w, w, n, onednn=onednn)
                runs.append(lambda p=p: (p.forward(r, gs, out_g), p.backward(dg, out_r)))
            return runs

        return backend.use_onednn(x, "step", (K, n, Hk), case, K * B * Hk * 4 * Hk, K=K, Hk=Hk)

    def forward(self, r: Tensor, g_t: List[Tensor], gbuf: Tensor) -> Tensor:
        """gbuf = g_t + r @ W_hh^T: the step's pre-activations. r: K x B x H/K, g_t: K tensors B x 4H/K (the
        input projections of the step), gbuf: K x B x 4H/K."""
        if self.onednn:  # K x (B x 4H/K) -> K x B x 4H/K
            return torch.stack(self.parts(r, g_t, gbuf)[0], out=gbuf)
        torch.stack(g_t, out=gbuf)  # K x (B x 4H/K) -> K x B x 4H/K
        return gbuf.baddbmm_(r, self.w_t)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K

    def parts(self, r: Tensor, g_t: List[Tensor], gbuf: Tensor) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
        """The pre-activations unstacked, for the C kernel: (z, x) with ``z[k] + x[k] = g_t[k] + r[k] @ W_hh[k]^T``,
        K tensors B x 4H/K each; x is None when z already holds the input projections (oneDNN adds them)."""
        if self.onednn:  # K x (B x H/K @ H/K x 4H/K + B x 4H/K)
            linear_add = torch.ops.mkldnn._linear_pointwise.binary
            return [linear_add(r[k], g_t[k], self.w[k], None, "add") for k in range(self.K)], None
        return torch.bmm(r, self.w_t, out=gbuf).unbind(0), g_t  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K

    def backward(self, dg: Tensor, dr: Tensor) -> Tensor:
        """dr = dg @ W_hh: the gradient of one step's recurrent input. dg: K x B x 4H/K, dr: K x B x H/K."""
        if self.onednn:  # K x (B x H/K) -> K x B x H/K
            return torch.stack(self.grad_parts(dg, dr), out=dr)
        return torch.bmm(dg, self.w_grad, out=dr)  # K x B x 4H/K @ K x 4H/K x H/K -> K x B x H/K

    def grad_parts(self, dg: Tensor, dr: Tensor) -> List[Tensor]:
        """``backward`` unstacked, for the C kernel: K tensors B x H/K (views of dr on the bmm path)."""
        if self.onednn:  # K x (B x 4H/K @ 4H/K x H/K)
            return [onednn_mm(dg[k], self.w_grad[k]) for k in range(self.K)]
        return torch.bmm(dg, self.w_grad, out=dr).unbind(0)  # K x B x 4H/K @ K x 4H/K x H/K -> K x (B x H/K)
