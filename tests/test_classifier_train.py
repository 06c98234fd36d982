"""``python -m fastdiff.classifier_train``: GD's classifier_train.py on fastdiff's Trainer.

Why: the classifier that guides sampling must be trained with GD's semantics (whole-batch
q_sample, cross-entropy weighted to the batch mean over microbatches, lr annealed over
--iterations, GD's logged keys and files), through the same Trainer as the diffusion model
(a pluggable objective, zero EMAs). Pinned here: every step against GD's own loop
(fixtures/gd_classifier_train.pt, from tools/gd_golden_classifier_train.py), the microbatch
scaling, the schedule, noised vs clean inputs, the metric keys and validation, GD's fp16
starting loss scale, and the command line: files that load into GD's factory and AdamW,
exact resume, two ranks, and one-line refusals that write nothing.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastdiff import classifier_train as CT
from fastdiff import config as C
from fastdiff.diffusion import create_gaussian_diffusion, create_named_schedule_sampler
from fastdiff.models.classifier import EncoderUNetModel
from fastdiff.runtime import DistInfo
from fastdiff.train.loop import Trainer
from fastdiff.train.metrics import MetricLogger
from fastdiff.train.objectives import ClassifierObjective, ClassifierSchedule

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gd_golden_classifier_train import synthetic_initial_state  # noqa: E402
from gd_golden_train import RecordedTimesteps, zero_gradient_elements  # noqa: E402
from test_gd_golden_train import assert_probe_close  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "gd_classifier_train.pt"

# Weights: fp32 AdamW on gradients equal up to summation order (the model runs GD's module
# tree: torch GroupNorm, einsum attention); measured after 5 steps: 3e-7 of a tensor's RMS
# (fused C++ AdamW), 0 (torch's AdamW). 1e-5 as in test_gd_golden_train.py; dropping the
# microbatch share (each microbatch's own mean, summed) moves them by 9e-2.
RTOL_WEIGHTS = 1e-5
# Moments: gradients taken at weights that already differ in the last bits (fused path),
# amplified by the backward pass; measured 5.2e-6 (fused), 0 (torch). 5e-5 as in
# test_gd_golden_train.py; the dropped share moves exp_avg by 5.7 RMS.
RTOL_MOMENTS = 5e-5
# The logged loss: the batch mean of fp32 cross-entropies of (nearly) equal logits; measured
# 5.6e-8; with the share dropped the losses from step 2 on differ by 1.3e-2 (moved weights).
RTOL_LOSS = 1e-5


# --------------------------------------------------------------------------- the golden
@pytest.fixture(scope="module")
def gd():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def gd_sized_classifier(gd):
    """fastdiff's EncoderUNetModel with the generator's arguments (10 outputs), on the
    fixture's initial weights with its rounding-noise gradient elements zeroed (see
    rounding_noise_gradients in the generator), and the diffusion."""
    cls = gd["classifier"]
    model = EncoderUNetModel(
        image_size=cls["image_size"], in_channels=3, model_channels=cls["classifier_width"],
        out_channels=gd["num_outputs"], num_res_blocks=cls["classifier_depth"],
        attention_resolutions=(cls["image_size"] // int(cls["classifier_attention_resolutions"]),),
        channel_mult=tuple(int(c) for c in cls["classifier_channel_mult"].split(",")),
        num_head_channels=64, use_scale_shift_norm=cls["classifier_use_scale_shift_norm"],
        resblock_updown=cls["classifier_resblock_updown"], pool=cls["classifier_pool"])
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [tuple(x) for x in gd["state_dict_shapes"]]
    model.load_state_dict(synthetic_initial_state(gd["state_dict_shapes"]), strict=True)
    # Elements the loss does not depend on: zeroed as the generator did in GD's model.
    zero_gradient_elements(model, gd["zero_gradient_elements"])
    diff = gd["diffusion"]
    diffusion = create_gaussian_diffusion(steps=diff["diffusion_steps"],
                                          noise_schedule=diff["noise_schedule"])
    return model, diffusion


def recorded_noise(diffusion, noises):
    """Make ``diffusion.q_sample`` (no noise given) use the recorded noise, one per call."""
    original, queue = diffusion.q_sample, list(noises)
    diffusion.q_sample = lambda x, t, noise=None: original(x, t, noise=queue.pop(0))


def train_cfg(**overrides):
    cfg = dict(batch_size=4, microbatch=-1, lr=1e-3, weight_decay=0.0, optimizer="fused",
               precision="fp32", grad_clip=0.0, log_interval=10**6, save_interval=10**6,
               skip_nonfinite=False, keep_latest=0, fp16_scale_growth=1e-3, max_steps=0)
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def classifier_trainer(model, diffusion, sampler, cfg, log_dir=None, schedule=None, **objective):
    obj = ClassifierObjective(diffusion, sampler, **objective)
    return Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(device=torch.device("cpu")),
                   log_dir=None if log_dir is None else str(log_dir), metrics_table=False,
                   objective=obj, schedule=schedule or ClassifierSchedule(cfg.lr, 10**6))


def drained(trainer):
    """The step's device means as host floats (what a logging step would write)."""
    logger = MetricLogger(None, table_writer=None)
    trainer.device_metrics.drain_into(logger)
    return logger.dumpkvs()


