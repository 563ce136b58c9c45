"""Build the embedded default for `run.sh`: a tiny random Qwen2, its tokenizer, and ReTool-style data.

    python demo.py OUT_DIR [--seed 0] [--train_rows 2048] [--val_rows 16]

writes OUT_DIR/model/ (config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json), OUT_DIR/data/{train,val}.parquet and OUT_DIR/version.txt (VERSION below).
Everything is a pure function of the seed and the row counts: the same arguments give the same
bytes, so a fresh machine with no internet and no GPU can still run the reference job end to end. The tokenizer is a byte-level BPE
trained on the rows as data.py renders them; the weights come from model.build_random.
"""
import argparse
import json
import random
import re
from fractions import Fraction
from math import factorial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import data
import model
import templates

# Bumped whenever the files written change: run.sh rebuilds a demo/ whose version.txt differs
# (it greps this line, so keep it one plain integer).
VERSION = 3

# --- sizes
# A real Qwen2 (GQA, q/k/v bias, tied embeddings, rope_theta 1e6) shrunk to train in seconds on two
# CPU cores. 8 query / 4 KV heads (both divisible by Ulysses sp=2), head_dim = 128 / 8 = 16: more
# heads at the same width cost little and let the tool call's numbers be copied from the question
# sooner than 4 wider heads did (val/tool_call_exact 0.15 against 0.10 in the same 256 steps, on
# VERSION 2's data: several multi-digit numbers per problem).
CONFIG = dict(
    architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, hidden_act="silu", hidden_size=128,
    initializer_range=0.02, intermediate_size=352, max_position_embeddings=32768, max_window_layers=2,
    model_type="qwen2", num_attention_heads=8, num_hidden_layers=2, num_key_value_heads=4,
    rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True,
    torch_dtype="float32", transformers_version="4.43.1", use_cache=True, use_sliding_window=False)
# An upper bound: on the default rows BPE runs out of pairs to merge at ~970 tokens (256 bytes +
# ~720 merges), which with the 22 added tokens gives ~1k tokens and 1024 embedding rows.
BPE_VOCAB = 2000

# Qwen2.5's added tokens, same strings and order (ids follow the BPE vocab, as in Qwen). The first
# 14 are "special" (skipped by decode(skip_special_tokens)); the tool-call markers are not.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>"]
# Qwen2's pre-tokenizer split: single digits, letters runs, punctuation runs, newlines, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5 Instruct's chat template, the official text byte for byte (templates.py recognises it by its
# SHA-256), shipped in tokenizer_config.json as a real Qwen2.5 model dir has it: `auto` then finds
# qwen2.5 in the demo model and in every checkpoint trained from it (which copy that file).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# --- synthetic ReTool-style rows
TOOL = {"type": "function", "function": {
    "name": "code_interpreter", "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to execute."}},
                   "required": ["code"]}}}
SUFFIX = "\n\nRemember to place the final answer in the last part using the format: \n\n\\boxed{'The final answer goes here.'}"
CAREFUL = "You are a careful math assistant. Use the code interpreter to check every computation."
SYSTEMS = [None, None, CAREFUL, "You are a helpful assistant that solves math problems step by step."]


# Each problem returns its question, the reasoning before the first call, the code, what the code
# prints, the boxed answer, a closing sentence, and optionally a second cross-check (code, printed).
# Printed output is computed here from the same numbers the code uses, so every tool turn is what
# the interpreter would really print, without executing anything. Each problem has one number, a
# single digit n written in the question as the code writes it: a 2-layer model copies one token
# far sooner than it learns which of several numbers, digit after digit, goes in which slot.
# The price: only 46 distinct questions, so val rows recur in train (val/tool_call_exact 0.94 after
# 256 steps); with each kind's val numbers held out of train it was 0.20 (numbers of VERSION 2: 0.15).
def p_square_sum(r):
    n = r.randint(2, 9)
    v = sum(k * k for k in range(1, n + 1))
    return dict(q=f"What is the sum of the squares of the integers from $1$ to ${n}$?",
                plan=f"I'll add up $k^2$ for $k$ from $1$ to ${n}$ directly.",
                code=f"print(sum(k * k for k in range(1, {n} + 1)))", out=str(v), answer=str(v), close=f"The sum is ${v}$.",
                check=(f"# closed form\nprint({n} * ({n} + 1) * (2 * {n} + 1) // 6)", str(v)))


def p_powmod(r):
    n = r.randint(2, 9)
    v = pow(n, 50, 7)
    return dict(q=f"What is the remainder when ${n}^{{50}}$ is divided by $7$?",
                plan=f"Powers of ${n}$ modulo $7$ repeat, but modular exponentiation is quicker to check.",
                code=f"print(pow({n}, 50, 7))", out=str(v), answer=str(v), close=f"The remainder is ${v}$.",
                check=(f"# exact power, then reduce\nprint({n} ** 50 % 7)", str(v)))


