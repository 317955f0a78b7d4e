"""Synthetic driving scenes written in the DriveBench, DriveLM and Drive-KD file formats.

A seeded generator draws small scenes around an ego vehicle: a road whose curvature sets the ego
steering, vehicles (with a moving status drawn as an arrow, or brake lights when stopped),
pedestrians (crossing or standing), traffic lights (red, yellow, green) and stop signs, each on
one of the six nuScenes cameras. Every view is rendered as a small image. Questions follow the
official phrasings of the four DriveBench question types, with `<cK,CAM,x,y>` tags, and every
answer follows from scene rules, so a model can learn them and an exact scorer can check them:

- perception MCQ (tag 0): the moving status of a moving vehicle, options A-C in a seeded order.
- perception VQA (tag 2): the important objects, as DriveLM's template sentence.
- prediction VQA (tag 3): which objects to notice first, second, third; the order is by hazard,
  then ego lane, then distance, then camera order.
- planning VQA (tag 1): the three official templates (actions based on an object, actions that
  lead to a collision, safe actions), answered by deterministic templates.
- behavior MCQ (tag 0): four options from DriveLM's steering x speed sentences.

That is question set "driving". Set "grounded" (`questions="grounded"`) asks instead a few short
questions that a tiny model can learn from one rendered view in minutes; each tags one object,
so only that object's camera view goes with the question, and each has one exact answer. Its
views differ from set "driving" so that a tiny vision tower sees what the answers depend on: the
objects are drawn 1.5 times larger, a light's whole housing takes the lit colour and a stopped
vehicle's brake lights cover the lower half of its body (`render_view(bold=True)`), and the
scenes show a traffic light and a stopped vehicle ahead more often (`GROUNDED_SCENES`):

- perception MCQ (tag 0): the colour of one vehicle of the scene, drawn at random (options A-D:
  red, blue, white, black).
- behavior MCQ (tag 0, capability reasoning): does the traffic light or the vehicle in the ego
  lane (on CAM_FRONT) oblige the ego vehicle to stop (options A. Yes, B. No)? It does when it is
  a hazard (rules below): a red light, a stopped vehicle close ahead. Non-hazards are asked
  about one time in three, so that Yes and No are about equally frequent.
- planning VQA (tag 1): the official "actions based on <object>" question about the same
  objects, answered by one short sentence: "Stop.", "Slow down." or "Keep going." (scored by
  exact match, `drivekd_jax.eval.results`).

The options of a grounded MCQ are always listed in the same order.

Scene rules: a red light or stop sign on CAM_FRONT, a pedestrian crossing in the ego lane, or a
stopped vehicle close ahead in the ego lane is a hazard; then the ego vehicle is "going
straight" and "not moving", and the safe action is to stop. Otherwise the steering follows the
road curvature, and the speed the lead vehicle in the ego lane (close: slowly, far: normal speed,
none: fast).

`write_synthetic_driving(out_dir, ..., questions="driving" | "grounded")` writes, under `out_dir`:

```
samples/<CAM>/<frame_token>__<CAM>.png    every frame's six views
drivebench-test.json                       DriveBench QA list of the test frames (letters for MCQ)
visual_description.json                    DriveBench's per-keyframe object descriptions
v1_1_train_nus.json                        DriveLM nested QAs of all frames: like the real release,
                                           the DriveBench keyframes are DriveLM *train* frames
drivekd_train.json, drivekd_test.json      Drive-KD messages/images/question_type
corruption/<Folder>/<CAM>/...              test-frame views for the requested corruptions
```

`out_dir` is then the manual dir of all three builders (`sources.build_dataset(kind, out_dir,
tfds_dir)`). CLI: `python -m drivekd_jax.data.synthetic --out DIR --num_train_frames 200
--num_test_frames 20 --seed 0 --image_size 64 [--questions grounded] [--corruptions fog,bright]`.

The corruptions are simple numpy stand-ins named after DriveBench's 15 folders, not the
benchmark's corruption code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drivekd_jax.data import records as rec

MOVING_STATUS_OPTIONS = ("Going ahead.", "Turn left.", "Turn right.")
STEERINGS = (
  "steering to the left",
  "slightly steering to the left",
  "going straight",
  "slightly steering to the right",
  "steering to the right",
)
SPEEDS = ("driving slowly", "driving with normal speed", "driving fast", "driving very fast")
NOT_MOVING = "The ego vehicle is going straight. The ego vehicle is not moving."

IMPORTANT_OBJECTS_QUESTION = (
  "What are the important objects in the current scene? Those objects will be considered for the"
  " future reasoning and driving decision."
)
NOTICE_QUESTION = (
  "What object should the ego vehicle notice first when the ego vehicle is getting to the next"
  " possible location? What is the state of the object that is first noticed by the ego vehicle"
  " and what action should the ego vehicle take? What object should the ego vehicle notice second"
  " when the ego vehicle is getting to the next possible location? What is the state of the"
  " object perceived by the ego vehicle as second and what action should the ego vehicle take?"
  " What object should the ego vehicle notice third? What is the state of the object perceived"
  " by the ego vehicle as third and what action should the ego vehicle take?"
)
SAFE_ACTIONS_QUESTION = "In this scenario, what are safe actions to take for the ego vehicle?"
MCQ_SUFFIX = " Please select the correct answer from the following options:"

_CAMERA_SIDE = {
  "CAM_FRONT": "front",
  "CAM_FRONT_LEFT": "front left",
  "CAM_FRONT_RIGHT": "front right",
  "CAM_BACK": "back",
  "CAM_BACK_LEFT": "back left",
  "CAM_BACK_RIGHT": "back right",
}
_COLORS = {
  "red": (200, 30, 30),
  "blue": (40, 70, 210),
  "white": (235, 235, 235),
  "black": (25, 25, 25),
  "yellow": (230, 200, 40),
  "green": (40, 170, 60),
}
_VEHICLE_KINDS = ("sedan", "SUV", "truck", "bus")
_HORIZON = 0.45
_KEEP = "keep going ahead at the same speed"


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object of a synthetic scene; `x`, `y` are the normalised centre on `camera`'s view."""

  index: int
  kind: str  # vehicle, pedestrian, traffic_light, stop_sign
  description: str  # e.g. "red sedan"
  camera: str
  x: float
  y: float
  size: float  # width as a fraction of the view
  status: str  # vehicle: Going ahead/Turn left/Turn right/Stopped; pedestrian: crossing/standing
  in_ego_lane: bool = False
  near: bool = False

  @property
  def category(self) -> str:
    return {"vehicle": "Vehicle", "pedestrian": "Pedestrian"}.get(self.kind, "Traffic element")

  def tag(self, *, pixels: bool) -> str:
    if pixels:
      x, y = self.x * rec.NUSCENES_IMAGE_WIDTH, self.y * rec.NUSCENES_IMAGE_HEIGHT
      return f"<c{self.index},{self.camera},{x:.1f},{y:.1f}>"
    return f"<c{self.index},{self.camera},{self.x:.4f},{self.y:.4f}>"

  def bbox_pixels(self) -> list[float]:
    half_w = self.size / 2
    half_h = self.size * (0.6 if self.kind == "vehicle" else 1.0)
    box = (self.x - half_w, self.y - half_h / 2, self.x + half_w, self.y + half_h / 2)
    scale = (rec.NUSCENES_IMAGE_WIDTH, rec.NUSCENES_IMAGE_HEIGHT) * 2
    return [round(float(np.clip(v, 0, 1)) * s, 1) for v, s in zip(box, scale)]

  @property
  def is_hazard(self) -> bool:
    if self.camera != "CAM_FRONT":
      return False
    if self.kind == "traffic_light":
      return self.status == "red"
    if self.kind == "stop_sign":
      return True
    if self.kind == "pedestrian":
      return self.status == "crossing" and self.in_ego_lane
    return self.in_ego_lane and self.near and self.status == "Stopped"


