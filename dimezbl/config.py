"""Training configuration: `TrainConfig` (validated at construction, every field named on error) and the profiles."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dimezbl_core import DimezblNet

from .data import MD17_MOLECULES, MD17_SOURCES, QM9_TARGETS
from .files import REPOSITORY_ROOT
from .own_data import ENERGY_UNITS

DATASETS = ("qm9", "md17", "file")

QM9_ENERGY_TARGETS = ("U0", "U", "H", "G")  # total (atomization) energies: ZBL enters in eV


_FLOAT_TYPES = (
    "float",
    "Optional[float]",
)  # TrainConfig annotations are strings here (from __future__ import annotations)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with every run and checkpoint.

    Defaults are DimeNet's protocol (DESIGN.md section 2); profiles override some fields.
    Energies: QM9 targets in training units (eV for energies), MD17 in kcal/mol (forces
    kcal/mol/A).
    """

    dataset: str = "qm9"  # "qm9", "md17" or "file" (your own data: data_file)
    target: str = "U0"  # a QM9 target of QM9_TARGETS, an MD17 molecule, or a name for the data of a file
    zbl: bool = True  # False: the plain DimeNet baseline
    profile: str = "custom"
    model: dict = field(default_factory=dict)  # DimezblNet keyword overrides
    md17_source: str = "generated"
    md17_path: Optional[str] = None  # an npz file instead of the default place of md17_source
    # dataset "file": an extended-XYZ file or an ASE database (own_data.load_structures), its keys and energy unit
    data_file: Optional[str] = None
    energy_key: Optional[str] = None  # None: "energy"
    forces_key: Optional[str] = None  # None: "forces" where the frames have them, else energies only
    energy_unit: Optional[str] = None  # required for files: eV, meV, Hartree, kcal/mol or kJ/mol
    split_fractions: Optional[list] = None  # files: [train, valid, test] (None: 0.8, 0.1, 0.1)
    split_file: Optional[str] = None  # files: JSON {"train": [...], "valid": [...], "test": [...]} frame indices
    n_train: Optional[int] = None  # None: DimeNet's sizes (QM9 110,000; MD17 1,000)
    n_valid: Optional[int] = None  # None: QM9 10,000; MD17 1,000
    n_test: Optional[int] = None  # None: the rest
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 3000
    decay_rate: float = 0.01
    decay_steps: Optional[int] = 4_000_000  # None: max_steps (the rate falls by decay_rate over the run)
    ema_decay: float = 0.999
    grad_clip_norm: float = 1000.0
    amsgrad_eps: float = 1e-7
    max_steps: int = 3_000_000
    max_wall_s: Optional[float] = None  # stop (and evaluate) after this much training time
    eval_every: int = 10_000
    checkpoint_every: Optional[int] = None  # None: at every evaluation
    force_weight: float = 100.0  # rho of DimeNet's MD17 loss
    # Subtracted from the targets (and so learnt as the residual): None is the dataset's default,
    # "none" for QM9 as DimeNet, "mean_per_atom" for MD17's absolute energies (see target_offset).
    target_offset: Optional[str] = None
    early_stopping_patience: Optional[int] = None  # evaluations without improvement (MD17)
    seed: int = 0
    split_seed: int = 42
    name: Optional[str] = None  # the model's name in run directories and tables (None: model_name's default)
    out_dir: str = "results/runs"
    data_dir: Optional[str] = None
    device: str = "auto"
    amp: bool = False  # bf16 autocast for energy-only training on CUDA
    compile: bool = False  # torch.compile the model
    dtype: str = "float32"

    def __post_init__(self):
        # A JSON/`--set` integer (max_wall_s=7200) is stored as the float the field holds (7200.0),
        # so config.json files and comparisons see one type.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in _FLOAT_TYPES and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        self.validate()

    def validate(self):
        """Check every field (type, range, choices) at construction, for the command line, notebooks and
        Python alike; a bad value is a ValueError naming the field, the value and what it may be."""

        def fail(name, wanted):
            raise ValueError(f"config field {name}={getattr(self, name)!r} is invalid: {wanted}")

        def integer(name, low, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"it must be an integer >= {low}" + (" or null" if optional else ""))

        def number(name, low, high=math.inf, low_open=False, high_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high)
            )
            if not ok:
                bounds = (
                    f"{'>' if low_open else '>='} {low:g}"
                    if high == math.inf
                    else f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                )
                fail(name, f"it must be a number {bounds}" + (" or null" if optional else ""))

        def choice(name, choices, optional=False):
            value = getattr(self, name)
            if not (value is None and optional) and value not in choices:
                fail(name, f"use one of {list(choices)}" + (" or null" if optional else ""))

        choice("dataset", DATASETS)
        if self.dataset == "file":
            if not isinstance(self.data_file, str) or not self.data_file:
                fail("data_file", "dataset 'file' needs the path of an extended-XYZ file or an ASE database")
            if self.energy_unit not in ENERGY_UNITS:
                fail("energy_unit", f"state the unit of the file's energies: one of {list(ENERGY_UNITS)}")
            if not isinstance(self.target, str) or not self.target or "/" in self.target:
                fail("target", "name the data of the file (a name without '/', e.g. the file's stem)")
        for name in ("data_file", "energy_key", "forces_key", "split_file"):
            if getattr(self, name) is not None and (
                not isinstance(getattr(self, name), str) or not getattr(self, name)
            ):
                fail(name, "it must be null or a non-empty string")
        if self.energy_unit is not None and self.energy_unit not in ENERGY_UNITS:
            fail("energy_unit", f"use one of {list(ENERGY_UNITS)} or null")
        if self.split_fractions is not None and (
            not isinstance(self.split_fractions, (list, tuple))
            or len(self.split_fractions) != 3
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in self.split_fractions)
            or sum(self.split_fractions) > 1 + 1e-9
            or min(self.split_fractions[:2]) <= 0
        ):
            fail("split_fractions", "it must be [train, valid, test] fractions, train and valid > 0, summing to <= 1")
        if self.dataset == "qm9" and self.target not in QM9_TARGETS:
            fail("target", f"use one of the QM9 targets {list(QM9_TARGETS)}")
        if self.dataset == "md17" and (not isinstance(self.target, str) or self.target not in MD17_MOLECULES):
            fail("target", f"use one of the MD17 molecules {list(MD17_MOLECULES)} (md17_molecule_name spells them)")
        for name in ("zbl", "amp", "compile"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "it must be true or false")
        for name in ("profile", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "it must be a non-empty string")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            fail("name", "it must be null or a non-empty name without '/'")
        if not isinstance(self.model, dict):
            fail("model", "it must be a dict of DimezblNet keyword arguments")
        choice("md17_source", MD17_SOURCES)
        for name in ("md17_path", "data_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "it must be null or a path (string)")
        for name in ("n_train", "n_valid", "n_test"):
            integer(name, 1, optional=True)
        integer("batch_size", 1)
        integer("warmup_steps", 0)
        integer("decay_steps", 1, optional=True)
        integer("max_steps", 1)
        integer("eval_every", 1)
        integer("checkpoint_every", 1, optional=True)
        integer("early_stopping_patience", 1, optional=True)
        integer("seed", 0)
        integer("split_seed", 0)
        number("learning_rate", 0.0, low_open=True)
        number("decay_rate", 0.0, 1.0, low_open=True)
        number("ema_decay", 0.0, 1.0, high_open=True)
        number("grad_clip_norm", 0.0, low_open=True)
        number("amsgrad_eps", 0.0, low_open=True)
        number("force_weight", 0.0)
        number("max_wall_s", 0.0, low_open=True, optional=True)
        choice("target_offset", TARGET_OFFSETS, optional=True)
        choice("dtype", ("float32", "float64"))
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            fail("device", "use auto, cpu, cuda or cuda:N")
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(DimezblNet.__init__).parameters.items()
            if name != "self"
        }
        for name, value in self.model.items():
            default = defaults.get(name)
            wanted = type(default) if default is not None else None
            if wanted is None or name not in defaults:
                continue  # unknown names are from_dict's error; None defaults take an int
            if wanted is bool:
                ok = isinstance(value, bool)
            elif wanted is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            elif wanted is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, wanted)
            if not ok:
                raise ValueError(
                    f"config field model.{name}={value!r} is invalid: it must be "
                    f"{'a non-negative integer' if wanted is int else 'a ' + wanted.__name__}"
                )

    @property
    def model_name(self) -> str:
        if self.name is not None:
            return self.name
        return ("dimezblnet" if self.zbl else "dimenet") + ("_pp" if self.model.get("variant") == "dimenet++" else "")

    @property
    def run_dir(self) -> Path:
        root = Path(self.out_dir)
        if not root.is_absolute():
            root = REPOSITORY_ROOT / root
        return root / self.profile / self.dataset / self.target / f"{self.model_name}_seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        model_fields = set(inspect.signature(DimezblNet.__init__).parameters) - {"self"}
        wrong = sorted(set(values.get("model") or {}) - model_fields)
        if wrong:  # a misspelt `--set model.NAME=...` fails here, before any data is loaded
            raise ValueError(
                f"unknown model fields {wrong} (DimezblNet keyword arguments); known: {sorted(model_fields)}"
            )
        return cls(**values)


