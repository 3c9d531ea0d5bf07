"""Speed and memory of DimezblNet against PyTorch Geometric's DimeNet and DimeNet++, side by side.

One process, one run: PyG 2.8.1's ``DimeNet`` and ``DimeNetPlusPlus`` (unchanged) and ``dimezbl_core.DimezblNet``
(DimeNet, DimeNet + ZBL, DimeNet++) with identical hyperparameters and identical weights (PyG's state dict loaded
with ``load_pyg_dimenet_state_dict``; ``output_initializer="glorot_orthogonal"`` so that outputs are not zero),
float32, on two workloads of 32 molecules:

  qm9    the first 32 molecules of DimeNet's QM9 training split (``qm9_split()[0]``), real geometries;
  md17   32 copies of the 21-atom aspirin start geometry (``md17_start_geometry("aspirin")``), each displaced by
         seeded Gaussian noise (0.05 Angstrom per coordinate), i.e. MD17-sized molecules.

Measured for every model and workload (molecules per second from the median of the timed calls):

  forward            energies, no autograd graph (``torch.no_grad``)
  energy_train_step  energies, MAE loss, backward, Adam step
  force_train_step   energies and forces F = -dE/dR with create_graph=True, loss MAE(E) + 100 MAE(F),
                     backward, Adam step
  md_inference       energies and forces without create_graph (what an MD driver calls)

Repetitions. Our models and PyG DimeNet++ run interleaved (A B C A B C ...), so that a change of the machine's
load affects them alike: 1 warm-up round, then timed rounds, at least 1 and at most 5, a further one only while
the (workload, kind)'s timed rounds have taken under 10 s and the run is younger than 360 s. DimezblNet (our
DimeNet + ZBL, same weights) runs only in the force training step, where its overhead is defined; on qm9 it and
our DimeNet get up to 5 paired rounds before that deadline (the ZBL overhead is the median of their paired time
ratios). Our DimeNet++ and PyG's (1-5 s per call) get at least 3 paired rounds of every kind on each workload, even
past the deadline, and up to 5 before it. On md17 our DimeNet runs only where PyG DimeNet does (the force training
step). PyG DimeNet (10-30 s per energy / force training step on 2 cores) gets 1 timed call per kind and no
warm-up of its own (the agreement check has already run its forward and backward on the same batch), and on md17
only the force training step. The repetitions actually used are printed.

Allocator. By default (``--allocator reuse``) glibc's malloc is told at start to keep freed blocks (fixed 32 MiB mmap
threshold, no trimming): with its defaults the page faults of re-mapped big tensors made PyG DimeNet++'s force step
swing between 1.9 and 3.6 s from run to run. The same settings apply to every model in the process.

Peak memory: the peak, during one call, of the memory allocated during that call and not yet freed (activations,
autograd buffers, gradients; not the weights, the batch or Adam's state, which is created before any measurement).
CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call. CPU: the running sum of the
allocation and free records of torch's CPU allocator, from ``torch.profiler`` with ``profile_memory=True``. The
profiler slows small operations, so it is used on the warm-up call of the fast models, never on their timed calls;
for PyG DimeNet (no warm-up) it is its timed call, where a few thousand large operations of a 10-60 s step make
the profiler's cost negligible.

HOW PyG's MODEL IS RUN. PyG's ``DimeNet.forward`` calls ``radius_graph`` (needs pyg-lib or torch-cluster) and
``triplets`` (needs torch-sparse); neither extension is installable here. As in tests/test_pyg_equivalence.py,
those two module-level names of ``torch_geometric.nn.models.dimenet`` are replaced by the pure-torch stand-ins of
bench/_pyg_standins.py. The stand-ins are dense O(N^2) and O(E^2) (the triplet match of a QM9 batch builds 81 M
booleans), far slower and bigger than the compiled extensions, so by default (``--pyg-graph cached``) their
result is computed once per batch and then served from a cache: PyG's timings and memory then contain no graph
construction at all, while our models build their graph in every call. This favours PyG. ``--pyg-graph standin``
times the stand-ins as they are.

Outputs are checked first: our energies and forces against PyG's on each workload, |ours - PyG| <= rtol * max|PyG|
(float32; rtol 1e-4 for energies, 5e-4 for forces, since PyG's own float32 forces are up to 1.3e-4 of the largest
force away from its float64 ones); any disagreement ends the run with exit status 1 before anything is timed.

The last line is machine-readable (DimeNet on the qm9 workload; ratios are PyG time / our time, > 1 means we are
faster; zbl_overhead = DimezblNet time / our DimeNet time - 1 for the force training step on qm9):

  ratio_force_train_step=<x> ratio_energy_train_step=<y> zbl_overhead=<z>

Run: .venv/bin/python -m bench.bench_dimenet [--json results/bench_dimenet.json]   (under 10 minutes on this
project's idle 2-core CPU); --quick is a smoke check (2 molecules per batch, 1 repetition), not a measurement.
"""

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch_geometric.nn.models import dimenet as pyg_dimenet

import dimezbl as dz
import dimezbl_core as dc

