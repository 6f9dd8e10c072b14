"""Exact top-K search of a corpus by dot product, on one device or sharded over many.

`top_k_search(queries, corpus, k)` returns what `lax.top_k(queries @ corpus.T, k)` returns
(ties to the lower row, scores equal to float32 rounding) without ever holding the [B, N] score
matrix. On the CPU it runs the one-pass kernel of `native_search`; elsewhere, or when asked, it
scores the corpus block by block with XLA and keeps a running top-K. `sharded_top_k_search`
searches a corpus sharded along its rows shard by shard and merges the results.

Shapes: B queries, N corpus rows, D width, K top-K.
"""

from __future__ import annotations

import functools
import math
import mmap
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import native_search
from grok import is_integer

INF = 1e12  # masked corpus entries score -INF

# `top_k_search` holds the scores of at most this many (user, post) pairs at once (128 MiB)
# and reads at most this many corpus rows per block. Blocks pay a fixed cost each on CPU
# (loop step, merge), so fewer, larger blocks are faster: for 256 users of 1M posts, 1.9 s
# with 2**24 scores per block, 1.5 s with 2**25, 1.3 s with 2**26; 2**25 keeps the peak
# memory of that search under the corpus plus 0.8 GB.
SEARCH_BLOCK_ELEMENTS = 2**25
SEARCH_BLOCK_ROWS = 2**20
# `top_k_search` first ranks groups of this many consecutive posts by their best score.
SEARCH_GROUP_SIZE = 128


def _merge_top_k(
    scores: jax.Array, indices: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:  # [B, M] each -> [B, k] each
    top_scores, where = jax.lax.top_k(scores, k)
    return top_scores, jnp.take_along_axis(indices, where, axis=-1)


def _block_top_k(
    scores: jax.Array, start: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:  # [R, B] scores of rows start .. start+R -> [B, k] each
    """Exact top-k of a block of scores, in two stages.

    A post in the top k lies in one of the k groups with the largest maxima (a group ranked
    below k others has k better posts), so only those k * SEARCH_GROUP_SIZE posts are ranked.
    The groups are taken in row order, so that ties resolve as in `lax.top_k`.
    """
    r, b = scores.shape
    num_groups = r // SEARCH_GROUP_SIZE
    if num_groups <= 2 * k:
        rows = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (b, r))
        return _merge_top_k(scores.T, start + rows, k)
    main = num_groups * SEARCH_GROUP_SIZE
    group_max = jnp.max(scores[:main].reshape(num_groups, SEARCH_GROUP_SIZE, b), axis=1)
    _, groups = jax.lax.top_k(group_max.T, k)  # [B, k]
    groups = jnp.sort(groups, axis=1)
    within = jnp.arange(SEARCH_GROUP_SIZE, dtype=jnp.int32)
    rows = (groups[:, :, None] * SEARCH_GROUP_SIZE + within).reshape(b, -1)
    # Rows after the last whole group are always candidates.
    rest = jnp.arange(main, r, dtype=jnp.int32)
    rows = jnp.concatenate([rows, jnp.broadcast_to(rest, (b, r - main))], axis=1)
    candidates = scores[rows, jnp.arange(b)[:, None]]  # [B, k * group + rest]
    return _merge_top_k(candidates, start + rows, k)


SEARCH_METHODS = ("auto", "native", "xla")
NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # corpus dtypes of the kernel


def first_repeated(ids: np.ndarray):
    """The smallest value that `ids` [N] holds more than once, or None: a corpus's post ids must
    be distinct, since a post found twice would fill two places of a top-K."""
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return repeated[0] if len(repeated) else None


def require_arrays(**named) -> None:
    """Raises TypeError naming the first value that is not an array (a list, say)."""
    for name, x in named.items():
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{name} must be an array (numpy or JAX), got {type(x).__name__}")


def check_search(queries, corpus, k: int, corpus_mask) -> None:
    """The checks of `top_k_search` and `sharded_top_k_search`: arrays [B, D] and [N, D] of
    one D, a floating corpus, k in [1, N], a mask [N] of truth values, and queries free of NaN
    and infinity (a read of [B, D]; the corpus is checked once, by `validate_corpus`, where it
    is kept). Values inside `jax.jit` are not at hand and not checked."""
    require_arrays(queries=queries, corpus=corpus)
    if jnp.ndim(queries) != 2 or jnp.ndim(corpus) != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"queries {jnp.shape(queries)} and corpus {jnp.shape(corpus)} must be [B, D] and "
            "[N, D] with the same D"
        )
    if corpus_mask is not None:
        require_arrays(corpus_mask=corpus_mask)
        if jnp.dtype(corpus_mask.dtype).kind not in "biuf":
            raise TypeError(
                f"corpus_mask must be bool (False: never retrieved), got {corpus_mask.dtype}"
            )
    check_top_k(corpus.shape[0], k, corpus_mask, "k")
    if not jnp.issubdtype(corpus.dtype, jnp.floating):
        raise ValueError(f"corpus must be floating, got {jnp.dtype(corpus.dtype)}")
    row = first_non_finite_row(queries)
    if row is not None:
        raise ValueError(f"queries row {row} holds NaN or infinity; expected finite values")


