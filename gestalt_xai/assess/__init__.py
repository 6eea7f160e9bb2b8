"""Assessment of explanations: are the maps faithful to the model, do they find the known causes, do they depend on
the model at all? One metric family per module (each metric a function on arrays with a :class:`~.metric.MetricInfo`):
:mod:`.faithfulness` (deletion / insertion, region perturbation and AOPC, occlusion agreement), :mod:`.localisation`
(relevance mass and rank accuracy, pointing game, Δscore-rank agreement, contrastivity, against region and change
masks), :mod:`.randomisation` (model-parameter and data randomisation sanity checks), :mod:`.robustness` (landmark
jitter) and :mod:`.compare` (map-to-map similarity, the one implementation every later stage uses). :mod:`.planted`
reads a synthetic cohort's truth. The ``assess`` stage (:mod:`.stage`) runs them on a run's map store.
"""
