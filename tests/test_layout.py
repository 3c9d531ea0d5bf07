"""The layout: the model core imports only the standard library, numpy and torch, runs no subprocess when imported,
and never imports the drivers; the drivers import one way; every subcommand is on the console script."""

import ast
import subprocess
import sys
from pathlib import Path

import dimezbl as dz

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_core_loads_no_driver_dependency_and_runs_no_subprocess():
    code = (
        "import subprocess, sys\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('importing dimezbl_core ran a subprocess')\n"
        "subprocess.Popen = refuse\n"
        "import dimezbl_core\n"
        "heavy = sorted(m for m in ('pandas', 'torch_geometric', 'ase', 'matplotlib', 'dimezbl') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_core_imports_only_the_standard_library_numpy_and_torch():
    tree = ast.parse((ROOT / "dimezbl_core.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch"}, roots


def test_driver_imports_go_one_way_without_cycles():
    import graphlib

    graph = {}
    for path in (ROOT / "dimezbl").glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            node.module.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        } | {
            alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
            for alias in node.names
        }
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle


def test_every_subcommand_is_on_the_console_script(capsys):
    import pytest

    with pytest.raises(SystemExit):
        dz.cli.main(["--help"])
    listed = capsys.readouterr().out
    for command in ("train", "evaluate", "export", "models", "shortrange", "generate-md17", "run-models", "reproduce",
                    "fair", "zbl-term", "readme-tables"):  # fmt: skip
        assert command in listed, command
