"""ASE calculator: energies and Eq. 11 forces of a trained DimezblNet or DimeNet for isolated molecules."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from dimezbl_core import DimezblNet

from .data import ev_to_kcal_per_mol
from .training import load_energy_model, offset_atomic_energies, select_device


def energy_unit_in_ev(unit: str) -> float:
    """One `unit` of energy in eV: the single place where model units meet ASE's eV."""
    if unit == "eV":
        return 1.0
    if unit == "kcal/mol":
        return 1.0 / ev_to_kcal_per_mol()
    raise ValueError(f"unknown energy unit {unit!r}: use 'eV' or 'kcal/mol'")


def _ase_calculator_base():
    from ase.calculators.calculator import Calculator

    return Calculator


class DimezblCalculator(_ase_calculator_base()):
    """ASE calculator for a trained DimezblNet / DimeNet: energy (eV), forces (eV/A) and per-atom
    energies (eV). `DimezblCalculator.from_checkpoint(path)` loads a best checkpoint safely;
    the model's energy unit (kcal/mol for MD17, eV for QM9 energies) is converted to ASE's eV
    here and nowhere else. Inference runs in float64 by default (energy conservation in MD).

    `offset` (`offset_atomic_energies`'s layout) in the model's unit is added back to the energy (the
    training target offsets); `elements` limits the calculator to the trained elements.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(
        self,
        model: DimezblNet,
        energy_unit: Optional[str] = None,
        offset=(0.0, 0.0),
        elements=None,
        device: str = "cpu",
        dtype=torch.float64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if model.out_channels != 1:
            raise ValueError("the calculator needs an energy model (out_channels = 1)")
        self.device = select_device(device)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        unit = energy_unit or (model.zbl.unit if model.zbl is not None else model.hparams["zbl_unit"])
        self.energy_unit, self.ev_per_unit = unit, energy_unit_in_ev(unit)
        self.offset = tuple(offset)
        self.elements = None if elements is None else sorted(int(e) for e in elements)
        self.dtype = dtype

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", **kwargs) -> DimezblCalculator:
        checkpoint, _, model = load_energy_model(path, "the calculator")
        return cls(
            model,
            offset=checkpoint.get("offset", (0.0, 0.0)),
            elements=checkpoint.get("elements"),
            device=device,
            **kwargs,
        )

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        from ase.calculators.calculator import all_changes

        super().calculate(atoms, properties, system_changes or all_changes)
        if self.atoms.pbc.any():
            raise ValueError(
                f"periodic boundary conditions (pbc={self.atoms.pbc.tolist()}) are not supported: "
                "DimezblNet is a potential for isolated molecules and would ignore the cell; set "
                "atoms.pbc = False for a molecule in vacuum"
            )
        numbers = self.atoms.get_atomic_numbers()
        if self.elements is not None:
            unknown = sorted(set(numbers.tolist()) - set(self.elements))
            if unknown:
                raise ValueError(
                    f"elements {unknown} were not in the training data of this model (trained on Z = {self.elements})"
                )
        z = torch.as_tensor(numbers, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(self.atoms.get_positions(), dtype=self.dtype, device=self.device)
        pos.requires_grad_(True)
        atomic = self.model.atomic_energies(z, pos)  # model unit
        (grad,) = torch.autograd.grad(atomic.sum(), pos)
        atomic = atomic.detach().cpu().double() + offset_atomic_energies(self.offset, z) + self.offset[0] / len(numbers)
        energies = atomic.cpu().double().numpy() * self.ev_per_unit
        self.results["energies"] = energies
        self.results["energy"] = self.results["free_energy"] = float(energies.sum())
        self.results["forces"] = -grad.cpu().double().numpy() * self.ev_per_unit


class DimezblCommittee(_ase_calculator_base()):
    """ASE calculator over several models of one potential (e.g. the seeds of a cell): the mean energy and forces,
    and their spread across the members as an uncertainty, as MACE's committee calculator and DeePMD-kit's model
    deviation do. Results, in eV and eV/A:

    - "energy", "free_energy", "forces", "energies": the committee means;
    - "energy_std": the standard deviation of the members' energies (population, ddof 0);
    - "forces_std" [N, 3]: the standard deviation of each force component;
    - "force_deviation" [N]: per atom, sqrt(mean over members of |F_i^k - <F_i>|^2), DeePMD-kit's model_devi of
      the forces; "max_force_deviation": its maximum over the atoms (DeePMD's max_devi_f, the usual flag of an
      unreliable MD frame), "mean_force_deviation" its mean.

    Members are `DimezblCalculator`s (same unit conversion, offsets and input checks each); identical members
    give zero spread.
    """

    implemented_properties = [
        "energy",
        "free_energy",
        "forces",
        "energies",
        "energy_std",
        "forces_std",
        "force_deviation",
        "max_force_deviation",
        "mean_force_deviation",
    ]

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"a committee needs at least 2 members, got {len(members)}")
        if not all(isinstance(member, DimezblCalculator) for member in members):
            raise TypeError("committee members must be DimezblCalculator instances (e.g. from_checkpoint)")
        self.members = members

    @classmethod
    def from_checkpoints(cls, paths, device: str = "cpu", **kwargs) -> DimezblCommittee:
        return cls([DimezblCalculator.from_checkpoint(path, device=device) for path in paths], **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        import numpy as np
        from ase.calculators.calculator import all_changes

        super().calculate(atoms, properties, system_changes or all_changes)
        energies, forces, atomic = [], [], []
        for member in self.members:
            member.calculate(self.atoms, ["energy", "forces"], all_changes)
            energies.append(member.results["energy"])
            forces.append(member.results["forces"])
            atomic.append(member.results["energies"])
        energies, forces, atomic = np.array(energies), np.array(forces), np.array(atomic)  # [K], [K, N, 3], [K, N]
        mean_forces = forces.mean(axis=0)
        deviation = np.sqrt(((forces - mean_forces) ** 2).sum(axis=-1).mean(axis=0))  # [N]
        self.results.update(
            energy=float(energies.mean()),
            free_energy=float(energies.mean()),
            forces=mean_forces,
            energies=atomic.mean(axis=0),
            energy_std=float(energies.std()),
            forces_std=forces.std(axis=0),
            force_deviation=deviation,
            max_force_deviation=float(deviation.max()),
            mean_force_deviation=float(deviation.mean()),
        )
