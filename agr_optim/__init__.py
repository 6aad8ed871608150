"""agr_optim: Adaptive Gradient Reconstruction (Tong et al., ACM MM 2024) as a drop-in optimizer."""

from . import functional
from ._citation import CITATION
from ._monitor import StatsAccumulator
from ._optimizer import AGROptimizer, strip_agr_state
from ._stats import ReconstructionStats

__all__ = [
    "AGROptimizer",
    "ReconstructionStats",
    "functional",
    "strip_agr_state",
    "StatsAccumulator",
    "CITATION",
    "__version__",
]

__version__ = "0.1.0"
