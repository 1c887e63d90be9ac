"""The diagnostics folder a run with `callbacks=diagnostics` ends with:

- `diagnostics.csv`: step, key, value of every statistic logged (the `diag/` keys);
- `alarms.csv`: kind, where, step, value, reference of every alarm raised;
- `entropy_<stack>.png`: a (site x head) x probe-step heatmap of the normalised attention entropy;
- `act_rms.png`, `grad_norm.png`: activation RMS per block and gradient norm per block over steps, one
  panel per stack (FFN output projections dashed);
- `summary.md`: per attention site the entropy at the first and last probe and its minimum, and the alarms.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import re
from pathlib import Path

import numpy as np

from mmqa.atomic import atomic_dir
from mmqa.callbacks.alarms import Alarm
from mmqa.figures import new_figure

Rows = list[tuple[int, str, float]]
HEAD = re.compile(r"/h\d+$")  # a per-head key: ".../self/h3"


def series(rows: Rows, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """{key without `prefix`: (steps, values)} of the rows whose key starts with `prefix`."""
    out: dict[str, tuple[list[int], list[float]]] = collections.defaultdict(lambda: ([], []))
    for step, key, value in rows:
        if key.startswith(prefix):
            steps, values = out[key[len(prefix):]]
            steps.append(step)
            values.append(value)
    return dict(out)


def _csv(header: list[str], rows) -> str:
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
    return f.getvalue()


def entropy_heatmap(rows: Rows, stack: str, f) -> bool:
    """Rows: every head of every site of `stack`; columns: probe steps. False when the stack has none."""
    heads = {k: v for k, v in series(rows, "diag/entropy/").items() if k.startswith(stack + "/") and HEAD.search(k)}
    if not heads:
        return False
    steps = sorted({s for ss, _ in heads.values() for s in ss})
    labels = sorted(heads, key=lambda k: (k.rsplit("/h", 1)[0], int(k.rsplit("/h", 1)[1])))
    grid = np.full((len(labels), len(steps)), np.nan)
    for r, key in enumerate(labels):
        for s, v in zip(*heads[key]):
            grid[r, steps.index(s)] = v
    fig = new_figure(max(6.0, 0.12 * len(steps) + 3), max(3.0, 0.22 * len(labels) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), [k.removeprefix(stack + "/") for k in labels], fontsize=6)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks, [steps[i] for i in ticks])
    ax.set_xlabel("training step")
    ax.set_title(f"{stack}: attention entropy per head (normalised; 1 = uniform, 0 = one key)")
    fig.colorbar(image, ax=ax)
    fig.savefig(f, format="png", dpi=100)
    return True


def curves(rows: Rows, prefix: str, ylabel: str, f) -> bool:
    """One panel per stack: a line per block (`prefix<stack>/<block>`), FFN output projections dashed."""
    found = {k: v for k, v in series(rows, prefix).items() if "/" in k}
    if not found:
        return False
    stacks = sorted({k.split("/")[0] for k in found})
    fig = new_figure(5.0 * len(stacks), 3.8)
    for i, stack in enumerate(stacks):
        ax = fig.add_subplot(1, len(stacks), i + 1)
        for key in sorted(k for k in found if k.startswith(stack + "/")):
            steps, values = found[key]
            ax.plot(steps, values, linestyle="--" if key.endswith("ffn_out") else "-", label=key.removeprefix(stack + "/"))
        ax.set_yscale("log")
        ax.set_title(stack)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    fig.savefig(f, format="png", dpi=100)
    return True


def summary(rows: Rows, alarms: list[Alarm]) -> str:
    means = {k: v for k, v in series(rows, "diag/entropy/").items() if not HEAD.search(k)}
    steps = sorted({s for s, _, _ in rows})
    lines = ["# Training diagnostics", "",
             f"{len(steps)} probes, steps {steps[0] if steps else '-'} to {steps[-1] if steps else '-'}.", "",
             "| attention site | entropy, first probe | last probe | minimum (step) |", "| --- | --- | --- | --- |"]
    for site, (ss, vs) in sorted(means.items()):
        finite = [(v, s) for s, v in zip(ss, vs) if math.isfinite(v)]
        low = min(finite) if finite else (math.nan, -1)
        lines.append(f"| {site} | {vs[0]:.3f} | {vs[-1]:.3f} | {low[0]:.3f} ({low[1]}) |")
    lines += ["", f"## Alarms: {len(alarms)}", ""]
    lines += [f"- {a.message()}" for a in alarms] or ["None."]
    return "\n".join(lines) + "\n"


def write_report(dirpath: Path, rows: Rows, alarms: list[Alarm]) -> None:
    with atomic_dir(dirpath) as tmp:
        (tmp / "diagnostics.csv").write_text(_csv(["step", "key", "value"], rows))
        (tmp / "alarms.csv").write_text(_csv(["kind", "where", "step", "value", "reference"],
                                             [(a.kind, a.where, a.step, a.value, a.reference) for a in alarms]))
        for stack in sorted({k.split("/")[2] for _, k, _ in rows if k.startswith("diag/entropy/")}):
            with (tmp / f"entropy_{stack}.png").open("wb") as f:
                entropy_heatmap(rows, stack, f)
        for name, prefix, label in (("act_rms", "diag/act_rms/", "output RMS"),
                                    ("grad_norm", "diag/grad_norm/", "gradient norm")):
            buffer = io.BytesIO()
            if curves(rows, prefix, label, buffer):
                (tmp / f"{name}.png").write_bytes(buffer.getvalue())
        (tmp / "summary.md").write_text(summary(rows, alarms))
