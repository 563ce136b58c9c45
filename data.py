"""Data: parquet rows -> chat text -> token ids + target mask -> packed micro-batches.

The chat templates are written out by hand in templates.py (no jinja at runtime), so the trained
character spans come from the same code that writes the text; tests compare it byte for byte with
the official templates rendered through jinja2 the way transformers renders them.

    python data.py inspect FILE.parquet --tokenizer MODEL_DIR [--chat_template auto] [--rows 0:4] [--jsonl OUT]
"""
import argparse
import hashlib
import heapq
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

import templates

ROLES = ("system", "user", "assistant", "tool")


class DataError(Exception):
    """A user-caused problem in the data or data flags; the message is one sentence with the fix."""


def load_tokenizer(model_dir):
    path = Path(model_dir)
    path = path if path.is_file() else path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; model.partial_pretrain must be a HF model directory.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on a damaged file
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise DataError(f"{path} does not parse as a tokenizer ({reason}); restore it from the model's "
                        "original files.") from None


# --------------------------------------------------------------------------- reading rows

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
    # With or without the OpenAI {type, function} wrapper, as the template accepts both.
    fn = call["function"] if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"{where}: {what} has no string name; a tool call needs {{name, arguments}}.")
    # JSON-string arguments are checked here but kept as given: Qwen3's template writes them
    # verbatim, while the Qwen2.5 renderer decodes them before its tojson.
    args = fn.get("arguments")
    decoded = _json(args, f"{what} arguments", where)
    return {"name": fn["name"], "arguments": args if isinstance(args, str) else decoded}


def _messages(raw, where):
    raw = _json(raw, "the messages column", where) if isinstance(raw, str) else raw
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
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} ({role}) has non-string content of type "
                            f"{type(content).__name__}; content must be a string.")
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise DataError(f"{where}: message {j} has loss={loss!r}; loss must be true, false or absent.")
        out.append({"role": role, "content": content, "loss": loss})
        # transformers takes the reasoning from the first of these keys that is not None.
        key = next((k for k in templates.REASONING_KEYS if m.get(k) is not None), None)
        if key is not None:
            if not isinstance(m[key], str):
                raise DataError(f"{where}: message {j} has a {key} of type {type(m[key]).__name__}; "
                                "reasoning must be a string.")
            out[-1]["reasoning_content"] = m[key]
        if calls:
            out[-1]["tool_calls"] = [_tool_call(c, f"message {j} tool call {k}", where)
                                     for k, c in enumerate(calls)]
    return out


def _tools(raw, where):
    tools = None if raw is None or raw == "" else _json(raw, "the tools column", where)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: tools is a {type(tools).__name__}, not a list of tool objects.")
    return tools or None  # an empty list renders like no tools (the template tests `if tools`)


def _parquet_files(files):
    out = []
    for f in [files] if isinstance(files, (str, os.PathLike)) else files:
        p = Path(f)
        found = sorted(p.glob("*.parquet")) if p.is_dir() else [p] if p.is_file() else []
        if not found:
            raise DataError(f"{p} is neither a parquet file nor a directory of them; "
                            "check data.train_files / data.val_files.")
        out += found
    return out


def _enable_thinking(value, key, where):
    # A missing column or a null means thinking is on, as the template's own default.
    if value is None or isinstance(value, bool):
        return value is not False
    raise DataError(f"{where}: column {key!r} holds {value!r}; it must be true, false or null "
                    "(check data.multiturn.enable_thinking_key).")


def _iter_rows(files, multiturn=True, messages_key="messages", tools_key="tools", prompt_key="question",
               response_key="answer", prompt_dict_keys=None, response_dict_keys=None, enable_thinking_key=None):
    """Yield (where, messages, tools, enable_thinking) for every row of every file, in order."""
    want = ([(messages_key, "data.multiturn.messages_key", None)] if multiturn else
            [(prompt_key, "data.prompt_dict_keys", prompt_dict_keys),
             (response_key, "data.response_dict_keys", response_dict_keys)])
    for path in _parquet_files(files):
        try:
            names = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}); "
                            "re-export it or drop it from the data files.") from None
        for key, flag, _ in want:
            if key not in names:
                raise DataError(f"{path} has no column {key!r} (it has {', '.join(names)}); "
                                f"set {flag.replace('_dict_keys', '_key')} to the right column.")
        has_tools = multiturn and tools_key in names  # tools are optional
        has_think = multiturn and enable_thinking_key in names  # so is the enable_thinking column
        columns = dict.fromkeys([k for k, _, _ in want] + [tools_key] * has_tools
                                + [enable_thinking_key] * has_think)  # one column may serve twice
        table = pq.read_table(path, columns=list(columns))
        cols = {k: table.column(k).to_pylist() for k in table.column_names}
        for i in range(table.num_rows):
            where = f"row {i} of {path}"
            if multiturn:
                tools = _tools(cols[tools_key][i], where) if has_tools else None
                think = cols[enable_thinking_key][i] if has_think else None
                think = _enable_thinking(think, enable_thinking_key, where)
                yield where, _messages(cols[messages_key][i], where), tools, think
                continue
            turns = []
            for role, (key, flag, dict_keys) in zip(("user", "assistant"), want):
                value = cols[key][i]
                for k in dict_keys or []:  # verl: a key path picks a field out of a struct column
                    if not isinstance(value, dict) or k not in value:
                        raise DataError(f"{where}: column {key!r} has no field {k!r}; check {flag}.")
                    value = value[k]
                turns.append({"role": role, "content": value})
            yield where, _messages(turns, where), None, True


