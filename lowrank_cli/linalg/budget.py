"""--budget F: a rank for each tensor, or keep it whole, under one parameter budget for all.

Each tensor t either keeps rank r (1 ≤ r ≤ its break-even rank), costing r·(m_t + n_t) numbers
and leaving the squared error tail_t(r) = Σ_{i>r} σ_{t,i}², or stays dense, costing m_t·n_t and
leaving none. The allocation minimizes Σ_t loss_t under Σ_t cost_t ≤ F·Σ_t m_t·n_t, where loss_t is
the objective's (OBJECTIVES). The spectra are the caller's: of W, or of W·S with calibration, where
tail_t(r) is the output-space squared error ‖(W − W_r)X‖_F².

Dense is not on the path of adding rank-1 terms one by one (it is a jump in cost), so a greedy over
terms never reaches it. The linear relaxation does (a multiple-choice knapsack): each tensor's options
are reduced to the lower convex hull of its (cost, loss) points, dense included, and hull edges are
taken by loss removed per number while they fit; a tensor whose edge does not fit takes none of its
later ones. Everything up to the first edge that did not fit is the relaxation's optimum but for that
edge's fraction, so the loss exceeds the true optimum by at most that edge's loss drop (the largest
hull edge of any tensor bounds it). What is left is then spent greedily on single further terms, or
on keeping a tensor whole, which only lowers the loss.
"""

from __future__ import annotations

import numpy as np

from lowrank_cli.errors import UsageError, arg
from lowrank_cli.linalg.spectrum import Spectrum, break_even_rank, speed_rank

# absolute: Σ_t tail_t, the squared errors themselves (output-space ones with calibration);
# relative: Σ_t tail_t/‖W_t‖², every tensor's relative squared error counting alike;
# balanced: Σ_t tail_t/‖W_t‖, between the two (the geometric mean of their weights). Measured on
# all-MiniLM-L6-v2 (benchmarks/README.md) balanced kept the sentence embeddings closest on average
# over F = 0.9, 0.7, 0.5 with and without calibration, hence the default.
OBJECTIVES = ("balanced", "absolute", "relative")
DEFAULT_OBJECTIVE = "balanced"

Options = dict[str, tuple[np.ndarray, np.ndarray]]  # per tensor: costs (increasing) and losses of its options


