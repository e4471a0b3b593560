"""Text cut into sentences, so that speech can start with the first one: `split_sentences(text)` for a whole text,
`SentenceBuffer` for text that arrives a few tokens at a time (a chat model's stream).

A sentence ends at `.`, `!`, `?` or `…` (with any closing quotes or brackets) followed by white space, or at a blank
line; not after a common abbreviation ("Mr.", "e.g."), a single capital ("J. Austen") or inside a number ("3.14").
A sentence longer than `max_chars` is cut at its last comma, semicolon or colon before the limit, else at its last
space, so that no single piece keeps the voice waiting long.
"""

from __future__ import annotations

import re

MAX_SENTENCE_CHARS = 300

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e a.m p.m no fig cf approx dept est inc ltd co jan feb mar apr jun "
    "jul aug sep sept oct nov dec".split())
# an end mark (with closing quotes / brackets) and then white space; or a paragraph break
_END = re.compile(r"([.!?…]+[\"'”’)\]]*)(\s+)|\n\s*\n")


def _ends_sentence(text: str, mark_start: int, mark: str) -> bool:
    if mark[0] != ".":
        return True
    word = re.search(r"(\S+)$", text[:mark_start])
    if word is None:
        return True
    w = word.group(1).lower().lstrip("\"'“‘([")
    if w in _ABBREVIATIONS or w.rstrip(".") in _ABBREVIATIONS:
        return False
    return not (len(w) == 1 and w.isalpha() and word.group(1)[-1].isupper())  # an initial: "J. Austen"


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    out = []
    while len(sentence) > max_chars:
        head = sentence[:max_chars]
        cut = max(head.rfind(", "), head.rfind("; "), head.rfind(": "))
        cut = cut + 1 if cut > max_chars // 3 else head.rfind(" ")
        if cut <= 0:
            cut = max_chars
        out.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return [*out, sentence] if sentence else out


def _complete(text: str) -> tuple[list[str], str]:
    """-> (the whole sentences at the start of `text`, the rest, which may still grow)."""
    done, start = [], 0
    for m in _END.finditer(text):
        if m.group(1) is not None and not _ends_sentence(text, m.start(1), m.group(1)):
            continue
        end = m.end(1) if m.group(1) is not None else m.start()
        piece = text[start:end].strip()
        if piece:
            done.append(piece)
        start = m.end()
    return done, text[start:]


def split_sentences(text: str, *, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """A whole text -> its sentences, in order, white space trimmed (none for blank text)."""
    done, rest = _complete(text)
    if rest.strip():
        done.append(rest.strip())
    return [piece for s in done for piece in _cut_long(" ".join(s.split()), max_chars)]


class SentenceBuffer:
    """Text fed in pieces -> sentences as soon as they are complete.

        buffer = SentenceBuffer()
        for delta in chat.stream(messages):
            for sentence in buffer.feed(delta):
                speak(sentence)
        for sentence in buffer.flush():
            speak(sentence)
    """

    def __init__(self, *, max_chars: int = MAX_SENTENCE_CHARS):
        self.max_chars, self.text = max_chars, ""

    def feed(self, delta: str) -> list[str]:
        self.text += delta
        done, self.text = _complete(self.text)
        out = [piece for s in done for piece in _cut_long(" ".join(s.split()), self.max_chars)]
        if len(self.text) > 2 * self.max_chars:  # a run-on without an end mark: speak its first part now
            *ready, self.text = _cut_long(self.text, self.max_chars)
            out += ready
        return out

    def flush(self) -> list[str]:
        """The text left at the end of the stream, as sentences."""
        rest, self.text = self.text, ""
        return split_sentences(rest, max_chars=self.max_chars)
