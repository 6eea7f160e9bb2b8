"""Matching: distances, ranking with ties, macro top-k, protocols, centroids, GM-Arc encodings import."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import pairwise_distances

from gestalt_xai.errors import InputError
from gestalt_xai.matching import (
    CentroidBank,
    EmbeddingTable,
    MatchConfig,
    compare_embeddings,
    cosine_distances,
    evaluate_protocol,
    frequent_protocol,
    match_stage,
    ranked_syndromes,
    rare_protocol,
    read_gmarc_encodings,
    slotwise_distances,
    summary_table,
    syndrome_centroids,
    syndrome_ranks,
    topk_accuracy,
    unified_protocols,
)


def test_cosine_distances_match_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    np.testing.assert_allclose(cosine_distances(a, b), pairwise_distances(a, b, "cosine"), atol=1e-12)
    with pytest.raises(InputError):
        cosine_distances(np.zeros((1, 8)), b)


def test_slotwise_average_by_hand():
    # slot 0: test ⟂ gallery (distance 1); slot 1: identical (0); slot 2: opposite (2) → mean 1
    t = [np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]]), np.array([[1.0, 1.0]])]
    g = [np.array([[0.0, 5.0]]), np.array([[0.0, 1.0]]), np.array([[-2.0, -2.0]])]
    assert slotwise_distances(t, g)[0, 0] == pytest.approx(1.0)
    # averaging distances is not averaging embeddings: the mean embeddings would give another answer
    rng = np.random.default_rng(1)
    ts = [rng.normal(size=(3, 4)) for _ in range(4)]
    gs = [rng.normal(size=(6, 4)) for _ in range(4)]
    by_hand = np.mean([pairwise_distances(x, y, "cosine") for x, y in zip(ts, gs, strict=True)], axis=0)
    np.testing.assert_allclose(slotwise_distances(ts, gs), by_hand, atol=1e-12)
    with pytest.raises(InputError):
        slotwise_distances(ts, gs[:3])


def test_ranks_hand_computed_fixture():
    # gallery: A has three images (nearest at 0.30), B one at 0.20, C one at 0.30 (tied with A), D at 0.90
    gallery = ["A", "A", "B", "C", "A", "D"]
    d = np.array(
        [
            [0.50, 0.30, 0.20, 0.30, 0.95, 0.90],  # true A: B(0.2) first, then A/C tied at 0.3
            [0.10, 0.80, 0.70, 0.60, 0.50, 0.05],  # true A: D(0.05) first, then A(0.1) → rank 2
            [0.40, 0.40, 0.40, 0.40, 0.40, 0.40],  # true D: all tied
            [0.10, 0.20, 0.30, 0.40, 0.50, 0.60],  # true Z: not in the gallery
        ]
    )
    test = ["A", "A", "D", "Z"]
    np.testing.assert_array_equal(syndrome_ranks(d, gallery, test), [2, 2, 4, np.nan])  # ties by id
    np.testing.assert_array_equal(syndrome_ranks(d, gallery, test, ties="pessimistic"), [3, 2, 4, np.nan])
    np.testing.assert_array_equal(syndrome_ranks(d, gallery, test, ties="optimistic"), [2, 2, 1, np.nan])
    syn, dist = ranked_syndromes(d, gallery, n=3)
    assert syn[0] == ["B", "A", "C"] and dist[0] == pytest.approx([0.2, 0.3, 0.3])
    assert syn[1] == ["D", "A", "C"]
    assert syn[2] == ["A", "B", "C"]
    # the ranking does not depend on the gallery's order
    perm = np.array([5, 3, 1, 0, 4, 2])
    np.testing.assert_array_equal(syndrome_ranks(d[:, perm], np.array(gallery)[perm], test), [2, 2, 4, np.nan])


def test_macro_topk_by_hand():
    ranks = np.array([2, 2, 4, np.nan, 1])
    test = ["A", "A", "D", "Z", "D"]
    acc = topk_accuracy(ranks, test, ks=(1, 2, 5))
    # per syndrome top-1: A 0, D 1/2, Z 0 → 1/6; top-2: A 1, D 1/2, Z 0 → 1/2; top-5: A 1, D 1, Z 0 → 2/3
    assert acc[1] == pytest.approx(1 / 6) and acc[2] == pytest.approx(0.5) and acc[5] == pytest.approx(2 / 3)
    micro = topk_accuracy(ranks, test, ks=(5,), macro=False)
    assert micro[5] == pytest.approx(4 / 5)


def _toy_cohort():
    """Frequent F1, F2; rare R1 (2 subjects), R2 (3); embeddings that cluster by syndrome."""
    rows, split_rows = [], []
    centres = {"F1": [1, 0, 0, 0], "F2": [0, 1, 0, 0], "R1": [0, 0, 1, 0], "R2": [0, 0, 0, 1]}
    rng = np.random.default_rng(0)
    emb = []
    for syn, n_subj in (("F1", 8), ("F2", 8), ("R1", 2), ("R2", 3)):
        for s in range(n_subj):
            subj = f"{syn}s{s}"
            for k in range(2):
                img = f"{subj}i{k}"
                rows.append((img, subj, syn))
                for model in ("m0", "m1"):
                    for flip in (False, True):
                        v = np.array(centres[syn], float) + 0.3 * rng.normal(size=4)
                        emb.append((img, model, flip, False, v.astype(np.float32), None))
                if syn.startswith("F"):
                    st = "test" if s == 0 else ("val" if s == 1 else "train")
                    split_rows.append((img, st, -1))
                    split_rows.append((img, "frequent_test" if st == "test" else "frequent_gallery", -1))
                else:
                    for k_split in range(3):
                        held = s == k_split % n_subj
                        split_rows.append((img, "rare_test" if held else "rare_gallery", k_split))
    images = pd.DataFrame(rows, columns=["image_id", "subject_id", "syndrome_id"])
    splits = pd.DataFrame(split_rows, columns=["image_id", "set", "split"])
    emb_df = pd.DataFrame(emb, columns=["image_id", "model_id", "flip", "gray", "embedding", "logits"])
    return images, splits, emb_df


def test_protocols_split_by_subject_and_evaluate():
    images, splits, emb_df = _toy_cohort()
    subj = images.set_index("image_id")["subject_id"]
    freq, rare = frequent_protocol(splits), rare_protocol(splits)
    uni = unified_protocols(freq, rare)
    assert (
        len(freq.splits) == 1
        and len(rare.splits) == 3
        and [p.name for p in uni] == ["frequent_unified", "rare_unified"]
    )
    for p in [freq, rare, *uni]:
        for sp in p.splits:
            assert set(subj[sp.test_image_ids]).isdisjoint(subj[sp.gallery_image_ids])
            assert sp.test_image_ids and sp.gallery_image_ids
    # each rare split holds out exactly one subject per rare syndrome
    for sp in rare.splits:
        held = images.set_index("image_id").loc[sp.test_image_ids].groupby("syndrome_id")["subject_id"].nunique()
        assert held.to_dict() == {"R1": 1, "R2": 1}
    # the unified gallery is the frequent gallery plus that split's rare gallery
    assert set(uni[1].splits[2].gallery_image_ids) == set(freq.splits[0].gallery_image_ids) | set(
        rare.splits[2].gallery_image_ids
    )

    table = EmbeddingTable.from_frame(emb_df)
    slots = table.select()
    assert len(slots) == 4
    ranks, per_split = evaluate_protocol(table, images, freq, slots)
    assert len(ranks) == 4 and ranks["rank"].notna().all()
    assert per_split["top1"].iloc[0] == pytest.approx(1.0)  # well separated clusters
    ranks_r, per_split_r = evaluate_protocol(table, images, rare, slots)
    assert len(per_split_r) == 3
    summary = summary_table(pd.concat([per_split, per_split_r]), [freq, rare])
    assert list(summary["protocol"]) == ["frequent", "rare"] and summary["top1"].iloc[0] == pytest.approx(100.0)
    # distances used are the slot-wise average of the 4 slots, checked for one test image by hand
    t, g = freq.splits[0].test_image_ids[:1], freq.splits[0].gallery_image_ids
    by_hand = np.mean([pairwise_distances(table.matrix(s, t), table.matrix(s, g), "cosine") for s in slots], axis=0)
    gal_syn = images.set_index("image_id").loc[g, "syndrome_id"].tolist()
    true = images.set_index("image_id").loc[t, "syndrome_id"].tolist()
    assert syndrome_ranks(by_hand, gal_syn, true)[0] == ranks.set_index("image_id").loc[t[0], "rank"]


def test_syndrome_centroids_by_hand():
    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "subject_id": ["s1", "s1", "s2", "s3"],
            "syndrome_id": ["X", "X", "X", "Y"],
        }
    )
    e = {"a": [2.0, 0.0], "b": [0.0, 1.0], "c": [0.0, 3.0], "d": [1.0, 1.0]}
    emb = pd.DataFrame(
        {
            "image_id": list(e),
            "model_id": "m",
            "flip": False,
            "gray": False,
            "embedding": [np.array(v, np.float32) for v in e.values()],
        }
    )
    c = syndrome_centroids(emb, images, ["a", "b", "c", "d"])
    # X: subject s1 = mean([1,0],[0,1]) = [.5,.5]; s2 = [0,1]; centroid = [.25, .75]
    np.testing.assert_allclose(c.get("X", "m"), [0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(c.get("Y", "m"), [2**-0.5, 2**-0.5], atol=1e-6)
    assert c.n_subjects == {"X": 2, "Y": 1}
    c2 = syndrome_centroids(emb, images, ["a", "b", "c", "d"], exclude_subject="s2")
    np.testing.assert_allclose(c2.get("X", "m"), [0.5, 0.5], atol=1e-6)
    assert c2.vectors.shape == (1, 2, 2) and ("X", "m", False, False) in c2.as_dict()


def _centroids_before_the_merge(emb: pd.DataFrame, images: pd.DataFrame, gallery, exclude_subject, slot):
    """The centroid formula of ``syndrome_centroids`` before CentroidBank and it shared one implementation: drop the
    excluded subject's images, L2-normalise, mean per (syndrome, subject) with pandas, then mean per syndrome."""
    gal = images[images["image_id"].isin(set(gallery))]
    gal = gal[gal["subject_id"] != exclude_subject].sort_values("image_id", kind="stable")
    part = emb[(emb["model_id"] == slot[0]) & (emb["flip"] == slot[1]) & (emb["gray"] == slot[2])]
    x = np.stack(part.set_index("image_id").loc[gal["image_id"], "embedding"].to_numpy()).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    per_subject = pd.DataFrame(x).groupby([gal["syndrome_id"].to_numpy(), gal["subject_id"].to_numpy()]).mean()
    per_syndrome = per_subject.groupby(level=0).mean()
    return {str(s): per_syndrome.loc[s].to_numpy() for s in per_syndrome.index}


