"""Spoken dialogue: the cascade speech in -> Whisper -> a chat model -> a voice -> speech out, streaming at each
joint, and turn-taking over a live or simulated input stream with Silero VAD (end of turn, barge-in).

    the user's turn (16-kHz samples)
      -> ASR (Whisper, `pm.pipeline("automatic-speech-recognition")`)                    -> the transcript
      -> the chat model's `stream(history + transcript)` in a thread of its own          -> text pieces
      -> SentenceBuffer                                                                   -> whole sentences (a queue)
      -> the voice (`pm.pipeline("text-to-speech")`), one sentence at a time, as soon as it is complete
      -> each sentence's audio (int16 at the voice's rate), while the chat model keeps generating the next ones

`Cascade.reply(samples)` is one turn: a `Reply`, an iterator of each spoken sentence's audio. `reply.cancel()`
stops the generation at its next token and the voice before its next sentence. `reply.latency` holds, in seconds
after the end of the user's speech, when each stage was done: "vad" (the end of turn was decided), "asr",
"first_token", "first_sentence", "first_audio". The cascade keeps the conversation (`history`, chat messages):
each turn adds the user's transcript and the sentences of the answer that were spoken.

`Dialogue` does the turn-taking over an input stream: `dialogue.feed(samples)` takes 16-kHz input (a microphone's,
or a simulated one) and returns the output audio for the same stretch of time, 32 ms (one VAD window) of output per
512 input samples:

    listening --(VAD: speech, then `min_silence_ms` of silence)--> end of turn: Cascade.reply in a thread
    speaking  --(the answer's audio, played window by window)------> listening again when it has all been played
    speaking  --(VAD: speech from the user)--> barge-in: the output is silent from the next window on, the reply is
                                              cancelled (generation and voice), and the user's new turn begins

Each window's output is decided before that window's input is heard, as on a full-duplex sound card, so a barge-in
detected in window k silences window k+1. `realtime=False` (simulated time) treats the cascade's compute as
instantaneous: output waits for the answer's audio, so a run is deterministic however slow the machine is.
`realtime=True` never waits: output is silence until the audio is ready (what a live loop needs; on a shared machine
with one torch thread: with two, a VAD window took up to 100 ms of its 32 while the models ran). There is no echo
cancellation: the input is assumed not to carry the output (headphones, or a test that mixes only the user's
speech into the input).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from polymodal.speech.sentences import SentenceBuffer

SAMPLING_RATE = 16000  # what Whisper and Silero VAD hear
MAX_TURN_SECONDS = 120.0  # the longest recording `polymodal talk` takes as one question (its transcript must fit the
# chat model's context, and a reply should not wait on minutes of transcription)
STAGES = ("vad", "asr", "first_token", "first_sentence", "first_audio")
DEFAULT_SYSTEM = ("You are a helpful voice assistant. Your answers are spoken aloud, so answer in one to three "
                  "short sentences of plain words, with no lists and no markdown.")
_DONE = object()  # the end of a queue's items
# The first piece of an answer is spoken as soon as its first clause is complete: a comma, semicolon or colon and
# white space after at least FIRST_CLAUSE_CHARS characters (not "1,000"). The voice then starts ~1 s earlier on a
# long first sentence ("The sky appears to be a deep shade of blue, but ..."), and the rest is made while it plays.
FIRST_CLAUSE_CHARS = 24
_FIRST_CLAUSE = re.compile(rf"(.{{{FIRST_CLAUSE_CHARS},}}?[,;:])\s+", re.S)


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


class Reply:
    """One turn's answer while it is produced. Iterating it runs the cascade and yields each spoken sentence as
    {"text": sentence, "audio": int16 samples, "sampling_rate": Hz} (the voice's pause before every sentence after
    the first). `transcript`: what the user said; `text`: what the chat model generated so far; `sentences`: those
    handed to the voice; `latency`: STAGES -> seconds after the end of the user's speech (None: not reached)."""

    def __init__(self, cascade: Cascade, samples: np.ndarray, *, heard_for: float = 0.0,
                 transcription: Transcription | None = None):
        self.cascade, self.samples, self._ahead = cascade, samples, transcription
        self._origin = time.perf_counter() - heard_for  # when the user's speech ended, on this process's clock
        self.latency: dict[str, float | None] = dict.fromkeys(STAGES)
        self.latency["vad"] = heard_for
        self.transcript, self.text, self.sentences = "", "", []
        self.pieces = 0  # text pieces received from the chat model
        self.finish_reason: str | None = None  # the chat model's: "stop", "length"; None: cancelled or not done
        self.played: int | None = None  # how many sentences were heard, when cancelled (None: every one handed out)
        self._cancel = threading.Event()
        self._sentences: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ state
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def spoken(self) -> str:
        """The answer as the user heard it: the sentences played (all handed out, unless cancelled)."""
        return " ".join(self.sentences if self.played is None else self.sentences[: self.played])

    def cancel(self, played: int | None = None) -> None:
        """Stop: the chat model at its next token, the voice before its next sentence. played: how many of the
        handed-out sentences the user heard (the history keeps those)."""
        if played is not None and self.played is None:
            self.played = played
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the chat model's thread to end -> whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _mark(self, stage: str) -> None:
        if self.latency[stage] is None:
            self.latency[stage] = time.perf_counter() - self._origin

    # ------------------------------------------------------------------ the cascade
    def __iter__(self) -> Iterator[dict]:
        return self._run()

    def _run(self) -> Iterator[dict]:
        tts, completed = self.cascade.tts, False
        try:
            ahead = self._ahead
            self.transcript = ahead.result() if ahead is not None else self.cascade.transcribe(self.samples)
            self._mark("asr")
            if self.cancelled or not _has_words(self.transcript):
                completed = True
                return
            messages = [*self.cascade.history, {"role": "user", "content": self.transcript}]
            self._thread = threading.Thread(target=self._generate, args=(messages,), daemon=True,
                                            name="polymodal-dialogue-llm")
            self._thread.start()
            gap = np.zeros(round(getattr(tts, "pause", 0.0) * tts.sampling_rate), np.int16)
            while not self.cancelled:
                item = self._sentences.get()
                if item is _DONE:
                    completed = True
                    break
                if isinstance(item, BaseException):
                    raise item
                if not _has_words(item):  # "..." or an emoji alone: nothing to say
                    continue
                audio = np.concatenate([p["audio"] for p in tts.stream(item)] or [np.zeros(0, np.int16)])
                if self.cancelled:  # a barge-in while it was being synthesized: not spoken
                    break
                self._mark("first_audio")
                self.sentences.append(item)
                yield {"text": item, "audio": np.concatenate([gap, audio]) if len(self.sentences) > 1 else audio,
                       "sampling_rate": tts.sampling_rate}
        except BaseException as e:
            self.error = e
            raise
        finally:
            if not completed:  # the consumer stopped early or it failed: the generation stops too
                self._cancel.set()
            self.wait()
            self.cascade.remember(self)

    def _generate(self, messages: list[dict]) -> None:
        """The chat model's thread: text pieces -> sentences on the queue, as soon as each is complete."""
        buffer, stream = SentenceBuffer(), None
        try:
            stream = self.cascade.chat.stream(messages, **self.cascade.generation)
            while True:
                try:
                    piece = next(stream)
                except StopIteration as done:
                    self.finish_reason = getattr(done.value, "finish_reason", None)
                    for sentence in buffer.flush():
                        self._mark("first_sentence")
                        self._sentences.put(sentence)
                    break
                self._mark("first_token")
                self.text += piece
                self.pieces += 1
                if self.cancelled:
                    break
                ready = buffer.feed(piece)
                if not ready and self.latency["first_sentence"] is None:
                    ready = _first_clause(buffer)
                for sentence in ready:
                    self._mark("first_sentence")
                    self._sentences.put(sentence)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._sentences.put(e)
        finally:
            if stream is not None:
                stream.close()  # the pipeline's worker stops at its next token
            self._sentences.put(_DONE)


