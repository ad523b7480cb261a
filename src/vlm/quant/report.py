"""The quantization report: per-layer errors along the model's depth, the decisions, weight
memory, and fidelity; written as ``quant_report.json`` and ``quant_report.png``, shown as a table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fidelity import Fidelity
from .formats import weight_bytes
from .memory import GIB, WeightMemory, human_bytes
from .policies import ModelParts, Policy, QuantPlan, always_kept
from .sensitivity import LayerError

PART_COLOURS = {
    "vision": "tab:blue",
    "projector": "tab:orange",
    "cross_attention_out": "tab:red",
    "language": "tab:green",
}
TABLE_COLUMNS = ("layer", "part", "shape", "weight err", "output err", "KL", "extra MiB", "kept")


@dataclass
class QuantReport:
    model: str
    method: str
    double_quant: bool
    policy: Policy
    plan: QuantPlan
    parts: ModelParts
    memory: WeightMemory
    layers: list[LayerError] | None = None  # None when nothing was measured
    budget_bytes: int | None = None  # the dynamic policy's budget
    fidelity: dict[str, Fidelity] = field(default_factory=dict)  # label → fidelity vs 16-bit
    calibration: dict[str, Any] = field(default_factory=dict)
    loaded_bytes: int | None = None  # counted on the loaded model

    # ---- contents ------------------------------------------------------------------------------
    def reason(self, name: str) -> str:
        """Why a layer is stored as it is: ``quantized``, or why it stays in 16-bit."""
        if name not in set(self.plan.kept):
            return "quantized"
        if self.method == "none":
            return "no quantization"
        if always_kept(name):
            return "always kept"
        if self.policy == Policy.DYNAMIC:
            return "calibrated"
        if self.policy == Policy.EXPLICIT:
            return "explicit"
        return f"{self.policy}: {self.parts.part_of(name)}"

    def layer_rows(self) -> list[dict[str, Any]]:
        measured = {layer.name: layer for layer in self.layers or []}
        names = [layer.name for layer in self.layers] if self.layers else [*self.plan.quantized, *self.plan.kept]
        rows = []
        for name in names:
            layer = measured.get(name)
            rows.append(
                {
                    "name": name,
                    "part": self.parts.part_of(name),
                    "shape": list(layer.shape) if layer else None,
                    "order": layer.order if layer else None,
                    "weight_error": layer.weight_error if layer else None,
                    "output_error": layer.output_error if layer else None,
                    "kl": layer.kl if layer else None,
                    "kept_in_16bit": name in set(self.plan.kept),
                    "decision": self.reason(name),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        memory = self.memory.as_dict()
        if self.loaded_bytes is not None:
            memory["loaded_bytes"] = self.loaded_bytes
            memory["loaded_gib"] = self.loaded_bytes / GIB
        return {
            "model": self.model,
            "method": self.method,
            "double_quant": self.double_quant,
            "policy": self.policy,
            "budget_bytes": self.budget_bytes,
            "quantized_layers": len(self.plan.quantized),
            "kept_in_16bit": list(self.plan.kept),
            "memory": memory,
            "fidelity": {label: f.as_dict() for label, f in self.fidelity.items()},
            "calibration": self.calibration,
            "layers": self.layer_rows(),
        }

    # ---- outputs -------------------------------------------------------------------------------
    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """``quant_report.json`` and ``quant_report.png`` in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / "quant_report.json"
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        png_path = directory / "quant_report.png"
        self.plot(png_path)
        return json_path, png_path

    def top_rows(self, n: int) -> list[tuple[str, ...]]:
        """The ``n`` layers with the largest output error (weight error where not reached), as table cells."""
        shapes = {layer.name: layer.shape for layer in self.layers or []}
        rows = [r for r in self.layer_rows() if r["weight_error"] is not None]
        rows.sort(key=lambda r: (-(r["output_error"] or 0.0), -(r["weight_error"] or 0.0), r["name"]))
        return [
            (
                r["name"],
                r["part"],
                "×".join(map(str, shapes[r["name"]])),
                _fmt(r["weight_error"]),
                _fmt(r["output_error"]),
                _fmt(r["kl"]),
                f"{_extra_bytes(shapes[r['name']], self.method, self.double_quant) / 1024**2:.3f}",
                "16-bit" if r["kept_in_16bit"] else "",
            )
            for r in rows[:n]
        ]

    def summary_lines(self) -> list[str]:
        m = self.memory
        lines = [
            f"{self.model}: policy {self.policy} ({self.method}), {len(self.plan.quantized)} layers quantized, "
            f"{len(self.plan.kept)} kept in 16-bit",
            f"weight memory: 16-bit {human_bytes(m.all_16bit)}, all-4-bit {human_bytes(m.all_4bit)}, "
            f"this policy {human_bytes(m.planned)} ({m.extra_over_all_4bit / m.all_4bit:+.1%}, "
            f"{human_bytes(m.extra_over_all_4bit)})",
        ]
        for label, f in self.fidelity.items():
            lines.append(f"fidelity {label}: KL {f.kl:.4g} nats/token, top-1 agreement {f.top1_agreement:.2%}")
        return lines

    def print(self, top: int = 15, console: Any = None) -> None:
        """The summary and a table of the most sensitive layers, in the terminal."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console(stderr=True)
            if not console.is_terminal:  # a log file: room for full module names
                console = Console(stderr=True, width=180)
        for line in self.summary_lines():
            console.print(line, highlight=False)
        if not self.layers:
            return
        with_kl = any(layer.kl is not None for layer in self.layers)
        columns = [c for c in TABLE_COLUMNS if with_kl or c != "KL"]
        table = Table(title=f"the {top} layers most hurt by {self.method}", title_justify="left")
        for column in columns:
            left = column in ("layer", "part", "kept")
            table.add_column(column, justify="left" if left else "right", overflow="fold", no_wrap=column != "layer")
        for row in self.top_rows(top):
            table.add_row(*(cell for column, cell in zip(TABLE_COLUMNS, row) if column in columns))
        console.print(table)

    def plot(self, path: str | Path) -> None:
        """Per-layer errors along the depth of the model ("spikes"), coloured by part, kept layers
        ringed, beside the weight memory; the memory alone when nothing was measured."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.layer_rows() if r["weight_error"] is not None]
        if not rows:
            figure, axis = plt.subplots(figsize=(7, 4))
            self._plot_memory(axis)
            figure.suptitle("\n".join(self.summary_lines()[:1]), fontsize=9)
            figure.tight_layout()
            figure.savefig(path, dpi=110)
            plt.close(figure)
            return
        figure = plt.figure(figsize=(15, 7))
        grid = figure.add_gridspec(2, 5)
        axes = [figure.add_subplot(grid[0, :4])]
        axes.append(figure.add_subplot(grid[1, :4], sharex=axes[0]))
        self._plot_memory(figure.add_subplot(grid[:, 4]))
        for axis, key, label in (
            (axes[0], "output_error", "relative output error"),
            (axes[1], "weight_error", "relative weight error"),
        ):
            for part, colour in PART_COLOURS.items():
                points = [(i, r[key]) for i, r in enumerate(rows) if r["part"] == part and r[key]]
                if points:
                    axis.scatter(*zip(*points), s=9, color=colour, label=part)
            kept = [(i, r[key]) for i, r in enumerate(rows) if r["kept_in_16bit"] and r[key]]
            if kept:
                axis.scatter(*zip(*kept), s=60, facecolors="none", edgecolors="black", label="kept in 16-bit")
            axis.set_yscale("log")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
        axes[0].legend(loc="upper right", fontsize=8, ncol=5)
        axes[1].set_xlabel("linear layers in execution order (depth)")
        figure.suptitle("\n".join(self.summary_lines()[:4]), fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)

    def _plot_memory(self, axis: Any) -> None:
        m = self.memory
        labels = ["16-bit", "all 4-bit", self.policy]
        values = [m.all_16bit / GIB, m.all_4bit / GIB, m.planned / GIB]
        bars = axis.bar(labels, values, color=["tab:gray", "tab:blue", "tab:orange"])
        for bar, value in zip(bars, (m.all_16bit, m.all_4bit, m.planned)):
            axis.annotate(human_bytes(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axis.set_ylabel("weight memory (GiB)")
        axis.tick_params(axis="x", labelrotation=20)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _extra_bytes(shape: Sequence[int], method: str, double_quant: bool) -> int:
    stored = weight_bytes(tuple(shape), method if method != "none" else "nf4", double_quant)
    return weight_bytes(tuple(shape), "none") - stored
