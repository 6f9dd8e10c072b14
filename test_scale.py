"""Scale: ranking any number of candidates, searching large corpora, on one and many devices.

Properties tested, each against the plain computation it replaces:
- `RecsysInferenceRunner.rank` (context encoded once, candidates scored in blocks) gives the
  probabilities and the order of the dense masked forward (`runner.forward.apply`, the published
  path) for candidate counts below, at and above the block size, and for 10,000 candidates;
- `top_k_search` and `sharded_top_k_search` (blocked scoring with a running top-k) return
  `lax.top_k` of the full score matrix, with a corpus mask and with a bfloat16 corpus;
- with four (simulated) devices, a corpus sharded along N and a ranking batch sharded along B
  give the one-device results, and the ranking stays sharded along B (data-parallel).

Models are float32 and run under random non-zero parameters: a freshly initialised ranker
returns logit 0 everywhere and would hide any mistake.
"""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runners
from grok import TransformerConfig
from recsys_model import PhoenixModelConfig, RecsysBatch, RecsysEmbeddings
from recsys_retrieval_model import (
    INF,
    PhoenixRetrievalModelConfig,
    sharded_top_k_search,
    top_k_search,
)

EMB_SIZE = 16
HISTORY_LEN = 8
NUM_ACTIONS = len(runners.ACTIONS)
# Float32 agreement of two computations of the same probabilities (values in (0, 1)).
PROB_ATOL = 1e-5
SCORE_ATOL = 1e-5

# Small blocks so that a few candidates already cover every case of the block loop.
SMALL_BLOCK = 4
SMALL_COUNTS = (1, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 3 * SMALL_BLOCK + 2)
LARGE_COUNT = 10_000

NUM_DEVICES = 4


def tiny_transformer() -> TransformerConfig:
    """Two layers (the second reads cached keys computed from the first's outputs), grouped-query
    attention (4 query heads over 2 key/value heads) so that the cache layout is exercised."""
    return TransformerConfig(
        emb_size=EMB_SIZE,
        key_size=8,
        num_q_heads=4,
        num_kv_heads=2,
        num_layers=2,
        widening_factor=2,
        attn_output_multiplier=0.125,
    )


def make_ranking_model(seed: int = 0) -> tuple[runners.ModelRunner, hk.Params]:
    """A float32 ranker and random non-zero parameters for it."""
    config = PhoenixModelConfig(
        model=tiny_transformer(),
        emb_size=EMB_SIZE,
        num_actions=NUM_ACTIONS,
        history_seq_len=HISTORY_LEN,
        candidate_seq_len=SMALL_BLOCK,
        fprop_dtype=jnp.float32,
    )
    runner = runners.ModelRunner(config)
    runner.initialize()
    batch = runners.create_dummy_batch_from_config(config.hash_config, HISTORY_LEN, 1, NUM_ACTIONS)
    embeddings = runners.create_dummy_embeddings_from_config(
        config.hash_config, EMB_SIZE, HISTORY_LEN, 1
    )
    # Only the shapes of the parameter tree are needed: randomize_params draws every value.
    shapes = jax.eval_shape(runner.forward.init, jax.random.PRNGKey(0), batch, embeddings)
    return runner, runners.randomize_params(shapes, seed)


def make_ranker(runner, params, block: int) -> runners.RecsysInferenceRunner:
    ranker = runners.RecsysInferenceRunner(runner, "scale", candidate_block_size=block)
    ranker.initialize(params)
    return ranker


