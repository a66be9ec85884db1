"""The fused group LSTM's time step on Triton (``steps.TritonStep``) and ``GroupLSTMCell``'s step on the same kernels.

By default one kernel launch per time step and direction of the pass. With K groups of Hk = H/K units, B rows,
gates i, f, g, o, a step is cut into tiles, one program each: grid (K, B / BLOCK_B, Hk / BLOCK_J or BLOCK_R).

* Forward, ``_forward_kernel``: a tile is rows ``b`` and units ``j`` of group k (h order). It computes the four
  gates' recurrent products ``r_k @ W_k^T`` for its units (``tl.dot``, float32 accumulation, the contraction over
  the group's Hk recurrent inputs in chunks of BLOCK_U), adds the input projections (biases included), runs the
  gates and the cell in float32, and writes c_t, h_t into its slot of the next step's recurrent input (shuffled: h
  unit (k, j) goes to group ``j // (Hk/K)``, unit ``(j % (Hk/K)) * K + k``, so the shuffle is an address
  computation), h_t into the plain-order output, and the gate derivatives the backward pass reads (``StepBuffers``:
  Q, QC, F).
* Backward, ``_backward_kernel``: a tile is rows ``b`` and units ``u`` of group g of the recurrent input (r order).
  It first computes its tile of step t+1's recurrent-input gradient, ``dr[g, b, u] = DG[g, t+1, b, :] @ W_g[:, u]``
  (times the recurrent dropout mask), from the gate gradients the launch of step t+1 wrote, then for the h unit that
  r unit holds it adds the output gradient, updates dc and writes the four gate gradients of step t. Every h unit
  belongs to exactly one tile, so nothing is computed twice and dc (kept in r order, float32) is updated in place.
  After the loop one product-only launch gives dr_0. The cell's step (``TritonCellFunction``) reads dc_t from
  its incoming gradient, in its own dtype, and writes dc_{t-1} into a new tensor in c's dtype: one launch per
  step and direction, with no copy or cast around it.
* Persistent loops (the backend's ``persistent_loops``): one launch runs a whole loop, forward or backward, on
  as many programs as the GPU has multiprocessors (at most one per tile), each taking every P-th tile of a
  step, then waiting at a grid barrier (an atomic counter, as CUDA's grid sync) until every program has
  finished the step (T - 1 barriers: the launch's end orders the last step): the host launches once per loop
  instead of T times. The final states' gradients enter through a float32 copy of the output gradient (dh_n)
  and a T x K x B x Hk tensor added to dc (dc_n). The interpreter runs programs one after another, so it runs a
  loop launch on one program (every tile, a barrier that opens at once); the barrier between programs is
  exercised on a GPU only.
* The weight and input gradients are one batched product each over all T*B rows after the loop
  (``fused_group_lstm.py``), as on CPU.

float32, bfloat16 and float16 inputs: the products read the input dtype (bfloat16 and float16 on tensor cores),
and accumulate, like the gate math, the cell state and the saved derivatives, in float32. float32 products use
full float32 precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set (as cuBLAS's do).

Nothing is compiled at import: Triton compiles a kernel variant at its first launch on a GPU and caches it on disk.
CPU tensors run the same kernels on Triton's interpreter (the tests' way; ``steps.step_kind`` sends CPU tensors
here only with ``TRITON_INTERPRET=1`` and ``step="triton"``); the interpreter has no bfloat16 products, so there
the products' operands are cast to float32 first. The kernels call Triton's builtins and their own device
functions (``_DeviceFunction``) only, not Triton's jitted library functions such as ``tl.sigmoid``, so that
compiled and interpreted variants can live in one process. The step kernels and the loop kernels share their
tiles' code (``_forward_tile``, ``_backward_tile``).

Tile sizes follow a fixed rule (``tile_sizes``) from B, K, Hk, the dtype and the multiprocessor count: no
autotuning, the same command runs the same kernels. The rule is written for Hopper-class GPUs and not tuned by
measurement.
"""

import collections
import dataclasses
import functools
import inspect
import logging
import math
import threading
from typing import Callable, Dict, Optional, Set, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .steps import Step, StepBuffers, _h_split, _h_view

logger = logging.getLogger("grnn_fairseq.triton_step")

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF
LOOPS = ("steps", "graphs", "persistent")  # how a fused call's time loops launch (``TritonStep``)


# ------------------------------------------------------------------------------------------------ kernels


class _DeviceFunction(triton.JITFunction):
    """A function the kernels call: Triton's compiler inlines it (a JITFunction), while the interpreter, which
    runs a kernel as Python, calls it through an ``InterpretedFunction`` of its own, so that compiled and
    interpreted kernels can share it in one process."""

    def __init__(self, fn):
        super().__init__(fn)
        self._interpreted = None

    def __call__(self, *args, **kwargs):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted(*args, **kwargs)


