"""
Tests of export_hf.py: the exported directory read back by an independent reader (GPT.from_pretrained for the
language model, a hand-written GPT2ForSequenceClassification for the reward model, a plain merges-list BPE for
the tokenizer files), and by transformers itself when it is installed (skipped otherwise).
"""

import importlib.util
import json
import math
import os
import random
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import regex
import torch

from scripts import ROOT, kill_at_rename, script

sys.path.insert(0, ROOT)  # export_hf.py is a top-level script

import export_hf
from nanorlhf import hf, utils
from nanorlhf.hf import load_safetensors
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.tokenizer import Tokenizer, train_bpe

GPT2_FILE = Path(__file__).resolve().parents[2] / "shared/data/gpt2.tiktoken"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# GPT-2's original split pattern, as Hugging Face's GPT2Tokenizer writes it (not tiktoken's rewrite of it)
HF_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def random_model(kind="gpt", bias=True, block_size=60, vocab_size=258, seed=0, activation="gelu_new", n_layer=2,
                 n_head=2, dropout=0.0):
    """A tiny model with every parameter random (biases and LayerNorms too, so a dropped or swapped tensor shows)."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=32,
                       bias=bias, activation=activation, dropout=dropout)
    model = GPT(config) if kind == "gpt" else ScalarGPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def save(model, tok, path, stage="ppo", name="ckpt.pt"):
    utils.save_checkpoint(str(path), utils.model_payload(model, tok, stage, {"seed": 0}, 7), name)


def random_ids(vocab, n=3, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g)


# -----------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("bias,activation", [(True, "gelu_new"), (False, "gelu_new"), (True, "gelu")])
def test_policy_reads_back_with_the_same_logits(tmp_path, bias, activation):
    model = random_model(bias=bias, activation=activation)
    tok = Tokenizer.byte_level()
    save(model, tok, tmp_path / "ppo")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    back = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert back.config.block_size == 60 and back.config.vocab_size == 258 and back.config.activation == activation
    idx = random_ids(258)
    with torch.no_grad():
        assert torch.allclose(back(idx), model(idx), atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["n_positions"]) == (256, 257, 60)
    tensors = load_safetensors(str(tmp_path / "hf/model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to wte, as in HF's own files
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)


def test_safetensors_header_follows_the_format(tmp_path):
    """Read the file the plain way: header length, JSON header, contiguous data in offset order, bf16 bytes intact."""
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "c": torch.randn(4).half()}
    path = tmp_path / "x.safetensors"
    export_hf.save_safetensors(tensors, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(raw) - 8 - n
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": header["a"]["data_offsets"]}
    begin, end = header["a"]["data_offsets"]
    assert list(memoryview(raw[8 + n + begin:8 + n + end]).cast("f")) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    back = load_safetensors(str(path))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_bfloat16_export_holds_the_rounded_weights(tmp_path):
    model = random_model()
    save(model, Tokenizer.byte_level(), tmp_path / "sft", stage="sft")
    export_hf.export(str(tmp_path / "sft"), str(tmp_path / "hf"), dtype="bfloat16")
    tensors = load_safetensors(str(tmp_path / "hf/model.safetensors"))
    assert tensors["transformer.wte.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["transformer.wte.weight"], model.transformer.wte.weight.detach().bfloat16())
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"


def hf_sequence_classification(path):
    """
    GPT2ForSequenceClassification written out from the exported files alone: the GPT-2 trunk (Conv1D weights
    transposed back) and score = ln_f output @ score.weight.T with no bias, read at the last non-pad token.
    """
    cfg = json.loads((Path(path) / "config.json").read_text())
    sd = load_safetensors(str(Path(path) / "model.safetensors"))
    config = GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"])
    model = ScalarGPT(config).eval()
    state = {}
    for k, v in sd.items():
        if k == "score.weight":
            state["head.weight"], state["head.bias"] = v, torch.zeros(1)
        else:
            state[k] = v.t() if k.endswith(hf.TRANSPOSED) else v
    model.load_state_dict(state)
    assert len(cfg["id2label"]) == 1 and cfg["architectures"] == ["GPT2ForSequenceClassification"]
    return model, cfg["pad_token_id"]


@pytest.mark.parametrize("bias", [True, False])
def test_reward_model_scores_survive_without_a_head_bias(tmp_path, bias):
    rm = random_model("scalar", bias=bias)
    with torch.no_grad():
        rm.head.bias.fill_(-1.7)  # as the InstructGPT normalisation leaves it: far from 0
    tok = Tokenizer.byte_level()
    save(rm, tok, tmp_path / "rm", stage="rm")
    export_hf.export(str(tmp_path / "rm"), str(tmp_path / "hf"))
    back, pad_id = hf_sequence_classification(tmp_path / "hf")
    assert pad_id == tok.pad_id
    idx = random_ids(256)
    with torch.no_grad():
        assert torch.allclose(back(idx), rm(idx), atol=1e-4, rtol=0)  # every position, the bias included
    assert "score.bias" not in load_safetensors(str(tmp_path / "hf/model.safetensors"))


def test_fold_head_bias_matches_the_worked_example():
    beta = hf.fold_head_bias(torch.zeros(2), torch.tensor([[3.0, 4.0]]), torch.tensor([5.0]))
    assert beta.tolist() == pytest.approx([0.6, 0.8])
    g = torch.Generator().manual_seed(0)
    beta0, w, b = torch.randn(16, generator=g), torch.randn(1, 16, generator=g), torch.randn(1, generator=g)
    h = torch.randn(5, 16, generator=g)  # LayerNorm outputs without their bias
    new = hf.fold_head_bias(beta0, w, b)
    assert torch.allclose((h + new) @ w[0], (h + beta0) @ w[0] + b, atol=1e-5)
    with pytest.raises(utils.UserError, match="all 0"):
        hf.fold_head_bias(beta0, torch.zeros(1, 16), torch.ones(1))


def test_a_zero_head_exports_its_final_layernorm_bias_unchanged(tmp_path):
    """
    A reward model as ScalarGPT.from_gpt starts it (head weight and bias 0, train_rm.py before its first step): there
    is no bias to fold, so ln_f's bias goes out as it is (not 0 * w / (w . w) = nan), and the scores are ours, all 0.
    """
    beta = torch.randn(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf.fold_head_bias(beta, torch.zeros(1, 16), torch.zeros(1)), beta)
    rm = random_model("scalar")
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.bias.zero_()
    save(rm, Tokenizer.byte_level(), tmp_path / "rm", stage="rm")
    export_hf.export(str(tmp_path / "rm"), str(tmp_path / "hf"))
    sd = load_safetensors(str(tmp_path / "hf/model.safetensors"))
    assert torch.equal(sd["transformer.ln_f.bias"], rm.transformer.ln_f.bias.detach())
    back, _ = hf_sequence_classification(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(back(random_ids(256)), torch.zeros(3, 40))


def gpt2_hidden(sd, n_head, idx, activation):
    """
    GPT-2's forward written from its files alone, float64: Conv1D layers (x @ W + b, W stored (in, out)), causal
    softmax attention, LayerNorm eps 1e-5. sd: the exported tensors; idx (B, T) -> the final LayerNorm's output
    (B, T, C).
    """
    p = {k.removeprefix("transformer."): v.double() for k, v in sd.items()}

    def ln(x, w, b):  # (x - mean) / sqrt(biased var + eps) * w + b
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b

    B, T = idx.shape
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]  # (B, T, C)
    C = x.size(-1)
    hs = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    n_layer = len({k.split(".")[1] for k in p if k.startswith("h.")})
    for l in range(n_layer):
        w = lambda name: p[f"h.{l}.{name}"]  # noqa: E731
        qkv = ln(x, w("ln_1.weight"), w("ln_1.bias")) @ w("attn.c_attn.weight") + w("attn.c_attn.bias")  # (B, T, 3C)
        heads = []
        for h in range(n_head):
            q, k, v = (qkv[..., i * C + h * hs:i * C + (h + 1) * hs] for i in range(3))  # (B, T, hs) each
            scores = (q @ k.transpose(1, 2) / math.sqrt(hs)).masked_fill(~causal, -math.inf)  # (B, T, T)
            heads.append(torch.softmax(scores, -1) @ v)
        x = x + torch.cat(heads, -1) @ w("attn.c_proj.weight") + w("attn.c_proj.bias")
        m = ln(x, w("ln_2.weight"), w("ln_2.bias")) @ w("mlp.c_fc.weight") + w("mlp.c_fc.bias")  # (B, T, 4C)
        if activation == "gelu_new":  # GPT-2's tanh approximation
            m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        else:  # the exact GELU
            m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        x = x + m @ w("mlp.c_proj.weight") + w("mlp.c_proj.bias")
    return ln(x, p["ln_f.weight"], p["ln_f.bias"])


def gpt2_tensor_names(n_layer, kind):
    """The tensor names of GPT2LMHeadModel's files (lm_head tied, so absent) or GPT2ForSequenceClassification's."""
    per_layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    names |= {f"transformer.h.{l}.{n}" for l in range(n_layer) for n in per_layer}
    return names | ({"score.weight"} if kind == "scalar" else set())


@pytest.mark.parametrize("kind,bias,activation", [("gpt", True, "gelu_new"), ("scalar", False, "gelu"),
                                                  ("scalar", True, "gelu_new")])
def test_exported_tensors_are_gpt2s_and_compute_the_model(tmp_path, kind, bias, activation):
    """
    The file holds exactly GPT-2's tensor names, in GPT-2's layout: a plain GPT-2 forward over them (gpt2_hidden, not
    GPT.from_pretrained, which shares the export's list of Conv1D names) gives the model's logits, or its scores.
    """
    model = random_model(kind, bias=bias, activation=activation, n_layer=3, n_head=4)
    if kind == "scalar":
        with torch.no_grad():
            model.head.bias.fill_(-1.3)
    save(model, Tokenizer.byte_level(), tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    sd = load_safetensors(str(tmp_path / "hf/model.safetensors"))
    assert set(sd) == gpt2_tensor_names(3, kind)
    idx = random_ids(258 if kind == "gpt" else 256)
    h = gpt2_hidden(sd, 4, idx, activation)  # (B, T, C)
    with torch.no_grad():
        ours = model(idx).double()
    head = sd["transformer.wte.weight"] if kind == "gpt" else sd["score.weight"]  # tied LM head, or (1, C) score
    ref = h @ head.double().t()  # (B, T, V) or (B, T, 1)
    ref = ref if kind == "gpt" else ref[..., 0]
    assert torch.allclose(ref, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt", "scalar"])
def test_config_files_describe_the_model_and_tokenizer(tmp_path, kind):
    """
    config.json as transformers' GPT2Config reads it, every field from the model's own config (sizes that all differ,
    so a swapped field shows), and the tokenizer's files naming EOS and PAD by the ids the checkpoint uses.
    """
    model = random_model(kind, block_size=48, n_layer=3, n_head=4, dropout=0.125, activation="gelu")
    tok = Tokenizer.byte_level()
    save(model, tok, tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="float16")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    expected = {
        "architectures": ["GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification"],
        "model_type": "gpt2", "vocab_size": 258, "n_positions": 48, "n_ctx": 48, "n_embd": 32, "n_layer": 3,
        "n_head": 4, "n_inner": None, "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "resid_pdrop": 0.125, "embd_pdrop": 0.125, "attn_pdrop": 0.125,
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True, "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "torch_dtype": "float16",
    }
    if kind == "scalar":
        expected.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})  # num_labels 1
    assert cfg == expected
    files = set(os.listdir(tmp_path / "hf"))
    if kind == "gpt":
        generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
        assert generation == {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    else:
        assert "generation_config.json" not in files
    vocab, _ = read_hf_tokenizer(tmp_path / "hf")
    tok_cfg = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())
    special = json.loads((tmp_path / "hf/special_tokens_map.json").read_text())
    for names in (tok_cfg, special):
        ids = {k: vocab[names[k]] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        assert ids == {"bos_token": tok.eos_id, "eos_token": tok.eos_id, "unk_token": tok.eos_id,
                       "pad_token": tok.pad_id}
    added = tok_cfg["added_tokens_decoder"]
    assert sorted(added) == sorted([str(tok.eos_id), str(tok.pad_id)])
    assert all(vocab[v["content"]] == int(k) and v["special"] for k, v in added.items())
    # GPT2Tokenizer's options that would change what tok.encode and tok.decode give: no leading space, no BOS, no
    # cleanup of spaces when decoding, bytes that are no UTF-8 decoded to U+FFFD as tiktoken does (errors="replace")
    assert (tok_cfg["add_prefix_space"], tok_cfg["add_bos_token"], tok_cfg["clean_up_tokenization_spaces"]) == \
        (False, False, False)
    assert tok_cfg["errors"] == "replace" and tok_cfg["model_max_length"] == 48


@pytest.mark.parametrize("kind,pattern", [("gpt", None), ("scalar", r"\S+|\s+")])
def test_readme_says_how_to_load_this_export(tmp_path, kind, pattern):
    """
    README.md names the class that loads the weights, offers AutoTokenizer only where GPT-2's tokenizer files were
    written (GPT-2's split pattern), says how a scalar model's score is read, and its tiktoken snippet, run as it is
    written, encodes as the checkpoint's tokenizer, with its EOS and PAD ids.
    """
    byte = Tokenizer.byte_level()
    tok = byte if pattern is None else Tokenizer("words", byte.mergeable_ranks, pattern)
    save(random_model(kind), tok, tmp_path / "ckpt", stage="rm")
    _, files = export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    text = (tmp_path / "hf/README.md").read_text()
    cls = "GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification"
    assert text.startswith("# nanorlhf export: stage rm, step 7\n")
    transformers_code, tiktoken_code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert f"from transformers import AutoTokenizer, {cls}\n" in transformers_code
    assert f"model = {cls}.from_pretrained(DIR)" in transformers_code
    assert ("AutoTokenizer.from_pretrained(DIR)" in transformers_code) == ("vocab.json" in files) == (pattern is None)
    assert ("logits[:, 0]" in text) == (kind == "scalar")
    scope = {}
    exec(tiktoken_code.replace("DIR", str(tmp_path / "hf")), scope)
    for t in random_texts(20):
        assert scope["enc"].encode(t) == tok.encode(t), t
    assert scope["enc"].encode("<|endoftext|><|pad|>", allowed_special="all") == [tok.eos_id, tok.pad_id]


def test_from_pretrained_reads_gpt2_config_as_transformers_does(tmp_path):
    """
    An export edited as other GPT-2 files are written: n_positions wins over an n_ctx that differs (GPT2Config reads
    n_positions), n_positions null falls back to n_ctx, n_inner 4 * n_embd is GPT-2's own; n_inner otherwise, or a
    size 0, is refused. With both weight files the safetensors one is read, as transformers does.
    """
    model = random_model()
    save(model, Tokenizer.byte_level(), tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    original = json.loads((tmp_path / "hf/config.json").read_text())
    idx = random_ids(258)

    def load(**edit):
        (tmp_path / "hf/config.json").write_text(json.dumps({**original, **edit}))
        return GPT.from_pretrained(str(tmp_path / "hf")).eval()

    assert load(n_ctx=1024).config.block_size == 60
    assert load(n_positions=None, n_ctx=60).config.block_size == 60
    assert load(architectures=None).config.n_layer == 2  # null: no class named, as when the field is left out
    # GPT-2's files train with dropout 0.1; GPT from them is the function of the weights alone (dropout 0)
    assert load(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).config.dropout == 0.0
    back = load(n_inner=4 * 32)
    with torch.no_grad():
        assert torch.allclose(back(idx), model(idx), atol=1e-5, rtol=0)
    for edit, message in [({"n_inner": 2 * 32}, "n_inner 64 is not supported"),
                          ({"n_layer": 0}, "n_layer 0 in config.json is not a positive integer"),
                          ({"n_layer": True}, "n_layer true in config.json is not a positive integer"),
                          ({"n_positions": 0}, "n_positions 0 in config.json is not a positive integer")]:
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'hf'))}: {message}"):
            load(**edit)
    other = random_model(seed=5)
    torch.save(hf.hf_state_dict(other.state_dict(), other.config, "gpt"), tmp_path / "hf/pytorch_model.bin")
    with torch.no_grad():
        assert torch.allclose(load()(idx), model(idx), atol=1e-5, rtol=0)  # model.safetensors, not the .bin
        os.remove(tmp_path / "hf/model.safetensors")
        assert torch.allclose(load()(idx), other(idx), atol=1e-5, rtol=0)


def test_from_pretrained_names_a_tensor_of_the_wrong_shape_or_a_missing_one(tmp_path):
    """
    Each tensor is checked: one of the wrong shape (even one that would broadcast, or hold as many numbers) or missing
    is one line naming the shape as the file stores it (Conv1D's (in, out)).
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    path = tmp_path / "hf/model.safetensors"
    sd = load_safetensors(str(path))
    for i, name in enumerate(sorted(sd)):
        shape = sd[name].shape
        bad = torch.zeros(1) if i % 2 else torch.zeros(*shape[:-1], shape[-1] + 1)  # (1,) would broadcast in copy_
        export_hf.save_safetensors({**sd, name: bad}, str(path))
        with pytest.raises(ValueError, match=f"{re.escape(repr(name))} has shape"):
            GPT.from_pretrained(str(tmp_path / "hf"))
        export_hf.save_safetensors({k: v for k, v in sd.items() if k != name}, str(path))
        with pytest.raises(ValueError, match=rf"missing tensors \[{re.escape(repr(name))}\]"):
            GPT.from_pretrained(str(tmp_path / "hf"))
    # c_fc.weight is (32, 128) in the file: stored in nn.Linear's layout (128, 32), or with a leading 1 (1, 32, 128)
    name = "transformer.h.0.mlp.c_fc.weight"
    for bad in (sd[name].t(), sd[name][None]):
        export_hf.save_safetensors({**sd, name: bad}, str(path))
        with pytest.raises(ValueError, match=rf"'{name}' has shape {re.escape(str(tuple(bad.shape)))}, expected "
                                             rf"\(32, 128\)$"):
            GPT.from_pretrained(str(tmp_path / "hf"))


def test_load_safetensors_reads_empty_tensors_and_checks_the_header_length(tmp_path, monkeypatch):
    """
    Our own reader (the package made unimportable): empty tensors (no bytes) among others come back as written;
    a header length one byte past the file is refused as not safetensors, naming the file.
    """
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "empty": torch.zeros(0, 5), "b": torch.randn(7, generator=g).half(),
               "none": torch.zeros(2, 0).bfloat16()}
    path = tmp_path / "x.safetensors"
    export_hf.save_safetensors(tensors, str(path))
    back = load_safetensors(str(path))
    assert set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
               for k, v in tensors.items())
    raw = path.read_bytes()
    path.write_bytes((len(raw) - 8 + 1).to_bytes(8, "little") + raw[8:])
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: cannot read it as safetensors"):
        load_safetensors(str(path))


def test_load_safetensors_refuses_offsets_that_do_not_span_the_shape(tmp_path, monkeypatch):
    """
    A header whose data_offsets do not hold exactly the shape's bytes: [0, 0] for a (3, 4) F32 came back as
    uninitialised memory, [16, 0] as the rest of the data, without a word. Refused as not safetensors, naming the file.
    """
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # our own reader
    path = tmp_path / "x.safetensors"
    export_hf.save_safetensors({"a": torch.arange(4.0), "b": torch.arange(12.0)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    # names sorted, back to back: a (4,) F32 is bytes [0, 16) of the data, b (12,) F32 is [16, 64)
    assert header["a"]["data_offsets"] == [0, 16] and header["b"]["data_offsets"] == [16, 64]
    for name, shape, offsets in [("a", [3, 4], [0, 0]), ("b", [12], [16, 0]), ("b", [12], [16, 68])]:
        blob = json.dumps({**header, name: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: cannot read it as safetensors"):
            load_safetensors(str(path))


class RunsCode:
    """An object whose unpickling calls open(marker, "w"): any other code could run in its place."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_from_pretrained_runs_no_code_from_a_bin(tmp_path):
    """A pytorch_model.bin is unpickled weights-only: one that would run code is refused in one line, nothing run."""
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    tensors = load_safetensors(str(tmp_path / "hf/model.safetensors"))
    os.remove(tmp_path / "hf/model.safetensors")
    marker = tmp_path / "ran"
    torch.save({**tensors, "transformer.wte.weight": RunsCode(str(marker))}, tmp_path / "hf/pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot load \("):
        GPT.from_pretrained(str(tmp_path / "hf"))
    assert not marker.exists()


# -----------------------------------------------------------------------------
# tokenizer files


def read_hf_tokenizer(out_dir):
    """(vocab {text: id}, merge rank {(left, right): line number}) from vocab.json and merges.txt."""
    vocab = json.loads((Path(out_dir) / "vocab.json").read_text(encoding="utf-8"))
    lines = (Path(out_dir) / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    return vocab, {tuple(line.split(" ")): i for i, line in enumerate(lines[1:]) if line}


def gpt2_byte_chars():
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the others in order from chr(256)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


def hf_bpe_encode(text, vocab, rank):
    """GPT2Tokenizer's algorithm, written plainly: split, map bytes to characters, merge by merges.txt rank."""
    char = gpt2_byte_chars()
    ids = []
    for chunk in regex.findall(HF_GPT2_SPLIT, text):
        word = [char[b] for b in chunk.encode("utf-8")]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: rank.get(p, math.inf))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    return ids


def random_texts(n, seed=0):
    rng = random.Random(seed)
    pieces = ["sort", " 3 1 2", "Hello", " world", "  ", "\n\n", "Human:", " Assistant:", "don't", " it's", "123",
              "45678", " ", "!?", "...", "é", "naïve", " 中文", "😀", "\t", "x", "  y", "'ll", "ÿ", "\x00"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def check_tokenizer_files(tok, tmp_path):
    model = random_model(vocab_size=tok.vocab_size)
    save(model, tok, tmp_path / "ckpt")
    _, files = export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.tiktoken"} <= set(files)
    vocab, rank = read_hf_tokenizer(tmp_path / "hf")
    for text in random_texts(200):
        assert hf_bpe_encode(text, vocab, rank) == tok.encode(text), text
    assert vocab["<|endoftext|>"] == tok.eos_id and vocab["<|pad|>"] == tok.pad_id and len(vocab) == tok.vocab_size
    char = gpt2_byte_chars()  # every byte's token, also those no text above has (0xAE, 0x7F, ...)
    assert all(vocab[char[b]] == tok.mergeable_ranks[bytes([b])] for b in range(256))
    assert Tokenizer.from_tiktoken_file(str(tmp_path / "hf/tokenizer.tiktoken")).mergeable_ranks == tok.mergeable_ranks


def test_byte_level_tokenizer_files(tmp_path):
    check_tokenizer_files(Tokenizer.byte_level(), tmp_path)


def test_trained_bpe_tokenizer_files(tmp_path):
    text = " ".join(random_texts(400, seed=3))
    check_tokenizer_files(Tokenizer("trained", train_bpe(text, 400)), tmp_path)


@pytest.mark.skipif(not GPT2_FILE.exists(), reason="shared/data/gpt2.tiktoken not present")
def test_gpt2_tokenizer_files(tmp_path):
    check_tokenizer_files(Tokenizer.gpt2(str(GPT2_FILE)), tmp_path)


def test_vocab_and_merges_worked_example():
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"bc": 258})
    vocab, merges = export_hf.vocab_and_merges(ranks)
    assert merges == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]
    assert vocab["Ġ"] == 32 and vocab["Ċ"] == 10 and vocab["abc"] == 257 and len(vocab) == 259


def test_chat_template_renders_the_training_text():
    jinja2 = pytest.importorskip("jinja2")
    tok = Tokenizer.byte_level()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort 3 1 2"},
                {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "sort 9 8"}]
    template = jinja2.Environment().from_string(export_hf.CHAT_TEMPLATE)
    ids, _ = tok.render_messages(messages[:3])
    assert template.render(messages=messages[:3], add_generation_prompt=False) == tok.enc.decode(ids)
    prompt = template.render(messages=messages[3:], add_generation_prompt=True)
    assert prompt == tok.enc.decode(tok.render_prompt("sort 9 8"))


@pytest.mark.parametrize("source", ["trained", "gpt2"])
def test_chat_template_gives_the_training_ids(tmp_path, source):
    """
    The exported tokenizer files run the way GPT2Tokenizer runs them (hf_bpe_encode) on the chat template's text,
    split at the special tokens first: the ids must be the ones the model was trained on, also for a prompt that
    ends in whitespace, where GPT-2's split pattern cuts "\\n\\n\\nAssistant" otherwise than "\\n" + "\\n\\nAssistant".
    """
    jinja2 = pytest.importorskip("jinja2")
    if source == "gpt2" and not GPT2_FILE.exists():
        pytest.skip("shared/data/gpt2.tiktoken not present")
    corpus = " ".join(random_texts(400, seed=3))  # its BPE merges "\n\n", as GPT-2's does
    tok = Tokenizer.gpt2(str(GPT2_FILE)) if source == "gpt2" else Tokenizer("trained", train_bpe(corpus, 400))
    export_hf.write_tokenizer(tok, str(tmp_path), 64)
    vocab, rank = read_hf_tokenizer(tmp_path)
    template = jinja2.Environment().from_string(export_hf.CHAT_TEMPLATE)

    def hf_ids(messages, add_generation_prompt):
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        pieces = [hf_bpe_encode(piece, vocab, rank) for piece in text.split("<|endoftext|>")]
        return sum((piece + [tok.eos_id] for piece in pieces[:-1]), []) + pieces[-1]

    for prompt in ["sort 3 1 2", "sort 3 1 2\n", "sort 3 1 2\n\n", "what is this?  ", "tab\t", ""]:
        user = [{"role": "user", "content": prompt}]
        assert hf_ids(user, True) == tok.render_prompt(prompt), prompt
        conversation = [{"role": "system", "content": "Be brief. "}, *user, {"role": "assistant", "content": "1 2 3\n"},
                        {"role": "user", "content": prompt}, {"role": "assistant", "content": " ok"}]
        assert hf_ids(conversation, False) == tok.render_messages(conversation)[0], prompt


# -----------------------------------------------------------------------------
# the command line


def test_cli_exports_a_critic_and_refuses_to_overwrite(tmp_path):
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    save(random_model("scalar"), tok, tmp_path / "ppo", name="critic.pt")
    p = script("export_hf.py", "--ckpt", str(tmp_path / "ppo/critic.pt"), "--out", str(tmp_path / "hf"))
    assert "GPT2ForSequenceClassification" in p.stdout
    first = (tmp_path / "hf/model.safetensors").read_bytes()
    p = script("export_hf.py", "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "hf"), check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert (tmp_path / "hf/model.safetensors").read_bytes() == first  # the good output is untouched
    script("export_hf.py", "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "hf"), "--overwrite")
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "ppo"]  # no temporary directory left behind


def run_cli(monkeypatch, capsys, *argv):
    """export_hf.py as its __main__ runs it (utils.run), in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["export_hf.py", *argv])
    with pytest.raises(SystemExit) as e:
        utils.run(export_hf.main)
    return e.value.code, capsys.readouterr().err


def test_overwrite_never_replaces_a_checkpoint_directory(tmp_path, monkeypatch, capsys):
    """--out resolving to the checkpoint's directory, one above it, or one that holds a ckpt.pt: refused, untouched."""
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "out/ppo")
    save(random_model(), tok, tmp_path / "out/sft", stage="sft")
    save(random_model("scalar"), tok, tmp_path / "out/ppo", name="critic.pt")
    (tmp_path / "out/ppo/metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "link").symlink_to(tmp_path / "out/ppo")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [("out/ppo", "out/ppo", "is or contains"), ("out/ppo", "out", "is or contains"),
             ("out/ppo/critic.pt", "out/ppo", "is or contains"), ("out/ppo", "link", "is or contains"),
             ("out/ppo", "out/sft/../ppo/", "is or contains"), ("out/ppo", "out/sft", "holds a nanorlhf checkpoint"),
             ("out/sft", "", "is or contains")]
    for ckpt, out, message in cases:
        with pytest.raises(utils.UserError, match=message):
            export_hf.export(str(tmp_path / ckpt), str(tmp_path / out), overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "elsewhere").mkdir()
    save(random_model(), tok, tmp_path / "elsewhere/ppo")
    with pytest.raises(utils.UserError, match=r"out holds a nanorlhf checkpoint"):  # a whole pipeline
        export_hf.export(str(tmp_path / "elsewhere/ppo"), str(tmp_path / "out"), overwrite=True)
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "out/ppo"), "--out", str(tmp_path / "out/ppo"),
                        "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "--out" in err and "--ckpt" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "elsewhere" not in p.parts} == before


