"""Golden references from guided-diffusion for its noisy-image classifier, its super-resolution
UNet and one classifier-guided sampling step of each sampler (issue 15).

Why: fastdiff's ``EncoderUNetModel`` and ``SuperResModel`` claim GD's module tree, state_dict
and arithmetic, and its samplers GD's classifier guidance. These fixtures pin that claim to
GD's own numbers on CI, where GD is not installed. The scheme is tools/gd_golden_unet.py's,
whose helpers this module imports: a state_dict is a pure hash of its key names and shapes
(the fixture keeps keys, shapes and fingerprints, not values), a gradient is stored whole
when small, else as fixed samples plus whole-tensor summaries, and tensors are packed into
one storage per dtype.

Model fixtures (``CLASSIFIER_CONFIGS`` → tests/fixtures/gd_classifier_<name>.pt,
``SUPER_RES_CONFIGS`` → gd_super_res_<name>.pt). GD's model is built on the CPU in fp32 by
GD's factory (``create_classifier``, ``sr_create_model``: image sizes 64+ only) or, for the
small configs, by GD's class with the same arguments fastdiff's class takes. Recorded:

* the output of ``model(x, t)`` (super-res: ``model(x, t, low_res, y)``) and the gradients of
  ``(output * out_weights).sum()`` w.r.t. every parameter, ``x`` and ``low_res`` (summarised
  like the parameters' when large). ``x``, ``low_res`` and ``out_weights`` come from the same
  integer hash as the weights (bitwise on every machine), so only their fingerprints are
  stored; ``t`` and ``y`` are stored;
* classifiers also the guidance gradient ``d/dx sum_i log_softmax(model(x, t))[i, y_i]``
  (GD's cond_fn before its scale), the quantity classifier guidance needs.

Guided steps (``GUIDED`` → gd_classifier_guided_steps.pt): a tiny class-conditional GD UNet
with learned sigma and a GD attention-pool classifier, GD's cond_fn as
scripts/classifier_sample.py defines it (``make_cond_fn``), one ``p_sample`` step of a 50-step
diffusion respaced to "10" (uneven strides) and one ``ddim_sample`` step respaced to "ddim10";
recorded: the sample and pred_xstart, and every call of the classifier (its timesteps, which
are GD's respacing map, and the guidance gradient it produced).

Rerun (deterministic; rewrites those fixtures):

    python tools/gd_golden_classifier.py /path/to/guided-diffusion

The tests import this module for its configs and helpers without guided-diffusion: GD is
imported only in ``main``.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_golden_unet as unet_golden  # noqa: E402

FIXTURE_DIR = unet_golden.FIXTURE_DIR
NUM_CLASSES = 1000  # GD's classifiers and class-conditional models

# GD's create_classifier keywords (classifier_defaults) with small sizes; 64 is the smallest
# image size its factory accepts (channel_mult (1, 2, 3, 4)). Widths stay multiples of 32
# (GroupNorm32) and attention sits where the width is a multiple of GD's 64 head channels.
_GD_CLASSIFIER_64 = dict(image_size=64, classifier_use_fp16=False, classifier_width=32,
                         classifier_depth=1)

CLASSIFIER_CONFIGS = {
    # GD's default head (adaptive), ResBlock downsampling, FiLM; attention at 32 and 8.
    "adaptive_updown_scale_shift": dict(
        factory="create_classifier", batch=2, timesteps=[0, 731], kwargs=dict(
            _GD_CLASSIFIER_64, classifier_attention_resolutions="32,8",
            classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
            classifier_pool="adaptive")),
    # CLIP attention pooling over 8x8 + 1 tokens (odd length), conv downsampling, no FiLM.
    "attention_pool": dict(
        factory="create_classifier", batch=2, timesteps=[17, 999], kwargs=dict(
            _GD_CLASSIFIER_64, classifier_attention_resolutions="8",
            classifier_use_scale_shift_norm=False, classifier_resblock_updown=False,
            classifier_pool="attention")),
    # MLP over every block's spatial mean (ReLU), ResBlock downsampling.
    "spatial_updown": dict(
        factory="create_classifier", batch=2, timesteps=[250, 3], kwargs=dict(
            _GD_CLASSIFIER_64, classifier_attention_resolutions="8",
            classifier_use_scale_shift_norm=False, classifier_resblock_updown=True,
            classifier_pool="spatial")),
    # The same with GroupNorm32 over a [N, 2048] vector and SiLU; FiLM; fractional timesteps
    # (rescale_timesteps feeds the classifier floats).
    "spatial_v2_scale_shift": dict(
        factory="create_classifier", batch=2, timesteps=[12.5, 600.0], kwargs=dict(
            _GD_CLASSIFIER_64, classifier_attention_resolutions="32",
            classifier_use_scale_shift_norm=True, classifier_resblock_updown=False,
            classifier_pool="spatial_v2")),
    # GD's class itself, small: 16x16, (q,k,v)-first attention with 32-channel heads at both
    # levels, attention pooling with 2 heads over 8x8 + 1 tokens, 10 classes.
    "encoder_16_new_order": dict(
        factory="EncoderUNetModel", batch=3, timesteps=[1, 40, 999], kwargs=dict(
            image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
            attention_resolutions=(1, 2), channel_mult=(1, 2), num_head_channels=32,
            use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
            pool="attention")),
}

SUPER_RES_CONFIGS = {
    # GD's factory (64 is its smallest large_size: channel_mult (1, 2, 3, 4)): classes,
    # learned sigma, FiLM, ResBlock up/down, attention at 8x8; low_res 16x16 (4x).
    "sr_64_class_sigma": dict(
        factory="sr_create_model", batch=2, timesteps=[3, 870], kwargs=dict(
            large_size=64, small_size=16, num_channels=32, num_res_blocks=1, learn_sigma=True,
            class_cond=True, use_checkpoint=False, attention_resolutions="8", num_heads=2,
            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
            dropout=0.0, resblock_updown=True, use_fp16=False)),
    # GD's class directly: 32x32 from 12x12 (a non-integer ratio pins bilinear's
    # align_corners and the output-size argument), new attention order, no FiLM.
    "sr_32_from_12": dict(
        factory="SuperResModel", batch=2, timesteps=[0, 499], small_size=12, kwargs=dict(
            image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
            use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=True)),
}

# The guided-step case: every flag GD's create_model_and_diffusion takes (a tiny UNet), the
# classifier as GD's class (GD's factory has no 16x16 default) and, for fastdiff, as its
# create_classifier flags with classifier_channel_mult.
GUIDED = dict(
    model_kwargs=dict(
        image_size=16, num_channels=32, num_res_blocks=1, num_heads=2, num_heads_upsample=-1,
        num_head_channels=-1, attention_resolutions="16", channel_mult="1", dropout=0.0,
        class_cond=True, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
        use_fp16=False, use_new_attention_order=False, learn_sigma=True, diffusion_steps=50,
        noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
        rescale_timesteps=False, rescale_learned_sigmas=True),
    classifier_gd_kwargs=dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=NUM_CLASSES,
        num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention"),
    classifier_flags=dict(
        image_size=16, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention",
        classifier_channel_mult="1,2"),
    # Large enough that dropping the guidance moves the p_sample step by ~1e-2 (the guard
    # test checks it), small enough that the step stays a sampling step.
    classifier_scale=30.0,
    labels=[3, 871],
    steps={
        "p_sample": dict(respacing="10", index=6, seed=31),
        "ddim_sample": dict(respacing="ddim10", index=6, seed=32, eta=0.0),
    },
)


def fixture_path(kind, name):
    """kind "classifier" or "super_res"."""
    return os.path.normpath(os.path.join(FIXTURE_DIR, f"gd_{kind}_{name}.pt"))


GUIDED_FIXTURE = os.path.normpath(os.path.join(FIXTURE_DIR, "gd_classifier_guided_steps.pt"))


# ------------------------------------------------------------------ shared with the tests
def image_size(spec):
    return spec["kwargs"].get("image_size", spec["kwargs"].get("large_size"))


def low_res_size(spec):
    return spec.get("small_size", spec["kwargs"].get("small_size"))


def num_outputs(kind, spec):
    """Logits of a classifier; output channels of a super-res model."""
    kw = spec["kwargs"]
    if kind == "classifier":
        return kw.get("out_channels", NUM_CLASSES)
    if "out_channels" in kw:
        return kw["out_channels"]
    return 6 if kw["learn_sigma"] else 3


def class_conditional(spec):
    return bool(spec["kwargs"].get("class_cond") or spec["kwargs"].get("num_classes"))


def _hash_normalish(shape, salt_name):
    """Unit-variance values from gd_golden_unet's integer hash: bitwise the same on every
    machine, so the big input tensors need not be stored (the fixture keeps fingerprints)."""
    n = 1
    for s in shape:
        n *= s
    return unet_golden.hash_uniform(n, unet_golden._salt(salt_name)).reshape(shape) * 3.0 ** 0.5


def inputs_for(kind, name, spec):
    """x, t, (low_res, y) and the output weights. x, low_res and the weights come from the
    hash (regenerated by the test, checked against fingerprints); t and y are stored."""
    batch, size = spec["batch"], image_size(spec)
    out = {"x": _hash_normalish((batch, 3, size, size), f"{name}:x")}
    float_t = any(isinstance(v, float) for v in spec["timesteps"])
    out["t"] = torch.tensor(spec["timesteps"], dtype=torch.float32 if float_t else torch.int64)
    outputs = num_outputs(kind, spec)
    labels = NUM_CLASSES if kind == "super_res" else outputs
    if kind == "classifier" or class_conditional(spec):
        hashed = unet_golden.hash_uniform(batch, unet_golden._salt(f"{name}:y"))
        out["y"] = ((hashed + 1) / 2 * labels).long().clamp(max=labels - 1)
    if kind == "classifier":
        out["out_weights"] = _hash_normalish((batch, outputs), f"{name}:out_weights")
    else:
        small = low_res_size(spec)
        out["low_res"] = _hash_normalish((batch, 3, small, small), f"{name}:low_res")
        out["out_weights"] = _hash_normalish((batch, outputs, size, size), f"{name}:out_weights")
    return out


HASHED_INPUTS = ("x", "low_res", "out_weights")


def stored_inputs(inputs):
    """What the fixture keeps of inputs_for's dict: t and y, fingerprints of the rest."""
    return {k: (unet_golden.fingerprint(v) if k in HASHED_INPUTS else v)
            for k, v in inputs.items()}


