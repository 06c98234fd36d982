"""Timestep samplers for training (guided-diffusion's resample.py semantics).

Differences from guided-diffusion, all deliberate:
- each sampler owns a seedable numpy Generator instead of numpy's global RNG, and its state is
  in state_dict(), so a resumed run draws the same timesteps (ranks seed it with seed + rank);
- the loss history is in state_dict() too;
- losses are all-gathered with torch.distributed (not MPI), with uneven per-rank batch sizes;
- NumPy 2 compatible (guided-diffusion uses the removed np.int).
"""
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

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
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def weights(self):
        """Unnormalised positive float64 numpy weights, one per timestep."""

    def sample(self, batch_size, device):
        """Draw `batch_size` timesteps.

        :return: (timesteps, weights): a LongTensor of indices and a FloatTensor of importance
            weights, both on `device`.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        w = self.weights()
        p = w / np.sum(w)
        indices = self.rng.choice(len(p), size=(batch_size,), p=p)
        importance = 1 / (len(p) * p[indices])
        return (
            torch.from_numpy(indices).long().to(device),
            torch.from_numpy(importance).float().to(device),
        )

    def state_dict(self):
        """Everything needed to continue the same stream of draws after a resume."""
        return {"rng_state": self.rng.bit_generator.state}

    def load_state_dict(self, state_dict):
        """Restore a state_dict() taken from a sampler of the same kind and diffusion."""
        self.rng.bit_generator.state = state_dict["rng_state"]


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (importance weights are all 1)."""

    def __init__(self, diffusion, seed=None):
        super().__init__(diffusion, seed=seed)
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses, kept identical on every rank."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Record this rank's (timestep, loss) pairs and every other rank's.

        Call on every rank each step (a collective when torch.distributed is initialised). Per-rank
        batch sizes may differ. Without an initialised process group only the local values are used.

        :param local_ts: 1-D integer tensor of timesteps.
        :param local_losses: 1-D tensor of the matching per-example losses.
        """
        if local_ts.dim() != 1 or local_ts.shape != local_losses.shape:
            raise ValueError(
                f"local_ts and local_losses must be 1-D of equal length, got "
                f"{tuple(local_ts.shape)} and {tuple(local_losses.shape)}"
            )
        ts, losses = _all_gather_uneven(local_ts.detach(), local_losses.detach())
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from every rank's (timestep, loss) pairs, in rank order.

        Must be deterministic: all ranks call it with the same lists and must end in the same state.

        :param ts: list of int timesteps.
        :param losses: list of float losses.
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
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest, append the newest.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self):
        state = super().state_dict()
        state["loss_history"] = torch.from_numpy(self._loss_history.copy())
        state["loss_counts"] = torch.from_numpy(self._loss_counts.copy())
        return state

    def load_state_dict(self, state_dict):
        history = np.asarray(state_dict["loss_history"], dtype=np.float64)
        counts = np.asarray(state_dict["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"loss history of shape {history.shape} does not fit this sampler "
                f"({self._loss_history.shape}: num_timesteps x history_per_term)"
            )
        super().load_state_dict(state_dict)
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()


def _all_gather_uneven(local_ts, local_losses):
    """All ranks' timesteps and losses as Python lists, in rank order.

    Sizes are gathered first, every rank pads to the largest batch, and the padding is cut off
    again. Timesteps and losses travel together as one float64 tensor (timesteps < 2^53 are
    exact), so the payload is a single collective on the tensors' device.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_ts.cpu().tolist(), local_losses.double().cpu().tolist()
    device = local_losses.device
    world_size = dist.get_world_size()
    local_size = torch.tensor([local_ts.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes = [int(s.item()) for s in sizes]

    padded = torch.zeros(2, max(sizes), dtype=torch.float64, device=device)
    padded[0, : local_ts.shape[0]] = local_ts.to(device=device, dtype=torch.float64)
    padded[1, : local_ts.shape[0]] = local_losses.to(device=device, dtype=torch.float64)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)

    ts, losses = [], []
    for size, block in zip(sizes, gathered):
        block = block[:, :size].cpu()
        ts += block[0].long().tolist()
        losses += block[1].tolist()
    return ts, losses
