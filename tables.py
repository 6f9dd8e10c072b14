"""Ids to hashes (the published hash functions), embedding tables, and lookups into inputs.

A user, post or author id becomes H hashes, each a row of that entity's embedding table: for
an id x != 0, hash j is ((x * scale_j + bias_j) mod modulus) mod (vocab - 1) + 1, computed in
int64 (wrapping on overflow, as the published code does), and id 0 hashes to 0 (padding). The
published pipeline loops over ids in Python and copies the three tables into one; here hashing
is vectorised and lookups read the rows they need from each table (numpy arrays, memory-mapped
files included, or jax arrays inside a compiled step).

Shapes: B batch, S history, C candidates, H hashes, V vocabulary, D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recsys_model import (
    HashConfig,
    RecsysBatch,
    RecsysEmbeddings,
    is_integer,
    is_number,
    require_kind,
)
from search import read_rows

ENTITIES = ("user", "item", "author")
# Embedding table names, as the published files name them.
TABLE_NAMES = {entity: f"{entity}_embeddings" for entity in ENTITIES}
# A prime below 2**31: hashes then fit int32 whatever the vocabulary.
DEFAULT_MODULUS = 2_147_483_647
# `Hashing.random` draws an entity's hashes at most this many times, the first draw included.
MAX_HASH_DRAWS = 100


@dataclasses.dataclass(frozen=True)
class EntityHash:
    """The hash functions of one entity kind and the size of its table."""

    scales: tuple[int, ...]
    biases: tuple[int, ...]
    modulus: int
    vocab_size: int

    def __post_init__(self):
        if not all(map(is_integer, (*self.scales, *self.biases, self.modulus, self.vocab_size))):
            raise ValueError(
                f"hash scales {self.scales}, biases {self.biases}, modulus {self.modulus!r} and "
                f"vocab_size {self.vocab_size!r} must be integers"
            )
        if len(self.scales) != len(self.biases) or not self.scales:
            raise ValueError(
                f"hash scales {self.scales} and biases {self.biases} must be non-empty and of "
                "equal length (one of each per hash)"
            )
        if self.modulus < 2 or self.vocab_size < 2:
            raise ValueError(
                f"hash modulus ({self.modulus}) and vocab_size ({self.vocab_size}) must be >= 2"
            )
        if any(scale % self.modulus == 0 for scale in self.scales):
            raise ValueError(
                f"hash scales {self.scales} must not be multiples of the modulus "
                f"({self.modulus}): such a hash puts every id on one row"
            )

    def __call__(self, ids: Any) -> np.ndarray:  # [...] -> [..., H] int32 in [0, vocab)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        if ids.dtype.kind == "i" and ids.size and (low := ids.min()) < 0:
            raise ValueError(f"ids must be >= 0 (0 is padding), got {low}")
        if ids.dtype == np.uint64 and ids.size and (high := ids.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"ids must fit int64 (the hash's type), got {high}")  # would wrap
        x = ids.astype(np.int64)[..., None]
        scales, biases = np.asarray(self.scales, np.int64), np.asarray(self.biases, np.int64)
        with np.errstate(over="ignore"):  # int64 wraps, as in the published hash
            h = (x * scales + biases) % self.modulus % (self.vocab_size - 1) + 1
        return np.where(x == 0, 0, h).astype(np.int32)

    def rows_of_ids(self, n: int) -> np.ndarray:
        """The distinct rows, sorted, that the hashes of ids 1..n land on."""
        return np.unique(self(np.arange(1, n + 1)))

    def expected_random_rows(self, n: int) -> float:
        """Distinct rows that n ids would land on, on average, under uniformly random hashes
        (H * n draws from the vocab - 1 rows that are not padding)."""
        rows = self.vocab_size - 1
        if rows == 1:
            return float(n > 0)
        return rows * -np.expm1(len(self.scales) * n * np.log1p(-1 / rows))


@dataclasses.dataclass(frozen=True)
class Hashing:
    """The hash functions and table sizes of a model's three entity kinds."""

    user: EntityHash
    item: EntityHash
    author: EntityHash

    @property
    def hash_config(self) -> HashConfig:
        return HashConfig(len(self.user.scales), len(self.item.scales), len(self.author.scales))

    @classmethod
    def random(
        cls,
        hash_config: HashConfig,
        vocab_sizes: Mapping[str, int],
        seed: int,
        num_ids: Mapping[str, int] | None = None,
    ) -> Hashing:
        """Scales in [1, modulus) and biases in [0, modulus) drawn from `seed`.

        With `num_ids` (entity -> n, for ids 1..n), an entity's hashes are drawn again until
        they spread those ids at least as well as uniformly random hashes would, on average:
        as many distinct rows. A linear hash of consecutive ids can fall far short of that
        (for some scales, 3,000 posts with two hashes each land on 1,900 of 6,000 rows where
        random hashes reach 3,800), and posts that share rows share what the model learns."""
        require_kind(hash_config, HashConfig, "hash_config")
        if not isinstance(vocab_sizes, Mapping) or any(
            not is_integer(vocab_sizes.get(e)) for e in ENTITIES
        ):
            raise ValueError(
                f"vocab_sizes: expected an integer keyed by each of {list(ENTITIES)}, got "
                f"{vocab_sizes!r}"
            )
        rng = np.random.default_rng(seed)
        counts = {
            "user": hash_config.num_user_hashes,
            "item": hash_config.num_item_hashes,
            "author": hash_config.num_author_hashes,
        }
        num_ids = dict(num_ids or {})
        unknown = sorted(set(num_ids) - set(ENTITIES))
        if unknown or any(n < 0 for n in num_ids.values()):
            raise ValueError(
                f"num_ids: expected counts >= 0 keyed by {list(ENTITIES)}, got {num_ids}"
            )
        kinds = {}
        for entity in ENTITIES:
            n = num_ids.get(entity)
            for _ in range(MAX_HASH_DRAWS):
                kind = EntityHash(
                    tuple(int(v) for v in rng.integers(1, DEFAULT_MODULUS, counts[entity])),
                    tuple(int(v) for v in rng.integers(0, DEFAULT_MODULUS, counts[entity])),
                    DEFAULT_MODULUS,
                    int(vocab_sizes[entity]),
                )
                if n is None or len(kind.rows_of_ids(n)) >= kind.expected_random_rows(n):
                    break
            else:
                raise ValueError(
                    f"{entity}: none of {MAX_HASH_DRAWS} draws of hashes spreads ids 1..{n} over "
                    f"{int(vocab_sizes[entity]) - 1} rows as well as random hashes would"
                )
            kinds[entity] = kind
        return cls(**kinds)

    def to_json(self) -> dict:
        """The `hash_params` and `*_vocab_size` keys of a published `config.json`."""
        params, sizes = {}, {}
        for entity in ENTITIES:
            kind = getattr(self, entity)
            params[f"{entity}_hash_scales"] = list(kind.scales)
            params[f"{entity}_biases"] = list(kind.biases)
            params[f"{entity}_modulus"] = kind.modulus
            sizes[f"{entity}_vocab_size"] = kind.vocab_size
        return {"hash_params": params, **sizes}

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> Hashing:
        """From a published `config.json` (its `hash_params` and `*_vocab_size` keys)."""
        params = config.get("hash_params") if isinstance(config, Mapping) else None
        if not isinstance(params, Mapping):
            raise ValueError(
                f"config must be a config.json object with hash_params, got {config!r}"
            )
        kinds = {}
        for entity in ENTITIES:
            try:
                kinds[entity] = EntityHash(
                    tuple(int(v) for v in params[f"{entity}_hash_scales"]),
                    tuple(int(v) for v in params[f"{entity}_biases"]),
                    int(params[f"{entity}_modulus"]),
                    int(config[f"{entity}_vocab_size"]),
                )
            except KeyError as missing:
                raise ValueError(f"config lacks {missing} (the {entity} hash)") from None
        return cls(**kinds)


