"""Structured output on the OpenAI chat route: ``response_format`` and ``tools`` / ``tool_choice``.

``response_format``: ``{"type": "text"}`` (free), ``{"type": "json_object"}`` (any JSON object) or
``{"type": "json_schema", "json_schema": {"name", "schema", "description"?, "strict"?}}``: the output is held to
the schema by constrained decoding in the engine (:mod:`lorafleet.serving.constrain`), so it parses and
validates — unless it was cut by ``max_tokens`` (``finish_reason="length"``) or a ``stop`` string.

Tools: the definitions are rendered into the prompt (:func:`lorafleet.serving.chat.chat_prompt_ids`). The
output is a tool call when it is, after optional ```` ``` ```` fences, either one or more
``<tool_call>CALL</tool_call>`` blocks (text around them becomes ``content``), or a bare CALL, or a JSON array
of CALLs — where a CALL is a JSON object naming a declared function in one of the shapes
``{"name": F, "arguments": {...}}`` (``"parameters"`` is taken for ``"arguments"``) or the flat
``{"tool": F, "arg": value, ...}`` (every other key is an argument; the demo ``wxbot`` persona's shape).
Anything else is plain ``content``. ``tool_choice``: ``"none"`` (tools are not rendered, nothing is parsed),
``"auto"`` (the default with tools: the model decides; a call with arguments that break a ``strict`` tool's
schema is left as content), ``"required"`` / ``{"type": "function", "function": {"name": F}}`` (constrained
decoding forces exactly one ``{"name": F, "arguments": ...}`` object valid against that tool's ``parameters``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lorafleet.api.errors import ApiError
from lorafleet.serving.constrain import GrammarError, check_schema, json_grammar

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _bad(message: str, param: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _keys(obj: dict, allowed: set[str], param: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise _bad(f"{param}.{extra[0]}: this parameter is not supported by this server", f"{param}.{extra[0]}",
                   "unsupported_parameter")


def _grammar(schema: dict | None, param: str) -> str:
    try:
        return json_grammar(schema)
    except GrammarError as exc:
        raise _bad(f"{param}: {exc}", param, "invalid_schema") from None


def response_grammar(response_format: dict | None) -> str | None:
    """The grammar for a ``response_format`` (None: free text); 400 naming what is wrong."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        _keys(response_format, {"type"}, "response_format")
        return None
    if kind == "json_object":
        _keys(response_format, {"type"}, "response_format")
        return _grammar(None, "response_format")
    if kind == "json_schema":
        _keys(response_format, {"type", "json_schema"}, "response_format")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema must be an object {name, schema}", "response_format.json_schema")
        _keys(spec, {"name", "schema", "description", "strict"}, "response_format.json_schema")
        if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
            raise _bad("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                       "response_format.json_schema.name")
        if "schema" not in spec:
            raise _bad("response_format.json_schema.schema is required (the JSON schema the output must match)",
                       "response_format.json_schema.schema")
        return _grammar(spec["schema"], "response_format.json_schema.schema")
    raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
               "response_format.type")


@dataclass
class ToolPlan:
    """What a request's tools mean for its prompt, its decoding and its answer."""

    tools: list[dict]  # OpenAI definitions, as rendered (empty: tool_choice none)
    choice: str  # auto | required | the forced function's name
    grammar: str | None = None  # required / named: the one call's grammar
    parameters: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema
    strict: set[str] = field(default_factory=set)  # names of strict tools
    parallel: bool = True