def test_centroids_equal_the_formula_before_the_merge():
    """syndrome_centroids and CentroidBank.reference (leave-own-subject-out) give the old formula's centroids to
    1e-6, on random embeddings with 1–4 subjects per syndrome and 1–3 images per subject, in every slot."""
    rng = np.random.default_rng(7)
    rows = []
    for syn in "ABCD":
        for j in range(int(rng.integers(1, 5))):
            for k in range(int(rng.integers(1, 4))):
                rows.append({"image_id": f"{syn}{j}{k}", "subject_id": f"s{syn}{j}", "syndrome_id": syn})
    images = pd.DataFrame(rows)
    slots = [("m0", False, False), ("m0", True, True), ("m1", False, False)]
    emb = pd.DataFrame(
        [
            {"image_id": i, "model_id": m, "flip": f, "gray": g, "embedding": rng.normal(size=16).astype(np.float32)}
            for i in images["image_id"]
            for m, f, g in slots
        ]
    )
    gallery = images["image_id"].tolist()
    bank = CentroidBank(emb, images, gallery)
    subjects = [None, *sorted(images["subject_id"].unique())]
    worst = 0.0
    for subject in subjects:
        new = syndrome_centroids(emb, images, gallery, exclude_subject=subject)
        for slot in slots:
            old = _centroids_before_the_merge(emb, images, gallery, subject, slot)
            assert sorted(old) == new.syndromes
            for syn, ref in old.items():
                for ours in (new.get(syn, *slot), bank.reference(slot[0], slot[1:], syn, exclude_subject=subject)):
                    worst = max(worst, float(np.abs(ours - ref).max()))
            lone = {s for s in "ABCD" if s not in old}  # the excluded subject was the syndrome's only one
            assert all(bank.reference(slot[0], slot[1:], s, exclude_subject=subject) is None for s in lone)
    assert worst <= 1e-6, worst


