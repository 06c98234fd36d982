"""What a training step optimizes, and over which steps: the Trainer's pluggable parts.

One loop (fastdiff/train/loop.py) runs every GD training script; what differs between them
lives here, so a new script is a new objective, not a second loop:

- an **objective** turns a batch into per-microbatch losses to back-propagate and logs GD's
  keys for them: :class:`DiffusionObjective` (``image_train.py``: the diffusion loss, each
  microbatch's own mean, gradients summed over microbatches) and :class:`ClassifierObjective`
  (``classifier_train.py``: cross-entropy of a noisy-image classifier, each microbatch weighted
  by its share of the batch so the gradient is the batch mean's; validation batches);
- a **schedule** says which lr each step uses, which lr GD's ``opt*.pt`` records, and when
  the run ends: :class:`ImageTrainSchedule` (TrainLoop's annealing over ``lr_anneal_steps``,
  fastdiff's warmup) and :class:`ClassifierSchedule` (``--iterations``, ``--anneal_lr``).

Like the rest of the step, objectives read nothing back from the device: losses and metrics
stay device tensors until a logging step.
"""
import torch
import torch.nn.functional as F

# GD's initial log2 loss scale of fp16 runs: TrainLoop's MixedPrecisionTrainer default, and
# the 16.0 classifier_train.py passes it.
DIFFUSION_INITIAL_LG_LOSS_SCALE = 20.0
CLASSIFIER_INITIAL_LG_LOSS_SCALE = 16.0


class DiffusionObjective:
    """GD's TrainLoop loss: per microbatch, timesteps from the schedule sampler, the
    diffusion's training losses weighted by the sampler's importance weights, their mean.

    Microbatch losses are summed (GD: each microbatch backpropagates its own mean). A
    loss-aware sampler learns from a step's losses once the step is judged
    (:meth:`step_judged`), and only from a taken step's finite ones.
    """

    initial_lg_loss_scale = DIFFUSION_INITIAL_LG_LOSS_SCALE

    def __init__(self, diffusion, sampler):
        self.diffusion = diffusion
        self.sampler = sampler
        self._sampler_feed = []  # (t, losses) per microbatch of the step in flight

    def begin_batch(self, batch, cond, device):
        """(images, per-sample tensors the microbatches slice): the model kwargs as given."""
        self._sampler_feed = []
        return batch, cond

    def microbatch_loss(self, model, micro, per_sample, batch_size, *, autocast, metrics):
        """The microbatch's loss to back-propagate (before any loss scale)."""
        t, weights = self.sampler.sample(micro.shape[0], micro.device)
        with autocast():
            losses = self.diffusion.training_losses(model, micro, t, model_kwargs=per_sample)
        if hasattr(self.sampler, "update_with_local_losses"):
            self._sampler_feed.append((t, losses["loss"].detach()))
        metrics.add_losses(self.diffusion.num_timesteps, t,
                           {k: v * weights for k, v in losses.items()})
        return (losses["loss"] * weights).mean()

    @staticmethod
    def batch_loss(total, num_microbatches):
        """The step's loss from the sum of its microbatch losses: their mean."""
        return total / num_microbatches

    def step_judged(self, taken):
        """Feed the loss-aware sampler this step's losses (``taken``: 0-dim bool tensor).
        GD feeds each microbatch right after its forward; the losses are the same, only the
        next microbatch's draw sees them one step later."""
        for t, losses in self._sampler_feed:
            self.sampler.update_with_local_losses(t, losses, accept=taken & torch.isfinite(losses))
        self._sampler_feed = []

    def evaluation_due(self, step):
        return False

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


def top_k_hits(logits, labels, k):
    """Per sample: 1.0 when ``labels`` is among the ``k`` largest logits, else 0.0 (GD's
    compute_top_k with reduction='none')."""
    _, top = torch.topk(logits, k, dim=-1)
    return (top == labels[:, None]).float().sum(dim=-1)


