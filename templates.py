"""Chat templates: the official Qwen templates written out by hand, which one a model dir ships, and
the message contract every reader (training, `data.py inspect`, generate.py) normalises rows into.

No jinja at runtime. Each renderer writes the exact text the official template renders through
transformers (tojson = json.dumps(ensure_ascii=False)) and, from the same code, the character spans
that are trained; tests compare both with the official templates run through jinja2.

Trained spans, one rule for every family (_reply): an assistant turn after `<|im_start|>assistant\n`
through `<|im_end|>\n`, less a leading copy of what the generation prompt adds under the same kwargs;
a message's `loss` field (true/false) overrides the default for its own turn.
"""
import hashlib
import json
import re
from pathlib import Path

FAMILIES = ("qwen2.5", "qwen3", "qwen3-instruct-2507", "qwen3.5", "qwen3.8")
# SHA-256 of the official template texts, byte for byte (the .jinja file and the tokenizer_config.json
# string are the same text for each). Only digests are kept: recognition needs no copy of the text.
OFFICIAL = {
    "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f": "qwen2.5",  # Qwen2.5 Instruct
    "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8": "qwen3",  # Qwen3 0.6B-32B, current
    "64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326": "qwen3-instruct-2507",
    "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715": "qwen3.5",  # Qwen3.5 0.8B-27B
    "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041": "qwen3.8",  # Qwen3.8-27B
}
CHOICES = "|".join(FAMILIES)  # as the flags spell them
# The template kwargs each family's template reads (data.apply_chat_template_kwargs.KEY).
KWARGS = {"qwen2.5": (), "qwen3": ("enable_thinking",), "qwen3-instruct-2507": (),
          "qwen3.5": ("enable_thinking",), "qwen3.8": ("enable_thinking", "preserve_thinking", "reasoning_effort")}
THINKING = ("qwen3", "qwen3.5", "qwen3.8")  # the families that write reasoning
# Qwen3.8's system-turn instruction per reasoning_effort (medium adds none).
EFFORTS = {
    "xhigh": "Reasoning effort is set to xhigh. Please think carefully through the task, validate key assumptions, "
             "consider plausible alternatives, and prioritize correctness, consistency, and clarity in the final answer.",
    "medium": "",
    "low": "Reasoning effort is set to low. Keep your thinking brief and focused, moving directly to the conclusion "
           "without unnecessary elaboration.",
}

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
              "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
XML_TOOLS_HEAD = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
XML_TOOLS_TAIL = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified "
    "format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in "
    "natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer "
    "the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# transformers passes a message's reasoning to the template as reasoning_content, taken from the
# first of these keys that is not None.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
ROLES = ("system", "user", "assistant", "tool")


class TemplateError(Exception):
    """The model's chat template is missing or not one we render, or a template kwarg is wrong; the
    message names the flag."""


class DataError(Exception):
    """A user-caused problem in the data or data flags; the message is one sentence with the fix."""


# --------------------------------------------------------------------------- the message contract

def _prune(x):
    # Parquet unifies struct fields across rows: a key one row's tool schema or arguments has
    # shows up as null in every other row. Those keys are dropped. A deliberate null in a struct
    # column cannot be told apart and is dropped too; JSON-string columns keep their nulls, since
    # no unification happened there.
    if isinstance(x, dict):
        return {k: _prune(v) for k, v in x.items() if v is not None}
    return [_prune(v) for v in x] if isinstance(x, list) else x


def _json(value, what, where):
    if not isinstance(value, str):
        return _prune(value)
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {what} is not valid JSON ({e.msg} at char {e.pos}); "
                        "fix the string or store it as a struct.") from None


