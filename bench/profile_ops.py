"""Where a training step's time goes, op by op, for our models and PyG's side by side.

torch.profiler's self times misattribute the cost of small operations inside a double backward (it put the
[T, 8] x [8, 42] SBF gradient product at 27 ms where it takes 1.6 ms), so this script times every aten call
itself: a ``TorchDispatchMode`` wraps each call in ``time.perf_counter`` (CPU: the calls are synchronous). The
calls of the autograd engine's backward passes run on the calling thread on the CPU and are timed as well.
The op times add up to most of the step; the rest is Python, autograd bookkeeping and the timer itself.

For each model: the median over ``--repeat`` timed steps (after one warm-up) of the step's wall time and of the
summed op time, then the op groups (aten op name and the shape of its first tensor argument, bucketed by which
of the batch's sizes N atoms / E edges / T triplets its leading dimension is) with the most time.

Run: .venv/bin/python -m bench.profile_ops [--models ours_dimenetpp pyg_dimenetpp] [--kind force_train_step]
     [--workload qm9] [--repeat 3] [--top 30] [--out results/benchmark/profile_<workload>_<kind>.txt]
Pause other jobs on the machine while it runs; the numbers are per step of a batch of 32 molecules.
Our models run their eager path here: the fused C kernels (dimezbl_core.CompiledKernels) do not run
under a dispatch mode, so the op timer cannot see them; bench_dimenet.py times them.
"""

import argparse
import collections
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import bench_dimenet as bench


class OpTimer(TorchDispatchMode):
    """Accumulates wall seconds and call counts per (op, shape class) key."""

    def __init__(self, classify):
        super().__init__()
        self.classify = classify
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        key = (func.overloadpacket.__name__, self.classify(args))
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out


def shape_classifier(stats):
    sizes = {stats["atoms"]: "N", stats["edges"]: "E", stats["triplets"]: "T"}

    def name(size):
        return sizes.get(size, str(size))

    def classify(args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.layout != torch.strided:
                    return f"sparse[{'x'.join(name(s) for s in arg.shape)}]"
                return "[" + "x".join(name(s) for s in arg.shape) + "]"
            if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
                return "list[" + "x".join(name(s) for s in arg[0].shape) + "]"
        return "-"

    return classify


class Output:
    """Prints each text (flushed) and keeps its lines, for --out."""

    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.extend(str(text).split("\n"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ours_dimenetpp", "pyg_dimenetpp"])
    parser.add_argument("--kind", default="force_train_step", choices=bench.KINDS)
    parser.add_argument("--workload", default="qm9", choices=("qm9", "md17"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--out",
        help="also write the output, under a provenance header (command, commit, date, "
        "machine, load), to this text file",
    )
    args = parser.parse_args(argv)
    emit = Output()
    emit(bench.settle_allocator("reuse"))
    if args.threads:
        torch.set_num_threads(args.threads)
    bench.patch_pyg("cached")
    entries = bench.build_models(torch.device("cpu"))
    workload = (bench.qm9_workload if args.workload == "qm9" else bench.md17_workload)(args.batch_size)
    emit(f"{args.workload}: {workload.stats}; {torch.get_num_threads()} threads; {args.kind}")
    classify = shape_classifier(workload.stats)
    for key in args.models:
        step = bench.make_step(entries[key], workload, args.kind)
        step()  # warm-up (and the PyG graph cache)
        walls, timers = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            step()
            plain = time.perf_counter() - start
            timer = OpTimer(classify)
            start = time.perf_counter()
            with timer:
                step()
            walls.append((plain, time.perf_counter() - start))
            timers.append(timer)
        total = collections.Counter()
        for timer in timers:
            total.update(timer.seconds)
        calls = timers[0].calls
        n = len(timers)
        op_sum = statistics.median(sum(t.seconds.values()) for t in timers)
        emit(
            f"\n== {entries[key].label}: step {statistics.median(w[0] for w in walls) * 1e3:.0f} ms "
            f"(under the timer {statistics.median(w[1] for w in walls) * 1e3:.0f} ms, op sum "
            f"{op_sum * 1e3:.0f} ms, {sum(calls.values())} aten calls)"
        )
        by_op = collections.Counter()
        for (op, _), seconds in total.items():
            by_op[op] += seconds / n
        emit("   by op: " + ", ".join(f"{op} {s * 1e3:.0f}" for op, s in by_op.most_common(15)))
        emit(f"   {'ms':>7} {'calls':>6}  op, first tensor argument")
        for (op, shape), seconds in total.most_common(args.top):
            emit(f"   {seconds / n * 1e3:7.1f} {calls[(op, shape)]:6d}  {op} {shape}")
    if args.out:
        write_output(
            args.out, emit.lines, bench.provenance(argparse.Namespace(pyg_graph="cached"), torch.device("cpu"))
        )


def write_output(path, lines, info) -> None:
    """The printed lines under a '# key: value' provenance header, written to a temporary name and renamed."""
    info = dict(
        info,
        loadavg_at_end=[round(x, 2) for x in os.getloadavg()],
        note="times per step in ms: medians of the timed steps after 1 warm-up",
    )
    header = [f"# {key}: {value}" for key, value in info.items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write("\n".join(header + lines) + "\n")
    os.replace(tmp, path)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
