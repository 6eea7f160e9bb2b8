"""Explain stage end to end on a tiny run: targets, provenance, resume after a kill, error rows, figures; and the
model-randomisation sanity check on the shared trained model (``trained_run`` fixture from conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from attribution_helpers import explain_maps, make_tiny_run

from gestalt_xai.attribution import explain as explain_mod
from gestalt_xai.attribution.explain import ExplainConfig
from gestalt_xai.store import MapStore

FAST = {"methods": ["gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient", "occlusion"],
        "occlusion_patch": 28, "occlusion_stride": 28, "batch_size": 2, "overlay": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 syndromes × 2 subjects × 2 images; one subject per syndrome in test; one r18/0.125 model; embeddings."""
    return make_tiny_run(tmp_path_factory.mktemp("explain") / "run")


def test_explain_centroid_label_maps_provenance_and_figures(tiny_run, tmp_path):
    from gestalt_xai.matching import syndrome_centroids
    from gestalt_xai.runs import Run

    run = Run(tmp_path / "run")
    import shutil

    shutil.copytree(tiny_run.path, run.path, dirs_exist_ok=True)
    run = Run(run.path)
    store = explain_maps(run, ExplainConfig(layers=["backbone.layer4", "backbone.layer3"], **FAST))
    idx = store.index()
    # 6 test images × (gradcam, hirescam at 2 layers + fullgrad, saliency, input×gradient, occlusion)
    assert len(idx) == 6 * (2 * 2 + 4)
    assert set(idx["image_id"]) == {f"{s}0{i}" for s in "ABC" for i in (0, 1)}
    assert set(idx["target"]) == {"centroid:A", "centroid:B", "centroid:C"}
    assert (idx["model_hash"].str.len() == 64).all()
    # the explained value is the cosine to the centroid of the gallery (train) without the patient's subject
    emb = run.embeddings()
    coh = pd.read_parquet(run.path / "cohort" / "images.parquet")
    gallery = coh.loc[coh["image_id"].str[1] == "1", "image_id"].tolist()
    cent = syndrome_centroids(emb, coh, gallery, models=["clf"], tta=False).get("A", "clf")
    f = np.asarray(emb[(emb.image_id == "A00") & ~emb.flip & ~emb.gray]["embedding"].iloc[0])
    expected = f @ cent / np.linalg.norm(f) / np.linalg.norm(cent)
    got = idx[(idx.image_id == "A00") & (idx.method == "hirescam")]["target_value"]
    assert np.allclose(got, expected, atol=1e-5)
    assert (run.path / "maps" / "figures").is_dir() and len(list((run.path / "maps" / "figures").glob("*.png"))) == 1
    assert run.manifest["stages"]["explain"]["status"] == "done"


