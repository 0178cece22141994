"""Read a Choria configuration file (``choria.cfg``, ``client.conf``) for the broker settings.

The anchor (choria-io/provisioner) connects with go-choria's framework, configured by a Choria
config file (``provisioner run --choria-config FILE``). This module reads that file format the
way go-choria's ``config/util.go`` does: one ``key = value`` per line, surrounding blanks
trimmed, lines starting with ``#`` (and blank lines) skipped, the value everything after the
first ``=``; later lines win. Keys this provisioner does not use are ignored (the file is
shared with other Choria tools).

:func:`choria_settings` maps what the anchor takes from it onto our configuration keys:

=======================================================  ======================================
Choria key                                               our key
=======================================================  ======================================
``plugin.choria.middleware_hosts`` (host:port, ...)      ``broker_urls`` (``nats://`` added)
``plugin.choria.srv_domain`` (with ``use_srv`` on)       ``broker_srv_domain``
``identity``                                             ``identity``
file provider: ``plugin.security.file.ca``/             ``tls.ca``/``tls.cert``/``tls.key``
``certificate``/``key``
choria provider: ``plugin.security.choria.token_file``/  ``client_identity.jwt``/``seed``
``seed_file``; ``plugin.security.choria.ca``/            ``tls.ca``/``tls.cert``/``tls.key``
``certificate``/``key``
=======================================================  ======================================

Precedence (see ``docs/configuration.md``): command-line flags, then our YAML file, then the
Choria file, then built-in defaults. Relative paths resolve against the Choria file's
directory and ``~`` is expanded, as go-choria's ``path_string`` keys do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from choria_core.strictmodel import StrictConfigError

__all__ = ["ChoriaConfigError", "choria_settings", "parse_choria_config", "read_choria_config"]

#: The largest Choria config file read.
MAX_SIZE = 1024 * 1024
_ITEM = re.compile(r"(.+?)\s*=\s*(.+)")
_HOSTPORT = re.compile(
    r"((nats|tls)://)?[A-Za-z0-9_.-]+(:\d{1,5})?|((nats|tls)://)?\[[0-9a-fA-F:]+\](:\d{1,5})?"
)


class ChoriaConfigError(StrictConfigError):
    """The Choria config file cannot be used; the message names the file and the key."""

    default_where = "<choria config>"


def parse_choria_config(text: str) -> dict[str, str]:
    """``key = value`` lines as a dict (go-choria's parser; later lines win)."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ITEM.fullmatch(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def read_choria_config(path: str | Path) -> dict[str, str]:
    """Read and parse ``path``; :class:`ChoriaConfigError` when it cannot be read."""
    p = Path(path).expanduser()
    fname = str(p)
    try:
        if not p.is_file():
            raise ChoriaConfigError("file not found (or not a regular file)", file=fname)
        if p.stat().st_size > MAX_SIZE:
            raise ChoriaConfigError(f"is larger than {MAX_SIZE} bytes", file=fname)
        return parse_choria_config(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChoriaConfigError(f"could not be read: {type(exc).__name__}", file=fname) from None
    except UnicodeDecodeError:
        raise ChoriaConfigError("is not UTF-8 text", file=fname) from None


def _bool(value: str) -> bool:
    # go-choria's confkey booleans (strconv.ParseBool plus yes/no/on/off)
    return value.strip().lower() in ("1", "t", "true", "y", "yes", "on")


def _path(value: str, base: Path) -> str:
    p = Path(value.strip()).expanduser()
    return str(p if p.is_absolute() else base / p)


def _hosts(value: str, fname: str) -> list[str]:
    urls: list[str] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if not _HOSTPORT.fullmatch(item):
            raise ChoriaConfigError(
                f"{item!r} is not host:port", key="plugin.choria.middleware_hosts", file=fname
            )
        urls.append(item if "://" in item else f"nats://{item}")
    return urls


def choria_settings(path: str | Path) -> dict[str, Any]:
    """Our configuration keys (dotted, e.g. ``tls.ca``) from the Choria file in ``path``."""
    p = Path(path).expanduser().absolute()
    fname, base = str(p), p.parent
    raw = read_choria_config(p)
    out: dict[str, Any] = {}
    hosts = _hosts(raw.get("plugin.choria.middleware_hosts", ""), fname)
    if hosts:
        out["broker_urls"] = hosts
    srv_domain = raw.get("plugin.choria.srv_domain", "").strip()
    if srv_domain and _bool(raw.get("plugin.choria.use_srv", "true")):
        out["broker_srv_domain"] = srv_domain
    if raw.get("identity", "").strip():
        out["identity"] = raw["identity"].strip()
    provider = raw.get("plugin.security.provider", "puppet").strip().lower()
    files: dict[str, str] = {}
    if provider == "file":
        files = {
            "tls.ca": "plugin.security.file.ca",
            "tls.cert": "plugin.security.file.certificate",
            "tls.key": "plugin.security.file.key",
        }
    elif provider == "choria":
        files = {
            "tls.ca": "plugin.security.choria.ca",
            "tls.cert": "plugin.security.choria.certificate",
            "tls.key": "plugin.security.choria.key",
            "client_identity.jwt": "plugin.security.choria.token_file",
            "client_identity.seed": "plugin.security.choria.seed_file",
        }
    for ours, theirs in files.items():
        value = raw.get(theirs, "").strip()
        if value:
            out[ours] = _path(value, base)
    return out
