"""fastdiff's Trainer against guided-diffusion's own TrainLoop (fixtures/gd_train_trajectory.pt).

Why: the Trainer reimplements GD's TrainLoop (microbatch gradient sum, AdamW with decoupled
weight decay, lr annealing, one EMA update per rate per step, GD's checkpoint files). These
tests replay the fixture's initial weights, data, timesteps and noise through the Trainer —
with the fused C++ optimizer (the default) and with torch's AdamW — and compare every step
with what GD's TrainLoop recorded, then check the GD-format exports, the exported AdamW state
in a plain ``torch.optim.AdamW``, and resuming from GD-format files.

The fixture is written by ``python tools/gd_golden_train.py /path/to/guided-diffusion``; its
docstring has the setup. Each quantity of each step is recorded as a probe (sampled elements,
per-tensor L2 norm and sum; see ``probe`` there): five full copies of the ~135k parameters
per step would not fit a small fixture.

Naming: GD names a checkpoint by the index of the step just taken (its file after the 6th
step is ``model000005.pt``); fastdiff names it by completed steps (``model000006.pt``).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import config as C
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import DistInfo

# The generator's timestep and noise injection, so both sides run the very same code.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gd_golden_train import RecordedTimesteps, inject_noise  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "gd_train_trajectory.pt"
OPTIMIZERS = ("fused", "torch")

# Every tolerance is relative to the compared tensor's scale (its RMS for elements, its L2
# norm for norms, its L1 norm for sums), so elements near zero demand no impossible precision.
#
# Weights and EMAs: fp32 AdamW on (nearly) equal gradients; the paths differ only in the order
# of floating-point operations (torch's AdamW reproduces GD bitwise here, the fused C++ op
# rounds differently). Measured after 7 steps: 2.4e-7 (fused), 0 (torch). 1e-5 is the issue's
# bound; a dropped weight-decay factor moves them by 9e-5 after one step, an lr off by one
# step by 1e-3 after three.
RTOL_WEIGHTS = 1e-5
# AdamW's moments are running means of gradients and their squares. From step 2 on, each
# gradient is taken at weights that already differ in the last bits (the fused path), and the
# backward pass amplifies that (most in the attention block): measured 5.6e-6 of a tensor's
# RMS for exp_avg and 4.8e-6 for exp_avg_sq. 5e-5 leaves room for the different conv/matmul
# summation orders of other CPUs, and is far below what a wrong beta (exp_avg_sq off ~10x at
# step 1) or microbatch losses averaged instead of summed (exp_avg halved, a change Adam's
# normalised update almost hides in the weights) change.
RTOL_MOMENTS = 5e-5
# Each microbatch's loss: one fp32 forward on weights equal to ~2e-7; measured 1.2e-7.
RTOL_LOSS = 1e-5


# --------------------------------------------------------------------------- the fixture
@pytest.fixture(scope="module")
def gd():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def build_model(gd, state_dict=None):
    """fastdiff's model on GD's initial weights (or ``state_dict``), with the fixture's
    structurally-zero gradient elements zeroed as the generator did in GD's model: the loss
    does not depend on them, so their gradient is rounding noise that Adam would turn into
    ±lr steps of arbitrary sign (see ``structurally_zero_gradient`` in the generator)."""
    model, diffusion = C.create_model_and_diffusion(**gd["model_and_diffusion"])
    model.load_state_dict(gd["initial_state"] if state_dict is None else state_dict, strict=True)
    params = dict(model.named_parameters())
    for name, idx in gd["zero_gradient_elements"].items():
        def hook(grad, idx=idx):
            grad = grad.clone()
            grad.view(-1)[idx] = 0
            return grad
        params[name].register_hook(hook)
    return model, diffusion


def microbatch_inputs(gd, first_step):
    """(timesteps, noises) per microbatch from step index ``first_step`` on."""
    m = gd["train"]["microbatch"]
    timesteps = [t for step in gd["timesteps"][first_step:] for t in step]
    noises = [step[i:i + m] for step in gd["noise"][first_step:]
              for i in range(0, step.shape[0], m)]
    return timesteps, noises


def make_trainer(gd, optimizer, log_dir, first_step=0):
    """A Trainer on the fixture's initial weights (``first_step`` 0) whose sampler and noise
    continue at step index ``first_step``; returns (trainer, per-microbatch losses list)."""
    model, diffusion = build_model(gd)
    timesteps, noises = microbatch_inputs(gd, first_step)
    losses = []
    inject_noise(diffusion, noises, losses)
    train = gd["train"]
    cfg = C.TrainConfig(batch_size=train["batch_size"], microbatch=train["microbatch"],
                        lr=train["lr"], weight_decay=train["weight_decay"],
                        lr_anneal_steps=train["lr_anneal_steps"], ema_rate=train["ema_rate"],
                        optimizer=optimizer, precision="fp32", log_interval=10**6,
                        save_interval=10**6, log_dir=str(log_dir), device="cpu")
    trainer = Trainer(model=model, diffusion=diffusion, data=None,
                      schedule_sampler=RecordedTimesteps(timesteps), cfg=cfg,
                      dist_info=DistInfo(device=torch.device("cpu")), log_dir=str(log_dir),
                      metrics_table=False)
    return trainer, losses


def take_step(trainer, gd):
    """One step of the Trainer's loop on the fixture's batch for its next step."""
    trainer.train_step(gd["batches"][trainer.step], {})
    trainer.step += 1  # the loop counts completed steps after train_step


def snapshot(trainer):
    """Full copies of everything a step changes (what the probes are compared with)."""
    states = trainer.optimizer.state_tensors()
    snap = {"params": [p.detach().clone() for p in trainer.params],
            "exp_avg": [s["exp_avg"].clone() for s in states],
            "exp_avg_sq": [s["exp_avg_sq"].clone() for s in states],
            "adam_steps": [float(s["step"]) for s in states]}
    for rate in trainer.ema_rates:
        snap[f"ema_{rate}"] = [e.detach().clone() for e in trainer.optimizer.get_ema(rate)]
    return snap


# ------------------------------------------------------------------------- comparisons
def assert_probe_close(tensors, recorded, gd, rtol, what):
    """``tensors`` (one per parameter) against a recorded probe: every sampled element within
    rtol × the tensor's RMS, each L2 norm within rtol relative, each sum within rtol × the
    tensor's L1 norm (a sum can cancel to ~0, its error cannot)."""
    names = gd["param_names"]
    assert len(tensors) == len(names)
    offset = 0
    for name, t, idx, norm, total in zip(names, tensors, gd["probe_indices"], recorded["norm"],
                                        recorded["sum"]):
        flat = t.detach().reshape(-1).double()
        expected = recorded["values"][offset:offset + idx.numel()].double()
        offset += idx.numel()
        scale = float(norm) / flat.numel() ** 0.5
        err = (flat[idx] - expected).abs().max().item()
        assert err <= rtol * scale, (f"{what} {name}: sampled elements differ by {err:.3g} "
                                     f"(tensor RMS {scale:.3g}, rtol {rtol})")
        assert abs(flat.norm().item() - float(norm)) <= rtol * float(norm), \
            f"{what} {name}: L2 norm {flat.norm().item():.8g} vs GD's {float(norm):.8g}"
        assert abs(flat.sum().item() - float(total)) <= rtol * flat.abs().sum().item(), \
            f"{what} {name}: sum {flat.sum().item():.8g} vs GD's {float(total):.8g}"
    assert offset == recorded["values"].numel()