def allocate(
    spectra: dict[str, Spectrum],
    fraction: float,
    objective: str = DEFAULT_OBJECTIVE,
    *,
    allow_dense: bool = True,
    sensitivity: dict[str, float] | None = None,
    speed: bool = False,
) -> dict[str, int | None]:
    """A rank per tensor, or None where the budget keeps it dense: Σ params ≤ fraction·Σ m·n.

    Every other non-zero tensor keeps at least rank 1; zero matrices (unchanged weights, for extract)
    get rank 0 and count in neither side. allow_dense=False: ranks only (a LoRA cannot hold a whole matrix).
    sensitivity: measured weights of the absolute objective (sensitivity_weights); then `objective` is unused.
    speed: ranks only up to speed_rank (factors at most SPEED_SHARE of the params), else dense.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    live = {name: s for name, s in spectra.items() if not s.is_zero}
    budget = fraction * sum(s.shape[0] * s.shape[1] for s in live.values())
    weights = sensitivity_weights(live, sensitivity) if sensitivity else loss_weights(live, objective)
    options = {name: options_of(s, weights[name], allow_dense, speed=speed) for name, s in live.items()}
    floor = sum(costs[0] for costs, _ in options.values())
    if floor > budget:
        raise UsageError(
            f"{arg('budget')} {fraction:g} allows {budget:,.0f} params, but rank 1 for every tensor needs {floor:,.0f};"
            f" raise {arg('budget')} or select fewer tensors"
        )
    chosen = spend_rest(options, hull_greedy(options, budget - floor), budget, allow_dense)
    ranks: dict[str, int | None] = {name: 0 for name in spectra}
    for name, index in chosen.items():
        dense = allow_dense and index == len(options[name][0]) - 1
        ranks[name] = None if dense else index + 1
    return ranks


def uniform(spectra: dict[str, Spectrum], fraction: float, *, allow_dense: bool = True) -> dict[str, int | None]:
    """Every tensor cut to the same share of its params: rank ⌊share·m·n/(m+n)⌋, so Σ params ≤ fraction·Σ m·n.

    What SVD-LLM and ASVD do with whitened spectra. A tensor that no rank makes smaller (a 1×8 row: rank 1
    costs 9) stays dense and the others' share shrinks to pay for it; one whose share's rank keeps it whole
    stays dense too; zero matrices get rank 0. A share too small for rank 1 is a UsageError, as allocate's.
    """
    ranks: dict[str, int | None] = {name: 0 for name, s in spectra.items() if s.is_zero}
    live = {name: s.shape for name, s in spectra.items() if not s.is_zero}
    whole = {name for name, (m, n) in live.items() if allow_dense and (m * n - 1) // (m + n) == 0}
    total = sum(m * n for m, n in live.values())
    rest = sum(m * n for name, (m, n) in live.items() if name not in whole)
    share = (fraction * total - sum(m * n for name, (m, n) in live.items() if name in whole)) / rest if rest else 0.0
    for name, (m, n) in live.items():
        rank = int(max(share, 0.0) * m * n // (m + n))
        if name in whole or (allow_dense and rank > (m * n - 1) // (m + n)):  # factoring saves nothing
            ranks[name] = None
        elif rank < 1:
            raise UsageError(
                f"{arg('budget')} {fraction:g} leaves '{name}' ({m}×{n}) less than rank 1; raise {arg('budget')}"
                " or select fewer tensors"
            )
        else:
            ranks[name] = min(rank, m, n)
    return {name: ranks[name] for name in spectra}


def loss_weights(spectra: dict[str, Spectrum], objective: str) -> dict[str, float]:
    """What a unit of relative squared error of each tensor costs: 1 (relative), ‖W_t‖ (balanced), ‖W_t‖² (absolute).

    ‖W_t‖ is divided by the largest one, in logs, so that no square of a huge σ overflows.
    """
    if objective == "relative":
        return {name: 1.0 for name in spectra}
    power = 2.0 if objective == "absolute" else 1.0
    logs = _log_norms(spectra)
    top = max(logs.values(), default=0.0)
    return {name: float(np.exp(power * (value - top))) for name, value in logs.items()}


def sensitivity_weights(spectra: dict[str, Spectrum], sensitivity: dict[str, float]) -> dict[str, float]:
    """s_t·‖W_t‖²: the loss of tensor t is s_t·tail_t(r), its measured cost to the model's output.

    s_t is what the model's output loses per unit of t's squared error (ops.sensitivity, measured one
    weight at a time), so Σ_t s_t·tail_t estimates the output error of cutting all of them. A tensor
    without a measured s_t (not run by the probe) is treated as the most sensitive one, so that the
    budget spares what it knows nothing about; s_t = 0 (a weight the output ignores, such as an
    unused pooler) is raised to 1e-6 of the largest, so the spectra still order its ranks.
    """
    measured = [value for name, value in sensitivity.items() if name in spectra and value > 0]
    top = max(measured, default=1.0)
    norms = _log_norms(spectra)
    logs = {name: np.log(max(sensitivity.get(name, top), 1e-6 * top)) + 2 * norms[name] for name in spectra}
    peak = max(logs.values(), default=0.0)
    return {name: float(np.exp(value - peak)) for name, value in logs.items()}


def _log_norms(spectra: dict[str, Spectrum]) -> dict[str, float]:
    """log ‖W_t‖_F of each tensor, from its scaled spectrum (no square of a huge σ is formed)."""
    return {name: np.log(s.scale) + np.log(np.linalg.norm(s.singular_values)) for name, s in spectra.items()}


def options_of(
    spectrum: Spectrum, weight: float = 1.0, allow_dense: bool = True, *, speed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Costs and losses (weight × relative squared error) of ranks 1…cap, then (allow_dense) of keeping it whole.

    With dense allowed, cap is the break-even rank (higher ranks save nothing), or with `speed` the
    rank up to which factors run faster (speed_rank), which may be 0: then dense is the only option.
    Past the numerical rank a term removes only rounding: never an option.
    """
    m, n = spectrum.shape
    saving = (speed_rank(m, n) if speed else break_even_rank(m, n)) if allow_dense else max(1, min(m, n))
    cap = min(saving, max(1, spectrum.numerical_rank()))
    tails = np.array([spectrum.relative_error(r) ** 2 for r in range(1, cap + 1)])  # shares of ‖W‖² left
    costs = np.arange(1, cap + 1, dtype=np.float64) * (m + n)
    if allow_dense:
        costs, tails = np.append(costs, float(m * n)), np.append(tails, 0.0)
    return costs, tails * weight


