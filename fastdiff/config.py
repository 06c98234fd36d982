"""Configuration: guided-diffusion's flags as dataclasses, and GD's argparse built from them.

The three dataclasses hold every flag of GD's ``scripts/image_train.py`` with GD's defaults
(model, diffusion, training) plus fastdiff's own (kernels, precision, checkpoints). Each
field's ``help`` metadata is its documentation and its ``--help`` text. The command line
accepts GD's spelling and GD's boolean parsing, so an existing GD command line runs as is.
GD's other models have theirs: :class:`ClassifierConfig` (``classifier_*.py``) and
:class:`SuperResModelConfig` (``super_res_*.py``), with GD's factories below.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from fastdiff.models.layers import ATTENTION_BACKENDS, NORM_BACKENDS
from fastdiff.runtime import PRECISIONS

OPTIMIZERS = ("fused", "torch")
CLASSIFIER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
NOISE_SCHEDULES = ("linear", "cosine")

# Flags whose change alters the parameters' shapes or meaning: resuming a checkpoint with
# another value is refused (fastdiff/train/checkpoint.py, check_resume_compatible).
MODEL_SHAPE_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads",
                     "num_heads_upsample", "num_head_channels", "attention_resolutions",
                     "channel_mult", "class_cond", "use_scale_shift_norm", "resblock_updown",
                     "use_new_attention_order", "learn_sigma")


class ConfigError(ValueError):
    """A flag value or combination that cannot run; the message is one line naming the flag."""


def _f(default, help):
    return field(default=default, metadata={"help": help})


def _one_of(flag, value, allowed):
    if value not in allowed:
        raise ConfigError(f"--{flag} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                          f"got {value!r}")


def _at_least(flag, value, low):
    if value < low:
        raise ConfigError(f"--{flag} must be >= {low}, got {value}")


def parse_ema_rates(text):
    """'0.9999,0.99' → [0.9999, 0.99]; ConfigError unless each is a rate in (0, 1)."""
    rates = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            rate = float(part)
        except ValueError:
            rate = None
        if rate is None or not 0.0 < rate < 1.0:
            raise ConfigError(f"--ema_rate: {part!r} is not a rate in (0, 1)")
        rates.append(rate)
    return rates


def parse_ema_stds(text):
    """'0.05,0.10' → [0.05, 0.1]; ConfigError unless each sigma_rel is in (0, 0.3)."""
    from fastdiff.power_ema import validate_std

    stds = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            stds.append(validate_std(part))
        except ValueError as e:
            raise ConfigError(f"--ema_std: {e}") from None
    names = [f"{s:.3f}" for s in stds]
    if len(set(names)) != len(names):
        raise ConfigError(f"--ema_std: values must differ at 3 decimals (their names), got {text!r}")
    return stds


@dataclass
class ModelConfig:
    """The UNet (GD's model flags, GD's defaults)."""
    image_size: int = _f(64, "side of the square training images, in pixels")
    num_channels: int = _f(128, "base channel count of the UNet")
    num_res_blocks: int = _f(2, "ResBlocks per resolution")
    num_heads: int = _f(4, "attention heads (ignored when num_head_channels is set)")
    num_heads_upsample: int = _f(-1, "heads in the decoder's attention; -1 = num_heads")
    num_head_channels: int = _f(-1, "channels per attention head; -1 = use num_heads")
    attention_resolutions: str = _f("16,8", "comma-separated feature-map sizes that get attention")
    channel_mult: str = _f("", "comma-separated channel multipliers; '' = GD's default for the image size")
    dropout: float = _f(0.0, "dropout in the ResBlocks")
    class_cond: bool = _f(False, "condition on class labels (y)")
    use_checkpoint: bool = _f(False, "activation checkpointing (torch.utils.checkpoint, non-reentrant)")
    use_scale_shift_norm: bool = _f(True, "FiLM-style timestep conditioning in the ResBlocks' second norm")
    resblock_updown: bool = _f(False, "ResBlocks for up/downsampling")
    use_fp16: bool = _f(False, "GD's fp16 flag: here it means --precision fp16 (autocast, fp32 master weights)")
    use_new_attention_order: bool = _f(False, "split q/k/v before heads (QKVAttention) instead of after (legacy)")

    def __post_init__(self):
        _at_least("image_size", self.image_size, 1)
        _at_least("num_channels", self.num_channels, 1)
        _at_least("num_res_blocks", self.num_res_blocks, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion (GD's diffusion flags, GD's defaults)."""
    learn_sigma: bool = _f(False, "the model also predicts the variance (6 output channels, hybrid loss)")
    diffusion_steps: int = _f(1000, "number of diffusion steps T")
    noise_schedule: str = _f("linear", "beta schedule: linear or cosine")
    timestep_respacing: str = _f("", "respacing: '', 'N', 'a,b,c' or 'ddimN'")
    use_kl: bool = _f(False, "train on the variational bound (RESCALED_KL)")
    predict_xstart: bool = _f(False, "the model predicts x_0 instead of the noise")
    rescale_timesteps: bool = _f(False, "feed the model t scaled to [0, 1000)")
    rescale_learned_sigmas: bool = _f(False, "RESCALED_MSE loss (vb term scaled by T/1000)")

    def __post_init__(self):
        _at_least("diffusion_steps", self.diffusion_steps, 1)
        _one_of("noise_schedule", self.noise_schedule, NOISE_SCHEDULES)


