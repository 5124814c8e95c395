"""
The pieces of the report that evaluate.py and kl_sweep.py share: a stage's metrics.jsonl, the PPO curves in it,
the over-optimisation verdict on them, and the over-optimisation sweep's section of a report (markdown, with its
picture when matplotlib is installed). evaluate.py puts that section into out/report.md, kl_sweep.py into
out/sweep/report.md.
"""

import json
import os

from nanorlhf import train_common, utils
from nanorlhf.utils import write_atomic


# -----------------------------------------------------------------------------
# metrics and the PPO curves in them


def metrics_path(path):
    """
    The metrics.jsonl of a run, given its directory or a checkpoint file in it (the checkpoint flags take either):
    "out/rm" -> "out/rm/metrics.jsonl", "out/rm/ckpt.pt" -> "out/rm/metrics.jsonl"; any other path is itself.
    """
    if os.path.isdir(path):
        return os.path.join(path, "metrics.jsonl")
    if os.path.isfile(path) and not path.endswith(".jsonl"):  # a checkpoint: its run's metrics are beside it
        return os.path.join(os.path.dirname(path), "metrics.jsonl")
    return path


def read_metrics(path):
    """The rows of a run's metrics.jsonl (metrics_path; [] if there is none); a half-written last line is skipped."""
    path = metrics_path(path)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# the curves: label -> the key train_ppo.py logs in metrics.jsonl (one row per iteration, "iter" from 1)
CURVE_KEYS = {"rm score": "rm_score", "gold score": "gold", "KL": "kl"}


def curves(rows):
    """PPO metrics rows -> {"iter": [...], "rm score": [...], "gold score": [...], "KL": [...]} ([] if not logged)."""
    out = {"iter": [r.get("iter", i + 1) for i, r in enumerate(rows)]}
    for label, key in CURVE_KEYS.items():
        out[label] = [r[key] for r in rows] if rows and all(key in r for r in rows) else []
    return out


def smooth(xs, window):
    """Trailing moving average: smooth([1, 2, 3, 4], 2) -> [1.0, 1.5, 2.5, 3.5]."""
    out = []
    for i in range(len(xs)):
        w = xs[max(0, i - window + 1):i + 1]
        out.append(sum(w) / len(w))
    return out


