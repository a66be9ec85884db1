"""Clear errors where fairseq would fail deep inside a library, and atomic checkpoint copies.

``grnn_fairseq/__init__.py`` calls :func:`install` when fairseq imports the plugin (``--user-dir grnn_fairseq``),
before any checkpoint is loaded or any trainer is built. Each wrapper keeps fairseq's behaviour for every input
fairseq handles; it only changes what happens where fairseq would crash or corrupt a file:

* ``checkpoint_utils.load_checkpoint_to_cpu`` (every checkpoint load: fairseq-train's ``checkpoint_last.pt`` and
  ``--restore-file``, ``--path`` of fairseq-generate / interactive / eval-lm, ``from_pretrained``): a
  truncated, empty or foreign file raises :class:`CheckpointError` naming the file and what is wrong with it,
  instead of a traceback inside pickle or torch's zip reader. Good files load exactly as before.
* ``PathManager.copy`` of a ``.pt`` file to a local path (fairseq-train copies each checkpoint it writes to
  ``checkpoint_last.pt`` and ``checkpoint_best.pt``) copies to ``NAME.tmp`` and renames, as fairseq's own save
  does: a process killed mid-copy leaves the complete checkpoint that was there, never a truncated one.
* ``Trainer.__init__`` checks the precision flags first: ``--fp16`` without a CUDA GPU and ``--tpu`` (which
  fairseq's command line turns on with ``--bf16``) without torch_xla raise a ValueError naming the flag, before
  fairseq fails inside torch.cuda or torch_xla.
* ``options.parse_args_and_arch``: on a CUDA machine without torch_xla, ``--bf16`` (without ``--tpu``) trains in
  bfloat16 on the GPU instead of turning on ``--tpu``.
* At exit, :func:`stop_prefetch_threads` lets fairseq's data prefetch threads finish the batch in hand before
  the interpreter finalizes. fairseq-train collates batches ahead in a daemon thread (``BufferedIterator``,
  ``--data-buffer-size``); CPython 3.11 ends a daemon thread that returns from C code during finalization with
  ``pthread_exit``, whose forced unwinding through torch's C++ frames calls ``std::terminate``: the process
  dies with SIGABRT ("terminate called without an active exception") after "done training", with fairseq's
  own models too (7 of 24 two-update runs, two at a time on a 2-core machine).
"""

import atexit
import functools
import os
import pickle
import queue
import sys
import threading
import time
import zipfile
from typing import Optional

import torch
from fairseq import checkpoint_utils, options
from fairseq.file_io import PathManager
from fairseq.trainer import Trainer

from grnn_fairseq.errors import CheckpointError, ConfigError, install_cli_errors


_CUT_SHORT = ", as a process killed or a disk filling up while the file was written leaves it"


def unreadable_reason(path: str, error: Optional[BaseException] = None) -> Optional[str]:
    """Why the file at ``path`` is not a readable PyTorch checkpoint, or None when its container is intact.

    ``error`` is what ``torch.load`` raised, used for the legacy (pickle, pre-1.6) format, whose integrity
    cannot be checked without unpickling. Reads the whole file for zip checkpoints (CRC of every member): call
    it only after loading failed.
    """
    size = os.path.getsize(path)
    if size == 0:
        return f"is empty (0 bytes){_CUT_SHORT}"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as zip_error:
            return f"is a truncated or damaged zip archive ({size:,} bytes; zipfile: {zip_error}){_CUT_SHORT}"
        if bad_member is not None:
            return f"is corrupt: its member {bad_member} fails the CRC check{_CUT_SHORT}"
        return None
    if magic[:1] == b"\x80":  # a pickle: torch.save's legacy format
        weights_only_refusal = "Weights only load failed" in str(error)  # an intact file with unlisted classes
        cut_short = isinstance(error, RuntimeError) and "unexpected EOF" in str(error)  # a tensor's bytes missing
        if (isinstance(error, (EOFError, pickle.UnpicklingError)) and not weights_only_refusal) or cut_short:
            return f"is truncated or corrupt (legacy pickle format, {size:,} bytes: {error}){_CUT_SHORT}"
        return None
    return f"is not a PyTorch checkpoint (it starts with the bytes {magic!r}, neither a zip archive nor a pickle)"


def _local_file(path: str) -> Optional[str]:
    """The local file behind ``path`` when there is one (remote paths are left to fairseq's own errors)."""
    if PathManager.path_requires_pathmanager(path) or not os.path.isfile(path):
        return None
    return path


def _checked_load_checkpoint_to_cpu(load):
    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except Exception as error:
            local = _local_file(path)
            reason = unreadable_reason(local, error) if local is not None else None
            if reason is None:
                raise
            message = (
                f"checkpoint {path} {reason}. It cannot be loaded: use another checkpoint (fairseq-train: "
                f"--restore-file FILE; fairseq-generate and the others: --path FILE), or move this one away "
                f"to train from scratch."
            )
        raise CheckpointError(message) from None  # raised outside `except`: no pickle traceback attached

    load_checkpoint_to_cpu.grnn_checked = True
    return load_checkpoint_to_cpu


