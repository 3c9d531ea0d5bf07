"""TorchScript export (`export_model`): the file, loaded with plain torch in a clean interpreter
(no dimezbl_core), gives the Python model's energies and forces on 10 molecules of different
sizes, alone and batched; it carries its unit and offset; bad input is refused."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import dimezbl as dz
import dimezbl_core as dc

HCO_MD17 = ("aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic_acid", "toluene")


def ten_molecules(qm9_sample_molecules, elements=None):
    """10 (z, pos float64) of different sizes: MD17 start geometries (H, C, O ones when `elements`
    is given), then QM9 molecules made of `elements` only."""
    molecules = [
        (torch.tensor(atoms.numbers), torch.tensor(atoms.positions))
        for atoms in (dz.md17_start_geometry(name)[0] for name in HCO_MD17)
    ]
    for sample in qm9_sample_molecules:
        sizes = {len(z) for z, _ in molecules}
        if len(molecules) == 10:
            break
        if len(sample["z"]) not in sizes and (elements is None or set(sample["z"].tolist()) <= set(elements)):
            molecules.append((sample["z"], sample["pos"]))
    assert len(molecules) == 10 and len({len(z) for z, _ in molecules}) >= 9  # ethanol, malonaldehyde: 9 atoms
    return molecules


def batched(molecules):
    z = torch.cat([z for z, _ in molecules])
    pos = torch.cat([pos for _, pos in molecules])
    batch = torch.cat([torch.full((len(z),), k) for k, (z, _) in enumerate(molecules)])
    return z, pos, batch


def run_exported_in_clean_interpreter(path, inputs, tmp_path):
    """Outputs of the exported file for each (z, pos, batch) of `inputs`, computed by a fresh
    `python -I` (isolated: no PYTHONPATH, no cwd on sys.path) that imports torch only."""
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        model = torch.jit.load({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        outputs = [model(z, pos, batch) for z, pos, batch in inputs]
        assert not any(name.startswith("dimezbl") for name in sys.modules), "dimezbl_core was imported"
        torch.save({{"outputs": outputs, "unit": model.energy_unit,
                    "offset": (model.offset_per_molecule, model.offset_per_atom),
                    "offset_per_element": model.offset_per_element}}, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, check=True, timeout=120)
    return torch.load(tmp_path / "out.pt")


def assert_same(python, exported, rtol):
    (energy, forces), (energy_x, forces_x) = python, exported
    assert energy_x.dtype == energy.dtype and forces_x.shape == forces.shape
    torch.testing.assert_close(energy_x, energy.detach(), rtol=rtol, atol=rtol * energy.abs().max().item())
    torch.testing.assert_close(forces_x, forces.detach(), rtol=rtol, atol=rtol * forces.abs().max().item())


def test_exported_checkpoint_equals_the_python_model_without_dimezbl_core(
    ethanol_smoke_run, qm9_sample_molecules, tmp_path
):
    """The smoke-trained MD17 ethanol model (float32), exported from its best checkpoint, run in a
    clean interpreter on 10 molecules one by one and as one batch."""
    config, _ = ethanol_smoke_run
    checkpoint = config.run_dir / "checkpoint_best.pt"
    metadata = dz.export_model(checkpoint, tmp_path / "ethanol.pt")
    model, _ = dz.load_trained_model(checkpoint)
    molecules = [(z, pos.float()) for z, pos in ten_molecules(qm9_sample_molecules, elements=(1, 6, 8))]
    inputs = [(z, pos, torch.zeros_like(z)) for z, pos in molecules] + [batched(molecules)]
    result = run_exported_in_clean_interpreter(tmp_path / "ethanol.pt", inputs, tmp_path)
    for (z, pos, batch), exported in zip(inputs, result["outputs"]):
        assert_same(model.energy_and_forces(z, pos, batch), exported, rtol=1e-4)
    assert result["outputs"][-1][0].shape == (10,)
    # unit and training offset travel with the file
    stored = torch.load(checkpoint, weights_only=True)["offset"]
    assert result["unit"] == metadata["energy_unit"] == "kcal/mol"
    assert result["offset"] == pytest.approx((float(stored[0]), float(stored[1])))
    assert result["offset_per_element"].tolist() == pytest.approx(stored[2])  # per-element offset (smoke profile)
    extra = {"metadata.json": ""}
    torch.jit.load(str(tmp_path / "ethanol.pt"), _extra_files=extra)
    stored_metadata = json.loads(extra["metadata.json"])
    assert stored_metadata["offset"]["per_atom"] == pytest.approx(float(stored[1]))
    assert stored_metadata["elements"] == [1, 6, 8] and stored_metadata["target"] == "ethanol"


@pytest.mark.parametrize("variant, reach", [("dimenet", "cutoff"), ("dimenet++", "lammps"), ("dimenet", "covalent")])
def test_exported_model_equals_the_python_model_in_float64(variant, reach, qm9_sample_molecules, tmp_path):
    """Untrained float64 models with a non-zero output layer and each ZBL reach, on 10 molecules
    (H, C, N, O, F; one compressed bond so the short-range switches are active), batched."""
    torch.manual_seed(0)
    model = dc.DimezblNet(
        hidden_channels=16,
        num_blocks=2,
        num_bilinear=4,
        num_spherical=4,
        num_radial=4,
        variant=variant,
        int_emb_size=8,
        basis_emb_size=4,
        out_emb_channels=16,
        output_initializer="glorot_orthogonal",
        zbl_unit="eV",
        zbl_reach=reach,
    ).double()
    molecules = ten_molecules(qm9_sample_molecules)
    z, pos, batch = batched(molecules)
    pos = pos.clone()
    pos[1] = pos[0] + 0.6 * (pos[1] - pos[0]) / (pos[1] - pos[0]).norm()  # a bond at 0.6 A
    dz.export_model(model, tmp_path / "model.pt")
    exported = torch.jit.load(str(tmp_path / "model.pt"))
    assert_same(model.energy_and_forces(z, pos, batch), exported(z, pos, batch), rtol=1e-9)
    with torch.no_grad():  # energies alone also under no_grad
        torch.testing.assert_close(exported.energy(z, pos, batch), model(z, pos, batch), rtol=1e-9, atol=1e-9)
    # a diatomic molecule: edges but no triplets
    z2, pos2, batch2 = (
        torch.tensor([6, 8]),
        torch.tensor([[0.0, 0, 0], [0, 0, 1.13]], dtype=torch.float64),
        torch.zeros(2, dtype=torch.long),
    )
    assert_same(model.energy_and_forces(z2, pos2, batch2), exported(z2, pos2, batch2), rtol=1e-9)


def test_export_and_the_exported_model_refuse_bad_input(tmp_path):
    torch.manual_seed(0)
    model = dc.DimezblNet(hidden_channels=8, num_blocks=1, num_bilinear=2, num_spherical=3, num_radial=3)
    with pytest.raises(ValueError, match="out_channels"):
        dz.export_model(dc.DimezblNet(hidden_channels=8, num_blocks=1, out_channels=2), tmp_path / "a.pt")
    with pytest.raises(TypeError, match="checkpoint path or a DimezblNet"):
        dz.export_model({"model": {}}, tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError):
        dz.export_model(tmp_path / "missing.pt", tmp_path / "a.pt")
    with pytest.raises(ValueError, match="dtype"):
        dz.export_model(model, tmp_path / "a.pt", dtype=torch.float16)
    assert not (tmp_path / "a.pt").exists()
    dz.export_model(model.double(), tmp_path / "b.pt")
    exported = torch.jit.load(str(tmp_path / "b.pt"))
    z, pos, batch = (
        torch.tensor([8, 1, 1]),
        torch.tensor([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
        torch.zeros(3, dtype=torch.long),
    )
    assert torch.isfinite(exported(z, pos.double(), batch)[1]).all()
    cases = {
        "atomic numbers": (torch.tensor([8, 1, 0]), pos, batch),
        "coincident": (z, torch.zeros(3, 3), batch),
        "sorted": (z, pos, torch.tensor([1, 0, 0])),
        "NaN": (z, torch.full((3, 3), float("nan")), batch),
        r"\[num_atoms, 3\]": (z, pos[:2], batch),
    }
    for message, (z_bad, pos_bad, batch_bad) in cases.items():
        with pytest.raises(torch.jit.Error, match=message):
            exported(z_bad, pos_bad, batch_bad)
    with torch.no_grad(), pytest.raises(torch.jit.Error, match="gradients enabled"):
        exported(z, pos, batch)


def test_command_line_export(ethanol_smoke_run, tmp_path):
    config, _ = ethanol_smoke_run
    out = tmp_path / "cli.pt"
    assert dz.main(["export", str(config.run_dir / "checkpoint_best.pt"), str(out), "--dtype", "float64"]) == 0
    module, metadata = dz.load_exported(out)
    assert metadata["dtype"] == "float64" and metadata["format"] == dz.EXPORT_FORMAT
    assert module.rbf.freq.dtype == torch.float64
