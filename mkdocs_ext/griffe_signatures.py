"""Griffe extension for the docs build: real constructor signatures for optimizers.

optimkit builds each optimizer's signature when the class is created
(``Optimizer.__init_subclass__``: ``params``, the class defaults, then the
common keywords), and stores it as ``cls.__signature__``. Static analysis only
sees the facade's generic ``__init__(params, *args, **hyperparameters)``, so
this extension imports optimkit after the package is loaded and gives every
registered class an ``__init__`` with that signature (documentation only;
nothing in the package changes).
"""
from __future__ import annotations

import inspect
from typing import Any

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


class OptimizerSignatures(griffe.Extension):
    """Replace each registered optimizer's documented ``__init__`` by its real signature."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Called once per loaded package; acts on ``optimkit`` only."""
        if pkg.name != "optimkit":
            return
        from optimkit.core.registry import _REGISTRY

        for cls in _REGISTRY.values():
            path = f"{cls.__module__}.{cls.__name__}"
            try:
                obj = loader.modules_collection[path]
            except KeyError:
                continue
            params = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
            sig = list(inspect.signature(cls).parameters.values())
            # keywords the facade's __init__ names itself (state_dir, ...), not in __signature__
            names = {p.name for p in sig}
            sig += [p for p in inspect.signature(cls.__init__).parameters.values()
                    if p.kind is p.KEYWORD_ONLY and p.name not in names]
            for p in sig:
                default = None if p.default is inspect.Parameter.empty else repr(p.default)
                params.append(griffe.Parameter(p.name, kind=_KINDS[p.kind], default=default))
            init = griffe.Function("__init__", parent=obj, parameters=griffe.Parameters(*params),
                                   lineno=obj.lineno, endlineno=obj.lineno)
            obj.set_member("__init__", init)
