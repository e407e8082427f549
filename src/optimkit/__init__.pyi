"""Type stub of optimkit's top level: the names ``optimkit/__init__.py`` exports.

The registered optimizer classes are put into the package namespace by a loop over
the registry at import time, which type checkers cannot follow; this stub names each
one where it is defined. ``tests/test_packaging.py`` checks that it lists exactly
``optimkit.__all__`` (plus ``__version__``), each from the module that defines it.
"""

from . import checkpoint_io as checkpoint
from . import curvature as curvature
from . import scaling as scaling
from . import schedules as schedules
from .core.memory import memory_report as memory_report, state_bytes as state_bytes
from .core.optimizer import Optimizer as Optimizer
from .core.registry import available as available, create as create, info as info
from .core.transform import Transform as Transform
from .distributed.diloco import DiLoCo as DiLoCo
from .optimizers.adabelief import AdaBelief as AdaBelief
from .optimizers.adadelta import Adadelta as Adadelta
from .optimizers.adafactor import Adafactor as Adafactor
from .optimizers.adagrad import Adagrad as Adagrad
from .optimizers.adam import Adam as Adam, AdamW as AdamW, AMSGrad as AMSGrad
from .optimizers.adam_mini import AdamMini as AdamMini
from .optimizers.adamax import Adamax as Adamax
from .optimizers.adamp import AdamP as AdamP, SGDP as SGDP
from .optimizers.adamw_sn import AdamWSN as AdamWSN, AdamWSNSM as AdamWSNSM
from .optimizers.adan import Adan as Adan
from .optimizers.ademamix import AdEMAMix as AdEMAMix
from .optimizers.adopt import ADOPT as ADOPT
from .optimizers.came import CAME as CAME
from .optimizers.dadapt import DAdaptAdam as DAdaptAdam, DAdaptLion as DAdaptLion, DAdaptSGD as DAdaptSGD
from .optimizers.diffgrad import DiffGrad as DiffGrad
from .optimizers.dog import (
    DoG as DoG,
    DoWG as DoWG,
    LDoG as LDoG,
    PolynomialDecayAverager as PolynomialDecayAverager,
)
from .optimizers.grams import Grams as Grams
from .optimizers.hessian import AdaHessian as AdaHessian, SophiaG as SophiaG, SophiaH as SophiaH
from .optimizers.lamb import Lamb as Lamb, LARS as LARS
from .optimizers.lion import Lion as Lion
from .optimizers.mezo import MeZO as MeZO
from .optimizers.muon import Muon as Muon, muon_param_groups as muon_param_groups
from .optimizers.nadam import NAdam as NAdam
from .optimizers.polyak import (
    AdaGradNorm as AdaGradNorm,
    MomSPS as MomSPS,
    PSPS as PSPS,
    SPS as SPS,
    SPSmax as SPSmax,
)
from .optimizers.prodigy import Prodigy as Prodigy
from .optimizers.psgd_kron import PSGDKron as PSGDKron
from .optimizers.radam import RAdam as RAdam
from .optimizers.rmsprop import RMSprop as RMSprop
from .optimizers.schedule_free import (
    schedulefree_bn_update as schedulefree_bn_update,
    ScheduleFreeAdamW as ScheduleFreeAdamW,
    ScheduleFreeRAdam as ScheduleFreeRAdam,
    ScheduleFreeSGD as ScheduleFreeSGD,
)
from .optimizers.sgd import SGD as SGD
from .optimizers.sgd_sai import SGDSaI as SGDSaI
from .optimizers.shampoo import Shampoo as Shampoo
from .optimizers.sm3 import SM3 as SM3
from .optimizers.soap import SOAP as SOAP
from .optimizers.yogi import Yogi as Yogi
from .projection.apollo import APOLLO as APOLLO, APOLLOMini as APOLLOMini
from .projection.base import Projection as Projection
from .projection.frugal import FRUGAL as FRUGAL
from .projection.galore import GaLore as GaLore
from .qk_clip import QKClip as QKClip
from .scaling import param_groups as param_groups
from .schedule_free_wrapper import ScheduleFreeWrapper as ScheduleFreeWrapper

__version__: str
__all__: list[str]
