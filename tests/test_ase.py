"""ASE calculator: forces equal finite differences, NVE conserves energy, units, bad input."""

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

import dimezbl as dz
import dimezbl_core as dc


def untrained_calculator(zbl=True, unit="kcal/mol", output_scale=0.01, **kwargs):
    """A small DimezblNet with a fixed seed and a non-zero (glorot, scaled down) output layer, so
    energies and forces are non-trivial but of a molecular size (forces ~ 1 eV/A); kcal/mol as
    for MD17; the ZBL term switched at the covalent radii (active under compression)."""
    torch.manual_seed(0)
    model = dc.DimezblNet(
        hidden_channels=16,
        num_blocks=2,
        num_bilinear=4,
        num_spherical=4,
        num_radial=4,
        output_initializer="glorot_orthogonal",
        zbl=zbl,
        zbl_unit=unit,
        zbl_reach="covalent",
    )
    with torch.no_grad():
        for block in model.output_blocks:
            block.lin.weight.mul_(output_scale)
    return dz.DimezblCalculator(model, **kwargs)


def test_forces_equal_finite_differences_of_the_energy():
    atoms = molecule("CH3CH2OH")
    atoms.calc = untrained_calculator()
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3

    def central_difference(index, axis, h):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[index, axis] += h
        minus.positions[index, axis] -= h
        plus.calc = minus.calc = atoms.calc
        return -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)

    for index in (0, 3, 8):
        for axis in range(3):  # Richardson extrapolation of central differences: O(h^4)
            h = 2e-5
            numerical = (4 * central_difference(index, axis, h / 2) - central_difference(index, axis, h)) / 3
            assert forces[index, axis] == pytest.approx(numerical, rel=1e-6, abs=1e-9)


def test_energy_is_in_ev_and_per_atom_energies_sum_to_it():
    atoms = molecule("CH3CH2OH")
    calc = untrained_calculator(offset=(1.0, 0.5))
    atoms.calc = calc
    energy_ev = atoms.get_potential_energy()
    z = torch.tensor(atoms.numbers)
    pos = torch.tensor(atoms.positions, dtype=torch.float64)
    model_kcal = float(calc.model(z, pos)) + 1.0 + 0.5 * len(atoms)
    assert energy_ev == pytest.approx(model_kcal * units.kcal / units.mol, rel=1e-12)
    assert atoms.get_potential_energies().sum() == pytest.approx(energy_ev, rel=1e-12)


def test_nve_conserves_total_energy(ethanol_smoke_run):
    """1,000 velocity-Verlet steps of 0.25 fs for ethanol at 300 K with the smoke-trained model
    (loaded through the calculator from its best checkpoint): the total energy stays within
    2e-3 eV while the potential energy moves by much more, and the molecule stays bound."""
    config, _ = ethanol_smoke_run
    atoms = molecule("CH3CH2OH")
    atoms.calc = dz.DimezblCalculator.from_checkpoint(config.run_dir / "checkpoint_best.pt")
    assert atoms.calc.energy_unit == "kcal/mol" and atoms.calc.elements == [1, 6, 8]
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    totals, potentials = [], []
    dynamics.attach(
        lambda: (totals.append(atoms.get_total_energy()), potentials.append(atoms.get_potential_energy())), interval=10
    )
    dynamics.run(1000)
    totals, potentials = np.array(totals), np.array(potentials)
    assert np.isfinite(totals).all()
    assert np.ptp(potentials) > 0.05  # eV: the dynamics is not trivial
    assert np.abs(totals - totals[0]).max() < 2e-3  # eV
    distances = atoms.get_all_distances()
    assert distances.max() < 5.0 and distances[distances > 0].min() > 0.5  # Angstrom


def test_unknown_elements_are_refused():
    atoms = molecule("CH3CH2OH")
    atoms.calc = untrained_calculator(elements=[1, 6])
    with pytest.raises(ValueError, match=r"elements \[8\] were not in the training data"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("pbc", [True, (True, False, False)])
def test_periodic_cells_are_refused(pbc):
    """A molecule in a small periodic cell would otherwise be computed as the isolated molecule."""
    atoms = molecule("CH3CH2OH")
    atoms.calc = untrained_calculator()
    isolated = atoms.get_potential_energy()
    atoms.set_cell([4.0, 4.0, 4.0])  # a cell alone (pbc False) changes nothing
    assert atoms.get_potential_energy() == pytest.approx(isolated)
    atoms.pbc = pbc
    with pytest.raises(ValueError, match=r"periodic boundary conditions .* not supported.*atoms.pbc = False"):
        atoms.get_potential_energy()
