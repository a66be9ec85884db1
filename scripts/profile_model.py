#!/usr/bin/env python
"""Where a training update of a translation model spends its time: fairseq's own update (its Trainer: the
optimizer, --bf16, gradient clipping) over real batches, under torch.profiler, on CPU or a CUDA GPU.

    python scripts/profile_model.py [DATA_BIN] [--updates 10] [--warmup 5] [--rows 25] [--shapes] \\
        -- --arch group_rnnsearch_iwslt --encoder-groups 4 --decoder-groups 4 [fairseq-train flags]

The flags after ``--`` are fairseq-train's (model and precision: ``--bf16`` on a GPU); the rest of the recipe is
scripts/benchmark_models.py's (Adam, lr 0.001, clip 2.5, --max-tokens 4000, seed 1). After --warmup updates
(allocator, packing, Triton's compilation), --updates updates are profiled. Printed: target words per second
under the profiler, the host's profiled events per update, the host's time per update in each part of fairseq's
update (forward, backward, ..., optimizer) and, on a GPU, the calls in which the host waits for the GPU, the
kernels run and the host's kernel launch calls per update with the GPU's busy time against the wall time (far
below: the update waits on its launches), then the operators by self time on the device (GPU) or the CPU,
grouped by input shapes with --shapes. Diagnostic only: the profiler's own cost lowers the speed;
scripts/benchmark_models.py measures speed.
"""

import argparse
import itertools
import os
import sys
import time

import torch
from torch.autograd import DeviceType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark_models import BATCHING, RECIPE  # noqa: E402
from grnn_fairseq.benchmark import processor_name  # noqa: E402  (grnn_fairseq's safeguards: --bf16 on a GPU)

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
# calls in which the host waits for the GPU (a tensor read back, .item(), an explicit synchronize)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# the parts of fairseq's update that its task and Trainer label with record_function
PHASES = ("forward", "backward", "reduce-grads", "multiply-grads", "clip-grads", "optimizer")


def build(data: str, flags):
    """fairseq's Trainer (task, model, criterion) as fairseq-train builds it, its batches, the parameter count."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--user-dir", os.path.join(ROOT, "grnn_fairseq"), *RECIPE,
                                                *BATCHING["max-tokens"], *flags])  # fmt: skip
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(cfg.dataset.train_subset)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)

    def batches():  # epoch after epoch, as fairseq-train shuffles them
        for epoch in itertools.count(1):
            yield from trainer.get_train_iterator(epoch=epoch, load_dataset=False).next_epoch_itr(shuffle=True)

    return trainer, batches(), sum(p.numel() for p in model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="data/ding-de-en/data-bin")
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    p.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # after it: fairseq-train's model and precision flags
    args, flags = p.parse_args(argv[:cut]), argv[cut + 1 :]
    trainer, batches, params = build(args.data, flags)
    cuda = trainer.device.type == "cuda"
    print(f"{processor_name(trainer.device)} | torch {torch.__version__} | {params / 1e6:.2f}M parameters | "
          f"{' '.join(flags)}", flush=True)

    def update() -> int:
        sample = next(batches)
        trainer.train_step([sample])
        return sample["ntokens"]

    for _ in range(args.warmup):
        update()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities, record_shapes=args.shapes) as prof:
        if cuda:
            torch.cuda.synchronize()
        start, words = time.perf_counter(), 0
        for _ in range(args.updates):
            words += update()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=args.shapes)
    n = args.updates
    print(f"{words / wall:.0f} target words/s under the profiler, {wall / n * 1e3:.1f} ms per update, "
          f"{sum(e.count for e in events if e.device_type == DeviceType.CPU) / n:.0f} host events per update "
          f"(operators, their nested calls, autograd nodes)")
    host = {key: sum(e.cpu_time_total for e in events if e.key == key and e.device_type == DeviceType.CPU) / 1e3 / n
            for key in PHASES}  # fmt: skip
    print(f"host ms per update: {', '.join(f'{key} {ms:.1f}' for key, ms in host.items())}, the rest "
          f"{wall / n * 1e3 - sum(host.values()):.1f}")
    if cuda:
        waits = [e for e in events if e.key in WAITS]
        print(f"per update: {sum(e.count for e in waits) / n:.0f} calls that wait for the GPU "
              f"({sum(e.cpu_time_total for e in waits) / 1e3 / n:.1f} ms)")
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / n  # microseconds -> ms
        launches = sum(e.count for e in events if e.key in LAUNCHES) / n
        print(f"per update: {sum(e.count for e in kernels) / n:.0f} kernels, {launches:.0f} launch calls, GPU busy "
              f"{busy:.1f} ms of {wall / n * 1e3:.1f} ms ({busy / (wall / n * 1e3):.0%})")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
