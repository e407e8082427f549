"""Per-optimizer hyperparameters for the registry-wide contract tests.

Contract tests use the optimizer's defaults merged with the entry here (if
any): enough to exercise every state tensor (e.g. momentum on) and to make
the loss go down on the small test problem within the step budget. Add one
line per optimizer that needs it.
"""

CONTRACT_HP: dict[str, dict] = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": dict(lr=1e-2, weight_decay=1e-4),
    "adamw": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2),
    "rmsprop": dict(momentum=0.5, centered=True, weight_decay=1e-4),
}


def contract_hp(name: str) -> dict:
    return dict(CONTRACT_HP.get(name, {}))
