"""TorchScript export: a self-contained potential (energy and forces) loadable without this package."""

from __future__ import annotations

import copy
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor, nn

from dimezbl_core import (
    MAX_ATOMIC_NUMBER,
    MIN_PAIR_DISTANCE_A,
    ZBL,
    ZBL_PHI_COEFFICIENTS,
    ZBL_PHI_EXPONENTS,
    ZBL_SCREENING_EXPONENT,
    ZBL_SCREENING_LENGTH_A,
    ZBL_SOFTMIN_LENGTH_A,
    DimezblNet,
    OutputBlock,
    SphericalBasisLayer,
    _sbf_angular,
    _sbf_combine,
    _sbf_radial,
    _series_coefficients,
    _zbl_switched,
    coulomb_constant,
    radius_graph,
    scatter_sum,
    triplets,
    zbl_interpolation_weights,
)

from .checkpoints import git_state
from .files import atomic_write_bytes
from .training import load_energy_model, reporting_unit

# The export is a TorchScript module holding the trained weights and the model's own functions:
# radius_graph, triplets, the basis (`_sbf_radial`, `_sbf_angular`, `_sbf_combine`), the blocks'
# `edge_inputs` and `update`, the ZBL term (`_zbl_switched`), all scriptable; only the triplet sum
# differs: gather + index_add (`_triplet_sum`, the reference formula that `triplet_aggregate`'s
# sparse products equal; tests/test_fast_paths.py), since the custom autograd Functions and the
# CSR `TripletPlan` do not script and tracing would freeze the data-dependent shapes of the graph.
# Constants kept in ConstantTables by the model are buffers here. tests/test_export.py checks the
# file against the Python model.

EXPORT_FORMAT = "dimezbl-torchscript/1"
EXPORT_METADATA_FILE = "metadata.json"


class _ScriptSphericalBasis(nn.Module):
    """`SphericalBasisLayer` (the same `_sbf_radial`, `_sbf_angular`, `_sbf_combine`) with its
    constants as buffers."""

    def __init__(self, sbf: SphericalBasisLayer, dtype: torch.dtype):
        super().__init__()
        self.cutoff, self.envelope_p = float(sbf.cutoff), int(sbf.envelope.p)
        arrays = sbf.constants.arrays
        self.register_buffer("zeros", torch.tensor(arrays["zeros"], dtype=dtype))
        self.register_buffer("normalizer", torch.tensor(arrays["normalizer"], dtype=dtype))
        self.register_buffer("sph_prefactor", torch.tensor(arrays["sph_prefactor"], dtype=dtype))
        coefficients = _series_coefficients(sbf.num_spherical, torch.empty(0, dtype=dtype)).unsqueeze(-1)
        self.register_buffer("series_coefficients", coefficients)  # [K + 1, L, 1]

    def forward(self, dist: Tensor, cos_angle: Tensor, idx_kj: Tensor) -> Tensor:
        radial = _sbf_radial(dist / self.cutoff, self.zeros, self.normalizer, self.series_coefficients, self.envelope_p)
        return _sbf_combine(radial, _sbf_angular(cos_angle, self.sph_prefactor), idx_kj)


class _ScriptZBL(nn.Module):
    """`ZBL.forward` (the same `_zbl_switched`) with its constants as attributes and buffers:
    per-atom energies [N]."""

    def __init__(self, zbl: ZBL, dtype: torch.dtype):
        super().__init__()
        self.reach, self.unit = zbl.reach, zbl.unit
        self.coulomb = coulomb_constant(zbl.unit)
        self.cutoff_a, self.inner_a, self.outer_a = float(zbl.cutoff_a), float(zbl.inner_a), float(zbl.outer_a)
        self.envelope_p = int(zbl.envelope_p)
        self.screening_length_a, self.screening_exponent = ZBL_SCREENING_LENGTH_A, ZBL_SCREENING_EXPONENT
        self.coefficients = [float(c) for c in ZBL_PHI_COEFFICIENTS]
        self.exponents = [float(d) for d in ZBL_PHI_EXPONENTS]
        self.register_buffer("scale", zbl.scale.detach().to(dtype).clone())
        self.register_buffer("covalent_radii", torch.tensor(zbl.constants.arrays["covalent_radii"], dtype=dtype))

    def forward(self, z: Tensor, source: Tensor, target: Tensor, dist: Tensor) -> Tensor:
        pair = _zbl_switched(
            z[target],
            z[source],
            dist,
            self.reach,
            self.coulomb,
            self.cutoff_a,
            self.inner_a,
            self.outer_a,
            self.envelope_p,
            self.covalent_radii,
            self.screening_length_a,
            self.screening_exponent,
            self.coefficients,
            self.exponents,
        )
        return self.scale * scatter_sum(0.5 * pair, target, z.numel())


