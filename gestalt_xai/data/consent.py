"""Consent to show a photo: the cohort image table's ``consent_to_publish`` column.

A report, a questionnaire or a figure may show a cohort photo (a gallery face next to a patient, a stimulus) only
where the image table says so. The cohort readers (:mod:`gestalt_xai.data.cohort`) give every image table the boolean
column :data:`CONSENT_COLUMN`:

* read from the cohort's own table when it has one of the accepted columns (:data:`CONSENT_COLUMNS`, any case): a
  GMDB folder's ``image_metadata_<version>.tsv`` or a plain cohort CSV;
* ``True`` only for an explicit yes (:data:`YES`: ``1``, ``true``, ``yes``, ``y``, ``t``, any case); every other value
  — empty, ``0``, ``no``, anything unrecognised (logged) — and an image without a row is ``False``;
* ``False`` for every image when the cohort has no such column: **not showable unless the data say so**.

What GMDB itself calls its publication flag is not documented in GestaltMatcher-Arc's code, so the accepted names
are a documented set (``data_cards/gmdb.md``); rename the column to :data:`CONSENT_COLUMN` if yours differs. Derived
pictures that show no single photo (composites of at least ``aggregate.min_subjects`` subjects) do not need it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["CONSENT_COLUMN", "CONSENT_COLUMNS", "YES", "parse_consent", "with_consent"]

#: the image table's column: may this photo be shown in a report, questionnaire or figure?
CONSENT_COLUMN = "consent_to_publish"
#: column names read as consent (lower-cased), the first being the one written
CONSENT_COLUMNS = (CONSENT_COLUMN, "publication_consent", "consent_publication", "publishable", "publish_photo")
#: the values read as consent (lower-cased, stripped); everything else is no consent
YES = frozenset({"1", "true", "yes", "y", "t"})
_NO = frozenset({"", "0", "false", "no", "n", "f", "nan", "none", "<na>"})


def parse_consent(values: Iterable[object]) -> np.ndarray:
    """Booleans of a consent column: ``True`` for an explicit yes only (module docstring).

    >>> parse_consent(["yes", "1", 1, True, "TRUE", "no", "", None, float("nan"), "maybe", 0]).tolist()
    [True, True, True, True, True, False, False, False, False, False, False]
    """
    texts = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip().lower() for v in values]
    odd = sorted({t for t in texts if t not in YES and t not in _NO})
    if odd:
        log.warning("%s: values %s read as no consent (yes: %s)", CONSENT_COLUMN, odd[:5], sorted(YES))
    return np.array([t in YES for t in texts], dtype=bool)


def with_consent(images: pd.DataFrame, where: str = "") -> pd.DataFrame:
    """``images`` with the boolean :data:`CONSENT_COLUMN`, read from an accepted column or ``False`` throughout.

    >>> with_consent(pd.DataFrame({"image_id": ["a", "b"], "Publishable": ["yes", "no"]}))
    ... # doctest: +NORMALIZE_WHITESPACE
      image_id  consent_to_publish
    0        a                True
    1        b               False
    >>> with_consent(pd.DataFrame({"image_id": ["a"]}))[CONSENT_COLUMN].tolist()
    [False]
    """
    found = [c for c in images.columns if str(c).strip().lower() in CONSENT_COLUMNS]
    if len(found) > 1:
        raise InputError(f"{where or 'image table'}: several consent columns {found}; keep one of "
                         f"{', '.join(CONSENT_COLUMNS)}")
    values = parse_consent(images[found[0]]) if found else np.zeros(len(images), dtype=bool)
    return images.drop(columns=found).assign(**{CONSENT_COLUMN: values})
