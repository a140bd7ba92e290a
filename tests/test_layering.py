"""The import graph shows the design: the engine core, scheduler and kernels never reach up into the API server,
the CLI or the benchmarks; the server never imports the benchmarks; the scheduler knows requests as token ids
(no tokenizer, no model). Every `dspark.*` import counts, module-level or inside a function."""

import ast

from conftest import REPO


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in (REPO / "dspark").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dspark"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}  # `from dspark.kernels import base`
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dspark")}
        graph[name] = deps
    return {k: {d for d in v if d in graph} for k, v in graph.items()}


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_lower_layers_never_import_the_layers_above():
    graph = import_graph()
    above = ("dspark.server", "dspark.loadtest", "dspark.cli")
    for mod, deps in graph.items():
        if any(inside(mod, p) for p in ("dspark.engine", "dspark.scheduler", "dspark.kernels")):
            bad = {d for d in deps if any(inside(d, p) for p in above)}
            assert not bad, f"{mod} imports {sorted(bad)}"
        if inside(mod, "dspark.server"):
            bad = {d for d in deps if inside(d, "dspark.loadtest") or inside(d, "dspark.cli")}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_the_scheduler_knows_no_tokenizer_and_no_model():
    graph = import_graph()
    for mod in [m for m in graph if inside(m, "dspark.scheduler")]:
        bad = {d for d in reach(graph, mod) if d in ("dspark.engine.tokenizer", "dspark.engine.model",
                                                      "dspark.engine.gguf_model")}
        assert not bad, f"{mod} reaches {sorted(bad)}"


def test_request_state_lives_in_the_scheduler():
    """The scheduler owns the requests' token state and KV blocks: it reaches into the engine only for the message
    types and the sampling parameters (and a grammar state's type), never for the engine loop or the runner."""
    graph = import_graph()
    allowed = {"dspark.engine.messages", "dspark.engine.sampling", "dspark.engine.grammar"}
    for mod in [m for m in graph if inside(m, "dspark.scheduler")]:
        bad = {d for d in graph[mod] if inside(d, "dspark.engine") and d not in allowed}
        assert not bad, f"{mod} imports {sorted(bad)}"
    assert "dspark.scheduler.sequence" in graph and "dspark.scheduler.block_manager" in graph


def test_the_graph_is_read():
    """The checks above see real edges (a parser that found none would pass them vacuously)."""
    graph = import_graph()
    assert "dspark.engine.llm_engine" in reach(graph, "dspark.engine.core")
    assert "dspark.engine.tokenizer" in reach(graph, "dspark.server.app")
    assert "dspark.loadtest.sweep" in reach(graph, "dspark.cli")
