"""Measured optimizer-state memory: ``state_bytes`` and ``memory_report``.

Bytes are counted from the tensors actually held in ``optimizer.state``
(codes, scales, factored vectors, projector matrices, compensation buffers,
step counters), not estimated from formulas, and split by where they live:
the device type of the tensor, or ``"disk"`` for file-backed (memory-mapped)
state.
"""
from __future__ import annotations

from collections import defaultdict

from torch import Tensor


def _placement(t: Tensor, disk_ids: set[int]) -> str:
    # the id alone could be a freed mapped tensor's, reused (core.placement.Placement.on_disk)
    if id(t) in disk_ids and t.device.type == "cpu" and getattr(t.untyped_storage(), "filename", None):
        return "disk"
    return t.device.type


def _disk_ids(opt) -> set[int]:
    placement = getattr(opt, "_placement", None)
    return set(placement.disk_tensors) if placement is not None else set()


def state_bytes(opt, by_placement: bool = False):
    """Total bytes of optimizer state held by ``opt`` (a dict by placement if asked)."""
    disk = _disk_ids(opt)
    out: dict[str, int] = defaultdict(int)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                out[_placement(v, disk)] += v.numel() * v.element_size()
    return dict(out) if by_placement else sum(out.values())


def group_rows(opt) -> list[dict]:
    disk = _disk_ids(opt)
    rows = []
    for i, group in enumerate(opt.param_groups):
        n_params = sum(p.numel() for p in group["params"])
        by: dict[str, int] = defaultdict(int)
        for p in group["params"]:
            for v in opt.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    by[_placement(v, disk)] += v.numel() * v.element_size()
        total = sum(by.values())
        rows.append({"group": i, "params": n_params, "precision": str(group.get("state_precision", "fp32")),
                     "projection": repr(group.get("projection")) if group.get("projection") is not None else "-",
                     "placement": group.get("state_placement", "device"),
                     "state_bytes": total, "bytes_per_param": total / n_params if n_params else 0.0,
                     "by_placement": dict(by)})
    return rows


def memory_report(opt, file=None) -> str:
    """Print (and return) a table of state memory per param group."""
    rows = group_rows(opt)
    header = f"{'group':>5} {'params':>12} {'precision':>22} {'placement':>9} {'state MiB':>10} {'B/param':>8}  projection"
    lines = [f"{type(opt).__name__} optimizer state (measured)", header]
    for r in rows:
        lines.append(f"{r['group']:>5} {r['params']:>12,} {r['precision'][:22]:>22} {r['placement']:>9} "
                     f"{r['state_bytes'] / 2**20:>10.3f} {r['bytes_per_param']:>8.3f}  {r['projection']}")
    total = sum(r["state_bytes"] for r in rows)
    n = sum(r["params"] for r in rows)
    lines.append(f"{'all':>5} {n:>12,} {'':>22} {'':>9} {total / 2**20:>10.3f} {total / n if n else 0:>8.3f}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