def test_overwrite_of_the_current_directory(tmp_path, monkeypatch):
    """
    --out . with --overwrite replaces the earlier export's files in place: the directory stays the one the shell
    stands in (before, it was swapped for a new one and the shell's current directory was deleted).
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    save(random_model("scalar"), tok, tmp_path / "ppo", name="critic.pt")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))  # a policy: it has a generation_config.json
    inode = (tmp_path / "hf").stat().st_ino
    monkeypatch.chdir(tmp_path / "hf")
    _, files = export_hf.export(str(tmp_path / "ppo/critic.pt"), ".", overwrite=True)
    assert os.stat(".").st_ino == inode and os.path.samefile(os.getcwd(), tmp_path / "hf")
    assert sorted(q.name for q in (tmp_path / "hf").iterdir()) == sorted(files)  # generation_config.json is gone
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "ppo"]


def test_overwrite_replaces_only_an_earlier_export(tmp_path, monkeypatch, capsys):
    """
    --overwrite replaces an empty directory or one export_hf.py wrote, nothing else: a data directory, someone's
    notes, a model directory transformers wrote (the same file names, no README.md of ours) are refused in one line
    naming a file, exit status 2, every file untouched and nothing written beside them.
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    save(random_model("scalar"), tok, tmp_path / "ppo", name="critic.pt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "notes/drafts").mkdir(parents=True)
    (tmp_path / "notes/drafts/thesis.tex").write_text("important")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "saved"))  # as transformers' save_pretrained: no README
    (tmp_path / "saved/README.md").unlink()
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "card"))  # a model card of someone else's
    (tmp_path / "card/README.md").write_text("# my fine-tuned GPT-2\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, message in [("data", r"holds \S*data/sft.jsonl, which export_hf.py does not write"),
                         ("notes", r"holds \S*notes/drafts, which export_hf.py does not write"),
                         ("saved", r"saved/README.md is missing or does not start with '# nanorlhf export'"),
                         ("card", r"card/README.md is missing or does not start with '# nanorlhf export'")]:
        with pytest.raises(utils.UserError, match=message):
            export_hf.export(str(tmp_path / "ppo"), str(tmp_path / out), overwrite=True)
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "notes"),
                        "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "notes/drafts" in err, err
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "data"))
    assert code == 2 and "data/sft.jsonl" in err and "pass --overwrite" not in err, err  # no hint that would not do
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["card", "data", "notes", "ppo", "saved"]
    # what export writes, for either kind of model, is replaced, also by the other kind; an empty directory too
    (tmp_path / "empty").mkdir()
    for ckpt, out in [("ppo/critic.pt", "empty"), ("ppo", "empty"), ("ppo/critic.pt", "empty")]:
        _, files = export_hf.export(str(tmp_path / ckpt), str(tmp_path / out), overwrite=True)
        assert sorted(q.name for q in (tmp_path / out).iterdir()) == sorted(files)
        assert set(files) <= set(export_hf.EXPORT_FILES)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["card", "data", "empty", "notes", "ppo", "saved"]