def top_k_search(
    queries: jax.Array,  # [B, D]
    corpus: jax.Array,  # [N, D], float32 or bfloat16
    k: int,
    corpus_mask: jax.Array | None = None,  # [N] bool, False = never retrieved
    block_size: int | None = None,
    method: str = "auto",
    threads: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of queries · corpusᵀ: (scores, indices) [B, k], best first.

    Equal to `lax.top_k` over the full [B, N] score matrix (up to the order of tied scores and
    float32 rounding), without ever holding that matrix. Scores are computed in float32
    whatever the corpus dtype. Masked entries score -INF (-1e12, as published): a valid row
    scoring below that (only with |query| · |row| beyond 1e12) would rank after them.

    `method`:
    - "xla": score `block_size` rows at a time with XLA's matrix product and keep a running
      top-k (any backend);
    - "native": the fused CPU kernel of `native_search` (one pass over the corpus, all cores);
      raises RuntimeError if it cannot be built here;
    - "auto" (default): "native" on the CPU when it is available, `block_size` is not given,
      and it is faster (a bfloat16 corpus, or more than one query; one float32 query is a
      matrix-vector product, already as fast as a read of the corpus in XLA); else "xla".
      The kernel was tuned and measured on an AVX-512 CPU; elsewhere pass method="xla" if it
      is faster (`benchmark.py` compares the two).
    `threads` (native only) caps the kernel's threads; 0 = one per core.

    The queries are checked for NaN and infinity; the corpus is not (a check would read it
    once more, as much as the search itself): a corpus kept for many searches is checked once
    by `validate_corpus`, as the retrieval runner's `set_corpus` does. Unchecked, a row holding
    NaN scores NaN, which `lax.top_k` and the kernel both rank first.
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
    check_search(queries, corpus, k, corpus_mask)
    if block_size is not None and not (is_integer(block_size) and block_size >= 1):
        raise ValueError(f"block_size must be an integer >= 1 or None, got {block_size!r}")
    if not (is_integer(threads) and 0 <= threads < 2**31):
        raise ValueError(
            f"threads must be an integer in [0, 2**31) (0: one per core), got {threads!r}"
        )
    block_size = None if block_size is None else int(block_size)  # shapes: Python integers
    threads = int(threads)
    if method == "native" and jnp.dtype(corpus.dtype) not in NATIVE_DTYPES:
        raise ValueError(
            f'method="native" needs a float32 or bfloat16 corpus, got {jnp.dtype(corpus.dtype)}'
        )
    if method == "native" and not native_search.available():
        raise RuntimeError(
            'the native top-k search cannot be built here (see the warning above); use method="xla"'
        )
    if method == "auto":
        method = auto_search_method(queries, corpus, block_size)
    if method == "native":
        if corpus_mask is None:
            corpus_mask = jnp.ones(corpus.shape[0], jnp.bool_)
        return jax.lax.platform_dependent(
            queries,
            corpus,
            corpus_mask,
            cpu=lambda q, c, m: native_search.top_k(q, c, m, k, -INF, threads),
            default=lambda q, c, m: _blocked_top_k(q, c, k, m, block_size),
        )
    return _blocked_top_k(queries, corpus, k, corpus_mask, block_size)


def auto_search_method(queries: jax.Array, corpus: jax.Array, block_size: int | None = None) -> str:
    """The method `top_k_search(..., method="auto")` uses for these arguments."""
    if block_size is not None or jax.default_backend() != "cpu":
        return "xla"
    if jnp.dtype(corpus.dtype) not in NATIVE_DTYPES or queries.dtype == jnp.float64:
        return "xla"
    if corpus.dtype == jnp.float32 and queries.shape[0] == 1:
        return "xla"
    return "native" if native_search.available() else "xla"


def _blocked_top_k(
    queries: jax.Array,  # [B, D]
    corpus: jax.Array,  # [N, D]
    k: int,
    corpus_mask: jax.Array | None,  # [N] bool
    block_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    """The "xla" method of `top_k_search`: blocks of `block_size` rows, running top-k."""
    num_queries, n = queries.shape[0], corpus.shape[0]
    if block_size is None:
        block_size = min(SEARCH_BLOCK_ROWS, SEARCH_BLOCK_ELEMENTS // max(num_queries, 1))
    block_size = max(k, min(block_size, n))
    # Equal blocks: the last one, shifted back to end at N, then re-scores few rows.
    block_size = max(k, math.ceil(n / math.ceil(n / block_size)))
    queries = queries.astype(jnp.float32)

    def block_top_k(start: jax.Array, first_new: jax.Array | None = None):
        rows = jax.lax.dynamic_slice_in_dim(corpus, start, block_size)
        # Corpus-major [block, B]: the large operand is read in its stored layout.
        scores = jnp.dot(rows.astype(jnp.float32), queries.T)
        idx = start + jnp.arange(block_size, dtype=jnp.int32)
        if corpus_mask is not None:
            keep = jax.lax.dynamic_slice_in_dim(corpus_mask, start, block_size)
            scores = jnp.where(keep[:, None], scores, -INF)
        if first_new is not None:
            # The last block is shifted back to end at N; rows it shares with the block
            # before are dropped so that no post is counted twice.
            scores = jnp.where((idx >= first_new)[:, None], scores, -jnp.inf)
        return _block_top_k(scores, start, k)

    num_blocks = math.ceil(n / block_size)
    if num_blocks == 1:
        return block_top_k(jnp.int32(0))

    def step(carry, block):
        best_scores, best_idx = carry
        start = jnp.minimum(block * block_size, n - block_size)
        scores, idx = block_top_k(start, block * block_size)
        merged = _merge_top_k(
            jnp.concatenate([best_scores, scores], axis=1),
            jnp.concatenate([best_idx, idx], axis=1),
            k,
        )
        return merged, None

    # The running top k starts as the first block's (block_size >= k): k real rows, which
    # keep their place against later rows of equal score, even of -inf (a product that
    # overflows), where a start of (-inf, row 0) entries would have kept copies of row 0.
    init = block_top_k(jnp.int32(0))
    blocks = jnp.arange(1, num_blocks, dtype=jnp.int32)
    (scores, idx), _ = jax.lax.scan(step, init, blocks)
    return scores, idx


@functools.partial(jax.jit, static_argnames=("k", "mesh", "axis"))
def _search_shards(queries, corpus, corpus_mask, k, mesh, axis):
    # Devices of this host share its cores: each shard's kernel gets its part of them.
    here = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    threads = max(1, usable_cores() // here) if here > 1 else 0

    def local(queries, corpus, corpus_mask):
        scores, indices = top_k_search(
            queries, corpus, min(k, corpus.shape[0]), corpus_mask, threads=threads
        )
        indices = indices + jax.lax.axis_index(axis) * corpus.shape[0]  # global row numbers
        scores = jax.lax.all_gather(scores, axis, axis=1, tiled=True)
        indices = jax.lax.all_gather(indices, axis, axis=1, tiled=True)
        return _merge_top_k(scores, indices, k)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis, None), P(axis)),
        out_specs=(P(), P()),
        check_vma=False,
    )(queries, corpus, corpus_mask)


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def sharded_top_k_search(
    queries: jax.Array,  # [B, D]
    corpus: jax.Array,  # [N, D]
    k: int,
    corpus_mask: jax.Array | None = None,  # [N] bool
) -> tuple[jax.Array, jax.Array]:
    """`top_k_search`, run shard by shard when `corpus` is a `jax.Array` sharded along N.

    Each device searches its own rows; the per-shard top-k are gathered and merged into the
    exact global top-k. Works unchanged across hosts after `jax.distributed.initialize()`.
    """
    check_search(queries, corpus, k, corpus_mask)  # against all N rows, not a shard's
    sharding = getattr(corpus, "sharding", None)
    row_axis = sharding.spec[0] if isinstance(sharding, NamedSharding) and sharding.spec else None
    if row_axis is None or sharding.num_devices == 1:
        return _search_one_device(queries, corpus, corpus_mask, k=k)
    shards = math.prod(
        sharding.mesh.shape[a] for a in (row_axis if isinstance(row_axis, tuple) else (row_axis,))
    )
    if corpus.shape[0] % shards:
        raise ValueError(
            f"corpus of {corpus.shape[0]} rows cannot be split evenly over {shards} shards"
        )
    if corpus_mask is None:
        corpus_mask = jax.device_put(
            jnp.ones(corpus.shape[0], jnp.bool_), NamedSharding(sharding.mesh, P(row_axis))
        )
    return _search_shards(queries, corpus, corpus_mask, k=k, mesh=sharding.mesh, axis=row_axis)


_search_one_device = jax.jit(
    lambda queries, corpus, corpus_mask, k: top_k_search(queries, corpus, k, corpus_mask),
    static_argnames=("k",),
)


def _mapped_file(array) -> tuple[str, int, int] | None:
    """(file, offset, bytes per row) of a C-contiguous 2-D array that is a whole memory map of
    its file's rows, else None: a view of one (a slice, say) carries its parent's offset, and
    a copy-on-write map ("c") may hold what the file does not."""
    mapped = isinstance(array, np.memmap) and array.filename and array.ndim == 2
    if not mapped or not array.flags.c_contiguous or array.mode == "c":
        return None
    if not isinstance(array.base, mmap.mmap):  # a view of the map, not the map
        return None
    return array.filename, array.offset, array.shape[1] * array.itemsize


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """array[rows] ([..., D] from [N, D]). From a memory-mapped file the rows are read with
    positioned reads, which leave the mapping untouched: a page fault maps a whole large folio
    (up to megabytes) into the process, so that lookups would slowly bring a file of gigabytes
    into its resident memory."""
    mapped = _mapped_file(array)
    if mapped is None:
        # Indexing, not np.take: np.take copies an unaligned array (as mapped from an npz)
        # whole first (6 ms for 100,000 rows, against 7 us).
        return array[rows]
    filename, offset, row_bytes = mapped
    rows, n = np.asarray(rows), len(array)
    if rows.dtype.kind not in "iu":  # as indexing would refuse them (bool masks too, here)
        raise IndexError(f"rows must be integers, got {rows.dtype}")
    if rows.size and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"rows must lie in [-{n}, {n}), got [{rows.min()}, {rows.max()}]")
    unique, inverse = np.unique(np.where(rows < 0, rows + n, rows), return_inverse=True)
    out = np.empty((len(unique), array.shape[1]), array.dtype)
    if not native_search.read_rows(filename, offset, row_bytes, unique, out):
        buffer = out.view(np.uint8).reshape(len(unique), row_bytes)
        fd = os.open(filename, os.O_RDONLY)
        try:
            for i, row in enumerate(unique.tolist()):
                os.preadv(fd, [buffer[i]], offset + row * row_bytes)
        finally:
            os.close(fd)
    return out[inverse.reshape(np.shape(rows))]


