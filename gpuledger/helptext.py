"""Command help as written: no markup, examples and config snippets keep their lines.

The CLI runs typer without rich markup (`rich_markup_mode=None`): a help text such as
`TOML config file ([agent] section)` or a pricing example `[[instance]]` would otherwise be read
as markup and vanish. Plain click rewraps every paragraph, so `keep_layout` marks each paragraph
after the first with click's no-rewrap marker (a line holding only `\\b`).
"""

from __future__ import annotations

import inspect

NO_REWRAP = "\b"


def keep_layout(doc: str | None) -> str | None:
    """The docstring with every paragraph after the first protected from rewrapping."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = [paragraphs[0]]
    for p in paragraphs[1:]:
        out.append(p if p.startswith(NO_REWRAP) or "\n" not in p.strip("\n") and not p.startswith(" ")
                   else f"{NO_REWRAP}\n{p}")
    return "\n\n".join(out)


def command(app, fn, name: str | None = None):
    """Register `fn` on a typer app with its docstring laid out as written."""
    return app.command(name, help=keep_layout(fn.__doc__))(fn)
