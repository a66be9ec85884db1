"""Inverted dropout with a cheaper CPU mask than ``F.dropout``'s.

On CPU, ``F.dropout`` draws one Bernoulli sample per element from torch's (serial) Mersenne Twister, a
noticeable share of a translation model's training step (docs/speed.md). ``dropout`` draws 64 random bits per
four elements instead (one full-range int64 draw) and keeps element i when its 16 bits, read as a signed
integer, are at least ``round(p * 65536) - 32768``. The drop probability is thus p rounded to a multiple of
1/65536 (an error below 8e-6). The draws come from torch's default generator, so ``torch.manual_seed`` makes
them reproducible (they are not the masks ``F.dropout`` would draw). Elsewhere (CUDA, whose ``F.dropout``
draws in parallel; integer tensors) it is ``F.dropout``. ``dropout_mask`` makes a mask alone (0 or 1/(1-p)), for masks shared over time steps.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def keep_mask(shape, p: float, device=None) -> Tensor:
    """A boolean tensor of ``shape``, each element True with probability 1 - p (p a multiple of 1/65536)."""
    n = 1
    for s in shape:
        n *= s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # 64 bits a draw
    threshold = round(p * 65536) - 32768  # P(int16 >= threshold) = 1 - round(p * 65536) / 65536
    return bits.view(torch.int16)[:n].view(shape) >= threshold  # (n+3)//4 x 4 int16 -> shape


def _fast(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.is_floating_point()


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """An inverted-dropout mask of ``like``'s shape, dtype and device: 0 with probability p, else 1/(1-p)."""
    if not _fast(like):
        return torch.empty_like(like).bernoulli_(1 - p) / (1 - p)
    return keep_mask(like.shape, p).to(like.dtype).mul_(1 / (1 - p))


class _Dropout(torch.autograd.Function):
    """y = x * mask / (1 - p); dy/dx the same mask (kept as booleans, a quarter of a float mask's memory)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask = keep_mask(x.shape, p)
        ctx.save_for_backward(mask)
        ctx.scale = 1 / (1 - p)
        return x.mul(mask).mul_(ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (mask,) = ctx.saved_tensors
        return dy.mul(mask).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the cheaper CPU mask (module docstring)."""
    if not training or p == 0:
        return x
    if p >= 1 or not _fast(x):
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)
