"""Bad input, table-driven (in-process, tiny FLUX.1): each stops with one user-facing error line naming the problem,
and writes nothing (the output folder stays absent); the exit code and the `error:` line of the real command line
are covered by tests/test_grpo.py::test_cli_error_is_one_line_and_nonzero."""
import pytest

import grpo
import nft
from common.cli import USER_ERRORS, parse_with_presets
from common.data import load_split


class RaisingReward:
    def __call__(self, images, prompts, metadata):
        raise ZeroDivisionError("my reward divided by zero")


def none_reward(images, prompts, metadata):
    return None


CASES = [
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--gradient-steps-per-epoch", "0"], "--gradient-steps-per-epoch must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--resolution", "0"], "training size: flux1: height and width must be positive multiples of 16, got 0x0"),
    (["--resolution", "50"], "multiples of 16, got 50x50"),
    (["--eval-resolution", "64", "80", "96"], "a resolution is SIZE or HEIGHT WIDTH"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--max-sequence-length", "0"], "--max-sequence-length must be >= 1"),
    (["--dynamics", "CPS", "--noise-level", "1.5"], "--noise-level must be <= 1 with --dynamics CPS"),
    (["--num-epochs", "-1"], "--num-epochs must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--clip-range", "-0.1"], "--clip-range must be > 0"),
    (["--ema-decay", "1.5"], r"--ema-decay must lie in \[0, 1\]"),
    (["--rollout-batch-size", "3"], "must be a multiple of --batch-size"),
    (["--fsdp"], "--fsdp shards over processes"),
    (["--reward", "tests.test_bad_inputs.RaisingReward"],
     "reward 'tests.test_bad_inputs.RaisingReward' failed: ZeroDivisionError: my reward divided by zero"),
    (["--reward", "tests.test_bad_inputs.none_reward"], "reward 'tests.test_bad_inputs.none_reward' failed: "),
]


@pytest.mark.parametrize("extra,match", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(extra, match, tmp_path):
    out = tmp_path / "out"
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY_PRESETS, ["--model", "flux1", "--tiny", "--log-with",
                              "none", "--num-epochs", "1", "--output-dir", str(out), *extra])
    with pytest.raises(USER_ERRORS, match=match) as e:
        grpo.main(args)
    assert "\n" not in str(e.value)
    if "reward" not in " ".join(extra):  # a failing reward stops after loading: checked before that, nothing is written
        assert not out.exists()


def test_output_dir_that_is_a_file_and_dataset_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for extra, match in ((["--output-dir", str(tmp_path / "f")], "is a file, not a folder"),
                         (["--dataset", str(tmp_path / "f")], "is a file; give the folder")):
        args = parse_with_presets(nft.Args, nft.PRESETS, nft.TINY_PRESETS, ["--model", "flux1", "--tiny", *extra])
        with pytest.raises(USER_ERRORS, match=match):
            nft.main(args)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    (tmp_path / "train.txt").write_bytes("\ufeffa red cube\na blue ball\n".encode("utf-8"))
    assert [it.prompt for it in load_split(str(tmp_path))] == ["a red cube", "a blue ball"]