def _forward_tile(
    G, R, R_next, W, RM, C, C_next, Q, QC, F, OUT,  # pointers (None where a flag leaves them out)
    k, rb, rj, ts, T, B, K, Hk, r_gs, c_gs,
    SHUFFLE: tl.constexpr, SAVE: tl.constexpr, HAS_RM: tl.constexpr, HAS_PRODUCT: tl.constexpr,
    HAS_OUT: tl.constexpr, SCALE_G: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_U: tl.constexpr,
):  # fmt: skip
    """One step forward for rows rb and h units rj of group k (int64); ts: the step's first row, t * B (int64).

    G: K x T x B x 4Hk input projections with biases (g rows doubled unless SCALE_G). R: K x (T+1) x B x Hk
    recurrent inputs in r order, group stride r_gs; R_next: R advanced by one step (h_t lands in R_next[:, t]).
    W: K x Hk x 4Hk, the transposed recurrent weights (g columns doubled unless SCALE_G). RM: K x B x Hk dropout
    mask in r order. C, C_next: K x (T+1) x B x Hk cell states (C_next one step ahead), group stride c_gs. Q: K x
    T x B x 4Hk, QC, F: K x T x B x Hk, float32. OUT: T x B x K*Hk, h_t in plain order.
    """
    mb = rb < B
    mj = rj < Hk
    mbj = mb[:, None] & mj[None, :]
    G4 = 4 * Hk

    acc_i = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    acc_f = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    acc_g = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    acc_o = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    if HAS_PRODUCT:
        r_rows = R + k * r_gs + (ts + rb[:, None]) * Hk  # R[k, t, b, :]
        w_cols = W + k * Hk * G4 + rj[None, :]  # W[k, :, j] of gate i; the other gates Hk, 2Hk, 3Hk further
        for u0 in range(0, Hk, BLOCK_U):
            ru = u0 + tl.arange(0, BLOCK_U)
            mu = ru < Hk
            mbu = mb[:, None] & mu[None, :]
            r = tl.load(r_rows + ru[None, :], mask=mbu, other=0.0)  # BLOCK_B x BLOCK_U
            if HAS_RM:
                drop = tl.load(RM + k * B * Hk + rb[:, None] * Hk + ru[None, :], mask=mbu, other=0.0)
                r = (r.to(tl.float32) * drop.to(tl.float32)).to(r.dtype)
            w_ptr = w_cols + ru[:, None] * G4
            muj = mu[:, None] & mj[None, :]
            w_i = tl.load(w_ptr, mask=muj, other=0.0)  # BLOCK_U x BLOCK_J each
            w_f = tl.load(w_ptr + Hk, mask=muj, other=0.0)
            w_g = tl.load(w_ptr + 2 * Hk, mask=muj, other=0.0)
            w_o = tl.load(w_ptr + 3 * Hk, mask=muj, other=0.0)
            if UPCAST_DOT:
                r, w_i, w_f = r.to(tl.float32), w_i.to(tl.float32), w_f.to(tl.float32)
                w_g, w_o = w_g.to(tl.float32), w_o.to(tl.float32)
            acc_i = tl.dot(r, w_i, acc_i, input_precision=PRECISION)
            acc_f = tl.dot(r, w_f, acc_f, input_precision=PRECISION)
            acc_g = tl.dot(r, w_g, acc_g, input_precision=PRECISION)
            acc_o = tl.dot(r, w_o, acc_o, input_precision=PRECISION)

    g_ptr = G + k * T * B * G4 + (ts + rb[:, None]) * G4 + rj[None, :]  # G[k, t, b, j]
    z_i = acc_i + tl.load(g_ptr, mask=mbj, other=0.0).to(tl.float32)
    z_f = acc_f + tl.load(g_ptr + Hk, mask=mbj, other=0.0).to(tl.float32)
    z_g = acc_g + tl.load(g_ptr + 2 * Hk, mask=mbj, other=0.0).to(tl.float32)
    z_o = acc_o + tl.load(g_ptr + 3 * Hk, mask=mbj, other=0.0).to(tl.float32)
    if SCALE_G:
        z_g = 2.0 * z_g
    gate_i = 1.0 / (1.0 + tl.exp(-z_i))
    gate_f = 1.0 / (1.0 + tl.exp(-z_f))
    s_g = 1.0 / (1.0 + tl.exp(-z_g))
    gate_o = 1.0 / (1.0 + tl.exp(-z_o))
    gate_g = 2.0 * s_g - 1.0  # tanh of the undoubled pre-activation

    state = (ts + rb[:, None]) * Hk + rj[None, :]  # [t, b, j] of a T x B x Hk (or (T+1) x B x Hk) group
    c_prev = tl.load(C + k * c_gs + state, mask=mbj, other=0.0).to(tl.float32)
    c = gate_f * c_prev + gate_i * gate_g
    tanh_c = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0
    h = gate_o * tanh_c
    tl.store(C_next + k * c_gs + state, c.to(C_next.dtype.element_ty), mask=mbj)
    if SHUFFLE:  # h unit (k, j) is unit (j % (Hk/K)) * K + k of group j // (Hk/K) of shuffle(h_t)
        m = Hk // K
        h_ptr = R_next + (rj // m)[None, :].to(tl.int64) * r_gs + (ts + rb[:, None]) * Hk + ((rj % m) * K + k)[None, :]
    else:
        h_ptr = R_next + k * r_gs + state
    tl.store(h_ptr, h.to(R_next.dtype.element_ty), mask=mbj)
    if HAS_OUT:
        tl.store(OUT + (ts + rb[:, None]) * K * Hk + k * Hk + rj[None, :], h.to(OUT.dtype.element_ty), mask=mbj)
    if SAVE:
        q_ptr = Q + k * T * B * G4 + (ts + rb[:, None]) * G4 + rj[None, :]
        tl.store(q_ptr, gate_i * (1.0 - gate_i) * gate_g, mask=mbj)  # dc -> d z_i
        tl.store(q_ptr + Hk, gate_f * (1.0 - gate_f) * c_prev, mask=mbj)  # dc -> d z_f
        tl.store(q_ptr + 2 * Hk, 4.0 * s_g * (1.0 - s_g) * gate_i, mask=mbj)  # dc -> d z_g (1 - g^2 = 4 s (1 - s))
        tl.store(q_ptr + 3 * Hk, gate_o * (1.0 - gate_o) * tanh_c, mask=mbj)  # dh -> d z_o
        s_off = k * T * B * Hk + state
        tl.store(QC + s_off, gate_o * (1.0 - tanh_c * tanh_c), mask=mbj)  # dh -> dc
        tl.store(F + s_off, gate_f, mask=mbj)  # dc_t -> dc_{t-1}


def _backward_tile(
    DG, W, Q, QC, F, DC, DC_OUT, DY, RM, DR, DC_ADD,  # pointers (None where a flag leaves them out)
    g, rb, ru, t, ts, B_next, T, B, K, Hk, dy_st, dy_sb, dy_sk,
    SHUFFLE: tl.constexpr, HAS_NEXT: tl.constexpr, POINTWISE: tl.constexpr, HAS_DY: tl.constexpr,
    HAS_RM: tl.constexpr, HAS_DC_ADD: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Step t backward for rows rb and r-order units ru of group g (int64; module docstring); ts: t * B (int64);
    B_next: the rows step t+1 has (B, or 0 after a loop's last step).

    DG: K x T x B x 4Hk gate gradients (of the undoubled pre-activations), read at t+1, written at t. W: K x 4Hk x
    Hk. Q, QC, F as the forward kernel wrote them. DC: K x B x Hk, dc_t in r order, read; DC_OUT: where dc_{t-1}
    goes, the same (the loops: float32, updated in place) or another (the cell: dc_t of any dtype in, c's out). DY:
    the gradient of h_t from outside, element [t, b, k, j] at t * dy_st + b * dy_sb + k * dy_sk + j. RM: K x B x
    Hk dropout mask in r order. DR: K x B x Hk, float32, written by the product-only variant (POINTWISE off).
    DC_ADD: T x K x B x Hk, float32, h order: gradients added to dc at each step (the final cell state's).
    """
    mb = rb < B
    mu = ru < Hk
    mbu = mb[:, None] & mu[None, :]
    G4 = 4 * Hk
    r_off = g * B * Hk + rb[:, None] * Hk + ru[None, :]  # [g, b, u] of a K x B x Hk tensor

    dr = tl.full((BLOCK_B, BLOCK_R), 0.0, tl.float32)
    if HAS_NEXT:  # dr_{t+1}[g, b, u] = DG[g, t+1, b, :] @ W[g, :, u]
        mb_next = rb < B_next
        a_rows = DG + g * T * B * G4 + (ts + B + rb[:, None]) * G4
        w_cols = W + g * G4 * Hk + ru[None, :]
        for n0 in range(0, G4, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mn = rn < G4
            a = tl.load(a_rows + rn[None, :], mask=mb_next[:, None] & mn[None, :], other=0.0)  # BLOCK_B x BLOCK_N
            w = tl.load(w_cols + rn[:, None] * Hk, mask=mn[:, None] & mu[None, :], other=0.0)  # BLOCK_N x BLOCK_R
            if UPCAST_DOT:
                a, w = a.to(tl.float32), w.to(tl.float32)
            dr = tl.dot(a, w, dr, input_precision=PRECISION)
        if HAS_RM:
            dr = dr * tl.load(RM + r_off, mask=mbu, other=0.0).to(tl.float32)
        if not POINTWISE:
            tl.store(DR + r_off, dr, mask=mbu)

    if POINTWISE:
        if SHUFFLE:  # r unit (g, u) holds h unit (u % K, g * Hk/K + u // K)
            k = (ru % K).to(tl.int64)
            j = g * (Hk // K) + ru // K
        else:
            k = g + 0 * ru.to(tl.int64)
            j = ru.to(tl.int64)
        dh = dr
        if HAS_DY:
            dy_ptr = DY + t.to(tl.int64) * dy_st + rb[:, None] * dy_sb + (k * dy_sk + j)[None, :]
            dh += tl.load(dy_ptr, mask=mbu, other=0.0).to(tl.float32)
        s_off = (k * T * B * Hk + j)[None, :] + (ts + rb[:, None]) * Hk  # [k, t, b, j] of QC and F
        dc = tl.load(DC + r_off, mask=mbu, other=0.0).to(tl.float32) + dh * tl.load(QC + s_off, mask=mbu, other=0.0)
        if HAS_DC_ADD:  # dc_n of the rows whose last step this is: DC_ADD[t, k, b, j]
            dc += tl.load(DC_ADD + ((t * K + k) * B * Hk + j)[None, :] + rb[:, None] * Hk, mask=mbu, other=0.0)
        q_off = (k * T * B * G4 + j)[None, :] + (ts + rb[:, None]) * G4  # [k, t, b, j] of Q and DG, gate i
        dg_type = DG.dtype.element_ty
        tl.store(DG + q_off, (tl.load(Q + q_off, mask=mbu, other=0.0) * dc).to(dg_type), mask=mbu)
        tl.store(DG + q_off + Hk, (tl.load(Q + q_off + Hk, mask=mbu, other=0.0) * dc).to(dg_type), mask=mbu)
        tl.store(DG + q_off + 2 * Hk, (tl.load(Q + q_off + 2 * Hk, mask=mbu, other=0.0) * dc).to(dg_type), mask=mbu)
        tl.store(DG + q_off + 3 * Hk, (tl.load(Q + q_off + 3 * Hk, mask=mbu, other=0.0) * dh).to(dg_type), mask=mbu)
        dc_prev = dc * tl.load(F + s_off, mask=mbu, other=0.0)  # dc_{t-1}
        tl.store(DC_OUT + r_off, dc_prev.to(DC_OUT.dtype.element_ty), mask=mbu)


_forward_tile = _DeviceFunction(_forward_tile)
_backward_tile = _DeviceFunction(_backward_tile)


def _grid_barrier(SYNC, arrivals):
    """Wait until ``arrivals`` programs have arrived at the counter SYNC (int32), this one included, as CUDA's
    grid sync does: the program's writes done (its own barrier), one thread's release-add to the counter and
    acquire loads of it until it reads ``arrivals`` (Triton runs a scalar atomic on one thread), then the program
    waits for that thread. Later plain loads of what other programs wrote before arriving see it."""
    tl.debug_barrier()
    tl.atomic_add(SYNC, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(SYNC, 0, sem="acquire", scope="gpu")
    while arrived < arrivals:
        arrived = tl.atomic_add(SYNC, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


_grid_barrier = _DeviceFunction(_grid_barrier)


def _loop_tile(tile, K, nb, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Tile ``tile`` of a loop kernel's step, group fastest, then the nb row tiles, then the unit tiles: its group
    (int64), rows (BLOCK_B) and units (BLOCK_U: h units forward, r-order units backward)."""
    rows = tile // K % nb * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tile // (K * nb) * BLOCK_U + tl.arange(0, BLOCK_U)
    return (tile % K).to(tl.int64), rows, units


_loop_tile = _DeviceFunction(_loop_tile)


def _forward_kernel(
    G, R, R_next, W, RM, C, C_next, Q, QC, F, OUT,  # pointers (None where a flag leaves them out)
    t, T, B, K, Hk, r_gs, c_gs,
    SHUFFLE: tl.constexpr, SAVE: tl.constexpr, HAS_RM: tl.constexpr, HAS_PRODUCT: tl.constexpr,
    HAS_OUT: tl.constexpr, SCALE_G: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_U: tl.constexpr,
):  # fmt: skip
    """Step t forward, grid (K, B / BLOCK_B, Hk / BLOCK_J): a program per tile (``_forward_tile``)."""
    k = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # rows
    rj = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)  # h units of group k
    _forward_tile(G, R, R_next, W, RM, C, C_next, Q, QC, F, OUT, k, rb, rj, t.to(tl.int64) * B, T, B, K, Hk, r_gs,
                  c_gs, SHUFFLE, SAVE, HAS_RM, HAS_PRODUCT, HAS_OUT, SCALE_G, UPCAST_DOT, PRECISION, BLOCK_B,
                  BLOCK_J, BLOCK_U)  # fmt: skip


def _forward_loop_kernel(
    G, R, R_next, W, RM, C, C_next, Q, QC, F, OUT, SYNC,  # pointers (None where a flag leaves them out)
    t, steps, T, B, K, Hk, r_gs, c_gs,
    SHUFFLE: tl.constexpr, SAVE: tl.constexpr, HAS_RM: tl.constexpr, HAS_PRODUCT: tl.constexpr,
    HAS_OUT: tl.constexpr, SCALE_G: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_U: tl.constexpr,
):  # fmt: skip
    """Steps t, t + 1, ..., t + steps - 1 forward in one launch (persistent loops, module docstring): per step,
    program p computes tiles p, p + P, p + 2P, ... (``_loop_tile``; P programs, every one resident at once),
    then, but after the last step, waits at the grid barrier on SYNC (an int32 zero)."""
    P = tl.num_programs(0)
    nb = (B + BLOCK_B - 1) // BLOCK_B
    tiles = K * nb * ((Hk + BLOCK_J - 1) // BLOCK_J)
    for s in range(0, steps):
        ts = (t + s).to(tl.int64) * B  # first row of step t + s
        for tile in range(tl.program_id(0), tiles, P):
            k, rb, rj = _loop_tile(tile, K, nb, BLOCK_B, BLOCK_J)
            _forward_tile(G, R, R_next, W, RM, C, C_next, Q, QC, F, OUT, k, rb, rj, ts, T, B, K, Hk, r_gs, c_gs,
                          SHUFFLE, SAVE, HAS_RM, HAS_PRODUCT, HAS_OUT, SCALE_G, UPCAST_DOT, PRECISION, BLOCK_B,
                          BLOCK_J, BLOCK_U)  # fmt: skip
        if s + 1 < steps:  # the launch's end orders the last step's writes before what runs after it
            _grid_barrier(SYNC, P * (s + 1))


def _backward_kernel(
    DG, W, Q, QC, F, DC, DC_OUT, DY, RM, DR,  # pointers (None where a flag leaves them out)
    t, T, B, K, Hk, dy_st, dy_sb, dy_sk,
    SHUFFLE: tl.constexpr, HAS_NEXT: tl.constexpr, POINTWISE: tl.constexpr, HAS_DY: tl.constexpr,
    HAS_RM: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Step t backward, grid (K, B / BLOCK_B, Hk / BLOCK_R): a program per tile (``_backward_tile``)."""
    g = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # rows
    ru = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # units of group g of the recurrent input
    _backward_tile(DG, W, Q, QC, F, DC, DC_OUT, DY, RM, DR, None, g, rb, ru, t, t.to(tl.int64) * B, B, T, B, K, Hk,
                   dy_st, dy_sb, dy_sk, SHUFFLE, HAS_NEXT, POINTWISE, HAS_DY, HAS_RM, False, UPCAST_DOT, PRECISION,
                   BLOCK_B, BLOCK_R, BLOCK_N)  # fmt: skip


def _backward_loop_kernel(
    DG, W, Q, QC, F, DC, DY, RM, DC_ADD, SYNC,  # pointers (None where a flag leaves them out)
    t, steps, T, B, K, Hk, dy_st, dy_sb, dy_sk,
    SHUFFLE: tl.constexpr, HAS_DY: tl.constexpr, HAS_RM: tl.constexpr, HAS_DC_ADD: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Steps t, t - 1, ..., t - steps + 1 backward in one launch, tiles and barrier as ``_forward_loop_kernel``'s;
    the product with step t+1's gate gradients is empty at step T - 1."""
    P = tl.num_programs(0)
    nb = (B + BLOCK_B - 1) // BLOCK_B
    tiles = K * nb * ((Hk + BLOCK_R - 1) // BLOCK_R)
    for s in range(0, steps):
        tt = t - s  # the step
        rows_next = B * (tt + 1 < T).to(tl.int32)
        for tile in range(tl.program_id(0), tiles, P):
            g, rb, ru = _loop_tile(tile, K, nb, BLOCK_B, BLOCK_R)
            _backward_tile(DG, W, Q, QC, F, DC, DC, DY, RM, None, DC_ADD, g, rb, ru, tt, tt.to(tl.int64) * B, rows_next,
                           T, B, K, Hk, dy_st, dy_sb, dy_sk, SHUFFLE, True, True, HAS_DY, HAS_RM, HAS_DC_ADD,
                           UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_R, BLOCK_N)  # fmt: skip
        if s + 1 < steps:
            _grid_barrier(SYNC, P * (s + 1))


# step index, step count and sizes that vary per batch: one compiled variant for all
_NOT_SPECIALIZED = ["t", "steps", "T", "B", "K"]  # (steps: the loop kernels' own)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, interpreted: bool):
    """The kernel ``name`` compiled by Triton (CUDA tensors) or run by its interpreter (CPU tensors), whatever
    ``TRITON_INTERPRET`` says (``triton.jit`` would read it once, at decoration)."""
    fn = {"forward": _forward_kernel, "backward": _backward_kernel, "forward_loop": _forward_loop_kernel,
          "backward_loop": _backward_loop_kernel}[name]
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn, do_not_specialize=_NOT_SPECIALIZED)
    return triton.JITFunction(fn, do_not_specialize=_NOT_SPECIALIZED)


def _direct_launch_supported(device: torch.device) -> bool:
    """Whether ``StepLauncher`` may call compiled kernels' launchers itself: an NVIDIA CUDA device (not ROCm's,
    whose Triton backend specializes pointers on more than ``_variant_key`` holds), a Triton with
    ``knobs.runtime`` (whose ``JITFunction.run`` passes the launcher every bound argument, constexprs included, in
    parameter order, as ``tests/test_triton.py`` checks of the Triton installed) and no launch hook set (a
    profiler's hooks see JIT launches only; Triton's hooks are chains, empty when none is set, or None)."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if device.type != "cuda" or torch.version.hip is not None or runtime is None:
        return False
    hooks = (getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None))
    return all(hook is None or getattr(hook, "calls", None) == [] for hook in hooks)


def _current_stream(device: torch.device) -> int:
    """The raw handle of the device's current CUDA stream, as Triton's JIT launch takes it."""
    return torch._C._cuda_getCurrentRawStream(device.index)


_DIRECT_LAUNCH = {"broken": None}  # the error of a failed direct launch: later calls launch through the JIT

# the compiled variants the JIT returned, by kernel, device, launch options and every argument's specialization
# (``_variant_key``), as Triton keeps them (a variant runs on any grid): a launch whose key is here calls the
# variant's launcher itself
_VARIANTS: Dict[tuple, object] = {}
_I32 = (-(2**31), 2**31)  # the integers Triton passes as int32: other ones are int64 (another variant)


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def _runtime_positions(fn) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The positions of ``fn``'s parameters that are not constexpr: those Triton specializes on, and those it
    does not (``_NOT_SPECIALIZED``)."""
    parameters = inspect.signature(fn).parameters.values()
    runtime = [i for i, p in enumerate(parameters) if "constexpr" not in str(p.annotation)]
    free = tuple(i for i in runtime if _parameters(fn)[i] in _NOT_SPECIALIZED)
    return tuple(i for i in runtime if i not in free), free


def _variant_key(values: list, positions: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> tuple:
    """The kernel arguments' part of a compiled variant's key, in parameter order: what Triton's JIT derives a
    variant from (``tests/test_triton.py`` checks it against the Triton installed). positions:
    ``_runtime_positions``. A tensor: its dtype and whether its address is a multiple of 16 bytes; an integer:
    whether it fits int32 and, where Triton specializes on it, whether it is 1 and whether a multiple of 16;
    None and the constexprs (flags, tile sizes): their values."""
    specialized, free = positions
    key = list(values)
    for i in specialized:
        value = values[i]
        if isinstance(value, Tensor):
            key[i] = (value.dtype, value.data_ptr() % 16 == 0)
        elif value is not None:
            key[i] = (value == 1, value % 16 == 0, _I32[0] <= value < _I32[1])
    for i in free:
        key[i] = _I32[0] <= values[i] < _I32[1]
    return tuple(key)


class StepLauncher:
    """Launches one kernel, for every step of one loop of one call, or once.

    On a GPU, Triton's JIT launch (``kernel[grid](...)``) binds the arguments, derives each one's
    specialization, builds the variant's cache key and looks it up before it calls the compiled variant's
    launcher: host work that outweighs a step at these sizes (hidden 1024, K=1, T=35, bfloat16 on an H200 with
    Triton 3.6: an eager forward call 2.27 ms, the same kernels replayed as one CUDA graph 0.70 ms). So a
    launcher calls compiled variants' launchers itself where it can:

    * Within a loop every launch of one kind has the same arguments except the step index ``t``, which Triton
      does not specialize on (``_NOT_SPECIALIZED``): the first launch of each ``key`` (the caller's name for an
      argument set) finds the compiled variant, and the later ones call its launcher with the bound arguments,
      ``t`` replaced, without building the arguments again.
    * That first launch finds the variant in ``_VARIANTS`` where another call launched the kernel with
      arguments of the same specialization (``_variant_key``: the same dtypes and flags, tensors as aligned,
      sizes as divisible by 16), else launches through the JIT, which returns the variant for ``_VARIANTS``.
      So ``GroupLSTMCell``'s steps, whose tensors are new at every call, and the loops' first launches go
      through the JIT once per argument specialization, not once per call.

    On the interpreter (CPU tensors), on ROCm, under a launch hook, or on a Triton without ``knobs.runtime``,
    every launch goes through the JIT (``_direct_launch_supported``).
    """

    def __init__(self, kernel, grid: Tuple[int, ...], options: dict, device: torch.device):
        self.kernel, self.grid = kernel, grid
        self.params = _parameters(kernel.fn)
        self.t_index = self.params.index("t")
        self.options = options  # Triton's launch options (``_launch_options``), not kernel arguments
        self.device = device
        self.direct = _direct_launch_supported(device)
        self.run_grid = tuple(grid) + (1,) * (3 - len(grid))  # what a variant's launcher takes: three dimensions
        self.variants: Dict[object, Tuple[object, list]] = {}  # key -> (compiled variant, bound arguments)

    def __call__(self, key, t: int, make_args: Callable[[], dict]) -> None:
        """Launch for step ``t``; ``make_args()``: every kernel argument by name (``t`` included), called only
        where this launcher has not launched ``key`` yet."""
        if not self.direct or _DIRECT_LAUNCH["broken"] is not None:
            self._jit_launch(make_args())
            return
        variant = self.variants.get(key)
        if variant is None:
            args = make_args()
            values = [args[name] for name in self.params]
            known = (self.kernel, self.device, tuple(sorted(self.options.items())),
                     _variant_key(values, _runtime_positions(self.kernel.fn)))  # fmt: skip
            compiled = _VARIANTS.get(known)
            if compiled is None:  # through the JIT, which compiles the variant if it has not yet
                compiled = self._jit_launch(args)
                if compiled is not None:
                    _VARIANTS[known] = compiled
                    self.variants[key] = (compiled, values)
                return
            variant = self.variants[key] = (compiled, values)
        compiled, values = variant
        values[self.t_index] = t
        try:
            compiled.run(*self.run_grid, _current_stream(self.device), compiled.function, compiled.packed_metadata,
                         None, None, None, *values)  # fmt: skip
        except (AttributeError, TypeError) as e:  # a Triton whose launcher takes other arguments
            _DIRECT_LAUNCH["broken"] = e
            logger.warning("Triton step: launching compiled kernels directly failed (%r); every step launches "
                           "through Triton's JIT from now on", e)  # fmt: skip
            self._jit_launch(make_args())

    def _jit_launch(self, args: dict):
        """Launch through Triton's JIT; returns the compiled variant it ran (None where a hook stopped it)."""
        return self.kernel[self.grid](**args, **self.options)


# ------------------------------------------------------------------------------------------- tile sizes


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one call: rows per program, forward h units per program (BLOCK_J) and contraction chunk
    (BLOCK_U), backward r units per program (BLOCK_R) and contraction chunk (BLOCK_N), and the warps of a
    forward and of a backward program."""

    BLOCK_B: int
    BLOCK_J: int
    BLOCK_U: int
    BLOCK_R: int
    BLOCK_N: int
    forward_warps: int
    backward_warps: int


MIN_TILE = 16  # tl.dot's smallest operand side on NVIDIA GPUs


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def tile_sizes(B: int, K: int, Hk: int, half: bool, processors: Optional[int]) -> Tiles:
    """The fixed tile rule. processors: the GPU's multiprocessor count, or None for the interpreter, which takes
    the smallest tiles (the most tiles, edges and loop iterations per size, at the least cost per program).

    On a GPU: rows in tiles of up to 64 (at least 32 when B >= 32, so the weights are read at most B/32 times
    per step), units in tiles of 32 halved until the grid has a program per multiprocessor, then rows halved
    the same way; contraction chunks of 64 (32 in float32, whose tiles take twice the registers; forward at most
    Hk rounded up to a power of two). Warps: one per 128 tile elements forward, per 256 backward, at least 4;
    with these, ptxas (Triton 3.9, sm_90a) reports no register spills for any of the tiles, where 64 x 64 tiles
    or fewer warps spill. Not tuned by timing."""
    if processors is None:
        return Tiles(MIN_TILE, MIN_TILE, MIN_TILE, MIN_TILE, MIN_TILE, 4, 4)
    block_b = min(64, max(MIN_TILE, _pow2(B)))
    block_j = min(32, max(MIN_TILE, _pow2(Hk)))

    def programs(bb, bj):
        return K * -(-B // bb) * -(-Hk // bj)

    while block_j > MIN_TILE and programs(block_b, block_j) < processors:
        block_j //= 2
    floor_b = 32 if B >= 32 else MIN_TILE
    while block_b > floor_b and programs(block_b, block_j) < processors:
        block_b //= 2
    chunk = 64 if half else 32
    tile = block_b * block_j
    return Tiles(block_b, block_j, min(chunk, max(MIN_TILE, _pow2(Hk))), block_j, chunk, max(4, tile // 128),
                 max(4, tile // 256))  # fmt: skip


def _tiles(x: Tensor, B: int, K: int, Hk: int) -> Tiles:
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
    return tile_sizes(B, K, Hk, x.dtype in HALF, processors)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _resident_programs(device: torch.device) -> int:
    """How many programs of a loop kernel's launch may spin on its grid barrier: one per multiprocessor on a
    GPU (a program needs no more than one multiprocessor holds, so all run at once), one on the interpreter,
    which runs programs one after another (a second one would wait for a barrier the first never leaves)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_options(num_warps: int, loop: bool = False) -> dict:
    """Triton's options of a launch (not kernel arguments): the warps of a program; fused multiply-adds on, as
    every kernel here was measured with (Triton's default through 3.9, which warns that 3.10 turns it off); and for
    a loop kernel a cooperative launch, with which the driver runs every program of the grid at once or refuses
    the launch, where a program left waiting for a multiprocessor would hold the others at the grid barrier."""
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return {**options, "launch_cooperative_grid": True} if loop else options


def _dot_options(x: Tensor) -> dict:
    """The products' constexpr flags: float32 operands under the interpreter (no bfloat16 products there), and
    float32 products in full precision unless PyTorch's matmul flag allows TF32."""
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": not x.is_cuda, "PRECISION": "tf32" if tf32 else "ieee"}


# ------------------------------------------------------------------------------------------------ checks


def _check(t: Optional[Tensor], name: str, shape: Tuple[int, ...], dtype: torch.dtype, device) -> None:
    """ValueError naming the buffer unless ``t`` is a contiguous tensor of this shape, dtype and device: the
    kernels compute every address from the sizes."""
    if t is None:
        return
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"Triton step: {name} must be {dtype} on {device}, got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"Triton step: {name} must be contiguous {shape}, got {tuple(t.shape)} strides {t.stride()}")


def _group_views(G, T: int, B: int, G4: int) -> Tensor:
    """The K input projections (T x B x 4H/K each) as one K x T x B x 4H/K tensor: a view where they are
    consecutive slices of one buffer (``products.input_projections`` writes aten's so), else one copy (oneDNN's
    products, separate tensors, on CPU tensors under Triton's interpreter)."""
    K, first = len(G), G[0]
    for k, g in enumerate(G):
        if not g.is_contiguous() or g.data_ptr() != first.data_ptr() + k * T * B * G4 * g.element_size():
            return torch.stack(G)  # K x (T x B x 4H/K) -> K x T x B x 4H/K
    return first.as_strided((K, T, B, G4), (T * B * G4, B * G4, G4, 1))


# --------------------------------------------------------------------------------------------------- step


class TritonStep(Step):
    """A fused call's steps on the Triton kernels (module docstring).

    Reads and writes ``StepBuffers`` as ``TorchStep`` does, except: C, Q, QC, F are float32 for float16 and
    bfloat16 inputs; the forward writes ``out`` itself; the backward keeps dc in r order until
    ``finish_backward``, and its loop places the final states' gradients itself (``_final_states_in``), so it has
    no ``backward_step``. It prepares its own weight layouts, so ``Step.__init__``'s products are not made.
    """

    def __init__(self, buf: StepBuffers, forward: bool, loops: str = "steps"):  # no super().__init__ (products)
        b = buf
        if loops not in LOOPS:
            raise ValueError(f"Triton step: loops must be one of {', '.join(LOOPS)}, got {loops!r}")
        self.graphs = loops == "graphs"  # replay the loops as CUDA graphs (LoopGraphs)
        self.persistent = loops == "persistent"  # one launch per loop (module docstring)
        x = b.x
        if x.dtype not in DTYPES:
            raise ValueError(f"Triton step: inputs must be float32, bfloat16 or float16, got {x.dtype}")
        self.buf = b
        K, T, B, Hk = b.K, b.T, b.B, b.Hk
        G4, state = 4 * Hk, torch.float32
        self.h_shape = (K, B, K, Hk // K) if b.shuffle else (K, B, 1, Hk)
        self.dr: Optional[Tensor] = None
        self.dc = None  # backward: dc_0 in h order once finish_backward has run
        tiles = _tiles(x, B, K, Hk)
        dev, dt = x.device, x.dtype
        _check(b.R, "R", (K, T + 1, B, Hk), dt, dev)
        _check(b.rm, "recurrent dropout mask", (K, B, Hk), dt, dev)
        _check(b.Q, "Q", (K, T, B, G4), state, dev)
        _check(b.QC, "QC", (K, T, B, Hk), state, dev)
        _check(b.F, "F", (K, T, B, Hk), state, dev)
        common = {"SHUFFLE": b.shuffle, "HAS_RM": b.rm is not None, **_dot_options(x)}
        self.sizes = (T, B, K, Hk)
        if forward:
            _check(b.C, "C", (K, T + 1, B, Hk), state, dev)
            _check(b.out, "out", (T, B, K * Hk), dt, dev)
            _check(b.w_hh, "w_hh", (K, G4, Hk), dt, dev)
            grid = (K, _cdiv(B, tiles.BLOCK_B), _cdiv(Hk, tiles.BLOCK_J))
            self.launch = StepLauncher(_kernel("forward", not x.is_cuda), grid, _launch_options(tiles.forward_warps),
                                       dev)  # fmt: skip
            self.w_t = b.w_hh.transpose(1, 2).contiguous()  # K x 4H/K x H/K -> K x H/K x 4H/K
            self.G = _group_views(b.G, T, B, G4)  # K x T x B x 4H/K
            # R[:, 1:] and C[:, 1:]: step t writes h_t and c_t at index t of these views
            self.args = (self.G, b.R, b.R[:, 1:], self.w_t, b.rm, b.C, b.C[:, 1:], b.Q, b.QC, b.F, b.out)
            self.strides = ((T + 1) * B * Hk, (T + 1) * B * Hk)  # group strides of R and C
            self.flags = {**common, "SAVE": b.Q is not None, "HAS_PRODUCT": True, "HAS_OUT": True,
                          "SCALE_G": False, "BLOCK_B": tiles.BLOCK_B, "BLOCK_J": tiles.BLOCK_J,
                          "BLOCK_U": tiles.BLOCK_U}  # fmt: skip
        else:
            _check(b.DG, "DG", (K, T, B, G4), dt, dev)
            _check(b.d_out, "output gradient", (T, B, K * Hk), dt, dev)
            self.w = b.w_hh_grad.contiguous()  # K x 4H/K x H/K
            _check(self.w, "w_hh", (K, G4, Hk), dt, dev)
            grid = (K, _cdiv(B, tiles.BLOCK_B), _cdiv(Hk, tiles.BLOCK_R))
            self.launch = StepLauncher(_kernel("backward", not x.is_cuda), grid, _launch_options(tiles.backward_warps),
                                       dev)  # fmt: skip
            self.dc_r = torch.zeros(K, B, Hk, dtype=state, device=dev)  # dc_t in r order
            self.dy = b.d_out  # T x B x H, or a float32 copy once a final state's gradient is added
            self.dy_own = False
            self.flags = {**common, "BLOCK_B": tiles.BLOCK_B, "BLOCK_R": tiles.BLOCK_R, "BLOCK_N": tiles.BLOCK_N}

    def forward_step(self, t: int) -> None:
        self.launch("forward", t, lambda: {**self._named(*self.args, t, *self.sizes, *self.strides), **self.flags})

    def _launch_loop(self, name: str, pointers: tuple, t: int, sizes: tuple, flags: dict) -> None:
        """One launch of kernel ``name`` (forward_loop, backward_loop) for a whole loop of T steps from step t,
        on as many programs as can be resident at once, at most one per tile of a step. The kernel's arguments:
        ``pointers``, the barrier's counter, t, the step count T, ``sizes``, this step's flags and ``flags``."""
        device = self.buf.x.device
        grid = (min(math.prod(self.launch.grid), _resident_programs(device)),)
        options = _launch_options(self.launch.options["num_warps"], loop=True)
        launch = StepLauncher(_kernel(name, not self.buf.x.is_cuda), grid, options, device)
        sync = torch.zeros(1, dtype=torch.int32, device=device)  # the grid barrier's counter
        values = (*pointers, sync, t, self.sizes[0], *sizes)
        try:
            launch("loop", t, lambda: {**dict(zip(launch.params, values)), **self.flags, **flags})
        except RuntimeError as e:  # e.g. the driver's refusal of a cooperative launch it cannot run at once
            raise RuntimeError(f"--grnn-persistent-loops: launching the {name} kernel on {grid[0]} programs "
                               f"failed ({e}); train without the flag") from e

    def _named(self, *args) -> dict:
        """The kernel's leading positional arguments by name."""
        return dict(zip(self.launch.params, args))

    def _launch_backward(self, t: int, pointwise: bool, dr: Optional[Tensor]) -> None:
        T, B, K, Hk = self.sizes
        has_next = t + 1 < T

        def args():
            b, has_dy = self.buf, self.dy is not None
            return {**self._named(
                b.DG, self.w, b.Q, b.QC, b.F, self.dc_r, self.dc_r, self.dy if has_dy else None, b.rm, dr,
                t, T, B, K, Hk, B * K * Hk, K * Hk, Hk,  # dy: T x B x H, element [t, b, k, j]
            ), "HAS_NEXT": has_next, "POINTWISE": pointwise, "HAS_DY": has_dy, **self.flags}  # fmt: skip

        # every argument but t is the same for launches of one key (dy changes once, when _own_dy copies it)
        self.launch((has_next, pointwise, self.dy_own, dr is None), t, args)

    def _own_dy(self) -> Tensor:
        """The output gradient as a float32 copy of this step's own (zeros without one), which final-state
        gradients can be added into: T x B x H."""
        if not self.dy_own:
            T, B, K, Hk = self.sizes
            self.dy = (torch.zeros(T, B, K * Hk, dtype=torch.float32, device=self.buf.x.device) if self.dy is None
                       else self.dy.to(torch.float32, copy=True))  # fmt: skip
            self.dy_own = True
        return self.dy

    def _add_dc(self, dc_add: Tensor) -> None:
        """dc_add (K x B x H/K, h order) into dc's r-order slots."""
        K, shuffle = self.buf.K, self.buf.shuffle
        _h_view(self.dc_r.unsqueeze(1), K, shuffle).squeeze(1).add_(_h_split(dc_add, K, shuffle))

    def forward_loop(self) -> None:
        if self.persistent:
            if self.sizes[0]:
                self._launch_loop("forward_loop", self.args, 0, (*self.sizes, *self.strides), {})
            return self.finish_forward()
        if not self.graphs:
            return super().forward_loop()
        b = self.buf
        key = ("forward", self.sizes, tuple(sorted(self.flags.items())), b.Q is not None, b.x.dtype, b.x.device)
        if not LOOP_GRAPHS.begin(key, b.x.is_cuda):
            return super().forward_loop()

        def make():  # the graph's own buffers, of this call's shapes
            own = StepBuffers(x=_stand_in(b.x), K=b.K, T=b.T, B=b.B, Hk=b.Hk, shuffle=b.shuffle,
                              R=torch.empty_like(b.R), Q=_like(b.Q), QC=_like(b.QC), F=_like(b.F), rm=_like(b.rm),
                              w_hh=b.w_hh, G=list(torch.empty_like(self.G).unbind(0)),  # K x (T x B x 4H/K)
                              C=torch.empty_like(b.C), out=torch.empty_like(b.out))  # fmt: skip
            step = TritonStep(own, forward=True)
            return step, lambda: Step.forward_loop(step)

        def copy_in(step):
            step.G.copy_(self.G)
            step.w_t.copy_(self.w_t)
            step.buf.R[:, 0].copy_(b.R[:, 0])
            step.buf.C[:, 0].copy_(b.C[:, 0])
            _copy(step.buf.rm, b.rm)

        def copy_out(step):
            own = step.buf
            b.R[:, 1:].copy_(own.R[:, 1:])
            b.C[:, 1:].copy_(own.C[:, 1:])
            b.out.copy_(own.out)
            for mine, theirs in ((b.Q, own.Q), (b.QC, own.QC), (b.F, own.F)):
                _copy(mine, theirs)

        LOOP_GRAPHS.run(key, make, copy_in, copy_out, b.x.is_cuda)

    def _final_states_in(self, lengths: Optional[Tensor], dhn: Optional[Tensor],
                         dcn: Optional[Tensor]) -> Optional[Tensor]:  # fmt: skip
        """The final states' gradients for a loop that adds them at each row's last step itself: dh_n into a
        float32 copy of the output gradient, dc_n into the returned DC (T x K x B x H/K, h order; None without
        dc_n). Each row's last step is lengths[b] - 1 (T - 1 without lengths), placed on the device without
        reading lengths back; the rows of length 0 are the caller's. Arguments as ``Step.backward_loop``'s."""
        T, B, K, Hk = self.sizes
        if dhn is None and dcn is None:
            return None
        rows = torch.arange(B, device=self.buf.x.device)  # B
        if lengths is None:
            at, keep = rows.new_full((B,), T - 1), None  # B: each row's last step
        else:  # the empty rows add zeros (at step 0)
            at, keep = (lengths - 1).clamp(min=0), (lengths > 0).view(B, 1, 1)

        def placed(d: Tensor) -> Tensor:  # K x B x H/K -> B x K x H/K, float32, zero in the empty rows
            d = d.transpose(0, 1).float()
            return d if keep is None else d * keep

        if dhn is not None:
            self._own_dy().view(T, B, K, Hk).index_put_((at, rows), placed(dhn), accumulate=True)
        if dcn is None:
            return None
        DC = torch.zeros(T, K, B, Hk, dtype=torch.float32, device=rows.device)
        DC.permute(0, 2, 1, 3).index_put_((at, rows), placed(dcn))  # T x B x K x H/K view
        return DC

    def _backward_launches(self, DC: Optional[Tensor]) -> None:
        """Every backward step's launch, last first; DC[t] (``_final_states_in``) enters dc before step t's."""
        for t in range(self.sizes[0] - 1, -1, -1):
            if DC is not None:
                self._add_dc(DC[t])
            self._launch_backward(t, True, None)

    def backward_loop(self, lengths, dhn, dcn) -> None:
        if self.sizes[0] == 0:
            return  # no step: the final states' gradients are the caller's (the rows of length 0)
        if self.persistent:
            return self._persistent_backward(lengths, dhn, dcn)
        if not self.graphs:
            return self._backward_launches(self._final_states_in(lengths, dhn, dcn))
        b = self.buf
        T, B, K, Hk = self.sizes
        # the output gradient's dtype in the loop: float32 once dh_n entered (below), and whether DC is made
        dy_dtype = torch.float32 if dhn is not None else None if self.dy is None else self.dy.dtype
        key = ("backward", self.sizes, tuple(sorted(self.flags.items())), dy_dtype, dcn is not None, b.x.dtype,
               b.x.device)  # fmt: skip
        DC = self._final_states_in(lengths, dhn, dcn)  # added to dc before each step's launch
        if not LOOP_GRAPHS.begin(key, b.x.is_cuda):
            return self._backward_launches(DC)
        assert dy_dtype == (None if self.dy is None else self.dy.dtype)

        def make():  # the graph's own buffers, of this call's shapes (R only for the checks: backward reads none)
            own = StepBuffers(x=_stand_in(b.x), K=K, T=T, B=B, Hk=Hk, shuffle=b.shuffle, R=b.R,
                              Q=torch.empty_like(b.Q), QC=torch.empty_like(b.QC), F=torch.empty_like(b.F),
                              rm=_like(b.rm), w_hh_grad=torch.empty_like(self.w), DG=torch.empty_like(b.DG))
            step = TritonStep(own, forward=False)
            step.dy, step.DC = _like(self.dy), _like(DC)  # the output gradient, float32 once dh_n entered

            def loop():
                step.dc_r.zero_()
                step._backward_launches(step.DC)

            return step, loop

        def copy_in(step):
            own = step.buf
            for mine, theirs in ((own.Q, b.Q), (own.QC, b.QC), (own.F, b.F), (step.w, self.w), (own.rm, b.rm),
                                 (step.dy, self.dy), (step.DC, DC)):  # fmt: skip
                _copy(mine, theirs)

        def copy_out(step):
            b.DG.copy_(step.buf.DG)
            self.dc_r.copy_(step.dc_r)

        LOOP_GRAPHS.run(key, make, copy_in, copy_out, b.x.is_cuda)

    def _persistent_backward(self, lengths, dhn, dcn) -> None:
        T, B, K, Hk = self.sizes
        DC = self._final_states_in(lengths, dhn, dcn)
        b = self.buf
        self._launch_loop("backward_loop", (b.DG, self.w, b.Q, b.QC, b.F, self.dc_r, self.dy, b.rm, DC), T - 1,
                          (T, B, K, Hk, B * K * Hk, K * Hk, Hk),  # dy: T x B x H, element [t, b, k, j]
                          {"HAS_DY": self.dy is not None, "HAS_DC_ADD": DC is not None})  # fmt: skip

    def finish_backward(self) -> Optional[Tensor]:
        b = self.buf
        K, B, Hk = b.K, b.B, b.Hk
        self.dc = torch.empty(K, B, Hk, dtype=torch.float32, device=b.x.device)  # dc_0, r order -> h order
        self.dc.view(self.h_shape).copy_(_h_view(self.dc_r.unsqueeze(1), K, b.shuffle).squeeze(1))
        if b.T == 0:
            return None
        self.dr = torch.empty(K, B, Hk, dtype=torch.float32, device=b.x.device)
        self._launch_backward(-1, False, self.dr)  # dr_0 = DG[:, 0] @ W_hh, times the dropout mask
        return self.dr


def _stand_in(x: Tensor) -> Tensor:
    """An empty tensor of x's dtype and device: what a step reads of ``StepBuffers.x`` (not its data)."""
    return x.new_empty(0)


def _like(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else torch.empty_like(t)


def _copy(dst: Optional[Tensor], src: Optional[Tensor]) -> None:
    if dst is not None:
        dst.copy_(src)


class LoopGraphs:
    """CUDA graphs of fused calls' time loops (the backend's ``cuda_graphs``): a loop's T kernel launches, each
    with a Python call of its own, become one graph launch.

    A graph runs on buffers of its own, made for one key (the loop's direction, sizes, dtypes and flags):
    ``run`` copies the call's inputs into them, replays, and copies the results out, so that any number of
    calls (layers, directions, a forward not yet differentiated) can share it. ``begin`` counts a key's
    occurrences and says whether the call goes through the graph's buffers: on CUDA only once a graph is held
    or its capture is due, the second time the key occurs; the first occurrence runs eagerly on the call's own
    buffers, without copies, so a shape seen once costs nothing. At most ``max_graphs`` graphs and
    ``max_seen`` counts are held, the least recently used dropped first; a key whose capture fails stays eager
    (logged). On CPU tensors (Triton's interpreter, the tests) every call runs eagerly on the graph's buffers,
    copies included, and nothing is captured.
    """

    def __init__(self, max_graphs: int = 32, max_seen: int = 4096):
        self.max_graphs, self.max_seen = max_graphs, max_seen
        self.lock = threading.Lock()
        self.seen: "collections.OrderedDict[tuple, int]" = collections.OrderedDict()
        self.failed: Set[tuple] = set()
        self.captured = 0  # graphs captured so far
        self.graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()

    def begin(self, key: tuple, cuda: bool) -> bool:
        """Counts an occurrence of ``key``; True: run the call with ``run``, False: eagerly on its own buffers."""
        with self.lock:
            seen = self.seen[key] = self.seen.get(key, 0) + 1
            self.seen.move_to_end(key)
            while len(self.seen) > self.max_seen:
                self.seen.popitem(last=False)
            return not cuda or key in self.graphs or (seen >= 2 and key not in self.failed)

    def run(self, key: tuple, make: Callable, copy_in: Callable, copy_out: Callable, cuda: bool) -> None:
        """After ``begin`` said so: replay the key's graph, or capture it (on CUDA) after an eager run on its
        buffers. make() -> (step, loop): a step over buffers of its own and the loop over them; copy_in(step),
        copy_out(step): the call's inputs into them and its results out."""
        with self.lock:
            entry = self.graphs.get(key)
            if entry is not None:
                self.graphs.move_to_end(key)
        if entry is None:
            step, loop = make()
            copy_in(step)
            loop()  # eagerly: it compiles the kernels, and it is the result of this call
            copy_out(step)
            if not cuda:
                return
            graph = torch.cuda.CUDAGraph()
            try:  # on a side stream of its own, the eager loop having warmed everything up; thread_local: work
                # of other threads (a data loader's) does not spoil this thread's capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    loop()
            except RuntimeError as e:  # this call's results are already out; the key stays eager
                with self.lock:
                    self.failed.add(key)
                logger.warning(f"CUDA graph capture failed, the loop runs eagerly: {str(e).splitlines()[0]}")
                return
            with self.lock:
                if self.captured == 0:
                    logger.info(f"captured a CUDA graph of a {key[0]} loop; later calls with its shapes replay it")
                self.captured += 1
                self.graphs[key] = (step, graph)
                while len(self.graphs) > self.max_graphs:
                    self.graphs.popitem(last=False)
            return
        step, graph = entry
        with self.lock:  # one call at a time on a graph's buffers
            copy_in(step)
            graph.replay()
            copy_out(step)

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()
            self.failed.clear()
            self.graphs.clear()


LOOP_GRAPHS = LoopGraphs()


# ---------------------------------------------------------------------------------------- the cell's step


class TritonCellFunction(torch.autograd.Function):
    """``GroupLSTMCell``'s pointwise step on the fused step's kernels (no recurrent product, no shuffle):
    gates K x B x 4H/K (i, f, g, o pre-activations), c K x B x H/K -> h (gates' dtype), c' (c's dtype), each
    K x B x H/K. The gate math and the saved derivatives are float32 whatever the inputs' dtype."""

    @staticmethod
    def forward(ctx, gates: Tensor, c: Tensor):
        K, B, G4 = gates.shape
        Hk = G4 // 4
        if gates.dtype not in DTYPES or c.dtype not in DTYPES or c.device != gates.device:
            raise ValueError(f"Triton cell: gates and c must be float32, bfloat16 or float16 on one device, got "
                             f"{gates.dtype} on {gates.device} and {c.dtype} on {c.device}")  # fmt: skip
        if tuple(c.shape) != (K, B, Hk):
            raise ValueError(f"Triton cell: c must be {(K, B, Hk)} for gates {tuple(gates.shape)}, "
                             f"got {tuple(c.shape)}")  # fmt: skip
        z, c = gates.contiguous(), c.contiguous()
        h, c_new = gates.new_empty(K, B, Hk), c.new_empty(K, B, Hk)
        save = any(ctx.needs_input_grad)
        f32 = {"dtype": torch.float32, "device": gates.device}
        Q, QC, F = (torch.empty(K, B, G4, **f32), torch.empty(K, B, Hk, **f32), torch.empty(K, B, Hk, **f32)) if save \
            else (None, None, None)  # fmt: skip
        tiles = _tiles(gates, B, K, Hk)
        grid = (K, _cdiv(B, tiles.BLOCK_B), _cdiv(Hk, tiles.BLOCK_J))
        # one step (T = 1, t = 0) of the forward kernel: gates as G, h_t into h, c_t into c_new
        launch = StepLauncher(_kernel("forward", not gates.is_cuda), grid, _launch_options(tiles.forward_warps),
                              gates.device)
        launch("cell", 0, lambda: {
            **dict(zip(launch.params, (z, None, h, None, None, c, c_new, Q, QC, F, None, 0, 1, B, K, Hk, B * Hk,
                                       B * Hk))),
            "SHUFFLE": False, "SAVE": save, "HAS_RM": False, "HAS_PRODUCT": False, "HAS_OUT": False, "SCALE_G": True,
            "BLOCK_B": tiles.BLOCK_B, "BLOCK_J": tiles.BLOCK_J, "BLOCK_U": tiles.BLOCK_U, **_dot_options(gates),
        })  # fmt: skip
        if save:
            ctx.save_for_backward(Q, QC, F)
            ctx.dtypes = (gates.dtype, c.dtype)
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Optional[Tensor], dc_new: Optional[Tensor]):
        Q, QC, F = ctx.saved_tensors
        K, B, G4 = Q.shape
        Hk = G4 // 4
        gates_dtype, c_dtype = ctx.dtypes
        dc = Q.new_zeros(K, B, Hk) if dc_new is None else dc_new.contiguous()  # dc_t, read
        dc_prev = torch.empty(K, B, Hk, dtype=c_dtype, device=Q.device)  # dc_{t-1}, written: no copy, no cast
        dh = None if dh is None else dh.contiguous()
        dgates = torch.empty(K, B, G4, dtype=gates_dtype, device=Q.device)
        tiles = _tiles(dgates, B, K, Hk)
        grid = (K, _cdiv(B, tiles.BLOCK_B), _cdiv(Hk, tiles.BLOCK_R))
        # one step (T = 1, t = 0) of the backward kernel without a product: dh (K x B x H/K) as the output gradient
        launch = StepLauncher(_kernel("backward", not Q.is_cuda), grid, _launch_options(tiles.backward_warps),
                              Q.device)
        launch("cell", 0, lambda: {
            **dict(zip(launch.params, (dgates, None, Q, QC, F, dc, dc_prev, dh, None, None, 0, 1, B, K, Hk, 0, Hk,
                                       B * Hk))),
            "SHUFFLE": False, "HAS_NEXT": False, "POINTWISE": True, "HAS_DY": dh is not None, "HAS_RM": False,
            "BLOCK_B": tiles.BLOCK_B, "BLOCK_R": tiles.BLOCK_R, "BLOCK_N": tiles.BLOCK_N, **_dot_options(dgates),
        })  # fmt: skip
        return dgates, dc_prev


def triton_cell(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """``steps.lstm_cell`` on the Triton kernels: gates K x B x 4H/K, c K x B x H/K -> h, c' (K x B x H/K)."""
    return TritonCellFunction.apply(gates, c)
