"""Watch training from the inside: `python train.py callbacks=diagnostics` (conf/callbacks/diagnostics.yaml).

Every `every_n_steps` optimiser steps (and once before the first) the callback runs a fixed probe batch
(the first `probe_size` validation images with their questions and captions) through the model in eval mode without gradients, with every attention
captured (`mmqa.inspect.capture`: the training forward keeps SDPA and is never switched), and records
- per attention site and head: the normalised attention entropy and the max attention logit
  (`diag/entropy/<site>/h<i>`, `diag/max_logit/<site>/h<i>`, and the head mean `diag/entropy/<site>`);
- per block: its output RMS and the fraction of artefact tokens (`diag/act_rms/<block>`,
  `diag/artefacts/<block>`).
Every `grad_every_n_steps` it reads the gradients before the optimiser step (after Lightning's
unscaling, before clipping): the norm per stack, per block and of each block's FFN output projection
on its own (`diag/grad_norm/<stack>[/<block>[/ffn_out]]`), logged at the probe steps.

The probe changes nothing the run computes: eval mode (no dropout, BatchNorm reads its running stats),
no gradients, the RNG forked; a test checks that the losses are bit-identical with and without it.
Alarms (mmqa/callbacks/alarms.py) log a warning naming the site, step and value; at the end of fit the
callback writes `dirpath` (diagnostics.csv, alarms.csv, PNGs, summary.md; mmqa/callbacks/diagnostics_plots.py)
and `run_metrics()` gives train.py the alarm counts for metrics.json.
"""

from __future__ import annotations

import collections
import logging
import re
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader

from mmqa.callbacks.alarms import KINDS, Alarm, Alarms, check_range
from mmqa.inspect.capture import STACKS, AttentionCall, attention_modules, block_of, capture_attention, find_blocks, stack_of
from mmqa.inspect.statistics import activation_stats, call_entropy, max_logit

log = logging.getLogger(__name__)

# the second linear layer of a block's MLP in timm (mlp.fc2), mmqa's fusion (mlp.net.3), GPT-2 (mlp.c_proj)
# and BERT (layer.<i>.output.dense, the FFN's; attention.output.dense is the attention's)
FFN_OUT = re.compile(r"(^|\.)(mlp\.fc2|mlp\.net\.3|mlp\.c_proj|layer\.\d+\.output\.dense)\.")


