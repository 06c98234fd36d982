"""Training data: GD-compatible image folders and the embedded digits, as a resumable stream."""
from .conditioning import ConditionedStream, add_conditioning, area_downsample, drop_labels
from .digits import DigitsDataset
from .image_folder import (
    DataError,
    ImageFolderDataset,
    UnreadableImage,
    class_labels,
    list_image_files,
    resize_and_center_crop,
    resize_and_random_crop,
)
from .loader import DataStream, load_data

__all__ = [
    "ConditionedStream",
    "DataError",
    "DataStream",
    "DigitsDataset",
    "ImageFolderDataset",
    "UnreadableImage",
    "add_conditioning",
    "area_downsample",
    "class_labels",
    "drop_labels",
    "list_image_files",
    "load_data",
    "resize_and_center_crop",
    "resize_and_random_crop",
]
