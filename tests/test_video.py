import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common import data
from common.data import DataError, check_videos, load_split, load_video
from common.tracking import image_grid, save_samples
from common.video import frame_strip, probe_video, read_video, write_frames, write_video


def moving_squares(F=9, H=48, W=64):
    """Smooth colour gradient with two coloured squares moving across it, float (F, 3, H, W) in [0, 1]."""
    y, x = torch.linspace(0, 1, H)[:, None], torch.linspace(0, 1, W)[None, :]
    v = torch.empty(F, 3, H, W)
    for t in range(F):
        v[t, 0], v[t, 1], v[t, 2] = 0.2 + 0.3 * x, 0.3 + 0.2 * y, 0.6
        v[t, :, 8:24, 4 + 4 * t:20 + 4 * t] = torch.tensor([0.9, 0.8, 0.1])[:, None, None]
        v[t, :, 28:44, 40 - 3 * t:56 - 3 * t] = torch.tensor([0.1, 0.8, 0.3])[:, None, None]
    return v


def one_line_error(fn, *args, match):
    with pytest.raises(DataError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- read / write ----


def test_round_trip_shape_fps_and_error(tmp_path):
    v = moving_squares()
    path = str(tmp_path / "a.mp4")
    assert write_video(path, v, fps=12) == path
    assert os.listdir(tmp_path) == ["a.mp4"]  # the temporary file is gone
    frames, fps = read_video(path)
    assert frames.shape == (9, 3, 48, 64) and frames.dtype == torch.float32
    assert fps == 12.0 and isinstance(fps, float)
    assert 0 <= frames.min() and frames.max() <= 1
    # measured 0.011 (yuv420p halves the colour resolution; the squares' sharp edges dominate)
    assert (frames - v).abs().mean() < 0.03
    # the moving square is where it was drawn, in every frame
    assert torch.allclose(frames[:, :, 12:20, 30], v[:, :, 12:20, 30], atol=0.1)
    probe_video(path)


def test_fractional_fps_and_uint8_input(tmp_path):
    v = (moving_squares(F=3) * 255).round().to(torch.uint8)
    frames, fps = read_video(write_video(str(tmp_path / "b.mp4"), v, fps=30000 / 1001))
    assert fps == pytest.approx(29.97, abs=1e-3) and frames.shape == (3, 3, 48, 64)
    assert (frames * 255 - v.float()).abs().mean() < 0.03 * 255


def test_odd_sizes_are_padded_to_even(tmp_path):
    v = moving_squares(F=2, H=47, W=63)
    frames, _ = read_video(write_video(str(tmp_path / "odd.mp4"), v))
    assert frames.shape == (2, 3, 48, 64)  # yuv420p needs even sizes: the last row/column is repeated
    assert (frames[:, :, :47, :63] - v).abs().mean() < 0.03
    assert (frames[:, :, 47, :63] - v[:, :, 46]).abs().mean() < 0.05


def test_write_rejects_bad_input_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_video(str(tmp_path / "x.mp4"), torch.zeros(2, 48, 64))
    with pytest.raises(ValueError, match="no frames"):
        write_video(str(tmp_path / "x.mp4"), torch.zeros(0, 3, 8, 8))
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 1 is 8x10"):
        write_frames(str(tmp_path / "x.mp4"), frames)
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic_replace(tmp_path):
    path = str(tmp_path / "a.mp4")
    write_video(path, moving_squares(F=2))
    write_video(path, moving_squares(F=5))
    assert read_video(path)[0].shape[0] == 5 and os.listdir(tmp_path) == ["a.mp4"]


def test_errors_are_one_line_data_errors(tmp_path):
    missing = str(tmp_path / "missing.mp4")
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n")
    good = write_video(str(tmp_path / "good.mp4"), moving_squares())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(good, "rb").read()[:1000])  # the index (moov) is at the end: cut off
    still = tmp_path / "still.png"
    Image.new("RGB", (4, 4)).save(still)
    audio_only = str(tmp_path / "audio.m4a")
    import av
    with av.open(audio_only, "w") as c:  # a real media file without a video stream
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    for fn in (probe_video, read_video):
        assert one_line_error(fn, missing, match="file not found") == f"cannot read video {missing}: file not found"
        one_line_error(fn, str(text), match=f"cannot read video {text}: not a video")
        one_line_error(fn, str(truncated), match=f"{truncated}: not a video")
        one_line_error(fn, str(tmp_path), match="not a file")
        one_line_error(fn, audio_only, match="no video stream")
    # an image is a one-frame "video" to FFmpeg: readable, with one frame
    assert read_video(str(still))[0].shape == (1, 3, 4, 4)


