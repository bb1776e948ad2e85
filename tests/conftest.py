"""Shared pytest fixtures. Each block names the test files it serves; add new ones in their own block."""

import contextlib
import io
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lego.ashem import grow
from lego.cli import CONF_DIR, main, to_config
from lego.config import ASHEMConfig
from lego.model import DeepSupervisionTransformer

# Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP team
# that waits for a busy core makes each step up to 100x slower. Subprocess runs pass
# num_threads=1 themselves.
torch.set_num_threads(1)

# ---- core library (tests/test_model.py, test_training.py, test_ashem.py) -------------------------
# Tiny sizes: a 2-layer model has about 9k parameters and every test runs in well under a second.
VOCAB, DIM, HEADS, SEQ = 16, 16, 2, 8


@pytest.fixture
def make_tiny_model():
    """Factory: `make_tiny_model(num_layers=2, seed=0, noise=0.3, **model_kwargs)`.

    Seeded; `noise` adds N(0, noise) to every parameter after the standard init so that
    confidences spread out and tokens disagree (a freshly initialised model is nearly uniform).
    """

    def make(num_layers: int = 2, seed: int = 0, noise: float = 0.3, **kwargs) -> DeepSupervisionTransformer:
        torch.manual_seed(seed)
        kwargs.setdefault("max_seq_len", SEQ)
        model = DeepSupervisionTransformer(VOCAB, DIM, num_layers, HEADS, **kwargs)
        add_noise(model.parameters(), noise, seed)
        return model.eval()

    return make


def add_noise(params, std: float, seed: int) -> None:
    """Add seeded N(0, std) noise to `params` in place (for layers that should do something visible)."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def perturb():
    """`perturb(params, std=0.3, seed=0)`: seeded in-place noise, e.g. for freshly grown upper layers."""
    return lambda params, std=0.3, seed=0: add_noise(params, std, seed)


@pytest.fixture
def make_token_batches():
    """Factory: `make_token_batches(n_batches=3, batch_size=4, seed=0, n_ignored=2)`.

    A list of (inputs, targets) (B, SEQ) long batches of random tokens, targets the next
    token; `n_ignored` targets per batch are set to -100 (ignore index).
    """

    def make(n_batches: int = 3, batch_size: int = 4, seed: int = 0, n_ignored: int = 2):
        g = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(n_batches):
            seq = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
            inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
            flat = torch.randperm(batch_size * SEQ, generator=g)[:n_ignored]
            targets.view(-1)[flat] = -100
            batches.append((inputs, targets))
        return batches

    return make


@pytest.fixture
def token_batches(make_token_batches):
    """Three fixed batches of 4 x 8 random tokens, two ignored targets each."""
    return make_token_batches()
def grown_pair(make_tiny_model, perturb, precision):
    """A tiny 2-layer model in `precision` and its 4-layer growth with perturbed upper layers and deep head."""
    small = make_tiny_model(num_layers=2, precision=precision)
    big = grow(small, 4)
    perturb(list(big.layers[2:].parameters()) + list(big.deep_head.parameters()), std=0.3, seed=1)
    return small, big.eval()
# ---- end core library ------------------------------------------------------------------------------


# ---- whole runs (tests/test_pipeline.py, test_cli.py, test_faults.py, test_precision.py, ...) -------
# `debug=tiny` (lego/conf/debug/tiny.yaml) is the tiny run every test uses: seconds per run.
TINY = ["debug=tiny", "num_threads=1"]  # one thread: two on two busy cores can be 100x slower


def compose_config(overrides=()):
    """The composed Hydra config for `lego-run <overrides>` (nothing runs)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_config(cache_dir, **overrides) -> ASHEMConfig:
    """`lego-run debug=tiny data.cache_dir=<cache_dir>` as the typed config; `overrides` set dotted keys."""
    cfg = to_config(compose_config(["debug=tiny", f"data.cache_dir={cache_dir}"]))
    for key, value in overrides.items():
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


def lego_run(args, *, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`lego-run <args>` in this process: `lego.cli.main`, which the console script calls, from `cwd`
    with `env` added to the environment; returns what `subprocess.run(..., capture_output=True,
    text=True)` would. Working directory, environment and logging (Hydra's handlers, one of them
    writing the run's lego.log) and torch's thread count are put back afterwards. For bad input and whole runs that need no
    process of their own (one subprocess test per contract keeps the console script honest)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                     if isinstance(v, logging.Logger))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(threads)  # a run sets its num_threads
        os.environ.clear()
        os.environ.update(saved_env)
        for lg, handlers, level, propagate, disabled in saved:
            for h in lg.handlers:
                if h not in handlers:  # Hydra's console and lego.log handlers
                    h.close()
            lg.handlers[:] = handlers
            lg.level, lg.propagate, lg.disabled = level, propagate, disabled
    return subprocess.CompletedProcess(["lego-run", *args], code, out.getvalue(), err.getvalue())


def load_script(name: str):
    """scripts/<name>.py imported as a module (its `main` callable in-process), for the scripts' smoke tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
