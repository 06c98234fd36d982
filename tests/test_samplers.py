"""Timestep samplers: guided-diffusion's distributions, warm-up and history, on the device.

What is pinned: the loss-second-moment distribution against GD's closed form, the switch from
uniform at warm-up, the history's "last H losses per timestep, in order" (against GD's sequential
loop written out below, with repeated timesteps in one batch), refused updates, rank sync over
two gloo ranks, bit-exact resume of the torch generator stream, and that neither ``sample`` nor
``update_with_local_losses`` reads anything back to the host (the training step calls both once
per microbatch; on a GPU each read would drain the launch queue).
"""
import io
import logging
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from fastdiff.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_gaussian_diffusion,
    create_named_schedule_sampler,
)

T = 20
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
HOST_DATA_FACTORIES = ("tensor", "as_tensor", "asarray")


class HostReads(TorchFunctionMode):
    """Records tensor → host reads, and torch calls fed host data, inside the ``with`` block.

    Every torch function and tensor method goes through the mode (``torch.from_numpy`` does not:
    patch it separately). A numpy argument is recorded as "numpy→<function>"; a tensor built
    from Python data as "host→<function>" (on a GPU that copy from pageable memory waits for
    the device as a read does).
    """

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads.append(name)
        if any(isinstance(a, (np.ndarray, np.generic)) for a in (*args, *kwargs.values())):
            self.reads.append(f"numpy→{name}")
        elif name in HOST_DATA_FACTORIES and args and not torch.is_tensor(args[0]):
            self.reads.append(f"host→{name}")
        return func(*args, **kwargs)


def count_from_numpy(monkeypatch):
    """A list that gets every array later passed to torch.from_numpy."""
    calls = []
    real_from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: calls.append(a) or real_from_numpy(a))
    return calls


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=T, noise_schedule="cosine")


def fill_history(sampler, rng, scale, skip=()):
    """Give every timestep (but `skip`) a full history of losses ~ scale[t] * U(0.5, 1.5)."""
    for t in range(sampler.num_timesteps):
        if t in skip:
            continue
        losses = scale[t] * rng.uniform(0.5, 1.5, size=sampler.history_per_term)
        sampler.update_with_all_losses([t] * len(losses), losses.tolist())


def history_and_counts(sampler):
    state = sampler.state_dict()
    return state["loss_history"].numpy(), state["loss_counts"].numpy()


def gd_update(history, counts, ts, losses):
    """guided-diffusion's update_with_all_losses, one pair at a time (the reference)."""
    per_term = history.shape[1]
    for t, loss in zip(ts, losses):
        if counts[t] == per_term:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1


def gd_weights(history, uniform_prob=0.001):
    """guided-diffusion's LossSecondMomentResampler.weights() for a warmed-up history."""
    weights = np.sqrt(np.mean(history ** 2, axis=-1))
    weights /= np.sum(weights)
    weights *= 1 - uniform_prob
    weights += uniform_prob / len(weights)
    return weights


# ------------------------------------------------------------------------------ uniform
def test_uniform_sampler(diffusion):
    sampler = UniformSampler(diffusion, seed=3)
    t, w = sampler.sample(4000, "cpu")
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (4000,)
    assert torch.equal(w, torch.ones(4000))
    counts = torch.bincount(t, minlength=T).double()
    assert counts.min() > 0 and t.max() < T
    assert ((counts - 200) ** 2 / 200).sum() < 60  # chi^2 with 19 dof: p < 1e-5 to fail
    again, _ = UniformSampler(diffusion, seed=3).sample(4000, "cpu")
    other, _ = UniformSampler(diffusion, seed=4).sample(4000, "cpu")
    assert torch.equal(t, again) and not torch.equal(t, other)
    assert np.array_equal(sampler.weights(), np.ones(T))
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0, "cpu")


# ------------------------------------------------------------------- loss second moment
def test_loss_second_moment_is_uniform_until_warm(diffusion):
    sampler = LossSecondMomentResampler(diffusion, seed=0)
    rng = np.random.default_rng(0)
    fill_history(sampler, rng, scale=np.arange(1, T + 1), skip={7})
    sampler.update_with_all_losses([7] * 9, [1.0] * 9)  # one short of warm
    assert not sampler.warmed_up()
    assert np.array_equal(sampler.weights(), np.ones(T))
    _, w = sampler.sample(64, "cpu")
    assert torch.equal(w, torch.ones(64))
    sampler.update_with_all_losses([7], [1.0])
    assert sampler.warmed_up()
    np.testing.assert_allclose(sampler.weights(), gd_weights(history_and_counts(sampler)[0]),
                               rtol=1e-12)  # summation order only: float64 rounding
    _, w = sampler.sample(64, "cpu")
    assert not torch.equal(w, torch.ones(64))


