"""Every `lego-run` command the documentation shows composes and validates as a shell would run it.

Sources: README.md (fenced code blocks and inline code spans), the leading `#` comment lines of
every YAML under the config directory, and the `lego-run --help` footer. Each line is split
with `shlex.split` as a POSIX shell splits it (quotes removed, `# comments` dropped), so a
command whose quoting the shell would strip fails here as it would for a user.
"""

from __future__ import annotations

import itertools
import re
import shlex
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from lego.cli import CONF_DIR
from lego.config import ASHEMConfig, register_configs, rewrite_alias_overrides, validate

REPO = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # `<run dir>`, `<dir>`: a path the reader fills in
# Hydra plugins a command needs, by the option it names; without the plugin that part is skipped.
PLUGINS = {"hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
           "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
           "hparams_search=": "hydra_plugins.hydra_optuna_sweeper",
           "hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper"}
MAX_COMBINATIONS = 8  # sweep points composed per command


def _logical_lines(lines: List[str]) -> List[str]:
    """Join shell continuation lines (ending in a backslash) into one line each."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
        else:
            out.append(pending + (line.lstrip() if pending else line))
            pending = ""
    if pending:
        out.append(pending)
    return out


def _is_command(line: str) -> bool:
    return line == "lego-run" or line.startswith("lego-run ")


def readme_commands(text: str) -> List[str]:
    """`lego-run` lines of the fenced code blocks, and inline code spans that hold a command."""
    commands, fenced, prose = [], [], []
    inside = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        (fenced if inside else prose).append(line)
    commands += [ln.strip() for ln in _logical_lines(fenced) if _is_command(ln.strip())]
    for span in re.findall(r"`([^`\n]+)`", "\n".join(prose)):
        if _is_command(span.strip()):
            commands.append(span.strip())
    return commands


def yaml_comment_commands(path: Path) -> List[str]:
    """`lego-run` lines of the comment block a YAML file opens with."""
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#").strip())
    return [ln.strip() for ln in _logical_lines(head) if _is_command(ln.strip())]


def help_footer_commands() -> List[str]:
    """The examples `lego-run --help` prints (config.yaml's hydra.help.footer)."""
    footer = OmegaConf.load(Path(CONF_DIR, "config.yaml")).hydra.help.footer
    return [ln.strip() for ln in footer.splitlines() if _is_command(ln.strip())]


def documented_commands() -> Dict[str, str]:
    """`{command: where it is documented}`, first place wins, in reading order."""
    found: Dict[str, str] = {}
    for cmd in readme_commands((REPO / "README.md").read_text()):
        found.setdefault(cmd, "README.md")
    for path in sorted(Path(CONF_DIR).rglob("*.yaml")):
        for cmd in yaml_comment_commands(path):
            found.setdefault(cmd, str(path.relative_to(Path(CONF_DIR).parent)))
    for cmd in help_footer_commands():
        found.setdefault(cmd, "lego-run --help (conf/config.yaml hydra.help.footer)")
    return found


COMMANDS = documented_commands()


def split_command(cmd: str, tmp: Path) -> Tuple[List[str], List[str], bool]:
    """(app overrides, hydra overrides, multirun) of a documented command, as the shell passes them.

    Placeholders become a path under `tmp`; `-m`/`--multirun` is noted and dropped, and so are
    flags that only print (`--help`, `--hydra-help`, `--info`, `--cfg job`, ...).
    """
    cmd = PLACEHOLDER.sub(shlex.quote(str(tmp / "placeholder")), cmd)
    args = shlex.split(cmd, comments=True, posix=True)[1:]
    multirun, app, hydra_args = False, [], []
    it = iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name",
                   "-cn", "--config-dir", "-cd", "--experimental-rerun"):
            if a not in ("--info", "-i"):
                next(it, None)  # the flag's value
        elif a.startswith("-"):  # --help, --hydra-help, --resolve, --shell-completion, ...
            continue
        elif a.lstrip("+~").startswith(("hydra.", "hydra/")):
            hydra_args.append(a)
        else:
            app.append(a)
    return rewrite_alias_overrides(app), hydra_args, multirun


