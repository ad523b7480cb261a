"""The comparison an evaluation makes: one row per model (the base, then each run), as a terminal
table, as JSON (``eval.json``) and as the scores of one run read back from that JSON.

``eval.json`` holds the whole comparison::

    {"family": ..., "shards": [...], "samples": 64, "skipped": {reason: count},
     "answers": {"judged": true, "why": ..., "median_reference_words": 1.0, "max_new_tokens": 16},
     "rows": [{"name", "kind": "base" | "run", "run_dir", "samples", "tokens", "loss",
               "perplexity", "exact_match", "token_f1", "seconds", "examples": [...]}, ...]}

``loss`` is in nats per supervised token; ``exact_match`` and ``token_f1`` are fractions (0..1),
null where answers were not judged; values that are not finite are written as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm.eval.scoring import ModelScores

EVAL_FILE = "eval.json"
BASE = "base"
RUN = "run"
# The scores of a row, in table order: (key, column title).
SCORE_COLUMNS = (("loss", "loss"), ("perplexity", "perplexity"), ("exact_match", "exact match"), ("token_f1", "token F1"))


@dataclass(frozen=True)
class EvalRow:
    """One model of the comparison: the base of a run (``kind`` "base") or a fine-tuned run ("run")."""

    name: str
    kind: str
    run_dir: str
    scores: ModelScores

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        return {
            "name": self.name, "kind": self.kind, "run_dir": self.run_dir, "samples": s.samples, "tokens": s.tokens,
            "loss": _finite(s.loss), "perplexity": _finite(s.perplexity), "exact_match": _finite(s.exact_match),
            "token_f1": _finite(s.token_f1), "seconds": round(s.seconds, 3),
            "examples": [asdict(example) for example in s.examples],
        }


@dataclass(frozen=True)
class AnswerJudging:
    """Whether answers were judged, and why: ``why`` is the rule's verdict or the flag that decided."""

    judged: bool
    why: str
    median_reference_words: float
    max_new_tokens: int


@dataclass(frozen=True)
class EvalReport:
    family: str
    shards: tuple[str, ...]
    samples: int
    answers: AnswerJudging
    rows: tuple[EvalRow, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "shards": list(self.shards), "samples": self.samples, "skipped": dict(self.skipped),
            "answers": asdict(self.answers), "rows": [row.to_dict() for row in self.rows],
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def row_of(self, run_dir: str | Path) -> EvalRow | None:
        """The row of the run in ``run_dir``, if it is one of the comparison."""
        wanted = str(Path(run_dir).resolve())
        return next((row for row in self.rows if row.kind == RUN and row.run_dir == wanted), None)

    def table(self) -> Any:
        """A rich table: a row per model, columns samples, loss, perplexity, exact match, token F1."""
        from rich.table import Table

        view = Table(title=self.caption(), title_justify="left")
        view.add_column("model")
        view.add_column("samples", justify="right")
        for key, title in SCORE_COLUMNS:
            if key in ("exact_match", "token_f1") and not self.answers.judged:
                continue
            view.add_column(title, justify="right")
        for row in self.rows:
            cells = [row.name, str(row.scores.samples), _number(row.scores.loss), _number(row.scores.perplexity)]
            if self.answers.judged:
                cells += [_percent(row.scores.exact_match), _percent(row.scores.token_f1)]
            view.add_row(*cells, style="dim" if row.kind == BASE else None)
        return view

    def caption(self) -> str:
        shards = f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}"
        skipped = sum(self.skipped.values())
        text = f"{self.family}: {self.samples} samples of {shards}"
        if skipped:
            text += ", skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return text + f"; answers {'judged' if self.answers.judged else 'not judged'} ({self.answers.why})"


def read_eval(path: str | Path) -> dict[str, Any] | None:
    """The comparison written at ``path``; None where there is none or it cannot be read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def run_scores(run_dir: str | Path) -> dict[str, Any] | None:
    """The scores of the run in ``run_dir`` from its ``eval.json`` (its own row of the comparison there), or None.

    The row is found by its ``run_dir``, or, for a directory copied or moved since, by its name.
    """
    run_dir = Path(run_dir)
    data = read_eval(run_dir / EVAL_FILE)
    if data is None:
        return None
    runs = [row for row in data["rows"] if isinstance(row, dict) and row.get("kind") == RUN]
    here = str(run_dir.resolve())
    row = next((r for r in runs if r.get("run_dir") == here), None)
    if row is None:
        named = [r for r in runs if Path(str(r.get("run_dir", ""))).name == run_dir.name]
        row = named[0] if len(named) == 1 else None
    return row


def unique_names(run_dirs: Sequence[Path]) -> list[str]:
    """A short name per run for the table: its directory's name, with parents where two would read alike."""
    names = [path.name for path in run_dirs]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(path.resolve().parts[-depth:]) for path in run_dirs]
    return names


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"