def _tool_call(call, what, where):
    # With or without the OpenAI {type, function} wrapper, as the templates accept both.
    fn = call["function"] if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"{where}: {what} has no string name; a tool call needs {{name, arguments}}.")
    # JSON-string arguments are checked here but kept as given: Qwen3's template writes them
    # verbatim, while the Qwen2.5 and Qwen3.5 renderers decode them first.
    args = fn.get("arguments")
    decoded = _json(args, f"{what} arguments", where)
    return {"name": fn["name"], "arguments": args if isinstance(args, str) else decoded}


def _text_parts(parts, j, where):
    """Content given as a list of {"type": "text", "text": ...} parts: their text, joined as the
    Qwen3.5 templates join it. Images and videos are refused: we train text models."""
    texts = []
    for k, part in enumerate(parts):
        part = _prune(part)  # parquet adds every other part's keys as null
        if not isinstance(part, dict):
            raise DataError(f"{where}: message {j} content part {k} is a {type(part).__name__}, "
                            'not a {"type": "text", "text": ...} object.')
        if {"image", "image_url", "video"} & part.keys() or part.get("type") in ("image", "image_url", "video"):
            raise DataError(f"{where}: message {j} content part {k} is an image or video; we train on text only, "
                            "so drop that part or the row.")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: message {j} content part {k} has no string text; "
                            'a part is {"type": "text", "text": ...}.')
        texts.append(part["text"])
    return "".join(texts)


def normalise(messages, where="the conversation"):
    """A row's messages in the form every renderer takes: [{role, content: str, loss: bool|None,
    parts?: True (content was a list of text parts), reasoning_content?: str, tool_calls?: [{name,
    arguments: dict or the JSON string as given}]}]. where names the row in errors."""
    raw = _json(messages, "the messages column", where) if isinstance(messages, str) else messages
    if raw is not None and not isinstance(raw, list):
        raise DataError(f"{where}: the messages column holds a {type(raw).__name__}, not a list of "
                        "{role, content} messages; check data.multiturn.messages_key.")
    if not raw:
        raise DataError(f"{where} has an empty conversation; every row needs at least one message.")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is a {type(m).__name__}, not a {{role, content}} object.")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has unknown role {role!r}; "
                            "use system, user, assistant or tool.")
        calls = m.get("tool_calls") or []  # parquet gives null on messages without calls
        calls = _json(calls, f"message {j} tool_calls", where) if isinstance(calls, str) else calls
        if calls and role != "assistant":
            raise DataError(f"{where}: message {j} is a {role} message with tool_calls; "
                            "only assistant messages call tools.")
        content = m.get("content")
        content = "" if content is None and calls else content  # the template renders it as nothing
        parts = isinstance(content, list)
        content = _text_parts(content, j, where) if parts else content
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} ({role}) has non-string content of type "
                            f"{type(content).__name__}; content must be a string or a list of text parts.")
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise DataError(f"{where}: message {j} has loss={loss!r}; loss must be true, false or absent.")
        out.append({"role": role, "content": content, "loss": loss})
        if parts:
            out[-1]["parts"] = True
        # transformers takes the reasoning from the first of these keys that is not None.
        key = next((k for k in REASONING_KEYS if m.get(k) is not None), None)
        if key is not None:
            if not isinstance(m[key], str):
                raise DataError(f"{where}: message {j} has a {key} of type {type(m[key]).__name__}; "
                                "reasoning must be a string.")
            out[-1]["reasoning_content"] = m[key]
        if calls:
            out[-1]["tool_calls"] = [_tool_call(c, f"message {j} tool call {k}", where)
                                     for k, c in enumerate(calls)]
    return out


def normalise_tools(tools, where="the conversation"):
    """A row's tools (a list of objects or its JSON string) as a list, or None for none."""
    tools = None if tools is None or tools == "" else _json(tools, "the tools column", where)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: tools is a {type(tools).__name__}, not a list of tool objects.")
    return tools or None  # an empty list renders like no tools (the templates test `if tools`)


# --------------------------------------------------------------------------- recognition

