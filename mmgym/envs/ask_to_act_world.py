"""The household of ``mmgym/AskToAct-v0``: procedural scenes, the minimum-question count
and rendering (a top-down map and an egocentric close-up of one receptacle).

Modelled on Ask-to-Act ("Grounding Multimodal LLMs to Embodied Agents that Ask for Help
with Reinforcement Learning"): the instruction names only a category ("bring me the cup"),
several instances of it differ by colour, size or location, and one is the hidden target.
The paper's ambiguity types map onto which attribute separates the candidates:

- ``unambiguous``: one instance; asking is wasted (minimum 0 questions);
- ``attribute``: candidates differ only in colour (1 question);
- ``spatial``: they differ only in where they are (which receptacle; 1 question);
- ``size``: they differ only in size (1 question);
- ``combination``: a 2x2 design over two attributes with the target at ``(a0, b0)``, so no
  single attribute singles it out (2 questions).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from mmgym.envs.scenes import PALETTE, draw_shape

__all__ = [
    "AMBIGUITY_KINDS",
    "AMBIGUITY_TYPES",
    "CATEGORIES",
    "KINDS",
    "ROOMS",
    "SIZES",
    "SLOTS",
    "Obj",
    "Receptacle",
    "Scene",
    "generate_scene",
    "minimal_kinds",
    "render_map",
    "render_view",
    "target_description",
]

KINDS = ("color", "size", "location")  # what the user can be asked about the target
AMBIGUITY_TYPES = ("unambiguous", "attribute", "spatial", "size", "combination")
AMBIGUITY_KINDS: dict[str, tuple[str, ...]] = {"unambiguous": (), "attribute": ("color",), "spatial": ("location",), "size": ("size",)}
SIZES = ("small", "medium", "large")
CATEGORIES: dict[str, str] = {"cup": "circle", "book": "square", "toy": "triangle", "vase": "diamond", "bottle": "bar"}
ROOMS: dict[str, tuple[str, ...]] = {
    "kitchen": ("counter", "table", "shelf"),
    "living room": ("sofa", "coffee table", "tv stand"),
    "bedroom": ("bed", "desk", "dresser"),
    "bathroom": ("sink", "cabinet"),
    "office": ("desk", "bookcase"),
}
SLOTS = 4  # objects per receptacle (a 2x2 grid in the close-up view)
_FLOORS = ((92, 78, 66), (66, 82, 96), (80, 94, 72), (94, 80, 94), (84, 84, 84))
_SURFACE = (205, 205, 205)
_RADIUS = {"small": 0.055, "medium": 0.095, "large": 0.135}  # of the close-up's side


@dataclass(slots=True, frozen=True)
class Receptacle:
    """A piece of furniture; ``box`` is ``(x1, y1, x2, y2)`` as fractions of the map."""

    rid: str
    room: str
    kind: str
    index: int
    box: tuple[float, float, float, float]

    @property
    def name(self) -> str:
        return f"{self.room} {self.kind}"


@dataclass(slots=True)
class Obj:
    """One object; ``receptacle`` is ``None`` while the agent holds it."""

    oid: str
    category: str
    color: str
    size: str
    receptacle: str | None
    slot: int

    def value(self, kind: str) -> str:
        return {"color": self.color, "size": self.size, "location": self.receptacle or ""}[kind]

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.category}"


@dataclass(slots=True)
class Scene:
    """A generated household. ``objects`` is the initial layout (never mutated); the env
    copies it per episode. ``candidates`` are every instance of ``category``."""

    rooms: tuple[tuple[str, tuple[float, float, float, float]], ...]
    receptacles: dict[str, Receptacle]
    objects: dict[str, Obj]
    category: str
    target: str
    goal: str
    candidates: tuple[str, ...]
    ambiguity: str
    varied: tuple[str, ...]
    min_kinds: tuple[str, ...]

    def copy_objects(self) -> dict[str, Obj]:
        return {k: replace(o) for k, o in self.objects.items()}


def minimal_kinds(candidates: list[Obj], target: Obj) -> tuple[str, ...]:
    """The smallest set of attribute kinds whose values single out ``target`` among
    ``candidates``: one question per kind is the minimum an agent must ask (Ask-to-Act).

    >>> a = Obj("obj_1", "cup", "red", "small", "r1", 0)
    >>> b = Obj("obj_2", "cup", "red", "large", "r1", 1)
    >>> c = Obj("obj_3", "cup", "blue", "small", "r1", 2)
    >>> minimal_kinds([a, b, c], a), minimal_kinds([a, b], a), minimal_kinds([a], a)
    (('color', 'size'), ('size',), ())
    """
    others = [o for o in candidates if o is not target]
    for n in range(len(KINDS) + 1):
        for kinds in itertools.combinations(KINDS, n):
            if all(any(o.value(k) != target.value(k) for k in kinds) for o in others):
                return kinds
    raise ValueError("two candidates share colour, size and location; the target cannot be singled out")


# ---------------------------------------------------------------- generation
def _layout(rng: np.random.Generator) -> tuple[tuple, dict[str, Receptacle]]:
    """2-4 rooms on a grid of the map, 2-3 receptacles per room in a row."""
    n = int(rng.integers(2, 5))
    names = [list(ROOMS)[i] for i in sorted(rng.permutation(len(ROOMS))[:n])]
    if n == 2:
        cells = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    elif n == 3:
        cells = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    else:
        cells = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]
    recs: dict[str, Receptacle] = {}
    for room, (x1, y1, x2, y2) in zip(names, cells):
        catalog = ROOMS[room]
        m = int(rng.integers(2, min(3, len(catalog)) + 1))
        kinds = [catalog[i] for i in sorted(rng.permutation(len(catalog))[:m])]
        w, h = x2 - x1, y2 - y1
        rw = (w - 0.03) / m
        cy, rh = y1 + h * 0.6, min(0.17, h * 0.4)
        for j, kind in enumerate(kinds):
            bx = x1 + 0.015 + j * rw
            rid = f"{room} {kind}".replace(" ", "_")
            recs[rid] = Receptacle(rid, room, kind, len(recs) + 1, (bx + 0.01, cy - rh / 2, bx + rw - 0.01, cy + rh / 2))
    return tuple(zip(names, cells)), recs


def _candidate_values(rng: np.random.Generator, varied: tuple[str, ...], k: int, locations: list[str]) -> list[dict[str, str]]:
    """Attribute rows of the ``k`` candidates; row 0 is the target."""
    colors = list(PALETTE)
    pools = {
        "color": [colors[i] for i in rng.permutation(len(colors))],
        "size": [SIZES[i] for i in rng.permutation(len(SIZES))],
        "location": [locations[i] for i in rng.permutation(len(locations))],
    }
    base = {kd: pools[kd][0] for kd in KINDS}
    if len(varied) <= 1:
        return [dict(base, **({varied[0]: pools[varied[0]][i]} if varied else {})) for i in range(k)]
    a, b = varied
    return [dict(base, **{a: pools[a][i], b: pools[b][j]}) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))[:k]]


def _num_candidates(rng: np.random.Generator, varied: tuple[str, ...], max_candidates: int, n_locations: int) -> int:
    if not varied:
        return 1
    if len(varied) == 2:
        return int(rng.integers(3, min(4, max_candidates) + 1))
    limit = {"color": len(PALETTE), "size": len(SIZES), "location": min(3, n_locations)}[varied[0]]
    return int(rng.integers(2, min(max_candidates, limit) + 1))


def generate_scene(rng: np.random.Generator, ambiguity: str, *, max_candidates: int = 4, max_distractors: int = 5) -> Scene:
    """Draw a household whose candidate set has the given ambiguity type (with ``rng`` only)."""
    if ambiguity not in AMBIGUITY_TYPES:
        raise ValueError(f"unknown ambiguity type {ambiguity!r}; known: {', '.join(AMBIGUITY_TYPES)}")
    rooms, recs = _layout(rng)
    rids = list(recs)
    goal = rids[int(rng.integers(len(rids)))]
    locations = [r for r in rids if r != goal]
    if ambiguity == "combination":
        pairs = list(itertools.combinations(KINDS, 2))
        varied = pairs[int(rng.integers(len(pairs)))]
    else:
        varied = AMBIGUITY_KINDS[ambiguity]
    k = _num_candidates(rng, varied, max_candidates, len(locations))
    cats = list(CATEGORIES)
    category = cats[int(rng.integers(len(cats)))]
    rows = [dict(r, category=category) for r in _candidate_values(rng, varied, k, locations)]
    used = {}
    for r in rows:
        used[r["location"]] = used.get(r["location"], 0) + 1
    others = [c for c in cats if c != category]
    colors = list(PALETTE)
    for _ in range(int(rng.integers(2, max_distractors + 1))):
        free = [r for r in rids if used.get(r, 0) < (SLOTS - 1 if r == goal else SLOTS)]
        if not free:
            break
        loc = free[int(rng.integers(len(free)))]
        used[loc] = used.get(loc, 0) + 1
        rows.append({"category": others[int(rng.integers(len(others)))], "color": colors[int(rng.integers(len(colors)))],
                     "size": SIZES[int(rng.integers(len(SIZES)))], "location": loc})
    slots = {r: [int(s) for s in rng.permutation(SLOTS)] for r in rids}
    ids = rng.permutation(len(rows)) + 1
    objs = [Obj(f"obj_{int(i)}", r["category"], r["color"], r["size"], r["location"], slots[r["location"]].pop()) for i, r in zip(ids, rows)]
    target = objs[0]
    cands = [o for o in objs if o.category == category]
    objs.sort(key=lambda o: int(o.oid[4:]))
    return Scene(
        rooms=rooms, receptacles=recs, objects={o.oid: o for o in objs}, category=category, target=target.oid, goal=goal,
        candidates=tuple(sorted((o.oid for o in cands), key=lambda s: int(s[4:]))), ambiguity=ambiguity, varied=tuple(varied),
        min_kinds=minimal_kinds(cands, target),
    )


def target_description(scene: Scene) -> dict[str, Any]:
    """What the user knows: the target's attributes and where it must go (JSON-friendly)."""
    t = scene.objects[scene.target]
    rec = scene.receptacles[t.receptacle]
    return {
        "category": t.category, "color": t.color, "size": t.size, "room": rec.room, "receptacle": rec.kind,
        "location": rec.name, "goal": scene.receptacles[scene.goal].name,
    }


