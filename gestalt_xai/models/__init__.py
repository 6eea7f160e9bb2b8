"""GestaltMatcher-style models: iResNet backbones, the GestaltMatcher wrapper (preprocessing, TTA, ensembles)
and checkpoint loading for every GestaltMatcher-Arc format."""

from gestalt_xai.models.checkpoints import check_classes, load_model, model_sha256, read_lookup_table, save_model
from gestalt_xai.models.gestaltmatcher import (
    TTA_SLOTS,
    Encoding,
    Ensemble,
    GestaltMatcher,
    build_gestaltmatcher,
    encode,
    preprocess,
    slotwise_cosine_distances,
)
from gestalt_xai.models.iresnet import IBasicBlock, IResNet, ResidualAdd, build_iresnet, fuse_iresnet

__all__ = [
    "TTA_SLOTS",
    "Encoding",
    "Ensemble",
    "GestaltMatcher",
    "IBasicBlock",
    "IResNet",
    "ResidualAdd",
    "build_gestaltmatcher",
    "build_iresnet",
    "check_classes",
    "load_model",
    "model_sha256",
    "read_lookup_table",
    "save_model",
    "encode",
    "fuse_iresnet",
    "preprocess",
    "slotwise_cosine_distances",
]
