"""The docs cannot rot. Every `parity ...` line (or `$ parity ...`) in a fenced code block of README.md and docs/*.md
is either run or checked (and `mkdir -p out` lines run, so that the docs' examples can be run as written):

- a command that names a file shipped under golden/, or an `out/...` path that such a command wrote, runs, in the
  order written, beside a temporary copy of golden/ (so `-o out/...` lands in the temporary directory), and must exit
  0, or the status a trailing `# exit N` gives, and print every `error: ...` line the docs show below it;
- every other command (a released checkpoint, a placeholder such as CKPT) must name a real command of
  `parity.cli.main`, real options of it, a value each Choice option accepts, every required option, and no more
  positional arguments than the command takes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import click
import pytest

from parity.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
# the `parity` script installed beside this Python, else the same entry point through it
SCRIPT = Path(sys.executable).with_name("parity")
PARITY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "from parity.cli import main; main()"]


@dataclass(frozen=True)
class Command:
    doc: str  # file name relative to ROOT
    line: int  # 1-based line of the command in that file
    text: str  # the command as written, continuation lines joined
    argv: tuple[str, ...]  # `parity` (or `mkdir`) and its arguments
    exit: int  # expected exit status
    runs: bool  # uses a shipped golden/ file, or an out/ path that an earlier command of the page that runs wrote
    errors: tuple[str, ...] = ()  # `error: ...` lines the docs show right below the command

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def commands(path: Path) -> list[Command]:
    """The `parity` command lines of every fenced block of `path`."""
    found, fence, pending, start, last, written = [], None, "", 0, -1, set()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(raw)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            continue
        line = raw.strip()
        if line.startswith("error: ") and found and found[-1].doc == str(path.relative_to(ROOT)) and last == n - 1:
            found[-1] = replace(found[-1], errors=(*found[-1].errors, line))
            last = n
            continue
        if not pending:
            line = line.removeprefix("$ ")
            if not line.startswith(("parity ", "mkdir -p out")):
                continue
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        code = EXIT.search(text)
        argv = shlex.split(text, comments=True)
        runs = argv[0] == "mkdir" or any(
            (a.startswith("golden/") and (ROOT / a).exists()) or a in written for a in argv
        )
        if runs:
            written.update(a for a in argv if a.startswith("out/"))
        doc, exit_status = str(path.relative_to(ROOT)), int(code.group(1)) if code else 0
        found.append(Command(doc, start, text, tuple(argv), exit_status, runs))
        last = n
    return found


ALL = [c for doc in DOCS for c in commands(doc)]
PARITY_LINES = [c for c in ALL if c.argv[0] == "parity"]


def resolve(argv: tuple[str, ...]) -> tuple[click.Command, list[str], str]:
    """The click command `argv` names, the arguments left for it, and its name."""
    cmd, args, name = main, list(argv[1:]), "parity"
    while isinstance(cmd, click.Group):
        assert args and args[0] in cmd.commands, f"`{name}` has no command {args[:1]}; it has {sorted(cmd.commands)}"
        name += " " + args[0]
        cmd = cmd.commands[args.pop(0)]
    return cmd, args, name


def check_parses(c: Command) -> None:
    cmd, args, name = resolve(c.argv)
    options = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    seen, positional = set(), []
    it = iter(args)
    for tok in it:
        if not tok.startswith("-") or tok == "-":
            positional.append(tok)
            continue
        opt, eq, value = tok.partition("=")
        assert opt in options, f"`{name}` has no option {opt}"
        p = options[opt]
        seen.add(p.name)
        if p.is_flag or p.count:
            continue
        if not eq:
            value = next(it, None)
            assert value is not None, f"{opt} needs a value"
        if isinstance(p.type, click.Choice):
            assert value in p.type.choices, f"{opt} {value!r} is not one of {list(p.type.choices)}"
    missing = [p.opts[-1] for p in cmd.params if isinstance(p, click.Option) and p.required and p.name not in seen]
    assert not missing, f"`{name}` requires {missing}"
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    if not any(p.nargs == -1 for p in arguments):
        assert len(positional) <= sum(p.nargs for p in arguments), f"too many arguments for `{name}`: {positional}"
    need = sum(p.nargs if p.nargs > 0 else 1 for p in arguments if p.required)
    assert len(positional) >= need, f"`{name}` takes {need} argument(s), got {positional}"


def test_the_docs_have_commands_of_both_kinds():
    """The extraction works: the README's quick start alone has commands that run and commands only checked."""
    readme = [c for c in PARITY_LINES if c.doc == "README.md"]
    assert sum(c.runs for c in readme) >= 5 and sum(not c.runs for c in readme) >= 5, readme
    assert {Path(d).name for d in {c.doc for c in ALL}} >= {"README.md", "cli.md", "compare.md", "formats.md"}


