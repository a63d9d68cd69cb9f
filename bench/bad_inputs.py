"""Wrong inputs, measured from outside: each case is the real command line (tiny models, a subprocess), judged by
what a user sees: exit code != 0, stderr exactly one non-empty line and it starts with `error:` (no traceback, no
multi-line box), and the output folder unchanged (absent, or the same files with the same bytes). Prints a
markdown table and the count; exits 1 if any case fails.

    python bench/bad_inputs.py              # every case, 2 at a time
    python bench/bad_inputs.py -k resume    # the cases whose name contains "resume"
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "1"]


def snapshot(path):
    """{relative file: sha1} of a folder (None when absent)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": hashlib.sha1(open(path, "rb").read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def run(cmd, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def fixtures(tmp):
    """Files, datasets and finished runs the cases point at."""
    f = {"tmp": tmp}
    f["file"] = os.path.join(tmp, "a_file")
    open(f["file"], "w").write("x")

    def dataset(name, files):
        d = os.path.join(tmp, name)
        os.makedirs(os.path.join(d, "images"), exist_ok=True)
        for rel, content in files.items():
            with open(os.path.join(d, rel), "wb") as fh:
                fh.write(content if isinstance(content, bytes) else content.encode())
        return d
    f["bad_json"] = dataset("bad_json", {"train.jsonl": '{"prompt": "a"}\n{"prompt": "b",\n'})
    f["no_prompt"] = dataset("no_prompt", {"train.jsonl": '{"prompt": "a"}\n{"negative_prompt": "b"}\n'})
    f["prompt_type"] = dataset("prompt_type", {"train.jsonl": '{"prompt": 3}\n'})
    f["empty"] = dataset("empty", {"train.txt": "\n\n"})
    f["latin1"] = dataset("latin1", {"train.txt": "caf\xe9 au lait\n".encode("latin-1")})
    f["no_split"] = dataset("no_split", {"prompts.txt": "a\n"})
    f["missing_image"] = dataset("missing_image", {"train.jsonl": '{"prompt": "a", "image": "nope.png"}\n'})
    f["broken_image"] = dataset("broken_image", {"train.jsonl": '{"prompt": "a", "image": "x.png"}\n',
                                                 "images/x.png": b"not a png"})
    f["missing_video"] = dataset("missing_video", {"train.jsonl": '{"prompt": "a", "video": "nope.mp4"}\n'})
    f["text_only"] = dataset("text_only", {"train.txt": "a red cube\na blue ball\n"})
    # finished runs: grpo (LoRA rank 4) and nft, one epoch each, a checkpoint each
    for name, script in (("grpo_run", "grpo.py"), ("nft_run", "nft.py")):
        out = os.path.join(tmp, name)
        r = run([script, *TINY, "--eval-every", "0", "--output-dir", out])
        assert r.returncode == 0, r.stderr[-2000:]
        f[name] = out
    ckpt = os.path.join(f["grpo_run"], "checkpoints")
    f["ckpt"] = os.path.join(ckpt, sorted(os.listdir(ckpt))[-1])

    def broken_copy(name, edit):
        out = os.path.join(tmp, name)
        shutil.copytree(f["grpo_run"], out)
        c = os.path.join(out, "checkpoints", os.path.basename(f["ckpt"]))
        edit(c)
        return out
    f["truncated"] = broken_copy("truncated", lambda c: _truncate(os.path.join(c, _first_safetensors(c))))
    f["empty_state"] = broken_copy("empty_state", lambda c: open(os.path.join(c, "state.json"), "w").close())
    f["other_run"] = f["grpo_run"]
    return f


