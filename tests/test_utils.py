import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch


from scripts import ROOT, closed_early
from nanorlhf import train_common, utils
from nanorlhf.utils import flag


@dataclasses.dataclass
class Flags:
    lr: float = flag(3e-4, "learning rate")
    steps: int = flag(10, "steps")
    name: str = flag("a", "a name")
    compile: bool = flag(False, "compile")
    top_k: int | None = flag(None, "top-k")


def test_parse_flags_types_and_bools():
    f = utils.parse_flags(Flags, ["--lr", "0.1", "--steps", "5", "--compile", "--top_k", "3"])
    assert f == Flags(lr=0.1, steps=5, name="a", compile=True, top_k=3)
    assert utils.parse_flags(Flags, ["--compile", "false"]).compile is False
    assert utils.parse_flags(Flags, []) == Flags()
    assert utils.parse_flags(Flags, ["--top_k", "none"]).top_k is None


def test_cosine_lr_matches_formula():
    lr, warmup, max_steps, min_lr = 1.0, 10, 110, 0.1
    for step in range(0, 130):
        if step < warmup:
            want = lr * (step + 1) / warmup
        elif step >= max_steps:
            want = min_lr
        else:
            ratio = (step - warmup) / (max_steps - warmup)
            want = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * ratio)) / 2
        assert utils.cosine_lr(step, lr, warmup, max_steps, min_lr) == pytest.approx(want)


def test_save_checkpoint_is_atomic_and_weights_only(tmp_path, monkeypatch):
    utils.save_checkpoint(tmp_path, {"x": torch.arange(3), "step": 1})
    good = (tmp_path / "ckpt.pt").read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        utils.save_checkpoint(tmp_path, {"x": torch.arange(5), "step": 2})
    assert (tmp_path / "ckpt.pt").read_bytes() == good  # the good file survives
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temporary file is left behind
    assert utils.load_checkpoint(tmp_path)["step"] == 1


def test_write_text_and_a_failed_figure_leave_no_half_file(tmp_path):
    # evaluate.py's report and pictures: the text lands whole; a savefig that fails half-way leaves the old
    # picture and no temporary file (save_figure, then in evaluate.py, used to leave its .tmp file behind on an error)
    from nanorlhf.report import save_figure

    path = tmp_path / "report.md"
    utils.write_text(str(path), "# one\n")
    utils.write_text(str(path), "# two\n")
    assert path.read_text() == "# two\n" and os.listdir(tmp_path) == ["report.md"]
    (tmp_path / "curves.png").write_bytes(b"good")

    class BrokenFigure:
        def savefig(self, f, **kwargs):
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_figure(BrokenFigure(), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "report.md"]


