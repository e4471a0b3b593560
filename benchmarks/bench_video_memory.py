"""Qwen2-VL's video preprocessing stays bounded: peak memory for 1, 10 and 60 minutes of video.

    .venv/bin/python benchmarks/bench_video_memory.py [--minutes 1,10,60] [--fps 8] [--size 320x240]

Each length is a generated MPEG-4 file of moving shapes (written once into a temporary directory) run through
`Qwen2VLProcessor` in a fresh process: a chat message with the video, sampled at 2 frames per second within the
video processor's frame budget (`max_frames`, 768 by default: the visual-token budget of one video), decoded in one
streaming pass. Reported per length: the frames the header claims, the frames kept, the visual tokens, the
preprocessing time (and frames decoded per second), and the process's peak resident memory before and after the
call (`ru_maxrss`). Memory that does not grow with the video's length is the point: the decoder keeps only the
sampled frames, each resized to its final size as it arrives.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from polymodal.processing.qwen2_vl import Qwen2VLProcessor
from polymodal.processing.video import probe_video

proc = Qwen2VLProcessor.from_pretrained(sys.argv[1])
path = sys.argv[2]
info = probe_video(path)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = proc([{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "What moves?"}]}])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
grid = out["video_grid_thw"][0].tolist()
print(json.dumps({"claimed_frames": info.total_frames, "kept_frames": grid[0] * 2, "grid": grid,
                  "tokens": int((out["input_ids"] == proc.video_token_id).sum()), "seconds": seconds,
                  "peak_before_mib": before / 1024, "peak_after_mib": after / 1024}))
"""


def write_video(path: Path, minutes: float, fps: int, size: tuple[int, int]) -> None:
    """A video of a square moving across a gradient, `minutes` long at `fps`."""
    import av
    import numpy as np

    w, h = size
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 2] = np.linspace(40, 200, w, dtype=np.uint8)[None, :]
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": str(fps * 10)}  # a keyframe every 10 s, as camera files have
        for t in range(int(minutes * 60 * fps)):
            frame = base.copy()
            x = (t * 3) % (w - 32)
            y = (t * 2) % (h - 32)
            frame[y:y + 32, x:x + 32] = (230, 60, 40)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def save_processor(path: Path) -> None:
    """transformers' Qwen2VLProcessor with its default pixel ranges and a small tokenizer holding Qwen's tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["user What moves in the video? assistant A red square."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    transformers.Qwen2VLProcessor(image_processor=transformers.Qwen2VLImageProcessor(),
                                  video_processor=transformers.Qwen2VLVideoProcessor(), tokenizer=fast,
                                  chat_template=template).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="1,10,60")
    ap.add_argument("--fps", type=int, default=8, help="the generated videos' frame rate")
    ap.add_argument("--size", default="320x240", help="the generated videos' frame size, WxH")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as d:
        processor = Path(d) / "processor"
        save_processor(processor)
        print(f"Qwen2VLProcessor (transformers' default video pixel range), videos {size[0]}x{size[1]} at "
              f"{args.fps} fps sampled at 2 fps")
        print(f"{'minutes':>7} {'claimed':>8} {'kept':>5} {'grid':>14} {'tokens':>7} {'seconds':>8} {'frames/s':>9} "
              f"{'peak MiB before':>16} {'after':>7}")
        for minutes in (float(m) for m in args.minutes.split(",")):
            video = Path(d) / f"{minutes:g}min.mp4"
            write_video(video, minutes, args.fps, size)
            r = subprocess.run([sys.executable, "-c", CHILD, str(processor), str(video), src], capture_output=True,
                               text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{minutes:>7g} {row['claimed_frames']:>8} {row['kept_frames']:>5} {str(row['grid']):>14} "
                  f"{row['tokens']:>7} {row['seconds']:>8.1f} {row['claimed_frames'] / row['seconds']:>9.0f} "
                  f"{row['peak_before_mib']:>16.0f} {row['peak_after_mib']:>7.0f}")
            video.unlink()


if __name__ == "__main__":
    main()
