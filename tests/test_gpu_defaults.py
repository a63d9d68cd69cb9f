"""GPU defaults checked on the CPU (issue 20): the attention choice, the batches that fill the GPU, sampling with the
LoRA merged, regional compilation and the rollout's own decode phase."""
import copy
import json
import math
import subprocess
import sys
from unittest import mock

import pytest
import torch

import grpo
import nft
from common import models, plan, sampler
from common.cli import parse_with_presets
from common.kernels import choose_attention, compile_transformer
from tests.helpers import tiny_run
from tests.test_full_size import GRPO, ROOT


# ---- attention -----------------------------------------------------------------------------------------------------
@pytest.fixture
def cudnn_flag():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_attention_turns_cudnn_off_exactly_when_cuda_is_present(cudnn_flag):
    net = mock.Mock()
    torch.backends.cuda.enable_cudnn_sdp(True)
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert choose_attention([net], None) == "attention: torch scaled-dot-product attention"
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run changes nothing
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        line = choose_attention([net], None)
    assert not torch.backends.cuda.cudnn_sdp_enabled() and "cuDNN's is off" in line
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    net.set_attention_backend.assert_not_called()


def test_an_explicit_attention_backend_wins(cudnn_flag):
    nets = [mock.Mock(), mock.Mock()]
    torch.backends.cuda.enable_cudnn_sdp(True)
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        line = choose_attention(nets, "_native_cudnn")
    assert torch.backends.cuda.cudnn_sdp_enabled() and "'_native_cudnn' (--attention-backend)" in line
    for n in nets:
        n.set_attention_backend.assert_called_once_with("_native_cudnn")


# ---- batches that fill the GPU ---------------------------------------------------------------------------------------
def test_widest_batch():
    gb = plan.GB
    assert plan.widest_batch(10 * gb, 1 * gb, 2, 16) == 10    # 10 fit, a multiple of 2
    assert plan.widest_batch(11 * gb, 1 * gb, 2, 16) == 10    # 11 fit: rounded down to the step
    assert plan.widest_batch(100 * gb, 1 * gb, 2, 16) == 16   # the cap (the group size)
    assert plan.widest_batch(1 * gb, 3 * gb, 2, 16) == 2      # nothing fits: the run's own batch
    assert plan.widest_batch(-5 * gb, 1 * gb, 1, 8) == 1      # the static plan alone is over: the run's own batch


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """flux1's activations measured at 2.0 GB for batch 2 at 512x512 (a record like bench/gpu.py's)."""
    path = tmp_path / "activation_memory.json"
    settings = dict(height=512, width=512, num_frames=1, batch_size=2, finetune="lora", lora_rank=64,
                    mixed_precision="bf16", gradient_checkpointing=True)
    path.write_text(json.dumps({"runs": {"flux1": {"activation_gb": 2.0, "settings": settings}}}))
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(path))


def flux_args(*extra):
    return parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "flux1", *extra])


def test_choose_batches_is_the_widest_that_fits(measured):
    """The hand formula: free = fraction x GPU - static peak; 1 GB per 512x512 sample (2 GB at batch 2); the rollout
    batch the widest multiple of --batch-size up to the group size, evaluation up to its prompts per process."""
    args = flux_args("--group-size", "64", "--eval-resolution", "1024", "--eval-num-prompts", "64")
    meta = plan.full_adapter("flux1")
    static = plan.static_peak(plan.memory_plan(args, GRPO, 1, meta=meta))
    gpu = 80 * plan.GB
    free = 0.9 * gpu - static
    chosen = plan.choose_batches(args, GRPO, gpu, 1, meta)
    assert chosen.rollout == min(64, math.floor(free / plan.GB)) // args.batch_size * args.batch_size
    assert chosen.eval == min(64, math.floor(free / (4 * plan.GB)))  # 1024x1024: 4x the tokens
    assert 2 < chosen.rollout < 64 and 1 < chosen.eval < chosen.rollout
    assert chosen == plan.choose_batches(args, GRPO, gpu, 1, meta)  # deterministic
    # never above the group size (nor this process's evaluation prompts), however large the GPU
    huge = plan.choose_batches(args, GRPO, 10_000 * plan.GB, 1, meta)
    assert (huge.rollout, huge.eval) == (64, 64)
    # over 4 processes: 16 evaluation prompts each
    assert plan.choose_batches(args, GRPO, 10_000 * plan.GB, 4, meta).eval == 16
    # a flag the user set is kept; a smaller --gpu-memory-fraction gives a narrower batch
    kept = plan.choose_batches(flux_args("--rollout-batch-size", "4", "--eval-batch-size", "3"), GRPO, gpu, 1, meta)
    assert (kept.rollout, kept.eval) == (4, 3)
    assert plan.choose_batches(flux_args("--group-size", "64", "--gpu-memory-fraction", "0.5"), GRPO, gpu, 1,
                               meta).rollout < chosen.rollout


def test_unmeasured_model_keeps_the_cpu_batches(monkeypatch, tmp_path):
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    chosen = plan.choose_batches(flux_args(), GRPO, 80 * plan.GB)
    assert (chosen.rollout, chosen.eval) == (2, plan.EVAL_BATCH) and "not measured yet" in chosen.why


