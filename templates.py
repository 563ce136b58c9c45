"""Chat templates: the official Qwen templates written out by hand, and which one a model dir ships.

No jinja at runtime. Each renderer writes the exact text the official template renders through
transformers (tojson = json.dumps(ensure_ascii=False)) and, from the same code, the character spans
that are trained; tests compare both with the official templates run through jinja2.

Trained spans: every character of an assistant turn after `<|im_start|>assistant\\n`, through
`<|im_end|>` and the `\\n` after it (a Qwen3 think block included); a message's `loss` field
(true/false) overrides that for its own turn. One exception: Qwen3 with enable_thinking=False does not
train the empty think block the template writes at the start of the last message, because in
non-thinking inference that block is part of the prompt.
"""
import hashlib
import json
from pathlib import Path

FAMILIES = ("qwen2.5", "qwen3", "qwen3-instruct-2507")
# SHA-256 of the official template texts, byte for byte (the .jinja file and the tokenizer_config.json
# string are the same text for each). Only digests are kept: recognition needs no copy of the text.
OFFICIAL = {
    "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f": "qwen2.5",  # Qwen2.5 Instruct
    "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8": "qwen3",  # Qwen3 0.6B-32B, current
    "64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326": "qwen3-instruct-2507",
}
CHOICES = "|".join(FAMILIES)  # as the flags spell them

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
              "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
EMPTY_THINK = "<think>\n\n</think>\n\n"
# transformers passes a message's reasoning to the template as reasoning_content, taken from the
# first of these keys that is not None.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(Exception):
    """The model's chat template is missing or not one we render; the message names the flag."""


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


# --------------------------------------------------------------------------- rendering

def render(family, messages, tools=None, *, enable_thinking=True, add_generation_prompt=False):
    """(text, spans): the official template's text for family, and the trained [start, end) char spans.

    messages are dicts as data.py normalises them ({role, content, loss?, reasoning_content?,
    tool_calls: [{name, arguments}]?}); OpenAI-style tool calls ({function: {...}}) are accepted too.
    """
    if family not in FAMILIES:
        raise TemplateError(f"chat template {family!r} is not one of {', '.join(FAMILIES)}.")
    parts, spans, pos = [], [], 0

    def add(s, trained=False):
        nonlocal pos
        if trained and s:
            spans.append((pos, pos + len(s)))
        parts.append(s)
        pos += len(s)

    if family == "qwen2.5":
        _qwen25(messages, tools, add)
    else:
        _qwen3(messages, tools, add, family == "qwen3", enable_thinking)
    if add_generation_prompt:
        add("<|im_start|>assistant\n")
        if family == "qwen3" and not enable_thinking:
            add(EMPTY_THINK)  # the non-thinking switch: the model starts after an empty think block
    return "".join(parts), spans


def _trained(m):
    return m["loss"] if m.get("loss") is not None else m["role"] == "assistant"


def _function(call):
    # With or without the OpenAI {type, function} wrapper, as the templates accept both.
    return call["function"] if isinstance(call.get("function"), dict) else call


def _tool(m, i, messages, add):
    """A tool result: consecutive ones share one user turn, one <tool_response> block each."""
    if i == 0 or messages[i - 1]["role"] != "tool":
        add("<|im_start|>user")
    add("\n")
    content = m["content"] if isinstance(m.get("content"), str) else ""
    add("<tool_response>\n" + content + "\n</tool_response>", _trained(m))
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        add("<|im_end|>\n", _trained(m))


def _qwen25(messages, tools, add):
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
            _tool(m, i, messages, add)
            continue
        if m.get("tool_calls"):
            calls = ""
            for c in map(_function, m["tool_calls"]):
                # The template applies tojson to the arguments; a JSON string (as datasets store them)
                # is decoded first, else it would be encoded a second time ("{\"code\": ...}").
                args = c.get("arguments")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    pass  # not JSON: encoded as a string, as the template does
                calls += ('\n<tool_call>\n{"name": "' + c["name"] + '", "arguments": '
                          + json.dumps(args, ensure_ascii=False) + "}\n</tool_call>")
            # The template writes "\n" + content only for non-empty content; either way the text
            # after the role starts with "\n", which is the header's newline below.
            body = ((("\n" + body) if body else "") + calls)[1:]
        add(f"<|im_start|>{role}\n")
        add(body + "<|im_end|>\n", _trained(m))


def _qwen3(messages, tools, add, thinking, enable_thinking):
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
    # The last real user query: string content not wrapped in <tool_response>; reasoning is shown
    # only after it (history turns carry only their answers).
    query = next((i for i in range(last, -1, -1) if messages[i]["role"] == "user"
                  and isinstance(messages[i].get("content"), str)
                  and not (messages[i]["content"].startswith("<tool_response>")
                           and messages[i]["content"].endswith("</tool_response>"))), last)
    for i, m in enumerate(messages):
        role = m["role"]
        content = m["content"] if isinstance(m.get("content"), str) else ""
        if role == "user" or (role == "system" and i > 0):
            add(f"<|im_start|>{role}\n")
            add(content + "<|im_end|>\n", _trained(m))
        elif role == "tool":
            _tool(m, i, messages, add)
        elif role == "assistant":
            add("<|im_start|>assistant\n")
            body = content
            if thinking:
                reasoning = next((m[k] for k in REASONING_KEYS if m.get(k) is not None), None)
                if not isinstance(reasoning, str):
                    # No reasoning field: the text inside <think>...</think> in the content, cut out of it.
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                    body = content
                if i > query and (i == last or reasoning):
                    block = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                    untrained = i == last and block == EMPTY_THINK and not enable_thinking
                    add(block, _trained(m) and not untrained)
                    body = content.lstrip("\n")
            for k, call in enumerate(map(_function, m.get("tool_calls") or [])):
                # The separator tests content before the lstrip above, as the template does.
                body += "\n" if k or content else ""
                args = call.get("arguments")
                body += ('<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
                         + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
                         + "}\n</tool_call>")
            add(body + "<|im_end|>\n", _trained(m))