def test_truncated_with_index_first_is_an_error_not_fewer_frames(tmp_path):
    import av
    good = write_video(str(tmp_path / "good.mp4"), moving_squares(F=20, H=96, W=128))
    fast = str(tmp_path / "fast.mp4")  # remuxed with the index (moov) first, as web-ready files are
    with av.open(good) as src, av.open(fast, "w", format="mp4", options={"movflags": "+faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    raw = open(fast, "rb").read()
    assert raw.find(b"moov") < raw.find(b"mdat")
    assert read_video(fast)[0].shape[0] == 20
    for frac in (0.5, 0.9, 0.99):  # FFmpeg alone would return 11 of the 20 frames at 0.9, without an error
        cut = tmp_path / f"cut{frac}.mp4"
        cut.write_bytes(raw[:int(len(raw) * frac)])
        one_line_error(read_video, str(cut), match=f"cannot read video {cut}: (truncated|decoding failed)")


# ---- strips ----


def test_frame_strip_even_spacing():
    v = torch.arange(20.0).view(20, 1, 1, 1).expand(20, 3, 2, 3)
    s = frame_strip(v, max_frames=4)
    assert s.shape == (3, 2, 12)
    assert s[0, 0, ::3].tolist() == [0, 6, 13, 19]  # first and last included
    assert frame_strip(v[:3]).shape == (3, 2, 9)  # fewer frames than max_frames: all of them
    assert frame_strip(v, max_frames=1)[0, 0, 0] == 0


# ---- datasets ----


def test_check_videos_names_file_and_line(tmp_path):
    vids = tmp_path / "videos"
    write_video(str(vids / "a.mp4"), moving_squares(F=2))
    write_video(str(vids / "b.mp4"), moving_squares(F=3))
    (vids / "bad.mp4").write_text("oops")
    rows = [{"prompt": "p", "video": "a.mp4"}, {"prompt": "q", "videos": ["b.mp4", "a.mp4"]},
            {"prompt": "r"}, {"prompt": "s", "videos": ["a.mp4", "bad.mp4"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_split(str(tmp_path))
    check_videos(items[:3])
    with pytest.raises(DataError) as e:
        check_videos(items)
    f = str(tmp_path / "train.jsonl")
    assert str(e.value).startswith(f"{f}:4: unreadable video {vids / 'bad.mp4'}: not a video")
    assert "\n" not in str(e.value) and "cannot read video" not in str(e.value)


def test_check_videos_probes_each_file_once(tmp_path, monkeypatch):
    import common.video
    path = write_video(str(tmp_path / "a.mp4"), moving_squares(F=2))
    calls = []
    monkeypatch.setattr(common.video, "probe_video", lambda p: calls.append(p))
    check_videos([data.Item("p", videos=[path], source="x:1"), data.Item("q", videos=[path, path], source="x:2")])
    assert calls == [path]


def test_load_video_is_cached(tmp_path):
    load_video.cache_clear()
    path = write_video(str(tmp_path / "a.mp4"), moving_squares(F=4), fps=8)
    frames, fps = load_video(path)
    again, fps2 = load_video(path)
    assert again is frames and fps == fps2 == 8.0 and frames.shape == (4, 3, 48, 64)
    one_line_error(load_video, str(tmp_path / "nope.mp4"), match="file not found")


def test_load_video_cache_is_bounded(tmp_path, monkeypatch):
    load_video.cache_clear()
    monkeypatch.setattr(data, "_VIDEO_CACHE_ITEMS", 2)
    paths = [write_video(str(tmp_path / f"{i}.mp4"), moving_squares(F=1)) for i in range(3)]
    first = load_video(paths[0])[0]
    load_video(paths[1]), load_video(paths[2])
    assert len(data._VIDEO_CACHE) == 2 and load_video(paths[0])[0] is not first  # evicted, read again
    monkeypatch.setattr(data, "_VIDEO_CACHE_BYTES", 10)  # larger than the byte budget: not cached
    load_video.cache_clear()
    load_video(paths[1])
    assert len(data._VIDEO_CACHE) == 0
    load_video.cache_clear()


# ---- sample grids ----


def test_save_samples_writes_strip_png_and_grid_mp4(tmp_path):
    videos = [moving_squares(F=9), moving_squares(F=5, H=32, W=40), moving_squares(F=9)]
    out = tmp_path / "samples"
    save_samples(SimpleNamespace(trackers=[]), str(out), "train_epoch0001", videos, ["a", "b", "c"], 1, fps=8)
    assert sorted(os.listdir(out)) == ["train_epoch0001.mp4", "train_epoch0001.png", "train_epoch0001.txt"]
    png = np.asarray(Image.open(out / "train_epoch0001.png"))
    assert png.shape == (3 * 48, 8 * 64, 3)  # one row per sample: its strip of up to 8 frames
    frames, fps = read_video(str(out / "train_epoch0001.mp4"))
    n = math.ceil(math.sqrt(3))
    assert frames.shape == (9, 3, 2 * 48, n * 64) and fps == 8.0
    # the short sample (cell 1) holds its last frame; the others play on
    assert (frames[8, :, :32, 64:104] - videos[1][4]).abs().mean() < 0.05
    assert (frames[8, :, :48, :64] - videos[0][8]).abs().mean() < 0.05
    assert (out / "train_epoch0001.txt").read_text() == "a\nb\nc\n"


def test_save_samples_batch_tensor_and_tensorboard(tmp_path):
    logged = []
    writer = SimpleNamespace(add_image=lambda tag, img, step, dataformats: logged.append((tag, img.shape, step)))
    acc = SimpleNamespace(trackers=[SimpleNamespace(name="tensorboard", writer=writer)])
    videos = torch.stack([moving_squares(F=3), moving_squares(F=3)])  # (B, F, 3, H, W)
    save_samples(acc, str(tmp_path), "eval_epoch0002", videos, ["x", "y"], 2)
    assert logged == [("samples/eval", (2 * 48, 3 * 64, 3), 2)]
    assert read_video(str(tmp_path / "eval_epoch0002.mp4"))[0].shape == (3, 3, 48, 2 * 64)


def test_save_samples_images_unchanged(tmp_path):
    images = torch.rand(3, 3, 16, 16)
    save_samples(SimpleNamespace(trackers=[]), str(tmp_path), "t", images, ["a", "b", "c"], 0)
    assert sorted(os.listdir(tmp_path)) == ["t.png", "t.txt"]
    assert (np.asarray(Image.open(tmp_path / "t.png")) == image_grid(images)).all()
    # image_grid still shows a video's first frame to direct callers
    v = torch.stack([moving_squares(F=2)])
    assert (image_grid(v) == image_grid(v[:, 0])).all()