def forward(kind, model, inputs, x, low_res=None):
    """The fixture's model call, the same on GD's and fastdiff's models."""
    if kind == "classifier":
        return model(x, inputs["t"])
    kwargs = {"y": inputs["y"]} if "y" in inputs else {}
    return model(x, inputs["t"], low_res=low_res, **kwargs)


def guidance_grad(classifier, x, t, y):
    """d/dx sum_i log_softmax(classifier(x, t))[i, y_i]: GD's cond_fn before its scale."""
    x = x.detach().requires_grad_(True)
    log_probs = F.log_softmax(classifier(x, t), dim=-1)
    return torch.autograd.grad(log_probs[range(len(y)), y.view(-1)].sum(), x)[0]


def make_cond_fn(classifier, scale):
    """GD's classifier-guidance cond_fn, as scripts/classifier_sample.py defines it: the
    gradient of log p(y | x_t, t) w.r.t. x_t, times the classifier scale; grad enabled inside
    so it works under the samplers' no_grad."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with torch.enable_grad():
            return guidance_grad(classifier, x, t, y) * scale

    return cond_fn


class RecordingCondFn:
    """A cond_fn that records each call: the timesteps it got and the gradient it returned."""

    def __init__(self, cond_fn):
        self.cond_fn = cond_fn
        self.timesteps, self.grads = [], []

    def __call__(self, x, t, **kwargs):
        grad = self.cond_fn(x, t, **kwargs)
        self.timesteps.append(t.detach().clone())
        self.grads.append(grad.detach().clone())
        return grad


def guided_inputs():
    gen = torch.Generator().manual_seed(29)
    size = GUIDED["model_kwargs"]["image_size"]
    return {"x_t": torch.randn((len(GUIDED["labels"]), 3, size, size), generator=gen),
            "y": torch.tensor(GUIDED["labels"], dtype=torch.int64)}


def guided_state(prefix, shapes):
    """The synthetic state of one of the guided-step models; the prefix keeps the UNet's and
    the classifier's same-named tensors (input_blocks.0.0.weight, ...) different."""
    return {k: unet_golden.synthetic_tensor(prefix + k, tuple(s)) for k, s in shapes.items()}


