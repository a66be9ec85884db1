"""A fused group LSTM layer: one ``torch.autograd.Function`` per layer and direction, backward through time by hand.

Same function as ``group_lstm_direction_autograd`` in ``group_lstm.py`` (Gao et al., NAACL 2018, equations 4
and 5 with the channel shuffle of section 2.2 between time steps), organised for speed:

* The input projections of all time steps are one product per group (one bmm, or oneDNN's linear per group
  where measured faster for the shape on this CPU); the time loop adds one recurrent product per step (``_StepProducts``: one bmm over the groups, or
  where measured faster on this CPU (``_step_mkldnn``) one oneDNN linear per group on weights packed once per call)
  and, while the step's gates are in cache, writes the gate derivatives the backward pass needs (nothing is
  recomputed there).
* On float32 CPU tensors a step's pointwise work (gates, cell, shuffled write of h_t, gate derivatives; in
  backward the gates' gradients) is one pass of the optional C kernel (``_kernel.py``,
  ``grnn_fairseq/csrc/group_lstm_step.c``) instead of a dozen PyTorch operations; without it, or with
  ``GRNN_KERNEL=0``, the same step runs in PyTorch operations (float64, CUDA and tests use that path too).
* Large buffers come from ``_WORKSPACE``, a pool reused across calls; what forward saves returns to it when
  the autograd node dies.
* The channel shuffle costs nothing: step t writes h_t straight into the slot of the recurrent-input buffer
  ``R`` (``K x (T+1) x B x H/K``, group-major in shuffled order) through a strided view (the C kernel writes
  it there directly), so the next step's product reads shuffle(h_t) contiguously. The layer output is one strided copy of ``R`` after the loop.
* The backward loop holds only what is sequential: per step a handful of pointwise ops on precomputed gate
  derivatives and one product for the recurrent gradient (``_StepProducts.backward``). The weight gradients,
  the input gradient and the bias gradients are one bmm / sum each over all ``T*B`` rows after the loop.
* Padding (right-padded ``lengths``, as ``step_mask`` makes) runs the recurrence over every step; the steps
  past a sequence's end are discarded: their outputs are zeroed, h_n and c_n are read at step ``len - 1``,
  and in the backward pass their gradients are exactly zero, so they do not leak into the real steps.

Supported: any K, shuffle_time on or off (on needs ``(H/K) % K == 0`` for the strided shuffle view), bias or
not, a prefix padding mask, a recurrent dropout mask, float32/float64, CPU and CUDA; float16/bfloat16 and
autocast through the dispatch in ``group_lstm.py``, which runs this path in float32 for them. Not supported
(the dispatch uses the autograd path instead): other masks, shuffle sizes with ``(H/K) % K != 0``, and double
backward.
"""

import math
import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _kernel
from .activations import tanh, tanh_into
from .linear import _grouped_linear as _grouped_linear_aten
from .linear import bucket, onednn_faster, onednn_mm, set_mkldnn, use_mkldnn  # noqa: F401  (set_mkldnn: this module's switch too)


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


# oneDNN's linear runs the large per-group products 1.3-1.6x faster than MKL's bmm on this project's CPUs (AMD
# EPYC: MKL takes a slow path there); float32 CPU only, switched with linear.set_mkldnn / GRNN_MKLDNN=0.
_use_mkldnn = use_mkldnn


# The products of the fused path (the per-step recurrent products, the input projections of all steps and
# the weight gradients) run either as one bmm over the groups or as one oneDNN linear per group (per-step:
# on weights packed once per call), whichever measured faster for the shape on this CPU (``onednn_faster`` in
# linear.py, GRNN_PRODUCTS to fix it). On an AMD EPYC (2 threads, B = 64) the packed oneDNN step product was
# 1.2-2.9x faster at H/K >= 128 with K <= 8; on an Intel Xeon (Emerald Rapids, AVX-512) bmm was up to 2x faster
# there from K = 4 on, while oneDNN won the input projections at hidden 1024 and lost them at hidden 256.


