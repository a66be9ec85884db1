"""Issue #7, ecosystem: the hub interface, fairseq-interactive, scoring, --eval-bleu, logging integrations, and
the precision flags, all on the group_rnnsearch of conftest's ``reversal_model`` (a word-reversal task with BPE)."""

import argparse
import copy
import importlib.util
import re
import struct
import sys

import pytest
import torch

from conftest import REVERSAL_MODEL_FLAGS, USER_DIR, load_textprep

from fairseq import options, utils  # noqa: E402

utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))

from grnn_fairseq import checkpoint_safe_globals  # noqa: E402
from grnn_fairseq.models.group_rnnsearch import GroupRNNSearchModel  # noqa: E402
from grnn_fairseq.safeguards import check_precision_flags  # noqa: E402


def reverse_words(sentence):
    return " ".join(reversed(sentence.split()))


@pytest.fixture(scope="module")
def hub(reversal_model):
    """The README's example: from_pretrained with the data directory and the BPE codes."""
    return GroupRNNSearchModel.from_pretrained(
        str(reversal_model.save_dir),
        checkpoint_file="checkpoint_best.pt",
        data_name_or_path=str(reversal_model.data.bin),
        bpe="subword_nmt",
        bpe_codes=str(reversal_model.data.codes),
        tokenizer="moses",
    )


# --- training-time integrations, read from the fixture's fairseq-train log and outputs -----------------------


def test_eval_bleu_is_computed_during_validation(reversal_model):
    bleu = [float(b) for b in re.findall(r"valid on 'valid' subset .*?\| bleu ([\d.]+)", reversal_model.log)]
    assert len(bleu) == 12, reversal_model.log[-3000:]  # one per epoch
    assert bleu[0] < 50 and max(bleu) >= 90
    # --best-checkpoint-metric bleu: checkpoint_best.pt holds the best BLEU, saved with the BLEU n-gram counts
    state = torch.load(reversal_model.best, map_location="cpu")
    assert state["extra_state"]["best"] == max(bleu)


def test_checkpoints_with_eval_bleu_metrics_load_on_torch_2_6(reversal_model):
    """--eval-bleu stores numpy arrays in the checkpoint's metrics; torch >= 2.6 refuses them unless allowed."""
    registered = torch.serialization.get_safe_globals()
    assert all(g in registered for g in checkpoint_safe_globals())
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])  # a plugin that allows only the Namespace
    try:
        with pytest.raises(Exception, match="numpy"):
            torch.load(reversal_model.best, map_location="cpu", weights_only=True)
    finally:
        torch.serialization.add_safe_globals(registered)
    torch.load(reversal_model.best, map_location="cpu", weights_only=True)


def read_tensorboard_scalars(path):
    """{tag: [values]} of a TensorBoard event file (TFRecord framing: length, crc, event proto, crc)."""
    from tensorboardX.proto import event_pb2

    data, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_tensorboard_logdir_receives_train_and_valid_scalars(reversal_model):
    valid_files = list((reversal_model.tensorboard / "valid").glob("events.out.tfevents.*"))
    train_files = list((reversal_model.tensorboard / "train").glob("events.out.tfevents.*"))
    assert len(valid_files) == 1 and len(train_files) == 1
    valid = read_tensorboard_scalars(valid_files[0])
    assert len(valid["loss"]) == 12 and len(valid["bleu"]) == 12
    assert valid["loss"][-1] < valid["loss"][0]
    assert len(read_tensorboard_scalars(train_files[0])["loss"]) == 12


def test_wandb_project_passes_through(reversal_model):
    assert "done training" in reversal_model.log
    if importlib.util.find_spec("wandb") is None:  # fairseq's own warning; the run goes on
        assert "wandb not found, pip install wandb" in reversal_model.log


# --- hub interface ---------------------------------------------------------------------------------------------


