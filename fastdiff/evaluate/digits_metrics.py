"""Scores for class-conditional samples of a model trained on the embedded digits.

The digits classifier judges the samples: class consistency (does it read the digit that
was asked for?), and Fréchet distance and KID between its features of the samples and of
the held-out real digits (which neither the classifier nor, through the split, this score
has trained on).
"""
import numpy as np

from fastdiff.data.digits import NUM_DIGIT_CLASSES

from .digits_classifier import digits_split, digits_uint8, embed, load_digits_arrays
from .feature_stats import frechet_distance, kernel_inception_distance


def balanced_labels(num_samples, num_classes=NUM_DIGIT_CLASSES):
    """0, 1, ..., num_classes-1, 0, 1, ...: every class asked for equally often (±1)."""
    return np.arange(num_samples) % num_classes


def held_out_digits(image_size):
    """The held-out real digits as uint8 NHWC at image_size (the reference set)."""
    _, labels = load_digits_arrays()
    return digits_uint8(digits_split(len(labels))[1], image_size)


def score_digit_samples(classifier, samples, requested_labels, reference, *, kid_subsets=100,
                        kid_subset_size=1000, seed=0):
    """Score uint8 NHWC ``samples`` against uint8 NHWC ``reference`` images.

    ``requested_labels`` are the classes the samples were generated for (None for an
    unconditional model: accuracy is then None). Returns a JSON-ready dict.
    """
    if len(samples) < 2:
        raise ValueError(f"need at least 2 samples to score, got {len(samples)}")
    features, predicted = embed(classifier, samples)
    reference_features, _ = embed(classifier, reference)
    accuracy = None
    if requested_labels is not None:
        accuracy = float(np.mean(predicted == np.asarray(requested_labels)))
    kid_mean, kid_std = kernel_inception_distance(features, reference_features,
                                                  num_subsets=kid_subsets,
                                                  subset_size=kid_subset_size, seed=seed)
    return {
        "accuracy": accuracy,
        "fd": frechet_distance(features, reference_features),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_samples": len(samples),
        "num_reference": len(reference),
        "predicted_class_counts": np.bincount(predicted, minlength=NUM_DIGIT_CLASSES).tolist(),
    }
