"""The Gradio demo: `build_demo(bundle) -> gr.Blocks`. Thin: every handler calls `Bundle` methods."""

from mmqa.app.ui import build_demo

__all__ = ["build_demo"]
