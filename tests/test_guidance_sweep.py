"""benchmarks/guidance_sweep.py on a tiny random model: each row is what fastdiff.evaluate
(classifier-free) or fastdiff.classifier_sample's gradient (classifier guidance) gives for
the same seed and labels, the unguided baselines coincide, and the plot shows both kinds."""
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import config as C
from fastdiff.classifier_sample import classifier_cond_fn, load_classifier
from fastdiff.evaluate import cli as evaluate_cli
from fastdiff.evaluate.digits_classifier import ClassifierSettings, DigitsClassifier
from fastdiff.sampling import generate, load_model, respaced_diffusion

SWEEP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "guidance_sweep.py")

MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, class_cond=True, diffusion_steps=20,
             noise_schedule="cosine")  # the digits preset's schedule
# 64 channels at the lowest resolution: GD's attention pool has 64 channels per head.
CLASSIFIER = dict(image_size=16, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", classifier_channel_mult="1,2",
                  diffusion_steps=20, noise_schedule="cosine")
NUM_SAMPLES, SAMPLE_STEPS = 4, 4
SWEEP_FLAGS = ["--cfg_scales", "1,2", "--classifier_scales", "0,1",
               "--num_samples", str(NUM_SAMPLES), "--sample_steps", str(SAMPLE_STEPS),
               "--batch_size", str(NUM_SAMPLES), "--seed", "0", "--device", "cpu"]
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab: line colours


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("guidance_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: exact equality below compares two runs of the same ops, which holds for
    a fixed thread count; and tiny models gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(module, seed):
    """Every weight moved off GD's init: a zero-initialised output layer would make the model
    ignore its labels (no guidance effect) and the classifier's gradient vanish."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    return module


def write_run(folder, module, config):
    folder.mkdir()
    torch.save(module.state_dict(), folder / "model000010.pt")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model000010.pt"


def untrained_digits_classifier():
    """A seeded, untrained judge: scoring runs for real without training the cached one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        judge = DigitsClassifier(ClassifierSettings()).eval()
    judge.held_out_accuracy, judge.cache_path = 0.1, "untrained (test)"
    return judge


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep run once on a tiny CFG model and classifier; returns (result, models, out
    dir)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    model_kw = {**C.model_and_diffusion_defaults(), **MODEL}
    model, diffusion = C.create_model_and_diffusion(**model_kw, class_dropout_prob=0.1)
    model_path = write_run(tmp_path / "model", perturb(model, 0),
                           {**model_kw, "class_dropout_prob": 0.1, "data_dir": ""})
    classifier_kw = {**C.classifier_and_diffusion_defaults(), **CLASSIFIER}
    classifier, _ = C.create_classifier_and_diffusion(**classifier_kw)
    classifier_path = write_run(tmp_path / "classifier", perturb(classifier, 1), classifier_kw)

    judge = untrained_digits_classifier()
    sweep = load_sweep_module()
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "load_or_train_classifier", lambda: judge)
        patch.setattr(evaluate_cli, "load_or_train_classifier", lambda: judge)
        result = sweep.main(["--model_path", str(model_path), "--classifier_path",
                             str(classifier_path), "--out", str(out), *SWEEP_FLAGS])
        yield result, (model_path, classifier_path, model_kw, classifier_kw), out


def row(result, kind, scale):
    (match,) = [r for r in result["rows"] if r["guidance"] == kind and r["scale"] == scale]
    return match


def config_of(cls, kw):
    return cls(**{f.name: kw[f.name] for f in dataclasses.fields(cls)})


def guided_classifier(classifier_path, classifier_kw, scale):
    """fastdiff.classifier_sample's classifier and guidance gradient, loaded as it loads them."""
    backends = C.resolve_backends("auto", "auto", "cpu", "fp32")
    classifier, _ = load_classifier(classifier_path, config_of(C.ClassifierConfig, classifier_kw),
                                    config_of(C.DiffusionConfig, classifier_kw), backends,
                                    torch.device("cpu"))
    return classifier_cond_fn(classifier, scale)