def test_overwrite_refuses_a_directory_under_an_export_files_name(tmp_path):
    """
    --overwrite checks that each entry is a file export_hf.py writes, not only its name: an earlier export whose
    merges.txt is a directory of someone's files is refused, those files untouched.
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ppo")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    (tmp_path / "hf/merges.txt").unlink()
    (tmp_path / "hf/merges.txt").mkdir()
    (tmp_path / "hf/merges.txt/mine.txt").write_text("keep")
    with pytest.raises(utils.UserError, match=r"holds \S*hf/merges.txt, which export_hf.py does not write"):
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"), overwrite=True)
    assert (tmp_path / "hf/merges.txt/mine.txt").read_text() == "keep"


def test_an_export_killed_while_replacing_an_export_in_place_leaves_no_readme(tmp_path, monkeypatch):
    """
    --overwrite of an earlier export that is the current directory replaces its files in place, the old README.md
    first: killed before its own README.md is in, the directory holds none (not the old one over a mix of old and
    new files), so the next export refuses it rather than take it for a complete export.
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ppo")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path / "hf")
    replace = kill_at_rename(monkeypatch, "README.md")
    with pytest.raises(KeyboardInterrupt):
        export_hf.export(str(tmp_path / "ppo"), ".", overwrite=True)
    monkeypatch.setattr(os, "replace", replace)
    assert not (tmp_path / "hf/README.md").exists() and (tmp_path / "hf/model.safetensors").exists()
    with pytest.raises(utils.UserError, match="README.md is missing"):
        export_hf.export(str(tmp_path / "ppo"), ".", overwrite=True)