@dataclasses.dataclass(frozen=True)
class Scene:
  scene_token: str
  frame_token: str
  curvature: int  # -2..2, left to right
  objects: tuple[SceneObject, ...]

  @property
  def hazard(self) -> bool:
    return any(o.is_hazard for o in self.objects)

  @property
  def lead_vehicle(self) -> SceneObject | None:
    lead = [o for o in self.objects if o.kind == "vehicle" and o.in_ego_lane]
    return lead[0] if lead else None

  def behavior(self) -> str:
    if self.hazard:
      return NOT_MOVING
    lead = self.lead_vehicle
    speed = SPEEDS[2] if lead is None else (SPEEDS[0] if lead.near else SPEEDS[1])
    return f"The ego vehicle is {STEERINGS[self.curvature + 2]}. The ego vehicle is {speed}."

  def priority(self) -> list[SceneObject]:
    """Objects in the order the ego vehicle should notice them."""

    def key(o: SceneObject):
      return (
        not o.is_hazard,
        not o.in_ego_lane,
        not o.near,
        rec.CAMERAS.index(o.camera),
        o.index,
      )

    return sorted(self.objects, key=key)


# ------------------------------------------------------------------------------------------------
# Scene sampling.


def lane_center_x(y: float, curvature: int) -> float:
  depth = (1.0 - y) / (1.0 - _HORIZON)
  return 0.5 + 0.12 * curvature * depth**2


DRIVING_SIGNALS = ("traffic_light", "stop_sign", "none", "none")


