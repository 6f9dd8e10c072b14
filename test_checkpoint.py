"""Checkpoints and artifacts folders (`checkpoint.py`): the published npz layout both ways,
bit-exact round trips, every kind of bad file refused with one line, atomic writes, and the
second release switched on by a checkpoint's own tree."""

import dataclasses
import io
import json
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import runners
from checkpoint import (
    check_params,
    load_artifacts,
    load_embedding_table,
    load_model_params,
    param_shapes,
    read_npz,
    read_sequence,
    save_embedding_tables,
    save_model_params,
    write_npz,
)
from conftest import Setup, fixed_example, ranking_params
from pipeline import write_example
from recsys_model import ContinuousActionConfig, NormConfig

SECOND = Setup(release=2, num_layers=2)
# A dwell time normalised otherwise than by default, as training may choose.
TRAINED_DWELL = ContinuousActionConfig(1.0, "mse", norm_config=NormConfig(60.0, use_log=True))


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    """A small artifacts folder of tiny models (second-release ranker), written once."""
    setup = Setup(num_layers=1, hashes=(2, 2, 2))
    ranker = dataclasses.replace(
        dataclasses.replace(setup, release=2).ranking_config(4, 3),
        continuous_action_config=TRAINED_DWELL,
    )
    folder = tmp_path_factory.mktemp("artifacts") / "example"
    configs = (setup.retrieval_config(4, 3), ranker)
    return write_example(
        folder, 3, corpus_size=300, vocab_size=50, history_length=6, configs=configs
    )


def flat(params):
    return checkpoint.flatten_params(params)


def test_parameters_round_trip_bit_exact_in_the_published_layout(tmp_path):
    params = ranking_params(SECOND)
    path = tmp_path / "model_params.npz"
    save_model_params(params, path)
    with zipfile.ZipFile(path) as archive:  # keys module_path/param_name, one .npy each
        names = {info.filename for info in archive.infolist()}
    assert names == {f"{key}.npy" for key in flat(params)}
    assert "phoenix_model/history_dwell_time_proj1.npy" in names
    loaded = load_model_params(path)
    assert flat(loaded).keys() == flat(params).keys()
    for key, value in flat(loaded).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat(params)[key]))
        assert value.dtype == jnp.float32


def test_load_model_params_follows_the_published_rules(tmp_path):
    """Keys split at their last "/" (none: module ""); float64 becomes float32 and int64
    int32, as jnp.array converts them."""
    path = tmp_path / "p.npz"
    write_npz(
        {"a/b/c": np.ones((2, 3)), "scalar": np.float64(1.5), "~/log_temperature": np.int64(3)},
        path,
    )
    params = load_model_params(path)
    assert set(params) == {"a/b", "", "~"}
    assert params["a/b"]["c"].dtype == jnp.float32 and params[""]["scalar"] == 1.5
    assert params["~"]["log_temperature"].dtype == jnp.int32
    # An integer int32 cannot hold would wrap (2**40 to 0): refused, by name.
    write_npz({"~/step": np.int64(2**40)}, path)
    with pytest.raises(
        ValueError, match=r"~/step holds integers beyond int32 \(from 1099511627776"
    ):
        load_model_params(path)
    write_npz({"~/step": np.uint64(3 * 2**30)}, path)  # uint64 becomes uint32, which holds it
    assert int(load_model_params(path)["~"]["step"]) == 3 * 2**30
    # Text (a demo checkpoint's description, say) is no parameter: it failed deep in JAX.
    write_npz({"m/w": np.ones(2), "meta": np.array('{"seed": 0}')}, path)
    with pytest.raises(ValueError, match=r"p.npz: meta holds <U11 values, not numbers: not a"):
        load_model_params(path)