def _gmarc_frame(emb_df: pd.DataFrame) -> pd.DataFrame:
    sub = emb_df[emb_df["model_id"] == "m0"]
    return pd.DataFrame(
        {
            "img_name": [f"{i}_rot_aligned.jpg" for i in sub["image_id"]],
            "model": "m0",
            "flip": sub["flip"].astype(int).to_numpy(),
            "gray": sub["gray"].astype(int).to_numpy(),
            "class_conf": [[0]] * len(sub),
            "representations": [list(map(float, v)) for v in sub["embedding"]],
        }
    )


def test_gmarc_encodings_pickle_needs_opt_in(tmp_path):
    _, _, emb_df = _toy_cohort()
    path = tmp_path / "GMDB_gallery_encodings_v1.0.3.pkl"
    _gmarc_frame(emb_df).to_pickle(path)
    with pytest.raises(InputError, match="pickle.*execute"):
        read_gmarc_encodings(path)
    theirs = read_gmarc_encodings(path, trust_pickle=True)
    assert set(theirs.columns) == {"image_id", "model_id", "flip", "gray", "embedding", "logits"}
    assert theirs["logits"].isna().all() and theirs["image_id"].iloc[0] == "F1s0i0"
    agree = compare_embeddings(emb_df, theirs)
    same = agree[(agree["our_model"] == "m0") & (agree["their_model"] == "m0")]
    assert (same["cosine_min"] > 0.999999).all()
    other = agree[(agree["our_model"] == "m1")]
    assert (other["cosine_median"] < 0.99).all()
    # a pickle that smuggles a callable is refused even with the opt-in
    evil = tmp_path / "evil.pkl"

    class Boom:
        def __reduce__(self):
            return (eval, ("1+1",))

    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(InputError, match="refusing"):
        read_gmarc_encodings(evil, trust_pickle=True)


