"""Syndrome-level aggregation of attribution maps: composite maps and faces, similarity maps, generic maps,
facial-region scores and SpRAy clusters (the ``aggregate`` stage).

Modules, one concept each:

- :mod:`.annotate`: joins the map-store index with the cohort (subject, syndrome, target group)
- :mod:`.composite`: named per-map normalisations, the streaming composite accumulator (one subject counts once) and
  the composites of a syndrome, of every subject and per stratum
- :mod:`.faces`: composite faces, strata (sex / age band / ancestry) and the privacy guard
- :mod:`.similarity`: both directions of pair maps; a patient against a syndrome (centroid + nearest gallery)
- :mod:`.regions`: positive-mass shares and enrichment per atlas region, with HPO anchors
- :mod:`.spray`: SpRAy (downsampled maps, kNN graph, spectral embedding, eigengap) per syndrome
- :mod:`.report`: which figures to draw (drawn by :mod:`gestalt_xai.viz`); :mod:`.stage`: :class:`AggregateConfig`
  and :func:`aggregate_stage` (SpRAy's cue check on a confounded synthetic syndrome:
  :func:`gestalt_xai.assess.planted.check_cue`; the other checks against a synthetic cohort's truth are the assess
  stage's, :mod:`gestalt_xai.assess`)
"""

from gestalt_xai.aggregate.composite import NORMALISATIONS, CompositeAccumulator, composite_of_maps, normalise
from gestalt_xai.aggregate.regions import region_shares
from gestalt_xai.aggregate.similarity import pair_maps, patient_syndrome_maps
from gestalt_xai.aggregate.spray import spray_cluster
from gestalt_xai.aggregate.stage import AggregateConfig, aggregate_stage, composite_array, load_composites

__all__ = [
    "AggregateConfig",
    "CompositeAccumulator",
    "NORMALISATIONS",
    "aggregate_stage",
    "composite_array",
    "composite_of_maps",
    "load_composites",
    "normalise",
    "pair_maps",
    "patient_syndrome_maps",
    "region_shares",
    "spray_cluster",
]
