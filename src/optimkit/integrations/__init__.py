"""Integrations of optimkit optimizers with training frameworks (importing optimkit imports none of them)."""
