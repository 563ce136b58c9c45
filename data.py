"""Data: parquet / JSON rows -> chat text -> token ids + target mask (samples; batches.py batches them).

A sample is (ids int64[L], mask uint8[L], turn int32[L], calls uint8[K]): the tokens, which are trained,
which of the sample's K trained assistant turns each token belongs to (-1: none: prompt, tool output,
or a trained non-assistant message), and which of those turns carry tool calls. The turns feed the
validation metrics (val/turn_exact, val/tool_call_exact); training reads ids and mask only.

Rows are read here and normalised by templates.normalise (the one message contract); the chat
templates are written out by hand in templates.py (no jinja at runtime), so the trained character
spans come from the same code that writes the text. Training and `inspect` encode through the same
path (_encoded), so what inspect shows is what the trainer trains.

    python data.py inspect FILE --tokenizer MODEL_DIR [--chat_template auto] [--rows 0:4] [--jsonl OUT]
        [--apply_chat_template_kwargs '{"enable_thinking": false}']
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

import templates
from templates import DataError  # the message contract raises it as well

CACHE_FORMAT = 2  # the sample layout in the cache file: 2 added turn and calls; an older file is rebuilt


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

def _data_files(files):
    """The files behind data.train_files / val_files: each file as given, a directory's parquet
    and JSON files in name order."""
    out = []
    for f in [files] if isinstance(files, (str, os.PathLike)) else files:
        p = Path(f)
        found = (sorted(q for q in p.iterdir() if q.suffix in (".parquet", ".json", ".jsonl")) if p.is_dir()
                 else [p] if p.is_file() else [])
        if not found:
            raise DataError(f"{p} is neither a parquet or JSON file nor a directory of them; "
                            "check data.train_files / data.val_files.")
        out += found
    return out




def _enable_thinking(value, key, where, default):
    # A missing column or a null takes the default (data.enable_thinking_default, else the template's: on).
    if value is None or isinstance(value, bool):
        return default if value is None else value
    raise DataError(f"{where}: column {key!r} holds {value!r}; it must be true, false or null "
                    "(check data.multiturn.enable_thinking_key).")

def _json_rows(path):
    """The rows of a .jsonl (one object per line) or .json (a list of objects) file, as written.

    The json module keeps each row as the user wrote it (no struct unification, so nothing is
    pruned that was not there; a JSON-string column stays a string), which is what the parquet
    path yields after _prune.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); re-export it as UTF-8 JSON.") from None
    if path.suffix == ".jsonl":
        rows = []
        # split on "\n" only: str.splitlines would also cut at U+2028 inside a JSON string
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"line {n} of {path} is not valid JSON ({e.msg} at column {e.colno}); "
                                    "fix or remove that line.") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                            "fix the file, or write one row per line as .jsonl.") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows; write a list "
                            "of objects, or one object per line as .jsonl.")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {i} of {path} is a {type(row).__name__}, not an object of columns.")
    return rows


def _read_columns(path, keys):
    """(every column name, {key: values} for the keys present, number of rows) of one data file."""
    if path.suffix in (".json", ".jsonl"):
        rows = _json_rows(path)
        names = list(dict.fromkeys(k for row in rows for k in row))  # a key any row has is a column
        return names, {k: [row.get(k) for row in rows] for k in keys if k in names}, len(rows)
    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}); "
                        "re-export it or drop it from the data files.") from None
    table = pq.read_table(path, columns=[k for k in keys if k in names])
    return names, {k: table.column(k).to_pylist() for k in table.column_names}, table.num_rows


