"""common/sharding.py: torch FSDP2 (fully_shard) over gloo with 2 processes launched by `accelerate launch`.

One launch runs every 2-process scenario (tiny FLUX.1 LoRA with gradient accumulation and clipping, tiny FLUX.1
full fine-tuning, tiny Wan2.2-A14B with LoRA on both experts, a bf16-policy smoke run, an uninterrupted 4-step run
and the first 2 steps of an interrupted one, both checkpointed); a second launch (a new process group) resumes the
interrupted run. This process runs the 1-process references on the full global batch and checks equality, the
exported LoRA in the stock pipelines, and that checkpoints of sharded and unsharded runs are interchangeable.
Run directly (`python tests/test_sharding.py SCENARIO OUT`) under a launcher, this file is the worker.
"""
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
WORLD, GLOBAL_BATCH, LR, MAX_NORM = 2, 4, 1e-3, 0.02
FLUX_PROMPTS = ["a cat", "a dog", "a red cube", "two birds"]
WAN_SIGMAS = [0.95, 0.5, 0.9, 0.3]  # each rank's pair of rows spans the 0.875 boundary: both experts train on both


# ---- the training both sides run --------------------------------------------------------------------------

def build(kind, finetune, dtype=torch.float32, experts="both"):
    from common import models
    if kind == "flux1":
        a = models.load("flux1", tiny=True, dtype=dtype)
    else:
        a = models.load("wan2_t2v", tiny=True, variant="2.2-a14b", train_experts=experts, dtype=dtype)
    module = a.trained_module()
    if finetune == "lora":
        a.add_lora(4, 8)
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 LoRA on a (possibly bf16) base, as the scripts do
    else:
        module.requires_grad_(True)
    return a, module


def batch(a, kind, step):
    """The global batch of optimizer step `step` (the same on every rank and in the reference)."""
    gen = torch.Generator().manual_seed(1000 + step)
    if kind == "flux1":
        state = a.make_state(64, 64)
        cond = a.encode_prompt(FLUX_PROMPTS, max_sequence_length=16)
        z = a.prepare_noise(GLOBAL_BATCH, 64, 64, gen)
        sigma, gs = torch.tensor([0.9, 0.7, 0.5, 0.3]), 3.5
    else:
        state = a.make_state(32, 32, 1)
        cond = a.encode_prompt(FLUX_PROMPTS, max_sequence_length=16)
        z = a.prepare_noise(GLOBAL_BATCH, 32, 32, gen, 1)
        sigma, gs = torch.tensor(WAN_SIGMAS), 1.0
    target = torch.randn(z.shape, generator=gen)
    return z, sigma, cond, state, target, gs


def predict_rows(a, kind, rank):
    """A no-grad forward of batch 7 on rows that differ by rank (rank r: rows r, r + 2): the rows of the full batch
    in the order [0, 2, 1, 3] once gathered."""
    z, sigma, cond, state, _, gs = batch(a, kind, 7)
    rows = torch.tensor([rank, rank + 2])
    with torch.no_grad():
        return a.predict(z[rows], sigma[rows], a.select(cond, rows), state, gs).reshape(1, -1)


