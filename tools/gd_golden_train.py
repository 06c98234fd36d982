"""Golden training trajectory from guided-diffusion's TrainLoop (tests/test_gd_golden_train.py).

Why: fastdiff's Trainer claims GD's TrainLoop semantics (microbatch gradient sum, AdamW with
decoupled weight decay, the lr annealing schedule, one EMA update per rate after every step,
GD's checkpoint files). This generator runs GD's TrainLoop itself, on the CPU in fp32, for 7
``run_step``s from a fixed initial state with fixed data, timesteps and noise, and records what
a faithful reimplementation must reproduce. The test replays the same inputs through
fastdiff's Trainer; CI needs no GD checkout.

Rerun (writes tests/fixtures/gd_train_trajectory.pt; same values on every run)::

    python tools/gd_golden_train.py /path/to/guided-diffusion

Setup: a tiny unconditional UNet (image_size 8, num_channels 8 × channel_mult 4 = 32
channels: GD's GroupNorm has 32 groups, so no level can have fewer than 32 channels), learned
sigmas (the hybrid mse + vb loss), 50 diffusion steps; batch 4 in microbatches of 2, lr 1e-3,
weight_decay 0.05, lr_anneal_steps 8 (the lr changes every step), ema_rate "0.9,0.99". Every
parameter is perturbed after GD's init (+0.05·randn), because GD zero-initialises output convs
and the whole model should train from step 1. Timesteps come from a sampler object that
returns the recorded t's (weights 1, as GD's UniformSampler gives); noise is passed to GD's
``diffusion.training_losses`` by wrapping it.

A few parameter elements do not affect the loss at all in this tiny UNet (see
:func:`structurally_zero_gradient`): their gradient is rounding noise (~1e-9), which Adam
divides by its own square root and turns into steps of ±lr whose signs no two
implementations share. Both GD here and fastdiff in the test zero those gradient elements
with a hook (the elements are recorded), so they only decay (weight decay) and stay
comparable; every other element trains.

What is recorded (the model has ~135k parameters: five full fp32 copies per step would be
~19 MB, so per step each quantity is recorded as a *probe* — see :func:`probe`):

* the initial state_dict in full; data, timesteps and noise of every step;
* per step: the lr GD used, each microbatch's loss, and probes of the parameters, both EMAs
  and AdamW's exp_avg / exp_avg_sq, plus AdamW's step count;
* GD's ``save()`` files: written before the first step (the initial weights: model, EMAs and
  an AdamW state without moments), after the 3rd step (GD's name ``000002``) and after the 6th
  (``000005``). The generator asserts that every tensor in those files equals the live tensor
  bitwise, so the live probes stand for the files; it records the file names, the keys, the
  AdamW param_groups and the per-parameter step counts. The pre-training files are stored
  whole (they are the initial state), so the test can resume from a file GD wrote.
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gd_checkout import gd_commit, import_guided_diffusion, init_single_process_group  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                       "fixtures", "gd_train_trajectory.pt")

MODEL_OVERRIDES = dict(image_size=8, num_channels=8, channel_mult="4", num_res_blocks=1,
                       attention_resolutions="4", num_heads=1, learn_sigma=True,
                       diffusion_steps=50)
TRAIN = dict(batch_size=4, microbatch=2, lr=1e-3, weight_decay=0.05, lr_anneal_steps=8,
             ema_rate="0.9,0.99")
NUM_STEPS = 7          # 6 for the trajectory, a 7th for the exported-AdamW check
SAVE_AFTER = (3, 6)    # completed steps after which GD's save() runs
PROBE_ELEMENTS = 16    # sampled elements per tensor (first and last included)
PERTURB_STD = 0.05


def probe_indices(numel, count=PROBE_ELEMENTS):
    """Evenly spaced flat indices into a tensor of ``numel`` elements, first and last included
    (all of them when it has at most ``count``): the ends are where a vectorised kernel's
    tail handling goes wrong."""
    if numel <= count:
        return torch.arange(numel)
    return torch.linspace(0, numel - 1, count, dtype=torch.float64).round().long()


def probe(tensors, indices):
    """A compact record of a list of tensors: the sampled elements of each (concatenated) and
    each tensor's L2 norm and sum (computed in float64, stored fp32). The norm and the sum see
    every element, the samples see individual positions."""
    flat = [t.detach().reshape(-1) for t in tensors]
    return {
        "values": torch.cat([f[i] for f, i in zip(flat, indices)]).float().clone(),
        "norm": torch.stack([f.double().norm() for f in flat]).float(),
        "sum": torch.stack([f.double().sum() for f in flat]).float(),
    }


class RecordedTimesteps:
    """A schedule sampler that hands out fixed timesteps, one microbatch after the other."""

    def __init__(self, timesteps):
        self._queue = list(timesteps)

    def sample(self, batch_size, device):
        t = self._queue.pop(0)
        assert t.shape[0] == batch_size
        return t.to(device), torch.ones(batch_size, device=device)


def inject_noise(diffusion, noises, losses_out):
    """Make ``diffusion.training_losses`` use the recorded noise (one per call, in order) and
    append each microbatch's mean loss to ``losses_out``."""
    original = diffusion.training_losses
    queue = list(noises)

    def training_losses(model, x_start, t, model_kwargs=None):
        losses = original(model, x_start, t, model_kwargs=model_kwargs, noise=queue.pop(0))
        losses_out.append(losses["loss"].detach().mean().item())
        return losses

    diffusion.training_losses = training_losses


