"""DimezblNet's drivers: data, training, profiles, tables, figures, notebooks, ASE calculator, export, experiments.

The model itself is the single module `dimezbl_core` (it imports only numpy and torch); this package imports it
and never the reverse. Its public names are reachable from the package, loaded on first use, e.g.
`dimezbl.train(dimezbl.TrainConfig(...))`, `dimezbl.load_md17("ethanol")`, `dimezbl.DimezblCalculator(...)`;
each lives in one module:

==============  ===============================================================================
module          concern
==============  ===============================================================================
files           repository, data and results paths; atomic writes
data            QM9 (qm9pack) and MD17 (npz) datasets, units, DimeNet's splits
md17_generate   MD17-style data generated offline with GFN2-xTB (tblite)
config          TrainConfig (validated) and the profiles (smoke, cpu, fair, fair_long, paper)
checkpoints     atomic checkpoint writes, safe loading, provenance (git, software, hardware)
training        offsets, batches, loss, the resumable training loop
runner          running a profile's models, collecting runs, loading trained models, predictions
tables          Tables 1 and 2 (the paper's values quoted, this project's beside them)
figures         PNG figures of the bases, ZBL, learning curves, parity, compression curves
reproduction    the numbered notebooks run headless by papermill (`make reproduce`)
calculator      the ASE calculator (energies and Eq. 11 forces) and the seed committee
shipped         shipped potentials: weights-only files loaded by name (`dimezbl models`)
export          TorchScript export of a trained potential
compression     bond compression curves of trained models against GFN2-xTB
shortrange      MD stability and the whole short-range experiment (`make shortrange`)
fair            the matched-start test of the paper's claim (`make fair`)
cli             the `dimezbl` command line
==============  ===============================================================================
"""

from __future__ import annotations

import importlib

