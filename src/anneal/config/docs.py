"""Each config field's description, read from the comment beside (or above) it in the dataclass source.

The comments stay the single place a field is explained; ``--help`` prints them.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from dataclasses import fields


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}``: the comment on the field's line, else the comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokens if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    names = {f.name for f in fields(cls)}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            docs[node.target.id] = comments.get(node.end_lineno) or _above(node.lineno, lines, comments)
    return docs


def _above(lineno: int, lines: list[str], comments: dict[int, str]) -> str:
    """The comment-only lines right above line ``lineno`` (1-based), joined."""
    block, i = [], lineno - 1
    while i >= 1 and lines[i - 1].strip().startswith("#"):
        block.insert(0, comments.get(i, ""))
        i -= 1
    return " ".join(block)


def summary(cls: type) -> str:
    """The first line of the class docstring, or '' (a dataclass without one gets its signature)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc).split("\n", 1)[0]
