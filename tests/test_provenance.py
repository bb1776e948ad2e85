"""lego.provenance: every field of the record, and the git state of a checkout we control."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lego import provenance as prov

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_every_field_present_with_its_type():
    argv = ["/usr/bin/lego-run", "data.train_split='train[:90%]'", "seed=3"]
    rec = prov.provenance(argv, seeds={"seed": 3})
    assert set(rec) == {"command", "argv", "git", "packages", "python", "torch", "hardware", "threads",
                        "hostname", "platform", "seeds"}
    # The program name is kept, and the line splits back into the same arguments in a shell.
    assert rec["command"].startswith("lego-run ")
    assert shlex.split(rec["command"])[1:] == argv[1:]
    assert rec["argv"] == argv and rec["seeds"] == {"seed": 3}
    assert set(rec["git"]) == {"root", "commit", "dirty", "diff_sha256", "untracked", "untracked_count"}
    pk = rec["packages"]
    for name in ("lego", *prov.REQUIRED_DISTRIBUTIONS):
        assert name in pk
    assert isinstance(pk["torch"], str) and isinstance(pk["hydra-core"], str) and isinstance(pk["numpy"], str)
    assert all(name in prov.REQUIRED_DISTRIBUTIONS + prov.OPTIONAL_DISTRIBUTIONS + ("lego",) for name in pk)
    assert all(isinstance(v, str) for k, v in pk.items() if k not in prov.REQUIRED_DISTRIBUTIONS)
    py = rec["python"]
    assert py["version"].count(".") == 2 and py["implementation"] in ("CPython", "PyPy")
    t = rec["torch"]
    assert isinstance(t["version"], str) and t["build"].split()[0] in ("cpu", "cuda", "rocm")
    assert (t["build"] == "cpu") == (t["cuda"] is None and t["hip"] is None)
    assert t["cudnn"] is None or isinstance(t["cudnn"], int)
    hw = rec["hardware"]
    assert isinstance(hw["cpu"], str) and hw["cpu"] and isinstance(hw["gpus"], list)
    assert all(isinstance(g, str) for g in hw["gpus"])
    th = rec["threads"]
    assert isinstance(th["torch"], int) and th["torch"] >= 1 and isinstance(th["cpu_count"], int)
    assert th["OMP_NUM_THREADS"] is None or isinstance(th["OMP_NUM_THREADS"], str)
    assert isinstance(rec["hostname"], str) and rec["hostname"]
    assert isinstance(rec["platform"], str) and rec["platform"]
    json.dumps(rec)  # JSON-ready


def test_thread_count_env_is_recorded(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert prov.provenance([])["threads"]["OMP_NUM_THREADS"] == "3"


def test_python_dash_m_command_line():
    line = prov.command_line(["/x/site-packages/lego/__main__.py", "-m", "hard_example_ratio=0.3,0.7"])
    assert shlex.split(line)[1:] == ["-m", "lego", "-m", "hard_example_ratio=0.3,0.7"]
    assert prov.command_line([]) == ""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git repository holding a `lego/` package, made the package that provenance inspects."""
    repo = tmp_path / "repo"
    (repo / "lego").mkdir(parents=True)
    (repo / "lego" / "__init__.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("outputs/\n")
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(prov, "PACKAGE_DIR", repo / "lego")
    return repo


@needs_git
def test_git_commit_dirty_flag_and_diff_hash(checkout):
    repo = checkout
    g = prov.provenance([])["git"]
    assert g["commit"] == _git(repo, "rev-parse", "HEAD") and len(g["commit"]) == 40
    assert Path(g["root"]).resolve() == repo.resolve()
    assert g["dirty"] is False and g["diff_sha256"] is None and g["untracked"] == []

    (repo / "outputs").mkdir()  # ignored files do not make the tree dirty
    (repo / "outputs" / "run.log").write_text("log")
    assert prov.provenance([])["git"]["dirty"] is False

    (repo / "lego" / "__init__.py").write_text("x = 2\n")
    g1 = prov.provenance([])["git"]
    assert g1["dirty"] is True and g1["commit"] == g["commit"]
    diff = subprocess.run(["git", "diff", "--binary", "HEAD"], cwd=repo, capture_output=True, check=True).stdout
    import hashlib

    assert g1["diff_sha256"] == hashlib.sha256(diff).hexdigest()

    (repo / "lego" / "__init__.py").write_text("x = 3\n")
    g2 = prov.provenance([])["git"]
    assert g2["dirty"] is True and g2["diff_sha256"] not in (None, g1["diff_sha256"])

    _git(repo, "add", "lego/__init__.py")  # staged changes are still uncommitted: same diff against HEAD
    assert prov.provenance([])["git"]["diff_sha256"] == g2["diff_sha256"]

    _git(repo, "commit", "-q", "-m", "two")
    g3 = prov.provenance([])["git"]
    assert g3["dirty"] is False and g3["diff_sha256"] is None
    assert g3["commit"] == _git(repo, "rev-parse", "HEAD") != g["commit"]

    (repo / "lego" / "new.py").write_text("")  # untracked: dirty, named, but not in the diff hash
    g4 = prov.provenance([])["git"]
    assert g4["dirty"] is True and g4["untracked"] == ["lego/new.py"] and g4["diff_sha256"] is None


def test_outside_a_checkout_fields_are_none(tmp_path, monkeypatch):
    (tmp_path / "lego").mkdir()
    (tmp_path / "lego" / "__init__.py").write_text("")
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path / "lego")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    assert set(prov.provenance([])["git"].values()) == {None}


@needs_git
def test_package_untracked_inside_some_repository_is_not_a_checkout(checkout, monkeypatch):
    """A package copied into an ignored folder of a repository (e.g. a venv) is not that repo's code."""
    site = checkout / "outputs" / "site-packages"
    (site / "lego").mkdir(parents=True)
    (site / "lego" / "__init__.py").write_text("")
    monkeypatch.setattr(prov, "PACKAGE_DIR", site / "lego")
    assert set(prov.provenance([])["git"].values()) == {None}


def test_without_git_fields_are_none(checkout, monkeypatch):
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)
    assert set(prov.provenance([])["git"].values()) == {None}


def test_git_that_hangs_is_cut_short(checkout, monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport time; time.sleep(30)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(prov.shutil, "which", lambda name: str(fake))
    monkeypatch.setattr(prov, "GIT_TIMEOUT_S", 0.5)
    assert set(prov.provenance([])["git"].values()) == {None}
