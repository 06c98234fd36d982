"""Validation loss: the training objective on fixed images, at fixed timesteps, with fixed noise.

Training losses are noisy (random t, random noise, random batch); this one is a deterministic
function of the weights, so curves from different checkpoints and runs can be compared point
by point. The images are held out from training where that is possible: for the embedded
digits, the same held-out split the digits classifier never trains on.
"""

import numpy as np
import torch

from fastdiff.data import DataError, DigitsDataset, ImageFolderDataset, UnreadableImage
from fastdiff.runtime import autocast

from .digits_classifier import digits_split

NUM_TIMESTEPS = 8


def fixed_timesteps(num_timesteps):
    """NUM_TIMESTEPS equidistant timesteps from 0 to T-1: t_i = round(i (T-1) / 7)."""
    if num_timesteps < 2:
        raise ValueError(f"the diffusion needs at least 2 timesteps, got {num_timesteps}")
    last = NUM_TIMESTEPS - 1
    return [round(i * (num_timesteps - 1) / last) for i in range(NUM_TIMESTEPS)]


def validation_noise(seed, timestep_index, image_positions, shape):
    """Noise [len(image_positions), *shape] for the images at those positions of the set.

    The noise of position p at the k-th fixed timestep comes from a private generator seeded
    with a hash of (seed, k, p): the same whatever the batch size, the set size or the device,
    and the global RNG is not touched.
    """
    out = torch.empty(len(image_positions), *shape)
    gen = torch.Generator()
    for row, position in enumerate(image_positions):
        state = np.random.SeedSequence([seed, timestep_index, int(position)]).generate_state(1)
        gen.manual_seed(int(state[0]))
        out[row] = torch.randn(shape, generator=gen)
    return out


def load_validation_set(num_val, image_size, *, data_dir="", class_cond=False,
                        class_from="filename"):
    """(images float32 [N, 3, S, S] in [-1, 1], labels int64 [N] or None, description).

    Without data_dir: the first num_val held-out digits (every 5th image). With data_dir:
    the first num_val files in GD's listing order. N = min(num_val, images available).
    """
    if num_val < 1:
        raise ValueError(f"--num_val must be at least 1, got {num_val}")
    if data_dir:
        dataset = ImageFolderDataset(data_dir, image_size, class_cond=class_cond,
                                     class_from=class_from)
        indices = list(range(min(num_val, len(dataset))))
        description = f"first {len(indices)} images of {data_dir}"
    else:
        dataset = DigitsDataset(image_size, class_cond=class_cond)
        indices = [int(i) for i in digits_split(len(dataset))[1][:num_val]]
        description = f"{len(indices)} held-out digits (every 5th image)"
    try:
        images = torch.stack([dataset.load(i) for i in indices])
    except UnreadableImage as err:
        raise DataError(f"unreadable validation image {err}") from None
    labels = None
    if class_cond:
        labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.int64)
    return images, labels, description


@torch.no_grad()
def validation_loss(model, diffusion, images, labels=None, *, seed=0, batch_size=64,
                    device="cpu", precision="fp32"):
    """Mean of each training-loss term at the fixed timesteps.

    ``diffusion`` must be the training diffusion (no respacing). Returns {"timesteps": [8],
    <term>: [8 means] for each term training_losses returns ("loss", and "mse" and/or "vb"),
    "mean": {<term>: mean over the 8 timesteps}, "num_images": N}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    timesteps = fixed_timesteps(diffusion.num_timesteps)
    was_training = model.training
    model.eval()
    sums = {}
    try:
        for k, t_value in enumerate(timesteps):
            for start in range(0, len(images), batch_size):
                stop = min(start + batch_size, len(images))
                x = images[start:stop].to(device)
                noise = validation_noise(seed, k, range(start, stop), x.shape[1:]).to(device)
                t = torch.full((len(x),), t_value, dtype=torch.long, device=device)
                kwargs = {} if labels is None else {"y": labels[start:stop].to(device)}
                with autocast(precision, device.type):
                    terms = diffusion.training_losses(model, x, t, model_kwargs=kwargs,
                                                      noise=noise)
                for name, values in terms.items():
                    per_t = sums.setdefault(name, [0.0] * len(timesteps))
                    per_t[k] += float(values.double().sum())
    finally:
        model.train(was_training)
    result = {"timesteps": timesteps}
    for name in sorted(sums):
        result[name] = [s / len(images) for s in sums[name]]
    result["mean"] = {name: float(np.mean(result[name])) for name in sorted(sums)}
    result["num_images"] = len(images)
    return result
