"""A model's classes: GM-Arc's lookup table (class index → syndrome id) and the check against a cohort."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gestalt_xai.errors import ConfigError
from gestalt_xai.models.gestaltmatcher import GestaltMatcher

__all__ = ["check_classes", "read_lookup_table", "set_syndrome_ids"]


def read_lookup_table(path: str | os.PathLike[str]) -> list[str]:
    """GM-Arc's ``lookup_table_gmdb_<version>.txt``: a header line, then a JSON list (class index → syndrome id).

    A file holding only the JSON list is accepted too. Ids are returned as strings.
    """
    p = Path(path)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read lookup table {p}: {exc}") from exc
    for line in reversed(lines):
        try:
            ids = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ids, list):
            return [str(i) for i in ids]
    raise ConfigError(f"{p} is not a GM-Arc lookup table (expected a header line, then a JSON list of syndrome ids)")


def check_classes(
    model: GestaltMatcher, syndrome_ids: Sequence[str], *, exact: bool = False, partial: bool = False
) -> dict[str, int]:
    """Check a model's class list against a cohort's syndromes before any class-dependent work.

    Needed where classes matter (training/fine-tuning, logit targets); embedding-only use never calls it.
    Returns ``{syndrome_id: class index}`` for the cohort's syndromes that are classes of the model.

    Parameters
    ----------
    syndrome_ids : the cohort's syndromes (any order).
    exact : require the same set of syndromes (fine-tuning the existing classifier); otherwise every cohort
        syndrome must be one of the model's classes.
    partial : the model need know only some of the syndromes (a model trained on a subset, e.g. the class-imbalance
        experiment): the others are left out of the result, and only a class list sharing none is refused.

    Raises
    ------
    ConfigError : no classifier, no lookup table, syndromes missing from the model's classes (with ``partial``: no
        syndrome shared), or with ``exact`` classes absent from the cohort.

    Examples
    --------
    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2, syndrome_ids=["A", "B"])
    >>> check_classes(m, ["B", "C"], partial=True)
    {'B': 1}
    >>> check_classes(m, ["C"], partial=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: none of the cohort's 1 syndromes is a class of the model (its classes: ...
    """
    wanted = [str(s) for s in syndrome_ids]
    if model.num_classes is None:
        raise ConfigError(
            "the model has no classifier (embedding-only, e.g. an ONNX member): class-dependent "
            "work (training the classifier as is, logit targets) needs a model with one"
        )
    if model.syndrome_ids is None:
        raise ConfigError(
            f"the model's {model.num_classes} classes have no syndrome ids: declare its lookup table "
            "(models: [{path: …, lookup_table: lookup_table_gmdb_<version>.txt}], or "
            "load_model(..., syndrome_ids=…))"
        )
    index = {s: i for i, s in enumerate(model.syndrome_ids)}
    missing = [s for s in dict.fromkeys(wanted) if s not in index]
    if partial and wanted and len(missing) == len(set(wanted)):
        raise ConfigError(
            f"none of the cohort's {len(set(wanted))} syndromes is a class of the model (its classes: "
            f"{model.syndrome_ids[:10]}{' …' if len(index) > 10 else ''}); its lookup table belongs to another "
            "class list"
        )
    if missing and not partial:
        raise ConfigError(
            f"{len(missing)} of the cohort's {len(set(wanted))} syndromes are not classes of the model "
            f"(e.g. {missing[:10]}); use a model trained on these syndromes, or embedding-only methods"
        )
    if exact:
        extra = sorted(set(index) - set(wanted))
        if extra:
            raise ConfigError(
                f"the model has {len(extra)} classes absent from the cohort (e.g. {extra[:10]}); "
                "exact class match is required here"
            )
    return {s: index[s] for s in dict.fromkeys(wanted) if s in index}


def set_syndrome_ids(
    model: GestaltMatcher, syndrome_ids: Sequence[str] | str | os.PathLike[str], path: Path | str
) -> None:
    """Give ``model`` its class list (a list, or a lookup-table file); it must fit the classifier's size."""
    ids = (
        read_lookup_table(syndrome_ids)
        if isinstance(syndrome_ids, str | os.PathLike)
        else [str(s) for s in syndrome_ids]
    )
    if model.num_classes is None:
        raise ConfigError(f"{path}: a lookup table was given but the model has no classifier (embedding only)")
    if len(ids) != model.num_classes:
        raise ConfigError(
            f"{path}: the lookup table has {len(ids)} syndromes but the classifier has "
            f"{model.num_classes} outputs; use the lookup table the model was trained with"
        )
    repeated = sorted({s for s in ids if ids.count(s) > 1})
    if repeated:
        raise ConfigError(f"{path}: the lookup table names syndromes {repeated[:10]} for more than one class")
    model.syndrome_ids = ids
    model.config["syndrome_ids"] = ids
