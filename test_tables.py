"""The published hash functions, vectorised (`tables.py`), and lookups from split tables."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tables
from recsys_model import HashConfig
from tables import EntityHash, Hashing, hash_batch, init_tables, lookup

INT64 = 2**64


def published_hash(x: int, scale: int, bias: int, modulus: int, vocab: int) -> int:
    """One hash as the published double loop computes it, in exact integers: the product and
    sum wrap to int64, then floor modulo (Python's sign convention)."""
    if x == 0:
        return 0
    value = (x * scale + bias) % INT64
    if value >= 2**63:
        value -= INT64
    return value % modulus % (vocab - 1) + 1


def test_hash_hand_values():
    kind = EntityHash(scales=(3, 7), biases=(5, 0), modulus=11, vocab_size=7)
    # id 4: (4*3+5) % 11 = 6, 6 % 6 + 1 = 1; (4*7+0) % 11 = 6 -> 1.
    # id 10: (35 % 11) = 2 -> 3; (70 % 11) = 4 -> 5.
    np.testing.assert_array_equal(kind(np.array([0, 4, 10])), [[0, 0], [1, 1], [3, 5]])


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    ids=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=20),
    scale=st.integers(1, 2**31 - 2),
    bias=st.integers(0, 2**31 - 2),
    vocab=st.integers(2, 10**6),
)
def test_vectorised_hash_equals_the_published_loop(ids, scale, bias, vocab):
    """Snowflake-sized ids overflow int64 in the product: the wrap is part of the function."""
    kind = EntityHash((scale,), (bias,), 2_147_483_647, vocab)
    got = kind(np.array(ids, np.int64))[:, 0]
    want = [published_hash(x, scale, bias, 2_147_483_647, vocab) for x in ids]
    np.testing.assert_array_equal(got, want)
    assert np.all((got >= 1) | (np.array(ids) == 0)) and np.all(got < vocab)


def test_hashing_round_trips_through_config_json_and_refuses_bad_ids():
    hashing = Hashing.random(HashConfig(2, 3, 1), {"user": 10, "item": 20, "author": 30}, seed=0)
    data = json.loads(json.dumps(hashing.to_json()))
    assert set(data["hash_params"]) == {
        f"{e}_{k}" for e in ("user", "item", "author") for k in ("hash_scales", "biases", "modulus")
    }
    assert Hashing.from_json(data) == hashing
    assert hashing.hash_config == HashConfig(2, 3, 1)
    with pytest.raises(TypeError, match="ids must be integers, got float64"):
        hashing.item(np.array([1.5]))
    with pytest.raises(ValueError, match=r"ids must be >= 0 \(0 is padding\), got -5"):
        hashing.user(np.array([[3, -5]]))
    with pytest.raises(ValueError, match=f"ids must fit int64 .*, got {2**64 - 1}"):
        hashing.author(np.array([2**64 - 1], np.uint64))  # would wrap to -1
    assert hashing.item(np.zeros((2, 0), np.int64)).shape == (2, 0, 3)
    with pytest.raises(ValueError, match="must be non-empty and of equal length"):
        EntityHash((1, 2), (3,), 11, 7)
    with pytest.raises(ValueError, match="and vocab_size 10.5 must be integers"):
        EntityHash((1,), (3,), 11, 10.5)  # hashed "mod 9.5", then truncated
    with pytest.raises(ValueError, match=r"hash scales \(3, 22\) must not be multiples of"):
        EntityHash((3, 22), (0, 0), 11, 7)  # every id on one row


def test_lookup_from_split_tables_equals_the_unified_table():
    """The published pipeline copies the three tables into one (users from row 65, then items,
    then authors); reading each table directly gives the same rows."""
    hashing = Hashing.random(HashConfig(), {"user": 11, "item": 13, "author": 17}, seed=1)
    tables = init_tables(hashing, 4, seed=2)
    unified = np.concatenate([np.zeros((65, 4), np.float32), *tables.values()])
    offsets = {"user": 65, "item": 65 + 11, "author": 65 + 11 + 13}
    rng = np.random.default_rng(3)
    shapes = {"user": (2,), "posts": (2, 5), "authors": (2, 5), "cand": (2, 3), "cauth": (2, 3)}
    ids = {name: rng.integers(0, 10**18, shape) for name, shape in shapes.items()}
    ids["posts"][0, -2:] = 0  # padding hashes to row 0
    actions = np.zeros((2, 5, 19))
    batch = hash_batch(hashing, *(ids[k] for k in ("user", "posts", "authors")), actions,
                       ids["cand"], ids["cauth"])  # fmt: skip
    emb = lookup(tables, batch)
    np.testing.assert_array_equal(emb.user_embeddings, unified[offsets["user"] + batch.user_hashes])
    np.testing.assert_array_equal(
        emb.history_post_embeddings, unified[offsets["item"] + batch.history_post_hashes]
    )
    np.testing.assert_array_equal(
        emb.candidate_author_embeddings, unified[offsets["author"] + batch.candidate_author_hashes]
    )
    assert np.all(batch.history_post_hashes[0, -2:] == 0)
    assert batch.history_product_surface.shape == (2, 5) and not batch.history_product_surface.any()
    # Tables smaller than the hashing's vocabulary: numpy's raised IndexError, jax's read NaN.
    for array in (np.asarray, jnp.asarray):
        small = {name: array(table[:3]) for name, table in tables.items()}
        with pytest.raises(
            ValueError, match=r"user_embeddings: hashes from \d+ to \d+ are not all rows of it"
        ):
            lookup(small, batch)
    # Arguments of the wrong kind: a KeyError, an AttributeError, an IndexError from float hashes.
    with pytest.raises(ValueError, match=r"tables lacks item_embeddings; it holds \['author_emb"):
        lookup({k: v for k, v in tables.items() if k != "item_embeddings"}, batch)
    with pytest.raises(TypeError, match="tables must be a mapping of user_embeddings, .*got list"):
        lookup(list(tables.values()), batch)
    with pytest.raises(TypeError, match="batch must be a RecsysBatch, got dict"):
        lookup(tables, batch._asdict())
    floats = batch._replace(user_hashes=batch.user_hashes.astype(np.float32))
    with pytest.raises(ValueError, match="user_embeddings: hashes must be integers, got float32"):
        lookup(tables, floats)