def assert_state_matches_gd_step(state, gd, step, what):
    """Weights, both EMAs and AdamW's state after ``step`` completed steps equal GD's."""
    record = gd["steps"][step - 1]
    assert_probe_close(state["params"], record["params"], gd, RTOL_WEIGHTS,
                       f"{what}: step {step} parameter")
    for rate in gd["train"]["ema_rate"].split(","):
        assert_probe_close(state[f"ema_{float(rate)}"], record[f"ema_{float(rate)}"], gd,
                           RTOL_WEIGHTS, f"{what}: step {step} EMA {rate}")
    assert_probe_close(state["exp_avg"], record["exp_avg"], gd, RTOL_MOMENTS,
                       f"{what}: step {step} exp_avg")
    assert_probe_close(state["exp_avg_sq"], record["exp_avg_sq"], gd, RTOL_MOMENTS,
                       f"{what}: step {step} exp_avg_sq")
    assert state["adam_steps"] == [record["adam_step"]] * len(state["adam_steps"]), \
        f"{what}: AdamW step counts after step {step}"


# ------------------------------------------------------------------------------ the runs
SAVE_AFTER = (3, 6)


@pytest.fixture(scope="module", params=OPTIMIZERS)
def run(request, gd, tmp_path_factory):
    """All of the fixture's steps through a Trainer, saving after steps 3 and 6 as the loop
    does; per step the lr applied, the microbatch losses and a snapshot of the state."""
    log_dir = tmp_path_factory.mktemp(f"run_{request.param}")
    trainer, losses = make_trainer(gd, request.param, log_dir)
    steps = []
    for _ in range(len(gd["steps"])):
        start = len(losses)
        take_step(trainer, gd)
        steps.append({"lr": trainer.optimizer.opt.param_groups[0]["lr"],
                      "losses": losses[start:], "state": snapshot(trainer)})
        if trainer.step in SAVE_AFTER:
            trainer.save()
    return {"optimizer": request.param, "log_dir": log_dir, "steps": steps}


