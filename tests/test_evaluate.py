"""python -m fastdiff.evaluate: feature statistics, the digits classifier, the validation loss
and the CLI end to end on a checkpoint trained here."""
import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import config as C
from fastdiff.evaluate import cli
from fastdiff.evaluate import digits_classifier as dc
from fastdiff.evaluate.digits_metrics import held_out_digits, score_digit_samples
from fastdiff.evaluate.feature_stats import frechet_distance, kernel_inception_distance
from fastdiff.evaluate.val_loss import (fixed_timesteps, load_validation_set, validation_loss,
                                        validation_noise)
from fastdiff.models.unet import UNetModel

TINY_MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                  attention_resolutions="8", num_heads=2, diffusion_steps=40)
TINY_TRAIN = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
              "--attention_resolutions", "8", "--num_heads", "2", "--batch_size", "8",
              "--max_steps", "2", "--save_interval", "2", "--log_interval", "1",
              "--sample_grid", "False", "--optimizer", "torch", "--diffusion_steps", "40"]
QUICK_EVAL = ["--num_val", "12", "--batch_size", "16", "--num_samples", "20",
              "--sample_steps", "3", "--kid_subsets", "5"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast as two on an idle machine, and on a busy 2-core
    machine OpenMP's barriers made two threads up to ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """The digits classifier, trained once per session into a private cache folder."""
    directory = tmp_path_factory.mktemp("fastdiff_cache")
    return directory, dc.load_or_train_classifier(directory=str(directory))


def perturb_(state_dict, seed=0):
    """Add seeded noise to every weight. GD zero-initialises the output conv, and two steps
    of training leave it at ~1e-4: such a model samples nearly the same images whatever the
    labels, so a test could not see labels lost or shuffled."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in state_dict.values():
            value.add_(torch.randn(value.shape, generator=generator), alpha=0.05)
    return state_dict


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An EMA checkpoint (+ config.json) of a 2-step digits run of `fastdiff.train`, its
    weights then perturbed (perturb_) so that the labels visibly steer the samples."""
    from fastdiff.train import cli as train_cli

    log_dir = tmp_path_factory.mktemp("tiny_run")
    assert train_cli.main(TINY_TRAIN + ["--log_dir", str(log_dir)]) == 0
    checkpoint = log_dir / "ema_0.99_000002.pt"
    torch.save(perturb_(torch.load(checkpoint, weights_only=True)), checkpoint)
    return checkpoint


def tiny_model(**extra):
    kw = C.model_and_diffusion_defaults()
    kw.update(TINY_MODEL, **extra)
    model, diffusion = C.create_model_and_diffusion(**kw)
    perturb_(model.state_dict())  # state_dict tensors share the parameters' storage
    return model.eval(), diffusion, kw


# -- feature statistics ---------------------------------------------------------------------

def _rotation(dim, rng):
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_matches_closed_form_for_gaussians(method):
    # Covariances R diag(a) R^T and R diag(b) R^T commute, so the closed form is
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    dim = 5
    rot = _rotation(dim, rng)
    a, b = rng.uniform(0.5, 3.0, dim), rng.uniform(0.5, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim) + 2.0, rng.normal(size=dim) - 1.0
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    n = 200_000
    x = mu1 + (rng.normal(size=(n, dim)) * np.sqrt(a)) @ rot.T
    y = mu2 + (rng.normal(size=(n, dim)) * np.sqrt(b)) @ rot.T
    assert frechet_distance(x, y, method=method) == pytest.approx(exact, rel=0.02)


def test_frechet_distance_routes_agree_and_self_distance_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7)) + 3.0
    y = rng.normal(size=(40, 7)) @ rng.normal(size=(7, 7)) - 1.0
    scipy_fd, eigh_fd = frechet_distance(x, y, "scipy"), frechet_distance(x, y, "eigh")
    assert scipy_fd > 1.0 and scipy_fd == pytest.approx(eigh_fd, rel=1e-8)
    for method in ("scipy", "eigh"):
        assert frechet_distance(x, x, method) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than dimensions: singular covariances still give finite, agreeing values.
    x, y = rng.normal(size=(10, 30)), rng.normal(size=(12, 30)) + 0.5
    assert frechet_distance(x, y, "scipy") == pytest.approx(frechet_distance(x, y, "eigh"),
                                                            rel=1e-6)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    # One subset of all rows is the whole-set estimate: compare with explicit double loops.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 4)) + 0.7, rng.normal(size=(9, 4))

    def k(u, v):
        return (u @ v / 4 + 1) ** 3

    m = 9
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    shifted = rng.normal(size=(600, 16)) * 1.3 + 0.4
    same_mean, same_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    diff_mean, diff_std = kernel_inception_distance(x, shifted, num_subsets=20, subset_size=300)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert diff_mean > 20 * abs(same_mean) and diff_mean > 5 * diff_std


