"""Fuzz every reader of user files with seeded mutations of real and synthetic inputs, and count the outcomes.

Seeds: the real example photos (insightface ``t1``, Tom Hanks, scikit-image's astronaut) and a few rendered synthetic
faces (:mod:`gestalt_xai.data.synthetic`), re-encoded in every supported format and mode; a plain cohort CSV and a
GMDB metadata folder (:func:`~gestalt_xai.data.cohort.write_gmdb`); a GM-Arc ``face_coords.csv`` landmark table; the
repository's pipeline files and stage options; and a tiny model written in every registered checkpoint format
(``write_example``). Each case mutates one seed — bytes (bit flips, overwritten header bytes, insertions, deletions,
truncation, splices), text (dropped, repeated or swapped lines and cells, hostile cells) or, for photos, the picture
itself (tiny, thin or odd sizes, modes, EXIF orientation) — and hands it to the reader:
:func:`~gestalt_xai.data.images.load_image`, :func:`~gestalt_xai.data.cohort.load_table`,
:func:`~gestalt_xai.data.cohort.load_gmdb`, :func:`~gestalt_xai.faces.stage.read_landmark_table`,
:func:`~gestalt_xai.config.load_pipeline` + :func:`~gestalt_xai.study.plan_study`, a stage's option validation,
:func:`~gestalt_xai.models.checkpoints.detect_format` + :func:`~gestalt_xai.models.checkpoints.load_model`. A small
sample of the photos the loader accepts also goes through the align stage (face detection, the orientation probe,
alignment).

Every outcome must be a result or a :class:`~gestalt_xai.errors.GestaltXAIError`. The script prints counts by input
kind and outcome (``ok``, the error class, or ``OTHER <type>``) and the run time, shows the first case of each
other exception (rerun it alone with ``--case I``; ``--keep DIR`` saves its input), and exits with status 1 when
any exception outside the hierarchy occurred.

Usage: python scripts/fuzz.py --n 10000 [--seed 0] [--detect 40] [--keep fuzz-failures/]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout this script belongs to, before any installed copy
os.environ.setdefault("GESTALT_XAI_QUIET", "1")  # no progress bars
KINDS = {"photo": 0.40, "cohort_csv": 0.09, "gmdb": 0.09, "landmarks": 0.08, "pipeline": 0.10, "options": 0.06,
         "checkpoint": 0.18}
#: cells that break naive table readers
HOSTILE = ["", " ", "nan", "NaN", "None", "1e309", "-1", "0x1F", "../../etc/passwd", "/abs/path.jpg", "a/b", "..",
           "\x00", "é", "🙂", '"', '""', "'", ",", "\t", "\r", "{image_id}", "{}", "[1, 2", "{a: 1}", "&anchor",
           "*alias", "!!python/object:os.system", "- -", ": :", "99999999999999999999999999", "1.5", "true", "~"]


# ----------------------------------------------------------------------------------------------------- seeds
@dataclass
class Corpus:
    """The valid inputs every case starts from."""

    photos: list[tuple[str, bytes]] = field(default_factory=list)  # (suffix, encoded bytes)
    pictures: list[np.ndarray] = field(default_factory=list)  # decoded RGB, for structural photo mutations
    cohort_csv: str = ""
    gmdb: dict[str, bytes] = field(default_factory=dict)  # file name → bytes
    landmarks: str = ""
    pipelines: list[str] = field(default_factory=list)
    options: list[tuple[str, str]] = field(default_factory=list)  # (stage name, YAML text)
    checkpoints: list[tuple[str, dict[str, bytes], str]] = field(default_factory=list)  # (format, files, main file)


def _encode(rgb: np.ndarray, fmt: str, mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


FORMATS = [("JPEG", ".jpg", ("RGB", "L", "CMYK")), ("PNG", ".png", ("RGB", "L", "LA", "P", "RGBA", "I;16")),
           ("GIF", ".gif", ("P",)), ("BMP", ".bmp", ("RGB", "L")), ("TIFF", ".tif", ("RGB", "CMYK", "I;16")),
           ("WEBP", ".webp", ("RGB", "RGBA"))]


def build_corpus(work: Path) -> Corpus:
    """Encode the example photos and synthetic faces, and write the seed tables, configs and checkpoints."""
    import torch

    from gestalt_xai.data.cohort import write_gmdb
    from gestalt_xai.data.examples import example_photo_paths
    from gestalt_xai.data.images import load_image
    from gestalt_xai.data.synthetic.identity import sample_identity, sample_photo
    from gestalt_xai.data.synthetic.renderer import render_photo
    from gestalt_xai.models import build_gestaltmatcher
    from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS
    from gestalt_xai.stages import load_stages

    corpus = Corpus()
    for path in example_photo_paths().values():
        corpus.photos.append((path.suffix.lower(), path.read_bytes()))
        corpus.pictures.append(load_image(path))
    rng = np.random.default_rng(0)
    for _ in range(3):
        out = render_photo(*sample_identity(rng), sample_photo(rng))
        corpus.photos.append((".jpg", out.jpeg))
        corpus.pictures.append(out.rgb)
    small = corpus.pictures[-1][::4, ::4].copy()
    for fmt, suffix, modes in FORMATS:
        for mode in modes:
            corpus.photos.append((suffix, _encode(small, fmt, mode)))
    corpus.photos.append((".jpg", _encode(small, "JPEG", exif_orientation=6)))

    names = [f"img{i:03d}" for i in range(24)]
    table = pd.DataFrame({"image_id": names, "path": [f"{n}.jpg" for n in names],
                          "subject_id": [f"s{i // 2}" for i in range(24)],
                          "syndrome_id": [f"S{i // 2 % 3}" for i in range(24)], "sex": "F", "age": "3.5"})
    corpus.cohort_csv = table.to_csv(index=False)
    gmdb_dir = work / "gmdb_seed"
    write_gmdb(gmdb_dir, table.drop(columns=["path"]),
               pd.DataFrame({"syndrome_id": ["S0", "S1", "S2"], "syndrome_name": ["a", "b", "c"]}), "v1")
    corpus.gmdb = {p.name: p.read_bytes() for p in sorted(gmdb_dir.iterdir()) if p.is_file()}

    lm = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    rows = []
    for i, name in enumerate(names[:6]):
        pts = lm * (1 + i / 10) + i
        row = {"img": f"{name}.jpg", "bbox_x1": 0, "bbox_y1": 0, "bbox_x2": 200, "bbox_y2": 200}
        row.update({f"kp{k + 1}_{a}": round(pts[k, j], 2) for k in range(5) for j, a in enumerate("xy")})
        rows.append(row)
    corpus.landmarks = pd.DataFrame(rows).to_csv(index=False)

    corpus.pipelines = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "pipelines").glob("*.yaml"))]
    corpus.pipelines.append("name: tiny\nstages:\n  - align: {images: photos}\n  - explain: {methods: [gradcam]}\n")
    import yaml

    for name, spec in load_stages().items():
        corpus.options.append((name, yaml.safe_dump(dict(spec.tiny_options or {"seed": 1}), allow_unicode=True)))

    sys.path.insert(0, str(ROOT / "tests"))
    from model_helpers import randomise_model  # non-trivial BatchNorm, so ONNX export keeps every layer

    torch.manual_seed(0)
    model = randomise_model(build_gestaltmatcher("r18", width=0.0625, num_classes=3, syndrome_ids=["a", "b", "c"]))
    for fmt in CHECKPOINT_FORMATS.values():
        folder = work / "checkpoints" / fmt.name
        folder.mkdir(parents=True)
        try:
            main = fmt.write_example(model, folder)
        except ModuleNotFoundError as exc:  # a writer may need a development tool (onnx2torch)
            logging.getLogger("fuzz").warning("no %s seed: %s", fmt.name, exc)
            continue
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix != ".onnx"
                 or p == main}
        corpus.checkpoints.append((fmt.name, files, main.name))
    return corpus


# ------------------------------------------------------------------------------------------------- mutations
def mutate_bytes(rng: np.random.Generator, data: bytes, donors: list[bytes] = (), head_bias: float = 0.5) -> bytes:
    """One to five byte edits; ``head_bias`` of them land in the first 512 bytes (headers, magic numbers)."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        if not buf:
            buf += rng.bytes(int(rng.integers(1, 16)))
            continue
        limit = min(len(buf), 512) if rng.random() < head_bias else len(buf)
        at = int(rng.integers(0, limit))
        op = rng.choice(["flip", "set", "interesting", "insert", "delete", "truncate", "repeat", "splice"])
        if op == "flip":
            buf[at] ^= 1 << int(rng.integers(0, 8))
        elif op == "set":
            buf[at] = int(rng.integers(0, 256))
        elif op == "interesting":  # values that break length and size fields
            value = rng.choice([b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"])
            buf[at: at + len(value)] = value
        elif op == "insert":
            buf[at:at] = rng.bytes(int(rng.integers(1, 32)))
        elif op == "delete":
            del buf[at: at + int(rng.integers(1, 64))]
        elif op == "truncate":
            del buf[at:]
        elif op == "repeat":
            chunk = bytes(buf[at: at + int(rng.integers(1, 256))])
            buf[at:at] = chunk * int(rng.integers(1, 4))
        elif donors:  # splice: a piece of another seed
            donor = donors[int(rng.integers(0, len(donors)))]
            start = int(rng.integers(0, max(1, len(donor))))
            buf[at: at + 64] = donor[start: start + 64]
    return bytes(buf)


def mutate_text(rng: np.random.Generator, text: str) -> str:
    """Line and cell edits of a CSV/TSV/YAML text: drop, repeat or swap lines; replace, add or drop cells."""
    lines = text.splitlines()
    for _ in range(int(rng.integers(1, 4))):
        if not lines:
            lines = [str(rng.choice(HOSTILE))]
        i = int(rng.integers(0, len(lines)))
        op = rng.choice(["drop", "repeat", "swap", "cell", "add_cell", "drop_cell", "hostile_line", "indent"])
        sep = "\t" if "\t" in lines[i] else ","
        cells = lines[i].split(sep)
        if op == "drop":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = int(rng.integers(0, len(lines)))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "cell":
            cells[int(rng.integers(0, len(cells)))] = str(rng.choice(HOSTILE))
            lines[i] = sep.join(cells)
        elif op == "add_cell":
            cells.insert(int(rng.integers(0, len(cells) + 1)), str(rng.choice(HOSTILE)))
            lines[i] = sep.join(cells)
        elif op == "drop_cell" and len(cells) > 1:
            del cells[int(rng.integers(0, len(cells)))]
            lines[i] = sep.join(cells)
        elif op == "hostile_line":
            lines.insert(i, str(rng.choice(HOSTILE)) + str(rng.choice(["", ":", ": x", ",", "\t"])))
        else:
            lines[i] = " " * int(rng.integers(1, 5)) + lines[i]
    return "\n".join(lines) + ("\n" if rng.random() < 0.8 else "")


def mutate_picture(rng: np.random.Generator, rgb: np.ndarray) -> tuple[str, bytes]:
    """The picture itself changed — cropped to a tiny, thin or odd size, resized, turned — then encoded in a random
    format and mode."""
    import cv2

    h, w = rgb.shape[:2]
    op = rng.choice(["tiny", "thin", "crop", "resize", "turn", "same"])
    if op == "tiny":
        s = int(rng.integers(1, 25))
        rgb = cv2.resize(rgb, (s, max(1, s + int(rng.integers(-2, 3)))), interpolation=cv2.INTER_AREA)
    elif op == "thin":
        rgb = rgb[: int(rng.integers(1, 4))] if rng.random() < 0.5 else rgb[:, : int(rng.integers(1, 4))]
    elif op == "crop":
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        rgb = rgb[y0: y0 + int(rng.integers(1, h)), x0: x0 + int(rng.integers(1, w))]
    elif op == "resize":
        f = float(rng.uniform(0.05, 1.5))
        rgb = cv2.resize(rgb, (max(1, int(w * f)), max(1, int(h * f * rng.uniform(0.5, 2)))))
    elif op == "turn":
        rgb = np.rot90(rgb, int(rng.integers(1, 4)))
    fmt, suffix, modes = FORMATS[int(rng.integers(0, len(FORMATS)))]
    mode = str(rng.choice(modes))
    exif = int(rng.integers(0, 10)) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and rng.random() < 0.2 else None
    return suffix, _encode(np.ascontiguousarray(rgb), fmt, mode, exif)


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One fuzz case: what it is, where its input lies, and the call that reads it."""

    kind: str
    path: Path
    read: Callable[[], object]
    photo: bool = False


def write_mutated_text(rng: np.random.Generator, path: Path, text: str, head_bias: float = 0.5) -> Path:
    """Write ``text`` with text edits, and in 30 % of cases byte edits on top, to ``path``."""
    data = mutate_text(rng, text).encode()
    path.write_bytes(mutate_bytes(rng, data, head_bias=head_bias) if rng.random() < 0.3 else data)
    return path


def make_case(i: int, seed: int, corpus: Corpus, folder: Path) -> Case:
    """Case ``i``: one mutated input written under ``folder`` and the reader call for it (deterministic in
    ``seed`` and ``i``)."""
    from gestalt_xai.config import load_pipeline, load_yaml
    from gestalt_xai.data.cohort import load_cohort, load_gmdb, load_table
    from gestalt_xai.data.images import load_image
    from gestalt_xai.faces.stage import read_landmark_table
    from gestalt_xai.models.checkpoints import detect_format, load_model
    from gestalt_xai.stages import get_stage
    from gestalt_xai.study import plan_study

    rng = np.random.default_rng([seed, i])
    kind = str(rng.choice(list(KINDS), p=np.array(list(KINDS.values())) / sum(KINDS.values())))
    folder.mkdir(parents=True)
    if kind == "photo":
        if rng.random() < 0.3:
            suffix, data = mutate_picture(rng, corpus.pictures[int(rng.integers(0, len(corpus.pictures)))])
            if rng.random() < 0.3:
                data = mutate_bytes(rng, data)
        else:
            # half the cases start from a full photo with a face (3 real, 3 synthetic), half from any seed
            full = len(corpus.pictures) if rng.random() < 0.5 else len(corpus.photos)
            suffix, data = corpus.photos[int(rng.integers(0, full))]
            data = mutate_bytes(rng, data, [d for _, d in corpus.photos[:3]])
        path = folder / f"photo{suffix if rng.random() < 0.9 else rng.choice(['.png', '.jpg', '.gif'])}"
        path.write_bytes(data)
        return Case(kind, path, lambda: load_image(path), photo=True)
    if kind == "cohort_csv":
        path = write_mutated_text(rng, folder / "cohort.csv", corpus.cohort_csv)
        return Case(kind, path, lambda: load_table(path))
    if kind == "gmdb":
        for name, data in corpus.gmdb.items():
            (folder / name).write_bytes(data)
        for _ in range(int(rng.integers(1, 3))):
            name = str(rng.choice(sorted(corpus.gmdb)))
            data = (folder / name).read_bytes()
            if rng.random() < 0.7:
                data = mutate_text(rng, data.decode("utf-8", errors="surrogateescape")).encode(
                    "utf-8", errors="surrogateescape")
            else:
                data = mutate_bytes(rng, data)
            (folder / name).write_bytes(data)
        if rng.random() < 0.1:
            (folder / str(rng.choice(sorted(corpus.gmdb)))).unlink()
        table = folder / "gmdb_train_images_v1.csv"
        if rng.random() < 0.3 and table.exists():
            return Case(kind, folder, lambda: load_cohort(table))
        return Case(kind, folder, lambda: load_gmdb(folder))
    if kind == "landmarks":
        path = write_mutated_text(rng, folder / "face_coords.csv", corpus.landmarks)
        return Case(kind, path, lambda: read_landmark_table(path))
    if kind == "pipeline":
        seed_text = corpus.pipelines[int(rng.integers(0, len(corpus.pipelines)))]
        path = write_mutated_text(rng, folder / "study.yaml", seed_text, head_bias=0.1)
        return Case(kind, path, lambda: plan_study(load_pipeline(path), where=str(path)))
    if kind == "options":
        name, text = corpus.options[int(rng.integers(0, len(corpus.options)))]
        path = folder / f"{name}.yaml"
        path.write_text(mutate_text(rng, text), encoding="utf-8")
        return Case(kind, path, lambda: get_stage(name).validate(load_yaml(path), where=str(path)))
    fmt, files, main = corpus.checkpoints[int(rng.integers(0, len(corpus.checkpoints)))]
    for name, data in files.items():
        (folder / name).write_bytes(data)
    target = main if len(files) == 1 or rng.random() < 0.7 else str(rng.choice(sorted(files)))
    data = files[target]
    if rng.random() < 0.15:  # the end of a zip (torch.save) holds its central directory
        cut = max(0, len(data) - 4096)
        data = data[:cut] + mutate_bytes(rng, data[cut:], head_bias=0.0)
    else:
        data = mutate_bytes(rng, data, head_bias=0.7)
    (folder / target).write_bytes(data)
    path = folder / main

    def read() -> object:
        detect_format(path)
        return load_model(path, trust_pickle=True)

    return Case(f"checkpoint:{fmt}", path, read)


# ----------------------------------------------------------------------------------------------------- running
def outcome(exc: BaseException | None) -> str:
    """``ok``, the error class of the hierarchy, or ``OTHER <type>``."""
    from gestalt_xai.errors import GestaltXAIError

    if exc is None:
        return "ok"
    if isinstance(exc, GestaltXAIError):
        return type(exc).__name__
    return f"OTHER {type(exc).__name__}"


def detect_sample(photos: list[Path], work: Path) -> Counter:
    """Run the align stage (MTCNN, orientation probe, two-pass off) on ``photos``; count its rows by outcome."""
    from gestalt_xai import errors
    from gestalt_xai.faces.stage import AlignConfig, align_stage
    from gestalt_xai.runs import Run

    folder = work / "detect"
    folder.mkdir()
    for k, p in enumerate(photos):
        shutil.copy(p, folder / f"p{k:04d}{p.suffix}")
    align_stage(Run(work / "detect_run"), AlignConfig(images=str(folder)))
    table = pd.read_parquet(work / "detect_run" / "aligned" / "alignment.parquet")
    for r in table.itertuples():
        logging.getLogger("fuzz").info("align %s: %s×%s %s", r.image_id, r.photo_width, r.photo_height,
                                       "ok" if r.ok else r.message)
    names = {cls.kind: cls.__name__ for cls in (errors.GestaltXAIError, errors.InputError, errors.DetectionError,
                                                 errors.ConfigError, errors.CheckpointError)}
    return Counter("ok" if r.ok else names.get(r.error_kind, f"OTHER {r.error_kind}") for r in table.itertuples())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="number of cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detect", type=int, default=40, help="photos the loader accepts that also go through the "
                                                           "align stage (face detection): a seeded uniform sample")
    ap.add_argument("--case", type=int, default=None, help="run only case I (to reproduce a failure)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the align stage's row for each sampled photo")
    ap.add_argument("--keep", type=Path, default=None, help="save the inputs of cases outside the hierarchy here")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("PIL").setLevel(logging.CRITICAL)  # decoders log the damage they survive
    if args.verbose:
        logging.getLogger("fuzz").setLevel(logging.INFO)
    warnings.simplefilter("ignore")  # decoders warn about the damage they survive; the outcome is what counts
    t0 = time.perf_counter()
    counts: dict[str, Counter] = defaultdict(Counter)
    first: dict[str, str] = {}
    unnamed: Counter = Counter()
    first_unnamed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gestalt-xai-fuzz-") as tmp:
        work = Path(tmp)
        corpus = build_corpus(work)
        t_seed = time.perf_counter() - t0
        indices = [args.case] if args.case is not None else list(range(args.n))
        sample: list[Path] = []  # a uniform, seeded sample of the accepted photos (reservoir sampling)
        n_accepted, pick = 0, np.random.default_rng([args.seed, 2**31])
        for i in indices:
            folder = work / "cases" / str(i)
            case = make_case(i, args.seed, corpus, folder)
            exc = None
            try:
                case.read()
            except Exception as err:  # noqa: BLE001 - what the fuzzer counts
                exc = err
            result = outcome(exc)
            counts[case.kind][result] += 1
            if exc is not None and not result.startswith("OTHER") and str(folder) not in str(exc):
                unnamed[case.kind] += 1  # an error of the hierarchy whose message does not name the input
                first_unnamed.setdefault(case.kind, f"case {i}: {type(exc).__name__}: {exc}")
            if result.startswith("OTHER"):
                key = f"{case.kind}: {result}"
                if key not in first:
                    first[key] = f"case {i}\n" + "".join(traceback.format_exception(exc)[-6:])
                if args.keep:
                    target = args.keep / f"case{i}_{case.kind.replace(':', '-')}"
                    shutil.copytree(folder, target, dirs_exist_ok=True)
            if case.photo and result == "ok" and args.detect:
                n_accepted += 1
                slot = len(sample) if len(sample) < args.detect else int(pick.integers(0, n_accepted))
                if slot < args.detect:
                    kept = work / "sample" / f"{i}{case.path.suffix}"
                    kept.parent.mkdir(exist_ok=True)
                    shutil.copy(case.path, kept)
                    if slot < len(sample):
                        sample[slot].unlink()
                        sample[slot] = kept
                    else:
                        sample.append(kept)
            shutil.rmtree(folder)
        t_read = time.perf_counter() - t0 - t_seed
        if sample:
            counts["photo → align stage"] = detect_sample(sample, work)
    elapsed = time.perf_counter() - t0

    columns = sorted({o for c in counts.values() for o in c}, key=lambda o: (o != "ok", o.startswith("OTHER"), o))
    width = max(len(k) for k in counts) + 2
    print(f"{len(indices)} cases, seed {args.seed}: {elapsed:.0f} s (seeds {t_seed:.0f} s, readers {t_read:.0f} s, "
          f"align stage on {len(sample)} photos {elapsed - t_seed - t_read:.0f} s)\n")
    print("kind".ljust(width) + "".join(c.rjust(max(8, len(c) + 2)) for c in columns))
    for kind in sorted(counts):
        print(kind.ljust(width) + "".join(str(counts[kind].get(c, 0)).rjust(max(8, len(c) + 2)) for c in columns))
    total = Counter()
    for c in counts.values():
        total.update(c)
    print("total".ljust(width) + "".join(str(total.get(c, 0)).rjust(max(8, len(c) + 2)) for c in columns))
    others = sum(v for k, v in total.items() if k.startswith("OTHER"))
    print(f"\nerrors of the hierarchy whose message does not name the input: {sum(unnamed.values())}")
    for kind, text in sorted(first_unnamed.items()):
        print(f"  {kind} ({unnamed[kind]}), first: {text[:300]}")
    print(f"\nexceptions outside the GestaltXAIError hierarchy: {others}")
    for key, text in first.items():
        print(f"\n--- first {key} ---\n{text}")
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main())