def _triplet_sum(s: Tensor, x: Tensor, idx_kj: Tensor, idx_ji: Tensor, num_edges: int) -> Tensor:
    """A[ji, b, :] = sum_k s[t, b] x[kj, :]: [E, B, H], by gather + index_add (the formula that
    `triplet_aggregate` evaluates as sparse products)."""
    per_triplet = s.unsqueeze(-1) * x[idx_kj].unsqueeze(1)  # [T, B, H]
    out = x.new_zeros([num_edges, per_triplet.size(1), per_triplet.size(2)])
    return out.index_add_(0, idx_ji, per_triplet)


class _ScriptBlock(nn.Module):
    """An interaction block (either variant) with `_triplet_sum` for the triplet sum (its own
    `edge_inputs` and `update` are scripted), and its output block."""

    def __init__(self, block: nn.Module, output: OutputBlock):
        super().__init__()
        self.block, self.output = block, output

    def forward(self, x: Tensor, rbf: Tensor, sbf: Tensor, idx_kj: Tensor, idx_ji: Tensor) -> Tensor:
        x_ji, x_kj, s = self.block.edge_inputs(x, rbf, sbf)
        return self.block.update(x, x_ji, _triplet_sum(s, x_kj, idx_kj, idx_ji, x.size(0)))