def read_template(model_dir, flag="data.chat_template="):
    """The template text transformers would use for model_dir, or None when it has none."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").is_file():  # transformers prefers the file to the config entry
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not (path / "tokenizer_config.json").is_file():
        return None
    try:
        template = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        raise TemplateError(f"{path / 'tokenizer_config.json'} is not a JSON object; restore it from the "
                            f"model's original files, or pass {flag}{CHOICES}.") from None
    if isinstance(template, list):  # named templates: the one called "default" is used
        template = next((t.get("template") for t in template if isinstance(t, dict)
                         and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def detect(model_dir, choice="auto", flag="data.chat_template="):
    """The template family to render for model_dir: choice itself, or with auto the one it ships.
    flag is how the caller's command line forces a family (named in the errors)."""
    if choice != "auto":
        if choice not in FAMILIES:
            raise TemplateError(f"data.chat_template={choice!r} is not one of auto, {', '.join(FAMILIES)}.")
        return choice
    text = read_template(model_dir, flag)
    family = OFFICIAL.get(hashlib.sha256(text.encode("utf-8")).hexdigest()) if text is not None else None
    if family is None:
        found = "has no chat template" if text is None else "has a chat template that is not an official one"
        raise TemplateError(f"{model_dir} {found}; we render the {', '.join(FAMILIES)} templates by hand, "
                            f"so pass {flag}{CHOICES} to choose the one this model was trained with.")
    return family


def check_kwargs(family, kwargs, flag="data.apply_chat_template_kwargs."):
    """kwargs for every row checked against what family's template reads; flag + key names each in errors."""
    for key, value in (kwargs or {}).items():
        if key not in KWARGS[family]:
            takes = ", ".join(KWARGS[family]) or "none"
            raise TemplateError(f"{flag}{key} is not read by the {family} template (it reads {takes}); drop it.")
        if key == "reasoning_effort" and value not in EFFORTS:
            raise TemplateError(f"{flag}{key}={value!r} is not one of xhigh (the default), medium, low.")
        if key != "reasoning_effort" and not isinstance(value, bool):
            raise TemplateError(f"{flag}{key}={value!r} is not true or false.")
    return dict(kwargs or {})


# --------------------------------------------------------------------------- rendering

def generation_prompt(family, enable_thinking=True):
    """What the generation prompt adds after `<|im_start|>assistant\\n` (and so what the mask rule leaves
    untrained at the start of an assistant turn)."""
    if family in ("qwen3.5", "qwen3.8"):
        return "<think>\n" if enable_thinking else EMPTY_THINK
    return EMPTY_THINK if family == "qwen3" and not enable_thinking else ""


def render(family, messages, tools=None, *, enable_thinking=True, preserve_thinking=True, reasoning_effort="xhigh",
           add_generation_prompt=False, where="the conversation", replies=None):
    """(text, spans): the official template's text for family, and the trained [start, end) char spans.

    messages and tools as normalise / normalise_tools return them; the kwargs as the templates name
    them (check_kwargs says which family reads which). A conversation the official template refuses
    is a DataError naming where. replies, when a list, receives (start, end, has_tool_calls) of each
    trained assistant reply: the one span of that turn that _reply trains, in text order.
    """
    if family not in FAMILIES:
        raise TemplateError(f"chat template {family!r} is not one of {', '.join(FAMILIES)}.")
    parts, spans, pos = [], [], 0

    def add(s, trained=False, calls=None):
        nonlocal pos
        if trained and s:
            spans.append((pos, pos + len(s)))
            if calls is not None and replies is not None:
                replies.append((pos, pos + len(s), calls))
        parts.append(s)
        pos += len(s)

    prompt = generation_prompt(family, enable_thinking)
    if family in ("qwen3.5", "qwen3.8"):
        _qwen35(messages, tools, add, prompt, family, enable_thinking, preserve_thinking, reasoning_effort, where)
    else:
        text_parts = [j for j, m in enumerate(messages) if m.get("parts") and (family == "qwen2.5" or j == 0)]
        if text_parts:  # the template adds the list to a string, which jinja refuses
            raise DataError(f"{where}: message {text_parts[0]} has its content as a list of parts, which the "
                            f"{family} template cannot render there; give the content as a string.")
        if family == "qwen2.5":
            _qwen25(messages, tools, add, prompt)
        else:
            _qwen3(messages, tools, add, prompt, family == "qwen3")
    if add_generation_prompt:
        add("<|im_start|>assistant\n" + prompt)
    return "".join(parts), spans


