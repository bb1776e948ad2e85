"""Never lose a run: bad input is answered in one line, and a run killed, interrupted or diverged
keeps what it finished; the rerun of the same command ends with the numbers of an uninterrupted run.

A run that is killed or interrupted is the installed console script in a subprocess, as a user
meets it; the rerun, the reference run and the bad-input cases call `lego.cli.main` (what the
console script calls) in this process, and one bad-input case drives the console script:

    lego-run <FAULT overrides> hydra.run.dir=<dir>      # killed with SIGKILL, then run again

The module shares one token cache and one uninterrupted reference run (`workspace`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import TINY
from conftest import lego_run as lego_run_here

from lego.artifacts import load_checkpoint

# debug=tiny with three epochs of 30 batches per phase. 200k training tokens make phase 2's hard-example collection
# (a pass over the whole training split) last half a second or more: time enough to be killed inside it.
# phase1.cache=false keeps phase 1 in the run directory, so runs share only the token cache.
FAULT = [*TINY, "data.max_train_tokens=200000", "data.max_eval_tokens=6000", "phase1.epoch_steps=30",
         "phase1.cache=false", "phase2.epoch_steps=30", "eval.standard_baseline=false"]
HEADLINE = ("acc", "ppl", "shallow_ratio", "compute_cost", "threshold")


def _exe() -> str:
    return shutil.which("lego-run") or str(Path(sys.executable).parent / "lego-run")


def _env(cache: Path) -> dict:
    return {"LEGO_CACHE_DIR": str(cache), "HYDRA_FULL_ERROR": "0"}


def lego_run(args, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """`lego-run <args>` in this process (lego.cli.main)."""
    return lego_run_here(args, cwd=cwd, env=_env(cache))


def start(args, cwd: Path, cache: Path, log_name: str) -> subprocess.Popen:
    """`lego-run` in the background; output to files (a full pipe would stall it)."""
    out = open(cwd / f"{log_name}.out", "w")
    return subprocess.Popen([_exe(), *args], cwd=cwd, env=dict(os.environ, **_env(cache)), stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell without job control starts background commands (`pytest &`, CI runners) with
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler; the SIGINT test needs
    the child to take Ctrl-C as a terminal user's run would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = 240, *, nonempty: bool = False) -> None:
    """Poll every 5 ms until `path` exists (and holds something); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (not nonempty or path.stat().st_size > 0)):
        if proc.poll() is not None:
            pytest.fail(f"lego-run ended (status {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def epochs(run_dir: Path, phase: str) -> list:
    return [json.loads(line)["epoch"] for line in (run_dir / phase / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Token cache + one uninterrupted run of FAULT: the numbers every resumed run must match."""
    root = tmp_path_factory.mktemp("faults")
    cache = root / "cache"
    res = lego_run([*FAULT, "hydra.run.dir=ref"], cwd=root, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"root": root, "cache": cache, "ref": root / "ref"}


# -- bad input: exit status 2 (Hydra's own composition errors: 1), the key named, no traceback ---------
def _copy_ref(ws, d: Path) -> None:
    shutil.copytree(ws["ref"], d)


def _truncated_phase1(ws, d: Path) -> None:
    _copy_ref(ws, d)
    ckpt = d / "phase1" / "model.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(ckpt.stat().st_size // 2)


def _phase1_of_dim16(ws, d: Path) -> None:
    # A fresh run dir (so the config record cannot refuse first) holding a dim-16 phase-1 result.
    (d / "phase1").mkdir(parents=True)
    shutil.copy2(ws["ref"] / "phase1" / "model.pt", d / "phase1" / "model.pt")


def _text_files(kind: str):
    def setup(ws, d: Path) -> list:
        d.mkdir()
        (d / "held_out.txt").write_text("To be, or not to be, that is the question.\n" * 20)
        train = d / ("empty.txt" if kind == "empty" else "missing.txt")
        if kind == "empty":
            train.write_text("")
        return ["data=text_files", f"data.train_files=[{train}]", f"data.validation_files=[{d / 'held_out.txt'}]",
                f"data.test_files=[{d / 'held_out.txt'}]"]
    return setup


# (id, overrides, setup(workspace, run_dir) -> extra overrides, allowed exit statuses, words stderr must hold)
BAD_INPUT = [
    ("unknown_group_option", ["model=huge"], None, (1,), ["model", "huge", "tiny"]),
    ("mistyped_key", ["phase1.lrr=1"], None, (1,), ["phase1.lrr", "Phase1Config"]),
    ("phase1_not_shallower", ["phase1.layers=4", "phase2.layers=4"], None, (2,), ["phase1.layers", "phase2.layers"]),
    ("ratio_0", ["hard_example_ratio=0"], None, (2,), ["hard_example_ratio", "between 0 and 1"]),
    ("heads_do_not_divide_dim", ["model.dim=30", "model.num_heads=4"], None, (2,), ["model.dim", "model.num_heads"]),
    ("seq_len_above_max", ["data.seq_len=32"], None, (2,), ["data.seq_len", "model.max_seq_len"]),
    ("phase1_lr_0", ["phase1.lr=0"], None, (2,), ["phase1.lr", "positive"]),
    ("phase2_lr_negative", ["phase2.lr=-1e-3"], None, (2,), ["phase2.lr", "positive"]),
    ("batch_size_0", ["data.batch_size=0"], None, (2,), ["data.batch_size", ">= 1"]),
    ("unknown_confidence", ["hard_examples.confidence=vibes"], None, (2,), ["hard_examples.confidence", "max_prob"]),
    ("missing_data_file", [], _text_files("missing"), (2,), ["data.train_files", "missing.txt"]),
    ("empty_corpus", [], _text_files("empty"), (2,), ["data.train_files", "empty"]),
    ("truncated_checkpoint", [], _truncated_phase1, (2,), ["phase1/model.pt", "corrupt or truncated"]),
    ("checkpoint_of_other_shape", ["model.dim=32"], _phase1_of_dim16, (2,),
     ["phase1/model.pt", "dim: 16 (checkpoint) vs 32 (config)"]),
    ("run_dir_of_other_config", ["phase1.lr=5e-3"], _copy_ref, (2,), ["holds a run with another config", "phase1.lr"]),
    ("phase2_without_phase1", ["stages=[phase2]"], None, (2,), ["stages", "phase1/model.pt"]),
    ("cuda_without_cuda", ["device=cuda"], None, (2,), ["device", "CUDA is not available"]),
    ("diverged_loss", ["phase1.lr=1e6"], None, (1,), ["phase1: loss became", "lower the learning rate"]),
]


@pytest.mark.parametrize("name,args,setup,statuses,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line(workspace, name, args, setup, statuses, words):
    if name == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = workspace["root"] / f"bad-{name}"
    extra = (setup(workspace, d) or []) if setup else []
    res = lego_run([*FAULT, *args, *extra, f"hydra.run.dir={d}"], cwd=workspace["root"], cache=workspace["cache"])
    assert res.returncode in statuses, (res.returncode, res.stderr[-2000:])
    for word in words:
        assert word in res.stderr, (word, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    if name == "run_dir_of_other_config":  # the refused rerun leaves the run's own Hydra record
        assert (d / ".hydra/overrides.yaml").read_text() == (workspace["ref"] / ".hydra/overrides.yaml").read_text()
    if statuses != (1,) or name == "diverged_loss":  # ours, not Hydra's: the error line and the run dir
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 2 and lines[0].startswith("lego-run: error: ") and lines[1].startswith("run dir: "), lines


@pytest.mark.slow
def test_console_script_exits_2_on_bad_input(tmp_path):
    """The exit-status contract as a shell sees it: the installed `lego-run` passes main()'s 2 to exit."""
    res = subprocess.run([_exe(), *FAULT, "hard_example_ratio=0", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                         env=dict(os.environ, **_env(tmp_path / "cache")), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["lego-run: error: hard_example_ratio=0.0 must be strictly between 0 and 1",
                     f"run dir: {tmp_path / 'run'}"], lines
    assert "Traceback" not in res.stdout


# -- faults ----------------------------------------------------------------------------------------
# Where each kill lands: the marker that is polled for, and what must not exist yet when it lands.
KILL_POINTS = {
    # epoch 1's resume checkpoint is written: the kill lands in epoch 2 or 3 of phase 1
    "phase1": ("phase1/last.pt", lambda d: not (d / "phase1/model.pt").exists()),
    # the threshold is written: the kill lands in phase 2's collection of the training split's hard
    # examples (its log line "phase2 train: ... hard tokens" is not written yet)
    "hard_examples": ("hard_examples/threshold.json",
                      lambda d: "phase2 train:" not in (d / "lego.log").read_text()
                      and not (d / "phase2/last.pt").exists()),
    # phase 2's epoch 1 checkpoint is written: the kill lands in epoch 2 or 3 of phase 2
    "phase2": ("phase2/last.pt", lambda d: not (d / "phase2/model.pt").exists()),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_uninterrupted(workspace, point):
    d = workspace["root"] / f"kill-{point}"
    cmd = [*FAULT, f"hydra.run.dir={d}"]
    marker, not_yet = KILL_POINTS[point]
    proc = start(cmd, workspace["root"], workspace["cache"], f"kill-{point}")
    wait_for(proc, d / marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not_yet(d), f"the kill landed after the {point} stage it aims at"
    assert not (d / "metrics.json").exists()

    res = lego_run(cmd, cwd=workspace["root"], cache=workspace["cache"])
    assert res.returncode == 0, res.stderr[-3000:]
    got, ref = metrics(d), metrics(workspace["ref"])
    for key in HEADLINE:
        assert got[key] == ref[key], (key, got[key], ref[key])
    for phase in ("phase1", "phase2"):
        assert epochs(d, phase) == [1, 2, 3], phase  # every epoch once: resumed, not restarted or skipped
    if point != "hard_examples":  # a killed phase resumes from its last epoch instead of starting over
        assert f"{point}: resuming after epoch" in (d / "lego.log").read_text()
    assert not list(d.rglob("*.tmp")) and not list(d.rglob("last.pt"))


@pytest.mark.slow
def test_sigint_keeps_checkpoint_says_how_to_resume(workspace):
    d = workspace["root"] / "sigint"
    cmd = [*FAULT, f"hydra.run.dir={d}"]
    proc = start(cmd, workspace["root"], workspace["cache"], "sigint")
    wait_for(proc, d / "phase2/last.pt")
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    out = (workspace["root"] / "sigint.out").read_text()
    assert proc.returncode == 130, out[-2000:]
    assert f"interrupted; finished stages and the last epoch checkpoint are kept; rerun the same command with " \
           f"hydra.run.dir={d} to resume" in out and "Traceback" not in out
    assert (d / "phase1/model.pt").exists() and (d / "hard_examples/threshold.json").exists()
    if not (d / "phase2/model.pt").exists():  # interrupted inside phase 2: its epoch checkpoint is kept
        assert load_checkpoint(d / "phase2/last.pt")["resume"]["epoch"] >= 1

    res = lego_run(cmd, cwd=workspace["root"], cache=workspace["cache"])
    assert res.returncode == 0, res.stderr[-3000:]
    got, ref = metrics(d), metrics(workspace["ref"])
    for key in HEADLINE:
        assert got[key] == ref[key], key


@pytest.mark.slow
def test_second_run_in_same_dir_is_refused_while_first_lives(workspace):
    d = workspace["root"] / "busy"
    # More epochs than the others, so the first run is still training when the second starts up.
    cmd = [*FAULT, "phase1.max_epochs=50", "phase1.patience=50", f"hydra.run.dir={d}"]
    first = start(cmd, workspace["root"], workspace["cache"], "busy")
    try:
        wait_for(first, d / ".lock", nonempty=True)  # the holder writes its pid once it has the lock
        assert int((d / ".lock").read_text()) == first.pid
        second = lego_run(cmd, cwd=workspace["root"], cache=workspace["cache"])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run dir {d} is in use by another lego-run process" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run died"
        assert json.loads((d / "run.json").read_text())["science_config"]["phase1"]["max_epochs"] == 50
    finally:
        first.kill()
        first.wait(timeout=30)


def test_diverged_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """Phase 1 on random tokens, weights blown up to inf before epoch 2 (as one huge step would
    do): the stage stops with TrainingDiverged naming the phase and the epoch, and epoch 1's
    checkpoint survives with finite weights. (`lego-run` reports it in one line: BAD_INPUT.)"""
    from types import SimpleNamespace

    import numpy as np
    from conftest import tiny_config

    import lego.pipeline.standard as standard
    from lego.pipeline.setup import make_loaders
    from lego.pipeline.standard import train_standard
    from lego.training import TrainingDiverged

    real = standard.train_epoch

    def blow_up_at_epoch_2(model, *args, epoch=None, **kwargs):
        if epoch == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("inf"))
        return real(model, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(standard, "train_epoch", blow_up_at_epoch_2)
    cfg = tiny_config(tmp_path / "cache")
    tokens = np.random.default_rng(0).integers(0, 64, 6000).astype(np.uint16)
    corpus = SimpleNamespace(train=tokens[:4000], validation=tokens[4000:], test=tokens[4000:], vocab_size=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores can be 100x slower
    try:
        said = r"^phase1: loss became nan at epoch 2; epoch 1's checkpoint is kept; lower the learning rate"
        with pytest.raises(TrainingDiverged, match=said):
            train_standard(cfg, corpus, make_loaders(cfg, corpus), 2, tmp_path / "phase1", torch.device("cpu"),
                           "phase1")
    finally:
        torch.set_num_threads(threads)
    last = load_checkpoint(tmp_path / "phase1/last.pt")["resume"]
    assert last["epoch"] == 1 and not (tmp_path / "phase1/model.pt").exists()
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_every_checkpoint_load_is_weights_only():
    """Loading a pickle runs code from the file: every torch.load in the package and scripts says
    weights_only=True, and a checkpoint holding a Python object is refused with a clear line."""
    root = Path(__file__).resolve().parent.parent
    calls = []
    for path in [*root.joinpath("lego").rglob("*.py"), *root.joinpath("scripts").glob("*.py")]:
        text = path.read_text()
        start_at = 0
        while (i := text.find("torch.load(", start_at)) >= 0:
            calls.append((path.name, text[i:text.find(")", i) + 1]))
            start_at = i + 1
    assert calls, "no torch.load found: the check would prove nothing"
    for name, call in calls:
        assert "weights_only=True" in call, (name, call)


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": "lego-checkpoint-v1", "lr": Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="holds pickled Python objects, which weights_only=True refuses"):
        load_checkpoint(path, what="phase1 checkpoint")