class RunsCode:
    """Unpickling this runs code: os.system("touch <marker>")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    torch.save({"f": os.system}, tmp_path / "ckpt.pt")  # a pickle that would import a callable
    with pytest.raises(utils.UserError, match="cannot load"):
        utils.load_checkpoint(tmp_path)


@pytest.mark.parametrize("kind, reason", [
    ("runs code", "UnpicklingError: .*system"),
    ("garbage", "UnpicklingError: "),
    ("truncated", "RuntimeError: .*zip archive"),
])
def test_a_bad_checkpoint_is_one_line_that_names_it_and_runs_nothing(tmp_path, kind, reason):
    # torch's own message is paragraphs long and suggests weights_only=False, which would run the file's code
    marker, path = tmp_path / "ran", tmp_path / "ckpt.pt"
    if kind == "runs code":
        torch.save({"model": RunsCode(marker)}, path)
    elif kind == "garbage":
        path.write_bytes(b"garbage\n")
    else:
        torch.save({"model": {"w": torch.ones(1000)}, "step": 3}, path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(utils.UserError) as info:
        utils.load_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot load checkpoint (") and "\n" not in message
    assert re.search(reason, message) and "weights_only" not in message, message
    assert not marker.exists()


def test_rng_state_round_trip_through_weights_only(tmp_path):
    utils.setup_runtime("cpu", "float32", seed=1)
    utils.save_checkpoint(tmp_path, {"rng": utils.rng_state()}, name="s.pt")
    want = (torch.rand(3), random.random(), np.random.rand())
    utils.set_rng_state(utils.load_checkpoint(tmp_path, name="s.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]



class FakeCuda:
    """Two CUDA devices' generator states and a current device, as one torchrun rank's process sees them."""

    def __init__(self, current):
        self.states, self.current = [torch.tensor([0], dtype=torch.uint8)] * 2, current

    def patch(self, monkeypatch):
        def index(device):
            return self.current if device in ("cuda", None) else torch.device(device).index

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[index(device)])
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "states", list(states)))

        def set_rng_state(state, device="cuda"):
            self.states[index(device)] = state

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)


def test_a_resumed_rank_gets_the_saved_state_on_its_own_cuda_device(monkeypatch):
    """
    Under torchrun rank 0 saves the RNG states and every rank restores them; the ranks share one stream. Rank 1 runs
    on cuda:1, so its generator there must get the state of rank 0's generator on cuda:0 (before, every rank got
    rank 0's view of all devices, in which cuda:1's generator never moved).
    """
    rank0, rank1 = FakeCuda(current=0), FakeCuda(current=1)
    rank0.states[0] = torch.tensor([7], dtype=torch.uint8)  # rank 0's generator after some steps
    with monkeypatch.context() as m:
        rank0.patch(m)
        state = utils.rng_state()
    with monkeypatch.context() as m:
        rank1.patch(m)
        utils.set_rng_state(state)
    assert rank1.states[1].item() == 7
    # a file of the older format (every device's state) is restored as it was saved
    old = FakeCuda(current=0)
    with monkeypatch.context() as m:
        old.patch(m)
        utils.set_rng_state({**state, "cuda": [torch.tensor([5], dtype=torch.uint8)] * 2})
    assert [s.item() for s in old.states] == [5, 5]

def test_load_model_kinds(tmp_path):
    from nanorlhf.model import GPT, GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer

    gpt = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8))
    utils.save_checkpoint(tmp_path, utils.model_payload(gpt, Tokenizer.byte_level(), "sft", {}, 0))
    # a language model where a reward/value model is asked for is an error (PPO's --rm out/sft) ...
    with pytest.raises(utils.UserError, match="holds a language model"):
        utils.load_model(tmp_path, kind="scalar")
    # ... unless the caller starts a scalar model from it (the RM from the SFT model): same trunk, zero head
    rm, _, _ = utils.load_model(tmp_path, kind="scalar", from_gpt=True)
    assert isinstance(rm, ScalarGPT)
    idx = torch.randint(0, 258, (2, 5))
    assert torch.equal(rm.trunk(idx), gpt.trunk(idx)) and not rm.head.weight.any()
    back, _, _ = utils.load_model(tmp_path, kind="gpt")
    assert torch.equal(back(idx), gpt(idx))


def test_load_model_config_without_activation_is_gpt2s_gelu(tmp_path):
    # checkpoints written before GPTConfig.activation existed hold models with GPT-2's tanh GELU
    from nanorlhf.model import GPT, GPTConfig
    from nanorlhf.tokenizer import Tokenizer

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8, activation="gelu_new"))
    payload = utils.model_payload(gpt, Tokenizer.byte_level(), "sft", {}, 0)
    del payload["model_config"]["activation"]
    utils.save_checkpoint(tmp_path, payload)
    back, _, _ = utils.load_model(tmp_path, kind="gpt")
    idx = torch.randint(0, 258, (2, 5))
    assert back.config.activation == "gelu_new" and torch.equal(back(idx), gpt(idx))
    payload["model_config"]["activation"] = "swish"
    utils.save_checkpoint(tmp_path, payload)
    with pytest.raises(utils.UserError, match=r"ckpt.pt: model_config: activation 'swish'"):
        utils.load_model(tmp_path, kind="gpt")


def test_load_model_refuses_what_is_not_a_model_in_one_line_naming_the_file(tmp_path):
    # a valid torch file of another kind (a stage's train_state.pt) used to be a KeyError and a traceback; a
    # checkpoint given as a file used to be named "file/ckpt.pt", a path that does not exist
    from nanorlhf.model import GPT, GPTConfig
    from nanorlhf.tokenizer import Tokenizer

    gpt = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8))
    good = utils.model_payload(gpt, Tokenizer.byte_level(), "sft", {}, 0)
    bad_tok = {**good["tokenizer"], "special_tokens": {}}
    cases = {
        "train_state.pt": ({"optimizer": {}, "rng": {}, "data": {}, "step": 3}, "not a nanorlhf model checkpoint"),
        "list.pt": ([1, 2], "not a nanorlhf checkpoint (it holds a list, not a dict)"),
        "newer.pt": ({**good, "model_config": {**good["model_config"], "rope": True}}, "model_config: "),
        "wider.pt": ({**good, "model_config": {**good["model_config"], "n_embd": 16}}, "the weights do not fit"),
        "weights.pt": ({**good, "model": [1]}, "the weights do not fit"),
        "tokenizer.pt": ({**good, "tokenizer": bad_tok}, "the tokenizer does not load"),
        "no_ranks.pt": ({**good, "tokenizer": {"name": "byte"}}, "the tokenizer does not load"),
    }
    for name, (payload, message) in cases.items():
        utils.save_checkpoint(str(tmp_path), payload, name)
        path = str(tmp_path / name)
        for where in ({"path": path}, {"path": str(tmp_path), "name": name}):  # the file, or its directory and name
            with pytest.raises(utils.UserError) as info:
                utils.load_model(**where, kind="gpt")
            assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value), str(info.value)


def test_help_with_a_percent_sign(capsys):
    # argparse formats help strings with %: "~30% slower" printed argparse's parameter dict in the middle of it
    @dataclasses.dataclass
    class Percent:
        slow: bool = flag(False, "recompute (less memory, ~30% slower)")
        frac: float = flag(0.5, "a share in %")

    with pytest.raises(SystemExit):
        utils.parse_flags(Percent, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "~30% slower" in out and "a share in % (default: 0.5)" in out and "{" not in out, out


# torch.load's messages (torch 2.13, weights_only=True) as they are: the reason sits before, after or between advice
TORCH_DTENSOR = ("Weights only load failed. ``torch.distributed.tensor`` must be imported to load DTensors\n In PyTorch "
                 "2.6, we changed the default value of the `weights_only` argument in `torch.load` from `False` to `True`. "
                 "Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it can result in "
                 "arbitrary code execution. Do it only if you got the file from a trusted source.\n")
TORCH_GLOBAL = ("Weights only load failed. This file can still be loaded, to do so you have two options, \x1b[1mdo those "
                "steps only if you trust the source of the checkpoint\x1b[0m. \n\t(1) In PyTorch 2.6, we changed the "
                "default value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running "
                "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary "
                "code execution. Do it only if you got the file from a trusted source.\n\t(2) Alternatively, to load "
                "with `weights_only=True` please check the recommended steps in the following error message.\n\t"
                "WeightsUnpickler error: Unsupported global: GLOBAL fractions.Fraction was not an allowed global by "
                "default. Please use `torch.serialization.add_safe_globals([fractions.Fraction])` or the "
                "`torch.serialization.safe_globals([fractions.Fraction])` context manager to allowlist this global if "
                "you trust this class/function.\n\nCheck the documentation of torch.load to learn more about types "
                "accepted by default with weights_only https://pytorch.org/docs/stable/generated/torch.load.html.")


@pytest.mark.parametrize("text, reason", [
    (TORCH_DTENSOR, "``torch.distributed.tensor`` must be imported to load DTensors"),
    (TORCH_GLOBAL, "Unsupported global: GLOBAL fractions.Fraction was not an allowed global by default"),
])
def test_load_error_reason_keeps_the_cause_after_torchs_first_sentence(text, reason):
    # the DTensor message was cut at its first ". ", which left only "Weights only load failed"
    import pickle

    assert utils.load_error_reason(pickle.UnpicklingError(text)) == f"UnpicklingError: {reason}"


def test_a_resumed_metrics_logger_keeps_the_rows_up_to_its_step(tmp_path):
    # a run killed after step 3 with its last checkpoint at step 2 logged step 3, which the resumed run logs again:
    # metrics.jsonl used to read steps 0, 1, 2, 3, 3, 4
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(4)] + ['{"step": 4, "lo']  # cut short
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = utils.MetricsLogger(str(tmp_path), resume=True, step=2)
    logger.log({"step": 3, "loss": 0.5})
    logger.f.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] == 0.5
    # the online stages count iterations ("iter"); a row without a counter stays
    rows = [{"iter": 1}, {"note": 1}, {"iter": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    utils.MetricsLogger(str(tmp_path), resume=True, step=1).f.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iter": 1}\n{"note": 1}\n'
    utils.MetricsLogger(str(tmp_path), resume=False).f.close()  # a fresh run starts the file over
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_float16_is_refused_for_training_only():
    with pytest.raises(utils.UserError, match="loss scaling"):
        utils.setup_runtime("cpu", "float16", training=True)
    assert utils.setup_runtime("cpu", "float16").dtype == "float16"
    assert utils.setup_runtime("cpu", "bfloat16", training=True).dtype == "bfloat16"


def test_autocast_is_real_on_cpu():
    # --dtype bfloat16 on a CPU used to be silently ignored (a null context): the matmuls must run in bf16, and a
    # training step must still update float32 master weights with float32 gradients
    a = torch.randn(4, 8)
    with utils.setup_runtime("cpu", "bfloat16", training=True).autocast():
        assert (a @ a.t()).dtype == torch.bfloat16
    with utils.setup_runtime("cpu", "float32").autocast():
        assert (a @ a.t()).dtype == torch.float32
    layer = torch.nn.Linear(8, 3)
    with utils.setup_runtime("cpu", "bfloat16", training=True).autocast():
        loss = layer(a).float().square().mean()
    loss.backward()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_cpu_bf16_probe_and_auto_dtype(monkeypatch):
    # native bf16 = AVX512-BF16 or AMX as torch reports them; a torch without the probes means no, not a crash.
    # --dtype auto is bf16 on a CPU with native bf16 and float32 on one without; an explicit dtype is never overridden
    cases = ((False, False, False), (False, True, True), (True, False, True), (True, True, True))
    for amx, avx512_bf16, native in cases:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        assert utils.cpu_has_fast_bf16() is native
        assert utils.setup_runtime("cpu", "auto", training=True).dtype == ("bfloat16" if native else "float32")
        assert utils.setup_runtime("cpu", "float32", training=True).dtype == "float32"
        assert utils.setup_runtime("cpu", "bfloat16", training=True).dtype == "bfloat16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert utils.cpu_has_fast_bf16() is False
    assert utils.setup_runtime("cpu", "auto", training=True).dtype == "float32"


def test_bf16_on_a_cpu_without_native_bf16_says_it_will_be_slow(monkeypatch, capsys):
    # an explicit --dtype bfloat16 where torch emulates bf16 matmuls: one note on rank 0; nothing anywhere else
    for native, dtype, rank, noted in ((False, "bfloat16", "0", True), (False, "bfloat16", "1", False),
                                       (True, "bfloat16", "0", False), (False, "float32", "0", False),
                                       (False, "auto", "0", False)):
        monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: native)
        monkeypatch.setenv("RANK", rank)
        utils.setup_runtime("cpu", dtype, training=True)
        err = capsys.readouterr().err
        assert ("without native bf16" in err) == noted and err.count("\n") == noted, (native, dtype, rank, err)


def dead_pid():
    """The id of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_fresh_logger_removes_the_pending_metrics_of_a_dead_run(tmp_path):
    """
    A fresh run into a directory with a ckpt.pt logs to metrics.jsonl.tmp<pid> until its first save; one killed
    before that leaves the file. The next logger there removes it, and leaves the earlier run's metrics.jsonl.
    """
    (tmp_path / "ckpt.pt").write_bytes(b"the earlier run's model")
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    logger = utils.MetricsLogger(str(tmp_path))
    logger.log({"step": 0})
    logger.f.close()
    dead = dead_pid()
    os.rename(tmp_path / f"metrics.jsonl.tmp{os.getpid()}", tmp_path / f"metrics.jsonl.tmp{dead}")
    (tmp_path / f"samples.jsonl.tmp{dead}").write_text("{}\n")  # its samples (PPO, GRPO) waited the same way
    utils.MetricsLogger(str(tmp_path)).f.close()
    assert not {f"metrics.jsonl.tmp{dead}", f"samples.jsonl.tmp{dead}"} & set(os.listdir(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 10}\n'


def test_a_save_removes_the_temporaries_of_killed_writers_only(tmp_path):
    """
    A process killed by SIGKILL while it wrote a checkpoint leaves its ckpt.pt.tmp<pid> behind (no finally runs);
    the next save removes those, and leaves a running process's temporary and every other file alone.
    """
    dead, alive = dead_pid(), os.getppid()
    stale = [f"ckpt.pt.tmp{dead}", f"train_state.pt.tmp{dead}"]
    kept = [f"ckpt.pt.tmp{alive}", f"ckpt.pt.tmp{dead}x", "notes.txt.tmp1", f"ckpt.prev.pt.tmp{dead}x"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"half")
    train_common.save_files(str(tmp_path), {"train_state.pt": {"step": 1}, "ckpt.pt": {"step": 1}})
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", "train_state.pt"] + kept)
    (tmp_path / f"memory.json.tmp{dead}").write_bytes(b"half")  # write_atomic's temporaries too
    utils.write_text(str(tmp_path / "memory.json"), "{}")
    assert f"memory.json.tmp{dead}" not in os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd through /proc")
def test_a_save_syncs_its_directory_after_the_renames(tmp_path, monkeypatch):
    """The renames that make a save's files current reach the disk: the directory is fsync'd after the last."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = os.path.realpath(tmp_path)
    train_common.save_files(out, {"train_state.pt": {"step": 1}, "ckpt.pt": {"step": 1}})
    last_rename = max(i for i, e in enumerate(events) if e == ("replace", os.path.join(out, "ckpt.pt")))
    assert ("fsync", out) in events[last_rename:]
    events.clear()
    utils.write_text(os.path.join(out, "report.md"), "x")
    assert events == [("fsync", utils.tmp_name(os.path.join(out, "report.md"))),  # the bytes, before the rename
                      ("replace", os.path.join(out, "report.md")), ("fsync", out)]


def run_main(main, capsys):
    """utils.run(main) -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        utils.run(main)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["a file as out_dir", "under a file", "an empty out_dir", "unreadable data",
                                  "a rename", "no path"])
