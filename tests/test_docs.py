"""README.md and docs/*.md against the code, and the repository against history wording.

Every fenced ```bash block of README.md and docs/*.md is read as shell, one simple command at a time
(backslash continuations joined, split on ``&&``, ``||``, ``;`` and ``|``), and checked without running it:

* a repository path it runs or reads (``scripts/...``, ``examples/...``, ``grnn_fairseq/...``, ``docs/...``,
  ``tests/...``) exists; a path after an output flag (``--json docs/x.json``) is what the command writes, and
  ``data/`` and ``checkpoints/`` paths are what the data and training scripts write, so neither is checked;
* ``python -m MODULE`` names an importable module, and ``python scripts/X.py`` a script that exists;
* every ``--flag`` given to a project script or module is one its argparse parser accepts: the parser is taken
  from the script's own ``main`` at its ``parse_args`` call, so nothing after that call runs;
* every ``--flag`` of a fairseq command-line tool (fairseq-train, -generate, -interactive, -eval-lm,
  -preprocess, -score) is known to fairseq's parser for that command's ``--arch``, ``--task``, criterion,
  optimizer, tokenizer and BPE, built in this process as fairseq builds it, with this plugin imported;
  ``scripts/train-distributed.sh NPROC DATA FLAGS`` passes FLAGS to fairseq-train and is checked the same way,
  as are the flags after ``--`` of a project script;
* ``VAR=value bash script.sh`` sets a variable that the script reads (itself, ``scripts/lib.sh`` when it
  sources it, or a script it runs), and ``VAR=value python ...`` one that the code or a standard library reads.

```python blocks are checked for their imports (``from M import name``: M imports and has ``name``), and every
relative Markdown link must point to a file that exists.

The second half searches README.md, docs/*.md and every .py, .sh and .c file for wording that tells the
history of the work instead of what is true now; it fails with FILE:LINE for each hit.
"""

import argparse
import contextlib
import fnmatch
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from functools import lru_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "grnn_fairseq")


def doc_files():
    docs = os.path.join(ROOT, "docs")
    names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md"] + [f"docs/{n}" for n in names]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(rel, lang):
    """(first line number, text) of every ```lang block of a Markdown file."""
    blocks, block = [], None  # block: [fence, language, first line, lines] while inside one
    for i, line in enumerate(read(rel).splitlines(), 1):
        stripped = line.strip()
        if block is None:
            m = re.match(r"^(`{3,})\s*([\w+-]*)\s*$", stripped)
            if m:
                block = [m.group(1), m.group(2), i + 1, []]
        elif stripped == block[0]:
            if block[1] == lang:
                blocks.append((block[2], "\n".join(block[3])))
            block = None
        else:
            block[3].append(line)
    return blocks


# --- shell commands ------------------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|", "&"}
# commands that are no part of this project and need no check
SHELL_TOOLS = {
    ".", "source", "cd", "export", "pip", "pip3", "echo", "cat", "ls", "head", "tail", "grep", "sed", "tee",
    "wc", "diff", "mkdir", "git", "npm", "apt-get", "time", "deactivate", "nvidia-smi", "sacrebleu",
}
FAIRSEQ_TOOLS = {
    "fairseq-train", "fairseq-generate", "fairseq-interactive", "fairseq-eval-lm", "fairseq-preprocess",
    "fairseq-score",
}
# flags whose value is a file or folder the command writes
OUTPUT_FLAGS = {
    "--json", "--png", "--out", "--save-dir", "--destdir", "--tensorboard-logdir", "--results-path",
}
REPO_PATH = re.compile(r"^(?:\./)?(scripts|examples|grnn_fairseq|docs|tests)(?:/|$)")
# environment variables that Python, torch or the C library read
STANDARD_ENV = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED", "PYTHONPATH"}


def shell_commands():
    """(where, env, argv) of every simple command in the bash blocks of README.md and docs/*.md."""
    found = []
    for rel in doc_files():
        for start, text in fenced_blocks(rel, "bash"):
            lines = text.split("\n")
            i = 0
            while i < len(lines):
                first, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, "#"
                tokens = list(lexer)
                where = f"{rel}:{start + first}"
                command = []
                for tok in tokens + [";"]:
                    if tok in SEPARATORS:
                        if command:
                            found.append((where, *split_env(drop_redirections(command))))
                        command = []
                    else:
                        command.append(tok)
    return found


def drop_redirections(tokens):
    out, skip = [], False
    for tok in tokens:
        if skip:
            skip = False
        elif set(tok) <= set("<>&") and tok:
            skip = True
            if out and out[-1].isdigit():  # 2>&1: the descriptor belongs to the redirection
                out.pop()
        else:
            out.append(tok)
    return out


