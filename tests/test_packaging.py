"""The package as users install it: a wheel holds the config groups, and a non-editable install runs
`lego-run` from any directory (the console script finds lego/conf/ inside the installed package)."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "lego" / "conf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building a wheel without network needs setuptools installed")
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = out.glob("lego-*.whl")
    return path


def test_wheel_holds_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lego/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert {"lego/conf/config.yaml", "lego/conf/debug/tiny.yaml", "lego/conf/experiment/quick.yaml"} <= expected
    assert expected <= names, sorted(expected - names)
    assert "lego/stages/eval.py" in names and "lego/config/__init__.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lego-run = lego.cli:main" in scripts and "lego-prepare = lego.prepare:main" in scripts


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # torch and the other dependencies from this environment's site-packages, appended after the new
    # environment's own (a path in a .pth file; the .pth files over there, such as an editable lego, stay unread)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                          "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "LEGO_CACHE_DIR": str(tmp_path / "cache"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(python), "-c", "import lego; print(lego.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr  # the installed copy, not the checkout
    help_ = subprocess.run([str(env_dir / "bin" / "lego-run"), "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "debug" in help_.stdout and "experiment" in help_.stdout, help_.stderr[-2000:]
    run = subprocess.run([str(env_dir / "bin" / "lego-run"), "debug=tiny", "num_threads=1", "eval.standard_baseline=false",
                          "hydra.run.dir=run"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "run" / "metrics.json").is_file()
