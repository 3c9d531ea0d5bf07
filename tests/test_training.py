"""Training engine: schedule and EMA against their formulas, smoke learning, kill-and-resume,
NaN handling, checkpoint safety, and 2-process data-parallel training (gloo on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import dimezbl as dz
import dimezbl_core as dc

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(
    hidden_channels=16,
    num_blocks=1,
    num_bilinear=2,
    num_spherical=3,
    num_radial=3,
    num_output_layers=1,
    num_after_skip=1,
)


def tiny_config(tmp_path, **overrides):
    values = dict(
        dataset="qm9",
        target="U0",
        zbl=True,
        profile="test",
        model=TINY_MODEL,
        n_train=64,
        n_valid=16,
        n_test=16,
        batch_size=8,
        warmup_steps=5,
        max_steps=12,
        eval_every=4,
        checkpoint_every=1,
        ema_decay=0.9,
        target_offset="auto",
        out_dir=str(tmp_path / "runs"),
        seed=3,
    )
    values.update(overrides)
    return dz.TrainConfig.from_dict(values)


def test_learning_rate_schedule_matches_dimenet_formula():
    config = dz.TrainConfig()
    for step in (0, 1, 1499, 2999, 3000, 10_000, 2_999_999):
        expected = 1e-3 * min(1.0, (step + 1) / 3000) * 0.01 ** (step / 4e6)
        assert dz.learning_rate_at(step, config) == pytest.approx(expected, rel=1e-12)
    assert dz.learning_rate_at(0, config) == pytest.approx(1e-3 / 3000)
    assert dz.learning_rate_at(4_000_000, config) == pytest.approx(1e-5, rel=1e-9)


def test_ema_matches_formula():
    model = torch.nn.Linear(3, 2)
    ema = dz.ExponentialMovingAverage(model, decay=0.9)
    w0 = model.weight.detach().clone()
    history = []
    for k in range(5):
        with torch.no_grad():
            model.weight.add_(float(k + 1))
        history.append(model.weight.detach().clone())
        ema.update(model)
    expected = w0
    for w in history:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-6)


def test_profiles_are_named_configs():
    paper = dz.profile_config("paper", "qm9", "U0")
    assert (paper.max_steps, paper.batch_size, paper.ema_decay) == (3_000_000, 32, 0.999)
    assert (paper.warmup_steps, paper.decay_steps, paper.eval_every) == (3000, 4_000_000, 10_000)
    assert paper.model == {} and paper.n_train is None
    smoke = dz.profile_config("smoke", "md17", "ethanol", zbl=False)
    assert smoke.model["num_blocks"] < 6 and not smoke.zbl
    with pytest.raises(ValueError, match="unknown profile"):
        dz.profile_config("huge", "qm9", "U0")
    with pytest.raises(ValueError, match="unknown config fields"):
        dz.TrainConfig.from_dict({"learning_rat": 1})


def test_integer_overrides_of_float_fields_are_stored_as_floats():
    """`--set max_wall_s=7200` parses a JSON integer; config.json records 7200.0 like the profile's
    3600.0, while integer fields and booleans keep their types."""
    config = dz.profile_config("cpu", "md17", "ethanol", **dz.parse_set_arguments(["max_wall_s=7200"]))
    assert config.max_wall_s == 7200.0 and type(config.max_wall_s) is float
    config = dz.TrainConfig.from_dict({"learning_rate": 1, "max_steps": 10, "zbl": True})
    assert type(config.learning_rate) is float and type(config.max_steps) is int and config.zbl is True
    assert type(json.loads(json.dumps(config.to_dict()))["learning_rate"]) is float


def test_model_dot_overrides_change_one_field_of_the_profiles_model():
    """`--set model.zbl_reach=covalent` keeps the profile's width and depth; `--set model=...`
    replaces the whole dict."""
    one_field = dz.profile_config("cpu", "md17", "ethanol", **dz.parse_set_arguments(["model.zbl_reach=covalent"]))
    assert one_field.model == {**dz.CPU_MODEL, "zbl_reach": "covalent"}
    replaced = dz.profile_config("cpu", "md17", "ethanol", model={"zbl_reach": "covalent"})
    assert replaced.model == {"zbl_reach": "covalent"}
    both = dz.profile_config("cpu", "md17", "ethanol", **{"model": {"num_blocks": 2}, "model.zbl_reach": "lammps"})
    assert both.model == {"num_blocks": 2, "zbl_reach": "lammps"}
    assert dz.profile_config("cpu", "md17", "ethanol").model == dz.CPU_MODEL  # the profile is not modified
    with pytest.raises(ValueError, match=r"unknown model fields \['zbl_rech'\].*zbl_reach"):
        dz.profile_config("cpu", "md17", "ethanol", **dz.parse_set_arguments(["model.zbl_rech=covalent"]))


def test_smoke_qm9_run_learns(tmp_path):
    """The smoke profile's QM9 run (shortened) beats predicting the training mean by far."""
    config = dz.profile_config("smoke", "qm9", "U0", zbl=True, out_dir=str(tmp_path))
    metrics = dz.train(config, resume=False, progress=False)
    assert metrics["test"]["energy_mae"] < 0.5 * metrics["test_mean_predictor"]["energy_mae"]
    run_dir = config.run_dir
    for name in ("metrics.json", "provenance.json", "learning_curve.csv", "config.json"):
        assert (run_dir / name).exists(), name
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["num_parameters"] > 0
    assert provenance["software"]["torch"] == torch.__version__
    assert provenance["data"]["content_sha256"] == dz.load_qm9().content_sha256()