SMOKE_MODEL = dict(hidden_channels=32, num_blocks=2, num_bilinear=4, num_output_layers=2,
                   num_after_skip=1, int_emb_size=16, basis_emb_size=4, out_emb_channels=32)  # fmt: skip
CPU_MODEL = dict(hidden_channels=64, num_blocks=4)  # DimeNet otherwise (8 bilinear, 3 output layers)

PROFILES = {
    # Minutes on 2 CPU cores (`make reproduce` trains 40 models in it: about 7 min in all on a 2-core
    # Intel Xeon): a shrunk model, small subsets, a 10-step EMA
    # horizon (the runs are 50-100 steps), offsets so that training starts near the data.
    "smoke": dict(
        model=SMOKE_MODEL, batch_size=16, warmup_steps=20, eval_every=25, ema_decay=0.9,
        target_offset="per_element",
        qm9=dict(n_train=1000, n_valid=100, n_test=200, max_steps=50),
        md17=dict(n_train=100, n_valid=25, max_steps=100, early_stopping_patience=None),
    ),
    # Hours on a workstation CPU (120 models for both tables and 3 seeds; measured on one core of
    # this project's 2-core machine: MD17 8-12 min, QM9 24-32 min per model, about 40 core-hours
    # in all): DimeNet's architecture at half width and 4 blocks (CPU_MODEL), the full QM9
    # training set, 2,000 steps of batch 32 per model (a step budget, so results do not depend
    # on the machine; max_wall_s is only a safety stop, recorded as the stop reason if hit).
    "cpu": dict(
        model=CPU_MODEL, batch_size=32, warmup_steps=300, max_steps=2000, max_wall_s=3600.0,
        target_offset="auto", ema_decay=0.99,
        eval_every=250, qm9=dict(n_train=110_000, n_valid=1000, n_test=None),
        md17=dict(n_train=1000, n_valid=500, early_stopping_patience=None),
    ),
    # The cpu architecture under a test that is fair to both models: the same per-element start
    # (a least-squares energy per element of what each network has to learn), DimeNet's warm-up and
    # exponential decay compressed to the run (the rate falls 100x by max_steps), 4 seeds
    # (PROFILE_SEEDS); the ZBL recipes of MODEL_RECIPES. docs/fair.md describes the experiment.
    "fair": dict(
        model=CPU_MODEL, batch_size=32, warmup_steps=100, max_steps=2000, decay_steps=None, decay_rate=0.01,
        target_offset="per_element", ema_decay=0.99, eval_every=250,
        qm9=dict(n_train=110_000, n_valid=1000, n_test=None),
        md17=dict(n_train=1000, n_valid=500, early_stopping_patience=None),
    ),
    # DimeNet's protocol (GPU; days per model).
    "paper": dict(
        model={}, qm9=dict(), md17=dict(n_train=1000, n_valid=1000, early_stopping_patience=50,
                                         eval_every=1000),
    ),
}  # fmt: skip

