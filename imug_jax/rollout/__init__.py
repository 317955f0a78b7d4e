"""IMUG rollouts: the multi-turn runner in the official output layout (runner) and the history
sources, own (official) and reference (our exposure-bias control) (history)."""
