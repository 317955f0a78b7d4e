"""Caption metrics BLEU-1..4, ROUGE-L and CIDEr(-D) through `pycocoevalcap` (the COCO caption
evaluator that DriveBench's and DriveLM's `language_evaluation.CocoEvaluator` wrap).

The scorers are pycocoevalcap's own (`Bleu(4)`, `Rouge()`, `Cider()`), pure Python. Only the
tokenisation in front of them is chosen here:

* `"simple"` (default, no Java): lower-case, split words from punctuation as PTB does ("'s" and
  "n't" become tokens, brackets become -lrb- etc., a closing letter keeps its period, ",x,y"
  coordinates stay one token) and drop the punctuation tokens the PTB tokenizer drops. It gives
  `PTBTokenizer`'s tokens on DriveBench answers (tested); on exotic text the two may differ.
* `"ptb"`: pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP, needs `java` on the PATH), as the
  toolkits run it.

An empty prediction is scored as one token that matches nothing (ROUGE-L divides by the
candidate's length). CIDEr's document frequencies come from the references of the items scored
together, so it is a corpus score: it is 0 for a single item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")

_PTB_PUNCTUATION = {
  "''",
  "'",
  "``",
  "`",
  "-LRB-",
  "-RRB-",
  "-LCB-",
  "-RCB-",
  ".",
  "?",
  "!",
  ",",
  ":",
  "-",
  "--",
  "...",
  ";",
}
_TOKEN = re.compile(
  r"n't\b|'[a-z]+\b|[a-z0-9_]+(?=n't\b)"
  r"|(?<![a-z0-9_])[a-z]\.(?=\s*$)"  # a closing single letter keeps its period, as in PTB
  r"|[0-9]+(?:,[0-9]{3})+(?:\.[0-9]+)?"  # 1,000
  r"|[a-z0-9_]+(?:[./-][a-z0-9_]+)*"
  r"|(?:,[0-9]+(?:\.[0-9]+)?)+"  # PTB keeps ",0.2,0.6" (a tag's coordinates) as one number
  r"|\.\.\.|--|\S"
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_EMPTY = "<empty>"


def simple_tokenize(text: str) -> str:
  """PTB-like tokens of `text`, lower-cased, punctuation dropped, joined by spaces."""
  tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower())]
  tokens = [t for t in tokens if t not in _PTB_PUNCTUATION and t != '"']
  return " ".join(tokens)


def _tokenize(texts: dict[str, list[str]], tokenizer: str) -> dict[str, list[str]]:
  if tokenizer == "simple":
    return {k: [simple_tokenize(t) for t in v] for k, v in texts.items()}
  if tokenizer == "ptb":
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
  raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")


def caption_metrics(
  predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, tokenizer="simple"
) -> dict[str, float]:
  """Corpus BLEU-1..4, ROUGE-L and CIDEr of `predictions` against `references`.

  Args:
    predictions: one string per item.
    references: per item, one reference string or several.
    tokenizer: "simple" (no Java) or "ptb" (pycocoevalcap's PTBTokenizer, needs Java).

  Returns:
    `{"Bleu_1", ..., "Bleu_4", "ROUGE_L", "CIDEr"}` as fractions (CIDEr may exceed 1); empty
    dict when there are no items.
  """
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
  if not predictions:
    return {}
  keys = [str(i) for i in range(len(predictions))]
  res = _tokenize({k: [p] for k, p in zip(keys, predictions)}, tokenizer)
  gts = _tokenize(
    {k: [r] if isinstance(r, str) else list(r) for k, r in zip(keys, references)}, tokenizer
  )
  res = {k: [v[0] or _EMPTY] for k, v in res.items()}
  gts = {k: [r or _EMPTY for r in v] for k, v in gts.items()}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  cider, _ = Cider().compute_score(gts, res)
  out = {f"Bleu_{n + 1}": float(bleu[n]) for n in range(4)}
  out.update(ROUGE_L=float(rouge), CIDEr=float(cider))
  return out
