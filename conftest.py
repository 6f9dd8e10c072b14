"""Helpers shared by the test files: tiny configurations, example inputs, random parameters and
the one brute-force top-K every search test compares with.

Every model under test runs with random non-zero parameters (`random_params`): the published
initialisation makes every logit 0, which would hide almost any mistake. Tiny configurations
keep compilation, which dominates the suite's time, short; compiled functions and parameters are
cached per configuration.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

import native_search
import runners
import train
import world as world_lib
from cli import reuse_freed_memory, run_main
from grok import TransformerConfig
from recsys_model import (
    ACTIONS,
    RELEASE_VARIABLE,
    HashConfig,
    PhoenixModelConfig,
    RecsysBatch,
    RecsysEmbeddings,
)
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from search import INF

# Compiling dominates the suite's time; two XLA settings shorten it, and no asserted result
# changes: LLVM's optimisation level 0 (XLA's own graph passes still run; about a third less),
# and XLA's older elemental emitters for fused loops instead of its newer MLIR ones, which halve
# what remains (at level 0, a training step of the tiny world compiles in 4 s instead of 7; in
# one run of the suite each worker spent 62 and 49 s in XLA's compiler, against 138 and 97 s
# with the newer emitters). JAX reads the flags when it starts its backend, at the first
# computation, after these imports; child processes (pytest's two workers, the notebook's
# kernel, the multi-device runs) inherit them.
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
# Programs that took a while to compile are kept on disk for the session, so that the two workers,
# the notebook's kernel and the multi-device processes reuse what another compiled (a child
# process that imports this file finds the folder already set and uses it; the process that made
# it removes it at exit).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="phoenix-suite-compiled-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"  # seconds
# This process imported JAX above, before the variables were set: the same settings directly.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
# Before the first computation, as train.py and benchmark.py do: each compiled call reuses the
# host memory the last one freed.
reuse_freed_memory()

# The two workers take whole test files in collection order: the longest go first (about 105,
# 50, 30, 25 and 25 seconds), so that one worker is not left with the longest file at the end.
LONGEST_FIRST = (
    "test_train.py",
    "test_notebook.py",
    "test_recsys_model.py",
    "test_runners.py",
    "test_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


# Hashes are drawn from [1, TABLE_SIZE); 0 is padding.
TABLE_SIZE = 50
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session", autouse=True)
def first_release_unless_named(request):
    """This suite names the release each test builds: in a session of its tests alone, a config
    that leaves it out is the first's, whatever the shell has set (the notebook's kernel and
    the child processes a test starts inherit this). A session that also runs tests of other
    folders, such as code written for the second release run with PHOENIX_RELEASE=2, keeps the
    variable."""
    ours = all(Path(item.path).resolve().parent == HERE for item in request.session.items)
    with pytest.MonkeyPatch.context() as patch:
        if ours:
            patch.delenv(RELEASE_VARIABLE, raising=False)
        yield


# Two float32 computations of the same quantity (dense vs cached, jit vs vmap) agree to this.
RTOL = 1e-5
ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Setup:
    """A hashable model configuration; compiled functions and parameters are cached on it."""

    emb_size: int = 8
    num_layers: int = 1
    num_q_heads: int = 2
    num_kv_heads: int = 1
    key_size: int = 4
    num_actions: int = len(ACTIONS)
    hashes: tuple[int, int, int] = (1, 2, 1)  # user, item, author
    vocab_size: int = 4
    multiplier: float = 0.5
    fprop_dtype: str = "float32"
    release: int = 1  # 2: the second release's ranker (its inputs are then in the examples)
    anchored: bool = False  # right-anchored rotary positions
    num_continuous: int = 3

    def transformer_config(self) -> TransformerConfig:
        heads = (self.num_q_heads, self.num_kv_heads, self.num_layers)
        return TransformerConfig(self.emb_size, self.key_size, *heads, 2.0, self.multiplier)

    def _common(self, history_len: int, num_candidates: int) -> dict:
        return dict(
            model=self.transformer_config(),
            emb_size=self.emb_size,
            history_seq_len=history_len,
            candidate_seq_len=num_candidates,
            fprop_dtype=jnp.dtype(self.fprop_dtype),
            hash_config=HashConfig(*self.hashes),
            product_surface_vocab_size=self.vocab_size,
        )

    def ranking_config(self, history_len: int = 4, num_candidates: int = 5) -> PhoenixModelConfig:
        return PhoenixModelConfig(
            num_actions=self.num_actions,
            num_continuous_actions=self.num_continuous,
            continuous_action_hidden_dim=4,
            right_anchored_rope=self.anchored,
            release=self.release,
            **self._common(history_len, num_candidates),
        )

    def retrieval_config(
        self, history_len: int = 4, num_candidates: int = 3
    ) -> PhoenixRetrievalModelConfig:
        return PhoenixRetrievalModelConfig(**self._common(history_len, num_candidates))


# Each example of a test over configurations compiles a model afresh (one to four seconds).
# Derandomised, so that the suite draws the same configurations, and takes the same time, on
# every run.
FEW_EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True)
SEEDS = st.integers(0, 2**31 - 1)


@st.composite
def setups(draw) -> Setup:
    """Small configurations: widths, layers, grouped-query layouts, hash counts, vocabularies."""
    num_kv_heads = draw(st.sampled_from([1, 2]))
    return Setup(
        emb_size=draw(st.sampled_from([8, 16])),
        num_layers=draw(st.sampled_from([1, 2])),
        num_q_heads=num_kv_heads * draw(st.sampled_from([1, 2])),
        num_kv_heads=num_kv_heads,
        key_size=draw(st.sampled_from([2, 4])),
        num_actions=draw(st.sampled_from([2, 3])),
        hashes=tuple(draw(st.integers(1, 3)) for _ in range(3)),
        vocab_size=draw(st.sampled_from([2, 5])),
    )


# D 16, two layers (the second reads cached keys computed from the first's outputs) and
# grouped-query attention (4 query heads over 2 key/value heads of 8), so that the cache layout
# is exercised.
SCALE_SETUP = Setup(16, 2, 4, 2, 8, hashes=(2, 2, 2), vocab_size=16, multiplier=0.125)


def example(
    setup: Setup, batch_size: int, history_len: int, num_candidates: int, seed: int = 0
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """A random batch (random padded history tail, all candidates valid) as numpy arrays."""
    return runners.create_example_batch(
        batch_size,
        setup.emb_size,
        history_len,
        num_candidates,
        setup.num_actions,
        *setup.hashes,
        product_surface_vocab_size=setup.vocab_size,
        num_user_embeddings=TABLE_SIZE,
        num_post_embeddings=TABLE_SIZE,
        num_author_embeddings=TABLE_SIZE,
        include_continuous_actions=setup.release == 2,
        include_timestamps=setup.release == 2,
        num_continuous_actions=setup.num_continuous,
        seed=seed,
    )


# The shapes of `fixed_example`: users, history, candidates.
B, S, C = 2, 4, 5


def fixed_example(seed: int = 0, padded_candidates=()) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Writable inputs of `Setup()` and shapes B, S, C whose listed candidates are padded."""
    batch, emb = copy_inputs(*example(Setup(), B, S, C, seed))
    batch.candidate_post_hashes[:, list(padded_candidates)] = 0
    return batch, emb


