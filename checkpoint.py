"""Parameter trees and embedding tables in the published npz layout, artifacts folders, and the
checks that a tree fits a model.

A parameter file holds one array per parameter, named `module_path/param_name`; an embedding
file holds `user_embeddings`, `item_embeddings` and `author_embeddings`. An artifacts folder,
as the published pipeline reads it:

    retrieval/  model_params.npz  embedding_tables.npz  config.json
    ranker/     model_params.npz  embedding_tables.npz  config.json
    <corpus>.npz         post_ids [N], candidate_representations [N, D], author_ids [N], topics
    <sequence>.json      {"user_id": ..., "history": [{"post_id", "author_id", "actions"}, ...]}

Reading memory-maps what the file stores uncompressed (np.savez does), so that a 1.5 GB table
costs no copy, and checks every array (the zip's CRC, finite values, names, shapes) before
anything is returned: a file that is missing, truncated, corrupt, holds NaN or does not fit the
model is refused with one line naming the file and the first problem. Writing goes to a
temporary name renamed at the end, so an interrupted save never leaves a file or a folder that
looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import FLOAT32_MAX, TransformerConfig
from recsys_model import (
    ACTIONS,
    CONTINUOUS_LOSS_TYPES,
    RELEASE_VARIABLE,
    ContinuousActionConfig,
    HashConfig,
    NormConfig,
    PhoenixModelConfig,
    dummy_inputs,
    is_integer,
    is_number,
    require_kind,
)
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from search import first_repeated
from tables import ENTITIES, TABLE_NAMES, Hashing

PARAMS_FILE = "model_params.npz"
TABLES_FILE = "embedding_tables.npz"
CONFIG_FILE = "config.json"
# The published pipeline's file names in an artifacts folder.
DEFAULT_SEQUENCE_FILE = "example_sequence.json"
DEFAULT_CORPUS_FILE = "sports_corpus.npz"
# The published pipeline creates this top-level retrieval parameter and requires it.
LOG_TEMPERATURE = ("~", "log_temperature")
# The published pipeline fixes these when it builds a model from config.json.
PUBLISHED_WIDENING = 2.0
PUBLISHED_MULTIPLIER = 0.125
INT32 = np.iinfo(np.int32)
# Bytes read at a time when checking an array's CRC and values.
CHUNK_BYTES = 64 << 20

ModelConfig = PhoenixModelConfig | PhoenixRetrievalModelConfig


# ---------------------------------------------------------------------------------------------
# npz files: memory-mapped, checked, written atomically.
# ---------------------------------------------------------------------------------------------


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _member_array(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member, its CRC and values checked. Stored uncompressed (as np.savez writes),
    it is checked by streaming reads and returned memory-mapped, so that only the rows used
    later are ever in memory; compressed, it is read whole."""
    with archive.open(info) as f:
        try:  # a damaged magic string or header is named with its file
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None or info.compress_type != zipfile.ZIP_STORED:
                f.seek(0)
                array = np.lib.format.read_array(f, allow_pickle=False)
            else:
                array = None
                shape, fortran, dtype = read_header(f)
                header_size = f.tell()
        except ValueError as error:
            raise ValueError(f"{path}: {info.filename}: {error}") from None
    if array is not None:
        _check_number_type(path, info, array.dtype)
        if problem := _float32_problem(array):
            raise ValueError(f"{path}: {info.filename[:-4]} {problem}")
        return array
    if dtype.hasobject:
        raise ValueError(f"{path}: {info.filename} holds Python objects; expected numbers")
    _check_number_type(path, info, dtype)
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(zipfile.sizeFileHeader)
        name_length, extra_length = np.frombuffer(local[26:30], "<u2")
        start = info.header_offset + zipfile.sizeFileHeader + int(name_length) + int(extra_length)
        if start + info.file_size > path.stat().st_size:
            raise ValueError(f"{path}: {info.filename} is truncated")
        raw.seek(start)
        crc = zlib.crc32(raw.read(header_size))
        data_bytes, wanted_bytes = info.file_size - header_size, math.prod(shape) * dtype.itemsize
        problem = None
        step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
        for begin in range(header_size, info.file_size, step):
            chunk = raw.read(min(step, info.file_size - begin))
            crc = zlib.crc32(chunk, crc)
            if dtype.kind in "fc" and data_bytes == wanted_bytes and not problem:
                problem = _float32_problem(np.frombuffer(chunk, dtype))
    if crc != info.CRC:
        raise ValueError(f"{path}: {info.filename} is corrupt (its checksum does not match)")
    if data_bytes != wanted_bytes:
        raise ValueError(
            f"{path}: {info.filename} holds {data_bytes} bytes of data where its header asks for "
            f"{list(shape)} {dtype} ({wanted_bytes} bytes)"
        )
    if problem:
        raise ValueError(f"{path}: {info.filename[:-4]} {problem}")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype, mode="r", offset=start + header_size, shape=shape, order=order)


def _float32_problem(values: np.ndarray) -> str | None:
    """What makes these values unusable by a model that computes in float32 (or narrower), in
    words, or None: NaN or infinity, or a magnitude beyond float32's range (float64 files; the
    real and imaginary parts of complex ones each)."""
    if values.dtype.kind not in "fc":
        return None
    if not np.isfinite(values).all():
        return "holds NaN or infinite values"
    parts = (values.real, values.imag) if values.dtype.kind == "c" else (values,)
    if parts[0].dtype.itemsize > 4:
        largest = max(float(np.max(np.abs(x), initial=0.0)) for x in parts)
        if largest > float(np.finfo(np.float32).max):
            return f"holds values beyond float32's range (a magnitude of {largest:.3g})"
    return None


def _check_number_type(path: Path, info: zipfile.ZipInfo, dtype: np.dtype) -> None:
    if dtype.kind == "V":  # numpy writes bfloat16 and other `ml_dtypes` as raw bytes
        raise ValueError(
            f"{path}: {info.filename[:-4]} has raw dtype {dtype.str}, not numbers (bfloat16 "
            "saved by numpy is so; write_npz stores it as float32)"
        )


