"""generate.py and plot.py.

KV-cache decoding == recomputing the whole prefix every step; eos stops; seeded sampling repeats;
the prompt == the official chat template rendered through jinja2 with add_generation_prompt=True;
the CLI's errors are one sentence; loss.png is a real PNG with each step once.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import demo
import generate
import model as M
import plot
import templates
from conftest import REFERENCE, ROOT

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
CONFIGS = {
    "qwen2": dict(TINY, model_type="qwen2", tie_word_embeddings=False),
    # head_dim != hidden / heads, no q/k/v bias, q_norm/k_norm
    "qwen3": dict(TINY, model_type="qwen3", head_dim=32, attention_bias=False, tie_word_embeddings=False),
}
PROMPT = [5, 17, 3, 88, 42, 42, 7, 60, 1]


def tiny(name, seed=0):
    m = M.build_random(CONFIGS[name], seed=seed)
    with torch.no_grad():  # norms away from their init of ones, so each one matters
        for key, p in m.named_parameters():
            if key.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))))
    return m.eval()


def greedy_without_cache(model, prompt, n):
    """The reference: the whole sequence through the model's ordinary forward for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(ids), torch.tensor([0, len(ids)], dtype=torch.int32))  # (T, V)
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):]


# --------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_greedy_equals_recomputing_the_prefix(name):
    m = tiny(name)
    attn_fns = [layer.self_attn.attn_fn for layer in m.model.layers]
    cached = generate.generate(m, PROMPT, 24)
    assert cached == greedy_without_cache(m, PROMPT, 24)
    assert len(set(cached)) > 3  # a varied sequence, not one token repeated
    assert [layer.self_attn.attn_fn for layer in m.model.layers] == attn_fns  # the model is restored


def test_stops_at_eos_and_at_max_new_tokens():
    m = tiny("qwen2")
    free = generate.generate(m, PROMPT, 16)
    eos = free[5]
    assert generate.generate(m, PROMPT, 16, stop_ids={eos, 10_000}) == free[:free.index(eos) + 1]
    assert generate.generate(m, PROMPT, 3) == free[:3]


def test_sampling_is_seeded():
    m = tiny("qwen2")

    def draw(seed, **kw):
        return generate.generate(m, PROMPT, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(0) == draw(0) and draw(3) == draw(3)
    assert len({tuple(draw(s)) for s in range(4)}) > 1
    # A top-p this small keeps only the most likely token: sampling turns into greedy decoding.
    assert draw(1, top_p=1e-6) == generate.generate(m, PROMPT, 12)


def test_top_p_keeps_the_smallest_head_with_that_mass():
    probs = torch.tensor([0.07, 0.5, 0.03, 0.3, 0.1])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.45, {1}), (0.75, {1, 3}), (0.85, {1, 3, 4}), (1.0, {0, 1, 2, 3, 4})):
        draws = np.array([generate.next_token(logits, 1.0, top_p, gen) for _ in range(3000)])
        assert set(draws.tolist()) == kept
        share = probs[sorted(kept)] / probs[sorted(kept)].sum()  # renormalised within the head
        freq = np.bincount(draws, minlength=5)[sorted(kept)] / len(draws)
        np.testing.assert_allclose(freq, share.numpy(), atol=0.04)
    assert generate.next_token(logits, 0.0, 0.5, gen) == 1  # temperature 0: greedy


# --------------------------------------------------------------------------- prompt == official template

def official_renderer(path):
    """transformers' apply_chat_template(tokenize=False) through jinja2, as in test_template.py."""
    pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise ValueError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(path.read_text())
    return lambda messages, tools, **kw: template.render(messages=messages, tools=tools, **kw)


def raw_row(row):
    """A parquet row as the official template takes it (JSON-string tools and arguments decoded)."""
    for m in row["messages"]:
        for c in m.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return row["messages"], json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")


def conversations(sources):
    """(id, raw messages, raw tools) of the reference cases and parquet rows that exist."""
    out = []
    for name in sources:
        path = REFERENCE / name
        if not path.is_file():
            continue
        if path.suffix == ".json":
            for i, c in enumerate(json.loads(path.read_text())["cases"]):
                out.append((f"{name}:{c.get('name') or c.get('id') or i}", c["messages"], c["tools"]))
        else:
            out += [(f"{name}:{i}", *raw_row(r)) for i, r in enumerate(pq.read_table(path).to_pylist()[:40])]
    return out


