"""The secrets stage of `codegen2 data prepare`: keys, tokens, passwords, e-mail and IP addresses out of the text.

Private keys (a whole PEM block), cloud and API tokens and passwords in URLs (`postgres://user:PASSWORD@host`) are
found by detect-secrets' plugins, run line by line through its own `scan_line` (with its false-positive filters),
but only on the lines where one of their regular expressions matches: most files have none, and one regex pass
over a whole file is much cheaper than every plugin on every line. E-mail and IPv4 addresses, which detect-secrets
does not look for (its public-IP plugin is off here), are found by our own regexes, as BigCode's PII pipeline
did. Each span becomes a placeholder (`<KEY>`, `<PASSWORD>`, `<EMAIL>`, `<IP_ADDRESS>`); the rest of the text is
left byte for byte. Counts go to the manifest and `removed.jsonl`, never the secret itself.

Not redacted, on purpose (see docs/data.md): reserved example domains (example.com, *.test, ...), private,
loopback, reserved and documentation IP ranges, well-known public resolvers, and dotted numbers after a
version word (`version 1.2.3.4`). detect-secrets' keyword and high-entropy plugins are off: in code they flag
test fixtures, hashes and base64 data far more often than secrets.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("key", "password", "email", "ip_address")
PLACEHOLDERS = {"key": "<KEY>", "password": "<PASSWORD>", "email": "<EMAIL>", "ip_address": "<IP_ADDRESS>"}
MOSTLY_SECRET = 0.5  # a file whose redacted spans are at least this share of its characters is removed

# detect-secrets plugins that are not run: noisy in code, or done here (PEM blocks, IP addresses)
SKIPPED_PLUGINS = frozenset({"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString",
                             "IPPublicDetector", "PrivateKeyDetector"})
PASSWORD_TYPES = frozenset({"Basic Auth Credentials"})  # detect-secrets types whose secret is a password

PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]{0,20}PRIVATE KEY(?: BLOCK)?)-----(.{0,20000}?)-----END \1-----",
                       re.DOTALL)
PEM_BODY = re.compile(r"[A-Za-z0-9+/=]{40,}")
PUTTY_KEY = re.compile(r"PuTTY-User-Key-File-\d: .*?Private-MAC: [0-9a-f]+", re.DOTALL)
# Both searches start at a literal character ('@', '.'), which Python's re finds fast; the part before it is
# checked backwards from there.
EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![\w-]|\.\w|\()")
EMAIL_LOCAL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_TAIL = re.compile(rf"\.{OCTET}\.{OCTET}\.{OCTET}(?!\w|\.\w)")
IPV4_HEAD = re.compile(rf"(?<![\w.]){OCTET}$")
# What a line must contain (lower-cased) for any of the plugins run here to match it: a literal of every
# token format, or a keyword of the assignment-style detectors (AWS secret, IBM, Cloudant, SoftLayer, Azure).
TRIGGER_WORDS = ("a3t", "abia", "acca", "akia", "asia", "key", "pw", "pass", "token", "secret", "://",
                 "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "glpat-", "gldt-", "glft-", "glsoat-", "glrt-",
                 "gr1348941", "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-", "eyj", "-us", "_authtoken",
                 "t3blbkfj", "pypi-", "sg.", "xox", "sq0csp-", "k_live_")
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
TRIGGER_REGEXES = tuple(re.compile(p) for p in (r"AP[\dA-F][a-zA-Z0-9]{8}", r"AKC[a-zA-Z0-9]{10}",  # Artifactory
                                                 r"\.[\w-]{6}\.[\w-]{27}",  # Discord
                                                 r":[\w-]{35}",  # Telegram
                                                 r"AC[a-z0-9]{32}", r"SK[a-z0-9]{32}"))  # Twilio
VERSION_BEFORE = re.compile(r"(?:version|ver|release|v|section|rfc)[\s:=_'\"#-]{0,3}$", re.IGNORECASE)
GENERIC_TLDS = frozenset({"com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "dev",
                          "app", "io", "ai", "co", "me", "tech", "cloud", "online", "site", "xyz", "email", "mail",
                          "museum", "aero", "coop", "jobs", "mobi", "travel", "company", "systems", "solutions"})
EXAMPLE_DOMAINS = frozenset({"example.com", "example.net", "example.org"})
EXAMPLE_TLDS = frozenset({"example", "test", "invalid", "localhost", "local"})
PUBLIC_RESOLVERS = frozenset({"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "208.67.222.222",
                              "208.67.220.220"})


@dataclass
class Redaction:
    """The text after redaction, how many spans of each kind were replaced, and whether to drop the file."""

    text: str
    counts: Counter = field(default_factory=Counter)
    removed: bool = False


class SecretScanner:
    """Finds and replaces secrets in documents; one per read task (building the plugins costs a few ms)."""

    def __init__(self) -> None:
        import ahocorasick

        _import_detect_secrets_quietly()
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

        plugins = [cls for cls in get_mapping_from_secret_type_to_class().values()
                   if cls.__name__ not in SKIPPED_PLUGINS]
        self.config = {"plugins_used": [{"name": cls.__name__} for cls in plugins]}
        self.regexes = {cls.secret_type: list(getattr(cls, "denylist", ())) for cls in plugins}
        self.triggers = ahocorasick.Automaton()
        for word in TRIGGER_WORDS:
            self.triggers.add_word(word, word)
        self.triggers.make_automaton()

    def redact(self, text: str) -> Redaction:
        """`text` with every secret replaced by its placeholder; `removed` when it was mostly secret."""
        spans: list[tuple[int, int, str]] = []
        if "PRIVATE KEY" in text or "PuTTY-User-Key" in text:
            spans += [(m.start(), m.end(), "key") for m in PEM_BLOCK.finditer(text) if PEM_BODY.search(m.group(2))]
            spans += [(m.start(), m.end(), "key") for m in PUTTY_KEY.finditer(text)]
        spans += self._plugin_spans(text)
        spans += _email_spans(text) + _ip_spans(text)
        if not spans:
            return Redaction(text)
        kept = _disjoint(spans)
        counts = Counter(kind for _, _, kind in kept)
        secret_chars = sum(end - start for start, end, _ in kept)
        if secret_chars >= MOSTLY_SECRET * len(text.strip()):
            return Redaction("", counts, removed=True)
        pieces, last = [], 0
        for start, end, kind in kept:
            pieces += [text[last:start], PLACEHOLDERS[kind]]
            last = end
        pieces.append(text[last:])
        return Redaction("".join(pieces), counts)

    def _candidate_lines(self, text: str) -> list[int]:
        """Start offsets of the lines on which a plugin's regex matches (two cheap passes pick the lines to try)."""
        lower = text.lower()
        if len(lower) != len(text):  # a few characters lower-case to two ('İ'): keep the offsets
            lower = text.translate(ASCII_LOWER)
        hits = [end for end, _ in self.triggers.iter(lower)]
        hits += [m.start() for regex in TRIGGER_REGEXES for m in regex.finditer(text)]
        starts = sorted({text.rfind("\n", 0, hit) + 1 for hit in hits})
        found = []
        for start in starts:
            end = text.find("\n", start)
            line = text[start:end if end >= 0 else len(text)]
            if any(regex.search(line) for regexes in self.regexes.values() for regex in regexes):
                found.append(start)
        return found

    def _plugin_spans(self, text: str) -> list[tuple[int, int, str]]:
        """Spans of what detect-secrets' `scan_line` reports on the candidate lines."""
        starts = self._candidate_lines(text)
        if not starts:
            return []
        from detect_secrets.core.scan import scan_line
        from detect_secrets.settings import get_settings, transient_settings

        spans = []
        with transient_settings(self.config):
            # never verify a candidate against the provider's API: nothing leaves this machine
            assert "detect_secrets.filters.common.is_ignored_due_to_verification_policies" not in \
                get_settings().filters
            for start in starts:
                end = text.find("\n", start)
                line = text[start:end if end >= 0 else len(text)]
                for secret in scan_line(line):
                    kind = "password" if secret.type in PASSWORD_TYPES else "key"
                    spans += [(start + s, start + e, kind)
                              for s, e in _secret_spans(self.regexes.get(secret.type, []), line, secret.secret_value)]
        return spans


