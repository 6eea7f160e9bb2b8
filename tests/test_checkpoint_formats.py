"""Contract of every registered checkpoint format (``CHECKPOINT_FORMATS``), with no per-format code here.

Each format writes a tiny model as the tools that make such files do (``write_example``); the file must be detected
and loaded as that format, give the source model's embeddings (and logits, where the format keeps the classifier),
load the same way twice, and record its provenance. Format-specific cases are in ``tests/test_checkpoints.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from model_helpers import randomise_model

from gestalt_xai.errors import CheckpointError
from gestalt_xai.models import build_gestaltmatcher
from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS, CheckpointFormat, detect_format, load_model
from gestalt_xai.models.gestaltmatcher import GestaltMatcher

TOL = 1e-5


@pytest.fixture(scope="module")
def source() -> tuple[GestaltMatcher, torch.Tensor]:
    """A small r18 with non-trivial BatchNorm statistics (so a misplaced BN tensor shows) and a 3-class head."""
    torch.manual_seed(0)
    model = build_gestaltmatcher("r18", width=0.25, num_classes=3, syndrome_ids=["a", "b", "c"])
    randomise_model(model, seed=1)
    return model, torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=list(CHECKPOINT_FORMATS))
def example(request: pytest.FixtureRequest, source, tmp_path_factory) -> tuple[CheckpointFormat, Path]:
    fmt = CHECKPOINT_FORMATS[request.param]
    try:
        path = fmt.write_example(source[0], tmp_path_factory.mktemp(fmt.name))
    except ModuleNotFoundError as exc:  # a writer may need a development tool (onnx2torch)
        pytest.skip(f"{fmt.name}: cannot write an example without {exc.name}")
    return fmt, path


def _load(fmt: CheckpointFormat, path: Path, **kwargs) -> GestaltMatcher:
    return load_model(path, trust_pickle=fmt.needs_trust_pickle, **kwargs)


def _outputs(model: GestaltMatcher, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    with torch.inference_mode():
        return model.eval()(x)


def test_detected_and_loaded_as_itself(example) -> None:
    fmt, path = example
    assert detect_format(path) in CHECKPOINT_FORMATS
    assert _load(fmt, path).config["source"]["format"] == fmt.name  # detected by name, bytes or contents
    assert _load(fmt, path, format=fmt.name).config["source"]["format"] == fmt.name


def test_same_outputs_as_the_source_model(example, source) -> None:
    fmt, path = example
    model, x = source
    ref_logits, ref_emb = _outputs(model, x)
    loaded = _load(fmt, path)
    logits, emb = _outputs(loaded, x)
    assert torch.isfinite(emb).all() and all(torch.isfinite(t).all() for t in loaded.state_dict().values())
    assert (emb - ref_emb).abs().max() <= TOL * ref_emb.abs().max()
    if fmt.stores_classifier:
        assert logits is not None and loaded.num_classes == model.num_classes
        assert torch.isfinite(logits).all()
        assert (logits - ref_logits).abs().max() <= TOL * ref_logits.abs().max()
    else:
        assert logits is None and loaded.classifier is None


def test_loading_is_deterministic(example, source) -> None:
    fmt, path = example
    a, b = _load(fmt, path), _load(fmt, path)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config == b.config
    for ta, tb in zip(_outputs(a, source[1]), _outputs(b, source[1]), strict=True):
        assert (ta is None and tb is None) or torch.equal(ta, tb)


def test_provenance_recorded(example) -> None:
    fmt, path = example
    src = _load(fmt, path).config["source"]
    assert src["format"] == fmt.name and src["path"] == str(path)
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ("pickle_placeholders" in src) == fmt.needs_trust_pickle


def test_pickles_need_trust(example) -> None:
    fmt, path = example
    if fmt.needs_trust_pickle:
        with pytest.raises(CheckpointError, match="trust_pickle=True"):
            load_model(path)
    else:
        assert load_model(path).config["source"]["format"] == fmt.name
