"""A fused top-k search kernel for the CPU, built on first use (see native_search.cc).

On the CPU, XLA's matrix product of a few queries with a large corpus runs far below its
large-matmul rate: scoring 16 users against 1,000,000 posts costs about three reads of the
corpus or more. The C++ kernel in native_search.cc reads each corpus row once, scores it
against every query and keeps a running top-k per query, on all cores. The same library holds
the int8 first pass of `search.TwoPassIndex` (`top_k_int8`) and a loop of positioned reads
for rows of memory-mapped tables (`read_rows`).

The kernel is compiled with the machine's C++ compiler (`c++`, or `$CXX`) against the XLA FFI
headers shipped with jaxlib, the first time it is needed, and cached under
`$XDG_CACHE_HOME/phoenix-jax` (default `~/.cache/phoenix-jax`), keyed by the source, the jaxlib
version and the CPU. Without a compiler, or with `PHOENIX_NATIVE_SEARCH=0`, `available()` is
False and `search.top_k_search` uses its XLA path, which finds the same posts
(scores equal to float32 rounding: the two sum the products in different orders).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

TARGET = "phoenix_top_k"
INT8_TARGET = "phoenix_top_k_int8"
SOURCE = Path(__file__).with_name("native_search.cc")
DISABLE_VARIABLE = "PHOENIX_NATIVE_SEARCH"
# Its values, as JAX reads its own switches; unset or empty is on.
_OFF = ("0", "false", "no", "off", "n", "f")
_ON = ("", "1", "true", "yes", "on", "y", "t")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """Identifies the instruction set the library is compiled for (-march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "phoenix-jax"


def _compiler_command(output: Path) -> list[str]:
    # $CXX is a command, as make reads it: a compiler and perhaps its flags ("ccache g++").
    cxx = os.environ.get("CXX")
    try:
        compiler = shlex.split(cxx) if cxx else [shutil.which("c++") or shutil.which("g++")]
    except ValueError as error:  # unbalanced quotes
        raise RuntimeError(f"CXX={cxx!r} is not a command: {error}") from None
    if not compiler or compiler[0] is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    return [
        *compiler,
        "-O3",
        "-march=native",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-pthread",
        "-fno-math-errno",
        f"-I{jax.ffi.include_dir()}",
        str(SOURCE),
        "-o",
        str(output),
    ]


def _build() -> Path:
    """Compiles the kernel into the cache, once per source, command, jaxlib version and CPU."""
    command = _compiler_command(Path("OUTPUT"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(command), jaxlib.version.__version__):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(_cpu_signature().encode())
    library = _cache_dir() / f"native_search-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent builders never see a partial file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(_compiler_command(partial), capture_output=True, text=True)
        if result.returncode != 0:
            said = result.stderr[-2000:].strip() or f"exit status {result.returncode}, no message"
            compiler = os.environ.get("CXX") or command[0]
            raise RuntimeError(f"compiling {SOURCE.name} with {compiler} failed: {said}")
        os.replace(partial, library)
    return library


def available() -> bool:
    """Builds and registers the kernel on first call; False if it cannot be used here or
    `PHOENIX_NATIVE_SEARCH` turns it off. A value of that variable that is neither on nor off is
    a ValueError, not taken for either."""
    value = os.environ.get(DISABLE_VARIABLE, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(
            f"{DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]!r}: expected 0, false, no or off "
            "to turn the native search off, or 1, true, yes, on or nothing to leave it on"
        )
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            if value in _OFF:
                return False
            try:
                library = ctypes.cdll.LoadLibrary(str(_build()))
                for target, handler in (
                    (TARGET, library.PhoenixTopK),
                    (INT8_TARGET, library.PhoenixTopKInt8),
                ):
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
                library.phoenix_read_rows.restype = ctypes.c_int
                _state["library"] = library
                _state["ok"] = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                warnings.warn(
                    f"native top-k search unavailable, using the XLA search instead: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return bool(_state["ok"])


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def top_k(
    queries: jax.Array,  # [B, D] float32
    corpus: jax.Array,  # [N, D] float32 or bfloat16
    corpus_mask: jax.Array,  # [N] bool
    k: int,
    masked_score: float,
    threads: int = 0,
) -> tuple[jax.Array, jax.Array]:  # [B, k] float32, [B, k] int32
    """The kernel as a JAX operation (CPU only; call `available()` first).

    Exact top-k of queries · corpusᵀ with masked rows scored `masked_score`, best first, ties
    to the lower row index, as `lax.top_k` over the full score matrix. `threads` > 0 caps the
    threads (default: one per core for a large corpus). Differentiable in the queries and the
    corpus, as `lax.top_k` is: the chosen rows are held fixed.
    """
    b = queries.shape[0]
    call = jax.ffi.ffi_call(
        TARGET,
        (
            jax.ShapeDtypeStruct((b, k), jnp.float32),
            jax.ShapeDtypeStruct((b, k), jnp.int32),
        ),
        vmap_method="sequential",
    )
    return call(
        queries.astype(jnp.float32),
        corpus,
        corpus_mask.astype(jnp.bool_),
        masked_score=np.float32(masked_score),
        threads=np.int64(threads),
    )


@top_k.defjvp
def _top_k_jvp(k, masked_score, threads, primals, tangents):
    queries, corpus, corpus_mask = primals
    d_queries, d_corpus, _ = tangents
    scores, indices = top_k(queries, corpus, corpus_mask, k, masked_score, threads)
    rows = jnp.take(corpus, indices, axis=0).astype(jnp.float32)  # [B, k, D]
    d_rows = jnp.take(d_corpus, indices, axis=0).astype(jnp.float32)
    queries = queries.astype(jnp.float32)
    d_scores = jnp.einsum("bd,bkd->bk", d_queries.astype(jnp.float32), rows)
    d_scores = d_scores + jnp.einsum("bd,bkd->bk", queries, d_rows)
    d_scores = jnp.where(jnp.take(corpus_mask, indices), d_scores, 0.0)  # masked: a constant
    return (scores, indices), (d_scores, np.zeros(indices.shape, jax.dtypes.float0))


def query_levels(width: int) -> int:
    """Steps of the rounded queries of `top_k_int8` between 0 and max|q| (QueryLevels in the
    kernel): as many as int16 holds while an int32 sum of `width` products cannot overflow."""
    return min(32767, (2**31 - 1) // (128 * max(1, width)))


def top_k_int8(
    queries: jax.Array,  # [B, D] float32, finite
    codes: jax.Array,  # [N, D] int8 in [-127, 127]
    scales: jax.Array,  # [N] float32
    k: int,
    threads: int = 0,
) -> tuple[jax.Array, jax.Array]:  # [B, k] float32, [B, k] int32
    """Approximate top-k of queries · (codes * scales[:, None])ᵀ, for a first pass (CPU only;
    call `available()` first). Each query is rounded to steps of max|q| / `query_levels(D)`
    and each row's score is an exact integer dot product, scaled; ties go to the lower row.
    A corpus row x encoded as codes c and scale s scores q · x within
    |q| |x - s c| + |q - q'| |s c| (q' the rounded query, |q - q'| <= sqrt(D) step / 2) and
    float32 rounding."""
    call = jax.ffi.ffi_call(
        INT8_TARGET,
        (
            jax.ShapeDtypeStruct((queries.shape[0], k), jnp.float32),
            jax.ShapeDtypeStruct((queries.shape[0], k), jnp.int32),
        ),
        vmap_method="sequential",
    )
    return call(
        queries.astype(jnp.float32),
        codes.astype(jnp.int8),
        scales.astype(jnp.float32),
        threads=np.int64(threads),
    )


def read_rows(
    filename: str, offset: int, row_bytes: int, rows: np.ndarray, out: np.ndarray
) -> bool:
    """Reads rows `rows` [n] of a file (row r at `offset` + r * `row_bytes`) into `out`
    ([n, ...], C-contiguous, n * row_bytes bytes) by positioned reads in one native loop.
    False, with `out` untouched, when the kernel library is not available here."""
    if not available():
        return False
    rows = np.ascontiguousarray(rows, np.int64)
    fd = os.open(filename, os.O_RDONLY)
    try:
        status = _state["library"].phoenix_read_rows(
            fd,
            ctypes.c_int64(offset),
            ctypes.c_int64(row_bytes),
            rows.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int64(len(rows)),
            out.ctypes.data_as(ctypes.c_void_p),
        )
    finally:
        os.close(fd)
    if status == -1:
        raise ValueError(f"{filename}: ends before row {int(rows.max())} (the file is truncated)")
    if status:
        raise OSError(status, os.strerror(status), filename)
    return True
