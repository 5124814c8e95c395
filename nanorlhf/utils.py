"""
The plumbing that every stage shares: errors, flags, device and dtype, checkpoints, metrics, lr schedule.

Nothing here knows about RLHF; it is the part of nanoGPT's train.py that three scripts would otherwise copy.
"""

import argparse
import dataclasses
import difflib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from nanorlhf.data import DataError

# -----------------------------------------------------------------------------
# errors


class UserError(Exception):
    """A problem with what the user asked for (a flag, a path): reported in one line, no traceback."""


class Terminated(BaseException):
    """
    SIGTERM (a scheduler's or `kill`'s stop), raised in the main thread by run()'s handler. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` takes it for an error of its own.
    """


_terminated_at = None  # time.monotonic() of the SIGTERM that raised Terminated in this run(), None before one


def _terminate(signum, frame):
    """
    The first SIGTERM raises Terminated. A repeat within a second is the same stop, sent again: coreutils'
    `timeout -s TERM` signals the command, then its process group, which holds the command itself, so a driver
    (compare.py, kl_sweep.py) gets it twice within microseconds; it is ignored. A later one (a user who does not want
    to wait for the cleanup) ends the process at once, as a SIGTERM would without this handler.
    """
    global _terminated_at
    if _terminated_at is None:
        _terminated_at = time.monotonic()
        raise Terminated()
    if time.monotonic() - _terminated_at > 1.0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


ERROR_WAIT = 3.0  # seconds a rank other than 0 waits before it prints its error (say_error)


def say_error(message):
    """
    Print a user's mistake, one line, to stderr, once also under torchrun. There every rank usually meets the same
    mistake, and when one rank exits torchrun ends the others at once, so a rank other than 0 waits ERROR_WAIT
    seconds first: where rank 0 met the mistake too, it prints it and torchrun ends this rank in the meantime; where
    only this rank did (a rank past the machine's last GPU), the line comes from it, after its rank. (torchrun looks
    at its ranks every 0.1 s by default; with --monitor-interval 3 or more both may print.)
    """
    rank = int(os.environ.get("RANK", 0))
    if rank > 0:
        time.sleep(ERROR_WAIT)
        message = f"[rank {rank}] {message}"
    print(message, file=sys.stderr, flush=True)


def run(main):
    """
    Call main(); turn the user's mistakes into one line on stderr and exit status 2.

    Under torchrun a rank then leaves with os._exit, without the interpreter's teardown. The process group is down
    by then (dist.cleanup), but the objects that hold on to it (DDP's reducer, FSDP's state) can live until the
    teardown, where gloo's threads may abort the process ("terminate called without an active exception", exit
    status -6) after a run that finished and saved everything (a few times in some two hundred 2-rank test runs
    here). Every file the scripts write is closed or flushed when main() returns; stdout and stderr are flushed
    here. atexit handlers do not run then: whatever needs closing is closed in main().

    Ctrl-C (KeyboardInterrupt) is the user's choice, not a bug: one line, "interrupted", and exit status 130, as a
    shell reports a process stopped by SIGINT. Every file is saved atomically, so what is on disk is whole: the last
    checkpoint, from which a training run goes on with --resume.

    SIGTERM is handled as Ctrl-C is: one line, "terminated", and exit status 143 (a shell's for SIGTERM). The exception
    it raises runs the cleanup that a plain SIGTERM would skip: a save's temporaries go, and subprocess.run kills the
    child it waits on (kl_sweep.py's and compare.py's train_*.py), which would otherwise go on as an orphan, writing
    into out_dir. A second SIGTERM more than a second after the first ends the process at once (_terminate). One
    that comes while another stop is being handled (torchrun follows a Ctrl-C's SIGINT with a SIGTERM within a
    millisecond) changes nothing: the first stop is the one reported.

    Under torchrun "interrupted" and "terminated" come from rank 0 only (every rank got the signal); a mistake's line
    comes once, see say_error.

    A reader that stops reading (`python sample.py ... | head`) is not an error either: nothing is printed and the exit
    status is 141, as a shell reports a process stopped by SIGPIPE. stdout is flushed inside the try, so that a pipe
    that breaks only at the last flush is caught too, and is then pointed at /dev/null: the interpreter's own flush
    at exit would meet the broken pipe again.
    """
    global _terminated_at
    code, message, _terminated_at = 0, None, None
    # signal handlers can only be set in the main thread (a test may call run() from another one)
    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handled else None
    try:
        try:
            main()
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141
        except (UserError, DataError) as e:
            code, message = 2, f"error: {e}"
        except OSError as e:
            # a path the OS refuses (a file where --out_dir's directory goes, a file we may not read) or a full disk:
            # the user's to fix, so one line too. Only OSError: any other exception is a bug and keeps its traceback
            code, message = 2, f"error: {os_error_line(e)}"
        except KeyboardInterrupt:
            code, message = 130, "interrupted"
        except Terminated:
            code, message = 143, "terminated"
        finally:
            if handled and previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signal.SIGTERM, previous)
    except Terminated:  # a SIGTERM while the lines above handled another stop
        code, message = code or 143, message or "terminated"
        if handled and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code == 2:
        say_error(message)
    elif message is not None and int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def os_error_line(e):
    """
    An OSError in one line: the path (or the two paths of a rename) and the OS's reason, e.g.
    FileExistsError(17, "File exists", "out/afile") -> "out/afile: File exists", and an empty path is shown as one:
    FileNotFoundError(2, "No such file or directory", "") -> "'' (an empty path): No such file or directory".
    One without a path or an errno, OSError("disk full") -> "disk full".
    """
    reason = e.strerror or _one_line(e) or type(e).__name__
    paths = [os.fsdecode(p) if isinstance(p, (str, bytes)) else str(p) for p in (e.filename, e.filename2)
             if p is not None]
    paths = [p if p else "'' (an empty path)" for p in paths]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