def test_an_os_error_is_one_line_naming_the_path(case, tmp_path, monkeypatch, capsys):
    # a file given as --out_dir (MetricsLogger's makedirs), a --data file we may not read: each was a traceback
    from nanorlhf import data

    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    if case == "a file as out_dir":
        main, want = lambda: utils.MetricsLogger(str(afile)), f"{afile}: File exists"
    elif case == "under a file":
        main, want = lambda: utils.MetricsLogger(str(afile / "sub")), f"{afile}/sub: Not a directory"
    elif case == "an empty out_dir":
        main, want = lambda: utils.MetricsLogger(""), "'' (an empty path): No such file or directory"
    elif case == "unreadable data":  # as a mode-000 file is to a user other than root
        def deny(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
        monkeypatch.setattr(data, "open", deny, raising=False)  # read_jsonl's open
        main, want = lambda: data.read_jsonl(str(tmp_path / "sft.jsonl")), f"{tmp_path}/sft.jsonl: Permission denied"
    elif case == "a rename":
        main = lambda: os.replace(str(tmp_path / "gone"), str(afile))
        want = f"{tmp_path}/gone -> {afile}: No such file or directory"
    else:
        def main():
            raise OSError("disk full")
        want = "disk full"
    before = sorted(os.listdir(tmp_path))
    code, err = run_main(main, capsys)
    assert code == 2 and err == f"error: {want}\n", err
    assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "mine\n"  # nothing written
    # under torchrun a rank other than 0 says it too, after a wait (in which torchrun ends it where rank 0 said it)
    monkeypatch.setattr(utils.time, "sleep", lambda s: None)
    monkeypatch.setenv("RANK", "1")
    assert run_main(main, capsys) == (2, f"[rank 1] error: {want}\n")


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys):
    # Ctrl-C was Python's KeyboardInterrupt traceback; a shell reports a process stopped by SIGINT as 130
    def main():
        raise KeyboardInterrupt

    assert run_main(main, capsys) == (130, "interrupted\n")
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    assert run_main(main, capsys) == (130, "")


@pytest.mark.parametrize("n, lines", [(100_000, 1), (3, 0)])
def test_a_reader_that_stops_reading_is_silent_exit_141(n, lines):
    # `python sample.py ... | head` ended with "error: Broken pipe", exit 2. (3, 0): the reader is gone before the
    # process starts, and its three short lines are still in stdout's buffer when main() returns (the pipe then
    # broke at the interpreter's last flush: "Exception ignored ... BrokenPipeError", exit 120)
    code = f"from nanorlhf.utils import run\nrun(lambda: [print('line', i) for i in range({n})])\n"
    assert closed_early([sys.executable, "-c", code], lines) == (141, "")


def test_run_keeps_the_traceback_of_what_is_not_an_os_error(capsys):
    # a bug (here a ValueError) is not the user's to fix: it must not become one tidy line
    with pytest.raises(ValueError):
        utils.run(lambda: int("x"))
    assert capsys.readouterr().err == ""


def test_a_seed_numpy_cannot_take_is_one_line_naming_seed():
    for seed in (-1, 2**32):
        with pytest.raises(utils.UserError, match=rf"^--seed {seed}: out of range \(a seed is 0 to 4294967295\)$"):
            utils.setup_runtime("cpu", "float32", seed=seed)
    utils.setup_runtime("cpu", "float32", seed=2**32 - 1)
    assert np.random.get_state()[1][0] == np.random.RandomState(2**32 - 1).get_state()[1][0]


@pytest.mark.parametrize("device, message", [
    ("mps", "--device mps: MPS is not available on this machine; it has cpu"),
    ("xla", "--device xla: nanorlhf runs on cpu, cuda or mps; this machine has cpu"),
    ("meta", "--device meta: nanorlhf runs on cpu, cuda or mps; this machine has cpu"),
    ("cuda", "--device cuda: CUDA is not available on this machine (try --device cpu)"),
])
def test_a_device_this_machine_lacks_is_one_line(device, message, monkeypatch):
    # --device mps, xla or meta on a machine without them was torch's RuntimeError and a traceback, at the first .to()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(utils.UserError) as info:
        utils.setup_runtime(device, "float32")
    assert str(info.value) == message