def overoptimisation(c, tol=0.03):
    """
    Does the gold score peak and then fall while the RM score keeps rising (Gao et al. 2022)?
    On the curves smoothed over a tenth of the run: the gold peak, the gold and RM at the end, the RM at
    the gold peak, the KL at both. shows = gold fell from its peak by more than tol while the RM score at
    the end is at least what it was at the gold peak.
    """
    gold, rm, kl = c["gold score"], c["rm score"], c["KL"]
    if not gold or not rm or not kl:
        return None
    w = max(1, len(gold) // 10)
    gold, rm, kl = smooth(gold, w), smooth(rm, w), smooth(kl, w)
    peak = max(range(len(gold)), key=lambda i: gold[i])
    return {"gold_start": gold[0], "gold_peak": gold[peak], "gold_end": gold[-1], "rm_start": rm[0],
            "rm_at_peak": rm[peak], "rm_end": rm[-1], "kl_at_peak": kl[peak], "kl_end": kl[-1],
            "iter_at_peak": c["iter"][peak], "iter_end": c["iter"][-1],
            "shows": gold[-1] < gold[peak] - tol and rm[-1] >= rm[peak]}


# -----------------------------------------------------------------------------
# the pictures (matplotlib is optional)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_sweep(plt, runs, path):
    """Gold and RM score against KL, one line per run, smoothed as in the table (the over-optimisation picture)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, c in runs.items():
        w = max(1, len(c["iter"]) // 10)
        for ax, label in zip(axes, ("gold score", "rm score")):
            ax.plot(smooth(c["KL"], w), smooth(c[label], w), label=name)
    for ax, label in zip(axes, ("gold score", "rm score")):
        ax.set_xlabel("KL to the SFT model (nats per response)")
        ax.set_title(f"{label} vs KL")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the over-optimisation sweep's section of a report


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


SWEEP_HEADING = "## Over-optimisation"  # how the section starts: kl_sweep.py knows its own report.md by it


def sweep_problem(sweep_dir, sft=None, rm=None):
    """
    Why the PPO runs in sweep_dir (its subdirectories with a metrics.jsonl) are not one finished sweep, or None: a run
    without its ckpt.pt, a run short of its --num_iterations (killed, or stopped by --stop_at), runs of different
    lengths (one of them left from an earlier sweep), or, given sft and rm (a report's checkpoints), a run trained from
    other models than those: the digests of its inputs in its train_state.pt (train_common.input_digests) differ.
    Example: beta0 at iteration 3 of 3 and default at 1 of 3 -> "the default run stopped at iteration 1 of 3 ...".
    """
    if not os.path.isdir(sweep_dir):
        return None
    names = sorted(d for d in os.listdir(sweep_dir) if os.path.isfile(os.path.join(sweep_dir, d, "metrics.jsonl")))
    now = train_common.input_digests({"--sft": sft, "--rm": rm}) if names and sft else {}  # rm None: not compared
    lengths = {}
    for name in names:
        run = os.path.join(sweep_dir, name)
        if not os.path.isfile(os.path.join(run, utils.CKPT)):
            return f"the {name} run ({run}) has no {utils.CKPT}"
        ckpt = utils.load_checkpoint(run, mmap=True)
        done, planned = ckpt.get("step"), ckpt.get("args", {}).get("num_iterations")
        if done != planned:
            return (f"the {name} run ({run}) stopped at iteration {done} of {planned}: finish it (python train_ppo.py "
                    f"--out_dir {run} --resume on) or run the sweep again")
        lengths[name] = planned
        if now and os.path.isfile(os.path.join(run, utils.TRAIN_STATE)):
            saved = utils.load_checkpoint(run, name=utils.TRAIN_STATE, mmap=True).get("inputs") or {}
            other = [f for f in now if saved.get(f, now[f]) != now[f]]
            if other:
                return (f"the {name} run ({run}) was trained from another {' and '.join(other)} than "
                        f"{' and '.join({'--sft': sft, '--rm': rm}[f] for f in other)}: run the sweep again")
    if len(set(lengths.values())) > 1:
        return (f"the runs in {sweep_dir} have different lengths ({', '.join(f'{n} {k}' for n, k in lengths.items())} "
                f"iterations): run the sweep again")
    return None


def sweep_section(sweep_dir, plt, report_dir):
    """
    The over-optimisation experiment's section of a report (markdown), from sweep_dir/*/metrics.jsonl as
    written by kl_sweep.py, with sweep_dir/sweep.png when matplotlib is there (linked relative to
    report_dir); None when sweep_dir holds no runs.
    """
    if not os.path.isdir(sweep_dir):
        return None
    runs = {}
    for name in sorted(d for d in os.listdir(sweep_dir) if os.path.isdir(os.path.join(sweep_dir, d))):
        c = curves(read_metrics(os.path.join(sweep_dir, name)))
        if c["iter"] and c["KL"] and c["gold score"] and c["rm score"]:
            runs[name] = c
    if not runs:
        return None
    lines = [f"{SWEEP_HEADING}: PPO with beta = 0 against the default beta", "",
             f"Runs in `{sweep_dir}` (made by `python kl_sweep.py`), from their metrics.jsonl: rollout means on the",
             "training prompts, smoothed over a tenth of each run. KL: nats per response.", ""]
    if plt is not None:
        png = os.path.join(sweep_dir, "sweep.png")
        plot_sweep(plt, runs, png)
        lines += [f"![gold and RM score against KL]({os.path.relpath(png, report_dir)})", ""]
    lines += ["| run | iters | KL at the end | RM score start -> end | gold start -> peak (at KL) -> end | "
              "over-optimised |", "|---|---|---|---|---|---|"]
    verdicts = {name: overoptimisation(c) for name, c in runs.items()}
    for name, o in verdicts.items():
        lines.append(f"| {name} | {o['iter_end']} | {fmt(o['kl_end'])} | {fmt(o['rm_start'])} -> {fmt(o['rm_end'])} "
                     f"| {fmt(o['gold_start'])} -> {fmt(o['gold_peak'])} ({fmt(o['kl_at_peak'])}) -> "
                     f"{fmt(o['gold_end'])} | {'yes' if o['shows'] else 'no'} |")
    lines.append("")
    shown = [name for name, o in verdicts.items() if o["shows"]]
    if shown:
        lines.append(f"**Over-optimisation shows at this size** ({', '.join(shown)}): the RM score kept rising while "
                     "the gold score fell from its peak.")
    else:
        lines.append("**Over-optimisation does not show at this size**: in no run did the gold score fall from its "
                     "peak (by more than 0.03, smoothed) while the RM score kept rising.")
    if "beta0" in verdicts and "default" in verdicts:
        b0, bd = verdicts["beta0"], verdicts["default"]
        lines.append(f"With beta = 0 the policy drifted to KL {fmt(b0['kl_end'])} and ended at gold "
                     f"{fmt(b0['gold_end'])} (RM {fmt(b0['rm_end'])}); with the default beta it stayed at KL "
                     f"{fmt(bd['kl_end'])} and ended at gold {fmt(bd['gold_end'])} (RM {fmt(bd['rm_end'])}).")
    return "\n".join(lines)
