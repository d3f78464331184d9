"""The package's layout: no import cycle, and subpackages that import nothing at package level."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle():
    """Every import counts, those inside functions too (they used to hide one)."""
    graph = load_import_graph()
    edges = graph.graph()
    assert "pytest_kvmcheck.qemu.vm" in edges and edges["pytest_kvmcheck.hosts.spec"]
    assert graph.cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = load_import_graph()
    assert graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_import_the_pytest_facing_ones():
    """hosts/, qemu/, guests/, images/ and lab/ work without pytest: only run, fixtures, plugin use it."""
    edges = load_import_graph().graph()
    upper = {f"pytest_kvmcheck.{m}" for m in ("run", "fixtures", "plugin", "verdicts", "reporting")}
    for module, imports in edges.items():
        if module.split(".")[1:2] and module.split(".")[1] in ("hosts", "qemu", "guests", "images", "lab"):
            assert not imports & upper, f"{module} imports {sorted(imports & upper)}"


def test_every_suite_test_names_its_handbook_step():
    """The docstring is the test's description in HTML, Allure and JUnit: it says which handbook step."""
    import ast
    missing = []
    for path in sorted((ROOT / "suites").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                doc = ast.get_docstring(node) or ""
                if not doc.startswith("Handbook"):
                    missing.append(f"{path.name}::{node.name}")
    assert not missing, f"suite tests without a 'Handbook ...' docstring: {missing}"
