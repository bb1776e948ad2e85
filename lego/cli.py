"""`lego-run`: compose the config with Hydra, then hand it to `lego.pipeline.run`.

    lego-run                                      # the default run (offline Shakespeare, tiny model)
    lego-run hard_example_ratio=0.3 model=small   # override any key
    lego-run -m hard_example_ratio=0.3,0.5,0.7    # a sweep; phase 1 is trained once
    lego-run --help                               # groups, options and the composed config

Bad input ends with exit status 2 and one line naming the key; the run directory is printed
even when a stage fails.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lego.config import ASHEMConfig, register_configs, rewrite_alias_overrides

log = logging.getLogger("lego")

# conf/ lives beside the package in the source tree (the README installs with `pip install -e`);
# an absolute path keeps the installed console script working from any working directory.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


def to_config(cfg: DictConfig) -> ASHEMConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ASHEMConfig)
    return obj


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    from lego.pipeline import StageError, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_config(cfg)
        summary = run(config, run_dir, resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    except (ValueError, StageError, FileNotFoundError) as e:
        # Bad input: one line naming the key, exit status 2, no traceback (Hydra would print one).
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        logging.getLogger("lego").debug("usage error", exc_info=True)  # full trace in the run's log file only
        print(f"lego-run: error: {line}\nrun dir: {run_dir}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        log.exception("lego-run failed; run dir: %s", run_dir)
        raise
    print(f"run dir: {run_dir}")
    return summary.get("ppl", float("nan"))


def main() -> None:
    sys.argv = [sys.argv[0], *rewrite_alias_overrides(sys.argv[1:])]
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("lego-run: interrupted; finished stages and the last epoch checkpoint are kept; "
              "rerun the same command with hydra.run.dir=<run dir> to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
