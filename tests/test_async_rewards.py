"""--async-rewards: each micro-batch is scored in a background thread while the next one rolls out, and all are
joined before the advantages; the run is identical to the synchronous one (every logged number, every trained
weight), groupwise rewards included (their transform runs on the gathered groups, after the join)."""
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.test_grpo import ENV, ROOT, read_metrics


class GroupRank:
    """A custom groupwise reward (dotted path): mean brightness, ranked within each group."""
    groupwise = True

    def __call__(self, images, prompts, metadata):
        return images.float().mean(dim=tuple(range(1, images.dim())))

    def group_transform(self, scores):
        return torch.argsort(torch.argsort(scores, dim=1), dim=1).float() / scores.shape[1]


def test_async_rewards_equal_sync(tmp_path, script="nft", reward="tests.test_async_rewards.GroupRank"):
    """A groupwise reward (its transform runs after the join, on gathered groups) through nft.py; grpo.py's rollout
    loop is the same code."""
    runs = {}
    for flag in ((), ("--async-rewards",)):
        out = tmp_path / (flag[0] if flag else "sync")
        r = subprocess.run([sys.executable, f"{script}.py", "--model", "flux1", "--tiny", "--log-with", "none",
                            "--reward", reward, "--output-dir", str(out), *flag], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in read_metrics(out)]
        runs[flag] = rows, load_file(str(out / "lora/pytorch_lora_weights.safetensors"))
    (rows_sync, lora_sync), (rows_async, lora_async) = runs[()], runs[("--async-rewards",)]
    assert rows_sync == rows_async and len(rows_sync) == 3
    assert set(lora_sync) == set(lora_async) and all(torch.equal(lora_sync[k], lora_async[k]) for k in lora_sync)
