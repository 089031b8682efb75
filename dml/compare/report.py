"""A comparison written down: the printed table, its JSON, per-class and per-query CSVs, and an
HTML page of the classes and queries where each model is worst and where the two disagree."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from dml.atomic_files import write_text_atomic
from dml.compare.paired import Comparison, nearest
from dml.inference.report import FRAMES, html_table, query_row, write_page, write_rows
from dml.metrics.per_query import QueryResults

SHOWN = 8  # queries per section of the page
NEIGHBOURS = 5


def summary(c: Comparison) -> str:
    """The printed table: each metric of A and B, B - A with its interval and p-value, the
    class means, and McNemar's test of R@1."""
    ra = c.results_a
    how = (
        f"paired bootstrap over {'queries' if c.unit == 'query' else 'classes'}, "
        f"{c.resamples} resamples, seed {c.seed}"
    )
    lines = [
        f"A: {c.a.source}",
        f"B: {c.b.source}",
        f"{len(ra)} queries of {c.classes} classes, each scored under both models "
        f"(the split's own queries: {c.a.query.meta.get('split', 'as embedded')}); in %",
        f"{'metric':<16} {'A':>6} {'B':>6} {'B - A':>7}  "
        f"{f'{100 * c.level:g} % interval':>17}  p ({how})",
    ]
    for name, d in c.differences.items():
        lines.append(
            f"{name:<16} {100 * d.a:6.1f} {100 * d.b:6.1f} {100 * d.difference:+7.2f}"
            f"  [{100 * d.low:+6.2f}, {100 * d.high:+6.2f}]  "
            f"{p_text(d.p_value, c.resamples)}"
        )
    ma, mb = ra.class_mean(c.ks), c.results_b.class_mean(c.ks)
    for name in ("R@1 class-mean", "MAP@R class-mean"):
        lines.append(
            f"{name:<16} {100 * ma[name]:6.1f} {100 * mb[name]:6.1f} "
            f"{100 * (mb[name] - ma[name]):+7.2f}  (mean over classes; no interval)"
        )
    m = c.mcnemar
    lines.append(
        f"McNemar (R@1): right under A only {m.only_a}, under B only {m.only_b}; "
        f"chi2 (continuity-corrected) {m.statistic:.3g}, exact p {m.p_value:.2g}"
    )
    return "\n".join(lines)


def p_text(p: float, resamples: int) -> str:
    """The p-value; ``<= 1/(B+1)`` where no resample was as extreme (the smallest B can
    show)."""
    return f"<= {p:.2g}" if p * (resamples + 1) <= 1 + 1e-9 else f"{p:.2g}"


def as_json(c: Comparison) -> Dict:
    return {
        "a": c.a.source,
        "b": c.b.source,
        "queries": len(c.results_a),
        "classes": c.classes,
        "ks": c.ks,
        "unit": c.unit,
        "resamples": c.resamples,
        "level": c.level,
        "seed": c.seed,
        "differences": {n: vars(d) for n, d in c.differences.items()},
        "class_mean": {"a": c.results_a.class_mean(c.ks), "b": c.results_b.class_mean(c.ks)},
        "mcnemar": vars(c.mcnemar),
    }


def per_class_rows(c: Comparison) -> List[Dict]:
    """One row per class: its query count, each metric under A and B, and B - A."""
    rows = []
    for x, y in zip(c.results_a.per_class(c.ks), c.results_b.per_class(c.ks)):
        row = {"class": x["class"], "queries": x["queries"]}
        for name in c.differences:
            row[f"A {name}"], row[f"B {name}"] = round(x[name], 6), round(y[name], 6)
            row[f"B-A {name}"] = round(y[name] - x[name], 6)
        rows.append(row)
    return rows


