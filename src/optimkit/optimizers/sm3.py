"""SM3: memory-efficient adaptive optimization with cover-wise accumulators."""
from __future__ import annotations

from ..core import validation as V
from ..core.optimizer import Optimizer
from ..transforms.factored import EMA
from ..transforms.sm3 import ScaleBySM3


class SM3(Optimizer):
    r"""SM3 (SM3-II), optionally with momentum and an exponential moving average.

    Update (as ``pytorch_optimizer.SM3``) for a tensor of rank ``r`` with one
    accumulator ``a_i`` per dim (a vector of ``n_i`` numbers, broadcast along the other dims)::

        nu = min_i a_i + g^2                      (beta = 0, the paper's SM3-II)
        nu = beta min_i a_i + (1 - beta) g^2      (beta > 0)
        a_i <- max of nu over all dims but i      (beta > 0: running max with a_i)
        u = g / sqrt(nu + eps)
        m <- momentum m + (1 - momentum) u;  u = m        (momentum > 0)
        theta <- theta - lr u

    A vector has a single cover per element (it is Adagrad); a matrix keeps
    ``rows + cols`` numbers. State: ``accumulator`` (all covers in one flat tensor),
    ``momentum_buffer`` (momentum > 0).

    Paper: Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization"
    (NeurIPS 2019). Checked against ``pytorch_optimizer.SM3``.
    """

    name = "sm3"
    family = "memory"
    paper = "Memory-Efficient Adaptive Optimization"
    reference = "pytorch_optimizer.SM3"
    state_bytes = 0.0  # sum(shape) / numel * 4; +4 with momentum
    has_momentum = True
    defaults = dict(lr=1e-1, momentum=0.0, beta=0.0, eps=1e-30)
    rules = {"momentum": V.unit, "beta": V.closed_unit}

    def build(self):
        return [ScaleBySM3(), EMA("momentum", "momentum_buffer")]
