"""The architecture's rules (docs/architecture.md), checked on the source tree: which layer may
import what, that production tools never reach into tests/, and that every environment
variable the code reads is documented in the README's configuration table and vice versa."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler"

# Third-party packages of the platform and network layers: the core never imports them.
PLATFORM_AND_NETWORK = ("runpod", "boto3", "botocore", "requests", "urllib3", "fastapi",
                        "uvicorn", "starlette", "httpx")
# What each layer may not import from the others (handler.config/errors/redact are shared).
FORBIDDEN = {
    "core": ("handler.transfer", "handler.service", "handler.adapters", "handler.handler",
             *PLATFORM_AND_NETWORK),
    "transfer": ("handler.core", "handler.service", "handler.adapters", "handler.handler",
                 "runpod"),
    "service": ("handler.adapters", "handler.handler", "runpod"),
}
# Read by something other than our Python code, yet configured by users.
EXTERNAL_VARS = {"LD_PRELOAD"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _layer_files(layer: str) -> list[Path]:
    return sorted((HANDLER / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = _layer_files(layer)
    assert files, f"handler/{layer} is empty"
    bad = []
    for path in files:
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_relative_imports_across_layers() -> None:
    """Absolute imports only, so the rule above sees every edge."""
    relative = [
        str(p.relative_to(ROOT)) for p in HANDLER.rglob("*.py")
        if any(isinstance(n, ast.ImportFrom) and n.level
               for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert not relative, relative


def test_production_tools_do_not_import_tests() -> None:
    offenders = []
    for folder in ("handler", "builder", "bench", "scripts", "devtools"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"""/\s*["']tests["']|["']tests/""", text) or re.search(
                    r"^\s*(from|import) (fixtures_audio|worker_helpers|conftest)\b", text, re.M):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


# Functions whose first argument is an environment variable name (``_first``: every argument,
# names tried in order, as the HTTP service reads its aliases).
_READERS = {"env_str", "env_int", "env_float", "env_bool", "getenv", "_first"}
_NAME = re.compile(r"[A-Z][A-Z0-9_]+")


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" or (
        isinstance(node, ast.Name) and node.id == "environ")


def vars_read_by_code() -> set[str]:
    """Names passed to env readers, os.environ.get/setdefault/pop and os.environ[...]."""
    names: set[str] = set()
    for path in HANDLER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            args: list[ast.AST] = []
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in _READERS or (isinstance(func, ast.Attribute) and _is_environ(
                        func.value) and name in ("get", "setdefault", "pop")):
                    args = list(node.args) if name == "_first" else node.args[:1]
            elif isinstance(node, ast.Subscript) and _is_environ(node.value):
                args = [node.slice]
            names.update(a.value for a in args if isinstance(a, ast.Constant)
                         and isinstance(a.value, str) and _NAME.fullmatch(a.value))
    return names


def vars_in_readme_table() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Configuration", 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.M)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def test_every_environment_variable_is_documented_and_every_documented_one_is_read() -> None:
    read, documented = vars_read_by_code(), vars_in_readme_table()
    assert read, "the scan found no environment variable at all"
    assert not read - documented, f"read but not in README's table: {sorted(read - documented)}"
    unused = documented - read - EXTERNAL_VARS
    assert not unused, f"in README's table but read nowhere: {sorted(unused)}"