def test_a_gpu_past_the_last_is_one_line_naming_the_gpus(monkeypatch, request):
    # cuda:2 on a machine with two GPUs was "CUDA error: invalid device ordinal" from torch.cuda.set_device
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # setup_runtime sets both on CUDA

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    request.addfinalizer(restore)
    with pytest.raises(utils.UserError) as info:
        utils.setup_runtime("cuda:2", "float32")
    assert str(info.value) == "--device cuda:2: no such GPU; this machine has cpu, cuda (cuda:0 to cuda:1)"
    assert chosen == []
    assert utils.setup_runtime("cuda:1", "float32").device == torch.device("cuda:1")
    assert chosen == [torch.device("cuda:1")]
    # auto is cuda where it is available; a device without an index leaves the current one as it is
    assert utils.setup_runtime("auto", "float32").device == torch.device("cuda")
    assert utils.setup_runtime("cuda", "float32").device == torch.device("cuda")
    assert chosen == [torch.device("cuda:1")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(utils.UserError, match=r"this machine has cpu, cuda \(cuda:0\)$"):
        utils.setup_runtime("cuda:1", "float32")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.available_devices() == "cpu, cuda (cuda:0), mps"


def test_load_model_with_a_stage_refuses_another_stages_scalar_model(tmp_path):
    """A PPO critic is a ScalarGPT like a reward model: as --rm it was taken, and PPO trained against its values."""
    from nanorlhf.model import GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    model = ScalarGPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    utils.save_checkpoint(str(tmp_path / "ppo"), utils.model_payload(model, tok, "ppo", {}, 1), "critic.pt")
    utils.save_checkpoint(str(tmp_path / "rm"), utils.model_payload(model, tok, "rm", {}, 1))
    old = utils.model_payload(model, tok, "rm", {}, 1)
    del old["stage"]  # a checkpoint of a version that saved no stage: not checked
    utils.save_checkpoint(str(tmp_path / "old"), old)
    with pytest.raises(utils.UserError, match="critic.pt: holds a model of the 'ppo' stage, but one of the 'rm' "):
        utils.load_model(str(tmp_path / "ppo/critic.pt"), kind="scalar", stage="rm")
    for ok in ("rm", "old"):
        utils.load_model(str(tmp_path / ok), kind="scalar", stage="rm")
    utils.load_model(str(tmp_path / "ppo/critic.pt"), kind="scalar")  # no stage asked: any scalar model


@pytest.mark.parametrize("case", ["a file", "under a file", "empty"])
def test_an_out_dir_that_cannot_be_one_is_one_line_naming_the_flag(case, tmp_path):
    # every stage calls train_common.check_out_dir first: it failed late (after the data and models were loaded, in
    # train_dpo.py after the reference pass) with "error: D/afile: File exists", which named no flag
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    out, want = {"a file": (str(afile), f"--out_dir {afile}: it is not a directory"),
                 "under a file": (str(afile / "sub"), f"--out_dir {afile}/sub: {afile} is not a directory"),
                 "empty": ("", "--out_dir: empty (give a directory)")}[case]
    with pytest.raises(utils.UserError) as e:
        train_common.check_out_dir(out, "sft", {})
    assert str(e.value) == want
    assert sorted(os.listdir(tmp_path)) == ["afile"] and afile.read_text() == "mine\n"
    train_common.check_out_dir(str(tmp_path / "new" / "dir"), "sft", {})  # makedirs can make it: fine
    assert not (tmp_path / "new").exists()


FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_a_full_disk_in_a_checkpoint_save_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    # torch.save reports a full disk as a RuntimeError without an errno: it was a traceback and exit status 1
    out = tmp_path / "out"
    train_common.save_files(str(out), {"train_state.pt": {"step": 2}, "ckpt.pt": {"step": 2}})
    utils.save_checkpoint(str(tmp_path / "rm"), {"step": 2})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise FULL_DISK

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(utils, "disk_full", lambda folder: True)
    code, err = run_main(lambda: train_common.save_files(str(out), {"train_state.pt": {"step": 4},
                                                                     "ckpt.pt": {"step": 4}}), capsys)
    assert (code, err) == (2, f"error: {out}/train_state.pt: No space left on device\n")
    code, err = run_main(lambda: utils.save_checkpoint(str(tmp_path / "rm"), {"step": 4}), capsys)
    assert (code, err) == (2, f"error: {tmp_path}/rm/ckpt.pt: No space left on device\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing half-written
    # the same RuntimeError with room on the disk is not a full disk: a bug, its traceback kept
    monkeypatch.setattr(utils, "disk_full", lambda folder: False)
    with pytest.raises(RuntimeError, match="enforce fail"):
        utils.run(lambda: utils.save_checkpoint(str(tmp_path / "rm"), {"step": 4}))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_disk_full_reads_the_space_left(tmp_path, monkeypatch):
    # 3 blocks of 4096 bytes left: full below a margin above 12288 bytes, not at or under it
    monkeypatch.setattr(os, "statvfs", lambda path: type("St", (), {"f_bavail": 3, "f_frsize": 4096})())
    assert utils.disk_full(str(tmp_path)) and utils.disk_full(str(tmp_path), margin=3 * 4096 + 1)
    assert not utils.disk_full(str(tmp_path), margin=3 * 4096) and not utils.disk_full(str(tmp_path), margin=4096)


def test_a_full_disk_in_metrics_or_a_text_file_names_the_file(tmp_path, capsys):
    # a buffered write that meets a full disk raises OSError(28) without a file name: it was only
    # "error: No space left on device"
    def no_space(*args):
        raise OSError(28, "No space left on device")

    logger = utils.MetricsLogger(str(tmp_path))
    logger.f = type("Full", (), {"write": no_space, "flush": no_space})()
    code, err = run_main(lambda: logger.log({"step": 1}), capsys)
    assert (code, err) == (2, f"error: {tmp_path}/metrics.jsonl: No space left on device\n")
    code, err = run_main(lambda: utils.write_atomic(str(tmp_path / "report.md"), no_space), capsys)
    assert (code, err) == (2, f"error: {tmp_path}/report.md: No space left on device\n")

    def message_only(*args):  # an OSError with a message and no errno: the message stays the reason
        raise OSError("disk full")

    code, err = run_main(lambda: utils.write_atomic(str(tmp_path / "report.md"), message_only), capsys)
    assert (code, err) == (2, f"error: {tmp_path}/report.md: disk full\n")
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_sigterm_is_one_line_and_exit_status_143(capsys):
    # SIGTERM killed the process outright: no cleanup, and kl_sweep.py's or compare.py's child went on as an orphan
    import signal
    import time

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)  # the handler's exception ends it long before

    def outside(signum, frame):  # what was there before run(): it must not see the signal (nor pytest die of it)
        seen.append(signum)

    seen = []
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        t0 = time.time()
        assert run_main(main, capsys) == (143, "terminated\n")
        assert time.time() - t0 < 2 and not seen
        assert signal.getsignal(signal.SIGTERM) is outside  # run() put back what was there
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGTERM_TWICE = """
import os, signal, sys, time
from nanorlhf.utils import run

def main():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    finally:  # the cleanup that the first SIGTERM runs, when the second one comes
        time.sleep(float(sys.argv[1]))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(float(sys.argv[2]))

run(main)
"""


@pytest.mark.parametrize("gap, returncode, stderr", [(0, 143, "terminated\n"), (1.2, -15, "")])
def test_a_second_sigterm_ends_the_process_only_a_second_after_the_first(gap, returncode, stderr):
    """
    `timeout -s TERM` sends SIGTERM to the command, then to its process group: a driver (compare.py) got it twice
    within microseconds, and the second killed it in the middle of its cleanup, without a word (about half the runs).
    The repeat is ignored now; a SIGTERM more than a second later still ends a slow cleanup at once, as a plain
    SIGTERM would (the process killed by the signal, nothing printed).
    """
    # after the second SIGTERM: no wait when it is ignored (the run then ends "terminated"), else a long one that
    # the signal cuts short (143 would mean it was waited out)
    after = "0" if gap == 0 else "30"
    p = subprocess.run([sys.executable, "-c", SIGTERM_TWICE, str(gap), after], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert (p.returncode, p.stderr) == (returncode, stderr)


def test_normalized_reward_is_r_minus_the_mean_over_the_std():
    r = torch.randn(7, dtype=torch.float64)
    mean, std = 0.3, 1.7
    assert torch.allclose(utils.normalized_reward(r, (mean, std)), torch.tensor([(x - mean) / std for x in r.tolist()],
                                                                                  dtype=torch.float64))
    assert utils.normalized_reward(torch.tensor([1.2, 0.2]), (0.2, 2.0)).tolist() == pytest.approx([0.5, 0.0])


@pytest.mark.parametrize("rank", ["0", "3"])
def test_setup_runtime_seeds_every_generator_with_the_seed_on_every_rank(monkeypatch, rank):
    """
    python's, numpy's and torch's generators start from --seed itself, on every rank alike (the ranks draw the same
    batches and keep their own share, dist.mine): the same draws as fresh generators seeded by hand.
    """
    monkeypatch.setenv("RANK", rank)
    for seed in (0, 7, random.Random(int(rank)).randrange(utils.MAX_SEED + 1), utils.MAX_SEED):
        utils.setup_runtime("cpu", "float32", seed=seed)
        got = (random.random(), np.random.rand(2).tolist(), torch.rand(3))
        want = (random.Random(seed).random(), np.random.RandomState(seed).rand(2).tolist(),
                torch.rand(3, generator=torch.Generator().manual_seed(seed)))
        assert got[:2] == want[:2] and torch.equal(got[2], want[2]), seed


def test_auto_dtype_on_a_gpu_is_bf16_where_it_is_supported(monkeypatch):
    for supported, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert utils.auto_dtype("cuda") == want
    assert utils.auto_dtype("mps") == "float32"


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
                                        ("Tesla T4", 65e12)])
