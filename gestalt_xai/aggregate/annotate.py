"""Join the map-store index with the cohort: who each map belongs to and what its target means for that patient.

Each map row gains ``subject_id``, ``syndrome_id`` (the patient's diagnosis), ``target_kind``, ``target_ref`` and a
``target_group`` that is the same for every patient of a syndrome (each target kind's rule,
:func:`gestalt_xai.attribution.target_kinds.target_group`):

=========================  ===================================================================================
``centroid:own``           ``centroid:<S>`` where ``S`` is the patient's own syndrome (the usual composite)
``logit:own``              ``logit:<S>`` of the patient's own syndrome
``centroid:<T>``           towards another syndrome ``T`` (``topk`` or explicit ids in the explain stage)
``pair:same-syndrome``     ``pair:<image>`` with a partner of the patient's own syndrome
``pair:other-syndrome``    ``pair:<image>`` with a partner of another syndrome (``pair:unknown`` if not in cohort)
=========================  ===================================================================================
"""

from __future__ import annotations

import pandas as pd

from gestalt_xai.attribution.target_kinds import target_group
from gestalt_xai.attribution.targets import split_targets

__all__ = ["annotate_index", "GROUP_COLS", "OWN_TARGET_GROUPS"]

#: the columns (besides syndrome, stratum and normalisation) that identify a composite, a region score or a SpRAy run
GROUP_COLS = ["model_id", "method", "layer", "target_group"]

#: target groups that explain a patient towards its own diagnosis (composites, regions, SpRAy default to these)
OWN_TARGET_GROUPS = ("centroid:own", "logit:own", "pair:same-syndrome")


def annotate_index(index: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(annotated rows, rows whose image is not in the cohort)``; see the module docstring."""
    meta = images.assign(image_id=images["image_id"].astype(str), subject_id=images["subject_id"].astype(str),
                         syndrome_id=images["syndrome_id"].astype(str))
    meta = meta.drop_duplicates("image_id").set_index("image_id")
    idx = index.copy()
    idx["image_id"] = idx["image_id"].astype(str)
    known = idx["image_id"].isin(meta.index)
    missing = idx[~known].reset_index(drop=True)
    idx = idx[known].reset_index(drop=True)
    idx["subject_id"] = idx["image_id"].map(meta["subject_id"])
    idx["syndrome_id"] = idx["image_id"].map(meta["syndrome_id"])
    parts = split_targets(idx["target"])
    idx["target_kind"], idx["target_ref"] = parts["target_kind"], parts["target_ref"]
    syndrome_of = meta["syndrome_id"].to_dict()  # pair partners' diagnoses
    idx["target_group"] = [target_group(t, s, syndrome_of) for t, s in zip(idx["target"], idx["syndrome_id"],
                                                                           strict=True)]
    for col in ("model_id", "method", "layer"):
        idx[col] = idx[col].astype(str)
    return idx, missing
