"""The app's HTTP layer inside MONAI Label's FastAPI server: its own infer routes and a response filter.

MONAI Label 0.8.5's ``POST /infer/{model}`` writes uploads to a shared temp folder under a predictable name, answers
500 for a request without an image or with malformed ``params``, and accepts a *server path* as ``image``. When the
app starts inside ``monailabel start_server``, :func:`install` puts a :class:`HER2Dispatcher` in front of the server:
it answers these routes itself (same paths and parameters as MONAI Label's, so its clients keep working) and keeps
server folders out of every response body:

* ``POST /infer/{model}``: the upload (``file``) is copied into a fresh 0700 folder with a size limit, checked from
  its header (format, pixel count: no decompression bombs) and decoded before the model sees it, then removed;
  ``image`` may only be a datastore id. Every client mistake is a 4xx with ``{"detail": "<one line>"}``.
* ``POST /infer/wsi_v2/{model}`` (``image`` = datastore id, ``wsi`` = MONAI Label's JSON form: ``location``,
  ``size``, ``level``, ``tile_size``, ``params``) and the older ``POST /infer/wsi/{model}`` (the same JSON as the
  body): a region of a datastore slide scored tile by tile by ``her2_wsi``; 404 for an unknown model, 400 for a
  patch model, a bad region or an upload (slides are read from the datastore, never uploaded per request).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, File, Form, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from requests_toolbelt import MultipartEncoder

from her2_monai.label_app.tasks import InputImage, WholeSlideTask
from her2_monai.label_app.uploads import RequestError, check_image, client_name, private_workdir, save_upload

__all__ = ["install", "build_api", "build_router", "HER2Dispatcher", "run_infer_request", "run_wsi_request"]

logger = logging.getLogger(__name__)


UserDep = Annotated[User, Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))]
OptionalUpload = Annotated[UploadFile | None, File()]
FormText = Annotated[str, Form()]
OptionalBody = Annotated[dict[str, Any] | None, Body()]


class ResultType(str, Enum):
    """MONAI Label's ``output`` choices."""

    image = "image"
    json = "json"
    all = "all"
    dicom_seg = "dicom_seg"


class RegionResultType(str, Enum):
    """MONAI Label's ``output`` choices for the whole-slide routes (``dsa`` is not supported)."""

    asap = "asap"
    dsa = "dsa"
    json = "json"


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(status_code=err.status_code, content={"detail": err.message})


def _failure(err: Exception, model: str, what: str) -> JSONResponse:
    """The answer to a request that failed: the client's mistake (4xx), missing weights (503) or a bug (500).

    Call it in the ``except`` block: a bug's traceback goes to the server log, never to the client.

    Args:
        err: what was raised.
        model: the task's name.
        what: the endpoint, for the log (``infer``, ``whole-slide infer``).

    Returns:
        The JSON error response.
    """
    if isinstance(err, RequestError):
        return _error(err)
    if isinstance(err, FileNotFoundError):  # weights missing: the server runs, the model is not trained yet
        logger.error("model files missing: %s", err)
        return _error(RequestError(503, "the HER2 model is not available on this server (weights missing; see log)"))
    logger.exception("%s %s failed", what, model)
    return JSONResponse(
        status_code=500, content={"detail": f"internal error while running '{model}'; the server log has details"}
    )


def _parse_params(params: str | None, name: str = "params", example: str = '{"stain": "he"}') -> dict[str, Any]:
    if not params:
        return {}
    try:
        value = json.loads(params)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, f"{name} must be a JSON object, e.g. {example}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"{name} must be a JSON object, e.g. {example}")
    return value


def _uploaded(file: UploadFile | None) -> bool:
    return file is not None and bool(file.filename or file.size)


