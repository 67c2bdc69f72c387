"""Dependencies run one way: rz uses rz_kernels, never the reverse, and the client needs no server."""

import ast
from pathlib import Path

import rz
import rz_kernels

def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


def _is_rz(module: str) -> bool:
    return module == "rz" or module.startswith("rz.")


def test_no_module_of_rz_kernels_imports_rz():
    root = Path(rz_kernels.__file__).parent
    offenders = {
        f"rz_kernels/{path.relative_to(root)}": sorted(filter(_is_rz, _imported_modules(path)))
        for path in root.rglob("*.py")
    }
    offenders = {name: modules for name, modules in offenders.items() if modules}
    assert not offenders


def test_the_client_reaches_into_no_server_module():
    client = Path(rz.__file__).parent / "client.py"
    assert not [module for module in _imported_modules(client) if module.startswith("rz.server")]


def test_the_tokenizer_imports_no_jax():
    # The long-text tokenizer's child process imports rz.tokenizer: it must start small and fast.
    import subprocess
    import sys

    probe = "import sys, rz.tokenizer; print(sorted(m for m in ('jax', 'jaxlib', 'rz_kernels') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


def test_test_modules_have_unique_basenames():
    # pytest's default import mode imports each test file by its basename: a second test_x.py in
    # another folder fails the whole run at collection.
    from collections import Counter

    names = Counter(path.name for path in Path(__file__).parent.rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]
