"""The site key: one secret per site that turns paths and patient IDs into keyed pseudonyms.

Outputs never hold an input's path, file name or a patient ID: they hold HMAC-SHA256 pseudonyms
under the site key, and the key's fingerprint (an HMAC of a fixed string) so that two outputs can
be checked to use the same key without revealing it. The key is never written next to the data:
it comes from `$MEDSSL_PATIENT_SALT`, from a key file named by the user (refused when group- or
world-readable), or from a per-user key file created once with mode 0600 in the user's config
directory, so every ingest of one site shares it by default and patient keys stay comparable.

>>> key = SiteKey(b"example secret", "doctest")
>>> len(key.fingerprint())
16
>>> key.pseudonym("DOE^JOHN/CT 2019/1.dcm") != key.pseudonym("DOE^JOHN/CT 2019/2.dcm")
True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.io import atomic_write

logger = logging.getLogger(__name__)

SALT_ENV = "MEDSSL_PATIENT_SALT"
KEY_FILE_NAME = "site_key"
_FINGERPRINT_MESSAGE = b"medssl site key fingerprint v1"


class PrivacyError(ValueError):
    """A key or pseudonym rule would be broken (readable key file, mixed keys, ...)."""


@dataclass(frozen=True)
class SiteKey:
    """The secret (never printed: repr shows the fingerprint) and where it came from."""

    secret: bytes = field(repr=False)
    origin: str

    def _mac(self, domain: str, text: str) -> str:
        message = domain.encode() + b"\x00" + text.encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it."""
        return hmac.new(self.secret, _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]

    def pseudonym(self, name: str) -> str:
        """Keyed name of an input (relative path, plus frame or index): 32 hex digits."""
        return self._mac("source", name)[:32]

    def patient(self, patient_id: Any) -> str | None:
        """Keyed patient hash (16 hex digits); None when no ID is known."""
        text = "" if patient_id is None else str(patient_id).strip()
        return self._mac("patient", text)[:16] if text else None

    def __repr__(self) -> str:
        return f"SiteKey(fingerprint={self.fingerprint()}, origin={self.origin!r})"


def user_key_path() -> Path:
    """$XDG_CONFIG_HOME/medssl/site_key (default ~/.config/medssl/site_key)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "medssl" / KEY_FILE_NAME


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise PrivacyError(f"{what} {path}: cannot read ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrivacyError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
            f"run `chmod 600 {path}`"
        )
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise PrivacyError(f"{what} {path} holds fewer than 16 bytes: too short to be a key")
    return secret


def resolve_site_key(
    key_file: str | Path | None = None, *, out: str | Path | None = None
) -> SiteKey:
    """`key_file` -> $MEDSSL_PATIENT_SALT -> the per-user key file (created once, mode 0600).

    `out`: the output folder; a key file inside it is refused, since whoever receives the
    output would receive the key."""
    env = os.environ.get(SALT_ENV)
    if key_file and env:
        raise PrivacyError(
            f"both patient_salt_file and ${SALT_ENV} are set: keep one, so it is clear which key "
            "names this output"
        )
    if key_file:
        path = Path(key_file).expanduser().resolve()
        if out is not None and path.is_relative_to(Path(out).resolve()):
            raise PrivacyError(f"patient_salt_file {path} lies inside the output folder {out}")
        return SiteKey(_read_key_file(path, "patient_salt_file"), "patient_salt_file")
    if env:
        return SiteKey(env.encode(), f"${SALT_ENV}")
    path = user_key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, secrets.token_hex(32) + "\n", exclusive=True)
        logger.warning(
            "created this user's site key %s (mode 0600). Every ingest by this user uses it, so "
            "patient keys match across datasets; copy it to the other machines of this site, "
            "and never into a dataset.",
            path,
        )
    return SiteKey(_read_key_file(path, "site key file"), "user key file")


def looks_like_path(text: str) -> bool:
    """Whether a command-line value names a file or folder (and so may name a patient)."""
    return os.sep in text or text.startswith(".") or Path(text).exists()


def pseudonymised_path(text: str, site: SiteKey | None = None) -> str:
    """`text` as outputs may show it: a path (or `file.npz:split`) becomes `<path:PSEUDONYM>`
    (`<path:PSEUDONYM>:split`), keyed under `site` (default: the resolved site key); anything
    else (`raw`, `timm:NAME`) is kept. A folder or file name can name a patient."""
    text = str(text)
    if not text or not looks_like_path(text):
        return text
    base, _, split = text.rpartition(":") if ".npz:" in text else (text, "", "")
    name = f"<path:{path_pseudonym(base, site)}>"
    return f"{name}:{split}" if split else name


def path_pseudonym(path: str | Path, site: SiteKey | None = None) -> str:
    """12 hex characters naming a file or folder by its absolute path, keyed under `site`
    (default: the resolved site key): one path, one name, in every output."""
    site = site if site is not None else resolve_site_key()
    return site.pseudonym(str(Path(path).expanduser().resolve()))[:12]


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write a file only its owner can read (atomic; its folder is made mode 0700).

    `exclusive`: fail if it exists (two processes creating the user's key at once keep one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if exclusive:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return
    atomic_write(path, text, perms=0o600)


def check_same_key(fingerprints: dict[str, Iterable[str | None]], purpose: str) -> str | None:
    """The one key fingerprint behind named sets of patient keys; refuse when they differ.

    Patient keys made with two keys never match, so comparing them would silently find nothing.
    Returns the fingerprint, or None when no patient key is present."""
    found: dict[str, set[str]] = {}
    for name, values in fingerprints.items():
        for fp in values:
            if fp:
                found.setdefault(fp, set()).add(name)
    if len(found) > 1:
        listed = "; ".join(f"{fp} in {', '.join(sorted(names))}" for fp, names in found.items())
        raise PrivacyError(
            f"{purpose}: patient keys were made with different site keys ({listed}); re-ingest "
            "with the same key ($MEDSSL_PATIENT_SALT, patient_salt_file= or the user key file)"
        )
    return next(iter(found), None)


def private_jsonl(path: Path, records: Iterable[dict]) -> None:
    """A JSON-lines file only its owner can read (the pseudonym -> path map)."""
    write_private(path, "".join(json.dumps(r) + "\n" for r in records))
