import contextlib
import importlib.util
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(1)  # in-process tests use tiny tensors; see fairseq_cli() below


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); scripts/gpu-check.sh runs them")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "grnn_fairseq")
BIN = os.path.dirname(sys.executable)


@pytest.fixture
def fused_mode():
    """A setter of the process's backend (grnn_fairseq.modules.backend): ``fused_mode(False)`` selects the
    reference path, keyword arguments set the other choices; the default setting is restored after the test."""
    from grnn_fairseq.modules import backend

    def set_mode(fused=True, **changes):
        backend.set_default(backend.Backend(path="fused" if fused else "reference", **changes))

    previous = backend.set_default(backend.Backend())
    yield set_mode
    backend.set_default(previous)


@pytest.fixture
def onednn_packs(monkeypatch):
    """The shapes of the weights packed into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)
    while the test runs, in order of packing (a list: clear it between the counts to compare); skips the test
    where this torch has no oneDNN linear."""
    from grnn_fairseq.modules import backend

    if not backend.onednn_usable(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN linear")
    packed = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w, *a: packed.append(w.shape) or reorder(w, *a))  # fmt: skip
    return packed


class Dispatched(TorchDispatchMode):
    """Every operator dispatched inside the block, forward and backward passes alike: ``names`` in order, and
    ``args`` (name -> the positional arguments of each call) for the operators named in ``keep_args``."""

    def __init__(self, keep_args=()):
        super().__init__()
        self.names, self.keep_args = [], set(keep_args)
        self.args = {name: [] for name in self.keep_args}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        if name in self.keep_args:
            self.args[name].append(args)
        return func(*args, **(kwargs or {}))


# operators that, on CUDA tensors, wait for every queued kernel: a tensor read as a Python value (item, bool,
# int: _local_scalar_dense), a comparison answered on the host, and outputs whose size depends on the values
DEVICE_WAITS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2",
                "unique_dim", "unique_consecutive"}  # fmt: skip


@contextlib.contextmanager
def device_waits():
    """The calls inside the block that would make the host wait for a GPU on CUDA tensors, on any device: the
    operators of ``DEVICE_WAITS`` and ``Tensor.tolist``/``numpy`` (which on CPU tensors dispatch nothing), as
    a list of names that the block fills."""
    waits = []
    with Dispatched() as ops, pytest.MonkeyPatch.context() as patch:
        for method in ("tolist", "numpy"):
            def reads(self, *args, _method=method, _original=getattr(torch.Tensor, method), **kwargs):
                waits.append(_method)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, method, reads)
        yield waits
    waits.extend(name for name in ops.names if name in DEVICE_WAITS)


def fairseq_cli(command, *args, check=True, timeout=600, input=None, env=None):
    """Run a fairseq console script (fairseq-train, ...) from this interpreter's environment."""
    exe = os.path.join(BIN, command)
    if not os.path.exists(exe):
        pytest.skip(f"{command} is not installed beside {sys.executable}")
    proc = subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, input=input,
        # tiny models gain nothing from threads, and OpenMP threads spinning against other processes on a
        # shared 2-core machine slow a 2 s training run to 70 s (docs/speed.md, "Running beside other jobs")
        env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def fairseq_train_in_process(*args):
    """fairseq-train's entry point in this process (no 4 s of imports): args as on the command line."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    parsed = options.parse_args_and_arch(options.get_training_parser(), input_args=[str(a) for a in args])
    # fairseq keeps the best validation loss in a process-wide attribute; a fresh fairseq-train starts without
    # it (a resumed run restores it from checkpoint_last.pt), else checkpoint_best.pt may never be written
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    train.main(convert_namespace_to_omegaconf(parsed))


def fairseq_eval_lm_in_process(*args):
    """fairseq-eval-lm's entry point in this process; returns its results ({"loss", "perplexity"})."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=[str(a) for a in args])
    return eval_lm.main(convert_namespace_to_omegaconf(parsed))


