"""A full disk, for real, measured from outside: each case is the real command line (tiny models, a subprocess) with
its output folder on a small tmpfs mounted for it (root only), sized so that the run starts and one given write runs
out of space part-way. Judged by what a user sees: exit code != 0, exactly one `error:` line (tqdm's redraws of its
bars aside: a terminal shows them in place, and they are cleared before the line) naming the write and ending in
"No space left on device", and nothing half-written: no temporary file or folder left, every PNG, mp4, JSON, jsonl
line and safetensors file there reads back whole, and the earlier checkpoints are kept. Prints a markdown table and
the count; exits 1 if any case fails.

    python bench/faults.py              # every case, 2 at a time
    python bench/faults.py -k export    # the cases whose name contains "export" (-k again: or another)

The sizes of the later writes' cases are measured by two reference runs on a roomy tmpfs (tmpfs counts whole pages).
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PAGE = os.sysconf("SC_PAGE_SIZE")
TINY = ["grpo.py", "--model", "flux1", "--tiny", "--log-with", "none"]
QUIET = [*TINY, "--eval-every", "0"]  # no samples: the run writes its lock, config.json, metrics.jsonl, checkpoints
BAR = re.compile(r"[^:]*: *\d+%\|.*\| *\d+/\d+ \[")  # a tqdm redraw: "epoch 0 train:  25%|██▌  | 2/8 [00:00<..."


def mount(folder, size):
    """A tmpfs of `size` bytes at `folder` (created); returns why not (a line) when it cannot be mounted here."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    os.makedirs(folder, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True,
                           text=True)
    except OSError as e:
        return f"cannot run mount ({e.strerror})"
    return None if r.returncode == 0 else f"cannot mount a tmpfs here ({' '.join(r.stderr.split()) or r.returncode})"


def umount(folder):
    if subprocess.run(["umount", folder], capture_output=True).returncode:  # busy (a file still open or mapped):
        subprocess.run(["umount", "-l", folder], capture_output=True)  # detached now, freed when it closes


def free(folder) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder, leave=0):
    """Fill the filesystem of `folder` with a file there (`filler`), leaving `leave` bytes free."""
    with open(os.path.join(folder, "filler"), "ab") as f:
        f.write(bytes(max(0, free(folder) - leave)))


def allocated(path) -> int:
    """The bytes a file, or the files under a folder, take on disk (whole pages on a tmpfs)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def user_lines(stderr: str) -> list[str]:
    """The lines a user reads: stderr without tqdm's redraws of its bars and the cursor moves between them."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip() and not BAR.match(line.strip())]


def half_written(folder) -> list[str]:
    """What is left half-written under `folder`: temporary files and folders, and files that do not read back
    whole (a truncated PNG, mp4, JSON, safetensors file, or a jsonl file with a torn line)."""
    from PIL import Image
    from safetensors.torch import load_file

    from common import video
    bad = []
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            if ".tmp" in name:
                bad.append(f"{os.path.relpath(os.path.join(d, name), folder)} (temporary)")
        for name in files:
            p = os.path.join(d, name)
            try:
                if name.endswith(".png"):
                    with Image.open(p) as im:
                        im.load()
                elif name.endswith(".mp4"):
                    video.read_video(p)
                elif name.endswith(".jsonl"):
                    text = open(p).read()
                    if text and not text.endswith("\n"):
                        raise ValueError("a torn last line")
                    [json.loads(line) for line in text.splitlines()]
                elif name.endswith(".json"):
                    json.load(open(p))
                elif name.endswith(".safetensors"):
                    load_file(p)
            except Exception as e:  # any reader's error: the file is not whole
                bad.append(f"{os.path.relpath(p, folder)} ({' '.join(str(e).split())[:60] or type(e).__name__})")
    return bad


