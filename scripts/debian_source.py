"""Print "SUITE MIRROR" of the Debian archive this host's apt is configured with.

The image build bootstraps its OS base from the same mirror apt already uses, so nothing about the
network is written into the repository. Reads both formats apt accepts: one-line ``deb URI SUITE
COMPONENTS`` entries (sources.list, *.list) and deb822 stanzas (*.sources). The main suite is the
first one without a ``-updates``/``-security``-style suffix that carries the ``main`` component.
"""
from __future__ import annotations

import sys
from pathlib import Path

APT_DIR = Path("/etc/apt")


def one_line_entries(text: str):
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 4 or words[0] != "deb":
            continue
        words = [w for w in words[1:] if not w.startswith("[")]  # drop "[arch=... signed-by=...]"
        yield words[0], [words[1]], words[2:]


def deb822_entries(text: str):
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
            for uri in fields.get("uris", []):
                yield uri, fields.get("suites", []), fields.get("components", [])


def all_entries():
    files = [APT_DIR / "sources.list", *sorted((APT_DIR / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        if path.suffix == ".list":
            yield from one_line_entries(path.read_text())
        elif path.suffix == ".sources":
            yield from deb822_entries(path.read_text())


def main() -> int:
    for uri, suites, components in all_entries():
        for suite in suites:
            if "-" not in suite and "main" in components and "debian" in uri:
                print(suite, uri.rstrip("/"))
                return 0
    print("no Debian main suite found in /etc/apt sources", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
