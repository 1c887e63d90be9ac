"""Model library: encoders, fusion variants, heads, the GPT-2 decoder and the assembled model.

Nothing here imports Lightning, Hydra or Gradio; orchestration lives outside this package.
"""