# ---------------------------------------------------------------- rendering
def _text(img: np.ndarray, s: str, x: float, y: float, scale: float, color: tuple[int, int, int] = (255, 255, 255)) -> None:
    cv2.putText(img, s, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def render_map(scene: Scene, objects: dict[str, Obj], size: int = 224, agent_at: str | None = None) -> np.ndarray:
    """Top-down ``(size, size, 3)`` map: rooms, numbered receptacles and tiny objects."""
    img = np.full((size, size, 3), 30, np.uint8)
    for i, (room, (x1, y1, x2, y2)) in enumerate(scene.rooms):
        p1, p2 = (int(x1 * size) + 2, int(y1 * size) + 2), (int(x2 * size) - 3, int(y2 * size) - 3)
        cv2.rectangle(img, p1, p2, _FLOORS[list(ROOMS).index(room)], -1)
        _text(img, room, p1[0] + 3, p1[1] + 12, 0.35 * size / 224)
    for rec in scene.receptacles.values():
        x1, y1, x2, y2 = (int(v * size) for v in rec.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), _SURFACE, -1)
        cv2.rectangle(img, (x1, y1), (x2, y2), (60, 60, 60), 1)
        _text(img, str(rec.index), x1, y1 - 3, 0.32 * size / 224)
        if rec.rid == agent_at:
            cv2.rectangle(img, (x1 - 2, y1 - 2), (x2 + 2, y2 + 2), (255, 255, 255), 1)
    for o in objects.values():
        if o.receptacle is None:
            continue
        x1, y1, x2, y2 = scene.receptacles[o.receptacle].box
        cx = (x1 + (x2 - x1) * (o.slot + 0.5) / SLOTS) * size
        cy = (y1 + y2) / 2 * size
        r = {"small": 0.008, "medium": 0.012, "large": 0.017}[o.size] * size
        draw_shape(img, CATEGORIES[o.category], cx, cy, r, PALETTE[o.color])
    return img