# -----------------------------------------------------------------------------
# flags: a dataclass is the single source of truth for names, defaults and help


def flag(default, help):
    """A dataclass field with a help string, e.g. `lr: float = flag(3e-4, "peak learning rate")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(s)


def finite_float(s):
    """
    A float flag's type: a number, not nan or inf (in any case, with a sign, or as an overflow such as 1e999). No
    flag of nanorlhf means either, and a run given one would start, clear its out_dir, and fail at its first step.
    """
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return x


def _optional(base):
    def convert(s):
        return None if s.lower() == "none" else base(s)

    convert.__name__ = base.__name__  # argparse names the type in its error messages
    return convert


MAX_SEED = 2**32 - 1  # numpy's seeds are 0 .. 2**32 - 1


class FlagParser(argparse.ArgumentParser):
    """
    argparse with strict flags: no abbreviations (a prefix such as `--kl` never sets `--kl_coef`, so a typo or a
    flag of another version cannot silently set a different one), and every mistake is one line on stderr and
    exit status 2. An unknown flag gets the flags it abbreviates, else the closest names:
        $ python train_ppo.py --kl 0.1
        train_ppo.py: error: unknown flag --kl (did you mean --kl_coef, --kl_estimator or --kl_horizon?)
    Every script builds its parser with this class (parse_flags does), so a new script inherits it. Its --help
    shows every flag's default after the flag's help, or "(required)".
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)

    def add_argument(self, *names, **kwargs):
        if names[0].startswith("--") and kwargs.get("help") != argparse.SUPPRESS:
            end = "(required)" if kwargs.get("required") else "(default: %(default)s)"  # argparse fills in the default
            kwargs["help"] = f"{kwargs.get('help') or ''} {end}".lstrip()
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        # unknown flags first, before argparse complains about a missing required one the typo was meant to be
        options = [o for o in self._option_string_actions if o.startswith("--")]
        for a in args:
            if a == "--":
                break
            name = a.split("=", 1)[0]
            # a word with a space in it is a value to argparse (`--grpo_flags "--lr 1e-4"`), not a flag
            if name.startswith("--") and name not in options and " " not in a:
                hint = suggest(name, options)
                self.error(f"unknown flag {name}" + (f" (did you mean {hint}?)" if hint else " (see --help)"))
        ns, extras = self.parse_known_args(args, namespace)
        if "--" in extras:  # the end of the flags, which argparse keeps: the argument after it is the unexpected one
            extras.remove("--")
        if extras:
            what = f"unknown flag {extras[0]}" if extras[0].startswith("-") else f"unexpected argument {extras[0]!r}"
            self.error(f"{what} (flags are --name value; see --help)")
        # a script's --seed seeds numpy (setup_runtime), which takes 0 to MAX_SEED only: refused at parsing in every
        # script, also in those that only pass it on to others (compare.py, kl_sweep.py)
        seed = getattr(ns, "seed", None)
        if type(seed) is int and not 0 <= seed <= MAX_SEED:
            self.error(f"argument --seed: {seed} is out of range (a seed is 0 to {MAX_SEED})")
        return ns

    def error(self, message):
        """One line instead of argparse's usage block (once under torchrun); the full usage is a --help away."""
        say_error(f"{self.prog}: error: {message}")
        self.exit(2)


