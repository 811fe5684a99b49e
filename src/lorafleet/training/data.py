"""Training data: JSONL chat examples (SFT) and preference pairs (DPO), validated line by line.

SFT:  ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
      loss only on assistant tokens (the base's chat template renders the conversation).
DPO:  ``{"prompt": str | messages, "chosen": str, "rejected": str}``
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import LorafleetError

IGNORE = -100  # label of tokens that carry no loss
ROLES = ("system", "user", "assistant")
MAX_FILE_BYTES = 256 * 1024 * 1024


class DataError(LorafleetError, ValueError):
    """A dataset is unusable; the message names the file, the line and the problem."""

    http_status, code = 422, "invalid_data"


@dataclass
class Dataset:
    """Validated records of one kind, with the digest and count that go into provenance."""

    kind: str  # "sft" | "dpo"
    records: list[dict]
    digest: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class TokenizedPair:
    prompt_len: int
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False


@dataclass
class TokenizeReport:
    examples: int = 0
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)  # indices with no trainable token left


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")


def validate_record(record, kind: str, where: str) -> dict:
    """Check one record's schema; returns it or raises :class:`DataError` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == "sft":
        if set(record) != {"messages"}:
            raise DataError(f"{where}: an SFT example has exactly one key 'messages', got {sorted(record)}")
        _check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" and m["content"] for m in record["messages"]):
            raise DataError(f"{where}: no non-empty assistant message, so nothing to learn")
    elif kind == "dpo":
        if set(record) != {"prompt", "chosen", "rejected"}:
            raise DataError(f"{where}: a preference pair has keys 'prompt', 'chosen', 'rejected', got {sorted(record)}")
        if isinstance(record["prompt"], list):
            _check_messages(record["prompt"], where)
        elif not isinstance(record["prompt"], str) or not record["prompt"]:
            raise DataError(f"{where}: 'prompt' must be a non-empty string or a messages list")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key]:
                raise DataError(f"{where}: {key!r} must be a non-empty string")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    else:
        raise DataError(f"unknown dataset kind {kind!r}; use 'sft' or 'dpo'")
    return record


def digest_records(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def dataset_from_records(records: list[dict], kind: str, source: str = "<records>") -> Dataset:
    checked = [validate_record(r, kind, f"{source}: record {i + 1}") for i, r in enumerate(records)]
    if not checked:
        raise DataError(f"{source}: the dataset is empty")
    return Dataset(kind=kind, records=checked, digest=digest_records(checked), source=source)


def load_jsonl(path: str | Path, kind: str = "sft") -> Dataset:
    """Read and validate a JSONL file; the whole file is refused on the first bad line (line number given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: larger than the {MAX_FILE_BYTES} byte limit")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from exc
            records.append(validate_record(record, kind, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return Dataset(kind=kind, records=records, digest=digest_records(records), source=str(path))


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_sft(tokenizer, record: dict, max_len: int) -> TokenizedExample:
    """Token ids and labels: assistant turns (content + end-of-turn) labelled, everything else ``IGNORE``.

    The conversation is rendered with the chat template turn by turn; each new stretch of text is tokenized
    on its own, so an assistant turn's opening is tokenized exactly as a served prompt ends. Examples longer
    than ``max_len`` tokens are truncated (the caller counts and reports them).
    """
    messages = record["messages"]
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not head.startswith(done) or not full.startswith(head):
                raise DataError("the base's chat template does not render conversations prefix-stably")
            prompt_part, answer_part = _ids(tokenizer, head[len(done):]), _ids(tokenizer, full[len(head):])
            ids += prompt_part + answer_part
            labels += [IGNORE] * len(prompt_part) + answer_part
        else:
            full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not full.startswith(done):
                raise DataError("the base's chat template does not render conversations prefix-stably")
            part = _ids(tokenizer, full[len(done):])
            ids += part
            labels += [IGNORE] * len(part)
        done = full
    truncated = len(ids) > max_len
    return TokenizedExample(ids[:max_len], labels[:max_len], truncated)


def tokenize_pair(tokenizer, record: dict, max_len: int) -> TokenizedPair:
    """Prompt ids (with the assistant opening) + each response's ids and end-of-turn."""
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    head = _ids(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))
    end = tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    chosen = tokenizer(record["chosen"], add_special_tokens=False)["input_ids"] + end
    rejected = tokenizer(record["rejected"], add_special_tokens=False)["input_ids"] + end
    full_c, full_r = head + chosen, head + rejected
    truncated = max(len(full_c), len(full_r)) > max_len
    return TokenizedPair(len(head), full_c[:max_len], full_r[:max_len], truncated)
