"""`make reproduce`: the numbered notebooks run headless by papermill, executed copies written to results/."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import PROFILES, parse_set_arguments
from .files import REPOSITORY_ROOT, results_path

NOTEBOOK_DIR = REPOSITORY_ROOT / "notebooks"
NOTEBOOKS = (
    "01_basis_visualization.ipynb",
    "02_zbl_curves.ipynb",
    "03_qm9_training.ipynb",
    "04_md17_training.ipynb",
    "05_tables.ipynb",
)
KERNEL_NAME = "python3"  # jupyter_client runs the kernel "python3" with the interpreter running papermill


class NotebookFailed(RuntimeError):
    """A notebook of `reproduce` raised: names the notebook, the cell and the error."""

    def __init__(self, notebook: str, cell: Optional[int], message: str, executed: Path):
        self.notebook, self.cell, self.executed = notebook, cell, executed
        where = f"cell {cell}" if cell is not None else "before any cell ran (kernel start?)"
        super().__init__(f"{notebook} failed in {where}: {message}; executed copy with the traceback: {executed}")


def _failed_cell(executed: Path, cell_index: int) -> tuple:
    """(1-based number of the failing cell in the source notebook, its first line): the executed
    copy holds papermill's injected-parameters cell, which the source notebook does not."""
    import nbformat

    cells = nbformat.read(executed, as_version=4).cells
    injected = [k for k, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
    number = cell_index + 1 - sum(1 for k in injected if k < cell_index)
    first_line = cells[cell_index].source.strip().splitlines()[0] if cells[cell_index].source.strip() else ""
    return number, first_line


def reproduce(
    profile: str = "smoke",
    results_dir=None,
    data_dir=None,
    device: str = "auto",
    parameters: Optional[dict] = None,
    notebooks: Sequence[str] = NOTEBOOKS,
    kernel_name: str = KERNEL_NAME,
    progress: bool = True,
) -> list:
    """Run the notebooks in order with papermill, executed copies to <results_dir>/executed/.

    Every notebook gets profile, data_dir, device, results_dir and progress_bars=False, plus
    `parameters` (e.g. targets, molecules, seeds, train_overrides, md17_configs), each only where
    its parameters cell declares it; a parameter no notebook declares is an error. Notebooks run with cwd
    notebooks/ (as in JupyterLab). Raises NotebookFailed naming the notebook and cell.
    Returns the executed notebooks' paths.
    """
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILES)}")
    values = {
        "profile": profile,
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "device": device,
        "results_dir": str(results_path(results_dir)),
        "progress_bars": False,  # nobody watches them here; they would fill the executed copies
        "use_shipped": False,  # notebook 02 draws the models this profile trains, not the shipped potentials
        **(parameters or {}),
    }
    declared = {name: set(papermill.inspect_notebook(str(NOTEBOOK_DIR / name))) for name in notebooks}
    unused = sorted(set(parameters or {}) - set().union(*declared.values()))
    if unused:
        raise ValueError(f"parameters {unused} are declared by none of the notebooks {list(notebooks)}")
    executed_dir = results_path(results_dir, "executed")
    executed_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in notebooks:
        executed = executed_dir / name
        start = time.perf_counter()
        if progress:
            print(f"reproduce: {name} ...", flush=True)
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / name),
                str(executed),
                parameters={k: v for k, v in values.items() if k in declared[name]},
                kernel_name=kernel_name,
                cwd=str(NOTEBOOK_DIR),
                progress_bar=False,
                log_output=False,
            )
        except papermill.PapermillExecutionError as error:
            number, first_line = _failed_cell(executed, error.cell_index)
            raise NotebookFailed(
                name, number, f"{error.ename}: {error.evalue} (cell starts {first_line[:80]!r})", executed
            ) from None
        except Exception as error:  # kernel died or did not start, notebook unreadable, ...
            raise NotebookFailed(name, None, f"{type(error).__name__}: {error}", executed) from error
        if progress:
            print(f"reproduce: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        done.append(executed)
    return done


def reproduce_main(argv: Optional[Sequence[str]] = None) -> int:
    """`dimezbl reproduce [--profile smoke] [--set NAME=JSON ...]`: exit status 0,
    or 1 with the failing notebook and cell named on stderr."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="dimezbl reproduce",
        description="Run notebooks 01-05 with papermill (Tables 1 and 2, figures).",
    )
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--results-dir", default=None, help="default <repository>/results")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default python3: this interpreter)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a notebook parameter, e.g. --set 'targets=[\"U0\"]' --set 'seeds=[0, 1]'",
    )
    parser.add_argument(
        "--notebooks",
        nargs="+",
        default=None,
        metavar="NN",
        help="run only these notebooks, by number or name (e.g. --notebooks 03 04 05); default all five in order",
    )
    args = parser.parse_args(argv)
    parameters = parse_set_arguments(args.set)
    notebooks = NOTEBOOKS
    if args.notebooks:
        chosen = [
            [name for name in NOTEBOOKS if name == wanted or name.startswith(f"{wanted}_")] for wanted in args.notebooks
        ]
        unknown = [wanted for wanted, names in zip(args.notebooks, chosen) if len(names) != 1]
        if unknown:
            parser.error(f"unknown notebooks {unknown}: use numbers or names of {list(NOTEBOOKS)}")
        notebooks = [name for names in chosen for name in names]
    start = time.perf_counter()
    try:
        reproduce(
            args.profile, args.results_dir, args.data_dir, args.device, parameters, notebooks, kernel_name=args.kernel
        )
    except (NotebookFailed, ValueError) as error:
        print(f"reproduce: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    print(
        f"reproduce: all notebooks ran in {time.perf_counter() - start:.0f} s; tables in "
        f"{results_path(args.results_dir, 'tables')}, figures in {results_path(args.results_dir, 'figures')}"
    )
    return 0
