"""Training and evaluation: offsets, batches, the loss, the resumable training loop, evaluation of checkpoints."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dimezbl_core import (
    MAX_ATOMIC_NUMBER,
    ZBL,
    CompiledKernels,
    DimezblNet,
    _module_energy_and_forces,
    radius_graph,
    scatter_sum,
)

from .checkpoints import atomic_torch_save, git_state, hardware_description, load_checkpoint, software_versions
from .config import QM9_ENERGY_TARGETS, TARGET_OFFSETS, TrainConfig
from .data import (
    QM9_REPORTING_UNITS,
    QM9_TARGETS,
    load_md17,
    load_qm9,
    md17_split,
    qm9_split,
    qm9_to_reporting_units,
    subset_split,
)
from .files import atomic_write_json, repository_path
from .own_data import load_structures, structure_split, training_unit

# --- optimisation pieces ---


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """DimeNet's schedule: lr * min(1, (step + 1) / warmup) * decay_rate^(step / decay_steps);
    decay_steps None is max_steps, so that the rate reaches lr * decay_rate at max_steps."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    decay_steps = config.decay_steps if config.decay_steps is not None else config.max_steps
    return config.learning_rate * warmup * config.decay_rate ** (step / decay_steps)


class ExponentialMovingAverage:
    """EMA of the weights: ema <- decay * ema + (1 - decay) * weights after every step (as
    DimeNet's tf.train.ExponentialMovingAverage without num_updates). Validation, test and the
    best checkpoint use the EMA weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, model: torch.nn.Module):
        model.load_state_dict(self.shadow)


def select_device(preference: str = "auto") -> torch.device:
    """CUDA when available (or asked for), the CPU otherwise."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


# --- data for training ---


@dataclass
class Batch:
    z: Tensor
    pos: Tensor
    batch: Tensor
    target: Tensor  # [B] in training units (QM9 target or MD17 energy minus offsets)
    forces: Optional[Tensor] = None  # [N, 3] kcal/mol/A (MD17)
    num_atoms: Optional[Tensor] = None  # [B]
    offset_energy: Optional[Tensor] = None  # float64 [B]: what was subtracted from the target (training units)

    def to(self, device) -> Batch:
        return Batch(**{k: (v.to(device) if torch.is_tensor(v) else v)
                        for k, v in dataclasses.asdict(self).items()})  # fmt: skip


def raw_targets(samples, target_index: Optional[int] = None) -> Tensor:
    """float64 [B]: the QM9 target `target_index` (training units) or the MD17 energy (kcal/mol)."""
    if target_index is not None:
        return torch.cat([s.y[:, target_index] for s in samples]).double()
    return torch.cat([s.energy for s in samples]).double()


def offset_atomic_energies(offset, z: Tensor) -> Tensor:
    """float64 [N]: the per-atom part of a target offset for atoms `z` (training units).

    An offset is (per molecule, per atom) or (per molecule, per atom, per element), the last a
    sequence indexed by atomic number (MAX_ATOMIC_NUMBER + 1 entries); the energy subtracted from a
    molecule's target is per_molecule + sum over its atoms of (per_atom + per_element[Z])."""
    atomic = torch.full(z.shape, float(offset[1]), dtype=torch.float64)
    if len(offset) > 2:
        atomic = atomic + torch.as_tensor(offset[2], dtype=torch.float64)[z.long().cpu()]
    return atomic


