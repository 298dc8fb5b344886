"""The ResNet paper's plain-vs-residual and shortcut-option experiments as a detection study
(`tools/study.py`): `run.py` trains and evaluates the variants, `report.py` writes the table
and the plot. `ablation.py`: the rows of the paper's Table 9 that `tools/ablate.py` evaluates."""
from detection.study.run import (STUDIES, StudyError, StudyOptions, Variant, backbone_cost, final_loss,
                                 run_study, study_variants)

__all__ = ["STUDIES", "StudyError", "StudyOptions", "Variant", "backbone_cost", "final_loss", "run_study",
           "study_variants"]