def train(a, kind, module, params, opt, emas, steps, rank=0, world=1, accum=1, clip=True):
    """Optimizer steps `steps` on this rank's contiguous share of the global batch, in `accum` micro-steps, each
    loss a mean scaled so that the gradient (averaged over ranks by FSDP) is the full-batch mean gradient."""
    from common import sharding
    norms, losses = [], []
    per = GLOBAL_BATCH // world
    for step in steps:
        z, sigma, cond, state, target, gs = batch(a, kind, step)
        mine = torch.arange(rank * per, (rank + 1) * per)
        for m, rows in enumerate(mine.chunk(accum)):
            sync = m == accum - 1
            with nullcontext() if sync else sharding.no_sync(module):
                v = a.predict(z[rows], sigma[rows], a.select(cond, rows), state, gs, 1.0)
                loss = ((v - target[rows]) ** 2).mean() / accum
                loss.backward()
                losses.append(loss.detach() * accum)
            if not sync and sharding.is_sharded(module):  # no reduce-scatter yet: no sharded gradient
                assert all(p.grad is None for p in params.values())
        norms.append(float(sharding.clip_grad_norm_(params.values(), MAX_NORM if clip else 1e9)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        for e in emas:
            e.step(step)
    return norms, losses


def make_opt(params):
    from common.ema import EMA
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.01)
    return opt, EMA(params.values(), interval=1, schedule="power", decay=0.9), \
        EMA(params.values(), interval=1, schedule="constant", decay=0.5)


def trainable(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


# ---- the 2-process worker -----------------------------------------------------------------------------------

def worker(scenario, out):
    from accelerate import Accelerator

    from common import checkpoint, sharding
    accelerator = Accelerator(cpu=True)  # as the scripts: the gloo process group of `accelerate launch`
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == WORLD and torch.distributed.get_backend() == "gloo"
    assert sharding.any_rank(torch.tensor([rank == 0, False])).tolist() == [True, False]
    results = {}

    def write(name, tensors):
        sd = sharding.gather_full(tensors)
        if rank == 0:
            from safetensors.torch import save_file
            save_file(sd, os.path.join(out, f"{name}.safetensors"))

    def run(kind, finetune, steps, accum=1, dtype=torch.float32, mp="no", experts="both", checkpointing=False):
        torch.manual_seed(0)
        a, module = build(kind, finetune, dtype, experts)
        if checkpointing:
            module.enable_gradient_checkpointing()
        sharding.shard_module(module, mp)
        params = trainable(module)  # after sharding: fully_shard replaces the Parameters
        opt, ema, old = make_opt(params)
        opt = accelerator.prepare(opt)
        t = time.time()
        norms, losses = train(a, kind, module, params, opt, (ema, old), steps, rank, world, accum)
        results[f"{kind}_{finetune}_{mp}_{experts}"] = dict(norms=norms, seconds=time.time() - t,
                                                  loss0=accelerator.reduce(losses[0], "mean").item())
        return a, module, params, opt, ema, old

    if scenario == "main":
        # FLUX.1 LoRA, 2 micro-steps per optimizer step (no_sync), clipping active
        a, module, params, opt, ema, old = run("flux1", "lora", range(2), accum=2)
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in params.values())
        sd = sharding.full_state_dict(module)
        with ema.swapped_in():  # the scripts' export and evaluation weights
            sd_ema = sharding.full_state_dict(module)
            v_ema = predict_rows(a, "flux1", rank)  # an evaluation-like forward: different rows per rank
        v = predict_rows(a, "flux1", rank)
        write("flux1_lora_pred", {"v": accelerator.gather(v), "v_ema": accelerator.gather(v_ema)})
        if rank == 0:
            assert set(sd) == set(params)
            from safetensors.torch import save_file
            save_file(sd, os.path.join(out, "flux1_lora.safetensors"))
            save_file(sd_ema, os.path.join(out, "flux1_lora_ema.safetensors"))
            checkpoint.save_lora(a, os.path.join(out, "flux1_lora_export"), sd)
        # FLUX.1 full fine-tuning
        a, module, params, *_ = run("flux1", "full", range(2))
        write("flux1_full", params)
        sd = sharding.full_state_dict(module, trainable_only=False)
        if rank == 0:
            checkpoint.save_full(a, os.path.join(out, "flux1_full_export"), sd)
        # Wan2.2-A14B, LoRA on both experts, rows of both experts on every rank, gradient checkpointing
        a, module, params, *_ = run("wan", "lora", range(2), checkpointing=True)
        sd = sharding.full_state_dict(module)
        if rank == 0:
            assert set(sd) == set(params)
            from safetensors.torch import save_file
            save_file(sd, os.path.join(out, "wan_lora.safetensors"))
            checkpoint.save_lora(a, os.path.join(out, "wan_lora_export"), sd)
        # Wan2.2-A14B, only the low-noise expert trains (the high one rides along unsharded)
        a, module, params, *_ = run("wan", "lora", range(2), experts="low")
        write("wan_low_lora", params)
        # bf16 parameters / fp32 reduction on a bf16 base with fp32 LoRA
        a, module, params, *_ = run("flux1", "lora", range(1), dtype=torch.bfloat16, mp="bf16")
        results["bf16_dtypes"] = sorted({str(p.dtype) for p in params.values()})
        results["bf16_grad_free"] = all(p.grad is None for p in params.values())
        # resume: an uninterrupted 4-step run and the first 2 steps of an interrupted one
        for name, steps in (("a", range(4)), ("b", range(2))):
            a, module, params, opt, ema, old = run("flux1", "lora", steps)
            checkpoint.save_sharded(os.path.join(out, f"ckpt_{name}"), len(steps), params, opt, ema,
                                    meta={"epoch": len(steps) - 1}, extra={"old_ema": old.state_dict()})
    elif scenario == "resume":
        torch.manual_seed(0)
        a, module = build("flux1", "lora")
        sharding.shard_module(module, "no")
        params = trainable(module)
        opt, ema, old = make_opt(params)
        opt = accelerator.prepare(opt)
        path = checkpoint.resolve("latest", os.path.join(out, "ckpt_b"))
        state = checkpoint.load_sharded(path, params, opt, ema)
        sharding.load_full_into(old.state_dict(), checkpoint.load_extra(path, "old_ema", "test"))
        train(a, "flux1", module, params, opt, (ema, old), range(state["step"], 4), rank, world)
        checkpoint.save_sharded(os.path.join(out, "ckpt_b"), 4, params, opt, ema, meta={"epoch": 3},
                                extra={"old_ema": old.state_dict()})
    if rank == 0:
        with open(os.path.join(out, f"{scenario}.json"), "w") as f:
            json.dump(results, f)
    accelerator.wait_for_everyone()


def launch(scenario, out, timeout=150):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, scenario, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with open(os.path.join(out, f"{scenario}.json")) as f:
        return json.load(f)


# ---- the tests --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    t = time.time()
    results = launch("main", out)
    results["launch_seconds"] = time.time() - t
    print(f"\n2-process launch: {results['launch_seconds']:.1f} s")
    return out, results


def reference(kind, finetune, steps=range(2), accum=1):
    """The 1-process run of the same global batches: (adapter, module, params, norms)."""
    torch.manual_seed(0)
    a, module = build(kind, finetune)
    params = trainable(module)
    opt, ema, old = make_opt(params)
    norms, _ = train(a, kind, module, params, opt, (ema, old), steps, accum=accum)
    return a, module, params, norms, opt, ema, old


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_flux_lora_matches_one_process_and_export_loads(sharded):
    out, results = sharded
    a, module, params, norms, opt, ema, old = reference("flux1", "lora")
    got = load_file(out / "flux1_lora.safetensors")
    diff = max_diff(got, {k: p.detach() for k, p in params.items()})
    print(f"FLUX.1 LoRA: max |sharded - 1 process| = {diff:.3g}; grad norms {norms} vs "
          f"{results['flux1_lora_no_both']['norms']}")
    assert diff < 1e-5
    assert all(n > MAX_NORM for n in norms)  # clipping was active on both sides
    assert results["flux1_lora_no_both"]["norms"] == pytest.approx(norms, rel=1e-5)
    # EMA swapped in on the shards, gathered, and forwards with the live and the EMA weights
    ema_ref = {k: s for k, s in zip(params, ema.shadow)}
    ema_diff = max_diff(load_file(out / "flux1_lora_ema.safetensors"), ema_ref)
    pred = load_file(out / "flux1_lora_pred.safetensors")
    z, sigma, cond, state, _, gs = batch(a, "flux1", 7)
    with torch.no_grad():
        v_ref = a.predict(z, sigma, cond, state, gs)[[0, 2, 1, 3]].reshape(2, -1)
        with ema.swapped_in():
            v_ema_ref = a.predict(z, sigma, cond, state, gs)[[0, 2, 1, 3]].reshape(2, -1)
    pred_diff = max((pred["v"] - v_ref).abs().max().item(), (pred["v_ema"] - v_ema_ref).abs().max().item())
    print(f"FLUX.1 LoRA EMA: max |sharded - 1 process| = {ema_diff:.3g}; no-grad predictions {pred_diff:.3g}")
    assert ema_diff < 1e-5 and pred_diff < 1e-5
    # the exported LoRA (peft names, diffusers file) loads into a fresh stock pipeline and reproduces the reference
    from diffusers import FluxPipeline

    from common import models
    fresh = models.load("flux1", tiny=True)
    z, sigma, cond, state, _, gs = batch(fresh, "flux1", 7)
    with torch.no_grad():
        v_base = fresh.predict(z, sigma, cond, state, gs)
        FluxPipeline(**fresh.pipe.components).load_lora_weights(str(out / "flux1_lora_export"))
        v_loaded = fresh.predict(z, sigma, cond, state, gs)
        v_ref = a.predict(z, sigma, cond, state, gs)
    print(f"FLUX.1 exported LoRA: max |loaded - 1-process trained| = {(v_loaded - v_ref).abs().max():.3g}, "
          f"|trained - base| = {(v_ref - v_base).abs().max():.3g}")
    assert (v_loaded - v_ref).abs().max() < 1e-5 < (v_ref - v_base).abs().max()


def test_flux_full_finetune_matches_one_process(sharded):
    out, results = sharded
    a, module, params, norms, *_ = reference("flux1", "full")
    got = load_file(out / "flux1_full.safetensors")
    diff = max_diff(got, {k: p.detach() for k, p in params.items()})
    print(f"FLUX.1 full: max |sharded - 1 process| = {diff:.3g} over {len(got)} tensors")
    assert diff < 1e-5
    assert results["flux1_full_no_both"]["norms"] == pytest.approx(norms, rel=1e-5)
    # the full export is a diffusers folder like save_pretrained's, loadable by from_pretrained
    from diffusers import FluxTransformer2DModel
    loaded = FluxTransformer2DModel.from_pretrained(str(out / "flux1_full_export" / "transformer"))
    ref_sd = module.state_dict()
    assert max_diff(loaded.state_dict(), ref_sd) < 1e-5


def test_wan22_both_experts_lora_matches_one_process_and_export_loads(sharded):
    out, results = sharded
    a, module, params, norms, *_ = reference("wan", "lora")
    got = load_file(out / "wan_lora.safetensors")
    assert {k.split(".")[0] for k in got} == {"transformer", "transformer_2"}
    diff = max_diff(got, {k: p.detach() for k, p in params.items()})
    print(f"Wan2.2-A14B LoRA (both experts): max |sharded - 1 process| = {diff:.3g}")
    assert diff < 1e-5
    for expert in ("transformer", "transformer_2"):  # both experts trained (LoRA B starts at zero)
        assert any(v.abs().max() > 0 for k, v in got.items() if k.startswith(expert + ".") and "lora_B" in k)
    from diffusers import WanPipeline

    from common import models
    fresh = models.load("wan2_t2v", tiny=True, variant="2.2-a14b", train_experts="both")
    z, sigma, cond, state, _, gs = batch(fresh, "wan", 7)
    with torch.no_grad():
        pipe = WanPipeline(**fresh.pipe.components)
        pipe.load_lora_weights(str(out / "wan_lora_export"))
        pipe.load_lora_weights(str(out / "wan_lora_export" / "transformer_2"), load_into_transformer_2=True)
        v_loaded = fresh.predict(z, sigma, cond, state, gs)
        v_ref = a.predict(z, sigma, cond, state, gs)
    print(f"Wan2.2 exported LoRA: max |loaded - 1-process trained| = {(v_loaded - v_ref).abs().max():.3g}")
    assert (v_loaded - v_ref).abs().max() < 1e-5
    # only the low-noise expert trained: the high one unsharded and frozen on every rank
    torch.manual_seed(0)
    a, module = build("wan", "lora", experts="low")
    params = trainable(module)
    assert {k.split(".")[0] for k in params} == {"transformer_2"}
    opt, ema, old = make_opt(params)
    train(a, "wan", module, params, opt, (ema, old), range(2))
    diff = max_diff(load_file(out / "wan_low_lora.safetensors"), {k: p.detach() for k, p in params.items()})
    print(f"Wan2.2-A14B LoRA (low expert only): max |sharded - 1 process| = {diff:.3g}")
    assert diff < 1e-5


def test_bf16_policy_keeps_fp32_lora(sharded):
    _, results = sharded
    assert results["bf16_dtypes"] == ["torch.float32"] and results["bf16_grad_free"]
    a, module = build("flux1", "lora", torch.bfloat16)
    z, sigma, cond, state, target, gs = batch(a, "flux1", 0)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ref = ((a.predict(z, sigma, cond, state, gs) - target) ** 2).mean().item()
    got = results["flux1_lora_bf16_both"]["loss0"]
    print(f"bf16 policy: first loss {got:.6f} vs 1-process bf16 autocast {ref:.6f}")
    assert abs(got - ref) < 2e-2 * abs(ref)


def test_shard_module_needs_a_process_group():
    from common import sharding
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        sharding.shard_module(torch.nn.Linear(2, 2))
    assert not sharding.is_sharded(torch.nn.Linear(2, 2))
    assert sharding.gather_full({"x": torch.ones(2)})["x"].equal(torch.ones(2))  # 1 process: plain tensors pass


def test_resume_equals_uninterrupted_and_layout_matches_unsharded(sharded, tmp_path):
    from common import checkpoint
    out, _ = sharded
    t = time.time()
    launch("resume", out)
    print(f"resume launch: {time.time() - t:.1f} s")
    a_path, b_path = out / "ckpt_a" / "checkpoint-4", out / "ckpt_b" / "checkpoint-4"
    files = sorted(os.listdir(a_path))
    assert files == sorted(os.listdir(b_path)) == ["ema.safetensors", "old_ema.safetensors", "optimizer.safetensors",
                                                   "state.json", "trainable.safetensors"]
    diffs = {}
    for f in files:
        if f.endswith(".safetensors"):
            x, y = load_file(a_path / f), load_file(b_path / f)
            diffs[f] = max_diff(x, y)
    print(f"resume (sharded 2 + 2 vs 4 steps): {diffs}")
    assert all(d <= 1e-6 for d in diffs.values())
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a_path, b_path))
    assert sa == sb
    # the layout of a 1-process unsharded checkpoint of the same model
    _, _, params, _, opt, ema, old = reference("flux1", "lora")
    ref = checkpoint.save(str(tmp_path), 2, params, opt, ema, meta={"epoch": 1},
                          extra={"old_ema": old.state_dict()})
    sharded2 = out / "ckpt_b" / "checkpoint-2"
    assert sorted(os.listdir(ref)) == sorted(os.listdir(sharded2))
    for f in os.listdir(ref):
        if f.endswith(".safetensors"):
            x, y = load_file(os.path.join(ref, f)), load_file(sharded2 / f)
            assert {k: (v.shape, v.dtype) for k, v in x.items()} == {k: (v.shape, v.dtype) for k, v in y.items()}
            assert max_diff(x, y) < 1e-5
    ja, jb = (json.loads(open(os.path.join(p, "state.json")).read()) for p in (ref, sharded2))
    assert ja == jb
    # a 1-process unsharded run resumes from the sharded checkpoint and lands on the sharded 4-step run
    a, module = build("flux1", "lora")
    params = trainable(module)
    opt, ema, old = make_opt(params)
    state = checkpoint.load(str(sharded2), params, opt, ema)
    old.load_state_dict(checkpoint.load_extra(str(sharded2), "old_ema", "test"))
    train(a, "flux1", module, params, opt, (ema, old), range(state["step"], 4))
    diff = max_diff(load_file(a_path / "trainable.safetensors"), {k: p.detach() for k, p in params.items()})
    print(f"unsharded resume of the sharded checkpoint vs sharded 4 steps: {diff:.3g}")
    assert diff < 1e-5


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
