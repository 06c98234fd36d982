"""The README's flag tables, generated from the flag dataclasses.

``python -m fastdiff.flags_table`` prints the tables of every ``python -m fastdiff.X`` entry
point (every flag: name, default, where it comes from, help);
``python -m fastdiff.flags_table --write README.md`` replaces them in place, between the
markers ``<!-- flags:NAME:begin -->`` and ``<!-- flags:NAME:end -->``. tests/test_readme.py
checks that the README holds exactly what this prints.
"""
import argparse
import dataclasses
import re
import sys

from fastdiff import config as C

# guided-diffusion's flags and defaults, read off its scripts: script_util.py's
# model_and_diffusion_defaults() and the defaults dicts of image_train.py / image_sample.py.
# "from = GD" in the tables means the flag is one of these; a default that differs is marked.
GD_MODEL_AND_DIFFUSION_DEFAULTS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "num_head_channels": -1, "attention_resolutions": "16,8",
    "channel_mult": "", "dropout": 0.0, "class_cond": False, "use_checkpoint": False,
    "use_scale_shift_norm": True, "resblock_updown": False, "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
GD_TRAIN_DEFAULTS = {
    **GD_MODEL_AND_DIFFUSION_DEFAULTS,
    "data_dir": "", "schedule_sampler": "uniform", "lr": 1e-4, "weight_decay": 0.0,
    "lr_anneal_steps": 0, "batch_size": 1, "microbatch": -1, "ema_rate": "0.9999",
    "log_interval": 10, "save_interval": 10000, "resume_checkpoint": "",
    "fp16_scale_growth": 1e-3,
}
GD_SAMPLE_DEFAULTS = {
    **GD_MODEL_AND_DIFFUSION_DEFAULTS,
    "clip_denoised": True, "num_samples": 10000, "batch_size": 16, "use_ddim": False,
    "model_path": "",
}
# script_util.py's classifier_defaults(), diffusion_defaults() and sr_model_and_diffusion_defaults().
GD_DIFFUSION_DEFAULTS = {k: GD_MODEL_AND_DIFFUSION_DEFAULTS[k] for k in (
    "learn_sigma", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
    "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas")}
