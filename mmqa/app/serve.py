"""How the demo faces the network: bounded queue, concurrency, request size, bind address, share link.
`launch(demo)` is what `demo.py` and the tests call, so both serve with the same limits.

- Every request waits in one queue of at most `queue_size` events; one more is refused at once with
  "queue full" rather than piling up in memory.
- At most `concurrency` model calls run at a time, across all tabs (the handlers share one concurrency
  group, see `mmqa.app.ui`): on a CPU one call already uses every core.
- An upload larger than `max_file_size` is refused by gradio's upload route before it is stored;
  the pixel count of an image is checked before it is decoded (`mmqa.app.inputs`).
- It listens on 127.0.0.1 unless told otherwise, and opens a public share link only when asked.
- Files readable through gradio's `/file=` route: what users uploaded, gradio's own cache and the
  gallery folders (`gr.set_static_paths` in `build_demo`); nothing else (no `allowed_paths`).
"""

from __future__ import annotations

import gradio as gr

from mmqa.app.ui import PAGE_CSS

HOST = "127.0.0.1"  # loopback only: --host 0.0.0.0 to listen on every interface
PORT = 7860
QUEUE_SIZE = 64  # requests waiting at once; more are refused with "queue full"
CONCURRENCY = 1  # model calls running at once (each already uses every CPU core)
MAX_FILE_SIZE = "50mb"  # the largest upload accepted (gradio's size syntax)


def launch(demo: gr.Blocks, *, host: str = HOST, port: int = PORT, share: bool = False, queue_size: int = QUEUE_SIZE,
           concurrency: int = CONCURRENCY, max_file_size: str | int = MAX_FILE_SIZE, **launch_kwargs):
    """Queue `demo` with these bounds and start serving it (blocking, unless
    `prevent_thread_lock=True` is among `launch_kwargs`, as tests pass)."""
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       allowed_paths=[], show_error=False, css=PAGE_CSS, **launch_kwargs)