def sample_scene(
  rng: np.random.Generator,
  scene_token: str,
  frame_token: str,
  *,
  signals: Sequence[str] = DRIVING_SIGNALS,
  stopped_share: float = 0.3,
) -> Scene:
  """Draws one scene (3-5 objects, at least one on CAM_FRONT).

  `signals`: the four equally likely draws of the front view's light or sign ("traffic_light",
  "stop_sign", "none"); `stopped_share`: how often the vehicle in the ego lane is stopped.
  """
  if len(signals) != 4 or not set(signals) <= {"traffic_light", "stop_sign", "none"}:
    raise ValueError(f"signals must be four of traffic_light, stop_sign, none; got {signals}")
  curvature = int(rng.integers(-2, 3))
  specs = []
  # The front view: at most one object in the ego lane plus one light or sign.
  lane_kind = rng.choice(["vehicle", "vehicle", "pedestrian", "none"])
  if lane_kind != "none":
    near = bool(rng.random() < 0.5)
    y = 0.8 if near else 0.6
    x = lane_center_x(y, curvature)
    if lane_kind == "vehicle":
      status = "Stopped" if rng.random() < stopped_share else "Going ahead"
      specs.append(("vehicle", "CAM_FRONT", x, y, 0.3 if near else 0.18, status, True, near))
    else:
      specs.append(("pedestrian", "CAM_FRONT", x, y, 0.1, "crossing", True, near))
  signal = rng.choice(list(signals))
  if signal == "traffic_light":
    color = str(rng.choice(["red", "yellow", "green"]))
    specs.append(("traffic_light", "CAM_FRONT", float(rng.choice([0.2, 0.8])), 0.2, 0.12, color))
  elif signal == "stop_sign":
    specs.append(("stop_sign", "CAM_FRONT", float(rng.choice([0.15, 0.85])), 0.38, 0.12, ""))
  # Other views (and the front's sides): vehicles and standing pedestrians.
  num_others = int(rng.integers(3, 6)) - len(specs)
  slots = [(c, sx) for c in rec.CAMERAS for sx in (0.2, 0.8)]
  for slot in rng.permutation(len(slots))[: max(num_others, 1)]:
    camera, x = slots[int(slot)]
    if camera == "CAM_FRONT" and any(
      s[0] in ("traffic_light", "stop_sign") and abs(s[2] - x) < 0.2 for s in specs
    ):
      x = 1.0 - x
    if rng.random() < 0.75:
      status = str(rng.choice(["Going ahead", "Turn left", "Turn right", "Stopped"]))
      near = bool(rng.random() < 0.5)
      y = 0.78 if near else 0.62
      specs.append(("vehicle", camera, x, y, 0.28 if near else 0.18, status, False, near))
    else:
      specs.append(("pedestrian", camera, x, 0.66, 0.1, "standing", False, False))
  objects = []
  for index, spec in enumerate(specs, start=1):
    kind, camera, x, y, size, status = spec[:6]
    in_lane, near = (spec[6], spec[7]) if len(spec) > 6 else (False, False)
    objects.append(
      SceneObject(
        index=index,
        kind=kind,
        description=_describe(rng, kind, status),
        camera=camera,
        x=round(float(x), 4),
        y=round(float(y), 4),
        size=size,
        status=status,
        in_ego_lane=in_lane,
        near=near,
      )
    )
  return Scene(scene_token, frame_token, curvature, tuple(objects))


def _describe(rng: np.random.Generator, kind: str, status: str) -> str:
  if kind == "vehicle":
    color = str(rng.choice(["red", "blue", "white", "black"]))
    return f"{color} {rng.choice(_VEHICLE_KINDS)}"
  if kind == "pedestrian":
    return "pedestrian"
  if kind == "traffic_light":
    return f"{status} light"
  return "stop sign"


# ------------------------------------------------------------------------------------------------
# Rendering.


def render_view(scene: Scene, camera: str, size: int, *, bold: bool = False) -> np.ndarray:
  """The `camera` view of `scene` as uint8 [size, size, 3].

  `bold` (the grounded set) draws the states a stop depends on as large areas: the whole light
  housing in the lit colour, brake lights over the lower half of a stopped vehicle (a tiny
  vision tower learns a vehicle's body colour but not a lamp or brake lights of a few pixels).
  """
  image = np.empty((size, size, 3), np.uint8)
  horizon = int(_HORIZON * size)
  image[:horizon] = (135, 180, 225)
  image[horizon:] = (90, 110, 80)
  rows = np.arange(horizon, size)
  ys = (rows + 0.5) / size
  curvature = scene.curvature if camera == "CAM_FRONT" else 0
  centers = np.array([lane_center_x(y, curvature) for y in ys])
  depth = (1.0 - ys) / (1.0 - _HORIZON)
  half_road = 0.45 * (1.0 - depth) + 0.05
  cols = (np.arange(size) + 0.5) / size
  road = np.abs(cols[None, :] - centers[:, None]) < half_road[:, None]
  ground = image[horizon:]
  ground[road] = (70, 70, 75)
  if camera in ("CAM_FRONT", "CAM_BACK"):
    for offset in (-1.0, 1.0):  # Lane lines of the ego lane.
      line_x = centers + offset * half_road / 2.2
      line = np.abs(cols[None, :] - line_x[:, None]) < 0.6 / size + 0.01 * (1 - depth[:, None])
      ground[line] = (240, 240, 240)
  for obj in scene.objects:
    if obj.camera == camera:
      _draw_object(image, obj, bold=bold)
  return image


def _box(image, x0, y0, x1, y1, color):
  size = image.shape[0]
  r0, r1 = int(np.clip(y0 * size, 0, size)), int(np.clip(np.ceil(y1 * size), 0, size))
  c0, c1 = int(np.clip(x0 * size, 0, size)), int(np.clip(np.ceil(x1 * size), 0, size))
  image[r0:r1, c0:c1] = color