@pytest.mark.parametrize("c", PARITY_LINES, ids=str)
def test_command_names_real_commands_and_options(c):
    check_parses(c)


def test_a_wrong_option_is_caught():
    """The checker itself: the mistakes the docs could make are refused."""
    bad = [
        ("compare", "CKPT", "--a", "torch", "--b", "jax", "--layerwise"),
        ("convert", "SRC", "-o", "X", "--to", "gguf"),
        ("capture", "CKPT", "--inputs", "IN"),
        ("inspect", "A", "B"),
        ("golden", "verify", "B"),
    ]
    for argv in bad:
        with pytest.raises(AssertionError):
            check_parses(Command("x", 0, " ".join(argv), ("parity", *argv), 0, False))


@pytest.mark.parametrize("doc", sorted({c.doc for c in ALL if c.runs}))
def test_commands_on_the_shipped_files_run(doc, tmp_path):
    """Every command of `doc` that uses golden/ runs as written, in order, beside a copy of golden/."""
    shutil.copytree(ROOT / "golden", tmp_path / "golden")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    for c in (c for c in ALL if c.doc == doc and c.runs):
        exe = PARITY if c.argv[0] == "parity" else [c.argv[0]]
        p = subprocess.run([*exe, *c.argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == c.exit, (
            f"{c}\nexit {p.returncode}, expected {c.exit}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
        )


LINK = re.compile(r"\]\(([^)\s]+)\)")
OTHER_BRANCHES = {"docs/architecture.md", "docs/assets.md"}  # written by other branches; checked once they exist


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_between_the_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file of the tree, and its #anchor a heading there."""
    bad = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if rel not in OTHER_BRANCHES:
                    bad.append(f"{doc.name}: {target} (no such file)")
            elif anchor and anchor not in anchors(dest):
                bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad, bad
    assert (ROOT / "docs/img/compare-report.png").stat().st_size < 200_000  # docs/make_figures.py keeps it small
    assert slug("`parity compare --generate N`: do the two sides *say* the same thing?") == (
        "parity-compare---generate-n-do-the-two-sides-say-the-same-thing"
    )


def leaves(cmd: click.Command, name: str = "parity"):
    if isinstance(cmd, click.Group):
        for sub, c in cmd.commands.items():
            yield from leaves(c, f"{name} {sub}")
    else:
        yield name, cmd


SAME_OPTIONS_AS = {"parity generate": "parity capture"}  # generate's section says "Same model options as `capture`"


def sections(text: str) -> dict[str, str]:
    """Each `## ...` section of a page by its heading line."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cli_md_documents_every_command_and_option():
    """Each command of parity.cli.main has a section of docs/cli.md naming every option it takes (`parity assets`:
    docs/assets.md, written with that command)."""
    missing = []
    for name, cmd in leaves(main):
        doc = ROOT / "docs" / ("assets.md" if name.startswith("parity assets") else "cli.md")
        if not doc.exists():
            missing.append(f"no {doc.name} for {name}")
            continue
        page = sections(doc.read_text())
        texts = [t for h, t in page.items() for n in (name, SAME_OPTIONS_AS.get(name)) if n and f"`{n}`" in h]
        if not texts and doc.name == "assets.md":
            texts = [doc.read_text()]
        if not texts:
            missing.append(f"{doc.name}: no section for {name}")
            continue
        for p in cmd.params:
            if isinstance(p, click.Option) and "--help" not in p.opts:
                longest = max((*p.opts, *p.secondary_opts), key=len)
                if not any(re.search(rf"(`|\s){re.escape(longest)}\b", t) for t in texts):
                    missing.append(f"{doc.name}: {name} {longest}")
    assert not missing, missing