def grammar_sentences(n, seed):
    """Sentences of a tiny grammar: learnable, so perplexity must fall well below the vocabulary size."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the old man", "my sister", "the teacher"]
    verb = ["sees", "likes", "finds", "calls"]
    obj = ["the ball", "a red car", "the house", "her friend", "N apples"]
    tail = ["today", "again", "at night", "in the park", ""]
    return [" ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}".split()) for _ in range(n)]


def load_textprep():
    """scripts/textprep.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("textprep", os.path.join(ROOT, "scripts", "textprep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- a tiny translation task with BPE, and a group_rnnsearch trained on it, shared by the tests of issue #7 ---

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
BPE_MERGES = 26  # leaves "green" (g@@ re@@ e@@ n) and "yellow" (yello@@ w) split: BPE must really be applied


def word_reversal_pairs(n, seed):
    """(source, target) pairs: 2-5 colour words and the same words in reverse order."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(COLOURS) for _ in range(rng.randint(2, 5))]
        pairs.append((" ".join(words), " ".join(reversed(words))))
    return pairs


def preprocess_parallel(prefixes, destdir, *flags, langs=("src", "tgt")):
    """fairseq-preprocess in process (saves the ~4 s import of a separate fairseq-preprocess)."""
    from fairseq import options
    from fairseq_cli import preprocess

    train, valid, test = prefixes
    parser = options.get_preprocessing_parser()
    preprocess.main(parser.parse_args([
        "--source-lang", langs[0], "--target-lang", langs[1], "--trainpref", str(train), "--validpref", str(valid),
        "--testpref", str(test), "--destdir", str(destdir), "--joined-dictionary", "--workers", "1", *flags,
    ]))  # fmt: skip


@pytest.fixture(scope="session")
def word_reversal(tmp_path_factory):
    """Raw text (1200/40/20 pairs), joint BPE codes learned on train, BPE'd text, and its binarized form."""
    root = tmp_path_factory.mktemp("word_reversal")
    textprep = load_textprep()
    raw, bpe = root / "raw", root / "bpe"
    raw.mkdir()
    bpe.mkdir()
    for split, n, seed in (("train", 1200, 0), ("valid", 40, 1), ("test", 20, 2)):
        pairs = word_reversal_pairs(n, seed)
        (raw / f"{split}.src").write_text("\n".join(s for s, _ in pairs) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(t for _, t in pairs) + "\n")
    codes = root / "code"
    textprep.main(["bpe", "--codes", str(codes), "--merges", str(BPE_MERGES), "--learn",
                   str(raw / "train.src"), str(raw / "train.tgt"),
                   "--apply", *[f"{raw}/{s}.{l}:{bpe}/{s}.{l}" for s in ("train", "valid", "test") for l in ("src", "tgt")]])
    preprocess_parallel([bpe / "train", bpe / "valid", bpe / "test"], root / "bin")
    return SimpleNamespace(root=root, raw=raw, bpe=bpe, bin=root / "bin", codes=codes)


# group_rnnsearch_iwslt at toy sizes; the flags every test that trains on word_reversal starts from
REVERSAL_MODEL_FLAGS = [
    "--user-dir", USER_DIR, "--task", "translation", "--arch", "group_rnnsearch_iwslt",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-hidden-size", "32",
    "--decoder-first-layer-hidden-size", "64", "--decoder-hidden-size", "32", "--encoder-layers", "1",
    "--decoder-layers", "2", "--encoder-groups", "2", "--decoder-groups", "2",
    "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1", "--log-format", "simple",
]  # fmt: skip


@pytest.fixture(scope="session")
def reversal_model(word_reversal):
    """group_rnnsearch trained on word_reversal by fairseq-train, with --eval-bleu (checkpoint_best.pt is the best
    validation BLEU), --tensorboard-logdir and --wandb-project: what the ecosystem tests inspect."""
    save, tensorboard = word_reversal.root / "checkpoints", word_reversal.root / "tensorboard"
    proc = fairseq_cli(
        "fairseq-train", word_reversal.bin, *REVERSAL_MODEL_FLAGS,
        "--dropout", "0", "--decoder-dropout-out", "0.1", "--optimizer", "adam", "--lr", "0.01",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "40", "--warmup-init-lr", "1e-4", "--clip-norm", "1",
        "--batch-size", "64", "--max-epoch", "12", "--seed", "1", "--save-dir", save, "--no-epoch-checkpoints",
        "--log-interval", "20", "--eval-bleu", "--eval-bleu-args", '{"beam": 1}', "--eval-bleu-remove-bpe",
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
        "--tensorboard-logdir", tensorboard, "--wandb-project", "grnn-tests",
        env={"WANDB_MODE": "disabled"},  # should wandb be installed: no login, no network
    )  # fmt: skip
    return SimpleNamespace(save_dir=save, best=save / "checkpoint_best.pt", last=save / "checkpoint_last.pt",
                           log=proc.stdout + proc.stderr, tensorboard=tensorboard, data=word_reversal)


# typed input of the interactive tests: a sentence, an empty line, a word outside the vocabulary, a sentence
INTERACTIVE_INPUT = "red green yellow\n\nred zebra\nblue black white\n"


@pytest.fixture(scope="session")
def interactive_run(reversal_model):
    """fairseq-interactive on INTERACTIVE_INPUT, applying the BPE codes itself (--bpe subword_nmt)."""
    data = reversal_model.data
    return fairseq_cli(
        "fairseq-interactive", data.bin, "--user-dir", USER_DIR, "--path", reversal_model.best, "--cpu",
        "--source-lang", "src", "--target-lang", "tgt", "--beam", "5", "--bpe", "subword_nmt",
        "--bpe-codes", data.codes, input=INTERACTIVE_INPUT,
    )  # fmt: skip


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A small binarized monolingual corpus (the same grammar sentences for train, valid and test)."""
    from fairseq import options
    from fairseq_cli import preprocess

    root = tmp_path_factory.mktemp("lm_data")
    (root / "train.txt").write_text("\n".join(grammar_sentences(50, 1)) + "\n")
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--only-source", "--trainpref", str(root / "train.txt"), "--validpref", str(root / "train.txt"),
        "--testpref", str(root / "train.txt"), "--destdir", str(root / "bin"), "--workers", "1"]))  # fmt: skip
    return root / "bin"
