"""tanh as 2 sigmoid(2x) - 1 on CPU, where aten's tanh is several times slower than its sigmoid (docs/speed.md).
The two agree to a few float32 ulps of 1 (the identity is exact; the rounding differs near 0). ``add_tanh``:
tanh(a + b) with the sum written into the output (the additive attention's scores)."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def tanh_into(src: Tensor, out: Tensor) -> Tensor:
    """tanh(src) written into ``out`` without autograd (same shape; ``out`` may be ``src``)."""
    if src.device.type != "cpu":
        return torch.tanh(src, out=out)
    torch.mul(src, 2, out=out).sigmoid_()
    return out.mul_(2).sub_(1)


class _SigmoidTanh(torch.autograd.Function):
    """y = 2 sigmoid(2x) - 1 in four in-place passes; dy/dx = 1 - y^2 from the saved output."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = tanh_into(x, torch.empty_like(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(dy, y)


def tanh(x: Tensor) -> Tensor:
    """``torch.tanh``, computed through the sigmoid on CPU."""
    if x.device.type == "cpu" and x.is_floating_point():
        return _SigmoidTanh.apply(x)
    return torch.tanh(x)


class _AddTanh(torch.autograd.Function):
    """y = tanh(a + b), b broadcast to a's shape: the sum written straight into y, the tensor kept for the
    backward, where ``tanh(a + b)`` allocates, and on CPU page-faults in, a second tensor of a's size."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        y = torch.add(a, b, out=torch.empty_like(a))  # a's shape: b broadcast over it
        tanh_into(y, y)  # in place
        ctx.save_for_backward(y)
        ctx.b_shape = b.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        dx = torch.ops.aten.tanh_backward(dy, y)  # d tanh(a + b) / da, a's shape
        db = dx.sum_to_size(ctx.b_shape) if ctx.needs_input_grad[1] else None  # as autograd reduces an addend
        return dx if ctx.needs_input_grad[0] else None, db


def add_tanh(a: Tensor, b: Tensor) -> Tensor:
    """``tanh(a + b)`` for a floating-point ``a`` at least as large as ``b`` in every dimension (``b``
    broadcast over ``a``), with one tensor of ``a``'s size where the two operations allocate two."""
    if a.shape != torch.broadcast_shapes(a.shape, b.shape) or a.dtype != b.dtype or not a.is_floating_point():
        return tanh(a + b)
    return _AddTanh.apply(a, b)