def init_tables(hashing: Hashing, emb_size: int, seed: int, scale: float = 1.0) -> dict:
    """Embedding tables {user,item,author}_embeddings [V, D] float32, normal with standard
    deviation `scale` (row 0, padding, included: masks keep it out)."""
    require_kind(hashing, Hashing, "hashing")
    value = np.asarray(scale)[()] if np.ndim(scale) == 0 else None  # a 0-d array will do
    if not (is_number(value) and 0 <= value < np.inf):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    scale = float(value)  # (a numpy float64 would make the tables float64)
    rng = np.random.default_rng(seed)
    return {
        TABLE_NAMES[e]: scale
        * rng.standard_normal((getattr(hashing, e).vocab_size, emb_size), np.float32)
        for e in ENTITIES
    }


def _take(table, hashes, name: str):
    """Rows of `table` [V, D] at `hashes` [...]: numpy (from a memory-mapped file, only those
    rows are read) or jax (inside a compiled step, differentiable). Hashes given as values are
    checked to be rows of the table; traced ones cannot be, and a row beyond it reads NaN."""
    if not isinstance(hashes, jax.core.Tracer):
        values = np.asarray(hashes)
        if values.dtype.kind not in "iu":
            raise ValueError(f"{name}: hashes must be integers, got {values.dtype}")
        rows = np.shape(table)[0]
        if values.size and (values.min() < 0 or values.max() >= rows):
            raise ValueError(
                f"{name}: hashes from {values.min()} to {values.max()} are not all rows of it "
                f"(0 to {rows - 1})"
            )
    if isinstance(table, jax.Array) or isinstance(hashes, jax.core.Tracer):
        return jnp.take(table, hashes, axis=0)
    return read_rows(table, np.asarray(hashes))