def _disc(image, cx, cy, radius, color):
  size = image.shape[0]
  yy, xx = np.mgrid[0:size, 0:size]
  mask = ((xx + 0.5) / size - cx) ** 2 + ((yy + 0.5) / size - cy) ** 2 <= radius**2
  image[mask] = color


def _triangle(image, cx, cy, radius, direction, color):
  """A filled triangle pointing up, left or right."""
  size = image.shape[0]
  yy, xx = np.mgrid[0:size, 0:size]
  u = (xx + 0.5) / size - cx
  v = (yy + 0.5) / size - cy
  along, across = {"up": (-v, u), "left": (-u, v), "right": (u, v)}[direction]
  mask = (along >= -radius) & (along <= radius) & (np.abs(across) <= (radius - along) / 2)
  image[mask] = color


def _draw_object(image: np.ndarray, obj: SceneObject, *, bold: bool = False) -> None:
  w = obj.size
  if obj.kind == "vehicle":
    color = _COLORS[obj.description.split()[0]]
    h = 0.6 * w
    _box(image, obj.x - w / 2, obj.y - h / 2, obj.x + w / 2, obj.y + h / 2, color)
    mark = (0, 0, 0) if obj.description.startswith("white") else (255, 255, 255)
    if obj.status == "Stopped" and bold:
      _box(image, obj.x - w / 2, obj.y + h / 12, obj.x - w / 8, obj.y + h / 2, (255, 0, 0))
      _box(image, obj.x + w / 8, obj.y + h / 12, obj.x + w / 2, obj.y + h / 2, (255, 0, 0))
    elif obj.status == "Stopped":
      _box(image, obj.x - w / 2, obj.y + h / 6, obj.x - w / 4, obj.y + h / 2, (255, 0, 0))
      _box(image, obj.x + w / 4, obj.y + h / 6, obj.x + w / 2, obj.y + h / 2, (255, 0, 0))
    else:
      direction = {"Going ahead": "up", "Turn left": "left", "Turn right": "right"}[obj.status]
      _triangle(image, obj.x, obj.y, h / 2.5, direction, mark)
  elif obj.kind == "pedestrian":
    h = 2.5 * w
    color = (250, 140, 20) if obj.status == "crossing" else (150, 60, 160)
    _box(image, obj.x - w / 4, obj.y - h / 4, obj.x + w / 4, obj.y + h / 2, color)
    _disc(image, obj.x, obj.y - h / 3, w / 3, (240, 200, 170))
  elif obj.kind == "traffic_light":
    housing = _COLORS[obj.status] if bold else (20, 20, 20)
    _box(image, obj.x - w / 3, obj.y - w, obj.x + w / 3, obj.y + w, housing)
    offset = {"red": -0.6, "yellow": 0.0, "green": 0.6}[obj.status] * w
    _disc(image, obj.x, obj.y + offset, w / 3, _COLORS[obj.status])
  else:  # stop sign
    _box(image, obj.x - w / 10, obj.y, obj.x + w / 10, obj.y + w * 1.5, (120, 120, 120))
    _disc(image, obj.x, obj.y, w / 2, (210, 20, 20))
    _box(image, obj.x - w / 3, obj.y - w / 12, obj.x + w / 3, obj.y + w / 12, (255, 255, 255))


