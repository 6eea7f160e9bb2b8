"""GestaltMatcher-Arc's gallery encodings (``GMDB_gallery_encodings_<version>.pkl`` or a CSV export) as our
``embeddings.parquet`` rows, and how closely our embeddings agree with theirs.

A pickle is read only with the user's opt-in (``trust_pickle``), and then with the restricted unpickler of
:mod:`gestalt_xai.safe_pickle` under :data:`ENCODINGS_POLICY` (pandas/NumPy/builtin containers only; anything else
is refused, naming it).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError
from gestalt_xai.matching.distances import EmbeddingTable
from gestalt_xai.safe_pickle import PicklePolicy, restricted_unpickler

__all__ = ["ENCODINGS_POLICY", "compare_embeddings", "read_gmarc_encodings"]

#: the globals a pickled encodings DataFrame needs: pandas, NumPy and builtin containers; pandas ≥ 3 pickles
#: Arrow-backed string columns through three pyarrow helpers
ENCODINGS_POLICY = PicklePolicy(
    names=frozenset(
        {
            ("pyarrow.lib", "_restore_array"),
            ("pyarrow.lib", "py_buffer"),
            ("pyarrow.lib", "type_for_alias"),
            *(
                ("builtins", b)
                for b in ("list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                          "bytearray", "bool", "slice", "range", "object")
            ),
        }
    ),
    modules=frozenset({"pandas", "numpy", "copyreg", "_codecs", "collections", "datetime"}),
    module_prefixes=("pandas.", "numpy."),
    unknown="refuse",
    what="GM-Arc encodings contain only a pandas DataFrame of lists/arrays",
    error=InputError,
)


def _encodings_unpickler() -> type[pickle.Unpickler]:
    try:
        from pandas.compat.pickle_compat import Unpickler as Base  # maps classes moved between pandas versions
    except ImportError:  # pragma: no cover - older/newer pandas
        Base = pickle.Unpickler  # type: ignore[misc,assignment]
    return restricted_unpickler(ENCODINGS_POLICY, base=Base)


def read_gmarc_encodings(path: str | Path, trust_pickle: bool = False) -> pd.DataFrame:
    """Read GM-Arc gallery encodings into the ``embeddings.parquet`` schema.

    GM-Arc stores encodings as a pickled DataFrame (``GMDB_gallery_encodings_<version>.pkl``) with one row per
    image and slot: ``img_name`` (``<image_id>_<suffix>``; GM-Arc takes the part before the first ``_``),
    ``model`` (``m0``, ``m1`` …), ``flip``, ``gray`` (0/1), ``class_conf`` (logits, ``[0]`` for the ONNX
    member) and ``representations``. A ``.csv`` export (``;``-separated, JSON lists) is read without any
    opt-in.

    Unpickling can execute code embedded in the file, so a pickle is read only with ``trust_pickle=True``
    (``--trust-pickle``), and then through a restricted unpickler.

    Returns
    -------
    DataFrame with image_id, model_id (GM-Arc's model name), flip, gray, embedding, logits (None for ``[0]``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GM-Arc encodings file not found: {path}")
    if path.suffix.lower() == ".csv":
        raw = pd.read_csv(path, delimiter=";")
        raw["representations"] = raw["representations"].map(json.loads)
        raw["class_conf"] = raw["class_conf"].map(json.loads)
    else:
        if not trust_pickle:
            raise InputError(
                f"{path} is a Python pickle: loading it can execute arbitrary code hidden in the file. "
                "Pass trust_pickle=True (CLI: --trust-pickle) only for a file from a source you trust, "
                "or convert it to CSV (img_name;model;flip;gray;class_conf;representations) elsewhere."
            )
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            raw = _encodings_unpickler()(io.BytesIO(data)).load()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: not a readable GM-Arc encodings pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, pd.DataFrame):
        raise InputError(f"{path}: expected a pandas DataFrame, got {type(raw).__name__}")
    need = {"img_name", "model", "flip", "gray", "class_conf", "representations"}
    if need - set(raw.columns):
        raise InputError(
            f"{path}: GM-Arc encodings lack columns {sorted(need - set(raw.columns))} "
            f"(found {sorted(map(str, raw.columns))})"
        )

    def logits(v: Any) -> list[float] | None:
        arr = np.asarray(v, dtype=np.float32).ravel()
        return None if arr.size <= 1 else arr.tolist()

    out = pd.DataFrame(
        {
            "image_id": raw["img_name"].astype(str).str.split("_").str[0].astype(object),
            "model_id": raw["model"].astype(str).astype(object),
            "flip": raw["flip"].astype(int).astype(bool),
            "gray": raw["gray"].astype(int).astype(bool),
            "embedding": [np.asarray(v, dtype=np.float32).ravel() for v in raw["representations"]],
            "logits": [logits(v) for v in raw["class_conf"]],
        }
    )
    out = out.drop_duplicates(subset=["image_id", "model_id", "flip", "gray"], keep="first")
    return out.sort_values(["image_id", "model_id", "flip", "gray"], kind="stable").reset_index(drop=True)


def compare_embeddings(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Agreement of our embeddings with GM-Arc's for the images both have, for every pair of models.

    Returns one row per (our model, their model, flip, gray) with ``n_images``, the median and minimum cosine
    similarity and the median relative L2 difference ``‖a − b‖/‖b‖``. The matching model pair shows cosine ≈
    1.
    """
    a = EmbeddingTable.from_frame(ours)
    b = EmbeddingTable.from_frame(theirs)
    rows = []
    for sa in a.slots:
        for sb in b.slots:
            if sa[1:] != sb[1:]:
                continue
            common = sorted(set(a.image_ids[sa]) & set(b.image_ids[sb]))
            if not common:
                continue
            x = a.matrix(sa, common).astype(np.float64)
            y = b.matrix(sb, common).astype(np.float64)
            if x.shape[1] != y.shape[1]:
                continue
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            rel = np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)
            rows.append(
                {
                    "our_model": sa[0],
                    "their_model": sb[0],
                    "flip": sa[1],
                    "gray": sa[2],
                    "n_images": len(common),
                    "cosine_median": float(np.median(cos)),
                    "cosine_min": float(cos.min()),
                    "rel_diff_median": float(np.median(rel)),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "our_model",
            "their_model",
            "flip",
            "gray",
            "n_images",
            "cosine_median",
            "cosine_min",
            "rel_diff_median",
        ],
    )