def _trained(m):
    return m["loss"] if m.get("loss") is not None else m["role"] == "assistant"


def _reply(add, text, trained, prompt, calls):
    """An assistant turn: the one mask rule. Trained after its header through `<|im_end|>\\n`, except a
    start equal to the generation prompt's own text, which at inference is part of the prompt. calls:
    whether the turn carries tool calls (recorded with its span for the validation metrics)."""
    add("<|im_start|>assistant\n")
    if trained and prompt and text.startswith(prompt):
        add(prompt)
        text = text[len(prompt):]
    add(text, trained, calls)


def _tool(m, i, messages, add, content, header_first=True):
    """A tool result: consecutive ones share one user turn, one <tool_response> block each. Qwen3.5's
    template writes no header for a tool message that opens the conversation (header_first=False)."""
    if (i == 0 and header_first) or (i > 0 and messages[i - 1]["role"] != "tool"):
        add("<|im_start|>user")
    add("\n")
    add("<tool_response>\n" + content + "\n</tool_response>", _trained(m))
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        add("<|im_end|>\n", _trained(m))


def _qwen25(messages, tools, add, prompt):
    first = messages[0]
    system = first["content"] if first["role"] == "system" else DEFAULT_SYSTEM
    if tools:
        system += TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_TAIL
    add("<|im_start|>system\n")
    add(system + "<|im_end|>\n", first["role"] == "system" and first.get("loss") is True)
    for i, m in enumerate(messages):
        role, body = m["role"], m["content"]
        if i == 0 and role == "system":
            continue  # already the header above
        if role == "tool":
            _tool(m, i, messages, add, body)
            continue
        if m.get("tool_calls"):
            calls = ""
            for c in m["tool_calls"]:
                # The template applies tojson to the arguments; a JSON string (as datasets store them)
                # is decoded first, else it would be encoded a second time ("{\"code\": ...}").
                args = json.loads(c["arguments"]) if isinstance(c["arguments"], str) else c["arguments"]
                calls += ('\n<tool_call>\n{"name": "' + c["name"] + '", "arguments": '
                          + json.dumps(args, ensure_ascii=False) + "}\n</tool_call>")
            # The template writes "\n" + content only for non-empty content; either way the text
            # after the role starts with "\n", which is the header's newline below.
            body = ((("\n" + body) if body else "") + calls)[1:]
        if role == "assistant":
            _reply(add, body + "<|im_end|>\n", _trained(m), prompt, bool(m.get("tool_calls")))
        else:
            add(f"<|im_start|>{role}\n")
            add(body + "<|im_end|>\n", _trained(m))


def _is_query(m, content):
    """The last query is the last user message not wrapped in <tool_response>; reasoning is shown only after it."""
    return m["role"] == "user" and not (content.startswith("<tool_response>") and content.endswith("</tool_response>"))


def _think_split(content):
    # Reasoning written inside the content: the text inside <think>...</think>, cut out of it.
    return (content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
            content.split("</think>")[-1].lstrip("\n"))