def lower_hull(costs: np.ndarray, losses: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (cost, loss), costs increasing (Andrew's monotone chain).

    Points on a straight stretch of the hull stay: each is a place to stop, so a flat spectrum's ranks
    remain options one term at a time instead of one edge from rank 1 to the last.
    """
    hull: list[int] = []
    for i in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            turn = (costs[b] - costs[a]) * (losses[i] - losses[a]) - (losses[b] - losses[a]) * (costs[i] - costs[a])
            straight = 1e-9 * (costs[i] - costs[a]) * (abs(losses[b] - losses[a]) + abs(losses[i] - losses[a]))
            if turn >= -straight:  # a left turn, or straight on up to rounding: b stays
                break
            hull.pop()
        hull.append(i)
    return hull


def hull_greedy(options: Options, spare: float) -> dict[str, int]:
    """Each tensor's option after taking hull edges by loss removed per number, while they fit in `spare`."""
    edges = []
    for name, (costs, losses) in options.items():
        hull = lower_hull(costs, losses)
        rate = np.inf
        for a, b in zip(hull, hull[1:], strict=False):
            # Along a hull the rates fall; min() keeps rounding on straight stretches from reordering them.
            rate = min(rate, (losses[a] - losses[b]) / (costs[b] - costs[a]))
            edges.append((rate, name, a, b, costs[b] - costs[a]))
    chosen = {name: 0 for name in options}
    blocked = set()  # once one of a tensor's edges is left out, so are its later ones
    for rate, name, start, end, cost in sorted(edges, key=lambda edge: -edge[0]):  # stable: ties stay in order
        if name in blocked or rate <= 0 or cost > spare or chosen[name] != start:
            blocked.add(name)
            continue
        chosen[name], spare = end, spare - cost
    return chosen


def spend_rest(
    options: dict[str, tuple[np.ndarray, np.ndarray]], chosen: dict[str, int], budget: float, allow_dense: bool
) -> dict[str, int]:
    """Spend what the price left: the next rank, or the jump to dense, removing the most loss per number that fits."""
    chosen = dict(chosen)
    left = budget - sum(options[name][0][index] for name, index in chosen.items())
    while True:
        best, best_rate, best_cost = None, 0.0, 0.0
        for name, (costs, losses) in options.items():
            index, last = chosen[name], len(costs) - 1
            steps = [index + 1] if index + 1 < last or (index + 1 == last and not allow_dense) else []
            steps += [last] if allow_dense and index < last else []
            for step in steps:
                cost = costs[step] - costs[index]
                rate = (losses[index] - losses[step]) / cost
                if cost <= left and rate > best_rate:
                    best, best_rate, best_cost = (name, step), rate, cost
        if best is None:
            return chosen
        left -= best_cost
        chosen[best[0]] = best[1]
