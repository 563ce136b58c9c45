"""templates.render + data.encode against the official Qwen chat templates and tokenizers.

The reference renderer below is each official chat_template.jinja run through jinja2 the way
transformers 5.24's apply_chat_template runs it (its environment, globals and message preparation);
it is checked against transformers' own output in the reference cases. Qwen2.5's reference mask is
found by scanning token ids, Qwen3's comes from the reference cases: both independent of the
character spans templates.py writes.
"""
import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import model as M
import templates
from conftest import REFERENCE, ROOT

MODEL = REFERENCE / "qwen2.5-0.5b-instruct"
QWEN3, INSTRUCT = REFERENCE / "qwen3", REFERENCE / "qwen3-instruct-2507"
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="shared/reference is not present")
QWEN35 = REFERENCE / "qwen3.5"
TEMPLATE = {"qwen2.5": MODEL, "qwen3": QWEN3, "qwen3-instruct-2507": INSTRUCT,
            "qwen3.5": QWEN35 / "qwen3.5_chat_template.jinja", "qwen3.8": QWEN35 / "qwen3.8_chat_template.jinja"}


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return data.load_tokenizer(QWEN3)


def jinja_template(path):
    """apply_chat_template(tokenize=False, ...) of transformers 5.24 for the template at path (a model
    dir's chat_template.jinja, or a template file)."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=jinja2.utils.Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    path = Path(path) if Path(path).is_file() else Path(path) / "chat_template.jinja"
    template = env.from_string(path.read_text(encoding="utf-8"))

    def render(messages, tools=None, add_generation_prompt=False, **kwargs):
        chat = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}  # transformers drops None-valued keys
            # ... and passes the first of reasoning_content / thinking / reasoning as reasoning_content.
            r = next((m[k] for k in templates.REASONING_KEYS if m.get(k) is not None), None)
            chat.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
        return template.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    return render


@pytest.fixture(scope="module")
def official():
    return jinja_template(MODEL)


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
    messages, tools = templates.normalise(case["messages"], "case"), templates.normalise_tools(case["tools"], "case")
    text, spans = templates.render("qwen2.5", messages, tools)
    assert text == case["rendered"]
    assert official(case["messages"], case["tools"]) == case["rendered"]  # the reference renderer is right too
    ids, mask = data.encode(tokenizer, text, spans)
    assert ids.tolist() == case["input_ids"]
    assert mask.tolist() == case["loss_mask"]
    assert tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == case["trained_text"]


def official_input(row, decode_arguments=True):
    """A raw parquet row made acceptable to the official template, without data.py's helpers."""
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    messages = []
    for m in row["messages"]:
        m = dict(m)
        calls = [dict(c, function=dict(c["function"])) for c in m.get("tool_calls") or []]
        for c in calls:
            if decode_arguments and isinstance(c["function"]["arguments"], str):
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
        text, spans = templates.render("qwen2.5", messages, tools)
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


# --------------------------------------------------------------------------- Qwen3

def qwen3_cases():
    path = QWEN3 / "chat_template_cases.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else []


@pytest.mark.parametrize("case", qwen3_cases(), ids=lambda c: c["id"])
def test_qwen3_reference_cases(case, qwen3_tokenizer):
    kwargs = case["kwargs"]
    assert jinja_template(QWEN3)(case["messages"], case["tools"], **kwargs) == case["text"]  # the reference is right
    opts = dict(enable_thinking=kwargs.get("enable_thinking", True), add_generation_prompt=kwargs["add_generation_prompt"])
    # OpenAI-style input through the one message contract (list content included: rendered as "")
    messages, tools = templates.normalise(case["messages"]), templates.normalise_tools(case["tools"])
    text, spans = templates.render("qwen3", messages, tools, **opts)
    assert text == case["text"]
    ids, mask = data.encode(qwen3_tokenizer, text, spans)
    assert ids.tolist() == case["input_ids"]
    # Our rule trains a token when ANY character it covers is trained; the cases' masks need ALL of
    # them. The two differ exactly on the tokens that straddle a span start (one, in case i1).
    expected = np.array(case["loss_mask_content_through_im_end_and_newline"])
    straddling = [t["token_index"] for t in case["straddling_tokens"]]
    assert np.flatnonzero(mask != expected).tolist() == straddling
    assert all(mask[t] == 1 for t in straddling)
    assert (case["id"] == "i1_content_leading_newline") == bool(straddling)


