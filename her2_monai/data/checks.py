"""Checks that a training run will do what it promises, and data-loading settings chosen from the machine.

A MONAI trainer given an empty data loader skips its whole stage with a warning and returns normally; a run whose
validation set is empty never writes its best model. On a small dataset (a lab's 20 pairs, six real BCI pairs) both
happen quietly: the process exits 0 with no ``models/model.pt``. The pieces here make that impossible, each called
by name in ``train.json``:

* :class:`TrainingDataPlan` -- the first step of each run list (``$@data_plan.check([...])``) counts what every stage
  will train and validate on, fails with the counts, the batch size and the fix when a stage would train on zero
  batches or validate on zero samples (also: fewer validation samples than DDP processes, a validation interval that
  never comes), and caps a batch size larger than the training set at the set's size, saying so in one line. The
  data loaders take their batch sizes from it (``$@data_plan.batch_size('classifier')``).
* :class:`ExpectedOutputs` -- marks the weights files when the run starts (``initialize``) and, as the last step of a
  run list, fails when a file the command promises was not written by it.
* :func:`default_num_workers` and :func:`choose_cache_rate` -- data-loading defaults from the CPUs this process may
  use and from the memory available.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from her2_monai.constants import HE_KEY, IHC_KEY
from her2_monai.data.datalist import read_datalist_json, select_records
from her2_monai.utils import as_bool

__all__ = [
    "DataCheckError",
    "TrainingDataPlan",
    "ExpectedOutputs",
    "available_cpus",
    "default_num_workers",
    "available_memory",
    "choose_cache_rate",
]

logger = logging.getLogger(__name__)

#: Training stages that read the datalist: what they read, how they are named, and their batch-size flag.
_STAGES: dict[str, dict] = {
    "gan": {
        "name": "stage 1 (CM-GAN)",
        "select": {"require_both": True},
        "what": "H&E/IHC pairs",
        "flag": "--gan_batch_size",
        # BatchNorm over one image of a patch still has H x W values per channel.
        "min_batch": 1,
    },
    "classifier": {
        "name": "stage 2 (classifier)",
        "select": {"require_label": True},
        "what": "labelled records",
        "flag": "--batch_size",
        # One sample per batch fails in BatchNorm once the ResNet feature map is 1x1 (image_size < 64).
        "min_batch": 2,
    },
}


class DataCheckError(ValueError):
    """A training stage would train on zero batches, validate on zero samples or never write its model."""


class TrainingDataPlan:
    """What each training stage will see, checked before the run starts, with batch sizes that fit small datasets.

    Counts follow the stages' own record selection (:func:`~her2_monai.data.datalist.select_records`): stage 1 uses
    records with both stains (labelled or not), stage 2 labelled records. With ``num_processes`` > 1 (DDP) each
    process trains on ``ceil(n / num_processes)`` samples (``DistributedSampler`` pads) and validates its own shard
    of the validation set without padding (so that no sample is counted twice), which needs at least one validation
    sample per process: fewer would leave a process without validation batches while the others wait for it.

    Args:
        datalist: the datalist JSON written by the ``initialize`` step.
        batch_size: stage-2 batch size per process.
        gan_batch_size: stage-1 batch size per process.
        num_processes: DDP processes (1 for a single-process run).
        cls_epochs: stage-2 epochs (to check that validation, which writes ``model.pt``, runs at all).
        val_interval: epochs between validations.

    Raises:
        FileNotFoundError, ValueError: if the datalist cannot be read.
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        batch_size: int,
        gan_batch_size: int,
        num_processes: int = 1,
        cls_epochs: int | None = None,
        val_interval: int = 1,
    ) -> None:
        self.datalist = str(datalist)
        content = read_datalist_json(datalist)
        if not isinstance(content, Mapping):
            raise ValueError(f"datalist '{datalist}' is not a dict of splits (training, validation, test)")
        self.requested = {"gan": int(gan_batch_size), "classifier": int(batch_size)}
        self.num_processes = max(1, int(num_processes))
        self.cls_epochs = None if cls_epochs is None else int(cls_epochs)
        self.val_interval = int(val_interval)
        self.counts: dict[str, dict[str, int]] = {}
        for stage, spec in _STAGES.items():
            self.counts[stage] = {
                split: len(select_records(content.get(split) or [], **spec["select"]))
                for split in ("training", "validation")
            }
        self._batch: dict[str, int] = {}

    def _fail(self, stage: str, problem: str, fix: str) -> DataCheckError:
        counts = self.counts[stage]
        return DataCheckError(
            f"{_STAGES[stage]['name']} {problem} (datalist '{self.datalist}': {counts['training']} training and "
            f"{counts['validation']} validation {_STAGES[stage]['what']}; {_STAGES[stage]['flag']} "
            f"{self.requested[stage]}, {self.num_processes} process(es)). Fix: {fix}"
        )

    def batch_size(self, stage: str) -> int:
        """The per-process training batch size of ``stage``: the requested one, capped at the training set's size.

        The first call for a stage that needs the cap logs it in one line.

        Args:
            stage: ``"gan"`` or ``"classifier"``.

        Returns:
            The batch size for the stage's training data loader (which keeps ``drop_last=True``: one full batch per
            epoch at least, never a last batch of one sample).

        Raises:
            DataCheckError: if the stage has too few training samples for one batch.
            KeyError: for an unknown stage.
        """
        if stage in self._batch:
            return self._batch[stage]
        spec = _STAGES[stage]
        n_train = self.counts[stage]["training"]
        per_process = math.ceil(n_train / self.num_processes)
        requested = self.requested[stage]
        if requested < 1:
            raise self._fail(stage, f"has batch size {requested}", f"set {spec['flag']} to 1 or more")
        if per_process < spec["min_batch"]:
            raise self._fail(
                stage,
                f"would train on zero batches: {n_train} training {spec['what']}, and a batch needs at least "
                f"{spec['min_batch']} per process",
                "add data, or lower --val_fraction so that more records stay in training",
            )
        batch = min(requested, per_process)
        if batch < requested:
            per = " per process" if self.num_processes > 1 else ""
            logger.warning(
                "%s: %d training %s%s are fewer than %s %d; training with batch size %d instead "
                "(%d batch(es) per epoch). Add data or pass a smaller %s to silence this.",
                spec["name"],
                per_process,
                spec["what"],
                per,
                spec["flag"],
                requested,
                batch,
                per_process // batch,
                spec["flag"],
            )
        self._batch[stage] = batch
        return batch

    def check(self, stages: Sequence[str] = ("gan", "classifier")) -> TrainingDataPlan:
        """Fail before anything trains when a stage of the run would train or validate on nothing.

        Args:
            stages: the stages the run list will run.

        Returns:
            ``self``.

        Raises:
            DataCheckError: naming the stage, the counts, the batch size and what to change.
        """
        for stage in stages:
            spec = _STAGES[stage]
            n_val = self.counts[stage]["validation"]
            self.batch_size(stage)
            if n_val == 0:
                raise self._fail(
                    stage,
                    f"would validate on zero samples: the validation split has no {spec['what']}",
                    "raise --val_fraction (each class with two or more records then gives at least one), add a "
                    "val/ split folder, or add data",
                )
            if n_val < self.num_processes:
                raise self._fail(
                    stage,
                    f"has {n_val} validation {spec['what']} for {self.num_processes} processes: every process "
                    "validates its own shard and would wait forever for one that has none",
                    "raise --val_fraction, add data, or start fewer processes (torchrun --nproc_per_node)",
                )
            if stage == "classifier" and self.cls_epochs is not None and self.val_interval > self.cls_epochs:
                raise self._fail(
                    stage,
                    f"would never validate: --val_interval {self.val_interval} is larger than --cls_epochs "
                    f"{self.cls_epochs}, and models/model.pt is written at validation",
                    f"set --val_interval to at most {self.cls_epochs}",
                )
            logger.info(
                "%s: %d training / %d validation %s, batch size %d",
                spec["name"],
                self.counts[stage]["training"],
                n_val,
                spec["what"],
                self._batch[stage],
            )
        return self


