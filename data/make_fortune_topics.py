"""Build data/fortune_topics.jsonl, a small topic-classification set, from Debian's `fortunes` package.

Each fortune file of the package holds quotations on one topic, separated by lines that hold only `%`.
This script takes a few topic files, keeps entries of modest length, drops ascii art and anything that
looks offensive, removes duplicates, balances the classes (every class capped at the size of the smallest),
shuffles with a fixed seed and holds out a stratified test split.

Get the files (Debian/Ubuntu), then run from the repository root:

    cd /tmp && apt-get download fortunes && dpkg-deb -x fortunes_*.deb /tmp/fortunes_x
    python data/make_fortune_topics.py /tmp/fortunes_x/usr/share/games/fortunes

The output is deterministic for a given package version (see data/README.md for the one used).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

TOPICS = ("computers", "food", "law", "love", "politics", "science")
MIN_CHARS, MAX_CHARS = 20, 300
TEST_FRACTION = 0.25
SEED = 0

# Words that mark an entry as crude, sexual, violent or a slur, case-insensitive: stems match any word that starts
# with them, words match whole. Deliberately broad: losing a harmless entry costs little, keeping an offensive
# one in a demo costs more.
_STEMS = (
    "fuck shit cunt penis vagin pussy whore slut bitch bastard rapist orgasm erotic porn masturbat condom "
    "prostitut nigger faggot retard suicid murder nazi hitler vomit puke homosexual sexual genital"
)
_WORDS = (
    "ass asses arse piss pissed hell damn damned crap crappy cock cocks dick dicks tit tits boob boobs nude nudes "
    "naked breast breasts sex sexy gay gays lesbian lesbians queer fag fags kill kills killed killing killer rape "
    "raped rapes raping jew jews jewish negro negroes spic spics kike kikes chink chinks drunk drunken virgin "
    "virgins bimbo bimbos"
)
OFFENSIVE = re.compile(
    r"\b(?:(?:" + "|".join(_STEMS.split()) + r")\w*|(?:" + "|".join(_WORDS.split()) + r"))\b", re.IGNORECASE
)
ATTRIBUTION = re.compile(r"^\s*--\s")  # "\t\t-- Author, Work": the source of a quotation, not its text


def is_ascii_art(raw: str) -> bool:
    """Pictures and tables: few letters among the visible characters, or long runs of one symbol."""
    visible = [c for c in raw if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters < 0.7 * len(visible) or re.search(r"([^\w\s])\1{3,}", raw) is not None


def read_entries(path: Path) -> list[str]:
    """The file's entries as single-line texts, attribution lines removed and whitespace collapsed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = []
    for raw in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
        if not raw.strip() or is_ascii_art(raw):
            continue
        body = "\n".join(line for line in raw.splitlines() if not ATTRIBUTION.match(line))
        entries.append(" ".join(body.split()))
    return entries


def build(fortune_dir: Path) -> list[dict]:
    seen: set[str] = set()
    per_topic: dict[str, list[str]] = {}
    for topic in TOPICS:
        kept = []
        for entry in read_entries(fortune_dir / topic):
            key = re.sub(r"\W+", " ", entry.lower()).strip()
            if not MIN_CHARS <= len(entry) <= MAX_CHARS or OFFENSIVE.search(entry) or "\ufffd" in entry:
                continue
            if key in seen:  # also across topics: an entry filed under two topics has no single label
                continue
            seen.add(key)
            kept.append(entry)
        per_topic[topic] = kept

    rng = random.Random(SEED)
    per_class = min(len(kept) for kept in per_topic.values())
    rows = []
    for topic in TOPICS:
        chosen = rng.sample(per_topic[topic], per_class)  # a seeded sample, capping the larger classes
        n_test = round(TEST_FRACTION * per_class)
        rows += [{"text": t, "label": topic, "split": "test" if i < n_test else "train"} for i, t in enumerate(chosen)]
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fortune_dir", type=Path, help="directory holding the fortune files (usr/share/games/fortunes)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("fortune_topics.jsonl"))
    args = parser.parse_args()

    rows = build(args.fortune_dir)
    with args.output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    counts = collections.Counter((row["label"], row["split"]) for row in rows)
    print(f"wrote {len(rows)} rows to {args.output} ({args.output.stat().st_size:,} bytes)")
    print(f"{'label':<10} {'train':>5} {'test':>5}")
    for topic in TOPICS:
        print(f"{topic:<10} {counts[topic, 'train']:>5} {counts[topic, 'test']:>5}")


if __name__ == "__main__":
    main()
