"""Classifier-free guidance, training side: --class_dropout_prob p turns each label into the
null class with probability p, on the CPU side of the data stream, keyed on
(seed, rank, batch index) so that a resumed run drops exactly the labels an uninterrupted
one would; p = 0 leaves the batches and the state_dict GD's."""
import json
import math
import subprocess
import sys

import pytest
import torch

from fastdiff import config as C
from fastdiff.data import ConditionedStream, add_conditioning, drop_labels, load_data
from fastdiff.models.unet import NUM_CLASSES
from fastdiff.train import cli
from fastdiff.train.checkpoint import CheckpointError, check_resume_compatible
from fastdiff.train.loop import Trainer

TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1,2", "--attention_resolutions", "", "--num_heads", "1",
        "--class_cond", "True", "--batch_size", "8", "--log_interval", "2",
        "--save_interval", "2", "--sample_grid", "False", "--diffusion_steps", "20",
        "--seed", "3", "--tensorboard", "False", "--log_format", "line", "--no_progress"]


def digits(batch_size=16, rank=0, world_size=1, seed=0):
    return load_data(batch_size=batch_size, image_size=8, class_cond=True, random_flip=False,
                     seed=seed, rank=rank, world_size=world_size)


def dropping(p, **kw):
    seed, rank = kw.get("seed", 0), kw.get("rank", 0)
    return ConditionedStream(digits(**kw), class_dropout_prob=p, null_class=NUM_CLASSES,
                             seed=seed, rank=rank)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_dropout_rate_is_binomial_and_uses_the_null_class():
    p, batches = 0.3, 100
    raw, dropped = take(digits(), batches), take(dropping(p), batches)
    y_raw = torch.cat([c["y"] for _, c in raw])
    y = torch.cat([c["y"] for _, c in dropped])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(raw, dropped))  # images untouched
    is_null = y == NUM_CLASSES
    assert NUM_CLASSES == 1000  # GD's ImageNet class count: the null class is the next id
    assert torch.equal(y[~is_null], y_raw[~is_null])  # a kept label is the original one
    assert not (y_raw == NUM_CLASSES).any()
    n = len(y)
    # 1600 Bernoulli(0.3) draws: sigma = sqrt(p(1-p)/n) = 0.0115; 5 sigma (a false alarm
    # once in ~3.5 million seeds) still rejects p = 0.25 or 0.35, and a dropout of 0 or 1.
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(float(is_null.float().mean()) - p) <= bound


def test_dropout_is_keyed_on_seed_rank_and_batch_index():
    labels = torch.arange(64) % 10
    key = dict(seed=1, rank=0, batch_index=5)
    first = drop_labels(labels, 0.5, NUM_CLASSES, **key)
    assert torch.equal(first, drop_labels(labels, 0.5, NUM_CLASSES, **key))  # a pure function
    for other in (dict(key, seed=2), dict(key, rank=1), dict(key, batch_index=6)):
        assert not torch.equal(first, drop_labels(labels, 0.5, NUM_CLASSES, **other)), other
    assert torch.equal(labels, torch.arange(64) % 10)  # the input is not modified


def test_resumed_stream_drops_the_same_labels():
    uninterrupted = take(dropping(0.5), 7)
    first = dropping(0.5)
    take(first, 3)
    state = first.state_dict()
    assert state["conditioned_batches"] == 3
    resumed = dropping(0.5)
    resumed.load_state_dict(state)
    for (xa, ca), (xb, cb) in zip(uninterrupted[3:], take(resumed, 4)):
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])


def test_p_zero_is_bitwise_todays_stream():
    plain = digits()
    assert add_conditioning(plain, class_dropout_prob=0.0) is plain
    # ... and the wrapper itself with p = 0 (the super-res trainer wraps for low_res).
    for (xa, ca), (xb, cb) in zip(take(digits(), 5), take(dropping(0.0), 5)):
        assert torch.equal(xa, xb) and ca.keys() == cb.keys() and torch.equal(ca["y"], cb["y"])


