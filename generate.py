"""Sample replies from a checkpoint with our own model and a decoding cache, beside the data's replies.

    python generate.py CHECKPOINT_DIR --data FILE.parquet [--rows 0:3] [--turn -1] [--max_new_tokens 512]
        [--temperature 0] [--top_p 1.0] [--seed 0] [--chat_template auto] [--enable_thinking true] [--jsonl OUT]
        [--apply_chat_template_kwargs '{"reasoning_effort": "low"}']
    python generate.py CHECKPOINT_DIR --prompt "What is 17 * 23?"
    python generate.py CHECKPOINT_DIR --data VAL.parquet --score [--rows A:B] [--all_turns] [--jsonl OUT]

CHECKPOINT_DIR is any HF model dir model.py loads: a run's global_step_N/huggingface/ or the
original model. Each row's conversation before its LAST assistant turn (or --turn N) is rendered
with the model's chat template plus the generation prompt, and the reply is generated one token at
a time until <|im_end|> or an eos id of generation_config.json. CUDA in bf16 when there is one, else CPU in fp32.
Every family decodes through one cache: full-attention layers keep their keys and values, Qwen3.5's Gated
DeltaNet layers their conv window and recurrent state; model.py is unchanged, the cache swaps in the layers'
attn_fn / mix_fn for the duration of a generate call.

--score replies greedily in place of every assistant turn with tool calls (every turn: --all_turns), parses
the reply's tool calls in the template's format (templates.parse_tool_calls) and prints a table: replies that
stop at <|im_end|>, that hold >= 1 tool-call block and all parse, whose names are all the row's tools, whose
arguments all satisfy the tool's parameter schema (templates.check_arguments), and whose calls equal the reference's
(names and arguments as parsed objects, in order). Each level counts only turns that passed the one above.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model as M
import templates
from sft_kernels.gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule_reference

HEADER, END = "<|im_start|>assistant\n", "<|im_end|>"


class GenerateError(Exception):
    """A user-caused problem with the arguments or the rows; the message is one sentence with the fix."""


# --------------------------------------------------------------------------- decoding cache and sampling

class Cache:
    """What decoding keeps per layer of the tokens seen so far (one sample). Full attention: the post-RoPE
    keys and values, one preallocated buffer per layer (prompt + every new token: no reallocation per step).
    Gated DeltaNet: the conv window (the last K-1 q/k/v channel rows before the conv) and the recurrent state
    (Hv, Dk, Dv) fp32. `length` tokens are cached; the model's forward updates each layer through the
    functions generate swaps in (attend, mix), then generate calls advance(n)."""

    def __init__(self, num_layers, capacity):
        self.capacity, self.length = capacity, 0
        self.k, self.v = [None] * num_layers, [None] * num_layers
        self.conv, self.state = [None] * num_layers, [None] * num_layers

    def advance(self, n):
        self.length += n

    def attend(self, i, prefill, q, k, v, cu_seqlens, max_seqlen):
        """Layer i's attn_fn (bound with functools.partial): appends the new k/v (n, Hkv, D) and attends
        the new q (n, H, D) over every cached key, causal within the new tokens. The first call (the
        prompt, nothing cached yet) is plain causal attention: the layer's own attn_fn `prefill` (the
        Triton kernel on CUDA). Qwen3.5's output gate is applied by the layer, after this."""
        n, past = q.shape[0], self.length
        if self.k[i] is None:
            self.k[i] = k.new_empty(self.capacity, *k.shape[1:])  # (capacity, Hkv, D)
            self.v[i] = v.new_empty(self.capacity, *v.shape[1:])
        self.k[i][past:past + n], self.v[i][past:past + n] = k, v
        if past == 0:
            return prefill(q, k, v, cu_seqlens, max_seqlen)
        keys, values = self.k[i][:past + n], self.v[i][:past + n]  # (L, Hkv, D), L = past + n
        # New token j sits at position past + j and sees keys 0 .. past + j.
        pos = torch.arange(past + n, device=q.device)
        keep = pos[None, :] <= pos[past:, None]  # (n, L)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                           attn_mask=keep, enable_gqa=True)  # (H, n, D); head h reads kv h // (H/Hkv)
        return o.transpose(0, 1)  # (n, H, D)

    def mix(self, i, qkv, b, a, conv_weight, A_log, dt_bias, cu_seqlens, head_k_dim, head_v_dim):
        """Layer i's mix_fn: model.gated_delta_mix continued from the stored conv window and state (zero before
        the prompt), which it then replaces. The prompt runs the chunked delta rule (Triton on CUDA); each
        decoding step one step of the token-by-token recurrence from the stored state."""
        C, K = qkv.shape[1], conv_weight.shape[-1]
        window = self.conv[i] if self.conv[i] is not None else qkv.new_zeros(K - 1, C)
        x = torch.cat([window, qkv])  # (K-1+n, C): a zero window is the conv's own zero padding
        self.conv[i] = x[x.shape[0] - (K - 1):]
        whole = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
        qkv = M.causal_conv1d_varlen(x, conv_weight.squeeze(1), whole)[K - 1:]  # (n, C)
        rule = chunk_gated_delta_rule if self.state[i] is None else gated_delta_rule_reference
        o, self.state[i] = rule(*M.delta_rule_inputs(qkv, b, a, A_log, dt_bias, head_k_dim, head_v_dim),
                                scale=head_k_dim ** -0.5, initial_state=self.state[i],
                                output_final_state=True)  # state (1, Hv, Dk, Dv)
        return o[0]  # (n, Hv, Dv)