def test_symlink_out_exports_into_its_target(tmp_path, monkeypatch, capsys):
    """
    --out a symlink: the export goes into the directory it points to (made if missing), the link stays, and every
    check is about that directory. Before, the link itself was renamed and then rmtree refused it (a traceback).
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to("target")  # relative, as `ln -s target link` makes it
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "link"))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target/config.json").is_file()
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "link"), overwrite=True)  # an earlier export: replaced
    (tmp_path / "dangling").symlink_to(tmp_path / "later/hf")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "dangling"))
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "later/hf/model.safetensors").is_file()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dangling", "later", "link", "ppo", "target"]
    assert sorted(q.name for q in (tmp_path / "later").iterdir()) == ["hf"]  # no temporary left beside the target
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prefs.jsonl").write_text("{}\n")
    (tmp_path / "to_data").symlink_to("data")
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "to_data"),
                        "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "to_data/prefs.jsonl, which export_hf.py does not write" in err, err
    assert (tmp_path / "data/prefs.jsonl").read_text() == "{}\n" and (tmp_path / "to_data").is_symlink()
    (tmp_path / "loop").symlink_to("loop")
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "loop"))
    assert code == 2 and err.count("\n") == 1 and "loop is a symlink that resolves to no path" in err, err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dangling", "data", "later", "link", "loop", "ppo", "target",
                                                         "to_data"]


def test_newer_model_config_is_one_line(tmp_path, monkeypatch, capsys):
    """A config field this version does not know (a newer nanorlhf's): one line naming the file, nothing written."""
    tok = Tokenizer.byte_level()
    payload = utils.model_payload(random_model(), tok, "ppo", {"seed": 0}, 7)
    payload["model_config"]["rope"] = True
    utils.save_checkpoint(str(tmp_path), payload, "newer.pt")
    with pytest.raises(utils.UserError, match=r"newer.pt: model_config: .*'rope'"):
        export_hf.export(str(tmp_path / "newer.pt"), str(tmp_path / "hf"))
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "newer.pt"), "--out", str(tmp_path / "hf"))
    assert code == 2 and err.count("\n") == 1 and "newer.pt: model_config" in err, err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["newer.pt"]