def _qwen3(messages, tools, add, prompt, thinking):
    """Qwen3 (thinking=True) and Qwen3-2507 Instruct (thinking=False: no reasoning logic at all)."""
    first, last = messages[0], len(messages) - 1
    own_system = first["role"] == "system"
    # No default system prompt; with tools the system turn is the system message (if any) + the tools.
    if tools:
        tools_text = TOOLS_HEAD[2:] + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_TAIL
        add("<|im_start|>system\n")
        add((first["content"] + "\n\n" if own_system else "") + tools_text + "<|im_end|>\n",
            own_system and first.get("loss") is True)
    elif own_system:
        add("<|im_start|>system\n")
        add(first["content"] + "<|im_end|>\n", first.get("loss") is True)
    # The template renders content given as parts as "" and never takes it for the query.
    contents = ["" if m.get("parts") else m["content"] for m in messages]
    query = next((i for i in range(last, -1, -1) if _is_query(messages[i], contents[i])
                  and not messages[i].get("parts")), last)
    for i, (m, content) in enumerate(zip(messages, contents)):
        role = m["role"]
        if role == "user" or (role == "system" and i > 0):
            add(f"<|im_start|>{role}\n")
            add(content + "<|im_end|>\n", _trained(m))
        elif role == "tool":
            _tool(m, i, messages, add, content)
        elif role == "assistant":
            body = content
            if thinking:
                reasoning = m.get("reasoning_content")
                if reasoning is None:
                    reasoning, body = _think_split(content) if "</think>" in content else ("", content)
                    content = body
                if i > query and (i == last or reasoning):
                    body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            for k, call in enumerate(m.get("tool_calls") or []):
                # The separator tests content before the lstrip above, as the template does.
                body += "\n" if k or content else ""
                args = call["arguments"]
                body += ('<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
                         + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
                         + "}\n</tool_call>")
            _reply(add, body + "<|im_end|>\n", _trained(m), prompt, bool(m.get("tool_calls")))


def _value(v, v38):
    """An argument value as each template writes it: Qwen3.8 strings as they are, else tojson; Qwen3.5
    objects and lists with tojson, else jinja's |string (Python's str: True, 1.5, None)."""
    if v38:
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def _qwen35(messages, tools, add, prompt, family, enable_thinking, preserve_thinking, effort, where):
    """Qwen3.5 and Qwen3.8 (v38: preserve_thinking, reasoning_effort, no </think> split of the content)."""
    v38, first, last = family == "qwen3.8", messages[0], len(messages) - 1
    contents = [m["content"].strip() for m in messages]  # every content is |trim-med
    system = contents[0] if first["role"] == "system" else None
    trained = system is not None and first.get("loss") is True
    note = EFFORTS[effort] if v38 and enable_thinking else ""  # the reasoning instruction
    if tools:
        text = (note + "\n\n" if note else "") + XML_TOOLS_HEAD
        text += "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + XML_TOOLS_TAIL
        add("<|im_start|>system\n")
        add(text + ("\n\n" + system if system else "") + "<|im_end|>\n", trained)
    elif system is not None or note:
        text = "\n\n".join(s for s in (note, system) if s) if v38 else system
        if text or not v38:  # Qwen3.5 writes a system turn even for an empty system message
            add("<|im_start|>system\n")
            add(text + "<|im_end|>\n", trained)
    query = next((i for i in range(last, -1, -1) if _is_query(messages[i], contents[i])), None)
    if query is None:
        raise DataError(f"{where} has no user query (a user message not wrapped in <tool_response>), which the "
                        f"{family} template refuses; add one or drop the row.")
    for i, (m, content) in enumerate(zip(messages, contents)):
        role = m["role"]
        if role == "system" and i > 0:
            raise DataError(f"{where}: message {i} is a system message after the first, which the {family} "
                            "template refuses; merge it into the first message or drop the row.")
        if role == "user":
            add("<|im_start|>user\n")
            add(content + "<|im_end|>\n", _trained(m))
        elif role == "tool":
            _tool(m, i, messages, add, content, header_first=False)
        elif role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning, content = _think_split(content) if "</think>" in content and not v38 else ("", content)
            body = content
            if i > query or (v38 and preserve_thinking):
                body = "<think>\n" + reasoning.strip() + "\n</think>\n\n" + content
            for k, call in enumerate(m.get("tool_calls") or []):
                body += ("\n" if k else "\n\n" if content.strip() else "") + f"<tool_call>\n<function={call['name']}>\n"
                args = call["arguments"]
                args = json.loads(args) if isinstance(args, str) else args
                if args is not None and not isinstance(args, dict):
                    raise DataError(f"{where}: message {i} tool call {k} has arguments that are not a JSON object, "
                                    f"which the {family} template needs (it writes one parameter per key); "
                                    "give an object.")
                for key, value in (args or {}).items():
                    body += f"<parameter={key}>\n{_value(value, v38)}\n</parameter>\n"
                body += "</function>\n</tool_call>"
            _reply(add, body + "<|im_end|>\n", _trained(m), prompt, bool(m.get("tool_calls")))