def render_view(scene: Scene, objects: dict[str, Obj], rid: str, size: int = 128) -> np.ndarray:
    """Egocentric close-up ``(size, size, 3)`` of receptacle ``rid``: its objects in a 2x2
    grid, drawn to scale, each with its id number beside it."""
    rec = scene.receptacles[rid]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = _FLOORS[list(ROOMS).index(rec.room)]
    _text(img, rec.name, 0.04 * size, 0.12 * size, 0.35 * size / 128)
    sx1, sy1, sx2, sy2 = 0.05 * size, 0.18 * size, 0.95 * size, 0.96 * size
    cv2.rectangle(img, (int(sx1), int(sy1)), (int(sx2), int(sy2)), _SURFACE, -1)
    cv2.rectangle(img, (int(sx1), int(sy1)), (int(sx2), int(sy2)), (70, 70, 70), 1)
    cw, ch = (sx2 - sx1) / 2, (sy2 - sy1) / 2
    for o in objects.values():
        if o.receptacle != rid:
            continue
        col, row = o.slot % 2, o.slot // 2
        cx, cy = sx1 + cw * (col + 0.5), sy1 + ch * (row + 0.55)
        draw_shape(img, CATEGORIES[o.category], cx, cy, _RADIUS[o.size] * size, PALETTE[o.color])
        _text(img, o.oid[4:], sx1 + cw * col + 3, sy1 + ch * row + 11 * size / 128, 0.33 * size / 128, (10, 10, 10))
    return img