def read_block(array, start: int, stop: int) -> np.ndarray:
    """array[start:stop], read (not mapped) from a memory-mapped file."""
    mapped = _mapped_file(array)
    if mapped is None:
        return np.asarray(array[start:stop])
    filename, offset, row_bytes = mapped
    out = np.empty((max(0, min(stop, len(array)) - start), array.shape[1]), array.dtype)
    with open(filename, "rb") as f:
        f.seek(offset + start * row_bytes)
        f.readinto(out.view(np.uint8).reshape(-1))
    return out


class TwoPassIndex:
    """Exact top-k over a float32 corpus kept on the host (a memory-mapped file, say), searched
    in two passes: a compact copy of the corpus is searched for the best k + margin rows, then
    those rows are rescored in float32.

    The compact copy: on the CPU with the native kernel, int8 codes with a scale per row (a
    quarter of the bytes; `native_search.top_k_int8`); elsewhere bfloat16 (half the bytes;
    `top_k_search` on the device).

    Exact, not approximate: a row's first-pass score lies within a bound e of its float32 score
    (`error_bounds`: from the copy's largest rounding error, by Cauchy-Schwarz), so a row left
    out of the first pass scores at most the last kept first-pass score plus e; when the k-th
    rescored score beats that by more than e, the rescored rows hold the exact top k. When it
    does not (many rows within e of the k-th), the query's first pass is widened `WIDEN` times,
    and if that is still not enough, the query is searched in full, in float32, on the host.
    Scores are equal to float32 rounding, ties go to the lower row, as in `top_k_search`.
    """

    # Relative error of rounding to bfloat16 (8 significant bits), with room for the float32
    # sums of the first pass.
    BFLOAT16_ERROR = 2.0**-8 * (1 + 1e-3)
    WIDEN = 8

    def __init__(self, corpus: np.ndarray, chunk_rows: int = 1 << 16, int8: bool | None = None):
        """`int8`: the int8 copy (default: where the native kernel runs) or bfloat16. The
        corpus is kept as given, not copied (a memory-mapped file stays on disk): the compact
        copy is made here, so a corpus changed afterwards needs a new index."""
        if not (is_integer(chunk_rows) and chunk_rows >= 1):
            raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        if not hasattr(corpus, "shape"):
            corpus = np.asarray(corpus)
        dtype = np.asarray(corpus[:0]).dtype if np.ndim(corpus) else np.asarray(corpus).dtype
        if np.ndim(corpus) != 2 or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"corpus must be a floating [N, D] array, got {dtype} {list(np.shape(corpus))}"
            )
        if 0 in corpus.shape:
            raise ValueError(f"corpus is empty ({list(corpus.shape)}): there is nothing to search")
        # Asked for (or left to choose) int8 codes: the native kernel, built and registered here.
        native = int8 is not False and jax.default_backend() == "cpu" and native_search.available()
        if int8 and not native:
            raise ValueError(
                "int8=True needs the native kernel, which does not run here (a CPU backend and "
                "a C++ compiler); leave int8 unset to use bfloat16"
            )
        int8 = native if int8 is None else int8
        self.corpus = corpus
        n, d = corpus.shape
        coarse = np.empty((n, d), np.int8 if int8 else jnp.bfloat16)
        scales = np.empty(n, np.float32)
        self.max_norm = self.max_error = self.max_coded_norm = 0.0
        for start in range(0, n, chunk_rows):  # in chunks: no float32 copy
            rows = read_block(corpus, start, start + chunk_rows).astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if len(bad):
                raise ValueError(f"corpus row {start + bad[0]} is not finite")
            self.max_norm = max(self.max_norm, _largest_norm(rows))
            if not int8:
                coarse[start : start + chunk_rows] = rows.astype(jnp.bfloat16)
                continue
            scale = np.abs(rows).max(axis=1, initial=0.0) / 127
            codes = np.rint(rows / np.where(scale > 0, scale, 1)[:, None])
            coarse[start : start + chunk_rows] = np.clip(codes, -127, 127)
            scales[start : start + chunk_rows] = scale
            coded = codes * scale.astype(np.float64)[:, None]
            self.max_error = max(self.max_error, _largest_norm(rows - coded))
            self.max_coded_norm = max(self.max_coded_norm, _largest_norm(coded))
        self.coarse = jnp.asarray(coarse)
        self.scales = jnp.asarray(scales) if int8 else None
        self.widened = 0  # queries whose first pass was widened so far
        self.fallbacks = 0  # queries searched in full so far

    def error_bounds(self, queries: np.ndarray) -> np.ndarray:
        """[B]: how far a row's first-pass score may lie from its float32 score, for each query.
        int8: |q| |x - x'| + |q - q'| |x'| (x' the coded row, q' the query as the kernel rounds
        it); bfloat16: 2**-8 |q| |x|; both with the float32 sums' rounding (2 D 2**-24 |q| |x|)."""
        norms = np.linalg.norm(queries.astype(np.float64), axis=1)
        width = queries.shape[1]
        sums = 2 * width * 2.0**-24 * norms * max(self.max_norm, self.max_coded_norm)
        if self.scales is None:
            return self.BFLOAT16_ERROR * norms * self.max_norm + sums + 1e-6
        step = np.abs(queries).max(axis=1) / native_search.query_levels(width)
        rounding = np.sqrt(width) * step / 2 * (1 + 1e-3)
        return norms * self.max_error + rounding * self.max_coded_norm + sums + 1e-6

    def _first_pass(self, queries: np.ndarray, taken: int) -> tuple[np.ndarray, np.ndarray]:
        queries = jnp.asarray(queries)
        if self.scales is None:
            found = _search_one_device(queries, self.coarse, None, k=taken)
        else:
            found = _int8_first_pass(queries, self.coarse, self.scales, k=taken)
        return tuple(np.asarray(x) for x in found)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices) [B, k] float32 and int32, best first."""
        queries = np.asarray(queries, np.float32)
        n = len(self.corpus)
        check_top_k(n, k, None, "k")
        if queries.ndim != 2 or queries.shape[1] != self.corpus.shape[1]:
            raise ValueError(
                f"queries must be [B, {self.corpus.shape[1]}], got shape {queries.shape}"
            )
        if not np.isfinite(queries).all():
            raise ValueError("queries must be finite")
        if not len(queries):  # no queries: nothing to find, as top_k_search answers
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        largest = float(np.linalg.norm(queries.astype(np.float64), axis=1).max()) * self.max_norm
        if largest > float(np.finfo(np.float32).max) / 2:
            raise ValueError(
                f"queries and corpus rows this large (|q| |x| up to {largest:.3g}) overflow "
                "float32 scores"
            )
        taken = min(n, 2 * k + 64)
        first_scores, first_rows = self._first_pass(queries, taken)
        bounds = self.error_bounds(queries)
        scores = np.empty((len(queries), k), np.float32)
        indices = np.empty((len(queries), k), np.int32)
        for b, query in enumerate(queries):
            found = self._rescore(query, first_scores[b], first_rows[b], k, bounds[b])
            if found is None:
                self.widened += 1
                wider = min(n, self.WIDEN * taken)
                wide_scores, wide_rows = self._first_pass(query[None], wider)
                found = self._rescore(query, wide_scores[0], wide_rows[0], k, bounds[b])
            if found is None:
                self.fallbacks += 1
                exact = np.concatenate(
                    [
                        read_block(self.corpus, s, s + 65536).astype(np.float32) @ query
                        for s in range(0, n, 65536)
                    ]
                )
                found = _best(exact, np.arange(n), k)
            scores[b], indices[b] = found
        return scores, indices

    def _rescore(self, query, first_scores, rows, k: int, bound: float):
        """(scores, rows) of the best k of `rows` in float32, or None when the first pass
        (its scores `first_scores`, best first) may have left out a better row."""
        exact, best = _best(read_rows(self.corpus, rows).astype(np.float32) @ query, rows, k)
        if len(rows) < len(self.corpus) and not exact[-1] > first_scores[-1] + bound:
            return None
        return exact, best


def _best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, rows), by score, then by row."""
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


