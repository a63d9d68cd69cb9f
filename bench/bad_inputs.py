"""Wrong inputs, measured from outside: each case is the real command line (tiny models, a subprocess), judged by
what a user sees: exit code != 0, stderr exactly one non-empty line and it starts with `error:` (no traceback, no
multi-line box; tqdm's redraws of its bars, which a run stopped in training drew first, are not counted), and the
output folder unchanged (absent, or the same files with the same bytes; training gone NaN: no lora/ exported).
Prints a markdown table and the count; exits 1 if any case fails.

    python bench/bad_inputs.py              # every case, 2 at a time
    python bench/bad_inputs.py -k resume    # the cases whose name contains "resume" (-k again: or another)
    python bench/bad_inputs.py -k path --json bench/results/bad_inputs.json --merge   # rerun some, keep the rest

The finished runs that the resume cases need (two tiny trainings) are made only when a selected case needs them.
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

from faults import user_lines  # noqa: E402 (bench/, beside this file)

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
    # issue 21: paths out of the dataset's folders (each pointing at a valid image, so only the confinement stops it)
    f["secret"] = os.path.join(tmp, "secret.png")
    _png(f["secret"], 64, 64)
    f["dotdot"] = dataset("dotdot", {"train.jsonl": '{"prompt": "a", "image": "../../secret.png"}\n'})
    f["absolute"] = dataset("absolute", {"train.jsonl": json.dumps({"prompt": "a", "image": f["secret"]}) + "\n"})
    f["symlink"] = dataset("symlink", {"train.jsonl": '{"prompt": "a", "image": "link.png"}\n'})
    os.symlink(f["secret"], os.path.join(f["symlink"], "images", "link.png"))
    f["video_out"] = dataset("video_out", {"train.jsonl": '{"prompt": "a", "video": "../../secret.mp4"}\n'})
    f["not_image"] = dataset("not_image", {"train.jsonl": '{"prompt": "a", "image": "notes.png"}\n',
                                           "images/notes.png": "API_KEY=not an image"})
    f["tiny_image"] = dataset("tiny_image", {"train.jsonl": '{"prompt": "a", "image": "dot.png"}\n'})
    _png(os.path.join(f["tiny_image"], "images", "dot.png"), 1, 1)
    f["duplicate_key"] = dataset("duplicate_key", {"train.jsonl": '{"prompt": "a", "prompt": "b"}\n'})
    f["damaged_video"] = dataset("damaged_video", {"train.jsonl": '{"prompt": "a", "video": "clip.mp4"}\n'})
    _damaged_video(os.path.join(f["damaged_video"], "videos", "clip.mp4"))
    # issue 27: text read only by "\n" lines, lone surrogates, blank prompts, media folders linking out of the dataset
    f["u2028_then_bad"] = dataset("u2028_then_bad", {"train.jsonl": '{"prompt": "a\u2028b"}\n{"prompt": "c",\n'})
    f["surrogate"] = dataset("surrogate", {"train.jsonl": '{"prompt": "a"}\n{"prompt": "a \\ud800 b"}\n'})
    f["blank_prompt"] = dataset("blank_prompt", {"train.jsonl": '{"prompt": "a"}\n{"prompt": "   "}\n'})
    f["images_root"] = dataset("images_root", {"train.jsonl": json.dumps({"prompt": "a", "image": f["secret"][1:]})
                                               + "\n"})
    os.rmdir(os.path.join(f["images_root"], "images"))
    os.symlink("/", os.path.join(f["images_root"], "images"))  # images/ -> /: every file of the machine "inside"
    f["videos_root"] = dataset("videos_root", {"train.jsonl": json.dumps({"prompt": "a", "video": f["secret"][1:]})
                                               + "\n"})
    os.symlink("/", os.path.join(f["videos_root"], "videos"))
    # issue 27: a model folder given as --output-dir (--overwrite must not empty it), a lock path that is a folder
    f["model_dir"] = os.path.join(tmp, "model_dir")
    for rel, content in (("config.json", '{"_class_name": "FluxPipeline"}'), ("model_index.json", "{}"),
                         ("transformer/config.json", "{}"), ("samples/mine.png", "png")):
        os.makedirs(os.path.dirname(os.path.join(f["model_dir"], rel)), exist_ok=True)
        open(os.path.join(f["model_dir"], rel), "w").write(content)
    f["lock_dir"] = os.path.join(tmp, "lock_dir")
    os.makedirs(os.path.join(f["lock_dir"], ".run.lock"))
    f["nan_out"] = os.path.join(tmp, "nan_out")
    # issue 30: --config files with a key of another script, a value of the wrong type
    f["config_other"] = os.path.join(tmp, "other.yaml")
    open(f["config_other"], "w").write("model: flux1\ntiny: true\nnft_beta: 0.5\n")
    f["config_type"] = os.path.join(tmp, "type.json")
    open(f["config_type"], "w").write('{"model": "flux1", "learning_rate": "fast"}')
    # issue 21: a folder another run is writing to (a process holding its lock), a reward URL answering HTML
    f["procs"] = []
    f["locked"] = os.path.join(tmp, "locked")
    os.makedirs(f["locked"])
    f["procs"].append(_background(["-c", "import sys, time; from common.lock import OutputLock; "
                                   "OutputLock(sys.argv[1]).acquire(); print('ready', flush=True); time.sleep(3600)",
                                   f["locked"]]))
    site = os.path.join(tmp, "site")
    os.makedirs(site)
    open(os.path.join(site, "health"), "w").write("<html><body>Please sign in</body></html>")
    f["html_port"] = _free_port()
    f["procs"].append(_background(["-u", "-c", "import http.server, functools, sys; print('ready', flush=True); "
                                   "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), functools.partial("
                                   "http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])).serve_forever()",
                                   str(f["html_port"]), site]))
    # finished runs (made by finished_runs, only when a selected case needs them)
    for name in RUNS:
        f[name] = os.path.join(tmp, name)
    f["ckpt"] = os.path.join(f["grpo_run"], "checkpoints", "checkpoint-N")  # the newest, once made
    f["other_run"] = f["grpo_run"]
    return f


RUNS = ("grpo_run", "nft_run", "truncated", "empty_state", "nan_weights", "no_optimizer", "no_ema")


def finished_runs(f):
    """grpo (LoRA rank 4) and nft, one epoch each, a checkpoint each; copies of the grpo run with a truncated
    checkpoint file and an empty state.json."""
    for name, script in (("grpo_run", "grpo.py"), ("nft_run", "nft.py")):
        r = run([script, *TINY, "--eval-every", "0", "--output-dir", f[name]])
        assert r.returncode == 0, r.stderr[-2000:]
    ckpt = os.path.join(f["grpo_run"], "checkpoints")
    newest = sorted(os.listdir(ckpt))[-1]
    f["ckpt"] = os.path.join(ckpt, newest)

    def broken_copy(name, edit):
        shutil.copytree(f["grpo_run"], f[name])
        edit(os.path.join(f[name], "checkpoints", newest))
    broken_copy("truncated", lambda c: _truncate(os.path.join(c, _first_safetensors(c))))
    broken_copy("empty_state", lambda c: open(os.path.join(c, "state.json"), "w").close())
    broken_copy("nan_weights", _nan_weights)
    broken_copy("no_optimizer", lambda c: os.remove(os.path.join(c, "optimizer.safetensors")))
    broken_copy("no_ema", lambda c: os.remove(os.path.join(c, "ema.safetensors")))


def _nan_weights(c):
    r = run(["-c", "import sys; from safetensors.torch import load_file, save_file\n"
                   "t = load_file(sys.argv[1]); k = sorted(t)[0]; t[k].view(-1)[0] = float('nan')\n"
                   "save_file(t, sys.argv[1])", os.path.join(c, "trainable.safetensors")])
    assert r.returncode == 0, r.stderr[-2000:]


def _png(path, w, h):
    """An RGB PNG of w x h, written without PIL (the bench imports nothing heavy)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    rows = b"".join(b"\0" + bytes([200, 100, 50]) * w for _ in range(h))
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _damaged_video(path):
    """A 20-frame mp4 (written by the project's common.video) whose first frames decode and the rest is garbage."""
    code = ("import sys, torch, av; from common.video import write_video\n"
            "t = torch.linspace(0, 1, 20).view(20, 1, 1, 1)\n"
            "p = write_video(sys.argv[1], (t * torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)))"
            ".clamp(0, 1), fps=12)\n"
            "c = av.open(p); sizes = [k.size for k in c.demux(c.streams.video[0]) if k.size]; c.close()\n"
            "raw = bytearray(open(p, 'rb').read()); start = raw.find(b'mdat') + 4 + sum(sizes[:12])\n"
            "raw[start:start + sum(sizes[12:])] = bytes((i * 131 + 7) % 256 for i in range(sum(sizes[12:])))\n"
            "open(p, 'wb').write(bytes(raw))\n")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    r = run(["-c", code, path])
    assert r.returncode == 0, r.stderr[-2000:]