class ClassifierObjective:
    """GD's classifier_train.py: cross-entropy of ``model(x_t, t)`` against the labels.

    Per batch: t from the schedule sampler and ``x_t = diffusion.q_sample(x, t)`` for the
    whole batch when ``noised`` (else t = 0 and the clean images); per microbatch the loss
    mean times ``len(micro) / len(batch)``, so the summed gradient is the batch mean's (unlike
    the diffusion objective). Logged as ``{prefix}_loss``, ``{prefix}_acc@1`` and
    ``{prefix}_acc@5`` with their timestep quartiles (GD's log_loss_dict).

    Validation (``val_data``): every ``eval_interval`` completed steps, one batch of it
    through ``model.eval()`` without gradients, logged under ``val_``.
    """

    initial_lg_loss_scale = CLASSIFIER_INITIAL_LG_LOSS_SCALE

    def __init__(self, diffusion, sampler, *, noised=True, val_data=None, eval_interval=5):
        if noised and sampler is None:
            raise ValueError("a noised classifier needs a schedule sampler")
        self.diffusion = diffusion
        self.sampler = sampler if noised else None
        self.noised = noised
        self.val_data = val_data
        self.eval_interval = eval_interval
        self.prefix = "train"

    def begin_batch(self, batch, cond, device):
        x = batch.to(device, non_blocking=True)
        labels = cond["y"].to(device, non_blocking=True)
        if self.noised:
            t, _ = self.sampler.sample(x.shape[0], device)
            x = self.diffusion.q_sample(x, t)
        else:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        return x, {"y": labels, "t": t}

    def microbatch_loss(self, model, micro, per_sample, batch_size, *, autocast, metrics):
        labels, t = per_sample["y"], per_sample["t"]
        with autocast():
            logits = model(micro, t)
        logits = logits.float()  # GD's output layer stays fp32 under its fp16
        losses = F.cross_entropy(logits, labels, reduction="none")
        metrics.add_losses(self.diffusion.num_timesteps, t, {
            f"{self.prefix}_loss": losses.detach(),
            f"{self.prefix}_acc@1": top_k_hits(logits.detach(), labels, 1),
            f"{self.prefix}_acc@5": top_k_hits(logits.detach(), labels, 5),
        })
        return losses.mean() * (micro.shape[0] / batch_size)

    @staticmethod
    def batch_loss(total, num_microbatches):
        """The microbatch losses are already shares of the batch mean: their sum."""
        return total

    def step_judged(self, taken):
        """GD's classifier never feeds its sampler (a loss-aware one stays uniform)."""

    def evaluation_due(self, step):
        return self.val_data is not None and step % self.eval_interval == 0

    @torch.no_grad()
    def evaluate(self, model, device, microbatch, *, autocast, metrics):
        """One validation batch in eval mode (GD: same noising, same microbatches)."""
        batch, cond = next(self.val_data)
        was_training = model.training
        model.eval()
        self.prefix = "val"
        try:
            x, per_sample = self.begin_batch(batch, cond, device)
            for i in range(0, x.shape[0], microbatch):
                part = {k: v[i:i + microbatch] for k, v in per_sample.items()}
                self.microbatch_loss(model, x[i:i + microbatch], part, x.shape[0],
                                     autocast=autocast, metrics=metrics)
        finally:
            self.prefix = "train"
            model.train(was_training)

    def state_dict(self):
        """The validation stream's position (resumed with the run)."""
        if self.val_data is not None and hasattr(self.val_data, "state_dict"):
            return {"val_data": self.val_data.state_dict()}
        return None

    def load_state_dict(self, state):
        if state and state.get("val_data") is not None and hasattr(self.val_data,
                                                                   "load_state_dict"):
            self.val_data.load_state_dict(state["val_data"])


class ImageTrainSchedule:
    """GD's TrainLoop: the lr after ``k`` completed steps is lr for k = 0 and 1, then
    lr·(1 − (k−1)/lr_anneal_steps) (GD updates it after each step from the index of the step
    just taken), times fastdiff's warmup min(1, (k+1)/lr_warmup_steps); the run ends at
    lr_anneal_steps or --max_steps, whichever comes first (neither: never)."""

    def __init__(self, cfg):
        self.base_lr = cfg.lr
        self.anneal_steps = cfg.lr_anneal_steps
        self.max_steps = cfg.max_steps
        self.warmup_steps = int(getattr(cfg, "lr_warmup_steps", 0))

    def lr(self, k):
        lr = self.base_lr
        if self.anneal_steps and k > 0:
            lr = lr * (1 - (k - 1) / self.anneal_steps)
        if self.warmup_steps:
            lr = lr * min(1.0, (k + 1) / self.warmup_steps)
        return lr

    def recorded_lr(self, k):
        """The lr GD's opt file holds after ``k`` steps: the next step's (GD anneals after
        each step)."""
        return self.lr(k)

    def total_steps(self):
        limits = [n for n in (self.anneal_steps, self.max_steps) if n]
        return min(limits) if limits else None

    def done(self, k):
        total = self.total_steps()
        return total is not None and k >= total


class ClassifierSchedule:
    """GD's classifier_train.py: ``iterations`` steps; with ``anneal_lr`` the step after
    ``k`` completed ones uses lr·(1 − k/iterations) (set before the step); --max_steps stops
    earlier without changing the lr."""

    def __init__(self, lr, iterations, anneal_lr=False, max_steps=0):
        self.base_lr = lr
        self.iterations = iterations
        self.anneal_lr = anneal_lr
        self.max_steps = max_steps

    def lr(self, k):
        if not self.anneal_lr:
            return self.base_lr
        return self.base_lr * (1 - k / self.iterations)

    def recorded_lr(self, k):
        """GD sets the lr before each step: its opt file holds the last step's."""
        return self.lr(max(k - 1, 0))

    def total_steps(self):
        return min(self.iterations, self.max_steps) if self.max_steps else self.iterations

    def done(self, k):
        return k >= self.total_steps()
