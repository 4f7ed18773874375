"""Driver errors become :mod:`shared.errors` at the adapters, and nowhere else.

Read from the source with :mod:`ast`: a module names a driver's exception when an expression
in it (an ``except`` clause, an ``isinstance``, a tuple of errors) resolves, through the
module's imports, to an exception class defined by a driver package.
"""

from __future__ import annotations

import ast
import functools
import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from shared.errors import NudgeError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("producer", "shared", "workers")

#: Each driver package and the only modules that may name its exceptions.
ADAPTERS = {
    # the pause is written with psycopg alone, so that its command starts without SQLAlchemy
    "psycopg": {"workers/store/db.py", "workers/store/campaign_states.py"},
    "sqlalchemy": {"workers/store/db.py"},
    "aio_pika": {"shared/amqp.py"},
    "aiormq": {"shared/amqp.py"},
    "pamqp": {"shared/amqp.py"},
    # pika is blocking: the sync producer, the CLI's nudge.dead browser and the one confirmed
    # publish of a CLI command (shared/brokers.py) are its adapters.
    "pika": {"producer/sync_producer.py", "workers/deadletters.py", "shared/brokers.py"},
}

#: What role and runtime modules may take from the database libraries: the engine's type.
ENGINE_ONLY = {"sqlalchemy.ext.asyncio.AsyncEngine"}


@dataclass(frozen=True)
class Source:
    path: str
    tree: ast.Module
    #: Local name -> the dotted name it was imported as.
    imports: dict[str, str]

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.path.removesuffix(".py").replace("/", "."))


def _sources() -> Iterator[Source]:
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            if "/migrations/" in path:
                continue  # run by alembic, not imported as modules
            tree = ast.parse(file.read_text(), path)
            imports: dict[str, str] = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        local = alias.asname or alias.name.split(".")[0]
                        imports[local] = alias.name if alias.asname else local
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for alias in node.names:
                        imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            yield Source(path, tree, imports)


SOURCES = list(_sources())


def _dotted(node: ast.expr, imports: dict[str, str]) -> str | None:
    """``a.b.c`` with ``a`` resolved through the imports, or ``None``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in imports:
        return None
    return ".".join([imports[node.id], *reversed(parts)])


@functools.cache
def _resolve(dotted: str) -> object:
    """The object named ``dotted`` (the longest importable prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _driver(dotted: str) -> str | None:
    """The driver package whose exception ``dotted`` names, if it names one."""
    root = dotted.split(".")[0]
    if root not in ADAPTERS:
        return None
    obj = _resolve(dotted)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return root
    return None


def _driver_exceptions(source: Source) -> Iterator[tuple[int, str, str]]:
    """(line, name, driver) of every driver exception the module names."""
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Attribute | ast.Name):
            dotted = _dotted(node, source.imports)
            driver = _driver(dotted) if dotted else None
            if driver and dotted:
                yield node.lineno, dotted, driver


def _is_driver_error(obj: object) -> bool:
    if isinstance(obj, tuple):
        return any(_is_driver_error(o) for o in obj)
    return (
        isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__.split(".")[0] in ADAPTERS
    )


def _names_driver_error(handler: ast.ExceptHandler, source: Source) -> bool:
    """The clause catches a driver's exception, named directly or through a module-level
    name (a tuple of errors)."""
    if handler.type is None:
        return False
    for node in ast.walk(handler.type):
        if isinstance(node, ast.Attribute | ast.Name):
            dotted = _dotted(node, source.imports)
            if dotted and _driver(dotted):
                return True
        if isinstance(node, ast.Name) and _is_driver_error(getattr(source.module, node.id, None)):
            return True
    return False


def _raises_nudge_error(raised: ast.expr, source: Source) -> bool:
    """``raised`` builds a :class:`NudgeError` (a class of shared.errors, or a function of the
    module annotated to return one)."""
    if not isinstance(raised, ast.Call):
        return False
    dotted = _dotted(raised.func, source.imports)
    if dotted is not None:
        made = _resolve(dotted)
    elif isinstance(raised.func, ast.Name):
        made = getattr(source.module, raised.func.id, None)
    else:
        return False
    if isinstance(made, type):
        return issubclass(made, NudgeError)
    if callable(made):
        returns = typing.get_type_hints(made).get("return")
        return isinstance(returns, type) and issubclass(returns, NudgeError)
    return False


def test_only_the_adapters_name_a_drivers_exceptions() -> None:
    strays = [
        f"{source.path}:{line}: {name} (only {', '.join(sorted(ADAPTERS[driver]))} may)"
        for source in SOURCES
        for line, name, driver in _driver_exceptions(source)
        if source.path not in ADAPTERS[driver]
    ]
    assert strays == [], "translate driver errors at the adapter:\n" + "\n".join(strays)


def test_the_adapters_do_name_their_drivers_exceptions() -> None:
    """The check above looks at something: every adapter catches its driver's errors."""
    adapters = set().union(*ADAPTERS.values())
    assert adapters <= {source.path for source in SOURCES if any(_driver_exceptions(source))}


def test_what_an_adapter_raises_for_a_driver_error_is_a_nudge_error_chained_from_it() -> None:
    wrong = []
    for source in SOURCES:
        for handler in ast.walk(source.tree):
            if not isinstance(handler, ast.ExceptHandler):
                continue
            if not _names_driver_error(handler, source):
                continue
            for node in ast.walk(ast.Module(body=handler.body, type_ignores=[])):
                if not isinstance(node, ast.Raise):
                    continue
                if node.exc is None or node.cause is None:
                    wrong.append(f"{source.path}:{node.lineno}: re-raises or does not chain")
                elif not _raises_nudge_error(node.exc, source):
                    wrong.append(f"{source.path}:{node.lineno}: raises no NudgeError")
    assert wrong == []


def test_role_and_runtime_modules_leave_sql_and_connections_to_the_store() -> None:
    strays = [
        f"{source.path}: imports {name}"
        for source in SOURCES
        if source.path.startswith(("workers/roles/", "workers/runtime/"))
        for name in source.imports.values()
        if name.split(".")[0] in {"sqlalchemy", "psycopg"} and name not in ENGINE_ONLY
    ]
    assert strays == []
