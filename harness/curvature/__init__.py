"""The curvature engine: GGN eigenvalues per parameter group from Gram matrices.

It imports neither Hydra nor MLflow: it takes a model, a loss, a batch and parameter groups and
returns tensors, so it can be used from a notebook.
"""

from harness.curvature.eigen import GroupCurvature, compute_curvature
from harness.curvature.exact import exact_ggn
from harness.curvature.gram import GramAccumulator, compute_grams, gram_eigvals
from harness.curvature.memory import MemoryBudgetError, MemoryEstimate, estimate_memory
from harness.curvature.validation import ValidationResult, compare_eigvals

__all__ = [
    "GramAccumulator",
    "GroupCurvature",
    "MemoryBudgetError",
    "MemoryEstimate",
    "ValidationResult",
    "compare_eigvals",
    "compute_curvature",
    "compute_grams",
    "estimate_memory",
    "exact_ggn",
    "gram_eigvals",
]
