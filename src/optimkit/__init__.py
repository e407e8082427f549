"""optimkit: training optimizers for PyTorch, one composable core.

    import optimkit as ok
    opt = ok.AdamW(model.parameters(), lr=3e-4)
    opt = ok.create("lion", model.parameters(), lr=1e-4)
    ok.available()
"""
from . import optimizers as _optimizers  # registers every optimizer
from .core import Optimizer, Transform, available, create, info
from .core.memory import memory_report, state_bytes
from .optimizers.dog import PolynomialDecayAverager
from .optimizers.muon import muon_param_groups
from .optimizers.schedule_free import schedulefree_bn_update
from .projection import APOLLO, FRUGAL, APOLLOMini, GaLore, Projection
from .qk_clip import QKClip
from .schedule_free_wrapper import ScheduleFreeWrapper
from . import curvature, scaling, schedules
from .scaling import param_groups
from .core.registry import _REGISTRY

try:  # the installed distribution's version; a source tree that is not installed says 0.1.0
    from importlib.metadata import PackageNotFoundError as _NotFound, version as _version
    __version__ = _version("optimkit")
except _NotFound:
    __version__ = "0.1.0"

for _cls in _REGISTRY.values():
    globals()[_cls.__name__] = _cls

__all__ = sorted(["APOLLO", "APOLLOMini", "curvature", "FRUGAL", "GaLore", "Optimizer", "PolynomialDecayAverager", "Projection", "QKClip", "ScheduleFreeWrapper", "Transform", "available", "create", "info", "memory_report",
                  "muon_param_groups", "param_groups", "scaling", "schedules", "schedulefree_bn_update", "state_bytes"]
                 + [c.__name__ for c in _REGISTRY.values()])

# distributed training (docs/distributed.md)
from .distributed import DiLoCo  # noqa: E402
__all__ = sorted(__all__ + ["DiLoCo"])
# asynchronous, atomic checkpoints (docs/checkpointing.md); optimkit.core.checkpoint is the state-dict format
from . import checkpoint_io as checkpoint  # noqa: E402
__all__ = sorted(__all__ + ["checkpoint"])
