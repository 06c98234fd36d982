"""Golden outputs of guided-diffusion's ``random_crop_arr`` (its classifier-training crop).

``load_data(..., random_crop=True)`` claims GD's pixels given the same random choices: GD
draws three integers with Python's ``random.randrange`` (the short side to resize to, then
the top and the left offset of the crop), fastdiff draws three numbers in [0, 1) from its
replayable per-position generator and turns them into those integers. This script runs GD's
own function on small random images with ``random.randrange`` replaced by a recorder that
picks the lowest, the highest, or a seeded-random value of each range, and stores the
ranges GD asked for, the picks and GD's output, so that ``tests/test_data.py`` can replay
the same picks through ``fastdiff.data.resize_and_random_crop`` on CI, where GD is absent.

The cases cover no halving, one and several box halvings (and a size where the halving
depends on the drawn short side), portrait and landscape, a square image already at the
target size and an image smaller than the crop (upscaled). Images and outputs are uint8,
the type of the pixels on both sides (exact, and a quarter of fp32's bytes).

Rerun (deterministic: the same fixture values every time):

    python tools/gd_golden_random_crop.py /path/to/guided-diffusion [--out ...]
"""
import argparse
import contextlib
import importlib
import os
import random
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gd_checkout import gd_commit, import_guided_diffusion  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            os.pardir, "tests", "fixtures",
                                            "gd_random_crop.pt"))

# (height, width, image_size) of each source image.
CASES = (
    (11, 14, 8),   # short sides 8..10, never halved
    (18, 25, 8),   # halved for short side 8 and 9 (18 >= 2 * 9), not for 10
    (40, 23, 10),  # portrait; halved for 10 and 11, not for 12 or 13
    (64, 70, 7),   # three halvings for 7 (64 -> 32 -> 16 -> 8), two for 9
    (9, 9, 9),     # square at the target size: only upscales (9..12)
    (13, 30, 13),  # image_size 13: short sides 13..17 (ceil(13 / 0.8) = 17)
    (5, 12, 6),    # smaller than the crop: upscaled
)
POLICIES = ("lowest", "highest", "seed0", "seed1", "seed2")
IMAGE_SEED = 2024


class RecordingRandom:
    """Stands in for the ``random`` module inside GD's image_datasets: ``randrange`` picks by
    policy and records each (start, stop) range and the value it returned."""

    def __init__(self, policy):
        self._policy = policy
        self._rng = random.Random(int(policy[4:])) if policy.startswith("seed") else None
        self.ranges, self.values = [], []

    def randrange(self, start, stop=None):
        if stop is None:
            start, stop = 0, start
        if self._policy == "lowest":
            value = start
        elif self._policy == "highest":
            value = stop - 1
        else:
            value = self._rng.randrange(start, stop)
        self.ranges.append((start, stop))
        self.values.append(value)
        return value


@contextlib.contextmanager
def gd_random_replaced(image_datasets, stand_in):
    original = image_datasets.random
    image_datasets.random = stand_in
    try:
        yield
    finally:
        image_datasets.random = original


def run_case(random_crop_arr, image_datasets, pixels, image_size):
    runs = []
    for policy in POLICIES:
        recorder = RecordingRandom(policy)
        with gd_random_replaced(image_datasets, recorder):
            output = random_crop_arr(Image.fromarray(pixels), image_size)
        ranges = torch.tensor(recorder.ranges, dtype=torch.int64)
        values = torch.tensor(recorder.values, dtype=torch.int64)
        runs.append({"policy": policy, "ranges": ranges, "picks": values - ranges[:, 0],
                     "output": torch.from_numpy(np.ascontiguousarray(output))})
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="path of a guided-diffusion checkout")
    parser.add_argument("--out", default=DEFAULT_OUT, help="fixture to write")
    args = parser.parse_args(argv)
    import_guided_diffusion(args.checkout)
    image_datasets = importlib.import_module("guided_diffusion.image_datasets")
    rng = np.random.default_rng(IMAGE_SEED)
    cases = []
    for height, width, image_size in CASES:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        cases.append({"image": torch.from_numpy(pixels), "image_size": image_size,
                      "runs": run_case(image_datasets.random_crop_arr, image_datasets, pixels,
                                       image_size)})
    fixture = {"gd_commit": gd_commit(args.checkout), "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB, GD {fixture['gd_commit']})")


if __name__ == "__main__":
    main()
