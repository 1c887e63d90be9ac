"""Lightning callbacks configured in conf/callbacks/: `diagnostics.py` (attention entropy, activation and
gradient norms, alarms) with its `alarms.py` and `diagnostics_plots.py`."""