def swap_in(model, cache):
    """Route every layer's token mixing through the cache; returns the function that puts the originals back."""
    swaps = []  # (module, attribute, original)
    for i, layer in enumerate(model.model.layers):
        if getattr(layer, "layer_type", "full_attention") == "linear_attention":
            swaps.append((layer.linear_attn, "mix_fn", layer.linear_attn.mix_fn))
            layer.linear_attn.mix_fn = functools.partial(cache.mix, i)
        else:
            swaps.append((layer.self_attn, "attn_fn", layer.self_attn.attn_fn))
            layer.self_attn.attn_fn = functools.partial(cache.attend, i, layer.self_attn.attn_fn)

    def restore():
        for module, name, fn in swaps:
            setattr(module, name, fn)
    return restore


def next_token(logits, temperature, top_p, generator):
    """Greedy at temperature 0; else a draw from softmax(logits / T) cut to its top-p head."""
    if temperature <= 0:
        return int(logits.argmax())
    # On CPU with a CPU generator: the same seed draws the same tokens on any device.
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest head with mass >= top_p (>= 1 token)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))  # multinomial renormalises


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, stop_ids=(), temperature=0.0, top_p=1.0, generator=None):
    """New token ids after prompt_ids (a list of ints), ending with the stop id when one was drawn. The
    prompt goes through once (one sample); then each step feeds the last token at position cache.length,
    and only that position goes through the LM head."""
    device = model.lm_head.weight.device
    cache = Cache(len(model.model.layers), len(prompt_ids) + max_new_tokens)
    restore = swap_in(model, cache)
    out, ids = [], torch.tensor(prompt_ids, dtype=torch.long, device=device)
    try:
        while len(out) < max_new_tokens:
            n = ids.numel()
            cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=device)
            position_ids = cache.length + torch.arange(n, device=device)
            h = model.hidden_states(ids, cu_seqlens, position_ids, n)  # (n, C)
            cache.advance(n)
            out.append(next_token(model.lm_head(h[-1]).float(), temperature, top_p, generator))
            if out[-1] in stop_ids:
                break
            ids = torch.tensor(out[-1:], dtype=torch.long, device=device)
    finally:
        restore()  # the model is left as it was given
    return out


# --------------------------------------------------------------------------- prompts and references

