"""Optional dependencies: sparsesam._extras.EXTRAS is pyproject.toml's list,
a missing package names the extra that installs it, and the core
dependencies cover what the package imports unconditionally."""
import ast
import pathlib
import sys
import tomllib

import pytest

from sparsesam._extras import EXTRAS, require

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_table_is_pyprojects():
    declared = PYPROJECT["project"]["optional-dependencies"]
    for extra, distributions in EXTRAS.items():
        assert declared.get(extra) == list(distributions), extra
    # "all" installs every extra of the table.
    assert declared["all"] == [f"sparsesam[{','.join(sorted(EXTRAS))}]"]


def test_torch_is_a_range_not_a_pin():
    torch_deps = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert torch_deps and all("==" not in d for d in torch_deps), torch_deps
    assert "safetensors" in PYPROJECT["project"]["dependencies"]


def test_requirements_dev_pins_the_torch_the_range_admits():
    from packaging.requirements import Requirement
    from packaging.version import Version
    pinned = [line.split("==")[1] for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
              if line.startswith("torch==")]
    (torch_range,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert pinned and Version(pinned[0]) in torch_range.specifier


def _hide(monkeypatch, name):
    """Make ``import name`` (and its submodules) fail, as when the package is not installed:
    a None in sys.modules stops the import with ModuleNotFoundError."""
    for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("module, extra", [("sklearn.datasets", "data"), ("scipy.stats", "robust"),
                                           ("matplotlib.figure", "robust"), ("PIL.Image", "robust"),
                                           ("torch_pruning", "structured"), ("torchvision.models", "vision"),
                                           ("timm", "timm"), ("torchattacks", "attacks"),
                                           ("huggingface_hub", "hub")])
def test_missing_package_names_its_extra(monkeypatch, module, extra):
    _hide(monkeypatch, module.split(".")[0])
    with pytest.raises(ImportError, match=rf"pip install 'sparsesam\[{extra}\]'") as caught:
        require(module, extra=extra, purpose="this feature")
    assert str(caught.value).startswith("this feature needs ")
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_present_package_is_returned():
    pytest.importorskip("scipy")
    import scipy.stats
    assert require("scipy.stats", extra="robust") is scipy.stats


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(module="scipy", extra="nope"), ValueError, "extra must be one of"),
    (dict(module="scipy", extra="data"), ValueError, "not provided by the extra 'data'"),
    (dict(module="", extra="data"), TypeError, "module"),
    (dict(module=None, extra="data"), TypeError, "module"),
])
def test_bad_arguments(kwargs, error, match):
    module = kwargs.pop("module")
    with pytest.raises(error, match=match):
        require(module, **kwargs)


def _top_level_imports(path):
    """Modules a file imports at its top level (what ``import sparsesam.x`` needs)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_unconditional_imports_are_core_dependencies():
    """Every module-level import of the package is the standard library, torch,
    triton (only inside the Triton kernels, which check for it) or a core dependency."""
    core = {"torch", "numpy", "tqdm", "safetensors"}
    allowed = core | set(sys.stdlib_module_names) | {"sparsesam", "triton"}
    offenders = {}
    for path in sorted((ROOT / "sparsesam").rglob("*.py")):
        extra = _top_level_imports(path) - allowed
        if extra:
            offenders[str(path.relative_to(ROOT))] = sorted(extra)
    assert not offenders, offenders
