"""SpRAy (spectral relevance analysis, Lapuschkin et al., Nat. Commun. 2019) within a syndrome.

Groups of patients the model decides on for *different reasons* (e.g. a Clever-Hans cue such as a mark on the
cheek in most photos of one syndrome) show up as clusters of their attribution maps:

1. each subject's map (normalisation of the stage, images averaged) is downsampled to ``size × size`` (area
   averaging, default 20×20) and scaled to max |value| = 1, so clusters reflect *where*, not *how much*;
2. a symmetric k-nearest-neighbour connectivity graph over the subjects (Euclidean distance, ``k ≈ √n`` unless
   given; scikit-learn ``kneighbors_graph``);
3. the spectrum of the normalised graph Laplacian ``L = I − D^{-1/2} A D^{-1/2}`` (eigenvalues
   ``0 = λ_0 ≤ λ_1 ≤ …``); the **eigengap** picks the number of clusters ``k* = argmax_{1≤k≤k_max} (λ_k − λ_{k−1})``:
   a graph with ``c`` well-separated groups has ``c`` eigenvalues near 0 and a jump after them; a single group has
   its largest gap right after ``λ_0`` (so one cluster is reported when there is no structure);
4. cluster labels from spectral clustering with ``k*`` clusters (scikit-learn ``SpectralClustering`` on the
   precomputed graph, ``cluster_qr`` labels: deterministic), numbered by decreasing size; a 2-D spectral embedding
   (``sklearn.manifold.spectral_embedding``) for the scatter plot.

Memory: the features are ``n_subjects × size²`` floats of one syndrome (400 per subject at 20×20), never full maps.

>>> rng = np.random.default_rng(0)
>>> a = np.zeros((112, 112)); a[40:60, 20:50] = 1
>>> b = np.zeros((112, 112)); b[80:100, 40:70] = 1
>>> maps = [m + 0.1 * rng.normal(size=m.shape) for m in [a] * 12 + [b] * 12]
>>> spray_cluster(np.stack([downsample(m) for m in maps])).n_clusters
2
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["SprayResult", "downsample", "spray_cluster", "eigengap"]


@dataclass
class SprayResult:
    """Outcome of :func:`spray_cluster` for one set of maps."""

    n_clusters: int
    labels: np.ndarray  # (n,) int, 0 = largest cluster
    eigenvalues: np.ndarray  # smallest eigenvalues of the normalised Laplacian, ascending
    eigengaps: np.ndarray  # λ_k − λ_{k−1}, k = 1..len(eigenvalues)−1
    embedding: np.ndarray  # (n, 2) spectral embedding for plotting
    n_neighbors: int
    sizes: list[int] = field(default_factory=list)


def downsample(map_: np.ndarray, size: int = 20) -> np.ndarray:
    """Area-average a map to ``size × size`` (float32)."""
    m = np.asarray(map_, np.float32)
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA)


def eigengap(eigenvalues: np.ndarray, max_clusters: int) -> tuple[int, np.ndarray]:
    """``(k*, gaps)``: the number of clusters by the largest gap among the first ``max_clusters`` eigenvalues."""
    ev = np.sort(np.asarray(eigenvalues, np.float64))
    gaps = np.diff(ev)
    kmax = min(max_clusters, len(gaps))
    if kmax < 1:
        return 1, gaps
    return int(np.argmax(gaps[:kmax]) + 1), gaps


def _features(maps: np.ndarray) -> np.ndarray:
    x = np.asarray(maps, np.float64).reshape(len(maps), -1)
    scale = np.abs(x).max(axis=1, keepdims=True)
    return x / np.where(scale > 0, scale, 1.0)


def spray_cluster(maps: np.ndarray, n_neighbors: int | None = None, max_clusters: int = 6,
                  seed: int = 0) -> SprayResult:
    """Cluster downsampled maps ``(n, h, w)`` (or ``(n, d)``) with the eigengap heuristic (module docstring)."""
    from scipy.sparse import csgraph
    from sklearn.cluster import SpectralClustering
    from sklearn.manifold import spectral_embedding
    from sklearn.neighbors import kneighbors_graph

    x = _features(maps)
    n = len(x)
    if n < 3:
        return SprayResult(1, np.zeros(n, int), np.zeros(min(n, 1)), np.zeros(0), np.zeros((n, 2)), 0, [n])
    k = n_neighbors or int(np.clip(round(np.sqrt(n)), 2, 10))
    k = min(k, n - 1)
    graph = kneighbors_graph(x, k, mode="connectivity", include_self=False)
    graph = graph.maximum(graph.T).astype(np.float64)
    lap = csgraph.laplacian(graph, normed=True)
    dense = lap.toarray() if hasattr(lap, "toarray") else np.asarray(lap)
    eigenvalues = np.linalg.eigvalsh(dense)[: max_clusters + 2]
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    k_star, gaps = eigengap(eigenvalues, max_clusters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected": expected for well-separated clusters
        emb = spectral_embedding(graph, n_components=2, drop_first=True, random_state=seed) if n > 3 else \
            np.zeros((n, 2))
        if k_star > 1:
            labels = SpectralClustering(n_clusters=k_star, affinity="precomputed", assign_labels="cluster_qr",
                                        random_state=seed).fit_predict(graph)
        else:
            labels = np.zeros(n, int)
    # number clusters by decreasing size, ties by first member: stable, readable labels
    uniq, counts = np.unique(labels, return_counts=True)
    first = {u: int(np.flatnonzero(labels == u)[0]) for u in uniq}
    order = sorted(uniq, key=lambda u: (-counts[list(uniq).index(u)], first[u]))
    relabel = {u: i for i, u in enumerate(order)}
    labels = np.array([relabel[u] for u in labels], int)
    emb = np.asarray(emb, np.float64)
    if emb.ndim == 1:
        emb = emb[:, None]
    if emb.shape[1] < 2:
        emb = np.column_stack([emb, np.zeros(n)])
    sizes = [int((labels == c).sum()) for c in range(len(order))]
    return SprayResult(len(order), labels, eigenvalues, gaps, emb[:, :2], k, sizes)
