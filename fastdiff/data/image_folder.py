"""A folder of images, read the way guided-diffusion's image_datasets.py reads it.

Listing order, class ids, sharding and the resize/crop (centre, or GD's random crop for
classifier training) are guided-diffusion's (GD below), so a run on the same folder sees the same
pixels. Randomness (order, flips, crop choices) is not decided here: the loader
(fastdiff/data/loader.py) draws it, so that it can be replayed on resume; a random crop gets its
choices as numbers in [0, 1) and turns them into GD's integers here, where the image's size is
known.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
CLASS_SOURCES = ("filename", "folder")

# What PIL raises for a truncated, corrupt or unsupported file (UnidentifiedImageError is an
# OSError; truncated GIFs raise EOFError, some broken PNG chunks SyntaxError).
_UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The data cannot be used at all (missing or empty directory, too few images).

    The message is one line naming the path, so the CLI can print it as the whole error.
    """


class UnreadableImage(Exception):
    """One image file could not be decoded; the loader warns once and skips it."""

    def __init__(self, path, reason):
        super().__init__(path, reason)  # args that rebuild it: it crosses worker processes
        self.path = path
        self.reason = reason

    def __str__(self):
        return f"{self.path}: {self.reason}"


def list_image_files(data_dir):
    """All image files under `data_dir`, in GD's order.

    GD sorts each directory's entries and descends into a subdirectory where its name sorts, so
    `a/x.png` comes before `a.png` (a global sort of the paths would put it after, "." < "/");
    the shard `files[rank::world_size]` depends on this exact order.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    files = _list_recursively(data_dir)
    if not files:
        raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under data directory: {data_dir}")
    return files


def _list_recursively(directory):
    try:
        entries = sorted(os.listdir(directory))
    except OSError as err:
        raise DataError(f"cannot list data directory {directory}: {err.strerror}") from None
    found = []
    for entry in entries:
        path = os.path.join(directory, entry)
        if os.path.isdir(path):
            found.extend(_list_recursively(path))
        elif "." in entry and entry.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def class_labels(files, data_dir, class_from):
    """Class id per file and the sorted class names; ids index the sorted unique names.

    class_from="filename" is GD's rule: the file name up to its first "_" (a name without "_"
    is its own class, extension included, as in GD). class_from="folder" is torchvision's
    ImageFolder rule: the first folder below `data_dir`, so `data_dir/cat/sub/x.png` is "cat".
    """
    if class_from == "filename":
        names = [os.path.basename(path).split("_")[0] for path in files]
    elif class_from == "folder":
        names = [_class_folder(path, data_dir) for path in files]
    else:
        raise ValueError(f"class_from must be one of {CLASS_SOURCES}, got {class_from!r}")
    class_names = sorted(set(names))
    ids = {name: i for i, name in enumerate(class_names)}
    return [ids[name] for name in names], class_names


def _class_folder(path, data_dir):
    parts = os.path.relpath(path, data_dir).split(os.sep)
    if len(parts) < 2:
        raise DataError(
            f"class_from='folder' needs every image inside a class subfolder of {data_dir}, "
            f"but {path} is not"
        )
    return parts[0]


# GD's random_crop_arr defaults: the crop covers 80%..100% of the resized image's short side.
RANDOM_CROP_MIN_FRAC, RANDOM_CROP_MAX_FRAC = 0.8, 1.0
RANDOM_CROP_DRAWS = 3  # numbers in [0, 1) per crop: short side, top offset, left offset


def _resize_short_side(image, short_side):
    """A PIL image → uint8 HWC array whose short side is `short_side` (GD's resize).

    Box-filter halvings first (while the short side is at least twice the target) so the final
    bicubic step never shrinks by more than 2× and does not alias; then bicubic to the target
    (each side rounded with Python's round, as GD).
    """
    while min(image.size) >= 2 * short_side:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = short_side / min(image.size)
    new_size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(new_size, resample=Image.BICUBIC))


def resize_and_center_crop(image, image_size):
    """GD's center_crop_arr: a PIL image → uint8 HWC array of image_size × image_size.

    The short side is resized to image_size (_resize_short_side), then the centre crop (offsets
    rounded down).
    """
    pixels = _resize_short_side(image, image_size)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def random_crop_short_sides(image_size):
    """The short sides GD's random_crop_arr resizes to: [ceil(S / 1.0), ceil(S / 0.8)]."""
    return (math.ceil(image_size / RANDOM_CROP_MAX_FRAC),
            math.ceil(image_size / RANDOM_CROP_MIN_FRAC))


def _choose(draw, count):
    """The integer in [0, count) that a draw in [0, 1) picks, uniformly (GD: randrange(count)).

    The min() guards the draw's last float step, whose product may round up to count.
    """
    return min(int(draw * count), count - 1)


def resize_and_random_crop(image, image_size, draws):
    """GD's random_crop_arr with its three random choices made by `draws` (3 numbers in [0, 1)).

    GD draws the short side uniformly from random_crop_short_sides(image_size), resizes to it
    (_resize_short_side), then draws the top and the left offset uniformly from every offset
    that keeps the image_size × image_size crop inside. Here draws[0..2] pick those three
    integers, so the loader can replay them; the pixel arithmetic is GD's.
    """
    if len(draws) != RANDOM_CROP_DRAWS:
        raise ValueError(f"a random crop needs {RANDOM_CROP_DRAWS} draws, got {len(draws)}")
    shortest, longest = random_crop_short_sides(image_size)
    short_side = shortest + _choose(draws[0], longest - shortest + 1)
    pixels = _resize_short_side(image, short_side)
    top = _choose(draws[1], pixels.shape[0] - image_size + 1)
    left = _choose(draws[2], pixels.shape[1] - image_size + 1)
    return pixels[top : top + image_size, left : left + image_size]


def to_model_range(pixels):
    """uint8 HWC → float32 CHW tensor in [-1, 1] (x / 127.5 - 1, GD's float32 arithmetic)."""
    scaled = pixels.astype(np.float32) / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def read_image(path, image_size, crop_draws=None):
    """Decode, convert to RGB, resize and crop one file → float32 [3, S, S] in [-1, 1].

    The crop is the centre one, or GD's random crop chosen by `crop_draws`
    (resize_and_random_crop) when they are given.
    """
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except _UNREADABLE_ERRORS as err:
        raise UnreadableImage(path, f"{type(err).__name__}: {err}") from None
    if crop_draws is None:
        return to_model_range(resize_and_center_crop(rgb, image_size))
    return to_model_range(resize_and_random_crop(rgb, image_size, crop_draws))


class ImageFolderDataset:
    """This rank's shard of an image folder: `load(i)` → [3, S, S] float32, `labels[i]`.

    The shard is GD's: every world_size-th file of the full sorted list, starting at rank, with
    class ids computed on the full list (so every rank agrees on them).
    """

    def __init__(self, data_dir, image_size, *, class_cond=False, class_from="filename",
                 rank=0, world_size=1):
        if class_from not in CLASS_SOURCES:
            raise ValueError(f"class_from must be one of {CLASS_SOURCES}, got {class_from!r}")
        all_files = list_image_files(data_dir)
        self.source = str(data_dir)
        self.image_size = image_size
        self.num_images = len(all_files)
        self.files = all_files[rank::world_size]
        self.labels = None
        self.class_names = None
        if class_cond:
            all_labels, self.class_names = class_labels(all_files, data_dir, class_from)
            self.labels = all_labels[rank::world_size]

    @property
    def num_classes(self):
        """Number of classes, or None when labels were not requested."""
        return None if self.class_names is None else len(self.class_names)

    def __len__(self):
        return len(self.files)

    def load(self, index, crop_draws=None):
        """Image `index` of this shard, centre-cropped or randomly cropped by `crop_draws`
        (read_image); raises UnreadableImage for a corrupt file."""
        return read_image(self.files[index], self.image_size, crop_draws)
