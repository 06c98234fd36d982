"""The training CLI end to end on a tiny model: files, logs, resume, errors.

Every run uses the default optimizer (``fused``: the C++ Adam+EMA extension), except where a
test names ``torch``. The Trainer that ``cli.main`` builds is captured (``live_trainers``), so
the exported GD files can be compared by value with the weights, EMAs and Adam state the run
really holds.
"""
import csv
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from fastdiff.train import cli
from fastdiff.train.loop import Trainer

TINY = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--num_heads", "2", "--batch_size", "4",
        "--log_interval", "2", "--save_interval", "2", "--sample_grid", "False",
        "--diffusion_steps", "50", "--seed", "3"]


def run(tmp_path, *extra, name="run"):
    log_dir = tmp_path / name
    rc = cli.main(TINY + ["--log_dir", str(log_dir)] + list(extra))
    return rc, log_dir


def load(path):
    return torch.load(path, weights_only=True)


def snapshot(trainer):
    """Copies of a Trainer's live weights, EMAs and Adam state, by parameter name."""
    names = trainer.param_names
    return types.SimpleNamespace(
        step=trainer.step,
        model={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        emas={rate: {n: e.detach().clone() for n, e in zip(names, trainer.optimizer.get_ema(rate))}
              for rate in trainer.ema_rates},
        adam={n: {k: v.detach().clone() for k, v in st.items()}
              for n, st in zip(names, trainer.optimizer.state_tensors())},
    )


@pytest.fixture
def live_trainers(monkeypatch):
    """Each Trainer cli.main runs, with a snapshot of its state when train() begins (after
    any resume); the trainer itself holds the state training ended with."""
    runs = []
    original_train = Trainer.train

    def train(self):
        runs.append(types.SimpleNamespace(trainer=self, at_start=snapshot(self)))
        return original_train(self)

    monkeypatch.setattr(Trainer, "train", train)
    return runs


def assert_same_tensors(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for k in expected:
        assert torch.equal(actual[k], expected[k]), f"{what}: {k}"


def assert_adam_state_matches_gd_file(adam, names, opt_file, what):
    """The per-parameter Adam state equals a GD opt*.pt (AdamW format, parameter order)."""
    assert len(opt_file["param_groups"][0]["params"]) == len(names)
    for i, name in enumerate(names):
        saved = opt_file["state"][i]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam[name][key], saved[key]), f"{what}: {name}.{key}"
        assert float(adam[name]["step"]) == float(saved["step"]), f"{what}: {name}.step"


def test_trains_and_writes_gd_files_logs_and_config(tmp_path, live_trainers, capsys):
    rc, d = run(tmp_path, "--max_steps", "4", "--ema_rate", "0.9,0.99")
    assert rc == 0
    assert "optimizer: fused" in capsys.readouterr().out  # the default path ran
    for name in ["model000002.pt", "model000004.pt", "opt000004.pt", "ema_0.9_000004.pt",
                 "ema_0.99_000004.pt", "progress.csv", "metrics.jsonl", "log.txt", "config.json"]:
        assert (d / name).is_file(), name
    assert (d / "checkpoints" / "step_000004" / "trainer.json").is_file()
    rows = list(csv.DictReader(open(d / "progress.csv")))
    assert [int(float(r["step"])) for r in rows] == [2, 4]
    for key in ["loss", "mse", "loss_q0", "grad_norm", "param_norm", "samples", "images_per_sec"]:
        assert key in rows[0], key
    cfg = json.load(open(d / "config.json"))
    assert cfg["num_channels"] == 32 and cfg["image_size"] == 16  # flag + digits preset

    # The step-4 exports hold the run's final state, by value.
    (live,) = live_trainers
    assert live.trainer.step == 4
    end = snapshot(live.trainer)
    m = load(d / "model000004.pt")
    assert "input_blocks.0.0.weight" in m
    assert_same_tensors(m, end.model, "model000004.pt vs the live weights")
    for rate in (0.9, 0.99):
        e = load(d / f"ema_{rate}_000004.pt")
        assert_same_tensors(e, end.emas[rate], f"ema_{rate}_000004.pt vs the live EMA")
        assert not torch.equal(m["input_blocks.0.0.weight"], e["input_blocks.0.0.weight"])
    opt = load(d / "opt000004.pt")
    assert float(opt["state"][0]["step"]) == 4
    assert_adam_state_matches_gd_file(end.adam, live.trainer.param_names, opt, "opt000004.pt")
    # ... in a form torch.optim.AdamW (GD's optimizer) loads, moments included.
    params = [torch.nn.Parameter(p.detach().clone()) for p in live.trainer.params]
    adamw = torch.optim.AdamW(params)
    adamw.load_state_dict(opt)
    assert adamw.param_groups[0]["lr"] == pytest.approx(cfg["lr"])
    for p, name in zip(params, live.trainer.param_names):
        assert torch.equal(adamw.state[p]["exp_avg"], end.adam[name]["exp_avg"]), name


# The one CLI test that also runs the stock torch AdamW + EMA-loop path.
@pytest.mark.parametrize("optimizer", ["fused", "torch"])
def test_resume_latest_is_exact(tmp_path, optimizer):
    flags = ["--optimizer", optimizer]
    rc, full = run(tmp_path, "--max_steps", "4", *flags, name="full")
    assert rc == 0
    rc, part = run(tmp_path, "--max_steps", "2", *flags, name="part")
    assert rc == 0
    rc, _ = run(tmp_path, "--max_steps", "4", "--resume_checkpoint", "latest", *flags,
                name="part")
    assert rc == 0
    for name in ["model000004.pt", "ema_0.99_000004.pt"]:
        assert_same_tensors(load(part / name), load(full / name), name)
    a, b = load(full / "opt000004.pt"), load(part / "opt000004.pt")
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)
    rows = list(csv.DictReader(open(part / "progress.csv")))
    assert [int(float(r["step"])) for r in rows] == [2, 4]  # appended, not truncated


