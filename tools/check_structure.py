"""tools/check_structure.py: the codebase's readability rules, measured (run from the repository root).

    python tools/check_structure.py          # prints the figures; exit status 1 if a rule is broken

Rules (STYLE.md), for the project's source (the top-level files and tools/; tests are exempt from
the function rules): no import cycle between the top-level modules; no function over 60 lines
except the flag tables (`get_args`); no function over 6 parameters except constructors
(`__init__`) and the flag tables; at most 5 % of source lines over 100 characters; the checkpoint
format written in one place (`torch.save` is called only by runs.py). tests/test_structure.py runs
it in the suite.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES, MAX_PARAMS, MAX_LONG_SHARE, WIDTH = 60, 6, 0.05, 100
EXEMPT_LENGTH, EXEMPT_PARAMS = {"get_args"}, {"__init__", "get_args"}


def sources():
    """The project's Python files: top level, tools/ and tests/ (relative paths)."""
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    for sub in ("tools", "tests"):
        if os.path.isdir(os.path.join(ROOT, sub)):
            files += [os.path.join(sub, f) for f in os.listdir(os.path.join(ROOT, sub)) if f.endswith(".py")]
    return sorted(files)


def functions(tree):
    """(qualified name, node) of every function, methods as Class.name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            out += [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef)]
        elif isinstance(node, ast.FunctionDef) and not any(
                node in getattr(c, "body", []) for c in ast.walk(tree) if isinstance(c, ast.ClassDef)):
            out.append((node.name, node))
    return out


def n_params(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def imports(tree, modules):
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def cycles(graph):
    """Every import cycle among the top-level modules, as a list of module names."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def measure():
    """Figures and broken rules of the tree."""
    top = [f for f in sources() if os.sep not in f]
    modules = {f[:-3] for f in top}
    graph, long_fns, many_params, saves = {}, [], [], []
    total = long_lines = 0
    per_file = {}
    for f in sources():
        text = open(os.path.join(ROOT, f)).read()
        tree = ast.parse(text)
        lines = text.splitlines()
        per_file[f] = len(lines)
        if f in top:
            graph[f[:-3]] = imports(tree, modules) - {f[:-3]}
            total += len(lines)
            long_lines += sum(len(line) > WIDTH for line in lines)
            if "torch.save(" in text and f != "runs.py":
                saves.append(f)
        for name, fn in functions(tree) if not f.startswith("tests") else []:
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_LINES and name.split(".")[-1] not in EXEMPT_LENGTH:
                long_fns.append((f"{f}:{name}", length))
            if n_params(fn) > MAX_PARAMS and name.split(".")[-1] not in EXEMPT_PARAMS:
                many_params.append((f"{f}:{name}", n_params(fn)))
    return dict(files=per_file, cycles=cycles(graph), long_functions=long_fns, many_params=many_params,
                long_line_share=long_lines / max(total, 1), checkpoint_writers=saves)


def problems(m):
    out = [f"import cycle {' -> '.join(c)}" for c in m["cycles"]]
    out += [f"{n}: {k} lines (max {MAX_LINES})" for n, k in m["long_functions"]]
    out += [f"{n}: {k} parameters (max {MAX_PARAMS})" for n, k in m["many_params"]]
    if m["long_line_share"] > MAX_LONG_SHARE:
        out.append(f"{100 * m['long_line_share']:.1f} % of source lines over {WIDTH} characters "
                   f"(max {100 * MAX_LONG_SHARE:.0f} %)")
    out += [f"{f} calls torch.save: checkpoints are written by runs.py only" for f in m["checkpoint_writers"]]
    return out


if __name__ == "__main__":
    m = measure()
    for f, n in m["files"].items():
        print(f"{n:6d}  {f}")
    print(f"lines over {WIDTH} characters: {100 * m['long_line_share']:.1f} %")
    broken = problems(m)
    print("\n".join(broken) if broken else "all rules hold")
    sys.exit(1 if broken else 0)
