"""Video files with PyAV (its own bundled FFmpeg: no system ffmpeg, no torchvision).

Frames are float32 tensors (F, 3, H, W) in [0, 1], RGB. Written files are mp4, H.264 (libx264) yuv420p,
tagged BT.709, which every player opens; odd sizes are padded to even by repeating the last row/column.
Errors reading a file raise `common.data.DataError` with one line naming the path and the reason.
"""

import os
import secrets
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from common.errors import DataError


def _reason(e: Exception) -> str:
    """FFmpeg's reason without its errno and the path (the caller names the path), on one line."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())


def _open(path: str):
    if not os.path.exists(path):
        raise DataError(f"cannot read video {path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"cannot read video {path}: not a file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"cannot read video {path}: not a video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"cannot read video {path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _rgb(frame) -> np.ndarray:
    # the frame's own colorspace and range tags drive the conversion (untagged: FFmpeg's defaults)
    return frame.to_ndarray(format="rgb24", src_color_range=frame.color_range)


def _fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _frames(container, stream, path: str):
    """Yield the decoded frames; a truncated or damaged file raises DataError instead of ending early
    (FFmpeg itself stops at a partial packet without an error, which would silently lose frames)."""
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise DataError(f"cannot read video {path}: truncated or corrupt data after {n} frames")
            for frame in packet.decode():
                yield frame
                n += 1
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"cannot read video {path}: decoding failed after {n} frames ({_reason(e)})") from None


def _decode(container, stream, path: str):
    """Yield the RGB frames (see _frames)."""
    for frame in _frames(container, stream, path):
        yield _rgb(frame)


def probe_video(path: str) -> tuple[int, float]:
    """The check before any model loads: the file opens, has a video stream and a frame rate, and every frame
    decodes (a file whose first frames decode but whose rest is damaged fails here, not when its row is drawn);
    frames are not converted to RGB. Returns (frames, fps)."""
    container, stream = _open(path)
    with container:
        fps = _fps(stream)
        n = sum(1 for _ in _frames(container, stream, path))
    if not n:
        raise DataError(f"cannot read video {path}: no frames")
    if fps is None:
        raise DataError(f"cannot read video {path}: no frame rate in the file")
    return n, fps


def read_video(path: str) -> tuple[torch.Tensor, float]:
    """All frames of the first video stream -> (frames float32 (F, 3, H, W) in [0, 1] RGB, fps)."""
    container, stream = _open(path)
    with container:
        fps = _fps(stream)
        frames = list(_decode(container, stream, path))
    if not frames:
        raise DataError(f"cannot read video {path}: no frames")
    if fps is None:
        raise DataError(f"cannot read video {path}: no frame rate in the file")
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255)
    return video.contiguous(), fps


def _to_uint8_frames(video) -> np.ndarray:
    """(F, 3, H, W) float in [0, 1] (or uint8) tensor/array -> (F, H, W, 3) uint8."""
    video = torch.as_tensor(video).detach().cpu()
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video of shape (F, 3, H, W), got {tuple(video.shape)}")
    if video.shape[0] == 0:
        raise ValueError("cannot write a video with no frames")
    if video.dtype != torch.uint8:
        video = (video.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().numpy()


def _check_frame(a, n: int, size=None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"frame {n}: frames must be (H, W, 3) uint8 arrays, got {a.dtype} {a.shape}")
    if size is not None and a.shape[:2] != size:
        raise ValueError(f"frame {n} is {a.shape[0]}x{a.shape[1]}, the first frame is {size[0]}x{size[1]}")
    return a


def write_frames(path: str, frames, fps: float = 16, audio=None) -> str:
    """Iterable of (H, W, 3) uint8 RGB arrays, all one size -> mp4 at `path`, written atomically
    (a temporary file in the same folder, then os.replace). Frames are encoded as they come, so a long
    video need not be held in memory. `audio`: None, or (waveform (C, N) float in [-1, 1] with C 1 or 2,
    sample rate), written as an AAC track beside the video (LTX-2's generated sound). Returns the path."""
    path = os.fspath(path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("cannot write a video with no frames")
    size = _check_frame(first, 0).shape[:2]
    h, w = size
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = w + w % 2, h + h % 2  # yuv420p needs even sizes
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}  # visually lossless; sample videos stay small anyway
            cc = stream.codec_context
            cc.colorspace, cc.color_range = Colorspace.ITU709, ColorRange.MPEG
            cc.color_primaries, cc.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
            if audio is not None:  # every stream exists before the first packet (the header) is written
                sound, sound_frame = _audio_stream(container, *audio)
            n, a = 0, first
            while a is not None:
                a = _check_frame(a, n, size)
                if h % 2 or w % 2:
                    a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
                frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                                       dst_color_range=ColorRange.MPEG)
                frame.colorspace, frame.color_range = Colorspace.ITU709, ColorRange.MPEG
                for packet in stream.encode(frame):
                    container.mux(packet)
                n, a = n + 1, next(frames, None)
            for packet in stream.encode():
                container.mux(packet)
            if audio is not None:
                for packet in sound.encode(sound_frame) + sound.encode():
                    container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _audio_stream(container, waveform, sample_rate):
    """An AAC stream for a (C, N) float waveform (C = 1 or 2, clipped to [-1, 1]) and the waveform as one frame."""
    wave = np.ascontiguousarray(torch.as_tensor(waveform).detach().float().clamp(-1, 1).cpu().numpy())
    if wave.ndim != 2 or wave.shape[0] not in (1, 2) or not wave.shape[1]:
        raise ValueError(f"expected an audio waveform of shape (1 or 2, N > 0), got {tuple(wave.shape)}")
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    stream = container.add_stream("aac", rate=int(sample_rate))
    stream.layout = layout
    frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=layout)
    frame.sample_rate = int(sample_rate)
    return stream, frame


def write_video(path: str, video, fps: float = 16, audio=None) -> str:
    """(F, 3, H, W) float in [0, 1] (or uint8) -> mp4 (H.264 yuv420p, BT.709), written atomically; `audio` as in
    write_frames. Odd heights/widths are padded to even by repeating the last row/column (read back 1 px larger)."""
    return write_frames(path, _to_uint8_frames(video), fps, audio)


def frame_strip(video: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """(F, 3, H, W) -> (3, H, F' * W): up to max_frames frames evenly spaced (first and last included),
    side by side - the still picture of a video for PNG grids."""
    if video.dim() != 4 or video.shape[0] == 0:
        raise ValueError(f"expected a video of shape (F, 3, H, W) with F >= 1, got {tuple(video.shape)}")
    n = max(1, min(max_frames, video.shape[0]))
    idx = torch.linspace(0, video.shape[0] - 1, n).round().long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return torch.cat(list(video[idx]), dim=-1)
