"""The benchmark protocol: optimizer specs, suites, and the per-study trial plan.

A *study* is one optimizer on one workload in one track:

* **external tuning** track: ``n_trials`` learning rates (a log-spaced grid,
  or Optuna's TPE sampler) around the optimizer's default learning rate, each
  run on the tuning seeds and stopped at the target; the learning rate with
  the best tuning objective (fewest steps to target; if none reached it, the
  best metric) is then rerun for the full step budget on held-out seeds;
* **self-tuning** track: the optimizer's defaults only, run on the held-out
  seeds with ``self_budget_factor`` times the step budget (AlgoPerf gives
  self-tuning submissions a larger budget in exchange for no tuning).

Other hyperparameters stay at the optimizer's defaults (or at the values
given in the optimizer spec, e.g. ``sgd:momentum=0.9``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .runner import TrialSpec
from .workloads import Workload, get_workload

__all__ = ["OptimizerSpec", "BenchConfig", "Study", "SUITES", "parse_optimizer_list",
           "tuning_objective", "BenchError"]


class BenchError(Exception):
    """A user-facing error (bad input): the CLI prints it on one line and exits 2."""


# --------------------------------------------------------------------------- optimizer specs
def _parse_value(text: str, default: Any, key: str, label: str):
    t = text.strip()
    low = t.lower()
    try:
        if isinstance(default, bool) or low in ("true", "false"):
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, tuple) or "/" in t:
            return tuple(float(x) for x in t.split("/"))
        if isinstance(default, int) and not isinstance(default, bool):
            return int(t)
        if isinstance(default, str):
            return t
        if low in ("none", "null"):
            return None
        return float(t)
    except ValueError:
        if default is None or isinstance(default, str):
            return t
        raise BenchError(f"bad value {text!r} for {key} in optimizer spec {label!r}") from None


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as the bench names it: ``name[:key=value,key=value]``.

    Tuple values are written with ``/`` (``betas=0.9/0.99``).
    """

    label: str
    name: str
    hparams: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> "OptimizerSpec":
        import optimkit

        text = text.strip()
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name:
            raise BenchError(f"empty optimizer name in {text!r}")
        try:
            info = optimkit.info(name)
        except KeyError as exc:
            raise BenchError(str(exc.args[0]) if exc.args else f"unknown optimizer {name!r}") from None
        defaults = info.cls.all_defaults()
        hp: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise BenchError(f"bad optimizer spec {text!r}: expected key=value, got {item!r}")
            if key not in defaults:
                raise BenchError(f"unknown hyperparameter {key!r} for optimizer {info.name!r} "
                                 f"(has: {', '.join(defaults)})")
            hp[key] = _parse_value(value, defaults[key], key, text)
        label = info.name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in hp.items()) if hp else "")
        spec = cls(label=label, name=info.name, hparams=hp)
        spec.validate()
        return spec

    @property
    def default_lr(self) -> float:
        import optimkit

        lr = self.hparams.get("lr", optimkit.info(self.name).defaults.get("lr", 1e-3))
        return float(lr)

    def validate(self) -> None:
        """Build the optimizer once on a tiny parameter: bad hyperparameters fail here."""
        import torch

        import optimkit

        try:
            optimkit.create(self.name, [torch.nn.Parameter(torch.zeros(2))], **self.hparams)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"optimizer spec {self.label!r}: {exc}") from None


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "/".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def parse_optimizer_list(items: Iterable[str]) -> list[str]:
    """Split CLI arguments into spec strings.

    Specs are separated by commas or spaces; a comma-separated piece holding
    ``=`` but no ``:`` continues the previous spec's hyperparameters, so
    ``adamw,sgd:momentum=0.9,nesterov=true,lion`` is three specs.
    """
    out: list[str] = []
    for item in items:
        for piece in item.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece and ":" not in piece and out:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


