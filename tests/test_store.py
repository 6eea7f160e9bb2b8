"""Map store: append-only chunks + Parquet index, resume, refusal of non-finite maps, streaming reads."""

from __future__ import annotations

import numpy as np
import pytest

from gestalt_xai.errors import InputError
from gestalt_xai.store import MapKey, MapStore, TargetKey, decode_chunk, encode_chunk


def _map(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((112, 112)).astype(np.float32)


def test_write_read_provenance_and_streaming(tmp_path):
    store = MapStore(tmp_path / "maps")
    keys = [MapKey(f"img{i}", "m", "centroid:S", meth, layer)
            for i in range(5) for meth, layer in (("hirescam", "backbone.layer4"), ("saliency", ""))]
    with store.writer(chunk_maps=3) as w:
        for n, k in enumerate(keys):
            assert w.add(k, _map(n), model_hash="abc", target_kind="centroid", target_value=0.1 * n,
                         target_detail={"excluded_subject": "s1"}, method_params={"p": 1})
    idx = store.index()
    assert len(idx) == 10 and idx["chunk"].nunique() == 4  # flushed every 3 maps
    assert set(idx.columns) >= {"image_id", "model_id", "target", "method", "layer", "model_hash", "target_value",
                                "target_detail", "method_params", "map_sum"}
    for n, k in enumerate(keys):
        np.testing.assert_array_equal(store.load(k), _map(n))
    row = store.index(image_id="img3", method="hirescam").iloc[0]
    assert row["target_value"] == pytest.approx(0.6) and '"excluded_subject": "s1"' in row["target_detail"]
    streamed = list(store.iter_maps(method="saliency"))
    assert len(streamed) == 5 and all(m.dtype == np.float32 and m.shape == (112, 112) for _, m in streamed)
    assert len(store.index(image_id=["img0", "img1"])) == 4
    stack = store.load_many(store.index(method="hirescam"))
    assert stack.shape == (5, 112, 112)


def test_refuses_non_finite_maps_and_resumes(tmp_path):
    store = MapStore(tmp_path / "maps")
    bad = _map(0)
    bad[3, 4] = np.nan
    inf = _map(1)
    inf[0, 0] = np.inf
    with store.writer() as w:
        assert w.add(MapKey("a", "m", "logit:S", "gradcam", "l"), _map(2))
        assert not w.add(MapKey("b", "m", "logit:S", "gradcam", "l"), bad)
        assert not w.add(MapKey("c", "m", "logit:S", "gradcam", "l"), inf)
    assert len(store) == 1
    err = store.errors()
    assert sorted(err["image_id"]) == ["b", "c"] and set(err["error_kind"]) == {"non_finite_map"}
    # a new writer (a resumed run) sees what is stored, never overwrites it, and fills the gaps
    reopened = MapStore(tmp_path / "maps")
    with reopened.writer() as w:
        assert w.done(MapKey("a", "m", "logit:S", "gradcam", "l"))
        assert not w.done(MapKey("b", "m", "logit:S", "gradcam", "l"))
        w.add(MapKey("a", "m", "logit:S", "gradcam", "l"), _map(99))  # ignored: already stored
        w.add(MapKey("b", "m", "logit:S", "gradcam", "l"), _map(3))
    np.testing.assert_array_equal(reopened.load(MapKey("a", "m", "logit:S", "gradcam", "l")), _map(2))
    assert len(reopened) == 2 and list(reopened.errors()["image_id"]) == ["c"]  # b succeeded on retry


def test_orphan_chunk_from_a_killed_flush_is_ignored_and_compact_is_safe(tmp_path):
    store = MapStore(tmp_path / "maps")
    with store.writer() as w:
        w.add(MapKey("a", "m", "logit:S", "x", ""), _map(0))
    # a kill between the chunk write and the index write leaves a chunk without index rows
    (tmp_path / "maps" / "chunks" / "w0-000002.maps").write_bytes(encode_chunk(np.zeros((1, 112, 112))))
    store = MapStore(tmp_path / "maps")
    assert len(store) == 1
    with store.writer() as w:
        w.add(MapKey("b", "m", "logit:S", "x", ""), _map(1))
    assert store.index(image_id="b")["chunk"].iloc[0] == "w0-000003"  # never reuses the orphan's name
    store.compact()
    assert (tmp_path / "maps" / "index.parquet").exists() and not list((tmp_path / "maps" / "index").iterdir())
    np.testing.assert_array_equal(MapStore(tmp_path / "maps").load(("b", "m", "logit:S", "x", "")), _map(1))
    with pytest.raises(ValueError, match="shape"):
        with store.writer() as w:
            w.add(MapKey("c", "m", "logit:S", "x", ""), np.zeros((10, 10)))


def test_same_work_gives_same_bytes(tmp_path):
    for name in ("a", "b"):
        store = MapStore(tmp_path / name)
        with store.writer() as w:
            for i in range(3):
                w.add(MapKey(f"i{i}", "m", "logit:S", "x", ""), _map(i), target_value=float(i))
        store.compact()
    for rel in ("index.parquet", "chunks/w0-000001.maps"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_chunks_are_lossless_compressed_and_old_npy_chunks_still_read(tmp_path):
    """A chunk is the exact float32 maps (every bit, signs, subnormals, extremes), smaller than the raw array on
    attribution-like maps; a store written with ``.npy`` chunks before reads the same, and a damaged chunk is named."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(8, 112, 112)), axis=2).astype(np.float32) * 1e-4
    special = np.array([0.0, -0.0, 1e-45, -3.4e38, 3.4e38, 1e-38], np.float32)
    smooth[0, 0, :6] = special
    data = encode_chunk(smooth)
    back = decode_chunk(data)
    assert back.dtype == np.float32 and back.tobytes() == smooth.tobytes()
    assert len(data) < 0.9 * smooth.nbytes
    with pytest.raises(InputError, match="bad header"):
        decode_chunk(b"\x93NUMPY" + data[8:])
    # an older store: .npy chunks beside the index
    store = MapStore(tmp_path / "old")
    with store.writer() as w:
        for i in range(3):
            w.add(MapKey(f"i{i}", "m", "logit:S", "x", ""), _map(i))
    chunk = tmp_path / "old" / "chunks" / "w0-000001.maps"
    np.save(chunk.with_suffix(".npy"), decode_chunk(chunk.read_bytes()))
    chunk.unlink()
    old = MapStore(tmp_path / "old")
    np.testing.assert_array_equal(old.load(("i2", "m", "logit:S", "x", "")), _map(2))
    fresh = MapStore(tmp_path / "new")
    assert fresh.absorb(old) == 3 and (tmp_path / "new" / "chunks" / "w0-000001.npy").exists()
    np.testing.assert_array_equal(fresh.load_many(fresh.index()), old.load_many(old.index()))


def test_targets_are_typed_keys(tmp_path):
    """A target is ``kind:ref``: the stored string is the key's, its kind fills ``target_kind``, and a key finds it."""
    store = MapStore(tmp_path / "maps")
    key = TargetKey.parse("pair:img:7")  # a reference may contain ':'
    assert (key.kind, key.ref, str(key)) == ("pair", "img:7", "pair:img:7")
    with store.writer() as w:
        w.add(MapKey("a", "m", key, "x", ""), _map(0))
        w.add(MapKey("b", "m", "centroid:S1", "x", ""), _map(1), target_kind="centroid")
        with pytest.raises(ValueError, match="target_kind 'pair' is not the kind"):
            w.add(MapKey("c", "m", "centroid:S1", "x", ""), _map(2), target_kind="pair")
        for bad in ("S1", ":S1", "centroid:"):
            with pytest.raises(InputError, match="kind:ref"):
                w.add(MapKey("d", "m", bad, "x", ""), _map(3))
    idx = store.index()
    assert idx.set_index("image_id")["target"].to_dict() == {"a": "pair:img:7", "b": "centroid:S1"}
    assert idx.set_index("image_id")["target_kind"].to_dict() == {"a": "pair", "b": "centroid"}
    assert store.index(target=key)["image_id"].tolist() == ["a"]
    assert sorted(store.index(target=[key, TargetKey("centroid", "S1")])["image_id"]) == ["a", "b"]
    np.testing.assert_array_equal(store.load(("a", "m", key, "x", "")), _map(0))
    assert MapKey("b", "m", "centroid:S1", "x").target_key == TargetKey("centroid", "S1")
