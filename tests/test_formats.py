"""Formats and the FP8 cast, checked against an independent bit-level decoder and ml_dtypes."""
import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jfp8
from jfp8.formats import E4M3, E4M3FNUZ, E5M2, E5M2FNUZ, as_format, cast


def decode_code(code: int, exp_bits: int, man_bits: int, bias: int, ieee: bool, fnuz: bool) -> float:
    """Value of one 8-bit code from the sign/exponent/mantissa rule, written independently of
    ml_dtypes. ieee: all-ones exponent is inf/NaN (E5M2). fn (E4M3): only S.1111.111 is NaN.
    fnuz: 0x80 is the only NaN, no negative zero, no inf."""
    sign = -1.0 if code >> 7 else 1.0
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    e_all_ones = e == (1 << exp_bits) - 1
    if fnuz:
        if code == 0x80:
            return float("nan")
    elif ieee and e_all_ones:
        return sign * float("inf") if m == 0 else float("nan")
    elif not ieee and e_all_ones and m == (1 << man_bits) - 1:
        return float("nan")
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - man_bits)
    return sign * (1 + m / 2 ** man_bits) * 2.0 ** (e - bias)


FORMAT_RULES = [
    (E4M3, 4, 3, 7, False, False),
    (E5M2, 5, 2, 15, True, False),
    (E4M3FNUZ, 4, 3, 8, False, True),
    (E5M2FNUZ, 5, 2, 16, False, True),
]


@pytest.mark.parametrize("fmt,exp_bits,man_bits,bias,ieee,fnuz", FORMAT_RULES, ids=lambda v: getattr(v, "name", None))
def test_all_256_codes_match_independent_decoder(fmt, exp_bits, man_bits, bias, ieee, fnuz):
    codes = np.arange(256, dtype=np.uint8)
    ours = np.array([decode_code(int(c), exp_bits, man_bits, bias, ieee, fnuz) for c in codes])
    theirs = codes.view(fmt.dtype).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(ours)
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    # The Format's derived fields agree with the decoder.
    values = ours[np.isfinite(ours)]
    assert fmt.max == values.max()
    assert fmt.smallest_subnormal == values[values > 0].min()
    assert fmt.smallest_normal == 2.0 ** (1 - bias)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (exp_bits, man_bits, bias)
    assert fmt.has_inf == bool(np.isinf(ours).any())


def test_headline_figures():
    assert E4M3.max == 448 and E4M3.smallest_subnormal == 2.0 ** -9 and not E4M3.has_inf
    assert E5M2.max == 57344 and E5M2.has_inf
    nan_codes = [c for c in range(256) if np.isnan(np.uint8(c).view(E4M3.dtype).astype(np.float32))]
    assert nan_codes == [0x7F, 0xFF]  # the single NaN code pair of e4m3fn
    assert jfp8.E4M3.dtype == ml_dtypes.float8_e4m3fn and jfp8.E5M2.dtype == ml_dtypes.float8_e5m2


def _expected(x32: np.ndarray, fmt, saturate: bool) -> np.ndarray:
    if saturate:
        x32 = np.clip(x32, -fmt.max, fmt.max)
    with np.errstate(all="ignore"):
        return x32.astype(fmt.dtype)


def _assert_same_codes(got, want, fmt):
    got_bits, want_bits = np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)
    both_nan = np.isnan(np.asarray(got).astype(np.float32)) & np.isnan(np.asarray(want).astype(np.float32))
    mismatch = (got_bits != want_bits) & ~both_nan
    assert not mismatch.any(), f"{fmt}: {mismatch.sum()} codes differ"


class TestCast(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_bf16_bit_pattern(self):
        x = np.arange(65536, dtype=np.uint16).view(ml_dtypes.bfloat16)
        for fmt in (E4M3, E5M2):
            for saturate in (True, False):
                got = self.variant(lambda a: cast(a, fmt, saturate=saturate))(jnp.asarray(x))
                _assert_same_codes(got, _expected(x.astype(np.float32), fmt, saturate), fmt)

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_f32_across_the_range(self):
        rng = np.random.default_rng(1234)
        # Random bit patterns cover every exponent (incl. subnormals, huge, inf, NaN); a scaled
        # normal sample covers the values that matter most, near the FP8 grid.
        bits = rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
        near = (rng.standard_normal(200_000) * 100).astype(np.float32)
        for x in (bits, near):
            for fmt in (E4M3, E5M2):
                for saturate in (True, False):
                    got = self.variant(lambda a: cast(a, fmt, saturate=saturate))(jnp.asarray(x))
                    _assert_same_codes(got, _expected(x, fmt, saturate), fmt)

    def test_saturation_and_nan(self):
        x = jnp.array([1e9, -1e9, jnp.inf, -jnp.inf, jnp.nan, 500.0, -460.0], jnp.float32)
        e4 = np.asarray(cast(x, E4M3)).astype(np.float32)
        np.testing.assert_array_equal(e4[[0, 1, 2, 3, 5, 6]], [448, -448, 448, -448, 448, -448])
        assert np.isnan(e4[4])
        raw = np.asarray(cast(x, E4M3, saturate=False)).astype(np.float32)
        assert np.isnan(raw[[0, 1, 2, 3, 4, 5]]).all()  # e4m3fn has no inf: overflow is NaN
        raw5 = np.asarray(cast(x, E5M2, saturate=False)).astype(np.float32)
        assert np.isinf(raw5[[0, 1, 2, 3]]).all() and np.isnan(raw5[4])

    def test_round_to_nearest_even(self):
        # 17 lies between 16 and 18 in E4M3 (step 2): tie goes to the even mantissa, 16.
        # 19 is a tie between 18 and 20: goes to 20 (mantissa ...10 -> even).
        got = np.asarray(cast(jnp.array([17.0, 19.0, 17.01], jnp.float32), E4M3)).astype(np.float32)
        np.testing.assert_array_equal(got, [16.0, 20.0, 18.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=40))
def test_cast_hypothesis_matches_ml_dtypes(values):
    x = np.asarray(values, np.float32)
    for fmt in (E4M3, E5M2):
        _assert_same_codes(cast(jnp.asarray(x), fmt), _expected(x, fmt, True), fmt)


def test_cast_bad_input():
    with pytest.raises(TypeError, match="x:"):
        cast(jnp.arange(4), E4M3)
    with pytest.raises(TypeError, match="x:"):
        cast(jnp.zeros(4, jnp.float8_e4m3fn), E4M3)
    with pytest.raises(ValueError, match="fmt:"):
        as_format("e3m4")
    with pytest.raises(ValueError, match="fmt:"):
        as_format(np.float32)


def test_scalar_and_empty():
    assert cast(jnp.float32(3.3), E4M3).shape == ()
    assert cast(jnp.zeros((0, 3)), E5M2).shape == (0, 3)