def _background(argv):
    """A helper process started here (killed at the end), once it prints that it is ready."""
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL)
    assert p.stdout.readline().strip() == "ready"
    return p


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        *[(f"{flag} {value}", [f"--{flag}", value]) for flag, value in (  # issue 27: NaN and inf pass comparisons
            ("learning-rate", "inf"), ("learning-rate", "nan"), ("weight-decay", "nan"), ("max-grad-norm", "nan"),
            ("guidance-scale", "nan"), ("adv-clip", "nan"), ("clip-range", "nan"), ("kl-beta", "nan"),
            ("noise-level", "nan"))],
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
        ("image path escaping the dataset with ..", g + ["--dataset", f["dotdot"]], out),
        ("image path absolute, outside the dataset", g + ["--dataset", f["absolute"]], out),
        ("image symlink pointing outside the dataset", ["grpo.py", "--model", "flux1-kontext", "--tiny",
                                                        "--output-dir", out, "--dataset", f["symlink"]], out),
        ("video path escaping the dataset with ..", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out,
                                                     "--dataset", f["video_out"]], out),
        ("text-to-image row whose image is not an image", g + ["--dataset", f["not_image"]], out),
        ("video damaged after its first frames", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out,
                                                  "--dataset", f["damaged_video"]], out),
        ("condition image 1x1 (flux1-kontext)", ["grpo.py", "--model", "flux1-kontext", "--tiny", "--output-dir", out,
                                                 "--dataset", f["tiny_image"]], out),
        ("jsonl row with a duplicate key", g + ["--dataset", f["duplicate_key"]], out),
        ("jsonl malformed after a raw U+2028 line", g + ["--dataset", f["u2028_then_bad"]], out),
        ("jsonl prompt with a lone surrogate", g + ["--dataset", f["surrogate"]], out),
        ("jsonl prompt of only whitespace", g + ["--dataset", f["blank_prompt"]], out),
        ("images folder a symlink to /", g + ["--dataset", f["images_root"]], out),
        ("videos folder a symlink to /", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--output-dir", out, "--dataset",
                                          f["videos_root"]], out),
        ("--overwrite into a model folder", ["grpo.py", *TINY, "--output-dir", f["model_dir"], "--overwrite"],
         f["model_dir"]),
        ("fresh run into a model folder", ["grpo.py", *TINY, "--output-dir", f["model_dir"]], f["model_dir"]),
        ("lock file that is a folder", ["grpo.py", *TINY, "--output-dir", f["lock_dir"]], f["lock_dir"]),
        ("--config with a key of another script", g + ["--config", f["config_other"]], out),
        ("--config with a value of the wrong type", g + ["--config", f["config_type"]], out),
        ("training that goes non-finite (--learning-rate 1e30)", ["grpo.py", *TINY, "--num-epochs", "2",
                                                                   "--output-dir", f["nan_out"], "--learning-rate",
                                                                   "1e30"], os.path.join(f["nan_out"], "lora")),
        ("resume a checkpoint whose weights hold NaN", ["grpo.py", *TINY, "--output-dir", f["nan_weights"],
                                                        "--resume-from", os.path.join(f["nan_weights"], "checkpoints",
                                                                                      os.path.basename(f["ckpt"])),
                                                        "--num-epochs", "2"], f["nan_weights"]),
        ("resume latest, its only checkpoint without optimizer.safetensors",
         ["grpo.py", *TINY, "--output-dir", f["no_optimizer"], "--resume-from", "latest", "--num-epochs", "2"],
         f["no_optimizer"]),
        ("resume a checkpoint without ema.safetensors", ["grpo.py", *TINY, "--output-dir", f["no_ema"], "--resume-from",
                                                         os.path.join(f["no_ema"], "checkpoints",
                                                                      os.path.basename(f["ckpt"])), "--num-epochs",
                                                         "2"], f["no_ema"]),
        ("output folder another run is writing to", ["grpo.py", *TINY, "--output-dir", f["locked"]], f["locked"]),
        ("remote reward answering an HTML page", g + ["--reward", f"proxy=http://127.0.0.1:{f['html_port']}"], out),
        ("resume a LoRA run with --finetune full", ["grpo.py", *TINY, "--output-dir", f["grpo_run"], "--resume-from",
                                                    "latest", "--num-epochs", "2", "--finetune", "full"],
         f["grpo_run"]),
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
    lines = user_lines(r.stderr)  # a run stopped in training drew progress bars first: they are not lines read
    one_line = len(lines) == 1 and lines[0].startswith("error:")
    unchanged = watch is None or snapshot(watch) == before
    return dict(name=name, rc=r.returncode, one_line=one_line, unchanged=unchanged,
                ok=r.returncode != 0 and one_line and unchanged, line=lines[0] if one_line else " / ".join(lines[-3:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", action="append", help="only the cases whose name contains this (repeatable: any of them)")
    ap.add_argument("-j", type=int, default=2, help="cases at a time")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--merge", action="store_true", help="with --json: replace the rows of the cases run in that "
                    "file (by name, new ones appended in case order), keep the others, print the whole table")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bad-inputs-")
    try:
        f = fixtures(tmp)
        rows = [c for c in cases(f) if not a.k or any(k in c[0] for k in a.k)]
        if any(f[name] in " ".join(map(str, [*argv, watch])) for _, argv, watch in rows for name in RUNS):
            finished_runs(f)
            rows = [c for c in cases(f) if not a.k or any(k in c[0] for k in a.k)]  # with the checkpoint's name
        with concurrent.futures.ThreadPoolExecutor(a.j) as pool:
            results = list(pool.map(lambda c: judge(*c), rows))
        order = [c[0] for c in cases(f)]
    finally:
        for p in f.get("procs", []) if "f" in locals() else []:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.merge and a.json and os.path.exists(a.json):
        with open(a.json) as fh:
            kept = {r["name"]: r for r in json.load(fh)}
        kept.update({r["name"]: r for r in results})
        results = [kept[n] for n in order if n in kept] + [r for n, r in kept.items() if n not in order]
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