def test_hub_translates_raw_text_through_bpe(hub, reversal_model):
    # "green" and "yellow" are not in the dictionary as words: BPE must split them and the output must be merged
    assert hub.translate("red green yellow") == "yellow green red"
    assert hub.sample("blue yellow", beam=1) == "yellow blue"  # sample = translate with beam 1 by default
    sources = (reversal_model.data.raw / "test.src").read_text().splitlines()
    outputs = hub.translate(sources, beam=5)
    correct = sum(out == reverse_words(src) for src, out in zip(sources, outputs))
    assert correct >= len(sources) - 1, list(zip(sources, outputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_on_cpu_matches_float32(hub, reversal_model, dtype):
    """fairseq-generate --bf16 / --fp16 on CPU cast the model; GroupLSTM runs them on its autograd path."""
    from fairseq.hub_utils import GeneratorHubInterface

    half = GeneratorHubInterface(hub.cfg, hub.task, [copy.deepcopy(m).to(dtype) for m in hub.models])
    assert next(half.models[0].parameters()).dtype == dtype
    sources = (reversal_model.data.raw / "test.src").read_text().splitlines()
    reference = hub.translate(sources, beam=2)
    outputs = half.translate(sources, beam=2)
    assert sum(a == b for a, b in zip(reference, outputs)) >= len(sources) - 2, list(zip(reference, outputs))


# --- command line tools ----------------------------------------------------------------------------------------


def test_interactive_translates_typed_input(interactive_run):
    out = interactive_run.stdout
    # S-: the source as BPE'd and mapped to the dictionary; D-: the hypothesis with the BPE removed
    assert re.search(r"^S-0\tred g@@ re@@ e@@ n yello@@ w$", out, re.M), out[-2000:]
    assert re.search(r"^D-0\t[-\d.e]+\tyellow green red$", out, re.M), out[-2000:]
    assert re.search(r"^D-3\t[-\d.e]+\twhite black blue$", out, re.M), out[-2000:]


def test_generate_sacrebleu_scoring_and_fairseq_score(reversal_model, tmp_path, monkeypatch, capsys):
    from fairseq_cli import generate, score

    args = options.parse_args_and_arch(options.get_generation_parser(), input_args=[
        str(reversal_model.data.bin), "--user-dir", USER_DIR, "--path", str(reversal_model.best), "--cpu",
        "--beam", "5", "--batch-size", "8", "--required-batch-size-multiple", "1", "--remove-bpe",
        "--scoring", "sacrebleu", "--results-path", str(tmp_path),
    ])  # fmt: skip
    generate.main(args)
    log = (tmp_path / "generate-test.txt").read_text()
    sacrebleu = float(re.search(r"Generate test with beam=5: BLEU = ([\d.]+) ", log).group(1))  # sacreBLEU's format
    assert sacrebleu >= 90, log[-2000:]

    load_textprep().main(["gen-extract", str(tmp_path / "generate-test.txt"), str(tmp_path / "out"), "--expect", "20"])
    monkeypatch.setattr(sys, "argv", ["fairseq-score", "--sys", str(tmp_path / "out.hyp"), "--ref", str(tmp_path / "out.ref")])
    score.cli_main()
    bleu4 = float(re.search(r"BLEU4 = ([\d.]+)", capsys.readouterr().out).group(1))
    assert bleu4 == pytest.approx(sacrebleu, abs=5)


# --- precision flags -------------------------------------------------------------------------------------------


def train_cfg(*flags):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), ["unused", *REVERSAL_MODEL_FLAGS, *flags])
    return convert_namespace_to_omegaconf(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--fp16"], "--fp16 needs a CUDA GPU (--cpu is set)"),
        (["--bf16"], "--bf16: fairseq's command line turns on --tpu"),
        (["--memory-efficient-bf16"], "--bf16: fairseq's command line turns on --tpu"),
        (["--amp"], None),  # float32 on CPU (torch.cuda.amp is disabled there)
        (["--memory-efficient-fp16"], None),  # the model in float16 on CPU
        ([], None),
    ],
)  # fmt: skip
def test_precision_flags_without_a_gpu(flags, message):
    cfg = train_cfg(*flags)
    if message is None:
        check_precision_flags(cfg)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_precision_flags(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_fairseq_train_fp16_on_cpu_stops_before_training(word_reversal, tmp_path):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(word_reversal.bin), *REVERSAL_MODEL_FLAGS, "--fp16", "--optimizer", "adam", "--lr", "0.001",
        "--batch-size", "64", "--max-update", "2", "--save-dir", str(tmp_path / "ckpt"),
    ])  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("--fp16 needs a CUDA GPU")):
        train.main(convert_namespace_to_omegaconf(args))
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def test_autocast_bfloat16_trains_on_the_autograd_path(hub, reversal_model):
    """torch.autocast (what --amp uses on a GPU) runs GroupLSTM's autograd path; gradients stay close to float32."""
    from fairseq import checkpoint_utils

    [model], _ = checkpoint_utils.load_model_ensemble([str(reversal_model.best)])
    model.eval()  # no dropout, so both passes compute the same function
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(hub.src_dict), (4, 7), generator=g)
    prev = torch.randint(4, len(hub.tgt_dict), (4, 6), generator=g)
    target = torch.randint(4, len(hub.tgt_dict), (4, 6), generator=g)

    def loss_and_grad(autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(src, torch.full((4,), 7), prev)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    assert loss16 == pytest.approx(loss32, rel=0.02)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert torch.isfinite(grad16).all() and cosine > 0.99


def test_bf16_means_bfloat16_on_a_cuda_machine(monkeypatch):
    """fairseq 0.12 turns on --tpu with --bf16; with CUDA and without torch_xla the plugin's parse keeps the GPU
    (without CUDA, or with --tpu asked for, fairseq's meaning stays)."""
    from fairseq import options

    def parse(*flags):
        return options.parse_args_and_arch(options.get_training_parser(), input_args=[
            "data", "--user-dir", USER_DIR, "--task", "translation", "--arch", "group_rnnsearch_iwslt", *flags])  # fmt: skip

    assert getattr(options.parse_args_and_arch, "grnn_checked", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse("--bf16").tpu is False
    assert parse("--bf16", "--tpu").tpu is True
    assert parse("--bf16", "--cpu").tpu is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse("--bf16").tpu is True
