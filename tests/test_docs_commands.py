"""Every command and repository path in README.md and docs/*.md runs as written (issue 10, item 7).

The command lines are taken from the docs' shell code blocks and from inline `code` spans that start with a
command: a console script of pyproject.toml, `python -m MODULE`, `python benchmarks/...`, `accelerate launch
... -m MODULE` (optionally `.venv/bin/` and VAR=value prefixes). Each must name an existing command; a hydra
command's key=value overrides must name keys or config choices its config has (mindeye.cli.check_overrides);
an argparse script's --flags must be ones its parser defines (read from its source with ast, so nothing
heavy is imported). Paths of repository files in the docs must exist. All problems are reported at once.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

from mindeye.cli import check_overrides

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = {name: target.split(":")[0] for name, target in
           tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].items()}
# Top folders of the repository whose files the docs name, and runs/ (outputs: each must be one a documented
# command writes); data/ is generated, not checked
TRACKED = ("runs", "docs", "benchmarks", "weights", "configs", "mindeye", "realtime", "simulators", "offline_training",
           "export", "tests")
PATH = re.compile(rf"(?<![\w./<-])((?:{'|'.join(TRACKED)})/[\w./<>-]*)")
PLACEHOLDER = re.compile(r"[<>]|\.\.\.|\b[A-Z][A-Z_]{2,}\b")  # <run>, <generator folder>, ..., PATH, OUT_DIR
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}


# ---- extraction ---------------------------------------------------------------------------------------

def snippets(doc: Path) -> tuple[list[str], list[str]]:
    """(command-line candidates, other text to scan for paths): the lines of shell code blocks with
    continuations joined and comments dropped, and every inline code span."""
    lines = []
    text = doc.read_text()
    for language, body in re.findall(r"^\s*```(\w*)\n(.*?)^\s*```", text, flags=re.DOTALL | re.MULTILINE):
        if language in SHELL_BLOCKS:
            body = re.sub(r"\\\n\s*", " ", body)
            lines += [re.sub(r"(^|\s)#.*", "", line).strip() for line in body.splitlines()]
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.DOTALL | re.MULTILINE)
    # a span may wrap onto the next line of the paragraph
    spans = [" ".join(span.replace("\\|", "|").split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose)]
    return [line for line in lines if line], spans


def commands(fragment: str) -> list[list[str]]:
    """The commands in one line or span, each as its arguments from the command name on (env prefixes and
    `.venv/bin/` dropped); text that does not start with a command gives none."""
    found = []
    for part in re.split(r"&&|\|\||;|\s\|\s", fragment):
        try:
            words = shlex.split(part)
        except ValueError:  # an apostrophe in prose
            words = part.split()
        while words and re.match(r"[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            words[0] = words[0].removeprefix(".venv/bin/")
        if words and (words[0] in SCRIPTS or words[0] in ("python", "accelerate") or words[0].startswith("./")):
            found.append(words)
    return found


# ---- checks -------------------------------------------------------------------------------------------

def module_file(module: str) -> Path | None:
    """The repository file that `python -m module` runs, or None if it is not the repository's."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def hydra_config(path: Path) -> str | None:
    """The config name of a hydra command's module (its `@command("name", ...)`), or None for argparse."""
    match = re.search(r"^@command\(\"([^\"]+)\"", path.read_text(), flags=re.MULTILINE)
    return match[1] if match else None


