"""GD-compatible flags: names, defaults, boolean parsing, presets; --deterministic."""
import argparse
import dataclasses
import os

import pytest
import torch
import torch._inductor.config as inductor_config

import fastdiff.kernels
from fastdiff import config as C
from fastdiff.train import cli

GD_MODEL_DIFFUSION_KEYS = {
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
    "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16",
    "use_new_attention_order", "diffusion_steps", "noise_schedule", "timestep_respacing",
    "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
}
GD_TRAIN_DEFAULTS = dict(data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0,
                         lr_anneal_steps=0, batch_size=1, microbatch=-1, ema_rate="0.9999",
                         log_interval=10, save_interval=10000, resume_checkpoint="",
                         use_fp16=False, fp16_scale_growth=1e-3)


def test_defaults_are_gds():
    d = C.model_and_diffusion_defaults()
    assert set(d) == GD_MODEL_DIFFUSION_KEYS
    assert d["image_size"] == 64 and d["num_channels"] == 128 and d["num_heads"] == 4
    assert d["attention_resolutions"] == "16,8" and d["use_scale_shift_norm"] is True
    assert d["noise_schedule"] == "linear" and d["diffusion_steps"] == 1000
    args = C.build_parser().parse_args([])
    for k, v in GD_TRAIN_DEFAULTS.items():
        assert getattr(args, k) == v, k


@pytest.mark.parametrize("text,value", [("yes", True), ("True", True), ("t", True), ("Y", True),
                                        ("1", True), ("no", False), ("FALSE", False),
                                        ("f", False), ("n", False), ("0", False)])
def test_gd_boolean_parsing(text, value):
    args = C.build_parser().parse_args(["--class_cond", text])
    assert args.class_cond is value


def test_bare_boolean_flag_means_true():
    args = C.build_parser().parse_args(["--learn_sigma", "--image_size", "32", "--compile"])
    assert args.learn_sigma is True and args.compile is True and args.image_size == 32


def test_bad_boolean_rejected():
    with pytest.raises(argparse.ArgumentTypeError):
        C.str2bool("maybe")


def test_preset_applies_only_without_data_dir_and_yields_to_flags():
    m, d, t, given, preset = cli.parse_config(["--batch_size", "4"])
    assert m.image_size == 16 and m.class_cond is True and t.batch_size == 4
    assert "batch_size" not in preset and preset["image_size"] == 16
    m, d, t, given, preset = cli.parse_config(["--data_dir", "/x"])
    assert preset == {} and m.image_size == 64 and t.batch_size == 1


def test_use_fp16_means_precision_fp16():
    _, _, t, _, _ = cli.parse_config(["--data_dir", "/x", "--use_fp16", "True"])
    assert t.precision == "fp16"
    with pytest.raises(cli.UsageError):
        cli.parse_config(["--data_dir", "/x", "--use_fp16", "True", "--precision", "bf16"])


@pytest.mark.parametrize("argv", [["--precision", "fp8"], ["--ema_rate", "1.5"],
                                  ["--ema_rate", "abc"], ["--class_from", "dirname"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(cli.UsageError):
        cli.parse_config(["--data_dir", "/x"] + argv)


def test_resolve_backends():
    assert C.resolve_backends("auto", "auto", "cuda") == ("fused", "triton")
    assert C.resolve_backends("auto", "auto", "cuda", "fp16") == ("fused", "triton")
    # The Triton attention kernel is bf16/fp16 only: fp32 runs get SDPA.
    assert C.resolve_backends("auto", "auto", "cuda", "fp32") == ("fused", "sdpa")
    assert C.resolve_backends("auto", "triton", "cuda", "fp32") == ("fused", "triton")
    assert C.resolve_backends("auto", "auto", "cpu") == ("torch", "sdpa")
    with pytest.raises(ValueError):
        C.resolve_backends("cudnn", "auto", "cpu")


def test_create_model_and_diffusion_takes_gd_keywords():
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="16", learn_sigma=True, diffusion_steps=50)
    model, diffusion = C.create_model_and_diffusion(**kw)
    assert diffusion.num_timesteps == 50
    assert model.out[-1].out_channels == 6
    with pytest.raises(TypeError, match="unexpected"):
        C.create_model_and_diffusion(**kw, bogus=1)


# ----------------------------------------------------------------- --deterministic
def _determinism_settings():
    return dict(kernels=fastdiff.kernels.is_deterministic(),
                torch=torch.are_deterministic_algorithms_enabled(),
                warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                inductor=inductor_config.deterministic,
                cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_deterministic_flag_is_off_by_default_and_documented():
    assert cli.parse_config([])[2].deterministic is False
    assert cli.parse_config(["--deterministic"])[2].deterministic is True
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(C.TrainConfig)}
    assert "pinned config" in help_text["deterministic"]


def test_deterministic_flag_sets_the_switches_for_the_run_only(monkeypatch):
    # The run itself is replaced by a probe: what matters is the state it starts in.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # so that turning it off shows
    before = _determinism_settings()
    seen = []

    def probe(*args):
        seen.append(_determinism_settings())
        return 0

    monkeypatch.setattr(cli, "_start", probe)
    assert cli.main(["--deterministic", "True"]) == 0
    assert cli.main([]) == 0
    assert seen[0] == dict(kernels=True, torch=True, warn_only=True, cudnn_benchmark=False,
                           inductor=True, cublas=":4096:8")
    assert seen[1] == before  # without the flag nothing changes
    assert _determinism_settings() == before  # main() may run in-process: all restored
