"""Shipped potentials: trained models in the repository as weights-only files, loaded by name.

Each potential is `<POTENTIALS_DIR>/<dataset>/<target>/<model>/seed<k>.pt` (the EMA weights of a run's best
checkpoint as a float32 state dict, loaded with `weights_only=True`) beside `seed<k>.json`: the run's config,
offsets, energy unit, elements, test MAE, data content sha256, commit, and the sha256 of the weights file, checked
on every load. Names are `<dataset>/<target>/<model>`, e.g. "md17/malonaldehyde/dimezblnet_switched";
`list_pretrained()` (CLI `dimezbl models`) lists them.

Each data set's shipped sample (`<dataset>/<target>/test_sample.npz`: configurations of the run's test split,
their indices and the data's content sha256) lets anyone check a potential without the data set: every
potential's metadata records its MAE on that sample (`sample_mae`, evaluated in float64 so that every CPU gets
it to ~1e-10), which `check_pretrained` recomputes.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dimezbl_core import DimezblNet

from .calculator import DimezblCalculator, DimezblCommittee
from .checkpoints import POTENTIAL_FORMAT, git_state, load_checkpoint, load_shipped_weights
from .config import TrainConfig
from .files import atomic_write_bytes, atomic_write_json, portable_path, repository_path, sha256_hex
from .training import build_model, evaluate, offset_energies, reporting_unit, to_reporting_units

POTENTIALS_DIR = Path(__file__).resolve().parent / "potentials"
SAMPLE_FILE = "test_sample.npz"
SAMPLE_SIZE = 64  # configurations of the test split shipped per data set
SAMPLE_DTYPE = "float64"  # the precision of the recorded sample MAE (`sample_mae`)


@dataclass
class Potential:
    """A loaded shipped potential: the model (float32, eval mode, EMA weights) and its metadata."""

    name: str
    seed: int
    model: DimezblNet
    metadata: dict

    @property
    def offset(self) -> list:
        return self.metadata["offset"]

    @property
    def energy_unit(self) -> str:
        return self.metadata["energy_unit"]

    def __str__(self) -> str:
        return f"shipped potential {self.name} seed {self.seed}"

    def calculator(self, device: str = "cpu", dtype=torch.float64) -> DimezblCalculator:
        """An ASE calculator of this potential (eV, eV/A; float64 by default, as for MD)."""
        return DimezblCalculator(
            self.model,
            energy_unit=self.energy_unit,
            offset=self.offset,
            elements=self.metadata["elements"],
            device=device,
            dtype=dtype,
        )


def _entries(root=None) -> dict:
    """{name: {seed: metadata path}} of every shipped potential under `root`."""
    root = Path(root) if root is not None else POTENTIALS_DIR
    entries: dict = {}
    for meta in sorted(root.glob("*/*/*/seed*.json")):
        name = "/".join(meta.relative_to(root).parts[:3])
        entries.setdefault(name, {})[int(meta.stem[len("seed") :])] = meta
    return entries


def shipped_weights_of_run(run_dir, root=None) -> Optional[Path]:
    """The shipped weights file made from the run `run_dir` (its metadata names the run and records the run's
    own test MAE), or None: it stands in for the run's best checkpoint where that is not here."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        return None
    test = json.loads(metrics_path.read_text()).get("test")
    for seeds in _entries(root).values():
        for meta_path in seeds.values():
            metadata = json.loads(meta_path.read_text())
            if metadata.get("run") == portable_path(run_dir) and metadata.get("test_mae") == test:
                return meta_path.with_suffix(".pt")
    return None


def list_pretrained(root=None) -> list:
    """One row per shipped potential: name, dataset, target, model, seeds, training profile and steps, energy
    unit and the mean test MAE over its seeds (reporting units), as dicts."""
    rows = []
    for name, seeds in _entries(root).items():
        metas = [json.loads(path.read_text()) for _, path in sorted(seeds.items())]
        test = [m["test_mae"] for m in metas]
        row = {
            "name": name,
            "dataset": metas[0]["dataset"],
            "target": metas[0]["target"],
            "model": metas[0]["model"],
            "seeds": sorted(seeds),
            "profile": metas[0]["config"].get("profile"),
            "training_steps": int(metas[0]["config"]["max_steps"]),
            "energy_unit": metas[0]["units"]["energy"],
        }
        if "forces" in metas[0]["units"]:
            row["forces_unit"] = metas[0]["units"]["forces"]
        for key in test[0]:
            row[f"test_{key}"] = float(np.mean([t[key] for t in test]))
        rows.append(row)
    return rows