def _respond(model: str, png: bytes | None, result: dict[str, Any], output: ResultType | None) -> Response:
    if output == ResultType.dicom_seg:
        raise RequestError(400, "output=dicom_seg is not supported by this app; use json, image or all")
    if png is None:
        if output == ResultType.image:
            raise RequestError(400, f"model '{model}' returns JSON only; use output=json")
        return JSONResponse(result)
    if output == ResultType.json:
        return JSONResponse(result)
    if output == ResultType.image:
        headers = {"content-disposition": f'attachment; filename="{model}.png"'}
        return Response(content=png, media_type="image/png", headers=headers)
    form = MultipartEncoder(
        fields={"params": (None, json.dumps(result), "application/json"), "image": (f"{model}.png", png, "image/png")}
    )
    return Response(content=form.to_string(), media_type=form.content_type)


def _label_app() -> Any:
    # MONAI Label loads main.py as a module called "main", so the class is checked by its methods, not isinstance.
    instance = app_instance()
    if not hasattr(instance, "run_infer"):
        raise RequestError(503, "the HER2 app is not initialised")
    return instance


def run_infer_request(
    model: str, image: str, session_id: str, params: str | None, file: UploadFile | None, output: ResultType | None
) -> Response:
    """The body of ``POST /infer/{model}``: resolve and check the input, run the task, shape the answer.

    Returns:
        The response: JSON, a PNG, or MONAI Label's multipart (``params`` + ``image``); 4xx/501 JSON on errors.
    """
    try:
        app = _label_app()
        request_params = _parse_params(params)
        if isinstance(app.task(model), WholeSlideTask) and not _uploaded(file):
            if output == ResultType.image:
                raise RequestError(400, f"model '{model}' returns JSON only; use output=json")
            return JSONResponse(app.run_region(model, image, request_params))
        if _uploaded(file):
            name = client_name(file.filename)
            with private_workdir() as folder:
                path = save_upload(file.file, folder, name, app.app_config.max_upload_bytes)
                info = check_image(path, name, app.app_config.max_pixels)
                png, result = app.run_infer(
                    model, InputImage(path, name.strip("'"), (info.width, info.height)), request_params
                )
        elif session_id:
            session = app.sessions().get_session(session_id) if app.sessions() else None
            if session is None:
                raise RequestError(404, "unknown or expired session_id")
            png, result = app.run_infer(model, app.session_image(session), request_params)
        elif image:
            png, result = app.run_infer(model, app.datastore_image(image), request_params)
        else:
            raise RequestError(400, "no input image: upload a file (multipart field 'file') or give image=<id>")
        return _respond(model, png, result, output)
    except Exception as err:  # noqa: BLE001 - every failure gets an answer; a bug's trace stays in the log
        return _failure(err, model, "infer")


_WSI_EXAMPLE = '{"location": [0, 0], "size": [2048, 2048], "tile_size": [256, 256]}'


def run_wsi_request(
    model: str,
    image: str,
    wsi: dict[str, Any] | str | None,
    file: UploadFile | None,
    output: RegionResultType | None = None,
) -> Response:
    """The body of the whole-slide routes: a region of a datastore slide scored by the whole-slide task.

    Returns:
        The region's JSON, or with ``output=asap`` its tiles as ASAP annotation XML (what MONAI Label's QuPath
        extension displays); 4xx JSON for client errors (404 unknown model or image, 400 patch model, upload, bad
        region or ``output=dsa``, 413 too many tiles, 415 not a slide), 503 without weights.
    """
    try:
        if output == RegionResultType.dsa:
            raise RequestError(400, "output=dsa is not supported by this app; use json or asap")
        app = _label_app()
        app.task(model)
        spec = wsi if isinstance(wsi, dict) else _parse_params(wsi, "wsi", _WSI_EXAMPLE)
        extra = spec.get("params")
        if extra is not None and not isinstance(extra, dict):
            raise RequestError(400, 'wsi.params must be a JSON object, e.g. {"stain": "he"}')
        if _uploaded(file):
            raise RequestError(
                400, "whole-slide requests read the slide from the datastore: give image=<id>, no upload"
            )
        result = app.run_region(model, image, {**spec, **(extra or {})})
        if output == RegionResultType.asap:
            from her2_monai.wsi.outputs import tiles_asap_xml

            return Response(content=tiles_asap_xml(result["tiles"]), media_type="application/xml")
        return JSONResponse(result)
    except Exception as err:  # noqa: BLE001 - every failure gets an answer; a bug's trace stays in the log
        return _failure(err, model, "whole-slide infer")


