"""The library under the package name the published ranking guide imports it by.

The guide writes `from phoenix.recsys_model import PhoenixRankingModelConfig` beside
`from grok import TransformerConfig`. Here `phoenix.<module>` is the top-level module itself,
the same object (so that classes and checks are shared), imported when first asked for; the
library keeps its flat layout and its own imports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MODULES = (
    "cli", "grok", "native_search", "search", "recsys_model", "recsys_retrieval_model",
    "tables", "world", "metrics", "checkpoint", "runners", "pipeline", "train",
)  # fmt: skip


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `phoenix.<module>` for the modules above and loads it as the flat module."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(spec.name.partition(".")[2])
        self._specs[spec.name] = module.__spec__  # which the import system is about to replace
        return module

    def exec_module(self, module) -> None:  # the flat module ran when it was imported
        module.__spec__ = self._specs.pop(module.__spec__.name)

    _specs: dict = {}


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())
