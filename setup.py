"""grnn_fairseq: group recurrent networks (Gao et al., NAACL 2018) as a fairseq plugin."""

import os
import re

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """The one version source is grnn_fairseq/__init__.py (read, not imported: torch may be absent)."""
    with open(os.path.join(HERE, "grnn_fairseq", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


# The fused GroupLSTM's pointwise step in C (grnn_fairseq/csrc/group_lstm_step.c), loaded with ctypes by
# grnn_fairseq/modules/steps.py. Optional: without a C compiler the install goes on and the same step runs in
# PyTorch operations. No Python or torch headers, so it builds in about a second. -fno-trapping-math lets gcc
# vectorize the gate math; it does not change any result. -fopenmp splits a step's rows over torch's threads.
STEP_KERNEL = Extension(
    "grnn_fairseq._group_lstm_step",
    sources=["grnn_fairseq/csrc/group_lstm_step.c"],
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
    extra_link_args=["-fopenmp"],  # libgomp.so.1: at run time the one torch has loaded, so one thread pool
    optional=True,
)


setup(
    name="grnn_fairseq",
    version=version(),
    description="Group recurrent networks (Gao et al., NAACL 2018) for fairseq: GroupLSTM, group_lstm_lm, group_rnnsearch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["grnn_fairseq", "grnn_fairseq.*"]),
    ext_modules=[STEP_KERNEL],
    python_requires=">=3.10",
    install_requires=[
        # exact torch: an open range pulls a multi-GB CUDA build; 2.13.0 is the tested CPU wheel
        "torch==2.13.0",
        # PyPI's fairseq 0.12.2 cannot be imported on Python 3.11; ve-fairseq is a prebuilt later snapshot
        "ve-fairseq==0.12.3",
        # fairseq's language-modelling datasets call np.compat, removed in numpy 2
        "numpy<2",
        "sacrebleu>=2.0",
        "sentencepiece",
        "subword-nmt",
        "sacremoses",
        "matplotlib",
        "scipy",
        # --tensorboard-logdir: fairseq writes TensorBoard logs through torch.utils.tensorboard (needs the large
        # tensorboard package) or else tensorboardX (~0.1 MB, + protobuf); without either it only warns
        "tensorboardX",
    ],
    extras_require={
        # the Triton step's kernels run on Triton's interpreter in tests/test_triton.py (about 1 GB, Linux wheels
        # only; nothing is compiled at install or import: on a GPU Triton compiles a kernel at its first launch)
        "test": ["pytest", "triton==3.9.0; sys_platform == 'linux'"],
        "gigaword": ["rouge-score"],  # scripts/eval-gigaword.sh: ROUGE-1/2/L F1
    },
)
