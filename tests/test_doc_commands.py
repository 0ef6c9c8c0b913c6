"""Every command in the ```bash blocks of README.md and docs/results.md still parses.

Each ``python -m experiments.<module> ...`` and ``python benchmarks/<script>.py ...`` line
of the documents (backslash continuations joined, comments dropped, the block's shell
variables substituted) runs in-process through the module's ``main(argv)`` up to the point
where the real work would start, which is stubbed out:

* ``experiments.*``: the whole command line is checked (argparse, the config built from
  ``--attack`` / ``--defenses`` / ``--set`` ..., the checks ``main`` makes before running);
  ``pipeline.run`` records its config (after the config checks ``pipeline.run`` itself
  makes first: one clean-set batch per defense, the data folder exists) and returns no
  cells, ``compare_defenses.official_cells`` and ``plot_comparison`` return nothing,
  ``compare_defenses.merge`` stops the command (it would read finished work directories),
  and ``reproduce_official`` gets a large clean-set limit instead of loading the data sets
  and no cells to run;
* ``benchmarks/*.py``: argparse only (their ``main`` loads models and data right after
  parsing), plus round_signals' ``--set``, checked as reproduce_official checks it.
  PyTorch, absent from the project's .venv, is replaced by a mock for torch_round.py.

The commands run in a temporary folder ``main/`` next to a stand-in ``shared/`` (an empty
``data/`` and a ``models.json`` naming the released models), so ``../shared/...`` in a
command never reaches the real data, and nothing is written into the repository.  No JAX
program is compiled and nothing is trained: the file takes a few seconds.

A documented command that fails here is documentation drift: fix the document (or the
command line).  Commands known to be wrong are listed in :data:`KNOWN_BROKEN`
(``xfail(strict=True)``, so fixing them is noticed too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import pathlib
import re
import shlex
import sys
import traceback
from typing import Optional
from unittest import mock

import pytest

from experiments import compare_defenses
from experiments import pipeline
from experiments import reproduce_official

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/results.md")
#: Fence languages whose blocks hold shell commands.
SHELL_LANGUAGES = ("bash", "sh", "shell")
#: ``python -m <module>`` commands of the setup lines, not checked.
SETUP_MODULES = ("venv", "pip", "pytest")

#: Documented commands (as :attr:`DocCommand.text` shows them) that do not parse now, with
#: the reason: each is an ``xfail(strict=True)`` until its document is fixed.
KNOWN_BROKEN: dict[str, str] = {}


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocCommand:
  """One documented command: ``where`` (``file:line`` of its first line), ``target``
  (``experiments.<module>`` or ``benchmarks/<script>.py``) and ``args`` (what its
  ``main(argv)`` gets)."""
  where: str
  target: str
  args: tuple[str, ...]

  @property
  def text(self) -> str:
    head = ["python", "-m", self.target] if self.target.startswith("experiments.") else \
        ["python", self.target]
    return shlex.join(head + list(self.args))


_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
_PYTHON = re.compile(r"(?:.*/)?python[\d.]*")


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
  """``(line number of the block's first line, its lines)`` of every fenced shell block."""
  blocks, fence, start, lines = [], None, 0, []
  for number, line in enumerate(text.splitlines(), 1):
    m = _FENCE.match(line)
    if fence is None:
      if m:
        fence = m.group(1)
        lines, start = ([] if m.group(2) in SHELL_LANGUAGES else None), number + 1
    elif m and m.group(1).startswith(fence[:3]) and not m.group(2) \
        and len(m.group(1)) >= len(fence):
      if lines is not None:
        blocks.append((start, lines))
      fence = None
    elif lines is not None:
      lines.append(line)
  return blocks


def _strip_comment(line: str) -> tuple[str, bool]:
  """``line`` without its shell comment (``#`` starting a word, outside quotes), and
  whether it had one."""
  quote, i = None, 0
  while i < len(line):
    ch = line[i]
    if ch == "\\" and quote != "'":
      i += 1  # the next character is escaped
    elif quote:
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i], True
    i += 1
  return line, False


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
  """The block's commands as ``(first line number, text)``: comments dropped, a line
  ending in a backslash joined with the next (both removed, as the shell does)."""
  out, current, first = [], None, None
  for number, raw in enumerate(lines, start):
    code, commented = _strip_comment(raw)
    if current is None:
      current, first = "", number
    if not commented and code.endswith("\\"):
      current += code[:-1]
      continue
    current += code
    if current.strip():
      out.append((first, current.strip()))
    current = None
  if current is not None and current.strip():
    out.append((first, current.strip()))
  return out