def _num_rows(path):
    """Rows in one data file without decoding them (a .json list has to be parsed)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return len(_json_rows(path)) if path.suffix == ".json" else pq.read_metadata(path).num_rows


def _iter_rows(files, multiturn=True, messages_key="messages", tools_key="tools", prompt_key="question",
               response_key="answer", prompt_dict_keys=None, response_dict_keys=None, enable_thinking_key=None,
               enable_thinking_default=True):
    """Yield (where, messages, tools, enable_thinking) for every row of every file, in order, the
    messages and tools normalised by templates.normalise (the one message contract)."""
    want = ([(messages_key, "data.multiturn.messages_key", None)] if multiturn else
            [(prompt_key, "data.prompt_dict_keys", prompt_dict_keys),
             (response_key, "data.response_dict_keys", response_dict_keys)])
    for path in _data_files(files):
        # one column may serve twice (prompt and response); tools are optional
        names, cols, num_rows = _read_columns(
            path, dict.fromkeys([k for k, _, _ in want] + [tools_key, enable_thinking_key] * multiturn))
        for key, flag, _ in want:
            if key not in names:
                raise DataError(f"{path} has no column {key!r} (it has {', '.join(names)}); "
                                f"set {flag.replace('_dict_keys', '_key')} to the right column.")
        has_tools = multiturn and tools_key in names
        has_think = multiturn and enable_thinking_key in names  # optional as well
        for i in range(num_rows):
            where = f"row {i} of {path}"
            if multiturn:
                tools = templates.normalise_tools(cols[tools_key][i], where) if has_tools else None
                think = cols[enable_thinking_key][i] if has_think else None
                think = _enable_thinking(think, enable_thinking_key, where, enable_thinking_default)
                yield where, templates.normalise(cols[messages_key][i], where), tools, think
                continue
            turns = []
            for role, (key, flag, dict_keys) in zip(("user", "assistant"), want):
                value = cols[key][i]
                for k in dict_keys or []:  # verl: a key path picks a field out of a struct column
                    if not isinstance(value, dict) or k not in value:
                        raise DataError(f"{where}: column {key!r} has no field {k!r}; check {flag}.")
                    value = value[k]
                turns.append({"role": role, "content": value})
            yield where, templates.normalise(turns, where), None, enable_thinking_default


def read_rows(files, *, multiturn=True, messages_key="messages", tools_key="tools", prompt_key="question",
              response_key="answer", prompt_dict_keys=None, response_dict_keys=None):
    """[(messages, tools)] of every row, normalised (generate.py and demo.py read rows this way)."""
    rows = _iter_rows(files, multiturn, messages_key, tools_key, prompt_key, response_key,
                      prompt_dict_keys, response_dict_keys)
    return [(messages, tools) for _, messages, tools, _ in rows]


# --------------------------------------------------------------------------- tokens and mask

def _ids_and_mask(enc, spans, replies=None):
    """A token is trained when any character it covers is in a trained span. With replies (templates.render's
    (start, end, has_tool_calls) per trained assistant reply) also the sample's turn and calls arrays."""
    ids = np.asarray(enc.ids, dtype=np.int64)
    offsets = enc.offsets  # a list of (start, end) char offsets; flattened, far faster than asarray
    offsets = np.fromiter(itertools.chain.from_iterable(offsets), np.int64, 2 * len(offsets)).reshape(-1, 2)  # (T, 2)
    # Guard against empty offsets: count at least the character a token starts on.
    start, end = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    spans = np.array(spans, dtype=np.int64).reshape(-1, 2)  # (S, 2) char [a, b)
    spans = spans[spans[:, 1] > spans[:, 0]]
    a, b = np.sort(spans[:, 0]), np.sort(spans[:, 1])
    # [start, end) meets span [a, b) iff a < end and b > start. Every span with b <= start also has
    # a < end, so (#spans with a < end) - (#spans with b <= start) counts the spans a token meets.
    mask = (np.searchsorted(a, end, "left") - np.searchsorted(b, start, "right") > 0).astype(np.uint8)
    if replies is None:
        return ids, mask
    r = np.array([(a, b) for a, b, _ in replies], dtype=np.int64).reshape(-1, 2)  # (K, 2), disjoint, in order
    last = np.searchsorted(r[:, 0], end, "left") - 1  # the last reply starting before the token ends
    meets = (last >= 0) & (r[np.maximum(last, 0), 1] > start) if len(r) else np.zeros(len(ids), dtype=bool)
    turn = np.where(meets, last, -1).astype(np.int32)
    return ids, mask, turn, np.array([c for _, _, c in replies], dtype=np.uint8)