def _step_mkldnn(x: Tensor, Hk: int, K: int, B: int) -> bool:
    B = bucket(B)

    def case(gen):
        r = torch.randn(K, B, Hk, generator=gen)  # K x B x H/K
        dg = torch.randn(K, B, 4 * Hk, generator=gen)  # K x B x 4H/K
        w = torch.randn(K, 4 * Hk, Hk, generator=gen)  # K x 4H/K x H/K
        out_g, out_r = torch.empty_like(dg), torch.empty_like(r)
        runs = []
        for mkldnn in (False, True):
            p = _StepProducts(r, w, w, B, mkldnn=mkldnn)
            runs.append(lambda p=p: (p.forward(r, list(dg.unbind(0)), out_g), p.backward(dg, out_r)))
        return runs

    return onednn_faster(x, ("step", K, B, Hk), case, K * B * Hk * 4 * Hk)


class _StepProducts:
    """The per-step products of one call with weights prepared once: forward ``g_t + r @ W_hh^T`` and backward
    ``dg @ W_hh``, either one bmm over the groups or one oneDNN linear per group on weights packed once into
    oneDNN's blocked layout (repacking a weight on every step costs as much as a fifth of the product).

    x: the layer input (decides the kernels). w_hh: K x 4H/K x H/K, the forward weight (g rows doubled for
    the sigmoid trick), or None in the backward pass; w_hh_grad: the unscaled K x 4H/K x H/K weight of the
    backward product, or None in the forward pass. B: the batch (oneDNN's hint for its layout).
    """

    def __init__(self, x: Tensor, w_hh: Optional[Tensor], w_hh_grad: Optional[Tensor], B: int,
                 mkldnn: Optional[bool] = None):
        K, G4, Hk = (w_hh if w_hh is not None else w_hh_grad).size()
        self.K = K
        self.mkldnn = _step_mkldnn(x, Hk, K, B) if mkldnn is None else mkldnn
        self.w = self.w_t = self.w_grad = None
        if self.mkldnn:
            pack = torch.ops.mkldnn._reorder_linear_weight
            if w_hh is not None:
                self.w = [pack(w, B) for w in w_hh.unbind(0)]  # K x (4H/K x H/K), oneDNN layout
            if w_hh_grad is not None:  # dr = dg @ W_hh = linear(dg, W_hh^T): K x (H/K x 4H/K), oneDNN layout
                self.w_grad = [pack(w.t().contiguous(), B) for w in w_hh_grad.unbind(0)]
        else:
            if w_hh is not None:
                self.w_t = w_hh.transpose(1, 2).contiguous()  # K x H/K x 4H/K
            self.w_grad = w_hh_grad  # K x 4H/K x H/K

    def forward(self, r: Tensor, g_t: List[Tensor], gbuf: Tensor) -> Tensor:
        """gbuf = g_t + r @ W_hh^T: the step's pre-activations. r: K x B x H/K, g_t: K tensors B x 4H/K (the
        input projections of the step), gbuf: K x B x 4H/K."""
        if self.mkldnn:  # K x (B x 4H/K) -> K x B x 4H/K
            return torch.stack(self.parts(r, g_t, gbuf)[0], out=gbuf)
        torch.stack(g_t, out=gbuf)  # K x (B x 4H/K) -> K x B x 4H/K
        return gbuf.baddbmm_(r, self.w_t)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K

    def parts(self, r: Tensor, g_t: List[Tensor], gbuf: Tensor) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
        """The pre-activations unstacked, for the C kernel: (z, x) with ``z[k] + x[k] = g_t[k] + r[k] @ W_hh[k]^T``,
        K tensors B x 4H/K each; x is None when z already holds the input projections (oneDNN adds them)."""
        if self.mkldnn:  # K x (B x H/K @ H/K x 4H/K + B x 4H/K)
            linear_add = torch.ops.mkldnn._linear_pointwise.binary
            return [linear_add(r[k], g_t[k], self.w[k], None, "add") for k in range(self.K)], None
        return torch.bmm(r, self.w_t, out=gbuf).unbind(0), g_t  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K

    def backward(self, dg: Tensor, dr: Tensor) -> Tensor:
        """dr = dg @ W_hh: the gradient of one step's recurrent input. dg: K x B x 4H/K, dr: K x B x H/K."""
        if self.mkldnn:  # K x (B x H/K) -> K x B x H/K
            return torch.stack(self.grad_parts(dg, dr), out=dr)
        return torch.bmm(dg, self.w_grad, out=dr)  # K x B x 4H/K @ K x 4H/K x H/K -> K x B x H/K

    def grad_parts(self, dg: Tensor, dr: Tensor) -> List[Tensor]:
        """``backward`` unstacked, for the C kernel: K tensors B x H/K (views of dr on the bmm path)."""
        if self.mkldnn:  # K x (B x 4H/K @ 4H/K x H/K)
            return [onednn_mm(dg[k], self.w_grad[k]) for k in range(self.K)]
        return torch.bmm(dg, self.w_grad, out=dr).unbind(0)  # K x B x 4H/K @ K x 4H/K x H/K -> K x (B x H/K)


