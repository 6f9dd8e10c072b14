"""A user's feed from an artifacts folder: hash the history, retrieve from the corpus, rank the
retrieved posts, order them by a weighted score. The published pipeline's procedure on the
library's compiled paths.

Where it follows the published pipeline: the first S items of the history (S of the retrieval
config), left-aligned, with product surface 0; retrieval of the top K by dot product with the
user vector over the whole corpus; every retrieved post ranked; the feed ordered by
1.0 * favorite + 0.5 * reply + 0.3 * repost + 0.2 * dwell. Where it differs: hashing is
vectorised, embeddings are read from the split tables (no unified 1.5 GB copy), retrieval is
exact top-K in two passes (`search.TwoPassIndex`: a compact copy of the corpus searched first,
the best rows rescored in float32), and ranking is one compiled cached pass over all retrieved
posts. A ranker whose `config.json` says it was trained with right-anchored positions ranks
every candidate at the anchored position; otherwise candidate i sits at slot i mod
candidate_seq_len, as in the published pipeline's chunks, so the feed is the same.

The published pipeline picks the four weighted outputs by its own action enum (favorite 1,
reply 4, quote 5, repost 6, dwell 11, video quality view 13), which is not the order of
`ACTIONS`. A ranker whose `config.json` lists `action_names` (ours do) is weighted by those
names instead, and its probabilities are named by them; without them, the probabilities take the
enum's names where it has one and `output_<i>` elsewhere.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import runners
from checkpoint import (
    Artifacts,
    Corpus,
    ModelArtifacts,
    SequenceFile,
    check_new_folder,
    check_sequence_object,
    history_post_ids,
    param_shapes,
    read_history,
    read_request_time,
    warn_unknown_sequence_keys,
    write_artifacts,
)
from grok import TransformerConfig
from recsys_model import (
    ACTIONS,
    DWELL_TIME_COLUMN,
    HashConfig,
    PhoenixModelConfig,
    denormalize_continuous_value,
    is_integer,
    require_kind,
)
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from search import TwoPassIndex, read_rows
from tables import TABLE_NAMES, Hashing, hash_batch, init_tables, lookup

# The published pipeline's weights, by its own action enum (indices into the outputs).
PUBLISHED_ACTION_ENUM = {"favorite": 1, "reply": 4, "quote": 5, "repost": 6, "dwell": 11, "vqv": 13}
PUBLISHED_WEIGHTS = {"favorite": 1.0, "reply": 0.5, "repost": 0.3, "dwell": 0.2}
# The same weights by name, for rankers whose config.json names their actions.
NAMED_WEIGHTS = {"favorite_score": 1.0, "reply_score": 0.5, "repost_score": 0.3, "dwell_score": 0.2}


def score_weights(ranker: ModelArtifacts) -> dict[str, tuple[int, float]]:
    """{label: (output index, weight)} of the feed's weighted score."""
    require_kind(ranker, ModelArtifacts, "ranker")
    names = (ranker.json or {}).get("action_names")
    if names:
        missing = [name for name in NAMED_WEIGHTS if name not in names]
        if missing:
            raise ValueError(
                f"ranker/config.json lists action_names without {', '.join(missing)}, "
                "which the feed's score weights"
            )
        return {name: (list(names).index(name), w) for name, w in NAMED_WEIGHTS.items()}
    return {name: (PUBLISHED_ACTION_ENUM[name], w) for name, w in PUBLISHED_WEIGHTS.items()}


def output_names(ranker: ModelArtifacts) -> list[str]:
    """A name for each of the ranker's outputs: its config.json's `action_names`, or, for a
    folder without them, the published pipeline's enum names where it has one and
    `output_<i>` elsewhere (what the other outputs mean, such a folder does not say)."""
    require_kind(ranker, ModelArtifacts, "ranker")
    names = (ranker.json or {}).get("action_names")
    if names:
        return list(names)
    published = {i: name for name, i in PUBLISHED_ACTION_ENUM.items()}
    return [published.get(i, f"output_{i}") for i in range(ranker.config.num_actions)]


