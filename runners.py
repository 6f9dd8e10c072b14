"""Runners: initialise the models, JIT-compile them, rank and retrieve; example data.

`RecsysInferenceRunner.rank` encodes each user's history once and scores the candidates against
it in blocks (see `grok.Transformer.score_candidates`), so it takes any number of candidates.
`RecsysRetrievalInferenceRunner.retrieve` searches the corpus with `top_k_search` (in one pass
with the native kernel on the CPU, block by block in XLA elsewhere), and shard by shard when the
corpus is a `jax.Array` sharded along its rows over several devices.
All entry points are compiled once per input shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import TrainingState, TransformerConfig
from recsys_model import (
    HashConfig,
    PhoenixModelConfig,
    RecsysBatch,
    RecsysEmbeddings,
    validate_inputs,
)
from recsys_retrieval_model import (
    PhoenixRetrievalModelConfig,
    RetrievalOutput,
    sharded_top_k_search,
    validate_corpus,
)

__all__ = [
    "ACTIONS",
    "BaseInferenceRunner",
    "BaseModelRunner",
    "ModelRunner",
    "RankingOutput",
    "RecsysInferenceRunner",
    "RecsysRetrievalInferenceRunner",
    "RetrievalModelRunner",
    "RetrievalOutput",
    "create_dummy_batch_from_config",
    "create_dummy_embeddings_from_config",
    "create_example_batch",
    "create_example_corpus",
    "map_candidates",
    "randomize_params",
]

ACTIONS = [
    "favorite_score",
    "reply_score",
    "repost_score",
    "photo_expand_score",
    "click_score",
    "profile_click_score",
    "vqv_score",
    "share_score",
    "share_via_dm_score",
    "share_via_copy_link_score",
    "dwell_score",
    "quote_score",
    "quoted_click_score",
    "follow_author_score",
    "not_interested_score",
    "block_author_score",
    "mute_author_score",
    "report_score",
    "dwell_time",
]

# Candidates are ranked by the probability of this action.
RANKING_ACTION = ACTIONS.index("favorite_score")
# Candidates scored per compiled call of the cached ranking path.
DEFAULT_CANDIDATE_BLOCK = 1024

RankingOutput = NamedTuple(
    "RankingOutput",
    [("scores", jax.Array), ("ranked_indices", jax.Array)]
    + [(f"p_{action}", jax.Array) for action in ACTIONS],
)
RankingOutput.__doc__ = """Probabilities scores [B, C, A] (sigmoid of the logits, float32),
ranked_indices [B, C] (descending favorite probability, padded candidates last), and one field
p_<action> [B, C] per action of `ACTIONS`."""


def create_dummy_batch_from_config(
    hash_config: HashConfig,
    history_len: int,
    num_candidates: int,
    num_actions: int,
    batch_size: int = 1,
) -> RecsysBatch:
    """An all-zero batch of the given shapes (used to initialise parameters)."""
    b, s, c = batch_size, history_len, num_candidates
    return RecsysBatch(
        user_hashes=np.zeros((b, hash_config.num_user_hashes), np.int32),
        history_post_hashes=np.zeros((b, s, hash_config.num_item_hashes), np.int32),
        history_author_hashes=np.zeros((b, s, hash_config.num_author_hashes), np.int32),
        history_actions=np.zeros((b, s, num_actions), np.float32),
        history_product_surface=np.zeros((b, s), np.int32),
        candidate_post_hashes=np.zeros((b, c, hash_config.num_item_hashes), np.int32),
        candidate_author_hashes=np.zeros((b, c, hash_config.num_author_hashes), np.int32),
        candidate_product_surface=np.zeros((b, c), np.int32),
    )


def create_dummy_embeddings_from_config(
    hash_config: HashConfig,
    emb_size: int,
    history_len: int,
    num_candidates: int,
    batch_size: int = 1,
) -> RecsysEmbeddings:
    """All-zero embeddings of the given shapes."""
    b, s, c, d = batch_size, history_len, num_candidates, emb_size
    return RecsysEmbeddings(
        user_embeddings=np.zeros((b, hash_config.num_user_hashes, d), np.float32),
        history_post_embeddings=np.zeros((b, s, hash_config.num_item_hashes, d), np.float32),
        candidate_post_embeddings=np.zeros((b, c, hash_config.num_item_hashes, d), np.float32),
        history_author_embeddings=np.zeros((b, s, hash_config.num_author_hashes, d), np.float32),
        candidate_author_embeddings=np.zeros((b, c, hash_config.num_author_hashes, d), np.float32),
    )


def create_example_batch(
    batch_size: int,
    emb_size: int,
    history_len: int,
    num_candidates: int,
    num_actions: int,
    num_user_hashes: int = 2,
    num_item_hashes: int = 2,
    num_author_hashes: int = 2,
    product_surface_vocab_size: int = 16,
    num_user_embeddings: int = 100000,
    num_post_embeddings: int = 100000,
    num_author_embeddings: int = 100000,
    seed: int = 0,
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """A random, seeded batch: hashes in [1, table size), a random tail of each history padded
    with 0, about 30 % of action bits set, standard-normal embeddings (zero where padded)."""
    rng = np.random.default_rng(seed)
    b, s, c, d = batch_size, history_len, num_candidates, emb_size

    def hashes(shape, table_size):
        return rng.integers(1, table_size, size=shape, dtype=np.int64).astype(np.int32)

    # Each history keeps a random number of leading items (at least one) and pads the rest.
    lengths = rng.integers(1, s + 1, size=(b, 1)) if s else np.zeros((b, 1), np.int64)
    valid = np.arange(s)[None, :] < lengths  # [B, S]
    history_post = hashes((b, s, num_item_hashes), num_post_embeddings) * valid[..., None]
    history_author = hashes((b, s, num_author_hashes), num_author_embeddings) * valid[..., None]
    actions = (rng.random((b, s, num_actions)) < 0.3) & valid[..., None]
    batch = RecsysBatch(
        user_hashes=hashes((b, num_user_hashes), num_user_embeddings),
        history_post_hashes=history_post,
        history_author_hashes=history_author,
        history_actions=actions.astype(np.float32),
        history_product_surface=(
            rng.integers(0, product_surface_vocab_size, (b, s)) * valid
        ).astype(np.int32),
        candidate_post_hashes=hashes((b, c, num_item_hashes), num_post_embeddings),
        candidate_author_hashes=hashes((b, c, num_author_hashes), num_author_embeddings),
        candidate_product_surface=rng.integers(0, product_surface_vocab_size, (b, c)).astype(
            np.int32
        ),
    )

    def normal(shape, mask=None):
        x = rng.standard_normal(shape, dtype=np.float32)
        return x if mask is None else x * mask

    history_mask = valid[..., None, None].astype(np.float32)
    embeddings = RecsysEmbeddings(
        user_embeddings=normal((b, num_user_hashes, d)),
        history_post_embeddings=normal((b, s, num_item_hashes, d), history_mask),
        candidate_post_embeddings=normal((b, c, num_item_hashes, d)),
        history_author_embeddings=normal((b, s, num_author_hashes, d), history_mask),
        candidate_author_embeddings=normal((b, c, num_author_hashes, d)),
    )
    return batch, embeddings


def create_example_corpus(
    corpus_size: int, emb_size: int, seed: int = 123
) -> tuple[np.ndarray, np.ndarray]:
    """Random unit-norm corpus vectors [N, D] float32 and post ids arange(N)."""
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((corpus_size, emb_size), dtype=np.float32)
    corpus /= np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-6)
    return corpus, np.arange(corpus_size)


def randomize_params(params: hk.Params, seed: int) -> hk.Params:
    """Random non-zero parameters of the same tree: norm scales 1 + N(0, 0.1^2), every other
    array normal with variance 1 / (its first dimension). For demos and tests of an untrained
    model, whose published initialisation (zero norm scales) makes every logit 0."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(x.shape) / math.sqrt(x.shape[0]), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


