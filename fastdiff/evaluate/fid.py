"""Real FID: Inception-v3 pool features (torch-fidelity's TF-compatible network) of generated
and reference images, then the Fréchet distance of feature_stats.

Only with a local weights file (--inception_weights, e.g. torch-fidelity's
weights-inception-2015-12-05-6726825d.pth): nothing is ever downloaded. torch-fidelity is an
optional dependency (pip install 'fastdiff[fid]').
"""
import os

import numpy as np
import torch

from .feature_stats import frechet_distance

FEATURE_LAYER = "2048"  # the pool3 features FID is defined on


def check_fid_inputs(weights_path):
    """Fail early (ValueError, one line) when FID cannot run: missing file or package."""
    if not os.path.isfile(weights_path):
        raise ValueError(f"--inception_weights: no such file: {weights_path} (FID needs a local "
                         "Inception-v3 weights file; nothing is downloaded)")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ValueError(f"FID needs torch-fidelity ({err}): pip install 'fastdiff[fid]' "
                         "(or pip install torch-fidelity)") from None


def load_inception(weights_path, device):
    """torch-fidelity's Inception-v3 feature extractor with the weights from ``weights_path``."""
    check_fid_inputs(weights_path)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity unpickles the file with weights_only=False; a safe load first refuses
    # a file that holds anything but tensors, and gives a clear error for a wrong file.
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER],
                                                feature_extractor_weights_path=weights_path)
    except Exception as err:  # noqa: BLE001 - any unusable file gets the same one-line error
        raise ValueError(f"--inception_weights {weights_path} is not an Inception-v3 state_dict "
                         f"for torch-fidelity: {type(err).__name__}: {err}") from None
    return extractor.to(device)


@torch.no_grad()
def inception_features(extractor, images, device, batch_size=64):
    """uint8 NHWC RGB images → float64 [N, 2048] pool3 features."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        x = x.permute(0, 3, 1, 2).contiguous().to(device)
        (features,) = extractor(x)
        out.append(features.double().cpu().numpy())
    return np.concatenate(out)


def reference_images_from_folder(data_dir, image_size, limit=0):
    """uint8 NHWC images of data_dir (GD's order and resize/crop), the first ``limit`` (0 = all).

    Read straight to uint8 (no float round trip, which can shift a pixel value by one)."""
    from PIL import Image

    from fastdiff.data import DataError, list_image_files, resize_and_center_crop

    files = list_image_files(data_dir)
    if limit:
        files = files[:limit]
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(resize_and_center_crop(image.convert("RGB"), image_size))
        except (OSError, SyntaxError, EOFError) as err:  # what PIL raises for a broken file
            raise DataError(f"unreadable FID reference image {path}: {err}") from None
    return np.stack(images)


def fid(extractor, samples, reference, device, batch_size=64):
    """FID between uint8 NHWC ``samples`` and ``reference``."""
    return frechet_distance(inception_features(extractor, samples, device, batch_size),
                            inception_features(extractor, reference, device, batch_size))
