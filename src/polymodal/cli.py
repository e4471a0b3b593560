"""The `polymodal` command line. Every command calls a pipeline; `--json` prints one JSON document on stdout
and nothing else there. Bad input exits with status 2 and one clear line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _split_labels(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels:
        raise UsageError("--labels needs at least one label, separated by commas")
    return labels


def _open_images(paths: list[str]) -> list:
    """Every image decoded (safely: header-checked sizes) before any model loads, so a wrong path or a file that is
    not an image is reported at once; the pipelines take the decoded images."""
    from polymodal.processing import open_image

    return [open_image(p) for p in paths]


def _check_model_path(model: str | None, *, hosted: bool = False) -> None:
    """A --model that is plainly a local path (./x, /x, ~/x, x.gguf) but is not there: say so now, instead of
    looking it up on the hub after everything else. A hosted model (openai:/anthropic:/gemini:) only where the
    command serves one (`hosted`: polymodal serve)."""
    if model is None:  # the default
        return
    if ":" in model.split("/")[0]:
        from polymodal.providers import is_provider_spec

        if is_provider_spec(model) and not hosted:
            raise UsageError(f"--model {model} is a hosted model; this command runs local checkpoints (serve it "
                             f"with `polymodal serve --model {model}`)")
        return
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(model)):
        raise UsageError(f"--model {model}: no such file or directory")


def _top_k(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise UsageError(f"--top-k must be at least 1, got {value}")
    return value


def _emit(args, result, human: Callable[[object], str]) -> None:
    if args.json:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(human(result))


def _table(rows: list[dict]) -> str:
    return "\n".join(f"{r['score']:.4f}  {r['label']}" for r in rows)


def _emit_ranked(args, images: list[str], result) -> None:
    """A ranking per image: one table, or one per image under its path."""
    if len(images) > 1:
        _emit(args, result, lambda r: "\n\n".join(f"{p}\n{_table(rows)}" for p, rows in zip(images, r)))
    else:
        _emit(args, result, _table)


def cmd_zero_shot(args) -> None:
    import polymodal as pm

    images, labels, top_k = args.image, _split_labels(args.labels), _top_k(args.top_k)
    opened = _open_images(images)
    pipe = pm.pipeline("zero-shot-image-classification", model=args.model)
    result = pipe(opened if len(opened) > 1 else opened[0], candidate_labels=labels, template=args.template,
                  templates=args.templates, top_k=top_k)
    _emit_ranked(args, images, result)


def cmd_classify(args) -> None:
    import polymodal as pm

    images, top_k = args.image, _top_k(args.top_k)
    opened = _open_images(images)
    pipe = pm.pipeline("image-classification", model=args.model)
    result = pipe(opened if len(opened) > 1 else opened[0], top_k=top_k)
    _emit_ranked(args, images, result)


def cmd_retrieve(args) -> None:
    import polymodal as pm

    top_k, opened = _top_k(args.top_k), _open_images(args.images)
    pipe = pm.pipeline("image-text-retrieval", model=args.model)
    result = pipe(images=opened, texts=args.texts, top_k=top_k)
    result["images"] = [str(p) for p in args.images]

    def human(r):
        lines = ["image -> text"]
        for path, hits in zip(args.images, r["image_to_text"]):
            lines.append(f"  {path}: " + "; ".join(f"{h['text']!r} ({h['score']:.3f})" for h in hits))
        lines.append("text -> image")
        for text, hits in zip(args.texts, r["text_to_image"]):
            lines.append(f"  {text!r}: " + "; ".join(f"{args.images[h['index']]} ({h['score']:.3f})" for h in hits))
        return "\n".join(lines)

    _emit(args, result, human)


def cmd_caption(args) -> None:
    import polymodal as pm

    images = args.image
    opened = _open_images(images)
    pipe = pm.pipeline("image-to-text", model=args.model)
    result = pipe(opened if len(opened) > 1 else opened[0], prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                  num_beams=args.beams)
    if len(images) > 1:
        _emit(args, result, lambda r: "\n".join(f"{p}: {c[0]['generated_text']}" for p, c in zip(images, r)))
    else:
        _emit(args, result, lambda r: r[0]["generated_text"])


def cmd_vqa(args) -> None:
    import polymodal as pm

    (image,) = _open_images([args.image])
    pipe = pm.pipeline("visual-question-answering", model=args.model)
    result = pipe(image, args.question, max_new_tokens=args.max_new_tokens, num_beams=args.beams)
    _emit(args, result, lambda r: r[0]["answer"])


def cmd_match(args) -> None:
    import polymodal as pm

    (image,) = _open_images([args.image])
    pipe = pm.pipeline("image-text-matching", model=args.model)
    result = pipe(image, args.texts)
    _emit(args, result, lambda r: "\n".join(f"{x['score']:.4f}  {x['similarity']:+.4f}  {x['text']}" for x in r))


def cmd_embed(args) -> None:
    import polymodal as pm

    if not args.image and not args.text:
        raise UsageError("embed needs --image and/or --text")
    opened = _open_images(args.image)
    pipe = pm.pipeline("image-text-retrieval", model=args.model)
    result = {}
    if args.image:
        result["image_embeddings"] = pipe.embed_images(opened).tolist()
    if args.text:
        result["text_embeddings"] = pipe.embed_texts(args.text).tolist()
    _emit(args, result, lambda r: "\n".join(f"{k}: {len(v)} x {len(v[0])}" for k, v in r.items()))


def cmd_models(args) -> None:
    from polymodal.local import local_models
    from polymodal.registry import all_families

    offline = local_models()
    families = [{"family": fam.name, "description": fam.description, "tasks": list(fam.tasks),
                 "layouts": list(fam.layouts), "presets": list(fam.presets), "hub_ids": dict(fam.hub_ids)}
                for fam in all_families()]

    def human(r):
        out = ["Runs here offline (pass SOURCE as --model):"]
        out += [f"  {m['family']:<8} {m['source']}\n           {m['what']}" for m in r["offline"]] or ["  (none)"]
        out += ["", "Families (hub ids need a download from the Hugging Face hub; presets build random weights "
                "with pm.build):"]
        for f in r["families"]:
            out.append(f"  {f['family']}: {f['description']}")
            out.append(f"    tasks: {', '.join(f['tasks']) or '(Python API only)'}")
            out.append(f"    layouts: {', '.join(f['layouts'])}")
            out.append(f"    presets: {', '.join(f['presets'])}")
            if f["hub_ids"]:
                out.append(f"    hub ids: {', '.join(f['hub_ids'])}")
        return "\n".join(out)

    _emit(args, {"offline": offline, "families": families}, human)


def _sampling(args) -> dict:
    """The pipeline's keywords; settings not given stay None, so the model's generation defaults apply."""
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be at least 0 (0: no top-k filter), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature must be at least 0 (0: greedy), got {args.temperature}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be above 0 (1: none), got {args.repetition_penalty}")
    options = dict(max_new_tokens=args.max_new_tokens, top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, compile_step=args.compile)
    if args.temperature == 0:
        options["do_sample"] = False
    elif args.temperature is not None:
        options.update(do_sample=True, temperature=args.temperature)
    return options


def _stream_out(pipe, inputs, args) -> str:
    """Print the answer as it streams; a cut answer says so on stderr. -> the answer's text."""
    result = _print_stream(pipe.stream(inputs, **_sampling(args)))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if result.finish_reason == "length":
        print(f"[cut at {args.max_new_tokens} tokens: raise --max-new-tokens for more]", file=sys.stderr)
    return result.text


