"""Names Kubernetes accepts, made from names people chose: user -> namespace, label values, object names.

Kubernetes allows little in a name (a DNS-1123 label: ``[a-z0-9-]``, at most 63 characters, a letter
or digit at each end) and not much more in a label value. User names have dots, capitals, accents,
spaces, and now and then a shell command. Each function here maps any string to a valid name, and
keeps different strings apart:

* a string that is already valid (and short enough) is used as it is: ``alice`` -> ``mlops-alice``;
* a string that had to change (or be shortened) keeps a readable head and gets ``-`` and the first
  8 hex digits of the SHA-256 of the original: ``Alice.Smith`` -> ``mlops-alice-smith-1a2b3c4d``, so
  ``Alice.Smith``, ``alice_smith`` and ``alice-smith`` are three namespaces;
* a valid string that *looks* like such a result (it ends in ``-`` and 8 hex digits) is suffixed
  too, so nobody can pick a user name that lands in someone else's namespace (short of finding a
  32-bit hash collision for the same head);
* a namespace that would be ``default``, ``kube-*`` or the server's own (``jupyter-mlops``) gets a
  ``u-`` before the user and a hash: the user called ``kube-system`` gets ``u-kube-system-...``.

The functions are not idempotent on hashed results (``label_value(label_value("A"))`` adds a second
suffix): apply them once, to the original string, everywhere it is needed (creating and selecting).
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata

from ..errors import ConfigError

__all__ = ["namespace_for", "label_value", "object_name", "DNS_LABEL", "LABEL_VALUE", "MAX_LABEL",
           "RESERVED_NAMESPACES"]

MAX_LABEL = 63
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: never a user's namespace (nor is any kube-*): the cluster's own and the server's
RESERVED_NAMESPACES = frozenset({"default", "jupyter-mlops"})
_HASH_LEN = 8
_LOOKS_HASHED = re.compile(r"(^|-)[0-9a-f]{8}$")
# letters NFKD does not take apart; the rest of the non-ASCII world becomes '-' (and a hash suffix)
_SPELLED = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
                          "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "TH", "ı": "i"})


def namespace_for(user: str, template: str = "mlops-{user}") -> str:
    """The namespace of ``user``: ``template`` with ``{user}`` replaced by a sanitised, unique form.

    ``template`` holds ``{user}`` exactly once and otherwise only ``[a-z0-9-]``, leaving room for a
    hashed user; anything else raises :class:`ConfigError` naming the setting. Any ``user`` string
    (empty, unicode, 300 characters, ``$(whoami)``) gives a valid DNS-1123 label.
    """
    prefix, suffix = _split_template(template)
    room = MAX_LABEL - len(prefix) - len(suffix)
    name = f"{prefix}{_fit(user, room, lower=True)}{suffix}"
    if name in RESERVED_NAMESPACES or name.startswith("kube-"):
        # "kube-system" is a user name like any other, but never a user's namespace
        name = f"{prefix}u-{_fit(user, room - 2, lower=True, force=True)}{suffix}"
    return name


def label_value(text: str) -> str:
    """A valid label value for ``text`` (at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at each end).

    The empty string stays empty (a valid value); anything that had to change gets a hash suffix.
    """
    return _fit(text, MAX_LABEL, lower=False) if text else ""


def object_name(*parts: str, max_len: int = MAX_LABEL) -> str:
    """A DNS-1123 label from ``parts`` joined by ``-`` (``object_name("kernel", kernel_id)``).

    Hash-suffixed when the joined text had to change or be shortened; the hash covers the parts
    with their boundaries, so ``("a-b", "c!")`` and ``("a", "b-c!")`` differ. ``max_len`` below 9
    leaves no room for a hash: ``ValueError``.
    """
    if max_len < _HASH_LEN + 1 or max_len > MAX_LABEL:
        raise ValueError(f"object_name: max_len must be {_HASH_LEN + 1}..{MAX_LABEL}, got {max_len}")
    return _fit("-".join(parts), max_len, lower=True, hashed="\0".join(parts))


def _fit(text: str, max_len: int, *, lower: bool, hashed: str | None = None, force: bool = False) -> str:
    """``text`` as it is when valid, else (or when forced) its sanitised head + ``-`` + the hash of
    ``hashed`` (default ``text``)."""
    clean = _sanitise(text, lower)
    if clean and not force and clean == text and len(clean) <= max_len and not _LOOKS_HASHED.search(clean):
        return clean
    digest = hashlib.sha256((text if hashed is None else hashed).encode("utf-8", "surrogatepass")).hexdigest()
    head = _trim(clean[:max_len - _HASH_LEN - 1])
    return f"{head}-{digest[:_HASH_LEN]}" if head else digest[:_HASH_LEN]


def _sanitise(text: str, lower: bool) -> str:
    """Accents dropped (``Ä`` -> ``A``), a few letters spelled out, every other run of characters a
    name cannot hold -> one ``-``, the ends trimmed to letters or digits."""
    plain = unicodedata.normalize("NFKD", text.translate(_SPELLED))
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    if lower:
        return _trim(re.sub(r"[^a-z0-9]+", "-", plain.lower()))
    return _trim(re.sub(r"[^A-Za-z0-9._]+", "-", plain))


def _trim(text: str) -> str:
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", text)


def _split_template(template: str) -> tuple[str, str]:
    """(text before, text after) ``{user}``; :class:`ConfigError` for any other shape."""
    where = "c.Kubernetes.namespace_template"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{template!r} is not a template ({e}); write e.g. mlops-{{user}}", source=where) from e
    fields = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
    if fields != [("user", "", None)]:
        raise ConfigError(f"{template!r} must name {{user}} exactly once and no other field; write e.g. "
                          "mlops-{user}", source=where)
    prefix, _, suffix = template.partition("{user}")
    if not DNS_LABEL.match(f"{prefix}a{suffix}"):
        raise ConfigError(f"{template!r}: around {{user}} only lowercase letters, digits and '-' may stand, and "
                          "the name must start and end with a letter or digit", source=where)
    if prefix.startswith("kube-") or (not prefix and suffix.startswith("kube-")):
        raise ConfigError(f"{template!r}: kube-* namespaces belong to Kubernetes; choose another prefix",
                          source=where)
    if len(prefix) + len(suffix) > MAX_LABEL - _HASH_LEN - 1:
        raise ConfigError(f"{template!r} leaves too little room for the user in a {MAX_LABEL}-character name; "
                          "shorten it", source=where)
    return prefix, suffix
