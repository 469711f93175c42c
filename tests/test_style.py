"""STYLE.md's limits as tests: one screenful per idea, and no config field that nothing reads."""

import ast
import dataclasses
import importlib
import inspect
import pathlib
import typing

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
# The commands whose configs users write (each module's CONFIG_CLASS).
COMMAND_MODULES = ("rlhf_jax.stages.sft", "rlhf_jax.stages.rm", "rlhf_jax.stages.ppo",
                   "rlhf_jax.demo.pipeline")


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def parsed():
    """{path: AST} of every module of the package."""
    return {path: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in modules()}


def name(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_functions_fit_on_a_screen():
    too_long = []
    for path, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # from `def`: decorators excluded
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name(path)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (STYLE.md): "
                          + "; ".join(too_long))


def test_modules_stay_under_the_size_limit():
    too_long = []
    for path in modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name(path)} ({lines} lines)")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (STYLE.md): " + "; ".join(too_long)


def config_classes():
    """Every config dataclass a command's config holds, nested sections included."""
    found, todo = [], [importlib.import_module(m).CONFIG_CLASS for m in COMMAND_MODULES]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for tp in typing.get_type_hints(cls).values():
            todo += [t for t in annotation_types(tp) if dataclasses.is_dataclass(t)]
    return found


def annotation_types(tp):
    """`tp` and every type inside it (Optional[X], tuple[X, ...], dict[str, X])."""
    yield tp
    for arg in typing.get_args(tp):
        yield from annotation_types(arg)


def declaring_class(cls, field_name):
    """The class in `cls`'s hierarchy whose body declares `field_name`."""
    return next(c for c in cls.__mro__ if field_name in c.__dict__.get("__annotations__", {}))


def reads(trees):
    """{attribute name: [(file, line), ...]} of every `x.name` read and `getattr(x, "name")`."""
    out = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                out.setdefault(node.attr, []).append((path, node.lineno))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str)):
                out.setdefault(node.args[1].value, []).append((path, node.lineno))
    return out


def test_every_config_field_is_read_somewhere():
    """A field nothing reads is a setting that silently does nothing (DESIGN.md: every field
    is read somewhere). Reads inside the field's own class (its validation) do not count."""
    where = reads(parsed())
    unread = []
    for cls in config_classes():
        for field in dataclasses.fields(cls):
            owner = declaring_class(cls, field.name)
            source = pathlib.Path(inspect.getsourcefile(owner)).resolve()
            body, first = inspect.getsourcelines(owner)
            inside = range(first, first + len(body))
            if not any(path.resolve() != source or line not in inside
                       for path, line in where.get(field.name, [])):
                entry = f"{owner.__module__}.{owner.__name__}.{field.name}"
                if entry not in unread:
                    unread.append(entry)
    assert not unread, "config fields nothing reads: " + ", ".join(unread)


@pytest.mark.parametrize("code, expected", [
    ("class C:\n    x: int = 0\n    def f(self):\n        return self.x\n", ["x"]),
    ("def f(c):\n    return getattr(c, 'y')\n", ["y"]),
    ("def f(c):\n    c.z = 1\n", []),  # a write is no read
])
def test_the_read_finder_sees_attribute_reads_only(code, expected):
    tree = {pathlib.Path("m.py"): ast.parse(code)}
    assert sorted(reads(tree)) == expected
