"""
Export a nanorlhf checkpoint as a Hugging Face transformers directory that loads with no conversion step, written
without importing transformers (or the safetensors package) here:

    python export_hf.py --ckpt out/ppo --out out/hf/ppo                 # a policy      -> GPT2LMHeadModel
    python export_hf.py --ckpt out/rm --out out/hf/rm                   # a reward model -> GPT2ForSequenceClassification
    python export_hf.py --ckpt out/ppo/critic.pt --out out/hf/critic    # PPO's critic, likewise

and then, wherever transformers is installed:

    from transformers import AutoTokenizer, GPT2LMHeadModel
    model, tok = GPT2LMHeadModel.from_pretrained("out/hf/ppo"), AutoTokenizer.from_pretrained("out/hf/ppo")

The directory:
    config.json              GPT-2's config (model_type gpt2); a reward model has num_labels 1 (id2label) and
                             pad_token_id set, which GPT2ForSequenceClassification needs to find each row's last token
    model.safetensors        the weights in the safetensors format (8-byte header length, JSON header, raw bytes)
    generation_config.json   EOS and PAD ids (language models)
    vocab.json, merges.txt,  GPT-2's tokenizer files for the checkpoint's own tokenizer: byte-level, a BPE trained by
    tokenizer_config.json,   nanorlhf.tokenizer or GPT-2's are all byte-level BPEs split by GPT-2's regex, so
    special_tokens_map.json  GPT2Tokenizer runs each of them as tiktoken does; the chat template is nanorlhf's
    tokenizer.tiktoken       the same merges for tiktoken (how to load it: README.md in the directory)
    README.md                how to load the model, the tokenizer and the prompt template

Things that differ from the checkpoint, on purpose (the conversion is nanorlhf/hf.py, which bench.py shares):
- HF's GPT-2 always has biases: a model trained with bias=False gets zero biases (the same function).
- GPT2ForSequenceClassification's `score` head has no bias, but the reward model's head has one (the InstructGPT
  normalisation moves it). The bias b is folded into the final LayerNorm's bias, whose output feeds only that
  head there: beta' = beta + b * w / (w . w), so that w . (h + b w / (w . w)) = w . h + b (float64, then rounded).
- The vocabulary is the checkpoint's (GPT-2's 50257 + the pad token = 50258 for a GPT-2 start); tied embeddings.
"""

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch

from nanorlhf import utils
from nanorlhf.hf import hf_config, hf_state_dict
from nanorlhf.tokenizer import EOS, GPT2_PATTERN, PAD, save_tiktoken
from nanorlhf.utils import check, flag


@dataclass
class Args:
    ckpt: str = flag("out/ppo", "checkpoint to export: a directory (its ckpt.pt) or a .pt file (e.g. out/ppo/critic.pt)")
    out: str = flag("out/hf", "directory to write (must not exist or be empty, unless --overwrite); an existing "
                              "empty one is written into; a symlink exports into the directory it points to")
    dtype: str = flag("float32", "dtype of the exported weights: float32 | bfloat16 | float16")
    overwrite: bool = flag(False, "replace --out if it holds an earlier export (the old directory goes only once "
                                  "the new one is complete; the current directory or a mount point has its files "
                                  "replaced in place); never a directory holding any other file")


# -----------------------------------------------------------------------------
# weights: the conversion (nanorlhf/hf.py), then the file format


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_safetensors(tensors, path, metadata=None):
    """
    Write {name: tensor} as a .safetensors file: 8 bytes little-endian header length n, n bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} (padded with spaces to a
    multiple of 8), then the tensors' raw little-endian bytes back to back, offsets counted from the header's end.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}  # transformers checks format == "pt"
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:  # one tensor at a time: a large model is never held twice in memory as bytes
            f.write(tensors[name].cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's files (vocab.json + merges.txt) for any byte-level BPE with GPT-2's split pattern


def bytes_to_unicode():
    """
    GPT-2's reversible map from the 256 byte values to printable characters, the alphabet of vocab.json and
    merges.txt: the printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and the other 68
    bytes, in increasing order, for chr(256), chr(257), ... So b" " (32) -> 'Ġ' (chr(288)), b"\\n" (10) -> 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def vocab_and_merges(ranks):
    """
    tiktoken's mergeable ranks {token bytes: rank} -> (vocab {text: id}, merges [(left, right)] in priority order),
    texts in bytes_to_unicode's alphabet. tiktoken merges the adjacent pair whose concatenation has the lowest rank;
    a merges list says which pairs merge, in order. So every split of a token into two tokens of the vocabulary is
    listed, at the token's rank: the lowest listed pair is then the one tiktoken would merge.
    Example: ranks {a: 97, b: 98, c: 99, ..., "ab": 256, "abc": 257, "bc": 258} -> merges [a b], [a bc], [ab c],
    [b c]: "abc" comes from "a" + "bc" and from "ab" + "c" (the splits of one token ordered by their parts' ranks).
    """
    byte_map = bytes_to_unicode()
    text = lambda t: "".join(byte_map[b] for b in t)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(text(a), text(b)) for a, b in splits]
    return vocab, merges


