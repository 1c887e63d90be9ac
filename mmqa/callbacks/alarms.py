"""Alarms over training statistics: each series (one layer's entropy, one group's gradient norm, one
block's activation RMS) is fed value by value, and an `Alarm` is returned when it enters a bad state:

- collapse: a layer's mean attention entropy falls below `collapse_fraction` x its early value (the
  mean of its first `baseline_probes` values: near 1 at initialisation);
- spike: a gradient norm exceeds `spike_factor` x the median of its last `spike_window` values (once
  at least `min_history` are known, counted from step `spike_warmup_steps`);
- activation: a block's output RMS exceeds `max_activation_rms`;
- non_finite: any statistic is NaN or infinite (reported, never raised).

Gradient norms before `spike_warmup_steps` are not judged: in a healthy default run they rise
ten-fold in the first ~60 steps, which is learning, not failure. Entropies fall from uniform as
attention learns where to look, to about 0.4 of their initial value at the lowest in a healthy run,
so the collapse bound sits below that (docs/diagnostics.md has the measurements).
An alarm fires when its series enters the bad state and re-arms when it leaves, so a collapsed layer
is reported once, not at every probe. The state is a plain dict (saved in checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

KINDS = ("collapse", "spike", "activation", "non_finite")


@dataclasses.dataclass
class Alarm:
    kind: str  # one of KINDS
    where: str  # the series: "image/blocks.1/self", "fusion/text_blocks.0/ffn_out", ...
    step: int
    value: float
    reference: float  # the bound it crossed (NaN for non_finite)

    def message(self) -> str:
        what = {
            "collapse": f"attention entropy {self.value:.3f} fell below {self.reference:.3f} (collapse)",
            "spike": f"gradient norm {self.value:.4g} jumped past {self.reference:.4g} (spike)",
            "activation": f"activation RMS {self.value:.4g} grew past {self.reference:.4g}",
            "non_finite": f"a statistic is {self.value} (non-finite)",
        }[self.kind]
        return f"diagnostics alarm at step {self.step}: {self.where}: {what}"


def check_range(key: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    """Raise ValueError naming the config key unless low <= value <= high (low < value when low_open)."""
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:  # NaN compares false, so it fails too
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"callbacks.diagnostics.{key} must be {bound}; got {value}")


class Alarms:
    def __init__(self, spike_warmup_steps: int, collapse_fraction: float, baseline_probes: int, spike_factor: float,
                 spike_window: int, min_history: int, max_activation_rms: float):
        check_range("spike_warmup_steps", spike_warmup_steps, 0)
        check_range("collapse_fraction", collapse_fraction, 0.0, 1.0, low_open=True)
        check_range("baseline_probes", baseline_probes, 1)
        check_range("spike_factor", spike_factor, 1.0, low_open=True)
        check_range("min_history", min_history, 1)
        check_range("spike_window", spike_window, min_history)
        check_range("max_activation_rms", max_activation_rms, 0.0, low_open=True)
        self.spike_warmup_steps = spike_warmup_steps
        self.collapse_fraction, self.baseline_probes = collapse_fraction, baseline_probes
        self.spike_factor, self.spike_window, self.min_history = spike_factor, spike_window, min_history
        self.max_activation_rms = max_activation_rms
        self.state: dict = {"early": {}, "recent": {}, "raised": {}}  # per series: early values, recent values, in alarm

    def _edge(self, kind: str, where: str, bad: bool, step: int, value: float, reference: float) -> Alarm | None:
        key = f"{kind}:{where}"
        was = self.state["raised"].get(key, False)
        self.state["raised"][key] = bad
        return Alarm(kind, where, step, value, reference) if bad and not was else None

    def _finite(self, where: str, step: int, value: float) -> Alarm | None:
        return self._edge("non_finite", where, not math.isfinite(value), step, value, math.nan)

    def entropy(self, where: str, step: int, value: float) -> Alarm | None:
        if not math.isfinite(value):
            return self._finite(where, step, value)
        early = self.state["early"].setdefault(where, [])
        if len(early) < self.baseline_probes:
            early.append(value)
            return None
        bound = self.collapse_fraction * statistics.fmean(early)
        return self._edge("collapse", where, value < bound, step, value, bound)

    def grad_norm(self, where: str, step: int, value: float) -> Alarm | None:
        if not math.isfinite(value) or step < self.spike_warmup_steps:
            return self._finite(where, step, value)
        recent = self.state["recent"].setdefault(where, [])
        alarm = None
        if len(recent) >= self.min_history:
            bound = self.spike_factor * statistics.median(recent)
            alarm = self._edge("spike", where, value > bound, step, value, bound)
        recent.append(value)
        del recent[: -self.spike_window]
        return alarm

    def activation(self, where: str, step: int, value: float) -> Alarm | None:
        if not math.isfinite(value):
            return self._finite(where, step, value)
        return self._edge("activation", where, value > self.max_activation_rms, step, value, self.max_activation_rms)