def test_gpu_peak_flops_is_the_data_sheets_bf16_peak_and_half_of_it_in_float32(monkeypatch, name, peak):
    """MFU of a float32 run on a GPU divides by the TF32 peak, half the dense bf16 one of the data sheet."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    for dtype, want, kind in (("bfloat16", peak, "bf16"), ("float16", peak, "bf16"), ("float32", peak / 2, "TF32")):
        got, source = train_common.peak_flops(utils.Runtime(torch.device("cuda"), "cuda", dtype))
        assert got == want and source == f"data-sheet dense {kind} peak", (dtype, got, source)


def test_cpu_peak_flops_takes_the_fastest_core_and_8_flops_without_fma(monkeypatch):
    """threads x the highest clock /proc/cpuinfo reports x FLOPs per cycle (64 AVX-512, 32 FMA, 8 otherwise)."""
    cpu = utils.Runtime(torch.device("cpu"), "cpu", "float32")
    threads = torch.get_num_threads()
    for flags, per_cycle in (("sse4_2 avx512f fma", 64), ("sse4_2 fma", 32), ("sse4_2 avx", 8)):
        info = "".join(f"processor\t: {i}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n"
                       for i, mhz in enumerate(["1200.000", "3100.500", "2000.000"]))
        monkeypatch.setattr(train_common, "cpuinfo", lambda: info)
        peak, source = train_common.peak_flops(cpu)
        assert peak == threads * 3100.5e6 * per_cycle, (flags, peak)
        assert source == f"{threads} threads x 3100 MHz x {per_cycle} float32 FLOPs/cycle", source


def test_measured_peak_flops_is_2_n_cubed_over_the_fastest_matmul(monkeypatch):
    """Where no figure is known (no /proc/cpuinfo here), 2 n^3 FLOPs of the fastest of 8 timed n x n matmuls."""
    durations = [0.5, 0.25, 0.4, 0.125, 0.3, 0.2, 0.6, 0.35]
    clock = iter([t for d in durations for t in (10.0, 10.0 + d)])  # perf_counter before and after each matmul
    monkeypatch.setattr(train_common, "cpuinfo", lambda: None)
    monkeypatch.setattr(train_common, "PEAK_MATMUL", 16)
    monkeypatch.setattr(train_common.time, "perf_counter", lambda: next(clock))
    peak, source = train_common.peak_flops(utils.Runtime(torch.device("cpu"), "cpu", "float32"))
    assert peak == 2 * 16**3 / min(durations) and source == "measured 16x16 float32 matmul"


def test_encode_pref_splits_counts_what_both_splits_kept_cut_and_dropped():
    """
    The "data: ..." line of RM and DPO against counts taken record by record: pairs C(K, 2) of each kept train record
    by a loop over (a, b), a < b; the prompts cut, the records dropped and the responses dropped of both splits.
    """
    from types import SimpleNamespace

    from nanorlhf.data import encode_prefs
    from nanorlhf.tokenizer import Tokenizer

    tok, max_len, rng = Tokenizer.byte_level(), 48, random.Random(3)

    def record():
        k = rng.randint(2, 4)
        return {"prompt": "x" * rng.randint(1, 40), "responses": ["y" * rng.randint(1, 50) for _ in range(k)],
                "ranking": rng.sample(range(k), k)}

    # each split also gets a record cut from the left and one dropped whole (no response fits with its EOS)
    extra = [{"prompt": "x" * 60, "responses": ["y", "yy", "y" * 60], "ranking": [2, 0, 1]},
             {"prompt": "x", "responses": ["y" * 60, "y" * 70], "ranking": [1, 0]}]
    train_records, val_records = [record() for _ in range(30)] + extra, [record() for _ in range(12)] + extra
    args = SimpleNamespace(data="p.jsonl", val_data=None, val_frac=0.3)
    train, val, line = train_common.encode_pref_splits(train_records, val_records, tok, max_len, args)
    assert (train, val) == (encode_prefs(train_records, tok, max_len)[0], encode_prefs(val_records, tok, max_len)[0])
    responses = pairs = 0
    prompts, cut, dropped_records, dropped_responses = {}, {}, {}, {}
    for split, records in (("train", train_records), ("val", val_records)):
        prompts[split] = cut[split] = dropped_records[split] = dropped_responses[split] = 0
        for r in records:
            kept, n_cut, n_dropped = encode_prefs([r], tok, max_len)
            if not kept:
                dropped_records[split] += 1
                continue
            cut[split], dropped_responses[split] = cut[split] + n_cut, dropped_responses[split] + n_dropped
            prompts[split] += 1
            if split == "train":
                k = len(kept[0]["ids"])
                responses += k
                pairs += sum(1 for a in range(k) for b in range(k) if a < b)
    for counts in (prompts, cut, dropped_records, dropped_responses):  # every count of both splits is exercised
        assert counts["train"] > 0 and counts["val"] > 0, (prompts, cut, dropped_records, dropped_responses)
    n_train, n_val = prompts["train"], prompts["val"]
    cut, dropped_records, dropped_responses = (sum(c.values()) for c in (cut, dropped_records, dropped_responses))
    assert line == (f"data: {n_train} train prompts ({responses} responses, {pairs} pairs), {n_val} val prompts; too "
                    f"long for {max_len} tokens: {cut} prompts cut from the left, {dropped_records} records dropped "
                    f"(fewer than 2 responses fit), {dropped_responses} responses dropped from the records kept")


def test_metrics_rows_keep_6_significant_digits(tmp_path):
    """A logged float is rounded to 6 significant digits (3e-7 stays 3e-7), a tensor logged as its number."""
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-9, 9) for _ in range(50)] + [3e-7, 1 / 3, 0.0, 7]
    logger = utils.MetricsLogger(str(tmp_path))
    for v in values:
        logger.log({"step": 0, "v": v, "t": torch.tensor(v, dtype=torch.float64)})
    logger.f.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for v, row in zip(values, rows, strict=True):
        # round half-even at the 6th significant digit, by the decimal exponent of v
        want = v if v == 0 or isinstance(v, int) else round(v, 5 - math.floor(math.log10(abs(v))))
        assert row["v"] == pytest.approx(want, rel=1e-12, abs=0) and row["t"] == row["v"], (v, row)
    assert rows[-1]["v"] == 7 and type(rows[-1]["v"]) is int


def test_weight_decay_goes_to_the_matrices_only():
    """AdamW's groups: the Linear and Embedding weights decay; biases and LayerNorm gains, and frozen weights, do not."""
    from nanorlhf.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=8, bias=True))
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    decay, no_decay = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            matrix = isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name == "weight"
            (decay if matrix else no_decay).add(id(p))
    opt = utils.configure_optimizer(model, 0.01, 0.1, (0.9, 0.95), "cpu")
    groups = [({id(p) for p in g["params"]}, g["weight_decay"], g["lr"], g["betas"]) for g in opt.param_groups]
    assert groups == [(decay, 0.1, 0.01, (0.9, 0.95)), (no_decay, 0.0, 0.01, (0.9, 0.95))]
    assert len(decay) > 0 and len(no_decay) > 0


