"""Distances between two sets of feature vectors: Fréchet distance and KID.

Both take float arrays of shape [N, D] (one row per image, e.g. a classifier's penultimate
layer) and compute in float64: the covariance products and the cubic kernel lose most of
their digits in float32 once D is in the hundreds.
"""
import warnings

import numpy as np


def _as_features(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] of features, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def gaussian_stats(features):
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    x = _as_features(features, "features")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(x, y, method="auto"):
    """Fréchet distance between Gaussians fitted to feature sets x [N, D] and y [M, D].

    For N(mu1, S1) and N(mu2, S2) the squared 2-Wasserstein distance is

        d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}),

    the quantity FID reports (FID is this on Inception features). ``method`` picks how the
    trace of the matrix square root is taken: "scipy" (scipy.linalg.sqrtm of S1 S2, the usual
    recipe), "eigh" (symmetric eigendecompositions, below) or "auto" (scipy when installed).
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {x.shape[1]} vs {y.shape[1]}")
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, method=method)


def frechet_distance_from_stats(mu1, s1, mu2, s2, method="auto"):
    """Fréchet distance from means [D] and covariances [D, D] (see frechet_distance)."""
    if method not in ("auto", "scipy", "eigh"):
        raise ValueError(f"method must be auto, scipy or eigh, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if method == "auto":
        method = "scipy" if _has_scipy() else "eigh"
    trace_sqrt = _trace_sqrt_scipy(s1, s2) if method == "scipy" else _trace_sqrt_eigh(s1, s2)
    diff = mu1 - mu2
    # Rounding can leave a tiny negative number for identical inputs; a distance is >= 0.
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt))


def _has_scipy():
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def _trace_sqrt_scipy(s1, s2):
    """tr((S1 S2)^{1/2}) with scipy's general matrix square root.

    S1 S2 is not symmetric; with singular covariances (fewer samples than dimensions, dead
    features) sqrtm can fail or return NaN, so as in the standard FID code a small multiple
    of the identity is added to both and the tiny imaginary part of the result is dropped.
    """
    from scipy import linalg

    with warnings.catch_warnings():
        # "Matrix is singular" is the normal case here (N < D); non-finite results are caught.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(root).all():
            offset = np.eye(s1.shape[0]) * 1e-6
            root = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(np.real(np.trace(root)))


def _trace_sqrt_eigh(s1, s2):
    """tr((S1 S2)^{1/2}) through symmetric eigendecompositions only.

    S1 S2 = S1^{1/2} (S1^{1/2} S2 S1^{1/2}) S1^{-1/2} is similar to the symmetric PSD matrix
    M = S1^{1/2} S2 S1^{1/2}, so both have the same eigenvalues and the trace of the square
    root is the sum of the square roots of M's eigenvalues. Eigenvalues that rounding pushes
    below zero are clipped (both matrices are PSD).
    """
    w1, v1 = np.linalg.eigh(s1)
    s1_half = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = s1_half @ s2 @ s1_half
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def kernel_inception_distance(x, y, num_subsets=100, subset_size=1000, seed=0):
    """KID: unbiased MMD² between x [N, D] and y [M, D] with the cubic polynomial kernel.

    k(a, b) = (a·b / D + 1)³ (Bińkowski et al., 2018). For each of ``num_subsets`` random
    subsets of m = min(subset_size, N, M) rows of each set,

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1))
                 - 2 Σ_{i,j} k(x_i, y_j) / m²,

    which is unbiased (expectation 0 when x and y come from one distribution, so it can be
    slightly negative). Returns (mean, std) over the subsets; subsets are drawn without
    replacement within a subset from a generator seeded with ``seed``.
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, "
                         f"{subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    dim = x.shape[1]
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        k_aa = (a @ a.T / dim + 1) ** 3
        k_bb = (b @ b.T / dim + 1) ** 3
        k_ab = (a @ b.T / dim + 1) ** 3
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        estimates[i] = within - 2 * k_ab.sum() / (m * m)
    return float(estimates.mean()), float(estimates.std())