def example_inputs(
    batch_size: int, num_candidates: int, padded: tuple[tuple[int, int], ...] = (), seed: int = 0
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Random inputs (histories of random length); candidates (b, c) in `padded` get hash 0."""
    batch, embeddings = runners.create_example_batch(
        batch_size, EMB_SIZE, HISTORY_LEN, num_candidates, NUM_ACTIONS, seed=seed
    )
    if padded:
        hashes = np.array(batch.candidate_post_hashes)
        for b, c in padded:
            hashes[b, c] = 0
        batch = batch._replace(candidate_post_hashes=hashes)
    return batch, embeddings


def select_candidates(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, index: np.ndarray
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """The inputs restricted to the candidates `index` (in that order), history unchanged."""
    return runners.map_candidates(batch, embeddings, lambda x: np.asarray(x)[:, index])


def dense_probabilities(runner, params, batch, embeddings) -> np.ndarray:
    """sigmoid of the dense masked forward's logits [B, C, A], as the published runner runs it."""
    logits = jax.jit(runner.forward.apply)(params, None, batch, embeddings).logits
    return np.asarray(jax.nn.sigmoid(logits.astype(jnp.float32)))


def dense_forward_at_slots(runner) -> Callable[..., np.ndarray]:
    """(params, batch, embeddings, slots) -> probabilities [B, C, A] of the dense forward for
    candidates that sit at slots `slots` [C] of a longer candidate list.

    `PhoenixModel.__call__` unchanged, except that its transformer receives explicit rotary
    positions (user and history 0 .. S, candidate i at 1 + S + slots[i]): the dense masked
    forward of a 10,000-candidate list costs (1 + S + C)^2 attention pairs, far too many for a
    unit test, while by candidate isolation each candidate's output depends only on the context,
    its own content and its position.
    """
    config = runner.model

    def forward(batch, embeddings, slots):
        model = config.make()
        transformer = model.model
        context_len = 1 + config.history_seq_len
        positions = jnp.concatenate(
            [jnp.arange(context_len, dtype=jnp.float32), context_len + slots.astype(jnp.float32)]
        )[None, :]

        def with_positions(tokens, mask, candidate_start_offset):
            return transformer(tokens, mask, candidate_start_offset, positions=positions)

        model.model = with_positions
        return jax.nn.sigmoid(model(batch, embeddings).logits.astype(jnp.float32))

    apply = jax.jit(hk.transform(forward).apply)
    return lambda params, *inputs: np.asarray(apply(params, None, *inputs))


def reference_order(probabilities: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Descending favorite probability, padded candidates last, ties by index."""
    key = np.where(valid, probabilities[:, :, runners.RANKING_ACTION], -np.inf)
    return np.argsort(-key, axis=-1, kind="stable")


def assert_ranked(ranked: np.ndarray, probabilities: np.ndarray, valid: np.ndarray) -> None:
    """`ranked` orders each row's candidates by descending favorite probability, up to float32
    noise (exact order is ill-defined for near-ties among thousands), padded candidates last."""
    num_candidates = probabilities.shape[1]
    for row, p, ok in zip(ranked, probabilities[:, :, runners.RANKING_ACTION], valid, strict=True):
        np.testing.assert_array_equal(np.sort(row), np.arange(num_candidates))
        assert not np.any(np.diff(ok[row].astype(int)) > 0), "a padded candidate ranks above"
        in_order = p[row][ok[row]]
        assert np.all(np.diff(in_order) <= PROB_ATOL), "ranked order is not descending"


# ---------------------------------------------------------------------------------------------
# Ranking: the cached path against the dense forward.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranking_model():
    return make_ranking_model()


@pytest.fixture(scope="module")
def small_block_ranker(ranking_model):
    return make_ranker(*ranking_model, SMALL_BLOCK)


@pytest.fixture(scope="module")
def dense_at_slots(ranking_model):
    return dense_forward_at_slots(ranking_model[0])


@pytest.fixture(scope="module")
def small_reference(ranking_model):
    """Inputs with the largest small count of candidates (two padded) and their dense forward."""
    runner, params = ranking_model
    count = max(SMALL_COUNTS)
    batch, embeddings = example_inputs(2, count, padded=((0, 2), (1, count - 2)), seed=1)
    return batch, embeddings, dense_probabilities(runner, params, batch, embeddings)


@pytest.mark.parametrize("num_candidates", SMALL_COUNTS)
def test_cached_rank_equals_dense_forward(small_block_ranker, small_reference, num_candidates):
    """Probabilities and order of `rank` equal the dense forward's for C around the block size.

    The dense reference is computed once for the longest list: by candidate isolation the dense
    forward of its first C candidates is the first C rows of it (positions match; checked by
    the next test).
    """
    batch, embeddings, dense = small_reference
    index = np.arange(num_candidates)
    batch, embeddings = select_candidates(batch, embeddings, index)
    dense = dense[:, index]
    valid = np.asarray(batch.candidate_post_hashes)[:, :, 0] != 0

    out = small_block_ranker.rank(batch, embeddings)

    np.testing.assert_allclose(np.asarray(out.scores), dense, rtol=0, atol=PROB_ATOL)
    np.testing.assert_array_equal(np.asarray(out.ranked_indices), reference_order(dense, valid))
    for i, action in enumerate(runners.ACTIONS):
        np.testing.assert_array_equal(getattr(out, f"p_{action}"), np.asarray(out.scores)[:, :, i])


def test_dense_forward_of_first_candidates_is_a_prefix(ranking_model, small_reference):
    """The dense forward of the first candidates alone gives the same probabilities as within
    the full list (candidate isolation, positions unchanged)."""
    runner, params = ranking_model
    batch, embeddings, dense = small_reference
    index = np.arange(SMALL_BLOCK + 1)
    prefix = dense_probabilities(runner, params, *select_candidates(batch, embeddings, index))
    np.testing.assert_allclose(prefix, dense[:, index], rtol=0, atol=PROB_ATOL)


def test_explicit_slots_reproduce_the_dense_forward(ranking_model, small_reference, dense_at_slots):
    """`dense_forward_at_slots` with the candidates' own slots is the published dense forward,
    and with shifted slots it is not: the reference of the next test does depend on position."""
    params = ranking_model[1]
    batch, embeddings, dense = small_reference
    slots = np.arange(dense.shape[1])
    np.testing.assert_allclose(
        dense_at_slots(params, batch, embeddings, slots), dense, rtol=0, atol=PROB_ATOL
    )
    shifted = dense_at_slots(params, batch, embeddings, slots + LARGE_COUNT // 2)
    assert np.max(np.abs(shifted - dense)) > 100 * PROB_ATOL


def test_cached_rank_equals_dense_forward_for_10000_candidates(ranking_model, dense_at_slots):
    """10,000 candidates with the default block size (several blocks, the last one partial),
    against the dense forward of the first 64 candidates, of the candidates on either side of
    every block boundary and of random ones, each at its own position."""
    runner, params = ranking_model
    padded = ((0, 5000), (1, LARGE_COUNT - 1))
    batch, embeddings = example_inputs(2, LARGE_COUNT, padded=padded, seed=2)
    valid = np.asarray(batch.candidate_post_hashes)[:, :, 0] != 0
    ranker = runners.RecsysInferenceRunner(runner, "scale")  # default candidate_block_size
    ranker.initialize(params)
    block = ranker.candidate_block_size
    assert 2 * block < LARGE_COUNT and LARGE_COUNT % block

    out = ranker.rank(batch, embeddings)

    boundaries = [c for start in range(block, LARGE_COUNT, block) for c in (start - 1, start)]
    rng = np.random.default_rng(0)
    slots = np.unique(
        np.concatenate(
            [
                np.arange(64),
                boundaries,
                rng.choice(LARGE_COUNT, 64, replace=False),
                [c for _, c in padded],
                [LARGE_COUNT - 1],
            ]
        )
    )
    dense = dense_at_slots(params, *select_candidates(batch, embeddings, slots), slots)
    scores = np.asarray(out.scores)
    np.testing.assert_allclose(scores[:, slots], dense, rtol=0, atol=PROB_ATOL)
    assert_ranked(np.asarray(out.ranked_indices), scores, valid)


# ---------------------------------------------------------------------------------------------
# Retrieval: blocked search against lax.top_k over the full score matrix.
# ---------------------------------------------------------------------------------------------

CORPUS_SIZE = 1000


def unit_rows(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def full_top_k(queries, corpus, k, corpus_mask=None):
    """lax.top_k of the full [B, N] float32 score matrix, masked rows at -INF."""
    scores = jnp.dot(jnp.asarray(queries, jnp.float32), jnp.asarray(corpus).astype(jnp.float32).T)
    if corpus_mask is not None:
        scores = jnp.where(corpus_mask[None, :], scores, -INF)
    return jax.lax.top_k(scores, k)


def assert_same_top_k(result, expected):
    scores, indices = (np.asarray(x) for x in result)
    expected_scores, expected_indices = (np.asarray(x) for x in expected)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=SCORE_ATOL)


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
def test_top_k_search_equals_full_top_k(block_size, k, masked, dtype):
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


# ---------------------------------------------------------------------------------------------
# Many devices: four simulated CPU devices, in a subprocess (the device count is fixed when JAX
# starts). The subprocess imports this file and runs `multi_device_checks`.
# ---------------------------------------------------------------------------------------------

MULTI_DEVICE_PARTS = ("sharded_corpus", "sharded_batch")
MULTI_DEVICE_TIMEOUT = 300  # seconds


def make_retrieval_runner(seed: int = 0) -> runners.RecsysRetrievalInferenceRunner:
    config = PhoenixRetrievalModelConfig(
        model=tiny_transformer(),
        emb_size=EMB_SIZE,
        history_seq_len=HISTORY_LEN,
        fprop_dtype=jnp.float32,
    )
    runner = runners.RetrievalModelRunner(config)
    runner.initialize()
    batch = runners.create_dummy_batch_from_config(config.hash_config, HISTORY_LEN, 1, NUM_ACTIONS)
    embeddings = runners.create_dummy_embeddings_from_config(
        config.hash_config, EMB_SIZE, HISTORY_LEN, 1
    )
    corpus = np.zeros((1, EMB_SIZE), np.float32)
    shapes = jax.eval_shape(
        lambda b, e, c: runner.forward.init(jax.random.PRNGKey(0), b, e, c, 1),
        batch,
        embeddings,
        corpus,
    )
    retriever = runners.RecsysRetrievalInferenceRunner(runner, "scale")
    retriever.initialize(runners.randomize_params(shapes, seed))
    return retriever


def check_sharded_corpus(mesh) -> None:
    """A corpus sharded along N is searched shard by shard with the one-device result (the
    exact `lax.top_k` of the full scores, which the one-device search equals: tested above)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = NamedSharding(mesh, P("x", None))
    retriever = make_retrieval_runner()
    batch, embeddings = example_inputs(3, 1, seed=3)
    corpus = jnp.asarray(unit_rows((4096, EMB_SIZE), seed=6))
    sharded = jax.device_put(corpus, rows)
    assert len(sharded.sharding.device_set) == NUM_DEVICES
    out = retriever.retrieve(batch, embeddings, top_k=50, corpus_embeddings=sharded)
    expected = full_top_k(retriever.encode_user(batch, embeddings), corpus, 50)
    assert_same_top_k((out.top_k_scores, out.top_k_indices), expected)

    # bfloat16, with a mask, and with k larger than a shard (each shard returns all its rows).
    queries = unit_rows((4, EMB_SIZE), seed=7)
    corpus = jnp.asarray(unit_rows((64, EMB_SIZE), seed=8), jnp.bfloat16)
    mask = jnp.asarray(np.random.default_rng(9).random(64) < 0.7)
    result = sharded_top_k_search(
        queries,
        jax.device_put(corpus, rows),
        k=20,
        corpus_mask=jax.device_put(mask, NamedSharding(mesh, P("x"))),
    )
    assert_same_top_k(result, full_top_k(queries, corpus, 20, mask))


def check_sharded_batch(mesh) -> None:
    """A ranking batch sharded along B ranks data-parallel, with the one-device result."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    by_user = NamedSharding(mesh, P("x"))
    ranker = make_ranker(*make_ranking_model(), SMALL_BLOCK)
    for num_candidates in (SMALL_BLOCK - 1, 2 * SMALL_BLOCK + 1):  # one block, several blocks
        batch, embeddings = example_inputs(2 * NUM_DEVICES, num_candidates, seed=4)
        one = ranker.rank(batch, embeddings)
        many = ranker.rank(*jax.device_put((batch, embeddings), by_user))
        np.testing.assert_allclose(
            np.asarray(many.scores), np.asarray(one.scores), rtol=0, atol=PROB_ATOL
        )
        np.testing.assert_array_equal(np.asarray(many.ranked_indices), one.ranked_indices)
        for name in ("scores", "ranked_indices"):
            sharding = getattr(many, name).sharding
            assert sharding.is_equivalent_to(by_user, getattr(many, name).ndim), (name, sharding)


def multi_device_checks() -> int:
    """Runs every multi-device check; prints `PASS <part>` or the failure. Exit status."""
    import traceback

    from jax.sharding import Mesh

    devices = jax.devices()
    if len(devices) != NUM_DEVICES:
        print(f"expected {NUM_DEVICES} devices, got {devices}", file=sys.stderr)
        return 2
    mesh = Mesh(np.array(devices), ("x",))
    status = 0
    for part in MULTI_DEVICE_PARTS:
        try:
            globals()[f"check_{part}"](mesh)
            print(f"PASS {part}", flush=True)
        except Exception:
            print(f"FAIL {part}", flush=True)
            traceback.print_exc()
            status = 1
    return status


@pytest.fixture(scope="module", autouse=True)
def multi_device_process():
    """Starts the four-device subprocess with the module, so that it runs (on another core)
    while the one-device tests do; `multi_device_run` collects it."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    code = "import sys, test_scale; sys.exit(test_scale.multi_device_checks())"
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def multi_device_run(multi_device_process):
    """(exit status, stdout, stderr) of the four-device subprocess."""
    try:
        stdout, stderr = multi_device_process.communicate(timeout=MULTI_DEVICE_TIMEOUT)
    except subprocess.TimeoutExpired:
        multi_device_process.kill()
        stdout, stderr = multi_device_process.communicate()
        stderr += f"\n(killed after {MULTI_DEVICE_TIMEOUT} s)"
    return multi_device_process.returncode, stdout, stderr


@pytest.mark.parametrize("part", MULTI_DEVICE_PARTS)
def test_multi_device_equals_one_device(multi_device_run, part):
    status, stdout, stderr = multi_device_run
    report = f"exit status {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert f"PASS {part}" in stdout.splitlines(), report
    assert status == 0, report