def test_resume_from_gd_file_finetunes(tmp_path, live_trainers):
    rc, src = run(tmp_path, "--max_steps", "2", name="src")
    assert rc == 0
    rc, dst = run(tmp_path, "--max_steps", "4", "--resume_checkpoint",
                  str(src / "model000002.pt"), name="dst")
    assert rc == 0
    assert (dst / "model000004.pt").is_file() and not (dst / "model000002.pt").exists()

    # The resumed Trainer started from the files beside model000002.pt, by value: the
    # weights, the EMA (not a copy of the weights) and the Adam moments and step counts.
    _, resumed = live_trainers
    start = resumed.at_start
    assert start.step == 2
    model_file, ema_file = load(src / "model000002.pt"), load(src / "ema_0.99_000002.pt")
    opt_file = load(src / "opt000002.pt")
    assert_same_tensors(start.model, model_file, "resumed weights vs model000002.pt")
    assert_same_tensors(start.emas[0.99], ema_file, "resumed EMA vs ema_0.99_000002.pt")
    assert not all(torch.equal(model_file[k], ema_file[k]) for k in model_file)
    assert_adam_state_matches_gd_file(start.adam, resumed.trainer.param_names, opt_file,
                                      "resumed Adam state vs opt000002.pt")
    assert any(st["exp_avg"].any() for st in start.adam.values())
    # ... and fine-tuned on from there: Adam's step counts continue (2 + 2).
    opt = load(dst / "opt000004.pt")
    assert all(float(st["step"]) == 4 for st in opt["state"].values())
    moved = load(dst / "model000004.pt")
    assert not all(torch.equal(moved[k], model_file[k]) for k in model_file)


def test_resume_refuses_changed_model_flags(tmp_path, capsys):
    run(tmp_path, "--max_steps", "2")
    rc, _ = run(tmp_path, "--max_steps", "4", "--resume_checkpoint", "latest",
                "--num_channels", "64")
    assert rc == 2
    err = capsys.readouterr().err
    assert "num_channels" in err and err.count("\n") == 1


def test_mismatched_gd_checkpoint_names_key(tmp_path, capsys):
    bad = tmp_path / "model000007.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, bad)
    rc, _ = run(tmp_path, "--max_steps", "1", "--resume_checkpoint", str(bad))
    assert rc == 2
    assert "does not fit the model" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--data_dir", "/nonexistent/images"], "/nonexistent/images"),
    (["--resume_checkpoint", "latest", "--log_dir", ""], "--log_dir"),
    (["--precision", "fp8"], "precision"),
])
def test_bad_input_is_one_line_error_exit_nonzero(tmp_path, argv, needle):
    env = dict(os.environ)
    env.pop("OPENAI_LOGDIR", None)
    args = TINY + ["--log_dir", str(tmp_path / "x")] + argv
    proc = subprocess.run([sys.executable, "-m", "fastdiff.train"] + args, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    # ... and loses nothing: no run folder is left behind by a run that never started.
    assert not (tmp_path / "x").exists()
    assert not any((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else True