def test_load_reward_model_reads_the_stored_reward_mean_and_std(tmp_path):
    """(mean, std) as train_rm.py stored them; none stored -> (0, 1); a std of 0 (all rewards equal) -> 1."""
    from nanorlhf.model import GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    model = ScalarGPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    cases = {"stored": ({"reward_mean": -0.75, "reward_std": 2.5}, (-0.75, 2.5)), "none": ({}, (0.0, 1.0)),
             "zero": ({"reward_mean": 0.5, "reward_std": 0.0}, (0.5, 1.0))}
    for name, (extra, want) in cases.items():
        utils.save_checkpoint(str(tmp_path / name), utils.model_payload(model, tok, "rm", {}, 1, **extra))
        rm, _, norm = utils.load_reward_model(str(tmp_path / name), "cpu")
        assert norm == want and not rm.training, name
        r = torch.randn(5, dtype=torch.float64)
        assert torch.equal(utils.normalized_reward(r, norm), (r - want[0]) / want[1])


def test_holdout_split_takes_the_seeded_permutations_first_round_val_frac_n():
    """val: the records at the first max(1, nearest integer to val_frac * n) places of the seed's permutation."""
    rng = random.Random(1)
    for n, val_frac in [(10, 0.15), (10, 0.14), (7, 0.01), (40, 0.33), (9, 0.6)] + [
            (rng.randint(3, 60), rng.uniform(0.01, 0.6)) for _ in range(20)]:
        seed = rng.randrange(1000)
        records = [{"i": i} for i in range(n)]
        train, val = train_common.holdout_split(records, val_frac, seed)
        n_val = max(1, math.floor(val_frac * n + 0.5))  # no case falls on a half
        held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
        assert val == [r for r in records if r["i"] in held], (n, val_frac, seed)
        assert train == [r for r in records if r["i"] not in held]


def test_fmt_count_uses_the_largest_unit_it_reaches():
    """One decimal of k, M or G from 1000, 1e6, 1e9 on (the boundary itself included); below 1000 a whole number."""
    cases = {999: "999", 1000: "1.0k", 12345: "12.3k", 999_949: "999.9k", 1e6: "1.0M", 2.5e6: "2.5M", 1e9: "1.0G",
             -1500: "-1.5k", 0.4: "0"}
    for x, want in cases.items():
        assert train_common.fmt_count(x) == want, x
    rng = random.Random(2)
    for _ in range(200):
        x = rng.uniform(1, 10) * 10 ** rng.randint(0, 11)
        scale, unit = next(((s, u) for s, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if x >= s), (1, ""))
        assert train_common.fmt_count(x) == (f"{x / scale:.1f}{unit}" if unit else f"{x:.0f}"), x


def test_numpy_rng_state_round_trip_keeps_the_gaussian_it_holds(tmp_path):
    """
    numpy's legacy generator draws normals in pairs and holds the second for the next call: a state saved after an
    odd number of them must give the same next normals back, as python's random.gauss does.
    """
    rng = random.Random(5)
    for _ in range(4):
        utils.setup_runtime("cpu", "float32", seed=rng.randrange(1000))
        np.random.randn(2 * rng.randrange(4) + 1)  # odd: one normal held
        random.gauss(0.0, 1.0)
        utils.save_checkpoint(tmp_path, {"rng": utils.rng_state()}, name="s.pt")
        want = (np.random.randn(5).tolist(), [random.gauss(0.0, 1.0) for _ in range(3)])
        np.random.randn(3)
        utils.set_rng_state(utils.load_checkpoint(tmp_path, name="s.pt")["rng"])
        assert (np.random.randn(5).tolist(), [random.gauss(0.0, 1.0) for _ in range(3)]) == want


def test_pid_alive_counts_another_users_process_as_running(monkeypatch):
    """os.kill(pid, 0): no error -> alive; ProcessLookupError -> gone; PermissionError (another user's) -> alive."""
    assert utils.pid_alive(os.getpid()) and not utils.pid_alive(dead_pid())
    for error, alive in ((None, True), (ProcessLookupError(3, "No such process"), False),
                         (PermissionError(1, "Operation not permitted"), True)):
        def kill(pid, sig, error=error):
            assert sig == 0
            if error is not None:
                raise error
        monkeypatch.setattr(utils.os, "kill", kill)
        assert utils.pid_alive(1234) is alive, error


def test_a_read_only_out_dir_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    """The nearest existing ancestor must be writable and searchable (os.access W_OK | X_OK), as root always is."""
    asked = []

    def access(path, mode):
        asked.append(mode)
        return not mode & os.W_OK  # a read-only directory

    monkeypatch.setattr(utils.os, "access", access)
    with pytest.raises(utils.UserError) as e:
        utils.check_out_dir_flag(str(tmp_path / "new"))
    assert str(e.value) == f"--out_dir {tmp_path / 'new'}: {tmp_path} is not writable"
    assert asked == [os.W_OK | os.X_OK]


def test_timer_eta_is_seconds_per_step_done_times_the_steps_left(monkeypatch):
    """eta(step): the steps start_step..step took the time since the Timer started; steps step+1..total-1 remain."""
    rng, clock = random.Random(4), [0.0]
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])
    for _ in range(50):
        start = rng.randint(0, 20)
        total = start + rng.randint(1, 500)
        clock[0] = rng.uniform(0, 1e6)
        timer = utils.Timer(total, start_step=start)
        step = rng.randint(start, total - 1)
        elapsed = rng.uniform(0.1, 1e4)
        clock[0] += elapsed
        done = len(range(start, step + 1))
        left = len(range(step + 1, total))
        assert timer.eta(step) == pytest.approx(elapsed / done * left, rel=1e-12, abs=1e-9), (total, start, step)


def test_fmt_time_is_whole_minutes_and_two_digit_seconds():
    """The seconds cut to a whole number (not rounded), then minutes and the seconds left of them, two digits."""
    rng = random.Random(6)
    for seconds in [0, 0.99, 5, 59.7, 60, 61.5, 3599.9, 3600] + [rng.uniform(0, 10**5) for _ in range(100)]:
        whole = math.floor(seconds)
        minutes = whole // 60
        secs = whole - 60 * minutes
        assert utils.fmt_time(seconds) == f"{minutes}m" + str(secs).rjust(2, "0") + "s", seconds


def test_a_resumed_logger_ends_a_last_row_that_lacks_its_newline(tmp_path):
    """A whole last row without its "\\n" (a kill between the two) is kept, ended, and the next row starts a line."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}')
    logger = utils.MetricsLogger(str(tmp_path), resume=True, step=1)
    logger.log({"step": 2})
    logger.f.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_load_model_refuses_a_scalar_model_where_a_language_model_is_needed(tmp_path):
    """kind="gpt" (a policy, --sft) of a reward model's checkpoint is one line; kind=None loads whatever it holds."""
    from nanorlhf.model import GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer

    rm = ScalarGPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8))
    utils.save_checkpoint(tmp_path, utils.model_payload(rm, Tokenizer.byte_level(), "rm", {}, 0))
    with pytest.raises(utils.UserError, match="holds a scalar \\(reward/value\\) model, but a language model"):
        utils.load_model(tmp_path, kind="gpt")
    back, _, _ = utils.load_model(tmp_path)
    idx = torch.randint(0, 258, (2, 5))
    assert isinstance(back, ScalarGPT) and torch.equal(back(idx), rm(idx))


