"""MONAI Label app serving the her2-monai bundle (loaded by ``monailabel start_server --app <this folder>``).

Tasks (names as clients see them):

* ``her2_score`` (infer, classification): the HER2 score of one patch of unknown stain (the branch selector decides)
  or of a pair (``params.he`` / ``params.ihc`` = the datastore id of the other stain); the JSON of
  ``python -m her2_monai predict``.
* ``her2_translate`` (infer): the CM-GAN's synthetic IHC (or H&E) for a patch, as an RGB PNG.
* ``her2_wsi`` (infer, whole-slide / region): per-tile HER2 scores and the ASCO/CAP-style call of a region of a slide in
  the datastore (:mod:`her2_monai.wsi`); ``POST /infer/wsi_v2/her2_wsi`` with ``image=<id>`` and MONAI Label's ``wsi``
  form (``location``, ``size``, ``level``, ``tile_size``), or ``POST /infer/her2_wsi?image=<id>`` with the same keys
  in ``params``.
* ``her2_score`` (train): ``python -m monai.bundle run training`` on a datalist built from the datastore.

``--conf`` keys: see :mod:`her2_monai.label_app.config`. The server must be given ``--host`` explicitly (MONAI
Label's own default is 0.0.0.0, every interface); use ``--host 127.0.0.1``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import her2_monai
from her2_monai.data.provenance import provenance_warnings
from her2_monai.label_app.config import AppConfig
from her2_monai.label_app.model import ModelHolder, scrub_paths
from her2_monai.label_app.tasks import (
    HER2ScoreTask,
    HER2TrainTask,
    InputImage,
    StainTranslationTask,
    WholeSlideTask,
    parse_region_request,
)
from her2_monai.label_app.uploads import RequestError, check_image

logger = logging.getLogger(__name__)

#: The folder holding the her2_monai package (a checkout or site-packages).
_PACKAGE_ROOT = Path(her2_monai.__file__).resolve().parents[1]

SCORE_MODEL = "her2_score"
TRANSLATE_MODEL = "her2_translate"
WSI_MODEL = "her2_wsi"


def _host_from_argv(argv: list[str]) -> str | None:
    """The ``--host``/``-i`` value of a ``monailabel start_server`` command line, or ``None`` if not given."""
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def check_bind_host(argv: list[str] | None = None) -> None:
    """Refuse to serve on MONAI Label's default host (0.0.0.0, every interface) unless the host was chosen.

    ``monailabel start_server`` binds 0.0.0.0 when ``--host`` is omitted; this app serves patient images, so it
    stops with a message asking for an explicit ``--host 127.0.0.1`` (or a deliberate ``--host 0.0.0.0``).

    Raises:
        RuntimeError: for a ``start_server`` command line without ``--host``.
    """
    argv = list(sys.argv if argv is None else argv)
    if "start_server" not in argv[1:2]:
        return  # not started through `monailabel start_server` (tests, uvicorn, MONAI Label's task subprocesses)
    host = _host_from_argv(argv)
    if host is None:
        raise RuntimeError(
            "the HER2 app does not listen on every interface by default: add --host 127.0.0.1 to `monailabel "
            "start_server` (or --host 0.0.0.0 to expose the server on purpose, behind authentication)"
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("HER2 app listening on %s: reachable from other machines; enable MONAI Label auth", host)


class HER2LabelApp(MONAILabelApp):
    """The HER2 MONAI Label app (see the module docstring).

    Args:
        app_dir: this folder.
        studies: the datastore (a folder of images).
        conf: ``--conf`` pairs.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        check_bind_host()
        self.app_config = AppConfig.from_conf(conf)
        self.holder = ModelHolder(self.app_config.bundle_path, self.app_config.predictor_overrides())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="her2-monai",
            description="HER2 scoring (0/1+/2+/3+) from H&E, IHC or both, with stain synthesis (her2-monai bundle)",
            version=her2_monai.__version__,
            labels=None,
        )
        folders = [app_dir, studies, self.app_config.bundle_path, tempfile.gettempdir(), Path.home(), Path.cwd()]
        folders += [sys.prefix, sys.base_prefix, Path(__file__).resolve().parent, _PACKAGE_ROOT]
        self._server_paths = sorted({str(p) for p in folders} | {str(Path(p).resolve()) for p in folders} - {"/"})
        if self.app_config.preload and "start_server" in sys.argv[1:2]:
            try:
                self.holder.ensure_loaded()
            except FileNotFoundError as err:  # the server still starts, so the bundle can be trained through it
                logger.warning("HER2 model not loaded; inference answers 503 until the bundle is trained: %s", err)
        from her2_monai.label_app import server

        server.install(self)

    def info(self) -> dict[str, Any]:
        """MONAI Label's app info (``GET /info/``) with what the served model was trained on.

        Adds ``provenance`` (:func:`~her2_monai.data.provenance.model_provenance`; null before the bundle is trained)
        and ``warnings``; a warning (a model trained on the synthetic demo data, or one whose training data are not
        recorded) is also appended to the app's and each model's ``description``, the text clients show.
        """
        meta = super().info()
        provenance = self.holder.provenance()
        warnings = provenance_warnings(provenance) if provenance is not None else []
        meta["provenance"], meta["warnings"] = provenance, warnings
        if warnings:
            note = " -- WARNING: " + "; ".join(warnings)
            meta["description"] = f"{meta.get('description') or ''}{note}"
            for model in (meta.get("models") or {}).values():
                model["description"] = f"{model.get('description') or ''}{note}"
        return meta

    def init_infers(self) -> dict[str, InferTask]:
        return {
            SCORE_MODEL: HER2ScoreTask(self.holder),
            TRANSLATE_MODEL: StainTranslationTask(self.holder),
            WSI_MODEL: WholeSlideTask(self.holder),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {SCORE_MODEL: HER2TrainTask(self.app_config)}

    def server_paths(self) -> list[str]:
        """Server folders that must never appear in a response."""
        return list(self._server_paths)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def datastore_image(self, image_id: str, max_pixels: int | None = None) -> InputImage:
        """A datastore image by id (never a path), checked like an upload.

        Raises:
            RequestError: 404 if the id is not in the datastore; 4xx if the file is not a usable patch.
        """
        uri = self.datastore().get_image_uri(str(image_id)) if image_id else ""
        if not uri or not Path(uri).is_file():
            raise RequestError(404, f"image '{str(image_id)[:80]}' is not in the datastore")
        name = f"'{image_id}'"
        info = check_image(Path(uri), name, max_pixels or self.app_config.max_pixels)
        return InputImage(Path(uri), str(image_id), (info.width, info.height))

    def session_image(self, session: Any) -> InputImage:
        """The image of a MONAI Label session (uploaded earlier through ``PUT /session/``), checked like an upload.

        Raises:
            RequestError: 4xx if it is not a usable patch.
        """
        path = Path(str(session.image))
        if not path.is_file():
            raise RequestError(400, "the session holds no single image file (folders/DICOM series are not supported)")
        info = check_image(path, "the session image", self.app_config.max_pixels)
        return InputImage(path, "session image", (info.width, info.height))

    def task(self, model: str) -> InferTask:
        """The infer task called ``model``.

        Raises:
            RequestError: 404 naming the available models.
        """
        task = self._infers.get(str(model))
        if task is None:
            raise RequestError(404, f"unknown model '{str(model)[:80]}'; available: {sorted(self._infers)}")
        return task

    def run_infer(self, model: str, image: InputImage, params: dict[str, Any]) -> tuple[bytes | None, dict[str, Any]]:
        """Run one infer task on a validated image: ``(PNG bytes or None, JSON)`` with server paths scrubbed.

        Raises:
            RequestError: 4xx/501 for anything the client can fix or that is not available.
        """
        task = self.task(model)
        if isinstance(task, HER2ScoreTask):
            partners = [s for s in ("he", "ihc") if params.get(s)]
            if len(partners) > 1:
                raise RequestError(400, "give at most one of params.he and params.ihc (the other stain's image id)")
            partner = (partners[0], self.datastore_image(str(params[partners[0]]))) if partners else None
            png, result = None, task.run(image, params, partner)
        elif isinstance(task, StainTranslationTask):
            png, result = task.run(image, params)
        else:
            raise RequestError(
                400, f"'{model}' scores a slide of the datastore, not an upload: give image=<datastore id> (and the "
                "region as location/size)"
            )  # fmt: skip
        return png, scrub_paths(result, self.server_paths())

    def datastore_slide(self, image_id: str) -> Path:
        """A datastore slide by id (never a path); its readability is checked when it is opened.

        Raises:
            RequestError: 400 without an id, 404 if the id is not in the datastore.
        """
        if not image_id:
            raise RequestError(400, "no slide: give image=<datastore id> of a slide in the server's datastore")
        uri = self.datastore().get_image_uri(str(image_id))
        if not uri or not Path(uri).is_file():
            raise RequestError(404, f"image '{str(image_id)[:80]}' is not in the datastore")
        return Path(uri)

    def run_region(self, model: str, image_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Score a region of a datastore slide with the whole-slide task; JSON with server paths scrubbed.

        Raises:
            RequestError: 4xx for a patch model, an unknown id, an unreadable slide or a bad region.
        """
        task = self.task(model)
        if not isinstance(task, WholeSlideTask):
            raise RequestError(400, f"'{model}' scores patches; whole-slide requests go to '{WSI_MODEL}'")
        request = parse_region_request(spec)
        result = task.run(self.datastore_slide(str(image_id)), str(image_id), request)
        return scrub_paths(result, self.server_paths())

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's infer entry (batch inference, sessions): ``request["image"]`` is a datastore id only.

        Uploads over HTTP take :mod:`her2_monai.label_app.server`'s route instead, which validates and stores them
        in a private folder first. A server path given as ``image`` is refused like any unknown id.
        """
        task = self.task(request.get("model", ""))
        if isinstance(task, WholeSlideTask):
            result = self.run_region(request["model"], str(request.get("image") or ""), request)
            return {"label": None, "tag": "original", "file": None, "params": result}
        image = self.datastore_image(str(request.get("image") or ""))
        png, result = self.run_infer(request["model"], image, request)
        file = None
        if png is not None:
            with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as out:
                out.write(png)
                file = out.name
        return {"label": file, "tag": "original", "file": file, "params": result}

    def infer_wsi(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's whole-slide entry: ``request`` holds ``image`` (datastore id), ``location``, ``size``,
        ``level``, ``tile_size`` and ``params``; 404 for unknown models, 400 for patch models."""
        spec = {**request, **(request.get("params") or {})}
        result = self.run_region(request.get("model", ""), str(request.get("image") or ""), spec)
        return {"label": None, "tag": "original", "file": None, "params": result}

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """Active learning's next image; 404 (not MONAI Label's 500) for an unknown strategy."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise RequestError(404, f"unknown strategy '{str(strategy)[:80]}'; available: {sorted(self._strategies)}")
        return super().next_sample(request)
