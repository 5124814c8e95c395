"""
The tokenizer: a thin wrapper around a tiktoken.Encoding, a small BPE trainer, and the one chat template that
every stage uses. In the spirit of nanochat's tokenizer.py and minbpe: we train a BPE in Python, write it out
as a .tiktoken file, and run it (encode/decode) with tiktoken's fast Rust implementation.

Three sources of merges (mergeable ranks), all run with GPT-2's split pattern:
    "byte"              256 byte tokens, no merges (works offline, vocab 258 with the specials)
    path/to/x.tiktoken  a BPE trained by train_bpe() below (or any .tiktoken file, e.g. GPT-2's)
    "gpt2"              tiktoken.get_encoding("gpt2") (needs network or tiktoken's cache)

Two special tokens are appended after the ranks: EOS "<|endoftext|>" (id n_ranks, so 50256 for GPT-2) and
PAD "<|pad|>" (id n_ranks + 1). pad != eos. User text is always encoded as ordinary text, so a prompt that
contains the string "<|endoftext|>" is encoded as the bytes "<", "|", "end", ... and never as EOS.

The template (Anthropic HH format), encoded in the pieces shown, with the response mask underneath:
    "\n\nHuman: {prompt}\n\nAssistant:" " {response}" <|endoftext|>
     0 0 0 ...                        0  1 1 1 ...      1

Train a tokenizer from the command line:
    python -m nanorlhf.tokenizer --train corpus.txt --vocab_size 512 --out my.tiktoken
"""

import base64
import heapq
import os
import sys
import time
from collections import Counter, defaultdict

import regex  # tiktoken depends on it; Python's own `re` has no \p{L}
import tiktoken

# GPT-2's split pattern, exactly as tiktoken writes it (possessive quantifiers, same splits as the original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""). Every source uses it:
# a .tiktoken file has no place to store a pattern, so our trainer pre-splits with this one too.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOS = "<|endoftext|>"
PAD = "<|pad|>"
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

# -----------------------------------------------------------------------------
# BPE training

def _merge(ids, a, b, new_id):
    """Replace every (a, b) in ids, left to right, by new_id: _merge([1, 1, 1, 2], 1, 1, 9) -> [9, 1, 2]."""
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(text, vocab_size, pattern=GPT2_PATTERN, verbose=False):
    """
    Train a byte-level BPE on text and return its mergeable ranks {token bytes: rank}, ranks 0..vocab_size-1,
    the 256 single bytes first (rank = byte value), then one token per merge in the order learned.

    The text is split with the regex pattern into chunks (words, numbers, punctuation runs, whitespace) and
    merges never cross a chunk boundary, as in GPT-2. Each distinct chunk is kept once with its count, and
    pair counts are updated incrementally: a merge only revisits the chunks that contain the merged pair.
    Ties between equally frequent pairs go to the smallest (left id, right id), so training is deterministic.

    Worked example (Wikipedia's), one chunk "aaabdaaabac", vocab_size=259:
        pairs: aa 4, ab 2, bd 1, da 1, ba 1, ac 1  -> merge aa   -> 256  ZabdZabac (Z = 256)
        pairs: Za 2, ab 2, ...   tie, (97, 98) < (256, 97) -> ab -> 257  ZYdZYac  (Y = 257)
        pairs: ZY 2, ...                           -> merge ZY   -> 258  "aaab"
    so the ranks are the 256 bytes, then b"aa": 256, b"ab": 257, b"aaab": 258.

    Should a merge ever rebuild the bytes of an existing token, it reuses that token's id rather than add
    a duplicate (a .tiktoken file maps bytes to one rank; tiktoken would merge that pair into it too).
    """
    assert vocab_size >= 256, f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
    t0 = time.time()
    # 1. split into chunks and count each distinct chunk once
    chunk_counts = Counter(regex.findall(pattern, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each distinct chunk as a list of ids
    freqs = list(chunk_counts.values())
    # 2. count adjacent pairs, weighted by chunk frequency, and remember which words hold each pair
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    # max-heap of (-count, a, b); entries go stale when a count changes and are skipped when popped
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {tok: i for i, tok in enumerate(vocab)}
    # 3. merge the most frequent pair until the vocabulary is full (or nothing is left to merge)
    n_merges = 0
    while len(vocab) < vocab_size and heap:
        neg_count, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg_count:
            continue  # stale entry
        new_bytes = vocab[a] + vocab[b]
        new_id = ranks.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            ranks[new_bytes] = new_id
        changed = set()
        for i in where.pop((a, b)):
            w = words[i]
            new_w = _merge(w, a, b, new_id)
            if len(new_w) == len(w):
                continue  # the pair left this word in an earlier merge
            f = freqs[i]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= f
                changed.add(pair)
            for pair in zip(new_w, new_w[1:]):
                pair_counts[pair] += f
                where[pair].add(i)
                changed.add(pair)
            words[i] = new_w
        for pair in changed:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                del pair_counts[pair]
        n_merges += 1
        if verbose and n_merges % 500 == 0:
            print(f"merge {n_merges}: {new_bytes!r} count {-neg_count} vocab {len(vocab)} ({time.time() - t0:.1f}s)")
    return ranks


def save_tiktoken(ranks, path):
    """Write ranks as a .tiktoken file: one line per token, "base64(token bytes) rank", in rank order."""
    with open(path, "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")


def _check_ranks(ranks, where):
    """The ranks must be 0..n-1 and include all 256 single bytes (else tiktoken cannot encode every text)."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{where}: ranks must be exactly 0..{n - 1}, each once")
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise ValueError(f"{where}: {len(missing)} single-byte tokens are missing (e.g. byte {missing[0]})")


def load_tiktoken(path):
    """Read a .tiktoken file into {token bytes: rank}; ValueError naming the file (and line) if it is bad."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: tokenizer file not found")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                tok_b64, rank = line.split()
                tok = base64.b64decode(tok_b64, validate=True)
                rank = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:80]!r}") from None
            if tok in ranks:
                raise ValueError(f"{path}:{lineno}: token {tok!r} appears twice")
            ranks[tok] = rank
    _check_ranks(ranks, path)
    return ranks

# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """
    A tiktoken.Encoding with EOS and PAD appended after the mergeable ranks.

    >>> tok = Tokenizer.byte_level()
    >>> tok.encode("hi<|endoftext|>")[:3], tok.eos_id, tok.pad_id, tok.vocab_size
    ([104, 105, 60], 256, 257, 258)
    """

    def __init__(self, name, mergeable_ranks, pattern=GPT2_PATTERN):
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.eos_id, self.pad_id = n, n + 1
        self.vocab_size = n + 2
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens={EOS: self.eos_id, PAD: self.pad_id})

    # constructors

    @classmethod
    def byte_level(cls):
        return cls("byte", {bytes([i]): i for i in range(256)})

    @classmethod
    def gpt2(cls, path=None):
        """GPT-2's BPE from a .tiktoken file (e.g. shared/data/gpt2.tiktoken), else from tiktoken (network/cache)."""
        if path is not None:
            return cls("gpt2", load_tiktoken(path))
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise ValueError("could not get tiktoken's 'gpt2' encoding (no network and no cache?): "
                             f"{type(e).__name__}: {e}. Pass the path to a gpt2.tiktoken file instead.") from None
        return cls("gpt2", dict(enc._mergeable_ranks), enc._pat_str)

    @classmethod
    def from_tiktoken_file(cls, path):
        """Any .tiktoken file; one with GPT-2's 50256 ranks is named "gpt2", others by their file name."""
        ranks = load_tiktoken(path)
        name = "gpt2" if len(ranks) == 50256 else os.path.splitext(os.path.basename(path))[0]
        return cls(name, ranks)

    @classmethod
    def from_spec(cls, spec):
        """spec: "byte" | "gpt2" | path/to/file.tiktoken"""
        if spec == "byte":
            return cls.byte_level()
        if spec == "gpt2":
            return cls.gpt2()
        if not os.path.isfile(spec):  # a misspelt name, most likely
            raise ValueError(f"expected byte, gpt2 or the path of a .tiktoken file, and there is no file {spec}")
        return cls.from_tiktoken_file(spec)

    # checkpointing: plain python only, so torch.load(weights_only=True) can read it

    def to_dict(self):
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "name": self.name,
            "pattern": self.pattern,
            "ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in by_rank],  # list index = rank
            "special_tokens": {EOS: self.eos_id, PAD: self.pad_id},
        }

    def same_encoding(self, other):
        """
        Whether two tokenizers give every text the same ids: the same merges, split pattern and special ids. The
        name is a label only (a .tiktoken file does not store it: export_hf.py's tokenizer.tiktoken comes back named
        "tokenizer"), so two stages whose tokenizers differ in name alone work together.
        """
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: v for k, v in mine.items() if k != "name"} == {k: v for k, v in theirs.items() if k != "name"}

    @classmethod
    def from_dict(cls, d):
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(d["ranks"])}
        _check_ranks(ranks, "tokenizer in checkpoint")
        tok = cls(d["name"], ranks, d["pattern"])
        assert d["special_tokens"] == {EOS: tok.eos_id, PAD: tok.pad_id}, d["special_tokens"]
        return tok

    # encode / decode

    def encode(self, text):
        """Text -> ids. Special-token strings in text are ordinary text, never EOS/PAD."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Ids -> text. PAD is dropped and EOS decodes to nothing; broken UTF-8 becomes U+FFFD."""
        return self.enc.decode([i for i in ids if i != self.pad_id and i != self.eos_id])

    # the template

    def render_prompt(self, prompt):
        """
        Ids of "\\n\\nHuman: {prompt}\\n\\nAssistant:", encoded in one piece, as a Hugging Face tokenizer encodes
        the text of the exported chat template (export_hf.py). In two pieces, a prompt that ends in whitespace
        would get other ids from GPT-2's BPE: "2\\n" + "\\n\\nAssistant:" -> ..., 198, 198, 198, but
        "2\\n\\n\\nAssistant:" -> ..., 628, 198. It is exactly the prefix that render() and render_messages() produce.
        """
        return self.encode(f"{HUMAN} {prompt}{ASSISTANT}")

    def render(self, prompt, response):
        """
        (ids, response_mask) for one prompt/response pair; the mask is 1 on " {response}" and the EOS.
        With the byte-level tokenizer, render("2+2?", "4") gives
            ids  = bytes of "\\n\\nHuman: 2+2?\\n\\nAssistant:" + [32, 52] + [eos]
            mask = [0] * 25                                     + [1, 1]  + [1]
        """
        prompt_ids = self.render_prompt(prompt)
        response_ids = self.encode(" " + response) + [self.eos_id]
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    def render_messages(self, messages, add_generation_prompt=False):
        """
        (ids, response_mask) for a conversation [{"role": "system"|"user"|"assistant", "content": str}, ...]:
            system    -> "{content}"                            mask 0
            user      -> "\\n\\nHuman: {content}"                 mask 0
            assistant -> "\\n\\nAssistant:" " {content}" <eos>    mask 0, then 1 on " {content}" and the eos
        and with add_generation_prompt a last "\\n\\nAssistant:" (mask 0), the cue for the model to answer.
        The text before each response is encoded in one piece, as a Hugging Face tokenizer encodes the exported chat
        template's text (split only at the EOS), so both give the same ids; a response starts a new piece after
        "Assistant:" in either case (GPT-2's split pattern never joins ":" and " "). So
        render_messages([user p, assistant r]) == render(p, r) and
        render_messages([user p], add_generation_prompt=True)[0] == render_prompt(p).
        """
        ids, mask = [], []
        context = ""  # the text since the last response (mask 0)
        for m in messages:
            role, content = m["role"], m["content"]
            if not isinstance(content, str):
                raise ValueError(f"message content must be a string, got {type(content).__name__}")
            if role == "system":
                context += content
            elif role == "user":
                context += f"{HUMAN} {content}"
            elif role == "assistant":
                context_ids = self.encode(context + ASSISTANT)
                response_ids = self.encode(" " + content) + [self.eos_id]
                ids += context_ids + response_ids
                mask += [0] * len(context_ids) + [1] * len(response_ids)
                context = ""
            else:
                raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
        context_ids = self.encode(context + ASSISTANT if add_generation_prompt else context)
        return ids + context_ids, mask + [0] * len(context_ids)

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"