def as_path(value: Any, name: str = "path") -> Path:
    """`value` as a Path, or TypeError naming `name` unless it is a str or os.PathLike."""
    require_kind(value, str | os.PathLike, name, " (a file or folder name)")
    if not os.fspath(value):  # Path("") is the current folder
        raise ValueError(f"{name} is empty; expected a file or folder name")
    return Path(value)


def require_file(path: str | os.PathLike, hint: str = "") -> Path:
    """`path` as a Path if it is a regular file; else FileNotFoundError saying what is there
    instead (nothing, a folder, or a device, pipe or socket), followed by `hint`."""
    path = as_path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: a folder, not a file{hint}")
    if path.exists() and not path.is_file():
        raise FileNotFoundError(f"{path}: not a regular file (a device, pipe or socket){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file{hint}")
    return path


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name, memory-mapped where it is stored uncompressed.

    Raises FileNotFoundError if the file is missing and ValueError if it is not a readable
    npz (truncated, corrupt, holding objects, or floats that are not finite or are beyond
    float32's range), naming the file and the first problem. Nothing is returned unless every
    array passed.
    """
    path = require_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"{path}: {info.filename} is not an array")
                arrays[info.filename[: -len(".npy")]] = _member_array(path, archive, info)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        if "CRC" in str(error):  # zipfile checked a small member whole
            raise ValueError(
                f"{path}: {error}: it is corrupt (its checksum does not match)"
            ) from None
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    except zlib.error as error:
        raise ValueError(f"{path}: corrupt ({error})") from None
    return arrays


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# `atomic_path` writes `path` as `.{path.name}.<random>{PARTIAL}` beside it, then renames it.
PARTIAL = ".partial"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to, renamed to `path` only if writing succeeds.
    A symbolic link is written through (its target is replaced, the link kept); a device, pipe
    or socket at `path` is refused before anything is written."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise ValueError(f"{path} is not a file (a folder, device, pipe or socket); choose a file")
    path = target
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder should be
        file = next(parent for parent in path.parents if parent.exists())
        raise NotADirectoryError(f"{path}: {file} is a file, not a folder") from None
    try:
        fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL, dir=path.parent)
    except OSError as error:  # named by the file asked for, not by the temporary one
        raise OSError(error.errno, f"cannot write there: {error.strerror}", str(path)) from None
    os.close(fd)
    os.chmod(scratch, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
    try:
        yield Path(scratch)
        os.replace(scratch, path)
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        # A full disk says only "No space left on device": name the file it was writing.
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


def write_npz(arrays: Mapping[str, Any], path: str | os.PathLike, compressed: bool = False) -> None:
    """Writes arrays to `path` atomically, uncompressed (memory-mappable) unless `compressed`.

    npz has no bfloat16 (nor the other narrow types of `ml_dtypes`): such floats are written as
    float32 and such integers as int32, every value exactly. What `read_npz` would refuse is
    not written: arrays of Python objects (TypeError), and floats that are NaN, infinite or
    float64 beyond float32's range (ValueError naming the file and the array)."""
    require_kind(arrays, Mapping, "arrays", " of arrays by name")
    path = as_path(path)
    for name in arrays:
        if not isinstance(name, str):
            raise TypeError(f"{path}: array names must be strings, got {name!r}")
        if not name:
            raise ValueError(f"{path}: an array name is empty")
    stored = {name: _storable(name, value) for name, value in arrays.items()}
    for name, x in stored.items():
        if problem := _float32_problem(x):
            raise ValueError(f"{path}: {name} {problem}")
    # The layout of np.savez, written here because np.savez takes the names as keywords beside
    # its own (an array named "allow_pickle" was dropped without a word).
    compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with atomic_path(path) as scratch, zipfile.ZipFile(scratch, "w", compression) as archive:
        for name, x in stored.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, x, allow_pickle=False)


def _storable(name: str, value: Any) -> np.ndarray:
    """`value` as an array npz holds as it is (see `write_npz`)."""
    try:
        x = np.asarray(value)
    except ValueError as error:  # nested lists of unequal lengths
        raise ValueError(f"{name} is not an array ({error})") from None
    if x.dtype.kind == "V" and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(np.float32)
    if x.dtype.kind == "V" and jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(np.int32)
    if x.dtype.hasobject or x.dtype.kind == "V":
        raise TypeError(f"{name}: an array of {x.dtype} cannot be written to npz")
    return x


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Writes `data` as indented JSON to `path` atomically."""
    with atomic_path(as_path(path)) as scratch:
        scratch.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Parameter trees.
# ---------------------------------------------------------------------------------------------


def flatten_params(params: hk.Params) -> dict[str, Any]:
    """{"module/name": array} of a Haiku parameter tree (module -> name -> array)."""
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise TypeError(
            "params must be a Haiku parameter tree, a dict of modules each a dict of arrays, "
            f"got {type(params).__name__}"
        )
    if set(params) == {"model", "tables"} and isinstance(params["model"], Mapping):
        raise TypeError(
            "params: a trained state's parameters, {'model': ..., 'tables': ...} (train.fit, "
            "train.load_trained); the model's tree is params['model']"
        )
    for module, leaves in params.items():
        for name in leaves:
            if not isinstance(name, str) or "/" in name:
                raise ValueError(
                    f"params: {module}'s parameter name {name!r} must be a string without '/' "
                    "(the layout splits each key at its last '/')"
                )
    return {f"{m}/{n}" if m else n: v for m, leaves in params.items() for n, v in leaves.items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The published rule: each key splits at its last "/" into module path and parameter
    name; a key without "/" goes under module ""."""
    require_kind(flat, Mapping, "flat")
    params: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        module, _, name = key.rpartition("/")
        params.setdefault(module, {})[name] = value
    return params


def load_model_params(checkpoint_path: str | os.PathLike) -> dict[str, dict[str, jax.Array]]:
    """A parameter tree from an npz in the published layout, arrays converted as `jnp.array`
    converts them (float64 to float32, int64 to int32 unless x64 is on). Checked as
    `read_npz` checks; refuses objects (the published loader would unpickle them) and integers
    that int32 would not hold when it is their type."""
    flat = read_npz(as_path(checkpoint_path, "checkpoint_path"))
    for name, x in flat.items():
        if not _numbers(x.dtype):
            raise ValueError(
                f"{checkpoint_path}: {name} holds {x.dtype} values, not numbers: not a file of "
                "model parameters"
            )
    if not jax.config.jax_enable_x64:  # then int64 becomes int32 and uint64 uint32
        for name, x in flat.items():
            kept = {"i": INT32, "u": np.iinfo(np.uint32)}.get(x.dtype.kind)
            if kept and x.size and (x.max() > kept.max or x.min() < kept.min):
                raise ValueError(
                    f"{checkpoint_path}: {name} holds integers beyond {kept.dtype} (from "
                    f"{x.min()} to {x.max()}), and JAX without x64 would wrap them"
                )
    return jax.tree.map(jnp.asarray, unflatten_params(flat))