@dataclasses.dataclass
class FeedItem:
    rank: int
    post_id: int
    author_id: int
    topic: str | None
    retrieval_score: float  # user vector . candidate vector
    score: float  # the weighted score the feed is ordered by
    probabilities: dict[str, float]  # every output, by `output_names`
    # The second release's continuous head, each output in [0, 1] as the model gives it (an
    # output the ranker was not trained on means nothing); `dwell_seconds`, its dwell_time
    # output in seconds (the inverse of the ranker's normalisation of dwell times).
    continuous: dict[str, float] | None
    dwell_seconds: float | None


@dataclasses.dataclass
class Feed:
    user_id: int
    history_length: int
    items: list[FeedItem]
    weights: dict[str, tuple[int, float]]
    seconds: dict[str, float]  # hash, retrieve, rank
    retrieved: int  # posts retrieved and ranked
    not_served: int  # posts of the corpus the request could not be served (`_unservable`)


class Pipeline:
    """Serves feeds from loaded artifacts with the library's runners."""

    def __init__(self, artifacts: Artifacts):
        require_kind(artifacts, Artifacts, "artifacts", " (checkpoint.load_artifacts)")
        self.artifacts = artifacts
        retrieval, ranker = artifacts.retrieval, artifacts.ranker
        self.weights = score_weights(ranker)  # (a ranker without them is refused before work)
        self.output_names = output_names(ranker)
        self.retriever = runners.RecsysRetrievalInferenceRunner(
            runners.RetrievalModelRunner(retrieval.config), "retrieval"
        )
        self.retriever.initialize(retrieval.params)
        # The corpus stays where it is (memory-mapped); the index holds a compact copy.
        self.index = TwoPassIndex(artifacts.corpus.candidate_representations)
        self.ranker = runners.RecsysInferenceRunner(runners.ModelRunner(ranker.config), "ranker")
        self.ranker.initialize(ranker.params)

    def _history_inputs(self, model: ModelArtifacts, history):
        """Batch and embeddings of one user's history (no candidates), for `model`."""
        user_id, posts, authors, actions, dwell = history
        extra = {}
        if dwell is not None and isinstance(model.config, PhoenixModelConfig):
            continuous = np.zeros((1, len(posts), model.config.num_continuous_actions), np.float32)
            continuous[0, :, DWELL_TIME_COLUMN] = dwell
            extra["history_continuous_actions"] = continuous
        none = np.zeros((1, 0), np.int64)
        args = ([user_id], posts[None], authors[None], actions[None], none, none)
        batch = hash_batch(model.hashing, *args, **extra)
        return batch, lookup(model.tables, batch)

    def _with_candidates(self, model: ModelArtifacts, inputs, posts, authors, times=None):
        """`inputs` with candidates: ids [C], and (impression, creation) times [C] or None."""
        batch, embeddings = inputs
        post_hashes, author_hashes = (
            model.hashing.item(posts)[None],
            model.hashing.author(authors)[None],
        )
        batch = batch._replace(
            candidate_post_hashes=post_hashes,
            candidate_author_hashes=author_hashes,
            candidate_product_surface=np.zeros(post_hashes.shape[:2], np.int32),
        )
        if times is not None:
            batch = batch._replace(
                candidate_impr_ts=times[0][None], candidate_post_creation_ts=times[1][None]
            )
        items, authors_table = (model.tables[TABLE_NAMES[e]] for e in ("item", "author"))
        embeddings = dataclasses.replace(
            embeddings,
            candidate_post_embeddings=read_rows(items, post_hashes),
            candidate_author_embeddings=read_rows(authors_table, author_hashes),
        )
        return batch, embeddings

    def feed(
        self, sequence: Mapping[str, Any], top_k_retrieval: int = 200, top_k_display: int = 30
    ) -> Feed:
        """Retrieves `top_k_retrieval` posts for the sequence's user (all of them from a corpus
        that holds fewer), ranks them all and returns the best `top_k_display` by weighted score.
        A sequence with a request time is not served the posts `_unservable` names (fewer are
        retrieved if fewer remain; none left is a ValueError)."""
        corpus: Corpus = self.artifacts.corpus
        n = len(corpus.post_ids)
        check_sequence_object(sequence)
        if not isinstance(sequence, SequenceFile):  # (a file's were named when it was read)
            warn_unknown_sequence_keys(sequence, "sequence", stacklevel=3)
        if not (is_integer(top_k_retrieval) and top_k_retrieval >= 1):
            raise ValueError(f"top_k_retrieval must be an integer >= 1, got {top_k_retrieval!r}")
        if not (is_integer(top_k_display) and top_k_display >= 1):
            raise ValueError(f"top_k_display must be an integer >= 1, got {top_k_display!r}")
        retrieval, ranker = self.artifacts.retrieval, self.artifacts.ranker
        seconds = {}
        start = time.perf_counter()
        history = read_history(
            sequence, retrieval.config.history_seq_len, ranker.config.num_actions
        )
        request_time = read_request_time(sequence)
        batch, embeddings = self._history_inputs(retrieval, history)
        seconds["hash"] = time.perf_counter() - start

        start = time.perf_counter()
        user = self.retriever.encode_user(batch, embeddings)  # dispatched, not awaited:
        ranker_history = self._history_inputs(ranker, history)  # the host works meanwhile
        unservable = self._unservable(sequence, request_time)
        excluded = int(np.count_nonzero(unservable))
        retrieval_scores, indices = self._retrieve(
            user, unservable, excluded, min(top_k_retrieval, n)
        )
        if not len(indices):
            raise ValueError(
                f"no post of the corpus can be served at request_time {request_time}: all "
                f"{n:,} were created later or are in the history"
            )
        seconds["retrieve"] = time.perf_counter() - start

        start = time.perf_counter()
        candidates, probabilities, continuous = self._rank(ranker_history, indices, request_time)
        dwell = None
        if continuous is not None:
            norm = ranker.config.continuous_action_config
            dwell = np.asarray(denormalize_continuous_value(continuous[:, DWELL_TIME_COLUMN], norm))
        seconds["rank"] = time.perf_counter() - start

        weighted = sum(w * probabilities[:, i] for i, w in self.weights.values())
        order = np.argsort(-weighted, kind="stable")[:top_k_display]
        topics = corpus.topics
        items = [
            FeedItem(
                rank=rank,
                post_id=int(candidates[0][c]),
                author_id=int(candidates[1][c]),
                topic=None if topics is None else str(topics[indices[c]]),
                retrieval_score=float(retrieval_scores[c]),
                score=float(weighted[c]),
                probabilities=dict(zip(self.output_names, probabilities[c].tolist(), strict=True)),
                continuous=None
                if continuous is None
                else dict(zip(runners.CONTINUOUS_ACTIONS, continuous[c].tolist(), strict=False)),
                dwell_seconds=None if dwell is None else float(dwell[c]),
            )
            for rank, c in enumerate(order, start=1)
        ]
        return Feed(
            history[0],
            int(np.count_nonzero(history[1])),
            items,
            self.weights,
            seconds,
            len(indices),
            excluded,
        )

    def _retrieve(self, user, unservable: np.ndarray, excluded: int, top_k: int) -> tuple:
        """(retrieval scores, corpus rows) [K] of the best `top_k` servable posts for the user
        vector [1, D] (fewer if fewer are servable: `excluded` of `unservable` [N] are not),
        best first."""
        user = np.asarray(user, np.float32)
        n = len(unservable)
        # With posts left out, searched wider: by a margin of the same size for every request
        # (one compiled search), then, if too many of those were left out, by all of them.
        widths = (top_k, 2 * top_k + 64, top_k + excluded)
        for k in widths if excluded else widths[:1]:
            scores, indices = (x[0] for x in self.index.search(user, min(n, k)))
            kept = ~unservable[indices]
            if kept.sum() >= min(top_k, n - excluded):
                break
        return scores[kept][:top_k], indices[kept][:top_k]

    def _rank(self, ranker_history, indices: np.ndarray, request_time: int | None) -> tuple:
        """((post ids, author ids) [K], probabilities [K, A], continuous outputs [K, Nc] or
        None) of the corpus rows `indices`, ranked all at once with the ranker's history
        inputs."""
        corpus, ranker = self.artifacts.corpus, self.artifacts.ranker
        candidates = (np.asarray(corpus.post_ids)[indices], np.asarray(corpus.author_ids)[indices])
        times = None
        if request_time is not None and corpus.creation_times is not None:
            created = np.asarray(corpus.creation_times)[indices]
            times = (np.full(len(indices), request_time, np.int64), created)
        batch, embeddings = self._with_candidates(ranker, ranker_history, *candidates, times)
        slots = None
        if not ranker.config.right_anchored_rope:
            slots = np.arange(len(indices)) % ranker.config.candidate_seq_len
        ranking = self.ranker.rank(batch, embeddings, candidate_slots=slots)
        probabilities = np.asarray(ranking.scores)[0]
        continuous = ranking.continuous_preds
        continuous = None if continuous is None else np.asarray(continuous)[0]
        return candidates, probabilities, continuous

    def _unservable(self, sequence: Mapping[str, Any], request_time: int | None) -> np.ndarray:
        """[N] which posts of the corpus a request at `request_time` cannot serve: those
        created after it (when the corpus has creation times) and every post of its history
        (beyond the S items the models read too). For a sequence without a request time none:
        as published, every post can be served."""
        corpus = self.artifacts.corpus
        unservable = np.zeros(len(corpus.post_ids), bool)
        if request_time is None:
            return unservable
        if corpus.creation_times is not None:
            unservable |= np.asarray(corpus.creation_times) > request_time
        return unservable | np.isin(np.asarray(corpus.post_ids), history_post_ids(sequence))