# -----------------------------------------------------------------------------
# CLI: train a BPE on a text file

def main(argv=None):
    # here, not at the top: utils imports data, which imports this module
    from nanorlhf.utils import FlagParser, write_atomic

    parser = FlagParser(description="Train a byte-level BPE and save it as a .tiktoken file.")
    parser.add_argument("--train", required=True, help="UTF-8 text file to train on")
    parser.add_argument("--vocab_size", type=int, default=512, help="number of ranks (256 bytes + merges), specials excluded")
    parser.add_argument("--out", required=True, help="output .tiktoken file")
    args = parser.parse_args(argv)
    if args.vocab_size < 256:
        parser.error(f"--vocab_size must be at least 256, got {args.vocab_size}")
    # checked before training, which may take minutes: a missing folder would otherwise lose them
    out_dir = os.path.dirname(os.path.abspath(args.out))
    # abspath drops a trailing slash, so "" and "name/" would pass the folder check below and fail only at the write
    if not args.out or args.out.endswith(("/", os.sep)):
        parser.error(f"--out {args.out!r}: name the .tiktoken file to write")
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory: name the .tiktoken file to write")
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        parser.error(f"--out {args.out}: the folder {out_dir} does not exist or is not writable")
    # the merges would replace the text they were trained on (samefile: also through a link or another spelling)
    if os.path.exists(args.out) and os.path.exists(args.train):
        same = os.path.samefile(args.out, args.train)
    else:
        same = os.path.realpath(args.out) == os.path.realpath(args.train)
    if same:
        parser.error(f"--out {args.out} is the --train file {args.train}: name another file to write the merges to")
    try:
        with open(args.train, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read {args.train}: {e}")
    if not text:
        parser.error(f"--train {args.train}: the file is empty, nothing to train on")
    t0 = time.time()
    ranks = train_bpe(text, args.vocab_size, verbose=True)
    dt = time.time() - t0
    write_atomic(args.out, lambda tmp: save_tiktoken(ranks, tmp))
    tok = Tokenizer.from_tiktoken_file(args.out)
    n_bytes, n_tokens = len(text.encode("utf-8")), len(tok.encode(text))
    print(f"trained {len(ranks) - 256} merges on {n_bytes / 1e6:.2f} MB in {dt:.1f}s -> {args.out}")
    if len(ranks) < args.vocab_size:  # every pair of every chunk was merged before the vocabulary was full
        print(f"note: {args.train} gave only {len(ranks) - 256} merges of the {args.vocab_size - 256} asked for: "
              f"{args.out} has a vocabulary of {len(ranks)}, not --vocab_size {args.vocab_size}", file=sys.stderr)
    print(f"compression on the training text: {n_bytes / max(n_tokens, 1):.2f} bytes/token ({n_tokens} tokens)")


if __name__ == "__main__":
    main()
