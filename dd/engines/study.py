"""A pairwise preference study of two models' images (seed 000, Sec. 4.1: 24 users chose the
winner of before/after pairs by general quality and by artifact presence; seed 001's survey).

``create_study(DIR_A, DIR_B, OUT)`` pairs the images of two folders by file stem (the same
prompt and seed: ``dd generate`` and ``dd eval gen`` name them ``PPPP-seedS.png``), copies
them into the study folder and draws, per pair, which model is shown on the left (seeded;
stored in ``study.json`` so every participant sees the same sides). ``serve_study`` runs a
local page (127.0.0.1) that asks each participant the two questions of seed 000 for every
pair ("Which image has fewer artifacts?", "Which image is better overall?"), in an order
shuffled per participant, and appends each vote to ``votes/<participant>.jsonl`` with the
winning *model* resolved from the side. ``study_report`` counts wins per question (a
participant's last vote on a pair counts) and gives each model's win rate with a Wilson
score interval (95% by default).

Study folder::

    STUDY/study.json               models, questions, pairs (id, stem, files, left side)
    STUDY/images/a/, images/b/     the paired images
    STUDY/votes/<participant>.jsonl
    STUDY/report.json, report.md   written by ``dd eval study report``
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dd.errors import DDError
from dd.runtime.io import atomic_write_json, atomic_write_text

__all__ = [
    "QUESTIONS",
    "create_study",
    "load_study",
    "make_app",
    "study_report",
    "wilson_interval",
]

#: Seed 000's two questions: (key, text).
QUESTIONS = (
    ("artifacts", "Which image has fewer artifacts?"),
    ("overall", "Which image is better overall?"),
)
PARTICIPANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _prompt_map(folder: Path) -> dict[str, str]:
    """Prompts by image stem from ``report.jsonl`` (dd generate) or ``results.json``."""
    out: dict[str, str] = {}
    from dd.runtime.io import read_jsonl

    for rec in read_jsonl(folder / "report.jsonl"):
        if rec.get("image") and isinstance(rec.get("prompt"), str):
            out[Path(rec["image"]).stem] = rec["prompt"]
    return out


#: What dd generate and dd eval gen call a generated image; grid.png and such are not.
GENERATED = re.compile(r"^\d+-seed\d+$")


def _generated(folder: Path, images: Sequence[Path]) -> tuple[dict[str, Path], set[str]]:
    """``(candidates, all stems)`` of ``folder``'s images (not its subfolders') by stem: where
    some are named like generated images (``PPPP-seedS``), only those are candidates (a
    ``grid.png`` contact sheet is never paired with the other folder's grid)."""
    ims = {p.stem: p for p in images if p.parent == folder}
    named = {k: v for k, v in ims.items() if GENERATED.match(k)}
    return (named or ims), set(ims)


def create_study(
    dir_a: str | Path,
    dir_b: str | Path,
    out: str | Path,
    *,
    name_a: str | None = None,
    name_b: str | None = None,
    seed: int = 0,
    prompts: dict[str, str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pair the images of two folders by stem into a new study folder ``out``.

    An existing study is replaced only with ``overwrite`` and only while it has no votes
    (people's work is never replaced); a folder of anything else needs ``overwrite``."""
    from dd.engines.dreambooth import list_images
    from dd.runtime.io import check_output_folder, mark_run_folder

    a, b, out = Path(dir_a), Path(dir_b), Path(out)
    for d in (a, b):
        if not d.is_dir():
            raise DDError(f"image folder not found: {d}")
    if (out / "study.json").exists():
        votes = [p for p in (out / "votes").glob("*.jsonl") if p.stat().st_size]
        if votes:
            raise DDError(
                f"{out} holds a study with votes ({len(votes)} participant(s))",
                hint="votes are people's work: choose a new --out folder",
            )
        if not overwrite:
            raise DDError(
                f"{out} already holds a study",
                hint="choose a new --out folder, or pass --overwrite (it has no votes yet)",
            )
        shutil.rmtree(out / "images", ignore_errors=True)
    else:
        check_output_folder(out, "eval study create", overwrite=overwrite)
    ims_a, all_a = _generated(a, list_images(a))
    ims_b, all_b = _generated(b, list_images(b))
    stems = sorted(set(ims_a) & set(ims_b))
    if not stems:
        raise DDError(
            f"no image of {a} has a partner of the same name in {b}",
            hint="generate both with the same prompts and seeds (dd eval gen / dd generate)",
        )
    texts = {**_prompt_map(b), **_prompt_map(a), **(prompts or {})}
    rng = random.Random(seed)
    pairs = []
    for i, stem in enumerate(stems):
        files = {}
        for side, src in (("a", ims_a[stem]), ("b", ims_b[stem])):
            rel = f"images/{side}/{i:05d}{src.suffix.lower()}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
            files[side] = rel
        pairs.append(
            {
                "id": i,
                "stem": stem,
                "a": files["a"],
                "b": files["b"],
                "left": rng.choice(("a", "b")),
                "prompt": texts.get(stem),
            }
        )
    study = {
        "version": 1,
        "models": {"a": name_a or a.name, "b": name_b or b.name},
        "sources": {"a": str(a.resolve()), "b": str(b.resolve())},
        "questions": [{"key": k, "text": t} for k, t in QUESTIONS],
        "seed": seed,
        "pairs": pairs,
        "unpaired": {
            "a": sorted(all_a - set(stems)),
            "b": sorted(all_b - set(stems)),
        },
    }
    mark_run_folder(out, "eval study create")
    atomic_write_json(out / "study.json", study)
    (out / "votes").mkdir(exist_ok=True)
    return study


def load_study(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "study.json"
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DDError(
            f"{path} not found: not a study folder",
            hint="create one with dd eval study DIR_A DIR_B --out STUDY",
        ) from None
    except (OSError, ValueError) as e:
        raise DDError(f"cannot read {path}: {e}") from None
    if not isinstance(study, dict) or not isinstance(study.get("pairs"), list):
        raise DDError(f"{path} is not a dd study file")
    return study


def participant_order(study: dict[str, Any], participant: str) -> list[int]:
    """The pair ids in the order ``participant`` sees them (seeded by the name)."""
    ids = [p["id"] for p in study["pairs"]]
    random.Random(f"{study.get('seed', 0)}:{participant}").shuffle(ids)
    return ids


def votes_of(folder: Path, participant: str) -> list[dict[str, Any]]:
    from dd.runtime.io import read_jsonl

    return read_jsonl(folder / "votes" / f"{participant}.jsonl")


# ------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dd preference study</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}
.pair{display:flex;gap:1em}.pair figure{flex:1;margin:0;text-align:center}
.pair img{width:100%;max-width:768px;image-rendering:auto;border:1px solid #ccc}
.pair img.small{image-rendering:pixelated}
fieldset{margin:.8em 0}label{margin-right:1.5em}#done{display:none}
#prompt{color:#444}
</style></head><body>
<h1>Which image is better?</h1>
<div id="login"><p>Your participant name (letters, digits, - or _):
<input id="name" maxlength="64"> <button id="start">Start</button></p></div>
<div id="task" style="display:none">
<p id="progress"></p><p id="prompt"></p>
<div class="pair"><figure><img id="left" alt="left image"><figcaption>Left</figcaption>
</figure><figure><img id="right" alt="right image"><figcaption>Right</figcaption></figure></div>
<form id="form"><div id="questions"></div>
<button type="submit" id="submit">Submit and next</button></form><p id="error"></p></div>
<div id="done"><p>All pairs are done. Thank you!</p></div>
<script>
let who = null, current = null, questions = [];
const $ = (id) => document.getElementById(id);
async function api(path, opts) {
  const r = await fetch(path, opts);
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
async function next() {
  const j = await api('/api/next?participant=' + encodeURIComponent(who));
  if (j.done) {
    $('task').style.display = 'none'; $('done').style.display = 'block';
    document.body.dataset.done = '1'; return;
  }
  current = j;
  document.body.dataset.pair = j.pair;
  $('progress').textContent = 'Pair ' + (j.answered + 1) + ' of ' + j.total;
  $('prompt').textContent = j.prompt ? 'Prompt: ' + j.prompt : '';
  $('left').src = j.left; $('right').src = j.right;
  $('form').reset();
}
// Small images are scaled up to the column's width for judging, pixel for pixel.
for (const id of ['left', 'right']) {
  $(id).onload = () => $(id).classList.toggle('small', $(id).naturalWidth < $(id).width);
}
// A named access link fixes the participant: fill in the name and do not ask.
api('/api/study').then((s) => {
  if (s.participant) { $('name').value = s.participant; $('name').readOnly = true; }
}).catch(() => {});
$('start').onclick = async () => {
  who = $('name').value.trim();
  try {
    const s = await api('/api/study');
    questions = s.questions;
    $('questions').innerHTML = '';
    for (const q of questions) {
      const f = document.createElement('fieldset');
      f.innerHTML = '<legend>' + q.text + '</legend>' +
        ['left', 'right'].map(v => '<label><input type="radio" required name="' + q.key +
        '" value="' + v + '" data-q="' + q.key + '"> ' + v + '</label>').join('');
      $('questions').appendChild(f);
    }
    await api('/api/next?participant=' + encodeURIComponent(who));
    $('login').style.display = 'none'; $('task').style.display = 'block';
    await next();
  } catch (e) { alert(e.message); }
};
$('form').onsubmit = async (ev) => {
  ev.preventDefault();
  const answers = {};
  for (const q of questions) {
    const c = document.querySelector('input[name="' + q.key + '"]:checked');
    answers[q.key] = c ? c.value : null;
  }
  try {
    await api('/api/vote', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({participant: who, pair: current.pair, answers: answers})});
    $('error').textContent = '';
    await next();
    document.body.dataset.voted = String(Number(document.body.dataset.voted || 0) + 1);
  } catch (e) { $('error').textContent = e.message; }
};
</script></body></html>
"""


def make_app(folder: str | Path) -> Any:
    """The study page and its API on :class:`dd.runtime.web.WebApp`."""
    from dd.runtime.io import JsonlLog
    from dd.runtime.web import HTTPError, Response, WebApp, now_iso, safe_join

    root = Path(folder)
    study = load_study(root)
    pairs = {p["id"]: p for p in study["pairs"]}
    keys = [q["key"] for q in study["questions"]]
    logs: dict[str, Any] = {}
    app = WebApp(max_body=64 * 1024)

    def who(name: str | None) -> str:
        if not name or not PARTICIPANT.match(name):
            raise HTTPError(400, "participant name: 1-64 letters, digits, - or _")
        return name

    def done_ids(name: str) -> set[int]:
        return {int(v["pair"]) for v in votes_of(root, name) if "pair" in v}

    @app.route("GET", r"/")
    def index(req: Any) -> Any:
        return Response(
            PAGE.encode(), 200, "text/html; charset=utf-8", {"Cache-Control": "no-store"}
        )

    @app.route("GET", r"/api/study")
    def info(req: Any) -> Any:
        # ``participant``: the name a named access token fixes (the page then skips asking)
        return Response.json(
            {"questions": study["questions"], "total": len(pairs), "participant": req.annotator}
        )

    @app.route("GET", r"/api/next")
    def next_pair(req: Any) -> Any:
        name = who(req.annotator if req.annotator is not None else req.arg("participant"))
        done = done_ids(name)
        todo = [i for i in participant_order(study, name) if i not in done]
        if not todo:
            return Response.json({"done": True, "total": len(pairs), "answered": len(done)})
        p = pairs[todo[0]]
        return Response.json(
            {
                "done": False,
                "pair": p["id"],
                "prompt": p.get("prompt"),
                "left": f"/image/{p['id']}/left",
                "right": f"/image/{p['id']}/right",
                "answered": len(done),
                "total": len(pairs),
            }
        )

    @app.route("GET", r"/image/(\d+)/(left|right)")
    def image(req: Any) -> Any:
        p = pairs.get(int(req.match[0]))
        if p is None:
            raise HTTPError(404, "no such pair")
        side = p["left"] if req.match[1] == "left" else ("b" if p["left"] == "a" else "a")
        target = safe_join(root, p[side])
        if target is None:
            raise HTTPError(404, "not found")
        return Response.file(target)

    @app.route("POST", r"/api/vote")
    def vote(req: Any) -> Any:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        # A named access token is its annotator's; otherwise the page names the participant.
        name = who(req.annotator if req.annotator is not None else body.get("participant"))
        try:
            p = pairs[int(body.get("pair"))]
        except (TypeError, ValueError, KeyError):
            raise HTTPError(400, "unknown pair") from None
        answers = body.get("answers")
        if not isinstance(answers, dict) or any(
            answers.get(k) not in ("left", "right") for k in keys
        ):
            raise HTTPError(400, f"answer every question with left or right: {', '.join(keys)}")
        other = "b" if p["left"] == "a" else "a"
        winners = {k: (p["left"] if answers[k] == "left" else other) for k in keys}
        rec = {
            "participant": name,
            "pair": p["id"],
            "stem": p["stem"],
            "left": p["left"],
            "answers": {k: answers[k] for k in keys},
            "winner": winners,
            "time": now_iso(),
            "annotator": name,
            "auth": req.auth,
        }
        log = logs.setdefault(name, JsonlLog(root / "votes" / f"{name}.jsonl"))
        log.append(rec)
        return Response.json({"ok": True, "winner": winners})

    return app


def serve_study(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8766,
    *,
    tokens: dict[str, str | None] | None = None,
) -> Any:
    """Bind the study page (call ``.serve_forever()`` or ``.start()`` on the result); beyond
    loopback every request needs an access token (see :class:`dd.runtime.web.LocalServer`)."""
    from dd.runtime.web import serve

    return serve(make_app(folder), host=host, port=port, tokens=tokens)


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def wilson_interval(wins: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``wins / n`` ((nan, nan) when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    if not 0 < confidence < 1:
        raise DDError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def study_report(folder: str | Path, *, confidence: float = 0.95) -> dict[str, Any]:
    """Win rates per question with Wilson intervals; writes report.json and report.md."""
    from dd.runtime.io import read_jsonl

    root = Path(folder)
    study = load_study(root)
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted((root / "votes").glob("*.jsonl")):
        for rec in read_jsonl(path):
            if "pair" in rec and isinstance(rec.get("winner"), dict):
                last[(str(rec.get("participant", path.stem)), int(rec["pair"]))] = rec
    z = _z(confidence)
    models = study["models"]
    questions: list[dict[str, Any]] = []
    for q in study["questions"]:
        k = q["key"]
        counts = {"a": 0, "b": 0}
        for rec in last.values():
            w = rec["winner"].get(k)
            if w in counts:
                counts[w] += 1
        n = counts["a"] + counts["b"]
        entry: dict[str, Any] = {"key": k, "text": q["text"], "n": n}
        for side in ("a", "b"):
            lo, hi = wilson_interval(counts[side], n, z)
            entry[side] = {
                "model": models[side],
                "wins": counts[side],
                "rate": counts[side] / n if n else None,
                "ci": [None if math.isnan(lo) else lo, None if math.isnan(hi) else hi],
            }
        questions.append(entry)
    participants = sorted({p for p, _ in last})
    report = {
        "models": models,
        "confidence": confidence,
        "participants": len(participants),
        "votes": len(last),
        "pairs": len(study["pairs"]),
        "questions": questions,
    }
    atomic_write_json(root / "report.json", report)
    atomic_write_text(root / "report.md", report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    pct = round(100 * report["confidence"])
    m = report["models"]
    lines = [
        "# Preference study",
        "",
        f"{report['participants']} participant(s), {report['votes']} vote(s) on "
        f"{report['pairs']} pair(s); win rates with {pct}% Wilson score intervals.",
        "",
        f"| question | {m['a']} wins | {m['b']} wins | {m['a']} win rate | {m['b']} win rate |",
        "| --- | --- | --- | --- | --- |",
    ]

    def rate(side: dict[str, Any]) -> str:
        if side["rate"] is None:
            return "-"
        lo, hi = side["ci"]
        return f"{100 * side['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    for q in report["questions"]:
        lines.append(
            f"| {q['text']} | {q['a']['wins']} | {q['b']['wins']} | {rate(q['a'])} | "
            f"{rate(q['b'])} |"
        )
    return "\n".join(lines) + "\n"


def format_rates(report: dict[str, Any]) -> Sequence[str]:
    """One line per question for the terminal."""
    out = []
    for q in report["questions"]:
        parts = []
        for side in ("a", "b"):
            s = q[side]
            if s["rate"] is None:
                parts.append(f"{s['model']}: no votes")
            else:
                lo, hi = s["ci"]
                parts.append(
                    f"{s['model']} {100 * s['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
                )
        out.append(f"{q['text']} (n={q['n']}): " + "; ".join(parts))
    return out