# ---------------------------------------------------------------------------------------------
# An example artifacts folder: the published mini model's shapes, weights drawn from a seed.
# ---------------------------------------------------------------------------------------------

# The published mini model: D 128, 4 layers, 4 heads of 32, widening 2, history 127, 64
# candidates, 2 hashes per entity.
MINI_TRANSFORMER = TransformerConfig(
    128, 32, 4, 4, 4, widening_factor=2.0, attn_output_multiplier=0.125
)
MINI_HISTORY, MINI_CANDIDATES = 127, 64
EXAMPLE_TOPICS = (
    "football",
    "basketball",
    "tennis",
    "cricket",
    "cycling",
    "golf",
    "boxing",
    "rugby",
)
SNOWFLAKE_BASE = 1_700_000_000_000_000_000  # post ids of the size X's ids have


def mini_configs(
    fprop_dtype: Any = jnp.bfloat16,
) -> tuple[PhoenixRetrievalModelConfig, PhoenixModelConfig]:
    common = dict(
        model=MINI_TRANSFORMER,
        history_seq_len=MINI_HISTORY,
        candidate_seq_len=MINI_CANDIDATES,
        fprop_dtype=fprop_dtype,
        hash_config=HashConfig(),
    )
    return PhoenixRetrievalModelConfig(**common), PhoenixModelConfig(release=2, **common)


