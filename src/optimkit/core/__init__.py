from .optimizer import Optimizer
from .registry import available, create, info, register
from .tensorlist import Ratio, TensorList, dense
from .transform import Context, Transform

__all__ = ["Context", "Optimizer", "Ratio", "TensorList", "Transform", "available", "create",
           "dense", "info", "register"]