def _resolve(name: str, seed: int, root=None) -> Path:
    entries = _entries(root)
    if name not in entries:
        known = ", ".join(entries) or "none (nothing is shipped here)"
        raise KeyError(f"no shipped potential named {name!r}; shipped: {known}")
    if seed not in entries[name]:
        raise KeyError(f"{name} has no seed {seed}; shipped seeds: {sorted(entries[name])}")
    return entries[name][seed]


def pretrained(name: str, seed: int = 0, root=None) -> Potential:
    """The shipped potential `name` ("<dataset>/<target>/<model>", see `list_pretrained`) of training seed `seed`.
    Its weights file must match the sha256 in its metadata."""
    state, metadata = load_shipped_weights(_resolve(name, seed, root).with_suffix(".pt"))
    model = build_model(TrainConfig.from_dict(metadata["config"]))
    model.load_state_dict(state)
    return Potential(name=name, seed=seed, model=model.eval(), metadata=metadata)


def pretrained_calculator(
    name: str, seeds: Union[int, Sequence[int], str] = 0, device: str = "cpu", dtype=torch.float64, root=None
):
    """An ASE calculator of a shipped potential: one seed (a `DimezblCalculator`), or several / "all" (a
    `DimezblCommittee` reporting the mean and the spread of the seeds)."""
    if seeds == "all":
        seeds = sorted(_entries(root).get(name, {})) or [0]
    if isinstance(seeds, int):
        return pretrained(name, seeds, root).calculator(device, dtype)
    seeds = list(seeds)
    if len(seeds) == 1:
        return pretrained(name, seeds[0], root).calculator(device, dtype)
    return DimezblCommittee([pretrained(name, seed, root).calculator(device, dtype) for seed in seeds])


def shipped_checkpoints(molecule: str, seed: int = 0, root=None):
    """The shipped MD17 potentials of `molecule` (training seed `seed`, every model that has it) as the
    checkpoints table the short-range tools take (`shortrange.shortrange_checkpoints`'s columns), their weights
    files standing in for the checkpoints (`checkpoints.load_checkpoint` reads both)."""
    import pandas as pd

    rows = []
    for name, seeds in _entries(root).items():
        dataset, target, model = name.split("/")
        if dataset != "md17" or target != molecule or seed not in seeds:
            continue
        metadata = json.loads(seeds[seed].read_text())
        rows.append(
            {
                "molecule": molecule,
                "model": model,
                "seed": seed,
                "checkpoint": str(seeds[seed].with_suffix(".pt")),
                "run_dir": metadata["run"],
                "profile": metadata["config"].get("profile"),
                "git_commit": metadata.get("trained_at_commit"),
            }
        )
    if not rows:
        shipped = sorted({n.split("/")[1] for n in _entries(root) if n.startswith("md17/")})
        raise KeyError(f"no shipped MD17 potential of {molecule!r} with seed {seed}; shipped molecules: {shipped}")
    return pd.DataFrame(rows)


# --- writing and checking shipped potentials ----------------------------------------------------------------


def _sample_arrays(run_data) -> dict:
    """`SAMPLE_SIZE` evenly spaced configurations of the run's test split, with their row indices."""
    test = run_data.test
    picks = np.unique(np.linspace(0, len(test) - 1, min(SAMPLE_SIZE, len(test))).round().astype(int))
    samples = [test[int(k)] for k in picks]
    arrays = {
        "index": np.array([int(s.idx) for s in samples], dtype=np.int64),
        "z": np.concatenate([s.z.numpy() for s in samples]).astype(np.int64),
        "ptr": np.concatenate([[0], np.cumsum([s.z.numel() for s in samples])]).astype(np.int64),
        "pos": np.concatenate([s.pos.numpy() for s in samples]).astype(np.float32),
        "content_sha256": np.array(run_data.data_sha256),
    }
    if run_data.config.dataset != "qm9":
        arrays["energy"] = np.concatenate([s.energy.numpy() for s in samples])
        if getattr(samples[0], "forces", None) is not None:
            arrays["forces"] = np.concatenate([s.forces.numpy() for s in samples]).astype(np.float32)
    else:
        arrays["energy"] = np.array([float(s.y[0, run_data.target_index]) for s in samples])
    return arrays


