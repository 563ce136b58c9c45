"""Data-preparation speed: data.build_samples (no cache) beside verl's MultiTurnSFTDataset.

    python bench_data.py --rows FILE.parquet --tokenizer MODEL_DIR [--copies 30] [--repeats 3]

The rows are repeated --copies times into one file. verl (when importable; it is not a dependency
here, see BENCHMARKS.md for the venv) cannot read `tools` stored as a JSON string, so
it gets the same rows with tools decoded into the list<struct> layout; ours is timed on both.
Each repeat times every variant back to back, so a shared machine slows them alike; medians print.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import data


def struct_layout(rows):
    """tools as a list of structs instead of a JSON string (tool-call arguments stay strings:
    verl 0.7.0 fails on argument structs holding lists, which reach its template as arrays)."""
    out = [{**row, "tools": json.loads(row["tools"]) if row.get("tools") else None} for row in rows]
    keep = []  # parquet needs one type per field: drop rows whose values clash with earlier ones
    for row in out:
        try:
            pa.Table.from_pylist(keep + [row])
            keep.append(row)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return keep


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="a parquet file of multi-turn rows")
    p.add_argument("--tokenizer", required=True, help="HF model dir with tokenizer.json (+ tokenizer_config.json)")
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_length", type=int, default=16384, help="as the reference job")
    args = p.parse_args()
    rows = pq.read_table(args.rows).to_pylist()
    converted = struct_layout(rows) if isinstance(rows[0].get("tools"), str) else rows
    print(f"{len(rows)} rows x {args.copies}; {len(converted)} x {args.copies} in the struct layout")
    tmp = Path(tempfile.mkdtemp())
    as_is, structs = tmp / "as_is.parquet", tmp / "structs.parquet"
    pq.write_table(pa.Table.from_pylist(rows * args.copies), as_is)
    pq.write_table(pa.Table.from_pylist(converted * args.copies), structs)
    tokenizer = data.load_tokenizer(args.tokenizer)
    variants = {"ours (file as is)": lambda: data.build_samples(as_is, tokenizer, args.max_length, log=lambda s: None),
                "ours (struct layout)": lambda: data.build_samples(structs, tokenizer, args.max_length,
                                                                   log=lambda s: None)}
    try:
        from omegaconf import OmegaConf
        from transformers import AutoTokenizer
        from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset
        hf = AutoTokenizer.from_pretrained(args.tokenizer)
        config = OmegaConf.create({"max_length": args.max_length, "truncation": "error",
                                   "messages_key": "messages", "tools_key": "tools"})

        def verl():  # as its trainer does: build the dataset, then every __getitem__
            ds = MultiTurnSFTDataset([str(structs)], hf, config)
            return [ds[i]["input_ids"].shape for i in range(len(ds))]  # (right-padded to max_length)
        variants["verl MultiTurnSFTDataset (struct layout)"] = verl
    except ImportError as e:
        print(f"verl not importable ({e}); timing ours only")
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            n = len(fn())
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {r}: {name}: {n} samples in {times[name][-1]:.2f}s", flush=True)
    base = statistics.median(times[next(iter(times))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name}: median {med:.2f}s ({med / base:.1f}x ours on the file as is)")


if __name__ == "__main__":
    main()
