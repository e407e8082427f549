"""Integrations with training frameworks, imported on demand.

    from optimkit.integrations.hf import create_optimizer   # transformers.Trainer
    from optimkit.integrations.lightning import ScheduleFreeCallback   # Lightning

Importing :mod:`optimkit` or this package imports no framework: each
integration module is loaded on first use (``optimkit.integrations.hf``), and
the framework itself only where a function needs it.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["hf", "lightning"]


def __getattr__(name: str) -> Any:
    """Load an integration submodule (``hf``, ``lightning``) on first attribute access."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
