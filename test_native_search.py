"""The native CPU top-k kernel (native_search.cc) against `lax.top_k` of the full scores.

Queries and corpus hold small integers, so that every dot product is an exact float32 integer
whatever the order of summation: the kernel must then return exactly `lax.top_k`'s scores and
indices, ties included (lower row index first). Shapes cross the kernel's edges: query counts
around its 16 lanes, corpus sizes around its row tiles, widths that are not multiples of 16,
masks that leave fewer than k rows, and rows split over several threads (forced, so that a
one-core machine tests them too), some holding fewer than k rows. Also: NaN and infinities in
`lax.top_k`'s order, zeros, gradients, and the fallback when no compiler is at hand.
"""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native_search
from conftest import DTYPES, assert_same_top_k, full_top_k, needs_kernel
from search import INF, top_k_search

# Rows per thread in the kernel (kRowsPerThread): corpora above twice this use two threads.
ROWS_PER_THREAD = 1 << 15


def integer_rows(rng, shape, high=4):
    """Integers in [-high, high]: exact in bfloat16, and their dot products exact in float32."""
    return rng.integers(-high, high + 1, shape).astype(np.float32)


def assert_exact(result, expected):
    assert_same_top_k(result, expected, atol=0)


@needs_kernel
@settings(max_examples=25, deadline=None, derandomize=True)  # compiles per example
@given(
    num_queries=st.integers(1, 40),
    num_rows=st.integers(1, 300),
    width=st.integers(1, 40),
    k_fraction=st.floats(0.0, 1.0),
    masked_fraction=st.sampled_from([0.0, 0.3, 0.95]),
    dtype=st.sampled_from(sorted(DTYPES)),
    threads=st.sampled_from([0, 1, 3, 7]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_lax_top_k_exactly(
    num_queries, num_rows, width, k_fraction, masked_fraction, dtype, threads, seed
):
    rng = np.random.default_rng(seed)
    k = 1 + int(k_fraction * (num_rows - 1))
    # Few distinct values: many tied scores, including across the k-th place.
    queries = integer_rows(rng, (num_queries, width), high=1)
    corpus = integer_rows(rng, (num_rows, width), high=2)
    mask = rng.random(num_rows) >= masked_fraction
    corpus = jnp.asarray(corpus, DTYPES[dtype])
    result = native_search.top_k(jnp.asarray(queries), corpus, jnp.asarray(mask), k, -INF, threads)
    assert_exact(result, full_top_k(queries, corpus, k, mask))


@needs_kernel
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("width", [1, 7, 16, 17, 33, 128])
def test_one_query_scan_equals_lax_top_k_at_widths_around_its_vectors(dtype, width):
    """One query takes its own scan (a bfloat16 row read as words of two elements, 16 to a
    vector, then a tail of single elements): every width, whole vectors or not, gives the same
    top k, ties included."""
    rng = np.random.default_rng(width)
    queries = integer_rows(rng, (1, width), high=3)
    corpus = jnp.asarray(integer_rows(rng, (500, width), high=2), DTYPES[dtype])
    mask = rng.random(500) < 0.9
    result = native_search.top_k(jnp.asarray(queries), corpus, jnp.asarray(mask), 40, -INF)
    assert_exact(result, full_top_k(queries, corpus, 40, mask))


@needs_kernel
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kernel_over_two_threads_with_ties_across_their_boundary(dtype):
    """Two threads scan the two halves; equal best scores on both sides of the split, and in
    the ragged tail, must come out in row order, as `lax.top_k` orders them."""
    rng = np.random.default_rng(0)
    num_rows, k = 2 * ROWS_PER_THREAD + 37, 50
    queries = integer_rows(rng, (17, 24))
    corpus = integer_rows(rng, (num_rows, 24), high=1)
    best = np.sign(queries[0]) * 2  # scores above every row of the ±1 corpus
    split = (num_rows + 1) // 2
    tied = np.concatenate(
        [np.arange(split - 40, split + 40), np.arange(num_rows - 5, num_rows), [3, 7]]
    )
    corpus[tied] = best
    mask = rng.random(num_rows) < 0.9
    mask[tied[::9]] = False
    corpus = jnp.asarray(corpus, DTYPES[dtype])
    expected = full_top_k(queries, corpus, k, mask)
    assert len(set(np.asarray(expected[0])[0].tolist())) == 1, "query 0: all tied"
    result = native_search.top_k(jnp.asarray(queries), corpus, jnp.asarray(mask), k, -INF)
    assert_exact(result, expected)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 4])
