"""How entry points report a user's mistake: one line naming the problem, the traceback only on request.

A wrong path, a typo in an option, a refused file are the user's to fix, and a 40-line traceback hides
the one line that says how. ``REDDINO_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
DEBUG_VARIABLES = ("REDDINO_DEBUG", "HYDRA_FULL_ERROR")
USER_ERROR_EXIT = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (files, options, weights, data), not a bug in reddino."""
    from omegaconf.errors import MissingMandatoryValue

    from reddino.data.io import BadImageError
    from reddino.data.sources.download import DatasetUnavailableError
    from reddino.run_specs import UntrustedConfigError
    from reddino.runtime.config_checks import ConfigError
    from reddino.weights import HubUnavailableError

    return (
        ConfigError,
        MissingMandatoryValue,
        UntrustedConfigError,
        BadImageError,
        DatasetUnavailableError,
        HubUnavailableError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ValueError,
    )


def debugging() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in DEBUG_VARIABLES)


def one_line_errors(prog: str) -> Callable[[F], F]:
    """Decorate an entry point: a user error prints ``<prog>: error: <message>`` and exits with 2."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except user_errors() as err:
                if debugging():
                    raise
                message = " ".join(str(err).split()) or type(err).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                print(f"{prog}: (set REDDINO_DEBUG=1 for the traceback)", file=sys.stderr)
                sys.exit(USER_ERROR_EXIT)

        return inner  # type: ignore[return-value]

    return wrap