def _numbers(dtype: np.dtype) -> bool:
    """Whether a parameter of this dtype is numbers (bfloat16 and bool included)."""
    return jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_


def save_model_params(params: hk.Params, checkpoint_path: str | os.PathLike) -> None:
    """Writes a parameter tree in the published layout (`module/name` keys) as `write_npz`
    writes arrays: atomically, refusing floats that loading would refuse."""
    as_path(checkpoint_path, "checkpoint_path")
    flat = flatten_params(params)
    for name, value in flat.items():
        if not _numbers(dtype := np.asarray(value).dtype):
            raise ValueError(f"{name}: a parameter must be an array of numbers, got {dtype}")
    write_npz(flat, checkpoint_path)


def load_embedding_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an embedding file (`user_embeddings`, `item_embeddings`,
    `author_embeddings`), memory-mapped and checked as `read_npz` does."""
    return read_npz(path)


def save_embedding_tables(tables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes embedding tables by name as `write_npz` writes arrays."""
    require_kind(tables, Mapping, "tables")
    write_npz(tables, path)


def param_shapes(config: ModelConfig, num_actions: int | None = None) -> hk.Params:
    """Shapes and dtypes of the parameters a model of `config` creates (nothing is computed).
    The retrieval config does not fix the number of actions: `num_actions` (default 19)."""
    require_kind(config, ModelConfig, "config")
    if num_actions is not None and not (is_integer(num_actions) and num_actions >= 1):
        raise ValueError(f"num_actions must be an integer >= 1 or None, got {num_actions!r}")
    num_actions = num_actions or getattr(config, "num_actions", None) or len(ACTIONS)
    inputs = dummy_inputs(config, num_actions)

    def init(batch, embeddings):
        model = config.make()
        if isinstance(config, PhoenixRetrievalModelConfig):
            model.build_user_representation(batch, embeddings)
            model.build_candidate_representation(batch, embeddings)
        else:
            model(batch, embeddings)

    return jax.eval_shape(hk.transform(init).init, jax.random.PRNGKey(0), *inputs)


def release_of(params: hk.Params) -> int:
    """Which published ranker release a ranking parameter tree belongs to (2: it holds the
    dwell-time projections)."""
    require_kind(params, Mapping, "params")
    return 2 if "history_dwell_time_proj1" in params.get("phoenix_model", {}) else 1


def _layer_count(paths) -> int:
    return len({p.split("/")[1] for p in paths if p.startswith("transformer/decoder_layer_")})


def _hint(got: dict, want: dict, expected: hk.Params, params: hk.Params) -> str:
    """Why a tree might not fit: another depth, the other model, the other release."""
    # (Haiku files parameters made outside any module under "~": they name no model.)
    shared = {"transformer", "~", ""}
    got_models, want_models = ({p.split("/")[0] for p in t} - shared for t in (got, want))
    if got_models and not got_models & want_models:
        return f" (they are parameters of {', '.join(sorted(got_models))}, another model)"
    if _layer_count(got) != _layer_count(want):
        return f" (the parameters have {_layer_count(got)} layers, the model {_layer_count(want)})"
    if "phoenix_model" in params and release_of(params) != release_of(expected):
        release = release_of(params)
        variable = os.environ.get(RELEASE_VARIABLE, "").strip()
        why = f"; {RELEASE_VARIABLE}={variable} made it the default" if variable else ""
        return (
            f" (these are parameters of the published release {release} ranker: build the "
            f"config with release={release}{why})"
        )
    return ""


def check_params(
    params: hk.Params, expected: hk.Params, optional: Mapping[str, tuple] = ()
) -> None:
    """Raises ValueError naming the first parameter of `params` that does not fit `expected`
    (a tree of arrays or shapes, as `param_shapes` gives): missing, extra, of another shape or
    dtype, or holding NaN or infinity. `optional` {path: shape} may be present or not."""
    got, want = flatten_params(params), flatten_params(expected)
    want_all = {
        **want,
        **{p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in dict(optional).items()},
    }
    hint = _hint(got, want, expected, params)
    for path, shape in want_all.items():
        if path not in got:
            if path in want:
                raise ValueError(
                    f"params do not fit the model: {path} {list(shape.shape)} is missing{hint}"
                )
            continue
        value = got[path]
        dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
        if np.shape(value) != shape.shape or dtype != shape.dtype:
            raise ValueError(
                f"params do not fit the model: {path} is {list(np.shape(value))} {dtype}, "
                f"the model expects {list(shape.shape)} {shape.dtype}{hint}"
            )
    for path in got:
        if path not in want_all:
            raise ValueError(f"params do not fit the model: {path} is not a parameter of it{hint}")
    # Device arrays are checked by one compiled call per set of devices they are on; host
    # arrays (read from files) where they are, without compiling a check for every shape.
    on_device = [p for p, v in got.items() if isinstance(v, jax.Array)]
    finite = {}
    for devices in {frozenset(got[p].devices()) for p in on_device}:
        paths = [p for p in on_device if frozenset(got[p].devices()) == devices]
        flags = np.asarray(_finite_flags([got[p] for p in paths])).tolist()
        finite.update(zip(paths, flags, strict=True))
    for path, value in got.items():
        ok = finite[path] if path in finite else np.isfinite(np.asarray(value)).all()
        if not ok:
            raise ValueError(f"params hold NaN or infinite values in {path}")


@jax.jit
def _finite_flags(values: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in values])


# ---------------------------------------------------------------------------------------------
# config.json <-> configs.
# ---------------------------------------------------------------------------------------------


