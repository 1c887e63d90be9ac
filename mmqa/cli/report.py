"""The ablation report: `python -m mmqa report DIR [DIR ...]` reads every run of one or more Hydra
multirun folders and writes, into the first DIR, `report.md` (a table of mean ± std over seeds per
configuration, failed and missing runs, Welch's t-tests between configurations), `report.csv` (the
same table) and two figures, `per_family.png` and `val_curves.png`; for runs trained with
`callbacks=diagnostics`, also whether their alarms fired before the damage, and `diagnostics.png`
(mmqa/cli/report_diagnostics.py).

A run is a sub-folder with `.hydra/config.yaml` and `.hydra/overrides.yaml`; it succeeded when it
wrote `metrics.json` (mmqa/train.py). A configuration is the set of overrides that differ between
runs, `seed` excluded, so the seeds of one configuration form one group whatever was swept.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from mmqa.atomic import write_atomic
from mmqa.errors import MMQAError
from mmqa.figures import new_figure

SEED_KEY = "seed"  # the override that names a repetition, not a configuration
ACC = "test/vqa_acc"
FAMILY_PREFIX = f"{ACC}/"  # test/vqa_acc/<family>
PARAPHRASE_ACC = "test_paraphrase/vqa_acc"  # the test questions reworded (the built-in worlds' test_paraphrase)
OTHER_METRICS = (
    "test/bleu4",
    "test/cider",
    "test/r1_t2i",
    "test/r1_i2t",
    "model/parameters",
    "model/gflops_per_image",
    "train/step_seconds",
    "train/images_per_second",
    "train/fit_seconds",
)
CURVE_X, CURVE_Y = "step", "val/vqa_acc"  # columns of csv/version_0/metrics.csv
CURVES_CSV = Path("csv") / "version_0" / "metrics.csv"
DEFAULT = "(default)"  # the value shown for a key a run did not override


class ReportError(MMQAError, ValueError):
    """A report that cannot be made: the message names the folder or file."""


@dataclass
class Stat:
    mean: float  # NaN without any value
    std: float  # sample standard deviation (ddof=1); NaN with fewer than 2 seeds
    n: int


@dataclass
class Run:
    name: str  # "<DIR>/<sub-folder>", as listed in the report
    path: Path
    job: int | None  # Hydra's job number (the sub-folder's name in a multirun), None for other names
    overrides: dict[str, str]  # key -> value, in command-line order
    metrics: dict[str, float] | None  # None: the run failed (or is still running)


@dataclass
class Group:
    """The runs of one configuration: every seed, failed ones included."""

    id: str  # C1, C2, ... in order of first appearance
    label: str  # the differing overrides, "model/fusion=early"
    settings: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    @property
    def succeeded(self) -> list[Run]:
        return [r for r in self.runs if r.metrics is not None]

    def values(self, key: str) -> list[float]:
        return [r.metrics[key] for r in self.succeeded if key in r.metrics]

    def stat(self, key: str) -> Stat:
        v = self.values(key)
        if not v:
            return Stat(math.nan, math.nan, 0)
        return Stat(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))


@dataclass
class Comparison:
    metric: str
    a: Group
    b: Group
    p: float  # NaN when no test was possible
    verdict: str  # "significant", "not significant", "n/a (1 seed)", "n/a (no seed spread)"


@dataclass
class Report:
    dirs: list[Path]
    groups: list[Group]
    failed: list[Run]
    missing: list[str]  # "<DIR>/<job> (overrides...)" for each job that has no run folder
    metrics: list[str]  # table columns, in order
    comparisons: list[Comparison]
    alpha: float
    notes: list[str]  # things the reader should know (a sweep that could not be expanded, ...)


# ----------------------------------------------------------------------------- reading runs
def parse_overrides(lines: list[str], source: Path) -> dict[str, str]:
    """`["model/fusion=early", "+x=1", "~y"]` -> {"model/fusion": "early", "x": "1", "y": "(deleted)"}."""
    if not isinstance(lines, list):
        raise ReportError(f"{source}: expected a YAML list of overrides, got {type(lines).__name__}")
    out = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        out[key.lstrip("+~")] = value if sep else "(deleted)"
    return out


def read_run(path: Path, name: str) -> Run:
    source = path / ".hydra" / "overrides.yaml"
    try:
        overrides = parse_overrides(yaml.safe_load(source.read_text()) or [], source)
    except yaml.YAMLError as e:
        raise ReportError(f"{source}: not valid YAML ({e})") from e
    metrics = None
    if (path / "metrics.json").is_file():
        try:
            metrics = {k: float(v) for k, v in json.loads((path / "metrics.json").read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise ReportError(f"{path / 'metrics.json'}: not a JSON object of numbers ({e})") from e
    return Run(name, path, int(path.name) if path.name.isdigit() else None, overrides, metrics)


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() and (path / ".hydra" / "overrides.yaml").is_file()


def expected_jobs(sweep_dir: Path) -> tuple[list[list[str]] | None, str | None]:
    """Each job's overrides as the sweep saved in `multirun.yaml` launches them (None if unknown), and
    a note when the file exists but could not be expanded. Hydra's BasicSweeper writes that file; other
    sweepers (Optuna) choose their jobs as they go, so their missing jobs are gaps in 0..max."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None, None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(path).hydra
        sweeper = OmegaConf.to_container(hydra.sweeper, resolve=False)
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None, None
        # as BasicSweeper.sweep does: the config's params first, then the command line's, one product
        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += list(OmegaConf.to_container(hydra.overrides.task, resolve=False))
        return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)[0], None
    except Exception as e:  # noqa: BLE001 - the report still lists every run; it says why it cannot do more
        return None, f"{path}: sweep not expanded ({type(e).__name__}: {e}); missing jobs counted from 0 to the largest job number"