def _first_safetensors(c):
    return sorted(n for n in os.listdir(c) if n.endswith(".safetensors"))[0]


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def cases(f):
    """(name, argv, output folder to watch)."""
    out = os.path.join(f["tmp"], "fresh")  # must stay absent
    g = ["grpo.py", *TINY, "--output-dir", out]
    flags = [  # every numeric flag outside its range, and flags that do not fit together
        ("learning-rate -1", ["--learning-rate", "-1"]), ("weight-decay -1", ["--weight-decay", "-1"]),
        ("max-grad-norm 0", ["--max-grad-norm", "0"]), ("batch-size 0", ["--batch-size", "0"]),
        ("gradient-steps-per-epoch 0", ["--gradient-steps-per-epoch", "0"]),
        ("gradient steps not dividing", ["--gradient-steps-per-epoch", "3"]),
        ("num-inner-epochs 0", ["--num-inner-epochs", "0"]), ("num-epochs -1", ["--num-epochs", "-1"]),
        ("eval-every -1", ["--eval-every", "-1"]), ("save-every 0", ["--save-every", "0"]),
        ("checkpoints-total-limit 0", ["--checkpoints-total-limit", "0"]), ("lora-rank 0", ["--lora-rank", "0"]),
        ("lora-alpha 0", ["--lora-alpha", "0"]), ("max-sequence-length 0", ["--max-sequence-length", "0"]),
        ("num-steps 0", ["--num-steps", "0"]), ("eval-num-steps 0", ["--eval-num-steps", "0"]),
        ("eval-num-prompts 0", ["--eval-num-prompts", "0"]), ("eval-batch-size 0", ["--eval-batch-size", "0"]),
        ("prompts-per-epoch 0", ["--prompts-per-epoch", "0"]), ("group-size 1", ["--group-size", "1"]),
        ("clip-range -0.1", ["--clip-range", "-0.1"]), ("adv-clip 0", ["--adv-clip", "0"]),
        ("kl-beta -1", ["--kl-beta", "-1"]), ("ema-interval 0", ["--ema-interval", "0"]),
        ("ema-decay 1.5", ["--ema-decay", "1.5"]), ("noise-level 0", ["--noise-level", "0"]),
        ("CPS noise-level 1.5", ["--dynamics", "CPS", "--noise-level", "1.5", "--sde-window-range", "0", "3"]),
        ("CPS window reaching the last step", ["--dynamics", "CPS", "--noise-level", "0.8"]),
        ("guidance-scale -1", ["--guidance-scale", "-1"]), ("true-cfg-scale -1", ["--true-cfg-scale", "-1"]),
        ("sde-window-size 0", ["--sde-window-size", "0"]), ("sde-window-range 3 1", ["--sde-window-range", "3", "1"]),
        ("sde window past the steps", ["--sde-window-size", "3", "--num-steps", "2"]),
        ("resolution 0", ["--resolution", "0"]), ("resolution 50", ["--resolution", "50"]),
        ("eval-resolution three numbers", ["--eval-resolution", "64", "80", "96"]),
        ("rollout-batch-size 3", ["--rollout-batch-size", "3"]), ("fsdp on one process", ["--fsdp"]),
        ("reward-frame-stride 0", ["--reward-frame-stride", "0"]),
        ("guidance-scale-2 on flux1", ["--guidance-scale-2", "3"]),
        ("lora target matching nothing", ["--lora-targets", "attn.not_a_layer"]),
        ("unknown reward", ["--reward", "no_such_reward"]), ("reward weight not a number", ["--reward", "clip:x"]),
        ("reward given twice", ["--reward", "jpeg_compressibility", "jpeg_compressibility"]),
        ("reward module missing", ["--reward", "no_such_pkg.Reward"]),
        ("remote reward server down", ["--reward", "pick=http://127.0.0.1:9/"]),
        ("reward-paths without =", ["--reward-paths", "pickscore"]),
        ("reward that raises", ["--reward", "tests.test_bad_inputs.RaisingReward"]),
        ("reward that returns None", ["--reward", "tests.test_bad_inputs.none_reward"]),
        ("unknown model", ["--model", "no-such-model"]), ("unknown variant", ["--variant", "nope"]),
        ("model-path not a folder", ["--model-path", "/nonexistent/flux"]),
    ]
    rows = [(name, g + extra, out) for name, extra in flags]
    rows += [
        ("nft nft-beta 0", ["nft.py", *TINY, "--output-dir", out, "--nft-beta", "0"], out),
        ("nft timestep-range 0.9 0.1", ["nft.py", *TINY, "--output-dir", out, "--timestep-range", "0.9", "0.1"], out),
        ("awm time-shift 0", ["awm.py", *TINY, "--output-dir", out, "--time-shift", "0"], out),
        ("guard learning-rate 0", ["grpo_guard.py", *TINY, "--output-dir", out, "--learning-rate", "0"], out),
        ("wan num-frames 4", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out, "--num-frames", "4"],
         out),
        ("wan eval-num-frames 6", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out,
                                   "--eval-num-frames", "6"], out),
        ("wan A14B experts unreachable", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--variant", "2.2-a14b",
                                          "--train-experts", "low", "--sde-window-range", "0", "2", "--output-dir",
                                          out], out),
        ("output-dir is a file", g[:-2] + ["--output-dir", f["file"]], f["file"]),
        ("dataset is a file", g + ["--dataset", f["file"]], out),
        ("dataset missing", g + ["--dataset", "/nonexistent/data"], out),
        ("dataset without train split", g + ["--dataset", f["no_split"]], out),
        ("jsonl line malformed", g + ["--dataset", f["bad_json"]], out),
        ("jsonl row without prompt", g + ["--dataset", f["no_prompt"]], out),
        ("jsonl prompt not a string", g + ["--dataset", f["prompt_type"]], out),
        ("train.txt empty", g + ["--dataset", f["empty"]], out),
        ("train.txt not UTF-8", g + ["--dataset", f["latin1"]], out),
        ("condition image missing", ["grpo.py", "--model", "flux1-kontext", "--tiny", "--output-dir", out,
                                     "--dataset", f["missing_image"]], out),
        ("condition image unreadable", ["grpo.py", "--model", "flux1-kontext", "--tiny", "--output-dir", out,
                                        "--dataset", f["broken_image"]], out),
        ("edit model without images", ["grpo.py", "--model", "flux1-kontext", "--tiny", "--output-dir", out,
                                       "--dataset", f["text_only"]], out),
        ("video missing", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out, "--dataset",
                           f["missing_video"]], out),
        ("fresh run into another run's folder", ["grpo.py", *TINY, "--output-dir", f["other_run"]], f["other_run"]),
        ("resume-from a missing folder", g + ["--resume-from", "/nonexistent/checkpoint-1"], out),
        ("resume an nft checkpoint by grpo", ["grpo.py", *TINY, "--output-dir", f["nft_run"], "--resume-from",
                                              "latest"], f["nft_run"]),
        ("resume with another LoRA rank", ["grpo.py", *TINY, "--output-dir", f["grpo_run"], "--resume-from",
                                           "latest", "--num-epochs", "2", "--lora-rank", "8"], f["grpo_run"]),
        ("resume a truncated checkpoint file", ["grpo.py", *TINY, "--output-dir", f["truncated"], "--resume-from",
                                                os.path.join(f["truncated"], "checkpoints",
                                                             os.path.basename(f["ckpt"])), "--num-epochs", "2"],
         f["truncated"]),
        ("resume an empty state.json", ["grpo.py", *TINY, "--output-dir", f["empty_state"], "--resume-from",
                                        os.path.join(f["empty_state"], "checkpoints", os.path.basename(f["ckpt"])),
                                        "--num-epochs", "2"], f["empty_state"]),
        ("read-only output folder, fresh", ["grpo.py", *TINY, "--output-dir", "/sys/rl-bench-out"],
         "/sys/rl-bench-out"),
        ("read-only output folder, resume", ["grpo.py", *TINY, "--output-dir", "/sys/kernel", "--resume-from",
                                             "latest"], None),
    ]
    return rows