def build_router(prefix: str = "") -> APIRouter:
    """The replacement routes (same paths and parameters as MONAI Label's)."""
    router = APIRouter(prefix=prefix)

    @router.post("/infer/{model}", tags=["Infer"], summary=f"{RBAC_USER}Run Inference for supported model")
    def api_run_inference(
        model: str,
        user: UserDep,
        image: str = "",
        session_id: str = "",
        params: FormText = "{}",
        file: OptionalUpload = None,
        label: OptionalUpload = None,
        output: ResultType | None = None,
    ) -> Response:
        """Run an infer task on an uploaded patch (``file``), a datastore image (``image``) or a session.

        ``params`` (JSON): ``her2_score``: ``stain`` (auto|he|ihc), ``he``/``ihc`` (datastore id of the other stain);
        ``her2_translate``: ``source`` (auto|he|ihc), ``size`` (model|input); ``her2_wsi`` (``image`` = a datastore
        slide): ``location`` [x, y], ``size`` [w, h] (level-0 pixels), ``level``, ``tile_size``, ``overlap``,
        ``min_tissue``, ``stain`` (he|ihc|auto). ``label`` is accepted and ignored.
        """
        return run_infer_request(model, image, session_id, params, file, output)

    @router.post("/infer/wsi/{model}", tags=["Infer"], summary=f"{RBAC_USER}Run WSI Inference", include_in_schema=False)
    def api_run_wsi_inference(
        model: str, user: UserDep, image: str = "", wsi: OptionalBody = None, output: RegionResultType | None = None
    ) -> Response:
        """Whole-slide / region inference (MONAI Label's older route: the ``wsi`` JSON is the request body)."""
        return run_wsi_request(model, image, wsi or {}, None, output)

    @router.post("/infer/wsi_v2/{model}", tags=["Infer"], summary=f"{RBAC_USER}Run WSI Inference for supported model")
    def api_run_wsi_v2_inference(
        model: str,
        user: UserDep,
        image: str = "",
        file: OptionalUpload = None,
        wsi: FormText = "{}",
        output: RegionResultType | None = None,
    ) -> Response:
        """Whole-slide / region inference: ``image`` = datastore id of a slide; ``wsi`` = JSON with ``location`` [x, y]
        and ``size`` [w, h] in level-0 pixels (absent: the whole slide), ``level``, ``tile_size`` [n, n] and
        ``params`` (``overlap``, ``min_tissue``, ``stain``); ``output`` = json (default) or asap (tile polygons as
        ASAP XML, for QuPath)."""
        return run_wsi_request(model, image, wsi, file, output)

    return router