def config_to_json(config: ModelConfig, hashing: Hashing) -> dict:
    """A model's `config.json`: the published keys, then ours (ignored by the published
    pipeline) that rebuild exactly this config."""
    require_kind(config, ModelConfig, "config")
    require_kind(hashing, Hashing, "hashing")
    t, h = config.model, config.hash_config
    data = {
        "emb_size": config.emb_size,
        "history_seq_len": config.history_seq_len,
        "candidate_seq_len": config.candidate_seq_len,
        "num_user_hashes": h.num_user_hashes,
        "num_item_hashes": h.num_item_hashes,
        "num_author_hashes": h.num_author_hashes,
        "product_surface_vocab_size": config.product_surface_vocab_size,
        "key_size": t.key_size,
        "num_heads": t.num_q_heads,
        "num_layers": t.num_layers,
        "num_actions": getattr(config, "num_actions", len(ACTIONS)),
        "post_age_granularity_mins": getattr(config, "post_age_granularity_mins", 60),
        **hashing.to_json(),
        # Ours.
        "kind": "ranker" if isinstance(config, PhoenixModelConfig) else "retrieval",
        "num_kv_heads": t.num_kv_heads,
        "widening_factor": t.widening_factor,
        "attn_output_multiplier": t.attn_output_multiplier,
        "action_names": list(ACTIONS),
    }
    if isinstance(config, PhoenixModelConfig):
        data["right_anchored_rope"] = config.right_anchored_rope
        # The dwell time's scale, read by the model (history dwell times are normalised by it)
        # as well as by training: a ranker trained on another than the default 30 s must be
        # served with it.
        data["continuous_action_config"] = dataclasses.asdict(config.continuous_action_config)
    return data


_REQUIRED_KEYS = (
    "emb_size", "history_seq_len", "candidate_seq_len", "num_user_hashes", "num_item_hashes",
    "num_author_hashes", "product_surface_vocab_size", "key_size", "num_heads", "num_layers",
    "num_actions", "user_vocab_size", "item_vocab_size", "author_vocab_size",
    "post_age_granularity_mins", "hash_params",
)  # fmt: skip


# Keys of ours in config.json, which the published pipeline ignores.
_OUR_KEYS = (
    "kind", "num_kv_heads", "widening_factor", "attn_output_multiplier", "action_names",
    "right_anchored_rope", "continuous_action_config",
)  # fmt: skip
_KNOWN_KEYS = frozenset({*_REQUIRED_KEYS, *_OUR_KEYS})


def _read_json(path: str | os.PathLike) -> Any:
    path = require_file(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_config_json(path: Path, kind: str) -> dict:
    return check_config_json(_read_json(path), path, kind)


def check_config_json(data: Any, where: str | os.PathLike, kind: str) -> dict:
    """`data` if it is the `config.json` of a `kind` model ("ranker" or "retrieval") that a
    model can be built from; else ValueError naming `where` and the first problem (and a
    warning naming the keys it does not know). Ours say which model they describe ("kind"); a
    published one does not."""
    if not isinstance(data, dict):
        text = json.dumps(data)
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"{where}: expected an object of settings, got {shown}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(missing)}")
    if data.get("kind", kind) != kind:
        raise ValueError(
            f'{where}: is the config.json of a {data["kind"]} model (its "kind"), where the '
            f"{kind}'s belongs"
        )
    problem = _config_problem(data)
    if problem:
        raise ValueError(f"{where}: {problem}")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:  # a misspelt key of ours would otherwise go unnoticed
        warnings.warn(f"{where}: ignored keys it does not know: {', '.join(unknown)}", stacklevel=3)
    return data


def _config_problem(data: dict) -> str | None:
    """The first value of a config.json that no model could be built from, in words."""
    counts = [k for k in _REQUIRED_KEYS if k != "hash_params"]
    counts += ["num_kv_heads"] if "num_kv_heads" in data else []
    for key in counts:
        if not (is_integer(data[key]) and data[key] >= 1):
            return f"{key} must be a positive integer, got {data[key]!r}"
    heads, kv_heads = data["num_heads"], data.get("num_kv_heads", data["num_heads"])
    if heads % kv_heads:
        return f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})"
    if data["key_size"] % 2:
        return f"key_size must be even (rotary positions rotate pairs), got {data['key_size']}"
    for key in ("widening_factor", "attn_output_multiplier"):
        value = data.get(key, 1.0)
        if not (is_number(value) and 0 < value < math.inf):
            return f"{key} must be a positive number, got {value!r}"
    if not isinstance(data.get("right_anchored_rope", False), bool):
        return f"right_anchored_rope must be true or false, got {data['right_anchored_rope']!r}"
    hashes = data["hash_params"]
    if not isinstance(hashes, dict):
        return f"hash_params must be an object, got {hashes!r}"
    for entity in ENTITIES:
        count = data[f"num_{entity}_hashes"]
        for key in (f"{entity}_hash_scales", f"{entity}_biases"):
            value = hashes.get(key)
            if not (
                isinstance(value, list) and all(is_integer(v) and abs(v) < 2**63 for v in value)
            ):
                return f"hash_params.{key} must be a list of int64 integers, got {value!r}"
            if len(value) != count:
                return (
                    f"hash_params.{key} holds {len(value)} values, num_{entity}_hashes is {count}"
                )
        modulus = hashes.get(f"{entity}_modulus")
        if not (is_integer(modulus) and 2 <= modulus < 2**63):
            return f"hash_params.{entity}_modulus must be an int64 integer >= 2, got {modulus!r}"
    problem = _continuous_problem(data.get("continuous_action_config", {}))
    if problem:
        return problem
    names = data.get("action_names")
    if names is not None and not (
        isinstance(names, list)
        and len(names) == data["num_actions"]
        and all(isinstance(n, str) for n in names)
        and len(set(names)) == len(names)
    ):
        return f"action_names must be {data['num_actions']} distinct names, got {names!r}"
    return None


FLOAT32_TINY = float(np.finfo(np.float32).tiny)


_CONTINUOUS = "continuous_action_config"