def test_loss_second_moment_distribution_matches_gd_formula(diffusion):
    sampler = LossSecondMomentResampler(diffusion, seed=0)
    rng = np.random.default_rng(1)
    fill_history(sampler, rng, scale=np.linspace(0.1, 5.0, T) ** 2)
    expected = gd_weights(history_and_counts(sampler)[0])
    # Same float64 operations as GD; only numpy's and torch's summation orders may differ.
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0, abs=1e-12)

    t, w = sampler.sample(20000, "cpu")
    p = expected / expected.sum()
    # GD's importance weight 1 / (T p[t]) in float64, then cast to float32: rtol 1e-6 leaves
    # room for p's last-ulp differences times float32 rounding (~6e-8).
    torch.testing.assert_close(w.double(), torch.from_numpy(1 / (T * p[t.numpy()])), rtol=1e-6,
                               atol=0)
    # E_p[1/(T p)] = 1: the weighted objective is unbiased for the uniform average.
    assert w.double().mean().item() == pytest.approx(1.0, abs=0.05)
    freq = torch.bincount(t, minlength=T).double().numpy() / len(t)
    # 4 standard errors of the largest bin: a per-bin false alarm has p < 1e-4.
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / len(t)).max())


def test_zero_probability_steps_are_never_drawn(diffusion):
    """The inverse CDF must skip a step whose interval is empty (uniform_prob 0, loss 0)."""
    sampler = LossSecondMomentResampler(diffusion, uniform_prob=0.0, seed=0)
    losses = np.ones(T)
    losses[[0, 5, T - 1]] = 0.0  # first, middle and last step: every edge of the CDF
    for t in range(T):
        sampler.update_with_all_losses([t] * 10, [losses[t]] * 10)
    t, _ = sampler.sample(5000, "cpu")
    assert not set(t.tolist()) & {0, 5, T - 1}
    assert set(t.tolist()) == set(range(T)) - {0, 5, T - 1}