def read_rows(files, *, multiturn=True, messages_key="messages", tools_key="tools", prompt_key="question",
              response_key="answer", prompt_dict_keys=None, response_dict_keys=None):
    rows = _iter_rows(files, multiturn, messages_key, tools_key, prompt_key, response_key,
                      prompt_dict_keys, response_dict_keys)
    return [(messages, tools) for _, messages, tools, _ in rows]


# --------------------------------------------------------------------------- tokens and mask

def encode(tokenizer, text, spans):
    """Tokenize once; a token is trained when any character it covers is in a trained span."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2) char [start, end)
    chars = np.zeros(len(text) + 1, dtype=np.int64)
    for a, b in spans:
        chars[a:b] = 1
    before = np.concatenate([[0], np.cumsum(chars)])  # before[c] = trained chars in text[:c]
    # Guard against empty offsets: count at least the character a token starts on.
    start, end = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    return ids, (before[end] - before[start] > 0).astype(np.uint8)


def _sample(tokenizer, family, messages, tools, enable_thinking, max_length, truncation, where):
    ids, mask = encode(tokenizer, *templates.render(family, messages, tools, enable_thinking=enable_thinking))
    if max_length is not None and len(ids) > max_length:
        if truncation == "error":
            raise DataError(f"{where} has {len(ids)} tokens, more than data.max_length={max_length}; "
                            "raise data.max_length or set data.truncation=left or right.")
        keep = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
        ids, mask = ids[keep], mask[keep]  # the mask stays aligned with the ids kept
    return ids, mask


# --------------------------------------------------------------------------- dataset and cache

def _sha256(path=None, arrays=()):
    h = hashlib.sha256()
    if path is not None:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _load_cache(path, key, log):
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, mask, lengths = z["ids"], z["mask"], z["lengths"]
            if str(z["key"]) != key or _sha256(arrays=(ids, mask, lengths)) != str(z["digest"]):
                raise ValueError("stored hash does not match")
            counts = (int(z["dropped"]), int(z["unrendered"]))
    except FileNotFoundError:
        return None, (0, 0)
    except Exception as e:
        log(f"warning: data cache {path} is corrupt or stale ({e}); rebuilding it.")
        return None, (0, 0)
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(ids.astype(np.int64), cuts), np.split(mask, cuts))), counts


def _save_cache(path, key, samples, counts):
    ids = np.concatenate([s[0] for s in samples]).astype(np.int32)  # vocab < 2**31: half the file
    mask = np.concatenate([s[1] for s in samples])
    lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank may build at once: each writes a private temp file, then renames it atomically.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=ids, mask=mask, lengths=lengths, key=np.array(key), dropped=counts[0], unrendered=counts[1],
             digest=np.array(_sha256(arrays=(ids, mask, lengths))))
    os.replace(tmp, path)


def build_samples(files, tokenizer, max_length, truncation="error", *, chat_template="qwen2.5",
                  enable_thinking_key="enable_thinking", cache_dir=None, tokenizer_path=None,
                  multiturn=True, messages_key="messages", tools_key="tools", prompt_key="question",
                  response_key="answer", prompt_dict_keys=None, response_dict_keys=None, log=print):
    """Every row of files as (ids int64[L], mask uint8[L]); rows with nothing to train are dropped.

    chat_template is a resolved family (templates.detect), not auto; a row's enable_thinking column
    (enable_thinking_key) decides whether Qwen3's empty think block on its last turn is trained.
    """
    if truncation not in ("error", "left", "right"):
        raise DataError(f"data.truncation={truncation!r} is not one of error, left, right.")
    if chat_template not in templates.FAMILIES:
        raise DataError(f"chat template {chat_template!r} is not one of {', '.join(templates.FAMILIES)}.")
    keys = dict(multiturn=multiturn, messages_key=messages_key, tools_key=tools_key,
                prompt_key=prompt_key, response_key=response_key, prompt_dict_keys=prompt_dict_keys,
                response_dict_keys=response_dict_keys, enable_thinking_key=enable_thinking_key)
    paths = _parquet_files(files)
    names = ", ".join(str(p) for p in paths)
    samples, (dropped, unrendered), cache = None, (0, 0), None
    if cache_dir is not None:
        tok = (_sha256(tokenizer_path) if tokenizer_path
               else hashlib.sha256(tokenizer.to_str().encode()).hexdigest())
        # data.py's and templates.py's own sources are part of the key: a change to rendering must
        # not reuse old ids.
        key = hashlib.sha256(json.dumps([[_sha256(p) for p in paths], tok, max_length, truncation, keys,
                                         chat_template, _sha256(__file__), _sha256(templates.__file__)]
                                        ).encode()).hexdigest()
        cache = Path(cache_dir) / f"samples-{key[:20]}.npz"
        samples, (dropped, unrendered) = _load_cache(cache, key, log)
    if samples is None:
        samples = []
        for where, messages, tools, thinking in _iter_rows(paths, **keys):
            # Qwen2.5 and 2507 Instruct templates write no reasoning: count the rows that lose some.
            unrendered += chat_template != "qwen3" and any(m.get("reasoning_content") for m in messages)
            ids, mask = _sample(tokenizer, chat_template, messages, tools, thinking, max_length, truncation, where)
            if mask.any():
                samples.append((ids, mask))
            else:
                dropped += 1
        if not samples:
            raise DataError(f"no row of {names} has a trained token; "
                            "check its assistant turns and loss fields.")
        if cache is not None:
            _save_cache(cache, key, samples, (dropped, unrendered))
    if dropped:
        log(f"warning: {dropped} rows of {names} have no trained tokens and were dropped.")
    if unrendered:
        log(f"warning: {unrendered} rows of {names} carry reasoning (reasoning_content, thinking or reasoning) "
            f"that the {chat_template} template does not render; that text is not trained.")
    return samples


# --------------------------------------------------------------------------- batches

def epoch_batches(n, batch_size, seed, epoch):
    """Global batches of one epoch: a (seed + epoch) shuffle, the incomplete last batch dropped."""
    perm = np.random.default_rng(seed + epoch).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)  # (steps, batch_size)


def shard(batch_indices, dp_rank, dp_size):
    """This dp rank's contiguous slice of one global batch (train.py checks divisibility)."""
    per = len(batch_indices) // dp_size
    return batch_indices[dp_rank * per:(dp_rank + 1) * per]


