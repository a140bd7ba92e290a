"""Tool calling: tools rendered into the prompt, the grammar that enforces `required` and named choices, and the
parser that turns the model's `<tool_call>{...}</tool_call>` blocks into OpenAI's `tool_calls`.

The format is the Hermes convention (Qwen2.5/Qwen3, Hermes, SmolLM3 templates): each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` tags, and a tool's answer goes back between
`<tool_response>` tags. A chat template that knows tools (its source mentions `tools`) renders them itself; for
one that does not (SmolLM2's), the tools are described in the system message in the same convention and the
history is rewritten to plain turns.
"""

from __future__ import annotations

import json
import re
import uuid

from dspark.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# the grammar writes (and the history renders) calls with json.dumps' separators
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

TOOLS_PROMPT = """You can call functions to help with the request. Their signatures, as JSON, are listed between \
<tools> and </tools>:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object holding its name and arguments between <tool_call> and </tool_call> \
tags, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""


class ToolError(ValueError):
    """The request's tools cannot be used as given (a 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def tool_choice(req: ChatCompletionRequest) -> str | NamedToolChoice:
    """The effective choice: OpenAI's default is `auto` with tools and `none` without; checked against the tools."""
    choice = req.tool_choice or ("auto" if req.tools else "none")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise ToolError("tools must have distinct function names", "tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ToolError(f"tool_choice names function {choice.function.name!r}, which is not in tools",
                            "tool_choice")
    elif choice == "required" and not names:
        raise ToolError("tool_choice 'required' needs tools", "tool_choice")
    return choice


def _arguments(text: str):
    """A call's arguments as the template should see them: parsed JSON, or the text when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def chat_messages(req: ChatCompletionRequest, native: bool) -> tuple[list[dict], dict]:
    """The request's messages and extra template variables, for a template that renders tools itself (`native`)
    or one that does not."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if native:
        msgs = []
        for m in req.messages:
            d = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            msgs.append(d)
        return msgs, ({"tools": tools} if tools else {})
    msgs: list[dict] = []
    for m in req.messages:
        if m.role == "tool":  # consecutive tool answers share one user turn
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if msgs and msgs[-1].get("tool_responses"):
                msgs[-1]["content"] += "\n" + block
            else:
                msgs.append({"role": "user", "content": block, "tool_responses": True})
        else:
            msgs.append({"role": m.role, "content": _plain_content(m)})
    for d in msgs:
        d.pop("tool_responses", None)
    if tools:
        prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if msgs[0]["role"] in ("system", "developer"):
            msgs[0]["content"] += "\n\n" + prompt
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
    return msgs, {}


def _plain_content(m: ChatMessage) -> str:
    calls = [f"{OPEN}\n{json.dumps({'name': c.function.name, 'arguments': _arguments(c.function.arguments)})}"
             f"\n{CLOSE}" for c in m.tool_calls or []]
    return "\n".join([m.text(), *calls] if m.text() else calls)


def _hoist_defs(parameters: dict, defs: dict, name: str) -> dict:
    """A function's parameter schema with its `$defs` moved to the root (its `#/$defs/...` refs then resolve
    there, as they did in its own schema)."""
    own = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
    for key in ("$defs", "definitions"):
        for d, schema in (parameters.get(key) or {}).items():
            if defs.setdefault(key, {}).setdefault(d, schema) != schema:
                raise ToolError(f"function {name!r}: {key} entry {d!r} differs from another function's", "tools")
    return own


def tool_grammar(req: ChatCompletionRequest, choice: str | NamedToolChoice) -> str | None:
    """Lark text for llguidance when the choice forces calls (`required`, or a named function): one call, or
    one or more with parallel_tool_calls, each `<tool_call>` + JSON valid against that function's parameters.
    None for `auto` / `none`."""
    if choice in ("auto", "none"):
        return None
    named = isinstance(choice, NamedToolChoice)
    funcs = [t.function for t in req.tools or [] if not named or t.function.name == choice.function.name]
    defs: dict = {}
    variants = [{"type": "object", "properties": {"name": {"const": f.name},
                                                  "arguments": _hoist_defs(f.parameters, defs, f.name)},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in funcs]
    schema = {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), **defs, "x-guidance": JSON_STYLE}
    more = ' ("\\n" call)*' if req.parallel_tool_calls and not named else ""
    return f'start: call{more}\ncall: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"\n'


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that may be the start of `tag` (held back until it is known)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)


# "parameters" is the other key models use for the arguments (Llama 3.1's convention)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')