def test_explain_resumes_after_kill_without_recomputing(tiny_run, tmp_path, monkeypatch):
    import shutil

    from gestalt_xai.runs import Run

    shutil.copytree(tiny_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    cfg = ExplainConfig(**{**FAST, "methods": ["hirescam", "saliency"], "overlay": 0})
    real = explain_mod._explain_batch
    calls: list[list[str]] = []

    def killed_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process dies mid-run
        calls.append([it.image_id for it in args[2]])
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_mod, "_explain_batch", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        explain_maps(run, cfg)
    assert len(MapStore(run.path / "maps")) == 2 * 2  # the first batch (2 images × 2 methods) was kept
    done_first = set(calls[0])

    seen: list[str] = []

    def counting(*args, **kwargs):
        seen.extend(it.image_id for it in args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_mod, "_explain_batch", counting)
    store = explain_maps(Run(run.path), cfg)
    assert not done_first & set(seen) and len(seen) == 4
    assert len(store) == 6 * 2
    seen.clear()
    explain_maps(Run(run.path), cfg)  # nothing left to do
    assert seen == []


def test_non_finite_map_is_an_error_row(tiny_run, tmp_path, monkeypatch):
    import shutil

    from gestalt_xai.attribution.gradients import GradientPass
    from gestalt_xai.runs import Run

    shutil.copytree(tiny_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    monkeypatch.setattr(GradientPass, "saliency", lambda self: torch.full((self.x.shape[0], 112, 112), float("nan")))
    store = explain_maps(run, ExplainConfig(**{**FAST, "methods": ["hirescam", "saliency"], "overlay": 0}))
    assert set(store.index()["method"]) == {"hirescam"}
    errors = run.errors()
    errors = errors[errors["stage"] == "explain"]
    assert len(errors) == 6 and set(errors["error_kind"]) == {"non_finite_map"}
    # the item is the image; the key names the map that was refused
    assert sorted(errors["item_id"]) == sorted(f"{s}0{i}" for s in "ABC" for i in (0, 1))
    keys = [json.loads(k) for k in errors["key"]]
    assert all(k == {"model_id": "clf", "target": f"centroid:{img[0]}", "method": "saliency", "layer": ""}
               for k, img in zip(keys, errors["item_id"], strict=True))


def test_explain_logit_topk_pairs_and_tta_ensemble(tiny_run, tmp_path):
    import shutil

    from gestalt_xai.runs import Run

    shutil.copytree(tiny_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    base = {**FAST, "methods": ["hirescam"], "overlay": 0, "images": ["A00", "B00"]}
    store = explain_maps(run, ExplainConfig(**base, target="logit", syndromes="topk:2", tta=True, ensemble=True))
    idx = store.index()
    assert len(idx) == 4 and set(idx["model_id"]) == {"ensemble"}
    assert all(t.startswith("logit:") for t in idx["target"])
    assert idx["target_detail"].str.contains('"rank": 1').sum() == 2
    assert idx["target_detail"].str.contains('"n_terms": 4').all()
    assert not idx["target_detail"].str.contains(r"\[1, 2\]").any()  # per-row class index, not the batch's
    store = explain_maps(run, ExplainConfig(**base, target="pair", syndromes="A", pairs="nearest:1"))
    pairs = store.index(target_kind="pair")
    # each patient against its nearest gallery image of A, and that image against the patient
    assert len(pairs) == 4 and {"A00", "B00"} <= set(pairs["image_id"])
    assert {f"pair:{i}" for i in ("A00", "B00")} <= set(pairs["target"])


def test_unknown_method_and_bad_specs_fail_before_work(tiny_run):
    from gestalt_xai.config import validate_config
    from gestalt_xai.errors import ConfigError

    # method names, method parameters and the occlusion grid are options: checked when the config is read
    with pytest.raises(ConfigError, match="unknown attribution method"):
        validate_config(ExplainConfig, {"methods": ["nope"]})
    with pytest.raises(ConfigError, match=r"occlusion_stride \(12\) must not exceed occlusion_patch \(10\)"):
        validate_config(ExplainConfig, {"occlusion_stride": 12})
    with pytest.raises(ConfigError, match=r"stride \(30\) must not exceed the patch"):
        validate_config(ExplainConfig, {"methods": ["occlusion"], "method_params": {"occlusion": {"stride": 30}}})
    with pytest.raises(ConfigError, match="not requested"):
        validate_config(ExplainConfig, {"methods": ["gradcam"], "method_params": {"lrp": {}}})

    with pytest.raises(ConfigError, match="colour"):
        validate_config(ExplainConfig, {"methods": ["gradcam"], "colour": "red"})  # unknown keys are errors
    # so are the target options
    with pytest.raises(ConfigError, match="topk"):
        validate_config(ExplainConfig, {"methods": ["gradcam"], "syndromes": "topk:0"})
    with pytest.raises(ConfigError, match="target 'pair' needs pairs"):
        validate_config(ExplainConfig, {"methods": ["gradcam"], "target": "pair"})
    with pytest.raises(ConfigError, match="unknown target kind 'centriod'"):
        validate_config(ExplainConfig, {"methods": ["gradcam"], "target": "centriod"})
    assert len(MapStore(tiny_run.path / "maps")) == 0


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=True)]))


