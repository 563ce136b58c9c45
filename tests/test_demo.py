"""demo.py: the same bytes every run, verl's ReTool parquet layout, a Qwen-like tokenizer whose
markers are single tokens, and tool turns that hold what the code really prints."""
import contextlib
import io
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import data
import demo
import model
import templates
from conftest import REFERENCE, ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("demo") / "out", seed=0)  # the defaults run.sh uses


@pytest.fixture(scope="module")
def tok(built):
    return Tokenizer.from_file(str(built["model"] / "tokenizer.json"))


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_every_run(built, tmp_path):
    # A second run in a fresh process through the CLI: catches per-process hash seeds too.
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    root = built["model"].parent
    assert files(root) == files(tmp_path / "out")
    assert len(files(root)) == 8 and len(out.splitlines()) == 8  # one line per file written
    # run.sh rebuilds demo/ when this differs from the VERSION line it reads out of demo.py with sed.
    line = re.search(r"^VERSION = (.*)$", (ROOT / "demo.py").read_text(), re.M).group(1)
    assert (root / "version.txt").read_text() == f"{demo.VERSION}\n" == f"{line}\n"
    other = demo.make_demo(tmp_path / "seed1", seed=1, train_rows=8, val_rows=2)
    assert other["train"].read_bytes() != demo.make_demo(tmp_path / "seed0", train_rows=8, val_rows=2)["train"].read_bytes()


def test_parquet_layout(built):
    schema = pq.read_schema(built["train"])
    assert schema.names == ["messages", "tools"]
    msg = schema.field("messages").type.value_type
    assert [f.name for f in msg] == ["role", "content", "tool_calls"]
    fn = msg.field("tool_calls").type.value_type.field("function").type
    assert [f.name for f in fn] == ["name", "arguments"] and [f.name for f in fn.field("arguments").type] == ["code"]
    assert pq.read_metadata(built["train"]).num_rows == 2048 and pq.read_metadata(built["val"]).num_rows == 16
    ref = REFERENCE / "retool_like_sample.parquet"
    if ref.is_file():  # the same arrow schema (and `datasets` metadata) as verl's ReTool files
        assert schema.equals(pq.read_schema(ref), check_metadata=True)
    # The trainer's reader takes it as it is, and every conversation has the ReTool shape.
    for messages, tools in data.read_rows(built["train"]):
        assert [t["function"]["name"] for t in tools] == ["code_interpreter"]
        roles = [m["role"] for m in messages]
        assert roles[roles[0] == "system"] == "user" and roles[-1] == "assistant"
        assert "\\boxed{" in messages[-1]["content"]
        for a, b in zip(messages, messages[1:]):
            assert (b["role"] == "tool") == bool(a.get("tool_calls"))


def test_tokenizer(built, tok):
    added = demo.SPECIAL + demo.ADDED
    first = tok.token_to_id("<|endoftext|>")
    # Qwen's order: the added tokens follow the BPE vocab, each a single id, special flags as Qwen's.
    assert [tok.token_to_id(s) for s in added] == list(range(first, first + len(added)))
    assert first + len(added) == tok.get_vocab_size()
    for s in added:
        assert tok.encode(s, add_special_tokens=False).ids == [tok.token_to_id(s)]
    spec = json.loads((built["model"] / "tokenizer.json").read_text())
    cfg = json.loads((built["model"] / "tokenizer_config.json").read_text())
    assert {t["id"]: t["special"] for t in spec["added_tokens"]} == {int(k): v["special"] for k, v in cfg["added_tokens_decoder"].items()}
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    ref = REFERENCE / "qwen2.5-0.5b-instruct" / "tokenizer.json"
    if ref.is_file():
        qwen = json.loads(ref.read_text())
        assert [(t["content"], t["special"]) for t in spec["added_tokens"]] == [(t["content"], t["special"]) for t in qwen["added_tokens"]]
        assert spec["pre_tokenizer"] == qwen["pre_tokenizer"] and spec["normalizer"] == qwen["normalizer"]

    lengths = []
    for i, (messages, tools) in enumerate(data.read_rows(built["val"])):
        text = templates.render("qwen2.5", messages, tools)[0]
        enc = tok.encode(text, add_special_tokens=False)
        lengths.append(len(enc.ids))
        assert tok.decode(enc.ids, skip_special_tokens=False) == text
        # Offsets tile the text (data.py's loss mask is built from them); the markers map to themselves.
        assert "".join(text[a:b] for a, b in enc.offsets) == text
        for t, (a, b) in zip(enc.ids, enc.offsets):
            if t >= first:
                assert text[a:b] == added[t - first]
    assert 150 <= sum(lengths) / len(lengths) <= 400 and max(lengths) < 600

    # Characters never seen in training still encode (byte-level), and offsets cover every character.
    text = "x ≈ 3.14 — π²\n<|im_end|>"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert set().union(*(range(a, b) for a, b in enc.offsets)) == set(range(len(text)))
    assert all(a0 <= a1 for (a0, _), (a1, _) in zip(enc.offsets, enc.offsets[1:]))


