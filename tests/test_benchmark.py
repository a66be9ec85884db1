"""``python -m grnn_fairseq.benchmark`` at a tiny size: every path runs, the table, JSON and PNG are written, and
the rows say what they measured (the speed itself is the benchmark's business, not a test's)."""

import json
import subprocess
import sys

from conftest import ROOT

from grnn_fairseq import benchmark


def test_benchmark_writes_rows_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rows = benchmark.main([
        "--hidden", "16", "--groups", "1", "2", "3", "4", "--seq-len", "3", "--batch", "2", "--repeats", "2",
        "--json", str(out_json), "--png", str(out_png),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "skipping K=3: does not divide hidden 16" in printed
    assert "nn.LSTM" in printed and "products" in printed
    # nn.LSTM; K=1 fused + autograd (no products-only row: aten's kernel); K=2 and K=4: fused, autograd, products
    assert [(r["K"], r["path"]) for r in rows] == [
        (None, "native"), (1, "fused"), (1, "autograd"), (2, "fused"), (2, "autograd"), (2, "products"),
        (4, "fused"), (4, "autograd"), (4, "products"),
    ]  # fmt: skip
    assert rows[0]["fwd_ratio"] == rows[0]["fwd_bwd_ratio"] == 1.0
    for r in rows:
        assert r["fwd_tok_s"] > 0 and r["fwd_bwd_tok_s"] > 0
    params = {(r["K"], r["path"]): r["params"] for r in rows}
    assert params[(1, "fused")] == params[(None, "native")]  # K = 1 is nn.LSTM's parameter count
    assert params[(4, "fused")] < params[(2, "fused")] < params[(1, "fused")]
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {"processor", "backend", "threads", "torch"} <= set(saved["config"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_command_line():
    run = subprocess.run(
        [sys.executable, "-m", "grnn_fairseq.benchmark", "--hidden", "8", "--groups", "2", "--seq-len", "2",
         "--batch", "2", "--repeats", "1", "--no-autograd", "--no-ceiling"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "GroupLSTM K=2" in run.stdout and "products" not in run.stdout


def test_cuda_grid_times_the_target_and_its_float32_twin_first():
    """The issue's target configuration, then its float32 twin (where FlashRNN's kernels run forward and
    backward), so that a run cut short by --max-minutes has both; every configuration once."""
    d = benchmark.CUDA_DEFAULTS
    grid = benchmark.cuda_grid(d["hidden"], d["seq_len"], d["batch"], d["dtype"])
    assert grid[:2] == [(1024, 35, 64, "bfloat16"), (1024, 35, 64, "float32")] == benchmark.TARGETS
    assert sorted(grid) == sorted(set(grid)) and len(grid) == 3 * 2 * 2 * 2


class FakeCompilationError(Exception):
    pass


def test_a_mode_that_fails_keeps_the_other_modes_times(capsys):
    """FlashRNN 1.0.8 under Triton 3.6: the forward runs, the bfloat16 backward does not compile. The failed mode
    is dropped with its error (the compiler's place and cause), the other mode is timed in every round; a
    candidate whose closures cannot be made fails both modes with one message."""
    calls = {"fwd": 0, "fwd_bwd": 0, "after_failure": []}

    def forward():
        calls["fwd"] += 1

    def backward():
        calls["fwd_bwd"] += 1
        raise FakeCompilationError("at 251:27:\n    matCtrans_t_tanh = triton_tanh(matC_t)\n"
                                   "Expected dtype ['fp32', 'fp64'] but got bf16")  # Triton's message, shortened

    def unmakeable():
        raise ValueError("not tried: 256 units per head > --flashrnn-max-head 128")

    cands = [{"name": "nn.LSTM", "path": "cudnn", "make": lambda: {"fwd": lambda: None, "fwd_bwd": lambda: None}},
             {"name": "FlashRNN 16 heads", "path": "flashrnn", "make": lambda: {"fwd": forward, "fwd_bwd": backward}},
             {"name": "FlashRNN 4 heads", "path": "flashrnn", "make": unmakeable}]  # fmt: skip
    benchmark.time_candidates(cands, repeats=3, warmup=2, timer=lambda fn: fn() or 0.002, synchronize=lambda: None,
                              after_failure=lambda c: calls["after_failure"].append(c["name"]))  # fmt: skip
    base, flash, untried = cands
    assert base["times"] == {"fwd": [0.002] * 3, "fwd_bwd": [0.002] * 3} and "error" not in base
    assert flash["times"] == {"fwd": [0.002] * 3, "fwd_bwd": []}
    assert calls["fwd"] == 2 + 3 and calls["fwd_bwd"] == 1  # warm-up and rounds; the failed mode ran once
    assert flash["error"] == ("fwd_bwd: FakeCompilationError: at 251:27: ... Expected dtype ['fp32', 'fp64'] "
                              "but got bf16")  # fmt: skip
    assert untried["times"] == {"fwd": [], "fwd_bwd": []}
    assert untried["error"] == "ValueError: not tried: 256 units per head > --flashrnn-max-head 128"
    assert calls["after_failure"] == ["FlashRNN 16 heads", "FlashRNN 4 heads"]

    config = {"hidden": 1024, "seq_len": 35, "batch": 64, "dtype": "bfloat16", "params": 1}
    rows = [{"name": c["name"], "path": c["path"], **config, "fwd_ratio": 1.0, "fwd_bwd_ratio": 1.0,
             **{f"{m}_ms": 2.0 if c["times"][m] else None for m in benchmark.MODES},
             **({"error": c["error"]} if "error" in c else {})} for c in cands]  # fmt: skip
    benchmark.print_cuda_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[5:8] == ["2.000", "1.00x", "-"] and lines[-2].endswith(flash["error"])
    assert lines[-1].split()[5:9] == ["-", "-", "-", "-"] and lines[-1].endswith(untried["error"])
