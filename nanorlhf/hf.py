"""
Our models as Hugging Face GPT-2 tensors, in pure torch (transformers is never imported here): the state dict and
config.json of GPT2LMHeadModel for a GPT, of GPT2ForSequenceClassification (num_labels 1) for a ScalarGPT.
export_hf.py writes them to disk; bench.py loads them into transformers' classes to time its peers on our weights.

The differences, on purpose:
- HF's GPT-2 always has biases: a model built with bias=False gets zero biases (the same function).
- HF's GPT-2 uses Conv1D layers, which store the transpose of nn.Linear's weight.
- GPT2ForSequenceClassification's `score` head has no bias, so a ScalarGPT's head bias is folded into the final
  LayerNorm's bias (fold_head_bias), whose output feeds only that head there.
"""

import torch

from nanorlhf.utils import check

# HF's GPT-2 uses Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
