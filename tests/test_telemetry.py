"""Training telemetry: FLOPs per image, peak FLOP/s and MFU, the interval meter, the metrics
line, the progress bar, TensorBoard, and the metrics a short run writes."""
import contextlib
import dataclasses
import io
import json
import math
import os
import select

import pytest
import torch
import torch.nn as nn

from fastdiff import config as C
from fastdiff.models.layers import MultiHeadQKVAttention
from fastdiff.train import cli
from fastdiff.train import telemetry as T

TINY_MODEL = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                  attention_resolutions="4", num_heads=2, class_cond=True, learn_sigma=True)

TINY_RUN = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
            "--channel_mult", "1,2", "--attention_resolutions", "4", "--num_heads", "2",
            "--batch_size", "2", "--log_interval", "2", "--save_interval", "100",
            "--sample_grid", "False", "--optimizer", "torch", "--diffusion_steps", "20",
            "--seed", "5", "--log_format", "line"]


def tiny_cfgs(**overrides):
    argv = ["--data_dir", "/unused"]
    for k, v in {**TINY_MODEL, **overrides}.items():
        argv += [f"--{k}", str(v)]
    model_cfg, diff_cfg, _, _, _ = cli.parse_config(argv)
    return model_cfg, diff_cfg


# ------------------------------------------------------------------------------ FLOPs
def hand_counted_forward_flops(model, x, t, y):
    """Forward FLOPs from layer shapes (2 per multiply-add), recorded with forward hooks:
    convs, linears, and attention's two batched matmuls (QK^T and AV). Also returns the
    FLOPs of the layers whose input needs no gradient (first conv, first time-embed linear)."""
    per_module = {}

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            k = math.prod(module.kernel_size)
            flops = 2 * output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            flops = 2 * output.numel() * module.in_features
        else:  # attention: qkv [B, 3·H·C, T] → two [T, T] x C products per head
            batch, width, length = inputs[0].shape
            flops = 2 * 2 * batch * (width // 3) * length * length
        per_module[module] = per_module.get(module, 0) + flops

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, MultiHeadQKVAttention))]
    with torch.no_grad():
        model(x, t, y=y)
    for h in handles:
        h.remove()
    no_input_grad = per_module[model.input_blocks[0][0]] + per_module[model.time_embed[0]]
    return sum(per_module.values()), no_input_grad


def test_flops_per_image_equals_a_hand_count():
    model_cfg, diff_cfg = tiny_cfgs()
    counted = T.count_flops_per_image(model_cfg, diff_cfg)
    kw = C.model_and_diffusion_defaults()
    kw.update(TINY_MODEL)
    model, _ = C.create_model_and_diffusion(**kw)  # GD's modules, CPU, batch 3
    n = 3
    forward, no_input_grad = hand_counted_forward_flops(
        model, torch.randn(n, 3, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,)))
    # Backward = gradient w.r.t. inputs + w.r.t. weights (2x forward), except that the first
    # conv (image input) and the first time-embedding linear (sinusoid input) need no input grad.
    assert counted == (3 * forward - no_input_grad) // n
    assert counted > 0


def test_flops_grow_with_the_model():
    small = T.count_flops_per_image(*tiny_cfgs())
    wide = T.count_flops_per_image(*tiny_cfgs(num_channels=64))
    assert 3.5 * small < wide < 4.5 * small  # conv FLOPs scale with channels²


# ------------------------------------------------------------- the classifier's FLOPs
TINY_CLASSIFIER = dict(image_size=16, classifier_width=32, classifier_depth=1,
                       classifier_attention_resolutions="8", classifier_channel_mult="1,2")


def hand_counted_classifier_flops(model, x, t):
    """A classifier's forward FLOPs from layer shapes (as hand_counted_forward_flops: 2 per
    multiply-add over convs, linears and attention's two matmuls, here also the attention
    pool's H·W + 1 tokens and the spatial heads' linears), and those of its layers whose
    input needs no gradient (first conv, first time-embed linear)."""
    per_module = {}

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            k = math.prod(module.kernel_size)
            flops = 2 * output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            flops = 2 * output.numel() * module.in_features
        else:  # attention: qkv [B, 3·H·C, T] → QK^T and AV, each T·T·C per head
            batch, width, length = inputs[0].shape
            flops = 2 * 2 * batch * (width // 3) * length * length
        per_module[module] = per_module.get(module, 0) + flops

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, MultiHeadQKVAttention))]
    with torch.no_grad():
        model(x, t)
    for h in handles:
        h.remove()
    no_input_grad = per_module[model.input_blocks[0][0]] + per_module[model.time_embed[0]]
    return sum(per_module.values()), no_input_grad


