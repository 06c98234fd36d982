"""Post-hoc EMA (python -m fastdiff.phema): EDM2's math on the same inputs, a reconstruction
that matches an EMA tracked directly, GD-format output a real model loads, and bad input
refused before anything is written."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from fastdiff import config as C
from fastdiff import phema
from fastdiff.power_ema import std_to_exp
from fastdiff.sampling import fill_model_flags_from_run, load_model

# ------------------------------------------------------------------ EDM2 reference values
# Computed once with NVlabs/edm2 (training/phema.py, commit in /work/edm2 as of 2026-11),
# numpy float64:
#   solve_posthoc_coefficients([100,100,200,200,300,300], [0.05,0.10]*3, 300, [0.03,0.07,0.12])
#   power_function_correlation([100,300,250], [0.05,0.10,0.2], [300,100,250], [0.10,0.05,0.03])
# CI has no EDM2 checkout, so the values are hard-coded.
EDM2_IN_OFS = [100, 100, 200, 200, 300, 300]
EDM2_IN_STD = [0.05, 0.10] * 3
EDM2_OUT_STD = [0.03, 0.07, 0.12]
EDM2_COEFFICIENTS = np.array([
    [-2.5372955915773038e-11, 6.270359942266614e-07, -0.0001765579331129467],
    [1.4647992078985772e-08, -1.540282989692449e-05, 0.0008161163031897673],
    [-0.0014610861858233787, 0.0027998558900831022, -0.01334657850968678],
    [0.04766008115203256, -0.019045651429477287, 0.045095089926376286],
    [2.1446582974239914, 0.4410766033537803, -0.1640372618930916],
    [-1.1908573070128199, 0.5751839679795165, 1.1316491921063252]])
EDM2_CORRELATIONS = np.array([9.351832845492367e-06, 9.351832845492372e-06, 0.01068195684298233])


def test_correlation_matches_edm2():
    got = phema.power_function_correlation(
        np.float64([100, 300, 250]), np.float64([0.05, 0.10, 0.2]),
        np.float64([300, 100, 250]), np.float64([0.10, 0.05, 0.03]))
    # A closed form evaluated in float64 in a different order (and std_to_exp in closed
    # form instead of np.roots): a few ulps apart, far below 1e-10.
    np.testing.assert_allclose(got, EDM2_CORRELATIONS, rtol=1e-10, atol=0)


def test_correlation_is_the_integral_of_the_two_profiles():
    """Independent of EDM2: <p_a, p_b> by quadrature of the profiles' definition."""
    def profile(tau, ofs, std):
        gamma = std_to_exp(std)
        return np.where(tau <= ofs, (gamma + 1) * tau ** gamma / ofs ** (gamma + 1), 0.0)

    for a, b in [((100, 0.05), (300, 0.10)), ((300, 0.2), (250, 0.03)), ((200, 0.1), (200, 0.1))]:
        # Midpoint rule over the shorter support (the product is 0 past it; a grid across
        # the profile's jump would cost an O(h) error).
        end = min(a[0], b[0])
        tau = (np.arange(400_000) + 0.5) / 400_000 * end
        numeric = np.sum(profile(tau, *a) * profile(tau, *b)) * (tau[1] - tau[0])
        # Midpoint rule with 4e5 nodes on smooth profiles (gamma >= 5): error ~1e-9 relative;
        # 1e-6 leaves room and still catches any wrong exponent or factor.
        assert phema.power_function_correlation(*a, *b) == pytest.approx(numeric, rel=1e-6)


def test_coefficients_match_edm2():
    got = phema.solve_posthoc_coefficients(EDM2_IN_OFS, EDM2_IN_STD, 300, EDM2_OUT_STD)
    # The solve amplifies ulp-level differences of the inputs by the Gram matrix's condition
    # number (~81 here): measured 4e-15 absolute. Entries ~1e-11 are noise relative to their
    # column, so the bound is relative to the largest coefficient: 1e-10 of it.
    scale = np.abs(EDM2_COEFFICIENTS).max()
    np.testing.assert_allclose(got, EDM2_COEFFICIENTS, rtol=0, atol=1e-10 * scale)
    big = np.abs(EDM2_COEFFICIENTS) > 1e-3
    np.testing.assert_allclose(got[big], EDM2_COEFFICIENTS[big], rtol=1e-10, atol=0)