def sweep_points(overrides: List[str]) -> List[List[str]]:
    """The single-job override lists of a multirun (every combination, at most MAX_COMBINATIONS)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for raw, o in zip(overrides, parsed):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([raw])
    return [list(p) for p in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)]


def _compose(overrides: List[str], **kw):
    GlobalHydra.instance().clear()  # a fresh Hydra for every composition
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, **kw)


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _missing_plugins(args: List[str]) -> List[str]:
    """Hydra plugins that `args` select but that are not installed."""
    return sorted({mod for a in args for opt, mod in PLUGINS.items()
                   if a.lstrip("+~").startswith(opt) and not _importable(mod)})


def _make_named_files(data, cwd: Path) -> None:
    """data=text_files: the files a documented command names, so validation can see them
    (`DataConfig` checks them as soon as the composed config becomes a dataclass)."""
    for split in ("train", "validation", "test"):
        for f in data[f"{split}_files"]:
            p = cwd / Path(f).expanduser()
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("" if p.suffix != ".txt" else "To be, or not to be.\n" * 5)


def test_commands_are_found():
    """The collector sees the README's, the YAML comments' and the help's commands (not an empty list)."""
    sources = set(COMMANDS.values())
    assert "README.md" in sources and any(s.endswith(".yaml") for s in sources)
    assert "lego-run" in COMMANDS and "lego-run -m hard_example_ratio=0.3,0.5,0.7" in COMMANDS
    # Continuation lines are joined into the command they continue.
    assert any("data=text_files" in c and "data.test_files" in c for c in COMMANDS)


def test_shell_quoting_is_what_hydra_sees(tmp_path):
    """The split is a shell's: quotes go, a bare `'x[:9%]'` loses its quotes, comments go."""
    app, hydra_args, multirun = split_command(
        "lego-run -m \"data.train_split='train[:90%]'\" data.test_split='train[9:]' a=1  # note", tmp_path)
    assert app == ["data.train_split='train[:90%]'", "data.test_split=train[9:]", "a=1"] and multirun
    app, hydra_args, _ = split_command("lego-run hydra.run.dir=<run dir> --help phase2_lr=3e-4", tmp_path)
    assert hydra_args == [f"hydra.run.dir={tmp_path / 'placeholder'}"] and app == ["phase2.lr=3e-4"]


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
@pytest.mark.parametrize("cmd", list(COMMANDS), ids=list(COMMANDS))
def test_documented_command_composes_and_validates(cmd, tmp_path, monkeypatch):
    where = COMMANDS[cmd]
    if "..." in cmd:
        pytest.skip(f"{where}: {cmd!r} elides arguments ('...'); nothing definite to compose")
    monkeypatch.chdir(tmp_path)  # relative paths in a command (data files, run dirs) land here
    app, hydra_args, multirun = split_command(cmd, tmp_path)
    missing = _missing_plugins(app)
    if missing:
        pytest.skip(f"{where}: {cmd!r} needs {', '.join(missing)}, not installed")
    try:
        points = sweep_points(app) if multirun else [app]
        if not multirun:
            swept = [o for o in OverridesParser.create().parse_overrides(app) if o.is_sweep_override()]
            assert not swept, f"{where}: {cmd!r} sweeps {swept[0].get_key_element()} but has no -m"
        for overrides in points:
            cfg = _compose(overrides)
            if cfg.data.name == "text_files":
                _make_named_files(cfg.data, tmp_path)
            config = OmegaConf.to_object(cfg)
            assert isinstance(config, ASHEMConfig)
            validate(config)
    except (HydraException, ValueError) as e:  # a user would see this error: name the doc line
        first = str(e).strip().splitlines()[:2]
        pytest.fail(f"{where}: {cmd!r} is split by the shell into {app}; {type(e).__name__}: {' '.join(first)}")
    if hydra_args:
        missing = _missing_plugins(hydra_args)
        if missing:
            pytest.skip(f"{where}: the app config of {cmd!r} composes and validates; its hydra "
                        f"overrides need {', '.join(missing)}, not installed")
        hc = _compose([*points[0], *hydra_args], return_hydra_config=True).hydra
        for a in hydra_args:  # every `hydra.key=value` reached the composed Hydra config
            key, _, value = a.lstrip("+~").partition("=")
            if key.startswith("hydra.") and not PLACEHOLDER.search(value):
                assert str(OmegaConf.select(hc, key[len("hydra."):])) == value, a


@pytest.mark.slow
def test_plain_lego_run_runs_end_to_end(tmp_path):
    """The README's first command, with the tiny budget of the subprocess tests appended (lego-run's
    main in this process; tests/test_cli.py runs the installed console script)."""
    from conftest import lego_run
    from test_cli import TINY

    assert "lego-run" in COMMANDS
    app, hydra_args, _ = split_command("lego-run", tmp_path)
    res = lego_run([*app, *hydra_args, *TINY, "hydra.run.dir=run"], cwd=tmp_path,
                   env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and "run dir:" in res.stdout
