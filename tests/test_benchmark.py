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
