"""The problems the FSDP2 / DCP tests and their rank-side code (fsdp_worker.py) share:
models, data, synthetic gradients. The ranks are launched by ``dist_helpers.run_ranks``
(``run_ranks(fsdp_worker.on_mesh, 2, "<function>", *args)``)."""
from __future__ import annotations


import torch


#: parameter shapes of the synthetic problems: (128, 64) shards hold whole 256-blocks on
#: 2 ranks (64 x 64 = 16 blocks each); (10, 128) shards do not (640 elements); (7,) is
#: split unevenly (4 + 3); (1, 4) leaves rank 1 an empty shard
SHAPES = {"a": (128, 64), "b": (10, 128), "c": (7,), "d": (1, 4)}
ALIGNED = {"a"}
#: the checkpoint tests' shapes: (1, 4)'s flattened shards (4 + 0) are not even chunks, so
#: Prodigy's flattened state of it has no distributed layout (ValueError)
DCP_SHAPES = {k: v for k, v in SHAPES.items() if k != "d"}


class Params(torch.nn.Module):
    """A module holding the synthetic problem's parameters (names ``a``..``d``)."""

    def __init__(self, shapes=SHAPES, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(shape, generator=g)))


def chunk_rows(n: int, ws: int, rank: int) -> slice:
    """The dim-0 rows of ``rank`` under ``Shard(0)`` (torch.chunk sizes)."""
    c = -(-n // ws) if n else 0
    start = min(n, rank * c)
    return slice(start, min(n, start + c))


def set_synthetic_grads(module: torch.nn.Module, step: int) -> None:
    """Gradients that depend on the parameter element-wise plus seeded noise of the
    global shape: ``g = 0.3 p + noise_step`` (identical bits for every sharding)."""
    for i, (name, p) in enumerate(module.named_parameters()):
        gen = torch.Generator().manual_seed(1000 * step + i)
        noise = torch.randn(p.shape, generator=gen)
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            rows = chunk_rows(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
            local = 0.3 * p.to_local().detach() + noise[rows]
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
        else:
            p.grad = 0.3 * p.detach() + noise


def mlp(seed: int = 0) -> torch.nn.Module:
    """The model of the FSDP2 training runs (first weight: whole blocks per shard)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))


def batches(steps: int, n: int = 32):
    """The global batches (x, y) of the training runs."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 64, generator=g), torch.randn(n, 10, generator=g)) for _ in range(steps)]


def full(t):
    """A DTensor gathered to a full tensor (dtypes gloo does not gather travel as
    float32 or int32, exactly); a plain tensor as is."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32):
        return t.full_tensor()
    from torch.distributed.tensor import DTensor

    wide = torch.float32 if t.dtype.is_floating_point else torch.int32
    local = t.to_local().to(wide)
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride()).full_tensor().to(t.dtype)