_API = {
    "files": (
        "data_dir_path",
        "atomic_write_bytes",
        "atomic_write_json",
        "sha256_hex",
        "REPOSITORY_ROOT",
        "portable_path",
        "repository_path",
        "results_path",
    ),
    "data": (
        "LOG",
        "EV_TO_MEV",
        "QM9_TARGETS",
        "QM9_TRAINING_UNITS",
        "QM9_REPORTING_UNITS",
        "qm9_to_reporting_units",
        "QM9_ATOMREF_HARTREE",
        "QM9_CSV_COLUMNS",
        "QM9_NUM_MOLECULES",
        "QM9_CSV_FILES",
        "QM9_POLARIZABILITY_FILE",
        "QM9_CACHE_FORMAT_VERSION",
        "QM9_CACHE_FILE",
        "QM9_SPLIT_SIZES",
        "qm9_source_files",
        "parse_qm9_csv",
        "QM9_ALPHA_TOLERANCE_BOHR3",
        "IndexedDataset",
        "QM9Dataset",
        "load_qm9",
        "qm9_split",
        "subset_split",
        "MD17_MOLECULES",
        "MD17_FORMULAS",
        "MD17_PYG_NAMES",
        "MD17_SGDML_KEYS",
        "MD17_RMD17_KEYS",
        "MD17_SOURCES",
        "md17_download_help",
        "md17_molecule_name",
        "read_md17_npz",
        "MD17Dataset",
        "md17_default_path",
        "PYG_DOWNLOAD_TIMEOUT_S",
        "load_md17",
        "ev_to_kcal_per_mol",
        "md17_split",
    ),
    "md17_generate": (
        "MD17_ASE_G2_NAMES",
        "md17_start_geometry",
        "BOND_CUTOFF_FACTOR",
        "bond_graph",
        "XTB_METHOD",
        "MD17_TEMPERATURE_K",
        "MD17_TIMESTEP_FS",
        "MD17_SAMPLE_EVERY",
        "MD17_EQUILIBRATION_STEPS",
        "LANGEVIN_FRICTION_PER_FS",
        "OPTIMISATION_FMAX_EV_A",
        "CHECKPOINT_EVERY",
        "xtb_calculator",
        "optimise_md17_geometry",
        "RESUME_NOTE",
        "langevin_dynamics",
        "generate_md17",
        "generate_md17_main",
    ),
    "config": (
        "DATASETS",
        "QM9_ENERGY_TARGETS",
        "TrainConfig",
        "SMOKE_MODEL",
        "CPU_MODEL",
        "PROFILES",
        "PROFILE_SEEDS",
        "PROFILE_MD17_GENERATION",
        "PROFILE_MD17_DATA",
        "profile_config",
        "TARGET_OFFSETS",
        "read_config_file",
        "config_from_file",
        "parse_set_arguments",
    ),
    "checkpoints": (
        "POTENTIAL_FORMAT",
        "load_shipped_weights",
        "atomic_torch_save",
        "load_checkpoint",
        "git_state",
        "hardware_description",
        "software_versions",
    ),
    "training": (
        "learning_rate_at",
        "ExponentialMovingAverage",
        "select_device",
        "Batch",
        "raw_targets",
        "offset_atomic_energies",
        "offset_energies",
        "collate",
        "molecule_zbl_energies",
        "QM9_INTENSIVE_TARGETS",
        "element_counts",
        "per_element_least_squares",
        "resolve_offset_kind",
        "offset_record",
        "target_offset",
        "RunData",
        "build_model",
        "load_energy_model",
        "compute_loss",
        "evaluate",
        "to_reporting_units",
        "reporting_unit",
        "TrainingDiverged",
        "RunLock",
        "train",
        "finish_run",
        "check_data_sha256",
        "evaluate_checkpoint",
        "ZBL_TERM_FILE",
        "zbl_term_summary",
    ),
    "runner": (
        "write_zbl_term",
        "zbl_terms",
        "zbl_terms_header",
        "write_zbl_terms",
        "MODEL_RECIPES",
        "MODEL_ZBL",
        "MODEL_LABELS",
        "generated_md17_path",
        "profile_seeds",
        "ensure_md17_data",
        "run_models",
        "OtherDataError",
        "check_same_data_as_finished_runs",
        "RUN_COLUMNS",
        "stale_best_checkpoint",
        "collect_runs",
        "checkpoint_path",
        "load_trained_model",
        "predict",
        "predict_runs",
    ),
    "tables": (
        "PAPER_TABLE1_COLUMNS",
        "PAPER_TABLE1",
        "DIMENET_OWN_TABLE1",
        "DIMENET_OWN_SOURCE",
        "DIMENET_OWN_COLUMN",
        "OWN_CHANGE_COLUMN",
        "PAPER_TABLE1_UNIT_NOTE",
        "NOT_REPORTED",
        "PAPER_TABLE2_COLUMNS",
        "PAPER_TABLE2",
        "MD17_LABELS",
        "MD17_QUANTITIES",
        "MD17_UNITS",
        "paper_value",
        "CHANGE_METHOD",
        "relative_change",
        "build_table1",
        "build_table2",
        "display_table",
        "markdown_table",
        "latex_table",
        "table_header",
        "write_table",
        "summary_markdown",
        "README_TABLES",
        "DOCUMENT_TABLES",
        "readme_with_tables",
        "read_table",
        "make_tables",
    ),
    "figures": (
        "MODEL_COLORS",
        "ELEMENT_Z",
        "save_figure",
        "plot_radial_basis",
        "plot_spherical_basis",
        "plot_sbf_heatmap",
        "zbl_screening_function",
        "plot_zbl_screening",
        "plot_zbl_pair_energies",
        "plot_learning_curves",
        "plot_parity",
        "plot_compression_curves",
    ),
    "reproduction": (
        "NOTEBOOK_DIR",
        "NOTEBOOKS",
        "KERNEL_NAME",
        "NotebookFailed",
        "reproduce",
        "reproduce_main",
    ),
    "own_data": (
        "ENERGY_UNITS",
        "DEFAULT_SPLIT_FRACTIONS",
        "DB_SUFFIXES",
        "training_unit",
        "StructureDataset",
        "load_structures",
        "structure_split",
    ),
    "calculator": (
        "energy_unit_in_ev",
        "DimezblCalculator",
        "DimezblCommittee",
    ),
    "shipped": (
        "POTENTIALS_DIR",
        "SAMPLE_FILE",
        "SAMPLE_SIZE",
        "SAMPLE_DTYPE",
        "Potential",
        "list_pretrained",
        "pretrained",
        "pretrained_calculator",
        "shipped_checkpoints",
        "shipped_weights_of_run",
        "sample_mae",
        "ship_potential",
        "ship_bit_identical_recipe",
        "check_pretrained",
        "record_sample_mae",
        "models_main",
    ),
    "export": (
        "EXPORT_FORMAT",
        "EXPORT_METADATA_FILE",
        "ExportedPotential",
        "export_model",
        "load_exported",
    ),
    "compression": (
        "COMPRESSION_DISTANCES_A",
        "compression_curve",
        "checkpoint_compression_curves",
        "element_pair_bonds",
        "xtb_bond_scan",
        "compression_curve_with_reference",
        "summarize_compression",
    ),
    "shortrange": (
        "SHORTRANGE_LOG",
        "SHORTRANGE_TEMPERATURES_K",
        "SHORTRANGE_ENSEMBLES",
        "SHORTRANGE_MODELS",
        "REFERENCE_MODEL",
        "MODEL_LABELS_SHORTRANGE",
        "CLOSE_CONTACT_A",
        "BOND_BREAK_FACTOR",
        "SHORTRANGE_TIMESTEP_FS",
        "SHORTRANGE_CHECK_EVERY",
        "COMMITTEE_WARNING_EV_A",
        "SHORTRANGE_BUDGETS",
        "shortrange_checkpoints",
        "unphysical_state",
        "md_trajectory",
        "md_stability",
        "summarize_md_stability",
        "shortrange_compression",
        "write_shortrange_table",
        "shortrange_header",
        "plot_md_stability",
        "shortrange_experiment",
        "shortrange_main",
    ),
    "cli": (
        "add_train_arguments",
        "run_models_main",
        "config_from_arguments",
        "main",
    ),
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}
_SUBMODULES = (*_API, "fair")
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dimezbl' has no attribute {name!r}")


def __dir__():
    return sorted((*__all__, *_SUBMODULES))