class ExpectedOutputs:
    """The weights files a run promises; :meth:`verify` fails the run when one was not written by it.

    :meth:`mark` records each file's modification time when the run starts; :meth:`verify` (the last step of a run
    list) requires each named file to exist and, unless the run resumed, to have been written since the mark.

    Args:
        files: role -> path, e.g. ``{"model": "bundle/models/model.pt"}``.
    """

    def __init__(self, files: Mapping[str, str | os.PathLike]) -> None:
        self.files = {name: Path(path) for name, path in files.items()}
        self._marks: dict[str, int | None] | None = None

    @staticmethod
    def _mtime(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def mark(self) -> ExpectedOutputs:
        """Remember the current state of every file (call when the run starts).

        Returns:
            ``self``.
        """
        self._marks = {name: self._mtime(path) for name, path in self.files.items()}
        return self

    def verify(self, names: Iterable[str], resumed: bool | str = False) -> list[str]:
        """Fail when a promised file is missing, or unchanged since :meth:`mark` in a run that did not resume.

        Args:
            names: roles of the files the run list promises.
            resumed: the run continued an earlier one (``--resume true``): an existing file may be from that run.

        Returns:
            The verified paths.

        Raises:
            DataCheckError: naming every file that was not written.
        """
        resumed = as_bool(resumed, "resume")
        problems = []
        for name in names:
            path = self.files[name]
            now = self._mtime(path)
            if now is None:
                problems.append(f"'{path}' does not exist")
            elif not resumed and self._marks is not None and self._marks.get(name) == now:
                problems.append(f"'{path}' was not written by this run (it is the file of an earlier run)")
        if problems:
            raise DataCheckError(
                "the run finished without the model file(s) it promises: "
                + "; ".join(problems)
                + ". A stage was skipped or stopped early: see the warnings above (e.g. an empty data loader)."
            )
        return [str(self.files[name]) for name in names]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset, Slurm or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_num_workers(limit: int = 4) -> int:
    """Data-loader worker processes: ``min(limit, available CPUs)`` (PyTorch warns when workers exceed CPUs).

    Args:
        limit: the most workers worth starting.

    Returns:
        The number of workers.
    """
    return min(int(limit), available_cpus())


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_cache_rate(
    setting: float | str,
    datalist: str | os.PathLike,
    image_size: int,
    memory_fraction: float = 0.5,
    memory: int | None = None,
) -> float:
    """The ``CacheDataset`` cache rate: a number as given, or ``"auto"``: as much as fits in part of free memory.

    The training caches hold each record's images after loading and resizing: float32 ``(3, image_size,
    image_size)`` per stain, in four datasets (stage-1 training and validation pairs, stage-2 training and
    validation records). ``"auto"`` caches everything when that fits in ``memory_fraction`` of the available memory
    and the matching fraction otherwise, and says so in one line.

    Args:
        setting: a rate in ``[0, 1]`` or ``"auto"``.
        datalist: the datalist JSON (read for ``"auto"`` only).
        image_size: the side length the images are resized to.
        memory_fraction: share of the available memory the caches may take.
        memory: available bytes (default: :func:`available_memory`).

    Returns:
        The rate in ``[0, 1]``.

    Raises:
        ValueError: for a rate outside ``[0, 1]`` or another string.
    """
    if str(setting).strip().lower() != "auto":
        try:
            rate = float(setting)
        except (TypeError, ValueError):
            raise ValueError(f"cache_rate must be a number in [0, 1] or 'auto', got '{setting}'") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {rate}")
        return rate
    content = read_datalist_json(datalist)
    if not isinstance(content, Mapping):
        raise ValueError(f"datalist '{datalist}' is not a dict of splits (training, validation, test)")
    images = 0
    for split in ("training", "validation"):
        records = content.get(split) or []
        for select in ({"require_both": True}, {"require_label": True}):
            images += sum(bool(r.get(HE_KEY)) + bool(r.get(IHC_KEY)) for r in select_records(records, **select))
    needed = images * 3 * int(image_size) ** 2 * 4
    memory = available_memory() if memory is None else memory
    if needed == 0:
        return 1.0
    if memory is None:
        logger.warning(
            "cache_rate auto: free memory unknown on this system; caching nothing (--cache_rate 1 caches all)"
        )
        return 0.0
    budget = memory_fraction * memory
    rate = 1.0 if needed <= budget else math.floor(100 * budget / needed) / 100
    logger.info(
        "cache_rate auto: %.2f (caching all %d images at %d px takes %.2f GB; %.1f GB of memory available, up to "
        "%d%% used for caches; --cache_rate overrides)",
        rate,
        images,
        image_size,
        needed / 1e9,
        memory / 1e9,
        round(100 * memory_fraction),
    )
    return rate
