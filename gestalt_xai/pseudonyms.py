"""The run's salted pseudonym mapping: one per run, the salt kept inside the run (``private/pseudonym_secret.json``).

Exports (the clinician questionnaire, reports) show a case, a subject or a rater only under a pseudonym, never under
its image id, subject id or file name. A pseudonym is a keyed hash of the raw id (HMAC-SHA256, RFC 2104, with the
run's secret as key and the kind of thing as part of the message) written in RFC 4648 base32, so

* the same run always gives the same pseudonym for the same id (every report of a run uses the same pseudonyms, and
  a pseudonym never changes when cases are added), and different runs (different secrets) give unrelated ones;
* nobody who lacks the secret can compute the pseudonym of a known id (the salt defeats a dictionary of ids).

The secret is created the first time the mapping is asked for. Unless the user set one (:func:`set_secret`, e.g.
``Run.set_pseudonym_secret()`` which draws 256 random bits from the operating system), it is **derived from the
study seed**, so two runs of the same pipeline with the same seed write the same bytes (the toolkit's reproducibility
contract). Be clear what that protects: a derived secret is only as secret as the seed. Someone who knows the seed,
this code and a candidate list of ids can recompute the mapping, so the pseudonyms of a derived secret hide the ids
from people who read the exported files, not from someone with the pipeline file and the cohort. For a real study set
a random secret before the first export (the file's ``source`` says which kind the run holds) and keep the run's
``private/`` folder with the analyst. With 10 base32 characters (50 bits) a collision among 10⁴ ids has a chance of
about 4·10⁻⁸; :meth:`PseudonymMap.table` checks for one all the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gestalt_xai.errors import InputError

__all__ = ["KINDS", "PseudonymMap", "derived_secret", "load_or_create", "set_secret"]

#: kinds of things that get pseudonyms → the letter their pseudonyms start with
KINDS: dict[str, str] = {"case": "C", "subject": "S", "syndrome": "D", "rater": "R", "participant": "P"}
#: base32 characters of a pseudonym after its kind letter
LENGTH = 10
_DERIVE_KEY = b"gestalt-xai pseudonym secret v1"
_VERSION = 1


def derived_secret(seed: int) -> str:
    """The secret a run without a user-set one derives from its study seed (hex; deterministic, see the module).

    >>> derived_secret(0) == derived_secret(0) != derived_secret(1)
    True
    """
    return hmac.new(_DERIVE_KEY, f"seed:{int(seed)}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class PseudonymMap:
    """A run's pseudonym mapping (the secret is left out of ``repr`` so it does not end up in logs).

    >>> m = PseudonymMap(derived_secret(0), "derived from study seed 0")
    >>> p = m.pseudonym("case", "img_0001")
    >>> p.startswith("C-") and len(p) == 2 + LENGTH and p == m.pseudonym("case", "img_0001")
    True
    >>> m.pseudonym("subject", "img_0001")[2:] != p[2:]
    True
    """

    secret: str = field(repr=False)
    source: str

    def pseudonym(self, kind: str, raw_id: object) -> str:
        """The pseudonym of ``raw_id`` (compared as text) among things of ``kind`` (a key of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown pseudonym kind {kind!r}; known: {', '.join(KINDS)}")
        digest = hmac.new(bytes.fromhex(self.secret), f"{kind}\x00{raw_id}".encode(), hashlib.sha256).digest()
        return f"{KINDS[kind]}-{base64.b32encode(digest).decode('ascii')[:LENGTH]}"

    def table(self, kind: str, raw_ids: object) -> pd.DataFrame:
        """``raw_id``, ``pseudonym`` of the distinct ids, sorted by raw id: the key an analyst keeps.

        Raises ``RuntimeError`` when two ids share a pseudonym (see the module for how unlikely that is).
        """
        ids = sorted({str(i) for i in raw_ids})  # type: ignore[attr-defined]
        table = pd.DataFrame({"raw_id": ids, "pseudonym": [self.pseudonym(kind, i) for i in ids]})
        clash = table[table["pseudonym"].duplicated(keep=False)]
        if len(clash):
            raise RuntimeError(f"pseudonym collision among {kind} ids {sorted(clash['raw_id'])[:4]}: set another "
                               "pseudonym secret for this run")
        return table


def _write(path: Path, secret: str, source: str) -> PseudonymMap:
    from gestalt_xai.runs import atomic_write_text

    text = json.dumps({"secret": secret, "source": source, "version": _VERSION}, indent=2, sort_keys=True) + "\n"
    atomic_write_text(path, text)
    return PseudonymMap(secret, source)


def load_or_create(path: str | Path, seed: int) -> PseudonymMap:
    """The mapping stored at ``path``; when there is none yet, the one derived from ``seed``, written there first."""
    path = Path(path)
    if not path.exists():
        return _write(path, derived_secret(seed), f"derived from study seed {int(seed)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        secret, source = str(data["secret"]), str(data["source"])
        bytes.fromhex(secret)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a pseudonym secret file ({type(exc).__name__}: {exc}); restore it from a "
                         "backup: a new secret would change every pseudonym of the run") from None
    if len(secret) < 32:
        raise InputError(f"{path}: the pseudonym secret is shorter than 128 bits")
    return PseudonymMap(secret, source)


def set_secret(path: str | Path, secret: str | None = None, *, replace: bool = False) -> PseudonymMap:
    """Store a user-set secret (hex, ≥ 128 bits; ``None``: 256 random bits from the operating system) at ``path``.

    A run that already has a secret keeps it unless ``replace``: replacing changes every pseudonym, so exports made
    before no longer match the run's key.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise InputError(f"{path} exists: this run already has a pseudonym secret (replace=True changes every "
                         "pseudonym of the run)")
    secret = secrets.token_hex(32) if secret is None else secret.strip().lower()
    try:
        raw = bytes.fromhex(secret)
    except ValueError:
        raise InputError("the pseudonym secret must be hexadecimal") from None
    if len(raw) < 16:
        raise InputError("the pseudonym secret must have at least 128 bits (32 hex digits)")
    return _write(path, secret, "set by the user")