def copy_inputs(batch: RecsysBatch, emb: RecsysEmbeddings):
    """Writable numpy copies of every field."""
    batch = RecsysBatch(*(None if x is None else np.array(x) for x in batch))
    emb = jax.tree.map(np.array, emb)
    return batch, emb


def grow(x, axis: int) -> np.ndarray:
    """x with one more entry along `axis`."""
    return np.concatenate([x, np.take(x, [0], axis=axis)], axis=axis)


def random_params(init, *args, seed: int = 0) -> hk.Params:
    """Random non-zero parameters of the tree `init(rng, *args)` makes; only shapes are traced,
    nothing is compiled."""
    return runners.randomize_params(jax.eval_shape(init, jax.random.PRNGKey(0), *args), seed)


@functools.cache
def ranking_forward(setup: Setup) -> hk.Transformed:
    """The dense forward of a ModelRunner of `setup` (what its `runner.forward` is)."""
    return runners.ModelRunner(setup.ranking_config()).make_forward_fn()


@functools.cache
def ranking_params(setup: Setup, seed: int = 0) -> hk.Params:
    return random_params(ranking_forward(setup).init, *example(setup, 1, 1, 1), seed=seed)


@functools.cache
def _jit_logits(setup: Setup):
    forward = ranking_forward(setup)
    return jax.jit(lambda params, batch, emb: forward.apply(params, None, batch, emb).logits)


def dense_logits(setup: Setup, batch, emb, params: hk.Params | None = None) -> np.ndarray:
    """Logits [B, C, A] of the dense forward (compiled once per shape)."""
    params = ranking_params(setup) if params is None else params
    return np.asarray(_jit_logits(setup)(params, batch, emb))


def make_ranker(setup: Setup, params=None, **kwargs) -> runners.RecsysInferenceRunner:
    """An initialised ranking runner with `ranking_params(setup)` unless `params` is given."""
    ranker = runners.RecsysInferenceRunner(
        runners.ModelRunner(setup.ranking_config()), "test", **kwargs
    )
    ranker.initialize(params=ranking_params(setup) if params is None else params)
    return ranker


@functools.cache
def retrieval_params(setup: Setup, seed: int = 0) -> hk.Params:
    runner = runners.RetrievalModelRunner(setup.retrieval_config())
    runner.initialize()
    return runners.randomize_params(runner.param_shapes(setup.num_actions), seed)