def empty_last_block_cases():
    return [c for c in qwen3_cases() if not c["kwargs"]["add_generation_prompt"]
            and c["messages"][-1]["role"] == "assistant" and c["assistant_turns"][-1]["think_block"] == "empty"]


@pytest.mark.parametrize("case", empty_last_block_cases(), ids=lambda c: c["id"])
def test_qwen3_enable_thinking_false_leaves_the_empty_block_untrained(case, qwen3_tokenizer):
    messages = templates.normalise(case["messages"])
    text, spans = templates.render("qwen3", messages, case["tools"], enable_thinking=False)
    assert text == case["text"] == jinja_template(QWEN3)(case["messages"], case["tools"], enable_thinking=False)
    ids, mask = data.encode(qwen3_tokenizer, text, spans)
    _, on = data.encode(qwen3_tokenizer, *templates.render("qwen3", messages, case["tools"]))
    # Exactly the four tokens of <think>\n\n</think>\n\n that open the last turn become untrained.
    first = case["assistant_turns"][-1]["token_index_range_through_newline"][0]
    block = [qwen3_tokenizer.token_to_id(t) for t in ("<think>", "ĊĊ", "</think>", "ĊĊ")]
    assert ids[first:first + 4].tolist() == block
    assert np.flatnonzero(on != mask).tolist() == [first, first + 1, first + 2, first + 3]
    assert on[first:first + 4].tolist() == [1, 1, 1, 1] and mask[first + 4] == 1


@pytest.mark.parametrize("name", ["glaive_toolcall_300.parquet", "retool_like_sample.parquet"])
def test_qwen3_every_parquet_row_matches_official(name, qwen3_tokenizer):
    # Real rows, JSON-string arguments included: Qwen3 writes those verbatim.
    official3 = jinja_template(QWEN3)
    raw = pq.read_table(REFERENCE / name).to_pylist()
    for (messages, tools), row in zip(data.read_rows(REFERENCE / name), raw):
        text, spans = templates.render("qwen3", messages, tools)
        assert text == official3(*official_input(row, decode_arguments=False))
    assert data.encode(qwen3_tokenizer, text, spans)[1].any()


# --------------------------------------------------------------------------- Qwen3-2507 Instruct

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


QWEN3_EDGES = {
    # content "\n" with a think block: the block's content is lstripped, yet the newline before the
    # first <tool_call> is decided on the content before that lstrip.
    "newline_content_calls": [{"role": "user", "content": "go"},
                              {"role": "assistant", "content": "\n", "reasoning_content": "plan",
                               "tool_calls": [{"name": "f", "arguments": '{"a": "é"}'}, {"name": "g", "arguments": {}}]},
                              {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "\n\ndone"}],
    "newline_only_reasoning_last": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "reasoning": "\n\n"}],
    "think_tags_history_and_loss": [{"role": "system", "content": "S", "loss": True},
                                    {"role": "user", "content": "q1", "loss": True},
                                    {"role": "assistant", "content": "<think>old</think>a1"},
                                    {"role": "user", "content": "<tool_response>x</tool_response>"},
                                    {"role": "assistant", "content": "x</think>\n\na2", "loss": False},
                                    {"role": "tool", "content": "t", "loss": True},
                                    {"role": "assistant", "content": "<think>\n\nnew\n</think>a3"}],
}


@pytest.mark.parametrize("name", list(QWEN3_EDGES))
@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_qwen3_edge_cases_match_official(name, tools, qwen3_tokenizer):
    messages = QWEN3_EDGES[name]
    text, spans = templates.render("qwen3", templates.normalise(messages, "x"), tools)
    assert text == jinja_template(QWEN3)(messages, tools)
    # Each loss override trains exactly its own turn's text, as for Qwen2.5.
    trained = "".join(text[a:b] for a, b in spans)
    if name == "think_tags_history_and_loss":
        assert trained.startswith("S" if tools is None else "S\n\n# Tools")
        assert "q1<|im_end|>\n" in trained and "a1<|im_end|>\n" in trained and "a2" not in trained
        assert "<tool_response>\nt\n</tool_response><|im_end|>\n" in trained
        assert trained.endswith("<think>\nnew\n</think>\n\na3<|im_end|>\n")
    assert data.encode(qwen3_tokenizer, text, spans)[1].any()


