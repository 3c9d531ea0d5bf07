"""Checkpoints and provenance: atomic checkpoint writes, safe loading (weights_only), and what a run records
about the code (git commit, sha256 of dimezbl_core.py), the software and the hardware it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

import dimezbl_core

from .files import REPOSITORY_ROOT, sha256_hex

# --- checkpoints (atomic write, safe load) and provenance ---


def atomic_torch_save(obj, path: Path):
    """torch.save to a temporary file in the same directory, then rename: a checkpoint is
    either the old one or the new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


POTENTIAL_FORMAT = "dimezbl-potential/1"  # the metadata format of a shipped potential (dimezbl.shipped)


def load_shipped_weights(weights_path) -> tuple:
    """(state dict, metadata) of a shipped potential's weights file `seed<k>.pt`, whose metadata `seed<k>.json`
    lies beside it; the file's sha256 must match the one its metadata records."""
    weights_path = Path(weights_path)
    meta_path = weights_path.with_suffix(".json")
    metadata = json.loads(meta_path.read_text())
    if metadata.get("format") != POTENTIAL_FORMAT:
        raise ValueError(f"{meta_path} is not a {POTENTIAL_FORMAT} file (format {metadata.get('format')!r})")
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path} is missing: restore it from git (git checkout -- {weights_path})")
    digest = sha256_hex(weights_path.read_bytes())
    if digest != metadata["weights_sha256"]:
        raise ValueError(
            f"{weights_path} has sha256 {digest[:16]}..., its metadata {metadata['weights_sha256'][:16]}...: the "
            f"file is corrupt or was changed; restore it from git (git checkout -- {weights_path})"
        )
    return torch.load(weights_path, map_location="cpu", weights_only=True), metadata


def _is_shipped_weights(path: Path) -> bool:
    meta_path = path.with_suffix(".json")
    if path.suffix != ".pt" or not meta_path.exists():
        return False
    try:
        return json.loads(meta_path.read_text()).get("format") == POTENTIAL_FORMAT
    except (OSError, ValueError):
        return False


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True: tensors and plain containers only). A shipped potential's
    weights file (`dimezbl.shipped`) loads as the checkpoint it came from: config, EMA weights as "model",
    offset, elements and best step."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_shipped_weights(path):
        state, metadata = load_shipped_weights(path)
        return {
            "config": metadata["config"],
            "model": state,
            "offset": metadata["offset"],
            "elements": metadata["elements"],
            "step": metadata.get("best_step"),
        }
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated or not a checkpoint
        raise ValueError(
            f"checkpoint {path} is corrupt or not a DimezblNet checkpoint ({error}); "
            "delete it to start over, or resume from another one"
        ) from error
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is a torch file but not a DimezblNet checkpoint (it needs the keys 'config' and "
            f"'model'; it holds {found}): give the checkpoint_best.pt or checkpoint_last.pt of a run"
        )
    return checkpoint


def git_state() -> dict:
    """The code that runs: git commit and dirty flag of the repository as they were when this
    module was imported (a long job keeps the code it loaded even if commits follow), and the
    sha256 of dimezbl_core.py as loaded."""
    return dict(_GIT_AT_IMPORT)


def _git_state_now() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=REPOSITORY_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip

    try:
        # dirty: uncommitted changes to the code; results/ is excluded, since a run rewrites the
        # committed tables, figures and executed notebooks there itself
        changes = run("status", "--porcelain", "--", ".", ":(exclude)results")
        commit = run("rev-parse", "HEAD") or None
    except (OSError, subprocess.SubprocessError):
        commit = changes = None
    if commit is None and os.environ.get("DIMEZBL_GIT_COMMIT"):
        # a copy of the tree without .git (a GPU node, a tarball): the commit it was copied from,
        # as declared by whoever copied it; dimezbl_core_sha256 lets a reader check the claim
        return {
            "commit": os.environ["DIMEZBL_GIT_COMMIT"],
            "dirty": None,
            "commit_source": "DIMEZBL_GIT_COMMIT (no git repository here)",
        }
    return {"commit": commit, "dirty": None if commit is None else bool(changes)}


_GIT_AT_IMPORT = {**_git_state_now(), "dimezbl_core_sha256": sha256_hex(Path(dimezbl_core.__file__).read_bytes())}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, e.g. "AMD EPYC 7B12"), else platform.processor() or the
    machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_description(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    info["cpu_model"] = cpu_model()
    return info


def software_versions() -> dict:
    import torch_geometric

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_geometric": torch_geometric.__version__, "numpy": np.__version__}  # fmt: skip
