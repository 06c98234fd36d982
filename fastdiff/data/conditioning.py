"""Model inputs derived from each training batch, added on the CPU before it reaches the device.

Two trainers need more than GD's ``(images, {"y": labels})``:
- super-resolution (GD's ``load_superres_data``): ``low_res``, the batch area-downsampled to
  ``small_size``, which the model upsamples and concatenates to its input;
- classifier-free guidance: each label becomes the null class with probability p, so the
  model also learns the unconditional prediction (one extra label-embedding row).

Both happen here, on the host side of the loader, so the training step still reads nothing
back from the device. The label dropout is a pure function of (seed, rank, batch index), like
the loader's own order and flips: the batch index is part of the stream's state_dict, so a
resumed run drops exactly the labels an uninterrupted one would.
"""
import numpy as np
import torch
import torch.nn.functional as F

# The loader's streams of numpy generators are keyed (seed, rank, epoch, 0 or 1); this one is
# keyed (seed, rank, batch index, 2), so the three never share a seed.
_LABEL_DROPOUT_STREAM = 2
_STATE_KEY = "conditioned_batches"


def add_conditioning(stream, *, small_size=None, class_dropout_prob=0.0, null_class=None,
                     seed=0, rank=0):
    """``stream`` with ``low_res`` (when ``small_size``) and label dropout (when p > 0) added;
    ``stream`` itself when there is nothing to add (its batches bit for bit)."""
    if small_size is None and not class_dropout_prob:
        return stream
    return ConditionedStream(stream, small_size=small_size,
                             class_dropout_prob=class_dropout_prob, null_class=null_class,
                             seed=seed, rank=rank)


def drop_labels(labels, class_dropout_prob, null_class, *, seed, rank, batch_index):
    """``labels`` with each replaced by ``null_class`` with probability ``class_dropout_prob``,
    decided by a generator keyed (seed, rank, batch_index): a new tensor, the input untouched."""
    rng = np.random.default_rng([seed, rank, batch_index, _LABEL_DROPOUT_STREAM])
    dropped = torch.from_numpy(rng.random(len(labels)) < class_dropout_prob)
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


def area_downsample(images, small_size):
    """GD's low-resolution input: ``F.interpolate(images, small_size, mode="area")``."""
    return F.interpolate(images, small_size, mode="area")


class ConditionedStream:
    """A :class:`~fastdiff.data.DataStream` whose batches carry the extra model inputs.

    Keeps the stream's interface: ``state_dict`` / ``load_state_dict`` (exact resume: the
    stream's position plus the batch index the label dropout is keyed on),
    ``dataset_summary`` and the other attributes, passed through.
    """

    def __init__(self, stream, *, small_size=None, class_dropout_prob=0.0, null_class=None,
                 seed=0, rank=0):
        if class_dropout_prob and null_class is None:
            raise ValueError("class_dropout_prob > 0 needs the model's null class")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        self.stream = stream
        self.small_size = small_size
        self.class_dropout_prob = class_dropout_prob
        self.null_class = null_class
        self.seed = seed
        self.rank = rank
        self.batch_index = 0  # batches handed out so far (the dropout's key)

    def __getattr__(self, name):  # source, num_images, num_classes, batch_size, ...
        if name == "stream":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)

    def __iter__(self):
        return self

    def __next__(self):
        images, cond = next(self.stream)
        cond = dict(cond)
        pin = getattr(self.stream, "pin_memory", False)
        if self.small_size is not None:
            cond["low_res"] = _pinned(area_downsample(images, self.small_size), pin)
        if self.class_dropout_prob and "y" in cond:
            cond["y"] = _pinned(drop_labels(cond["y"], self.class_dropout_prob, self.null_class,
                                            seed=self.seed, rank=self.rank,
                                            batch_index=self.batch_index), pin)
        self.batch_index += 1
        return images, cond

    def dataset_summary(self):
        summary = dict(self.stream.dataset_summary())
        if self.small_size is not None:
            summary["small_size"] = self.small_size
        if self.class_dropout_prob:
            summary["class_dropout_prob"] = self.class_dropout_prob
        return summary

    def state_dict(self):
        return {**self.stream.state_dict(), _STATE_KEY: self.batch_index}

    def load_state_dict(self, state):
        state = dict(state)
        self.batch_index = int(state.pop(_STATE_KEY, 0))
        self.stream.load_state_dict(state)


def _pinned(tensor, pin):
    """Page-locked when the stream pins its batches (an asynchronous copy to the GPU)."""
    return tensor.pin_memory() if pin else tensor
