"""The house rules a newcomer reads from the tree, checked on the source (an AST walk, no imports run).

- only app/runtime imports llama_cpp;
- layers depend one way: the shared modules (errors, flags, files, units, ui, children, nfc) on nothing above them;
  runtime on them;
  chat, store and eval on runtime and not on each other; the CLI on everything; convert/ on runtime and the shared
  modules, never on the CLI or a view;
- no two app or convert modules import each other, however indirectly (function-level imports count: a cycle hidden
  inside a function is still a cycle, and it once hid behind a swallowed ImportError);
- no module reaches into another's private names (`from m import _x`, `m._x`);
- how a model is loaded travels as one value (app.runtime.settings.LoadOptions): no function outside the CLI's
  option declarations takes two or more load settings as separate parameters;
- no module is longer than MAX_LINES (one idea per readable file).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"app", "app.children", "app.errors", "app.flags", "app.files", "app.units", "app.ui", "app.nfc"}
MIDDLE = ("app.chat", "app.store", "app.eval", "app.serve")
# load settings, by every name they had on their way from a flag to llama.cpp
LOAD_SETTINGS = {"threads", "gpu_layers", "device", "n_ctx", "ctx", "parallel", "n_seq", "draft", "draft_max"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Every module by its folder's name (app.chat.repl, convert.pipeline): the layers are the repository's folders,
    whatever name pip installs them under (malhae, malhae.convert: local_name maps one to the other)."""
    found = {}
    for top in ("app", "convert"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def local_name(module: str) -> str:
    """An imported name as the folders spell it: malhae.convert.x → convert.x, malhae.models → models,
    malhae.x → app.x (pyproject's package-dir)."""
    for installed, folder in (("malhae.convert", "convert"), ("malhae.models", "models"), ("malhae", "app")):
        if module == installed or module.startswith(installed + "."):
            return folder + module[len(installed):]
    return module


MODULES = modules()


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(local_name(a.name), [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}:{node.lineno}: the house uses absolute imports"
            out.append((local_name(node.module), [a.name for a in node.names], node.lineno))
    return out


def edges(name: str) -> set[str]:
    """The app/convert modules `name` depends on (`from pkg import mod` counts as mod)."""
    out = set()
    for module, names, _ in imports(name):
        subs = {f"{module}.{n}" for n in names} & MODULES.keys()
        out |= subs or ({module} & MODULES.keys())
    return out - {name}


def layer(name: str) -> str:
    if name in SHARED:
        return "shared"
    if name == "app.__main__":  # python -m malhae
        return "app.cli"
    for prefix in ("app.runtime", *MIDDLE, "app.cli", "convert"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{name} is in no layer: put it in one of the packages")


ALLOWED = {
    "shared": {"shared"},
    "app.runtime": {"shared", "app.runtime"},
    "app.chat": {"shared", "app.runtime", "app.chat"},
    "app.eval": {"shared", "app.runtime", "app.eval"},
    "app.serve": {"shared", "app.runtime", "app.serve"},
    "app.store": {"shared", "app.runtime", "app.store", "convert"},  # pull and the catalog call the converter
    "convert": {"shared", "app.runtime", "convert"},
    "app.cli": {"shared", "app.runtime", *MIDDLE, "app.cli", "convert"},
}


def test_only_the_runtime_imports_llama_cpp():
    offenders = [f"{name}:{line}" for name in MODULES for module, _, line in imports(name)
                 if module.split(".")[0] == "llama_cpp" and layer(name) != "app.runtime"]
    assert not offenders, offenders


def test_layers_depend_one_way():
    wrong = sorted(f"{name} → {dep}" for name in MODULES for dep in edges(name)
                   if layer(dep) not in ALLOWED[layer(name)])
    assert not wrong, wrong


def test_convert_never_imports_a_view_or_the_cli():
    views = {m for m in MODULES if m == "app.ui" or m.endswith(("_view", ".views", ".render", ".writer"))}
    wrong = [f"{name} → {dep}" for name in MODULES if layer(name) == "convert" for dep in edges(name)
             if dep in views or layer(dep) == "app.cli"]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, [" → ".join(c) for c in cycles]


def test_no_private_names_across_modules():
    wrong = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        ours = set()  # local names bound to app/convert modules
        for module, names, line in imports(name):
            if module.split(".")[0] not in ("app", "convert"):
                continue
            wrong += [f"{name}:{line} imports {n}" for n in names if n.startswith("_") and n != "__version__"]
            ours |= {n for n in names if f"{module}.{n}" in MODULES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                ours |= {a.asname for a in node.names if a.asname and local_name(a.name) in MODULES}
            elif isinstance(node, ast.ImportFrom):
                ours |= {a.asname for a in node.names
                         if a.asname and f"{local_name(node.module)}.{a.name}" in MODULES}
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours
                  and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, wrong


def loose_load_settings(name: str) -> list[str]:
    """Functions of module `name` taking two or more load settings as separate parameters ("module:line f(a, b)").
    CLI commands too: they take the load flags through app.cli.options.load_flags, as one dict."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        loose = [p for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg in LOAD_SETTINGS]
        if len(loose) >= 2:
            out.append(f"{name}:{node.lineno} {node.name}({', '.join(p.arg for p in loose)})")
    return out


def test_load_settings_travel_as_one_value():
    """A new load setting must not have to be spelled out in a dozen signatures: give a LoadOptions instead."""
    wrong = [found for name in MODULES for found in loose_load_settings(name)]
    assert not wrong, wrong


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_walk_sees_what_it_checks():
    """The rules above would pass vacuously on an empty or misread tree."""
    assert {"app.runtime.llama", "app.runtime.engine", "app.chat.repl", "app.store.local", "app.eval.perplexity",
            "app.cli.main", "convert.pipeline"} <= MODULES.keys()
    assert "llama_cpp" in {m for m, _, _ in imports("app.runtime.llama")}
    assert {"app.runtime.engine", "app.runtime.settings"} <= edges("app.chat.oneshot")
    assert layer("app.store.pull") == "app.store" and "convert.pipeline" in edges("app.store.pull")


def test_the_rules_catch_planted_violations(tmp_path, monkeypatch):
    import pytest

    chat = tmp_path / "fake_chat.py"
    chat.write_text("import llama_cpp\nfrom app.cli import main\nfrom app.store.local import _copy\n"
                    "from app.runtime import fake_runtime\n", encoding="utf-8")
    runtime = tmp_path / "fake_runtime.py"
    runtime.write_text("def f():\n    from app.chat import fake_chat\n", encoding="utf-8")
    convert = tmp_path / "fake_convert.py"
    convert.write_text("from app.store import models_view\n\n\ndef load(path, *, threads=None, n_ctx=512):\n"
                       "    pass\n" + "#\n" * MAX_LINES, encoding="utf-8")
    monkeypatch.setitem(MODULES, "app.chat.fake_chat", chat)
    monkeypatch.setitem(MODULES, "app.runtime.fake_runtime", runtime)
    monkeypatch.setitem(MODULES, "convert.fake_convert", convert)
    for rule in (test_only_the_runtime_imports_llama_cpp, test_layers_depend_one_way, test_no_import_cycles,
                 test_no_private_names_across_modules, test_convert_never_imports_a_view_or_the_cli,
                 test_load_settings_travel_as_one_value, test_no_module_over_the_line_limit):
        with pytest.raises(AssertionError):
            rule()
    assert loose_load_settings("convert.fake_convert") == ["convert.fake_convert:4 load(threads, n_ctx)"]
