"""Benchmark workloads: a model, data, a validation metric and a target.

Every workload runs on CPU, needs no download (data comes from scikit-learn's
bundled data sets, from the Python standard library's own source files, or is
synthetic) and is deterministic under a seed: the seed picks the initial
parameters, the order of mini-batches and any gradient noise; the data and its
train/validation split are fixed.

Metrics are all "lower is better" (a loss, an error rate or a mean squared
error), and a workload's *target* is the value at which a run counts as done:
time-to-target is the first evaluation step at which the metric is at or
below it. Targets were chosen so that AdamW with a tuned learning rate
(``reference_lr``) reaches them well inside the step budget.

A workload yields a :class:`Task` per seed::

    task = get_workload("mlp_digits").make(seed=0)
    loss = task.train_loss(step)   # a scalar tensor for one training step
    value = task.evaluate()        # validation metric, a float
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Workload", "Task", "WORKLOADS", "get_workload", "workload_names", "stdlib_corpus"]


class Task:
    """One instance of a workload for one seed: parameters, a training loss, a metric."""

    def __init__(self, params: list[Tensor], train_loss: Callable[[int], Tensor],
                 evaluate: Callable[[], float], module: nn.Module | None = None):
        self.params = params
        self._train_loss = train_loss
        self._evaluate = evaluate
        self.module = module

    def parameters(self) -> list[Tensor]:
        return self.params

    def train_loss(self, step: int) -> Tensor:
        """The training loss of step ``step`` (1-based); its gradient drives the optimizer."""
        return self._train_loss(step)

    def evaluate(self) -> float:
        """The validation metric now (lower is better)."""
        if self.module is not None:
            was_training = self.module.training
            self.module.eval()
        try:
            with torch.no_grad():
                return float(self._evaluate())
        finally:
            if self.module is not None and was_training:
                self.module.train()


@dataclass(frozen=True)
class Workload:
    """A benchmark problem: see the module docstring."""

    name: str
    description: str
    kind: str                 # "synthetic" or "real"
    metric: str               # name of the validation metric (lower is better)
    target: float             # time-to-target threshold on the metric
    steps: int                # step budget
    eval_every: int           # evaluation interval in steps
    reference_lr: float       # an AdamW learning rate that reaches the target
    data_source: str
    builder: Callable[[int], Task] = field(repr=False, compare=False)
    fingerprint: Callable[[], str] = field(repr=False, compare=False)
    version: int = 1

    def make(self, seed: int) -> Task:
        """Build the task for ``seed`` (parameters initialised from that seed)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.builder(int(seed))

    def data_hash(self) -> str:
        """A short hash of the data (and, for the language model, its corpus)."""
        return self.fingerprint()

    def spec(self) -> dict:
        """The settings that define results: stored with every bench run."""
        return {"metric": self.metric, "target": self.target, "steps": self.steps,
                "eval_every": self.eval_every, "version": self.version}


# --------------------------------------------------------------------------- helpers
def _hash_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        t = torch.as_tensor(a).contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        try:
            raw = t.numpy().tobytes()
        except (ImportError, RuntimeError):  # torch without numpy: same bytes, slower
            raw = bytes(t.reshape(-1).view(torch.uint8).tolist())
        h.update(raw)
    return h.hexdigest()[:16]


