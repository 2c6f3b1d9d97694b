"""Final-answer extraction from text: the last ``\\boxed{...}`` and GSM8K's ``#### answer``.

A low-level module (no project imports): the data pipeline uses it to read gold answers out of
reference solutions (``FieldMap.answer_transform``), the grader to read the model's answer out of
its output.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["last_boxed", "gsm8k_answer", "ANSWER_TRANSFORMS"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str | None) -> str | None:
    """Content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, with nested braces.

    Also accepts the brace-less form ``\\boxed 5`` (content up to the next whitespace or ``$``).
    Args: text: model output (str) or None.
    Returns: the content (str, stripped; may be empty for ``\\boxed{}``), or None when there is no
        box or the last box is unterminated (the output was cut off inside it).
    Source: the answer-extraction convention of the paper's prompt (docs/method.md, "Evaluation protocol").
    """
    if not text:
        return None
    best = -1
    cmd_len = 0
    for cmd in _BOX_COMMANDS:
        i = text.rfind(cmd)
        while i != -1:
            # \boxed must not be a prefix of a longer command name (e.g. \boxedfoo)
            nxt = text[i + len(cmd): i + len(cmd) + 1]
            if not (nxt.isalpha()):
                break
            i = text.rfind(cmd, 0, i)
        if i > best:
            best, cmd_len = i, len(cmd)
    if best < 0:
        return None
    j = best + cmd_len
    n = len(text)
    while j < n and text[j] == " ":
        j += 1
    if j < n and text[j] == "{":
        depth = 0
        k = j
        while k < n:
            c = text[k]
            if c == "\\" and k + 1 < n and text[k + 1] in "{}":
                k += 2  # escaped brace \{ or \} does not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1: k].strip()
            k += 1
        return None  # unterminated box
    if j > best + cmd_len:  # "\boxed 5" form
        k = j
        while k < n and not text[k].isspace() and text[k] != "$":
            k += 1
        content = text[j:k].strip()
        return content or None
    return None


def gsm8k_answer(text: str) -> str | None:
    """GSM8K rationale -> final answer: the text after the last ``####``, commas removed (None when
    there is no ``####``)."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "")


#: Named answer transforms usable in ``data.FieldMap.answer_transform`` (and ``data.answer_transform``).
ANSWER_TRANSFORMS: dict[str, Callable[[str], str | None]] = {
    "last_boxed": last_boxed,
    "gsm8k": gsm8k_answer,
}