def make_inputs(generator):
    """Images in [-1, 1], per-microbatch timesteps and noise for every step."""
    b, m = TRAIN["batch_size"], TRAIN["microbatch"]
    shape = (NUM_STEPS, b, 3, MODEL_OVERRIDES["image_size"], MODEL_OVERRIDES["image_size"])
    batches = torch.rand(shape, generator=generator) * 2 - 1
    timesteps = torch.randint(0, MODEL_OVERRIDES["diffusion_steps"], (NUM_STEPS, b // m, m),
                              generator=generator)
    # The ends of the schedule take their own branches (t = 0: the decoder NLL in the vb term).
    timesteps[0, 0, 0] = 0
    timesteps[1, 1, 1] = MODEL_OVERRIDES["diffusion_steps"] - 1
    noise = torch.randn(shape, generator=generator)
    return batches, timesteps, noise


def structurally_zero_gradient(model):
    """{parameter name: flat indices} of elements the loss cannot depend on, in this config:

    * every ResBlock's ``in_layers.2.bias``: the conv's per-channel bias is followed by the
      ``out_layers`` GroupNorm, which with 32 channels in 32 groups subtracts each channel's
      own mean (with use_scale_shift_norm the timestep embedding enters after that norm);
    * the last output block's ``out_layers.3.bias`` and ``skip_connection.bias``: their sum
      reaches the final GroupNorm (again one channel per group) unchanged;
    * the key part of the attention's ``qkv.bias`` (one head, GD's legacy q|k|v order):
      a query's logits all shift by the same q·b_k, and softmax ignores that.
    """
    names = [n for n, _ in model.named_parameters()]
    last = max(int(n.split(".")[1]) for n in names if n.startswith("output_blocks."))
    whole = {f"output_blocks.{last}.0.out_layers.3.bias",
             f"output_blocks.{last}.0.skip_connection.bias"}
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("in_layers.2.bias") or name in whole:
            masks[name] = torch.arange(p.numel())
        elif name.endswith("qkv.bias"):
            channels = p.numel() // 3
            masks[name] = torch.arange(channels, 2 * channels)
    return masks


def zero_gradient_elements(model, masks):
    """Hooks that set the gradient of the ``masks`` elements to exactly 0."""
    params = dict(model.named_parameters())
    for name, idx in masks.items():
        def hook(grad, idx=idx):
            grad = grad.clone()
            grad.view(-1)[idx] = 0
            return grad
        params[name].register_hook(hook)


def check_masks_are_rounding_noise(model, diffusion, masks, x, t, noise):
    """The masked elements' gradients are rounding noise (|g| < 1e-8; the others' RMS is
    ≥ 3e-4 here): the rule in structurally_zero_gradient holds for this model."""
    model.zero_grad()
    diffusion.training_losses(model, x, t, noise=noise)["loss"].mean().backward()
    params = dict(model.named_parameters())
    for name, idx in masks.items():
        worst = params[name].grad.reshape(-1)[idx].abs().max().item()
        assert worst < 1e-8, f"{name}: gradient {worst:.3g} is not rounding noise"
    model.zero_grad(set_to_none=True)


def build_gd_model(gd):
    su = gd.script_util
    kwargs = su.model_and_diffusion_defaults()
    kwargs.update(MODEL_OVERRIDES)
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**kwargs)
    perturb = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PERTURB_STD * torch.randn(p.shape, generator=perturb))
    return model, diffusion, kwargs