class Diagnostics(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        probe_size: int = 16,
        grad_every_n_steps: int = 1,
        stacks: list[str] | tuple[str, ...] = ("image", "text", "fusion", "decoder"),
        dirpath: str | None = None,
        artefact_factor: float = 5.0,
        spike_warmup_steps: int = 100,
        collapse_fraction: float = 0.2,
        baseline_probes: int = 1,
        spike_factor: float = 10.0,
        spike_window: int = 50,
        min_history: int = 10,
        max_activation_rms: float = 1000.0,
    ):
        super().__init__()
        check_range("every_n_steps", every_n_steps, 1)
        check_range("probe_size", probe_size, 1)
        check_range("grad_every_n_steps", grad_every_n_steps, 1)
        check_range("artefact_factor", artefact_factor, 1.0, low_open=True)
        unknown = sorted(set(stacks) - set(STACKS.values()))
        if unknown or not stacks:
            raise ValueError(f"callbacks.diagnostics.stacks: unknown {unknown or 'empty list'}; "
                             f"valid: {', '.join(STACKS.values())}")
        self.every_n_steps, self.probe_size, self.grad_every_n_steps = every_n_steps, probe_size, grad_every_n_steps
        self.stacks = set(stacks)
        self.dirpath = Path(dirpath) if dirpath else None
        self.artefact_factor = artefact_factor
        self.alarms = Alarms(spike_warmup_steps, collapse_fraction, baseline_probes, spike_factor, spike_window, min_history, max_activation_rms)
        self.rows: list[tuple[int, str, float]] = []  # (step, key, value): everything logged
        self.raised: list[Alarm] = []
        self._probe_batch = None
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._grads: dict[str, float] = {}  # the latest gradient norms, logged at the next probe
        self._probed = -1  # the step of the last probe

    # ----------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = pl_module.model
        have = {stack_of(n) for n, _ in attention_modules(model)}
        missing = sorted(self.stacks - have)  # late fusion, open_clip towers
        if missing:
            log.warning(f"callbacks.diagnostics.stacks: no attention mmqa can capture in {missing} "
                        f"(this model has attention in {sorted(have)}); those stacks get gradient norms only")
        blocks = [path for path, _ in find_blocks(model, self.stacks)]
        self._groups = collections.defaultdict(list)
        for name, p in model.named_parameters():
            stack = stack_of(name)
            if not p.requires_grad or stack not in self.stacks:
                continue
            self._groups[stack].append(p)
            if any(name.startswith(path + ".") for path in blocks):  # a transformer block's, not a stem's
                block = block_of(name)
                self._groups[block].append(p)
                if FFN_OUT.search(name):
                    self._groups[f"{block}/ffn_out"].append(p)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.datamodule.val_dataloader()
        probe = DataLoader(val.dataset, batch_size=self.probe_size, shuffle=False, collate_fn=val.collate_fn)
        with torch.random.fork_rng(devices=[]):  # building a loader iterator draws a seed: keep the run's RNG as it was
            self._probe_batch = next(iter(probe))
        self._probe(trainer, pl_module)

    # ----------------------------------------------------------------------------- per step
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step
        if step % self.grad_every_n_steps:
            return
        for group, params in self._groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            value = torch.nn.utils.get_total_norm(grads).item()
            self._grads[group] = value
            self._raise(self.alarms.grad_norm(group, step, value))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        # once per optimiser step (gradient accumulation repeats a step over several batches)
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._probed:
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self._probed = trainer.global_step
        stats: dict[str, list[float]] = collections.defaultdict(list)
        per_head: dict[str, list[torch.Tensor]] = collections.defaultdict(list)

        def on_call(call: AttentionCall) -> None:
            if call.stack in self.stacks:
                per_head[f"entropy/{call.site}"].append(call_entropy(call))
                per_head[f"max_logit/{call.site}"].append(max_logit(call))

        def on_block(name: str):
            def hook(module, args, output):
                x = output[0] if isinstance(output, (tuple, list)) else output  # (B, N, D)
                rms, artefacts = activation_stats(x, self.artefact_factor)
                stats[f"act_rms/{name}"].append(rms)
                stats[f"artefacts/{name}"].append(artefacts)
            return hook

        model = pl_module.model
        hooks = [m.register_forward_hook(on_block(block_of(n + ".x"))) for n, m in find_blocks(model, self.stacks)]
        modes = {m: m.training for m in pl_module.modules()}
        batch = move_data_to_device(self._probe_batch, pl_module.device)
        try:
            pl_module.eval()
            with torch.random.fork_rng(devices=[]), torch.no_grad(), capture_attention(model, on_call=on_call):
                pl_module.compute_losses(batch)
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes.items():
                m.training = mode

        metrics: dict[str, float] = {}
        # a stack read more than once per batch (the text encoder: questions and captions) is averaged
        # over its calls; the max logit is the max
        for key, values in per_head.items():
            heads = torch.stack(values).amax(0) if key.startswith("max_logit") else torch.stack(values).nanmean(0)
            for i, v in enumerate(heads.tolist()):
                metrics[f"diag/{key}/h{i}"] = v
            if key.startswith("entropy"):
                mean = heads.nanmean().item()
                metrics[f"diag/{key}"] = mean
                self._raise(self.alarms.entropy(key.removeprefix("entropy/"), step, mean))
        for key, values in stats.items():
            value = sum(values) / len(values)
            metrics[f"diag/{key}"] = value
            if key.startswith("act_rms"):
                self._raise(self.alarms.activation(key.removeprefix("act_rms/"), step, value))
        metrics.update({f"diag/grad_norm/{g}": v for g, v in self._grads.items()})
        self.rows += [(step, k, v) for k, v in metrics.items()]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _raise(self, alarm: Alarm | None) -> None:
        if alarm is not None:
            self.raised.append(alarm)
            log.warning(alarm.message())

    # ----------------------------------------------------------------------------- the end
    def run_metrics(self) -> dict[str, float]:
        """For metrics.json: alarm counts, per kind, and the step of the first (-1: none)."""
        out = {f"diag/alarms/{kind}": float(sum(a.kind == kind for a in self.raised)) for kind in KINDS}
        out["diag/alarms"] = float(len(self.raised))
        out["diag/first_alarm_step"] = float(min((a.step for a in self.raised), default=-1))
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is not None and trainer.is_global_zero:
            from mmqa.callbacks.diagnostics_plots import write_report  # matplotlib only where a report is written

            write_report(self.dirpath, self.rows, self.raised)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # a run that diverges (a non-finite loss stops it) is the one whose diagnostics matter most
        self.on_fit_end(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "raised": [vars(a) for a in self.raised], "alarms": self.alarms.state}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [tuple(r) for r in state["rows"]]
        self.raised = [Alarm(**a) for a in state["raised"]]
        self.alarms.state = state["alarms"]
