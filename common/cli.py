"""`--model NAME [--tiny]` selects presets of defaults; explicit flags override them (a two-stage parse, so that
`--help` prints the defaults a run will use, with one flat Args).

A pre-parser reads only --model and --tiny, then tyro parses everything against the preset-filled defaults, so
`--help` shows the defaults that will really be used. The layers, in order (common/args.py): the Args defaults, the
model's `preset` (its adapter), the script's `PRESETS[model]`; with --tiny, common.args.TINY, the script's `tiny`
settings and the model's `tiny_preset`. A preset's "{output_dir}" stands for the script's default output folder.
"""
import argparse
import dataclasses
import os
import sys

import tyro

from common.args import TINY


def parse_with_presets(args_cls, presets: dict, tiny: dict | None = None, argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=args_cls.model)
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args([a.replace("_", "-") if a.startswith("--") else a for a in argv])
    from common import models
    adapter_cls = models.adapter_class(known.model) if known.model in models.MODELS else None
    overrides = dict(adapter_cls.preset) if adapter_cls else {}
    overrides.update(presets.get(known.model, {}))
    if known.tiny:
        overrides.update(TINY, output_dir="{output_dir}-tiny", **(tiny or {}))
        overrides.update(adapter_cls.tiny_preset if adapter_cls else {})
    base = args_cls()
    for k, v in overrides.items():  # a preset may give a size as one int: (v,) for a tuple field like resolution
        if isinstance(getattr(base, k, None), tuple) and isinstance(v, int):
            overrides[k] = (v,)
        elif isinstance(v, str) and "{output_dir}" in v:
            overrides[k] = v.format(output_dir=base.output_dir)
    default = dataclasses.replace(base, model=known.model, tiny=known.tiny, **overrides)
    is_main = int(os.environ.get("RANK", "0")) == 0  # every rank parses; only one prints
    return tyro.cli(args_cls, default=default, args=argv, console_outputs=is_main)
