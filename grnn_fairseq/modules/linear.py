"""Linear layers whose float32 CPU products run on oneDNN instead of aten's BLAS.

On this project's AMD EPYC CPUs aten's float32 ``mm`` (MKL) reaches about half the speed of oneDNN's linear
for the shapes of these models (measured, one thread: a 170 x 1024 -> 2048 product at 30 against 62 GFLOP/s,
the 2550 x 256 -> 4144 output layer at 18 against 28 forward and 26 against 49 for its input gradient).
``linear`` is ``F.linear`` with the forward product and the input gradient on oneDNN for float32 CPU tensors
(the weight gradient stays one ``mm``); everywhere else (float64, CUDA, no oneDNN, ``GRNN_MKLDNN=0``) it *is*
``F.linear``. ``Linear`` is ``nn.Linear`` using it, with the same parameters and state dict.
"""

import os
from typing import Optional

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


def onednn_mm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T + bias`` by oneDNN, no autograd. x: N x In (rows may be strided), weight: Out x In."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on oneDNN: forward ``y = x W^T + b`` and backward ``dx = dy W`` as oneDNN linears."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        In, Out = x.size(-1), weight.size(0)
        x2 = x.reshape(-1, In)  # ... x In -> N x In
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return onednn_mm(x2, weight, bias).view(*x.shape[:-1], Out)  # N x Out -> ... x Out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.size(0))  # ... x Out -> N x Out
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = onednn_mm(dy2, weight.t().contiguous()).view(ctx.x_shape)  # N x Out @ Out x In -> ... x In
        if ctx.needs_input_grad[1]:
            dw = dy2.t().mm(x2)  # Out x N @ N x In -> Out x In
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for float32 CPU tensors. x: ... x In, weight: Out x In."""
    if use_mkldnn(x) and weight.dtype == torch.float32 and x.numel() > 0:
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose float32 CPU products run on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def grouped_linear(xg: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Every group's own linear map, batched: ``out[k] = xg[k] @ weight[k]^T + bias[k]``.

    xg: K x N x In/K (rows may be strided), weight: K x Out/K x In/K, bias: K x Out/K or None.
    Returns K x N x Out/K. One oneDNN linear per group on float32 CPU tensors, else one (b)addbmm.
    """
    if use_mkldnn(xg) and weight.dtype == torch.float32 and xg.numel() > 0:
        outs = [linear(xg[k], weight[k], None if bias is None else bias[k]) for k in range(xg.size(0))]
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)  # K x (N x Out/K) -> K x N x Out/K
    if bias is None:
        return torch.bmm(xg, weight.transpose(1, 2))  # K x N x In/K @ K x In/K x Out/K -> K x N x Out/K
    return torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))