def test_a_tokenizer_that_does_not_load_is_one_line(tmp_path, monkeypatch, capsys):
    # export reads a checkpoint's config and tokenizer as load_model does (utils.model_spec): one line, no traceback
    payload = utils.model_payload(random_model(), Tokenizer.byte_level(), "ppo", {"seed": 0}, 7)
    del payload["tokenizer"]["special_tokens"]
    utils.save_checkpoint(str(tmp_path), payload, "badtok.pt")
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "badtok.pt"), "--out", str(tmp_path / "hf"))
    assert code == 2 and err.count("\n") == 1 and "badtok.pt: the tokenizer does not load" in err, err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["badtok.pt"]


def test_exported_reward_model_is_no_language_model_to_from_pretrained(tmp_path):
    """GPT.from_pretrained on an RM export: one line saying what it is (before: "unexpected tensor 'score.weight'")."""
    save(random_model("scalar"), Tokenizer.byte_level(), tmp_path / "rm", stage="rm")
    export_hf.export(str(tmp_path / "rm"), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"hf: architectures \['GPT2ForSequenceClassification'\] is a sequence "
                                         r"classifier \(a reward model or critic\), not a language model"):
        GPT.from_pretrained(str(tmp_path / "hf"))


def test_bad_out_or_ckpt_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    """
    Before: --out "" exported into the current directory, --out a file with --overwrite was told to pass
    --overwrite, --out below a file named the temporary directory (hf.tmp1234: Not a directory), and --ckpt ""
    gave ": no such checkpoint file".
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ppo")
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ppo, afile = str(tmp_path / "ppo"), str(tmp_path / "afile")
    for argv, message in [(["--ckpt", ppo, "--out", ""], "--out is empty"),
                          (["--ckpt", "", "--out", str(tmp_path / "hf")], "--ckpt is empty"),
                          (["--ckpt", ppo, "--out", afile, "--overwrite"], f"--out {afile} is a file, not a directory"),
                          (["--ckpt", ppo, "--out", afile + "/sub"], f"--out {afile}/sub: cannot create a directory")]:
        code, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert "pass --overwrite" not in err and ".tmp" not in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["afile", "cwd", "ppo"]
    assert not any((tmp_path / "cwd").iterdir())  # --out "": nothing exported into the current directory


@pytest.mark.parametrize("bad", ["int8", "complex64", "inf", "nan"])
def test_weights_that_are_no_trained_weights_are_one_line(tmp_path, monkeypatch, capsys, bad):
    """
    A ckpt.pt whose weights were quantised to int8, converted to complex, or overflowed to inf by an fp16 conversion:
    load_state_dict and hf_state_dict cast them to float32 without a word (a model of garbage that exported, sampled
    and trained, exit 0; or nan everywhere). export_hf.py and load_model (every --sft, --rm, --init_from, --ckpt)
    refuse it in one line naming the file and the tensor; the same model in float16 or bf16 loads, upcast.
    """
    model = random_model()
    state = model.state_dict()
    name = "transformer.h.1.mlp.c_fc.weight"
    if bad in ("int8", "complex64"):
        state = {k: (100 * v).to(getattr(torch, bad)) for k, v in state.items()}
        name, what = "transformer.wte.weight", f"has dtype {bad}, not a floating-point weight"
    else:
        state = {k: v.clone() for k, v in state.items()}
        state[name][3, 5] = float(bad)
        what = "holds inf or nan"
    payload = utils.model_payload(model, Tokenizer.byte_level(), "sft", {"seed": 0}, 7)
    utils.save_checkpoint(str(tmp_path / "run"), {**payload, "model": state})
    ckpt_file = tmp_path / "run" / "ckpt.pt"
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert (code, err) == (2, f"error: --ckpt {ckpt_file}: tensor {name!r} {what}\n")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(utils.UserError) as e:
        utils.load_model(str(tmp_path / "run"), flag="--init_from")
    assert str(e.value) == f"--init_from {ckpt_file}: tensor {name!r} {what}"
    for dtype in (torch.float16, torch.bfloat16):  # a half-precision checkpoint is fine: upcast to float32
        utils.save_checkpoint(str(tmp_path / "half"), {**payload, "model": {k: v.to(dtype) for k, v in
                                                                            model.state_dict().items()}})
        loaded = utils.load_model(str(tmp_path / "half"))[0]
        for k, v in loaded.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, model.state_dict()[k].to(dtype).float()), k


def test_cli_bad_checkpoint_writes_nothing(tmp_path):
    p = script("export_hf.py", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "hf"), check=False)
    assert p.returncode == 2 and "nope" in p.stderr and not (tmp_path / "hf").exists()
    utils.save_checkpoint(str(tmp_path / "run"), {"step": 3}, "train_state.pt")
    p = script("export_hf.py", "--ckpt", str(tmp_path / "run/train_state.pt"), "--out", str(tmp_path / "hf"), check=False)
    assert p.returncode == 2 and "not a nanorlhf model checkpoint" in p.stderr and not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------
# transformers itself (skipped when it is not installed)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_transformers_loads_the_export(tmp_path, activation):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = Tokenizer.byte_level()
    model, rm = random_model(activation=activation), random_model("scalar", activation=activation)
    with torch.no_grad():
        rm.head.bias.fill_(0.8)
    save(model, tok, tmp_path / "ppo")
    save(rm, tok, tmp_path / "rm", stage="rm")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf_ppo"))
    export_hf.export(str(tmp_path / "rm"), str(tmp_path / "hf_rm"))
    idx = random_ids(256)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf_ppo")).eval()
    hf_rm = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "hf_rm")).eval()
    # right-padded rows of different lengths: the RM's score is read at each row's last real token, as ours
    seqs = [tok.render("sort 3 1 2", "1 2 3")[0], tok.render("sort 9 8 7 6", "6 7 8 9")[0]]
    T = max(map(len, seqs))
    padded = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    mask = (padded != tok.pad_id).long()
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx), atol=1e-4)
        assert torch.allclose(hf_rm(idx).logits[:, 0], rm(idx)[:, -1], atol=1e-4)
        assert torch.allclose(hf_rm(padded, attention_mask=mask).logits[:, 0], rm.score(padded, mask), atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf_ppo"))
    for text in random_texts(50):
        assert hf_tok.encode(text) == tok.encode(text), text
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    text = hf_tok.apply_chat_template([{"role": "user", "content": "sort 3 1 2"}], add_generation_prompt=True,
                                      tokenize=False)
    assert hf_tok.encode(text) == tok.render_prompt("sort 3 1 2")


@pytest.mark.skipif(not HAS_TRANSFORMERS or not GPT2_FILE.exists(), reason="needs transformers and gpt2.tiktoken")
def test_transformers_runs_the_gpt2_tokenizer_files(tmp_path):
    from transformers import AutoTokenizer

    tok = Tokenizer.gpt2(str(GPT2_FILE))
    save(random_model(vocab_size=tok.vocab_size), tok, tmp_path / "ckpt")
    export_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in random_texts(200, seed=5):
        assert hf_tok.encode(text) == tok.encode(text), text
    for prompt in ["sort 3 1 2", "sort 3 1 2\n", "what is this?  ", ""]:  # the chat template: the training ids
        messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": "1 2 3\n"}, {"role": "user", "content": prompt}]
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert hf_tok.encode(text) == tok.render_messages(messages, add_generation_prompt=True)[0], prompt
        text = hf_tok.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=False)
        assert hf_tok.encode(text) == tok.render_prompt(prompt), prompt


def test_an_export_removes_what_a_killed_export_left(tmp_path, monkeypatch, capsys):
    """
    An export killed midway left hf.tmp<pid>/ (config, safetensors, tokenizer files: it looks loadable) and
    hf.old<pid>/ (the earlier export it was replacing), which no later export removed. Now the next export removes
    those of dead processes; one killed between its two renames left no hf at all, and the earlier export is put back.
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    dead = dead_pid()
    for kind in ("tmp", "old"):
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / f"hf.{kind}{dead}"))
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf.tmp1"))  # a running process's (pid 1): kept
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"), overwrite=True)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "hf.tmp1", "ppo"]
    shutil.rmtree(tmp_path / "hf.tmp1")
    # killed between its renames: hf moved to hf.old<pid>, the new one still hf.tmp<pid>
    (tmp_path / "hf").rename(tmp_path / f"hf.old{dead}")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / f"hf.tmp{dead}"))
    capsys.readouterr()
    with pytest.raises(utils.UserError, match="pass --overwrite"):  # the earlier export is back, not replaced unasked
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    assert capsys.readouterr().out == (f"note: put back {tmp_path / 'hf'} from {tmp_path / f'hf.old{dead}'}, where "
                                       f"an export killed while replacing it had left it\n")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "ppo"]
    assert (tmp_path / "hf/README.md").read_text().startswith(export_hf.README_TITLE)


