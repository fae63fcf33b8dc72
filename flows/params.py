"""Flow parameters described once: a flow's UI form and ``prefect deployment run`` help take their text from the
docstring's ``Args:`` section, so :func:`documented` writes that section from each parameter's ``Field``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic.fields import FieldInfo

__all__ = ["documented"]

F = TypeVar("F", bound=Callable[..., Any])


def documented(fn: F) -> F:
    """Append an ``Args:`` section to ``fn``'s docstring with the description of every parameter annotated
    ``Annotated[..., Field(description=...)]`` (Prefect shows docstring descriptions, not Field ones)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = []
    for name in inspect.signature(fn).parameters:
        described = [m.description for m in getattr(hints.get(name), "__metadata__", ())
                     if isinstance(m, FieldInfo) and m.description]
        if described:  # with its type, which griffe (Prefect's docstring parser) otherwise warns is missing
            kind = inspect.formatannotation(typing.get_args(hints[name])[0]).replace("typing.", "")
            lines.append(f"    {name} ({kind}): {described[-1]}")
    if lines:
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn
