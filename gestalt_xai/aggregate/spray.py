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

In the aggregate stage (:func:`spray_syndromes`) SpRAy runs per ``(syndrome, model, method, layer, target group)``
for the targets that explain a patient towards its own syndrome, on syndromes with enough subjects; a second
streaming pass over the maps forms each cluster's full-resolution composite. Whether a confounded syndrome splits on
its cue is checked against the synthetic cohort's truth by :func:`gestalt_xai.assess.planted.check_cue`.

Memory: the features are ``n_subjects × size²`` floats of one syndrome (400 per subject at 20×20), never full maps.

>>> rng = np.random.default_rng(0)
>>> a = np.zeros((112, 112)); a[40:60, 20:50] = 1
>>> b = np.zeros((112, 112)); b[80:100, 40:70] = 1
>>> maps = [m + 0.1 * rng.normal(size=m.shape) for m in [a] * 12 + [b] * 12]
>>> spray_cluster(np.stack([downsample(m) for m in maps])).n_clusters
2
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from gestalt_xai.aggregate.annotate import GROUP_COLS, OWN_TARGET_GROUPS
from gestalt_xai.aggregate.composite import CompositeAccumulator, stream_subject_maps, subject_mean

__all__ = ["SprayResult", "downsample", "spray_cluster", "eigengap", "spray_syndromes", "spray_table"]


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


def spray_syndromes(store: Any, rows: pd.DataFrame, features: Mapping[tuple[Any, ...], list[tuple[str, np.ndarray]]],
                    *, normalisation: str, n_neighbors: int | None = None, max_clusters: int = 6,
                    min_subjects: int = 8, seed: int = 0, block_maps: int = 256,
                    marked: Mapping[str, set[str]] | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[Any, ...], Any]]:
    """SpRAy per ``(syndrome, model_id, method, layer, target_group)`` of an own target group, then the clusters'
    composites in a second streaming pass over ``rows`` (annotated store index rows).

    Parameters
    ----------
    features : key → ``[(subject, downsampled subject map), …]`` (:func:`downsample` of the subject's mean map under
        ``normalisation``, collected in the stage's first pass).
    marked : syndrome → subjects whose photos carry a known cue (a confounded synthetic syndrome): its analyses get
        ``confounded_syndrome`` True and its members a ``confounded`` flag (``None`` for other syndromes).

    Returns
    -------
    ``(analyses, members, results)``: one dict per analysis (with ``cluster_means``: cluster → composite map), one
    dict per subject (cluster, 2-D embedding), and key → ``(SprayResult, subjects)``.
    """
    marked = marked or {}
    analyses, members = [], []
    results: dict[tuple[Any, ...], Any] = {}
    for key in sorted(features):
        syndrome, model_id, method, layer, tgroup = key
        if tgroup not in OWN_TARGET_GROUPS or len(features[key]) < min_subjects:
            continue
        subjects = [s for s, _ in features[key]]
        x = np.stack([f for _, f in features[key]])
        res = spray_cluster(x, n_neighbors, max_clusters, seed=seed)
        results[key] = (res, subjects)
        for s, c, e in zip(subjects, res.labels, res.embedding, strict=True):
            members.append({"syndrome_id": syndrome, "model_id": model_id, "method": method, "layer": layer,
                            "target_group": tgroup, "subject_id": s, "cluster": int(c), "embedding_x": float(e[0]),
                            "embedding_y": float(e[1]),
                            "confounded": (s in marked[syndrome]) if syndrome in marked else None})
        analyses.append({"syndrome_id": syndrome, "model_id": model_id, "method": method, "layer": layer,
                         "target_group": tgroup, "normalisation": normalisation, "n_subjects": len(subjects),
                         "n_neighbors": res.n_neighbors, "n_clusters": res.n_clusters,
                         "cluster_sizes": res.sizes, "eigenvalues": [float(v) for v in res.eigenvalues],
                         "confounded_syndrome": syndrome in marked})
    # second pass: full-resolution composites per cluster (streamed, one accumulator per cluster)
    cluster_acc: dict[tuple[Any, ...], CompositeAccumulator] = {}
    member_of = {(m["syndrome_id"], m["model_id"], m["method"], m["layer"], m["target_group"], m["subject_id"]):
                 m["cluster"] for m in members}
    wanted = rows[rows["syndrome_id"].isin({k[0] for k in results})]
    for key, subject, items in stream_subject_maps(store, wanted, GROUP_COLS, block_maps):
        syndrome = str(items[0][0]["syndrome_id"])
        c = member_of.get((syndrome, *key, subject))
        if c is None:
            continue
        u, n = subject_mean([m for _, m in items], normalisation)
        cluster_acc.setdefault((syndrome, *key, c), CompositeAccumulator()).add(u, n)
    for a in analyses:
        key = (a["syndrome_id"], a["model_id"], a["method"], a["layer"], a["target_group"])
        a["cluster_means"] = {c: cluster_acc[(*key, c)].mean() for c in range(a["n_clusters"])
                              if (*key, c) in cluster_acc}
    return analyses, members, results


def spray_table(analyses: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows of ``aggregate/spray.parquet``: the analyses without maps, the cue check (if any) as JSON."""
    return pd.DataFrame([{k: v for k, v in a.items() if k not in ("cluster_means", "cue", "cue_mask")}
                         | {"cue": json.dumps(a.get("cue"), sort_keys=True) if a.get("cue") else None}
                         for a in analyses])
