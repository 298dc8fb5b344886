"""The fast path: the same detector computed faster, in training and at inference
(docs/accel.md). One module per mechanism; plan.py holds the entry points and the
per-device choice."""
from detection.accel.fold import fold_frozen_bn
from detection.accel.levers import COMPILE_MODES, Levers
from detection.accel.plan import (InferencePlan, TrainingPlan, apply_plan, apply_training_plan, inference_plan,
                                  install_runner, optimize_for_inference, optimize_for_training, to_channels_last,
                                  training_plan)
from detection.accel.res5 import AUTO, CHUNK_BINS, chunk_rois

__all__ = ["AUTO", "CHUNK_BINS", "COMPILE_MODES", "InferencePlan", "Levers", "TrainingPlan", "apply_plan",
           "apply_training_plan", "chunk_rois",
           "fold_frozen_bn", "inference_plan", "install_runner", "optimize_for_inference", "optimize_for_training",
           "to_channels_last", "training_plan"]