def _print_stream(stream):
    """Write each piece of `stream` to stdout as it comes -> its ChatResult (`consume`: Ctrl-C closes the stream,
    which stops its generation)."""
    from polymodal.pipelines.text import consume

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return consume(stream, write)


def _chat_model(args):
    """--model as the pipelines take it: the source itself, or with --quantize the model loaded quantized (the
    embedded SmolLM2 file when no --model is given)."""
    if not getattr(args, "quantize", None):
        return args.model
    import polymodal as pm
    from polymodal.pipelines.text import default_chat_model, load_default_chat_model

    if args.model is not None:
        return pm.load(args.model, quantize=args.quantize)
    if default_chat_model() is None:
        raise UsageError("--quantize: the embedded SmolLM2 package is not installed; pass --model")
    return load_default_chat_model(quantize=args.quantize)  # with its generation defaults, as without --quantize


def _text_pipeline(args):
    import polymodal as pm

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    return pm.pipeline("text-generation", model=_chat_model(args))


def cmd_generate(args) -> None:
    _sampling(args)  # refuse bad settings before the model loads
    pipe = _text_pipeline(args)
    if args.json:
        _emit(args, pipe(args.text, **_sampling(args)), str)
        return
    sys.stdout.write(args.text)
    _stream_out(pipe, args.text, args)


def cmd_chat(args) -> None:
    from polymodal.pipelines import chat_pipeline

    _sampling(args)  # refuse bad settings before the model loads
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.fps is not None and not (args.fps > 0 and args.video):
        raise UsageError("--fps is the rate videos are sampled at: a positive number, with --video")
    if args.draw and not args.image:
        raise UsageError("--draw draws the boxes and points of the answer on the first --image: give one")
    if args.draw and args.message is None:
        raise UsageError("--draw needs a message (one question, one answer)")
    # decoded (images) or probed from the header (videos) before the model loads
    media = [("image", p, im) for p, im in zip(args.image, _open_images(args.image))]
    media += [("video", p, p) for p in _probe_videos(args.video)]
    if media and args.model is None:
        raise UsageError(f"--{media[0][0]}: the default chat model (SmolLM2-135M-Instruct) takes no images or "
                         "videos; pass --model a vision-language model such as a LLaVA or Qwen2-VL checkpoint")
    pipe = chat_pipeline(_chat_model(args), images=bool(media))  # a text-only model with --image: ValueError, exit 2
    if args.video:
        _video_settings(pipe, args.fps)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:  # one question, one answer
        turn, shown = _user_turn(args.message, media)
        if args.json:
            (result,) = pipe([*history, turn], **_sampling(args))
            out = {**result, "generated_text": [*history, shown, result["generated_text"][-1]]}
            if args.draw:
                out["regions"] = _draw(pipe, media, result["generated_text"][-1]["content"], args.draw)
            _emit(args, [out], str)
            return
        answer = _stream_out(pipe, [*history, turn], args)
        if args.draw:
            regions = _draw(pipe, media, answer, args.draw)
            print(f"[{len(regions)} box(es) and point(s) drawn on {args.image[0]}: {args.draw}]", file=sys.stderr)
        return
    if args.json:
        raise UsageError("--json needs a message (the interactive chat streams text)")
    _interactive_chat(pipe, history, args, media)


