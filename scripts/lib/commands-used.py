#!/usr/bin/env python3
"""List the external commands that the project's scripts and tests call.

Usage: commands-used.py FILE...   (*.sh and files with a shell shebang: parsed with `shfmt
--to-json`; *.rs: `Command::new("name")` literals)
       commands-used.py --reach REPO ENTRY...   the repo's scripts that ENTRY scripts reach
       (ENTRY and output relative to REPO): every `*.sh` named outside a comment, resolved
       against the repo root or the naming script's folder, followed transitively

Prints one line per command: `NAME<TAB>required|guarded<TAB>FILE:LINE` (the first place seen).
`guarded` means every call site in that file sits behind a `command -v NAME` test, so the script
copes without it (an optional peer); anything called without such a test is `required`.

What counts as a call: the first word of a simple command when it is a literal name (not a
variable, not a path), looking through wrappers (timeout, nohup, exec, env, xargs, setsid, nice,
stdbuf, flock, `ip netns exec NS`), into command substitutions, `bash -c STRING` and the string
arguments of a script's own functions that `eval` them (demo.sh's `show "ls $MNT"`). Shell
builtins, keywords and functions defined in any scanned file are not commands.
"""

import json
import re
import subprocess
import sys

BUILTINS = set(
    subprocess.run(
        ["bash", "-c", "compgen -b; compgen -k"], capture_output=True, text=True, check=True
    ).stdout.split()
) | {"[[", "]]"}

# wrapper -> options that take an argument; the first non-option word after them (and after
# the wrapper's own positional arguments) is the command that runs.
WRAPPERS = {
    "timeout": ({"-s", "--signal", "-k", "--kill-after"}, 1),
    "nohup": (set(), 0),
    "exec": ({"-a"}, 0),
    "command": (set(), 0),
    "env": ({"-u", "-C", "-S"}, 0),
    "xargs": ({"-I", "-n", "-P", "-L", "-d", "-E", "-s", "-a"}, 0),
    "setsid": (set(), 0),
    "nice": ({"-n"}, 0),
    "stdbuf": (set(), 0),
    "flock": ({"-w", "-E", "-c"}, 1),
    "taskset": ({"-c"}, 1),
    "time": (set(), 0),
    "unbuffer": (set(), 0),
}


def lit(word):
    """A word's literal text, or None when any part is not literal."""
    out = []
    for part in word.get("Parts", []):
        t = part.get("Type")
        if t == "Lit":
            out.append(part.get("Value", ""))
        elif t == "SglQuoted":
            out.append(part.get("Value", ""))
        elif t == "DblQuoted":
            inner = lit(part)
            if inner is None:
                return None
            out.append(inner)
        else:
            return None
    return "".join(out)


def loose(word):
    """A word's text with every expansion replaced by X: for strings that are shell code."""
    out = []
    for part in word.get("Parts", []):
        t = part.get("Type")
        if t in ("Lit", "SglQuoted"):
            out.append(part.get("Value", ""))
        elif t == "DblQuoted":
            out.append(loose(part))
        elif t == "CmdSubst":
            out.append("X")
        else:
            out.append("X")
    return "".join(out)


def parse_shell(text, name):
    res = subprocess.run(
        ["shfmt", "--to-json", "-ln", "bash"], input=text, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"commands-used: shfmt cannot parse {name}: {res.stderr.strip()}")
    return json.loads(res.stdout)


def walk(node, visit):
    if isinstance(node, dict):
        visit(node)
        for v in node.values():
            walk(v, visit)
    elif isinstance(node, list):
        for v in node:
            walk(v, visit)


