"""grnn_fairseq: group recurrent networks (Gao et al., NAACL 2018) as a fairseq plugin.

``fairseq-train --user-dir grnn_fairseq ...`` imports this package, which registers every model in
``grnn_fairseq/models``, task in ``grnn_fairseq/tasks`` and criterion in ``grnn_fairseq/criterions``. ``grnn_fairseq.modules`` holds the pure-PyTorch layers and imports no fairseq.
"""

import argparse

import torch

__version__ = "0.1.0"

# torch >= 2.6 loads checkpoints with weights_only=True, and every fairseq checkpoint stores its
# argparse.Namespace: without this, fairseq-generate, fairseq-eval-lm and --restore-file all fail.
# fairseq imports --user-dir before it loads a checkpoint, so registering here covers all three.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

try:
    import fairseq  # noqa: F401
except ImportError:  # the layers in grnn_fairseq.modules work without fairseq
    pass
else:
    from . import models  # noqa: F401  (registers the models and architectures)
    from . import criterions, tasks  # noqa: F401  (registers LightRNN's task and criterion)
