"""Golden trajectory of guided-diffusion's classifier_train.py (tests/test_classifier_train.py).

Why: ``python -m fastdiff.classifier_train`` claims the step of GD's scripts/classifier_train.py
(whole-batch ``q_sample`` at sampled timesteps, cross-entropy per microbatch weighted by
``len(micro) / len(batch)`` so the gradient is the batch mean's, ``set_annealed_lr`` before
each step, AdamW through GD's MixedPrecisionTrainer, GD's opt file). This generator runs that
step with GD's own pieces — its EncoderUNetModel, diffusion, MixedPrecisionTrainer and the
script's ``split_microbatches``, ``compute_top_k`` and ``set_annealed_lr`` (the script module
itself is imported; only the loop body of its ``main()``, a closure, is spelled out here in
the same order) — on the CPU in fp32 for 5 steps with fixed images, labels, timesteps and
noise, and records what a faithful reimplementation must reproduce. CI needs no GD checkout.

Rerun (writes tests/fixtures/gd_classifier_train.pt; same values on every run)::

    python tools/gd_golden_classifier_train.py /path/to/guided-diffusion

Setup: GD's EncoderUNetModel as GD's ``create_classifier`` builds it (num_head_channels 64,
scale-shift norm, resblock up/down, attention pool) at image_size 8 with channel_mult (1, 2)
(fastdiff's ``classifier_channel_mult``; GD's factory only knows 64..512) and 10 outputs
(GD's factory: 1000; fewer keep the fixture small, the loop is the same); width 32 (GD's
GroupNorm has 32 groups), depth 1, attention at 4 px, 50 cosine diffusion steps. Batch 5 in
microbatches of 3 (3 + 2: unequal shares of the batch mean), lr 1e-3, weight_decay 0.05,
anneal_lr over 6 iterations (every step has its own lr). The initial weights are not GD's
random init but :func:`synthetic_initial_state` (a function of the names and shapes only, so
the fixture does not carry 380k weights and every parameter, zero-initialised output convs
included, trains from step 1). Gradient elements that are rounding noise are zeroed on both
sides (:func:`rounding_noise_gradients`; recorded).

Recorded: the state_dict's keys and shapes, images/labels/timesteps/noise per step, the lr of
each step, each microbatch's loss and top-1/top-5 hits, and after every step probes of the
parameters and AdamW's moments (sampled elements, L2 norm and sum per tensor; see
``probe`` in tools/gd_golden_train.py) and AdamW's step count; GD's opt file after the last
step (its param_groups).
"""
import argparse
import importlib.util
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gd_checkout import gd_commit, import_guided_diffusion, init_single_process_group  # noqa: E402
from gd_golden_train import probe, probe_indices, zero_gradient_elements  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                       "fixtures", "gd_classifier_train.pt")

# fastdiff's flags for this model (the test builds it with C.create_classifier_and_diffusion
# and then swaps the head for NUM_OUTPUTS classes, as GD's EncoderUNetModel is built here).
CLASSIFIER = dict(image_size=8, classifier_use_fp16=False, classifier_width=32,
                  classifier_depth=1, classifier_attention_resolutions="4",
                  classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                  classifier_pool="attention", classifier_channel_mult="1,2")
DIFFUSION = dict(learn_sigma=False, diffusion_steps=50, noise_schedule="cosine",
                 timestep_respacing="", use_kl=False, predict_xstart=False,
                 rescale_timesteps=False, rescale_learned_sigmas=False)
NUM_OUTPUTS = 10
TRAIN = dict(batch_size=5, microbatch=3, lr=1e-3, weight_decay=0.05, anneal_lr=True,
             iterations=6)
NUM_STEPS = 5


def synthetic_initial_state(named_shapes):
    """Deterministic weights from names and shapes: GroupNorm gains 1 + 0.05·N(0,1), biases
    0.05·N(0,1), matrices and kernels N(0,1)/sqrt(fan_in). Tensor k draws from seed k."""
    state = {}
    for k, (name, shape) in enumerate(named_shapes):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + k))
        if len(shape) == 1 and name.endswith(".weight"):
            state[name] = 1 + 0.05 * noise
        elif len(shape) == 1:
            state[name] = 0.05 * noise
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = noise / fan_in ** 0.5
    return state


