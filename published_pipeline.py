"""The published pipeline's procedure, re-enacted step by step, to measure ours against.

Not part of the library: `benchmark_pipeline.py` runs it beside `pipeline.Pipeline` on the
same folder, and `test_pipeline.py` checks that both serve the same feed. It does what the published
`run_pipeline.py` does, in its order: load every file whole (`np.load`), copy the three tables
of each model into one unified table (users from row 65, items after the users, authors after
the items), hash ids in a Python double loop, compute the user vector with the retrieval
model's uncompiled forward, score the corpus with numpy and take the top K by `argpartition`,
and rank the retrieved posts in chunks of `candidate_seq_len` (the last padded with zeros), one
uncompiled dense forward per chunk, ordering them by the pipeline's own action enum. Its
forwards compute attention as the published code does (`published_attention`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from checkpoint import (
    CONFIG_FILE,
    DEFAULT_CORPUS_FILE,
    PARAMS_FILE,
    TABLES_FILE,
    configs_from_json,
    read_config_json,
    unflatten_params,
)
from grok import MASKED_LOGIT, MultiHeadAttention
from recsys_model import RecsysBatch, RecsysEmbeddings
from tables import ENTITIES, TABLE_NAMES, Hashing

UNIFIED_OFFSET = 65  # the unified table's first user row
ENUM = {"favorite": 1, "reply": 4, "repost": 6, "dwell": 11}
WEIGHTS = {"favorite": 1.0, "reply": 0.5, "repost": 0.3, "dwell": 0.2}


def _published_attend(self, query, keys, values, mask, positions):
    """`MultiHeadAttention.attend` in the published layout: Grok-1's einsums over
    [B, T, K, G, d] queries, which XLA transposes for each product (the same values to float32
    rounding)."""
    q = self._grouped_queries(query, positions)
    logits = self._capped_logits(jnp.einsum("btkgd,bskd->bkgts", q, keys))
    logits = jnp.where(mask[:, :, None, :, :], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
    return self._output(jnp.einsum("bkgts,bskd->btkgd", weights, values))


@contextlib.contextmanager
def published_attention() -> Iterator[None]:
    """Within it, the models' dense attention runs in the published layout, so that timing a
    forward times the published attention (the other rewrites of `grok` apply as to ours).

    It swaps a method of the class for the whole process (not thread-safe), and it reaches only
    functions first traced within it: JAX keeps a function's trace by the function, so a
    function already traced for these shapes (even under a new `jax.jit`) keeps the layout it
    was traced with, inside or out, and one traced inside keeps the published layout after."""
    ours = MultiHeadAttention.attend
    MultiHeadAttention.attend = _published_attend
    try:
        yield
    finally:
        MultiHeadAttention.attend = ours


def _load(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=True) as data:
        return {key: data[key] for key in data.files}


class PublishedPipeline:
    def __init__(self, directory: str | Path, corpus_file: str | Path | None = None, dtype=None):
        directory = Path(directory)
        jsons = {
            m: read_config_json(directory / m / CONFIG_FILE, m) for m in ("retrieval", "ranker")
        }
        params = {
            m: jax.tree.map(jnp.array, unflatten_params(_load(directory / m / PARAMS_FILE)))
            for m in ("retrieval", "ranker")
        }
        fprop = {} if dtype is None else {"fprop_dtype": dtype}
        self.configs = dict(
            zip(
                ("retrieval", "ranker"),
                configs_from_json(*jsons.values(), params["ranker"], **fprop),
                strict=True,
            )
        )
        self.params = params
        self.hashing = {m: Hashing.from_json(jsons[m]) for m in jsons}
        self.unified = {}
        self.offsets = {}
        for m in jsons:
            tables = _load(directory / m / TABLES_FILE)
            d = tables[TABLE_NAMES["user"]].shape[1]
            blocks = [np.zeros((UNIFIED_OFFSET, d), np.float32)]
            offsets, row = {}, UNIFIED_OFFSET
            for entity in ENTITIES:
                offsets[entity] = row
                blocks.append(tables[TABLE_NAMES[entity]])
                row += len(tables[TABLE_NAMES[entity]])
            self.unified[m] = np.concatenate(blocks)
            self.offsets[m] = offsets
        corpus = _load(Path(corpus_file) if corpus_file else directory / DEFAULT_CORPUS_FILE)
        self.corpus = corpus
        self.user_tower = hk.transform(
            lambda b, e: self.configs["retrieval"].make().build_user_representation(b, e)[0]
        )
        self.ranker = hk.transform(lambda b, e: self.configs["ranker"].make()(b, e))

    def _hash(self, model: str, entity: str, ids: list[int]) -> np.ndarray:
        """The published double loop: every id, every hash function, scalar int64 arithmetic."""
        kind = getattr(self.hashing[model], entity)
        out = np.zeros((len(ids), len(kind.scales)), np.int64)
        for i, x in enumerate(ids):
            for j, (scale, bias) in enumerate(zip(kind.scales, kind.biases, strict=True)):
                if x != 0:
                    with np.errstate(over="ignore"):
                        value = np.int64(x) * np.int64(scale) + np.int64(bias)
                    out[i, j] = value % kind.modulus % (kind.vocab_size - 1) + 1
        return out

    def _inputs(self, model: str, user_id, posts, authors, actions, candidates, candidate_authors):
        hashes = {
            "user": self._hash(model, "user", [user_id]),
            "history_post": self._hash(model, "item", posts),
            "history_author": self._hash(model, "author", authors),
            "candidate_post": self._hash(model, "item", candidates),
            "candidate_author": self._hash(model, "author", candidate_authors),
        }
        rows = {"user": "user", "history_post": "item", "candidate_post": "item"}
        rows.update(history_author="author", candidate_author="author")

        def embed(name):
            return self.unified[model][self.offsets[model][rows[name]] + hashes[name]][None]

        batch = RecsysBatch(
            user_hashes=hashes["user"].astype(np.int32),
            history_post_hashes=hashes["history_post"][None].astype(np.int32),
            history_author_hashes=hashes["history_author"][None].astype(np.int32),
            history_actions=actions[None],
            history_product_surface=np.zeros((1, len(posts)), np.int32),
            candidate_post_hashes=hashes["candidate_post"][None].astype(np.int32),
            candidate_author_hashes=hashes["candidate_author"][None].astype(np.int32),
            candidate_product_surface=np.zeros((1, len(candidates)), np.int32),
        )
        embeddings = RecsysEmbeddings(
            user_embeddings=embed("user")[0],
            history_post_embeddings=embed("history_post"),
            candidate_post_embeddings=embed("candidate_post"),
            history_author_embeddings=embed("history_author"),
            candidate_author_embeddings=embed("candidate_author"),
        )
        return batch, embeddings

    def feed(self, sequence: dict, top_k_retrieval: int = 200, top_k_display: int = 30):
        """[(post id, weighted score)] of the best `top_k_display`, and every probability
        [K, A] of the retrieved posts in retrieval order."""
        with published_attention():  # its forwards are uncompiled: traced afresh every call
            return self._feed(sequence, top_k_retrieval, top_k_display)

    def _feed(self, sequence: dict, top_k_retrieval: int, top_k_display: int):
        retrieval, ranker = self.configs["retrieval"], self.configs["ranker"]
        s, c = retrieval.history_seq_len, retrieval.candidate_seq_len
        items = sequence["history"][:s]
        posts = [item["post_id"] for item in items] + [0] * (s - len(items))
        authors = [item["author_id"] for item in items] + [0] * (s - len(items))
        actions = np.zeros((s, ranker.num_actions), np.float32)
        for i, item in enumerate(items):
            for index, value in item.get("actions", {}).items():
                if int(index) < ranker.num_actions:
                    actions[i, int(index)] = float(value)

        batch, embeddings = self._inputs(
            "retrieval", sequence["user_id"], posts, authors, actions, [0] * c, [0] * c
        )
        user = np.asarray(
            self.user_tower.apply(self.params["retrieval"], None, batch, embeddings), np.float32
        )[0]
        scores = self.corpus["candidate_representations"] @ user
        top = np.argpartition(-scores, top_k_retrieval - 1)[:top_k_retrieval]
        top = top[np.argsort(-scores[top])]
        candidates = self.corpus["post_ids"][top].tolist()
        candidate_authors = self.corpus["author_ids"][top].tolist()

        probabilities = []
        for start in range(0, len(candidates), c):
            chunk = candidates[start : start + c]
            chunk_authors = candidate_authors[start : start + c]
            pad = c - len(chunk)
            batch, embeddings = self._inputs(
                "ranker",
                sequence["user_id"],
                posts,
                authors,
                actions,
                chunk + [0] * pad,
                chunk_authors + [0] * pad,
            )
            logits = self.ranker.apply(self.params["ranker"], None, batch, embeddings).logits
            probabilities.append(
                np.asarray(jax.nn.sigmoid(logits.astype(jnp.float32)))[0, : len(chunk)]
            )
        probabilities = np.concatenate(probabilities)
        weighted = sum(w * probabilities[:, ENUM[name]] for name, w in WEIGHTS.items())
        order = np.argsort(-weighted, kind="stable")[:top_k_display]
        return [(candidates[i], float(weighted[i])) for i in order], probabilities


if __name__ == "__main__":
    import sys

    sys.exit(
        "published_pipeline.py is a module, not a script: `uv run benchmark_pipeline.py` runs "
        "its procedure beside this library's pipeline"
    )