def read_dir(sweep_dir: Path) -> tuple[list[Run], list[str], list[str]]:
    """(runs, missing jobs, notes) of one multirun folder."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such directory")
    runs = [read_run(p, f"{sweep_dir}/{p.name}") for p in sorted(sweep_dir.iterdir(), key=_job_order) if is_run(p)]
    if not runs:
        raise ReportError(
            f"{sweep_dir}: no runs found (a run is a sub-folder with .hydra/config.yaml and .hydra/overrides.yaml)"
        )
    expected, note = expected_jobs(sweep_dir)
    present = {r.job for r in runs if r.job is not None}
    n_jobs = len(expected) if expected is not None else max(present, default=-1) + 1
    missing = []
    for job in range(n_jobs):
        if job not in present:
            what = " ".join(expected[job]) if expected is not None and expected[job] else ""
            missing.append(f"{sweep_dir}/{job}" + (f" ({what})" if what else ""))
    extra = sorted(j for j in present if j >= n_jobs)
    notes = [note] if note else []
    if extra:
        notes.append(f"{sweep_dir}: jobs {extra} are beyond the {n_jobs} jobs of multirun.yaml")
    return runs, missing, notes


def _job_order(p: Path) -> tuple[int, int | str]:
    return (0, int(p.name)) if p.name.isdigit() else (1, p.name)


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per configuration: runs whose overrides differ only in `seed`."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides if k != SEED_KEY))
    differing = [k for k in keys if len({r.overrides.get(k, DEFAULT) for r in runs}) > 1]
    groups: dict[tuple, Group] = {}
    for r in runs:
        settings = {k: r.overrides.get(k, DEFAULT) for k in differing}
        key = tuple(settings.values())
        if key not in groups:
            if differing:
                label = " ".join(f"{k}={v}" for k, v in settings.items())
            else:  # one configuration: name it by what all runs share
                label = " ".join(f"{k}={v}" for k, v in r.overrides.items() if k != SEED_KEY) or "(defaults)"
            groups[key] = Group(f"C{len(groups) + 1}", label, settings)
        groups[key].runs.append(r)
    return list(groups.values())


def compare(metric: str, a: Group, b: Group, alpha: float) -> Comparison:
    """Welch's t-test (unequal variances) of one metric between two configurations' seeds."""
    va, vb = a.values(metric), b.values(metric)
    if len(va) < 2 or len(vb) < 2:
        n = min(len(va), len(vb))
        return Comparison(metric, a, b, math.nan, f"n/a ({n} seed{'' if n == 1 else 's'})")
    if np.var(va) == 0 and np.var(vb) == 0:  # the t statistic is undefined without any spread
        return Comparison(metric, a, b, math.nan, "n/a (no seed spread)")
    p = float(stats.ttest_ind(va, vb, equal_var=False).pvalue)
    return Comparison(metric, a, b, p, "significant" if p < alpha else "not significant")


def build_report(dirs: list[Path], alpha: float) -> Report:
    runs, missing, notes = [], [], []
    for d in dirs:
        r, m, n = read_dir(d)
        runs += r
        missing += m
        notes += n
    groups = group_runs(runs)
    present = {k for r in runs if r.metrics for k in r.metrics}
    families = sorted(k for k in present if k.startswith(FAMILY_PREFIX))
    metrics = [ACC, *families, *([PARAPHRASE_ACC] if PARAPHRASE_ACC in present else []), *OTHER_METRICS]
    tested = [m for m in (ACC, *families, PARAPHRASE_ACC) if m in present]
    comparisons = [compare(m, a, b, alpha) for m in tested for a, b in combinations(groups, 2)]
    failed = [r for r in runs if r.metrics is None]
    return Report(dirs, groups, failed, missing, metrics, comparisons, alpha, notes)


# ----------------------------------------------------------------------------- writing
def fmt(s: Stat, seeds: int) -> str:
    if s.n == 0:
        return "–"
    digits = 0 if abs(s.mean) >= 1000 else 1 if abs(s.mean) >= 10 else 3
    text = f"{s.mean:,.{digits}f}" + ("" if math.isnan(s.std) else f" ± {s.std:,.{digits}f}")
    return text + (f" (n={s.n})" if s.n != seeds else "")


def _num(x: float, spec: str) -> str:
    return "–" if math.isnan(x) else format(x, spec)


def _ordered(c: Comparison) -> tuple[Group, Group]:
    """(higher, lower) by the compared metric's mean."""
    return (c.b, c.a) if c.b.stat(c.metric).mean > c.a.stat(c.metric).mean else (c.a, c.b)


