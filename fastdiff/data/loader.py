"""An infinite, sharded, resumable stream of (images, {"y": labels}) batches — GD's load_data.

Every random choice is a function of (seed, rank, epoch, position in the epoch): the epoch's
order is a permutation drawn from a generator seeded with (seed, rank, epoch), the flip of the
sample at a position from another such generator, and (with random_crop) the three numbers that
choose its crop from a third. Worker scheduling and prefetching thus cannot change the stream,
and (epoch, position of the next sample) is all a resumed run needs.

Batches are always full (GD's drop_last=True): the samples of an epoch are cut into batches of
batch_size in order and the remainder is dropped. A corrupt file is warned about once and left
out; the next readable samples fill its place, so the stream is still a fixed function of the
folder's contents.
"""
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .digits import DigitsDataset
from .image_folder import (
    CLASS_SOURCES,
    RANDOM_CROP_DRAWS,
    DataError,
    ImageFolderDataset,
    UnreadableImage,
)

logger = logging.getLogger(__name__)

_ORDER_STREAM, _FLIP_STREAM, _CROP_STREAM = 0, 1, 2
_MAX_DEFAULT_WORKERS = 4


def load_data(*, data_dir=None, batch_size, image_size, class_cond=False, deterministic=False,
              random_flip=True, random_crop=False, class_from="filename", rank=0, world_size=1,
              seed=0, num_workers=None, pin_memory=False):
    """The training batch stream: an infinite iterator of (x [B,3,S,S] float32, cond).

    cond is {"y": LongTensor [B]} when class_cond, else {} (GD's format). Without data_dir
    (None or "", GD's default) the embedded digits are used. deterministic=True keeps the file
    order every epoch (GD's no-shuffle mode); flips stay random, as in GD. random_crop=True
    crops a folder's images as GD's random_crop_arr (short side resized to a random size in
    [S, ceil(S / 0.8)], then a random S×S window; GD's classifier training data) instead of
    the centre crop; the embedded digits are never cropped (the digit fills its 8×8 frame, a
    crop would cut strokes off). class_from chooses
    the class of an image folder: "filename" (GD: the prefix before the first "_") or "folder"
    (the first subfolder, torchvision's ImageFolder). num_workers defaults to min(4, CPUs) for
    a folder and 0 for the in-memory digits. The returned DataStream has state_dict() /
    load_state_dict() for exact resume and dataset_summary() for the startup log.
    pin_memory=True hands out batches in page-locked memory, so that the trainer's
    ``.to(cuda, non_blocking=True)`` copies them without a synchronising staging copy.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("image_size", image_size)
    _check_positive_int("world_size", world_size)
    if class_from not in CLASS_SOURCES:
        raise ValueError(f"class_from must be one of {CLASS_SOURCES}, got {class_from!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")

    if data_dir:
        dataset = ImageFolderDataset(data_dir, image_size, class_cond=class_cond,
                                     class_from=class_from, rank=rank, world_size=world_size)
        default_workers = min(_MAX_DEFAULT_WORKERS, _cpu_count())
    else:
        dataset = DigitsDataset(image_size, class_cond=class_cond, rank=rank,
                                world_size=world_size)
        default_workers = 0
        random_crop = False
    if len(dataset) < batch_size:
        raise DataError(
            f"{dataset.source} gives rank {rank} of {world_size} {len(dataset)} images, "
            f"fewer than batch_size={batch_size}"
        )
    order = _EpochOrder(len(dataset), seed=seed, rank=rank, shuffle=not deterministic,
                        random_flip=random_flip, random_crop=bool(random_crop))
    return DataStream(dataset, order, batch_size=batch_size, rank=rank, world_size=world_size,
                      num_workers=default_workers if num_workers is None else num_workers,
                      pin_memory=pin_memory)


def _check_positive_int(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _EpochOrder:
    """Per-epoch sample order, flips and crop draws, each a pure function of (seed, rank, epoch).

    The rank is part of the key so that ranks, which read different files, do not share one
    flip pattern. Each kind of choice has its own generator, so turning one on or off leaves
    the others (and thus every existing stream) unchanged.
    """

    def __init__(self, num_items, *, seed, rank, shuffle, random_flip, random_crop=False):
        self.num_items = num_items
        self.random_crop = random_crop
        self._key = (seed, rank)
        self._shuffle = shuffle
        self._random_flip = random_flip

    def _generator(self, epoch, stream):
        return np.random.default_rng([*self._key, epoch, stream])

    def permutation(self, epoch):
        """Dataset index at each position of the epoch."""
        if not self._shuffle:
            return np.arange(self.num_items)
        return self._generator(epoch, _ORDER_STREAM).permutation(self.num_items)

    def flips(self, epoch):
        """Whether the sample at each position of the epoch is mirrored left-right."""
        if not self._random_flip:
            return np.zeros(self.num_items, dtype=bool)
        return self._generator(epoch, _FLIP_STREAM).random(self.num_items) < 0.5

    def crop_draws(self, epoch):
        """[num_items, 3] numbers in [0, 1) that choose the crop at each position, or None
        without random_crop (the image's size, needed to turn them into pixels, is known only
        where it is read)."""
        if not self.random_crop:
            return None
        return self._generator(epoch, _CROP_STREAM).random((self.num_items, RANDOM_CROP_DRAWS))


@dataclass
class _Chunk:
    """Positions of one epoch for a worker to read (at most batch_size of them)."""

    epoch: int
    positions: list
    indices: list
    flips: list
    crop_draws: list  # per position: a tuple of 3 numbers in [0, 1), or None (centre crop)
    epoch_end: bool  # the epoch has no positions after these


@dataclass
class _ReadChunk:
    """A worker's result: the readable samples of a _Chunk, in position order."""

    epoch: int
    positions: torch.Tensor  # int64 [k]
    images: torch.Tensor  # float32 [k, 3, S, S]
    labels: torch.Tensor | None  # int64 [k]
    unreadable: list  # (dataset index, UnreadableImage)
    epoch_end: bool