@pytest.fixture(scope="module", params=("fused", "torch"))
def golden_run(request, gd, tmp_path_factory):
    model, diffusion = gd_sized_classifier(gd)
    recorded_noise(diffusion, gd["noise"])
    tr = gd["train"]
    cfg = train_cfg(batch_size=tr["batch_size"], microbatch=tr["microbatch"], lr=tr["lr"],
                    weight_decay=tr["weight_decay"], optimizer=request.param)
    log_dir = tmp_path_factory.mktemp(f"golden_{request.param}")
    trainer = classifier_trainer(
        model, diffusion, RecordedTimesteps(list(gd["timesteps"])), cfg, log_dir,
        schedule=ClassifierSchedule(tr["lr"], tr["iterations"], tr["anneal_lr"]))
    steps = []
    for k in range(len(gd["steps"])):
        trainer.train_step(gd["images"][k], {"y": gd["labels"][k]})
        trainer.step += 1
        states = trainer.optimizer.state_tensors()
        steps.append({
            "lr": trainer.optimizer.opt.param_groups[0]["lr"], "metrics": drained(trainer),
            "params": [p.detach().clone() for p in trainer.params],
            "exp_avg": [s["exp_avg"].clone() for s in states],
            "exp_avg_sq": [s["exp_avg_sq"].clone() for s in states],
            "adam_steps": {float(s["step"]) for s in states}})
    trainer.save()
    return {"steps": steps, "log_dir": log_dir, "trainer": trainer}


def test_every_step_matches_gd_classifier_train(golden_run, gd):
    """The lr set before each step, the logged loss and top-1/top-5 accuracy, the weights and
    AdamW's moments after each of 5 steps (batch 5 in microbatches 3 + 2, annealed lr)."""
    sizes = torch.tensor([3.0, 2.0])
    for k, step in enumerate(golden_run["steps"]):
        assert step["lr"] == pytest.approx(float(gd["lrs"][k]), rel=1e-12, abs=0), f"lr at step {k + 1}"
        batch_mean = float((gd["losses"][k] * sizes).sum() / sizes.sum())
        m = step["metrics"]
        assert m["train_loss"] == pytest.approx(batch_mean, rel=RTOL_LOSS), f"loss at step {k + 1}"
        # Hits are 0/1 per sample: the means agree exactly unless a logit ties.
        assert m["train_acc@1"] == pytest.approx(float(gd["hits1"][k].double().mean()), abs=1e-12)
        assert m["train_acc@5"] == pytest.approx(float(gd["hits5"][k].double().mean()), abs=1e-12)
        record = gd["steps"][k]
        assert_probe_close(step["params"], record["params"], gd, RTOL_WEIGHTS, f"step {k + 1} weights")
        assert_probe_close(step["exp_avg"], record["exp_avg"], gd, RTOL_MOMENTS, f"step {k + 1} exp_avg")
        assert_probe_close(step["exp_avg_sq"], record["exp_avg_sq"], gd, RTOL_MOMENTS,
                           f"step {k + 1} exp_avg_sq")
        assert step["adam_steps"] == {record["adam_step"]}