def offset_energies(offset, z: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
    """float64 [B]: the offset of each molecule (`offset_atomic_energies`, plus the per-molecule part)."""
    return float(offset[0]) + scatter_sum(offset_atomic_energies(offset, z), batch.cpu(), num_molecules)


def collate(samples, target_index: Optional[int] = None, offset=(0.0, 0.0)) -> Batch:
    """Concatenate molecules (PyG `Data`) into one batch. The target is stored minus the molecule's
    offset (`offset_energies`; training units), subtracted in float64 so that absolute MD17 energies
    (~1e5 kcal/mol) keep their precision."""
    counts = torch.tensor([s.z.numel() for s in samples])
    z = torch.cat([s.z for s in samples])
    pos = torch.cat([s.pos for s in samples])
    batch = torch.repeat_interleave(torch.arange(len(samples)), counts)
    offset_energy = offset_energies(offset, z, batch, len(samples))
    target = (raw_targets(samples, target_index) - offset_energy).float()
    with_forces = target_index is None and getattr(samples[0], "forces", None) is not None
    forces = torch.cat([s.forces for s in samples]).float() if with_forces else None
    return Batch(z, pos, batch, target, forces=forces, num_atoms=counts, offset_energy=offset_energy)


@torch.no_grad()
def molecule_zbl_energies(samples, zbl: ZBL, chunk: int = 256, unit_weight: bool = False) -> Tensor:
    """float64 [B]: the ZBL part of each molecule's energy as the model combines it (`ZBL.combine` with a
    zero network: the switched pair sum, or w_i-weighted for zbl_combine="interpolate") in the ZBL module's
    unit, times the module's weight (`scale`), or times 1 with unit_weight (whatever was learned)."""
    zbl = copy.deepcopy(zbl).cpu().double()
    if unit_weight:
        zbl.scale.fill_(1.0)
    energies = []
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        z = torch.cat([s.z for s in part])
        pos = torch.cat([s.pos for s in part]).double()
        batch = torch.repeat_interleave(torch.arange(len(part)), torch.tensor([s.z.numel() for s in part]))
        edge_index = radius_graph(pos, batch, zbl.cutoff_a)
        dist = (pos[edge_index[1]] - pos[edge_index[0]]).norm(dim=-1)
        atomic = zbl.combine(torch.zeros(z.numel(), 1, dtype=pos.dtype), z, edge_index, dist).squeeze(-1)
        energies.append(scatter_sum(atomic, batch, len(part)))
    return torch.cat(energies)


QM9_INTENSIVE_TARGETS = ("mu", "homo", "lumo", "gap")  # the others grow with molecule size


def element_counts(samples) -> Tuple[np.ndarray, np.ndarray]:
    """(elements [K] sorted atomic numbers, counts [B, K] float64): how many atoms of each element
    every molecule has."""
    z = torch.cat([s.z for s in samples]).long()
    molecule = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([s.z.numel() for s in samples]))
    elements, column = torch.unique(z, return_inverse=True)
    counts = torch.zeros(len(samples), len(elements), dtype=torch.float64)
    counts.index_put_((molecule, column), torch.ones_like(z, dtype=torch.float64), accumulate=True)
    return elements.numpy(), counts.numpy()


def per_element_least_squares(samples, values: Tensor) -> np.ndarray:
    """float64 [MAX_ATOMIC_NUMBER + 1]: energies e_Z minimising sum_m (values_m - sum_Z n_mZ e_Z)^2
    over the molecules (the atomic reference energies of schnetpack, nequip and MACE; no intercept).
    Elements that never occur get 0. A set of one composition (MD17) has many minimisers: the
    smallest-norm one, whose prediction is the mean."""
    elements, counts = element_counts(samples)
    coefficients = np.linalg.lstsq(counts, values.double().numpy(), rcond=None)[0]
    table = np.zeros(MAX_ATOMIC_NUMBER + 1)
    table[elements] = coefficients
    return table


def resolve_offset_kind(kind: str, target_index: Optional[int]) -> str:
    """The offset `kind` of a target: "auto" is mean_per_atom, "per_element" is itself, for extensive
    targets and MD17 energies; both are "mean" for the intensive QM9 targets (QM9_INTENSIVE_TARGETS)."""
    if kind not in TARGET_OFFSETS:
        raise ValueError(f"unknown target_offset {kind!r}: use one of {TARGET_OFFSETS}")
    intensive = target_index is not None and QM9_TARGETS[target_index] in QM9_INTENSIVE_TARGETS
    if kind in ("auto", "per_element") and intensive:
        return "mean"
    return "mean_per_atom" if kind == "auto" else kind


def offset_record(offset, kind: str) -> dict:
    """The offset as metrics.json records it: kind, per molecule, per atom, per element (by symbol)."""
    from ase.data import chemical_symbols

    per_element = (
        {chemical_symbols[z]: value for z, value in enumerate(offset[2]) if value != 0.0} if len(offset) > 2 else {}
    )
    return {
        "kind": kind,
        "per_molecule": float(offset[0]),
        "per_atom": float(offset[1]),
        "per_element": per_element,
        "unit": "training unit (eV for QM9 energies, kcal/mol MD17)",
    }