def suggest(name, options, n=3):
    """
    The flags a mistyped `name` most likely meant: the ones it abbreviates, else the closest by difflib.
    suggest("--kl", ["--kl_coef", "--kl_estimator", "--lr"]) -> "--kl_coef or --kl_estimator"
    suggest("--lerning_rate", ["--learning_rate", "--lr"]) -> "--learning_rate"
    """
    picks = [o for o in options if o.startswith(name)][:n] or difflib.get_close_matches(name, options, n=n, cutoff=0.6)
    return " or ".join(picks) if len(picks) <= 2 else ", ".join(picks[:-1]) + " or " + picks[-1]


def one_process():
    """
    For the scripts that torchrun gains nothing from (evaluate, sample, export_hf, compare, kl_sweep): under it every
    rank would do the whole work and write the same files. One line instead, said once (say_error).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    check(world == 1, f"{os.path.basename(sys.argv[0])} runs in one process, but torchrun started {world}: run it "
                      f"with python (only the train_*.py scripts use several)")


def parse_flags(cls, argv=None, description=None):
    """
    Build a FlagParser from a dataclass, parse argv and return an instance of the dataclass.
    A bool field `compile: bool = False` becomes `--compile` (and `--compile false` also works).
    Optional fields (default None) take the type of their annotation, e.g. `top_k: int | None`. A float flag refuses
    nan and inf (finite_float).
    The instance's `_given` is the set of the flags that argv names (given at their default value or not): a
    resumed run takes only those from the command line (train_common.resumed_flags).
    """
    parser = FlagParser(description=description)
    for f in dataclasses.fields(cls):
        # argparse formats a help string with %: a literal one ("~30% slower") is written %% (FlagParser adds the
        # default)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        typ, optional = f.type, False
        if isinstance(typ, str):  # under `from __future__ import annotations`
            typ = {"int": int, "float": float, "str": str, "bool": bool}[typ.split("|")[0].strip()]
        elif not isinstance(typ, type):  # `int | None`: "none" on the command line gives None back
            typ, optional = next(a for a in typing.get_args(typ) if a is not type(None)), True
        if typ is float:
            typ = finite_float
        if optional:
            typ = _optional(typ)
        if typ is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=f.default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=typ, default=f.default, help=help_text)
    # argparse fills in a default only where the namespace lacks the name, so a flag still `unset` was not given
    unset = object()
    ns = vars(parser.parse_args(argv, argparse.Namespace(**{f.name: unset for f in dataclasses.fields(cls)})))
    args = cls(**{f.name: f.default if ns[f.name] is unset else ns[f.name] for f in dataclasses.fields(cls)})
    args._given = {name for name, value in ns.items() if value is not unset}
    return args


def check(condition, message):
    """Validate a derived size or a flag combination right after parsing."""
    if not condition:
        raise UserError(message)


def check_out_dir_flag(out_dir, name="--out_dir"):
    """
    An output directory flag must name a directory we can write, or one that makedirs can create: said at start-up, in
    one line naming the flag, not as an OS error about a path after the data and models are loaded. Nothing is
    created here. Example: "out/afile" (a file) -> "--out_dir out/afile: it is not a directory".
    """
    check(out_dir.strip(), f"{name}: empty (give a directory)")
    existing = out_dir.rstrip(os.sep) or os.sep
    while not os.path.lexists(existing):  # the nearest ancestor that exists: makedirs creates the rest below it
        existing = os.path.dirname(existing) or "."
    what = "it" if existing == out_dir.rstrip(os.sep) else existing
    check(os.path.isdir(existing), f"{name} {out_dir}: {what} is not a directory")
    check(os.access(existing, os.W_OK | os.X_OK), f"{name} {out_dir}: {what} is not writable")


# -----------------------------------------------------------------------------
# device, dtype, autocast: decided once, here


@dataclass
class Runtime:
    device: torch.device
    device_type: str  # "cuda" | "cpu" | "mps"
    dtype: str  # "float32" | "bfloat16" | "float16"

    def autocast(self):
        """
        The context every forward pass runs in: autocast to bf16/fp16 when the dtype asks for it (on a CPU too),
        nothing in float32. The weights stay float32 (autocast casts them per op), so the optimizer updates
        float32 master weights; the output heads stay float32 in any case (model.float32_head).
        """
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))


def cpu_has_fast_bf16():
    """
    Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles, as torch reports them); without them
    oneDNN emulates bf16, which is no faster than float32. bench.py prints it, so a user knows whether
    `--dtype bfloat16` can pay on a CPU.
    """
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(cpu, name, None)  # private probes of torch 2.x; absent -> assume no
        if probe is not None and probe():
            return True
    return False


def auto_dtype(device_type):
    """
    What --dtype auto means: bfloat16 autocast where the hardware multiplies bf16 natively (a GPU that supports it,
    a CPU with AVX512-BF16 or AMX), float32 everywhere else. On the 2-core AVX512-BF16 development machine the
    built-in pipeline's training loops ran 1.29x faster in bf16 (two threads; 1.42x on one), and its held-out
    gold, win rate and reward-model accuracy held over three seeds (README, "bfloat16 on a CPU").
    `--dtype float32` opts out.
    """
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cpu":
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    return "float32"


def available_devices():
    """
    The --device values this machine can run, in words, e.g. "cpu" or "cpu, cuda (cuda:0 to cuda:1)" or "cpu, mps".
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names.append("cuda (cuda:0)" if n == 1 else f"cuda (cuda:0 to cuda:{n - 1})")
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def setup_runtime(device="auto", dtype="auto", seed=0, training=False):
    """
    device: "auto" picks cuda when available, else cpu. dtype: "auto" is auto_dtype(device): bfloat16 autocast on a
    GPU or CPU that multiplies bf16 natively, float32 otherwise; "bfloat16" autocasts on any CPU; float16 only when
    not training (float16 gradients would need loss scaling, which we do not do: bfloat16 has float32's range); on a
    CPU without native bf16 it says once (rank 0) that it will be slow. Seeds python, numpy and torch.
    """
    check(0 <= seed <= MAX_SEED, f"--seed {seed}: out of range (a seed is 0 to {MAX_SEED})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (try --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):  # torch names more device types (meta, xla, ...): we run on none
        raise UserError(f"--device {device}: nanorlhf runs on cpu, cuda or mps; this machine has "
                        f"{available_devices()}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; it has {available_devices()}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: no such GPU; this machine has {available_devices()}")
    if dtype == "auto":
        dtype = auto_dtype(dev.type)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    if training and dtype == "float16":
        raise UserError("--dtype float16: training needs loss scaling in float16, which nanorlhf does not do; "
                        "use bfloat16 or float32")
    if dev.type == "cpu" and dtype == "bfloat16" and not cpu_has_fast_bf16() and os.environ.get("RANK", "0") == "0":
        print("note: --dtype bfloat16 on a CPU without native bf16 (torch finds neither AVX512-BF16 nor AMX): torch "
              "emulates its matmuls, 13x slower than float32 for the built-in SFT step on an AVX2 CPU; --dtype auto "
              "is float32 here", file=sys.stderr)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)  # the current device is the run's: rng_state saves that one's generator
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(dev, dev.type, dtype)


