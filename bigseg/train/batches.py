"""Training batches: an epoch's samples read and augmented by data worker processes (or on the
device from an on-device copy), and a worker's failure as one line."""
from __future__ import annotations

import torch

from bigseg.errors import BigsegError, TrainingError
from bigseg.runtime import ignore_terminate
from bigseg.train.config import TrainConfig
from bigseg.train.data import EpochView
from bigseg.train.device_data import DeviceData


class DataFailed(TrainingError):
    """A training batch could not be made (an image that cannot be read or decoded)."""


def batches(view: EpochView, cfg: TrainConfig, start: int, data: DeviceData | None):
    """The batches of `view` from sample `start`: read and augmented by workers, or on the device
    from the images already there (`--data-on-device`), with the same random choices."""
    if data is None:
        return _loaded(_loader(view, cfg, start))
    return data.batches(view.sampler, view.keys[start:], view.aug, view.seed, view.epoch, cfg.batch_size)


def _loader(view: EpochView, cfg: TrainConfig, start: int) -> torch.utils.data.DataLoader:
    """Batches of `view` in order from sample `start` (a resumed epoch skips what it has done)."""
    indices = list(range(start, len(view)))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(view, indices), batch_size=cfg.batch_size,
                                       shuffle=False, drop_last=True, num_workers=cfg.workers,
                                       persistent_workers=False, worker_init_fn=ignore_terminate)


def _loaded(loader: torch.utils.data.DataLoader):
    """`loader`'s batches; its failures as one-line `DataFailed`, and its workers ended whatever
    happens: they ignore SIGTERM (`ignore_terminate`), so a loader kept alive by an exception's
    traceback would leave Python's exit waiting for them for ever."""
    iterator = iter(loader)
    try:
        yield from iterator
    except BigsegError as e:  # from a worker it comes back as "Caught ... Original Traceback ..."
        raise DataFailed(_worker_message(e)) from None
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # absent without workers
        if shutdown is not None:
            shutdown()


def data_failure(e: Exception) -> str | None:
    """What stopped the batches, in one line; None for any other error. A worker's death is raised
    by torch's SIGCHLD handler wherever the main process is, not only where it waits for a batch."""
    if isinstance(e, DataFailed):
        return str(e)
    if isinstance(e, RuntimeError) and not isinstance(e, BigsegError) and "DataLoader worker (pid" in str(e):
        return f"a data worker stopped: {str(e).strip().rstrip('.')} (out of memory? fewer --workers use less)"
    return None


def _worker_message(e: BigsegError) -> str:
    """The error's own message, without the traceback a DataLoader worker wraps it in."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(": ", 1)[-1]
