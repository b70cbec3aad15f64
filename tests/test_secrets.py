"""The secrets stage of `codegen2 data prepare`: planted keys of every kind never reach the prepared directory,
and nothing else changes. The fake secrets are assembled at run time so that this file holds none verbatim."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from codegen2.config import DataConfig, SourceConfig, load_config
from codegen2.data.prepare.pipeline import prepare
from codegen2.data.prepare.secrets import SecretScanner
from codegen2.data.prepare.shards import PreparedData
from codegen2.data.sources import user_sources
from codegen2.tokenizer import CodeGenTokenizer

RNG = random.Random(7)


def _token(alphabet: str, n: int) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPPER = string.ascii_uppercase + string.digits
SECRETS = {
    "aws_id": "AKIA" + _token(UPPER, 16),
    "aws_secret": _token(ALNUM + "/+", 40),
    "github": "ghp" + "_" + _token(ALNUM, 36),
    "slack": "xox" + "b-" + "123456789012-1234567890123-" + _token(string.ascii_lowercase + string.digits, 24),
    "stripe": "sk" + "_live_" + _token(ALNUM, 24),
    "password": "Pg" + _token(ALNUM, 14),
    "email": "jane.doe" + "@" + "acme-widgets.com",
    "ip": "52.14." + "99.201",
}
PEM_BODY = "\n".join(_token(ALNUM + "+/", 64) for _ in range(12))
PEM_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + PEM_BODY + "\n-----END RSA " + "PRIVATE KEY-----\n"


def _module(name: str, i: int) -> str:
    """A plain module of random identifiers: no near duplicate of the others, no secret."""
    rng = random.Random(f"{name}{i}")
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(40)]
    body = "\n".join(f"    {words[j]} = {words[j + 1]}({words[j + 2]}, {rng.randint(0, 999)})  # {words[j + 3]}"
                     for j in range(0, 36, 2))
    return f'"""Helpers for {name} number {i}."""\n\n\ndef {name}_{i}(x):\n{body}\n    return x\n'


PLANTED = {
    "settings.py": ("AWS_ACCESS_KEY_ID = '{aws_id}'\naws_secret_access_key = '{aws_secret}'\n",
                    "AWS_ACCESS_KEY_ID = '<KEY>'\naws_secret_access_key = '<KEY>'\n"),
    "clients.py": ("GITHUB = '{github}'\nSLACK = '{slack}'\nstripe.api_key = '{stripe}'\n",
                   "GITHUB = '<KEY>'\nSLACK = '<KEY>'\nstripe.api_key = '<KEY>'\n"),
    "db.py": ("DATABASE_URL = 'postgres://app:{password}@db.internal:5432/app'\n",
              "DATABASE_URL = 'postgres://app:<PASSWORD>@db.internal:5432/app'\n"),
    "contact.py": ("# Maintainer: Jane Doe <{email}>\nSERVER = '{ip}'  # not 10.0.0.1, not version 1.2.3.4\n",
                   "# Maintainer: Jane Doe <<EMAIL>>\nSERVER = '<IP_ADDRESS>'  # not 10.0.0.1, not version 1.2.3.4\n"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("secrets-corpus")
    originals, expected = {}, {}
    for i in range(8):
        originals[f"clean_{i}.py"] = _module("clean", i)
    for i, (name, (planted, redacted)) in enumerate(PLANTED.items()):
        head = _module(name.split(".")[0], i)
        originals[name] = head + planted.format(**SECRETS)
        expected[name] = head + redacted
    originals["id_rsa.pem"] = PEM_KEY
    for name, text in originals.items():
        (root / name).write_text(text, encoding="utf-8")
    return {"root": root, "originals": originals, "expected": expected}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    config = load_config(None, preset="tiny")
    config.data.sources = [SourceConfig(path=str(corpus["root"]), kind="code", include=["*.py", "*.pem"])]
    config.data.heldout_fraction = 0.2
    config.tokenizer.vocab_size = 400
    config.prepare.min_alphanum_fraction = 0.0
    out = tmp_path_factory.mktemp("secrets-prepared") / "out"
    logs: list[str] = []
    prepare(config, out, tasks=2, workers=1, log=logs.append)
    (out / "test-log.txt").write_text("\n".join(logs), encoding="utf-8")  # searched with the rest below
    return out


def _decoded(out: Path) -> list[str]:
    data = PreparedData.open(out)
    tokenizer = CodeGenTokenizer.load(out / "tokenizer.json")
    docs = []
    for split in ("train", "heldout"):
        tokens = np.asarray(data.stream(data.sources[0], split)[:])
        pieces = np.split(tokens, np.flatnonzero(tokens == tokenizer.eot_id) + 1)[:-1]
        docs += [tokenizer.decode(piece[:-1].tolist()) for piece in pieces]
    return docs


def test_no_planted_secret_survives_anywhere_in_the_output(prepared, capfd):
    docs = _decoded(prepared)
    secrets = [*SECRETS.values(), *PEM_BODY.splitlines()]
    assert not [s for s in secrets if any(s in doc for doc in docs)]
    files = [p for p in prepared.rglob("*") if p.is_file()]  # shards, manifest, removed/redacted, heldout, logs
    assert not [(p.name, s) for p in files for s in secrets if s.encode() in p.read_bytes()]
    out, err = capfd.readouterr()
    assert not [s for s in secrets if s in out + err]


def test_redacted_files_differ_only_by_placeholders_and_the_rest_is_byte_identical(corpus, prepared):
    docs = sorted(_decoded(prepared))
    originals, expected = corpus["originals"], corpus["expected"]
    want = sorted([text for name, text in originals.items() if name not in expected and name != "id_rsa.pem"]
                  + list(expected.values()))
    assert docs == want


def test_counts_by_kind_in_manifest_removed_and_redacted(corpus, prepared):
    data = PreparedData.open(prepared)
    totals: dict[str, int] = {}
    for split in data.sources[0]["splits"].values():
        for kind, n in split["redacted"].items():
            totals[kind] = totals.get(kind, 0) + n
    assert totals == {"email": 1, "ip_address": 1, "key": 6, "password": 1}
    removed = [json.loads(line) for line in (prepared / "removed.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["reason"], r["secrets"]) for r in removed] == \
        [("id_rsa.pem", "secrets", {"key": 1})]
    redacted = {Path(r["path"]).name: r["secrets"] for r in
                map(json.loads, (prepared / "redacted.jsonl").read_text().splitlines())}
    assert redacted == {"settings.py": {"key": 2}, "clients.py": {"key": 3}, "db.py": {"password": 1},
                        "contact.py": {"email": 1, "ip_address": 1}}
    log = (prepared / "test-log.txt").read_text()
    assert "secrets 1" in log and "secrets redacted:" in log


def test_scanner_leaves_lookalikes_alone():
    scan = SecretScanner().redact
    text = ("__version__ = '1.2.3.4'\nrelease 2.7.2.2\nsee section 8.2.4.45\nhost = '192.168.0.1'\n"
            "dns = '8.8.8.8'\nmail = 'someone@example.com'\ny = a@self.weights\n"
            "if line.startswith('-----BEGIN RSA PRIVATE KEY-----'):\n    pass\n")
    assert scan(text).text == text and not scan(text).counts


def test_scanner_replaces_a_key_block_inside_code():
    text = "KEY = '''\n" + PEM_KEY + "'''\n" + _module("code", 1) * 3
    result = SecretScanner().redact(text)
    assert not result.removed and result.text == "KEY = '''\n<KEY>\n'''\n" + _module("code", 1) * 3


def test_offsets_hold_when_lower_case_changes_the_length():
    text = "NAME = 'İstanbul'\nTOKEN = '" + SECRETS["github"] + "'\n" + _module("code", 2)
    assert SecretScanner().redact(text).text == "NAME = 'İstanbul'\nTOKEN = '<KEY>'\n" + _module("code", 2)


def test_switch_off_per_source_and_globally(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    assert user_sources(DataConfig(sources=[SourceConfig(path=str(tmp_path))]), "train")[0].secrets
    assert not user_sources(DataConfig(sources=[SourceConfig(path=str(tmp_path), secrets=False)]), "train")[0].secrets
    assert not user_sources(DataConfig(sources=[SourceConfig(path=str(tmp_path))], secrets=False), "train")[0].secrets