def maybe_compile(model, enabled):
    """torch.compile when asked; the returned module shares parameters with `model`."""
    return torch.compile(model) if enabled else model


def rng_state():
    """Every random state a resumed run needs, as plain tensors and lists (weights_only-loadable)."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        # the run's device only (setup_runtime makes it the current one): under torchrun rank 0 saves and every rank
        # restores, and the ranks share one stream, so rank 0's device's state is every rank's
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], list):  # a file of an older version: every device's state, as it saved them
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])  # on the current device, this rank's


def _numpy_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# -----------------------------------------------------------------------------
# checkpoints: a directory; files written atomically; loading never runs code

CKPT = "ckpt.pt"  # model weights, config, tokenizer, stage, flags, step
TRAIN_STATE = "train_state.pt"  # optimizer, rng, data position: what --resume needs


def write_atomic(path, write):
    """
    Write the file at path through write(tmp), a callable that writes a temporary name beside it, then rename it
    into place: a crash or an error in write never leaves half a file, an overwritten good one, or the temporary.
    Example: write_atomic("out/fig.png", lambda tmp: fig.savefig(tmp, format="png"))
    """
    tmp = tmp_name(path)
    try:
        remove_stale_tmps(path)
        with writing(path):
            write(tmp)
            fsync(tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def writing(path):
    """
    Name path in the one-line error (run()) of a write inside that fails: an OSError that names no file (a full disk
    met when a buffered write is flushed: "No space left on device" and nothing more) gets path as its file, and
    torch.save's RuntimeError on a full disk ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs
    534", no errno) becomes the OSError it stands for when the disk is indeed full. Any other RuntimeError is a bug
    and keeps its traceback.
    Example: with writing("out/sft/ckpt.pt"): torch.save(...) -> "error: out/sft/ckpt.pt: No space left on device"
    """
    try:
        yield
    except OSError as e:
        if e.filename is None:
            if e.strerror is None:  # OSError("disk full"), a message only: it stays the reason, beside the path
                raise OSError(e.errno, str(e), path) from e
            e.filename = path
        raise
    except RuntimeError as e:
        if not disk_full(os.path.dirname(path)):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e


def disk_full(folder, margin=1 << 20):
    """Whether the file system of folder has less than margin bytes left for us (False where it cannot tell)."""
    try:
        st = os.statvfs(folder or ".")
    except (AttributeError, OSError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < margin


def tmp_name(path):
    """The temporary name a file is written to before it is renamed into place: beside it, this process's own."""
    return path + f".tmp{os.getpid()}"