def balanced_shard(lengths, batch_indices, dp_rank, dp_size):
    """This dp rank's samples of one global batch when micro-batches are sized by tokens.

    With token budgets (verl's data.use_dynamic_bsz) ranks balance tokens, not sample counts:
    longest sample first, each to the rank with the fewest tokens so far (ties: fewer samples,
    then lower rank), so every rank's step takes about as long. Every sample goes to exactly one
    rank (a rank may get none when the batch is smaller than dp_size); the batch's shuffled order
    is kept within the rank.
    """
    batch_indices = np.asarray(batch_indices)
    lens = np.asarray(lengths)[batch_indices]
    order = np.argsort(-lens, kind="stable")  # longest first; equal lengths in batch order
    loads = [(0, 0, r) for r in range(dp_size)]  # heap of (tokens, samples, rank): already sorted
    owner = np.empty(len(batch_indices), dtype=np.int64)
    for i in order:
        tokens, count, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (tokens + int(lens[i]), count + 1, r))
    return batch_indices[owner == dp_rank]


def token_budget_micro_batches(lengths, max_tokens):
    """Positions into lengths grouped into micro-batches of at most max_tokens tokens each.

    First-fit decreasing (longest sample into the first micro-batch with room) keeps the count
    near the minimum (at most 11/9 of it, plus one). Deterministic: micro-batches in the order
    they were opened (the first holds the longest sample), positions ascending within each.
    A sample longer than the budget cannot be placed and is an error.
    """
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise DataError(f"a sample of {n} tokens (position {i} of the batch) exceeds the micro-batch "
                            f"token budget {max_tokens}; set data.max_token_len_per_gpu >= data.max_length.")
    batches, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in position order
        b = next((b for b, free in enumerate(room) if lengths[i] <= free), len(batches))
        if b == len(batches):
            batches.append([])
            room.append(max_tokens)
        batches[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in batches]


