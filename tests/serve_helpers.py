"""What the serving tests share: a tiny random chat Llama saved by transformers, a real uvicorn server on a
free loopback port, and `polymodal serve` run as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_tiny_chat_llama(directory: Path, corpus: list[str]) -> Path:
    """A tiny random LlamaForCausalLM with a byte-level BPE tokenizer trained on `corpus` and a ChatML template,
    both saved by transformers into `directory`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=tok.token_to_id("<|im_end|>"),
                                   pad_token_id=0, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


@contextmanager
def running(app):
    """A real uvicorn server for `app` in a background thread on a free loopback port -> its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


# A LLaVA-1.5-style template (USER: / ASSISTANT: turns, each image part as one <image> line before the turn's text)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAVA_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches, [CLS] dropped


@contextmanager
def serve_subprocess(log_dir: Path, *args: str, env: dict | None = None, timeout: float = 120):
    """`polymodal serve ARGS` on a free loopback port, started as a newcomer would start it (no API key), until it
    answers /health -> its base URL; stopped afterwards. Its log is `log_dir/server.log` (shown if it dies)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(log_dir) / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "polymodal.cli", "serve", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "POLYMODAL_API_KEY": "", **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def save_tiny_llava(directory: Path, corpus: list[str], template: str = LLAVA_TEMPLATE) -> Path:
    """A tiny random LlavaForConditionalGeneration (CLIP tower at 32 px with 8 px patches: 16 features per image,
    a 2-layer Llama) with a byte-level BPE tokenizer holding `<image>`, a CLIP image processor and a chat template,
    all saved by transformers (its LlavaProcessor) into `directory`. The weights are drawn wider than
    transformers' init, which makes a model this small repeat one token."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                                            vision_feature_select_strategy="default", chat_template=template,
                                            image_token="<image>", num_additional_image_tokens=1)
    processor.save_pretrained(directory)
    fast.chat_template = template
    fast.save_pretrained(directory)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0),
        image_token_index=tok.token_to_id("<image>"), image_seq_length=LLAVA_IMAGE_TOKENS)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 1.0)
            elif p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    model.save_pretrained(directory)
    return directory


def greedy_vlm_answer(model, processor, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
    """What `polymodal.generation.generate` answers alone, greedily, for OpenAI chat `messages` whose images are
    data: URLs: the tokens before the end token, decoded, and the prompt's length once its images are expanded."""
    import base64

    from polymodal.generation import generate
    from polymodal.processing.image import open_image

    def image(url: str):
        return open_image(base64.b64decode(url.split(",", 1)[1]))

    canonical = []
    for msg in messages:
        parts = msg["content"] if isinstance(msg["content"], list) else [{"type": "text", "text": msg["content"]}]
        canonical.append({"role": msg["role"], "content": [
            p if p["type"] == "text" else {"type": "image", "image": image(p["image_url"]["url"])} for p in parts]})
    inputs = processor(canonical)
    ids = inputs["input_ids"]
    extras = {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {}
    tokens = generate(model, ids, max_new_tokens=max_new_tokens, **extras)[0, ids.shape[1]:].tolist()
    eos = set(processor.tokenizer.eos_token_ids)
    if any(t in eos for t in tokens):
        tokens = tokens[: next(i for i, t in enumerate(tokens) if t in eos)]
    return processor.tokenizer.decode(tokens), ids.shape[1]


def save_tiny_sd(directory: Path):
    """A tiny random StableDiffusionPipeline (VAE factor 2, 16 px images by default; Euler) on the real CLIP
    vocabulary (open_clip's BPE file), built and saved by diffusers into `directory` -> diffusers' pipeline."""
    import gzip
    import json

    import diffusers
    import open_clip
    import torch
    import transformers

    from polymodal.processing.tokenizer import NUM_MERGES, bytes_to_unicode

    def jitter(module, seed: int):  # random weights everywhere, norm affines included (their init is the identity)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return module.eval()

    tok_dir = Path(f"{directory}-bpe")  # beside the folder: the tokenizer's source files, before diffusers saves it
    tok_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    torch.manual_seed(0)
    text = jitter(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77)), 2)
    vae = jitter(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16), 1)
    unet = jitter(diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2), 3)
    ref = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(directory)
    return ref
