"""Generation: batched ragged prefill, then the whole decode loop in one `jax.jit`.

    from models import llama, generate
    model, params = llama.load("Llama-3.2-1B/", quantize="block128")
    out = generate.generate(model, params, [[128000, 9906], [128000, 40, 1093, 433]],
                            max_new_tokens=64, kv_dtype="fp8",
                            sampling=generate.Sampling(temperature=0.7, top_p=0.9),
                            key=jax.random.PRNGKey(0), stop_tokens=(128009,))
    for chunk in generate.stream(model, params, prompts, chunk_size=8): ...   # (B, <=8) arrays

How it runs (a `Decoder` holds the compiled pieces for one batch size / cache length):
  * prefill (one jit per padded prompt length): prompts right-padded (left-padded input is
    shifted), causal attention over each prompt, K/V written into a `jfp8.KVCache` (FP8 E4M3 by
    default), logits taken at each sequence's own last token, the first token sampled;
  * decode (one jit, traced once per Decoder; a retrace raises): a `lax.while_loop`
    over steps, one token per sequence per step, the cache and all loop state donated so K/V are
    written in place; it stops when every sequence hit a stop token or its own token limit, or at
    the step bound passed as a traced scalar, so streaming in chunks re-enters the same executable.
Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus), with an explicit PRNG key.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Sampling", "sample", "DecodeState", "Decoder", "generate", "stream", "cli"]

MAX_STOP_TOKENS = 8      # stop-token slots (padded with -1) so any stop list shares one executable
PROMPT_BUCKET = 16       # prompts are padded to a multiple of this (bounds prefill recompiles)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits.

    Attributes:
      temperature: 0 for greedy (argmax); else logits / temperature are sampled.
      top_k: keep only the k largest logits (0: all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Pick one token per row. logits: (B, V) f32 -> (B,) int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k == 0 and sampling.top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    k = sampling.top_k if sampling.top_k else logits.shape[-1]
    vals, idx = lax.top_k(logits, min(k, logits.shape[-1]))           # sorted, descending
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                     # mass above this token
        vals = jnp.where(before < sampling.top_p, vals, -jnp.inf)       # the top token always stays
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries (a pytree, donated into each call).

    Attributes:
      cache: jfp8.KVCache, lengths = tokens committed per sequence.
      tokens: (B, N) int32 generated tokens (pad_id past num_generated).
      num_generated: (B,) int32 tokens generated so far per sequence.
      last: (B,) int32 the token the next step feeds in.
      done: (B,) bool finished (stop token or token limit).
      step: () int32 decode steps taken (the prefill's token counts as step 1).
      key: PRNG key for sampling.
    """
    cache: object
    tokens: jax.Array
    num_generated: jax.Array
    last: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array


def _kv_dtype(kv_dtype):
    import jfp8
    if kv_dtype in ("fp8", "e4m3", jfp8.E4M3):
        return jfp8.E4M3
    if kv_dtype in ("e5m2", jfp8.E5M2):
        return jfp8.E5M2
    if kv_dtype in ("bf16", "bfloat16") or kv_dtype is jnp.bfloat16:
        return jnp.bfloat16
    raise ValueError(f"kv_dtype: expected 'fp8', 'e5m2' or 'bf16', got {kv_dtype!r}")


