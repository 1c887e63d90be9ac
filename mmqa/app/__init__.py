"""The Gradio demo: `build_demo(bundle) -> gr.Blocks`, served by `launch(demo)`. Thin: every handler
calls `Bundle` / retrieval methods; input checks live in `mmqa.app.inputs`, network limits in
`mmqa.app.serve`."""

from mmqa.app.serve import launch
from mmqa.app.ui import build_demo

__all__ = ["build_demo", "launch"]
