"""``dd label serve``: the local labelling page over a queue (see ``docs/labelling.md``).

API (all under the queue; items are addressed by their index, so no request names a path):

* ``GET /api/state``: progress, the annotator, every item's id, category and latest label,
  and the first item without a decision (where to resume).
* ``GET /api/item/N``: one item (size, category, prompt, detector scores, latest decision).
* ``GET /api/item/N/image|prediction|mask``: the image, the detector's map, the saved mask.
* ``POST /api/item/N/mask?label=artifact|uncertain&annotator=NAME``: body = a PNG of exactly
  the image's size; stored as an 8-bit grayscale PNG (atomically) and logged. ``artifact``
  with an empty mask is logged as ``no_artifact``.
* ``POST /api/item/N/decision``: JSON ``{"label": "no_artifact"|"skip"|"uncertain",
  "annotator": NAME}``; ``no_artifact`` stores an all-zero mask.

A lock makes each (mask write, log line) pair one step, so two tabs saving at once leave a
whole mask and a whole log line each, and the log's last line for an item describes the
mask on disk.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dd.label.queue import Queue
from dd.runtime.web import (
    HTTPError,
    LocalServer,
    Request,
    Response,
    WebApp,
    atomic_write_png,
    now_iso,
)

STATIC = Path(__file__).parent / "static"
BROWSER_FORMATS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def build_app(queue: Queue, *, annotator: str = "anonymous") -> WebApp:
    app = WebApp()
    lock = threading.Lock()
    app.static("/static/", STATIC)

    def item_at(req: Request) -> tuple[int, dict[str, Any]]:
        n = int(req.match[0])
        if not 0 <= n < len(queue.items):
            raise HTTPError(404, f"no item {n} (the queue has {len(queue.items)})")
        return n, queue.items[n]

    def who(req: Request, body: dict[str, Any] | None = None) -> str:
        if req.annotator is not None:  # a named access token: its owner, whatever the page says
            return req.annotator
        name = (body or {}).get("annotator") or req.arg("annotator") or annotator
        name = " ".join(str(name).split())[:100]
        return name or annotator

    def log(
        n: int, item: dict[str, Any], label: str, req: Request, name: str, pixels: int | None
    ) -> dict:
        rec = {
            "item": item["id"],
            "index": n,
            "label": label,
            "annotator": name,
            "auth": req.auth,
            "time": now_iso(),
            "mask": f"masks/{item['id']}.png" if pixels is not None else None,
            "pixels": pixels,
        }
        return queue.log.append(rec)

    @app.route("GET", r"/")
    def index(req: Request) -> Response:
        return Response.file(STATIC / "index.html")

    @app.route("GET", r"/api/state")
    def state(req: Request) -> Response:
        latest = queue.latest_decisions()
        items = [
            {
                "index": i,
                "id": it["id"],
                "category": it.get("category"),
                "label": latest.get(it["id"], {}).get("label"),
            }
            for i, it in enumerate(queue.items)
        ]
        first = next((x["index"] for x in items if x["label"] is None), None)
        return Response.json(
            {
                **queue.progress(),
                "annotator": annotator,
                "items": items,
                "first_todo": first,
                "queue": str(queue.root),
            }
        )

    @app.route("GET", r"/api/item/(\d+)")
    def item(req: Request) -> Response:
        n, it = item_at(req)
        w, h = queue.size(it)
        pred = queue.prediction_path(it)
        dec = queue.latest_decisions().get(it["id"])
        return Response.json(
            {
                "index": n,
                "id": it["id"],
                "width": w,
                "height": h,
                "category": it.get("category"),
                "prompt": it.get("prompt"),
                "reason": it.get("reason"),
                "max": it.get("max"),
                "has_prediction": bool(pred and pred.is_file()),
                "has_mask": queue.mask_path(it).is_file(),
                "decision": dec,
            }
        )

    @app.route("GET", r"/api/item/(\d+)/image")
    def image(req: Request) -> Response:
        _, it = item_at(req)
        path = queue.image_path(it)
        if path.suffix.lower() in BROWSER_FORMATS:
            return Response.file(path)
        import io

        from dd.data.images import ImageLoadError, load_image

        try:
            arr = load_image(path)
        except ImageLoadError as e:
            raise HTTPError(404, e.message) from None
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return Response(buf.getvalue(), 200, "image/png", {"Cache-Control": "no-store"})

    @app.route("GET", r"/api/item/(\d+)/prediction")
    def prediction(req: Request) -> Response:
        _, it = item_at(req)
        pred = queue.prediction_path(it)
        if pred is None:
            raise HTTPError(404, "this item has no prediction")
        return Response.file(pred, "image/png")

    @app.route("GET", r"/api/item/(\d+)/mask")
    def get_mask(req: Request) -> Response:
        _, it = item_at(req)
        return Response.file(queue.mask_path(it), "image/png")

    @app.route("POST", r"/api/item/(\d+)/mask")
    def put_mask(req: Request) -> Response:
        n, it = item_at(req)
        label = req.arg("label", "artifact")
        if label not in ("artifact", "uncertain"):
            raise HTTPError(400, f"label must be artifact or uncertain, got {label!r}")
        size = queue.size(it)
        with lock:
            written = atomic_write_png(queue.mask_path(it), req.body, size=size, mode="L")
            pixels = int(np.count_nonzero(np.asarray(written)))
            if label == "artifact" and pixels == 0:
                label = "no_artifact"
            rec = log(n, it, label, req, who(req), pixels)
        return Response.json({"ok": True, "decision": rec, **queue.progress()})

    @app.route("POST", r"/api/item/(\d+)/decision")
    def decision(req: Request) -> Response:
        n, it = item_at(req)
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        label = body.get("label")
        if label not in ("no_artifact", "skip", "uncertain"):
            raise HTTPError(400, "label must be no_artifact, skip or uncertain")
        with lock:
            pixels = None
            if label == "no_artifact":
                w, h = queue.size(it)
                atomic_write_png(queue.mask_path(it), Image.new("L", (w, h), 0), mode="L")
                pixels = 0
            rec = log(n, it, label, req, who(req, body), pixels)
        return Response.json({"ok": True, "decision": rec, **queue.progress()})

    return app


def make_server(
    queue_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    annotator: str = "anonymous",
    tokens: dict[str, str | None] | None = None,
) -> LocalServer:
    """The labelling server for a queue folder (call ``.start()`` or ``.serve_forever()``);
    beyond loopback it needs access tokens (:func:`dd.runtime.web.make_tokens`; one shared token is
    made when ``tokens`` is None)."""
    queue = Queue.open(queue_dir)
    return LocalServer(build_app(queue, annotator=annotator), host, port, tokens=tokens)
