"""
Hugging Face GPT-2 files in pure torch (transformers is never imported here), both ways:

- export: our models as the state dict and config.json of GPT2LMHeadModel for a GPT, of
  GPT2ForSequenceClassification (num_labels 1) for a ScalarGPT. export_hf.py writes them to disk; bench.py loads
  them into transformers' classes to time its peers on our weights.
- import: a local GPT-2 directory (config.json, model.safetensors or pytorch_model.bin) read and checked
  (read_gpt2), and its tensors copied into a GPT (copy_gpt2_tensors); GPT.from_pretrained is the two together.
  load_safetensors reads the file format by hand when the safetensors package is not installed.

The differences, on purpose:
- HF's GPT-2 always has biases: a model built with bias=False gets zero biases (the same function).
- HF's GPT-2 uses Conv1D layers, which store the transpose of nn.Linear's weight.
- GPT2ForSequenceClassification's `score` head has no bias, so a ScalarGPT's head bias is folded into the final
  LayerNorm's bias (fold_head_bias), whose output feeds only that head there.
"""

import json
import math
import os

import torch

from nanorlhf.model import GPTConfig
from nanorlhf.utils import check, load_error_reason

# HF's GPT-2 uses Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# -----------------------------------------------------------------------------
# export: our models -> Hugging Face GPT-2 tensors (export_hf.py, bench.py)


def zero_biases(config):
    """{name: zeros} for every bias HF's GPT-2 has, for a model built with bias=False (which has none of them)."""
    C = config.n_embd
    sizes = {"ln_1.bias": C, "attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C, "ln_2.bias": C, "mlp.c_fc.bias": 4 * C,
             "mlp.c_proj.bias": C}
    out = {f"transformer.h.{i}.{k}": torch.zeros(n) for i in range(config.n_layer) for k, n in sizes.items()}
    out["transformer.ln_f.bias"] = torch.zeros(C)
    return out


def fold_head_bias(ln_f_bias, head_weight, head_bias):
    """
    The reward model's score is w . h + b with h the final LayerNorm's output (h = gamma * norm(x) + beta). HF's
    score head has no b, so move it into beta: beta' = beta + b w / (w . w), hence w . h' = w . h + b.
    ln_f_bias (C,), head_weight (1, C), head_bias (1,) -> beta' (C,). Computed in float64.
    Example: beta = [0, 0], w = [[3, 4]], b = 5 -> beta' = [0.6, 0.8] and w . beta' = 5.
    """
    w, b = head_weight.double()[0], head_bias.double()[0]
    ww = (w * w).sum()
    if ww == 0:
        check(b == 0, "the reward model's head weight is all 0 with a non-zero bias: GPT2ForSequenceClassification "
                      "has no bias to hold it (export a trained reward model)")
        return ln_f_bias
    return (ln_f_bias.double() + b * w / ww).to(ln_f_bias.dtype)


def hf_state_dict(sd, config, kind, dtype=torch.float32):
    """
    A nanorlhf state dict (GPT or ScalarGPT) -> the tensors of GPT2LMHeadModel (kind "gpt") or
    GPT2ForSequenceClassification (kind "scalar"), cast to dtype. lm_head.weight is left out: it is tied to
    transformer.wte.weight, as in HF's own GPT-2 files.
    """
    out = zero_biases(config) if not config.bias else {}
    for name, v in sd.items():
        if name == "lm_head.weight" or name.startswith("head."):
            continue
        out[name] = v.t() if name.endswith(TRANSPOSED) else v
    if kind == "scalar":
        out["transformer.ln_f.bias"] = fold_head_bias(out["transformer.ln_f.bias"].float(), sd["head.weight"].float(),
                                                      sd["head.bias"].float())
        out["score.weight"] = sd["head.weight"]  # (1, C): num_labels 1
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def hf_config(config, kind, eos_id, pad_id, dtype=torch.float32):
    """
    config.json for GPT2LMHeadModel or GPT2ForSequenceClassification (num_labels 1), as a dict; transformers'
    GPT2Config(**hf_config(...)) takes it as it is.
    """
    cfg = {
        "architectures": ["GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": config.activation,  # the same names: gelu_new (tanh GELU) or gelu (erf)
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if kind == "scalar":
        cfg.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})  # how a config.json says num_labels = 1
    return cfg