FAMILIES = {  # family: (official template, reference conversations)
    "qwen2.5": ("qwen2.5-0.5b-instruct/chat_template.jinja",
                ["chat_template_cases.json", "glaive_toolcall_300.parquet", "retool_like_sample.parquet"]),
    "qwen3": ("qwen3/chat_template.jinja", ["qwen3/chat_template_cases.json", "retool_like_sample.parquet"]),
    "qwen3-instruct-2507": ("qwen3-instruct-2507/chat_template.jinja",
                            ["qwen3/chat_template_cases.json", "chat_template_cases.json"]),
}


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no_thinking"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_equals_official_template_with_generation_prompt(family, thinking):
    template, sources = FAMILIES[family]
    if not (REFERENCE / template).is_file():
        pytest.skip("shared/reference is not present")
    official = official_renderer(REFERENCE / template)
    checked = 0
    for cid, raw_messages, raw_tools in conversations(sources):
        try:  # cases our reader refuses (e.g. list content) have nothing to generate from
            messages, tools = templates.normalise(raw_messages, cid), templates.normalise_tools(raw_tools, cid)
        except data.DataError:
            continue
        for turn in range(sum(m["role"] == "assistant" for m in messages[1:])):
            prompt, reference = generate.prompt_and_reference(family, messages, tools, thinking, cid, turn)
            i = [j for j, m in enumerate(messages) if m["role"] == "assistant" and j > 0][turn]
            kw = dict(tools=raw_tools or None, enable_thinking=thinking)
            assert prompt == official(raw_messages[:i], add_generation_prompt=True, **kw), (cid, turn)
            full = official(raw_messages[:i + 1], add_generation_prompt=False, **kw)
            assert full.endswith(reference + "<|im_end|>\n"), (cid, turn)
            if family == "qwen2.5":  # prefix-preserving: prompt + reply is the whole conversation
                assert full == prompt + reference + "<|im_end|>\n", (cid, turn)
            checked += 1
    assert checked > 20


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("demo"), train_rows=8, val_rows=3)


def cli(capsys, *argv):
    """generate.main's exit code (0 when it returns), stdout and stderr."""
    try:
        generate.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_replies_beside_the_reference(tiny_demo, tmp_path, capsys):
    jsonl = tmp_path / "out.jsonl"
    code, out, err = cli(capsys, tiny_demo["model"], "--data", tiny_demo["val"], "--rows", "1:3", "--max_new_tokens", 6,
                         "--chat_template", "qwen2.5", "--jsonl", jsonl)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["row"] for r in records] == [1, 2] and out.count("--- reference:") == 2
    rows = data.read_rows(tiny_demo["val"])
    tokenizer = data.load_tokenizer(tiny_demo["model"])
    m = M.load_pretrained(tiny_demo["model"]).eval()
    stop = {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")}  # generation_config's
    for r in records:
        assert r["reference"] == rows[r["row"]][0][-1]["content"]  # the demo's last turn: plain content
        assert r["prompt"].endswith("<|im_start|>assistant\n")
        new = greedy_without_cache(m, tokenizer.encode(r["prompt"], add_special_tokens=False).ids, 6)
        new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]
        assert r["reply"] == tokenizer.decode(new, skip_special_tokens=False)


def test_cli_errors_are_one_sentence(tiny_demo, tmp_path, capsys):
    no_reply = tmp_path / "no_reply.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}]}]), no_reply)
    model_dir, val = tiny_demo["model"], tiny_demo["val"]
    cases = [
        ((tmp_path / "nope", "--prompt", "hi"), "has no config.json"),
        ((model_dir,), "exactly one of --data"),
        ((model_dir, "--data", val, "--prompt", "hi"), "exactly one of --data"),
        ((model_dir, "--data", val, "--rows", "7"), "selects no row of the 3"),
        ((model_dir, "--data", val, "--rows", "2:1"), "selects no row"),
        ((model_dir, "--data", val, "--rows", "a:b"), "is not a row A or a range A:B"),
        ((model_dir, "--data", val, "--turn", "9"), "so --turn 9 names none"),
        ((model_dir, "--data", no_reply), "has 0 assistant turns after a prompt"),
        ((model_dir, "--data", tmp_path / "missing.parquet"), "missing.parquet"),
        ((model_dir, "--prompt", "hi", "--top_p", "0"), "--top_p in (0, 1]"),
    ]
    for argv, words in cases:
        code, out, err = cli(capsys, *argv, "--chat_template", "qwen2.5")
        assert code == 2 and err.startswith("error: ") and words in err, (argv, err)
        assert err.count("\n") == 1 and not out, (argv, err)


# --------------------------------------------------------------------------- the loss picture

# --------------------------------------------------------------------------- --score

