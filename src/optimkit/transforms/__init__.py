"""Small, reusable building blocks of update rules (see core.transform)."""
from .adam import ScaleByAdam
from .cautious import Cautious
from .decay import WeightDecay
from .momentum import HeavyBall
from .orthogonalize import AuxAdamW, OrthogonalizedMomentum, newton_schulz

__all__ = ["AuxAdamW", "Cautious", "HeavyBall", "OrthogonalizedMomentum", "ScaleByAdam", "WeightDecay",
           "newton_schulz"]