def target_offset(samples, target_index, kind: str, zbl: Optional[ZBL] = None):
    """Offsets from the training set (see `offset_atomic_energies` for the layout). "none": DimeNet's
    raw targets; "mean": the mean target; "mean_per_atom": the mean target per atom times the atom
    count; "per_element": a least-squares energy per element (`per_element_least_squares`);
    "auto" and "per_element" resolve by target (`resolve_offset_kind`).
    With a fixed-weight ZBL term the offsets are those of the target minus the ZBL energy, so that
    DimezblNet, too, starts from the best linear fit of what its network has to learn."""
    kind = resolve_offset_kind(kind, target_index)
    if kind == "none":
        return (0.0, 0.0)
    values = raw_targets(samples, target_index)
    if zbl is not None and not isinstance(zbl.scale, nn.Parameter):
        values = values - molecule_zbl_energies(samples, zbl)
    if kind == "mean":
        return (float(values.mean()), 0.0)
    if kind == "per_element":
        return (0.0, 0.0, per_element_least_squares(samples, values).tolist())
    counts = torch.tensor([s.z.numel() for s in samples], dtype=torch.float64)
    return (0.0, float((values / counts).mean()))


class RunData:
    """Train/valid/test sets of one run with DimeNet's splits, and the batches of each step.

    The order of training molecules is a function of (seed, epoch) only, so a resumed run sees
    exactly the batches of an uninterrupted one. In a distributed run every rank takes its
    share of each global batch (rank::world_size), like DistributedSampler with a shared seed.
    """

    def __init__(self, config: TrainConfig, zbl: Optional[ZBL] = None):
        self.config = config
        if config.dataset == "qm9":  # the target was checked by TrainConfig.validate
            full = load_qm9(config.data_dir)
            split = subset_split(qm9_split(len(full), config.split_seed), config.n_train,
                                 config.n_valid, config.n_test)  # fmt: skip
            self.target_index = QM9_TARGETS.index(config.target)
        elif config.dataset == "md17":
            full = load_md17(
                config.target,
                source=config.md17_source,
                data_dir=config.data_dir,
                path=repository_path(config.md17_path),
            )
            n_train = config.n_train or 1000
            n_valid = config.n_valid if config.n_valid is not None else 1000
            train, valid, test = md17_split(len(full), n_train, n_valid, seed=config.split_seed)
            split = (train, valid, test[: config.n_test] if config.n_test else test)
            self.target_index = None
        elif config.dataset == "file":
            full = load_structures(repository_path(config.data_file), config.energy_unit, config.energy_key,
                                   config.forces_key)  # fmt: skip
            split = structure_split(len(full), config.split_fractions, repository_path(config.split_file),
                                    config.split_seed)  # fmt: skip
            self.target_index = None
        else:
            raise ValueError(f"unknown dataset {config.dataset!r}: use 'qm9', 'md17' or 'file'")
        self.train, self.valid, self.test = (full[np.asarray(s)] for s in split)
        self.data_sha256 = full.content_sha256()  # of the whole set the splits were taken from
        kind = config.target_offset or ("none" if config.dataset == "qm9" else "mean_per_atom")
        train_samples = [self.train[i] for i in range(len(self.train))]
        self.offset = target_offset(train_samples, self.target_index, kind, zbl)
        self.offset_kind = resolve_offset_kind(kind, self.target_index)
        of_what = (
            "the target minus the ZBL energy (fixed weight)"
            if zbl is not None and not isinstance(zbl.scale, nn.Parameter)
            else "the target"
        )
        self.offset_method = {
            "none": "none (raw targets, as DimeNet)",
            "mean": f"mean of {of_what} over the training set",
            "mean_per_atom": f"mean per atom of {of_what} over the training set, times the atom count",
            "per_element": f"per-element least squares of {of_what} on the training set (no intercept)",
        }[self.offset_kind]
        self.elements = torch.cat([s.z for s in train_samples]).unique().tolist()
        if len(self.train) < config.batch_size:
            raise ValueError(f"{len(self.train)} training molecules are fewer than one batch")

    def _collate(self, samples) -> Batch:
        return collate(samples, self.target_index, self.offset)

    def train_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        size = self.config.batch_size
        per_epoch = len(self.train) // size
        epoch, position = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train), generator=generator)
        indices = order[position * size : (position + 1) * size][rank::world_size]
        return self._collate([self.train[int(i)] for i in indices])

    def batches(self, subset, batch_size: Optional[int] = None):
        size = batch_size or self.config.batch_size
        for start in range(0, len(subset), size):
            yield self._collate([subset[i] for i in range(start, min(start + size, len(subset)))])

    def mean_predictor_mae(self, subset) -> dict:
        """MAE of predicting the training mean (the bar a trained model must clear)."""
        samples = [subset[i] for i in range(len(subset))]
        train_mean = raw_targets([self.train[i] for i in range(len(self.train))], self.target_index).mean()
        mae = {"energy": float((raw_targets(samples, self.target_index) - train_mean).abs().mean())}
        if self.target_index is None and getattr(samples[0], "forces", None) is not None:  # the mean force is zero
            mae["forces"] = float(torch.cat([s.forces for s in samples]).abs().mean())
        return mae


