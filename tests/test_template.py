"""data.render/encode against the official Qwen2.5 chat template and tokenizer.

The reference renderer below is the official chat_template.jinja run through jinja2 exactly as
transformers runs it; the reference mask is found by scanning token ids, independent of
data.py's character spans.
"""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import data
from conftest import REFERENCE

MODEL = REFERENCE / "qwen2.5-0.5b-instruct"
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="shared/reference is not present")


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def official():
    """transformers' apply_chat_template(tokenize=False, add_generation_prompt=False)."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    template = env.from_string((MODEL / "chat_template.jinja").read_text())
    return lambda messages, tools: template.render(messages=messages, tools=tools, add_generation_prompt=False)


def scan_mask(ids, tokenizer):
    """1 from after each `<|im_start|>assistant\\n` through the `<|im_end|>` and the token after it."""
    names = ("<|im_start|>", "assistant", "Ċ", "<|im_end|>")  # Ċ is byte-level BPE's "\n"
    start, assistant, nl, end = (tokenizer.token_to_id(t) for t in names)
    mask, inside, t = np.zeros(len(ids), np.uint8), False, 0
    while t < len(ids):
        if inside:
            mask[t] = 1
            if ids[t] == end:
                mask[t + 1:t + 2] = 1
                inside, t = False, t + 1
        elif list(ids[t:t + 3]) == [start, assistant, nl]:
            inside, t = True, t + 2
        t += 1
    return mask


def cases():
    path = REFERENCE / "chat_template_cases.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else []


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["name"])
def test_reference_cases(case, tokenizer, official):
    messages, tools = data._messages(case["messages"], "case"), data._tools(case["tools"], "case")
    text, spans = data.render(messages, tools)
    assert text == case["rendered"]
    assert official(case["messages"], case["tools"]) == case["rendered"]  # the reference renderer is right too
    ids, mask = data.encode(tokenizer, text, spans)
    assert ids.tolist() == case["input_ids"]
    assert mask.tolist() == case["loss_mask"]
    assert tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == case["trained_text"]


def official_input(row):
    """A raw parquet row made acceptable to the official template, without data.py's helpers."""
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    messages = []
    for m in row["messages"]:
        m = dict(m)
        calls = [dict(c, function=dict(c["function"])) for c in m.get("tool_calls") or []]
        for c in calls:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        m["tool_calls"] = calls or m.get("tool_calls")
        messages.append(m)
    return messages, tools


@pytest.mark.parametrize("name", ["glaive_toolcall_300.parquet", "retool_like_sample.parquet"])
def test_every_parquet_row_matches_official(name, tokenizer, official):
    path = REFERENCE / name
    raw = pq.read_table(path).to_pylist()
    rows = data.read_rows(path)
    assert len(rows) == len(raw)
    texts, expected_texts = [], []
    for (messages, tools), row in zip(rows, raw):
        text, spans = data.render(messages, tools)
        expected = official(*official_input(row))
        assert text == expected
        texts.append((text, spans))
        expected_texts.append(expected)
    encodings = tokenizer.encode_batch(expected_texts, add_special_tokens=False)
    for (text, spans), enc in zip(texts, encodings):
        ids, mask = data.encode(tokenizer, text, spans)
        assert ids.tolist() == enc.ids
        assert mask.tolist() == scan_mask(ids, tokenizer).tolist()
        assert mask.any()