def test_feature_stats_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="feature sizes"):
        kernel_inception_distance(np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.ones((5, 2)), np.ones((5, 2)), method="svd")
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.ones((3, 2)))


# -- digits classifier ----------------------------------------------------------------------

def test_classifier_reaches_95_percent_on_held_out_digits_and_is_cached(classifier_cache):
    directory, classifier = classifier_cache
    _, labels = dc.load_digits_arrays()
    _, held = dc.digits_split(len(labels))
    _, predicted = dc.embed(classifier, held_out_digits(16))
    accuracy = float(np.mean(predicted == labels[held]))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(classifier.held_out_accuracy)
    # Second use: the cached file, identical weights, no retraining.
    cached = dc.load_or_train_classifier(directory=str(directory))
    assert cached.cache_path == classifier.cache_path
    assert len(list(directory.glob("digits_classifier_*.pt"))) == 1
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, cached.state_dict()[key]), key


def test_classifier_training_is_deterministic(tmp_path):
    settings = dc.ClassifierSettings(epochs=1)  # one epoch: determinism, not accuracy
    a = dc.load_or_train_classifier(settings, directory=str(tmp_path / "a"))
    rng_before = torch.get_rng_state()
    b = dc.load_or_train_classifier(settings, directory=str(tmp_path / "b"))
    assert torch.equal(rng_before, torch.get_rng_state())  # private generators only
    assert a.held_out_accuracy == b.held_out_accuracy
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # A corrupt cache file is a cache miss: retrained (to the same weights) and rewritten.
    with open(a.cache_path, "wb") as f:
        f.write(b"not a torch file")
    c = dc.load_or_train_classifier(settings, directory=str(tmp_path / "a"))
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.load(a.cache_path, weights_only=True)["held_out_accuracy"] == a.held_out_accuracy


def test_classifier_cache_key_changes_with_settings_and_data():
    images, labels = dc.load_digits_arrays()
    base = dc.cache_key(dc.ClassifierSettings(), images, labels)
    assert dc.cache_key(dc.ClassifierSettings(epochs=3), images, labels) != base
    changed = images.copy()
    changed[0, 0, 0] += 1
    assert dc.cache_key(dc.ClassifierSettings(), changed, labels) != base


def test_real_digits_score_far_better_than_noise_and_shuffled_pixels(classifier_cache):
    _, classifier = classifier_cache
    _, labels = dc.load_digits_arrays()
    train, _ = dc.digits_split(len(labels))
    reference = held_out_digits(16)
    real = dc.digits_uint8(train[:300], 16)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=real.shape, dtype=np.uint8)
    shuffled = real.reshape(len(real), -1, 3)[:, rng.permutation(16 * 16)].reshape(real.shape)
    scores = {name: score_digit_samples(classifier, images, labels[train[:300]], reference,
                                        kid_subsets=10, kid_subset_size=200)
              for name, images in [("real", real), ("noise", noise), ("shuffled", shuffled)]}
    assert scores["real"]["accuracy"] > 0.95
    for bad in ("noise", "shuffled"):
        assert scores[bad]["fd"] > 10 * scores["real"]["fd"], bad
        assert scores[bad]["kid_mean"] > 10 * scores["real"]["kid_mean"], bad
        assert scores[bad]["accuracy"] < 0.5, bad


def test_prepare_images_resizes_and_rejects_non_uint8():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = dc.prepare_images(images, 16)
    assert x.shape == (3, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="uint8 NHWC"):
        dc.prepare_images(images.astype(np.float32), 16)


