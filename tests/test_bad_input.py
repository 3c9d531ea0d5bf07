"""Bad input raises a clear error naming the problem; nothing returns NaN silently.

Each case checks the exception type (ValueError or TypeError) and a keyword in the message.
"""

import numpy as np
import pytest
import torch

import dimezbl as dz
import dimezbl_core as dc

WATER_Z = torch.tensor([8, 1, 1], dtype=torch.long)
WATER_POS = torch.tensor(
    [[0.0, 0.0, 0.119262], [0.0, 0.763239, -0.477047], [0.0, -0.763239, -0.477047]], dtype=torch.float64
)
ERRORS = (ValueError, TypeError)


@pytest.fixture(scope="module", params=[True, False], ids=["zbl", "nozbl"])
def model(request):
    torch.manual_seed(0)
    return (
        dc.DimezblNet(
            hidden_channels=8, num_blocks=1, num_bilinear=2, zbl=request.param, output_initializer="glorot_orthogonal"
        )
        .double()
        .eval()
    )


def call_both(model, z, pos, batch=None):
    """Both public entry points must refuse the input; yields the two exception infos."""
    infos = []
    with pytest.raises(ERRORS) as info:
        model(z, pos, batch)
    infos.append(info)
    with pytest.raises(ERRORS) as info:
        model.energy_and_forces(z, pos, batch)
    infos.append(info)
    return infos


def assert_message(infos, *keywords):
    for info in infos:
        msg = str(info.value).lower()
        assert any(k in msg for k in keywords), f"message {str(info.value)!r} names none of {keywords}"


def test_valid_input_works(model):
    e, f = model.energy_and_forces(WATER_Z, WATER_POS)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()


@pytest.mark.parametrize("bad", [0, 95, 118, -1, 1000])
def test_unknown_atomic_numbers(model, bad):
    z = WATER_Z.clone()
    z[1] = bad
    assert_message(call_both(model, z, WATER_POS), "atomic number")


def test_supported_atomic_numbers_1_to_94(model):
    # every element 1..94 is accepted (the embedding has 95 rows)
    for zz in (1, 2, 9, 17, 35, 53, 79, 92, 94):
        z = torch.tensor([zz, 1], dtype=torch.long)
        pos = torch.tensor([[0.0, 0, 0], [0, 0, 1.2]], dtype=torch.float64)
        assert torch.isfinite(model(z, pos)).all(), zz


def test_coincident_atoms(model):
    pos = WATER_POS.clone()
    pos[2] = pos[1]
    assert_message(call_both(model, WATER_Z, pos), "coincident")


def test_coincident_atoms_in_a_batch_are_detected_per_molecule(model):
    # the same coordinates in two different molecules of a batch are fine ...
    z = torch.cat([WATER_Z, WATER_Z])
    pos = torch.cat([WATER_POS, WATER_POS])
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.isfinite(model(z, pos, batch)).all()
    # ... but two atoms on top of each other inside the second molecule are not
    pos2 = pos.clone()
    pos2[5] = pos2[3]
    assert_message(call_both(model, z, pos2, batch), "coincident")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_coordinates(model, value):
    pos = WATER_POS.clone()
    pos[1, 2] = value
    assert_message(call_both(model, WATER_Z, pos), "finite", "nan", "inf")


def test_empty_molecule(model):
    z = torch.zeros(0, dtype=torch.long)
    pos = torch.zeros(0, 3, dtype=torch.float64)
    assert_message(call_both(model, z, pos), "empty", "no atoms", "zero atoms")


def test_pos_wrong_width(model):
    assert_message(call_both(model, WATER_Z, WATER_POS[:, :2]), "shape", "[n, 3]", "(n, 3)")


def test_pos_wrong_rank(model):
    assert_message(call_both(model, WATER_Z, WATER_POS.reshape(-1)), "shape", "[n, 3]", "(n, 3)")


def test_z_length_mismatch(model):
    z = torch.tensor([8, 1], dtype=torch.long)
    assert_message(call_both(model, z, WATER_POS), "shape", "length", "mismatch", "number of atoms")


def test_z_wrong_rank(model):
    assert_message(call_both(model, WATER_Z.reshape(3, 1), WATER_POS), "shape", "1-d", "1d", "dimension")


def test_batch_length_mismatch(model):
    batch = torch.tensor([0, 0], dtype=torch.long)
    assert_message(call_both(model, WATER_Z, WATER_POS, batch), "batch")


def test_float_atomic_numbers(model):
    assert_message(call_both(model, WATER_Z.double(), WATER_POS), "int", "dtype", "atomic number")


