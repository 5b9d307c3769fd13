"""The package's layering, read from the source: no cycles, no upward imports, a pure core.

The layout (README, "Layout") is only worth something if it stays true, so
this reads every ``import`` in ``streamchat/`` (with the standard library's
``ast``, without importing anything) and checks the rules a newcomer is told:

* every module sits on a layer of :data:`LAYERS`; it imports only modules of
  lower layers, or of its own layer *inside its own subpackage* (``ingest``'s
  fetch uses ``ingest``'s feed; ``ingest`` never uses ``media``);
* so the graph of imports has no cycle, which is checked on its own as well,
  since a layer table can be edited to fit a cycle;
* the pure core imports nothing that does I/O (:data:`PURE`).

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and
are left out; imports inside functions count (a lazy import is still one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import streamchat

ROOT = Path(streamchat.__file__).parent

LAYERS: list[set[str]] = [
    # 0. Vocabulary: what everything may use (metrics too: counted where it happens).
    {"streamchat", "config", "errors", "window", "budget", "sessionlog", "metrics"},
    # 1. The data path's subpackages (each with its door in __init__), keys, the wire's bounds.
    {
        "wireshape",
        "access",
        "engine",
        "engine.base",
        "engine.cpu_compat",
        "engine.encoding",
        "engine.fake",
        "engine.frames",
        "engine.prompt",
        "engine.remote",
        "engine.sessions",
        "engine.sse",
        "engine.timeline",
        "engine.tiny_model",
        "engine.vllm",
        "ingest",
        "ingest.dataurl",
        "ingest.faststart",
        "ingest.feed",
        "ingest.fetch",
        "ingest.netguard",
        "ingest.pinning",
        "ingest.relayout",
        "ingest.urlpolicy",
        "media",
        "media.admission",
        "media.decoder",
        "media.gops",
        "media.memory",
        "media.reader",
        "media.sampling",
    },
    # 2. The wire: every message, and its codec.
    {"messages"},
    # 3. What uses the messages: the session's state machine, its rates; what logs leave out,
    # and the logs' format.
    {"protocol", "limits", "redact", "logformat"},
    # 4. Transport: bounds below the WebSocket protocol.
    {"transport"},
    # 5. A session runs the protocol's actions with the data path's parts; media named by URL.
    {"session", "videocache", "videocache.cache", "videocache.decoding"},
    # 6. What every session shares; the ASGI server.
    {"server", "serving"},
    # 7. The doors: one WebSocket connection; the OpenAI-compatible HTTP API.
    {"endpoint", "openai", "openai.request", "openai.routes", "openai.wire"},
    # 8. The app, then the command line.
    {"app"},
    {"cli"},
    {"__main__"},
]
"""Modules (names below ``streamchat.``) from the bottom layer up."""

PURE = {
    "config",
    "errors",
    "window",
    "budget",
    "wireshape",
    "messages",
    "protocol",
    "limits",
    "media.sampling",
    "media.gops",
    "media.memory",
    "ingest.faststart",
    "ingest.dataurl",
    "engine.encoding",
    "engine.prompt",
    "engine.sse",
    "engine.timeline",
    "openai.request",
}
"""The I/O-free core: data in, data out, testable without an event loop."""

IO_MODULES = {
    "asyncio",
    "socket",
    "threading",
    "subprocess",
    "av",
    "httpx",
    "starlette",
    "uvicorn",
    "websockets",
    "vllm",
    "torch",
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "streamchat"


def _modules() -> dict[str, Path]:
    return {
        _name(path): path
        for path in sorted(ROOT.rglob("*.py"))
        if "_cpu_compat_site" not in path.parts  # copied into vLLM's workers, not imported
    }


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:``."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                ids.update(id(n) for n in ast.walk(inner))
    return ids


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports: ``streamchat`` ones relative to it, others by top name."""
    tree = ast.parse(path.read_text("utf-8"))
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module or ""
                continue
            base = package.split(".") if package and package != "streamchat" else []
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, *([node.module] if node.module else [])])
            if node.module is None:  # from . import x: x may be a module
                for alias in node.names:
                    yield "streamchat:" + (f"{module}.{alias.name}" if module else alias.name)
            else:
                yield "streamchat:" + module


