"""DriveBench judge rubrics: the six templates, how items are routed to them, and their prompts.

The DriveBench toolkit grades every routed answer with a judge that reads one user message (no
system role): an evaluator preamble, then a rubric template filled with the question, the ground
truth, the prediction and, for two rubrics, a visual description of the object the question
names. The judge replies with a score sheet that ends in `Total Score: N` (0-100).

`OUR_TEMPLATES` state the same criteria and points as the official ones in our own words (the
default). For parity with published numbers, `official_templates(toolkit_dir)` reads the
official wording from a local checkout of the toolkit (`evaluate/prompts.py`), without running
it: module-level string constants (or string values of a module-level dict) whose names contain
the template names below.

Routing, as the toolkit routes (question_type, tag):

| question_type | tag | rubric | also |
|---|---|---|---|
| perception | 0 | PERCEPTION_MCQ | accuracy |
| perception | 2 | PERCEPTION_VQA | language |
| prediction | 3 | PREDICTION_VQA | language |
| planning | 1 | PLANNING_VQA | language |
| behavior | 0 | BEHAVIOR_MCQ | accuracy |

prediction/0 (yes/no) is skipped by the toolkit; PREDICTION_MCQ is defined there but never
used. Other pairs (e.g. the corruption JSONs' robustness questions) make the toolkit raise; here
they are skipped and counted.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATE_NAMES = (
  "PERCEPTION_MCQ",
  "PERCEPTION_VQA",
  "PREDICTION_MCQ",
  "PREDICTION_VQA",
  "PLANNING_VQA",
  "BEHAVIOR_MCQ",
)

PREAMBLE = (
  "You are an evaluator who rates answers based on their closeness to the correct answer.\n"
)
"""The toolkit's first line of every judge message (kept verbatim: it is one sentence of setup)."""

NO_DESCRIPTION_NEEDED = "No visual description needed for this question."
SAFE_ACTIONS_QUESTION = "what are safe actions to take for the ego vehicle"

_SHEET = """
Grade conservatively: give points only for what the answer actually gets right, and never
exceed a criterion's maximum. Reply with this sheet and nothing else:

{criteria_sheet}
Total Score: <sum of the points above, an integer from 0 to 100>
Brief Summary: <one or two sentences on the main strengths and errors>
"""


def _template(task: str, fields: str, criteria: list[tuple[str, int, str]]) -> str:
  assert sum(points for _, points, _ in criteria) == 100, task
  lines = [
    f"{i}. {name} ({points} points): {what}" for i, (name, points, what) in enumerate(criteria, 1)
  ]
  sheet = "\n".join(f"{name}: <0-{points}>" for name, points, _ in criteria)
  return (
    f"Score the predicted answer to a driving question from 0 to 100. {task}\n\n{fields}\n\n"
    "Criteria:\n" + "\n".join(lines) + _SHEET.replace("{criteria_sheet}", sheet)
  )


_QUESTION_GT_PRED = "Question: {QUESTION}\nCorrect answer: {GT}\nPredicted answer: {PRED}"
_WITH_DESC = (
  "Question: {QUESTION}\nWhat the named object looks like: {DESC}\n"
  "Correct answer: {GT}\nPredicted answer: {PRED}"
)

