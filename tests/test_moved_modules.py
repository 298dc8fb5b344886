"""Code written against an earlier README keeps importing: the modules the house's layout by
role moved (detection.MOVED_MODULES) and the names of the module detection.export was. Each in a
fresh interpreter: an import is cached once made."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, json, sys, warnings
warnings.simplefilter("always")
out = {}
with warnings.catch_warnings(record=True) as caught:
    # the earlier README's lines, as written there
    from detection.export import OnnxDetector, prepare_image
    from detection.onnx_preprocess import preprocess, read_metadata
    import detection.export.onnx, detection.plots, detection.fast
    out["readme"] = [OnnxDetector is detection.export.onnx.OnnxDetector,
                     detection.plots.plot_training_curves.__module__, detection.fast.inference_plan.__module__]
    for old, new in detection.MOVED_MODULES.items():
        moved = importlib.import_module(old)
        target = importlib.import_module(new)
        public = [k for k in vars(target) if not k.startswith("_")]
        out[old] = {"same": all(getattr(moved, k) is getattr(target, k) for k in public), "names": len(public),
                    "spec": target.__spec__.name}
out["warnings"] = [(w.category.__name__, str(w.message), w.filename) for w in caught]
for name in ("detection.nothing_here", "detection.export.nothing"):
    try:
        importlib.import_module(name)
        out[name] = "imported"
    except ModuleNotFoundError as err:
        out[name] = str(err)
try:
    from detection.export import nothing
except ImportError as err:
    out["nothing"] = str(err)
print(json.dumps(out))
"""


def test_old_module_names_import_the_new_modules_with_a_warning_naming_the_new_place(tmp_path):
    """detection.plots, detection.onnx_preprocess, `from detection.export import OnnxDetector`
    (an earlier README's lines) were a bare ModuleNotFoundError / ImportError after the move (an
    upgrade trial); they give the same objects now, each with one FutureWarning at the user's
    line naming the new place, and names that never existed still fail."""
    script = tmp_path / "old_code.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    from detection import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        assert out[old]["same"] and out[old]["names"] > 0, (old, out[old])
        assert out[old]["spec"] == new  # the new module itself is untouched
    assert out["readme"] == [True, "detection.visualization.plots", "detection.accel.plan"]
    told = [message for category, message, filename in out["warnings"]]
    assert all(category == "FutureWarning" and filename == str(script) for category, _, filename in out["warnings"])
    assert sorted(told) == sorted([*(f"{old} moved to {new}: import it from there (the old name goes in a later "
                                     "version)" for old, new in MOVED_MODULES.items()),
                                   *(f"detection.export.{name} moved to detection.export.onnx.{name}: import it "
                                     "from there (the old name goes in a later version)"
                                     for name in ("OnnxDetector", "prepare_image"))])
    assert out["detection.nothing_here"] == "No module named 'detection.nothing_here'"
    assert out["detection.export.nothing"] == "No module named 'detection.export.nothing'"
    assert "cannot import name 'nothing' from 'detection.export'" in out["nothing"]
