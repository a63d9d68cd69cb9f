"""--config FILE (common/cli.py): a YAML or JSON file of flags, a run's own config.json included, layered between the
presets and the command line. A tiny run re-made from its config.json (another --output-dir) is bitwise the same
run; a bad file is one `error:` line naming the key and the file; the recipes in docs/recipes pass every check."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import grpo
import nft
from common.cli import parse_with_presets
from tests.helpers import checks_only
from tests.test_grpo import ROOT, read_metrics


def _numbers(out):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in read_metrics(out)]


@pytest.mark.parametrize("mod", [grpo, nft], ids=["grpo", "nft"])
def test_a_run_remade_from_its_config_json_is_bitwise_the_same(tmp_path, mod):
    first = tmp_path / "first"
    mod.main(parse_with_presets(mod.Args, mod.PRESETS, mod.TINY, [
        "--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "2", "--eval-every", "0", "--seed", "5",
        "--learning-rate", "2e-4", "--output-dir", str(first)]))
    again = parse_with_presets(mod.Args, mod.PRESETS, mod.TINY, ["--config", str(first / "config.json"),
                                                                 "--output-dir", str(tmp_path / "again")])
    assert (again.seed, again.learning_rate, again.tiny, again.num_epochs) == (5, 2e-4, True, 2)
    mod.main(again)
    assert _numbers(first) == _numbers(tmp_path / "again")
    a, b = (load_file(str(d / "lora/pytorch_lora_weights.safetensors")) for d in (first, tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["config"] == str(first / "config.json") and config["output_dir"] == str(tmp_path / "again")


def test_the_layers_defaults_presets_file_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: flux1\ntiny: true\nlearning_rate: 1.0e-3\nresolution: 64\n"
                      "reward: [clip, 'jpeg_compressibility:0.5']\n")
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--config", str(recipe), "--learning-rate", "2e-3"])
    assert args.learning_rate == 2e-3  # the command line over the file
    assert args.resolution == (64,) and args.reward == ("clip", "jpeg_compressibility:0.5")  # the file over presets
    assert args.model == "flux1" and args.tiny and args.clip_range == grpo.TINY["clip_range"]  # presets of the file's
    assert args.output_dir.endswith("-tiny")  # model and --tiny, where the file says nothing


@pytest.mark.parametrize("name,text,why", [
    ("r.json", '{"learning_rate": "abc"}', "key 'learning_rate': 'abc' is not a float"),
    ("r.yaml", "finetune: half\n", "key 'finetune': 'half' is not one of ['lora', 'full']"),
    ("r.yaml", "nft_beta: 0.5\n", "unknown key 'nft_beta' (not a flag of this script)"),  # nft.py's, not grpo.py's
    ("r.yaml", "num_epochs: 2.5\n", "key 'num_epochs': 2.5 is not an int"),
    ("r.yaml", "sde_window_range: [1, 2, 3]\n", "key 'sde_window_range': [1, 2, 3] is not tuple[int, int]"),
    ("r.yaml", "- 1\n", "expected a mapping of flags, got list"),
    ("r.yaml", "a: [1\n", "not YAML (while parsing a flow sequence"),
    ("r.json", "{", "not JSON (Expecting property name"),
    ("missing.yaml", None, "cannot read it (No such file or directory)")])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, name, text, why):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--config", str(path)])
    assert str(e.value.code).startswith(f"error: --config {path}: {why}") and "\n" not in str(e.value.code)


RECIPES = sorted(glob.glob(os.path.join(ROOT, "docs", "recipes", "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.basename(r) for r in RECIPES])
def test_the_recipes_pass_every_check(tmp_path, recipe):
    """Each recipe names real flags and passes every check a run makes before loading (on the tiny build, its own
    output folder moved to tmp_path)."""
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--config", recipe, "--tiny", "--log-with", "none",
                                                                   "--output-dir", str(tmp_path / "out")])
    checks_only("grpo", args)
    assert args.config == recipe