@pytest.fixture
def seen_labels(monkeypatch):
    """The (labels, images) each Trainer.train_step receives, per run, in order."""
    runs = []
    original = Trainer.train_step

    def train_step(self, batch, cond):
        if not runs or runs[-1][0] is not self:
            runs.append((self, []))
        runs[-1][1].append((cond["y"].clone(), batch.clone()))
        return original(self, batch, cond)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return runs


def run(tmp_path, name, *extra):
    return cli.main(TINY + ["--log_dir", str(tmp_path / name)] + list(extra))


def test_training_drops_labels_and_resumes_exactly(tmp_path, seen_labels):
    p = ["--class_dropout_prob", "0.5"]
    assert run(tmp_path, "full", "--max_steps", "4", *p) == 0
    assert run(tmp_path, "part", "--max_steps", "2", *p) == 0
    assert run(tmp_path, "part", "--max_steps", "4", "--resume_checkpoint", "latest", *p) == 0
    full, part_a, part_b = [[y for y, _ in steps] for _, steps in seen_labels]
    assert len(full) == 4 and len(part_a) == 2 and len(part_b) == 2
    assert any((y == NUM_CLASSES).any() for y in full)  # the trainer saw null labels
    for a, b in zip(full, part_a + part_b):
        assert torch.equal(a, b)
    a = torch.load(tmp_path / "full" / "model000004.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model000004.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The null-class row is in the exported weights, and config.json records p: a strict
    # load into GD's factory with class_dropout_prob.
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["class_dropout_prob"] == 0.5
    assert a["label_emb.weight"].shape[0] == NUM_CLASSES + 1
    kw = {k: cfg[k] for k in C.model_and_diffusion_defaults()}
    model, _ = C.create_model_and_diffusion(**kw, class_dropout_prob=cfg["class_dropout_prob"])
    model.load_state_dict(a, strict=True)


def test_p_zero_run_keeps_gd_state_dict(tmp_path, seen_labels):
    assert run(tmp_path, "p0", "--max_steps", "2") == 0
    (_, steps), = seen_labels
    raw = take(load_data(batch_size=8, image_size=8, class_cond=True, random_flip=False,
                         seed=3), 2)
    for (y, x), (x_raw, c) in zip(steps, raw):  # today's batches, bit for bit
        assert torch.equal(y, c["y"]) and torch.equal(x, x_raw)
    weights = torch.load(tmp_path / "p0" / "model000002.pt", weights_only=True)
    assert weights["label_emb.weight"].shape[0] == NUM_CLASSES


def test_resume_refuses_another_null_class_row(tmp_path, capsys):
    assert run(tmp_path, "r", "--max_steps", "2", "--class_dropout_prob", "0.2") == 0
    capsys.readouterr()
    assert run(tmp_path, "r", "--max_steps", "4", "--resume_checkpoint", "latest") == 2
    err = capsys.readouterr().err
    assert "class_dropout_prob" in err and err.count("\n") == 1
    # Another p > 0 keeps the row: allowed.
    checkpoint = tmp_path / "r" / "checkpoints" / "step_000002"
    config = json.load(open(tmp_path / "r" / "config.json"))
    check_resume_compatible(str(checkpoint), dict(config, class_dropout_prob=0.4),
                            C.MODEL_SHAPE_FLAGS)
    with pytest.raises(CheckpointError, match="null-class"):
        check_resume_compatible(str(checkpoint), dict(config, class_dropout_prob=0.0),
                                C.MODEL_SHAPE_FLAGS)


@pytest.mark.parametrize("module", ["fastdiff.train", "fastdiff.super_res_train"])
def test_dropout_without_class_cond_is_refused(tmp_path, module):
    proc = subprocess.run([sys.executable, "-m", module, "--class_cond", "False",
                           "--class_dropout_prob", "0.1", "--log_dir", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{module}: error: --class_dropout_prob needs --class_cond")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "x").exists()
