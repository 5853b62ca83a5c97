"""Training ConVLM on labelled ROI patches (``wsi-pipeline train``).

>>> from wsi_pipeline.train import TrainConfig, train_model
>>> res = train_model(TrainConfig("rois/", "configs/prompts/demo_train.yaml", "run/"))  # doctest: +SKIP

Modules: :mod:`.config` (options), :mod:`.data` (ROI tables, balanced sampling, image
augmentation), :mod:`.text` (prompt sampling and text augmentation), :mod:`.loss` (the
objective and context modes), :mod:`.loop` (optimiser, schedule, outputs),
:mod:`.evaluation` (validation as inference does it), :mod:`.progress` (progress hooks),
:mod:`.slide_rois` (labelled patches cut from synthetic slides), :mod:`.heldout`
(held-out evaluation used for the model card).
"""

from .config import TrainConfig
from .data import Augment, RoiTable, load_roi_table
from .evaluation import evaluate
from .loop import TrainResult, train_model
from .loss import CONTEXT_MODES, LossWeights, convlm_loss
from .progress import NullTrainProgress, TqdmTrainProgress, TrainProgress
from .text import PromptSampler, TextAugment

__all__ = [
    "CONTEXT_MODES",
    "Augment",
    "LossWeights",
    "NullTrainProgress",
    "PromptSampler",
    "RoiTable",
    "TextAugment",
    "TqdmTrainProgress",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "convlm_loss",
    "evaluate",
    "load_roi_table",
    "train_model",
]
