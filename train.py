"""Train mmqa from the command line: `python train.py [group=option ...] [key=value ...]` (Hydra).

Returns the metric named by `optimized_metric`, so Hydra sweepers (Optuna) can optimise it.
"""

import hydra
from omegaconf import DictConfig

from mmqa.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