class Decoder:
    """Compiled prefill + decode for one model, batch size, cache length and sampling rule.

    Args:
      model: models.llama.Llama.
      batch: B sequences decoded together.
      max_len: cache length S_max (longest prompt + tokens to generate).
      max_new_tokens: N, size of the generated-token buffer.
      kv_dtype: "fp8" (E4M3, default), "e5m2" or "bf16".
      kv_scaling: "per_token_head" (default) or "per_tensor" for FP8 caches.
      sampling: Sampling rule (static: another rule compiles another Decoder).
      pad_id: value written past each sequence's end in `tokens`.
    The decode executable is traced once per Decoder: a second trace (a shape or dtype drifting
    between calls) raises RuntimeError instead of silently recompiling (`decode_traces` counts;
    tests also wrap `_decode_impl` in `chex.assert_max_traces(n=1)`).
    """

    def __init__(self, model, *, batch: int, max_len: int, max_new_tokens: int, kv_dtype="fp8",
                 kv_scaling: str = "per_token_head", sampling: Sampling = Sampling(), pad_id: int = 0):
        if model.cfg.sliding_window is not None and max_len > model.cfg.sliding_window:
            raise ValueError(f"max_len: {max_len} exceeds the model's sliding_window "
                             f"{model.cfg.sliding_window}, which this decoder does not implement")
        for name, v in (("batch", batch), ("max_len", max_len), ("max_new_tokens", max_new_tokens)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.model, self.batch, self.max_len, self.max_new_tokens = model, int(batch), int(max_len), int(max_new_tokens)
        self.kv_dtype, self.kv_scaling, self.sampling, self.pad_id = _kv_dtype(kv_dtype), kv_scaling, sampling, pad_id
        self.prefill_fn = jax.jit(self._prefill_impl, donate_argnums=(1,))
        self.decode_traces = 0
        self.decode_fn = jax.jit(self._decode_counted, donate_argnums=(1,))

    # -- pieces --------------------------------------------------------------------------------
    def init_cache(self):
        from jfp8.kv_cache import KVCache
        c = self.model.cfg
        return KVCache.init(c.num_layers, self.batch, self.max_len, c.num_kv_heads, c.head_dim,
                            dtype=self.kv_dtype, scaling=self.kv_scaling)

    def _prefill_impl(self, params, cache, tokens, lengths, key, stop_tokens, max_new):
        from jfp8 import kv_cache
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) + cache.lengths[:, None]
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache, lengths,
                                         "prefill", last_only=True)
        cache = kv_cache.advance(cache, lengths)
        key, sub = jax.random.split(key)
        first = sample(logits, sub, self.sampling)
        buf = jnp.full((B, self.max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, stop_tokens) | (max_new <= 1)
        state = DecodeState(cache=cache, tokens=buf, num_generated=jnp.ones((B,), jnp.int32),
                            last=first, done=done, step=jnp.ones((), jnp.int32), key=key)
        return state, logits

    def _decode_counted(self, *args):
        self.decode_traces += 1
        if self.decode_traces > 1:
            raise RuntimeError("decode loop retraced: its inputs changed shape or dtype between calls "
                               "(one Decoder serves one batch size / cache length)")
        return self._decode_impl(*args)

    def _decode_impl(self, params, state: DecodeState, stop_tokens, max_new, until):
        from jfp8 import kv_cache
        B, N = state.tokens.shape

        def cond(s):
            return (s.step < until) & ~jnp.all(s.done)

        def body(s):
            positions = s.cache.lengths[:, None]
            logits, cache = self.model.apply({"params": params}, s.last[:, None], positions, s.cache,
                                             None, "decode", last_only=True)
            live = ~s.done
            cache = kv_cache.advance(cache, live.astype(jnp.int32))
            key, sub = jax.random.split(s.key)
            nxt = jnp.where(live, sample(logits, sub, self.sampling), self.pad_id)
            slot = jnp.where(live, s.num_generated, N)                    # N: dropped
            tokens = s.tokens.at[jnp.arange(B), slot].set(nxt, mode="drop")
            num = s.num_generated + live.astype(jnp.int32)
            done = s.done | (live & jnp.isin(nxt, stop_tokens)) | (num >= max_new)
            return DecodeState(cache=cache, tokens=tokens, num_generated=num,
                               last=jnp.where(live, nxt, s.last), done=done, step=s.step + 1, key=key)

        return lax.while_loop(cond, body, state)

    # -- host-side helpers -----------------------------------------------------------------------
    def pack_prompts(self, prompts, lengths=None, padding: str = "right"):
        """Ragged prompts -> right-padded (B, T_pad) int32 + lengths (B,) int32.

        prompts: list of token lists, or a (B, T) array; with an array, `lengths` gives the true
        lengths (default all T) and `padding` says where the pad tokens are ("left" or "right").
        """
        if padding not in ("left", "right"):
            raise ValueError(f"padding: expected 'left' or 'right', got {padding!r}")
        if isinstance(prompts, (list, tuple)) and (len(prompts) == 0 or not np.isscalar(prompts[0])):
            rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
            if lengths is not None:
                raise ValueError("lengths: give lengths only with a padded (B, T) prompt array")
        else:
            arr = np.asarray(prompts)
            if arr.ndim != 2:
                raise ValueError(f"prompts: expected a list of token lists or a (B, T) array, got shape {arr.shape}")
            lens = np.full(arr.shape[0], arr.shape[1]) if lengths is None else np.asarray(lengths)
            if lens.shape != (arr.shape[0],) or (lens > arr.shape[1]).any():
                raise ValueError(f"lengths: expected ({arr.shape[0]},) values <= {arr.shape[1]}, got {lens}")
            rows = [arr[b, arr.shape[1] - n:] if padding == "left" else arr[b, :n] for b, n in enumerate(lens)]
        if len(rows) != self.batch:
            raise ValueError(f"prompts: expected {self.batch} sequences (the Decoder's batch), got {len(rows)}")
        lens = np.array([len(r) for r in rows], np.int32)
        if (lens < 1).any():
            raise ValueError(f"prompts: every prompt needs at least one token, got lengths {lens.tolist()}")
        V = self.model.cfg.vocab_size
        for b, r in enumerate(rows):
            if r.size and (r.min() < 0 or r.max() >= V):
                raise ValueError(f"prompts[{b}]: token ids must be in [0, {V}), got min {r.min()} max {r.max()}")
        T = int(-(-lens.max() // PROMPT_BUCKET) * PROMPT_BUCKET)
        T = min(T, self.max_len)
        if lens.max() > self.max_len:
            raise ValueError(f"prompts: longest prompt {lens.max()} exceeds max_len={self.max_len}")
        out = np.zeros((self.batch, T), np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out, lens

    def _stop_array(self, stop_tokens):
        stops = list(stop_tokens or ())
        if len(stops) > MAX_STOP_TOKENS:
            raise ValueError(f"stop_tokens: at most {MAX_STOP_TOKENS}, got {len(stops)}")
        return jnp.asarray(stops + [-1] * (MAX_STOP_TOKENS - len(stops)), jnp.int32)

    def _max_new_array(self, max_new_tokens, lens):
        m = np.broadcast_to(np.asarray(self.max_new_tokens if max_new_tokens is None else max_new_tokens),
                            (self.batch,)).astype(np.int32)
        if (m < 1).any() or (m > self.max_new_tokens).any():
            raise ValueError(f"max_new_tokens: expected values in [1, {self.max_new_tokens}], got {m.tolist()}")
        if (lens + m > self.max_len).any():
            raise ValueError(f"max_new_tokens: prompt + new tokens exceed max_len={self.max_len} "
                             f"for sequences {np.nonzero(lens + m > self.max_len)[0].tolist()}")
        return jnp.asarray(m)

    def start(self, params, prompts, *, key=None, stop_tokens=(), max_new_tokens=None, lengths=None,
              padding="right"):
        """Prefill -> (DecodeState, stop array, max_new array, first-token logits (B, V))."""
        tokens, lens = self.pack_prompts(prompts, lengths, padding)
        stops = self._stop_array(stop_tokens)
        max_new = self._max_new_array(max_new_tokens, lens)
        key = jax.random.PRNGKey(0) if key is None else key
        state, logits = self.prefill_fn(params, self.init_cache(), jnp.asarray(tokens), jnp.asarray(lens),
                                        key, stops, max_new)
        return state, stops, max_new, logits

    def stream(self, params, prompts, *, chunk_size: int = 16, **kw) -> Iterator[tuple[list, np.ndarray]]:
        """Yield (new tokens per sequence (list of B lists), done (B,)) after the prefill and after
        every chunk of up to `chunk_size` decode steps."""
        state, stops, max_new, _ = self.start(params, prompts, **kw)
        seen = 0
        while True:
            num = np.asarray(state.num_generated)
            hi = int(num.max())
            toks = np.asarray(state.tokens[:, seen:hi])
            yield [toks[b, :max(0, num[b] - seen)].tolist() for b in range(self.batch)], np.asarray(state.done)
            seen = hi
            if bool(np.all(state.done)) or int(state.step) >= self.max_new_tokens:
                return
            until = jnp.asarray(min(int(state.step) + chunk_size, self.max_new_tokens), jnp.int32)
            state = self.decode_fn(params, state, stops, max_new, until)

    def run(self, params, prompts, **kw) -> DecodeState:
        """Prefill + the whole decode loop in one call of the decode executable."""
        state, stops, max_new, _ = self.start(params, prompts, **kw)
        return self.decode_fn(params, state, stops, max_new, jnp.asarray(self.max_new_tokens, jnp.int32))


@functools.lru_cache(maxsize=8)
def _decoder(model, batch, max_len, max_new_tokens, kv_dtype, kv_scaling, sampling, pad_id):
    return Decoder(model, batch=batch, max_len=max_len, max_new_tokens=max_new_tokens,
                   kv_dtype=kv_dtype, kv_scaling=kv_scaling, sampling=sampling, pad_id=pad_id)


def _setup(model, prompts, max_new_tokens, max_len, kv_dtype, kv_scaling, sampling, pad_id, lengths):
    n_max = int(np.max(max_new_tokens))
    if isinstance(prompts, (list, tuple)) and prompts and not np.isscalar(prompts[0]):
        B, longest = len(prompts), max(len(p) for p in prompts)
    else:
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts: expected a list of token lists or a (B, T) array, got shape {arr.shape}")
        B, longest = arr.shape
    if max_len is None:  # round up so similar requests share one executable
        max_len = -(-(longest + n_max) // 128) * 128
    return _decoder(model, B, int(max_len), n_max, kv_dtype, kv_scaling, sampling, pad_id)


def generate(model, params, prompts, *, max_new_tokens=32, kv_dtype="fp8", kv_scaling="per_token_head",
             sampling: Sampling = Sampling(), key=None, stop_tokens: Sequence[int] = (), max_len=None,
             lengths=None, padding="right", pad_id: int = 0) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens per prompt -> list of generated token lists.

    Args:
      model, params: from `llama.load` / `llama.init_params`.
      prompts: list of token-id lists (ragged), or a (B, T) int array padded on `padding`'s side
        with true `lengths` (B,).
      max_new_tokens: int, or (B,) per-sequence limits.
      kv_dtype: "fp8" (E4M3 cache, default), "e5m2" or "bf16".
      sampling: Sampling(temperature, top_k, top_p); key: PRNG key (default PRNGKey(0)).
      stop_tokens: ids that end a sequence (kept as its last token); at most 8.
      max_len: cache length (default: longest prompt + max_new_tokens, rounded up to 128).
    """
    dec = _setup(model, prompts, max_new_tokens, max_len, kv_dtype, kv_scaling, sampling, pad_id, lengths)
    state = dec.run(params, prompts, key=key, stop_tokens=stop_tokens, max_new_tokens=max_new_tokens,
                    lengths=lengths, padding=padding)
    toks, num = np.asarray(state.tokens), np.asarray(state.num_generated)
    return [toks[b, :num[b]].tolist() for b in range(toks.shape[0])]


def stream(model, params, prompts, *, chunk_size: int = 16, max_new_tokens=32, kv_dtype="fp8",
           kv_scaling="per_token_head", sampling: Sampling = Sampling(), key=None,
           stop_tokens: Sequence[int] = (), max_len=None, lengths=None, padding="right",
           pad_id: int = 0) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields each sequence's new tokens chunk by chunk (lists per sequence)."""
    dec = _setup(model, prompts, max_new_tokens, max_len, kv_dtype, kv_scaling, sampling, pad_id, lengths)
    for rows, _ in dec.stream(params, prompts, chunk_size=chunk_size, key=key, stop_tokens=stop_tokens,
                              max_new_tokens=max_new_tokens, lengths=lengths, padding=padding):
        yield rows


def cli(argv: list[str]) -> int:
    """`jfp8 generate MODEL --prompt TEXT [--kv-dtype fp8|bf16] [--recipe NAME]`.

    MODEL: an HF checkpoint directory (or a jfp8 save of one), or a llama.cpp .gguf file."""
    ap = argparse.ArgumentParser(prog="jfp8 generate", description=cli.__doc__)
    ap.add_argument("model_dir", help="HF checkpoint directory or .gguf file")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kv-dtype", default="fp8", choices=("fp8", "e5m2", "bf16"))
    ap.add_argument("--recipe", default=None,
                    help="quantize while loading: block128 | rowwise | per_tensor | weights_only | "
                         "weights_only_block128 | none; NAME+head quantizes the lm_head too "
                         "(default: block128 for BF16 checkpoints, as stored for FP8 ones)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=8, help="tokens per streamed chunk")
    args = ap.parse_args(argv)
    from models import checkpoint, llama
    try:
        import os
        is_gguf = args.model_dir.endswith(".gguf") and os.path.isfile(args.model_dir)
        recipe = args.recipe
        if recipe is None:
            saved = os.path.exists(os.path.join(args.model_dir, checkpoint.QUANT_FILE))
            recipe = None if saved else "block128"
        elif recipe == "none":
            recipe = None
        t0 = time.perf_counter()
        if is_gguf:  # llama.cpp file: config, weights and tokenizer all come from it
            from models import gguf
            model, params, gguf_file = gguf.load(args.model_dir, quantize=recipe)
            tok = gguf_file.tokenizer
            bos = [gguf_file.bos_token_id] if gguf_file.add_bos_token and gguf_file.bos_token_id is not None else []
            stops = [gguf_file.eos_token_id] if gguf_file.eos_token_id is not None else []
        else:
            model, params = checkpoint.load(args.model_dir, quantize=recipe)
            tok = checkpoint.load_tokenizer(args.model_dir)
            bos, stops = [], list(model.cfg.eos_token_ids)
        model, params = llama.fuse(model, params)  # q/k/v and gate/up as one matmul each
        load_s = time.perf_counter() - t0
        prompts = [bos + tok.encode(p).ids for p in args.prompt]
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        stops = stops[:MAX_STOP_TOKENS]
    except (ValueError, TypeError) as e:
        print(f"jfp8 generate: {e}", file=sys.stderr)
        return 1
    print(f"# loaded {args.model_dir} in {load_s:.1f}s (recipe {model.recipe.name if model.recipe else 'bf16'}, "
          f"kv {args.kv_dtype})", file=sys.stderr)
    texts = [[] for _ in prompts]
    t0, n_tok = time.perf_counter(), 0
    for rows in stream(model, params, prompts, chunk_size=args.chunk, max_new_tokens=args.max_new_tokens,
                       kv_dtype=args.kv_dtype, sampling=sampling, key=jax.random.PRNGKey(args.seed),
                       stop_tokens=stops):
        for b, r in enumerate(rows):
            texts[b] += r
            n_tok += len(r)
        if len(prompts) == 1 and rows[0]:
            sys.stdout.write(tok.decode(rows[0]))
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    if len(prompts) == 1:
        print()
    else:
        for p, t in zip(args.prompt, texts):
            print(f"--- {p}\n{tok.decode(t)}")
    print(f"# {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tokens/s incl. prefill and compile)", file=sys.stderr)
    return 0