INSTRUCT_CASES = {
    "plain": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], None),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hi."}], None),
    "parallel_calls_and_responses": (
        [{"role": "user", "content": "Weather in Paris and time in Tokyo?"},
         {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"}),
                                                             call("get_time", {"tz": "Asia/Tokyo"})]},
         {"role": "tool", "content": "18°C"}, {"role": "tool", "content": "09:00"},
         {"role": "assistant", "content": "18°C in Paris; 09:00 in Tokyo."}], [WEATHER, TIME]),
    "system_tools_text_and_calls": (
        [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Paris?"},
         {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", '{"city":"Paris"}')]},
         {"role": "tool", "content": "rain"},
         {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Lyon"})]},
         {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Rain in Paris, sun in Lyon."}],
        [WEATHER]),
    "unicode_and_mid_system": (
        [{"role": "user", "content": "São Paulo — 天気は？ 🌧"}, {"role": "assistant", "content": "雨です。"},
         {"role": "system", "content": "Answer in English now."}, {"role": "user", "content": "Again?"},
         {"role": "assistant", "content": "Rain, \"heavy\"."}], [WEATHER]),
    "reasoning_dropped": (
        [{"role": "user", "content": "2+3?"},
         {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
         {"role": "user", "content": "and 4+4?"},
         {"role": "assistant", "content": "8", "thinking": "4 plus 4."}], None),
    "think_in_content_kept": (
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n2"}], None),
}


@pytest.mark.parametrize("name", list(INSTRUCT_CASES))
def test_instruct_2507_matches_official(name, qwen3_tokenizer):
    messages, tools = INSTRUCT_CASES[name]
    expected = jinja_template(INSTRUCT)(messages, tools)
    text, spans = templates.render("qwen3-instruct-2507", templates.normalise(messages, "case"), tools)
    assert text == expected
    ids, mask = data.encode(qwen3_tokenizer, text, spans)
    assert ids.tolist() == qwen3_tokenizer.encode(expected, add_special_tokens=False).ids
    assert mask.tolist() == scan_mask(ids, qwen3_tokenizer).tolist()
    assert "2 plus 3" not in text and "4 plus 4" not in text  # this template writes no reasoning


# --------------------------------------------------------------------------- generation prompt

PROMPTS = {
    "user_last": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "r"},
                  {"role": "user", "content": "And now?"}],
    "tool_last": [{"role": "system", "content": "S"}, {"role": "user", "content": "Paris?"},
                  {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
                   "tool_calls": [call("get_weather", {"city": "Paris"})]},
                  {"role": "tool", "content": "rain"}],
}


@pytest.mark.parametrize("family", templates.FAMILIES)
@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_matches_official(family, name, thinking):
    messages = PROMPTS[name]
    kwargs = {} if thinking else {"enable_thinking": False}
    expected = jinja_template(TEMPLATE[family])(messages, [WEATHER], add_generation_prompt=True, **kwargs)
    text, spans = templates.render(family, templates.normalise(messages, "x"), [WEATHER], enable_thinking=thinking,
                                   add_generation_prompt=True)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n" + templates.generation_prompt(family, thinking))
    assert all(b <= text.rindex("<|im_start|>assistant\n") for _, b in spans)  # the prompt is never trained


# --------------------------------------------------------------------------- recognition

def model_dir(tmp_path, name, jinja=None, config=None):
    d = tmp_path / name
    d.mkdir()
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def official_text(family):
    path = TEMPLATE[family]
    return (path if path.is_file() else path / "chat_template.jinja").read_text(encoding="utf-8")


def test_official_templates_are_recognised(tmp_path):
    configs = {"qwen3.5": {"chat_template": official_text("qwen3.5")}, "qwen3.8": QWEN35 / "qwen3.8-27b"}
    for family in templates.FAMILIES:
        config = configs.get(family, TEMPLATE[family])
        config = json.loads((config / "tokenizer_config.json").read_text()) if isinstance(config, Path) else config
        assert config["chat_template"] == official_text(family)  # one text in both places: one digest
        assert hashlib.sha256(official_text(family).encode()).hexdigest() in templates.OFFICIAL
        assert templates.detect(model_dir(tmp_path, f"{family}-config", config=config)) == family
        assert templates.detect(model_dir(tmp_path, f"{family}-jinja", jinja=official_text(family))) == family
        named = {"chat_template": [{"name": "tool_use", "template": "x"},
                                   {"name": "default", "template": official_text(family)}]}
        assert templates.detect(model_dir(tmp_path, f"{family}-named", config=named)) == family
    # transformers prefers chat_template.jinja to the tokenizer_config.json entry.
    both = model_dir(tmp_path, "both", jinja=official_text("qwen3"), config={"chat_template": official_text("qwen2.5")})
    assert templates.detect(both) == "qwen3"


def test_unknown_or_missing_template_is_refused(tmp_path):
    edited = model_dir(tmp_path, "edited", jinja=official_text("qwen3") + "\n")  # not the exact text
    missing = model_dir(tmp_path, "missing", config={"eos_token": "<|im_end|>"})
    for d, what in ((edited, "has a chat template that is not an official one"), (missing, "has no chat template")):
        with pytest.raises(templates.TemplateError) as e:
            templates.detect(d)
        msg = str(e.value)
        assert msg.startswith(f"{d} {what}; ") and msg.endswith(".") and ". " not in msg  # one sentence
        assert "qwen2.5, qwen3, qwen3-instruct-2507, qwen3.5, qwen3.8" in msg
        assert "data.chat_template=qwen2.5|qwen3|qwen3-instruct-2507|qwen3.5|qwen3.8" in msg
        assert templates.detect(d, "qwen3-instruct-2507") == "qwen3-instruct-2507"  # the flag forces one
    with pytest.raises(templates.TemplateError, match=r"data\.chat_template='qwen4' is not one of auto, "):
        templates.detect(missing, "qwen4")
    (missing / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(templates.TemplateError, match=r"tokenizer_config\.json is not a JSON object; restore"):
        templates.detect(missing)


def test_train_refuses_a_model_without_template_in_one_line(tmp_path):
    cfg = {**json.loads((MODEL / "config.json").read_text()), "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    M.save_pretrained(M.build_random(cfg), tmp_path / "m")
    shutil.copyfile(MODEL / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    args = [f"data.train_files={REFERENCE / 'retool_like_sample.parquet'}", f"model.partial_pretrain={tmp_path / 'm'}",
            "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4", "trainer.device=cpu",
            f"trainer.default_local_dir={tmp_path / 'out'}"]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'm'} has no chat template; we render the qwen2.5, "
                                             "qwen3, qwen3-instruct-2507, qwen3.5, qwen3.8 templates by hand, so pass "
                                             f"data.chat_template={templates.CHOICES} to choose the "
                                             "one this model was trained with."]


# --------------------------------------------------------------------------- per-row enable_thinking

def test_enable_thinking_column(tmp_path, qwen3_tokenizer):
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": chat, "enable_thinking": v} for v in (True, False, None)]), path)
    pq.write_table(pa.Table.from_pylist([{"messages": chat}]), tmp_path / "no_column.parquet")
    on = data.encode(qwen3_tokenizer, *templates.render("qwen3", templates.normalise(chat, "x")))
    off = data.encode(qwen3_tokenizer, *templates.render("qwen3", templates.normalise(chat, "x"), enable_thinking=False))
    assert on[1].sum() == off[1].sum() + 4  # the four tokens of the empty think block
    samples = data.build_samples([path, tmp_path / "no_column.parquet"], qwen3_tokenizer, 100, chat_template="qwen3")
    for (ids, mask, *_), (want_ids, want_mask) in zip(samples, [on, off, on, on]):  # true, false, null, missing
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
    # Another key name reads another column; a key no file has means true for every row.
    pq.write_table(pa.Table.from_pylist([{"messages": chat, "think": False}]), tmp_path / "k.parquet")
    [(_, mask, *_)] = data.build_samples(tmp_path / "k.parquet", qwen3_tokenizer, 100, chat_template="qwen3",
                                     enable_thinking_key="think")
    assert mask.tolist() == off[1].tolist()
    [(_, mask, *_)] = data.build_samples(tmp_path / "k.parquet", qwen3_tokenizer, 100, chat_template="qwen3")
    assert mask.tolist() == on[1].tolist()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": chat, "enable_thinking": "no"}]), bad)
    with pytest.raises(data.DataError, match=r"^row 0 of .*bad\.parquet: column 'enable_thinking' holds 'no'; it "
                                             r"must be true, false or null \(check data\.multiturn\.enable_thinking_key\)\.$"):
        data.build_samples(bad, qwen3_tokenizer, 100, chat_template="qwen3")


def test_reasoning_fields_and_the_unrendered_warning(tmp_path, qwen3_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning_content": None, "thinking": "t"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning_content": "", "thinking": "t"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning_content": "r", "thinking": None}]}]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    # As transformers: the first of reasoning_content / thinking / reasoning that is not None.
    assert [m[1].get("reasoning_content") for m, _ in data.read_rows(path)] == ["t", "", "r"]
    for family, warned in (("qwen2.5", 2), ("qwen3-instruct-2507", 2), ("qwen3", 0)):
        lines = []
        data.build_samples(path, qwen3_tokenizer, 100, chat_template=family, cache_dir=tmp_path / family,
                           log=lines.append)
        data.build_samples(path, qwen3_tokenizer, 100, chat_template=family, cache_dir=tmp_path / family,
                           log=lines.append)  # from the cache: the same warning
        expected = [f"warning: 2 rows of {path} carry reasoning (reasoning_content, thinking or reasoning) that "
                    f"the {family} template does not render; that text is not trained."] * 2
        assert lines == (expected if warned else [])
    # The family and the enable_thinking key are part of the cache key.
    data.build_samples(path, qwen3_tokenizer, 100, chat_template="qwen3", cache_dir=tmp_path / "qwen2.5")
    data.build_samples(path, qwen3_tokenizer, 100, chat_template="qwen3", cache_dir=tmp_path / "qwen2.5",
                       enable_thinking_key="think")
    assert len(list((tmp_path / "qwen2.5").glob("*.npz"))) == 3
    with pytest.raises(data.DataError, match=r"message 1 has a reasoning_content of type int; reasoning must be"):
        templates.normalise([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 1}], "x")


# --------------------------------------------------------------------------- Qwen3.5 / Qwen3.8

# Every JSON value type as an argument, both as an object and as the JSON string datasets store.
# (A null argument stays only in a JSON string: in an object it may be parquet's struct unification, so pruned.)
VALUES = {"city": "São Paulo", "days": 3, "ratio": 1.5, "big": 1e20, "metric": True, "off": False,
          "tags": ["a", 1, None], "opts": {"deep": {"x": [1.0, "é"]}}, "empty": "", "multi": "line 1\nline 2"}


def agentic(args):
    """A system prompt, history with reasoning both ways, then an agentic run after the last query."""
    return [{"role": "system", "content": "  You are a weather bot.\n"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nold plan\n</think>\n\nHello!", "loss": False},
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": "Let me check.", "reasoning_content": "\nNeed the tool.\n",
             "tool_calls": [call("get_weather", args), call("get_time", {})]},
            {"role": "tool", "content": " rain "}, {"role": "tool", "content": "09:00"},
            {"role": "user", "content": "<tool_response>\nsun later\n</tool_response>"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lyon"}}]},
            {"role": "tool", "content": "sun"},
            {"role": "assistant", "content": "<think>\nSummarise.\n</think>\n\n  Rain in Paris, sun in Lyon. "}]


QWEN35_CASES = {
    "agentic_object_args": (agentic(VALUES), [WEATHER, TIME]),
    "agentic_json_string_args": (agentic(json.dumps({**VALUES, "none": None})), [WEATHER, TIME]),
    "no_tools_no_system": ([{"role": "user", "content": "2+3?"},
                            {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3."},
                            {"role": "user", "content": "and 4+4?"}, {"role": "assistant", "content": "8"}], None),
    "empty_system": ([{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a</think>b"}], None),
}
QWEN35_KWARGS = {"qwen3.5": [{}, {"enable_thinking": True}, {"enable_thinking": False}],
                 "qwen3.8": [{}, {"enable_thinking": False}, {"preserve_thinking": False},
                             {"reasoning_effort": "low"}, {"reasoning_effort": "medium", "preserve_thinking": True}]}


def official_messages(messages):
    """What the official template is given: JSON-string arguments decoded (it needs an object)."""
    out = []
    for m in messages:
        calls = [dict(c, function=dict(c["function"])) if "function" in c else dict(c) for c in m.get("tool_calls", [])]
        for c in calls:
            fn = c.get("function", c)
            fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
        out.append({**m, "tool_calls": calls} if calls else m)
    return out


def rule_mask(text, ids_offsets, prompt):
    """The mask rule written from the text alone: each `<|im_start|>assistant\\n`... `<|im_end|>\\n` turn,
    less a leading generation prompt; a token is trained when any character it covers is."""
    chars, header, end = np.zeros(len(text) + 1, bool), "<|im_start|>assistant\n", "<|im_end|>\n"
    start = text.find(header)
    while start >= 0:
        a = start + len(header)
        a += len(prompt) if prompt and text.startswith(prompt, a) else 0
        b = text.find(end, a)
        if b < 0:  # the generation prompt at the end
            break
        chars[a:b + len(end)] = True
        start = text.find(header, b)
    return np.array([chars[s:max(e, s + 1)].any() for s, e in ids_offsets], np.uint8)


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3.8"])
@pytest.mark.parametrize("name", list(QWEN35_CASES))
def test_qwen35_family_matches_official(family, name, qwen3_tokenizer):
    messages, tools = QWEN35_CASES[name]
    official = jinja_template(TEMPLATE[family])
    normal = templates.normalise(messages)
    for kwargs in QWEN35_KWARGS[family]:
        for gen in (False, True):
            given = messages[:-1] if gen else messages  # a prompt ends before the last reply
            expected = official(official_messages(given), tools, add_generation_prompt=gen, **kwargs)
            text, spans = templates.render(family, normal[:len(given)], tools, add_generation_prompt=gen, **kwargs)
            assert text == expected, kwargs
            enc = qwen3_tokenizer.encode(text, add_special_tokens=False)
            ids, mask = data.encode(qwen3_tokenizer, text, spans)
            # the "Hello!" turn has loss false; every other assistant turn follows the rule
            want = rule_mask(text, enc.offsets, templates.generation_prompt(family, kwargs.get("enable_thinking", True)))
            if "Hello!" in text:
                a = text.rindex("<|im_start|>assistant\n", 0, text.index("Hello!")) + 22
                b = text.index("<|im_end|>\n", a) + 11
                want[[t for t, (s, _) in enumerate(enc.offsets) if a <= s < b]] = 0
            assert mask.tolist() == want.tolist(), kwargs
    if name == "agentic_object_args":  # values written as each template writes them
        assert ("<parameter=metric>\nTrue\n" in text) == (family == "qwen3.5")
        assert ("<parameter=metric>\ntrue\n" in text) == (family == "qwen3.8")
        assert "<parameter=ratio>\n1.5\n" in text and '<parameter=tags>\n["a", 1, null]\n' in text


def test_qwen35_mask_rule_leaves_the_prompt_untrained(qwen3_tokenizer):
    chat = templates.normalise([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    for thinking, prompt in ((True, "<think>\n"), (False, "<think>\n\n</think>\n\n")):
        text, spans = templates.render("qwen3.5", chat, enable_thinking=thinking)
        trained = "".join(text[a:b] for a, b in spans)
        assert text.endswith("<|im_start|>assistant\n" + prompt + ("\n</think>\n\n" if thinking else "") + "4<|im_end|>\n")
        assert trained == text[text.rindex("<|im_start|>assistant\n") + 22 + len(prompt):]


ROW_ERRORS = {
    "late_system": ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                     {"role": "assistant", "content": "a"}], "message 1 is a system message after the first"),
    "no_query": ([{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "a"}],
                 "has no user query"),
    "image": ([{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "q"}]},
               {"role": "assistant", "content": "a"}], "message 0 content part 0 is an image or video"),
    "list_args": ([{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [call("f", "[1, 2]")]}],
                  "message 1 tool call 0 has arguments that are not a JSON object"),
}


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3.8"])
@pytest.mark.parametrize("name", list(ROW_ERRORS))
def test_rows_the_official_template_refuses_are_one_sentence(family, name, tmp_path, qwen3_tokenizer):
    jinja2 = pytest.importorskip("jinja2")
    messages, message = ROW_ERRORS[name]
    if name != "image":  # the official template refuses these too (an image it renders: we train text only)
        with pytest.raises((jinja2.exceptions.TemplateError, TypeError)):
            jinja_template(TEMPLATE[family])(official_messages(messages))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}]})
                    + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(data.DataError) as e:
        data.build_samples(path, qwen3_tokenizer, None, chat_template=family)
    msg = str(e.value)
    assert msg.startswith(f"row 1 of {path}") and message in msg and msg.endswith(".") and ". " not in msg


def test_template_kwargs(tmp_path, qwen3_tokenizer):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": chat, "enable_thinking": v} for v in (True, False, None)]), path)

    def sample(thinking, **kw):
        return data.encode(qwen3_tokenizer, *templates.render("qwen3.8", templates.normalise(chat),
                                                             enable_thinking=thinking, **kw))[1].tolist()
    for kwargs, default, null in (({}, None, True), ({"preserve_thinking": False}, False, False),
                                  ({"enable_thinking": False, "reasoning_effort": "low"}, None, False)):
        got = data.build_samples(path, qwen3_tokenizer, None, chat_template="qwen3.8", template_kwargs=kwargs,
                                 enable_thinking_default=default, cache_dir=tmp_path / "c")
        fixed = {k: v for k, v in kwargs.items() if k != "enable_thinking"}
        assert [m.tolist() for _, m, *_ in got] == [sample(True, **fixed), sample(False, **fixed), sample(null, **fixed)]
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3  # the kwargs are part of the cache key
    for family, kwargs, message in (("qwen3.5", {"preserve_thinking": True}, "preserve_thinking is not read by the qwen3.5"),
                                    ("qwen2.5", {"enable_thinking": True}, "enable_thinking is not read by the qwen2.5"),
                                    ("qwen3.8", {"reasoning_effort": "max"}, "reasoning_effort='max' is not one of xhigh"),
                                    ("qwen3", {"enable_thinking": "no"}, "enable_thinking='no' is not true or false")):
        with pytest.raises(templates.TemplateError, match=r"^data\.apply_chat_template_kwargs\." + message):
            data.build_samples(path, qwen3_tokenizer, None, chat_template=family, template_kwargs=kwargs)


def test_qwen35_dir_with_the_qwen3_tokenizer_and_inspect(tmp_path, capsys):
    d = tmp_path / "qwen3.5-tiny"  # no Qwen3.5 tokenizer.json exists here: the Qwen3 one drives the same code
    d.mkdir()
    shutil.copyfile(QWEN3 / "tokenizer.json", d / "tokenizer.json")
    (d / "chat_template.jinja").write_text(official_text("qwen3.5"), encoding="utf-8")
    assert templates.detect(d) == "qwen3.5"
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"messages": agentic(VALUES)}) + "\n")
    data.main(["inspect", str(rows), "--tokenizer", str(d), "--apply_chat_template_kwargs", '{"enable_thinking": false}'])
    out = capsys.readouterr().out
    # the trainer's own samples, shown: the empty think block opening each turn is the prompt
    [(ids, mask, *_)] = data.build_samples(rows, data.load_tokenizer(d), None, chat_template="qwen3.5",
                                       template_kwargs={"enable_thinking": False})
    assert f"{len(ids)} tokens, {int(mask.sum())} trained" in out
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n[[<tool_call>\n<function=get_weather>" in out
    assert "<|im_start|>assistant\n[[<think>\nNeed the tool.\n</think>\n\nLet me check." in out
    with pytest.raises(SystemExit):
        data.main(["inspect", str(rows), "--tokenizer", str(d), "--apply_chat_template_kwargs", '{"effort": 1}'])
    assert "error: --apply_chat_template_kwargs effort is not read by the qwen3.5 template" in capsys.readouterr().err
    # A Qwen3.6 dir ships a template that is not byte-exact to one we render: refused by the usual sentence.
    (d / "chat_template.jinja").write_text(official_text("qwen3.5").replace("{%- if", "{%- if", 1) + " ", encoding="utf-8")
    with pytest.raises(templates.TemplateError, match="not an official one"):
        templates.detect(d)
