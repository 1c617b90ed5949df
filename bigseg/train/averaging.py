"""An exponential moving average of the weights and batchnorm statistics (`--ema`), the model that
validation scores and the run saves: torch's `AveragedModel` with its EMA update.

Small batches of strongly augmented crops make a model's batchnorm running statistics, and so its
score, swing from epoch to epoch even at a tiny learning rate; averaging the weights and statistics
over the last ~1 / (1 - decay) steps damps that. Off (decay 0), the model is the trained one."""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The run's averaged model, or the trained model itself when `decay` is 0."""

    def __init__(self, net: nn.Module, decay: float):
        self.averaged = None if decay == 0 else AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                                              use_buffers=True)
        self.net = net

    @property
    def model(self) -> nn.Module:
        """The model to validate and save."""
        return self.net if self.averaged is None else self.averaged.module

    def update(self) -> None:
        """Fold the trained model's weights after a step into the average (the first copies them)."""
        if self.averaged is not None:
            self.averaged.update_parameters(self.net)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.averaged is None else self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.averaged is not None:
            self.averaged.load_state_dict(state)
