"""python -m fastdiff.image_nll: bits/dim is calc_bpd_loop's total_bpd averaged over a fixed
list of images with seeded noise (the same number on every run), GD's progress lines, the JSON
file, the split of the images over ranks, and a classifier-free-guidance checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff import config as C
from fastdiff import image_nll
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.evaluate.val_loss import load_validation_set

# The generator's toy model and case runner: both sides call the very same code.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gd_golden_nll import run_case  # noqa: E402

GD_NLL = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "gd_nll.pt"),
                    weights_only=True)

MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, class_cond=True, diffusion_steps=50)


def make_checkpoint(tmp_path, class_dropout_prob=0.0):
    """A digits-run checkpoint (every weight off GD's init) and its config.json."""
    kw = {**C.model_and_diffusion_defaults(), **MODEL}
    model, _ = C.create_model_and_diffusion(**kw, class_dropout_prob=class_dropout_prob)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    torch.save(model.state_dict(), tmp_path / "model000010.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {**kw, "data_dir": "", "class_dropout_prob": class_dropout_prob}))
    return tmp_path / "model000010.pt", model, kw


def run(model_path, out, *flags):
    return image_nll.main(["--model_path", str(model_path), "--out", str(out),
                           "--num_samples", "3", "--batch_size", "2",
                           "--timestep_respacing", "5", *flags])


@pytest.mark.parametrize("name", sorted(GD_NLL["cases"]))
def test_calc_bpd_loop_matches_guided_diffusion(name):
    """GD's terms (tests/fixtures/gd_nll.pt, tools/gd_golden_nll.py, GD 22e0df8): every
    column in GD's order, the noise drawn in GD's order, the timesteps the model sees."""
    golden = GD_NLL["cases"][name]
    with torch.no_grad():
        outputs, model_t = run_case(create_gaussian_diffusion, golden)
    assert torch.equal(model_t, golden["model_t"])
    assert sorted(outputs) == sorted(golden["outputs"])
    for key, expected in golden["outputs"].items():
        # Same fp32 operations in the same order (bitwise equal on the generator's machine);
        # another CPU's vectorised exp/log/tanh may differ by a few ulp, which the 1/sqrt(abar)
        # factors of x_0's prediction (up to ~1e2) amplify to ~1e-6 relative.
        torch.testing.assert_close(outputs[key], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} {key}: {m}")


def test_bpd_is_calc_bpd_loop_on_the_held_out_digits_and_deterministic(tmp_path, capsys):
    model_path, model, kw = make_checkpoint(tmp_path)
    assert run(model_path, tmp_path / "a.json") == 0
    stdout = capsys.readouterr().out
    assert "done 2 samples: bpd=" in stdout and "done 3 samples: bpd=" in stdout  # GD's lines
    assert run(model_path, tmp_path / "b.json") == 0
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert first["bpd"] == second["bpd"] and first["terms"] == second["terms"]
    assert first["num_samples"] == 3 and len(first["terms"]["vb"]) == 5

    # By hand: calc_bpd_loop on the first 3 held-out digits, batches [0, 1] and [2], each
    # batch's noise seeded from its first image.
    _, diffusion = C.create_model_and_diffusion(**{**kw, "timestep_respacing": "5"})
    images, labels, _ = load_validation_set(3, 16, class_cond=True)
    model.eval()
    outs = []
    for batch in ([0, 1], [2]):
        torch.manual_seed(image_nll.noise_seed(0, batch[0]))
        outs.append(diffusion.calc_bpd_loop(model, images[batch], clip_denoised=True,
                                            model_kwargs={"y": labels[batch]}))
    total = torch.cat([o["total_bpd"] for o in outs]).double()
    vb = torch.cat([o["vb"] for o in outs]).double().mean(0).flip(0)  # → timestep order
    # fp32 terms summed in float64 in another order: agreement far below fp32 resolution.
    assert first["bpd"] == pytest.approx(total.mean().item(), rel=1e-6)
    assert first["terms"]["vb"] == pytest.approx(vb.tolist(), rel=1e-6)
    assert first["bpd"] == pytest.approx(sum(first["terms"]["vb"]) + first["terms"]["prior_bpd"],
                                         rel=1e-6)
    assert first["timestep_map"] == sorted(diffusion.timestep_map)

    # The noise matters, so the seed is what makes it repeatable.
    assert run(model_path, tmp_path / "c.json", "--seed", "1") == 0
    assert json.loads((tmp_path / "c.json").read_text())["bpd"] != first["bpd"]


@pytest.mark.parametrize("num_images,batch_size,world_size",
                         [(7, 2, 3), (3, 2, 2), (1, 1, 2), (5, 1, 1)])
def test_ranks_split_every_image_once_in_the_same_number_of_batches(num_images, batch_size,
                                                                     world_size):
    per_rank = [image_nll.rank_batches(num_images, batch_size, r, world_size)
                for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # each batch ends in a collective
    positions = [p for batches in per_rank for batch in batches for p in batch]
    assert sorted(positions) == list(range(num_images))
    assert all(len(batch) <= batch_size for batches in per_rank for batch in batches)


def test_batch_size_one_does_not_depend_on_the_number_of_ranks(tmp_path):
    """The sums of two ranks' batches (what all_reduce adds) are one process's sums."""
    _, model, kw = make_checkpoint(tmp_path)
    model.eval()
    _, diffusion = C.create_model_and_diffusion(**{**kw, "timestep_respacing": "3"})
    images, labels, _ = load_validation_set(3, 16, class_cond=True)

    def summed(world_size):
        total = 0.0
        for rank in range(world_size):
            for batch in image_nll.rank_batches(3, 1, rank, world_size):
                sums = image_nll.bpd_sums(model, diffusion, images, labels, batch, seed=0,
                                          clip_denoised=True, device=torch.device("cpu"))
                total += sums["total_bpd"]
        return total

    assert torch.equal(summed(1), summed(2))


def test_two_ranks_under_torchrun_give_the_one_process_number(tmp_path):
    """GD's default --batch_size 1: rank r takes images r, r + 2, ...; the all-reduced sums
    are one process's (each image's noise is seeded from its position)."""
    model_path, _, _ = make_checkpoint(tmp_path)
    flags = ["--num_samples", "3", "--batch_size", "1", "--timestep_respacing", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastdiff.image_nll", "--model_path", str(model_path), "--out",
         str(tmp_path / "two.json"), *flags],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done 3 samples: bpd=" in proc.stdout  # ranks 0 and 1 together, then rank 0 alone
    assert image_nll.main(["--model_path", str(model_path), "--out", str(tmp_path / "one.json"),
                           *flags]) == 0
    two, one = (json.loads((tmp_path / n).read_text()) for n in ("two.json", "one.json"))
    # Not bitwise: the subprocesses run one thread each, this process as many as pytest has
    # (CI: 2), and a conv's summation order follows the thread count. 1e-6 relative is ~10x
    # float32 rounding of these sums; a rank that is not all-reduced moves bpd by ~50%.
    assert two["num_samples"] == 3
    assert abs(two["bpd"] - one["bpd"]) <= 1e-6 * abs(one["bpd"])
    assert two["terms"].keys() == one["terms"].keys()
    for key in one["terms"]:
        np.testing.assert_allclose(two["terms"][key], one["terms"][key], rtol=1e-5, atol=1e-7)


def test_classifier_free_guidance_checkpoint_loads(tmp_path):
    model_path, _, _ = make_checkpoint(tmp_path, class_dropout_prob=0.1)
    assert run(model_path, tmp_path / "nll.json", "--num_samples", "1") == 0


def test_bad_flags_and_missing_checkpoint_are_one_line(tmp_path, capsys):
    model_path, _, _ = make_checkpoint(tmp_path)
    assert run(model_path, tmp_path / "x.json", "--batch_size", "0") == 2
    assert run(tmp_path / "missing.pt", tmp_path / "x.json") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "fastdiff.image_nll: error: --batch_size must be at least 1, got 0"
    assert err[1].startswith("fastdiff.image_nll: error: checkpoint file not found")
    assert len(err) == 2 and not (tmp_path / "x.json").exists()