# Seeds per (target, model) of each profile: the tables give mean and spread over them.
# The fair profile at four times the budget (the same data: PROFILE_MD17_DATA), to see where the
# gap goes as training converges.
PROFILES["fair_long"] = {**PROFILES["fair"], "max_steps": 8000}

PROFILE_SEEDS = {"smoke": (0,), "cpu": (0, 1, 2), "fair": (0, 1, 2, 3), "fair_long": (0, 1, 2, 3), "paper": (0, 1, 2)}

# The offline MD17 stand-in each profile generates (generate_md17 keyword arguments).
PROFILE_MD17_GENERATION = {
    "smoke": dict(n_configs=200, sample_every=5, equilibration_steps=400),  # 2.5 fs apart
    "cpu": dict(n_configs=2000),
    "fair": dict(n_configs=2000),
    "fair_long": dict(n_configs=2000),
    "paper": dict(n_configs=12000),
}
PROFILE_MD17_DATA = {"fair_long": "fair"}  # profiles that train on another profile's generated data


def profile_config(
    profile: str, dataset: str, target: str, zbl: bool = True, seed: int = 0, **overrides
) -> TrainConfig:
    """The named config of a profile (smoke, cpu, paper) for one model; overrides win.

    overrides["model"] replaces the profile's model dict; a key "model.NAME" changes one field of
    it and keeps the others (e.g. {"model.zbl_reach": "covalent"}, `--set model.zbl_reach=covalent`)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILES)}")
    values = {k: v for k, v in PROFILES[profile].items() if k not in ("qm9", "md17")}
    if dataset == "file":  # the MD17 settings of the profile, the split from split_fractions or split_file
        sizes = ("n_train", "n_valid", "n_test")
        values.update({k: v for k, v in PROFILES[profile].get("md17", {}).items() if k not in sizes})
    else:
        values.update(PROFILES[profile].get(dataset, {}))
    values.update(dataset=dataset, target=target, zbl=zbl, seed=seed, profile=profile)
    fields = {key: value for key, value in overrides.items() if not key.startswith("model.")}
    values.update(fields)
    values["model"] = dict(values.get("model", {}))  # a copy: "model.NAME" keys never change the caller's dict
    for key, value in overrides.items():
        if key.startswith("model."):
            values["model"][key[len("model.") :]] = value
    return TrainConfig.from_dict(values)


TARGET_OFFSETS = ("none", "mean", "mean_per_atom", "per_element", "auto")


def read_config_file(path) -> dict:
    """TrainConfig fields from a YAML (.yaml, .yml) or JSON file: a run's config.json, or any subset of its
    fields (the rest come from the profile). Errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist: give a YAML or JSON file of TrainConfig fields")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # noqa: BLE001 - a parse error of either format, reported with the file
        raise ValueError(
            f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}"
        ) from error
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields, got {type(values).__name__}")
    return values