def test_every_step_matches_gd_trainloop(run, gd):
    """Losses, the lr applied, weights, both EMAs and AdamW's state after each of 7 steps."""
    for k, step in enumerate(run["steps"]):
        # Both compute lr·(1 − j/lr_anneal_steps) from the same integers: the same double.
        assert step["lr"] == pytest.approx(gd["lrs"][k], rel=1e-12, abs=0), \
            f"lr applied at step {k + 1}"
        assert step["losses"] == pytest.approx(gd["losses"][k].tolist(), rel=RTOL_LOSS), \
            f"microbatch losses at step {k + 1}"
        assert_state_matches_gd_step(step["state"], gd, k + 1, run["optimizer"])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("completed", SAVE_AFTER)
def test_gd_exports_equal_gd_save_files(run, gd, completed):
    """model/ema/opt files fastdiff writes after ``completed`` steps hold what GD's save()
    wrote after the same steps: same keys, same values, same AdamW hyper-parameters."""
    gd_info = gd["gd_files"][completed]
    # GD's name is the step index (completed − 1), fastdiff's the completed count.
    assert gd_info["names"]["model"] == f"model{completed - 1:06d}.pt"
    folder = run["log_dir"]
    names = {"model": f"model{completed:06d}.pt", "opt": f"opt{completed:06d}.pt"}
    names.update({r: f"ema_{r}_{completed:06d}.pt" for r in gd["train"]["ema_rate"].split(",")})
    for key, gd_name in gd_info["names"].items():  # GD's own naming, shifted by one
        assert names[key] == gd_name.replace(f"{completed - 1:06d}", f"{completed:06d}")

    record = gd["steps"][completed - 1]
    model_sd = load(folder / names["model"])
    assert list(model_sd) == gd_info["model_keys"]
    assert_probe_close(list(model_sd.values()), record["params"], gd, RTOL_WEIGHTS,
                       f"{names['model']}")
    for rate in gd["train"]["ema_rate"].split(","):
        ema_sd = load(folder / names[rate])
        assert list(ema_sd) == gd_info["model_keys"]
        assert_probe_close(list(ema_sd.values()), record[f"ema_{float(rate)}"], gd,
                           RTOL_WEIGHTS, names[rate])

    opt_sd = load(folder / names["opt"])
    group = opt_sd["param_groups"][0]
    for key, value in gd_info["opt_param_group"].items():
        assert group[key] == pytest.approx(value, rel=1e-12), f"{names['opt']} {key}"
    assert group["params"] == gd_info["opt_param_ids"]
    states = [opt_sd["state"][i] for i in group["params"]]
    assert [float(s["step"]) for s in states] == gd_info["opt_state_steps"]
    assert_probe_close([s["exp_avg"] for s in states], record["exp_avg"], gd, RTOL_MOMENTS,
                       f"{names['opt']} exp_avg")
    assert_probe_close([s["exp_avg_sq"] for s in states], record["exp_avg_sq"], gd,
                       RTOL_MOMENTS, f"{names['opt']} exp_avg_sq")


