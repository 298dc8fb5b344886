"""The layers of docs/ARCHITECTURE.md ("Layers and what each may import"), checked on the
source: each module imports only what its layer's row allows (MAY_IMPORT), and no tool or
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
# layer -> what else of detection it may import: layers, or single modules of a layer (the
# "may import" column of docs/ARCHITECTURE.md's table, which says the same). Anything not
# listed is refused, so a new dependency between layers is a decision made here and in the doc.
# `backbones` (the ResNet package) is a layer of its own below core.
MAY_IMPORT = {
    "detection.utils": set(),
    "detection.visualization": {"detection.utils"},
    "core": {"detection.visualization", "detection.utils", "backbones"},  # and config for annotations only
    "detection.config": {"detection.data.catalog"},  # the data-set entries' one table, imported where used
    "detection.data": {"detection.modeling.resize", "detection.utils"},
    "detection.evaluation": {"detection.data", "core", "detection.utils", "detection.visualization"},
    "detection.export": {"core", "detection.data.image_io", "detection.utils"},  # a path read as training reads it
    "detection.engine": {"detection.evaluation", "detection.data", "core", "detection.config", "detection.utils",
                         "backbones"},
    "top": {"detection.engine", "detection.config", "detection.data", "core", "detection.utils", "backbones"},
    "detection.study": {"detection.engine", "detection.config", "core", "detection.visualization", "detection.utils",
                        "backbones"},
    "detection.benchmarking": {"detection.engine", "detection.evaluation", "detection.data", "detection.config",
                               "detection.export", "detection.cli", "core", "detection.utils", "backbones"},
}
# ... except these modules of an allowed layer: evaluation is passed the model, it never builds one
NEVER = {"detection.evaluation": {"detection.modeling.model"}}


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
    if parts[0] == "backbones":
        return "backbones"
    if parts[0] != "detection" or len(parts) < 2:
        return None
    if (ROOT / "detection" / parts[1]).is_dir():
        return FOLDERS.get(parts[1])
    return TOP.get(parts[1])


def violations(module: str, imports: set[str]) -> list[str]:
    """The detection modules `module` imports that its layer may not (MAY_IMPORT, NEVER)."""
    layer, own = layer_of(module), ".".join(module.split(".")[:2])
    allowed, never = MAY_IMPORT[layer], NEVER.get(layer, set())

    def within(name: str, prefixes: set[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(name for name in imports if name.split(".")[0] in ("detection", "backbones")
                  and not name.startswith(own + ".")
                  and name != own and (within(name, never) or not (layer_of(name) == layer
                                                                    or layer_of(name) in allowed
                                                                    or within(name, allowed))))


def test_backbones_know_nothing_of_detection():
    bad = {module_name(p): sorted(n for n in imported_modules(p, True) if n.split(".")[0] == "detection")
           for p in python_files("backbones")}
    assert not {m: names for m, names in bad.items() if names}


def test_each_detection_module_imports_only_from_its_layer_and_below():
    found = {}
    for path in python_files("detection"):
        module = module_name(path)
        layer = layer_of(module)
        bad = violations(module, imported_modules(path)) if layer else []
        if bad:
            found[f"{module} ({layer})"] = bad
    assert not found, f"imports from a layer above (see docs/ARCHITECTURE.md): {found}"


def test_the_config_package_is_imported_by_its_public_names():
    """docs/ARCHITECTURE.md: the config layer's names are imported from `detection.config` (its
    __init__ lists them), not from its modules, in the library and the tools (tests may reach in)."""
    reaching_in = {module_name(p): sorted(n for n in imported_modules(p, True) if n.startswith("detection.config."))
                   for p in python_files("detection") + python_files("tools")
                   if not module_name(p).startswith("detection.config")}
    assert not {m: names for m, names in reaching_in.items() if names}

def test_every_module_has_a_layer():
    """A folder of detection/ without a layer in FOLDERS, or a module directly in detection/
    without one in TOP, would go unchecked: name it there."""
    unplaced = [module_name(p) for p in python_files("detection")
                if module_name(p) != "detection" and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules without a layer (tests/test_layers.py FOLDERS or TOP): {unplaced}"
    assert {layer_of(f"detection.{name}") for name in ("modeling.multiscale", "modeling.refinement",
                                                        "modeling.precision", "accel.plan")} == {"core"}


def test_the_rules_are_allow_lists():
    """What a layer may import is listed; everything else, a layer above or a sideways one, is not."""
    assert violations("detection.data.voc", {"detection.modeling.resize", "detection.data.catalog"}) == []
    assert violations("detection.data.voc", {"detection.modeling.model"}) == ["detection.modeling.model"]
    assert violations("detection.evaluation.coco", {"detection.modeling.box_coder", "detection.modeling.model",
                                                    "detection.engine.trainer"}) \
        == ["detection.engine.trainer", "detection.modeling.model"]
    assert violations("detection.study.run", {"detection.benchmarking.suite", "detection.visualization.plots"}) \
        == ["detection.benchmarking.suite"]
    assert violations("detection.cli", {"detection.export.onnx", "detection.predictor"}) == ["detection.export.onnx"]
    assert violations("detection.config.checks", {"detection.data.catalog", "detection.data.voc"}) \
        == ["detection.data.voc"]
    # backbones only where the table lists it; of the top layer, benchmarking may import cli alone (a review:
    # neither was checked)
    assert violations("detection.evaluation.coco", {"backbones.resnet"}) == ["backbones.resnet"]
    assert violations("detection.utils.comm", {"backbones.weights"}) == ["backbones.weights"]
    assert violations("detection.engine.loading", {"backbones.weights"}) == []
    assert violations("detection.benchmarking.models", {"detection.predictor", "detection.cli"}) \
        == ["detection.predictor"]


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
            a_test = top.startswith(("test_", "benchmark_")) or name.startswith("tests.test_")
            assert top != "tools" and not a_test, \
                f"{path.relative_to(ROOT)} imports {name}: library code goes in the library, " \
                "test helpers in tests/helpers.py, tools are loaded by path"


# ---- private names stay in their module ---------------------------------------------------

PROJECT_PACKAGES = ("detection", "backbones", "tests")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_bindings(tree: ast.AST) -> set[str]:
    """Names the file binds to a project module or to something imported from one, and those
    assigned from load_tool(...) (a tool loaded by path)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names
                      if a.name.split(".")[0] in PROJECT_PACKAGES}
        elif _from_project(node):
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign) and _is_load_tool(node.value):
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return bound