def run_guided_step(diffusion, model, classifier, name, step, inputs, class_cond=True,
                    cond_fn_factory=make_cond_fn):
    """One guided step exactly as classifier_sample.py drives it: model_fn hands y to a
    class-conditional model, cond_fn the scaled classifier gradient, under no_grad.
    ``cond_fn_factory(classifier, scale)``: GD's cond_fn (the generator) or the one under test."""
    cond_fn = RecordingCondFn(cond_fn_factory(classifier, GUIDED["classifier_scale"]))

    def model_fn(x, t, y=None):
        assert y is not None
        return model(x, t, y if class_cond else None)

    t = torch.full((inputs["y"].shape[0],), step["index"], dtype=torch.int64)
    extra = {"eta": step["eta"]} if "eta" in step else {}
    torch.manual_seed(step["seed"])  # p_sample's noise comes from the global RNG
    with torch.no_grad():
        out = getattr(diffusion, name)(model_fn, inputs["x_t"], t, clip_denoised=True,
                                       model_kwargs={"y": inputs["y"]}, cond_fn=cond_fn,
                                       **extra)
    return {"sample": out["sample"], "pred_xstart": out["pred_xstart"],
            "cond_t": torch.stack(cond_fn.timesteps), "cond_grad": torch.stack(cond_fn.grads)}


