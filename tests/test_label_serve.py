"""`dd label serve`: the HTTP API (safety, concurrency, resume) and the page in Chromium."""

from __future__ import annotations

import http.client
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.label.queue import DECISIONS, Queue, write_queue
from dd.label.serve import make_server
from dd.runtime.web import read_jsonl

W, H = 64, 48


def _queue(tmp_path: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    q = tmp_path / "queue"
    (q / "detect" / "maps").mkdir(parents=True)
    (tmp_path / "pool").mkdir()
    items = []
    for i in range(n):
        img = tmp_path / "pool" / f"g{i}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(img)
        pred = np.zeros((H, W), np.uint8)
        pred[10:20, 10:30] = 220
        Image.fromarray(pred).save(q / "detect" / "maps" / f"g{i}.png")
        items.append(
            {
                "id": f"g{i}",
                "image": str(img),
                "width": W,
                "height": H,
                "category": "hand",
                "reason": "uncertain",
                "max": 0.86,
                "prediction": f"detect/maps/g{i}.png",
            }
        )
    write_queue(q, items, {"detector": {"weights": "tiny"}})
    return q


@pytest.fixture
def server(tmp_path):
    q = _queue(tmp_path)
    srv = make_server(q, port=0, annotator="tester").start()
    try:
        yield srv, q
    finally:
        srv.stop()


def _req(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _png(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_binds_loopback_and_rejects_traversal_and_foreign_hosts(server):
    srv, q = server
    assert srv.host == "127.0.0.1" and srv.httpd.server_address[0] == "127.0.0.1"
    assert _req(srv, "GET", "/")[0] == 200
    assert _req(srv, "GET", "/static/app.js")[0] == 200
    for bad in (
        "/static/../queue.py",
        "/static/%2e%2e/queue.py",
        "/static/..%2fserve.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/api/item/99/image",
        "/api/item/-1/image",
        "/queue.jsonl",
    ):
        assert _req(srv, "GET", bad)[0] == 404, bad
    status, body = _req(srv, "GET", "/api/state", headers={"Host": "evil.example:8765"})
    assert status == 403 and b"forbidden host" in body


def test_upload_must_be_a_png_of_the_image_size(server):
    srv, q = server
    ok = np.zeros((H, W), np.uint8)
    status, body = _req(srv, "POST", "/api/item/0/mask", _png(ok[:-1]))
    assert status == 400 and f"expected {W}x{H}".encode() in body
    status, body = _req(srv, "POST", "/api/item/0/mask", b"GIF89a not a png")
    assert status == 400 and b"not a PNG" in body
    status, _ = _req(srv, "POST", "/api/item/0/mask", b"\x89PNG\r\n\x1a\nbroken")
    assert status == 400
    assert not (q / "masks" / "g0.png").exists() and read_jsonl(q / DECISIONS) == []
    status, _ = _req(srv, "POST", "/api/item/0/decision", json.dumps({"label": "bogus"}))
    assert status == 400


def test_concurrent_saves_leave_a_whole_mask_and_whole_log_lines(server):
    srv, q = server
    uploads = []
    for k in range(8):
        m = np.zeros((H, W), np.uint8)
        m[: 5 * (k + 1), : 7 * (k + 1)] = 255
        uploads.append(m)
    results = []

    def post(m):
        results.append(_req(srv, "POST", "/api/item/1/mask?annotator=a%20b", _png(m))[0])

    threads = [threading.Thread(target=post, args=(m,)) for m in uploads for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    on_disk = np.asarray(Image.open(q / "masks" / "g1.png"))
    assert any(on_disk.tolist() == m.tolist() for m in uploads)
    log = read_jsonl(q / DECISIONS)
    assert len(log) == 16 and len((q / DECISIONS).read_text().splitlines()) == 16
    assert all(r["item"] == "g1" and r["annotator"] == "a b" for r in log)
    assert log[-1]["pixels"] == int(np.count_nonzero(on_disk))


def test_resume_starts_at_the_first_undecided_item(server):
    srv, q = server
    assert json.loads(_req(srv, "GET", "/api/state")[1])["first_todo"] == 0
    _req(srv, "POST", "/api/item/0/decision", json.dumps({"label": "skip"}))
    st = json.loads(_req(srv, "GET", "/api/state")[1])
    assert st["first_todo"] == 1 and st["done"] == 1 and st["counts"]["skip"] == 1
    # a new server on the same queue picks up where the old one stopped
    srv2 = make_server(q, port=0).start()
    try:
        st = json.loads(_req(srv2, "GET", "/api/state")[1])
        assert st["first_todo"] == 1 and st["items"][0]["label"] == "skip"
    finally:
        srv2.stop()


def test_page_draw_save_and_no_artifact(server, page):
    srv, q = server
    page.goto(srv.url)
    page.wait_for_selector("body[data-ready='0']", timeout=15000)
    assert page.inner_text("#progress") == "0 / 3"
    page.fill("#annotator", "alice")
    page.dispatch_event("#annotator", "change")
    page.click("#size")  # focus away from the text field before using keys
    page.evaluate("document.getElementById('size').value = 4; "
                  "document.getElementById('size').dispatchEvent(new Event('input'))")  # fmt: skip
    box = page.locator("#mask").bounding_box()
    sx, sy = box["width"] / W, box["height"] / H

    def at(x, y):
        return box["x"] + (x + 0.5) * sx, box["y"] + (y + 0.5) * sy

    page.mouse.move(*at(8, 30))
    page.mouse.down()
    page.mouse.move(*at(40, 30), steps=8)
    page.mouse.up()
    page.keyboard.press("s")
    page.wait_for_selector("body[data-saved='0:artifact']", timeout=10000)
    mask = np.asarray(Image.open(q / "masks" / "g0.png"))
    assert mask.shape == (H, W) and Image.open(q / "masks" / "g0.png").mode == "L"
    assert (mask[30, 8:41] == 255).all(), "the stroke's pixels are set"
    assert mask[5, 50] == 0 and mask[45, 5] == 0 and mask[20, 30] == 0
    assert 33 * 3 <= np.count_nonzero(mask) <= 33 * 6
    # the page moved on to the next item; "no artifact" stores an empty mask and logs it
    page.wait_for_selector("body[data-ready='1']", timeout=10000)
    page.click("#noartifact")
    page.wait_for_selector("body[data-saved='1:no_artifact']", timeout=10000)
    empty = np.asarray(Image.open(q / "masks" / "g1.png"))
    assert empty.shape == (H, W) and not empty.any()
    log = read_jsonl(q / DECISIONS)
    assert [(r["item"], r["label"], r["annotator"]) for r in log] == [
        ("g0", "artifact", "alice"),
        ("g1", "no_artifact", "alice"),
    ]
    assert all(r["time"].endswith("Z") for r in log)
    assert page.inner_text("#progress") == "2 / 3"
    # undo/redo and the prediction threshold seed an editable mask
    page.wait_for_selector("body[data-ready='2']", timeout=10000)
    page.keyboard.press("t")
    seeded = page.evaluate("Array.from(window.ddLabel.mask).filter(v => v).length")
    assert seeded == 10 * 20
    page.keyboard.press("Control+z")
    assert page.evaluate("Array.from(window.ddLabel.mask).filter(v => v).length") == 0
    page.keyboard.press("Control+y")
    assert page.evaluate("Array.from(window.ddLabel.mask).filter(v => v).length") == 200
    page.keyboard.press("u")
    page.wait_for_selector("body[data-saved='2:uncertain']", timeout=10000)
    assert np.count_nonzero(np.asarray(Image.open(q / "masks" / "g2.png"))) == 200
    assert Queue.open(q).progress()["done"] == 3


def test_web_helpers(tmp_path):
    from dd.runtime.web import JsonlLog, safe_join

    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "f.txt").write_text("x")
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "root" / "link.txt").symlink_to(tmp_path / "secret.txt")
    root = tmp_path / "root"
    assert safe_join(root, "a/f.txt") == (root / "a" / "f.txt").resolve()
    for bad in ("../secret.txt", "a/../../secret.txt", "/etc/passwd", "a\\f.txt", "link.txt", ""):
        assert safe_join(root, bad) is None, bad
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append({"a": 1})
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'{"torn": ')  # a writer killed mid-line
    log.append({"b": 2})
    assert log.read() == [{"a": 1}, {"b": 2}]


def test_beyond_loopback_every_request_needs_the_token(tmp_path, page):
    """--host 0.0.0.0: no token, a wrong token -> 401 on the page, the API and uploads; the
    annotator's link opens the page in a real browser, and each label records its owner."""
    from dd.runtime.web import make_tokens

    q = _queue(tmp_path)
    tokens = make_tokens(["alice", "bob"])
    alice, bob = list(tokens)
    srv = make_server(q, host="0.0.0.0", port=0, annotator="tester", tokens=tokens).start()
    try:
        assert [name for name, _ in srv.share_urls] == ["alice", "bob"]
        assert all(f"?token={t}" in url for (_, url), t in zip(srv.share_urls, tokens, strict=True))
        for path in ("/", "/api/state", "/static/app.js", "/api/item/0/image"):
            assert _req(srv, "GET", path)[0] == 401
            assert _req(srv, "GET", path + "?token=wrong")[0] == 401
            assert _req(srv, "GET", path, headers={"Cookie": "dd_token=" + alice[:-1]})[0] == 401
        status, _ = _req(srv, "POST", "/api/item/0/decision", body=b'{"label": "skip"}')
        assert status == 401 and not (q / DECISIONS).exists()
        # a header token works for scripts; the page says who it is whatever the body claims
        status, body = _req(
            srv,
            "POST",
            "/api/item/0/decision",
            body=b'{"label": "skip", "annotator": "mallory"}',
            headers={"X-DD-Token": bob},
        )
        assert status == 200, body
        # the browser: the link sets a cookie, the page's own requests then pass
        page.goto(f"http://127.0.0.1:{srv.port}/?token={alice}")
        page.wait_for_selector("body[data-ready='1']", timeout=15000)  # item 0 was decided
        page.click("#noartifact")
        page.wait_for_selector("body[data-saved='1:no_artifact']", timeout=10000)
        log = read_jsonl(q / DECISIONS)
        assert [(r["annotator"], r["auth"]) for r in log] == [("bob", "token"), ("alice", "token")]
    finally:
        srv.stop()
    # on loopback the Host check stays, and no token is needed
    srv = make_server(q, port=0, annotator="tester").start()
    try:
        assert srv.tokens is None and _req(srv, "GET", "/api/state")[0] == 200
        assert _req(srv, "GET", "/api/state", headers={"Host": "evil.example"})[0] == 403
    finally:
        srv.stop()


def test_cli_prints_private_links_beyond_loopback(tmp_path, monkeypatch, cli):
    from dd.runtime.web import LocalServer

    q = _queue(tmp_path)
    monkeypatch.setattr(LocalServer, "serve_forever", lambda self: self.httpd.server_close())
    res = cli("label", "serve", q, "--host", "0.0.0.0", "--port", "0", "--annotator", "alice",
              "--annotator", "bob")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "alice: http://" in res.output and "bob: http://" in res.output
    assert res.output.count("?token=") == 2
    res = cli("label", "serve", q, "--port", "0")
    assert res.exit_code == 0 and "?token=" not in res.output
