"""The scripts compute what the code before issue 19's restructuring computed, bit for bit (nft and awm: what they
computed once issue 31 keyed their training draws by the sample; re-recorded then, on this machine's CPU): a few short runs (every
script, several models, a full fine-tuning reference) against fingerprints stored from that code (metrics.jsonl
without time/ and memory/, the exported LoRA, the last checkpoint's tensors and state). All 59 configurations:
`python bench/equal_runs.py compare bench/results/equal_runs.json`.

A CPU run's numbers depend on torch's build and the kernels the CPU selects: on another torch or CPU than the one
that recorded them the comparison cannot hold, and the test says so (re-record with the bench on both commits)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "equal_runs_reference.json")
_spec = importlib.util.spec_from_file_location("equal_runs", os.path.join(ROOT, "bench", "equal_runs.py"))
equal_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(equal_runs)

with open(REFERENCE) as f:
    STORED = json.load(f)


@pytest.mark.parametrize("name", sorted(STORED["runs"]))
def test_run_equals_its_stored_fingerprint(name):
    here = equal_runs.environment()
    if here != STORED["environment"]:
        pytest.skip(f"fingerprints recorded on {STORED['environment']}, this machine is {here}")
    diff = equal_runs.differences(STORED["runs"][name], equal_runs.run_config(name))
    assert not diff, f"{name}: " + "; ".join(diff[:5])