@pytest.mark.parametrize("pool", ["attention", "spatial_v2"])
def test_classifier_flops_per_image_equals_a_hand_count(pool):
    from fastdiff.models.classifier import create_classifier
    cfg = C.ClassifierConfig(**TINY_CLASSIFIER, classifier_pool=pool)
    counted = T.count_flops_per_image(cfg)
    model = create_classifier(**dataclasses.asdict(cfg))  # GD's modules, CPU, batch 3
    n = 3
    forward, no_input_grad = hand_counted_classifier_flops(
        model, torch.randn(n, 3, 16, 16), torch.randint(0, 1000, (n,)))
    # As for the UNet: backward = input + weight gradients (2x forward), except that the
    # first conv and the first time-embedding linear need no input gradient.
    assert counted == (3 * forward - no_input_grad) // n
    assert counted > 0


def test_classifier_flops_grow_with_width():
    def flops(width):
        return T.count_flops_per_image(
            C.ClassifierConfig(**{**TINY_CLASSIFIER, "classifier_width": width}))

    narrow, wide = flops(64), flops(128)
    # The convs (most of it) scale with width²; attention's T·T products and the 1000-way
    # output projection only with width: a ratio just under 4 (measured 3.76).
    assert 3.5 * narrow < wide < 4 * narrow


def test_classifier_train_logs_its_flops_and_mfu(tmp_path, monkeypatch):
    """fastdiff.classifier_train hands the classifier's count to its telemetry: every metrics
    row has it, and MFU once a peak is known (a CPU has none: a made-up one here)."""
    from fastdiff import classifier_train as CT
    peak = 1e12
    monkeypatch.setattr(T, "device_peak_flops", lambda device, precision: peak)
    argv = ["--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
            "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "4",
            "--diffusion_steps", "20", "--batch_size", "4", "--iterations", "2",
            "--log_interval", "2", "--save_interval", "100", "--tensorboard", "False",
            "--no_progress", "True", "--log_format", "line"]
    assert CT.main(argv + ["--log_dir", str(tmp_path / "run")]) == 0
    classifier_cfg = CT.parse_config(argv)[0]
    flops = T.count_flops_per_image(classifier_cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows and all(r["flops_per_image"] == flops for r in rows)
    for r in rows:
        assert r["mfu"] == pytest.approx(flops * r["images_per_sec"] / peak)
    assert "model FLOPs per training image" in (tmp_path / "run" / "log.txt").read_text()


# --------------------------------------------------------------------- peak and MFU
@pytest.mark.parametrize("name,precision,tf32,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.5),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67.0),
    ("NVIDIA H100 PCIe", "fp16", False, 756.5),
    ("NVIDIA H100 NVL", "bf16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0),
    ("NVIDIA A10", "bf16", False, 125.0),
    ("NVIDIA L40S", "bf16", False, 362.05),
    ("NVIDIA L4", "fp16", False, 121.0),
    ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
    ("NVIDIA GeForce RTX 3090", "fp32", False, 35.6),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
    ("Tesla V100-PCIE-32GB", "fp32", True, 14.0),
])
def test_known_gpus_map_to_datasheet_peaks(name, precision, tf32, tflops):
    assert T.peak_flops_for_name(name, precision, tf32) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name,precision", [("AMD Instinct MI300X", "bf16"),
                                            ("NVIDIA GeForce RTX 3090 Ti", "bf16"),
                                            ("Tesla V100-SXM2-16GB", "bf16")])
def test_unknown_gpu_or_unsupported_precision_has_no_peak(name, precision):
    assert T.peak_flops_for_name(name, precision) is None


