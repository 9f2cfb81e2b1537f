"""The package's layout (docs: DESIGN §3): the core never imports a task, nor anything above it.

Core = ``paths/``, ``sampling.py``, ``likelihood.py``, ``rollout.py``, ``models/``, ``trainer/``,
``rewards/``. Tasks (``dflow_trl/tasks/``) build on the core; the CLI sits on top of both. A task's
rewards reach the core's registry through the ``dflow_trl.rewards`` entry points, not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .helpers import assert_fresh_python_prints_ok

PACKAGE = Path(__file__).resolve().parents[1] / "dflow_trl"
CORE = ("paths", "sampling.py", "likelihood.py", "rollout.py", "credit.py", "models", "trainer", "rewards")
# Modules the core may not import: the tasks, and the CLI above them.
FORBIDDEN = ("dflow_trl.tasks", "dflow_trl.cli")
IMPORT_FUNCTIONS = ("import_module", "__import__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import …`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_modules(path: Path, importer: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path`` (the module ``importer``, by default named from
    its place in the package): top-level or inside functions, ``import``, ``from … import`` (relative
    ones resolved; each imported name counted as a possible submodule) and ``importlib.import_module``
    / ``__import__`` calls with a literal name (a relative one taken relative to ``__package__``)."""
    importer, is_package = importer or _module_name(path), path.name == "__init__.py"
    package = importer if is_package else importer.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in IMPORT_FUNCTIONS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                found.append((node.lineno, _resolve(arg.value[level:] or None, level, package, True)))
    return found


def core_files() -> list[Path]:
    files: list[Path] = []
    for entry in CORE:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def upward_imports(files: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path)
        if _forbidden(module)
    ]


def test_core_files_exist():
    missing = [entry for entry in CORE if not (PACKAGE / entry).exists()]
    assert not missing, missing
    assert len(core_files()) > 10


def test_core_imports_no_task_and_nothing_above_it():
    offending = upward_imports(core_files())
    assert not offending, "the core must not import tasks or the CLI:\n" + "\n".join(offending)


def test_tasks_do_not_import_the_cli():
    offending = [
        hit
        for hit in upward_imports(sorted((PACKAGE / "tasks").rglob("*.py")))
        if hit.endswith("dflow_trl.cli")
    ]
    assert not offending, offending


def test_the_checker_sees_every_kind_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import dflow_trl.tasks.shapeworld\n"
        "from dflow_trl.tasks import shapeworld\n"
        "from ..tasks.shapeworld import rewards\n"
        "from .. import tasks\n"
        "def f():\n"
        "    from ..tasks.shapeworld.rewards import shapeworld_partial\n"
        "    import importlib\n"
        "    importlib.import_module('dflow_trl.tasks.shapeworld')\n"
        "    importlib.import_module('..tasks', __package__)\n"
        "    from .. import cli\n"
        "from . import answers\n"
        "from ..models import base\n"
        "import dflow_trl.rewards.geneval_rules\n"
    )
    # Read as if it were dflow_trl/rewards/probe.py, so that its relative imports resolve the same way.
    hits = [line for line, module in imported_modules(probe, "dflow_trl.rewards.probe") if _forbidden(module)]
    assert sorted(set(hits)) == [1, 2, 3, 4, 6, 8, 9, 10], hits


def test_importing_the_core_loads_no_task():
    code = (
        "import sys; import dflow_trl, dflow_trl.paths, dflow_trl.sampling, dflow_trl.likelihood, "
        "dflow_trl.rollout, dflow_trl.models, dflow_trl.trainer, dflow_trl.rewards; "
        "from dflow_trl.rewards import get_reward_function; get_reward_function('exact_match'); "
        "loaded = [m for m in sys.modules if m.startswith(('dflow_trl.tasks', 'dflow_trl.cli'))]; "
        "assert not loaded, loaded; print('ok')"
    )
    assert_fresh_python_prints_ok(code, timeout=300)


def test_the_shapeworld_task_imports_with_its_public_api():
    import dflow_trl.tasks.shapeworld as shapeworld

    for name in shapeworld.__all__:
        assert getattr(shapeworld, name) is not None, name
    for name in (
        "load_shapeworld_model", "SHAPEWORLD_DIR", "evaluate_t2i", "evaluate_vqa", "balanced_t2i_eval_set"
    ):
        assert name in shapeworld.__all__ and name in dir(shapeworld)
    assert (shapeworld.SHAPEWORLD_DIR / "model.safetensors").is_file()
    with pytest.raises(AttributeError):
        _ = shapeworld.no_such_name


def test_task_rewards_resolve_through_entry_points():
    from dflow_trl.rewards import REWARD_REGISTRY, get_reward_function
    from dflow_trl.tasks.shapeworld import rewards

    installed = REWARD_REGISTRY.installed()
    names = ("shapeworld_strict", "shapeworld_partial", "shapeworld_answer")
    assert set(names) <= set(installed), (
        "the dflow_trl.rewards entry points are not installed: reinstall the package (bash scripts/setup.sh)"
    )
    for name in names:
        assert installed[name].value == f"dflow_trl.tasks.shapeworld.rewards:{name}"
        assert get_reward_function(name) is getattr(rewards, name)
    bound = get_reward_function("shapeworld_partial", metadata=None)
    assert bound.__name__ == "shapeworld_partial"
    with pytest.raises(ValueError, match=r"known rewards: \[.*'shapeworld_partial'.*\]"):
        get_reward_function("shapeworld_partal")


def test_register_reward():
    from dflow_trl.rewards import REWARD_REGISTRY, get_reward_function, register_reward

    def constant(prompts, completions, completion_ids, **kwargs):
        return [1.0 for _ in completions]

    register_reward("layout_test_constant", lambda **kwargs: constant)
    try:
        assert get_reward_function("layout_test_constant") is constant
        assert "layout_test_constant" in REWARD_REGISTRY
        with pytest.raises(ValueError, match="already registered"):
            register_reward("layout_test_constant", lambda **kwargs: constant)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("shapeworld_partial", lambda **kwargs: constant)
        with pytest.raises(ValueError, match=r"without ':' or '\.'"):
            register_reward("pkg.mod", lambda **kwargs: constant)
    finally:
        del REWARD_REGISTRY["layout_test_constant"]
    assert "layout_test_constant" not in REWARD_REGISTRY
