"""Synthetic cohort: procedurally rendered faces of no real person with planted, HPO-coded phenotypes.

Modules, one concept each:

- :mod:`.face_model`: face shape parameters, geometry in a face-centred frame, projection, 5/68 landmarks
- :mod:`.identity`: random identities (shape, skin/eye/hair colour, age-like proportions) and photo conditions
- :mod:`.renderer`: the OpenCV painter that turns a face into a raw JPEG photo (on a :mod:`.canvas`)
- :mod:`.phenotypes`: the HPO-coded feature catalogue, truth-mask regions and syndrome design
- :mod:`.cohort`: :class:`SynthConfig` and :func:`synth_stage` (GMDB files + ``truth/``)
- :mod:`.counterfactuals`: the same photos with planted features removed or the mark changed, and change masks
- :mod:`.truth`: reading the ground truth back (:func:`load_truth`, :func:`load_masks`)
- :mod:`.preview`: the montage of one face per syndrome; :mod:`.data_card`: the generated datasheet
"""

from gestalt_xai.data.synthetic.cohort import (
    CONTROL_ID,
    ConfounderConfig,
    SynthConfig,
    generate_cohort,
    plan_cohort,
    render_image,
    synth_stage,
)
from gestalt_xai.data.synthetic.data_card import write_data_card
from gestalt_xai.data.synthetic.phenotypes import PHENOTYPES, Feature, Syndrome
from gestalt_xai.data.synthetic.preview import render_preview
from gestalt_xai.data.synthetic.renderer import render_photo
from gestalt_xai.data.synthetic.truth import TruthTables, load_masks, load_truth

__all__ = [
    "CONTROL_ID",
    "ConfounderConfig",
    "Feature",
    "PHENOTYPES",
    "SynthConfig",
    "Syndrome",
    "TruthTables",
    "generate_cohort",
    "load_masks",
    "load_truth",
    "plan_cohort",
    "render_image",
    "render_photo",
    "render_preview",
    "synth_stage",
    "write_data_card",
]