@functools.cache
def argparse_flags(path: Path) -> frozenset[str]:
    """Every option string given to an `add_argument` call in the script's source."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return frozenset(flags)


def override_problems(config: str, arguments: list[str]) -> list[str]:
    """check_overrides on the key=value arguments, with placeholders in values and `a|b` alternatives
    (each alternative checked) handled: only the keys and real config choices are judged."""
    overrides, alternatives = [], []
    for argument in arguments:
        argument = re.sub(r"^\[(.*=.*)\]$", r"\1", argument)  # an optional argument: [world=tiny|small]
        if argument == "..." or "=" not in argument or argument.startswith("-"):
            continue
        key, value = argument.split("=", 1)
        if PLACEHOLDER.search(value):
            value = "PLACEHOLDER"
        choices = value.split("|") if "|" in value and not value.startswith("[") else [value]
        overrides.append(f"{key}={choices[0]}")
        alternatives += [(len(overrides) - 1, f"{key}={choice}") for choice in choices[1:]]
    problems = []
    for swap in [None, *alternatives]:
        tried = list(overrides)
        if swap:
            tried[swap[0]] = swap[1]
        problem = check_overrides(config, tried)
        if problem and "'PLACEHOLDER'" not in problem:  # a config group's choice left as a placeholder
            problems.append(problem)
    return problems


def command_problems(words: list[str]) -> list[str]:
    name, arguments = words[0], words[1:]
    if name == "accelerate":
        if "-m" not in arguments:
            return []
        arguments = arguments[arguments.index("-m") + 1:]
        name, arguments = "python", ["-m", *arguments]
    if name.startswith("./"):
        return [] if (REPO / name).is_file() else [f"{name}: no such script"]
    if name == "python":
        if arguments[:1] == ["-m"] and len(arguments) > 1:
            module, arguments = arguments[1], arguments[2:]
            path = module_file(module)
            if path is None:  # an installed tool (pytest) is fine; a missing module of the repository is not
                top = module.split(".")[0]
                return [] if not (REPO / top).exists() and importlib.util.find_spec(top) else [f"no module {module}"]
        elif arguments and arguments[0].endswith(".py"):
            path, arguments = REPO / arguments[0], arguments[1:]
            if not path.is_file():
                return [f"no script {path.relative_to(REPO)}"]
        else:
            return []
    else:
        path = module_file(SCRIPTS[name])
        if path is None:
            return [f"{name}: its module {SCRIPTS[name]} is missing"]
    config = hydra_config(path)
    if config is not None:
        return override_problems(config, arguments)
    flags = argparse_flags(path)
    return [f"unknown option {flag.split('=')[0]}" for flag in arguments
            if flag.startswith("-") and flag.split("=")[0] not in flags]


def written_paths(texts: list[str]) -> set[str]:
    """Folders the documented commands write (--out, out_dir=), and the demo's model folder."""
    from mindeye.config import load_config

    written = {m for text in texts for m in re.findall(r"(?:--out|out_dir=)[ =]?(\S+)", text)}
    return written | {str(load_config("demo").train.out_dir)}


def path_problems(doc: Path, texts: list[str], written: set[str]) -> list[str]:
    """Repository paths named in the texts that do not exist, and runs/ paths that no documented command
    writes; a path with a placeholder (<...>, NN, *) or under a written folder is not checked."""
    missing = []
    for text in texts:
        for path in PATH.findall(text):
            path = path.rstrip(".")
            if re.search(r"<|\*|NN|AA|CC", path) or any(path.startswith(w.rstrip("/")) for w in written):
                continue
            if path.startswith("runs/"):
                missing.append(f"no documented command writes {path}")
            elif not (REPO / path).exists():
                missing.append(f"no such file: {path}")
    text = doc.read_text()
    for page in set(re.findall(r"[\w./-]+\.md\b", text)):  # other docs, named anywhere on the page
        if not ((REPO / page).exists() or (doc.parent / page).exists() or any(REPO.glob(f"*/{page}"))):
            missing.append(f"no such page: {page}")
    links = re.findall(r"\]\(([^)#\s]+)\)", text)  # markdown links and images, relative to the doc
    missing += [f"broken link: {link}" for link in links
                if "://" not in link and not (doc.parent / link).exists()]
    return missing


def test_docs_commands_and_paths_exist():
    problems, checked = [], 0
    texts = {doc: sum(snippets(doc), []) for doc in DOCS}
    written = written_paths(sum(texts.values(), []))
    for doc, fragments in texts.items():
        for fragment in fragments:
            for words in commands(fragment):
                checked += 1
                problems += [f"{doc.relative_to(REPO)}: `{' '.join(words)}`: {p}" for p in command_problems(words)]
        problems += [f"{doc.relative_to(REPO)}: {p}" for p in path_problems(doc, fragments, written)]
    assert checked > 30, f"only {checked} command lines found: is the extraction broken?"
    assert not problems, f"{len(problems)} problems in the docs:\n" + "\n".join(dict.fromkeys(problems))
