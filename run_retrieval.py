"""Retrieve top-K posts from a synthetic corpus with the Phoenix two-tower model.

No trained checkpoint ships with this project, so the weights are drawn at random with a
stated seed and the corpus is random unit vectors: the result shows what the model computes,
not real relevance.

    uv run run_retrieval.py [--seed 0] [--batch-size 2] [--corpus-size 1000] [--top-k 10]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from cli import ArgumentParser, add_demo_flags, positive_int, run_main, timed
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from runners import (
    DEMO_EMB_SIZE,
    DEMO_HISTORY_LEN,
    DEMO_NUM_CANDIDATES,
    RecsysRetrievalInferenceRunner,
    RetrievalModelRunner,
    create_example_corpus,
    demo_inputs,
    demo_transformer_config,
)

USERS_SHOWN = 2
RESULTS_SHOWN = 10


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_flags(parser, DEMO_HISTORY_LEN, DEMO_NUM_CANDIDATES)
    parser.add_argument("--corpus-size", type=positive_int, default=1000, help="posts (1000)")
    parser.add_argument("--top-k", type=positive_int, default=10, help="posts per user (10)")
    args = parser.parse_args(argv)
    if args.top_k > args.corpus_size:
        parser.error(f"--top-k ({args.top_k}) must not exceed --corpus-size ({args.corpus_size})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = PhoenixRetrievalModelConfig(
        model=demo_transformer_config(),
        emb_size=DEMO_EMB_SIZE,
        history_seq_len=args.history_len,
        candidate_seq_len=args.candidates,
        fprop_dtype=jnp.dtype(args.dtype),
    )
    retriever = RecsysRetrievalInferenceRunner(RetrievalModelRunner(config), name="retrieval")
    batch, embeddings = demo_inputs(
        retriever, args.seed, args.batch_size, args.history_len, args.candidates
    )
    corpus, post_ids = create_example_corpus(args.corpus_size, DEMO_EMB_SIZE, seed=args.seed)
    retriever.set_corpus(corpus, post_ids)

    print(
        f"Phoenix retrieval: D={config.emb_size}, {config.model.num_layers} layers, history "
        f"{args.history_len}, {args.batch_size} users, corpus of {args.corpus_size} posts, "
        f"top {args.top_k}, {args.dtype}"
    )
    print(
        f"Weights and corpus: RANDOM (seed {args.seed}), not a trained model; scores show the "
        "model's behaviour, not real relevance."
    )
    output, first, median = timed(
        lambda: jax.block_until_ready(retriever.retrieve(batch, embeddings, top_k=args.top_k)),
        args.repeats,
    )
    candidates = np.asarray(retriever.encode_candidates(batch, embeddings))
    print(
        f"First call (compile + run): {first:.2f} s; retrieval: median {median * 1e3:.2f} ms "
        f"over {args.repeats} runs"
    )
    user = np.asarray(output.user_representation, np.float32)
    indices = np.asarray(output.top_k_indices)
    scores = np.asarray(output.top_k_scores)
    all_scores = user @ corpus.T
    if args.batch_size > USERS_SHOWN:
        print(f"(showing {USERS_SHOWN} of the {args.batch_size} users retrieved for)")
    for b in range(min(args.batch_size, USERS_SHOWN)):
        print(
            f"\nUser {b}: |user vector| = {np.linalg.norm(user[b]):.4f}; corpus scores range "
            f"{all_scores[b].min():+.3f} .. {all_scores[b].max():+.3f}, "
            f"median {np.median(all_scores[b]):+.3f}"
        )
        print(f"  {'rank':>4}  {'post id':>8}  score")
        for rank in range(min(args.top_k, RESULTS_SHOWN)):
            print(f"  {rank + 1:>4}  {post_ids[indices[b, rank]]:>8}  {scores[b, rank]:+.4f}")
        own = candidates[b] @ user[b]
        own_scores = " ".join(f"{x:+.3f}" for x in own[:RESULTS_SHOWN])
        print(f"  the user's own candidates, through the candidate tower, score: {own_scores}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "run_retrieval.py"))