def test_exported_files_are_gds(golden_run, gd):
    """model/opt files after the 5 steps: no EMA file (GD's classifier keeps none), the opt
    file's lr is the last step's (GD sets it before the step), its weight decay GD's."""
    log_dir, n = golden_run["log_dir"], len(gd["steps"])
    assert sorted(os.listdir(log_dir)) == ["checkpoints", f"model{n:06d}.pt", f"opt{n:06d}.pt"]
    opt = torch.load(log_dir / f"opt{n:06d}.pt", weights_only=True)
    assert opt["param_groups"][0]["lr"] == pytest.approx(gd["opt_file_lr"], rel=1e-12)
    assert opt["param_groups"][0]["weight_decay"] == gd["opt_file_weight_decay"]
    assert len(opt["param_groups"][0]["params"]) == gd["opt_file_num_params"]
    assert golden_run["trainer"].optimizer.ema_names == []


# ------------------------------------------------------------------------ the semantics
def tiny_model(seed=0):
    torch.manual_seed(seed)
    kw = C.classifier_and_diffusion_defaults()
    kw.update(image_size=8, classifier_width=32, classifier_depth=1,
              classifier_attention_resolutions="4", diffusion_steps=50)
    return C.create_classifier_and_diffusion(**kw, classifier_channel_mult="1,2")


def test_microbatch_gradients_sum_to_the_unsplit_batch_mean():
    """Batch 5 in microbatches 2 + 2 + 1: the summed gradients equal the whole batch mean's
    (GD's loss·len(micro)/len(batch); the diffusion objective would give k× the mean)."""
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = {"y": torch.tensor([1, 7, 3, 3, 9])}
    grads = {}
    for micro in (-1, 2):
        model, diffusion = tiny_model()
        trainer = classifier_trainer(model, diffusion, None, train_cfg(batch_size=5, microbatch=micro),
                                     noised=False)
        trainer.forward_backward(x, y)
        grads[micro] = [p.grad.clone() for p in trainer.params]
    for whole, split in zip(grads[-1], grads[2]):
        # Same forward per sample, gradients summed in another order: fp32 rounding (~1e-7).
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_annealed_lr_and_run_length():
    """GD: lr·(1 − k/iterations) before the step after k completed ones; the opt file holds
    the last step's lr; the run lasts --iterations steps (--max_steps stops earlier)."""
    s = ClassifierSchedule(1.0, 4, anneal_lr=True)
    assert [s.lr(k) for k in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [s.recorded_lr(k) for k in (1, 4)] == [1.0, 0.25]
    assert s.total_steps() == 4 and not s.done(3) and s.done(4)
    flat = ClassifierSchedule(1.0, 4, anneal_lr=False, max_steps=2)
    assert {flat.lr(k) for k in range(4)} == {1.0}
    assert flat.total_steps() == 2 and flat.done(2)


def test_noised_batches_are_q_sampled_and_clean_ones_at_t0():
    model, diffusion = tiny_model()
    x, y = torch.rand(6, 3, 8, 8) * 2 - 1, {"y": torch.arange(6)}
    clean = ClassifierObjective(diffusion, None, noised=False)
    got, per_sample = clean.begin_batch(x, y, torch.device("cpu"))
    assert torch.equal(got, x) and torch.equal(per_sample["t"], torch.zeros(6, dtype=torch.long))
    sampler = create_named_schedule_sampler("uniform", diffusion, seed=3)
    noised = ClassifierObjective(diffusion, sampler, noised=True)
    torch.manual_seed(4)
    got, per_sample = noised.begin_batch(x, y, torch.device("cpu"))
    # The same draws replayed: t from the sampler, then q_sample's noise (GD's order).
    sampler_again = create_named_schedule_sampler("uniform", diffusion, seed=3)
    torch.manual_seed(4)
    t, _ = sampler_again.sample(6, torch.device("cpu"))
    expected = diffusion.q_sample(x, t)
    assert torch.equal(per_sample["t"], t) and t.max() > 0
    assert torch.equal(got, expected) and not torch.equal(got, x)
    assert torch.equal(per_sample["y"], y["y"])


def batches(seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1, {"y": torch.randint(0, 10, (n,), generator=gen)}


def test_metric_keys_and_validation_every_eval_interval():
    """GD's keys with timestep quartiles; validation every --eval_interval completed steps,
    in eval mode, without touching the gradients; training mode restored."""
    model, diffusion = tiny_model()
    sampler = create_named_schedule_sampler("uniform", diffusion, seed=0)
    trainer = classifier_trainer(model, diffusion, sampler, train_cfg(), val_data=batches(1),
                                 eval_interval=2)
    modes = []  # (training mode, autograd on) of every forward
    model.register_forward_pre_hook(
        lambda m, args: modes.append((m.training, torch.is_grad_enabled())))
    data = batches(0)
    for _ in range(4):
        trainer.train_step(*next(data))
        trainer.step += 1
        if trainer.objective.evaluation_due(trainer.step):
            grads = [p.grad.clone() for p in trainer.params]
            trainer.evaluate()
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, trainer.params))
    train, val = (True, True), (False, False)
    assert modes == [train, train, val, train, train, val]  # val after steps 2 and 4
    assert model.training
    kvs = drained(trainer)
    expected = {f"{split}_{key}{q}" for split in ("train", "val")
                for key in ("loss", "acc@1", "acc@5") for q in ("", "_q0", "_q1", "_q2", "_q3")}
    assert expected <= set(kvs)
    assert {k for k in kvs if k.startswith(("train", "val"))} <= expected
    assert all(0 <= kvs[k] <= 1 for k in kvs if "acc@" in k)
    assert kvs["train_acc@1"] <= kvs["train_acc@5"]


