"""tools/check_structure.py: the codebase's layout and readability rules, measured.

    python -m tools.check_structure      # prints the figures; exit status 1 if a rule is broken

Rules (STYLE.md): the top level is exactly the card's six files (co2s, model, losses, data, train,
eval); the six import only the card's packages, the standard library and the support package
(plumbing/), never tools/; no import cycle between modules; no function over 60 lines except the
flag tables (`get_args`); no function over 6 parameters except constructors (`__init__`) and the
flag tables; at most 5 % of source lines over 100 characters; the checkpoint format written in one
place (`torch.save` is called only by plumbing/atomic.py, for plumbing/runs.py). tests/test_structure.py runs it in the
suite.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIX = {"co2s", "model", "losses", "data", "train", "eval"}
SUPPORT = "plumbing"
# the card's packages (huggingface_hub and safetensors come with transformers)
PACKAGES = {
    "torch",
    "torchvision",
    "transformers",
    "numpy",
    "PIL",
    "tqdm",
    "huggingface_hub",
    "safetensors",
}
MAX_LINES, MAX_PARAMS, MAX_LONG_SHARE, WIDTH = 60, 6, 0.05, 100
EXEMPT_LENGTH, EXEMPT_PARAMS = {"get_args"}, {"__init__", "get_args"}
THIS = os.path.join("tools", "check_structure.py")


def sources():
    """The project's Python files: top level, plumbing/, tools/ and tests/ (relative paths)."""
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    for sub in (SUPPORT, "tools", "tests"):
        folder = os.path.join(ROOT, sub)
        files += [os.path.join(sub, f) for f in os.listdir(folder) if f.endswith(".py")]
    return sorted(files)


def module_name(path):
    return path[:-3].replace(os.sep, ".").removesuffix(".__init__")


def functions(tree):
    """(qualified name, node) of every function, methods as Class.name."""
    out, methods = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for f in node.body:
                if isinstance(f, ast.FunctionDef):
                    out.append((f"{node.name}.{f.name}", f))
                    methods.add(f)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node not in methods:
            out.append((node.name, node))
    return out


def n_params(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def imports(tree):
    """Every module name a file imports, in full ('plumbing.runs', 'torch.nn', ...)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def cycles(graph):
    """Every import cycle among the project's modules, as a list of module names."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def foreign_imports(name, found, modules):
    """What one of the six imports beyond the card's packages, stdlib and the support package."""
    bad = []
    for full in found:
        top = full.split(".")[0]
        if top in SIX or top == SUPPORT or top in PACKAGES or top in sys.stdlib_module_names:
            continue
        if full in modules or top not in modules:  # a module of ours outside the six, or a package
            bad.append(full)
    return sorted(bad)


def measure():
    """Figures and broken rules of the tree."""
    files = sources()
    project = [f for f in files if not f.startswith("tests")]
    modules = {module_name(f) for f in project}
    graph, long_fns, many_params, saves, foreign = {}, [], [], [], {}
    total = long_lines = 0
    per_file = {}
    for f in files:
        text = open(os.path.join(ROOT, f)).read()
        tree = ast.parse(text)
        lines = text.splitlines()
        per_file[f] = len(lines)
        if f.startswith("tests"):
            continue
        name, found = module_name(f), imports(tree)
        graph[name] = {m for m in found if m in modules} - {name}
        total += len(lines)
        long_lines += sum(len(line) > WIDTH for line in lines)
        if "torch.save(" in text and f not in (os.path.join(SUPPORT, "atomic.py"), THIS):
            saves.append(f)
        if name in SIX:
            foreign[name] = foreign_imports(name, found, modules)
        for fname, fn in functions(tree):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_LINES and fname.split(".")[-1] not in EXEMPT_LENGTH:
                long_fns.append((f"{f}:{fname}", length))
            if n_params(fn) > MAX_PARAMS and fname.split(".")[-1] not in EXEMPT_PARAMS:
                many_params.append((f"{f}:{fname}", n_params(fn)))
    top = sorted(f[:-3] for f in files if os.sep not in f)
    return dict(
        files=per_file,
        top=top,
        cycles=cycles(graph),
        long_functions=long_fns,
        many_params=many_params,
        long_line_share=long_lines / max(total, 1),
        checkpoint_writers=saves,
        foreign=foreign,
    )


def problems(m):
    out = []
    if set(m["top"]) != SIX:
        out.append(f"top-level files {m['top']}; the card's are {sorted(SIX)}")
    out += [f"{n}.py imports {', '.join(bad)}" for n, bad in m["foreign"].items() if bad]
    out += [f"import cycle {' -> '.join(c)}" for c in m["cycles"]]
    out += [f"{n}: {k} lines (max {MAX_LINES})" for n, k in m["long_functions"]]
    out += [f"{n}: {k} parameters (max {MAX_PARAMS})" for n, k in m["many_params"]]
    if m["long_line_share"] > MAX_LONG_SHARE:
        out.append(
            f"{100 * m['long_line_share']:.1f} % of source lines over {WIDTH} characters "
            f"(max {100 * MAX_LONG_SHARE:.0f} %)"
        )
    out += [
        f"{f} calls torch.save: files are written by plumbing/atomic.py only"
        for f in m["checkpoint_writers"]
    ]
    return out


if __name__ == "__main__":
    m = measure()
    for f, n in m["files"].items():
        print(f"{n:6d}  {f}")
    print(f"lines over {WIDTH} characters: {100 * m['long_line_share']:.1f} %")
    broken = problems(m)
    print("\n".join(broken) if broken else "all rules hold")
    sys.exit(1 if broken else 0)
