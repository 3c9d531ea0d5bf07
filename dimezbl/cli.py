"""The command line: `dimezbl <subcommand>` (train, evaluate, run-models, reproduce, tables, export, ...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import DATASETS, PROFILES, TrainConfig, config_from_file, parse_set_arguments, profile_config
from .export import export_model
from .files import REPOSITORY_ROOT, atomic_write_bytes
from .md17_generate import generate_md17_main
from .reproduction import reproduce_main
from .runner import MODEL_RECIPES, run_models, write_zbl_term
from .shortrange import shortrange_main
from .tables import DOCUMENT_TABLES, README_TABLES, readme_with_tables
from .training import ZBL_TERM_FILE, TrainingDiverged, evaluate_checkpoint, train


def add_train_arguments(parser):
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a YAML or JSON file of TrainConfig fields, e.g. a run's config.json (retrains that "
                        "run); the options below override it")  # fmt: skip
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="required without --config; file: your own data (--data-file, --energy-unit)",
    )
    parser.add_argument(
        "--data-file",
        default=None,
        metavar="FILE",
        help="dataset file: an extended-XYZ file or an ASE database (.db, .json)",
    )
    parser.add_argument(
        "--energy-unit",
        default=None,
        help="dataset file: the unit of its energies (eV, meV, "
        "Hartree, kcal/mol, kJ/mol); forces in that unit per Angstrom",
    )
    parser.add_argument("--energy-key", default=None, help="dataset file: the energy key (default energy)")
    parser.add_argument("--forces-key", default=None, help="dataset file: the forces key (default forces, optional)")
    parser.add_argument("--split-file", default=None, help="dataset file: JSON of train/valid/test frame indices "
                        "(default: --set split_fractions=[0.8,0.1,0.1])")  # fmt: skip
    parser.add_argument("--target", default=None, help="QM9 target (U0, mu, ...) or MD17 molecule; required "
                        "without --config")  # fmt: skip
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default smoke")
    parser.add_argument("--no-zbl", action="store_true", help="train the plain DimeNet baseline")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument("--out-dir", default=None, help="default results/runs")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or data/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a TrainConfig field, e.g. --set max_steps=100 "
                        "--set 'model={\"hidden_channels\": 64}'")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--no-progress", action="store_true")


def run_models_main(argv: Optional[Sequence[str]] = None) -> int:
    """`dimezbl run-models --profile cpu --dataset md17 --targets benzene ...`: the
    training part of notebooks 03/04 (run_models) from the command line, e.g. for a long profile
    trained in chunks in the background; prints one line per run, exit status 3 if one diverges."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="dimezbl run-models",
        description=(
            "Train DimeNet and DimezblNet for targets of a profile, seed by seed (both models of a seed "
            "together); finished runs are reused, interrupted ones resume from their checkpoints."
        ),
    )
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--dataset", choices=("qm9", "md17"), required=True)
    parser.add_argument("--targets", nargs="+", required=True, help="QM9 targets or MD17 molecules")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the profile's seeds")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODEL_RECIPES),
        default=("dimenet", "dimezblnet"),
        help="models to train (MODEL_RECIPES; default: DimeNet and the literal DimezblNet)",
    )
    parser.add_argument("--results-dir", default=None, help="default <repository>/results")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's); with two jobs on two cores use 1 each",
    )
    parser.add_argument(
        "--reuse-committed",
        action="store_true",
        help="count finished runs without their checkpoints as done (see run_models)",
    )
    parser.add_argument(
        "--no-training",
        action="store_true",
        help="train nothing: list the unfinished runs and collect the finished ones",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a TrainConfig field (runs then differ from the profile's)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = parse_set_arguments(args.set)
    if args.device is not None and overrides.get("device", args.device) != args.device:
        parser.error(f"--device {args.device} and --set device={overrides['device']} disagree: give one of them")
    device = overrides.pop("device", args.device)
    try:
        run_models(
            args.profile,
            args.dataset,
            args.targets,
            args.seeds,
            models=args.models,
            data_dir=args.data_dir,
            results_dir=args.results_dir,
            device=device,
            progress=False,
            reuse_committed=args.reuse_committed,
            train_missing=not args.no_training,
            **overrides,
        )
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


def config_from_arguments(args) -> TrainConfig:
    overrides = parse_set_arguments(args.set)
    if args.device is not None and overrides.get("device", args.device) != args.device:
        raise ValueError(f"--device {args.device} and --set device={overrides['device']} disagree: give one of them")
    for key in ("device", "out_dir", "data_dir", "dataset", "target", "profile", "seed", "data_file", "energy_unit",
                "energy_key", "forces_key", "split_file"):  # fmt: skip
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_zbl:
        overrides["zbl"] = False
    if args.config is not None:
        return config_from_file(args.config, **overrides)
    if overrides.get("dataset") == "file" and "target" not in overrides and overrides.get("data_file"):
        overrides["target"] = Path(overrides["data_file"]).stem  # the data's name in the run directory
    missing = [f"--{key}" for key in ("dataset", "target") if key not in overrides]
    if missing:
        raise ValueError(f"{' and '.join(missing)} needed (or --config FILE holding them)")
    profile = overrides.pop("profile", "smoke")
    return profile_config(profile, overrides.pop("dataset"), overrides.pop("target"), **overrides)


# --- Command-line entry ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    """`dimezbl {train,evaluate,export,models,shortrange,generate-md17,run-models,reproduce,fair,zbl-term,
    readme-tables} ...` (see --help); `python -m dimezbl` is the same."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate-md17"]:
        return generate_md17_main(argv[1:])
    if argv[:1] == ["reproduce"]:
        return reproduce_main(argv[1:])
    if argv[:1] == ["shortrange"]:
        return shortrange_main(argv[1:])
    if argv[:1] == ["run-models"]:
        return run_models_main(argv[1:])
    if argv[:1] == ["models"]:
        from .shipped import models_main

        return models_main(argv[1:])
    if argv[:1] == ["fair"]:
        from .fair import main as fair_main

        return fair_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dimezbl", description="DimezblNet companion (DimeNet + ZBL).")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train one model (resumes from its checkpoint)")
    add_train_arguments(train_parser)
    evaluate_parser = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate_parser.add_argument("--checkpoint", required=True)
    evaluate_parser.add_argument("--subset", choices=("valid", "test"), default="test")
    evaluate_parser.add_argument("--device", default="auto")
    export_parser = sub.add_parser(
        "export",
        help="write a checkpoint as a self-contained TorchScript file "
        "(energy and forces; load with torch.jit.load, no dimezbl_core needed)",
    )
    export_parser.add_argument("checkpoint", help="a checkpoint_best.pt of an energy model")
    export_parser.add_argument("out", help="the TorchScript file to write, e.g. model.pt")
    export_parser.add_argument(
        "--dtype", choices=("float32", "float64"), default=None, help="default: the checkpoint's training dtype"
    )
    sub.add_parser(
        "shortrange",
        help="bond compression against GFN2-xTB and MD stability of the MD17 models (make shortrange; see its --help)",
    )
    sub.add_parser("generate-md17", help="generate MD17-style data with GFN2-xTB (see its --help)")
    sub.add_parser(
        "run-models",
        help="train every (target, model, seed) of a profile without the notebooks, resumable (see its --help)",
    )
    sub.add_parser("reproduce", help="regenerate Tables 1 and 2 and the figures (notebooks 01-05, see its --help)")
    sub.add_parser(
        "fair", help="the matched-start test of the paper's claim: fair {train,report,shortrange} (see its --help)"
    )
    sub.add_parser("models", help="list the shipped potentials (name, seeds, test MAE)")
    zbl_parser = sub.add_parser(
        "zbl-term",
        help="write zbl_term.json (learned ZBL weight and what the term "
        "adds) for finished DimezblNet runs from their best checkpoints",
    )
    zbl_parser.add_argument("run_dirs", nargs="+", help="run directories holding checkpoint_best.pt")
    zbl_parser.add_argument("--subset", choices=("train", "valid", "test"), default="test")
    zbl_parser.add_argument("--data-dir", default=None)
    sub.add_parser(
        "readme-tables",
        help="copy the committed tables (README_TABLES) into the marked blocks "
        "of README.md and docs/results.md (DOCUMENT_TABLES), after a rebuild of the tables",
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            config = config_from_arguments(args)
        except (ValueError, TypeError, FileNotFoundError) as error:
            parser.error(str(error))
        try:
            metrics = train(config, resume=not args.no_resume, progress=not args.no_progress)
        except TrainingDiverged as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        print(json.dumps(metrics, indent=2))
    elif args.command == "evaluate":
        print(json.dumps(evaluate_checkpoint(args.checkpoint, args.subset, args.device), indent=2))
    elif args.command == "export":
        metadata = export_model(args.checkpoint, args.out, getattr(torch, args.dtype) if args.dtype else None)
        print(
            f"wrote {args.out}: energy in {metadata['energy_unit']}, forces in {metadata['forces_unit']}, "
            f"{metadata['dtype']}; training offset {metadata['offset']}"
        )
    elif args.command == "zbl-term":
        for run_dir in args.run_dirs:
            term = write_zbl_term(run_dir, args.subset, data_dir=args.data_dir)
            print(
                f"{Path(run_dir) / ZBL_TERM_FILE}: weight {term['zbl_weight']:.5g}, contribution "
                f"{term['contribution']['mean']:.4g} +- {term['contribution']['std']:.3g} "
                f"{term['contribution']['unit']} over {term['n_molecules']} {term['subset']} molecules"
            )
    elif args.command == "readme-tables":
        for document, names in DOCUMENT_TABLES.items():
            path = REPOSITORY_ROOT / document
            text = path.read_text(encoding="utf-8")
            updated = readme_with_tables(text, names=names)
            if updated != text:
                atomic_write_bytes(path, updated.encode("utf-8"))
            print(
                f"{path}: {'updated' if updated != text else 'already up to date'} "
                f"({', '.join(README_TABLES[name] for name in names)})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
