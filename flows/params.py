"""Flow parameters described once: a parameter that sets a field of a settings model (``QuantSettings``,
``CrossbarSpec``) takes its description, bounds and choices from that field (:func:`setting`, :func:`choice`);
a flow's UI form and ``prefect deployment run`` help take their text from the docstring's ``Args:`` section, so
:func:`documented` writes that section from each parameter's ``Field``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from maptools.settings import field_bounds, field_choices

__all__ = ["documented", "setting", "choice"]

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


def setting(model: type[BaseModel], name: str, more: str = "") -> Any:
    """The ``Field`` of a flow parameter that sets ``model``'s field ``name``: its description (plus ``more``)
    and bounds."""
    return Field(description=f"{model.model_fields[name].description}{more}", **field_bounds(model, name))


def choice(model: type[BaseModel], name: str) -> Any:
    """The ``Literal`` of the values ``model``'s enum or ``Literal`` field ``name`` takes (a form's drop-down)."""
    return Literal[field_choices(model, name)]