SCHEMA_TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "required": ["code"],
    "properties": {"code": {"type": "string"}, "n": {"type": "integer"}, "mode": {"type": "string", "enum": ["a", "b"]},
                   "opts": {"type": ["object", "null"]}}}}}]


@pytest.mark.parametrize("family", templates.FAMILIES)
def test_score_turn_levels(family):
    """A reference turn written by the family's renderer scores on every level; each fault fails its own level
    and the ones below it (the XML form reads values back by the schema's types)."""
    calls = [{"name": "run", "arguments": {"code": "print(1)\nprint(2)", "n": 3, "mode": "b", "opts": {"k": [1]}}},
             {"name": "run", "arguments": {"code": "x = 1"}}]
    messages = templates.normalise([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "Let me run it.", "tool_calls": calls}])
    _, reference = generate.prompt_and_reference(family, messages, SCHEMA_TOOLS, True, "x")
    assert generate.score_turn(family, reference, True, calls, SCHEMA_TOOLS) == dict(
        stopped=True, parsed=True, names=True, schema=True, equal=True, calls=calls)

    def levels(reply, stopped=True):
        r = generate.score_turn(family, reply, stopped, calls, SCHEMA_TOOLS)
        return [r[k] for k, _ in generate.LEVELS]
    xml = family in ("qwen3.5", "qwen3.8")
    assert levels(reference, stopped=False) == [False, True, True, True, False]
    assert levels(reference[:reference.rfind("</tool_call>")]) == [True, False, False, False, False]  # unclosed
    assert levels("No call.") == [True, False, False, False, False]
    assert levels(reference.replace("<function=run>" if xml else '"name": "run"',
                                    "<function=ran>" if xml else '"name": "ran"')) == [True, True, False, False, False]
    bad_type = reference.replace("<parameter=n>\n3" if xml else '"n": 3', "<parameter=n>\nthree" if xml else '"n": "3"')
    assert levels(bad_type) == [True, True, True, False, False]
    assert levels(reference.replace("b\n" if xml else '"b"', "c\n" if xml else '"c"')) == [True, True, True, False, False]
    assert levels(reference.replace("x = 1", "x = 2")) == [True, True, True, True, False]


def test_check_arguments():
    schema = SCHEMA_TOOLS[0]["function"]["parameters"]
    assert templates.check_arguments({"code": "", "opts": None}, schema)
    assert not templates.check_arguments({"n": 1}, schema)  # required key missing
    assert not templates.check_arguments({"code": "", "extra": 1}, schema)  # undeclared key
    assert not templates.check_arguments({"code": "", "n": True}, schema)  # a bool is no JSON integer
    assert not templates.check_arguments({"code": "", "n": 1.5}, schema)
    assert not templates.check_arguments({"code": "", "mode": "c"}, schema)  # not in the enum


def test_cli_score_table_and_jsonl(tiny_demo, tmp_path, capsys, monkeypatch):
    """--score end to end with a stand-in model that replies exactly the reference: every level is full, one
    record per tool-call turn; the real tiny model's replies score below it, and --all_turns adds the last turns."""
    rows = data.read_rows(tiny_demo["val"])
    tokenizer = data.load_tokenizer(tiny_demo["model"])
    answers = {}
    for messages, tools in rows:
        for k, i in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompt, ref = generate.prompt_and_reference("qwen2.5", messages, tools, True, "x", k)
            answers[tuple(tokenizer.encode(prompt, add_special_tokens=False).ids)] = (
                tokenizer.encode(ref + "<|im_end|>", add_special_tokens=False).ids, bool(messages[i].get("tool_calls")))
    n_calls = sum(c for _, c in answers.values())
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda m, ids, *a, **k: answers[tuple(ids)][0])
    jsonl = tmp_path / "s.jsonl"
    code, out, err = cli(capsys, tiny_demo["model"], "--data", tiny_demo["val"], "--score", "--chat_template", "qwen2.5",
                         "--jsonl", jsonl)
    assert code == 0, err
    assert f"=== score: {n_calls} assistant turns with tool calls in rows 0:3 of" in out
    for _, text in generate.LEVELS:
        assert re.search(rf"{re.escape(text)} +{n_calls} +1.000", out), text
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == n_calls and all(r["equal"] and r["calls"][0]["name"] == "code_interpreter" for r in records)
    code, out, _ = cli(capsys, tiny_demo["model"], "--data", tiny_demo["val"], "--score", "--all_turns",
                       "--chat_template", "qwen2.5", "--rows", "0:2")
    assert code == 0 and re.search(r"equal the reference calls +(\d+) +1.000", out)
    monkeypatch.setattr(generate, "generate", real)
    code, out, _ = cli(capsys, tiny_demo["model"], "--data", tiny_demo["val"], "--score", "--chat_template", "qwen2.5",
                       "--max_new_tokens", 4)
    assert code == 0 and re.search(rf"turns +{n_calls} +1.000", out) and re.search(r"equal the reference calls +0 +0.000", out)
    code, _, err = cli(capsys, tiny_demo["model"], "--prompt", "hi", "--score")
    assert code == 2 and err.count("\n") == 1 and "--score replies greedily to --data rows" in err


