"""grnn_fairseq: group recurrent networks (Gao et al., NAACL 2018) as a fairseq plugin.

``fairseq-train --user-dir grnn_fairseq ...`` imports this package, which registers every model in
``grnn_fairseq/models``, LightRNN's task in ``grnn_fairseq/tasks`` and criterion in ``grnn_fairseq/criterions``,
and installs the checks of ``grnn_fairseq/safeguards.py`` (clear errors for unreadable checkpoints and
unsupported precision flags, atomic checkpoint copies). ``grnn_fairseq.modules`` holds the pure-PyTorch layers
and imports no fairseq.
"""

import argparse

import torch

__version__ = "0.1.0"


def checkpoint_safe_globals() -> list:
    """The classes fairseq checkpoints hold besides tensors, for torch's weights_only loading.

    Every checkpoint stores its argparse.Namespace; one trained with ``--eval-bleu`` also stores numpy arrays
    (the BLEU n-gram counts among the saved metrics), which unpickle through numpy's array reconstructor and
    dtype classes.
    """
    safe = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return safe
    multiarray = np.core.multiarray if hasattr(np, "core") else np._core.multiarray
    dtype_classes = {type(np.dtype(t)) for t in np.sctypeDict.values()}  # numpy.dtypes.Int64DType, ...
    return safe + [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *sorted(dtype_classes, key=str)]


# torch >= 2.6 loads checkpoints with weights_only=True: without these, fairseq-generate, fairseq-eval-lm and
# --restore-file all fail. fairseq imports --user-dir before it loads a checkpoint, so registering here
# covers every entry point.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(checkpoint_safe_globals())

try:
    import fairseq  # noqa: F401
except ImportError:  # the layers in grnn_fairseq.modules work without fairseq
    pass
else:
    from . import models  # noqa: F401  (registers the models and architectures)
    from . import criterions, safeguards, tasks  # noqa: F401  (registers LightRNN's task and criterion)

    safeguards.install()
