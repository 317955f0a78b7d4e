"""Task "drivekd.eval": the driving evaluation of a trained student.

`python launch.py --config=configs/drivekd/demo.py:eval --workdir=DIR` (or any training config
with `--config.task=drivekd.eval`) answers the held-out questions with the student of the latest
checkpoint in DIR and writes `eval_summary.json` (MCQ accuracy by capability) and
`eval/answers.jsonl`. The implementation lives in `drivekd_jax.train.evaluate`.
"""

from drivekd_jax.train.evaluate import run

__all__ = ["run"]