def _atomic_pt_copy(copy):
    @functools.wraps(copy)
    def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False):
        if not str(dst_path).endswith(".pt") or not PathManager.supports_rename(dst_path):
            return copy(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return copy(src_path, dst_path, overwrite)  # fairseq's own answer to an existing target
        tmp = f"{dst_path}.tmp"
        result = copy(src_path, tmp, True)
        os.replace(tmp, dst_path)  # atomic on POSIX: readers see the old file or the new one, never a part
        return result

    atomic_copy.grnn_checked = True
    return atomic_copy


def _has_torch_xla() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def check_precision_flags(cfg) -> None:
    """Raise a ValueError naming the flag when this machine cannot run the requested precision.

    fairseq's command line turns on ``--tpu`` with ``--bf16`` and ``--memory-efficient-bf16`` (options.py), so
    in fairseq 0.12 those flags mean TPU training. ``--memory-efficient-fp16`` does run on CPU (the model in
    float16, slowly) and ``--amp`` on CPU trains in float32 (torch.cuda.amp is disabled there): both pass.
    """
    common = cfg.common
    if common.tpu and not _has_torch_xla():
        flag = "--bf16" if common.bf16 else "--tpu"
        raise ConfigError(
            f"{flag}: fairseq's command line turns on --tpu with --bf16 and --memory-efficient-bf16, and TPU "
            f"training needs torch_xla, which is not installed. On a CUDA GPU --bf16 trains in bfloat16; on a "
            f"CPU train in float32 (drop {flag})."
        )
    cuda = torch.cuda.is_available() and not common.cpu
    if common.fp16 and not common.memory_efficient_fp16 and not common.tpu and not cuda:
        where = "--cpu is set" if common.cpu else "torch sees no CUDA GPU"
        raise ConfigError(
            f"--fp16 needs a CUDA GPU ({where}): fairseq's FP16 optimizer keeps its loss scale on the GPU. "
            f"Drop --fp16 to train in float32 on this machine."
        )


def _bf16_on_gpu(parse):
    """fairseq 0.12's ``parse_args_and_arch`` turns on ``--tpu`` with ``--bf16``; on a CUDA machine without
    torch_xla (no TPU to mean), ``--bf16`` then means bfloat16 on the GPU, as in later fairseq versions."""

    @functools.wraps(parse)
    def parse_args_and_arch(*args, **kwargs):
        parsed = parse(*args, **kwargs)
        asked_tpu = "--tpu" in (kwargs.get("input_args") or (args[1] if len(args) > 1 and args[1] else sys.argv))
        if getattr(parsed, "bf16", False) and getattr(parsed, "tpu", False) and not asked_tpu:
            if torch.cuda.is_available() and not getattr(parsed, "cpu", False) and not _has_torch_xla():
                parsed.tpu = False
        return parsed

    parse_args_and_arch.grnn_checked = True
    return parse_args_and_arch


def _checked_trainer_init(init):
    @functools.wraps(init)
    def __init__(self, cfg, *args, **kwargs):
        check_precision_flags(cfg)
        init(self, cfg, *args, **kwargs)

    __init__.grnn_checked = True
    return __init__


def stop_prefetch_threads(timeout: float = 30.0) -> None:
    """Stop fairseq's live ``BackgroundConsumer`` threads: each finishes the batch it is collating, puts it, and
    returns (its limit set to 0: ``run`` breaks after its next put); its queue is drained so that no put blocks,
    for ``timeout`` seconds at most in all."""
    from fairseq.data.iterators import BackgroundConsumer

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if not isinstance(thread, BackgroundConsumer) or not thread.is_alive():
            continue
        thread._max_len = 0  # run() breaks after its next put
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread._queue.get(timeout=0.01)
            except queue.Empty:
                pass


def install() -> None:
    """Install the wrappers (idempotent: importing the plugin twice wraps nothing twice)."""
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "grnn_checked", False):
        checkpoint_utils.load_checkpoint_to_cpu = _checked_load_checkpoint_to_cpu(checkpoint_utils.load_checkpoint_to_cpu)
    if not getattr(PathManager.copy, "grnn_checked", False):
        PathManager.copy = staticmethod(_atomic_pt_copy(PathManager.copy))
    if not getattr(Trainer.__init__, "grnn_checked", False):
        Trainer.__init__ = _checked_trainer_init(Trainer.__init__)
    if not getattr(options.parse_args_and_arch, "grnn_checked", False):
        options.parse_args_and_arch = _bf16_on_gpu(options.parse_args_and_arch)
    install_cli_errors()
    if not getattr(install, "exit_handler", False):
        atexit.register(stop_prefetch_threads)
        install.exit_handler = True


def check_dictionary_sizes(state_dict, expected) -> None:
    """Before ``load_state_dict``: say so, naming the dictionary, when a checkpoint's vocabulary differs.

    ``expected``: {parameter name: (which dictionary, its file in the data directory, rows in this model)}.
    Without this, torch reports a size mismatch of some weight, which does not say that the data directory
    (its dict.*.txt) is not the one the checkpoint was trained with.
    """
    for name, (which, dict_file, rows) in expected.items():
        weight = state_dict.get(name)
        if weight is not None and weight.size(0) != rows:
            raise ConfigError(
                f"dictionary size mismatch: the checkpoint was trained with a {which} dictionary of "
                f"{weight.size(0)} symbols ({name} is {' x '.join(map(str, weight.shape))}), but the "
                f"{which} dictionary loaded now ({dict_file} of the data directory) has {rows}. Give the data "
                f"directory the checkpoint was trained with (the DATA argument; data_name_or_path= in from_pretrained)."
            )