def evaluator_scores(model_path, model_kw, guidance_scale=1.0, cond_fn=None):
    """fastdiff.evaluate's own loading, sampling and scoring; for classifier guidance, the
    evaluator's sampler call plus the classifier's gradient (it has no classifier guidance)."""
    model_cfg = config_of(C.ModelConfig, model_kw)
    diff_cfg = config_of(C.DiffusionConfig, model_kw)
    ecfg = evaluate_cli.EvalConfig(num_samples=NUM_SAMPLES, sample_steps=SAMPLE_STEPS,
                                   batch_size=NUM_SAMPLES, seed=0)
    model, _ = load_model(model_path, model_cfg, diff_cfg, ecfg.norm_backend,
                          ecfg.attention_backend, torch.device("cpu"), ecfg.precision)
    if cond_fn is None:
        images, labels = evaluate_cli._generate(model, model_cfg, diff_cfg, ecfg,
                                                torch.device("cpu"), 10, guidance_scale)
    else:
        labels = np.arange(NUM_SAMPLES) % 10
        torch.manual_seed(0)
        images, _ = generate(model, respaced_diffusion(diff_cfg, SAMPLE_STEPS, False),
                             NUM_SAMPLES, NUM_SAMPLES, 16, torch.device("cpu"), class_cond=True,
                             num_classes=10, use_ddim=False, clip_denoised=True, labels=labels,
                             cond_fn=cond_fn)
    return evaluate_cli._digits_scores(images, labels, model_cfg, ecfg)


SCORE_KEYS = ("accuracy", "fd", "kid_mean", "kid_std", "predicted_class_counts")


def test_rows_are_the_evaluators_numbers_for_each_guidance(swept):
    result, (model_path, classifier_path, model_kw, classifier_kw), _ = swept
    assert [(r["guidance"], r["scale"]) for r in result["rows"]] == [
        ("classifier-free", 1.0), ("classifier-free", 2.0), ("classifier", 0.0),
        ("classifier", 1.0)]
    # Exact: the same ops on the same inputs in the same order on one thread.
    for scale in (1.0, 2.0):
        expected = evaluator_scores(model_path, model_kw, guidance_scale=scale)
        got = row(result, "classifier-free", scale)
        assert {k: got[k] for k in SCORE_KEYS} == {k: expected[k] for k in SCORE_KEYS}
    expected = evaluator_scores(model_path, model_kw,
                                cond_fn=guided_classifier(classifier_path, classifier_kw, 1.0))
    got = row(result, "classifier", 1.0)
    assert {k: got[k] for k in SCORE_KEYS} == {k: expected[k] for k in SCORE_KEYS}
    # Guidance changed the samples (else the comparisons above could not tell scales apart).
    assert row(result, "classifier-free", 2.0)["fd"] != row(result, "classifier-free", 1.0)["fd"]
    assert row(result, "classifier", 1.0)["fd"] != row(result, "classifier", 0.0)["fd"]
    for r in result["rows"]:
        assert r["seconds_per_image"] == pytest.approx(r["seconds"] / NUM_SAMPLES)


def test_unguided_baselines_coincide(swept):
    """Classifier scale 0 (gradient times 0) and CFG scale 1 are both the conditional model."""
    result, _, _ = swept
    assert result["classifier_scale_0_equals_cfg_scale_1"] is True
    baseline = row(result, "classifier-free", 1.0)
    zero = row(result, "classifier", 0.0)
    assert {k: zero[k] for k in SCORE_KEYS} == {k: baseline[k] for k in SCORE_KEYS}


def test_writes_json_and_a_plot_with_both_kinds(swept):
    result, _, out = swept
    with open(out / "guidance_sweep.json") as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
    with Image.open(out / "guidance_sweep_digits.png") as image:
        assert image.format == "PNG" and min(image.size) >= 300
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # Each kind's line is drawn in its colour: a few hundred pixels of each (a line across
    # two panels); 50 is far above stray anti-aliased pixels of that exact colour.
    for color in (TAB_BLUE, TAB_ORANGE):
        assert (pixels == color).all(axis=1).sum() > 50
    assert not list(out.glob("*.tmp.*"))  # temporary files were renamed
    assert sorted(p.name for p in out.glob("samples_*.png")) == [
        "samples_classifier-free_1.png", "samples_classifier-free_2.png",
        "samples_classifier_0.png", "samples_classifier_1.png"]