@pytest.mark.slow
def test_sanity_model_randomisation_drops_correlation(trained_run):
    """Adebayo et al. 2018: maps of a trained model vs the same model with re-initialised weights.

    Grad-CAM, HiResCAM, saliency and IG must lose rank correlation; guided backprop is reported only (it is known to
    survive randomisation). Uses the shared ``trained_run`` fixture (a run with a trained small model)."""
    from gestalt_xai.attribution.base import get_method
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.attribution.targets import CentroidBank, CentroidTarget
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.data.cohort import load_run_cohort
    from gestalt_xai.models.checkpoints import load_model
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher, preprocess
    from gestalt_xai.runs import Run

    run = trained_run if isinstance(trained_run, Run) else Run(trained_run)
    model_path = sorted((run.path / "models").glob("*.safetensors"))[0]
    model_id = model_path.name[: -len(".safetensors")]
    model = load_model(model_path).eval()
    cohort = load_run_cohort(run).images.astype({"image_id": str, "subject_id": str, "syndrome_id": str})
    emb = run.embeddings()
    bank = CentroidBank(emb, cohort)
    ids = sorted(set(emb["image_id"]) & set(cohort["image_id"]))[:6]
    meta = cohort.set_index("image_id")
    refs = np.stack([bank.reference(model_id, (False, False), meta.loc[i, "syndrome_id"],
                                    exclude_subject=meta.loc[i, "subject_id"]) for i in ids])
    x = preprocess(load_crops(run, ids))
    torch.manual_seed(12345)  # a re-initialisation unrelated to the trained model's initial weights
    random = build_gestaltmatcher(model.arch, width=model.backbone.config.width,
                                  num_classes=model.num_classes).eval()
    maps = {}
    for name, m in (("trained", model), ("random", random)):
        sm = ScoreModel([(model_id, m)], CentroidTarget(refs))
        out = get_method("gradcam")().attribute(sm, x, ["gradcam", "hirescam", "saliency"], ["backbone.layer4"])
        out += get_method("integrated_gradients")(steps=16).attribute(sm, x, ["integrated_gradients"], [])
        out += get_method("guided_backprop")().attribute(sm, x, ["guided_backprop"], [])
        maps[name] = {mm.method: mm.maps.numpy() for mm in out}
    rho = {k: _spearman(np.abs(maps["trained"][k]), np.abs(maps["random"][k])) for k in maps["trained"]}
    print("Spearman |map| trained vs randomised:", rho)
    # identical maps have rho = 1; "drops" = clearly below (Adebayo et al. report ~0.2–0.5 for these methods;
    # input structure keeps some correlation for input-space methods, hence a margin)
    for k in ("gradcam", "hirescam", "saliency", "integrated_gradients"):
        assert rho[k] < 0.7, (k, rho[k])


def test_centroid_bank_equals_matching_centroids_with_subject_excluded(tiny_run):
    """CentroidBank (O(D) leave-own-subject-out) agrees with gestalt_xai.matching.syndrome_centroids."""
    from gestalt_xai.attribution.targets import CentroidBank
    from gestalt_xai.matching import syndrome_centroids

    emb = tiny_run.embeddings()
    coh = pd.read_parquet(tiny_run.path / "cohort" / "images.parquet")
    gallery = coh["image_id"].tolist()  # everything, so exclusion matters
    bank = CentroidBank(emb, coh, gallery)
    for subject in ("sA0", "sB1"):
        ref = syndrome_centroids(emb, coh, gallery, exclude_subject=subject)
        for syn in ("A", "B", "C"):
            for flip, gray in ((False, False), (True, True)):
                ours = bank.reference("clf", (flip, gray), syn, exclude_subject=subject)
                np.testing.assert_allclose(ours, ref.get(syn, "clf", flip, gray), rtol=1e-5, atol=1e-6)
    assert bank.reference("clf", (False, False), "A", exclude_subject="sA0") is not None


