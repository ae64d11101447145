"""`jfp8 demo`: the formats table, the quantization-error table, then (when the decoder is
installed) BF16 vs FP8 agreement and decode speed of a tiny Llama-shaped model."""
from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import numpy as np

from jfp8.formats import BF16, E4M3, E5M2, FP16, FP32, Format
from jfp8.metrics import quantization_error
from jfp8.scaling import PerBlock, PerChannel, PerTensor

TABLE_FORMATS = (FP32, FP16, BF16, E4M3, E5M2)
GRANULARITIES = (("per-tensor", PerTensor()), ("per-channel", PerChannel(0)),
                 ("block 128", PerBlock((128, 128))), ("block 32", PerBlock((1, 32))))


def formats_table(formats: tuple[Format, ...] = TABLE_FORMATS) -> str:
    """Markdown table of each format's fields, computed from ml_dtypes."""
    rows = ["| format | sign | exp | mantissa | bias | max | min normal | min subnormal | inf |",
            "|---|---|---|---|---|---|---|---|---|"]
    for f in formats:
        rows.append(f"| {f.name.upper()} | 1 | {f.exponent_bits} | {f.mantissa_bits} | {f.bias} | "
                    f"{f.max:.6g} | {f.smallest_normal:.3g} | {f.smallest_subnormal:.3g} | "
                    f"{'yes' if f.has_inf else 'no'} |")
    return "\n".join(rows)


def error_workloads(seed: int = 0, shape=(512, 1024)) -> dict[str, np.ndarray]:
    """Test tensors: Gaussian and Student-t weights, and activations with outlier channels.

    Activations are (tokens, channels) = (512, 1024) rows of N(0, 1) with 4 channels scaled by
    10**e: the massive-activation pattern of LLM residual streams. Per-channel granularity is
    taken along axis 0 (one scale per token row), the activation convention.
    """
    rng = np.random.default_rng(seed)
    out = {
        "gaussian W": rng.standard_normal(shape).astype(np.float32) * 0.02,
        "student-t(3) W": (rng.standard_t(3, shape) * 0.02).astype(np.float32),
    }
    cols = rng.choice(shape[1], 4, replace=False)
    for e in (3, 4, 5):
        a = rng.standard_normal(shape).astype(np.float32)
        a[:, cols] *= 10.0 ** e
        out[f"acts, outliers x1e{e}"] = a
    return out


def error_table(seed: int = 0) -> str:
    """Markdown table: mean relative error (and % flushed to zero) per workload × format × granularity."""
    header = "| tensor | format | " + " | ".join(name for name, _ in GRANULARITIES) + " |"
    rows = [header, "|---|---|" + "---|" * len(GRANULARITIES)]
    for wname, x in error_workloads(seed).items():
        for fmt in (E4M3, E5M2):
            cells = []
            for _, g in GRANULARITIES:
                e = quantization_error(x, fmt, g)
                cells.append(f"{100 * e.mean_rel_error:.2f}% ({100 * e.frac_flushed:.1f}% → 0)")
            rows.append(f"| {wname} | {fmt.name.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jfp8 demo", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-model", action="store_true", help="only the format and error tables")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    print(f"jfp8 demo on {jax.devices()[0].platform} (jax {jax.__version__})\n")
    print("Formats (computed from ml_dtypes):\n")
    print(formats_table())
    print("\nMean relative error of quantize→dequantize (over nonzero entries; in parentheses the "
          "share of nonzero entries flushed to zero):\n")
    print(error_table(args.seed))
    print(f"\n(tables in {time.perf_counter() - t0:.1f} s)")
    if not args.no_model and importlib.util.find_spec("models.demo") is not None:
        from models import demo as model_demo  # the CLI may import models, lazily
        return model_demo.run([])
    return 0
