"""The import graph of ditscale/ and data_prep/ (every import statement, also those inside functions): no
cycle, and no import across a boundary ARCHITECTURE.md states. Read from the source (ast), nothing imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ditscale", "data_prep")

# Entry points: argument parsing, printing, exit codes. Nothing below them may import them.
CLI = (
    "ditscale.cli",
    "ditscale.sample",
    "ditscale.interop",
    "ditscale.plan",
    "ditscale.quickstart",
    "ditscale.quickstart_digits",
    "ditscale.evaluate.__main__",
    "data_prep.__main__",
)
TRAIN = ("ditscale.train",)
ENGINE = ("ditscale.engine",)
# Leaf helpers every layer may use; they import nothing of the project.
LEAVES = ("ditscale.runtime", "ditscale.files")

# (importers, forbidden targets, why): a module matches a prefix when it is it or lies below it.
RULES = [
    (
        ("ditscale.models",),
        ("ditscale", "data_prep"),
        "the model knows nothing of diffusion, data, DeepSpeed or checkpoints",
    ),
    (("ditscale.diffusion",), ("ditscale", "data_prep"), "the diffusion calls model(x, t, **kwargs), nothing else"),
    (("ditscale.data",), ("ditscale", "data_prep"), "the readers stand on the shard format alone"),
    (
        ("ditscale.weights",),
        ENGINE + TRAIN + CLI + ("data_prep", "ditscale.data", "ditscale.diffusion"),
        "weights I/O is below the engine's export and the CLIs that use it",
    ),
    (
        ("ditscale.sampling", "ditscale.evaluate", "ditscale.config"),
        ENGINE + TRAIN + CLI + ("data_prep",),
        "libraries the CLIs and the trainer build on",
    ),
    (ENGINE, TRAIN + CLI + ("data_prep",), "the engine serves the trainer, never the other way"),
    (
        ("data_prep",),
        (
            "ditscale.engine",
            "ditscale.train",
            "ditscale.models",
            "ditscale.diffusion",
            "ditscale.sampling",
            "ditscale.weights",
        )
        + CLI[:-1],
        "data_prep writes the shard format ditscale.data reads; it knows nothing of training",
    ),
    (LEAVES, ("ditscale", "data_prep"), "leaf helpers"),
    (
        ("ditscale",),
        ("data_prep",),
        "ditscale reads data_prep's output through ditscale.data, never its code "
        "(the quickstart CLI, which runs data_prep, excepted)",
    ),
]
EXEMPT = {
    ("ditscale.quickstart", "data_prep"),  # CLIs that run the whole pipeline
    ("ditscale.study_digits", "data_prep"),
}
THIRD_PARTY = [
    ("deepspeed", ENGINE),
    ("streaming", ("ditscale.data", "data_prep")),
    ("webdataset", ("ditscale.data", "data_prep")),
]


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_modules(root=ROOT):
    """{module name: (file, is package)} of ditscale/ and data_prep/."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def imports_of(name, modules):
    """[(imported module, line)] of every import statement in module `name`; `from a import b` names a.b
    when that is a module, else a."""
    f, is_pkg = modules[name]
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, node.lineno) for a in node.names]
    return out


def import_graph(modules):
    """{module: {imported project module: first line}}."""
    graph = {}
    for name in modules:
        edges = graph.setdefault(name, {})
        for target, line in imports_of(name, modules):
            if target in modules and target != name:
                edges.setdefault(target, line)
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(graph, modules):
    out = []
    for name in sorted(graph):
        for target, line in sorted(graph[name].items()):
            if (name, target) in EXEMPT or _under(target, (name,)):
                continue
            for importers, forbidden, why in RULES:
                if (
                    _under(name, importers)
                    and _under(target, forbidden)
                    and not _under(target, importers)
                    and not _under(target, LEAVES)
                ):
                    out.append(f"{modules[name][0].relative_to(ROOT)}:{line}: {name} imports {target} ({why})")
                    break
        for package, allowed in THIRD_PARTY:
            for target, line in imports_of(name, modules):
                if _under(target, (package,)) and not _under(name, allowed):
                    out.append(
                        f"{modules[name][0].relative_to(ROOT)}:{line}: {name} imports {package} "
                        f"(only {', '.join(allowed)} may)"
                    )
    return out


@pytest.fixture(scope="module")
def project():
    modules = project_modules()
    return modules, import_graph(modules)


def test_the_graph_is_read(project):
    modules, graph = project
    assert "ditscale.engine.build" in graph["ditscale.train"]  # module level
    assert "ditscale.weights" in graph["ditscale.engine.export"]
    assert "data_prep.merge" in graph["data_prep"]  # relative or in-function
    assert len(modules) > 60


def test_no_import_cycle(project):
    assert cycles(project[1]) == []


def test_no_import_across_a_boundary(project):
    assert violations(project[1], project[0]) == []


def test_the_checks_catch_what_they_look_for(project):
    modules, graph = project
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    bad = {
        **graph,
        "ditscale.models.dit": {"ditscale.engine.checkpoint": 7},
        "ditscale.data.mds": {"ditscale.sample": 3},
        "ditscale.engine.export": {"ditscale.interop": 9},
    }
    found = violations(bad, modules)
    assert [v.split(": ", 1)[1].split(" (")[0] for v in found] == [
        "ditscale.data.mds imports ditscale.sample",
        "ditscale.engine.export imports ditscale.interop",
        "ditscale.models.dit imports ditscale.engine.checkpoint",
    ]


# One home per concern: each of these is defined once, in its module; everything else imports it.
ONE_HOME = {
    "center_crop_arr": "ditscale.data.crop",  # training data and FID references crop alike
    "atomic_write": "ditscale.files",
    "fsync_path": "ditscale.files",
    "rank_env": "ditscale.runtime",
    "read_state_dict": "ditscale.weights.files",
    "write_weights": "ditscale.weights.files",
    "read_tensors": "ditscale.weights.files",
    "shard_name": "ditscale.weights.files",
    "weights_file": "ditscale.weights.files",
    "infer_dit_config": "ditscale.weights.load",
    "load_model": "ditscale.weights.load",
}


def test_one_home_per_concern(project):
    modules, _ = project
    homes: dict[str, list[str]] = {}
    for name, (f, _) in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ONE_HOME:
                homes.setdefault(node.name, []).append(name)
    assert homes == {k: [v] for k, v in ONE_HOME.items()}