def render_markdown(rep: Report) -> str:
    n_ok = sum(len(g.succeeded) for g in rep.groups)
    out = [
        "# Ablation report",
        "",
        "Runs from " + ", ".join(f"`{d}`" for d in rep.dirs)
        + f": {n_ok} succeeded, {len(rep.failed)} failed, {len(rep.missing)} missing.",
        "",
        "## Results",
        "",
        "Mean ± sample standard deviation over seeds; `seeds` counts the runs that wrote metrics.json "
        "(a cell that averages fewer says `n=`).",
        "",
    ]
    cols = ["id", "configuration", "seeds", "failed", *rep.metrics]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in rep.groups:
        seeds = len(g.succeeded)
        cells = [g.id, g.label, str(seeds), str(len(g.runs) - seeds)]
        out.append("| " + " | ".join(cells + [fmt(g.stat(m), seeds) for m in rep.metrics]) + " |")

    out += ["", "## Failed and missing runs", ""]
    if not rep.failed and not rep.missing:
        out.append("None: every job of the sweep wrote metrics.json.")
    for r in rep.failed:
        out.append(f"- failed (no metrics.json; crashed or still running): `{r.name}` "
                   f"({' '.join(f'{k}={v}' for k, v in r.overrides.items()) or 'no overrides'})")
    for m in rep.missing:
        out.append(f"- missing (no run folder): `{m}`")
    out += [f"- note: {n}" for n in rep.notes]

    out += [
        "",
        "## Significance",
        "",
        f"Welch's t-test (unequal variances) over seeds for each pair of configurations; a difference "
        f"counts when p < {rep.alpha} (no correction for the number of comparisons).",
    ]
    for metric in dict.fromkeys(c.metric for c in rep.comparisons):
        rows = [c for c in rep.comparisons if c.metric == metric]
        out += ["", f"### {metric}", "", "| A | B | mean A | mean B | B − A | p | verdict |", "|---|---|---|---|---|---|---|"]
        for c in rows:
            ma, mb = c.a.stat(metric).mean, c.b.stat(metric).mean
            cells = [_num(ma, ".3f"), _num(mb, ".3f"), _num(mb - ma, "+.3f"), _num(c.p, ".3g")]
            out.append(f"| {c.a.id} | {c.b.id} | " + " | ".join(cells) + f" | {c.verdict} |")
        sig = [_ordered(c) for c in rows if c.verdict == "significant"]
        out.append("")
        out.append(
            "Beyond the seed spread: " + ", ".join(f"{hi.id} > {lo.id}" for hi, lo in sig) + "."
            if sig else "No difference exceeds the seed spread."
        )
    if not rep.comparisons:
        out += ["", "No pairs to compare (one configuration, or no VQA accuracy in metrics.json)."]

    no_curve = [r.name for g in rep.groups for r in g.runs if not (r.path / CURVES_CSV).is_file()]
    out += ["", "## Figures", "", "![per-family test accuracy](per_family.png)", "",
            "![validation accuracy](val_curves.png)"]
    if no_curve:
        out += ["", f"Runs without `{CURVES_CSV.as_posix()}` (not in the curves): " + ", ".join(no_curve)]
    from mmqa.cli import report_diagnostics  # imported here: it reads curves with this module's read_curve

    if report_diagnostics.has_diagnostics(rep.groups):
        out += report_diagnostics.render(rep.groups)
    return "\n".join(out) + "\n"


