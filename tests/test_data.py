"""data.py: reading, normalisation, masks, truncation, errors, cache, batches, packing, inspect CLI."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import templates
from conftest import REFERENCE, ROOT

MODEL = REFERENCE / "qwen2.5-0.5b-instruct"
needs_tokenizer = pytest.mark.skipif(not MODEL.is_dir(), reason="shared/reference is not present")

def tool(name, arg):
    schema = {"type": "object", "properties": {arg: {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "description": f"{name}.", "parameters": schema}}


TOOL = tool("calc", "expr")


def chat(user="What is 2+2?", answer="4", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def write(tmp_path, rows, name="d.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    if not MODEL.is_dir():
        pytest.skip("shared/reference is not present")
    return data.load_tokenizer(MODEL)


def trained_text(tokenizer, messages, tools=None):
    ids, mask = data.encode(tokenizer, *templates.render("qwen2.5", messages, tools))
    return tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)


# --- normalisation and rendering ------------------------------------------------------------------

def test_struct_unification_nulls_are_pruned(tmp_path):
    # Two rows with different tool schemas / arguments: parquet adds the other row's keys as null.
    other = tool("search", "query")
    call = lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}}
    rows = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "", "tool_calls": [call("calc", {"expr": "1+1"})]}],
             "tools": [TOOL]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": None,
                           "tool_calls": [call("search", {"query": "x"})]}],
             "tools": [other]}]
    raw = pq.read_table(write(tmp_path, rows)).to_pylist()
    assert raw[0]["tools"][0]["function"]["parameters"]["properties"]["query"] is None  # the problem exists
    (m0, t0), (m1, t1) = data.read_rows(tmp_path / "d.parquet")
    assert t0 == [TOOL] and t1 == [other]
    assert m0[1]["tool_calls"] == [{"name": "calc", "arguments": {"expr": "1+1"}}]
    assert m1[1]["tool_calls"] == [{"name": "search", "arguments": {"query": "x"}}] and m1[1]["content"] == ""
    assert m0[0].get("tool_calls") is None  # tool_calls: null on a user message is tolerated


def test_json_string_nulls_are_kept(tmp_path):
    # JSON strings never went through struct unification, so their nulls are the user's own.
    tools = json.dumps([{"name": "f", "parameters": {"default": None}}])
    args = json.dumps({"x": None})
    calls = [{"type": "function", "function": {"name": "f", "arguments": args}}]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    rows = [{"messages": messages, "tools": tools}]
    [(messages, tools)] = data.read_rows(write(tmp_path, rows))
    assert tools == [{"name": "f", "parameters": {"default": None}}]
    text, _ = templates.render("qwen2.5", messages, tools)
    assert '{"name": "f", "arguments": {"x": null}}' in text and '"default": null' in text


def test_single_turn_with_dict_keys(tmp_path):
    rows = [{"extra": {"q": {"text": "Hi?"}}, "answer": "Hello."}]
    path = write(tmp_path, rows)
    [(messages, tools)] = data.read_rows(path, multiturn=False, prompt_key="extra",
                                         prompt_dict_keys=["q", "text"])
    assert tools is None
    assert [(m["role"], m["content"]) for m in messages] == [("user", "Hi?"), ("assistant", "Hello.")]
    [(messages, _)] = data.read_rows(path, multiturn=False, prompt_key="extra", prompt_dict_keys=["q", "text"],
                                     response_key="extra", response_dict_keys=["q", "text"])
    assert [m["content"] for m in messages] == ["Hi?", "Hi?"]  # one struct column may feed both sides
    with pytest.raises(data.DataError, match=r"row 0 of .*d\.parquet: column 'extra' has no field 'nope'; "
                                             r"check data\.prompt_dict_keys\."):
        data.read_rows(path, multiturn=False, prompt_key="extra", prompt_dict_keys=["nope"])


@needs_tokenizer
def test_loss_override(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1", "loss": True},
                {"role": "assistant", "content": "A1", "loss": False}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}, {"role": "tool", "content": "T", "loss": True}]
    assert trained_text(tokenizer, templates.normalise(messages, "x")) == (
        "U1<|im_end|>\nA2<|im_end|>\n<tool_response>\nT\n</tool_response><|im_end|>\n")
    messages[0]["loss"] = True
    assert trained_text(tokenizer, templates.normalise(messages, "x")).startswith("S<|im_end|>\nU1")


# --- errors ---------------------------------------------------------------------------------------

CALL = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
BAD = [
    ([{"x": 1}], r"d\.parquet has no column 'messages' \(it has x\); set data\.multiturn\.messages_key"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}],
     r"row 0 of .*: message 0 has unknown role 'bot'; use system"),
    ([chat(), {"messages": [{"role": "user", "content": None}]}],
     r"row 1 of .*: message 0 \(user\) has non-string content of type NoneType"),
    ([{"messages": [{"role": "user", "content": "a"}], "tools": "[{bad"}],
     r"row 0 of .*: the tools column is not valid JSON"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls":
       [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}],
     r"row 0 of .*: message 1 tool call 0 arguments is not valid JSON"),
    ([chat(), {"messages": []}], r"row 1 of .*d\.parquet has an empty conversation"),
    ([{"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}]}],
     r"message 0 is a user message with tool_calls"),
    ([{"messages": 3}], r"row 0 of .*: the messages column holds a int, not a list of \{role, content\} messages"),
    ([{"messages": [1, 2]}], r"row 0 of .*: message 0 is a int, not a \{role, content\} object"),
    ([{"messages": [{"role": "user", "content": "a"}], "tools": 5}], r"row 0 of .*: tools is a int, not a list"),
]


def test_unreadable_parquet(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(data.DataError, match=r"junk\.parquet is not a readable parquet file"):
        data.read_rows(tmp_path / "junk.parquet")


@pytest.mark.parametrize("rows,message", BAD)
def test_bad_data_errors(tmp_path, rows, message):
    with pytest.raises(data.DataError, match=message) as e:
        data.read_rows(write(tmp_path, rows))
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_missing_files_and_tokenizer(tmp_path):
    with pytest.raises(data.DataError, match=r"nope\.parquet is neither a parquet or JSON file nor a directory"):
        data.read_rows(tmp_path / "nope.parquet")
    with pytest.raises(data.DataError, match=r"tokenizer\.json does not exist; model\.partial_pretrain"):
        data.load_tokenizer(tmp_path)
    for damaged in ('{"version": "1.0", "model": ', "not json at all"):  # truncated, garbage
        (tmp_path / "tokenizer.json").write_text(damaged)
        with pytest.raises(data.DataError) as e:
            data.load_tokenizer(tmp_path)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'tokenizer.json'} does not parse as a tokenizer (")
        assert msg.endswith("); restore it from the model's original files.") and "\n" not in msg


def test_directory_and_list_of_files(tmp_path):
    write(tmp_path, [chat("a")], "a.parquet")
    write(tmp_path, [chat("b"), chat("c")], "b.parquet")
    users = [m[0]["content"] for m, _ in data.read_rows(tmp_path)]
    assert users == ["a", "b", "c"]
    assert len(data.read_rows([tmp_path / "b.parquet", tmp_path / "a.parquet"])) == 3


# --- truncation, dropping, cache --------------------------------------------------------------------

@needs_tokenizer
def test_truncation(tmp_path, tokenizer):
    path = write(tmp_path, [chat(), chat(answer="word " * 50)])
    one = write(tmp_path, [chat(answer="word " * 50)], "one.parquet")
    [(full_ids, full_mask, full_turn, _)] = data.build_samples(one, tokenizer, 10**6)
    n = len(full_ids)
    with pytest.raises(data.DataError, match=rf"row 1 of .*d\.parquet has {n} tokens, more than "
                                             r"data\.max_length=40; raise data\.max_length or "
                                             r"set data\.truncation=left or right\."):
        data.build_samples(path, tokenizer, 40)
    left = data.build_samples(path, tokenizer, 40, "left")[1]
    right = data.build_samples(path, tokenizer, 40, "right")[1]
    assert np.array_equal(left[0], full_ids[-40:]) and np.array_equal(left[1], full_mask[-40:])
    assert np.array_equal(right[0], full_ids[:40]) and np.array_equal(right[1], full_mask[:40])
    assert left[0].dtype == np.int64 and left[1].dtype == np.uint8
    assert np.array_equal(left[2], full_turn[-40:]) and np.array_equal(right[2], full_turn[:40])
    with pytest.raises(data.DataError, match="data.truncation='middle' is not one of"):
        data.build_samples(path, tokenizer, 40, "middle")


@needs_tokenizer
def test_untrained_rows_dropped_with_one_warning(tmp_path, tokenizer):
    silent = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "loss": False}]}
    lines = []
    samples = data.build_samples(write(tmp_path, [chat(), silent, silent]), tokenizer, 100, log=lines.append)
    assert len(samples) == 1
    assert len(lines) == 1 and lines[0].startswith("warning: 2 rows of ") and "no trained tokens" in lines[0]
    with pytest.raises(data.DataError, match="no row of .* has a trained token"):
        data.build_samples(write(tmp_path, [silent], "s.parquet"), tokenizer, 100, log=lines.append)


@needs_tokenizer
def test_cache_reuse_and_rebuild(tmp_path, tokenizer, monkeypatch):
    path, cache = write(tmp_path, [chat(), chat("x", "y")]), tmp_path / "cache"
    kw = dict(cache_dir=cache, tokenizer_path=MODEL / "tokenizer.json", log=lambda s: None)
    first = data.build_samples(path, tokenizer, 100, **kw)
    [file] = list(cache.glob("*.npz"))

    def no_tokenizing(*a, **k):
        raise AssertionError("cache was not used")
    real_tokenize = data._tokenize_rows
    monkeypatch.setattr(data, "_tokenize_rows", no_tokenizing)
    again = data.build_samples(path, tokenizer, 100, **kw)
    assert all(all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 4 for a, b in zip(first, again))
    assert file.name.startswith(f"samples-v{data.CACHE_FORMAT}-")  # an older layout's file is never read
    assert again[0][0].dtype == np.int64

    # corrupt: flip bytes in the middle -> one warning, rebuilt, same result, valid again
    monkeypatch.setattr(data, "_tokenize_rows", real_tokenize)
    blob = bytearray(file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    file.write_bytes(bytes(blob))
    lines = []
    rebuilt = data.build_samples(path, tokenizer, 100, **{**kw, "log": lines.append})
    assert len(lines) == 1 and "corrupt or stale" in lines[0]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, rebuilt))
    monkeypatch.setattr(data, "_tokenize_rows", no_tokenizing)
    data.build_samples(path, tokenizer, 100, **kw)

    # truncated (a crash mid-write elsewhere, a full disk) -> rebuilt as well
    monkeypatch.setattr(data, "_tokenize_rows", real_tokenize)
    file.write_bytes(file.read_bytes()[:100])
    lines.clear()
    assert len(data.build_samples(path, tokenizer, 100, **{**kw, "log": lines.append})) == 2
    assert len(lines) == 1 and "corrupt or stale" in lines[0]

    # a different max_length or changed file content is a different key, not a stale hit
    monkeypatch.setattr(data, "_tokenize_rows", real_tokenize)
    data.build_samples(path, tokenizer, 99, **kw)
    write(tmp_path, [chat("changed")])
    changed = data.build_samples(path, tokenizer, 100, **kw)
    assert len(changed) == 1 and len(list(cache.glob("*.npz"))) == 3


# --- inspect CLI ------------------------------------------------------------------------------------

@needs_tokenizer
def test_inspect_cli(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "data.py"), "inspect", str(REFERENCE / "retool_like_sample.parquet"),
           "--tokenizer", str(MODEL), "--rows", "1:3", "--jsonl", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "=== row 1 of " in r.stdout and "=== row 3 of" not in r.stdout
    assert "<|im_start|>assistant\n[[Note that" in r.stdout and "<|im_end|>\n]]<|im_start|>user" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["row"] for x in records] == [1, 2]
    case = json.loads((REFERENCE / "chat_template_cases.json").read_text())["cases"][0]  # = row 1
    assert records[0]["input_ids"] == case["input_ids"] and records[0]["loss_mask"] == case["loss_mask"]
    assert f"{len(case['input_ids'])} tokens, {sum(case['loss_mask'])} trained" in r.stdout

    bad = write(tmp_path, [{"messages": [{"role": "bot", "content": "x"}]}])
    r = subprocess.run(cmd[:3] + [str(bad), "--tokenizer", str(MODEL)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: row 0 of ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@needs_tokenizer
def test_inspect_colours_on_a_tty_and_rejects_bad_rows(capsys, monkeypatch):
    args = ["inspect", str(REFERENCE / "retool_like_sample.parquet"), "--tokenizer", str(MODEL), "--rows", "1"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    data.main(args)
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n\x1b[1;32mNote that" in out and "[[" not in out
    assert out.count("=== row ") == 1
    with pytest.raises(SystemExit) as e:
        data.main(args[:-1] + ["x:y"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --rows 'x:y' is not")


# --- batched tokenization, JSON / JSONL input -------------------------------------------------------

@needs_tokenizer
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("name,max_length", [("retool_like_sample.parquet", None), ("glaive_toolcall_300.parquet", None),
                                             ("retool_like_sample.parquet", 300), ("glaive_toolcall_300.parquet", 150)])
def test_batched_tokenization_equals_row_by_row(tokenizer, name, max_length, family):
    # encode_batch over chunks (7 rows: chunk boundaries inside the file) == render + encode row by
    # row, ids and masks bit for bit, truncated both ways where rows are longer than max_length
    path = REFERENCE / name
    rows = list(data._iter_rows(path))
    for truncation in ("left", "right") if max_length else ("error",):
        batched, dropped, _ = data._tokenize_rows(tokenizer, family, [path], {}, {}, max_length, truncation, print,
                                                  chunk_rows=7)
        full = []
        for w, m, t, e in rows:
            text, spans = templates.render(family, m, t, enable_thinking=e, replies=(replies := []))
            full.append(data._ids_and_mask(tokenizer.encode(text, add_special_tokens=False), spans, replies))
        single = [data._truncate(*f, max_length, truncation, "x") for f in full]
        assert max_length is None or any(len(f[0]) > max_length for f in full)  # truncation happens
        single = [s for s in single if s[1].any()]
        assert len(batched) == len(single) == len(rows) - dropped
        for (ids, mask, turn, calls), (ids1, mask1, turn1, calls1) in zip(batched, single):
            assert ids.dtype == ids1.dtype == np.int64 and mask.dtype == mask1.dtype == np.uint8
            assert np.array_equal(ids, ids1) and np.array_equal(mask, mask1)
            assert np.array_equal(turn, turn1) and np.array_equal(calls, calls1)


@needs_tokenizer
def test_progress_line_for_long_builds(tokenizer, monkeypatch):
    clock = iter(range(0, 1000, 3))  # every time.time() call advances 3 s
    monkeypatch.setattr(data.time, "time", lambda: float(next(clock)))
    lines = []
    data._tokenize_rows(tokenizer, "qwen2.5", [REFERENCE / "retool_like_sample.parquet"], {}, {}, None, "error",
                        lines.append, chunk_rows=3)
    assert lines and all(line.startswith("data: tokenized ") and "rows/s | eta " in line for line in lines)
    assert lines[-1].startswith("data: tokenized 8 / 8 rows") and len(lines) <= 3


def write_json(path, rows, lines):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) if lines else json.dumps(rows, indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["retool_like_sample.parquet", "glaive_toolcall_300.parquet"])
def test_json_and_jsonl_read_like_parquet(tmp_path, name):
    # ReTool layout (structs, parquet's null-filled keys written out) and glaive (JSON-string tools
    # and arguments): the same rows as .jsonl / .json normalise to exactly what parquet gives.
    if not REFERENCE.is_dir():
        pytest.skip("shared/reference is not present")
    rows = pq.read_table(REFERENCE / name).to_pylist()
    want = data.read_rows(REFERENCE / name)
    assert data.read_rows(write_json(tmp_path / "d.jsonl", rows, lines=True)) == want
    assert data.read_rows(write_json(tmp_path / "d.json", rows, lines=False)) == want


@needs_tokenizer
def test_json_dump_gives_the_parquet_samples(tokenizer):
    # the reference .json dump of the ReTool parquet, rows as written (nulls as the dump has them)
    a = data.build_samples(REFERENCE / "retool_like_sample.json", tokenizer, None)
    b = data.build_samples(REFERENCE / "retool_like_sample.parquet", tokenizer, None)
    assert len(a) == len(b) == 8
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("name,text,message", [
    ("bad.jsonl", '{"messages": []}\n\n{"messages": [}\n', r"line 3 of .*bad\.jsonl is not valid JSON \(.* at column 15\); "
                                                            r"fix or remove that line\."),
    ("bad.json", '[\n{"messages": []},\n{oops}\n]', r"bad\.json is not valid JSON \(.* at line 3, column 2\); fix the file"),
    ("obj.json", '{"messages": []}', r"obj\.json holds a JSON dict, not a list of rows"),
    ("row.jsonl", '[1, 2]\n', r"row 0 of .*row\.jsonl is a list, not an object of columns\."),
    ("col.jsonl", '{"msgs": []}\n', r"col\.jsonl has no column 'messages' \(it has msgs\)"),
    ("bin.jsonl", b'{"messages": "\xff"}\n', r"bin\.jsonl is not UTF-8 text"),
])
def test_bad_json_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(data.DataError, match=message) as e:
        data.read_rows(path)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_directory_of_mixed_files(tmp_path):
    write(tmp_path, [chat("a")], "a.parquet")
    write_json(tmp_path / "b.jsonl", [chat("b"), chat("c\u2028d")], lines=True)  # U+2028 inside a string
    write_json(tmp_path / "c.json", [chat("e")], lines=False)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [m[0]["content"] for m, _ in data.read_rows(tmp_path)] == ["a", "b", "c\u2028d", "e"]
    with pytest.raises(data.DataError, match=r"row 0 of .*b\.jsonl: message 0 has unknown role"):
        write_json(tmp_path / "b.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}], lines=True)
        data.read_rows(tmp_path)


@needs_tokenizer
def test_inspect_names_its_own_flag_for_an_unknown_template(tmp_path, capsys):
    import shutil
    shutil.copyfile(MODEL / "tokenizer.json", tmp_path / "tokenizer.json")  # no template beside it
    with pytest.raises(SystemExit) as e:
        data.main(["inspect", str(REFERENCE / "retool_like_sample.parquet"), "--tokenizer", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path} has no chat template")
    assert f"pass --chat_template {templates.CHOICES} to choose" in err


@needs_tokenizer
@pytest.mark.parametrize("family", templates.FAMILIES)
def test_turns_mark_each_trained_assistant_reply(tmp_path, tokenizer, family):
    """turn[t] is k on exactly the tokens of the k-th trained assistant reply (as its trained text decodes),
    -1 on every other token, trained or not (a user message with loss=true); calls flags the replies with tool
    calls; an untrained assistant turn (loss=false) is no turn."""
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expr": "1+1"}}}
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]},
                {"role": "tool", "content": "2"},
                {"role": "assistant", "content": "skipped", "loss": False},
                {"role": "user", "content": "trained question", "loss": True},
                {"role": "assistant", "content": "It is 2."}]
    [(ids, mask, turn, calls)] = data.build_samples(write(tmp_path, [{"messages": messages, "tools": [TOOL]}]),
                                                    tokenizer, None, chat_template=family)
    assert turn.dtype == np.int32 and len(turn) == len(ids) and calls.tolist() == [1, 0]
    assert set(turn.tolist()) == {-1, 0, 1} and (mask[turn >= 0] == 1).all()
    text, spans = templates.render(family, templates.normalise(messages), [TOOL])
    replies = []
    templates.render(family, templates.normalise(messages), [TOOL], replies=replies)
    assert [c for _, _, c in replies] == [True, False] and all((a, b) in spans for a, b, _ in replies)
    for k, (a, b, _) in enumerate(replies):  # a token that straddles the span's start belongs to it (as to the mask)
        got = tokenizer.decode(ids[turn == k].tolist(), skip_special_tokens=False)
        assert text[a:b] in got and got in text[a - 4:b]
    # the trained user message is trained but belongs to no turn
    outside = tokenizer.decode(ids[(mask == 1) & (turn == -1)].tolist(), skip_special_tokens=False)
    assert "trained question" in outside and "It is 2." not in outside