def test_load_error_reason_of_advice_only_keeps_the_advice():
    """A message of advice sentences only keeps them (the first), not "no message"; an empty one is "no message"."""
    assert utils.load_error_reason(RuntimeError("Please check the file. In PyTorch 2.6 it changed")) == \
        "RuntimeError: Please check the file"
    assert utils.load_error_reason(RuntimeError("")) == "RuntimeError: no message"


def test_holdout_split_refuses_a_val_frac_that_leaves_no_training_record():
    """round(val_frac * n) == n leaves nothing to train on: one line; one record fewer is fine."""
    records = [{"i": i} for i in range(10)]
    with pytest.raises(utils.UserError, match="leaves no training data"):
        train_common.holdout_split(records, 0.96, seed=0)  # round(9.6) = 10
    train, val = train_common.holdout_split(records, 0.9, seed=0)
    assert (len(train), len(val)) == (1, 9)


def test_read_split_takes_val_data_whole_and_holds_out_nothing():
    """With --val_data: (every record of --data, every record of --val_data); without: holdout_split's split."""
    files = {"a.jsonl": [{"i": i} for i in range(9)], "b.jsonl": [{"j": j} for j in range(4)]}
    assert train_common.read_split(files.get, "a.jsonl", "b.jsonl", 0.3, seed=1) == (files["a.jsonl"],
                                                                                     files["b.jsonl"])
    assert train_common.read_split(files.get, "a.jsonl", None, 0.3, seed=1) == \
        train_common.holdout_split(files["a.jsonl"], 0.3, 1)


def test_clip_grad_norm_scales_to_max_norm_and_0_does_not_clip():
    """The global L2 norm over every gradient (float64 by hand); > max_norm: each times max_norm / (norm + 1e-6)."""
    torch.manual_seed(0)
    for max_norm in (0.0, 0.5, 1.0, 100.0):
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (2, 2, 2))]
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = math.sqrt(sum(x * x for g in grads for x in g.double().flatten().tolist()))
        scale = max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1.0
        got = train_common.clip_grad_norm(params, max_norm)
        assert float(got) == pytest.approx(norm, rel=1e-6)
        for p, g in zip(params, grads):
            assert torch.allclose(p.grad.double(), g.double() * scale, rtol=1e-6, atol=0), max_norm


def test_check_finite_stops_on_any_value_that_is_not_finite():
    """Every value is checked, in any place, tensor or float; all finite -> nothing."""
    rng = random.Random(8)
    for _ in range(20):
        n = rng.randint(1, 4)
        values = {f"v{i}": rng.uniform(-10, 10) for i in range(n)}
        train_common.check_finite("step 1", **{k: torch.tensor(v) for k, v in values.items()})
        bad = rng.randrange(n)
        values[f"v{bad}"] = rng.choice([math.nan, math.inf, -math.inf])
        with pytest.raises(train_common.NonFiniteError, match="^step 1: non-finite "):
            train_common.check_finite("step 1", **{k: torch.tensor(v) if rng.random() < 0.5 else v
                                                  for k, v in values.items()})


def test_optimizer_step_is_adamw_at_the_given_lr_on_every_group_after_clipping():
    """
    Two optimizer_step calls (a clipped step, then an unclipped one, at two learning rates) against AdamW written out
    in float64: clip, decoupled weight decay on the matrices only, bias-corrected moments. The gradients are gone
    after each step.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    wd, (b1, b2), eps = 0.1, (0.9, 0.95), 1e-8
    opt = utils.configure_optimizer(model, 0.01, wd, (b1, b2), "cpu")
    ref = [p.detach().double().clone() for p in model.parameters()]
    m, v = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    for t, (lr, clip) in enumerate(((3e-3, 0.05), (2e-2, 0.0)), start=1):
        model(torch.randn(6, 4)).square().mean().backward()
        grads = [p.grad.double().clone() for p in model.parameters()]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        if 0 < clip < norm:
            grads = [g * clip / (norm + 1e-6) for g in grads]
        got_norm = train_common.optimizer_step(model, opt, lr, clip, where=f"step {t}")
        assert float(got_norm) == pytest.approx(norm, rel=1e-6)
        for i, g in enumerate(grads):
            decay = wd if ref[i].dim() >= 2 else 0.0
            ref[i] = ref[i] * (1 - lr * decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            ref[i] = ref[i] - lr * m_hat / (v_hat.sqrt() + eps)
        for p, want in zip(model.parameters(), ref):
            assert p.grad is None
            assert torch.allclose(p.detach().double(), want, rtol=1e-5, atol=1e-7), (t, p, want)
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 2e-2]


def test_cpu_peak_flops_doubles_for_bf16_on_avx512_bf16_and_times_matmuls_on_amx(monkeypatch):
    """
    A bf16 run on AVX512-BF16 does two multiply-adds per float32 lane: twice the float32 FLOPs per cycle; a float32
    run there, or a bf16 run without it, keeps the float32 figure; a bf16 run on AMX tiles is timed instead.
    FLOPs per cycle per core, written out: AVX-512 FMA 64 (2 units x 16 lanes x 2), AVX2 FMA 32, neither 8.
    """
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    table = {("avx512f fma avx512_bf16", "float32"): (64, "float32"),
             ("avx512f fma avx512_bf16", "bfloat16"): (128, "bf16"),
             ("avx512f fma", "float32"): (64, "float32"), ("avx512f fma", "bfloat16"): (64, "float32"),
             ("fma avx512_bf16", "float32"): (32, "float32"), ("fma avx512_bf16", "bfloat16"): (64, "bf16"),
             ("sse4_2", "float32"): (8, "float32"), ("sse4_2", "bfloat16"): (8, "float32"),
             ("avx512f fma amx_bf16", "float32"): (64, "float32")}
    for (flags, dtype), (per_cycle, kind) in table.items():
        info = f"processor\t: 0\ncpu MHz\t\t: 2500.000\nflags\t\t: {flags}\n\n"
        monkeypatch.setattr(train_common, "cpuinfo", lambda: info)
        peak, source = train_common.peak_flops(utils.Runtime(torch.device("cpu"), "cpu", dtype))
        assert peak == 3 * 2500e6 * per_cycle, (flags, dtype, peak)
        assert source == f"3 threads x 2500 MHz x {per_cycle} {kind} FLOPs/cycle", source
    info = "processor\t: 0\ncpu MHz\t\t: 2500.000\nflags\t\t: avx512f fma amx_bf16\n\n"
    monkeypatch.setattr(train_common, "cpuinfo", lambda: info)
    clock = iter([1.0, 1.5] * 8)  # 8 matmuls of half a second each
    monkeypatch.setattr(train_common, "PEAK_MATMUL", 8)
    monkeypatch.setattr(train_common.time, "perf_counter", lambda: next(clock))
    peak, source = train_common.peak_flops(utils.Runtime(torch.device("cpu"), "cpu", "bfloat16"))
    assert (peak, source) == (2 * 8**3 / 0.5, "measured 8x8 bfloat16 matmul")


@pytest.mark.parametrize("name, peak", [("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", 165e12)])
def test_gpu_peak_flops_matches_the_whole_name_not_a_shorter_ones_prefix(monkeypatch, name, peak):
    """An L40S is not an L4: each GPU gets its own data sheet's dense bf16 peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, _ = train_common.peak_flops(utils.Runtime(torch.device("cuda"), "cuda", "bfloat16"))
    assert got == peak


# -----------------------------------------------------------------------------
# from mutation testing of the flag parser and the checkpoint files


def test_suggest_lists_at_most_n_of_the_flags_a_prefix_abbreviates():
    """Of the flags that start with the typo, the first n in the parser's order, joined as a sentence."""
    options = ["--lr", "--lora_rank", "--lora_alpha", "--log_interval", "--lora_targets"]
    assert utils.suggest("--l", options) == "--lr, --lora_rank or --lora_alpha"
    assert utils.suggest("--lo", options, n=2) == "--lora_rank or --lora_alpha"
    assert utils.suggest("--log", options) == "--log_interval"