def encode_corpus(
    retriever: runners.RecsysRetrievalInferenceRunner,
    model: ModelArtifacts,
    post_ids: np.ndarray,
    author_ids: np.ndarray,
    chunk: int = 8192,
) -> np.ndarray:
    """Candidate-tower vectors [N, D] float32 of posts, `chunk` posts (or all, if fewer) per
    compiled call."""
    require_kind(retriever, runners.RecsysRetrievalInferenceRunner, "retriever")
    require_kind(model, ModelArtifacts, "model")
    post_ids, author_ids = np.asarray(post_ids), np.asarray(author_ids)
    for name, ids in (("post_ids", post_ids), ("author_ids", author_ids)):
        if ids.ndim != 1 or (ids.dtype.kind not in "iu" and ids.size):  # ([] is float64)
            raise ValueError(f"{name} must be integers [N], got {list(ids.shape)} {ids.dtype}")
        if ids.size and ids.min() < 1:  # 0 is padding
            raise ValueError(f"{name} must be ids >= 1 (0 is padding), got {ids.min()}")
    if author_ids.shape != post_ids.shape:
        raise ValueError(
            f"author_ids {list(author_ids.shape)} must be one per post, as post_ids "
            f"{list(post_ids.shape)}"
        )
    chunk = max(1, min(chunk, len(post_ids)))
    out = np.empty((len(post_ids), model.config.emb_size), np.float32)
    no_history = np.zeros((1, 1), np.int64)  # the candidate tower reads only the candidates
    for start in range(0, len(post_ids), chunk):
        stop = min(start + chunk, len(post_ids))
        posts, authors = np.zeros((2, 1, chunk), np.int64)  # the last chunk padded with 0
        posts[0, : stop - start], authors[0, : stop - start] = (
            post_ids[start:stop],
            author_ids[start:stop],
        )
        actions = np.zeros((1, 1, len(ACTIONS)), np.float32)
        batch = hash_batch(model.hashing, [1], no_history, no_history, actions, posts, authors)
        vectors = retriever.encode_candidates(batch, lookup(model.tables, batch))
        out[start:stop] = np.asarray(vectors[0, : stop - start], np.float32)
    return out