@dataclass
class ClassifierConfig:
    """GD's noisy-image classifier (``classifier_defaults``), plus fastdiff's channel_mult."""
    image_size: int = _f(64, "side of the square images, in pixels")
    classifier_use_fp16: bool = _f(False, "GD's fp16 flag for the classifier: here autocast fp16 (fp32 master weights)")
    classifier_width: int = _f(128, "base channel count of the classifier")
    classifier_depth: int = _f(2, "ResBlocks per resolution")
    classifier_attention_resolutions: str = _f("32,16,8", "comma-separated feature-map sizes that get attention")
    classifier_use_scale_shift_norm: bool = _f(True, "FiLM-style timestep conditioning in the ResBlocks")
    classifier_resblock_updown: bool = _f(True, "ResBlocks for downsampling")
    classifier_pool: str = _f("attention", "head: adaptive, attention, spatial or spatial_v2")
    # fastdiff's (not in GD's classifier_defaults(), which accepts only 64/128/256/512)
    classifier_channel_mult: str = _f("", "comma-separated channel multipliers; '' = GD's default for the image size")

    def __post_init__(self):
        _at_least("image_size", self.image_size, 1)
        _at_least("classifier_width", self.classifier_width, 1)
        _at_least("classifier_depth", self.classifier_depth, 1)
        _one_of("classifier_pool", self.classifier_pool, CLASSIFIER_POOLS)


# GD's sr_model_and_diffusion_defaults(): the image model's flags without image_size,
# channel_mult and use_new_attention_order, plus the two sizes.
_SR_DROPPED_MODEL_FLAGS = ("image_size", "channel_mult", "use_new_attention_order")


def _sr_post_init(self):
    _at_least("large_size", self.large_size, 2)
    _at_least("small_size", self.small_size, 1)
    if self.small_size >= self.large_size:
        raise ConfigError(f"--small_size ({self.small_size}) must be below --large_size ({self.large_size})")
    _at_least("num_channels", self.num_channels, 1)
    _at_least("num_res_blocks", self.num_res_blocks, 1)
    if not 0.0 <= self.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")


SuperResModelConfig = dataclasses.make_dataclass(
    "SuperResModelConfig",
    [("large_size", int, _f(256, "side of the generated (high-resolution) images")),
     ("small_size", int, _f(64, "side of the low-resolution images it conditions on"))]
    + [(f.name, f.type, field(default=f.default, metadata=f.metadata))
       for f in fields(ModelConfig) if f.name not in _SR_DROPPED_MODEL_FLAGS]
    # fastdiff's: GD's super-res factory accepts only large_size 64/256/512.
    + [("channel_mult", str, _f("", "comma-separated channel multipliers; '' = GD's default for large_size"))],
    namespace={"__post_init__": _sr_post_init,
               "__doc__": "GD's super-resolution model flags (sr_model_and_diffusion_defaults)."},
)


