"""Golden fp16 loss-scale sequence from guided-diffusion's own TrainLoop (issue 17).

Why: fastdiff keeps GD's dynamic loss scaling (lg_loss_scale starts at 20, +fp16_scale_growth
per good step, −1 with the optimizer step and the EMA update skipped on overflow) although
its fp16 is autocast over fp32 weights, not GD's fp16 convs. The weights differ, so what is
compared is the sequence of lg_loss_scale values and which steps were skipped.

This runs GD's ``TrainLoop.run_step`` (``MixedPrecisionTrainer`` with ``use_fp16=True``:
GD's fp16 conv weights and fp32 flat master parameters, AdamW, ``update_ema``) on the CPU
for ``STEPS`` steps. fp16 convolutions run on the CPU in torch ≥ 2.x, so this is GD's real
fp16 path. Overflows are injected at ``OVERFLOW_STEPS`` by ``OverflowInjector``: a tensor
hook that puts an inf into one element of one parameter's gradient, which fastdiff's
Trainer can get identically. The model is small enough and its gradients small enough that
no step overflows on its own at 2**20 (the generator checks: exactly the injected steps
are skipped).

Recorded per step: the lg_loss_scale GD logs (``logkv_mean``, the value the step used), the
value after the step, and whether the step was skipped — the master parameters and every
EMA bitwise unchanged — or taken (every one of them changed).

Rerun (deterministic; rewrites tests/fixtures/gd_loss_scale.pt):

    python tools/gd_golden_loss_scale.py /path/to/guided-diffusion

The test (tests/test_gd_golden_loss_scale.py) imports this module for ``OverflowInjector``
and the synthetic weights without guided-diffusion: GD is imported only in ``main``.
"""
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_golden_unet  # noqa: E402  (synthetic_state_dict, pack_storages)

FIXTURE_PATH = os.path.normpath(os.path.join(gd_golden_unet.FIXTURE_DIR, "gd_loss_scale.pt"))

STEPS = 8
OVERFLOW_STEPS = (2, 4, 5)  # 0-based; 4 and 5 back to back: two halvings in a row
OVERFLOW_PARAM = "input_blocks.0.0.weight"  # the first conv: fp16 in GD's fp16 model
MODEL_OVERRIDES = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,1",
                       attention_resolutions="4", num_heads=1, diffusion_steps=50,
                       predict_xstart=True, use_fp16=True)
IMAGE_SCALE = 0.01   # the x_0 target, so the loss gradient, is this small
OUTPUT_SCALE = 0.01  # the output conv's weights and bias: so is the model's prediction
TRAIN = dict(batch_size=2, lr=1e-4, weight_decay=0.0, ema_rate="0.9,0.99",
             fp16_scale_growth=1e-3)
SEED = 5


class OverflowInjector:
    """Makes one gradient element inf on the steps in ``steps`` (set ``.step`` before each).

    A hook on the parameter itself, so it fires wherever autograd accumulates that
    parameter's gradient: GD's fp16 weight or fastdiff's fp32 weight under autocast.
    """

    def __init__(self, param, steps):
        self.steps = set(steps)
        self.step = None
        self.fired = []
        self.handle = param.register_hook(self._hook)

    def _hook(self, grad):
        if self.step not in self.steps:
            return None
        self.fired.append(self.step)
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad


def initial_state(shapes):
    """The synthetic weights of gd_golden_unet with the output conv scaled down."""
    state = gd_golden_unet.synthetic_state_dict(shapes)
    for key in ("out.2.weight", "out.2.bias"):
        state[key] = state[key] * OUTPUT_SCALE
    return state


def batches():
    """The training images of every step (stored in the fixture; GD and the test use them)."""
    gen = torch.Generator().manual_seed(SEED)
    size = MODEL_OVERRIDES["image_size"]
    shape = (STEPS, TRAIN["batch_size"], 3, size, size)
    return torch.randn(shape, generator=gen) * IMAGE_SCALE


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def step_outcome(before, after):
    """'taken' when every tensor changed, 'skipped' when none did, else 'mixed'."""
    changed = [not torch.equal(b, a) for b, a in zip(before, after)]
    if all(changed):
        return "taken"
    return "skipped" if not any(changed) else "mixed"


def _run_gd(gd_modules, kwargs, images):
    script_util, train_util, logger = gd_modules
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # GD's UniformSampler draws timesteps with np.random
    model, diffusion = script_util.create_model_and_diffusion(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(initial_state(shapes), strict=True)
    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=None, microbatch=-1, log_interval=1,
        save_interval=10**9, resume_checkpoint="", use_fp16=True, **TRAIN)
    assert next(model.input_blocks.parameters()).dtype == torch.float16, "GD's fp16 convs"
    injector = OverflowInjector(dict(model.named_parameters())[OVERFLOW_PARAM], OVERFLOW_STEPS)

    logged, after, outcomes = [], [], []
    for step in range(STEPS):
        injector.step = step
        state_before = snapshot(loop.mp_trainer.master_params) + \
            [t for ema in loop.ema_params for t in snapshot(ema)]
        loop.run_step(images[step], {})
        logged.append(float(logger.getkvs()["lg_loss_scale"]))
        logger.dumpkvs()
        after.append(float(loop.mp_trainer.lg_loss_scale))
        state_after = list(loop.mp_trainer.master_params) + \
            [t for ema in loop.ema_params for t in ema]
        outcomes.append(step_outcome(state_before, state_after))
    assert injector.fired == list(OVERFLOW_STEPS), injector.fired
    skipped = [o == "skipped" for o in outcomes]
    assert "mixed" not in outcomes, outcomes
    assert [s for s in range(STEPS) if skipped[s]] == list(OVERFLOW_STEPS), \
        f"GD skipped {outcomes}: a step overflowed on its own; make the model's gradients smaller"
    return logged, after, skipped


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    checkout = argv[1]
    from gd_checkout import gd_commit, import_guided_diffusion, init_single_process_group

    import_guided_diffusion(checkout)
    from guided_diffusion import logger, script_util, train_util

    init_single_process_group()
    logger.configure(dir=tempfile.mkdtemp(prefix="gd_loss_scale_"), format_strs=[])
    torch.use_deterministic_algorithms(True)

    kwargs = script_util.model_and_diffusion_defaults()
    kwargs.update(MODEL_OVERRIDES)
    images = batches()
    logged, after, skipped = _run_gd((script_util, train_util, logger), kwargs, images)
    fixture = {
        "gd_commit": gd_commit(checkout),
        "kwargs": kwargs,
        "train": dict(TRAIN),
        "steps": STEPS,
        "overflow_steps": list(OVERFLOW_STEPS),
        "overflow_param": OVERFLOW_PARAM,
        "images": images,
        "logged_lg_loss_scale": logged,
        "lg_loss_scale_after": after,
        "skipped": skipped,
    }
    torch.save(gd_golden_unet.pack_storages(fixture), FIXTURE_PATH)
    print(f"{FIXTURE_PATH}: {os.path.getsize(FIXTURE_PATH) / 1024:.0f} KiB")
    for step in range(STEPS):
        print(f"step {step}: logged {logged[step]!r} after {after[step]!r} "
              f"{'skipped' if skipped[step] else 'taken'}")


if __name__ == "__main__":
    main(sys.argv)
