"""A small CNN that recognises the embedded digits: the judge of digits samples.

It is trained at first use on 4/5 of scikit-learn's digits (every 5th image is held out, the
same split the validation loss uses), at 16x16 — the digits preset's image size — from the
same uint8 images a sampler writes, and cached as a file keyed by a hash of its settings and
of the dataset, so every later evaluation uses the identical network. Its penultimate layer
is the feature space for Fréchet distance and KID of digits samples.
"""
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.data import DigitsDataset
from fastdiff.sampling import to_uint8_nhwc
from fastdiff.train.checkpoint import atomic_torch_save

log = logging.getLogger("fastdiff.evaluate")

HELD_OUT_EVERY = 5  # digits i with i % 5 == 0 are never trained on
_ARCHITECTURE_VERSION = 1  # bump when DigitsClassifier changes: old cache files stop matching


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides the trained weights (hashed into the cache file name)."""
    image_size: int = 16  # the digits preset's training size; other sizes are resized to it
    channels: tuple = (16, 32)  # conv widths at 16x16 and 8x8
    feature_dim: int = 64  # penultimate layer = the FD/KID feature space
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 1  # random translation (pixels) so slightly off-centre samples still count
    seed: int = 0


class DigitsClassifier(nn.Module):
    """conv-pool, conv-pool, linear (features), linear (10 logits); input [N, 1, S, S] in [-1, 1]."""

    def __init__(self, settings):
        super().__init__()
        self.image_size = settings.image_size
        c1, c2 = settings.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = settings.image_size // 4
        self.hidden = nn.Linear(c2 * side * side, settings.feature_dim)
        self.head = nn.Linear(settings.feature_dim, 10)

    def features(self, x):
        """Penultimate activations before their ReLU: no always-zero dimensions, closer to the
        Gaussian that the Fréchet distance assumes."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.hidden(x.flatten(1))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def digits_split(num_images):
    """(train indices, held-out indices) of the digits: every HELD_OUT_EVERY-th is held out."""
    index = np.arange(num_images)
    held_out = index % HELD_OUT_EVERY == 0
    return index[~held_out], index[held_out]


def load_digits_arrays():
    """scikit-learn's digits as (8x8 images float32 in 0..16 [N, 8, 8], labels int64 [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_uint8(indices, image_size):
    """Digits ``indices`` as uint8 NHWC RGB at ``image_size``, exactly as a model trained on
    the embedded digits sees them (fastdiff.data.DigitsDataset) after the sampler's uint8
    conversion, so that real and generated images go through one pipeline."""
    dataset = DigitsDataset(image_size)
    images = torch.stack([dataset.load(int(i)) for i in indices])
    return to_uint8_nhwc(images).numpy()


def prepare_images(images, image_size):
    """uint8 NHWC (RGB or gray) → float [N, 1, S, S] in [-1, 1] at the classifier's size."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError("images must be uint8 NHWC with 1 or 3 channels, got "
                         f"{images.dtype} {images.shape}")
    x = torch.from_numpy(images).float().div(127.5).sub(1).mean(dim=-1)[:, None]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return x


def cache_dir():
    """$FASTDIFF_CACHE, else ~/.cache/fastdiff."""
    return os.environ.get("FASTDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "fastdiff")


def cache_key(settings, images, labels):
    """Hash of the settings, the architecture version and the dataset's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _ARCHITECTURE_VERSION, **dataclasses.asdict(settings)},
                        sort_keys=True).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def load_or_train_classifier(settings=None, directory=None):
    """The cached classifier for ``settings`` (default ClassifierSettings()), training and
    caching it on first use. Returns a DigitsClassifier in eval mode whose
    ``held_out_accuracy`` attribute is its accuracy on the held-out real digits."""
    settings = settings or ClassifierSettings()
    small, labels = load_digits_arrays()
    key = cache_key(settings, small, labels)
    directory = directory or cache_dir()
    path = os.path.join(directory, f"digits_classifier_{key}.pt")
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is left as it was
        torch.manual_seed(settings.seed)
        model = DigitsClassifier(settings)
    saved = _read_cache(path)
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        accuracy = float(saved["held_out_accuracy"])
    else:
        log.info("training the digits classifier (first use; cached as %s)", path)
        accuracy = _train(model, settings, labels)
        os.makedirs(directory, exist_ok=True)
        atomic_torch_save({"state_dict": model.state_dict(), "held_out_accuracy": accuracy,
                           "settings": dataclasses.asdict(settings)}, path)
    model.eval()
    model.held_out_accuracy = accuracy
    model.cache_path = path
    return model


def _read_cache(path):
    """The cached file's contents, or None when absent or unreadable (it is then retrained:
    training is deterministic, so the retrained network is the one the key names)."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if {"state_dict", "held_out_accuracy"} <= set(saved):
            return saved
    except Exception as err:  # noqa: BLE001 - a corrupt cache file is only a cache miss
        log.warning("ignoring unreadable classifier cache %s: %s", path, err)
    return None


def _train(model, settings, labels):
    """Adam on the training split with random shifts; deterministic for fixed settings (a
    private generator draws the order and shifts; the global RNG is not used)."""
    threads = torch.get_num_threads()
    # One thread: a net this small gains nothing from more, and on a busy machine OpenMP's
    # barriers made 2 threads ~10x slower than 1; it also keeps the result independent of
    # the machine's core count.
    torch.set_num_threads(1)
    try:
        return _train_single_thread(model, settings, labels)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(model, settings, labels):
    train_idx, held_idx = digits_split(len(labels))
    x_train = prepare_images(digits_uint8(train_idx, settings.image_size), settings.image_size)
    y_train = torch.from_numpy(labels[train_idx])
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    steps_per_epoch = -(-len(x_train) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr,
                                                total_steps=settings.epochs * steps_per_epoch)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(x_train), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            x = _random_shift(x_train[batch], settings.max_shift, gen)
            loss = F.cross_entropy(model(x), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    x_held = prepare_images(digits_uint8(held_idx, settings.image_size), settings.image_size)
    with torch.no_grad():
        predicted = model(x_held).argmax(dim=1).numpy()
    return float((predicted == labels[held_idx]).mean())


def _random_shift(x, max_shift, gen):
    """Translate each image by up to max_shift pixels (background -1 fills the border)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def embed(classifier, images, batch_size=256):
    """uint8 NHWC images → (features float64 [N, D], predicted classes int64 [N])."""
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        x = prepare_images(images[start:start + batch_size], classifier.image_size)
        f = classifier.features(x)
        feats.append(f.double().numpy())
        preds.append(classifier.head(F.relu(f)).argmax(dim=1).numpy())
    return np.concatenate(feats), np.concatenate(preds)