def _tool(raw, i: int) -> tuple[str, dict, bool]:
    param = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
        raise _bad(f'{param} must be {{"type": "function", "function": {{"name", "parameters", ...}}}}', param)
    _keys(raw, {"type", "function"}, param)
    fn = raw["function"]
    _keys(fn, {"name", "description", "parameters", "strict"}, f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _bad(f"{param}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                   f"{param}.function.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise _bad(f"{param}.function.description must be a string", f"{param}.function.description")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    try:
        check_schema(params)
    except GrammarError as exc:
        raise _bad(f"{param}.function.parameters: {exc}", f"{param}.function.parameters", "invalid_schema") from None
    if fn.get("strict") not in (None, True, False):
        raise _bad(f"{param}.function.strict must be true or false", f"{param}.function.strict")
    return name, params, bool(fn.get("strict"))


def _call_schema(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_plan(tools, tool_choice, parallel_tool_calls) -> ToolPlan | None:
    """Validate ``tools`` / ``tool_choice`` / ``parallel_tool_calls``; None when no tool is in play."""
    if tools is not None and (not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS):
        raise _bad(f"tools must be a list of 1..{MAX_TOOLS} function definitions", "tools")
    if parallel_tool_calls is not None and not tools:
        raise _bad("parallel_tool_calls needs tools", "parallel_tool_calls")
    named = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', "tool_choice")
        _keys(tool_choice, {"type", "function"}, "tool_choice")
        _keys(fn, {"name"}, "tool_choice.function")
        named = fn["name"]
    elif tool_choice not in (None, "none", "auto", "required"):
        raise _bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                   f'{{"name": ...}}}}, got {tool_choice!r}', "tool_choice")
    if not tools:
        if tool_choice not in (None, "none"):
            raise _bad("tool_choice needs tools (none were given)", "tool_choice")
        return None
    defs = [_tool(t, i) for i, t in enumerate(tools)]
    names = [n for n, _, _ in defs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise _bad(f"tools: function {dup!r} is defined twice", "tools")
    if tool_choice == "none":
        return None
    params = {n: p for n, p, _ in defs}
    plan = ToolPlan(tools=list(tools), choice=named or tool_choice or "auto", parameters=params,
                    strict={n for n, _, s in defs if s}, parallel=parallel_tool_calls is not False)
    if named is not None:
        if named not in params:
            raise _bad(f"tool_choice names function {named!r}, which is not in tools ({', '.join(names)})",
                       "tool_choice", "unknown_tool")
        plan.grammar = _grammar(_call_schema(named, params[named]), f"tools[{names.index(named)}].function.parameters")
    elif plan.choice == "required":
        schema = {"anyOf": [_call_schema(n, p) for n, p in params.items()]} if len(params) > 1 else \
            _call_schema(names[0], params[names[0]])
        plan.grammar = _grammar(schema, "tools")
    return plan


def _as_call(obj, plan: ToolPlan) -> tuple[str, dict] | None:
    """(name, arguments) if ``obj`` is a call of a declared function in an accepted shape."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("name"), str) and set(obj) <= {"name", "arguments", "parameters"}:
        name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
    elif isinstance(obj.get("tool"), str):
        name, args = obj["tool"], {k: v for k, v in obj.items() if k != "tool"}
    else:
        return None
    if name not in plan.parameters or not isinstance(args, dict):
        return None
    if name in plan.strict:
        import jsonschema  # noqa: PLC0415 - only strict tools validate arguments after parsing

        if not jsonschema.validators.validator_for(plan.parameters[name])(plan.parameters[name]).is_valid(args):
            return None
    return name, args


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]] | None:
    """``(content, tool_calls)`` in OpenAI's shape when ``text`` is a tool call (see the module docstring), else
    None (the text is plain content)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    content = None
    if "<tool_call>" in body:
        found = [_as_call(_loads(m.group(1)), plan) for m in _TOOL_CALL.finditer(body)]
        content = _TOOL_CALL.sub("", body).strip() or None
    else:
        obj = _loads(body)
        found = [_as_call(o, plan) for o in obj] if isinstance(obj, list) and obj else [_as_call(obj, plan)]
    if not found or any(c is None for c in found):
        return None
    if not plan.parallel:
        found = found[:1]
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": name, "arguments": json.dumps(args)}} for name, args in found]
    return content, calls