def p_factorial(r):
    n = r.randint(3, 9)
    v = factorial(n)
    return dict(q=f"What is the product of all integers from $1$ to ${n}$?", plan=f"The product is ${n}!$. I'll compute it.",
                code=f"import math\nprint(math.factorial({n}))", out=str(v), answer=str(v), close=f"So ${n}! = {v}$.",
                check=(f"p = 1\nfor k in range(2, {n} + 1):\n    p *= k\nprint(p)", str(v)))


def p_digit_sum(r):
    n = r.randint(2, 9)
    s = str(n ** 20)
    v = sum(int(c) for c in s)
    return dict(q=f"What is the sum of the digits of ${n}^{{20}}$?", plan=f"I'll expand ${n}^{{20}}$ and add its digits.",
                code=f"digits = str({n} ** 20)\nprint(len(digits), sum(int(c) for c in digits))", out=f"{len(s)} {v}",
                answer=str(v), close=f"The number has {len(s)} digits and their sum is ${v}$.")


def p_divisors(r):
    n = r.randint(3, 9)
    m = factorial(n)
    ds = [d for d in range(1, m + 1) if m % d == 0]
    return dict(q=f"Find the sum of all positive divisors of ${n}!$.", plan=f"${n}!$ is small, so let me list its divisors by brute force.",
                code=f"import math\nn = math.factorial({n})\ndivisors = [d for d in range(1, n + 1) if n % d == 0]\nprint(len(divisors), sum(divisors))",
                out=f"{len(ds)} {sum(ds)}", answer=str(sum(ds)), close=f"There are {len(ds)} divisors summing to ${sum(ds)}$.")


def p_dice(r):
    s = r.randint(2, 9)
    hits = sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == s)
    f = Fraction(hits, 36)
    ans = f"\\frac{{{f.numerator}}}{{{f.denominator}}}" if f.denominator > 1 else str(f)
    return dict(q=f"Two fair six-sided dice are rolled. What is the probability that the sum is ${s}$? "
                  "Express your answer as a common fraction.", plan="I'll enumerate all $36$ equally likely outcomes.",
                code=f"from fractions import Fraction\nhits = sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == {s})\n"
                     "print(hits, Fraction(hits, 36))", out=f"{hits} {f}", answer=ans, close=f"There are {hits} favourable outcomes.")


PROBLEMS = [p_square_sum, p_powmod, p_factorial, p_digit_sum, p_divisors, p_dice]


def call(content, code):
    """An assistant turn that calls the code interpreter (verl's ReTool layout: arguments is a struct)."""
    fn = {"name": "code_interpreter", "arguments": {"code": code}}
    return {"role": "assistant", "content": content, "tool_calls": [{"type": "function", "function": fn}]}


def tool(output):
    return {"role": "tool", "content": output, "tool_calls": None}


def make_row(r):
    p = r.choice(PROBLEMS)(r)
    system = r.choice(SYSTEMS)
    msgs = [{"role": "system", "content": system, "tool_calls": None}] if system else []
    msgs.append({"role": "user", "content": p["q"] + SUFFIX, "tool_calls": None})
    if r.random() < 0.1:
        # A failed first attempt, as in real ReTool traces: the last ")" of the code is missing and
        # the model recovers. The message is what compile() reports for that code (Python >= 3.10).
        # Nothing in the prompt announces it, so no model reproduces that broken call.
        msgs += [call(p["plan"], p["code"][:-1]), tool("SyntaxError: '(' was never closed"),
                 call("There was a syntax error (missing parenthesis). Let me fix it.", p["code"])]
    else:
        msgs.append(call(p["plan"], p["code"]))
    msgs.append(tool(p["out"]))
    close = p["close"]
    # A cross-check call with empty content, as ReTool has, when the system prompt asks for checks:
    # decided by the prompt, not a coin, so greedy decoding can know whether the check comes.
    if p.get("check") and system == CAREFUL:
        msgs += [call("", p["check"][0]), tool(p["check"][1])]
        close = "Both computations agree. " + close
    msgs.append({"role": "assistant", "content": f"{close}\n\n\n\\boxed{{{p['answer']}}}", "tool_calls": None})
    return {"messages": msgs, "tools": [TOOL]}


# The exact arrow schema verl's ReTool preprocessing writes (see reference/retool_like_sample.parquet).
_str = pa.string()
CALL = pa.struct([("type", _str), ("function", pa.struct([("name", _str), ("arguments", pa.struct([("code", _str)]))]))])
MESSAGE = pa.struct([("role", _str), ("content", _str), ("tool_calls", pa.list_(CALL))])
PARAMS = pa.struct([("type", _str), ("properties", pa.struct([("code", pa.struct([("type", _str), ("description", _str)]))])),
                    ("required", pa.list_(_str))])
TOOL_T = pa.struct([("type", _str), ("function", pa.struct([("name", _str), ("description", _str), ("parameters", PARAMS)]))])
SCHEMA = pa.schema([("messages", pa.list_(MESSAGE)), ("tools", pa.list_(TOOL_T))])


def hf_features(t):
    """The `datasets` feature description of an arrow type, so `datasets` reads the file back unchanged."""
    if pa.types.is_struct(t):
        return {f.name: hf_features(f.type) for f in t}
    if pa.types.is_list(t):
        return {"feature": hf_features(t.value_type), "_type": "List"}
    return {"dtype": "string", "_type": "Value"}


