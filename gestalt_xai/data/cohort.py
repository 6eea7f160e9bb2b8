"""Cohort tables: GMDB-format metadata and plain CSV tables, subject-level splits and the frequent/rare protocol.

Whatever the source, a cohort becomes one :class:`Cohort`: an image table (``image_id, subject_id, syndrome_id, path``
plus ``sex, age, ancestry`` when known, and ``consent_to_publish``: may the photo be shown, False unless the data say
so, :mod:`gestalt_xai.data.consent`), a syndrome table, a long split table (``image_id, set, split``) and the
class lookup (class index → syndrome id). Identifiers are strings everywhere.

GMDB layout (GestaltMatcher Database, as read by GestaltMatcher-Arc)::

    gmdb_{train,val,test,frequent_gallery,frequent_test,rare_gallery,rare_test}_images_<version>.csv
        image_id, subject, label[, split]          (subject → subject_id, label → syndrome_id)
    gmdb_syndromes_<version>.tsv                   syndrome_id, syndrome_name, image_ids, subject_ids,
                                                   num_of_images, num_of_subjects, train, OMIM
    lookup_table_gmdb_<version>.txt                a header line, then a JSON list: class index → disorder id
    image_metadata_<version>.tsv                   optional: image_id and sex / age / ancestry / consent_to_publish

Protocol (Hustinx et al. 2023): "frequent" disorders have more than 6 subjects, "rare" ones 2–6. Frequent
disorders are split by subject into train/val/test (≈10 % of each disorder's subjects to test, as many to val);
the frequent gallery is train + val. Rare disorders get 10 splits, each holding out one subject per disorder as
test and keeping the rest as gallery. A subject is never on both sides of a split.

**Undiagnosed patients.** A row whose syndrome is empty, missing (NaN) or ``unknown`` (any case) is an *undiagnosed*
patient: its label becomes the reserved id :data:`UNDIAGNOSED` (``"unknown"``), so no real syndrome can carry that
id. Undiagnosed images are aligned, embedded and ranked like any other, but they belong to one split set only,
:data:`UNDIAGNOSED_SET` (``undiagnosed``): never to a training, gallery or protocol test set (:func:`gmdb_splits`,
:func:`undiagnosed_splits`). In GMDB layout they are listed in ``gmdb_undiagnosed_images_<version>.csv`` (this
package's addition; an unlabelled row in any other GMDB file is moved to that set when read).

Every image path must resolve inside the declared image root: ``../`` escapes, absolute paths elsewhere and symlinks
pointing out of the root are rejected (:attr:`Cohort.rejected`), one row per image, and the run goes on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gestalt_xai.data.consent import CONSENT_COLUMN, CONSENT_COLUMNS, with_consent
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.runs import atomic_write_text, write_parquet

if TYPE_CHECKING:
    from gestalt_xai.runs import Run

__all__ = [
    "Cohort",
    "GMDB_SETS",
    "UNDIAGNOSED",
    "UNDIAGNOSED_SET",
    "is_undiagnosed",
    "undiagnosed_splits",
    "FREQUENT_MIN_SUBJECTS",
    "N_RARE_SPLITS",
    "IMAGE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "load_cohort",
    "load_gmdb",
    "load_table",
    "write_gmdb",
    "gmdb_splits",
    "frequency_class",
    "resolve_inside",
    "save_run_cohort",
    "load_run_cohort",
]

GMDB_SETS = ("train", "val", "test", "frequent_gallery", "frequent_test", "rare_gallery", "rare_test")
#: the reserved syndrome id of an undiagnosed patient (module docstring); no real syndrome can have it
UNDIAGNOSED = "unknown"
#: the one split set undiagnosed images belong to (in no training, gallery or protocol test set)
UNDIAGNOSED_SET = "undiagnosed"
#: every set a cohort's split table may name
COHORT_SETS = (*GMDB_SETS, UNDIAGNOSED_SET)
#: the sets whose images are explained as patients, and those that form galleries and centroids
TEST_SETS = ("test", "frequent_test", "rare_test")
GALLERY_SETS = ("train", "val", "frequent_gallery", "rare_gallery")
#: a disorder is "frequent" with more than this many subjects (GMDB protocol)
FREQUENT_MIN_SUBJECTS = 7
#: a disorder is "rare" with 2..6 subjects
RARE_MIN_SUBJECTS = 2
N_RARE_SPLITS = 10
IMAGE_COLUMNS = ["image_id", "subject_id", "syndrome_id", "path"]
OPTIONAL_COLUMNS = ["sex", "age", "ancestry"]
SPLIT_COLUMNS = ["image_id", "set", "split"]

_GMDB_RE = re.compile(r"^gmdb_(?P<set>" + "|".join(COHORT_SETS) + r")_images_(?P<version>.+)\.csv$")


@dataclass
class Cohort:
    """A cohort's tables (see the module docstring for the columns)."""

    images: pd.DataFrame
    syndromes: pd.DataFrame
    splits: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPLIT_COLUMNS))
    lookup: list[str] | None = None
    version: str = "custom"
    image_root: str = ""
    #: images whose path was refused or missing: image_id, message
    rejected: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "message"]))

    def image_ids(self, set_name: str, split: int | None = None) -> list[str]:
        """Image ids of one split set (``split`` selects one of the 10 rare splits)."""
        s = self.splits[self.splits["set"] == set_name]
        if split is not None:
            s = s[s["split"] == split]
        return sorted(s["image_id"].unique().tolist())

    @property
    def syndrome_ids(self) -> list[str]:
        """Sorted syndrome ids present in the image table (not :data:`UNDIAGNOSED`: it names no syndrome)."""
        return sorted(s for s in self.images["syndrome_id"].unique().tolist() if s != UNDIAGNOSED)


