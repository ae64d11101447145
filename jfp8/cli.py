"""The `jfp8` command line: `jfp8 demo | generate | quantize | eval | memory`.

`demo` lives here; the model commands live with the code they drive and are imported lazily
(the CLI is the one jfp8 module allowed to import `models`, and only inside a command).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, function); each function takes argv (list[str]) and returns an exit code.
_MODEL_COMMANDS = {
    "generate": ("models.generate", "cli"),
    "quantize": ("models.checkpoint", "cli"),
    "eval": ("models.eval", "cli"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("commands: demo, memory, " + ", ".join(_MODEL_COMMANDS))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from jfp8 import demo
        return demo.cli(rest)
    if command == "memory":
        return memory(rest)
    if command in _MODEL_COMMANDS:
        module_name, fn_name = _MODEL_COMMANDS[command]
        return getattr(importlib.import_module(module_name), fn_name)(rest)
    print(f"jfp8: unknown command {command!r}; expected one of demo, memory, "
          + ", ".join(_MODEL_COMMANDS), file=sys.stderr)
    return 2


def memory(argv: list[str]) -> int:
    """`jfp8 memory`: KV-cache capacity of a model shape, BF16 vs FP8 (tokens per GB, and how
    many sequences of a given context fit in a memory budget after the weights)."""
    import argparse

    from jfp8.kv_cache import bytes_per_token
    from models.configs import CONFIGS  # the CLI may import models, lazily

    parser = argparse.ArgumentParser(prog="jfp8 memory", description=memory.__doc__)
    parser.add_argument("--model", default="llama3.1-8b", choices=sorted(CONFIGS))
    parser.add_argument("--context", type=int, default=32768, help="tokens per sequence")
    parser.add_argument("--gb", type=float, default=70.0, help="memory budget for weights + cache, GB")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.model]
    n_params = cfg.num_params()
    print(f"{args.model}: {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads × D {cfg.head_dim}, "
          f"{n_params / 1e9:.2f} B parameters; budget {args.gb:g} GB, context {args.context} tokens\n")
    print("| weights | weight GB | KV cache | KV bytes/token | tokens per GB | sequences that fit | vs BF16 |")
    print("|---|---|---|---|---|---|---|")
    # Embeddings and lm_head stay BF16 under the default recipes; norms are negligible.
    n_high = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    weight_bytes = {"bf16": 2 * n_params, "fp8": (n_params - n_high) + 2 * n_high}
    rows = [("bf16", "bf16", None), ("fp8", "bf16", None),
            ("fp8", "fp8 per-tensor", "per_tensor"), ("fp8", "fp8 per-(token, head)", "per_token_head")]
    base = None
    for w_name, kv_name, scaling in rows:
        per_token = bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                    "bfloat16" if scaling is None else "e4m3", scaling or "per_tensor")
        free = args.gb * 1e9 - weight_bytes[w_name]
        seqs = max(int(free // (per_token * args.context)), 0)
        base = seqs if base is None else base
        ratio = f"{seqs / base:.2f}×" if base else "-"
        print(f"| {w_name} | {weight_bytes[w_name] / 1e9:.1f} | {kv_name} | {per_token} | {int(1e9 // per_token)} | {seqs} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
