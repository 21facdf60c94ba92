"""Pictures of analyze's spectra: σ_i/σ_1 against i/min(m, n), one panel per kind of layer.

matplotlib (the `plot` extra) loads only here, inside the functions, and only its object API:
no pyplot, no global backend, so a caller's interactive session is left as it is.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from lowrank_cli.errors import OutputError, UsageError, arg, require_extra
from lowrank_cli.io.publish import write_file
from lowrank_cli.ops.report import Report, Status, TensorReport

FORMATS = (".png", ".svg", ".pdf")
PANEL_INCHES = (6.0, 4.0)  # each panel; at DPI, a PNG panel is 600×400 pixels
DPI = 100
COLUMNS = 2  # panels side by side; more kinds wrap to a new row
KINDS = ("attention", "MLP", "embedding", "other")
_LEGEND_NAMES = 8  # up to this many curves in a panel: a legend of names; more: colour by layer depth
_STYLES = ("-", "--", ":", "-.")
_ATTENTION = re.compile(r"attn|attention|\b(q|k|v|o|qkv|out)_proj\b|\b(query|key|value)\b")
_MLP = re.compile(
    r"mlp|ffn|feed_?forward|intermediate|\boutput\.dense\b|\bfc\d?\b|_proj\b|dense_h_to_4h|dense_4h_to_h|w[123]\b"
)
_EMBEDDING = re.compile(r"embed|\bwte\b|\bwpe\b|lm_head")
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_kind(name: str) -> str:
    """ "attention", "MLP", "embedding" or "other", read off a tensor's name (q_proj, intermediate, wte, …)."""
    lowered = name.lower()
    if _EMBEDDING.search(lowered):
        return "embedding"
    if _ATTENTION.search(lowered):
        return "attention"
    if _MLP.search(lowered):
        return "MLP"
    return "other"


