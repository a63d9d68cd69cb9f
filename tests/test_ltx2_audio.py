"""LTX-2's generated sound reaches the rewards and the written samples (issue 29): metadata["audio"] =
(waveform (C, N) float CPU, sample rate) in the reward probe, the rollouts (sync and --async-rewards) and evaluation;
the sample mp4s carry the first sample's track as AAC, at the model's 24 fps; a model without sound gets no "audio"
key; remote rewards drop the track (not JSON) from the /score body."""
import json

import av
import numpy as np
import pytest
import torch

import grpo
from common import data
from common.cli import parse_with_presets
from common.models.ltx2 import LTX2Adapter
from common.tracking import save_samples
from rewards.remote import compute_payload, decode_score_request, encode_score_request
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

CALLS = []  # per reward call: one entry per sample


def record_audio(images, prompts, metadata):
    """A custom reward (dotted path): records what each sample's metadata holds of the generated sound."""
    CALLS.append([{"frames": images.shape[1], "audio": None if "audio" not in m else
                   (tuple(m["audio"][0].shape), m["audio"][1], m["audio"][0].dtype, m["audio"][0].device.type,
                    float(m["audio"][0].abs().max()))} for m in metadata])
    return images.mean(dim=(1, 2, 3, 4))


def _run(tmp_path, model, *extra):
    """One tiny grpo epoch of 2 prompts x 2 samples (the CPU decodes few videos)."""
    CALLS.clear()
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, [
        "--model", model, "--tiny", "--num-epochs", "1", "--prompts-per-epoch", "2", "--group-size", "2",
        "--eval-num-prompts", "2", "--log-with", "none", "--output-dir", str(tmp_path / "run"),
        "--reward", "tests.test_ltx2_audio.record_audio", *extra])
    grpo.main(args)
    return args


@pytest.fixture(scope="module")
def stock_track():
    """(channels, samples) of the stock LTX2Pipeline's waveform at the tiny run's size (64 px, 5 frames, 24 fps),
    and its vocoder's rate: the shape every sample's metadata["audio"] must have."""
    pipe = LTX2Adapter.build_tiny()
    out = pipe(prompt=["a cat"], height=64, width=64, num_frames=5, frame_rate=24.0, num_inference_steps=2,
               guidance_scale=1.0, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    return tuple(out.audio.shape[1:]), pipe.vocoder.config.output_sampling_rate


# sync: the probe, rollouts, both evaluations and every sample mp4; --async-rewards: rollouts scored in the background
@pytest.mark.parametrize("extra", [(), ("--async-rewards", "--eval-every", "0")], ids=["sync", "async"])
def test_ltx2_rewards_get_the_track_and_samples_carry_it(tmp_path, stock_track, extra):
    args = _run(tmp_path, "ltx2", *extra)
    shape, rate = stock_track
    assert rate == 16000 and shape[0] == 2 and shape[1] > 0  # the tiny build's stereo 16 kHz vocoder
    probe, rest = CALLS[0], CALLS[1:]
    # the probe (before the model samples anything): silence of the generated track's shape
    assert [s["audio"] for s in probe] == [(shape, rate, torch.float32, "cpu", 0.0)] * 2
    samples = [s for call in rest for s in call]
    evaluated = 2 * 2 if args.eval_every else 0  # base and trained evaluations of 2 prompts
    assert len(samples) == 2 * 2 + evaluated
    for s in samples:
        got_shape, got_rate, dtype, device, peak = s["audio"]
        assert (got_shape, got_rate, dtype, device) == (shape, rate, torch.float32, "cpu")
        assert 0 < peak < float("inf")  # a decoded track, not the probe's silence
    if not args.eval_every:
        return
    samples_dir = tmp_path / "run/samples"
    for tag in ("train_epoch0000", "eval_base", "eval_epoch0000", "before_after"):
        with av.open(str(samples_dir / f"{tag}.mp4")) as c:
            video, sound = c.streams.video[0], c.streams.audio[0]
            assert video.average_rate == 24  # LTX-2's frame rate, the one its sound is generated for
            assert (sound.codec_context.name, sound.rate, sound.channels) == ("aac", rate, 2)
            assert sum(f.samples for f in c.decode(audio=0)) >= shape[1]


def test_a_model_without_sound_gets_no_audio(tmp_path):
    _run(tmp_path, "wan2_t2v", "--eval-every", "0")
    samples = [s for call in CALLS for s in call]
    assert len(samples) == 2 + 2 * 2 and all(s["audio"] is None for s in samples)  # the probe's 2, then 2 x 2
    assert all(s["frames"] == 5 for s in samples)


def test_each_row_gets_its_own_track():
    items = [data.Item("a", metadata={"k": 1}), data.Item("b")]
    waves = torch.arange(2 * 2 * 6, dtype=torch.float64).reshape(2, 2, 6)
    meta = data.reward_metadata(items, (waves, 24000))
    for i, m in enumerate(meta):
        wave, rate = m["audio"]
        assert rate == 24000 and wave.dtype == torch.float32
        assert torch.equal(wave, torch.tensor(np.arange(12 * i, 12 * i + 12, dtype=np.float32).reshape(2, 6)))
    assert meta[0]["k"] == 1 and "audio" not in data.reward_metadata(items)[0]


def test_remote_rewards_drop_the_track(tmp_path):
    """A waveform is not JSON: the /score body leaves it out (the rest of the metadata goes), the /compute payload
    sends no metadata at all; neither fails."""
    images = torch.rand(1, 5, 3, 32, 32)
    meta = [{"prompt": "a", "k": 3, "audio": (torch.zeros(2, 100), 16000), "images": [], "video_frames": []}]
    _, _, rows = decode_score_request(encode_score_request(images, ["a"], meta), str(tmp_path))
    assert rows[0]["k"] == 3 and rows[0]["prompt"] == "a" and "audio" not in rows[0]
    assert "audio" not in json.dumps(compute_payload(images, ["a"], meta))


def _tone(freq, rate, n, amp=0.5):
    return amp * torch.sin(2 * np.pi * freq * torch.arange(n, dtype=torch.float64) / rate).float().expand(2, n)


def test_a_grid_plays_the_first_samples_track(tmp_path):
    rate, n = 24000, 12000
    videos = torch.rand(3, 12, 3, 16, 16)
    tracks = [_tone(440, rate, n), _tone(660, rate, n), _tone(880, rate, n)]
    acc = type("Acc", (), {"trackers": []})()
    save_samples(acc, str(tmp_path), "grid", videos, ["a", "b", "c"], 0, fps=24, audio=(tracks, rate))
    with av.open(str(tmp_path / "grid.mp4")) as c:
        got = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    # AAC is lossy and delayed by its priming samples: the spectrum's peak is the first sample's tone
    spectrum = np.abs(np.fft.rfft(got[0, 2048:2048 + 8192]))
    assert abs(np.argmax(spectrum) * rate / 8192 - 440) <= rate / 8192
    save_samples(acc, str(tmp_path), "silent", videos, ["a", "b", "c"], 0)
    with av.open(str(tmp_path / "silent.mp4")) as c:
        assert not c.streams.audio