class _Batches:
    """Mini-batch indices in seeded, reshuffled epochs (drop_last)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(10_007 * seed + 17)
        self.perm: Tensor | None = None
        self.pos = 0

    def next(self) -> Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def _split(n: int, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed train/validation split (independent of the run seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _error_rate(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) != y).float().mean())


# --------------------------------------------------------------------------- synthetic
def _rosenbrock(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor([-1.5, 2.0]) + 0.02 * torch.randn(2, generator=g)
    x = nn.Parameter(start)

    def f() -> Tensor:
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    return Task([x], lambda step: f(), lambda: f().item())


_QUAD_DIM = 50


@functools.lru_cache(maxsize=None)
def _quadratic_problem() -> tuple[Tensor, Tensor]:
    """A fixed rotated quadratic with eigenvalues log-spaced over [1, 1000]."""
    g = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(_QUAD_DIM, _QUAD_DIM, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, 3, _QUAD_DIM, dtype=torch.float64)
    a = (q * eig) @ q.T
    a = ((a + a.T) / 2).float()
    x_star = torch.randn(_QUAD_DIM, generator=g)
    return a, x_star


def _quadratic(seed: int) -> Task:
    a, x_star = _quadratic_problem()
    g = torch.Generator().manual_seed(seed)
    x = nn.Parameter(x_star + torch.randn(_QUAD_DIM, generator=g))

    def f() -> Tensor:
        d = x - x_star
        return 0.5 * d @ (a @ d)

    with torch.no_grad():
        f0 = float(f())
    # metric: suboptimality relative to the start, so seeds are comparable
    return Task([x], lambda step: f(), lambda: float(f()) / f0)


_NQM_DIM = 100
_NQM_BATCH = 16


def _noisy_quadratic(seed: int) -> Task:
    """The noisy quadratic model: h_i = 1/i, gradient noise N(0, H/B)."""
    h = 1.0 / torch.arange(1, _NQM_DIM + 1, dtype=torch.float32)
    noise_std = (h / _NQM_BATCH).sqrt()
    g = torch.Generator().manual_seed(seed)
    x = nn.Parameter(torch.randn(_NQM_DIM, generator=g) * 3.0)
    noise_gen = torch.Generator().manual_seed(7919 * seed + 3)

    def train(step: int) -> Tensor:
        eps = noise_std * torch.randn(_NQM_DIM, generator=noise_gen)
        # gradient: H x + eps, with eps ~ N(0, H / B)
        return 0.5 * (h * x * x).sum() + (eps * x).sum()

    def evaluate() -> float:
        return float(0.5 * (h * x * x).sum())

    return Task([x], train, evaluate)


def _synthetic_hash(name: str) -> Callable[[], str]:
    def fp() -> str:
        if name == "quadratic":
            return _hash_arrays(*_quadratic_problem())
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    return fp


# --------------------------------------------------------------------------- scikit-learn data
@functools.lru_cache(maxsize=None)
def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va = _split(len(y), 0.2)
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / std
    return x[tr], y[tr], x[va], y[va], _hash_arrays(data.data, data.target)


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va = _split(len(y), 0.2)
    return x[tr], y[tr], x[va], y[va], _hash_arrays(data.data, data.target)


def _classifier_task(model: nn.Module, data, batch_size: int, seed: int,
                     reshape: Callable[[Tensor], Tensor] = lambda t: t) -> Task:
    xtr, ytr, xva, yva, _ = data
    xtr, xva = reshape(xtr), reshape(xva)
    batches = _Batches(len(ytr), batch_size, seed)

    def train(step: int) -> Tensor:
        idx = batches.next()
        return F.cross_entropy(model(xtr[idx]), ytr[idx])

    return Task(list(model.parameters()), train, lambda: _error_rate(model(xva), yva), model)


def _logreg_cancer(seed: int) -> Task:
    model = nn.Linear(30, 2)
    data = _breast_cancer()
    xtr, ytr, xva, yva, _ = data
    batches = _Batches(len(ytr), 32, seed)

    def train(step: int) -> Tensor:
        idx = batches.next()
        return F.cross_entropy(model(xtr[idx]), ytr[idx])

    return Task(list(model.parameters()), train,
                lambda: F.cross_entropy(model(xva), yva).item(), model)


def _mlp_digits(seed: int) -> Task:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return _classifier_task(model, _digits(), 64, seed)


def _cnn_digits(seed: int) -> Task:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),   # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    return _classifier_task(model, _digits(), 64, seed, reshape=lambda t: t.view(-1, 1, 8, 8))


def _autoencoder_digits(seed: int) -> Task:
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(),
                          nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64))
    xtr, _, xva, _, _ = _digits()
    batches = _Batches(len(xtr), 64, seed)

    def train(step: int) -> Tensor:
        xb = xtr[batches.next()]
        return F.mse_loss(model(xb), xb)

    return Task(list(model.parameters()), train, lambda: F.mse_loss(model(xva), xva).item(), model)


def _sklearn_hash(loader) -> Callable[[], str]:
    return lambda: loader()[4]


# --------------------------------------------------------------------------- stdlib corpus
#: The standard-library modules whose source text is the language-model corpus.
CORPUS_FILES = ("argparse.py", "textwrap.py", "difflib.py", "functools.py", "contextlib.py",
                "dataclasses.py", "heapq.py", "bisect.py", "queue.py", "sched.py", "string.py",
                "copy.py", "random.py", "pprint.py", "fnmatch.py", "glob.py", "abc.py",
                "colorsys.py")


def _stdlib_dir() -> str:
    path = sysconfig.get_paths().get("stdlib")
    if path and os.path.isfile(os.path.join(path, "textwrap.py")):
        return path
    import inspect
    import textwrap

    return os.path.dirname(inspect.getsourcefile(textwrap))


@dataclass(frozen=True)
class Corpus:
    train: Tensor      # uint8 codes < 128
    val: Tensor
    files: tuple[str, ...]
    hash: str
    n_chars: int


@functools.lru_cache(maxsize=None)
def stdlib_corpus(val_fraction: float = 0.1) -> Corpus:
    """The language-model corpus, read now from this interpreter's standard library.

    The last ``val_fraction`` of every file is validation text. Characters
    outside ASCII become ``\\x7f``. The hash covers the file names and bytes:
    another Python version has other text, and so another hash.
    """
    root = _stdlib_dir()
    h = hashlib.sha256()
    train_parts, val_parts, found = [], [], []
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            raw = fh.read()
        found.append(name)
        h.update(name.encode() + b"\0" + raw + b"\0")
        codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        codes[codes >= 128] = 127
        cut = int(len(codes) * (1 - val_fraction))
        train_parts.append(codes[:cut])
        val_parts.append(codes[cut:])
    if not found:
        raise RuntimeError(f"no corpus file found in the standard library at {root}")
    train, val = torch.cat(train_parts), torch.cat(val_parts)
    return Corpus(train, val, tuple(found), h.hexdigest()[:16], len(train) + len(val))


class _CausalBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small pre-norm causal transformer over 128 byte codes."""

    def __init__(self, vocab: int = 128, d: int = 64, heads: int = 4, layers: int = 2, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_CausalBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


_LM_VAL_WINDOWS = 64


def _char_lm_builder(d: int, heads: int, layers: int, context: int, batch: int) -> Callable[[int], Task]:
    """A character-level LM task on the stdlib corpus: random training windows of
    ``context + 1`` characters (seeded), fixed, evenly spaced validation windows."""
    def build(seed: int) -> Task:
        corpus = stdlib_corpus()
        model = CharTransformer(d=d, heads=heads, layers=layers, context=context)
        train = corpus.train.long()
        val = corpus.val.long()
        gen = torch.Generator().manual_seed(104_729 * seed + 11)
        offsets = torch.arange(context + 1)
        starts = torch.linspace(0, len(val) - context - 2, _LM_VAL_WINDOWS).long()
        val_windows = val[starts[:, None] + offsets]

        def loss_on(windows: Tensor) -> Tensor:
            logits = model(windows[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

        def train_loss(step: int) -> Tensor:
            s = torch.randint(0, len(train) - context - 1, (batch,), generator=gen)
            return loss_on(train[s[:, None] + offsets])

        return Task(list(model.parameters()), train_loss, lambda: loss_on(val_windows).item(), model)

    return build


_char_lm = _char_lm_builder(d=64, heads=4, layers=2, context=64, batch=16)
_char_lm_small = _char_lm_builder(d=32, heads=4, layers=2, context=32, batch=16)


# --------------------------------------------------------------------------- registry
WORKLOADS: dict[str, Workload] = {}


def _add(w: Workload) -> None:
    WORKLOADS[w.name] = w


_add(Workload("rosenbrock", "2-D Rosenbrock function from a seeded start near (-1.5, 2)",
              "synthetic", "loss", 1e-2, 1000, 20, 1e-1, "synthetic",
              _rosenbrock, _synthetic_hash("rosenbrock")))
_add(Workload("quadratic", "rotated 50-D quadratic, eigenvalues log-spaced in [1, 1000]; "
              "metric f(x)/f(x0)", "synthetic", "relative_loss", 1e-3, 600, 10, 1e-1,
              "synthetic", _quadratic, _synthetic_hash("quadratic")))
_add(Workload("noisy_quadratic", "noisy quadratic model: 100-D, h_i = 1/i, gradient noise "
              "N(0, H/16)", "synthetic", "loss", 0.1, 600, 20, 3e-2, "synthetic",
              _noisy_quadratic, _synthetic_hash("noisy_quadratic")))
_add(Workload("logreg_cancer", "logistic regression on scikit-learn's breast-cancer data, "
              "batch 32", "real", "val_loss", 0.125, 400, 10, 1e-2,
              "sklearn.datasets.load_breast_cancer", _logreg_cancer, _sklearn_hash(_breast_cancer)))
_add(Workload("mlp_digits", "MLP 64-128-10 on scikit-learn's digits, batch 64", "real",
              "val_error", 0.03, 600, 10, 1e-2, "sklearn.datasets.load_digits", _mlp_digits,
              _sklearn_hash(_digits)))
_add(Workload("cnn_digits", "two-layer CNN on scikit-learn's 8x8 digits, batch 64", "real",
              "val_error", 0.03, 600, 20, 1e-2, "sklearn.datasets.load_digits", _cnn_digits,
              _sklearn_hash(_digits)))
_add(Workload("autoencoder_digits", "autoencoder 64-32-8-32-64 on scikit-learn's digits, "
              "batch 64", "real", "val_mse", 0.025, 800, 20, 1e-2,
              "sklearn.datasets.load_digits", _autoencoder_digits, _sklearn_hash(_digits)))
_add(Workload("char_lm", "character-level transformer LM (2 layers, d=64, context 64, batch 16) on "
              "standard-library source text", "real", "val_loss", 2.0, 600, 50, 1e-2,
              "Python standard library source files", _char_lm, lambda: stdlib_corpus().hash))
_add(Workload("char_lm_small", "character-level transformer LM (2 layers, d=32, 4 heads, context 32, "
              "batch 16) on standard-library source text", "real", "val_loss", 2.3, 240, 10, 1e-2,
              "Python standard library source files", _char_lm_small, lambda: stdlib_corpus().hash))


def workload_names() -> list[str]:
    """Names of the registered workloads, in registration order."""
    return list(WORKLOADS)


def get_workload(name: str) -> Workload:
    """The workload called ``name`` (KeyError with the closest names otherwise)."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    close = difflib.get_close_matches(name, list(WORKLOADS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown workload {name!r}{hint} (known: {', '.join(WORKLOADS)})")


