"""Reading videos safely for vision-language models: header checks, frame sampling at a chosen rate, streaming decode.

    probe_video("clip.mp4")          -> VideoInfo(width, height, fps, total_frames, duration), from the header only
    sample_indices(info, fps=2.0)    -> the frames to keep: Qwen2-VL's sampling (an even count, two frames per
                                        temporal patch, within min/max frame budgets)
    read_video("clip.mp4", fps=2.0)  -> Video(frames, indices, fps, total_frames): only the sampled frames are kept

Every size is checked from the container's header before a frame is decoded: the frame size against `max_pixels`
(the decompression-bomb guard `open_image` applies to images), the duration against `max_duration`, the frame
count against `max_total_frames`, and what the sampled frames would take in memory against `max_bytes`. Decoding
streams: frames are decoded one by one, each kept frame is handed to `transform` (the processor resizes it to its
final size there) and the others are dropped at once, so a long video never sits in memory.

The sampling is transformers' `Qwen2VLVideoProcessor.sample_frames` (qwen-vl-utils' FPS rule): `total / fps *
target_fps` frames, clamped to `[min_frames, min(max_frames, total)]`, floored to a multiple of the temporal patch
(2), at indices `floor(i * total / n)`. Checked against transformers' PyAV reader with that sampler
(tests/test_video.py): the same indices and the same RGB frames.

PyAV (`av`, in the `serve` extras) is imported when a file is read, with an error that says how to install it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from polymodal.processing.image import ImageError, ImageTooLarge, source_file

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | Any  # a path, bytes or a binary file object

DEFAULT_FPS = 2.0  # Qwen2-VL's sampling rate (qwen-vl-utils' FPS)
MAX_PIXELS = 64_000_000  # per frame, as open_image's default for images
MAX_DURATION = 4 * 3600.0  # seconds
MAX_TOTAL_FRAMES = 1_000_000  # what the header may claim (about 4.6 h at 60 fps)
MAX_BYTES = 4 << 30  # the sampled frames, as decoded (uint8 RGB), before any transform


class VideoError(ImageError):
    """A video that cannot be used; the message names the input, the reason and what to do (a `ValueError`)."""


class VideoTooLarge(VideoError, ImageTooLarge):
    """A video refused for its size (frame size, duration, frame count) before a frame was decoded."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container's header says about its first video stream."""

    width: int
    height: int
    fps: float  # the stream's average frame rate
    total_frames: int
    duration: float  # seconds


@dataclass
class Video:
    """Sampled frames of a video: `frames` (each what `transform` made of a uint8 `(H, W, 3)` RGB array), the
    `indices` they had in the video, the video's `fps` (None for frames given without one) and `total_frames`."""

    frames: list[Any]
    indices: list[int]
    fps: float | None
    total_frames: int
    info: VideoInfo | None = field(default=None, repr=False)

    @property
    def sampled_fps(self) -> float | None:
        """Frames kept per second of video (transformers' `VideoMetadata.sampled_fps`)."""
        if self.fps is None:
            return None
        return len(self.indices) / self.total_frames * self.fps

    @property
    def timestamps(self) -> list[float]:
        """The time of each kept frame, in seconds."""
        if self.fps is None:
            raise ValueError("the video has no frame rate: its frames were given without one")
        return [i / self.fps for i in self.indices]


# ------------------------------------------------------------------------------------------------ header


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install av (or polymodal[serve])") from None
    return av


