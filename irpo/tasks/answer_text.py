"""Finding the answer in a MATH response's text: boxes, answer sentences, percent words.

Used by :mod:`irpo.tasks.math`; pure string work (linear-time regular expressions and one brace
pass), run in the caller's process on untrusted text, never evaluated.

* :func:`box_spans`: every complete ``\\boxed{...}`` / ``\\fbox{...}`` with its position, so the
  extractor can tell whether a "Final answer" sentence comes after the last box.
* :func:`last_box_run`: the boxes that end the response's last run of boxes joined only by
  connectors (commas, "and", "or", ``\\quad``, ``\\text{ and }``, math delimiters). It serves the
  several-boxes rule: ``\\boxed{(2,2)} and \\boxed{(6,2)}`` answers a gold that is a list.
* :func:`sentence_answer`: the answer in one sentence ("The largest $n$ is 34." is 34): the
  sentence itself when it is all math, else its last math span or number.
* :func:`last_sentence`: the response's final sentence, for responses with neither a box nor a
  "Final answer" (chat tokens and "I hope it is correct." dropped first).
* :func:`locate`: the rules in order (see :mod:`irpo.tasks.math`); :func:`several_values`: whether
  a gold lists several values, the condition for reading a run of boxes together.
* :func:`tidy`: percent words (``28 percent``, ``28 pct``, ``28 percentage``) become ``28\\%``,
  the spelling of MATH's golds; stray ``$`` inside a box are dropped.
"""

from __future__ import annotations

import re

from irpo.tasks.common import _FINAL_RE, after_last_final_answer

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE_RE = re.compile(r"\\boxed +([^\s$]+)")


def box_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete box, in order; one pass over the braces."""
    opens = [m for m in _BOX_OPEN.finditer(text)]
    if not opens:
        return []
    close_of: dict[int, int] = {}
    stack: list[int] = []
    i, n = opens[0].end() - 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # "\{" and "\}" are literal braces, not groups
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close_of[stack.pop()] = i
        i += 1
    spans = []
    for m in opens:  # nested boxes all count; the last one opened is the answer, as before
        end = close_of.get(m.end() - 1)
        if end is not None:
            spans.append((m.start(), end + 1, text[m.end():end]))
    return spans


# What may stand between two boxes of one answer: punctuation, "and"/"or", spacing commands,
# math delimiters, and the next value's label ("and $y_2 = \boxed{...}$"). Words such as
# "for part (a)" are not: those boxes answer different questions.
_CONNECTOR = re.compile(
    r"(?:\s|[,;$]|\\[()\[\],;!]|\\q?quad\b|\\text\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b"
    r"|\b[A-Za-z](?:_\{?\w+\}?)?\s*=)*")


def last_box_run(text: str, spans: list[tuple[int, int, str]]) -> list[str]:
    """Contents of the boxes that end ``text``'s last run of connector-separated boxes."""
    run = [spans[-1][2]] if spans else []
    for (_, prev_end, content), (start, _, _) in zip(reversed(spans[:-1]), reversed(spans[1:])):
        if prev_end > start or not _CONNECTOR.fullmatch(text, prev_end, start):  # nested: stop
            break
        run.insert(0, content)
    return run


_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?<=\d)(?:\s*/\s*\d+)?"
    r"(?:\s*(?:\\?%|percent(?:age)?\b|pct\b))?")
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
_PERCENT_WORDS = {"percent", "percentage", "pct"}
# A full stop that ends a sentence: not a decimal point, followed by space and a capital / end.
_SENTENCE_END = re.compile(r"(?<!\d)\.(?=\s+[A-Z(\[<*]|\s*$)|\.(?=\s+[A-Z])|\n\s*\n")
MAX_SENTENCE_CHARS = 2000  # longer text is cut first: the span regex is quadratic on "$$$..."
_TAIL_NOISE = re.compile(r"(?:<\|[^|]*\|>.*|I hope it is correct\.?)\s*$", re.DOTALL)