def run_case(tmp, name, argv, size, expect, keep=(), leave=None):
    """Run `argv` with --output-dir on a fresh tmpfs of `size` bytes (or, `leave` given, a roomy one filled up to
    `leave` bytes free); returns the judged row. expect: the start of what the error line says; keep: the outputs
    that must still be there (earlier checkpoints)."""
    disk = os.path.join(tmp, re.sub(r"\W+", "-", name))
    why = mount(disk, size)
    if why:
        return dict(name=name, rc=None, one_line=False, whole=False, ok=False, line=why)
    try:
        if leave is not None:
            fill(disk, leave)
        out = os.path.join(disk, "run")
        r = subprocess.run([sys.executable, *argv, "--output-dir", out], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
        lines = user_lines(r.stderr)
        one_line = (len(lines) == 1 and lines[0].startswith(f"error: cannot write {expect}")
                    and lines[0].endswith(": No space left on device") and "Traceback" not in r.stderr)
        bad = half_written(out) + [f"{k} (missing)" for k in keep if not os.path.exists(os.path.join(out, k))]
        return dict(name=name, rc=r.returncode, one_line=one_line, whole=not bad,
                    ok=r.returncode != 0 and one_line and not bad,
                    line=(lines[0] if one_line else " / ".join(lines[-3:])) + (f" [left: {', '.join(bad)}]" if bad
                                                                                else ""))
    finally:
        umount(disk)


def reference(disk, argv):
    """A complete run on a roomy tmpfs mounted at `disk` (left mounted for measuring): its output folder."""
    why = mount(disk, "16m")
    if why:
        sys.exit(f"error: {why}")
    out = os.path.join(disk, "run")
    subprocess.run([sys.executable, *argv, "--output-dir", out], cwd=ROOT, env=ENV, capture_output=True, check=True,
                   timeout=300)
    return out


def cases(quiet, full):
    """(name, argv, tmpfs size, what the error line names, outputs that must stay). quiet/full: the reference runs'
    output folders (QUIET and TINY flags, 1 epoch), whose files size the later writes' cases."""
    def pages(*paths):  # each write's tmpfs needs the pages written before it, then 2 more (less than it needs)
        return sum(allocated(p) for p in paths) + 2 * PAGE
    base = [os.path.join(full, n) for n in (".run.lock", "config.json")]
    samples = os.path.join(full, "samples")
    return [
        ("a disk already full", [*TINY, "--num-epochs", "1"], 16 * PAGE, "the ", (), 0),
        ("the base evaluation's PNG grid", [*TINY, "--num-epochs", "1"], pages(*base), "the samples ", ()),
        ("the base evaluation's per-prompt json", [*TINY, "--num-epochs", "1"],
         pages(*base, *(os.path.join(samples, f"eval_base.{x}") for x in ("png", "txt"))) - 2 * PAGE,
         "the per-prompt evaluation ", ()),
        ("the base evaluation's mp4 (Wan)", ["grpo.py", "--model", "wan2_t2v", "--tiny", "--log-with", "none",
                                             "--num-epochs", "1"], pages(*base), "the sample video ", ()),
        ("a metrics line", [*QUIET, "--num-epochs", "1"], 2 * PAGE, "the metrics ", ()),
        ("the first checkpoint", [*QUIET, "--num-epochs", "1"], 5 * PAGE, "the checkpoint ", ()),
        ("a later checkpoint", [*QUIET, "--num-epochs", "2"], pages(quiet) - allocated(os.path.join(quiet, "lora")),
         "the checkpoint ", ("checkpoints/checkpoint-2",)),
        ("the export", [*QUIET, "--num-epochs", "1"], pages(quiet) - allocated(os.path.join(quiet, "lora")),
         "the export ", ("checkpoints/checkpoint-2",)),
        ("the before/after grid, after the export", [*TINY, "--num-epochs", "1"],
         pages(full) - sum(allocated(os.path.join(samples, f"before_after.{x}")) for x in ("png", "txt")),
         "the samples ", ("checkpoints/checkpoint-2", "lora")),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", action="append", help="only the cases whose name contains this (repeatable: any of them)")
    ap.add_argument("-j", type=int, default=2, help="cases at a time")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="faults-")
    refs = [os.path.join(tmp, "ref-quiet"), os.path.join(tmp, "ref-full")]
    try:
        outs = [reference(refs[0], [*QUIET, "--num-epochs", "1"]), reference(refs[1], [*TINY, "--num-epochs", "1"])]
        rows = [c for c in cases(*outs) if not a.k or any(k in c[0] for k in a.k)]
        with concurrent.futures.ThreadPoolExecutor(a.j) as pool:
            results = list(pool.map(lambda c: run_case(tmp, *c), rows))
    finally:
        for disk in refs:
            umount(disk)
        shutil.rmtree(tmp, ignore_errors=True)
    print("| full disk during | exit | one `error:` line | nothing half-written | what the user reads |\n"
          "|---|---|---|---|---|")
    for res in results:
        print(f"| {res['name']} | {res['rc']} | {'yes' if res['one_line'] else 'NO'} | "
              f"{'yes' if res['whole'] else 'NO'} | {res['line'][:200].replace('|', '/')} |")
    good = sum(r["ok"] for r in results)
    print(f"\n{good}/{len(results)} full disks: non-zero exit, one `error:` line, nothing half-written")
    sys.exit(0 if good == len(results) else 1)


if __name__ == "__main__":
    main()
