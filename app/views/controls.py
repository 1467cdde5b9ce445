"""Widgets shared by pages (keys keep a page prefix so tests can find them)."""

from __future__ import annotations

from typing import Any


def rule_controls(
    threshold_col: Any, patience_col: Any, method: str, rule: dict, prefix: str
) -> tuple[float, int | None]:
    """Threshold slider (eps for the gradient-norm rule) and, where the rule has one, patience."""
    if method == "gradnorm":
        threshold = threshold_col.slider(
            "eps (relative change)", 0.005, 0.5, float(rule["threshold"]), 0.005, key=f"{prefix}_threshold_gradnorm"
        )
    else:
        threshold = threshold_col.slider(
            f"{rule['metric']} threshold",
            0.5,
            1.0,
            float(rule["threshold"]),
            0.005,
            format="%.3f",
            key=f"{prefix}_threshold_{method}",
        )
    patience = None
    if rule["patience"] is not None:
        patience = int(
            patience_col.number_input("patience", 1, 50, int(rule["patience"]), key=f"{prefix}_patience_{method}")
        )
    return threshold, patience
