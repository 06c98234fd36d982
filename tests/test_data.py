"""Data pipeline: GD's folder semantics, the embedded digits, and the resumable stream."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import (
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    class_labels,
    list_image_files,
    load_data,
    resize_and_random_crop,
)
from fastdiff.data.image_folder import read_image

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

SIZE = 8  # images are written at this size, so resize/crop is the identity in stream tests


def _color(i):
    """A distinct RGB colour per image id, so an image names its file."""
    return (10 + 7 * i, 250 - 11 * i, (40 + 53 * i) % 256)


def _write_marked(path, i, size=SIZE):
    """One colour per image id, with a black left column so that a flip shows."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = _color(i)
    pixels[:, 0] = 0
    Image.fromarray(pixels).save(path)


def _image_id(chw):
    """The id of an image written by _write_marked (flipped or not)."""
    rgb = tuple(round((float(v) + 1) * 127.5) for v in chw[:, 0, SIZE // 2])
    matches = [i for i in range(64) if _color(i) == rgb]
    assert len(matches) == 1, rgb
    assert torch.all(chw[:, :, 0] == -1) or torch.all(chw[:, :, -1] == -1)
    return matches[0]


def _marked_folder(root, count):
    """`count` marked images k<i // 3>_<i>.png: ids follow the sorted files, class = id // 3."""
    for i in range(count):
        _write_marked(os.path.join(root, f"k{i // 3}_{i:02d}.png"), i)
    return str(root)


def _batches(stream, count):
    return [next(stream) for _ in range(count)]


def _ids(batches):
    return [[_image_id(x) for x in images] for images, _ in batches]


# ---------------------------------------------------------------- listing and classes


def test_listing_is_gd_order_recursive_and_filters_extensions(tmp_path):
    for name in ["b_1.png", "a.png", "a_2.JPG", "a/z_3.jpeg", "a/deep/y_4.gif", "A_5.PNG",
                 "notes.txt", "noext", "a/skip.bmp"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(("png", "PNG", "JPG", "jpeg", "gif")):
            image_format = path.suffix[1:].upper().replace("JPG", "JPEG")
            Image.new("RGB", (4, 4)).save(path, format=image_format)
        else:
            path.write_text("x")
    files = [os.path.relpath(p, tmp_path) for p in list_image_files(str(tmp_path))]
    # Each directory sorted on its own ("a" < "a.png" < "a_2.JPG"), subfolders where they sort.
    assert files == ["A_5.PNG", "a/deep/y_4.gif", "a/z_3.jpeg", "a.png", "a_2.JPG", "b_1.png"]


def test_class_ids_from_sorted_filename_prefixes(tmp_path):
    files = ["dog_1.png", "cat_2.png", "dog_3.png", "ant.png", "cat_x_y.png"]
    labels, names = class_labels(files, str(tmp_path), "filename")
    # GD: prefix before the first "_"; a name without "_" is its own class, extension included.
    assert names == ["ant.png", "cat", "dog"]
    assert labels == [2, 1, 2, 0, 1]


def test_class_from_folder_uses_first_subfolder(tmp_path):
    for i, rel in enumerate(["dog/d_1.png", "cat/b.png", "cat/sub/a.png", "emu/x_9.png"]):
        _write_marked(str(tmp_path / rel), i)
    dataset = ImageFolderDataset(str(tmp_path), SIZE, class_cond=True, class_from="folder")
    by_file = {os.path.relpath(f, tmp_path): y for f, y in zip(dataset.files, dataset.labels)}
    assert by_file == {"cat/b.png": 0, "cat/sub/a.png": 0, "dog/d_1.png": 1, "emu/x_9.png": 2}
    assert dataset.class_names == ["cat", "dog", "emu"] and dataset.num_classes == 3

    _write_marked(str(tmp_path / "loose.png"), 5)
    with pytest.raises(DataError, match="loose.png"):
        ImageFolderDataset(str(tmp_path), SIZE, class_cond=True, class_from="folder")


def test_stream_labels_follow_class_ids(tmp_path):
    root = _marked_folder(tmp_path, 9)
    stream = load_data(data_dir=root, batch_size=3, image_size=SIZE, class_cond=True,
                       num_workers=0)
    for images, cond in _batches(stream, 6):
        expected = [_image_id(x) // 3 for x in images]
        assert cond["y"].dtype == torch.int64 and cond["y"].tolist() == expected
    images, cond = next(load_data(data_dir=root, batch_size=3, image_size=SIZE, num_workers=0))
    assert cond == {} and images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.float32


# ---------------------------------------------------------------- preprocessing


def test_box_halving_then_center_crop_on_known_pattern(tmp_path):
    # 52×24 image of 4×4 blocks: two box halvings (short side 24 ≥ 12, then 12 ≥ 12) give one
    # pixel per block, 13×6; short side 6 = image_size so bicubic is the identity; the crop
    # keeps columns (13 - 6) // 2 = 3 .. 8 of every row.
    size = 6
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(6, 13), dtype=np.uint8)
    gray = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))
    path = str(tmp_path / "pattern.png")
    Image.fromarray(gray, mode="L").save(path)  # grayscale file: converted to RGB on read
    out = read_image(path, size)
    expected = blocks[:, 3:9].astype(np.float32) / 127.5 - 1
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    for channel in out:
        np.testing.assert_array_equal(channel.numpy(), expected)


def test_bicubic_resize_scales_short_side_and_maps_to_unit_range(tmp_path):
    # 10×7 → short side 7 scaled to 5: width round(10 * 5 / 7) = 7, crop offset 1. A constant
    # image stays constant; its value maps by x / 127.5 - 1.
    path = str(tmp_path / "flat.jpg")
    Image.new("RGB", (10, 7), (0, 255, 51)).save(path, format="PNG")
    out = read_image(path, 5)
    assert out.shape == (3, 5, 5)
    assert torch.equal(out[0], torch.full((5, 5), -1.0))
    assert torch.equal(out[1], torch.full((5, 5), 1.0))
    assert torch.equal(out[2], torch.full((5, 5), np.float32(51) / np.float32(127.5) - 1))


def test_random_flip_mirrors_along_width(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(6):
        pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img_{i}.png")
    common = dict(data_dir=str(tmp_path), batch_size=6, image_size=SIZE, seed=3, num_workers=0)
    flipped = _batches(load_data(random_flip=True, **common), 4)
    plain = _batches(load_data(random_flip=False, **common), 4)
    outcomes = []
    for (a, _), (b, _) in zip(flipped, plain):  # the order does not depend on random_flip
        for x, y in zip(a, b):
            mirrored = torch.equal(x, y.flip(-1))
            assert mirrored or torch.equal(x, y)
            outcomes.append(mirrored)
    assert any(outcomes) and not all(outcomes)


# ---------------------------------------------------------------- sharding and the stream


def test_shards_are_gd_slices_of_the_sorted_list(tmp_path):
    root = _marked_folder(tmp_path, 7)
    files = list_image_files(root)
    shards = [ImageFolderDataset(root, SIZE, rank=r, world_size=2).files for r in range(2)]
    assert shards == [files[0::2], files[1::2]]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(files)

    for rank in range(2):  # the stream of a rank reads exactly its shard
        stream = load_data(data_dir=root, batch_size=1, image_size=SIZE, deterministic=True,
                           rank=rank, world_size=2, num_workers=0)
        seen = [ids[0] for ids in _ids(_batches(stream, len(shards[rank])))]
        assert seen == list(range(rank, 7, 2))


def test_stream_is_infinite_shuffles_per_epoch_and_drops_last(tmp_path):
    root = _marked_folder(tmp_path, 8)
    stream = load_data(data_dir=root, batch_size=3, image_size=SIZE, num_workers=0)
    epochs = [sum(_ids(_batches(stream, 2)), []) for _ in range(4)]  # 8 // 3 = 2 batches each
    for epoch in epochs:
        assert len(set(epoch)) == 6  # no repeats within an epoch, 8 % 3 = 2 dropped
    assert len({tuple(e) for e in epochs}) > 1
    # The next sample is past the end of epoch 3, i.e. the start of epoch 4.
    assert stream.state_dict()["epoch"] == 3 and stream.state_dict()["position"] == 6

    ordered = load_data(data_dir=root, batch_size=3, image_size=SIZE, deterministic=True,
                        num_workers=0)
    for _ in range(3):
        assert sum(_ids(_batches(ordered, 2)), []) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_uninterrupted_batches(tmp_path, num_workers):
    root = _marked_folder(tmp_path, 11)
    (tmp_path / "k1_corrupt.png").write_bytes(b"GIF89a")  # also read (and skipped) by workers
    options = dict(data_dir=root, batch_size=4, image_size=SIZE, class_cond=True, seed=5,
                   num_workers=num_workers)
    stream = load_data(**options)
    _batches(stream, 3)  # crosses the epoch boundary (2 batches per epoch)
    state = stream.state_dict()
    expected = _batches(stream, 5)  # workers have prefetched past the saved position

    resumed = load_data(**options)
    resumed.load_state_dict(state)
    for (x, cond), (x_ref, cond_ref) in zip(_batches(resumed, 5), expected):
        assert torch.equal(x, x_ref) and torch.equal(cond["y"], cond_ref["y"])


def test_resume_on_changed_data_restarts_the_saved_epoch(tmp_path, caplog):
    root = _marked_folder(tmp_path, 6)
    options = dict(data_dir=root, batch_size=2, image_size=SIZE, seed=4, num_workers=0)
    stream = load_data(**options)
    _batches(stream, 4)  # epoch 1, position 2
    state = stream.state_dict()
    _write_marked(os.path.join(root, "k9_new.png"), 20)
    changed = load_data(**options)
    with caplog.at_level(logging.WARNING, logger="fastdiff.data"):
        changed.load_state_dict(state)
    assert "data changed" in caplog.text
    assert changed.state_dict() == {"epoch": 1, "position": 0, "num_images_this_rank": 7}


def test_corrupt_image_is_warned_once_and_skipped(tmp_path, caplog):
    root = _marked_folder(tmp_path, 7)
    bad = tmp_path / "k0_bad.png"  # 4th in file order
    bad.write_bytes(b"\x89PNG not really")
    options = dict(data_dir=root, batch_size=2, image_size=SIZE, deterministic=True, seed=1,
                   num_workers=0)
    with caplog.at_level(logging.WARNING, logger="fastdiff.data"):
        stream = load_data(**options)
        epochs = [sum(_ids(_batches(stream, 3)), []) for _ in range(3)]  # 7 readable → 3 batches
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert epochs == [[0, 1, 2, 3, 4, 5]] * 3  # file order, the 7th readable image dropped

    # The corrupt file's gap is filled by the next readable images, so the second batch takes
    # one sample of the next read chunk (images 2 and 3, leaving 4 buffered); resuming after any
    # number of batches still replays exactly.
    reference = load_data(**options)
    uninterrupted = [next(reference) for _ in range(9)]
    for consumed in range(1, 6):
        stream = load_data(**options)
        _batches(stream, consumed)
        resumed = load_data(**options)
        resumed.load_state_dict(stream.state_dict())
        for (x, _), (x_ref, _) in zip(_batches(resumed, 3), uninterrupted[consumed:]):
            assert torch.equal(x, x_ref)


def test_too_few_readable_images_is_a_data_error(tmp_path):
    root = _marked_folder(tmp_path, 3)
    with pytest.raises(DataError, match="batch_size=4"):
        load_data(data_dir=root, batch_size=4, image_size=SIZE, num_workers=0)
    for i in range(3):
        (tmp_path / f"z_{i}.png").write_bytes(b"garbage")
    stream = load_data(data_dir=root, batch_size=4, image_size=SIZE, num_workers=0)
    with pytest.raises(DataError, match="readable"):
        next(stream)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_unusable_directory_is_a_one_line_data_error(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "sub").mkdir()
        (root / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as info:
        load_data(data_dir=str(root), batch_size=1, image_size=SIZE)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(root) in message and "\n" not in message


def test_bad_arguments_are_value_errors(tmp_path):
    root = _marked_folder(tmp_path, 2)
    with pytest.raises(ValueError, match="class_from"):
        load_data(data_dir=root, batch_size=1, image_size=SIZE, class_from="parent")
    with pytest.raises(ValueError, match="rank"):
        load_data(data_dir=root, batch_size=1, image_size=SIZE, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        load_data(data_dir=root, batch_size=0, image_size=SIZE)


# ---------------------------------------------------------------- random crop (GD's classifier data)


def test_random_crop_matches_gd_random_crop_arr_golden():
    # tools/gd_golden_random_crop.py ran GD's random_crop_arr with its randrange picks forced
    # (lowest, highest, seeded); the same picks, as draws in the middle of their bins, must give
    # GD's bytes exactly: the pixel path is the same PIL calls, so no tolerance.
    fixture = torch.load(os.path.join(FIXTURES, "gd_random_crop.pt"))
    assert fixture["gd_commit"].startswith("22e0df8")
    for case in fixture["cases"]:
        image = Image.fromarray(case["image"].numpy())
        size = case["image_size"]
        for run in case["runs"]:
            ranges, picks = run["ranges"], run["picks"]
            # GD's short-side range is [ceil(S / 1.0), ceil(S / 0.8)]; offsets start at 0.
            assert ranges[0].tolist() == [size, -(-size * 5 // 4) + 1]
            assert ranges[1:, 0].tolist() == [0, 0]
            draws = ((picks.double() + 0.5) / (ranges[:, 1] - ranges[:, 0]).double()).tolist()
            out = resize_and_random_crop(image, size, draws)
            assert np.array_equal(out, run["output"].numpy()), (case["image"].shape, run)


def test_random_crop_is_the_hand_run_pil_ops(tmp_path):
    # A 30×21 (W×H) image, image_size 8: short sides 8..10 (3 choices). Each case below is
    # worked out by hand from GD's recipe (BOX halvings while the short side is ≥ 2× the drawn
    # size, BICUBIC to it with Python's round, then the window at the drawn top/left).
    pixels = np.random.default_rng(7).integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    halved = image.resize((15, 10), resample=Image.BOX)  # 21 ≥ 2·short side for 8, 9 and 10
    below_one = float(np.nextafter(1.0, 0.0))
    cases = {
        # short side 8 (draw 0): 15×10 → round(12.0)×8; the first top and left.
        (0.0, 0.0, 0.0): (halved.resize((12, 8), resample=Image.BICUBIC), 0, 0),
        # 9 (0.4·3 → 1): 15×10 → round(13.5)=14 × 9; top 0.99·2 → 1; left 0.5·7 → 3.
        (0.4, 0.99, 0.5): (halved.resize((14, 9), resample=Image.BICUBIC), 1, 3),
        # 10 (the last draw below 1): 15×10 → 15×10; the last top (2) and left (7).
        (below_one, below_one, below_one): (halved.resize((15, 10), resample=Image.BICUBIC),
                                             2, 7),
    }
    for draws, (resized, top, left) in cases.items():
        expected = np.asarray(resized)[top : top + 8, left : left + 8]
        assert np.array_equal(resize_and_random_crop(image, 8, draws), expected), draws

    path = str(tmp_path / "img.png")  # read_image with draws: the same crop, in [-1, 1]
    image.save(path)
    expected = np.asarray(cases[(0.4, 0.99, 0.5)][0])[1:9, 3:11]
    expected = torch.from_numpy(expected.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(read_image(path, 8, (0.4, 0.99, 0.5)), expected)
    with pytest.raises(ValueError, match="3 draws"):
        resize_and_random_crop(image, 8, (0.5, 0.5))


def _hand_crops(image, image_size):
    """Every crop GD's random_crop_arr can return for `image`, keyed by (short side, top, left)
    (the resize written out by hand, as in the test above)."""
    crops = {}
    for short_side in range(image_size, -(-image_size * 5 // 4) + 1):
        resized = image
        while min(resized.size) >= 2 * short_side:
            resized = resized.resize((resized.width // 2, resized.height // 2), Image.BOX)
        scale = short_side / min(resized.size)
        resized = np.asarray(resized.resize(
            (round(resized.width * scale), round(resized.height * scale)), Image.BICUBIC))
        for top in range(resized.shape[0] - image_size + 1):
            for left in range(resized.shape[1] - image_size + 1):
                window = resized[top : top + image_size, left : left + image_size]
                crops[(short_side, top, left)] = torch.from_numpy(
                    window.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    return crops


def _noise_folder(root, sizes):
    """Random-pixel images f<i>_x.png of the given (width, height): class id = file id."""
    rng = np.random.default_rng(11)
    for i, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"f{i}_x.png"))
    return str(root)


def test_random_crop_keeps_order_and_flips_and_varies_the_crop(tmp_path):
    # Labels name the files; every cropped sample must be one of GD's crops of its file (the
    # flip applied after the crop), in the order and with the flip of the centre-cropped stream
    # (the crop draws come from their own generator), and the crops must vary.
    root = _noise_folder(tmp_path, [(17, 12), (12, 19), (14, 14), (25, 16)])
    options = dict(data_dir=root, batch_size=2, image_size=8, class_cond=True, seed=9,
                   num_workers=0)
    cropped = _batches(load_data(random_crop=True, **options), 12)  # 6 epochs
    centred = _batches(load_data(**options), 12)
    files = list_image_files(root)
    candidates = [_hand_crops(Image.open(f).convert("RGB"), 8) for f in files]
    centre = [read_image(f, 8) for f in files]
    chosen = [set() for _ in files]
    for (x, cond), (x_centre, cond_centre) in zip(cropped, centred):
        assert torch.equal(cond["y"], cond_centre["y"])
        for image, image_centre, file_id in zip(x, x_centre, cond["y"].tolist()):
            flipped = torch.equal(image_centre, centre[file_id].flip(-1))
            assert flipped or torch.equal(image_centre, centre[file_id])
            unflipped = image.flip(-1) if flipped else image
            matches = [k for k, crop in candidates[file_id].items() if torch.equal(crop, unflipped)]
            assert matches, f"sample of file {file_id} is none of GD's crops"
            chosen[file_id].update(matches)
    assert all(len(choices) > 1 for choices in chosen)  # the crop changes between epochs
    assert {short for choices in chosen for short, _, _ in choices} == {8, 9, 10}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_random_crop_resumes_with_the_same_crops(tmp_path, num_workers):
    # A crop is a function of (seed, rank, epoch, position in the epoch), so a resumed stream
    # gives the uninterrupted stream's crops. The corrupt file shifts later samples across read
    # chunks, so some saved positions fall inside a chunk (a crop keyed by the place in the
    # chunk instead of the epoch would then differ after the resume).
    root = _noise_folder(tmp_path, [(13, 10), (10, 15), (20, 11), (12, 12), (16, 9), (11, 18)])
    (tmp_path / "f2_corrupt.png").write_bytes(b"GIF89a")
    options = dict(data_dir=root, batch_size=2, image_size=8, random_crop=True, seed=6,
                   num_workers=num_workers)
    uninterrupted = _batches(load_data(**options), 8)  # 3 batches per epoch
    for consumed in range(1, 5):
        stream = load_data(**options)
        _batches(stream, consumed)
        resumed = load_data(**options)
        resumed.load_state_dict(stream.state_dict())
        for (x, _), (x_ref, _) in zip(_batches(resumed, 3), uninterrupted[consumed:]):
            assert torch.equal(x, x_ref), consumed
    other_seed = _batches(load_data(**{**options, "seed": 7}), 4)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(other_seed, uninterrupted))


# Files and flips of the first two epochs of the stream below, recorded with the loader as it
# was before random_crop existed (commit be8e2aa).
PINNED_ORDER = [4, 2, 1, 3, 0, 3, 1, 4, 0, 2]
PINNED_FLIPS = [True, True, False, True, False, False, False, False, False, True]


def test_default_stream_is_the_centre_crop_stream_of_before(tmp_path):
    # random_crop defaults to off, and off is the stream fastdiff had before it existed: each
    # sample is read_image's centre crop, and the order and flips for this seed are the ones
    # recorded from the loader before random_crop was added (pinned literally).
    root = _noise_folder(tmp_path, [(17, 12), (12, 19), (14, 14), (25, 16), (9, 11)])
    options = dict(data_dir=root, batch_size=5, image_size=8, class_cond=True, seed=3,
                   num_workers=0)
    default = _batches(load_data(**options), 2)
    explicit = _batches(load_data(random_crop=False, **options), 2)
    centre = [read_image(f, 8) for f in list_image_files(root)]
    order, flips = [], []
    for (x, cond), (x_off, cond_off) in zip(default, explicit):
        assert torch.equal(x, x_off) and torch.equal(cond["y"], cond_off["y"])
        for image, file_id in zip(x, cond["y"].tolist()):
            flipped = torch.equal(image, centre[file_id].flip(-1))
            assert flipped or torch.equal(image, centre[file_id])
            order.append(file_id)
            flips.append(flipped)
    assert order == PINNED_ORDER and flips == PINNED_FLIPS
    assert load_data(**options).dataset_summary()["random_crop"] is False


def test_digits_are_never_cropped():
    options = dict(batch_size=16, image_size=12, class_cond=True, seed=2)
    plain = load_data(**options)
    asked = load_data(random_crop=True, **options)
    assert not asked.random_crop
    for (x, cond), (x_ref, cond_ref) in zip(_batches(asked, 3), _batches(plain, 3)):
        assert torch.equal(x, x_ref) and torch.equal(cond["y"], cond_ref["y"])


def test_classifier_train_crops_training_data_but_not_validation_data(tmp_path):
    # GD's classifier_train.py: load_data(random_crop=True) for --data_dir, the default
    # (centre) for --val_data_dir; the digits (no --data_dir) are not cropped.
    from types import SimpleNamespace

    from fastdiff.classifier_train import build_data

    root = _noise_folder(tmp_path, [(12, 10)] * 4)
    classifier_cfg = SimpleNamespace(image_size=8)
    dist_info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    train_cfg = SimpleNamespace(data_dir=root, val_data_dir=root, batch_size=2, seed=0,
                                class_from="filename", num_workers=0)
    train, val = build_data(classifier_cfg, train_cfg, dist_info)
    assert train.random_crop and not val.random_crop
    train_cfg.data_dir = train_cfg.val_data_dir = ""
    assert [s.random_crop for s in build_data(classifier_cfg, train_cfg, dist_info)] == [False,
                                                                                         False]


# ---------------------------------------------------------------- embedded digits


def test_digits_dataset_shape_range_labels_and_shards():
    from sklearn.datasets import load_digits

    digits = load_digits()
    native = DigitsDataset(8, class_cond=True)  # 8 → 8: bilinear is the identity
    assert len(native) == 1797 and native.num_images == 1797 and native.num_classes == 10
    expected = torch.from_numpy(digits.images[5].astype(np.float32) / 8 - 1)
    assert torch.allclose(native.load(5), expected.expand(3, 8, 8), atol=1e-6)
    assert native.labels[5] == digits.target[5]

    shards = [DigitsDataset(8, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [899, 898] and shards[0].labels is None
    assert torch.equal(shards[1].load(0), native.load(1))

    stream = load_data(batch_size=64, image_size=20, class_cond=True, seed=0)
    seen = set()
    for images, cond in _batches(stream, 5):
        assert images.shape == (64, 3, 20, 20) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1 and images.min() < 0 < images.max()
        assert torch.equal(images[:, 0], images[:, 2])  # gray replicated to RGB
        seen.update(cond["y"].tolist())
    assert seen == set(range(10))
    assert stream.dataset_summary()["num_classes"] == 10 and stream.num_workers == 0


@pytest.mark.gpu
def test_pinned_batches_on_a_cuda_machine():
    """--device cuda runs hand the trainer page-locked batches (non_blocking copies)."""
    from fastdiff.data import load_data
    stream = load_data(batch_size=4, image_size=8, class_cond=True, pin_memory=True)
    x, cond = next(stream)
    assert x.is_pinned() and cond["y"].is_pinned()
    plain, _ = next(load_data(batch_size=4, image_size=8, class_cond=True))
    assert not plain.is_pinned()