def test_bfloat16_is_written_as_float32_and_raw_bytes_are_refused(tmp_path):
    """npz has no bfloat16: numpy writes it as raw 2-byte records that read back as bytes."""
    path = tmp_path / "p.npz"
    values = jnp.array([1.5, -2.0, 3.0e38], jnp.bfloat16)
    save_model_params({"m": {"w": values}}, path)
    loaded = load_model_params(path)["m"]["w"]
    assert loaded.dtype == jnp.float32
    np.testing.assert_array_equal(loaded, values.astype(jnp.float32))
    for save in (np.savez, np.savez_compressed):
        save(path, w=np.asarray(values))
        with pytest.raises(ValueError, match=r"w has raw dtype \|V2, not numbers"):
            read_npz(path)
    with pytest.raises(TypeError, match="o: an array of object cannot be written to npz"):
        write_npz({"o": np.array([{"a": 1}], dtype=object)}, tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()


def test_tables_are_memory_mapped_and_equal(tmp_path):
    tables = {"user_embeddings": np.random.default_rng(0).standard_normal((7, 4), np.float32)}
    write_npz(tables, tmp_path / "t.npz")
    loaded = load_embedding_table(tmp_path / "t.npz")
    assert isinstance(loaded["user_embeddings"], np.memmap)
    np.testing.assert_array_equal(loaded["user_embeddings"], tables["user_embeddings"])


def _numpy_savez(arrays, path, compressed=False):
    """An npz as numpy writes it, unchecked: the files another program might leave."""
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def _corrupt(path, how):
    if how == "missing":
        return
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how.startswith("flipped byte"):
        with zipfile.ZipFile(path) as archive:
            info = archive.infolist()[0]
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside the array
        path.write_bytes(bytes(data))
    elif how == "not a zip":
        path.write_bytes(b"this is not an npz file")
    elif how.startswith("header"):  # the member's own .npy header, of the same length
        old, new = {"header, magic": (b"NUMPY", b"NUMQY"), "header, dtype": (b"<f4", b"<q4")}[how]
        path.write_bytes(bytes(data).replace(old, new, 1))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "no such file"),
        ("truncated", "not a readable .npz file"),
        ("flipped byte", "is corrupt \\(its checksum does not match\\)"),
        ("flipped byte, large", "is corrupt \\(its checksum does not match\\)"),
        ("not a zip", "not a readable .npz file"),
        ("header, magic", "layer/w.npy: the magic string is not correct"),
        ("header, dtype", "layer/w.npy: descr is not a valid dtype descriptor"),
        ("nan", "w holds NaN or infinite values"),
        (
            "beyond float32",
            r"w holds values beyond float32's range \(a magnitude of 1e\+300\)",
        ),
        ("beyond float32, compressed", "w holds values beyond float32's range"),
        ("objects", "holds Python objects"),
    ],
)
def test_bad_files_are_refused_with_one_line_naming_the_file(tmp_path, how, message):
    path = tmp_path / "model_params.npz"
    # zipfile checks the checksum of a small member itself, before its header is read
    rows = 4096 if how.endswith("large") or how.startswith("header") else 64
    arrays = {"layer/w": np.random.default_rng(1).standard_normal((rows, 8), np.float32)}
    if how == "nan":
        arrays["layer/w"][3, 2] = np.nan
    if how.startswith("beyond float32"):  # finite in the file, infinite as a model holds it
        arrays["layer/w"] = arrays["layer/w"].astype(np.float64)
        arrays["layer/w"][-3, 2] = -1e300
    if how == "objects":
        np.savez(path, **{"layer/w": np.array([{"a": 1}], dtype=object)})
    elif how == "nan" or how.startswith("beyond float32"):  # write_npz would refuse them
        _numpy_savez(arrays, path, compressed=how.endswith("compressed"))  # compressed: read whole
    elif how != "missing":
        write_npz(arrays, path)
    _corrupt(path, how)
    error_type = FileNotFoundError if how == "missing" else ValueError
    with pytest.raises(error_type, match=message) as error:
        load_model_params(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "model_params.npz"
    write_npz({"a": np.zeros(3)}, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(KeyboardInterrupt):
        write_npz({"a": np.ones(3)}, path)
    assert path.read_bytes() == before  # the old file untouched
    assert os.listdir(tmp_path) == ["model_params.npz"]  # no partial file left behind


def test_a_link_is_written_through_and_a_pipe_is_refused(tmp_path):
    """A save to a symbolic link replaces the file it points to and keeps the link; a save to
    a pipe (or a device) is refused before anything is written, leaving it as it was."""
    write_npz({"a": np.zeros(3)}, tmp_path / "target.npz")
    (tmp_path / "link.npz").symlink_to("target.npz")
    write_npz({"a": np.ones(3)}, tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink()
    np.testing.assert_array_equal(read_npz(tmp_path / "target.npz")["a"], np.ones(3))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"pipe is not a file \(a folder, device, pipe or socket"):
        write_npz({"a": np.ones(3)}, tmp_path / "pipe")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "pipe", "target.npz"]


def test_any_name_is_stored_even_those_of_np_savez_arguments(tmp_path):
    """np.savez takes the names as keywords beside its own `file` and `allow_pickle`."""
    arrays = {"allow_pickle": np.ones(2, np.float32), "file": np.arange(3), "m/w": np.zeros(1)}
    write_npz(arrays, tmp_path / "a.npz")
    loaded = read_npz(tmp_path / "a.npz")
    assert sorted(loaded) == sorted(arrays)
    for name, x in arrays.items():
        np.testing.assert_array_equal(loaded[name], x)
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match=r"f/b/a\.npz: .*/f is a file, not a folder$"):
        write_npz(arrays, tmp_path / "f" / "b" / "a.npz")


