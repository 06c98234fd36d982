"""Checkpoint files: atomic writes, completeness, latest, pruning, clear errors."""
import os

import pytest
import torch

from fastdiff.train import checkpoint as ckpt


def test_atomic_save_leaves_no_temp_and_roundtrips(tmp_path):
    path = tmp_path / "model000001.pt"
    sd = {"w": torch.randn(3, 4)}
    ckpt.atomic_torch_save(sd, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["model000001.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], sd["w"])


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "model000001.pt"
    ckpt.atomic_torch_save({"w": torch.ones(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.atomic_torch_save({"w": Unpicklable()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model000001.pt"]


def _save(tmp_path, step, value):
    state = {"model": {"w": torch.full((4,), float(value))}}
    return ckpt.save_training_state(str(tmp_path), step, state, {"rng": step}, {"step": step})


def test_dcp_save_load_latest_and_partial_ignored(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 10, 2.0)
    # A save killed half-way: folder without trainer.json, and a .partial folder.
    os.makedirs(tmp_path / "checkpoints" / "step_000015")
    os.makedirs(tmp_path / "checkpoints" / "step_000020.partial")
    latest = ckpt.find_latest(str(tmp_path))
    assert latest.endswith("step_000010")
    target = {"model": {"w": torch.zeros(4)}}
    ckpt.load_training_state(latest, target)
    assert torch.equal(target["model"]["w"], torch.full((4,), 2.0))
    assert ckpt.read_trainer_meta(latest)["step"] == 10
    assert ckpt.load_rank_state(latest, 0) == {"rng": 10}
    assert ckpt.load_rank_state(latest, 3) is None


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, step)
        ckpt.export_gd_files(str(tmp_path), step, {"w": torch.ones(1)}, {"0.9999": {"w": torch.ones(1)}},
                             {"state": {}, "param_groups": []})
    ckpt.prune_checkpoints(str(tmp_path), 2, ["0.9999"])
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [2, 3]
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["ema_0.9999_000002.pt", "ema_0.9999_000003.pt", "model000002.pt",
                     "model000003.pt", "opt000002.pt", "opt000003.pt"]


def test_gd_names_and_step_parsing():
    names = ckpt.gd_filenames(42, ["0.9999", "0.999"])
    assert names == {"model": "model000042.pt", "opt": "opt000042.pt",
                     "0.9999": "ema_0.9999_000042.pt", "0.999": "ema_0.999_000042.pt"}
    assert ckpt.parse_gd_step("/a/b/model012345.pt") == 12345
    assert ckpt.parse_gd_step("/a/b/weights.pt") == 0


def test_mismatch_names_first_bad_key(tmp_path):
    ref = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ckpt.CheckpointError, match="'b' has shape"):
        ckpt.check_state_dict_fits({"a": torch.zeros(2), "b": torch.zeros(4)}, ref, "x.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing key 'b'"):
        ckpt.check_state_dict_fits({"a": torch.zeros(2)}, ref, "x.pt")
    with pytest.raises(ckpt.CheckpointError, match="unexpected key 'c'"):
        ckpt.check_state_dict_fits({**ref, "c": torch.zeros(1)}, ref, "x.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_state_dict_file(str(bad))
