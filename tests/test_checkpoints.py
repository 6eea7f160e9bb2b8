"""Checkpoint formats: our own, insightface .pth, GM-Arc .pt (onnx2torch keys), ONNX, GM-Arc whole-module pickles.

The GM-Arc layouts are produced with the real tools, not hand-built key lists: our iResNet is exported with
``torch.onnx.export(dynamo=False)`` in eval mode (BN folded into the convs as insightface's export did), converted
with the real ``onnx2torch`` and wrapped the way GM-Arc's ``MyArcFace`` splits ``base`` / ``features`` /
``classifier`` (:class:`gestalt_xai.models.checkpoints.gmarc_pt.GMArcWrapper`).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gestalt_xai.errors import CheckpointError, ConfigError
from gestalt_xai.models import build_gestaltmatcher
from gestalt_xai.models.checkpoints import (
    check_classes,
    detect_format,
    load_model,
    model_sha256,
    read_lookup_table,
    save_model,
)
from gestalt_xai.models.checkpoints.gmarc_pt import GMArcWrapper
from gestalt_xai.models.checkpoints.onnx_graph import export_onnx
from gestalt_xai.models.gestaltmatcher import GestaltMatcher
from gestalt_xai.models.iresnet import build_iresnet

onnx = pytest.importorskip("onnx")
onnx2torch = pytest.importorskip("onnx2torch")

RTOL = 1e-4
#: the r50 round trips run at half width to fit the test budget on 2 cores; depth (24 blocks, so
#: ``features.BatchNormalization_25``) and every layout question are the same as at full width.
R50_WIDTH = 0.5


def calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a random-init model realistic BN statistics/affines and PReLU slopes (sane activation scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.momentum = None  # cumulative average over the calibration pass
                m.reset_running_stats()
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
        model.train()
        model(torch.randn(4, 3, 112, 112, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.momentum = 0.1
    return model.eval()


def assert_rel_close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, rtol: float = RTOL) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} × max |ref| {scale:.3g}"


def onnx2torch_141_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """onnx2torch 1.4.1 (GM-Arc's pin) names every module ``{Op}_{k}`` from k = 0; 1.5 leaves the first ``{Op}``.

    (1.4.1's ``OnnxGraph``: ``unique_names.append(f'{name}_{name_counter}')``; 1.5.15: ``_{n}`` only for n > 0.)
    """
    return {re.sub(r"(^|\.)([A-Za-z]+)\.(?=[a-z_]+$)", r"\1\2_0.", k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def r50(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One random iResNet-50 (``R50_WIDTH``), its ONNX export, the onnx2torch/GM-Arc wrapper and reference outputs."""
    torch.manual_seed(50)
    tmp = tmp_path_factory.mktemp("r50")
    backbone = calibrate(build_iresnet("r50", width=R50_WIDTH))
    onnx_path = export_onnx(backbone, tmp / "glint360k_r50.onnx")
    torch.manual_seed(1)
    wrapper = GMArcWrapper(onnx_path, nn.Sequential(nn.Dropout(), nn.Linear(512, 7))).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        ref = backbone(x)
        logits, rep = wrapper(x)
    return {
        "backbone": backbone,
        "onnx": onnx_path,
        "wrapper": wrapper,
        "x": x,
        "ref": ref,
        "logits": logits,
        "rep": rep,
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A small r18 (width 0.25) with classifier: its ONNX export and GM-Arc-style wrapper."""
    torch.manual_seed(18)
    tmp = tmp_path_factory.mktemp("r18")
    model = build_gestaltmatcher("r18", width=0.25, num_classes=5, syndrome_ids=list("abcde"))
    calibrate(model.backbone)
    model.eval()
    onnx_path = export_onnx(model.backbone, tmp / "r18.onnx")
    wrapper = GMArcWrapper(onnx_path, nn.Sequential(nn.Dropout(), nn.Linear(512, 5))).eval()
    x = torch.randn(2, 3, 112, 112)
    return {"model": model, "onnx": onnx_path, "wrapper": wrapper, "x": x, "tmp": tmp}


def _embed(model: GestaltMatcher, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    with torch.inference_mode():
        return model.eval()(x)


# --------------------------------------------------------------------------------------------------- r50 / GM-Arc
def test_onnx2torch_counters_match_gmarc(r50: dict) -> None:
    """Real onnx2torch output of an r50 export: the features BN is BatchNormalization_25 (GM-Arc's magic value)."""
    wrapper = r50["wrapper"]
    names = dict(wrapper.features.named_children())
    assert set(names) == {"Gemm", "BatchNormalization_25"}
    keys = wrapper.state_dict().keys()
    assert "base.Conv.weight" in keys and "base.BatchNormalization_24.running_var" in keys
    assert "base.initializers.onnx_initializer_24" in keys and "base.initializers.onnx_initializer_25" not in keys
    assert_rel_close(r50["rep"], r50["ref"])  # the wrapper itself reproduces our backbone


def test_onnx_backbone_loads(r50: dict) -> None:
    model = load_model(r50["onnx"])
    assert model.classifier is None and model.arch == "r50" and model.backbone.fused
    assert model.config["source"]["format"] == "onnx" and model.channel_order == "RGB"
    logits, emb = _embed(model, r50["x"])
    assert logits is None
    assert_rel_close(emb, r50["ref"])


@pytest.mark.parametrize("naming", ["onnx2torch-1.5", "onnx2torch-1.4.1"])
def test_gmarc_epoch_state_dict_loads(r50: dict, naming: str) -> None:
    state = r50["wrapper"].state_dict()
    if naming == "onnx2torch-1.4.1":
        state = onnx2torch_141_names(state)
        assert "features.Gemm_0.weight" in state and "features.BatchNormalization_25.weight" in state
        assert "base.Conv_0.weight" in state and "classifier.1.weight" in state
    path = r50["tmp"] / f"s1_glint360k_r50_512d_gmdb_{naming}_e3.pt"
    torch.save(state, path)
    model = load_model(path, arch="r50")
    assert model.config["source"]["format"] == "gm-arc-pt" and model.num_classes == 7
    logits, emb = _embed(model, r50["x"])
    assert_rel_close(emb, r50["ref"])
    assert_rel_close(logits, r50["logits"])


def test_gmarc_pt_wrong_arch_is_named(r50: dict) -> None:
    path = r50["tmp"] / "e1.pt"
    torch.save(r50["wrapper"].state_dict(), path)
    with pytest.raises(CheckpointError, match=r"asked for r100 but the file holds r50"):
        load_model(path, arch="r100")


# --------------------------------------------------------------------------------------------------- pickles
class _Tripwire:
    """Unpickling this would create a file (stands in for arbitrary code in a malicious pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def test_whole_module_pickle_refused_without_opt_in(small: dict) -> None:
    path = small["tmp"] / "s1_r18_last_model.pth"
    torch.save(small["wrapper"], path)
    with pytest.raises(CheckpointError, match=r"(?s)pickled module.*execute.*trust_pickle=True.*trust_pickle: true"):
        load_model(path)


def test_whole_module_pickle_restricted_load(small: dict, tmp_path: Path) -> None:
    wrapper = small["wrapper"]
    wrapper.tripwire = _Tripwire(tmp_path / "pwned")  # an attribute whose unpickling would run code
    path = tmp_path / "s2_r18_last_model.pth"
    torch.save(wrapper, path)
    del wrapper.tripwire
    model = load_model(path, trust_pickle=True)
    assert not (tmp_path / "pwned").exists(), "the restricted unpickler executed code from the file"
    placeholders = model.config["source"]["pickle_placeholders"]
    assert any(p.endswith(".GMArcWrapper") for p in placeholders) and "pathlib.Path" in placeholders
    assert model.config["source"]["format"] == "gm-arc-pickle"
    with torch.inference_mode():
        ref_logits, ref = wrapper(small["x"])
    logits, emb = _embed(model, small["x"])
    assert_rel_close(emb, ref)
    assert_rel_close(logits, ref_logits)


def test_pickled_code_never_runs_even_with_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": torch.zeros(1), "x": _Tripwire(tmp_path / "pwned")}, fh, protocol=2)
    with pytest.raises(CheckpointError):
        load_model(path, trust_pickle=True)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------------- insightface
@pytest.fixture(scope="module")
def insightface_r34(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(34)
    backbone = calibrate(build_iresnet("r34", width=0.5))
    path = tmp_path_factory.mktemp("if") / "backbone.pth"
    torch.save(backbone.state_dict(), path)  # arcface_torch saves backbone.module.state_dict() like this
    return {"backbone": backbone, "path": path}


def test_insightface_state_dict_loads(insightface_r34: dict) -> None:
    backbone, path = insightface_r34["backbone"], insightface_r34["path"]
    assert detect_format(path) == "insightface"
    model = load_model(path)
    assert model.arch == "r34" and model.backbone.config.width == 0.5 and not model.backbone.fused
    assert model.classifier is None and model.config["source"]["format"] == "insightface"
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        ref = backbone(x)
    assert_rel_close(_embed(model, x)[1], ref, rtol=1e-6)


def test_insightface_ddp_prefix_and_old_bn_counters(insightface_r34: dict, tmp_path: Path) -> None:
    state = {
        f"module.{k}": v
        for k, v in insightface_r34["backbone"].state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "ddp.pth"
    torch.save(state, path)
    assert load_model(path).arch == "r34"


def test_wrong_keys_are_listed_with_shapes(insightface_r34: dict, tmp_path: Path) -> None:
    state = dict(insightface_r34["backbone"].state_dict())
    del state["layer2.1.conv1.weight"]
    state["layer2.1.conv9.weight"] = torch.zeros(3, 3)
    state["fc.bias"] = torch.zeros(7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "insightface arcface_torch" in msg
    assert "missing keys" in msg and "layer2.1.conv1.weight [64, 64, 3, 3]" in msg
    assert "unexpected keys" in msg and "layer2.1.conv9.weight [3, 3]" in msg
    assert "fc.bias: file [7] vs model [512]" in msg


def test_gmarc_pt_with_missing_key_names_it(small: dict, tmp_path: Path) -> None:
    state = onnx2torch_141_names(small["wrapper"].state_dict())
    del state["base.BatchNormalization_3.running_var"]
    path = tmp_path / "broken_e1.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"GestaltMatcher-Arc per-epoch.*BatchNormalization_3\.running_var"):
        load_model(path)


# --------------------------------------------------------------------------------------------------- small ONNX
def test_small_onnx_and_pt_load(small: dict) -> None:
    x, model = small["x"], small["model"]
    ref = _embed(model, x)[1]
    assert_rel_close(_embed(load_model(small["onnx"]), x)[1], ref)
    path = small["tmp"] / "small_e1.pt"
    torch.save(small["wrapper"].state_dict(), path)
    loaded = load_model(path, syndrome_ids=["s1", "s2", "s3", "s4", "s5"])
    assert loaded.arch == "r18" and loaded.backbone.config.width == 0.25
    assert loaded.syndrome_ids == ["s1", "s2", "s3", "s4", "s5"]
    assert_rel_close(_embed(loaded, x)[1], ref)


def test_plain_onnx2torch_state_dict_with_scoped_names(small: dict, tmp_path: Path) -> None:
    """onnx2torch ≥ 1.5 on a torch-2 export keeps node names (``layer1/layer1/0/conv1/Conv``): file order is used."""
    onnx_path = export_onnx(small["model"].backbone, tmp_path / "named.onnx", clear_names=False)
    state = onnx2torch.convert(str(onnx_path)).state_dict()
    assert "layer1/layer1/0/conv1/Conv.weight" in state
    path = tmp_path / "plain_e1.pt"
    torch.save(state, path)
    model = load_model(path)
    assert model.classifier is None and model.config["source"]["format"] == "gm-arc-pt"
    assert_rel_close(_embed(model, small["x"])[1], _embed(small["model"], small["x"])[1])


def test_onnx_with_unfolded_batchnorm_loads(small: dict, tmp_path: Path) -> None:
    """An export that kept BN after the convs (training-mode export) is folded on load."""
    backbone = small["model"].backbone
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone, torch.zeros(1, 3, 112, 112), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE
        )
    proto = onnx.load_from_string(buf.getvalue())
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert n_bn > 10  # 8 blocks: bn1 + head + features would be 10
    path = tmp_path / "unfolded.onnx"
    onnx.save(proto, str(path))
    with torch.inference_mode():
        ref = backbone.eval()(small["x"])
    assert_rel_close(_embed(load_model(path), small["x"])[1], ref)


# --------------------------------------------------------------------------------------------------- own format
def test_own_format_roundtrip(small: dict, tmp_path: Path) -> None:
    model = small["model"]
    model.channel_order = "BGR"
    try:
        weights = save_model(model, tmp_path / "models" / "m0")
    finally:
        model.channel_order = "RGB"
    assert weights.name == "m0.safetensors" and (tmp_path / "models" / "m0.json").exists()
    assert detect_format(weights) == "gestalt-xai"
    for p in (weights, tmp_path / "models" / "m0.json", tmp_path / "models" / "m0"):
        loaded = load_model(p)
        assert loaded.channel_order == "BGR" and loaded.syndrome_ids == list("abcde")
        assert loaded.config["source"]["sha256"] == model_sha256(weights)
    la, ea = _embed(loaded, small["x"])
    lb, eb = _embed(model, small["x"])
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert load_model(weights, channel_order="RGB").channel_order == "RGB"


def test_own_format_fused_roundtrip(small: dict, tmp_path: Path) -> None:
    fused = load_model(small["onnx"])
    save_model(fused, tmp_path / "fused")
    again = load_model(tmp_path / "fused.safetensors")
    assert again.backbone.fused
    torch.testing.assert_close(_embed(again, small["x"])[1], _embed(fused, small["x"])[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pt", "onnx", "safetensors"])
def test_truncated_files_raise_checkpoint_error(small: dict, tmp_path: Path, kind: str) -> None:
    if kind == "pt":
        src = tmp_path / "full.pt"
        torch.save(small["wrapper"].state_dict(), src)
    elif kind == "onnx":
        src = small["onnx"]
    else:
        src = save_model(small["model"], tmp_path / "full")
    data = Path(src).read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    if kind == "safetensors":
        (tmp_path / "cut.json").write_text((tmp_path / "full.json").read_text())
    expected = {"pt": "per-epoch", "onnx": "ONNX", "safetensors": "gestalt-xai checkpoint"}[kind]
    with pytest.raises(CheckpointError, match=rf"(?s)expected .*{expected}.*(truncated|readable)"):
        load_model(cut)


def test_missing_file_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nothing.pth")
    (tmp_path / "lonely.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="lonely.json is missing"):
        load_model(tmp_path / "lonely.safetensors")


# --------------------------------------------------------------------------------------------------- classes
def test_lookup_table_and_class_checks(small: dict, tmp_path: Path) -> None:
    table = tmp_path / "lookup_table_gmdb_v1.1.0.txt"
    table.write_text('{"header": "lookup table"}\n[101, 202, 303, 404, 505]\n')
    assert read_lookup_table(table) == ["101", "202", "303", "404", "505"]
    model = load_model(small["onnx"])  # embedding only: any cohort is fine, class checks refuse
    with pytest.raises(ConfigError, match="no classifier"):
        check_classes(model, ["101"])
    path = tmp_path / "e1.pt"
    torch.save(small["wrapper"].state_dict(), path)
    with pytest.raises(ConfigError, match="no syndrome ids"):
        check_classes(load_model(path), ["101"])
    model = load_model(path, syndrome_ids=table)
    assert check_classes(model, ["303", "101"]) == {"303": 2, "101": 0}
    with pytest.raises(ConfigError, match=r"1 of the cohort's 2 syndromes are not classes.*999"):
        check_classes(model, ["101", "999"])
    with pytest.raises(ConfigError, match="absent from the cohort"):
        check_classes(model, ["101"], exact=True)
    short = tmp_path / "short.txt"
    short.write_text("header\n[1, 2]\n")
    with pytest.raises(ConfigError, match="lookup table has 2 syndromes but the classifier has 5"):
        load_model(path, syndrome_ids=short)


def test_save_model_gives_identical_bytes(tmp_path) -> None:
    """Reproducible runs need byte-identical checkpoints (safetensors' multi-key metadata order is unstable)."""
    from gestalt_xai.models import build_gestaltmatcher, save_model

    torch.manual_seed(0)
    model = build_gestaltmatcher("r18", width=0.125, num_classes=3, syndrome_ids=["a", "b", "c"])
    blobs = {save_model(model, tmp_path / f"m{i}").read_bytes() for i in range(5)}
    assert len(blobs) == 1