def _expand(text: str, variables: dict[str, str], where: str) -> str:
  """``text`` with ``$NAME`` / ``${NAME}`` replaced (not inside single quotes)."""
  pieces = re.split(r"('[^']*')", text)
  for i in range(0, len(pieces), 2):
    def value(m):
      name = m.group(1) or m.group(2)
      if name not in variables:
        raise ValueError(f"{where}: ${name} is not assigned earlier in its block")
      return variables[name]
    pieces[i] = _VARIABLE.sub(value, pieces[i])
  return "".join(pieces)


def _simple_commands(text: str) -> list[list[str]]:
  """The words of each simple command of a line (split at ``&&``, ``||``, ``;``, ``|``)."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = ""
  commands, words = [], []
  for token in lexer:
    if token and set(token) <= set(";&|"):
      commands.append(words)
      words = []
    else:
      words.append(token)
  return commands + [words]


def extract(text: str, name: str) -> tuple[list[DocCommand], list[str]]:
  """The checked commands of a markdown document, and the python commands of its shell
  blocks that are neither checked nor setup lines (``file:line: command``)."""
  commands, unknown = [], []
  for start, lines in shell_blocks(text):
    variables: dict[str, str] = {}
    for number, line in logical_lines(start, lines):
      where = f"{name}:{number}"
      for words in _simple_commands(_expand(line, variables, where)):
        assignments = 0
        while assignments < len(words) and _ASSIGNMENT.match(words[assignments]):
          assignments += 1
        if words and assignments == len(words):  # NAME=value lines: variables
          variables.update(w.split("=", 1) for w in words)
          continue
        words = words[assignments:]  # NAME=value before a command: its environment
        if not words or not _PYTHON.fullmatch(words[0]):
          continue  # not python: pip, activating a venv, a sweep's shell script
        rest = words[1:]
        if rest[:1] == ["-m"] and len(rest) > 1 and rest[1].startswith("experiments."):
          target, args = rest[1], rest[2:]
        elif rest and re.fullmatch(r"benchmarks/\w+\.py", rest[0]):
          target, args = rest[0], rest[1:]
        elif rest[:1] == ["-m"] and len(rest) > 1 and rest[1] in SETUP_MODULES:
          continue
        else:
          unknown.append(f"{where}: {shlex.join(words)}")
          continue
        taken = sum(c.where == where or c.where.startswith(where + "#") for c in commands)
        commands.append(DocCommand(where + (f"#{taken + 1}" if taken else ""), target,
                                   tuple(args)))
  return commands, unknown


def extract_file(name: str) -> tuple[list[DocCommand], list[str]]:
  return extract((ROOT / name).read_text(), name)


# --------------------------------------------------------------------------------------
# Checking one command
# --------------------------------------------------------------------------------------


class DocCommandError(AssertionError):
  """A documented command that its command line refuses."""


class _Parsed(Exception):
  """Raised by a stub where the command would start its real work."""


def _sandbox(tmp_path: pathlib.Path) -> pathlib.Path:
  """Makes the stand-in ``tmp_path/shared`` and returns the folder the commands run in,
  ``tmp_path/main`` (so ``../shared/...`` in a command resolves to the stand-in)."""
  (tmp_path / "shared" / "data").mkdir(parents=True, exist_ok=True)
  reference = tmp_path / "shared" / "reference" / "ibau_official"
  reference.mkdir(parents=True, exist_ok=True)
  models = {m: {"dataset": "cifar10" if m.startswith("badnets") else "gtsrb",
                "attack": "l0_inv" if "l0_inv" in m else "badnets", "target": 0}
            for m in reproduce_official.MODELS}
  (reference / "models.json").write_text(json.dumps(models))
  cwd = tmp_path / "main"
  cwd.mkdir(exist_ok=True)
  return cwd


def _stub_experiments(monkeypatch, calls: list) -> None:
  """Stops the experiments where they would load data, train, or read work directories."""

  def run(config, workdir, *, data_dir=None, model_dir=None, **kwargs):
    # What pipeline.run checks before it loads anything.
    config.check_clean_batches()
    if not config.synthetic and data_dir is not None and not pathlib.Path(data_dir).is_dir():
      raise ValueError(f"data directory {data_dir} does not exist")
    calls.append(("pipeline.run", config, str(workdir)))
    return []

  def official_cells(config, models, *args, **kwargs):
    calls.append(("official_cells", config, list(models)))
    return []

  def merge(workdirs, *args, **kwargs):
    calls.append(("merge", list(workdirs)))
    raise _Parsed

  def clean_size_limit(dataset, data_dir):
    calls.append(("clean_size_limit", dataset, data_dir))
    return 10**9

  def run_cells(parser, cells, configs, args, reference_dir, overrides, out):
    calls.append(("reproduce_official", list(cells), overrides))
    return []

  monkeypatch.setattr(pipeline, "run", run)
  monkeypatch.setattr(compare_defenses, "official_cells", official_cells)
  monkeypatch.setattr(compare_defenses, "plot_comparison", lambda *a, **k: [])
  monkeypatch.setattr(compare_defenses, "merge", merge)
  monkeypatch.setattr(reproduce_official, "_clean_size_limit", clean_size_limit)
  monkeypatch.setattr(reproduce_official, "_run_cells", run_cells)


def _round_signals_check(args: argparse.Namespace) -> None:
  """What round_signals does with its options after loading the model."""
  reproduce_official._config("default", reproduce_official._parse_overrides(args.set))
  for bound in args.bounds.split(","):
    float(bound)


#: Checks of a benchmark's parsed options, beyond argparse.
BENCHMARK_CHECKS = {"round_signals": _round_signals_check}
_SCRIPTS: dict[str, object] = {}


def _script(path: str, monkeypatch):
  """The benchmark script as a module (loaded once; PyTorch mocked if it is missing)."""
  if path not in _SCRIPTS:
    stem = pathlib.Path(path).stem
    if stem == "torch_round" and importlib.util.find_spec("torch") is None:
      for name in ("torch", "torch.nn", "torch.nn.functional"):
        monkeypatch.setitem(sys.modules, name, mock.MagicMock(name=name))
    spec = importlib.util.spec_from_file_location(f"_doc_commands_{stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _SCRIPTS[path] = module
  return _SCRIPTS[path]


def _stub_benchmark(path: str, monkeypatch, calls: list) -> None:
  original = argparse.ArgumentParser.parse_args
  check = BENCHMARK_CHECKS.get(pathlib.Path(path).stem)

  def parse_args(self, args=None, namespace=None):
    parsed = original(self, args, namespace)
    if check is not None:
      check(parsed)
    calls.append(("parse_args", parsed))
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def check_command(command: DocCommand, monkeypatch, tmp_path: pathlib.Path) -> list:
  """Runs ``command``'s ``main`` up to its real work (see the module docstring); returns
  what the stubs recorded.  Raises :class:`DocCommandError` with the command and the
  reason if its command line refuses it."""
  monkeypatch.chdir(_sandbox(tmp_path))
  monkeypatch.delenv("IBAU_DATA_DIR", raising=False)
  calls: list = []
  if command.target.startswith("experiments."):
    try:
      main = importlib.import_module(command.target).main
    except ImportError as e:
      raise DocCommandError(f"{command.where}: {command.text}\nno module: {e}") from None
    _stub_experiments(monkeypatch, calls)
  else:
    if not (ROOT / command.target).is_file():
      raise DocCommandError(f"{command.where}: {command.text}\nno file {command.target}")
    main = _script(command.target, monkeypatch).main
    _stub_benchmark(command.target, monkeypatch, calls)
  out, err = io.StringIO(), io.StringIO()
  problem: Optional[str] = None
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = main(list(command.args))
    except _Parsed:
      code = 0
    except SystemExit as e:
      code = e.code
    except Exception:  # pylint: disable=broad-except
      code, problem = 1, traceback.format_exc(limit=-3)
  if code not in (0, None) or problem is not None:
    detail = problem or (code if isinstance(code, str) else err.getvalue().strip()
                         or f"exit status {code}")
    raise DocCommandError(f"{command.where}: {command.text}\n{detail}")
  if not calls:
    raise DocCommandError(f"{command.where}: {command.text}\nstopped before its real work "
                          f"(exit status {code}): {err.getvalue().strip()}")
  return calls


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


COMMANDS = {name: extract_file(name) for name in DOCS}


def _params():
  for commands, _ in COMMANDS.values():
    for c in commands:
      marks = ([pytest.mark.xfail(strict=True, raises=DocCommandError,
                                  reason=KNOWN_BROKEN[c.text])]
               if c.text in KNOWN_BROKEN else [])
      yield pytest.param(c, id=c.where, marks=marks)


@pytest.mark.parametrize("command", list(_params()))
def test_documented_command_parses(command, monkeypatch, tmp_path):
  calls = check_command(command, monkeypatch, tmp_path)
  for call in calls:  # the sweeps would have run in the temporary folder
    if call[0] == "pipeline.run":
      assert tmp_path in (pathlib.Path.cwd() / call[2]).resolve().parents


@pytest.mark.parametrize("name", DOCS)
def test_the_documents_have_commands_and_no_unchecked_python_lines(name):
  commands, unknown = COMMANDS[name]
  assert commands, f"no command found in the shell blocks of {name}"
  assert not unknown, (f"python commands in {name} that this test neither checks nor "
                       f"skips as setup lines: {unknown}")
  for c in commands:
    print(f"{c.where}: {c.text}")


_SNIPPET = """\
Text, and a python block that is not shell:

