"""A fused group LSTM layer: one ``torch.autograd.Function`` per layer and direction, backward through time by hand.

Same function as ``group_lstm_direction_autograd`` in ``group_lstm.py`` (Gao et al., NAACL 2018, equations 4
and 5 with the channel shuffle of section 2.2 between time steps), organised for speed:

* The input projections of all time steps are one bmm over the K groups, written into a gate buffer
  ``K x T x B x 4H/K`` that the time loop then fills, step by step, with the activated gates (saved for
  the backward pass, nothing else is recomputed).
* The channel shuffle costs nothing: step t writes h_t straight into the slot of the recurrent-input buffer
  ``R`` (``K x (T+1) x B x H/K``, group-major in shuffled order) through a strided view, so the next step's
  bmm reads shuffle(h_t) contiguously. The layer output is one strided copy of ``R`` after the loop.
* The backward loop holds only what is sequential: per step a handful of pointwise ops on precomputed gate
  derivatives and one bmm for the recurrent gradient. The weight gradients, the input gradient and the bias
  gradients are one bmm / sum each over all ``T*B`` rows after the loop.
* Padding (right-padded ``lengths``, as ``step_mask`` makes) runs the recurrence over every step; the steps
  past a sequence's end are discarded: their outputs are zeroed, h_n and c_n are read at step ``len - 1``,
  and in the backward pass their gradients are exactly zero, so they do not leak into the real steps.

Supported: any K, shuffle_time on or off (on needs ``(H/K) % K == 0`` for the strided shuffle view), bias or
not, a prefix padding mask, a recurrent dropout mask, float32/float64, CPU and CUDA. Not supported (the
dispatch in ``group_lstm.py`` uses the autograd path instead): other masks, shuffle sizes with
``(H/K) % K != 0``, autocast, and double backward.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def fused_supported(
    x: Tensor, w_hh: Tensor, shuffle_time: bool, mask: Optional[Tensor]
) -> Tuple[bool, Optional[Tensor]]:
    """Whether the fused path computes this call; also returns the lengths (B, long) that ``mask`` encodes.

    mask: T x B x 1 boolean (True inside the sequence) or None. Only prefix masks (what ``step_mask`` makes
    from right-padded lengths) are supported.
    """
    K, G4, Hk = w_hh.size()
    if not x.dtype.is_floating_point or x.dtype in (torch.float16, torch.bfloat16):
        return False, None
    if torch.is_autocast_enabled(x.device.type):
        return False, None
    if shuffle_time and K > 1 and Hk % K != 0:
        return False, None
    if mask is None:
        return True, None
    T = x.size(0)
    m = mask.reshape(T, -1)  # T x B
    lengths = m.sum(0)  # B
    prefix = torch.arange(T, device=m.device).unsqueeze(1) < lengths.unsqueeze(0)  # T x B
    if not torch.equal(prefix, m.bool()):
        return False, None
    return True, lengths


def _h_view(X: Tensor, K: int, shuffle: bool) -> Tensor:
    """A view of X (``K x ... x H/K``, r order: group k' holds chunk k' of shuffle(h)) indexed in h order.

    Returns ``K x ... x K' x H/K/K'`` where ``[k, ..., u1, u2]`` is unit ``u1 * H/K/K' + u2`` of group k of h
    (K' = K with the shuffle, 1 without). With the shuffle, h unit ``(k, u1, u2)`` sits in r at group u1,
    unit ``u2 * K + k`` (channel_shuffle: r[a*K + b] = h[b*H/K + a]).
    """
    Hk = X.size(-1)
    if not shuffle:
        return X.unsqueeze(-2)  # K x ... x 1 x H/K
    mid = X.shape[1:-1]
    Xv = X.view(K, *mid, Hk // K, K)  # (u1, ..., u2, k)
    n = X.dim() + 1
    return Xv.permute(n - 1, *range(1, n - 2), 0, n - 2)  # (k, ..., u1, u2)


def _h_split(X: Tensor, K: int, shuffle: bool) -> Tensor:
    """``K x ... x H/K -> K x ... x K' x H/K/K'``, the plain split matching ``_h_view``."""
    Hk = X.size(-1)
    if not shuffle:
        return X.unsqueeze(-2)
    return X.view(*X.shape[:-1], K, Hk // K)


def _tanh(src: Tensor, out: Tensor) -> Tensor:
    """tanh into ``out``. On CPU as 2 sigmoid(2x) - 1: aten's CPU tanh is about 5x slower than its sigmoid."""
    if src.device.type != "cpu":
        return torch.tanh(src, out=out)
    torch.mul(src, 2, out=out).sigmoid_()
    return out.mul_(2).sub_(1)


def _forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    shuffle: bool,
    lengths: Optional[Tensor],
    rmask: Optional[Tensor],
    save: bool,
):
    """The forward recurrence. Returns (output, h_n, c_n) and, with ``save``, the buffers backward needs."""
    T, B, I = x.size()
    K, G4, Ik = w_ih.size()
    Hk = G4 // 4
    H = Hk * K
    assert Ik * K == I, f"input size {I} does not match weight_ih {tuple(w_ih.shape)}"
    shuffle = shuffle and K > 1
    # input projections of all time steps in one batched multiply; the biases are added step by step
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    G = torch.bmm(xg, w_ih.transpose(1, 2)).view(K, T, B, G4)  # K x (T*B) x 4H/K -> K x T x B x 4H/K
    # The g gate is computed as tanh(z) = 2 sigmoid(2z) - 1, so that one sigmoid covers all four gates:
    # its pre-activation is doubled (its columns of w_hh, its input projection and its bias).
    scale = x.new_ones(1, 1, 4, Hk)
    scale[..., 2, :] = 2
    scale = scale.view(1, 1, G4)  # 1 x 1 x 4H/K
    w_hh_t = (w_hh.transpose(1, 2) * scale).contiguous()  # K x H/K x 4H/K, g columns doubled
    bias = None if b_ih is None else ((b_ih + b_hh).unsqueeze(1) * scale)  # K x 1 x 4H/K

    # R[:, t] is the recurrent input of step t, shuffle(h_{t-1}), group-major: K x (T+1) x B x H/K
    R = x.new_empty(K, T + 1, B, Hk)
    Rh = _h_view(R, K, shuffle)  # K x (T+1) x B x K' x H/K/K', indexed in h order
    Rh[:, 0].copy_(_h_split(h0.view(B, K, Hk).transpose(0, 1), K, shuffle))  # B x H -> K x B x H/K
    C = x.new_empty(K, T + 1, B, Hk)  # C[:, t + 1] = c_t, C[:, 0] = c_0
    C[:, 0].copy_(c0.view(B, K, Hk).transpose(0, 1))  # B x H -> K x B x H/K
    TC = x.new_empty(K, T, B, Hk) if save else x.new_empty(K, B, Hk)  # tanh(c_t)
    rm = None
    if rmask is not None:
        rm = x.new_empty(K, B, Hk)  # the dropout mask of h_{t-1} in r order
        _h_view(rm.unsqueeze(1), K, shuffle).squeeze(1).copy_(_h_split(rmask.view(B, K, Hk).transpose(0, 1), K, shuffle))
        rin = x.new_empty(K, B, Hk)
    gbuf = x.new_empty(K, B, G4)
    s = (K, B, K, Hk // K) if shuffle else (K, B, 1, Hk)
    for t in range(T):
        r = R[:, t]  # K x B x H/K
        if rm is not None:
            r = torch.mul(r, rm, out=rin)
        if bias is not None:
            torch.addcmul(bias, G[:, t], scale, out=gbuf)  # K x B x 4H/K
        else:
            torch.mul(G[:, t], scale, out=gbuf)
        gbuf.baddbmm_(r, w_hh_t)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K
        act = G[:, t] if save else gbuf  # the saved activations overwrite the input projection
        torch.sigmoid(gbuf, out=act)
        i, f, g, o = act.chunk(4, dim=-1)  # each K x B x H/K
        g.mul_(2).sub_(1)  # tanh
        c = torch.mul(f, C[:, t], out=C[:, t + 1])
        c.addcmul_(i, g)  # c_t = f * c_{t-1} + i * g
        tc = _tanh(c, TC[:, t] if save else TC)
        torch.mul(o.reshape(s), tc.view(s), out=Rh[:, t + 1])  # h_t = o * tanh(c_t), into the shuffled slot

    # outputs in plain order: K x T x B x K' x H/K/K' -> T x B x K x K' x H/K/K' -> T x B x H
    out = x.new_empty(T, B, H)  # a copy, never a view of R (saved for backward)
    out.view(T, B, K, *s[2:]).copy_(Rh[:, 1:].permute(1, 2, 0, 3, 4))
    if lengths is None:
        h_n = out[T - 1].clone()
        c_n = x.new_empty(B, H)  # a copy, never a view of C
        c_n.view(B, K, Hk).copy_(C[:, T].transpose(0, 1))  # K x B x H/K -> B x H
    else:
        ar = torch.arange(B, device=x.device)
        last = (lengths - 1).clamp(min=0)  # B
        empty = (lengths == 0).unsqueeze(1)  # B x 1
        h_n = torch.where(empty, h0, out[last, ar])  # B x H
        c_n = C[:, lengths, ar].transpose(0, 1).reshape(B, H)  # K x B x H/K -> B x H
        out.mul_(_prefix_mask(lengths, T).unsqueeze(-1))  # padded steps output zeros
    saved = (G, R, C, TC, rm) if save else None
    return out, h_n, c_n, saved


def _prefix_mask(lengths: Tensor, T: int) -> Tensor:
    """T x B mask, True where t < lengths[b]."""
    return torch.arange(T, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


class FusedGroupLSTMFunction(torch.autograd.Function):
    """One group LSTM layer in one direction over a whole sequence, with a hand-written backward through time.

    Inputs: x T x B x I, h0 and c0 B x H, w_ih K x 4H/K x I/K, w_hh K x 4H/K x H/K, b_ih and b_hh K x 4H/K
    or None, shuffle (bool), lengths B (long) or None, rmask B x H or None (not differentiated).
    Outputs: output T x B x H, h_n B x H, c_n B x H.

    The backward pass leaves the saved buffers intact, so ``retain_graph=True`` and gradcheck work; it is
    not itself differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, shuffle, lengths, rmask):
        out, h_n, c_n, saved = _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, shuffle, lengths, rmask, save=True)
        G, R, C, TC, rm = saved
        ctx.save_for_backward(x, w_ih, w_hh, G, R, C, TC, rm, lengths)
        ctx.shuffle = shuffle and w_ih.size(0) > 1
        ctx.has_bias = b_ih is not None
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, G, R, C, TC, rm, lengths = ctx.saved_tensors
        shuffle = ctx.shuffle
        T, B, I = x.size()
        K, G4, Ik = w_ih.size()
        Hk = G4 // 4
        H = Hk * K
        s = (K, B, K, Hk // K) if shuffle else (K, B, 1, Hk)

        # Gate derivatives of all steps at once, into Q (K x T x B x 4H/K) and qc (K x T x B x H/K):
        # d(pre-activation of gate q) = dc * Q_q for i, f, g and dh * Q_o for o; dc += dh * qc.
        i, f, g, o = G.chunk(4, dim=-1)  # each K x T x B x H/K
        Q = torch.empty_like(G)
        qi, qf, qg, qo = Q.chunk(4, dim=-1)
        torch.addcmul(o, o, o, value=-1, out=qo).mul_(TC)  # tanh(c) o (1 - o)
        qc = torch.mul(TC, TC)
        torch.addcmul(o, o, qc, value=-1, out=qc)  # o (1 - tanh^2 c)
        torch.addcmul(i, i, i, value=-1, out=qi).mul_(g)  # g i (1 - i)
        torch.mul(g, g, out=qg)
        torch.addcmul(i, i, qg, value=-1, out=qg)  # i (1 - g^2)
        torch.addcmul(f, f, f, value=-1, out=qf).mul_(C[:, :T])  # c_{t-1} f (1 - f)

        # dh of every step from the outputs, group-major: T x B x H -> K x T x B x H/K
        DH = x.new_empty(K, T, B, Hk)
        if d_out is None:
            DH.zero_()
        else:
            dy = d_out.view(T, B, K, Hk).permute(2, 0, 1, 3)
            if lengths is not None:
                torch.mul(dy, _prefix_mask(lengths, T).unsqueeze(-1), out=DH)
            else:
                DH.copy_(dy)
        dc = x.new_zeros(K, B, Hk)
        dc_prev = x.new_empty(K, B, Hk)
        dhn = None if d_hn is None else d_hn.view(B, K, Hk).transpose(0, 1)  # B x H -> K x B x H/K
        dcn = None if d_cn is None else d_cn.view(B, K, Hk).transpose(0, 1)
        ends: List[Optional[Tensor]] = [None] * (T + 1)  # ends[t + 1]: the sequences whose last step is t
        if lengths is None:
            if dhn is not None:
                DH[:, T - 1] += dhn
            if dcn is not None:
                dc.copy_(dcn)
        else:
            by_length: List[List[int]] = [[] for _ in range(T + 1)]
            for b, n in enumerate(lengths.tolist()):
                by_length[n].append(b)
            ends = [torch.tensor(e, device=x.device) if e else None for e in by_length]
            if dhn is not None:
                ar = torch.arange(B, device=x.device)
                real = lengths > 0
                DH[:, lengths[real] - 1, ar[real]] += dhn[:, real]

        # the backward loop: Q[:, t] becomes d(pre-activation gates) of step t, in place
        dr = x.new_empty(K, B, Hk)
        dh0 = x.new_empty(K, B, Hk)
        for t in range(T - 1, -1, -1):
            dh = DH[:, t]  # K x B x H/K
            dg = Q[:, t]  # K x B x 4H/K
            dg[..., 3 * Hk :].mul_(dh)  # o
            dc.addcmul_(dh, qc[:, t])
            if ends[t + 1] is not None and dcn is not None:
                e = ends[t + 1]
                dc.index_add_(1, e, dcn.index_select(1, e))
            dg[..., : 3 * Hk].view(K, B, 3, Hk).mul_(dc.unsqueeze(2))  # i, f and g
            torch.mul(dc, f[:, t], out=dc_prev)  # dc_{t-1} = dc_t * f
            dc, dc_prev = dc_prev, dc
            torch.bmm(dg, w_hh, out=dr)  # K x B x 4H/K @ K x 4H/K x H/K -> K x B x H/K (r order)
            if rm is not None:
                dr.mul_(rm)
            target = DH[:, t - 1] if t > 0 else dh0
            if t == 0:
                target.zero_()
            target.view(s).add_(_h_view(dr.unsqueeze(1), K, shuffle).squeeze(1))  # unshuffle into h order
        if lengths is not None and ends[0] is not None:
            e = ends[0]  # empty sequences: the final state is the initial state
            if dhn is not None:
                dh0.index_add_(1, e, dhn.index_select(1, e))
            if dcn is not None:
                dc.index_add_(1, e, dcn.index_select(1, e))

        need = ctx.needs_input_grad
        DG = Q.view(K, T * B, G4)  # K x T x B x 4H/K -> K x (T*B) x 4H/K
        dx = dw_ih = dw_hh = db = None
        if need[0]:
            dx = x.new_empty(T, B, I)
            torch.bmm(DG, w_ih, out=dx.view(T * B, K, Ik).transpose(0, 1))  # K x (T*B) x I/K, into T x B x I
        if need[3]:
            xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
            dw_ih = torch.bmm(DG.transpose(1, 2), xg)  # K x 4H/K x I/K
        if need[4]:
            Rin = R[:, :T]
            if rm is not None:
                Rin = Rin * rm.unsqueeze(1)
            dw_hh = torch.bmm(DG.transpose(1, 2), Rin.reshape(K, T * B, Hk))  # K x 4H/K x H/K
        if ctx.has_bias and (need[5] or need[6]):
            db = DG.sum(1)  # K x 4H/K
        dh0 = dh0.transpose(0, 1).reshape(B, H) if need[1] else None  # K x B x H/K -> B x H
        dc0 = dc.transpose(0, 1).reshape(B, H) if need[2] else None
        return (
            dx,
            dh0,
            dc0,
            dw_ih,
            dw_hh,
            db if need[5] else None,
            (db.clone() if need[5] else db) if need[6] else None,  # never the same tensor twice
            None,
            None,
            None,
        )


def fused_group_lstm_direction(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    shuffle_time: bool,
    lengths: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``group_lstm_direction`` on the fused path; the padding is given as lengths (B) rather than a mask.

    Shapes as ``group_lstm_direction``. Without any input that requires grad, no buffers are saved.
    """
    tensors = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    if w_ih.size(0) == 1 and lengths is None and recurrent_mask is None:
        # K = 1 is nn.LSTM (same weight layout, no shuffle): aten's LSTM kernel (oneDNN on CPU, cuDNN on
        # CUDA) beats a Python time loop there, whose per-step 64-row sgemm runs far below peak.
        params = [w_ih[0], w_hh[0]] + ([] if b_ih is None else [b_ih[0], b_hh[0]])
        train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        out, h_n, c_n = torch._VF.lstm(x, (h.unsqueeze(0), c.unsqueeze(0)), params, b_ih is not None, 1, 0.0, train, False, False)
        return out, h_n[0], c_n[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedGroupLSTMFunction.apply(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask)
    out, h_n, c_n, _ = _forward(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask, save=False)
    return out, h_n, c_n