def _probe_videos(paths: list[str]) -> list[str]:
    """Each --video's header read (size, rate, length checked against the decoding limits), no frame decoded."""
    from polymodal.processing.video import probe_video

    for p in paths:
        probe_video(p)
    return paths


def _video_settings(pipe, fps: float | None) -> None:
    """The pipeline's processor takes videos, sampled at --fps when given."""
    video = getattr(pipe.processor, "video_processor", None)
    if video is None:
        raise ValueError(f"{pipe.source or 'this model'} is a {pipe.family} model: it takes images, not videos "
                         "(Qwen2-VL and Qwen2.5-VL take videos)")
    if fps is not None:
        pipe.processor.video_processor = video.replace(fps=fps)


def _draw(pipe, media: list, answer: str, out: str) -> list[dict]:
    """The answer's boxes and points, read in the model's frame for the first image, drawn on it and saved to
    `out` -> the regions in that image's pixels."""
    from polymodal.processing.grounding import draw, parse_regions

    image = next(im for kind, _, im in media if kind == "image")
    frame_of = getattr(pipe.processor, "box_frame", None)
    if frame_of is None:
        raise ValueError(f"--draw: a {pipe.family} model writes no boxes in a known frame (Qwen2-VL and Qwen2.5-VL "
                         "do)")
    regions = parse_regions(answer, frame_of(image.width, image.height))
    draw(image, regions).save(out)
    return [r.to_image(image.size).as_dict() for r in regions]


def _user_turn(text: str, media: list) -> tuple[dict, dict]:
    """A user message with its (kind, path, image or video) attachments first, then the text; and the same naming
    them by path, as --json shows it."""
    if not media:
        return {"role": "user", "content": text}, {"role": "user", "content": text}
    question = {"type": "text", "text": text}
    return ({"role": "user", "content": [*({"type": kind, kind: obj} for kind, _, obj in media), question]},
            {"role": "user", "content": [*({"type": kind, "path": str(p)} for kind, p, _ in media), question]})