# --- model, loss, evaluation ---


def build_model(config: TrainConfig) -> DimezblNet:
    kwargs = dict(config.model)
    if config.dataset == "md17":
        kwargs.setdefault("zbl_unit", "kcal/mol")
    elif config.dataset == "file":
        kwargs.setdefault("zbl_unit", training_unit(config.energy_unit))
    else:
        kwargs.setdefault("zbl_unit", "eV")
        # ZBL is an energy: for non-energy targets its weight is learnable and starts at 0
        kwargs.setdefault("zbl_learnable_scale", config.target not in QM9_ENERGY_TARGETS)
    return DimezblNet(zbl=config.zbl, **kwargs)


def load_energy_model(path, purpose: str = "the calculator") -> tuple:
    """(checkpoint, config, model with the checkpoint's EMA weights) of an energy model's checkpoint: a QM9 model
    of U0, U, H or G, or an MD17 / own-data model; another QM9 target is an error naming `purpose`."""
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    if config.dataset == "qm9" and config.target not in QM9_ENERGY_TARGETS:
        raise ValueError(
            f"checkpoint {path} predicts {config.target}, not an energy: {purpose} needs a model of "
            f"{', '.join(QM9_ENERGY_TARGETS)}, an MD17 molecule or your own energies"
        )
    model = build_model(config)
    model.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"])
    return checkpoint, config, model


def _energy_and_forces(module, batch: Batch, need_forces: bool, create_graph: bool):
    """Energies and forces (None unless need_forces) of a DimezblNet, possibly DDP-wrapped: pos is
    a leaf of this function's own, so force training linearises the bases in it (`first_order`)."""
    if not need_forces:
        return module(batch.z, batch.pos, batch.batch), None
    return _module_energy_and_forces(module, batch.z, batch.pos.detach(), batch.batch, create_graph)


def compute_loss(module, batch: Batch, config: TrainConfig, amp: bool = False):
    """MAE of the target (QM9), or DimeNet's MD17 loss MAE_E + rho * MAE_F."""
    need_forces = batch.forces is not None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and not need_forces):
        energy, forces = _energy_and_forces(module, batch, need_forces, create_graph=True)
    loss = (energy.float() - batch.target).abs().mean()
    if need_forces:
        loss = loss + config.force_weight * (forces - batch.forces).abs().mean()
    return loss


def evaluate(model, run_data: RunData, subset, device) -> dict:
    """MAE and RMSE of energy (target) and forces over a subset, in training units."""
    model.eval()
    abs_e, sq_e, abs_f, sq_f, n_f = 0.0, 0.0, 0.0, 0.0, 0
    for batch in run_data.batches(subset):
        batch = batch.to(device)
        need_forces = batch.forces is not None
        with torch.set_grad_enabled(need_forces):
            energy, forces = _energy_and_forces(model, batch, need_forces, create_graph=False)
        error = (energy.detach() - batch.target).double()
        abs_e, sq_e = abs_e + float(error.abs().sum()), sq_e + float((error**2).sum())
        if need_forces:
            error = (forces.detach() - batch.forces).double()
            abs_f, sq_f, n_f = abs_f + float(error.abs().sum()), sq_f + float((error**2).sum()), n_f + error.numel()
    n = len(subset)
    metrics = {"energy_mae": abs_e / n, "energy_rmse": math.sqrt(sq_e / n)}
    if n_f:
        metrics.update(forces_mae=abs_f / n_f, forces_rmse=math.sqrt(sq_f / n_f))
    model.train()
    return metrics


