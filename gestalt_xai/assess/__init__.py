"""Assessment of explanations against known answers.

:mod:`.planted` checks aggregate results against the ground truth of a synthetic cohort (``cohort/truth/``, written
by :mod:`gestalt_xai.data.synthetic.truth`): does a syndrome's top facial region hold one of its planted features,
and does SpRAy split a confounded syndrome on its cue? The assess stage of a later issue takes these checks over; the
aggregate stage (:mod:`gestalt_xai.aggregate.stage`) still calls them for now.
"""
