"""The typed schema of a LEGO run: `ASHEMConfig` and its groups, the allowed values, the checks.

The dataclasses are registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
mistyped key or a wrong type fails at compose time; the YAML files under `conf/` only hold
values. `validate(cfg)` checks what types cannot (ranges, choices, cross-group constraints) and
raises `ConfigError` with one line naming the key. This module imports nothing from `lego`:
the schema does not depend on the code it configures.

The original specification's flat names (`phase1_layers`, `phase1_lr`, `phase1_patience`,
`hard_example_ratio`, `phase2_layers`, `phase2_lr`, `phase2_patience`) are properties of
`ASHEMConfig`, and `lego-run` accepts them on the command line as aliases of the group keys
(`phase2_lr=3e-4` means `phase2.lr=3e-4`). `hard_example_ratio` is itself a top-level key.
"""

from __future__ import annotations

from lego.config.checks import *  # noqa: F401,F403
from lego.config.data import *  # noqa: F401,F403
from lego.config.values import _fail  # noqa: F401  (data.py and batches.py report with it)
from lego.config.groups import *  # noqa: F401,F403
from lego.config.library import *  # noqa: F401,F403
from lego.config.values import *  # noqa: F401,F403
from lego.config.groups import ASHEMConfig  # noqa: F811  (register_configs names it)


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends: every group option is merged into a typed node."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ashem_schema", node=ASHEMConfig)