def _name(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes of video>"
    return str(getattr(src, "name", "") or f"<{type(src).__name__}>")


def _open(src: VideoSource, name: str):
    av = _av()
    fp = source_file(src, name, "video", VideoError, "a list of frames")
    try:
        container = av.open(fp, mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoError(f"{name}: not a readable video ({e}); check that it is a video file") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: the file holds no video stream")
    return container


def _info(container, name: str, max_pixels: int, max_duration: float, max_total_frames: int) -> VideoInfo:
    """The header's sizes, each checked; a frame count the header leaves out is counted from the packets (no
    decoding), and refused once it passes `max_total_frames`."""
    stream = container.streams.video[0]
    w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if w <= 0 or h <= 0:
        raise VideoError(f"{name}: the header claims an empty frame size ({w}x{h}); the file looks corrupt")
    if w * h > max_pixels:
        raise VideoTooLarge(f"{name}: the header claims {w}x{h} = {w * h:,} pixels per frame, over the limit of "
                            f"{max_pixels:,}; refusing to decode it. Pass max_pixels= if you trust this file")
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        raise VideoError(f"{name}: the header gives no frame rate; cannot sample frames by time")
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if duration is None and container.duration:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    if duration is not None and duration > max_duration:
        raise VideoTooLarge(f"{name}: the header claims {duration:,.0f} s, over the limit of {max_duration:,.0f} s; "
                            "refusing to read it. Pass max_duration= if you trust this file")
    total = int(stream.frames or 0)
    if total <= 0:
        total = _count_packets(container, name, max_total_frames)
    if total > max_total_frames:
        raise VideoTooLarge(f"{name}: the header claims {total:,} frames, over the limit of {max_total_frames:,}; "
                            "refusing to read it. Pass max_total_frames= if you trust this file")
    if total == 0:
        raise VideoError(f"{name}: the video has no frames")
    return VideoInfo(w, h, fps, total, duration if duration is not None else total / fps)


def _count_packets(container, name: str, limit: int) -> int:
    """Frames of a container whose header has no count (Matroska, WebM): its video packets, demuxed, not decoded."""
    count = 0
    try:
        for packet in container.demux(video=0):
            if packet.size:
                count += 1
                if count > limit:
                    break
    except _av().FFmpegError as e:
        raise VideoError(f"{name}: the file is truncated or corrupt ({e})") from None
    container.seek(0)
    return count


def probe_video(src: VideoSource, *, max_pixels: int = MAX_PIXELS, max_duration: float = MAX_DURATION,
                max_total_frames: int = MAX_TOTAL_FRAMES) -> VideoInfo:
    """The first video stream's frame size, rate, frame count and duration, from the header; nothing is decoded."""
    name = _name(src)
    container = _open(src, name)
    try:
        return _info(container, name, max_pixels, max_duration, max_total_frames)
    finally:
        container.close()


# ------------------------------------------------------------------------------------------------ sampling


def sample_indices(total_frames: int, video_fps: float | None, *, fps: float | None = DEFAULT_FPS,
                   num_frames: int | None = None, min_frames: int = 4, max_frames: int = 768,
                   temporal_patch_size: int = 2) -> list[int]:
    """The frames to keep, as transformers' `Qwen2VLVideoProcessor.sample_frames` picks them.

    num_frames: that many (rounded to a multiple of `temporal_patch_size`); else `fps`: `total / video_fps * fps`
    frames, clamped to `[min_frames, min(max_frames, total)]` and floored to a multiple of `temporal_patch_size`;
    neither: every frame. Indices are `floor(i * total / n)`, spread evenly from the first frame."""
    if fps is not None and num_frames is not None:
        raise ValueError("num_frames and fps are exclusive: give one")
    if total_frames < 1:
        raise VideoError("the video has no frames")
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if not video_fps:
            raise ValueError("sampling by fps needs the video's frame rate; give num_frames instead")
        top = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        n = min(max(total_frames / video_fps * fps, min_frames), top, total_frames)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
    else:
        return list(range(total_frames))
    if n < 1:
        raise VideoError(f"the video has {total_frames} frame(s): too few for one temporal patch of "
                         f"{temporal_patch_size} frames")
    if n > total_frames:
        raise ValueError(f"num_frames={num_frames} is more than the video's {total_frames} frames")
    # torch's arange, as transformers' sampler calls it: its float steps decide the rounding of every index
    return torch.arange(0, total_frames, total_frames / n).int().tolist()


# ------------------------------------------------------------------------------------------------ reading


def read_video(src: VideoSource, *, fps: float | None = DEFAULT_FPS, num_frames: int | None = None,
               min_frames: int = 4, max_frames: int = 768, temporal_patch_size: int = 2,
               indices: Sequence[int] | None = None, transform: Callable[[np.ndarray], Any] | None = None,
               max_pixels: int = MAX_PIXELS, max_duration: float = MAX_DURATION,
               max_total_frames: int = MAX_TOTAL_FRAMES, max_bytes: int = MAX_BYTES) -> Video:
    """The sampled frames of a video file, decoded in one streaming pass.

    Sampling as `sample_indices` (or the given `indices`). Each kept frame, a uint8 `(H, W, 3)` RGB array, goes
    through `transform` before the next is decoded. Refused with `VideoTooLarge` before decoding: a frame over
    `max_pixels`, a duration over `max_duration`, a frame count over `max_total_frames`, sampled frames over
    `max_bytes` (when kept as decoded, without `transform`); with `VideoError`: not a video, no video stream, no
    frames, a file that ends early or is corrupt."""
    name = _name(src)
    av = _av()
    container = _open(src, name)
    try:
        info = _info(container, name, max_pixels, max_duration, max_total_frames)
        if indices is None:
            try:
                picked = sample_indices(info.total_frames, info.fps, fps=fps, num_frames=num_frames,
                                        min_frames=min_frames, max_frames=max_frames,
                                        temporal_patch_size=temporal_patch_size)
            except VideoError as e:
                raise VideoError(f"{name}: {e}") from None
        else:
            picked = sorted(int(i) for i in indices)
            if not picked or picked[0] < 0 or picked[-1] >= info.total_frames:
                raise ValueError(f"{name}: indices must be within the video's {info.total_frames} frames")
        size = len(picked) * info.width * info.height * 3
        if transform is None and size > max_bytes:  # with a transform, what is kept is what it makes
            raise VideoTooLarge(f"{name}: {len(picked)} frames of {info.width}x{info.height} would take "
                                f"{size / 2**20:,.0f} MiB, over the limit of {max_bytes / 2**20:,.0f} MiB; sample "
                                "fewer frames (fps=, max_frames=) or pass max_bytes=")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: the decoder's own parallelism
        frames, want, last = [], iter(picked), picked[-1]
        target = next(want)
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > max_pixels:  # a size change mid-stream is checked as the header was
                    raise VideoTooLarge(f"{name}: frame {i} is {frame.width}x{frame.height}, over the limit of "
                                        f"{max_pixels:,} pixels; refusing to decode further")
                while i == target:  # an index picked twice (num_frames near total) keeps the frame twice
                    rgb = frame.to_ndarray(format="rgb24")
                    frames.append(transform(rgb) if transform is not None else rgb)
                    target = next(want, None)
                if target is None or i >= last:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"{name}: the video is truncated or corrupt at frame {i + 1} ({e})") from None
        if len(frames) < len(picked):
            raise VideoError(f"{name}: the video ends after {i + 1} frames though its header claims "
                             f"{info.total_frames}; it looks truncated or corrupt")
        return Video(frames, list(picked), info.fps, info.total_frames, info)
    finally:
        container.close()


def frames_video(frames: Any, name: str = "video", *, fps: float | None = None,
                 max_pixels: int = MAX_PIXELS) -> Video:
    """A video given as its frames (PIL images, uint8 `(H, W, 3)` arrays, or one `(T, H, W, 3)` array), every frame
    kept, as transformers takes them. All frames must share one size, checked before any is converted."""
    items = list(frames) if not isinstance(frames, np.ndarray) else [frames[t] for t in range(frames.shape[0])]
    if not items:
        raise VideoError(f"{name}: no frames")
    sizes = set()
    for t, f in enumerate(items):
        if isinstance(f, Image.Image):
            sizes.add((f.height, f.width))
        elif isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3:
            sizes.add(f.shape[:2])
        else:
            got = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise VideoError(f"{name}: frame {t} is {got}; frames are PIL images or uint8 (H, W, 3) arrays")
    if len(sizes) > 1:
        raise VideoError(f"{name}: frames of different sizes {sorted(sizes)}; a video's frames share one size")
    h, w = sizes.pop()
    if h * w > max_pixels:
        raise VideoTooLarge(f"{name}: frames of {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    return Video(items, list(range(len(items))), fps, len(items))