def prompt_and_reference(family, messages, tools, enable_thinking, where, turn=-1, kwargs=None):
    """The chat text before one assistant turn (by default the LAST) plus the generation prompt,
    and that turn as the template writes it after the generation prompt (without its <|im_end|>).
    kwargs: the other template kwargs (data.render_kwargs), as training renders with them."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]  # with a prompt before
    if not -len(turns) <= turn < len(turns):
        raise GenerateError(f"{where} has {len(turns)} assistant turns after a prompt, so --turn {turn} names none; "
                            "pick rows with replies, another --turn, or ask a free question with --prompt.")
    i = turns[turn]
    kw = dict(kwargs or {}, enable_thinking=enable_thinking, where=where)
    prompt, _ = templates.render(family, messages[:i], tools, add_generation_prompt=True, **kw)
    full, _ = templates.render(family, messages[:i + 1], tools, **kw)
    # Cut what the generation prompt already holds (a think block opening, or the empty one without thinking).
    reference = full[full.rfind(HEADER) + len(HEADER):].removeprefix(prompt[prompt.rfind(HEADER) + len(HEADER):])
    return prompt, reference[:reference.rfind(END)] if END in reference else reference


def parse_rows(spec, n):
    """data.py's --rows syntax as a range; selecting no row is an error here."""
    lo, hi = data.parse_rows(spec, n)
    if lo >= min(hi, n):
        raise GenerateError(f"--rows {spec!r} selects no row of the {n} in the file; pick rows in 0:{n}.")
    return range(lo, hi)


def stop_ids(model_dir, tokenizer):
    """<|im_end|> plus generation_config.json's eos ids (an int or a list; config.json's when absent)."""
    path = next(p for p in (model_dir / "generation_config.json", model_dir / "config.json") if p.is_file())
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path} is not valid JSON ({e}); restore the file.") from None
    return {tokenizer.token_to_id(END), *(eos if isinstance(eos, list) else [eos])} - {None}


# --------------------------------------------------------------------------- scoring tool calls

LEVELS = (("stopped", "replies that stop at <|im_end|>"), ("parsed", "hold tool-call blocks that all parse"),
          ("names", "name only tools of the row"), ("schema", "have arguments that satisfy the schema"),
          ("equal", "equal the reference calls"))


def score_turn(family, reply, stopped, reference_calls, tools):
    """One turn's levels (each implies the one before, equal aside) and the reply's parsed calls."""
    calls = templates.parse_tool_calls(family, reply, tools)
    schemas = templates._tool_schemas(tools)
    parsed = bool(calls) and None not in calls
    names = parsed and all(c["name"] in schemas for c in calls)
    schema = names and all(templates.check_arguments(c["arguments"], schemas[c["name"]]) for c in calls)
    reference = [{"name": c["name"], "arguments": json.loads(c["arguments"]) if isinstance(c["arguments"], str)
                  else c["arguments"] or {}} for c in reference_calls]
    return dict(stopped=stopped, parsed=parsed, names=names, schema=schema, equal=stopped and calls == reference,
                calls=calls)


def score_table(records, what):
    n = len(records)
    lines = [f"=== score: {n} {what}", f"{'':44}{'count':>7}{'fraction':>10}", f"{'turns':44}{n:>7}{1:>10.3f}"]
    lines += [f"{text:44}{sum(r[key] for r in records):>7}{sum(r[key] for r in records) / max(n, 1):>10.3f}"
              for key, text in LEVELS]
    return "\n".join(lines + ["schema: required keys, no undeclared keys, JSON types, enums (top level only)"])


# --------------------------------------------------------------------------- CLI

