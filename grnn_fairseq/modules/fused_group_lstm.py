"""A fused group LSTM layer: one ``torch.autograd.Function`` per layer and direction, backward through time by hand.

Same function as ``group_lstm_direction_autograd`` in ``group_lstm.py`` (Gao et al., NAACL 2018, equations 4
and 5 with the channel shuffle of section 2.2 between time steps), organised for speed:

* The input projections of all time steps are one product per group (``products.input_projections``); the
  time loop holds only what is sequential, one ``forward_step`` / ``backward_step`` of a step backend per step
  (``steps.py``: the C kernel, PyTorch operations, or Triton), which also writes, while a step's gates are in
  cache, the gate derivatives the backward pass needs (nothing is recomputed there).
* The channel shuffle costs nothing: step t writes h_t straight into its slot of the recurrent-input buffer
  ``R`` (``K x (T+1) x B x H/K``, group-major in shuffled order), so the next step's product reads shuffle(h_t)
  contiguously.
* The weight gradients, the input gradient and the bias gradients are one product / sum each over all ``T*B``
  rows after the backward loop.
* Large CPU buffers come from ``_WORKSPACE``, a pool reused across calls; what forward saves returns to it when
  the autograd node dies.
* Padding (right-padded ``lengths``, as ``step_mask`` makes) runs the recurrence over every step; the steps past
  a sequence's end are discarded: their outputs are zeroed, h_n and c_n are read at step ``len - 1``, and in the
  backward pass their gradients are exactly zero, so they do not leak into the real steps.

Supported: any K, shuffle_time on or off (on needs ``(H/K) % K == 0`` for the strided shuffle view), bias or not,
a prefix padding mask, a recurrent dropout mask, float32/float64, CPU and CUDA; float16/bfloat16 on the Triton
step (their products in the input dtype, the cell state and the saved gate derivatives in float32), and on the
other steps, and autocast, through the dispatch in ``group_lstm.py``. Not supported (the dispatch uses the
autograd path instead): other masks, shuffle sizes with ``(H/K) % K != 0``, and double backward.
"""

import math
import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend, products
from .functional import gate_scale, prefix_mask
from .steps import StepBuffers, _h_split, _h_view, make_step, step_kind

HALF = (torch.float16, torch.bfloat16)


def fused_supported(
    x: Tensor, w_hh: Tensor, shuffle_time: bool, mask: Optional[Tensor], lengths: Optional[Tensor] = None
) -> Tuple[bool, Optional[Tensor]]:
    """Whether the fused path computes this call; also returns the lengths (B, long) that ``mask`` encodes.

    mask: T x B x 1 boolean (True inside the sequence) or None. Only prefix masks (what ``step_mask`` makes
    from right-padded lengths) are supported; float16 and bfloat16 only on the Triton step. lengths: the
    lengths mask was made from, when the caller knows them (returned as they are), else None: they are
    recovered from mask and checked against it, which on a GPU waits for every queued kernel.
    """
    K, G4, Hk = w_hh.size()
    if not x.dtype.is_floating_point or (x.dtype in HALF and step_kind(x) != "triton"):
        return False, None
    if torch.is_autocast_enabled(x.device.type):
        return False, None
    if shuffle_time and K > 1 and Hk % K != 0:
        return False, None
    if mask is None:
        return True, None
    if lengths is not None:
        return True, lengths
    T = x.size(0)
    m = mask.reshape(T, -1)  # T x B
    lengths = m.sum(0)  # B
    if not torch.equal(prefix_mask(lengths, T), m.bool()):
        return False, None
    return True, lengths


