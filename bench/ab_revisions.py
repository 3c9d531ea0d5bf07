"""Paired A/B timing of two versions of dimezbl_core.py on one training step.

Each version (a git revision, or WORKTREE for the file on disk) is imported as its own module; both
build the same model from the same PyG weights (seeded), their energies and forces are checked to
agree with each other, and then their steps run interleaved (A, B, A, B, ...) after a warm-up each,
so that a slow phase of the machine hits both alike. Prints the per-call times, their medians, and
the median of the paired ratios B / A (below 1: B is faster).

Run: .venv/bin/python -m bench.ab_revisions HEAD WORKTREE [--variant dimenet++] [--kind force_train_step]
     [--workload qm9] [--pairs 6]
DIMEZBL_COMPILED_KERNELS=1 in the environment turns the fused swish kernels on in every version that has them.
Pause other jobs on the machine while it runs.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench import bench_dimenet as bench

WORKTREE = "WORKTREE"


def load_revision(revision: str, tmpdir: str):
    """dimezbl_core.py of `revision` (or the working tree) as a fresh module named after it."""
    if revision == WORKTREE:
        path = os.path.join(bench.REPO, "dimezbl_core.py")
    else:
        source = subprocess.run(
            ["git", "show", f"{revision}:dimezbl_core.py"], cwd=bench.REPO, check=True, capture_output=True, text=True
        ).stdout
        path = os.path.join(tmpdir, f"dimezbl_core_{revision.replace('/', '_')}.py")
        with open(path, "w") as out:
            out.write(source)
    name = f"dimezbl_core_ab_{len(sys.modules)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="git revision of the baseline, or WORKTREE")
    parser.add_argument("b", help="git revision to compare, or WORKTREE")
    parser.add_argument("--variant", default="dimenet++", choices=("dimenet", "dimenet++"))
    parser.add_argument("--kind", default="force_train_step", choices=bench.KINDS)
    parser.add_argument("--workload", default="qm9", choices=("qm9", "md17"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args(argv)
    print(bench.settle_allocator("reuse"))
    torch.manual_seed(bench.SEED)
    reference = bench.pyg_model(args.variant)
    workload = (bench.qm9_workload if args.workload == "qm9" else bench.md17_workload)(args.batch_size)
    print(f"{args.workload}: {workload.stats}; {torch.get_num_threads()} threads; {args.variant} {args.kind}")
    with tempfile.TemporaryDirectory() as tmpdir:
        entries = [
            bench.make_entry(
                rev,
                rev,
                bench.our_model(load_revision(rev, tmpdir), args.variant, False, reference),
                torch.device("cpu"),
            )
            for rev in (args.a, args.b)
        ]
        w = workload
        outputs = [bench.energy_and_forces(e.model, w.z, w.pos, w.batch, create_graph=False) for e in entries]
        for name, (x, y) in (("energy", (outputs[0][0], outputs[1][0])), ("forces", (outputs[0][1], outputs[1][1]))):
            difference = (x - y).abs().max().item()
            scale = y.abs().max().item()
            print(f"{name}: max |B - A| = {difference:.3e} (max |A| = {scale:.3e})")
            if not difference <= 1e-4 * max(scale, 1.0):
                raise SystemExit(f"{args.a} and {args.b} disagree on the {name}: not the same model")
        steps = [bench.make_step(e, workload, args.kind) for e in entries]
        for step in steps:
            step()  # warm-up
        times = ([], [])
        for _ in range(args.pairs):
            for k, step in enumerate(steps):
                start = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - start)
    for label, values in zip((args.a, args.b), times):
        print(
            f"{label:>10}: median {statistics.median(values) * 1e3:7.1f} ms of "
            + ", ".join(f"{v * 1e3:.0f}" for v in values)
        )
    ratios = [b / a for a, b in zip(*times)]
    print(
        f"B / A: median of the {len(ratios)} paired ratios {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}); load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