def encode(tokenizer, text, spans):
    """Tokenize once; the mask comes from the tokens' character offsets."""
    return _ids_and_mask(tokenizer.encode(text, add_special_tokens=False), spans)


def _truncate(ids, mask, turn, calls, max_length, truncation, where):
    if max_length is not None and len(ids) > max_length:
        if truncation == "error":
            raise DataError(f"{where} has {len(ids)} tokens, more than data.max_length={max_length}; "
                            "raise data.max_length or set data.truncation=left or right.")
        keep = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
        # mask and turn stay aligned with the ids kept; a turn cut away entirely keeps its calls entry
        # but has no trained token left, so the metrics do not count it
        ids, mask, turn = ids[keep], mask[keep], turn[keep]
    return ids, mask, turn, calls



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
            turn, calls, n_turns = z["turn"], z["calls"], z["n_turns"]
            if str(z["key"]) != key or _sha256(arrays=(ids, mask, lengths, turn, calls, n_turns)) != str(z["digest"]):
                raise ValueError("stored hash does not match")
            counts = (int(z["dropped"]), int(z["unrendered"]))
    except FileNotFoundError:
        return None, (0, 0)
    except Exception as e:
        log(f"warning: data cache {path} is corrupt or stale ({e}); rebuilding it.")
        return None, (0, 0)
    cuts, turn_cuts = np.cumsum(lengths)[:-1], np.cumsum(n_turns)[:-1]
    return list(zip(np.split(ids.astype(np.int64), cuts), np.split(mask, cuts), np.split(turn, cuts),
                    np.split(calls, turn_cuts))), counts


def _save_cache(path, key, samples, counts):
    ids = np.concatenate([s[0] for s in samples]).astype(np.int32)  # vocab < 2**31: half the file
    mask = np.concatenate([s[1] for s in samples])
    lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
    turn, calls = np.concatenate([s[2] for s in samples]), np.concatenate([s[3] for s in samples])
    n_turns = np.array([len(s[3]) for s in samples], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank may build at once: each writes a private temp file, then renames it atomically.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=ids, mask=mask, lengths=lengths, turn=turn, calls=calls, n_turns=n_turns, key=np.array(key),
             dropped=counts[0], unrendered=counts[1],
             digest=np.array(_sha256(arrays=(ids, mask, lengths, turn, calls, n_turns))))
    os.replace(tmp, path)


def _encoded(tokenizer, family, rows, kwargs, max_length, truncation, chunk_rows=512):
    """Chunks [(where, messages, ids, mask, turn, calls)] of (where, messages, tools, enable_thinking) rows: the one
    encode path, which training and inspect both use. Rendered a chunk at a time, then tokenized with
    one encode_batch per chunk (the Rust side spreads it over all cores); kwargs go to every render."""
    rows = iter(rows)

    def encoded_chunks():
        # encode_batch releases the GIL: it runs in a thread while this one reads and renders the
        # next chunk and masks the previous one, so Python and Rust work at the same time.
        with ThreadPoolExecutor(1) as pool:
            ahead = None
            while chunk := list(itertools.islice(rows, chunk_rows)):
                rendered = [(*templates.render(family, messages, tools, enable_thinking=thinking, where=where,
                                               replies=(replies := []), **kwargs), replies)
                            for where, messages, tools, thinking in chunk]  # the per-row render call
                job = pool.submit(tokenizer.encode_batch, [text for text, _, _ in rendered], add_special_tokens=False)
                if ahead:
                    yield ahead[0], ahead[1], ahead[2].result()
                ahead = (chunk, rendered, job)
            if ahead:
                yield ahead[0], ahead[1], ahead[2].result()

    for chunk, rendered, encodings in encoded_chunks():
        yield [(where, messages, *_truncate(*_ids_and_mask(enc, spans, replies), max_length, truncation, where))
               for (where, messages, _, _), (_, spans, replies), enc in zip(chunk, rendered, encodings)]


