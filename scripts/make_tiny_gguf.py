#!/usr/bin/env python3
"""Write a tiny random-weight llama-architecture GGUF model that llama.cpp's `llama-server`
loads in milliseconds, for end-to-end tests (tests/test_llamacpp.py).

    python scripts/make_tiny_gguf.py --out tiny.gguf --name tiny-a --seed 1

The text it generates is gibberish, but it is a real model run by the real server, and it
is built so that what the tests rely on holds:

* Deterministic: the same file and `temperature: 0` give the same text on every server.
* Canonical tokenisation: the vocabulary is SentencePiece-style ("llama") with one token
  per character and no multi-character pieces, no space prefix, and byte-fallback tokens
  for everything else. Any text therefore tokenises one way only, so a prompt ending in an
  assistant prefill (the text delivered so far) is the very token sequence that generated
  it, and a continuation on a twin goes on exactly where the first server stopped.
* It never stops early and never emits a stray byte: the output rows of control and byte
  tokens are zero, so greedy decoding picks one of the character tokens (their logits are
  random; one is positive with overwhelming probability). A few multi-byte characters
  have tokens of their own, so answers are not pure ASCII; one character is one token.
* Varied: the query and key weights are scaled up, so attention is sharp and the text
  does not fall into a short loop (a duplicated or lost piece would be visible).

`--utf8-chains` instead spells three characters (é, 世, 🙂: 2, 3 and 4 bytes) with
byte-fallback tokens only, the way real models write rare characters: their first byte is
an ordinary choice, and each byte then forces the next one through dimensions of the
residual stream reserved for it. The server holds an incomplete character back and sends
it in one chunk when it is complete, so there one chunk is several tokens.

`--pad-vocab N` adds N filler tokens that tokenising never produces and greedy decoding
never picks: loading the vocabulary and computing the output layer then take measurable
time (300,000: about a second to load and 6 ms a token on one core).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("make_tiny_gguf: needs the `gguf` package (pip install -e '.[test]')")

# Token types of the GGUF "llama" (SentencePiece) vocabulary.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
SPACE = "\u2581"  # SentencePiece's visible space
FIRST_BYTE = 3    # token id of <0x00>, after <unk>, <s>, </s>
# Characters with their own token: printable ASCII (space as SPACE) and a few non-ASCII
# ones of 2, 3 and 4 bytes in UTF-8.
CHARS = [SPACE] + [chr(c) for c in range(0x21, 0x7F)] + list("éüñ€→世界🙂")
# Spelled in bytes with --utf8-chains. No byte is followed by two different bytes among
# them, so each byte can force its successor.
CHAINED = "é世🙂"

# Plain-text roles; no special tokens, so the prompt is characters only.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
)


def vocabulary(chars: list[str], pad: int) -> tuple[list[str], list[int]]:
    """(tokens, types): <unk> <s> </s>, the 256 bytes, the characters, the fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    tokens += chars
    types += [NORMAL] * len(chars)
    # Fillers: SentencePiece only merges a pair of symbols whose concatenation is itself a
    # token, and no prefix of these is one, so tokenising never produces them.
    tokens += [f"<unused{i}>" for i in range(pad)]
    types += [NORMAL] * pad
    return tokens, types


def write_model(out: Path, name: str, seed: int, *, width: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, ff: int = 128, ctx: int = 2048,
                pad_vocab: int = 0, qk_scale: float = 4.0, utf8_chains: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    chars = [c for c in CHARS if not (utf8_chains and c in CHAINED)]
    tokens, types = vocabulary(chars, pad_vocab)
    first_char = FIRST_BYTE + 256
    n_vocab = len(tokens)
    head_dim = width // heads
    kv_width = head_dim * kv_heads

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy (rows, cols) is ggml's [cols, rows]: `rows` outputs from `cols` inputs.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    embd = mat(n_vocab, width, 1.0)
    output = mat(n_vocab, width, 1.0)
    output[:first_char] = 0.0                 # never <unk>, <s>, </s> or a byte
    output[first_char + len(chars):] = 0.0    # nor a filler
    blocks = []
    for _ in range(layers):
        blocks.append({
            "attn_q": mat(width, width, qk_scale * width ** -0.5),
            "attn_k": mat(kv_width, width, qk_scale * width ** -0.5),
            "attn_v": mat(kv_width, width, width ** -0.5),
            "attn_output": mat(width, width, width ** -0.5),
            "ffn_gate": mat(ff, width, width ** -0.5),
            "ffn_up": mat(ff, width, width ** -0.5),
            "ffn_down": mat(width, ff, ff ** -0.5),
        })
    if utf8_chains:
        _wire_chains(embd, output, blocks, rng)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{seed}")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(ctx)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    ones = np.ones(width, dtype=np.float32)
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", output)
    for i, block in enumerate(blocks):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        writer.add_tensor(p + "ffn_norm.weight", ones)
        for key, value in block.items():
            writer.add_tensor(p + key + ".weight", value)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)  # atomic: a reader never sees half a file
    return out


def _wire_chains(embd: np.ndarray, output: np.ndarray, blocks: list[dict[str, np.ndarray]],
                 rng: np.random.Generator) -> None:
    """Make each CHAINED character come out as its UTF-8 bytes, in order.

    Every byte that has a successor gets a dimension of its own. No other token's
    embedding and no layer writes there, and layers do not read it, so that dimension is
    large exactly while the previous token is that byte; the successor's output row reads
    only that dimension, and wins by far then and scores 0 (below the best character)
    otherwise. A first byte's output row is an ordinary (slightly favoured) random one.
    """
    spelled = [c.encode() for c in CHAINED]
    reserved: dict[int, int] = {}
    for bs in spelled:
        for b in bs[:-1]:
            assert b not in reserved, "two chained characters share a non-final byte"
            reserved[b] = len(reserved)
    dims = list(reserved.values())
    embd[:, dims] = 0.0
    output[:, dims] = 0.0
    for block in blocks:
        for key in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            block[key][:, dims] = 0.0   # layers do not read the reserved dimensions
        for key in ("attn_output", "ffn_down"):
            block[key][dims, :] = 0.0   # nor write them
    width = embd.shape[1]
    for bs in spelled:
        lead = FIRST_BYTE + bs[0]
        output[lead] = rng.standard_normal(width, dtype=np.float32) * 1.3
        output[lead, dims] = 0.0
        for b, nxt in zip(bs, bs[1:], strict=False):
            tok = FIRST_BYTE + b
            embd[tok] = 0.0
            embd[tok, reserved[b]] = float(width)
            output[FIRST_BYTE + nxt] = 0.0
            output[FIRST_BYTE + nxt, reserved[b]] = 10.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    ap.add_argument("--name", required=True, help="general.name of the model")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ff", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048, help="trained context length")
    ap.add_argument("--pad-vocab", type=int, default=0, metavar="N",
                    help="filler tokens (slower to load and to run)")
    ap.add_argument("--utf8-chains", action="store_true",
                    help=f"spell {CHAINED} with byte tokens (several tokens per character)")
    args = ap.parse_args(argv)
    path = write_model(args.out, args.name, args.seed, width=args.width, layers=args.layers,
                       ff=args.ff, ctx=args.ctx, pad_vocab=args.pad_vocab,
                       utf8_chains=args.utf8_chains)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
