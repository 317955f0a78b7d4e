"""Summary aggregation against hand-computed micro-means."""

import pytest

from imug_jax.scoring import summary
from imug_jax.scoring.summary import TurnRow


def row(domain, turn, modality, score, model="m"):
  return TurnRow(model, domain, "sub", "1", turn, modality, score)


ROWS = [
  row("Apparel", 1, "image", summary.image_percent([4, 3])),  # 70
  row("Apparel", 2, "text", 100.0),
  row("Apparel", 3, "image", summary.image_percent([5, 5, 2])),  # 80
  row("Botany", 1, "image", summary.image_percent([1])),  # 20
  row("Botany", 2, "text", 50.0),
  row("Botany", 2, "text", 0.0),
  row("Storage", 1, "text", 33.33),
]


def test_micro_means_match_hand_computation():
  result = summary.summarize(ROWS)
  overall = result["overall"]
  assert overall["all"] == {"mean": round((70 + 100 + 80 + 20 + 50 + 0 + 33.33) / 7, 2), "count": 7}
  assert overall["all"]["mean"] == 50.48
  assert overall["text"] == {"mean": round((100 + 50 + 0 + 33.33) / 4, 2), "count": 4}
  assert overall["image"] == {"mean": round((70 + 80 + 20) / 3, 2), "count": 3}
  assert result["by_domain"]["Apparel"]["all"] == {"mean": 83.33, "count": 3}
  assert result["by_domain"]["Storage"]["image"] == {"mean": None, "count": 0}
  assert result["by_class"]["Static Spatial"]["image"] == {"mean": 75.0, "count": 2}
  assert result["by_class"]["Temporal Causal"]["all"] == {"mean": 23.33, "count": 3}
  assert result["by_class"]["Hybrid"]["text"] == {"mean": 33.33, "count": 1}
  assert list(result["by_turn"]) == [1, 2, 3]
  assert result["by_turn"][1]["image"] == {"mean": 45.0, "count": 2}
  assert result["by_turn"][2]["text"] == {"mean": 50.0, "count": 3}


def test_models_are_kept_apart_and_tables_render():
  rows = [*ROWS, row("Apparel", 1, "image", 0.0, model="other")]
  payload = summary.summarize_models(rows)
  assert payload["score_unit"] == "percentage"
  assert payload["models"]["other"]["overall"]["all"] == {"mean": 0.0, "count": 1}
  assert payload["models"]["m"]["overall"]["all"]["count"] == 7
  table = summary.markdown_summary("m", payload["models"]["m"])
  assert "| Overall | 50.48 | 45.83 | 56.67 |" in table
  assert "| Storage | 33.33 | 33.33 | - |" in table


def test_unknown_domain_and_bad_input():
  assert row("Nowhere", 1, "text", 1.0).klass == summary.UNASSIGNED
  with pytest.raises(ValueError, match="modality"):
    row("Apparel", 1, "audio", 1.0)
  with pytest.raises(ValueError, match="at least one"):
    summary.image_percent([])