def sample_mae(model: DimezblNet, offset, sample: dict, dataset: str) -> dict:
    """Energy (and force) MAE of `model` with `offset` on a shipped sample, in training units, evaluated in
    float64 (a float64 copy of the weights, as the ASE calculator runs them): the literal-ZBL models cancel
    terms of ~10^4 kcal/mol, whose float32 rounding differs between CPUs by ~1e-4 of the MAE; in float64 the
    value is the same on every CPU to ~1e-10."""
    model = copy.deepcopy(model).double().eval()
    z, pos, ptr = (torch.as_tensor(sample[k]) for k in ("z", "pos", "ptr"))
    counts = ptr[1:] - ptr[:-1]
    batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
    energy, forces = model.energy_and_forces(z, pos.double(), batch)
    predicted = energy.detach().double() + offset_energies(offset, z, batch, len(counts))
    result = {"energy_mae": float((predicted - torch.as_tensor(sample["energy"])).abs().mean())}
    if "forces" in sample:
        result["forces_mae"] = float((forces.detach() - torch.as_tensor(sample["forces"])).abs().mean())
    return result


def _float32_weights(model: DimezblNet) -> dict:
    """The model's state dict with its floating-point tensors in float32 (the shipped weights' precision)."""
    return {key: value.float() if value.is_floating_point() else value for key, value in model.state_dict().items()}


def _load_sample(root: Path, dataset: str, target: str) -> dict:
    """The arrays of the shipped test sample of a data set (`<root>/<dataset>/<target>/test_sample.npz`)."""
    with np.load(root / dataset / target / SAMPLE_FILE) as stored:
        return {key: stored[key] for key in stored.files}


def _write_potential(weights: dict, weights_path: Path, metadata: dict) -> Path:
    """Write float32 `weights` to `weights_path` and `metadata` (with the commit, the file's name, sha256 and
    dtype added) beside it as seed<k>.json, both atomically; returns the metadata path."""
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    atomic_write_bytes(weights_path, buffer.getvalue())
    metadata = {
        **metadata,
        "shipped_at_commit": git_state().get("commit"),
        "weights_file": weights_path.name,
        "weights_sha256": sha256_hex(weights_path.read_bytes()),
        "weights_dtype": "float32",
    }
    meta_path = weights_path.with_suffix(".json")
    atomic_write_json(meta_path, metadata)
    return meta_path


def ship_potential(run_dir, root=None) -> Path:
    """Write the best checkpoint of a finished run as a shipped potential (weights-only float32 EMA weights and
    their metadata) under `root` (POTENTIALS_DIR by default), and the data set's test sample if it is not there
    yet. Needs the run's data (its content sha256 must match the run's). Returns the metadata path."""
    from .training import RunData, check_data_sha256

    run_dir = Path(run_dir)
    root = Path(root) if root is not None else POTENTIALS_DIR
    checkpoint = load_checkpoint(run_dir / "checkpoint_best.pt")
    config = TrainConfig.from_dict(checkpoint["config"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    model_name, seed = run_dir.name.rsplit("_seed", 1)
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])  # the best checkpoint holds the EMA weights
    data = RunData(config, model.zbl)
    check_data_sha256(provenance["data"]["content_sha256"], data, run_dir / "checkpoint_best.pt")
    out_dir = root / config.dataset / config.target / model_name
    sample_path = root / config.dataset / config.target / SAMPLE_FILE
    if sample_path.exists():
        sample = _load_sample(root, config.dataset, config.target)
        if str(sample["content_sha256"]) != data.data_sha256:
            raise ValueError(f"{sample_path} comes from other data than {run_dir}: ship runs of one data set")
    else:
        sample = _sample_arrays(data)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **sample)
        atomic_write_bytes(sample_path, buffer.getvalue())
    weights = _float32_weights(model)
    weights_path = out_dir / f"seed{int(seed)}.pt"
    shipped = build_model(config)
    shipped.load_state_dict(weights)
    recomputed = to_reporting_units(evaluate(shipped, data, data.test, torch.device("cpu")), config)
    for key, value in metrics["test"].items():  # the shipped float32 weights give the run's own test MAE
        if not np.isclose(recomputed[key], value, rtol=1e-4, atol=0.0):
            raise ValueError(
                f"{run_dir}: the shipped weights give test {key} {recomputed[key]:.6g}, the run {value:.6g}"
            )
    metadata = {
        "format": POTENTIAL_FORMAT,
        "name": f"{config.dataset}/{config.target}/{model_name}",
        "dataset": config.dataset,
        "target": config.target,
        "model": model_name,
        "seed": int(seed),
        "config": config.to_dict(),
        "offset": list(checkpoint["offset"]),
        "offset_method": metrics.get("offset_method"),
        "elements": checkpoint.get("elements"),
        "energy_unit": reporting_unit(config)["energy"] if config.dataset != "qm9" else "eV",
        "units": metrics["units"],
        "test_mae": metrics["test"],
        "best_step": checkpoint.get("step"),
        "sample_mae": sample_mae(shipped, checkpoint["offset"], sample, config.dataset),
        "sample_units": "training units (kcal/mol, kcal/mol/A for MD17; eV for QM9 energies)",
        "sample_dtype": SAMPLE_DTYPE,
        "data": provenance["data"],
        "trained_at_commit": provenance["git"].get("commit"),
        "run": portable_path(run_dir),
    }
    return _write_potential(weights, weights_path, metadata)