# -----------------------------------------------------------------------------
# import: a Hugging Face GPT-2 directory -> GPT (GPT.from_pretrained)


def read_gpt2(path):
    """
    Read a Hugging Face GPT-2 directory: config.json, checked to describe a model GPT computes exactly, and the
    tensors of model.safetensors (or pytorch_model.bin) as HF stores them. Returns (GPTConfig, {name: tensor}, the
    weights file's path). A directory that is no GPT-2 language model, or whose config.json GPT cannot follow
    exactly, is a one-line ValueError naming it and the field.
    """
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(hf).__name__}")
    # a config.json without model_type is read as GPT-2's, as transformers' GPT2Config.from_pretrained reads it
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: model_type {hf['model_type']!r} is not supported (only GPT-2's, 'gpt2')")
    # a hand-edited config.json: each value is checked for its type too, so that a wrong one is one line naming
    # the field, not a TypeError from the comparison that reads it
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"{path}: architectures {json.dumps(architectures)} in config.json is not a list of "
                         f"class names")
    # export_hf.py writes a reward model or critic as GPT2ForSequenceClassification: a score head, no LM head
    if "GPT2ForSequenceClassification" in architectures:
        raise ValueError(f"{path}: architectures {hf['architectures']} is a sequence classifier (a reward model "
                         f"or critic), not a language model (GPT2LMHeadModel)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or abs(eps - 1e-5) > 1e-12:  # not isinstance: JSON's true is no number
        raise ValueError(f"{path}: layer_norm_epsilon {json.dumps(eps)} in config.json is not supported "
                         f"(GPT-2 uses 1e-5)")
    act = hf.get("activation_function", "gelu_new")
    activation = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}.get(
        act if isinstance(act, str) else None)  # a list, say, is no key (unhashable)
    if activation is None:
        raise ValueError(f"{path}: activation_function {act!r} in config.json is not supported "
                         f"(gelu_new, gelu_pytorch_tanh or gelu)")
    n_embd, n_head = hf_size(path, hf, "n_embd"), hf_size(path, hf, "n_head")
    if n_embd % n_head:
        raise ValueError(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{path}: n_inner {hf['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
    # GPT2Config options that change what the model computes and that GPT has no place for: an lm_head of its
    # own (GPT ties it to wte, so the file's would be dropped), and attention scores scaled otherwise than by
    # 1 / sqrt(head size). reorder_and_upcast_attn only changes the precision, so it is accepted.
    for key, gpt2 in (("tie_word_embeddings", True), ("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, gpt2) != gpt2:  # json.dumps: true/false, as config.json writes them
            raise ValueError(f"{path}: {key} {json.dumps(hf[key])} is not supported "
                             f"(GPT-2 uses {json.dumps(gpt2)})")
    config = GPTConfig(block_size=hf_size(path, hf, "n_positions", "n_ctx"),
                       vocab_size=hf_size(path, hf, "vocab_size"), n_layer=hf_size(path, hf, "n_layer"),
                       n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True, activation=activation)
    st_path, bin_path = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st_path):
        weights_path = st_path
        tensors = load_safetensors(st_path)
    elif not os.path.exists(bin_path):  # else the OS's message would name pytorch_model.bin alone
        raise ValueError(f"{path}: no weights (looked for model.safetensors, then pytorch_model.bin)")
    else:
        weights_path = bin_path
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except OSError:  # no such file, or unreadable: the message names it already
            raise
        except Exception as e:  # a file that would run code, or not a checkpoint at all: say so in one line
            raise ValueError(f"{bin_path}: cannot load ({load_error_reason(e)})") from None
    return config, tensors, weights_path


def copy_gpt2_tensors(model, tensors, path, weights_path):
    """
    Copy HF GPT-2 tensors (read_gpt2's) into model, a GPT of read_gpt2's config: keys may carry a `transformer.`
    prefix or not, Conv1D weights (in, out) are transposed to nn.Linear's (out, in), HF's causal-mask buffers and
    its lm_head (tied to wte) are skipped. A tensor GPT has no place for, of the wrong dtype or shape, or one
    missing, is a one-line ValueError naming path (or weights_path, for the dtype) and the tensor.
    """
    sd = model.state_dict()
    loaded = set()
    for k, v in tensors.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # HF's causal-mask buffers, and the lm_head that is tied to wte
        if k.startswith("score."):  # a config.json without architectures: the tensors tell
            raise ValueError(f"{path}: tensor {k!r} is a sequence classifier's head (GPT2ForSequenceClassification:"
                             f" a reward model or critic), not a language model (GPT2LMHeadModel)")
        name = k if k.startswith("transformer.") else "transformer." + k
        if name not in sd:
            raise ValueError(f"{path}: unexpected tensor {k!r}")
        # copy_ would cast integers to floats without a word: weights of a file whose dtype is wrong
        if not v.is_floating_point():
            raise ValueError(f"{weights_path}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, "
                             f"expected a floating-point weight")
        # both shapes as the file stores them (Conv1D's (in, out)); checked before the transpose, which takes 2-d only
        expected = tuple(sd[name].shape)[::-1] if name.endswith(TRANSPOSED) else tuple(sd[name].shape)
        if tuple(v.shape) != expected:
            raise ValueError(f"{path}: {k!r} has shape {tuple(v.shape)}, expected {expected}")
        if name.endswith(TRANSPOSED):
            v = v.t()
        with torch.no_grad():
            sd[name].copy_(v)
        loaded.add(name)
    missing = set(sd) - loaded - {"lm_head.weight"}
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")


def hf_size(path, hf, *keys):
    """
    A size from a Hugging Face config.json (the dict hf): the first of keys it has, a positive integer, or a
    ValueError naming the directory and the field. Example: hf_size(p, {"n_ctx": 1024}, "n_positions", "n_ctx")
    -> 1024 (GPT-2's old files name the number of positions n_ctx only); hf_size(p, {}, "n_layer") -> ValueError.
    """
    for key in keys:
        if hf.get(key) is not None:
            if type(hf[key]) is not int or hf[key] <= 0:  # not isinstance: JSON's true is no size
                raise ValueError(f"{path}: {key} {json.dumps(hf[key])} in config.json is not a positive integer")
            return hf[key]
    raise ValueError(f"{path}: config.json has no {' nor '.join(keys)}")


# -----------------------------------------------------------------------------
# safetensors, read by hand

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path):
    """
    Read a .safetensors file into {name: tensor} (CPU). The format: an 8-byte little-endian header length n,
    n bytes of JSON {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": ..},
    then the raw little-endian tensor bytes, offsets counted from the end of the header.
    Uses the safetensors package when it is installed. A file that is not valid safetensors raises ValueError
    naming it, whichever reader ran (OSError for one that cannot be read at all).
    """
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        try:
            return load_file(path)
        except SafetensorError as e:  # its own class, no ValueError: callers that report bad files would miss it
            raise ValueError(f"{path}: {e}") from None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:  # checked before reading: a corrupt length would ask for that many bytes of memory
            raise ValueError(f"{path}: cannot read it as safetensors (header length {n} > file size {size} - 8)")
        header_bytes = f.read(n)
        data = bytearray(size - 8 - n)
        f.readinto(data)
    try:
        header = json.loads(header_bytes)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
            # the offsets must span the shape's bytes exactly, inside the data: else frombuffer reads the rest of the
            # data (end < begin), or torch.empty hands out uninitialised memory (begin == end, a non-empty shape)
            if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
                raise ValueError(f"tensor {name!r} of shape {info['shape']} and dtype {info['dtype']} ({nbytes} bytes) "
                                 f"has data_offsets {[begin, end]} in {len(data)} bytes of data")
            if nbytes == 0:
                t = torch.empty(info["shape"], dtype=dtype)
            else:
                t = torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin)
            tensors[name] = t.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # truncated, or a bad header
        raise ValueError(f"{path}: cannot read it as safetensors ({type(e).__name__}: {e})") from None
    return tensors

