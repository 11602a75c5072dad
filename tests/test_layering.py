"""The import graph's layering: core < io < models < the dimensions (prunekit.tools.check_imports)."""

import subprocess
import sys
from pathlib import Path

import prunekit
from prunekit.tools.check_imports import cycles, package_graph, violations

PACKAGE_DIR = Path(prunekit.__file__).parent


def test_the_package_keeps_its_layering():
    assert [str(v) for v in violations(PACKAGE_DIR)] == []


def test_io_models_and_the_dimensions_form_no_cycle():
    graph = package_graph(PACKAGE_DIR)
    low = {"core", "io", "models"}
    assert [cycle for cycle in cycles(graph) if low & set(cycle)] == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", "errors.py": "", "core/__init__.py": "", "io/__init__.py": "",
                       "models/__init__.py": "", "structure/__init__.py": "", **files}.items():
        path = root / "prunekit" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "prunekit"


def test_the_check_finds_every_kind_of_forbidden_import(tmp_path):
    package = _package(tmp_path, {
        "io/checkpoint.py": "def load():\n    from prunekit.structure.saving import load_structured\n",
        "io/fine.py": "from prunekit.core import cache\nfrom prunekit.errors import PrunekitError\nfrom . import checkpoint\n",
        "models/loading.py": "from ..structure import saving\n",
        "core/cache.py": "import prunekit.models\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                         "    from prunekit import io\n",
        "core/version.py": "from prunekit import __version__\n",
        "structure/saving.py": "from prunekit.models import loading\nfrom prunekit.io import checkpoint\n",
    })
    found = sorted((v.importer, v.line, v.imported) for v in violations(package))
    assert found == [("prunekit.core.cache", 1, "prunekit.models"), ("prunekit.core.cache", 4, "prunekit.io"),
                     ("prunekit.core.version", 1, "prunekit"), ("prunekit.io.checkpoint", 2, "prunekit.structure.saving"),
                     ("prunekit.models.loading", 1, "prunekit.structure.saving")]
    assert any({"io", "structure"} <= set(cycle) for cycle in cycles(package_graph(package)))


def test_the_command_line_reports_success():
    result = subprocess.run([sys.executable, "-m", "prunekit.tools.check_imports"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "layering holds" in result.stdout


def test_looking_a_method_up_imports_no_job_machinery():
    code = ("import sys\nfrom prunekit.weights.base import get_method\nget_method('sparsegpt')\n"
            "print(sorted(m for m in ('matplotlib', 'prunekit.weights.job', 'prunekit.cli', 'datasets') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