def read_gd_files(folder, loop, ema_rates):
    """Load the files GD's save() just wrote, check them against the live tensors bitwise,
    delete them and return what the test needs to know about them."""
    step_name = f"{loop.step + loop.resume_step:06d}"
    names = {"model": f"model{step_name}.pt", "opt": f"opt{step_name}.pt"}
    names.update({str(r): f"ema_{r}_{step_name}.pt" for r in ema_rates})
    assert sorted(os.listdir(folder)) == sorted(names.values()), os.listdir(folder)
    files = {k: torch.load(os.path.join(folder, n), map_location="cpu", weights_only=True)
             for k, n in names.items()}
    live = {"model": [p.detach() for p in loop.model.parameters()]}
    live.update({str(r): ema for r, ema in zip(ema_rates, loop.ema_params)})
    param_names = [n for n, _ in loop.model.named_parameters()]
    for key, tensors in live.items():
        assert list(files[key]) == param_names, f"{names[key]}: keys differ from the model's"
        for name, t in zip(param_names, tensors):
            assert torch.equal(files[key][name], t), f"{names[key]}[{name}] != live tensor"
    params = list(loop.model.parameters())
    opt = files["opt"]
    for pid, p in enumerate(params):
        st = opt["state"].get(pid)
        if st is not None:
            live_st = loop.opt.state[p]
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(st[k], live_st[k]), f"opt[{pid}][{k}] != live state"
    for n in names.values():
        os.remove(os.path.join(folder, n))
    group = {k: v for k, v in opt["param_groups"][0].items() if k != "params"}
    return files, {
        "names": names,
        "model_keys": list(files["model"]),
        "opt_param_group": {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")},
        "opt_param_ids": list(opt["param_groups"][0]["params"]),
        "opt_state_steps": [float(opt["state"][i]["step"]) if i in opt["state"] else None
                            for i in range(len(params))],
    }


def run(checkout):
    torch.set_num_threads(1)  # bitwise-reproducible reductions: rerunning gives the same fixture
    gd = import_guided_diffusion(checkout)
    init_single_process_group()
    log_dir = tempfile.mkdtemp(prefix="gd_golden_train_")
    gd.logger.configure(dir=log_dir, format_strs=[])
    try:
        return _run(gd, log_dir, checkout)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _run(gd, log_dir, checkout):
    model, diffusion, model_kwargs = build_gd_model(gd)
    param_names = [n for n, _ in model.named_parameters()]
    assert list(model.state_dict()) == param_names, "the UNet has buffers: store them too"
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    indices = [probe_indices(p.numel()) for p in model.parameters()]

    batches, timesteps, noise = make_inputs(torch.Generator().manual_seed(2))
    m = TRAIN["microbatch"]
    masks = structurally_zero_gradient(model)
    check_masks_are_rounding_noise(model, diffusion, masks, batches[0, :m], timesteps[0, 0],
                                   noise[0, :m])
    zero_gradient_elements(model, masks)
    micro_noise = [noise[k, i:i + m] for k in range(NUM_STEPS)
                   for i in range(0, TRAIN["batch_size"], m)]
    micro_losses = []
    inject_noise(diffusion, micro_noise, micro_losses)
    loop = gd.train_util.TrainLoop(
        model=model, diffusion=diffusion, data=None, log_interval=10**6, save_interval=10**6,
        resume_checkpoint="", schedule_sampler=RecordedTimesteps(timesteps.reshape(-1, m)),
        **TRAIN)
    ema_rates = loop.ema_rate

    # GD's save() before any step: GD-format files holding the initial state.
    loop.save()
    initial_files, initial_info = read_gd_files(log_dir, loop, ema_rates)
    assert all(s is None for s in initial_info["opt_state_steps"])

    steps, lrs, gd_files = [], [], {}
    for k in range(NUM_STEPS):
        lrs.append(loop.opt.param_groups[0]["lr"])
        loop.run_step(batches[k], {})
        params = list(loop.model.parameters())
        record = {"params": probe(params, indices),
                  "exp_avg": probe([loop.opt.state[p]["exp_avg"] for p in params], indices),
                  "exp_avg_sq": probe([loop.opt.state[p]["exp_avg_sq"] for p in params], indices),
                  "adam_step": float(loop.opt.state[params[0]]["step"])}
        for rate, ema in zip(ema_rates, loop.ema_params):
            record[f"ema_{rate}"] = probe(ema, indices)
        steps.append(record)
        if k + 1 in SAVE_AFTER:
            loop.save()
            gd_files[k + 1] = read_gd_files(log_dir, loop, ema_rates)[1]
        loop.step += 1  # GD's run_loop: after run_step and save

    return {
        "gd_commit": gd_commit(checkout),
        "generator": "tools/gd_golden_train.py",
        "model_and_diffusion": model_kwargs,
        "train": dict(TRAIN),
        "param_names": param_names,
        "initial_state": initial_state,
        "initial_gd_files": {"info": initial_info,
                             "opt_state_dict": initial_files["opt"]},
        "batches": batches,
        "timesteps": timesteps,
        "noise": noise,
        "lrs": lrs,
        "losses": torch.tensor(micro_losses, dtype=torch.float32).reshape(NUM_STEPS, -1),
        "probe_indices": indices,
        "zero_gradient_elements": masks,
        "steps": steps,
        "gd_files": gd_files,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="path to a guided-diffusion checkout")
    parser.add_argument("--out", default=FIXTURE)
    args = parser.parse_args()
    fixture = run(args.checkout)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {os.path.normpath(args.out)} ({os.path.getsize(args.out) / 1e3:.0f} kB, "
          f"GD {fixture['gd_commit']})")


if __name__ == "__main__":
    main()