def remove_stale_tmps(path, kind="tmp"):
    """
    Remove the temporaries of path (tmp_name), files or directories, whose process is gone: a process killed by
    SIGKILL mid-write runs no cleanup, and nothing ever loads them. A running process's temporary (this one's,
    another rank's) is left alone. kind: the word before the pid, "tmp" (path.tmp<pid>), or "old" for the
    path.old<pid> that export_hf.py moves an earlier export to while it puts the new one in place.
    """
    folder, base = os.path.split(path)
    for name in os.listdir(folder or "."):
        m = re.fullmatch(re.escape(base) + r"\." + kind + r"(\d+)", name)
        if m and not pid_alive(int(m.group(1))):
            stale = os.path.join(folder, name)
            if os.path.isdir(stale):  # train_common.keep_samples_until writes a directory of files
                shutil.rmtree(stale)
            else:
                os.remove(stale)


def remove_resume_state(out_dir):
    """
    Remove what would let --resume continue the earlier run in out_dir, before a fresh run writes its first file
    there: its train_state.pt first, then the *.prev.pt files of an interrupted save. The earlier run's models
    (ckpt.pt, PPO's critic.pt) and the metrics.jsonl that describes them stay until the new run's first save
    replaces them (MetricsLogger), but without a train_state.pt no --resume continues the earlier run under the new
    one's flags (--resume auto starts afresh; --resume on finds nothing).
    """
    stale = [TRAIN_STATE] + sorted(n for n in os.listdir(out_dir) if n.endswith(".prev.pt"))
    for name in stale:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    fsync_dir(out_dir)  # gone on the disk before the new run's metrics.jsonl is