# --------------------------------------------------------------------------- parsing tool calls (the inverse)

def _tool_schemas(tools):
    """{name: parameters schema} of a row's tools, with or without the {type, function} wrapper."""
    fns = [t.get("function", t) if isinstance(t.get("function"), dict) else t for t in tools or []]
    return {f["name"]: f.get("parameters") or {} for f in fns if isinstance(f.get("name"), str)}


def _xml_value(text, kind):
    """A parameter's text back to a value: as written for a string parameter, else JSON, else (Qwen3.5 writes
    scalars with Python's str) True / False / None, else the text itself."""
    if kind == "string":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def parse_tool_calls(family, text, tools=None):
    """The tool calls of a reply written in family's format, the inverse of the render: a list with
    {name, arguments: dict} per <tool_call> block, None for a block that does not parse (an unclosed last
    block included). JSON in the block for qwen2.5 / qwen3 / qwen3-instruct-2507; the XML form
    <function=NAME><parameter=KEY>VALUE</parameter></function> for qwen3.5 / qwen3.8, whose values are
    read back by the tool's parameter types (tools: the row's) where the schema gives one."""
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    closed = text.count("</tool_call>")
    calls = []
    for k, block in enumerate(blocks):
        call = None
        if k < closed and family in ("qwen3.5", "qwen3.8"):
            fn = re.fullmatch(r"\s*<function=([^>\n]+)>\n(.*?)</function>\s*", block, flags=re.S)
            params = re.findall(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n?", fn.group(2), flags=re.S) if fn else []
            if fn and "".join(f"<parameter={key}>\n{v}\n</parameter>\n" for key, v in params) == fn.group(2):
                props = _tool_schemas(tools).get(fn.group(1), {}).get("properties") or {}
                call = {"name": fn.group(1), "arguments": {key: _xml_value(v, (props.get(key) or {}).get("type"))
                                                           for key, v in params}}
        elif k < closed:
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                obj = None
            if (isinstance(obj, dict) and set(obj) == {"name", "arguments"} and isinstance(obj["name"], str)
                    and isinstance(obj["arguments"], dict)):
                call = obj
        calls.append(call)
    return calls


JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "object": dict, "null": type(None)}


def check_arguments(args, schema):
    """Whether arguments satisfy a tool's parameters schema, as far as we check: every required key is
    there, no key is undeclared (when the schema lists properties), each value has the property's JSON
    type (or one of a list of types) and is one of its enum values. Nested schemas are not descended."""
    props = schema.get("properties")
    if any(k not in args for k in schema.get("required") or []) or (props and any(k not in props for k in args)):
        return False
    for key, value in args.items():
        prop = (props or {}).get(key) or {}
        kinds = prop.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        # bool is an int in Python, not in JSON
        if kinds and not any(isinstance(value, JSON_TYPES.get(t, object)) and not (isinstance(value, bool) and t in
                                                                                   ("integer", "number")) for t in kinds):
            return False
        if "enum" in prop and value not in prop["enum"]:
            return False
    return True