OUR_TEMPLATES: dict[str, str] = {
  "PERCEPTION_MCQ": _template(
    "The question is multiple choice about an object the ego vehicle perceives.",
    _WITH_DESC,
    [
      ("Answer Correctness", 50, "50 if the chosen option is the correct one, otherwise 0."),
      ("Object Recognition", 10, "the object is identified as what it is."),
      ("Object Location and Orientation", 15, "where the object is and which way it faces."),
      ("Environmental Condition Awareness", 15, "road, traffic and weather context are right."),
      (
        "Clarity of Reasoning",
        10,
        "the choice is explained clearly; if there is no explanation at all, criteria 2-5 get 0.",
      ),
    ],
  ),
  "PERCEPTION_VQA": _template(
    "The question asks which objects in the scene matter for driving.",
    _QUESTION_GT_PRED,
    [
      ("Action Alignment", 20, "the objects' actions agree with the correct answer."),
      ("Motion Precision", 20, "movement directions and states are stated precisely."),
      ("Driving Context Appropriateness", 15, "the objects named matter for the ego vehicle."),
      ("Situational Awareness", 15, "positions and relations between objects are right."),
      ("Conciseness and Clarity", 20, "the answer is short, clear and free of filler."),
      ("Grammar", 10, "the answer is grammatical."),
    ],
  ),
  "PREDICTION_MCQ": _template(
    "The question is multiple choice about how an object will behave.",
    _QUESTION_GT_PRED,
    [
      ("Answer Correctness", 40, "40 if the chosen option is the correct one, otherwise 0."),
      ("Object Category Identification", 15, "the object's category is right."),
      ("Object Visual Appearance", 15, "its appearance is described correctly."),
      ("Object Position and Motion", 15, "its position and motion are right."),
      ("Explanation Clarity and Justification", 15, "the choice is explained and justified."),
    ],
  ),
  "PREDICTION_VQA": _template(
    "The question asks which objects the ego vehicle should notice first, second and third.",
    _QUESTION_GT_PRED,
    [
      ("Object Identification and Priority Order", 20, "the same objects, in the same order."),
      (
        "Object Category and Visual Description Accuracy",
        20,
        "each object's category and look are right.",
      ),
      ("State of the Object", 15, "each object's state (moving, stopped, ...) is right."),
      ("Recommended Action for Ego Vehicle", 15, "the ego vehicle's action for each is right."),
      ("Logical Flow and Reasonableness of Prediction", 20, "the reasoning holds together."),
      ("Clarity and Grammar", 10, "the answer is clear and grammatical."),
    ],
  ),
  "PLANNING_VQA": _template(
    "The question asks what the ego vehicle should do (or must avoid), and why.",
    _WITH_DESC,
    [
      ("Action Prediction Accuracy", 40, "the actions agree with the correct answer."),
      ("Reasoning and Justification", 20, "the reasons given are the right ones."),
      ("Probability or Confidence Level", 15, "the stated likelihood agrees with the answer."),
      (
        "Contextual Awareness and Safety Considerations",
        15,
        "surrounding objects and safety are taken into account.",
      ),
      ("Conciseness and Clarity", 10, "the answer is short and clear."),
    ],
  ),
  "BEHAVIOR_MCQ": _template(
    "The question is multiple choice about the ego vehicle's own behavior.",
    _QUESTION_GT_PRED,
    [
      ("Answer Correctness", 50, "50 if the chosen option is the correct one, otherwise 0."),
      ("Behavioral Understanding and Detail", 15, "steering and speed are both understood."),
      ("Reasoning and Justification", 15, "the choice is supported by the scene."),
      ("Contextual Relevance", 10, "the explanation uses the relevant context."),
      ("Clarity and Grammar", 10, "the answer is clear and grammatical."),
    ],
  ),
}


@dataclasses.dataclass(frozen=True)
class Route:
  """What the toolkit does with one (question_type, tag): a rubric and the extra metric."""

  template: str
  accuracy: bool = False
  language: bool = False

  @property
  def needs_description(self) -> bool:
    return self.template in ("PERCEPTION_MCQ", "PLANNING_VQA")


ROUTES: dict[tuple[str, int], Route] = {
  ("perception", 0): Route("PERCEPTION_MCQ", accuracy=True),
  ("perception", 2): Route("PERCEPTION_VQA", language=True),
  ("prediction", 3): Route("PREDICTION_VQA", language=True),
  ("planning", 1): Route("PLANNING_VQA", language=True),
  ("behavior", 0): Route("BEHAVIOR_MCQ", accuracy=True),
}
TOOLKIT_SKIPS = {("prediction", 0)}


def route_key(question_type: str, tag: list[int]) -> str:
  """`"<question_type>/<tag>"`, the key under which items are routed and counted."""
  return f"{question_type}/{','.join(str(t) for t in tag)}"