def _internal(name: str, modules: dict[str, Path]) -> Iterator[str]:
    for target in _imports(name, modules[name]):
        if target.startswith("streamchat:"):
            inner = target.removeprefix("streamchat:")
            if inner in modules:
                yield inner
            elif inner.rpartition(".")[0] in modules:  # from . import __version__
                yield inner.rpartition(".")[0]
            else:
                yield inner.rpartition(".")[0] or "streamchat"
        elif target == "streamchat" or target.startswith("streamchat."):
            inner = target.removeprefix("streamchat").removeprefix(".")
            yield inner or "streamchat"


def _layer_of() -> dict[str, int]:
    return {name: n for n, names in enumerate(LAYERS) for name in names}


def _package(name: str) -> str:
    """The subpackage ``name`` is in (or is), or "" for the top level."""
    top = name.split(".")[0]
    return top if (ROOT / top).is_dir() else ""


def _upward(graph: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """The imports that break the layering, as ``a -> b`` lines."""
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            if target == name:
                continue
            same = layer[target] == layer[name] and _package(target) == _package(name) != ""
            if layer[target] > layer[name] or (layer[target] == layer[name] and not same):
                wrong.append(f"{name} (layer {layer[name]}) -> {target} (layer {layer[target]})")
    return sorted(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target == node:
                continue
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: set(_internal(name, modules)) for name in modules}


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the layering (and the table names no module that is gone)."""
    modules = set(_modules())
    placed = set(_layer_of())
    assert modules - placed == set(), "add these to LAYERS"
    assert placed - modules == set(), "these are in LAYERS but not in streamchat/"


def test_imports_only_go_down() -> None:
    """No module imports one of a higher layer, or of its own layer outside its subpackage."""
    assert _upward(_graph(), _layer_of()) == []


def test_no_import_cycles() -> None:
    """The import graph is acyclic (checked apart from the layer table)."""
    assert _cycle(_graph()) is None


DOORS = {"ingest", "media", "videocache"}
"""Subpackages entered only through their ``__init__`` from outside (the engine's door is
its seam, ``engine.base``, and the adapters the command line chooses)."""


def _through_walls(graph: dict[str, set[str]]) -> list[str]:
    """Imports from outside a subpackage of :data:`DOORS` of a module inside it."""
    return sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if _package(target) in DOORS and target != _package(target) != _package(name)
    )


def test_subpackages_are_entered_by_their_doors() -> None:
    """Outside ``ingest`` and ``media``, code imports them by their door, not their modules."""
    assert _through_walls(_graph()) == []


def test_the_checks_can_fail() -> None:
    """An upward import and a cycle, made up here, are both reported."""
    graph = {"messages": {"session"}, "session": {"messages"}}
    layer = {"messages": 2, "session": 5}
    assert _upward(graph, layer) == ["messages (layer 2) -> session (layer 5)"]
    assert _cycle(graph) == ["messages", "session", "messages"]
    across = {"ingest.fetch": {"media.decoder"}, "media.decoder": set()}
    assert _upward(across, {"ingest.fetch": 1, "media.decoder": 1}) != []
    assert _through_walls({"session": {"media.decoder", "media"}}) == ["session -> media.decoder"]


def test_the_core_does_no_io() -> None:
    """The pure modules import nothing that does I/O (sockets, threads, the event loop, FFmpeg)."""
    modules = _modules()
    found = {
        name: sorted({t for t in _imports(name, modules[name]) if t.split(".")[0] in IO_MODULES})
        for name in PURE
    }
    assert {name: io for name, io in found.items() if io} == {}