# The chat template of Tokenizer.render_messages, in the Jinja that transformers' apply_chat_template runs
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + m['content'] + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def write_tokenizer(tok, out, block_size):
    """The .tiktoken file always; GPT-2's tokenizer files when the split pattern is GPT-2's. -> list of files."""
    save_tiktoken(tok.mergeable_ranks, os.path.join(out, "tokenizer.tiktoken"))
    files = ["tokenizer.tiktoken"]
    if tok.pattern != GPT2_PATTERN:
        return files
    vocab, merges = vocab_and_merges(tok.mergeable_ranks)
    vocab.update({EOS: tok.eos_id, PAD: tok.pad_id})
    special = {"content": None, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
               "special": True}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(tok.eos_id): {**special, "content": EOS}, str(tok.pad_id): {**special, "content": PAD}},
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}, f, indent=2)
    return files + ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


# README.md's first line starts so: --overwrite recognises an earlier export by it
README_TITLE = "# nanorlhf export"
# every file export() may write; --overwrite replaces a directory that holds no other
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.tiktoken", "vocab.json",
                "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md")
# the temporary directory of an export into an existing directory (writes_in_place): inside it, so on its file
# system, as INNER_TMP.tmp<pid>
INNER_TMP = ".export_hf"


def readme(ckpt, kind, tok, hf_tokenizer):
    """The note in the exported directory: what it is and how to load each part."""
    cls = "GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification"
    lines = [
        f"{README_TITLE}: stage {ckpt['stage']}, step {ckpt['step']}",
        "",
        f"A {cls} ({'language model' if kind == 'gpt' else 'scalar model: reward model or critic, num_labels 1'}), "
        f"tokenizer {tok.name!r} ({tok.vocab_size} ids: EOS {tok.eos_id} = {EOS}, PAD {tok.pad_id} = {PAD}).",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {cls}",
        f"model = {cls}.from_pretrained(DIR)",
    ]
    if hf_tokenizer:
        lines += ["tok = AutoTokenizer.from_pretrained(DIR)   # GPT2Tokenizer over vocab.json + merges.txt"]
    lines += [
        "```",
        "",
        "The same merges for tiktoken (what nanorlhf itself runs), with GPT-2's split pattern:",
        "",
        "```python",
        "import tiktoken",
        "from tiktoken.load import load_tiktoken_bpe",
        f"enc = tiktoken.Encoding({tok.name!r}, pat_str={tok.pattern!r},",
        "                        mergeable_ranks=load_tiktoken_bpe('DIR/tokenizer.tiktoken'),",
        f"                        special_tokens={{{EOS!r}: {tok.eos_id}, {PAD!r}: {tok.pad_id}}})",
        "```",
        "",
        "The prompt template the model was trained on (tokenizer_config.json's chat_template writes it):",
        "`\"\\n\\nHuman: {prompt}\\n\\nAssistant:\"`, the response follows after a space and ends with EOS. "
        "Its text encoded whole, as `apply_chat_template` does, gives the ids the model was trained on.",
        "nanorlhf encodes text typed by a user as plain text, also `<|endoftext|>`; Hugging Face tokenizers turn that "
        "string into the EOS id unless told otherwise (`split_special_tokens=True`).",
        "",
        "Batches: pad on the right, or on the left for generation (`tok.padding_side = 'left'`; GPT-2's generate "
        "derives position ids from the attention mask, as nanorlhf does).",
    ]
    if kind == "scalar":
        lines += ["", "The score of a (prompt, response) is the logit at the last non-pad token (the EOS): "
                      "`model(ids, attention_mask=mask).logits[:, 0]`. The reward model's head bias is folded into "
                      "`transformer.ln_f.bias`, so the scores equal nanorlhf's."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def check_out_is_not_a_run(out, ckpt_path):
    """
    --overwrite replaces --out as a whole, so --out may never be a directory that training wrote: the checkpoint's
    own directory or one above it (out/ppo, out), nor any directory that holds a ckpt.pt. Paths are compared
    resolved (symlinks, "..") so that no spelling of the same directory gets through.
    """
    if not os.path.exists(out):
        return
    real_out = os.path.realpath(out)
    ckpt_dir = os.path.realpath(ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(os.path.abspath(ckpt_path)))
    check(os.path.commonpath([real_out, ckpt_dir]) != real_out,
          f"--out {out} is or contains the directory of --ckpt {ckpt_path}: replacing it would delete the checkpoint "
          f"(choose another --out; --overwrite never replaces it)")
    for root, _, files in os.walk(real_out):
        check(utils.CKPT not in files, f"--out {out} holds a nanorlhf checkpoint ({os.path.join(root, utils.CKPT)}): "
                                       f"refusing to replace it, even with --overwrite")


def check_out_is_an_export(out, path):
    """
    --overwrite replaces --out as a whole, so it replaces only what export() itself wrote: an empty directory, or one
    holding nothing but EXPORT_FILES, its README.md starting with README_TITLE. A name check alone would pass a
    model directory that transformers' save_pretrained wrote (config.json, model.safetensors, vocab.json, ...).
    out is the flag as given, path the directory it resolves to.
    """
    names = sorted(os.listdir(path))
    if not names:
        return
    for name in names:
        check(name in EXPORT_FILES and os.path.isfile(os.path.join(path, name)),
              f"--out {out} holds {os.path.join(out, name)}, which export_hf.py does not write: refusing to replace "
              f"it, even with --overwrite (choose another --out, or remove that directory yourself)")
    first = ""
    if "README.md" in names:
        with open(os.path.join(path, "README.md"), encoding="utf-8", errors="replace") as f:
            first = f.readline()
    check(first.startswith(README_TITLE),
          f"--out {out}: {os.path.join(out, 'README.md')} is missing or does not start with {README_TITLE!r}, so "
          f"this is no complete export of export_hf.py (one killed midway writes no README.md): refusing to replace "
          f"it, even with --overwrite (choose another --out, or remove that directory yourself)")


def remove_stale(path):
    """
    Remove what an export to path killed midway left (its process is gone; utils.remove_stale_tmps): path.tmp<pid>,
    the new directory, written in part or whole but never renamed, and path.old<pid>, the earlier export that it was
    replacing. A kill between its two renames left no path at all: the earlier export is then put back, with a note,
    since nothing took its place. An export into an existing directory (move_into) has its temporary directory
    inside it: path/.export_hf.tmp<pid>.
    """
    folder, base = os.path.split(path)
    if not os.path.isdir(folder):
        return
    if os.path.isdir(path):
        utils.remove_stale_tmps(os.path.join(path, INNER_TMP))
    if not os.path.lexists(path):
        olds = [n for n in os.listdir(folder) if re.fullmatch(re.escape(base) + r"\.old\d+", n)
                and not utils.pid_alive(int(n.rsplit(".old", 1)[1]))]
        if olds:
            old = max((os.path.join(folder, n) for n in olds), key=os.path.getmtime)
            os.replace(old, path)
            print(f"note: put back {path} from {old}, where an export killed while replacing it had left it")
    utils.remove_stale_tmps(path)
    utils.remove_stale_tmps(path, "old")


def writes_in_place(path):
    """
    Whether the export goes into the existing directory path itself, file by file (move_into), rather than taking
    its place by a rename: an empty directory (its inode, mode and owner stay), the current directory (renaming it
    would leave the shell that runs us in a deleted directory) and a mount point (it cannot be renamed).
    """
    return os.path.isdir(path) and (not os.listdir(path) or os.path.samefile(path, os.curdir) or os.path.ismount(path))


def move_into(tmp, path, files):
    """
    Move the finished export's files from tmp into the existing directory path, then remove the files of an earlier
    export there that this one does not write (a policy's generation_config.json under a critic's export). README.md
    is the earlier one's to go first and the new one's to come last: killed midway, path holds no README.md, which
    the next export refuses to take for a complete export (check_out_is_an_export).
    """
    if os.path.exists(os.path.join(path, "README.md")):
        os.remove(os.path.join(path, "README.md"))
    for name in files:
        if name != "README.md":
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    for name in set(os.listdir(path)) & set(EXPORT_FILES) - set(files):
        os.remove(os.path.join(path, name))
    os.replace(os.path.join(tmp, "README.md"), os.path.join(path, "README.md"))


def export(ckpt_path, out, dtype="float32", overwrite=False):
    """
    Write the HF directory for the checkpoint at ckpt_path into out: a temporary directory, then renamed to out, or
    its files moved into out where out stays the directory it is (writes_in_place).
    A symlink --out is followed: the export goes into the directory it points to (created if it does not exist
    yet), which every check below is about, and the link stays as it was.
    """
    check(dtype in ("float32", "bfloat16", "float16"), f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    # an empty path would be the current directory for --out, and an OS message about '' for --ckpt
    check(ckpt_path, "--ckpt is empty: name a checkpoint directory or .pt file")
    check(out, "--out is empty: name the directory to write (--out . for the current directory)")
    # no trailing "/", "." becomes a name that can be renamed, and a symlink becomes its target: renaming the link
    # itself would replace it, not the directory the user meant
    path = os.path.realpath(out)
    check(not os.path.islink(path), f"--out {out} is a symlink that resolves to no path (a loop at {path})")
    remove_stale(path)
    check_out_is_not_a_run(out, ckpt_path)
    if os.path.isdir(path):  # before the hint to pass --overwrite, which would not replace this one either
        check_out_is_an_export(out, path)
    check(not os.path.exists(path) or os.path.isdir(path),
          f"--out {out} is a file, not a directory: choose another --out (--overwrite replaces only an earlier export)")
    check(not os.path.exists(path) or overwrite or not os.listdir(path),
          f"--out {out} exists and is not an empty directory (pass --overwrite to replace it)")
    ckpt_file, ckpt = utils.load_model_checkpoint(ckpt_path, flag="--ckpt")  # a train_state.pt, say, is one line
    kind = ckpt["model_kind"]
    check(kind in ("gpt", "scalar"), f"{ckpt_file}: unknown model_kind {kind!r}")
    config, tok = utils.model_spec(ckpt_file, ckpt)
    with utils.naming("--ckpt"):
        utils.check_weights(ckpt_file, ckpt["model"])  # hf_state_dict would cast an int8 tensor without a word
    torch_dtype = getattr(torch, dtype)
    tensors = hf_state_dict(ckpt["model"], config, kind, torch_dtype)

    in_place = writes_in_place(path)
    tmp = os.path.join(path, f"{INNER_TMP}.tmp{os.getpid()}") if in_place else f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
    except OSError as e:  # a parent that is a file, or a place no directory can go (/proc): name --out, not tmp
        raise utils.UserError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from None
    try:
        with utils.writing(out):  # a full disk is one line naming --out, not only the OS's reason
            save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config(config, kind, tok.eos_id, tok.pad_id, torch_dtype), f, indent=2)
            files = ["config.json", "model.safetensors"]
            if kind == "gpt":
                with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                    json.dump({"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, f,
                              indent=2)
                files.append("generation_config.json")
            tok_files = write_tokenizer(tok, tmp, config.block_size)
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(readme(ckpt, kind, tok, "vocab.json" in tok_files))
        files += tok_files + ["README.md"]
        # the new directory is complete: only now does it take the place of an old one
        try:
            if in_place:
                move_into(tmp, path, files)
            elif os.path.exists(path):
                shutil.copymode(path, tmp)
                old = f"{path}.old{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except OSError as e:  # name --out, not the temporary or old directory the OS names
            raise utils.UserError(f"--out {out}: cannot put the export in place ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return kind, files


def main(argv=None):
    args = utils.parse_flags(Args, argv, description=__doc__)
    utils.one_process()
    kind, files = export(args.ckpt, args.out, args.dtype, args.overwrite)
    cls = "GPT2LMHeadModel" if kind == "gpt" else "GPT2ForSequenceClassification"
    print(f"wrote {args.out}: {cls} ({args.dtype}); {', '.join(files)}")


if __name__ == "__main__":
    utils.run(main)
