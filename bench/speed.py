"""Epoch time of grpo.py on a small FLUX.1 setting, against the transformer compute alone, with the throughput knobs
side by side: prompts encoded once (the default) or per batch, rollouts as wide as the whole epoch, torch.compile.

Setting: a 2.35M-parameter FLUX.1 transformer (2 double + 4 single blocks, 4 heads x 32), tiny CLIP and T5
(d_model 64) encoders with T5 at 512 tokens, 128x128, 10 steps (GRPO's default window: 1 Flow-SDE step of steps
1-3), 4 prompts x 4 images, micro-batch 2, LoRA r8, fp32, 1 thread. "Transformer alone" times the same forwards
(10 steps x 8 micro-batches of 2, no grad) and forward + backward passes (8 micro-batches x 1 trained step) outside
the script; the ratio epoch / transformer alone is the script's overhead (encoding, VAE decode, reward, optimizer).

    python bench/speed.py                 # ~4 minutes on 2 cores (compile ~1.5 min of it)
    python bench/speed.py --no-compile    # skip the torch.compile run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "bench/results/runs/speed")
FLAGS = ["--model", "flux1", "--resolution", "128", "--eval-resolution", "128", "--num-steps", "10", "--group-size", "4",
         "--prompts-per-epoch", "4", "--batch-size", "2", "--max-sequence-length", "512", "--lora-rank", "8",
         "--lora-alpha", "16", "--reward", "jpeg_compressibility", "--eval-every", "0", "--num-epochs", "3",
         "--dataset", os.path.join(ROOT, "datasets/demo"), "--log-with", "none", "--mixed-precision", "no",
         "--no-gradient-checkpointing", "--latent-storage-dtype", "fp32", "--overwrite"]
VARIANTS = {"default (encode once)": [], "--no-encode-once": ["--no-encode-once"],
            "--rollout-batch-size 16": ["--rollout-batch-size", "16"], "--compile full": ["--compile", "full"]}


def build_pipeline(path):
    """The benchmark's FLUX.1 pipeline (random weights), saved once."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from common.models import tiny_parts
    from common.models.flux1 import SCHEDULER_CONFIG
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return
    tok, tok2 = tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer()
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    assert abs(sum(p.numel() for p in tr.parameters()) - 2.354e6) < 1e4
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_parts.kl_vae_8x(0.3611, 0.1159),
                 text_encoder=tiny_parts.clip_text_encoder(tok, 32), tokenizer=tok,
                 text_encoder_2=tiny_parts.t5_encoder(tok2, 64), tokenizer_2=tok2, transformer=tr, image_encoder=None,
                 feature_extractor=None).save_pretrained(path)


def transformer_alone(path, repeats=3):
    """Seconds of the epoch's transformer work alone: 80 no-grad forwards and 8 forward+backward passes at batch 2."""
    import torch

    from common import models
    torch.set_num_threads(1)
    a = models.load("flux1", path)
    a.add_lora(8, 16)
    state = a.make_state(128, 128)
    cond = a.encode_prompt(["a red cube", "a blue ball"], None, 512)
    z = a.prepare_noise(2, 128, 128, torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(80):
                a.predict(z, 0.5, cond, state, 3.5, 1.0)
        for _ in range(8):
            a.predict(z, 0.5, cond, state, 3.5, 1.0).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name, flags, model):
    out = os.path.join(OUT, name.split()[0].strip("-") or "default")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "grpo.py", *FLAGS, "--model-path", model, "--output-dir", out, *flags],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    epoch = [sum(r.get(f"time/{p}_s", 0) for p in ("rollout", "reward", "train")) for r in rows if r["epoch"] >= 0]
    return {"epoch_s": epoch[-1], "first_epoch_s": epoch[0], "encode_s": rows[0].get("time/encode_s", 0.0),
            "process_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    model = os.path.join(OUT, "model")
    build_pipeline(model)
    alone = transformer_alone(model)
    lines = [f"transformer alone: {alone:.2f} s per epoch of work (80 forwards + 8 forward/backward, batch 2)", "",
             "| run | epoch s (warm) | / transformer alone | first epoch s | encode once s | process s |",
             "|---|---|---|---|---|---|"]
    for name, flags in VARIANTS.items():
        if a.no_compile and "--compile full" in flags:
            continue
        r = run(name, flags, model)
        lines.append(f"| {name} | {r['epoch_s']:.2f} | {r['epoch_s'] / alone:.2f} | {r['first_epoch_s']:.2f} | "
                     f"{r['encode_s']:.2f} | {r['process_s']:.1f} |")
        print(lines[-1], flush=True)
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench/results/speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
