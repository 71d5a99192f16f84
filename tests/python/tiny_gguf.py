#!/usr/bin/env python3
"""Writes a tiny llama-architecture GGUF model for the llama.cpp tests.

    python3 tiny_gguf.py OUT.gguf

No machine here can download model weights, so the tests make one: random
weights (a fixed seed, so every run writes the same file), a SentencePiece
("llama") vocabulary of a few hundred tokens with all 256 byte-fallback
tokens (any UTF-8 text tokenizes: emoji, digits, accents), ChatML control
tokens and a ChatML chat template in `tokenizer.chat_template`.

The weights are random except for one thing: the model never ends a
completion on its own. Hidden dimension 0 of the residual stream is a large
constant (every embedding row has it; no attention or FFN output writes it),
the output norm keeps only that dimension, and the output projection gives
it a positive weight for word pieces only. So every step samples a word
piece and never an end-of-generation, control or lone byte token: a
request runs to its `max_tokens`, and the tests can assert that a clamped
request stops exactly where the agent said.

The file is about 640 KB and loads in a few milliseconds.
"""

import sys

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the of and to in is it you that he was for on are as with his they at be "
    "this have from or one had by word but not what all were we when your can "
    "said there use an each which she do how their if will up other about out "
    "many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part hello "
    "hi world tell me story friend say there once upon token budget agent"
).split()


def vocabulary():
    """(pieces, scores, types) of the SentencePiece vocabulary."""
    pieces, scores, types = [], [], []

    def add(piece, score, kind):
        pieces.append(piece)
        scores.append(score)
        types.append(kind)

    add("<unk>", 0.0, gguf.TokenType.UNKNOWN)
    add("<s>", 0.0, gguf.TokenType.CONTROL)
    add("</s>", 0.0, gguf.TokenType.CONTROL)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, gguf.TokenType.BYTE)
    add("<|im_start|>", 0.0, gguf.TokenType.CONTROL)
    add("<|im_end|>", 0.0, gguf.TokenType.CONTROL)
    # Merged pieces score higher the longer they are, as in a trained model.
    add("\u2581", -1.0, gguf.TokenType.NORMAL)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:":
        add(ch, -2.0, gguf.TokenType.NORMAL)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        add("\u2581" + ch, -1.5, gguf.TokenType.NORMAL)
    # Every prefix of a word too: SentencePiece merges two adjacent pieces
    # only into a piece of the vocabulary, so "\u2581the" is reached
    # through "\u2581t" and "\u2581th".
    known = set(pieces)
    for word in WORDS:
        for end in range(2, len(word) + 1):
            piece = "\u2581" + word[:end]
            if piece not in known:
                known.add(piece)
                add(piece, float(end), gguf.TokenType.NORMAL)
    return pieces, scores, types


def write(path):
    rng = np.random.default_rng(20240611)
    pieces, scores, types = vocabulary()
    n_vocab = len(pieces)
    head_dim = N_EMBD // N_HEAD

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("allot-tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Embeddings are one mean-pooled vector per input, as OpenAI's are
    # (without it llama.cpp returns a vector per token).
    writer.add_pooling_type(gguf.PoolingType.MEAN)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHATML_TEMPLATE)

    def random(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Dimension 0 of the residual stream: a constant no layer writes.
    embeddings = random(n_vocab, N_EMBD, scale=0.1)
    embeddings[:, 0] = 50.0
    writer.add_tensor("token_embd.weight", embeddings)
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", random(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", random(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", random(N_EMBD, N_EMBD))
        attn_output = random(N_EMBD, N_EMBD)
        attn_output[0, :] = 0.0
        writer.add_tensor(f"{prefix}.attn_output.weight", attn_output)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", random(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", random(N_FF, N_EMBD))
        ffn_down = random(N_EMBD, N_FF)
        ffn_down[0, :] = 0.0
        writer.add_tensor(f"{prefix}.ffn_down.weight", ffn_down)
    # The output norm keeps dimension 0 only (about +8 after the norm).
    output_norm = np.zeros(N_EMBD, dtype=np.float32)
    output_norm[0] = 1.0
    writer.add_tensor("output_norm.weight", output_norm)
    # Word pieces get logits of about +8..+16; everything else -16: never
    # sampled.
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    for token, kind in enumerate(types):
        normal = kind == gguf.TokenType.NORMAL
        output[token, 0] = 1.0 + rng.random() if normal else -2.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_gguf.py OUT.gguf")
    write(sys.argv[1])