def ship_bit_identical_recipe(run_dir, twin: str, root=None) -> Path:
    """Ship a finished ZBL-recipe run whose checkpoint is not here from the shipped weights of the DimeNet run it
    trained bit-identically to (`twin`, a shipped name such as "md17/ethanol/dimenet", same seed).

    Recipes (b) and (c) are zero at every distance of QM9 and of the generated MD17 sets, so with the same seed
    their training is DimeNet's, step for step: where both checkpoints exist (malonaldehyde, QM9 U0) the trained
    weights are bit-identical, the recipe's only extra entry being its fixed ZBL weight (a buffer, 1.0). This
    ships the twin's weights under the recipe's config after checking what makes them the recipe's: the same
    data (content sha256), seed, budget and offsets, and test MAEs equal to the last digit. The metadata names
    the twin (`weights_from`)."""
    run_dir = Path(run_dir)
    root = Path(root) if root is not None else POTENTIALS_DIR
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    model_name, seed = run_dir.name.rsplit("_seed", 1)
    seed = int(seed)
    twin_weights, twin_meta = load_shipped_weights(_resolve(twin, seed, root).with_suffix(".pt"))
    twin_config = TrainConfig.from_dict(twin_meta["config"])
    same = {
        "data": provenance["data"]["content_sha256"] == twin_meta["data"]["content_sha256"],
        "seed": config.seed == twin_config.seed == seed,
        "budget": (config.max_steps, config.profile) == (twin_config.max_steps, twin_config.profile),
        "offsets": metrics["target_offset"]["per_element"]
        == json.loads((repository_path(twin_meta["run"]) / "metrics.json").read_text())["target_offset"]["per_element"],
        "test MAEs": metrics["test"] == twin_meta["test_mae"],
        "best step": metrics["best_step"] == twin_meta["best_step"],
    }
    differ = [what for what, equal in same.items() if not equal]
    if differ or twin_config.zbl or not config.zbl:
        raise ValueError(
            f"{run_dir} did not train bit-identically to {twin} seed {seed} (differs in "
            f"{', '.join(differ) or 'being DimeNet against a ZBL recipe'}): ship it from its own checkpoint"
        )
    model = build_model(config)
    missing, unexpected = model.load_state_dict(twin_weights, strict=False)
    if unexpected or any(not key.startswith("zbl.") for key in missing):
        raise ValueError(f"{twin}'s weights do not fit {model_name}: missing {missing}, unexpected {unexpected}")
    weights = _float32_weights(model)
    sample = _load_sample(root, config.dataset, config.target)
    recipe_sample_mae = sample_mae(model, twin_meta["offset"], sample, config.dataset)
    for key, value in twin_meta["sample_mae"].items():  # the recipe's term is zero on the sample too
        if not np.isclose(recipe_sample_mae[key], value, rtol=1e-8, atol=0.0):
            raise ValueError(f"{model_name} differs from {twin} on the shipped sample ({key}): its ZBL term acts there")
    weights_path = root / config.dataset / config.target / model_name / f"seed{seed}.pt"
    metadata = {
        **{key: twin_meta[key] for key in ("format", "dataset", "target", "offset", "elements", "energy_unit")},
        "name": f"{config.dataset}/{config.target}/{model_name}",
        "model": model_name,
        "seed": seed,
        "config": config.to_dict(),
        "offset_method": metrics.get("offset_method"),
        "units": metrics["units"],
        "test_mae": metrics["test"],
        "best_step": metrics["best_step"],
        "sample_mae": recipe_sample_mae,
        "sample_units": twin_meta["sample_units"],
        "sample_dtype": SAMPLE_DTYPE,
        "data": provenance["data"],
        "trained_at_commit": provenance["git"].get("commit"),
        "run": portable_path(run_dir),
        "weights_from": {
            "name": twin,
            "seed": seed,
            "run": twin_meta["run"],
            "why": "this recipe's run trained bit-identically to it (same data, seed, budget and offsets; test "
            "MAEs and best step equal to the last digit): its ZBL term is zero at every distance of the data",
        },
    }
    return _write_potential(weights, weights_path, metadata)