# The tests of the native top-K kernel itself; the fallback and input checks run everywhere.
needs_kernel = pytest.mark.skipif(
    not native_search.available(), reason="the native kernel cannot be built on this machine"
)
# The corpus dtypes search takes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@pytest.fixture(scope="module")
def ranker() -> runners.RecsysInferenceRunner:
    """An initialised ranking runner of `Setup()`, one per test file (compiled once there)."""
    return make_ranker(Setup())


def make_retriever(setup: Setup, params=None) -> runners.RecsysRetrievalInferenceRunner:
    """An initialised retrieval runner with `retrieval_params(setup)` unless `params` is given."""
    retriever = runners.RecsysRetrievalInferenceRunner(
        runners.RetrievalModelRunner(setup.retrieval_config()), "test"
    )
    retriever.initialize(params=retrieval_params(setup) if params is None else params)
    return retriever


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def unit_rows(shape, seed: int) -> np.ndarray:
    x = normal(seed, shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def full_top_k(queries, corpus, k: int, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """`lax.top_k` of the full [B, N] score matrix: (scores [B, k] float32, indices [B, k]).

    Products in float64 rounded once to float32 (exact for the small integers some tests use);
    masked rows score -INF; a zero score is +0.0, since the sign of a zero sum is an accident of
    the order of summation and `lax.top_k` ranks -0.0 below +0.0.
    """
    with np.errstate(invalid="ignore"):  # NaN and infinite rows give NaN, as in XLA
        scores = np.asarray(queries, np.float64) @ np.asarray(corpus, np.float64).T
    scores = np.where(scores == 0, 0.0, scores).astype(np.float32)
    if mask is not None:
        scores = np.where(np.asarray(mask)[None, :], scores, np.float32(-INF))
    return tuple(np.asarray(x) for x in jax.lax.top_k(scores, k))


def assert_same_top_k(result, expected, atol: float = 1e-5) -> None:
    """Same indices, scores equal to float32 rounding."""
    (scores, indices), (want_scores, want_indices) = (
        map(np.asarray, r) for r in (result, expected)
    )
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)


def run_script(main, argv: list[str], capsys, prog: str = "script.py") -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a script's `main(argv)`, as `python prog argv` ends."""
    try:
        status = run_main(lambda: main(argv), prog)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    out = capsys.readouterr()
    return status, out.out, out.err


def start_with_devices(code: str, num_devices: int, *args: str) -> subprocess.Popen:
    """Starts `python -c code *args` in the repository with `num_devices` CPU devices, its
    output captured: it runs in a process of its own while this one goes on with other tests.
    `finish` collects it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={num_devices}"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=Path(__file__).resolve().parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_only(monkeypatch, folder: Path) -> None:
    """`os.access` says nothing in `folder`, or below it, may be written: a read-only place for
    a test run as root, who may write anywhere. Elsewhere (the suite's compilation cache) it
    answers as before."""
    access = os.access

    def answer(path, mode) -> bool:
        return folder not in (Path(path), *Path(path).parents) and access(path, mode)

    monkeypatch.setattr(os, "access", answer)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """(exit status, stdout, a report of all its output) of a process from
    `start_with_devices`; killed after `timeout` seconds."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    status = process.returncode
    return status, stdout, f"exit status {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"


BRIEF_RESULTS = ("start", "gradient", "trained")


def train_briefly(folder) -> dict[str, dict[str, np.ndarray]]:
    """Both models at the quick run's settings on the tiny world (but 62 global negatives for
    retrieval, which no even number of devices splits: every device holds them all), over every
    device of this process (`train.data_mesh`), by `BRIEF_RESULTS`: the parameters they start
    from, the loss's gradient on the first batch there, and the parameters after 3 steps; each
    by model and path. In the test process, with the ranker's step other tests compiled."""
    world = world_lib.build_world(world_lib.WorldConfig.tiny())
    mesh = train.data_mesh()
    results = {name: {} for name in BRIEF_RESULTS}
    for kind in train.MODELS:
        settings = dataclasses.replace(train.TrainConfig.quick(), steps=3, negatives=62)
        job = train.make_job(kind, world, settings)
        start = train.initial_state(kind, job.config, job.hashing, settings).params
        gradient = jax.jit(jax.grad(lambda params, arrays, job=job: job.loss(params, arrays)[0]))(
            train.place(start, mesh, split=False), train.place_batch(job.batch(0), mesh)
        )
        trained, _ = train.fit(job, Path(folder) / kind, quiet=True, mesh=mesh)
        for name, tree in zip(BRIEF_RESULTS, (start, gradient, trained.params), strict=True):
            leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
            results[name].update({kind + jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    return results


@pytest.fixture(scope="session")
def world() -> world_lib.World:
    """The tiny synthetic world (a few hundred posts, a few dozen users), built once."""
    return world_lib.build_world(world_lib.WorldConfig.tiny())
