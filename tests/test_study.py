"""`dd eval study`: pairing, the vote page in headless Chromium, the API's safety, the report."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.engines.study import (
    create_study,
    load_study,
    make_app,
    participant_order,
    study_report,
    wilson_interval,
)
from dd.errors import DDError
from dd.runtime.web import LocalServer


def make_dirs(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "base", tmp / "treated"
    for d, value in ((a, 40), (b, 200)):
        d.mkdir(parents=True)
        for stem in ("0000-seed0", "0000-seed1", "0001-seed0"):
            Image.new("RGB", (16, 16), (value, 0, 0)).save(d / f"{stem}.png")
    Image.new("RGB", (16, 16)).save(a / "only-in-a.png")
    (a / "report.jsonl").write_text(
        json.dumps({"image": "0001-seed0.png", "prompt": "a man lying on the grass"}) + "\n"
    )
    return a, b


@pytest.fixture
def study(tmp_path) -> Path:
    a, b = make_dirs(tmp_path)
    out = tmp_path / "study"
    create_study(a, b, out, seed=1)
    return out


def test_create_pairs_by_name_and_stores_sides(study, tmp_path):
    s = load_study(study)
    assert s["models"] == {"a": "base", "b": "treated"}
    assert [p["stem"] for p in s["pairs"]] == ["0000-seed0", "0000-seed1", "0001-seed0"]
    assert s["unpaired"] == {"a": ["only-in-a"], "b": []}
    assert s["pairs"][2]["prompt"] == "a man lying on the grass"
    assert {p["left"] for p in s["pairs"]} <= {"a", "b"}
    for p in s["pairs"]:  # copies of the right images
        assert np.asarray(Image.open(study / p["a"]))[0, 0, 0] == 40
        assert np.asarray(Image.open(study / p["b"]))[0, 0, 0] == 200
    # the left/right draw is seeded, and differs between seeds for some pair
    sides = set()
    for k in range(6):
        made = create_study(*make_dirs(tmp_path / f"s{k}"), tmp_path / f"o{k}", seed=k)
        sides.add(tuple(p["left"] for p in made["pairs"]))
    assert len(sides) > 1
    # each participant gets all pairs in their own (reproducible) order
    order = participant_order(s, "alice")
    assert sorted(order) == [0, 1, 2] and order == participant_order(s, "alice")
    with pytest.raises(DDError, match="already holds a study"):
        create_study(tmp_path / "base", tmp_path / "treated", study)


def test_create_errors(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "x" / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "y" / "b.png")
    with pytest.raises(DDError, match="no image of"):
        create_study(tmp_path / "x", tmp_path / "y", tmp_path / "s")
    with pytest.raises(DDError, match="not found"):
        create_study(tmp_path / "nope", tmp_path / "y", tmp_path / "s")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert all(np.isnan(v) for v in wilson_interval(0, 0))


def test_page_records_a_vote_end_to_end(study, page, cli):
    s = load_study(study)
    with LocalServer(make_app(study)) as srv:
        page.goto(srv.url)
        page.fill("#name", "alice")
        page.click("#start")
        page.wait_for_selector("body[data-pair]", timeout=15000)
        first = int(page.get_attribute("body", "data-pair"))
        assert first == participant_order(s, "alice")[0]
        assert "Pair 1 of 3" in page.inner_text("#progress")
        # both images are really shown
        page.wait_for_function(
            "['left', 'right'].every(i => document.getElementById(i).naturalWidth > 0)",
            timeout=10000,
        )
        widths = page.evaluate(
            "[document.getElementById('left').naturalWidth,"
            " document.getElementById('right').naturalWidth]"
        )
        assert widths == [16, 16]
        page.check("input[name='artifacts'][value='left']")
        page.check("input[name='overall'][value='right']")
        page.click("#submit")
        page.wait_for_selector("body[data-voted='1']", timeout=10000)
        assert "Pair 2 of 3" in page.inner_text("#progress")
    votes = [json.loads(x) for x in (study / "votes" / "alice.jsonl").read_text().splitlines()]
    assert len(votes) == 1
    v = votes[0]
    pair = s["pairs"][first]
    other = "b" if pair["left"] == "a" else "a"
    assert v["pair"] == first and v["answers"] == {"artifacts": "left", "overall": "right"}
    assert v["winner"] == {"artifacts": pair["left"], "overall": other}
    r = cli("eval", "study", "report", study)
    assert r.exit_code == 0, r.output
    assert "1 participant(s), 1 vote(s)" in r.output
    assert (study / "report.md").is_file()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, obj) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(obj).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_rejects_bad_input_and_traversal(study):
    with LocalServer(make_app(study)) as srv:
        assert srv.host == "127.0.0.1"
        u = srv.url.rstrip("/")
        assert _get(u + "/image/0/left")[0] == 200
        assert _get(u + "/image/9/left")[0] == 404
        assert _get(u + "/image/0/../../study.json")[0] == 404
        assert _get(u + "/images/a/00000.png")[0] == 404  # no static access to the folder
        assert _get(u + "/api/next?participant=../../etc")[0] == 400
        ok = {"participant": "bob", "pair": 0, "answers": {"artifacts": "left", "overall": "left"}}
        assert _post(u + "/api/vote", {**ok, "participant": "../x"})[0] == 400
        assert _post(u + "/api/vote", {**ok, "pair": 99})[0] == 400
        assert _post(u + "/api/vote", {**ok, "answers": {"artifacts": "left"}})[0] == 400
        assert _post(u + "/api/vote", ok)[0] == 200
    assert [p.name for p in (study / "votes").iterdir()] == ["bob.jsonl"]


def test_report_counts_last_votes_with_wilson_intervals(study, cli):
    s = load_study(study)

    def vote(who: str, pair: int, artifacts: str, overall: str) -> dict:
        return {"participant": who, "pair": pair, "winner": {"artifacts": artifacts,
                "overall": overall}}  # fmt: skip

    lines = {
        "p1": [vote("p1", 0, "a", "a"), vote("p1", 0, "b", "b"), vote("p1", 1, "b", "a")],
        "p2": [vote("p2", 0, "b", "b"), vote("p2", 1, "b", "b"), vote("p2", 2, "b", "a")],
    }
    for who, recs in lines.items():
        text = "".join(json.dumps(r) + "\n" for r in recs)
        (study / "votes" / f"{who}.jsonl").write_text(text + '{"torn": ')
    rep = study_report(study)
    assert rep["votes"] == 5 and rep["participants"] == 2
    art, ovr = rep["questions"]
    # p1's second vote on pair 0 replaces the first: artifacts b wins 5 of 5
    assert (art["a"]["wins"], art["b"]["wins"]) == (0, 5)
    assert (ovr["a"]["wins"], ovr["b"]["wins"]) == (2, 3)
    assert ovr["b"]["rate"] == pytest.approx(0.6)
    assert ovr["b"]["ci"] == pytest.approx(list(wilson_interval(3, 5)))
    assert art["b"]["model"] == s["models"]["b"] == "treated"
    md = (study / "report.md").read_text()
    assert "Which image has fewer artifacts?" in md and "100.0%" in md
    r = cli("eval", "study", "report", study, "--json")
    assert json.loads(r.output)["questions"][1]["b"]["wins"] == 3


def test_cli_create_and_errors(cli, tmp_path):
    a, b = make_dirs(tmp_path)
    r = cli("eval", "study", a, b, "--out", tmp_path / "s", "--name-a", "SD3",
            "--name-b", "SD3 + LoRA")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "3 pairs of SD3 vs SD3 + LoRA" in r.output and "1 image(s) without a partner" in r.output
    assert load_study(tmp_path / "s")["models"]["b"] == "SD3 + LoRA"
    r = cli("eval", "study", "serve", tmp_path / "missing")
    assert r.exit_code == 1 and "not a study folder" in r.output
    r = cli("eval", "study", "report", tmp_path / "missing")
    assert r.exit_code == 1 and "not a study folder" in r.output


def test_contact_sheets_are_not_paired(tmp_path):
    a, b = make_dirs(tmp_path)
    for d in (a, b):
        Image.new("RGB", (48, 16)).save(d / "grid.png")
    study = create_study(a, b, tmp_path / "s")
    assert "grid" not in [p["stem"] for p in study["pairs"]]
    assert len(study["pairs"]) == 3 and "grid" in study["unpaired"]["a"]


def test_study_beyond_loopback_needs_a_token_and_records_the_participant(study, page, cli):
    from dd.runtime.web import make_tokens

    tokens = make_tokens(["carol"])
    (carol,) = tokens
    with LocalServer(make_app(study), host="0.0.0.0", tokens=tokens) as srv:
        base = f"http://127.0.0.1:{srv.port}/"
        assert _get(base)[0] == 401 and _get(base + "api/next?participant=x")[0] == 401
        page.goto(base + "?token=" + carol)
        page.wait_for_function("document.getElementById('name').value === 'carol'", timeout=15000)
        page.click("#start")
        page.wait_for_selector("body[data-pair]", timeout=15000)
        # small images are scaled up to the column for judging
        page.wait_for_function("document.getElementById('left').naturalWidth > 0", timeout=10000)
        shown = page.evaluate("document.getElementById('left').getBoundingClientRect().width")
        assert shown > 4 * 16
        page.check("input[name='artifacts'][value='left']")
        page.check("input[name='overall'][value='left']")
        page.click("#submit")
        page.wait_for_selector("body[data-voted='1']", timeout=10000)
    (vote,) = [json.loads(x) for x in (study / "votes" / "carol.jsonl").read_text().splitlines()]
    assert vote["annotator"] == "carol" and vote["auth"] == "token"
    r = cli("eval", "study", "serve", study, "--host", "0.0.0.0", "--participant", "bad name!")
    assert r.exit_code == 1 and "bad participant name" in r.output


def test_overwrite_replaces_a_study_without_votes_never_one_with_votes(study, tmp_path):
    a, b = tmp_path / "base", tmp_path / "treated"
    made = create_study(a, b, study, seed=2, overwrite=True)  # no votes yet: replaced
    assert made["seed"] == 2
    assert json.loads((study / "study.json").read_text())["seed"] == 2
    (study / "votes" / "alice.jsonl").write_text('{"pair": 0, "question": "q", "choice": "a"}\n')
    with pytest.raises(DDError, match="votes are people's work"):
        create_study(a, b, study, seed=3, overwrite=True)
    assert (study / "votes" / "alice.jsonl").is_file()
    # a folder of other files needs --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(DDError, match="is not empty"):
        create_study(a, b, other)
    assert create_study(a, b, other, overwrite=True)["pairs"]