def _tokenize_rows(tokenizer, family, paths, keys, kwargs, max_length, truncation, log, chunk_rows=512):
    """(samples, rows dropped, rows whose reasoning the template drops) of every row of paths.
    Logs progress every ~5 s when it takes that long."""
    samples, dropped, unrendered, done, total = [], 0, 0, 0, None
    t_start = t_log = time.time()
    for chunk in _encoded(tokenizer, family, _iter_rows(paths, **keys), kwargs, max_length, truncation, chunk_rows):
        for where, messages, ids, mask, turn, calls in chunk:
            # Qwen2.5 and 2507 Instruct templates write no reasoning: count the rows that lose some.
            unrendered += family not in templates.THINKING and any(m.get("reasoning_content") for m in messages)
            if mask.any():
                samples.append((ids, mask, turn, calls))
            else:
                dropped += 1
        done += len(chunk)
        if time.time() - t_log >= 5:
            total = total or sum(_num_rows(p) for p in paths)  # counted once, only for long builds
            t_log, rate = time.time(), done / (time.time() - t_start)
            log(f"data: tokenized {done:,} / {total:,} rows | {rate:,.0f} rows/s | "
                f"eta {max(0.0, (total - done) / rate):.0f}s")
    return samples, dropped, unrendered


def render_kwargs(family, template_kwargs, enable_thinking_default, flag="data.apply_chat_template_kwargs."):
    """(the kwargs every render gets, enable_thinking for rows whose column is missing or null)."""
    kwargs = templates.check_kwargs(family, template_kwargs, flag)
    thinking = kwargs.pop("enable_thinking", None)
    if enable_thinking_default is not None:
        if not isinstance(enable_thinking_default, bool) or "enable_thinking" not in templates.KWARGS[family]:
            raise DataError(f"data.enable_thinking_default={enable_thinking_default!r} is not read by the {family} "
                            "template or is not true/false; drop it or give true or false.")
        if thinking is not None and thinking != enable_thinking_default:
            raise DataError(f"data.enable_thinking_default and {flag}enable_thinking disagree; give only one.")
        thinking = enable_thinking_default
    return kwargs, thinking is not False  # None: the template's own default, thinking on


def build_samples(files, tokenizer, max_length, truncation="error", *, chat_template="qwen2.5",
                  enable_thinking_key="enable_thinking", template_kwargs=None, enable_thinking_default=None,
                  cache_dir=None, tokenizer_path=None, multiturn=True, messages_key="messages", tools_key="tools",
                  prompt_key="question", response_key="answer", prompt_dict_keys=None, response_dict_keys=None,
                  log=print):
    """Every row of files as a sample (ids, mask, turn, calls; the module docstring); rows with nothing to
    train are dropped.

    chat_template is a resolved family (templates.detect), not auto. template_kwargs (verl's
    data.apply_chat_template_kwargs) go to every row's render; a row's enable_thinking column
    (enable_thinking_key) overrides enable_thinking, and rows where it is missing or null take
    enable_thinking_default (None: the template kwarg, else the template's own default).
    """
    if truncation not in ("error", "left", "right"):
        raise DataError(f"data.truncation={truncation!r} is not one of error, left, right.")
    if chat_template not in templates.FAMILIES:
        raise DataError(f"chat template {chat_template!r} is not one of {', '.join(templates.FAMILIES)}.")
    kwargs, thinking = render_kwargs(chat_template, template_kwargs, enable_thinking_default)
    keys = dict(multiturn=multiturn, messages_key=messages_key, tools_key=tools_key,
                prompt_key=prompt_key, response_key=response_key, prompt_dict_keys=prompt_dict_keys,
                response_dict_keys=response_dict_keys, enable_thinking_key=enable_thinking_key,
                enable_thinking_default=thinking)
    paths = _data_files(files)
    names = ", ".join(str(p) for p in paths)
    samples, (dropped, unrendered), cache = None, (0, 0), None
    if cache_dir is not None:
        tok = (_sha256(tokenizer_path) if tokenizer_path
               else hashlib.sha256(tokenizer.to_str().encode()).hexdigest())
        # data.py's and templates.py's own sources are part of the key: a change to rendering must
        # not reuse old ids. keys holds the enable_thinking default; kwargs the other template kwargs.
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, [_sha256(p) for p in paths], tok, max_length, truncation, keys,
                                         sorted(kwargs.items()), chat_template, _sha256(__file__),
                                         _sha256(templates.__file__)]).encode()).hexdigest()
        cache = Path(cache_dir) / f"samples-v{CACHE_FORMAT}-{key[:20]}.npz"
        samples, (dropped, unrendered) = _load_cache(cache, key, log)
    if samples is None:
        samples, dropped, unrendered = _tokenize_rows(tokenizer, chat_template, paths, keys, kwargs, max_length,
                                                      truncation, log)
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


