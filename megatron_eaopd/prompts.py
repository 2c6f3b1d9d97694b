"""The prompt format: how a problem becomes the text a model continues.

One format is used for training rollouts, training-time validation and ``tools/evaluate.py``:
``problem + separator + suffix`` (the paper's instruction), optionally wrapped as one user message
in the tokenizer's chat template with ``add_generation_prompt=True`` and the template options in
``chat_template_kwargs`` (default ``enable_thinking=False``: thinking off, as for the paper's Qwen3
teacher; templates that ignore the option are unaffected).

:class:`PromptFormat` is that format as a value. The trainer writes it into each checkpoint's
metadata (``eaopd_checkpoint.json``, key ``"prompt_format"``) so that evaluation defaults to the
format the checkpoint was trained with.

Source: docs/method.md, "Evaluation protocol" (the suffix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["PROMPT_SUFFIX", "PROMPT_SEPARATOR", "DEFAULT_CHAT_TEMPLATE_KWARGS", "PromptFormat", "build_prompt"]

#: The paper's instruction appended to every problem (docs/method.md, "Evaluation protocol"; exact string).
PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
#: Separator between problem and suffix (choice: verl's math preprocessing joins with one space).
PROMPT_SEPARATOR = " "
#: Options passed to ``apply_chat_template`` unless a format says otherwise.
DEFAULT_CHAT_TEMPLATE_KWARGS: dict[str, Any] = {"enable_thinking": False}


def build_prompt(problem: str, tokenizer: Any = None, chat_template: bool = False,
                 suffix: str | None = PROMPT_SUFFIX, separator: str = PROMPT_SEPARATOR,
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """Prompt text for one problem: ``problem + separator + suffix``, optionally chat-templated.

    Args: problem (str); tokenizer: a HF tokenizer (needed only when ``chat_template``);
        chat_template (bool): wrap as one user message with
        ``apply_chat_template(..., add_generation_prompt=True, **chat_template_kwargs)``;
        suffix (str | None): the paper's instruction (None/"" = none); separator (str);
        chat_template_kwargs: template options (default ``{"enable_thinking": False}``).
    Returns: str. Raises: ValueError when chat_template is requested without a tokenizer that has one.
    """
    text = problem.strip()
    if suffix:
        text = text + separator + suffix
    if not chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True needs a tokenizer with a chat template")
    kwargs = dict(DEFAULT_CHAT_TEMPLATE_KWARGS if chat_template_kwargs is None else chat_template_kwargs)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)


@dataclass(frozen=True)
class PromptFormat:
    """A prompt format (see module doc): ``chat_template`` (bool), ``suffix`` (str | None),
    ``separator`` (str), ``chat_template_kwargs`` (dict of JSON values)."""

    chat_template: bool = False
    suffix: str | None = PROMPT_SUFFIX
    separator: str = PROMPT_SEPARATOR
    chat_template_kwargs: dict = field(default_factory=lambda: dict(DEFAULT_CHAT_TEMPLATE_KWARGS))

    def to_dict(self) -> dict:
        """JSON form, as stored under ``"prompt_format"`` in ``eaopd_checkpoint.json``."""
        return {"chat_template": self.chat_template, "suffix": self.suffix, "separator": self.separator,
                "chat_template_kwargs": dict(self.chat_template_kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "prompt_format") -> "PromptFormat":
        """Parse :meth:`to_dict` output; missing keys take the defaults.

        Raises: ValueError naming ``where`` and the key on an unknown key or a value of the wrong type.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"chat_template", "suffix", "separator", "chat_template_kwargs"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        out = cls()
        checks = (("chat_template", bool), ("suffix", (str, type(None))), ("separator", str),
                  ("chat_template_kwargs", Mapping))
        for key, typ in checks:
            if key in d and not isinstance(d[key], typ):
                raise ValueError(f"{where}.{key} = {d[key]!r} has the wrong type")
        return cls(chat_template=d.get("chat_template", out.chat_template), suffix=d.get("suffix", out.suffix),
                   separator=d.get("separator", out.separator),
                   chat_template_kwargs=dict(d.get("chat_template_kwargs", out.chat_template_kwargs)))

    def build(self, problem: str, tokenizer: Any = None) -> str:
        """:func:`build_prompt` with this format."""
        return build_prompt(problem, tokenizer, self.chat_template, self.suffix, self.separator,
                            self.chat_template_kwargs)