@dataclass
class TrainConfig:
    """The training run (GD's image_train.py flags, then fastdiff's)."""
    data_dir: str = _f("", "image folder; '' = the embedded digits dataset with a small preset")
    schedule_sampler: str = _f("uniform", "timestep sampler: uniform or loss-second-moment")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    lr_anneal_steps: int = _f(0, "linear lr decay to 0 over this many steps, then stop; 0 = off")
    batch_size: int = _f(1, "images per rank per step")
    microbatch: int = _f(-1, "split each batch into microbatches of this size (gradients summed, as GD); -1 = off")
    ema_rate: str = _f("0.9999", "comma-separated fixed EMA rates; '' = none (then --ema_std is needed)")
    ema_std: str = _f("", "comma-separated sigma_rel in (0, 0.3) of power-function EMAs (EDM2; e.g. 0.05,0.10), "
                          "updated in the same pass as --ema_rate's; '' = none")
    ema_snapshot_interval: int = _f(0, "steps between snapshots of the power EMAs in <log_dir>/ema_snapshots/ "
                                       "(never pruned); 0 = every --save_interval")
    lr_warmup_steps: int = _f(0, "linear lr warmup from 0 over this many steps (times GD's anneal); 0 = off")
    ema_warmup: bool = _f(False, "diffusers' EMA warmup of the fixed-rate EMAs: rate = min(rate, "
                                 "1 - (1 + (step-1)/ema_inv_gamma)^-ema_power)")
    ema_inv_gamma: float = _f(1.0, "inv_gamma of --ema_warmup")
    ema_power: float = _f(0.6667, "power of --ema_warmup (2/3)")
    log_interval: int = _f(10, "steps between metric dumps")
    save_interval: int = _f(10000, "steps between checkpoints")
    resume_checkpoint: str = _f("", "a GD model*.pt to start from, or 'latest' in --log_dir")
    fp16_scale_growth: float = _f(1e-3, "log2 loss-scale growth per good fp16 step")
    # fastdiff's own flags
    class_dropout_prob: float = _f(0.0, "classifier-free guidance: probability that a training label becomes the "
                                        "null class (one extra label-embedding row); class-conditional models only; "
                                        "0 = off (GD's state_dict)")
    seed: int = _f(0, "random seed (torch, the timestep sampler, data order); each rank offsets it")
    deterministic: bool = _f(False, "bitwise-reproducible kernels across processes: one pinned config per shape "
                                    "for every autotuned Triton kernel (no timing), torch.use_deterministic_algorithms "
                                    "(warn only), cuDNN benchmark off; slower. The data order stays shuffled")
    log_dir: str = _f("", "run folder; '' = $OPENAI_LOGDIR or a new ./runs/<timestamp>")
    max_steps: int = _f(0, "stop after this many steps without touching the lr schedule; 0 = no limit")
    precision: str = _f("", "fp32, bf16 or fp16 (autocast, fp32 master weights); '' = fp16 if --use_fp16 else fp32")
    class_from: str = _f("filename", "class label from the 'filename' prefix (GD) or the parent 'folder'")
    num_workers: int = _f(-1, "data loader worker processes; -1 = automatic")
    norm_backend: str = _f("auto", "GroupNorm+SiLU: fused (Triton op), torch (GD modules) or auto (fused on CUDA)")
    attention_backend: str = _f("auto", "attention: triton, sdpa, xformers, math (GD einsum) or auto (triton on CUDA in bf16/fp16, else sdpa)")
    optimizer: str = _f("fused", "fused (C++/CUDA AdamW+EMA in one pass) or torch (AdamW + EMA loop)")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value; 0 = off (GD)")
    compile: bool = _f(False, "torch.compile the UNet (default on when CUDA is available)")
    keep_latest: int = _f(0, "keep only the newest N checkpoints; 0 = keep all")
    skip_nonfinite: bool = _f(False, "skip a step whose loss or gradients are not finite instead of stopping the run")
    sample_grid: bool = _f(True, "write a sample grid PNG at the end of training")
    sample_interval: int = _f(0, "every N steps, a grid of EMA samples in <log_dir>/samples/ (fixed noise and labels); 0 = off")
    sample_steps: int = _f(25, "DDIM steps of the --sample_interval grids")
    no_progress: bool = _f(False, "no progress bar (it is shown only on rank 0 when stderr is a terminal)")
    tensorboard: bool = _f(True, "TensorBoard scalars in <log_dir>/tb (skipped with a warning when tensorboard is not installed)")
    log_format: str = _f("table", "metrics on stdout: 'table' (GD's table, then a summary line) or 'line' (the line only)")
    device: str = _f("", "cuda or cpu; '' = cuda when available")

    def __post_init__(self):
        """Every check of a single training flag (cross-flag ones: :func:`resolve_precision`)."""
        if self.precision:
            _one_of("precision", self.precision, PRECISIONS)
        _one_of("schedule_sampler", self.schedule_sampler, SCHEDULE_SAMPLERS)
        _one_of("class_from", self.class_from, ("filename", "folder"))
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("norm_backend", self.norm_backend, ("auto",) + tuple(NORM_BACKENDS))
        _one_of("attention_backend", self.attention_backend, ("auto",) + tuple(ATTENTION_BACKENDS))
        _one_of("log_format", self.log_format, ("table", "line"))
        if self.device:
            _one_of("device", self.device, ("cuda", "cpu"))
        _at_least("batch_size", self.batch_size, 1)
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"--class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        # microbatch <= 0 means "off", as in GD (microbatch if microbatch > 0 else batch_size)
        for flag in ("lr", "weight_decay", "grad_clip", "lr_anneal_steps", "max_steps",
                     "keep_latest", "sample_interval", "ema_snapshot_interval", "lr_warmup_steps"):
            _at_least(flag, getattr(self, flag), 0)
        for flag in ("log_interval", "save_interval", "sample_steps"):
            _at_least(flag, getattr(self, flag), 1)
        for flag in ("ema_inv_gamma", "ema_power"):
            if not getattr(self, flag) > 0:
                raise ConfigError(f"--{flag} must be > 0, got {getattr(self, flag)}")
        rates, stds = parse_ema_rates(self.ema_rate), parse_ema_stds(self.ema_std)
        if not rates and not stds:
            raise ConfigError("--ema_rate and --ema_std are both empty: keep at least one EMA")

    @property
    def ema_rates(self):
        return parse_ema_rates(self.ema_rate)

    @property
    def ema_stds(self):
        return parse_ema_stds(self.ema_std)