def test_history_keeps_the_latest_losses_in_order(diffusion):
    sampler = LossSecondMomentResampler(diffusion, history_per_term=4)
    sampler.update_with_all_losses([3] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    history, counts = history_and_counts(sampler)
    assert history[3].tolist() == [3.0, 4.0, 5.0, 6.0] and counts[3] == 4
    # Repeated timesteps interleaved with others in one batch; 3 is full, 9 gets 2 of 4.
    sampler.update_with_all_losses([9, 3, 9, 3], [10.0, 7.0, 11.0, 8.0])
    history, counts = history_and_counts(sampler)
    assert history[3].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert history[9].tolist() == [10.0, 11.0, 0.0, 0.0] and counts[9] == 2
    assert counts.sum() == 6


def test_history_update_equals_gd_sequential_loop(diffusion):
    """Random batches with many repeats (T = 20, up to 40 per batch), against GD's loop."""
    per_term = 3
    sampler = LossSecondMomentResampler(diffusion, history_per_term=per_term)
    history, counts = np.zeros((T, per_term)), np.zeros(T, dtype=np.int64)
    rng = np.random.default_rng(5)
    for _ in range(40):
        ts = rng.integers(0, T, size=rng.integers(1, 41))
        losses = rng.normal(size=ts.shape)
        sampler.update_with_all_losses(torch.from_numpy(ts), torch.from_numpy(losses))
        gd_update(history, counts, ts, losses)
        got_history, got_counts = history_and_counts(sampler)
        np.testing.assert_array_equal(got_history, history)  # copies: bitwise
        np.testing.assert_array_equal(got_counts, counts)


def test_refused_losses_stay_out_of_the_history(diffusion):
    sampler = LossSecondMomentResampler(diffusion, history_per_term=4)
    sampler.update_with_local_losses(torch.tensor([2, 5]), torch.tensor([0.5, 1.5]))
    before = history_and_counts(sampler)
    # A skipped step: the whole update refused (0-d flag), NaN losses included.
    sampler.update_with_local_losses(torch.tensor([2, 5, 2]), torch.full((3,), float("nan")),
                                     accept=torch.tensor(False))
    for got, want in zip(history_and_counts(sampler), before):
        np.testing.assert_array_equal(got, want)
    # Per example: only the accepted pairs are appended, in order.
    sampler.update_with_local_losses(torch.tensor([2, 2, 5, 2]),
                                     torch.tensor([1.0, float("inf"), 2.0, 3.0]),
                                     accept=torch.tensor([True, False, True, True]))
    history, counts = history_and_counts(sampler)
    assert history[2].tolist() == [0.5, 1.0, 3.0, 0.0] and counts[2] == 3
    assert history[5].tolist() == [1.5, 2.0, 0.0, 0.0] and counts[5] == 2
    with pytest.raises(ValueError, match="accept"):
        sampler.update_with_local_losses(torch.tensor([1]), torch.tensor([1.0]),
                                         accept=torch.tensor([1]))


def test_local_update_without_process_group(diffusion):
    assert not dist.is_initialized()
    sampler = LossSecondMomentResampler(diffusion)
    sampler.update_with_local_losses(torch.tensor([2, 5, 2]), torch.tensor([0.5, 1.5, 2.5]))
    history, counts = history_and_counts(sampler)
    assert counts[[2, 5]].tolist() == [2, 1]
    assert history[2, :2].tolist() == [0.5, 2.5]
    with pytest.raises(ValueError, match="equal length"):
        sampler.update_with_local_losses(torch.tensor([1, 2]), torch.tensor([1.0]))


# ------------------------------------------------------------------------------ resume
def round_trip(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_resumes_exactly(diffusion):
    a = LossSecondMomentResampler(diffusion, seed=11)
    fill_history(a, np.random.default_rng(2), scale=np.linspace(1, 3, T))
    a.sample(17, "cpu")
    state = round_trip(a.state_dict())

    b = LossSecondMomentResampler(diffusion, seed=99)
    b.load_state_dict(state)
    np.testing.assert_array_equal(a.weights(), b.weights())
    for step in range(3):
        ta, wa = a.sample(32, "cpu")
        tb, wb = b.sample(32, "cpu")
        assert torch.equal(ta, tb) and torch.equal(wa, wb)
        losses = torch.rand(32, generator=torch.Generator().manual_seed(step))
        a.update_with_local_losses(ta, losses)
        b.update_with_local_losses(tb, losses)
    state["loss_history"] = state["loss_history"][:, :5]
    with pytest.raises(ValueError, match="does not fit"):
        b.load_state_dict(state)


def test_state_taken_before_any_draw_resumes_from_the_seed(diffusion):
    """A checkpoint saved before the first draw must carry the seed, not a default stream."""
    fresh = UniformSampler(diffusion, seed=1)
    resumed = UniformSampler(diffusion, seed=2)
    resumed.load_state_dict(round_trip(fresh.state_dict()))
    assert torch.equal(fresh.sample(9, "cpu")[0], resumed.sample(9, "cpu")[0])
    # ... and a loaded state not drawn from yet is handed on unchanged.
    again = UniformSampler(diffusion, seed=3)
    again.load_state_dict(round_trip(resumed.state_dict()))
    assert torch.equal(resumed.sample(9, "cpu")[0], again.sample(9, "cpu")[0])


def test_uniform_sampler_resumes_exactly(diffusion):
    u1, u2 = UniformSampler(diffusion, seed=1), UniformSampler(diffusion, seed=2)
    u1.sample(5, "cpu")
    u2.load_state_dict(round_trip(u1.state_dict()))
    assert torch.equal(u1.sample(9, "cpu")[0], u2.sample(9, "cpu")[0])


def test_numpy_era_state_restarts_from_the_seed(diffusion, caplog):
    old = {"rng_state": np.random.default_rng(0).bit_generator.state,
           "loss_history": torch.ones(T, 10, dtype=torch.float64),
           "loss_counts": torch.full((T,), 10)}
    sampler = LossSecondMomentResampler(diffusion, seed=4)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        sampler.load_state_dict(old)
    assert "restarts from seed 4" in caplog.text
    assert sampler.warmed_up()  # the history itself still loads
    assert torch.equal(sampler.sample(9, "cpu")[0],
                       LossSecondMomentResampler(diffusion, seed=4).sample(9, "cpu")[0])


def test_create_named_schedule_sampler(diffusion):
    assert type(create_named_schedule_sampler("uniform", diffusion)) is UniformSampler
    s = create_named_schedule_sampler("loss-second-moment", diffusion, seed=5)
    assert type(s) is LossSecondMomentResampler and s.history_per_term == 10 and s.uniform_prob == 0.001
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", diffusion)


# ------------------------------------------------------------------------ no host reads
def test_the_read_counter_sees_reads():
    """The counter must see what the sampler must not do (else the next test cannot fail)."""
    t = torch.tensor([1.5, 2.0])
    with HostReads() as mode:
        t.sum().item(), float(t[0]), int(t[1]), bool(t.any()), t.tolist(), t.cpu(), t.numpy()
        [1, 2, 3][t.long()[0]]
        torch.as_tensor(np.ones(2)), torch.tensor([1, 2]), torch.as_tensor(t)
    assert sorted(set(mode.reads)) == sorted(READS + ("numpy→as_tensor", "host→tensor"))


@pytest.mark.parametrize("name", ["uniform", "loss-second-moment"])
def test_sample_and_update_make_no_host_read_or_numpy_copy(diffusion, name, monkeypatch):
    sampler = create_named_schedule_sampler(name, diffusion, seed=0)
    from_numpy_calls = count_from_numpy(monkeypatch)
    losses_gen = torch.Generator().manual_seed(0)
    # 2 microbatches of 8 per step; the history is filled (outside the counter) half-way, so
    # both the uniform and the learned branch are drawn from under it.
    for step in range(12):
        if step == 6 and name == "loss-second-moment":
            fill_history(sampler, np.random.default_rng(0), scale=np.ones(T))
        with HostReads() as mode:
            for _ in range(2):
                t, w = sampler.sample(8, "cpu")
                if hasattr(sampler, "update_with_local_losses"):
                    sampler.update_with_local_losses(t, torch.rand(8, generator=losses_gen))
        assert mode.reads == [], f"step {step}: {mode.reads}"
    assert from_numpy_calls == []
    if name == "loss-second-moment":
        assert sampler.warmed_up()


# ------------------------------------------------------------------ two ranks (gloo)
RANK_TS = [[1, 4, 4, 9], [0, 4, 7, 9]]
RANK_LOSSES = [[0.25, 1.5, 2.5, 3.5], [3.0, 4.0, 5.5, 6.0]]
RANK_ACCEPT = [[True, True, True, True], [True, True, False, True]]


def _rank_worker(rank, port, out_dir):
    # Forked from pytest: one thread keeps any OpenMP pool inherited from the parent unused
    # (the same precaution DataLoader workers take).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        diffusion = create_gaussian_diffusion(steps=T, noise_schedule="cosine")
        sampler = LossSecondMomentResampler(diffusion, history_per_term=2, seed=rank)
        sampler.update_with_local_losses(torch.tensor(RANK_TS[rank]),
                                         torch.tensor(RANK_LOSSES[rank]),
                                         accept=torch.tensor(RANK_ACCEPT[rank]))
        torch.save(sampler.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_all_gathers_every_rank_in_rank_order(tmp_path):
    # fork: the children reuse the imported torch instead of paying ~4 s each to import it again.
    context = mp.start_processes(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    # Rank order shows: timestep 4 gets 1.5, 2.5 (rank 0) then 4.0 (rank 1) and keeps the last
    # two; 9 gets 3.5 then 6.0; rank 1 refused its 7.
    history, counts = np.zeros((T, 2)), np.zeros(T, dtype=np.int64)
    for ts, losses, accept in zip(RANK_TS, RANK_LOSSES, RANK_ACCEPT):
        kept = [(t, loss) for t, loss, a in zip(ts, losses, accept) if a]
        gd_update(history, counts, [t for t, _ in kept], [loss for _, loss in kept])
    assert history[4].tolist() == [2.5, 4.0] and history[9].tolist() == [3.5, 6.0]
    assert counts[7] == 0
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        np.testing.assert_array_equal(state["loss_history"].numpy(), history)
        np.testing.assert_array_equal(state["loss_counts"].numpy(), counts)