class _ObjectEnd:
    """Finds where a streamed JSON object ends: brace depth outside strings."""

    def __init__(self):
        self.depth, self.in_str, self.esc, self.done = 0, False, False, False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the object (all of them until it closes)."""
        for i, ch in enumerate(text):
            if self.in_str:
                self.esc, self.in_str = (False, True) if self.esc else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_str = True
            elif ch == "{":
                self.depth += 1
            elif ch == "}":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallParser:
    """Splits one choice's streamed text into content and OpenAI `tool_calls` deltas.

    A call is announced (index, id, name) once its name is read and its arguments stream as the model writes
    them, so streamed and non-streamed answers are the same events. Text that might be the start of `<tool_call>`
    is held back, and so is trailing whitespace (dropped when a call follows: the blank line before a call is not
    content). A block that is not a JSON call stays content; a call cut off by max_tokens keeps what was written.
    """

    def __init__(self):
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}} as parsed so far
        self._pending = ""  # text not yet classified
        self._space = ""  # trailing whitespace held back
        self._body: str | None = None  # the open call's text after <tool_call>, while one is open
        self._args_at: int | None = None  # where its arguments start in _body, once its name is read
        self._args: _ObjectEnd | None = None
        self._scanned = 0  # characters of _body the argument scanner has seen

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """The content and the tool-call deltas this text completes."""
        self._pending += text
        content, deltas = "", []
        while self._pending:
            if self._body is None:
                i = self._pending.find(OPEN)
                if i < 0:
                    keep = _partial_tag(self._pending, OPEN)
                    content += self._text(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content += self._text(self._pending[:i])
                self._space = ""
                self._pending = self._pending[i + len(OPEN):]
                self._body, self._args_at, self._args, self._scanned = "", None, None, 0
            else:
                self._body += self._pending
                self._pending = ""
                deltas += self._advance()
                j = self._body.find(CLOSE, self._args_at or 0)
                if j < 0:
                    break
                self._pending = self._body[j + len(CLOSE):]
                body, self._body = self._body[:j], None
                content_, deltas_ = self._close(body)
                content += content_
                deltas += deltas_
        return content, _merged(deltas)

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the choice: whatever is held back (an unclosed block that never named a call is text)."""
        content = ""
        if self._body is not None and self._args_at is None:
            content = self._space + OPEN + self._body
        elif self._body is None:
            content = self._space + self._pending
        self._pending = self._space = ""
        self._body = None
        return content, []

    def _text(self, text: str) -> str:
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        return body

    def _start(self, name: str, arguments: str = "") -> dict:
        cid = f"call_{uuid.uuid4().hex[:24]}"
        self.calls.append({"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}})
        return {"index": len(self.calls) - 1, "id": cid, "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def _advance(self) -> list[dict]:
        deltas = []
        if self._args_at is None:
            m = _HEAD.match(self._body)
            if m is None:
                return []
            deltas.append(self._start(json.loads(f'"{m.group(1)}"')))
            self._args_at = self._scanned = m.end()
        if self._args is None:  # the value starts at the first non-space character; only an object streams
            rest = self._body[self._scanned:]
            if not rest.strip() or not rest.lstrip().startswith("{"):
                return deltas
            self._scanned += len(rest) - len(rest.lstrip())
            self._args = _ObjectEnd()
        if not self._args.done:  # scan up to a closing tag (a call cut short), holding back a partial one
            new = self._body[self._scanned:]
            cut = new.find(CLOSE)
            new = new[:cut] if cut >= 0 else new[: len(new) - _partial_tag(new, CLOSE)]
            n = self._args.feed(new)
            self._scanned += n
            if n:
                self.calls[-1]["function"]["arguments"] += new[:n]
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": new[:n]}})
        return deltas

    def _close(self, body: str) -> tuple[str, list[dict]]:
        """The block ended. A call whose name was read is done; otherwise parse the block whole (a call written
        with `arguments` first, or as a string), or give it back as text."""
        if self._args is not None:
            return "", []
        try:
            call = json.loads(body)
            name, args = call["name"], call["arguments"] if "arguments" in call else call["parameters"]
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if self._args_at is not None:  # named, but the arguments are not JSON: the call has none
                return "", []
            return self._text(OPEN + body + CLOSE), []
        args = args if isinstance(args, str) else json.dumps(args)
        if self._args_at is not None:  # named already; its arguments were not an object, so arrive whole
            self.calls[-1]["function"]["arguments"] = args
            return "", [{"index": len(self.calls) - 1, "function": {"arguments": args}}]
        return "", [self._start(name, args)]


def _merged(deltas: list[dict]) -> list[dict]:
    """One delta per call in a chunk (a call's announcement and its first arguments travel together)."""
    out: list[dict] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["function"]["arguments"]
        else:
            out.append(d)
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """A finished answer's content (None when it is only calls) and its tool calls: the streaming parser's
    events, folded."""
    parser = ToolCallParser()
    content, _ = parser.feed(text)
    content += parser.finish()[0]
    return (content or None) if parser.calls else content, parser.calls
