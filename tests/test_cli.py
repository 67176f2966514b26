"""Every command-line program's --help shows the defaults (src/cli.py)."""

import argparse
import re

from src.cli import HelpFormatter
from tests.conftest import ROOT


def test_help_shows_every_default_and_keeps_the_descriptions_lines():
    parser = argparse.ArgumentParser(description="line one\n  line two", formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--seed", type=int, default=0)  # no help text: the default is shown all the same
    parser.add_argument("--out", default=None)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--no-ema", action="store_true")
    text = re.sub(r"\s+", " ", parser.format_help())
    assert "--steps STEPS Euler steps (default: 20)" in text
    assert "--seed SEED (default: 0)" in text
    assert "--out OUT --workers WORKERS processes (default: all CPUs) --no-ema" in text  # said once; None: unset
    assert "line one\n  line two" in parser.format_help()


def test_every_cli_uses_the_help_formatter():
    clis = 0
    for path in (ROOT / "src").rglob("*.py"):
        for call in re.findall(r"argparse\.ArgumentParser\((.*?)\)\n", path.read_text(), re.S):
            assert "formatter_class=HelpFormatter" in call, path
            clis += 1
    assert clis >= 16  # src.sample, src.export, src.stages, src.data.write, the benchmarks...


def test_the_readme_layout_names_every_module_of_src():
    # the README's layout section is the map a newcomer reads first: every module of src/ is on it, in its room
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```")[1]
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "src").rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and str(path.relative_to(ROOT)) not in layout
        and not (path.name in layout and f"src/{path.parent.relative_to(ROOT / 'src')}/" in layout)
    ]
    assert not missing, f"README.md's layout does not name {missing}"


def test_src_imports_one_way_with_no_circle():
    # module-level imports of src/ (those inside functions too): a circle means two rooms that cannot be read apart
    import ast

    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "src").rglob("*.py")}  # fmt: skip
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                graph[name].add(node.module)
                graph[name] |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & modules.keys()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name] - {name}):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
