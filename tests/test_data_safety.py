"""Dataset safety (issue 21): row paths confined to the dataset's image/video folders and refused unread, condition
and reward images decoded in full before any model loads, videos decoded in full, every image mode and bit depth
converted to 8-bit RGB correctly, condition images too small for the model refused with file:line, duplicate JSON
keys refused. Each refusal is one line naming the row (file:line), before any model loads, writing nothing."""
import builtins
import colorsys
import json
import os
import struct
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from common import data, models
from common.cli import parse_with_presets
from common.data import DataError, condition_size_problem, load_image, load_split
from rewards.images import to_rgb8
from common.video import probe_video, write_video
from tests.helpers import checks_only
from tests.test_video import moving_squares


def _args(script, *argv):
    mod = __import__(script)
    return parse_with_presets(mod.Args, mod.PRESETS, mod.TINY, list(argv))


def _png(path, size=(64, 64), color=(40, 90, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def _dataset(root, rows):
    os.makedirs(root / "images", exist_ok=True)
    (root / "train.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(root), str(root / "train.jsonl")


def _checks(tmp_path, model, ds, *extra):
    out = tmp_path / "out"
    checks_only("grpo", _args("grpo", "--model", model, "--tiny", "--dataset", ds, "--output-dir", str(out),
                              "--log-with", "none", *extra))
    return out


def _refused(tmp_path, model, ds, match, *extra):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as e:
        _checks(tmp_path, model, ds, *extra)
    assert "\n" not in str(e.value) and not out.exists()
    return str(e.value)


@pytest.fixture
def opened(monkeypatch):
    """Every path opened while the test runs (open, os.open, PIL, PyAV), resolved."""
    seen = []

    def record(fn):
        def wrapper(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.path.realpath(os.fsdecode(file)))
            return fn(file, *a, **k)
        return wrapper
    monkeypatch.setattr(builtins, "open", record(builtins.open))
    monkeypatch.setattr(os, "open", record(os.open))
    monkeypatch.setattr(Image, "open", record(Image.open))
    monkeypatch.setattr(av, "open", record(av.open))
    return seen


# ---- 4. paths confined to the dataset's folders, refused unread ----

def _escaping(tmp_path, how, kind="image"):
    """A dataset whose one row points at a valid file outside its folder (it would pass every other check)."""
    secret = _png(tmp_path / "private" / "secret.png") if kind == "image" else \
        write_video(str(tmp_path / "private" / "secret.mp4"), moving_squares(F=2))
    root = tmp_path / "ds"
    folder = root / ("images" if kind == "image" else "videos")
    os.makedirs(folder, exist_ok=True)
    if how == "dotdot":
        value = os.path.join("..", "..", "private", os.path.basename(secret))
    elif how == "absolute":
        value = secret
    else:  # a symlink inside the folder, pointing out of it
        value = "link" + os.path.splitext(secret)[1]
        os.symlink(secret, folder / value)
    ds, f = _dataset(root, [{"prompt": "a cat", kind: value}])
    return ds, f, secret, value


@pytest.mark.parametrize("model", ["flux1", "flux1-kontext"])  # text-to-image (images for the rewards) and edit
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_paths_outside_the_image_folder_are_refused_unread(tmp_path, opened, model, how):
    ds, f, secret, value = _escaping(tmp_path, how)
    opened.clear()  # writing the fixture opened it
    msg = _refused(tmp_path, model, ds, f"^{f}:1: image path '{value}'.* is outside the image folder "
                                        f"{tmp_path / 'ds' / 'images'} \\(--image-dir\\); .*--allow-outside-data-paths")
    assert os.path.realpath(secret) in msg  # the resolved target is named
    assert os.path.realpath(secret) not in opened  # and never opened


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_video_paths_outside_the_video_folder_are_refused_unread(tmp_path, opened, how):
    ds, f, secret, value = _escaping(tmp_path, how, kind="video")
    opened.clear()
    _refused(tmp_path, "wan2_t2v", ds, f"^{f}:1: video path '{value}'.* is outside the video folder")
    assert os.path.realpath(secret) not in opened


def test_allow_outside_accepts_them(tmp_path):
    for how in ("dotdot", "absolute", "symlink"):
        ds, f, secret, value = _escaping(tmp_path / how, how)
        (item,) = load_split(ds, allow_outside=True)
        assert os.path.realpath(item.images[0]) == os.path.realpath(secret)
        with pytest.raises(DataError, match="outside the image folder"):
            load_split(ds)


def test_allow_outside_flag_through_the_checks(tmp_path):
    for how in ("dotdot", "absolute", "symlink"):
        ds, _, _, _ = _escaping(tmp_path / how, how)
        _checks(tmp_path / how, "flux1-kontext", ds, "--allow-outside-data-paths")


def test_paths_inside_are_accepted_even_through_symlinks(tmp_path):
    root = tmp_path / "ds"
    real = root / "store"
    _png(real / "a.png")
    os.symlink(real, root / "images")  # the image folder a symlink within the dataset: inside is inside its target
    (root / "images" / "sub").mkdir()
    _png(real / "sub" / "b.png")
    os.symlink(real / "a.png", real / "sub" / "same.png")  # a link that stays inside
    ds, _ = _dataset(root, [{"prompt": "p", "image": "a.png"}, {"prompt": "q", "image": "sub/../sub/b.png"},
                            {"prompt": "r", "image": str(root / "images" / "sub" / "same.png")}])
    assert [len(it.images) for it in load_split(ds)] == [1, 1, 1]
    _checks(tmp_path, "flux1-kontext", ds)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_media_folder_linking_out_of_the_dataset_is_refused_unread(tmp_path, opened, kind):
    # before: images/ -> / made every file of the machine "inside the image folder"
    secret = _png(tmp_path / "private" / "secret.png") if kind == "image" else \
        write_video(str(tmp_path / "private" / "secret.mp4"), moving_squares(F=2))
    root = tmp_path / "ds"
    os.makedirs(root)
    folder = root / f"{kind}s"
    os.symlink("/", folder)
    ds, f = _dataset(root, [{"prompt": "a cat"}, {"prompt": "a cat", kind: secret.lstrip("/")}])
    opened.clear()
    msg = _refused(tmp_path, "flux1" if kind == "image" else "wan2_t2v", ds,
                   f"^{f}:2: the {kind} folder {folder} resolves to /, outside the dataset folder {root}; .*"
                   f"--{kind}-dir, or pass --allow-outside-data-paths$")
    assert secret not in msg and os.path.realpath(secret) not in opened
    with pytest.raises(DataError, match=f"the {kind} folder {folder} resolves to /"):
        load_split(ds, check_files=False)
    assert getattr(load_split(ds, allow_outside=True)[1], f"{kind}s") == [str(folder / secret.lstrip("/"))]
    # a folder named by --image-dir / --video-dir is the user's own choice, outside the dataset or not
    assert getattr(load_split(ds, **{f"{kind}_dir": "/"})[1], f"{kind}s") == [secret]


def test_a_dataset_reached_through_a_symlink_loads(tmp_path):
    real = tmp_path / "mnt" / "x" / "data"  # /data -> /mnt/x/data: the boundary is the real dataset folder
    _png(real / "images" / "a.png")
    os.symlink(real, tmp_path / "data")
    link = tmp_path / "data"
    ds, f = _dataset(link, [{"prompt": "p", "image": "a.png"}, {"prompt": "q", "image": str(link / "images" / "a.png")},
                            {"prompt": "r", "image": str(real / "images" / "a.png")}])
    assert [it.images for it in load_split(ds)] == [[str(link / "images" / "a.png")]] * 2 + \
        [[str(real / "images" / "a.png")]]
    _checks(tmp_path, "flux1-kontext", ds)
    _dataset(link, [{"prompt": "p", "image": "../../secret.png"}])
    _png(tmp_path / "secret.png")
    with pytest.raises(DataError, match=f"^{f}:1: image path .* is outside the image folder"):
        load_split(ds)


def test_text_to_image_rows_images_are_decoded_before_they_reach_the_rewards(tmp_path):
    # before: for models without condition images, `image` files were never opened by the checks and their bytes
    # went to remote rewards as they were; now each must decode in full (and lie inside images/) first
    root = tmp_path / "ds"
    _png(root / "images" / "ok.png")
    (root / "images" / "notes.png").write_text("PRIVATE KEY: not an image")
    ds, f = _dataset(root, [{"prompt": "a", "image": "ok.png"}, {"prompt": "b", "images": ["ok.png", "notes.png"]}])
    _refused(tmp_path, "flux1", ds, f"^{f}:2: unreadable image {root / 'images' / 'notes.png'}: cannot identify")
    (root / "images" / "notes.png").unlink()
    _png(root / "images" / "notes.png", size=(1, 1))  # no size limit when the image only goes to the rewards
    _checks(tmp_path, "flux1", ds)
    meta = data.reward_metadata(load_split(ds))
    assert meta[1]["images"] == [str(root / "images" / "ok.png"), str(root / "images" / "notes.png")]


# ---- 6. videos decoded in full before any model loads ----

def _damaged_video(path, from_packet=12):
    """A 20-frame mp4 whose first frames decode and whose packets from `from_packet` on are garbage."""
    good = write_video(str(path), moving_squares(F=20, H=96, W=128), fps=12)
    with av.open(good) as c:
        sizes = [p.size for p in c.demux(c.streams.video[0]) if p.size]
    raw = bytearray(open(good, "rb").read())
    start = raw.find(b"mdat") + 4 + sum(sizes[:from_packet])
    raw[start:start + sum(sizes[from_packet:])] = np.random.default_rng(0).integers(
        0, 256, sum(sizes[from_packet:]), dtype=np.uint8).tobytes()
    open(good, "wb").write(bytes(raw))
    return good


def test_a_video_damaged_after_its_first_frames_is_refused_before_the_model_loads(tmp_path):
    root = tmp_path / "ds"
    path = _damaged_video(root / "videos" / "clip.mp4")
    with av.open(path) as c:  # its first frame decodes (what the start check looked at before)
        next(c.decode(video=0))
    ds, f = _dataset(root, [{"prompt": "a cat"}, {"prompt": "a cat walks", "video": "clip.mp4"}])
    _refused(tmp_path, "wan2_t2v", ds, f"^{f}:2: unreadable video {path}: decoding failed after \\d+ frames")
    with pytest.raises(DataError, match="decoding failed"):
        probe_video(path)


def test_a_video_damaged_later_names_its_row_when_drawn(tmp_path):
    root = tmp_path / "ds"
    write_video(str(root / "videos" / "clip.mp4"), moving_squares(F=3))
    ds, f = _dataset(root, [{"prompt": "a cat", "video": "clip.mp4"}])
    items = load_split(ds)
    data.check_videos(items)
    assert probe_video(items[0].videos[0]) == (3, 16.0)
    data.load_video.cache_clear()
    _damaged_video(root / "videos" / "clip.mp4")  # replaced after the start checks
    with pytest.raises(DataError, match=f"^{f}:1: unreadable video .*clip.mp4: decoding failed"):
        data.reward_metadata(items)
    data.load_video.cache_clear()


# ---- 7. every image mode and bit depth to 8-bit RGB ----

def _png16_rgb(path, rgb16):
    """A 16-bit RGB PNG written by hand (Pillow writes no 16-bit colour PNG)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    open(path, "wb").write(png)
    return str(path)


RNG = np.random.default_rng(21)
U8 = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
U16 = np.concatenate([np.array([0, 1, 128, 129, 257, 32767, 32768, 65534, 65535], np.uint16),
                      RNG.integers(0, 65536, 26, dtype=np.uint16)]).reshape(5, 7)


def _gray3(g):
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, axis=2)


def _expected_16(v):
    return _gray3(np.round(v.astype(np.float64) * 255 / 65535))


def _case(mode, tmp_path):
    """(file path or PIL image, the expected (H, W, 3) uint8, tolerance) for one mode, converted independently."""
    g, rgb, a = U8[..., 0], U8[..., :3], U8[..., 3]
    if mode == "1":
        bits = g > 127
        im = Image.fromarray(bits)
        return _save(im, tmp_path, "png"), _gray3(bits * 255), 0
    if mode == "L":
        return _save(Image.fromarray(g, "L"), tmp_path, "png"), _gray3(g), 0
    if mode == "LA":
        return _save(Image.fromarray(U8[..., :2], "LA"), tmp_path, "png"), _gray3(g), 0
    if mode == "La":  # premultiplied gray + alpha: the stored gray un-premultiplied
        pre = np.stack([(g.astype(int) * a // 255), a], -1).astype(np.uint8)
        expected = np.where(a == 0, 0, np.minimum(255, np.round(pre[..., 0].astype(float) * 255 / np.maximum(a, 1))))
        return Image.fromarray(pre, "La"), _gray3(expected), 1
    if mode in ("P", "P+tRNS"):
        palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
        idx = (g % 16).astype(np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(palette.ravel().tolist())
        kw = {"transparency": bytes(RNG.integers(0, 256, 16, dtype=np.uint8))} if mode == "P+tRNS" else {}
        path = tmp_path / "im.png"
        im.save(path, **kw)
        assert mode == "P" or "transparency" in Image.open(path).info
        return str(path), palette[idx], 0
    if mode == "PA":
        palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
        im = Image.new("PA", (7, 5))
        im.putpalette(palette.ravel().tolist())
        idx = (g % 16).astype(np.uint8)
        im.putdata([(int(i), int(x)) for i, x in zip(idx.ravel(), a.ravel())])
        return im, palette[idx], 0
    if mode in ("RGB", "RGBA"):
        return _save(Image.fromarray(U8[..., :len(mode)], mode), tmp_path, "png"), rgb, 0
    if mode == "RGBX":
        return Image.fromarray(U8, "RGBX"), rgb, 0
    if mode == "RGBa":  # premultiplied colour: un-premultiplied
        pre = np.concatenate([(rgb.astype(int) * a[..., None] // 255), a[..., None]], -1).astype(np.uint8)
        expected = np.where(a[..., None] == 0, 0,
                            np.minimum(255, np.round(pre[..., :3].astype(float) * 255 / np.maximum(a, 1)[..., None])))
        return Image.fromarray(pre, "RGBa"), expected.astype(np.uint8), 1
    if mode == "CMYK":  # the standard ink formula (no ICC profile): 255 (1 - C) (1 - K)
        cmyk = U8.astype(np.float64) / 255
        expected = np.round(255 * (1 - cmyk[..., :3]) * (1 - cmyk[..., 3:]))
        return _save(Image.fromarray(U8, "CMYK"), tmp_path, "tiff"), expected.astype(np.uint8), 1
    if mode == "YCbCr":  # JPEG's full-range BT.601
        y, cb, cr = (U8[..., i].astype(np.float64) for i in range(3))
        expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                             y + 1.772 * (cb - 128)], -1)
        return Image.fromarray(U8[..., :3], "YCbCr"), np.clip(np.round(expected), 0, 255).astype(np.uint8), 2
    if mode == "HSV":
        expected = np.array([[colorsys.hsv_to_rgb(*(px / 255)) for px in row] for row in U8[..., :3]]) * 255
        return Image.fromarray(U8[..., :3], "HSV"), np.round(expected).astype(np.uint8), 1
    if mode == "I;16 png":  # the 16-bit grayscale PNG that came out white
        return _save(Image.fromarray(U16), tmp_path, "png"), _expected_16(U16), 0
    if mode in ("I;16B", "I;16L"):
        im = Image.frombytes(mode, (7, 5), U16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        return im, _expected_16(U16), 0
    if mode == "I":  # 32-bit integers holding 16-bit samples (how older Pillow opens 16-bit PNGs)
        return _save(Image.fromarray(U16.astype(np.int32), "I"), tmp_path, "tiff"), _expected_16(U16), 0
    if mode == "RGB 16-bit png":  # Pillow keeps the high byte: within 1 of the exact scaling
        rgb16 = np.stack([U16, U16[::-1], 65535 - U16], -1)
        return _png16_rgb(tmp_path / "im.png", rgb16), np.round(rgb16.astype(float) * 255 / 65535).astype(np.uint8), 1
    if mode == "F [0, 1]":
        f = U16.astype(np.float32) / 65535
        return _save(Image.fromarray(f, "F"), tmp_path, "tiff"), _gray3(np.round(f.astype(np.float64) * 255)), 0
    if mode == "F [0, 255]":
        f = U16.astype(np.float32) / 257
        return _save(Image.fromarray(f, "F"), tmp_path, "tiff"), _gray3(np.round(f.astype(np.float64))), 0
    raise AssertionError(mode)


def _save(im, tmp_path, ext):
    path = tmp_path / f"im.{ext}"
    im.save(path)
    return str(path)


MODES = ["1", "L", "LA", "La", "P", "P+tRNS", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV",
         "I;16 png", "I;16B", "I;16L", "I", "RGB 16-bit png", "F [0, 1]", "F [0, 255]"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_8_bit_rgb_correctly(tmp_path, mode):
    source, expected, tol = _case(mode, tmp_path)
    im = load_image(source) if isinstance(source, str) else to_rgb8(source)
    if isinstance(source, str):
        with Image.open(source) as raw:
            assert raw.mode == {"I;16 png": "I;16", "RGB 16-bit png": "RGB", "P+tRNS": "P"}.get(
                mode, mode.split(" ")[0]), raw.mode  # the file really holds that mode
    got = np.asarray(im)
    assert im.mode == "RGB" and got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tol


def test_a_16_bit_png_condition_image_is_not_white(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(path)
    assert np.asarray(load_image(str(path))).max() == 128  # was 255: Pillow's convert("RGB") clips 16-bit samples


@pytest.mark.parametrize("array,match", [
    (np.array([[0, 70000]], np.int32), "I samples 0..70000 lie outside 0..65535"),
    (np.array([[-5, 10]], np.int32), "I samples -5..10 lie outside 0..65535"),
    (np.array([[0.5, np.nan]], np.float32), "NaN or infinite"),
    (np.array([[0, 300.0]], np.float32), "float samples 0..300 lie outside"),
])
def test_images_without_a_known_scale_are_refused_in_one_line(tmp_path, array, match):
    path = tmp_path / "x.tiff"
    Image.fromarray(array).save(path)
    with pytest.raises(DataError, match=f"^cannot read image {path}: .*{match}") as e:
        load_image(str(path))
    assert "\n" not in str(e.value)


# ---- 10. condition images too small for the model, before it loads ----

def test_a_1x1_condition_image_for_flux1_kontext_is_refused_before_the_model_loads(tmp_path):
    root = tmp_path / "ds"
    _png(root / "images" / "ok.png")
    _png(root / "images" / "dot.png", size=(1, 1))
    ds, f = _dataset(root, [{"prompt": "a", "image": "ok.png"}, {"prompt": "b", "image": "dot.png"}])
    _refused(tmp_path, "flux1-kontext", ds, f"^{f}:2: condition image {root / 'images' / 'dot.png'}: 1x1 is smaller "
                                            "than 16x16, the smallest flux1-kontext takes$")


@pytest.mark.parametrize("model,size,match", [
    ("flux2", (63, 64), "63x64 is smaller than 64x64, the smallest flux2 takes"),
    ("flux2-klein", (64, 520), "64x520 has aspect ratio 8.1:1; flux2-klein takes at most 8:1"),
    ("qwen-image-edit-plus", (600, 2), "600x2 has aspect ratio 300.0:1; qwen-image-edit-plus takes at most 200:1"),
])
def test_other_edit_models_refuse_sizes_they_cannot_take(tmp_path, model, size, match):
    root = tmp_path / "ds"
    _png(root / "images" / "x.png", size=size)
    ds, f = _dataset(root, [{"prompt": "a", "image": "x.png"}])
    _refused(tmp_path, model, ds, f"^{f}:1: condition image .*x.png: {match}$")


def test_qwen_limit_follows_the_condition_area():
    # each image is resized to --condition-max-pixels at its aspect ratio, sides rounded to multiples of 32
    cls = models.adapter_class("qwen-image-edit-plus")
    assert condition_size_problem(cls, 1024, 64) is None  # the default area, 1024^2
    assert "resized to 4096 pixels its short side rounds to 0 (at most 16:1" in condition_size_problem(
        cls, 1024, 64, condition_max_pixels=64 * 64)
    assert condition_size_problem(cls, 960, 64, condition_max_pixels=64 * 64) is None
    assert condition_size_problem(models.adapter_class("wan2_i2v"), 1, 1) is None  # resized to the video's size


# the sizes at the edge of what each adapter's encode_prompt takes (tiny builds; the VAE factor is the real one):
# (width, height), --condition-max-pixels, accepted
EDGES = {"flux1-kontext": [((16, 16), None, True), ((15, 16), None, False), ((16, 15), None, False)],
         "flux2": [((64, 64), None, True), ((63, 64), None, False), ((512, 64), None, True),
                   ((520, 64), None, False)],
         "qwen-image-edit-plus": [((1, 1), None, True), ((199 * 4, 4), None, True), ((600, 2), None, False),
                                  ((1024, 64), None, True), ((1024, 64), 64 * 64, False),
                                  ((960, 64), 64 * 64, True)],
         "wan2_i2v": [((1, 1), None, True), ((600, 1), None, True)]}


@pytest.mark.parametrize("model", list(EDGES))
def test_the_size_limits_are_the_adapters_own(model):
    """condition_size_problem says yes exactly where the adapter encodes the image, and no where it raises."""
    cls = models.adapter_class(model)
    for size, area, ok in EDGES[model]:
        adapter = cls.load(tiny=True, condition_max_pixels=area)
        problem = condition_size_problem(cls, *size, condition_max_pixels=adapter.condition_max_pixels)
        assert (problem is None) == ok, (size, area, problem)
        try:
            adapter.encode_prompt(["a"], None, 32, [[Image.new("RGB", size, (90, 120, 150))]],
                                  adapter.make_state(64, 64, 5 if cls.video else 1))
            encoded = True
        except ValueError:  # ModelError, or the pipeline's own ValueError
            encoded = False
        assert encoded == ok, (model, size, area)


# ---- 11. duplicate keys ----

@pytest.mark.parametrize("row,key", [('{"prompt": "a", "image": "x.png", "prompt": "b"}', "prompt"),
                                     ('{"prompt": "a", "tag": {"x": 1, "x": 2}}', "x")])
def test_duplicate_keys_are_refused_with_file_and_line(tmp_path, row, key):
    ds, f = _dataset(tmp_path / "ds", ['{"prompt": "ok"}', row])
    msg = _refused(tmp_path, "flux1", ds, f"^{f}:2: key '{key}' appears twice in the row")
    assert "last" in msg
