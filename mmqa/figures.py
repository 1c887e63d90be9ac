"""Figures for reports: matplotlib on the Agg canvas directly, no pyplot global state, no display."""

from __future__ import annotations


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported only where a figure is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig
