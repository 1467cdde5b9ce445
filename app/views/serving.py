"""Who may reach this dashboard. It launches processes and reads files with no login of its
own, so it serves loopback only unless the operator opts in (``LAYERLOCK_ALLOW_REMOTE=1``, after
putting it behind authentication), and never with XSRF protection off.

The binding itself comes from ``app/.streamlit/config.toml`` (read for ``streamlit run
.../app/Home.py`` from any folder); this check catches a flag or environment variable that
overrides it.
"""

from __future__ import annotations

import ipaddress
import os

ALLOW_REMOTE_ENV = "LAYERLOCK_ALLOW_REMOTE"


def is_loopback(address: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; an empty address means every interface."""
    address = address.strip().strip("[]")
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def refusal(address: str | None, xsrf: bool, env: dict[str, str] | None = None) -> str | None:
    """Why the dashboard must not serve with these options, or None when it may."""
    env = os.environ if env is None else env
    if not xsrf:
        return "XSRF protection is off (server.enableXsrfProtection=false): the dashboard does not serve without it."
    if is_loopback(address or "") or env.get(ALLOW_REMOTE_ENV) == "1":
        return None
    where = address or "every interface"
    return (
        f"This dashboard is listening on {where}, beyond this machine, and it has no login. "
        f"Restart it on 127.0.0.1 (the default), or put it behind authentication and set "
        f'{ALLOW_REMOTE_ENV}=1 (README, "The dashboard").'
    )
