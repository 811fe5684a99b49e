"""Turning user input into token ids with the base's chat template."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, prompt: str | list[dict], *, system: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant turn's opening (generation prompt).

    ``prompt`` is a user message or a list of ``{"role", "content"}`` messages.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