def split_env(tokens):
    env = {}
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        name, value = tokens[0].split("=", 1)
        env[name] = value
        tokens = tokens[1:]
    return env, tokens


def flags_of(args):
    """The --flags (and -f short flags) among args, without any =value."""
    return [a.split("=", 1)[0] for a in args if re.match(r"^--?[A-Za-z]", a)]


def repo_paths(args):
    """Repository paths among args that the command runs or reads (not those after an output flag)."""
    paths, after_output = [], False
    for a in args:
        if after_output:
            after_output = False
            continue
        if a in OUTPUT_FLAGS:
            after_output = True
            continue
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if REPO_PATH.match(value) and not re.search(r"[*?{}$]", value):
            paths.append(value)
    return paths


class _Parser(Exception):
    """Raised from a patched ArgumentParser.parse_args: carries the parser a script built."""


@lru_cache(maxsize=None)
def script_parser(target):
    """The argparse parser that a script's or module's main() builds, or None when it builds none.

    target: "scripts/x.py" or a module name. main() runs only up to its parse_args call, which raises.
    """
    if target.endswith(".py"):
        path = os.path.join(ROOT, target)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if "ArgumentParser" not in source:
            return None
        sys.path.insert(0, os.path.dirname(path))  # scripts import their siblings
        try:
            spec = importlib.util.spec_from_file_location("_docs_" + re.sub(r"\W", "_", target), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        module = importlib.import_module(target)
        with open(module.__file__, encoding="utf-8") as f:
            if "ArgumentParser" not in f.read():
                return None

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        module.main([])
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{target}: main() returned without calling parse_args")


def accepted_options(parser, args):
    """Option strings of parser, plus those of the subcommand named among args."""
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in args:
                    options.update(accepted_options(sub, args))
    return options


@lru_cache(maxsize=None)
def _plugin_imported():
    from fairseq import utils

    utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))
    return True