def test_columns_sum_to_one_and_an_input_profile_reconstructs_to_its_own_snapshot():
    in_ofs = [50, 50, 120, 120, 200, 200]
    in_std = [0.05, 0.10] * 3
    coefficients = phema.solve_posthoc_coefficients(in_ofs, in_std, 200, [0.05, 0.07, 0.10])
    # Normalised in float64: exact to rounding.
    np.testing.assert_allclose(coefficients.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    # The profile of the last sigma=0.05 snapshot (row 4) is in the span: the least-squares
    # solution is that snapshot alone (1e-12: the Gram solve's rounding, cond ~1e2).
    np.testing.assert_allclose(coefficients[:, 0], np.eye(6)[4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(coefficients[:, 2], np.eye(6)[5], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ a synthetic run
STEPS, SNAPSHOT_EVERY = 400, 40
SNAPSHOT_STDS = (0.05, 0.10)
DIRECT_STD = 0.07  # tracked during "training" too, never snapshotted


def trajectory(step):
    """Weights at 1-based ``step``: drift plus oscillations on several time scales, so EMAs
    of different lengths differ clearly."""
    x = torch.linspace(0, 1, 24, dtype=torch.float64).reshape(2, 12)
    t = step / STEPS
    return (torch.sqrt(torch.tensor(t)) * (1 + x) + 0.3 * torch.sin(7 * math.pi * t + 5 * x)
            + 0.1 * torch.cos(31 * math.pi * t * (1 + x)))


def power_ema_run(stds):
    """{std: {step: EMA}} at every snapshot step, with EDM2's per-step rate
    beta_k = (1 - 1/k)**(gamma + 1) (beta_1 = 0: the EMA starts at the first weights)."""
    emas = {std: None for std in stds}
    out = {std: {} for std in stds}
    for k in range(1, STEPS + 1):
        w = trajectory(k)
        for std in stds:
            beta = (1 - 1 / k) ** (std_to_exp(std) + 1)
            emas[std] = w.clone() if emas[std] is None else beta * emas[std] + (1 - beta) * w
            if k % SNAPSHOT_EVERY == 0:
                out[std][k] = emas[std].clone()
    return out


def write_snapshot(run, std, step, state, model_config=None, **meta):
    folder = run / "ema_snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    obj = {"state_dict": state, "step": step, "std": std, **meta}
    if model_config is not None:
        obj["model_config"] = model_config
    path = folder / f"phema_std{std:.3f}_{step:06d}.pt"
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def synthetic_emas():
    return power_ema_run(SNAPSHOT_STDS + (DIRECT_STD,))


@pytest.fixture
def synthetic_run(tmp_path, synthetic_emas):
    run = tmp_path / "run"
    for std in SNAPSHOT_STDS:
        for step, ema in synthetic_emas[std].items():
            write_snapshot(run, std, step, {"w": ema.float(), "b": ema[0].float() * 2},
                           model_config={"image_size": 8, "num_channels": 8})
    (run / "config.json").write_text(json.dumps({"image_size": 8, "num_channels": 8}))
    return run


def test_reconstruction_matches_an_ema_tracked_directly(synthetic_run, synthetic_emas, capsys):
    assert phema.main(["--run", str(synthetic_run), "--ema_std", "0.07,0.05"]) == 0
    printed = capsys.readouterr().out
    assert "from 20 snapshots" in printed and "ema_phema0.070_000400.pt" in printed
    got = torch.load(synthetic_run / "ema_phema0.070_000400.pt", weights_only=True)
    assert set(got) == {"w", "b"} and got["w"].dtype == torch.float32
    direct = synthetic_emas[DIRECT_STD][STEPS]
    nearest = synthetic_emas[0.05][STEPS]  # the best a user could do without reconstruction
    error = (got["w"].double() - direct).abs().max().item()
    nearest_error = (nearest - direct).abs().max().item()
    # The fit is of continuous profiles by a finite set of them (exact only as the snapshots
    # get dense), the per-step EMA only approximates its profile, and snapshots are fp32:
    # measured max error 5.4e-4 (weights up to ~2) against 8.1e-2 for the nearest tracked
    # EMA (sigma 0.05). Bounds: 2e-3 absolute and a twentieth of the nearest EMA's error;
    # a wrong profile, offset or coefficient is off by ~1e-2 or more.
    assert error < 2e-3 and error < nearest_error / 20, (error, nearest_error)
    np.testing.assert_allclose(got["b"].double(), 2 * got["w"][0].double(), rtol=0, atol=1e-6)


def test_an_input_sigma_at_the_latest_step_gives_that_snapshot(synthetic_run, synthetic_emas):
    assert phema.main(["--run", str(synthetic_run), "--ema_std", "0.1"]) == 0
    got = torch.load(synthetic_run / "ema_phema0.100_000400.pt", weights_only=True)
    # Coefficient 1 on that snapshot and ~1e-16 on the rest: equal after rounding to fp32.
    torch.testing.assert_close(got["w"], synthetic_emas[0.10][STEPS].float(), rtol=0, atol=1e-6)


def test_step_uses_only_the_snapshots_up_to_it(synthetic_run, synthetic_emas, capsys):
    assert phema.main(["--run", str(synthetic_run), "--ema_std", "0.05", "--step", "200"]) == 0
    assert "from 10 snapshots" in capsys.readouterr().out
    got = torch.load(synthetic_run / "ema_phema0.050_000200.pt", weights_only=True)
    torch.testing.assert_close(got["w"], synthetic_emas[0.05][200].float(), rtol=0, atol=1e-6)


def test_snapshot_file_std_is_used_over_the_rounded_name(tmp_path):
    """The file name rounds sigma_rel to 3 decimals; the reconstruction uses the exact one."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20):
        for std in (0.0375, 0.1):
            write_snapshot(run, std, step, {"w": torch.full((2,), float(step) + std)})
    chosen = phema.check_snapshots(phema.list_snapshots(str(run)), {})
    assert sorted({s.std for s in chosen}) == [0.0375, 0.1]


# ------------------------------------------------------------------ bad input
def run_and_expect_refusal(run_dir, argv, capsys, fragment):
    before = sorted(p.name for p in run_dir.rglob("*")) if run_dir.exists() else None
    assert phema.main(["--run", str(run_dir)] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastdiff.phema: error:"), err
    assert fragment in err, err
    after = sorted(p.name for p in run_dir.rglob("*")) if run_dir.exists() else None
    assert after == before  # nothing written


@pytest.mark.parametrize("stds", ["0", "-0.05", "0.3", "0.35", "0.05,nan", "abc", ""])
def test_sigma_outside_the_power_function_range_is_refused(synthetic_run, capsys, stds):
    run_and_expect_refusal(synthetic_run, ["--ema_std", stds], capsys, "--ema_std")


@pytest.mark.parametrize("step, fragment", [(210, "latest at or before it is 200"),
                                            (20, "the first is 40"),
                                            (100000, "latest at or before it is 400")])
def test_a_step_without_snapshots_is_refused(synthetic_run, capsys, step, fragment):
    run_and_expect_refusal(synthetic_run, ["--ema_std", "0.07", "--step", str(step)], capsys,
                           fragment)


def test_a_run_without_snapshots_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    run_and_expect_refusal(tmp_path, ["--ema_std", "0.07"], capsys, "no EMA snapshots")


def test_a_missing_run_is_refused(tmp_path, capsys):
    run_and_expect_refusal(tmp_path / "nope", ["--ema_std", "0.07"], capsys, "not found")


@pytest.mark.parametrize("state, model_config, fragment", [
    ({"w": torch.zeros(2, 12), "b": torch.zeros(12), "extra": torch.zeros(1)}, None,
     "unexpected key 'extra'"),
    ({"w": torch.zeros(2, 12)}, None, "missing key 'b'"),
    ({"w": torch.zeros(3, 12), "b": torch.zeros(12)}, None, "'w' is"),
    ({"w": torch.zeros(2, 12), "b": torch.zeros(12)}, {"image_size": 8, "num_channels": 16},
     "num_channels=16"),
])
def test_snapshots_of_different_models_are_refused(synthetic_run, capsys, state, model_config,
                                                   fragment):
    write_snapshot(synthetic_run, 0.05, 440, state, model_config=model_config)
    run_and_expect_refusal(synthetic_run, ["--ema_std", "0.07"], capsys, fragment)


def test_snapshots_with_different_model_configs_are_refused_without_config_json(
        synthetic_run, capsys):
    (synthetic_run / "config.json").unlink()
    write_snapshot(synthetic_run, 0.05, 440, {"w": torch.zeros(2, 12), "b": torch.zeros(12)},
                   model_config={"image_size": 8, "num_channels": 16})
    run_and_expect_refusal(synthetic_run, ["--ema_std", "0.07"], capsys,
                           "snapshots of different models")


def test_snapshots_of_another_model_than_config_json_are_refused(synthetic_run, capsys):
    (synthetic_run / "config.json").write_text(json.dumps({"image_size": 16}))
    run_and_expect_refusal(synthetic_run, ["--ema_std", "0.07"], capsys, "config.json")


def test_a_renamed_snapshot_is_refused(synthetic_run, capsys):
    path = synthetic_run / "ema_snapshots" / "phema_std0.050_000400.pt"
    obj = torch.load(path, weights_only=True)
    obj["step"] = 360
    torch.save(obj, path)
    run_and_expect_refusal(synthetic_run, ["--ema_std", "0.07"], capsys, "holds step 360")


# ------------------------------------------------------------------ a real model's files
TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", num_heads=2, diffusion_steps=50)


def test_the_written_file_loads_as_the_runs_model(tmp_path):
    kw = C.model_and_diffusion_defaults()
    kw.update(TINY)
    model, _ = C.create_model_and_diffusion(**kw)
    base = model.state_dict()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**kw, "lr": 1e-4}))
    model_keys = {f.name for f in dataclasses.fields(C.ModelConfig)} | \
        {f.name for f in dataclasses.fields(C.DiffusionConfig)}
    model_config = {k: v for k, v in kw.items() if k in model_keys}
    generator = torch.Generator().manual_seed(0)
    for step in (5, 10):
        for std in SNAPSHOT_STDS:
            state = {k: v + 0.01 * torch.randn(v.shape, generator=generator)
                     for k, v in base.items()}
            write_snapshot(run, std, step, state, model_config=model_config)
    assert phema.main(["--run", str(run), "--ema_std", "0.08"]) == 0
    path = run / "ema_phema0.080_000010.pt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    # The model flags come from the run's config.json, as fastdiff.sample reads them.
    args = C.build_parser((C.ModelConfig, C.DiffusionConfig)).parse_args([])
    fill_model_flags_from_run(args, set(), str(path))
    model_cfg, diff_cfg = C.split_args(args, (C.ModelConfig, C.DiffusionConfig))
    loaded, _ = load_model(str(path), model_cfg, diff_cfg, "torch", "math", torch.device("cpu"))
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