def test_what_is_not_a_regular_file_is_named_so(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")  # reading it would wait for a writer forever
    with pytest.raises(FileNotFoundError, match=r"pipe\.npz: not a regular file \(a device, pipe"):
        load_model_params(tmp_path / "pipe.npz")


def test_a_save_that_would_not_load_back_is_refused(tmp_path):
    """NaN, or float64 beyond float32's range, in parameters or tables (or any npz the project
    writes): `read_npz` would refuse the file, so `write_npz` does not write it."""
    path = tmp_path / "params.npz"
    bad = np.ones((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=rf"^{path}: m/w holds NaN or infinite values$"):
        save_model_params({"m": {"w": bad}}, path)
    bad[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"item_embeddings holds values beyond float32's range"):
        save_embedding_tables({"item_embeddings": bad}, path)
    # A name with "/" came back under another module; a string loaded as no parameter.
    with pytest.raises(ValueError, match=r"m's parameter name 'a/w' must be a string without '/'"):
        save_model_params({"m": {"a/w": np.ones(3)}}, path)
    trained = {"model": {"m": {"w": np.ones(3)}}, "tables": {"user_embeddings": np.ones((2, 3))}}
    with pytest.raises(TypeError, match=r"a trained state's parameters, .* is params\['model'\]$"):
        save_model_params(trained, path)
    with pytest.raises(ValueError, match=r"^m/w: a parameter must be an array of numbers, got <U3"):
        save_model_params({"m": {"w": "abc"}}, path)
    assert not any(tmp_path.iterdir())


def test_a_file_in_a_folder_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    """Not the temporary file the save would have written first."""

    def refused(*args, dir, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".params.npz.x.partial"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    target = tmp_path / "params.npz"
    with pytest.raises(OSError, match=rf"cannot write there: Permission denied: '{target}'$"):
        save_model_params({"m": {"w": np.ones(3)}}, target)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "bad, problem", [(np.nan, "NaN or infinite values"), (1e300, "values beyond float32's range")]
)
def test_every_chunk_of_a_mapped_array_is_checked(tmp_path, monkeypatch, bad, problem):
    """A memory-mapped array is checked as it streams past in chunks: a bad value in the last
    chunk is found as one in the first is."""
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 64)
    values = np.ones((100, 4))
    values[-1, -1] = bad
    _numpy_savez({"w": values}, tmp_path / "w.npz")
    with pytest.raises(ValueError, match=rf"w\.npz: w holds {problem}"):
        read_npz(tmp_path / "w.npz")


def test_data_of_another_length_than_its_header_says_is_named(tmp_path):
    """A member whose .npy header asks for more (or fewer) bytes than follow it, with a
    checksum that matches what is there."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<i8", "fortran_order": False, "shape": (10,)}
    )
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as archive:  # stored, not compressed
        archive.writestr("a.npy", header.getvalue() + np.arange(9, dtype="<i8").tobytes() + b"1234")
    with pytest.raises(
        ValueError, match=r"a\.npy holds 76 bytes of data where its header asks for \[10\] int64"
    ):
        read_npz(tmp_path / "a.npz")


def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")  # as a write() says it, naming nothing

    monkeypatch.setattr(np.lib.format, "write_array", full)
    path = tmp_path / "model_params.npz"
    with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
        write_npz({"a": np.ones(3)}, path)
    assert os.listdir(tmp_path) == []


def test_an_example_folder_has_the_published_layout(example_folder):
    files = sorted(str(p.relative_to(example_folder)) for p in example_folder.rglob("*"))
    assert files == [
        "example_sequence.json",
        "ranker",
        "ranker/config.json",
        "ranker/embedding_tables.npz",
        "ranker/model_params.npz",
        "retrieval",
        "retrieval/config.json",
        "retrieval/embedding_tables.npz",
        "retrieval/model_params.npz",
        "sports_corpus.npz",
    ]
    for model in ("retrieval", "ranker"):
        config = json.loads((example_folder / model / "config.json").read_text())
        assert set(checkpoint._REQUIRED_KEYS) <= set(config)  # noqa: SLF001
        tables = read_npz(example_folder / model / "embedding_tables.npz")
        assert set(tables) == {"user_embeddings", "item_embeddings", "author_embeddings"}
    retrieval = read_npz(example_folder / "retrieval" / "model_params.npz")
    assert "~/log_temperature" in retrieval  # the published pipeline requires it
    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    assert f"{tower}/candidate_tower_projection_1" in retrieval
    corpus = read_npz(example_folder / "sports_corpus.npz")
    assert {"post_ids", "candidate_representations", "author_ids", "topics"} <= set(corpus)
    sequence = json.loads((example_folder / "example_sequence.json").read_text())
    assert set(sequence) == {"user_id", "history"}
    assert set(sequence["history"][0]) == {"post_id", "author_id", "actions"}


def test_loading_the_folder_rebuilds_the_models_exactly(example_folder):
    """The configs come back from config.json and the ranker's own tree (release 2 switched on
    by its parameters), the parameters bit-exact, the corpus vectors unit-norm."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the folder's config.json is known
        artifacts = load_artifacts(example_folder, fprop_dtype=jnp.float32)
    ranker = artifacts.ranker.config
    assert ranker.release == 2 and ranker.num_continuous_actions == 3
    assert (ranker.history_seq_len, ranker.candidate_seq_len) == (4, 3)
    assert ranker.model.num_layers == 1 and not ranker.right_anchored_rope
    assert ranker.continuous_action_config == TRAINED_DWELL
    check_params(artifacts.ranker.params, param_shapes(ranker))
    vectors = np.asarray(artifacts.corpus.candidate_representations)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