class _ChunkSampler:
    """Infinite sequence of _Chunks from (start_epoch, start_position) on.

    Runs in the main process (the DataLoader draws from it there), so it can skip dataset
    indices already found unreadable: they would be dropped anyway, skipping saves the re-read.
    """

    def __init__(self, order, chunk_size, start_epoch, start_position, known_unreadable):
        self._order = order
        self._chunk_size = chunk_size
        self._start = (start_epoch, start_position)
        self._known_unreadable = known_unreadable

    def __iter__(self):
        epoch, position = self._start
        num_items = self._order.num_items
        while True:
            permutation = self._order.permutation(epoch)
            flips = self._order.flips(epoch)
            crops = self._order.crop_draws(epoch)
            while position < num_items:
                positions = []
                while position < num_items and len(positions) < self._chunk_size:
                    if int(permutation[position]) not in self._known_unreadable:
                        positions.append(position)
                    position += 1
                yield _Chunk(epoch, positions, [int(permutation[p]) for p in positions],
                             [bool(flips[p]) for p in positions],
                             [None if crops is None else tuple(crops[p].tolist())
                              for p in positions],
                             position >= num_items)
            epoch, position = epoch + 1, 0


class _ChunkReader(Dataset):
    """Map-style view whose keys are whole _Chunks, so one worker call reads one chunk."""

    def __init__(self, dataset):
        self._dataset = dataset

    def __getitem__(self, chunk):
        images, positions, labels, unreadable = [], [], [], []
        for position, index, flip, crop_draws in zip(chunk.positions, chunk.indices,
                                                     chunk.flips, chunk.crop_draws):
            try:
                # Only a folder is ever cropped at random; the digits' load takes no draws.
                image = (self._dataset.load(index) if crop_draws is None
                         else self._dataset.load(index, crop_draws))
            except UnreadableImage as err:
                unreadable.append((index, err))
                continue
            images.append(image.flip(-1) if flip else image)
            positions.append(position)
            if self._dataset.labels is not None:
                labels.append(self._dataset.labels[index])
        size = self._dataset.image_size
        has_labels = self._dataset.labels is not None
        return _ReadChunk(
            epoch=chunk.epoch,
            positions=torch.tensor(positions, dtype=torch.int64),
            images=torch.stack(images) if images else torch.empty(0, 3, size, size),
            labels=torch.tensor(labels, dtype=torch.int64) if has_labels else None,
            unreadable=unreadable,
            epoch_end=chunk.epoch_end,
        )


def _keep(chunk):
    """collate_fn: a _ReadChunk is already batched."""
    return chunk


class _SampleBuffer:
    """Read samples of the current epoch that are not yet in a yielded batch."""

    def __init__(self):
        self._pieces = []

    def __len__(self):
        return sum(len(positions) for positions, _, _ in self._pieces)

    def add(self, chunk):
        if len(chunk.positions):
            self._pieces.append((chunk.positions, chunk.images, chunk.labels))

    def clear(self):
        self._pieces = []

    def take(self, count):
        """The first `count` samples as (positions, images, labels); the rest stay."""
        if len(self._pieces) == 1 and len(self._pieces[0][0]) == count:
            taken = self._pieces.pop()  # the usual case: one chunk is one batch, no copy
            return taken
        positions = torch.cat([piece[0] for piece in self._pieces])
        images = torch.cat([piece[1] for piece in self._pieces])
        labels = None if self._pieces[0][2] is None else torch.cat([p[2] for p in self._pieces])
        self._pieces = []
        if len(positions) > count:
            rest_labels = None if labels is None else labels[count:]
            self._pieces.append((positions[count:], images[count:], rest_labels))
        return positions[:count], images[:count], None if labels is None else labels[:count]


