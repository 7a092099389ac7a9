"""Janssen-format scripts: recognised, then adapted source-to-source before the restricted compile.

Runs inside a worker process (``policy.load``).  A file is a Janssen script when a line of its
own, at column 0, starts ``class ModifySsaResponse`` (found by tokenizing, so a string or a
comment never counts).  Our policy refuses every class, so no file that loads as a plain script
today has one: a plain script is never adapted.  The adaptation only moves text within lines
(line numbers stay the user's) and never adds a name a script could not write itself:

- ``class ModifySsaResponse(...):`` becomes ``if True:``, so its methods are module functions
  (called with an instance namespace as ``self``, ``janssen_objects.JanssenSelf``): no class
  object, no ``__build_class__``; a dunder method other than ``__init__`` is refused.
- Python 2 ``print`` statements become ``print(...)`` calls (``print "a", b``, a trailing comma:
  ``end=" "``, a bare ``print``); ``print >>f`` is refused.
- ``import``/``from ... import`` of a Java or Janssen package (``io.``, ``java.``, ``javax.``,
  ``org.``, ``com.``, ``net.``, ``jakarta.``) becomes ``pass``; the names it bound are inert
  names (``janssen_objects.Inert``) in that script's builtins.  No import ever happens; any
  other import is left alone and refused as in every script.
"""

from __future__ import annotations

import io
import token
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ScriptRefused

CLASS_NAME = "ModifySsaResponse"
JAVA_ROOTS = frozenset({"io", "java", "javax", "org", "com", "net", "jakarta"})
_COMPOUND = frozenset({"if", "elif", "else", "for", "while", "try", "except", "finally", "with", "def"})
_SKIP = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)


@dataclass
class Adapted:
    """A Janssen file as our compiler takes it: the source, the class's methods, the inert names."""

    source: str
    methods: frozenset[str]
    inert: dict[str, str] = field(default_factory=dict)  # bound name -> the dotted Java name


def adapt(name: str, source: str) -> Adapted | None:
    """The adapted source of a Janssen-format file, or None for any other file (compiled as is).
    ScriptRefused for a Janssen file with a construct that cannot be adapted (naming its line)."""
    if CLASS_NAME not in source:
        return None  # the common case: no tokenizing at all
    lines = _logical_lines(source)
    if lines is None or not any(_is_class_line(line) for line in lines):
        return None  # it does not tokenize (our compiler reports where), or has no such class
    edits: list[tuple[int, int, int, int, str]] = []  # (row, col, end row, end col, new text)
    methods: set[str] = set()
    inert: dict[str, str] = {}
    in_class = False
    for line in lines:
        first = line.tokens[0]
        if line.depth == 0:
            in_class = False
        if _is_class_line(line):
            if in_class or methods:
                raise ScriptRefused(f"{name}: line {first.start[0]}: a second class {CLASS_NAME}")
            _check_class_header(name, line)
            colon = _header_colon(line)
            edits.append((*first.start, *colon.end, "if True:"))
            in_class = True
            continue
        if in_class and line.depth == 1 and first.string == "def" and len(line.tokens) > 1:
            method = line.tokens[1].string
            if method.startswith("__") and method != "__init__":
                raise ScriptRefused(f"{name}: line {first.start[0]}: {CLASS_NAME} may define no {method} "
                                    "(only __init__ and plain methods)")
            methods.add(method)
        for statement in _statements(line):
            _adapt_statement(name, statement, edits, inert)
    if not in_class and not methods and not edits:
        return None
    return Adapted(_apply(source, edits), frozenset(methods), inert)


@dataclass
class _Line:
    tokens: list[tokenize.TokenInfo]  # significant tokens, NEWLINE last
    depth: int  # indentation level


def _logical_lines(source: str) -> list[_Line] | None:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    lines: list[_Line] = []
    current: list[tokenize.TokenInfo] = []
    depth = 0
    for tok in tokens:
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        if tok.type in _SKIP or tok.type == tokenize.ENDMARKER:
            continue
        if tok.type == tokenize.ERRORTOKEN and not tok.string.strip():
            continue
        current.append(tok)
        if tok.type == tokenize.NEWLINE:
            lines.append(_Line(current, depth))
            current = []
    if current:
        lines.append(_Line(current, depth))
    return lines


def _is_class_line(line: _Line) -> bool:
    t = line.tokens
    return (line.depth == 0 and len(t) > 1 and t[0].string == "class" and t[0].start[1] == 0
            and t[1].string == CLASS_NAME)


def _check_class_header(name: str, line: _Line) -> None:
    """``class ModifySsaResponse:`` or ``(Base)`` with plain (dotted) names, its body below."""
    t = line.tokens
    rest = [x.string for x in t[2:-1]]
    if rest == [":"]:
        return
    if rest[:1] == ["("] and rest[-2:] == [")", ":"] and all(
            x in (",", ".") or x.isidentifier() for x in rest[1:-2]):
        return
    raise ScriptRefused(f"{name}: line {t[0].start[0]}: class {CLASS_NAME} may only name its base classes "
                        "(no keywords, no body on the same line)")


def _header_colon(line: _Line) -> tokenize.TokenInfo:
    return line.tokens[-2]