RANKER_JSON, RETRIEVAL_JSON = "ranker/config.json", "retrieval/config.json"
DAMAGES = {
    # name: (what is done to a copy of the folder, the message that must name it)
    "a file missing": (
        lambda f: (f / "ranker" / "embedding_tables.npz").unlink(),
        "ranker/embedding_tables.npz: no such file",
    ),
    "config.json of another width": (
        lambda f: _edit_json(f / RANKER_JSON, emb_size=16),
        "ranker/model_params.npz: params do not fit the model: .* the model expects",
    ),
    "config.json without a key": (
        lambda f: _edit_json(f / RETRIEVAL_JSON, drop="hash_params"),
        "retrieval/config.json: lacks hash_params",
    ),
    "config.json that is not an object": (
        lambda f: (f / RANKER_JSON).write_text("[1, 2]"),
        r"ranker/config.json: expected an object of settings, got \[1, 2\]",
    ),
    "a table beyond float32's range": (
        lambda f: _edit_npz(
            f / "ranker" / "embedding_tables.npz", "author_embeddings", lambda x: x * 1e300
        ),
        "ranker/embedding_tables.npz: author_embeddings holds values beyond float32's range",
    ),
    "config.json without a vocabulary size": (
        lambda f: _edit_json(f / RANKER_JSON, drop="user_vocab_size"),
        "ranker/config.json: lacks user_vocab_size",
    ),
    "a table of another size": (
        lambda f: _edit_json(f / RANKER_JSON, item_vocab_size=51),
        r"item_embeddings is \[50, 8\] float32, config.json asks for \[51, 8\]",
    ),
    "config.json with a count that is not one": (
        lambda f: _edit_json(f / RANKER_JSON, num_layers=2.5),
        "ranker/config.json: num_layers must be a positive integer, got 2.5",
    ),
    "config.json with a negative history": (
        lambda f: _edit_json(f / RANKER_JSON, history_seq_len=-3),
        "ranker/config.json: history_seq_len must be a positive integer, got -3",
    ),
    "config.json with hash parameters that are not": (
        lambda f: _edit_json(f / RETRIEVAL_JSON, hash_params=5),
        "retrieval/config.json: hash_params must be an object, got 5",
    ),
    "config.json with a hash beyond int64": (
        lambda f: _edit_hash(f / RANKER_JSON, item_hash_scales=[2**70, 3]),
        "ranker/config.json: hash_params.item_hash_scales must be a list of int64 integers",
    ),
    "config.json with more hash scales than hashes": (
        lambda f: _edit_hash(f / RETRIEVAL_JSON, item_hash_scales=[3, 5, 7], item_biases=[1, 2, 3]),
        "retrieval/config.json: hash_params.item_hash_scales holds 3 values, num_item_hashes is 2",
    ),
    "config.json with a modulus of 1": (
        lambda f: _edit_hash(f / RANKER_JSON, author_modulus=1),
        "ranker/config.json: hash_params.author_modulus must be an int64 integer >= 2, got 1",
    ),
    "config.json with action names of another length": (
        lambda f: _edit_json(f / RANKER_JSON, action_names=["favorite_score"]),
        "ranker/config.json: action_names must be 19 distinct names",
    ),
    "config.json with heads that do not share": (
        lambda f: _edit_json(f / RANKER_JSON, num_kv_heads=3),
        r"ranker/config.json: num_heads \(2\) must be a multiple of num_kv_heads \(3\)",
    ),
    "config.json with an odd key size": (
        lambda f: _edit_json(f / RETRIEVAL_JSON, key_size=5),
        "retrieval/config.json: key_size must be even",
    ),
    "config.json with a text switch": (
        lambda f: _edit_json(f / RANKER_JSON, right_anchored_rope="yes"),
        "ranker/config.json: right_anchored_rope must be true or false, got 'yes'",
    ),
    "config.json with a dwell scale of 0": (
        lambda f: _edit_json(
            f / RANKER_JSON, continuous_action_config={"norm_config": {"norm_scale": 0}}
        ),
        "ranker/config.json: continuous_action_config.norm_config.norm_scale must be a positive "
        "float32 number, got 0",
    ),
    "config.json with a dwell scale misspelt": (
        lambda f: _edit_json(
            f / RANKER_JSON, continuous_action_config={"norm_config": {"norm_scal": 60}}
        ),
        "ranker/config.json: continuous_action_config.norm_config has keys NormConfig does not: "
        "norm_scal",
    ),
    "config.json with a continuous config that is not an object": (
        lambda f: _edit_json(f / RANKER_JSON, continuous_action_config=[1]),
        r"ranker/config.json: continuous_action_config must be an object, got \[1\]",
    ),
    "config.json with dwell in logs as text": (
        lambda f: _edit_json(
            f / RANKER_JSON, continuous_action_config={"norm_config": {"use_log": "no"}}
        ),
        "ranker/config.json: continuous_action_config.norm_config.use_log must be true or false",
    ),
    "a corpus of no posts": (
        lambda f: _replace_corpus(f, lambda arrays: {k: v[:0] for k, v in arrays.items()}),
        "sports_corpus.npz: holds no post",
    ),
    "a corpus of integer vectors": (
        lambda f: _replace_corpus(
            f,
            lambda a: {
                **a,
                "candidate_representations": a["candidate_representations"].astype(np.int32),
            },
        ),
        "sports_corpus.npz: candidate_representations must be floats, got int32",
    ),
    "a corpus whose width is not D": (
        lambda f: _replace_corpus(
            f,
            lambda a: {
                **a,
                "candidate_representations": a["candidate_representations"][:, :-1],
            },
        ),
        r"sports_corpus.npz: candidate_representations is \[300, 7\], expected \[300, 8\] "
        r"\(one row of width D per post\)",
    ),
    "the two config.json swapped": (
        lambda f: [
            (f / a).write_text(text)
            for a, text in (
                (RANKER_JSON, (f / RETRIEVAL_JSON).read_text()),
                (RETRIEVAL_JSON, (f / RANKER_JSON).read_text()),
            )
        ],
        "retrieval/config.json: is the config.json of a ranker model",
    ),
    "config.json not JSON": (
        lambda f: (f / RANKER_JSON).write_text("{"),
        "ranker/config.json: not valid JSON",
    ),
    "a truncated corpus": (
        lambda f: _corrupt(f / "sports_corpus.npz", "truncated"),
        "sports_corpus.npz: not a readable",
    ),
    "a corpus with the padding id": (
        lambda f: _edit_corpus(f, "post_ids", 7, lambda ids: 0),
        r"sports_corpus.npz: post_ids must be positive integers that int64 holds, got 0 at \[7\]",
    ),
    "a corpus with times in milliseconds": (
        lambda f: _edit_corpus(f, "creation_times", 2, lambda times: times[2] * 1000),
        r"sports_corpus.npz: creation_times must be unix seconds in \[0, 2\*\*31\) \(the models "
        r"take times as int32; milliseconds\?\), got \d+ at \[2\]",
    ),
    "a corpus with a post twice": (
        lambda f: _edit_corpus(f, "post_ids", 3, lambda ids: ids[9]),
        "sports_corpus.npz: post_ids must be distinct, .* appears more than once",
    ),
    "no sequence": (
        lambda f: (f / "example_sequence.json").unlink(),
        "example_sequence.json: no such file",
    ),
    "a folder in the corpus's place": (
        lambda f: ((f / "sports_corpus.npz").unlink(), (f / "sports_corpus.npz").mkdir()),
        "sports_corpus.npz: a folder, not a file",
    ),
    "a sequence that is not an object": (
        lambda f: (f / "example_sequence.json").write_text("[]"),
        'example_sequence.json: expected an object with "user_id"',
    ),
    # What a sequence holds is checked on loading, not first when a feed is asked of it.
    "a sequence with a history that is text": (
        lambda f: _edit_json(f / "example_sequence.json", history="abc"),
        'example_sequence.json: "history" must be a list of items, got str',
    ),
    "a sequence with an action beyond the ranker's": (
        lambda f: _edit_json(
            f / "example_sequence.json",
            history=[{"post_id": 1, "author_id": 2, "actions": {"99": 1}}],
        ),
        "example_sequence.json: history item 0: action index '99' is not one of the ranker's 19",
    ),
    "a sequence with a request time in milliseconds": (
        lambda f: _edit_json(f / "example_sequence.json", request_time=1_700_000_000_000),
        "example_sequence.json: request_time must be an integer of unix seconds",
    ),
    "a sequence whose user id is text": (
        lambda f: _edit_json(f / "example_sequence.json", user_id="x"),
        "example_sequence.json: user_id must be a positive integer id below 2\\*\\*63, got 'x'",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_is_refused_naming_the_file(example_folder, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    act, message = DAMAGES[damage]
    act(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_artifacts(folder)


def test_a_missing_file_is_named_before_any_model_is_read(example_folder, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    (folder / "example_sequence.json").unlink()
    monkeypatch.setattr(checkpoint, "load_model_params", lambda path: pytest.fail("read"))
    with pytest.raises(FileNotFoundError, match="example_sequence.json: no such file$"):
        load_artifacts(folder)


def _replace_corpus(folder, change):
    """Rewrites the corpus as `change(its arrays)` returns them."""
    path = folder / "sports_corpus.npz"
    write_npz(change({k: np.array(v) for k, v in read_npz(path).items()}), path)


def _edit_corpus(folder, key, index, value):
    """Sets entry `index` of the corpus's `key` to `value(the array)`."""

    def edit(corpus):
        corpus[key][index] = value(corpus[key])
        return corpus

    _replace_corpus(folder, edit)


def _edit_hash(path, **changes):
    data = json.loads(path.read_text())
    data["hash_params"].update(changes)
    path.write_text(json.dumps(data))


def _edit_npz(path, name, change):
    arrays = {key: np.array(value) for key, value in read_npz(path).items()}
    arrays[name] = change(np.asarray(arrays[name], np.float64))
    _numpy_savez(arrays, path)


def _edit_json(path, drop=None, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    data.pop(drop, None)
    path.write_text(json.dumps(data))


def test_keys_a_config_json_does_not_know_are_named(example_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    _edit_json(folder / RANKER_JSON, num_layer=2, foo=1)  # num_layer: num_layers misspelt
    with pytest.warns(
        UserWarning, match="ranker/config.json: ignored keys it does not know: foo, num_layer$"
    ):
        load_artifacts(folder)


def test_a_ranker_batch_shape_that_differs_from_retrievals_is_named(example_folder, tmp_path):
    """Both models take their batch shapes from the retrieval config, as the published pipeline
    builds them: the ranker's own values are not used, and a load says so."""
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    _edit_json(folder / RANKER_JSON, candidate_seq_len=1)
    with pytest.warns(UserWarning) as caught:
        artifacts = load_artifacts(folder)
    retrieval_seq_len = artifacts.retrieval.config.candidate_seq_len
    assert artifacts.ranker.config.candidate_seq_len == retrieval_seq_len != 1
    said = [
        f"{folder / RANKER_JSON}: candidate_seq_len 1 is not used; both models take their batch "
        f"shapes from {folder / RETRIEVAL_JSON} ({retrieval_seq_len}), as the published "
        "pipeline does"
    ]
    assert [str(w.message) for w in caught] == said
    # Written again as it was read, the folder says the same, by its own name.
    again = tmp_path / "again"
    with pytest.warns(UserWarning) as caught:
        checkpoint.write_artifacts(
            again, artifacts.retrieval, artifacts.ranker, artifacts.corpus, artifacts.sequence
        )
    assert [str(w.message) for w in caught] == [m.replace(str(folder), str(again)) for m in said]


def test_keys_a_sequence_does_not_know_are_named(example_folder, tmp_path):
    sequence = json.loads((example_folder / "example_sequence.json").read_text())
    sequence["request_tme"] = 1_700_000_000  # request_time misspelt: every post would be served
    sequence["history"][1]["dwel_time"] = 3.0
    (tmp_path / "sequence.json").write_text(json.dumps(sequence))
    with pytest.warns(UserWarning) as caught:
        assert read_sequence(tmp_path / "sequence.json") == sequence
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'sequence.json'}: ignored keys it does not know: history[].dwel_time, "
        "request_tme"
    ]


def test_arrays_a_corpus_does_not_know_are_named(example_folder, tmp_path):
    corpus = dict(read_npz(example_folder / "sports_corpus.npz"))
    corpus["creation_time"] = corpus.pop("creation_times")  # misspelt: no post would age
    write_npz(corpus, tmp_path / "corpus.npz")
    with pytest.warns(UserWarning) as caught:
        loaded = checkpoint.load_corpus(
            tmp_path / "corpus.npz", corpus["candidate_representations"].shape[1]
        )
    assert loaded.creation_times is None
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'corpus.npz'}: ignored arrays it does not know: creation_time"
    ]


def test_arrays_a_tables_file_does_not_know_are_named(example_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    path = folder / "ranker" / "embedding_tables.npz"
    write_npz({**read_npz(path), "topic_embeddings": np.ones((3, 2), np.float32)}, path)
    with pytest.warns(UserWarning) as caught:
        load_artifacts(folder)
    assert [str(w.message) for w in caught] == [
        f"{path}: ignored arrays it does not know: topic_embeddings"
    ]
    assert caught[0].filename == __file__  # said where load_artifacts was called


def test_a_request_time_without_creation_times_is_named(example_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(example_folder, folder)
    corpus = read_npz(folder / "sports_corpus.npz")
    del corpus["creation_times"]
    write_npz(corpus, folder / "sports_corpus.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no request time: nothing to say
        load_artifacts(folder)
    sequence = json.loads((folder / "example_sequence.json").read_text())
    (folder / "example_sequence.json").write_text(json.dumps({**sequence, "request_time": 5}))
    with pytest.warns(UserWarning, match="sports_corpus.npz does not hold: only the history's"):
        load_artifacts(folder)


def test_writing_into_an_existing_folder_is_refused(example_folder, tmp_path):
    with pytest.raises(ValueError, match="already exists; choose a new folder"):
        write_example(example_folder, corpus_size=10, vocab_size=10)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file, not a folder; choose a new folder"):
        write_example(tmp_path / "notes.txt", corpus_size=10, vocab_size=10)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "model, change, message",
    [
        ("ranker", dict(release=1), "build its config with release=2"),
        ("retrieval", dict(enable_linear_proj=False), "build its config with enable_linear_proj"),
        ("ranker", dict(history_seq_len=5), r"the ranker's history_seq_len \(5\) differs from"),
    ],
)
def test_models_a_folder_cannot_describe_are_refused_before_writing(
    example_folder, tmp_path, model, change, message
):
    """A folder's batch shapes are the retrieval config's and its models the published
    pipeline's kinds: what would load back as another model is not written."""
    artifacts = load_artifacts(example_folder)
    parts = {"retrieval": artifacts.retrieval, "ranker": artifacts.ranker}
    parts[model] = dataclasses.replace(
        parts[model], config=dataclasses.replace(parts[model].config, **change), json=None
    )
    with pytest.raises(
        ValueError, match=f"an artifacts folder cannot hold these models: .*{message}"
    ):
        checkpoint.write_artifacts(
            tmp_path / "out",
            parts["retrieval"],
            parts["ranker"],
            artifacts.corpus,
            artifacts.sequence,
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "damage, message",
    [
        ("duplicate ids", r"sports_corpus\.npz: post_ids must be distinct"),
        ("no history", 'example_sequence.json: expected an object with "user_id" and "history"'),
        ("nan parameter", r"ranker/model_params\.npz: .* holds NaN or infinite values"),
    ],
)
def test_a_folder_that_would_not_load_back_is_not_written(
    example_folder, tmp_path, damage, message
):
    artifacts = load_artifacts(example_folder)
    corpus, sequence, ranker = artifacts.corpus, artifacts.sequence, artifacts.ranker
    if damage == "duplicate ids":
        ids = corpus.post_ids.copy()
        ids[-1] = ids[0]
        corpus = dataclasses.replace(corpus, post_ids=ids)
    elif damage == "no history":
        sequence = {"user_id": 1}
    else:
        params = {m: {n: np.array(v) for n, v in p.items()} for m, p in ranker.params.items()}
        next(iter(next(iter(params.values())).values())).flat[0] = np.nan
        ranker = dataclasses.replace(ranker, params=params)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'out'} not written: {message}"):
        checkpoint.write_artifacts(tmp_path / "out", artifacts.retrieval, ranker, corpus, sequence)
    assert not any(tmp_path.iterdir())


def test_a_folder_written_onto_a_full_disk_is_named_not_its_temporary(
    example_folder, tmp_path, monkeypatch
):
    artifacts = load_artifacts(example_folder)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for out in (tmp_path / "out", tmp_path / "link" / "out"):  # (a link: the file is named
        with pytest.raises(OSError) as caught:  # by its real path, the folder by the link's)
            checkpoint.write_artifacts(
                out, artifacts.retrieval, artifacts.ranker, artifacts.corpus, artifacts.sequence
            )
        assert str(caught.value) == (
            f"[Errno 28] {out} not written: No space left on device: "
            f"'{out / 'retrieval' / 'model_params.npz'}'"
        )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link", "real"]


def test_a_folder_that_is_not_an_artifacts_folder_is_named_as_such(tmp_path):
    (tmp_path / "run" / "artifacts").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"run holds no retrieval/ or ranker/ folder; "):
        load_artifacts(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"run/artifacts holds no retrieval/ or ranker/ "):
        load_artifacts(tmp_path / "run" / "artifacts")  # an empty folder
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder"):
        load_artifacts(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match=r"missing: no such folder"):
        load_artifacts(tmp_path / "missing")


def test_a_checkpoint_of_the_other_release_names_the_config_that_takes_it(tmp_path, monkeypatch):
    """Into a first-release runner, a second-release checkpoint is refused with the config that
    would take it, and the reverse (naming PHOENIX_RELEASE when it chose the release)."""
    first = Setup(num_layers=2)
    save_model_params(ranking_params(SECOND), tmp_path / "second.npz")
    save_model_params(ranking_params(first), tmp_path / "first.npz")
    runner = runners.ModelRunner(first.ranking_config())
    with pytest.raises(ValueError, match="release 2 ranker: build the config with release=2"):
        runner.load_or_init(*fixed_example(), checkpoint_path=tmp_path / "second.npz")
    runner2 = runners.ModelRunner(SECOND.ranking_config())
    with pytest.raises(ValueError, match="release 1 ranker: build the config with release=1"):
        runner2.load_or_init(*fixed_example(), checkpoint_path=tmp_path / "first.npz")
    loaded = runner2.load_or_init(*fixed_example(), checkpoint_path=tmp_path / "second.npz")
    want = ranking_params(SECOND)["phoenix_model"]["proj_mat_3"]
    np.testing.assert_array_equal(loaded.params["phoenix_model"]["proj_mat_3"], want)
    monkeypatch.setenv("PHOENIX_RELEASE", "2")
    runner3 = runners.ModelRunner(dataclasses.replace(first.ranking_config(), release=None))
    with pytest.raises(ValueError, match="with release=1; PHOENIX_RELEASE=2 made it the default"):
        runner3.load_or_init(*fixed_example(), checkpoint_path=tmp_path / "first.npz")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: checkpoint.configs_from_json({}, {}, {}), ValueError,
         r"a config.json lacks 'emb_size' \(check_config_json checks one\)"),
        (lambda: checkpoint.configs_from_json(None, {}, {}), TypeError,
         "retrieval_json must be a dict, got NoneType"),
        (lambda: checkpoint.save_embedding_tables([1], "x.npz"), TypeError,
         "tables must be a dict, got list"),
        (lambda: checkpoint.unflatten_params(None), TypeError, "flat must be a dict, got None"),
        (lambda: checkpoint.release_of(None), TypeError, "params must be a dict, got NoneType"),
        (lambda: checkpoint.with_log_temperature([]), TypeError, "params must be a dict, got li"),
        (lambda: checkpoint.config_to_json(None, None), TypeError,
         "config must be a PhoenixModelConfig or PhoenixRetrievalModelConfig, got NoneType"),
        (lambda: checkpoint.param_shapes(Setup().ranking_config(), num_actions=0), ValueError,
         "num_actions must be an integer >= 1 or None, got 0"),  # it took 19
        (lambda: checkpoint.write_artifacts("x", None, None, None, None), TypeError,
         "retrieval must be a ModelArtifacts, got NoneType"),
        # These ended in pathlib's "expected str, bytes or os.PathLike object", naming nothing.
        (lambda: checkpoint.read_npz(None), TypeError,
         r"path must be a str or PathLike \(a file or folder name\), got NoneType"),
        (lambda: checkpoint.load_model_params(None), TypeError, "checkpoint_path must be a str"),
        (lambda: checkpoint.load_artifacts(None), TypeError, "directory must be a str or PathL"),
        (lambda: checkpoint.write_npz({}, 3), TypeError, "path must be a str or PathLike"),
        (lambda: checkpoint.write_npz(None, "x.npz"), TypeError,
         "arrays must be a dict of arrays by name, got NoneType"),
        (lambda: checkpoint.write_npz({3: np.ones(2)}, "x.npz"), TypeError,
         "x.npz: array names must be strings, got 3"),
        (lambda: checkpoint.write_npz({"": np.ones(2)}, "x.npz"), ValueError,
         "x.npz: an array name is empty"),
        (lambda: checkpoint.write_npz({"r": [[1, 2], [3]]}, "x.npz"), ValueError,
         "r is not an array"),
        (lambda: checkpoint.read_npz(""), ValueError, "path is empty; expected a file or folder"),
        (lambda: checkpoint.load_corpus(None, 8), TypeError, "path must be a str or PathLike"),
        (lambda: checkpoint.load_corpus("c.npz", "8"), ValueError,
         "emb_size must be an integer >= 1, got '8'"),
    ],
)  # fmt: skip
def test_functions_of_the_layout_refuse_arguments_of_the_wrong_kind(call, error, message):
    """Each ended in an AttributeError or a KeyError from inside, or (num_actions 0) went on."""
    with pytest.raises(error, match=message):
        call()


def test_a_second_release_tree_without_its_continuous_head_is_named_as_such(example_folder):
    """It was reported as a config.json lacking the parameter's name."""
    jsons = [
        json.loads((example_folder / kind / "config.json").read_text())
        for kind in ("retrieval", "ranker")
    ]
    params = checkpoint.load_model_params(example_folder / "ranker" / "model_params.npz")
    del params["phoenix_model"]["continuous_unembeddings"]
    with pytest.raises(ValueError, match="^ranker_params: phoenix_model lacks continuous_unembed"):
        checkpoint.configs_from_json(*jsons, params)