# -- validation loss ------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 40, 1000, 4001])
def test_fixed_timesteps_are_eight_equidistant_from_0_to_T_minus_1(steps):
    ts = fixed_timesteps(steps)
    assert len(ts) == 8 and ts[0] == 0 and ts[-1] == steps - 1
    gaps = np.diff(ts)
    assert gaps.min() >= 0 and gaps.max() - gaps.min() <= 1
    for i, t in enumerate(ts):
        assert abs(t - i * (steps - 1) / 7) <= 0.5


def test_validation_loss_is_deterministic_and_equals_training_losses():
    model, diffusion, _ = tiny_model(class_cond=True, learn_sigma=True)
    images, labels, _ = load_validation_set(7, 16, class_cond=True)
    before = torch.get_rng_state()
    first = validation_loss(model, diffusion, images, labels, seed=5, batch_size=4)
    second = validation_loss(model, diffusion, images, labels, seed=5, batch_size=4)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is not used
    assert first == second
    assert set(first) >= {"timesteps", "mse", "vb", "loss", "mean", "num_images"}
    assert first["num_images"] == 7 and first["timesteps"] == fixed_timesteps(40)
    # One timestep, recomputed directly with the diffusion's training_losses in one batch.
    k = 3
    noise = validation_noise(5, k, range(7), images.shape[1:])
    t = torch.full((7,), first["timesteps"][k], dtype=torch.long)
    with torch.no_grad():
        terms = diffusion.training_losses(model, images, t, model_kwargs={"y": labels},
                                          noise=noise)
    for name in ("mse", "vb", "loss"):
        assert first[name][k] == pytest.approx(terms[name].double().mean().item(), rel=1e-5)
    assert first["mean"]["mse"] == pytest.approx(np.mean(first["mse"]))


def test_validation_noise_does_not_depend_on_batching():
    whole = validation_noise(0, 2, range(6), (3, 5, 5))
    part = validation_noise(0, 2, range(3, 6), (3, 5, 5))
    assert torch.equal(whole[3:], part)
    assert not torch.equal(whole, validation_noise(0, 3, range(6), (3, 5, 5)))  # timestep
    assert not torch.equal(whole, validation_noise(1, 2, range(6), (3, 5, 5)))  # seed
    assert abs(whole.mean().item()) < 0.2 and 0.8 < whole.std().item() < 1.2


def test_validation_set_digits_are_held_out_and_folders_use_gd_order(tmp_path):
    images, labels, _ = load_validation_set(7, 16, class_cond=True)
    _, all_labels = dc.load_digits_arrays()
    held = dc.digits_split(len(all_labels))[1][:7]
    assert images.shape == (7, 3, 16, 16) and labels.tolist() == all_labels[held].tolist()
    rng = np.random.default_rng(0)
    for name in ["b_2.png", "a_1.png", "c_3.png"]:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
    images, labels, description = load_validation_set(2, 16, data_dir=str(tmp_path),
                                                      class_cond=True)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]  # a_1, b_2
    assert "first 2 images" in description


# -- the CLI --------------------------------------------------------------------------------