def config_from_file(path, **overrides) -> TrainConfig:
    """The TrainConfig of a config file (`read_config_file`): the file's profile (default smoke) for its dataset
    and target, the file's fields over it, then `overrides` (e.g. out_dir) over both. A run's config.json
    gives back exactly that run's config."""
    values = {**read_config_file(path), **overrides}
    out_dir = values.get("out_dir")
    if "out_dir" not in overrides and isinstance(out_dir, str) and Path(out_dir).is_absolute():
        if not Path(out_dir).exists() and not Path(out_dir).parent.exists():
            raise ValueError(
                f"config file {path} writes to out_dir={out_dir}, which is not on this machine (a config.json written"
                " in another checkout?): give --out-dir DIR (out_dir=... in Python), or a path relative to the"
                " repository root in the file"
            )
    missing = [key for key in ("dataset", "target") if key not in values]
    if missing:
        raise ValueError(
            f"config file {path} lacks {' and '.join(missing)}: add them (e.g. dataset: md17, target: ethanol)"
        )
    profile = values.pop("profile", "smoke")
    if profile not in PROFILES:  # a config.json of a custom run (profile "test", say) holds every field itself
        return TrainConfig.from_dict({**values, "profile": profile})
    dataset, target = values.pop("dataset"), values.pop("target")
    return profile_config(profile, dataset, target, **values)


def parse_set_arguments(items) -> dict:
    """`--set NAME=JSON` items as a dict (a value that is not JSON stays a string)."""
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values
