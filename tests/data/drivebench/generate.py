"""Writes this folder's DriveBench-format fixture (run from the repository root):

  python tests/data/drivebench/generate.py

Two synthetic test keyframes (`drivekd_jax.data.synthetic`, seed 0, 16 px views) in the release
layout: `drivebench-test.json` (every DriveBench question type and tag, plus one prediction
yes/no item, tag [0], which the toolkit skips), `visual_description.json`, the clean views under
`samples/<CAM>/`, and two corruption settings (`fog`, `bright`) under `corruption/<Folder>/`;
`fog.json` is the fog setting's own QA list: the clean items plus one robustness question of a
type the toolkit does not route.
"""

import json
import re
import shutil
from pathlib import Path

from drivekd_jax.data.synthetic import write_synthetic_driving

HERE = Path(__file__).resolve().parent


def main() -> None:
  for child in HERE.iterdir():
    if child.name not in ("generate.py", "README.md"):
      shutil.rmtree(child) if child.is_dir() else child.unlink()
  paths = write_synthetic_driving(
    HERE,
    num_train_frames=0,
    num_test_frames=2,
    seed=0,
    image_size=16,
    corruptions=("fog", "bright"),
  )
  for extra in (paths.drivelm_json, paths.drivekd_train_json, paths.drivekd_test_json):
    extra.unlink()
  items = json.loads(paths.drivebench_json.read_text())
  first = items[0]
  yes_no = dict(first, question_type="prediction", tag=[0], answer="No.")
  tag = next(m.group(0) for i in items if (m := re.search(r"<c\d+,[^>]+>", i["question"])))
  yes_no["question"] = f"Is {tag} a traffic sign or a road barrier?"
  items.insert(len(items) // 2, yes_no)
  paths.drivebench_json.write_text(json.dumps(items, indent=1))
  robustness = dict(
    first,
    question_type="robustness",
    tag=[0],
    question="What is the current type of corruption? Please select the correct answer from the"
    " following options: A. Fog. B. Snow. C. Rain. D. Motion blur.",
    answer="A. Fog",
  )
  (HERE / "fog.json").write_text(json.dumps(items + [robustness], indent=1))


if __name__ == "__main__":
  main()