# Published hyperparameters (DimeNet: Klicpera et al. 2020, DimeNet++: Klicpera et al. 2020b), as in
# tests/test_pyg_equivalence.py.
from bench._pyg_standins import (  # published hyperparameters
    DIMENET_KW,
    DIMENETPP_KW,
    memoize_pyg_basis_forms,
    radius_graph_reference,
    triplets_reference,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("forward", "energy_train_step", "force_train_step", "md_inference")
FORCE_LOSS_WEIGHT = 100.0  # rho of DimeNet's MD17 loss MAE(E) + rho MAE(F); it does not change the cost
LEARNING_RATE = 1e-5  # small: the weights barely move over the few timed steps
MD17_DISPLACEMENT_A = 0.05  # standard deviation of the per-coordinate displacement of each aspirin copy
# float32 agreement with PyG, relative to the largest |PyG value|. The forces get a looser bound because PyG's own
# float32 forces are that far from its float64 forces: with these weights (energies ~1e5, forces ~1e5) PyG DimeNet's
# float32 forces differ from its float64 forces by up to 1.3e-4 (md17) and 8.5e-5 (qm9) of the largest force, ours
# by 3.5e-5; in float64 ours and PyG's agree to 4e-12 (measured on these two batches, 2026-11-25).
AGREEMENT_RTOL_ENERGY = 1e-4
AGREEMENT_RTOL_FORCES = 5e-4
SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# --- Workloads ---
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    description: str
    z: torch.Tensor  # int64 [N]
    pos: torch.Tensor  # float32 [N, 3], Angstrom
    batch: torch.Tensor  # int64 [N], sorted
    energy_target: torch.Tensor  # float32 [B], seeded noise (the loss value does not matter, its cost does)
    force_target: torch.Tensor  # float32 [N, 3]
    stats: dict = field(default_factory=dict)

    def to(self, device):
        for name in ("z", "pos", "batch", "energy_target", "force_target"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def concatenate(molecules, name, description, seed) -> Workload:
    """molecules: list of (z int64 [n], pos [n, 3]) -> one batch, with graph statistics from the stand-ins."""
    z = torch.cat([m[0] for m in molecules]).long()
    pos = torch.cat([m[1] for m in molecules]).float()
    batch = torch.cat([torch.full((len(m[0]),), b, dtype=torch.long) for b, m in enumerate(molecules)])
    generator = torch.Generator().manual_seed(seed)
    workload = Workload(
        name,
        description,
        z,
        pos,
        batch,
        torch.randn(len(molecules), generator=generator),
        torch.randn(pos.shape, generator=generator),
    )
    edge_index = radius_graph_reference(pos, r=DIMENET_KW["cutoff"], batch=batch, max_num_neighbors=10**9)
    num_triplets = triplets_reference(edge_index, len(z))[-1].numel()
    workload.stats = dict(
        molecules=len(molecules), atoms=len(z), edges=int(edge_index.shape[1]), triplets=int(num_triplets)
    )
    return workload


def qm9_workload(batch_size: int) -> Workload:
    dataset = dz.load_qm9()
    train_indices = dz.qm9_split()[0][:batch_size]
    molecules = [(item.z, item.pos) for item in (dataset[int(i)] for i in train_indices)]
    return concatenate(molecules, "qm9", f"first {batch_size} molecules of the QM9 training split", SEED)


def md17_workload(batch_size: int) -> Workload:
    atoms, source = dz.md17_start_geometry("aspirin")
    z = torch.as_tensor(atoms.numbers, dtype=torch.long)
    base = torch.as_tensor(atoms.positions, dtype=torch.float64)
    generator = torch.Generator().manual_seed(SEED + 1)
    molecules = [
        (z, base + MD17_DISPLACEMENT_A * torch.randn(base.shape, generator=generator, dtype=torch.float64))
        for _ in range(batch_size)
    ]
    return concatenate(
        molecules,
        "md17",
        f"{batch_size} x aspirin ({len(z)} atoms, {source} start geometry, "
        f"{MD17_DISPLACEMENT_A} A seeded displacements)",
        SEED + 2,
    )


# ---------------------------------------------------------------------------------------------------------------
# --- PyG without its compiled extensions ---
# ---------------------------------------------------------------------------------------------------------------
class CachedStandins:
    """radius_graph / triplets stand-ins whose results are computed once per distinct input and then reused."""

    def __init__(self):
        self.graphs, self.triplet_sets = [], []
        self.hits = self.misses = 0

    def radius_graph(self, x, r, batch=None, **kwargs):
        for key_x, key_batch, key_r, edge_index in self.graphs:
            if (
                key_r == r
                and key_x.shape == x.shape
                and torch.equal(key_x, x.detach())
                and (
                    (batch is None and key_batch is None)
                    or (batch is not None and key_batch is not None and torch.equal(key_batch, batch))
                )
            ):
                self.hits += 1
                return edge_index
        self.misses += 1
        edge_index = radius_graph_reference(x.detach(), r, batch, **kwargs)
        self.graphs.append((x.detach().clone(), None if batch is None else batch.clone(), r, edge_index))
        return edge_index

    def triplets(self, edge_index, num_nodes):
        for key_edges, key_nodes, result in self.triplet_sets:
            if key_nodes == num_nodes and key_edges.shape == edge_index.shape and torch.equal(key_edges, edge_index):
                self.hits += 1
                return result
        self.misses += 1
        result = triplets_reference(edge_index, num_nodes)
        self.triplet_sets.append((edge_index.clone(), num_nodes, result))
        return result


def patch_pyg(mode: str):
    """Replace PyG's two extension-backed graph functions; returns the cache (None for mode "standin")."""
    memoize_pyg_basis_forms()  # PyG's SphericalBasisLayer otherwise spends ~12 s in sympy per constructor
    if mode == "cached":
        cache = CachedStandins()
        pyg_dimenet.radius_graph, pyg_dimenet.triplets = cache.radius_graph, cache.triplets
        return cache
    pyg_dimenet.radius_graph, pyg_dimenet.triplets = radius_graph_reference, triplets_reference
    return None


def settle_allocator(mode: str) -> str:
    """glibc's malloc returns freed blocks of more than its (moving) mmap threshold to the kernel and trims the heap
    top, so the next call's big tensors are fresh pages, paid in page faults; how many depends on the history of
    the process, which made PyG DimeNet++'s force step take 1.9-3.6 s in otherwise equal runs (our model's 1.5-1.9 s).
    mode "reuse" (default): mmap threshold fixed at its 32 MiB maximum, no trimming, 1 GiB top pad, so blocks up to
    32 MiB are reused from call to call for every model alike; "default": glibc as it comes. Returns what was done."""
    if mode == "default":
        return "glibc defaults"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "reuse requested, but this C library has no mallopt: its defaults"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    done = [mallopt(m_mmap_threshold, 32 * 2**20), mallopt(m_trim_threshold, 2**31 - 1), mallopt(m_top_pad, 2**30)]
    if not all(done):
        return f"reuse requested, mallopt refused some settings ({done}): partly glibc defaults"
    return "glibc mallopt: mmap threshold 32 MiB (fixed), trim threshold 2 GiB, top pad 1 GiB (blocks reused)"


# ---------------------------------------------------------------------------------------------------------------
# --- Models ---
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    key: str  # short name used in the tables and the JSON
    label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def make_optimizer(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    # create Adam's state now (zero gradients leave the weights unchanged) so that no measurement counts it
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def pyg_model(variant: str):
    """PyG's DimeNet ("dimenet") or DimeNetPlusPlus ("dimenet++") with the published hyperparameters."""
    if variant == "dimenet++":
        return pyg_dimenet.DimeNetPlusPlus(output_initializer="glorot_orthogonal", **DIMENETPP_KW)
    return pyg_dimenet.DimeNet(output_initializer="glorot_orthogonal", **DIMENET_KW)


def our_model(module, variant: str, zbl: bool, reference):
    """`module`'s DimezblNet (dimezbl_core, or another version of it) with the weights of PyG's `reference`."""
    kwargs = DIMENETPP_KW if variant == "dimenet++" else DIMENET_KW
    model = module.DimezblNet(variant=variant, zbl=zbl, output_initializer="glorot_orthogonal", **kwargs)
    module.load_pyg_dimenet_state_dict(model, reference.state_dict())
    return model


def make_entry(key: str, label: str, model, device) -> Entry:
    model = model.float().to(device).train()
    return Entry(key, label, model, make_optimizer(model))


def build_models(device) -> dict:
    torch.manual_seed(SEED)
    pyg, pyg_pp = pyg_model("dimenet"), pyg_model("dimenet++")
    ours, ours_zbl = our_model(dc, "dimenet", False, pyg), our_model(dc, "dimenet", True, pyg)
    ours_pp = our_model(dc, "dimenet++", False, pyg_pp)
    return {
        key: make_entry(key, label, model, device)
        for key, label, model in (
            ("pyg_dimenet", "PyG DimeNet", pyg),
            ("ours_dimenet", "ours DimeNet", ours),
            ("ours_dimezbl", "ours DimezblNet (DimeNet+ZBL)", ours_zbl),
            ("pyg_dimenetpp", "PyG DimeNet++", pyg_pp),
            ("ours_dimenetpp", "ours DimeNet++", ours_pp),
        )
    }


# ---------------------------------------------------------------------------------------------------------------
# --- The four measured steps ---
# ---------------------------------------------------------------------------------------------------------------
def energy_and_forces(model, z, pos, batch, create_graph: bool):
    """Energies [B] and forces [N, 3]; our model's own `energy_and_forces` when it has one (its fast path)."""
    if hasattr(model, "energy_and_forces"):
        energy, forces = model.energy_and_forces(z, pos, batch, create_graph=create_graph)
        return energy.reshape(-1), forces
    pos = pos.detach().requires_grad_(True)
    energy = model(z, pos, batch).reshape(-1)
    (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -gradient


def make_step(entry: Entry, workload: Workload, kind: str):
    model, optimizer, w = entry.model, entry.optimizer, workload

    def forward():
        with torch.no_grad():
            model(w.z, w.pos, w.batch)

    def energy_train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(w.z, w.pos, w.batch).reshape(-1) - w.energy_target).abs().mean()
        loss.backward()
        optimizer.step()

    def force_train_step():
        optimizer.zero_grad(set_to_none=True)
        energy, forces = energy_and_forces(model, w.z, w.pos, w.batch, create_graph=True)
        loss = (energy - w.energy_target).abs().mean() + FORCE_LOSS_WEIGHT * (forces - w.force_target).abs().mean()
        loss.backward()
        optimizer.step()

    def md_inference():
        energy_and_forces(model, w.z, w.pos, w.batch, create_graph=False)

    return {
        "forward": forward,
        "energy_train_step": energy_train_step,
        "force_train_step": force_train_step,
        "md_inference": md_inference,
    }[kind]


# ---------------------------------------------------------------------------------------------------------------
# --- Timing and peak memory ---
# ---------------------------------------------------------------------------------------------------------------
# printed by the profiler on every start and stop, whatever KINETO_LOG_LEVEL says, and (once) by c10 for the
# documented reason that frees of blocks allocated before the call are not counted
_PROFILER_CHATTER = ("USDT:", "STAGE:", "Memory block of unknown size was allocated before the profiling started")


@contextlib.contextmanager
def _without_profiler_chatter():
    """Capture the process's stderr (file descriptor 2, where the C++ side prints) and pass on all but the
    profiler's own lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in _PROFILER_CHATTER):
                    sys.stderr.write(line)


def _cpu_peak_allocated(step):
    """Run `step` under torch.profiler (profile_memory=True); return the peak over the call of the bytes that torch's
    CPU allocator handed out during the call and that were not yet freed (None if the profiler gives no records)."""
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:  # the raw allocation records: +bytes per allocation, -bytes per free of a block allocated while profiling
        records = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except AttributeError:
        return None
    records.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in records), default=0)


def call(step, device: torch.device, with_memory: bool):
    """(seconds, peak bytes or None) of one call of `step`. With `with_memory`, the peak of memory allocated during
    the call (CUDA: max_memory_allocated minus what was allocated before; CPU: profiler records, which slow the
    call a little, so timed calls of the fast models never ask for it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, (torch.cuda.max_memory_allocated(device) - before) if with_memory else None
    start = time.perf_counter()
    peak = _cpu_peak_allocated(step) if with_memory else step()
    return time.perf_counter() - start, peak


@dataclass
class Measurement:
    model: str
    workload: str
    kind: str
    warmup: int
    times_s: list = field(default_factory=list)
    loadavg_1min: list = field(default_factory=list)  # at the start of each timed call
    peak_bytes: int = None
    memory_from: str = None  # "warm-up call" or "timed call (profiled)"

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def peak_mb(self):
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def as_dict(self, batch_size: int) -> dict:
        return dict(
            model=self.model,
            workload=self.workload,
            kind=self.kind,
            warmup=self.warmup,
            repeats=len(self.times_s),
            times_s=self.times_s,
            median_s=self.median_s,
            molecules_per_s=batch_size / self.median_s,
            peak_memory_mb=self.peak_mb,
            memory_from=self.memory_from,
            loadavg_1min=self.loadavg_1min,
        )


class Runner:
    """Runs groups of models on one (workload, kind), interleaved (A B C A B C ...) so that a change of the
    machine's load during the run affects every model of the group alike.

    Per group: `warmup` untimed rounds (peak memory is taken on the last), then timed rounds: the first `forced`
    always, further ones (up to `repeats`) while the group's timed rounds have taken less than `budget_s` and the
    whole run is younger than `deadline_s`."""

    def __init__(self, device, deadline_s, log, start):
        self.device, self.deadline_s, self.log, self.start = device, deadline_s, log, start

    def past_deadline(self) -> bool:
        return time.perf_counter() - self.start >= self.deadline_s

    def group(self, entries, workload, kind, warmup, repeats, budget_s=float("inf"), into=None, forced=1):
        """Measurements {key: Measurement}; `into` continues existing ones (extra rounds; `forced=0`: even the
        first extra round is skipped past the deadline)."""
        steps = {e.key: make_step(e, workload, kind) for e in entries}
        results = (
            into if into is not None else {e.key: Measurement(e.key, workload.name, kind, warmup) for e in entries}
        )
        for round_index in range(warmup):
            for e in entries:
                last = round_index == warmup - 1
                peak = call(steps[e.key], self.device, with_memory=last)[1]
                if last:
                    results[e.key].peak_bytes, results[e.key].memory_from = peak, "warm-up call"
        group_start, rounds = time.perf_counter(), 0
        while rounds < repeats:
            if rounds >= forced and (time.perf_counter() - group_start >= budget_s or self.past_deadline()):
                break
            for e in entries:
                m = results[e.key]
                with_memory = m.peak_bytes is None and m.memory_from is None
                m.loadavg_1min.append(round(os.getloadavg()[0], 2))
                seconds, peak = call(steps[e.key], self.device, with_memory)
                m.times_s.append(seconds)
                if with_memory:
                    m.peak_bytes, m.memory_from = peak, "timed call (profiled)"
            rounds += 1
        for e in entries:
            m = results[e.key]
            self.log(
                f"  {workload.name:5s} {kind:18s} {e.label:30s} median {m.median_s:8.3f} s of "
                f"{', '.join(f'{t:.3f}' for t in m.times_s)} (warm-up {m.warmup}), peak "
                f"{'n/a' if m.peak_mb is None else f'{m.peak_mb:.0f} MB'}, load {m.loadavg_1min}"
            )
        return results


# ---------------------------------------------------------------------------------------------------------------
# --- Agreement with PyG ---
# ---------------------------------------------------------------------------------------------------------------
def check_agreement(entries, workload, tolerances, log, records: list) -> bool:
    """Our energies and forces against PyG's (zbl=False models only; the ZBL model adds a different energy).
    `tolerances`: {"energy": rtol, "forces": rtol}, relative to the largest |PyG value|; one dict per comparison
    is appended to `records`."""
    ok = True
    outputs = {}
    for key in ("pyg_dimenet", "ours_dimenet", "pyg_dimenetpp", "ours_dimenetpp"):
        energy, forces = energy_and_forces(entries[key].model, workload.z, workload.pos, workload.batch, False)
        outputs[key] = {"energy": energy.detach(), "forces": forces.detach()}
    for ours, pyg in (("ours_dimenet", "pyg_dimenet"), ("ours_dimenetpp", "pyg_dimenetpp")):
        for quantity, rtol in tolerances.items():
            reference, value = outputs[pyg][quantity], outputs[ours][quantity]
            scale = float(reference.abs().max())
            error = float((value - reference).abs().max())
            finite = bool(torch.isfinite(value).all() and torch.isfinite(reference).all())
            passed = finite and scale > 0 and error <= rtol * scale
            ok &= passed
            records.append(
                dict(
                    workload=workload.name,
                    model=ours,
                    quantity=quantity,
                    max_abs_error=error,
                    max_abs_pyg=scale,
                    rtol=rtol,
                    passed=passed,
                )
            )
            log(
                f"  {workload.name:5s} {entries[ours].label:16s} {quantity:6s}: max |ours - PyG| = {error:.3e}, "
                f"max |PyG| = {scale:.3e}, relative {error / scale if scale else float('nan'):.2e} "
                f"{'ok' if passed else 'FAIL'} (rtol {rtol:g})"
            )
    return ok


# ---------------------------------------------------------------------------------------------------------------
# --- Report ---
# ---------------------------------------------------------------------------------------------------------------
def compile_kernels(enabled: bool, device) -> str:
    """dimezbl_core's fused kernels on (built now, so that no timed call pays for it) or off; says which."""
    dc.enable_compiled_kernels(enabled)
    if not enabled:
        return dc.CompiledKernels.state()
    if dc.CompiledKernels.failure is None and not dc.CompiledKernels.active_for(torch.zeros(1, device=device)):
        return f"eager (the fused kernels do not serve {device.type} tensors)"
    start = time.perf_counter()
    dc.CompiledKernels.library()  # one C library holds every kernel: built now, not in a timed call
    seconds = f"; compiled in {time.perf_counter() - start:.1f} s" if dc.CompiledKernels.failure is None else ""
    return dc.CompiledKernels.state() + seconds


def provenance(args, device) -> dict:
    def git(*command):
        try:
            return subprocess.run(
                ["git", *command], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch_geometric

    with open(os.path.join(REPO, "dimezbl_core.py"), "rb") as source:
        core_sha256 = hashlib.sha256(source.read()).hexdigest()
    return dict(
        command=" ".join(
            [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable] + sys.argv
        ),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        git_commit=git("rev-parse", "HEAD"),
        git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        dimezbl_core_sha256=core_sha256,
        torch=torch.__version__,
        torch_geometric=torch_geometric.__version__,
        python=platform.python_version(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        cpu=cpu,
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        dtype="float32",
        loadavg_at_start=[round(x, 2) for x in os.getloadavg()],
        pyg_graph=args.pyg_graph,
    )


def format_table(rows, header) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [
        "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="most timed repetitions of our models and PyG DimeNet++ per workload and kind "
        "(default 5; fewer when --group-budget-s or --deadline-s is reached, at least 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed warm-up calls of those models per workload and kind (default 1; peak memory "
        "is measured on the last one)",
    )
    parser.add_argument(
        "--group-budget-s",
        type=float,
        default=10.0,
        help="no further timed round of a (workload, kind) once its timed rounds took this long (default 10 s)",
    )
    parser.add_argument(
        "--zbl-repeats",
        type=int,
        default=5,
        help="interleaved timed repetitions of our DimeNet and DimezblNet for the qm9 force training "
        "step, the ZBL overhead (default 7; those beyond the first are skipped past the "
        "deadline)",
    )
    parser.add_argument(
        "--pyg-dimenet-repeats",
        type=int,
        default=1,
        help="timed repetitions of PyG DimeNet (default 1; it takes 10-30 s per energy / force "
        "training step on 2 cores)",
    )
    parser.add_argument(
        "--pyg-dimenet-warmup",
        type=int,
        default=0,
        help="warm-up calls of PyG DimeNet per kind (default 0: the agreement check has already run "
        "its forward and backward on the same batch; its peak memory is then profiled in the "
        "timed call, where the profiler costs well under 1%% of a 10-60 s step)",
    )
    parser.add_argument(
        "--pyg-dimenet-md17-kinds",
        default="force_train_step",
        help="kinds measured for PyG DimeNet on the md17 workload, comma-separated, or all or none "
        "(default force_train_step, what MD17 trains; more would exceed 10 minutes)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=360.0,
        help="after this many seconds only the first timed repetition of each measurement is taken "
        "(default 360, so that the run ends within 10 minutes on this project's 2-core CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="molecules per batch (default 32; 2 with --quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 2 molecules per batch, no warm-up, 1 repetition (not a measurement)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--pyg-graph",
        choices=("cached", "standin"),
        default="cached",
        help="PyG's radius_graph/triplets: stand-in results cached per batch (default; no graph "
        "cost in PyG's numbers) or the dense stand-ins run in every call",
    )
    parser.add_argument(
        "--rtol-energy",
        type=float,
        default=AGREEMENT_RTOL_ENERGY,
        help="agreement of energies with PyG, relative to the largest |PyG energy| (default 1e-4)",
    )
    parser.add_argument(
        "--rtol-forces",
        type=float,
        default=AGREEMENT_RTOL_FORCES,
        help="agreement of forces with PyG, relative to the largest |PyG force| (default 5e-4: "
        "PyG's own float32 forces are up to 1.3e-4 from its float64 ones)",
    )
    parser.add_argument(
        "--allocator",
        choices=("reuse", "default"),
        default="reuse",
        help="glibc malloc settings (default reuse: big blocks are kept and reused instead of being "
        "returned to the kernel after each call, for all models alike; see settle_allocator)",
    )
    parser.add_argument(
        "--pp-repeats",
        type=int,
        default=5,
        help="interleaved timed repetitions of our DimeNet++ and PyG DimeNet++ in every (workload, "
        "kind) (default 5; those beyond --pp-min-rounds are skipped past the deadline)",
    )
    parser.add_argument(
        "--pp-min-rounds",
        type=int,
        default=3,
        help="timed repetitions of our DimeNet++ and PyG DimeNet++ taken even past the deadline "
        "(default 3: the DimeNet++ ratios are the goal closest to its threshold)",
    )
    parser.add_argument(
        "--compiled-kernels",
        choices=("on", "off"),
        default="on",
        help="our models with dimezbl_core's fused swish kernels (C, built at start-up; CompiledKernels), "
        "compiled before any timing (default on; off: the eager path, dimezbl_core's default)",
    )
    parser.add_argument("--json", default=None, help="write all numbers and their provenance to this file")
    parser.add_argument(
        "--history",
        default=None,
        help="append the headline ratios of this run as one row to this CSV (with --json), "
        "e.g. results/benchmark/history.csv",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.zbl_repeats, args.pyg_dimenet_repeats, args.pyg_dimenet_warmup = 1, 0, 1, 1, 0
        args.pp_repeats = args.pp_min_rounds = 1
    args.batch_size = args.batch_size or (2 if args.quick else 32)
    if (
        min(
            args.repeats,
            args.pyg_dimenet_repeats,
            args.zbl_repeats,
            args.pp_repeats,
            args.pp_min_rounds,
            args.batch_size,
        )
        < 1
    ):
        parser.error(
            "--repeats, --pyg-dimenet-repeats, --zbl-repeats, --pp-repeats, --pp-min-rounds and "
            "--batch-size must be at least 1"
        )
    if min(args.warmup, args.pyg_dimenet_warmup) < 0:
        parser.error("warm-up counts must be at least 0")
    names = args.pyg_dimenet_md17_kinds.split(",")
    unknown = set(names) - set(KINDS) - {"all", "none"}
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)} in --pyg-dimenet-md17-kinds: use {', '.join(KINDS)}, all, none")
    args.pyg_md17_kinds = KINDS if "all" in names else tuple(k for k in KINDS if k in names)
    return args


HISTORY_COLUMNS = ("date", "git_commit", "git_dirty", "cpu", "threads", "dtype")


def history_row(output: dict) -> dict:
    """One row of results/benchmark/history.csv: the run's date, commit and machine, each throughput ratio
    (PyG time / our time, > 1: ours faster) and the ZBL overheads (DimezblNet time / our DimeNet time - 1)."""
    provenance = output["provenance"]
    row = {key: provenance.get(key) for key in HISTORY_COLUMNS}
    row["git_commit"] = (row["git_commit"] or "")[:12]
    row.update({f"ratio:{key}": round(value["throughput_ratio"], 4) for key, value in output["ratios"].items()})
    row.update({f"zbl_overhead:{key}": round(value, 4) for key, value in output["zbl_overhead"].items()})
    return row


def append_history(path: str, output: dict) -> None:
    """Append `history_row(output)` to the CSV at `path`, widening its columns where the run has new ones."""
    import csv

    rows = []
    if os.path.exists(path):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    rows.append({key: "" if value is None else value for key, value in history_row(output).items()})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    allocator = settle_allocator(args.allocator)  # before any big allocation
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_size = args.batch_size
    wall_start = time.perf_counter()

    def log(message=""):
        print(f"[{time.perf_counter() - wall_start:6.1f} s] {message}", flush=True)

    info = provenance(args, device)
    info["allocator"] = allocator
    info["compiled_kernels"] = compile_kernels(args.compiled_kernels == "on", device)
    log(
        f"DimeNet benchmark: {info['device_name']} ({info['cpu_count']} CPUs), {info['threads']} torch threads, "
        f"torch {info['torch']}, torch_geometric {info['torch_geometric']}, float32"
    )
    log(
        f"git {info['git_commit']}{' + uncommitted changes' if info['git_dirty'] else ''}, dimezbl_core.py sha256 "
        f"{info['dimezbl_core_sha256'][:12]}; load average {info['loadavg_at_start']} at start"
    )

    cache = patch_pyg(args.pyg_graph)
    entries = build_models(device)
    workloads = {"qm9": qm9_workload(batch_size).to(device), "md17": md17_workload(batch_size).to(device)}
    for w in workloads.values():
        s = w.stats
        log(
            f"workload {w.name}: {w.description}; {s['atoms']} atoms, {s['edges']} edges, {s['triplets']} triplets "
            f"({s['atoms'] / s['molecules']:.1f} / {s['edges'] / s['molecules']:.0f} / "
            f"{s['triplets'] / s['molecules']:.0f} per molecule)"
        )
    log(
        f"repetitions: our models and PyG DimeNet++ {args.warmup} warm-up + 1..{args.repeats} timed, interleaved "
        f"(more while a group's timed rounds took < {args.group_budget_s:g} s and the run is < {args.deadline_s:g} s "
        f"old), ZBL pair on qm9 force steps >= {args.zbl_repeats}, "
        f"DimeNet++ pair {args.pp_min_rounds}..{args.pp_repeats} in every group; "
        f"PyG DimeNet {args.pyg_dimenet_warmup} warm-up + {args.pyg_dimenet_repeats} timed, "
        f"on md17 only {', '.join(args.pyg_md17_kinds) or 'nothing'}"
    )
    log(f"allocator: {allocator}")
    log(f"our models' swish: {info['compiled_kernels']}")
    log(
        f"PyG graph: {args.pyg_graph} stand-ins"
        + (" (computed once per batch, then no graph cost)" if args.pyg_graph == "cached" else " (run in every call)")
    )
    memory_note = (
        "CUDA max_memory_allocated during the call minus allocated before"
        if device.type == "cuda"
        else "peak of bytes allocated by torch's CPU allocator during the call and not yet freed "
        "(torch.profiler memory records)"
    )
    log(f"peak memory: {memory_note}")

    log("agreement with PyG (energy and forces, float32):")
    tolerances = {"energy": args.rtol_energy, "forces": args.rtol_forces}
    agreement = []
    agree = all([check_agreement(entries, w, tolerances, log, agreement) for w in workloads.values()])
    if not agree:
        print("FAIL: our outputs disagree with PyG's (see above); no timings taken", file=sys.stderr, flush=True)
        return 1

    runner = Runner(device, args.deadline_s, log, wall_start)
    groups = {}  # (workload, kind) -> {model key: Measurement}
    for workload in workloads.values():
        for kind in KINDS:
            # DimezblNet only where its overhead is defined (force training step), our DimeNet on md17 only where
            # PyG DimeNet runs, to stay within 10 minutes
            pyg_dimenet_here = workload.name == "qm9" or kind in args.pyg_md17_kinds
            fast = [
                entries[k]
                for k in ("ours_dimenet", "ours_dimezbl", "ours_dimenetpp", "pyg_dimenetpp")
                if (k != "ours_dimezbl" or kind == "force_train_step")
                and (k != "ours_dimenet" or pyg_dimenet_here or kind == "force_train_step")
            ]
            group = runner.group(fast, workload, kind, args.warmup, args.repeats, args.group_budget_s)
            if workload.name == "qm9" and kind == "force_train_step":
                pair = [entries["ours_dimenet"], entries["ours_dimezbl"]]
                missing = args.zbl_repeats - len(group["ours_dimenet"].times_s)
                if missing > 0:
                    log(
                        f"  ZBL overhead: up to {missing} more interleaved rounds of our DimeNet and DimezblNet "
                        f"(none past the deadline)"
                    )
                    runner.group(pair, workload, kind, 0, missing, into=group, forced=0)
            pair = [entries["ours_dimenetpp"], entries["pyg_dimenetpp"]]
            have = len(group["ours_dimenetpp"].times_s)
            if args.pp_repeats > have:
                forced = max(args.pp_min_rounds - have, 0)
                log(
                    f"  DimeNet++: up to {args.pp_repeats - have} more interleaved rounds of ours and PyG's "
                    f"({forced} even past the deadline)"
                )
                runner.group(pair, workload, kind, 0, args.pp_repeats - have, into=group, forced=forced)
            if pyg_dimenet_here:
                group.update(
                    runner.group(
                        [entries["pyg_dimenet"]], workload, kind, args.pyg_dimenet_warmup, args.pyg_dimenet_repeats
                    )
                )
            groups[(workload.name, kind)] = group
    wall_s = time.perf_counter() - wall_start
    measurements = [m for group in groups.values() for m in group.values()]
    return report(args, info, device, entries, workloads, groups, measurements, cache, runner, wall_s, agreement)


# PyG models timed in the same interleaved rounds as ours (A B C A B C ...), so that their i-th timed calls pair up.
INTERLEAVED_WITH_OURS = ("pyg_dimenetpp",)


def paired_ratio(base_times_s, other_times_s) -> float:
    """Median over interleaved rounds of other time / base time in the same round (for ours vs PyG: base = ours,
    other = PyG, > 1 means we are faster; for the ZBL overhead: base = DimeNet, other = DimezblNet).

    Less sensitive than the ratio of the two medians to a change of the machine's load during the run, which
    slows both calls of a round alike."""
    pairs = [other / base for base, other in zip(base_times_s, other_times_s)]
    if not pairs:
        raise ValueError("paired_ratio needs at least one timed round of both models")
    return statistics.median(pairs)


def report(args, info, device, entries, workloads, groups, measurements, cache, runner, wall_s, agreement) -> int:
    batch_size = args.batch_size
    print()
    print(f"Throughput (molecules/s, batch of {batch_size}, median) and peak memory (MB allocated during the call)")
    rows = [
        [
            m.workload,
            m.kind,
            entries[m.model].label,
            f"{m.median_s:.3f}",
            f"{batch_size / m.median_s:.2f}",
            "n/a" if m.peak_mb is None else f"{m.peak_mb:.0f}",
            f"{m.warmup}+{len(m.times_s)}",
        ]
        for m in measurements
    ]
    print(format_table(rows, ["workload", "kind", "model", "median s", "mol/s", "peak MB", "warm-up+timed"]))

    print()
    print("Ours vs PyG: throughput ratio = PyG time / our time (> 1: we are faster); memory ratio = ours / PyG")
    ratios, rows = {}, []
    for (workload, kind), group in groups.items():
        for ours, pyg in (("ours_dimenet", "pyg_dimenet"), ("ours_dimenetpp", "pyg_dimenetpp")):
            if pyg not in group:
                rows.append([workload, kind, entries[ours].label, "PyG not measured", "", ""])
                continue
            a, b = group[ours], group[pyg]
            ratio = b.median_s / a.median_s
            paired = paired_ratio(a.times_s, b.times_s) if pyg in INTERLEAVED_WITH_OURS else None
            memory = a.peak_bytes / b.peak_bytes if a.peak_bytes and b.peak_bytes else None
            ratios[f"{ours}/{workload}/{kind}"] = dict(
                throughput_ratio=ratio, memory_ratio=memory, paired_throughput_ratio=paired
            )
            rows.append(
                [
                    workload,
                    kind,
                    entries[ours].label,
                    f"{ratio:.2f}x",
                    "n/a" if paired is None else f"{paired:.2f}x ({min(len(a.times_s), len(b.times_s))})",
                    "n/a" if memory is None else f"{memory:.2f}",
                    "n/a" if memory is None else ("not above PyG" if memory <= 1 else "ABOVE PyG"),
                ]
            )
    print(
        format_table(
            rows, ["workload", "kind", "model", "throughput ratio", "paired ratio (rounds)", "memory ratio", "memory"]
        )
    )
    print(
        "paired ratio: median over the interleaved rounds of PyG time / our time in the same round (DimeNet++ "
        "only; PyG DimeNet gets one call, not interleaved): a load change hits both calls of a round alike"
    )

    print()
    print("ZBL overhead = DimezblNet time / our DimeNet time - 1: median of the ratios of interleaved (paired) calls")
    zbl_overhead, rows = {}, []
    for (workload, kind), group in groups.items():
        if "ours_dimezbl" not in group:
            continue
        plain, with_zbl = group["ours_dimenet"], group["ours_dimezbl"]
        zbl_overhead[f"{workload}/{kind}"] = paired_ratio(plain.times_s, with_zbl.times_s) - 1
        pairs = min(len(plain.times_s), len(with_zbl.times_s))
        rows.append(
            [
                workload,
                kind,
                f"{plain.median_s:.3f}",
                f"{with_zbl.median_s:.3f}",
                pairs,
                f"{100 * zbl_overhead[f'{workload}/{kind}']:+.1f} %",
            ]
        )
    print(format_table(rows, ["workload", "kind", "DimeNet s", "DimezblNet s", "pairs", "overhead"]))

    loadavg_end = [round(x, 2) for x in os.getloadavg()]
    print()
    print(
        f"wall time {wall_s:.0f} s; load average (1, 5, 15 min) {info['loadavg_at_start']} at start, "
        f"{loadavg_end} at end on {info['cpu_count']} CPUs (a load above the thread count means other processes "
        f"competed)"
    )
    if runner.past_deadline():
        print(
            f"the deadline ({args.deadline_s:g} s) was reached: later measurements got a single timed repetition "
            f"({args.pp_min_rounds} for our DimeNet++ and PyG's)"
        )
    if cache is not None:
        print(f"PyG graph cache: {cache.misses} stand-in computations, {cache.hits} cached results served")
    if args.json:
        provenance_record = dict(
            info,
            loadavg_at_end=loadavg_end,
            wall_s=wall_s,
            batch_size=batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            group_budget_s=args.group_budget_s,
            deadline_s=args.deadline_s,
            zbl_repeats=args.zbl_repeats,
            pp_repeats=args.pp_repeats,
            pp_min_rounds=args.pp_min_rounds,
            pyg_dimenet_repeats=args.pyg_dimenet_repeats,
            pyg_dimenet_warmup=args.pyg_dimenet_warmup,
            pyg_dimenet_md17_kinds=list(args.pyg_md17_kinds),
            memory_measure="cuda max_memory_allocated"
            if device.type == "cuda"
            else "torch.profiler profile_memory: peak of bytes allocated during the call",
        )
        output = dict(
            provenance=provenance_record,
            workloads={w.name: dict(description=w.description, **w.stats) for w in workloads.values()},
            agreement=agreement,
            measurements=[m.as_dict(batch_size) for m in measurements],
            ratios=ratios,
            zbl_overhead=zbl_overhead,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(output, out, indent=1)
        print(f"numbers and provenance written to {args.json}")
        if args.history:
            append_history(args.history, output)
            print(f"headline ratios appended to {args.history}")
    print(
        f"ratio_force_train_step={ratios['ours_dimenet/qm9/force_train_step']['throughput_ratio']:.3f} "
        f"ratio_energy_train_step={ratios['ours_dimenet/qm9/energy_train_step']['throughput_ratio']:.3f} "
        f"zbl_overhead={zbl_overhead['qm9/force_train_step']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
