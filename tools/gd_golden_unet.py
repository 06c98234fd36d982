"""Golden UNet references from guided-diffusion itself: outputs and every gradient.

Why: fastdiff's other UNet tests compare one fastdiff backend with another; these fixtures
pin fastdiff to GD's own numbers (issue 17). For each config in ``CONFIGS`` this builds GD's
model + diffusion with ``guided_diffusion.script_util.create_model_and_diffusion`` on the CPU
in fp32, loads a synthetic state_dict (below), and records:

* ``kind == "model"``: the output of ``model(x, t, y)`` and the gradients of
  ``(output * weights).sum()`` (fixed ``weights``) w.r.t. every parameter and ``x``;
* ``kind == "losses"``: every term of ``diffusion.training_losses(model, x_start, t,
  model_kwargs, noise)`` with fixed noise (which pins respacing's timestep map and
  ``rescale_timesteps``) and the gradients of ``loss.mean()`` w.r.t. every parameter and
  ``x_start``.

Size. GD's smallest UNet has ~200k parameters (GroupNorm32 needs 32 channels; class
conditioning adds a 1000×128 embedding), so a state_dict plus its gradient is 1.5–8 MB: too
big for a fixture. Instead:

* the state_dict is a pure function of the key names and shapes (``synthetic_state_dict``:
  integer hashing, bitwise the same on every machine and torch version; GD's zero-initialised
  output convs get non-zero values, so every gradient is non-trivial). The fixture stores the
  keys, shapes and float64 fingerprints of the values, so the test rebuilds exactly what GD
  was given and checks that it did;
* a gradient of at most ``FULL_LIMIT`` elements is stored whole; a larger one as
  ``SAMPLES`` entries at fixed indices (``sample_index``) plus three whole-tensor summaries
  (max |g|, L2 norm, dot product with a fixed ±1 vector), so an error anywhere in the tensor
  still shows.

Rerun (deterministic; rewrites tests/fixtures/gd_unet_<name>.pt):

    python tools/gd_golden_unet.py /path/to/guided-diffusion

The test (tests/test_gd_golden_unet.py) imports this module for ``CONFIGS`` and the helpers
without guided-diffusion: GD is imported only in ``main``.
"""
import os
import sys
import zlib

import torch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

FULL_LIMIT = 2048   # gradients up to this many elements are stored whole
SAMPLES = 512       # entries stored of a larger gradient
SAMPLE_STRIDE = 7919  # a prime: coprime with every tensor size here (products of 2, 3, 5)

_SMALL = dict(image_size=16, num_channels=32, num_res_blocks=1, dropout=0.0)

# Overrides of GD's model_and_diffusion_defaults(); the fixture stores the full kwargs.
CONFIGS = {
    # (a) hybrid loss model: learned sigma, cosine schedule, classes, ResBlock up/down, FiLM.
    "sigma_cosine_class_updown": dict(
        kind="model", batch=3, kwargs=dict(
            _SMALL, channel_mult="1,2", attention_resolutions="8", num_heads=2,
            learn_sigma=True, noise_schedule="cosine", class_cond=True, resblock_updown=True,
            use_scale_shift_norm=True, diffusion_steps=50),
        timesteps=[0, 17, 49]),
    # (b) QKVAttention (q,k,v split before heads) with num_head_channels, attention at two
    #     resolutions, no FiLM; fractional timesteps as rescale_timesteps feeds them.
    "new_attention_order": dict(
        kind="model", batch=2, kwargs=dict(
            _SMALL, channel_mult="1,2", attention_resolutions="16,8", num_head_channels=8,
            use_new_attention_order=True, use_scale_shift_norm=False, diffusion_steps=50),
        timesteps=[3.5, 812.25]),
    # (c) through the diffusion: 50 steps respaced to 10 (uneven strides: GD rounds),
    #     rescaled timesteps, learned sigma (mse + vb terms, t = 0 takes the decoder NLL).
    "respaced_rescaled_losses": dict(
        kind="losses", batch=3, kwargs=dict(
            _SMALL, channel_mult="1,1", attention_resolutions="8", num_heads=1,
            learn_sigma=True, diffusion_steps=50, timestep_respacing="10",
            rescale_timesteps=True),
        timesteps=[0, 4, 9]),
    # (d) the same through DDIM-style respacing (a uniform stride of 5).
    "ddim_respaced_losses": dict(
        kind="losses", batch=2, kwargs=dict(
            _SMALL, channel_mult="1,1", attention_resolutions="8", num_heads=1,
            learn_sigma=True, diffusion_steps=50, timestep_respacing="ddim10",
            rescale_timesteps=True, noise_schedule="cosine"),
        timesteps=[1, 9]),
}


def fixture_path(name):
    return os.path.normpath(os.path.join(FIXTURE_DIR, f"gd_unet_{name}.pt"))


# ----------------------------------------------------------------- deterministic values
def hash_uniform(n, salt):
    """``n`` values in [-1, 1) from an integer hash of (index, salt): no RNG, so every
    machine and torch version gives the same bits. Intermediates stay below 2**63."""
    h = torch.arange(n, dtype=torch.int64)
    h = (h * 2654435761 + (salt & 0xFFFFFFFF) * 97531 + 12345) & 0xFFFFFFFF
    for _ in range(2):
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h.double() / 2.0**31 - 1.0).float()


def _salt(name):
    return zlib.crc32(name.encode())