def test_an_export_puts_back_only_a_dead_exports_newest_old(tmp_path, capsys):
    """
    No hf but hf.old<pid>: a running process's (pid 1) is in the middle of its own swap and stays where it is; of two
    that dead processes left, the newest (by time, not by name) is put back and the other removed.
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    save(random_model("scalar"), tok, tmp_path / "ppo", name="critic.pt")
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf.old1"))
    capsys.readouterr()
    export_hf.export(str(tmp_path / "ppo/critic.pt"), str(tmp_path / "hf"))  # a new export, nothing put back
    assert capsys.readouterr().out == ""
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "hf.old1", "ppo"]
    assert (tmp_path / "hf.old1/generation_config.json").exists()  # still the policy's, where it was
    shutil.rmtree(tmp_path / "hf")
    shutil.rmtree(tmp_path / "hf.old1")
    newer, older = dead_pid(1), dead_pid(2)  # the newer one sorts first by name
    export_hf.export(str(tmp_path / "ppo/critic.pt"), str(tmp_path / f"hf.old{newer}"))
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / f"hf.old{older}"))
    os.utime(tmp_path / f"hf.old{older}", (1_000_000, 1_000_000))
    capsys.readouterr()
    with pytest.raises(utils.UserError, match="pass --overwrite"):
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    assert f"put back {tmp_path / 'hf'} from {tmp_path / f'hf.old{newer}'}" in capsys.readouterr().out
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hf", "ppo"]
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]


def test_an_empty_out_is_written_into_in_place(tmp_path, monkeypatch):
    """
    An existing empty --out is written into, not swapped for a new directory: before, `cd wd && export_hf.py --out .`
    left the shell in a deleted directory (the export under a new inode), and the directory's mode (1777) was lost.
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ppo")
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd").chmod(0o1777)
    inode = (tmp_path / "wd").stat().st_ino
    monkeypatch.chdir(tmp_path / "wd")
    _, files = export_hf.export(str(tmp_path / "ppo"), ".")
    assert os.stat(".").st_ino == inode and os.path.samefile(os.getcwd(), tmp_path / "wd")
    assert stat.S_IMODE((tmp_path / "wd").stat().st_mode) == 0o1777
    assert sorted(os.listdir(".")) == sorted(files)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty").chmod(0o1777)
    inode = (tmp_path / "empty").stat().st_ino
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "empty"))
    assert (tmp_path / "empty").stat().st_ino == inode and (tmp_path / "empty/README.md").is_file()
    export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "empty"), overwrite=True)  # swapped whole, the mode kept
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o1777
    assert sorted(q.name for q in tmp_path.iterdir()) == ["empty", "ppo", "wd"]