def check_plot_path(path: str | os.PathLike) -> Path:
    """The plot's path if lowrank can write it (a .png, .svg or .pdf in a folder that exists, matplotlib
    installed); raises before any work is done otherwise."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"{arg('plot')} {path}: name a .png, .svg or .pdf file (the format follows the suffix)")
    if not path.parent.is_dir():
        raise OutputError(f"{arg('plot')} {path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{arg('plot')} {path}: is a folder; name a file")
    _matplotlib()
    return path


def plot_spectra(report: Report, path: str | os.PathLike) -> tuple[int, int]:
    """Draw every analyzed tensor's normalised singular values into `path` (.png, .svg or .pdf).

    One panel per layer kind (attention, MLP, embedding, other), a curve σ_i/σ_1 on a log axis
    against i/min(m, n) per tensor; where a policy chose a rank r (status factorized), a dot marks
    the cut at i = r. The same report gives the same bytes: no dates or versions are written and
    SVG ids are salted by a constant. An existing file at `path` is replaced, in one step (io.publish).
    A report of `analyze(..., diff=True)` gives each change ΔW's spectrum instead, titled so.

    Args:
        report: what `analyze` returned, with the singular values (`top` limits each curve).
        path: the file to write; its suffix chooses the format.

    Returns:
        The figure's size in pixels at its DPI (width, height): COLUMNS panels of PANEL_INCHES·DPI per row.

    Example:
        >>> report = lowrank_cli.analyze("model.safetensors", energy=0.99)
        >>> lowrank_cli.plot_spectra(report, "spectra.png")
        (1200, 800)
    """
    path = check_plot_path(path)
    matplotlib = _matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = _panels(report)
    columns = min(COLUMNS, max(len(panels), 1))
    rows = max(math.ceil(len(panels) / columns), 1)
    size = (columns * PANEL_INCHES[0], rows * PANEL_INCHES[1])
    with matplotlib.rc_context({"svg.hashsalt": "lowrank", "font.size": 8}):
        figure = Figure(figsize=size, dpi=DPI, layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        if not panels:
            axes[0].set_visible(True)
            axes[0].text(0.5, 0.5, "no matrix with a nonzero spectrum", ha="center", va="center")
            axes[0].set_axis_off()
        for ax, (kind, tensors) in zip(axes, panels.items(), strict=False):
            prefix = os.path.commonprefix([t.name for t in tensors]) if len(tensors) > 1 else ""
            prefix = prefix[: prefix.rfind(".") + 1]
            layers = [_layer(t.name) for t in tensors]
            deepest = max([layer for layer in layers if layer is not None], default=0)
            by_depth = len(tensors) > _LEGEND_NAMES and any(layer is not None for layer in layers)
            roles = sorted({_role(t.name) for t in tensors})
            cmap = matplotlib.colormaps["viridis"]
            for index, (tensor, layer) in enumerate(zip(tensors, layers, strict=True)):
                x, y = _curve(tensor)
                if by_depth:
                    color = cmap(layer / max(deepest, 1)) if layer is not None else "black"
                    style, label = _STYLES[roles.index(_role(tensor.name)) % len(_STYLES)], None
                else:
                    color, style, label = f"C{index % 10}", "-", tensor.name[len(prefix) :] or tensor.name
                ax.plot(x, y, style, color=color, linewidth=0.9, alpha=0.8, label=label)
                cut = _cut(tensor)
                if cut is not None:
                    ax.plot(*cut, "o", color=color, markersize=3.5, markeredgecolor="black", markeredgewidth=0.4)
            ax.set_yscale("log")
            ax.set_xlim(0, 1)
            ax.set_xlabel("$i$ / min($m$, $n$)")
            ax.set_ylabel(r"$\sigma_i / \sigma_1$")
            ax.set_title(f"{kind}: {len(tensors)} tensor{'s' if len(tensors) != 1 else ''}", loc="left")
            ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
            if by_depth:
                handles = [Line2D([], [], linestyle=_STYLES[i % 4], color="grey", label=r) for i, r in enumerate(roles)]
                if len(roles) <= 2 * len(_STYLES):
                    ax.legend(handles=handles, fontsize=6, loc="lower left", title=prefix or None, title_fontsize=6)
                colors = ScalarMappable(Normalize(0, max(deepest, 1)), cmap)
                figure.colorbar(colors, ax=ax, label="layer", fraction=0.05, pad=0.01)
            else:
                ax.legend(fontsize=6, loc="lower left", title=prefix or None, title_fontsize=6)
        figure.suptitle(_title(report), fontsize=9)
        suffix = path.suffix.lower()

        def draw(temporary: Path) -> None:
            figure.savefig(temporary, dpi=DPI, format=suffix[1:], metadata=_NO_STAMPS[suffix])

        try:
            write_file(path, draw, force=True)  # replaced as a whole: a reader never sees half a picture
        except OSError as exc:
            raise OutputError(
                f"{arg('plot')} {path}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None
    width, height = (round(inches * DPI) for inches in size)
    return width, height


# no software version or date in the file: two runs on the same report give the same bytes
_NO_STAMPS = {
    ".png": {"Software": None},
    ".svg": {"Date": None, "Creator": None},
    ".pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
}


def _matplotlib():
    return require_extra("matplotlib", "plot", arg("plot"))


def _panels(report: Report) -> dict[str, list[TensorReport]]:
    """The tensors with a spectrum to draw, by kind, in KINDS order (kinds with none left out)."""
    drawn = [t for t in report.tensors if t.status != Status.skipped and t.singular_values and t.singular_values[0] > 0]
    panels = {kind: [t for t in drawn if layer_kind(t.name) == kind] for kind in KINDS}
    return {kind: tensors for kind, tensors in panels.items() if tensors}


def _short_side(tensor: TensorReport) -> int:
    m = tensor.shape[0]
    n = math.prod(tensor.shape[1:])  # a conv kernel (out, in, kh, kw) is the matrix out × in·kh·kw
    return min(m, n)


def _curve(tensor: TensorReport) -> tuple[list[float], list[float]]:
    """(i/min(m, n), σ_i/σ_1) for i = 1, 2, …, the zeros left out (a log axis has no place for them)."""
    values, k = tensor.singular_values, _short_side(tensor)
    points = [((i + 1) / k, s / values[0]) for i, s in enumerate(values) if s > 0]
    return [x for x, _ in points], [y for _, y in points]


def _cut(tensor: TensorReport) -> tuple[float, float] | None:
    """Where the policy's rank r cuts the curve: (r/min(m, n), σ_r/σ_1), for a tensor it would factorize."""
    rank, values = tensor.rank, tensor.singular_values
    if tensor.status != Status.factorized or rank is None or not 1 <= rank <= len(values) or values[rank - 1] <= 0:
        return None
    return rank / _short_side(tensor), values[rank - 1] / values[0]


def _layer(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _role(name: str) -> str:
    """The name without its layer number and `.weight`: what a tensor does in every layer (self_attn.q_proj)."""
    parts = [part for part in name.removesuffix(".weight").split(".") if not part.isdigit()]
    return ".".join(parts[-2:])


def _title(report: Report) -> str:
    sources = ["/".join(Path(source).parts[-2:]) for source in report.sources]  # the folder says which model
    policy = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in (report.policy or {}).items())
    if report.options.get("diff"):  # analyze --diff: the rows are of ΔW = TUNED − BASE
        title = f"normalised singular values of ΔW = {sources[1]} − {sources[0]}"
    else:
        title = f"normalised singular values: {' '.join(sources)}"
    return title + (f"  (dots: the cut of {policy})" if policy else "")
