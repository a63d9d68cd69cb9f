"""`--model NAME [--tiny]` selects presets of defaults, `--config FILE` a recipe; explicit flags override them (a
two-stage parse, so that `--help` prints the defaults a run will use, with one flat Args).

A pre-parser reads only --model, --tiny and --config, then tyro parses everything against the filled-in defaults, so
`--help` shows the defaults that will really be used. The layers, in order (common/args.py): the Args defaults, the
model's `preset` (its adapter), the script's `PRESETS[model]`; with --tiny, common.args.TINY, the script's `tiny`
settings and the model's `tiny_preset`; then the --config file; then the command line. A preset's "{output_dir}"
stands for the script's default output folder. The model and --tiny come from the command line, else the file.
"""
import argparse
import dataclasses
import json
import os
import sys
import types
import typing

import tyro

from common.args import TINY

NOT_FLAGS = ("resumed", "config")  # keys a run's config.json holds besides its flags


def read_config(path, args_cls) -> dict:
    """The flags of a YAML or JSON file, checked against `args_cls`'s fields and types; a problem exits with one
    `error:` line naming the key and the file (this runs before any error handler of the script)."""
    def fail(why):
        sys.exit(f"error: --config {path}: {why}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read it ({getattr(e, 'strerror', None) or e})")
    import yaml  # transformers' and accelerate's dependency already
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        fail(f"not {'JSON' if path.endswith('.json') else 'YAML'} ({' '.join(str(e).split())[:160]})")
    if not isinstance(values, dict):
        fail(f"expected a mapping of flags, got {type(values).__name__}")
    hints = typing.get_type_hints(args_cls)
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in NOT_FLAGS:
            continue
        if name not in hints:
            fail(f"unknown key {key!r} (not a flag of this script)")
        ok, value = _as_type(value, hints[name])
        if not ok:
            fail(f"key {key!r}: {value!r} is not {_type_name(hints[name])}")
        out[name] = value
    return out


def _as_type(value, hint):
    """(whether `value` fits the annotation `hint`, the value as the field holds it: lists become tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for h in args:
            ok, v = _as_type(value, h)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if variadic and not isinstance(value, (list, tuple)):  # `resolution: 512`, as presets write it
            value = [value]
        if not isinstance(value, (list, tuple)):
            return False, value
        each = args[:1] * len(value) if variadic else args
        if len(each) != len(value):
            return False, value
        fitted = [_as_type(v, h) for v, h in zip(value, each)]
        return all(ok for ok, _ in fitted), tuple(v for _, v in fitted)
    if hint is type(None):
        return value is None, value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)) else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, hint), value


def _type_name(hint) -> str:
    """'a float', 'one of ['lora', 'full']', 'str | None', 'tuple[int, ...]': the type a flag's value must have."""
    if isinstance(hint, type):
        return f"a{'n' if hint.__name__[0] in 'aeiou' else ''} {hint.__name__}"
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    return str(hint).replace("typing.", "")


def parse_with_presets(args_cls, presets: dict, tiny: dict | None = None, argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--tiny", action="store_true", default=None)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args([a.replace("_", "-") if a.startswith("--") else a for a in argv])
    recipe = read_config(known.config, args_cls) if known.config else {}
    known.model = known.model or recipe.get("model", args_cls.model)
    known.tiny = bool(known.tiny if known.tiny is not None else recipe.get("tiny", False))
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
    overrides.update(recipe)
    default = dataclasses.replace(base, **{**overrides, "model": known.model, "tiny": known.tiny})
    is_main = int(os.environ.get("RANK", "0")) == 0  # every rank parses; only one prints
    return tyro.cli(args_cls, default=default, args=argv, console_outputs=is_main)
