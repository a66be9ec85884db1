"""The time steps of the fused group LSTM behind one interface, on three kernels.

A fused call (one layer, one direction; ``fused_group_lstm.py``) owns its buffers (``StepBuffers``). A step
backend runs time step t of the forward pass, ``forward_step(t)``: the recurrent product, the four gates, the
cell, and h_t written straight into the next step's shuffled recurrent input (and, when training, the gate
derivatives the backward pass needs), and of the backward pass, ``backward_step(t, dh_add, dc_add)``: the gates'
gradient, dc_{t-1} and the gradient of the step's recurrent input. The loops around them are the same for
every backend.

* ``TorchStep``: PyTorch operations; any dtype and device. The readable one, and the reference of the others.
* ``CStep``: the C kernel (``grnn_fairseq/csrc/group_lstm_step.c``, built by setup.py as an optional extension,
  never at import, loaded with ctypes) for float32 CPU tensors: a step's pointwise work in one pass instead of
  a dozen operations. Every tensor is checked (dtype, device, contiguity, size) before a pointer to it is
  passed; per-step addresses are computed from the checked tensors' strides.
* ``TritonStep`` (``triton_step.py``): CUDA tensors, one kernel per step including the recurrent product.

``step_kind(x)`` resolves the backend's ``step`` setting for a call; ``cell_pointwise`` is the same choice for
``GroupLSTMCell``'s single step.
"""

import ctypes
import dataclasses
import importlib.machinery
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend
from .activations import tanh, tanh_into
from .functional import gate_scale
from .products import StepProducts

# ------------------------------------------------------------------------------------------ the C library