def _continuous_problem(data: Any) -> str | None:
    """The first value of a `continuous_action_config` object that does not fit the dataclass."""
    if not isinstance(data, dict):
        return f"{_CONTINUOUS} must be an object, got {data!r}"
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(ContinuousActionConfig)})
    if unknown:
        return f"{_CONTINUOUS} has keys ContinuousActionConfig does not: {', '.join(unknown)}"
    for key, check, expected in (
        ("loss_weight", lambda v: is_number(v) and 0 <= v < math.inf, "a number >= 0"),
        ("loss_type", lambda v: v in CONTINUOUS_LOSS_TYPES, f"one of {CONTINUOUS_LOSS_TYPES}"),
        ("tweedie_power", lambda v: is_number(v) and 1 < v < 2, "a number in (1, 2)"),
    ):
        if key in data and not check(data[key]):
            return f"{_CONTINUOUS}.{key} must be {expected}, got {data[key]!r}"
    norm, where = data.get("norm_config"), f"{_CONTINUOUS}.norm_config"
    if norm is None:
        return None
    if not isinstance(norm, dict):
        return f"{where} must be an object or null, got {norm!r}"
    unknown = sorted(set(norm) - {f.name for f in dataclasses.fields(NormConfig)})
    if unknown:
        return f"{where} has keys NormConfig does not: {', '.join(unknown)}"
    scale = norm.get("norm_scale", NormConfig.norm_scale)
    if not (is_number(scale) and FLOAT32_TINY <= scale <= FLOAT32_MAX):
        return f"{where}.norm_scale must be a positive float32 number, got {scale!r}"
    if not isinstance(norm.get("use_log", False), bool):
        return f"{where}.use_log must be true or false, got {norm['use_log']!r}"
    return None


def _continuous_config(data: Mapping[str, Any]) -> ContinuousActionConfig:
    """The ranker's `ContinuousActionConfig` from its config.json (the defaults without ours)."""
    fields = dict(data.get("continuous_action_config", {}))
    problem = _continuous_problem(fields)
    if problem:
        raise ValueError(problem)
    if fields.get("norm_config") is not None:
        fields["norm_config"] = NormConfig(**fields["norm_config"])
    return ContinuousActionConfig(**fields)


def configs_from_json(
    retrieval_json: Mapping[str, Any],
    ranker_json: Mapping[str, Any],
    ranker_params: hk.Params,
    fprop_dtype: Any = jnp.bfloat16,
) -> tuple[PhoenixRetrievalModelConfig, PhoenixModelConfig]:
    """The two configs the published pipeline builds from an artifacts folder: `num_heads` for
    query and key/value heads, widening 2 and attention multiplier 0.125 (unless our keys say
    otherwise), batch shapes of both from the retrieval config, the ranker's release and
    continuous-head sizes from its own parameters, its dwell time's scale from our
    `continuous_action_config` (the default without it)."""
    require_kind(retrieval_json, Mapping, "retrieval_json")
    require_kind(ranker_json, Mapping, "ranker_json")
    require_kind(ranker_params, Mapping, "ranker_params")
    try:
        return _configs_from_json(retrieval_json, ranker_json, ranker_params, fprop_dtype)
    except KeyError as missing:  # `check_config_json` names every key it needs, and where
        raise ValueError(f"a config.json lacks {missing} (check_config_json checks one)") from None


def _configs_from_json(retrieval_json, ranker_json, ranker_params, fprop_dtype):

    def transformer(data):
        return TransformerConfig(
            emb_size=int(data["emb_size"]),
            key_size=int(data["key_size"]),
            num_q_heads=int(data["num_heads"]),
            num_kv_heads=int(data.get("num_kv_heads", data["num_heads"])),
            num_layers=int(data["num_layers"]),
            widening_factor=float(data.get("widening_factor", PUBLISHED_WIDENING)),
            attn_output_multiplier=float(data.get("attn_output_multiplier", PUBLISHED_MULTIPLIER)),
        )

    def common(data):
        return dict(
            model=transformer(data),
            emb_size=int(data["emb_size"]),
            history_seq_len=int(retrieval_json["history_seq_len"]),
            candidate_seq_len=int(retrieval_json["candidate_seq_len"]),
            fprop_dtype=fprop_dtype,
            hash_config=HashConfig(
                int(data["num_user_hashes"]),
                int(data["num_item_hashes"]),
                int(data["num_author_hashes"]),
            ),
            product_surface_vocab_size=int(data["product_surface_vocab_size"]),
        )

    retrieval = PhoenixRetrievalModelConfig(**common(retrieval_json))
    model = ranker_params.get("phoenix_model", {})
    release = release_of(ranker_params)
    extra = {}
    if release == 2:
        if "continuous_unembeddings" not in model:  # (history_dwell_time_proj1 made it 2)
            raise ValueError(
                "ranker_params: phoenix_model lacks continuous_unembeddings, which the second "
                "release's ranker has"
            )
        extra = dict(
            num_continuous_actions=int(np.shape(model["continuous_unembeddings"])[1]),
            continuous_action_hidden_dim=int(np.shape(model["history_dwell_time_proj1"])[1]),
        )
    ranker = PhoenixModelConfig(
        num_actions=int(ranker_json["num_actions"]),
        post_age_granularity_mins=int(ranker_json["post_age_granularity_mins"]),
        right_anchored_rope=bool(ranker_json.get("right_anchored_rope", False)),
        continuous_action_config=_continuous_config(ranker_json),
        release=release,
        **common(ranker_json),
        **extra,
    )
    return retrieval, ranker


# ---------------------------------------------------------------------------------------------
# Artifacts folders.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelArtifacts:
    """One model of an artifacts folder."""

    config: ModelConfig
    params: hk.Params
    tables: dict[str, np.ndarray]  # user_embeddings, item_embeddings, author_embeddings
    hashing: Hashing
    # The config.json it was read from (keys of ours included); written from `config` if None.
    json: dict | None = None


@dataclasses.dataclass
class Corpus:
    """Posts to retrieve from: ids, their candidate-tower vectors and authors (and optionally
    topics and, ours, creation times in unix seconds)."""

    post_ids: np.ndarray  # [N] int64
    candidate_representations: np.ndarray  # [N, D]
    author_ids: np.ndarray  # [N] int64
    topics: np.ndarray | None = None  # [N]
    creation_times: np.ndarray | None = None  # [N] int64

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Artifacts:
    retrieval: ModelArtifacts
    ranker: ModelArtifacts
    corpus: Corpus
    sequence: dict