def test_cli_end_to_end_on_a_trained_checkpoint(tiny_checkpoint, classifier_cache, tmp_path,
                                                monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_CACHE", str(classifier_cache[0]))
    generated, scored = [], []
    real_generate, real_score = cli.generate, cli.score_digit_samples

    def recording_generate(*args, labels=None, **kwargs):
        rng = torch.get_rng_state()
        with labels_seen_by_the_unet() as seen:
            images, returned = real_generate(*args, labels=labels, **kwargs)
        rng_after = torch.get_rng_state()
        torch.set_rng_state(rng)  # the same noise, each sample asked for the next class
        relabelled, _ = real_generate(*args, labels=(labels + 1) % 10, **kwargs)
        torch.set_rng_state(rng_after)
        generated.append(dict(labels=labels.copy(), seen=seen, images=images,
                              relabelled=relabelled))
        return images, returned

    def recording_score(classifier, samples, labels, *args, **kwargs):
        scored.append(dict(samples=samples, labels=np.asarray(labels).copy()))
        return real_score(classifier, samples, labels, *args, **kwargs)

    monkeypatch.setattr(cli, "generate", recording_generate)
    monkeypatch.setattr(cli, "score_digit_samples", recording_score)
    out = tmp_path / "eval.json"
    rc = cli.main(["--model_path", str(tiny_checkpoint), "--out", str(out)] + QUICK_EVAL)
    assert rc == 0
    [run], [score] = generated, scored
    # The digits' 10 classes, each twice (the model's label table has GD's 1000 rows).
    assert sorted(run["labels"].tolist()) == sorted(list(range(10)) * 2)
    # The UNet saw those labels, sample by sample (batches of 16 and 4, 3 steps each) ...
    batches = [run["labels"][:16]] * 3 + [run["labels"][16:]] * 3
    assert [y.tolist() for y in run["seen"]] == [b.tolist() for b in batches]
    # ... they steer the samples (other labels, other images) ...
    assert np.abs(run["relabelled"].astype(int) - run["images"]).mean() > 2
    # ... and the classifier's accuracy compares each sample with its own label.
    assert np.array_equal(score["samples"], run["images"])
    assert score["labels"].tolist() == run["labels"].tolist()
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert result["checkpoint"] == str(tiny_checkpoint) and result["step"] == 2
    val = result["val_loss"]
    assert val["timesteps"] == fixed_timesteps(40) and val["num_images"] == 12
    assert len(val["mse"]) == 8 and all(0 < v < 10 for v in val["mse"])
    digits = result["digits"]
    for key in ("accuracy", "fd", "kid_mean", "kid_std", "num_samples"):
        assert key in digits, key
    assert 0 <= digits["accuracy"] <= 1 and digits["fd"] > 0 and digits["num_samples"] == 20
    assert digits["classifier"]["path"] == classifier_cache[1].cache_path  # the cached one
    assert result["fid"] is None and result["settings"]["sample_steps"] == 3
    assert result["settings"]["model"]["num_channels"] == 32  # read from config.json

    # Default output beside the checkpoint; the same checkpoint gives the same numbers.
    rc = cli.main(["--model_path", str(tiny_checkpoint), "--num_samples", "0"] + QUICK_EVAL[:4])
    assert rc == 0
    again = json.loads((tiny_checkpoint.parent / "eval_ema_0.99_000002.json").read_text())
    assert again["val_loss"] == val and again["digits"] is None
    assert any("--num_samples 0" in note for note in again["notes"])


@contextlib.contextmanager
def labels_seen_by_the_unet():
    """The class labels (y) of every UNet call inside the block, in call order."""
    seen = []
    forward = UNetModel.forward

    def recording_forward(self, x, timesteps, y=None):
        seen.append(y.clone())
        return forward(self, x, timesteps, y)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNetModel, "forward", recording_forward)
        yield seen


