"""The training CLI end to end on a tiny model: files, logs, resume, errors."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdiff.train import cli

TINY = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--num_heads", "2", "--batch_size", "4",
        "--log_interval", "2", "--save_interval", "2", "--sample_grid", "False",
        "--optimizer", "torch", "--diffusion_steps", "50", "--seed", "3"]


def run(tmp_path, *extra, name="run"):
    log_dir = tmp_path / name
    rc = cli.main(TINY + ["--log_dir", str(log_dir)] + list(extra))
    return rc, log_dir


def load(path):
    return torch.load(path, weights_only=True)


def test_trains_and_writes_gd_files_logs_and_config(tmp_path):
    rc, d = run(tmp_path, "--max_steps", "4", "--ema_rate", "0.9,0.99")
    assert rc == 0
    for name in ["model000002.pt", "model000004.pt", "opt000004.pt", "ema_0.9_000004.pt",
                 "ema_0.99_000004.pt", "progress.csv", "metrics.jsonl", "log.txt", "config.json"]:
        assert (d / name).is_file(), name
    assert (d / "checkpoints" / "step_000004" / "trainer.json").is_file()
    rows = list(csv.DictReader(open(d / "progress.csv")))
    assert [int(float(r["step"])) for r in rows] == [2, 4]
    for key in ["loss", "mse", "loss_q0", "grad_norm", "param_norm", "samples", "images_per_sec"]:
        assert key in rows[0], key
    m, e = load(d / "model000004.pt"), load(d / "ema_0.9_000004.pt")
    assert m.keys() == e.keys() and "input_blocks.0.0.weight" in m
    assert not torch.equal(m["input_blocks.0.0.weight"], e["input_blocks.0.0.weight"])
    opt = load(d / "opt000004.pt")
    assert len(opt["param_groups"][0]["params"]) == len(m) and float(opt["state"][0]["step"]) == 4
    cfg = json.load(open(d / "config.json"))
    assert cfg["num_channels"] == 32 and cfg["image_size"] == 16  # flag + digits preset


def test_resume_latest_is_exact(tmp_path):
    rc, full = run(tmp_path, "--max_steps", "4", name="full")
    assert rc == 0
    rc, part = run(tmp_path, "--max_steps", "2", name="part")
    assert rc == 0
    rc, _ = run(tmp_path, "--max_steps", "4", "--resume_checkpoint", "latest", name="part")
    assert rc == 0
    a, b = load(full / "model000004.pt"), load(part / "model000004.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    a, b = load(full / "ema_0.99_000004.pt"), load(part / "ema_0.99_000004.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(part / "progress.csv")))
    assert [int(float(r["step"])) for r in rows] == [2, 4]  # appended, not truncated


def test_resume_from_gd_file_finetunes(tmp_path):
    rc, src = run(tmp_path, "--max_steps", "2", name="src")
    rc, dst = run(tmp_path, "--max_steps", "4", "--resume_checkpoint",
                  str(src / "model000002.pt"), name="dst")
    assert rc == 0
    assert (dst / "model000004.pt").is_file() and not (dst / "model000002.pt").exists()


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