class HER2Dispatcher:
    """ASGI wrapper around MONAI Label's server: routes the app's infer requests, hides server paths in answers.

    ``POST`` requests to ``/infer/{model}``, ``/infer/wsi/{model}`` and ``/infer/wsi_v2/{model}`` go to ``her2_api``
    (a small FastAPI app holding :func:`build_router`'s routes); everything else goes to MONAI Label unchanged. In
    every JSON, text and HTML answer the server's folders are replaced with ``<server>`` (file downloads pass
    untouched; a filtered body is buffered so that its ``content-length`` can be corrected).

    Args:
        inner: MONAI Label's ASGI stack.
        her2_api: the app's routes.
        paths: server folders (and files) to hide.
        prefix: MONAI Label's API prefix (``MONAI_LABEL_API_STR``).
    """

    def __init__(
        self, inner: Any, her2_api: Any, paths: list[str], prefix: str = "", max_body: int = 65 * 1024 * 1024
    ) -> None:
        self.inner = inner
        self.her2_api = her2_api
        self.max_body = max_body
        self._route = re.compile(rf"^{re.escape(prefix)}/infer/(wsi/|wsi_v2/)?[^/]+/?$")
        self.set_paths(paths)

    def set_paths(self, paths: list[str]) -> None:
        """Set the server folders to hide (a folder is matched whole: ``/tmp`` does not touch ``/tmpfile``)."""
        needles: set[bytes] = set()
        for p in paths:
            if len(str(p)) > 1:
                needles.add(str(p).rstrip("/").encode())
                needles.add(json.dumps(str(p).rstrip("/"))[1:-1].encode())  # as it appears inside a JSON string
        alternatives = b"|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True))
        self._redaction = re.compile(rb"(?:" + alternatives + rb")(?![A-Za-z0-9_.\-])") if needles else None

    def redact(self, body: bytes) -> bytes:
        """``body`` with every server folder replaced by ``<server>``."""
        return self._redaction.sub(b"<server>", body) if self._redaction is not None else body

    def routes_here(self, scope: dict) -> bool:
        """Whether the request is one of the app's infer routes."""
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return scope.get("method") == "POST" and bool(self._route.match(path))

    def body_refusal(self, scope: dict) -> RequestError | None:
        """411/413 before any byte of an upload is read: no length given (chunked), or more than ``max_body``."""
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length")
        if length is None:
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                return RequestError(411, "send the upload with a Content-Length (chunked uploads are not accepted)")
            return None
        try:
            size = int(length)
        except ValueError:
            return RequestError(400, "invalid Content-Length header")
        if size > self.max_body:
            return RequestError(413, f"the request is larger than {self.max_body // (1024 * 1024)} MB; send one patch")
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.inner(scope, receive, send)
            return
        target = self.inner
        if self.routes_here(scope):
            target = self.her2_api
            refusal = self.body_refusal(scope)
            if refusal is not None:
                target = JSONResponse(status_code=refusal.status_code, content={"detail": refusal.message})
        start: dict | None = None
        chunks: list[bytes] = []

        async def filtered_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"").split(b";")[0].strip()
                if ctype == b"application/json" or ctype.startswith(b"text/"):
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = self.redact(b"".join(chunks))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await target(scope, receive, filtered_send)


def build_api(prefix: str = "") -> FastAPI:
    """The FastAPI app holding the replacement routes, with MONAI Label's CORS settings."""
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    origins = [str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS] if settings.MONAI_LABEL_CORS_ORIGINS else ["*"]
    api.add_middleware(
        CORSMiddleware, allow_origins=origins, allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    api.include_router(build_router(prefix))
    return api


def install(app: Any) -> bool:
    """Put the app's routes and the path filter in front of the running MONAI Label server.

    Called from the app's constructor, which MONAI Label runs during server start-up. Does nothing (returns
    ``False``) outside ``monailabel start_server`` (e.g. in MONAI Label's training subprocess, where no server runs).
    Only Starlette's ``middleware_stack`` attribute is used, not FastAPI's routing internals.

    Args:
        app: the :class:`~her2_monai.label_app.main.HER2LabelApp`.

    Returns:
        Whether a server was found and wrapped.
    """
    module = sys.modules.get("monailabel.app")
    server = getattr(module, "app", None)
    if server is None:
        return False
    dispatcher = getattr(server.state, "her2_dispatcher", None)
    if dispatcher is None:
        stack = server.middleware_stack if server.middleware_stack is not None else server.build_middleware_stack()
        dispatcher = HER2Dispatcher(stack, build_api(settings.MONAI_LABEL_API_STR), [], settings.MONAI_LABEL_API_STR)
        server.middleware_stack = dispatcher
        server.state.her2_dispatcher = dispatcher
    dispatcher.set_paths(app.server_paths())
    dispatcher.max_body = app.app_config.max_upload_bytes + 1024 * 1024  # the multipart envelope and params
    logger.info("HER2 app: infer and whole-slide routes installed; server paths are removed from responses")
    return True
