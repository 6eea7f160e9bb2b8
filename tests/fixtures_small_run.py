"""A small finished run for tests that read a run the way a user does (the notebooks, reports): the session's
``trained_run`` copied, then match, explain (three gradient methods on the test patients, through the trained model
and through its random-weight twin), aggregate, assess and a simulated eye-tracking study, each run tiny through the
stages' own entry functions. About 10 s on two busy cores on top of ``trained_run``.

Import the fixture into a test module (``from fixtures_small_run import small_run``); never write into the run:
copy it first (``shutil.copytree``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gestalt_xai.runs import Run, torch_threads

#: the explained methods (the gradient family's cheapest three: one shared pass)
METHODS = ["gradcam", "saliency", "input_x_gradient"]
#: model id of the random-weight control
CONTROL = "random_init"


def build_small_run(source: Run, dest: Path) -> Run:
    """Copy ``source`` (a run with a trained model and its embeddings) to ``dest`` and run the later stages on it."""
    from gestalt_xai.aggregate.stage import aggregate_stage
    from gestalt_xai.assess.stage import assess_stage
    from gestalt_xai.attribution.explain import explain_stage
    from gestalt_xai.experiments.eyetracking.stage import eyetrack_stage
    from gestalt_xai.matching.stage import match_stage
    from gestalt_xai.models.embed import embed_stage

    run = Run(shutil.copytree(source.path, dest))
    (model,) = run.models()
    control = {"path": str(model.path), "id": CONTROL, "randomise": True}
    # one torch thread: on cores shared with other work, a second thread spins more than it computes (≈ 3× the CPU)
    with torch_threads(1):
        embed_stage(run, {"models": [str(model.path), control], "tta": False})
        match_stage(run, {})
        explain_stage(run, {"methods": METHODS, "images": "test", "overlay": 0})
        explain_stage(run, {"models": [control], "methods": METHODS, "images": "test", "overlay": 0},
                      instance="random-control")
        aggregate_stage(run, {"min_subjects": 2, "normalisations": ["max-abs"], "strata": [], "figures": False})
        assess_stage(run, {"max_patients": 4, "faithfulness": {"steps": 4, "curves": ["deletion", "insertion"]},
                           "randomisation": {"enabled": False}, "robustness": {"enabled": False}, "strata": [],
                           "figures": False})
        eyetrack_stage(run, {"simulate": {"observers": {"expert": 3, "non_clinician": 3}, "images_per_syndrome": 1},
                             "borji_splits": 10, "figures": False})
    return run


@pytest.fixture(scope="session")
def small_run(trained_run, tmp_path_factory) -> Run:
    """A finished small run (see the module docstring), built once per session."""
    return build_small_run(trained_run, tmp_path_factory.mktemp("small_run") / "run")