def lookup(tables: Mapping[str, Any], batch: RecsysBatch) -> RecsysEmbeddings:
    """The embeddings of a batch's hashes, from split tables (`user_embeddings`,
    `item_embeddings`, `author_embeddings`)."""
    require_kind(batch, RecsysBatch, "batch")
    names = tuple(TABLE_NAMES.values())
    if not isinstance(tables, Mapping):
        raise TypeError(
            f"tables must be a mapping of {', '.join(names)}, got {type(tables).__name__}"
        )
    if missing := [n for n in names if n not in tables]:
        raise ValueError(f"tables lacks {', '.join(missing)}; it holds {sorted(map(str, tables))}")
    users, items, authors = (TABLE_NAMES[e] for e in ENTITIES)
    return RecsysEmbeddings(
        user_embeddings=_take(tables[users], batch.user_hashes, users),
        history_post_embeddings=_take(tables[items], batch.history_post_hashes, items),
        candidate_post_embeddings=_take(tables[items], batch.candidate_post_hashes, items),
        history_author_embeddings=_take(tables[authors], batch.history_author_hashes, authors),
        candidate_author_embeddings=_take(tables[authors], batch.candidate_author_hashes, authors),
    )


# hash_batch's id and action arguments, by name, with their dimensions.
HASH_BATCH_DIMS = {
    "user_ids": "B",
    "history_post_ids": "BS",
    "history_author_ids": "BS",
    "history_actions": "BSA",
    "candidate_post_ids": "BC",
    "candidate_author_ids": "BC",
}


def hash_batch(
    hashing: Hashing,
    user_ids: Any,  # [B]
    history_post_ids: Any,  # [B, S]
    history_author_ids: Any,  # [B, S]
    history_actions: Any,  # [B, S, A]
    candidate_post_ids: Any,  # [B, C]
    candidate_author_ids: Any,  # [B, C]
    **second_release: Any,
) -> RecsysBatch:
    """A `RecsysBatch` from ids (0 = padding): every id hashed, product surfaces 0. Keyword
    arguments pass second-release fields through (`history_continuous_actions`,
    `candidate_impr_ts`, `candidate_post_creation_ts`)."""
    require_kind(hashing, Hashing, "hashing")
    args = (user_ids, history_post_ids, history_author_ids, history_actions)
    args += (candidate_post_ids, candidate_author_ids)
    shapes = dict(zip(HASH_BATCH_DIMS, map(np.shape, args), strict=True))
    for name, dims in HASH_BATCH_DIMS.items():
        if len(shapes[name]) != len(dims):
            raise ValueError(
                f"{name} has shape {list(shapes[name])}; expected {len(dims)} dimensions"
            )
    # B and S as history_post_ids has them, C as candidate_post_ids, A as history_actions.
    sizes = dict(zip("BS", shapes["history_post_ids"], strict=True))
    sizes |= {"C": shapes["candidate_post_ids"][1], "A": shapes["history_actions"][2]}
    for name, dims in HASH_BATCH_DIMS.items():
        if shapes[name] != (wanted := tuple(sizes[d] for d in dims)):
            raise ValueError(
                f"{name} has shape {list(shapes[name])}, expected {list(wanted)} (users B and "
                "history S of history_post_ids, candidates C of candidate_post_ids)"
            )
    history_post_ids = np.asarray(history_post_ids)
    candidate_post_ids = np.asarray(candidate_post_ids)
    return RecsysBatch(
        user_hashes=hashing.user(user_ids),
        history_post_hashes=hashing.item(history_post_ids),
        history_author_hashes=hashing.author(history_author_ids),
        history_actions=np.asarray(history_actions, np.float32),
        history_product_surface=np.zeros(history_post_ids.shape, np.int32),
        candidate_post_hashes=hashing.item(candidate_post_ids),
        candidate_author_hashes=hashing.author(candidate_author_ids),
        candidate_product_surface=np.zeros(candidate_post_ids.shape, np.int32),
        **second_release,
    )
