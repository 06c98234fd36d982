"""Timestep samplers: distributions, warm-up, importance weights, state round trip, rank sync."""
import io
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdiff.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_gaussian_diffusion,
    create_named_schedule_sampler,
)

T = 20


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=T, noise_schedule="cosine")


def fill_history(sampler, rng, scale, skip=()):
    """Give every timestep (but `skip`) a full history of losses ~ scale[t] * U(0.5, 1.5)."""
    for t in range(sampler.diffusion.num_timesteps):
        if t in skip:
            continue
        losses = scale[t] * rng.uniform(0.5, 1.5, size=sampler.history_per_term)
        sampler.update_with_all_losses([t] * len(losses), losses.tolist())


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
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0, "cpu")


def test_loss_second_moment_is_uniform_until_warm(diffusion):
    sampler = LossSecondMomentResampler(diffusion, seed=0)
    rng = np.random.default_rng(0)
    fill_history(sampler, rng, scale=np.arange(1, T + 1), skip={7})
    sampler.update_with_all_losses([7] * 9, [1.0] * 9)  # one short of warm
    assert np.array_equal(sampler.weights(), np.ones(T))
    _, w = sampler.sample(64, "cpu")
    assert torch.equal(w, torch.ones(64))
    sampler.update_with_all_losses([7], [1.0])
    assert not np.allclose(sampler.weights(), sampler.weights()[0])


def test_loss_second_moment_weights_after_warmup(diffusion):
    sampler = LossSecondMomentResampler(diffusion, seed=0)
    rng = np.random.default_rng(1)
    fill_history(sampler, rng, scale=np.linspace(0.1, 5.0, T) ** 2)
    history = np.stack([sampler._loss_history[t] for t in range(T)])
    rms = np.sqrt((history ** 2).mean(axis=1))
    expected = 0.999 * rms / rms.sum() + 0.001 / T
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0, abs=1e-12)

    t, w = sampler.sample(20000, "cpu")
    p = expected / expected.sum()
    torch.testing.assert_close(w.double(), torch.from_numpy(1 / (T * p[t.numpy()])), rtol=1e-6, atol=0)
    # E_p[1/(T p)] = 1: the weighted objective is unbiased for the uniform average.
    assert w.double().mean().item() == pytest.approx(1.0, abs=0.05)
    freq = torch.bincount(t, minlength=T).double().numpy() / len(t)
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / len(t)).max())


def test_history_keeps_the_latest_losses(diffusion):
    sampler = LossSecondMomentResampler(diffusion, history_per_term=4)
    sampler.update_with_all_losses([3] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert sampler._loss_history[3].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert sampler._loss_counts[3] == 4


def test_local_update_without_process_group(diffusion):
    assert not dist.is_initialized()
    sampler = LossSecondMomentResampler(diffusion)
    sampler.update_with_local_losses(torch.tensor([2, 5, 2]), torch.tensor([0.5, 1.5, 2.5]))
    assert sampler._loss_counts[[2, 5]].tolist() == [2, 1]
    assert sampler._loss_history[2, :2].tolist() == [0.5, 2.5]
    with pytest.raises(ValueError, match="equal length"):
        sampler.update_with_local_losses(torch.tensor([1, 2]), torch.tensor([1.0]))


def test_state_dict_round_trip_resumes_exactly(diffusion):
    a = LossSecondMomentResampler(diffusion, seed=11)
    fill_history(a, np.random.default_rng(2), scale=np.linspace(1, 3, T))
    a.sample(17, "cpu")
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    b = LossSecondMomentResampler(diffusion, seed=99)
    b.load_state_dict(state)
    np.testing.assert_array_equal(a.weights(), b.weights())
    for _ in range(3):
        ta, wa = a.sample(32, "cpu")
        tb, wb = b.sample(32, "cpu")
        assert torch.equal(ta, tb) and torch.equal(wa, wb)
    state["loss_history"] = state["loss_history"][:, :5]
    with pytest.raises(ValueError, match="does not fit"):
        b.load_state_dict(state)

    u1, u2 = UniformSampler(diffusion, seed=1), UniformSampler(diffusion, seed=2)
    u1.sample(5, "cpu")
    u2.load_state_dict(u1.state_dict())
    assert torch.equal(u1.sample(9, "cpu")[0], u2.sample(9, "cpu")[0])


def test_create_named_schedule_sampler(diffusion):
    assert type(create_named_schedule_sampler("uniform", diffusion)) is UniformSampler
    s = create_named_schedule_sampler("loss-second-moment", diffusion, seed=5)
    assert type(s) is LossSecondMomentResampler and s.history_per_term == 10 and s.uniform_prob == 0.001
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", diffusion)


# ---------------------------------------------------------------------------------------------
# two ranks, uneven batches (gloo on 127.0.0.1)

RANK_TS = [[1, 4, 4], [0, 4, 7, 9, 19]]
RANK_LOSSES = [[0.25, 1.5, 2.5], [3.0, 4.0, 5.5, 6.0, 7.25]]


def _rank_worker(rank, port, out_dir):
    # Forked from pytest: one thread keeps any OpenMP pool inherited from the parent unused
    # (the same precaution DataLoader workers take).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        diffusion = create_gaussian_diffusion(steps=T, noise_schedule="cosine")
        sampler = LossSecondMomentResampler(diffusion, seed=rank)
        sampler.update_with_local_losses(torch.tensor(RANK_TS[rank]), torch.tensor(RANK_LOSSES[rank]))
        torch.save(sampler.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_all_gathers_uneven_batches_across_ranks(tmp_path, diffusion):
    # fork: the children reuse the imported torch instead of paying ~4 s each to import it again.
    context = mp.start_processes(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    expected = LossSecondMomentResampler(diffusion)
    expected.update_with_all_losses(RANK_TS[0] + RANK_TS[1], RANK_LOSSES[0] + RANK_LOSSES[1])
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        np.testing.assert_array_equal(state["loss_history"].numpy(), expected._loss_history)
        np.testing.assert_array_equal(state["loss_counts"].numpy(), expected._loss_counts)