def _grouped_linear(xg: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None,
                    xbuf: Optional[Tensor] = None) -> List[Tensor]:
    """Per group k: ``xg[k] @ w[k]^T + b[k]``. xg: K x N x In (rows may be strided), w: K x Out x In,
    b: K x Out or None. Returns K tensors N x Out (a list, never stacked: the copy would cost more than
    oneDNN gains). out (K x N x Out) and xbuf (K x N x In), reused buffers for the bmm variant: a fresh
    output over glibc's 32 MB mmap limit is page-faulted anew on every call (at hidden 1024, K = 4 that
    made the product 1.8x slower), and MKL's bmm reads strided rows 15-25% slower than one contiguous copy."""
    K, N, In = xg.shape
    Out = w.size(1)

    def case(gen):
        n = bucket(N)
        xs, ws = torch.randn(K, n, In, generator=gen), torch.randn(K, Out, In, generator=gen)
        bs = None if b is None else torch.randn(K, Out, generator=gen)
        xs = xs.transpose(0, 1).contiguous().transpose(0, 1) if not xg.is_contiguous() else xs  # strided as xg
        o, xb = torch.empty(K, n, Out), torch.empty(K, n, In)
        return lambda: _grouped_linear_bmm(xs, ws, bs, o, xb), lambda: _grouped_linear_onednn(xs, ws, bs)

    key = ("fused_linear", K, bucket(N), In, Out, b is not None, xg.is_contiguous())  # measured as xg is laid out
    if onednn_faster(xg, key, case, K * N * In * Out):
        return _grouped_linear_onednn(xg, w, b)
    return _grouped_linear_bmm(xg, w, b, out, xbuf)


def _grouped_linear_onednn(xg: Tensor, w: Tensor, b: Optional[Tensor]) -> List[Tensor]:
    return [onednn_mm(xg[k], w[k], None if b is None else b[k]) for k in range(xg.size(0))]


def _grouped_linear_bmm(xg: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None,
                        xbuf: Optional[Tensor] = None) -> List[Tensor]:
    if out is None:
        return list(_grouped_linear_aten(False, xg, w, b).unbind(0))  # K x N x Out -> K x (N x Out)
    if xbuf is not None and not xg.is_contiguous():
        xg = xbuf.copy_(xg)  # K x N x In, contiguous
    if b is None:
        torch.bmm(xg, w.transpose(1, 2), out=out)  # K x N x In @ K x In x Out -> K x N x Out
    else:
        out.copy_(b.unsqueeze(1)).baddbmm_(xg, w.transpose(1, 2))  # K x 1 x Out + K x N x In @ K x In x Out
    return list(out.unbind(0))  # K x N x Out -> K x (N x Out)


def _grouped_weight_grad(dg: Tensor, xg: Tensor) -> Tensor:
    """Per group k: ``dg[k]^T @ xg[k]``, the weight gradient over all rows. dg: K x N x Out, xg: K x N x In ->
    K x Out x In. One bmm, or one oneDNN product per group, ``(xg[k]^T @ dg[k])^T``, whose row-major operand
    xg^T is made by one transposing copy of all groups at once (a copy per group of strided rows cost 4x more);
    whichever measured faster for the shape (``onednn_faster``)."""
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
        return lambda: _grouped_weight_grad_bmm(dgs, xs), lambda: _grouped_weight_grad_onednn(dgs, xs)

    if onednn_faster(xg, ("fused_wgrad", K, bucket(N), In, Out, rows_of_one_matrix), case, K * N * In * Out):
        return _grouped_weight_grad_onednn(dg, xg)
    return _grouped_weight_grad_bmm(dg, xg)


