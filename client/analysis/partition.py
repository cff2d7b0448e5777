"""Split a codebase's files into parts, one Claude Code job each.

Every strategy is deterministic (paths are sorted first), puts every file in exactly one part
and makes no empty part. `directory`, the default, keeps module boundaries, counting files
recursively and working bottom-up:

- a directory whose whole subtree holds min_files to max_files files is one part, named after it;
- a bigger directory leaves its subdirectories to make their own parts, then pools its own files
  with those of subdirectories too small for a part (under min_files in all) and cuts the pool
  into balanced consecutive pieces of at most max_files (`src (1/3)`, `src (2/3)`...);
- a pool under min_files joins the smallest part made inside the same directory (`src/a + src`),
  which is halved if that takes it past max_files, so loose files never leave their directory;
- a repository of at most max_files files is one part.

So every part has min_files to max_files files whenever min_files <= max_files / 2 and the
repository has at least min_files files. `size` balances bytes, `type` groups by language,
`equal` cuts the sorted paths into equal runs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

from client.analysis.files import AnalysisError, SourceFile

Strategy = Literal["directory", "size", "type", "equal"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ROOT_NAME = "(root)"
"""The name of a part holding the files of the repository's top directory."""
MIXED_NAME = "mixed"
"""The `type` strategy's part for languages with too few files for a part of their own."""
MARKDOWN_LIMIT = 18_000
"""Temporal's Web UI shows details up to about 20 KB; the plan stays below."""

_Group = tuple[str, list[str]]


class Part(BaseModel):
    """One chunk of the codebase: the files one job reviews."""

    model_config = ConfigDict(extra="forbid")

    name: str
    files: list[str]
    bytes: int


@dataclass
class _Dir:
    """A directory of the file tree: its own files and its subdirectories."""

    files: list[str] = field(default_factory=list)
    subdirs: dict[str, _Dir] = field(default_factory=dict)

    def all_files(self) -> list[str]:
        """Every file of the subtree, sorted."""
        found = list(self.files)
        for sub in self.subdirs.values():
            found += sub.all_files()
        return sorted(found)


def _split(items: list[str], k: int) -> list[list[str]]:
    """`items` cut into k consecutive pieces whose lengths differ by at most one."""
    size, extra = divmod(len(items), k)
    pieces, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        pieces.append(items[start:end])
        start = end
    return [piece for piece in pieces if piece]


def _pieces(name: str, items: list[str], max_files: int) -> list[_Group]:
    """`items` as few balanced consecutive groups of at most max_files, named `name (i/k)`."""
    pieces = _split(items, math.ceil(len(items) / max_files))
    if len(pieces) == 1:
        return [(name, pieces[0])]
    return [(f"{name} ({i}/{len(pieces)})", piece) for i, piece in enumerate(pieces, 1)]


def _absorb(groups: list[_Group], loose: list[str], label: str, max_files: int) -> list[_Group]:
    """Put too few loose files into the smallest group, halving it if it grows past max_files."""
    index = min(range(len(groups)), key=lambda i: (len(groups[i][1]), i))
    name, files = groups[index]
    merged = sorted(files + loose)
    name = f"{name} + {label}"
    replacement = _pieces(name, merged, max_files) if len(merged) > max_files else [(name, merged)]
    return groups[:index] + replacement + groups[index + 1 :]


def _walk(node: _Dir, name: str, min_files: int, max_files: int) -> tuple[list[_Group], list[str]]:
    """The parts of a subtree, and its files left loose for the parent to place."""
    everything = node.all_files()
    if len(everything) <= max_files:
        if len(everything) >= min_files:
            return [(name or ROOT_NAME, everything)], []
        return [], everything
    groups: list[_Group] = []
    loose = list(node.files)
    for sub in sorted(node.subdirs):
        sub_groups, sub_loose = _walk(
            node.subdirs[sub], f"{name}/{sub}" if name else sub, min_files, max_files
        )
        groups += sub_groups
        loose += sub_loose
    loose.sort()
    if len(loose) >= min_files:
        groups += _pieces(name or ROOT_NAME, loose, max_files)
    elif loose:
        # The subtree holds more than max_files files, so its subdirectories made parts.
        groups = _absorb(groups, loose, name or ROOT_NAME, max_files)
    return groups, []


def _by_directory(paths: list[str], min_files: int, max_files: int) -> list[_Group]:
    """Parts that follow the directory tree (the rules are in the module docstring)."""
    root = _Dir()
    for path in paths:
        node = root
        for part in PurePosixPath(path).parts[:-1]:
            node = node.subdirs.setdefault(part, _Dir())
        node.files.append(path)
    name = ""
    while not root.files and len(root.subdirs) == 1:
        sub, root = next(iter(root.subdirs.items()))
        name = f"{name}/{sub}" if name else sub
    groups, loose = _walk(root, name, min_files, max_files)
    return groups + ([(name or ROOT_NAME, loose)] if loose else [])


def _by_size(paths: list[str], sizes: dict[str, int], max_files: int) -> list[_Group]:
    """ceil(n / max_files) parts of near-equal bytes: biggest file first into the lightest part."""
    k = math.ceil(len(paths) / max_files)
    bins: list[list[str]] = [[] for _ in range(k)]
    heap = [(0, 0, i) for i in range(k)]
    for path in sorted(paths, key=lambda p: (-sizes[p], p)):
        load, count, i = heapq.heappop(heap)
        bins[i].append(path)
        if count + 1 < max_files:
            heapq.heappush(heap, (load + sizes[path], count + 1, i))
    ordered = sorted((sorted(files) for files in bins if files), key=lambda files: files[0])
    return _numbered(ordered)