def write_parquet(rows, path):
    meta = {"huggingface": json.dumps({"info": {"features": {f.name: hf_features(f.type) for f in SCHEMA}}})}
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(meta))
    pq.write_table(table, path)


# --- tokenizer
def corpus(path):
    """The text between the added tokens of every row as data.py renders it, so the BPE learns
    the template's words too and a sample stays short. Added tokens are cut out (encode splits
    them off before BPE) so no merge is spent on them."""
    cut = re.compile("|".join(re.escape(s) for s in SPECIAL + ADDED))
    for messages, tools in data.read_rows(path):
        yield from (piece for piece in cut.split(templates.render("qwen2.5", messages, tools)[0]) if piece)


def train_tokenizer(path):
    """Byte-level BPE built like Qwen2's tokenizer.json, trained on our rows, plus Qwen's added tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()  # decoding ignores the flags; the defaults are written out
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # All 256 byte symbols are in the base alphabet, so any text encodes (no unknown token needed).
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(path), trainer=trainer)
    # Added after training so their ids follow the BPE vocab; normalized=False matches them verbatim.
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in ADDED])
    return tok


def save_tokenizer(tok, model_dir):
    tok.save(str(model_dir / "tokenizer.json"))
    decoder = {str(tok.token_to_id(s)): dict(content=s, lstrip=False, normalized=False, rstrip=False,
                                             single_word=False, special=s in SPECIAL) for s in SPECIAL + ADDED}
    cfg = dict(add_bos_token=False, add_prefix_space=False, added_tokens_decoder=decoder,
               additional_special_tokens=SPECIAL[1:], bos_token=None, chat_template=CHAT_TEMPLATE,
               clean_up_tokenization_spaces=False,
               eos_token="<|im_end|>", errors="replace", model_max_length=CONFIG["max_position_embeddings"],
               pad_token="<|endoftext|>", split_special_tokens=False, tokenizer_class="Qwen2Tokenizer",
               unk_token=None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --- everything
def make_demo(out_dir, seed=0, train_rows=2048, val_rows=16):
    """Write model/ and data/ under out_dir; returns the paths of the model dir and the two parquets."""
    out_dir = Path(out_dir)
    paths = dict(model=out_dir / "model", train=out_dir / "data" / "train.parquet", val=out_dir / "data" / "val.parquet")
    for d in (paths["model"], paths["train"].parent):
        d.mkdir(parents=True, exist_ok=True)
    # String-seeded streams, one per split: --val_rows never changes the train rows (or the tokenizer).
    for split, n in (("train", train_rows), ("val", val_rows)):
        rng = random.Random(f"demo-{seed}-{split}")
        write_parquet([make_row(rng) for _ in range(n)], paths[split])
        print(f"wrote {paths[split]} ({n} rows)")

    tok = train_tokenizer(paths["train"])
    save_tokenizer(tok, paths["model"])
    print(f"wrote {paths['model'] / 'tokenizer.json'} ({tok.get_vocab_size()} tokens)")
    print(f"wrote {paths['model'] / 'tokenizer_config.json'}")

    pad, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    # Embedding rows rounded up to a multiple of 64, as Qwen pads 151665 tokens to 151936 rows:
    # the rows past the tokenizer exist and are never a target.
    vocab = -(-tok.get_vocab_size() // 64) * 64
    config = dict(sorted(dict(CONFIG, bos_token_id=pad, eos_token_id=eos, vocab_size=vocab).items()))
    gen = dict(bos_token_id=pad, pad_token_id=pad, do_sample=True, eos_token_id=[eos, pad], repetition_penalty=1.1,
               temperature=0.7, top_p=0.8, top_k=20, transformers_version="4.37.0")
    (paths["model"] / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    print(f"wrote {paths['model'] / 'generation_config.json'}")
    # save_pretrained writes config.json after the weights: an existing demo/model/config.json means
    # complete weights (run.sh's own test is version.txt, written after it).
    m = model.build_random(config, seed=seed)
    model.save_pretrained(m, paths["model"])
    print(f"wrote {paths['model'] / 'model.safetensors'} ({model.num_params(m) / 1e6:.2f}M parameters, random init)")
    print(f"wrote {paths['model'] / 'config.json'}")
    # Last of all, so a demo/ stopped halfway never carries the current version.
    (out_dir / "version.txt").write_text(f"{VERSION}\n")
    print(f"wrote {out_dir / 'version.txt'}")
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="where model/ and data/ are written (created if missing)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the rows, the tokenizer corpus and the weights")
    ap.add_argument("--train_rows", type=int, default=2048, help="rows in data/train.parquet")
    ap.add_argument("--val_rows", type=int, default=16, help="rows in data/val.parquet")
    args = ap.parse_args()
    if args.train_rows < 1 or args.val_rows < 1:
        ap.error("--train_rows and --val_rows must be at least 1 (the tokenizer and val/loss need rows).")
    make_demo(args.out_dir, args.seed, args.train_rows, args.val_rows)


if __name__ == "__main__":
    main()