def test_fit_batches_only_on_a_gpu(measured):
    args = flux_args()
    cpu = plan.fit_batches(args, GRPO)  # no CUDA here: today's defaults
    assert cpu.rollout_batch_size is None and cpu.eval_batch_size == plan.EVAL_BATCH
    props = mock.Mock(total_memory=80 * plan.GB)
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_device_properties", return_value=props):
        gpu = plan.fit_batches(args, GRPO)
        tiny = plan.fit_batches(flux_args("--tiny"), GRPO)
    expected = plan.choose_batches(args, GRPO, 80 * plan.GB)
    assert (gpu.rollout_batch_size, gpu.eval_batch_size) == (expected.rollout, expected.eval) == (16, 32)
    assert tiny.rollout_batch_size is None and tiny.eval_batch_size == 8  # tiny builds: the CPU's


def test_plan_prints_the_chosen_batches():
    p = subprocess.run([sys.executable, "grpo.py", "--model", "flux1", "--plan"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    text = p.stdout[p.stdout.index("GPU batches:"):]
    assert text.startswith("GPU batches: rollout 16, evaluation 32;")  # from the measured FLUX.1 figure
    assert "1.74 GB at batch 2, 512x512" in text and "for a 80 GB GPU; this machine has none" in text


# ---- sampling with the LoRA merged -----------------------------------------------------------------------------------
def lora_flux():
    adapter = models.load("flux1", tiny=True)
    adapter.add_lora(4, 8)
    g = torch.Generator().manual_seed(0)
    for n, p in adapter.transformer.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: a trained LoRA is not
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return adapter


def test_merged_sampling_equals_unmerged_and_writes_nothing():
    adapter = lora_flux()
    before = copy.deepcopy(adapter.transformer.state_dict())
    state = adapter.make_state(64, 64)
    cond = adapter.encode_prompt(["a red circle", "two blue squares"], max_sequence_length=32)
    sigmas = adapter.sigmas(4, state)
    z = adapter.prepare_noise(2, 64, 64, torch.Generator().manual_seed(1))

    def roll():
        return sampler.rollout(lambda x, i: adapter.predict(x, sigmas[i], cond, state, 3.5), z, sigmas).final

    plain = roll()
    with adapter.lora_merged():
        merged = roll()
    assert (merged - plain).abs().max() < 1e-5 and (plain - z).abs().max() > 0.1
    after = adapter.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: W is never written
    assert not any("forward" in vars(m) for m in adapter.transformer.modules())  # the class forward is back
    assert torch.equal(roll(), plain)


def test_merged_sampling_in_runs(tmp_path):
    """NFT rolls out merged (its samples within float rounding of the unmerged run); GRPO with the flag still rolls
    out unmerged: its first inner step's ratio is exactly 1. A smooth reward (mean pixel): rounding differences stay
    rounding differences (JPEG sizes are steps of 8-bit pixels)."""
    runs = {m: tiny_run("nft", tmp_path / m, "--lora-merged-sampling", m, "--eval-every", "1", "--reward",
                        "tests.test_rollout_width.brightness") for m in ("True", "False")}
    merged, plain = runs["True"][-1], runs["False"][-1]
    for key in ("train/loss", "eval/reward_tests.test_rollout_width.brightness"):  # rollouts within ~1e-7: far below 1e-4 relative
        assert abs(merged[key] - plain[key]) < 1e-4 * abs(plain[key]), key
    assert merged["time/decode_s"] > 0 and "time/rollout_s" in merged  # decoding timed on its own
    g = tiny_run("grpo", tmp_path / "grpo", "--lora-merged-sampling", "True")[-1]
    assert g["train/onpolicy_ratio_dev"] == 0.0


def test_merged_sampling_refused_where_nothing_is_merged(tmp_path):
    from common.errors import ConfigError
    from tests.helpers import checks_only, tiny_args
    with pytest.raises(ConfigError, match="--lora-merged-sampling needs --finetune lora"):
        checks_only("nft", tiny_args("nft", tmp_path, "--lora-merged-sampling", "True", "--finetune", "full"))


# ---- regional compilation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["flux1", "sd3_5"])
def test_regional_compile_compiles_each_block(model):
    net = models.load(model, tiny=True).transformer
    compile_transformer(net, regional=True)
    blocks = [b for c in net.children() if isinstance(c, torch.nn.ModuleList) for b in c]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert net._compiled_call_impl is None  # the root is not compiled: only the repeated blocks


def test_nft_args_accept_compile_modes():
    for mode in ("none", "blocks", "full"):
        assert parse_with_presets(nft.Args, nft.PRESETS, nft.TINY, ["--tiny", "--compile", mode]).compile == mode


def test_a_zero_batch_reaches_the_range_check():
    """--eval-batch-size 0 is the user's value (refused by the checks), not "unset"."""
    assert plan.fit_batches(flux_args("--eval-batch-size", "0"), GRPO).eval_batch_size == 0
    chosen = plan.choose_batches(flux_args("--eval-batch-size", "0", "--rollout-batch-size", "0"), GRPO, 80 * plan.GB)
    assert (chosen.rollout, chosen.eval) == (0, 0)
