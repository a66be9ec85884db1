"""The optional C kernel of the fused group LSTM: one pass over a time step's gates, forward and backward.

``grnn_fairseq/csrc/group_lstm_step.c``, built by setup.py as an optional extension (never at import or at
run time) and loaded here with ctypes. It replaces the dozen PyTorch pointwise operations of a step on
float32 CPU tensors; where it is not built, cannot load, or is switched off (``GRNN_KERNEL=0`` or
``set_kernel(False)``), the fused path runs the same step in PyTorch operations.
"""

import ctypes
import importlib.machinery
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

KERNEL_VERSION = 3  # grnn_kernel_version() of the C source this loader matches
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_NAME = "_group_lstm_step"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _find_library() -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PACKAGE_DIR, _LIBRARY_NAME + suffix)
        if os.path.exists(path):
            return path
    return None


def _check(result, func, args):
    if result != 0:
        raise MemoryError(f"{func.__name__}: out of memory for a scratch row")
    return result


class StepKernel:
    """The two C entry points with their argument types; pointers are passed as ints (``Tensor.data_ptr()``), the
    last argument is the number of threads to split a step's rows over (``torch.get_num_threads()``)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.grnn_kernel_version.restype = _i64
        version = lib.grnn_kernel_version()
        if version != KERNEL_VERSION:
            raise OSError(f"{path} is version {version}, expected {KERNEL_VERSION}: reinstall (pip install -e .)")
        self.path = path
        self.forward_step = lib.grnn_lstm_forward_step
        self.forward_step.restype = _i64
        self.forward_step.errcheck = _check
        self.forward_step.argtypes = [_i64] * 4 + [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64,
                                                   _ptr, _ptr, _i64, _ptr, _i64]
        self.backward_step = lib.grnn_lstm_backward_step
        self.backward_step.restype = _i64
        self.backward_step.errcheck = _check
        self.backward_step.argtypes = [_i64] * 4 + [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64,
                                                    _ptr, _ptr, _i64, _i64]


def pointers(tensors: Sequence[Tensor]):
    """A C array of the tensors' data pointers (``const float *const *``); keep the tensors alive meanwhile."""
    return (_ptr * len(tensors))(*[t.data_ptr() for t in tensors])


def _load() -> Optional[StepKernel]:
    path = _find_library()
    if path is None:
        return None
    try:
        return StepKernel(path)
    except OSError:  # a stale or foreign build: the PyTorch operations take over
        return None


_KERNEL: Optional[StepKernel] = _load()
_ENABLED = os.environ.get("GRNN_KERNEL", "1") != "0"


def available() -> bool:
    """Whether the C kernel is built and loadable (independent of ``set_kernel``)."""
    return _KERNEL is not None


def set_kernel(enabled: bool) -> bool:
    """Use the C kernel for float32 CPU steps where it is available; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def kernel_for(x: Tensor) -> Optional[StepKernel]:
    """The kernel when it applies to this call (enabled, built, float32 on CPU), else None."""
    if _ENABLED and _KERNEL is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return _KERNEL
    return None
