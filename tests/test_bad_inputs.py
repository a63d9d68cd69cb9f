"""Bad input, table-driven (in-process, tiny FLUX.1): each stops with one user-facing error line naming the problem,
and writes nothing (the output folder stays absent); the exit code and the `error:` line of the real command line
are covered by tests/test_grpo.py::test_cli_error_is_one_line_and_nonzero."""
from pathlib import Path

import pytest

import grpo
import nft
from common.cli import parse_with_presets
from common.errors import USER_ERRORS
from common.data import load_split


class RaisingReward:
    def __call__(self, images, prompts, metadata):
        raise ZeroDivisionError("my reward divided by zero")


def none_reward(images, prompts, metadata):
    return None


def constant_reward(images, prompts, metadata):
    return images.new_ones(len(images))


CASES = [
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--gradient-steps-per-epoch", "0"], "--gradient-steps-per-epoch must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--resolution", "0"], "training size: flux1: height and width must be positive multiples of 16, got 0x0"),
    (["--resolution", "50"], "multiples of 16, got 50x50"),
    (["--eval-resolution", "64", "80", "96"], "a resolution is SIZE or HEIGHT WIDTH"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--max-sequence-length", "0"], "--max-sequence-length must be >= 1"),
    (["--dynamics", "CPS", "--noise-level", "1.5", "--sde-window-range", "0", "3"],
     "--noise-level must be <= 1 with --dynamics CPS"),
    (["--dynamics", "CPS", "--noise-level", "0.8"], r"--dynamics CPS: the last step \(to sigma 0\) is deterministic"),
    (["--num-epochs", "-1"], "--num-epochs must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--clip-range", "-0.1"], "--clip-range must be > 0"),
    (["--ema-decay", "1.5"], r"--ema-decay must lie in \[0, 1\]"),
    (["--rollout-batch-size", "3"], "must be a multiple of --batch-size"),
    (["--fsdp"], "--fsdp shards over processes"),
    (["--reward", "tests.test_bad_inputs.RaisingReward"],
     "reward 'tests.test_bad_inputs.RaisingReward' failed: ZeroDivisionError: my reward divided by zero"),
    (["--reward", "tests.test_bad_inputs.none_reward"], "reward 'tests.test_bad_inputs.none_reward' returned None"),
    (["--model-path", "/nonexistent/flux"], "--model-path /nonexistent/flux is not a folder"),
]


@pytest.mark.parametrize("extra,match", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(extra, match, tmp_path):
    out = tmp_path / "out"
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "flux1", "--tiny", "--log-with",
                              "none", "--num-epochs", "1", "--output-dir", str(out), *extra])
    with pytest.raises(USER_ERRORS, match=match) as e:
        grpo.main(args)
    assert "\n" not in str(e.value)
    assert not out.exists()  # a failing reward too: it scores two gray samples before anything is written


def test_output_dir_that_is_a_file_and_dataset_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for extra, match in ((["--output-dir", str(tmp_path / "f")], "is a file, not a folder"),
                         (["--dataset", str(tmp_path / "f")], "is a file; give the folder")):
        args = parse_with_presets(nft.Args, nft.PRESETS, nft.TINY, ["--model", "flux1", "--tiny", *extra])
        with pytest.raises(USER_ERRORS, match=match):
            nft.main(args)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    (tmp_path / "train.txt").write_bytes("\ufeffa red cube\na blue ball\n".encode("utf-8"))
    assert [it.prompt for it in load_split(str(tmp_path))] == ["a red cube", "a blue ball"]


def _read_only_folder(tmp_path):
    """A folder this process cannot write in: chmod where that binds (not root), else sysfs (root too)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_text("x")
    except OSError:
        return d
    (d / "probe").unlink()
    return Path("/sys/kernel")


def test_read_only_output_folder_is_one_line_fresh_and_on_resume(tmp_path):
    ro = _read_only_folder(tmp_path)
    for out, extra in ((ro / "run", []), (ro, ["--resume-from", "latest"])):  # cannot be created; exists read-only
        args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "flux1", "--tiny",
                                  "--log-with", "none", "--output-dir", str(out), *extra])
        with pytest.raises(USER_ERRORS, match="--output-dir .*: cannot write in ") as e:
            grpo.main(args)
        assert "\n" not in str(e.value)
    assert not (ro / "run").exists()


def test_a_constant_reward_warns_of_zero_advantages(tmp_path, capsys):
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, [
        "--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "1", "--eval-every", "0",
        "--output-dir", str(tmp_path / "out"), "--reward", "tests.test_bad_inputs.constant_reward"])
    grpo.main(args)
    out = capsys.readouterr().out
    assert "warning: epoch 0: every advantage is 0" in out