def test_fp16_starts_at_gds_classifier_loss_scale():
    """GD's classifier_train passes initial_lg_loss_scale=16 (TrainLoop: 20)."""
    model, diffusion = tiny_model()
    trainer = classifier_trainer(model, diffusion, None, train_cfg(precision="fp16"), noised=False)
    assert trainer.lg_loss_scale == 16.0


def test_digits_train_and_validation_do_not_overlap():
    """Without --data_dir: train on fastdiff.evaluate's training digits, validate on its
    held-out ones (every 5th), each rank a disjoint share."""
    from fastdiff.evaluate.digits_classifier import digits_split, load_digits_arrays
    train_idx, held_out_idx = digits_split(len(load_digits_arrays()[1]))
    shares = [CT.digits_streams(8, 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    train = [i for share in shares for i in share[0].dataset._indices]
    val = [i for share in shares for i in share[1].dataset._indices]
    assert sorted(train) == sorted(train_idx.tolist()) and len(set(train)) == len(train)
    assert sorted(val) == sorted(held_out_idx.tolist()) and not set(train) & set(val)


# -------------------------------------------------------------------------- the command
TINY = ["--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
        "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "4",
        "--diffusion_steps", "50", "--batch_size", "8", "--log_interval", "2",
        "--eval_interval", "2", "--tensorboard", "False", "--no_progress", "True",
        "--log_format", "line", "--seed", "3"]


def run_cli(log_dir, *extra):
    return CT.main(TINY + ["--log_dir", str(log_dir)] + [str(a) for a in extra])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("cli") / "run"
    assert run_cli(log_dir, "--iterations", 4, "--save_interval", 2, "--anneal_lr", "True") == 0
    return log_dir


def test_cli_writes_gd_files_that_load_into_gd_factory_and_adamw(cli_run):
    files = sorted(os.listdir(cli_run))
    assert [f for f in files if f.endswith(".pt")] == [
        "model000002.pt", "model000004.pt", "opt000002.pt", "opt000004.pt"]  # no ema_*.pt
    config = json.loads((cli_run / "config.json").read_text())
    kw = {k: config[k] for k in C.classifier_and_diffusion_defaults()}
    model, _ = C.create_classifier_and_diffusion(
        **kw, classifier_channel_mult=config["classifier_channel_mult"])
    model.load_state_dict(load(cli_run / "model000004.pt"), strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt.load_state_dict(load(cli_run / "opt000004.pt"))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))  # the 4th step's
    assert all(float(opt.state[p]["step"]) == 4 for p in model.parameters())
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all("val_acc@1" in r and "train_loss" in r and "grad_norm" in r for r in rows)


def _comparable(row):
    timing = ("images_per_sec", "step_time_ms", "data_wait_frac", "peak_mem_gib", "mfu",
              "tflops")
    return {k: v for k, v in row.items() if not k.startswith(timing)}


def test_resume_latest_continues_exactly(tmp_path):
    """Stopped after 3 of 6 steps (--max_steps) and resumed with 'latest': the same weights,
    AdamW state and logged metrics (validation included) as one uninterrupted run."""
    # Logged every 3 steps, so no interval spans the restart (its first part would be lost).
    args = ["--iterations", 6, "--save_interval", 3, "--log_interval", 3, "--anneal_lr", "True"]
    assert run_cli(tmp_path / "whole", *args) == 0
    assert run_cli(tmp_path / "parts", *args, "--max_steps", 3) == 0
    assert run_cli(tmp_path / "parts", *args, "--resume_checkpoint", "latest") == 0
    for name in ("model000006.pt", "opt000006.pt"):
        whole, parts = load(tmp_path / "whole" / name), load(tmp_path / "parts" / name)
        if name.startswith("model"):
            assert whole.keys() == parts.keys()
            assert all(torch.equal(whole[k], parts[k]) for k in whole), name
        else:
            for i, st in whole["state"].items():
                assert all(torch.equal(st[k], parts["state"][i][k]) for k in st), (name, i)

    def rows(run):
        return [_comparable(json.loads(line)) for line in
                (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows("parts") == rows("whole")


def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, capsys):
    log_dir = tmp_path / "never"
    assert run_cli(log_dir, "--classifier_pool", "max") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff.classifier_train: error: --classifier_pool")
    assert not log_dir.exists()


def test_resume_of_another_classifier_is_refused(cli_run, tmp_path, capsys):
    """A DCP checkpoint of another width and a GD model file of another shape: one line,
    exit 2, and the new run folder is not left behind."""
    for source in (cli_run / "checkpoints" / "step_000004", cli_run / "model000004.pt"):
        log_dir = tmp_path / f"from_{source.name}"
        assert run_cli(log_dir, "--classifier_width", 64, "--iterations", 2,
                       "--resume_checkpoint", source) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastdiff.classifier_train: error: "), err
        assert "classifier_width" in err[0] or "shape" in err[0], err[0]
        assert not log_dir.exists()


def test_two_ranks_train_and_resume_on_one(tmp_path):
    """torchrun with 2 ranks (FSDP2, gloo on CPU), then 'latest' onto 1 rank."""
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastdiff.classifier_train"] + TINY + [
           "--log_dir", str(log_dir), "--iterations", "4", "--max_steps", "2",
           "--save_interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run_cli(log_dir, "--iterations", 4, "--save_interval", 2,
                   "--resume_checkpoint", "latest") == 0
    config = json.loads((log_dir / "config.json").read_text())
    kw = {k: config[k] for k in C.classifier_and_diffusion_defaults()}
    model, _ = C.create_classifier_and_diffusion(
        **kw, classifier_channel_mult=config["classifier_channel_mult"])
    two, four = load(log_dir / "model000002.pt"), load(log_dir / "model000004.pt")
    model.load_state_dict(two, strict=True)
    model.load_state_dict(four, strict=True)
    assert any(not torch.equal(two[k], four[k]) for k in two)
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all("val_loss" in r for r in rows)