def render_csv(rep: Report) -> str:
    keys = list(dict.fromkeys(k for g in rep.groups for k in g.settings))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["id", "configuration", *keys, "seeds", "failed",
                *[f"{m} {s}" for m in rep.metrics for s in ("mean", "std", "n")]])
    for g in rep.groups:
        row = [g.id, g.label, *[g.settings.get(k, "") for k in keys], len(g.succeeded), len(g.runs) - len(g.succeeded)]
        for m in rep.metrics:
            s = g.stat(m)
            row += ["" if math.isnan(s.mean) else repr(s.mean), "" if math.isnan(s.std) else repr(s.std), s.n]
        w.writerow(row)
    return f.getvalue()


def plot_per_family(rep: Report, f) -> None:
    """Grouped bars: overall and per-family test accuracy, one bar per configuration, std error bars."""
    columns = [m for m in rep.metrics if m == ACC or m.startswith(FAMILY_PREFIX)]
    names = ["overall" if m == ACC else m[len(FAMILY_PREFIX):] for m in columns]
    fig = new_figure(max(6.0, 2.0 + 0.5 * len(columns) * len(rep.groups)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rep.groups))
    x = np.arange(len(columns))
    for i, g in enumerate(rep.groups):
        st = [g.stat(m) for m in columns]
        ax.bar(x + (i - (len(rep.groups) - 1) / 2) * width, [s.mean for s in st], width,
               yerr=[0.0 if math.isnan(s.std) else s.std for s in st], capsize=3, label=f"{g.id}: {g.label}")
    ax.set_xticks(x, names)
    ax.set_ylabel("test VQA accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Test accuracy per question family (mean ± std over seeds)")
    ax.legend(fontsize="small")
    fig.savefig(f, format="png", dpi=100)


def read_curve(run: Run) -> tuple[list[int], list[float]]:
    """(steps, val/vqa_acc) of the epochs a run validated; empty when it logged none."""
    path = run.path / CURVES_CSV
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if CURVE_X not in (reader.fieldnames or []):
            raise ReportError(f"{path}: no '{CURVE_X}' column (columns: {reader.fieldnames})")
        rows = [(int(float(r[CURVE_X])), float(r[CURVE_Y])) for r in reader if r.get(CURVE_Y)]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_val_curves(rep: Report, f) -> None:
    """val/vqa_acc over training steps for every run, one colour per configuration; failed runs dashed."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(rep.groups))]
    for g, colour in zip(rep.groups, colours):
        labelled = False
        for r in g.runs:
            if not (r.path / CURVES_CSV).is_file():
                continue
            steps, acc = read_curve(r)
            if steps:
                ax.plot(steps, acc, color=colour, marker="o", markersize=3, alpha=0.8,
                        linestyle="-" if r.metrics is not None else "--",
                        label=None if labelled else f"{g.id}: {g.label}")
                labelled = True
    ax.set_xlabel("training step")
    ax.set_ylabel(CURVE_Y)
    ax.set_title("Validation VQA accuracy, every run (dashed: failed)")
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize="small")
    fig.savefig(f, format="png", dpi=100)


def write_report(rep: Report, out_dir: Path) -> list[Path]:
    outputs = [out_dir / n for n in ("report.md", "report.csv", "per_family.png", "val_curves.png")]
    # render everything before writing anything: a run that cannot be read leaves the old report whole
    contents = [render_markdown(rep), render_csv(rep)]
    from mmqa.cli import report_diagnostics

    plots = [plot_per_family, plot_val_curves]
    if report_diagnostics.has_diagnostics(rep.groups):
        outputs.append(out_dir / "diagnostics.png")
        plots.append(lambda rep, f: report_diagnostics.plot(rep.groups, f))
    for plot in plots:
        png = io.BytesIO()
        plot(rep, png)
        contents.append(png.getvalue())
    for path, data in zip(outputs, contents):
        write_atomic(path, data)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmqa report",
        description="Summarise the runs of Hydra multirun folders: mean ± std over seeds per configuration, "
        "failed and missing runs, Welch's t-tests, figures. Writes report.md, report.csv, per_family.png "
        "and val_curves.png into the first DIR.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a multirun folder (multirun/<...>)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the t-tests (default 0.05)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    try:
        rep = build_report(args.dirs, args.alpha)
        outputs = write_report(rep, args.dirs[0])
    except ReportError as e:
        parser.error(str(e))  # exit code 2, the message names the folder or file
    for p in outputs:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
