"""Shared pytest fixtures: QM9 sample molecules read independently of the data code, a generated ethanol set."""

import os

# ---------------------------------------------------------------------------------------------------------------
# QM9 sample molecules for the model tests (tests/test_pyg_equivalence.py): read directly from the qm9pack CSV,
# independently of dimezbl_core's data code. One molecule per distinct atom count (3 .. 26 atoms in the first rows).
# ---------------------------------------------------------------------------------------------------------------
import pytest as _pytest  # noqa: E402


def _read_qm9_sample(nrows=8000, max_molecules=24):
    import ast
    import importlib.util

    import numpy as np
    import pandas as pd
    import torch
    from ase.data import atomic_numbers

    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        _pytest.skip("qm9pack is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "data", "qm9_part1.csv")
    df = pd.read_csv(path, nrows=nrows, usecols=["Index", "N_atoms", "Elements", "XYZ_Ang"])
    # the first molecule of every distinct size, smallest to largest
    picked = df.drop_duplicates("N_atoms").sort_values("N_atoms").head(max_molecules)
    molecules = []
    for _, row in picked.iterrows():
        elements = ast.literal_eval(row["Elements"])
        xyz = np.asarray(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
        assert xyz.shape == (int(row["N_atoms"]), 3) and len(elements) == xyz.shape[0]
        z = torch.tensor([atomic_numbers[s] for s in elements], dtype=torch.long)
        molecules.append({"index": int(row["Index"]), "z": z, "pos": torch.from_numpy(xyz)})
    return molecules


@_pytest.fixture(scope="package")
def qm9_sample_molecules():
    """List of dicts {index, z (int64 [N]), pos (float64 [N, 3], Angstrom)}: real QM9 molecules of 3..26 atoms."""
    return _read_qm9_sample()


# ---------------------------------------------------------------------------------------------------------------
# One smoke-profile MD17 run (GFN2-xTB ethanol generated into a temporary data dir, plain DimeNet), shared by the
# training test (does it learn?) and the ASE tests (NVE with a trained model).
# ---------------------------------------------------------------------------------------------------------------
@_pytest.fixture(scope="package")
def ethanol_smoke_data(tmp_path_factory):
    """A data dir holding 300 GFN2-xTB ethanol configurations (data/md17/generated/ethanol.npz)."""
    import dimezbl as dz

    root = tmp_path_factory.mktemp("ethanol_smoke")
    dz.generate_md17("ethanol", 300, data_dir=root / "data", progress=False, equilibration_steps=400)
    return root


@_pytest.fixture(scope="package")
def ethanol_smoke_run(ethanol_smoke_data):
    import dimezbl as dz

    root = ethanol_smoke_data
    config = dz.profile_config(
        "smoke", "md17", "ethanol", zbl=False, out_dir=str(root / "runs"), data_dir=str(root / "data")
    )
    metrics = dz.train(config, resume=False, progress=False)
    return config, metrics
