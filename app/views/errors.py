"""What a page shows for an error nobody expected: one line on the page, the traceback in the
server log (never a traceback on the page).

``Home.py`` runs every page inside :func:`show`'s handler. Auto-refreshing fragments
(``run_every``) rerun on their own, outside that handler (and Streamlit would draw their
traceback), so every fragment is made with :func:`fragment`, which puts its body inside the same
handler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta

import streamlit as st

from analysis import first_line


def show(err: Exception, where: str) -> None:
    """The one line for ``err`` (call inside the ``except`` block: the log gets the traceback)."""
    logging.getLogger("layerlock.app").exception("%s failed", where)
    text = first_line(err)
    label = text if text == type(err).__name__ else f"{type(err).__name__}: {text}"
    st.error(f"This page could not be drawn ({label}). The server log has the details.")


def guarded(fn: Callable, where: str) -> Callable:
    """``fn`` with its errors shown by :func:`show` (Streamlit's rerun/stop signals pass: they
    are not ``Exception``)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            show(err, where)
            return None

    return run


def fragment(fn: Callable, run_every: float | timedelta | None = None) -> Callable:
    """``st.fragment(run_every=...)(fn)``, its errors (also those of its timed reruns) shown as one line."""
    return st.fragment(run_every=run_every)(guarded(fn, f"fragment {fn.__name__}"))