class DataStream:
    """Infinite iterator of GD-format batches with an exact, resumable position.

    The position is (epoch, position in the epoch of the next sample to yield), advanced only
    when a batch is handed to the consumer, so batches prefetched by workers but not yet
    consumed are read again after a resume.
    """

    def __init__(self, dataset, order, *, batch_size, rank, world_size, num_workers,
                 pin_memory=False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._order = order
        self._known_unreadable = set()
        self._epoch, self._position = 0, 0
        self._restart()

    @property
    def source(self):
        """The data directory, or a name for the embedded digits."""
        return self.dataset.source

    @property
    def num_images(self):
        """Images in the whole dataset (all ranks)."""
        return self.dataset.num_images

    @property
    def num_classes(self):
        """Number of classes, or None for a folder read without labels."""
        return self.dataset.num_classes

    @property
    def random_crop(self):
        """Whether images are cropped at random (GD's random_crop_arr) rather than centred."""
        return self._order.random_crop

    def dataset_summary(self):
        """A dict describing the data for the startup log."""
        return {
            "source": self.source,
            "num_images": self.num_images,
            "num_images_this_rank": len(self.dataset),
            "num_classes": self.num_classes,
            "class_cond": self.dataset.labels is not None,
            "image_size": self.dataset.image_size,
            "random_crop": self.random_crop,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
        }

    def state_dict(self):
        """The position of the next batch (plain ints, safe for torch.save / DCP)."""
        return {"epoch": self._epoch, "position": self._position,
                "num_images_this_rank": len(self.dataset)}

    def load_state_dict(self, state):
        """Continue from a state_dict(): the next batches are the ones the saved run had next."""
        missing = {"epoch", "position", "num_images_this_rank"} - set(state)
        if missing:
            raise ValueError(f"data loader state lacks {sorted(missing)}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        if int(state["num_images_this_rank"]) != len(self.dataset):
            logger.warning(
                "data changed since the checkpoint (%d images on this rank, %d then): "
                "restarting from the beginning of epoch %d",
                len(self.dataset), int(state["num_images_this_rank"]), self._epoch)
            self._position = 0
        self._restart()

    def _restart(self):
        """(Re)build the worker pipeline from the current position; nothing read is kept."""
        self._iterator = None  # drops the previous DataLoader iterator and its workers
        self._buffer = _SampleBuffer()
        self._buffer_epoch = self._epoch
        self._epoch_end_read = False
        self._batches_this_epoch = 0
        # An epoch entered part-way may legitimately have no full batch left.
        self._resumed_mid_epoch = self._epoch if self._position else None
        sampler = _ChunkSampler(self._order, self.batch_size, self._epoch, self._position,
                                self._known_unreadable)
        # A private generator: starting a DataLoader iterator draws a base seed, and from the
        # global RNG that draw would shift the training noise after a resume.
        self._loader = DataLoader(_ChunkReader(self.dataset), batch_size=None, sampler=sampler,
                                  num_workers=self.num_workers, collate_fn=_keep,
                                  generator=torch.Generator().manual_seed(self._epoch))

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = iter(self._loader)
        while len(self._buffer) < self.batch_size:
            if self._epoch_end_read:
                self._finish_epoch()
            self._absorb(next(self._iterator))
        positions, images, labels = self._buffer.take(self.batch_size)
        self._epoch, self._position = self._buffer_epoch, int(positions[-1]) + 1
        self._batches_this_epoch += 1
        if self.pin_memory:
            images = images.pin_memory()
            labels = None if labels is None else labels.pin_memory()
        return images, ({} if labels is None else {"y": labels})

    def _absorb(self, chunk):
        for index, err in chunk.unreadable:
            if index not in self._known_unreadable:
                self._known_unreadable.add(index)
                logger.warning("skipping unreadable image %s", err)
        self._buffer_epoch = chunk.epoch
        self._buffer.add(chunk)
        self._epoch_end_read = chunk.epoch_end

    def _finish_epoch(self):
        """Drop the epoch's incomplete last batch (GD's drop_last) and move to the next."""
        if self._batches_this_epoch == 0 and self._buffer_epoch != self._resumed_mid_epoch:
            raise DataError(
                f"{self.source} has fewer than batch_size={self.batch_size} readable images "
                f"for rank {self.rank} of {self.world_size}"
            )
        self._buffer.clear()
        self._epoch, self._position = self._buffer_epoch + 1, 0
        self._batches_this_epoch = 0
        self._epoch_end_read = False