def to_reporting_units(metrics: dict, config: TrainConfig) -> dict:
    """QM9: meV for the energy-like targets (one conversion, qm9_to_reporting_units); MD17:
    kcal/mol and kcal/mol/A unchanged."""
    if config.dataset != "qm9":
        return dict(metrics)
    return {k: float(qm9_to_reporting_units(v, config.target)) for k, v in metrics.items()}


def reporting_unit(config: TrainConfig) -> dict:
    if config.dataset == "qm9":
        return {"energy": QM9_REPORTING_UNITS[config.target]}
    if config.dataset == "file":
        unit = training_unit(config.energy_unit)
        return {"energy": unit, "forces": f"{unit}/A"}
    return {"energy": "kcal/mol", "forces": "kcal/mol/A"}


class TrainingDiverged(RuntimeError):
    """A NaN or inf loss; the last good checkpoint is kept."""


# --- the loop ---


def _distributed_context():
    """(rank, world_size) under torchrun (gloo on the CPU, nccl on CUDA), else (0, 1)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RunLock:
    """An exclusive lock on a run directory while a process trains it (`<run_dir>/.training.lock`,
    holding the pid): a second process that would train the same run (a notebook while a
    background job trains it, say) stops with an error instead of interleaving checkpoints and
    learning curves. fcntl.flock: released by the kernel when the holder exits, even on kill -9,
    so a crashed run never leaves a stale lock. Where fcntl does not exist (Windows) it does nothing."""

    def __init__(self, run_dir: Path):
        self.path, self.file = Path(run_dir) / ".training.lock", None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            self.file = None
            raise RuntimeError(
                f"{self.path.parent} is being trained by another process (pid {holder}); "
                "let it finish or stop it before training this run here"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None
        return False


def train(config: TrainConfig, resume: bool = True, progress: bool = True, run_dir: Optional[Path] = None) -> dict:
    """Train one model under DimeNet's protocol; returns the final metrics (also written to
    <run_dir>/metrics.json). Resumes from <run_dir>/checkpoint_last.pt when it exists. The run
    directory is locked meanwhile (RunLock): another process training the same run is an error."""
    rank, _ = _distributed_context()
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir
    if rank != 0:  # one lock per run: rank 0 holds it for the whole job
        return _train(config, resume, progress, run_dir)
    with RunLock(run_dir):
        return _train(config, resume, progress, run_dir)


def _train(config: TrainConfig, resume: bool, progress: bool, run_dir: Path) -> dict:
    from tqdm.auto import tqdm

    if config.compile and config.dataset == "md17":
        raise ValueError(
            "compile=True cannot train on forces: the force loss differentiates F = -dE/dR a second "
            "time, and torch.compile's AOT autograd does not differentiate its backward again; use "
            "compile=True for QM9 targets (energies only) and compile=False for MD17"
        )
    rank, world_size = _distributed_context()
    device = select_device(config.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    last_path, best_path = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_best.pt"
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    model = build_model(config).to(device=device, dtype=dtype)
    ema = ExponentialMovingAverage(model, config.ema_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, amsgrad=True,
                                 eps=config.amsgrad_eps)  # fmt: skip
    data = RunData(config, model.zbl)
    state = {"step": 0, "best_valid": math.inf, "best_step": -1, "evals_since_best": 0,
             "train_time_s": 0.0, "loss_sum": 0.0, "loss_count": 0, "segments": []}  # fmt: skip
    if resume and last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if _config_mismatch(checkpoint["config"], config):  # what a finished run may differ in, too
            raise ValueError(
                f"{last_path} was written with another config; use another run "
                "directory or delete the checkpoint to start over"
            )
        if rank == 0:  # a resumed run is unfinished: metrics of an earlier stop (by max_wall_s) are stale
            (run_dir / "metrics.json").unlink(missing_ok=True)
        model.load_state_dict(checkpoint["model"])
        ema.shadow = checkpoint["ema"]
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        check_data_sha256(checkpoint["state"].get("data_sha256"), data, last_path)
        state.update(checkpoint["state"])
        if rank == 0:
            print(f"resuming {run_dir} from step {state['step']}", flush=True)
    elif rank == 0:
        for stale in (run_dir / "learning_curve.csv", run_dir / "metrics.json"):
            stale.unlink(missing_ok=True)
    state["data_sha256"] = data.data_sha256  # checked when the run resumes and when its checkpoints are evaluated
    # the code and threads of each process that trains this run (a resumed run may span commits)
    state["segments"] = [
        *state["segments"],
        {
            **git_state(),
            "from_step": state["step"],
            "torch_threads": torch.get_num_threads(),
            "hardware": hardware_description(device),
            "swish": CompiledKernels.state(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    ]
    if rank == 0 and CompiledKernels.enabled:
        print(f"swish: {CompiledKernels.state()} (compiled at the first step)", flush=True)
    module = model
    if world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(model)
    if config.compile:
        module = torch.compile(module, dynamic=True)
    eval_model = copy.deepcopy(model)
    checkpoint_every = config.checkpoint_every or config.eval_every
    amp = config.amp and device.type == "cuda"

    def save_last():
        if rank == 0:
            atomic_torch_save({"model": model.state_dict(), "ema": ema.shadow,
                               "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                               "state": dict(state), "config": config.to_dict()}, last_path)  # fmt: skip

    curve_path = run_dir / "learning_curve.csv"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config.to_dict())
        _truncate_curve(curve_path, state["step"])
    bar = tqdm(total=config.max_steps, initial=state["step"], disable=not progress or rank != 0,
               desc=f"{config.model_name} {config.dataset}/{config.target}", dynamic_ncols=True)  # fmt: skip
    start = time.perf_counter() - state["train_time_s"]
    stop_reason = "max_steps"
    model.train()
    while state["step"] < config.max_steps:
        step = state["step"]
        if config.max_wall_s is not None and time.perf_counter() - start > config.max_wall_s:
            stop_reason = "max_wall_s"
            break
        batch = data.train_batch(step, rank, world_size).to(device)
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = compute_loss(module, batch, config, amp)
        if not torch.isfinite(loss):
            bar.close()
            batches_per_epoch = max(1, len(data.train) // config.batch_size)
            raise TrainingDiverged(
                f"loss is {float(loss.detach())} at step {step} (training batch {step % batches_per_epoch} "
                f"of epoch {step // batches_per_epoch}); nothing was updated and the last good checkpoint "
                f"{last_path} is kept. Check the data of that batch, or lower the learning rate."
            )
        optimizer.zero_grad(set_to_none=True)
        # only the weights: for force losses, skips the second derivatives in the positions
        loss.backward(inputs=trainable)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        ema.update(model)
        state["step"] = step + 1
        state["loss_sum"] += float(loss.detach())  # since the last evaluation
        state["loss_count"] += 1
        bar.update(1)
        if state["step"] % config.eval_every == 0 or state["step"] == config.max_steps:
            ema.copy_to(eval_model)
            valid = evaluate(eval_model, data, data.valid, device)
            score = valid["energy_mae"] + (config.force_weight * valid["forces_mae"]
                                           if "forces_mae" in valid else 0.0)  # fmt: skip
            improved = score < state["best_valid"]
            if improved:
                state.update(best_valid=score, best_step=state["step"], evals_since_best=0)
                if rank == 0:
                    atomic_torch_save({"model": ema.shadow, "config": config.to_dict(),
                                       "step": state["step"], "valid": valid,
                                       "offset": list(data.offset), "elements": data.elements,
                                       "data_sha256": data.data_sha256},
                                      best_path)  # fmt: skip
            else:
                state["evals_since_best"] += 1
            state["train_time_s"] = time.perf_counter() - start
            row = {"step": state["step"], "lr": lr, "train_loss": state["loss_sum"] / state["loss_count"],
                   **{f"valid_{k}": v for k, v in to_reporting_units(valid, config).items()},
                   "wall_s": round(state["train_time_s"], 2)}  # fmt: skip
            state.update(loss_sum=0.0, loss_count=0)
            if rank == 0:
                _append_curve(curve_path, row)
            bar.set_postfix(loss=f"{row['train_loss']:.4g}", valid_mae=f"{row['valid_energy_mae']:.4g}",
                            lr=f"{lr:.2e}")  # fmt: skip
            patience = config.early_stopping_patience
            if patience is not None and state["evals_since_best"] >= patience:
                stop_reason = "early_stopping"
                save_last()
                break
        if state["step"] % checkpoint_every == 0:
            state["train_time_s"] = time.perf_counter() - start
            save_last()
    bar.close()
    state["train_time_s"] = time.perf_counter() - start
    save_last()
    return finish_run(config, data, run_dir, device, state, stop_reason, model, rank, world_size)


def _truncate_curve(path: Path, step: int):
    """Drop learning-curve rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if int(r["step"]) <= step]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as handle:
            if kept:
                writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
                writer.writeheader()
                writer.writerows(kept)