def _largest_norm(rows: np.ndarray) -> float:
    return float(np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1).max(initial=0.0)))


_int8_first_pass = jax.jit(native_search.top_k_int8, static_argnames=("k", "threads"))


def validate_corpus(
    corpus: jax.Array, emb_size: int, top_k: int, corpus_mask: jax.Array | None = None
) -> None:
    """Raises ValueError unless corpus is [N, emb_size], floating and finite, 1 <= top_k <= N,
    and the mask [N].

    Finiteness is checked when the values are at hand (not inside jit, not on other hosts): a
    NaN row would otherwise be every user's best match, as `lax.top_k` ranks NaN first. It is a
    read of the whole corpus, so keep a corpus with `set_corpus` rather than passing it anew.
    """
    if not hasattr(corpus, "shape"):
        raise TypeError(
            "corpus_embeddings must be an array [N, D] (numpy or JAX), got a "
            + type(corpus).__name__
        )
    if not is_integer(emb_size):
        raise TypeError(f"emb_size must be an integer, got {emb_size!r}")
    shape = jnp.shape(corpus)
    if len(shape) != 2 or shape[1] != emb_size:
        raise ValueError(f"corpus_embeddings has shape {shape}, expected [N, D={emb_size}]")
    dtype = getattr(corpus, "dtype", None)
    if dtype is None or not jnp.issubdtype(np.dtype(dtype), jnp.floating):  # (objects too)
        raise ValueError(f"corpus_embeddings must be floating, got {dtype}")
    if shape[0] == 0:
        raise ValueError("corpus_embeddings is empty (N=0): there is nothing to retrieve")
    check_top_k(shape[0], top_k, corpus_mask, "top_k")
    row = first_non_finite_row(corpus)
    if row is not None:
        values = np.asarray(corpus[row])
        if np.isfinite(values).all():  # float64, beyond float32's range: infinite as JAX holds it
            raise ValueError(
                f"corpus_embeddings row {row} holds values beyond float32's range (a magnitude "
                f"of {np.abs(values).max():.3g}); JAX holds them as infinite"
            )
        raise ValueError(
            f"corpus_embeddings row {row} holds {values[:4]}...; "
            "expected finite values (a NaN row would be every user's top match)"
        )