def pid_alive(pid):
    """Whether a process with this id runs on this machine (one of another user counts as running)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the checks are made
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def fsync(path):
    """
    Put the file's bytes on the disk, not only in the OS's cache, before a rename makes them the file: else a
    power cut right after the rename can leave the new name pointing at an empty file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """
    Put a directory's entries on the disk after renames in it (POSIX), so that a power cut cannot undo a rename or
    reorder two. Where a directory cannot be opened or synced (Windows), a no-op.
    """
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path, text):
    """A text file (a report, a JSON summary) written atomically (write_atomic)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def save_checkpoint(out_dir, payload, name=CKPT):
    """Write payload to out_dir/name via a temporary file and a rename, so a crash never leaves half a file."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, name), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, name=CKPT, map_location="cpu", mmap=False):
    """
    Load out_dir/name (or a file path) with weights_only=True; mmap=True maps the tensors instead of reading them.
    Every file nanorlhf writes holds a dict: any other torch file is one line naming it.
    """
    if os.path.isdir(path):
        check(os.path.isfile(os.path.join(path, name)), f"{path}: not a checkpoint directory (no {name} in it)")
        path = os.path.join(path, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"{path}: cannot load checkpoint ({load_error_reason(e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a nanorlhf checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def saved_flags(ckpt, path):
    """The flags a checkpoint was written with (its "args"); a file without them is one line naming it."""
    flags = ckpt.get("args")
    check(isinstance(flags, dict), f"{path}: holds no saved flags (no 'args' dict); not a checkpoint of a nanorlhf run")
    return flags


# the sentences of torch.load's messages that are advice, not the reason (one of them: retry with weights_only=False)
LOAD_ADVICE = ("Weights only load failed", "In PyTorch", "Re-running", "Do it only", "Please",
               "Check the documentation", "This file can still be loaded", "Alternatively", "(1)", "(2)")


def load_error_reason(e):
    """
    One line for an exception of torch.load(weights_only=True): its first sentence that is not advice, e.g.
    "UnpicklingError: Trying to load unsupported GLOBAL posix.system whose module posix is blocked" or
    "UnpicklingError: ``torch.distributed.tensor`` must be imported to load DTensors". torch wraps the reason in
    sentences of advice, before it or after it, among them to retry with weights_only=False, which would let the
    file run code: we never do, so only the reason is kept.
    """
    text = str(e).split("WeightsUnpickler error:")[-1]
    sentences = [s.strip(" .") for s in re.split(r"\.\s+|\n", text)]
    sentences = [s for s in sentences if s and "weights_only" not in s]
    reasons = [s for s in sentences if not s.startswith(LOAD_ADVICE)] or sentences or ["no message"]
    name = type(e).__name__
    name = name if name[0].isupper() else f"{type(e).__module__}.{name}"  # struct.error, not "error"
    return f"{name}: {reasons[0]}"


def model_payload(model, tok, stage, args, step, **extra):
    """The dict every stage saves in ckpt.pt."""
    from nanorlhf import dist
    from nanorlhf.model import ScalarGPT

    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {
        "model": dist.full_state_dict(raw),  # CPU tensors; an FSDP-sharded model's gathered from every rank
        "model_config": dataclasses.asdict(raw.config),
        "model_kind": "scalar" if isinstance(raw, ScalarGPT) else "gpt",
        "tokenizer": tok.to_dict(),
        "stage": stage,
        "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
        "step": step,
        **extra,
    }


MODEL_KEYS = ("model_kind", "model_config", "model", "tokenizer")  # what model_payload writes and load_model reads


def load_model_checkpoint(path, name=CKPT, flag=None, mmap=False):
    """
    (file, ckpt): load_checkpoint of out_dir/name (or of a file path), checked to hold a model, so that a valid
    torch file of another kind (a train_state.pt) is one line naming the file actually read, not a KeyError.
    flag: as load_model's; mmap: as load_checkpoint's (the tensors mapped, not read).
    """
    with naming(flag):
        return _load_model_checkpoint(path, name, mmap)


def _load_model_checkpoint(path, name, mmap=False):
    ckpt = load_checkpoint(path, name, mmap=mmap)
    file = os.path.join(path, name) if os.path.isdir(path) else path
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{file}: not a nanorlhf model checkpoint (no {', '.join(missing)}; a stage writes its "
                        f"model to {CKPT} in its out_dir)")
    return file, ckpt


def check_weights(file, state):
    """
    Every tensor of a checkpoint's state dict a finite floating-point one, else one line naming the file and the
    tensor: load_state_dict would cast int8 or complex tensors to float32 without a word, and a weight that an fp16
    conversion overflowed to inf makes a model whose every output is nan. A state that is no dict is left to the
    loader, whose message names what is wrong with it.
    """
    for k, v in (state.items() if isinstance(state, dict) else ()):
        if torch.is_tensor(v) and not v.is_floating_point():
            raise UserError(f"{file}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, not a "
                            f"floating-point weight")
        if torch.is_tensor(v) and not torch.isfinite(v).all():
            raise UserError(f"{file}: tensor {k!r} holds inf or nan")


def load_model(path, device="cpu", kind=None, name=CKPT, from_gpt=False, stage=None, flag=None):
    """
    Rebuild (model, tokenizer, ckpt) from a checkpoint directory (or file). kind="gpt" or "scalar" asserts what the
    checkpoint must hold; from_gpt=True lets kind="scalar" also take a "gpt" checkpoint and build a ScalarGPT
    from its trunk (this is how the reward model starts from the SFT model, and only there). stage="rm" asserts
    the stage that wrote it: a PPO critic (critic.pt) is a scalar model too, but scores nothing a reward model does.
    flag: the flag that gave path ("--sft"), put first in a one-line error, so that the user knows which of
    several models is wrong: "--rm out/x: not a checkpoint directory (no ckpt.pt in it)".
    """
    with naming(flag):
        return _load_model(path, device, kind, name, from_gpt, stage)


@contextmanager
def naming(flag):
    """A UserError raised inside starts with flag ("--sft"), where one is given."""
    try:
        yield
    except UserError as e:
        if not flag:
            raise
        raise UserError(f"{flag} {e}") from None


def _load_model(path, device, kind, name, from_gpt, stage):
    from nanorlhf.model import GPT, ScalarGPT

    file, ckpt = _load_model_checkpoint(path, name)
    config, tok = model_spec(file, ckpt)
    stored = ckpt["model_kind"]
    if stored == "gpt":
        if kind == "scalar" and not from_gpt:
            raise UserError(f"{path}: holds a language model, but a scalar (reward/value) model is needed here")
        model = GPT(config)
    elif stored == "scalar":
        if kind == "gpt":
            raise UserError(f"{path}: holds a scalar (reward/value) model, but a language model is needed here")
        model = ScalarGPT(config)
    else:
        raise UserError(f"{file}: unknown model_kind {stored!r}")
    held = ckpt.get("stage")  # None in a checkpoint of an older version: not checked
    if stage is not None and held not in (None, stage):
        raise UserError(f"{path}: holds a model of the {held!r} stage, but one of the {stage!r} stage is needed here "
                        f"(train_{stage}.py writes it)")
    check_weights(file, ckpt["model"])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # torch lists every wrong key on lines of its own
        raise UserError(f"{file}: the weights do not fit its model_config ({_one_line(e)})") from None
    if stored == "gpt" and kind == "scalar":
        model = ScalarGPT.from_gpt(model)
    return model.to(device), tok, ckpt


def load_reward_model(path, device, flag="--rm"):
    """
    A train_rm.py checkpoint, to score responses with -> (rm in eval mode, tokenizer, (mean, std)): the mean and
    std of the demonstrations' rewards that train_rm.py stored, for normalized_reward ((0, 1) where none were
    stored, a std of 0 read as 1). Of the checkpoint dict, a CPU copy of the weights, only those two numbers are kept.
    """
    rm, tok, ckpt = load_model(path, device, kind="scalar", stage="rm", flag=flag)
    return rm.eval(), tok, (float(ckpt.get("reward_mean", 0.0)), float(ckpt.get("reward_std", 1.0)) or 1.0)


def normalized_reward(r, reward_norm):
    """
    The reward as evaluate.py and sample.py show it, in demonstration-stds above a demonstration:
        r_norm = (r - mean) / std,   (mean, std) = reward_norm, of the SFT demonstrations' rewards (load_reward_model)
    r: a tensor of raw scores. r = [1.2, 0.2], reward_norm = (0.2, 2.0) -> [0.5, 0.0]
    """
    mean, std = reward_norm
    return (r - mean) / std


def model_spec(file, ckpt):
    """
    (GPTConfig, Tokenizer) of a model checkpoint (load_model_checkpoint's), each failure one line naming the file:
    a config field this version does not know (a newer nanorlhf wrote it), a tokenizer that does not load.
    """
    from nanorlhf.model import GPTConfig
    from nanorlhf.tokenizer import Tokenizer

    try:
        config = GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{file}: model_config: {e}") from None
    try:
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # from_dict asserts the special tokens
        raise UserError(f"{file}: the tokenizer does not load ({type(e).__name__}: {_one_line(e)})") from None
    return config, tok


def _one_line(e, limit=300):
    """An exception's message on one line, at most `limit` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -----------------------------------------------------------------------------
# optimizer and schedule


def configure_optimizer(model, lr, weight_decay, betas, device_type):
    """
    AdamW; weight decay on matrices only (not biases, LayerNorm gains). The fused kernel (one pass over each
    parameter instead of a dozen elementwise ops) on CUDA and on the CPU, where it takes an optimizer step of the
    built-in 4 x 128 model from 4.9 ms to 1.3 ms on one thread of the development machine.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def cosine_lr(step, lr, warmup, max_steps, min_lr):
    """Linear warmup for `warmup` steps, then cosine decay from lr to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -----------------------------------------------------------------------------
# logging


METRICS = "metrics.jsonl"  # one JSON row per logged step: the curve of the ckpt.pt beside it
# the files that describe the ckpt.pt beside them: a fresh run into a directory that holds one writes its own under
# pending names (pending_name) until its first save puts them in place (publish_metrics); PPO's and GRPO's samples and
# PPO's memory.json besides the metrics
DESCRIBE_CKPT = (METRICS, "samples.jsonl", "samples.txt", "memory.json")


class MetricsLogger:
    """
    Appends one JSON object per logged step to out_dir/metrics.jsonl. A resumed run (resume=True) keeps the rows up
    to `step`, the step (or iteration) of the checkpoint it continues from, and appends after them: a run killed
    after its last checkpoint logged rows past it, which the resumed run logs again. A fresh run starts the file
    over, and first makes the earlier run in out_dir impossible to resume (remove_resume_state): every stage
    creates its logger before anything else of the run is written.
    A fresh run into a directory that holds an earlier run's ckpt.pt writes its rows to metrics.jsonl.tmp<pid>
    (tmp_name) until its first save, which renames it into place with the new ckpt.pt (train_common.save_files):
    until then the earlier model and the metrics.jsonl that describes it stay as they were, also when the run fails
    (a NaN, a kill) before it has a checkpoint of its own to put in their place. The run's other files of
    DESCRIBE_CKPT wait the same way (pending_name).
    """

    def __init__(self, out_dir, resume=False, step=None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, METRICS)
        for name in DESCRIBE_CKPT:  # the pending files of a fresh run killed before its first save
            path = os.path.join(out_dir, name)
            remove_stale_tmps(path)
            if os.path.exists(tmp_name(path)):  # this process's, of an earlier run in it (a test's): ended too
                os.remove(tmp_name(path))
        if resume and step is not None:
            keep_rows_until(self.path, step)
        if not resume:
            remove_resume_state(out_dir)
        pending = not resume and os.path.isfile(os.path.join(out_dir, CKPT))
        self.f = open(tmp_name(self.path) if pending else self.path, "a" if resume else "w")

    def log(self, row):
        with writing(self.path):
            self.f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
            self.f.flush()


def pending_name(path):
    """
    The name this run writes path (a file of DESCRIBE_CKPT in its out_dir) under: path.tmp<pid> while its metrics
    wait for its first save (MetricsLogger), else path itself.
    Example: "out/ppo/samples.jsonl" -> "out/ppo/samples.jsonl.tmp4242" in a fresh rerun before its first save.
    """
    waiting = os.path.exists(tmp_name(os.path.join(os.path.dirname(path), METRICS)))
    return tmp_name(path) if waiting else path


def publish_metrics(out_dir):
    """
    At a fresh run's first save, rename its pending files (pending_name: metrics.jsonl.tmp<pid> of MetricsLogger, its
    samples, its memory.json) into place: an open file goes on in the new name. An earlier run's file that this run
    has not written yet goes: it describes the model this save replaces. Nothing to do when no metrics are pending
    (the run writes in place, or did so already).
    """
    if not os.path.exists(tmp_name(os.path.join(out_dir, METRICS))):
        return
    for name in DESCRIBE_CKPT:
        path = os.path.join(out_dir, name)
        if os.path.exists(tmp_name(path)):
            os.replace(tmp_name(path), path)
        elif os.path.exists(path):
            os.remove(path)


def keep_rows_until(path, last):
    """
    Rewrite the JSONL file at path (atomically) with only its rows up to `last`, by each row's "step" (or "iter"),
    and without a last line that a kill cut short. No file: nothing to do.
    Example: rows of steps [0, 1, 2, 3] and a line cut short, last 2 -> rows of steps [0, 1, 2].
    """
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # the line being written when the run was killed
                continue
            n = row.get("step", row.get("iter"))
            if n is None or n <= last:
                kept.append(line.rstrip("\n") + "\n")
    write_text(path, "".join(kept))


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}")  # 6 significant digits: a 3e-7 learning rate stays 3e-7
    return v


class Timer:
    """Seconds per step and time left, for the progress line."""

    def __init__(self, total_steps, start_step=0):
        self.t0 = time.time()
        self.start_step = start_step
        self.total_steps = total_steps

    def eta(self, step):
        done = step + 1 - self.start_step
        rate = (time.time() - self.t0) / max(1, done)
        return rate * (self.total_steps - step - 1)


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
