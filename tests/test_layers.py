"""The house rules that import-linter cannot state: the core's external imports form an
allow-list, the package's import graph has no circle, and the public face stays small."""

from __future__ import annotations

import sys

import grimp
import pytest

import intercascade_core

ALLOWED_IN_CORE = {"numpy", "scipy", "tqdm"}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        "intercascade_core", include_external_packages=True, exclude_type_checking_imports=True
    )


def test_the_core_imports_only_the_standard_library_numpy_scipy_tqdm(graph) -> None:
    bad = {}
    for module in graph.find_descendants("intercascade_core.core") | {"intercascade_core.core"}:
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top == "intercascade_core":
                ok = imported.startswith("intercascade_core.core") or imported == "intercascade_core.errors"
            else:
                ok = top in ALLOWED_IN_CORE or top in sys.stdlib_module_names
            if not ok:
                bad.setdefault(module, []).append(imported)
    assert not bad, bad


def test_no_import_circle_among_the_package_modules() -> None:
    # type-only imports count here too: a circle through them is still a tangle to read
    graph = grimp.build_graph("intercascade_core", exclude_type_checking_imports=False)
    modules = {m for m in graph.modules if m.startswith("intercascade_core")}
    circles = [
        (a, b)
        for a in sorted(modules)
        for b in graph.find_modules_directly_imported_by(a)
        if b in modules and b != a and not b.startswith(a + ".")
        and graph.find_shortest_chain(importer=b, imported=a) is not None
        and not a.startswith(b + ".")  # a package importing its own submodule is no circle
    ]
    assert not circles, circles[:5]


def test_the_public_face_has_at_most_30_names() -> None:
    assert len(intercascade_core.__all__) <= 30
    for name in intercascade_core.__all__:
        assert getattr(intercascade_core, name) is not None