def _append_curve(path: Path, row: dict):
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def finish_run(config, data, run_dir, device, state, stop_reason, model, rank=0, world_size=1) -> dict:
    """Evaluate the best (EMA) model once on validation and test; write metrics and provenance."""
    best_path = run_dir / "checkpoint_best.pt"
    eval_model = build_model(config).to(device=device, dtype=getattr(torch, config.dtype))
    eval_model.load_state_dict(load_checkpoint(best_path)["model"])
    valid = to_reporting_units(evaluate(eval_model, data, data.valid, device), config)
    test = to_reporting_units(evaluate(eval_model, data, data.test, device), config)
    baseline = to_reporting_units({f"{k}_mae": v for k, v in data.mean_predictor_mae(data.test).items()}, config)
    metrics = {
        "valid": valid,
        "test": test,
        "test_mean_predictor": baseline,
        "units": reporting_unit(config),
        "best_step": state["best_step"],
        "steps": state["step"],
        "stop_reason": stop_reason,
        "n_train": len(data.train),
        "n_valid": len(data.valid),
        "n_test": len(data.test),
        "target_offset": offset_record(data.offset, data.offset_kind),
        "offset_method": data.offset_method,
        "final_learning_rate": learning_rate_at(max(state["step"] - 1, 0), config),
    }
    if rank == 0:
        if eval_model.zbl is not None:  # before metrics.json, which marks the run done
            _write_zbl_term_file(eval_model, data, run_dir)
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / "provenance.json", {
            "config": config.to_dict(), "seed": config.seed, "git": git_state(),
            "software": software_versions(), "hardware": hardware_description(device),
            "segments": state["segments"],  # each process that trained it: code, first step
            "train_wall_time_s": round(state["train_time_s"], 2), "world_size": world_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "data": {"dataset": config.dataset, "target": config.target,
                     "source": {"qm9": "qm9pack (QM9, B3LYP/6-31G(2df,p))",
                                "md17": f"MD17 source={config.md17_source}",
                                "file": f"file {config.data_file} ({config.energy_unit})"}[config.dataset],
                     "content_sha256": data.data_sha256},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })  # fmt: skip
    return metrics


