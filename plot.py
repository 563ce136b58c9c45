"""The loss curve of a run as a picture: {out_dir}/metrics.jsonl -> {out_dir}/loss.png.

    python plot.py OUT_DIR      # redraw it (trainer.default_local_dir of a run)

train.py calls plot_metrics on rank 0 at every checkpoint save. matplotlib is imported only here and
only when drawing, so training runs without it (and says so once).
"""
import json
import sys
from pathlib import Path


def read_metrics(path):
    """The records of metrics.jsonl, one per step (the LAST one written), in step order.

    A resumed run appends to the file and may repeat steps: a run killed after logging step 7 but
    before saving step 7 resumes from its checkpoint at 5 and logs 6 and 7 again; the later records
    are the ones the run's checkpoints continue from. A record cut short by a kill is skipped; the
    resumed run's first record then follows it on the same line, and is kept.
    """
    by_step = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            try:  # train.py writes "step" first: the last record starting on this line, if whole
                rec = json.loads(line[line.rfind('{"step"'):])
            except json.JSONDecodeError:
                continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(out_dir, title, log=print):
    """Draw train/loss per step, val/loss points and the lr (second axis) into out_dir/loss.png, and below
    them, when the run validated, val/turn_exact and val/tool_call_exact per validation.

    Returns the path, or None (after one log line saying why) when matplotlib is missing or there
    is nothing to plot yet.
    """
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    if not records:
        log(f"no loss.png: {metrics} has no step records yet.")
        return None
    try:
        # The object API with the Agg canvas: no pyplot global state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log("no loss.png: matplotlib is not installed (pip install matplotlib to get the loss curve).")
        return None
    steps = [r["step"] for r in records]
    exact = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None]
             for k in ("val/turn_exact", "val/tool_call_exact")}
    panels = 2 if any(exact.values()) else 1  # the second: what greedy decoding reproduces, per validation
    fig = Figure(figsize=(8, 4.5 + 2.5 * (panels - 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False, height_ratios=[1.8, 1][:panels])[:, 0]
    ax = axes[0]
    ax.plot(steps, [r.get("train/loss", float("nan")) for r in records], color="tab:blue", lw=1.5, label="train/loss")
    val = [(r["step"], r["val/loss"]) for r in records if r.get("val/loss") is not None]
    if val:
        ax.plot(*zip(*val), "o", color="tab:red", ms=6, label="val/loss")
    axes[-1].set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()  # the lr has another scale (1e-5 vs a loss of ~1): its own axis on the right
    lr_ax.plot(steps, [r.get("train/lr", float("nan")) for r in records], color="tab:gray", lw=1, ls="--", label="train/lr")
    lr_ax.set_ylabel("lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(f"{title}{lora_note(out_dir)} ({steps[-1]} steps)")
    if panels == 2:
        for (key, points), style in zip(exact.items(), ("o-", "s--")):
            if points:
                axes[1].plot(*zip(*points), style, ms=5, label=key)
        axes[1].set_ylim(-0.03, 1.03)
        axes[1].set_ylabel("exact fraction")
        axes[1].grid(alpha=0.3)
        axes[1].legend(loc="upper left")
    path = out_dir / "loss.png"
    tmp = out_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    tmp.replace(path)  # a reader (or a kill) never sees a half-written picture
    return path


def run_config(out_dir):
    """The resolved config train.py writes to out_dir/run.json at the start of a run, or {}."""
    try:
        cfg = json.loads((Path(out_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def lora_note(out_dir):
    """ ", LoRA r=8 alpha=16" for a LoRA run (its loss is not comparable with full fine-tuning's), else "". """
    cfg = run_config(out_dir)
    rank = cfg.get("lora_rank") or 0
    return f", LoRA r={rank} alpha={cfg.get('lora_alpha')}" if isinstance(rank, int) and rank > 0 else ""


def run_title(out_dir):
    """project/experiment from the run.json train.py writes, else the directory's name."""
    cfg = run_config(out_dir)
    if "project_name" in cfg and "experiment_name" in cfg:
        return f"{cfg['project_name']}/{cfg['experiment_name']}"
    return Path(out_dir).resolve().name


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python plot.py OUT_DIR  (a run's trainer.default_local_dir, holding metrics.jsonl)",
              file=sys.stderr)
        sys.exit(2)
    png = plot_metrics(sys.argv[1], run_title(sys.argv[1]))
    if png is None:
        sys.exit(1)
    print(png)
