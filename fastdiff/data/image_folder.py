"""A folder of images, read the way guided-diffusion's image_datasets.py reads it.

Listing order, class ids, sharding and the resize/crop are guided-diffusion's (GD below), so a
run on the same folder sees the same pixels. Randomness (order, flips) is not decided here: the
loader (fastdiff/data/loader.py) picks it, so that it can be replayed on resume.
"""
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


def resize_and_center_crop(image, image_size):
    """GD's center_crop_arr: a PIL image → uint8 HWC array of image_size × image_size.

    Box-filter halvings first (while the short side is at least twice the target) so the final
    bicubic step never shrinks by more than 2× and does not alias; then bicubic so the short side
    becomes image_size (each side rounded with Python's round, as GD), then the centre crop
    (offsets rounded down).
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    new_size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(new_size, resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def to_model_range(pixels):
    """uint8 HWC → float32 CHW tensor in [-1, 1] (x / 127.5 - 1, GD's float32 arithmetic)."""
    scaled = pixels.astype(np.float32) / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def read_image(path, image_size):
    """Decode, convert to RGB, resize and crop one file → float32 [3, S, S] in [-1, 1]."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except _UNREADABLE_ERRORS as err:
        raise UnreadableImage(path, f"{type(err).__name__}: {err}") from None
    return to_model_range(resize_and_center_crop(rgb, image_size))


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

    def load(self, index):
        """Image `index` of this shard; raises UnreadableImage for a corrupt file."""
        return read_image(self.files[index], self.image_size)