def corrupt(image: np.ndarray, stem: str, rng: np.random.Generator) -> np.ndarray:
  """A simple stand-in for DriveBench corruption `stem` (see `drivebench.CORRUPTIONS`)."""
  x = image.astype(np.float32)
  size = image.shape[0]
  if stem == "bright":
    x = x + 70
  elif stem == "lowlight":
    x = x * 0.3
  elif stem == "fog":
    x = 0.45 * x + 0.55 * 200
  elif stem == "saturate":
    gray = x.mean(-1, keepdims=True)
    x = gray + 2.0 * (x - gray)
  elif stem in ("cameracrash", "framelost"):
    x = np.zeros_like(x)
  elif stem == "colorquant":
    x = np.round(x / 85) * 85
  elif stem == "biterror":
    flip = rng.random(x.shape[:2]) < 0.05
    x[flip] = rng.integers(0, 256, (int(flip.sum()), 3))
  elif stem == "motion":
    x = sum(np.roll(x, s, axis=1) for s in range(-2, 3)) / 5
  elif stem == "zoom":
    crop = x[size // 8 : size - size // 8, size // 8 : size - size // 8]
    idx = np.linspace(0, crop.shape[0] - 1, size).astype(int)
    x = 0.5 * x + 0.5 * crop[idx][:, idx]
  elif stem == "h256":
    b = 4
    blocks = x[: size // b * b, : size // b * b].reshape(size // b, b, size // b, b, 3)
    x[: size // b * b, : size // b * b] = np.repeat(
      np.repeat(blocks.mean((1, 3)), b, axis=0), b, axis=1
    )
  elif stem == "rain":
    streaks = rng.random((size, size)) < 0.03
    streaks = streaks | np.roll(streaks, 1, 0) | np.roll(streaks, 2, 0)
    x[streaks] = 0.5 * x[streaks] + 100
  elif stem == "snow":
    x[rng.random((size, size)) < 0.06] = 250
  elif stem in ("lens", "water"):
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    blob = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.04
    x[blob] = 30 if stem == "lens" else x[blob].mean(0)
  else:
    raise ValueError(f"unknown corruption {stem!r}")
  return np.clip(x, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Questions and answers.


@dataclasses.dataclass(frozen=True)
class QA:
  """One QA in all three formats' flavours."""

  question_type: str  # DriveBench/DriveLM type: perception, prediction, planning, behavior
  tag: int
  drivelm_q: str  # DriveLM phrasing (pixel tags, open questions)
  drivelm_a: str
  bench_q: str  # DriveBench phrasing (normalised tags, MCQ options)
  bench_a: str  # DriveBench GT (MCQ letter)
  kd_a: str  # Drive-KD answer (MCQ: "Final: X. option")


def _state(obj: SceneObject) -> str:
  if obj.kind == "vehicle":
    return {
      "Going ahead": "going ahead",
      "Turn left": "turning left",
      "Turn right": "turning right",
      "Stopped": "stopped",
    }[obj.status]
  if obj.kind == "pedestrian":
    return "crossing the road" if obj.status == "crossing" else "standing"
  if obj.kind == "traffic_light":
    return f"a {obj.status} traffic light"
  return "a stop sign"


def _action(obj: SceneObject) -> str:
  if obj.is_hazard:
    return "stop"
  if obj.kind == "traffic_light" and obj.status == "yellow":
    return "slow down"
  if obj.kind == "vehicle" and obj.in_ego_lane and obj.near:
    return "slow down"
  return _KEEP


def _reason(obj: SceneObject) -> str:
  if obj.kind == "traffic_light" and obj.camera == "CAM_FRONT":
    return f"that the traffic light ahead is {obj.status}"
  if obj.kind == "stop_sign" and obj.is_hazard:
    return "that there is a stop sign ahead"
  if obj.kind == "pedestrian" and obj.is_hazard:
    return "that a pedestrian is crossing in front of the ego vehicle"
  if obj.kind == "vehicle" and obj.in_ego_lane and obj.status == "Stopped" and obj.near:
    return "that the vehicle ahead has stopped"
  if obj.kind == "vehicle" and obj.in_ego_lane and obj.near:
    return "to keep a safe distance from the vehicle ahead"
  return "to follow the traffic rules"


def _collision(obj: SceneObject, tag: str) -> str:
  side = _CAMERA_SIDE[obj.camera]
  if obj.kind in ("traffic_light", "stop_sign"):
    return "No such action will lead to a collision."
  if obj.camera == "CAM_FRONT" and obj.in_ego_lane:
    action = "Accelerating and going straight"
  elif obj.camera == "CAM_BACK" and obj.near:
    action = "Braking suddenly"
  elif "left" in side and obj.near:
    action = "Changing to the left lane"
  elif "right" in side and obj.near:
    action = "Changing to the right lane"
  else:
    return "No such action will lead to a collision."
  return f"{action} can lead to a collision with {tag}."


def _options(correct: str, pool: Sequence[str], count: int, rng) -> tuple[str, str]:
  """(MCQ option text "A. x B. y ...", correct letter) with `correct` among seeded distractors."""
  distractors = [p for p in pool if p != correct]
  chosen = [distractors[int(i)] for i in rng.permutation(len(distractors))[: count - 1]]
  options = chosen + [correct]
  order = rng.permutation(len(options))
  options = [options[int(i)] for i in order]
  letter = "ABCD"[options.index(correct)]
  text = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
  return text, letter


def _mcq_kd_answer(letter: str, correct: str) -> str:
  return f"Final: {letter}. {correct}"


def scene_qas(scene: Scene, rng: np.random.Generator) -> list[QA]:
  """The QAs of one scene, in DriveLM stage order."""
  qas = []
  px = {o.index: o.tag(pixels=True) for o in scene.objects}
  nm = {o.index: o.tag(pixels=False) for o in scene.objects}
  moving = [o for o in scene.objects if o.kind == "vehicle" and o.status != "Stopped"]
  ranked = scene.priority()
  important = ranked[:3]

  def both(template: str, obj: SceneObject | None = None) -> tuple[str, str]:
    if obj is None:
      return template, template
    return template.format(tag=px[obj.index]), template.format(tag=nm[obj.index])

  # Perception MCQ: moving status.
  for obj in moving[:2]:
    options, letter = _options(obj.status + ".", MOVING_STATUS_OPTIONS, 3, rng)
    q_lm, q_b = both("What is the moving status of object {tag}?", obj)
    qas.append(
      QA(
        "perception",
        0,
        q_lm,
        obj.status + ".",
        f"{q_b}{MCQ_SUFFIX} {options}",
        letter,
        _mcq_kd_answer(letter, obj.status + "."),
      )
    )
  # Perception VQA: important objects.
  phrases = [
    f"a {o.description} to the {_CAMERA_SIDE[o.camera]} of the ego vehicle" for o in important
  ]
  listing = ", ".join(phrases[:-1]) + f", and {phrases[-1]}"

  def ids(tags: dict[int, str]) -> str:
    parts = [tags[o.index] for o in important]
    return ", ".join(parts[:-1]) + f", and {parts[-1]}"

  answer_lm = f"There is {listing}. The IDs of these objects are {ids(px)}."
  answer_b = f"There is {listing}. The IDs of these objects are {ids(nm)}."
  qas.append(
    QA(
      "perception",
      2,
      IMPORTANT_OBJECTS_QUESTION,
      answer_lm,
      IMPORTANT_OBJECTS_QUESTION,
      answer_b,
      answer_b,
    )
  )
  # Prediction VQA: notice first, second, third.
  ordinals = ("Firstly", "Secondly", "Thirdly")

  def notice(name_of) -> str:
    return " ".join(
      f"{ordinals[i]} notice that {name_of(o)}. The object is {_state(o)}, so the ego vehicle"
      f" should {_action(o)}."
      for i, o in enumerate(important)
    )

  notice_lm = notice(lambda o: px[o.index])
  notice_b = notice(lambda o: f"the {o.description} at {_CAMERA_SIDE[o.camera]} camera")
  qas.append(QA("prediction", 3, NOTICE_QUESTION, notice_lm, NOTICE_QUESTION, notice_b, notice_b))
  # Planning VQA: the three official templates.
  first = ranked[0]
  q_lm, q_b = both(
    "What actions could the ego vehicle take based on {tag}? Why take this action and what's the"
    " probability?",
    first,
  )
  action = _action(first)
  plan = f"The action is to {action}. The reason is {_reason(first)}, which has a high probability."
  qas.append(QA("planning", 1, q_lm, plan, q_b, plan, plan))
  target = next((o for o in ranked if o.kind in ("vehicle", "pedestrian")), first)
  q_lm, q_b = both(
    "What actions taken by the ego vehicle can lead to a collision with {tag}?", target
  )
  qas.append(
    QA(
      "planning",
      1,
      q_lm,
      _collision(target, px[target.index]),
      q_b,
      _collision(target, nm[target.index]),
      _collision(target, nm[target.index]),
    )
  )
  if scene.hazard:
    safe = "Brake gently to a stop, remain stationary."
  elif scene.lead_vehicle is not None and scene.lead_vehicle.near:
    safe = "Slow down, keep a safe distance from the vehicle ahead."
  else:
    safe = "Keep going at the same speed, decelerate gradually without braking."
  qas.append(QA("planning", 1, SAFE_ACTIONS_QUESTION, safe, SAFE_ACTIONS_QUESTION, safe, safe))
  # Behavior MCQ.
  behavior = scene.behavior()
  pool = [NOT_MOVING] + [
    f"The ego vehicle is {s}. The ego vehicle is {v}." for s in STEERINGS for v in SPEEDS
  ]
  options, letter = _options(behavior, pool, 4, rng)
  question = "Predict the behavior of the ego vehicle."
  qas.append(
    QA(
      "behavior",
      0,
      question,
      behavior,
      f"{question}{MCQ_SUFFIX} {options}",
      letter,
      _mcq_kd_answer(letter, behavior),
    )
  )
  return qas


VEHICLE_COLORS = ("red", "blue", "white", "black")
YES_NO = ("Yes.", "No.")
PLANNING_ACTIONS = {"stop": "Stop.", "slow down": "Slow down.", _KEEP: "Keep going."}
STOP_QUESTION = "Does object {tag} oblige the ego vehicle to stop?"
COLOR_QUESTION = "What is the color of object {tag}?"
ACTION_QUESTION = (
  "What actions could the ego vehicle take based on {tag}? Why take this action and what's the"
  " probability?"
)
QUESTION_SETS = ("driving", "grounded")


GROUNDED_SCALE = 1.5
# The grounded set's scenes show a traffic light twice as often and a stopped vehicle in the ego
# lane half the time: the stop question is asked only about those objects, and a teacher learns
# it last (it had a tenth of the questions).
GROUNDED_SCENES = {
  "signals": ("traffic_light", "traffic_light", "stop_sign", "none"),
  "stopped_share": 0.5,
}


def enlarged(scene: Scene, factor: float) -> Scene:
  """`scene` with every object drawn `factor` times larger (the grounded set's views: a tiny
  vision tower sees a vehicle's colour or a light's state from a few patches)."""
  objects = tuple(dataclasses.replace(o, size=o.size * factor) for o in scene.objects)
  return dataclasses.replace(scene, objects=objects)


def grounded_qas(scene: Scene, rng: np.random.Generator) -> list[QA]:
  """The "grounded" questions of one scene (module docstring): one vehicle's colour, and for
  every CAM_FRONT object whether it obliges the ego vehicle to stop and the action it calls for.
  `rng` draws the vehicle and which non-hazards get the stop question (the options keep one
  order)."""
  qas = []

  def mcq(question_type: str, template: str, obj: SceneObject, correct: str, pool) -> QA:
    # Options in one fixed order, so the letter names the answer (no option lookup to learn).
    options = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(pool))
    letter = "ABCD"[pool.index(correct)]
    question = template.format(tag=obj.tag(pixels=False))
    return QA(
      question_type,
      0,
      template.format(tag=obj.tag(pixels=True)),
      correct,
      f"{question}{MCQ_SUFFIX} {options}",
      letter,
      _mcq_kd_answer(letter, correct),
    )

  # One vehicle's colour per scene: asking about every vehicle made seven questions in ten
  # colour questions, and the stop question (one in ten) the one a teacher learnt least.
  vehicles = [o for o in scene.objects if o.kind == "vehicle"]
  if vehicles:
    obj = vehicles[int(rng.integers(len(vehicles)))]
    color = obj.description.split()[0].capitalize() + "."
    pool = [c.capitalize() + "." for c in VEHICLE_COLORS]
    qas.append(mcq("perception", COLOR_QUESTION, obj, color, pool))
  # Only the objects whose answer the view decides: the traffic light (its colour) and the
  # vehicle in the ego lane (stopped or not, near or far). A stop sign, a pedestrian in the lane
  # or an object beside the lane would be answered by its tag's position alone.
  front = [
    o
    for o in scene.objects
    if o.camera == "CAM_FRONT"
    and (o.kind == "traffic_light" or (o.kind == "vehicle" and o.in_ego_lane))
  ]
  for obj in front:
    # Non-hazards are asked about one time in three, so Yes and No come about equally often.
    if obj.is_hazard or rng.random() < 1 / 3:
      stop = YES_NO[0] if obj.is_hazard else YES_NO[1]
      qas.append(mcq("behavior", STOP_QUESTION, obj, stop, YES_NO))
  for obj in front:
    action = PLANNING_ACTIONS[_action(obj)]
    q_lm = ACTION_QUESTION.format(tag=obj.tag(pixels=True))
    q_b = ACTION_QUESTION.format(tag=obj.tag(pixels=False))
    qas.append(QA("planning", 1, q_lm, action, q_b, action, action))
  return qas


# ------------------------------------------------------------------------------------------------
# Writing the three formats.


@dataclasses.dataclass(frozen=True)
class SyntheticDrivingPaths:
  """What `write_synthetic_driving` wrote (all absolute)."""

  root: Path  # the manual dir / image root of all three builders
  drivebench_json: Path
  visual_description_json: Path
  drivelm_json: Path
  drivekd_train_json: Path
  drivekd_test_json: Path
  num_train_frames: int
  num_test_frames: int


def _token(rng: np.random.Generator) -> str:
  return "".join(f"{int(v):02x}" for v in rng.integers(0, 256, 16))


def _image_name(frame_token: str, camera: str) -> str:
  return f"{frame_token}__{camera}.png"


def write_synthetic_driving(
  out_dir: str | os.PathLike,
  *,
  num_train_frames: int = 200,
  num_test_frames: int = 20,
  seed: int = 0,
  image_size: int = 64,
  frames_per_scene: int = 2,
  corruptions: Sequence[str] = (),
  questions: str = "driving",
) -> SyntheticDrivingPaths:
  """Writes a synthetic driving dataset in the three released formats (module docstring).

  Args:
    out_dir: the folder to write (created; existing files of the same names are replaced).
    num_train_frames: keyframes for training (DriveLM and Drive-KD train); ~8 QAs each.
    num_test_frames: DriveBench test keyframes (also in DriveLM, as in the real release).
    seed: the generator's seed; the same arguments write the same bytes.
    image_size: side of each rendered view, in pixels.
    frames_per_scene: keyframes that share a scene token.
    corruptions: DriveBench corruption stems (`drivebench.CORRUPTIONS`) to render for the test
      frames under `corruption/<Folder>/<CAM>/`.
    questions: the question set, "driving" or "grounded" (module docstring).

  Returns:
    The written paths.
  """
  from drivekd_jax.data.drivebench import CORRUPTIONS

  if questions not in QUESTION_SETS:
    raise ValueError(f"unknown question set {questions!r}; known: {', '.join(QUESTION_SETS)}")
  for stem in corruptions:
    if stem not in CORRUPTIONS:
      raise ValueError(f"unknown corruption {stem!r}; known: {', '.join(CORRUPTIONS)}")
  root = Path(out_dir).absolute()
  rng = np.random.default_rng(seed)
  scene_kwargs = GROUNDED_SCENES if questions == "grounded" else {}
  scenes: list[Scene] = []
  scene_token = ""
  for i in range(num_train_frames + num_test_frames):
    if i % frames_per_scene == 0:
      scene_token = _token(rng)
    scenes.append(sample_scene(rng, scene_token, _token(rng), **scene_kwargs))
  if questions == "grounded":
    scenes = [enlarged(scene, GROUNDED_SCALE) for scene in scenes]
  train, test = scenes[:num_train_frames], scenes[num_train_frames:]
  test_tokens = {s.frame_token for s in test}

  for camera in rec.CAMERAS:
    (root / "samples" / camera).mkdir(parents=True, exist_ok=True)
  for scene in scenes:
    for camera in rec.CAMERAS:
      view = render_view(scene, camera, image_size, bold=questions == "grounded")
      name = _image_name(scene.frame_token, camera)
      (root / "samples" / camera / name).write_bytes(rec.encode_png(view))
      if scene.frame_token in test_tokens:
        for stem in corruptions:
          folder = root / "corruption" / CORRUPTIONS[stem] / camera
          folder.mkdir(parents=True, exist_ok=True)
          (folder / name).write_bytes(rec.encode_png(corrupt(view, stem, rng)))

  make_qas = grounded_qas if questions == "grounded" else scene_qas
  qas_of = {s.frame_token: make_qas(s, rng) for s in scenes}
  drivelm: dict[str, dict] = {}
  visual_description: dict[str, dict] = {}
  drivebench, kd_train, kd_test = [], [], []
  for scene in scenes:
    infos = {
      o.tag(pixels=True): {
        "Category": o.category,
        "Status": None
        if o.kind in ("traffic_light", "stop_sign")
        else ("Stopped" if o.status in ("Stopped", "standing") else "Moving"),
        "Visual_description": o.description[0].upper() + o.description[1:] + ".",
        "2d_bbox": o.bbox_pixels(),
      }
      for o in scene.objects
    }
    qa_groups: dict[str, list] = {}
    for qa in qas_of[scene.frame_token]:
      qa_groups.setdefault(qa.question_type, []).append(
        {
          "Q": qa.drivelm_q,
          "A": qa.drivelm_a,
          "C": None,
          "con_up": None,
          "con_down": None,
          "cluster": None,
          "layer": None,
        }
      )
    entry = drivelm.setdefault(
      scene.scene_token,
      {"scene_description": "The ego vehicle drives along a synthetic road.", "key_frames": {}},
    )
    entry["key_frames"][scene.frame_token] = {
      "key_object_infos": infos,
      "QA": qa_groups,
      "image_paths": {
        c: f"../nuscenes/samples/{c}/{_image_name(scene.frame_token, c)}" for c in rec.CAMERAS
      },
    }
    is_test = scene.frame_token in test_tokens
    if is_test:
      visual_description.setdefault(
        scene.scene_token, {"scene_description": entry["scene_description"], "key_frames": {}}
      )["key_frames"][scene.frame_token] = {"key_object_infos": infos}
    for qa in qas_of[scene.frame_token]:
      if is_test:
        drivebench.append(
          {
            "scene_token": scene.scene_token,
            "frame_token": scene.frame_token,
            "question_type": qa.question_type,
            "question": qa.bench_q,
            "answer": qa.bench_a,
            "tag": [qa.tag],
            "image_path": {
              c: f"data/nuscenes/samples/{c}/{_image_name(scene.frame_token, c)}"
              for c in rec.CAMERAS
            },
          }
        )
      cameras = rec.filter_cameras(qa.bench_q, rec.CAMERAS)
      (kd_test if is_test else kd_train).append(
        {
          "messages": [
            {"role": "user", "content": "<image>" * len(cameras) + qa.bench_q},
            {"role": "assistant", "content": qa.kd_a},
          ],
          "images": [
            f".../nuscenes/samples/{c}/{_image_name(scene.frame_token, c)}" for c in cameras
          ],
          "question_type": rec.capability_of(qa.question_type),
          "scene_token": scene.scene_token,
          "frame_token": scene.frame_token,
          "tag": [qa.tag],
        }
      )
  paths = SyntheticDrivingPaths(
    root=root,
    drivebench_json=root / "drivebench-test.json",
    visual_description_json=root / "visual_description.json",
    drivelm_json=root / "v1_1_train_nus.json",
    drivekd_train_json=root / "drivekd_train.json",
    drivekd_test_json=root / "drivekd_test.json",
    num_train_frames=len(train),
    num_test_frames=len(test),
  )
  for path, data in (
    (paths.drivebench_json, drivebench),
    (paths.visual_description_json, visual_description),
    (paths.drivelm_json, drivelm),
    (paths.drivekd_train_json, kd_train),
    (paths.drivekd_test_json, kd_test),
  ):
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_train_frames", type=int, default=200)
  parser.add_argument("--num_test_frames", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--frames_per_scene", type=int, default=2)
  parser.add_argument("--corruptions", default="", help="comma-separated stems, e.g. fog,bright")
  parser.add_argument("--questions", default="driving", choices=QUESTION_SETS)
  args = parser.parse_args(argv)
  paths = write_synthetic_driving(
    args.out,
    num_train_frames=args.num_train_frames,
    num_test_frames=args.num_test_frames,
    seed=args.seed,
    image_size=args.image_size,
    frames_per_scene=args.frames_per_scene,
    corruptions=[c for c in args.corruptions.split(",") if c],
    questions=args.questions,
  )
  for field in dataclasses.fields(paths):
    print(f"{field.name}: {getattr(paths, field.name)}")


if __name__ == "__main__":
  main()
