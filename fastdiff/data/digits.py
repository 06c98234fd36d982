"""The embedded default dataset: scikit-learn's bundled 8×8 handwritten digits.

1,797 real images in 10 classes that ship inside the scikit-learn package (no download), so
`fastdiff.train` with no --data_dir has something real to learn. Each 8×8 image (values 0..16)
is mapped to [-1, 1], upscaled to image_size with bilinear interpolation (align_corners=False:
a convex combination of neighbours, so values stay in [-1, 1], unlike bicubic's overshoot) and
replicated to 3 channels, since the models expect RGB.
"""
import numpy as np
import torch
import torch.nn.functional as F

DIGITS_MAX_VALUE = 16
NUM_DIGIT_CLASSES = 10


class DigitsDataset:
    """This rank's shard (`images[rank::world_size]`, GD's rule) of the digits.

    Same interface as ImageFolderDataset: `load(i)` → [3, S, S] float32, `labels[i]`.
    """

    def __init__(self, image_size, *, class_cond=False, rank=0, world_size=1):
        # Imported here: scikit-learn takes about a second to import and only this dataset needs it.
        from sklearn.datasets import load_digits

        digits = load_digits()
        scaled = digits.images.astype(np.float32) * (2 / DIGITS_MAX_VALUE) - 1
        self.source = "scikit-learn digits (embedded default)"
        self.image_size = image_size
        self.num_images = len(scaled)
        self.num_classes = NUM_DIGIT_CLASSES
        self._small = torch.from_numpy(scaled[rank::world_size].copy())
        self.labels = digits.target[rank::world_size].tolist() if class_cond else None

    def __len__(self):
        return len(self._small)

    def load(self, index):
        """Digit `index` of this shard, upscaled: [3, S, S] float32 in [-1, 1]."""
        small = self._small[index][None, None]
        size = (self.image_size, self.image_size)
        large = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
        return large[0].expand(3, *size).contiguous()
