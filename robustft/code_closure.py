"""Which library files a workflow script runs, and a hash of them: the code version rules carry as a param.

The closure of a script is every module of the package it imports, directly or through other modules, found by
reading the sources (``ast``), never by importing them: ``import``/``from`` statements anywhere in a module
(functions included, relative ones resolved), plus string constants naming a module of the package (the registries
``"robustft.backbones.efficientnet:EfficientNetLite0"`` and ``__import__("robustft.data.imagenet")``). The
``__init__`` of every package on the way is included, and the data files beside a package's ``__init__`` (e.g.
``robustft/data/classlists/*.json``). Snakemake's own code trigger follows the script file only; this param makes
a change anywhere in the closure rerun the rule's jobs, and a change outside it rerun none.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

#: A string constant that names a module of the package, optionally ``:attribute``.
_MODULE_STRING = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?::\w+)?$")


class CodeClosure:
    """The import closures of scripts within one package (each file is read, hashed and parsed once).

    ``cache``: a JSON file keeping each parsed file's imported names by its path and content hash, so that parsing
    the workflow again (every cluster job does) reads and hashes the sources but parses only those that changed.
    """

    def __init__(self, root: str | Path, package: str = "robustft", cache: str | Path | None = None) -> None:
        self.root = Path(root)
        self.package = package
        self.cache = Path(cache) if cache else None
        self._cached: dict[str, list[str]] = self._read_cache()
        self._used: dict[str, list[str]] = {}
        self._stale = False
        self._module_files: dict[str, Path | None] = {}
        self._digests: dict[Path, bytes] = {}
        self._deps: dict[Path, frozenset[Path]] = {}
        self._closures: dict[Path, tuple[Path, ...]] = {}

    def module_file(self, name: str) -> Path | None:
        """The source file of module ``name`` of the package (a package's ``__init__.py``), None if there is none."""
        if name not in self._module_files:
            found = None
            if name == self.package or name.startswith(self.package + "."):
                base = self.root.joinpath(*name.split("."))
                found = next((c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None)
            self._module_files[name] = found
        return self._module_files[name]

    def _module_name(self, path: Path) -> str:
        try:
            parts = list(path.relative_to(self.root).with_suffix("").parts)
        except ValueError:  # a script outside the root
            return ""
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _read_cache(self) -> dict[str, list[str]]:
        try:
            cached = json.loads(self.cache.read_text()) if self.cache else {}
        except (OSError, ValueError):
            return {}
        return cached if isinstance(cached, dict) else {}

    def save_cache(self) -> None:
        """Write the names of the files read so far to ``cache`` when any was parsed (atomically: concurrent
        writers are harmless)."""
        if self.cache is None or not self._stale:
            return
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache.parent, prefix=f".{self.cache.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(self._used, handle, sort_keys=True)
            os.replace(tmp, self.cache)
        except OSError:  # a read-only working directory: the cache only saves time
            return
        self._stale = False

    def _named_modules(self, path: Path) -> set[str]:
        """Module names ``path`` imports or names in a string (absolute; not yet filtered to the package)."""
        key = f"{self._module_name(path) or path}:{self._digest(path).hex()}"
        if key not in self._cached:
            self._cached[key] = sorted(self._parse(path))
            self._stale = True
        self._used[key] = self._cached[key]
        return set(self._cached[key])

    def _parse(self, path: Path) -> set[str]:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        here = self._module_name(path).split(".")
        depth = len(here) - (0 if path.name == "__init__.py" else 1)  # the package a relative import starts from
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: depth - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = _MODULE_STRING.match(node.value)
                if match:
                    names.add(match["module"])
        return names

    def _direct(self, path: Path) -> frozenset[Path]:
        """The package files ``path`` needs directly: each named module and the ``__init__`` of its packages."""
        if path not in self._deps:
            files = set()
            for name in self._named_modules(path):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    file = self.module_file(".".join(parts[:i]))
                    if file is not None:
                        files.add(file)
            self._deps[path] = frozenset(files)
        return self._deps[path]

    def closure(self, script: str | Path) -> tuple[Path, ...]:
        """Every package file ``script`` runs (sources, and data files beside included ``__init__`` files), sorted."""
        script = Path(script)
        if script not in self._closures:
            seen: set[Path] = set()
            todo = [script]
            while todo:
                for file in self._direct(todo.pop()) - seen:
                    seen.add(file)
                    todo.append(file)
            data = {f for init in seen if init.name == "__init__.py" for f in init.parent.iterdir()
                    if f.is_file() and f.suffix not in (".py", ".pyc")}
            self._closures[script] = tuple(sorted(seen | data))
        return self._closures[script]

    def _digest(self, path: Path) -> bytes:
        if path not in self._digests:
            self._digests[path] = hashlib.sha256(path.read_bytes()).digest()
        return self._digests[path]

    def version(self, script: str | Path, length: int = 12) -> str:
        """A hash of ``script`` and its closure: names (relative to the root) and contents."""
        digest = hashlib.sha256()
        for path in (Path(script), *self.closure(script)):
            try:
                name = str(path.relative_to(self.root))
            except ValueError:
                name = path.name
            digest.update(name.encode() + b"\0" + self._digest(path))
        return digest.hexdigest()[:length]


__all__ = ["CodeClosure"]