def test_nan_infinities_and_zeros_are_ordered_as_lax_top_k_orders_them(threads):
    """NaN scores rank by their sign beyond the infinities (`lax.top_k`'s total order of floats);
    zero scores, of either sign in the products, are +0.0 and tie."""
    rng = np.random.default_rng(5)
    queries = integer_rows(rng, (3, 4))
    queries[1] = 0.0  # every score of query 1 is a signed zero (or NaN, or inf * 0 = NaN)
    corpus = integer_rows(rng, (200, 4))
    corpus[[10, 150]] = np.nan
    corpus[[20, 120], 0] = np.inf
    corpus[[30, 130], 0] = -np.inf
    corpus[40:100] = -1.0  # -0.0 products for query 1
    corpus[100:110] = 0.0
    mask = np.ones(200, bool)
    expected = full_top_k(queries, corpus, 60, mask)
    result = native_search.top_k(
        jnp.asarray(queries), jnp.asarray(corpus), jnp.asarray(mask), 60, -INF, threads
    )
    assert_exact(result, expected)
    assert np.isnan(np.asarray(result[0])[0, 0])


@needs_kernel
def test_masked_rows_fill_the_list_when_fewer_than_k_rows_are_kept():
    rng = np.random.default_rng(1)
    queries, corpus = integer_rows(rng, (3, 8)), integer_rows(rng, (100, 8))
    mask = np.zeros(100, bool)
    mask[[5, 50, 99]] = True
    result = native_search.top_k(
        jnp.asarray(queries), jnp.asarray(corpus), jnp.asarray(mask), 10, -INF
    )
    assert_exact(result, full_top_k(queries, corpus, 10, mask))
    assert set(np.asarray(result[1])[:, :3].ravel()) == {5, 50, 99}


@needs_kernel
def test_gradients_equal_those_of_the_xla_method():
    """The kernel's scores differentiate like `lax.top_k`'s: through the chosen rows, with no
    gradient into masked rows (they score the constant -INF)."""
    rng = np.random.default_rng(6)
    queries = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
    corpus = jnp.asarray(rng.standard_normal((400, 12)), jnp.float32)
    mask = jnp.asarray(rng.random(400) < 0.02)  # 8 kept rows: masked rows are chosen too
    weights = jnp.asarray(rng.standard_normal((5, 10)), jnp.float32)

    def loss(queries, corpus, method):
        scores, _ = top_k_search(queries, corpus, 10, mask, method=method)
        return jnp.sum(jnp.where(scores > -INF, scores, 0.0) * weights)

    native = jax.grad(loss, argnums=(0, 1))(queries, corpus, "native")
    xla = jax.grad(loss, argnums=(0, 1))(queries, corpus, "xla")
    for got, want in zip(native, xla, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(native[1])).sum() > 0


@needs_kernel
def test_top_k_search_runs_the_kernel_inside_jit_and_vmap():
    rng = np.random.default_rng(3)
    queries = integer_rows(rng, (2, 5, 16))
    corpus = integer_rows(rng, (300, 16))
    mask = np.ones(300, bool)
    search = jax.jit(jax.vmap(lambda q: top_k_search(q, corpus, 7, method="native")))
    scores, indices = search(queries)
    for i in range(2):
        assert_exact((scores[i], indices[i]), full_top_k(queries[i], corpus, 7, mask))


