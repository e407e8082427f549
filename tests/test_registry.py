"""The registry: names, metadata, creation, errors."""
from __future__ import annotations

import inspect

import pytest
import torch

import optimkit as ok
from optimkit.core.optimizer import Optimizer


def test_available_is_sorted_and_complete():
    names = ok.available()
    assert names == sorted(names) and len(names) >= 22
    for n in ["sgd", "adam", "adamw", "amsgrad", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adadelta",
              "lion", "adan", "adabelief", "diffgrad", "adamp", "sgdp", "grams", "lamb", "lars", "adopt",
              "ademamix", "yogi"]:
        assert n in names


def test_every_optimizer_class_is_registered_and_exported():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in subclasses(Optimizer):
        # private bases (a leading underscore) share code between registered optimizers
        if cls.__module__.startswith("optimkit.optimizers") and not cls.__name__.startswith("_"):
            assert cls.name and ok.info(cls.name).cls is cls, cls
            assert getattr(ok, cls.__name__) is cls


@pytest.mark.parametrize("name", ok.available())
def test_info_and_docstring(name):
    info = ok.info(name)
    assert info.name == name and info.paper and info.reference and info.family
    assert info.state_bytes >= 0
    doc = inspect.getdoc(info.cls)
    assert doc and len(doc) > 80, f"{name} needs a docstring with its update rule, paper and reference"
    # the generated signature lists every hyperparameter with its default
    sig = inspect.signature(info.cls)
    for key, value in info.defaults.items():
        assert sig.parameters[key].default == value


def test_create_passes_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = ok.create("adamw", p, lr=0.5, betas=(0.8, 0.9))
    assert isinstance(opt, ok.AdamW) and isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert ok.create("AdamW", p).__class__ is ok.AdamW  # case-insensitive


def test_unknown_name_lists_the_closest():
    with pytest.raises(KeyError, match="adamw"):
        ok.create("adamww", [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(KeyError, match="unknown optimizer"):
        ok.info("no-such-thing")
    with pytest.raises(TypeError):
        ok.create(3, [])