KERNEL_VERSION = 3  # grnn_kernel_version() of the C source this loader matches
_LIBRARY = "_group_lstm_step"
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _CLibrary:
    """The two C entry points with their argument types (pointers as ints, ``Tensor.data_ptr()``)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.grnn_kernel_version.restype = _i64
        version = lib.grnn_kernel_version()
        if version != KERNEL_VERSION:
            raise OSError(f"{path} is version {version}, expected {KERNEL_VERSION}: reinstall (pip install -e .)")
        self.path = path
        self.forward_step = lib.grnn_lstm_forward_step
        self.forward_step.restype = _i64
        self.forward_step.errcheck = _out_of_memory
        self.forward_step.argtypes = [_i64] * 4 + [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64,
                                                   _ptr, _ptr, _i64, _ptr, _i64]  # fmt: skip
        self.backward_step = lib.grnn_lstm_backward_step
        self.backward_step.restype = _i64
        self.backward_step.errcheck = _out_of_memory
        self.backward_step.argtypes = [_i64] * 4 + [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64,
                                                    _ptr, _ptr, _i64, _i64]  # fmt: skip


def _out_of_memory(result, func, args):
    if result != 0:
        raise MemoryError(f"{func.__name__}: out of memory for a scratch row")
    return result


def _load() -> Optional[_CLibrary]:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package, _LIBRARY + suffix)
        if os.path.exists(path):
            try:
                return _CLibrary(path)
            except OSError:  # a stale or foreign build: the PyTorch operations take over
                return None
    return None


_C = _load()


def c_kernel_available() -> bool:
    """Whether the C kernel is built and loadable."""
    return _C is not None


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """What the C code assumes of one float32 CPU tensor: shape, and which dimensions must be dense."""

    name: str
    shape: Tuple[int, ...]
    dense_from: int = 0  # dimensions dense_from... are contiguous (row-major) in memory


def _check(t: Tensor, spec: _Buffer) -> Tensor:
    """``t`` if it is what the C code expects (float32, CPU, ``spec.shape``, dense from ``spec.dense_from``), else
    ValueError naming the buffer: a wrong pointer would read or write outside the tensor."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"C kernel: {spec.name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if tuple(t.shape) != spec.shape:
        raise ValueError(f"C kernel: {spec.name} must be {spec.shape}, got {tuple(t.shape)}")
    expected = 1
    for d in range(t.dim() - 1, spec.dense_from - 1, -1):
        if t.size(d) > 1 and t.stride(d) != expected:
            raise ValueError(f"C kernel: {spec.name} must be contiguous from dimension {spec.dense_from}, "
                             f"got strides {t.stride()}")  # fmt: skip
        expected *= t.size(d)
    return t


def _pointers(tensors: Sequence[Tensor]):
    """A C array of the tensors' data pointers (``const float *const *``); keep the tensors alive meanwhile."""
    return (_ptr * len(tensors))(*[t.data_ptr() for t in tensors])


# ------------------------------------------------------------------------------------------- the interface


@dataclasses.dataclass
class StepBuffers:
    """The buffers of one fused call (one layer and direction), shared by its forward and backward loops.

    Sizes: K groups of H/K = Hk units, T steps, B rows; G4 = 4 Hk. Gate order i, f, g, o; the g pre-activation is
    doubled (its rows of W and its bias) so that tanh(z) = 2 sigmoid(2z) - 1 shares the gates' sigmoid.

    x: the layer input (decides the products' kernels). w_hh: K x G4 x Hk with g rows doubled (forward), w_hh_grad:
    the unscaled weight (backward). G: K tensors T x B x G4, the input projections with the biases. R: K x (T+1) x
    B x Hk, R[:, t] the recurrent input of step t in r order (group k' holds chunk k' of shuffle(h_{t-1})).
    C: K x (T+1) x B x Hk, C[:, t + 1] = c_t. Q (K x T x B x G4), QC, F (K x T x B x Hk): what backward needs, or
    None: d pre-activation = dc * Q for i, f, g and dh * Q for o; dc += dh * QC; dc_{t-1} = dc_t * F. rm: the
    recurrent dropout mask in r order, K x B x Hk, or None. out: T x B x H, h_t in plain order.
    """

    x: Tensor
    K: int
    T: int
    B: int
    Hk: int
    shuffle: bool
    R: Tensor
    Q: Optional[Tensor] = None
    QC: Optional[Tensor] = None
    F: Optional[Tensor] = None
    rm: Optional[Tensor] = None
    w_hh: Optional[Tensor] = None
    G: Optional[List[Tensor]] = None
    C: Optional[Tensor] = None
    out: Optional[Tensor] = None
    w_hh_grad: Optional[Tensor] = None
    d_out: Optional[Tensor] = None  # backward: T x B x H (contiguous) or None
    DG: Optional[Tensor] = None  # backward: K x T x B x G4, the gates' gradients, written


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


class Step:
    """One backend's forward or backward time steps over ``StepBuffers`` (module docstring)."""

    def __init__(self, buf: StepBuffers, forward: bool):
        self.buf = buf
        b = buf
        self.h_shape = (b.K, b.B, b.K, b.Hk // b.K) if b.shuffle else (b.K, b.B, 1, b.Hk)  # h order, split as r
        self.products = StepProducts(b.x, b.w_hh if forward else None, None if forward else b.w_hh_grad, b.B)
        step = (b.K, b.B, b.Hk)
        self.dc = b.x.new_zeros(step)  # backward: dc_t
        self.dr: Optional[Tensor] = None  # backward: the gradient of step t + 1's recurrent input (r order, x rm)

    def forward_step(self, t: int) -> None:
        raise NotImplementedError

    def finish_forward(self) -> None:
        """After the last forward step: whatever the step did not write itself (``buf.out``)."""

    def backward_step(self, t: int, dh_add: Optional[Tensor], dc_add: Optional[Tensor]) -> None:
        """dh_add, dc_add: K x B x H/K in h order, gradients of h_t and c_t from outside (h_n and c_n of the
        sequences whose last step is t), or None."""
        raise NotImplementedError

    def finish_backward(self) -> Optional[Tensor]:
        """The gradient of step 0's recurrent input (K x B x H/K, r order, times the dropout mask) or None when
        T = 0; ``self.dc`` then holds dc_0."""
        return self.dr

    def forward_loop(self) -> None:
        """Every forward step, then ``finish_forward``."""
        for t in range(self.buf.T):
            self.forward_step(t)
        self.finish_forward()

    def backward_loop(self, lengths: Optional[Tensor], dhn: Optional[Tensor], dcn: Optional[Tensor]) -> None:
        """Every backward step, last first. dhn, dcn: K x B x H/K (h order), the gradients of h_n and c_n, or
        None; they enter at each row's last step, lengths[b] - 1 (T - 1 without lengths; the rows of length 0
        are the caller's). Finding the rows that end at each step reads lengths on the host: on a GPU that
        waits for the queued kernels (the Triton step places the gradients without reading them)."""
        b = self.buf
        ends = _sequence_ends(lengths, b.T, b.B, b.x.device) if dhn is not None or dcn is not None else None
        for t in range(b.T - 1, -1, -1):
            done = None if ends is None else ends[t + 1]
            dh_add = dc_add = None
            if done is not None:
                if dhn is not None:
                    dh_add = b.x.new_zeros(b.K, b.B, b.Hk).index_copy_(1, done, dhn.index_select(1, done))
                if dcn is not None:
                    dc_add = b.x.new_zeros(b.K, b.B, b.Hk).index_copy_(1, done, dcn.index_select(1, done))
            self.backward_step(t, dh_add, dc_add)


def _sequence_ends(lengths: Optional[Tensor], T: int, B: int, device) -> List[Optional[Tensor]]:
    """ends[t + 1]: the rows (B, long) whose sequence's last step is t (ends[0]: empty sequences), or None."""
    ends: List[Optional[Tensor]] = [None] * (T + 1)
    if lengths is None:
        ends[T] = torch.arange(B, device=device)
        return ends
    by_length: List[List[int]] = [[] for _ in range(T + 1)]
    for b, n in enumerate(lengths.tolist()):
        by_length[n].append(b)
    return [torch.tensor(e, device=device) if e else None for e in by_length]


class TorchStep(Step):
    """A step in PyTorch operations (module docstring)."""

    def __init__(self, buf: StepBuffers, forward: bool):
        super().__init__(buf, forward)
        b, step = buf, (buf.K, buf.B, buf.Hk)
        self.gbuf = b.x.new_empty(b.K, b.B, 4 * b.Hk)
        self.rin, self.tc = b.x.new_empty(step), b.x.new_empty(step)
        self.dh, self.dc_prev, self.dr_buf = b.x.new_empty(step), b.x.new_empty(step), b.x.new_empty(step)
        if forward:
            self.Rh = _h_view(b.R, b.K, b.shuffle)  # K x (T+1) x B x K' x H/K/K', indexed in h order
        if not forward and b.d_out is not None:  # T x B x H -> K x T x B x H/K, read step by step
            self.dy = b.d_out.view(b.T, b.B, b.K, b.Hk).permute(2, 0, 1, 3)
        else:
            self.dy = None

    def forward_step(self, t: int) -> None:
        b = self.buf
        r = b.R[:, t]  # K x B x H/K
        if b.rm is not None:
            r = torch.mul(r, b.rm, out=self.rin)
        self.products.forward(r, [g[t] for g in b.G], self.gbuf).sigmoid_()
        i, f, g, o = self.gbuf.chunk(4, dim=-1)  # each K x B x H/K
        if b.Q is not None:
            q = torch.addcmul(self.gbuf, self.gbuf, self.gbuf, value=-1, out=b.Q[:, t])  # s (1 - s), all gates
        g.mul_(2).sub_(1)  # tanh
        c = torch.mul(f, b.C[:, t], out=b.C[:, t + 1])
        c.addcmul_(i, g)  # c_t = f * c_{t-1} + i * g
        tanh_into(c, self.tc)
        torch.mul(o.reshape(self.h_shape), self.tc.view(self.h_shape), out=self.Rh[:, t + 1])  # h_t, shuffled slot
        if b.Q is not None:
            qi, qf, qg, qo = q.chunk(4, dim=-1)
            qi.mul_(g)  # g i (1 - i)
            qf.mul_(b.C[:, t])  # c_{t-1} f (1 - f)
            qg.mul_(i).mul_(4)  # i (1 - g^2) = 4 i s (1 - s)
            qo.mul_(self.tc)  # tanh(c) o (1 - o)
            qc = torch.mul(self.tc, self.tc, out=b.QC[:, t])
            torch.addcmul(o, o, qc, value=-1, out=qc)  # o (1 - tanh^2 c)
            b.F[:, t].copy_(f)

    def finish_forward(self) -> None:
        b = self.buf  # outputs in plain order: K x T x B x K' x H/K/K' -> T x B x K x K' x H/K/K' -> T x B x H
        b.out.view(b.T, b.B, b.K, *self.h_shape[2:]).copy_(self.Rh[:, 1:].permute(1, 2, 0, 3, 4))

    def backward_step(self, t: int, dh_add: Optional[Tensor], dc_add: Optional[Tensor]) -> None:
        b, dh, s = self.buf, self.dh, self.h_shape
        Hk = b.Hk
        # dh_t = d out_t + unshuffle(dr_{t+1}) (+ dh_n of the sequences ending at t)
        if self.dr is None:
            dh.zero_() if self.dy is None else dh.copy_(self.dy[:, t])
        else:
            carry = _h_view(self.dr.unsqueeze(1), b.K, b.shuffle).squeeze(1)  # r order read in h order
            if self.dy is None:
                dh.view(s).copy_(carry)
            else:
                torch.add(self.dy[:, t].view(s), carry, out=dh.view(s))
        if dh_add is not None:
            dh.add_(dh_add)
        if dc_add is not None:
            self.dc.add_(dc_add)
        q, dg = b.Q[:, t], b.DG[:, t]  # K x B x 4H/K
        torch.mul(q[..., 3 * Hk :], dh, out=dg[..., 3 * Hk :])  # o
        self.dc.addcmul_(dh, b.QC[:, t])
        ifg = (b.K, b.B, 3, Hk)
        torch.mul(q[..., : 3 * Hk].view(ifg), self.dc.unsqueeze(2), out=dg[..., : 3 * Hk].view(ifg))  # i, f, g
        torch.mul(self.dc, b.F[:, t], out=self.dc_prev)  # dc_{t-1} = dc_t * f
        self.dc, self.dc_prev = self.dc_prev, self.dc
        self.dr = self.products.backward(dg, self.dr_buf)  # K x B x H/K
        if b.rm is not None:
            self.dr.mul_(b.rm)


class CStep(Step):
    """A step's pointwise work on the C kernel (module docstring); the products as ``TorchStep``'s."""

    def __init__(self, buf: StepBuffers, forward: bool):
        if _C is None:
            raise RuntimeError("the C step kernel is not built: reinstall with a C compiler (pip install -e .) "
                               "or choose --grnn-step torch")  # fmt: skip
        super().__init__(buf, forward)
        b = buf
        K, T, B, Hk = b.K, b.T, b.B, b.Hk
        G4, e, step = 4 * Hk, 4, (K, B, Hk)
        self.threads = torch.get_num_threads()
        self.step_shape = step
        _check(b.R, _Buffer("R", (K, T + 1, B, Hk), 1))  # per group: T+1 steps of B x Hk, dense
        r0, rs = b.R.data_ptr(), b.R.stride(1) * e  # step t: base + t * stride
        self.R_gs = b.R.stride(0)
        self.Rs = b.R.unbind(1)  # T+1 x (K x B x H/K)
        if b.rm is not None:
            _check(b.rm, _Buffer("recurrent dropout mask", step))
        if b.Q is not None:
            _check(b.Q, _Buffer("Q", (K, T, B, G4), 1))
            _check(b.QC, _Buffer("QC", (K, T, B, Hk), 1))
            _check(b.F, _Buffer("F", (K, T, B, Hk), 1))
            if b.QC.stride() != b.F.stride():
                raise ValueError("C kernel: QC and F must have the same strides")
            self.q0, self.qs, self.q_gs = b.Q.data_ptr(), b.Q.stride(1) * e, b.Q.stride(0)
            self.qc0, self.f0, self.ss, self.s_gs = b.QC.data_ptr(), b.F.data_ptr(), b.QC.stride(1) * e, b.QC.stride(0)
        if forward:
            self.rin = b.x.new_empty(step)
            self.gbuf = b.x.new_empty(K, B, G4)
            for k, g in enumerate(b.G):
                _check(g, _Buffer(f"input projection of group {k}", (T, B, G4)))
            _check(b.C, _Buffer("C", (K, T + 1, B, Hk), 1))
            _check(b.out, _Buffer("out", (T, B, K * Hk)))
            self.c0, self.cs, self.c_gs = b.C.data_ptr(), b.C.stride(1) * e, b.C.stride(0)
            self.r0, self.rs = r0, rs
            self.o0, self.os = b.out.data_ptr(), b.out.stride(0) * e
            self.g_arr = _pointers(b.G)  # step t's input projections: G[k] + t*B*G4 (x_off)
            self.z_arr = _pointers(self.gbuf.unbind(0))  # the bmm path's products land in gbuf, K x B x 4H/K
        else:
            _check(b.DG, _Buffer("DG", (K, T, B, G4), 1))
            self.dg0, self.dgs, self.dg_gs = b.DG.data_ptr(), b.DG.stride(1) * e, b.DG.stride(0)
            self.DGs = b.DG.unbind(1)  # T x (K x B x 4H/K)
            if b.d_out is not None:
                _check(b.d_out, _Buffer("output gradient", (T, B, K * Hk)))
                self.dy0, self.dys = b.d_out.data_ptr(), b.d_out.stride(0) * e
            else:
                self.dy0, self.dys = None, 0
            self.dr_buf = b.x.new_empty(step)
            self.dr_arr = _pointers(self.dr_buf.unbind(0))  # the bmm path's dr lands in dr_buf
            self.dr_step = None  # the pointers of dr_{t+1} for the kernel, None at the last step

    def forward_step(self, t: int) -> None:
        b, K, B, Hk = self.buf, self.buf.K, self.buf.B, self.buf.Hk
        G4 = 4 * Hk
        r = self.Rs[t] if b.rm is None else torch.mul(self.Rs[t], b.rm, out=self.rin)  # K x B x H/K
        if self.products.onednn:  # oneDNN adds the input projections itself: K new tensors B x 4H/K
            z = self.products.parts(r, [g[t] for g in b.G], self.gbuf)[0]
            for k, zk in enumerate(z):
                _check(zk, _Buffer(f"pre-activations of group {k}", (B, G4)))
            z_step, x_step = _pointers(z), None
        else:
            torch.bmm(r, self.products.w_t, out=self.gbuf)  # K x B x H/K @ K x H/K x 4H/K -> K x B x 4H/K
            z_step, x_step = self.z_arr, self.g_arr
        save = b.Q is not None
        _C.forward_step(
            K, B, Hk, int(b.shuffle), z_step, x_step, t * B * G4, G4, self.c0 + t * self.cs,
            self.c0 + (t + 1) * self.cs, self.c_gs, self.r0 + (t + 1) * self.rs, self.R_gs,
            self.q0 + t * self.qs if save else None, self.q_gs if save else 0,
            self.qc0 + t * self.ss if save else None, self.f0 + t * self.ss if save else None,
            self.s_gs if save else 0, self.o0 + t * self.os, self.threads,
        )  # fmt: skip
        del z_step  # (oneDNN's step outputs live until the kernel has read them)

    def backward_step(self, t: int, dh_add: Optional[Tensor], dc_add: Optional[Tensor]) -> None:
        b, K, B, Hk = self.buf, self.buf.K, self.buf.B, self.buf.Hk
        if dh_add is not None:
            _check(dh_add, _Buffer("gradient of h_n", self.step_shape))
        if dc_add is not None:
            self.dc.add_(dc_add)
        _C.backward_step(
            K, B, Hk, int(b.shuffle), None if self.dy0 is None else self.dy0 + t * self.dys, Hk, K * Hk,
            self.dr_step, None if b.rm is None else b.rm.data_ptr(), None if dh_add is None else dh_add.data_ptr(),
            self.q0 + t * self.qs, self.q_gs, self.qc0 + t * self.ss, self.f0 + t * self.ss, self.s_gs,
            self.dc.data_ptr(), self.dg0 + t * self.dgs, self.dg_gs, self.threads,
        )  # fmt: skip
        # dr = DG[:, t] @ W_hh; the kernel multiplies it by rm as it reads it at the next step
        if self.products.onednn:
            self.dr = self.products.grad_parts(self.DGs[t], self.dr_buf)  # K x (B x H/K), new tensors
            for k, d in enumerate(self.dr):
                _check(d, _Buffer(f"recurrent gradient of group {k}", (B, Hk)))
            self.dr_step = _pointers(self.dr)
        else:
            self.dr = self.products.backward(self.DGs[t], self.dr_buf)  # into dr_buf, K x B x H/K
            self.dr_step = self.dr_arr

    def finish_backward(self) -> Optional[Tensor]:
        if self.dr is None:
            return None
        if self.products.onednn:
            self.dr = torch.stack(self.dr, out=self.dr_buf)  # K x (B x H/K) -> K x B x H/K
        return self.dr if self.buf.rm is None else self.dr.mul_(self.buf.rm)


# ------------------------------------------------------------------------------------------------ choice


def triton_available() -> bool:
    """Whether Triton can be imported (it is not imported until a CUDA call needs it)."""
    return importlib.util.find_spec("triton") is not None


def step_kind(x: Tensor) -> str:
    """The step backend of a fused call on ``x``: the backend's ``step`` setting resolved for its device and
    dtype. auto: "c" for float32 CPU tensors when the C kernel is built, "triton" for float32, bfloat16 and
    float16 CUDA tensors when Triton is importable, else "torch". An explicit "c" or "triton" applies to its own
    tensors (float32 on CPU; float32, bfloat16 and float16 on CUDA) and leaves other calls to "torch"; it is an
    error where that kernel is missing. With ``TRITON_INTERPRET=1``, an explicit "triton" also takes CPU
    tensors of those dtypes, on Triton's interpreter (the tests' way to run the kernels without a GPU)."""
    setting = backend.current().step
    cpu32 = x.device.type == "cpu" and x.dtype == torch.float32
    if setting == "c" and _C is None:
        raise RuntimeError("--grnn-step c: the C step kernel is not built (reinstall with a C compiler)")
    if setting == "triton" and not triton_available():
        raise RuntimeError("--grnn-step triton: Triton is not installed (pip install triton)")
    if setting in ("auto", "c") and cpu32 and _C is not None:
        return "c"
    triton_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if setting in ("auto", "triton") and x.device.type == "cuda" and triton_dtype and triton_available():
        return "triton"
    if setting == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu" and triton_dtype:
        return "triton"  # Triton's interpreter runs its kernels on CPU tensors: the tests' way
    return "torch"


def make_step(buf: StepBuffers, forward: bool, kind: Optional[str] = None, loops: str = "steps") -> Step:
    """The step backend ``kind`` (default: ``step_kind(buf.x)``) over ``buf``; a backward pass passes the kind
    its forward pass ran, whose saved buffers it reads. loops: how the Triton step launches its time loops
    (``backend.cuda_loops``)."""
    kind = kind or step_kind(buf.x)
    if kind == "c":
        return CStep(buf, forward)
    if kind == "triton":
        from .triton_step import TritonStep

        return TritonStep(buf, forward, loops)
    return TorchStep(buf, forward)


# ------------------------------------------------------------------------------------ one step of a cell


def _cell_forward(gates: Tensor, c: Tensor, save: bool):
    """``FusedLSTMCellFunction``'s forward: h, c' (K x B x H/K each) and, with ``save``, the derivatives its backward
    reads (Q, Qc, Fc), else None."""
    K, B, G4 = gates.shape
    Hk = G4 // 4
    z = (gates * gate_scale(gates, G4)).contiguous()  # K x B x 4H/K, the g gate doubled (``gate_scale``)
    _check(z, _Buffer("gates", (K, B, G4)))
    c = _check(c.contiguous(), _Buffer("c", (K, B, Hk)))
    h, c_new = gates.new_empty(K, B, Hk), gates.new_empty(K, B, Hk)
    Q, Qc, Fc = (gates.new_empty(K, B, G4), gates.new_empty(K, B, Hk), gates.new_empty(K, B, Hk)) if save \
        else (None, None, None)  # fmt: skip
    _C.forward_step(
        K, B, Hk, 0, _pointers(z.unbind(0)), None, 0, G4, c.data_ptr(), c_new.data_ptr(), B * Hk,
        h.data_ptr(), B * Hk, None if Q is None else Q.data_ptr(), B * G4, None if Qc is None else Qc.data_ptr(),
        None if Fc is None else Fc.data_ptr(), B * Hk, None, torch.get_num_threads(),
    )  # fmt: skip
    return h, c_new, (Q, Qc, Fc)


class FusedLSTMCellFunction(torch.autograd.Function):
    """The pointwise half of one group LSTM step on the C kernel: pre-activations and c_{t-1} -> h_t, c_t.

    gates: K x B x 4H/K (i, f, g, o of every group), c: K x B x H/K. Returns h, c' (K x B x H/K each, group
    order, no shuffle). Two autograd nodes instead of a dozen: GroupLSTMCell runs it at every decoder step.
    """

    @staticmethod
    def forward(ctx, gates: Tensor, c: Tensor):
        h, c_new, saved = _cell_forward(gates, c, save=True)
        ctx.save_for_backward(*saved)
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Optional[Tensor], dc_new: Optional[Tensor]):
        Q, Qc, Fc = ctx.saved_tensors
        K, B, G4 = Q.shape
        Hk = G4 // 4
        dc = Q.new_zeros(K, B, Hk) if dc_new is None else dc_new.contiguous().clone()  # dc_t -> dc_{t-1}
        if dh is not None:
            dh = _check(dh.contiguous(), _Buffer("dh", (K, B, Hk)))
        _check(dc, _Buffer("dc", (K, B, Hk)))
        dgates = Q.new_empty(K, B, G4)
        _C.backward_step(
            K, B, Hk, 0, None if dh is None else dh.data_ptr(), B * Hk, Hk, None, None, None, Q.data_ptr(), B * G4,
            Qc.data_ptr(), Fc.data_ptr(), B * Hk, dc.data_ptr(), dgates.data_ptr(), B * G4, torch.get_num_threads(),
        )  # fmt: skip
        return dgates, dc


def lstm_cell(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """nn.LSTM's cell on pre-activations, in PyTorch operations: gates ... x 4H' (i, f, g, o), c ... x H'."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * tanh(g)
    return torch.sigmoid(o) * tanh(c_new), c_new


def cell_pointwise(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """One step's cell on pre-activations: gates K x B x 4H/K (i, f, g, o), c K x B x H/K -> h, c' (K x B x H/K).
    On the fused path with the C kernel or Triton (``step_kind``), one kernel pass each way (Triton: h in the
    gates' dtype and c' in c's, computed in float32); else ``lstm_cell``."""
    if backend.fused():
        kind = step_kind(gates)
        if kind == "c":
            if torch.is_grad_enabled() and (gates.requires_grad or c.requires_grad):
                return FusedLSTMCellFunction.apply(gates, c)
            h, c_new, _ = _cell_forward(gates, c, save=False)  # decoding: no autograd node, nothing saved
            return h, c_new
        if kind == "triton":
            from .triton_step import triton_cell

            return triton_cell(gates, c)
    return lstm_cell(gates, c)
