"""Ground truth and its comparison: leave-one-out retraining (resumable), correlation and
agreement metrics, and the linear datamodeling score.
"""

from .loo import lbfgs_trainer, leave_one_out, newton_trainer
from .metrics import LDSResult, lds, pearson, sign_agreement, spearman, topk_overlap

__all__ = ["leave_one_out", "lbfgs_trainer", "newton_trainer", "pearson", "spearman", "topk_overlap", "sign_agreement", "lds", "LDSResult"]