def _grouped_weight_grad_bmm(dg: Tensor, xg: Tensor) -> Tensor:
    return torch.bmm(dg.transpose(1, 2), xg)  # K x Out x N @ K x N x In -> K x Out x In


def _grouped_weight_grad_onednn(dg: Tensor, xg: Tensor) -> Tensor:
    K, N, In = xg.shape
    if xg.transpose(0, 1).is_contiguous():  # the groups' columns of one N x (K*In) matrix, as a layer input is
        xT = xg.transpose(0, 1).reshape(N, K * In).t().contiguous().view(K, In, N)  # N x K*In -> K x In x N
    else:
        xT = xg.transpose(1, 2).contiguous()  # K x N x In -> K x In x N
    # K x (In x N @ N x Out -> In x Out -> Out x In)
    return torch.stack([onednn_mm(xT[k], dg[k].t()).t() for k in range(K)])


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
        # a translation batch's slabs run to ~100 MB each: without a byte cap the pool grew to 3 GB
        self.max_bytes = max_bytes
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
    # The g gate is computed as tanh(z) = 2 sigmoid(2z) - 1, so that one sigmoid covers all four gates:
    # its pre-activation is doubled (its rows of w_ih and w_hh and its bias).
    scale = x.new_ones(4, Hk)
    scale[2] = 2
    scale = scale.view(G4)  # 4H/K
    products = _StepProducts(x, w_hh * scale.view(1, G4, 1), None, B)  # K x 4H/K x H/K, g rows doubled
    bias = None if b_ih is None else (b_ih + b_hh) * scale  # K x 4H/K

    # What backward needs (the "saved" slab; returned to the pool when the graph node dies), computed while
    # each step's gates are in cache: R[:, t] is the recurrent input of step t, shuffle(h_{t-1}), group-major;
    # Q holds the gate derivatives (d pre-activation = dc * Q for i, f, g and dh * Q for o);
    # QC = o (1 - tanh^2 c) (dc += dh * QC); F = f (dc_{t-1} = dc_t * f).
    # Scratch (returned at the end of the call): C[:, t + 1] = c_t, C[:, 0] = c_0; the step buffers.
    # The input projections of all steps go to G (K x T*B x 4H/K) and their input's contiguous copy to Xc.
    r_shape, c_shape, step = (K, T + 1, B, Hk), (K, T + 1, B, Hk), (K, B, Hk)
    scratch = [c_shape, step, (K, B, G4), step, (K, T * B, G4), (K, T * B, Ik)]
    if save:
        saved_slab, (R, Q, QC, F) = _WORKSPACE.take([r_shape, (K, T, B, G4), (K, T, B, Hk), (K, T, B, Hk)], x)
        scratch_slab, (C, tc, gbuf, rin, G, Xc) = _WORKSPACE.take(scratch, x)
    else:
        saved_slab = None
        scratch_slab, (R, C, tc, gbuf, rin, G, Xc) = _WORKSPACE.take([r_shape] + scratch, x)
    # input projections (bias included) of all time steps, one product per group
    xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    Gs = _grouped_linear(xg, w_ih * scale.view(1, G4, 1), bias, G, Xc)  # K x (T*B x 4H/K)
    Gs = [g.view(T, B, G4) for g in Gs]  # K x (T x B x 4H/K)
    Rh = _h_view(R, K, shuffle)  # K x (T+1) x B x K' x H/K/K', indexed in h order
    Rh[:, 0].copy_(_h_split(h0.view(B, K, Hk).transpose(0, 1), K, shuffle))  # B x H -> K x B x H/K
    C[:, 0].copy_(c0.view(B, K, Hk).transpose(0, 1))  # B x H -> K x B x H/K
    rm = None
    if rmask is not None:
        rm = x.new_empty(K, B, Hk)  # the dropout mask of h_{t-1} in r order
        _h_view(rm.unsqueeze(1), K, shuffle).squeeze(1).copy_(_h_split(rmask.view(B, K, Hk).transpose(0, 1), K, shuffle))
    s = (K, B, K, Hk // K) if shuffle else (K, B, 1, Hk)
    kernel = _kernel.kernel_for(x)
    out = x.new_empty(T, B, H)  # a copy, never a view of R (saved for backward); the kernel writes it as it goes
    if kernel is not None:  # each step's pointwise work in one pass of the C kernel
        kept = (Q, QC, F) if save else (None, None, None)
        _forward_steps_kernel(kernel, products, Gs, R, C, rm, rin, gbuf, *kept, out, shuffle)
    else:
        for t in range(T):  # the same step in PyTorch operations
            r = R[:, t]  # K x B x H/K
            if rm is not None:
                r = torch.mul(r, rm, out=rin)
            g_t = [g[t] for g in Gs]  # K x (B x 4H/K)
            products.forward(r, g_t, gbuf).sigmoid_()
            i, f, g, o = gbuf.chunk(4, dim=-1)  # each K x B x H/K
            if save:
                q = torch.addcmul(gbuf, gbuf, gbuf, value=-1, out=Q[:, t])  # s (1 - s), all four gates
            g.mul_(2).sub_(1)  # tanh
            c = torch.mul(f, C[:, t], out=C[:, t + 1])
            c.addcmul_(i, g)  # c_t = f * c_{t-1} + i * g
            tanh_into(c, tc)
            torch.mul(o.reshape(s), tc.view(s), out=Rh[:, t + 1])  # h_t = o * tanh(c_t), into the shuffled slot
            if save:
                qi, qf, qg, qo = q.chunk(4, dim=-1)
                qi.mul_(g)  # g i (1 - i)
                qf.mul_(C[:, t])  # c_{t-1} f (1 - f)
                qg.mul_(i).mul_(4)  # i (1 - g^2) = 4 i s (1 - s)
                qo.mul_(tc)  # tanh(c) o (1 - o)
                qc = torch.mul(tc, tc, out=QC[:, t])
                torch.addcmul(o, o, qc, value=-1, out=qc)  # o (1 - tanh^2 c)
                F[:, t].copy_(f)
        # outputs in plain order: K x T x B x K' x H/K/K' -> T x B x K x K' x H/K/K' -> T x B x H
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
    _WORKSPACE.give(scratch_slab)
    saved = (saved_slab, Q, QC, F, R, rm) if save else None
    return out, h_n, c_n, saved


def _forward_steps_kernel(kernel, products: "_StepProducts", Gs: List[Tensor], R: Tensor, C: Tensor,
                          rm: Optional[Tensor], rin: Tensor, gbuf: Tensor, Q: Optional[Tensor],
                          QC: Optional[Tensor], F: Optional[Tensor], out: Tensor, shuffle: bool) -> None:
    """The forward time loop on the C kernel. Every address is computed ahead by arithmetic on the buffers'
    strides: at the translation model's sizes (32 rows, H/K = 64) a view per buffer and step cost about as
    much as the kernel's pass itself.

    Gs: K tensors T x B x 4H/K (contiguous), the input projections; R, C: K x (T+1) x B x H/K; Q, QC, F:
    K x T x B x (4)H/K, or None when nothing is saved for backward; out: T x B x H. Shapes and meanings as in ``_forward``."""
    K, T1, B, Hk = R.shape
    T, G4, e = T1 - 1, 4 * Hk, R.element_size()
    assert all(g.is_contiguous() for g in Gs)
    Rs = R.unbind(1)  # T+1 x (K x B x H/K), the recurrent inputs
    c0, cs, r0, rs = C.data_ptr(), C.stride(1) * e, R.data_ptr(), R.stride(1) * e  # step t: base + t * stride
    o0, os_ = out.data_ptr(), out.stride(0) * e
    save = Q is not None
    if save:
        q0, qs, qc0, f0, ss = Q.data_ptr(), Q.stride(1) * e, QC.data_ptr(), F.data_ptr(), QC.stride(1) * e
    gs_arr = _kernel.pointers(Gs)  # step t's input projections: Gs[k] + t*B*4H/K (x_off)
    z_arr = _kernel.pointers(gbuf.unbind(0))  # the bmm path's products land in gbuf, K x B x 4H/K
    threads = torch.get_num_threads()
    for t in range(T):
        r = Rs[t] if rm is None else torch.mul(Rs[t], rm, out=rin)  # K x B x H/K
        if products.mkldnn:  # oneDNN adds the input projections itself: K new tensors B x 4H/K
            z = products.parts(r, [g[t] for g in Gs], gbuf)[0]
            z_step, x_step = _kernel.pointers(z), None
        else:
            torch.bmm(r, products.w_t, out=gbuf)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K
            z_step, x_step = z_arr, gs_arr
        kernel.forward_step(
            K, B, Hk, shuffle, z_step, x_step, t * B * G4, G4, c0 + t * cs, c0 + (t + 1) * cs, C.stride(0),
            r0 + (t + 1) * rs, R.stride(0), q0 + t * qs if save else None, Q.stride(0) if save else 0,
            qc0 + t * ss if save else None, f0 + t * ss if save else None, QC.stride(0) if save else 0,
            o0 + t * os_, threads,
        )  # fmt: skip
        del z_step  # (oneDNN's step outputs live until the kernel has read them)


def _backward_steps_kernel(kernel, products: "_StepProducts", d_out: Optional[Tensor], dhn: Optional[Tensor],
                           dcn: Optional[Tensor], ends: List[Optional[Tensor]], rm: Optional[Tensor], Q: Tensor,
                           QC: Tensor, F: Tensor, DG: Tensor, dc: Tensor, dc_prev: Tensor, dr_buf: Tensor,
                           shuffle: bool) -> Optional[Tensor]:
    """The backward time loop on the C kernel, addresses computed ahead as in ``_forward_steps_kernel``.

    d_out: T x B x H (contiguous) or None; dhn, dcn: K x B x H/K or None; ends[t + 1]: the sequences whose last
    step is t; Q, QC, F: what forward saved; DG: K x T x B x 4H/K, written; dc: K x B x H/K, dc_T on entry
    and dc_0 on return; dc_prev: scratch. Returns dr_buf holding the gradient of step 0's recurrent input
    (K x B x H/K, r order, times the dropout mask), or None when T = 0."""
    K, T, B, G4 = Q.shape
    Hk, e = G4 // 4, Q.element_size()
    H = K * Hk
    DGs = DG.unbind(1)  # T x (K x B x 4H/K)
    q0, qs, qc0, f0, ss = Q.data_ptr(), Q.stride(1) * e, QC.data_ptr(), F.data_ptr(), QC.stride(1) * e
    dg0, dgs = DG.data_ptr(), DG.stride(1) * e  # step t: base + t * stride
    dy0, dys = (None, 0) if d_out is None else (d_out.data_ptr(), d_out.stride(0) * e)
    dr_arr = _kernel.pointers(dr_buf.unbind(0))  # the bmm path's dr lands in dr_buf, K x B x H/K
    threads = torch.get_num_threads()
    dr_step = dr = None
    for t in range(T - 1, -1, -1):
        dh_add, done = None, ends[t + 1]
        if done is not None:
            if dhn is not None:
                # dc_prev (unused by the kernel) holds dh_n of the sequences ending here: K x B x H/K, h order
                dh_add = dc_prev.zero_().index_copy_(1, done, dhn.index_select(1, done))
            if dcn is not None:
                dc.index_add_(1, done, dcn.index_select(1, done))
        kernel.backward_step(
            K, B, Hk, shuffle, None if dy0 is None else dy0 + t * dys, Hk, H, dr_step,
            None if rm is None else rm.data_ptr(), None if dh_add is None else dh_add.data_ptr(), q0 + t * qs,
            Q.stride(0), qc0 + t * ss, f0 + t * ss, QC.stride(0), dc.data_ptr(), dg0 + t * dgs, DG.stride(0),
            threads,
        )  # fmt: skip
        # dr = DG[:, t] @ W_hh; the kernel multiplies it by rm as it reads it at the next step
        if products.mkldnn:
            dr = products.grad_parts(DGs[t], dr_buf)  # K x (B x H/K), new tensors
            dr_step = _kernel.pointers(dr)
        else:
            dr = products.backward(DGs[t], dr_buf)  # into dr_buf, K x B x H/K
            dr_step = dr_arr
    if dr is None:
        return None
    if products.mkldnn:
        torch.stack(dr, out=dr_buf)  # K x (B x H/K) -> K x B x H/K
    return dr_buf if rm is None else dr_buf.mul_(rm)


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
        slab, Q, QC, F, R, rm = saved
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
        s = (K, B, K, Hk // K) if shuffle else (K, B, 1, Hk)

        # dh of every step from the outputs, read step by step as a group-major view: T x B x H -> K x T x B x H/K
        dy = None
        if d_out is not None:
            if lengths is not None:
                d_out = d_out * _prefix_mask(lengths, T).unsqueeze(-1)  # padded steps have no gradient
            dy = d_out.view(T, B, K, Hk).permute(2, 0, 1, 3)
        dhn = None if d_hn is None else d_hn.view(B, K, Hk).transpose(0, 1)  # B x H -> K x B x H/K
        dcn = None if d_cn is None else d_cn.view(B, K, Hk).transpose(0, 1)
        ends: List[Optional[Tensor]] = [None] * (T + 1)  # ends[t + 1]: the sequences whose last step is t
        if lengths is None:
            ends[T] = torch.arange(B, device=x.device)
        else:
            by_length: List[List[int]] = [[] for _ in range(T + 1)]
            for b, n in enumerate(lengths.tolist()):
                by_length[n].append(b)
            ends = [torch.tensor(e, device=x.device) if e else None for e in by_length]

        # the backward loop: DG[:, t] = d(pre-activation gates) of step t = Q[:, t] * (dc, dc, dc, dh)
        products = _StepProducts(x, None, w_hh, B)
        kernel = _kernel.kernel_for(x)
        step = (K, B, Hk)
        scratch_slab, (DG, dc, dc_prev, dh, dr_buf) = _WORKSPACE.take([tuple(Q.shape), step, step, step, step], x)
        dc.zero_()
        if kernel is not None:  # each step's pointwise work in one pass of the C kernel
            dy_rows = None if dy is None else d_out.contiguous()  # T x B x H: dy[k, t, b] = d_out[t, b, k*H/K:]
            dr = _backward_steps_kernel(kernel, products, dy_rows, dhn, dcn, ends, rm, Q, QC, F, DG, dc, dc_prev,
                                        dr_buf, shuffle)  # fmt: skip
        else:
            dr = None  # the gradient of step t + 1's recurrent input, r order: K x B x H/K
            for t in range(T - 1, -1, -1):
                e = ends[t + 1]
                # dh_t = d out_t + unshuffle(dr_{t+1})
                if dr is None:
                    if dy is None:
                        dh.zero_()
                    else:
                        dh.copy_(dy[:, t])
                else:
                    carry = _h_view(dr.unsqueeze(1), K, shuffle).squeeze(1)  # r order read in h order
                    if dy is None:
                        dh.view(s).copy_(carry)
                    else:
                        torch.add(dy[:, t].view(s), carry, out=dh.view(s))
                if e is not None:
                    if dhn is not None:
                        dh.index_add_(1, e, dhn.index_select(1, e))
                    if dcn is not None:
                        dc.index_add_(1, e, dcn.index_select(1, e))
                q, dg = Q[:, t], DG[:, t]  # K x B x 4H/K
                torch.mul(q[..., 3 * Hk :], dh, out=dg[..., 3 * Hk :])  # o
                dc.addcmul_(dh, QC[:, t])
                ifg = (K, B, 3, Hk)
                torch.mul(q[..., : 3 * Hk].view(ifg), dc.unsqueeze(2), out=dg[..., : 3 * Hk].view(ifg))  # i, f, g
                torch.mul(dc, F[:, t], out=dc_prev)  # dc_{t-1} = dc_t * f
                dc, dc_prev = dc_prev, dc
                dr = products.backward(dg, dr_buf)
                if rm is not None:
                    dr.mul_(rm)
        dh0 = x.new_zeros(K, B, Hk)
        if dr is not None:
            dh0.view(s).copy_(_h_view(dr.unsqueeze(1), K, shuffle).squeeze(1))  # unshuffle into h order
        if ends[0] is not None:
            e = ends[0]  # empty sequences: the final state is the initial state
            if dhn is not None:
                dh0.index_add_(1, e, dhn.index_select(1, e))
            if dcn is not None:
                dc.index_add_(1, e, dcn.index_select(1, e))

        need = ctx.needs_input_grad
        DG = DG.view(K, T * B, G4)  # K x T x B x 4H/K -> K x (T*B) x 4H/K
        dx = dw_ih = dw_hh = db = None
        if need[0]:
            if _use_mkldnn(x):
                parts = _grouped_linear(DG, w_ih.transpose(1, 2).contiguous(), None)  # K x ((T*B) x I/K)
                dx = torch.cat(parts, dim=1).view(T, B, I)
            else:
                dx = x.new_empty(T, B, I)
                torch.bmm(DG, w_ih, out=dx.view(T * B, K, Ik).transpose(0, 1))  # K x (T*B) x I/K, into T x B x I
        if need[3]:
            xg = x.reshape(T * B, K, Ik).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
            dw_ih = _grouped_weight_grad(DG, xg)  # K x 4H/K x I/K
        if need[4]:
            Rin = R[:, :T]
            if rm is not None:
                Rin = Rin * rm.unsqueeze(1)
            dw_hh = _grouped_weight_grad(DG, Rin.reshape(K, T * B, Hk))  # K x 4H/K x H/K
        if ctx.has_bias and (need[5] or need[6]):
            db = DG.sum(1)  # K x 4H/K
        dh0 = dh0.transpose(0, 1).reshape(B, H) if need[1] else None  # K x B x H/K -> B x H
        dc0 = None
        if need[2]:
            dc0 = x.new_empty(B, H)  # a copy: dc lives in the scratch slab
            dc0.view(B, K, Hk).copy_(dc.transpose(0, 1))  # K x B x H/K -> B x H
        del DG, dc, dc_prev, dh, dr_buf, dr
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


class FusedLSTMCellFunction(torch.autograd.Function):
    """The pointwise half of one group LSTM step on the C kernel: pre-activations and c_{t-1} -> h_t, c_t.

    gates: K x B x 4H/K (i, f, g, o of every group), c: K x B x H/K. Returns h, c' (K x B x H/K each, group
    order, no shuffle). Two autograd nodes fewer than a dozen: GroupLSTMCell runs it at every decoder step.
    """

    @staticmethod
    def forward(ctx, gates: Tensor, c: Tensor):
        kernel = _kernel.kernel_for(gates)
        K, B, G4 = gates.shape
        Hk = G4 // 4
        z = gates.contiguous().clone()  # the kernel reads tanh(z_g) as 2 sigmoid(2 z_g) - 1: g doubled
        z[..., 2 * Hk : 3 * Hk].mul_(2)
        c = c.contiguous()
        h, c_new, Qc, Fc = (gates.new_empty(K, B, Hk) for _ in range(4))
        Q = gates.new_empty(K, B, G4)
        kernel.forward_step(
            K, B, Hk, 0, _kernel.pointers(z.unbind(0)), None, 0, G4, c.data_ptr(), c_new.data_ptr(), B * Hk,
            h.data_ptr(), B * Hk, Q.data_ptr(), B * G4, Qc.data_ptr(), Fc.data_ptr(), B * Hk, None,
            torch.get_num_threads(),
        )
        ctx.save_for_backward(Q, Qc, Fc)
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Optional[Tensor], dc_new: Optional[Tensor]):
        Q, Qc, Fc = ctx.saved_tensors
        kernel = _kernel.kernel_for(Q)
        K, B, G4 = Q.shape
        Hk = G4 // 4
        dc = Q.new_zeros(K, B, Hk) if dc_new is None else dc_new.contiguous().clone()  # dc_t -> dc_{t-1}
        dh = None if dh is None else dh.contiguous()
        dgates = Q.new_empty(K, B, G4)
        kernel.backward_step(
            K, B, Hk, 0, None if dh is None else dh.data_ptr(), B * Hk, Hk, None, None, None, Q.data_ptr(), B * G4,
            Qc.data_ptr(), Fc.data_ptr(), B * Hk, dc.data_ptr(), dgates.data_ptr(), B * G4, torch.get_num_threads(),
        )
        return dgates, dc


def lstm_cell_pointwise(gates: Tensor, c: Tensor, fused: bool) -> Tuple[Tensor, Tensor]:
    """nn.LSTM's cell on pre-activations: gates K x B x 4H/K (i, f, g, o), c K x B x H/K -> h, c' (K x B x H/K).

    With ``fused`` and the C kernel applicable (float32 CPU), one kernel pass each way; else PyTorch operations.
    """
    if fused and _kernel.kernel_for(gates) is not None:
        return FusedLSTMCellFunction.apply(gates, c)
    i, f, g, o = gates.chunk(4, dim=-1)  # each K x B x H/K
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * tanh(g)
    return torch.sigmoid(o) * tanh(c_new), c_new
