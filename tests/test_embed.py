"""Embed stage: schema, TTA slots, null logits for embedding-only members, resume, same bytes on rerun."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gestalt_xai.models import embed as embed_mod
from gestalt_xai.models.embed import EMBEDDING_SCHEMA, EmbedConfig, embed_stage


def _run_with_models(root, n_images=10):
    from gestalt_xai.data.images import save_png
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher
    from gestalt_xai.runs import Run, write_parquet

    run = Run(root)
    rng = np.random.default_rng(0)
    ids = [f"img{i:02d}" for i in range(n_images)]
    for i in ids:
        save_png(run.path / "aligned" / f"{i}.png", rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8))
    # one failed alignment (ok = False, no crop) is not embedded
    write_parquet(
        pd.DataFrame({"image_id": [*ids, "lost"], "ok": [True] * n_images + [False]}),
        run.path / "aligned" / "alignment.parquet",
    )
    import torch

    torch.manual_seed(0)
    save_model(
        build_gestaltmatcher("r18", width=0.125, num_classes=3, syndrome_ids=["a", "b", "c"]).eval(),
        run.path / "models" / "clf.safetensors",
    )
    save_model(build_gestaltmatcher("r18", width=0.125).eval(), run.path / "models" / "backbone_only.safetensors")
    return run, ids


def test_embed_stage_schema_slots_and_logits(tmp_path):
    run, ids = _run_with_models(tmp_path / "run")
    out = embed_stage(run, EmbedConfig(threads=1)).outputs["embeddings"]
    table = pq.read_table(out)
    assert table.schema.equals(EMBEDDING_SCHEMA)
    df = table.to_pandas()
    assert len(df) == len(ids) * 2 * 4
    assert df[["image_id", "model_id", "flip", "gray"]].equals(
        df[["image_id", "model_id", "flip", "gray"]].sort_values(["image_id", "model_id", "flip", "gray"])
    )
    assert set(df["model_id"]) == {"clf", "backbone_only"}
    assert df.loc[df["model_id"] == "backbone_only", "logits"].isna().all()
    assert df.loc[df["model_id"] == "clf", "logits"].map(len).eq(3).all()
    assert df["embedding"].map(len).eq(512).all()
    assert set(run.manifest["models"]) >= {"clf", "backbone_only"}
    # same numbers as encoding the crops directly with the model
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.models.checkpoints import load_model

    enc = load_model(run.path / "models" / "clf.safetensors").encode(load_crops(run, ids[:2]), tta=True)
    got = df[(df["model_id"] == "clf") & (df["image_id"] == ids[1]) & df["flip"] & ~df["gray"]]["embedding"].iloc[0]
    np.testing.assert_allclose(got, enc.embeddings[2, 1], rtol=1e-4, atol=1e-3)  # slot 2 = (flip, colour)


def test_embed_stage_resumes_and_reproduces_bytes(tmp_path, monkeypatch):
    cfg = EmbedConfig(chunk_size=3, tta=False, threads=1)
    clean_run, _ = _run_with_models(tmp_path / "clean")
    clean = embed_stage(clean_run, cfg).outputs["embeddings"].read_bytes()

    run, _ = _run_with_models(tmp_path / "interrupted")
    real = embed_mod._encode_chunk
    calls: list = []
    killed: list = []

    class Killed(BaseException):
        pass

    def flaky(*args, **kw):
        calls.append(args[3])
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise Killed  # killed in the middle of the third work unit
        return real(*args, **kw)

    monkeypatch.setattr(embed_mod, "_encode_chunk", flaky)
    with pytest.raises(Killed):
        embed_stage(run, cfg)
    assert len(run.ledger(instance="embed").done()) == 2
    calls.clear()
    out = embed_stage(run, cfg).outputs["embeddings"]
    assert len(calls) == 8 - 2  # 2 models x 4 chunks of ≤ 3 images, 2 units were already done
    assert out.read_bytes() == clean
    calls.clear()
    embed_stage(run, cfg)
    assert calls == [] and out.read_bytes() == clean


def test_embed_stage_refuses_missing_models(tmp_path):
    from gestalt_xai.errors import ConfigError, InputError
    from gestalt_xai.runs import Run
    from gestalt_xai.stages import get_stage

    run = Run(tmp_path / "empty")
    with pytest.raises(InputError, match="no models"):
        embed_stage(run, EmbedConfig())
    # a missing checkpoint is refused when the options are validated, naming the field, before any work
    with pytest.raises(ConfigError, match=r"embed\.models\.list\.0\.path: .*no such file: .*nope\.onnx"):
        get_stage("embed")(run, {"models": [str(tmp_path / "nope.onnx")]})
    # a path under {run} is checked when the stage resolves it
    with pytest.raises(ConfigError, match=r"models\[0\]\.path: no such file: .*nope\.onnx"):
        embed_stage(run, EmbedConfig(models=["{run}/nope.onnx"]))
    assert not (run.path / "embeddings.parquet").exists()


def test_declared_models_carry_their_ids(tmp_path):
    """A bare path is the model of its file stem, a declaration with ``id`` is that model; ``{run}`` is the run."""
    from gestalt_xai.errors import ConfigError
    from gestalt_xai.models.declaration import ModelSpec

    run, ids = _run_with_models(tmp_path / "run", n_images=3)
    cfg = EmbedConfig(tta=False, threads=1, models=["{run}/models/clf.safetensors",
                                                    {"path": "{run}/models/backbone_only.safetensors", "id": "bb"}])
    assert all(isinstance(m, ModelSpec) for m in cfg.models)
    df = pd.read_parquet(embed_stage(run, cfg).outputs["embeddings"])
    assert sorted(set(df["model_id"])) == ["bb", "clf"] and len(df) == 2 * len(ids)
    assert run.manifest["models"]["bb"]["path"] == "models/backbone_only.safetensors"
    # the same rows as the run's own models under their stored ids
    same = pd.read_parquet(embed_stage(run, EmbedConfig(tta=False, threads=1)).outputs["embeddings"])
    a = df[df["model_id"] == "clf"].reset_index(drop=True)
    b = same[same["model_id"] == "clf"].reset_index(drop=True)
    np.testing.assert_array_equal(np.stack(a["embedding"]), np.stack(b["embedding"]))
    with pytest.raises(ConfigError, match=r"model ids \['clf'\] occur twice"):
        from gestalt_xai.config import validate_config

        weights = str(run.path / "models" / "clf.safetensors")
        validate_config(EmbedConfig, {"models": [weights, {"path": weights}]})
