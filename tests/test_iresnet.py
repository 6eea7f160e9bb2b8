"""iResNet layout, BN folding, GestaltMatcher preprocessing, TTA slots and the ensemble distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gestalt_xai.models import (
    TTA_SLOTS,
    Ensemble,
    GestaltMatcher,
    IBasicBlock,
    ResidualAdd,
    build_gestaltmatcher,
    build_iresnet,
    fuse_iresnet,
    preprocess,
    slotwise_cosine_distances,
)
from gestalt_xai.models.gestaltmatcher import to_gray_bt601
from gestalt_xai.models.iresnet import canonical_arch, iresnet18, iresnet34, iresnet50, iresnet100


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> GestaltMatcher:
    torch.manual_seed(0)
    model = build_gestaltmatcher("r18", width=0.125, num_classes=4, syndrome_ids=["a", "b", "c", "d"])
    randomise_bn(model.backbone)
    return model.eval()


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    img[:, :, :40] //= 3  # left/right asymmetric, so a flip changes the image
    return img


# --------------------------------------------------------------------------------------------------- layout
def test_insightface_parameter_names_and_sizes() -> None:
    m = iresnet50()
    keys = list(m.state_dict())
    assert keys[:7] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "prelu.weight",
    ]
    for k in (
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.weight",
        "layer1.0.prelu.weight",
        "layer1.0.conv2.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.13.bn3.bias",
        "bn2.weight",
        "fc.weight",
        "fc.bias",
        "features.weight",
        "features.running_mean",
    ):
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys and "layer3.14.bn1.weight" not in keys
    # insightface r50 with a 512-d embedding: 43,590,848 parameters (incl. BN affine and PReLU slopes)
    assert sum(p.numel() for p in m.parameters()) == 43_590_848
    assert m.fc.weight.shape == (512, 512 * 7 * 7)
    assert m.state_dict()["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize(
    ("factory", "depths"),
    [(iresnet18, [2, 2, 2, 2]), (iresnet34, [3, 4, 6, 3]), (iresnet50, [3, 4, 14, 3]), (iresnet100, [3, 13, 30, 3])],
)
def test_depths(factory, depths) -> None:  # noqa: ANN001
    m = factory(width=0.0625)
    assert [len(s) for s in m.stages] == depths
    assert sum(1 for _ in m.blocks()) == sum(depths)


def test_width_multiplier_and_names() -> None:
    m = build_iresnet("iresnet18", width=0.25)
    assert [s[0].conv1.out_channels for s in m.stages] == [16, 32, 64, 128]
    assert m.fc.in_features == 128 * 49 and m.fc.out_features == 512
    assert m(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
    assert canonical_arch("IR-100") == "r100" and canonical_arch("resnet34") == "r34"
    with pytest.raises(ValueError, match="unknown iResNet"):
        build_iresnet("r152")


def test_blocks_and_residual_adds_are_hookable(tiny: GestaltMatcher) -> None:
    bb = tiny.backbone
    adds = [m for m in bb.modules() if isinstance(m, ResidualAdd)]
    assert len(adds) == 8 and all(isinstance(b.residual, ResidualAdd) for _, b in bb.blocks())
    seen: list[tuple[int, ...]] = []
    handles = [a.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape))) for a in adds]
    handles.append(bb.layer4.register_forward_hook(lambda _m, _i, o: seen.append(("layer4", *o.shape))))
    try:
        bb(torch.zeros(1, 3, 112, 112))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 9 and seen[-1] == ("layer4", 1, 64, 7, 7)
    assert isinstance(bb.layer4[-1], IBasicBlock)


@pytest.mark.parametrize("arch", ["r18", "r34"])
def test_fused_equals_native_after_folding(arch: str) -> None:
    torch.manual_seed(1)
    native = randomise_bn(build_iresnet(arch, width=0.25))
    fused = fuse_iresnet(native).eval()
    assert fused.fused and not native.fused
    keys = set(fused.state_dict())
    assert "layer1.0.bn2.weight" not in keys and "layer1.0.bn3.weight" not in keys and "bn1.weight" not in keys
    assert "layer1.0.downsample.1.weight" not in keys and "layer1.0.conv1.bias" in keys
    assert {"layer1.0.bn1.weight", "bn2.weight", "features.weight"} <= keys  # the BNs an ONNX export keeps
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        a, b = native(x), fused(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


# --------------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_normalisation_and_channel_order() -> None:
    img = np.zeros((112, 112, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 51  # R, G, B
    x = preprocess(img)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))
    xb = preprocess(img, channel_order="BGR")
    assert torch.equal(xb[0, 0], x[0, 2]) and torch.equal(xb[0, 2], x[0, 0])


def test_preprocess_rejects_wrong_inputs() -> None:
    from gestalt_xai.errors import InputError

    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((112, 112, 3), np.float32))
    with pytest.raises(InputError, match="112×112"):
        preprocess(np.zeros((100, 112, 3), np.uint8))


def test_gray_is_bt601_as_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    ours = to_gray_bt601(img).numpy()
    ref = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    np.testing.assert_array_equal(ours, ref)


def test_tta_slot_semantics(tiny: GestaltMatcher, faces: np.ndarray) -> None:
    enc = tiny.encode(faces, tta=True, batch_size=2)
    assert enc.slots == TTA_SLOTS == ((False, False), (False, True), (True, False), (True, True))
    assert enc.embeddings.shape == (4, 3, 512) and enc.embeddings.dtype == np.float32
    assert enc.logits is not None and enc.logits.shape == (4, 3, 4)
    flipped = np.ascontiguousarray(faces[:, :, ::-1])
    gray = to_gray_bt601(faces).numpy()
    gray_flipped = np.ascontiguousarray(gray[:, :, ::-1])
    for slot, imgs in enumerate([faces, gray, flipped, gray_flipped]):
        plain = tiny.embed(imgs, tta=False)
        assert plain.shape == (1, 3, 512)
        np.testing.assert_allclose(enc.embeddings[slot], plain[0], rtol=0, atol=1e-5 * np.abs(plain).max())
    assert not np.allclose(enc.embeddings[0], enc.embeddings[2])  # the flip matters on this input
    assert tiny.training is False


def test_encode_restores_training_mode(faces: np.ndarray) -> None:
    model = build_gestaltmatcher("r18", width=0.125).train()
    a = model.embed(faces[:2], tta=False)
    assert model.training
    b = model.eval().embed(faces[:2], tta=False)
    np.testing.assert_array_equal(a, b)  # embedding always runs in eval mode


# --------------------------------------------------------------------------------------------------- ensemble
def test_ensemble_embed_shape_and_member_order(tiny: GestaltMatcher, faces: np.ndarray) -> None:
    torch.manual_seed(5)
    other = build_gestaltmatcher("r18", width=0.125, channel_order="BGR").eval()
    ens = Ensemble([tiny, other], model_ids=["m0", "m1"])
    emb = ens.embed(faces, tta=True, batch_size=2)
    assert emb.shape == (2, 4, 3, 512) and emb.dtype == np.float32
    ref = other.embed(faces, tta=False)[0]
    np.testing.assert_allclose(emb[1, 0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    encs = ens.encode(faces, tta=False)
    assert encs[0].logits is not None and encs[1].logits is None


def test_slotwise_distance_matches_hand_computation() -> None:
    sklearn_pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    rng = np.random.default_rng(7)
    test = rng.normal(size=(3, 4, 5, 16)).astype(np.float32)  # 3 models × 4 TTA slots, 5 test images
    gallery = rng.normal(size=(3, 4, 6, 16)).astype(np.float32)
    # GM-Arc (evaluate_ensemble.py): one cosine distance matrix per slot, slot i with slot i, then the mean
    hand = np.mean(
        [
            sklearn_pairwise.pairwise_distances(test[m, s], gallery[m, s], metric="cosine")
            for m in range(3)
            for s in range(4)
        ],
        axis=0,
    )
    ours = Ensemble.distances(test, gallery)
    assert ours.shape == (5, 6)
    np.testing.assert_allclose(ours, hand, rtol=1e-5, atol=1e-6)
    # not the same as averaging embeddings first, nor as crossing slots
    pooled = sklearn_pairwise.pairwise_distances(test.mean((0, 1)), gallery.mean((0, 1)), metric="cosine")
    assert not np.allclose(ours, pooled, atol=1e-3)
    # a single slot is plain cosine distance
    np.testing.assert_allclose(
        slotwise_cosine_distances(test[0, 0], gallery[0, 0]),
        sklearn_pairwise.cosine_distances(test[0, 0], gallery[0, 0]),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="slot axes"):
        slotwise_cosine_distances(test[:, :2], gallery)
