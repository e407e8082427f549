"""Small, reusable building blocks of update rules (see core.transform)."""
from .adam import ScaleByAdam
from .cautious import Cautious
from .decay import WeightDecay
from .momentum import HeavyBall

__all__ = ["Cautious", "HeavyBall", "ScaleByAdam", "WeightDecay"]
