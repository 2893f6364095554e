"""The layout of the card and the readability rules of STYLE.md hold (tools/check_structure.py)."""

import argparse
import ast
import os
import re
import subprocess
import sys

import pytest

from tools import check_structure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_structure_rules_hold():
    m = check_structure.measure()
    assert check_structure.problems(m) == []
    assert set(m["top"]) == check_structure.SIX


def test_the_checker_sees_a_cycle_a_long_function_a_seventh_file_and_a_tool_import():
    assert check_structure.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]
    src = "def f(a, b, c, d, e, f, g):\n" + "    x = 1\n" * 70
    ((name, fn),) = check_structure.functions(ast.parse(src))
    assert name == "f" and check_structure.n_params(fn) == 7 and fn.end_lineno - fn.lineno + 1 == 71
    m = dict(check_structure.measure(), top=sorted(check_structure.SIX | {"scene"}))
    assert any("top-level files" in p for p in check_structure.problems(m))
    found = check_structure.imports(ast.parse("from tools import plot\nimport matplotlib"))
    modules = {"tools", "tools.plot", "plumbing.runs"}
    bad = check_structure.foreign_imports("train", found, modules)
    assert bad == ["matplotlib", "tools", "tools.plot"]


def test_importing_the_six_loads_no_tool_and_no_field_library():
    code = (
        "import sys, co2s, model, losses, data, train, eval\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tools', 'matplotlib', 'rasterio', 'cv2')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def documented_commands():
    """Every `python ...` command of README.md and docs/*.md: (file, script or module, argv)."""
    found = []
    for doc in ["README.md"] + [
        os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
    ]:
        text = open(os.path.join(ROOT, doc)).read()
        for m in re.finditer(r"(?:^|`|\s)python (-m [\w.]*\w|[\w/.]+\.py)([^`\n#|]*)", text, re.M):
            target, rest = m.group(1), m.group(2)
            if target in ("-m pytest", "-m venv"):
                continue
            found.append((doc, target, rest.split()))
    return found


COMMANDS = documented_commands()


def parser_of(target):
    """The argparse parser of a script or tool, without running it (parse_args is intercepted)."""
    module = target[3:] if target.startswith("-m ") else target[:-3].replace("/", ".")
    captured = {}

    class Found(Exception):
        pass

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise Found

    real = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture
    try:
        sys.modules.pop(module, None)  # a module-level parser (tools/bench.py) runs on import
        mod = __import__(module, fromlist=["main"])
        if not hasattr(mod, "main"):  # a tool without flags (tools/check_structure.py)
            return None
        mod.main([])
    except Found:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = real
    return captured.get("parser")


@pytest.mark.parametrize("doc,target,argv", COMMANDS, ids=[f"{d}:{t}" for d, t, _ in COMMANDS])
def test_every_documented_command_exists_and_its_flags_are_real(doc, target, argv):
    script = target[3:].replace(".", "/") + ".py" if target.startswith("-m ") else target
    assert os.path.isfile(os.path.join(ROOT, script)), f"{doc}: {target} does not exist"
    parser = parser_of(target)
    if parser is None:
        assert argv == [], f"{doc}: {target} takes no flags"
        return
    if parser is None:  # a tool with a module-level parser (tools/bench.py): --help must run
        out = subprocess.run(
            [sys.executable, *target.split(), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return
    known = {s for a in parser._actions for s in a.option_strings}
    if parser.epilog and "passed to train.py" in parser.epilog:  # tools/ablate.py
        known |= {s for a in parser_of("train.py")._actions for s in a.option_strings}
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert [f for f in flags if f not in known] == [], f"{doc}: {target} has no such flag"