def _import_detect_secrets_quietly() -> None:
    """detect-secrets' logger prints a skipped finding's value at debug level: it stays silent here whatever the
    root logger's level. Its import also routes every Python warning of the process through logging; undone."""
    import logging
    import warnings

    showwarning = warnings.showwarning
    from detect_secrets.core.log import log

    if warnings.showwarning is not showwarning:
        logging.captureWarnings(False)
    log.disabled = True


def _email_spans(text: str) -> list[tuple[int, int, str]]:
    """E-mail addresses at personal domains."""
    spans = []
    for m in EMAIL_DOMAIN.finditer(text):
        local = EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if local and _is_personal_email(m.group(1), m.group(2)):
            spans.append((local.start(), m.end(), "email"))
    return spans


def _ip_spans(text: str) -> list[tuple[int, int, str]]:
    """Public IPv4 addresses that are not version or section numbers."""
    spans = []
    for m in IPV4_TAIL.finditer(text):
        head = IPV4_HEAD.search(text, max(0, m.start() - 3), m.start())
        if head and _is_public_ip(text, head.start(), text[head.start():m.end()]):
            spans.append((head.start(), m.end(), "ip_address"))
    return spans


def _secret_spans(regexes: list[re.Pattern], line: str, value: str | None) -> list[tuple[int, int]]:
    """Where a plugin's finding `value` lies in `line`. detect-secrets reports a regex's group when it has one:
    the secret itself after a prefix (`://user:PASSWORD@`), or only the start of the token (`ghp` of a GitHub
    token); the first is replaced alone, the second with the whole match."""
    spans = []
    for regex in regexes:
        for m in regex.finditer(line):
            groups = [i for i in range(1, (m.lastindex or 0) + 1) if m.group(i) == value and m.start(i) > m.start()]
            if groups:
                spans.append(m.span(groups[0]))
            elif value and value in m.group(0):
                spans.append(m.span())
    return spans