class Transcription:
    """A transcription made ahead, in a thread: the dialogue starts one when the user's speech pauses, so that when
    the pause turns out to be the end of the turn the transcript is (nearly) there already."""

    def __init__(self, cascade: Cascade, samples: np.ndarray):
        self._text: str | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cascade, samples), daemon=True,
                                       name="polymodal-dialogue-asr")
        self.thread.start()

    def _run(self, cascade: Cascade, samples: np.ndarray) -> None:
        try:
            self._text = cascade.transcribe(samples)
        except BaseException as e:  # noqa: BLE001 - raised by result()
            self._error = e

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def result(self) -> str:
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._text


def _first_clause(buffer: SentenceBuffer) -> list[str]:
    """The first clause of the text the buffer holds, taken out of it, when it is complete (else none)."""
    m = _FIRST_CLAUSE.match(buffer.text)
    if m is None:
        return []
    buffer.text = buffer.text[m.end() :]
    return [" ".join(m.group(1).split())]


class Cascade:
    """Speech recognition, a chat model and a voice, with the conversation so far.

        cascade = Cascade()                           # packaged Whisper tiny.en, SmolLM2, the Piper voice (or espeak)
        reply = cascade.reply(samples_16k)
        for chunk in reply:                           # each sentence's audio as soon as it is spoken
            play(chunk["audio"], chunk["sampling_rate"])
        reply.transcript, reply.spoken, reply.latency

    asr / chat / tts: pipelines (None: the packaged defaults) or objects with their interface: `asr(samples) ->
    {"text"}`, `chat.stream(messages, **generation)` yielding text pieces, `tts.stream(text)` yielding
    {"audio"} and `tts.sampling_rate`. generation: the chat model's options (max_new_tokens, temperature, ...)."""

    def __init__(self, asr=None, chat=None, tts=None, *, system: str | None = DEFAULT_SYSTEM,
                 max_new_tokens: int = 96, **generation):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
        import polymodal as pm

        self.asr = pm.pipeline("automatic-speech-recognition") if asr is None else asr
        self.chat = pm.pipeline("text-generation") if chat is None else chat
        self.tts = pm.pipeline("text-to-speech") if tts is None else tts
        self.system = system
        self.generation = {"max_new_tokens": max_new_tokens, **generation}
        self.history: list[dict] = []
        self._lock, self._asr_lock = threading.Lock(), threading.Lock()
        self.reset()

    @property
    def sampling_rate(self) -> int:
        """The rate of the audio the replies speak (the voice's)."""
        return int(self.tts.sampling_rate)

    def fork(self) -> Cascade:
        """A new Cascade over the same models and settings, with a conversation of its own: what a server gives each
        connection (the models are loaded once). The forks transcribe one at a time, as one cascade does."""
        other = Cascade(self.asr, self.chat, self.tts, system=self.system, **self.generation)
        other._asr_lock = self._asr_lock
        return other

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        with self._lock:
            self.history = [{"role": "system", "content": self.system}] if self.system else []

    def warm_up(self) -> None:
        """Run each stage once on a small input (half a second of silence heard, one token generated, one word
        spoken), so that the first turn does not pay the first calls' costs (kernel choice and allocations: the
        first chat answer of a process starts ~1 s later than the next ones here). A live assistant does this before
        it listens."""
        self.asr(np.zeros(SAMPLING_RATE // 2, np.float32))
        stream = self.chat.stream([{"role": "user", "content": "Hello!"}], max_new_tokens=1)
        for _ in stream:
            pass
        for _ in self.tts.stream("Hello."):
            pass

    def transcribe(self, samples: np.ndarray) -> str:
        with self._asr_lock:  # one at a time: a transcription made ahead may still run when the turn ends
            return self.asr(samples)["text"].strip()

    def reply(self, samples, *, heard_for: float = 0.0, transcription: Transcription | None = None) -> Reply:
        """The answer to one user turn (16-kHz float samples), to iterate. heard_for: seconds between the end of
        the user's speech and now (the VAD's wait for silence), counted in the latencies; transcription: the turn's
        transcript made ahead (`transcribe_ahead`), used instead of transcribing `samples`."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"a turn is one channel of 16-kHz samples (a non-empty 1-D array), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the turn's audio holds NaN or infinite samples")
        return Reply(self, x, heard_for=heard_for, transcription=transcription)

    def transcribe_ahead(self, samples: np.ndarray) -> Transcription:
        """Start transcribing `samples` in a thread."""
        return Transcription(self, np.asarray(samples, dtype=np.float32))

    def remember(self, reply: Reply) -> None:
        """A finished (or cancelled) turn into the history: the user's words, then what of the answer was heard."""
        if not _has_words(reply.transcript):
            return
        with self._lock:
            self.history.append({"role": "user", "content": reply.transcript})
            if reply.spoken:
                self.history.append({"role": "assistant", "content": reply.spoken})


def live_audio_problem() -> str:
    """Why a live conversation (microphone in, speaker out) cannot run here."""
    import importlib.util
    import os

    if not os.path.exists("/dev/snd") or not os.listdir("/dev/snd"):
        return "live conversation needs a microphone and a speaker, and this machine has no sound devices (/dev/snd)"
    if importlib.util.find_spec("sounddevice") is None:
        return "live conversation needs the sounddevice package (pip install sounddevice)"
    return "live microphone mode is not built yet (Dialogue.feed takes a microphone's blocks: docs/dialogue.md)"


def find_turn(samples, *, min_silence_ms: float = 500, preroll_s: float = 0.3, detector=None
              ) -> tuple[np.ndarray, float]:
    """A recording of one turn -> (its speech: from the VAD's first start of speech, less `preroll_s`, to its last
    end; the seconds a live VAD would take to decide that the turn is over). The recording is taken as followed by
    silence, as a microphone hears after a question; the decision time is that silence's `min_silence_ms` (and
    Silero's window) as heard in real time, plus the model's compute for the deciding window. ValueError when no
    speech is heard."""
    from polymodal.pipelines.vad import SpeechDetector

    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"a turn is one channel of 16-kHz samples (a non-empty 1-D array), got shape {x.shape}")
    vad = detector if detector is not None else SpeechDetector(min_silence_duration_ms=min_silence_ms)
    vad.reset()
    tail = np.zeros(round((vad.min_silence + 2 * vad.window + vad.pad) / vad.window) * vad.window, np.float32)
    stream = np.concatenate([x, tail])
    start = end = None
    heard_for = 0.0
    for i in range(0, len(stream) - vad.window + 1, vad.window):
        t = time.perf_counter()
        for e in vad.feed(stream[i : i + vad.window]):
            if e.kind == "start":
                start = e.sample if start is None else start
            else:
                end = e.sample
                heard_for = (vad.samples_seen - e.sample) / vad.rate + time.perf_counter() - t
    if start is None:
        raise ValueError("no speech heard in the audio (the voice activity detector found none)")
    end = len(x) if end is None else end
    first = max(0, start - round(preroll_s * vad.rate))
    return x[first : min(len(x), end + vad.window)], heard_for


# ------------------------------------------------------------------------------------------ turn-taking


@dataclass
class DialogueEvent:
    kind: str  # "speech" (the user started), "turn_end", "audio_start", "barge_in", "audio_end", "error"
    time: float  # seconds into the input stream
    detail: str = ""


@dataclass
class Turn:
    """One user turn and its answer; times in seconds into the input stream."""

    start: float  # the user's speech began (the VAD's start, padded)
    end: float  # it ended (the VAD's end, padded)
    decided: float  # the end of turn was decided (after min_silence_ms of silence)
    reply: Reply = field(repr=False)
    audio_start: float | None = None  # the answer's first output window
    audio_end: float | None = None  # its output stopped (played out, or cut by a barge-in)
    interrupted: bool = False

    @property
    def transcript(self) -> str:
        return self.reply.transcript

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def spoken(self) -> str:
        return self.reply.spoken

    @property
    def latency(self) -> dict[str, float | None]:
        return dict(self.reply.latency)


class _Playback:
    """A reply's audio, produced by a thread of its own (at most one sentence ahead of what is played) and taken
    out window by window."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.queue: queue.Queue = queue.Queue()  # one sentence at most: the voice runs one sentence ahead
        self.taken = threading.Event()
        self.current, self.pos = np.zeros(0, np.int16), 0
        self.started = 0  # sentences whose first sample has been played
        self.done = False  # every sentence has been played
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._produce, daemon=True, name="polymodal-dialogue-voice")
        self.thread.start()

    def _put(self, item) -> bool:
        """Hand a sentence's audio over, then wait until it is taken: the next sentence is synthesized while this
        one plays, not earlier (a barge-in wastes at most that one). -> False when the reply was cancelled."""
        self.taken.clear()
        self.queue.put(item)  # (the queue is empty: each item is taken before the next is made)
        while not self.taken.wait(0.05):
            if self.reply.cancelled:
                return False
        return True

    def _produce(self) -> None:
        stream = iter(self.reply)
        try:
            for chunk in stream:
                if not self._put(chunk["audio"]):
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the dialogue as an event
            self.error = e
        finally:
            stream.close()
            self.queue.put(_DONE)

    def take(self, n: int, *, wait: bool) -> tuple[np.ndarray, int]:
        """Up to n samples of the answer (silence after them) -> (n samples, how many were the answer's).
        wait: block until the answer has them or is over (simulated time); else take what is ready."""
        out, have = np.zeros(n, np.int16), 0
        while have < n and not self.done:
            if self.pos >= len(self.current):
                try:
                    item = self.queue.get(timeout=None) if wait else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _DONE:
                    self.done = True
                    break
                self.taken.set()
                self.current, self.pos = item, 0
                self.started += 1
                continue
            k = min(n - have, len(self.current) - self.pos)
            out[have : have + k] = self.current[self.pos : self.pos + k]
            have, self.pos = have + k, self.pos + k
        return out, have

    def stop(self, played: int) -> None:
        self.reply.cancel(played=played)  # the producer, waiting to hand over a sentence, sees it within 50 ms


class Dialogue:
    """Turn-taking over a 16-kHz input stream: `feed(samples) -> output samples` (int16 at `sampling_rate`, the
    voice's rate) for the same stretch of time, one 32-ms VAD window at a time (a partial window waits for the next
    feed). `events` and `turns` record what happened, in seconds of the input stream.

    min_silence_ms: the silence that ends a turn; preroll_s: input kept from before the VAD's start of speech (its
    first word is not cut); max_turn_s: a turn this long ends by itself (bounds the memory kept). speculate: when
    the user's speech has paused for `speculate_after_ms`, start transcribing what was said (in a thread) while the
    VAD waits to see whether the pause ends the turn; if it does, the reply starts from that transcript (the speech
    is the same, less a few windows of silence), else it is dropped."""

    def __init__(self, cascade: Cascade, *, detector=None, realtime: bool = False, min_silence_ms: float = 500,
                 threshold: float = 0.5, preroll_s: float = 0.3, max_turn_s: float = 60.0, speculate: bool = True,
                 speculate_after_ms: float = 100):
        from polymodal.pipelines.vad import SpeechDetector

        if not 0 <= preroll_s <= 5 or not 1 <= max_turn_s <= 600:
            raise ValueError(f"preroll_s must be within [0, 5] and max_turn_s within [1, 600] seconds, got "
                             f"{preroll_s} and {max_turn_s}")
        self.cascade, self.realtime = cascade, realtime
        self.detector = detector if detector is not None else SpeechDetector(
            threshold=threshold, min_silence_duration_ms=min_silence_ms)
        if self.detector.rate != SAMPLING_RATE:
            raise ValueError(f"the dialogue hears 16-kHz audio; this VAD runs at {self.detector.rate} Hz")
        self.window = self.detector.window
        self.sampling_rate = cascade.sampling_rate
        self.preroll, self.max_turn = round(preroll_s * SAMPLING_RATE), round(max_turn_s * SAMPLING_RATE)
        self.events: list[DialogueEvent] = []
        self.turns: list[Turn] = []
        self.heard = 0  # input samples processed: the dialogue's clock
        self._pending = np.zeros(0, np.float32)  # input short of a whole window
        self._kept, self._kept_from = np.zeros(0, np.float32), 0  # recent input, from sample _kept_from on
        self._vad_from = 0  # the detector's sample 0 in the input stream (it is reset after a forced end of turn)
        self._turn_start: int | None = None  # the open user turn's first sample
        self._out_owed = 0.0  # output samples due, with the fraction carried from window to window
        self._playback: _Playback | None = None  # the answer being produced or played
        self._last: _Playback | None = None  # the latest answer, played out or not (its thread may still run)
        self.speculate, self._speculate_after = speculate, round(speculate_after_ms * SAMPLING_RATE / 1000)
        self._ahead: Transcription | None = None  # the open turn's transcription made in its current pause
        self._ahead_running: Transcription | None = None  # the latest one started (it may be stale, still running)

    # ------------------------------------------------------------------ input
    def feed(self, samples) -> np.ndarray:
        x = np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"feed takes one channel of 16-kHz samples (a 1-D array), got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("the audio holds NaN or infinite samples")
        self._pending = np.concatenate([self._pending, x])
        out = []
        while self._pending.size >= self.window:
            window, self._pending = self._pending[: self.window], self._pending[self.window :]
            out.append(self._step(window))
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel the answer being spoken, if any, and wait for its threads."""
        if self._playback is not None:
            self._playback.stop(self._playback.started)
        if self._last is not None:
            self._last.thread.join(timeout)

    @property
    def speaking(self) -> bool:
        """Whether an answer is being produced or played."""
        return self._playback is not None

    def _t(self, sample: int) -> float:
        return sample / SAMPLING_RATE

    def _event(self, kind: str, sample: int, detail: str = "") -> None:
        self.events.append(DialogueEvent(kind, self._t(sample), detail))

    def _step(self, window: np.ndarray) -> np.ndarray:
        out = self._play(self._out_samples(len(window)))  # decided before this window is heard
        self._keep(window)
        events = self.detector.feed(window)
        self.heard += len(window)
        for e in events:
            sample = self._vad_from + e.sample
            if e.kind == "start":
                self._on_speech(sample)
            elif self._turn_start is not None:
                self._on_turn_end(sample)
        if self.speculate and self._turn_start is not None:
            self._transcribe_in_pause()
        if self._turn_start is not None and self.heard - self._turn_start >= self.max_turn:
            self._on_turn_end(self.heard)  # a turn this long ends here; the VAD starts afresh
            self.detector.reset()
            self._vad_from = self.heard
        self._trim()
        return out

    def _transcribe_in_pause(self) -> None:
        d = self.detector
        if not (d.in_speech and d.silence_from):  # speaking: a transcript made in an earlier pause is stale
            self._ahead = None
            return
        paused = d.samples_seen - d.silence_from + self.window  # (silence_from: the end of its first silent window)
        busy = self._ahead_running is not None and self._ahead_running.running
        if self._ahead is None and paused >= self._speculate_after and not busy:
            self._ahead = self._ahead_running = self.cascade.transcribe_ahead(self._turn_audio(self.heard))

    def _turn_audio(self, last: int) -> np.ndarray:
        """The open turn's input, from its preroll to sample `last`."""
        first = max(self._kept_from, self._turn_start - self.preroll)
        return self._kept[first - self._kept_from : min(self.heard, last) - self._kept_from]

    def _out_samples(self, n_in: int) -> int:
        self._out_owed += n_in * self.sampling_rate / SAMPLING_RATE
        n = int(self._out_owed)
        self._out_owed -= n
        return n

    def _keep(self, window: np.ndarray) -> None:
        self._kept = np.concatenate([self._kept, window])

    def _trim(self) -> None:
        """Keep the open turn's input (and its preroll), else only the last preroll."""
        first = self._turn_start if self._turn_start is not None else self.heard
        first = max(self._kept_from, first - self.preroll)
        if first > self._kept_from:
            self._kept = self._kept[first - self._kept_from :]
            self._kept_from = first

    # ------------------------------------------------------------------ output
    def _play(self, n: int) -> np.ndarray:
        p = self._playback
        if p is None:
            return np.zeros(n, np.int16)
        out, have = p.take(n, wait=not self.realtime)
        turn = self.turns[-1]
        if have and turn.audio_start is None:
            turn.audio_start = self._t(self.heard)
            self._event("audio_start", self.heard)
        if p.done:
            self._finish(turn, self.heard + round(have * SAMPLING_RATE / self.sampling_rate))
        return out

    def _finish(self, turn: Turn, sample: int) -> None:
        p, self._playback = self._playback, None
        if p.error is not None:
            self._event("error", sample, f"{type(p.error).__name__}: {p.error}")
        if turn.audio_start is not None:
            turn.audio_end = self._t(sample)
            self._event("audio_end", sample)

    # ------------------------------------------------------------------ turns
    def _on_speech(self, sample: int) -> None:
        if self._playback is not None:  # barge-in: silent from the next window, the reply cancelled
            p, turn = self._playback, self.turns[-1]
            p.stop(played=p.started)
            turn.interrupted = True
            self._event("barge_in", self.heard)
            self._finish(turn, self.heard)
        self._turn_start, self._ahead = sample, None
        self._event("speech", sample)

    def _on_turn_end(self, sample: int) -> None:
        audio = self._turn_audio(sample + self.window)  # with a little of the silence after it
        start, self._turn_start, ahead, self._ahead = self._turn_start, None, self._ahead, None
        self._event("turn_end", self.heard)
        reply = self.cascade.reply(audio, heard_for=self._t(self.heard - sample), transcription=ahead)
        self.turns.append(Turn(self._t(start), self._t(sample), self._t(self.heard), reply))
        if self._last is not None:
            self._last.thread.join()  # the previous answer (cancelled or played) into the history first
        self._playback = self._last = _Playback(reply)


def replay(cascade: Cascade, samples, *, min_silence_ms: float = 500, speculate: bool = True,
           max_answer_s: float = 120.0, until_first_audio: bool = False) -> dict:
    """A recording of one turn played into `Dialogue(realtime=True)` at the pace of real time, as a microphone
    would deliver it (then silence), until its answer has been played -> {"turn": the Turn, "audio": the output from
    the answer's first window to its last (int16 at the voice's rate; empty when there was none), "waited": wall
    seconds from when the end of speech reached the "microphone" to when the first window with audio was ready
    (None: no answer), "lag": the most the feed fell behind real time}. Takes as long as the question and the
    answer last; until_first_audio: stop (and cancel the answer) at its first window of audio."""
    x = np.asarray(samples, dtype=np.float32)
    dialogue = Dialogue(cascade, realtime=True, min_silence_ms=min_silence_ms, speculate=speculate)
    window = dialogue.window
    lead = np.zeros(SAMPLING_RATE // 4, np.float32)  # a quarter second of room before the speech
    stream = np.concatenate([lead, x, np.zeros(window, np.float32)])
    out: list[np.ndarray] = []
    start, lag, waited, i = time.perf_counter(), 0.0, None, 0
    limit = len(stream) + round((max_answer_s + 30) * SAMPLING_RATE)  # 30 s for the cascade to begin
    try:
        while i < limit:
            due = start + i / SAMPLING_RATE
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            lag = max(lag, time.perf_counter() - due)
            piece = stream[i : i + window] if i < len(stream) else np.zeros(window, np.float32)
            out.append(dialogue.feed(piece))
            i += window
            turn = dialogue.turns[0] if dialogue.turns else None
            if turn is not None and waited is None and turn.audio_start is not None:
                waited = time.perf_counter() - (start + turn.end)
                if until_first_audio:
                    break
            if turn is not None and not dialogue.speaking:
                break
            if turn is None and not dialogue.detector.in_speech and i >= len(stream) + 2 * dialogue.preroll:
                break  # the recording is over and no turn began in it
    finally:
        dialogue.close()
    turn = dialogue.turns[0] if dialogue.turns else None
    audio = np.zeros(0, np.int16)
    if turn is not None and turn.audio_start is not None:
        played = np.concatenate(out)
        rate = dialogue.sampling_rate
        audio = played[round(turn.audio_start * rate) : round((turn.audio_end or len(played) / rate) * rate)]
    return {"turn": turn, "audio": audio, "waited": waited, "lag": lag}

