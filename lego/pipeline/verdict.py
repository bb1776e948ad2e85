"""The verdict (SPEC section 6): the routed model against the dense frontier at its realized inference cost, and
against the dense models trained on the same budget; nothing is chosen on the reported split."""

from __future__ import annotations

from typing import Any, Dict, List


def pareto(points: List[tuple]) -> List[tuple]:
    """The points (cost, ppl, ...) that no cheaper point beats on ppl: the dense frontier proper. A deeper dense
    model that scores worse than a shallower one at the same training budget is off it (the shallow one is both
    cheaper and better). Items past the first two ride along (e.g. the test ppl of a point chosen on validation)."""
    out: List[tuple] = []
    for point in sorted(points):
        if not out or point[1] < out[-1][1]:
            out.append(point)
    return out


def interpolate(points: List[tuple], x: float, value: int = 1) -> Dict[str, Any]:
    """The dense frontier's ppl at inference cost `x`: item `value` of its Pareto points (`pareto`, chosen on
    item 1), linear between them; past the dearest, the dearest's (a model costing more does no better than
    it); below the cheapest, the cheapest's, flagged (no dense model is that cheap)."""
    pts = pareto(points)
    if x <= pts[0][0]:
        return {"ppl": pts[0][value], "where": "below the frontier's cheapest model" if x < pts[0][0] else "on it"}
    if x >= pts[-1][0]:
        return {"ppl": pts[-1][value], "where": "on it" if x == pts[-1][0] else "at or beyond its dearest point"}
    for a, b in zip(pts, pts[1:]):
        if a[0] <= x <= b[0]:
            return {"ppl": a[value] + (b[value] - a[value]) * (x - a[0]) / (b[0] - a[0]), "where": "interpolated"}
    raise AssertionError("unreachable")


def gap(routed_ppl: float, dense_ppl: float) -> float:
    """How much worse (+) or better (-) the routed model's perplexity is, in percent of the dense one's."""
    return 100 * (routed_ppl / dense_ppl - 1)


def verdict(metrics: Dict[str, Any], budget: str) -> Dict[str, Any]:
    """The routed model against the dense frontier at its realized inference cost (flop_cost), and at the same
    training budget against the dense full-depth model and the best dense model of any depth.

    Nothing is chosen on the reported split (SPEC section 6): the frontier's Pareto points and the best dense
    model are chosen on each dense model's validation perplexity (`val_ppl`), and the perplexities reported for
    them are on the evaluated split (`ppl`)."""
    routed = metrics["ashem"]
    dense = metrics["dense"]
    points = [(d["inference_cost"], d["val_ppl"], d["ppl"], int(depth)) for depth, d in dense.items()]
    at = interpolate(points, routed["flop_cost"], value=2)
    out = {"chosen_on": "validation", "frontier_depths": [p[3] for p in pareto(points)],
           "inference": {"cost": routed["flop_cost"], "routed_ppl": routed["ppl"], "dense_ppl": at["ppl"],
                         "gap_pct": gap(routed["ppl"], at["ppl"]), "where": at["where"]}}
    full = dense.get(str(metrics["num_layers"]))
    best_depth = min(dense, key=lambda d: dense[d]["val_ppl"])
    out["training"] = {"budget": budget, "routed_ppl": routed["ppl"],
                       "ashem_train_macs": metrics["train_compute"]["total"]["train_macs"],
                       "best_depth": int(best_depth), "best_ppl": dense[best_depth]["ppl"],
                       "best_gap_pct": gap(routed["ppl"], dense[best_depth]["ppl"])}
    if full is not None:
        out["training"].update(dense_ppl=full["ppl"], gap_pct=gap(routed["ppl"], full["ppl"]),
                               dense_train_macs=full.get("train_macs"))
    out["line"] = verdict_line(out, metrics["num_layers"])
    return out


def verdict_line(v: Dict[str, Any], depth: int) -> str:
    """The final table's last line: plain words, both comparisons, signed gaps (+ = routed is worse)."""
    inf, tr = v["inference"], v["training"]
    where = "" if inf["where"] in ("interpolated", "on it") else f" ({inf['where']})"
    line = (f"At its realized inference cost ({inf['cost']:.3f} of the dense {depth}-layer model), routed test ppl "
            f"{inf['routed_ppl']:.2f} against the dense frontier's {inf['dense_ppl']:.2f}{where}: "
            f"{inf['gap_pct']:+.1f}%.")
    what = "equal training compute" if tr["budget"] == "matched" else f"the '{tr['budget']}' training budget"
    line += f" At {what}: "
    if "dense_ppl" in tr:
        line += f"the dense {depth}-layer model {tr['dense_ppl']:.2f} ({tr['gap_pct']:+.1f}%), "
    line += (f"the best dense model on validation ({tr['best_depth']} layers) {tr['best_ppl']:.2f} "
             f"({tr['best_gap_pct']:+.1f}%).")
    return line