def run(args):
    model_dir = Path(args.checkpoint)
    if not (model_dir / "config.json").is_file():
        raise GenerateError(f"{model_dir} has no config.json; pass a Hugging Face model dir, e.g. "
                            "SAVE_PATH/global_step_N/huggingface.")
    if (args.data is None) == (args.prompt is None):
        raise GenerateError("pass exactly one of --data FILE.parquet and --prompt TEXT.")
    if args.score and (args.data is None or args.temperature > 0):
        raise GenerateError("--score replies greedily to --data rows; pass --data FILE and no --temperature.")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GenerateError("--max_new_tokens must be >= 1, --temperature >= 0 and --top_p in (0, 1].")
    family = templates.detect(model_dir, args.chat_template, flag="--chat_template ")
    kw = data.parse_kwargs(args.apply_chat_template_kwargs)
    kw.update({} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"})
    kw, thinking = data.render_kwargs(family, kw, None, flag="--apply_chat_template_kwargs ")
    if args.prompt is not None:
        user = templates.normalise([{"role": "user", "content": args.prompt}])
        items = [("prompt", templates.render(family, user, enable_thinking=thinking, add_generation_prompt=True,
                                             **kw)[0], None)]
    else:
        rows = data.read_rows(args.data)  # [(messages, tools)]: the one call into data.py's reader
        selected = parse_rows(args.rows or (":" if args.score else "0:3"), len(rows))
        # Every row is checked before the model loads: a bad row costs no wait.
        if not args.score:
            items = [(r, *prompt_and_reference(family, *rows[r], thinking, f"row {r} of {args.data}", args.turn, kw))
                     for r in selected]
        else:  # (row, turn, prompt, reference, the turn's calls) for each scored turn
            turns = [(r, k, i) for r in selected for k, i in enumerate(
                [i for i, m in enumerate(rows[r][0]) if m["role"] == "assistant" and i > 0])
                if args.all_turns or rows[r][0][i].get("tool_calls")]
            items = [(f"{r} turn {k}", *prompt_and_reference(family, *rows[r], thinking, f"row {r} of {args.data}", k, kw),
                      (r, k), rows[r][0][i].get("tool_calls") or [], rows[r][1]) for r, k, i in turns]
            if not items:
                raise GenerateError(f"rows {args.rows or ':'} of {args.data} have no assistant turn with tool calls "
                                    "to score; pick other rows or pass --all_turns.")
    tokenizer = data.load_tokenizer(model_dir)
    stop = stop_ids(model_dir, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = M.load_pretrained(model_dir, dtype=dtype, device=device).eval()
    print(f"model: {model_dir} ({family} template, {device.type} {str(dtype).removeprefix('torch.')})")
    generator = torch.Generator().manual_seed(args.seed)
    records = []
    for row, prompt, reference, *scored in items:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        t0 = time.time()
        new = generate(model, ids, args.max_new_tokens, stop, args.temperature, args.top_p, generator)
        stopped = bool(new) and new[-1] in stop
        reply = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        print(f"=== {'row ' * (row != 'prompt')}{row}: {len(ids)} prompt tokens, {len(new)} new in "
              f"{time.time() - t0:.1f}s ({'stopped at eos' if stopped else 'max_new_tokens reached'})")
        if not args.score:
            print(f"--- reply:\n{reply}" + (f"\n--- reference:\n{reference}" if reference is not None else ""))
        records.append({"row": row, "prompt": prompt, "reply": reply, "reference": reference})
        if args.score:
            records[-1].update(zip(("row", "turn"), scored[0]), **score_turn(family, reply, stopped, *scored[1:]))
            print(" ".join(f"{key} {'yes' if records[-1][key] else 'no'}" for key, _ in LEVELS))
    if args.score:
        print(score_table(records, f"assistant turns {'' if args.all_turns else 'with tool calls '}in rows "
                                   f"{selected.start}:{selected.stop} of {args.data}"))
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("checkpoint", help="HF model dir: SAVE_PATH/global_step_N/huggingface or the original model")
    a("--data", default=None, help="parquet file (or dir) of conversations to reply to")
    a("--prompt", default=None, help="one user message instead of --data")
    a("--rows", default=None, help="row range A:B of --data, or one row A (default 0:3; with --score all)")
    a("--turn", type=int, default=-1, help="the assistant turn to reply in place of: -1 the last, 0 the first")
    a("--max_new_tokens", type=int, default=512, help="stop after this many new tokens")
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top_p", type=float, default=1.0, help="sample only from the top-p probability mass")
    a("--seed", type=int, default=0, help="seeds the sampling")
    a("--chat_template", default="auto", choices=("auto",) + templates.FAMILIES,
      help="as data.chat_template: auto recognises the model dir's template")
    a("--enable_thinking", default=None, choices=["true", "false"],
      help="Qwen3/3.5/3.8 (default: the template's own, on): false puts the empty think block into the prompt")
    a("--apply_chat_template_kwargs", default="{}",
      help='as data.apply_chat_template_kwargs, a JSON object: \'{"preserve_thinking": false}\'')
    a("--jsonl", default=None, help="also write {row, prompt, reply, reference} per row (--score: per turn, "
                                      "with its levels and parsed calls) here")
    a("--score", action="store_true", help="score the tool calls of greedy replies (see above; needs --data)")
    a("--all_turns", action="store_true", help="--score every assistant turn, not only those with tool calls")
    try:
        run(p.parse_args(argv))
    except (GenerateError, M.ModelError, data.DataError, templates.TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