def _statements(line: _Line) -> list[list[tokenize.TokenInfo]]:
    """The simple statements of a logical line: split at ``;`` and after a compound header's ``:``
    (``if x: print "y"``), at bracket depth 0."""
    out: list[list[tokenize.TokenInfo]] = []
    current: list[tokenize.TokenInfo] = []
    depth = 0
    compound = line.tokens[0].string in _COMPOUND
    for tok in line.tokens:
        if tok.type == tokenize.NEWLINE:
            break
        if tok.type == token.OP and tok.string in "([{":
            depth += 1
        elif tok.type == token.OP and tok.string in ")]}":
            depth -= 1
        if depth == 0 and tok.type == token.OP and (tok.string == ";" or (tok.string == ":" and compound)):
            if tok.string == ":":
                compound = False  # the rest is the header's simple statement
            if current:
                out.append(current)
            current = []
            continue
        current.append(tok)
    if current:
        out.append(current)
    return out


def _adapt_statement(name: str, stmt: list[tokenize.TokenInfo], edits: list[tuple[int, int, int, int, str]],
                     inert: dict[str, str]) -> None:
    head = stmt[0]
    if head.type != token.NAME:
        return
    if head.string == "print":
        _print_statement(name, stmt, edits)
    elif head.string in ("import", "from"):
        bound = _java_import(stmt)
        if bound is not None:
            inert.update(bound)
            edits.append((*head.start, *stmt[-1].end, "pass"))


def _print_statement(name: str, stmt: list[tokenize.TokenInfo],
                     edits: list[tuple[int, int, int, int, str]]) -> None:
    head = stmt[0]
    if len(stmt) == 1:  # a bare print: a newline
        edits.append((*head.end, *head.end, "()"))
        return
    nxt = stmt[1]
    if nxt.type == token.OP and nxt.string in ("=", ".", "+=", "-=", ":", ")", "]", "}"):
        return  # not a print statement (an assignment, an attribute)
    if nxt.type == token.OP and nxt.string == ">>":
        raise ScriptRefused(f"{name}: line {head.start[0]}: print >>file is not supported; print or "
                            "context.log(...) instead")
    if nxt.type == token.OP and nxt.string == "(" and _closing(stmt, 1) == len(stmt) - 1:
        return  # already a call: print("...")
    last = stmt[-1]
    if last.type == token.OP and last.string == "," and _closing(stmt, 0) is None:
        edits.append((*head.end, *head.end, "("))
        edits.append((*last.start, *last.end, ', end=" ")'))
    else:
        edits.append((*head.end, *head.end, "("))
        edits.append((*last.end, *last.end, ")"))


def _closing(stmt: list[tokenize.TokenInfo], start: int) -> int | None:
    """The index of the bracket closing the one at ``start`` (None if ``start`` opens none)."""
    if stmt[start].string != "(":
        return None
    depth = 0
    for i in range(start, len(stmt)):
        s = stmt[i].string
        if stmt[i].type == token.OP and s in "([{":
            depth += 1
        elif stmt[i].type == token.OP and s in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _java_import(stmt: list[tokenize.TokenInfo]) -> dict[str, str] | None:
    """The names an import of Java packages binds (name -> dotted path); None for any other import."""
    words = [t.string for t in stmt]
    if words[0] == "from":
        if "import" not in words:
            return None
        at = words.index("import")
        module = "".join(words[1:at])
        if module.split(".")[0] not in JAVA_ROOTS:
            return None
        names = [w for w in words[at + 1:] if w not in ("(", ")")]
        if "*" in names:
            return None  # left alone: refused (no star import of Java names)
        return _bound(names, lambda n: f"{module}.{n}", lambda n: n)
    items = words[1:]
    paths = "".join(items).split(",")
    if not all(p.split(".")[0] in JAVA_ROOTS for p in paths if p):
        return None
    return _bound(items, lambda n: n, lambda n: n.split(".")[0])


def _bound(words: list[str], path_of: Callable[[str], str],
           plain_name: Callable[[str], str]) -> dict[str, str] | None:
    """``a``, ``a.b``, ``a as b`` items separated by commas -> bound name -> path."""
    out: dict[str, str] = {}
    item: list[str] = []
    for w in [*words, ","]:
        if w != ",":
            item.append(w)
            continue
        if not item:
            continue
        if "as" in item[1:]:
            at = item.index("as", 1)
            dotted, alias = "".join(item[:at]), "".join(item[at + 1:])
            out[alias] = path_of(dotted)
        else:
            bound = plain_name("".join(item))
            out[bound] = path_of(bound)
        item = []
    if not all(n.isidentifier() for n in out):
        return None
    return out


def _apply(source: str, edits: list[tuple[int, int, int, int, str]]) -> str:
    """The source with each (row, col)-(end row, end col) range replaced; rows end where they did."""
    lines = source.splitlines(keepends=True)
    for row, col, end_row, end_col, text in sorted(edits, reverse=True):
        if row == end_row:
            line = lines[row - 1]
            lines[row - 1] = line[:col] + text + line[end_col:]
            continue
        first, last = lines[row - 1], lines[end_row - 1]
        lines[row - 1] = first[:col] + text + "\n"
        for r in range(row, end_row - 1):
            lines[r] = "\n"
        lines[end_row - 1] = " " * end_col + last[end_col:]
    return "".join(lines)