def write_metrics(path, steps):
    with open(path, "a") as f:
        for step, loss in steps:
            rec = {"step": step, "train/loss": loss, "train/lr": 1e-3 * step}
            if step % 4 == 0:
                rec["val/loss"] = loss + 0.1
            f.write(json.dumps(rec) + "\n")


def test_resumed_metrics_give_each_step_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, [(s, 10.0 - s) for s in range(1, 8)])  # killed after logging 7, last checkpoint at 5
    with open(metrics, "a") as f:
        f.write('{"step": 8, "train/lo')  # a line cut short by the kill
    write_metrics(metrics, [(s, 20.0 - s) for s in range(6, 10)])  # the resume logs 6, 7 again, then 8, 9
    records = plot.read_metrics(metrics)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["train/loss"] for r in records] == [9, 8, 7, 6, 5, 14, 13, 12, 11]  # the resumed run's 6 and 7
    assert [r["step"] for r in records if "val/loss" in r] == [4, 8]


def test_plot_writes_a_png(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    write_metrics(tmp_path / "metrics.jsonl", [(s, 5.0 / s) for s in range(1, 13)] + [(11, 0.3), (12, 0.2)])
    messages = []
    path = plot.plot_metrics(tmp_path, "proj/exp", log=messages.append)
    assert path == tmp_path / "loss.png" and messages == []
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (450, 800) and pixels.std() > 0.05  # drawn, not blank
    assert not list(tmp_path.glob(".loss*"))  # the temporary file was renamed
    assert plot.plot_metrics(tmp_path / "elsewhere", "x", log=messages.append) is None and len(messages) == 1


def test_plot_second_panel_shows_exact_turns(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    write_metrics(tmp_path / "metrics.jsonl", [(s, 5.0 / s) for s in range(1, 13)])
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a later record of a step replaces it: these are the ones drawn
        for s in (4, 8, 12):
            f.write(json.dumps({"step": s, "train/loss": 1.0, "train/lr": 1e-3, "val/loss": 1.1,
                                "val/turn_exact": s / 16, "val/tool_call_exact": s / 12}) + "\n")
    pixels = mpimg.imread(plot.plot_metrics(tmp_path, "proj/exp"))
    assert pixels.shape[:2] == (700, 800)
    assert pixels[470:680].std() > 0.05  # the lower panel is drawn


def test_plot_title_says_lora(tmp_path):
    # The title comes from the run.json train.py writes: a LoRA run says so (its loss is not a full run's).
    (tmp_path / "run.json").write_text(json.dumps(dict(project_name="p", experiment_name="e", lora_rank=8, lora_alpha=16)))
    assert (plot.run_title(tmp_path), plot.lora_note(tmp_path)) == ("p/e", ", LoRA r=8 alpha=16")
    (tmp_path / "run.json").write_text(json.dumps(dict(project_name="p", experiment_name="e", lora_rank=0)))
    assert plot.lora_note(tmp_path) == "" and plot.lora_note(tmp_path / "absent") == ""


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    write_metrics(tmp_path / "metrics.jsonl", [(1, 2.0), (2, 1.5)])
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    messages = []
    assert plot.plot_metrics(tmp_path, "proj/exp", log=messages.append) is None
    assert len(messages) == 1 and "matplotlib is not installed" in messages[0]
    assert not (tmp_path / "loss.png").exists()


def test_training_writes_the_loss_curve(tiny_demo, tmp_path):
    out = tmp_path / "run"
    args = [f"data.train_files={tiny_demo['train']}", "data.train_batch_size=4", "data.micro_batch_size_per_gpu=4",
            "data.multiturn.enable=true", f"model.partial_pretrain={tiny_demo['model']}", "trainer.total_epochs=1",
            "trainer.device=cpu", "use_remove_padding=true", "trainer.save_freq=1", f"trainer.default_local_dir={out}",
            "trainer.project_name=p", "trainer.experiment_name=e", "data.chat_template=qwen2.5"]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count(f"loss curve {out / 'loss.png'}") == 2  # drawn at both saves
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.run_title(out) == "p/e"
