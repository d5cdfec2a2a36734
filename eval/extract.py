"""Answer extraction and exact match, exactly as lm-evaluation-harness scores GSM8K.

Pure functions on strings, no model. Two filters per task (`tasks.FILTERS`), each a regex and
which match to take (lm-eval's `regex` filter with `group_select`, then `take_first`):
- strict-match: gsm8k the first `#### (\\-?[0-9\\.\\,]+)`; gsm8k_cot the first
  `The answer is (\\-?[0-9\\.\\,]+).`;
- flexible-extract: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (the first non-empty group).
No match gives "[invalid]". `exact_match` then removes `,`, `$`, everything up to `#### ` and a
trailing `.` from both prediction and reference (lm-eval's `regexes_to_ignore`), lower-cases
both (`ignore_case: true`) and compares.
"""

from __future__ import annotations

import re

INVALID = "[invalid]"
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]
SCORES = ("strict-match", "flexible-extract")


def _select(matches: list, index: int) -> str:
    if not matches:
        return INVALID
    m = matches[index]
    if isinstance(m, tuple):
        m = [g for g in m if g]
        if not m:
            return INVALID
        m = m[0]
    return m.strip()


def strict_match(output: str) -> str:
    return _select(STRICT_RE.findall(output), 0)


def flexible_extract(output: str) -> str:
    return _select(FLEXIBLE_RE.findall(output), -1)


def apply_filter(output: str, pattern: str, group_select: int) -> str:
    return _select(re.findall(pattern, output), group_select)


def normalize(text: str) -> str:
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower().strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def score_output(output: str, reference: str, filters: dict | None = None) -> dict:
    """{'strict-match': {'extracted', 'correct'}, 'flexible-extract': {...}} for one output.

    `filters`: {score name: (regex, group_select)}; default the gsm8k task's."""
    filters = filters or {"strict-match": (STRICT_RE.pattern, 0), "flexible-extract": (FLEXIBLE_RE.pattern, -1)}
    out = {}
    for name, (pattern, group) in filters.items():
        ext = apply_filter(output, pattern, group)
        out[name] = {"extracted": ext, "correct": ext != INVALID and exact_match(ext, reference)}
    return out


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop string (how `until` ends a generation)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
