"""MLflow tracking that never stops a training run: MONAI's ``MLFlowHandler`` with a local fallback.

A tracking store can fail in the middle of a long run: a server that is down or unreachable, an SQLite file on a
network disk that another process keeps locked, a read-only folder. MONAI's handler raises, which kills the
training. :class:`TrackingHandler` catches the first failure, logs ONE warning per store and process, and from then
on keeps the run's parameters and metrics in local files beside the run (see :class:`LocalRunLog`); every handler of
the process that uses the same store goes straight to its local files. Nothing else changes: a working store gets
exactly what MONAI's handler sends, plus the run's ``tags`` and the experiment tag ``mlflow.experimentKind`` =
``custom_model_development`` (MLflow 3's UI then opens the experiment on its runs, not on the GenAI overview).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from her2_monai.fileio import write_json_atomic

__all__ = ["TrackingHandler", "LocalRunLog", "OFFLINE_FOLDER", "store_failed"]

logger = logging.getLogger(__name__)

#: Folder (under the fallback directory) of the runs kept locally.
OFFLINE_FOLDER = "mlflow_offline"
#: Seconds to wait for a tracking server to answer before treating it as unreachable.
PROBE_TIMEOUT_S = 5.0

#: Stores that failed in this process: tracking URI -> the reason (every handler then goes offline at once).
_FAILED_STORES: dict[str, str] = {}


def store_failed(tracking_uri: str) -> bool:
    """Whether a tracking store failed earlier in this process (its runs went to local files)."""
    store = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or ""
    return str(store) in _FAILED_STORES


class LocalRunLog:
    """A run's parameters (``<run>.params.json``, written atomically) and metrics (``<run>.metrics.csv``).

    The CSV has one row per value, ``metric,step,value,timestamp``, and is only ever appended to, one complete row
    per write (flushed), so earlier rows survive a kill; a kill can cut at most the last row short. Handlers that log
    the same run (a trainer and its validator) share one log: use :meth:`for_run`.

    Args:
        folder: where the files go.
        run_name: the MLflow run name (file names are made safe).
    """

    _open: dict[str, LocalRunLog] = {}

    def __init__(self, folder: str | os.PathLike, run_name: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_name) or "run"
        self.folder = Path(folder)
        self.metrics_file = self.folder / f"{safe}.metrics.csv"
        self.params_file = self.folder / f"{safe}.params.json"
        self.params: dict[str, Any] = {}
        self.artifacts: list[str] = []
        self._stream: Any = None

    @classmethod
    def for_run(cls, folder: str | os.PathLike, run_name: str) -> LocalRunLog:
        """The shared log of ``run_name`` in ``folder``."""
        log = cls(folder, run_name)
        return cls._open.setdefault(str(log.metrics_file.resolve()), log)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters not recorded yet (like MLflow, a run's parameter keeps its first value)."""
        for key, value in params.items():
            self.params.setdefault(str(key), str(value))
        self._write_params()

    def log_artifacts(self, paths: list[str]) -> None:
        """Record the artifacts MLflow would have copied (their paths, in the params file)."""
        self.artifacts.extend(p for p in paths if p not in self.artifacts)
        self._write_params()

    def _write_params(self) -> None:
        write_json_atomic({"params": self.params, "artifacts": self.artifacts}, self.params_file)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append one row per metric (values that are not numbers are skipped; NaN stays NaN)."""
        if self._stream is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            new = not self.metrics_file.is_file() or self.metrics_file.stat().st_size == 0
            self._stream = open(self.metrics_file, "a", newline="", encoding="utf-8")  # noqa: SIM115
            if new:
                csv.writer(self._stream).writerow(["metric", "step", "value", "timestamp"])
        stamp = int(time.time() * 1000)
        writer = csv.writer(self._stream)
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            writer.writerow([str(name), int(step), repr(number), stamp])
        self._stream.flush()

    def close(self) -> None:
        """Close the metrics file (it is reopened for appending if the run logs again)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _probe(tracking_uri: str) -> None:
    """Fail fast when an HTTP tracking server does not answer (MLflow's own client retries for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(f"no answer from {tracking_uri} within {PROBE_TIMEOUT_S:.0f} s ({err})") from None


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_store_errors() -> Iterator[None]:
    """Keep MLflow's SQL layer from printing a traceback for a failure this handler reports in one line itself."""
    store_logger = logging.getLogger("mlflow.store.db.utils")
    drop = _DropErrors()
    store_logger.addFilter(drop)
    try:
        yield
    finally:
        store_logger.removeFilter(drop)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