# --------------------------------------------------------------------------- inspect CLI

def parse_rows(spec, n):
    """--rows `A:B` (either end may be empty) or one row `A` -> (lo, hi), hi clipped to the n rows."""
    a, colon, b = spec.partition(":")
    if not (a or "0").isdigit() or not (b or "0").isdigit():
        raise DataError(f"--rows {spec!r} is not a row A or a range A:B of non-negative integers.")
    lo = int(a or 0)
    return lo, min(n, (int(b) if b else n) if colon else lo + 1)


def parse_kwargs(text, flag="--apply_chat_template_kwargs"):
    """A --apply_chat_template_kwargs JSON object (generate.py takes the same flag)."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        kwargs = e
    if not isinstance(kwargs, dict):
        raise DataError(f"{flag} {text!r} is not a JSON object; write e.g. '{{\"enable_thinking\": false}}'.")
    return kwargs


def inspect(args):
    tokenizer = load_tokenizer(args.tokenizer)
    model_dir = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else Path(args.tokenizer).parent
    family = templates.detect(model_dir, args.chat_template, flag="--chat_template ")
    kwargs, thinking = render_kwargs(family, parse_kwargs(args.apply_chat_template_kwargs), None,
                                        flag="--apply_chat_template_kwargs ")
    n = sum(_num_rows(p) for p in _data_files(args.file))
    lo, hi = parse_rows(args.rows, n)
    rows = _iter_rows(args.file, args.multiturn, args.messages_key, args.tools_key, args.prompt_key,
                      args.response_key, args.prompt_dict_keys, args.response_dict_keys, args.enable_thinking_key,
                      thinking)
    on, off = ("\x1b[1;32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    out = open(args.jsonl, "w") if args.jsonl else None
    total = trained = 0
    # The trainer's own encode path, on the selected rows only.
    chunks = _encoded(tokenizer, family, itertools.islice(rows, lo, hi), kwargs, args.max_length, args.truncation)
    for r, (where, _, ids, mask, _, _) in enumerate(itertools.chain.from_iterable(chunks), lo):
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
    print(f"=== rows {lo}:{hi} of {n}: {total} tokens, {trained} trained ({family} template)")


def main(argv=None):
    p = argparse.ArgumentParser(description="See how rows render, tokenize and which tokens are trained.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="print rows with trained tokens marked ([[...]] when not a tty)")
    q.add_argument("file", help="parquet, .jsonl or .json file, or a directory of them")
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
    q.add_argument("--apply_chat_template_kwargs", default="{}",
                   help='as data.apply_chat_template_kwargs, a JSON object: \'{"preserve_thinking": false}\'')
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
