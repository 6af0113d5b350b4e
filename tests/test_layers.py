"""The package's import graph against the README's "Architecture" diagram."""

from __future__ import annotations

import ast
import os
import re

from twisted.trial.unittest import SynchronousTestCase

import federation_invite

from .support import source_tree_file

_PACKAGE = "federation_invite"
#: The sources of the package imported (the checkout's, or an installed one's).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(federation_invite.__file__))
#: The diagram's rows, highest first: a layer may import its own and those below it.
_LAYERS = ("edges", "services", "core")


def readme_layers() -> dict[str, list[str]]:
    """The README's diagram: each layer's names (``web/``, ``tap``, ``__init__``...) as written."""
    with open(source_tree_file("README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    diagram = section.split("```\n", 2)[1]
    layers: dict[str, list[str]] = {}
    layer = ""
    for line in diagram.splitlines():
        if line and not line[0].isspace():
            layer, _, line = line.partition(" ")
            layers[layer] = []
        # "(resources)", "(InviteHandler)": notes, not modules.
        layers[layer] += re.sub(r"\([^)]*\)", " ", line).split()
    return layers


def module_prefixes() -> dict[str, str]:
    """The diagram as dotted module names (a package covers its submodules) -> layer."""
    prefixes: dict[str, str] = {f"{_PACKAGE}.core": "core"}
    for layer, names in readme_layers().items():
        for name in names:
            if name == "twisted/plugins/":
                continue  # the plugin file lives outside the package and imports none of it
            if layer == "core":
                prefixes[f"{_PACKAGE}.core.{name}"] = layer
            elif name == "__init__":
                prefixes[_PACKAGE] = layer
            else:
                prefixes[f"{_PACKAGE}.{name.rstrip('/')}"] = layer
    return prefixes


def package_modules() -> dict[str, str]:
    """Every module of the package: dotted name -> its file."""
    modules = {}
    for directory, _, files in os.walk(_PACKAGE_DIR):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(directory, file)
            parts = [_PACKAGE, *os.path.relpath(path, _PACKAGE_DIR)[:-3].split(os.sep)]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it (inside functions
    and ``TYPE_CHECKING`` blocks too)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from .web import site" imports the module web.site; "from .web.site import X"
            # the module web.site.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in modules)
    return found


def layer_of(module: str, prefixes: dict[str, str]) -> str | None:
    """The layer of ``module``: that of the diagram's longest name covering it, if any."""
    best = max(
        (prefix for prefix in prefixes if module == prefix or module.startswith(prefix + ".")),
        key=len,
        default=None,
    )
    return None if best is None else prefixes[best]


class LayerTests(SynchronousTestCase):
    def test_diagram_names_existing_modules(self) -> None:
        """Every name in the README's diagram is a module or package of ours."""
        self.assertEqual(set(readme_layers()), set(_LAYERS))
        modules = package_modules()
        for prefix in module_prefixes():
            covered = [name for name in modules if name == prefix or name.startswith(prefix + ".")]
            self.assertTrue(covered, f"{prefix} is no module or package of ours")

    def test_imports_point_down(self) -> None:
        """No module imports one of a higher layer (core < services < edges), as the README's
        "Three layers, one direction of dependency" says; every module is in the diagram."""
        prefixes = module_prefixes()
        modules = package_modules()
        rank = {layer: len(_LAYERS) - index for index, layer in enumerate(_LAYERS)}
        unplaced, upward = [], []
        for name, path in sorted(modules.items()):
            layer = layer_of(name, prefixes)
            if layer is None:
                unplaced.append(name)
                continue
            for target in sorted(imported_modules(name, path, modules)):
                target_layer = layer_of(target, prefixes)
                if target_layer is not None and rank[target_layer] > rank[layer]:
                    upward.append(f"{name} ({layer}) imports {target} ({target_layer})")
        self.assertEqual(unplaced, [], "modules missing from the README's diagram")
        self.assertEqual(upward, [])

    def test_import_resolution(self) -> None:
        """The helper finds relative, absolute, submodule and function-level imports."""
        modules = package_modules()
        self.assertEqual(
            imported_modules(f"{_PACKAGE}.tap", os.path.join(_PACKAGE_DIR, "tap.py"), modules),
            {f"{_PACKAGE}.config", f"{_PACKAGE}.logs", f"{_PACKAGE}.service"},
        )
        self.assertIn(
            f"{_PACKAGE}.web.site",
            imported_modules(_PACKAGE, os.path.join(_PACKAGE_DIR, "__init__.py"), modules),
        )


class PackageTests(SynchronousTestCase):
    def test_walk_packages_finds_every_module(self) -> None:
        """Every subpackage has an ``__init__.py`` (none is a namespace package), so
        ``pkgutil.walk_packages`` (and coverage's source discovery) find all the modules."""
        import pkgutil

        found = {
            module.name
            for module in pkgutil.walk_packages(federation_invite.__path__, f"{_PACKAGE}.")
        }
        self.assertIn(f"{_PACKAGE}.web.site", found)
        self.assertEqual(found, set(package_modules()) - {_PACKAGE})