# A gradient element below this is rounding noise of a loss that does not depend on it (the
# others are above 1e-5 here); see rounding_noise_gradients.
ROUNDING_NOISE = 1e-8


def rounding_noise_gradients(model, diffusion, x, y, t, noise):
    """{parameter name: flat indices} of elements whose gradient at the initial state is
    rounding noise: the loss cannot depend on them. In this model: ResBlock conv biases
    before a GroupNorm of one channel per group (the 32-channel level) and the key part of
    every one-head qkv bias (softmax ignores a shift shared by a query's logits). Adam would
    turn their ~1e-10 gradients into ±lr steps of arbitrary sign, so both GD here and
    fastdiff in the test zero them (they then only decay) and every other element trains."""
    model.zero_grad()
    logits = model(diffusion.q_sample(x, t, noise=noise), t)
    F.cross_entropy(logits, y).backward()
    masks = {}
    for name, p in model.named_parameters():
        idx = (p.grad.reshape(-1).abs() < ROUNDING_NOISE).nonzero().reshape(-1)
        if idx.numel():
            masks[name] = idx
    model.zero_grad(set_to_none=True)
    return masks


def make_inputs():
    g = torch.Generator().manual_seed(0)
    b, s = TRAIN["batch_size"], CLASSIFIER["image_size"]
    images = torch.rand(NUM_STEPS, b, 3, s, s, generator=g) * 2 - 1
    labels = torch.randint(0, NUM_OUTPUTS, (NUM_STEPS, b), generator=g)
    timesteps = torch.randint(0, DIFFUSION["diffusion_steps"], (NUM_STEPS, b), generator=g)
    timesteps[0, 0] = 0  # both ends of the schedule
    timesteps[1, -1] = DIFFUSION["diffusion_steps"] - 1
    noise = torch.randn(NUM_STEPS, b, 3, s, s, generator=g)
    return images, labels, timesteps, noise