def test_match_stage_writes_tables(tmp_path, capsys):
    from gestalt_xai.data.cohort import Cohort, save_run_cohort
    from gestalt_xai.models.embed import embedding_table, write_embeddings
    from gestalt_xai.runs import Run

    images, splits, emb_df = _toy_cohort()
    run = Run(tmp_path / "run")
    save_run_cohort(
        run,
        Cohort(
            images=images.assign(path=""),
            syndromes=pd.DataFrame(
                {"syndrome_id": ["F1", "F2", "R1", "R2"], "syndrome_name": ["F1", "F2", "R1", "R2"]}
            ),
            splits=splits,
        ),
    )
    write_embeddings(embedding_table({c: emb_df[c].tolist() for c in emb_df.columns}), run.path / "embeddings.parquet")
    assert len(run.embeddings()) == len(emb_df)
    result = match_stage(run, MatchConfig(models=["m0"]))
    assert any("frequent+rare" in line for line in result.summary) and "Top-1" in result.summary[1]
    summary = pd.read_parquet(result.outputs["summary"])
    assert list(summary["protocol"]) == ["frequent", "rare", "frequent_unified", "rare_unified"]
    assert summary["n_slots"].iloc[0] == 2
    ranks = pd.read_parquet(run.path / "matching" / "ranks.parquet")
    assert {"protocol", "split", "image_id", "rank", "top_syndromes"} <= set(ranks.columns)
    first = (run.path / "matching" / "summary.parquet").read_bytes()
    match_stage(run, MatchConfig(models=["m0"]))
    assert (run.path / "matching" / "summary.parquet").read_bytes() == first

    # GM-Arc's gallery encodings (here: a copy of m0's) as the gallery of model m0 give the same ranks
    gm = tmp_path / "gallery.pkl"
    _gmarc_frame(emb_df).to_pickle(gm)
    with pytest.raises(InputError, match="pickle"):
        match_stage(run, MatchConfig(models=["m0"], gallery_encodings=gm))
    theirs = match_stage(
        run,
        MatchConfig(models=["m0"], gallery_encodings=gm, gallery_model_map={"m0": "m0"}, trust_pickle=True),
    )
    pd.testing.assert_frame_equal(pd.read_parquet(theirs.outputs["summary"]), summary)
    agree = pd.read_parquet(run.path / "matching" / "gmarc_agreement.parquet")
    assert agree.loc[agree["our_model"] == "m0", "cosine_min"].min() > 0.999999