# --------------------------------------------------------------------------- suites and config
@dataclass(frozen=True)
class SuiteDefaults:
    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    search: str = "grid"
    n_trials: int = 8
    tune_seeds: tuple[int, ...] = (0,)
    eval_seeds: tuple[int, ...] = (1000, 1001)
    tracks: tuple[str, ...] = ("external", "self")
    description: str = ""


#: Popular optimizers compared by the quick suite (unregistered ones are skipped with a note).
QUICK_OPTIMIZERS = ("adamw", "sgd:momentum=0.9", "nadam", "radam", "lion", "adagrad", "rmsprop",
                    "adan", "adabelief", "adopt", "muon", "prodigy", "schedulefree_adamw")
#: ... plus the geometry-aware and second-order optimizers where this optimkit has them
STANDARD_OPTIMIZERS = QUICK_OPTIMIZERS + (
    "adam", "sgd:momentum=0.9,nesterov=true", "adamax", "yogi", "diffgrad", "adamp", "lamb",
    "ademamix", "grams", "adafactor", "came",
    "soap", "shampoo", "psgd_kron", "sophia_h", "adahessian")

SUITES: dict[str, SuiteDefaults] = {
    "quick": SuiteDefaults(
        workloads=("rosenbrock", "quadratic", "noisy_quadratic", "logreg_cancer", "mlp_digits",
                   "autoencoder_digits", "char_lm_small"),
        optimizers=QUICK_OPTIMIZERS, n_trials=8, tune_seeds=(0,), eval_seeds=(1000, 1001, 1002),
        description="7 fast workloads (one a small transformer LM), 13 popular optimizers, "
                    "8-point lr grid, 3 held-out seeds (5-6 minutes with --jobs 2, 11 on one core)"),
    "standard": SuiteDefaults(
        workloads=("rosenbrock", "quadratic", "noisy_quadratic", "logreg_cancer", "mlp_digits",
                   "cnn_digits", "autoencoder_digits", "char_lm_small", "char_lm"),
        optimizers=STANDARD_OPTIMIZERS, n_trials=8, tune_seeds=(0,),
        eval_seeds=(1000, 1001, 1002),
        description="all 9 workloads, up to 29 optimizers, 8-point lr grid, 3 held-out seeds "
                    "(about an hour on 2 cores; use --jobs or --backend ray)"),
}

#: The tuned learning rate ranges over [default * LO, default * HI]; with 8 points
#: the grid is default * 10^k for k = -1, -0.5, ..., 2.5.
DEFAULT_LR_RANGE = (0.1, 10 ** 2.5)