GD_CLASSIFIER_DEFAULTS = {
    "image_size": 64, "classifier_use_fp16": False, "classifier_width": 128,
    "classifier_depth": 2, "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True, "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
GD_SR_MODEL_AND_DIFFUSION_DEFAULTS = {
    "large_size": 256, "small_size": 64,
    **{k: v for k, v in GD_MODEL_AND_DIFFUSION_DEFAULTS.items()
       if k not in ("image_size", "channel_mult", "use_new_attention_order")},
}
# The defaults dicts of GD's other scripts.
GD_CLASSIFIER_TRAIN_DEFAULTS = {
    **GD_CLASSIFIER_DEFAULTS, **GD_DIFFUSION_DEFAULTS,
    "data_dir": "", "val_data_dir": "", "noised": True, "iterations": 150000, "lr": 3e-4,
    "weight_decay": 0.0, "anneal_lr": False, "batch_size": 4, "microbatch": -1,
    "schedule_sampler": "uniform", "resume_checkpoint": "", "log_interval": 10,
    "eval_interval": 5, "save_interval": 10000,
}
GD_CLASSIFIER_SAMPLE_DEFAULTS = {
    **GD_SAMPLE_DEFAULTS, **GD_CLASSIFIER_DEFAULTS,
    "classifier_path": "", "classifier_scale": 1.0,
}
GD_SUPER_RES_TRAIN_DEFAULTS = {
    **GD_SR_MODEL_AND_DIFFUSION_DEFAULTS,
    **{k: v for k, v in GD_TRAIN_DEFAULTS.items() if k not in GD_MODEL_AND_DIFFUSION_DEFAULTS},
    "use_fp16": False,
}
GD_SUPER_RES_SAMPLE_DEFAULTS = {
    **GD_SR_MODEL_AND_DIFFUSION_DEFAULTS,
    "clip_denoised": True, "num_samples": 10000, "batch_size": 16, "use_ddim": False,
    "base_samples": "", "model_path": "",
}
GD_IMAGE_NLL_DEFAULTS = {
    **GD_MODEL_AND_DIFFUSION_DEFAULTS,
    "data_dir": "", "clip_denoised": True, "num_samples": 1000, "batch_size": 1, "model_path": "",
}

# Every command-line name whose table the README holds: its marker name and its module.
ENTRY_POINTS = {"train": "fastdiff.train", "sample": "fastdiff.sample",
                "evaluate": "fastdiff.evaluate",
                "classifier_train": "fastdiff.classifier_train",
                "classifier_sample": "fastdiff.classifier_sample",
                "super_res_train": "fastdiff.super_res_train",
                "super_res_sample": "fastdiff.super_res_sample",
                "image_nll": "fastdiff.image_nll"}


@dataclasses.dataclass
class EntryPoint:
    """What a table is built from: the dataclasses the entry point's parser is built from
    (in parser order), GD's defaults for the same script, and the values a preset puts in
    place of the defaults (the training digits preset)."""
    classes: tuple
    gd_defaults: dict
    preset: dict
    preset_name: str = ""


def entry_point(name):
    """The ``EntryPoint`` of ``train``, ``sample`` or ``evaluate``: the same classes their
    parsers use."""
    if name == "train":
        from fastdiff.train.cli import DIGITS_PRESET
        return EntryPoint(C.CONFIG_CLASSES, GD_TRAIN_DEFAULTS, DIGITS_PRESET, "digits preset")
    if name == "sample":
        from fastdiff.sample import SampleConfig
        return EntryPoint((C.ModelConfig, C.DiffusionConfig, SampleConfig), GD_SAMPLE_DEFAULTS, {})
    if name == "evaluate":
        # GD has no evaluation script: only its model and diffusion flags are GD's here.
        from fastdiff.evaluate.cli import EvalConfig
        model_flags = {f.name for cls in (C.ModelConfig, C.DiffusionConfig)
                       for f in dataclasses.fields(cls)}
        gd = {k: v for k, v in GD_SAMPLE_DEFAULTS.items() if k in model_flags}
        return EntryPoint((C.ModelConfig, C.DiffusionConfig, EvalConfig), gd, {})
    if name == "classifier_train":
        from fastdiff import classifier_train as m
        return EntryPoint(m.CONFIG_CLASSES, GD_CLASSIFIER_TRAIN_DEFAULTS, m.DIGITS_PRESET,
                          "digits preset")
    if name == "classifier_sample":
        from fastdiff import classifier_sample as m
        return EntryPoint(m.CONFIG_CLASSES, GD_CLASSIFIER_SAMPLE_DEFAULTS, {})
    if name == "super_res_train":
        from fastdiff.super_res_train import SUPER_RES_TASK as task
        return EntryPoint(task.config_classes, GD_SUPER_RES_TRAIN_DEFAULTS, task.digits_preset,
                          "digits preset")
    if name == "super_res_sample":
        from fastdiff import super_res_sample as m
        return EntryPoint(m.CONFIG_CLASSES, GD_SUPER_RES_SAMPLE_DEFAULTS, {})
    if name == "image_nll":
        from fastdiff import image_nll as m
        return EntryPoint(m.CONFIG_CLASSES, GD_IMAGE_NLL_DEFAULTS, {})
    raise ValueError(f"no flags table named {name!r}; known: {', '.join(ENTRY_POINTS)}")


def format_value(value):
    """A default as typed on the command line, in a code span (``''`` for the empty string)."""
    if value == "":
        return "`''`"
    return f"`{value}`"


def _cell(text):
    # A '|' inside a cell would end it; a newline would end the row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_rows(ep):
    """One dict per flag of the ``EntryPoint`` ``ep``: flag, default, origin, help (a name two
    classes share is one flag, listed where the parser first adds it)."""
    rows, seen = [], set()
    for cls in ep.classes:
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = format_value(f.default)
            if f.name in ep.preset and ep.preset[f.name] != f.default:
                default += f" ({ep.preset_name}: {format_value(ep.preset[f.name])})"
            if f.name in ep.gd_defaults:
                origin = "GD"
                if ep.gd_defaults[f.name] != f.default:
                    origin += f", default differs (GD: {format_value(ep.gd_defaults[f.name])})"
            else:
                origin = "fastdiff"
            rows.append({"flag": f"`--{f.name}`", "default": default, "from": origin,
                         "help": f.metadata.get("help", "")})
    return rows


def render_table(name):
    """The markdown table of the named entry point's flags."""
    lines = ["| flag | default | from | what it does |", "| --- | --- | --- | --- |"]
    for row in table_rows(entry_point(name)):
        lines.append("| " + " | ".join(_cell(row[k]) for k in ("flag", "default", "from", "help")) + " |")
    return "\n".join(lines)


def markers(name):
    return f"<!-- flags:{name}:begin -->", f"<!-- flags:{name}:end -->"


def render_block(name):
    """The table with its markers, as it stands in the README."""
    begin, end = markers(name)
    return f"{begin}\n{render_table(name)}\n{end}"


def _block_pattern(name):
    begin, end = markers(name)
    return re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)


def extract_block(text, name):
    """The marked block of ``name`` in ``text`` (markers included); ValueError unless it
    occurs exactly once."""
    found = _block_pattern(name).findall(text)
    if len(found) != 1:
        begin, end = markers(name)
        raise ValueError(f"expected one {begin} ... {end} block, found {len(found)}")
    return found[0]


def update_text(text):
    """``text`` with every entry point's marked block replaced by the current table."""
    for name in ENTRY_POINTS:
        extract_block(text, name)  # refuse a file that lacks a block or holds two
        text = _block_pattern(name).sub(lambda _: render_block(name), text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdiff.flags_table",
                                     description="Print (or write into a README) the flag tables "
                                     "of python -m fastdiff.train and python -m fastdiff.sample")
    parser.add_argument("--write", metavar="PATH",
                        help="replace the marked tables in this markdown file in place")
    args = parser.parse_args(argv)
    if not args.write:
        print("\n\n".join(render_block(name) for name in ENTRY_POINTS))
        return 0
    with open(args.write, encoding="utf-8") as f:
        old = f.read()
    try:
        new = update_text(old)
    except ValueError as e:
        print(f"fastdiff.flags_table: error: {args.write}: {e}", file=sys.stderr)
        return 2
    if new != old:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"{args.write}: flag tables {'updated' if new != old else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