def _disjoint(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The spans in text order, without overlaps: keys and passwords win over the e-mail or IP address they
    overlap (`user:PASSWORD@host.com` also reads as an address), then the earlier and longer span."""
    kept: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(spans, key=lambda s: (KINDS.index(s[2]) > 1, s[0], -s[1])):
        if not any(start < e and s < end for s, e, _ in kept):
            kept.append((start, end, kind))
    return sorted(kept)


def _is_personal_email(domain: str, tld: str) -> bool:
    """An address at a real domain; reserved example domains (RFC 2606, RFC 6761) name no one."""
    domain, tld = domain.lower(), tld.lower()
    if not (len(tld) == 2 or tld in GENERIC_TLDS):  # `a@self.weights` is a matrix product
        return False
    return not any(domain == d or domain.endswith("." + d) for d in EXAMPLE_DOMAINS)


def _is_public_ip(text: str, start: int, value: str) -> bool:
    """A global unicast IPv4 address that is neither a well-known resolver nor a version number."""
    if value in PUBLIC_RESOLVERS or VERSION_BEFORE.search(text, max(0, start - 12), start):
        return False
    if sum(len(part) > 1 for part in value.split(".")) < 2:  # 2.7.2.2, 8.2.4.45: versions and sections
        return False
    address = ipaddress.IPv4Address(value)
    return address.is_global and not address.is_multicast