def _potential_and_sample(name: str, seed: int, root=None) -> tuple:
    """The shipped potential and its data set's shipped test sample (arrays), which must come from its data."""
    potential = pretrained(name, seed, root)
    root = Path(root) if root is not None else POTENTIALS_DIR
    meta = potential.metadata
    sample = _load_sample(root, meta["dataset"], meta["target"])
    if str(sample["content_sha256"]) != meta["data"]["content_sha256"]:
        raise ValueError(f"the shipped test sample of {name} comes from other data than seed {seed}")
    return potential, sample


def check_pretrained(name: str, seed: int = 0, root=None, rtol: float = 1e-8) -> dict:
    """Load a shipped potential (sha256 checked) and recompute its MAE on the shipped test sample: returns
    {"recorded": ..., "recomputed": ...}; raises if they differ beyond `rtol`."""
    potential, sample = _potential_and_sample(name, seed, root)
    meta = potential.metadata
    if meta.get("sample_dtype") != SAMPLE_DTYPE:
        raise ValueError(
            f"{name} seed {seed} records its sample MAE in {meta.get('sample_dtype', 'float32')}, not {SAMPLE_DTYPE}: "
            "ship it again from its run (ship_potential), or record the sample MAE again (record_sample_mae)"
        )
    recomputed = sample_mae(potential.model, potential.offset, sample, meta["dataset"])
    for key, value in meta["sample_mae"].items():
        if not np.isclose(recomputed[key], value, rtol=rtol, atol=0.0):
            raise ValueError(
                f"{name} seed {seed}: {key} on the shipped sample is {recomputed[key]:.6g}, recorded {value:.6g}"
            )
    return {"recorded": meta["sample_mae"], "recomputed": recomputed}


def record_sample_mae(name: str, seed: int = 0, root=None) -> dict:
    """Recompute the shipped sample MAE of a shipped potential in SAMPLE_DTYPE and write it into its metadata
    (the weights and their sha256 stay as they are); returns the new values."""
    potential, sample = _potential_and_sample(name, seed, root)
    metadata = {
        **potential.metadata,
        "sample_mae": sample_mae(potential.model, potential.offset, sample, potential.metadata["dataset"]),
        "sample_dtype": SAMPLE_DTYPE,
    }
    atomic_write_json(_resolve(name, seed, root), metadata)
    return metadata["sample_mae"]


def models_main(argv: Optional[Sequence[str]] = None) -> int:
    """`dimezbl models`: the shipped potentials, one line each."""
    import argparse

    parser = argparse.ArgumentParser(prog="dimezbl models", description="List the shipped potentials.")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = list_pretrained()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no potentials are shipped in {POTENTIALS_DIR}")
        return 0
    for row in rows:
        maes = ", ".join(
            f"{key[len('test_') : -len('_mae')]} {value:.4g} "
            f"{row['forces_unit'] if key.startswith('test_forces') else row['energy_unit']}"
            for key, value in row.items()
            if key.startswith("test_") and key.endswith("_mae")
        )
        seeds = ",".join(map(str, row["seeds"]))
        print(f"{row['name']:45s} seeds {seeds:8s} {row['training_steps']:>6,} steps  test MAE {maes}")
    return 0