CONFIG_CLASSES = (ModelConfig, DiffusionConfig, TrainConfig)


def model_and_diffusion_defaults():
    """GD's model + diffusion keyword defaults (same names, same values)."""
    return {**dataclasses.asdict(ModelConfig()), **dataclasses.asdict(DiffusionConfig())}


def str2bool(v):
    """GD's boolean parsing: yes/true/t/y/1 and no/false/f/n/0, case-insensitive."""
    if isinstance(v, bool):
        return v
    low = v.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def add_dataclass_arguments(parser, cls, defaults=None):
    """Add one ``--name`` per field of ``cls`` (GD spelling; bare boolean flags mean True).
    A name another class already added (``image_size`` of the model and the classifier)
    stays one flag that both read, as in GD's merged defaults."""
    defaults = defaults or {}
    taken = {action.dest for action in parser._actions}
    for f in fields(cls):
        if f.name in taken:
            continue
        default = defaults.get(f.name, f.default)
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True,
                                default=default, help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(f"--{f.name}", type=typ, default=default, help=help_text)


def build_parser(classes=CONFIG_CLASSES, extra_defaults=None, description=None):
    parser = argparse.ArgumentParser(description=description)
    for cls in classes:
        add_dataclass_arguments(parser, cls, extra_defaults)
    return parser


def resolve_precision(model_cfg, train_cfg):
    """Fill ``--precision ''`` from GD's ``--use_fp16``; refuse the two when they disagree."""
    if not train_cfg.precision:
        train_cfg.precision = "fp16" if model_cfg.use_fp16 else "fp32"
    if model_cfg.use_fp16 and train_cfg.precision != "fp16":
        raise ConfigError("--use_fp16 True contradicts --precision " + train_cfg.precision)
    return train_cfg.precision


def split_args(args, classes=CONFIG_CLASSES):
    """An argparse Namespace → one dataclass instance per class, in order."""
    values = vars(args)
    return tuple(cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in classes)


