"""pm.pipeline("image-text-to-text") on a tiny LLaVA saved by transformers with the tokenizer and processor files
of tests/test_llava_processor.py: the greedy answer equals transformers' generate on LlavaProcessor's output token
for token; a batch of two conversations with different images equals each alone; streaming, written-out prompts,
the family's processor found through its Family record, and the refusals of models that take no images."""

import pytest
import torch
from test_llava_processor import PHOTOS, ask, save_processor

import polymodal as pm
from polymodal.pipelines import ImageTextToTextPipeline, TextGenerationPipeline, chat_pipeline
from polymodal.pipelines.text import consume
from polymodal.processing import LlavaProcessor
from polymodal.registry import family

transformers = pytest.importorskip("transformers")
PATCH = 28  # (336 / 28)^2 = 144 features per image: a 336-px tower that runs in milliseconds
NEW = 12


def save_tiny_llava(path):
    """A tiny random LlavaForConditionalGeneration and transformers' LlavaProcessor files in `path` -> (model,
    processor), both transformers'."""
    processor = save_processor(path, patch_size=PATCH)
    tok = processor.tokenizer
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=336, patch_size=PATCH),
        text_config=transformers.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=processor.image_token_id, image_seq_length=(336 // PATCH) ** 2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' N(0, 0.02) init makes a tiny model repeat one token: draw wider weights
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    return model, processor


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-chat")
    model, processor = save_tiny_llava(path)
    return model, processor, path


@pytest.fixture(scope="module")
def pipe(llava):
    return pm.pipeline("image-text-to-text", model=llava[2])


def reference(llava, conversations) -> tuple[list[list[int]], list[str]]:
    """transformers' greedy tokens after the prompt (cut after eos) and their text, per conversation."""
    model, processor, _ = llava
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True, "padding_side": "left"})
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    texts = [processor.tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True) for r in rows]
    return rows, texts


CAT = [ask("What is shown in this image?", PHOTOS["chelsea"])]
ROCKET = [ask("Describe the photo.", PHOTOS["astronaut"]),
          {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
          ask("And where is the rocket going?", PHOTOS["rocket"])]


def test_greedy_answer_equals_transformers_token_for_token(llava, pipe):
    (want_ids,), (want_text,) = reference(llava, [CAT])
    assert len(set(want_ids)) > 3  # the weights make it say something, not one token over and over
    # the processor's inputs, through the model's own generate, give transformers' tokens
    inputs = pipe.processor(CAT)
    got = pipe.model.generate(**inputs, max_new_tokens=NEW, eos_token_id=[pipe.tokenizer.eos_token_id])
    assert got[0, inputs["input_ids"].shape[1]:].tolist() == want_ids
    # and the pipeline answers with their text
    (out,) = pipe(CAT, max_new_tokens=NEW)
    assert out["generated_text"] == [*CAT, {"role": "assistant", "content": want_text}]
    assert out["finish_reason"] == ("stop" if len(want_ids) < NEW else "length")


def test_batch_of_two_conversations_equals_each_alone(llava, pipe):
    want_ids, want_texts = reference(llava, [CAT, ROCKET])
    batch = pipe([CAT, ROCKET], max_new_tokens=NEW)
    alone = [pipe(CAT, max_new_tokens=NEW), pipe(ROCKET, max_new_tokens=NEW)]
    assert [b[0]["generated_text"][-1]["content"] for b in batch] == want_texts
    assert batch == alone
    assert want_texts[0] != want_texts[1]  # different images, different answers


def test_stream_gives_the_same_answer(pipe):
    (out,) = pipe(ROCKET, max_new_tokens=NEW)
    pieces = []
    result = consume(pipe.stream(ROCKET, max_new_tokens=NEW), pieces.append)
    assert "".join(pieces) == result.text == out["generated_text"][-1]["content"]
    assert result.finish_reason == out["finish_reason"]
    assert result.prompt_tokens == int(pipe.processor(ROCKET)["attention_mask"].sum())  # 2 x 144 image tokens in


def test_written_out_prompt_and_text_keyword(pipe):
    prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    template_input = [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "What is shown in this image?"}]}]
    assert pipe.tokenizer.apply_chat_template(template_input) == prompt  # the template writes this very prompt
    (chat,) = pipe(CAT, max_new_tokens=NEW)
    answer = chat["generated_text"][-1]["content"]
    (raw,) = pipe(text=prompt, images=PHOTOS["chelsea"], max_new_tokens=NEW)
    assert raw["generated_text"] == prompt + answer
    assert pipe(PHOTOS["chelsea"], text=prompt, max_new_tokens=NEW) == [raw]  # transformers' positional images
    assert pipe(text=CAT, max_new_tokens=NEW) == [chat]  # transformers' text= messages
    two = pipe(text=[prompt, "USER: <image>\nDescribe the photo. ASSISTANT:"],
               images=[PHOTOS["chelsea"], PHOTOS["astronaut"]], max_new_tokens=NEW)
    assert two[0] == [raw]
    with pytest.raises(ValueError, match=r"has 2 image\(s\) but its prompt has 1 <image>"):
        pipe(text=prompt, images=[PHOTOS["chelsea"], PHOTOS["coffee"]])


def test_the_family_record_owns_the_processor(llava, pipe):
    assert family("llava").processor is not None and family("llama").processor is None
    assert isinstance(pipe.processor, LlavaProcessor) and pipe.tokenizer is pipe.processor.tokenizer
    assert pipe.processor.image_tokens == pipe.model.config.image_tokens == 144
    assert pipe.processor.context_length == 1024
    assert isinstance(chat_pipeline(llava[2]), ImageTextToTextPipeline)


def test_processor_that_disagrees_with_the_model(llava, tmp_path):
    other = LlavaProcessor.from_pretrained(llava[2])
    other.image_tokens = 576  # a processor for a 14-px patch tower
    with pytest.raises(ValueError, match="expands each image to 576 tokens, but this model gives 144"):
        pm.pipeline("image-text-to-text", model=llava[2], processor=other)


def test_prompt_over_the_context(pipe):
    many = [ask("Compare them all.", *[PHOTOS["coffee"]] * 8)]  # 8 x 144 image tokens > 1024 positions
    with pytest.raises(ValueError, match="over the model's context of 1,024"):
        pipe(many, max_new_tokens=2)


def save_tiny_llama(path):
    """A tiny text-only LLaMA with tokenizer files and a chat template, saved by transformers."""
    from test_llava_processor import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama-chat"))


def test_models_that_take_no_images(text_only, clip_dir):
    with pytest.raises(ValueError, match="is a llama model, not a vision-language model"):
        pm.pipeline("image-text-to-text", model=text_only)
    with pytest.raises(ValueError, match="is a clip model, not a vision-language model"):
        pm.pipeline("image-text-to-text", model=clip_dir)
    text = pm.pipeline("text-generation", model=text_only)
    with pytest.raises(ValueError, match="is a llama model, which takes no images"):
        text([ask("What is it?", PHOTOS["coffee"])], max_new_tokens=2)
    assert isinstance(chat_pipeline(text_only), TextGenerationPipeline)
    with pytest.raises(ValueError, match="is a llama model, which takes no images"):
        chat_pipeline(text_only, images=True)
    with pytest.raises(ValueError, match="the default chat model.*takes no images"):
        chat_pipeline(None, images=True)