def check_data_sha256(recorded: Optional[str], data: RunData, path) -> None:
    """Refuse to resume or evaluate `path` on other data than it was trained on (content sha256 of the whole
    data set, `IndexedDataset.content_sha256`); nothing to check where nothing was recorded."""
    if recorded is not None and recorded != data.data_sha256:
        source = data.config.md17_path or f"{data.config.dataset} {data.config.target}"
        raise ValueError(
            f"{path} was trained on data with content sha256 {recorded[:16]}..., but the data found now "
            f"({source}) have {data.data_sha256[:16]}...: the data changed since. Restore the data the run "
            "was trained on (regenerate it with the same settings, or check out the file it used), or train "
            "on the new data in another run directory (or delete this one)"
        )


def evaluate_checkpoint(path, subset: str = "test", device: str = "auto") -> dict:
    """Evaluate a saved (best or last) checkpoint on the valid or test set of its own config."""
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    target_device = select_device(device)
    model = build_model(config).to(device=target_device, dtype=getattr(torch, config.dtype))
    weights = checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"]
    model.load_state_dict(weights)
    data = RunData(config, model.zbl)
    recorded = checkpoint.get("data_sha256") or checkpoint.get("state", {}).get("data_sha256")
    if recorded is None:  # a checkpoint that predates the record: the run's provenance has it
        provenance = Path(path).parent / "provenance.json"
        if provenance.exists():
            recorded = json.loads(provenance.read_text()).get("data", {}).get("content_sha256")
    check_data_sha256(recorded, data, path)
    metrics = evaluate(model, data, getattr(data, subset), target_device)
    return {"subset": subset, "metrics": to_reporting_units(metrics, config),
            "units": reporting_unit(config)}  # fmt: skip