def _from_project(node: ast.AST) -> bool:
    return isinstance(node, ast.ImportFrom) and bool(
        node.level or (node.module or "").split(".")[0] in PROJECT_PACKAGES)


def _is_load_tool(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_tool"


def _reaches_project(node: ast.AST, bound: set[str]) -> bool:
    """`node` is a project name, load_tool(...), or an attribute chain starting at one."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return (isinstance(node, ast.Name) and node.id in bound) or _is_load_tool(node)


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    bound, found = _project_bindings(tree), []
    for node in ast.walk(tree):
        if _from_project(node):
            found += [(node.lineno, f"from {'.' * node.level}{node.module or ''} import {a.name}")
                      for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and _reaches_project(node.value, bound):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("setattr", "getattr", "delattr", "hasattr") and len(node.args) >= 2
              and _reaches_project(node.args[0], bound) and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _is_private(node.args[1].value)):
            found.append((node.lineno, ast.unparse(node)))  # monkeypatch.setattr(module, "_name", ...) too
    return sorted(found)


def test_no_private_name_is_used_outside_its_module():
    """A leading underscore says "this module's own": a test or a tool reaching into it pins the
    implementation instead of the behaviour, and breaks when that changes. Checked in the library,
    the tools and the tests: `from project.module import _name`, and `X._name` or
    setattr/getattr(X, "_name") where X is a project module, something imported from one, or a
    tool loaded with load_tool. (PyTorch's own private API, `torch._...`, is not the project's.)"""
    found = [f"{path.relative_to(ROOT)}:{line}: {text}"
             for folder in ("detection", "backbones", "tools", "tests") for path in python_files(folder)
             for line, text in _private_uses(ast.parse(path.read_text()))]
    assert not found, "private names used outside their module (use the public API, or make the " \
                      "helper public with a docstring):\n" + "\n".join(found)


def test_the_private_name_check_sees_each_way_of_reaching_in():
    code = ("from detection.data.shapes import _keeps, public\nimport detection.engine.checkpoint as ckpt\n"
            "from detection.evaluation import voc\ntool = load_tool('export')\nckpt._load(1)\ntool._check()\n"
            "load_tool('visualize')._names\nmonkeypatch.setattr(voc, '_match', None)\npublic._x\n"
            "import torch\ntorch._C\nself._own\nvoc.match\n")
    assert [line for line, _ in _private_uses(ast.parse(code))] == [1, 5, 6, 7, 8, 9]
