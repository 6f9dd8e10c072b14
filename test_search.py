"""Exact top-K search (`search.py`) against `lax.top_k` of the full score matrix.

Data is continuous and random unless a test plants ties: the methods sum products in different
orders, so scores agree to float32 rounding and indices exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native_search
from conftest import (
    DTYPES,
    SEEDS,
    assert_same_top_k,
    finish,
    full_top_k,
    needs_kernel,
    normal,
    start_with_devices,
    unit_rows,
)
from search import (
    INF,
    TwoPassIndex,
    auto_search_method,
    first_non_finite_row,
    first_repeated,
    read_block,
    read_rows,
    sharded_top_k_search,
    top_k_search,
    validate_corpus,
)

EMB_SIZE = 16
CORPUS_SIZE = 1000

search = jax.jit(top_k_search, static_argnames=("k", "block_size"))


@settings(max_examples=15, deadline=None, derandomize=True)  # compiles per example
@given(
    num_queries=st.integers(1, 3),
    corpus_size=st.integers(1, 40),
    dim=st.sampled_from([2, 5, 8]),
    data=st.data(),
    seed=SEEDS,
)
def test_top_k_search_equals_lax_top_k_over_the_full_score_matrix(
    num_queries, corpus_size, dim, data, seed
):
    """The search (blockwise with a block size, the last block shifted back; without one, by
    the method `auto` picks) returns the full matrix's top-k: same scores, same indices,
    masked rows scored -INF and retrieved only once every unmasked row is."""
    k = data.draw(st.integers(1, corpus_size), label="k")
    block_size = data.draw(st.none() | st.integers(1, corpus_size + 3), label="block_size")
    mask = data.draw(
        st.none() | st.lists(st.booleans(), min_size=corpus_size, max_size=corpus_size),
        label="corpus_mask",
    )
    mask = None if mask is None else np.array(mask)
    queries, corpus = normal(seed, (num_queries, dim)), normal(seed + 1, (corpus_size, dim))

    scores, indices = map(np.asarray, search(queries, corpus, k, mask, block_size=block_size))
    full_mask = np.ones(corpus_size, bool) if mask is None else mask
    want_scores, want_indices = full_top_k(queries, corpus, k, full_mask)

    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    unmasked = want_scores > -INF / 2
    np.testing.assert_array_equal(indices[unmasked], want_indices[unmasked])
    assert np.all(scores[~unmasked] == -INF)
    assert not full_mask[indices[~unmasked]].any()
    for row in indices:
        assert len(set(row)) == k  # no corpus row counted twice


@pytest.mark.parametrize(
    ("block_size", "k", "masked", "dtype"),
    [
        (None, 10, False, jnp.float32),  # one block (the default for N = 1,000)
        (64, 10, False, jnp.float32),  # 16 blocks, the last one shifted back to end at N
        (64, 10, True, jnp.float32),
        (7, 10, True, jnp.float32),  # block smaller than k: widened to k
        (250, 1, False, jnp.bfloat16),  # blocks divide N
        (64, 100, True, jnp.bfloat16),
        (300, CORPUS_SIZE, False, jnp.float32),  # k = N: a full sort
    ],
)
def test_top_k_search_in_many_blocks_equals_full_top_k(block_size, k, masked, dtype):
    queries = unit_rows((3, EMB_SIZE), seed=1)
    corpus = jnp.asarray(unit_rows((CORPUS_SIZE, EMB_SIZE), seed=2), dtype)
    mask = None
    if masked:
        # Half the corpus masked, including the best match of every query.
        mask = np.random.default_rng(3).random(CORPUS_SIZE) < 0.5
        mask[np.argmax(queries @ np.asarray(corpus, np.float32).T, axis=1)] = False
        mask = jnp.asarray(mask)
    result = top_k_search(queries, corpus, k, mask, block_size=block_size, method="xla")
    assert_same_top_k(result, full_top_k(queries, corpus, k, mask))


@pytest.mark.parametrize(("k", "dtype"), [(10, jnp.float32), (100, jnp.bfloat16)])
def test_top_k_search_of_a_larger_corpus_with_ties(k, dtype):
    """Tens of thousands of rows (no multiple of any power of two), a mask, and rows repeated
    many times so that equal scores straddle the k-th place: `lax.top_k` takes the lowest
    indices among equal scores, and so must the search."""
    size = 20_011
    rng = np.random.default_rng(13)
    queries = unit_rows((4, EMB_SIZE), seed=14)
    corpus = unit_rows((size, EMB_SIZE), seed=15)
    best = queries[0] + 0.05 * rng.standard_normal(EMB_SIZE).astype(np.float32)
    repeated = rng.choice(size, 3 * k, replace=False)
    corpus[repeated] = best / np.linalg.norm(best)
    mask = rng.random(size) < 0.8
    mask[repeated[: k // 2]] = False
    corpus, mask = jnp.asarray(corpus, dtype), jnp.asarray(mask)
    expected = full_top_k(queries, corpus, k, mask)
    tied = np.asarray(expected[0][0])
    assert tied[0] == tied[-1], "the first query's top k should be all ties"
    for block_size in (None, 4096):
        assert_same_top_k(top_k_search(queries, corpus, k, mask, block_size=block_size), expected)


def test_top_k_search_counts_rows_shared_by_the_last_two_blocks_once():
    """The last block is shifted back to end at N and overlaps the one before; the best matches
    are planted in that overlap, so a row counted twice would show up in the top-k."""
    block, k = 64, 10
    last_start = CORPUS_SIZE - block
    overlap = np.arange(last_start, (CORPUS_SIZE // block) * block)
    assert len(overlap) > k
    queries = unit_rows((2, EMB_SIZE), seed=10)
    corpus = unit_rows((CORPUS_SIZE, EMB_SIZE), seed=11)
    noise = 0.1 * np.random.default_rng(12).standard_normal((len(overlap), EMB_SIZE))
    corpus[overlap] = queries[np.arange(len(overlap)) % 2] + noise.astype(np.float32)
    scores, indices = top_k_search(queries, jnp.asarray(corpus), k, block_size=block)
    assert np.all(np.isin(np.asarray(indices), overlap))
    assert all(len(set(row)) == k for row in np.asarray(indices).tolist())
    assert_same_top_k((scores, indices), full_top_k(queries, corpus, k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sharded_search_on_one_device_equals_full_top_k(dtype):
    """Without a multi-device sharding, `sharded_top_k_search` is the one-device search."""
    queries = unit_rows((5, EMB_SIZE), seed=4)
    corpus = jnp.asarray(unit_rows((CORPUS_SIZE, EMB_SIZE), seed=5), dtype)
    assert_same_top_k(sharded_top_k_search(queries, corpus, 20), full_top_k(queries, corpus, 20))


def test_validate_corpus_names_a_non_finite_row():
    """A NaN row would be every user's best match (lax.top_k ranks NaN first); an infinite one
    its best or worst. Both are refused by row, numpy or jax, before any search."""
    corpus = unit_rows((50, 4), seed=0)
    validate_corpus(corpus, 4, 10)
    for bad in (np.nan, -np.inf):
        broken = corpus.copy()
        broken[37, 2] = bad
        for array in (broken, jnp.asarray(broken)):
            assert first_non_finite_row(array) == 37
            with pytest.raises(
                ValueError, match=r"corpus_embeddings row 37 holds .*expected finite"
            ):
                validate_corpus(array, 4, 10)
    assert first_non_finite_row(jnp.asarray(corpus)) is None
    wide = corpus.astype(np.float64)
    wide[4, 0] = -5e198  # finite here, infinite in the float32 that JAX holds
    with pytest.raises(ValueError, match=r"row 4 holds values beyond float32's range \(a magn"):
        validate_corpus(wide, 4, 10)
    with pytest.raises(
        ValueError, match=r"corpus_embeddings has shape \(50, 4\), expected \[N, D=5\]"
    ):
        validate_corpus(corpus, 5, 10)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, N=50\]"):
        validate_corpus(corpus, 4, 51)
    with pytest.raises(ValueError, match=r"corpus_embeddings is empty \(N=0\)"):
        validate_corpus(corpus[:0], 4, 1)


@pytest.mark.parametrize("method", ["xla", "auto"])
@pytest.mark.parametrize("corpus_size", [40, 5000, 300_000])  # one block, grouped, several
def test_the_search_works_with_jax_64_bit_mode(method, corpus_size):
    """With jax_enable_x64 on, integer ranges default to int64: the indices stay int32 in
    every path, so that the kernel and the compiled fallback of `auto` agree on their type."""
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    corpus = rng.standard_normal((corpus_size, 8)).astype(np.float32)
    with jax.enable_x64(True):
        result = jax.jit(lambda q, c: top_k_search(q, c, 5, method=method))(queries, corpus)
    assert result[1].dtype == jnp.int32
    assert_same_top_k(result, full_top_k(queries, corpus, 5))


@needs_kernel
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_top_k_search_methods_agree_on_real_valued_data(dtype):
    """Unit-norm random rows: the two methods sum in different orders, so scores agree to
    float32 rounding, and the indices agree (no two scores here are that close)."""
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((20, 64)).astype(np.float32)
    corpus = rng.standard_normal((5000, 64)).astype(np.float32)
    corpus = jnp.asarray(corpus / np.linalg.norm(corpus, axis=1, keepdims=True), DTYPES[dtype])
    mask = jnp.asarray(rng.random(5000) < 0.5)
    native = top_k_search(queries, corpus, 64, mask, method="native")
    xla = top_k_search(queries, corpus, 64, mask, method="xla")
    np.testing.assert_array_equal(np.asarray(native[1]), np.asarray(xla[1]))
    np.testing.assert_allclose(np.asarray(native[0]), np.asarray(xla[0]), rtol=0, atol=1e-5)


@needs_kernel
def test_auto_picks_the_kernel_where_it_is_faster():
    one, many = np.ones((1, 8), np.float32), np.ones((4, 8), np.float32)
    corpus = np.ones((100, 8), np.float32)
    assert auto_search_method(many, corpus) == "native"
    assert auto_search_method(one, corpus.astype(jnp.bfloat16)) == "native"
    assert auto_search_method(one, corpus) == "xla"  # a matrix-vector product: read-bound
    assert auto_search_method(many, corpus, block_size=10) == "xla"
    assert auto_search_method(many, corpus.astype(np.float16)) == "xla"
    with pytest.raises(ValueError, match="float32 or bfloat16 corpus, got float16"):
        top_k_search(many, corpus.astype(np.float16), 3, method="native")


def test_bad_method_k_and_shapes_are_refused():
    queries, corpus = np.ones((2, 4), np.float32), np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        top_k_search(queries, corpus, 3, method="fast")
    for k in (0, 11):
        with pytest.raises(ValueError, match=r"k must be in \[1, N=10\]"):
            top_k_search(queries, corpus, k)
    with pytest.raises(ValueError, match="same D"):
        top_k_search(queries, np.ones((10, 5), np.float32), 3)
    with pytest.raises(ValueError, match="same D"):
        top_k_search(queries[0], corpus, 3)
    with pytest.raises(ValueError, match=r"corpus_mask has shape \(9,\)"):
        top_k_search(queries, corpus, 3, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\] \(an integer\), got 2.5"):
        top_k_search(queries, corpus, 2.5)
    got = r"got an array of shape \[10, 4\], float32$"  # (not the array's values, line by line)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\] \(an integer\), " + got):
        top_k_search(queries, corpus, corpus)
    with pytest.raises(ValueError, match="corpus must be floating, got int32"):
        top_k_search(queries, corpus.astype(np.int32), 3)
    for block_size in (0, 2.0, "a"):
        with pytest.raises(ValueError, match=f"block_size must be .*, got {block_size!r}$"):
            top_k_search(queries, corpus, 3, block_size=block_size)
    for threads in (-1, "a", True):
        with pytest.raises(ValueError, match=f"threads must be .*, got {threads!r}$"):
            top_k_search(queries, corpus, 3, threads=threads)
    for search in (top_k_search, sharded_top_k_search):  # a list has no shape: refused by name
        with pytest.raises(TypeError, match="queries must be an array .*, got list"):
            search(queries.tolist(), corpus, 3)
        with pytest.raises(TypeError, match="corpus must be an array .*, got list"):
            search(queries, corpus.tolist(), 3)
    for empty in (np.zeros((0, 4), np.float32), jnp.zeros((0, 4))):  # no users, no work
        assert [x.shape for x in top_k_search(empty, corpus, 3)] == [(0, 3), (0, 3)]
    nan_queries = np.array([[1, 0, 0, 0], [0, np.nan, 0, 0]], np.float32)
    for search in (top_k_search, sharded_top_k_search):  # sharded: checked before its jit
        with pytest.raises(ValueError, match="queries row 1 holds NaN or infinity"):
            search(nan_queries, corpus, 3)
        with pytest.raises(TypeError, match="corpus_mask must be an array .*, got list"):
            search(queries, corpus, 3, [True] * 10)
        with pytest.raises(TypeError, match="corpus_mask must be bool .*, got <U1"):
            search(queries, corpus, 3, np.array(["y"] * 10))
    with pytest.raises(ValueError, match=r"threads must be an integer in \[0, 2\*\*31\)"):
        top_k_search(queries, corpus, 3, threads=10**20)


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize(("near", "widened", "fallbacks"), [(150, 2, 0), (700, 3, 2)])
def test_two_pass_index_equals_the_full_float32_search(tmp_path, int8, near, widened, fallbacks):
    """The first pass (int8 or bfloat16) and float32 rescoring give the exact top k, from a
    memory-mapped corpus too; where the copy cannot tell the rows apart (more rows within its
    error of the k-th than the first pass keeps), the query's first pass is widened eightfold,
    and where that is still too few, the query is searched in full in float32; still exact."""
    corpus = unit_rows((3000, EMB_SIZE), seed=20)
    queries = unit_rows((3, EMB_SIZE), seed=21)
    # Query 2 is axis 0, and `near` rows lie along it at 1 + i * 2**-20: distinct in float32,
    # scored exactly (one product each), all equal within either copy's error.
    # Queries 0 and 1 are orthogonal to axis 0: those rows are not near their top k.
    queries[:2, 0] = 0.0
    queries[:2] /= np.linalg.norm(queries[:2], axis=1, keepdims=True)
    queries[2] = np.eye(EMB_SIZE, dtype=np.float32)[0]
    rows = np.random.default_rng(0).choice(3000, near, replace=False)
    corpus[rows] = 0.0
    corpus[rows, 0] = 1.0 + np.arange(near, dtype=np.float32) * 2.0**-20
    path = tmp_path / "corpus.npy"
    np.save(path, corpus)
    mapped = np.load(path, mmap_mode="r")
    for source in (corpus, mapped):
        index = TwoPassIndex(source, int8=int8)
        assert (index.scales is not None) == int8
        for k in (1, 10, 60):
            scores, indices = index.search(queries, k)
            assert_same_top_k((scores, indices), full_top_k(queries, corpus, k))
        # Query 2 keeps 66, 84 and 184 rows at k = 1, 10 and 60 in the first pass, eight times
        # as many when widened; queries 0 and 1 never need either.
        assert (index.widened, index.fallbacks) == (widened, fallbacks)


@needs_kernel
def test_two_pass_index_builds_the_int8_kernel_itself_in_a_fresh_process():
    """In a process where nothing has asked for the native kernel before, TwoPassIndex(int8=True)
    loads and registers it (built already, by this process), and its search is the exact top
    k."""
    code = "\n".join(
        [
            "import numpy as np, search",
            "rng = np.random.default_rng(0)",
            "corpus = rng.standard_normal((500, 16)).astype(np.float32)",
            "queries = rng.standard_normal((2, 16)).astype(np.float32)",
            "index = search.TwoPassIndex(corpus, int8=True)",
            "_, found = index.search(queries, 5)",
            "want = np.argsort(-(queries @ corpus.T), axis=1)[:, :5]",
            "print(index.scales is not None, bool((found == want).all()))",
        ]
    )
    status, out, report = finish(start_with_devices(code, 1))
    assert status == 0 and out.split() == ["True", "True"], report


def test_two_pass_index_asked_for_int8_without_the_native_kernel_says_so(monkeypatch):
    monkeypatch.setattr(native_search, "available", lambda: False)
    with pytest.raises(ValueError, match="int8=True needs the native kernel"):
        TwoPassIndex(unit_rows((50, 8), seed=1), int8=True)
    assert TwoPassIndex(unit_rows((50, 8), seed=1)).scales is None  # bfloat16 by default then


def test_two_pass_index_refuses_what_it_cannot_search():
    corpus = unit_rows((50, 8), seed=1)
    corpus[17, 3] = np.nan
    with pytest.raises(ValueError, match="corpus row 17 is not finite"):
        TwoPassIndex(corpus)
    with pytest.raises(ValueError, match=r"corpus must be a floating \[N, D\] array, got object"):
        TwoPassIndex(None)
    index = TwoPassIndex(unit_rows((50, 8), seed=1))
    with pytest.raises(ValueError, match=r"queries must be \[B, 8\], got shape \(1, 7\)"):
        index.search(np.ones((1, 7), np.float32), 3)
    with pytest.raises(ValueError, match="queries must be finite"):
        index.search(np.full((1, 8), np.inf, np.float32), 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=50\] \(an integer\), got 3\.0"):
        index.search(np.ones((1, 8), np.float32), 3.0)
    with pytest.raises(ValueError, match=r"\|q\| \|x\| up to 1e\+50\) overflow float32"):
        TwoPassIndex(unit_rows((50, 8), seed=1) * 1e25).search(unit_rows((1, 8), 2) * 1e25, 3)
    with pytest.raises(ValueError, match=r"corpus is empty \(\[0, 8\]\)"):
        TwoPassIndex(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match=r"corpus must be a floating \[N, D\] array, got int64"):
        TwoPassIndex(np.zeros((5, 8), np.int64))
    scores, indices = index.search(np.zeros((0, 8), np.float32), 3)  # no queries: an empty answer
    assert scores.shape == indices.shape == (0, 3)
    rows = unit_rows((50, 8), seed=1)
    listed = TwoPassIndex(rows.tolist()).search(rows[:2], 4)  # a nested list is an array too
    assert_same_top_k(listed, full_top_k(rows[:2], rows, 4))


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_kernel), False])
def test_read_rows_reads_a_mapped_file_without_mapping_it(tmp_path, monkeypatch, native):
    """By the kernel library's loop of positioned reads, or without it by Python's, for a few
    rows and for thousands."""
    if not native:
        monkeypatch.setattr(native_search, "read_rows", lambda *args: False)
    rng = np.random.default_rng(1)
    table = rng.standard_normal((5000, 7)).astype(np.float32)
    np.save(tmp_path / "t.npy", table)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    for rows in (np.array([[3, 4999, 3], [0, 17, 250]]), rng.integers(0, 5000, (30, 70))):
        np.testing.assert_array_equal(read_rows(mapped, rows), table[rows])
        np.testing.assert_array_equal(read_rows(table, rows), table[rows])
    np.testing.assert_array_equal(read_block(mapped, 4990, 6000), table[4990:])
    # As indexing does: rows from the end, and rows outside named (the file was read beyond).
    np.testing.assert_array_equal(read_rows(mapped, np.array([-1, 0])), table[[-1, 0]])
    with pytest.raises(IndexError, match=r"rows must lie in \[-5000, 5000\), got \[0, 5000\]"):
        read_rows(mapped, np.array([0, 5000]))
    with pytest.raises(IndexError, match="rows must be integers, got float64"):
        read_rows(mapped, np.array([1.5]))
    # A view of the map keeps its parent's offset, a copy-on-write map what the file does not
    # hold: both are read as arrays, not from the file.
    np.testing.assert_array_equal(read_rows(mapped[1000:], np.array([0, 5])), table[[1000, 1005]])
    np.testing.assert_array_equal(read_block(mapped[1000:], 0, 3), table[1000:1003])
    private = np.load(tmp_path / "t.npy", mmap_mode="c")
    private[2] = -1.0
    np.testing.assert_array_equal(read_rows(private, np.array([2])), private[[2]])


def test_two_pass_index_over_a_view_of_a_mapped_file_searches_the_view(tmp_path):
    corpus = unit_rows((3000, 16), seed=4)
    np.save(tmp_path / "c.npy", corpus)
    view = np.load(tmp_path / "c.npy", mmap_mode="r")[1000:]  # it searched file rows 0..1999
    queries = unit_rows((3, 16), seed=5)
    assert_same_top_k(TwoPassIndex(view).search(queries, 5), full_top_k(queries, corpus[1000:], 5))
    for chunk_rows in (0, -1, 1.5):  # -1 left its codes unwritten, 0 and 1.5 Python's errors
        with pytest.raises(
            ValueError, match=f"chunk_rows must be an integer >= 1, got {chunk_rows}"
        ):
            TwoPassIndex(corpus, chunk_rows=chunk_rows)


def test_xla_search_keeps_real_rows_when_scores_overflow_to_minus_infinity():
    """The running top k started as (-inf, row 0) and kept copies of row 0 against rows whose
    products overflow to -inf."""
    corpus = np.full((1000, 4), -3e38, np.float32)
    corpus[[5, 10, 950]] = 1.0
    queries = np.ones((1, 4), np.float32)
    _, indices = top_k_search(queries, corpus, 10, method="xla", block_size=300)
    assert np.asarray(indices)[0].tolist() == [5, 10, 950, 0, 1, 2, 3, 4, 6, 7]


def test_first_repeated_names_the_smallest_id_given_twice():
    assert first_repeated(np.array([7, 3, 9, 3, 7])) == 3
    assert first_repeated(np.array([5, 1, 2])) is None
    assert first_repeated(np.array([], np.int64)) is None