def test_expected_random_rows_by_hand():
    # Two ids, one hash, two rows: the second id misses the first's row half the time.
    assert EntityHash((1,), (0,), 11, 3).expected_random_rows(2) == pytest.approx(1.5)
    # Three draws into 4 rows: 4 * (1 - (3/4)^3).
    assert EntityHash((1, 2, 3), (0, 0, 0), 11, 5).expected_random_rows(1) == pytest.approx(
        4 * (1 - 0.75**3)
    )
    one_row = EntityHash((1, 2), (0, 0), 11, 2)  # a single row besides padding
    assert one_row.expected_random_rows(0) == 0.0 and one_row.expected_random_rows(5) == 1.0
    assert len(one_row.rows_of_ids(0)) == 0 and len(one_row.rows_of_ids(5)) == 1


def test_random_hashes_redrawn_until_they_spread_the_ids(monkeypatch):
    """Some linear hashes pile consecutive ids onto few rows; given the ids, `random` redraws."""
    vocab = {"user": 6001, "item": 6001, "author": 1601}
    plain = Hashing.random(HashConfig(), vocab, seed=10).item  # a bad draw:
    assert len(plain.rows_of_ids(3000)) < 0.6 * plain.expected_random_rows(3000)
    spread = Hashing.random(HashConfig(), vocab, seed=10, num_ids={"item": 3000, "author": 400})
    assert len(spread.item.rows_of_ids(3000)) >= spread.item.expected_random_rows(3000)
    assert len(spread.author.rows_of_ids(400)) >= spread.author.expected_random_rows(400)
    # The user's hashes are drawn before the item's redraws, and never redrawn themselves.
    assert spread.user == Hashing.random(HashConfig(), vocab, seed=10).user
    # No ids and a single row: accepted at the first draw (0 rows used, 0 expected).
    Hashing.random(HashConfig(), {**vocab, "user": 2}, 10, num_ids={"user": 0})
    for bad in ({"post": 3000}, {"item": -1}):
        with pytest.raises(ValueError, match="num_ids: expected counts >= 0 keyed by"):
            Hashing.random(HashConfig(), vocab, seed=10, num_ids=bad)
    monkeypatch.setattr(tables, "MAX_HASH_DRAWS", 1)
    with pytest.raises(ValueError, match=r"item: none of 1 draws of hashes spreads ids 1..3000"):
        Hashing.random(HashConfig(), vocab, seed=10, num_ids={"item": 3000})


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: Hashing.random(None, {}, 0), TypeError, "hash_config must be a HashConfig"),
        (lambda: Hashing.random(HashConfig(), {"user": 5}, 0), ValueError,
         r"vocab_sizes: expected an integer keyed by each of \['user', 'item', 'author'\]"),
        (lambda: Hashing.random(HashConfig(), {"user": 5, "item": 11.7, "author": 5}, 0),
         ValueError, "vocab_sizes: expected an integer"),  # 11.7 was truncated to 11
        (lambda: Hashing.from_json({}), ValueError, "config must be a config.json object with"),
        (lambda: Hashing.from_json({"hash_params": {}}), ValueError,
         "config lacks 'user_hash_scales' .the user hash."),
        (lambda: init_tables(None, 4, 0), TypeError, "hashing must be a Hashing, got NoneType"),
        (lambda: init_tables(Hashing.random(HashConfig(), dict.fromkeys(("user", "item",
         "author"), 5), 0), 4, 0, scale=float("nan")), ValueError, "scale must be a finite"),
    ],
)  # fmt: skip
def test_hashing_and_tables_refuse_arguments_of_the_wrong_kind(call, error, message):
    """Each ended in an AttributeError or a KeyError, or went on with a truncated or NaN value."""
    with pytest.raises(error, match=message):
        call()


def test_hash_batch_refuses_ids_of_another_shape():
    """They went into the batch as given, for the model to refuse or misread later."""
    hashing = Hashing.random(HashConfig(), dict.fromkeys(("user", "item", "author"), 9), seed=0)
    history, candidates = np.ones((2, 3), int), np.ones((2, 4), int)
    ids = dict(
        user_ids=[1, 2], history_post_ids=history, history_author_ids=history,
        history_actions=np.zeros((2, 3, 19)), candidate_post_ids=candidates,
        candidate_author_ids=candidates,
    )  # fmt: skip
    assert hash_batch(hashing, **ids).candidate_post_hashes.shape[:2] == (2, 4)
    for name, value, message in (
        ("history_actions", None, r"history_actions has shape \[\]; expected 3 dimensions"),
        ("user_ids", [1, 2, 3], r"user_ids has shape \[3\], expected \[2\] \(users B and hist"),
        (
            "candidate_author_ids",
            np.ones((2, 5), int),
            r"candidate_author_ids .* expected \[2, 4\]",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            hash_batch(hashing, **{**ids, name: value})