def route(question_type: str, tag: list[int]) -> Route | None:
  """The toolkit's route for an item; None for the items it skips (and for unknown pairs)."""
  if len(tag) != 1:
    return None
  return ROUTES.get((question_type, tag[0]))


_TAG_PREFIX = re.compile(r"<(c\d+,[A-Za-z0-9_]+),")


def visual_description(
  item: Mapping[str, Any], descriptions: Mapping[str, Any] | None
) -> str | None:
  """The `{DESC}` of an item, as the toolkit finds it in `visual_description.json`.

  The "safe actions" question gets a fixed sentence; a question without an object tag gets
  None; otherwise the lower-cased `Visual_description` of the key object whose tag starts with
  the question's first `<cK,CAM` (coordinates differ: DriveBench normalises them, the file keeps
  pixels).

  Raises:
    KeyError: the frame or the tagged object is not in `descriptions` (the toolkit raises too).
  """
  question = item["question"]
  if SAFE_ACTIONS_QUESTION in question:
    return NO_DESCRIPTION_NEEDED
  match = _TAG_PREFIX.search(question)
  if match is None:
    return None
  if descriptions is None:
    raise KeyError("no visual descriptions were loaded")
  frame = descriptions[item["scene_token"]]["key_frames"][item["frame_token"]]
  prefix = f"<{match.group(1)},"
  for tag, info in (frame.get("key_object_infos") or {}).items():
    if tag.startswith(prefix):
      return str(info.get("Visual_description", "")).lower()
  raise KeyError(f"no key object starting with {prefix}")


def judge_message(template: str, item: Mapping[str, Any], pred: str, desc: str | None) -> str:
  """The one user message the toolkit sends: preamble + the filled template."""
  return PREAMBLE + template.format(
    QUESTION=item["question"], GT=item["answer"], PRED=pred, DESC=desc
  )


_TOTAL_SCORE = re.compile(r"Total Score:\s*(\d{1,3})\b")


def parse_total_score(reply: str) -> int | None:
  """The toolkit's `Total Score:\\s*(\\d{1,3})\\b` (first match); None if absent or over 100."""
  match = _TOTAL_SCORE.search(reply or "")
  if match is None:
    return None
  score = int(match.group(1))
  return score if score <= 100 else None


def official_templates(toolkit_dir: str | os.PathLike) -> dict[str, str]:
  """The six official templates from a local DriveBench toolkit checkout (module docstring).

  Args:
    toolkit_dir: the checkout's root (holding `evaluate/prompts.py`) or its `evaluate/` folder,
      or the `prompts.py` file itself.

  Raises:
    FileNotFoundError: no prompts.py there. ValueError: a template is missing or ambiguous, or
    does not carry the placeholders of its rubric.
  """
  root = Path(toolkit_dir)
  candidates = [root, root / "prompts.py", root / "evaluate" / "prompts.py"]
  path = next((p for p in candidates if p.is_file()), None)
  if path is None:
    raise FileNotFoundError(f"no prompts.py under {root} (looked for evaluate/prompts.py)")
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  strings: dict[str, str] = {}
  for node in tree.body:
    if isinstance(node, ast.Assign):
      targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
      targets, value = [node.target], node.value
    else:
      continue
    for target in targets:
      if not isinstance(target, ast.Name):
        continue
      if isinstance(value, ast.Constant) and isinstance(value.value, str):
        strings[target.id] = value.value
      elif isinstance(value, ast.Dict):
        for key, entry in zip(value.keys, value.values):
          if (
            isinstance(key, ast.Constant)
            and isinstance(entry, ast.Constant)
            and isinstance(entry.value, str)
          ):
            strings[f"{target.id}[{key.value}]"] = entry.value
  out = {}
  for name in TEMPLATE_NAMES:
    found = [k for k in strings if name in k.upper()]
    if len(found) != 1:
      raise ValueError(
        f"{path}: expected one string constant named like {name}, found {found or 'none'}"
      )
    out[name] = strings[found[0]]
    for placeholder in ("{QUESTION}", "{GT}", "{PRED}"):
      if placeholder not in out[name]:
        raise ValueError(f"{path}: template {found[0]} lacks the placeholder {placeholder}")
  return out