def _masked(text: str) -> str:
    """``text`` with every math span blanked (same length), so sentence splitting ignores it."""
    return _SPAN.sub(lambda m: " " * len(m.group(0)), text)


def _is_prose(sentence: str) -> bool:
    outside = re.sub(r"\\(?:text|mbox|textbf|mathrm)\s*\{[^{}]*\}", " ", _masked(sentence))
    return any(w.lower() not in _PERCENT_WORDS for w in _WORD.findall(outside))


def sentence_answer(sentence: str) -> str | None:
    """The answer one sentence states: all of it when it is math, else its last math item."""
    sentence = sentence[:MAX_SENTENCE_CHARS]
    masked = _masked(sentence)
    end = _SENTENCE_END.search(masked)
    if end:  # "12,000,023. I hope it is correct." -> the first sentence
        sentence, masked = sentence[:end.start()], masked[:end.start()]
    sentence = sentence.strip()
    if not _is_prose(sentence):
        return sentence or None
    items = [(m.end(), next(g for g in m.groups() if g is not None)) for m in _SPAN.finditer(sentence)]
    items += [(m.end(), m.group(0)) for m in _NUMBER.finditer(masked) if m.group(0)]
    return max(items)[1] if items else sentence  # no math at all: the words ("Evelyn")


def last_sentence(text: str) -> str | None:
    """The final sentence of ``text`` that holds a math span or a number, if it is the last one."""
    text = _TAIL_NOISE.sub("", text[-MAX_SENTENCE_CHARS:].rstrip()).rstrip()
    text = _TAIL_NOISE.sub("", text).rstrip()  # "I hope it is correct. <|im_start|>user"
    masked = _masked(text)
    start = 0
    for m in _SENTENCE_END.finditer(masked):
        if masked[m.end():].strip():
            start = m.end()
    sentence = text[start:].strip()
    masked = masked[start:]
    if not (_SPAN.search(sentence) or any(m.group(0) for m in _NUMBER.finditer(masked))):
        return None
    return sentence


_PERCENT = re.compile(r"(?<=[\d}])\s*(?:\\%|%|\\text\s*\{\s*(?:percent(?:age)?|pct)\s*\}|"
                      r"percent(?:age)?\b|pct\b)\s*\.?$")


def tidy(answer: str) -> str:
    """Percent words to ``\\%``; unescaped ``$`` dropped (a box around "$28$ %")."""
    answer = re.sub(r"(?<!\\)\$", "", answer).strip()
    return _PERCENT.sub(r"\\%", answer)


def locate(response: str) -> tuple[str | None, list[str]]:
    """(raw answer, contents of the run of boxes it ends) by the rules in the module docstring."""
    spans = box_spans(response)
    final = None
    for final in _FINAL_RE.finditer(response):
        pass
    if final is not None and (not spans or final.start() >= spans[-1][1]):
        # A "Final answer" sentence after the last box (or with no box) is the answer.
        lines = [ln for ln in after_last_final_answer(response)[:MAX_SENTENCE_CHARS].splitlines()
                 if ln.strip()]
        answer = sentence_answer(lines[0]) if lines else None
        if answer is not None or not spans:
            return answer, []
    if spans:
        return spans[-1][2], last_box_run(response, spans)
    old = None
    for old in _BOX_SPACE_RE.finditer(response):  # "\boxed 5", an old MATH spelling
        pass
    if old is not None:
        return old.group(1), []
    sentence = last_sentence(response)  # neither box nor "Final answer": the closing sentence
    return (sentence_answer(sentence) if sentence else None), []


def several_values(gold: str) -> bool:
    """Whether a gold lists several values: a comma or semicolon outside every bracket
    (``(2,2),(6,2)``, ``k = 45, n = 2``) or a set (``\\{1,2\\}``, ``{1,2,3}``); not a number
    with thousands separators (``1,000``)."""
    text = gold.strip().replace("\\left", "").replace("\\right", "")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        return False
    if re.match(r"\\?\{", text) and "," in text:
        return True
    depth = 0
    for ch in text:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if depth == 0 and ch in ",;":
            return True
    return False
