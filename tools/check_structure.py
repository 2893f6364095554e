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
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIX = {"co2s", "model", "losses", "data", "train", "eval"}
SUPPORT = "plumbing"
# the card's packages (huggingface_hub and safetensors come with transformers)
PACKAGES = set("torch torchvision transformers numpy PIL tqdm huggingface_hub safetensors".split())
MAX_LINES, MAX_PARAMS, MAX_LONG_SHARE, WIDTH = 60, 6, 0.05, 100
EXEMPT_LENGTH, EXEMPT_PARAMS = {"get_args"}, {"__init__", "get_args"}
# the files allowed to name torch.save: the one writer, and this checker
SAVERS = (os.path.join(SUPPORT, "atomic.py"), os.path.join("tools", "check_structure.py"))


def module_name(path):
    return path[:-3].replace(os.sep, ".").removesuffix(".__init__")


def functions(tree):
    """(qualified name, node) of every function, methods as Class.name."""
    owner = {f: f"{c.name}." for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
    return [(owner.get(f, "") + f.name, f) for f in ast.walk(tree) if type(f) is ast.FunctionDef]


def n_params(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]
    return len([n for n in names if n not in ("self", "cls")])


def imports(tree):
    """Every module name a file imports, in full ('plumbing.runs', 'torch.nn', ...)."""
    nodes = list(ast.walk(tree))
    found = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    # absolute `from X import Y`: X and X.Y (Y may be a module)
    froms = [n for n in nodes if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    return found | {x for n in froms for a in n.names for x in (n.module, f"{n.module}.{a.name}")}


def cycles(graph):
    """Every import cycle among the project's modules, as a list of module names."""
    found, seen = [], set()

    # depth first; path: the modules being visited, so an import of one of them closes a cycle
    def visit(m, path):
        seen.add(m)
        for n in sorted(graph[m]):
            if n in path:
                found.append(path[path.index(n) :] + [n])
            elif n not in seen:
                visit(n, path + [n])

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    return found


def foreign_imports(name, found, modules):
    """What one of the six imports beyond the card's packages, stdlib and the support package: a
    module of ours outside the six, or a package."""
    allowed = SIX | PACKAGES | {SUPPORT} | sys.stdlib_module_names
    tops = {f: f.split(".")[0] for f in found if f.split(".")[0] not in allowed}
    return sorted(f for f, top in tops.items() if f in modules or top not in modules)


def measure():
    """Figures and broken rules of the tree."""
    # the project's Python files: top level, plumbing/, tools/ and tests/ (relative paths)
    dirs = ("", SUPPORT, "tools", "tests")
    files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.py"), root_dir=ROOT))
    texts = {f: open(os.path.join(ROOT, f)).read() for f in files}
    project = [f for f in files if not f.startswith("tests")]
    # module -> what it imports; (where, name, lines, parameters) per function
    modules, fns = {}, []
    for f in project:
        tree = ast.parse(texts[f])
        modules[module_name(f)] = imports(tree)
        for q, fn in functions(tree):
            fns.append((f"{f}:{q}", fn.name, fn.end_lineno - fn.lineno + 1, n_params(fn)))
    graph = {n: {m for m in imp if m in modules} - {n} for n, imp in modules.items()}
    lines = [line for f in project for line in texts[f].splitlines()]
    m = dict(files={f: len(t.splitlines()) for f, t in texts.items()}, cycles=cycles(graph))
    m["top"] = sorted(f[:-3] for f in files if os.sep not in f)
    m["foreign"] = {n: foreign_imports(n, imp, modules) for n, imp in modules.items() if n in SIX}
    m["long_functions"] = [(w, k) for w, n, k, _ in fns if k > MAX_LINES and n not in EXEMPT_LENGTH]
    m["many_params"] = [(w, k) for w, n, _, k in fns if k > MAX_PARAMS and n not in EXEMPT_PARAMS]
    m["long_line_share"] = sum(len(line) > WIDTH for line in lines) / max(len(lines), 1)
    m["checkpoint_writers"] = [f for f in project if "torch.save(" in texts[f] and f not in SAVERS]
    return m


def problems(m):
    """One line per broken rule."""
    top = f"top-level files {m['top']}; the card's are {sorted(SIX)}"
    out = [top] if set(m["top"]) != SIX else []
    out += [f"{n}.py imports {', '.join(bad)}" for n, bad in m["foreign"].items() if bad]
    out += [f"import cycle {' -> '.join(c)}" for c in m["cycles"]]
    out += [f"{n}: {k} lines (max {MAX_LINES})" for n, k in m["long_functions"]]
    out += [f"{n}: {k} parameters (max {MAX_PARAMS})" for n, k in m["many_params"]]
    share, most = 100 * m["long_line_share"], 100 * MAX_LONG_SHARE
    if m["long_line_share"] > MAX_LONG_SHARE:
        out.append(f"{share:.1f} % of source lines over {WIDTH} characters (max {most:.0f} %)")
    saves = "calls torch.save: files are written by plumbing/atomic.py only"
    return out + [f"{f} {saves}" for f in m["checkpoint_writers"]]


if __name__ == "__main__":
    m = measure()
    print("\n".join(f"{n:6d}  {f}" for f, n in m["files"].items()))
    print(f"lines over {WIDTH} characters: {100 * m['long_line_share']:.1f} %")
    broken = problems(m)
    print("\n".join(broken) if broken else "all rules hold")
    sys.exit(1 if broken else 0)