class _Workspace:
    """Reuses the large CPU buffers of the fused path (gate derivatives, states, recurrent inputs) across calls.

    A fresh buffer of tens of MB costs a page fault per 4 kB on first touch (glibc maps large allocations anew
    each time), which on CPU costs about as much as the pointwise gate math itself. Buffers are carved from
    1-D slabs; a slab goes back to the pool when what it holds is dead: at the end of the call for scratch
    buffers, and when the autograd graph node is freed for what forward saves for backward. On CUDA the
    caching allocator does this already, so the pool is CPU only.
    """

    def __init__(self, max_slabs: int = 16, max_bytes: int = 512 * 2**20):
        self.max_slabs = max_slabs
        self.max_bytes = max_bytes  # a translation batch's slabs run to ~100 MB each
        self.free: List[Tensor] = []
        self.lock = threading.Lock()

    def take(self, shapes: List[Tuple[int, ...]], like: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """One slab holding contiguous tensors of the given shapes; returns (slab, tensors)."""
        sizes = [math.prod(sh) for sh in shapes]
        need = sum(sizes)
        slab = None
        if like.device.type == "cpu":
            with self.lock:
                fits = [j for j, t in enumerate(self.free) if t.dtype == like.dtype and t.numel() >= need]
                if fits:
                    slab = self.free.pop(min(fits, key=lambda j: self.free[j].numel()))
        if slab is None:
            slab = like.new_empty(need + need // 8 if like.device.type == "cpu" else need)  # room for longer batches
        views, start = [], 0
        for sh, n in zip(shapes, sizes):
            views.append(slab[start : start + n].view(sh))
            start += n
        return slab, views

    def give(self, slab: Tensor) -> None:
        if slab.device.type != "cpu":
            return
        with self.lock:
            self.free.append(slab)
            # over either cap: drop the smallest slabs first (the large ones cost the most page faults anew)
            while len(self.free) > self.max_slabs or (
                len(self.free) > 1 and sum(t.numel() * t.element_size() for t in self.free) > self.max_bytes
            ):
                self.free.pop(min(range(len(self.free)), key=lambda j: self.free[j].numel()))

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


_WORKSPACE = _Workspace()


def _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, shuffle, lengths, rmask, save):
    """The forward recurrence. Returns (output, h_n, c_n) and, with ``save``, the buffers backward needs and the
    step backend that ran (the backward pass runs the same one)."""
    T, B, I = x.size()
    K, G4, Ik = w_ih.size()
    Hk = G4 // 4
    H = Hk * K
    assert Ik * K == I, f"input size {I} does not match weight_ih {tuple(w_ih.shape)}"
    shuffle = shuffle and K > 1
    scale = gate_scale(x, G4)
    bias = None if b_ih is None else (b_ih + b_hh) * scale  # K x 4H/K

    kind, loops = step_kind(x), backend.cuda_loops()
    if x.dtype in HALF and kind != "triton":
        raise ValueError(f"the fused path runs {x.dtype} on the Triton step only, not on {kind!r}")
    # the saved slabs (returned to the pool when the graph node dies): R, Q, QC, F; the scratch slabs (returned at
    # the end of the call): C, the input projections G and their input's contiguous copy Xc. The cell state and
    # the gate derivatives are float32 for float16/bfloat16 inputs (Triton), else in the input's dtype.
    state = x.new_empty(0, dtype=torch.float32 if x.dtype in HALF else x.dtype)
    r_shape, per_step = (K, T + 1, B, Hk), [(K, T, B, G4), (K, T, B, Hk), (K, T, B, Hk)]
    scratch = [(K, T + 1, B, Hk), (K, T * B, G4), (K, T * B, Ik)]
    Q = QC = F = None
    if state.dtype == x.dtype and save:
        slab, (R, Q, QC, F) = _WORKSPACE.take([r_shape] + per_step, x)
        scratch_slab, (C, G, Xc) = _WORKSPACE.take(scratch, x)
        saved_slabs, scratch_slabs = [slab], [scratch_slab]
    elif state.dtype == x.dtype:
        scratch_slab, (R, C, G, Xc) = _WORKSPACE.take([r_shape] + scratch, x)
        saved_slabs, scratch_slabs = [], [scratch_slab]
    else:  # float16/bfloat16: R, G and Xc in the input's dtype, C, Q, QC and F in float32
        r_slab, (R,) = _WORKSPACE.take([r_shape], x)
        input_slab, (G, Xc) = _WORKSPACE.take(scratch[1:], x)
        c_slab, (C,) = _WORKSPACE.take(scratch[:1], state)
        saved_slabs, scratch_slabs = [r_slab], [input_slab, c_slab]
        if save:
            q_slab, (Q, QC, F) = _WORKSPACE.take(per_step, state)
            saved_slabs.append(q_slab)
    if not save:
        scratch_slabs += saved_slabs
        saved_slabs = []
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    # the gate-scaled weights: once per reuse_packed_weights scope (an incremental decoder's steps), else per call
    w_ih_s = products.derived_weight(w_ih, "gate-scaled", lambda: w_ih * scale.view(1, G4, 1))  # K x 4H/K x I/K
    w_hh_s = products.derived_weight(w_hh, "gate-scaled", lambda: w_hh * scale.view(1, G4, 1))  # K x 4H/K x H/K
    Gs = products.input_projections(xg, w_ih_s, bias, G, Xc)  # K x (T*B x 4H/K)
    _h_view(R, K, shuffle)[:, 0].copy_(_h_split(h0.view(B, K, Hk).transpose(0, 1), K, shuffle))  # B x H -> r order
    C[:, 0].copy_(c0.view(B, K, Hk).transpose(0, 1))  # B x H -> K x B x H/K
    rm = None
    if rmask is not None:
        rm = x.new_empty(K, B, Hk)  # the dropout mask of h_{t-1} in r order
        _h_view(rm.unsqueeze(1), K, shuffle).squeeze(1).copy_(_h_split(rmask.view(B, K, Hk).transpose(0, 1), K, shuffle))
    out = x.new_empty(T, B, H)  # a copy, never a view of R (saved for backward)
    buf = StepBuffers(x=x, K=K, T=T, B=B, Hk=Hk, shuffle=shuffle, R=R, Q=Q, QC=QC, F=F, rm=rm,
                      w_hh=w_hh_s, G=[g.view(T, B, G4) for g in Gs], C=C, out=out)  # fmt: skip
    step = make_step(buf, forward=True, kind=kind, loops=loops)
    step.forward_loop()
    if lengths is None:
        h_n = out[T - 1].clone()
        c_n = x.new_empty(B, H)  # a copy, never a view of C
        c_n.view(B, K, Hk).copy_(C[:, T].transpose(0, 1))  # K x B x H/K -> B x H
    else:
        ar = torch.arange(B, device=x.device)
        last = (lengths - 1).clamp(min=0)  # B
        empty = (lengths == 0).unsqueeze(1)  # B x 1
        h_n = torch.where(empty, h0, out[last, ar])  # B x H
        c_n = C[:, lengths, ar].transpose(0, 1).reshape(B, H).to(x.dtype)  # K x B x H/K -> B x H
        out.mul_(prefix_mask(lengths, T).unsqueeze(-1))  # padded steps output zeros
    del buf, step, Gs
    for slab in scratch_slabs:
        _WORKSPACE.give(slab)
    return out, h_n, c_n, ((saved_slabs, Q, QC, F, R, rm, (kind, loops)) if save else None)


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
        # an output the loss does not use (an encoder's h_n and c_n) gets None, not a zero tensor that the
        # backward loop would add in at every step where sequences end
        ctx.set_materialize_grads(False)
        out, h_n, c_n, saved = _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, shuffle, lengths, rmask, save=True)
        slabs, Q, QC, F, R, rm, ctx.step = saved  # the backward pass runs the forward's step backend
        for slab in slabs:
            weakref.finalize(ctx, _WORKSPACE.give, slab)  # the saved buffers are reused once the graph node dies
        ctx.save_for_backward(x, w_ih, w_hh, Q, QC, F, R, rm, lengths)
        ctx.shuffle = shuffle and w_ih.size(0) > 1
        ctx.has_bias = b_ih is not None
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, Q, QC, F, R, rm, lengths = ctx.saved_tensors
        shuffle = ctx.shuffle
        T, B, I = x.size()
        K, G4, Ik = w_ih.size()
        Hk = G4 // 4
        H = Hk * K
        if d_out is not None:
            if lengths is not None:
                d_out = d_out * prefix_mask(lengths, T).unsqueeze(-1)  # padded steps have no gradient
            d_out = d_out.contiguous()  # T x B x H
        dhn = None if d_hn is None else d_hn.view(B, K, Hk).transpose(0, 1)  # B x H -> K x B x H/K
        dcn = None if d_cn is None else d_cn.view(B, K, Hk).transpose(0, 1)
        # the backward loop: DG[:, t] = d(pre-activation gates) of step t
        scratch_slab, (DG,) = _WORKSPACE.take([tuple(Q.shape)], x)
        buf = StepBuffers(x=x, K=K, T=T, B=B, Hk=Hk, shuffle=shuffle, R=R, Q=Q, QC=QC, F=F, rm=rm, w_hh_grad=w_hh,
                          d_out=d_out, DG=DG)  # fmt: skip
        kind, loops = ctx.step
        step = make_step(buf, forward=False, kind=kind, loops=loops)
        step.backward_loop(lengths, dhn, dcn)  # each row takes its dh_n and dc_n at its last step
        dr, dc = step.finish_backward(), step.dc
        dh0 = x.new_zeros(K, B, Hk)
        if dr is not None:
            dh0.view(step.h_shape).copy_(_h_view(dr.unsqueeze(1), K, shuffle).squeeze(1))  # unshuffle into h order
        if (dhn is not None or dcn is not None) and (lengths is not None or T == 0):
            # rows without a step (length 0): the final state is the initial state
            empty = (lengths == 0) if lengths is not None else torch.ones(B, dtype=torch.bool, device=x.device)
            if dhn is not None:
                dh0.add_(dhn * empty.view(1, B, 1))
            if dcn is not None:
                dc.add_(dcn * empty.view(1, B, 1))

        need = ctx.needs_input_grad
        DG = DG.view(K, T * B, G4)  # K x T x B x 4H/K -> K x (T*B) x 4H/K
        dx = dw_ih = dw_hh = db = None
        if need[0]:
            dx = x.new_empty(T, B, I)
            parts = products.input_projections(DG, products.transposed(w_ih), None,
                                               dx.view(T * B, K, Ik).transpose(0, 1))  # K x (T*B) x I/K, into dx
            if parts[0].data_ptr() != dx.data_ptr():  # oneDNN's products are new tensors
                dx.view(T * B, K, Ik).transpose(0, 1).copy_(torch.stack(parts))
        if need[3]:
            xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
            dw_ih = products.grouped_weight_grad(DG, xg)  # K x 4H/K x I/K
        if need[4]:
            Rin = R[:, :T]
            if rm is not None:
                Rin = Rin * rm.unsqueeze(1)
            dw_hh = products.grouped_weight_grad(DG, Rin.reshape(K, T * B, Hk))  # K x 4H/K x H/K
        if ctx.has_bias and (need[5] or need[6]):
            db = DG.sum(1)  # K x 4H/K
        dh0 = dh0.transpose(0, 1).reshape(B, H) if need[1] else None  # K x B x H/K -> B x H
        dc0 = dc.transpose(0, 1).reshape(B, H).to(x.dtype) if need[2] else None  # K x B x H/K -> B x H (a copy)
        del DG, buf, step
        _WORKSPACE.give(scratch_slab)
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
    aten_at_one_group: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``group_lstm_direction`` on the fused path; the padding is given as lengths (B) rather than a mask.

    Shapes as ``group_lstm_direction``. Without any input that requires grad, no buffers are saved.
    aten_at_one_group: K = 1 without padding or recurrent dropout runs aten's LSTM kernel, except on CPU inside a
    ``reuse_packed_weights`` scope (an incremental decoder's steps, T = 1: aten's kernel would repack its weights
    at every call, the fused path's products reuse the scope's); False keeps it on the step backend
    (``grnn_fairseq.benchmark`` times the Triton kernel at K = 1 so).
    """
    tensors = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    one_group = w_ih.size(0) == 1 and lengths is None and recurrent_mask is None
    if aten_at_one_group and one_group and not (x.device.type == "cpu" and products.reusing_packed_weights()):
        # K = 1 is nn.LSTM (same weight layout, no shuffle): aten's LSTM kernel (oneDNN on CPU, cuDNN on
        # CUDA) beats a Python time loop there, whose per-step sgemm runs far below peak.
        # 1 x 4H x C -> 4H x C, ...: squeeze, whose gradient is a view (indexing's would fill a zero copy)
        params = [w.squeeze(0) for w in (w_ih, w_hh, b_ih, b_hh) if w is not None]
        train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        out, h_n, c_n = torch._VF.lstm(x, (h.unsqueeze(0), c.unsqueeze(0)), params, b_ih is not None, 1, 0.0, train,
                                       False, False)  # fmt: skip
        return out, h_n[0], c_n[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedGroupLSTMFunction.apply(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask)
    out, h_n, c_n, _ = _forward(x, h, c, w_ih, w_hh, b_ih, b_hh, shuffle_time, lengths, recurrent_mask, save=False)
    return out, h_n, c_n
