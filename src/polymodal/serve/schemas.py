"""Request bodies of the OpenAI routes, as pydantic models: what a field may hold, checked before any work.

Field names and meanings follow OpenAI's API reference (chat completions, embeddings, images). Fields OpenAI
defines that we do not act on are accepted and ignored (`extra="allow"`), except those whose silent omission
would change the answer (`n` > 1, tools): the routes refuse those by name."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

_MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
_MAX_TOP_K = 2**31 - 1  # torch's topk takes a C int; any k above the vocabulary keeps every token
# A penalty divides (or multiplies) a seen token's logit: within [0.01, 10] float32 logits stay finite (a penalty of
# 1e-300 would turn them into inf, and a sampled softmax into NaN). Useful penalties lie in 1.0 .. 1.5.
REPETITION_PENALTY_RANGE = (0.01, 10.0)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ content parts
class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class AudioData(_Strict):
    data: StrictStr  # base64
    format: StrictStr


class VideoURL(_Strict):
    url: StrictStr


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: AudioData


class VideoPart(_Strict):
    type: Literal["video_url"]  # our extension
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]

# the modality each part carries (what a served model must accept)
PART_MODALITY = {"text": "text", "image_url": "image", "input_audio": "audio", "video_url": "video"}


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Body):
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    # extensions for local models, as transformers' generate names them (vLLM takes them too)
    top_k: StrictInt | None = Field(None, ge=0, le=_MAX_TOP_K)
    repetition_penalty: StrictFloat | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                                   allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, le=_MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    tools: list | None = None
    tool_choice: object | None = None


# ------------------------------------------------------------------------------------------------ embeddings
class ImageInput(_Strict):
    """Our extension of /v1/embeddings: an image among the inputs gets the image embedding."""

    type: Literal["image_url"]
    image_url: ImageURL


class EmbeddingRequest(_Body):
    model: StrictStr
    input: StrictStr | list[StrictStr | ImageInput] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None


# ------------------------------------------------------------------------------------------------ images
class ImageGenerationRequest(_Body):
    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt | None = Field(None, ge=1, le=10)
    size: StrictStr | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: Literal["url", "b64_json"] | None = None  # url: refused by name (no files are kept)
    output_format: Literal["png"] | None = None
    stream: StrictBool = False  # server-sent events: the steps' progress, then the images
    # extensions for local diffusion models (diffusers' names; steps as the CLI's --steps)
    negative_prompt: StrictStr | None = None
    steps: StrictInt | None = Field(None, ge=1, le=1000)
    guidance_scale: StrictFloat | StrictInt | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, le=_MAX_SEED)


# ------------------------------------------------------------------------------------------------ grounding
class GroundingRequest(_Strict):
    """Our route /v1/grounding: the boxes and points in a model's answer about an image, in that image's pixels."""

    model: StrictStr
    text: StrictStr = Field(max_length=1_000_000)
    image_size: tuple[Annotated[StrictInt, Field(ge=1, le=1_000_000)], Annotated[StrictInt, Field(ge=1, le=1_000_000)]]