def _check_tables(tables: dict, hashing: Hashing, emb_size: int, where: Path) -> None:
    for entity, name in TABLE_NAMES.items():
        want = (getattr(hashing, entity).vocab_size, emb_size)
        if name not in tables:
            raise ValueError(f"{where}: lacks {name}")
        if tables[name].shape != want or tables[name].dtype.kind != "f":
            raise ValueError(
                f"{where}: {name} is {list(tables[name].shape)} {tables[name].dtype}, "
                f"config.json asks for {list(want)} floats"
            )
    if unknown := sorted(set(tables) - set(TABLE_NAMES.values())):
        warnings.warn(
            f"{where}: ignored arrays it does not know: {', '.join(unknown)}", stacklevel=4
        )


def _load_model(
    folder: Path, config: ModelConfig, data: dict, params: hk.Params, optional: dict
) -> ModelArtifacts:
    try:
        check_params(params, param_shapes(config, int(data["num_actions"])), optional)
    except ValueError as error:
        raise ValueError(f"{folder / PARAMS_FILE}: {error}") from None
    hashing = Hashing.from_json(data)
    tables_path = folder / TABLES_FILE
    tables = load_embedding_table(tables_path)
    _check_tables(tables, hashing, config.emb_size, tables_path)
    return ModelArtifacts(config, params, tables, hashing, data)


def load_corpus(path: str | os.PathLike, emb_size: int) -> Corpus:
    """A corpus file, memory-mapped and checked (matching lengths, width D, distinct positive
    integer ids)."""
    path = as_path(path)
    if not is_integer(emb_size) or emb_size < 1:
        raise ValueError(f"emb_size must be an integer >= 1, got {emb_size!r}")
    arrays = read_npz(path)
    for key in ("post_ids", "candidate_representations", "author_ids"):
        if key not in arrays:
            raise ValueError(f"{path}: lacks {key}")
    corpus = Corpus(**{k: arrays[k] for k in arrays if k in Corpus.__dataclass_fields__})
    n = len(corpus.post_ids)
    if n == 0:
        raise ValueError(f"{path}: holds no post (post_ids is empty)")
    if corpus.candidate_representations.dtype.kind != "f":
        raise ValueError(
            f"{path}: candidate_representations must be floats, got "
            f"{corpus.candidate_representations.dtype}"
        )
    if corpus.candidate_representations.shape != (n, emb_size):
        raise ValueError(
            f"{path}: candidate_representations is {list(corpus.candidate_representations.shape)},"
            f" expected [{n}, {emb_size}] (one row of width D per post)"
        )
    for key in ("post_ids", "author_ids", "topics", "creation_times"):
        value = getattr(corpus, key)
        if value is not None and value.shape != (n,):
            raise ValueError(f"{path}: {key} has shape {list(value.shape)}, expected [{n}]")
    for key in ("post_ids", "author_ids", "creation_times"):
        ids = getattr(corpus, key)
        if ids is not None and ids.dtype.kind not in "iu":
            raise ValueError(f"{path}: {key} must be integers, got {ids.dtype}")
    for key in ("post_ids", "author_ids"):  # ids as the sequence's: 0 is padding when hashed
        ids = getattr(corpus, key)
        bad = np.flatnonzero((ids < 1) | (ids > np.iinfo(np.int64).max))
        if len(bad):
            raise ValueError(
                f"{path}: {key} must be positive integers that int64 holds, got {ids[bad[0]]} "
                f"at [{bad[0]}]"
            )
    if (repeated := first_repeated(corpus.post_ids)) is not None:
        raise ValueError(f"{path}: post_ids must be distinct, {repeated} appears more than once")
    times = corpus.creation_times
    bad = np.flatnonzero((times < 0) | (times >= 2**31)) if times is not None else []
    if len(bad):
        raise ValueError(
            f"{path}: creation_times must be unix seconds in [0, 2**31) (the models take times "
            f"as int32; milliseconds?), got {times[bad[0]]} at [{bad[0]}]"
        )
    unknown = sorted(set(arrays) - set(Corpus.__dataclass_fields__))
    if unknown:  # a misspelt creation_times would otherwise go unnoticed
        warnings.warn(
            f"{path}: ignored arrays it does not know: {', '.join(unknown)}", stacklevel=2
        )
    return corpus


# What a user sequence and its history items hold: the published keys, and ours (a request
# time, dwell times).
SEQUENCE_KEYS = frozenset({"user_id", "history", "request_time"})
HISTORY_ITEM_KEYS = frozenset({"post_id", "author_id", "actions", "dwell_time"})


class SequenceFile(dict):
    """A user sequence as `read_sequence` read it: a dict whose unknown keys were named then."""


def read_sequence(path: str | os.PathLike) -> SequenceFile:
    """A user sequence file: {"user_id", "history": [{"post_id", "author_id", "actions"}]}.
    Keys it does not know are named in a warning (a misspelt "request_time" would otherwise
    serve posts of the future)."""
    sequence = _read_json(path)
    if not isinstance(sequence, dict) or "user_id" not in sequence or "history" not in sequence:
        raise ValueError(f'{path}: expected an object with "user_id" and "history"')
    warn_unknown_sequence_keys(sequence, path, stacklevel=3)
    return SequenceFile(sequence)


def warn_unknown_sequence_keys(sequence: Mapping, where: Any, stacklevel: int = 2) -> None:
    """A warning naming the keys of a user sequence (an object) that nothing reads."""
    unknown = {str(key) for key in sequence} - SEQUENCE_KEYS
    if isinstance(sequence.get("history"), list):
        items = [item for item in sequence["history"] if isinstance(item, Mapping)]
        unknown |= {
            f"history[].{key}" for item in items for key in set(map(str, item)) - HISTORY_ITEM_KEYS
        }
    if unknown:
        names = ", ".join(sorted(unknown))
        warnings.warn(f"{where}: ignored keys it does not know: {names}", stacklevel=stacklevel)


def check_sequence_object(sequence: Any) -> None:
    if not isinstance(sequence, Mapping):
        raise TypeError(
            'sequence must be an object with "user_id" and "history", got '
            f"{type(sequence).__name__}"
        )