class Scan:
    def __init__(self):
        self.functions = set()
        self.evaluators = set()
        # name -> {"required": [where...], "guarded": [where...]}
        self.calls = {}
        self.guarded = {}  # file -> set of names tested with command -v

    def note(self, name, where, path):
        if not name or "/" in name or name.startswith("$") or "=" in name:
            return
        if not re.fullmatch(r"[A-Za-z0-9_.+:@-]+", name) or name == "X":
            return
        self.calls.setdefault(name, []).append((where, path))

    def call(self, args, path, line):
        words = [lit(a) for a in args]
        i = 0
        while i < len(words):
            name = words[i]
            if name is None:
                return
            if name == "command" and i + 1 < len(words) and words[i + 1] in ("-v", "-V"):
                for w in words[i + 2 :]:
                    if w:
                        self.guarded.setdefault(path, set()).add(w)
                return
            if name == "ip" and words[i + 1 : i + 3] == ["netns", "exec"]:
                self.note("ip", f"{path}:{line}", path)
                i += 4
                continue
            if name in WRAPPERS:
                self.note(name, f"{path}:{line}", path) if name not in BUILTINS else None
                opts_with_arg, positional = WRAPPERS[name]
                i += 1
                while i < len(words) and words[i] is not None and (
                    words[i].startswith("-") or (name == "env" and "=" in words[i])
                ):
                    i += 2 if words[i] in opts_with_arg else 1
                i += positional
                continue
            if name in ("bash", "sh") and i + 2 < len(args) and words[i + 1] == "-c":
                self.note(name, f"{path}:{line}", path)
                self.shell_text(loose(args[i + 2]), path, line)
                return
            if name in self.evaluators:
                self.shell_text(" ".join(loose(a) for a in args[i + 1 :]), path, line)
                return
            self.note(name, f"{path}:{line}", path)
            return

    def shell_text(self, text, path, line):
        """Shell code inside a string (bash -c, eval): its calls are noted at the string's line."""
        try:
            tree = parse_shell(text, path)
        except SystemExit:
            return
        self.shell_tree(tree, path, line)

    def shell_tree(self, tree, path, line=None):
        def visit(node):
            if node.get("Type") == "CallExpr" and node.get("Args"):
                self.call(node["Args"], path, line or node.get("Pos", {}).get("Line", 0))

        walk(tree, visit)

    def functions_of(self, tree):
        def visit(node):
            if node.get("Type") == "FuncDecl":
                name = node.get("Name", {}).get("Value")
                if name:
                    self.functions.add(name)
                    body = json.dumps(node.get("Body"))
                    if '"eval"' in body:
                        self.evaluators.add(name)

        walk(tree, visit)


def is_shell(path):
    if path.endswith(".sh"):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return False
    return first.startswith(b"#!") and (b"bash" in first or b"/sh" in first)


def main(paths):
    scan = Scan()
    trees = []
    for p in paths:
        if p.endswith(".rs"):
            continue
        if is_shell(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                tree = parse_shell(f.read(), p)
            scan.functions_of(tree)
            trees.append((p, tree))
    for p, tree in trees:
        scan.shell_tree(tree, p)
    for p in paths:
        if not p.endswith(".rs"):
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            for n, text in enumerate(f, 1):
                for m in re.finditer(r'Command::new\(\s*"([^"]+)"', text):
                    scan.note(m.group(1), f"{p}:{n}", p)
    skip = BUILTINS | scan.functions
    for name in sorted(scan.calls):
        if name in skip:
            continue
        sites = scan.calls[name]
        guarded = all(name in scan.guarded.get(path, set()) for _, path in sites)
        print(f"{name}\t{'guarded' if guarded else 'required'}\t{sites[0][0]}")


def reach(repo, entries):
    import os

    seen, todo = [], list(entries)
    while todo:
        rel = todo.pop(0)
        if rel in seen:
            continue
        seen.append(rel)
        with open(os.path.join(repo, rel), encoding="utf-8", errors="replace") as f:
            code = "\n".join(l for l in f.read().splitlines() if not l.lstrip().startswith("#"))
        # "$HERE/x.sh", "${DIR}/x.sh": drop the variable, keep the path after it.
        code = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\}?", "", code)
        here = os.path.dirname(rel)
        for tok in re.findall(r"[A-Za-z0-9_./-]*\.sh\b", code):
            tok = tok.lstrip("/")
            for base in ("",) if tok.startswith("scripts/") else (here, ""):
                cand = os.path.normpath(os.path.join(base, tok))
                if os.path.isfile(os.path.join(repo, cand)) and not cand.startswith(".."):
                    todo.append(cand)
                    break
    return seen


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reach"]:
        print("\n".join(reach(sys.argv[2], sys.argv[3:])))
    else:
        main(sys.argv[1:])
