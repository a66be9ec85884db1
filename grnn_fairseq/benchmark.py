"""Throughput of GroupLSTM against nn.LSTM: the speed half of Gao et al. (NAACL 2018), figure 4 left.

For every hidden size H the baseline is a one-layer nn.LSTM with input size H; the candidates are one-layer
GroupLSTMs with K groups on the fused path and, for comparison, on the plain autograd path. Every candidate
is timed forward without grad (inference) and forward + backward (training; the input requires grad, as an
embedding output would). The candidates are timed interleaved, round after round, and each keeps the median
of its rounds, so that machine noise hits all of them alike; the ratios are to nn.LSTM in the same run.

    python -m grnn_fairseq.benchmark --hidden 256 1024 --groups 1 2 4 8 16 \\
        --json docs/benchmark-cpu.json --png docs/benchmark-cpu.png
"""

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from grnn_fairseq.modules import fused_group_lstm as fgl
from grnn_fairseq.modules import group_lstm, linear
from grnn_fairseq.modules.group_lstm import GroupLSTM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: nn.Module, x: torch.Tensor, fused: bool) -> Dict[str, Callable[[], None]]:
    """The two timed closures of one candidate: 'fwd' (no grad) and 'fwd_bwd'."""
    gy = torch.randn(x.size(0), x.size(1), model.hidden_size, device=x.device)  # T x B x H

    def select():
        if isinstance(model, GroupLSTM):
            group_lstm.set_fused(fused)

    def fwd():
        select()
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        select()
        model.zero_grad(set_to_none=True)
        x.grad = None
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

    def forward(backward_weights=False):
        gs = fgl._grouped_linear(xg, w_ih, bias, G, Xc)
        products = fgl._StepProducts(xd, w_hh, w_hh if backward_weights else None, B)  # weights prepared per call
        for t in range(T):
            products.parts(r, [g[t * B : (t + 1) * B] for g in gs], gbuf)
        return products

    def backward(products):
        for t in range(T):
            products.grad_parts(dg[:, t * B : (t + 1) * B], dr)  # K x B x 4H/K @ K x 4H/K x H/K
        if fgl._use_mkldnn(xd):
            torch.cat(fgl._grouped_linear(dg, w_ih_t, None), dim=1)
        else:
            torch.bmm(dg, w_ih)
        fgl._grouped_weight_grad(dg, xg)  # d w_ih
        fgl._grouped_weight_grad(dg, dg[..., :Hk])  # d w_hh (a T*B x H/K operand of the right shape)

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
    previous = group_lstm.set_fused(True)
    try:
        for _ in range(warmup):
            for c in cands:
                for fn in c["steps"].values():
                    fn()
        for _ in range(repeats):
            for c in cands:  # interleaved: every round times every candidate once
                for mode, fn in c["steps"].items():
                    c["times"][mode].append(time_once(fn, device))
    finally:
        group_lstm.set_fused(previous)
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


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seq-len", type=int, default=35, help="35: the PTB truncated-BPTT length of the paper")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds; the median is kept")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-autograd", action="store_true", help="skip the plain autograd path")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the products-only rows (the fused path's ceiling)"
    )
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--png", help="draw the figure here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = []
    for H in args.hidden:
        rows = bench_hidden(
            H, args.groups, args.seq_len, args.batch, args.repeats, args.warmup, device, not args.no_autograd,
            not args.no_ceiling,
        )
        print_table(rows, args.seq_len, args.batch, device)
        results.extend(rows)
    meta = {
        "seq_len": args.seq_len,
        "batch": args.batch,
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": processor_name(device),
        "products": linear.PRODUCTS,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": meta, "rows": results}, f, indent=1)
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    main()
