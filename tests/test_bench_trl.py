"""
bench.py against its peers on our weights: the conversion to Hugging Face GPT-2 tensors (nanorlhf/hf.py) checked
against a plain float64 GPT-2 written here from HF's conventions, the transformers twins (hf_twin) against our
models where transformers is installed, and the trl part: a clean skip without TRL, both sides timed with it.
"""

import importlib.util
import json
import math
import sys

import pytest
import torch

from scripts import ROOT

sys.path.insert(0, ROOT)  # bench.py is a top-level script

import bench
from nanorlhf import hf
from nanorlhf.model import GPT, GPTConfig, ScalarGPT

HAS_TRL = all(importlib.util.find_spec(m) is not None for m in ("trl", "transformers", "datasets", "accelerate"))
TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--vocab_size", "40",
        "--prompt_len", "4", "--ppo_batch_size", "4", "--response_length", "4", "--device", "cpu"]


def random_model(kind, bias, seed=0):
    """Every parameter random (LayerNorms, biases and the scalar head's bias too), so a dropped tensor shows."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=24, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=bias)
    model = GPT(config) if kind == "gpt" else ScalarGPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def plain_gpt2(t, idx, n_layer, n_head):
    """
    HF's GPT-2 forward written the plain way in float64 from its tensors alone: Conv1D is x @ W + b with W (in, out),
    pre-LayerNorm blocks, causal softmax attention in a loop over heads, the tanh GELU; the output is the final
    LayerNorm's h. -> h (T, C) for one row idx (T,).
    """
    t = {k: v.double() for k, v in t.items()}

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * t[f"{name}.weight"] + t[f"{name}.bias"]

    T = idx.numel()
    x = t["transformer.wte.weight"][idx] + t["transformer.wpe.weight"][:T]  # (T, C)
    C = x.size(1)
    hs = C // n_head
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        qkv = ln(x, f"{p}.ln_1") @ t[f"{p}.attn.c_attn.weight"] + t[f"{p}.attn.c_attn.bias"]  # (T, 3C)
        q, k, v = qkv.split(C, dim=1)
        heads = []
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            att = q[:, s] @ k[:, s].T / math.sqrt(hs)  # (T, T)
            att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
            heads.append(att @ v[:, s])
        x = x + torch.cat(heads, 1) @ t[f"{p}.attn.c_proj.weight"] + t[f"{p}.attn.c_proj.bias"]
        u = ln(x, f"{p}.ln_2") @ t[f"{p}.mlp.c_fc.weight"] + t[f"{p}.mlp.c_fc.bias"]
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ t[f"{p}.mlp.c_proj.weight"] + t[f"{p}.mlp.c_proj.bias"]
    return ln(x, "transformer.ln_f")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gpt", "scalar"])
def test_hf_state_dict_computes_our_outputs_as_plain_gpt2(kind, bias):
    """Without transformers: the converted tensors, run as HF's GPT-2 runs them, give our logits / per-position scores."""
    model = random_model(kind, bias)
    t = hf.hf_state_dict(model.state_dict(), model.config, kind)
    layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
             *(f"transformer.h.{i}.{k}" for i in range(2) for k in layer)} | ({"score.weight"} if kind == "scalar" else set())
    assert set(t) == names  # GPT-2's names; lm_head is tied to wte; the score head has no bias
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx).double()  # (2, 20, V) or (2, 20)
    for row in range(2):
        h = plain_gpt2(t, idx[row], 2, 2)  # (20, C)
        ref = h @ t["transformer.wte.weight"].double().T if kind == "gpt" else (h @ t["score.weight"].double().T)[:, 0]
        assert torch.allclose(ours[row], ref, atol=1e-4, rtol=0), (ours[row] - ref).abs().max()


def test_hf_config_reads_as_our_config():
    cfg = hf.hf_config(GPTConfig(block_size=24, vocab_size=50, n_layer=3, n_head=2, n_embd=16), "scalar", 48, 49)
    assert (cfg["n_positions"], cfg["vocab_size"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (24, 50, 3, 2, 16)
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["activation_function"]) == (48, 49, "gelu_new")
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"] and len(cfg["id2label"]) == 1


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gpt", "scalar"])
def test_hf_twin_gives_our_logits_and_scores(kind, bias):
    pytest.importorskip("transformers")
    model = random_model(kind, bias)
    twin = bench.hf_twin(model, 48, 49).eval()
    assert type(twin).__name__ == ("GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification")
    idx = torch.randint(0, 50, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(bench.hf_outputs(twin, idx), model(idx), atol=1e-5, rtol=0)
    if kind == "scalar":  # HF's own score: the last non-pad token (the rows hold no pad id 49 here)
        idx = idx.clamp(max=48)
        with torch.no_grad():
            assert torch.allclose(twin(idx).logits[:, 0], model(idx)[:, -1], atol=1e-5, rtol=0)


def test_trl_part_skips_cleanly_without_trl(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError, as where it is not installed
    bench.main(TINY + ["--parts", "trl"])
    line = [r for r in capsys.readouterr().out.splitlines() if r.startswith("TRL PPOTrainer")]
    assert len(line) == 1 and "skipped" in line[0], line


@pytest.mark.skipif(not HAS_TRL, reason="trl, transformers, datasets and accelerate are not all installed")
@pytest.mark.parametrize("native_bf16", [True, False])
def test_trl_part_times_both_sides_round_by_round(capsys, monkeypatch, native_bf16):
    # TRL's bf16=True runs only on a CPU that multiplies bf16 natively (elsewhere float32 is its best)
    monkeypatch.setattr(bench, "cpu_has_fast_bf16", lambda: native_bf16)
    bench.main(TINY + ["--parts", "trl", "--rounds", "2", "--json"])
    out = capsys.readouterr().out
    res = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)  # TRL prints a line of its own
    precisions = ("float32", "bf16") if native_bf16 else ("float32",)
    for p in precisions:
        t = res[f"trl_{p}_s"]
        assert len(t["ours"]) == len(t["trl"]) == 2 and min(t["ours"] + t["trl"]) > 0
        ratios = sorted(o / x for o, x in zip(t["ours"], t["trl"]))
        assert res[f"trl_{p}_ratio"] == pytest.approx((ratios[0] + ratios[1]) / 2)  # the median of two rounds
    assert ("trl_bf16_s" in res) == native_bf16
    assert res["trl_best"] in precisions and res["trl_best_ratio"] == res[f"trl_{res['trl_best']}_ratio"]