def _positive_int(value: Any, what: str) -> int:
    """An id of a sequence: a positive integer that int64 holds (X's ids are)."""
    if not (is_integer(value) and 1 <= value < 2**63):
        raise ValueError(f"{what} must be a positive integer id below 2**63, got {value!r}")
    return value


def read_history(
    sequence: Mapping[str, Any], history_len: int, num_actions: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(user id, post ids [S], author ids [S], actions [S, A], dwell seconds [S] or None) of
    the first `history_len` items of a sequence, left-aligned and padded with 0.

    Action values must be 0 or 1 and indices in [0, num_actions); an item without "actions"
    has none (a misspelt key is warned of as unknown where the sequence is read); a history
    item may also carry "dwell_time" (seconds), which the second release's ranker reads.
    """
    check_sequence_object(sequence)
    user_id = _positive_int(sequence.get("user_id"), "user_id")
    posts, authors = np.zeros(history_len, np.int64), np.zeros(history_len, np.int64)
    ids = history_post_ids(sequence, history_len)  # checks that each item is an object
    posts[: len(ids)] = ids
    actions = np.zeros((history_len, num_actions), np.float32)
    dwell = np.zeros(history_len, np.float32)
    history = sequence["history"]
    for i, item in enumerate(history[:history_len]):
        authors[i] = _positive_int(item.get("author_id"), f"history item {i}: author_id")
        item_actions = item.get("actions", {})
        if not isinstance(item_actions, dict):
            raise ValueError(
                f"history item {i}: actions must be an object of action index to 0 or 1, got "
                f"{item_actions!r}"
            )
        for key, value in item_actions.items():
            text = str(key)
            digits = text.isascii() and text.isdigit() and len(text) <= 9  # (int() of 5,000 fails)
            if not digits or int(text) >= num_actions:
                shown = repr(key) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} digits)"
                raise ValueError(
                    f"history item {i}: action index {shown} is not one of the ranker's "
                    f"{num_actions} actions"
                )
            if not (isinstance(value, bool | np.bool_) or is_number(value)) or value not in (0, 1):
                raise ValueError(f"history item {i}: action {key} is {value!r}, expected 0 or 1")
            actions[i, int(key)] = value
        seconds = item.get("dwell_time", 0.0)
        if not (is_number(seconds) and 0 <= seconds <= FLOAT32_MAX):
            raise ValueError(
                f"history item {i}: dwell_time must be a finite number of seconds >= 0, got "
                f"{seconds!r}"
            )
        dwell[i] = seconds
    has_dwell = any("dwell_time" in item for item in history[:history_len])
    return user_id, posts, authors, actions, (dwell if has_dwell else None)


def history_post_ids(sequence: Mapping[str, Any], count: int | None = None) -> np.ndarray:
    """[H] int64: the post ids of the first `count` items of a sequence's history, or of every
    item (what a request with a time is not served again), each item checked to be an object
    with a positive integer post id."""
    check_sequence_object(sequence)
    history = sequence.get("history")
    if not isinstance(history, list):
        raise ValueError(f'"history" must be a list of items, got {type(history).__name__}')
    items = history[:count]
    ids = np.zeros(len(items), np.int64)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"history item {i} must be an object, got {item!r}")
        ids[i] = _positive_int(item.get("post_id"), f"history item {i}: post_id")
    return ids


def read_request_time(sequence: Mapping[str, Any]) -> int | None:
    """The sequence's "request_time" (unix seconds), if it has one."""
    check_sequence_object(sequence)
    value = sequence.get("request_time")
    if value is not None and not (is_integer(value) and 0 <= value < 2**31):
        raise ValueError(
            "request_time must be an integer of unix seconds in [0, 2**31) (the models take "
            f"times as int32; milliseconds?), got {value!r}"
        )
    return value


def artifact_files(
    directory: str | os.PathLike,
    corpus_file: str | os.PathLike | None = None,
    sequence_file: str | os.PathLike | None = None,
) -> list[Path]:
    """Every file `load_artifacts` reads, with the published defaults for the corpus and the
    sequence."""
    directory = as_path(directory, "directory")
    files = [
        directory / model / name
        for model in ("retrieval", "ranker")
        for name in (CONFIG_FILE, PARAMS_FILE, TABLES_FILE)
    ]
    files.append(Path(corpus_file or directory / DEFAULT_CORPUS_FILE))
    files.append(Path(sequence_file or directory / DEFAULT_SEQUENCE_FILE))
    return files


def load_artifacts(
    directory: str | os.PathLike,
    sequence_file: str | os.PathLike | None = None,
    corpus_file: str | os.PathLike | None = None,
    fprop_dtype: Any = jnp.bfloat16,
) -> Artifacts:
    """Everything an artifacts folder holds, checked before anything is returned. The ranker's
    release comes from its own parameters; the configs as `configs_from_json` builds them."""
    directory = as_path(directory, "directory")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a folder")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder")
    folders = {name: directory / name for name in ("retrieval", "ranker")}
    if not any(f.is_dir() for f in folders.values()):
        where = (
            f"a training run's artifacts are in {directory / 'artifacts'}"
            if (directory / "artifacts").is_dir()
            else "an artifacts folder holds retrieval/, ranker/, a corpus .npz and a user sequence"
        )
        raise FileNotFoundError(f"{directory} holds no retrieval/ or ranker/ folder; {where}")
    files = artifact_files(directory, corpus_file, sequence_file)
    for path in files:  # every one, before any is read
        require_file(path)
    corpus_file, sequence_file = files[-2:]
    jsons = {name: read_config_json(folder / CONFIG_FILE, name) for name, folder in folders.items()}
    params = {name: load_model_params(folder / PARAMS_FILE) for name, folder in folders.items()}
    retrieval_config, ranker_config = configs_from_json(
        jsons["retrieval"], jsons["ranker"], params["ranker"], fprop_dtype
    )
    sequence = read_sequence(sequence_file)
    try:  # what the sequence holds, as the models will read it
        read_history(sequence, retrieval_config.history_seq_len, ranker_config.num_actions)
        if read_request_time(sequence) is not None:
            history_post_ids(sequence)  # not served again: every item's, not the first S only
    except ValueError as error:
        raise ValueError(f"{sequence_file}: {error}") from None
    log_temperature = {"/".join(LOG_TEMPERATURE): ()}
    retrieval = _load_model(
        folders["retrieval"],
        retrieval_config,
        jsons["retrieval"],
        params["retrieval"],
        log_temperature,
    )
    ranker = _load_model(folders["ranker"], ranker_config, jsons["ranker"], params["ranker"], {})
    corpus = load_corpus(corpus_file, retrieval_config.emb_size)
    if sequence.get("request_time") is not None and corpus.creation_times is None:
        warnings.warn(
            f"{sequence_file}: its request_time leaves out the posts created after it, and ages "
            f"the rest, only with the corpus's creation_times, which {corpus_file} does not "
            "hold: only the history's posts are left out, and the ranker is given no post ages",
            stacklevel=2,
        )
    for key in ("history_seq_len", "candidate_seq_len"):
        ranker_value, retrieval_value = (int(jsons[name][key]) for name in ("ranker", "retrieval"))
        if ranker_value != retrieval_value:  # our writing refuses this; a folder may still hold it
            warnings.warn(
                f"{folders['ranker'] / CONFIG_FILE}: {key} {ranker_value} is not used; both "
                f"models take their batch shapes from {folders['retrieval'] / CONFIG_FILE} "
                f"({retrieval_value}), as the published pipeline does",
                stacklevel=2,
            )
    return Artifacts(retrieval, ranker, corpus, sequence)


