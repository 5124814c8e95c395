"""Running the top-level scripts as a user does (a subprocess), for the end-to-end tests of the stages."""

import json
import os
import subprocess
import sys
import threading
import types
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread and MKL's reproducible mode: two processes then compute bit-identical floats whatever the
# memory alignment and thread timing, which the resume tests rely on (tiny models gain nothing from threads)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
TIMINGS = ("time", "tok_per_s", "mfu")  # the only metrics that differ between two identical runs


def kill_at_rename(monkeypatch, name):
    """
    A kill (KeyboardInterrupt) as os.replace renames a file called `name` into place; other renames go on. Returns
    the real os.replace, for the test to put back.
    """
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == name:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return real_replace


def script(name, *args, check=True):
    """Run ROOT/name with args; with check, fail the test (showing stderr) unless it exits 0."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def closed_early(args, lines):
    """
    Run args with stdout a pipe that its reader closes after `lines` lines, as `args | head` does -> (status, stderr).
    stdout is block-buffered, as a pipe's is unless PYTHONUNBUFFERED is set.
    """
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    # stdin from /dev/null: a script that wrongly waits for input (sample.py's chat) ends instead of waiting on
    # the terminal of whoever runs the tests
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    # readline and read have no timeout of their own: a child that hangs is killed, which ends them
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        p.kill()

    timer = threading.Timer(300, stop)
    timer.start()
    try:
        for i in range(lines):
            if not p.stdout.readline():
                err = p.stderr.read()
                ended = "was killed after 300 s" if timed_out.is_set() else f"exited {p.wait()}"
                raise AssertionError(f"{args} printed {i} of {lines} lines and {ended}; stderr:\n{err[-3000:]}")
        p.stdout.close()
        err = p.stderr.read()
        return p.wait(), err
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def track_checkpoint_dicts(monkeypatch, module, probe):
    """
    Wrap the checkpoint loaders module holds (load_model, load_run, load_model_checkpoint), and those of the package
    modules that call them for it (utils.load_reward_model calls utils.load_model, train_common.start_run
    train_common.load_run), so that every checkpoint dict they return is watched (a weakref), and module.<probe> so
    that each call appends how many of those dicts are still alive to the list returned. Returns (alive, refs):
    after a run, not any(alive) means no checkpoint dict (a CPU copy of the weights) was held while training (or
    sampling).
    """
    class Ckpt(dict):  # a dict that a weakref can point at
        pass

    refs, alive = [], []

    def tracking(real, where):  # where: the checkpoint dict's place in what real returns
        def load(*a, **kw):
            values = list(real(*a, **kw))
            values[where] = Ckpt(values[where])
            refs.append(weakref.ref(values[where]))
            return tuple(values)
        return load

    from nanorlhf import train_common, utils

    for holder in (module, utils, train_common):
        for name, where in (("load_model", 2), ("load_run", 0), ("load_model_checkpoint", 1)):
            if hasattr(holder, name):
                monkeypatch.setattr(holder, name, tracking(getattr(holder, name), where))
    real_probe = getattr(module, probe)

    def probed(*a, **kw):
        alive.append(sum(r() is not None for r in refs))
        return real_probe(*a, **kw)

    monkeypatch.setattr(module, probe, probed)
    return alive, refs


def frozen_stage(monkeypatch, stage):
    """
    Patch a training stage's module (train_rm, or train_sft's stage code) for a run whose metrics rows a test can
    recount: its optimizer_step is handed lr 0 (the gradient norm is the real one, the weights stay put), its clock
    ticks 0.5 s at each read (a step's start and end: 0.5 s a step) and its peak is 1 GFLOP/s. -> the list that
    collects the lr each step was given.
    """
    real_step, lrs = stage.optimizer_step, []

    def frozen_step(model, optimizer, lr, *a, **kw):
        lrs.append(lr)
        return real_step(model, optimizer, 0.0, *a, **kw)

    clock = [0.0]

    def tick():
        clock[0] += 0.5
        return clock[0]

    monkeypatch.setattr(stage, "optimizer_step", frozen_step)
    monkeypatch.setattr(stage, "time", types.SimpleNamespace(perf_counter=tick, time=stage.time.time))
    monkeypatch.setattr(stage, "peak_flops", lambda rt: (1e9, "test"))
    return lrs
