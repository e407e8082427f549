"""LAMB and LARS: layer-wise adaptive large-batch optimizers."""
from __future__ import annotations

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.trust_ratio import LambTrustRatio, LarsTrustRatio, ScaleByLambMoments
from ..transforms.zero_init_momentum import ZeroInitMomentum


class Lamb(Optimizer):
    r"""LAMB: Adam direction rescaled per tensor by a trust ratio.

    Update (as ``torch_optimizer.Lamb``)::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2      (no bias correction)
        r <- m / (sqrt(v) + eps) + wd theta
        trust <- min(||theta||, clamp_value) / ||r||            (1 if either norm is 0; 1 if adam)
        theta <- theta - lr s trust r,   s = sqrt(1 - b2^t) / (1 - b1^t) if debias else 1

    Paper: You et al., "Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes" (ICLR 2020). Checked against ``torch_optimizer.Lamb`` (pip ``torch-optimizer``),
    where ``clamp_value``, ``adam`` and ``debias`` are constructor options; here they are
    per-group hyperparameters. Pitfall: ``pytorch_optimizer.Lamb`` is another variant
    (decoupled decay outside the trust ratio by default, step size lr / (1 - b1^t),
    ``||r|| + eps`` in the ratio) and does not match.
    """

    name = "lamb"
    paper = "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
    reference = "torch_optimizer.Lamb"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, clamp_value=10.0,
                    adam=False, debias=False)
    rules = {"clamp_value": v.nonneg}

    def build(self):
        return [ScaleByLambMoments(), WeightDecay(), LambTrustRatio()]


class LARS(Optimizer):
    r"""LARS: SGD with momentum and a layer-wise local learning rate.

    Update (as ``pytorch_optimizer.LARS``)::

        for tensors with ndim > 1 (all tensors if exclude_1d=False):
            local <- c ||theta|| / (||g|| + wd ||theta||)      (1 if ||theta|| or the denominator is 0)
            g <- local (g + wd theta)
        (other tensors: g unchanged, no weight decay)
        b <- mu b + (1 - dampening) g                          (b starts at 0)
        theta <- theta - lr (g + mu b if nesterov else b)

    Paper: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (2017).
    Checked against ``pytorch_optimizer.LARS`` (pip ``pytorch-optimizer``) and the paper's
    equations. (``bitsandbytes.optim.LARS`` is a different rule: SGD with update-norm
    clipping ``max_unorm``, no trust coefficient.)
    """

    name = "lars"
    paper = "Large Batch Training of Convolutional Networks"
    reference = "pytorch_optimizer.LARS"
    state_bytes = 4
    has_momentum = True
    defaults = dict(lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0, trust_coefficient=1e-3,
                    nesterov=False, exclude_1d=True)
    rules = {"trust_coefficient": v.nonneg}

    def check(self, group):
        if group.get("projection") is not None and group["weight_decay"] != 0:
            raise ValueError("Invalid projection: LARS adds weight_decay * param to the gradient inside its "
                             "trust ratio, which has no projected form; use weight_decay=0")

    def build(self):
        return [LarsTrustRatio(), ZeroInitMomentum()]