@jax.jit
def _first_non_finite_row(x: jax.Array) -> jax.Array:
    bad = ~jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
    return jnp.where(jnp.any(bad), jnp.argmax(bad), -1)


def first_non_finite_row(x) -> int | None:
    """Index along the first axis of the first entry holding NaN or infinity; None if there is
    none, or if the values are not at hand (a tracer inside jit, or an array partly held by
    other hosts)."""
    if isinstance(x, jax.core.Tracer) or np.size(x) == 0:
        return None
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and not jax.config.jax_enable_x64:
        with np.errstate(over="ignore"):  # as JAX will hold it: float32, where a value beyond
            x = jnp.asarray(x)  # float32's range is infinite
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
        row = int(_first_non_finite_row(x))
        return None if row < 0 else row
    x = np.asarray(x)
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def check_top_k(
    n: int, k: int, corpus_mask: jax.Array | None = None, k_name: str = "top_k"
) -> None:
    """Raises ValueError unless k is an integer in [1, n] and the mask, if any, is [n]."""
    if not is_integer(k) or not 1 <= k <= n:
        if getattr(k, "ndim", 0):  # an array (a corpus in k's place?): its shape, not its values
            got = f"an array of shape {list(k.shape)}, {k.dtype}"
        elif isinstance(k, numbers.Number | str) or hasattr(k, "dtype"):
            got = repr(k)
        else:
            got = type(k).__name__
        raise ValueError(f"{k_name} must be in [1, N={n}] (an integer), got {got}")
    if corpus_mask is not None and jnp.shape(corpus_mask) != (n,):
        raise ValueError(f"corpus_mask has shape {jnp.shape(corpus_mask)}, expected [N={n}]")
