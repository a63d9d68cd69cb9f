"""`--model NAME [--tiny]` selects a preset of defaults; explicit flags override it (STYLE.md 3.4, option B).

A pre-parser reads only --model and --tiny, then tyro parses everything against the preset-filled
defaults, so `--help` shows the defaults that will really be used.
"""
import argparse
import dataclasses
import os
import sys

import tyro


class ConfigError(ValueError):
    """One clear line about flags that do not fit together."""


def _user_errors():
    # every error class whose message is meant for the user: printed as one line, exit code 1
    from common.checkpoint import CheckpointError
    from common.data import DataError
    from common.models.base import ModelError
    from rewards import RewardError
    return (ConfigError, DataError, ModelError, CheckpointError, RewardError)


def parse_with_presets(args_cls, presets: dict, tiny_presets: dict | None = None, argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=args_cls.model)
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args([a.replace("_", "-") if a.startswith("--") else a for a in argv])
    from common import models  # the model's own sampling preset, then the script's for that model
    overrides = dict(models.adapter_class(known.model).preset) if known.model in models.MODELS else {}
    overrides.update(presets.get(known.model, {}))
    if known.tiny:  # "*": every model's tiny settings, then the model's own
        overrides.update((tiny_presets or {}).get("*", {}))
        overrides.update((tiny_presets or {}).get(known.model, {}))
    default = dataclasses.replace(args_cls(), model=known.model, tiny=known.tiny, **overrides)
    is_main = int(os.environ.get("RANK", "0")) == 0  # every rank parses; only one prints
    return tyro.cli(args_cls, default=default, args=argv, console_outputs=is_main)


USER_ERRORS = _user_errors()
