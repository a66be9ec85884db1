"""The helpers every recurrent stack shares: the channel shuffle, group layouts, padding masks, reversal, and
the checks of sizes against the number of groups."""

from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError


def check_divisible(size: int, groups: int, what: str) -> None:
    """Raise a ValueError that names the size and K when K does not divide it."""
    if groups < 1:
        raise ConfigError(f"groups must be >= 1, got {groups}")
    if size % groups != 0:
        raise ConfigError(
            f"{what} ({size}) is not divisible by groups K={groups}; "
            f"choose a number of groups that divides every layer size"
        )


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """The representation rearrangement of section 2.2 on the last dimension.

    ``... x N -> ... x K x N/K -> ... x N/K x K -> ... x N``.
    """
    N = x.size(-1)
    if groups == 1:
        return x
    return x.view(*x.shape[:-1], groups, N // groups).transpose(-1, -2).reshape(x.shape)


def shuffle_permutation(size: int, groups: int, device=None) -> Tensor:
    """Index ``perm`` with ``channel_shuffle(v, groups) == v[..., perm]``."""
    return channel_shuffle(torch.arange(size, device=device), groups)


def to_group_major(v: Tensor, groups: int) -> Tensor:
    """``B x H -> K x B x H/K``."""
    B, H = v.size()
    return v.view(B, groups, H // groups).transpose(0, 1).contiguous()


def from_group_major(v: Tensor) -> Tensor:
    """``K x B x H/K -> B x H``."""
    K, B, Hk = v.size()
    return v.transpose(0, 1).reshape(B, K * Hk)


def gate_scale(x: Tensor, G4: int) -> Tensor:
    """4H/K factors in x's dtype and device: 2 on the g gate's rows, 1 elsewhere. The fused steps compute the g gate
    as tanh(z) = 2 sigmoid(2z) - 1, so that one sigmoid covers all four gates: its pre-activation is doubled (rows
    of w_ih, w_hh and the bias in the layer, the gates themselves in the cell)."""
    scale = x.new_ones(4, G4 // 4)
    scale[2] = 2
    return scale.view(G4)


def prefix_mask(lengths: Tensor, T: int) -> Tensor:
    """T x B mask, True where t < lengths[b]."""
    return torch.arange(T, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def step_mask(lengths: Optional[Tensor], T: int, device) -> Optional[Tensor]:
    """T x B x 1 boolean mask, True where step t is inside sequence b; None when there is no padding."""
    if lengths is None:
        return None
    return prefix_mask(lengths.to(device), T).unsqueeze(-1)


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of ``x`` (T x B x C) inside its own length; padding stays in place.

    Without lengths this is ``x.flip(0)``. The map is its own inverse.
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.size(0), x.size(1)
    t = torch.arange(T, device=x.device).unsqueeze(1)  # T x 1
    lengths = lengths.to(x.device).unsqueeze(0)  # 1 x B
    index = torch.where(t < lengths, lengths - 1 - t, t)  # T x B
    return x.gather(0, index.unsqueeze(-1).expand_as(x))
