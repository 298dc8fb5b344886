"""The layers of docs/ARCHITECTURE.md ("Layers and what each may import"), checked on the
source: each module imports only from its own layer and the layers below it, and no tool or
test edits the import path. Reads the files (ast); imports nothing it checks."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each folder of detection/ is a layer (modeling and accel are the core: the detector's parts,
# built from keyword arguments, below data, evaluation and the engine); a module directly in
# detection/ must be named in TOP. So a new module in a folder is checked where it is put,
# without editing a list; a new folder or top-level module must be given its layer here
# (test_every_module_has_a_layer).
FOLDERS = {"utils": "detection.utils", "visualization": "detection.visualization", "modeling": "core",
           "accel": "core", "data": "detection.data", "evaluation": "detection.evaluation",
           "export": "detection.export", "engine": "detection.engine", "study": "detection.study",
           "benchmarking": "detection.benchmarking", "config": "detection.config"}
TOP = {"testing": "core", "cli": "top", "predictor": "top"}
_ALL = {f"detection.{name}" for name in (*FOLDERS, *TOP)}
# layer -> the detection (sub)modules it must not import
FORBIDDEN = {
    "detection.utils": {"detection"},  # nothing of detection but itself
    "detection.visualization": _ALL - {"detection.utils"},
    "detection.data": {"detection.modeling.model", "detection.engine", "detection.evaluation", "detection.config",
                       "detection.predictor", "detection.benchmarking", "detection.accel", "detection.export"},
    "detection.evaluation": {"detection.engine", "detection.modeling.model", "detection.predictor",
                             "detection.benchmarking", "detection.config", "detection.export"},
    "core": {"detection.data", "detection.evaluation", "detection.engine", "detection.predictor",
             "detection.benchmarking", "detection.cli", "detection.export", "detection.config"},
    "detection.export": {"detection.data", "detection.evaluation", "detection.engine", "detection.config",
                         "detection.predictor", "detection.benchmarking", "detection.study", "detection.cli"},
    "detection.engine": {"detection.predictor", "detection.benchmarking", "detection.cli"},
    "detection.config": {"detection.engine", "detection.evaluation", "detection.predictor", "detection.cli",
                         "detection.benchmarking", "detection.study", "detection.export"},
    "detection.study": {"detection.predictor", "detection.benchmarking"},
    "detection.benchmarking": {"detection.predictor", "detection.study"},
    "top": {"detection.benchmarking", "detection.study"},
}


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, type_checking_too: bool = False) -> set[str]:
    """Absolute module names imported anywhere in the file (also inside functions), except
    under `if TYPE_CHECKING:` (annotations only) unless asked."""
    tree = ast.parse(path.read_text())
    skipped = set()
    if not type_checking_too:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def layer_of(module: str) -> str | None:
    """The layer of a detection module by where it is: its folder's, TOP's, or core."""
    parts = module.split(".")
    if parts[0] != "detection" or len(parts) < 2:
        return None
    if (ROOT / "detection" / parts[1]).is_dir():
        return FOLDERS.get(parts[1])
    return TOP.get(parts[1])


def violations(module: str, imports: set[str], forbidden: set[str]) -> list[str]:
    own = ".".join(module.split(".")[:2])
    return sorted(name for name in imports for bad in forbidden
                  if (name == bad or name.startswith(bad + ".")) and not name.startswith(own))


def test_backbones_know_nothing_of_detection():
    bad = {module_name(p): sorted(n for n in imported_modules(p, True) if n.split(".")[0] == "detection")
           for p in python_files("backbones")}
    assert not {m: names for m, names in bad.items() if names}


def test_each_detection_module_imports_only_from_its_layer_and_below():
    found = {}
    for path in python_files("detection"):
        module = module_name(path)
        layer = layer_of(module)
        bad = violations(module, imported_modules(path), FORBIDDEN[layer]) if layer else []
        if bad:
            found[f"{module} ({layer})"] = bad
    assert not found, f"imports from a layer above (see docs/ARCHITECTURE.md): {found}"


def test_every_module_has_a_layer():
    """A folder of detection/ without a layer in FOLDERS, or a module directly in detection/
    without one in TOP, would go unchecked: name it there."""
    unplaced = [module_name(p) for p in python_files("detection")
                if module_name(p) != "detection" and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules without a layer (tests/test_layers.py FOLDERS or TOP): {unplaced}"
    assert {layer_of(f"detection.{name}") for name in ("modeling.multiscale", "modeling.refinement",
                                                        "modeling.precision", "accel.plan")} == {"core"}


def test_a_new_module_gets_its_folders_layer_and_a_new_top_level_one_none():
    assert layer_of("detection.modeling.brand_new") == "core"
    assert layer_of("detection.export.brand_new") == "detection.export"
    assert layer_of("detection.brand_new") is None and layer_of("detection.cli") == "top"


def test_tools_and_tests_import_neither_each_other_nor_edit_the_import_path():
    for path in python_files("tools") + python_files("tests"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            edits_path = (isinstance(node, ast.Attribute) and node.attr == "path"
                          and getattr(node.value, "id", None) == "sys")
            assert not edits_path, f"{path.relative_to(ROOT)}:{node.lineno}: uses the sys module's path"
        for name in imported_modules(path, True):
            top = name.split(".")[0]
            assert top != "tools" and not top.startswith(("test_", "benchmark_")), \
                f"{path.relative_to(ROOT)} imports {name}: library code goes in the library, " \
                "test helpers in tests/helpers.py, tools are loaded by path"
