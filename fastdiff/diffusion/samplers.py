"""Timestep samplers for training (guided-diffusion's resample.py semantics), kept on the device.

A training step calls ``sample`` and, for the loss-aware sampler, ``update_with_local_losses``
once per microbatch. On a GPU every device→host read in those calls would drain the launch queue,
so both are written without one: the loss history, the counts, the "warmed up yet?" flag and the
random draw all stay device tensors, and the history update is a handful of sort/scatter ops
instead of guided-diffusion's Python loop over the batch.

Differences from guided-diffusion, all deliberate:
- each sampler owns a seedable ``torch.Generator`` on the device it draws on (created at the first
  draw) instead of numpy's global RNG; the draw is an inverse-CDF lookup of uniform variates, so
  timesteps follow guided-diffusion's distribution but not its numpy random stream;
- the generator state and the loss history are in state_dict(), so a resumed run continues the
  same stream of draws bit for bit (ranks seed with seed + rank);
- losses are all-gathered with one device collective (``all_gather_into_tensor``), which needs
  the same number of losses on every rank per call: the trainer's microbatches are equal-size on
  every rank (the global batch is split evenly, and so is the last, shorter microbatch);
- an update can be refused as a whole or per example (``accept``), without a host read, so a
  skipped non-finite step keeps its losses out of the history;
- NumPy 2 compatible (guided-diffusion uses the removed np.int).
"""
import logging
import secrets
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

LOG = logging.getLogger("fastdiff")

_SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion, seed=None):
    """Build the sampler called `name` ("uniform" or "loss-second-moment") for `diffusion`."""
    if name == "uniform":
        return UniformSampler(diffusion, seed=seed)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, seed=seed)
    raise ValueError(f"unknown schedule sampler {name!r}; expected one of {list(_SAMPLER_NAMES)}")