def _run_training_process(config, run_dir):
    code = (
        "import json, sys, dimezbl as dz; "
        f"dz.train(dz.TrainConfig.from_dict(json.loads({json.dumps(json.dumps(config.to_dict()))})), "
        f"progress=False, run_dir={str(run_dir)!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kill_and_resume_is_bit_identical(tmp_path, keep_torch_threads):
    config = tiny_config(tmp_path, max_steps=24)
    torch.set_num_threads(1)
    reference = dz.train(config, resume=False, progress=False, run_dir=tmp_path / "reference")
    reference_state = dz.load_checkpoint(tmp_path / "reference" / "checkpoint_last.pt")

    run_dir = tmp_path / "interrupted"
    process = _run_training_process(config, run_dir)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it somewhere in the middle of training
        last = run_dir / "checkpoint_last.pt"
        if last.exists() and dz.load_checkpoint(last)["state"]["step"] >= 6:
            break
        time.sleep(0.05)
    # while it trains, the run is locked: a second process does not interleave its checkpoints
    with pytest.raises(RuntimeError, match=f"being trained by another process \\(pid {process.pid}\\)"):
        dz.train(config, resume=True, progress=False, run_dir=run_dir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = dz.load_checkpoint(run_dir / "checkpoint_last.pt")["state"]["step"]
    assert 6 <= killed_at < 24, "the process should have been killed mid-run"

    resumed = dz.train(config, resume=True, progress=False, run_dir=run_dir)
    assert resumed["test"] == reference["test"] and resumed["valid"] == reference["valid"]
    state = dz.load_checkpoint(run_dir / "checkpoint_last.pt")
    for key, value in reference_state["model"].items():
        assert torch.equal(value, state["model"][key]), key

    def curve_without_wall_time(directory):  # the last column is wall time, which differs
        return [row.rsplit(",", 1)[0] for row in (directory / "learning_curve.csv").read_text().splitlines()]

    assert curve_without_wall_time(run_dir) == curve_without_wall_time(tmp_path / "reference")
    # provenance names both processes that trained the resumed run, with the step each started at
    segments = json.loads((run_dir / "provenance.json").read_text())["segments"]
    assert [segment["from_step"] for segment in segments] == [0, killed_at]
    assert all(
        segment["dimezbl_core_sha256"] == dz.git_state()["dimezbl_core_sha256"]
        and segment["torch_threads"] == 1
        and segment["hardware"]["device"] == "cpu"
        and segment["swish"] == "eager"
        for segment in segments
    )
    reference_segments = json.loads((tmp_path / "reference" / "provenance.json").read_text())["segments"]
    assert [segment["from_step"] for segment in reference_segments] == [0]


def test_nan_loss_stops_cleanly_and_keeps_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, checkpoint_every=2)
    original = dz.RunData.train_batch

    def poisoned(self, step, rank=0, world_size=1):
        batch = original(self, step, rank, world_size)
        if step == 5:
            batch.target[0] = float("nan")
        return batch

    monkeypatch.setattr(dz.RunData, "train_batch", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(dz.TrainingDiverged, match="step 5"):
        dz.train(config, resume=False, progress=False, run_dir=run_dir)
    checkpoint = dz.load_checkpoint(run_dir / "checkpoint_last.pt")
    assert checkpoint["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        dz.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dz.load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "weights.pt"  # a torch file, but not a run's checkpoint
    torch.save({"weight": torch.ones(2)}, other)
    with pytest.raises(ValueError, match=r"not a DimezblNet checkpoint .*'config' and 'model'.*\['weight'\]"):
        dz.load_checkpoint(other)
    torch.save(torch.ones(2), other)
    with pytest.raises(ValueError, match="it holds Tensor"):
        dz.load_checkpoint(other)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    dz.atomic_torch_save({"a": torch.ones(2)}, path)

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        dz.atomic_torch_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))  # the old one survives


def test_two_process_gloo_training_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 8 = 2 x 4: same validation MAE as one
    process with batch 8, up to float32 summation order (rtol 1e-4 after 12 steps)."""
    config = tiny_config(tmp_path, max_steps=12)
    single = dz.train(config, resume=False, progress=False, run_dir=tmp_path / "single")
    arguments = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dimezbl",
        "train",
        "--dataset",
        "qm9",
        "--target",
        "U0",
        "--profile",
        "smoke",
        "--seed",
        "3",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "ddp"),
    ]
    for key, value in config.to_dict().items():
        if key not in ("dataset", "target", "zbl", "seed", "out_dir", "profile"):
            arguments += ["--set", f"{key}={json.dumps(value)}"]
    result = subprocess.run(
        arguments, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_config = dz.TrainConfig.from_dict({**config.to_dict(), "profile": "smoke", "out_dir": str(tmp_path / "ddp")})
    metrics = json.loads((ddp_config.run_dir / "metrics.json").read_text())
    assert metrics["steps"] == single["steps"] == 12
    assert json.loads((ddp_config.run_dir / "provenance.json").read_text())["world_size"] == 2
    assert metrics["valid"]["energy_mae"] == pytest.approx(single["valid"]["energy_mae"], rel=1e-4)


def test_smoke_md17_run_learns(ethanol_smoke_run):
    """Smoke MD17 run on freshly generated GFN2-xTB ethanol (300 configurations): energy+force
    loss and force MAE end far below those of the mean predictor (plain DimeNet; the literal
    ZBL term of DimezblNet adds ~720 kcal/mol and forces up to ~440 kcal/mol/A to ethanol that
    the network must first cancel, so it learns more slowly at this budget)."""
    config, metrics = ethanol_smoke_run
    test, baseline = metrics["test"], metrics["test_mean_predictor"]
    assert test["forces_mae"] < 0.5 * baseline["forces_mae"]
    loss = test["energy_mae"] + config.force_weight * test["forces_mae"]
    assert loss < 0.5 * (baseline["energy_mae"] + config.force_weight * baseline["forces_mae"])


def test_run_configs_store_data_paths_relative_to_the_repository(tmp_path):
    """Committed run configs must match in any checkout: paths inside the repository are stored relative."""
    inside = dz.REPOSITORY_ROOT / "data" / "md17" / "generated" / "smoke" / "ethanol.npz"
    assert dz.portable_path(inside) == "data/md17/generated/smoke/ethanol.npz"
    assert dz.repository_path("data/md17/generated/smoke/ethanol.npz") == inside
    outside = tmp_path / "ethanol.npz"
    assert dz.portable_path(outside) == str(outside.resolve())
    assert dz.repository_path(str(outside)) == outside
    assert dz.repository_path(None) is None


def test_provenance_records_the_code_as_imported():
    """A long job records the commit and the source it loaded, not the HEAD at the time it finishes."""
    import hashlib

    state = dz.git_state()
    assert set(state) >= {"commit", "dirty", "dimezbl_core_sha256"}
    source = (dz.REPOSITORY_ROOT / "dimezbl_core.py").read_bytes()
    assert state["dimezbl_core_sha256"] == hashlib.sha256(source).hexdigest()
    state["commit"] = "changed by the caller"
    assert dz.git_state()["commit"] != "changed by the caller"  # callers get a copy


def test_a_tree_without_git_records_a_declared_commit_as_declared(tmp_path, monkeypatch):
    """A copy of the tree without .git (a GPU node): commit unknown, unless DIMEZBL_GIT_COMMIT says
    which commit it was copied from, and then the record says where the commit came from."""
    monkeypatch.setattr(dz.checkpoints, "REPOSITORY_ROOT", tmp_path)  # no repository here
    monkeypatch.delenv("DIMEZBL_GIT_COMMIT", raising=False)
    assert dz.checkpoints._git_state_now() == {"commit": None, "dirty": None}
    monkeypatch.setenv("DIMEZBL_GIT_COMMIT", "0123abc")
    state = dz.checkpoints._git_state_now()
    assert state["commit"] == "0123abc" and state["dirty"] is None and "DIMEZBL_GIT_COMMIT" in state["commit_source"]
    monkeypatch.setattr(dz.checkpoints, "REPOSITORY_ROOT", Path(dc.__file__).resolve().parent)  # a real repository wins
    assert dz.checkpoints._git_state_now()["commit"] != "0123abc"


def test_run_models_command_line_trains_seed_by_seed_and_reuses(tmp_path, capsys, keep_torch_threads):
    """`run-models` (the training of notebooks 03/04 from the shell): both models of a seed before
    the next seed, every run written; a second call trains nothing."""
    arguments = [
        "run-models",
        "--profile",
        "smoke",
        "--dataset",
        "qm9",
        "--targets",
        "U0",
        "--seeds",
        "0",
        "1",
        "--results-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--set",
        f"model={json.dumps(TINY_MODEL)}",
        "--set",
        "max_steps=2",
        "--set",
        "eval_every=2",
        "--set",
        "n_train=16",
        "--set",
        "n_valid=4",
        "--set",
        "n_test=4",
        "--set",
        "batch_size=4",
    ]
    assert dz.main(arguments) == 0
    trained = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("trained ")]
    assert trained == [
        f"runs/smoke/qm9/U0/{model}_seed{seed}" for seed in (0, 1) for model in ("dimenet", "dimezblnet")
    ]
    for run in trained:
        assert (tmp_path / run / "metrics.json").exists() and (tmp_path / run / "provenance.json").exists()
    assert dz.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "trained " not in printed and printed.count("reusing ") == 4
    with pytest.raises(SystemExit):
        dz.main(["run-models", "--dataset", "qm9", "--targets", "U0", "--models", "schnet"])


def test_max_wall_s_is_a_safety_limit_raising_it_reuses_finished_runs_and_continues_stopped_ones(
    tmp_path, capsys, keep_torch_threads
):
    """A run that stopped by max_steps is the same run under any max_wall_s: a raised limit reuses it. A run that
    stopped by max_wall_s continues from its last checkpoint under the raised limit (and its metrics are redone)."""
    stored = dz.TrainConfig(dataset="qm9", target="U0", max_wall_s=3600.0).to_dict()
    raised = dz.TrainConfig(dataset="qm9", target="U0", max_wall_s=7200.0)
    assert (
        dz.training._config_mismatch(stored, raised, "max_steps") == []
        and dz.training._config_mismatch(stored, raised) == []
    )
    assert dz.training._config_mismatch(stored, raised, "max_wall_s") == ["max_wall_s"]
    assert dz.training._config_mismatch(
        stored, dz.TrainConfig(dataset="qm9", target="U0", max_wall_s=3600.0, seed=1), "max_steps"
    ) == ["seed"]
    arguments = [
        "run-models",
        "--profile",
        "smoke",
        "--dataset",
        "qm9",
        "--targets",
        "U0",
        "--seeds",
        "0",
        "--results-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--set",
        f"model={json.dumps(TINY_MODEL)}",
        "--set",
        "max_steps=2",
        "--set",
        "eval_every=2",
        "--set",
        "n_train=16",
        "--set",
        "n_valid=4",
        "--set",
        "n_test=4",
        "--set",
        "batch_size=4",
    ]
    assert dz.main(arguments + ["--set", "max_wall_s=3600"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs/smoke/qm9/U0/dimenet_seed0"
    first = json.loads((run_dir / "metrics.json").read_text())
    # as if this run had hit the limit (the other stopped by max_steps)
    (run_dir / "metrics.json").write_text(json.dumps(dict(first, stop_reason="max_wall_s")))
    assert dz.main(arguments + ["--set", "max_wall_s=7200"]) == 0
    printed = capsys.readouterr().out
    assert "continuing runs/smoke/qm9/U0/dimenet_seed0 (stopped by max_wall_s) with max_wall_s=7200" in printed
    assert "reusing runs/smoke/qm9/U0/dimezblnet_seed0" in printed
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("trained ")] == [
        "runs/smoke/qm9/U0/dimenet_seed0"
    ]
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["stop_reason"] == "max_steps" and again["test"] == first["test"]  # resumed at its last step
    assert json.loads((run_dir / "config.json").read_text())["max_wall_s"] == 7200.0
    # a changed budget is still a different run
    with pytest.raises(ValueError, match="differs in max_steps"):
        dz.main(arguments + ["--set", "max_steps=3"])
    # and train() does not resume a checkpoint under a changed budget (a changed limit it does, above)
    stored = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="written with another config"):
        dz.train(dz.TrainConfig(**dict(stored, max_steps=3)), resume=True, progress=False, run_dir=run_dir)


def test_run_hardware_names_every_device_a_run_trained_on():
    """A run started on a GPU and resumed on a CPU names both in the tables; one device, once."""
    gpu = {"device": "cuda", "gpu": "NVIDIA H200", "cpu_count": 16, "torch_threads": 1}
    cpu = {"device": "cpu", "cpu": "x86_64", "cpu_count": 2, "torch_threads": 2}
    mixed = {"hardware": cpu, "segments": [{"hardware": gpu}, {"hardware": cpu}]}
    assert dz.runner._run_hardware_text(mixed) == (
        "cuda (NVIDIA H200), 16 CPU cores, 1 torch threads + cpu (x86_64), 2 CPU cores, 2 torch threads"
    )
    assert (
        dz.runner._run_hardware_text({"hardware": cpu, "segments": [{"hardware": cpu}] * 2})
        == "cpu (x86_64), 2 CPU cores, 2 torch threads"
    )
    # runs trained before segments recorded hardware: the finishing process's hardware alone
    assert (
        dz.runner._run_hardware_text({"hardware": cpu, "segments": [{"from_step": 0}]})
        == "cpu (x86_64), 2 CPU cores, 2 torch threads"
    )
    # where the CPU's model is recorded, the tables name it
    named = dict(cpu, cpu_model="AMD EPYC 7B12")
    assert dz.runner._hardware_text(named) == "cpu (AMD EPYC 7B12), 2 CPU cores, 2 torch threads"
    here = dz.hardware_description(torch.device("cpu"))
    assert isinstance(here["cpu_model"], str) and here["cpu_model"]


def test_run_git_names_every_commit_a_run_trained_at():
    """The tables' commit of a run: the commit of each process that trained it, in order."""
    gpu = {"commit": "a7a6a51", "dirty": None, "from_step": 0}
    cpu = {"commit": "3031137", "dirty": False, "from_step": 1000}
    assert dz.runner._run_git({"git": {"commit": "3031137", "dirty": False}, "segments": [gpu, cpu]}) == (
        "a7a6a51 + 3031137",
        None,
    )
    assert dz.runner._run_git(
        {
            "git": {"commit": "b", "dirty": False},
            "segments": [{"commit": "a", "dirty": True}, {"commit": "b", "dirty": False}],
        }
    ) == ("a + b", True)
    assert dz.runner._run_git(
        {"git": {"commit": "c", "dirty": False}, "segments": [{"commit": "c", "dirty": False}] * 2}
    ) == ("c", False)
    # runs written before segments existed: the finishing process's commit
    assert dz.runner._run_git({"git": {"commit": "d", "dirty": True}}) == ("d", True)
    # no git and no declared commit: unknown, never shown as declared
    unknown = dz.runner._run_git({"git": {"commit": None, "dirty": None}})
    assert unknown == ("?", None)
    runs = pd.DataFrame({"git_commit": [unknown[0], "e"], "git_dirty": [unknown[1], None]})
    assert dz.tables._commits_text(runs) == "?, e (declared, no git repository where it ran)"
