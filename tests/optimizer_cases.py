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
    "adafactor": dict(beta1=0.9, weight_decay=1e-4),
    "came": dict(weight_decay=1e-2),
    "sm3": dict(momentum=0.9, beta=0.9),
    "adam_mini": dict(lr=1e-2, weight_decay=1e-4),
    "adamw_sn": dict(lr=1e-2, weight_decay=1e-4),
    "sn_sm": dict(lr=1e-2, weight_decay=1e-4, rank=2, interval=3),
    "rmsprop": dict(momentum=0.5, centered=True, weight_decay=1e-4),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "adan": dict(lr=1e-2, weight_decay=0.02, max_grad_norm=1.0),
    "adabelief": dict(lr=1e-2, weight_decay=1e-4),
    "diffgrad": dict(lr=1e-2, weight_decay=1e-4),
    "yogi": dict(weight_decay=1e-4),
    "adopt": dict(lr=1e-2, weight_decay=1e-4),
    "adamp": dict(lr=1e-2, weight_decay=1e-4),
    "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-4),
    "grams": dict(lr=1e-2, weight_decay=1e-4),
    "lamb": dict(lr=1e-2, weight_decay=1e-4),
    "lars": dict(lr=0.2, trust_coefficient=0.1, weight_decay=1e-4),
    "ademamix": dict(lr=1e-2, weight_decay=1e-4, alpha_warmup=20, beta3_warmup=20),
    # fp32 Newton-Schulz: the contract's 1e-6 compiled-vs-eager bar is for fp32 arithmetic
    # (the default bf16 iteration is checked in test_muon.py)
    "muon": dict(lr=0.02, ns_dtype="fp32"),
    # grafted and with a ridge: without them inverse roots of rank-deficient factors amplify
    # rounding differences (compiled vs eager) far above the 1e-6 contract bar
    "shampoo": dict(lr=1e-2, grafting="adam", epsilon=1e-2),
    # the silent phase would leave the first ~5 steps without any update
    "schedulefree_radam": dict(silent_sgd_phase=False),
    # update_hessian is never called by the contract tests: sign-momentum steps, so a smaller lr
    "sophia_g": dict(lr=1e-2),
    # a refresh every 3 steps and weight decay: every state path within the short runs
    "sophia_h": dict(update_period=3, weight_decay=1e-4),
    "adahessian": dict(lr=0.1, weight_decay=1e-4, update_each=2),
    # with its defaults DAdaptAdam overshoots on the contract MLP (as dadaptation does)
    "dadapt_adam": dict(use_bias_correction=True),
    # reps_rel 1e-6 makes first steps far below a bf16 weight's spacing: bf16 params never move
    "dog": dict(reps_rel=1e-3),
    "ldog": dict(reps_rel=1e-3),
}


def contract_hp(name: str) -> dict:
    return dict(CONTRACT_HP.get(name, {}))


def gradient_names() -> list[str]:
    """Registered optimizers that step on gradients alone: every one but the
    zeroth-order rules (MeZO) and those that need the loss from a closure (Polyak
    step sizes), which have their own tests (tests/test_mezo.py, test_polyak.py)."""
    import optimkit as ok

    return [n for n in ok.available()
            if not (ok.info(n).cls.gradient_free or ok.info(n).cls.requires_closure)]