def explicit_flags(argv):
    """Names of the flags given on the command line (``--name`` or ``--name=value``)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            names.add(token[2:].split("=", 1)[0])
    return names


def resolve_backends(norm_backend="auto", attention_backend="auto", device_type=None,
                     precision="bf16"):
    """'auto' → the fast path on CUDA (fused norm, Triton attention), GD's modules on CPU.

    On CPU the fused op runs its torch fallback, so 'auto' keeps GD's own module tree there,
    except for attention, where SDPA computes the same function without materialising
    GD's per-head fp32 copies. The Triton attention kernel runs bf16/fp16 (every fp32 tile
    config spills on sm_90), so an fp32 run on CUDA gets SDPA for 'auto' too.
    """
    import torch
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device_type == "cuda"
    if norm_backend == "auto":
        norm_backend = "fused" if on_cuda else "torch"
    if attention_backend == "auto":
        attention_backend = "triton" if on_cuda and precision in ("bf16", "fp16") else "sdpa"
    _one_of("norm_backend", norm_backend, tuple(NORM_BACKENDS))
    _one_of("attention_backend", attention_backend, tuple(ATTENTION_BACKENDS))
    return norm_backend, attention_backend


def create_model_and_diffusion(*, norm_backend="torch", attention_backend="math",
                               class_dropout_prob=0.0, **kwargs):
    """GD's ``create_model_and_diffusion``: same keywords, returns ``(model, diffusion)``.

    Called without backends (as GD code does), the model is GD's own module tree
    (torch GroupNorm, einsum attention), so numbers are GD's; the trainer passes the
    backends it resolved. ``class_dropout_prob`` > 0 (fastdiff's classifier-free guidance)
    adds the null-class embedding row to a class-conditional model.
    """
    from fastdiff.models import create_model

    _check_keywords("create_model_and_diffusion", kwargs, model_and_diffusion_defaults())
    model_keys = {f.name for f in fields(ModelConfig)}
    model = create_model(
        **{k: v for k, v in kwargs.items() if k in model_keys},
        learn_sigma=kwargs["learn_sigma"],
        norm_backend=norm_backend,
        attention_backend=attention_backend,
        class_dropout_prob=class_dropout_prob,
    )
    return model, _gaussian_diffusion(kwargs)


def _check_keywords(func_name, kwargs, expected, optional=()):
    unknown = sorted(set(kwargs) - set(expected) - set(optional))
    if unknown:
        raise TypeError(f"{func_name}() got unexpected keywords: {', '.join(unknown)}")
    missing = sorted(set(expected) - set(kwargs))
    if missing:
        raise TypeError(f"{func_name}() missing keywords: {', '.join(missing)}")


def _gaussian_diffusion(kwargs):
    from fastdiff.diffusion import create_gaussian_diffusion
    return create_gaussian_diffusion(
        steps=kwargs["diffusion_steps"], learn_sigma=kwargs["learn_sigma"],
        noise_schedule=kwargs["noise_schedule"], use_kl=kwargs["use_kl"],
        predict_xstart=kwargs["predict_xstart"], rescale_timesteps=kwargs["rescale_timesteps"],
        rescale_learned_sigmas=kwargs["rescale_learned_sigmas"],
        timestep_respacing=kwargs["timestep_respacing"])


def classifier_and_diffusion_defaults():
    """GD's classifier + diffusion keyword defaults (GD's exact key set)."""
    classifier = dataclasses.asdict(ClassifierConfig())
    del classifier["classifier_channel_mult"]  # fastdiff's optional keyword
    return {**classifier, **dataclasses.asdict(DiffusionConfig())}


def create_classifier_and_diffusion(*, norm_backend="torch", attention_backend="math",
                                    classifier_channel_mult="", **kwargs):
    """GD's ``create_classifier_and_diffusion``: same keywords, returns
    ``(classifier, diffusion)``; fastdiff's optional ``classifier_channel_mult`` and
    backends (without them: GD's module tree and numbers)."""
    from fastdiff.models.classifier import create_classifier

    _check_keywords("create_classifier_and_diffusion", kwargs, classifier_and_diffusion_defaults())
    classifier_keys = {f.name for f in fields(ClassifierConfig)}
    classifier = create_classifier(
        **{k: v for k, v in kwargs.items() if k in classifier_keys},
        classifier_channel_mult=classifier_channel_mult,
        norm_backend=norm_backend, attention_backend=attention_backend)
    return classifier, _gaussian_diffusion(kwargs)


def sr_model_and_diffusion_defaults():
    """GD's super-resolution model + diffusion keyword defaults (GD's exact key set)."""
    model = dataclasses.asdict(SuperResModelConfig())
    del model["channel_mult"]  # fastdiff's optional keyword
    return {**model, **dataclasses.asdict(DiffusionConfig())}


def sr_create_model_and_diffusion(*, norm_backend="torch", attention_backend="math",
                                  channel_mult="", class_dropout_prob=0.0, **kwargs):
    """GD's ``sr_create_model_and_diffusion``: same keywords, returns ``(model, diffusion)``;
    fastdiff's optional ``channel_mult``, ``class_dropout_prob`` and backends."""
    from fastdiff.models.super_res import sr_create_model

    _check_keywords("sr_create_model_and_diffusion", kwargs, sr_model_and_diffusion_defaults())
    model_keys = {f.name for f in fields(SuperResModelConfig)}
    model = sr_create_model(
        **{k: v for k, v in kwargs.items() if k in model_keys},
        learn_sigma=kwargs["learn_sigma"], channel_mult=channel_mult,
        class_dropout_prob=class_dropout_prob,
        norm_backend=norm_backend, attention_backend=attention_backend)
    return model, _gaussian_diffusion(kwargs)
