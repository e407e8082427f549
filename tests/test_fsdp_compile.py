"""FSDP2 with ``compile=True`` (slow: Inductor compiles on both ranks and here): the
kernel is compiled on the plain local shards and equals the unsharded compiled step
bit for bit (fp32 and q8 state whose shards hold whole blocks)."""
from __future__ import annotations

import pytest
import torch

import fsdp_worker
from dist_helpers import run_ranks
from test_fsdp import check_exact

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]

CASES = [
    ("adamw-compile", "adamw", dict(lr=1e-2, weight_decay=0.1, compile=True)),
    ("lion-q8-compile", "lion", dict(lr=1e-3, state_precision="q8", min_quant_size=4096, compile=True)),
]


@pytest.fixture(scope="module")
def ranks():
    from test_fsdp import EXACT_STEPS

    return run_ranks(fsdp_worker.on_mesh, 2, "exact_cases", CASES, EXACT_STEPS, timeout=600)[0]


@pytest.mark.parametrize("key,name,hp", CASES, ids=[c[0] for c in CASES])
def test_compiled_sharded_steps_bit_exact(ranks, key, name, hp):
    check_exact(ranks[key], key, name, hp)
