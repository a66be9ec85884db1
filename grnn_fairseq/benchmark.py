"""Throughput of GroupLSTM against nn.LSTM: the speed half of Gao et al. (NAACL 2018), figure 4 left.

For every hidden size H the baseline is a one-layer nn.LSTM with input size H; the candidates are one-layer
GroupLSTMs with K groups on the fused path and, for comparison, on the plain autograd path. Every candidate
is timed forward without grad (inference) and forward + backward (training; the input requires grad, as an
embedding output would). The candidates are timed interleaved, round after round, and each keeps the median
of its rounds, so that machine noise hits all of them alike; the ratios are to nn.LSTM in the same run.

    python -m grnn_fairseq.benchmark --hidden 256 1024 --groups 1 2 4 8 16 \\
        --json docs/benchmark-cpu.json --png docs/benchmark-cpu.png

On a CUDA GPU (``--device cuda``) one layer of every candidate is timed with CUDA events (after warm-up rounds,
which hold Triton's compilation; the median of ``--repeats`` interleaved rounds) over a grid of hidden sizes,
groups, sequence lengths, batch sizes and dtypes (defaults: hidden 256 1024 2048, K 1 2 4 8 16, T 35 100,
B 64 128, float32 and bfloat16), forward (no grad) and forward + backward (the input and every weight get
gradients):

* ``cudnn``: ``nn.LSTM(H, H)``, cuDNN's LSTM, the baseline of the ratios;
* ``triton``: the fused group LSTM on the Triton step, shuffle on, at every K (K = 1 included, where the
  layer itself runs cuDNN);
* ``loop-graphs``: the same call with the backend's ``cuda_graphs`` on: the layer replays its forward and
  backward time loops as CUDA graphs of its own (``triton_step.LoopGraphs``: inputs copied in, results out);
* ``persistent``: with ``--persistent``, the same call with the backend's ``persistent_loops`` on: each time
  loop one kernel launch with a grid barrier between steps (opt-in: a barrier that never opened would hang
  the run; ``scripts/gpu-check.sh`` adds it once their CUDA tests pass);
* ``triton-graph``: the whole call (input projections, loops, weight gradients) captured once by the benchmark
  as a CUDA graph and replayed: the bound of what graphs can save (launch latency and Python overhead);
* ``torch-ops``: the fused path on PyTorch operations per step (``--grnn-step torch``; float16/bfloat16 in
  float32, as the layer dispatch runs them there);
* ``flashrnn``: FlashRNN's Triton LSTM (NX-AI, ``pip install flashrnn``) with K heads of H/K, when importable,
  up to ``--flashrnn-max-head`` units per head: a block-diagonal recurrence without the shuffle, G-LSTM (by
  default in the target configuration and its float32 twin: FlashRNN 1.0.8's backward kernel does not compile
  in bfloat16 under Triton 3.6, its float32 kernels do up to 64 units per head).

A candidate whose call fails in one mode (FlashRNN's bfloat16 backward, a graph capture) keeps the other mode's
time and the error in its row.

    python -m grnn_fairseq.benchmark --device cuda --json bench-cuda.json --png bench-cuda.png
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from grnn_fairseq.modules import backend, products
from grnn_fairseq.modules.fused_group_lstm import fused_group_lstm_direction
from grnn_fairseq.modules.group_lstm import GroupLSTM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: nn.Module, x: torch.Tensor, fused: bool) -> Dict[str, Callable[[], None]]:
    """The two timed closures of one candidate: 'fwd' (no grad) and 'fwd_bwd'."""
    gy = torch.randn(x.size(0), x.size(1), model.hidden_size, device=x.device)  # T x B x H
    path = "fused" if fused else "reference"

    def fwd():
        with torch.no_grad(), backend.use(path=path):
            model(x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        x.grad = None
        with backend.use(path=path):
            y, _ = model(x)
        y.backward(gy)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def products_only_steps(H: int, K: int, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The matrix products of the fused path at K groups and nothing else, with the kernels it picks.

    Timing these beside nn.LSTM gives the ceiling of the fused path's ratio on this machine: what it would
    reach if its gate math, shuffle and bookkeeping cost nothing. Forward: the input projections of all
    steps, then one recurrent product per step. Backward adds one product per step (the recurrent input's
    gradient), the input gradient and the two weight gradients over all T*B rows.
    """
    T, B, I = x.shape
    Hk, G4 = H // K, 4 * H // K
    w_ih = torch.randn(K, G4, I // K, device=x.device)
    w_hh = torch.randn(K, G4, Hk, device=x.device)
    w_ih_t = w_ih.transpose(1, 2).contiguous()  # K x I/K x 4H/K
    bias = torch.zeros(K, G4, device=x.device)
    xd = x.detach()
    xg = xd.reshape(T * B, K, I // K).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
    r = torch.randn(K, B, Hk, device=x.device)
    gbuf = torch.empty(K, B, G4, device=x.device)
    dg = torch.randn(K, T * B, G4, device=x.device)
    dr = torch.empty(K, B, Hk, device=x.device)
    G, Xc = torch.empty(K, T * B, G4, device=x.device), torch.empty(K, T * B, I // K, device=x.device)  # reused

    dx = torch.empty(T * B, K, I // K, device=x.device).transpose(0, 1)  # K x (T*B) x I/K view of T x B x I

    def forward(backward_weights=False):
        gs = products.input_projections(xg, w_ih, bias, G, Xc)
        step = products.StepProducts(xd, w_hh, w_hh if backward_weights else None, B)  # weights prepared per call
        for t in range(T):
            step.parts(r, [g[t * B : (t + 1) * B] for g in gs], gbuf)
        return step

    def backward(step):
        for t in range(T):
            step.grad_parts(dg[:, t * B : (t + 1) * B], dr)  # K x B x 4H/K @ K x 4H/K x H/K
        products.input_projections(dg, w_ih_t, None, dx)  # the input gradient
        products.grouped_weight_grad(dg, xg)  # d w_ih
        products.grouped_weight_grad(dg, dg[..., :Hk])  # d w_hh (a T*B x H/K operand of the right shape)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        with torch.no_grad():
            backward(forward(backward_weights=True))

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_hidden(
    H: int, groups: List[int], T: int, B: int, repeats: int, warmup: int, device, autograd: bool, ceiling: bool = True
):
    """Time nn.LSTM and every GroupLSTM candidate at hidden size H; returns one row per candidate."""
    x = torch.randn(T, B, H, device=device, requires_grad=True)  # T x B x H
    cands = [{"name": "nn.LSTM", "K": None, "path": "cudnn" if device.type == "cuda" else "native", "model": nn.LSTM(H, H)}]
    for K in groups:
        if H % K:
            print(f"skipping K={K}: does not divide hidden {H}")
            continue
        model = GroupLSTM(H, H, groups=K)
        cands.append({"name": f"GroupLSTM K={K}", "K": K, "path": "fused", "model": model})
        if autograd:
            cands.append({"name": f"GroupLSTM K={K}", "K": K, "path": "autograd", "model": model})
        if ceiling and K > 1:  # K = 1 runs aten's own LSTM kernel: no products-only counterpart
            cands.append({"name": f"GroupLSTM K={K}", "K": K, "path": "products", "model": model})
    for c in cands:
        c["model"].to(device)
        if c["path"] == "products":
            c["steps"] = products_only_steps(H, c["K"], x)
        else:
            c["steps"] = make_steps(c["model"], x, c["path"] != "autograd")
        c["times"] = {"fwd": [], "fwd_bwd": []}
    for _ in range(warmup):
        for c in cands:
            for fn in c["steps"].values():
                fn()
    for _ in range(repeats):
        for c in cands:  # interleaved: every round times every candidate once
            for mode, fn in c["steps"].items():
                c["times"][mode].append(time_once(fn, device))
    rows = []
    for c in cands:
        row = {
            "hidden": H,
            "name": c["name"],
            "K": c["K"],
            "path": c["path"],
            "params": sum(p.numel() for p in c["model"].parameters()),
        }
        for mode in ("fwd", "fwd_bwd"):
            med = statistics.median(c["times"][mode])
            row[f"{mode}_ms"] = med * 1e3
            row[f"{mode}_tok_s"] = T * B / med
        rows.append(row)
    base = rows[0]
    for row in rows:
        for mode in ("fwd", "fwd_bwd"):
            row[f"{mode}_ratio"] = row[f"{mode}_tok_s"] / base[f"{mode}_tok_s"]
    return rows


def print_table(rows: List[dict], T: int, B: int, device) -> None:
    H = rows[0]["hidden"]
    print(f"\nhidden {H}, T={T}, B={B}, one layer, {device}, {torch.get_num_threads()} threads")
    header = f"{'model':<18}{'path':<10}{'params':>11}{'fwd tok/s':>12}{'x LSTM':>8}{'fwd+bwd tok/s':>15}{'x LSTM':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<18}{r['path']:<10}{r['params']:>11,}{r['fwd_tok_s']:>12,.0f}{r['fwd_ratio']:>7.2f}x"
            f"{r['fwd_bwd_tok_s']:>15,.0f}{r['fwd_bwd_ratio']:>7.2f}x"
        )


def plot(results: List[dict], path: str) -> None:
    """Figure 4 left of the paper, one panel per hidden size: parameters and throughput against K."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # the fairseq import may leave the root at DEBUG
    import matplotlib  # (set before the import, which logs at DEBUG itself)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["hidden"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, H in zip(axes[0], sizes):
        rows = [r for r in results if r["hidden"] == H]
        base = rows[0]
        fused = [r for r in rows if r["path"] == "fused"]
        ks = [r["K"] for r in fused]
        ax.plot(ks, [r["params"] / 1e6 for r in fused], "s-", color="tab:gray", label="parameters")
        ax.axhline(base["params"] / 1e6, color="tab:gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("groups K")
        ax.set_ylabel("parameters (M)")
        ax2 = ax.twinx()
        for mode, color, label in (("fwd_bwd", "tab:blue", "fwd+bwd"), ("fwd", "tab:orange", "fwd (no grad)")):
            ax2.plot(ks, [r[f"{mode}_tok_s"] / 1e3 for r in fused], "o-", color=color, label=f"GroupLSTM {label}")
            ax2.axhline(base[f"{mode}_tok_s"] / 1e3, color=color, ls=":", lw=1, label=f"nn.LSTM {label}")
            top = [r for r in rows if r["path"] == "products"]
            if top:
                ax2.plot([r["K"] for r in top], [r[f"{mode}_tok_s"] / 1e3 for r in top], "^:", color=color,
                         alpha=0.6, label=f"products only (ceiling) {label}")
            old = [r for r in rows if r["path"] == "autograd"]
            if old:
                ax2.plot([r["K"] for r in old], [r[f"{mode}_tok_s"] / 1e3 for r in old], "x--", color=color,
                         alpha=0.5, label=f"autograd path {label}")
        ax2.set_ylabel("thousand tokens / s")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"hidden {H}")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# x86 CPU generations by (vendor, family, model), for the names virtual machines hide ("Intel(R) Xeon(R) Processor")
CPU_GENERATIONS = {
    ("GenuineIntel", 6, 143): "Sapphire Rapids",
    ("GenuineIntel", 6, 207): "Emerald Rapids",
    ("GenuineIntel", 6, 173): "Granite Rapids",
    ("GenuineIntel", 6, 106): "Ice Lake",
    ("GenuineIntel", 6, 85): "Skylake/Cascade Lake",
    ("AuthenticAMD", 23, 49): "Zen 2 (Rome)",
    ("AuthenticAMD", 25, 1): "Zen 3 (Milan)",
    ("AuthenticAMD", 25, 17): "Zen 4 (Genoa)",
    ("AuthenticAMD", 26, 2): "Zen 5 (Turin)",
}


def processor_name(device: Optional[torch.device] = None) -> str:
    """The CPU's model name with its vendor, family and model numbers (or the GPU's name): kernel choices and
    ratios differ between processors, and virtual machines often report a generic name."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        import platform

        return platform.processor() or platform.machine()
    vendor, family, model = fields.get("vendor_id", "?"), int(fields.get("cpu family", -1)), int(fields.get("model", -1))
    generation = CPU_GENERATIONS.get((vendor, family, model))
    detail = f"{vendor} family {family} model {model}" + (f", {generation}" if generation else "")
    return f"{fields['model name']} ({detail})"


# ------------------------------------------------------------------------------------------------ CUDA

CUDA_DEFAULTS = {"hidden": [256, 1024, 2048], "seq_len": [35, 100], "batch": [64, 128],
                 "dtype": ["float32", "bfloat16"], "repeats": 20, "warmup": 3}  # fmt: skip
CPU_DEFAULTS = {"hidden": [256, 1024], "seq_len": [35], "batch": [64], "dtype": ["float32"], "repeats": 7, "warmup": 1}
TARGET = {"hidden": 1024, "dtype": "bfloat16", "seq_len": 35, "batch": 64}  # the targets are read here
# the configurations timed first, and where FlashRNN runs by default: the target and its float32 twin
TARGETS = [(TARGET["hidden"], TARGET["seq_len"], TARGET["batch"], dtype) for dtype in (TARGET["dtype"], "float32")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_grid(hidden, seq_lens, batches, dtypes):
    """The (H, T, B, dtype) configurations in timing order: those of ``TARGETS`` first, in its order (a run stopped
    by --max-minutes has them), then the rest in command-line order."""
    grid = [(H, T, B, dt) for H, dt, T, B in itertools.product(hidden, dtypes, seq_lens, batches)]
    grid.sort(key=lambda c: TARGETS.index(c) if c in TARGETS else len(TARGETS))  # stable: the rest keep their order
    return grid


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph (after two warm-up calls on a side stream, as PyTorch asks); returns the
    graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def layer_steps(call: Callable[[], torch.Tensor], inputs: List[torch.Tensor], gy: torch.Tensor):
    """'fwd' (no grad) and 'fwd_bwd' (the gradients of every input of ``inputs``) closures of a layer call
    returning its output T x B x H."""

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), inputs, gy)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def cuda_candidates(
    H: int, K: int, x: torch.Tensor, gy: torch.Tensor, flashrnn, flashrnn_max_head: int = 128, persistent=False
) -> List[dict]:
    """The GroupLSTM candidates at K groups (module docstring): name, path, params and a maker of the timed
    closures. FlashRNN's row is left untried above ``flashrnn_max_head`` units per head (its Triton kernels hold
    a head's recurrent weights in one program); persistent: with the persistent loops' row."""
    T, B, _ = x.shape
    model = GroupLSTM(H, H, groups=K).to(device=x.device, dtype=x.dtype)
    weights = list(model.layer_weights(0, 0))  # w_ih, w_hh, b_ih, b_hh
    h0 = x.new_zeros(B, H)
    params = sum(p.numel() for p in model.parameters())
    inputs = [x] + weights

    def triton_call():
        with backend.use(step="triton"):
            return fused_group_lstm_direction(x, h0, h0, *weights, True, aten_at_one_group=False)[0]

    def loop_graphs_call():  # the layer's own CUDA graphs of its time loops (backend cuda_graphs)
        with backend.use(step="triton", cuda_graphs=True):
            return fused_group_lstm_direction(x, h0, h0, *weights, True, aten_at_one_group=False)[0]

    def persistent_call():  # a launch per time loop (backend persistent_loops)
        with backend.use(step="triton", persistent_loops=True):
            return fused_group_lstm_direction(x, h0, h0, *weights, True, aten_at_one_group=False)[0]

    def torch_ops_call():  # the dispatch's float32 up-cast for half inputs on a non-Triton step
        up = [v.float() for v in [x, h0] + weights]
        with backend.use(step="torch"):
            out = fused_group_lstm_direction(up[0], up[1], up[1], *up[2:], True, aten_at_one_group=False)[0]
        return out.to(x.dtype)

    name = f"GroupLSTM K={K}"
    cands = [{"name": name, "K": K, "path": "triton", "params": params,
              "make": lambda: layer_steps(triton_call, inputs, gy)},
             {"name": name, "K": K, "path": "triton-graph", "params": params,
              "make": lambda: {m: graphed(f) for m, f in layer_steps(triton_call, inputs, gy).items()}},
             {"name": name, "K": K, "path": "loop-graphs", "params": params,
              "make": lambda: layer_steps(loop_graphs_call, inputs, gy)},
             {"name": name, "K": K, "path": "torch-ops", "params": params,
              "make": lambda: layer_steps(torch_ops_call, inputs, gy)}]  # fmt: skip
    if persistent:
        cands.insert(3, {"name": name, "K": K, "path": "persistent", "params": params,
                         "make": lambda: layer_steps(persistent_call, inputs, gy)})  # fmt: skip
    if flashrnn is not None:
        cands.append({"name": f"FlashRNN {K} heads", "K": K, "path": "flashrnn", "params": params,
                      "make": lambda: flashrnn_steps(flashrnn, H, K, x, gy, flashrnn_max_head)})  # fmt: skip
    return cands


def flashrnn_steps(flashrnn, H: int, K: int, x: torch.Tensor, gy: torch.Tensor, max_head: int):
    """FlashRNN's Triton LSTM with K heads of H/K (its ``triton_fused`` backend), input projections by the same
    grouped product as ours, gates i, f, z, o: the G-LSTM without the shuffle."""
    T, B, I = x.shape
    Hk, dt = H // K, x.dtype
    if Hk > max_head:
        raise ValueError(f"not tried: {Hk} units per head > --flashrnn-max-head {max_head}")
    s = 1.0 / H**0.5
    w_ih = (s * torch.randn(K, 4 * Hk, I // K, device=x.device)).to(dt).requires_grad_(True)
    R = (s * torch.randn(4, K, Hk, Hk, device=x.device)).to(dt).requires_grad_(True)  # gates, heads, out, in
    b = torch.zeros(4, K, Hk, device=x.device, dtype=dt, requires_grad=True)
    kernel_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
    gy_heads = gy.view(T, B, K, Hk).transpose(0, 1)  # T x B x H -> B x T x K x H/K

    def call():
        xg = x.reshape(T * B, K, I // K).transpose(0, 1)  # T x B x I -> K x (T*B) x I/K
        gx = torch.bmm(xg, w_ih.transpose(1, 2))  # K x (T*B) x 4H/K
        Wx = gx.view(K, T, B, 4, Hk).permute(2, 1, 3, 0, 4)  # -> B x T x 4 x K x H/K (FlashRNN's BTGHD)
        states, _ = flashrnn(Wx, R, b, function="lstm", backend="triton_fused", dtype=kernel_dtype)
        return states[0]  # h: B x T x K x H/K

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), [x, w_ih, R, b], gy_heads)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def time_cuda(fn: Callable[[], None]) -> float:
    """One run of ``fn`` timed with CUDA events, in seconds (synchronizes)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


MODES = ("fwd", "fwd_bwd")


def error_text(e: BaseException) -> str:
    """One line for a row: the exception's type, its first line and, for a compiler's message (which starts with
    the place and ends with the cause), its last."""
    lines = [v.strip() for v in str(e).splitlines() if v.strip()]
    message = lines[0] if lines else ""
    if len(lines) > 1:
        message += " ... " + lines[-1]
    return f"{type(e).__name__}: {message}"[:400]


def time_candidates(cands: List[dict], repeats: int, warmup: int, timer: Callable[[Callable[[], None]], float],
                    synchronize: Callable[[], None], after_failure: Callable[[dict], None]) -> None:  # fmt: skip
    """Time every candidate's modes (``MODES``): each candidate's ``make()`` gives its closures, each run ``warmup``
    times, then ``repeats`` interleaved rounds in which ``timer`` times each closure once; the seconds go to
    ``c["times"][mode]``. A mode whose closure raises is not run again and the other mode goes on; ``c["error"]``
    says why, the failed mode named unless both failed alike (a ``make()`` that raises fails both).
    ``after_failure(c)`` runs after each failure (on CUDA: a synchronize that ends the run on a sticky error)."""

    def failed(c, modes, e):
        for mode in modes:
            c["steps"].pop(mode, None)
            c["errors"][mode] = error_text(e)
        texts = set(c["errors"].values())
        whole = len(c["errors"]) == len(MODES) and len(texts) == 1
        c["error"] = texts.pop() if whole else "; ".join(f"{m}: {t}" for m, t in c["errors"].items())
        after_failure(c)

    for c in cands:
        c["times"], c["errors"] = {mode: [] for mode in MODES}, {}
        try:
            c["steps"] = dict(c["make"]())
        except Exception as e:  # noqa: BLE001
            c["steps"] = {}
            failed(c, MODES, e)
            continue
        for mode in MODES:
            try:
                for _ in range(warmup):
                    c["steps"][mode]()
                synchronize()
            except Exception as e:  # noqa: BLE001
                failed(c, [mode], e)
    for _ in range(repeats):
        for c in cands:  # interleaved: every round times every candidate once
            for mode in [m for m in MODES if m in c["steps"]]:
                try:
                    c["times"][mode].append(timer(c["steps"][mode]))
                except Exception as e:  # noqa: BLE001
                    failed(c, [mode], e)


def bench_cuda_config(H, groups, T, B, dtype_name, repeats, warmup, device, flashrnn, flashrnn_max_head=128,
                      persistent=False):  # fmt: skip
    """Every candidate at one (H, T, B, dtype), timed by ``time_candidates``: warm-up rounds, then ``repeats``
    interleaved timed rounds; a candidate that fails in a mode keeps its error in its row."""
    dt = DTYPES[dtype_name]
    x = torch.randn(T, B, H, device=device).to(dt).requires_grad_(True)  # T x B x H
    gy = torch.randn(T, B, H, device=device).to(dt)
    lstm = nn.LSTM(H, H).to(device=device, dtype=dt)
    lstm.flatten_parameters()  # cuDNN's one weight buffer (else it compacts the weights on every call)
    lstm_inputs = [x] + list(lstm.parameters())
    cands = [{"name": "nn.LSTM", "K": None, "path": "cudnn", "params": sum(p.numel() for p in lstm.parameters()),
              "make": lambda: layer_steps(lambda: lstm(x)[0], lstm_inputs, gy)}]  # fmt: skip
    for K in groups:
        if H % K or (H // K) % K:
            print(f"skipping K={K}: does not divide hidden {H} and H/K (the shuffle)")
            continue
        cands.extend(cuda_candidates(H, K, x, gy, flashrnn, flashrnn_max_head, persistent))
    cands.sort(key=lambda c: c["path"] == "flashrnn")  # another library's kernels last: an error there is theirs

    def end_on_sticky_error(c):  # after a failure: a sticky CUDA error ends the run (nothing more can be timed)
        try:
            torch.cuda.synchronize(device)
        except RuntimeError as e:
            raise SystemExit(f"{c['name']} ({c['path']}) left the GPU in an error state: {c['error']}") from e

    time_candidates(cands, repeats, warmup, time_cuda, lambda: torch.cuda.synchronize(device), end_on_sticky_error)
    rows = []
    for c in cands:
        row = {"hidden": H, "seq_len": T, "batch": B, "dtype": dtype_name, "name": c["name"], "K": c["K"],
               "path": c["path"], "params": c["params"]}  # fmt: skip
        for mode in MODES:
            med = statistics.median(c["times"][mode]) if c["times"][mode] else None
            row[f"{mode}_ms"] = None if med is None else med * 1e3
            row[f"{mode}_tok_s"] = None if med is None else T * B / med
        if "error" in c:
            row["error"] = c["error"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        for mode in MODES:
            ok = row[f"{mode}_tok_s"] is not None and base[f"{mode}_tok_s"] is not None
            row[f"{mode}_ratio"] = row[f"{mode}_tok_s"] / base[f"{mode}_tok_s"] if ok else None
    del cands
    return rows


def print_cuda_table(rows: List[dict]) -> None:
    r0 = rows[0]
    print(f"\nhidden {r0['hidden']}, T={r0['seq_len']}, B={r0['batch']}, {r0['dtype']}, one layer")
    header = f"{'model':<20}{'path':<14}{'params':>11}{'fwd ms':>9}{'x cuDNN':>9}{'fwd+bwd ms':>12}{'x cuDNN':>9}"
    print(header)
    print("-" * len(header))

    def cells(r, mode, width):  # a mode's time and ratio, or dashes where it has none
        if r[f"{mode}_ms"] is None:
            return f"{'-':>{width}}{'-':>9}"
        return f"{r[f'{mode}_ms']:>{width}.3f}{r[f'{mode}_ratio'] or 0:>8.2f}x"

    for r in rows:
        error = f"  {r['error']}" if "error" in r else ""
        print(f"{r['name']:<20}{r['path']:<14}{r['params']:>11,}{cells(r, 'fwd', 9)}{cells(r, 'fwd_bwd', 12)}{error}")


def plot_cuda(results: List[dict], path: str) -> None:
    """Forward + backward throughput against K, one panel per hidden size (rows: dtypes), at the first
    sequence length and batch of the run; cuDNN's LSTM as a dotted line."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, B = results[0]["seq_len"], results[0]["batch"]
    sizes = sorted({r["hidden"] for r in results})
    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(len(dtypes), len(sizes), figsize=(5 * len(sizes), 3.8 * len(dtypes)), squeeze=False)
    styles = {"triton": "o-", "loop-graphs": "d-", "persistent": "v-", "triton-graph": "s-", "torch-ops": "x--",
              "flashrnn": "^:"}  # fmt: skip
    for (i, dt), (j, H) in itertools.product(enumerate(dtypes), enumerate(sizes)):
        ax = axes[i][j]
        rows = [r for r in results if (r["hidden"], r["dtype"], r["seq_len"], r["batch"]) == (H, dt, T, B)]
        for candidate, style in styles.items():
            pts = [(r["K"], r["fwd_bwd_tok_s"]) for r in rows if r["path"] == candidate and r["fwd_bwd_tok_s"]]
            if pts:
                ax.plot([k for k, _ in pts], [v / 1e3 for _, v in pts], style, label=candidate)
        base = [r for r in rows if r["path"] == "cudnn" and r["fwd_bwd_tok_s"]]
        if base:
            ax.axhline(base[0]["fwd_bwd_tok_s"] / 1e3, color="k", ls=":", lw=1, label="cuDNN nn.LSTM")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("groups K")
        ax.set_ylabel("thousand tokens / s (fwd+bwd)")
        ax.set_title(f"hidden {H}, {dt}, T={T}, B={B}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def import_flashrnn():
    """FlashRNN's entry point, or None where it is not importable (the benchmark then leaves its rows out)."""
    try:
        from flashrnn import flashrnn
    except Exception:  # noqa: BLE001  (any import failure: not installed, or broken against this torch/triton)
        return None
    return flashrnn


def main_cuda(args) -> List[dict]:
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA GPU on this machine; the CUDA "
                         f"benchmark needs one (scripts/gpu-check.sh runs it on a GPU machine)")  # fmt: skip
    device = torch.device(args.device)
    flashrnn = None if args.flashrnn == "off" else import_flashrnn()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, FlashRNN "
          f"{'importable' if flashrnn else 'not importable (its rows are left out)'}", flush=True)  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    results, skipped = [], []
    grid = cuda_grid(args.hidden, args.seq_len, args.batch, args.dtype)
    for n, (H, T, B, dt) in enumerate(grid):
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            skipped.append({"hidden": H, "seq_len": T, "batch": B, "dtype": dt})
            continue
        with_flashrnn = flashrnn if args.flashrnn == "all" or (H, T, B, dt) in TARGETS else None
        rows = bench_cuda_config(H, args.groups, T, B, dt, args.repeats, args.warmup, device, with_flashrnn,
                                 args.flashrnn_max_head, args.persistent)  # fmt: skip
        print_cuda_table(rows)
        sys.stdout.flush()
        results.extend(rows)
        if args.json:  # after every configuration: a run stopped from outside keeps what it measured
            write_cuda_json(args, device, flashrnn, results, skipped, grid[n + 1 :], time.perf_counter() - start)
        if args.png:
            plot_cuda(results, args.png)
    if skipped:
        print(f"\n--max-minutes {args.max_minutes}: {len(skipped)} configurations not timed: "
              + ", ".join(f"H={c['hidden']} T={c['seq_len']} B={c['batch']} {c['dtype']}" for c in skipped))
    if args.json:
        write_cuda_json(args, device, flashrnn, results, skipped, [], time.perf_counter() - start)
    return results


def write_cuda_json(args, device, flashrnn, results, skipped, pending, seconds) -> None:
    """The CUDA run's rows and configuration; ``pending``: the configurations not reached yet."""
    import triton

    meta = {
        "device": str(device),
        "gpu": processor_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "flashrnn": "not importable" if flashrnn is None else args.flashrnn,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": "CUDA events, median of the interleaved rounds",
        "skipped": skipped,
        "pending": [{"hidden": H, "seq_len": T, "batch": B, "dtype": dt} for H, T, B, dt in pending],
        "seconds": seconds,
        "backend": backend.describe(),
    }
    with open(args.json, "w") as f:
        json.dump({"config": meta, "rows": results}, f, indent=1)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", help="default: 256 1024 (CPU), 256 1024 2048 (CUDA)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seq-len", type=int, nargs="+",
                        help="35: the PTB truncated-BPTT length of the paper (default; CUDA: 35 100)")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 64 (CPU), 64 128 (CUDA)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                        help="CUDA only (default float32 bfloat16); the CPU benchmark runs float32")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds; the median is kept (default 7, CUDA 20)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1, CUDA 3: Triton compiles there)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-autograd", action="store_true", help="CPU: skip the plain autograd path")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="CPU: skip the products-only rows (the fused path's ceiling)"
    )
    parser.add_argument("--flashrnn", choices=["all", "target", "off"], default="all",
                        help="CUDA: FlashRNN's rows (when importable) in every configuration, in the target "
                             "configuration and its float32 twin only (its kernels compile per T, B and head "
                             "size), or none")
    parser.add_argument("--flashrnn-max-head", type=int, default=128,
                        help="CUDA: FlashRNN's rows only up to this many units per head (default 128)")
    parser.add_argument("--persistent", action="store_true",
                        help="CUDA: time the persistent loops too (one launch per time loop)")
    parser.add_argument("--max-minutes", type=float,
                        help="CUDA: start no new configuration after this many minutes (the rest are listed)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--png", help="draw the figure here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if device.type == "cuda":
        return main_cuda(args)
    if len(args.seq_len) > 1 or len(args.batch) > 1 or args.dtype != ["float32"]:
        parser.error("--seq-len, --batch and --dtype take one value each (float32) on the CPU; lists are for "
                     "--device cuda")
    T, B = args.seq_len[0], args.batch[0]
    torch.manual_seed(0)
    results = []
    for H in args.hidden:
        rows = bench_hidden(H, args.groups, T, B, args.repeats, args.warmup, device, not args.no_autograd,
                            not args.no_ceiling)  # fmt: skip
        print_table(rows, T, B, device)
        results.extend(rows)
    meta = {
        "seq_len": T,
        "batch": B,
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": processor_name(device),
        "backend": backend.describe(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": meta, "rows": results}, f, indent=1)
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    main()