def judge(name, argv, watch):
    before = snapshot(watch) if watch else None
    r = run(argv)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    one_line = len(lines) == 1 and lines[0].startswith("error:")
    unchanged = watch is None or snapshot(watch) == before
    return dict(name=name, rc=r.returncode, one_line=one_line, unchanged=unchanged,
                ok=r.returncode != 0 and one_line and unchanged, line=lines[0] if one_line else " / ".join(lines[-3:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="only the cases whose name contains this")
    ap.add_argument("-j", type=int, default=2, help="cases at a time")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bad-inputs-")
    try:
        rows = [c for c in cases(fixtures(tmp)) if a.k in c[0]]
        with concurrent.futures.ThreadPoolExecutor(a.j) as pool:
            results = list(pool.map(lambda c: judge(*c), rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| wrong input | exit | one `error:` line | folder unchanged | what the user reads |\n|---|---|---|---|---|")
    for res in results:
        print(f"| {res['name']} | {res['rc']} | {'yes' if res['one_line'] else 'NO'} | "
              f"{'yes' if res['unchanged'] else 'NO'} | {res['line'][:160].replace('|', '/')} |")
    good = sum(r["ok"] for r in results)
    print(f"\n{good}/{len(results)} wrong inputs: non-zero exit, one `error:` line, folder unchanged")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    sys.exit(0 if good == len(results) else 1)


if __name__ == "__main__":
    main()