class ExportedPotential(nn.Module):
    """What `export_model` scripts: forward(z int64 or int32 [N], pos [N, 3] Angstrom, batch int64 [N]
    sorted) -> (energy [B], forces [N, 3] = -dE/dpos), in `energy_unit` and energy_unit/Angstrom,
    without the training offset (the metadata's "offset" says how to add it back). `energy(z, pos, batch)` gives
    the energies alone. The same checks as
    `DimezblNet` (shapes, Z = 1..94, finite positions, sorted batch, coincident atoms) and, when
    `elements` is not empty, only the trained elements."""

    def __init__(self, model: DimezblNet, energy_unit: str, offset, elements, dtype: torch.dtype):
        super().__init__()
        model = copy.deepcopy(model).to(dtype=dtype, device="cpu").eval()
        self.cutoff, self.dimenet_angle = float(model.cutoff), model.variant == "dimenet"
        self.energy_unit = energy_unit
        self.max_atomic_number, self.min_pair_distance_a = MAX_ATOMIC_NUMBER, MIN_PAIR_DISTANCE_A
        self.offset_per_molecule, self.offset_per_atom = float(offset[0]), float(offset[1])
        per_element = offset[2] if len(offset) > 2 else [0.0] * (MAX_ATOMIC_NUMBER + 1)
        self.register_buffer("offset_per_element", torch.tensor(per_element, dtype=torch.float64))
        self.register_buffer("elements", torch.tensor([int(e) for e in (elements or [])], dtype=torch.long))
        self.rbf, self.emb, self.output0 = model.rbf, model.emb, model.output_blocks[0]
        self.sbf = _ScriptSphericalBasis(model.sbf, dtype)
        self.blocks = nn.ModuleList(
            [_ScriptBlock(block, output) for block, output in zip(model.interaction_blocks, model.output_blocks[1:])]
        )
        self.has_zbl = model.zbl is not None
        self.zbl_interpolate = model.zbl is not None and model.zbl.combine_mode == "interpolate"
        self.zbl_switch_inner_a = model.zbl.switch_inner_a if model.zbl is not None else 0.0
        self.zbl_switch_outer_a = model.zbl.switch_outer_a if model.zbl is not None else 0.0
        self.zbl_softmin_length_a = ZBL_SOFTMIN_LENGTH_A
        self.zbl = _ScriptZBL(model.zbl, dtype) if model.zbl is not None else _ScriptZBL(ZBL(energy_unit), dtype)

    def check(self, z: Tensor, pos: Tensor, batch: Tensor) -> int:
        """Raise on bad input (as DimezblNet does); returns the number of molecules."""
        if z.dim() != 1 or z.numel() == 0 or (z.dtype != torch.long and z.dtype != torch.int32):
            raise ValueError("z must be a non-empty int64 (or int32) tensor [num_atoms] of atomic numbers")
        if pos.dim() != 2 or pos.size(0) != z.size(0) or pos.size(1) != 3 or not pos.is_floating_point():
            raise ValueError("pos must be a floating point tensor [num_atoms, 3] (Angstrom) matching z")
        if batch.shape != z.shape or (batch.dtype != torch.long and batch.dtype != torch.int32):
            raise ValueError("batch must be an int64 (or int32) tensor [num_atoms] (molecule index of each atom)")
        if bool(((z < 1) | (z > self.max_atomic_number)).any()):
            raise ValueError("atomic numbers must be in 1..94")
        if self.elements.numel() > 0:
            if not bool(torch.isin(z, self.elements.to(z.device)).all()):
                raise ValueError("an element was not in the training data of this model (see its elements)")
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("pos holds NaN or inf")
        if int(batch[0]) < 0 or bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch must be non-negative and sorted (atoms of each molecule contiguous)")
        num_molecules = int(batch[-1]) + 1
        if bool((torch.bincount(batch, minlength=num_molecules) == 0).any()):
            raise ValueError("a molecule of the batch has no atoms")
        return num_molecules

    def _energy(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
        num_atoms = z.numel()
        with torch.no_grad():
            edge_index = radius_graph(pos.detach(), batch, self.cutoff)  # the model's own functions,
            i, j, _, _, idx_k, idx_kj, idx_ji = triplets(edge_index, num_atoms)  # TorchScript-compatible
        vec = pos[i] - pos[j]  # R_i - R_j, [E, 3]
        dist = torch.linalg.vector_norm(vec, dim=-1)
        if bool((dist < self.min_pair_distance_a).any()):
            raise ValueError("coincident atoms: a distance is below 0.01 Angstrom")
        if self.dimenet_angle:  # between R_j - R_i and R_k - R_i
            vec_ki = pos[idx_k] - pos[i[idx_ji]]
            cos_angle = -(vec[idx_ji] * vec_ki).sum(-1) / (dist[idx_ji] * torch.linalg.vector_norm(vec_ki, dim=-1))
        else:  # DimeNet++: between R_i - R_j and R_j - R_k
            cos_angle = (vec[idx_ji] * vec[idx_kj]).sum(-1) / (dist[idx_ji] * dist[idx_kj])
        rbf = self.rbf(dist)
        sbf = self.sbf(dist, cos_angle, idx_kj)
        x = self.emb(z, rbf, i, j)
        out = self.output0(x, rbf, i, num_atoms)
        for block in self.blocks:
            x = block(x, rbf, sbf, idx_kj, idx_ji)
            out = out + block.output(x, rbf, i, num_atoms)
        out = out.squeeze(-1)
        if self.has_zbl:
            repulsion = self.zbl(z, j, i, dist)
            if self.zbl_interpolate:
                w = zbl_interpolation_weights(
                    dist, i, num_atoms, self.zbl_switch_inner_a, self.zbl_switch_outer_a, self.zbl_softmin_length_a
                )
                out = (1 - w) * out + w * repulsion
            else:
                out = out + repulsion
        return scatter_sum(out, batch, num_molecules)

    @torch.jit.export
    def energy(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """Energies [B] (energy_unit, without the offset)."""
        num_molecules = self.check(z, pos, batch)
        return self._energy(z.long(), pos.to(self.rbf.freq.dtype), batch.long(), num_molecules)

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tuple[Tensor, Tensor]:
        num_molecules = self.check(z, pos, batch)
        if not torch.is_grad_enabled():  # TorchScript has no enable_grad()
            raise RuntimeError(
                "forces are -dE/dpos: call the exported model with gradients enabled (not "
                "under torch.no_grad() or torch.inference_mode()); .energy() works under both"
            )
        position = pos.detach().to(self.rbf.freq.dtype).requires_grad_(True)
        energy = self._energy(z.long(), position, batch.long(), num_molecules)
        forces = torch.zeros_like(position)
        if energy.requires_grad:  # a lone atom has no edges and so no forces
            gradient = torch.autograd.grad([energy.sum()], [position], allow_unused=True)[0]
            if gradient is not None:
                forces = -gradient
        return energy.detach(), forces.detach()


def export_model(source, path, dtype=None, restrict_elements: bool = True) -> dict:
    """Write a trained model as one self-contained TorchScript file, loadable with plain
    `torch.jit.load(path)` (no dimezbl_core needed): forward(z int64 [N], pos [N, 3] in Angstrom,
    batch int64 [N]) -> (energy [B], forces [N, 3]) in the model's unit (kcal/mol and kcal/mol/A
    for MD17, eV for QM9 energies), see `ExportedPotential`.

    source: a checkpoint path (its EMA weights, training offset and elements) or a DimezblNet
    (offset 0, all elements). dtype: float32 or float64; None keeps the checkpoint's training
    dtype (a model object's parameter dtype). restrict_elements: the file refuses elements the
    checkpoint was not trained on (as DimezblCalculator). The file's extra file metadata.json (read it with
    torch.jit.load(path, _extra_files={"metadata.json": ""})) and the module attributes
    energy_unit, offset_per_molecule, offset_per_atom, elements record the unit and the
    offset. Returns the metadata.
    """
    path = Path(path)
    if isinstance(source, DimezblNet):
        model, offset, elements, origin = source, (0.0, 0.0), None, {"source": "DimezblNet object"}
        unit = model.zbl.unit if model.zbl is not None else model.hparams["zbl_unit"]
        dtype = dtype or next(model.parameters()).dtype
    elif isinstance(source, (str, os.PathLike)):
        checkpoint, config, model = load_energy_model(source, "export")
        offset, elements = checkpoint.get("offset", (0.0, 0.0)), checkpoint.get("elements")
        unit = reporting_unit(config)["energy"] if config.dataset != "qm9" else "eV"
        dtype = dtype or getattr(torch, config.dtype)
        origin = {
            "source": str(source),
            "dataset": config.dataset,
            "target": config.target,
            "model": config.model_name,
            "profile": config.profile,
            "seed": config.seed,
        }
    else:
        raise TypeError(f"export_model needs a checkpoint path or a DimezblNet, got {type(source).__name__}")
    if model.out_channels != 1:
        raise ValueError("export needs an energy model (out_channels = 1): forces are -dE/dpos")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported: use torch.float32 or torch.float64")
    elements = [int(e) for e in elements] if (restrict_elements and elements is not None) else []
    per_element = {int(z): float(e) for z, e in enumerate(offset[2]) if e != 0.0} if len(offset) > 2 else {}
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; torch.export cannot hold the
        warnings.simplefilter("ignore", DeprecationWarning)  # data-dependent graph with autograd.grad inside
        scripted = torch.jit.script(ExportedPotential(model, unit, offset, elements, dtype))
    metadata = {
        "format": EXPORT_FORMAT,
        "energy_unit": unit,
        "forces_unit": f"{unit}/Angstrom",
        "position_unit": "Angstrom",
        "dtype": str(dtype).replace("torch.", ""),
        "offset": {
            "per_molecule": float(offset[0]),
            "per_atom": float(offset[1]),
            "per_element": per_element,
            "unit": unit,
            "meaning": "absolute energy = energy + per_molecule + per_atom * "
            "n_atoms + sum over atoms of per_element[Z]",
        },
        "elements": elements,
        "hparams": model.hparams,
        **origin,
        "git": git_state(),
        "torch": torch.__version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "usage": "energy, forces = torch.jit.load(path)(z_int64[N], pos[N, 3]_angstrom, batch_int64[N])",
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(
            scripted, buffer, _extra_files={EXPORT_METADATA_FILE: json.dumps(metadata, indent=2, default=str)}
        )
    atomic_write_bytes(path, buffer.getvalue())
    return metadata


def load_exported(path) -> tuple:
    """(TorchScript module, metadata dict) of a file written by `export_model`."""
    extra = {EXPORT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXPORT_METADATA_FILE])
