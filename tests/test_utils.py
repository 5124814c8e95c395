import dataclasses
import math
import os
import random
import re

import numpy as np
import pytest
import torch

from nanorlhf import utils
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