```python
python -m experiments.cifar10 --not-a-shell-block
```

```bash
python3.11 -m venv .venv && . .venv/bin/activate && python -m experiments.gtsrb --preset smoke
D=ibau,ft   # the defenses
C="python -m experiments.compare_defenses --clean-sizes 100"
$C --attacks '' --defenses $D \\
    --official badnets_8_02  # trailing comment
# python -m experiments.cifar10 --commented-out
python -m experiments.compare_defenses --merge runs/a,\\
runs/b --out runs/all.md
XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/ibau_round.py --rounds 2
.venv-torch/bin/python benchmarks/torch_round.py --rounds 2
runs/sweep.sh   # a shell script: not checked
```
"""


def test_extraction_joins_lines_drops_comments_and_substitutes_variables():
  commands, unknown = extract(_SNIPPET, "doc.md")
  assert not unknown
  assert [(c.where, c.target, c.args) for c in commands] == [
      ("doc.md:8", "experiments.gtsrb", ("--preset", "smoke")),
      ("doc.md:11", "experiments.compare_defenses",
       ("--clean-sizes", "100", "--attacks", "", "--defenses", "ibau,ft", "--official",
        "badnets_8_02")),
      ("doc.md:14", "experiments.compare_defenses",
       ("--merge", "runs/a,runs/b", "--out", "runs/all.md")),
      ("doc.md:16", "benchmarks/ibau_round.py", ("--rounds", "2")),
      ("doc.md:17", "benchmarks/torch_round.py", ("--rounds", "2")),
  ]
  with pytest.raises(ValueError, match=r"doc.md:2: \$E is not assigned"):
    extract("```bash\npython -m experiments.cifar10 --defense $E\n```\n", "doc.md")
  _, unknown = extract("```bash\npython -m experiments_x.run\npython -c 1\n```\n", "doc.md")
  assert unknown == ["doc.md:2: python -m experiments_x.run", "doc.md:3: python -c 1"]


def test_the_snippet_commands_parse(monkeypatch, tmp_path):
  commands, _ = extract(_SNIPPET, "doc.md")
  for i, c in enumerate(commands):
    with monkeypatch.context() as m:
      calls = check_command(c, m, tmp_path / str(i))
    if c.target == "experiments.compare_defenses" and "--merge" in c.args:
      assert calls == [("merge", ["runs/a", "runs/b"])]
    elif c.target == "experiments.compare_defenses":
      assert [x[0] for x in calls] == ["official_cells"]
      assert calls[0][1].defenses == ("ibau", "ft", "none") and calls[0][1].clean_size == 100


@pytest.mark.parametrize("line,message", [
    pytest.param("python -m experiments.cifar10 --attack badnets --no-such-flag",
                 "unrecognized arguments: --no-such-flag", id="unknown-flag"),
    pytest.param("python -m experiments.cifar10 --set nosuchfield=1",
                 "unknown field 'nosuchfield'", id="unknown-set-field"),
    pytest.param("python -m experiments.gtsrb --set ibau.nosuchfield=1",
                 "unknown ibau fields", id="unknown-ibau-field"),
    pytest.param("python -m experiments.cifar10 --attack nope", "unknown attack",
                 id="unknown-attack"),
    pytest.param("python -m experiments.cifar10 --data-dir ../shared/nodata",
                 "does not exist", id="missing-data-dir"),
    pytest.param("python -m experiments.attack_table --attacks clean,sig "
                 "--set sig.nosuchfield=1", "nosuchfield", id="attack-table-attack-param"),
    pytest.param("python -m experiments.compare_defenses --attacks badnets --defenses magic",
                 "unknown defense", id="compare-unknown-defense"),
    pytest.param("python -m experiments.compare_defenses --attacks badnets --defenses tabor "
                 "--clean-sizes 500 --set tabor.batch_size=1000",
                 "smaller than one batch of tabor", id="compare-batch-too-large"),
    pytest.param("python -m experiments.compare_defenses --merge runs/a --clean-sizes 100",
                 "would be ignored", id="merge-with-sweep-flag"),
    pytest.param("python -m experiments.reproduce_official --data-dir ../shared/data "
                 "--reference-dir ../shared/reference/ibau_official --set nosuchfield=1",
                 "--set expects FIELD=VALUE", id="reproduce-unknown-set-field"),
    pytest.param("python -m experiments.reproduce_official --data-dir ../shared/data "
                 "--reference-dir ../shared/reference/ibau_official --configs paper",
                 "unknown config", id="reproduce-unknown-config"),
    pytest.param("python -m experiments.no_such_module --help", "no module",
                 id="unknown-module"),
    pytest.param("python benchmarks/ibau_round.py --no-such-flag", "unrecognized arguments",
                 id="benchmark-unknown-flag"),
    pytest.param("python benchmarks/round_signals.py --out x.json --set nosuchfield=1",
                 "--set expects FIELD=VALUE", id="benchmark-unknown-set-field"),
    pytest.param("python benchmarks/no_such_script.py", "no file", id="unknown-script"),
])
def test_a_broken_command_is_reported(line, message, monkeypatch, tmp_path):
  (command,), _ = extract(f"```bash\n{line}\n```\n", "broken.md")
  with pytest.raises(DocCommandError, match=re.escape(message)) as e:
    check_command(command, monkeypatch, tmp_path)
  assert "broken.md:2: " + command.text in str(e.value)
