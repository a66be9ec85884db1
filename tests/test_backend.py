"""grnn_fairseq.modules.backend: one setting for every execution choice, deterministic by default, per thread,
visible in the log and stored in checkpoints through the --grnn-* flags."""

import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from conftest import REVERSAL_MODEL_FLAGS, fairseq_cli

from grnn_fairseq.errors import ConfigError
from grnn_fairseq.modules import backend


def test_settings_are_validated_and_immutable():
    with pytest.raises(ConfigError, match="backend step must be one of auto, c, torch, triton, got 'cuda'"):
        backend.Backend(step="cuda")
    setting = backend.Backend()
    with pytest.raises(Exception):
        setting.path = "reference"  # frozen: derive with replace
    assert setting.replace(path="reference").path == "reference" and setting.path == "fused"


def test_use_is_per_thread_and_nests():
    """``use`` changes the setting of its own thread only, the innermost wins, and leaving it restores the outer one."""
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait()
        seen["other"] = backend.current().products  # the process default, not the main thread's `use`
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with backend.use(products="onednn"):
        with backend.use(path="reference"):
            assert backend.current() == backend.Backend(path="reference", products="onednn")
        assert backend.current() == backend.Backend(products="onednn")
        inside.set()
        done.wait()
    thread.join()
    assert seen["other"] == "auto" and backend.current() == backend.Backend()


def test_the_default_rule_never_measures():
    """products auto without benchmark: a fixed rule of the CPU vendor and the product's size (nothing timed)."""
    backend.clear_measured()
    from grnn_fairseq.modules.products import linear

    x, w = torch.randn(512, 256), torch.randn(1024, 256)
    want = backend.heuristic_onednn("linear", 512 * 256 * 1024)
    assert want == (backend.cpu_vendor() == "AuthenticAMD")
    assert not backend.heuristic_onednn("linear", 1000)  # small products: aten's everywhere
    linear(x, w)
    assert backend.measured() == {}


def test_the_amd_rule_keeps_small_groups_on_one_bmm(monkeypatch):
    """On AMD CPUs large products go to oneDNN, but K small groups (one oneDNN call each) stay on one bmm, and a
    decoder step's recurrent products follow the step rule (H/K >= 128, K <= 8); other CPUs use aten's BLAS."""
    monkeypatch.setattr(backend, "cpu_vendor", lambda: "AuthenticAMD")
    assert backend.heuristic_onednn("linear", 32 * 1024 * 2048)  # the decoder's first layer, one group
    assert not backend.heuristic_onednn("grouped_linear", 4 * 32 * 64 * 256, K=4)  # 0.5M per group
    assert backend.heuristic_onednn("grouped_linear", 4 * 32 * 256 * 1024, K=4)  # 8M per group
    assert backend.heuristic_onednn("step", 4 * 64 * 256 * 1024, K=4, Hk=256)
    assert not backend.heuristic_onednn("step", 16 * 64 * 64 * 256, K=16, Hk=64)
    monkeypatch.setattr(backend, "cpu_vendor", lambda: "GenuineIntel")
    assert not backend.heuristic_onednn("linear", 32 * 1024 * 2048)


def test_the_model_logs_its_backend_and_stores_its_flags(word_reversal, tmp_path):
    """fairseq-train logs the resolved backend once and saves the --grnn-* flags with the model's args, so that
    fairseq-generate runs the checkpoint on the same setting."""
    save = tmp_path / "ckpt"
    proc = fairseq_cli(
        "fairseq-train", word_reversal.bin, *REVERSAL_MODEL_FLAGS, "--optimizer", "adam", "--lr", "0.001",
        "--batch-size", "64", "--max-update", "2", "--save-dir", save, "--grnn-products", "aten",
        "--grnn-no-defer-weight-grads", "--grnn-persistent-loops", "--no-epoch-checkpoints",
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "grnn_fairseq backend:" in line]
    assert len(lines) == 1 and "products=aten" in lines[0] and "defer_weight_grads=off" in lines[0], lines
    assert "cuda_graphs=off persistent_loops=on" in lines[0], lines
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    model_cfg = state["cfg"]["model"]
    assert model_cfg.grnn_products == "aten" and model_cfg.grnn_no_defer_weight_grads is True
    assert model_cfg.grnn_persistent_loops is True and model_cfg.grnn_cuda_graphs is False
    assert model_cfg.grnn_path == "fused" and model_cfg.grnn_step == "auto" and model_cfg.grnn_benchmark is False


def test_the_same_command_twice_prints_the_same_losses(word_reversal, tmp_path):
    """Default settings at the paper's IWSLT sizes on two threads (products above every size threshold): two runs
    of one fairseq-train command log identical losses and gradient norms, to the last printed digit."""
    def losses(run):
        proc = fairseq_cli(
            "fairseq-train", word_reversal.bin, "--user-dir", REVERSAL_MODEL_FLAGS[1], "--task", "translation",
            "--arch", "group_rnnsearch_iwslt", "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1",
            "--log-format", "simple", "--optimizer", "adam", "--lr", "0.002", "--batch-size", "64", "--max-update",
            "6", "--log-interval", "1", "--disable-validation", "--no-save", "--seed", "3",
            env={"OMP_NUM_THREADS": "2"},
        )  # fmt: skip
        found = re.findall(r"loss=([\d.]+).*?gnorm=([\d.]+)", proc.stdout + proc.stderr)
        assert len(found) == 6, (run, proc.stderr[-2000:])
        return found

    assert losses(1) == losses(2)


GROWTH_SCRIPT = r"""
import re, torch
import grnn_fairseq.modules  # sizes oneDNN's caches where the environment does not
from grnn_fairseq.modules.products import onednn_mm, packed_weight
torch.set_num_threads(1)
rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
weight, x = packed_weight(torch.randn(2048, 512), False, 64), torch.randn(600, 512)
for rows in range(64, 264):  # 200 row counts, a kernel each: more than the bounded caches hold
    onednn_mm(x[:rows], weight)
before = rss()
for rows in range(264, 564):  # 300 more
    onednn_mm(x[:rows], weight)
print(rss() - before)
"""


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and os.path.exists("/proc/self/status")),
                    reason="needs oneDNN and /proc")  # fmt: skip
def test_onednn_kernel_caches_are_bounded():
    """oneDNN compiles and keeps a kernel per row count: in a process that imported grnn_fairseq, 300 new row
    counts past the caches' capacity add little memory; with oneDNN's own 1024 entries per cache (set as a user
    would set them, which the import keeps) they add about 100 MiB on an AMD EPYC."""
    env = {k: v for k, v in os.environ.items() if k not in backend.ONEDNN_CACHE_VARIABLES}

    def growth_mib(**variables):
        run = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT], env={**env, **variables}, check=True,
                             capture_output=True, text=True)  # fmt: skip
        return float(run.stdout.split()[-1])

    bounded = growth_mib()
    unbounded = growth_mib(**{name: "1024" for name in backend.ONEDNN_CACHE_VARIABLES})
    if unbounded < 30:
        pytest.skip(f"this CPU's oneDNN kernels are small: 300 of them in 1024-entry caches took {unbounded:.0f} MiB")
    assert bounded < unbounded / 4, f"300 new shapes took {bounded:.0f} MiB (1024-entry caches: {unbounded:.0f})"