def test_model_files(built, tok):
    cfg = json.loads((built["model"] / "config.json").read_text())
    ref = REFERENCE / "qwen2.5-0.5b-instruct"
    if ref.is_dir():  # the same keys as Qwen's files, so HF tooling reads them
        assert set(json.loads((ref / "config.json").read_text())) <= set(cfg)
        assert set(json.loads((ref / "generation_config.json").read_text())) == set(json.loads((built["model"] / "generation_config.json").read_text()))
    assert cfg["vocab_size"] % 64 == 0 and tok.get_vocab_size() <= cfg["vocab_size"] < tok.get_vocab_size() + 64
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>") and cfg["bos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert cfg["num_attention_heads"] % 2 == 0 and cfg["num_key_value_heads"] % 2 == 0  # Ulysses sp=2
    with safe_open(built["model"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.layers.0.self_attn.q_proj.bias" in f.keys()
    m = model.load_pretrained(built["model"])  # strict load
    ids = torch.tensor(tok.encode("<|im_start|>user\nhi<|im_end|>\n").ids)
    with torch.no_grad():
        logits = m(ids, torch.tensor([0, len(ids)], dtype=torch.int32))
    assert logits.shape == (len(ids), cfg["vocab_size"]) and torch.isfinite(logits).all()


def run(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<code_interpreter>", "exec"), {})
    return out.getvalue().rstrip("\n")


def test_tool_outputs_are_real(built):
    # Run every call's code (our own generated code) and compare with the tool turn after it.
    for path in (built["train"], built["val"]):
        for messages, _ in data.read_rows(path):
            for call, result in zip(messages, messages[1:]):
                if not call.get("tool_calls"):
                    continue
                code = call["tool_calls"][0]["arguments"]["code"]
                if result["content"].startswith("SyntaxError: "):
                    with pytest.raises(SyntaxError) as e:
                        compile(code, "<code_interpreter>", "exec")
                    assert result["content"] == f"SyntaxError: {e.value.msg}"
                else:
                    assert run(code) == result["content"]
            # The boxed answer is one of the printed values (\frac{a}{b} prints as a/b).
            boxed = re.search(r"\\boxed\{(.*)\}$", messages[-1]["content"]).group(1)
            assert re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", boxed) in messages[-2]["content"].split()


def test_ships_the_official_qwen25_template(built):
    # `auto` recognises it (run.sh, generate.py and inspect need no template flag), and it is the
    # official text byte for byte, in tokenizer_config.json as a real Qwen2.5 dir has it.
    assert templates.detect(built["model"]) == "qwen2.5"
    cfg = json.loads((built["model"] / "tokenizer_config.json").read_text())
    ref = REFERENCE / "qwen2.5-0.5b-instruct"
    if ref.is_dir():
        assert cfg["chat_template"] == (ref / "chat_template.jinja").read_text()
        assert list(cfg) == list(json.loads((ref / "tokenizer_config.json").read_text()))  # same keys, same order
