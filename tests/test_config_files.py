"""Config files: `dimezbl train --config FILE` (YAML or JSON, the fields of `--set`); a run's config.json is
valid input and retrains the same run."""

import json

import pytest

import dimezbl as dz


def _tiny_smoke_overrides(tmp_path):
    return dict(max_steps=6, n_train=48, n_valid=16, n_test=16, eval_every=3, device="cpu",
                out_dir=str(tmp_path / "first"))  # fmt: skip


def test_a_runs_config_json_retrains_the_same_run(tmp_path, capsys):
    config = dz.profile_config("smoke", "qm9", "U0", **_tiny_smoke_overrides(tmp_path))
    first = dz.train(config, resume=False, progress=False)
    stored = config.run_dir / "config.json"
    assert dz.config_from_file(stored, out_dir=config.out_dir) == config
    exit_code = dz.cli.main(["train", "--config", str(stored), "--out-dir", str(tmp_path / "again"), "--no-progress"])
    assert exit_code == 0
    again = json.loads((tmp_path / "again" / config.run_dir.relative_to(config.out_dir) / "metrics.json").read_text())
    assert again["test"] == first["test"] and again["valid"] == first["valid"] and again["steps"] == first["steps"]
    capsys.readouterr()


def test_a_yaml_file_holds_some_fields_and_the_profile_gives_the_rest(tmp_path):
    path = tmp_path / "ethanol.yaml"
    path.write_text("profile: fair\ndataset: md17\ntarget: ethanol\nmax_steps: 500\nmodel:\n  hidden_channels: 32\n")
    config = dz.config_from_file(path, seed=2)
    fair = dz.profile_config("fair", "md17", "ethanol", seed=2)
    assert config.max_steps == 500 and config.model == {"hidden_channels": 32} and config.seed == 2
    assert (config.n_train, config.warmup_steps, config.target_offset) == (
        fair.n_train,
        fair.warmup_steps,
        fair.target_offset,
    )


def test_command_line_options_override_the_file(tmp_path):
    path = tmp_path / "u0.json"
    path.write_text(json.dumps({"dataset": "qm9", "target": "U0", "seed": 1, "max_steps": 7}))
    parser = __import__("argparse").ArgumentParser()
    dz.add_train_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--seed", "4", "--set", "max_steps=9", "--no-zbl"])
    config = dz.config_from_arguments(args)
    assert (config.seed, config.max_steps, config.zbl, config.profile) == (4, 9, False, "smoke")


@pytest.mark.parametrize(
    "text, suffix, error, message",
    [
        ("dataset: qm9\ntarget: [U0\n", ".yaml", ValueError, r"bad\.yaml is not valid YAML"),
        ("{not json", ".json", ValueError, r"bad\.json is not valid JSON"),
        ("- a\n- b\n", ".yaml", ValueError, r"must hold a mapping of TrainConfig fields, got list"),
        ('{"dataset": "qm9"}', ".json", ValueError, r"lacks target: add them"),
        (
            '{"dataset": "qm9", "target": "U0", "max_step": 5}',
            ".json",
            ValueError,
            r"unknown config fields \['max_step'\]",
        ),
        ('{"dataset": "qm9", "target": "U0", "max_steps": -5}', ".json", ValueError, r"max_steps"),
    ],
)
def test_bad_config_files_are_clear_errors(tmp_path, text, suffix, error, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(error, match=message):
        dz.config_from_file(path)


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"config file .*nowhere\.yaml does not exist"):
        dz.config_from_file(tmp_path / "nowhere.yaml")
    with pytest.raises(SystemExit):
        dz.cli.main(["train", "--config", str(tmp_path / "nowhere.yaml")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dz.cli.main(["train", "--target", "U0"])
    assert "--dataset needed (or --config FILE holding them)" in capsys.readouterr().err


def test_a_config_json_from_another_checkout_names_its_out_dir(tmp_path, capsys):
    """Run configs store out_dir relative to the repository root; an absolute one of another machine is an
    error that says how to choose the directory, not a write to a path that is not there."""
    stored = {"profile": "smoke", "dataset": "qm9", "target": "U0", "out_dir": "/nowhere/checkout/results/runs"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"out_dir=/nowhere/checkout/results/runs, which is not on this machine"):
        dz.config_from_file(path)
    with pytest.raises(SystemExit):
        dz.cli.main(["train", "--config", str(path)])
    assert "give --out-dir DIR" in capsys.readouterr().err
    assert dz.config_from_file(path, out_dir=str(tmp_path / "runs")).run_dir.parent.parent.parent.parent == (
        tmp_path / "runs"
    )
    # an absolute directory that can be made here (its parent exists), and a relative one, are kept
    stored["out_dir"] = str(tmp_path / "new_runs")
    path.write_text(json.dumps(stored))
    assert dz.config_from_file(path).out_dir == str(tmp_path / "new_runs")
    stored["out_dir"] = "results/fair/runs"
    path.write_text(json.dumps(stored))
    assert dz.config_from_file(path).run_dir.is_relative_to(dz.REPOSITORY_ROOT / "results" / "fair" / "runs")