class BaseModelRunner:
    """Holds a model configuration and builds its Haiku forward function."""

    def __init__(self, bs_per_device: float = 2.0, rng_seed: int = 42):
        self.bs_per_device = bs_per_device
        self.rng_seed = rng_seed
        self.batch_size: int | None = None
        self.forward: hk.Transformed | None = None

    def make_forward_fn(self) -> hk.Transformed:
        raise NotImplementedError

    def initialize(self) -> None:
        """Sets `batch_size` and builds `forward`.

        Unlike the published runner, this keeps the configured `fprop_dtype` (the published one
        silently forces bfloat16).
        """
        self.batch_size = max(1, int(self.bs_per_device * jax.local_device_count()))
        self.forward = self.make_forward_fn()

    def _require_initialized(self) -> None:
        if self.forward is None:
            raise ValueError(f"{type(self).__name__}.initialize() must be called first")


class ModelRunner(BaseModelRunner):
    """Runner of the ranking model (`PhoenixModelConfig`)."""

    def __init__(self, model: PhoenixModelConfig, bs_per_device: float = 2.0, rng_seed: int = 42):
        super().__init__(bs_per_device, rng_seed)
        self.model = model

    def make_forward_fn(self) -> hk.Transformed:
        """The dense forward: (batch, embeddings) -> RecsysModelOutput."""
        return hk.transform(lambda batch, embeddings: self.model.make()(batch, embeddings))

    def make_cached_fns(self) -> tuple[hk.Transformed, hk.Transformed]:
        """The cached path, sharing `forward`'s parameters: encode(batch, embeddings) -> KVCache
        and score(context, batch, embeddings, candidate_offset) -> RecsysModelOutput."""
        encode = hk.transform(lambda b, e: self.model.make().encode_context(b, e))
        score = hk.transform(
            lambda ctx, b, e, off: self.model.make().score_candidates(ctx, b, e, off)
        )
        return encode, score

    def init(
        self, rng: jax.Array, data: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> TrainingState:
        self._require_initialized()
        # Compiled: running the initialiser eagerly dispatches hundreds of small ops (~10 s).
        return TrainingState(jax.jit(self.forward.init)(rng, data, embeddings))

    def load_or_init(
        self, init_data: RecsysBatch, init_embeddings: RecsysEmbeddings
    ) -> TrainingState:
        return self.init(jax.random.PRNGKey(self.rng_seed), init_data, init_embeddings)


class RetrievalModelRunner(BaseModelRunner):
    """Runner of the retrieval model (`PhoenixRetrievalModelConfig`)."""

    def __init__(
        self, model: PhoenixRetrievalModelConfig, bs_per_device: float = 2.0, rng_seed: int = 42
    ):
        super().__init__(bs_per_device, rng_seed)
        self.model = model

    def make_forward_fn(self) -> hk.Transformed:
        """(batch, embeddings, corpus_embeddings, top_k, corpus_mask=None) -> RetrievalOutput.

        At `init` it also builds the candidate tower, so that every parameter is created.
        """

        def forward(batch, embeddings, corpus_embeddings, top_k, corpus_mask=None):
            model = self.model.make()
            if hk.running_init():
                model.build_candidate_representation(batch, embeddings)
            return model(batch, embeddings, corpus_embeddings, top_k, corpus_mask)

        return hk.transform(forward)

    def init(
        self,
        rng: jax.Array,
        data: RecsysBatch,
        embeddings: RecsysEmbeddings,
        corpus_embeddings: jax.Array,
        top_k: int,
    ) -> TrainingState:
        self._require_initialized()
        init = jax.jit(self.forward.init, static_argnums=4)
        return TrainingState(init(rng, data, embeddings, corpus_embeddings, top_k))

    def load_or_init(
        self,
        init_data: RecsysBatch,
        init_embeddings: RecsysEmbeddings,
        corpus_embeddings: jax.Array,
        top_k: int,
    ) -> TrainingState:
        rng = jax.random.PRNGKey(self.rng_seed)
        return self.init(rng, init_data, init_embeddings, corpus_embeddings, top_k)


class BaseInferenceRunner:
    """A named inference runner around a model runner."""

    def __init__(self, name: str):
        self.name = name
        self.params: hk.Params | None = None

    def _require_initialized(self) -> None:
        if self.params is None:
            raise ValueError(f"{type(self).__name__}.initialize() must be called first")


def _dummy_inputs(config, batch_size: int, num_actions: int):
    batch = create_dummy_batch_from_config(
        config.hash_config,
        config.history_seq_len,
        config.candidate_seq_len,
        num_actions,
        batch_size,
    )
    embeddings = create_dummy_embeddings_from_config(
        config.hash_config,
        config.emb_size,
        config.history_seq_len,
        config.candidate_seq_len,
        batch_size,
    )
    return batch, embeddings


def map_candidates(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, fn
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Applies `fn` to every candidate field ([B, C, ...] arrays); history fields are kept."""
    batch = batch._replace(
        candidate_post_hashes=fn(batch.candidate_post_hashes),
        candidate_author_hashes=fn(batch.candidate_author_hashes),
        candidate_product_surface=fn(batch.candidate_product_surface),
    )
    embeddings = dataclasses.replace(
        embeddings,
        candidate_post_embeddings=fn(embeddings.candidate_post_embeddings),
        candidate_author_embeddings=fn(embeddings.candidate_author_embeddings),
    )
    return batch, embeddings


def _slice_candidates(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, start: int, stop: int, size: int
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Candidates [start, stop) of every candidate field, padded (hash 0) to `size`."""

    def take(x):
        x = x[:, start:stop]
        pad = size - x.shape[1]
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x

    return map_candidates(batch, embeddings, take)


def _ranking_output(logits: jax.Array, candidate_mask: jax.Array) -> RankingOutput:
    """Probabilities and the ranking of [B, C, A] logits; padded candidates rank last."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    key = jnp.where(candidate_mask, scores[:, :, RANKING_ACTION], -jnp.inf)
    ranked = jnp.argsort(-key, axis=-1, stable=True)
    probabilities = [scores[:, :, i] for i in range(len(ACTIONS))]
    return RankingOutput(scores, ranked, *probabilities)


class RecsysInferenceRunner(BaseInferenceRunner):
    """Ranks candidates with a `ModelRunner`: `initialize()`, then `rank(batch, embeddings)`.

    `rank` takes any number of candidates. Each user's history is encoded once and candidates
    are scored against it `candidate_block_size` at a time, with the same logits as the dense
    forward (`runner.forward`). Compiled once per input shape.
    """

    def __init__(
        self,
        runner: ModelRunner,
        name: str,
        candidate_block_size: int = DEFAULT_CANDIDATE_BLOCK,
    ):
        super().__init__(name)
        self.runner = runner
        self.candidate_block_size = candidate_block_size

    def initialize(self, params: hk.Params | None = None) -> None:
        """Initialises parameters (or takes `params`) and compiles lazily on first use."""
        runner = self.runner
        config = runner.model
        if config.num_actions < len(ACTIONS):
            raise ValueError(
                f"num_actions is {config.num_actions}, but RankingOutput has a field for each of "
                f"the {len(ACTIONS)} ACTIONS; rank needs num_actions >= {len(ACTIONS)}"
            )
        runner.initialize()
        if params is None:
            batch, embeddings = _dummy_inputs(config, runner.batch_size, config.num_actions)
            params = runner.load_or_init(batch, embeddings).params
        self.params = params
        encode, score = runner.make_cached_fns()

        def rank_block(params, batch, embeddings):
            context = encode.apply(params, None, batch, embeddings)
            logits = score.apply(params, None, context, batch, embeddings, 0).logits
            return _ranking_output(logits, batch.candidate_post_hashes[:, :, 0] != 0)

        self._rank_block = jax.jit(rank_block)
        self._encode = jax.jit(encode.apply)
        self._score = jax.jit(lambda *args: score.apply(*args).logits)
        self._finish = jax.jit(_ranking_output)

    def rank(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> RankingOutput:
        self._require_initialized()
        config = self.runner.model
        sizes = validate_inputs(batch, embeddings, config, config.num_actions)
        num_candidates, block = sizes["C"], self.candidate_block_size
        if num_candidates <= block:
            return self._rank_block(self.params, batch, embeddings)
        context = self._encode(self.params, None, batch, embeddings)
        logits = []
        for start in range(0, num_candidates, block):
            stop = min(start + block, num_candidates)
            part = _slice_candidates(batch, embeddings, start, stop, block)
            logits.append(self._score(self.params, None, context, *part, start)[:, : stop - start])
        mask = jnp.asarray(batch.candidate_post_hashes)[:, :, 0] != 0
        return self._finish(jnp.concatenate(logits, axis=1), mask)


class RecsysRetrievalInferenceRunner(BaseInferenceRunner):
    """Encodes users and candidates and retrieves top-K posts from a corpus."""

    def __init__(self, runner: RetrievalModelRunner, name: str):
        super().__init__(name)
        self.runner = runner
        self.corpus_embeddings: jax.Array | None = None
        self.corpus_post_ids: np.ndarray | None = None

    def initialize(self, params: hk.Params | None = None) -> None:
        runner = self.runner
        runner.initialize()
        config = runner.model
        if params is None:
            # The retrieval config has no num_actions; the published demo uses 19.
            batch, embeddings = _dummy_inputs(config, runner.batch_size, len(ACTIONS))
            corpus = np.zeros((1, config.emb_size), np.float32)
            params = runner.load_or_init(batch, embeddings, corpus, 1).params
        self.params = params

        def model_method(method):
            return hk.transform(lambda *args: getattr(config.make(), method)(*args)).apply

        user = model_method("build_user_representation")
        candidates = model_method("build_candidate_representation")
        self._encode_user = jax.jit(lambda p, b, e: user(p, None, b, e)[0])
        self._encode_candidates = jax.jit(lambda p, b, e: candidates(p, None, b, e)[0])

    def _validate(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> None:
        self._require_initialized()
        num_actions = self.params["phoenix_retrieval_model"]["action_projection"].shape[0]
        validate_inputs(batch, embeddings, self.runner.model, num_actions)

    def encode_user(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> jax.Array:
        """Unit user vectors [B, D]."""
        self._validate(batch, embeddings)
        return self._encode_user(self.params, batch, embeddings)

    def encode_candidates(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> jax.Array:
        """Unit candidate vectors [B, C, D]."""
        self._validate(batch, embeddings)
        return self._encode_candidates(self.params, batch, embeddings)

    def set_corpus(self, corpus_embeddings: Any, corpus_post_ids: Any | None = None) -> None:
        """Keeps a corpus [N, D] (float32 or bfloat16; a `jax.Array` may be sharded along N)
        and its post ids [N] (default arange(N))."""
        validate_corpus(corpus_embeddings, self.runner.model.emb_size, 1)
        n = jnp.shape(corpus_embeddings)[0]
        ids = np.arange(n) if corpus_post_ids is None else np.asarray(corpus_post_ids)
        if ids.shape != (n,):
            raise ValueError(f"corpus_post_ids has shape {ids.shape}, expected [N={n}]")
        if not isinstance(corpus_embeddings, jax.Array):
            corpus_embeddings = jnp.asarray(corpus_embeddings)
        self.corpus_embeddings = corpus_embeddings
        self.corpus_post_ids = ids

    def retrieve(
        self,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        top_k: int = 100,
        corpus_embeddings: Any | None = None,
    ) -> RetrievalOutput:
        """Top-K corpus rows for each user: indices into the corpus and their scores [B, K].

        Map indices to post ids with `corpus_post_ids[top_k_indices]`.
        """
        self._validate(batch, embeddings)
        corpus = self.corpus_embeddings if corpus_embeddings is None else corpus_embeddings
        if corpus is None:
            raise ValueError("no corpus: call set_corpus() or pass corpus_embeddings")
        validate_corpus(corpus, self.runner.model.emb_size, top_k)
        user = self._encode_user(self.params, batch, embeddings)
        scores, indices = sharded_top_k_search(user, corpus, int(top_k))
        return RetrievalOutput(user, indices, scores)


# Demo configuration of both scripts (SPEC section 5).
DEMO_EMB_SIZE = 128
DEMO_HISTORY_LEN = 32
DEMO_NUM_CANDIDATES = 8
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def demo_transformer_config() -> TransformerConfig:
    return TransformerConfig(
        emb_size=DEMO_EMB_SIZE,
        key_size=64,
        num_q_heads=2,
        num_kv_heads=2,
        num_layers=2,
        widening_factor=2,
        attn_output_multiplier=0.125,
    )


class DemoArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: `prog: error: message`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)  # argparse type: an integer >= 1
non_negative_int = _int_at_least(0)  # argparse type: an integer >= 0


def run_demo(main: Callable[[], int], prog: str) -> int:
    """Runs a demo's `main`; input it refuses (ValueError) and sizes that do not fit in memory
    end in one line on stderr and exit status 2, as argparse's errors do. Output piped into a
    reader that stops early (`| head`) ends quietly."""
    try:
        return main()
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so that the exit flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as error:
        message = str(error)
    except MemoryError as error:
        message = f"not enough memory for the sizes asked for ({error})"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def demo_argument_parser(description: str) -> DemoArgumentParser:
    """The flags both demo scripts take."""
    parser = DemoArgumentParser(description=description)
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of weights and data (0)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=2, help="users (2)")
    parser.add_argument(
        "--history-len", type=positive_int, default=DEMO_HISTORY_LEN, help="history length (32)"
    )
    parser.add_argument(
        "--candidates", type=positive_int, default=DEMO_NUM_CANDIDATES, help="per user (8)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="(float32)")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs (10)")
    return parser


def demo_inputs(inference_runner: BaseInferenceRunner, args: argparse.Namespace):
    """Initialises a demo runner with random weights (seed `args.seed`) and returns an example
    (batch, embeddings) of the sizes the flags ask for."""
    inference_runner.initialize()
    inference_runner.params = randomize_params(inference_runner.params, seed=args.seed)
    return create_example_batch(
        args.batch_size,
        DEMO_EMB_SIZE,
        args.history_len,
        args.candidates,
        len(ACTIONS),
        seed=args.seed,
    )


def timed(fn, repeats: int) -> tuple[Any, float, float]:
    """Runs fn once (compiling it), then `repeats` times: (result, first seconds, median s)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return result, first, float(np.median(times))
