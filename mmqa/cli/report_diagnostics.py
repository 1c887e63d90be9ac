"""The diagnostics part of `python -m mmqa report`, for runs trained with `callbacks=diagnostics`
(each with `diagnostics/diagnostics.csv` and `alarms.csv`): did the alarm fire before the damage?

- The reference is the configuration with the best mean last validation accuracy (a healthy run).
- A run's **break** is the first of: the step it stopped at without metrics.json (a non-finite loss
  stops training), or the first validation at which its val/vqa_acc is more than `BREAK_MARGIN` below
  the reference's mean at the same step. A run that never breaks is "healthy".
- Its **warning** is break step − first alarm step: positive when the alarm came first.

`diagnostics.png` draws, per run (one colour per configuration): the lowest mean attention entropy over
the model's attention sites, the largest gradient norm over its stacks, and val/vqa_acc, over steps.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmqa.callbacks.diagnostics_plots import HEAD
from mmqa.cli.report import CURVES_CSV, read_curve
from mmqa.figures import new_figure

DIAG_CSV = Path("diagnostics") / "diagnostics.csv"
ALARMS_CSV = Path("diagnostics") / "alarms.csv"
BREAK_MARGIN = 0.05  # val/vqa_acc this far below the reference's counts as damage


@dataclass
class Diagnosis:
    name: str
    group: str  # the configuration's id
    first_alarm: tuple[int, str, str] | None  # (step, kind, where)
    alarms: int
    break_step: int | None
    why: str  # what broke

    @property
    def warning(self) -> int | None:
        if self.break_step is None or self.first_alarm is None:
            return None
        return self.break_step - self.first_alarm[0]


def has_diagnostics(groups) -> bool:
    return any((r.path / DIAG_CSV).is_file() for g in groups for r in g.runs)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def val_curve(run) -> dict[int, float]:
    """{step: val/vqa_acc} of the run's validations (the report's own curve reader), {} without a log."""
    return dict(zip(*read_curve(run))) if (run.path / CURVES_CSV).is_file() else {}


def last_step(run) -> int | None:
    path = run.path / CURVES_CSV
    steps = [int(float(r["step"])) for r in _rows(path) if r.get("step")] if path.is_file() else []
    return max(steps, default=None)


def stat_curves(run) -> dict[str, tuple[list[int], list[float]]]:
    """{"entropy": lowest site mean entropy per probe, "grad_norm": largest stack gradient norm per probe}."""
    path = run.path / DIAG_CSV
    if not path.is_file():
        return {}
    low: dict[int, float] = {}
    high: dict[int, float] = {}
    for r in _rows(path):
        step, key, value = int(r["step"]), r["key"], float(r["value"])
        if key.startswith("diag/entropy/") and not HEAD.search(key) and math.isfinite(value):
            low[step] = min(low.get(step, math.inf), value)
        elif key.startswith("diag/grad_norm/") and key.count("/") == 2 and math.isfinite(value):
            high[step] = max(high.get(step, 0.0), value)
    return {name: (sorted(d), [d[s] for s in sorted(d)]) for name, d in (("entropy", low), ("grad_norm", high))}


def reference_group(groups):
    def last_val(g) -> float:
        finals = [c[max(c)] for c in (val_curve(r) for r in g.runs) if c]
        return float(np.mean(finals)) if finals else -math.inf
    return max(groups, key=last_val)


def diagnose(groups) -> tuple[object, list[Diagnosis]]:
    reference = reference_group(groups)
    ref_curves = [val_curve(r) for r in reference.runs]
    out = []
    for g in groups:
        for run in g.runs:
            alarms = _rows(run.path / ALARMS_CSV) if (run.path / ALARMS_CSV).is_file() else []
            first = min(((int(a["step"]), a["kind"], a["where"]) for a in alarms), default=None)
            breaks, last = [], last_step(run)
            if run.metrics is None and last is not None:
                breaks.append((last, "stopped (no metrics.json)"))
            for step, acc in sorted(val_curve(run).items()):
                ref = [c[step] for c in ref_curves if step in c]
                if ref and acc < np.mean(ref) - BREAK_MARGIN:
                    breaks.append((step, f"val/vqa_acc {acc:.3f} < reference {np.mean(ref):.3f} - {BREAK_MARGIN}"))
                    break
            step, why = min(breaks) if breaks else (None, "healthy")
            if run.metrics is None and last is None:
                why = "no training logged"
            out.append(Diagnosis(run.name, g.id, first, len(alarms), step, why))
    return reference, out


def render(groups) -> list[str]:
    reference, diagnoses = diagnose(groups)
    out = ["", "## Diagnostics: alarms against damage", "",
           f"Reference (best last validation accuracy): {reference.id} ({reference.label}). A run breaks when it "
           f"stops without metrics.json or its val/vqa_acc falls {BREAK_MARGIN} below the reference's at the same "
           "step; warning = break step − first alarm step (positive: the alarm came first).", "",
           "| run | config | alarms | first alarm (step: kind, where) | break step | warning (steps) | what broke |",
           "|---|---|---|---|---|---|---|"]
    for d in diagnoses:
        first = f"{d.first_alarm[0]}: {d.first_alarm[1]}, {d.first_alarm[2]}" if d.first_alarm else "–"
        cells = [d.name, d.group, str(d.alarms), first, "–" if d.break_step is None else str(d.break_step),
                 "–" if d.warning is None else f"{d.warning:+d}", d.why]
        out.append("| " + " | ".join(cells) + " |")
    broke = [d for d in diagnoses if d.break_step is not None]
    warned = [d for d in broke if d.warning is not None and d.warning > 0]
    false = [d for d in diagnoses if d.break_step is None and d.alarms]
    out += ["", f"Of {len(broke)} runs that broke, the alarm fired first in {len(warned)}"
            + (f" (median warning {int(np.median([d.warning for d in warned]))} steps)" if warned else "")
            + f"; {len(false)} healthy run(s) raised an alarm.", "", "![diagnostics](diagnostics.png)"]
    return out


def plot(groups, f) -> None:
    fig = new_figure(15.0, 4.2)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for i, g in enumerate(groups):
        colour = f"C{i % 10}"
        for j, run in enumerate(g.runs):
            label = f"{g.id}: {g.label}" if j == 0 else None
            curves = stat_curves(run)
            for ax, name in zip(axes[:2], ("entropy", "grad_norm")):
                if name in curves:
                    ax.plot(*curves[name], color=colour, alpha=0.8, label=label)
            val = val_curve(run)
            if val:
                axes[2].plot(sorted(val), [val[s] for s in sorted(val)], color=colour, marker="o", markersize=3,
                             alpha=0.8, label=label)
    titles = ("lowest mean attention entropy over sites", "largest gradient norm over stacks", "val/vqa_acc")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("training step")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize="small")
    fig.savefig(f, format="png", dpi=100)