def test_without_a_compiler_the_search_warns_and_falls_back(monkeypatch, tmp_path):
    """A machine without a working compiler gets a warning, `available()` False, the XLA
    search from `method="auto"`, and a clear error from `method="native"`."""
    monkeypatch.setattr(native_search, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="native top-k search unavailable"):
        assert not native_search.available()
    rng = np.random.default_rng(4)
    queries, corpus = integer_rows(rng, (3, 8)), integer_rows(rng, (50, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        result = top_k_search(queries, corpus, 5)
    assert_exact(result, full_top_k(queries, corpus, 5, np.ones(50, bool)))
    with pytest.raises(RuntimeError, match='use method="xla"'):
        top_k_search(queries, corpus, 5, method="native")


def test_cxx_is_a_command_with_its_flags_as_make_reads_it(monkeypatch):
    """ "ccache g++" was taken as one executable name, which no system has."""
    monkeypatch.setenv("CXX", "ccache 'my g++' -Wall")
    command = native_search._compiler_command(Path("out.so"))  # noqa: SLF001
    assert command[:4] == ["ccache", "my g++", "-Wall", "-O3"]
    assert command[-2:] == ["-o", "out.so"]
    monkeypatch.setenv("CXX", "/home/o'brien/g++")  # a RuntimeError, so that the search warns
    with pytest.raises(RuntimeError, match="is not a command: No closing quotation"):
        native_search._compiler_command(Path("out.so"))  # noqa: SLF001


def test_the_environment_variable_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(native_search, "_state", {})
    monkeypatch.setenv(native_search.DISABLE_VARIABLE, "0")
    assert not native_search.available()
    # A value that is neither on nor off is not taken for on.
    monkeypatch.setattr(native_search, "_state", {})
    monkeypatch.setenv(native_search.DISABLE_VARIABLE, "nope")
    with pytest.raises(ValueError, match="PHOENIX_NATIVE_SEARCH='nope': expected 0, false"):
        native_search.available()
    assert native_search._state == {}  # noqa: SLF001


def test_a_compiler_that_fails_without_a_message_is_named_with_its_status(monkeypatch, tmp_path):
    monkeypatch.setattr(native_search, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    monkeypatch.delenv(native_search.DISABLE_VARIABLE, raising=False)
    with pytest.warns(RuntimeWarning, match="with false failed: exit status 1, no message"):
        assert not native_search.available()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("width", [5, 64, 96])
def test_int8_kernel_scores_the_rounded_query_against_the_codes_exactly(threads, width):
    """Each query rounded to steps of max|q| / query_levels(D), one integer dot product per row,
    scaled by the query's step and the row's scale: the kernel's top k equals that computed in
    integers, ties (the duplicated rows) to the lower row. Widths of 32s take the vector path
    where there is one, 16 rows at a time (the last 3 rows one by one), and a width of 5 the
    row-by-row one."""
    rng = np.random.default_rng(width)
    codes = rng.integers(-127, 128, (70_003, width)).astype(np.int8)
    scales = rng.uniform(0.005, 0.015, 70_003).astype(np.float32)
    queries = rng.standard_normal((3, width)).astype(np.float32)
    # Query 0's best 102 rows, tied, on both sides of the threads' split and among the last 3.
    tied = [*range(500, 600), 40_000, 70_001]
    codes[tied] = np.sign(queries[0]) * 127
    scales[tied] = 0.02
    step = np.abs(queries).max(axis=1, keepdims=True) / native_search.query_levels(width)
    rounded = np.rint(queries / step).astype(np.int64)
    sums = rounded @ codes.T.astype(np.int64)  # exact
    assert np.abs(sums).max() < 2**31
    expected = sums.astype(np.float32) * (step.astype(np.float32) * scales)
    want = jax.lax.top_k(expected, 150)
    result = native_search.top_k_int8(
        jnp.asarray(queries), jnp.asarray(codes), jnp.asarray(scales), 150, threads
    )
    assert_same_top_k(result, want, atol=0)
