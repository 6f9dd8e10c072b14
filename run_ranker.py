"""Rank synthetic candidates with the Phoenix ranking model (published demo configuration).

No trained checkpoint ships with this project, so the weights are drawn at random with a
stated seed: the probabilities show what the model computes, not real user preferences.

    uv run run_ranker.py [--seed 0] [--batch-size 2] [--history-len 32] [--candidates 8]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from cli import ArgumentParser, add_demo_flags, run_main, timed
from recsys_model import ACTIONS, PhoenixModelConfig
from runners import (
    DEMO_EMB_SIZE,
    DEMO_HISTORY_LEN,
    DEMO_NUM_CANDIDATES,
    ModelRunner,
    RecsysInferenceRunner,
    demo_inputs,
    demo_transformer_config,
)

TOP_ACTIONS_SHOWN = 3
USERS_SHOWN = 2
RANKS_SHOWN = 10


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_flags(parser, DEMO_HISTORY_LEN, DEMO_NUM_CANDIDATES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = PhoenixModelConfig(
        model=demo_transformer_config(),
        emb_size=DEMO_EMB_SIZE,
        num_actions=len(ACTIONS),
        history_seq_len=args.history_len,
        candidate_seq_len=args.candidates,
        fprop_dtype=jnp.dtype(args.dtype),
    )
    ranker = RecsysInferenceRunner(ModelRunner(config), name="ranker")
    batch, embeddings = demo_inputs(
        ranker, args.seed, args.batch_size, args.history_len, args.candidates
    )

    print(
        f"Phoenix ranking: D={config.emb_size}, {config.model.num_layers} layers, "
        f"{config.model.num_q_heads} heads of {config.model.key_size}, history "
        f"{args.history_len}, {args.candidates} candidates, {args.batch_size} users, {args.dtype}"
    )
    print(
        f"Weights: RANDOM (seed {args.seed}), not a trained model; the probabilities show the "
        "model's behaviour, not real preferences."
    )
    output, first, median = timed(
        lambda: jax.block_until_ready(ranker.rank(batch, embeddings)), args.repeats
    )
    print(
        f"First call (compile + run): {first:.2f} s; ranking: median {median * 1e3:.2f} ms "
        f"over {args.repeats} runs"
    )

    scores = np.asarray(output.scores)
    ranked = np.asarray(output.ranked_indices)
    history_lengths = (np.asarray(batch.history_post_hashes)[:, :, 0] != 0).sum(axis=1)
    for user in range(min(args.batch_size, USERS_SHOWN)):
        print(f"\nUser {user} ({history_lengths[user]} history items)")
        print(f"  {'rank':>4}  {'cand':>4}  {'p(fav)':>6}  top actions")
        for position, candidate in enumerate(ranked[user][:RANKS_SHOWN], start=1):
            probabilities = scores[user, candidate]
            top = np.argsort(-probabilities)[:TOP_ACTIONS_SHOWN]
            actions = ", ".join(f"{ACTIONS[a]} {probabilities[a]:.3f}" for a in top)
            print(f"  {position:>4}  {candidate:>4}  {probabilities[0]:6.3f}  {actions}")
        if args.candidates > RANKS_SHOWN:
            print(f"  ... {args.candidates - RANKS_SHOWN} more")
    if args.batch_size > USERS_SHOWN:
        print(f"\n({args.batch_size - USERS_SHOWN} more users ranked, not shown)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "run_ranker.py"))