def image_folder_run(tmp_path, step, num_images):
    """A tiny model's checkpoint with a config.json naming an image folder of random 16x16
    images (a run that was not on the digits); returns the checkpoint's path."""
    model, _, kw = tiny_model()
    checkpoint = tmp_path / f"model{step:06d}.pt"
    torch.save(model.state_dict(), checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": str(data)}))
    return checkpoint


def test_cli_skips_digits_scores_for_an_image_folder_run(tmp_path, capsys):
    checkpoint = image_folder_run(tmp_path, step=5, num_images=3)
    rc = cli.main(["--model_path", str(checkpoint)] + QUICK_EVAL)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["digits"] is None and result["step"] == 5
    assert result["val_loss"]["num_images"] == 3
    assert any("digits scores skipped" in note for note in result["notes"])


def test_bad_model_path_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope" / "model000001.pt"
    proc = subprocess.run([sys.executable, "-m", "fastdiff.evaluate", "--model_path",
                           str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr


def test_bad_inputs_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    cases = [
        (["--inception_weights", str(weights)], str(weights)),
        (["--num_val", "0"], "--num_val"),
        (["--precision", "fp8"], "--precision"),
        (["--num_channels", "64"], "does not fit the model"),
    ]
    for extra, expected in cases:
        rc = cli.main(["--model_path", str(tiny_checkpoint), "--num_samples", "2"] + extra)
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert expected in err and err.count("\n") == 1, err


def test_fid_without_torch_fidelity_names_the_install(tiny_checkpoint, tmp_path, capsys):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed: the missing-package error cannot happen")
    except ImportError:
        pass
    weights = tmp_path / "inception.pth"
    torch.save({}, weights)
    rc = cli.main(["--model_path", str(tiny_checkpoint), "--inception_weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install" in err and "torch-fidelity" in err and err.count("\n") == 1


def test_real_fid_with_a_local_weights_file(tmp_path, capsys, monkeypatch):
    """Real FID path with a randomly initialised Inception saved to a local file (no download)."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   reason="torch-fidelity not installed (pip install '.[fid]')")
    with monkeypatch.context() as patch:  # build the network without any weights to load
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict",
                      lambda self, *a, **k: None)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # He init keeps the random features from vanishing
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    checkpoint = image_folder_run(tmp_path, step=1, num_images=4)
    rc = cli.main(["--model_path", str(checkpoint), "--num_val", "2",
                   "--num_samples", "3", "--sample_steps", "2", "--fid_num_ref", "3",
                   "--inception_weights", str(tmp_path / "inception.pth")])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["fid"], float) and result["fid"] > 0


# -- classifier-free guidance -----------------------------------------------------------

def digits_run_with_label_dropout(tmp_path, class_dropout_prob=0.1):
    """A tiny class-conditional digits model's checkpoint and config.json; with p > 0 it has
    the null-class row (known to the loader from the config.json alone)."""
    model, _, kw = tiny_model(class_cond=True, class_dropout_prob=class_dropout_prob)
    checkpoint = tmp_path / "ema_0.9999_000004.pt"
    torch.save(model.state_dict(), checkpoint)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": ""}))
    return checkpoint


def test_cli_scores_the_digits_at_each_guidance_scale(tmp_path, classifier_cache, monkeypatch,
                                                      capsys):
    monkeypatch.setenv("FASTDIFF_CACHE", str(classifier_cache[0]))
    checkpoint = digits_run_with_label_dropout(tmp_path)
    generated = []
    real_generate = cli.generate

    def recording_generate(*args, labels=None, guidance_scale=1.0, **kwargs):
        with labels_seen_by_the_unet() as seen:
            images, returned = real_generate(*args, labels=labels,
                                             guidance_scale=guidance_scale, **kwargs)
        generated.append(dict(scale=guidance_scale, labels=labels.copy(), seen=seen,
                              images=images))
        return images, returned

    monkeypatch.setattr(cli, "generate", recording_generate)
    rc = cli.main(["--model_path", str(checkpoint), "--guidance_scale", "1,3",
                   "--out", str(tmp_path / "eval.json")] + QUICK_EVAL)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    plain, guided = generated
    assert (plain["scale"], guided["scale"]) == (1.0, 3.0)
    assert np.array_equal(plain["labels"], guided["labels"])  # the same requests per scale
    assert all(len(y) == 16 and y.max() < 10 for y in plain["seen"][:3])  # s = 1: one half
    assert all(y[16:].tolist() == [1000] * 16 for y in guided["seen"][:3])  # s = 3: null half
    assert np.abs(plain["images"].astype(int) - guided["images"]).mean() > 2

    per_scale = result["digits_by_guidance_scale"]
    assert [entry["guidance_scale"] for entry in per_scale] == [1.0, 3.0]
    for entry in per_scale:
        assert 0 <= entry["accuracy"] <= 1 and entry["fd"] > 0 and entry["num_samples"] == 20
    assert per_scale[0]["fd"] != per_scale[1]["fd"]
    # "digits" keeps its meaning: the first scale's scores, which a default run reproduces.
    assert {k: v for k, v in per_scale[0].items() if k != "guidance_scale"} == result["digits"]
    rc = cli.main(["--model_path", str(checkpoint), "--out", str(tmp_path / "plain.json")]
                  + QUICK_EVAL)
    assert rc == 0
    default = json.loads(capsys.readouterr().out)
    assert default["digits"] == result["digits"] and default["val_loss"] == result["val_loss"]
    assert [e["guidance_scale"] for e in default["digits_by_guidance_scale"]] == [1.0]


def test_guidance_scales_need_the_null_row_and_numbers(tmp_path, capsys):
    checkpoint = digits_run_with_label_dropout(tmp_path, class_dropout_prob=0.0)
    for scales, expected in (("1,2", "--class_dropout_prob > 0"), ("1,x", "--guidance_scale")):
        rc = cli.main(["--model_path", str(checkpoint), "--guidance_scale", scales] + QUICK_EVAL)
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("eval_*.json"))  # nothing written