def test_cpu_has_no_peak_and_bad_precision_is_an_error():
    assert T.device_peak_flops("cpu", "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        T.peak_flops_for_name("NVIDIA H100", "fp8")


class FakeClock:
    """A clock that moves only when told to. The durations below are binary fractions, so
    every interval metric is exact and the tests compare with ==."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def batches_taking(clock, seconds):
    """An endless data iterator whose every batch takes ``seconds`` of the fake clock."""
    while True:
        clock.advance(seconds)
        yield 1


def test_mfu_uses_per_device_throughput():
    # 1 GFLOP per image, 800 img/s over 2 devices, 1 TFLOP/s peak: 400 GFLOP/s per device.
    assert T.model_flops_utilization(1e9, 800.0, 2, 1e12) == pytest.approx(0.4)
    clock = FakeClock()
    tel = T.Telemetry("cpu", world_size=2, flops_per_image=2e9, peak_flops=1e12, clock=clock)
    for _ in range(4):  # a 2 s interval of 100 images
        clock.advance(0.5)
        tel.step_done(25)
    kvs = tel.interval_metrics()
    assert kvs["images_per_sec"] == 50.0 and kvs["step_time_ms"] == 500.0
    assert kvs["mfu"] == pytest.approx(2e9 * 50.0 / 2 / 1e12, rel=1e-12)  # float products only
    assert kvs["flops_per_image"] == 2e9
    assert "mfu" not in T.Telemetry("cpu", flops_per_image=2e9, clock=clock).interval_metrics()


def test_interval_metrics_start_a_new_interval():
    clock = FakeClock()
    tel = T.Telemetry("cpu", clock=clock)
    clock.advance(4.0)
    tel.step_done(8)
    assert tel.interval_metrics()["images_per_sec"] == 2.0
    clock.advance(0.25)  # the next interval: its own time and images only
    tel.step_done(4)
    kvs = tel.interval_metrics()
    assert kvs["images_per_sec"] == 16.0 and kvs["step_time_ms"] == 250.0
    assert kvs["data_wait_frac"] == 0.0


def test_interval_meter_data_wait_and_paused_time():
    clock = FakeClock()
    meter, data = T.IntervalMeter(clock), batches_taking(clock, 0.125)
    for _ in range(4):
        meter.next_batch(data)  # 0.125 s waiting for data ...
        clock.advance(0.375)  # ... and 0.375 s of step
        meter.step_done(8)
    with meter.paused():
        clock.advance(4.0)  # a checkpoint: not training time
    assert meter.busy_seconds() == 2.0
    assert meter.images_per_sec() == 16.0  # the progress bar's figure
    assert meter.summary() == {"images_per_sec": 16.0, "step_time_ms": 500.0,
                               "data_wait_frac": 0.25}


def test_interval_meter_reports_nothing_for_an_empty_interval():
    clock = FakeClock()
    meter = T.IntervalMeter(clock)
    assert meter.summary() == {} and meter.images_per_sec() is None  # no time has passed
    clock.advance(1.0)
    assert meter.summary() == {"data_wait_frac": 0.0}  # time, but no step yet


def test_metrics_line_lists_known_fields_only():
    line = T.metrics_line({"step": 400, "loss": 0.03124, "images_per_sec": 95.12, "mfu": 0.412,
                           "peak_mem_gib": 3.1, "data_wait_frac": 0.02, "lr": 5e-4})
    assert line == ("step 400 | loss 0.03124 | 95.1 img/s | MFU 41.2% | mem 3.10 GiB | "
                    "data 2% | lr 0.0005")
    assert T.metrics_line({"step": 3, "loss": 1.0}) == "step 3 | loss 1"


# ---------------------------------------------------------------------- progress bar
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_rank0_terminal_without_no_progress():
    assert T.progress_enabled(False, True, FakeTerminal())
    assert not T.progress_enabled(False, True, io.StringIO())  # a pipe or a file
    assert not T.progress_enabled(True, True, FakeTerminal())
    assert not T.progress_enabled(False, False, FakeTerminal())


def test_progress_bar_shows_step_loss_and_throughput():
    out = FakeTerminal()
    bar = T.ProgressBar(10, initial=4, stream=out)
    bar.update(loss=0.1234, images_per_sec=56.78)
    bar.close()
    text = out.getvalue()
    assert "5/10" in text and "loss=0.1234" in text and "img/s=56.8" in text
    silent = io.StringIO()
    T.ProgressBar(10, enabled=False, stream=silent).update(loss=1.0)
    assert silent.getvalue() == ""


def test_progress_bar_draws_on_a_terminal_that_reports_no_size():
    """A pseudo-terminal opened without a size (0 x 0, as under `script` or `docker -t`):
    tqdm alone would draw nothing there."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        assert os.get_terminal_size(slave).columns == 0
        with os.fdopen(slave, "w", closefd=False) as terminal:
            bar = T.ProgressBar(3, stream=terminal)
            for _ in range(3):
                bar.update(loss=0.5, images_per_sec=10.0)
            bar.close()
        # One read may return only part of what the pty holds: drain it.
        chunks = []
        while select.select([master], [], [], 0.2)[0]:
            chunks.append(os.read(master, 65536))
        text = b"".join(chunks).decode()
        assert "3/3" in text
    finally:
        os.close(master)
        os.close(slave)


# ------------------------------------------------------------- a short training run
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """4 steps, metrics every 2, lr annealed over 10 steps (so the logged lr moves)."""
    log_dir = tmp_path_factory.mktemp("telemetry") / "run"
    captured_err = io.StringIO()
    with contextlib.redirect_stderr(captured_err):
        rc = cli.main(TINY_RUN + ["--log_dir", str(log_dir), "--max_steps", "4",
                                  "--lr_anneal_steps", "10", "--lr", "1e-3"])
    assert rc == 0
    rows = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    return log_dir, rows, captured_err.getvalue()


def test_metrics_fields_present_and_sane(short_run):
    log_dir, rows, _ = short_run
    assert [r["step"] for r in rows] == [2, 4]
    model_cfg, diff_cfg = cli.parse_config(TINY_RUN)[:2]
    flops = T.count_flops_per_image(model_cfg, diff_cfg)
    for r in rows:
        for key in ("samples", "loss", "images_per_sec", "flops_per_image", "peak_mem_gib",
                    "data_wait_frac", "lr", "step_time_ms"):
            assert key in r, key
        assert r["samples"] == r["step"] * 2
        assert r["images_per_sec"] > 0 and r["step_time_ms"] > 0 and r["peak_mem_gib"] > 0
        assert 0 <= r["data_wait_frac"] <= 1
        assert r["flops_per_image"] == flops
        assert "mfu" not in r  # no known peak on a CPU
        # GD's schedule: the step with index k (0-based) used lr·(1 − (k − 1)/10) for k ≥ 1.
        k = r["step"] - 1
        assert r["lr"] == pytest.approx(1e-3 * (1 - (k - 1) / 10))
    log_text = (log_dir / "log.txt").read_text()
    assert "step 4 | loss" in log_text and "img/s" in log_text
    assert "MFU not reported" in log_text


def test_tensorboard_scalars_match_jsonl(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_dir, rows, _ = short_run
    events = EventAccumulator(str(log_dir / "tb"))
    events.Reload()
    for key in ("loss", "images_per_sec", "lr", "data_wait_frac"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [2, 4]
        for s, r in zip(scalars, rows):
            assert s.value == pytest.approx(r[key], rel=1e-6)  # stored as float32


def test_no_progress_bar_when_stderr_is_not_a_terminal(short_run):
    _, _, err = short_run
    assert "step/s" not in err and "s/step" not in err and "img/s=" not in err
    assert "\r" not in err


def test_no_progress_flag_is_accepted():
    _, _, train_cfg, _, _ = cli.parse_config(["--no_progress"])
    assert train_cfg.no_progress is True


def test_explicit_tensorboard_without_the_package_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(T, "tensorboard_available", lambda: False)
    with pytest.raises(cli.UsageError, match="tensorboard"):
        cli.parse_config(["--tensorboard", "True"])
    _, _, train_cfg, _, _ = cli.parse_config([])  # not asked for: a warning at startup
    assert train_cfg.tensorboard is True


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "tensorboard_available", lambda: False)
    model_cfg, diff_cfg, train_cfg, _, _ = cli.parse_config(TINY_RUN)
    from fastdiff.train.parallel import DistInfo
    messages = []
    monkeypatch.setattr(cli.log, "warning", lambda msg, *a: messages.append(msg % a))
    tel = cli.build_telemetry(model_cfg, diff_cfg, train_cfg, DistInfo(), str(tmp_path))
    assert tel.tensorboard is None
    assert len(messages) == 1 and "tensorboard is not installed" in messages[0]


@pytest.mark.parametrize("no_progress", [False, True])
def test_sample_cli_progress_bar_over_batches(tmp_path, monkeypatch, no_progress):
    from fastdiff import sample
    kw = C.model_and_diffusion_defaults()
    kw.update(TINY_MODEL)
    model, _ = C.create_model_and_diffusion(**kw)
    torch.save(model.state_dict(), tmp_path / "model000001.pt")
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    rc = sample.main(["--model_path", str(tmp_path / "model000001.pt"), "--num_samples", "2",
                      "--batch_size", "1", "--use_ddim", "--timestep_respacing", "ddim2",
                      "--num_classes", "10", f"--no_progress={no_progress}"] + flags)
    assert rc == 0 and (tmp_path / "samples_2x8x8x3.npz").is_file()
    shown = "2/2" in terminal.getvalue()
    assert shown is not no_progress


@pytest.mark.gpu
def test_cuda_run_reports_mfu_in_unit_interval(tmp_path):
    log_dir = tmp_path / "run"
    rc = cli.main(TINY_RUN + ["--log_dir", str(log_dir), "--max_steps", "6", "--device", "cuda",
                              "--precision", "bf16", "--batch_size", "16", "--compile", "False",
                              "--sample_interval", "3", "--sample_steps", "5"])
    assert rc == 0
    rows = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    name = torch.cuda.get_device_name()
    if T.peak_flops_for_name(name, "bf16") is None:
        pytest.skip(f"no peak FLOP/s known for {name}")
    for r in rows:
        assert 0 < r["mfu"] <= 1 and r["peak_mem_gib"] > 0
    assert (log_dir / "samples" / "step_000006.png").is_file()
