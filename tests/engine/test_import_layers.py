"""The engine's packages import only downward, with no cycle, and nothing imports inside a function
to hide one.

Layers, lowest first: megatron_compat and device (where tensors live); model (what the model
is, nothing about parallelism); parallel (how it is spread); checkpoint, and beside it the
simulated GPU of the dry runs (simulation: the meta device, the fake process group, the
watching dispatch mode); training (plan, build, data, step); conversion (which evaluation uses
to generate with an engine checkpoint); the other users of training side by side (planner,
evaluate with its dry run, tools); the training dry run (which asks the planner); the entry
point train.py on top; above it the examples' settings table (recipe.settings, standard library
only), the launch of training and evaluation runs (launch), whose defaults come from that table,
and on top the recipe's scripts in Python (recipe: their stages and SLURM batch step) and,
beside them, the generator of docs/configuration.md (config_doc: it reads the aliases from the
launch and the evaluation measures).
A module may import its own package and any lower layer, never a higher or a sibling one.
Below them all, and below data_tools, the file publishing package (publishing/) imports only the
standard library, so that both may use it without one reaching into the other.
"""
import ast
import sys
from pathlib import Path

from tests.distributed import REPO

LAYERS = {
    "engine.megatron_compat": 0, "engine.device": 0,
    "engine.model": 1,
    "engine.parallel": 2,
    "engine.checkpoint": 3, "engine.simulation": 3,
    "engine.training": 4,
    "engine.convert": 5,
    "engine.planner": 6, "engine.evaluate": 6, "engine.tools": 6,
    "engine.dryrun": 7,
    "engine.train": 8,
    "engine.recipe.settings": 9,
    "engine.launch": 10,
    "engine.recipe": 11, "engine.config_doc": 11,
}
# Imported inside functions on purpose: optional GPU or test libraries, and slow imports used
# by one path only.
LAZY_ALLOWED = ("flash_attn", "transformer_engine", "megatron.core.extensions.transformer_engine",
                "triton", "transformers", "torch.utils.tensorboard", "matplotlib")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "engine").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _package(module: str) -> str:
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return "engine"


def _imports(path: Path):
    """(imported module, whether at module level, line) for every import in ``path``; for
    ``from package import name`` both the package and package.name (it may be a module)."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    # Module level includes `if TYPE_CHECKING:` / try blocks directly in the body.
    for node in tree.body:
        for child in ast.walk(node):
            if isinstance(child, (ast.If, ast.Try)):
                top.update(map(id, child.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, id(node) in top, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", id(node) in top, node.lineno


def _graph():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(path):
            # The longest engine module the import names (a name imported from a module
            # resolves to that module).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("engine") and target != name:
                graph[name].add(target)
    return graph


def test_every_engine_import_goes_down_the_layers():
    wrong = []
    for name, targets in _graph().items():
        own = _package(name)
        for target in targets:
            other = _package(target)
            if other != own and LAYERS.get(other, -1) >= LAYERS.get(own, 99):
                wrong.append(f"{name} imports {target} ({other} is not below {own})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_engine_modules():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_function_level_import_except_optional_libraries():
    hidden = []
    for name, path in _modules().items():
        for target, at_top, line in _imports(path):
            if not at_top and not target.startswith(LAZY_ALLOWED):
                hidden.append(f"{path.relative_to(REPO)}:{line}: import {target}")
    assert not hidden, "\n".join(hidden)


def test_the_layer_rule_would_catch_an_upward_import(tmp_path):
    """The checks read real import statements: an upward import in a model module is found."""
    source = "from engine.training.run_plan import RunPlan\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    (target, at_top, _), _ = list(_imports(path))
    assert target == "engine.training.run_plan" and at_top
    assert LAYERS[_package(target)] > LAYERS[_package("engine.model.probe")]


def test_file_publishing_imports_only_the_standard_library():
    outside = []
    for path in sorted((REPO / "publishing").rglob("*.py")):
        for target, _, line in _imports(path):
            package = target.split(".")[0]
            if package != "publishing" and package not in sys.stdlib_module_names:
                outside.append(f"{path.relative_to(REPO)}:{line}: import {target}")
    assert not outside, "\n".join(outside)
