"""Paths and files shared by the drivers: the repository root, the data and results folders, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

# --- Shared file helpers -------------------------------------------------------------------------


def data_dir_path(data_dir=None) -> Path:
    """The data directory: ``data_dir``, else $DIMEZBL_DATA_DIR, else ``<repository>/data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("DIMEZBL_DATA_DIR")
    if env:
        return Path(env)
    return REPOSITORY_ROOT / "data"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON (values JSON cannot hold written as text), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_hex(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


REPOSITORY_ROOT = Path(__file__).resolve().parent.parent  # the folder holding dimezbl_core.py and this package


def portable_path(path) -> str:
    """A path as stored in configs: relative to the repository root when it lies inside it (so
    that committed run configs match in any checkout), absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPOSITORY_ROOT))
    except ValueError:
        return str(path)


def repository_path(path) -> Optional[Path]:
    """Inverse of `portable_path`: a relative path is taken from the repository root."""
    if path is None:
        return None
    path = Path(path)
    return path if path.is_absolute() else REPOSITORY_ROOT / path


# --- the results directory -------------------------------------------------------------------------------


def results_path(results_dir=None, *parts) -> Path:
    """<results_dir>/<parts>: None is <repository>/results; a relative path is taken from the
    repository root (as TrainConfig.out_dir), so notebooks and `make` agree whatever their cwd."""
    root = Path(results_dir) if results_dir is not None else Path("results")
    if not root.is_absolute():
        root = REPOSITORY_ROOT / root
    return root.joinpath(*parts)


def _relative_to_results(path, results_dir=None) -> str:
    """A run directory as written in tables: relative to the results directory when inside it."""
    path, root = Path(path).resolve(), results_path(results_dir).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