def import_script(checkout):
    """GD's scripts/classifier_train.py as a module (its main() is not run)."""
    path = os.path.join(checkout, "scripts", "classifier_train.py")
    spec = importlib.util.spec_from_file_location("gd_classifier_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_gd_classifier(checkout):
    from guided_diffusion import script_util
    from guided_diffusion.unet import EncoderUNetModel
    s = CLASSIFIER["image_size"]
    attention_ds = tuple(s // int(r) for r in CLASSIFIER["classifier_attention_resolutions"].split(","))
    model = EncoderUNetModel(  # GD's create_classifier's arguments, but channel_mult/outputs
        image_size=s, in_channels=3, model_channels=CLASSIFIER["classifier_width"],
        out_channels=NUM_OUTPUTS, num_res_blocks=CLASSIFIER["classifier_depth"],
        attention_resolutions=attention_ds,
        channel_mult=tuple(int(c) for c in CLASSIFIER["classifier_channel_mult"].split(",")),
        use_fp16=False, num_head_channels=64,
        use_scale_shift_norm=CLASSIFIER["classifier_use_scale_shift_norm"],
        resblock_updown=CLASSIFIER["classifier_resblock_updown"],
        pool=CLASSIFIER["classifier_pool"])
    diffusion = script_util.create_gaussian_diffusion(
        steps=DIFFUSION["diffusion_steps"], learn_sigma=False,
        noise_schedule=DIFFUSION["noise_schedule"], use_kl=False, predict_xstart=False,
        rescale_timesteps=False, rescale_learned_sigmas=False, timestep_respacing="")
    return model, diffusion


def run(checkout):
    import_guided_diffusion(checkout)
    init_single_process_group()
    with tempfile.TemporaryDirectory() as folder:
        from guided_diffusion import logger
        logger.configure(dir=folder)  # GD's MixedPrecisionTrainer logs its norms there
        return _run(checkout, folder)


def _run(checkout, folder):
    script = import_script(checkout)
    from guided_diffusion.fp16_util import MixedPrecisionTrainer
    torch.manual_seed(0)
    model, diffusion = build_gd_classifier(checkout)
    named_shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(synthetic_initial_state(named_shapes), strict=True)
    mp_trainer = MixedPrecisionTrainer(model=model, use_fp16=False, initial_lg_loss_scale=16.0)
    opt = torch.optim.AdamW(mp_trainer.master_params, lr=TRAIN["lr"],
                            weight_decay=TRAIN["weight_decay"])
    images, labels, timesteps, noise = make_inputs()
    masks = rounding_noise_gradients(model, diffusion, images[0], labels[0], timesteps[0],
                                     noise[0])
    zero_gradient_elements(model, masks)
    params = list(model.parameters())
    indices = [probe_indices(p.numel()) for p in params]
    lrs, losses, hits1, hits5, steps = [], [], [], [], []
    for step in range(NUM_STEPS):
        # classifier_train.py's main loop and forward_backward_log, with the recorded t and
        # noise in place of schedule_sampler.sample and q_sample's randn_like.
        if TRAIN["anneal_lr"]:
            script.set_annealed_lr(opt, TRAIN["lr"], step / TRAIN["iterations"])
        lrs.append(opt.param_groups[0]["lr"])
        batch, y, t = images[step], labels[step], timesteps[step]
        batch = diffusion.q_sample(batch, t, noise=noise[step])
        step_losses, step_hits1, step_hits5 = [], [], []
        for i, (sub_batch, sub_labels, sub_t) in enumerate(
                script.split_microbatches(TRAIN["microbatch"], batch, y, t)):
            logits = model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")
            step_hits1.append(script.compute_top_k(logits, sub_labels, k=1, reduction="none"))
            step_hits5.append(script.compute_top_k(logits, sub_labels, k=5, reduction="none"))
            loss = loss.mean()
            step_losses.append(loss.item())
            if i == 0:
                mp_trainer.zero_grad()
            mp_trainer.backward(loss * len(sub_batch) / len(batch))
        mp_trainer.optimize(opt)
        losses.append(torch.tensor(step_losses))
        hits1.append(torch.cat(step_hits1))
        hits5.append(torch.cat(step_hits5))
        states = [opt.state[p] for p in params]
        steps.append({
            "params": probe(params, indices),
            "exp_avg": probe([s["exp_avg"] for s in states], indices),
            "exp_avg_sq": probe([s["exp_avg_sq"] for s in states], indices),
            "adam_step": float(states[0]["step"]),
        })
    script.save_model(mp_trainer, opt, NUM_STEPS - 1)  # GD's name: the last step's index
    opt_file = torch.load(os.path.join(folder, f"opt{NUM_STEPS - 1:06d}.pt"), weights_only=False)
    model_file = torch.load(os.path.join(folder, f"model{NUM_STEPS - 1:06d}.pt"),
                            weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(model_file[k], v), f"GD's model file differs from the live {k}"
    group = {k: v for k, v in opt_file["param_groups"][0].items() if k != "params"}
    return {
        "gd_commit": gd_commit(checkout),
        "classifier": CLASSIFIER, "diffusion": DIFFUSION, "num_outputs": NUM_OUTPUTS,
        "train": TRAIN,
        "state_dict_shapes": named_shapes,
        "param_names": [n for n, _ in model.named_parameters()],
        "zero_gradient_elements": masks,
        "probe_indices": indices,
        "images": images, "labels": labels, "timesteps": timesteps, "noise": noise,
        "lrs": torch.tensor(lrs, dtype=torch.float64),
        "losses": losses, "hits1": hits1, "hits5": hits5, "steps": steps,
        "opt_file_lr": float(group["lr"]), "opt_file_weight_decay": float(group["weight_decay"]),
        "opt_file_num_params": len(opt_file["param_groups"][0]["params"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="path to a guided-diffusion checkout")
    parser.add_argument("--out", default=FIXTURE)
    args = parser.parse_args()
    fixture = run(args.checkout)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB), GD {fixture['gd_commit']}")


if __name__ == "__main__":
    main()