# ------------------------------------------------------------------------------------------ undiagnosed patients
def is_undiagnosed(label: object) -> bool:
    """Whether a syndrome label means "no diagnosis": empty, missing (``None``, NaN) or ``unknown`` in any case.

    >>> [is_undiagnosed(v) for v in ("", " ", float("nan"), None, "nan", "Unknown", "S01", "0", 605130)]
    [True, True, True, True, True, True, False, False, False]
    """
    if label is None or (isinstance(label, float) and np.isnan(label)) or label is pd.NA:
        return True
    return str(label).strip().lower() in ("", "nan", UNDIAGNOSED)


def _label_undiagnosed(images: pd.DataFrame, column: str = "syndrome_id") -> pd.DataFrame:
    """``images`` with every undiagnosed label (:func:`is_undiagnosed`) replaced by :data:`UNDIAGNOSED`."""
    return images.assign(**{column: [UNDIAGNOSED if is_undiagnosed(v) else v for v in images[column]]})


def undiagnosed_splits(images: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """``splits`` with each undiagnosed image (label :data:`UNDIAGNOSED`) in the set ``undiagnosed`` only.

    Whatever set a source listed an unlabelled image in, it leaves every training, gallery and test set: a patient
    without a diagnosis can be ranked and explained, never used as a reference or scored against a label.

    >>> imgs = pd.DataFrame({"image_id": ["a", "b"], "syndrome_id": ["S1", UNDIAGNOSED]})
    >>> sp = pd.DataFrame({"image_id": ["a", "b", "b"], "set": ["train", "test", "frequent_test"], "split": -1})
    >>> undiagnosed_splits(imgs, sp).values.tolist()
    [['a', 'train', -1], ['b', 'undiagnosed', -1]]
    """
    ids = sorted(set(images.loc[images["syndrome_id"] == UNDIAGNOSED, "image_id"].astype(str)))
    keep = splits[~splits["image_id"].astype(str).isin(ids)] if len(splits) else splits.reindex(columns=SPLIT_COLUMNS)
    extra = pd.DataFrame({"image_id": ids, "set": UNDIAGNOSED_SET, "split": -1}, columns=SPLIT_COLUMNS)
    parts = [p for p in (keep, extra) if len(p)]
    out = pd.concat(parts, ignore_index=True) if parts else keep
    return out.sort_values(["set", "split", "image_id"], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- path safety
def resolve_inside(root: Path, relative: str | Path) -> Path:
    """Resolve ``relative`` under ``root`` and refuse anything that ends up outside it.

    ``../`` escapes, absolute paths elsewhere, symlinks pointing out of the root, symbolic link loops and paths no
    file system can hold (a NUL character) raise :class:`InputError` naming the path.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> resolve_inside(root, "a/b.jpg") == root.resolve() / "a" / "b.jpg"
    True
    >>> resolve_inside(root, "../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.InputError: path '../etc/passwd' resolves outside the image root ...
    """
    root_real = Path(root).resolve()
    candidate = Path(relative)
    full = candidate if candidate.is_absolute() else root_real / candidate
    try:
        real = full.resolve()  # follows symlinks, so a link pointing outside is caught here
    except (RuntimeError, OSError) as exc:  # a link loop: RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise InputError(f"path {str(relative)!r} under {root_real} is a symbolic link loop (it never reaches a "
                         f"file): {exc}") from None
    except ValueError as exc:  # an embedded NUL character
        raise InputError(f"path {str(relative)!r} under {root_real} is not a valid path: {exc}") from None
    if not real.is_relative_to(root_real):
        raise InputError(f"path {str(relative)!r} resolves outside the image root {root_real} "
                         f"(to {real}); only files inside the declared image root are read")
    return real


def _unusable_id(image_id: str) -> str | None:
    """Why ``image_id`` cannot name the image's files in a run (``aligned/<image_id>.png``), or ``None``."""
    if image_id in ("", ".", ".."):
        return f"image id {image_id!r} cannot name a file"
    if any(c in image_id for c in "/\\") or any(ord(c) < 32 for c in image_id):
        return f"image id {image_id!r} holds a path separator or control character, so it cannot name a file"
    return None


def _resolve_paths(images: pd.DataFrame, root: Path, raw: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each image's path resolved inside ``root``; rows with an unusable id, an empty path or a path that resolves
    outside the root go to the rejected table (one message each)."""
    paths, rejected = [], []
    for image_id, rel in zip(images["image_id"], raw, strict=True):
        try:
            if (problem := _unusable_id(image_id)) is not None:
                raise InputError(problem)
            if not isinstance(rel, str) or not rel.strip():
                raise InputError(f"image {image_id!r} has no path")
            paths.append(str(resolve_inside(root, rel)))
        except InputError as exc:
            paths.append("")
            rejected.append({"image_id": image_id, "message": str(exc)})
    images = images.assign(path=paths)
    rej = pd.DataFrame(rejected, columns=["image_id", "message"])
    return images[images["path"] != ""].reset_index(drop=True), rej


def _normalise_ids(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = df[c].map(_id_str)
    return df


def _id_str(v: object) -> str:
    # GMDB ids are integers in some files and strings in others: 123, 123.0 and "123" are the same id
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


# ------------------------------------------------------------------------------------------------------ reading
def _find_gmdb_files(metadata_dir: Path, version: str | None) -> tuple[str, dict[str, Path]]:
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(metadata_dir.iterdir()):
        m = _GMDB_RE.match(p.name)
        if m:
            found.setdefault(m["version"], {})[m["set"]] = p
    if not found:
        raise InputError(f"{metadata_dir}: no gmdb_<set>_images_<version>.csv files found")
    if version is None:
        if len(found) > 1:
            raise ConfigError(f"{metadata_dir} holds several GMDB versions ({', '.join(sorted(found))}); "
                              "choose one with version=…")
        version = next(iter(found))
    if version not in found:
        raise ConfigError(f"{metadata_dir}: no GMDB files of version {version!r} (found {', '.join(sorted(found))})")
    return version, found[version]


def _read_csv(path: Path, required: list[str], sep: str = ",") -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, OverflowError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise InputError(f"{path}: cannot read table: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    _refuse_repeated_columns(path, df)
    df = df.fillna("")  # cells of rows shorter than the header
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(df.columns)})")
    return df


def _refuse_repeated_columns(path: Path, df: pd.DataFrame) -> None:
    repeated = sorted(set(df.columns[df.columns.duplicated()]))
    if repeated:
        raise InputError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once")


def _read_metadata(path: Path) -> pd.DataFrame:
    df = _read_csv(path, ["image_id"], sep="\t")
    df = df.rename(columns={c: c.lower() for c in df.columns})
    _refuse_repeated_columns(path, df)
    keep = ["image_id"] + [c for c in (*OPTIONAL_COLUMNS, *CONSENT_COLUMNS) if c in df.columns]
    df = _normalise_ids(df[keep], ["image_id"])
    repeated = df.loc[df["image_id"].duplicated(), "image_id"]
    if not repeated.empty:
        raise InputError(f"{path}: image(s) {', '.join(sorted(repeated.unique())[:5])} have several rows")
    return df


def _split_numbers(path: Path, values: pd.Series) -> pd.Series:
    """GMDB's ``split`` column (rare splits 0..9, written as integers or floats) as integers."""
    def number(v: str) -> int:
        try:
            f = float(v)
            if f.is_integer():
                return int(f)
        except (ValueError, OverflowError):
            pass
        raise InputError(f"{path}: column split: {v!r} is not a split number")

    return values.map(number)


def load_gmdb(metadata_dir: str | Path, image_root: str | Path | None = None, version: str | None = None,
              pattern: str = "{image_id}.jpg") -> Cohort:
    """Read GMDB metadata files.

    Parameters
    ----------
    metadata_dir:
        Folder with the ``gmdb_*`` files.
    image_root:
        Folder the images live in (default: ``<metadata_dir>/images``). Every path must resolve inside it.
    version:
        GMDB version suffix as in the file names (e.g. ``v1.0.3``); needed only when several versions are present.
    pattern:
        Image file name relative to ``image_root``, formatted with ``image_id``.
    """
    metadata_dir = Path(metadata_dir)
    if not metadata_dir.is_dir():
        raise InputError(f"GMDB metadata folder not found: {metadata_dir}")
    _image_name(pattern, "1")  # a broken pattern is a config error before anything is read
    version, files = _find_gmdb_files(metadata_dir, version)
    frames, split_rows = [], []
    for set_name, path in files.items():
        df = _normalise_ids(_read_csv(path, ["image_id", "subject", "label"]), ["image_id", "subject", "label"])
        split = _split_numbers(path, df["split"]) if "split" in df.columns and (df["split"] != "").all() else -1
        split_rows.append(pd.DataFrame({"image_id": df["image_id"], "set": set_name, "split": split}))
        frames.append(df[["image_id", "subject", "label"]])
    table = _label_undiagnosed(pd.concat(frames, ignore_index=True), "label").drop_duplicates()
    clash = table[table.duplicated("image_id", keep=False)]
    if not clash.empty:
        ids = ", ".join(sorted(clash["image_id"].unique())[:5])
        raise InputError(f"{metadata_dir}: image(s) {ids} have different subject/label in different GMDB files")
    images = table.rename(columns={"subject": "subject_id", "label": "syndrome_id"})
    meta_path = metadata_dir / f"image_metadata_{version}.tsv"
    if meta_path.exists():
        images = images.merge(_read_metadata(meta_path), on="image_id", how="left")
    images = with_consent(images.sort_values("image_id", kind="stable").reset_index(drop=True), str(meta_path))

    root = Path(image_root) if image_root is not None else metadata_dir / "images"
    raw = images["image_id"].map(lambda i: _image_name(pattern, i))
    images, rejected = _resolve_paths(images, root, raw)

    syn_path = metadata_dir / f"gmdb_syndromes_{version}.tsv"
    if syn_path.exists():
        syn = _normalise_ids(_read_csv(syn_path, ["syndrome_id", "syndrome_name"], sep="\t"), ["syndrome_id"])
        syndromes = syn.rename(columns={"OMIM": "omim"})
    else:
        syndromes = _syndrome_table(images)
    lookup = _read_lookup(metadata_dir / f"lookup_table_gmdb_{version}.txt")
    splits = undiagnosed_splits(images, pd.concat(split_rows, ignore_index=True))
    return Cohort(images=images[_ordered_columns(images)], syndromes=syndromes.reset_index(drop=True), splits=splits,
                  lookup=lookup, version=version, image_root=str(root.resolve()), rejected=rejected)


def _image_name(pattern: str, image_id: str) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"pattern: {pattern!r} is not an image file name pattern with {{image_id}} ("
                          f"{type(exc).__name__}: {exc})") from None


def _read_lookup(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the lookup table: {exc}") from None
    body = "\n".join(lines[1:]) if lines and not lines[0].lstrip().startswith("[") else "\n".join(lines)
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, absurd nesting
        raise InputError(f"{path}: expected a header line and a JSON list of disorder ids: {exc}") from None
    if not isinstance(values, list):
        raise InputError(f"{path}: expected a JSON list of disorder ids")
    return [_id_str(v) for v in values]


def _syndrome_table(images: pd.DataFrame) -> pd.DataFrame:
    """``syndrome_id, syndrome_name`` (the id as name) of the diagnosed images' syndromes."""
    ids = sorted(s for s in images["syndrome_id"].unique() if s != UNDIAGNOSED)
    return pd.DataFrame({"syndrome_id": ids, "syndrome_name": ids}, columns=["syndrome_id", "syndrome_name"])


def _ordered_columns(images: pd.DataFrame) -> list[str]:
    return IMAGE_COLUMNS + [c for c in (*OPTIONAL_COLUMNS, CONSENT_COLUMN) if c in images.columns]


def load_table(csv_path: str | Path, image_root: str | Path | None = None, seed: int = 0) -> Cohort:
    """Read a plain cohort CSV (``image_id, path, subject_id, syndrome_id[, sex, age, ancestry, consent_to_publish]``).

    ``path`` is relative to ``image_root`` (default: the CSV's folder). Splits follow the GMDB protocol
    (:func:`gmdb_splits`) with ``seed``.
    """
    csv_path = Path(csv_path)
    df = _label_undiagnosed(_normalise_ids(_read_csv(csv_path, ["image_id", "path", "subject_id", "syndrome_id"]),
                                           ["image_id", "subject_id", "syndrome_id"]))
    dup = df[df["image_id"].duplicated()]["image_id"]
    if not dup.empty:
        raise InputError(f"{csv_path}: duplicate image_id(s): {', '.join(sorted(dup.unique())[:5])}")
    keep = ["image_id", "subject_id", "syndrome_id"] + [c for c in OPTIONAL_COLUMNS if c in df.columns]
    keep += [c for c in df.columns if c.strip().lower() in CONSENT_COLUMNS]
    images = with_consent(df[keep].sort_values("image_id", kind="stable").reset_index(drop=True), str(csv_path))
    raw = df.set_index("image_id").loc[images["image_id"], "path"].reset_index(drop=True)
    root = Path(image_root) if image_root is not None else csv_path.parent
    images, rejected = _resolve_paths(images, root, raw)
    syndromes = _syndrome_table(images)
    try:
        splits = gmdb_splits(images, seed=seed)
    except InputError as exc:  # say which table
        raise InputError(f"{csv_path}: {exc}") from None
    lookup = sorted(images.loc[images["image_id"].isin(splits.loc[splits["set"] == "train", "image_id"]),
                               "syndrome_id"].unique())
    return Cohort(images=images[_ordered_columns(images)], syndromes=syndromes, splits=splits, lookup=lookup or None,
                  version="custom", image_root=str(root.resolve()), rejected=rejected)


def load_cohort(source: str | Path, image_root: str | Path | None = None, version: str | None = None,
                pattern: str = "{image_id}.jpg", seed: int = 0) -> Cohort:
    """Read a cohort from a GMDB metadata folder, one of its ``gmdb_*.csv`` files, or a plain cohort CSV."""
    source = Path(source)
    if source.is_dir():
        return load_gmdb(source, image_root, version, pattern)
    if not source.is_file():
        raise InputError(f"cohort table not found: {source}")
    m = _GMDB_RE.match(source.name)
    if m:
        return load_gmdb(source.parent, image_root, version or m["version"], pattern)
    return load_table(source, image_root, seed=seed)


# ----------------------------------------------------------------------------------------- splits and writing
def frequency_class(n_subjects: int) -> str:
    """``frequent`` (> 6 subjects), ``rare`` (2–6) or ``single`` (1; in no protocol set)."""
    if n_subjects >= FREQUENT_MIN_SUBJECTS:
        return "frequent"
    if n_subjects >= RARE_MIN_SUBJECTS:
        return "rare"
    return "single"


def gmdb_splits(images: pd.DataFrame, seed: int = 0, test_fraction: float = 0.1,
                val_fraction: float = 0.1, n_rare_splits: int = N_RARE_SPLITS) -> pd.DataFrame:
    """Subject-level splits following the GMDB protocol; returns the long ``image_id, set, split`` table.

    Each frequent disorder sends ``max(1, round(test_fraction·n))`` subjects to test and as many (by
    ``val_fraction``) to val, the rest to train; ``frequent_gallery`` = train + val, ``frequent_test`` = test. Each
    rare disorder holds out one subject per split (cycling through its subjects in a seeded order) as ``rare_test``
    and keeps the others as ``rare_gallery`` of that split. Undiagnosed images (label :data:`UNDIAGNOSED`) go to
    the set ``undiagnosed`` only and take no part in the draw, so adding or removing them leaves every other
    image's split unchanged. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, int]] = []
    by_subject = images.groupby("subject_id")["image_id"].apply(sorted).to_dict()
    subj_syn = images.drop_duplicates("subject_id").set_index("subject_id")["syndrome_id"]
    bad = images.groupby("subject_id")["syndrome_id"].nunique()
    if (bad > 1).any():
        raise InputError(f"subject(s) {', '.join(bad[bad > 1].index[:5])} appear with several syndromes (an "
                         f"unlabelled photo of a diagnosed subject counts as another: label it or leave it out)")
    for syndrome in sorted(s for s in subj_syn.unique() if s != UNDIAGNOSED):
        subjects = sorted(subj_syn[subj_syn == syndrome].index)
        order = [subjects[i] for i in rng.permutation(len(subjects))]
        kind = frequency_class(len(subjects))
        if kind == "frequent":
            n_test = max(1, round(test_fraction * len(order)))
            n_val = max(1, round(val_fraction * len(order)))
            parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
            for set_name, subs in parts.items():
                gallery_set = "frequent_test" if set_name == "test" else "frequent_gallery"
                for s in subs:
                    for img in by_subject[s]:
                        rows += [(img, set_name, -1), (img, gallery_set, -1)]
        elif kind == "rare":
            for k in range(n_rare_splits):
                held_out = order[k % len(order)]
                for s in order:
                    set_name = "rare_test" if s == held_out else "rare_gallery"
                    rows += [(img, set_name, k) for img in by_subject[s]]
    return undiagnosed_splits(images, pd.DataFrame(rows, columns=SPLIT_COLUMNS))


def write_gmdb(out_dir: str | Path, images: pd.DataFrame, syndromes: pd.DataFrame, version: str,
               seed: int = 0, splits: pd.DataFrame | None = None) -> Cohort:
    """Write a cohort in GMDB format (all ``gmdb_*`` files, syndrome table, lookup table, image metadata).

    Parameters
    ----------
    images:
        ``image_id, subject_id, syndrome_id`` (+ ``sex, age, ancestry, consent_to_publish``); images are expected at
        ``<out_dir>/images/<image_id>.jpg``. Undiagnosed images (label :data:`UNDIAGNOSED`) are written to
        ``gmdb_undiagnosed_images_<version>.csv``.
    syndromes:
        ``syndrome_id, syndrome_name`` (+ ``omim``).
    version:
        Version suffix used in the file names (e.g. ``synthetic-v1``).
    splits:
        The long split table to write (default: :func:`gmdb_splits` with ``seed``); undiagnosed images are moved
        to their own set (:func:`undiagnosed_splits`).

    Returns the cohort as :func:`load_gmdb` will read it back.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _label_undiagnosed(_normalise_ids(images, ["image_id", "subject_id", "syndrome_id"]))
    images = images.sort_values("image_id", kind="stable")
    splits = gmdb_splits(images, seed=seed) if splits is None else undiagnosed_splits(images, splits)
    base = images.set_index("image_id")
    for set_name in COHORT_SETS:
        s = splits[splits["set"] == set_name]
        if set_name == UNDIAGNOSED_SET and s.empty:
            continue  # the GMDB files proper are always written; this one only when there is someone in it
        df = pd.DataFrame({"image_id": s["image_id"].to_numpy(),
                           "subject": base.loc[s["image_id"], "subject_id"].to_numpy(),
                           "label": base.loc[s["image_id"], "syndrome_id"].to_numpy()})
        if set_name.startswith("rare"):
            df["split"] = s["split"].to_numpy()
        atomic_write_text(out_dir / f"gmdb_{set_name}_images_{version}.csv", df.to_csv(index=False))
    train_syn = sorted(images.loc[images["image_id"].isin(splits.loc[splits["set"] == "train", "image_id"]),
                                  "syndrome_id"].unique())
    syn = _normalise_ids(syndromes, ["syndrome_id"]).sort_values("syndrome_id", kind="stable")
    per = images.groupby("syndrome_id")
    table = pd.DataFrame({
        "syndrome_id": syn["syndrome_id"].to_numpy(),
        "syndrome_name": syn["syndrome_name"].to_numpy(),
        "image_ids": [json.dumps(sorted(per.get_group(s)["image_id"])) if s in per.groups else "[]"
                      for s in syn["syndrome_id"]],
        "subject_ids": [json.dumps(sorted(per.get_group(s)["subject_id"].unique())) if s in per.groups else "[]"
                        for s in syn["syndrome_id"]],
        "num_of_images": [int(per.get_group(s).shape[0]) if s in per.groups else 0 for s in syn["syndrome_id"]],
        "num_of_subjects": [int(per.get_group(s)["subject_id"].nunique()) if s in per.groups else 0
                            for s in syn["syndrome_id"]],
        "train": [s in train_syn for s in syn["syndrome_id"]],
        "OMIM": syn["omim"].to_numpy() if "omim" in syn.columns else "",
    })
    atomic_write_text(out_dir / f"gmdb_syndromes_{version}.tsv", table.to_csv(index=False, sep="\t"))
    atomic_write_text(out_dir / f"lookup_table_gmdb_{version}.txt",
                      "class index -> disorder id\n" + json.dumps(train_syn) + "\n")
    meta_cols = [c for c in (*OPTIONAL_COLUMNS, CONSENT_COLUMN) if c in images.columns]
    if meta_cols:
        atomic_write_text(out_dir / f"image_metadata_{version}.tsv",
                          images[["image_id", *meta_cols]].to_csv(index=False, sep="\t"))
    return load_gmdb(out_dir, out_dir / "images", version)


# --------------------------------------------------------------------------------------------- run persistence
#: the files :func:`save_run_cohort` writes into ``<run>/cohort/``
COHORT_FILES = ("images.parquet", "syndromes.parquet", "splits.parquet", "cohort.json")


def save_run_cohort(run: Run, cohort: Cohort) -> None:
    """Store the resolved cohort in ``<run>/cohort/`` (Parquet tables + ``cohort.json``) for later stages.

    Image paths and the image root are stored relative to the run folder when they lie inside it, so a run folder
    can be moved or shared; photos elsewhere keep their absolute paths. A cohort built in code follows the readers'
    rule too: images without a syndrome are stored as undiagnosed, in their own split set (:func:`undiagnosed_splits`).
    """
    d = run.dir("cohort")
    images = cohort.images.assign(path=[run.relative(p) for p in cohort.images["path"]])
    splits = cohort.splits
    if any(is_undiagnosed(v) for v in images["syndrome_id"]):
        images = _label_undiagnosed(images)
        splits = undiagnosed_splits(images, splits)
    write_parquet(images, d / "images.parquet")
    syndromes = cohort.syndromes.loc[np.array([not is_undiagnosed(v) for v in cohort.syndromes["syndrome_id"]],
                                              dtype=bool)]
    write_parquet(syndromes.astype({"syndrome_id": str}), d / "syndromes.parquet")
    write_parquet(splits, d / "splits.parquet")
    root = run.relative(cohort.image_root) if cohort.image_root else ""
    info = {"version": cohort.version, "image_root": root, "lookup": cohort.lookup}
    atomic_write_text(d / "cohort.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_run_cohort(run: Run) -> Cohort:
    """Read the cohort stored by the align stage in ``<run>/cohort/`` (string ids, absolute image paths)."""
    d = run.path / "cohort"
    if not (d / "images.parquet").exists():
        raise InputError(f"{d / 'images.parquet'} not found: run the align stage with --cohort first")
    info = json.loads((d / "cohort.json").read_text(encoding="utf-8"))
    images = _normalise_ids(pd.read_parquet(d / "images.parquet"), ["image_id", "subject_id", "syndrome_id"])
    images = with_consent(images.assign(path=[str(run.resolve(p)) for p in images["path"]]))  # False if absent
    splits = pd.read_parquet(d / "splits.parquet")
    if len(splits):
        splits = splits.assign(image_id=splits["image_id"].astype(str))
    root = info.get("image_root", "")
    return Cohort(images=images, syndromes=pd.read_parquet(d / "syndromes.parquet").astype({"syndrome_id": str}),
                  splits=splits, lookup=info.get("lookup"), version=info.get("version", "custom"),
                  image_root=str(run.resolve(root)) if root else "")
