"""Looking inside a model: `capture.py` records every attention call (queries, keys, masks, the
function that ran) without changing what the model computes; the diagnostics callback
(mmqa/callbacks/diagnostics.py) reduces those calls to statistics while training."""