def test_exported_opt_continues_in_plain_adamw(run, gd):
    """opt000006.pt loads into a plain torch.optim.AdamW over a model loaded from
    model000006.pt, and one AdamW step on step 7's inputs gives the Trainer's step 7."""
    folder = run["log_dir"]
    model, diffusion = build_model(gd, state_dict=load(folder / "model000006.pt"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # the file sets them
    opt.load_state_dict(load(folder / "opt000006.pt"))
    assert opt.param_groups[0]["lr"] == pytest.approx(gd["lrs"][6], rel=1e-12)

    timesteps, noises = microbatch_inputs(gd, first_step=6)
    m = gd["train"]["microbatch"]
    batch = gd["batches"][6]
    opt.zero_grad()
    for i, (t, noise) in enumerate(zip(timesteps, noises)):  # GD: per-microbatch means, summed
        losses = diffusion.training_losses(model, batch[i * m:(i + 1) * m], t, noise=noise)
        losses["loss"].mean().backward()
    opt.step()

    trainer_step7 = run["steps"][6]["state"]
    for name, p, q in zip(gd["param_names"], model.parameters(), trainer_step7["params"]):
        scale = q.norm().item() / q.numel() ** 0.5
        err = (p.detach() - q).abs().max().item()
        assert err <= RTOL_WEIGHTS * scale, f"{name}: plain AdamW vs Trainer differ by {err:.3g}"
    for p, st in zip(model.parameters(), trainer_step7["adam_steps"]):
        assert float(opt.state[p]["step"]) == st == 7.0


def test_resume_from_fastdiff_export_reproduces_gd(run, gd, tmp_path):
    """A fresh Trainer resumed from model000003.pt (with the ema_*/opt files beside it) and
    run for steps 4-6 ends where GD's uninterrupted run was after step 6."""
    trainer, _ = make_trainer(gd, run["optimizer"], tmp_path, first_step=3)
    with torch.no_grad():  # so that nothing of the initial weights can pass for resumed ones
        for p in trainer.params:
            p.add_(1.0)
    trainer.resume(str(run["log_dir"] / "model000003.pt"))
    assert trainer.step == 3
    assert_state_matches_gd_step(snapshot(trainer), gd, 3, "resumed at 3")
    for _ in range(3):
        take_step(trainer, gd)
    assert_state_matches_gd_step(snapshot(trainer), gd, 6, "resumed at 3, after step 6")


def test_resume_from_file_gd_wrote(gd, tmp_path):
    """The files GD's save() wrote before its first step (model, EMAs, an AdamW state without
    moments), under GD's names, resume by value; the next step is GD's step 1."""
    info = gd["initial_gd_files"]["info"]
    for key, name in info["names"].items():
        content = gd["initial_gd_files"]["opt_state_dict"] if key == "opt" else gd["initial_state"]
        torch.save(content, tmp_path / name)
    trainer, losses = make_trainer(gd, "fused", tmp_path / "run")
    with torch.no_grad():  # start elsewhere: the resume must bring the weights back
        for p in trainer.params:
            p.mul_(-1.0)
        for rate in trainer.ema_rates:
            for e in trainer.optimizer.get_ema(rate):
                e.mul_(-1.0)
    trainer.resume(str(tmp_path / info["names"]["model"]))
    assert trainer.step == 0
    for name, p in zip(gd["param_names"], trainer.params):
        assert torch.equal(p.detach(), gd["initial_state"][name]), name
    for rate in trainer.ema_rates:
        for name, e in zip(gd["param_names"], trainer.optimizer.get_ema(rate)):
            assert torch.equal(e, gd["initial_state"][name]), f"EMA {rate} {name}"
    take_step(trainer, gd)
    assert losses == pytest.approx(gd["losses"][0].tolist(), rel=RTOL_LOSS)
    assert_state_matches_gd_step(snapshot(trainer), gd, 1, "resumed from GD's files")
