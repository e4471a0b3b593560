"""The video reader (processing/video.py) on tiny videos encoded here with PyAV: the frames it keeps and their RGB
pixels equal transformers' PyAV reader with Qwen2-VL's fps sampler; its sampler equals Qwen2VLVideoProcessor's on many
lengths and rates; decoding streams (only the sampled frames are ever held); and the refusals, each before decoding
where the header tells: not a video, a truncated file, no frames, a frame size, duration or frame count over the
limits, frames of mixed sizes, PyAV missing."""

import io
import sys
from functools import partial

import numpy as np
import pytest
from PIL import Image

from polymodal.processing.video import VideoError, VideoTooLarge, frames_video, probe_video, read_video, sample_indices

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")


def encode_video(path_or_buffer, frames: int = 20, fps: int = 8, size=(64, 96), fmt: str = "mp4",
                 codec: str = "mpeg4") -> None:
    """A tiny video whose frames differ (a moving bar, a changing green level): frame t is recognisable."""
    h, w = size
    with av.open(path_or_buffer, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            a = np.zeros((h, w, 3), np.uint8)
            a[:, (t * 4) % w:, 0] = 200
            a[..., 1] = (t * 9) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def video_bytes(**kw) -> bytes:
    buf = io.BytesIO()
    encode_video(buf, **kw)
    return buf.getvalue()


def transformers_frames(path, fps=2.0, **kw):
    from transformers.video_utils import read_video_pyav

    vp = transformers.Qwen2VLVideoProcessor(**kw)
    return read_video_pyav(str(path), sample_indices_fn=partial(vp.sample_frames, fps=fps))


@pytest.mark.parametrize("frames,rate,fps", [(20, 8, 2.0), (45, 15, 2.0), (16, 4, 1.0), (30, 10, 4.0)])
def test_frames_equal_transformers_pyav_reader(tmp_path, frames, rate, fps):
    path = tmp_path / "clip.mp4"
    encode_video(path, frames=frames, fps=rate)
    want, meta = transformers_frames(path, fps=fps)
    got = read_video(path, fps=fps)
    assert got.indices == [int(i) for i in meta.frames_indices]
    assert len(got.indices) % 2 == 0  # two frames per temporal patch
    assert np.array_equal(np.stack(got.frames), want)
    assert got.fps == meta.fps and got.total_frames == meta.total_num_frames
    assert got.sampled_fps == pytest.approx(meta.sampled_fps)
    assert got.timestamps == pytest.approx([float(t) for t in meta.timestamps])


def test_sampler_equals_qwen2_vl_video_processor():
    from transformers.video_utils import VideoMetadata

    vp = transformers.Qwen2VLVideoProcessor()
    for total in (4, 5, 7, 11, 24, 99, 100, 301, 1000, 5000):
        for rate in (1.0, 7.5, 24.0, 29.97, 60.0):
            for fps in (0.5, 2.0, 3.0):
                for lo, hi in ((4, 768), (2, 16), (8, 64)):
                    meta = VideoMetadata(total_num_frames=total, fps=rate)
                    want = vp.sample_frames(meta, fps=fps, min_frames=lo, max_frames=hi).tolist()
                    got = sample_indices(total, rate, fps=fps, min_frames=lo, max_frames=hi)
                    assert got == want, (total, rate, fps, lo, hi)
    meta = VideoMetadata(total_num_frames=50, fps=10.0)
    assert sample_indices(50, 10.0, fps=None, num_frames=9) == vp.sample_frames(meta, num_frames=9).tolist()


def test_decoding_streams_only_the_sampled_frames(tmp_path):
    # 240 frames at 24 fps, sampled at 2 fps: 20 frames kept; the transform sees only those, as they are decoded
    path = tmp_path / "long.mp4"
    encode_video(path, frames=240, fps=24, size=(32, 48))
    seen = []

    def transform(rgb):
        seen.append(rgb.shape)
        return rgb[::2, ::2].copy()

    got = read_video(path, fps=2.0, transform=transform)
    assert len(seen) == len(got.frames) == len(got.indices) == 20
    assert got.frames[0].shape == (16, 24, 3)
    assert got.indices == sample_indices(240, 24.0, fps=2.0)
    # the decoder stops at the last kept frame: a clip sampled from its first half never reads the rest
    first = read_video(path, indices=[0, 10, 20, 30])
    assert first.indices == [0, 10, 20, 30]


def test_sources_and_containers(tmp_path):
    data = video_bytes(frames=12, fps=6)
    path = tmp_path / "a.mp4"
    path.write_bytes(data)
    by_path, by_bytes, by_file = read_video(path), read_video(data), read_video(io.BytesIO(data))
    for other in (by_bytes, by_file):
        assert other.indices == by_path.indices
        assert all(np.array_equal(a, b) for a, b in zip(other.frames, by_path.frames))
    # a container without a frame count in its header (WebM): the packets are counted, nothing decoded
    webm = tmp_path / "b.webm"
    encode_video(webm, frames=12, fps=6, fmt="webm", codec="libvpx")
    info = probe_video(webm)
    assert (info.total_frames, info.fps, info.width, info.height) == (12, 6.0, 96, 64)
    assert len(read_video(webm).frames) == 4  # 12 frames at 6 fps, 2 fps -> 4 (the minimum)


def test_frames_given_as_a_list():
    frames = [np.full((20, 30, 3), t, np.uint8) for t in range(5)]
    video = frames_video(frames, fps=10.0)
    assert video.indices == [0, 1, 2, 3, 4] and video.sampled_fps == 10.0
    assert len(frames_video(np.stack(frames)).frames) == 5
    assert len(frames_video([Image.fromarray(f) for f in frames]).frames) == 5
    with pytest.raises(VideoError, match=r"frames of different sizes \[\(20, 30\), \(21, 30\)\]"):
        frames_video(frames + [np.zeros((21, 30, 3), np.uint8)])
    with pytest.raises(VideoError, match=r"frame 1 is float32 \(20, 30, 3\)"):
        frames_video([frames[0], frames[1].astype(np.float32)])
    with pytest.raises(VideoTooLarge, match="over the limit of 100"):
        frames_video(frames, max_pixels=100)
    with pytest.raises(VideoError, match="no frames"):
        frames_video([])


# ------------------------------------------------------------------------------------------ refusals


def test_not_a_video_and_truncated(tmp_path):
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(b"\x00\x01 this is not a video" * 100)
    with pytest.raises(VideoError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(VideoError):
        read_video(png.getvalue())
    data = video_bytes(frames=40, fps=8)
    with pytest.raises(VideoError):  # the mp4's index (moov) is at the end: half a file has none
        read_video(data[: len(data) // 2])
    # an mp4 with its index first (faststart), cut in half: the header claims 40 frames, the data stops early
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        noise = np.random.default_rng(0)
        for _ in range(40):
            frame = av.VideoFrame.from_ndarray(noise.integers(0, 255, (64, 96, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cut = path.read_bytes()
    with pytest.raises(VideoError, match=r"the video ends after \d+ frames though its header claims 40"):
        read_video(cut[: len(cut) // 2], indices=list(range(0, 40, 2)))


def test_zero_frames():
    # containers with a video stream and no frame in it, as PyAV writes them: each a clear VideoError
    for fmt, codec in (("mp4", "mpeg4"), ("webm", "libvpx"), ("matroska", "mpeg4")):
        buf = io.BytesIO()
        c = av.open(buf, "w", format=fmt)
        s = c.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
        c.close()
        with pytest.raises(VideoError, match="no video stream|not a readable video|no frames"):
            read_video(buf.getvalue())
    with pytest.raises(VideoError, match="no frames"):
        sample_indices(0, 8.0)
    with pytest.raises(VideoError, match="too few for one temporal patch"):
        sample_indices(1, 8.0, fps=2.0)


def test_limits_from_the_header_before_decoding(tmp_path, monkeypatch):
    data = video_bytes(frames=20, fps=8, size=(64, 96))

    def no_decode(*a, **k):
        raise AssertionError("decoded a frame")

    with pytest.raises(VideoTooLarge, match=r"the header claims 96x64 = 6,144 pixels per frame, over the limit of "
                                            r"6,000"):
        read_video(data, max_pixels=6000, transform=no_decode)
    with pytest.raises(VideoTooLarge, match=r"the header claims 2 s, over the limit of 1 s"):
        read_video(data, max_duration=1.0, transform=no_decode)
    with pytest.raises(VideoTooLarge, match=r"the header claims 20 frames, over the limit of 10"):
        read_video(data, max_total_frames=10, transform=no_decode)
    with pytest.raises(VideoTooLarge, match=r"4 frames of 96x64 would take 0 MiB, over the limit"):
        read_video(data, max_bytes=10_000)  # frames kept as decoded (no transform) are bounded before decoding
    # a huge frame size claimed by the header: the stream's declared size is checked, nothing is allocated for it
    big = tmp_path / "big.mp4"
    encode_video(big, frames=2, fps=2, size=(2048, 4096))
    with pytest.raises(VideoTooLarge, match=r"4096x2048 = 8,388,608 pixels per frame, over the limit of 1,000,000"):
        probe_video(big, max_pixels=1_000_000)


def test_pyav_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install av"):
        read_video(b"whatever")