@pytest.mark.slow
def test_explain_and_reference_agreement_on_trained_model(trained_run, tmp_path):
    """The explain stage on the demo model and cohort; Grad-CAM/HiResCAM agree with Captum on the trained model."""
    import shutil

    from captum.attr import LayerGradCam, LayerGradientXActivation

    from gestalt_xai.attribution.gradients import gradient_pass
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.attribution.targets import CentroidTarget
    from gestalt_xai.models.checkpoints import load_model
    from gestalt_xai.runs import Run

    shutil.copytree(trained_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    some = sorted(run.embeddings()["image_id"].astype(str).unique())[:3]
    store = explain_maps(run, ExplainConfig(**{**FAST, "images": some, "overlay": 1}))
    idx = store.index()
    assert len(idx) == 3 * 6 and np.isfinite(idx["target_value"]).all()
    assert len(list((run.path / "maps" / "figures").glob("*.png"))) == 1

    model = load_model(sorted((run.path / "models").glob("*.safetensors"))[0]).eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    sm = ScoreModel([("m", model)], CentroidTarget(torch.randn(2, 512, generator=torch.Generator().manual_seed(1))))
    gp = gradient_pass(sm, x, ["backbone.layer4"])
    layer = model.backbone.layer4
    for ours, ref in ((gp.gradcam_lowres(), LayerGradCam(sm, layer).attribute(x)[:, 0]),
                      (gp.hirescam_lowres(), LayerGradientXActivation(sm, layer).attribute(x).sum(1))):
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_logit_targets_on_partial_and_foreign_class_lists(tiny_run, tmp_path):
    """A model that knows only some of the cohort's classes explains those and records the others as skipped (also
    inside an ensemble, without changing its batch neighbours' maps); a lookup table that shares no class with the
    cohort, names a class twice or does not fit the classifier, or a classifier without one, is refused before any
    map is made."""
    import shutil

    from gestalt_xai.errors import ConfigError
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.models.embed import EmbedConfig, embed_stage
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher
    from gestalt_xai.runs import Run

    shutil.copytree(tiny_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    # a 2-class model that stores no syndrome ids (as a GM-Arc checkpoint): they come from a lookup table
    torch.manual_seed(1)
    sub = str(save_model(build_gestaltmatcher("r18", width=0.125, num_classes=2).eval(), tmp_path / "sub"))

    def table(ids: list[str]) -> str:
        path = tmp_path / f"lookup_table_gmdb_{'-'.join(ids)}.txt"
        path.write_text(f"lookup table\n{json.dumps(ids)}\n")
        return str(path)

    clf = str(run.path / "models" / "clf.safetensors")
    models = [clf, {"path": sub, "lookup_table": table(["A", "Z"])}]
    embed_stage(run, EmbedConfig(models=models, tta=False, threads=1))
    base = {**FAST, "methods": ["hirescam", "saliency"], "overlay": 0, "images": ["A00", "B00"], "target": "logit"}
    idx = explain_maps(run, ExplainConfig(**base, models=models)).index()
    assert set(zip(idx["model_id"], idx["image_id"], idx["target"], strict=True)) == {
        ("clf", "A00", "logit:A"), ("clf", "B00", "logit:B"), ("sub", "A00", "logit:A")}
    errors = run.errors()
    skipped = errors[(errors["stage"] == "explain") & (errors["error_kind"] == "skipped")]
    assert skipped["item_id"].tolist() == ["B00"] and '"model_id": "sub"' in skipped["key"].iloc[0]
    assert "class 'B'" in skipped["message"].iloc[0] and "'sub'" in skipped["message"].iloc[0]
    # an ensemble: A00 averages both members, B00 only clf (sub has no class B), in one batch of FAST's 2
    store = explain_maps(run, ExplainConfig(**base, models=models, ensemble=True))
    ens = store.index(model_id="ensemble", method="saliency")
    assert {r.image_id: json.loads(r.target_detail)["n_terms"] for r in ens.itertuples()} == {"A00": 2, "B00": 1}
    alone = store.index(model_id="clf", method="saliency", image_id="B00")
    ref = store.load_many(alone)
    np.testing.assert_allclose(store.load_many(ens[ens["image_id"] == "B00"]), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())  # float rounding of another batch size
    # explicit ids: the ones a model has are explained, a list it shares nothing with is refused
    n_maps = len(store)
    with pytest.raises(ConfigError, match=r"model 'clf': none of the cohort's 2 syndromes is a class of the model"):
        explain_maps(run, ExplainConfig(**base, models=[clf], syndromes="Y,Z"))
    for ids, message in ((["X", "Y"], r"model 'sub': none of the cohort's 3 syndromes is a class"),
                         (["A", "B", "C"], "lookup table has 3 syndromes but the classifier has 2 outputs"),
                         (["A", "A"], r"names syndromes \['A'\] for more than one class")):
        with pytest.raises(ConfigError, match=message):
            explain_maps(run, ExplainConfig(**base, models=[{"path": sub, "lookup_table": table(ids)}]))
    with pytest.raises(ConfigError, match=r"model 'sub': the model's 2 classes have no syndrome ids: declare its "
                                          "lookup table"):
        explain_maps(run, ExplainConfig(**base, models=[sub]))
    assert len(MapStore(run.path / "maps")) == n_maps
    # centroid targets need no classes: the same declaration works
    idx = explain_maps(run, ExplainConfig(**{**base, "target": "centroid"}, models=[sub])).index(target_kind="centroid")
    assert set(idx["model_id"]) == {"sub"} and len(idx) == 2 * 2
