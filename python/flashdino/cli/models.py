"""``flashdino models``: every variant name with its architecture and aliases (the table of variants.py).

An unknown ``--model`` shows only the closest names and points here for the full list.
"""

from __future__ import annotations


def format_table() -> str:
    from flashdino.variants import ALIASES, VARIANTS

    aliases: dict = {}
    for alias, target in sorted(ALIASES.items()):
        aliases.setdefault(target, []).append(alias)
    head = ("name", "family", "dim", "depth", "heads", "patch", "ffn", "aliases")
    rows = [(c.name, c.family, str(c.embed_dim), str(c.depth), str(c.num_heads), str(c.patch_size), c.ffn,
             ", ".join(aliases.get(c.name, [])) or "-") for c in VARIANTS.values()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths + [0])).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths + [0])).rstrip() for r in rows]
    return "\n".join(lines)


def run(args) -> int:
    print(format_table())
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list every model name (variant) and alias that --model accepts",
                       description="Every variant name with its architecture and aliases (--model accepts both).")
    m.set_defaults(func=run)
