"""Judge system prompts: our own wording of the official rules, or the official files verbatim.

`PromptSet.ours()` carries the rules of the released `eval_prompt.txt` / `dynamic_prompt.txt` in our
own text (integer 0-5 per evaluation point scored independently, 2-4 as the default range, 0 and 5
rare, the last image is the target, strict JSON). For score parity with published numbers use
`PromptSet.official(checkout)` with a local checkout of the benchmark repository; nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# The smoke-test judge and our local judge recognise dynamic-answer requests by this role name,
# which the official dynamic prompt also uses.
DYNAMIC_ROLE = "Dynamic Answer Determination Assistant"

OUR_IMAGE_PROMPT = """\
You grade one generated image from a multi-turn dialogue benchmark in which a user keeps giving \
instructions and an AI answers with text or images, building on earlier images (the user's inputs \
or the AI's own earlier outputs).

Images are numbered in the order given. Image_1 .. Image_(N-1) are reference images; the text \
says which turn each comes from and whether it was a user input or an AI output. Image_N, the \
last image, is the target: the only image you score.

Score every evaluation point on its own with an integer from 0 to 5: how completely the target \
image fulfils that point. If a point refers to reference images, compare the target with them; \
otherwise judge the target alone. This is a graded quality judgement, not a pass/fail check: \
treat 2-4 as the normal range and give 0 or 5 only in extreme cases.
5 - flawless: the point is fully met, elements required to persist match the references at pixel \
or logic level, no visual or physical errors.
4 - clearly met: all required elements present; only small simplifications or artifacts.
3 - partly met: the intent is visible and key elements exist, but with noticeable errors or \
mismatches with the references.
2 - large deviation: only some required features survive; the logic has drifted.
1 - trace: poor, but some attempt at a keyword of the point is recognisable.
0 - nothing related to the point, or the image is noise or a flat colour.

Reply with JSON only, no other text:
{"evaluation_results": [{"point_id": 1, "score": 3, "reason": "..."}, ...]}
with one entry per evaluation point, point_id counting from 1.
"""

OUR_DYNAMIC_PROMPT = f"""\
You are the {DYNAMIC_ROLE} for a multi-turn multimodal dialogue benchmark. The evaluated AI \
generated images in earlier turns; the current multiple-choice question has no fixed answer \
because its correct options depend on what the AI actually produced (how many objects it drew, \
which colour it chose, where it placed things).

You receive the reference turns (each user question with the AI's response; an image response is \
given as a numbered image) and the target question with its options. Trace what the referenced \
outputs really show, compare that state with every option, and choose the options that match the \
generated content. An option that would be true in general but does not match what was generated \
is wrong. The answer field may be partly fixed (e.g. "A+<DYNAMIC>": A is correct; find the others).

Reply with JSON only, no other text:
{{"determined_answer": "<option letters, contiguous and uppercase, e.g. B or ACD>", \
"reasoning": "<which feature of which turn decided each option>"}}
"""


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """System prompts for image-point scoring and dynamic-answer resolution."""

  image: str
  dynamic: str
  source: str

  @classmethod
  def ours(cls) -> PromptSet:
    return cls(OUR_IMAGE_PROMPT, OUR_DYNAMIC_PROMPT, "ours")

  @classmethod
  def official(cls, checkout: str | Path) -> PromptSet:
    """Loads eval_prompt.txt and dynamic_prompt.txt from a local IMUG-Bench checkout.

    `checkout` may be the repository root or the folder that holds the two files.
    """
    root = Path(checkout)
    for folder in (root, root / "scripts" / "auxiliary"):
      image_path, dynamic_path = folder / "eval_prompt.txt", folder / "dynamic_prompt.txt"
      if image_path.is_file() and dynamic_path.is_file():
        return cls(
          image_path.read_text(encoding="utf-8"),
          dynamic_path.read_text(encoding="utf-8"),
          f"official:{folder}",
        )
    raise FileNotFoundError(
      f"eval_prompt.txt and dynamic_prompt.txt not found in {root} or {root}/scripts/auxiliary"
    )

  @classmethod
  def from_option(cls, official_dir: str | None) -> PromptSet:
    return cls.official(official_dir) if official_dir else cls.ours()
