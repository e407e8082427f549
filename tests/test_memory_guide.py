"""benchmarks/memory_guide.py (the Memory guide's table): a short run's measured bytes
against the storage formulas of the codecs (docs/state_precision.md), computed here
from the model's tensor sizes, and placement rows equal to the device row."""
from __future__ import annotations

import contextlib
import io
import json
import math
import runpy
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_guide.py"
#: the script's MLP 64-256-256-256-10: (weight, bias) element counts per layer
LAYERS = [(256 * 64, 256), (256 * 256, 256), (256 * 256, 256), (10 * 256, 10)]
MIN_QUANT = 4096  # optimkit's default min_quant_size


def _expected(bytes_per_state) -> int:
    """AdamW's two states per tensor: quantized ones by ``bytes_per_state(n)``, tensors
    under ``MIN_QUANT`` elements in fp32."""
    total = 0
    for w, b in LAYERS:
        for n in (w, b):
            total += 2 * (bytes_per_state(n) if n >= MIN_QUANT else 4 * n)
    return total


@pytest.fixture(scope="module")
def rows():
    mod = runpy.run_path(str(SCRIPT))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert mod["main"](["--steps", "3", "--seeds", "0", "--json"]) == 0
    return {r["setting"]: r for r in json.loads(out.getvalue())["rows"]}


def test_bytes_match_the_codec_formulas(rows):
    n_params = sum(w + b for w, b in LAYERS)
    assert rows["fp32 (default)"]["n_params"] == n_params
    assert rows["fp32 (default)"]["state_bytes"] == 8 * n_params
    # bf16 applies to every tensor (min_quant_size is for the block-quantized codecs)
    assert rows['state_precision="bf16"']["state_bytes"] == 4 * n_params
    q8 = _expected(lambda n: n + 4 * math.ceil(n / 256))       # uint8 codes + fp32 absmax per 256
    assert rows['state_precision="q8"']["state_bytes"] == q8
    assert rows['state_precision="fp8"']["state_bytes"] == q8  # float8 codes, same blocks
    q4 = _expected(lambda n: math.ceil(n / 2) + 4 * math.ceil(n / 128))  # two codes a byte, blocks of 128
    assert rows['state_precision="q4"']["state_bytes"] == q4


def test_projections_hold_less_than_fp32(rows):
    fp32 = rows["fp32 (default)"]["state_bytes"]
    for label in ("projection=GaLore(rank=64)", "projection=APOLLO(rank=64)", "projection=APOLLOMini()",
                  "projection=FRUGAL(density=0.25)"):
        assert 0 < rows[label]["state_bytes"] < fp32, label
    galore, both = rows["projection=GaLore(rank=64)"], rows['GaLore(rank=64) + state_precision="q8"']
    assert both["state_bytes"] < galore["state_bytes"]
    assert rows["projection=APOLLOMini()"]["state_bytes"] < rows["projection=APOLLO(rank=64)"]["state_bytes"]


def test_placement_moves_bytes_not_results(rows):
    device = rows["fp32 (default)"]
    for label, where in (('state_placement="cpu"', "cpu"), ('state_placement="disk"', "disk")):
        row = rows[label]
        assert row["by_placement"] == {where: device["state_bytes"]}, label
        assert row["val_losses"] == device["val_losses"], label  # bit for bit
