"""The layout the README draws exists, and the import rules it states hold."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATH_TOKEN = re.compile(r"^(\s*)(\S+(?:/|\.py))\s")


def architecture_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    return section.split("```")[1].strip("\n").splitlines()


def named_paths() -> list[Path]:
    """Every path of the architecture block; an indented name lies in the folder above it."""
    paths, folders = [], []  # folders: (indent, path) of the enclosing folders
    for line in architecture_block():
        match = PATH_TOKEN.match(line + " ")
        if match is None:
            continue  # a description running on
        indent, name = len(match.group(1)), match.group(2)
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (folders[-1][1] if folders else ROOT) / name
        paths.append(path)
        if name.endswith("/"):
            folders.append((indent, path))
    return paths


def imports_of(path: Path) -> set[str]:
    """Modules a file imports (absolute names; relative imports are left out)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_path_the_readme_architecture_names_exists():
    paths = named_paths()
    assert len(paths) > 25
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert missing == []


@pytest.mark.parametrize("folder", ["src/vlm/build", "src/vlm/models", "src/vlm/quant", "src/vlm/data",
                                    "src/vlm/training", "src/vlm/patching", "src/vlm/sweeps", "src/vlm/eval",
                                    "src/vlm/export", "scripts"])
def test_nothing_below_the_entry_points_imports_them(folder):
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith("vlm.cli"))
                 for p in python_files(ROOT / folder)}
    assert {file: found for file, found in offenders.items() if found} == {}


def test_only_the_bench_entry_point_and_scripts_import_the_bench():
    allowed = {ROOT / "src/vlm/cli/bench.py"}
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith("vlm.bench"))
                 for p in python_files(ROOT / "src/vlm") if p not in allowed and "bench" not in p.parts}
    assert {file: found for file, found in offenders.items() if found} == {}


@pytest.mark.parametrize("folder, above", [("src/vlm/quant", ("vlm.models", "vlm.data", "vlm.training", "vlm.build")),
                                           ("src/vlm/models", ("vlm.training", "vlm.data", "vlm.build")),
                                           ("src/vlm/data", ("vlm.models", "vlm.training", "vlm.build")),
                                           ("src/vlm/training", ("vlm.build",))])
def test_parts_import_nothing_above_them(folder, above):
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith(above))
                 for p in python_files(ROOT / folder)}
    assert {file: found for file, found in offenders.items() if found} == {}


def test_kernels_import_torch_and_triton_only():
    allowed = {"torch", "triton", "__future__", "dataclasses", "functools", "math", "os", "typing", "collections"}
    found = {module.split(".")[0] for path in python_files(ROOT / "kernels") for module in imports_of(path)}
    assert found - allowed == set()


def test_vlm_kernels_is_a_subpackage_of_vlm_and_importing_vlm_registers_nothing():
    probe = (
        "import importlib.util, sys; import vlm; "
        "assert not any(name.startswith('vlm.kernels') for name in sys.modules), 'vlm imported its kernels'; "
        "spec = importlib.util.find_spec('vlm.kernels'); "
        "print(list(spec.submodule_search_locations)[0])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip(), "qlora_linear.py").is_file()


def test_the_kernels_folder_does_not_shadow_the_kernels_distribution_from_the_repository_root():
    # transformers (5.25 on) depends on the Hub's `kernels` package and imports it when it is found; run from the
    # repository's root (where `python -m pytest` and a user's scripts start), a top-level package named `kernels`
    # here would be found first. Without an __init__.py the folder is only a namespace portion, which loses to an
    # installed package and which transformers' probe ignores when none is installed.
    probe = (
        "import importlib.util; "
        "spec = importlib.util.find_spec('kernels'); "
        "print('' if spec is None or spec.origin is None else spec.origin); "
        "import transformers; transformers.Qwen2VLProcessor"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip()
    assert not origin or (ROOT / "kernels") not in Path(origin).resolve().parents