def synthetic_tensor(name, shape):
    """GD-like scale: weights ±1/sqrt(fan_in) (GD's init bound), norm gains 1 ± 0.2,
    biases ±0.1. Nothing is zero, unlike GD's zero-initialised output convs."""
    n = 1
    for s in shape:
        n *= s
    u = hash_uniform(n, _salt(name)).reshape(shape)
    if len(shape) >= 2:
        return u / (n // shape[0]) ** 0.5
    if name.endswith(".weight"):
        return 1.0 + 0.2 * u
    return 0.1 * u


def synthetic_state_dict(shapes):
    """``{key: tensor}`` for ``{key: shape}`` (insertion order kept)."""
    return {k: synthetic_tensor(k, tuple(s)) for k, s in shapes.items()}


def fingerprint(t):
    """(sum, sum of squares) in float64: equal fingerprints = the same synthetic values."""
    t = t.detach().double()
    return torch.stack([t.sum(), t.square().sum()])


def sample_index(n):
    """Fixed, spread-out flat indices of a gradient with ``n > FULL_LIMIT`` elements."""
    idx = (torch.arange(SAMPLES, dtype=torch.int64) * SAMPLE_STRIDE) % n
    assert idx.unique().numel() == SAMPLES, n
    return idx


def sign_vector(n):
    return torch.where(hash_uniform(n, salt=1) >= 0, 1.0, -1.0)


def summarise_grad(g):
    """What the fixture keeps of one gradient (see the module docstring)."""
    g = g.detach().float().reshape(-1)
    if g.numel() <= FULL_LIMIT:
        return {"full": g.clone()}
    return {"samples": g[sample_index(g.numel())].clone(),
            "max_abs": g.abs().max(),
            "norm": g.double().norm().float(),
            "proj": (g.double() @ sign_vector(g.numel()).double()).float()}


def inputs_for(spec, num_classes):
    """x (or x_start), t, y and the loss weights / noise, from a seeded generator.

    These are stored in the fixture; the test never regenerates them.
    """
    gen = torch.Generator().manual_seed(17)
    kw = spec["kwargs"]
    shape = (spec["batch"], 3, kw["image_size"], kw["image_size"])
    x = torch.randn(shape, generator=gen)
    float_t = any(isinstance(v, float) for v in spec["timesteps"])
    t = torch.tensor(spec["timesteps"], dtype=torch.float32 if float_t else torch.int64)
    out = {"x": x, "t": t}
    if kw.get("class_cond"):
        out["y"] = torch.randint(0, num_classes, (spec["batch"],), generator=gen)
    out_channels = 6 if kw.get("learn_sigma") else 3
    if spec["kind"] == "model":
        out["out_weights"] = torch.randn((shape[0], out_channels) + shape[2:], generator=gen)
    else:
        out["noise"] = torch.randn(shape, generator=gen)
    return out


# ------------------------------------------------------------------------ generation
def _record(gd_script_util, name, spec, commit):
    kwargs = gd_script_util.model_and_diffusion_defaults()
    kwargs.update(spec["kwargs"])
    model, diffusion = gd_script_util.create_model_and_diffusion(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = synthetic_state_dict(shapes)
    model.load_state_dict(state, strict=True)
    model.eval()  # dropout is 0; eval() only makes that explicit

    inputs = inputs_for(spec, gd_script_util.NUM_CLASSES)
    x = inputs["x"].clone().requires_grad_(True)
    model_kwargs = {"y": inputs["y"]} if "y" in inputs else {}
    record = {}
    if spec["kind"] == "model":
        output = model(x, inputs["t"], **model_kwargs)
        scalar = (output * inputs["out_weights"]).sum()
        record["output"] = output.detach().clone()
    else:
        losses = diffusion.training_losses(model, x, inputs["t"], model_kwargs=model_kwargs,
                                           noise=inputs["noise"])
        scalar = losses["loss"].mean()
        record["losses"] = {k: v.detach().clone() for k, v in losses.items()}
        record["timestep_map"] = torch.tensor(diffusion.timestep_map)
    scalar.backward()
    record["scalar"] = scalar.detach().clone()
    record["grad_x"] = x.grad.detach().clone()
    record["grads"] = {n: summarise_grad(p.grad) for n, p in model.named_parameters()}
    assert all(p.grad is not None and p.grad.any() for p in model.parameters()), \
        "every gradient should be non-trivial"
    return {
        "name": name,
        "kind": spec["kind"],
        "gd_commit": commit,
        "kwargs": kwargs,
        "state_shapes": shapes,
        "state_fingerprints": {k: fingerprint(v) for k, v in state.items()},
        "inputs": inputs,
        **record,
    }


def pack_storages(tree):
    """The same tree whose tensors are views into one storage per dtype: torch.save writes
    each storage as its own archive entry (~300 bytes of overhead for a 4-byte scalar)."""
    found = []

    def collect(node):
        if torch.is_tensor(node):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)

    collect(tree)
    views = {}
    for dtype in {t.dtype for t in found}:
        same = [t for t in found if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        offset = 0
        for t in same:
            views[id(t)] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()

    def rebuild(node):
        if torch.is_tensor(node):
            return views[id(node)]
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        return node

    return rebuild(tree)


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    checkout = argv[1]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gd_checkout import gd_commit, import_guided_diffusion

    import_guided_diffusion(checkout)
    from guided_diffusion import script_util

    torch.use_deterministic_algorithms(True)
    commit = gd_commit(checkout)
    os.makedirs(FIXTURE_DIR, exist_ok=True)
    for name, spec in CONFIGS.items():
        fixture = _record(script_util, name, spec, commit)
        path = fixture_path(name)
        torch.save(pack_storages(fixture), path)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, scalar {fixture['scalar']:.6g}")


if __name__ == "__main__":
    main(sys.argv)