# Working memory of `write_example` per corpus post besides its vector (its ids drawn without
# replacement, topic, authors; 11.8 GB were resident on the way to 30,000,000 posts).
EXAMPLE_BYTES_PER_POST = 400


def write_example(
    directory: str | Path,
    seed: int = 0,
    corpus_size: int = 10_000,
    vocab_size: int = 10_000,
    history_length: int = 60,
    configs: tuple[PhoenixRetrievalModelConfig, PhoenixModelConfig] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> Path:
    """Writes a complete artifacts folder: the published mini model's retrieval and second-
    release ranker (or the two `configs`) with weights drawn from `seed`, tables of
    `vocab_size` rows, a corpus of `corpus_size` posts encoded by the retrieval model's
    candidate tower, and one user's sequence of `history_length` posts from the corpus.
    `say` is told what it is doing once the memory it needs is checked."""
    check_new_folder(directory)  # before any work
    for name, value, least in (
        ("seed", seed, 0),
        ("corpus_size", corpus_size, 1),
        ("vocab_size", vocab_size, 2),  # row 0 is padding
        ("history_length", history_length, 0),
    ):
        if not (is_integer(value) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    retrieval_config, ranker_config = configs or mini_configs()
    require_kind(retrieval_config, PhoenixRetrievalModelConfig, "configs[0]")
    require_kind(ranker_config, PhoenixModelConfig, "configs[1]")
    # The tables four times over: writing tables of 1,000,000 rows peaked at 3.6 GiB of
    # resident memory, 1.25 times three float32 copies of them.
    runners.check_memory(
        4 * 4 * vocab_size * (retrieval_config.emb_size + ranker_config.emb_size)
        + (4 * retrieval_config.emb_size + EXAMPLE_BYTES_PER_POST) * corpus_size,
        f"an example folder with tables of {vocab_size:,} rows and {corpus_size:,} posts",
    )
    say(
        f"Drawing both models' weights and tables of {vocab_size:,} rows, then encoding "
        f"{corpus_size:,} post{'s' * (corpus_size != 1)} with the retrieval model's candidate "
        "tower ..."
    )
    vocab = {"user": vocab_size, "item": vocab_size, "author": vocab_size}
    models = {}
    for i, (name, config) in enumerate(
        (("retrieval", retrieval_config), ("ranker", ranker_config))
    ):
        hashing = Hashing.random(config.hash_config, vocab, seed + i)
        params = runners.randomize_params(param_shapes(config), seed + i)
        tables = init_tables(hashing, config.emb_size, seed + i)
        models[name] = ModelArtifacts(config, params, tables, hashing)

    rng = np.random.default_rng(seed)
    post_ids = SNOWFLAKE_BASE + np.sort(rng.choice(10**15, corpus_size, replace=False)).astype(
        np.int64
    )
    num_authors = max(1, corpus_size // 20)
    author_pool = 1 + rng.choice(10**12, num_authors, replace=False).astype(np.int64)
    author_ids = author_pool[rng.integers(0, num_authors, corpus_size)]
    retriever = runners.RecsysRetrievalInferenceRunner(
        runners.RetrievalModelRunner(retrieval_config), "example"
    )
    retriever.initialize(models["retrieval"].params)
    corpus = Corpus(
        post_ids=post_ids,
        candidate_representations=encode_corpus(
            retriever, models["retrieval"], post_ids, author_ids
        ),
        author_ids=author_ids,
        topics=np.array(EXAMPLE_TOPICS)[rng.integers(0, len(EXAMPLE_TOPICS), corpus_size)],
        creation_times=runners.EXAMPLE_IMPRESSION_TIME
        - rng.integers(0, 4 * 24 * 3600, corpus_size),
    )
    sequence = example_sequence(corpus, history_length, rng)
    return write_artifacts(directory, models["retrieval"], models["ranker"], corpus, sequence)


def example_sequence(corpus: Corpus, history_length: int, rng: np.random.Generator) -> dict:
    """A random user's sequence of `history_length` corpus posts, each with a few actions."""
    seen = rng.choice(
        len(corpus.post_ids), min(history_length, len(corpus.post_ids)), replace=False
    )
    history = []
    for post in seen:
        actions = {str(a): 1.0 for a in np.flatnonzero(rng.random(len(ACTIONS)) < 0.15)}
        ids = {"post_id": int(corpus.post_ids[post]), "author_id": int(corpus.author_ids[post])}
        history.append({**ids, "actions": actions})
    return {"user_id": int(1 + rng.integers(0, 10**12)), "history": history}


def describe_feed(feed: Feed) -> list[str]:
    """The feed as the lines of a table."""
    require_kind(feed, Feed, "feed")
    widths = {label: max(8, len(label)) for label in feed.weights}
    header = (
        f"{'rank':>4}  {'post id':>19}  {'author id':>13}  {'topic':<12}  {'score':>6}  "
        + "  ".join(f"{label:>{width}}" for label, width in widths.items())
    )
    lines = [header, "-" * len(header)]
    for item in feed.items:
        values = list(item.probabilities.values())
        parts = "  ".join(
            f"{values[i]:{widths[label]}.3f}" for label, (i, _) in feed.weights.items()
        )
        topic = item.topic or "-"
        lines.append(
            f"{item.rank:>4}  {item.post_id:>19}  {item.author_id:>13}  {topic:<12}  "
            f"{item.score:6.3f}  {parts}"
        )
    return lines


def feed_to_json(feed: Feed) -> dict:
    """A feed as the JSON object `--output-json` writes."""
    require_kind(feed, Feed, "feed")
    return {
        "user_id": feed.user_id,
        "history_length": feed.history_length,
        "retrieved": feed.retrieved,
        "not_served": feed.not_served,
        "weights": {label: {"output": i, "weight": w} for label, (i, w) in feed.weights.items()},
        "items": [dataclasses.asdict(item) for item in feed.items],
    }