def with_log_temperature(params: hk.Params, value: float = 0.0) -> hk.Params:
    """The retrieval tree with the top-level `log_temperature` the published pipeline requires
    (kept if present)."""
    require_kind(params, Mapping, "params")
    module, name = LOG_TEMPERATURE
    if name in params.get(module, {}):
        return params
    return {**params, module: {name: jnp.asarray(value, jnp.float32)}}


def check_new_folder(directory: str | os.PathLike) -> Path:
    """`directory` as a Path, if it does not exist yet or is empty; else ValueError."""
    directory = as_path(directory, "directory")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder; choose a new folder")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} already exists; choose a new folder or remove it")
    return directory


def _folder_problem(retrieval: PhoenixRetrievalModelConfig, ranker: PhoenixModelConfig):
    """Why an artifacts folder would not load back these two models, in words, or None."""
    if ranker.release != 2:
        return (
            "it holds the second release's ranker (the published pipeline builds that one): "
            "build its config with release=2"
        )
    if not retrieval.enable_linear_proj:
        return (
            "its retrieval model has the candidate tower's projection (the published pipeline "
            "builds that one): build its config with enable_linear_proj=True"
        )
    for field in ("history_seq_len", "candidate_seq_len"):
        if getattr(ranker, field) != getattr(retrieval, field):
            return (
                f"the ranker's {field} ({getattr(ranker, field)}) differs from the retrieval "
                f"model's ({getattr(retrieval, field)}), which a folder's batches take for both"
            )
    return None


def named_by(error: OSError, scratch: Path, path: Path, prefix: str = "") -> OSError:
    """`error`, raised while writing under the temporary `scratch`, naming `path` instead (as
    a symbolic link's target's real path too), its message after `prefix`; as it is if it
    names no file."""
    if not isinstance(error.filename, str) or error.errno is None:
        return error
    where, problem = error.filename, prefix + str(error.strerror)
    for name in (os.path.realpath(scratch), str(scratch)):
        where, problem = where.replace(name, str(path)), problem.replace(name, str(path))
    return OSError(error.errno, problem, where)


def write_artifacts(
    directory: str | os.PathLike,
    retrieval: ModelArtifacts,
    ranker: ModelArtifacts,
    corpus: Corpus,
    sequence: dict,
    corpus_file: str = DEFAULT_CORPUS_FILE,
    sequence_file: str = DEFAULT_SEQUENCE_FILE,
) -> Path:
    """Writes a complete artifacts folder, in the published layout, to a temporary folder beside
    `directory` renamed to it at the end. `directory` must not exist (or be empty).

    Models that a folder cannot describe are refused: a first-release ranker, a retrieval model
    without its candidate tower's projection, a ranker whose history or candidates differ from
    the retrieval model's (a folder's batch shapes are the retrieval config's). Heads, widening
    and attention multiplier other than the published mini model's are written in our keys of
    `config.json`, which our loading reads and the published pipeline does not. The folder is
    read back by `load_artifacts` before it is renamed: one it would refuse (NaN parameters,
    tables of the wrong shape, duplicate post ids, a sequence without a "history" key) is not
    written, and the error names the file and the problem."""
    for value, kind, name in (
        (retrieval, ModelArtifacts, "retrieval"),
        (ranker, ModelArtifacts, "ranker"),
        (corpus, Corpus, "corpus"),
        (sequence, dict, "sequence"),
    ):
        require_kind(value, kind, name)
    directory = check_new_folder(directory)
    problem = _folder_problem(retrieval.config, ranker.config)
    if problem:
        raise ValueError(f"an artifacts folder cannot hold these models: {problem}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    os.chmod(scratch, 0o777 & ~_umask())
    try:
        try:  # written, then read back as a user would, before the folder gets its name
            for name, model in (("retrieval", retrieval), ("ranker", ranker)):
                folder = scratch / name
                folder.mkdir()
                params = with_log_temperature(model.params) if name == "retrieval" else model.params
                save_model_params(params, folder / PARAMS_FILE)
                save_embedding_tables(model.tables, folder / TABLES_FILE)
                data = model.json or config_to_json(model.config, model.hashing)
                write_json(data, folder / CONFIG_FILE)
            write_npz(corpus.arrays(), scratch / corpus_file)
            (scratch / sequence_file).write_text(json.dumps(sequence, indent=1) + "\n")
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                load_artifacts(scratch, scratch / sequence_file, scratch / corpus_file)
        except (ValueError, TypeError) as error:
            raise type(error)(
                f"{directory} not written: " + str(error).replace(f"{scratch}{os.sep}", "")
            ) from None
        except OSError as error:  # a full disk, say
            raise named_by(error, scratch, directory, f"{directory} not written: ") from None
        if directory.exists():
            directory.rmdir()
        os.replace(scratch, directory)
        for warning in said:  # what loading the folder will say, named by its own path
            text = str(warning.message).replace(str(scratch), str(directory))
            warnings.warn(text, warning.category, stacklevel=2)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return directory