class ScheduleSampler(ABC):
    """A distribution over timesteps, sampled with importance weights.

    The weights 1 / (T * p(t)) make the weighted loss an unbiased estimate of the loss averaged
    uniformly over timesteps, whatever p is.
    """

    def __init__(self, diffusion, seed=None):
        self.diffusion = diffusion
        self.num_timesteps = int(diffusion.num_timesteps)
        # Without a seed, fresh entropy (as numpy's default_rng(None)); never the global RNG.
        self._seed = int(seed) if seed is not None else secrets.randbits(63)
        self._generator = None  # made on the device of the first draw
        self._loaded_rng = None  # a state_dict()'s generator state, applied at the next draw

    @abstractmethod
    def device_weights(self, device):
        """Unnormalised positive float64 weights, one per timestep, as a tensor on `device`."""

    def weights(self):
        """device_weights as a float64 numpy array (guided-diffusion's interface).

        A device→host read: for inspection and tests, not for the training step.
        """
        return self.device_weights(self._state_device()).cpu().numpy()

    def sample(self, batch_size, device):
        """Draw `batch_size` timesteps on `device`, without reading anything back to the host.

        :return: (timesteps, weights): a LongTensor of indices and a FloatTensor of importance
            weights, both on `device`.
        """
        _check_batch_size(batch_size)
        device = _concrete_device(device)
        p = self.device_weights(device)
        p = p / p.sum()
        cdf = torch.cumsum(p, dim=0)
        u = torch.rand(batch_size, generator=self._generator_on(device), dtype=torch.float64,
                       device=device)
        # Step i owns [cdf[i-1], cdf[i]); right=True gives a zero-probability step (empty
        # interval) nothing, even at u = 0. Scaling by cdf[-1] keeps a cdf that rounds below 1
        # from leaving the last step unreachable; the clamp catches a product that rounds up.
        indices = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=self.num_timesteps - 1)
        importance = 1 / (self.num_timesteps * p.index_select(0, indices))
        return indices, importance.float()

    def state_dict(self):
        """Everything needed to continue the same stream of draws after a resume."""
        if self._generator is not None:
            rng = {"seed": self._seed, "device_type": self._generator.device.type,
                   "state": self._generator.get_state()}
        elif self._loaded_rng is not None:
            rng = dict(self._loaded_rng)
        else:  # nothing drawn yet: the seed alone says where the stream starts
            rng = {"seed": self._seed, "device_type": None, "state": None}
        return {"rng_state": rng}

    def load_state_dict(self, state_dict):
        """Restore a state_dict() taken from a sampler of the same kind and diffusion."""
        rng = state_dict["rng_state"]
        if "bit_generator" in rng:
            # A checkpoint from the numpy-era sampler: its stream cannot be continued on torch.
            LOG.warning("schedule sampler state from an older fastdiff (numpy RNG): the timestep "
                        "stream restarts from seed %d", self._seed)
            rng = {"seed": self._seed, "device_type": None, "state": None}
        self._seed = int(rng["seed"])
        self._loaded_rng = dict(rng)
        self._generator = None

    # -- plumbing -------------------------------------------------------------------------

    def _generator_on(self, device):
        """This sampler's generator on `device`, continuing a loaded state if it was taken there.

        A generator's state only fits a generator of the same device type (CPU: Mersenne
        twister; CUDA: Philox seed + offset), so a state loaded from another device type, or a
        move to another device, restarts the stream from the seed.
        """
        if self._generator is not None and self._generator.device == device:
            return self._generator
        generator = torch.Generator(device=device)
        generator.manual_seed(self._seed)
        loaded = self._loaded_rng
        if loaded is not None and loaded["state"] is not None:
            if loaded["device_type"] == device.type:
                generator.set_state(loaded["state"])
            else:
                LOG.warning("schedule sampler state was saved on %s, drawing on %s: the timestep "
                            "stream restarts from seed %d", loaded["device_type"], device.type,
                            self._seed)
        self._loaded_rng = None
        self._generator = generator
        return generator

    def _state_device(self):
        return self._generator.device if self._generator is not None else torch.device("cpu")


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (importance weights are all 1)."""

    def device_weights(self, device):
        return torch.ones(self.num_timesteps, dtype=torch.float64, device=device)

    def sample(self, batch_size, device):
        # guided-diffusion's 1 / (T * (1 / T)) is within an ulp of 1 in float64, exactly 1 in
        # float32: ones are its weights bit for bit.
        _check_batch_size(batch_size)
        device = _concrete_device(device)
        indices = torch.randint(self.num_timesteps, (batch_size,),
                                generator=self._generator_on(device), device=device)
        return indices, torch.ones(batch_size, dtype=torch.float32, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses, kept identical on every rank."""

    def update_with_local_losses(self, local_ts, local_losses, accept=None):
        """Record this rank's (timestep, loss) pairs and every other rank's.

        Call on every rank each microbatch (a collective when torch.distributed is initialised),
        with the same number of pairs on every rank. Without an initialised process group only
        the local values are used. Makes no device→host read.

        :param local_ts: 1-D integer tensor of timesteps.
        :param local_losses: 1-D tensor of the matching per-example losses.
        :param accept: optional bool tensor, 0-d (the whole update) or one per example: pairs
            where it is False are left out of the history (e.g. a skipped non-finite step).
        """
        if local_ts.dim() != 1 or local_ts.shape != local_losses.shape:
            raise ValueError(
                f"local_ts and local_losses must be 1-D of equal length, got "
                f"{tuple(local_ts.shape)} and {tuple(local_losses.shape)}"
            )
        device = local_losses.device
        if accept is None:
            accept = torch.ones(local_ts.shape, dtype=torch.bool, device=device)
        else:
            if accept.dtype != torch.bool or accept.dim() not in (0, 1):
                raise ValueError(f"accept must be a 0-d or 1-D bool tensor, got {accept.dtype} "
                                 f"of shape {tuple(accept.shape)}")
            accept = accept.to(device).expand(local_ts.shape)
        ts, losses, accept = _all_gather_equal(local_ts.detach().to(device),
                                               local_losses.detach(), accept)
        self.update_with_all_losses(ts, losses, accept)

    @abstractmethod
    def update_with_all_losses(self, ts, losses, accept=None):
        """Update the weights from every rank's (timestep, loss) pairs, in rank order.

        Must be deterministic: all ranks call it with the same values and must end in the same
        state.

        :param ts: integer timesteps (a tensor or a list).
        :param losses: the matching losses (a tensor or a list).
        :param accept: optional bool tensor, one per pair: False leaves the pair out.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) ∝ sqrt(E[loss_t^2]) over the last `history_per_term` losses of each timestep.

    Uniform until every timestep has a full history; afterwards mixed with a uniform
    distribution of mass `uniform_prob` so that no timestep's probability reaches zero.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001, seed=None):
        super().__init__(diffusion, seed=seed)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        # Row t holds timestep t's last counts[t] losses, oldest first, zeros after them.
        self._loss_history = torch.zeros(self.num_timesteps, history_per_term,
                                         dtype=torch.float64)
        self._loss_counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def device_weights(self, device):
        history = self._history_on(device)
        learned = torch.sqrt(torch.mean(history ** 2, dim=-1))
        learned = learned / learned.sum()
        learned = learned * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        # A device flag, not `if`: before warm-up `learned` may be 0/0, which where() discards.
        return torch.where(self.warmed_up(), learned, torch.ones_like(learned))

    def warmed_up(self):
        """0-d bool tensor: has every timestep a full history yet?"""
        return (self._loss_counts == self.history_per_term).all()

    def update_with_all_losses(self, ts, losses, accept=None):
        device = self._state_device() if not torch.is_tensor(losses) else losses.device
        ts = torch.as_tensor(ts, dtype=torch.long, device=device)
        losses = torch.as_tensor(losses, device=device).to(torch.float64)
        if ts.dim() != 1 or ts.shape != losses.shape:
            raise ValueError(f"ts and losses must be 1-D of equal length, got "
                             f"{tuple(ts.shape)} and {tuple(losses.shape)}")
        history = self._history_on(device)
        self._loss_history, self._loss_counts = _appended_history(
            history, self._loss_counts, ts, losses, accept)

    def state_dict(self):
        state = super().state_dict()
        state["loss_history"] = self._loss_history.detach().cpu().clone()
        state["loss_counts"] = self._loss_counts.detach().cpu().clone()
        return state

    def load_state_dict(self, state_dict):
        history = torch.as_tensor(state_dict["loss_history"], dtype=torch.float64)
        counts = torch.as_tensor(state_dict["loss_counts"], dtype=torch.long)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"loss history of shape {tuple(history.shape)} does not fit this sampler "
                f"({tuple(self._loss_history.shape)}: num_timesteps x history_per_term)"
            )
        super().load_state_dict(state_dict)
        device = self._loss_history.device
        self._loss_history = history.to(device, copy=True)
        self._loss_counts = counts.to(device, copy=True)

    def _history_on(self, device):
        """The history (and counts) moved to `device` once; afterwards a no-op."""
        if self._loss_history.device != device:
            self._loss_history = self._loss_history.to(device)
            self._loss_counts = self._loss_counts.to(device)
        return self._loss_history

    def _state_device(self):
        return self._loss_history.device


def _appended_history(history, counts, ts, losses, accept=None):
    """(history, counts) after appending `losses` at timesteps `ts`, in order.

    The result equals guided-diffusion's sequential loop (append while a row has room, else
    drop the oldest), done for the whole batch at once: for each timestep the kept entries are
    the last min(H, old + new) of "old entries, then this batch's in order".
    """
    num_timesteps, per_term = history.shape
    device = history.device
    if accept is not None:
        # Refused pairs become timestep T: a spare row, written to and then dropped.
        ts = torch.where(accept.to(device), ts, num_timesteps)
    order = torch.argsort(ts, stable=True)  # stable: equal timesteps keep batch order
    sorted_ts = ts.index_select(0, order)
    sorted_losses = losses.index_select(0, order)
    position_in_group = (torch.arange(ts.shape[0], device=device)
                         - torch.searchsorted(sorted_ts, sorted_ts))

    steps = torch.arange(num_timesteps, device=device)
    new = (torch.searchsorted(sorted_ts, steps, right=True)
           - torch.searchsorted(sorted_ts, steps))
    total = counts + new
    kept = total.clamp(max=per_term)
    dropped = total - kept  # the oldest entries pushed out of a full row

    # Old entries shift left by `dropped`; slot s holds combined entry s + dropped.
    source = torch.arange(per_term, device=device) + dropped[:, None]
    from_old = source < counts[:, None]
    shifted = history.gather(1, source.clamp(max=per_term - 1))
    # One spare column (entries pushed out by later ones of the same batch) and one spare row
    # (refused pairs): every write has a place, so no data-dependent mask, no host read.
    result = torch.zeros(num_timesteps + 1, per_term + 1, dtype=history.dtype, device=device)
    result[:num_timesteps, :per_term] = torch.where(from_old, shifted, 0.0)

    entry_counts = torch.nn.functional.pad(counts, (0, 1)).index_select(0, sorted_ts)
    entry_dropped = torch.nn.functional.pad(dropped, (0, 1)).index_select(0, sorted_ts)
    slot = entry_counts + position_in_group - entry_dropped
    slot = torch.where((slot >= 0) & (sorted_ts < num_timesteps), slot, per_term)
    # Kept (t, slot) pairs are distinct; only the discarded spare cells see repeated writes.
    result.view(-1).index_put_((sorted_ts * (per_term + 1) + slot,), sorted_losses)
    return result[:num_timesteps, :per_term].contiguous(), kept


def _all_gather_equal(local_ts, local_losses, accept):
    """Every rank's (timesteps, float64 losses, accept), concatenated in rank order.

    One device collective on a [B, 3] float64 block (timesteps < 2^53 are exact). Every rank
    must pass the same B: padding to a common size would need the sizes on the host first.
    """
    losses = local_losses.to(torch.float64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_ts, losses, accept
    block = torch.stack([local_ts.to(torch.float64), losses, accept.to(torch.float64)], dim=1)
    gathered = block.new_empty(dist.get_world_size() * block.shape[0], 3)
    dist.all_gather_into_tensor(gathered, block)
    return gathered[:, 0].long(), gathered[:, 1], gathered[:, 2] != 0


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _concrete_device(device):
    """`device` with its index filled in ("cuda" → "cuda:N"), so cached state compares equal."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    return device