# ------------------------------------------------------------------------ generation
def _build_gd(gd, spec):
    factories = {
        "create_classifier": gd.script_util.create_classifier,
        "EncoderUNetModel": gd.unet.EncoderUNetModel,
        "sr_create_model": gd.script_util.sr_create_model,
        "SuperResModel": gd.unet.SuperResModel,
    }
    return factories[spec["factory"]](**spec["kwargs"])


def _record_model(gd, kind, name, spec, commit):
    model = _build_gd(gd, spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = unet_golden.synthetic_state_dict(shapes)
    model.load_state_dict(state, strict=True)
    model.eval()  # dropout is 0; eval() is how guidance runs a classifier

    inputs = inputs_for(kind, name, spec)
    x = inputs["x"].clone().requires_grad_(True)
    low_res = inputs["low_res"].clone().requires_grad_(True) if "low_res" in inputs else None
    output = forward(kind, model, inputs, x, low_res)
    scalar = (output * inputs["out_weights"]).sum()
    scalar.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters()), \
        "every gradient should be non-trivial"
    record = {
        "name": name,
        "kind": kind,
        "factory": spec["factory"],
        "gd_commit": commit,
        "kwargs": dict(spec["kwargs"]),
        "state_shapes": shapes,
        "state_fingerprints": {k: unet_golden.fingerprint(v) for k, v in state.items()},
        "inputs": stored_inputs(inputs),
        "output": output.detach().clone(),
        "scalar": scalar.detach().clone(),
        "grad_x": unet_golden.summarise_grad(x.grad),
        "grads": {n: unet_golden.summarise_grad(p.grad) for n, p in model.named_parameters()},
    }
    if low_res is not None:
        record["grad_low_res"] = unet_golden.summarise_grad(low_res.grad)
    if kind == "classifier":
        record["guidance_grad"] = guidance_grad(model, inputs["x"], inputs["t"], inputs["y"])
    return record


def _record_guided(gd, commit):
    script_util = gd.script_util
    kwargs = dict(GUIDED["model_kwargs"])
    model, _ = script_util.create_model_and_diffusion(**kwargs)
    classifier = gd.unet.EncoderUNetModel(**GUIDED["classifier_gd_kwargs"])
    shapes = {"model": {k: tuple(v.shape) for k, v in model.state_dict().items()},
              "classifier": {k: tuple(v.shape) for k, v in classifier.state_dict().items()}}
    model.load_state_dict(guided_state("model.", shapes["model"]), strict=True)
    classifier.load_state_dict(guided_state("classifier.", shapes["classifier"]), strict=True)
    model.eval()
    classifier.eval()
    inputs = guided_inputs()
    steps = {}
    for name, step in GUIDED["steps"].items():
        diffusion = script_util.create_gaussian_diffusion(
            steps=kwargs["diffusion_steps"], learn_sigma=kwargs["learn_sigma"],
            noise_schedule=kwargs["noise_schedule"], use_kl=kwargs["use_kl"],
            predict_xstart=kwargs["predict_xstart"], rescale_timesteps=kwargs["rescale_timesteps"],
            rescale_learned_sigmas=kwargs["rescale_learned_sigmas"],
            timestep_respacing=step["respacing"])
        steps[name] = {**run_guided_step(diffusion, model, classifier, name, step, inputs),
                       "timestep_map": torch.tensor(diffusion.timestep_map)}
    return {"gd_commit": commit, "guided": GUIDED, "state_shapes": shapes, "inputs": inputs,
            "steps": steps}


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    checkout = argv[1]
    from gd_checkout import gd_commit, import_guided_diffusion

    gd = import_guided_diffusion(checkout)
    torch.use_deterministic_algorithms(True)
    # The thread count changes conv rounding (~1e-7): one thread makes reruns bitwise equal.
    torch.set_num_threads(1)
    commit = gd_commit(checkout)
    os.makedirs(FIXTURE_DIR, exist_ok=True)
    for kind, configs in (("classifier", CLASSIFIER_CONFIGS), ("super_res", SUPER_RES_CONFIGS)):
        for name, spec in configs.items():
            fixture = _record_model(gd, kind, name, spec, commit)
            path = fixture_path(kind, name)
            torch.save(unet_golden.pack_storages(fixture), path)
            print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, scalar {fixture['scalar']:.6g}")
    fixture = _record_guided(gd, commit)
    torch.save(fixture, GUIDED_FIXTURE)
    print(f"{GUIDED_FIXTURE}: {os.path.getsize(GUIDED_FIXTURE) / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv)