def _by_type(
    paths: list[str], languages: dict[str, str], min_files: int, max_files: int
) -> list[_Group]:
    """A part per language, split past max_files; languages under min_files files share one."""
    by_language: dict[str, list[str]] = {}
    for path in paths:
        by_language.setdefault(languages[path], []).append(path)
    groups: list[_Group] = []
    small: list[str] = []
    few: list[str] = []
    for language in sorted(by_language):
        files = by_language[language]
        if len(files) >= min_files:
            groups += _pieces(language, files, max_files)
        else:
            small.append(language)
            few += files
    if few:
        name = small[0] if len(small) == 1 else MIXED_NAME
        groups += _pieces(name, sorted(few), max_files)
    return groups


def _numbered(pieces: list[list[str]]) -> list[_Group]:
    """Pieces named `part 01`, `part 02`, ... in order."""
    width = max(2, len(str(len(pieces))))
    return [(f"part {i:0{width}d}", piece) for i, piece in enumerate(pieces, 1)]


def _unique(groups: list[_Group]) -> list[_Group]:
    """Groups whose names are made unique with a ` #2`, ` #3`... suffix where they collide."""
    seen: set[str] = set()
    named: list[_Group] = []
    for name, files in groups:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name} #{n}"
        seen.add(candidate)
        named.append((candidate, files))
    return named


def partition(
    files: list[SourceFile],
    strategy: Strategy = "directory",
    *,
    min_files: int = 5,
    max_files: int = 20,
) -> list[Part]:
    """The files split into parts of min_files to max_files files where the strategy allows."""
    if min_files < 1:
        raise AnalysisError(f"min_files must be at least 1, got {min_files}")
    if max_files < min_files:
        raise AnalysisError(f"max_files ({max_files}) must be at least min_files ({min_files})")
    if strategy not in STRATEGIES:
        raise AnalysisError(f"unknown strategy {strategy!r} (use one of {', '.join(STRATEGIES)})")
    sizes: dict[str, int] = {}
    languages: dict[str, str] = {}
    for source in files:
        if source.path in sizes:
            raise AnalysisError(f"the file list names {source.path!r} twice")
        sizes[source.path] = source.size
        languages[source.path] = source.language
    paths = sorted(sizes)
    if not paths:
        return []
    if strategy == "directory":
        groups = _by_directory(paths, min_files, max_files)
    elif strategy == "size":
        groups = _by_size(paths, sizes, max_files)
    elif strategy == "type":
        groups = _by_type(paths, languages, min_files, max_files)
    else:
        groups = _numbered(_split(paths, math.ceil(len(paths) / max_files)))
    return [
        Part(name=name, files=group, bytes=sum(sizes[path] for path in group))
        for name, group in _unique(groups)
    ]


def _printable(text: str) -> str:
    """`text` with control characters (newlines in file names...) shown as `?`."""
    return "".join(c if c.isprintable() else "?" for c in text)


def plan_table(parts: list[Part]) -> list[str]:
    """A plain-text table of the parts (index, name, files, bytes) and a total line."""
    width = 60
    names = [_printable(part.name) for part in parts]
    names = [name if len(name) <= width else name[: width - 1] + "…" for name in names]
    total = f"total: {len(parts)} part{'' if len(parts) == 1 else 's'}"
    name_w = max([len("part"), len(total), *map(len, names)])
    index_w = max(1, len(str(len(parts))))
    rows = [
        (f"{i:>{index_w}}", name, f"{len(part.files):,}", f"{part.bytes:,}")
        for i, (part, name) in enumerate(zip(parts, names, strict=True), 1)
    ]
    files_total = f"{sum(len(part.files) for part in parts):,}"
    bytes_total = f"{sum(part.bytes for part in parts):,}"
    files_w = max([len("files"), len(files_total), *(len(row[2]) for row in rows)])
    bytes_w = max([len("bytes"), len(bytes_total), *(len(row[3]) for row in rows)])

    def line(index: str, name: str, count: str, size: str) -> str:
        return f"{index:>{index_w}}  {name:<{name_w}}  {count:>{files_w}}  {size:>{bytes_w}}"

    return [
        line("#", "part", "files", "bytes"),
        *(line(*row) for row in rows),
        line("", total, files_total, bytes_total),
    ]


def _md_cell(text: str) -> str:
    """`text` as a code span that is safe inside a markdown table cell."""
    return "`" + _printable(text).replace("`", "'").replace("|", "\\|") + "`"


def plan_markdown(parts: list[Part]) -> str:
    """The parts as a markdown table for the Web UI, cut short to stay under MARKDOWN_LIMIT."""
    files_total = sum(len(part.files) for part in parts)
    bytes_total = sum(part.bytes for part in parts)
    lines = ["| # | part | files | bytes |", "|---:|---|---:|---:|"]
    used = sum(len(line) + 1 for line in lines)
    reserve = 200  # the "more parts" row and the total row
    for i, part in enumerate(parts, 1):
        row = f"| {i} | {_md_cell(part.name[:500])} | {len(part.files):,} | {part.bytes:,} |"
        if used + len(row) + 1 + reserve > MARKDOWN_LIMIT:
            rest = parts[i - 1 :]
            lines.append(
                f"| … | {len(rest):,} more parts | {sum(len(p.files) for p in rest):,} "
                f"| {sum(p.bytes for p in rest):,} |"
            )
            break
        lines.append(row)
        used += len(row) + 1
    lines.append(
        f"| | **total: {len(parts):,} part{'' if len(parts) == 1 else 's'}** "
        f"| **{files_total:,}** | **{bytes_total:,}** |"
    )
    return "\n".join(lines)