def fairseq_unknown_flags(tool, args):
    """Flags of args that fairseq's parser for tool does not know (with this plugin imported)."""
    _plugin_imported()
    from fairseq import options

    args = [USER_DIR if prev == "--user-dir" else a for prev, a in zip([None] + args[:-1], args)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            if tool == "fairseq-preprocess":
                _, extra = options.get_preprocessing_parser().parse_known_args(args)
            elif tool == "fairseq-score":
                from fairseq_cli import score

                _, extra = score.get_parser().parse_known_args(args)
            else:
                parser = {
                    "fairseq-train": options.get_training_parser,
                    "fairseq-generate": options.get_generation_parser,
                    "fairseq-interactive": options.get_interactive_generation_parser,
                    "fairseq-eval-lm": options.get_eval_lm_parser,
                }[tool]()
                _, extra = options.parse_args_and_arch(parser, input_args=args, parse_known=True)
        except SystemExit:
            return [f"(argparse error: {err.getvalue().strip().splitlines()[-1]})"]
        except RuntimeError:  # parse_args_and_arch with no --arch, or one that is not registered
            return ["(no --arch, or an --arch that is not registered)"]
    return [a for a in extra if re.match(r"^--?[A-Za-z]", a)]


# variables whose value the example and training scripts pass on to fairseq-train
FLAG_VARIABLES = {"EXTRA", "MODEL_FLAGS", "OPTIMIZER_FLAGS"}


def unknown_training_flags(flags):
    """Flags that fairseq-train knows neither for group_lstm_lm (language_modeling) nor for group_rnnsearch."""
    unknown = None
    for task, arch in (("language_modeling", "group_lstm_lm"), ("translation", "group_rnnsearch")):
        args = ["/dev/null", "--user-dir", USER_DIR, "--task", task, "--arch", arch, *flags]
        found = set(fairseq_unknown_flags("fairseq-train", args))
        unknown = found if unknown is None else unknown & found
    return sorted(unknown)


def scripts_read_by(rel, seen=None):
    """Text of a shell script, of scripts/lib.sh if it sources it, and of the scripts it runs."""
    seen = set() if seen is None else seen
    if rel in seen or not os.path.exists(os.path.join(ROOT, rel)):
        return ""
    seen.add(rel)
    text = read(rel)
    more = ["scripts/lib.sh"] if re.search(r"(source|\.)\s+\S*lib\.sh", text) else []
    more += re.findall(r"\bbash\s+\"?(?:\$\S*/)?((?:scripts|examples)/[\w.-]+\.sh)", text)
    more += ["scripts/" + m for m in re.findall(r"\$GRNN_SCRIPTS/([\w.-]+\.sh)", text)]
    return text + "".join("\n" + scripts_read_by(m, seen) for m in more)


@lru_cache(maxsize=None)
def python_sources():
    """The text of every .py file of grnn_fairseq/ and scripts/ (where os.environ["..."] reads a variable)."""
    texts = []
    for folder in ("grnn_fairseq", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            texts += [read(os.path.relpath(os.path.join(dirpath, f), ROOT)) for f in files if f.endswith(".py")]
    return "\n".join(texts)


def check_command(env, argv):
    """Problems with one simple command, as strings (empty: it is fine)."""
    if not argv:
        return []
    problems = []
    exe, args = argv[0], argv[1:]
    problems += [f"{p} does not exist" for p in repo_paths(argv) if not os.path.exists(os.path.join(ROOT, p))]

    if exe in ("bash", "sh"):
        script = args[0] if args else ""
        if not REPO_PATH.match(script):
            return problems + [f"runs {script!r}, not a script of this repository"]
        lines = scripts_read_by(script.removeprefix("./")).split("\n")
        code = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        for var in env:  # $VAR, ${VAR:-default}, or a name handed to a function (obtain_archive IWSLT14_ARCHIVE)
            if not re.search(r"\b" + var + r"\b", code):
                problems.append(f"{script} does not read {var}")
        for var in FLAG_VARIABLES & set(env):
            problems += [f"{var}: fairseq-train: unknown {f}" for f in unknown_training_flags(shlex.split(env[var]))]
        if script.endswith("train-distributed.sh") and flags_of(args[3:]):
            problems += [f"fairseq-train: unknown {f}" for f in fairseq_unknown_flags("fairseq-train", args[2:])]
        return problems

    for var in env:
        if var not in STANDARD_ENV and f'"{var}"' not in python_sources():
            problems.append(f"{var} is read neither by this project's Python code nor by torch")

    if exe in ("python", "python3"):
        if args[:1] == ["-m"] and len(args) > 1:
            module, rest = args[1], args[2:]
            if importlib.util.find_spec(module) is None:
                return problems + [f"no module {module}"]
            if module.split(".")[0] == "grnn_fairseq":
                problems += check_script_flags(module, rest)
        elif args and args[0].endswith(".py"):
            if REPO_PATH.match(args[0]) and os.path.exists(os.path.join(ROOT, args[0])):
                problems += check_script_flags(args[0], args[1:])
        elif args[:1] != ["-c"]:
            problems.append("python without -m, -c or a script")
    elif exe in FAIRSEQ_TOOLS:
        problems += [f"{exe}: unknown {f}" for f in fairseq_unknown_flags(exe, args)]
    elif exe == "pip" or exe == "pip3":
        for extra in re.findall(r"^\.\[([\w,-]+)\]$", " ".join(a for a in args if a.startswith(".["))):
            for name in extra.split(","):
                if not re.search(r"[\"']" + re.escape(name) + r"[\"']\s*:", read("setup.py")):
                    problems.append(f"setup.py has no extra {name!r}")
    elif REPO_PATH.match(exe):
        pass  # a script run directly: its path was checked above
    elif exe not in SHELL_TOOLS:
        problems.append(f"unknown command {exe!r} (a system tool? add it to SHELL_TOOLS)")
    return problems


def check_script_flags(target, args):
    problems = []
    if "--" in args:  # after it, flags the script hands to fairseq-train (scripts/profile_model.py)
        cut = args.index("--")
        args, passed = args[:cut], args[cut + 1 :]
        problems += [f"{target} -- fairseq-train: unknown {f}" for f in unknown_training_flags(passed)]
    return problems + _own_flag_problems(target, args)


def _own_flag_problems(target, args):
    parser = script_parser(target)
    flags = flags_of(args)
    if parser is None:
        return [f"{target} takes no flags, given {flags}"] if flags else []
    known = accepted_options(parser, args)
    return [f"{target}: unknown {f}" for f in flags if f not in known]


COMMANDS = shell_commands()


def test_docs_have_commands():
    assert len(COMMANDS) > 20, COMMANDS  # the extraction itself works


@pytest.mark.parametrize("where,env,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_names_what_exists(where, env, argv):
    problems = check_command(env, argv)
    command = shlex.join([f"{k}={v}" for k, v in env.items()] + argv)
    assert not problems, f"{where}: {command}\n  " + "\n  ".join(problems)


def test_python_blocks_import_what_exists():
    problems = []
    for rel in doc_files():
        for start, text in fenced_blocks(rel, "python"):
            for offset, line in enumerate(text.split("\n")):
                m = re.match(r"^from ([\w.]+) import ([\w, ]+)$", line.strip()) if not line[:1].isspace() else None
                if not m:
                    continue
                try:
                    module = importlib.import_module(m.group(1))
                except ImportError as e:
                    problems.append(f"{rel}:{start + offset}: {e}")
                    continue
                for name in (n.strip() for n in m.group(2).split(",")):
                    if not hasattr(module, name):
                        problems.append(f"{rel}:{start + offset}: {m.group(1)} has no {name}")
    assert not problems, "\n".join(problems)


def anchors(rel):
    """GitHub's anchors of a Markdown file's headings: lowercase, punctuation dropped, spaces to hyphens."""
    seen, out = {}, set()
    text = re.sub(r"^```.*?^```", "", read(rel), flags=re.S | re.M)  # no headings inside code blocks
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading of it after #."""
    problems = []
    for rel in doc_files():
        for i, line in enumerate(read(rel).splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", target):
                    continue
                name, _, anchor = target.partition("#")
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), name)) if name else os.path.join(ROOT, rel)
                if not os.path.exists(path):
                    problems.append(f"{rel}:{i}: {target}")
                elif anchor and path.endswith(".md") and anchor not in anchors(os.path.relpath(path, ROOT)):
                    problems.append(f"{rel}:{i}: {target} (no heading #{anchor})")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    """README.md stays short and keeps what CI and a newcomer need: the two commands, the paper, the docs."""
    text = read("README.md")
    assert len(text.splitlines()) <= 250
    bash = "\n".join(t for _, t in fenced_blocks("README.md", "bash"))
    install = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && bash examples/brown-lm.sh'
    assert install in bash and ". .venv/bin/activate && python -m pytest -q tests" in bash  # .ci/run follows them
    assert "@inproceedings{" in text and "Efficient Sequence Learning with Group Recurrent Networks" in text
    for page in ("speed", "designs", "data", "reliability", "reproducing"):
        assert f"(docs/{page}.md)" in text, page


# --- history wording -----------------------------------------------------------------------------------------

HISTORY = re.compile(
    r"\bsessions?\b|\bprevious(ly)?\b|\bearlier\b|\blast time\b|\bused to\b|\bno longer\b|\(was\b|\bwas:"
    r"|\bgrew to\b|\bnow runs\b|\bbefore this\b|\boriginally\b|\bformerly\b|\bhad been\b|\bthis change\b"
    r"|\bany ?more\b",
    re.IGNORECASE,
)
# Words of that list with a meaning that is no history: exact phrases, or regular expressions (re.compile) for
# one code idiom; each is removed from a line before the search, so other words on that line still count.
ALLOWED = [
    ("tests/conftest.py", '@pytest.fixture(scope="session")'),  # pytest's fixture scope
    ("tests/conftest.py", "previous = backend.set_default("),  # a fixture restores the setting it replaced
    ("tests/conftest.py", "backend.set_default(previous)"),
    ("grnn_fairseq/modules/backend.py", "previous, _default = _default, backend"),
    ("grnn_fairseq/modules/backend.py", "return previous"),
    ("grnn_fairseq/modules/backend.py", "returns the previous one"),
    # the state of time step t-1
    ("grnn_fairseq/modules/group_lstm.py", "the previous hidden state"),
    ("grnn_fairseq/modules/group_lstm.py", "the previous cell state"),
]
SKIP_DIRS = {".git", ".venv", "venv", "data", "checkpoints", "build", "dist", "runs", "logs", "node_modules",
             "__pycache__", ".pytest_cache", "shared"}
THIS_FILE = "tests/test_docs.py"  # it spells the words out


def searched_files():
    files = doc_files()
    for dirpath, dirnames, names in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/")
            if name.endswith((".py", ".sh", ".c")) and rel != THIS_FILE:
                files.append(rel)
    return files


def history_hits():
    hits = []
    for rel in searched_files():
        allowed = [phrase for pattern, phrase in ALLOWED if fnmatch.fnmatch(rel, pattern)]
        for i, line in enumerate(read(rel).splitlines(), 1):
            searched = line
            for phrase in allowed:
                searched = phrase.sub("", searched) if isinstance(phrase, re.Pattern) else searched.replace(phrase, "")
            m = HISTORY.search(searched)
            if m:
                hits.append((rel, f"{rel}:{i}: {m.group(0)!r}: {line.strip()[:140]}"))
    return hits


def test_no_history_wording():
    """Code, comments and docs state what is true now; a measurement carries its machine and date instead."""
    hits = [h for _, h in history_hits()]
    assert not hits, "history wording (state what is true now; a figure beside its machine and date):\n" + "\n".join(
        hits
    )