def per_query_rows(c: Comparison) -> List[Dict]:
    """One row per scored query: its row, path, class, R, and under A and B the rank (1-based)
    of its first relevant reference and its MAP@R."""
    ra, rb = c.results_a, c.results_b
    paths = c.a.query.paths
    return [
        {
            "row": int(q),
            "path": paths[q],
            "class": int(label),
            "relevant": int(r),
            "A first relevant rank": int(fa) + 1,
            "B first relevant rank": int(fb) + 1,
            "A MAP@R": round(float(aa), 6),
            "B MAP@R": round(float(ab), 6),
        }
        for q, label, r, fa, fb, aa, ab in zip(
            ra.query_index, ra.labels, ra.num_relevant, ra.first_rank, rb.first_rank, ra.ap, rb.ap
        )
    ]


def write_outputs(c: Comparison, folder: str) -> List[str]:
    """compare.json, per_class.csv, queries.csv and report.html in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = [
        os.path.join(folder, n)
        for n in ("compare.json", "per_class.csv", "queries.csv", "report.html")
    ]
    write_text_atomic(paths[0], json.dumps(as_json(c), indent=1, allow_nan=False))
    write_rows(per_class_rows(c), paths[1])
    write_rows(per_query_rows(c), paths[2])
    write_page(paths[3], f"{c.a.source} (A) vs {c.b.source} (B)", page_body(c))
    return paths


def page_body(c: Comparison) -> str:
    ra, rb = c.results_a, c.results_b
    cache: Dict = {}
    classes = per_class_rows(c)
    parts = [f"<pre>{summary(c)}</pre>", f"<p>{FRAMES} Captions: rank and class.</p>"]
    for who, key in (("A", "A MAP@R"), ("B", "B MAP@R")):
        worst = sorted(classes, key=lambda r: (r[key], r["class"]))[:SHOWN]
        parts.append(f"<h4>Classes where {who} is worst (lowest MAP@R)</h4>")
        parts.append(
            html_table(worst, ["class", "queries", "A R@1", "B R@1", "A MAP@R", "B MAP@R"])
        )
    for who, results, model in (("A", ra, c.a), ("B", rb, c.b)):
        picks = results.worst(SHOWN)
        parts.append(f"<h4>Queries where {who} is worst: {who}'s neighbours</h4>")
        parts += _rows(model, results, picks, cache)
    gap = rb.ap - ra.ap
    for who, sign in (("A", -1), ("B", 1)):
        picks = [i for i in np.lexsort((ra.query_index, -sign * gap)) if sign * gap[i] > 0]
        parts.append(
            f"<h4>Where they disagree most: {who} better (MAP@R); A's then B's neighbours</h4>"
        )
        for i in picks[:SHOWN]:
            parts += _rows(c.a, ra, [i], cache) + _rows(c.b, rb, [i], cache)
        if not picks:
            parts.append("<p>none</p>")
    return "\n".join(parts)


def generated(embeddings, cache: Dict):
    """The generated-images resolver of an embedding set (made once per set and page)."""
    from dml.inference.generated_images import resolver

    key = ("resolver", id(embeddings))
    if key not in cache:
        cache[key] = resolver(embeddings.meta)
    return cache[key]


def _rows(model, results: QueryResults, picks, cache) -> List[str]:
    rows = [int(results.query_index[i]) for i in picks]
    found = nearest(model, rows, NEIGHBOURS)
    searched = model.query if model.gallery is None else model.gallery
    out = []
    for i, q, neighbours in zip(picks, rows, found):
        label = int(model.query.labels[q])
        hits = [
            {
                "path": searched.paths[j],
                "caption": f"{r + 1}: class {searched.labels[j]}",
                "match": bool(searched.labels[j] == label),
            }
            for r, j in enumerate(neighbours.tolist())
        ]
        caption = (
            f"class {label}, first relevant at {int(results.first_rank[i]) + 1}, "
            f"MAP@R {100 * float(results.ap[i]):.0f}"
        )
        archives = (model.query.meta.get("archive"), searched.meta.get("archive"))
        images = (generated(model.query, cache), generated(searched, cache))
        out.append(query_row(model.query.paths[q], caption, hits, cache, archives, images))
    return out