def pack(samples):
    """B samples (ids, mask) -> one varlen stream of T = sum(L) tokens."""
    lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
    ids = np.concatenate([s[0] for s in samples]).astype(np.int64)  # (T,)
    mask = np.concatenate([s[1] for s in samples])  # (T,)
    cu = np.concatenate([[0], np.cumsum(lengths)])  # (B+1,)
    # labels[t] is the target predicted at position t: ids[t+1] when that token is trained. The
    # last token of each sample predicts nothing, so no target crosses into the next sample.
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], -100)
    labels[cu[1:] - 1] = -100
    positions = np.arange(len(ids)) - np.repeat(cu[:-1], lengths)  # (T,) restarts at 0 per sample
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
            "cu_seqlens": torch.from_numpy(cu.astype(np.int32)), "max_seqlen": int(lengths.max()),
            "labels": torch.from_numpy(labels)}


def pad(samples, pad_id):
    """B samples right-padded to the longest L, in the packed layout (T = B * L, cu_seqlens = k * L).

    Padding is untrained and follows each sample's real tokens, so under causal attention within
    a row no real token sees it: the padded batch computes what the packed one does.
    """
    L = max(len(ids) for ids, _ in samples)
    return pack([(np.pad(ids, (0, L - len(ids)), constant_values=pad_id), np.pad(mask, (0, L - len(mask))))
                 for ids, mask in samples])


# --------------------------------------------------------------------------- inspect CLI

def inspect(args):
    tokenizer = load_tokenizer(args.tokenizer)
    model_dir = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else Path(args.tokenizer).parent
    family = templates.detect(model_dir, args.chat_template)
    rows = list(_iter_rows(args.file, args.multiturn, args.messages_key, args.tools_key, args.prompt_key,
                           args.response_key, args.prompt_dict_keys, args.response_dict_keys,
                           args.enable_thinking_key))
    a, colon, b = args.rows.partition(":")
    if not (a or "0").isdigit() or not (b or "0").isdigit():
        raise DataError(f"--rows {args.rows!r} is not a row A or a range A:B of non-negative integers.")
    lo = int(a or 0)
    hi = min(len(rows), (int(b) if b else len(rows)) if colon else lo + 1)
    on, off = ("\x1b[1;32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    out = open(args.jsonl, "w") if args.jsonl else None
    total = trained = 0
    for r in range(lo, hi):
        where, messages, tools, thinking = rows[r]
        ids, mask = _sample(tokenizer, family, messages, tools, thinking, args.max_length, args.truncation, where)
        total, trained = total + len(ids), trained + int(mask.sum())
        cuts = np.flatnonzero(np.diff(mask)) + 1  # print runs of equal mask; trained runs marked
        runs = [(tokenizer.decode(i.tolist(), skip_special_tokens=False), m[0])
                for i, m in zip(np.split(ids, cuts), np.split(mask, cuts))]
        print(f"=== {where}: {len(ids)} tokens, {int(mask.sum())} trained")
        print("".join(on + text + off if m else text for text, m in runs))
        if out:
            out.write(json.dumps({"row": r, "input_ids": ids.tolist(), "loss_mask": mask.tolist()}) + "\n")
    if out:
        out.close()
    print(f"=== rows {lo}:{hi} of {len(rows)}: {total} tokens, {trained} trained ({family} template)")


def main(argv=None):
    p = argparse.ArgumentParser(description="See how rows render, tokenize and which tokens are trained.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="print rows with trained tokens marked ([[...]] when not a tty)")
    q.add_argument("file", help="parquet file or directory of parquet files")
    q.add_argument("--tokenizer", required=True, help="model dir holding tokenizer.json")
    q.add_argument("--max_length", type=int, default=None, help="as data.max_length (default: no limit)")
    q.add_argument("--truncation", default="error", choices=["error", "left", "right"],
                   help="as data.truncation")
    q.add_argument("--multiturn", action=argparse.BooleanOptionalAction, default=True,
                   help="messages column (default) or, with --no-multiturn, single-turn prompt/response")
    q.add_argument("--messages_key", default="messages", help="as data.multiturn.messages_key")
    q.add_argument("--tools_key", default="tools", help="as data.multiturn.tools_key")
    q.add_argument("--chat_template", default="auto", choices=("auto",) + templates.FAMILIES,
                   help="as data.chat_template (default: the template the --tokenizer dir ships)")
    q.add_argument("--enable_thinking_key", default="enable_thinking",
                   help="as data.multiturn.enable_thinking_key")
    q.add_argument("--prompt_key", default="question", help="as data.prompt_key")
    q.add_argument("--response_key", default="answer", help="as data.response_key")
    q.add_argument("--prompt_dict_keys", nargs="*", default=None, help="as data.prompt_dict_keys")
    q.add_argument("--response_dict_keys", nargs="*", default=None, help="as data.response_dict_keys")
    q.add_argument("--rows", default=":", help="row range A:B over all files, or one row A (default: all)")
    q.add_argument("--jsonl", default=None, help="also write {row, input_ids, loss_mask} per row here")
    args = p.parse_args(argv)
    try:
        inspect(args)
    except (DataError, templates.TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