@pytest.mark.parametrize("word, value", [("1", True), ("TRUE", True), ("Yes", True), ("y", True), ("on", True),
                                         ("0", False), ("FALSE", False), ("No", False), ("n", False), ("Off", False)])
def test_a_bool_flag_takes_every_spelling_of_true_and_false_in_any_case(word, value):
    @dataclasses.dataclass
    class F:
        compile: bool = not value

    assert utils.parse_flags(F, ["--compile", word]).compile is value


@pytest.mark.parametrize("word", ["none", "None", "NONE"])
def test_an_optional_flag_takes_none_in_any_case(word):
    @dataclasses.dataclass
    class F:
        top_k: int | None = 5

    assert utils.parse_flags(F, ["--top_k", word]).top_k is None
    assert utils.parse_flags(F, ["--top_k", "7"]).top_k == 7


def test_help_says_required_for_a_required_flag_and_the_default_for_the_others():
    parser = utils.FlagParser(prog="x")
    parser.add_argument("--train", required=True, help="text to train on")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    text = " ".join(parser.format_help().split())
    assert "text to train on (required)" in text and "vocabulary size (default: 512)" in text
    assert "(default: None)" not in text


def test_remove_stale_tmps_takes_only_a_pid_of_its_kind(tmp_path):
    """
    kind="old": export_hf's path.old<pid> of a dead process goes; a .tmp<pid> of a dead one stays (kind="tmp"'s), and
    names without a pid ("x.tmp", "x.old") stay under either kind (no int("") error).
    """
    dead = dead_pid()
    names = [f"model.old{dead}", f"model.tmp{dead}", "model.old", "model.tmp", "model.oldabc"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"dir.old{dead}").mkdir()
    utils.remove_stale_tmps(str(tmp_path / "model"), kind="old")
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in names + [f"dir.old{dead}"] if n != f"model.old{dead}")
    utils.remove_stale_tmps(str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path)) == sorted(["model.tmp", "model.old", "model.oldabc", f"dir.old{dead}"])


def test_load_checkpoint_of_a_directory_names_the_missing_file_it_was_asked_for(tmp_path):
    utils.save_checkpoint(str(tmp_path), {"step": 1})  # a ckpt.pt, but no critic.pt
    with pytest.raises(utils.UserError, match=r": not a checkpoint directory \(no critic.pt in it\)$"):
        utils.load_checkpoint(str(tmp_path), "critic.pt")
    assert utils.load_checkpoint(str(tmp_path))["step"] == 1


def test_load_model_refuses_an_unknown_model_kind_naming_the_file(tmp_path):
    from nanorlhf.model import GPT, GPTConfig
    from nanorlhf.tokenizer import Tokenizer

    gpt = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8))
    payload = {**utils.model_payload(gpt, Tokenizer.byte_level(), "sft", {}, 0), "model_kind": "critic"}
    utils.save_checkpoint(str(tmp_path), payload)
    with pytest.raises(utils.UserError, match=r"ckpt.pt: unknown model_kind 'critic'$"):
        utils.load_model(str(tmp_path))


# -----------------------------------------------------------------------------
# from mutation testing of the checkpoint loaders, run() and the atomic writes (session 21)


def test_check_weights_refuses_a_tensor_that_is_not_a_finite_float_naming_it():
    ok = {"a": torch.randn(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16), "step": 3}
    utils.check_weights("f.pt", ok)
    utils.check_weights("f.pt", [1])  # no dict: left to the loader
    for bad, what in ((torch.tensor([1, 2]), "has dtype int64, not a floating-point weight"),
                      (torch.tensor([True]), "has dtype bool, not a floating-point weight"),
                      (torch.tensor([1.0, float("inf")]), "holds inf or nan"),
                      (torch.tensor([float("-inf")]), "holds inf or nan"),
                      (torch.tensor([0.0, float("nan")]), "holds inf or nan")):
        with pytest.raises(utils.UserError) as e:
            utils.check_weights("f.pt", {**ok, "w": bad})
        assert str(e.value) == f"f.pt: tensor 'w' {what}"


def test_load_model_checks_the_weights_names_its_flag_and_moves_the_model(tmp_path):
    from nanorlhf.model import GPT, GPTConfig
    from nanorlhf.tokenizer import Tokenizer

    gpt = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=8))
    payload = utils.model_payload(gpt, Tokenizer.byte_level(), "sft", {}, 0)
    utils.save_checkpoint(str(tmp_path), payload)
    model, _, _ = utils.load_model(str(tmp_path), device="meta", kind="gpt")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    payload["model"]["lm_head.weight"] = payload["model"]["lm_head.weight"].half().to(torch.int8)
    utils.save_checkpoint(str(tmp_path), payload)
    with pytest.raises(utils.UserError) as e:
        utils.load_model(str(tmp_path), kind="gpt", flag="--sft")
    assert str(e.value) == (f"--sft {tmp_path}/ckpt.pt: tensor 'lm_head.weight' has dtype int8, not a "
                            f"floating-point weight")
    with pytest.raises(utils.UserError) as e:
        utils.load_model(str(tmp_path / "none"), flag="--sft")
    assert str(e.value) == f"--sft {tmp_path}/none: no such checkpoint file"


def test_run_turns_a_data_error_into_one_line_and_exit_2(capsys):
    from nanorlhf.data import DataError

    def main():
        raise DataError("sft.jsonl line 3: no 'prompt'")

    assert run_main(main, capsys) == (2, "error: sft.jsonl line 3: no 'prompt'\n")


def test_a_full_disk_is_read_from_the_folder_of_the_file_being_written(tmp_path, monkeypatch):
    asked = []

    def statvfs(path):
        asked.append(path)
        return type("St", (), {"f_bavail": 0, "f_frsize": 4096})()

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(OSError) as e:
        with utils.writing(str(tmp_path / "ckpt.pt")):
            raise RuntimeError("unexpected pos 576 vs 534")
    assert asked == [str(tmp_path)] and (e.value.errno, e.value.filename) == (28, str(tmp_path / "ckpt.pt"))


def test_an_out_dir_of_spaces_is_empty():
    with pytest.raises(utils.UserError, match=r"^--out_dir: empty \(give a directory\)$"):
        utils.check_out_dir_flag("   ")


def test_remove_resume_state_takes_the_train_state_and_every_prev_file_only(tmp_path):
    names = ["ckpt.pt", "critic.pt", "metrics.jsonl", "train_state.pt", "ckpt.prev.pt", "train_state.prev.pt",
             "critic.prev.pt", "prev.pt.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    utils.remove_resume_state(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "critic.pt", "metrics.jsonl", "prev.pt.txt"]


def test_publish_metrics_puts_the_pending_files_in_place_and_drops_the_earlier_runs_others(tmp_path):
    for name, text in (("metrics.jsonl", "old"), ("samples.jsonl", "old"), ("memory.json", "old")):
        (tmp_path / name).write_text(text)
    utils.publish_metrics(str(tmp_path))  # nothing pending: nothing changes
    assert sorted(os.listdir(tmp_path)) == ["memory.json", "metrics.jsonl", "samples.jsonl"]
    for name in ("metrics.jsonl", "memory.json"):
        (tmp_path / utils.tmp_name(name)).write_text("new")
    utils.publish_metrics(str(tmp_path))
    assert {n: (tmp_path / n).read_text() for n in os.listdir(tmp_path)} == {"metrics.jsonl": "new",
                                                                          "memory.json": "new"}


def test_a_double_dash_ends_the_flags(capsys):
    """What follows "--" is an argument, the one named in the error ("unknown flag --" before: argparse keeps it)."""
    with pytest.raises(SystemExit):
        utils.parse_flags(Flags, ["--steps", "3", "--", "x"])
    assert capsys.readouterr().err.endswith(": error: unexpected argument 'x' (flags are --name value; see --help)\n")
