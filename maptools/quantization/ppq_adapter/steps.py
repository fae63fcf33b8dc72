"""PPQ's steps run quietly, and its raw exceptions turned into QuantizationFailed naming the operator."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch

from maptools.errors import MaptoolsError, QuantizationFailed
from maptools.quantization.ppq_adapter.core import TargetPlatform

log = logging.getLogger(__name__)

@contextlib.contextmanager
def _quiet() -> Any:
    """Send PPQ's prints to the debug log instead of the user's terminal."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        text = (out.getvalue() + err.getvalue()).strip()
        if text:
            log.debug("ppq: %s", text)


@contextlib.contextmanager
def ppq_step(what: str) -> Any:
    """PPQ's and onnx's raw exceptions as QuantizationFailed naming the step and the device operator they
    arose at (CUDA faults pass unchanged, so callers can retry them)."""
    try:
        yield
    except (MaptoolsError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        if "cuda" in str(e).lower():
            raise
        op, cause = _blame(e), _root_cause(e)  # (PPQ wraps kernel faults in "Op Execution Error")
        at = f" at {op.name} ({op.type})" if op is not None else ""
        raise QuantizationFailed(f"PPQ failed while {what}{at}: {type(cause).__name__}: {str(cause).strip()[:400]}",
                                 "report this model to the maptools maintainers (the operator is named above).",
                                 operator=op.name if op is not None and op.platform != TargetPlatform.FP32 else None
                                 ) from e


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _root_cause(error: BaseException) -> BaseException:
    return _chain(error)[-1]


def _blame(error: BaseException) -> Any:
    """The PPQ operation an exception arose at: the innermost one a frame of its traceback (or of its
    causes') holds, as ``op``/``operation`` or as a hook's operation; None where no frame holds one."""
    from ppq.IR import Operation

    for exc in reversed(_chain(error)):  # the innermost cause first
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):  # the innermost frame first
            local = frame.f_locals
            hooked = getattr(local.get("self"), "_hook_to", None)
            for value in (local.get("op"), local.get("operation"), hooked, *local.values()):
                if isinstance(value, Operation):
                    return value
    return None
