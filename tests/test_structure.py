"""The readability rules of STYLE.md hold for the tree (tools/check_structure.py measures them)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import check_structure  # noqa: E402


def test_the_structure_rules_hold():
    m = check_structure.measure()
    assert check_structure.problems(m) == []


def test_the_checker_sees_a_cycle_and_a_long_function():
    assert check_structure.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]
    src = "def f(a, b, c, d, e, f, g):\n" + "    x = 1\n" * 70
    (name, fn), = check_structure.functions(__import__("ast").parse(src))
    assert name == "f" and check_structure.n_params(fn) == 7 and fn.end_lineno - fn.lineno + 1 == 71