ZBL_TERM_FILE = "zbl_term.json"  # in a DimezblNet run directory, beside metrics.json


def zbl_term_summary(model: DimezblNet, data: RunData, subset: str = "test") -> dict:
    """What the ZBL term of a trained DimezblNet adds to its predictions on one subset.

    The term is weight x E_zbl(molecule): E_zbl (switched, in the ZBL module's unit: eV for QM9,
    kcal/mol for MD17) depends on the geometry only; the weight is the fixed 1 for energies and is
    learned, starting at 0, for the other QM9 targets. Returns the weight, E_zbl's mean and std over
    the subset's molecules, and the contribution weight x E_zbl in the target's reporting unit
    (Tables 1 and 2). Set its std (over molecules) beside the test MAE: a contribution whose spread
    is comparable to the error is not harmless, even with a weight near 0. "Molecules" are the
    subset's entries: QM9 molecules, or MD17 configurations of one molecule (`n_molecules` counts
    those; the key keeps its name so that the committed zbl_term.json files stay readable).
    """
    if model.zbl is None:
        raise ValueError("this model has no ZBL term (a DimeNet run): give a DimezblNet checkpoint")
    if subset not in ("train", "valid", "test"):
        raise ValueError(f"unknown subset {subset!r}: use 'train', 'valid' or 'test'")
    part = getattr(data, subset)
    # E_zbl itself (float64); the weight multiplies it below
    zbl_energy = molecule_zbl_energies([part[i] for i in range(len(part))], model.zbl, unit_weight=True).numpy()
    weight = float(model.zbl.scale.detach())
    contribution = weight * zbl_energy  # the target's training unit
    if data.config.dataset == "qm9":
        contribution = qm9_to_reporting_units(contribution, data.config.target)
    return {"subset": subset, "n_molecules": int(zbl_energy.size), "zbl_weight": weight,
            "zbl_weight_learned": isinstance(model.zbl.scale, nn.Parameter),
            "zbl_energy": {"mean": float(zbl_energy.mean()), "std": float(zbl_energy.std()),
                           "unit": model.zbl.unit},
            "contribution": {"mean": float(contribution.mean()), "std": float(contribution.std()),
                             "unit": reporting_unit(data.config)["energy"]}}  # fmt: skip


def _write_zbl_term_file(model: DimezblNet, data: RunData, run_dir: Path, subset: str = "test") -> dict:
    summary = {
        **zbl_term_summary(model, data, subset),
        "checkpoint": "checkpoint_best.pt (EMA weights)",
        "git": git_state(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(run_dir / ZBL_TERM_FILE, summary)
    return summary


# Config fields that do not change what a finished run measured (out_dir: results may move).
_IGNORED_WHEN_REUSING = ("device", "out_dir")
# Safety stops: a run that did not stop by one is the same run under any other value of it, so a
# finished run is reused, and an unfinished one resumed, when only these differ.
_SAFETY_LIMITS = ("max_wall_s",)


def _config_mismatch(stored: dict, config: TrainConfig, stop_reason: Optional[str] = None) -> list:
    """Fields in which a run directory's config.json differs from `config`. A safety limit
    (_SAFETY_LIMITS: max_wall_s) counts only for a run that stopped by it (stop_reason)."""
    ignored = _IGNORED_WHEN_REUSING + (() if stop_reason in _SAFETY_LIMITS else _SAFETY_LIMITS)
    return _fields_differing(stored, config.to_dict(), ignored)


def _fields_differing(stored: dict, wanted: dict, ignored: Sequence[str]) -> list:
    """Sorted config fields whose values differ between two config dicts, `ignored` aside."""
    return sorted(key for key in set(stored) | set(wanted) if key not in ignored and stored.get(key) != wanted.get(key))