class TrackingHandler(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` that keeps training when the tracking store fails.

    Arguments are MONAI's, plus ``fallback_dir`` and ``tags``. A configuration error (a plain folder or ``file://``
    URI, which MLflow 3 refuses) still raises when the handler is built; any failure of the store itself -- at
    construction, when the run starts, when metrics, parameters or artifacts are logged, or when the run is closed --
    switches the handler to :class:`LocalRunLog` files in ``<fallback_dir>/mlflow_offline/``, with one warning per
    store.

    The seam with MONAI: the public event handlers (``start``, ``epoch_completed``, ``iteration_completed``,
    ``complete``, ``close``) are wrapped, and one private method is overridden, ``_log_metrics(metrics, step)``,
    through which MONAI's default epoch and iteration logs send every metric (MONAI has no public hook for where
    values go, short of replacing its loggers). Two private helpers are called: ``_parse_artifacts()`` (the files
    to record offline) and ``_dispose_sqlite_store()`` (release an SQLite store after a failure).
    ``tests/test_reliability_runs.py`` pins their names and signatures, so a MONAI upgrade that changes them fails
    a test instead of silently logging nowhere.

    Args:
        fallback_dir: where the local files go (default: the folder of an SQLite store, else the working folder).
        tags: MLflow tags set on the run when it starts (e.g. what the model is trained on,
            :func:`~her2_monai.data.provenance.provenance_tags`); offline, kept with the parameters as ``tag.<name>``.
        kwargs: :class:`~monai.handlers.MLFlowHandler` arguments.
    """

    def __init__(
        self, fallback_dir: str | os.PathLike | None = None, tags: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri") or ""
        self.store = str(uri)
        self.local: LocalRunLog | None = None
        self._fallback_dir = fallback_dir
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        try:
            with _quiet_store_errors():
                super().__init__(**kwargs)
        except ValueError:
            raise  # a configuration error (e.g. a file-store URI), not a failing store
        except Exception as err:
            # The client is created last: what MLFlowHandler sets after it, set here so the handler can run.
            self.close_on_complete = bool(kwargs.get("close_on_complete", False))
            self.experiment = self.cur_run = None
            self.dataset_dict = kwargs.get("dataset_dict")
            self._go_offline(err)
        self._online()

    @property
    def offline(self) -> bool:
        """Whether this handler keeps its run locally."""
        return self.local is not None

    def _fallback_folder(self) -> Path:
        if self._fallback_dir:
            return Path(self._fallback_dir) / OFFLINE_FOLDER
        if self.store.startswith("sqlite:///"):
            return Path(self.store[len("sqlite:///") :]).parent / OFFLINE_FOLDER
        return Path.cwd() / OFFLINE_FOLDER

    def _go_offline(self, err: BaseException | None) -> None:
        run_name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        self.local = LocalRunLog.for_run(self._fallback_folder(), run_name)
        if err is not None and self.store not in _FAILED_STORES:
            _FAILED_STORES[self.store] = _first_line(err)
            logger.warning(
                "MLflow tracking at %s failed (%s); training goes on without MLflow, and the parameters and metrics "
                "of its runs are kept in %s",
                self.store or "(default store)",
                _FAILED_STORES[self.store],
                self.local.folder,
            )

    def _online(self) -> bool:
        """Whether to use the store: not after it failed, for this handler or another one of this process."""
        if self.local is None and self.store in _FAILED_STORES:
            self._go_offline(None)
        return self.local is None

    def _on_store(self, call: Callable[[], Any]) -> bool:
        """Run ``call`` against the store unless it failed before; a failure now switches to the local files.

        Returns:
            Whether ``call`` ran on the store to the end.
        """
        if not self._online():
            return False
        try:
            with _quiet_store_errors():
                call()
            return True
        except Exception as err:
            self._go_offline(err)
            return False

    def _guard(self, method: Any, *args: Any) -> None:
        """Call a MONAI handler method; on a store failure go offline and call it again (it then logs locally)."""
        if not self._on_store(lambda: method(*args)):
            method(*args)

    # -- MONAI's event handlers, guarded
    def start(self, engine: Engine) -> None:
        """Start (or continue) the MLflow run; offline: record the parameters locally."""
        if self._on_store(lambda: self._start_on_store(engine)):
            return
        if self.experiment_param:
            self.local.log_params(self.experiment_param)
        if self.tags:
            self.local.log_params({f"tag.{k}": v for k, v in self.tags.items()})
        self.local.log_params({attr: getattr(engine.state, attr, None) for attr in self.default_tracking_params})

    def _start_on_store(self, engine: Engine) -> None:
        _probe(self.store)
        super().start(engine)
        if self.experiment is not None:
            from her2_monai.serving.mlflow_model import set_experiment_kind

            set_experiment_kind(self.client, self.experiment.experiment_id)
        for key, value in self.tags.items():
            self.client.set_tag(self.cur_run.info.run_id, key, value)

    def epoch_completed(self, engine: Engine) -> None:
        """Log epoch metrics (MONAI's behaviour), locally once the store has failed."""
        self._guard(super().epoch_completed, engine)

    def iteration_completed(self, engine: Engine) -> None:
        """Log iteration values (MONAI's behaviour), locally once the store has failed."""
        self._guard(super().iteration_completed, engine)

    def complete(self) -> None:
        """Log the artifacts; offline: record their paths locally."""
        if self._on_store(super().complete):
            return
        if self.artifacts and self.local is not None:
            self.local.log_artifacts(self._parse_artifacts())

    def close(self) -> None:
        """End the MLflow run; offline: close the local files."""
        if self._on_store(super().close):
            return
        if self.local is not None:
            self.local.close()
        if getattr(self, "client", None) is not None:
            with contextlib.suppress(Exception):
                self._dispose_sqlite_store()

    # -- where metrics go: the one private method overridden (see the class docstring)
    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.local is not None:
            self.local.log_metrics(flatten_dict(metrics), step or 0)
        else:
            super()._log_metrics(metrics, step)