def test_a_mount_point_out_is_written_in_place(tmp_path, monkeypatch):
    """
    --out a mount point: empty, or an earlier export with --overwrite, it is written into, the temporary directory
    inside it (a rename across file systems fails). Before: "error: .../mnt -> .../mnt.old4232: Device or resource
    busy", naming a path that is not --out.
    """
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")
    save(random_model("scalar"), tok, tmp_path / "ppo", name="critic.pt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    is_mount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(mnt) or is_mount(p))
    written = []
    save_safetensors = export_hf.save_safetensors

    def recorded(tensors, path, metadata=None):
        written.append(path)
        save_safetensors(tensors, path, metadata)

    monkeypatch.setattr(export_hf, "save_safetensors", recorded)
    inode = mnt.stat().st_ino
    for ckpt in ["ppo", "ppo/critic.pt"]:
        _, files = export_hf.export(str(tmp_path / ckpt), str(mnt), overwrite=True)
        assert mnt.stat().st_ino == inode and sorted(q.name for q in mnt.iterdir()) == sorted(files)
        assert os.path.dirname(os.path.dirname(written[-1])) == str(mnt)  # on the mounted file system
    assert not (mnt / "generation_config.json").exists()  # the policy's file the critic's export lacks: removed
    assert json.loads((mnt / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["mnt", "ppo"]


def test_an_export_killed_while_moving_into_out_is_refused_next(tmp_path, monkeypatch, capsys):
    """
    An export into an existing directory moves its files in one by one, README.md last: killed midway, --out holds
    a partial export with no README.md, which the next export refuses to replace (one line naming --out) rather than
    take for a complete export. What a killed export left inside --out (.export_hf.tmp<pid>) goes with the next one.
    """
    save(random_model(), Tokenizer.byte_level(), tmp_path / "ppo")
    (tmp_path / "hf").mkdir()
    replace = kill_at_rename(monkeypatch, "README.md")
    with pytest.raises(KeyboardInterrupt):
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    monkeypatch.setattr(os, "replace", replace)
    partial = sorted(q.name for q in (tmp_path / "hf").iterdir())
    assert "README.md" not in partial and "model.safetensors" in partial
    for overwrite in [False, True]:
        code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "hf"),
                            *["--overwrite"] * overwrite)
        assert code == 2 and err.count("\n") == 1 and f"--out {tmp_path / 'hf'}" in err, err
        assert "README.md is missing" in err and "killed midway" in err, err
    assert sorted(q.name for q in (tmp_path / "hf").iterdir()) == partial
    shutil.rmtree(tmp_path / "hf")
    (tmp_path / f"hf/.export_hf.tmp{dead_pid()}").mkdir(parents=True)
    (tmp_path / f"hf/.export_hf.tmp{dead_pid()}/config.json").write_text("{}")
    (tmp_path / "hf/.export_hf.tmp1").mkdir()  # a running process's: kept, and --out is not empty
    with pytest.raises(utils.UserError, match="tmp1, which export_hf.py does not write"):
        export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    (tmp_path / "hf/.export_hf.tmp1").rmdir()
    _, files = export_hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
    assert sorted(q.name for q in (tmp_path / "hf").iterdir()) == sorted(files)


def test_a_full_disk_in_an_export_names_out(tmp_path, monkeypatch, capsys):
    # a write that met a full disk was "error: No space left on device", naming nothing
    tok = Tokenizer.byte_level()
    save(random_model(), tok, tmp_path / "ppo")

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_hf, "save_safetensors", full)
    code, err = run_cli(monkeypatch, capsys, "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "hf"))
    assert (code, err) == (2, f"error: {tmp_path / 'hf'}: No space left on device\n")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ppo"]  # nothing half-written


def dead_pid(k=1):
    """A process id no process can have: above the kernel's largest (an exited process's id may be given again)."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + k
