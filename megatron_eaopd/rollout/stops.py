"""Which token ids end a response: the union of every end id the model and its tokenizer declare.

A model family often disagrees with itself: Qwen3-*-Base ship ``eos_token_id`` 151643
(``<|endoftext|>``) in config.json and generation_config.json, while their chat template ends an
assistant turn with ``<|im_end|>`` (151645). A student prompted with the chat template must stop at
``<|im_end|>``, or the tail after it is sampled, trained on and graded. :func:`stop_token_ids`
therefore takes the union of

1. the ids of the model's config and generation config (``ModelInfo.eos_token_ids``),
2. the tokenizer's ``eos_token_id``,
3. with a chat template in use, the token that ends an assistant turn (:func:`chat_end_of_turn_ids`).

Sources: transformers ``GenerationConfig.eos_token_id`` (a list is allowed; generation stops on any);
the chat templates of Qwen3 / ChatML / Llama 3 (``<|im_end|>``, ``<|eot_id|>``).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["chat_end_of_turn_ids", "stop_token_ids"]

_MARKER = "eaopdendofturnprobe"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def chat_end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special token that closes an assistant turn in the tokenizer's chat template (or ``()``).

    Renders a one-exchange conversation whose assistant reply is a marker word and returns the first
    special token the template puts after the reply (``<|im_end|>`` for ChatML / Qwen, ``<|eot_id|>``
    for Llama 3). Returns ``()`` when there is no chat template, it cannot render an assistant turn,
    or nothing special follows the reply.

    Args:
        tokenizer: a Hugging Face tokenizer.
    Returns:
        a tuple of at most one token id.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ()
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
    except Exception:  # noqa: BLE001 - templates that cannot render an assistant turn have no end-of-turn to find
        return ()
    if not isinstance(text, str) or _MARKER not in text:
        return ()
    after = text[text.rindex(_MARKER) + len(_MARKER):]
    special = _special_ids(tokenizer)
    for i in tokenizer.encode(after, add_special_tokens=False):
        if int(i) in special:
            return (int(i),)
    return ()


def stop_token_ids(tokenizer: Any, model_eos_ids: Sequence[int] = (), chat_template: bool = False) -> tuple[int, ...]:
    """Every id that ends a response, in a fixed order (the first is the engines' padding id).

    Args:
        tokenizer: the Hugging Face tokenizer of the model.
        model_eos_ids: end ids of the model's config.json / generation_config.json
            (``ModelInfo.eos_token_ids``), in their order.
        chat_template: prompts are rendered with the tokenizer's chat template (adds the template's
            end-of-turn token).
    Returns:
        the de-duplicated union: model ids, then the tokenizer's EOS, then the end-of-turn token.
    Raises:
        ValueError: no end id is known at all (names where it was looked for).
    """
    out: list[int] = []
    extra = [getattr(tokenizer, "eos_token_id", None)]
    if chat_template:
        extra += list(chat_end_of_turn_ids(tokenizer))
    for i in [*model_eos_ids, *extra]:
        if i is not None and int(i) not in out:
            out.append(int(i))
    if not out:
        raise ValueError("no end-of-sequence id: the model's config.json / generation_config.json and the tokenizer "
                         "declare none; set eos_token_id in generation_config.json")
    return tuple(out)
