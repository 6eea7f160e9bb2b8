"""Clinical Face Phenotype Space: gallery, distances, syndrome ranking, top-k and the GM-Arc protocols.

GestaltMatcher-Arc (Hustinx et al., WACV 2023) matches a test photo against a *gallery* of photos with known
disorders: embeddings (one per model × TTA slot) are compared slot by slot with the cosine distance, the slot
distance matrices are averaged, gallery images are sorted by that distance and each disorder is kept at its
first (nearest) occurrence. A disorder's *rank* is its position in that de-duplicated list. Top-k (k = 1, 5,
10, 30) is averaged per disorder (macro), not per image.

Modules, from arrays to a run:

* :mod:`~.distances` — :func:`cosine_distances`, :func:`slotwise_distances` (pure NumPy on float64);
  :class:`EmbeddingTable` (``embeddings.parquet`` as per-slot matrices; read it with ``Run.embeddings``).
* :mod:`~.ranking` — :func:`syndrome_distances`, :func:`syndrome_ranks`, :func:`ranked_syndromes`,
  :func:`topk_accuracy`; the tie rules.
* :mod:`~.centroids` — :class:`CentroidBank`, :func:`syndrome_centroids`: mean L2-normalised gallery embedding per
  syndrome, averaged per subject first (centroid attribution targets).
* :mod:`~.protocols` — :func:`frequent_protocol`, :func:`rare_protocol`, :func:`unified_protocols` (which images are
  test and gallery); :func:`evaluate_protocol` (ranks per test image + macro top-k per split);
  :func:`unified_gallery`, :func:`suggestion_table` (undiagnosed patients ranked against the unified gallery).
* :mod:`~.gmarc` — :func:`read_gmarc_encodings`, :func:`compare_embeddings`: GM-Arc gallery encodings (a pickle:
  opt-in only).
* :mod:`~.stage` — :class:`MatchConfig` + :func:`match_stage`, the ``gestalt-xai match`` stage (writes
  ``run/matching/``: ranks, per-split and summary tables, ``suggestions.parquet``); :func:`summary_table`,
  :func:`summary_lines`.

**A test syndrome absent from the gallery** (it has no gallery image) has no rank (``NaN`` / null in tables).
It counts as a miss at every k and stays in the macro average, since the gallery could not have found it; such
test images are flagged with ``in_gallery = False`` and counted in the summary's ``n_test_absent``.
"""

from gestalt_xai.matching.centroids import CentroidBank, SyndromeCentroids, syndrome_centroids
from gestalt_xai.matching.distances import (
    SLOT_COLUMNS,
    EmbeddingTable,
    ModelSlot,
    cosine_distances,
    slotwise_distances,
)
from gestalt_xai.matching.gmarc import compare_embeddings, read_gmarc_encodings
from gestalt_xai.matching.protocols import (
    Protocol,
    ProtocolSplit,
    cohort_protocols,
    evaluate_protocol,
    frequent_protocol,
    rank_table,
    rare_protocol,
    suggestion_table,
    unified_gallery,
    unified_protocols,
)
from gestalt_xai.matching.ranking import (
    DEFAULT_KS,
    TOP_LIST,
    Ties,
    ranked_syndromes,
    syndrome_distances,
    syndrome_ranks,
    topk_accuracy,
)
from gestalt_xai.matching.stage import MatchConfig, match_stage, summary_lines, summary_table

__all__ = [
    "DEFAULT_KS",
    "SLOT_COLUMNS",
    "TOP_LIST",
    "CentroidBank",
    "EmbeddingTable",
    "MatchConfig",
    "ModelSlot",
    "Protocol",
    "ProtocolSplit",
    "SyndromeCentroids",
    "Ties",
    "cohort_protocols",
    "compare_embeddings",
    "cosine_distances",
    "evaluate_protocol",
    "frequent_protocol",
    "match_stage",
    "summary_lines",
    "rank_table",
    "ranked_syndromes",
    "rare_protocol",
    "read_gmarc_encodings",
    "slotwise_distances",
    "summary_table",
    "suggestion_table",
    "syndrome_centroids",
    "syndrome_distances",
    "syndrome_ranks",
    "topk_accuracy",
    "unified_gallery",
    "unified_protocols",
]