def _interactive_chat(pipe, history: list[dict], args, media: list = ()) -> None:
    """A multi-turn session on stdin: line editing and history (readline) at a terminal; Ctrl-C stops the answer
    being written (the turn is dropped) and keeps the session; Ctrl-D or /exit ends it. With a vision-language
    model, `/image PATH` (`/video PATH`) attaches one to the next question (--image and --video ones go with the
    first); a question the model refuses (too long with its images, say) is reported and dropped, and the session
    goes on."""
    from polymodal.weights.record import record

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() gains line editing and history)
        except ImportError:  # Windows
            pass
        attach = "/image PATH (/video PATH) attaches one to your next question, " if pipe.takes_images else ""
        source = record(pipe.model).source
        print(f"chatting with {source or 'the default model'}; {attach}/reset clears "
              "the conversation, Ctrl-C stops an answer, /exit or Ctrl-D ends the chat", file=sys.stderr)
    system = history[:1]
    pending = list(media)  # (kind, path, image or video) for the next question
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print("\n(Ctrl-D or /exit ends the chat)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            turns = (len(history) - len(system)) // 2
            history = list(system)
            dropped = f", {len(pending)} attachment(s) dropped" if pending else ""
            pending = []
            print(f"(conversation cleared: {turns} turn{'s' * (turns != 1)} forgotten{dropped})", file=sys.stderr)
            continue
        command = line.split(maxsplit=1)
        if command[0] in ("/image", "/video"):
            pending += _attach(pipe, command[0][1:], command[1].strip() if len(command) > 1 else "")
            continue
        turn, _ = _user_turn(line, pending)
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            answer = _stream_out(pipe, [*history, turn], args)
        except KeyboardInterrupt:
            print("\n(stopped; that question is not kept)", file=sys.stderr)
            continue
        except ValueError as e:  # e.g. over the context once its images are expanded: this turn only
            print(f"\nerror: {_first_line(e)} (that question is not kept)", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []


def _attach(pipe, kind: str, path: str) -> list:
    """`/image PATH` or `/video PATH` in the interactive chat -> [(kind, path, decoded image or the video's path)],
    or [] after saying on stderr why not."""
    from polymodal.pipelines.text import no_images_error

    if not path:
        print(f"(usage: /{kind} PATH attaches that {kind} to your next question)", file=sys.stderr)
        return []
    if not pipe.takes_images:
        print(f"error: {no_images_error(pipe.model)}", file=sys.stderr)
        return []
    if kind == "video" and getattr(pipe.processor, "video_processor", None) is None:
        print(f"error: a {pipe.family} model takes images, not videos", file=sys.stderr)
        return []
    try:
        (item,) = _open_images([path]) if kind == "image" else _probe_videos([path])
    except ValueError as e:  # ImageError / VideoError: missing, not decodable, too large
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return []
    print(f"({path} goes with your next question)", file=sys.stderr)
    return [(kind, path, item)]


def cmd_demo(args) -> None:
    from polymodal.demo import run_demo

    summary = run_demo(args.out, quiet=args.json)
    if args.json:
        _emit(args, summary, str)


def cmd_train(args) -> None:
    import shlex

    from polymodal.train import ConfigError, run
    from polymodal.train.engine import TrainingInterrupted

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only the first process reports
    try:
        summary = run(args.recipe, args.out, overrides=args.set, resume=args.resume)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: a checkpoint of the last whole step is on disk
        if main_process:
            again = shlex.join(["polymodal", "train", args.recipe, "--out", args.out,
                                *(x for o in args.set for x in ("--set", o)), "--resume"])
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                again = "the same torchrun command with --resume"
            print(f"interrupted ({e.signal_name}) after step {e.step}: saved {e.checkpoint}; continue with: "
                  f"{again}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    if not main_process:
        return
    if "table" in summary:  # an ablation (one run per variant) or a recipe of stages that ends in one table
        where = summary.get("table_file", "ablation.md")
        kind = "ablation of" if where == "ablation.md" else "results of"
        _emit(args, summary, lambda s: f"{s['table']}\n({kind} {args.recipe}: {args.out}/{where})")
        return

    def loss(value) -> str:
        return "not finite" if value is None else f"{value:.4f}"

    _emit(args, summary, lambda s: f"trained {args.recipe}: {s['steps']} steps, final loss {loss(s['final_loss'])} "
          f"(the last step's; smoothed {loss(s.get('smoothed_loss'))}, as on the progress bar); results in {args.out}")


def _image_size(text: str | None) -> tuple[int | None, int | None]:
    """--size WIDTHxHEIGHT -> (height, width); None: the model's default."""
    if text is None:
        return None, None
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and len(w) <= 5 and len(h) <= 5):
        raise UsageError(f"--size {text}: expected WIDTHxHEIGHT in pixels, e.g. 512x512")
    return int(h), int(w)


def _image_outputs(out: str, n: int) -> list[str]:
    """Where the images go: -o itself for one image, NAME-1.EXT ... NAME-N.EXT for several; the folder must exist and
    the extension be one PIL writes, checked before the model loads."""
    from PIL import Image

    root, ext = os.path.splitext(out)
    Image.init()
    if ext.lower() not in Image.registered_extensions():
        raise UsageError(f"-o {out}: give a file name ending in an image format, e.g. out.png")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"-o {out}: the folder {folder} does not exist")
    return [out] if n == 1 else [f"{root}-{i}{ext}" for i in range(1, n + 1)]


def cmd_generate_image(args) -> None:
    import math

    from polymodal.pipelines.text_to_image import random_seed, resolve_scheduler

    model = None if args.model is None else os.path.expanduser(args.model)
    if model is not None and os.path.isdir(model) and not os.path.exists(os.path.join(model, "model_index.json")):
        raise UsageError(f"--model {args.model}: not a diffusers pipeline folder (it has no model_index.json)")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    if args.n < 1:
        raise UsageError(f"-n must be at least 1, got {args.n}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    try:
        scheduler = resolve_scheduler(args.scheduler)
    except ValueError as e:
        raise UsageError(f"--scheduler: {e}") from None
    height, width = _image_size(args.size)
    outputs = _image_outputs(args.output, args.n)
    import polymodal as pm

    steps, guidance = args.steps, args.guidance
    if model is None:  # the project's own tiny model (ldm-shapes), trained and cached on first use
        from polymodal.train.ldm import LdmShapesConfig, cached_default

        defaults = LdmShapesConfig()  # the steps and guidance its evaluation measured
        steps = defaults.eval_steps if steps is None else steps
        guidance = defaults.guidance if guidance is None else guidance
        model = str(cached_default(lambda m: None if args.quiet else print(m, file=sys.stderr)))
    pipe = pm.pipeline("text-to-image", model=model)
    try:
        pipe.use_scheduler(scheduler)
    except ValueError as e:
        raise UsageError(f"--scheduler {args.scheduler}: {e}") from None
    try:
        pipe.resolve_size(height, width)
    except ValueError as e:
        raise UsageError(f"--size {args.size}: {e}") from None
    seed = random_seed() if args.seed is None else args.seed  # reported, so that a run can be repeated
    images = pipe(args.prompt, args.negative, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                  height=height, width=width, num_images_per_prompt=args.n, progress=not (args.quiet or args.json))
    for image, path in zip(images, outputs):
        image.save(path)
    _emit(args, {"images": outputs, "seed": seed}, lambda r: "\n".join(r["images"]) + f"\n(seed {r['seed']})")


def cmd_transcribe(args) -> None:
    """Speech to text with Whisper: every audio file decoded first (a bad one fails before any model loads)."""
    import polymodal as pm
    from polymodal.processing.audio import read_audio

    audio = [read_audio(path) for path in args.audio]
    pipe = pm.pipeline("automatic-speech-recognition", model=args.model)
    result = pipe(audio if len(audio) > 1 else audio[0], language=args.language, task=args.task,
                  max_new_tokens=args.max_new_tokens, return_timestamps=args.timestamps)

    def human(r: dict) -> str:
        if not args.timestamps:
            return r["text"].strip()
        return "\n".join(f"[{c['timestamp'][0]:.2f} -> "
                         f"{'...' if c['timestamp'][1] is None else format(c['timestamp'][1], '.2f')}] "
                         f"{c['text'].strip()}" for c in r["chunks"])

    if len(audio) > 1:
        _emit(args, result, lambda r: "\n".join(f"{p}: {human(t)}" for p, t in zip(args.audio, r)))
    else:
        _emit(args, result, human)


def cmd_speak(args) -> None:
    """Text to speech: the packaged Piper voice (or espeak-ng, or --voice), written as a 16-bit WAV file."""
    from pathlib import Path

    from polymodal.pipelines.tts import TextToSpeechPipeline, check_text

    text = sys.stdin.read() if args.text == "-" else args.text
    check_text(text)  # empty or huge: exit 2 before any voice loads
    out = Path(args.out).expanduser()
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"-o {args.out}: give a file path in an existing directory")
    pipe = TextToSpeechPipeline(voice=args.voice, speed=args.speed)
    data = pipe.wav(text)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    seconds = (len(data) - 44) / 2 / pipe.sampling_rate
    result = {"path": str(out), "seconds": round(seconds, 3), "sampling_rate": pipe.sampling_rate,
              "voice": pipe.voice.name}
    _emit(args, result,
          lambda r: f"{r['path']}: {r['seconds']:.2f} s of speech ({r['voice']}, {r['sampling_rate']} Hz)")


def _cascade(args, chat: Callable[[], object], max_new_tokens: int):
    """The spoken-dialogue cascade of `talk` and `serve --realtime`: the voice (--voice) first, so that an unknown
    one exits 2 before the big models load, then Whisper (--asr-model, default the packaged tiny.en), then the chat
    model `chat()` gives."""
    import polymodal as pm
    from polymodal.speech.dialogue import Cascade

    tts = pm.pipeline("text-to-speech", model=args.voice)
    asr = pm.pipeline("automatic-speech-recognition", model=args.asr_model)
    return Cascade(asr, chat(), tts, max_new_tokens=max_new_tokens)


def _realtime_factory(args, served) -> Callable:
    """serve --realtime: () -> a Cascade for each WS /v1/realtime connection, over models loaded once. Its chat
    model is the served chat model (--realtime-model NAME, else the first served one), else the embedded default."""
    import polymodal as pm
    from polymodal.serve.realtime import served_chat

    def chat():
        found = served_chat(served, args.realtime_model)
        return found if found is not None else pm.pipeline("text-generation")

    return _cascade(args, chat, args.realtime_max_tokens).fork


def cmd_talk(args) -> None:
    """Spoken dialogue, one turn: the question in --in answered aloud into --out (polymodal/speech/dialogue.py)."""
    from pathlib import Path

    from polymodal.processing.audio import read_audio
    from polymodal.speech.dialogue import MAX_TURN_SECONDS, find_turn, live_audio_problem, replay

    if args.input is None:
        raise UsageError(f"talk: {live_audio_problem()}; answer a recording with --in question.wav --out answer.wav")
    out = Path(args.out).expanduser() if args.out else None
    if out is None or out.is_dir() or not out.parent.is_dir():
        raise UsageError("--out: give the answer's WAV file path, in an existing directory")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    # bad audio, a recording longer than one question or silence: exit 2 before the models load
    samples = read_audio(args.input, max_seconds=MAX_TURN_SECONDS)
    speech, heard_for = find_turn(samples)
    import torch

    import polymodal as pm

    torch.set_num_threads(args.threads)
    cascade = _cascade(args, lambda: pm.pipeline("text-generation", model=args.model), args.max_new_tokens)
    if not args.cold:
        cascade.warm_up()  # as a live assistant is, before the user speaks
    if args.live:  # the recording played into the turn-taking loop in real time, the answer played out
        played = replay(cascade, samples)
        if played["turn"] is None:
            raise UsageError(f"--in {args.input}: the live turn-taking heard no turn in it")
        reply, audio = played["turn"].reply, [played["audio"]] if played["audio"].size else []
    else:
        reply = cascade.reply(speech, heard_for=heard_for)
        audio = [c["audio"] for c in reply]
    if not audio:
        raise UsageError(f"--in {args.input}: no answer to speak (Whisper heard {reply.transcript!r}, the chat "
                         f"model said {reply.text!r})")
    import numpy as np

    from polymodal.speech import wav_bytes

    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(wav_bytes(np.concatenate(audio), cascade.sampling_rate))
    os.replace(tmp, out)
    result = {"transcript": reply.transcript, "reply": reply.spoken, "out": str(out),
              "seconds": round(sum(map(len, audio)) / cascade.sampling_rate, 3), "sampling_rate": cascade.sampling_rate,
              "voice": cascade.tts.voice.name, "latency": {k: v and round(v, 3) for k, v in reply.latency.items()}}
    if args.live:
        result["latency"]["first_audio_out"] = played["waited"] and round(played["waited"], 3)
    names = {"vad": "VAD", "asr": "ASR", "first_token": "first token", "first_sentence": "first sentence",
             "first_audio": "first audio", "first_audio_out": "first audio out (wall clock)"}
    _emit(args, result, lambda r: f"you said: {r['transcript']}\nanswer:   {r['reply']}\n{r['out']}: "
          f"{r['seconds']:.2f} s of speech ({r['voice']}, {r['sampling_rate']} Hz)\nafter the end of your speech: " +
          ", ".join(f"{names[k]} {v:.2f} s" for k, v in r["latency"].items() if v is not None))


def _check_realtime_options(args) -> None:
    """serve's voice options go with --realtime; --realtime-model must name a model the specs serve."""
    from polymodal.serve.registry import DEFAULT_MODEL_ID, default_id, parse_spec

    given = [f for f, v in (("--voice", args.voice), ("--asr-model", args.asr_model),
                            ("--realtime-model", args.realtime_model)) if v is not None]
    if given and not args.realtime:
        raise UsageError(f"{', '.join(given)} set the realtime voice route: add --realtime")
    if args.realtime_max_tokens < 1:
        raise UsageError("--realtime-max-tokens must be at least 1")
    ids = [name or default_id(source) for name, source in map(parse_spec, args.model)] or [DEFAULT_MODEL_ID]
    if args.realtime_model is not None and args.realtime_model not in ids:
        raise UsageError(f"--realtime-model {args.realtime_model}: no served model has that name (served: "
                         f"{', '.join(ids)})")


def cmd_serve(args) -> None:
    from polymodal.serve.app import MAX_BODY_BYTES, api_key_from_env, bind_socket, serve
    from polymodal.serve.registry import load_served, parse_spec

    for spec in args.model:
        try:
            parse_spec(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.max_batch < 1 or args.max_queue < 0:
        raise UsageError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.allow_remote_media and not args.allowed_domain:
        raise UsageError("--allow-remote-media needs at least one --allowed-domain (remote media is allow-listed)")
    from polymodal.serve.media import MediaPolicy

    try:
        policy = MediaPolicy(allow_remote=args.allow_remote_media or bool(args.allowed_domain),
                             allowed_domains=tuple(args.allowed_domain), local_root=args.media_root,
                             **{k: v for k, v in (("max_video_frames", args.max_video_frames),
                                                  ("max_video_seconds", args.max_video_seconds),
                                                  ("video_fps", args.video_fps)) if v is not None})
    except ValueError as e:
        raise UsageError(str(e).replace("MediaPolicy.", "--").replace("_", "-")) from None
    if args.max_visual_tokens is not None and args.max_visual_tokens < 1:
        raise UsageError("--max-visual-tokens must be at least 1")
    if args.max_body_mib is not None and args.max_body_mib < 1:
        raise UsageError("--max-body-mib must be at least 1")
    _check_realtime_options(args)
    sock = bind_socket(args.host, args.port)  # a port in use: OSError, exit 2, before the models load
    try:
        served = load_served(args.model, max_batch=args.max_batch, max_queue=args.max_queue,  # ValueError: exit 2
                             quantize=args.quantize)
        served.limit(disable=tuple(args.disable), max_visual_tokens=args.max_visual_tokens)
        realtime = _realtime_factory(args, served) if args.realtime else None
    except BaseException:
        sock.close()
        raise
    serve(served, host=args.host, port=args.port, sock=sock, api_key=api_key_from_env(args.api_key), realtime=realtime,
          cors_origins=tuple(args.cors_origin), media_policy=policy,
          max_body_bytes=args.max_body_mib * 1024 * 1024 if args.max_body_mib else MAX_BODY_BYTES)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="polymodal", description="polymodal: multimodal models from LeNet to Stable Diffusion 3.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("zero-shot", cmd_zero_shot, "zero-shot image classification with CLIP")
    sp.add_argument("--model", required=True, help="checkpoint directory or hub id")
    sp.add_argument("--image", required=True, action="append", help="image file (repeatable)")
    sp.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,car"')
    sp.add_argument("--template", default="a photo of a {}.", help="prompt template with {} for the label")
    sp.add_argument("--templates", default=None, help='a template set ("imagenet80") to ensemble')
    sp.add_argument("--top-k", type=int, default=None)

    sp = add("classify", cmd_classify, "image classification (ViT, ResNet, LeNet)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image", required=True, action="append")
    sp.add_argument("--top-k", type=int, default=5)

    sp = add("retrieve", cmd_retrieve, "rank images against texts and texts against images with CLIP")
    sp.add_argument("--model", required=True)
    sp.add_argument("--images", required=True, nargs="+")
    sp.add_argument("--texts", required=True, nargs="+")
    sp.add_argument("--top-k", type=int, default=5)

    sp = add("caption", cmd_caption, "describe images in words (a BLIP or BLIP-2 captioning model)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image", required=True, action="append")
    sp.add_argument("--prompt", default=None, help='a beginning the caption continues, e.g. "a picture of"')
    sp.add_argument("--max-new-tokens", type=int, default=30)
    sp.add_argument("--beams", type=int, default=1, help="beam search width (1: greedy)")

    sp = add("vqa", cmd_vqa, "answer a question about an image (BLIP VQA, or BLIP-2 with its Question: ... Answer: "
             "prompt)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image", required=True)
    sp.add_argument("--question", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=10)
    sp.add_argument("--beams", type=int, default=1)

    sp = add("match", cmd_match, "rank texts by how well they describe an image (BLIP ITM probability, ITC cosine)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image", required=True)
    sp.add_argument("--texts", required=True, nargs="+")

    sp = add("embed", cmd_embed, "CLIP image and/or text embeddings (L2-normalized)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image", action="append", default=[])
    sp.add_argument("--text", action="append", default=[])

    def add_sampling(sp):
        sp.add_argument("--model", default=None, help="checkpoint directory, .gguf file or hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
        sp.add_argument("--max-new-tokens", type=int, default=256)
        sp.add_argument("--temperature", type=float, default=None,
                        help="0: greedy; > 0: sample (default: the model's generation defaults; for the embedded "
                        "SmolLM2 greedy with --repetition-penalty 1.1)")
        sp.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top tokens of this "
                        "total probability (default 1: all)")
        sp.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 0: all)")
        sp.add_argument("--repetition-penalty", type=float, default=None,
                        help="1: none (default: the model's generation defaults)")
        sp.add_argument("--seed", type=int, default=None, help="seed for sampling")
        sp.add_argument("--compile", action="store_true",
                        help="decode with the torch.compile'd fixed-shape step: faster per token for one "
                             "sequence, after about a minute of compiling per length bucket (LLaMA/Qwen2 models)")
        sp.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantized linear layers for fast CPU decoding (docs/quantization.md); "
                             "a GGUF file's Q4_0/Q4_1 tensors keep their own 4-bit quants")

    sp = add("generate", cmd_generate, "continue a text with a language model (streams the continuation)")
    sp.add_argument("text", help="the text to continue")
    add_sampling(sp)

    sp = add("chat", cmd_chat, "chat with a language model: one answer to MESSAGE, or an interactive session")
    sp.add_argument("message", nargs="?", default=None, help="answer this once; without it, an interactive chat")
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--image", action="append", default=[], help="an image to ask about, with a vision-language "
                    "--model such as LLaVA or Qwen2-VL (repeatable; interactive: they go with the first question, "
                    "and /image PATH attaches more later)")
    sp.add_argument("--video", action="append", default=[], help="a video to ask about, with a Qwen2-VL or "
                    "Qwen2.5-VL --model (repeatable; interactive: /video PATH attaches more later)")
    sp.add_argument("--fps", type=float, default=None, help="sample --video at this many frames per second "
                    "(default: the processor's, 2)")
    sp.add_argument("--draw", default=None, metavar="OUT.png", help="draw the boxes and points of the answer on "
                    "the first --image and save it there (with --json: the regions in its pixels too)")
    add_sampling(sp)

    sp = add("generate-image", cmd_generate_image, "make images from a text prompt with a Stable Diffusion pipeline "
             "folder (SD 1.x/2.x, SDXL, SD3)")
    sp.add_argument("prompt", help="what the image shows")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.png",
                    help="where the image goes (several: OUT-1.png, OUT-2.png, ...)")
    sp.add_argument("--model", default=None, help="a diffusers pipeline folder (model_index.json) or its hub id "
                    "(default: polymodal's tiny ShapesWorld model, `train ldm-shapes`, trained and cached on first "
                    "use; it draws 32-px shapes for prompts like 'a red circle')")
    sp.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 20 for the default model)")
    sp.add_argument("--seed", type=int, default=None, help="seed of the initial noise (default: a random one, "
                    "printed)")
    sp.add_argument("--scheduler", default=None, help="the sampler: euler, euler_ancestral (euler-a), dpmsolver++ "
                    "(dpm++), ddim, ddpm, pndm (plms), flow_match_euler (default: the folder's)")
    sp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                    "pipeline's, 7.5 for SD 1.x, 5 for the default model; <= 1: none)")
    sp.add_argument("--negative", default=None, help="a negative prompt: what the image should not show")
    sp.add_argument("--size", default=None, metavar="WxH", help="width x height in pixels, multiples of the VAE "
                    "factor (default: the model's training size)")
    sp.add_argument("-n", type=int, default=1, help="how many images")
    sp.add_argument("--quiet", action="store_true", help="no progress bar on stderr")

    add("models", cmd_models, "list the models that run here offline, then every family's presets and hub ids")

    sp = add("demo", cmd_demo, "run the offline demo and write DIR/report.html")
    sp.add_argument("--out", default="polymodal-demo", help="output directory")

    sp = add("train", cmd_train, "train a recipe (single process, or each process under torchrun)")
    from polymodal.train.recipes import RECIPES

    width = max(map(len, RECIPES))
    sp.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the recipe list one line per recipe
    sp.epilog = "recipes:\n" + "\n".join(f"  {n:<{width}}  {r.description}" for n, r in RECIPES.items()) + \
        "\n\nCtrl-C (SIGINT) or SIGTERM saves a checkpoint at the end of the current step; --resume continues."
    sp.add_argument("recipe", help="recipe name (listed below)")
    sp.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, results.json")
    sp.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    sp = add("transcribe", cmd_transcribe, "speech to text with Whisper (WAV, or what PyAV decodes; long audio in "
             "30-s windows)")
    sp.add_argument("audio", nargs="+", help="audio file(s)")
    sp.add_argument("--model", default=None, help="a Whisper directory (transformers' layout or CTranslate2's "
                    "model.bin) or hub id (default: the packaged tiny.en)")
    sp.add_argument("--language", default=None, help='spoken language of a multilingual model, e.g. "en" '
                    "(default: detected)")
    sp.add_argument("--task", default=None, choices=("transcribe", "translate"),
                    help="translate: into English (multilingual models)")
    sp.add_argument("--max-new-tokens", type=int, default=None, help="per 30-s window (default: as many as fit)")
    sp.add_argument("--timestamps", action="store_true", help="segments with their times (--json: \"chunks\")")

    sp = add("speak", cmd_speak, "text to speech: a WAV file spoken by the packaged Piper voice (or espeak-ng)")
    sp.add_argument("text", help='what to say ("-": read it from stdin)')
    sp.add_argument("-o", "--out", required=True, help="the WAV file to write (16-bit mono at the voice's rate)")
    sp.add_argument("--voice", default=None, help="joe (the packaged Piper voice), piper:<voice.onnx>, espeak or "
                    "espeak:<voice> (default: joe when piper is installed, else espeak)")
    sp.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0 (default 1.0)")

    def add_voice(sp):  # the spoken-dialogue cascade's models (talk, serve --realtime)
        sp.add_argument("--voice", default=None, help="joe (the packaged Piper voice), piper:<voice.onnx>, espeak or "
                        "espeak:<voice> (default: joe when piper is installed, else espeak)")
        sp.add_argument("--asr-model", default=None, metavar="WHISPER", help="the speech recognition model: a Whisper "
                        "directory or hub id (default: the packaged Whisper tiny.en)")

    sp = add("talk", cmd_talk, "spoken dialogue: a spoken question answered aloud (Whisper, a chat model, a voice)")
    sp.add_argument("--in", dest="input", default=None, metavar="QUESTION.wav", help="the spoken question (live "
                    "microphone mode needs sound devices)")
    sp.add_argument("--out", default=None, metavar="ANSWER.wav", help="where the spoken answer goes (16-bit WAV)")
    sp.add_argument("--model", default=None, help="the chat model (default: the embedded SmolLM2-135M-Instruct)")
    add_voice(sp)
    sp.add_argument("--max-new-tokens", type=int, default=96, help="the longest answer, in tokens")
    sp.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on the shared 2-core machine "
                    "the cascade answered sooner with 1 than with 2, docs/dialogue.md)")
    sp.add_argument("--live", action="store_true", help="play the recording into the turn-taking loop at the pace "
                    "of real time, as a microphone would (Whisper starts in the pause), and the answer out as a "
                    "speaker would: the latencies are a live conversation's (takes as long as both last)")
    sp.add_argument("--cold", action="store_true", help="no warm-up run of the models before the question is "
                    "answered (the latencies then include the first calls' costs)")

    sp = add("serve", cmd_serve, "serve models over an OpenAI-compatible HTTP API (docs/serving.md)")
    sp.add_argument("--model", action="append", default=[], metavar="SPEC",
                    help="SOURCE or NAME=SOURCE: a checkpoint directory (a language model, a vision-language model "
                    "such as LLaVA, which then takes image_url parts, CLIP, or a diffusers pipeline folder, which "
                    "serves /v1/images/generations), .gguf file, hub id, or openai:/"
                    "anthropic:/gemini: model (repeatable; default: the embedded SmolLM2-135M-Instruct)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: "
                    "$POLYMODAL_API_KEY; none: an open server)")
    sp.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser calls from this origin (repeatable)")
    sp.add_argument("--quantize", choices=("int8", "int4"), default=None,
                    help="load the local language models with weight-only quantized linear layers for fast CPU "
                    "decoding (docs/quantization.md)")
    sp.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model")
    sp.add_argument("--max-queue", type=int, default=32, help="requests waiting per model before 429")
    sp.add_argument("--max-body-mib", type=int, default=None, help="largest request body in MiB (default 32)")
    sp.add_argument("--disable", action="append", default=[], choices=("image", "video", "audio"),
                    help="refuse this kind of media for every model (repeatable)")
    sp.add_argument("--max-visual-tokens", type=int, default=None, metavar="N",
                    help="the most tokens one request's images and videos may become (default: the context)")
    sp.add_argument("--max-video-frames", type=int, default=None, metavar="N",
                    help="frames decoded per video at the most (default 64)")
    sp.add_argument("--max-video-seconds", type=float, default=None, metavar="S",
                    help="the longest video taken (default 120)")
    sp.add_argument("--video-fps", type=float, default=None, metavar="FPS",
                    help="the rate videos are sampled at (default 2)")
    sp.add_argument("--allow-remote-media", action="store_true",
                    help="fetch http(s) media URLs from the --allowed-domain hosts")
    sp.add_argument("--allowed-domain", action="append", default=[], metavar="DOMAIN",
                    help="fetch media from this domain and its subdomains only (repeatable)")
    sp.add_argument("--media-root", default=None, metavar="DIR", help="serve file:// media from inside DIR")
    sp.add_argument("--realtime", action="store_true", help="switch on WS /v1/realtime, spoken conversation "
                    "(Whisper, the chat model, a voice; the web UI's Talk button): docs/dialogue.md")
    sp.add_argument("--realtime-model", default=None, metavar="NAME", help="the served chat model the conversations "
                    "talk through (default: the first served chat model, else the embedded SmolLM2)")
    sp.add_argument("--realtime-max-tokens", type=int, default=96, help="the longest spoken answer, in tokens")
    add_voice(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except SystemExit as e:
        if not _distributed_worker():
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what SystemExit("message") prints on its own way out
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if _distributed_worker():  # a torchrun worker ends without interpreter shutdown (see end_process)
        from polymodal.train.distributed import end_process

        end_process(code)
    return code


def _distributed_worker() -> bool:
    module = sys.modules.get("polymodal.train.distributed")  # only imported when a command trained
    return module is not None and module.joined()


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        model = getattr(args, "model", None)
        for spec in model if isinstance(model, list) else [model]:  # a list: serve's specs, NAME=SOURCE
            _check_model_path(spec.split("=", 1)[-1] if spec and isinstance(model, list) else spec,
                              hosted=isinstance(model, list))
        args.fn(args)
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad input; CheckpointError and ImageError are ValueErrors
        print(f"error: {_first_line(e)}", file=sys.stderr)
    except Exception as e:  # a bug of ours: still one line; POLYMODAL_DEBUG=1 shows the traceback
        if os.environ.get("POLYMODAL_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {_first_line(e)} (set POLYMODAL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
    return 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