@dataclass
class BenchConfig:
    """Everything that defines a bench run's results (hashed to resume it)."""

    suite: str
    workloads: list[str]
    optimizers: list[OptimizerSpec]
    search: str = "grid"
    n_trials: int = 8
    tune_seeds: tuple[int, ...] = (0,)
    eval_seeds: tuple[int, ...] = (1000, 1001)
    tracks: tuple[str, ...] = ("external", "self")
    lr_range: tuple[float, float] = DEFAULT_LR_RANGE
    self_budget_factor: float = 1.5
    budget_scale: float = 1.0
    skipped: list[str] = field(default_factory=list)   # suite optimizers not registered

    def __post_init__(self) -> None:
        if self.search not in ("grid", "tpe"):
            raise BenchError(f"unknown search {self.search!r} (grid or tpe)")
        if self.n_trials < 1:
            raise BenchError(f"--trials must be at least 1, got {self.n_trials}")
        if not self.eval_seeds:
            raise BenchError("at least one evaluation seed is needed")
        if "external" in self.tracks and not self.tune_seeds:
            raise BenchError("at least one tuning seed is needed")
        if set(self.tune_seeds) & set(self.eval_seeds):
            raise BenchError("tuning and evaluation seeds must differ (held-out seeds)")
        bad = [t for t in self.tracks if t not in ("external", "self")]
        if bad or not self.tracks:
            raise BenchError(f"unknown track {bad[0] if bad else ''!r} (external, self)")
        if not (0 < self.lr_range[0] < self.lr_range[1]):
            raise BenchError(f"bad lr range {self.lr_range}: need 0 < low < high")
        if not self.budget_scale > 0:
            raise BenchError(f"--budget-scale must be positive, got {self.budget_scale}")
        if not self.optimizers:
            raise BenchError("no optimizer to benchmark")
        if not self.workloads:
            raise BenchError("no workload to run")
        labels = [o.label for o in self.optimizers]
        if len(set(labels)) != len(labels):
            raise BenchError("an optimizer is listed twice")
        for w in self.workloads:
            try:
                get_workload(w)
            except KeyError as exc:
                raise BenchError(exc.args[0]) from None
        if self.search == "tpe":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise BenchError("--search tpe needs optuna: pip install optuna") from None

    def to_json(self) -> dict:
        return {
            "bench_version": 1,
            "suite": self.suite,
            "workloads": {w: get_workload(w).spec() for w in self.workloads},
            "optimizers": [{"label": o.label, "name": o.name, "default_lr": o.default_lr,
                            "hparams": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in o.hparams.items()}} for o in self.optimizers],
            "search": self.search, "n_trials": self.n_trials,
            "tune_seeds": list(self.tune_seeds), "eval_seeds": list(self.eval_seeds),
            "tracks": list(self.tracks), "lr_range": list(self.lr_range),
            "self_budget_factor": self.self_budget_factor, "budget_scale": self.budget_scale,
            "skipped": list(self.skipped),
        }

    def config_hash(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def studies(self) -> list["Study"]:
        out = []
        for w in self.workloads:
            for o in self.optimizers:
                for track in self.tracks:
                    out.append(Study(self, get_workload(w), o, track))
        return out


# --------------------------------------------------------------------------- studies
def tuning_objective(result: dict, budget: int, target: float) -> float:
    """Lower is better: steps to target, else the budget plus a penalty for the gap."""
    if result.get("status") == "ok" and result.get("reached"):
        return float(result["steps_to_target"])
    best = result.get("best_metric")
    if result.get("status") != "ok" or best is None or not math.isfinite(best):
        return budget * 1000.0
    gap = math.log(max(best, 1e-300) / target) if target > 0 else best - target
    return budget * (1.0 + max(gap, 0.0))


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Study:
    """The trial plan of one optimizer on one workload in one track (see module doc)."""

    def __init__(self, cfg: BenchConfig, workload: Workload, opt: OptimizerSpec, track: str):
        self.cfg, self.workload, self.opt, self.track = cfg, workload, opt, track
        factor = cfg.self_budget_factor if track == "self" else 1.0
        self.budget = max(1, int(round(workload.steps * cfg.budget_scale * factor)))
        lo, hi = cfg.lr_range
        self.lr_lo, self.lr_hi = opt.default_lr * lo, opt.default_lr * hi
        self.results: dict[str, dict] = {}      # key -> result summary (insertion order kept)
        self._best_lr: float | None = None

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.workload.name, self.opt.label, self.track)

    def __repr__(self) -> str:
        return f"Study({self.workload.name}, {self.opt.label}, {self.track})"

    # ---- trial specs
    def _spec(self, hp: dict, seed: int, phase: str) -> TrialSpec:
        return TrialSpec(workload=self.workload.name, optimizer=self.opt.label, name=self.opt.name,
                         hparams=hp, seed=seed, steps=self.budget,
                         eval_every=self.workload.eval_every, target=self.workload.target,
                         track=self.track, phase=phase, stop_at_target=(phase == "tune"))

    def _hp(self, lr: float | None) -> dict:
        hp = dict(self.opt.hparams)
        if lr is not None:
            hp["lr"] = lr
        return hp

    def grid(self) -> list[float]:
        n = self.cfg.n_trials
        if n == 1:
            return [self.opt.default_lr]
        a, b = math.log10(self.lr_lo), math.log10(self.lr_hi)
        return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.6g}") for i in range(n)]

    def planned_trials(self) -> int:
        n_eval = len(self.cfg.eval_seeds)
        if self.track == "self":
            return n_eval
        return self.cfg.n_trials * len(self.cfg.tune_seeds) + n_eval

    # ---- results
    def add_result(self, spec: TrialSpec, result: dict) -> None:
        self.results[spec.key] = {"phase": spec.phase, "lr": spec.hparams.get("lr"),
                                  "seed": spec.seed, **{k: result.get(k) for k in (
                                      "status", "reached", "steps_to_target", "best_metric")}}

    def _tune_groups(self) -> dict[float, dict[int, dict]]:
        groups: dict[float, dict[int, dict]] = {}
        for r in self.results.values():
            if r["phase"] == "tune":
                groups.setdefault(r["lr"], {})[r["seed"]] = r
        return groups

    def _group_score(self, runs: dict[int, dict]) -> tuple[float, float]:
        objs = [tuning_objective(r, self.budget, self.workload.target) for r in runs.values()]
        bests = [r["best_metric"] if r["best_metric"] is not None else math.inf for r in runs.values()]
        return (_median(objs), _median(bests))

    def best_lr(self) -> float | None:
        """The tuned learning rate once tuning is complete (None before)."""
        groups = self._tune_groups()
        complete = {lr: g for lr, g in groups.items() if len(g) == len(self.cfg.tune_seeds)}
        if not complete:
            return None
        return min(complete, key=lambda lr: (*self._group_score(complete[lr]), lr))

    def next_specs(self, active: set[str]) -> list[TrialSpec]:
        """Trials that can start now: not finished, not running."""
        def todo(specs):
            return [s for s in specs if s.key not in self.results and s.key not in active]

        if self.track == "self":
            return todo([self._spec(self._hp(None), s, "eval") for s in self.cfg.eval_seeds])
        tune_seeds = self.cfg.tune_seeds
        if self.cfg.search == "grid":
            tune = [self._spec(self._hp(lr), s, "tune") for lr in self.grid() for s in tune_seeds]
            waiting = todo(tune)
            if waiting or any(s.key in active for s in tune):
                return waiting
        else:
            groups = self._tune_groups()
            missing = []
            for lr, g in groups.items():
                missing += [self._spec(self._hp(lr), s, "tune") for s in tune_seeds if s not in g]
            if missing:  # an interrupted group: finish its seeds first
                return todo(missing)
            if any(json_phase(k) == "tune" for k in active if self._owns(k)):
                return []
            if len(groups) < self.cfg.n_trials:
                lr = self._suggest(groups)
                return todo([self._spec(self._hp(lr), s, "tune") for s in tune_seeds])
        lr = self.best_lr()
        return todo([self._spec(self._hp(lr), s, "eval") for s in self.cfg.eval_seeds])

    def _owns(self, key: str) -> bool:
        k = json.loads(key)
        return (k[2], k[3], k[0]) == self.ident

    def complete(self) -> bool:
        evals = [r for r in self.results.values() if r["phase"] == "eval"]
        return len(evals) >= len(self.cfg.eval_seeds)

    def _suggest(self, groups: dict[float, dict[int, dict]]) -> float:
        """Optuna TPE, replayed from the completed groups: deterministic given the history."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dist = optuna.distributions.FloatDistribution(self.lr_lo, self.lr_hi, log=True)
        seed = int(hashlib.sha256(repr(self.ident).encode()).hexdigest()[:8], 16) + len(groups)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, self.cfg.n_trials // 3))
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for lr, g in groups.items():
            study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions={"lr": dist},
                                                      value=self._group_score(g)[0]))
        trial = study.ask({"lr": dist})
        lr = float(f"{trial.params['lr']:.6g}")
        if lr in groups:  # a repeat: take the middle of the widest gap instead
            logs = sorted([math.log(self.lr_lo), math.log(self.lr_hi)] + [math.log(x) for x in groups])
            i = max(range(len(logs) - 1), key=lambda j: logs[j + 1] - logs[j])
            lr = float(f"{math.exp(0.5 * (logs[i] + logs[i + 1])):.6g}")
        return lr


def json_phase(key: str) -> str:
    return json.loads(key)[1]