def test_compile_with_force_training_is_refused_with_the_reason():
    config = dz.profile_config("smoke", "md17", "ethanol", compile=True)
    with pytest.raises(ValueError, match="compile=True cannot train on forces"):
        dz.train(config, progress=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_steps", -5, "max_steps=-5 is invalid: it must be an integer >= 1"),
        ("max_steps", 0, "max_steps=0 is invalid"),
        ("max_steps", "abc", "max_steps='abc' is invalid"),
        ("max_steps", None, "max_steps=None is invalid"),
        ("ema_decay", 2, r"ema_decay=2.0 is invalid: it must be a number in \[0, 1\)"),
        ("learning_rate", "x", "learning_rate='x' is invalid: it must be a number > 0"),
        ("model.hidden_channels", "x", "model.hidden_channels='x' is invalid: it must be a non-negative integer"),
        ("dtype", "float16", r"dtype='float16' is invalid: use one of \['float32', 'float64'\]"),
        ("batch_size", 0, "batch_size=0 is invalid"),
        ("batch_size", -3, "batch_size=-3 is invalid"),
        ("device", "tpu", "device='tpu' is invalid: use auto, cpu, cuda or cuda:N"),
        ("target_offset", "median", "target_offset='median' is invalid"),
        ("zbl", "yes", "zbl='yes' is invalid: it must be true or false"),
    ],
)
def test_config_values_are_validated_at_construction(field, value, message):
    """Every field is checked when the config is made (before any data is loaded or file written)."""
    with pytest.raises(ValueError, match=message):
        dz.profile_config("smoke", "md17", "ethanol", **{field: value})


def test_device_on_the_command_line_and_in_set_cannot_disagree():
    import argparse

    parser = argparse.ArgumentParser()
    dz.add_train_arguments(parser)
    args = parser.parse_args(["--dataset", "md17", "--target", "ethanol", "--device", "cpu", "--set", 'device="cuda"'])
    with pytest.raises(ValueError, match="--device cpu and --set device=cuda disagree"):
        dz.config_from_arguments(args)
    args = parser.parse_args(["--dataset", "md17", "--target", "ethanol", "--set", 'device="cpu"'])
    assert dz.config_from_arguments(args).device == "cpu"  # --set alone is kept
    with pytest.raises(SystemExit):
        dz.run_models_main(
            ["--dataset", "md17", "--targets", "ethanol", "--device", "cpu", "--set", 'device="cuda"', "--no-training"]
        )


def test_a_bad_target_leaves_no_run_directory(tmp_path):
    with pytest.raises(ValueError, match="target='caffeine' is invalid: use one of the MD17 molecules"):
        dz.TrainConfig(dataset="md17", target="caffeine")
    with pytest.raises(ValueError, match="target='HOMO' is invalid: use one of the QM9 targets"):
        dz.train(dz.TrainConfig(dataset="qm9", target="HOMO", out_dir=str(tmp_path)), progress=False)
    assert not any(tmp_path.iterdir())


def _tiny_md17_config(data_dir, out_dir, **overrides):
    values = dict(dataset="md17", target="ethanol", zbl=False, profile="test", data_dir=str(data_dir),
                  out_dir=str(out_dir), model=dict(hidden_channels=16, num_blocks=1, num_bilinear=2, num_spherical=3,
                  num_radial=3), n_train=32, n_valid=16, n_test=16, batch_size=8, warmup_steps=1, max_steps=8,
                  eval_every=2, checkpoint_every=2, device="cpu")  # fmt: skip
    return dz.TrainConfig(**{**values, **overrides})


def _other_valid_data(path):
    """The same molecule with its energies shifted by 1 kcal/mol: valid data, but not the data of the run."""
    with np.load(path) as arrays:
        other = {key: arrays[key] for key in arrays.files}
    other["E"] = other["E"] + 1.0
    np.savez(path, **other)


def test_resume_and_evaluate_refuse_changed_data(ethanol_smoke_data, tmp_path, monkeypatch):
    """Kill a run, replace its data with other valid data, rerun: it refuses (naming both content sha256s and
    the way out) instead of training half on each; evaluate refuses the same; with the data restored it resumes."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(ethanol_smoke_data / "data", data_dir)
    config = _tiny_md17_config(data_dir, tmp_path / "runs")
    path = data_dir / "md17" / "generated" / "ethanol.npz"
    original = path.read_bytes()
    real_batch = dz.RunData.train_batch

    def killed_at_step_5(self, step, *args, **kwargs):
        if step == 5:
            raise KeyboardInterrupt  # as if the process were killed after the checkpoint of step 4
        return real_batch(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dz.RunData, "train_batch", killed_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            dz.train(config, progress=False)
    last = config.run_dir / "checkpoint_last.pt"
    assert dz.load_checkpoint(last)["state"]["step"] == 4
    _other_valid_data(path)
    with pytest.raises(
        ValueError,
        match=r"checkpoint_last\.pt was trained on data with content sha256 [0-9a-f]{16}"
        r"\.\.\., but the data found now .* have [0-9a-f]{16}\.\.\.: the data changed since\. Restore",
    ):
        dz.train(config, progress=False)
    assert dz.load_checkpoint(last)["state"]["step"] == 4  # nothing was overwritten
    with pytest.raises(ValueError, match="the data changed since"):
        dz.evaluate_checkpoint(config.run_dir / "checkpoint_best.pt", device="cpu")
    path.write_bytes(original)
    metrics = dz.train(config, progress=False)
    assert metrics["steps"] == 8
    assert dz.evaluate_checkpoint(config.run_dir / "checkpoint_best.pt", device="cpu")["subset"] == "test"


def test_a_missing_md17_set_names_the_per_profile_sets_that_exist(tmp_path):
    """After `make reproduce` the generated sets are at data/md17/generated/<profile>/: a command that looks
    for the profile-less default names them and the --set md17_path that uses one (not a 2,000-configuration
    generation of other data)."""
    smoke = tmp_path / "md17" / "generated" / "smoke"
    smoke.mkdir(parents=True)
    (smoke / "ethanol.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"the generated sets are per profile \(.*smoke/ethanol\.npz\): train "
                       r"on the one your runs used with --set md17_path=.*smoke/ethanol\.npz"):  # fmt: skip
        dz.load_md17("ethanol", data_dir=tmp_path)


def test_a_checkpoint_of_a_non_energy_target_is_refused_by_the_calculator_and_export(ethanol_smoke_run, tmp_path):
    config, _ = ethanol_smoke_run
    checkpoint = torch.load(config.run_dir / "checkpoint_best.pt", weights_only=True)
    checkpoint["config"] = {**checkpoint["config"], "dataset": "qm9", "target": "mu"}
    path = tmp_path / "mu.pt"
    dz.atomic_torch_save(checkpoint, path)
    with pytest.raises(ValueError, match=r"predicts mu, not an energy: the calculator needs a model of U0, U, H, G"):
        dz.DimezblCalculator.from_checkpoint(path)
    with pytest.raises(ValueError, match=r"predicts mu, not an energy: export needs"):
        dz.export_model(path, tmp_path / "mu_export.pt")


def test_numpy_inputs_give_the_same_result_as_tensors(model):
    energy, forces = model.energy_and_forces(WATER_Z, WATER_POS)
    energy_np, forces_np = model.energy_and_forces(WATER_Z.numpy(), WATER_POS.numpy(), np.zeros(3, dtype=np.int64))
    torch.testing.assert_close(energy_np, energy.detach(), rtol=0, atol=0)
    torch.testing.assert_close(forces_np, forces.detach(), rtol=0, atol=0)


def test_forces_are_computed_under_no_grad(model):
    energy, forces = model.energy_and_forces(WATER_Z, WATER_POS)
    with torch.no_grad():
        energy_ng, forces_ng = model.energy_and_forces(WATER_Z, WATER_POS)
    torch.testing.assert_close(forces_ng, forces.detach(), rtol=0, atol=0)
    torch.testing.assert_close(energy_ng, energy.detach(), rtol=0, atol=0)


def test_a_float32_model_returns_float32_for_float64_positions():
    torch.manual_seed(0)
    model = dc.DimezblNet(hidden_channels=8, num_blocks=1, num_bilinear=2).eval()
    energy, forces = model.energy_and_forces(WATER_Z, WATER_POS)
    assert energy.dtype == forces.dtype == torch.float32
    with pytest.raises(ERRORS, match="float"):
        model.energy_and_forces(WATER_Z, WATER_POS.clone().requires_grad_(True))


def test_the_exported_model_takes_int32_atomic_numbers_and_batch(tmp_path):
    torch.manual_seed(0)
    model = dc.DimezblNet(hidden_channels=8, num_blocks=1, num_bilinear=2, num_spherical=3, num_radial=3).double()
    dz.export_model(model, tmp_path / "model.pt")
    exported = torch.jit.load(str(tmp_path / "model.pt"))
    batch = torch.zeros(3, dtype=torch.long)
    energy, forces = exported(WATER_Z, WATER_POS, batch)
    energy_32, forces_32 = exported(WATER_Z.int(), WATER_POS, batch.int())
    torch.testing.assert_close(energy_32, energy, rtol=0, atol=0)
    torch.testing.assert_close(forces_32, forces, rtol=0, atol=0)
